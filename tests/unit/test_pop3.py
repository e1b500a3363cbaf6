"""POP3: the wire format helpers, the IMailbox avatar, and the session state machine driven
over StringTransport against a real accounts database, portal and Maildir store."""

from __future__ import annotations

import base64
import io
import random
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail.pop3 import IMailbox
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailserver.accounts import Accounts
from mailserver.auth import AuthThrottle, MailRealm, build_portal, inbox_warmer
from mailserver.config import LimitsConfig
from mailserver.maildir import MaildirStore
from mailserver.passwords import hash_password
from mailserver.pop3.mailbox import MailboxLocks, POP3Mailbox, open_inbox, uidl_of
from mailserver.pop3.service import POP3Factory, avatar_factory
from mailserver.pop3.session import MAX_BAD_COMMANDS, POP3Context, POP3Session
from mailserver.pop3.wire import (CRLFNormalizer, DotStuffer, TopLimiter, crlf_size,
                                  message_chunks)

ALICE = "alice@example.test"
_HASHES: list[str] = []


def secret_hash() -> str:
    """One argon2id hash of "secret" for every test (hashing is slow on purpose)."""
    if not _HASHES:
        _HASHES.append(hash_password("secret"))
    return _HASHES[0]


# -- wire format -----------------------------------------------------------------------------

def reference(message: bytes, top: int | None = None) -> bytes:
    """The multi-line response body, computed line by line (slow and obviously right)."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    lines = text.split(b"\r\n") if text else []
    ended = text.endswith(b"\r\n")
    if ended:
        lines.pop()
    if top is not None:
        try:
            blank = lines.index(b"")
        except ValueError:
            blank = len(lines)
        lines = lines[:blank + 1 + top]
    out = [(b"." + ln if ln.startswith(b".") else ln) for ln in lines]
    body = b"\r\n".join(out)
    if out:
        body += b"\r\n"
    return body + b".\r\n"


def chunked(message: bytes, top: int | None = None, size: int = 7) -> bytes:
    return b"".join(message_chunks(io.BytesIO(message), top, chunk_size=size))


class WireTests(unittest.SynchronousTestCase):
    SAMPLES = [
        b"Subject: a\r\n\r\nbody\r\n",
        b"Subject: a\n\nbody\n.hidden\n..two\n",
        b"Subject: a\r\n\r\n.\r\n.\r\nx",
        b".starts with dot\r\n\r\nline\r\n",
        b"no blank line\r\nat all\r\n",
        b"\r\nempty header\r\nline2\r\nline3\r\n",
        b"mixed\r\nends\nhere\r\n\r\na\nb\r\nc\n",
        b"bare\rcr\r\n\r\nx\ry\r\n",
        b"",
        b"no final newline",
        b"H: 1\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(50)),
    ]

    def test_chunks_match_reference_for_every_chunk_size(self):
        for message in self.SAMPLES:
            for size in (1, 2, 3, 5, 64 * 1024):
                self.assertEqual(chunked(message, None, size), reference(message),
                                 (message, size))
                for top in (0, 1, 3, 100):
                    self.assertEqual(chunked(message, top, size), reference(message, top),
                                     (message, size, top))

    def test_random_messages(self):
        rng = random.Random(4)
        alphabet = [b"a", b".", b"\r\n", b"\n", b"\r", b" ", b".."]
        for _ in range(300):
            message = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            size = rng.randint(1, 9)
            top = rng.choice([None, 0, 1, 2])
            self.assertEqual(chunked(message, top, size), reference(message, top),
                             (message, size, top))

    def test_crlf_size_counts_the_converted_form(self):
        for message in self.SAMPLES:
            expected = len(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            self.assertEqual(crlf_size(io.BytesIO(message)), expected, message)

    def test_normalizer_does_not_double_a_split_crlf(self):
        n = CRLFNormalizer()
        self.assertEqual(n.feed(b"a\r") + n.feed(b"\nb\n") + n.finish(), b"a\r\nb\r\n")

    def test_dot_stuffer_and_terminator(self):
        s = DotStuffer()
        self.assertEqual(s.feed(b".a\r\n") + s.feed(b".b\r\nc"), b"..a\r\n..b\r\nc")
        self.assertEqual(s.terminator(), b"\r\n.\r\n")
        self.assertEqual(DotStuffer().terminator(), b".\r\n")

    def test_top_limiter_header_split_across_chunks(self):
        t = TopLimiter(1)
        out = b"".join(t.feed(c) for c in (b"A: 1\r", b"\n\r", b"\nx\r\ny\r\n"))
        self.assertEqual(out, b"A: 1\r\n\r\nx\r\n")
        self.assertTrue(t.done)

    def test_large_message_streams_in_bounded_chunks(self):
        message = (b"X" * 1000 + b"\n") * 200
        chunks = list(message_chunks(io.BytesIO(message), None, chunk_size=4096))
        self.assertLessEqual(max(len(c) for c in chunks), 4096 * 2 + 2)
        self.assertEqual(b"".join(chunks), reference(message))

    def test_uidl_is_the_base_name_or_a_stable_digest(self):
        self.assertEqual(uidl_of("1700000000.M1P2Q3.host,S=12"), b"1700000000.M1P2Q3.host,S=12")
        long = "1700000000.M1P2Q3." + "h" * 80
        self.assertEqual(uidl_of(long), uidl_of(long))
        self.assertLessEqual(len(uidl_of(long)), 70)
        self.assertNotEqual(uidl_of(long), uidl_of(long + "x"))
        self.assertTrue(all(0x21 <= c <= 0x7E for c in uidl_of("with space")))


# -- sessions over StringTransport -----------------------------------------------------------

class TLSStringTransport(StringTransport):
    """Records STLS: the handshake itself is the TLS layer's business."""

    tls_started_with = None

    def startTLS(self, context) -> None:
        self.tls_started_with = context

    def registerProducer(self, producer, streaming) -> None:
        """Asks a pull producer for data at once, as Twisted's TCP transport does."""
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()


