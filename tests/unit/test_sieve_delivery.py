"""Sieve at delivery: from a result to stores, redirects, rejection and vacation (plan),
folders and flags on disk (prepare_folder), the rejection message (RFC 5429), the message
held whole (MessageSpool), the splitting of a queued message, and SieveDelivery itself on
a real store with delivery filter plugins and scripts."""

from __future__ import annotations

import email
import email.policy
import os
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.trial import unittest as trial
from zope.interface import implementer

from mailserver.config import ConfigError, SieveConfig
from mailserver.filters import FilterDecision, IDeliveryFilter
from mailserver.maildir.keywords import Keywords
from mailserver.maildir.store import MaildirStore
from mailserver.sieve.actions import (Discard, FileInto, Keep, Redirect, Reject, Result,
                                      Vacation)
from mailserver.sieve.delivery import (Incoming, SieveDelivery, Target, _drop_delivery_fields,
                                       read_queued, split_header)
from mailserver.sieve.plan import (DefaultFolder, check_folder_name, flag_letters, plan,
                                   prepare_folder, redirect_marks)
from mailserver.sieve.reject import build_rejection, reply_text
from mailserver.smtp.replies import SMTPReplyError
from mailserver.smtp.spool import MessageSpool

USER = "alice@example.test"
HEADER = b"From: bob@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n"


def folders(p) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.folder, s.flags) for s in p.stores]


# -- plan -----------------------------------------------------------------------------------

def test_implicit_keep_goes_to_the_default_folder() -> None:
    result = Result([Keep(implicit=True)])
    assert folders(plan(result, HEADER, USER, USER)) == [("INBOX", ())]
    junk = DefaultFolder("Junk", ("$Junk",))
    p = plan(result, HEADER, USER, USER, junk)
    assert folders(p) == [("Junk", ("$Junk",))]
    assert p.stores[0].create


def test_fileinto_wins_over_the_default_folder() -> None:
    result = Result([FileInto("Work", flags=("\\Seen",))])
    p = plan(result, HEADER, USER, USER, DefaultFolder("Junk", ("$Junk",)))
    assert folders(p) == [("Work", ("\\Seen",))]
    assert not p.stores[0].create


def test_the_same_folder_is_stored_once() -> None:   # RFC 5228 4.1
    result = Result([FileInto("Work", flags=("\\Seen",)), FileInto("Work", flags=("x",)),
                     Keep(), FileInto("inbox")])
    assert folders(plan(result, HEADER, USER, USER)) == [("Work", ("\\Seen", "x")),
                                                         ("INBOX", ())]


@pytest.mark.parametrize("name", ["../etc", "a/../../b", "..", "a..b", "x\x00y", "A" * 300,
                                  "", "a\r\nb", ".hidden"])
def test_hostile_folder_names_go_to_inbox(name: str) -> None:
    p = plan(Result([FileInto(name, create=True)]), HEADER, USER, USER)
    assert folders(p) == [("INBOX", ())]
    assert not p.stores[0].create
    assert "refused" in p.notes[0]


@pytest.mark.parametrize("name", ["Work", "Work.2024", "Entwürfe", "INBOX", "a b"])
def test_valid_folder_names(name: str) -> None:
    assert check_folder_name(name) is None


def test_redirect_loop_is_kept_instead() -> None:
    marked = HEADER + b"X-Sieve-Redirected-From: Alice@Example.test\r\n"
    assert redirect_marks(marked) == {USER}
    p = plan(Result([Redirect("bob@remote.test")]), marked, USER, USER)
    assert p.redirects == []
    assert folders(p) == [("INBOX", ())]
    assert "loop" in p.notes[0]
    # another user's mark is no loop
    p = plan(Result([Redirect("bob@remote.test")]), marked, "carol@example.test",
             "carol@example.test")
    assert [r.address for r in p.redirects] == ["bob@remote.test"] and p.stores == []


def test_redirect_loop_with_a_fileinto_keeps_nothing_more() -> None:
    marked = HEADER + b"X-Sieve-Redirected-From: alice@example.test\r\n"
    p = plan(Result([Redirect("x@remote.test"), FileInto("Work")]), marked, USER, USER)
    assert folders(p) == [("Work", ())]


