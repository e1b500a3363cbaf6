"""The submission session over StringTransport: AUTH (RFC 4954) only where allowed, bad AUTH
input, sender ownership, recipients anywhere, header fix-ups, queueing of remote mail."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.auth import AuthThrottle, MailRealm, build_portal
from mailserver.config import AuthConfig, LimitsConfig, QueueConfig
from mailserver.maildir import MaildirStore
from mailserver.passwords import hash_password
from mailserver.ratelimit import SlidingWindowCounter
from mailserver import sasl
from mailserver.smtp.queue.local import QueueLocalDelivery
from mailserver.smtp.queue.runner import QueueRunner
from mailserver.smtp.queue.store import QueueStore
from mailserver.smtp.session import new_queue_id
from mailserver.smtp.submission import ISubmitter, SubmissionContext, SubmissionSession, Submitter


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


_HASHES: dict[str, str] = {}


def secret_hash() -> str:
    """One argon2id hash of "secret" for every test (hashing is slow on purpose)."""
    if "secret" not in _HASHES:
        _HASHES["secret"] = hash_password("secret")
    return _HASHES["secret"]


class Harness:
    def __init__(self, root: Path, peer: str = "127.0.0.1", loopback_ok: bool = True,
                 **limits) -> None:
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.store = MaildirStore(root / "maildirs", "mail.example.test")
        self.accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            self.accounts.add_user(f"{user}@example.test", secret_hash())
            self.store.create_user("example.test", user)
        self.accounts.add_alias("sales@example.test", ["alice@example.test"])
        realm = MailRealm()
        realm.register(ISubmitter, Submitter)
        self.queue_store = QueueStore(root / "var" / "queue")
        self.queue_store.ensure()
        local = QueueLocalDelivery(self.store, self.accounts)
        self.queue = QueueRunner(self.queue_store, QueueConfig(), "mail.example.test", local,
                                 local, lambda a: [], new_queue_id)
        limits.setdefault("auth_failure_delay_after", 100)
        self.context = SubmissionContext(
            hostname="mail.example.test", limits=LimitsConfig(**limits), accounts=self.accounts,
            store=self.store, tls=None, service="submission", queue=self.queue,
            portal=build_portal(self.accounts, realm),
            throttle=AuthThrottle(limits["auth_failure_delay_after"], 900),
            auth=AuthConfig(allow_plaintext_loopback=loopback_ok),
            rate=SlidingWindowCounter(limits.get("messages_per_hour", 500), 3600),
            local=local, dkim_dir=root / "var" / "dkim")
        self.proto = SubmissionSession(self.context)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 4321))
        self.proto.makeConnection(self.transport)
        self.lines()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lines(self) -> list[bytes]:
        out = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return out

    @defer.inlineCallbacks
    def replies(self, count: int):
        """The final reply lines, once `count` have arrived (AUTH and commit are async)."""
        got: list[bytes] = []
        for _ in range(1000):
            got += self.lines()
            finals = [line for line in got if line[3:4] == b" "]
            if len(finals) >= count:
                return finals
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"only got {got!r}")

    def close(self) -> None:
        self.proto.connectionLost(None)
        self.accounts.close()


class SubmissionTests(unittest.TestCase):
    def harness(self, **kwargs) -> Harness:
        root = Path(tempfile.mkdtemp(prefix="submission-"))
        self.addCleanup(shutil.rmtree, root, True)
        h = Harness(root, **kwargs)
        self.addCleanup(h.close)
        return h

    @defer.inlineCallbacks
    def login(self, h: Harness, user: str = "alice@example.test"):
        h.send(b"EHLO client.test\r\nAUTH PLAIN " + b64(f"\0{user}\0secret") + b"\r\n")
        finals = yield h.replies(2)
        self.assertTrue(finals[-1].startswith(b"235 2.7.0"), finals)

    def test_no_auth_without_tls_from_outside(self):
        h = self.harness(peer="192.0.2.9")
        h.send(b"EHLO client.test\r\n")
        self.assertNotIn(b"250-AUTH PLAIN LOGIN", h.lines())
        h.send(b"AUTH PLAIN " + b64("\0alice@example.test\0secret") + b"\r\n"
               b"MAIL FROM:<alice@example.test>\r\n")
        lines = h.lines()
        self.assertTrue(lines[0].startswith(b"538 5.7.11"), lines)
        self.assertTrue(lines[1].startswith(b"530 5.7.0"), lines)

    def test_loopback_plaintext_when_configured(self):
        h = self.harness()
        h.send(b"EHLO client.test\r\n")
        self.assertIn(b"250 AUTH PLAIN LOGIN", h.lines())

    @defer.inlineCallbacks
    def test_mail_before_auth_refused_then_plain_login(self):
        h = self.harness()
        h.send(b"EHLO client.test\r\nMAIL FROM:<alice@example.test>\r\n")
        self.assertTrue(h.lines()[-1].startswith(b"530 5.7.0 Authentication required"))
        h.send(b"AUTH PLAIN\r\n")
        self.assertEqual(h.lines(), [b"334 "])
        h.send(b64("\0Alice@Example.TEST\0secret") + b"\r\n")
        finals = yield h.replies(1)
        self.assertTrue(finals[0].startswith(b"235"), finals)
        self.assertEqual(h.proto.username, "alice@example.test")
        h.send(b"AUTH PLAIN " + b64("\0alice@example.test\0secret") + b"\r\n")
        self.assertTrue(h.lines()[0].startswith(b"503 5.5.1"))

    @defer.inlineCallbacks
    def test_login_mechanism_with_initial_response(self):
        h = self.harness()
        h.send(b"EHLO c\r\nAUTH LOGIN " + b64("bob@example.test") + b"\r\n")
        self.assertEqual(h.lines()[-1], b"334 " + b64("Password:"))
        h.send(b64("secret") + b"\r\n")
        finals = yield h.replies(1)
        self.assertTrue(finals[0].startswith(b"235"))

    @defer.inlineCallbacks
    def test_failures_malformed_input_and_disconnect(self):
        h = self.harness(auth_failures_per_connection=4)
        h.send(b"EHLO c\r\nAUTH PLAIN " + b64("\0alice@example.test\0wrong") + b"\r\n")
        finals = yield h.replies(2)
        self.assertTrue(finals[-1].startswith(b"535 5.7.8"), finals)
        h.send(b"AUTH PLAIN ***\r\n")
        finals = yield h.replies(1)
        self.assertTrue(finals[0].startswith(b"501 5.5.2"), finals)
        h.send(b"AUTH LOGIN\r\n*\r\n")
        finals = yield h.replies(1)
        self.assertTrue(finals[-1].startswith(b"501 5.0.0"), finals)
        h.send(b"AUTH XOAUTH2 abc\r\n")  # unknown mechanism: no failure counted
        self.assertTrue(h.lines()[0].startswith(b"504 5.5.4"))
        h.send(b"AUTH PLAIN " + b64("no-nul-here") + b"\r\n")
        finals = yield h.replies(2)
        self.assertTrue(finals[0].startswith(b"501"), finals)
        self.assertTrue(finals[1].startswith(b"421 4.7.0"), finals)
        self.assertTrue(h.transport.disconnecting)
        self.assertGreaterEqual(h.context.throttle.failures("127.0.0.1", ""), 2)

    @defer.inlineCallbacks
    def test_overlong_auth_line_is_answered_and_counted(self):
        h = self.harness(max_command_length=100)
        h.send(b"EHLO c\r\nAUTH PLAIN\r\n")
        h.lines()
        h.send(b"A" * 300 + b"\r\nNOOP\r\n")
        finals = yield h.replies(2)
        self.assertTrue(finals[0].startswith(b"500 5.5.6"), finals)
        self.assertTrue(finals[1].startswith(b"250"), finals)
        self.assertEqual(h.proto._auth_failures, 1)

    @defer.inlineCallbacks
    def test_throttle_delays_the_reply(self):
        h = self.harness(auth_failure_delay_after=1, auth_failures_per_connection=10)
        clock = task.Clock()
        h.proto.callLater = clock.callLater
        h.context.throttle.clock = clock
        h.context.throttle.failure("127.0.0.1", "alice@example.test")
        h.send(b"EHLO c\r\nAUTH PLAIN " + b64("\0alice@example.test\0secret") + b"\r\n")
        self.assertEqual(len(h.lines()), 6)  # the EHLO reply only: AUTH waits
        clock.advance(1.0)
        finals = yield h.replies(1)
        self.assertTrue(finals[0].startswith(b"235"), finals)

    @defer.inlineCallbacks
    def test_sender_must_belong_to_the_user(self):
        h = self.harness()
        yield self.login(h)
        for sender, code in ((b"bob@example.test", b"553"), (b"", b"553"),
                             (b"alice@remote.test", b"553"), (b"sales@example.test", b"250")):
            h.send(b"MAIL FROM:<" + sender + b"> AUTH=<>\r\n")
            self.assertEqual(h.lines()[0][:3], code, sender)
            h.send(b"RSET\r\n")
            h.lines()

    @defer.inlineCallbacks
    def test_recipients_anywhere_limits_and_tricks(self):
        h = self.harness(submission_max_recipients=3)
        yield self.login(h)
        h.send(b"MAIL FROM:<alice@example.test>\r\n")
        h.lines()
        for rcpt, code in ((b"x@remote.test", b"250"), (b"nobody@example.test", b"550"),
                           (b"user%other@example.test", b"554"), (b"a@[192.0.2.1]", b"550"),
                           (b"bob@example.test", b"250"), (b"y@remote.test", b"250"),
                           (b"z@remote.test", b"452")):
            h.send(b"RCPT TO:<" + rcpt + b">\r\n")
            self.assertEqual(h.lines()[0][:3], code, rcpt)

    @defer.inlineCallbacks
    def test_message_local_and_queued_with_headers_added(self):
        h = self.harness()
        yield self.login(h)
        h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<Bob@Example.TEST>\r\n"
               b"RCPT TO:<X.Ray@Remote.TEST>\r\nDATA\r\n")
        yield h.replies(3)
        h.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        finals = yield h.replies(1)
        self.assertTrue(finals[0].startswith(b"250 2.0.0 Ok: queued as "), finals)
        queue_id = finals[0].rsplit(b" ", 1)[1].decode()
        [bob] = list((h.store.user_path("example.test", "bob") / "new").iterdir())
        data = bob.read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <alice@example.test>\r\n"
                                        b"Delivered-To: bob@example.test\r\nReceived: "))
        self.assertIn(b"(authenticated user alice@example.test)", data)
        self.assertIn(b"\r\nFrom: <alice@example.test>\r\n", data)
        self.assertIn(b"\r\nDate: ", data)
        self.assertIn(b"\r\nMessage-ID: <" + queue_id.encode(), data)
        self.assertTrue(data.endswith(b"\r\n\r\nbody\r\n"))
        env = json.loads(h.queue_store.envelope_path(queue_id).read_bytes())
        # RFC 5321 2.4: a remote local part keeps its case; the domain is normalised.
        self.assertEqual([(r["address"], r["kind"]) for r in env["recipients"]],
                         [("X.Ray@remote.test", "remote")])
        queued = h.queue_store.message_path(queue_id).read_bytes()
        self.assertFalse(queued.startswith(b"Return-Path"))
        self.assertEqual(queued, data.split(b"\r\n", 2)[2])
        self.assertEqual(list(h.queue_store.tmp_dir.iterdir()), [])

    @defer.inlineCallbacks
    def test_from_header_of_someone_else_refused_after_data(self):
        h = self.harness()
        yield self.login(h)
        h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n"
               b"From: Bob <bob@example.test>\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
        finals = yield h.replies(4)
        self.assertTrue(finals[-1].startswith(b"553 5.7.1"), finals)
        self.assertEqual(h.queue_store.ids(), [])
        self.assertEqual(list(h.queue_store.tmp_dir.iterdir()), [])

    @defer.inlineCallbacks
    def test_sender_and_resent_fields_of_someone_else_refused(self):
        """Sender: and Resent-From: name who sent the message as From: does, and the DKIM
        signature covers them: checked as From: is."""
        h = self.harness()
        yield self.login(h)
        for field in (b"Sender: <bob@example.test>", b"Resent-From: Bob <bob@example.test>",
                      b"Resent-Sender: <bob@example.test>", b"Sender: nobody"):
            h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n"
                   b"From: <alice@example.test>\r\n" + field + b"\r\n\r\nbody\r\n.\r\n")
            finals = yield h.replies(4)
            self.assertTrue(finals[-1].startswith(b"553 5.7.1 Sender:"), (field, finals))
        h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
               b"From: <alice@example.test>\r\nSender: <Sales@example.test>\r\n\r\nb\r\n.\r\n")
        finals = yield h.replies(4)
        self.assertTrue(finals[-1].startswith(b"250"), finals)   # an alias of hers
        self.assertEqual(h.queue_store.ids(), [])

    @defer.inlineCallbacks
    def test_a_from_naming_thousands_of_authors_is_refused_unlooked_up(self):
        """Each address was an accounts lookup in the reactor: 45,000 of them (one's own,
        repeated) held every session for two seconds."""
        h = self.harness()
        yield self.login(h)
        looked_up = []
        may_send_as = h.accounts.may_send_as
        h.accounts.may_send_as = lambda user, a: looked_up.append(a) or may_send_as(user, a)
        for head in (b"From: " + b", ".join([b"<alice@example.test>"] * 2000),
                     b"From: " + b", ".join([b"a%d@example.test" % i for i in range(101)]),
                     b"From: <alice@example.test>\r\nSender: "
                     + b", ".join([b"<alice@example.test>"] * 2000)):
            looked_up.clear()
            h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n"
                   + head + b"\r\n\r\nbody\r\n.\r\n")
            finals = yield h.replies(4)
            self.assertTrue(finals[-1].startswith(b"553 5.7.1 too many addresses"), finals)
            self.assertLessEqual(len(looked_up), 2)   # MAIL FROM's, From:'s
        # the same address twice in From: is looked up once
        looked_up.clear()
        h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
               b"From: <alice@example.test>, Alice <Alice@example.test>\r\n\r\nb\r\n.\r\n")
        finals = yield h.replies(4)
        self.assertTrue(finals[-1].startswith(b"250"), finals)
        self.assertEqual(looked_up, ["alice@example.test"] * 2)   # MAIL FROM's, From:'s

    @defer.inlineCallbacks
    def test_a_from_domain_written_in_unicode_is_signed_with_its_key(self):
        """The key of münchen.test is stored under its IDNA name: a From: naming the
        domain in Unicode went out unsigned."""
        from mailserver.dkim.keys import generate

        h = self.harness()
        h.accounts.add_domain("münchen.test")
        h.accounts.add_user("carol@münchen.test", secret_hash())
        generate(h.context.dkim_dir, "xn--mnchen-3ya.test")
        h.send(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\0carol@xn--mnchen-3ya.test\0secret")
               + b"\r\n")
        replies = yield h.replies(2)
        self.assertTrue(replies[-1].startswith(b"235"), replies)
        h.send(b"MAIL FROM:<carol@xn--mnchen-3ya.test>\r\nRCPT TO:<x@remote.test>\r\nDATA\r\n"
               + "From: Carol <carol@münchen.test>\r\n".encode() + b"\r\nbody\r\n.\r\n")
        finals = yield h.replies(4)
        self.assertTrue(finals[-1].startswith(b"250"), finals)
        [queued] = h.queue_store.ids()
        envelope = json.loads((h.queue_store.env_dir / f"{queued}.json").read_text())
        self.assertIn("d=xn--mnchen-3ya.test", envelope["prefix"])   # sent before the file

    @defer.inlineCallbacks
    def test_bcc_is_taken_out_and_an_obsolete_field_name_is_a_field(self):
        h = self.harness()
        yield self.login(h)
        h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
               b"RCPT TO:<sales@example.test>\r\nDATA\r\n"
               b"Subject : obsolete form\r\nTo: <bob@example.test>\r\n"
               b"Bcc: <sales@example.test>,\r\n <secret@example.test>\r\n"
               b"Resent-Bcc: <x@example.test>\r\nX-After: kept\r\n\r\nbody\r\n.\r\n")
        finals = yield h.replies(5)
        self.assertTrue(finals[-1].startswith(b"250"), finals)
        [bob] = list((h.store.user_path("example.test", "bob") / "new").iterdir())
        data = bob.read_bytes()
        head = data.split(b"\r\n\r\n", 1)[0]
        self.assertNotIn(b"Bcc", head)
        self.assertNotIn(b"secret@", data)
        self.assertIn(b"\r\nSubject : obsolete form\r\nTo: <bob@example.test>\r\n"
                      b"X-After: kept\r\n", head)
        self.assertTrue(data.endswith(b"\r\n\r\nbody\r\n"))

    @defer.inlineCallbacks
    def test_message_rate_per_user(self):
        h = self.harness(messages_per_hour=1)
        yield self.login(h)
        h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
               b"Subject: 1\r\n\r\nx\r\n.\r\n")
        finals = yield h.replies(4)
        self.assertTrue(finals[-1].startswith(b"250"))
        h.send(b"MAIL FROM:<alice@example.test>\r\n")
        self.assertTrue(h.lines()[0].startswith(b"451 4.7.1"))

    @defer.inlineCallbacks
    def test_message_rate_holds_across_parallel_connections(self):
        """Three connections past MAIL at once, two messages an hour: the third message
        is refused as it ends (MAIL's check alone let all three through)."""
        first = self.harness(messages_per_hour=2)
        sessions = [first]
        for _ in range(2):
            other = Harness.__new__(Harness)
            other.proto = SubmissionSession(first.context)
            other.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4322))
            other.proto.makeConnection(other.transport)
            other.lines()
            self.addCleanup(other.proto.connectionLost, None)
            sessions.append(other)
        for h in sessions:
            yield self.login(h)
            h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
            finals = yield h.replies(3)
            self.assertTrue(finals[-1].startswith(b"354"), finals)
        answers = []
        for h in sessions:
            h.send(b"Subject: hi\r\n\r\nx\r\n.\r\n")
            answers.append((yield h.replies(1))[0][:9])
        self.assertEqual(answers, [b"250 2.0.0", b"250 2.0.0", b"451 4.7.1"])
        self.assertEqual(len(list((first.store.user_path("example.test", "bob") / "new")
                                  .iterdir())), 2)


