"""MailAccount: the folder tree, names that must not escape the Maildir, subscriptions."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.maildir import (
    DEFAULT_FOLDERS,
    FolderBusy,
    FolderError,
    FolderExists,
    FolderNotEmpty,
    InvalidFolderName,
    MaildirStore,
    NoSuchFolder,
    UidList,
    format_subscriptions,
    parse_subscriptions,
)
from mailserver.maildir import account as account_mod

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


class Listener:
    def __init__(self) -> None:
        self.expunged: list[int] = []

    def messages_added(self, infos):
        pass

    def messages_expunged(self, uids):
        self.expunged += uids

    def flags_changed(self, infos):
        pass


class AccountTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="account-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = MaildirStore(self.root / "maildirs", hostname="mx.example.test")
        self.user = self.store.create_user("example.org", "alice")
        self.account = self.store.account(self.user)
        self.addCleanup(self.account.close)

    def names(self) -> list[str]:
        return [e.name for e in self.account.list_folders()]

    def attrs(self) -> dict[str, tuple[str, ...]]:
        return {e.name: e.attributes for e in self.account.list_folders()}

    @inlineCallbacks
    def fill(self, name: str, count: int):
        folder = self.account.folder(name)
        for _ in range(count):
            w = folder.begin_append()
            w.write(MESSAGE)
            yield w.commit()
        return folder


class Listing(AccountTestCase):
    def test_store_keeps_one_account_per_user(self):
        self.assertIs(self.store.account(self.user), self.account)
        self.assertIs(self.store.account(self.user / "." / ""), self.account)
        self.assertIsNot(self.store.account(self.store.create_user("example.org", "bob")),
                         self.account)
        self.assertRaises(ValueError, self.store.account, self.root)

    def test_default_tree(self):
        self.assertEqual(self.names(), ["INBOX", *sorted(DEFAULT_FOLDERS)])
        attrs = self.attrs()
        self.assertEqual(attrs["INBOX"], ("\\HasNoChildren",))
        self.assertEqual(attrs["Sent"], ("\\HasNoChildren", "\\Sent"))
        self.assertEqual(attrs["Trash"], ("\\HasNoChildren", "\\Trash"))
        self.assertEqual(attrs["Junk"], ("\\HasNoChildren", "\\Junk"))
        self.assertEqual(attrs["Drafts"], ("\\HasNoChildren", "\\Drafts"))
        self.assertEqual(attrs["Archive"], ("\\HasNoChildren", "\\Archive"))

    def test_folders_are_shared(self):
        self.assertIs(self.account.folder("INBOX"), self.account.folder("inbox"))
        self.assertIs(self.account.folder("Sent"), self.account.folder("Sent"))
        self.assertEqual(self.account.folder("iNbOx").name, "INBOX")
        self.assertRaises(NoSuchFolder, self.account.folder, "Nope")
        self.assertIsNone(self.account.loaded_folder("Junk"))

    def test_foreign_directories_listed_by_decoded_name(self):
        for d in (".Entw&APw-rfe", ".a.b", ".bad&name", "..DOVECOT-TRASHED"):
            (self.user / d / "cur").mkdir(parents=True)
        attrs = self.attrs()
        self.assertIn("Entwürfe", attrs)
        self.assertEqual(attrs["a"], ("\\Noselect", "\\HasChildren"))
        self.assertEqual(attrs["a.b"], ("\\HasNoChildren",))
        self.assertNotIn("bad&name", attrs)
        self.assertEqual(len([n for n in attrs if "TRASHED" in n]), 0)


class Create(AccountTestCase):
    def test_create_with_parents(self):
        self.account.create_folder("Projects.2024.Q1")
        for name in ("Projects", "Projects.2024", "Projects.2024.Q1"):
            d = self.user / f".{name}"
            for sub in ("cur", "new", "tmp"):
                self.assertTrue((d / sub).is_dir(), d / sub)
            self.assertTrue((d / "maildirfolder").exists())
            self.assertIsNotNone(UidList.read(d))
        attrs = self.attrs()
        self.assertEqual(attrs["Projects"], ("\\HasChildren",))
        self.assertEqual(attrs["Projects.2024.Q1"], ("\\HasNoChildren",))
        self.assertRaises(FolderExists, self.account.create_folder, "Projects.2024")
        self.assertRaises(FolderExists, self.account.create_folder, "inbox")
        self.account.create_folder("Projects.2025.")  # trailing separator
        self.assertIn("Projects.2025", self.names())

    def test_create_unicode_and_inbox_children(self):
        self.account.create_folder("Entwürfe")
        self.assertTrue((self.user / ".Entw&APw-rfe").is_dir())
        self.account.create_folder("inbox.Lists")
        self.assertTrue((self.user / ".INBOX.Lists").is_dir())
        self.assertEqual(self.attrs()["INBOX"], ("\\HasChildren",))
        self.assertIn("INBOX.Lists", self.names())
        # Only an ASCII "inbox" is INBOX: str.upper() of a dotless i is "I" too.
        self.account.create_folder("\u0131nbox")
        self.account.create_folder("\u0131nbox.x")
        self.assertIn("\u0131nbox.x", self.names())
        self.assertNotIn("INBOX.x", self.names())

    @inlineCallbacks
    def test_new_folders_get_distinct_uidvalidity(self):
        self.account.create_folder("x")
        first = UidList.read(self.user / ".x").uidvalidity
        yield self.account.delete_folder("x")
        self.account.create_folder("x")
        self.assertGreater(UidList.read(self.user / ".x").uidvalidity, first)

    def test_unsafe_names_refused(self):
        bad = ["..", ".", "../x", "a/b", "/etc", "a..b", ".hidden", "x.", "a\x00b",
               "a\nb", "*", "a%", "Work.*", "x" * 256, "é" * 200, ""]
        for name in bad:
            for call in (self.account.create_folder, self.account.delete_folder,
                         self.account.subscribe, lambda n: self.account.rename_folder("Sent", n),
                         lambda n: self.account.rename_folder(n, "Elsewhere")):
                if name == "x." and call == self.account.create_folder:
                    continue  # "x." is CREATE's "x with children to come"
                self.assertRaises(InvalidFolderName, call, name)
            self.assertRaises(InvalidFolderName, self.account.folder, name)
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), ["maildirs"])
        self.assertEqual(sorted(os.listdir(self.user.parent)), ["alice"])


class Delete(AccountTestCase):
    @inlineCallbacks
    def test_delete_folder_with_messages(self):
        self.account.create_folder("Old")
        folder = yield self.fill("Old", 3)
        listener = Listener()
        folder.add_listener(listener)
        cleanup = self.account.delete_folder("Old")
        self.assertFalse((self.user / ".Old").exists())  # gone at once
        self.assertNotIn("Old", self.names())
        self.assertEqual(listener.expunged, [1, 2, 3])
        yield cleanup
        yield self.assertFailure(folder.refresh(), NoSuchFolder)
        self.assertEqual([p for p in os.listdir(self.user) if p.startswith("..")], [])
        self.assertRaises(NoSuchFolder, self.account.delete_folder, "Old")

    @inlineCallbacks
    def test_delete_parent_keeps_children(self):
        self.account.create_folder("a.b")
        yield self.fill("a", 2)
        yield self.account.delete_folder("a")
        self.assertEqual(self.attrs()["a"], ("\\Noselect", "\\HasChildren"))
        self.assertTrue((self.user / ".a.b").is_dir())
        self.assertRaises(NoSuchFolder, self.account.folder, "a")
        self.assertRaises(FolderNotEmpty, self.account.delete_folder, "a")
        yield self.account.delete_folder("a.b")
        self.assertNotIn("a", self.names())

    def test_inbox_cannot_be_deleted(self):
        self.assertRaises(FolderError, self.account.delete_folder, "Inbox")
        self.assertTrue((self.user / "cur").is_dir())


class Rename(AccountTestCase):
    @inlineCallbacks
    def test_rename_with_children(self):
        self.account.create_folder("Work.Clients.Big")
        work = yield self.fill("Work", 2)
        uids = work.uids()
        self.account.subscribe("Work.Clients")
        yield self.account.rename_folder("Work", "Archive.Work")
        names = self.names()
        self.assertNotIn("Work", names)
        for n in ("Archive.Work", "Archive.Work.Clients", "Archive.Work.Clients.Big"):
            self.assertIn(n, names)
        self.assertEqual(self.attrs()["Archive"], ("\\HasChildren", "\\Archive"))
        self.assertIn("Archive.Work.Clients", self.account.subscriptions())
        self.assertNotIn("Work.Clients", self.account.subscriptions())
        # The loaded folder moved along and keeps working with the same uids.
        self.assertIs(self.account.folder("Archive.Work"), work)
        self.assertEqual(work.name, "Archive.Work")
        yield work.refresh()
        self.assertEqual(work.uids(), uids)
        yield work.store_flags(uids, {"\\Seen"}, "add")
        self.assertTrue(all(n.endswith(":2,S") for n in os.listdir(work.path / "cur")))
        self.assertRaises(NoSuchFolder, self.account.folder, "Work")

    def test_rename_refusals(self):
        self.account.create_folder("a.b")
        self.assertRaises(FolderExists, self.account.rename_folder, "a", "Sent")
        self.assertRaises(InvalidFolderName, self.account.rename_folder, "a", "a.b.c")
        self.assertRaises(NoSuchFolder, self.account.rename_folder, "nope", "x")
        self.assertRaises(FolderExists, self.account.rename_folder, "Sent", "INBOX")
        self.account.create_folder("c.b")
        self.assertRaises(FolderExists, self.account.rename_folder, "a", "c")
        self.assertIn("a.b", self.names())

    @inlineCallbacks
    def test_rename_inbox(self):
        inbox = yield self.fill("INBOX", 3)
        yield inbox.store_flags([2], {"Work", "\\Seen"}, "add")
        self.account.create_folder("INBOX.Lists")
        listener = Listener()
        inbox.add_listener(listener)
        uidvalidity, uidnext = inbox.uidvalidity, inbox.uidnext
        yield self.account.rename_folder("INBOX", "Old Inbox")
        self.assertEqual(inbox.uids(), [])
        self.assertEqual(listener.expunged, [1, 2, 3])
        self.assertEqual((inbox.uidvalidity, inbox.uidnext), (uidvalidity, uidnext))
        self.assertIn("INBOX.Lists", self.names())
        old = self.account.folder("Old Inbox")
        yield old.refresh()
        self.assertEqual(old.uids(), [1, 2, 3])
        self.assertEqual(old.by_uid(2).flags, {"Work", "\\Seen"})
        self.assertEqual(old.uidvalidity, uidvalidity)  # a new name: nothing reused
        self.assertTrue((self.user / "cur").is_dir() and (self.user / "new").is_dir())
        w = inbox.begin_append()
        w.write(MESSAGE)
        info = yield w.commit()
        self.assertEqual(info.uid, uidnext)  # no uid reused in INBOX


class Subscriptions(AccountTestCase):
    def test_round_trip(self):
        self.assertEqual(self.account.subscriptions(), ["INBOX", *DEFAULT_FOLDERS])
        self.account.subscribe("Entwürfe.Alt")  # need not exist
        self.account.subscribe("Sent")  # already there
        self.account.unsubscribe("Junk")
        self.account.unsubscribe("Never")
        expected = ["INBOX", "Sent", "Drafts", "Trash", "Archive", "Entwürfe.Alt"]
        self.assertEqual(self.account.subscriptions(), expected)
        data = (self.user / "subscriptions").read_bytes()
        self.assertEqual(data, format_subscriptions(expected))
        self.assertIn(b"Entw&APw-rfe\tAlt\n", data)  # Dovecot's v2 form
        self.assertEqual(parse_subscriptions(data), expected)
        self.assertFalse((self.user / "subscriptions.lock").exists())

    def test_dovecot_v1_file(self):
        (self.user / "subscriptions").write_bytes(b"INBOX\nWork.Sub\n")
        self.account.subscribe("Other")
        self.assertEqual(self.account.subscriptions(), ["INBOX", "Work.Sub", "Other"])


    def test_busy_lock_is_reported(self):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        self.addCleanup(lambda: (proc.kill(), proc.wait()))
        (self.user / "subscriptions.lock").write_text(f"{proc.pid}:{socket.gethostname()}")
        self.patch(account_mod, "SHORT_LOCK_TIMEOUT", 0.2)
        self.assertRaises(FolderBusy, self.account.subscribe, "Other")
        self.assertNotIn("Other", self.account.subscriptions())


class Usage(AccountTestCase):
    @inlineCallbacks
    def test_total_size(self):
        self.assertEqual((yield self.account.usage()), 0)
        yield self.fill("INBOX", 2)
        d = self.store.begin_delivery([self.user / ".Junk"])
        d.write(MESSAGE * 3)
        yield d.commit()
        usage = yield self.account.usage()
        self.assertEqual(usage, 5 * len(MESSAGE))
        self.assertIsNone(self.account.quota)
        self.account.quota = 10_000
        self.assertEqual(self.store.account(self.user).quota, 10_000)
