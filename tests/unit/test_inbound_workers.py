"""The check worker processes: functions of the Twisted-free check modules run in a child
and answer through the reactor; a failure there, a dead child, and functions that may
not run there."""

from __future__ import annotations

import io
import os
import pickle
import signal

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailserver.inbound import dkimverify, worker
from mailserver.inbound.workers import WorkerFailed, WorkerPool

MESSAGE = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"


class WorkerPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = WorkerPool(reactor, processes=2)
        self.addCleanup(self.stop)

    @defer.inlineCallbacks
    def stop(self):
        children = list(self.pool._children)
        self.pool.stop()
        for _ in range(200):
            if all(c.ended for c in children):
                return
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_runs_in_a_child_process(self):
        names = yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        self.assertEqual(names, [])
        results, arc = yield self.pool(dkimverify.verify_path, MESSAGE, {}, True)
        self.assertEqual((results, arc.result), ([], "none"))
        [child] = self.pool._children
        self.assertNotEqual(child.transport.pid, os.getpid())

    @defer.inlineCallbacks
    def test_concurrent_requests_spread_over_the_children(self):
        answers = yield defer.gatherResults(
            [self.pool(dkimverify.key_names_in_file, MESSAGE, True) for _ in range(20)])
        self.assertEqual(answers, [[]] * 20)
        self.assertEqual(len(self.pool._children), 2)

    @defer.inlineCallbacks
    def test_an_exception_there_fails_the_request_only(self):
        with self.assertRaises(WorkerFailed) as e:
            yield self.pool(dkimverify.verify_path, "/nonexistent/message", {}, True)
        self.assertIn("FileNotFoundError", str(e.exception))
        names = yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        self.assertEqual(names, [])

    @defer.inlineCallbacks
    def test_a_dead_child_fails_its_requests_and_is_replaced(self):
        yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        [child] = self.pool._children
        child.transport.signalProcess(signal.SIGKILL)
        # The reactor hears of the death later: this request goes to the dying child.
        with self.assertRaises(WorkerFailed):
            yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        for _ in range(100):
            if child.ended:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        names = yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        self.assertEqual(names, [])
        self.assertNotIn(child, self.pool._children)

    @defer.inlineCallbacks
    def test_a_child_that_gives_no_answer_is_killed_and_the_requests_behind_move(self):
        self.pool = WorkerPool(reactor, processes=1, request_timeout=0.5)
        yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        [child] = self.pool._children
        stuck_pid = child.transport.pid
        os.kill(stuck_pid, signal.SIGSTOP)   # as a verification that never ends
        hung = self.pool(dkimverify.key_names_in_file, MESSAGE, True)
        behind = self.pool(dkimverify.verify_path, MESSAGE, {}, True)
        with self.assertRaises(WorkerFailed) as e:
            yield hung
        self.assertIn("no answer in 0.5 s", str(e.exception))
        results, arc = yield behind   # answered by a new child
        self.assertEqual((results, arc.result), ([], "none"))
        for _ in range(100):
            if child not in self.pool._children:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        [new] = self.pool._children
        self.assertNotEqual(new.transport.pid, stuck_pid)
        with self.assertRaises(ProcessLookupError):
            os.kill(stuck_pid, 0)   # killed and reaped

    @defer.inlineCallbacks
    def test_a_child_that_answers_in_time_is_kept(self):
        self.pool = WorkerPool(reactor, processes=1, request_timeout=0.3)
        for _ in range(8):  # longer than the timeout in all, each answered at once
            yield self.pool(dkimverify.key_names_in_file, MESSAGE, True)
            yield task.deferLater(reactor, 0.1, lambda: None)
        [child] = self.pool._children
        self.assertFalse(child.ended)

    @defer.inlineCallbacks
    def test_other_functions_run_in_a_thread(self):
        value = yield self.pool(len, b"abc")
        self.assertEqual(value, 3)
        self.assertEqual(self.pool._children, [])


class ServeTests(unittest.TestCase):
    def test_only_allowed_modules_and_answers_in_order(self):
        requests = b"".join(worker.frame(r) for r in [
            (1, "mailserver.inbound.dkimverify:key_names_in_file", (MESSAGE, True)),
            (2, "os:getcwd", ()),
            (3, "mailserver.inbound.dkimverify:no_such_function", ())])
        out = io.BytesIO()
        worker.serve(io.BytesIO(requests), out)
        stream = io.BytesIO(out.getvalue())
        answers = []
        while (data := worker.read_frame(stream)) is not None:
            answers.append(pickle.loads(data))
        self.assertEqual(answers[0], (1, True, []))
        self.assertEqual(answers[1][:2], (2, False))
        self.assertIn("may not be called", answers[1][2])
        self.assertEqual(answers[2][:2], (3, False))


def test_worker_modules_import_nothing_from_twisted():
    """What runs in the worker (and in threads) must not touch the reactor's objects."""
    import subprocess
    import sys

    code = ("import sys, mailserver.inbound.worker, mailserver.inbound.dkimverify, "
            "mailserver.inbound.psl; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]"


class _FakeChildTransport:
    def __init__(self) -> None:
        self.sent: list = []
        self.signals: list = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(pickle.loads(data[4:]))

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)

    def closeStdin(self) -> None:
        self.stdin_closed = True


class _ClockReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.children: list = []
        self.triggers: list = []

    def spawnProcess(self, proto, *args, **kwargs) -> None:
        transport = _FakeChildTransport()
        proto.makeConnection(transport)
        self.children.append((proto, transport))

    def addSystemEventTrigger(self, *args) -> None:
        self.triggers.append(args)   # the pool's stop at shutdown


def test_time_queued_behind_another_request_is_not_counted_as_stuck():
    """A took 50 s; B, queued behind it, has been worked on for 11 s at t=61: the child
    is not stuck.  B fails only once the child has been on it for the whole timeout."""
    clock = _ClockReactor()
    pool = WorkerPool(reactor=clock, processes=1, request_timeout=60.0)
    results: dict = {}
    for name in ("A", "B"):
        pool(dkimverify.verify_path, MESSAGE, {}, True).addBoth(
            lambda value, n=name: results.__setitem__(n, value))
        clock.advance(1)
    child, transport = clock.children[0]
    clock.advance(48)                                   # t = 50: A answered
    child.outReceived(worker.frame((transport.sent[0][0], True, "A's answer")))
    assert results["A"] == "A's answer"
    clock.advance(11)                                   # t = 61
    assert "B" not in results and transport.signals == []
    clock.advance(50)                                   # t = 111: 61 s on B
    assert transport.signals == ["KILL"]
    assert results["B"].check(WorkerFailed)
