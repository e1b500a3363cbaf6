"""The commit process: the child's loop over a socket pair, and the server's side with a
real child under a running reactor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest as trial

from mailserver.maildir import MaildirStore
from mailserver.maildir import commit_process
from mailserver.maildir import delivery as delivery_mod
from mailserver.maildir.commit_process import ProcessCommitter, serve

MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello\r\n"

pytestmark = pytest.mark.skipif(not commit_process.available(),
                                reason="needs Linux descriptor passing")


def new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "maildirs", hostname="mx.example.test")


def _send(sock: socket.socket, store: MaildirStore, targets: list[Path], data: bytes,
          key: int) -> None:
    """Send one delivery the way the server does: bytes, or a descriptor when large."""
    delivery = store.begin_delivery(targets)
    delivery.write(data)
    description, fd, content = delivery.commit_request()
    description["id"] = key
    record = commit_process.encode_request(description, content)
    if fd >= 0:
        socket.send_fds(sock, [record], [fd])
    else:
        sock.send(record)
    delivery.handed_over()


@pytest.mark.parametrize("named", [False, True], ids=["no-name", "tmp-file"])
def test_child_commits_what_it_receives_and_answers_each(store, monkeypatch, named) -> None:
    if named:
        monkeypatch.setattr(delivery_mod, "_anonymous_files", False)
    alice, bob = (store.create_user("example.org", n) for n in ("alice", "bob"))
    large = MESSAGE + b"x" * (2 * delivery_mod.FLUSH_THRESHOLD) + b"\r\n"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _send(ours, store, [alice], MESSAGE + b"1\r\n", 1)              # as bytes
    _send(ours, store, [alice, bob, alice], MESSAGE + b"2\r\n", 2)  # one copy each
    _send(ours, store, [bob], large, 3)                              # as its file
    ours.send(b"not a request")  # refused, the others are not disturbed
    ours.shutdown(socket.SHUT_WR)
    serve(theirs)  # returns at end of file
    answers = {}
    for _ in range(3):
        key, name, body = json.loads(ours.recv(65536))
        answers[key] = body
        assert name.endswith(",S=%d" % {1: len(MESSAGE) + 3, 2: len(MESSAGE) + 3,
                                         3: len(large)}[key])
    ok = [True, None, ""]
    assert answers == {1: [ok], 2: [ok, ok, ok], 3: [ok]}
    assert sorted(p.read_bytes() for p in new_files(alice)) == [MESSAGE + b"1\r\n",
                                                                MESSAGE + b"2\r\n"]
    assert sorted(p.read_bytes() for p in new_files(bob)) == sorted([MESSAGE + b"2\r\n",
                                                                     large])
    assert list((alice / "tmp").iterdir()) == [] and list((bob / "tmp").iterdir()) == []
    ours.close()
    theirs.close()


def test_child_reports_a_failed_target(store) -> None:
    good, bad = (store.create_user("example.org", n) for n in ("good", "bad"))
    (bad / "new").rename(bad / "gone")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _send(ours, store, [good, bad], MESSAGE, 7)
    ours.shutdown(socket.SHUT_WR)
    serve(theirs)
    key, _, outcomes = json.loads(ours.recv(65536))
    assert key == 7 and [o[0] for o in outcomes] == [True, False]
    assert outcomes[1][1] is not None  # the errno travels back
    assert len(new_files(good)) == 1
    ours.close()
    theirs.close()


def test_reply_reader_is_a_read_descriptor() -> None:
    from twisted.internet.interfaces import IReadDescriptor
    from zope.interface.verify import verifyObject

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert verifyObject(IReadDescriptor, commit_process._ReplyReader(None, a))
    finally:
        a.close()
        b.close()


class ProcessCommitterTests(trial.TestCase):
    """The server's side: a real child process, a running reactor."""

    def setUp(self) -> None:
        # Every delivery to the child, a lone one too (test_commit_lone: the thread path).
        self.patch(ProcessCommitter, "lone_in_thread", False)
        root = Path(tempfile.mkdtemp(prefix="commit-process-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = MaildirStore(root / "maildirs", hostname="mx.example.test",
                                  commit_process=True)
        self.targets = [self.store.create_user("example.org", n) for n in ("a", "b")]

    def committer(self) -> ProcessCommitter:
        committer = self.store._committer
        self.assertIsInstance(committer, ProcessCommitter)
        return committer  # type: ignore[return-value]

    def commit(self, targets: list[Path], data: bytes = MESSAGE):
        d = self.store.begin_delivery(targets)
        d.write(data)
        return d.commit()

    @inlineCallbacks
    def test_commits_in_the_child(self):
        results = yield self.commit(self.targets)
        self.addCleanup(self.committer().stop)
        self.assertEqual([r.target for r in results], self.targets)
        self.assertTrue(all(r.ok for r in results))
        for t, r in zip(self.targets, results):
            self.assertEqual(new_files(t), [r.path])
            self.assertEqual(r.path.read_bytes(), MESSAGE)
        self.assertIsNotNone(self.committer()._process.pid)

    @inlineCallbacks
    def test_many_at_once_and_large_ones(self):
        big = MESSAGE + b"x" * (3 * delivery_mod.FLUSH_THRESHOLD) + b"\r\n"
        pending = [self.commit([self.targets[i % 2]], MESSAGE + b"%d\r\n" % i)
                   for i in range(100)]
        pending.append(self.commit(self.targets, big))
        self.addCleanup(self.committer().stop)
        all_results = yield gatherResults(pending)
        self.assertTrue(all(r.ok for results in all_results for r in results))
        self.assertEqual(len(new_files(self.targets[0])) + len(new_files(self.targets[1])), 102)
        self.assertEqual(all_results[-1][1].path.read_bytes(), big)

    @inlineCallbacks
    def test_partial_failure_is_reported(self):
        (self.targets[0] / "new").rename(self.targets[0] / "gone")
        results = yield self.commit(self.targets)
        self.addCleanup(self.committer().stop)
        self.assertEqual([r.ok for r in results], [False, True])
        self.assertIsInstance(results[0].error, OSError)
        self.assertIsNone(results[0].path)

    @inlineCallbacks
    def test_a_dead_child_is_replaced(self):
        yield self.commit(self.targets[:1])
        committer = self.committer()
        self.addCleanup(committer.stop)
        old = committer._process.pid
        ended = committer._child.ended
        os.kill(old, signal.SIGSTOP)  # a delivery in flight when the child dies fails
        in_flight = self.commit(self.targets[:1], MESSAGE + b"lost\r\n")
        os.kill(old, signal.SIGKILL)
        yield self.assertFailure(in_flight, OSError)
        yield ended
        self.assertEqual(len(new_files(self.targets[0])), 1)
        for _ in range(50):  # the reader sees end of file
            if committer._sock is None:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        results = yield self.commit(self.targets[1:])
        self.assertTrue(results[0].ok)
        self.assertNotEqual(committer._process.pid, old)
        self.assertEqual(len(new_files(self.targets[1])), 1)

    @inlineCallbacks
    def test_stop_waits_for_the_answers_and_the_child(self):
        pending = [self.commit(self.targets) for _ in range(10)]
        committer = self.committer()
        child = committer._child
        yield committer.stop()
        self.assertTrue(child.ended.called)
        all_results = yield gatherResults(pending)
        self.assertTrue(all(r.ok for results in all_results for r in results))
        # after stop, commits still work (in a thread)
        results = yield self.commit(self.targets[:1])
        self.assertTrue(results[0].ok)
