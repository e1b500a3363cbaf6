"""CONDSTORE / QRESYNC (RFC 7162): mod-sequences kept by a real Maildir folder (assigned
per change, persisted in the folder's index, above every earlier value after a restart or
the loss of the index, expunges remembered) and the command syntax the session reads."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.imap import condstore as C
from mailserver.imap import fetch as F
from mailserver.imap.parser import Arguments, BadCommand
from mailserver.maildir import Folder, MaildirStore
from mailserver.maildir import index as indexmod
from mailserver.maildir.index import INDEX_NAME

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


class Recorder:
    """A folder listener (another session) that writes down what it hears."""

    def __init__(self) -> None:
        self.changed: list[Any] = []
        self.expunged: list[int] = []

    def messages_added(self, infos: list[Any]) -> None:
        pass

    def messages_expunged(self, uids: list[int]) -> None:
        self.expunged += uids

    def flags_changed(self, infos: list[Any]) -> None:
        self.changed += infos


class ModseqTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="condstore-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = MaildirStore(self.root / "maildirs", hostname="mx.example.test")
        self.user = self.store.create_user("example.org", "alice")
        self.folders: list[Folder] = []

    @inlineCallbacks
    def tearDown(self) -> Any:
        for folder in self.folders:
            yield folder.close()
            call = folder._refresh_call
            if call is not None and call.active():
                call.cancel()
            folder._stop_settling()

    @inlineCallbacks
    def open_folder(self) -> Any:
        """The INBOX as a new process opens it."""
        folder = Folder(self.user, "INBOX", "mx.example.test")
        self.folders.append(folder)
        yield folder.refresh()
        return folder

    @inlineCallbacks
    def reopen(self, folder: Folder) -> Any:
        """Close `folder` (its index written) and open the folder as a restart would."""
        yield folder.close()
        return (yield self.open_folder())

    @inlineCallbacks
    def folder_with(self, count: int) -> Any:
        folder = yield self.open_folder()
        for i in range(count):
            writer = folder.begin_append()
            writer.write(MESSAGE.replace(b"hello", b"hello %d" % i))
            yield writer.commit()
        return folder

    def modseqs(self, folder: Folder) -> dict[int, int]:
        return {i.uid: i.modseq for i in folder.messages}

    def rename_on_disk(self, folder: Folder, uid: int, letters: str) -> None:
        """Change a message's flags the way Dovecot does: rename its file."""
        info = folder.by_uid(uid)
        assert info is not None
        os.rename(folder.path / info.subdir / info.filename,
                  folder.path / "cur" / f"{info.basename}:2,{letters}")
        past = time.time() - 10  # outside the dirty window: the stamps must show it
        os.utime(folder.path / "cur", (past, past))


class Assignment(ModseqTestCase):
    @inlineCallbacks
    def test_every_message_has_one_and_highest_covers_them(self):
        folder = yield self.folder_with(3)
        values = self.modseqs(folder)
        self.assertEqual(len(values), 3)
        self.assertTrue(all(v > 0 for v in values.values()))
        self.assertEqual(folder.highestmodseq, max(values.values()))
        # One per change: the three appends got increasing values.
        self.assertEqual(sorted(values.values()), [values[u] for u in sorted(values)])

    @inlineCallbacks
    def test_flag_change_gets_a_new_value_others_keep_theirs(self):
        folder = yield self.folder_with(3)
        before = self.modseqs(folder)
        listener = Recorder()
        folder.add_listener(listener)
        changed = yield folder.store_flags([2], {"\\Seen"}, "add")
        after = self.modseqs(folder)
        self.assertEqual(after[1], before[1])
        self.assertEqual(after[3], before[3])
        self.assertGreater(after[2], max(before.values()))
        self.assertEqual(folder.highestmodseq, after[2])
        self.assertEqual([i.modseq for i in changed], [after[2]])
        self.assertEqual([(i.uid, i.modseq) for i in listener.changed], [(2, after[2])])

    @inlineCallbacks
    def test_store_that_changes_nothing_keeps_the_value(self):
        folder = yield self.folder_with(2)
        yield folder.store_flags([1], {"\\Seen"}, "add")
        before, highest = self.modseqs(folder), folder.highestmodseq
        changed = yield folder.store_flags([1], {"\\Seen"}, "add")
        self.assertEqual(changed, [])
        self.assertEqual(self.modseqs(folder), before)
        self.assertEqual(folder.highestmodseq, highest)

    @inlineCallbacks
    def test_one_store_on_many_messages_is_one_change(self):
        folder = yield self.folder_with(20)  # more than an inline STORE takes
        yield folder.store_flags(range(1, 21), {"\\Flagged"}, "add")
        values = set(self.modseqs(folder).values())
        self.assertEqual(values, {folder.highestmodseq})

    @inlineCallbacks
    def test_rename_by_another_process_gets_a_new_value(self):
        folder = yield self.folder_with(3)
        before = self.modseqs(folder)
        self.rename_on_disk(folder, 3, "FS")
        yield folder.refresh(force=True)
        after = self.modseqs(folder)
        self.assertEqual(folder.by_uid(3).flags, frozenset({"\\Flagged", "\\Seen"}))
        self.assertGreater(after[3], max(before.values()))
        self.assertEqual((after[1], after[2]), (before[1], before[2]))
        self.assertEqual(folder.changed_since(max(before.values())), [3])

    @inlineCallbacks
    def test_changed_since(self):
        folder = yield self.folder_with(5)
        mark = folder.highestmodseq
        yield folder.store_flags([2, 4], {"$Done"}, "add")
        self.assertEqual(folder.changed_since(mark), [2, 4])
        self.assertEqual(folder.changed_since(mark, [1, 2, 3]), [2])
        self.assertEqual(folder.changed_since(folder.highestmodseq), [])
        self.assertEqual(folder.changed_since(0), [1, 2, 3, 4, 5])


