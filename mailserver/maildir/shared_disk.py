"""The disk side of a folder whose Maildir root several nodes share (`[storage] shared`).

What differs from a folder of one node (folder_disk.py), and why:

- The index is the node's own (`NodeLocalIndex`, under state_dir/indexes/, see
  `node_index_dir`): SQLite's locking and WAL do not work on NFS, and each node caches what
  it reads anyway.  It is created on demand, and repaired as the folder opens: messages the
  uid list has and the index does not are looked at and added (first with no lock held, so
  a node opening a large folder cold keeps the uid list lock only for the listing), rows of
  files that are gone are dropped, and the mod-sequence rows of another UIDVALIDITY are
  forgotten.  A missing or damaged file is simply built again.
- Mod-sequences come from the folder's shared change log (changelog.py), not from this
  node's counter alone: a node hands out a value only while it holds the uid list's
  dot-lock, above the log's highest, and appends it to the log before the change is
  reported; a change another node logged is taken with the value it logged.
- Every scan and every change runs under the uid list's dot-lock, so a node never sees
  another node's change half made (a rename before its log line) and the log, the uid list
  and the files agree whenever the lock is free.  Only programs that do not take part
  (Dovecot on the same root, a shell) change things outside it; a full look every
  FULL_RESCAN_INTERVAL seconds finds those, and their changes get new values then.
- Whether anything changed is not told by directory mtimes (their granularity and caching
  are the file system's and the kernel's business): a folder is quiet while its
  dovecot-uidlist, dovecot-keywords and change log are the files this node last saw (each
  opened, so NFS's close-to-open consistency gives current attributes) and new/ is empty.
  When only the change log grew with flag changes, the files named by its lines are looked
  at (a stat each), nothing is listed; else the folder is listed as before.  Before a
  listing the directories' attribute caches are flushed as Dovecot does on NFS
  (`mail_nfs_storage`: a chown to the owner they have).

Nothing here imports Twisted (tests/unit/test_layering.py).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Sequence

from mailserver.fsutil import stat_by_open
from mailserver.maildir.changelog import LogReader, LogState, LogWriter, name_suffix, record_line
from mailserver.maildir.changelog import vanished_since as log_vanished_since
from mailserver.maildir.flags import size_from_base
from mailserver.maildir.folder_disk import (
    Edit,
    FolderDisk,
    FolderView,
    MessageInfo,
    NoSuchFolder,
    Sync,
    scan,
    vanished_ranges,
)
from mailserver.maildir.index import INDEX_NAME, FolderIndex
from mailserver.maildir.keywords import KEYWORDS_NAME
from mailserver.maildir.uidlist import UIDLIST_NAME, DotLock, FileStamp

log = logging.getLogger(__name__)

INDEX_DIR = "indexes"          # under state_dir
FULL_RESCAN_INTERVAL = 60.0    # seconds: a folder in use is listed at least this often


# -- where the index lives -----------------------------------------------------------------------

def node_index_dir(index_root: Path, maildir_root: Path, folder_path: Path) -> Path:
    """The directory of a folder's node-local index: the folder's path below the Maildir
    root, below `index_root` (state_dir/indexes/<domain>/<user>/ for INBOX,
    .../<user>/.Sent/ for Sent).  The Maildir's own names, so an operator finds a user's
    indexes at a glance and removes them with one rm -r; they are short enough already
    (the same path exists on the shared root)."""
    return Path(index_root) / Path(folder_path).relative_to(maildir_root)


class NodeLocalIndex(FolderIndex):
    """A folder index kept outside the folder: its directory is made when first needed."""

    def _open_checked(self):  # type: ignore[no-untyped-def]
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        return super()._open_checked()


def remove_index_files(index_dir: Path, keep_dir: bool = False) -> None:
    """Remove an index (a folder deleted here); its directory too if empty."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(str(Path(index_dir) / INDEX_NAME) + suffix)
        except FileNotFoundError:
            continue   # that part was never made
        except OSError as e:
            log.warning("cannot remove %s: %s", str(Path(index_dir) / INDEX_NAME), e)
    if keep_dir:
        return
    try:
        os.rmdir(index_dir)
    except OSError:
        pass   # other folders' indexes below it (INBOX), or not there


