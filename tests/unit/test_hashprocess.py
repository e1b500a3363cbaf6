"""The password hash process: argon2id verified by a lean child, and the login path's
fallback to threads when the child is busy, gone or not fit for a hash."""

from __future__ import annotations

import io
import os
import shutil
import tempfile

from twisted.application.service import IService
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailserver import hashchild, hashprocess
from mailserver.accounts import Accounts
from mailserver.auth import AccountsChecker
from mailserver.hashprocess import HashProcess, HashProcessGone
from mailserver.passwords import hash_password

STORED = hash_password("right")


class RunningReactor:
    """The reactor, taken as running: a test runs inside it, but pytest's way of running
    trial's tests leaves `reactor.running` false, so callWhenRunning would wait for ever."""

    def __getattr__(self, name: str) -> object:
        return getattr(reactor, name)

    def callWhenRunning(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


class ClockedReactor(RunningReactor):
    """The same, with its clock (`seconds`) set by the test."""

    now = 1000.0

    def seconds(self) -> float:
        return self.now


def started(case: unittest.TestCase, reactor: object = None, **kwargs: object) -> HashProcess:
    hp = HashProcess(reactor or RunningReactor(), **kwargs)
    hp.startService()
    case.addCleanup(hp.stopService)
    case.hp = hp
    return hp


def child_pid(hp: HashProcess) -> int | None:
    child = hp._child
    return None if child is None or child.ended else child.transport.pid


class HashProcessTests(unittest.TestCase):
    def test_is_a_service(self) -> None:
        self.assertTrue(verifyObject(IService, HashProcess()))

    @defer.inlineCallbacks
    def test_verifies_in_a_child_process(self) -> None:
        hp = started(self)
        pid = child_pid(hp)
        self.assertIsNotNone(pid)
        self.assertNotEqual(pid, os.getpid())
        self.assertTrue((yield hp.verify(STORED, "right")))
        self.assertFalse((yield hp.verify(STORED, b"wrong")))
        self.assertTrue((yield hp.verify("{ARGON2ID}" + STORED, "right")))
        self.assertEqual(child_pid(hp), pid)   # one child, kept

    @defer.inlineCallbacks
    def test_takes_only_what_it_can_verify_and_one_at_a_time(self) -> None:
        hp = started(self)
        self.assertIsNone(hp.verify("{PLAIN}right", "right"))   # not argon2id
        self.assertIsNone(hp.verify("{SHA512-CRYPT}$6$salt$x", "right"))
        self.assertIsNone(hp.verify(STORED, "\udcff"))          # not UTF-8
        first = hp.verify(STORED, "right")
        self.assertIsNotNone(first)
        self.assertIsNone(hp.verify(STORED, "right"))   # busy: the threads take it
        self.assertTrue((yield first))
        self.assertIsNotNone(hp.verify(STORED, "right"))

    @defer.inlineCallbacks
    def test_a_child_that_dies_fails_its_request_and_is_started_again(self) -> None:
        self.patch(hashprocess, "RESTART_DELAY", 0.0)
        hp = started(self)
        pending = hp.verify(STORED, "right")
        hp._child.transport.signalProcess("KILL")
        yield self.assertFailure(pending, HashProcessGone)
        self.assertIsNone(hp.verify(STORED, "right"))   # gone: a new one is started
        self.assertIsNotNone(child_pid(hp))
        self.assertTrue((yield hp.verify(STORED, "right")))

    @defer.inlineCallbacks
    def test_stopping_ends_the_child(self) -> None:
        hp = HashProcess(RunningReactor())
        hp.startService()
        pid = child_pid(hp)
        yield hp.stopService()
        self.assertIsNone(hp._child)
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)
        self.assertIsNone(hp.verify(STORED, "right"))   # stopped: not started again

    @defer.inlineCallbacks
    def test_without_libsodium_nothing_is_started(self) -> None:
        self.patch(hashprocess, "RESTART_DELAY", 0.2)
        clock = ClockedReactor()
        hp = started(self, reactor=clock, library="/nonexistent/libsodium.so")
        yield hp._child.done
        # The child could not load it and ended: logins are verified in threads, and
        # it is tried again less and less often.
        clock.now += 0.2
        self.assertIsNone(hp.verify(STORED, "right"))   # 0.2 s after the start: not yet
        self.assertIsNone(hp._child)
        clock.now += 0.25
        self.assertIsNone(hp.verify(STORED, "right"))   # 0.45 s: started again
        self.assertIsNotNone(hp._child)
        yield hp._child.done
        clock.now += 0.45
        self.assertIsNone(hp.verify(STORED, "right"))   # 0.45 s after that: not yet (0.8)
        self.assertIsNone(hp._child)

    def test_a_process_that_cannot_be_started_is_tried_less_and_less_often(self) -> None:
        self.patch(hashprocess, "RESTART_DELAY", 1.0)
        clock = ClockedReactor()
        attempts = []

        def spawn(*args, **kwargs):
            attempts.append(clock.now)
            raise OSError(11, "Resource temporarily unavailable")
        clock.spawnProcess = spawn
        started(self, reactor=clock)
        hp = self.hp
        for _ in range(40):   # a login a second
            clock.now += 1
            self.assertIsNone(hp.verify(STORED, "right"))
        self.assertEqual([t - 1000 for t in attempts], [0, 2, 6, 14, 30])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @defer.inlineCallbacks
    def test_a_child_that_answered_is_replaced_soon_whatever_failed_before(self) -> None:
        self.patch(hashprocess, "RESTART_DELAY", 1.0)
        clock = ClockedReactor()
        hp = started(self, reactor=clock)
        hp._failures = 5   # children before it ended without an answer
        self.assertTrue((yield hp.verify(STORED, "right")))
        hp._child.transport.signalProcess("KILL")
        yield hp._child.done
        clock.now += 1.0
        self.assertIsNone(hp.verify(STORED, "right"))
        self.assertIsNotNone(child_pid(hp))   # after RESTART_DELAY, not 32 s


