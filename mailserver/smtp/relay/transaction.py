"""One SMTP transaction with one host: all recipients of one message for that host.

EHLO with our host name (HELO if EHLO is refused), STARTTLS when offered (or required),
AUTH for a smart host, then MAIL, every RCPT and DATA, pipelined when the host offers
PIPELINING (RFC 2920).  The outcome is one AttemptResult per recipient, or `HostFailure`
when this host could not take the message at all and the next one should be tried
(connection failure, greeting or EHLO refused, 421, TLS required but unavailable).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger

from mailserver.smtp.queue.attempt import AttemptResult
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.relay.client import (ServerReply, SMTPClientError, SMTPClientProtocol,
                                          parse_extensions)
from mailserver.smtp.relay.tls import OpportunisticTLS, verified_tls

log = Logger()

TLSPolicy = Literal["opportunistic", "required", "implicit", "none"]


class HostFailure(Exception):
    """This host cannot take the message now; try the next one."""

    def __init__(self, result: AttemptResult, tls_failed: bool = False) -> None:
        super().__init__(result.text)
        self.result = result
        self.tls_failed = tls_failed


@dataclass(frozen=True)
class HostTarget:
    name: str                  # host name: TLS SNI and verification, logs, Remote-MTA
    address: str               # IP address to connect to
    port: int
    tls: TLSPolicy
    ca_file: str = ""
    username: str = ""
    password: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}[{self.address}]:{self.port}"


@dataclass
class Settings:
    helo: str
    connect_timeout: float
    timeout: float


def _temp(text: str, target: HostTarget, status: str = "4.4.1") -> AttemptResult:
    return AttemptResult.temporary(text, status, target.name)


class Transaction:
    """Drives one connection; `run()` fires with [(recipient, result)] or HostFailure."""

    def __init__(self, reactor: Any, target: HostTarget, settings: Settings, env: Envelope,
                 message: Path, recipients: Sequence[RecipientState],
                 tracker: set | None = None) -> None:
        self.reactor = reactor
        self.target = target
        self.settings = settings
        self.env = env
        self.message = message
        self.recipients = list(recipients)
        self.tracker = tracker
        self.proto: SMTPClientProtocol | None = None
        self.tls_active = False

    async def run(self) -> list[tuple[RecipientState, AttemptResult]]:
        try:
            return await self._run()
        except HostFailure:
            raise
        except SMTPClientError as e:
            raise HostFailure(_temp(f"{self.target.label}: {e}", self.target),
                              tls_failed=self._in_tls_handshake) from None
        except Exception as e:
            # The connection went away under us (the message's file sender told to stop
            # when the host reset the connection during DATA, a TLS error): this host's
            # failure, never the whole message's, whose other domains may be done.
            if isinstance(e, (AttributeError, NameError, TypeError, KeyError, IndexError,
                              AssertionError)):   # our mistake, not the host's: say so
                log.failure("relay: {host}: error in the transaction", host=self.target.label)
            else:
                log.info("relay: {host}: {error!r}", host=self.target.label, error=e)
            raise HostFailure(_temp(f"{self.target.label}: connection failed: {_reason(e)}",
                                    self.target), tls_failed=self._in_tls_handshake) from None
        finally:
            if self.proto is not None:
                if self.tracker is not None:
                    self.tracker.discard(self.proto)
                if self.proto.transport is not None:
                    self.proto.transport.loseConnection()

    _in_tls_handshake = False

    async def _connect(self) -> SMTPClientProtocol:
        t = self.target
        if ":" in t.address:
            endpoint: Any = endpoints.TCP6ClientEndpoint(self.reactor, t.address, t.port,
                                                         timeout=self.settings.connect_timeout)
        else:
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, t.address, t.port,
                                                    timeout=self.settings.connect_timeout)
        if t.tls == "implicit":
            endpoint = endpoints.wrapClientTLS(verified_tls(t.name, t.ca_file), endpoint)
        proto = SMTPClientProtocol(self.settings.timeout, self.reactor)
        try:
            await endpoint.connect(_Once(proto))
        except (error.ConnectError, error.TimeoutError, OSError) as e:
            raise HostFailure(_temp(f"connect to {t.label} failed: {_reason(e)}", t)) from None
        self.proto = proto
        if self.tracker is not None:
            self.tracker.add(proto)
        self.tls_active = t.tls == "implicit"
        return proto

    async def _run(self) -> list[tuple[RecipientState, AttemptResult]]:
        t = self.target
        proto = await self._connect()
        greeting = await proto.greeting
        if greeting.code != 220:
            raise HostFailure(_temp(f"{t.label} refused to talk: {greeting}", t))
        ext = await self._hello(proto)
        if t.tls in ("opportunistic", "required") and "STARTTLS" in ext:
            ext = await self._starttls(proto)
        elif t.tls == "required":
            raise HostFailure(_temp(f"TLS is required for {t.name} but {t.label} does not "
                                    "offer STARTTLS", t, "4.7.4"))
        if t.username:
            await self._auth(proto, ext)
        return await self._send(proto, ext)

    async def _hello(self, proto: SMTPClientProtocol) -> dict[str, str]:
        reply = await proto.command(f"EHLO {self.settings.helo}")
        if reply.code == 250:
            return parse_extensions(reply)
        if reply.code == 421:
            raise HostFailure(_temp(f"{self.target.label}: {reply}", self.target))
        reply = await proto.command(f"HELO {self.settings.helo}")
        if reply.code != 250:
            raise HostFailure(_temp(f"{self.target.label} refused HELO: {reply}", self.target))
        return {}

    async def _starttls(self, proto: SMTPClientProtocol) -> dict[str, str]:  # RFC 3207
        t = self.target
        reply = await proto.command("STARTTLS")
        if reply.code != 220:
            if t.tls == "required":
                raise HostFailure(_temp(f"{t.label} refused STARTTLS: {reply}", t, "4.7.4"))
            log.info("relay: {host} offered but refused STARTTLS ({reply}); going on in "
                     "plaintext", host=t.label, reply=str(reply))
            return await self._hello(proto)
        opportunistic = None
        if t.tls == "required":
            creator: Any = verified_tls(t.name, t.ca_file)
        else:
            creator = opportunistic = OpportunisticTLS(t.name, t.ca_file)
        # Left set when the handshake or the EHLO over it fails: run() reads it then, and
        # an opportunistic relay tries again without TLS (RFC 7435).
        self._in_tls_handshake = True
        proto.start_tls(creator)
        ext = await self._hello(proto)  # RFC 3207 4.2: forget what was said before
        self._in_tls_handshake = False
        self.tls_active = True
        if opportunistic is not None:
            problem = opportunistic.record.problem(t.name, proto.transport.getHandle())
            if problem:
                log.info("relay: {host}: TLS certificate not verified ({problem}); "
                         "encrypting anyway (opportunistic TLS)", host=t.label, problem=problem)
        return ext

    async def _auth(self, proto: SMTPClientProtocol, ext: dict[str, str]) -> None:  # RFC 4954
        t = self.target
        if not self.tls_active:
            raise HostFailure(_temp(f"{t.label}: will not send credentials without TLS", t,
                                    "4.7.0"))
        mechanisms = ext.get("AUTH", "").upper().split()
        user, password = t.username.encode("utf-8"), t.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode("ascii")
            reply = await proto.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = await proto.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(user))
            if reply.code == 334:
                reply = await proto.command(base64.b64encode(password))
        else:
            raise HostFailure(_temp(f"{t.label} offers no AUTH PLAIN or LOGIN "
                                    f"(AUTH {ext.get('AUTH', '')!r})", t, "4.7.0"))
        if reply.code != 235:
            log.error("relay: smart host {host} refused our credentials: {reply}",
                      host=t.label, reply=str(reply))
            raise HostFailure(_temp(f"{t.label} refused authentication: {reply}", t, "4.7.0"))

    async def _send(self, proto: SMTPClientProtocol,
                    ext: dict[str, str]) -> list[tuple[RecipientState, AttemptResult]]:
        t, env = self.target, self.env
        size = env.size + len(env.prefix.encode("utf-8"))
        limit = ext.get("SIZE", "")
        if limit.isdigit() and int(limit) and size > int(limit):  # RFC 1870
            result = AttemptResult.failed(
                f"message of {size} bytes exceeds the {limit} bytes {t.name} accepts", "5.3.4",
                t.name)
            return [(r, result) for r in self.recipients]
        if env.eight_bit and "8BITMIME" not in ext:
            # RFC 6152 3: 8-bit data only to a host that offers 8BITMIME; converting it
            # would break the DKIM signature, so this host cannot take it (another MX
            # may: the last host's answer is the one that counts).
            raise HostFailure(AttemptResult.failed(
                f"{t.label} does not offer 8BITMIME and the message has 8-bit data",
                "5.6.3", t.name))
        params = ""
        if "SIZE" in ext:
            params += f" SIZE={size}"
        if env.eight_bit:
            params += " BODY=8BITMIME"  # RFC 6152
        commands = [f"MAIL FROM:<{env.sender}>{params}"]
        commands += [f"RCPT TO:<{r.address}>" for r in self.recipients]
        if "PIPELINING" in ext:
            # Every reply that came, also when the host then closed the connection (a
            # blocklist's 554 to MAIL, then close): a definite refusal is not lost.
            answers = await defer.DeferredList(proto.pipeline(commands + ["DATA"]),
                                               consumeErrors=True)
            lost = next((value for ok, value in answers if not ok), None)
            if lost is not None:
                return self._cut_short([value if ok else None for ok, value in answers[:-1]],
                                       lost)
            mail, *rcpts, data = (value for _, value in answers)
        else:
            mail = await proto.command(commands[0])
            rcpts, data = [], None
            if mail.code == 250:
                for c in commands[1:]:
                    rcpts.append(await proto.command(c))
                if any(r.code in (250, 251) for r in rcpts):
                    data = await proto.command("DATA")
        self._check_421(mail, *rcpts, *(x for x in [data] if x is not None))
        if mail.code != 250:
            result = self._refused(mail, "MAIL")
            return [(r, result) for r in self.recipients]
        results: dict[int, AttemptResult] = {}
        accepted = []
        for i, reply in enumerate(rcpts):
            if reply.code in (250, 251):
                accepted.append(i)
            else:
                results[i] = self._refused(reply, "RCPT")
        if not accepted:
            if data is not None and data.code == 354:
                await proto.command(".")  # RFC 2920 3.1: end the DATA we were granted, empty
            await self._quit(proto)
            return [(r, results[i]) for i, r in enumerate(self.recipients)]
        assert data is not None
        if 200 <= data.code < 400 and data.code != 354:
            # RFC 5321 4.3.2: DATA gets 354 or an error.  A "250" before any octet was
            # sent is no delivery: try again later.
            final = _temp(f"{t.label} answered DATA with {data}, not 354", t, "4.5.0")
        elif data.code != 354:
            final = self._result(data)
        else:
            reply = await proto.send_message(env.prefix.encode("utf-8", "replace"), self.message)
            self._check_421(reply)
            final = self._result(reply)
        for i in accepted:
            results[i] = final
        await self._quit(proto)
        return [(r, results[i]) for i, r in enumerate(self.recipients)]

    def _check_421(self, *replies: ServerReply) -> None:
        for reply in replies:
            if reply.code == 421:  # the host is going away: try another (RFC 5321 3.8)
                raise HostFailure(_temp(f"{self.target.label}: {reply}", self.target))

    def _result(self, reply: ServerReply) -> AttemptResult:
        return AttemptResult.from_reply(reply.code, reply.text, self.target.name)

    def _refused(self, reply: ServerReply, command: str) -> AttemptResult:
        """A reply to MAIL or RCPT other than its success codes (250; 251 for RCPT).
        4xx and 5xx say what they say; anything else (a 252 "will try", a 354) is no
        answer RFC 5321 4.3.2 allows, and certainly no delivery: try again later."""
        if 400 <= reply.code < 600:
            return self._result(reply)
        return _temp(f"{self.target.label} answered {command} with {reply}", self.target,
                     "4.5.0")

    def _cut_short(self, replies: list[ServerReply | None],
                   lost: Any) -> list[tuple[RecipientState, AttemptResult]]:
        """The connection ended before every pipelined reply came (`replies`: MAIL's,
        then each RCPT's, None where none came).  The refusals that did come count; the
        rest is this host's failure, and when nothing definite came, the next host's turn
        (HostFailure)."""
        mail, rcpts = replies[0], replies[1:]
        if mail is None:
            lost.raiseException()
        self._check_421(mail, *(r for r in rcpts if r is not None))
        if mail.code != 250:
            result = self._refused(mail, "MAIL")
            return [(r, result) for r in self.recipients]
        refused = {i: self._refused(reply, "RCPT") for i, reply in enumerate(rcpts)
                   if reply is not None and reply.code not in (250, 251)}
        if not refused:
            lost.raiseException()
        gone = _temp(f"{self.target.label}: connection lost: {lost.getErrorMessage()}",
                     self.target)
        return [(r, refused.get(i, gone)) for i, r in enumerate(self.recipients)]

    async def _quit(self, proto: SMTPClientProtocol) -> None:
        try:
            d = proto.command("QUIT")
            d.addTimeout(5, self.reactor)
            await d
        except Exception:
            pass



class _Once(protocol.Factory):
    """connectProtocol's factory, without a log line per connection."""

    noisy = False

    def __init__(self, proto: SMTPClientProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self.proto


def _reason(e: BaseException) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (error.TimeoutError, defer.TimeoutError)):
        return "connection timed out"
    text = str(e).strip()
    return text or type(e).__name__
