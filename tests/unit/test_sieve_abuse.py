"""A user's Sieve script as untrusted input at delivery, with the real interpreter,
SieveDelivery, store and vacation memory: the redirect mark cannot be deleted, a :mime
vacation reason cannot write the reply's own header, a long :handle is not stored whole,
addheader is bounded in total, and a slow script runs its course off the reactor."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailserver.config import SieveConfig
from mailserver.maildir.store import MaildirStore
from mailserver.sieve import interpreter
from mailserver.sieve.delivery import Incoming, SieveDelivery, Target
from mailserver.sieve.interpreter import MAX_ADDHEADER_TOTAL
from mailserver.sieve.parser import parse
from mailserver.sieve.message import Message

ALICE = "alice@example.test"


class Accounts:
    """alice may send only as herself."""

    def may_send_as(self, user: str, address: str) -> bool:
        return address.lower() == user.lower()


class GeneratedQueue:
    """What the delivery hands to the queue as mail it generated (vacation replies)."""

    def __init__(self) -> None:
        self.generated: list[tuple[str, str, bytes]] = []

    def submit_generated(self, sender: str, recipient: str, data: bytes) -> defer.Deferred:
        self.generated.append((sender, recipient, data))
        return defer.succeed(None)


class Abuse(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.store = MaildirStore(self.root / "maildirs", "mail.example.test")
        self.alice = self.store.create_user("example.test", "alice")
        (self.root / "var").mkdir(parents=True)
        self.queue = GeneratedQueue()
        self.sieve = SieveDelivery(SieveConfig(), self.store, Accounts(), "mail.example.test",
                                   self.root / "var", (), queue=self.queue)
        self.addCleanup(self.sieve.close)
        self.targets = [Target(ALICE, self.alice, ALICE)]
        self.count = 0

    def script(self, text: str) -> None:
        (self.alice / "sieve").mkdir(exist_ok=True)
        path = self.alice / "sieve" / "s.sieve"
        path.write_text(text)
        self.count += 1
        os.utime(path, (self.count, self.count))   # a changed script is compiled again
        link = self.alice / ".dovecot.sieve"
        if not link.is_symlink():
            link.symlink_to("sieve/s.sieve")

    def incoming(self, sender: str = "bob@remote.test", extra: bytes = b"") -> Incoming:
        self.count += 1
        head = (f"From: <{sender}>\r\nTo: {ALICE}\r\nSubject: hi\r\n"
                f"Message-ID: <m{self.count}@remote.test>\r\n").encode() + extra
        return Incoming(f"Q{self.count}", sender, head, rest=b"\r\nbody\r\n")

    def slow_script_and_message(self) -> Incoming:
        """alice's script files into Work after 40 tests that take about 50 ms on the
        message returned (a Subject of 30,000 octets): more than the reactor allows."""
        tests = ", ".join(['header :matches "subject" "*a?a?a?a?ab*"'] * 40)
        self.script('require ["fileinto", "mailbox"];\n'
                    f'if anyof ({tests}) {{ stop; }}\n'
                    'fileinto :create "Work";\n')
        msg = self.incoming()
        return Incoming(msg.queue_id, msg.sender,
                        msg.head.replace(b"Subject: hi", b"Subject: " + b"a" * 30000),
                        rest=msg.rest)

    def files(self, folder: str = "") -> list[Path]:
        base = self.alice / f".{folder}" if folder else self.alice
        return [p for sub in ("new", "cur") if (base / sub).is_dir()
                for p in (base / sub).iterdir()]

    def test_the_redirect_mark_cannot_be_deleted(self):
        """Two users whose scripts delete the mark and redirect to each other sent one
        message round 7,509 times in 15 s: the mark is protected like Received."""
        self.assertIn("x-sieve-redirected-from", interpreter.PROTECTED_FROM_DELETION)
        script = parse('require ["editheader"];\n'
                       'deleteheader "X-Sieve-Redirected-From";\n'
                       'deleteheader "Subject";\n')
        msg = Message(b"X-Sieve-Redirected-From: alice@example.test\r\nSubject: s\r\n\r\nb\r\n")
        result = interpreter.evaluate([script], msg, interpreter.Envelope(
            "bob@remote.test", ALICE, ALICE))
        [keep] = result.actions
        self.assertIsNotNone(keep.header)
        self.assertIn(b"X-Sieve-Redirected-From: alice@example.test", keep.header)
        self.assertNotIn(b"Subject", keep.header)

    @defer.inlineCallbacks
    def test_a_mime_reason_cannot_write_the_replys_header(self):
        self.script('require "vacation";\n'
                    'vacation :mime text:\n'
                    'From: The CEO <ceo@example.test>\n'
                    'Reply-To: phish@evil.test\n'
                    'Auto-Submitted: no\n'
                    'Content-Type: text/plain;\n'
                    ' charset=us-ascii\n'
                    '\n'
                    'Away.\n'
                    '.\n;\n')
        yield self.sieve.deliver(self.incoming(), self.targets)
        [(_, _, data)] = self.queue.generated
        head, _, body = data.partition(b"\r\n\r\n")
        names = [line.split(b":")[0].lower() for line in head.split(b"\r\n")
                 if line[:1] not in (b" ", b"\t")]
        self.assertEqual(names.count(b"from"), 1)
        self.assertEqual(names.count(b"auto-submitted"), 1)
        self.assertNotIn(b"reply-to", names)
        self.assertNotIn(b"ceo@", head)
        self.assertIn(b"Content-Type: text/plain;\r\n charset=us-ascii", head)
        self.assertEqual(body, b"Away.\r\n")

    @defer.inlineCallbacks
    def test_a_mime_reason_without_a_header_is_all_body(self):
        for reason, body in (("\nAway until Monday.\nBack on the 5th.\n",
                              b"Away until Monday.\r\nBack on the 5th.\r\n"),
                             ("I am away.\n\nBack on the 5th.\n",
                              b"I am away.\r\n\r\nBack on the 5th.\r\n")):
            self.queue.generated.clear()
            self.script('require ["vacation", "vacation-seconds"];\n'
                        'vacation :seconds 0 :mime text:\n' + reason + '.\n;\n')
            yield self.sieve.deliver(self.incoming(), self.targets)
            [(_, _, data)] = self.queue.generated
            self.assertEqual(data.partition(b"\r\n\r\n")[2], body, reason)

    @defer.inlineCallbacks
    def test_a_long_handle_is_stored_by_its_digest(self):
        """A 1 MB handle was stored in every (user, handle, sender) row for 90 days."""
        self.script('require ["vacation", "variables"];\n'
                    f'set "a" "{"x" * 4000}";\n'
                    f'vacation :days 90 :handle "{"${a}" * 50}" "away";\n')
        for i in range(5):
            yield self.sieve.deliver(self.incoming(sender=f"s{i}@remote.test"), self.targets)
        yield self.sieve.deliver(self.incoming(sender="s0@remote.test"), self.targets)
        self.assertEqual(len(self.queue.generated), 5)    # still one answer per sender
        self.sieve.memory.close()
        size = sum(os.path.getsize(p) for p in (self.root / "var").glob("sieve-vacation*"))
        self.assertLess(size, 200_000)

    @defer.inlineCallbacks
    def test_addheader_is_bounded_in_total(self):
        """1,800 fields of 2 KB made a 70-byte message 3.4 MB a copy: past
        MAX_ADDHEADER_TOTAL octets the script fails, and the message is kept unchanged."""
        for fields, added in ((MAX_ADDHEADER_TOTAL // 1000 - 2, True),
                              (MAX_ADDHEADER_TOTAL // 1000 + 2, False)):
            self.script('require ["editheader", "variables"];\n'
                        f'set "a" "{"x" * 990}";\n'
                        + 'addheader "X-Pad" "${a}";\n' * fields)
            yield self.sieve.deliver(self.incoming(), self.targets)
            [stored] = self.files()
            self.assertEqual(b"X-Pad" in stored.read_bytes(), added, fields)
            stored.unlink()

    @defer.inlineCallbacks
    def test_a_slow_script_on_a_small_message_runs_its_course_in_a_thread(self):
        """The reactor gives a script REACTOR_CPU_TIME; one that needs more (here about
        50 ms) is run again in a thread with the whole limit, and its actions apply."""
        msg = self.slow_script_and_message()
        outcomes = yield self.sieve.deliver(msg, self.targets)
        self.assertFalse(outcomes[0].error)
        self.assertEqual(len(self.files("Work")), 1)

    @defer.inlineCallbacks
    def test_a_slow_and_a_quick_script_on_one_message_in_memory(self):
        """Two mailboxes of one message: the slow script runs in a thread on a Message of
        its own while the quick one is evaluated in the reactor on the shared one."""
        bob = self.store.create_user("example.test", "bob")
        (bob / "sieve").mkdir()
        (bob / "sieve" / "s.sieve").write_text('require ["fileinto", "mailbox"];\n'
                                               'if header :contains "subject" "a" '
                                               '{ fileinto :create "Quick"; }\n')
        (bob / ".dovecot.sieve").symlink_to("sieve/s.sieve")
        msg = self.slow_script_and_message()
        outcomes = yield self.sieve.deliver(
            msg, self.targets + [Target("bob@example.test", bob, "bob@example.test")])
        self.assertTrue(all(o.ok for o in outcomes))
        self.assertEqual(len(self.files("Work")), 1)
        quick = [p for sub in ("new", "cur") for p in (bob / ".Quick" / sub).iterdir()]
        self.assertEqual(len(quick), 1)
