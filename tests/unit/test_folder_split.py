"""The folder split: the disk side works from snapshots alone, and every disk job of a folder
(SEARCH's included) runs through its executor, one at a time, never beside an edit."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

from twisted.internet import defer
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.maildir import MaildirStore
from mailserver.maildir import folder as foldermod
from mailserver.maildir.executor import CHANGE, INDEX, READ, FolderExecutor
from mailserver.maildir.folder_disk import FolderDisk, FolderView
from mailserver.maildir.index import FolderIndex

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
HOST = "mx.example.test"


def view_of(path: Path, index: FolderIndex, sync=None, infos=None) -> FolderView:
    """What the reactor would hand the disk side: nothing loaded, or after `sync`."""
    infos = {} if infos is None else infos
    return FolderView(path, "INBOX", HOST, index, sync is not None,
                      sync.uidvalidity if sync else 0, MappingProxyType(infos),
                      MappingProxyType({i.basename: u for u, i in infos.items()}),
                      sync.stamps if sync else None, False, False)


class DiskSideAlone(unittest.TestCase):
    """FolderDisk needs no Folder and no reactor: a view in, a result out."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="disk-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        for sub in ("cur", "new", "tmp"):
            (self.root / sub).mkdir()
        self.index = FolderIndex(self.root)
        self.addCleanup(self.index.close)

    def test_sync_then_store_from_views(self) -> None:
        (self.root / "new" / "1.M1P1.other").write_bytes(MESSAGE)
        (self.root / "cur" / "2.M2P1.other:2,S").write_bytes(MESSAGE)
        disk = FolderDisk(self.root, "INBOX", HOST, self.index)
        sync = disk.sync(view_of(self.root, self.index))
        self.assertFalse(sync.unchanged)
        self.assertEqual([(i.uid, i.subdir, i.flags) for i in sync.added],
                         [(1, "cur", frozenset()), (2, "cur", {"\\Seen"})])
        self.assertTrue(sync.added[0].recent)  # moved out of new/ by this scan
        self.assertEqual(sync.uidnext, 3)
        self.assertGreater(sync.modseq_issued, 0)
        self.assertEqual(sync.keyword_names, ())
        self.assertEqual(sorted((self.root / "new").iterdir()), [])

        infos = {i.uid: i for i in sync.added}
        edit = disk.store(view_of(self.root, self.index, sync, infos), [1, 2],
                          frozenset({"\\Flagged", "$Work"}), "add")
        self.assertEqual([(i.uid, i.flags) for i in edit.changed],
                         [(1, {"\\Flagged", "$Work"}), (2, {"\\Seen", "\\Flagged", "$Work"})])
        self.assertEqual(edit.keyword_names, ("$Work",))
        self.assertGreaterEqual(edit.modseq_issued, edit.changed[0].modseq)
        self.assertEqual(infos[1].flags, frozenset())  # the reactor's data: untouched
        self.assertTrue((self.root / "cur" / edit.changed[0].filename).exists())

    def test_a_renamed_folder_is_followed_from_the_view(self) -> None:
        (self.root / "cur" / "1.M1P1.other:2,").write_bytes(MESSAGE)
        disk = FolderDisk(self.root, "INBOX", HOST, self.index)
        sync = disk.sync(view_of(self.root, self.index))
        moved = self.root.parent / (self.root.name + "-moved")
        self.root.rename(moved)
        self.addCleanup(shutil.rmtree, moved, True)
        index = FolderIndex(moved)
        self.addCleanup(index.close)
        infos = {i.uid: i for i in sync.added}
        edit = disk.remove(view_of(moved, index, sync, infos), [1], False)
        self.assertEqual(edit.expunged, [1])
        self.assertEqual(list((moved / "cur").iterdir()), [])


class Executor(unittest.TestCase):
    """Jobs of one folder run one at a time, in order, each applied before the next."""

    def test_jobs_run_in_order_with_their_apply_step(self) -> None:
        ex = FolderExecutor()
        events: list[str] = []
        first: defer.Deferred[None] = defer.Deferred()

        def job_one() -> defer.Deferred[None]:
            events.append("one starts")
            return first.addCallback(lambda _: events.append("one applied"))

        d1 = ex.submit(job_one)
        d2 = ex.submit(lambda: events.append("two starts"), READ)
        self.assertEqual(events, ["one starts"])
        self.assertFalse(ex.idle)
        self.assertTrue(ex.changing)
        first.callback(None)
        self.assertEqual(events, ["one starts", "one applied", "two starts"])
        self.assertTrue(d1.called and d2.called)
        self.assertTrue(ex.idle)
        self.assertFalse(ex.changing)

    def test_kinds(self) -> None:
        ex = FolderExecutor()
        held: defer.Deferred[None] = defer.Deferred()
        ex.submit(lambda: held, INDEX)
        self.assertTrue(ex.idle)        # index work leaves inline edits free
        self.assertFalse(ex.changing)
        ex.submit(lambda: None, READ)
        self.assertFalse(ex.idle)       # a reader waits: no inline edit under its feet
        self.assertFalse(ex.changing)   # ... but a stat-only refresh may answer
        ex.submit(lambda: None, CHANGE)
        self.assertTrue(ex.changing)
        held.callback(None)
        self.assertTrue(ex.idle)
        self.assertFalse(ex.changing)


