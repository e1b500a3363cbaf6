"""The SMTP server session shared by the MX and submission services.

Built on twisted.mail's ESMTP (reply formatting, command dispatch, AUTH state machine) and
fixing what a public-facing server needs that it lacks:

- its own input loop instead of LineOnlyReceiver, so that commands pipelined after STARTTLS
  are discarded (CVE-2011-0411), bare CR/LF are refused (as Postfix 3.9's
  smtpd_forbid_bare_newline), command and data lines are bounded, and pipelined commands
  wait while a message is being committed;
- DATA is consumed in bulk, not line by line: the end marker, dot-unstuffing and the
  bare-newline and line-length checks are done with bytes methods on whole chunks, and the
  body streams to the store as it arrives;
- STARTTLS resets the session to its pre-EHLO state (RFC 3207 4.2);
- one reply per message with a status per mailbox: a mailbox that could not be written is
  handed to the outbound queue for a local retry, so a failure for one mailbox never turns
  into a failure (and a duplicate) for the others, and nothing acknowledged is lost.

Policy lives in the subclasses (mx.py, submission.py) through the hooks check_sender,
resolve_recipient, make_delivery, max_recipients, check_mail_param and line_too_long.
"""

from __future__ import annotations

import email.utils
import ipaddress
import os
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailserver.metrics import unexported
from mailserver.connlimit import LimitedProtocolMixin
from mailserver.peer import PeerFacts
from mailserver.smtp import replies as R
from mailserver.smtp.delivery import DeliveryOutcome, IDelivery, LocalDelivery, Recipient
from mailserver.smtp.envelope import EnvelopeSyntaxError, parse_command_path
from mailserver.smtp.replies import Reply, SMTPReplyError
from mailserver.streaming import OutputPacer, close_gracefully
from mailserver.tls import describe_tls

if TYPE_CHECKING:
    from mailserver.accounts import Accounts
    from mailserver.config import LimitsConfig
    from mailserver.maildir import MaildirStore

_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")   # "Name :" too (RFC 5322 4.5 obs-optional)
# RFC 5321 6.3: a message that has passed this many hosts is in a loop (two servers
# forwarding to each other); "at least 100" is the RFC's advice (Postfix stops at 50).
MAX_HOPS = 100
_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")
_HELO_BAD = re.compile(r"[\x00-\x1f\x7f]")
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


def received_helo(name: str) -> str:
    """The HELO name as written into Received: an address literal that is one, or a
    domain-like name with every other character replaced (RFC 5321 4.1.4 lets the server
    accept a wrong name, not copy anything into the header)."""
    m = _ADDRESS_LITERAL.fullmatch(name)
    if m:
        try:
            ipaddress.ip_address(m.group(1))
            return name
        except ValueError:
            pass
    clean = _HELO_UNSAFE.sub("-", name).strip(".-")[:255]
    return clean or "unknown"


@dataclass
class SMTPContext:
    """What every session of one service shares."""

    hostname: str
    limits: "LimitsConfig"
    accounts: "Accounts"
    store: "MaildirStore"
    tls: Any = None  # IOpenSSLServerConnectionCreator, or None when TLS is off
    service: str = "smtp"
    queue: Any = None  # mailserver.smtp.queue.QueueRunner; None: no forwarding or retries
    checker: Any = None  # mailserver.inbound.checker.InboundChecker (MX); None: no checks
    junk: Any = None     # mailserver.inbound.junk.JunkFolders, with the checker
    spool_dir: Any = None  # where checked messages wait for their verdict
    metrics: Any = None    # mailserver.metrics.ServiceMetrics of the listener
    sieve: Any = None      # mailserver.sieve.delivery.SieveDelivery (MX); None: no filtering

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = unexported(self.service)


PAUSED_BUFFER_MAX = 64 * 1024  # input kept while paused before the transport stops reading

