"""Maildir++ quota: the maildirsize file (parse, change lines, recalculation and when it is
due, concurrent writers) and the store's QuotaTracker (memory, change lines of deliveries
and of this process's own changes, expunges, the 90% warning)."""

from __future__ import annotations

import email
import email.policy
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.maildir import MaildirStore
from mailserver.maildir import quota
from mailserver.maildir.quota import MAILDIRSIZE, QuotaFile, Usage

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def maildir(root: Path, *folders: str) -> Path:
    for d in (root, *(root / f for f in folders)):
        for sub in ("cur", "new", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
    return root


def drop(folder: Path, name: str, data: bytes = MESSAGE, subdir: str = "cur") -> Path:
    path = folder / subdir / name
    path.write_bytes(data)
    return path


def sums(root: Path) -> tuple[int, int]:
    qf = quota.parse((root / MAILDIRSIZE).read_bytes())
    assert qf is not None
    return qf.bytes, qf.count


# -- the file -------------------------------------------------------------------------------

def test_parse_limit_and_change_lines() -> None:
    qf = quota.parse(b"2048S\n1000 2\n-300 -1\n  42   1\n")
    assert qf == QuotaFile(2048, None, 742, 2, 3)
    assert quota.parse(b"0S\n0 0\n") == QuotaFile(None, None, 0, 0, 1)
    assert quota.parse(b"5000S,10C\n1 1\n") == QuotaFile(5000, 10, 1, 1, 1)
    assert quota.parse(b"\n5 1\n") == QuotaFile(None, None, 5, 1, 1)  # no limits at all


def test_parse_ignores_an_unfinished_last_line() -> None:
    # A writer caught in the middle of its append (or a torn NFS write).
    assert quota.parse(b"2048S\n100 1\n20") == QuotaFile(2048, None, 100, 1, 1)


@pytest.mark.parametrize("data", [b"", b"2048S", b"2048X\n1 1\n", b"lots\n1 1\n",
                                  b"2048S\n1 1 1\n", b"2048S\nx 1\n", b"2048S\n1\n",
                                  b"2048S\n1 1\n\0\n"])
def test_parse_refuses_what_cannot_be_trusted(data: bytes) -> None:
    assert quota.parse(data) is None


def test_format_round_trip() -> None:
    data = quota.format_file(2048, 300, 2) + quota.format_line(-100, -1)
    assert data == b"2048S\n300 2\n-100 -1\n"
    assert quota.parse(data) == QuotaFile(2048, None, 200, 1, 2)
    assert quota.format_file(None, 0, 0) == b"0S\n0 0\n"


def test_full_means_at_or_over_the_limit() -> None:
    assert Usage(2048, 1, 2048).full and Usage(5000, 1, 2048).full
    assert not Usage(2047, 1, 2048).full and not Usage(10 ** 12, 1, None).full
    assert Usage(100, 1, 2048).plus(-40, -1) == Usage(60, 0, 2048)


def test_recalc_reasons() -> None:
    now = 1_000_000.0
    ok = QuotaFile(2048, None, 100, 1, 3)
    assert quota.recalc_reason(ok, 30, now, 2048, now) is None
    assert quota.recalc_reason(None, 30, now, 2048, now) == "unreadable"
    assert quota.recalc_reason(ok, 5120, now, 2048, now) == "too large"
    assert quota.recalc_reason(QuotaFile(2048, None, -1, 1, 2), 30, now, 2048, now) == "negative"
    assert quota.recalc_reason(QuotaFile(2048, None, 1, -1, 2), 30, now, 2048, now) == "negative"
    assert quota.recalc_reason(ok, 30, now, 4096, now) == "limit changed"
    assert quota.recalc_reason(QuotaFile(2048, None, 0, 0, 0), 8, now, 2048, now) == "no totals"
    full_lines = QuotaFile(2048, None, 3000, 2, 2)
    assert quota.recalc_reason(full_lines, 30, now, 2048, now) == "full"
    full_one = QuotaFile(2048, None, 3000, 2, 1)
    assert quota.recalc_reason(full_one, 30, now, 2048, now) is None  # fresh: trusted
    assert quota.recalc_reason(full_one, 30, now - 15 * 60, 2048, now) == "full"
    assert quota.recalc_reason(QuotaFile(None, None, 9e9, 1, 5), 30, 0, None, now) is None
    damaged = QuotaFile(2048, None, 10**26, 1, 1)   # one line of nonsense, fresh
    assert quota.recalc_reason(damaged, 30, now, 2048, now) == "implausible"
    assert quota.recalc_reason(QuotaFile(None, None, 1, 1 << 40, 2), 30, 0, None, now) \
        == "implausible"


def test_load_without_the_file_counts_every_folder(tmp_path: Path) -> None:
    root = maildir(tmp_path / "alice", ".Sent", ".Trash", ".a.b", "..deleted.Old")
    drop(root, "1.M1P1.h,S=100:2,S")
    drop(root, "2.M1P1.h,S=200", subdir="new")
    drop(root, "3.M1P1.elsewhere", b"x" * 77)          # no ,S=: its file size
    drop(root, ".hidden,S=999")                         # not a message
    drop(root / ".Sent", "4.M1P1.h,S=1000:2,S")
    drop(root / ".Trash", "5.M1P1.h,S=10:2,ST")        # Trash counts (as in Dovecot)
    drop(root / ".a.b", "6.M1P1.h,S=1,W=2:2,")
    drop(root / "..deleted.Old", "7.M1P1.h,S=50000:2,")  # a folder being deleted
    (root / "tmp" / "8.M1P1.h").write_bytes(b"y" * 500)  # not delivered yet
    usage = quota.load(root, 4096)
    assert usage == Usage(1388, 6, 4096)
    assert (root / MAILDIRSIZE).read_bytes() == b"4096S\n1388 6\n"
    assert os.listdir(root / "tmp") == ["8.M1P1.h"]  # the temporary file went
    assert (root / MAILDIRSIZE).stat().st_mode & 0o777 == 0o600


def test_load_trusts_a_good_file(tmp_path: Path) -> None:
    root = maildir(tmp_path / "alice")
    drop(root, "1.M1P1.h,S=100:2,S")
    (root / MAILDIRSIZE).write_bytes(b"2048S\n500 3\n-200 -1\n")
    assert quota.load(root, 2048) == Usage(300, 2, 2048)  # the file, not the disk
    assert (root / MAILDIRSIZE).read_bytes() == b"2048S\n500 3\n-200 -1\n"


@pytest.mark.parametrize("content, age", [
    (b"2048S\n100 1\n-500 -1\n", 0),            # negative
    (b"2048S\n" + b"1 1\n-1 -1\n" * 700, 0),     # 5120 bytes or more
    (b"1024S\n100 1\n", 0),                      # another limit
    (b"2048S\n3000 1\n1 0\n", 0),                # full, several change lines
    (b"2048S\n3000 1\n", 16 * 60),               # full, 15 minutes old
    (b"2048S\n1 1\n\0\n", 0),                    # broken
])
def test_load_recalculates_when_due(tmp_path: Path, content: bytes, age: float) -> None:
    root = maildir(tmp_path / "alice")
    drop(root, "1.M1P1.h,S=100:2,S")
    (root / MAILDIRSIZE).write_bytes(content)
    when = time.time() - age
    os.utime(root / MAILDIRSIZE, (when, when))
    assert quota.load(root, 2048) == Usage(100, 1, 2048)
    assert (root / MAILDIRSIZE).read_bytes() == b"2048S\n100 1\n"


def test_load_of_a_missing_maildir(tmp_path: Path) -> None:
    assert quota.load(tmp_path / "nobody", 100) == Usage(0, 0, 100)
    assert not (tmp_path / "nobody").exists()


def test_recalculation_scans_again_when_a_folder_changes_under_it(tmp_path: Path,
                                                                   monkeypatch) -> None:
    root = maildir(tmp_path / "alice")
    drop(root, "1.M1P1.h,S=100:2,S")
    real_scan, calls = quota.scan, []

    def scan(path: Path):
        result = real_scan(path)
        calls.append(result[:2])
        if len(calls) == 1:  # a delivery lands after the scan read new/
            time.sleep(0.01)
            drop(root, "2.M1P1.h,S=50", subdir="new")
        return result
    monkeypatch.setattr(quota, "scan", scan)
    assert quota.load(root, None) == Usage(150, 2, None)
    assert calls == [(100, 1), (150, 2)]
    assert (root / MAILDIRSIZE).read_bytes() == b"0S\n150 2\n"


def test_read_usage_never_writes(tmp_path: Path) -> None:
    root = maildir(tmp_path / "alice")
    drop(root, "1.M1P1.h,S=100:2,S")
    assert quota.read_usage(root) == Usage(100, 1, None)
    assert not (root / MAILDIRSIZE).exists()
    (root / MAILDIRSIZE).write_bytes(b"2048S\n70 1\n")
    assert quota.read_usage(root) == Usage(70, 1, 2048)   # the file's own limit
    assert quota.read_usage(root, 4096) == Usage(100, 1, 4096)  # other limit: counted
    (root / MAILDIRSIZE).write_bytes(b"2048S\n-5 1\n")
    assert quota.read_usage(root) == Usage(100, 1, 2048)
    assert (root / MAILDIRSIZE).read_bytes() == b"2048S\n-5 1\n"


def test_append_delta_adds_a_line_and_never_creates_the_file(tmp_path: Path) -> None:
    root = maildir(tmp_path / "alice")
    assert quota.append_delta(root, 100, 1) is False
    assert not (root / MAILDIRSIZE).exists()
    (root / MAILDIRSIZE).write_bytes(b"2048S\n0 0\n")
    assert quota.append_delta(root, 100, 1) and quota.append_delta(root, -40, -1)
    assert quota.append_delta(root, 0, 0)
    assert (root / MAILDIRSIZE).read_bytes() == b"2048S\n0 0\n100 1\n-40 -1\n"


def _appender(root: str, n: int, size: int) -> None:
    for _ in range(n):
        quota.append_delta(Path(root), size, 1)


def test_concurrent_appends_from_several_processes(tmp_path: Path) -> None:
    root = maildir(tmp_path / "alice")
    (root / MAILDIRSIZE).write_bytes(b"0S\n0 0\n")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(root), 300, size))
             for size in (7, 1234567, 99, 100000)]
    for p in procs:
        p.start()
    _appender(str(root), 300, -3)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    data = (root / MAILDIRSIZE).read_bytes()
    qf = quota.parse(data)
    assert qf is not None, "a torn or interleaved line"
    assert (qf.bytes, qf.count, qf.lines) == (300 * (7 + 1234567 + 99 + 100000 - 3), 1500, 1501)


