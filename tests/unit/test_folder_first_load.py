"""The first open of a large folder: files without uids get them in arrival order with
their exact mtimes and sizes, the open answers before the index rows are written, the
rows then go a part per write without undoing a change made meanwhile, and a new
process finds everything in the index."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from mailserver.maildir import Folder
from mailserver.maildir import folder as folder_mod
from mailserver.maildir import folder_disk, index as index_mod
from mailserver.maildir.executor import INDEX, READ

BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
COUNT = folder_disk.DEFERRED_ROWS + 200


class FirstLoad(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="first-load-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.dir = self.root / "INBOX"
        for sub in ("cur", "new", "tmp"):
            (self.dir / sub).mkdir(parents=True)
        self.expected: list[tuple[str, int, int]] = []  # (base, size, mtime ns) by uid
        for i in range(COUNT):
            # one mtime for every ten files (a clock tick): their names give the order
            mtime_ns = (1_700_000_000 + i // 10) * 1_000_000_000 + 123_456_789
            size_field = f",S={len(BODY)}" if i % 3 else ""   # some names without it
            base = f"1700000000.M{i}P7Q{i}.host{size_field}"
            path = self.dir / ("new" if i % 7 == 0 else "cur") / (
                base if i % 7 == 0 else base + ":2,S")
            path.write_bytes(BODY)
            os.utime(path, ns=(mtime_ns, mtime_ns))
            self.expected.append((base, len(BODY), mtime_ns))
        self.folders: list[Folder] = []

    def tearDown(self):  # type: ignore[no-untyped-def]
        return self.close_all()

    @inlineCallbacks
    def close_all(self):  # type: ignore[no-untyped-def]
        for folder in self.folders:
            yield folder.close()

    def folder(self, clock: Clock | None = None) -> Folder:
        folder = Folder(self.dir, "INBOX", "mx.example.test", clock=clock)
        self.folders.append(folder)
        return folder

    @inlineCallbacks
    def rows_pass(self, folder: Folder, clock: Clock):  # type: ignore[no-untyped-def]
        """Let the time of one step of the rows' writing pass; wait for what it started."""
        clock.advance(folder_mod.CACHE_FLUSH_DELAY)
        yield folder._executor.submit(lambda: succeed(None), INDEX)
        yield deferLater(reactor, 0, lambda: None)  # the write's own callbacks have run

    @inlineCallbacks
    def test_uids_in_arrival_order_with_exact_dates_and_sizes(self):
        folder = self.folder()
        changes = yield folder.refresh()
        got = [(i.basename, i.size, i.internaldate, i.recent) for i in changes.added]
        self.assertEqual([i.uid for i in changes.added], list(range(1, COUNT + 1)))
        self.assertEqual(got, [(b, s, os.stat(self.path_of(folder, n + 1)).st_mtime, True)
                               for n, (b, s, _) in enumerate(self.expected)])
        self.assertTrue(gc.isenabled())
        self.assertEqual(folder.recent_count, COUNT)

    def path_of(self, folder: Folder, uid: int) -> Path:
        return folder.message_path(uid)

    @inlineCallbacks
    def test_rows_are_written_after_the_answer_a_part_at_a_time(self):
        self.patch(index_mod, "LOADED_PER_WRITE", 500)
        clock = Clock()
        folder = self.folder(clock)
        yield folder.refresh()
        self.assertTrue(folder.index.loaded_pending)  # the answer came first
        writes = 0
        while folder.index.loaded_pending:
            before = len(folder.index._loaded)
            yield self.rows_pass(folder, clock)
            self.assertEqual(len(folder.index._loaded), max(before - 500, 0))
            writes += 1
        self.assertEqual(writes, -(-COUNT // 500))
        meta, rows = folder.index.load()
        self.assertEqual(rows, {i.basename: (i.size, i.internaldate) for i in folder.messages})
        _, modseqs = folder.index.load_modseqs()
        self.assertEqual(modseqs, {i.basename: (i.uid, i.modseq, i.filename)
                                   for i in folder.messages})

    @inlineCallbacks
    def test_rows_wait_while_the_folder_is_busy(self):
        clock = Clock()
        folder = self.folder(clock)
        yield folder.refresh()
        gate: Deferred[None] = Deferred()
        busy = folder._executor.submit(lambda: gate, READ)  # a SEARCH, say, under way
        clock.advance(folder_mod.CACHE_FLUSH_DELAY)
        self.assertEqual(len(folder.index._loaded), COUNT)  # not now: the folder is busy
        gate.callback(None)
        yield busy
        yield self.rows_pass(folder, clock)
        self.assertLess(len(folder.index._loaded), COUNT)

    @inlineCallbacks
    def test_a_change_between_the_writes_is_not_undone(self):
        self.patch(index_mod, "LOADED_PER_WRITE", 300)
        clock = Clock()
        folder = self.folder(clock)
        yield folder.refresh()
        yield self.rows_pass(folder, clock)   # a first part of the rows
        last = folder.messages[-1]   # its row is not written yet
        changed = yield folder.store_flags([last.uid], ["\\Flagged"], "add")
        self.assertEqual(len(changed), 1)
        yield folder.flush_cache()   # the change's row: written before the load's row
        yield folder.close()         # writes the rest
        again = self.folder()
        yield again.refresh()
        info = again.by_uid(last.uid)
        self.assertIn("\\Flagged", info.flags)
        self.assertEqual(info.modseq, changed[0].modseq)
        self.assertEqual([(i.uid, i.basename, i.size, i.internaldate) for i in again.messages],
                         [(i.uid, i.basename, i.size, i.internaldate) for i in folder.messages])

    @inlineCallbacks
    def test_a_new_process_needs_no_stat_once_the_rows_are_written(self):
        folder = self.folder()
        yield folder.refresh()
        yield folder.close()
        calls = []
        real_stat = os.stat

        def counting_stat(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args[0])
            return real_stat(*args, **kwargs)
        self.patch(folder_disk.os, "stat", counting_stat)
        again = self.folder()
        yield again.refresh()
        self.assertEqual(again.exists, COUNT)
        self.assertLess(len(calls), 10)  # the folder's own files, not one per message
        self.assertEqual({i.uid: i.modseq for i in again.messages},
                         {i.uid: i.modseq for i in folder.messages})

    @inlineCallbacks
    def test_rows_lost_in_a_crash_are_made_again_by_the_next_open(self):
        folder = self.folder()
        yield folder.refresh()
        before = {i.uid: (i.basename, i.size, i.internaldate) for i in folder.messages}
        highest = folder.highestmodseq
        # A crash: the process ends with the rows unwritten (the file is closed as is).
        folder.index._loaded = []
        folder._stop_rows()
        again = self.folder()
        yield again.refresh()
        self.assertEqual({i.uid: (i.basename, i.size, i.internaldate)
                          for i in again.messages}, before)
        self.assertGreater(min(i.modseq for i in again.messages), highest - 1)


def test_the_quick_message_info_is_the_same_object() -> None:
    values = (7, "base,S=5", "base,S=5:2,S", "cur", frozenset({"\\Seen"}), 5, 1.5, True, 9)
    quick, made = folder_disk._new_info(*values), folder_disk.MessageInfo(*values)
    assert quick == made and hash(quick) == hash(made) and repr(quick) == repr(made)
