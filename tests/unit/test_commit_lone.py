"""A lone delivery (nothing in the commit process, nothing waiting) is committed by a
thread of the server's process, with the same durability as the commit process: the
file fsynced before it gets its name in new/, new/ fsynced before the result fires (the
250), nothing half-written ever visible after a crash."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest as trial

from mailserver.maildir import MaildirStore
from mailserver.maildir import commit_process
from mailserver.maildir import delivery as delivery_mod

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello\r\n"
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+)$")

pytestmark = pytest.mark.skipif(not commit_process.available(),
                                reason="needs Linux descriptor passing")


def new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


def commit_children(pid: int) -> list[int]:
    """Live commit processes whose parent is `pid` (zombies are not counted)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()
        if (int(fields[1]) == pid and fields[0] != "Z"
                and b"mailserver.maildir.commit_process" in cmdline):
            found.append(int(entry))
    return found


class LoneDeliveryTests(trial.TestCase):
    """The server's committer (a ProcessCommitter) under a running reactor."""

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="commit-lone-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = MaildirStore(root / "maildirs", hostname="mx.example.test",
                                  commit_process=True)
        self.targets = [self.store.create_user("example.org", n) for n in ("a", "b")]

    def commit(self, targets: list[Path], data: bytes = MESSAGE) -> Deferred:
        d = self.store.begin_delivery(targets)
        d.write(data)
        out = d.commit()
        committer = self.store._committer
        self.assertIsInstance(committer, commit_process.ProcessCommitter)
        if not getattr(self, "_stop_hooked", False):
            self._stop_hooked = True
            self.addCleanup(committer.stop)
        return out

    @inlineCallbacks
    def test_one_at_a_time_never_starts_the_commit_process(self):
        big = MESSAGE + b"x" * (3 * delivery_mod.FLUSH_THRESHOLD) + b"\r\n"
        for i, data in enumerate((MESSAGE, big, MESSAGE + b"3\r\n")):
            results = yield self.commit(self.targets, data)
            self.assertEqual([r.target for r in results], self.targets)
            self.assertTrue(all(r.ok for r in results))
            for t, r in zip(self.targets, results):
                self.assertEqual(r.path.read_bytes(), data)
                self.assertEqual(len(new_files(t)), i + 1)
                self.assertEqual(list((t / "tmp").iterdir()), [])
        self.assertEqual(commit_children(os.getpid()), [])

    @inlineCallbacks
    def test_file_and_directory_synced_before_the_result(self):
        """fsync of the file (not yet in new/), its name in new/, fsync of new/, and only
        then the result that the session answers 250 on."""
        events: list[str] = []
        real_fsync, real_link, real_rename = os.fsync, os.link, os.rename

        def fsync(fd):
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                events.append("fsync new/")
            else:
                # no name in new/ yet: a file without a name, or a tmp/ file
                named_in_new = any(p.stat().st_ino == st.st_ino
                                   for p in new_files(self.targets[0]))
                events.append("fsync file" + (" already in new/" if named_in_new else ""))
            real_fsync(fd)

        def link(src, dst, **kw):
            events.append("name in new/")
            real_link(src, dst, **kw)

        def rename(src, dst):
            events.append("name in new/")
            real_rename(src, dst)

        self.patch(os, "fsync", fsync)
        self.patch(os, "link", link)
        self.patch(os, "rename", rename)
        d = self.commit(self.targets[:1])
        d.addCallback(lambda results: events.append("result") or results)
        results = yield d
        self.assertTrue(results[0].ok)
        self.assertEqual(events, ["fsync file", "name in new/", "fsync new/", "result"])
        self.assertEqual(commit_children(os.getpid()), [])

    @inlineCallbacks
    def test_while_the_thread_is_busy_the_next_ones_go_to_the_commit_process(self):
        pending = [self.commit([self.targets[i % 2]], MESSAGE + b"%d\r\n" % i)
                   for i in range(20)]
        self.assertEqual(len(commit_children(os.getpid())), 1)
        all_results = yield gatherResults(pending)
        self.assertTrue(all(r.ok for results in all_results for r in results))
        stored = sorted(p.read_bytes() for t in self.targets for p in new_files(t))
        self.assertEqual(stored, sorted(MESSAGE + b"%d\r\n" % i for i in range(20)))
        # After deliveries that met others, the next LONE_AFTER go to the commit process
        # too (no fsync in this process), then one is lone again: the thread's.
        synced_here: list[int] = []
        real_fsync = os.fsync
        self.patch(os, "fsync", lambda fd: synced_here.append(fd) or real_fsync(fd))
        for i in range(commit_process.LONE_AFTER):
            results = yield self.commit(self.targets[:1], MESSAGE + b"then %d\r\n" % i)
            self.assertTrue(results[0].ok)
        self.assertEqual(synced_here, [])
        results = yield self.commit(self.targets[:1], MESSAGE + b"last\r\n")
        self.assertTrue(results[0].ok)
        self.assertEqual(len(synced_here), 2)  # the file and new/
        self.assertEqual(len(new_files(self.targets[0])), 10 + commit_process.LONE_AFTER + 1)

    @inlineCallbacks
    def test_a_file_made_ahead_for_the_same_maildir(self):
        """After two deliveries in a row into one Maildir, the thread opens the next one's
        file without a name there ahead of time; another Maildir closes it again."""
        if not delivery_mod._anonymous_files:
            raise trial.SkipTest("no O_TMPFILE here")

        def unnamed_in(maildir: Path) -> list[str]:
            out = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(str(maildir / "new") + "/#"):
                    out.append(target)
            return out

        a, b = self.targets
        for i in range(4):
            results = yield self.commit([a], MESSAGE + b"%d\r\n" % i)
            self.assertTrue(results[0].ok)
            self.assertEqual(results[0].path.read_bytes(), MESSAGE + b"%d\r\n" % i)
        names = [p.name for p in new_files(a)]
        self.assertEqual(len({n.split(",")[0] for n in names}), 4)
        self.assertTrue(all(NAME_RE.match(n) for n in names))
        for _ in range(200):  # asked for once the last one was answered
            if unnamed_in(a):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(unnamed_in(a)), 1)   # waiting for the next one
        results = yield self.commit([b])
        self.assertTrue(results[0].ok)
        self.assertEqual(unnamed_in(a), [])       # closed: it went elsewhere
        self.assertEqual(list((a / "tmp").iterdir()), [])
        self.assertEqual(len(new_files(a)), 4)
        results = yield self.commit([b], MESSAGE + b"again\r\n")
        self.assertTrue(results[0].ok)
        yield self.store._committer.stop()
        self.assertEqual(unnamed_in(b), [])       # and at stop

    @inlineCallbacks
    def test_a_failed_target_is_reported(self):
        (self.targets[0] / "new").rename(self.targets[0] / "gone")
        results = yield self.commit(self.targets)
        self.assertEqual([r.ok for r in results], [False, True])
        self.assertIsInstance(results[0].error, OSError)
        self.assertEqual(len(new_files(self.targets[1])), 1)

    @inlineCallbacks
    def test_off_commits_every_delivery_in_the_commit_process(self):
        self.patch(commit_process.ProcessCommitter, "lone_in_thread", False)
        results = yield self.commit(self.targets[:1])
        self.assertTrue(results[0].ok)
        self.assertEqual(len(commit_children(os.getpid())), 1)