class ChangeLog(ModseqTestCase):
    """CHANGEDSINCE from the folder's change log: the same answers as a pass over every
    message, also once the log has been cut back."""

    def by_scan(self, folder: Folder, modseq: int) -> list[int]:
        return [i.uid for i in folder.messages if i.modseq > modseq]

    @inlineCallbacks
    def test_log_and_scan_agree_through_many_changes(self):
        folder = yield self.folder_with(30)
        marks = [folder.highestmodseq]
        for n in range(110):  # 20 messages a time: more log entries than it keeps
            first = 1 + n % 11
            yield folder.store_flags(range(first, first + 20),
                                     {"\\Seen"}, "add" if n % 2 else "remove")
            marks.append(folder.highestmodseq)
        self.assertLess(len(folder._modseq_log), 2200)
        self.assertGreater(folder._modseq_log_floor, marks[0])
        for mark in marks[::7] + [0, marks[0] - 1]:
            self.assertEqual(folder.changed_since(mark), self.by_scan(folder, mark), mark)
            self.assertEqual(folder.changed_since(mark, [1, 5, 25, 30]),
                             [u for u in (1, 5, 25, 30) if u in self.by_scan(folder, mark)])

    @inlineCallbacks
    def test_unseen_counts_follow_flag_changes(self):
        folder = yield self.folder_with(6)
        self.assertEqual((folder.unseen_count, folder.first_unseen_uid), (6, 1))
        yield folder.store_flags([1, 2, 4], {"\\Seen"}, "add")
        self.assertEqual((folder.unseen_count, folder.first_unseen_uid), (3, 3))
        yield folder.store_flags([2], {"\\Seen"}, "remove")
        self.assertEqual((folder.unseen_count, folder.first_unseen_uid), (4, 2))
        yield folder.store_flags([2, 3, 5, 6], {"\\Seen"}, "add")
        self.assertEqual((folder.unseen_count, folder.first_unseen_uid), (0, None))
        yield folder.delete_messages([1])
        self.assertEqual(folder.unseen_count, 0)

    @inlineCallbacks
    def test_deleted_count_follows_flag_changes(self):
        """STATUS DELETED (RFC 9051 6.3.11) from the kept stats, not a pass over the folder."""
        folder = yield self.folder_with(5)
        self.assertEqual(folder.deleted_count, 0)
        yield folder.store_flags([1, 2, 3], {"\\Deleted"}, "add")
        self.assertEqual(folder.deleted_count, 3)
        yield folder.store_flags([2], {"\\Deleted", "\\Seen"}, "set")
        yield folder.store_flags([3, 4], {"\\Seen"}, "add")
        self.assertEqual(folder.deleted_count, 3)
        yield folder.store_flags([1], {"\\Deleted"}, "remove")
        self.assertEqual(folder.deleted_count, 2)
        yield folder.delete_messages([2])
        self.assertEqual(folder.deleted_count, 1)
        self.assertEqual(folder.deleted_count,
                         sum("\\Deleted" in m.flags for m in folder.messages))