class Server:
    """Accounts, store, portal and realm as mailserver.service builds them."""

    def __init__(self, root: Path, **limits) -> None:
        self.root = root
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.store = MaildirStore(root / "maildirs", "mail.example.test")
        self.accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            self.accounts.add_user(f"{user}@example.test", secret_hash())
            self.store.create_user("example.test", user)
        self.realm = MailRealm()
        self.portal = build_portal(self.accounts, self.realm)
        self.clock = task.Clock()
        self.throttle = AuthThrottle(3, 900, clock=self.clock)
        self.locks = MailboxLocks()
        self.realm.register(IMailbox, avatar_factory(self.accounts, self.store, self.locks))
        self.limits = LimitsConfig(**limits)
        self.counter = 0

    def context(self, tls: object = "tls-context", loopback: bool = False) -> POP3Context:
        return POP3Context(hostname="mail.example.test", limits=self.limits,
                           portal=self.portal, throttle=self.throttle, tls=tls,
                           allow_plaintext_loopback=loopback, clock=reactor)

    def inbox(self, user: str = "alice") -> Path:
        return self.store.user_path("example.test", user)

    def drop(self, data: bytes, user: str = "alice", name: str | None = None) -> Path:
        """A message file put into new/ by some other program."""
        self.counter += 1
        name = name or f"1700000000.M{self.counter}P1.other.host"
        path = self.inbox(user) / "new" / name
        path.write_bytes(data)
        return path

    def files(self, user: str = "alice") -> list[str]:
        inbox = self.inbox(user)
        return sorted(p.name for sub in ("new", "cur") for p in (inbox / sub).iterdir())

    def close(self) -> defer.Deferred:
        """Close the index of every folder opened (pending cache writes included)."""
        self.accounts.close()
        folders = [self.store.account(self.inbox(u)).loaded_folder("INBOX")
                   for u in ("alice", "bob")]
        return defer.gatherResults([f.close() for f in folders if f is not None])


class Conn:
    """One POP3 session; `cmd` sends a line and waits for the complete response."""

    def __init__(self, server: Server, ip: str = "192.0.2.7", tls: bool = True,
                 loopback: bool = False, context: POP3Context | None = None) -> None:
        self.server = server
        self.proto = POP3Session(context or server.context(loopback=loopback))
        self.proto.factory = POP3Factory(self.proto.context)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", ip, 4321))
        self.proto.makeConnection(self.transport)
        if tls:
            self.proto.startedTLS = True
        self.greeting = self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def pump(self) -> None:
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    @defer.inlineCallbacks
    def wait_for(self, done, timeout: float = 10.0):
        got = b""
        for _ in range(int(timeout / 0.005)):
            self.pump()
            got += self.take()
            if done(got):
                return got
            yield task.deferLater(reactor, 0.005, lambda: None)
        raise AssertionError(f"incomplete response: {got[-300:]!r}")

    def cmd(self, line: bytes, multi: bool = False):
        self.send(line + b"\r\n")
        return self.wait_for(lambda got: complete(got, multi))

    @defer.inlineCallbacks
    def login(self, user: bytes = b"alice@example.test", password: bytes = b"secret"):
        r = yield self.cmd(b"USER " + user)
        assert r.startswith(b"+OK"), r
        r = yield self.cmd(b"PASS " + password)
        return r

    def close(self) -> None:
        if not self.proto._lost:
            self.proto.connectionLost(None)


def complete(got: bytes, multi: bool) -> bool:
    if not got.endswith(b"\r\n"):
        return False
    if multi and got.startswith(b"+OK"):
        rest = got.partition(b"\r\n")[2]
        return rest == b".\r\n" or rest.endswith(b"\r\n.\r\n")
    return True


def lines_of(response: bytes) -> list[bytes]:
    """The data lines of a multi-line response (status and terminator left out)."""
    return response.split(b"\r\n")[1:-2]


def message(n: int, body: bytes = b"Hello.\r\n") -> bytes:
    return b"From: <x@remote.test>\r\nSubject: message %d\r\n\r\n" % n + body


