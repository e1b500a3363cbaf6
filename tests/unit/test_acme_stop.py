"""Stopping the ACME service while it talks to the CA: the reactor is never held.

A request to the CA in flight ends only with its answer or the network timeout (30 s);
the stop waits a little for it without blocking, then leaves its daemon thread behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailserver import acme_service
from mailserver.acme_client import HTTP01, AcmeNames, AcmeSettings, ChallengeBoard, Outcome
from mailserver.acme_service import AcmeService, in_own_thread


def service(store: Path) -> AcmeService:
    settings = AcmeSettings(directory="https://ca.invalid/dir", email="", ca_bundle="",
                            challenge=HTTP01, store=store, renew_before=30 * 86400.0)
    names = AcmeNames(names=("mail.example.org",), required=frozenset({"mail.example.org"}))
    return AcmeService(settings, lambda: names, ChallengeBoard(), reactor=reactor)


class StopTests(unittest.TestCase):
    def setUp(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.addCleanup(self.release.set)

    def stuck_ensure(self, settings, wanted, board, cancel) -> Outcome:
        """A request to the CA that does not come back until the test says so (it
        ignores `cancel`, as a blocking socket read does)."""
        self.entered.set()
        self.release.wait(30)
        return Outcome(pair=None, issued=False, names=wanted.names, reason="", note="")

    @defer.inlineCallbacks
    def test_stop_does_not_hold_the_reactor_for_a_request_in_flight(self):
        self.patch(acme_service, "ensure_certificate", self.stuck_ensure)
        self.patch(acme_service, "STOP_WAIT", 0.3)
        svc = service(Path(self.mktemp()))
        svc.startService()
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertTrue(self.entered.wait(5))
        ticks: list[float] = []
        clock = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        clock.start(0.02)
        start = time.monotonic()
        d = svc.stopService()
        returned = time.monotonic() - start
        self.assertIsInstance(d, defer.Deferred)
        yield d
        waited = time.monotonic() - start
        clock.stop()
        self.assertLess(returned, 0.2)          # stopService itself returns at once
        self.assertGreaterEqual(waited, 0.25)   # then waits about STOP_WAIT, not 30 s
        self.assertLess(waited, 5)
        self.assertGreater(len(ticks), 5)       # the reactor ran meanwhile
        self.assertFalse(svc.running)

    @defer.inlineCallbacks
    def test_stop_waits_for_a_conversation_that_ends_soon(self):
        self.patch(acme_service, "ensure_certificate", self.stuck_ensure)
        svc = service(Path(self.mktemp()))
        svc.startService()
        self.assertTrue(self.entered.wait(5))
        d = svc.stopService()
        self.assertFalse(d.called)
        reactor.callLater(0.1, self.release.set)
        start = time.monotonic()
        yield d
        self.assertLess(time.monotonic() - start, acme_service.STOP_WAIT)

    def test_stop_with_nothing_running_is_immediate(self):
        self.patch(acme_service, "ensure_certificate",
                   lambda *a: Outcome(pair=None, issued=False, names=(), reason="", note=""))
        svc = service(Path(self.mktemp()))
        self.assertIsNone(svc.stopService())


class InOwnThreadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_result_and_failure_reach_the_reactor(self):
        seen: list[str] = []
        result = yield in_own_thread(reactor, lambda a, b: (threading.current_thread().name,
                                                            a + b), 2, 3)
        self.assertEqual(result, ("acme", 5))
        d = in_own_thread(reactor, lambda: 1 / 0)
        yield self.assertFailure(d, ZeroDivisionError)
        seen.append("failed")
        self.assertEqual(seen, ["failed"])

    def test_the_thread_is_a_daemon(self):
        started = threading.Event()
        release = threading.Event()
        self.addCleanup(release.set)
        found: list[threading.Thread] = []

        def work() -> None:
            found.append(threading.current_thread())
            started.set()
            release.wait(5)
        d = in_own_thread(reactor, work)
        self.assertTrue(started.wait(5))
        self.assertTrue(found[0].daemon)
        release.set()
        return d


class DeadlineTests(unittest.TestCase):
    """A CA that sends its answer a byte at a time never trips the per-read timeout: the
    conversation is given up after RUN_DEADLINE, and the next check starts a new one
    (every later check, daily and SIGHUP, waited on the stuck one for ever)."""

    @defer.inlineCallbacks
    def test_a_conversation_past_its_deadline_is_given_up(self):
        releases = [threading.Event(), threading.Event()]
        for release in releases:
            self.addCleanup(release.set)
        started: list[threading.Event] = []

        def stuck(settings, wanted, board, cancel) -> Outcome:
            started.append(cancel)
            releases[len(started) - 1].wait(30)   # a read that does not end; `cancel`
            raise ConnectionError("the CA's connection ended at last")   # is not looked at

        self.patch(acme_service, "ensure_certificate", stuck)
        self.patch(acme_service, "RUN_DEADLINE", 0.3)
        svc = service(Path(self.mktemp()))
        svc.startService()
        self.addCleanup(svc.stopService)
        for _ in range(200):
            if svc.failures:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(svc.failures, 1)
        self.assertTrue(started[0].is_set())          # told to stop at its next step
        svc.check("SIGHUP")                            # a new conversation, not the old one
        for _ in range(200):
            if len(started) == 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(started), 2)
        self.assertFalse(started[1].is_set())
        # the given-up one ends at last: its failure is not counted again, and sets no
        # second retry timer (one nothing would cancel)
        retry = svc._retry
        releases[0].set()
        for _ in range(200):
            if not svc._given_up:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(svc._given_up, set())
        self.assertEqual(svc.failures, 1)
        self.assertIs(svc._retry, retry)
        self.assertIsNotNone(svc._running)   # the new one goes on
        self.flushLoggedErrors()