class ConditionalStore(ModseqTestCase):
    @inlineCallbacks
    def test_unchanged_since_lets_through_only_untouched_messages(self):
        folder = yield self.folder_with(3)
        mark = folder.highestmodseq
        yield folder.store_flags([2], {"\\Seen"}, "add")  # another client, after `mark`
        changed, refused = yield folder.conditional_store([1, 2, 3], {"\\Deleted"}, "add",
                                                          mark)
        self.assertEqual(refused, [2])
        self.assertEqual([i.uid for i in changed], [1, 3])
        self.assertNotIn("\\Deleted", folder.by_uid(2).flags)
        self.assertIn("\\Deleted", folder.by_uid(1).flags)

    @inlineCallbacks
    def test_unchanged_since_zero_always_fails(self):
        folder = yield self.folder_with(2)
        changed, refused = yield folder.conditional_store([1, 2], {"\\Seen"}, "add", 0)
        self.assertEqual((changed, refused), ([], [1, 2]))
        self.assertEqual(folder.by_uid(1).flags, frozenset())

    @inlineCallbacks
    def test_file_renamed_meanwhile_counts_as_modified(self):
        folder = yield self.folder_with(1)
        info = folder.by_uid(1)
        os.rename(folder.path / "cur" / info.filename,
                  folder.path / "cur" / f"{info.basename}:2,F")  # not synced yet
        changed, refused = yield folder.conditional_store([1], {"\\Seen"}, "add",
                                                          folder.highestmodseq)
        self.assertEqual((changed, refused), ([], [1]))


class Persistence(ModseqTestCase):
    @inlineCallbacks
    def test_values_survive_a_restart(self):
        folder = yield self.folder_with(4)
        yield folder.store_flags([3], {"\\Answered"}, "add")
        before, highest = self.modseqs(folder), folder.highestmodseq
        again = yield self.reopen(folder)
        self.assertEqual(self.modseqs(again), before)
        self.assertEqual(again.highestmodseq, highest)

    @inlineCallbacks
    def test_change_while_closed_is_noticed_at_open(self):
        folder = yield self.folder_with(3)
        before, highest = self.modseqs(folder), folder.highestmodseq
        yield folder.close()
        self.rename_on_disk(folder, 2, "S")  # Dovecot, while we were down
        again = yield self.open_folder()
        after = self.modseqs(again)
        self.assertGreater(after[2], highest)
        self.assertEqual((after[1], after[3]), (before[1], before[3]))
        self.assertEqual(again.changed_since(highest), [2])

    @inlineCallbacks
    def test_highest_never_goes_back_when_the_index_is_lost(self):
        folder = yield self.folder_with(3)
        yield folder.store_flags([1], {"\\Seen"}, "add")
        highest = folder.highestmodseq
        yield folder.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(str(folder.path / INDEX_NAME) + suffix)
            except FileNotFoundError:
                pass
        again = yield self.open_folder()
        self.assertGreater(again.highestmodseq, highest)
        # Everything counts as changed for a client that knew the old state.
        self.assertEqual(again.changed_since(highest), [1, 2, 3])
        self.assertEqual(again.by_uid(1).flags, frozenset({"\\Seen"}))

    @inlineCallbacks
    def test_values_stay_below_the_protocol_limit(self):
        folder = yield self.folder_with(1)
        self.assertLess(folder.highestmodseq, C.MAX_MODSEQ)
        # The floor is wall-clock microseconds: far below 2^63-1 for centuries.
        self.assertGreaterEqual(folder.highestmodseq, int(time.time() * 1e6) - 60_000_000)


