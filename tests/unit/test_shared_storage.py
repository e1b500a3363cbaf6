"""A Maildir root shared by several nodes (`[storage] shared`): where each node's index
lives and how it is repaired, the mod-sequences the nodes agree on through the folder's
change log, and the dot-lock that keeps them apart.

Two nodes here are two MaildirStore objects with their own state directories over one
root, in one process: each has its own Folder objects, indexes and disk state, as two
processes would; they meet only in the files of the root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.maildir import MaildirStore
from mailserver.maildir import changelog as changelogmod
from mailserver.maildir import uidlist as uidlistmod
from mailserver.maildir.changelog import CHANGELOG_NAME, LogReader
from mailserver.maildir.folder import Folder
from mailserver.maildir.index import INDEX_NAME, FolderIndex
from mailserver.maildir.shared_folder import SharedFolder, SharedStorage
from mailserver.maildir.uidlist import DotLock, LockTimeout

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody %d\r\n"
HOST = "mx.example.test"


class TwoNodes(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="shared-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.maildirs = self.root / "maildirs"
        self.a = self.node("a")
        self.b = self.node("b")
        self.user = self.a.create_user("example.org", "alice")
        self.counter = 0

    def node(self, name: str) -> MaildirStore:
        """A node as it starts: no folder in memory, its own state directory."""
        return MaildirStore(self.maildirs, HOST,
                            shared=SharedStorage(self.maildirs, self.root / name))

    def index_dir(self, node: str, folder: str = "") -> Path:
        return self.root / node / "indexes" / "example.org" / "alice" / folder

    @inlineCallbacks
    def open(self, store: MaildirStore, name: str = "INBOX"):
        folder = yield store.account(self.user).open_folder(name)
        return folder

    @inlineCallbacks
    def append(self, folder, flags=()):
        self.counter += 1
        writer = folder.begin_append(flags)
        writer.write(MESSAGE % self.counter)
        info = yield writer.commit()
        return info

    def state(self, folder) -> dict[int, tuple[frozenset[str], int]]:
        return {i.uid: (i.flags, i.modseq) for i in folder.messages}


class IndexLocation(TwoNodes):
    @inlineCallbacks
    def test_each_node_keeps_its_index_in_its_state_dir(self):
        inbox = yield self.open(self.a)
        sent = yield self.open(self.a, "Sent")
        yield self.append(inbox)
        yield self.append(sent)
        yield inbox.flush_cache()
        self.assertIsInstance(inbox, SharedFolder)
        self.assertTrue((self.index_dir("a") / INDEX_NAME).is_file())
        self.assertTrue((self.index_dir("a", ".Sent") / INDEX_NAME).is_file())
        self.assertEqual(list(self.maildirs.rglob(INDEX_NAME + "*")), [])
        self.assertTrue((self.user / CHANGELOG_NAME).is_file())

    @inlineCallbacks
    def test_a_node_without_shared_storage_is_as_before(self):
        store = MaildirStore(self.maildirs, HOST)
        folder = yield store.account(self.user).open_folder("INBOX")
        yield self.append(folder)
        self.assertIs(type(folder), Folder)
        self.assertTrue((self.user / INDEX_NAME).is_file())
        self.assertFalse((self.user / CHANGELOG_NAME).exists())

    @inlineCallbacks
    def test_an_index_a_single_server_left_in_the_folder_goes(self):
        single = MaildirStore(self.maildirs, HOST)
        folder = yield single.account(self.user).open_folder("INBOX")
        yield self.append(folder)
        yield folder.close()
        self.assertTrue((self.user / INDEX_NAME).is_file())
        shared = yield self.open(self.a)
        self.assertEqual(len(shared.messages), 1)
        self.assertEqual(list(self.user.glob(INDEX_NAME + "*")), [])

    @inlineCallbacks
    def test_the_index_follows_rename_and_goes_with_delete(self):
        account = self.a.account(self.user)
        account.create_folder("Old")
        folder = yield self.open(self.a, "Old")
        yield self.append(folder)
        yield account.rename_folder("Old", "New")
        self.assertFalse((self.index_dir("a", ".Old") / INDEX_NAME).exists())
        self.assertTrue((self.index_dir("a", ".New") / INDEX_NAME).is_file())
        yield folder.refresh()
        self.assertEqual(len(folder.messages), 1)
        yield account.delete_folder("New")
        self.assertFalse(self.index_dir("a", ".New").exists())


class IndexRepair(TwoNodes):
    @inlineCallbacks
    def test_a_node_that_was_away_adds_what_it_missed(self):
        on_b = yield self.open(self.b)
        for _ in range(3):
            yield self.append(on_b)
        yield on_b.close()
        on_a = yield self.open(self.a)
        for _ in range(4):
            yield self.append(on_a)
        gone = on_a.messages[0].uid
        yield on_a.delete_messages([gone])
        yield on_a.close()

        b_again = self.node("b")     # B starts again with the index it had
        folder = yield self.open(b_again)
        self.assertEqual(folder.uids(), [2, 3, 4, 5, 6, 7])
        yield folder.close()
        _meta, rows = FolderIndex(self.index_dir("b")).load()
        self.assertEqual(sorted(rows), sorted(i.basename for i in folder.messages))

    @inlineCallbacks
    def test_a_lost_index_is_built_again_with_the_same_values(self):
        on_a = yield self.open(self.a)
        for n in range(4):
            yield self.append(on_a, ["\\Seen"] if n % 2 else [])
        yield on_a.store_flags([2], ["\\Flagged"], "add")
        before = self.state(on_a)
        highest = on_a.highestmodseq
        yield on_a.close()
        shutil.rmtree(self.root / "a" / "indexes")

        folder = yield self.open(self.node("a"))
        self.assertEqual(self.state(folder), before)   # the log gives each value back
        self.assertEqual(folder.highestmodseq, highest)
        self.assertEqual(folder.changed_since(highest), [])
        self.assertTrue((self.index_dir("a") / INDEX_NAME).is_file())

    @inlineCallbacks
    def test_an_index_of_another_uidvalidity_is_started_again(self):
        on_a = yield self.open(self.a)
        yield self.append(on_a)
        old_highest = on_a.highestmodseq
        yield on_a.close()
        uidlist = self.user / "dovecot-uidlist"
        uidlist.unlink()              # the uid list lost: a new UIDVALIDITY follows
        folder = yield self.open(self.node("a"))
        self.assertNotEqual(folder.uidvalidity, 0)
        (info,) = folder.messages
        self.assertGreater(info.modseq, old_highest)   # every message changed for clients
        self.assertEqual(LogReader(self.user).read(0).uidvalidity, folder.uidvalidity)


class ModSequences(TwoNodes):
    @inlineCallbacks
    def test_uids_given_by_two_nodes_at_once_never_collide(self):
        on_a = yield self.open(self.a)
        on_b = yield self.open(self.b)
        infos = yield defer.gatherResults([self.append(f) for f in [on_a, on_b] * 40])
        uids = [i.uid for i in infos]
        self.assertEqual(sorted(uids), list(range(1, 81)))
        yield on_a.refresh()
        yield on_b.refresh()
        self.assertEqual(self.state(on_a), self.state(on_b))
        self.assertEqual(on_a.highestmodseq, on_b.highestmodseq)

    @inlineCallbacks
    def test_the_uid_list_is_read_again_when_only_its_contents_changed(self):
        on_a = yield self.open(self.a)
        for _ in range(4):
            yield self.append(on_a)
        path = self.user / "dovecot-uidlist"
        st = os.stat(path)
        data = path.read_bytes()
        self.assertIn(b" N5 ", data)
        with open(path, "r+b") as f:   # same inode, same size, same mtime: only UIDNEXT moved
            f.write(data.replace(b" N5 ", b" N7 ", 1))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        info = yield self.append(on_a)
        self.assertEqual(info.uid, 7)

    @inlineCallbacks
    def test_a_change_on_one_node_has_the_same_value_on_the_other(self):
        on_a = yield self.open(self.a)
        on_b = yield self.open(self.b)
        for _ in range(3):
            yield self.append(on_a)
        yield on_b.refresh()
        before = on_b.highestmodseq
        (changed,) = yield on_b.store_flags([2], ["\\Answered", "$Label"], "add")
        changes = yield on_a.refresh()
        (seen,) = changes.flags_changed
        self.assertEqual((seen.uid, seen.flags, seen.modseq),
                         (2, changed.flags, changed.modseq))
        self.assertIn("$Label", on_a.keyword_names)
        self.assertEqual(on_a.highestmodseq, on_b.highestmodseq)
        self.assertEqual(on_a.changed_since(before), [2])

    @inlineCallbacks
    def test_unchangedsince_sees_the_other_nodes_change(self):
        on_a = yield self.open(self.a)
        on_b = yield self.open(self.b)
        yield self.append(on_a)
        yield on_b.refresh()
        old = on_a.by_uid(1).modseq
        yield on_b.store_flags([1], ["\\Seen"], "add")
        changed, conflicts = yield on_a.conditional_store([1], ["\\Flagged"], "add", old)
        self.assertEqual((changed, conflicts), ([], [1]))

    @inlineCallbacks
    def test_expunges_on_one_node_are_vanished_on_the_other(self):
        on_a = yield self.open(self.a)
        on_b = yield self.open(self.b)
        for _ in range(5):
            yield self.append(on_a)
        yield on_b.refresh()
        mark = on_b.highestmodseq
        yield on_a.delete_messages([2, 4])
        changes = yield on_b.refresh()
        self.assertEqual(changes.expunged, [2, 4])
        ranges = yield on_b.vanished_since(mark, on_b.shared_uids())
        self.assertEqual(ranges, [(2, 2), (4, 4)])
        # Below the log's floor the memory is not complete: every uid not present.
        ranges = yield on_b.vanished_since(0, on_b.shared_uids())
        self.assertEqual(ranges, [(2, 2), (4, 4)])

    @inlineCallbacks
    def test_highestmodseq_never_goes_back_across_compaction(self):
        self.patch(changelogmod, "COMPACT_AT", 600)
        self.patch(changelogmod, "COMPACT_KEEP", 200)
        on_a = yield self.open(self.a)
        on_b = yield self.open(self.b)
        yield self.append(on_a)
        yield on_b.refresh()
        last = 0
        for n in range(40):
            folder = (on_a, on_b)[n % 2]
            yield folder.store_flags([1], ["\\Seen"], "add" if n % 4 < 2 else "remove")
            other = (on_b, on_a)[n % 2]
            yield other.refresh()
            self.assertEqual(self.state(other), self.state(folder))
            self.assertGreaterEqual(other.highestmodseq, last)
            last = other.highestmodseq
        self.assertGreater(LogReader(self.user).read(0).floor, 0)

    @inlineCallbacks
    def test_a_change_by_a_program_that_does_not_log_gets_a_new_value(self):
        on_a = yield self.open(self.a)
        on_b = yield self.open(self.b)
        yield self.append(on_a)
        yield on_b.refresh()
        before = on_a.highestmodseq
        info = on_a.by_uid(1)
        os.rename(self.user / "cur" / info.filename,
                  self.user / "cur" / (info.basename + ":2,F"))   # as Dovecot would
        changes = yield on_a.refresh(force=True)   # a full look (due every minute)
        (found,) = changes.flags_changed
        self.assertGreater(found.modseq, before)
        changes = yield on_b.refresh()
        self.assertEqual([(i.uid, i.flags, i.modseq) for i in changes.flags_changed],
                         [(1, frozenset({"\\Flagged"}), found.modseq)])

    @inlineCallbacks
    def test_mail_another_program_delivers_is_seen_without_mtimes(self):
        on_a = yield self.open(self.a)
        past = time.time() - 3600
        os.utime(self.user / "new", (past, past))
        stamp = os.stat(self.user / "new").st_mtime_ns
        (self.user / "new" / "1700000000.M1P1.elsewhere").write_bytes(MESSAGE % 0)
        os.utime(self.user / "new", ns=(stamp, stamp))   # the directory looks untouched
        changes = yield on_a.refresh()
        self.assertEqual([i.uid for i in changes.added], [1])


# -- the dot-lock ------------------------------------------------------------------------------

def test_dotlock_can_be_taken_again_by_its_holder(tmp_path: Path) -> None:
    target = tmp_path / "dovecot-uidlist"
    with DotLock(target) as outer:
        with DotLock(target, timeout=0.2):
            assert (tmp_path / "dovecot-uidlist.lock").exists()
        assert outer.held_here and (tmp_path / "dovecot-uidlist.lock").exists()
    assert not (tmp_path / "dovecot-uidlist.lock").exists()


def test_dotlock_excludes_other_threads(tmp_path: Path) -> None:
    target = tmp_path / "dovecot-uidlist"
    failed: list[BaseException] = []

    def other() -> None:
        try:
            DotLock(target, timeout=0.2).acquire()
        except LockTimeout as e:
            failed.append(e)

    with DotLock(target):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert failed


def test_a_lock_of_another_host_is_stale_only_by_age(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()   # a pid that is surely dead here: it means nothing for another host
    lock = tmp_path / "x.lock"
    lock.write_text(f"{proc.pid}:another-node.example")
    with pytest.raises(LockTimeout):
        DotLock(tmp_path / "x", timeout=0.3).acquire()
    old = time.time() - uidlistmod.LOCK_STALE_AFTER - 5
    os.utime(lock, (old, old))
    with DotLock(tmp_path / "x", timeout=2):
        assert lock.read_text().endswith(uidlistmod._hostname())


def test_a_long_hold_is_kept_young(tmp_path: Path) -> None:
    lock = DotLock(tmp_path / "x")
    with lock:
        old = time.time() - 100
        os.utime(tmp_path / "x.lock", (old, old))
        assert uidlistmod.refresh_held_locks(older_than=0) >= 1
        assert time.time() - os.stat(tmp_path / "x.lock").st_mtime < 10


# -- configuration -------------------------------------------------------------------------------

def test_the_shared_key_and_what_it_refuses(tmp_path: Path) -> None:
    from mailserver.config import ConfigError, parse_config

    config = tmp_path / "mailserver.toml"
    ok = parse_config({"storage": {"maildir_root": "/srv/mail", "shared": True},
                       "server": {"state_dir": "/var/lib/mailserver"}}, config)
    assert ok.storage.shared and ok.maildir_root == Path("/srv/mail")
    assert not parse_config({}, config).storage.shared
    with pytest.raises(ConfigError, match=r"^storage\.shared: .*state_dir"):
        parse_config({"storage": {"maildir_root": "/srv/mail", "shared": True},
                      "server": {"state_dir": "/srv/mail/node1"}}, config)
    with pytest.raises(ConfigError, match=r"^storage\.shared: expected true or false"):
        parse_config({"storage": {"shared": "yes"}}, config)
