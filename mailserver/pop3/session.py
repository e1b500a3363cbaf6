"""The POP3 session: RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595), SASL PLAIN and LOGIN (RFC 5034)
and response codes (RFC 2449 8, RFC 3206).

Built on twisted.mail's POP3 (reply helpers, the TimeoutMixin idle timer, the cred login
and `_onLogout` convention), replacing what a public-facing server cannot use:

- its own input loop instead of LineOnlyReceiver: commands run one at a time in order, so
  pipelined commands (RFC 2449 6.6) wait behind a login or a download in progress; every
  line is bounded; over-long lines, NUL bytes, stray CRs and invalid UTF-8 get -ERR and are
  discarded; nothing pipelined after STLS counts (as CVE-2011-0411 for SMTP);
- credentials only under TLS (or from loopback when configured), through the shared
  portal and auth throttle; no APOP (it needs passwords stored in the clear);
- listings answered from the session's snapshot, messages streamed from the file,
  converted to CRLF and dot-stuffed chunk by chunk;
- DELE only marks; deletion happens at QUIT through the shared Folder (RFC 1939 6).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.python.failure import Failure

from mailserver import sasl
from mailserver.accounts import AccountsUnavailable
from mailserver.auth import throttled_login
from mailserver.connlimit import LimitedProtocolMixin
from mailserver.peer import PeerFacts
from mailserver.metrics import unexported
from mailserver.pop3.mailbox import (MailboxInUse, MailboxLockLost, MailboxUnavailable,
                                     MessageDeleted, MessageGone, NoSuchMessage, POP3Mailbox)
from mailserver.streaming import ChunkProducer, OutputPacer, close_gracefully
from mailserver.pop3.whole import read_whole, response, send_now
from mailserver.pop3.wire import message_chunks

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"
_AUTHZ = frozenset({AUTHORIZATION})
_TRANS = frozenset({TRANSACTION})
_BOTH = _AUTHZ | _TRANS

# command -> (states where it is valid, least and most arguments; None: the raw rest of
# the line is the one argument).
_COMMANDS: dict[bytes, tuple[frozenset[str], int, int | None]] = {
    b"CAPA": (_BOTH, 0, 0),      # RFC 2449 5
    b"QUIT": (_BOTH, 0, 0),      # RFC 1939 5, 6
    b"STLS": (_AUTHZ, 0, 0),     # RFC 2595 4
    b"USER": (_AUTHZ, 1, None),  # RFC 1939 7
    b"PASS": (_AUTHZ, 0, None),  # RFC 1939 7
    b"AUTH": (_AUTHZ, 0, 2),     # RFC 5034 4
    b"STAT": (_TRANS, 0, 0),     # RFC 1939 5
    b"LIST": (_TRANS, 0, 1),
    b"UIDL": (_TRANS, 0, 1),     # RFC 1939 7
    b"TOP": (_TRANS, 2, 2),      # RFC 1939 7
    b"RETR": (_TRANS, 1, 1),     # RFC 1939 5
    b"DELE": (_TRANS, 1, 1),
    b"RSET": (_TRANS, 0, 0),
    b"NOOP": (_TRANS, 0, 0),
}

MAX_BAD_COMMANDS = 20       # in a row; then the connection is closed
PIPELINE_BUFFER = 64 * 1024  # input held while a command runs before reading pauses
LIST_CHUNK = 32 * 1024
_PLAINTEXT_REFUSED = b"Plaintext authentication disallowed without TLS; use STLS"


@dataclass
class POP3Context:
    """What every session of one listener shares."""

    hostname: str
    limits: Any                          # LimitsConfig
    portal: Any                          # twisted.cred Portal
    throttle: Any                        # AuthThrottle
    tls: Any = None                      # server TLS context for STLS; None on pop3s
    allow_plaintext_loopback: bool = False
    service: str = "pop3"
    clock: Any = None                    # IReactorTime; the reactor when None
    metrics: Any = None                  # mailserver.metrics.ServiceMetrics of the listener
    warm: Any = None                     # username -> load the INBOX ahead (auth.inbox_warmer)

    def __post_init__(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor
            self.clock = reactor
        if self.metrics is None:
            self.metrics = unexported(self.service)


class POP3Session(PeerFacts, LimitedProtocolMixin, pop3.POP3):
    log = Logger()

    def __init__(self, context: POP3Context) -> None:
        self.context = context
        self.limits = context.limits
        self.idle_timeout = context.limits.idle_timeout
        self.pop_state = AUTHORIZATION
        self.startedTLS = False
        self.mbox: POP3Mailbox | None = None  # type: ignore[assignment]
        self.user: str | None = None
        self._buffer = b""
        self._discarding = False
        self._busy = False
        self._draining = False
        self._closing = False
        self._lost = False
        self._update_logout: Callable[[], None] | None = None   # see connectionLost
        self._reading_paused = False
        self._pacer = OutputPacer()   # answers the client has not been seen to take
        self._abort_call: Any = None
        self._bad_commands = 0
        self._auth_failures = 0
        self._user_arg: bytes | None = None
        self._sasl: Callable[[bytes], None] | None = None

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # TimeoutMixin
        return self.context.clock.callLater(period, func)

    # -- connection ----------------------------------------------------------------------

    def connectionMade(self) -> None:  # RFC 1939 4: the greeting
        self.setTimeout(self.idle_timeout)
        self.ok(self.context.hostname.encode("ascii", "replace") + b" POP3 server ready")

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # type: ignore[assignment]
        self._closing = self._lost = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._buffer = b""
        self._sasl = None
        if self.pop_state == TRANSACTION:
            self.log.info("{service} {user} disconnected without QUIT: nothing deleted",
                          service=self.context.service, user=self.user)
        if self.pop_state == UPDATE:
            # QUIT is deleting: the mailbox is let go once that is done (do_QUIT), not
            # now.  A client that hangs up right after QUIT (many do) had its deletions
            # refused, its lock across nodes seemingly lost to another session.
            self._update_logout, self._onLogout = self._onLogout, None
        super().connectionLost(reason)  # the mailbox is released; nothing is deleted

    def timeoutConnection(self) -> None:
        self.log.info("{service} {ip}: idle timeout, disconnecting",
                      service=self.context.service, ip=self.peer_ip)
        if not self._busy:   # not inside a message the client stopped reading
            self.err(b"Disconnected for inactivity")
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer = b""
        self.setTimeout(None)
        if self._abort_call is None and not self._lost:
            self._abort_call = close_gracefully(self.transport, self.context.clock.callLater)

    def _taken(self, drained: bool) -> None:
        if not drained:   # the connection is going: nothing more is read or answered
            self._closing = True

    def _send(self, data: bytes) -> None:
        if not self._lost:
            self._pacer.wrote(len(data))
            self.transport.write(data)

    # -- replies -------------------------------------------------------------------------

    def ok(self, text: bytes = b"") -> None:
        self._send(b"+OK " + text + b"\r\n" if text else b"+OK\r\n")

    def err(self, text: bytes, code: bytes | None = None) -> None:
        """-ERR with an RFC 2449 8 response code when one applies."""
        prefix = b"-ERR [" + code + b"] " if code else b"-ERR "
        self._send(prefix + text + b"\r\n")

    def successResponse(self, message: Any = "") -> None:
        self.ok(message if isinstance(message, bytes) else str(message).encode())

    def failResponse(self, message: Any = b"") -> None:
        self.err(message if isinstance(message, bytes) else str(message).encode())

    # -- input loop ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._drain()
        if self._busy and len(self._buffer) > PIPELINE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def lineReceived(self, line: bytes) -> None:
        """Not used: input goes through `dataReceived`'s own loop."""
        raise NotImplementedError

    def _drain(self) -> None:
        if self._draining:
            return  # a command finished at once, inside the loop below: it goes on
        self._draining = True
        self._pacer.new_turn()
        try:
            while not self._busy and not self._closing:
                if self._pacer.due:
                    # Answers the client has not taken: the next command waits until it
                    # has (18 MB of CAPA never read made 470 MB of answers); the idle
                    # timer runs on meanwhile.
                    waited = self._pacer.wait(self.transport)
                    self._hold(waited.addCallback(self._taken), idle_timer=True)
                    break
                line = self._next_line()
                if line is None:
                    break
                self.resetTimeout()
                if self._sasl is not None:
                    respond, self._sasl = self._sasl, None
                    respond(line)
                else:
                    self._command(line)
        finally:
            self._draining = False
        if self._reading_paused and not self._closing and len(self._buffer) <= PIPELINE_BUFFER:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _next_line(self) -> bytes | None:
        """The next good input line; bad ones are answered and dropped on the way."""
        limit = self.limits.max_command_length
        while not self._closing:
            buf = self._buffer
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > limit + 1:
                    if not self._discarding:
                        self._bad_input(b"Line too long")
                    self._discarding = True
                    self._buffer = b""
                return None
            line, self._buffer = buf[:nl], buf[nl + 1:]
            if self._discarding:
                self._discarding = False
                continue
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > limit:
                self._bad_input(b"Line too long")
            elif b"\0" in line:
                self._bad_input(b"NUL byte in command")
            elif b"\r" in line:
                self._bad_input(b"Bare CR in command")
            elif not _is_utf8(line):
                self._bad_input(b"Invalid UTF-8 in command")
            else:
                return line
        return None

    def _bad_input(self, why: bytes) -> None:
        if self._sasl is not None:
            self._sasl = None  # the exchange ends with this -ERR
        self._bad_command(why)

    def _bad_command(self, why: bytes) -> None:
        self._bad_commands += 1
        self.err(why)
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self.log.info("{service} {ip}: too many bad commands, disconnecting",
                          service=self.context.service, ip=self.peer_ip)
            self.err(b"Too many bad commands")
            self._close()

    def _hold(self, d: defer.Deferred[Any], idle_timer: bool = False) -> None:
        """Run later commands only once `d` has fired (RFC 2449 6.6: pipelined commands
        are answered in order).  Without `idle_timer` the idle timer stops meanwhile."""
        self._busy = True
        if not idle_timer:
            self.setTimeout(None)

        def release(result: Any) -> None:
            if isinstance(result, Failure):
                self.log.failure("{service} {ip}: command failed", result,
                                 service=self.context.service, ip=self.peer_ip)
                self.err(b"Internal server error", b"SYS/TEMP")
                self._close()
            self._busy = False
            if self._closing:
                return
            if not idle_timer:  # else it ran on (a RETR's answer): no new timer per message
                self.setTimeout(self.idle_timeout)
            self._drain()

        d.addBoth(release)

    def _command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        name = verb.upper()
        spec = _COMMANDS.get(name)
        if spec is None:
            self._bad_command(b"Unknown command")
            return
        states, least, most = spec
        if self.pop_state not in states:
            self._bad_command(b"Not logged in" if self.pop_state == AUTHORIZATION
                              else b"Command not valid in this state")
            return
        handler = getattr(self, "do_" + name.decode("ascii"))
        if most is None:
            if least and not rest.strip():
                self._bad_command(b"Missing argument")
                return
            self._bad_commands = 0
            handler(rest)
            return
        args = rest.split()
        if not least <= len(args) <= most:
            self._bad_command(b"Wrong number of arguments")
            return
        self._bad_commands = 0
        handler(*args)

    # -- AUTHORIZATION state -------------------------------------------------------------

    def listCapabilities(self) -> list[bytes]:  # RFC 2449 5, 6
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.pop_state == AUTHORIZATION:
            if self.plaintext_allowed():
                caps += [b"USER", b"SASL " + " ".join(sasl.MECHANISMS).encode()]
            if self.context.tls is not None and not self.tls_active:
                caps.append(b"STLS")
        return caps

    def do_CAPA(self) -> None:  # RFC 2449 5
        lines = [b"+OK Capability list follows", *self.listCapabilities(), b"."]
        self._send(b"\r\n".join(lines) + b"\r\n")

    def do_STLS(self) -> None:  # RFC 2595 4
        if self.tls_active:
            self.err(b"Already using TLS")
        elif self.context.tls is None:
            self.err(b"TLS not available")
        else:
            self.ok(b"Begin TLS negotiation now")
            self._buffer = b""  # nothing pipelined before the handshake counts
            self._user_arg = None
            self.transport.startTLS(self.context.tls)
            self.startedTLS = True

    def do_USER(self, rest: bytes) -> None:  # RFC 1939 7
        if not self.plaintext_allowed():
            self.err(_PLAINTEXT_REFUSED, b"AUTH")
            return
        self._user_arg = rest.strip()
        self.ok(b"Send PASS")

    def do_PASS(self, rest: bytes) -> None:  # RFC 1939 7: the password may hold spaces
        if not self.plaintext_allowed():
            self.err(_PLAINTEXT_REFUSED, b"AUTH")
            return
        if self._user_arg is None:
            self.err(b"USER first")
            return
        user, self._user_arg = self._user_arg, None
        self._login(user, rest)

    def do_AUTH(self, mechanism: bytes | None = None, initial: bytes | None = None) -> None:
        """RFC 5034 4; AUTH without a mechanism lists them, as many clients expect."""
        if not self.plaintext_allowed():
            self.err(_PLAINTEXT_REFUSED, b"AUTH")
            return
        if mechanism is None:
            self._send(b"+OK Mechanisms follow\r\n"
                       + b"".join(m.encode() + b"\r\n" for m in sasl.MECHANISMS) + b".\r\n")
            return
        exchange = sasl.exchange_for(mechanism)
        if exchange is None:
            self.err(b"Unsupported authentication mechanism")
            return
        try:
            challenge = exchange.start(None if initial is None else sasl.decode(initial))
        except sasl.SASLError as e:
            self._sasl_refused(e)
            return
        self._sasl_next(exchange, challenge)

    def _sasl_next(self, exchange: sasl.Exchange, challenge: bytes | None) -> None:
        if challenge is None:
            self._login(exchange.username.encode(), exchange.password.encode())
            return

        def respond(line: bytes) -> None:
            try:
                following = exchange.respond(line)
            except sasl.Cancelled:
                self.err(b"Authentication cancelled")  # RFC 5034 4
                self._count_auth_failure()   # as on submission: no endless AUTH, cancel
                return
            except sasl.SASLError as e:
                self._sasl_refused(e)
                return
            self._sasl_next(exchange, following)

        self._sasl = respond
        self._send(b"+ " + base64.b64encode(challenge) + b"\r\n")

    def _sasl_refused(self, error: sasl.SASLError) -> None:
        """Login data that could not be read counts as a failed login on this connection
        (as on submission): no password was tried, but it must not go on for ever."""
        if error.reason == sasl.PROXY:
            self.err(b"Proxy login not allowed", b"AUTH")
        elif error.reason == sasl.CANNOT_DECODE:
            self.err(b"Invalid base64")
        else:
            self.err(b"Malformed authentication data")
        self._count_auth_failure()

    def _count_auth_failure(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self.limits.auth_failures_per_connection:
            self.err(b"Too many authentication failures")
            self._close()

    def _login(self, user: bytes, password: bytes) -> None:
        ip = self.peer_ip
        account = user.decode("utf-8", "replace").lower()
        d = throttled_login(self.context.portal, self.context.throttle, self.context.clock,
                            ip, account, user, password, pop3.IMailbox, self.context.warm)
        d.addCallbacks(self._logged_in, self._login_failed,
                       callbackArgs=(ip, account), errbackArgs=(ip, account))
        self._hold(d)

    def _logged_in(self, result: tuple[Any, POP3Mailbox, Callable[[], None]], ip: str,
                   account: str) -> None:
        _, mbox, logout = result
        self.context.throttle.success(ip, account)
        if self._lost:
            logout()  # the client went away meanwhile: free the mailbox at once
            return
        self.mbox, self._onLogout = mbox, logout
        self.user = mbox.address
        self.pop_state = TRANSACTION
        count, octets = mbox.stat()
        self.log.info("{service} login {user} from {ip} tls={tls} messages={count}",
                      service=self.context.service, user=self.user, ip=ip,
                      tls=self.tls_active, count=count)
        self.context.metrics.logged_in(self)
        self.ok(b"Logged in, %d messages (%d octets)" % (count, octets))

    def _login_failed(self, f: Failure, ip: str, account: str) -> None:
        throttle = self.context.throttle
        if f.check(MailboxInUse):  # RFC 2449 8.1.2; the password was right
            throttle.success(ip, account)
            self.log.info("{service} login {user} from {ip}: mailbox in use",
                          service=self.context.service, user=account, ip=ip)
            self.err(b"Mailbox is locked by another POP3 session", b"IN-USE")
            return
        if f.check(MailboxUnavailable):  # RFC 3206 4; the password was right
            throttle.success(ip, account)
            self.log.warn("{service} login {user} from {ip}: mailbox lock unavailable "
                          "({reason})", service=self.context.service, user=account, ip=ip,
                          reason=f.getErrorMessage())
            self.err(b"Mailbox lock unavailable, try again later", b"SYS/TEMP")
            return
        if f.check(AccountsUnavailable):  # a subsystem is down: no traceback, no throttle
            self.log.info("{service} login for {user} from {ip} refused: accounts database "
                          "unavailable", service=self.context.service, user=account, ip=ip)
            self.err(b"Accounts unavailable, try again later", b"SYS/TEMP")  # RFC 3206 4
            return
        if not f.check(LoginFailed):
            self.log.failure("{service} login error for {user}", f,
                             service=self.context.service, user=account)
            self.err(b"Temporary server error, try again later", b"SYS/TEMP")
            return
        throttle.failure(ip, account)
        self.log.info("{service} login failed for {user} from {ip}",
                      service=self.context.service, user=account, ip=ip)
        self.context.metrics.auth_failed()
        self.err(b"Authentication failed", b"AUTH")  # RFC 3206 4
        self._count_auth_failure()

    # -- TRANSACTION state ---------------------------------------------------------------

    def _number(self, arg: bytes) -> int | None:
        """A message number or line count: decimal digits only (RFC 1939 3)."""
        if not arg.isdigit() or len(arg) > 10:
            return None
        return int(arg)

    def _entry(self, arg: bytes) -> tuple[int, Any] | None:
        """(number, snapshot entry) for a message argument; None after an -ERR reply."""
        assert self.mbox is not None
        n = self._number(arg)
        if n is None:
            self.err(b"Invalid message number")
            return None
        try:
            return n, self.mbox.entry(n)
        except NoSuchMessage:
            self.err(b"No such message")
        except MessageDeleted:
            self.err(b"Message %d already deleted" % n)
        return None

    def do_STAT(self) -> None:  # RFC 1939 5
        assert self.mbox is not None
        self.ok(b"%d %d" % self.mbox.stat())

    def do_LIST(self, arg: bytes | None = None) -> None:  # RFC 1939 5
        assert self.mbox is not None
        if arg is not None:
            found = self._entry(arg)
            if found:
                self.ok(b"%d %d" % (found[0], found[1].size))
            return
        count, octets = self.mbox.stat()
        self.ok(b"%d messages (%d octets)" % (count, octets))
        self._stream(self._listing(lambda n, e: b"%d %d\r\n" % (n, e.size)))

    def do_UIDL(self, arg: bytes | None = None) -> None:  # RFC 1939 7
        assert self.mbox is not None
        if arg is not None:
            found = self._entry(arg)
            if found:
                self.ok(b"%d %s" % (found[0], found[1].unique_id()))
            return
        self.ok(b"Unique-ID listing follows")
        self._stream(self._listing(lambda n, e: b"%d %s\r\n" % (n, e.unique_id())))

    def _listing(self, line: Callable[[int, Any], bytes]) -> Iterator[bytes]:
        assert self.mbox is not None
        out: list[bytes] = []
        size = 0
        for n, e in self.mbox.listing():
            item = line(n, e)
            out.append(item)
            size += len(item)
            if size >= LIST_CHUNK:
                yield b"".join(out)
                out, size = [], 0
        out.append(b".\r\n")
        yield b"".join(out)

    def do_RETR(self, arg: bytes) -> None:  # RFC 1939 5
        self._send_message(arg, None)

    def do_TOP(self, arg: bytes, lines: bytes) -> None:  # RFC 1939 7
        if not lines.isdigit():
            self.err(b"Invalid line count")
            return
        # fetchmail asks for "TOP n 99999999" to read a message whole; any count will do.
        self._send_message(arg, int(lines) if len(lines) <= 18 else 10 ** 18)

    def _send_message(self, arg: bytes, top: int | None) -> None:
        found = self._entry(arg)
        if not found:
            return
        n, e = found
        assert self.mbox is not None
        if top is None:
            # A message of one chunk (nearly all) is read and sent whole (pop3/whole.py).
            data = read_whole(self.mbox, e)
            if data is not None:
                self.mbox.retrieved += 1
                drained = send_now(self.transport,
                                   response(b"+OK %d octets\r\n" % e.size, data, e.size))
                if drained is not None:
                    self._hold(drained, idle_timer=True)
                return
        try:
            f = self.mbox.open(e)
        except MessageGone:
            self.err(b"Message %d was removed by another session" % n)
            return
        except OSError as exc:
            self.log.error("{service} {user}: cannot open message {n}: {error}",
                           service=self.context.service, user=self.user, n=n, error=exc)
            self.err(b"Cannot read message", b"SYS/TEMP")
            return
        if top is None:
            self.mbox.retrieved += 1
            self.ok(b"%d octets" % e.size)
        else:
            self.ok(b"Top of message follows")
        self._stream(message_chunks(f, top))

    def _stream(self, chunks: Iterator[bytes]) -> None:
        producer = ChunkProducer(self.transport, chunks, self.resetTimeout)
        self._hold(producer.start(), idle_timer=True)

    def do_DELE(self, arg: bytes) -> None:  # RFC 1939 5
        found = self._entry(arg)
        if found:
            found[1].deleted = True
            self.ok(b"Message %d deleted" % found[0])

    def do_RSET(self) -> None:  # RFC 1939 5
        assert self.mbox is not None
        self.mbox.undeleteMessages()
        self.ok(b"%d messages (%d octets)" % self.mbox.stat())

    def do_NOOP(self) -> None:  # RFC 1939 5
        self.ok()

    # -- QUIT and the UPDATE state -------------------------------------------------------

    def do_QUIT(self) -> None:  # RFC 1939 5, 6
        mbox = self.mbox
        if mbox is None or self.pop_state != TRANSACTION:
            self.ok(b"Bye")
            self._close()
            return
        self.pop_state = UPDATE

        def done(result: tuple[int, int]) -> None:
            removed, left = result
            self._logout()
            self.log.info("{service} logout {user}: {retrieved} retrieved, {removed} deleted",
                          service=self.context.service, user=self.user,
                          retrieved=mbox.retrieved, removed=removed)
            if left:
                self.err(b"Some deleted messages not removed", b"SYS/TEMP")
            else:
                self.ok(b"Bye, %d messages deleted" % removed)
            self._close()

        def failed(f: Failure) -> None:
            self._logout()
            if f.check(MailboxLockLost):
                self.log.warn("{service} {user}: mailbox lock lost to another node's "
                              "session; nothing deleted", service=self.context.service,
                              user=self.user)
                self.err(b"Mailbox lock lost to another session; no message deleted",
                         b"IN-USE")
            elif f.check(MailboxUnavailable):   # the lock could not be confirmed
                self.log.warn("{service} {user}: mailbox lock cannot be confirmed ({why}); "
                              "nothing deleted", service=self.context.service,
                              user=self.user, why=f.getErrorMessage())
                self.err(b"Mailbox lock cannot be confirmed; no message deleted",
                         b"SYS/TEMP")
            else:
                self.log.failure("{service} {user}: deleting messages failed", f,
                                 service=self.context.service, user=self.user)
                self.err(b"Some deleted messages not removed", b"SYS/TEMP")
            self._close()

        self._hold(mbox.commit().addCallbacks(done, failed))

    def _logout(self) -> None:
        """Release the mailbox before saying goodbye, so the client may log in again at once."""
        logout = self._onLogout or self._update_logout
        self._onLogout = self._update_logout = None
        if logout is not None:
            logout()


def _is_utf8(line: bytes) -> bool:
    if line.isascii():
        return True
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