def move_index_files(old_dir: Path, new_dir: Path) -> None:
    """After RENAME here: the index follows the folder when nothing is in its new place
    (what another node left there for an older folder of that name is repaired instead)."""
    if (Path(new_dir) / INDEX_NAME).exists():
        remove_index_files(old_dir)
        return
    try:
        os.makedirs(new_dir, mode=0o700, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            src = str(Path(old_dir) / INDEX_NAME) + suffix
            if os.path.exists(src):
                os.rename(src, str(Path(new_dir) / INDEX_NAME) + suffix)
    except OSError as e:
        log.warning("index of %s not moved: %s", str(old_dir), e)
    remove_index_files(old_dir)


# -- file system caches --------------------------------------------------------------------------

def fresh_stamp(path: Path) -> FileStamp | None:
    """A control file's identity, from an open() of it: on NFS an open revalidates the
    cached attributes (close-to-open consistency), a stat() may not."""
    st = stat_by_open(path)
    return None if st is None else FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


def _uidlist_header(path: Path) -> tuple[int, int] | None:
    """(UIDVALIDITY, UIDNEXT) of a version 3 dovecot-uidlist's first line."""
    try:
        with open(path, "rb") as f:
            fields = f.readline(512).split()
    except OSError:
        return None
    values = {f[:1]: f[1:] for f in fields[1:]}
    try:
        return int(values[b"V"]), int(values[b"N"])
    except (KeyError, ValueError):
        return None


def flush_dir_cache(path: Path) -> None:
    """Make the next listing of directory `path` current on NFS: a chown to the owner it
    has makes the client drop its cached attributes and contents (what Dovecot does with
    mail_nfs_storage on Linux).  Elsewhere it changes nothing but the ctime."""
    # Not allowed (another owner) or gone: the listing is only as fresh as NFS makes it,
    # as without this call.
    with contextlib.suppress(OSError):
        st = os.stat(path)
        os.chown(path, st.st_uid, -1)


# -- the folder ------------------------------------------------------------------------------------

class SharedFolderDisk(FolderDisk):
    """FolderDisk on a shared Maildir root (see the module text); one thread at a time."""

    def __init__(self, path: Path, name: str, escaped_host: str, index: FolderIndex) -> None:
        super().__init__(path, name, escaped_host, index)
        self._reader = LogReader(self.path)
        self._writer = LogWriter(self.path)
        # The change log's lines up to this mod-sequence are in the view this side last
        # returned (the reactor applies every result before the next job starts).
        self._applied = 0
        # (uid list, keywords, change log position) as this side left them, lock held.
        self._seen: tuple[Any, ...] | None = None
        self._last_full = float("-inf")
        self._issued_now: list[int] = []
        # The highest value this node may have announced from its own index (before it
        # shared the root, or when the log was lost): the log is moved above it.
        self._known_high = 0
        self._first_rows: dict[str, tuple[int, int, str]] = {}

    def _follow(self, view: FolderView) -> None:
        moved = view.path != self.path
        super()._follow(view)
        if moved:
            self._reader = LogReader(self.path)
            self._writer = LogWriter(self.path)
            self._seen = None

    def _lock(self) -> DotLock:
        return DotLock(self.path / UIDLIST_NAME)

    def _forget(self) -> None:
        """After a failure: read everything again next time."""
        self._uidlist = None
        self._keywords = None
        self._reader.forget()
        self._seen = None

    # -- control files, read fresh --------------------------------------------------------------

    def _current_uidlist(self, view: FolderView):  # type: ignore[no-untyped-def]
        """The uid list as on disk now.  Its identity is taken from an open() (the stat()
        that follows is then current on NFS), and when it looks unchanged its header is
        read too: a rewrite by another node that reuses the inode number and the size
        within one tick of the server's clock still moves UIDNEXT or UIDVALIDITY."""
        path = self.path / UIDLIST_NAME
        stamp = fresh_stamp(path)
        ul = self._uidlist
        if ul is not None and stamp is not None and ul.stamp == stamp \
                and _uidlist_header(path) != (ul.uidvalidity, ul.nextuid):
            self._uidlist = None
        return super()._current_uidlist(view)

    def _current_keywords(self):  # type: ignore[no-untyped-def]
        fresh_stamp(self.path / KEYWORDS_NAME)
        return super()._current_keywords()

    def _now_stamps(self) -> tuple[Any, ...]:
        return (fresh_stamp(self.path / UIDLIST_NAME), fresh_stamp(self.path / KEYWORDS_NAME),
                self._reader.stamp())

    def _seen_now(self) -> tuple[Any, ...]:
        ul, kw = self._uidlist, self._keywords
        return (ul.stamp if ul is not None else None, kw.stamp if kw is not None else None,
                self._reader.position)

    def _new_is_empty(self) -> bool:
        try:
            return not any(n[:1] != "." for n in os.listdir(self.path / "new"))
        except FileNotFoundError:
            raise NoSuchFolder(f"folder {self.name} does not exist") from None

    def _quiet(self) -> bool:
        """Nothing changed since this side last looked (no lock needed: a few opens and a
        listing of new/, which is empty unless mail arrived)."""
        return (self._seen is not None and self._now_stamps() == self._seen
                and self._new_is_empty())

    def unchanged(self, path: Path) -> bool:
        """Whether a sync now would find nothing: for a refresh, in a thread, beside the
        folder's read jobs (it only reads what the last change job left, and a change job
        running meanwhile can only make it say False).  False when a full look is due or
        the folder moved to another `path`."""
        if path != self.path or time.monotonic() - self._last_full >= FULL_RESCAN_INTERVAL:
            return False
        try:
            quiet = self._quiet()
        except OSError:
            return False
        if quiet and not self.index.is_open and self.index.path.exists():
            self.index.open_reader()   # closed by the idle sweep: reopened here
        return quiet

    # -- mod-sequences ---------------------------------------------------------------------------

    def _issue_modseq(self) -> int:
        """A value above the log's highest (read under the lock) and the clock; it becomes
        a promise only once `_settle` or `_edit` logs it."""
        value = max(self._modseq_issued + 1, time.time_ns() // 1000, self._reader.highest + 1)
        self._modseq_issued = value
        self._issued_now.append(value)
        return value

    def _start_modseqs(self, view: FolderView, uidvalidity: int,
                       reset: bool) -> dict[str, tuple[int, int, str]]:
        """The index's rows when the folder loads (for its UIDVALIDITY); the expunge memory
        is the change log's, so nothing else is kept."""
        self._first_rows = {}
        if view.loaded and not reset:
            return {}
        stored: dict[str, tuple[int, int, str]] = {}
        if not view.loaded:
            meta, stored = self.index.load_modseqs()
            high = max(meta.get("highestmodseq", 0),
                       max((r[1] for r in stored.values()), default=0))
            self._known_high = max(self._known_high, high)
            if meta.get("modseq_uidvalidity") != uidvalidity:
                stored = {}
        if not stored:
            self._forget_vanished(uidvalidity)
        self._first_rows = stored
        return stored

    def _forget_vanished(self, uidvalidity: int) -> None:
        self.index.note_modseq_reset()
        self.index.note_modseq_meta(modseq_uidvalidity=uidvalidity)

    # -- sync ----------------------------------------------------------------------------------

    def sync(self, view: FolderView, force: bool = False) -> Sync:
        """Catch up with the disk and the change log (a thread)."""
        self._follow(view)
        try:
            due = time.monotonic() - self._last_full >= FULL_RESCAN_INTERVAL
            if view.loaded and not force and not due and self._quiet():
                if not self.index.is_open and self.index.path.exists():
                    self.index.open_reader()   # closed by the idle sweep: reopened here
                return Sync(stamps=self._seen or (), modseq_issued=self._modseq_issued,
                            keyword_names=self._keyword_names())
            if not view.loaded:
                self._prewarm()
            with self._lock():
                sync = self._shared_sync(view, full=force or due or not view.loaded)
        except BaseException:
            self._forget()
            raise
        self.index.write_modseqs()
        sync.modseq_issued = self._modseq_issued
        sync.keyword_names = self._keyword_names()
        return sync

    def _prewarm(self) -> None:
        """Before a folder loads: the size and date of every message the index lacks, with
        no lock held (a node opening a large folder for the first time stats every file).
        An index a single server left in the folder goes: it is out of date, and SQLite
        files must not be shared over NFS."""
        if self.index.dir != self.path:
            remove_index_files(self.path, keep_dir=True)
        try:
            _meta, rows = self.index.load()
            listing = scan(self.path, self.name)
        except OSError:
            return   # the locked scan reports it
        add = []
        for base, (sub, name) in listing.items():
            if base in rows or sub != "cur":
                continue
            try:
                st = os.stat(self.path / sub / name)
            except FileNotFoundError:
                continue
            size = size_from_base(base)
            add.append((base, st.st_size if size is None else size, st.st_mtime))
        self.index.put_messages(add)

    def _locked_sync(self, view: FolderView) -> Sync:
        """An append or copy asks: `_edit` caught up already under this same lock hold."""
        return Sync(stamps=self._seen or (), modseq_issued=self._modseq_issued)

    def _read_log(self, view: FolderView) -> tuple[LogState, bool]:
        """The change log's lines not yet in the view; and whether the log belongs to the
        folder's UIDVALIDITY (else it is void and will be started anew)."""
        ul = self._current_uidlist(view)
        state = self._reader.read(self._applied if view.loaded else 0)
        ok = state.exists and state.uidvalidity == ul.uidvalidity and ul.uidvalidity != 0
        if not ok:
            state.changed, state.expunged = {}, {}
        return state, ok

    def _shared_sync(self, view: FolderView, full: bool) -> Sync:
        """A sync with the lock held: the changed files looked at, or the folder listed."""
        self._issued_now = []
        state, log_ok = self._read_log(view)
        jump = log_ok and state.floor > (self._applied if view.loaded else 0)
        sync = None
        if view.loaded and not full and log_ok and not jump:
            sync = self._apply_lines(view, state)
        if sync is None:
            flush_dir_cache(self.path / "new")
            flush_dir_cache(self.path / "cur")
            sync = self._sync_core(view, lock_held=True, force=True)
            sync.scan_start = 0.0   # the reactor's mtime window does not apply here
            self._settle(view, sync, state, log_ok, jump)
            self._last_full = time.monotonic()
        self._finish_locked()
        sync.stamps = self._seen or ()
        sync.modseq_issued = self._modseq_issued
        sync.keyword_names = self._keyword_names()
        return sync

    def _apply_lines(self, view: FolderView, state: LogState) -> Sync | None:
        """What other nodes logged, applied by looking at just the files it names: new
        uids in the uid list (each with its F line), uids gone from it (each with its X
        line), flag changes.  None when that is not enough (keywords changed, mail waits in
        new/, a uid changed without a line, a file is not where its line says): the
        folder is listed then.  So a node's catching up costs what changed, not the size
        of the folder."""
        seen = self._seen
        ul = self._current_uidlist(view)
        kw, kw_reread = self._current_keywords()
        if (seen is None or kw_reread or kw.stamp != seen[1] or ul.damaged
                or ul.uidvalidity != view.uidvalidity or not self._new_is_empty()):
            return None
        infos = view.infos
        sync = Sync(stamps=(), unchanged=False, uidvalidity=view.uidvalidity,
                    uidnext=ul.nextuid)
        rows: list[tuple[str, int, int, str]] = []
        if ul.stamp != seen[0]:
            listed = ul.mapping()
            for uid, info in infos.items():
                if listed.get(info.basename) != uid:
                    if uid not in state.expunged:
                        return None   # gone without a line: a program that does not log
                    sync.expunged.append(uid)
            new_rows = []
            for uid, base in ul.items():
                if uid in infos:
                    continue
                rec = state.changed.get(uid)
                if rec is None or rec[1] == "?":
                    return None
                name = base + rec[1]
                try:
                    st = os.stat(self.path / "cur" / name)
                except FileNotFoundError:
                    return None
                size = size_from_base(base)
                info = MessageInfo(uid, base, name, "cur", self._flags_of(name),
                                   st.st_size if size is None else size, st.st_mtime,
                                   False, rec[0])
                sync.added.append(info)
                new_rows.append((base, info.size, info.internaldate))
                rows.append((base, uid, info.modseq, name))
        for uid, (modseq, suffix) in sorted(state.changed.items()):
            old = infos.get(uid)
            if old is None or modseq <= old.modseq or uid in sync.expunged:
                continue   # new (above), expunged since, or already applied
            if suffix == "?":
                return None
            name = old.basename + suffix
            if name == old.filename and old.subdir == "cur":
                info = dataclasses.replace(old, modseq=modseq)
            else:
                if not os.path.exists(self.path / "cur" / name):
                    return None
                info = MessageInfo(uid, old.basename, name, "cur", self._flags_of(name),
                                   old.size, old.internaldate, old.recent, modseq)
                if info.flags != old.flags:
                    sync.flags_changed.append(info)
            sync.renamed.append(info)
            rows.append((info.basename, uid, modseq, info.filename))
        if sync.expunged:
            gone = [(infos[u].basename, u) for u in sync.expunged]
            self.index.note_expunged(gone, max(state.expunged[u] for u in sync.expunged))
            self.index.drop(b for b, _ in gone)
        if sync.added:
            self.index.put_messages(new_rows)
        self._applied = max(self._applied, state.highest)
        self.index.note_modseqs(rows)
        self.index.note_modseq_meta(highestmodseq=max(self._modseq_issued, state.highest),
                                    modseq_uidvalidity=ul.uidvalidity)
        self.index.set_meta({"uidvalidity": ul.uidvalidity, "uidnext": ul.nextuid})
        return sync

    def _settle(self, view: FolderView, sync: Sync, state: LogState, log_ok: bool,
                jump: bool) -> None:
        """Give what the scan found the values the change log says, log what it does not
        say (changes by programs that do not log, or lost), and start the log if it has
        to be.  Changes the scan's Sync in place."""
        issued = set(self._issued_now)
        first = not view.loaded or sync.reset
        rows = self._first_rows if first else {}
        known = {} if first else view.infos
        changed, floor = state.changed, state.floor
        unlogged: dict[int, MessageInfo] = {}     # uid -> info whose change is not in the log
        unlogged_x: list[int] = []
        out: dict[int, MessageInfo] = {}          # uid -> the info as settled

        def settle(info: MessageInfo) -> MessageInfo:
            rec = changed.get(info.uid)
            logged = rec[0] if rec else 0
            if info.modseq in issued:   # the scan found a change, or no trusted row
                if first:
                    row = rows.get(info.basename)
                    was = row[1] if row is not None and row[0] == info.uid else None
                else:
                    old = known.get(info.uid)
                    was = old.modseq if old is not None else None
                if first and was is None:
                    value = max(floor, logged)   # nothing known here: what the log says
                elif logged > (was or 0):
                    value = logged               # another node's change, as it logged it
                else:
                    unlogged[info.uid] = info
                    return info
            else:
                value = max(info.modseq, logged, floor if jump else 0)
            return info if value == info.modseq else dataclasses.replace(info, modseq=value)

        for info in sync.added + sync.renamed:
            out[info.uid] = settle(info)
        if not first:
            # Messages the scan found unchanged: another node's change that left the name
            # as it was (a flag set and cleared), or values below the log's floor.
            for uid, rec in changed.items():
                old = known.get(uid)
                if old is not None and uid not in out and rec[0] > old.modseq:
                    out[uid] = dataclasses.replace(old, modseq=rec[0])
            if jump:
                for uid, old in known.items():
                    if uid not in out and old.modseq < floor:
                        out[uid] = dataclasses.replace(old, modseq=floor)
            unlogged_x = [u for u in sync.expunged if u not in state.expunged]
        elif log_ok and rows:
            present = {i.basename: i.uid for i in sync.added}
            unlogged_x = [r[0] for b, r in rows.items()
                          if present.get(b) != r[0] and r[0] not in state.expunged]

        lines: list[bytes] = []
        top = 0
        if not log_ok:
            # No log for this UIDVALIDITY (the first node to share the folder, or the log
            # was lost): a new one whose floor is above everything, every message at it.
            top = self._fresh_value()
            self._writer.start(sync.uidvalidity, top)
            self._reader.forget()
            out = {i.uid: dataclasses.replace(i, modseq=top) for i in out.values()}
            for uid, old in known.items():
                if uid not in out and uid not in sync.expunged:
                    out[uid] = dataclasses.replace(old, modseq=top)
        elif unlogged or unlogged_x:
            top = self._fresh_value()
            by_suffix: dict[str, list[int]] = {}
            for uid, info in unlogged.items():
                out[uid] = dataclasses.replace(info, modseq=top)
                by_suffix.setdefault(name_suffix(info.filename, info.basename), []).append(uid)
            lines = [record_line(top, "F", uids, suffix) for suffix, uids in by_suffix.items()]
            if unlogged_x:
                lines.append(record_line(top, "X", unlogged_x))
        self._log_lines(lines)
        self._applied = max(self._applied, state.highest, top, floor)

        before = {i.uid: i for i in sync.added + sync.renamed}
        self.index.note_modseqs((i.basename, i.uid, i.modseq, i.filename)
                                for uid, i in out.items() if before.get(uid) is not i)
        self._first_rows = {}
        added = {i.uid for i in sync.added}
        sync.added = [out[i.uid] for i in sync.added]
        flag_uids = {i.uid for i in sync.flags_changed}
        sync.renamed = [info for uid, info in out.items() if uid not in added]
        sync.renamed.sort(key=lambda i: i.uid)
        sync.flags_changed = [out[u] for u in sorted(flag_uids)]

    def _fresh_value(self) -> int:
        """A new value for something this node logs now (the lock is held)."""
        return max(self._issue_modseq(), self._known_high + 1)

    def _log_lines(self, lines: list[bytes]) -> None:
        if lines:
            self._writer.append(lines)

    def _finish_locked(self) -> None:
        """End of a locked sync or edit: the log at least as high as anything this node
        may have announced, this side's counter at the log's highest (a value handed out
        and not logged was never announced), and what the folder looks like now."""
        self._reader.read(self._applied)   # past our own lines
        if self._known_high > self._reader.highest:
            self._log_lines([record_line(self._known_high, "N")])
            self._reader.read(self._applied)
        self._modseq_issued = max(self._reader.highest, self._applied)
        self._applied = self._modseq_issued
        self._issued_now = []
        self.index.note_modseq_meta(highestmodseq=self._modseq_issued)
        self._seen = self._seen_now()

    # -- edits ----------------------------------------------------------------------------------

    def _edit(self, view: FolderView, in_thread: bool, work: Callable[..., Edit],
              *args: Any) -> Edit:
        """Run `work` under the uid list's lock, after catching up with what other nodes
        did (so UNCHANGEDSINCE and new uids see their changes), then log what it changed."""
        self._follow(view)
        try:
            with self._lock():
                catch_up: Sync | None = None
                if not view.loaded or not self._quiet():
                    catch_up = self._shared_sync(view, full=not view.loaded)
                    if catch_up.reset and work.__name__ in ("_store", "_remove"):
                        # The uids the client named belong to another UIDVALIDITY.
                        return Edit(sync=catch_up, modseq_issued=self._modseq_issued)
                    view = _applied_view(view, catch_up)
                self._issued_now = []
                edit = work(view, *args)
                self._log_edit(edit)
                self._finish_locked()
        except BaseException:
            self._forget()
            raise
        finally:
            if in_thread:
                self.index.write_modseqs()
        if catch_up is not None and not catch_up.unchanged:
            edit.sync = catch_up
        elif edit.sync is not None and edit.sync.unchanged:
            edit.sync.stamps = self._seen or ()
        if edit.dirty:
            self._seen = None   # something moved under the edit: list the folder next time
        edit.modseq_issued = self._modseq_issued
        edit.keyword_names = self._keyword_names()
        edit.stamps = None
        return edit

    def _log_edit(self, edit: Edit) -> None:
        """The change log lines of an edit: its new values, as it handed them out."""
        issued = self._issued_now
        if not issued:
            return
        groups: dict[tuple[int, str], list[int]] = {}
        for info in edit.changed + edit.added:
            groups.setdefault((info.modseq, name_suffix(info.filename, info.basename)),
                              []).append(info.uid)
        lines = [(m, record_line(m, "F", uids, suffix)) for (m, suffix), uids in groups.items()]
        gone = edit.expunged + edit.gone
        if gone:
            top = max(issued)
            lines.append((top, record_line(top, "X", gone)))
        if not lines:
            return
        lines.sort(key=lambda pair: pair[0])
        self._log_lines([line for _, line in lines])
        self._applied = max(self._applied, lines[-1][0])


def _applied_view(view: FolderView, sync: Sync) -> FolderView:
    """`view` as it will be once the reactor applied `sync` (a copy: the reactor's dicts
    stay as they are until then)."""
    if sync.unchanged:
        return view
    infos: dict[int, MessageInfo] = {} if sync.reset else dict(view.infos)
    by_base: dict[str, int] = {} if sync.reset else dict(view.by_base)
    for uid in sync.expunged:
        info = infos.pop(uid, None)
        if info is not None and by_base.get(info.basename) == uid:
            del by_base[info.basename]
    for info in sync.renamed:
        if info.uid in infos:
            infos[info.uid] = info
    for info in sync.added:
        infos[info.uid] = info
        by_base[info.basename] = info.uid
    if sync.added and infos:
        infos = dict(sorted(infos.items()))
    return dataclasses.replace(view, loaded=True, uidvalidity=sync.uidvalidity,
                               infos=MappingProxyType(infos),
                               by_base=MappingProxyType(by_base))


# -- QRESYNC's expunge memory ------------------------------------------------------------------------

def vanished_since(folder_dir: Path, uidvalidity: int, modseq: int, present: Sequence[int],
                   within: Sequence[tuple[int, int]] | None, unchanged_below: int,
                   uidnext: int) -> list[tuple[int, int]]:
    """QRESYNC's VANISHED (EARLIER) from the change log (folder_disk.vanished_since does
    the same from a node's own index): exact from the log's floor up, else every uid
    below UIDNEXT that is not present (RFC 7162 allows naming uids that never were)."""
    try:
        floor, uids = log_vanished_since(folder_dir, uidvalidity, modseq)
    except OSError as e:
        log.warning("change log of %s unreadable (%s)", str(folder_dir), e)
        floor, uids = None, []
    return vanished_ranges(floor, uids, modseq, present, within, unchanged_below, uidnext)


def insert_modseqs(entries: list[tuple[int, int]], infos: Sequence[MessageInfo],
                   floor: int) -> None:
    """Put (modseq, uid) of `infos` into the ascending list `entries` where they belong:
    values taken from another node's log lines may be below values already in it."""
    for info in infos:
        if info.modseq > floor:
            item = (info.modseq, info.uid)
            i = bisect.bisect_left(entries, item)
            if i == len(entries) or entries[i] != item:
                entries.insert(i, item)