class SASLTests(unittest.TestCase):
    def test_plain(self):
        ex = sasl.exchange_for("plain")
        self.assertIsNone(ex.start(b"\0u@example.test\0pw"))
        self.assertEqual((ex.username, ex.password), ("u@example.test", "pw"))
        ex = sasl.exchange_for("PLAIN")
        self.assertIsNone(ex.start(b"U@example.test\0u@example.test\0pw"))
        for bad in (b"\0\0pw", b"\0u\0", b"a\0b\0c\0d", b"x"):
            with self.assertRaises(sasl.SASLError):
                sasl.exchange_for("PLAIN").start(bad)
        with self.assertRaises(sasl.SASLError) as e:
            sasl.exchange_for("PLAIN").start(b"other@example.test\0u@example.test\0pw")
        self.assertEqual(e.exception.reason, sasl.PROXY)

    def test_login_and_decode(self):
        ex = sasl.exchange_for("LOGIN")
        self.assertEqual(ex.start(None), b"Username:")
        self.assertEqual(ex.step(b"u"), b"Password:")
        self.assertIsNone(ex.step(b"p"))
        self.assertEqual(sasl.decode(b"="), b"")
        with self.assertRaises(sasl.SASLError):
            sasl.decode(b"abc$")
        with self.assertRaises(sasl.SASLError):
            sasl.exchange_for("LOGIN").start(b"x" * 300)
        self.assertIsNone(sasl.exchange_for("CRAM-MD5"))


class RateLimitTests(unittest.TestCase):
    def test_sliding_window(self):
        clock = task.Clock()
        rate = SlidingWindowCounter(2, 3600, clock, max_keys=2)
        rate.record("a")
        rate.record("a")
        self.assertFalse(rate.allowed("a"))
        self.assertTrue(rate.allowed("b"))
        clock.advance(3601)
        self.assertTrue(rate.allowed("a"))
        for key in ("b", "c", "d"):
            rate.record(key)
        self.assertEqual(len(rate._events), 2)
        self.assertTrue(SlidingWindowCounter(0, 3600, clock).allowed("x"))