class ExpungeMemory(ModseqTestCase):
    @inlineCallbacks
    def test_expunged_uids_are_remembered_with_their_modseq(self):
        folder = yield self.folder_with(5)
        mark = folder.highestmodseq
        yield folder.store_flags([2, 4], {"\\Deleted"}, "add")
        gone = yield folder.expunge()
        self.assertEqual(gone, [2, 4])
        self.assertGreater(folder.highestmodseq, mark)
        ranges = yield folder.vanished_since(mark, folder.shared_uids())
        self.assertEqual(ranges, [(2, 2), (4, 4)])
        ranges = yield folder.vanished_since(folder.highestmodseq, folder.shared_uids())
        self.assertEqual(ranges, [])

    @inlineCallbacks
    def test_memory_survives_a_restart_and_covers_expunges_while_closed(self):
        folder = yield self.folder_with(4)
        mark = folder.highestmodseq
        yield folder.delete_messages([1])
        yield folder.close()
        info = folder.by_uid(3)
        os.unlink(folder.path / info.subdir / info.filename)  # another process, meanwhile
        again = yield self.open_folder()
        self.assertEqual(again.uids(), [2, 4])
        ranges = yield again.vanished_since(mark, again.shared_uids())
        self.assertEqual(ranges, [(1, 1), (3, 3)])

    @inlineCallbacks
    def test_uids_still_in_the_clients_view_are_not_reported(self):
        folder = yield self.folder_with(3)
        mark = folder.highestmodseq
        view = list(folder.shared_uids())
        yield folder.delete_messages([2])
        # The session has not announced the expunge yet: it still shows uid 2.
        ranges = yield folder.vanished_since(mark, view)
        self.assertEqual(ranges, [])

    @inlineCallbacks
    def test_lost_memory_reports_every_missing_uid_of_the_range(self):
        folder = yield self.folder_with(6)
        yield folder.delete_messages([2, 5])
        old = folder.highestmodseq
        yield folder.close()
        os.unlink(folder.path / INDEX_NAME)
        again = yield self.open_folder()
        # UIDNEXT is 7: 2 and 5 are missing below it.
        ranges = yield again.vanished_since(old, again.shared_uids())
        self.assertEqual(ranges, [(2, 2), (5, 5)])
        ranges = yield again.vanished_since(old, again.shared_uids(), within=[(3, 6)])
        self.assertEqual(ranges, [(5, 5)])
        # seq-match-data proved nothing vanished below uid 4.
        ranges = yield again.vanished_since(old, again.shared_uids(), unchanged_below=4)
        self.assertEqual(ranges, [(5, 5)])

    @inlineCallbacks
    def test_a_client_older_than_the_memory_gets_the_long_form(self):
        self.patch(indexmod, "VANISHED_KEEP", 2)
        folder = yield self.folder_with(6)
        mark = folder.highestmodseq
        for uid in (1, 3, 5):
            yield folder.delete_messages([uid])
        # Only the last two expunges are kept: a client from before all three is told
        # every missing uid, one that saw the first expunge only what followed.
        ranges = yield folder.vanished_since(mark, folder.shared_uids())
        self.assertEqual(ranges, [(1, 1), (3, 3), (5, 5)])
        yield folder.delete_messages([6])
        ranges = yield folder.vanished_since(mark, folder.shared_uids())
        self.assertEqual(ranges, [(1, 1), (3, 3), (5, 6)])

    @inlineCallbacks
    def test_new_uidvalidity_forgets_the_old_uids(self):
        folder = yield self.folder_with(3)
        yield folder.delete_messages([1])
        yield folder.close()
        os.unlink(folder.path / "dovecot-uidlist")  # uids start again (new UIDVALIDITY)
        again = yield self.open_folder()
        self.assertNotEqual(again.uidvalidity, folder.uidvalidity)
        self.assertEqual(again.uids(), [1, 2])
        ranges = yield again.vanished_since(again.highestmodseq - 1, again.shared_uids())
        self.assertEqual(ranges, [])