# -- a crash during lone commits -----------------------------------------------------------

def test_kill9_during_lone_commits_leaves_whole_messages_only(tmp_path: Path) -> None:
    """Killed while committing one message after another in its lone-delivery thread:
    every message whose result fired is in new/, every file in new/ is complete, nothing
    is left in tmp/ (files without a name go with the process)."""
    sys.path.insert(0, str(HERE))
    try:
        from maildir_crash_helper import make_message
    finally:
        sys.path.remove(str(HERE))
    store = MaildirStore(tmp_path / "maildirs", hostname="crash.test")
    target = store.create_user("example.org", "u")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(HERE / "lone_commit_helper.py"),
                             str(store.root), str(target)],
                            stdout=subprocess.PIPE, text=True, env=env)
    acknowledged = []
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 30 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line.startswith("committed"), line
            acknowledged.append(int(line.split()[1]))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    rest = proc.stdout.read()
    proc.stdout.close()
    acknowledged += [int(ln.split()[1]) for ln in rest.splitlines()
                     if ln.startswith("committed")]
    assert len(acknowledged) >= 30
    seeds = []
    for path in new_files(target):
        data = path.read_bytes()
        m = NAME_RE.match(path.name)
        assert m and int(m.group(6)) == len(data), path.name
        seed = int(re.search(rb"X-Seed: (\d+)", data).group(1))
        length = int(re.search(rb"X-Length: (\d+)", data).group(1))
        assert data == make_message(seed, length), f"{path.name} is not whole"
        seeds.append(seed)
    assert sorted(seeds) == sorted(set(seeds)), "a message stored twice"
    assert set(acknowledged) <= set(seeds), "an acknowledged message is missing"
    assert len(seeds) <= len(acknowledged) + 1  # at most the one under way when killed
    if delivery_mod._anonymous_files:
        assert list((target / "tmp").iterdir()) == []
