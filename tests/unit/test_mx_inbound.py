"""The MX session with inbound checks, over StringTransport against a real store: the
held banner and pregreet refusal, HELO garbage, the per-session RCPT and error limits,
blocklists, and a message's way through the checks into INBOX, Junk or a refusal
(DNS from a fixed table)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.config import InboundConfig, LimitsConfig
from mailserver.inbound import dnsbl
from mailserver.inbound.checker import InboundChecker
from mailserver.inbound.dns import Answer, StaticResolver
from mailserver.inbound.junk import JunkFolders
from mailserver.inbound.rspamd import SpamVerdict
from mailserver.inbound.workers import WorkerFailed
from mailserver.maildir import MaildirStore
from mailserver.passwords import hash_password
from mailserver.smtp.mx import MXSession
from mailserver.smtp.session import SMTPContext, received_helo
from tests.unit import test_smtp_session as smtp_session

HOST = "mail.example.test"
CHECKS = InboundConfig(trusted_networks=(), greet_delay=0.0)

ZONE = {
    ("good.example", "TXT"): Answer("ok", (b"v=spf1 ip4:192.0.2.7 -all",)),
    ("_dmarc.good.example", "TXT"): Answer("ok", (b"v=DMARC1; p=reject",)),
    ("bad.example", "TXT"): Answer("ok", (b"v=spf1 ip4:198.51.100.1 -all",)),
    ("_dmarc.bad.example", "TXT"): Answer("ok", (b"v=DMARC1; p=reject",)),
    ("shady.example", "TXT"): Answer("ok", (b"v=spf1 -all",)),
    ("_dmarc.shady.example", "TXT"): Answer("ok", (b"v=DMARC1; p=quarantine",)),
    # signs with a key whose lookup times out; its SPF does not pass for 192.0.2.7
    ("slow.example", "TXT"): Answer("ok", (b"v=spf1 -all",)),
    ("_dmarc.slow.example", "TXT"): Answer("ok", (b"v=DMARC1; p=reject",)),
    ("sel._domainkey.slow.example", "TXT"): Answer("error", (), "timeout"),
    # a lame delegation: the subdomain's DMARC lookup times out, good.example's says reject
    ("_dmarc.lame.good.example", "TXT"): Answer("error", (), "timeout"),
    ("7.2.0.192.bl.example", "A"): Answer("ok", ("127.0.0.2",)),
    ("8.2.0.192.bl.example", "A"): Answer("ok", ("127.255.255.254",)),
}


def message(sender: str, subject: str = "hi") -> bytes:
    return (f"From: <{sender}>\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Authentication-Results: {HOST}; dkim=pass header.d=forged.example\r\n"
            f"Authentication-Results: other.example; spf=pass\r\n\r\nbody\r\n").encode()


def spooled(s: "Session") -> list[str]:
    """Files left in the spool directory (none: small messages never go there)."""
    return os.listdir(s.spool_dir) if s.spool_dir.exists() else []


class Session(smtp_session.Session):
    """test_smtp_session's send-and-expect helper, with inbound checks on."""

    def __init__(self, root: Path, inbound: InboundConfig = CHECKS, ip: str = "192.0.2.7",
                 rspamd: object = None, run_in_thread: Any = None, **limits) -> None:
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.store = MaildirStore(root / "maildirs", HOST)
        self.accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            self.accounts.add_user(f"{user}@example.test", hash_password("x"))
            self.store.create_user("example.test", user)
        self.resolver = StaticResolver(ZONE)
        checker = InboundChecker(inbound, HOST, self.resolver, rspamd=rspamd,
                                 run_in_thread=run_in_thread or (
                                     lambda f, *a: defer.maybeDeferred(f, *a)))
        context = SMTPContext(hostname=HOST, limits=LimitsConfig(**limits),
                              accounts=self.accounts, store=self.store, tls=None)
        context.checker, context.junk = checker, JunkFolders(self.store)
        context.spool_dir = root / "var" / "inbound"
        self.spool_dir = context.spool_dir
        self.proto = MXSession(context)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 4321))
        self.proto.makeConnection(self.transport)

    def files(self, user: str = "alice", folder: str = "") -> list[Path]:
        base = self.store.user_path("example.test", user)
        if folder:
            base = base / f".{folder}"
        return sorted(p for sub in ("new", "cur") if (base / sub).is_dir()
                      for p in (base / sub).iterdir())


