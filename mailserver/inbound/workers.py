"""Worker processes for CPU work that would otherwise share the reactor's GIL: the checks'
DKIM and ARC hashing and signatures, a folder's header pass.

`WorkerPool` is called like deferToThread, `pool(function, *args)`, with a function of a
Twisted-free module (`worker.ALLOWED`), and runs it in a child process
(`mailserver.inbound.worker`): the work runs beside the reactor instead of taking turns
with it for the GIL, as a thread would.  Each request goes to the child with the fewest
requests waiting.

A child that dies fails its requests in flight (the caller turns that into temperror
results: the message is still judged once) and is started again for the next request.
A child that gives no answer within `request_timeout` (a verification stuck on some
input) is killed: the request it was working on fails, and those queued behind it go
to another child, so one message cannot hold up every other message's checks.
If children cannot be started at all, requests run in threads instead.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from itertools import count
from typing import Any, Callable, NamedTuple

from twisted.internet import defer, error, protocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.inbound.worker import ALLOWED, MAX_FRAME, frame

log = Logger()


class WorkerFailed(Exception):
    """The child could not answer (it died, or the function raised there)."""


class _Request(NamedTuple):
    d: defer.Deferred
    function: Callable[..., Any]
    name: str
    args: tuple[Any, ...]


class _Child(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool") -> None:
        self.pool = pool
        # In the order sent, which is the order the child answers in: the first is the
        # one it is working on.
        self.pending: dict[int, _Request] = {}
        self.buffer = bytearray()
        self.ended = False
        # When the child started on its oldest request: when that was sent to an idle
        # child, or when the child answered the one before it.  Time spent queued behind
        # other requests is not the child being stuck.
        self.busy_since = 0.0

    def send(self, key: int, request: _Request, now: float) -> None:
        if not self.pending:
            self.busy_since = now
        self.pending[key] = request
        self.transport.write(frame((key, request.name, request.args)))

    def outReceived(self, data: bytes) -> None:
        # Whole answers in `data` are read from it directly; a frame that comes in
        # pieces (a large answer) is gathered in a bytearray, appended to, not copied.
        if self.buffer:
            self.buffer += data
            buffer: bytes | bytearray = self.buffer
        else:
            buffer = data
        start = 0
        while len(buffer) - start >= 4:
            size = int.from_bytes(buffer[start:start + 4], "big")
            if size > MAX_FRAME:
                log.error("worker process sent a frame of {size} bytes; stopping it",
                          size=size)
                self.transport.signalProcess("KILL")
                self.buffer = bytearray()
                return
            if len(buffer) - start < 4 + size:
                break
            key, ok, value = pickle.loads(buffer[start + 4:start + 4 + size])
            start += 4 + size
            request = self.pending.pop(key, None)
            if request is None:
                continue
            if ok:
                request.d.callback(value)
            else:
                request.d.errback(WorkerFailed(value))
        if start:
            self.busy_since = self.pool.reactor.seconds()  # on to the next request
            self.buffer = bytearray(buffer[start:])
        elif buffer is not self.buffer:
            self.buffer = bytearray(buffer)

    def errReceived(self, data: bytes) -> None:
        log.warn("worker process: {text}", text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.pool.child_ended(self)
        pending, self.pending = self.pending, {}
        for request in pending.values():
            request.d.errback(
                WorkerFailed(f"worker process ended: {reason.getErrorMessage()}"))


class WorkerPool:
    """`idle_timeout` (seconds): children with nothing to do for that long are ended (and
    started again by the next request), for work that comes in bursts.
    `request_timeout` (seconds): a child that has not answered a request for that long
    is killed (None: never).  `preload`: the modules (of worker.ALLOWED) a child imports
    before its first request; all of them when empty."""

    def __init__(self, reactor: Any = None, processes: int = 1,
                 idle_timeout: float | None = None, preload: tuple[str, ...] = (),
                 request_timeout: float | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.processes = max(1, processes)
        self.preload = preload
        self._children: list[_Child] = []
        self._ids = count(1)
        self._threads_only = False
        self._stopping = False
        self._hooked = False
        self._names: dict[Callable[..., Any], str] = {}
        self.idle_timeout = idle_timeout
        self._last_used = 0.0
        self._idle_call: Any = None
        self.request_timeout = request_timeout
        self._watch_call: Any = None

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        name = self._names.get(function)
        if name is None:
            name = self._names[function] = f"{function.__module__}:{function.__name__}"
        if self._threads_only or self._stopping or function.__module__ not in ALLOWED:
            return deferToThread(function, *args)
        d: defer.Deferred = defer.Deferred()
        self._send(d, function, name, args)
        if self.idle_timeout is not None:
            self._last_used = self.reactor.seconds()
            if self._idle_call is None:
                self._idle_call = self.reactor.callLater(self.idle_timeout, self._retire_idle)
        return d

    def _send(self, d: defer.Deferred, function: Callable[..., Any], name: str,
              args: tuple[Any, ...]) -> None:
        child = None if self._threads_only or self._stopping else self._child()
        if child is None:
            deferToThread(function, *args).chainDeferred(d)
            return
        child.send(next(self._ids), _Request(d, function, name, args), self.reactor.seconds())
        if self.request_timeout is not None and self._watch_call is None:
            self._watch_call = self.reactor.callLater(self.request_timeout, self._watch)

    def _watch(self) -> None:
        """Kill each child that has been on its oldest request for request_timeout; look
        again when the next one would have been."""
        self._watch_call = None
        assert self.request_timeout is not None
        now = self.reactor.seconds()
        wait: float | None = None
        for child in list(self._children):
            if child.ended or not child.pending:
                continue
            key = next(iter(child.pending))
            left = child.busy_since + self.request_timeout - now
            if left <= 0:
                self._kill_hung(child, key)
            else:
                wait = left if wait is None else min(wait, left)
        if wait is not None:
            if self._watch_call is not None:  # set again by a request moved just now
                self._watch_call.cancel()
            self._watch_call = self.reactor.callLater(wait, self._watch)

    def _kill_hung(self, child: _Child, key: int) -> None:
        """The request `key` has kept `child` busy too long: it fails; the child is
        killed and the requests waiting behind it go to another child."""
        hung = child.pending.pop(key)
        waiting, child.pending = child.pending, {}
        child.ended = True  # no new request goes to it
        log.error("a worker process gave no answer to {name} in {timeout:g} s; "
                  "stopping it ({n} requests waiting behind it go to another)",
                  name=hung.name, timeout=self.request_timeout, n=len(waiting))
        with contextlib.suppress(error.ProcessExitedAlready):
            child.transport.signalProcess("KILL")
        hung.d.errback(WorkerFailed(f"no answer in {self.request_timeout:g} s"))
        for request in waiting.values():
            self._send(request.d, request.function, request.name, request.args)

    def _retire_idle(self) -> None:
        """End the children once none has had a request for `idle_timeout` seconds."""
        self._idle_call = None
        assert self.idle_timeout is not None
        wait = self._last_used + self.idle_timeout - self.reactor.seconds()
        busy = any(c.pending for c in self._children if not c.ended)
        if wait > 0 or busy:
            self._idle_call = self.reactor.callLater(max(wait, 1.0), self._retire_idle)
            return
        for child in self._children:
            if not child.ended:
                child.ended = True  # no new request goes to it while it winds down
                child.transport.closeStdin()

    def _child(self) -> _Child | None:
        live = [c for c in self._children if not c.ended]
        if len(live) < self.processes and (not live or min(len(c.pending) for c in live)):
            started = self._start()
            if started is not None:
                return started
        return min(live, key=lambda c: len(c.pending)) if live else None

    def _start(self) -> _Child | None:
        if not self._hooked:
            self._hooked = True
            self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        child = _Child(self)
        env = dict(os.environ)
        # The child imports mailserver from wherever this process did.
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        try:
            self.reactor.spawnProcess(child, sys.executable,
                                      [sys.executable, "-P", "-m", "mailserver.inbound.worker",
                                       *self.preload],
                                      env=env, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            log.error("cannot start a worker process ({error}): its work runs in threads",
                      error=e)
            self._threads_only = True
            return None
        self._children.append(child)
        return child

    def child_ended(self, child: _Child) -> None:
        if child in self._children:
            self._children.remove(child)
        if not self._stopping and child.pending:
            log.warn("a worker process ended with {n} requests in flight",
                     n=len(child.pending))

    def stop(self) -> None:
        """Close the children's input: each ends once it has answered what it has."""
        self._stopping = True
        for call in (self._idle_call, self._watch_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._watch_call = None
        for child in self._children:
            if not child.ended:
                child.transport.closeStdin()
