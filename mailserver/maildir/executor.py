"""One folder's executor: every disk job of the folder, one at a time, in order.

A job starts in the reactor, hands its blocking work to the thread pool (`thread`: a
snapshot in, a result out) and applies the result in the reactor; only when its Deferred
has fired does the next job of the folder start.  So the folder's mutable state belongs
to the reactor alone, and the invariant the disk side relies on holds:

    the reactor changes a folder's message dicts only while it applies a result, and
    never while a job's thread runs.

A job's thread may therefore read those dicts through read-only views (folder_disk.py
`FolderView`) without a copy and without a lock.  The reactor's own small work on the
folder (an inline STORE, a refresh that only stats) is done only when the executor says it
may (`idle`, `changing`), never beside a job it could disturb.

Jobs come in three kinds:

- CHANGE (sync, flag changes, expunge, append, copy, closing): they change the folder and
  its disk state; while one runs or waits, the reactor neither edits nor trusts its stamps.
- READ (SEARCH, SORT): they read the message files and the folder's views and change
  nothing; a refresh that finds nothing changed may answer meanwhile, an inline edit (a
  rename under the reader's feet, a change to the dicts it reads) may not.
- INDEX (writing cached values, the expunge memory, closing an idle index): they touch the
  index file only, which has locks of its own; the reactor's inline work goes on beside
  them.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread

T = TypeVar("T")

CHANGE = "change"
READ = "read"
INDEX = "index"


class FolderExecutor:
    """The serial executor of one folder (a DeferredLock over the reactor's thread pool)."""

    def __init__(self) -> None:
        self._lock = DeferredLock()
        self._pending = {CHANGE: 0, READ: 0, INDEX: 0}  # jobs running or waiting

    @property
    def idle(self) -> bool:
        """No job but index work runs or waits: the reactor may edit the folder itself."""
        return not (self._pending[CHANGE] or self._pending[READ])

    @property
    def changing(self) -> bool:
        """A job that changes the folder runs or waits: what the reactor knows is about
        to move, so a refresh must queue behind it."""
        return self._pending[CHANGE] > 0

    def submit(self, job: Callable[[], Deferred[T] | T], kind: str = CHANGE) -> Deferred[T]:
        """Run `job()` in the reactor as the folder's next job; it may hop to threads with
        `thread` and apply what they return.  The next job starts when its Deferred fires."""
        pending = self._pending
        pending[kind] += 1

        def finished(result: Any) -> Any:
            pending[kind] -= 1
            return result
        return self._lock.run(job).addBoth(finished)

    def run(self, fn: Callable[..., T], *args: Any, kind: str = CHANGE,
            **kwargs: Any) -> Deferred[T]:
        """`fn(*args, **kwargs)` in a thread as one job (nothing to apply after it)."""
        return self.submit(lambda: deferToThread(fn, *args, **kwargs), kind)

    @staticmethod
    def thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """`fn` in the thread pool: for use inside a job only (the job holds the turn)."""
        return deferToThread(fn, *args, **kwargs)