def test_reject_discard_vacation() -> None:
    v = Vacation("away", handle="h")
    p = plan(Result([Reject("no thanks"), v]), HEADER, USER, USER)
    assert p.stores == [] and p.reject == Reject("no thanks") and p.vacation is v
    p = plan(Result([Discard()]), HEADER, USER, USER)
    assert p.stores == [] and p.discarded and p.summary == "discard"


def test_run_time_error_is_noted() -> None:
    p = plan(Result([Keep(implicit=True)], error="include: missing"), HEADER, USER, USER)
    assert folders(p) == [("INBOX", ())]
    assert "run-time error: include: missing" in p.notes


def test_flag_letters() -> None:
    letters = {"$label1": "a", "work": "b"}
    assert flag_letters(["\\Seen", "\\Flagged", "\\Recent", "work", "bad word", "\\Bogus"],
                        letters.__getitem__) == "FSb"


# -- folders on disk --------------------------------------------------------------------------

@pytest.fixture
def maildir(tmp_path: Path) -> tuple[MaildirStore, Path]:
    store = MaildirStore(tmp_path / "maildirs", "mail.example.test")
    return store, store.create_user("example.test", "alice")


def test_prepare_existing_folder_with_keywords(maildir) -> None:
    store, user = maildir
    place = prepare_folder(user, "Junk", ("$Junk", "\\Seen"), False,
                           store.account(user).create_folder)
    assert place is not None
    path, info = place
    assert path == user / ".Junk"
    letter = Keywords.read(path).letter("$Junk")
    assert info == f":2,S{letter}"


def test_prepare_missing_folder(maildir) -> None:
    store, user = maildir
    create = store.account(user).create_folder
    assert prepare_folder(user, "Lists.Python", (), False, create) is None
    assert not (user / ".Lists.Python").exists()
    assert prepare_folder(user, "Lists.Python", (), True, create) == (user / ".Lists.Python",
                                                                      "")
    assert (user / ".Lists.Python" / "cur").is_dir()
    assert (user / ".Lists" / "maildirfolder").exists()


def test_prepare_inbox_flags(maildir) -> None:
    store, user = maildir
    assert prepare_folder(user, "INBOX", ("\\Answered",), False,
                          store.account(user).create_folder) == (user, ":2,R")


# -- the rejection message --------------------------------------------------------------------

def test_reply_text_is_one_printable_line() -> None:
    assert reply_text("Go away\r\n250 ok\x00 über") == "Go away 250 ok? ?ber"
    assert reply_text("") == "Message rejected"
    assert len(reply_text("x" * 1000)) == 200


def test_rejection_message() -> None:
    header = HEADER + b"Message-ID: <m1@remote.test>\r\nX-Caf\xc3\xa9: 1\r\n"
    data = build_rejection("Not wanted here.\nSorry.", header, "bob@remote.test", USER,
                           "info@example.test", "mail.example.test", now=0)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    assert msg["To"].addresses[0].addr_spec == "bob@remote.test"
    assert msg["Auto-Submitted"].startswith("auto-replied")
    text, mdn, original = msg.iter_parts()
    assert "Not wanted here." in text.get_content()
    report = mdn.get_payload()[0] if mdn.is_multipart() else mdn
    raw = data.decode("ascii")
    assert "Disposition: automatic-action/MDN-sent-automatically; deleted" in raw
    assert f"Final-Recipient: rfc822; {USER}" in raw
    assert "Original-Recipient: rfc822; info@example.test" in raw
    assert "Original-Message-ID: <m1@remote.test>" in raw
    assert original.get_content_type() == "text/rfc822-headers"
    assert report is not None
    assert data.isascii()


def test_rejection_message_with_a_utf8_reason_is_7bit() -> None:
    # The reason went out as 8bit text, which a next hop without 8BITMIME cannot take.
    data = build_rejection("Nicht erwünscht.", HEADER, "bob@remote.test", USER, USER,
                           "mail.example.test", now=0)
    assert data.isascii()
    msg = email.message_from_bytes(data, policy=email.policy.default)
    text = next(msg.iter_parts())
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Nicht erwünscht." in text.get_content()