class POP3SessionTests(unittest.TestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="pop3-session-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.server = Server(root)
        self.addCleanup(self.server.close)
        self.conns: list[Conn] = []
        self.addCleanup(lambda: [c.close() for c in self.conns])

    def conn(self, **kw) -> Conn:
        c = Conn(self.server, **kw)
        self.conns.append(c)
        return c

    # -- greeting, CAPA, TLS policy

    def test_greeting(self):
        c = self.conn()
        self.assertEqual(c.greeting, b"+OK mail.example.test POP3 server ready\r\n")

    @defer.inlineCallbacks
    def test_capa_before_tls_hides_credentials(self):
        c = self.conn(tls=False)
        caps = lines_of((yield c.cmd(b"CAPA", multi=True)))
        self.assertEqual(caps, [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE",
                                b"PIPELINING", b"STLS"])
        r = yield c.cmd(b"USER alice@example.test")
        self.assertTrue(r.startswith(b"-ERR [AUTH] Plaintext authentication disallowed"), r)
        r = yield c.cmd(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        r = yield c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret"))
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        r = yield c.cmd(b"AUTH")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)

    @defer.inlineCallbacks
    def test_capa_under_tls_and_after_login(self):
        c = self.conn()
        caps = lines_of((yield c.cmd(b"CAPA", multi=True)))
        self.assertEqual(caps, [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE",
                                b"PIPELINING", b"USER", b"SASL PLAIN LOGIN"])
        yield c.login()
        caps = lines_of((yield c.cmd(b"CAPA", multi=True)))
        self.assertEqual(caps, [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE",
                                b"PIPELINING"])

    @defer.inlineCallbacks
    def test_plaintext_loopback_only_when_configured(self):
        c = self.conn(tls=False, ip="127.0.0.1", loopback=True)
        caps = lines_of((yield c.cmd(b"CAPA", multi=True)))
        self.assertIn(b"USER", caps)
        self.assertIn(b"STLS", caps)
        r = yield c.login()
        self.assertTrue(r.startswith(b"+OK"), r)
        other = self.conn(tls=False, ip="192.0.2.1", loopback=True)
        r = yield other.cmd(b"USER bob@example.test")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        no_config = self.conn(tls=False, ip="127.0.0.1", loopback=False)
        r = yield no_config.cmd(b"USER bob@example.test")
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)

    @defer.inlineCallbacks
    def test_stls_discards_pipelined_commands(self):
        c = self.conn(tls=False)
        c.send(b"STLS\r\nUSER alice@example.test\r\nPASS secret\r\n")
        r = yield c.wait_for(lambda got: got.endswith(b"\r\n"))
        self.assertEqual(r, b"+OK Begin TLS negotiation now\r\n")
        self.assertEqual(c.transport.tls_started_with, "tls-context")
        self.assertTrue(c.proto.tls_active)
        self.assertEqual(c.proto._buffer, b"")
        r = yield c.cmd(b"NOOP")  # the pipelined USER/PASS never ran: not logged in
        self.assertTrue(r.startswith(b"-ERR"), r)
        r = yield c.cmd(b"STLS")
        self.assertTrue(r.startswith(b"-ERR"), r)
        caps = lines_of((yield c.cmd(b"CAPA", multi=True)))
        self.assertNotIn(b"STLS", caps)
        self.assertIn(b"USER", caps)

    @defer.inlineCallbacks
    def test_no_stls_on_implicit_tls_listener(self):
        c = self.conn(context=self.server.context(tls=None))
        caps = lines_of((yield c.cmd(b"CAPA", multi=True)))
        self.assertNotIn(b"STLS", caps)
        r = yield c.cmd(b"STLS")
        self.assertTrue(r.startswith(b"-ERR"), r)

    # -- authentication

    @defer.inlineCallbacks
    def test_user_pass_login(self):
        self.server.drop(message(1))
        c = self.conn()
        r = yield c.login(b"ALICE@Example.Test")
        self.assertTrue(r.startswith(b"+OK Logged in, 1 messages"), r)
        self.assertEqual(c.proto.user, ALICE)

    @defer.inlineCallbacks
    def test_pass_needs_user(self):
        c = self.conn()
        r = yield c.cmd(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR"), r)

    @defer.inlineCallbacks
    def test_auth_plain_with_initial_response(self):
        c = self.conn()
        r = yield c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret"))
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_auth_plain_with_continuation_and_authzid(self):
        c = self.conn()
        r = yield c.cmd(b"auth plain")
        self.assertEqual(r, b"+ \r\n")
        r = yield c.cmd(base64.b64encode(b"alice@example.test\0alice@example.test\0secret"))
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_auth_cancel_bad_base64_proxy_and_unknown_mechanism(self):
        c = self.conn()
        yield c.cmd(b"AUTH PLAIN")
        r = yield c.cmd(b"*")
        self.assertTrue(r.startswith(b"-ERR Authentication cancelled"), r)
        r = yield c.cmd(b"AUTH PLAIN !!!")
        self.assertTrue(r.startswith(b"-ERR Invalid base64"), r)
        proxy = base64.b64encode(b"bob@example.test\0alice@example.test\0secret")
        r = yield c.cmd(b"AUTH PLAIN " + proxy)
        self.assertTrue(r.startswith(b"-ERR [AUTH]"), r)
        self.assertTrue(c.transport.disconnecting)   # three failures on one connection
        c = self.conn()
        r = yield c.cmd(b"AUTH CRAM-MD5")
        self.assertTrue(r.startswith(b"-ERR"), r)
        r = yield c.cmd(b"AUTH", multi=True)
        self.assertEqual(lines_of(r), [b"PLAIN", b"LOGIN"])
        self.assertEqual(self.server.throttle.failures("192.0.2.7", ALICE), 0)

    @defer.inlineCallbacks
    def test_auth_login_two_steps_and_its_bad_input(self):
        """LOGIN (what Outlook offers) through the shared SASL decoder: base64 challenges,
        an over-long or NUL-carrying name refused like in SMTP AUTH."""
        c = self.conn()
        r = yield c.cmd(b"AUTH LOGIN " + base64.b64encode(b"x" * 300))
        self.assertTrue(r.startswith(b"-ERR Malformed authentication data"), r)
        r = yield c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0se\0cret"))
        self.assertTrue(r.startswith(b"-ERR Malformed authentication data"), r)
        r = yield c.cmd(b"AUTH LOGIN")
        self.assertEqual(r, b"+ " + base64.b64encode(b"Username:") + b"\r\n")
        r = yield c.cmd(base64.b64encode(ALICE.encode()))
        self.assertEqual(r, b"+ " + base64.b64encode(b"Password:") + b"\r\n")
        r = yield c.cmd(base64.b64encode(b"secret"))
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_unreadable_login_data_counts_as_a_failed_login(self):
        """Bad base64 or a malformed PLAIN tries no password, but a client sending only
        that is closed after the per-connection limit like a guesser."""
        c = self.conn()
        for line in (b"AUTH PLAIN !!!", b"AUTH PLAIN " + base64.b64encode(b"a\0b"),
                     b"AUTH PLAIN !!!"):
            r = yield c.cmd(line)
            self.assertTrue(r.startswith(b"-ERR"), r)
        self.assertIn(b"Too many authentication failures", r)
        self.assertTrue(c.transport.disconnecting)
        # Cancelled exchanges count too: AUTH then "*" cannot go on for ever.
        c = self.conn()
        for _ in range(3):
            r = yield c.cmd(b"AUTH PLAIN")
            self.assertEqual(r, b"+ \r\n")
            r = yield c.cmd(b"*")
            self.assertTrue(r.startswith(b"-ERR Authentication cancelled"), r)
        self.assertIn(b"Too many authentication failures", r)
        self.assertTrue(c.transport.disconnecting)

    @defer.inlineCallbacks
    def test_wrong_password_counts_and_closes_after_the_limit(self):
        c = self.conn()
        for i in range(3):
            self.server.clock.advance(100)  # let the throttle's delay pass
            r = yield c.login(password=b"wrong")
            self.assertTrue(r.startswith(b"-ERR [AUTH] Authentication failed"), r)
        self.assertIn(b"Too many authentication failures", r)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(self.server.throttle.failures("192.0.2.7", ALICE), 3)

    @defer.inlineCallbacks
    def test_throttle_delays_a_guessing_client(self):
        throttle = self.server.throttle
        for _ in range(3):
            throttle.failure("192.0.2.7", ALICE)
        c = self.conn()
        c.proto.context.clock = self.server.clock
        yield c.cmd(b"USER alice@example.test")
        c.send(b"PASS secret\r\n")
        self.assertEqual(c.take(), b"")  # held back
        self.server.clock.advance(throttle.delay("192.0.2.7", ALICE))
        r = yield c.wait_for(lambda got: got.endswith(b"\r\n"))
        self.assertTrue(r.startswith(b"+OK"), r)
        self.assertEqual(throttle.failures("192.0.2.7", ALICE), 0)

    def warming_conn(self) -> Conn:
        context = self.server.context()
        context.warm = inbox_warmer(self.server.accounts, self.server.store)
        return self.conn(context=context)

    def inbox_folder(self, user: str = "alice"):
        return self.server.store.account(self.server.inbox(user)).loaded_folder("INBOX")

    @defer.inlineCallbacks
    def test_the_inbox_loads_while_the_password_is_checked(self):
        self.server.drop(message(1))
        c = self.warming_conn()
        yield c.cmd(b"USER alice@example.test")
        c.send(b"PASS secret\r\n")
        self.assertEqual(c.take(), b"")            # the verification is still under way
        folder = self.inbox_folder()
        self.assertIsNotNone(folder)               # ... and the INBOX's first load began
        r = yield c.wait_for(lambda got: got.endswith(b"\r\n"))
        self.assertEqual(r, b"+OK Logged in, 1 messages (%d octets)\r\n" % len(message(1)))
        self.assertTrue(folder.loaded)

    @defer.inlineCallbacks
    def test_no_load_ahead_for_unknown_or_throttled_names(self):
        c = self.warming_conn()
        yield c.cmd(b"USER nobody@example.test")
        r = yield c.cmd(b"PASS secret")
        self.assertTrue(r.startswith(b"-ERR"), r)
        throttle = self.server.throttle
        for _ in range(3):
            throttle.failure("192.0.2.7", "bob@example.test")
        c = self.warming_conn()
        c.proto.context.clock = self.server.clock
        yield c.cmd(b"USER bob@example.test")
        c.send(b"PASS wrong\r\n")
        self.assertIsNone(self.inbox_folder("bob"))  # a guessing client loads nothing
        self.server.clock.advance(throttle.delay("192.0.2.7", "bob@example.test"))
        r = yield c.wait_for(lambda got: got.endswith(b"\r\n"))
        self.assertTrue(r.startswith(b"-ERR"), r)
        self.assertIsNone(self.inbox_folder("bob"))

    @defer.inlineCallbacks
    def test_a_failed_login_of_a_known_name_loads_what_the_user_would(self):
        self.server.drop(message(1))
        c = self.warming_conn()
        yield c.cmd(b"USER alice@example.test")
        r = yield c.cmd(b"PASS wrong")
        self.assertTrue(r.startswith(b"-ERR"), r)
        folder = self.inbox_folder()
        yield folder.refresh()
        self.assertEqual(folder.exists, 1)   # loaded, nothing else: no lock, no session
        self.assertNotIn(str(self.server.inbox()), self.server.locks)

    @defer.inlineCallbacks
    def test_second_session_gets_in_use(self):
        first = self.conn()
        yield first.login()
        second = self.conn()
        r = yield second.login()
        self.assertTrue(r.startswith(b"-ERR [IN-USE]"), r)
        r = yield second.login(b"bob@example.test")  # other mailboxes are free
        self.assertTrue(r.startswith(b"+OK"), r)
        yield first.cmd(b"QUIT")
        third = self.conn()
        r = yield third.login()
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_dropped_connection_frees_the_mailbox(self):
        first = self.conn()
        yield first.login()
        first.proto.connectionLost(None)
        second = self.conn()
        r = yield second.login()
        self.assertTrue(r.startswith(b"+OK"), r)

    @defer.inlineCallbacks
    def test_commands_need_login(self):
        c = self.conn()
        for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL", b"TOP 1 1",
                        b"RSET", b"NOOP", b"APOP alice x"):
            r = yield c.cmd(command)
            self.assertTrue(r.startswith(b"-ERR"), (command, r))

    # -- transaction state

    @defer.inlineCallbacks
    def test_every_command(self):
        m1 = message(1, b"one\r\n.dot line\r\n")
        m2 = message(2, b"two\r\nsecond line\r\n")
        self.server.drop(m1)
        self.server.drop(m2)
        c = self.conn()
        yield c.login()
        r = yield c.cmd(b"STAT")
        self.assertEqual(r, b"+OK 2 %d\r\n" % (len(m1) + len(m2)))
        r = yield c.cmd(b"LIST", multi=True)
        self.assertEqual(lines_of(r), [b"1 %d" % len(m1), b"2 %d" % len(m2)])
        r = yield c.cmd(b"LIST 2")
        self.assertEqual(r, b"+OK 2 %d\r\n" % len(m2))
        r = yield c.cmd(b"UIDL", multi=True)
        uidls = [ln.split(b" ")[1] for ln in lines_of(r)]
        self.assertEqual(sorted(uidls), sorted(n.split(":")[0].encode()
                                               for n in self.server.files()))
        r = yield c.cmd(b"UIDL 1")
        self.assertEqual(r, b"+OK 1 " + uidls[0] + b"\r\n")
        r = yield c.cmd(b"RETR 1", multi=True)
        self.assertEqual(r, b"+OK %d octets\r\n" % len(m1) + reference(m1))
        r = yield c.cmd(b"TOP 2 1", multi=True)
        self.assertEqual(r, b"+OK Top of message follows\r\n" + reference(m2, 1))
        r = yield c.cmd(b"TOP 2 0", multi=True)
        self.assertEqual(r, b"+OK Top of message follows\r\n" + reference(m2, 0))
        r = yield c.cmd(b"NOOP")
        self.assertEqual(r, b"+OK\r\n")
        r = yield c.cmd(b"DELE 1")
        self.assertEqual(r, b"+OK Message 1 deleted\r\n")
        r = yield c.cmd(b"STAT")
        self.assertEqual(r, b"+OK 1 %d\r\n" % len(m2))
        r = yield c.cmd(b"LIST", multi=True)
        self.assertEqual(lines_of(r), [b"2 %d" % len(m2)])
        for command in (b"RETR 1", b"LIST 1", b"UIDL 1", b"TOP 1 0", b"DELE 1"):
            r = yield c.cmd(command)
            self.assertTrue(r.startswith(b"-ERR Message 1 already deleted"), (command, r))
        r = yield c.cmd(b"RSET")
        self.assertTrue(r.startswith(b"+OK 2 messages"), r)
        r = yield c.cmd(b"DELE 2")
        self.assertTrue(r.startswith(b"+OK"), r)
        self.assertEqual(len(self.server.files()), 2)  # nothing removed before QUIT
        r = yield c.cmd(b"QUIT")
        self.assertEqual(r, b"+OK Bye, 1 messages deleted\r\n")
        self.assertTrue(c.transport.disconnecting)
        files = self.server.files()
        self.assertEqual(len(files), 1)
        self.assertEqual(files[0].split(":")[0].encode(), uidls[0])

    @defer.inlineCallbacks
    def test_bad_arguments(self):
        self.server.drop(message(1))
        c = self.conn()
        yield c.login()
        for command in (b"RETR 0", b"RETR 2", b"RETR -1", b"RETR abc", b"RETR +1",
                        b"RETR 99999999999999999999", b"LIST 0", b"UIDL x", b"DELE 5",
                        b"TOP 1 -1", b"TOP 1 x", b"TOP 1", b"RETR", b"RETR 1 2", b"STAT 1",
                        b"FOO", b"", b"USER alice@example.test", b"STLS"):
            r = yield c.cmd(command)
            self.assertTrue(r.startswith(b"-ERR"), (command, r))
        r = yield c.cmd(b"STAT")
        self.assertTrue(r.startswith(b"+OK 1 "), r)

    @defer.inlineCallbacks
    def test_bad_input_is_refused_and_the_session_goes_on(self):
        c = self.conn()
        yield c.login()
        for line in (b"NO\0OP", b"NOOP \xff\xfe", b"NO\rOP"):
            r = yield c.cmd(line)
            self.assertTrue(r.startswith(b"-ERR"), (line, r))
        c.send(b"X" * 5000)
        c.send(b"Y" * 5000)
        r = yield c.wait_for(lambda got: got.endswith(b"\r\n"))
        self.assertEqual(r, b"-ERR Line too long\r\n")
        c.send(b"Z" * 100 + b"\r\n")  # the rest of the long line is dropped silently
        r = yield c.cmd(b"NOOP")
        self.assertEqual(r, b"+OK\r\n")
        r = yield c.cmd(b"NOOP " + "é".encode())  # valid UTF-8 is just a bad argument
        self.assertTrue(r.startswith(b"-ERR Wrong number"), r)

    @defer.inlineCallbacks
    def test_too_many_bad_commands_close_the_connection(self):
        c = self.conn()
        c.send(b"BOGUS\r\n" * MAX_BAD_COMMANDS)
        r = yield c.wait_for(lambda got: b"Too many bad commands" in got)
        self.assertEqual(r.count(b"-ERR Unknown command"), MAX_BAD_COMMANDS)
        self.assertTrue(c.transport.disconnecting)

    @defer.inlineCallbacks
    def test_answers_a_client_does_not_take_stop_the_reading(self):
        """Pipelined commands answered at once (CAPA, 6 octets in, 110 out) wait for the
        client to take the answers once 64 KB are written: 18 MB of CAPA never read made
        470 MB of answers."""
        from mailserver.streaming import OUTPUT_BURST
        c = self.conn()
        c.send(b"CAPA\r\n" * 5000)
        written = c.take()
        self.assertLess(len(written), OUTPUT_BURST + 1024)
        self.assertIsNotNone(c.transport.producer)     # waiting for the answers to drain
        self.assertGreater(len(c.proto._buffer), 4000 * 6)   # ... the commands kept unread
        rest = yield c.wait_for(lambda got: (written + got).count(b"+OK Capability") == 5000)
        self.assertTrue(rest.endswith(b".\r\n"))
        r = yield c.cmd(b"NOOP")
        self.assertTrue(r.startswith(b"-ERR"), r)      # still answering, in order

    def test_a_close_the_client_does_not_drain_is_aborted(self):
        """An idle timeout (or any close) waits for the output to drain: a client that
        reads nothing kept its connection, and its mailbox lock, for ever."""
        from dataclasses import replace

        from mailserver.streaming import CLOSE_GRACE
        clock = task.Clock()
        c = self.conn(context=replace(self.server.context(), clock=clock))
        c.proto.timeoutConnection()
        self.assertTrue(c.transport.disconnecting)
        self.assertFalse(c.transport.disconnected)
        clock.advance(CLOSE_GRACE)
        self.assertTrue(c.transport.disconnected)    # aborted

    @defer.inlineCallbacks
    def test_pipelined_commands_are_answered_in_order(self):
        self.server.drop(message(1))
        c = self.conn()
        c.send(b"USER alice@example.test\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nLIST 1\r\n"
               b"DELE 1\r\nQUIT\r\n")
        r = yield c.wait_for(lambda got: b"Bye" in got)
        replies = [ln for ln in r.split(b"\r\n") if ln.startswith((b"+OK", b"-ERR"))]
        self.assertEqual([ln.split(b" ")[0] for ln in replies], [b"+OK"] * 7)
        self.assertTrue(replies[1].startswith(b"+OK Logged in"))
        self.assertTrue(replies[2].startswith(b"+OK 1 "))
        self.assertEqual(self.server.files(), [])

    @defer.inlineCallbacks
    def test_many_pipelined_listings(self):
        self.server.drop(message(1))
        c = self.conn()
        yield c.login()
        c.send(b"LIST\r\nUIDL\r\nTOP 1 0\r\n" * 1000 + b"NOOP\r\n")
        r = yield c.wait_for(lambda got: got.endswith(b"+OK\r\n"))
        self.assertEqual(r.count(b"+OK 1 messages"), 1000)
        self.assertEqual(r.count(b"+OK Top of message follows"), 1000)

    @defer.inlineCallbacks
    def test_top_with_a_huge_line_count_sends_the_whole_message(self):
        m = message(1, b"a\r\nb\r\n")
        self.server.drop(m)
        c = self.conn()
        yield c.login()
        for count in (b"99999999", b"9" * 40):
            r = yield c.cmd(b"TOP 1 " + count, multi=True)
            self.assertEqual(r, b"+OK Top of message follows\r\n" + reference(m))

    @defer.inlineCallbacks
    def test_dropped_connection_deletes_nothing(self):
        self.server.drop(message(1))
        c = self.conn()
        yield c.login()
        yield c.cmd(b"DELE 1")
        c.proto.connectionLost(None)
        self.assertEqual(len(self.server.files()), 1)

    @defer.inlineCallbacks
    def test_lf_only_files_are_sized_and_sent_as_crlf(self):
        lf = b"From: <x@remote.test>\nSubject: lf\n\n.line\nend\n"
        crlf = lf.replace(b"\n", b"\r\n")
        self.server.drop(lf, name="1600000000.M1P1.dovecot.host")
        self.server.drop(lf, name=f"1600000001.M1P1.dovecot.host,S={len(lf)},W={len(crlf)}")
        c = self.conn()
        yield c.login()
        r = yield c.cmd(b"LIST", multi=True)
        self.assertEqual(lines_of(r), [b"1 %d" % len(crlf), b"2 %d" % len(crlf)])
        r = yield c.cmd(b"RETR 1", multi=True)
        self.assertEqual(r, b"+OK %d octets\r\n" % len(crlf) + reference(crlf))
        sent = r.split(b"\r\n", 1)[1][:-len(b".\r\n")]
        self.assertEqual(len(sent) - 1, len(crlf))  # one byte more: the stuffed dot
        # the measured size is cached in the folder index: the next login reads no file
        yield c.cmd(b"QUIT")
        folder = self.server.store.account(self.server.inbox()).folder("INBOX")
        yield folder.flush_cache()
        cached = folder.cache_get(folder.messages[0].uid, "vsize")
        self.assertEqual(int(cached), len(crlf))

    @defer.inlineCallbacks
    def test_an_imap_append_with_bare_lfs_is_sized_and_sent_as_crlf(self):
        """APPEND keeps the client's bytes; its name then carries the CRLF size (",W="),
        so LIST tells the octets RETR sends and RETR ends in CRLF.CRLF."""
        lf = b"Subject: lf\n\nline1\r\n..dot\nlast line\n"
        crlf = lf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        folder = yield self.server.store.account(self.server.inbox()).open_folder("INBOX")
        writer = folder.begin_append()
        for piece in (lf[:19], lf[19:20], lf[20:]):   # a CRLF split between two writes
            writer.write(piece)
        info = yield writer.commit()
        self.assertIn(f",S={len(lf)},W={len(crlf)}", info.basename)
        self.assertEqual((self.server.inbox() / "cur" / info.filename).read_bytes(), lf)
        plain = folder.begin_append()
        plain.write(crlf)
        info = yield plain.commit()
        self.assertNotIn(",W=", info.basename)
        c = self.conn()
        yield c.login()
        r = yield c.cmd(b"LIST", multi=True)
        self.assertEqual(lines_of(r), [b"1 %d" % len(crlf), b"2 %d" % len(crlf)])
        for n in (b"1", b"2"):
            r = yield c.cmd(b"RETR " + n, multi=True)
            self.assertEqual(r, b"+OK %d octets\r\n" % len(crlf) + reference(crlf))

    @defer.inlineCallbacks
    def test_listing_comes_from_the_index_without_reading_files(self):
        for i in range(30):
            own_name = f"1700000000.M{i}P9Q{i}.mail.example.test,S={len(message(i))}"
            self.server.drop(message(i), name=own_name)
        c = self.conn()
        opened = []
        real_open = open

        def spy(path, *a, **kw):
            if "/cur/" in str(path) or "/new/" in str(path):
                opened.append(path)
            return real_open(path, *a, **kw)

        import builtins
        self.patch(builtins, "open", spy)
        yield c.login()
        r = yield c.cmd(b"STAT")
        self.assertTrue(r.startswith(b"+OK 30 "), r)
        yield c.cmd(b"LIST", multi=True)
        yield c.cmd(b"UIDL", multi=True)
        self.assertEqual(opened, [])

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        clock = task.Clock()
        ctx = self.server.context()
        ctx.clock = clock
        c = self.conn(context=ctx)
        clock.advance(self.server.limits.idle_timeout - 1)
        self.assertFalse(c.transport.disconnecting)
        yield c.cmd(b"CAPA", multi=True)
        clock.advance(self.server.limits.idle_timeout - 1)
        self.assertFalse(c.transport.disconnecting)
        clock.advance(2)
        self.assertEqual(c.take(), b"-ERR Disconnected for inactivity\r\n")
        self.assertTrue(c.transport.disconnecting)

    @defer.inlineCallbacks
    def test_idle_timeout_inside_a_message_adds_no_text_to_it(self):
        """A client that stops reading in the middle of a RETR is disconnected after the
        idle time, without an -ERR line written into the message it was sent."""
        self.server.drop(message(1, b"x" * 100 + b"\r\n") * 4000)
        clock = task.Clock()
        ctx = self.server.context()
        ctx.clock = clock
        c = self.conn(context=ctx)
        yield c.login()
        c.send(b"RETR 1\r\n")
        yield task.deferLater(reactor, 0.01, lambda: None)
        sent = c.take()
        self.assertTrue(sent.startswith(b"+OK"), sent[:40])
        self.assertFalse(sent.endswith(b"\r\n.\r\n"))   # the rest waits for the reader
        clock.advance(self.server.limits.idle_timeout + 1)
        self.assertTrue(c.transport.disconnecting)
        self.assertNotIn(b"-ERR", c.take())

    @defer.inlineCallbacks
    def test_message_expunged_elsewhere_cannot_be_retrieved(self):
        self.server.drop(message(1))
        self.server.drop(message(2))
        c = self.conn()
        yield c.login()
        folder = c.proto.mbox.folder
        yield folder.delete_messages([folder.messages[0].uid])
        r = yield c.cmd(b"RETR 1")
        self.assertTrue(r.startswith(b"-ERR Message 1 was removed"), r)
        r = yield c.cmd(b"DELE 1")
        self.assertTrue(r.startswith(b"+OK"), r)
        r = yield c.cmd(b"QUIT")
        self.assertTrue(r.startswith(b"+OK"), r)
        self.assertEqual(len(self.server.files()), 1)

    @defer.inlineCallbacks
    def test_quit_in_authorization_state(self):
        c = self.conn()
        r = yield c.cmd(b"QUIT")
        self.assertEqual(r, b"+OK Bye\r\n")
        self.assertTrue(c.transport.disconnecting)