class Syntax(unittest.TestCase):
    def args(self, text: bytes) -> Arguments:
        return Arguments([text])

    def test_modseq_range(self):
        self.assertEqual(C.parse_modseq(self.args(b"9223372036854775807")), 2 ** 63 - 1)
        self.assertEqual(C.parse_modseq(self.args(b"0")), 0)
        for bad in (b"9223372036854775808", b"99999999999999999999999", b"-1", b"12a",
                    b"1.5"):
            self.assertRaises(BadCommand, C.parse_modseq, self.args(bad))
        self.assertRaises(BadCommand, C.parse_modseq, self.args(b"0"), zero=False)

    def test_select_params(self):
        self.assertEqual(C.parse_select_params(self.args(b"")), (False, None))
        self.assertEqual(C.parse_select_params(self.args(b" (CONDSTORE)")), (True, None))
        condstore, q = C.parse_select_params(
            self.args(b" (QRESYNC (67890007 20050715194045000 41,43:211,214:541 "
                      b"(1:3,5 4:6,8)))"))
        self.assertFalse(condstore)
        assert q is not None
        self.assertEqual((q.uidvalidity, q.modseq), (67890007, 20050715194045000))
        self.assertEqual(q.known_uids, ((41, 41), (43, 211), (214, 541)))
        self.assertEqual(q.seq_match, ((1, 4), (2, 5), (3, 6), (5, 8)))
        _, q = C.parse_select_params(self.args(b" (QRESYNC (1 2))"))
        assert q is not None
        self.assertEqual((q.known_uids, q.seq_match), (None, ()))
        for bad in (b" (FOO)", b" (CONDSTORE CONDSTORE)", b" ()", b" (QRESYNC)",
                    b" (QRESYNC (0 5))", b" (QRESYNC (1 5 1:*))", b" (QRESYNC (1 x))",
                    b" (QRESYNC (1 5 1:3 (1:2 4)))", b" (QRESYNC (1 5)", b" CONDSTORE",
                    b" (QRESYNC (1 9223372036854775808))"):
            self.assertRaises(BadCommand, C.parse_select_params, self.args(bad))

    def test_fetch_modifiers_split_from_the_items(self):
        def split(text: bytes) -> tuple[bytes, bytes]:
            """The item text and the modifiers, as the FETCH parser reads them."""
            items, rest = F.parse_fetch_command(text)
            head = text[:len(text) - len(rest)]
            self.assertEqual(items, F.parse_fetch_items(head))
            return head, rest

        self.assertEqual(split(b"(FLAGS) (CHANGEDSINCE 5)"), (b"(FLAGS)", b" (CHANGEDSINCE 5)"))
        self.assertEqual(split(b"FLAGS (CHANGEDSINCE 5)"), (b"FLAGS", b" (CHANGEDSINCE 5)"))
        self.assertEqual(split(b"(BODY[HEADER.FIELDS (A B)] UID)"),
                         (b"(BODY[HEADER.FIELDS (A B)] UID)", b""))
        self.assertEqual(split(b'BODY[HEADER.FIELDS ("X)" B)] (VANISHED CHANGEDSINCE 1)'),
                         (b'BODY[HEADER.FIELDS ("X)" B)]', b" (VANISHED CHANGEDSINCE 1)"))
        self.assertEqual(C.parse_fetch_modifiers(b" (VANISHED CHANGEDSINCE 7)"),
                         C.FetchModifiers(7, True))
        self.assertEqual(C.parse_fetch_modifiers(b""), C.FetchModifiers())
        for bad in (b" (VANISHED)", b" (CHANGEDSINCE)", b" (CHANGEDSINCE -1)", b" ()",
                    b" (CHANGEDSINCE 1 CHANGEDSINCE 2)", b" (FOO 1)", b"(CHANGEDSINCE 1)",
                    b" (CHANGEDSINCE 1) x"):
            self.assertRaises(BadCommand, C.parse_fetch_modifiers, bad)

    def test_store_modifiers(self):
        a = self.args(b"(UNCHANGEDSINCE 0) +FLAGS")
        self.assertEqual(C.parse_store_modifiers(a), 0)
        self.assertEqual(a.atom(), b"+FLAGS")
        self.assertIsNone(C.parse_store_modifiers(self.args(b"+FLAGS (\\Seen)")))
        for bad in (b"(UNCHANGEDSINCE) +FLAGS", b"(FOO 1) +FLAGS", b"() +FLAGS",
                    b"(UNCHANGEDSINCE 1 UNCHANGEDSINCE 2) +FLAGS"):
            self.assertRaises(BadCommand, C.parse_store_modifiers, self.args(bad))

    def test_vanished_lines_are_split_when_long(self):
        ranges = [(n, n) for n in range(1, 20000, 2)]
        text = C.vanished_lines(ranges, earlier=True)
        lines = text.split(b"\r\n")[:-1]
        self.assertGreater(len(lines), 1)
        self.assertTrue(all(len(line) < C.VANISHED_LINE + 30 for line in lines))
        got = [int(x) for line in lines
               for x in line[len(b"* VANISHED (EARLIER) "):].split(b",")]
        self.assertEqual(got, list(range(1, 20000, 2)))
