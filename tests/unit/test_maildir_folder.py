"""Folder: uids, flags, \\Recent, listeners, append/copy/expunge, the index, Dovecot files."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.maildir import (
    Folder,
    InvalidFlag,
    MaildirStore,
    MessageInfo,
    NoSuchFolder,
    TooManyKeywords,
    UidList,
)
from mailserver.maildir import folder as foldermod
from mailserver.maildir.index import INDEX_NAME

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


class Recorder:
    """A listener that writes down what it hears."""

    def __init__(self) -> None:
        self.added: list[list[MessageInfo]] = []
        self.expunged: list[list[int]] = []
        self.changed: list[list[MessageInfo]] = []

    def messages_added(self, infos: list[MessageInfo]) -> None:
        self.added.append(infos)

    def messages_expunged(self, uids: list[int]) -> None:
        self.expunged.append(uids)

    def flags_changed(self, infos: list[MessageInfo]) -> None:
        self.changed.append(infos)

    @property
    def added_uids(self) -> list[int]:
        return [i.uid for batch in self.added for i in batch]


def drop(maildir: Path, name: str, data: bytes = MESSAGE, subdir: str = "new",
         mtime: float | None = None) -> Path:
    """A message file written the way another process would."""
    path = maildir / subdir / name
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def cur_names(maildir: Path) -> list[str]:
    return sorted(os.listdir(maildir / "cur"))


class FolderTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="folder-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = MaildirStore(self.root / "maildirs", hostname="mx.example.test")
        self.user = self.store.create_user("example.org", "alice")
        self.account = self.store.account(self.user)
        self.addCleanup(self.cancel_coalesced_refreshes)

    def cancel_coalesced_refreshes(self) -> None:
        """A delivery schedules a refresh of watched folders, and a folder scanned while
        it changed a second look (settling); a test may end first."""
        for account in self.store._accounts.values():
            for folder in account._folders.values():
                call = folder._refresh_call
                if call is not None and call.active():
                    call.cancel()
                folder._stop_settling()

    def fresh_folder(self, path: Path | None = None) -> Folder:
        """A Folder object as a new process would build it."""
        return Folder(path or self.user, "INBOX", "mx.example.test")

    @inlineCallbacks
    def deliver(self, data: bytes = MESSAGE, targets: list[Path] | None = None) -> Any:
        d = self.store.begin_delivery(targets or [self.user])
        d.write(data)
        results = yield d.commit()
        assert all(r.ok for r in results)
        return results


class DovecotCompatibility(FolderTestCase):
    """A Maildir as Dovecot leaves it opens with the same uids, UIDVALIDITY and flags."""

    def write_dovecot_maildir(self) -> Path:
        m = self.user / ".Work"
        for sub in ("cur", "new", "tmp"):
            (m / sub).mkdir(parents=True)
        (m / "maildirfolder").write_bytes(b"")
        (m / "dovecot-uidlist").write_text(
            "3 V1700000000 N43 G0123456789abcdef0123456789abcdef\n"
            "7 :1699990000.M11P100.mail,S=47\n"
            "12 W49 :1699990100.M22P100.mail,S=47\n"
            "40 :1699990200.M33P100.mail,S=47\n"
            "41 :1699990300.M44P100.mail,S=47\n")
        (m / "dovecot-keywords").write_text("0 $Junk\n1 Work\n3 $Label5\n")
        drop(m, "1699990000.M11P100.mail,S=47:2,S", subdir="cur", mtime=1699990000)
        drop(m, "1699990100.M22P100.mail,S=47:2,FRS", subdir="cur", mtime=1699990100)
        drop(m, "1699990200.M33P100.mail,S=47:2,PSad", subdir="cur", mtime=1699990200)
        drop(m, "1699990300.M44P100.mail,S=47:2,", subdir="cur", mtime=1699990300)
        drop(m, "1699990400.M55P100.mail,S=47", subdir="new", mtime=1699990400)
        return m

    @inlineCallbacks
    def test_open_dovecot_folder(self):
        m = self.write_dovecot_maildir()
        folder = self.account.folder("Work")
        changes = yield folder.refresh()
        self.assertEqual(folder.uidvalidity, 1700000000)
        self.assertEqual([i.uid for i in changes.added], [7, 12, 40, 41, 43])
        self.assertEqual(folder.uids(), [7, 12, 40, 41, 43])
        self.assertEqual(folder.uidnext, 44)
        flags = {i.uid: i.flags for i in folder.messages}
        self.assertEqual(flags[7], {"\\Seen"})
        self.assertEqual(flags[12], {"\\Flagged", "\\Answered", "\\Seen"})
        self.assertEqual(flags[40], {"\\Seen", "$Junk", "$Label5"})  # P has no IMAP flag
        self.assertEqual(flags[41], frozenset())
        self.assertEqual(flags[43], frozenset())
        self.assertEqual(folder.keywords, ["$Junk", "Work", "$Label5"])
        info = folder.by_uid(12)
        self.assertEqual((info.size, info.internaldate), (47, 1699990100))
        # The new/ message moved to cur/ the way Dovecot moves it, and is \Recent.
        self.assertEqual(os.listdir(m / "new"), [])
        self.assertIn("1699990400.M55P100.mail,S=47:2,", cur_names(m))
        self.assertEqual(folder.recent_count, 1)
        self.assertEqual(folder.claim_recent(object()), {43})
        self.assertEqual(folder.unseen_count, 2)
        self.assertEqual(folder.first_unseen_uid, 41)
        # The list Dovecot reads back: same header values, the new uid added, ext kept.
        text = (m / "dovecot-uidlist").read_text()
        self.assertTrue(text.startswith(
            "3 V1700000000 N44 G0123456789abcdef0123456789abcdef\n"), text)
        self.assertIn("12 W49 :1699990100.M22P100.mail,S=47\n", text)
        self.assertTrue(text.endswith("43 :1699990400.M55P100.mail,S=47\n"), text)

    @inlineCallbacks
    def test_flag_changes_are_what_dovecot_reads(self):
        m = self.write_dovecot_maildir()
        folder = self.account.folder("Work")
        yield folder.refresh()
        yield folder.store_flags([40], {"Work", "\\Flagged"}, "add")
        yield folder.store_flags([41], {"$Forwarded"}, "set")
        names = cur_names(m)
        self.assertIn("1699990200.M33P100.mail,S=47:2,FPSabd", names)  # P kept, sorted
        self.assertIn("1699990300.M44P100.mail,S=47:2,c", names)  # first free letter
        self.assertEqual((m / "dovecot-keywords").read_text(),
                         "0 $Junk\n1 Work\n2 $Forwarded\n3 $Label5\n")
        yield folder.store_flags([40], {"$junk"}, "remove")  # keywords ignore case
        self.assertEqual(folder.by_uid(40).flags, {"\\Seen", "\\Flagged", "Work", "$Label5"})


class UidAssignment(FolderTestCase):
    @inlineCallbacks
    def test_uids_stable_across_reload(self):
        for _ in range(3):
            yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        before = [(i.uid, i.basename, i.flags) for i in folder.messages]
        self.assertEqual([u for u, _, _ in before], [1, 2, 3])
        again = self.fresh_folder()
        yield again.refresh()
        self.assertEqual([(i.uid, i.basename, i.flags) for i in again.messages], before)
        self.assertEqual((again.uidvalidity, again.uidnext), (folder.uidvalidity, 4))
        self.assertEqual(again.recent_count, 0)  # nothing new for the second process

    @inlineCallbacks
    def test_who_asks_during_the_first_load_gets_its_answer(self):
        # A login starts loading the INBOX while its password is checked; the SELECT or
        # POP3 open that follows waits for that load instead of scanning once more.
        for _ in range(3):
            yield self.deliver()
        folder = self.fresh_folder()
        scans: list[bool] = []
        real = folder._disk.sync
        self.patch(folder._disk, "sync",
                   lambda view, force=False: scans.append(view.loaded) or real(view, force))
        first, second, third = folder.refresh(), folder.refresh(), folder.refresh()
        yield first
        yield second
        yield third
        self.assertEqual(scans, [False])         # one scan, the first load
        self.assertEqual([i.uid for i in folder.messages], [1, 2, 3])
        yield self.deliver()
        yield folder.refresh(force=True)          # after the load: a scan of its own
        self.assertEqual(scans, [False, True])
        self.assertEqual(folder.exists, 4)
        yield folder.close()

    @inlineCallbacks
    def test_a_failed_first_load_fails_its_waiters_too(self):
        folder = self.fresh_folder(self.user / ".NoSuch")
        first, second = folder.refresh(), folder.refresh()
        with self.assertRaises(NoSuchFolder):
            yield first
        with self.assertRaises(NoSuchFolder):
            yield second

    @inlineCallbacks
    def test_an_open_after_a_restart_reads_the_index_and_sees_what_changed_meanwhile(self):
        # The index knows most messages; while the server was down one was read
        # elsewhere (renamed with :2,S), one deleted, one delivered to new/, one put in
        # cur/ with no size in its name: the next process's open tells them all apart.
        for _ in range(4):
            yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        before = {i.uid: i for i in folder.messages}
        highest = folder.highestmodseq
        yield folder.close()
        read = before[2]
        os.rename(self.user / read.subdir / read.filename, self.user / "cur" / (
            read.basename + ":2,S"))
        gone = before[3]
        os.unlink(self.user / gone.subdir / gone.filename)
        drop(self.user, "1900000000.M1P1.other", mtime=1900000000)
        drop(self.user, "1900000001.M1P1.other:2,", subdir="cur", mtime=1900000001)
        again = self.fresh_folder()
        yield again.refresh()
        after = {i.uid: i for i in again.messages}
        self.assertEqual(sorted(after), [1, 2, 4, 5, 6])
        for uid in (1, 4):   # untouched: as they were, not \Recent, same mod-sequence
            self.assertEqual((after[uid].basename, after[uid].size, after[uid].modseq,
                              after[uid].internaldate, after[uid].recent),
                             (before[uid].basename, before[uid].size, before[uid].modseq,
                              before[uid].internaldate, False))
        self.assertEqual(after[2].flags, frozenset({"\\Seen"}))
        self.assertGreater(after[2].modseq, highest)
        self.assertEqual([after[5].basename, after[6].basename],
                         ["1900000000.M1P1.other", "1900000001.M1P1.other"])
        self.assertEqual((after[5].size, after[6].size), (len(MESSAGE), len(MESSAGE)))
        self.assertEqual(after[6].internaldate, 1900000001)
        self.assertTrue(after[5].recent and after[6].recent)
        yield again.close()

    @inlineCallbacks
    def test_files_of_one_mtime_get_uids_in_the_order_their_names_were_made(self):
        # A clock tick of the file system can give several deliveries one mtime: their
        # unique names decide, number by number (M99999 was made before M100000).
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        names = ["1700000000.M99998P7Q9.h,S=47", "1700000000.M99999P7Q10.h,S=47",
                 "1700000000.M100000P7Q11.h,S=47", "1700000000.M100001P7Q12.h,S=47"]
        for name in reversed(names):
            drop(self.user, name, mtime=1700000000.5)
        changes = yield folder.refresh()
        self.assertEqual([(i.uid, i.basename) for i in changes.added],
                         list(enumerate(names, start=1)))

    @inlineCallbacks
    def test_new_files_get_increasing_uids_in_mtime_order(self):
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        recorder = Recorder()
        folder.add_listener(recorder)
        drop(self.user, "1000.M1P1.other,S=47", mtime=1000)
        drop(self.user, "999.M9P9.other,S=47", mtime=3000)
        drop(self.user, "500.M5P5.other", subdir="cur", mtime=2000)
        changes = yield folder.refresh()
        self.assertEqual([(i.uid, i.basename) for i in changes.added], [
            (1, "1000.M1P1.other,S=47"), (2, "500.M5P5.other"), (3, "999.M9P9.other,S=47")])
        self.assertEqual(recorder.added_uids, [1, 2, 3])
        self.assertEqual(folder.by_uid(2).size, len(MESSAGE))  # no S=: from stat
        drop(self.user, "4000.M1P1.other,S=47", mtime=4000)
        changes = yield folder.refresh()
        self.assertEqual([i.uid for i in changes.added], [4])
        self.assertEqual(recorder.added_uids, [1, 2, 3, 4])
        self.assertEqual(folder.claim_recent("session"), {1, 2, 3, 4})
        self.assertEqual(folder.claim_recent("other session"), set())

    @inlineCallbacks
    def test_refresh_is_cheap_when_nothing_changed(self):
        yield self.deliver()
        folder = self.account.folder("INBOX")
        self.patch(foldermod, "DIRTY_WINDOW", 0.0)
        yield folder.refresh()
        yield folder.refresh()  # rescans once: the first scan moved a file to cur/
        listed = []
        real = os.listdir
        self.patch(os, "listdir", lambda p: (listed.append(p), real(p))[1])
        changes = yield folder.refresh()
        self.assertFalse(changes)
        self.assertEqual(listed, [])

    @inlineCallbacks
    def test_watched_dirty_folder_settles_in_the_background(self):
        """A watched folder scanned while it was changing is not rescanned at every
        refresh: the stamps are trusted until a background look (settling) rescans it,
        which finds even a change that left the directory's mtime as it was."""
        for _ in range(2):
            yield self.deliver()
        folder = self.account.folder("INBOX")
        recorder = Recorder()
        folder.add_listener(recorder)
        yield folder.refresh()  # moves the files to cur/: changing right now
        self.assertTrue(folder._dirty)
        self.assertTrue(folder._settling)
        two = folder.by_uid(2)
        cur = self.user / "cur"
        st = os.stat(cur)
        os.rename(cur / two.filename, cur / (two.basename + ":2,S"))
        os.utime(cur, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if within the same tick
        listed = []
        real = os.listdir
        self.patch(os, "listdir", lambda p: (listed.append(p), real(p))[1])
        changes = yield folder.refresh()
        self.assertFalse(changes)
        self.assertEqual(listed, [])  # trusted the stamps: no rescan
        folder._stop_settling()
        yield folder.refresh(force=True)  # what the background look does
        self.assertNotEqual(listed, [])
        self.assertEqual([(i.uid, i.flags) for batch in recorder.changed for i in batch],
                         [(2, {"\\Seen"})])

    @inlineCallbacks
    def test_external_delete_and_flag_change(self):
        for _ in range(3):
            yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        recorder = Recorder()
        folder.add_listener(recorder)
        one, two = folder.by_uid(1), folder.by_uid(2)
        os.unlink(self.user / "cur" / one.filename)
        os.rename(self.user / "cur" / two.filename,
                  self.user / "cur" / (two.basename + ":2,RS"))
        changes = yield folder.refresh()
        self.assertEqual(changes.expunged, [1])
        self.assertEqual([(i.uid, i.flags) for i in changes.flags_changed],
                         [(2, {"\\Answered", "\\Seen"})])
        self.assertEqual(recorder.expunged, [[1]])
        self.assertEqual(folder.uids(), [2, 3])
        ul = UidList.read(self.user)
        self.assertEqual([u for u, _ in ul.items()], [2, 3])  # stale record dropped

    @inlineCallbacks
    def test_uidlist_recreated_elsewhere_changes_uidvalidity(self):
        yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        old = folder.uidvalidity

        class Session(Recorder):
            reset = 0

            def uidvalidity_changed(self, f):
                self.reset += 1
        session = Session()
        folder.add_listener(session)
        os.unlink(self.user / "dovecot-uidlist")
        changes = yield folder.refresh()
        self.assertTrue(changes.uidvalidity_changed)
        self.assertGreater(folder.uidvalidity, old)
        self.assertEqual(session.reset, 1)
        self.assertEqual(folder.uids(), [1])

    @inlineCallbacks
    def test_damaged_uidlist_keeps_known_uids(self):
        for _ in range(2):
            yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        uidvalidity = folder.uidvalidity
        path = self.user / "dovecot-uidlist"
        path.write_bytes(b"3 garbage\n" + path.read_bytes().split(b"\n", 1)[1] + b"junk\n")
        again = self.fresh_folder()
        yield again.refresh()  # uidvalidity comes back from the index
        self.assertEqual(again.uidvalidity, uidvalidity)
        self.assertEqual(again.uids(), [1, 2])
        self.assertTrue(path.read_bytes().startswith(f"3 V{uidvalidity} N3 ".encode()))

    @inlineCallbacks
    def test_open_message_after_external_rename(self):
        yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        info = folder.by_uid(1)
        os.rename(self.user / "cur" / info.filename, self.user / "cur" / (info.basename + ":2,S"))
        with folder.open_message(1) as f:
            self.assertEqual(f.read(), MESSAGE)
        os.unlink(self.user / "cur" / (info.basename + ":2,S"))
        self.assertRaises(FileNotFoundError, folder.open_message, 1)
        self.assertRaises(KeyError, folder.open_message, 2)

    @inlineCallbacks
    def test_failing_listener_does_not_stop_others(self):
        folder = self.account.folder("INBOX")
        yield folder.refresh()

        class Broken(Recorder):
            def messages_added(self, infos):
                raise RuntimeError("session bug")
        broken, good = Broken(), Recorder()
        folder.add_listener(broken)
        folder.add_listener(good)
        yield self.deliver()
        yield folder.refresh()
        self.assertEqual(good.added_uids, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        folder.remove_listener(good)
        folder.remove_listener(good)
        yield self.deliver()
        yield folder.refresh()
        self.assertEqual(good.added_uids, [1])
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_missing_folder(self):
        folder = self.fresh_folder(self.user / ".Nothing")
        yield self.assertFailure(folder.refresh(), NoSuchFolder)


class Changes(FolderTestCase):
    @inlineCallbacks
    def setUp(self):
        super().setUp()
        for _ in range(4):
            yield self.deliver()
        self.folder = self.account.folder("INBOX")
        yield self.folder.refresh()
        self.me, self.other = Recorder(), Recorder()
        self.folder.add_listener(self.me)
        self.folder.add_listener(self.other)

    @inlineCallbacks
    def test_store_flags(self):
        changed = yield self.folder.store_flags([1, 2, 99], {"\\Seen", "\\recent"}, "add",
                                                origin=self.me)
        self.assertEqual([(i.uid, i.flags) for i in changed],
                         [(1, {"\\Seen"}), (2, {"\\Seen"})])
        self.assertEqual(self.me.changed, [])
        self.assertEqual([[i.uid for i in b] for b in self.other.changed], [[1, 2]])
        self.assertTrue(changed[0].filename.endswith(":2,S"))
        self.assertTrue((self.user / "cur" / changed[0].filename).exists())
        again = yield self.folder.store_flags([1, 2], {"\\Seen"}, "add", origin=self.me)
        self.assertEqual(again, [])  # nothing changed, nobody told
        self.assertEqual(len(self.other.changed), 1)
        changed = yield self.folder.store_flags([1], {"\\Flagged", "$Work"}, "set")
        self.assertEqual(changed[0].flags, {"\\Flagged", "$Work"})
        self.assertTrue(changed[0].filename.endswith(":2,Fa"))
        self.assertEqual(len(self.me.changed), 1)  # no origin: everybody hears
        changed = yield self.folder.store_flags([1], {"$work"}, "remove")
        self.assertEqual(changed[0].flags, {"\\Flagged"})
        fresh = self.fresh_folder()
        yield fresh.refresh()
        self.assertEqual({i.uid: i.flags for i in fresh.messages},
                         {i.uid: i.flags for i in self.folder.messages})

    @inlineCallbacks
    def test_store_flags_bad_input(self):
        yield self.assertFailure(self.folder.store_flags([1], {"\\Bogus"}, "add"),
                                 InvalidFlag)
        yield self.assertFailure(self.folder.store_flags([1], {"a b"}, "add"), InvalidFlag)

    @inlineCallbacks
    def test_too_many_keywords(self):
        yield self.folder.store_flags([1], {f"k{i}" for i in range(26)}, "add")
        before = cur_names(self.user)
        yield self.assertFailure(
            self.folder.store_flags([2], {"k1", "twenty-seventh"}, "add"), TooManyKeywords)
        self.assertEqual(cur_names(self.user), before)
        self.assertFalse(self.folder.can_create_keywords)
        changed = yield self.folder.store_flags([2], {"K1"}, "add")  # existing: fine
        self.assertEqual(changed[0].flags, {"k1"})

    @inlineCallbacks
    def test_store_flags_follows_external_rename_and_expunge(self):
        one, two = self.folder.by_uid(1), self.folder.by_uid(2)
        os.rename(self.user / "cur" / one.filename, self.user / "cur" / (one.basename + ":2,F"))
        os.unlink(self.user / "cur" / two.filename)
        changed = yield self.folder.store_flags([1, 2], {"\\Seen"}, "add", origin=self.me)
        self.assertEqual([(i.uid, i.flags) for i in changed], [(1, {"\\Flagged", "\\Seen"})])
        self.assertEqual(self.me.expunged, [[2]])  # vanished: even the origin hears it
        self.assertEqual(self.folder.uids(), [1, 3, 4])
        self.assertIn(one.basename + ":2,FS", cur_names(self.user))

    @inlineCallbacks
    def test_expunge(self):
        yield self.folder.store_flags([1, 3, 4], {"\\Deleted"}, "add")
        expunged = yield self.folder.expunge([3, 4, 2], origin=self.me)  # UID EXPUNGE
        self.assertEqual(expunged, [3, 4])
        self.assertEqual(self.other.expunged, [[3, 4]])
        self.assertEqual(self.me.expunged, [])
        expunged = yield self.folder.expunge(origin=self.me)
        self.assertEqual(expunged, [1])
        self.assertEqual(self.folder.uids(), [2])
        self.assertEqual(len(cur_names(self.user)), 1)
        self.assertEqual([u for u, _ in UidList.read(self.user).items()], [2])
        self.assertEqual(self.folder.uidnext, 5)

    @inlineCallbacks
    def test_delete_messages(self):
        deleted = yield self.folder.delete_messages([4, 2, 42], origin=self.me)
        self.assertEqual(deleted, [2, 4])
        self.assertEqual(self.other.expunged, [[2, 4]])
        self.assertEqual(self.folder.uids(), [1, 3])
        self.assertEqual(self.folder.exists, 2)

    @inlineCallbacks
    def test_append(self):
        writer = self.folder.begin_append({"\\Seen", "$Label1"}, internaldate=1234567890.0,
                                          origin=self.me)
        for piece in (MESSAGE[:10], MESSAGE[10:]):
            writer.write(piece)
        self.assertEqual(writer.size, len(MESSAGE))
        info = yield writer.commit()
        self.assertEqual((info.uid, info.flags, info.size, info.internaldate),
                         (5, {"\\Seen", "$Label1"}, len(MESSAGE), 1234567890.0))
        path = self.user / "cur" / info.filename
        self.assertTrue(info.filename.endswith(f",S={len(MESSAGE)}:2,Sa"), info.filename)
        self.assertEqual(path.read_bytes(), MESSAGE)
        self.assertEqual(path.stat().st_mtime, 1234567890.0)
        self.assertEqual(os.listdir(self.user / "tmp"), [])
        self.assertEqual(self.other.added_uids, [5])
        self.assertEqual(self.me.added, [])
        self.assertEqual(self.folder.uidnext, 6)
        self.assertEqual(UidList.read(self.user).lookup(info.basename), 5)
        with self.folder.open_message(5) as f:
            self.assertEqual(f.read(), MESSAGE)

    @inlineCallbacks
    def test_append_abort_and_bad_flags(self):
        writer = self.folder.begin_append()
        writer.write(b"x" * 100)
        writer.abort()
        writer.abort()
        self.assertEqual(os.listdir(self.user / "tmp"), [])
        self.assertRaises(InvalidFlag, self.folder.begin_append, {"\\Nope"})
        writer = self.folder.begin_append({f"kw{i}" for i in range(27)})
        writer.write(MESSAGE)
        yield self.assertFailure(writer.commit(), TooManyKeywords)
        self.assertEqual(os.listdir(self.user / "tmp"), [])
        self.assertEqual(self.folder.uids(), [1, 2, 3, 4])

    @inlineCallbacks
    def test_append_that_fails_after_its_rename_leaves_nothing(self):
        """The uid list cannot be written (ENOSPC) after the file went into cur/: the
        client is told NO, so the file goes too (a retry would store it twice)."""
        from mailserver.maildir import uidlist as uidlistmod

        def full(*a, **kw):
            raise OSError(28, "No space left on device")
        before = sorted(os.listdir(self.user / "cur"))
        self.patch(uidlistmod.UidList, "write", full)
        writer = self.folder.begin_append(origin=self.me)
        writer.write(MESSAGE)
        yield self.assertFailure(writer.commit(), OSError)
        self.assertEqual(os.listdir(self.user / "tmp"), [])
        self.assertEqual(sorted(os.listdir(self.user / "cur")), before)
        self.assertEqual(self.folder.uids(), [1, 2, 3, 4])

    @inlineCallbacks
    def test_append_after_another_process_assigned_uids(self):
        """Our uid comes after every uid another process handed out meanwhile."""
        drop(self.user, "77.M1P1.other,S=47", subdir="cur")
        ul = UidList.read(self.user)
        ul.add("77.M1P1.other,S=47")
        ul.write()
        writer = self.folder.begin_append(origin=self.me)
        writer.write(MESSAGE)
        info = yield writer.commit()
        self.assertEqual(info.uid, 6)
        self.assertEqual(self.folder.uids(), [1, 2, 3, 4, 5, 6])
        self.assertEqual(self.me.added_uids, [5])  # found by the sync, not our own append

    @inlineCallbacks
    def test_copy_to(self):
        sent = self.account.folder("Sent")
        yield sent.refresh()
        sent_listener = Recorder()
        sent.add_listener(sent_listener)
        yield self.folder.store_flags([2], {"\\Answered", "Work"}, "add")
        yield sent.store_flags([], {"Other"}, "add")  # no messages: nothing defined
        pairs = yield self.folder.copy_to([3, 2, 99], sent, origin=sent_listener)
        self.assertEqual(pairs, [(2, 1), (3, 2)])
        self.assertEqual(sent_listener.added, [])
        self.assertEqual([(i.uid, i.flags) for i in sent.messages],
                         [(1, {"\\Answered", "Work"}), (2, frozenset())])
        src = self.folder.by_uid(2)
        dst = sent.by_uid(1)
        self.assertNotEqual(src.basename, dst.basename)
        self.assertEqual((dst.size, dst.internaldate), (src.size, src.internaldate))
        self.assertEqual(os.stat(self.folder.message_path(2)).st_ino,
                         os.stat(sent.message_path(1)).st_ino)  # hard link
        self.assertEqual((sent.path / "dovecot-keywords").read_text(), "0 Work\n")
        self.assertEqual(sent.claim_recent("s"), {1, 2})
        pairs = yield self.folder.copy_to([1], self.folder)  # into itself
        self.assertEqual(pairs, [(1, 5)])
        self.assertEqual(self.me.added_uids, [5])

    @inlineCallbacks
    def test_copy_without_links(self):
        def no_link(src, dst):
            raise OSError(18, "Invalid cross-device link")
        self.patch(os, "link", no_link)
        trash = self.account.folder("Trash")
        pairs = yield self.folder.copy_to([1], trash)
        self.assertEqual(pairs, [(1, 1)])
        self.assertEqual(trash.open_message(1).read(), MESSAGE)
        self.assertEqual(trash.by_uid(1).internaldate, self.folder.by_uid(1).internaldate)
        self.assertEqual(os.listdir(trash.path / "tmp"), [])

    @inlineCallbacks
    def test_claim_recent(self):
        self.assertEqual(self.folder.recent_count, 4)
        first = self.folder.claim_recent(self.me)
        self.assertEqual(first, {1, 2, 3, 4})
        self.assertEqual(self.folder.recent_count, 0)
        self.assertEqual(self.folder.claim_recent(self.other), set())
        yield self.deliver()
        yield self.folder.refresh()
        self.assertEqual(self.other.added_uids, [5])
        self.assertEqual(self.folder.claim_recent(self.other), {5})
        self.assertEqual(self.folder.claim_recent(self.me), set())

    @inlineCallbacks
    def test_notify_delivered(self):
        d = self.store.begin_delivery([self.user])
        d.write(MESSAGE)
        yield d.commit()
        self.store.notify_delivered([self.user])
        # Deliveries close together share one refresh, a moment later.
        yield deferLater(reactor, foldermod.REFRESH_COALESCE * 3, lambda: None)
        yield self.folder.refresh()
        self.assertEqual(self.me.added_uids, [5])
        self.assertEqual(self.other.added_uids, [5])

    @inlineCallbacks
    def test_notify_delivered_leaves_unloaded_folders_alone(self):
        other = self.store.create_user("example.org", "bob")
        yield self.deliver(targets=[other, self.user / ".Junk"])
        self.store.notify_delivered([other, self.user / ".Junk"])
        self.assertNotIn(other, self.store._accounts)
        self.assertIsNone(self.account.loaded_folder("Junk"))

    @inlineCallbacks
    def test_total_size(self):
        self.assertEqual(self.folder.total_size(), 4 * len(MESSAGE))
        yield self.folder.delete_messages([1])
        self.assertEqual(self.folder.total_size(), 3 * len(MESSAGE))

    @inlineCallbacks
    def test_cache(self):
        self.folder.cache_put(1, "envelope", "(NIL \"hello\")")
        self.folder.cache_put(2, "header:SUBJECT", b"Subject: hello\r\n")
        self.assertEqual(self.folder.cache_get(1, "envelope"), "(NIL \"hello\")")
        written = yield self.folder.flush_cache()
        self.assertEqual(written, 2)
        self.assertEqual(self.folder.cache_get_many([1, 2, 3], "header:SUBJECT"),
                         {2: b"Subject: hello\r\n"})
        yield self.folder.delete_messages([2])
        yield self.folder.close()
        fresh = self.fresh_folder()
        yield fresh.refresh()
        self.assertEqual(fresh.cache_get(1, "envelope"), "(NIL \"hello\")")
        self.assertIsNone(fresh.cache_get(2, "header:SUBJECT"))
        self.assertIsNone(fresh.cache_get(3, "envelope"))
        yield fresh.close()

    @inlineCallbacks
    def test_a_large_cache_write_lets_commands_in_between_its_parts(self):
        # The sort keys of a large folder take a second to write: a command that comes
        # meanwhile waits for one part, not for all of them.
        self.patch(foldermod, "FLUSH_PER_WRITE", 2)
        for uid in (1, 2, 3, 4):
            for n in range(3):
                self.folder.cache_put(uid, f"k{n}", f"v{uid}.{n}")
        order: list[str] = []
        real = self.folder._index.flush
        self.patch(self.folder._index, "flush",
                   lambda limit=None: order.append("part") or real(limit))
        flushed = self.folder.flush_cache()
        command = self.folder.read_in_thread(lambda view: order.append("command"))
        written = yield flushed
        yield command
        self.assertEqual(written, 12)
        self.assertEqual(order.count("part"), 6)
        self.assertLess(order.index("command"), 2)   # after the first part at the latest
        fresh = self.fresh_folder()
        yield fresh.refresh()
        self.assertEqual(fresh.cache_get(4, "k2"), "v4.2")
        yield fresh.close()

    @inlineCallbacks
    def test_cache_flushes_by_itself(self):
        from twisted.internet.task import Clock
        clock = Clock()
        folder = Folder(self.user, "INBOX", "mx.example.test", clock=clock)
        yield folder.refresh()
        folder.cache_put(1, "envelope", "x")
        self.assertEqual(folder._index.pending, 1)
        clock.advance(foldermod.CACHE_FLUSH_DELAY)
        yield folder._executor.submit(lambda: None)
        yield folder.close()
        self.assertEqual(folder._index.pending, 0)


class Index(FolderTestCase):
    @inlineCallbacks
    def test_corrupt_index_is_rebuilt(self):
        for _ in range(3):
            yield self.deliver()
        folder = self.account.folder("INBOX")
        yield folder.refresh()
        folder.cache_put(1, "envelope", "x")
        yield folder.close()
        for suffix in ("-wal", "-shm"):
            try:
                os.unlink(str(self.user / INDEX_NAME) + suffix)
            except FileNotFoundError:
                pass
        (self.user / INDEX_NAME).write_bytes(b"this is not a database" * 100)
        fresh = self.fresh_folder()
        yield fresh.refresh()
        self.assertEqual(fresh.uids(), [1, 2, 3])
        self.assertIsNone(fresh.cache_get(1, "envelope"))
        fresh.cache_put(1, "envelope", "y")
        yield fresh.close()
        again = self.fresh_folder()
        yield again.refresh()
        self.assertEqual(again.cache_get(1, "envelope"), "y")
        yield again.close()

    @inlineCallbacks
    def test_large_folder_opens_fast_and_second_open_stats_nothing(self):
        n = 10_000
        cur = self.user / "cur"
        base_time = 1_600_000_000
        for i in range(n):
            name = f"{base_time + i}.M{i}P1.other,S={len(MESSAGE)}:2,{'S' if i % 2 else ''}"
            fd = os.open(cur / name, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, MESSAGE)
            os.close(fd)
            os.utime(cur / name, (base_time + i, base_time + i))
        started = time.perf_counter()
        folder = self.fresh_folder()
        yield folder.refresh()
        first = time.perf_counter() - started
        self.assertEqual(folder.exists, n)
        self.assertEqual(folder.uids()[-1], n)
        self.assertEqual(folder.by_uid(n).internaldate, base_time + n - 1)
        yield folder.close()

        stats: list[str] = []
        opened: list[str] = []
        real_stat, real_open = os.stat, os.open

        def counting_stat(path, *args, **kwargs):
            if Path(path).parent.name in ("cur", "new"):
                stats.append(str(path))
            return real_stat(path, *args, **kwargs)

        def counting_open(path, *args, **kwargs):
            if Path(path).parent.name in ("cur", "new"):
                opened.append(str(path))
            return real_open(path, *args, **kwargs)
        self.patch(os, "stat", counting_stat)
        self.patch(os, "lstat", counting_stat)
        self.patch(os, "open", counting_open)
        started = time.perf_counter()
        again = self.fresh_folder()
        yield again.refresh()
        second = time.perf_counter() - started
        print(f"\n{n}-message folder: first open {first:.2f}s, second open {second:.2f}s")
        self.assertEqual(stats, [])
        self.assertEqual(opened, [])
        self.assertEqual(again.exists, n)
        self.assertEqual(again.by_uid(n).internaldate, base_time + n - 1)
        self.assertEqual(again.unseen_count, n // 2)
        yield again.close()