_ACCEPTED_LINE = ("{service} accepted message {qid} from=<{sender}> to={recipients} "
                  "size={size} tls={tls} ip={ip} mailboxes={mailboxes} queued={queued}{user}"
                  "{checks}")


_id_random = random.Random(secrets.randbits(64))
os.register_at_fork(after_in_child=lambda: _id_random.seed(secrets.randbits(64)))


def new_queue_id() -> str:
    """Short, unique, sortable by time: what the logs and the 250 reply call a message.

    The random part only tells apart messages of the same millisecond (nothing secret):
    a seeded generator, not a getrandom(2) call per message."""
    return f"{int(time.time() * 1000):x}{_id_random.getrandbits(24):06x}".upper()


@dataclass
class _Incoming:
    """State of a DATA phase in progress."""

    delivery: IDelivery
    queue_id: str
    size: int = 0
    error: Reply | None = None
    skip_line: bool = False
    skip_last: bytes = b""  # the last octet of the over-long line passed over so far
    first_chunk: bool = True
    in_header: bool = True
    hops: int = 0          # Received: fields in the header section
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0  # time.monotonic() at the end of the data


_date_cache: tuple[int, str] = (0, "")


def _received_date() -> str:
    """The RFC 5322 date of now, formatted once per second (every Received field has one)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


class SMTPSession(PeerFacts, LimitedProtocolMixin, smtp.ESMTP):
    log = Logger()

    def __init__(self, context: SMTPContext) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=context.tls)
        self.context = context
        self.limits = context.limits
        self.host = context.hostname.encode("ascii")
        self.timeout = context.limits.idle_timeout
        self._buffer = b""
        self._discarding_line = False
        self._paused = False
        self._awaiting_client = False   # paused until the client takes our replies
        self._reading_paused = False
        self._closing = False
        self._pacer = OutputPacer()     # replies the client has not been seen to take
        self._abort_call: Any = None
        self._incoming: _Incoming | None = None
        self._replies: list[bytes] | None = None  # replies held while input is handled
        # Anchored at line starts: unanchored, the search tried every offset of a long
        # line and cost time in the square of its length (7 s of CPU for 6 MB of
        # 40,000-octet lines, before any authentication).
        self._long_data_line = re.compile(rb"(?m)^[^\n]{%d}" % (self.limits.max_line_length + 2))
        self._reset_session()

    # -- session state ---------------------------------------------------------------

    username: str = ""  # the authenticated address (submission)

    _rcpt_commands = 0   # per session, never reset (limits.max_rcpt_commands)
    _committing: IDelivery | None = None  # the delivery whose commit is under way
    _errors = 0          # error replies since the last accepted message

    def _reset_session(self) -> None:
        self._greeted = False
        self._esmtp = False
        self._helo_name = ""   # as written into Received (sanitized)
        self._helo_given = ""  # as the client sent it (checked by SPF)
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._sender: str | None = None
        self._recipients: list[Recipient] = []

    def connectionMade(self) -> None:
        smtp.ESMTP.connectionMade(self)
        if ISSLTransport.providedBy(self.transport):
            self.startedTLS = True  # implicit TLS (port 465)
            self.canStartTLS = False

    def greeting(self) -> bytes:
        return self.host + b" ESMTP"

    def sendCode(self, code: int, message: bytes = b"") -> None:  # type: ignore[override]
        """One reply, all its lines in one send (RFC 5321 4.2.1).

        Error replies are counted: past limits.max_command_errors the client gets 421 and
        the connection is closed instead (a client that only makes errors is probing)."""
        # 452 is not the client's error: RFC 5321 4.5.3.1.10 has it send the other
        # recipients later, and a pipelining client cannot stop at the first one.
        if 400 <= code < 600 and code not in (421, 452) and not self._closing:
            self._errors += 1
            if self._errors > self.limits.max_command_errors:
                self.log.info("{service} {ip}: too many errors, disconnecting",
                              service=self.context.service, ip=self.peer_ip)
                self._send(421, R.TOO_MANY_ERRORS.line())
                self._close()
                return
        self._send(code, message)

    def _send(self, code: int, message: bytes) -> None:
        lines = message.splitlines() or [b""]
        last = lines.pop()
        data = (b"".join(b"%03d-%s\r\n" % (code, line) for line in lines)
                + b"%03d %s\r\n" % (code, last))
        self._pacer.wrote(len(data))
        if self._replies is not None:
            self._replies.append(data)  # sent with the others when the input is handled
        else:
            self.transport.write(data)

    def _flush_replies(self) -> None:
        """Send the replies gathered while handling pipelined input, in one segment: one
        send for a PIPELINING group (RFC 2920), and no small segments held back by Nagle
        behind each other."""
        if self._replies:
            data, self._replies = b"".join(self._replies), []
            self.transport.write(data)

    def reply(self, r: Reply, extra: str = "") -> None:
        text = r.line() + (b" " + extra.encode("utf-8", "replace") if extra else b"")
        self.sendCode(r.code, text)

    def timeoutConnection(self) -> None:
        if self._paused and not self._awaiting_client:  # our own commit or password check
            self.setTimeout(self.timeout)
            return
        self.sendCode(R.TIMEOUT.code, R.TIMEOUT.enhanced.encode() + b" " + self.host + b" "
                      + R.TIMEOUT.text.encode())
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer = b""
        if self._incoming is not None:
            self._incoming.delivery.abort()
            self._incoming = None
        self._flush_replies()
        if self._abort_call is None:
            self._abort_call = close_gracefully(self.transport, self.callLater)

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:  # type: ignore[attr-defined]
        self._closing = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self._incoming is not None:
            self._incoming.delivery.abort()
            self._incoming = None
        client_gone = getattr(self._committing, "client_gone", None)
        if client_gone is not None:  # the client will never see our reply: it retries
            client_gone()
        super().connectionLost(reason)

    # -- input loop --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        if self._paused:
            # A client that keeps sending while a commit or a password check is pending:
            # past PAUSED_BUFFER_MAX bytes the transport stops reading until _resume.
            if len(self._buffer) > PAUSED_BUFFER_MAX and not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            return
        self._drain()

    def _drain(self) -> None:
        outer = self._replies is None
        if outer:
            self._replies = []
            self._pacer.new_turn()
        try:
            while self._buffer and not self._paused and not self._closing:
                if self._pacer.due and self._incoming is None:
                    # Replies the client has not taken (pipelined NOOPs never read):
                    # the next command waits until it has; the idle timer runs on.
                    self._paused = self._awaiting_client = True
                    waited = self._pacer.wait(self.transport)
                    waited.addCallback(self._replies_taken)
                    return
                if self._incoming is not None:
                    if not self._feed_data():
                        return
                elif not self._next_command():
                    return
        finally:
            if outer:
                self._flush_replies()
                self._replies = None

    def _replies_taken(self, drained: bool) -> None:
        self._awaiting_client = False
        if not drained:   # the connection is going
            self._closing = True
            return
        self._paused = False
        if self._reading_paused and not self._closing:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._buffer and not self._closing:
            self._drain()

    def _pause(self) -> None:
        """Stop handling input while a commit or an AUTH check is pending.  Input that
        arrives meanwhile is kept (up to PAUSED_BUFFER_MAX bytes, then the transport stops
        reading), and the idle timeout does not run out on our own wait.  The transport
        is not paused up front: that is two epoll changes per message for what is, with
        nearly every client, nothing."""
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        if self._closing:
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self.resetTimeout()
        if self._buffer:
            self._drain()

    def _next_command(self) -> bool:
        buf = self._buffer
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self.limits.max_command_length + 2:
                if not self._discarding_line:
                    self.line_too_long(buf[:64])
                self._discarding_line = True
                self._buffer = b""
            return False
        line, self._buffer = buf[:nl + 1], buf[nl + 1:]
        if self._discarding_line:
            self._discarding_line = False
            return True
        if len(line) > self.limits.max_command_length + 2:
            self.line_too_long(line[:64])
            return True
        if line[-2:-1] != b"\r":
            return self._refuse_bare(R.BARE_LF)
        line = line[:-2]
        if b"\r" in line:
            return self._refuse_bare(R.BARE_CR)
        self.lineReceived(line)  # SMTP.lineReceived resets the idle timeout
        return True

    def _refuse_bare(self, r: Reply) -> bool:
        self.log.info("{service} {ip}: {reason}, disconnecting", service=self.context.service,
                      ip=self.peer_ip, reason=r.text)
        self.reply(r)
        self._close()
        return False

    def line_too_long(self, head: bytes) -> None:
        """A command line over max_command_length (its first bytes given); it is dropped."""
        self.reply(R.LINE_TOO_LONG)

    def lookupMethod(self, command: bytes):  # type: ignore[override]
        try:
            name = command.decode("ascii").upper()
        except UnicodeDecodeError:
            return None
        if not name.isalpha():
            return None
        return getattr(self, "do_" + name, None) or getattr(self, "ext_" + name, None)

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(R.UNKNOWN_COMMAND)

    def sendSyntaxError(self) -> None:
        self.reply(R.UNKNOWN_COMMAND)

    # -- greeting, reset, TLS --------------------------------------------------------------

    def extensions(self) -> list[bytes]:  # type: ignore[override]
        ext = [b"PIPELINING", b"SIZE %d" % self.limits.max_message_size, b"ENHANCEDSTATUSCODES",
               b"8BITMIME"]
        if self.canStartTLS and not self.startedTLS:
            ext.append(b"STARTTLS")
        return ext

    def _helo_arg(self, rest: bytes, verb: str) -> str | None:
        """The HELO/EHLO name, or None after a 501: missing, not UTF-8, or with NUL or
        other control characters (nothing a real client sends)."""
        try:
            name = rest.strip(b" \t").decode("utf-8")
        except UnicodeDecodeError:
            name = "\x00"  # refused below like any other garbage
        if not name:
            self.reply(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return None
        if _HELO_BAD.search(name) or len(name) > 255:
            self.reply(R.BAD_HELO)
            return None
        self._helo_given = name
        return received_helo(name)

    def do_EHLO(self, rest: bytes) -> None:  # RFC 5321 4.1.1.1
        name = self._helo_arg(rest, "EHLO")
        if name is None:
            return
        self._reset_transaction()
        self._greeted, self._esmtp, self._helo_name = True, True, name
        self.sendCode(250, b"\n".join([self.host] + self.extensions()))

    def do_HELO(self, rest: bytes) -> None:
        name = self._helo_arg(rest, "HELO")
        if name is None:
            return
        self._reset_transaction()
        self._greeted, self._esmtp, self._helo_name = True, False, name
        self.sendCode(250, self.host)

    def do_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(R.RESET)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(R.OK)

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(R.VRFY)

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(R.BYE)
        self._close()

    def ext_STARTTLS(self, rest: bytes) -> None:  # RFC 3207
        if rest.strip():
            self.reply(R.SYNTAX)
        elif self.startedTLS:
            self.reply(R.TLS_ALREADY)
        elif not self.canStartTLS:
            self.reply(R.TLS_NOT_AVAILABLE)
        else:
            self.reply(R.START_TLS)
            self._buffer = b""  # CVE-2011-0411: nothing sent before the handshake counts
            self._flush_replies()  # the 220 goes out in clear, before the handshake
            self.transport.startTLS(self.context.tls)
            self.startedTLS = True
            self._reset_session()  # RFC 3207 4.2: back to the state after the greeting

    def ext_AUTH(self, rest: bytes) -> None:  # RFC 4954 4
        """Not offered here (the MX; submission has its own): Twisted's ESMTP.ext_AUTH,
        which a bare AUTH crashed with a logged traceback, must never answer."""
        self.reply(R.AUTH_NOT_ENABLED)

    # -- the envelope ----------------------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:  # RFC 5321 4.1.1.2
        if not self._greeted:
            return self.reply(R.BAD_SEQUENCE_HELO)
        if self._sender is not None:
            return self.reply(R.BAD_SEQUENCE_NESTED_MAIL)
        try:
            sender, params = parse_command_path(rest, "FROM")
        except EnvelopeSyntaxError:
            return self.reply(R.SYNTAX)
        try:
            self._check_mail_params(params)
            sender = self.check_sender(sender)
        except SMTPReplyError as e:
            self.log.info("{service} {ip}: sender <{sender}> rejected: {reply}",
                          service=self.context.service, ip=self.peer_ip, sender=sender,
                          reply=str(e.reply))
            self.context.metrics.rejected(e.reply)
            return self.reply(e.reply)
        self._sender = sender
        self.reply(R.SENDER_OK)

    def _check_mail_params(self, params: dict[str, str | None]) -> None:
        for key, value in params.items():
            if key == "SIZE":  # RFC 1870
                if value is None or not value.isdigit():
                    raise SMTPReplyError(R.SYNTAX)
                if int(value) > self.limits.max_message_size:
                    raise SMTPReplyError(R.MESSAGE_TOO_BIG)
            elif key == "BODY":  # RFC 6152; BINARYMIME (RFC 3030) and others: not offered
                if value is None:
                    raise SMTPReplyError(R.SYNTAX)
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPReplyError(R.UNSUPPORTED_PARAMETER)
            else:
                self.check_mail_param(key, value)

    def check_mail_param(self, key: str, value: str | None) -> None:
        """A MAIL FROM parameter this class does not know: refused unless a subclass knows it."""
        raise SMTPReplyError(R.UNSUPPORTED_PARAMETER)

    @property
    def max_recipients(self) -> int:
        return self.limits.max_recipients

    def check_sender(self, sender: str) -> str:
        """Policy for MAIL FROM; returns the sender to use or raises SMTPReplyError."""
        if sender and (sender.count("@") < 1 or len(sender) > 254 or " " in sender):
            raise SMTPReplyError(R.BAD_SENDER_SYNTAX)
        return sender

    def do_RCPT(self, rest: bytes) -> None:  # RFC 5321 4.1.1.3
        self._rcpt_commands += 1
        if self._rcpt_commands > self.limits.max_rcpt_commands:
            self.log.info("{service} {ip}: over {n} RCPT commands, disconnecting",
                          service=self.context.service, ip=self.peer_ip,
                          n=self.limits.max_rcpt_commands)
            self.reply(R.TOO_MANY_RCPT_COMMANDS)
            self._close()
            return
        if self._sender is None:
            return self.reply(R.BAD_SEQUENCE_MAIL)
        try:
            path, params = parse_command_path(rest, "TO")
        except EnvelopeSyntaxError:
            return self.reply(R.SYNTAX)
        if not path:  # RFC 5321 4.1.1.3: the null path is a reverse-path only
            return self.reply(R.BAD_RECIPIENT_SYNTAX)
        try:
            if params:
                raise SMTPReplyError(R.UNSUPPORTED_PARAMETER)
            if len(self._recipients) >= self.max_recipients:
                raise SMTPReplyError(R.TOO_MANY_RECIPIENTS)
            recipient = self.resolve_recipient(path)
        except SMTPReplyError as e:
            self.log.info("{service} {ip}: recipient <{rcpt}> from <{sender}> rejected: {reply}",
                          service=self.context.service, ip=self.peer_ip, rcpt=path,
                          sender=self._sender, reply=str(e.reply))
            self.context.metrics.rejected(e.reply)
            return self.reply(e.reply)
        if all(r.address != recipient.address for r in self._recipients):
            self._recipients.append(recipient)
        self.reply(R.RECIPIENT_OK)

    def resolve_recipient(self, path: str) -> Recipient:
        """Policy for RCPT TO; each service decides. Raises SMTPReplyError."""
        raise SMTPReplyError(R.RELAY_DENIED)

    # -- DATA ------------------------------------------------------------------------------

    def make_delivery(self, queue_id: str) -> IDelivery:
        delivery = LocalDelivery(self.context.store)
        for recipient in self._recipients:
            delivery.add_recipient(recipient)
        return delivery

    def do_DATA(self, rest: bytes) -> None:  # RFC 5321 4.1.1.4
        if self._sender is None:
            return self.reply(R.BAD_SEQUENCE_MAIL)
        if not self._recipients:
            return self.reply(R.BAD_SEQUENCE_RCPT)
        if rest.strip():
            return self.reply(R.SYNTAX)
        queue_id = new_queue_id()
        try:
            delivery = self.make_delivery(queue_id)
            delivery.write_headers(self.delivery_headers(), self.received_header(queue_id))
        except OSError as e:
            self.log.error("{service} {ip}: cannot start delivery: {error}",
                           service=self.context.service, ip=self.peer_ip, error=e)
            self._reset_transaction()
            self.context.metrics.rejected(R.LOCAL_ERROR)
            return self.reply(R.LOCAL_ERROR)
        self._incoming = _Incoming(delivery, queue_id)
        self.reply(R.START_DATA)

    def delivery_headers(self) -> bytes:
        """What final delivery into a Maildir adds: Return-Path and, for one mailbox only,
        Delivered-To (with several, the shared copy must not reveal Bcc recipients)."""
        lines = [f"Return-Path: <{self._sender}>"]
        mailboxes = {u.address for r in self._recipients for u in r.local}
        if len(self._recipients) == 1 and len(mailboxes) == 1:
            lines.append(f"Delivered-To: {next(iter(mailboxes))}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")

    def received_header(self, queue_id: str) -> bytes:
        """The Received trace field (RFC 5321 4.4; protocol names of RFC 3848)."""
        tls = describe_tls(self.transport) if self.tls_active else None
        proto = ("ESMTP" if self._esmtp else "SMTP") + ("S" if tls else "") + \
            ("A" if self.authenticated else "")
        lines = [f"Received: from {self._helo_name} ([{self.peer_ip}])"]
        if self.authenticated and self.username:
            lines.append(f"\t(authenticated user {self.username})")
        lines.append(f"\tby {self.context.hostname} (mailserver) with {proto} id {queue_id}")
        if tls:
            version, _, cipher = tls.partition(" ")
            lines.append(f"\t(using {version} with cipher {cipher})")
        if len(self._recipients) == 1:
            lines.append(f"\tfor <{self._recipients[0].address}>;")
        else:
            lines[-1] += ";"
        lines.append("\t" + _received_date())
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")

    def _feed_data(self) -> bool:
        """Consume complete lines of message data from the buffer; False when it needs more."""
        inc = self._incoming
        assert inc is not None
        buf = self._buffer
        if inc.skip_line:  # the rest of an over-long line
            nl = buf.find(b"\n")
            part = buf if nl < 0 else buf[:nl]
            # Passed over, but held to the same line endings as any line: an LF without
            # its CR after a long line ("<LF>.<CR><LF>") ended the data, and what came
            # after it was run as a second, smuggled transaction (RFC 5321 2.3.8).
            if not self._skipped_line_ok(inc, part, nl >= 0):
                return False
            if part:
                inc.skip_last = part[-1:]
            self._buffer = buf[nl + 1:] if nl >= 0 else b""
            inc.skip_line = nl < 0
            return nl >= 0
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) > self.limits.max_line_length + 2:
                if b"\r" in buf[:-1]:   # a CR not followed by its LF
                    return self._refuse_bare(R.BARE_CR)
                self._data_error(inc, R.DATA_LINE_TOO_LONG)
                self._buffer, inc.skip_line, inc.skip_last = b"", True, buf[-1:]
            return False
        if buf.startswith(b".\r\n"):
            end, resume = 0, 3
        else:
            end = buf.find(b"\r\n.\r\n", 0, last + 1)
            if end >= 0:
                end, resume = end + 2, end + 5
            else:
                end = resume = last + 1
        chunk = buf[:end]
        self._buffer = buf[resume:]
        finished = resume != end
        if chunk:
            self._check_chunk(inc, chunk)
            if self._closing:
                return False
        if inc.error is None and chunk:
            chunk = self._unstuff(inc, chunk)
            inc.size += len(chunk)
            if inc.in_header:
                self._count_hops(inc, chunk)
            if inc.size > self.limits.max_message_size:
                self._data_error(inc, R.MESSAGE_TOO_BIG)
            elif inc.hops > MAX_HOPS:
                self._data_error(inc, R.TOO_MANY_HOPS)
            else:
                try:
                    inc.delivery.write(chunk)
                except OSError as e:
                    self.log.error("{service}: write failed for {qid}: {error}",
                                   service=self.context.service, qid=inc.queue_id, error=e)
                    self._data_error(inc, R.LOCAL_ERROR)
        if self._closing:
            return False
        self.resetTimeout()
        if finished:
            self._end_of_data(inc)
        return True

    def _skipped_line_ok(self, inc: _Incoming, part: bytes, ended: bool) -> bool:
        """A piece of an over-long data line (`ended`: up to its LF): no bare CR in it,
        and its LF after a CR; else the session is refused (521) and False."""
        if inc.skip_last == b"\r" and (part or not ended):
            return self._refuse_bare(R.BARE_CR)   # the CR before was not followed by LF
        if b"\r" in part[:-1]:
            return self._refuse_bare(R.BARE_CR)
        if ended and (part[-1:] if part else inc.skip_last) != b"\r":
            return self._refuse_bare(R.BARE_LF)
        return True

    def _check_chunk(self, inc: _Incoming, chunk: bytes) -> None:
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\n") != crlf:
            self._refuse_bare(R.BARE_LF)
        elif chunk.count(b"\r") != crlf:
            self._refuse_bare(R.BARE_CR)
        elif (inc.error is None and len(chunk) > self.limits.max_line_length + 2
              and self._long_data_line.search(chunk)):
            self._data_error(inc, R.DATA_LINE_TOO_LONG)

    @staticmethod
    def _count_hops(inc: _Incoming, chunk: bytes) -> None:
        """Count the Received: fields of the header section; a chunk is whole lines, so
        an empty line at its start or inside it ends the header."""
        end = 0 if chunk[:2] == b"\r\n" else chunk.find(b"\r\n\r\n")
        if end >= 0:
            inc.in_header = False
        inc.hops += len(_RECEIVED.findall(chunk, 0, len(chunk) if end < 0 else end + 2))

    def _unstuff(self, inc: _Incoming, chunk: bytes) -> bytes:
        """Remove the leading dot of dot-stuffed lines (RFC 5321 4.5.2)."""
        if chunk[:1] == b".":
            chunk = chunk[1:]
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        if inc.first_chunk:
            inc.first_chunk = False
            # A message that starts with body text gets an empty header section, so the
            # first body line is not read as a continuation of our trace headers.
            if chunk[:2] != b"\r\n" and not _HEADER_LINE.match(chunk):
                chunk = b"\r\n" + chunk
                # The client's octets count against SIZE and the limit (RFC 1870), not
                # the line added here: a message of exactly the limit was refused.
                inc.size -= 2
        return chunk

    def _data_error(self, inc: _Incoming, r: Reply) -> None:
        if inc.error is None:
            inc.error = r
            inc.delivery.abort()

    def _end_of_data(self, inc: _Incoming) -> None:
        self._incoming = None
        inc.ended = time.monotonic()
        sender, recipients = self._sender, self._recipients
        self._reset_transaction()
        if inc.error is None:
            refusal = self.message_complete()
            if refusal is not None:
                inc.error = refusal
                inc.delivery.abort()
        if inc.error is not None:
            self.log.info("{service} {ip}: message {qid} from <{sender}> refused: {reply}",
                          service=self.context.service, ip=self.peer_ip, qid=inc.queue_id,
                          sender=sender, reply=str(inc.error))
            self.context.metrics.rejected(inc.error)
            self.reply(inc.error)
            return
        self._pause()
        self._committing = inc.delivery
        d = defer.maybeDeferred(inc.delivery.commit)
        d.addCallback(self._committed, inc, sender, recipients)
        d.addErrback(self._commit_failed, inc)
        d.addBoth(self._commit_done)

    def _commit_done(self, _: Any) -> None:
        self._committing = None
        self._resume()

    def _committed(self, outcome: DeliveryOutcome, inc: _Incoming, sender: str,
                   recipients: list[Recipient]) -> None:
        for status in outcome.lost:
            self.log.error("{service}: message {qid} neither stored nor queued for {mailbox}: "
                           "{error}", service=self.context.service, qid=inc.queue_id,
                           mailbox=status.mailbox, error=status.error)
        if outcome.lost:
            # Something would be lost: the client must retry (a duplicate for the mailboxes
            # that got it is better than a message acknowledged and gone).
            self.context.metrics.rejected(R.LOCAL_ERROR)
            self.reply(R.LOCAL_ERROR)
            return
        self.context.metrics.message_received(inc.ended, len(outcome.delivered))
        self._errors = 0
        self.reply(Reply(250, "2.0.0", f"Ok: queued as {inc.queue_id}"))
        # The log line after the 250: its formatting and write are not the client's wait.
        fields = dict(
            service=self.context.service, qid=inc.queue_id, sender=sender,
            recipients=",".join(r.address for r in recipients), size=inc.size,
            tls=describe_tls(self.transport) or "no", ip=self.peer_ip,
            mailboxes=len(outcome.delivered), queued=len(outcome.queued),
            user=f" user={self.username}" if self.authenticated else "",
            checks=getattr(inc.delivery, "log_text", ""))
        # One line per message: formatted here by str.format (the logger's own formatting
        # of ten fields costs as much again); the fields stay in the event for observers
        # that keep them.
        self.log.info("{line}", line=_ACCEPTED_LINE.format(**fields), **fields)

    def message_complete(self) -> Reply | None:
        """Called when a message is whole, before it is committed: a refusal, or None."""
        return None

    def _commit_failed(self, failure: Failure, inc: _Incoming) -> None:
        inc.delivery.abort()
        if self._closing:  # nobody to answer; the client sends the message again
            self.log.info("{service} {ip}: message {qid} not acknowledged, client gone "
                          "({error})", service=self.context.service, ip=self.peer_ip,
                          qid=inc.queue_id, error=failure.getErrorMessage() or
                          failure.type.__name__)
            return
        if failure.check(SMTPReplyError):  # a policy refusal found in the message itself
            error: SMTPReplyError = failure.value  # type: ignore[assignment]
            self.log.info("{service} {ip}: message {qid} refused: {reply}",
                          service=self.context.service, ip=self.peer_ip, qid=inc.queue_id,
                          reply=str(error.reply))
            self.context.metrics.rejected(error.reply)
            self.reply(error.reply)
            return
        self.log.failure("{service}: commit of {qid} failed", failure,
                         service=self.context.service, qid=inc.queue_id)
        self.context.metrics.rejected(R.LOCAL_ERROR)
        self.reply(R.LOCAL_ERROR)