class FolderJobs(unittest.TestCase):
    """A Folder's thread work (SEARCH's included) waits its turn in the executor."""

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="split-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = MaildirStore(self.root / "maildirs", hostname=HOST)
        self.user = self.store.create_user("example.org", "alice")
        self.account = self.store.account(self.user)
        self.gate = threading.Event()
        self.addCleanup(self.gate.set)  # never leave a pool thread waiting

    @inlineCallbacks
    def loaded_folder(self, name: str = "INBOX", messages: int = 2):
        folder = self.account.folder(name)
        yield folder.refresh()
        for _ in range(messages):
            writer = folder.begin_append()
            writer.write(MESSAGE)
            yield writer.commit()
        self.addCleanup(folder.close)
        return folder

    def blocked_reader(self, folder, seen: list):
        """A READ job whose thread waits for the gate, then notes what it saw."""
        def read(view: FolderView) -> list[int]:
            self.gate.wait(10)
            seen.append({u: i.flags for u, i in view.infos.items()})
            return list(view.infos)
        return folder.read_in_thread(read)

    @inlineCallbacks
    def test_an_edit_waits_for_a_reader_and_a_refresh_does_not(self):
        self.patch(foldermod, "DIRTY_WINDOW", 0.0)
        folder = yield self.loaded_folder()
        yield folder.refresh(force=True)  # a scan after the appends: the stamps hold
        seen: list = []
        reading = self.blocked_reader(folder, seen)
        refreshed = folder.refresh()
        self.assertTrue(refreshed.called)  # four stats: nothing to wait for
        stored = folder.store_flags([1], ["\\Seen"], "add")  # small, yet not inline now
        self.assertFalse(stored.called)
        self.gate.set()
        uids = yield reading
        changed = yield stored
        self.assertEqual(uids, [1, 2])
        self.assertEqual(seen, [{1: frozenset(), 2: frozenset()}])
        self.assertEqual([(i.uid, i.flags) for i in changed], [(1, {"\\Seen"})])
        self.assertEqual(folder.by_uid(1).flags, {"\\Seen"})

    @inlineCallbacks
    def test_search_runs_as_a_job_over_the_folder_view(self):
        from mailserver.imap import search as S
        from mailserver.imap.parser import Arguments

        folder = yield self.loaded_folder()
        yield folder.store_flags([2], ["$Work"], "add")
        seen: list = []
        reading = self.blocked_reader(folder, seen)

        session = SimpleNamespace(folder=folder, view=[1, 2], recent=set())
        query = S.parse_search(Arguments([b"BODY body KEYWORD $Work"]))
        found = S.search(session, query)
        self.assertFalse(found.called)  # queued behind the reader
        self.gate.set()
        yield reading
        self.assertEqual((yield found), [2])

    @inlineCallbacks
    def test_a_queued_edit_runs_in_the_renamed_folder(self):
        self.account.create_folder("Work")
        folder = yield self.loaded_folder("Work")
        seen: list = []
        reading = self.blocked_reader(folder, seen)
        stored = folder.store_flags([1], ["\\Flagged"], "add")
        renamed = self.account.rename_folder("Work", "Projects")
        self.assertFalse(renamed.called)  # the old index closes after the work in progress
        self.gate.set()
        yield reading
        changed = yield stored
        yield renamed
        self.assertEqual([(i.uid, i.flags) for i in changed], [(1, {"\\Flagged"})])
        self.assertEqual(folder.name, "Projects")
        self.assertTrue((folder.path / "cur" / changed[0].filename).exists())
        again = yield self.account.open_folder("Projects")
        self.assertIs(again, folder)
        self.assertEqual(folder.by_uid(1).flags, {"\\Flagged"})

    @inlineCallbacks
    def test_delete_waits_for_the_work_in_progress(self):
        self.account.create_folder("Old")
        folder = yield self.loaded_folder("Old")
        seen: list = []
        reading = self.blocked_reader(folder, seen)
        deleted = self.account.delete_folder("Old")
        self.assertEqual(folder.exists, 0)  # sessions hear of it at once
        self.assertFalse(deleted.called)
        self.gate.set()
        self.assertEqual((yield reading), [1, 2])  # the job saw the folder as it started
        yield deleted
        self.assertNotIn("Old", [e.name for e in self.account.list_folders()])
        self.assertEqual([p.name for p in self.user.iterdir()
                          if p.name == ".Old" or p.name.startswith("..deleted.")], [])

    @inlineCallbacks
    def test_an_index_closed_while_idle_is_reopened_by_a_refresh_in_a_thread(self):
        self.patch(foldermod, "DIRTY_WINDOW", 0.0)
        folder = yield self.loaded_folder()
        yield folder.refresh(force=True)
        yield folder.flush_cache()
        closed = yield folder.close_idle_index(0.0)
        self.assertTrue(closed)
        self.assertFalse(folder.index.is_open)
        opened_in: list[str] = []
        real = folder.index.open_reader

        def open_reader() -> None:
            opened_in.append(threading.current_thread().name)
            real()
        self.patch(folder.index, "open_reader", open_reader)
        yield folder.refresh()
        self.assertTrue(folder.index.is_open)   # the cache reads that follow find it open
        self.assertEqual(len(opened_in), 1)
        self.assertNotEqual(opened_in[0], threading.main_thread().name)