# -- holding the message, splitting a queued one ------------------------------------------------

def test_message_spool_memory_and_file(tmp_path: Path) -> None:
    small = MessageSpool(tmp_path / "spool", "Q1")
    for piece in (b"Subject: a\r\n", b"To: b\r\n\r\nbo", b"dy\r\n"):
        small.write(piece)
    small.finish()
    assert small.in_memory and small.header == b"Subject: a\r\nTo: b\r\n"
    assert small.rest() == b"\r\nbody\r\n" and small.path is None
    big = MessageSpool(tmp_path / "spool", "Q2", memory_limit=100)
    body = b"x" * 300 + b"\r\n"
    big.write(b"Subject: a\r\n\r\n")
    big.write(body)
    big.finish()
    assert not big.in_memory and big.path is not None and big.path.exists()
    assert b"".join(big.rest_chunks()) == b"\r\n" + body
    big.discard()
    assert not big.path.exists()


def test_split_queued_message(tmp_path: Path) -> None:
    assert split_header(b"A: 1\r\n\r\nbody") == 6
    assert split_header(b"\r\nbody") == 0
    assert split_header(b"A: 1\r\nB: 2\r\n") == 12
    f = tmp_path / "m"
    f.write_bytes(b"A: 1\r\n\r\nbody\r\n")
    assert read_queued(f) == (b"A: 1\r\n", b"\r\nbody\r\n", 6)
    f.write_bytes(b"A: 1\r\n\r\n" + b"y" * 100_000)
    assert read_queued(f) == (b"A: 1\r\n", None, 6)


def test_copy_header_leaves_final_delivery_fields_out() -> None:
    head = (b"Return-Path: <a@b>\r\nDelivered-To: x@y\r\n\tcontinued\r\n"
            b"Received: from x\r\nSubject: s\r\n")
    assert _drop_delivery_fields(head) == b"Received: from x\r\nSubject: s\r\n"


# -- the delivery itself: a real store, delivery filters, scripts ---------------------------------


@implementer(IDeliveryFilter)
class Plugin:
    """A delivery filter answering what the test says."""

    name = "test"

    def __init__(self, decision: FilterDecision) -> None:
        self.decision = decision
        self.seen: list = []

    def filter(self, facts):
        self.seen.append(facts)
        return self.decision


MESSAGE = (b"From: bob@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n"
           b"Message-ID: <m1@remote.test>\r\n")