class MXInboundTests(unittest.TestCase):
    def session(self, **kw) -> Session:
        root = Path(tempfile.mkdtemp(prefix="mx-inbound-"))
        self.addCleanup(shutil.rmtree, root, True)
        s = Session(root, **kw)
        self.addCleanup(s.close)
        return s

    @defer.inlineCallbacks
    def transaction(self, s: Session, sender: str, data: bytes):
        s.send(b"EHLO client.example\r\nMAIL FROM:<%s>\r\nRCPT TO:<alice@example.test>\r\n"
               b"DATA\r\n" % sender.encode())
        codes, _ = yield s.wait_codes(4)
        self.assertEqual(codes, [250, 250, 250, 354])
        s.send(data + b".\r\n")
        codes, lines = yield s.wait_codes(1)
        return codes[0], lines

    # -- the banner ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_banner_is_held_and_a_client_talking_first_is_refused(self):
        s = self.session(inbound=replace(CHECKS, greet_delay=0.05))
        self.assertEqual(s.lines(), [])
        s.send(b"EHLO eager.example\r\n")
        self.assertEqual(s.lines()[0][:3], b"554")
        self.assertTrue(s.transport.disconnecting or s.proto._closing)
        patient = self.session(inbound=replace(CHECKS, greet_delay=0.05))
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(patient.lines()[0].startswith(b"220 " + HOST.encode()))
        patient.send(b"EHLO patient.example\r\n")
        self.assertEqual(patient.lines()[0][:3], b"250")

    def test_trusted_network_gets_the_banner_at_once_and_no_checks(self):
        s = self.session(inbound=replace(CHECKS, greet_delay=5.0,
                                         trusted_networks=("192.0.2.0/24",)))
        self.assertTrue(s.lines()[0].startswith(b"220 "))
        self.assertFalse(s.proto._checks)

    # -- HELO ---------------------------------------------------------------------------

    def test_helo_garbage_refused_and_session_goes_on(self):
        s = self.session()
        s.lines()
        for bad in (b"EHLO a\x00b\r\n", b"EHLO a\x01b\r\n", b"EHLO \xff\xfe\r\n",
                    b"HELO a\x7fb\r\n"):
            s.send(bad)
            self.assertEqual(s.lines()[0][:3], b"501", bad)
        s.send(b"EHLO fine.example\r\n")
        self.assertEqual(s.lines()[0][:3], b"250")

    def test_received_helo_is_a_sanitized_domain_or_literal(self):
        self.assertEqual(received_helo("mx.example.org"), "mx.example.org")
        self.assertEqual(received_helo("[192.0.2.1]"), "[192.0.2.1]")
        self.assertEqual(received_helo("[IPv6:2001:db8::1]"), "[IPv6:2001:db8::1]")
        self.assertEqual(received_helo("[not.an.ip]"), "not.an.ip")
        self.assertEqual(received_helo("foo_bar(x)"), "foo-bar-x")
        self.assertEqual(received_helo("é"), "unknown")
        self.assertEqual(received_helo(";;"), "unknown")

    # -- abuse limits -------------------------------------------------------------------

    def test_too_many_rcpt_commands_closes_with_421(self):
        s = self.session(max_rcpt_commands=3)
        s.lines()
        s.send(b"EHLO c.example\r\nMAIL FROM:<x@good.example>\r\n")
        s.send(b"RCPT TO:<alice@example.test>\r\n" * 2 + b"RCPT TO:<nobody@example.test>\r\n")
        self.assertEqual([l[:3] for l in s.lines()][-3:], [b"250", b"250", b"550"])
        s.send(b"RCPT TO:<bob@example.test>\r\n")
        self.assertEqual(s.lines()[-1][:3], b"421")
        self.assertTrue(s.proto._closing)

    def test_too_many_errors_closes_with_421(self):
        s = self.session(max_command_errors=2)
        s.lines()
        s.send(b"BOGUS\r\nRCPT TO:<a@b>\r\n")
        self.assertEqual([l[:3] for l in s.lines()], [b"502", b"503"])
        s.send(b"BOGUS\r\n")
        self.assertEqual([l[:3] for l in s.lines()], [b"421"])
        self.assertTrue(s.proto._closing)

    # -- blocklists ---------------------------------------------------------------------

    def test_query_names_and_answer_codes(self):
        self.assertEqual(dnsbl.query_name("192.0.2.99", "zen.example"),
                         "99.2.0.192.zen.example")
        self.assertEqual(dnsbl.query_name("::ffff:192.0.2.99", "zen.example"),
                         "99.2.0.192.zen.example")
        self.assertEqual(dnsbl.query_name("2001:db8:1:2:3:4:567:89ab", "bl.example"),
                         "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
                         ".bl.example")
        self.assertEqual(dnsbl.interpret(("127.0.0.2",)), "127.0.0.2")
        self.assertIsNone(dnsbl.interpret(("127.0.0.1",)))
        self.assertIsNone(dnsbl.interpret(("127.255.255.254",)))
        self.assertIsNone(dnsbl.interpret(("192.0.2.1", "garbage")))

    @defer.inlineCallbacks
    def test_listed_client_gets_banner_and_ehlo_but_rcpt_refused(self):
        s = self.session(inbound=replace(CHECKS, dnsbl=("bl.example",)))
        self.assertEqual(s.lines()[0][:3], b"220")
        s.send(b"EHLO c.example\r\nMAIL FROM:<x@good.example>\r\nRCPT TO:<alice@example.test>\r\n")
        codes, lines = yield s.wait_codes(3)
        self.assertEqual(codes, [250, 250, 554])
        self.assertIn(b"bl.example", lines[-1])

    @defer.inlineCallbacks
    def test_error_code_answer_is_not_a_listing(self):
        s = self.session(inbound=replace(CHECKS, dnsbl=("bl.example",)), ip="192.0.2.8")
        s.lines()
        s.send(b"EHLO c.example\r\nMAIL FROM:<x@x.example>\r\nRCPT TO:<alice@example.test>\r\n")
        codes, _ = yield s.wait_codes(3)
        self.assertEqual(codes, [250, 250, 250])

    # -- messages -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_spf_pass_delivered_with_our_results_and_forged_ones_removed(self):
        s = self.session()
        s.lines()
        code, _ = yield self.transaction(s, "x@good.example", message("x@good.example"))
        self.assertEqual(code, 250)
        [path] = s.files()
        data = path.read_bytes()
        head = data.split(b"\r\n\r\n")[0]
        self.assertIn(b"Authentication-Results: " + HOST.encode() + b";", head)
        self.assertIn(b"spf=pass", head)
        self.assertIn(b"dmarc=pass", head)
        self.assertNotIn(b"forged.example", head)
        self.assertIn(b"Authentication-Results: other.example; spf=pass", head)
        self.assertLess(head.index(b"Authentication-Results: " + HOST.encode()),
                        head.index(b"Received:"))
        self.assertEqual(spooled(s), [])

    @defer.inlineCallbacks
    def test_dmarc_reject_refuses_and_stores_nothing(self):
        s = self.session()
        s.lines()
        code, lines = yield self.transaction(s, "x@bad.example", message("ceo@bad.example"))
        self.assertEqual(code, 550)
        self.assertIn(b"5.7.1", lines[-1])
        self.assertEqual(s.files(), [])
        self.assertEqual(spooled(s), [])
        # the session goes on
        s.send(b"NOOP\r\n")
        codes, _ = yield s.wait_codes(1)
        self.assertEqual(codes, [250])

    @defer.inlineCallbacks
    def test_dmarc_temperror_is_try_again_later_not_a_refusal(self):
        """p=reject, SPF fails, and the aligned signature's key lookup timed out: no
        proof either way, so 451 (the sender tries again), and nothing stored."""
        s = self.session()
        s.lines()
        signed = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=slow.example;"
                  b" s=sel; h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;"
                  b" b=AAAA\r\n" + message("ceo@slow.example"))
        code, lines = yield self.transaction(s, "x@slow.example", signed)
        self.assertEqual(code, 451)
        self.assertIn(b"4.7.1", lines[-1])
        self.assertEqual(s.files(), [])
        # the same without the signature: a plain DMARC failure, refused for good
        code, _ = yield self.transaction(s, "x@slow.example", message("ceo@slow.example"))
        self.assertEqual(code, 550)

    @defer.inlineCallbacks
    def test_dmarc_record_lookup_failure_defers_what_passes_nothing_aligned(self):
        """The From domain's _dmarc lookup times out: a message with no SPF or DKIM pass
        of that organization is asked to come back (451) instead of landing in INBOX;
        one with an aligned SPF pass is delivered with dmarc=temperror."""
        s = self.session()
        s.lines()
        code, lines = yield self.transaction(s, "x@bad.example", message("ceo@lame.good.example"))
        self.assertEqual(code, 451)
        self.assertIn(b"4.7.1", lines[-1])
        self.assertEqual(s.files(), [])
        code, _ = yield self.transaction(s, "x@good.example", message("ceo@lame.good.example"))
        self.assertEqual(code, 250)
        [path] = s.files()
        self.assertIn(b"dmarc=temperror", path.read_bytes())
        # Not enforced: recorded, delivered.
        lax = self.session(inbound=replace(CHECKS, dmarc_enforce=False))
        lax.lines()
        code, _ = yield self.transaction(lax, "x@bad.example", message("ceo@lame.good.example"))
        self.assertEqual(code, 250)
        [path] = lax.files()
        self.assertIn(b"policy unknown", path.read_bytes())

    @defer.inlineCallbacks
    def test_verification_that_cannot_finish_is_try_again_later(self):
        """The DKIM worker gave no answer (stuck, killed): a p=reject sender without an
        aligned SPF pass is asked to come back, one with it is delivered."""
        def broken(function, *args):
            return defer.fail(WorkerFailed("no answer in 60 s"))
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = self.session(run_in_thread=broken)
        s.lines()
        signed = b"DKIM-Signature: v=1; d=bad.example; s=s; b=AAAA\r\n" + message(
            "ceo@bad.example")
        code, _ = yield self.transaction(s, "x@bad.example", signed)
        self.assertEqual(code, 451)
        self.assertEqual(s.files(), [])
        signed = b"DKIM-Signature: v=1; d=good.example; s=s; b=AAAA\r\n" + message(
            "x@good.example")
        code, _ = yield self.transaction(s, "x@good.example", signed)
        self.assertEqual(code, 250)
        [path] = s.files()
        self.assertIn(b"dkim=temperror", path.read_bytes())
        self.flushLoggedErrors(WorkerFailed)
        logged = "\n".join(formatEvent(e) for e in events)
        self.assertIn("DKIM/ARC verification of a message of", logged)
        self.assertNotIn("ceo@bad.example", logged)   # its size is logged, not its text

    @defer.inlineCallbacks
    def test_dmarc_reject_only_recorded_when_not_enforced(self):
        s = self.session(inbound=replace(CHECKS, dmarc_enforce=False))
        s.lines()
        code, _ = yield self.transaction(s, "x@bad.example", message("ceo@bad.example"))
        self.assertEqual(code, 250)
        [path] = s.files()
        self.assertIn(b"dmarc=fail", path.read_bytes())

    @defer.inlineCallbacks
    def test_quarantine_goes_to_junk_with_the_junk_keyword(self):
        s = self.session()
        s.lines()
        junk = s.store.user_path("example.test", "alice") / ".Junk"
        shutil.rmtree(junk)  # the user deleted it: it is made again
        code, _ = yield self.transaction(s, "x@shady.example", message("x@shady.example"))
        self.assertEqual(code, 250)
        self.assertEqual(s.files(), [])
        [path] = s.files(folder="Junk")
        letters = path.name.rpartition(":2,")[2]
        table = dict(line.split(" ", 1) for line in
                     (junk / "dovecot-keywords").read_text().splitlines())
        self.assertEqual([table[str(ord(c) - ord("a"))] for c in letters], ["$Junk"])
        # a second one reuses the prepared folder and letter
        code, _ = yield self.transaction(s, "x@shady.example", message("x@shady.example"))
        self.assertEqual(len(s.files(folder="Junk")), 2)

    @defer.inlineCallbacks
    def test_junk_folder_that_cannot_be_made_is_try_again_later(self):
        """Quarantined mail never falls back to INBOX: a file where Junk should be gives
        451 and nothing stored; once the folder can be made, it is delivered there."""
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = self.session()
        s.lines()
        junk = s.store.user_path("example.test", "alice") / ".Junk"
        shutil.rmtree(junk)
        junk.write_bytes(b"not a folder")
        code, lines = yield self.transaction(s, "x@shady.example", message("x@shady.example"))
        self.assertEqual(code, 451)
        self.assertIn(b"4.3.0", lines[-1])
        self.assertEqual(s.files(), [])
        self.assertEqual(spooled(s), [])
        self.assertIn("cannot prepare the Junk folder",
                      "\n".join(formatEvent(e) for e in events))
        junk.unlink()
        code, _ = yield self.transaction(s, "x@shady.example", message("x@shady.example"))
        self.assertEqual(code, 250)
        self.assertEqual((len(s.files()), len(s.files(folder="Junk"))), (0, 1))

    @defer.inlineCallbacks
    def test_unchecked_client_message_unchanged(self):
        s = self.session(inbound=replace(CHECKS, trusted_networks=("192.0.2.0/24",)))
        s.lines()
        code, _ = yield self.transaction(s, "x@bad.example", message("ceo@bad.example"))
        self.assertEqual(code, 250)
        [path] = s.files()
        self.assertIn(b"dkim=pass header.d=forged.example", path.read_bytes())

    @defer.inlineCallbacks
    def test_large_body_copied_whole_from_the_spool(self):
        s = self.session()
        s.lines()
        body = b"".join(b"line %07d of a large message\r\n" % i for i in range(40000))
        code, _ = yield self.transaction(s, "x@good.example",
                                         message("x@good.example") + body)
        self.assertEqual(code, 250)
        [path] = s.files()
        self.assertTrue(path.read_bytes().endswith(b"\r\n\r\nbody\r\n" + body))

    @defer.inlineCallbacks
    def test_spam_verdict_fields_are_ours_and_spam_goes_to_junk(self):
        class Filter:
            seen: dict = {}

            def check(self, path, **envelope):
                self.seen.update(envelope, data=path if isinstance(path, bytes)
                                 else Path(path).read_bytes())
                return defer.succeed(SpamVerdict("add header", 9.5, 15.0, ("BAYES_SPAM",)))

        spam = Filter()
        s = self.session(rspamd=spam)
        s.lines()
        data = b"X-Spam: No\r\nX-Spam-Status: No, score=-100\r\n" + message("x@good.example")
        code, _ = yield self.transaction(s, "x@good.example", data)
        self.assertEqual(code, 250)
        self.assertEqual(spam.seen["ip"], "192.0.2.7")
        self.assertEqual(spam.seen["mail_from"], "x@good.example")
        self.assertEqual(spam.seen["rcpts"], ["alice@example.test"])
        self.assertTrue(spam.seen["data"].startswith(b"X-Spam: No\r\n"))
        self.assertEqual(s.files(), [])
        [path] = s.files(folder="Junk")
        head = path.read_bytes().split(b"\r\n\r\n")[0]
        self.assertIn(b"X-Spam: Yes\r\n", head)
        self.assertIn(b"score=9.50 required=15.00", head)
        self.assertNotIn(b"X-Spam: No", head)
        self.assertNotIn(b"score=-100", head)

    @defer.inlineCallbacks
    def test_spam_status_of_many_symbols_is_folded(self):
        """Forty symbol names on one tests= line passed the 998 octets of a line."""
        names = tuple(f"SYMBOL_NAME_{i:02d}_" + "X" * 100 for i in range(40))

        class Filter:
            def check(self, path, **envelope):
                return defer.succeed(SpamVerdict("add header", 9.5, 15.0, names))

        s = self.session(rspamd=Filter())
        s.lines()
        code, _ = yield self.transaction(s, "x@good.example", message("x@good.example"))
        self.assertEqual(code, 250)
        [path] = s.files(folder="Junk")
        head = path.read_bytes().split(b"\r\n\r\n")[0]
        self.assertLessEqual(max(len(line) for line in head.split(b"\r\n")), 998)
        unfolded = re.sub(rb"\r\n[ \t]+", b"", head)
        tests = re.search(rb"\r\nX-Spam-Status: [^\r]*tests=([^\r]*)", b"\r\n" + unfolded)
        self.assertIsNotNone(tests)
        self.assertEqual(tests.group(1).decode().split(","), list(names))

    @defer.inlineCallbacks
    def test_spam_filter_reject_and_unavailable(self):
        class Filter:
            def __init__(self, verdict):
                self.verdict = verdict

            def check(self, path, **envelope):
                return defer.succeed(self.verdict)

        s = self.session(rspamd=Filter(SpamVerdict("reject", 20.0, 15.0, ())))
        s.lines()
        code, lines = yield self.transaction(s, "x@good.example", message("x@good.example"))
        self.assertEqual((code, lines[-1][:9]), (554, b"554 5.7.1"))
        down = SpamVerdict("error", 0.0, 0.0, (), reason="timeout")
        s = self.session(rspamd=Filter(down))
        s.lines()
        code, _ = yield self.transaction(s, "x@good.example", message("x@good.example"))
        self.assertEqual(code, 250)
        s = self.session(rspamd=Filter(down), inbound=replace(CHECKS, rspamd_failure="tempfail"))
        s.lines()
        code, lines = yield self.transaction(s, "x@good.example", message("x@good.example"))
        self.assertEqual((code, lines[-1][:9]), (451, b"451 4.7.1"))
        self.assertEqual(s.files(), [])

    # -- found in review --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bounce_aligns_through_its_helo_name(self):
        # RFC 7489 4.1: with MAIL FROM:<> the SPF-checked HELO identity counts for DMARC.
        s = self.session()
        s.lines()
        s.send(b"EHLO good.example\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n"
               b"DATA\r\n")
        codes, _ = yield s.wait_codes(4)
        self.assertEqual(codes, [250, 250, 250, 354])
        s.send(message("MAILER-DAEMON@good.example") + b".\r\n")
        codes, _ = yield s.wait_codes(1)
        self.assertEqual(codes, [250])
        head = s.files()[0].read_bytes().split(b"\r\n\r\n")[0]
        self.assertIn(b"smtp.helo=good.example", head)
        self.assertIn(b"dmarc=pass", head)

    def test_too_many_recipients_is_not_an_error_of_the_client(self):
        s = self.session(max_recipients=2, max_command_errors=3)
        s.lines()
        s.send(b"EHLO c.example\r\nMAIL FROM:<x@good.example>\r\n"
               + b"RCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
               + b"RCPT TO:<carol@example.test>\r\n" * 5 + b"DATA\r\n")
        codes = [line[:3] for line in s.lines()]
        self.assertEqual(codes[-6:], [b"452"] * 5 + [b"354"])
        self.assertFalse(s.proto._closing)

    @defer.inlineCallbacks
    def test_header_section_over_a_megabyte_refused(self):
        s = self.session(inbound=replace(CHECKS, dmarc=False))
        s.lines()
        pad = b"".join(b"X-Pad-%06d: %s\r\n" % (i, b"y" * 60) for i in range(16000))
        data = message("x@good.example").replace(b"\r\n\r\n", b"\r\n" + pad + b"\r\n", 1)
        s.send(b"EHLO client.example\r\nMAIL FROM:<x@good.example>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        yield s.wait_codes(4)
        data += b".\r\n"
        for i in range(0, len(data), 65536):
            s.send(data[i:i + 65536])
        codes, lines = yield s.wait_codes(1)
        self.assertEqual((codes, lines[-1][:9]), ([552], b"552 5.3.4"))
        self.assertEqual((s.files(), s.files(folder="Junk")), ([], []))
        self.assertEqual(spooled(s), [])

    @defer.inlineCallbacks
    def test_no_from_junk_only_while_enforced(self):
        for enforce, junk in ((True, 1), (False, 0)):
            s = self.session(inbound=replace(CHECKS, dmarc_enforce=enforce))
            s.lines()
            code, _ = yield self.transaction(s, "x@good.example",
                                             b"Subject: no from\r\n\r\nhello\r\n")
            self.assertEqual(code, 250)
            self.assertEqual(len(s.files(folder="Junk")), junk)
            self.assertEqual(len(s.files()), 1 - junk)

    @defer.inlineCallbacks
    def test_junk_letter_looked_up_again_when_the_keyword_table_changes(self):
        s = self.session()
        s.lines()
        junk = s.store.user_path("example.test", "alice") / ".Junk"
        yield self.transaction(s, "x@shady.example", message("x@shady.example"))
        # The folder deleted and made again, a client's keyword taking letter a.
        shutil.rmtree(junk)
        s.store.account(junk.parent).create_folder("Junk")
        (junk / "dovecot-keywords").write_text("0 NonJunk\n")
        yield self.transaction(s, "x@shady.example", message("x@shady.example"))
        [path] = s.files(folder="Junk")
        self.assertTrue(path.name.endswith(":2,b"), path.name)
        self.assertIn("1 $Junk", (junk / "dovecot-keywords").read_text())

    def test_blocklist_failure_lists_no_one(self):
        s = self.session()
        s.lines()
        d = defer.Deferred()
        s.proto._blocked = d
        d.addBoth(s.proto._listed)
        s.send(b"EHLO c.example\r\nMAIL FROM:<x@good.example>\r\nRCPT TO:<alice@example.test>\r\n")
        finals = lambda: [line[:3] for line in s.lines() if line[3:4] == b" "]  # noqa: E731
        self.assertEqual(finals(), [b"250", b"250"])
        d.errback(RuntimeError("resolver broken"))
        self.assertEqual(finals(), [b"250"])
        self.assertFalse(s.proto._paused)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_client_gone_during_the_checks_nothing_delivered(self):
        s = self.session()
        s.lines()
        pending = defer.Deferred()
        table = dict(s.resolver.table)
        s.resolver.lookup = lambda name, rtype: (pending if name == "_dmarc.good.example"
                                                 else defer.succeed(table.get(
                                                     (name, rtype), Answer("nxdomain"))))
        s.send(b"EHLO client.example\r\nMAIL FROM:<x@good.example>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        yield s.wait_codes(4)
        s.send(message("x@good.example") + b".\r\n")
        s.proto.connectionLost(None)
        pending.callback(ZONE[("_dmarc.good.example", "TXT")])
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(s.files(), [])
        self.assertEqual(spooled(s), [])

    @defer.inlineCallbacks
    def test_idle_timeout_runs_from_the_banner(self):
        s = self.session(inbound=replace(CHECKS, greet_delay=0.2), idle_timeout=0.1)
        yield task.deferLater(reactor, 0.25, lambda: None)
        self.assertTrue(s.lines()[0].startswith(b"220 "))
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(s.lines()[0][:3], b"421")