class CheckerWithHashProcessTests(unittest.TestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        self.accounts = Accounts(directory + "/accounts.sqlite3")
        self.addCleanup(self.accounts.close)
        self.accounts.add_domain("example.org")
        self.accounts.add_user("alice@example.org", STORED)
        self.hp = started(self)
        self.checker = AccountsChecker(self.accounts, hash_process=self.hp)

    def login(self, password: bytes) -> defer.Deferred[str]:
        return self.checker.requestAvatarId(UsernamePassword(b"alice@example.org", password))

    @defer.inlineCallbacks
    def test_right_and_wrong_passwords(self) -> None:
        self.assertEqual((yield self.login(b"right")), "alice@example.org")
        yield self.assertFailure(self.login(b"wrong"), UnauthorizedLogin)
        yield self.assertFailure(self.checker.requestAvatarId(
            UsernamePassword(b"nobody@example.org", b"right")), UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_logins_at_once_share_the_child_and_the_threads(self) -> None:
        results = yield defer.gatherResults([self.login(b"right") for _ in range(4)]
                                            + [self.login(b"wrong").addErrback(
                                                lambda f: f.trap(UnauthorizedLogin) and None)])
        self.assertEqual(results, ["alice@example.org"] * 4 + [None])

    @defer.inlineCallbacks
    def test_a_child_dying_mid_login_costs_nothing_but_time(self) -> None:
        d = self.login(b"right")
        self.hp._child.transport.signalProcess("KILL")
        self.assertEqual((yield d), "alice@example.org")
        yield self.assertFailure(self.login(b"wrong"), UnauthorizedLogin)


class ChildSideTests(unittest.TestCase):
    """hashchild.serve with a stand-in for libsodium's verify."""

    @staticmethod
    def request(key: int, stored: bytes, password: bytes) -> bytes:
        body = key.to_bytes(4, "big") + len(stored).to_bytes(2, "big") + stored + password
        return len(body).to_bytes(4, "big") + body

    def test_answers_each_request_by_its_key(self) -> None:
        calls = []

        def verify(stored: bytes, password: bytes, size: int) -> int:
            calls.append((stored, password, size))
            return 0 if password == b"right" else -1
        out = io.BytesIO()
        hashchild.serve(verify, io.BytesIO(self.request(7, b"$h", b"right")
                                           + self.request(8, b"$h", b"wro\0ng")), out)
        self.assertEqual(out.getvalue(), b"\0\0\0\7\1" + b"\0\0\0\x08\0")
        self.assertEqual(calls, [(b"$h", b"right", 5), (b"$h", b"wro\0ng", 6)])

    def test_malformed_frames_end_it(self) -> None:
        never = lambda *a: self.fail("verified")  # noqa: E731
        for data in [(1 << 20).to_bytes(4, "big"),                 # too large
                     (2).to_bytes(4, "big") + b"ab",               # too short
                     self.request(1, b"$h\0x", b"pw"),             # NUL in the hash
                     (8).to_bytes(4, "big") + b"\0\0\0\1\0\x09ab"]:  # hash past the end
            with self.assertRaises(ValueError):
                hashchild.serve(never, io.BytesIO(data), io.BytesIO())
        out = io.BytesIO()   # a frame cut short: the server is gone, nothing to answer
        hashchild.serve(never, io.BytesIO(self.request(1, b"$h", b"pw")[:-1]), out)
        self.assertEqual(out.getvalue(), b"")
