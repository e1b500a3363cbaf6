"""The ManageSieve session (RFC 5804): capabilities, STARTTLS, AUTHENTICATE PLAIN through
the shared portal and login throttle, and the script commands over mailserver.sieve.scripts.

- Commands run one at a time in order; input arriving meanwhile waits (reading pauses
  when much is waiting).  Disk work and parsing run in a thread (`context.run`), never in
  the reactor.
- Every input is bounded (mailserver.managesieve.wire): the command text by
  limits.max_command_length, every literal by sieve.max_script_size (before login by
  MAX_LITERAL_BEFORE_LOGIN); a bad command gets NO and the session goes on, until
  MAX_BAD_COMMANDS of them in a row (then BYE).
- Credentials only under TLS (or from loopback when auth.allow_plaintext_loopback says
  so): before that SASL is advertised empty, as RFC 5804 1.7 allows beside STARTTLS.
- Nothing pipelined behind STARTTLS counts (the CVE-2011-0411 injection).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred.error import LoginFailed
from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailserver import sasl
from mailserver.accounts import AccountsUnavailable
from mailserver.auth import throttled_login
from mailserver.connlimit import LimitedProtocolMixin
from mailserver.peer import PeerFacts
from mailserver.managesieve.account import ISieveAccount, SieveAccount
from mailserver.managesieve.wire import (MAX_NUMBER, Arg, Atom, CommandReader, WireError,
                                         capability_lines, response, string)
from mailserver.metrics import unexported
from mailserver.sieve import scripts
from mailserver.streaming import OutputPacer, close_gracefully

NONAUTH, AUTH = "non-authenticated", "authenticated"
IMPLEMENTATION = "mailserver ManageSieve"
MECHANISMS = ("PLAIN",)
MAX_BAD_COMMANDS = 20         # in a row; then BYE
# Literals before login carry SASL responses only (PLAIN: at most 3 x 255 octets, in
# base64); scripts may come after it, up to sieve.max_script_size.
MAX_LITERAL_BEFORE_LOGIN = 4096
PIPELINE_BUFFER = 64 * 1024   # input held while a command runs before reading pauses

_NONAUTH = frozenset({NONAUTH})
_AUTH = frozenset({AUTH})
_ANY = _NONAUTH | _AUTH

# command -> (states where it is valid, least and most arguments) (RFC 5804 2)
_COMMANDS: dict[str, tuple[frozenset[str], int, int]] = {
    "AUTHENTICATE": (_NONAUTH, 1, 2),    # 2.1
    "STARTTLS": (_NONAUTH, 0, 0),        # 2.2
    "LOGOUT": (_ANY, 0, 0),              # 2.3
    "CAPABILITY": (_ANY, 0, 0),          # 2.4
    "HAVESPACE": (_AUTH, 2, 2),          # 2.5
    "PUTSCRIPT": (_AUTH, 2, 2),          # 2.6
    "LISTSCRIPTS": (_AUTH, 0, 0),        # 2.7
    "SETACTIVE": (_AUTH, 1, 1),          # 2.8
    "GETSCRIPT": (_AUTH, 1, 1),          # 2.9
    "DELETESCRIPT": (_AUTH, 1, 1),       # 2.10
    "RENAMESCRIPT": (_AUTH, 2, 2),       # 2.11
    "CHECKSCRIPT": (_AUTH, 1, 1),        # 2.12
    "NOOP": (_ANY, 0, 1),                # 2.13
    "UNAUTHENTICATE": (_AUTH, 0, 0),     # 2.14
}


class _BadArguments(Exception):
    pass


@dataclass
class ManageSieveContext:
    """What every session of one listener shares."""

    hostname: str
    limits: Any                          # LimitsConfig
    sieve: Any                           # SieveConfig
    portal: Any                          # twisted.cred Portal
    throttle: Any                        # AuthThrottle
    extensions: tuple[str, ...] = ()     # the SIEVE capability (parser.CAPABILITIES)
    tls: Any = None                      # server TLS context for STARTTLS; None: none
    allow_plaintext_loopback: bool = False
    service: str = "managesieve"
    clock: Any = None                    # IReactorTime; the reactor when None
    metrics: Any = None                  # mailserver.metrics.ServiceMetrics
    run: Callable[..., defer.Deferred[Any]] = deferToThread   # where disk work runs

    def __post_init__(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor
            self.clock = reactor
        if self.metrics is None:
            self.metrics = unexported(self.service)

    @property
    def script_limits(self) -> scripts.Limits:
        return scripts.Limits.from_config(self.sieve)


class ManageSieveSession(PeerFacts, LimitedProtocolMixin, TimeoutMixin, protocol.Protocol):
    log = Logger()

    def __init__(self, context: ManageSieveContext) -> None:
        self.context = context
        self.limits = context.limits
        self.idle_timeout = context.limits.idle_timeout
        self.state = NONAUTH
        self.startedTLS = False
        self.account: SieveAccount | None = None
        self.reader = CommandReader(context.limits.max_command_length,
                                    min(MAX_LITERAL_BEFORE_LOGIN,
                                        context.sieve.max_script_size))
        self._logout: Callable[[], None] | None = None
        self._sasl: Callable[[list[Arg] | WireError], None] | None = None
        self._busy = False
        self._draining = False
        self._closing = False
        self._lost = False
        self._reading_paused = False
        self._pacer = OutputPacer()   # answers the client has not been seen to take
        self._abort_call: Any = None
        self._bad_commands = 0
        self._auth_failures = 0

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # TimeoutMixin
        return self.context.clock.callLater(period, func)

    # -- connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:  # RFC 5804 1.7: the greeting is the capabilities
        self.setTimeout(self.idle_timeout)
        self._send(capability_lines(self.capabilities())
                   + response("OK", f"{self.context.hostname} ManageSieve ready"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # type: ignore[assignment]
        self._closing = self._lost = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._sasl = None
        self.reader.clear()
        self.setTimeout(None)
        self._release()
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        self.log.info("{service} {ip}: idle timeout, disconnecting",
                      service=self.context.service, ip=self.peer_ip)
        self._send(response("BYE", "Disconnected for inactivity"))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.reader.clear()
        self.setTimeout(None)
        if self._abort_call is None and not self._lost:
            self._abort_call = close_gracefully(self.transport, self.callLater)

    def _send(self, data: bytes) -> None:
        if not self._lost:
            self._pacer.wrote(len(data))
            self.transport.write(data)

    def _ok(self, text: str | None = None, code: str | None = None,
            code_arg: str | bytes | None = None) -> None:
        self._send(response("OK", text, code, code_arg))

    def _no(self, text: str, code: str | None = None) -> None:
        self._send(response("NO", text, code))

    # -- capabilities (RFC 5804 1.7) -----------------------------------------------------

    def capabilities(self) -> list[tuple[str, str | None]]:
        ctx = self.context
        items: list[tuple[str, str | None]] = [
            ("IMPLEMENTATION", IMPLEMENTATION),
            # Empty before TLS: RFC 5804 1.7 allows it when STARTTLS is offered.
            ("SASL", " ".join(MECHANISMS) if self.plaintext_allowed() else ""),
            ("SIEVE", " ".join(ctx.extensions)),
        ]
        if self.state == NONAUTH and ctx.tls is not None and not self.tls_active:
            items.append(("STARTTLS", None))
        # RFC 5804 1.7: NOTIFY only with the enotify extension, which is not offered.
        items.append(("MAXREDIRECTS", str(ctx.sieve.max_redirects)))
        if self.account is not None:
            items.append(("OWNER", self.account.address))
        items.append(("UNAUTHENTICATE", None))
        items.append(("VERSION", "1.0"))
        return items

    # -- input loop ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self.reader.feed(data)
        self._drain()
        if (self._busy and self.reader.buffered > PIPELINE_BUFFER
                and not self._reading_paused):
            self._reading_paused = True
            self.transport.pauseProducing()

    def _drain(self) -> None:
        if self._draining:
            return  # a command finished at once, inside the loop below: it goes on
        self._draining = True
        self._pacer.new_turn()
        try:
            while not self._busy and not self._closing:
                if self._pacer.due:
                    # Answers the client has not taken: the next command waits until it
                    # has (the idle timer runs on meanwhile).
                    self._busy = True
                    waited = self._pacer.wait(self.transport)
                    waited.addCallback(self._taken)
                    break
                item = self.reader.next()
                if item is None:
                    break
                if self._sasl is not None:
                    respond, self._sasl = self._sasl, None
                    respond(item)
                else:
                    self._command(item)
        finally:
            self._draining = False
        if (self._reading_paused and not self._closing
                and self.reader.buffered <= PIPELINE_BUFFER):
            self._reading_paused = False
            self.transport.resumeProducing()

    def _taken(self, drained: bool) -> None:
        self._busy = False
        if not drained:   # the connection is going
            self._closing = True
        elif not self._closing:
            self._drain()

    def _bad_command(self, why: str, code: str | None = None) -> None:
        self._bad_commands += 1
        self._no(why, code)
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self.log.info("{service} {ip}: too many bad commands, disconnecting",
                          service=self.context.service, ip=self.peer_ip)
            self._send(response("BYE", "Too many bad commands"))
            self._close()

    def _hold(self, d: defer.Deferred[Any]) -> None:
        """Run later commands only once `d` has fired; the idle timer stops meanwhile."""
        self._busy = True
        self.setTimeout(None)

        def release(result: Any) -> None:
            if isinstance(result, Failure):
                self.log.failure("{service} {ip}: command failed", result,
                                 service=self.context.service, ip=self.peer_ip)
                self._no("Internal server error, try again later", "TRYLATER")
            self._busy = False
            if self._closing:
                return
            self.setTimeout(self.idle_timeout)
            self._drain()

        d.addBoth(release)

    def _command(self, item: list[Arg] | WireError) -> None:
        if isinstance(item, WireError):
            self._bad_command(item.reason, "QUOTA/MAXSIZE" if item.too_large else None)
            return
        if not item:
            return  # an empty line
        verb, args = item[0], item[1:]
        if not isinstance(verb, Atom):
            self._bad_command("Expected a command name")
            return
        name = verb.upper()
        spec = _COMMANDS.get(name)
        if spec is None:
            self._bad_command("Unknown command")
            return
        states, least, most = spec
        if self.state not in states:
            self._bad_command("Authenticate first" if self.state == NONAUTH
                              else "Not valid after authentication")
            return
        if not least <= len(args) <= most:
            self._bad_command(f"Wrong number of arguments for {name}")
            return
        try:
            getattr(self, "do_" + name)(*args)
        except _BadArguments:
            self._bad_command(f"Bad arguments for {name}")
            return
        self._bad_commands = 0

    # -- arguments -----------------------------------------------------------------------

    @staticmethod
    def _bytes(arg: Arg) -> bytes:
        return arg.encode("ascii") if isinstance(arg, Atom) else arg

    def _text(self, arg: Arg) -> str:
        try:
            return self._bytes(arg).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadArguments() from None

    def _number(self, arg: Arg) -> int:
        raw = self._bytes(arg)
        if not raw.isdigit() or len(raw) > 10 or int(raw) > MAX_NUMBER:
            raise _BadArguments()
        return int(raw)

    def _name(self, arg: Arg) -> str | None:
        """A script name from the client; None (after a NO) when it is not acceptable."""
        try:
            name = self._bytes(arg).decode("utf-8")
        except UnicodeDecodeError:
            self._no("Invalid script name: not UTF-8")
            return None
        try:
            return scripts.check_name(name)
        except scripts.InvalidName as e:
            self._no(f"Invalid script name: {e}")
            return None

    # -- non-authenticated state ---------------------------------------------------------

    def do_CAPABILITY(self) -> None:  # RFC 5804 2.4
        self._send(capability_lines(self.capabilities()) + response("OK", "Capability completed"))

    def do_NOOP(self, tag: Arg | None = None) -> None:  # RFC 5804 2.13
        if tag is None:
            self._ok("Done")
        else:
            self._ok("Done", "TAG", self._bytes(tag))

    def do_LOGOUT(self) -> None:  # RFC 5804 2.3
        self._ok("Logout completed")
        self._close()

    def do_STARTTLS(self) -> None:  # RFC 5804 2.2
        if self.tls_active:
            self._no("Already using TLS")
            return
        if self.context.tls is None:
            self._no("TLS not available")
            return
        self._ok("Begin TLS negotiation now")
        self.reader.clear()  # nothing pipelined before the handshake counts
        self.transport.startTLS(self.context.tls)
        self.startedTLS = True
        # RFC 5804 2.2: the capabilities again, unasked, once TLS is up (written now, they
        # go out through TLS after the handshake).
        self._send(capability_lines(self.capabilities())
                   + response("OK", "TLS negotiation successful"))

    def do_AUTHENTICATE(self, mechanism: Arg, initial: Arg | None = None) -> None:
        """RFC 5804 2.1, SASL PLAIN (RFC 4616), with or without an initial response."""
        if not self.plaintext_allowed():
            self._no("Authentication requires TLS; use STARTTLS first", "ENCRYPT-NEEDED")
            return
        mech = self._text(mechanism).upper()
        if mech not in MECHANISMS:
            self._no(f"Unsupported authentication mechanism {mech[:40]!r}")
            return
        exchange = sasl.exchange_for(mech)
        assert exchange is not None
        try:
            challenge = exchange.start(None if initial is None
                                       else sasl.decode(self._bytes(initial)))
        except sasl.SASLError as e:
            self._sasl_refused(e)
            return
        self._sasl_next(exchange, challenge)

    def _sasl_next(self, exchange: sasl.Exchange, challenge: bytes | None) -> None:
        if challenge is None:
            self._login(exchange.username, exchange.password)
            return

        def respond(item: list[Arg] | WireError) -> None:
            if isinstance(item, WireError) or len(item) != 1:
                self._bad_command("Expected one string with the SASL response")
                return
            try:
                following = exchange.respond(self._bytes(item[0]))
            except sasl.Cancelled:   # RFC 5804 2.1: the client cancels
                self._no("Authentication cancelled")
                self._count_auth_failure()   # as on submission: no endless AUTH, cancel
                return
            except sasl.SASLError as e:
                self._sasl_refused(e)
                return
            self._sasl_next(exchange, following)

        self._sasl = respond
        self._send(string(base64.b64encode(challenge)) + b"\r\n")

    def _sasl_refused(self, error: sasl.SASLError) -> None:
        """Login data that could not be read counts as a failed login on this connection
        (as on submission): no password was tried, but it must not go on for ever."""
        if error.reason == sasl.PROXY:
            self._no("Proxy login not allowed")
        elif error.reason == sasl.CANNOT_DECODE:
            self._no("Invalid base64")
        else:
            self._no("Malformed authentication data")
        self._count_auth_failure()

    def _count_auth_failure(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self.limits.auth_failures_per_connection:
            self._send(response("BYE", "Too many authentication failures"))
            self._close()

    def _login(self, user: str, password: str) -> None:
        ip = self.peer_ip
        account = user.lower()
        d = throttled_login(self.context.portal, self.context.throttle, self.context.clock,
                            ip, account, user.encode("utf-8"), password.encode("utf-8"),
                            ISieveAccount)
        d.addCallbacks(self._logged_in, self._login_failed,
                       callbackArgs=(ip, account), errbackArgs=(ip, account))
        self._hold(d)

    def _logged_in(self, result: tuple[Any, SieveAccount, Callable[[], None]], ip: str,
                   account: str) -> None:
        _, avatar, logout = result
        self.context.throttle.success(ip, account)
        if self._lost:
            logout()
            return
        self.account, self._logout = avatar, logout
        self.state = AUTH
        self.reader.max_literal = self.context.sieve.max_script_size
        self.log.info("{service} login {user} from {ip} tls={tls}",
                      service=self.context.service, user=avatar.address, ip=ip,
                      tls=self.tls_active)
        self.context.metrics.logged_in(self)
        self._ok("Logged in")

    def _login_failed(self, f: Failure, ip: str, account: str) -> None:
        if f.check(AccountsUnavailable):  # a subsystem is down: no traceback, no throttle
            self.log.info("{service} login for {user} from {ip} refused: accounts database "
                          "unavailable", service=self.context.service, user=account, ip=ip)
            self._no("Accounts unavailable, try again later", "TRYLATER")  # RFC 5804 1.3
            return
        if not f.check(LoginFailed):
            self.log.failure("{service} login error for {user}", f,
                             service=self.context.service, user=account)
            self._no("Temporary server error, try again later", "TRYLATER")
            return
        self.context.throttle.failure(ip, account)
        self.log.info("{service} login failed for {user} from {ip}",
                      service=self.context.service, user=account, ip=ip)
        self.context.metrics.auth_failed()
        self._no("Authentication failed")
        self._count_auth_failure()

    # -- authenticated state -------------------------------------------------------------

    def _release(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            logout()

    def do_UNAUTHENTICATE(self) -> None:  # RFC 5804 2.14
        self._release()
        self.account = None
        self.state = NONAUTH
        self.reader.max_literal = min(MAX_LITERAL_BEFORE_LOGIN,
                                      self.context.sieve.max_script_size)
        self._ok("Unauthenticated")

    def _disk(self, answer: Callable[[Any], None], fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> None:
        """`fn` (a mailserver.sieve.scripts function) in a thread, then `answer` with its
        result (a refusal answered by `_refused`); this session's next commands wait."""
        d = self.context.run(fn, *args, **kwargs)
        d.addCallbacks(answer, self._refused)
        self._hold(d)

    def _refused(self, f: Failure) -> None:
        """A scripts.ScriptError as its RFC 5804 response; anything else goes on (and
        ends as NO (TRYLATER) in _hold)."""
        f.trap(scripts.ScriptError)
        e = f.value
        if isinstance(e, scripts.NoSuchScript):
            self._no(str(e), "NONEXISTENT")
        elif isinstance(e, scripts.ScriptExists):
            self._no(str(e), "ALREADYEXISTS")
        elif isinstance(e, scripts.ScriptIsActive):
            self._no(str(e), "ACTIVE")
        elif isinstance(e, scripts.QuotaExceeded):
            self._no(str(e), e.code)
        else:
            self._no(str(e))

    def _user(self) -> SieveAccount:
        assert self.account is not None
        return self.account

    def _done(self, what: str, name: str) -> Callable[[Any], None]:
        """An answer that logs the change, then says OK."""
        user = self._user().address

        def done(_: Any) -> None:
            self.log.info("{service} {user}: {what} {name!r}", service=self.context.service,
                          user=user, what=what, name=name)
            self._ok()
        return done

    def do_HAVESPACE(self, name_arg: Arg, size_arg: Arg) -> None:  # RFC 5804 2.5
        size = self._number(size_arg)
        name = self._name(name_arg)
        if name is None:
            return
        self._disk(lambda _: self._ok("Putscript would succeed"), scripts.have_space,
                   self._user().path, name, size, self.context.script_limits)

    def do_PUTSCRIPT(self, name_arg: Arg, content: Arg) -> None:  # RFC 5804 2.6
        name = self._name(name_arg)
        if name is None:
            return
        user = self._user()

        def stored(warnings: list[str]) -> None:
            self.log.info("{service} {user}: stored script {name!r}",
                          service=self.context.service, user=user.address, name=name)
            self._warnings(warnings)

        self._disk(stored, scripts.put_script, user.path, name, self._bytes(content),
                   self.context.script_limits, global_dir=self.context.sieve.global_dir)

    def do_CHECKSCRIPT(self, content: Arg) -> None:  # RFC 5804 2.12
        self._disk(self._warnings, _check, self._user().path, self._bytes(content),
                   self.context.script_limits, self.context.sieve.global_dir)

    def _warnings(self, warnings: list[str]) -> None:
        if warnings:
            self._ok("; ".join(warnings), "WARNINGS")   # RFC 5804 1.3
        else:
            self._ok()

    def do_LISTSCRIPTS(self) -> None:  # RFC 5804 2.7
        def listed(found: list[scripts.ScriptInfo]) -> None:
            self._send(b"".join(string(s.name) + (b" ACTIVE" if s.active else b"") + b"\r\n"
                                for s in found) + response("OK", "Listscripts completed"))

        self._disk(listed, scripts.list_scripts, self._user().path)

    def do_SETACTIVE(self, name_arg: Arg) -> None:  # RFC 5804 2.8
        raw = self._bytes(name_arg)
        name = "" if raw == b"" else self._name(name_arg)
        if name is None:
            return
        self._disk(self._done("activated script", name) if name
                   else self._done("deactivated", ""),
                   scripts.activate, self._user().path, name)

    def do_GETSCRIPT(self, name_arg: Arg) -> None:  # RFC 5804 2.9
        name = self._name(name_arg)
        if name is None:
            return

        def got(content: bytes) -> None:
            # Always a literal: clients read the script from one (sievelib, sieve-connect).
            self._send(b"{%d}\r\n" % len(content) + content + b"\r\n" + response("OK"))

        # Bounded by the user's whole quota: no script stored through us is larger.
        self._disk(got, scripts.get_script, self._user().path, name,
                   max(self.context.sieve.quota, self.context.sieve.max_script_size))

    def do_DELETESCRIPT(self, name_arg: Arg) -> None:  # RFC 5804 2.10
        name = self._name(name_arg)
        if name is None:
            return
        self._disk(self._done("deleted script", name), scripts.delete_script,
                   self._user().path, name)

    def do_RENAMESCRIPT(self, old_arg: Arg, new_arg: Arg) -> None:  # RFC 5804 2.11
        old = self._name(old_arg)
        if old is None:
            return
        new = self._name(new_arg)
        if new is None:
            return
        self._disk(self._done("renamed script", f"{old} -> {new}"), scripts.rename_script,
                   self._user().path, old, new)


def _check(user_path: Any, content: bytes, limits: scripts.Limits,
           global_dir: str) -> list[str]:
    """CHECKSCRIPT in a thread: validation only, and the include warnings."""
    script = scripts.validate(content, limits)
    return scripts.include_warnings(user_path, script, global_dir)
