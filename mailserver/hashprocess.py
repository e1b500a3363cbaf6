"""argon2id verification in a lean child process, as Dovecot's auth workers do.

A first login verifies the password while the user's INBOX is scanned beside it.  In one
process the two collide: libsodium faults argon2's 46 MiB in under the address space's
lock, and the scan's every memory mapping waits behind it (hashchild.py).  The child has
an address space of its own.

One child, one verification at a time: `verify` answers None when the child is busy,
not started or gone, and the caller verifies in the hashing threads instead.  So a burst
of logins uses the child and the threads together, and a child that dies costs nothing
but its restart (at most one every RESTART_DELAY seconds; longer, up to an hour, after
children that ended without an answer).  Only hashes libsodium
verifies go there (`passwords.sodium_hash`: our own argon2id, and imported ones like it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from itertools import count
from pathlib import Path
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver import hashchild
from mailserver.passwords import sodium_hash

log = Logger()

RESTART_DELAY = 5.0
RESTART_MAX = 3600.0
# A verification takes tens of milliseconds; one that takes this long is stuck.
REQUEST_TIMEOUT = 30.0
STOP_WAIT = 2.0


class HashProcessGone(Exception):
    """The child ended (or was ended) before it answered."""


def sodium_library() -> str | None:
    """The shared object that carries libsodium: PyNaCl's own module."""
    spec = importlib.util.find_spec("nacl._sodium")
    return spec.origin if spec is not None and spec.origin else None


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.pending: dict[int, defer.Deferred[bool]] = {}
        self.buffer = b""
        self.ended = False
        self.done: defer.Deferred[None] = defer.Deferred()
        self.deadline: Any = None
        self.answered = False
        self.on_first_answer: Callable[[], None] = lambda: None

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 5:
            key, ok = int.from_bytes(self.buffer[:4], "big"), self.buffer[4] == 1
            self.buffer = self.buffer[5:]
            if self.deadline is not None and self.deadline.active():
                self.deadline.cancel()
            if not self.answered:
                self.answered = True
                self.on_first_answer()
            d = self.pending.pop(key, None)
            if d is not None:
                d.callback(ok)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("password hash process: {line}", line=line)

    def stuck(self) -> None:
        log.error("password hash process gave no answer in {seconds} s; stopping it",
                  seconds=REQUEST_TIMEOUT)
        _kill(self)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if not reason.check(error.ProcessDone):
            log.warn("password hash process ended: {reason}", reason=reason.getErrorMessage())
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(HashProcessGone(reason.getErrorMessage()))
        self.done.callback(None)


class HashProcess(service.Service):
    """The server's one hashing child: started with the server, stopped with it."""

    name = "password-hash-process"

    def __init__(self, reactor: Any = None, library: str | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self._library = library if library is not None else sodium_library()
        self._child: _Child | None = None
        self._keys = count()
        self._last_start = float("-inf")
        self._failures = 0   # children in a row that ended without an answer

    def startService(self) -> None:
        super().startService()
        # Once the reactor runs (and reaps its children).
        self._reactor.callWhenRunning(self._spawn)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        child, self._child = self._child, None
        if child is None or child.ended:
            return None
        child.transport.closeStdin()   # it leaves at end of input
        kill = self._reactor.callLater(STOP_WAIT, _kill, child)

        def ended(_: object) -> None:
            if kill.active():
                kill.cancel()
        return child.done.addCallback(ended)

    def verify(self, stored: str, password: str | bytes) -> defer.Deferred[bool] | None:
        """Whether `password` matches `stored`, verified in the child; None when the child
        cannot take it now (busy, not running, a hash it does not verify)."""
        child = self._child
        if child is None or child.ended:
            if child is not None and not child.answered:
                # One that never answered (a broken installation): not every login.
                self._failures, self._child = self._failures + 1, None
            wait = min(RESTART_DELAY * 2 ** min(self._failures, 10), RESTART_MAX)
            if self.running and self._reactor.seconds() - self._last_start >= wait:
                self._spawn()   # for the next login
            return None
        if child.pending:
            return None
        value = sodium_hash(stored)
        try:
            secret = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        except (UnicodeError, TypeError):
            return None   # the threads' verify_password says no, as for any such input
        if value is None or 6 + len(value) + len(secret) > hashchild.MAX_FRAME:
            return None
        key = next(self._keys) & 0xFFFFFFFF
        body = key.to_bytes(4, "big") + len(value).to_bytes(2, "big") + value + secret
        d: defer.Deferred[bool] = defer.Deferred()
        child.pending[key] = d
        child.deadline = self._reactor.callLater(REQUEST_TIMEOUT, child.stuck)
        child.transport.write(len(body).to_bytes(4, "big") + body)
        return d

    def _spawn(self) -> None:
        if not self.running or self._library is None:
            return
        self._last_start = self._reactor.seconds()
        child = _Child()
        try:
            # -I -S: the standard library alone (hashchild.py imports nothing else).
            self._reactor.spawnProcess(
                child, sys.executable,
                [sys.executable, "-I", "-S", str(Path(hashchild.__file__)), self._library],
                env={}, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self._failures += 1   # tried again less and less often, as a child that dies
            log.error("cannot start the password hash process ({error}): verifying in "
                      "threads", error=e)
            return
        child.on_first_answer = self._working
        self._child = child

    def _working(self) -> None:
        """A child answered: the installation works; one that dies later is replaced
        after RESTART_DELAY, whatever failed before."""
        self._failures = 0


def _kill(child: _Child) -> None:
    if not child.ended:
        with contextlib.suppress(error.ProcessExitedAlready):
            child.transport.signalProcess("KILL")
