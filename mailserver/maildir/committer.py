"""Group commit for deliveries: many messages, one directory fsync, one hand-back.

Every accepted SMTP message must be fsynced (file and new/ directory) before its 250.
Done one message per pool thread, each message costs two thread hand-offs, its own
directory fsync and GIL ping-pong between a dozen threads.  Here a few dedicated threads
each take every delivery waiting, place and fsync their files, fsync each directory
once for the whole group, and hand all the results back to the reactor in one call.
With one message waiting, it is exactly the single-message path; under load the groups
grow by themselves (while one group syncs, the next one queues).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.maildir.delivery import DeliveryResult, Placement, sync_directories

log = Logger()

COMMIT_THREADS = 1   # one thread: its groups grow under load, and fewer threads fight for the GIL
MAX_GROUP = 64       # deliveries per group, so one group never waits for a very long one

_Job = tuple[Any, Deferred]  # (Delivery, its Deferred)


class GroupCommitter:
    """Commits deliveries (see module docstring); one per store, threads started on use."""

    def __init__(self, reactor: Any = None, threads: int = COMMIT_THREADS) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self._size = threads
        self._queue: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._stopping = False
        self._shutdown_hooked = False

    def commit(self, delivery: Any) -> Deferred[list[DeliveryResult]]:
        """Write, fsync and place `delivery`'s file (a maildir Delivery) in a commit
        thread, then fsync its directories with the group's; fires in the reactor."""
        d: Deferred[list[DeliveryResult]] = Deferred()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the committer is stopped")
            self._queue.append((delivery, d))
            if self._idle:
                self._cv.notify()
            elif len(self._threads) < self._size:
                self._start_thread()
        return d

    def _start_thread(self) -> None:
        if not self._shutdown_hooked:
            self._shutdown_hooked = True
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        t = threading.Thread(target=self._work, name=f"maildir-commit-{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        """Finish what is queued, then end the threads (at reactor shutdown)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._idle += 1
                    self._cv.wait()
                    self._idle -= 1
                if not self._queue:
                    return
                group = [self._queue.popleft() for _ in range(min(MAX_GROUP, len(self._queue)))]
            self._reactor.callFromThread(self._deliver, self._commit_group(group))

    @staticmethod
    def _commit_group(group: list[_Job]) -> list[tuple[Deferred, Any]]:
        # Stage by stage over the whole group: every file written before the first fsync
        # (whose journal commit then carries the others' data), then the fsyncs, then
        # the links into new/, then one fsync per directory.
        for delivery, _ in group:
            delivery.stage_write()
        for delivery, _ in group:
            delivery.stage_sync()
        placed: list[tuple[Deferred, Placement | Failure]] = []
        for delivery, d in group:
            try:
                placed.append((d, delivery._commit_place()))
            except BaseException:
                placed.append((d, Failure()))
        dirs = [p for _, pl in placed if isinstance(pl, Placement) for p in pl.dirs]
        errors = sync_directories(dirs)
        out: list[tuple[Deferred, Any]] = []
        for d, pl in placed:
            if isinstance(pl, Placement):
                try:
                    out.append((d, pl.finish(errors)))
                except BaseException:
                    out.append((d, Failure()))
            else:
                out.append((d, pl))
        return out

    @staticmethod
    def _deliver(results: list[tuple[Deferred, Any]]) -> None:
        for d, result in results:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