class SieveDeliveryTests(trial.TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.store = MaildirStore(self.root / "maildirs", "mail.example.test")
        self.alice = self.store.create_user("example.test", "alice")
        self.bob = self.store.create_user("example.test", "bob")
        self.targets = [Target("alice@example.test", self.alice, "alice@example.test")]

    def sieve(self, filters=(), **config) -> SieveDelivery:
        return SieveDelivery(SieveConfig(**config), self.store, None, "mail.example.test",
                             self.root / "var", filters)

    def script(self, user: Path, text: str) -> None:
        (user / "sieve").mkdir(exist_ok=True)
        (user / "sieve" / "s.sieve").write_text(text)
        (user / ".dovecot.sieve").symlink_to("sieve/s.sieve")

    def incoming(self, **kw) -> Incoming:
        kw.setdefault("rest", b"\r\nbody text\r\n")
        return Incoming("Q1", "bob@remote.test", MESSAGE, prefix=b"Return-Path: <x>\r\n", **kw)

    @staticmethod
    def files(folder: Path) -> list[Path]:
        return sorted(p for d in ("new", "cur") for p in (folder / d).iterdir())

    @defer.inlineCallbacks
    def test_plugin_folder_and_headers(self):
        plugin = Plugin(FilterDecision(add_headers=(("X-Checked", "yes"),), folder="Archive"))
        outcomes = yield self.sieve([plugin]).deliver(self.incoming(), self.targets)
        self.assertTrue(outcomes[0].ok)
        [stored] = self.files(self.alice / ".Archive")
        data = stored.read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <x>\r\nX-Checked: yes\r\nFrom:"))
        self.assertEqual(plugin.seen[0].header, MESSAGE)
        self.assertEqual(plugin.seen[0].recipients, ("alice@example.test",))
        self.assertEqual(plugin.seen[0].open_body().read(), b"body text\r\n")

    @defer.inlineCallbacks
    def test_fileinto_wins_over_the_plugin_folder(self):
        self.script(self.alice, 'require "fileinto";\nfileinto "Trash";\n')
        plugin = Plugin(FilterDecision(folder="Archive"))
        yield self.sieve([plugin]).deliver(self.incoming(), self.targets)
        self.assertEqual(len(self.files(self.alice / ".Trash")), 1)
        self.assertEqual(self.files(self.alice / ".Archive"), [])

    @defer.inlineCallbacks
    def test_plugin_reject_and_defer(self):
        for action, code in (("reject", 550), ("defer", 451)):
            plugin = Plugin(FilterDecision(action, reply="no\r\nthanks"))
            with self.assertRaises(SMTPReplyError) as caught:
                yield self.sieve([plugin]).deliver(self.incoming(), self.targets)
            self.assertEqual(caught.exception.reply.code, code)
        self.assertEqual(self.files(self.alice), [])

    @defer.inlineCallbacks
    def test_reject_at_smtp_time_only_with_one_mailbox(self):
        self.script(self.alice, 'require "reject";\nreject "not here";\n')
        with self.assertRaises(SMTPReplyError) as caught:
            yield self.sieve().deliver(self.incoming(smtp_time=True), self.targets)
        self.assertEqual(str(caught.exception.reply), "550 5.7.1 not here")
        # from the queue (no queue here: the rejection message cannot go, so it is kept)
        outcomes = yield self.sieve().deliver(self.incoming(), self.targets)
        self.assertTrue(outcomes[0].ok and outcomes[0].rejected)
        self.assertEqual(len(self.files(self.alice)), 1)

    @defer.inlineCallbacks
    def test_one_file_for_several_mailboxes_and_edited_header_apart(self):
        self.script(self.bob, 'require "editheader";\naddheader "X-Bob" "1";\n')
        targets = self.targets + [Target("bob@example.test", self.bob, "bob@example.test")]
        outcomes = yield self.sieve().deliver(self.incoming(), targets)
        self.assertTrue(all(o.ok for o in outcomes))
        [a], [b] = self.files(self.alice), self.files(self.bob)
        self.assertNotEqual(os.stat(a).st_ino, os.stat(b).st_ino)
        self.assertIn(b"X-Bob: 1\r\n", b.read_bytes())
        self.assertNotIn(b"X-Bob", a.read_bytes())
        self.assertTrue(b.read_bytes().endswith(b"\r\nbody text\r\n"))

    @defer.inlineCallbacks
    def test_flags_keywords_and_create_from_a_file(self):
        self.script(self.alice, 'require ["fileinto", "imap4flags", "mailbox"];\n'
                    'fileinto :create :flags ["\\\\Seen", "work"] "Projects.A";\n')
        path = self.root / "queued"
        path.write_bytes(MESSAGE + b"\r\n" + b"x" * 100_000 + b"\r\n")
        msg = Incoming("Q2", "bob@remote.test", MESSAGE, path=path, rest_offset=len(MESSAGE))
        outcomes = yield self.sieve().deliver(msg, self.targets)
        self.assertTrue(outcomes[0].ok)
        [stored] = self.files(self.alice / ".Projects.A")
        letter = Keywords.read(self.alice / ".Projects.A").letter("work")
        self.assertTrue(stored.name.endswith(f":2,S{letter}"))
        self.assertEqual(stored.read_bytes(), path.read_bytes())

    @defer.inlineCallbacks
    def test_a_script_that_does_not_compile_keeps(self):
        self.script(self.alice, 'fileinto "x";\n')   # no require
        outcomes = yield self.sieve().deliver(self.incoming(), self.targets)
        self.assertTrue(outcomes[0].ok)
        self.assertEqual(len(self.files(self.alice)), 1)

    def test_a_global_script_that_does_not_compile_stops_the_start(self):
        bad = self.root / "bad.sieve"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_text("fileinto \"x\";\n")
        with self.assertRaises(ConfigError) as caught:
            self.sieve(before=(str(bad),))
        self.assertIn("sieve.before[0]", str(caught.exception))
