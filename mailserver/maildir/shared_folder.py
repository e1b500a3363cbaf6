"""A folder on a Maildir root that several server nodes share: the reactor side.

`SharedFolder` is a `Folder` whose disk side is shared_disk.SharedFolderDisk (indexes in
this node's state_dir, mod-sequences from the folder's shared change log, every scan and
change under the uid list's dot-lock).  What changes here, against a folder of one node:

- `refresh` always asks a thread: whether the folder changed is a few open() calls and a
  listing of new/ on the shared file system, which may block (an NFS server that does not
  answer) and so never runs in the reactor.  That question runs beside the folder's read
  jobs, as the single node's stat() calls do, and only a change found makes a sync job;
  refreshes asked for while either waits share it.  No directory mtimes are compared, so
  the DIRTY_WINDOW second look is not needed either.
- No edit runs inline in the reactor: each takes the dot-lock, which another node may hold.
- CHANGEDSINCE's in-memory list takes values in any order (another node's logged value
  may be below one this node applied before it was read), and QRESYNC's expunge memory
  is read from the change log, which every node writes.

`SharedStorage` says where a folder's node-local index goes and makes the folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from mailserver.maildir.executor import INDEX
from mailserver.maildir.folder import Folder, FolderChanges, MessageInfo, NoSuchFolder
from mailserver.maildir.shared_disk import (
    INDEX_DIR,
    NodeLocalIndex,
    SharedFolderDisk,
    insert_modseqs,
    move_index_files,
    node_index_dir,
    remove_index_files,
    vanished_since,
)


class SharedStorage:
    """A shared Maildir root as one node uses it: indexes under `state_dir/indexes`."""

    def __init__(self, maildir_root: Path, state_dir: Path) -> None:
        self.maildir_root = Path(maildir_root)
        self.index_root = Path(state_dir) / INDEX_DIR

    def index_dir(self, folder_path: Path) -> Path:
        return node_index_dir(self.index_root, self.maildir_root, folder_path)

    def folder(self, path: Path, name: str, escaped_host: str) -> SharedFolder:
        return SharedFolder(path, name, escaped_host, self)


class _QueuedRefresh:
    __slots__ = ("force", "waiters")

    def __init__(self, force: bool) -> None:
        self.force = force
        self.waiters: list[Deferred[FolderChanges]] = []


class SharedFolder(Folder):
    """A Folder on a shared Maildir root (see the module text)."""

    def __init__(self, path: Path, name: str, escaped_host: str, storage: SharedStorage,
                 clock: Any = None) -> None:
        super().__init__(path, name, escaped_host, clock)
        self._storage = storage
        self._index = NodeLocalIndex(storage.index_dir(self.path))
        self._disk = SharedFolderDisk(self.path, name, escaped_host, self._index)
        self._queued_refresh: _QueuedRefresh | None = None
        self._quiet_waiters: list[Deferred[FolderChanges]] | None = None

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> Deferred[FolderChanges]:
        """Catch up with the disk and the other nodes, in a thread; fires with what
        changed (listeners hear it too).

        Whether anything changed is asked first beside the folder's read jobs (a NOOP does
        not wait for another session's long SORT), then, if something did, a sync runs as
        a job.  Calls while either waits share it."""
        if force or not self._loaded or self._deleted or self._executor.changing:
            return self._refresh_job(force)
        waiter: Deferred[FolderChanges] = Deferred()
        if self._quiet_waiters is None:
            self._quiet_waiters = []
            check = deferToThread(self._disk.unchanged, self.path)
            check.addErrback(lambda _: False)   # in doubt: a sync
            check.addCallback(self._quiet_checked)
        self._quiet_waiters.append(waiter)
        return waiter

    def _quiet_checked(self, quiet: bool) -> None:
        waiters, self._quiet_waiters = self._quiet_waiters or [], None
        if quiet and not self._executor.changing and not self._deleted:
            for w in waiters:
                w.callback(FolderChanges())
            return
        d = self._refresh_job(False)
        for w in waiters:
            d.addBoth(_pass_to, w)
        d.addErrback(lambda _: None)   # each waiter has it

    def _refresh_job(self, force: bool) -> Deferred[FolderChanges]:
        queued = self._queued_refresh
        if queued is not None:
            queued.force = queued.force or force
            waiter: Deferred[FolderChanges] = Deferred()
            queued.waiters.append(waiter)
            return waiter
        queued = self._queued_refresh = _QueuedRefresh(force)

        def job() -> Deferred[FolderChanges]:
            if self._queued_refresh is queued:
                self._queued_refresh = None   # from now on a new call queues anew
            if self._deleted:
                return fail(NoSuchFolder(f"folder {self.name} was deleted"))
            d = self._executor.thread(self._disk.sync, self._view(), queued.force)
            d.addCallbacks(self._apply_sync, self._sync_failed, callbackArgs=(None,))
            d.addErrback(self._translate)
            return d

        def fan_out(result: Any) -> Any:
            for w in queued.waiters:
                _pass_to(result, w)
            return result
        return self._executor.submit(job).addBoth(fan_out)

    def _can_inline(self) -> bool:
        return False

    # -- mod-sequences ----------------------------------------------------------------------------

    def _log_modseqs(self, infos: Iterable[MessageInfo]) -> None:
        insert_modseqs(self._modseq_log, list(infos), self._modseq_log_floor)
        log = self._modseq_log
        if len(log) > 2 * max(len(self._infos), 1000):
            floor = log[len(log) // 2][0]
            self._modseq_log = [e for e in log if e[0] > floor]
            self._modseq_log_floor = floor

    def vanished_since(self, modseq: int, present: Sequence[int],
                       within: Sequence[tuple[int, int]] | None = None,
                       unchanged_below: int = 0) -> Deferred[list[tuple[int, int]]]:
        """QRESYNC's VANISHED (EARLIER) (see Folder.vanished_since), from the change log
        that every node appends its expunges to."""
        return self._executor.run(vanished_since, self.path, self.uidvalidity, modseq,
                                  present, within, unchanged_below, self.uidnext, kind=INDEX)

    # -- the node-local index follows RENAME and goes with DELETE ---------------------------------

    def relocate(self, path: Path, name: str) -> Deferred[None]:
        old = self._index
        self.path = Path(path)
        self.name = name
        self._index = NodeLocalIndex(self._storage.index_dir(self.path))
        new_dir = self._index.dir

        def close_and_move() -> None:
            old.close()
            move_index_files(old.dir, new_dir)
        return self._executor.run(close_and_move)

    def mark_deleted(self) -> Deferred[None]:
        index_dir = self._index.dir
        d = super().mark_deleted()
        return d.addCallback(lambda _: self._executor.run(remove_index_files, index_dir,
                                                          kind=INDEX))


def _pass_to(result: Any, waiter: Deferred[Any]) -> Any:
    """Give a shared result to one more waiter; the result goes on unchanged."""
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
    return result