def test_warned_mark_is_taken_once(tmp_path: Path) -> None:
    root = maildir(tmp_path / "alice")
    assert not quota.is_warned(root)
    assert quota.mark_warned(root) is True
    assert quota.mark_warned(root) is False
    assert quota.is_warned(root)
    assert quota.clear_warned(root) is True and quota.clear_warned(root) is False


def test_warning_message() -> None:
    data = quota.warning_message("alice@example.org", Usage(9500, 3, 10240), "mx.example.org",
                                 now=1_700_000_000)
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))
    msg = email.message_from_bytes(data, policy=email.policy.SMTP)
    assert msg["From"] == "Postmaster <postmaster@example.org>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Your mailbox is 92% full"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Return-Path"] == "<>"
    assert msg["Message-ID"].endswith("@mx.example.org>") and msg["Date"]
    assert "10 KiB" in msg.get_content() and "92%" in msg.get_content()


# -- the tracker --------------------------------------------------------------------------------

class TrackerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="quota-test-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.store = MaildirStore(self.dir / "maildirs", "mx.example.org")
        self.user = self.store.create_user("example.org", "alice")
        self.tracker = self.store.quota

    def on_disk(self) -> tuple[int, int]:
        return quota.scan(self.user)[:2]

    @inlineCallbacks
    def deliver(self, data: bytes = MESSAGE, target: Path | None = None):
        d = self.store.begin_delivery([target or self.user])
        d.write(data)
        results = yield d.commit()
        self.assertTrue(all(r.ok for r in results))

    @inlineCallbacks
    def reread(self, limit: int | None = 100_000):
        """Usage read from the file again (after this process's queued writes)."""
        fresh, self.tracker.fresh_seconds = self.tracker.fresh_seconds, 0
        try:
            usage = yield self.tracker.usage(self.user, limit)
        finally:
            self.tracker.fresh_seconds = fresh
        return usage

    def test_root_of(self) -> None:
        self.assertEqual(self.tracker.root_of(self.user), self.user)
        self.assertEqual(self.tracker.root_of(self.user / ".Junk"), self.user)
        self.assertEqual(self.tracker.root_of(self.user / ".Junk" / ".." / ".Sent"), self.user)
        self.assertIsNone(self.tracker.root_of(self.user / "..deleted.X"))
        self.assertIsNone(self.tracker.root_of(self.user.parent))
        self.assertIsNone(self.tracker.root_of(self.dir / "elsewhere" / "a" / "b"))

    @inlineCallbacks
    def test_usage_is_read_once_then_answered_from_memory(self):
        yield self.deliver()
        self.assertFalse(self.tracker.fresh(self.user, 100_000))
        usage = yield self.tracker.usage(self.user, 100_000)
        self.assertEqual(usage, Usage(len(MESSAGE), 1, 100_000))
        self.assertEqual((self.user / MAILDIRSIZE).read_bytes(),
                         b"100000S\n%d 1\n" % len(MESSAGE))
        self.assertTrue(self.tracker.fresh(self.user, 100_000))
        # Another process records a change: memory answers until the read is old.
        quota.append_delta(self.user, 1000, 1)
        self.assertEqual((yield self.tracker.usage(self.user, 100_000)).bytes, len(MESSAGE))
        self.assertEqual(self.tracker.peek(self.user).bytes, len(MESSAGE))
        self.assertEqual((yield self.reread()).bytes, len(MESSAGE) + 1000)
        # Another limit (changed by the administrator): the file is rewritten for it.
        self.assertEqual((yield self.tracker.usage(self.user, 50_000)).limit, 50_000)
        self.assertTrue((self.user / MAILDIRSIZE).read_bytes().startswith(b"50000S\n"))

    @inlineCallbacks
    def test_one_delivery_into_several_folders_counts_each_file(self):
        """Sieve's fileinto into two folders and keep: three files (linked), which a
        recount of the Maildir counts as three; so does the delivery."""
        yield self.tracker.usage(self.user, 100_000)
        for folder in (".A", ".B"):
            for sub in ("cur", "new", "tmp"):
                (self.user / folder / sub).mkdir(parents=True)
        d = self.store.begin_delivery([self.user, self.user / ".A", self.user / ".B",
                                       self.user / ".A"])
        d.write(MESSAGE)
        results = yield d.commit()
        self.assertTrue(all(r.ok for r in results))
        expected = Usage(3 * len(MESSAGE), 3, 100_000)
        self.assertEqual(self.tracker.peek(self.user), expected)
        self.assertEqual(sums(self.user), (expected.bytes, expected.count))
        self.assertEqual(self.on_disk(), (expected.bytes, expected.count))

    @inlineCallbacks
    def test_deliveries_write_their_line_and_are_counted(self):
        yield self.tracker.usage(self.user, 100_000)
        yield self.deliver()
        yield self.deliver(MESSAGE * 2, self.user / ".Junk")
        expected = Usage(3 * len(MESSAGE), 2, 100_000)
        self.assertEqual(self.tracker.peek(self.user), expected)
        self.assertEqual(sums(self.user), (expected.bytes, expected.count))
        self.assertEqual((yield self.reread()), expected)
        self.assertEqual(self.on_disk(), (expected.bytes, expected.count))

    @inlineCallbacks
    def test_own_changes_are_counted_at_once_and_written_in_order(self):
        yield self.tracker.usage(self.user, 100_000)
        self.tracker.changed(self.user, 500, 1)
        self.tracker.changed(self.user, 250, 1)
        self.assertEqual(self.tracker.peek(self.user), Usage(750, 2, 100_000))
        usage = yield self.reread()  # queued behind the write: sees it
        self.assertEqual(usage, Usage(750, 2, 100_000))
        lines = (self.user / MAILDIRSIZE).read_bytes().splitlines()
        self.assertEqual(lines[0], b"100000S")
        self.assertEqual(sums(self.user), (750, 2))
        self.assertLessEqual(len(lines), 4)  # changes made together share a line

    @inlineCallbacks
    def test_a_change_while_a_read_waits_behind_a_line_is_counted_once(self):
        """A read queued behind a change line that is still to be written sees that line;
        a change made meanwhile joined it and was also counted on top of the read (a
        90% warning at 60%)."""
        import threading

        from mailserver.maildir import quota as quota_module

        yield self.tracker.usage(self.user, 1_000_000)
        gate = threading.Event()
        self.addCleanup(gate.set)
        real, first = quota_module.append_delta, [True]

        def slow(*args):
            if first[0]:
                first[0] = False
                gate.wait(10)        # the first line's write holds the lane
            return real(*args)
        self.patch(quota_module, "append_delta", slow)
        self.tracker.changed(self.user, 100, 1)    # written in a thread (held)
        self.tracker.changed(self.user, 200, 1)    # a line waiting behind it
        self.tracker.fresh_seconds = 0
        d = self.tracker.usage(self.user, 1_000_000)   # a read behind that line
        self.tracker.changed(self.user, 300, 1)    # counted on top of the read
        gate.set()
        usage = yield d
        self.assertEqual((usage.bytes, usage.count), (600, 3))
        again = yield self.reread(1_000_000)          # after the last line is written
        self.assertEqual((again.bytes, again.count), (600, 3))
        self.assertEqual(sums(self.user), (600, 3))

    @inlineCallbacks
    def test_removing_more_than_was_known_reads_maildirsize_again(self):
        """Another program (Dovecot) added mail after the read, then this process expunged
        it: memory would say -9 KB.  It is not trusted: the next question reads the file,
        which has both programs' lines."""
        yield self.tracker.usage(self.user, 100_000)
        with open(self.user / MAILDIRSIZE, "ab") as f:   # Dovecot's three appends
            f.write(b"3120 1\n" * 3)
        self.tracker.changed(self.user, -3 * 3120, -3)   # ... which this process expunged
        self.assertIsNone(self.tracker.peek(self.user))
        usage = yield self.tracker.usage(self.user, 100_000)
        self.assertEqual((usage.bytes, usage.count), (0, 0))

    @inlineCallbacks
    def test_a_change_made_while_a_read_runs_is_kept(self):
        yield self.tracker.usage(self.user, 100_000)
        self.tracker.fresh_seconds = 0
        d = self.tracker.usage(self.user, 100_000)
        self.tracker.changed(self.user, 300, 1)
        usage = yield d
        self.assertEqual(usage.bytes, 300)
        self.assertEqual((yield self.tracker.usage(self.user, 100_000)).bytes, 300)

    @inlineCallbacks
    def test_expunged_messages_are_counted_off(self):
        for _ in range(3):
            yield self.deliver()
        yield self.tracker.usage(self.user, 100_000)
        folder = self.store.account(self.user).folder("INBOX")
        self.addCleanup(folder.close)
        yield folder.refresh()
        uids = folder.uids()
        yield folder.store_flags(uids[:2], ["\\Deleted"], "add")
        counted = self.tracker.expunging(folder)
        gone = yield folder.expunge().addCallback(counted)
        self.assertEqual(gone, uids[:2])
        self.assertEqual(self.tracker.peek(self.user), Usage(len(MESSAGE), 1, 100_000))
        self.assertEqual((yield self.reread()), Usage(len(MESSAGE), 1, 100_000))
        self.assertEqual(self.on_disk(), (len(MESSAGE), 1))

    @inlineCallbacks
    def test_a_deleted_folder_is_counted_again(self):
        yield self.deliver(MESSAGE, self.user / ".Junk")
        yield self.tracker.usage(self.user, 100_000)
        shutil.rmtree(self.user / ".Junk" / "cur")
        shutil.rmtree(self.user / ".Junk" / "new")
        self.tracker.recalculate_soon(self.user)
        self.assertEqual((yield self.tracker.usage(self.user, 100_000)), Usage(0, 0, 100_000))
        self.assertEqual((self.user / MAILDIRSIZE).read_bytes(), b"100000S\n0 0\n")

    @inlineCallbacks
    def test_full_is_known_from_memory(self):
        self.assertFalse(self.tracker.is_full(self.user, 10))  # never read: not full
        yield self.deliver()
        yield self.tracker.usage(self.user, len(MESSAGE))
        self.assertTrue(self.tracker.is_full(self.user, len(MESSAGE)))
        self.assertFalse(self.tracker.is_full(self.user, len(MESSAGE) + 1))

    def inbox(self) -> list[bytes]:
        return [p.read_bytes() for sub in ("new", "cur") for p in (self.user / sub).iterdir()]

    @inlineCallbacks
    def wait_for(self, predicate, timeout: float = 5.0):
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        end = time.monotonic() + timeout
        while not predicate():
            self.assertLess(time.monotonic(), end, "timed out")
            yield deferLater(reactor, 0.02, lambda: None)

    @inlineCallbacks
    def test_warning_once_per_crossing_of_90_percent(self):
        big = MESSAGE + b"x" * 1000 + b"\r\n"
        limit = 10 * len(big)
        yield self.tracker.usage(self.user, limit)
        for _ in range(8):
            yield self.deliver(big)
        yield self.reread(limit)
        self.assertEqual(len(self.inbox()), 8)  # 80%: nothing
        yield self.deliver(big)
        yield self.wait_for(lambda: len(self.inbox()) == 10)
        [warning] = [m for m in self.inbox() if b"postmaster@example.org" in m]
        self.assertIn(b"To: <alice@example.org>", warning)
        self.assertTrue(quota.is_warned(self.user))
        yield self.deliver(big)  # still above: no second one
        yield self.reread(limit)
        self.assertEqual(len(self.inbox()), 11)
        # Below 90% (another program removed mail), then above again: a new warning.
        for name in sorted(os.listdir(self.user / "new"))[:4]:
            os.unlink(self.user / "new" / name)
        self.tracker.changed(self.user, -4 * len(big), -4)
        yield self.reread(limit)
        self.assertFalse(quota.is_warned(self.user))
        yield self.deliver(big)
        yield self.deliver(big)
        yield self.reread(limit)
        self.assertEqual(len(self.inbox()), 9)  # 6 + 2 messages and a warning: 86%
        yield self.deliver(big)
        yield self.wait_for(lambda: len(self.inbox()) == 11)
        self.assertEqual(sum(b"postmaster@example.org" in m for m in self.inbox()), 2)
        self.assertEqual((yield self.reread(limit)).bytes, self.on_disk()[0])

    @inlineCallbacks
    def test_no_warning_without_a_limit(self):
        yield self.tracker.usage(self.user, None)
        for _ in range(3):
            yield self.deliver()
        yield self.reread()
        self.assertEqual(len(self.inbox()), 3)
        self.assertFalse(quota.is_warned(self.user))
