"""The SMTP session state machine, driven over StringTransport against a real store."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.config import LimitsConfig
from mailserver.maildir import MaildirStore
from mailserver.passwords import hash_password
from mailserver.smtp.envelope import EnvelopeSyntaxError, parse_command_path
from mailserver.smtp.mx import MXSession
from mailserver.smtp.session import SMTPContext


class Session:
    """A send-and-expect helper around one MXSession."""

    def __init__(self, root: Path, **limits) -> None:
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.store = MaildirStore(root / "maildirs", "mail.example.test")
        self.accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            self.accounts.add_user(f"{user}@example.test", hash_password("x"))
            self.store.create_user("example.test", user)
        context = SMTPContext(hostname="mail.example.test", limits=LimitsConfig(**limits),
                              accounts=self.accounts, store=self.store, tls=None)
        self.proto = MXSession(context)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        self.proto.makeConnection(self.transport)
        self.lines()  # the banner

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lines(self) -> list[bytes]:
        out = self.transport.value().split(b"\r\n")[:-1]
        self.transport.clear()
        return out

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.lines() if line[3:4] == b" "]

    @defer.inlineCallbacks
    def wait_codes(self, count: int):
        """Codes of final reply lines, once `count` of them have arrived (commit is threaded)."""
        got: list[bytes] = []
        for _ in range(500):
            got += self.lines()
            finals = [line for line in got if line[3:4] == b" "]
            if len(finals) >= count:
                return [int(line[:3]) for line in finals], got
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"only got {got!r}")

    def stored(self, user: str = "alice") -> list[bytes]:
        new = self.store.user_path("example.test", user) / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def tmp_files(self, user: str = "alice") -> list[Path]:
        return list((self.store.user_path("example.test", user) / "tmp").iterdir())

    def close(self) -> None:
        self.proto.connectionLost(None)
        self.accounts.close()


class SMTPSessionTests(unittest.TestCase):
    def tmpdir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="smtp-session-"))
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def setUp(self) -> None:
        self.s = Session(self.tmpdir())
        self.addCleanup(lambda: self.s.close())

    def envelope(self, rcpts=(b"alice@example.test",)) -> None:
        self.s.send(b"EHLO client.test\r\nMAIL FROM:<x@remote.test>\r\n"
                    + b"".join(b"RCPT TO:<%s>\r\n" % r for r in rcpts))

    def test_banner_names_host(self):
        t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 1))
        p = MXSession(self.s.proto.context)
        p.makeConnection(t)
        self.assertTrue(t.value().startswith(b"220 mail.example.test ESMTP"))
        p.connectionLost(None)

    def test_ehlo_lists_extensions_without_auth(self):
        self.s.send(b"EHLO client.test\r\n")
        lines = self.s.lines()
        self.assertEqual(lines[0], b"250-mail.example.test")
        keywords = [line[4:].split(b" ")[0] for line in lines[1:]]
        self.assertIn(b"PIPELINING", keywords)
        self.assertIn(b"SIZE", keywords)
        self.assertIn(b"ENHANCEDSTATUSCODES", keywords)
        self.assertIn(b"8BITMIME", keywords)
        self.assertNotIn(b"AUTH", keywords)

    @defer.inlineCallbacks
    def test_postmaster_of_every_local_domain(self):
        """RFC 5321 4.5.1: postmaster (bare, or @ any local domain) reaches someone, even
        where a domain has no postmaster of its own: the first domain's that has one."""
        acc = self.s.accounts
        acc.add_domain("other.test")
        self.s.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster@other.test>\r\n"
                    b"RCPT TO:<postmaster>\r\n")
        self.assertEqual(self.s.codes(), [250, 250, 550, 550])   # nobody has one yet
        acc.add_alias("postmaster@example.test", ["bob@example.test"])
        self.s.send(b"RCPT TO:<PostMaster@other.test>\r\nRCPT TO:<postmaster>\r\n"
                    b"RCPT TO:<postmaster+x@other.test>\r\nRCPT TO:<webmaster@other.test>\r\n"
                    b"DATA\r\n")
        self.assertEqual(self.s.codes(), [250, 250, 550, 550, 354])
        self.s.send(b"Subject: hi\r\n\r\nx\r\n.\r\n")
        codes, _ = yield self.s.wait_codes(1)
        self.assertEqual(codes, [250])
        self.assertEqual(len(self.s.stored("bob")), 1)   # one copy for the two RCPTs
        # A domain's own postmaster wins over the shared one.
        acc.add_alias("postmaster@other.test", ["alice@example.test"])
        self.s.send(b"MAIL FROM:<>\r\nRCPT TO:<postmaster@other.test>\r\nDATA\r\n")
        self.assertEqual(self.s.codes(), [250, 250, 354])
        self.s.send(b"Subject: hi\r\n\r\nx\r\n.\r\n")
        codes, _ = yield self.s.wait_codes(1)
        self.assertEqual(codes, [250])
        self.assertEqual((len(self.s.stored("alice")), len(self.s.stored("bob"))), (1, 1))

    def test_sequence_errors(self):
        self.s.send(b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(self.s.codes(), [503])
        self.s.send(b"EHLO c\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(self.s.codes(), [250, 503, 503])
        self.s.send(b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n")
        self.assertEqual(self.s.codes(), [250, 503, 503])

    def test_recipient_policy(self):
        self.s.send(b"EHLO c\r\nMAIL FROM:<>\r\n")
        self.s.lines()
        cases = {
            b"alice@example.test": 250,
            b"ALICE@Example.TEST": 250,
            b"alice+news@example.test": 250,
            b"nobody@example.test": 550,
            b"someone@other.test": 554,
            b"user%other.test@example.test": 554,
            b"@example.test:user@other.test": 554,
            b'"user@other.test"@example.test': 554,
            b"user@other.test@example.test": 554,
            b"other.test!user@example.test": 554,
            b"other.test!user": 554,
        }
        for rcpt, code in cases.items():
            self.s.send(b"RCPT TO:<" + rcpt + b">\r\n")
            lines = self.s.lines()
            self.assertEqual(int(lines[-1][:3]), code, (rcpt, lines))
            if code == 554:
                self.assertIn(b"5.7.1", lines[-1])
            if code == 550:
                self.assertIn(b"5.1.1", lines[-1])

    def test_too_many_recipients(self):
        self.s.close()
        self.s = Session(self.tmpdir(), max_recipients=2)
        self.s.send(b"EHLO c\r\nMAIL FROM:<>\r\n")
        self.s.lines()
        self.s.send(b"RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                    b"RCPT TO:<alice+x@example.test>\r\n")
        lines = self.s.lines()
        self.assertEqual([int(x[:3]) for x in lines], [250, 250, 452])
        self.assertIn(b"4.5.3", lines[-1])

    def test_mail_size_parameter(self):
        self.s.send(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=999999999999\r\n"
                    b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME\r\n"
                    b"RCPT TO:<alice@example.test> NOTIFY=NEVER\r\n")
        lines = self.s.lines()
        self.assertTrue(lines[-3].startswith(b"552 5.3.4"), lines)
        self.assertTrue(lines[-2].startswith(b"250"))
        self.assertTrue(lines[-1].startswith(b"555"))

    def test_body_parameter_values(self):
        """RFC 6152: 7BIT and 8BITMIME; BINARYMIME (RFC 3030, not offered) and other
        values are parameters not implemented (555), a BODY without a value a syntax
        error."""
        self.s.send(b"EHLO c\r\n")
        self.s.lines()
        for param, code in ((b"BODY=7bit", 250), (b"BODY=BINARYMIME", 555),
                            (b"BODY=X-OTHER", 555), (b"BODY", 501)):
            self.s.send(b"MAIL FROM:<a@b.test> " + param + b"\r\nRSET\r\n")
            self.assertEqual(self.s.codes(), [code, 250], param)

    @defer.inlineCallbacks
    def test_a_message_that_passed_too_many_hosts_is_refused(self):
        """RFC 5321 6.3: over 100 Received: fields is a loop (two servers forwarding
        to each other): 554 5.4.6 and nothing stored.  Fields in the body do not count,
        nor do 100 in the header."""
        from mailserver.smtp.session import MAX_HOPS
        hop = b"Received: from a.example by b.example; Thu, 3 Dec 2026 10:00:00 +0000\r\n"
        cases = ((hop * (MAX_HOPS + 1) + b"Subject: loop\r\n\r\nbody\r\n", 554),
                 (hop * MAX_HOPS + b"Subject: ok\r\n\r\nbody\r\n", 250),
                 (b"Subject: quoted\r\n\r\n" + hop * (MAX_HOPS + 5), 250),
                 (b"Subject: s\r\n" + b"rEcEiVeD : x\r\n" * (MAX_HOPS + 1) + b"\r\nb\r\n",
                  554))
        self.s.send(b"EHLO c\r\n")
        self.s.lines()
        for data, code in cases:
            self.s.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                        b"DATA\r\n")
            for i in range(0, len(data), 700):   # in pieces: the header spans reads
                self.s.send(data[i:i + 700])
            self.s.send(b".\r\n")
            codes, lines = yield self.s.wait_codes(4)
            self.assertEqual(codes[-1], code, lines)
            if code == 554:
                self.assertIn(b"5.4.6", lines[-1])
        self.assertEqual(len(self.s.stored()), 2)

    def test_null_recipient_is_a_syntax_error(self):
        self.s.send(b"EHLO c\r\nMAIL FROM:<>\r\n")
        self.s.lines()
        self.s.send(b"RCPT TO:<>\r\n")
        self.assertEqual(self.s.lines(), [b"501 5.1.3 Bad recipient address syntax"])

    @defer.inlineCallbacks
    def test_source_routes_are_ignored(self):
        """RFC 5321 3.3: a source route is accepted and ignored: the reverse-path stored
        is the mailbox alone, a route to a local mailbox delivers there, a route to a
        remote one is still no relay, a malformed route is a syntax error."""
        self.s.send(b"EHLO c\r\nMAIL FROM:<@a.example,@[IPv6:2001:db8::1]:x@remote.test>\r\n")
        self.s.lines()
        for rcpt, code in ((b"<@relay.test:someone@other.test>", 554), (b"<@:a@b.test>", 501),
                           (b"<@relay.test:>", 501), (b"<@relay.test,alice@example.test>", 501),
                           (b"<@[IPv6:2001:db8::1]:someone@other.test>", 554),
                           (b"<@[IPv6:2001:db8::1],@[192.0.2.1]:alice@example.test>", 250),
                           (b"<@relay.test:alice@example.test>", 250)):
            self.s.send(b"RCPT TO:" + rcpt + b"\r\n")
            self.assertEqual(self.s.codes(), [code], rcpt)
        self.s.send(b"DATA\r\nSubject: r\r\n\r\nbody\r\n.\r\n")
        codes, _ = yield self.s.wait_codes(2)
        self.assertEqual(codes, [354, 250])
        [msg] = self.s.stored()
        self.assertTrue(msg.startswith(b"Return-Path: <x@remote.test>\r\n"), msg[:80])

    def test_bare_lf_in_command_closes(self):
        self.s.send(b"EHLO c\nMAIL FROM:<a@b.test>\r\n")
        lines = self.s.lines()
        self.assertEqual(lines, [b"521 5.5.2 Error: bare <LF> received"])
        self.assertTrue(self.s.transport.disconnecting)

    def test_bare_cr_in_command_closes(self):
        self.s.send(b"EHLO c\rX\r\n")
        self.assertEqual(self.s.codes(), [521])
        self.assertTrue(self.s.transport.disconnecting)

    def test_long_command_line_then_continue(self):
        self.s.send(b"EHLO " + b"x" * 5000 + b"\r\nNOOP\r\n")
        self.assertEqual(self.s.codes(), [500, 250])
        # And a long line arriving in pieces.
        self.s.send(b"X" * 3000)
        self.s.send(b"X" * 3000)
        self.s.send(b"X" * 3000 + b"\r\nNOOP\r\n")
        self.assertEqual(self.s.codes(), [500, 250])
        self.assertFalse(self.s.transport.disconnecting)

    def test_non_ascii_command_is_unknown(self):
        self.s.send(b"\xff\xfe\r\nNOOP\r\n")
        self.assertEqual(self.s.codes(), [502, 250])

    @defer.inlineCallbacks
    def test_message_stored_with_trace_headers(self):
        self.envelope()
        self.s.send(b"DATA\r\n")
        self.assertEqual(self.s.codes()[-1], 354)
        self.s.send(b"Subject: t\r\n\r\n..leading dot\r\n.x\r\nend\r\n.\r\n")
        codes, lines = yield self.s.wait_codes(1)
        self.assertEqual(codes, [250])
        [msg] = self.s.stored()
        head, _, body = msg.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"Return-Path: <x@remote.test>\r\n"
                                        b"Delivered-To: alice@example.test\r\nReceived: from "))
        self.assertIn(b"by mail.example.test", head)
        self.assertIn(b"Subject: t", head)
        self.assertEqual(body, b".leading dot\r\nx\r\nend\r\n")

    @defer.inlineCallbacks
    def test_message_fed_byte_by_byte_and_in_random_chunks(self):
        body = b"".join(b"line %d %s\r\n" % (i, b"." * (i % 3)) for i in range(200))
        body += b".\r\n..\r\n.. .\r\n"
        wire = b"Subject: chunks\r\n\r\n" + body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        expected = b"Subject: chunks\r\n\r\n" + body
        rng = random.Random(7)
        for feed in ("bytes", "random"):
            self.envelope()
            self.s.send(b"DATA\r\n")
            self.s.lines()
            if feed == "bytes":
                for i in range(len(wire)):
                    self.s.send(wire[i:i + 1])
            else:
                pos = 0
                while pos < len(wire):
                    n = rng.randint(1, 40)
                    self.s.send(wire[pos:pos + n])
                    pos += n
            codes, _ = yield self.s.wait_codes(1)
            self.assertEqual(codes, [250])
        stored = self.s.stored()
        self.assertEqual(len(stored), 2)
        for msg in stored:
            self.assertTrue(msg.endswith(expected), msg[-200:])

    @defer.inlineCallbacks
    def test_pipelined_transactions_answered_in_order(self):
        wire = b"".join(
            b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nDATA\r\nSubject: %d\r\n\r\nhi\r\n.\r\n" % i
            for i in range(3))
        self.s.send(b"EHLO c\r\n")
        self.s.lines()
        self.s.send(wire + b"QUIT\r\n")
        codes, _ = yield self.s.wait_codes(16)
        self.assertEqual(codes, [250, 250, 550, 354, 250] * 3 + [221])
        self.assertEqual(len(self.s.stored()), 3)

    @defer.inlineCallbacks
    def test_several_recipients_one_copy_each_without_delivered_to(self):
        self.envelope((b"alice@example.test", b"bob@example.test", b"alice+dup@example.test"))
        self.s.send(b"DATA\r\nSubject: many\r\n\r\nhello\r\n.\r\n")
        codes, _ = yield self.s.wait_codes(7)
        self.assertEqual(codes[-1], 250)
        [a] = self.s.stored("alice")
        [b] = self.s.stored("bob")
        self.assertEqual(a, b)
        self.assertNotIn(b"Delivered-To", a)

    def test_oversize_message_refused_and_nothing_stored(self):
        self.s.close()
        self.s = Session(self.tmpdir(), max_message_size=1000)
        self.envelope()
        self.s.send(b"DATA\r\n")
        self.s.lines()
        for _ in range(30):
            self.s.send(b"x" * 98 + b"\r\n")
        self.s.send(b".\r\n")
        lines = self.s.lines()
        self.assertTrue(lines[-1].startswith(b"552 5.3.4"), lines)
        self.assertEqual(self.s.stored(), [])
        self.assertEqual(self.s.tmp_files(), [])

    @defer.inlineCallbacks
    def test_a_message_of_exactly_the_limit_without_a_header_is_taken(self):
        # the empty header section added in front of a headless message is no octet of
        # the client's: counted, 1000 octets became 1002 and were refused (RFC 1870)
        self.s.close()
        self.s = Session(self.tmpdir(), max_message_size=1000)
        self.envelope()
        self.s.send(b"DATA\r\n")
        self.s.lines()
        self.s.send(b"x" * 998 + b"\r\n.\r\n")
        codes, _ = yield self.s.wait_codes(1)
        self.assertEqual(codes, [250])
        self.s.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.s.lines()
        self.s.send(b"x" * 999 + b"\r\n.\r\n")   # one more is over
        lines = self.s.lines()
        self.assertTrue(lines[-1].startswith(b"552 5.3.4"), lines)

    def test_long_data_line_refused(self):
        self.s.close()
        self.s = Session(self.tmpdir(), max_line_length=100)
        self.envelope()
        self.s.send(b"DATA\r\nSubject: x\r\n\r\n" + b"y" * 50 + b"\r\n")
        self.s.send(b"z" * 150)
        self.s.send(b"z" * 150 + b"\r\nok\r\n.\r\nNOOP\r\n")
        lines = self.s.lines()
        self.assertTrue(lines[-2].startswith(b"500 5.5.2"), lines)
        self.assertTrue(lines[-1].startswith(b"250"), lines)
        self.assertEqual(self.s.stored(), [])
        self.assertEqual(self.s.tmp_files(), [])

    def test_no_end_of_data_smuggled_after_a_long_line(self):
        """SMTP smuggling (CVE-2023-51764 class): the LF ending an over-long data line
        without its CR, then ".<CR><LF>", ended the data, and the rest ran as a second
        transaction that was delivered.  Such endings are refused as in any line."""
        smuggled = (b".\r\nMAIL FROM:<ceo@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
                    b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
        for pieces in ([b"z" * 300 + b"\n" + smuggled],                     # one read
                       [b"z" * 300, b"\n" + smuggled],                     # LF read apart
                       [b"z" * 300 + b"\r", b"x\n" + smuggled],            # a bare CR
                       [b"z" * 150 + b"\rz" * 100 + b"\r\n.\r\n"]):        # CR inside
            self.s.close()
            self.s = Session(self.tmpdir(), max_line_length=100)
            self.envelope()
            self.s.send(b"DATA\r\nSubject: x\r\n\r\n")
            for piece in pieces:
                self.s.send(piece)
            lines = self.s.lines()
            self.assertTrue(lines[-1].startswith(b"521"), (pieces, lines))
            self.assertTrue(self.s.transport.disconnecting)
            self.assertEqual(self.s.stored(), [])
        # The CR and LF of a long line's CRLF read apart: a long line, not smuggling.
        self.s.close()
        self.s = Session(self.tmpdir(), max_line_length=100)
        self.envelope()
        self.s.send(b"DATA\r\nSubject: x\r\n\r\n" + b"z" * 300 + b"\r")
        self.s.send(b"\nok\r\n.\r\nNOOP\r\n")
        lines = self.s.lines()
        self.assertTrue(lines[-2].startswith(b"500 5.5.2"), lines)
        self.assertTrue(lines[-1].startswith(b"250"), lines)

    def test_auth_is_not_offered_on_the_mx(self):
        self.s.send(b"EHLO client.test\r\n")
        self.assertNotIn(b"AUTH", b"".join(self.s.lines()))
        for line in (b"AUTH\r\n", b"AUTH PLAIN\r\n", b"AUTH PLAIN AGFsaWNlAHg=\r\n",
                     b"auth login\r\n"):
            self.s.send(line)
            self.assertEqual(self.s.lines(), [b"503 5.5.1 Error: authentication not enabled"],
                             line)
        self.assertFalse(self.s.transport.disconnecting)
        self.s.send(b"NOOP\r\n")
        self.assertEqual(self.s.codes(), [250])
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_long_data_line_found_anywhere_in_one_read(self):
        """Many lines in one read: lines up to the limit pass wherever they are, one line
        over it is found after the others (the check looks at line starts only)."""
        self.s.close()
        self.s = Session(self.tmpdir(), max_line_length=100)
        self.envelope()
        full = (b"w" * 100 + b"\r\n") * 20
        self.s.send(b"DATA\r\nSubject: x\r\n\r\n" + full + b".\r\n")
        codes, _ = yield self.s.wait_codes(5)      # EHLO MAIL RCPT DATA, the message
        self.assertEqual(codes, [250, 250, 250, 354, 250])
        self.assertEqual(len(self.s.stored()), 1)
        self.s.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                    b"DATA\r\nSubject: y\r\n\r\n" + full + b"v" * 101 + b"\r\n" + full
                    + b".\r\nNOOP\r\n")
        codes, _ = yield self.s.wait_codes(5)
        self.assertEqual(codes, [250, 250, 354, 500, 250])
        self.assertEqual(len(self.s.stored()), 1)

    def test_bare_lf_in_data_refused(self):
        self.envelope()
        self.s.send(b"DATA\r\nSubject: x\r\n\r\nhello\n.\nmore\r\n")
        self.assertEqual(self.s.lines()[-1], b"521 5.5.2 Error: bare <LF> received")
        self.assertTrue(self.s.transport.disconnecting)
        self.assertEqual(self.s.stored(), [])
        self.assertEqual(self.s.tmp_files(), [])

    def test_bare_cr_in_data_refused(self):
        self.envelope()
        self.s.send(b"DATA\r\nSubject: x\r\n\r\nhel\rlo\r\n.\r\n")
        self.assertEqual(self.s.lines()[-1][:3], b"521")
        self.assertEqual(self.s.stored(), [])

    def test_connection_lost_mid_data_leaves_nothing(self):
        self.envelope()
        self.s.send(b"DATA\r\nSubject: x\r\n\r\n" + b"a" * 100000 + b"\r\n")
        self.s.proto.connectionLost(None)
        self.assertEqual(self.s.stored(), [])
        self.assertEqual(self.s.tmp_files(), [])

    @defer.inlineCallbacks
    def test_message_without_headers_gets_empty_header_section(self):
        self.envelope()
        self.s.send(b"DATA\r\nno headers here\r\n.\r\n")
        codes, _ = yield self.s.wait_codes(5)
        self.assertEqual(codes[-1], 250)
        [msg] = self.s.stored()
        self.assertTrue(msg.endswith(b"\r\n\r\nno headers here\r\n"))

    def on_clock_after_ehlo(self) -> task.Clock:
        """The session's timers on a fake clock, its EHLO answered."""
        clock = task.Clock()
        self.s.proto.setTimeout(None)
        self.s.proto.callLater = clock.callLater
        self.s.proto.setTimeout(self.s.proto.timeout)
        self.s.send(b"EHLO c\r\n")
        self.s.lines()
        return clock

    def test_replies_the_client_does_not_take_hold_the_input(self):
        """Pipelined NOOPs whose replies are never read: past 64 KB of replies the next
        command waits for the client, and a client that never reads is timed out."""
        from mailserver.streaming import OUTPUT_BURST
        clock = self.on_clock_after_ehlo()
        self.s.send(b"NOOP\r\n" * 20000)
        written = self.s.transport.value()
        self.assertLess(len(written), OUTPUT_BURST + 4096)
        self.assertIsNotNone(self.s.transport.producer)   # waiting for the client
        for _ in range(int(self.s.proto.timeout) // 10 + 20):   # it never reads: after
            clock.advance(10)                             # its input, it is timed out
        self.assertTrue(self.s.transport.disconnecting)
        clock.advance(60)                                 # and, taking nothing, aborted
        self.assertTrue(self.s.transport.disconnected)

    def test_input_while_paused_is_kept_then_bounded(self):
        """While a commit (or a password check) is pending, input is kept and handled
        afterwards; past PAUSED_BUFFER_MAX the transport stops reading, and the idle
        timeout does not end the session for our own wait."""
        from mailserver.smtp.session import PAUSED_BUFFER_MAX

        clock = self.on_clock_after_ehlo()
        self.s.proto._pause()
        self.s.send(b"NOOP\r\n")
        self.assertEqual(self.s.lines(), [])
        self.assertEqual(self.s.transport.producerState, "producing")
        clock.advance(301)
        self.assertFalse(self.s.transport.disconnecting)
        self.s.send(b"NOOP\r\n" * (PAUSED_BUFFER_MAX // 6 + 1))
        self.assertEqual(self.s.transport.producerState, "paused")
        self.s.proto._resume()
        self.assertEqual(self.s.transport.producerState, "producing")
        codes = self.s.codes()
        while self.s.transport.producer is not None:   # the client takes the replies
            self.s.transport.producer.resumeProducing()
            codes += self.s.codes()
        self.assertEqual(set(codes), {250})
        self.assertEqual(len(codes), PAUSED_BUFFER_MAX // 6 + 2)
        clock.advance(301)
        self.assertTrue(self.s.transport.disconnecting)

    def test_idle_timeout(self):
        clock = task.Clock()
        self.s.proto.setTimeout(None)
        self.s.proto.callLater = clock.callLater
        self.s.proto.setTimeout(self.s.proto.timeout)
        clock.advance(301)
        self.assertTrue(self.s.lines()[-1].startswith(b"421 4.4.2"))
        self.assertTrue(self.s.transport.disconnecting)


class EnvelopeParsingTests(unittest.TestCase):
    def test_paths_and_params(self):
        self.assertEqual(parse_command_path(b"FROM:<a@b.test>", "FROM"), ("a@b.test", {}))
        self.assertEqual(parse_command_path(b"from: <> SIZE=10 body=8BITMIME", "FROM"),
                         ("", {"SIZE": "10", "BODY": "8BITMIME"}))
        self.assertEqual(parse_command_path(b'TO:<"a b>c"@d.test>', "TO"),
                         ('"a b>c"@d.test', {}))
        self.assertEqual(parse_command_path(b"TO:bare@d.test", "TO"), ("bare@d.test", {}))

    def test_errors(self):
        for bad in (b"FROM<a@b>", b"FROM:<a@b", b"FROM:<a@b>junk", b"FROM:<a\x01@b>",
                    b"FROM:<\xff@b>", b"FROM:<a@b> SIZE=1 SIZE=2", b"FROM:<a@b> =x"):
            with self.assertRaises(EnvelopeSyntaxError, msg=bad):
                parse_command_path(bad, "FROM")