class MailboxTests(unittest.TestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="pop3-mailbox-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.server = Server(root)
        self.addCleanup(self.server.close)

    @defer.inlineCallbacks
    def test_provides_imailbox(self):
        self.server.drop(message(1))
        mbox = yield open_inbox(self.server.store, self.server.inbox(), ALICE,
                                self.server.locks)
        self.addCleanup(mbox.logout)
        self.assertTrue(verifyObject(IMailbox, mbox))
        self.assertIsInstance(mbox, POP3Mailbox)
        self.assertEqual(mbox.listMessages(), [len(message(1))])
        self.assertEqual(mbox.listMessages(0), len(message(1)))
        self.assertEqual(mbox.getUidl(0), mbox.entries[0].base.encode())
        with mbox.getMessage(0) as f:
            self.assertEqual(f.read(), message(1))
        self.assertRaises(ValueError, mbox.listMessages, 1)
        self.assertRaises(ValueError, mbox.getUidl, -1)
        mbox.deleteMessage(0)
        self.assertEqual(mbox.listMessages(), [0])
        self.assertRaises(ValueError, mbox.getMessage, 0)
        mbox.undeleteMessages()
        self.assertEqual(mbox.listMessages(), [len(message(1))])
        mbox.deleteMessage(0)
        result = yield mbox.sync()
        self.assertEqual(result, (1, 0))
        self.assertEqual(self.server.files(), [])

    @defer.inlineCallbacks
    def test_lock_is_released_when_opening_fails(self):
        class Broken:
            def refresh(self):
                return defer.fail(OSError("disk on fire"))

        from mailserver.pop3 import mailbox as module
        self.patch(module, "_inbox", lambda store, path: Broken())
        with self.assertRaises(OSError):
            yield open_inbox(self.server.store, self.server.inbox(), ALICE, self.server.locks)
        self.assertNotIn(str(self.server.inbox()), self.server.locks)

    @defer.inlineCallbacks
    def test_the_listing_is_made_in_the_folders_thread(self):
        # 100,000 messages are a tenth of a second of listing: not the reactor's.
        import threading

        from mailserver.pop3 import mailbox as module
        self.server.drop(b"Subject: a\r\n\r\nbody\r\n", name="1700000000.M1P1.h,S=9,W=25")
        self.server.drop(b"Subject: b\r\n\r\nbody\n")
        threads_seen = []
        real = module.take_snapshot

        def recording(view, own, fields):
            threads_seen.append(threading.current_thread() is threading.main_thread())
            return real(view, own, fields)
        self.patch(module, "take_snapshot", recording)
        mbox = yield open_inbox(self.server.store, self.server.inbox(), ALICE,
                                self.server.locks)
        self.assertEqual(threads_seen, [False])
        # the W= size as the name says; the other measured (its bare LF counted as CRLF)
        self.assertEqual([e.size for e in mbox.entries], [25, 20])
        self.assertEqual(mbox.stat(), (2, 45))
        mbox.logout()

    @defer.inlineCallbacks
    def test_second_open_is_in_use(self):
        from mailserver.pop3.mailbox import MailboxInUse
        mbox = yield open_inbox(self.server.store, self.server.inbox(), ALICE,
                                self.server.locks)
        with self.assertRaises(MailboxInUse):
            yield open_inbox(self.server.store, self.server.inbox(), ALICE, self.server.locks)
        mbox.logout()
        mbox.logout()
        again = yield open_inbox(self.server.store, self.server.inbox(), ALICE,
                                 self.server.locks)
        again.logout()


class QuitThenHangUp(unittest.TestCase):
    """Across nodes QUIT asks the database whether the mailbox is still this session's
    before deleting.  A client that hung up right after QUIT (many do) made the session
    let go of the mailbox meanwhile: the answer was "no", and nothing was deleted."""

    @defer.inlineCallbacks
    def test_the_deletions_of_a_client_gone_after_quit_are_made(self):
        server = Server(Path(self.mktemp()))
        self.addCleanup(server.close)
        asked: list[tuple[defer.Deferred, str]] = []

        class AskingLocks(MailboxLocks):
            def confirm(self, key):
                d: defer.Deferred = defer.Deferred()
                asked.append((d, key))
                return d

        server.locks = AskingLocks()
        server.realm.register(IMailbox, avatar_factory(server.accounts, server.store,
                                                       server.locks))
        server.drop(b"Subject: x\r\n\r\nhi\r\n")
        c = Conn(server)
        r = yield c.login()
        self.assertTrue(r.startswith(b"+OK"), r)
        r = yield c.cmd(b"DELE 1")
        self.assertTrue(r.startswith(b"+OK"), r)
        c.send(b"QUIT\r\n")
        c.close()                      # gone before the answer
        [(d, key)] = asked
        self.assertIn(key, server.locks)   # still held while the deletions are made
        d.callback(server.locks.holds(key))
        for _ in range(200):
            if not server.files() and key not in server.locks:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(server.files(), [])
        self.assertNotIn(key, server.locks)   # and let go after

