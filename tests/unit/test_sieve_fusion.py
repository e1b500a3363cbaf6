"""What makes Sieve at delivery cheap must not change what it decides: runs of if-commands
evaluated together (mailserver.sieve.fusion) against the same rules one by one, header
fields found by name against the whole parse (mailserver.sieve.message), the CPU time
limit over fused rules, the clock read lazily, and SieveDelivery's store for a message
that is only kept."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.trial import unittest as trial

from mailserver.config import SieveConfig
from mailserver.maildir.store import MaildirStore
from mailserver.sieve import interpreter
from mailserver.sieve.actions import Keep
from mailserver.sieve.delivery import Incoming, SieveDelivery, Target
from mailserver.sieve.interpreter import Envelope, Limits, evaluate
from mailserver.sieve.message import MAX_HEADER_FIELDS, Message, parse_fields
from mailserver.sieve.parser import parse

ENV = Envelope("bob@remote.example", "alice+box@example.test", "alice@example.test")

MSG = (
    b"Received: from a.example by b.example; Tue, 1 Apr 2025 09:06:31 +0000\r\n"
    b"From: Bob Example <bob@remote.example>\r\n"
    b"To: alice@example.test, Carol <carol@list.example>\r\n"
    b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.de>\r\n"
    b"Subject: Quarterly report for project-7\r\n"
    b"X-Spam: no\r\n"
    b"List-Id: <news.list.example>\r\n"
    b"\r\n"
    b"Hello,\r\nthe numbers are in.  To stop these: unsubscribe-now\r\n"
)


def run(src: str, msg: bytes = MSG, fused: bool = True, **kw):
    """The result with fusion as built, or with every if-command on its own."""
    script = parse(src)
    if not fused:
        saved = interpreter.MIN_TESTS
        interpreter.MIN_TESTS = 1 << 30
        try:
            interpreter.compiled(script)
        finally:
            interpreter.MIN_TESTS = saved
    return evaluate([script], Message.from_bytes(msg), ENV, **kw)


def same(src: str, msg: bytes = MSG, **kw):
    fused, alone = run(src, msg, True, **kw), run(src, msg, False, **kw)
    assert fused == alone, src
    return fused


REQUIRE = 'require ["fileinto", "body", "imap4flags", "editheader", "variables", "copy", "index"];\n'


def test_a_long_run_is_one_command() -> None:
    src = REQUIRE + "".join(f'if header :contains "subject" "p{i}" {{ fileinto "F{i}"; }}\n'
                            for i in range(20))
    assert len(interpreter.compiled(parse(src))) == 1


def test_first_true_rule_in_order() -> None:
    src = REQUIRE + (
        'if address :is "from" "nobody@x.example" { fileinto "A"; stop; }\n'
        'if header :contains "subject" "project-7" { fileinto "B"; stop; }\n'
        'if address :domain :is ["to", "cc"] "list.example" { fileinto "C"; stop; }\n'
        'if body :contains "unsubscribe" { fileinto "D"; stop; }\n')
    assert [a.mailbox for a in same(src).actions] == ["B"]
    # without stop every rule that holds runs, in order
    assert [a.mailbox for a in same(src.replace(" stop;", "")).actions] == ["B", "C", "D"]


def test_elsif_chains_and_else() -> None:
    src = REQUIRE + (
        'if header :is "x-spam" "yes" { fileinto "Junk"; }\n'
        'elsif address :is "from" "bob@remote.example" { fileinto "Bob"; }\n'
        'elsif header :contains "subject" "report" { fileinto "Reports"; }\n'
        'else { fileinto "Other"; }\n'
        'if header :is "x-spam" "maybe" { fileinto "Maybe"; } else { fileinto "Sure"; }\n')
    assert [a.mailbox for a in same(src).actions] == ["Bob", "Sure"]


def test_a_block_that_edits_the_header_is_seen_by_the_next_rules() -> None:
    src = REQUIRE + (
        'if header :contains "subject" "report" { addheader "X-Tag" "seen"; }\n'
        'if header :is "x-tag" "seen" { fileinto "Tagged"; }\n'
        'if header :is "x-spam" "no" { deleteheader "x-spam"; }\n'
        'if header :is "x-spam" "no" { fileinto "Still"; }\n')
    r = same(src)
    assert [a.mailbox for a in r.actions] == ["Tagged"]     # and not "Still"
    assert r.actions[0].header.startswith(b"X-Tag: seen\r\n")


def test_octet_and_casemap_keys_of_one_source() -> None:
    src = REQUIRE + (
        'if header :comparator "i;octet" :contains "subject" "QUARTERLY" { fileinto "O1"; }\n'
        'if header :comparator "i;octet" :is "x-spam" "no" { fileinto "O2"; }\n'
        'if header :contains "subject" "QUARTERLY" { fileinto "C1"; }\n'
        'if header :is "x-spam" "NO" { fileinto "C2"; }\n'
        'if header :contains "subject" "" { fileinto "Empty"; }\n'
        'if header :contains "x-absent" "" { fileinto "Absent"; }\n')
    assert [a.mailbox for a in same(src).actions] == ["O2", "C1", "C2", "Empty"]


def test_fused_rules_against_one_by_one() -> None:
    """Random scripts of fusible rules with others in between, on messages with and
    without the fields: the same actions either way."""
    rnd = random.Random(5228)
    tests = [
        'header :contains "subject" "{k}"', 'header :is "subject" "{k}"',
        'header :comparator "i;octet" :contains "subject" "{k}"',
        'header :is ["x-spam", "x-other"] "{k}"', 'address :is "from" "{k}@remote.example"',
        'address :localpart :is ["to", "cc"] "{k}"', 'address :domain :is "to" "{k}.example"',
        'address :all :contains "cc" "{k}"', 'body :contains "{k}"', 'body :raw :contains "{k}"',
        'header :index 2 :contains "received" "{k}"', 'exists "x-{k}"', 'size :over 1{n}',
        'header :matches "subject" "*{k}*"', 'not header :contains "subject" "{k}"',
        'anyof (header :is "x-spam" "{k}", address :is "from" "{k}")',
    ]
    keys = ["report", "project-7", "bob", "alice", "carol", "list", "no", "yes", "stop",
            "unsubscribe", "", "QUARTERLY", "b.example", "joerg", "x"]
    blocks = ['fileinto "F{i}";', 'fileinto "F{i}"; stop;', 'addflag "\\\\Seen";',
              'fileinto :copy "C{i}";', 'addheader "X-{k}" "{k}";', 'deleteheader "x-spam";',
              'set "v" "{k}";']
    messages = [MSG, MSG.replace(b"X-Spam: no", b"X-Spam: yes"),
                b"Subject: no body here\r\n", b"\r\nonly a body, stop\r\n"]
    for _ in range(300):
        lines = [REQUIRE]
        for i in range(rnd.randint(1, 12)):
            test = rnd.choice(tests).format(k=rnd.choice(keys), n=rnd.randint(0, 999))
            block = rnd.choice(blocks).format(i=i, k=rnd.choice(["a", "b"]))
            lines.append(f"if {test} {{ {block} }}\n")
            if rnd.random() < 0.2:
                test = rnd.choice(tests).format(k=rnd.choice(keys), n=rnd.randint(0, 999))
                lines.append(f'elsif {test} {{ fileinto "E{i}"; }}\n')
            if rnd.random() < 0.1:
                lines.append(f'else {{ fileinto "Else{i}"; }}\n')
        src = "".join(lines)
        for msg in messages:
            same(src, msg)


def test_the_cpu_time_limit_holds_over_fused_rules() -> None:
    body = b"Subject: x\r\n\r\n" + b"a" * (1 << 20)
    src = 'require ["body", "fileinto"];\n' + "".join(
        f'if body :contains "zz{i}zz" {{ fileinto "F{i}"; }}\n' for i in range(3000))
    assert len(interpreter.compiled(parse(src))) == 1
    r = run(src, body, limits=Limits(max_cpu_time=0.05))
    assert r.actions == [Keep(implicit=True)] and "CPU time" in r.error


def test_a_short_script_never_reads_the_cpu_clock(monkeypatch) -> None:
    """The thread's CPU clock is a system call: only checks read it, the first after 32
    commands; a zero limit still stops a longer script."""
    calls = []
    real = interpreter.time.thread_time
    monkeypatch.setattr(interpreter.time, "thread_time", lambda: calls.append(1) or real())
    assert run(REQUIRE + 'if header :is "x-spam" "no" { fileinto "A"; }\n').error is None
    assert calls == []
    r = run("if true {}\n" * 100, limits=Limits(max_cpu_time=0.0))
    assert "CPU time" in r.error and calls


# -- header fields found by name ---------------------------------------------------------

HEADERS = [
    b"Subject: plain\r\nsubject : spaced\r\nSUBJECT:\tupper\r\nX: a\r\n",
    b"Subject: folded\r\n one\r\n\ttwo\r\nTo: x\r\n",
    b"Subject: last line without CRLF",
    b"Subject: last line with CR\r",
    b"Subject: bare\rCR inside\r\nTo: y\r\n",
    b"Subject: bare LF\n continued\r\nTo: z\r\n",
    b"X: a\nSubject: after a bare LF\r\n",
    b" leading continuation\r\nSubject: s\r\n",
    b"not a field\r\nSubject: s\r\nsubjects: t\r\nsub: u\r\n",
    b"Subject: 8bit \xc3\xa9t\xe9\r\n",
    b"Subject: a\r\n\r\nSubject: after an empty line\r\n",
]


@pytest.mark.parametrize("header", HEADERS)
def test_fields_by_name_are_those_of_the_whole_parse(header: bytes) -> None:
    names = ["subject", "to", "x", "sub", "subjects", "not a field", "Subject", ""]
    want: dict[str, list] = {}
    for f in parse_fields(header):
        want.setdefault(f.lname, []).append((f.name, f.raw, f.line))
    m = Message(header)
    got = {n: [(f.name, f.raw, f.line) for f in m.fields_named(n)] for n in names}
    assert got == {n: want.get(n, []) for n in names}
    handed = [f for n in names for f in m.fields_named(n)]
    # the whole list, when an edit needs it, holds the very fields handed out
    assert [(f.name, f.raw, f.line) for f in m.fields] == \
        [(f.name, f.raw, f.line) for f in parse_fields(header)]
    assert {id(f) for f in handed} <= {id(f) for f in m.fields}


def test_many_lines_are_parsed_whole() -> None:
    header = b"".join(b"X-N: %d\r\n" % i for i in range(MAX_HEADER_FIELDS + 5)) + b"X-Last: z\r\n"
    assert Message(header).fields_named("x-last") == []


def test_deleteheader_of_a_field_a_test_looked_at() -> None:
    src = ('require ["editheader", "fileinto"];\n'
           'if header :contains "x-spam" "no" { deleteheader "x-spam"; }\n'
           'if not exists "x-spam" { fileinto "Gone"; }\n')
    r = run(src)
    assert [a.mailbox for a in r.actions] == ["Gone"]
    assert b"X-Spam" not in r.actions[0].header and b"List-Id" in r.actions[0].header


# -- delivery of a message that is only kept ---------------------------------------------

class DeliveryTests(trial.TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.store = MaildirStore(self.root / "maildirs", "mail.example.test")
        self.users = [self.store.create_user("example.test", n) for n in ("alice", "bob")]
        self.targets = [Target(f"{n}@example.test", p, f"{n}@example.test")
                        for n, p in zip(("alice", "bob"), self.users)]
        self.sieve = SieveDelivery(SieveConfig(), self.store, None, "mail.example.test",
                                   self.root / "var")

    def script(self, user: Path, text: str) -> None:
        (user / "sieve").mkdir(exist_ok=True)
        (user / "sieve" / "s.sieve").write_text(text)
        (user / ".dovecot.sieve").symlink_to("sieve/s.sieve")

    @defer.inlineCallbacks
    def test_one_file_in_every_inbox_as_without_scripts(self):
        self.script(self.users[0], 'if header :is "x-spam" "yes" { discard; }\n')
        msg = Incoming("Q1", "bob@remote.test", MSG[:MSG.index(b"\r\n\r\n") + 2],
                       rest=MSG[MSG.index(b"\r\n\r\n") + 2:], prefix=b"Return-Path: <x>\r\n")
        outcomes = yield self.sieve.deliver(msg, self.targets)
        self.assertTrue(all(o.ok and o.path is not None for o in outcomes))
        stored = [sorted((u / "new").iterdir()) for u in self.users]
        self.assertEqual([len(s) for s in stored], [1, 1])
        self.assertEqual(os.stat(stored[0][0]).st_ino, os.stat(stored[1][0]).st_ino)
        self.assertEqual(stored[0][0].read_bytes(), b"Return-Path: <x>\r\n" + MSG)
        self.assertNotIn(":2,", stored[0][0].name)

    @defer.inlineCallbacks
    def test_a_store_that_fails_is_reported(self):
        self.script(self.users[0], 'keep;\n')
        for d in ("new", "tmp"):                  # no longer a Maildir that can take it
            shutil.rmtree(self.users[0] / d)
            (self.users[0] / d).write_text("")
        msg = Incoming("Q1", "bob@remote.test", b"Subject: x\r\n", rest=b"\r\nbody\r\n")
        outcomes = yield self.sieve.deliver(msg, self.targets)
        self.assertFalse(outcomes[0].ok)
        self.assertTrue(outcomes[0].error)
        self.assertTrue(outcomes[1].ok)

    @defer.inlineCallbacks
    def test_messages_arriving_together_wait_for_one_compilation(self):
        from mailserver.sieve import delivery
        self.script(self.users[0], 'require ["fileinto", "mailbox"];\n'
                    'if header :contains "subject" "report" { fileinto :create "Reports"; }\n')
        calls = []
        real = delivery._compile_file
        self.patch(delivery, "_compile_file", lambda *a: calls.append(a) or real(*a))
        msgs = [Incoming(f"Q{i}", "bob@remote.test", MSG[:MSG.index(b"\r\n\r\n") + 2],
                         rest=MSG[MSG.index(b"\r\n\r\n") + 2:]) for i in range(5)]
        outcomes = yield defer.gatherResults([self.sieve.deliver(m, self.targets[:1])
                                              for m in msgs])
        self.assertEqual(len(calls), 1)
        self.assertEqual([o[0].error for o in outcomes if not o[0].ok], [])
        self.assertTrue(all(o[0].ok for o in outcomes))
        self.assertEqual(len(list((self.users[0] / ".Reports" / "new").iterdir())), 5)

    @defer.inlineCallbacks
    def test_a_script_that_could_not_be_read_is_tried_again_next_time(self):
        """EMFILE while the script is read keeps that message (implicit keep), and does
        not switch the filter off until the file changes: the next message is filtered."""
        from mailserver.sieve import delivery
        self.script(self.users[0], 'require ["fileinto", "mailbox"];\n'
                    'if header :contains "subject" "report" { fileinto :create "Reports"; }\n')
        real, failures = delivery._compile_file, [OSError(errno.EMFILE, "Too many open files")]

        def compile_file(*args):
            if failures:
                raise failures.pop()
            return real(*args)
        self.patch(delivery, "_compile_file", compile_file)
        for i in range(2):
            msg = Incoming(f"Q{i}", "bob@remote.test", MSG[:MSG.index(b"\r\n\r\n") + 2],
                           rest=MSG[MSG.index(b"\r\n\r\n") + 2:])
            (outcome,) = yield self.sieve.deliver(msg, self.targets[:1])
            self.assertTrue(outcome.ok)
        self.assertEqual(len(list((self.users[0] / "new").iterdir())), 1)
        self.assertEqual(len(list((self.users[0] / ".Reports" / "new").iterdir())), 1)
