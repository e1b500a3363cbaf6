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

import os
import threading
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.fsutil import can_sync_filesystem, sync_by_filesystem
from mailserver.maildir.delivery import Delivery, DeliveryResult, Placement, sync_directories

log = Logger()

COMMIT_THREADS = 1   # one thread: its groups grow under load, and fewer threads fight for the GIL
MAX_GROUP = 64       # deliveries per group, so one group never waits for a very long one
SYNCFS_MIN_FILES = 3  # from this many files on, a group syncs their file system whole

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
            self._reactor.callFromThread(self._deliver, commit_group(group))

    @staticmethod
    def _deliver(results: list[tuple[Deferred, Any]]) -> None:
        for d, result in results:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


def commit_group(group: list[tuple[Delivery, Any]]) -> list[tuple[Any, Any]]:
    """Commit every delivery of `group` ((delivery, key) pairs); (key, its results or a
    Failure) for each, in order.  Blocking: a commit thread or the commit process."""
    # Stage by stage over the whole group: every file written, then all synced, then
    # the links into new/, then the directories synced once for all.
    for delivery, _ in group:
        delivery.stage_write()
    whole = _sync_files([delivery for delivery, _ in group])
    placed: list[tuple[Any, Placement | Failure]] = []
    for delivery, key in group:
        try:
            placed.append((key, delivery._commit_place()))
        except BaseException:
            placed.append((key, Failure()))
    dirs = [p for _, pl in placed if isinstance(pl, Placement) for p in pl.dirs]
    errors = sync_directories(dirs, whole_filesystems=whole)
    out: list[tuple[Any, Any]] = []
    for (delivery, _), (key, pl) in zip(group, placed):
        if isinstance(pl, Placement):
            try:
                results = pl.finish(errors)
            except BaseException:
                out.append((key, Failure()))
                continue
            out.append((key, results))
            delivery.record_quota(results)
        else:
            out.append((key, pl))
    return out


def _sync_files(deliveries: list[Delivery]) -> bool:
    """Make the group's written files durable; True if it synced whole file systems.

    An fsync flushes the disk's cache once per file: a group of twenty then waits for
    twenty flushes in a row (about 0.25 ms each on a virtual disk, more on a spinning one).
    From SYNCFS_MIN_FILES files on, one syncfs(2) per file system they lie on writes them
    all with one flush (it also writes whatever else is dirty on that file system, which
    is why single files keep their fsync).
    """
    pending = [d for d in deliveries if d.unsynced_fd >= 0]
    if len(pending) < SYNCFS_MIN_FILES or not can_sync_filesystem():
        for delivery in deliveries:
            delivery.stage_sync()
        return False
    errors = sync_by_filesystem(pending, lambda d: os.fstat(d.unsynced_fd).st_dev,
                                lambda d: d.unsynced_fd)
    for delivery in pending:
        delivery.synced_with_filesystem(errors.get(delivery))
    return True
