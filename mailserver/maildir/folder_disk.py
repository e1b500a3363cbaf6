"""The disk side of a Maildir folder: scanning, flag renames, expunge, append and copy.

Nothing here imports Twisted or sees a `Folder` (folder.py, the reactor side).  Every
operation takes a `FolderView`, the reactor's knowledge of the folder when the job started,
and returns a result (`Sync`, `Edit`) that the reactor applies; whatever the disk work
finds that the reactor must know (a folder to look at again, the mod-sequences handed
out, the keyword names) is a field of that result.  A `FolderDisk` keeps what only the
disk work needs between operations: the uid list and the keyword table as last read, the
index's rows of the first load, the mod-sequence counter.  It is used by one thread at a
time: a job of the folder's executor, or the reactor itself while the executor is idle.

Across processes (Dovecot, another instance) the folder follows Dovecot's rules:

- uids come from dovecot-uidlist, changed only under its dot-lock (see uidlist.py);
- flags are the file name's ":2,<letters>" suffix, changed by rename (see flags.py);
- a message in new/ is moved to cur/ (":2," appended) when a sync first sees it, and the
  message is then \\Recent for the first session that claims it (RFC 3501 2.3.2);
- an expunge is an unlink.

The first open of a large folder stats each file once (its mtime is the internal date);
sizes come from the ",S=" field of the name.  Both go to the folder's index (index.py),
so the next open, in this process or a new one, needs no per-message stat at all.  When
none of the messages is in the index yet, the open answers first and the rows are written
afterwards, a part at a time while the folder is otherwise idle (Folder._write_rows); rows
lost in a crash are made again by the next open, with new mod-sequences.

Mod-sequences (RFC 7162 CONDSTORE/QRESYNC) live in memory with the messages and in our own
index only; nothing Dovecot reads changes.  Every change the folder applies gets one new
value for all it touches: a flag change (ours, another session's, or a rename by another
process found by a scan), a new message, an expunge (remembered as a vanished uid).  A
value is the current time in microseconds, or the last one plus one when that is not
above it, so values only grow, also across restarts, and without a durable write per
change: whatever a crash or a deleted index loses was handed out before the restart, and
everything after it is above it.  (At one change per microsecond that floor stays ahead
of the count; a clock set back is covered while the index's highest value survives.)
A message whose file name differs from the name stored with its mod-sequence (renamed
while we were not looking, or our write was lost) gets a new value when the folder opens.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from mailserver.fsutil import fsync_directory, unlink_quietly, write_all
from mailserver.maildir.flags import (
    apply_mode,
    flags_from_letters,
    info_letters,
    is_keyword,
    letters_for,
    size_from_base,
    with_letters,
)
from mailserver.maildir.index import FolderIndex
from mailserver.maildir.keywords import KeywordLimit, Keywords
from mailserver.maildir.newfiles import FLUSH_THRESHOLD, OPEN_FLAGS, arrival_order, unique_base
from mailserver.maildir.uidlist import DotLock, FileStamp, UidList
from mailserver.maildir.uidranges import gaps, has, intersect_ranges, normalize_ranges, uid_ranges

log = logging.getLogger(__name__)

_COPY_CHUNK = 256 * 1024
# A first load that finds at least this many messages, none of them in the index, answers
# before their rows are written (see FolderDisk.sync).
DEFERRED_ROWS = 1000


# -- errors ---------------------------------------------------------------------------------

class FolderError(Exception):
    """A folder operation that cannot be done; the message is fit for a NO reply."""


class NoSuchFolder(FolderError):
    pass


class FolderExists(FolderError):
    pass


class InvalidFolderName(FolderError):
    pass


class FolderNotEmpty(FolderError):
    """The name has children and no folder of its own (RFC 3501 6.3.4)."""


class InvalidFlag(FolderError):
    """A flag that cannot be stored (\\Recent is silently ignored instead)."""


class TooManyKeywords(FolderError):
    """The folder already uses all 26 keyword letters Maildir names can carry."""


class FolderBusy(FolderError):
    """Another process held the folder's lock for too long; try again."""


# -- data -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message as stored.  Immutable: a change replaces the object.

    `recent` says the message got its uid from this process (it arrived or was moved out
    of new/ while the server ran); which session sees it \\Recent is `claim_recent`'s job.
    `modseq` is the mod-sequence of its last change (RFC 7162 3.1).
    """

    uid: int
    basename: str
    filename: str
    subdir: str
    flags: frozenset[str]
    size: int
    internaldate: float
    recent: bool = False
    modseq: int = 0


# A first load makes a hundred thousand MessageInfo at once (_all_new): made through the
# slots' own setters, not the frozen dataclass's __init__ (an object.__setattr__ by name
# per field), it takes half the time.
_INFO_FIELDS = ("uid", "basename", "filename", "subdir", "flags", "size", "internaldate",
                "recent", "modseq")
assert tuple(f.name for f in dataclass_fields(MessageInfo)) == _INFO_FIELDS
(_set_uid, _set_basename, _set_filename, _set_subdir, _set_flags, _set_size,
 _set_internaldate, _set_recent, _set_modseq) = (
    MessageInfo.__dict__[name].__set__ for name in _INFO_FIELDS)


def _new_info(uid: int, basename: str, filename: str, subdir: str, flags: frozenset[str],
              size: int, internaldate: float, recent: bool, modseq: int,
              _new: Callable[[type], Any] = object.__new__) -> MessageInfo:
    """MessageInfo(...) made faster (see above): the same object."""
    info = _new(MessageInfo)
    _set_uid(info, uid)
    _set_basename(info, basename)
    _set_filename(info, filename)
    _set_subdir(info, subdir)
    _set_flags(info, flags)
    _set_size(info, size)
    _set_internaldate(info, internaldate)
    _set_recent(info, recent)
    _set_modseq(info, modseq)
    return info


@dataclass(frozen=True, slots=True)
class FolderView:
    """The reactor's knowledge of a folder when a job starts: what disk work reads.

    `infos` (uid -> MessageInfo, in uid order) and `by_base` (base name -> uid) are
    read-only views of the reactor's own dicts, not copies: the reactor changes them only
    while it applies a result, never while a job of the folder's executor runs (see
    executor.py), so during a job they hold still.  `index` is the folder's index file,
    which has locks of its own.  `stamps`, `dirty` and `settling` say whether the last
    scan can be trusted (folder.py `refresh`).
    """

    path: Path
    name: str
    escaped_host: str
    index: FolderIndex
    loaded: bool
    uidvalidity: int
    infos: Mapping[int, MessageInfo]
    by_base: Mapping[str, int]
    stamps: tuple[Any, ...] | None
    dirty: bool
    settling: bool

    @property
    def trusts_stamps(self) -> bool:
        """Unchanged stamps mean an unchanged folder (else: scan whatever they say)."""
        return not self.dirty or self.settling

    def by_uid(self, uid: int) -> MessageInfo | None:
        return self.infos.get(uid)


@dataclass
class Sync:
    """The outcome of a scan, computed in a thread and applied in the reactor."""

    stamps: tuple[Any, ...]
    unchanged: bool = True
    uidvalidity: int = 0
    uidnext: int = 1
    expunged: list[int] = field(default_factory=list)
    renamed: list[MessageInfo] = field(default_factory=list)  # same uid, new name
    flags_changed: list[MessageInfo] = field(default_factory=list)
    added: list[MessageInfo] = field(default_factory=list)
    reset: bool = False
    scan_start: float = 0.0  # time.time() when the listing began (0: no scan)
    modseq_issued: int = 0   # the last mod-sequence handed out so far
    keyword_names: tuple[str, ...] | None = None  # the keyword table's (None: not read)
    index_deferred: bool = False  # the index rows it made wait for the folder's next flush


@dataclass
class Edit:
    """The outcome of a flag change, expunge, append or copy."""

    sync: Sync | None = None
    changed: list[MessageInfo] = field(default_factory=list)   # flags differ now
    renamed: list[MessageInfo] = field(default_factory=list)   # only the name differs
    gone: list[int] = field(default_factory=list)              # vanished meanwhile
    expunged: list[int] = field(default_factory=list)          # removed by this edit
    added: list[MessageInfo] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)         # failed UNCHANGEDSINCE
    uidnext: int | None = None
    stamps: tuple[Any, ...] | None = None  # the disk as this edit left it, if nothing else moved
    dirty: bool = False    # another process changed something: the next refresh must scan
    modseq_issued: int = 0
    keyword_names: tuple[str, ...] | None = None


# -- the disk side of one folder --------------------------------------------------------------

class FolderDisk:
    """The disk state and operations of one folder (one thread at a time, see the module)."""

    def __init__(self, path: Path, name: str, escaped_host: str, index: FolderIndex) -> None:
        self.path = Path(path)
        self.name = name
        self.escaped_host = escaped_host
        self.index = index
        self._index_generation = 0
        self._uidlist: UidList | None = None
        self._keywords: Keywords | None = None
        # Flags of an info suffix, for the current keyword table.
        self._letters_cache: dict[str, frozenset[str]] = {}
        self._meta: dict[str, str] = {}
        self._index_rows: dict[str, tuple[int, float]] = {}
        # The last mod-sequence handed out (values only grow, see the module text).
        self._modseq_issued = 0

    def _follow(self, view: FolderView) -> None:
        """Take the folder's place from the view: after a RENAME the files, the uid list
        and the keyword table are elsewhere, and so is the index."""
        if view.path is not self.path and view.path != self.path:
            self.path = view.path
            self._uidlist = None
            self._keywords = None
        self.name = view.name
        if view.index is not self.index:
            self.index = view.index
            self._index_generation = view.index.generation

    def _keyword_names(self) -> tuple[str, ...] | None:
        return None if self._keywords is None else tuple(self._keywords.names())

    # -- sync --------------------------------------------------------------------------------

    def sync(self, view: FolderView, force: bool = False) -> Sync:
        """Catch up with the disk (a thread): what changed since `view`."""
        self._follow(view)
        try:
            if view.loaded:
                sync = self._sync_core(view, lock_held=False, force=force)
            else:
                with gc_paused():  # a first load makes an object or three per message
                    sync = self._sync_core(view, lock_held=False, force=force)
        except BaseException:
            self._uidlist = None  # may be half-changed: read it again next time
            raise
        if not sync.index_deferred:
            self.index.write_modseqs()
        # else a large folder's first load: its rows are written by the flush that
        # follows (Folder._apply_sync), not before the answer; rows lost in a crash only
        # cost the next open a stat() per message and new mod-sequences (module text).
        sync.modseq_issued = self._modseq_issued
        sync.keyword_names = self._keyword_names()
        return sync

    def uidlist_fields(self, view: FolderView, keys: str) -> dict[int, dict[str, str]]:
        """{uid: {key: value}} of the uid list's record fields named by the one-letter
        `keys`, as the list is on disk now (see UidList.ext_fields)."""
        self._follow(view)
        try:
            return self._current_uidlist(view).ext_fields(keys)
        except BaseException:
            self._uidlist = None  # read it again next time
            raise

    def _scan(self) -> dict[str, tuple[str, str]]:
        return scan(self.path, self.name)

    def _current_uidlist(self, view: FolderView) -> UidList:
        """The uid list as on disk now (read again if it changed), created if missing."""
        ul = self._uidlist
        disk = FileStamp.of(self.path / "dovecot-uidlist")
        if ul is not None and disk is not None and ul.stamp == disk:
            return ul
        if ul is not None and disk is None and ul.stamp is None:
            return ul  # created by us, not written yet
        previous = view.uidvalidity or _int(self._meta.get("uidvalidity"))
        fresh = UidList.read(self.path) if disk is not None else None
        if fresh is None:
            if previous and disk is None and view.loaded:
                log.warning("%s: dovecot-uidlist vanished; new UIDVALIDITY", self.path)
            fresh = UidList.create(self.path, previous_uidvalidity=previous or None)
        elif not fresh.uidvalidity:
            meta_v = _int(self._meta.get("uidvalidity"))
            if len(fresh) and meta_v:
                fresh.uidvalidity = meta_v
                fresh.nextuid = max(fresh.nextuid, _int(self._meta.get("uidnext")) or 1)
            else:
                fresh = UidList.create(self.path, previous_uidvalidity=previous or None)
                fresh.damaged = True
        self._uidlist = fresh
        return fresh

    def _current_keywords(self) -> tuple[Keywords, bool]:
        """The keyword table, read again if the file changed; (table, was it re-read)."""
        kw = self._keywords
        if kw is not None and not kw.changed_on_disk():
            return kw, False
        self._keywords = Keywords.read(self.path)
        self._letters_cache = {}
        return self._keywords, kw is not None

    def _flags_of(self, filename: str) -> frozenset[str]:
        """Flags of a file name (cached by its info part: most messages share a few)."""
        info = filename.partition(":")[2]
        flags = self._letters_cache.get(info)
        if flags is None:
            assert self._keywords is not None
            flags = flags_from_letters(info_letters(filename), self._keywords.name_at)
            self._letters_cache[info] = flags
        return flags

    def _sync_core(self, view: FolderView, lock_held: bool, force: bool = False) -> Sync:
        stamps = disk_stamps(self.path, self.name)
        if view.loaded and not force and view.trusts_stamps and stamps == view.stamps:
            return Sync(stamps)
        if not lock_held and stamps[2] is None:
            # No uid list: this scan writes one.  Locked first, so the folder is listed
            # once (a large folder's first open), not once more under the lock.
            with DotLock(self.path / "dovecot-uidlist"):
                return self._sync_core(view, lock_held=True, force=True)
        if not view.loaded and not self._meta:
            self._meta, self._index_rows = self.index.load()
            self._index_generation = self.index.generation
        scan_start = time.time()
        listing = self._scan()
        if any(b not in listing for b in view.by_base):
            # A rename racing with readdir may hide a file: look once more before
            # calling anything expunged.
            for base, where in self._scan().items():
                listing[base] = where
        ul = self._current_uidlist(view)
        kw, kw_reread = self._current_keywords()
        reset = view.loaded and ul.uidvalidity != view.uidvalidity
        limit = 0 if reset else (next(reversed(view.infos)) if view.infos else 0)
        by_base: Mapping[str, int] = {} if reset else view.by_base
        uid_of = ul.mapping().get
        dirs = {"cur": os.path.join(self.path, "cur"), "new": os.path.join(self.path, "new")}

        def needs_uid(base: str) -> bool:
            uid = uid_of(base)
            return uid is None or (uid <= limit and by_base.get(base) != uid)

        uids = ul.mapping()
        if limit == 0:  # nothing known: a file needs a uid exactly when it has none
            unnumbered = (any(sub == "new" for sub, _ in listing.values())
                          or not listing.keys() <= uids.keys())
        else:
            unnumbered = any(sub == "new" or needs_uid(b) for b, (sub, _) in listing.items())
        need_write = (ul.stamp is None or ul.damaged or ul.version != 3 or kw.dirty
                      or unnumbered or not uids.keys() <= listing.keys())
        if need_write and not lock_held:
            with DotLock(ul.path):
                return self._sync_core(view, lock_held=True, force=True)

        # The files that get a uid now: base -> mtime in ns, the order they get it, and
        # the sizes their names do not carry; for a folder without uids yet, each file's
        # (mtime in ns, base, subdir, name) in that order instead.
        fresh_mtimes: dict[str, int] = {}
        fresh_order: list[str] = []
        fresh_sizes: dict[str, int] = {}
        all_fresh: list[tuple[int, str, str, str]] | None = None
        first_fresh_uid = ul.nextuid
        moved: set[str] = set()
        if need_write:
            moved = self._move_new(listing)
            for uid, base in list(ul.items()):
                if base not in listing:
                    ul.remove(uid)
            lookup = ul.lookup
            with _DirFds(dirs) as fds:
                if not len(ul) and not by_base:  # no uids yet: every file is new
                    all_fresh = _stat_all(listing, fds, fresh_sizes)
                    fresh_order = [entry[1] for entry in all_fresh]
                else:
                    for base, (sub, name) in listing.items():
                        if needs_uid(base):
                            old = lookup(base)
                            if old is not None:
                                ul.remove(old)
                            try:
                                st = os.stat(name, dir_fd=fds[sub])
                            except FileNotFoundError:
                                continue
                            fresh_mtimes[base] = st.st_mtime_ns
                            if ",S=" not in base:
                                fresh_sizes[base] = st.st_size
                    fresh_order = arrival_order(fresh_mtimes)
            first_fresh_uid = ul.nextuid
            ul.add_all(fresh_order)
            if len(ul) != len(listing):
                for base in [b for b in listing if uid_of(b) is None]:
                    del listing[base]  # vanished while we looked
            ul.write()
            if kw.dirty:
                kw.write()

        # Stamps taken after our own changes: anything another process did since the
        # scan started has an mtime inside the dirty window, so it is not missed.
        after = disk_stamps(self.path, self.name)
        sync = Sync(stamps=after, unchanged=False, uidvalidity=ul.uidvalidity,
                    uidnext=ul.nextuid, reset=reset, scan_start=scan_start)

        rows = self._index_rows
        new_rows: list[tuple[str, int, float]] = []
        known: Mapping[int, MessageInfo] = {} if reset else view.infos
        seen_uids: set[int] = set()
        flags_of = self._flags_of
        # RFC 7162: one new mod-sequence for whatever this scan finds changed.
        stored = self._start_modseqs(view, ul.uidvalidity, reset)
        mod_rows: list[tuple[str, int, int, str]] = []
        issued = 0
        loaded: list[MessageInfo] | None = None
        compare = listing
        if all_fresh is not None and not known and not rows and not stored:
            # Every file is new (a folder's first open, nothing in the index): the loop
            # below, with nothing to compare, in uid order.
            issued = self._issue_modseq()
            sync.added = loaded = _all_new(self.path, all_fresh, first_fresh_uid,
                                           fresh_sizes, flags_of, issued)
            compare = {}
        elif all_fresh is not None:
            fresh_mtimes = {base: ns for ns, base, _, _ in all_fresh}
        by_uid: Iterable[tuple[int, str]] = ()
        if not known:
            # Nothing in memory to compare with (a folder's open after a restart): the
            # uid list gives every message, in uid order.
            if compare:
                by_uid = ul.items()
        else:
            unknown: list[tuple[int, str]] = []
            for base, (sub, name) in compare.items():
                uid = uid_of(base)
                assert uid is not None
                seen_uids.add(uid)
                old = known.get(uid)
                if old is None or old.basename != base:
                    unknown.append((uid, base))
                elif old.filename != name or old.subdir != sub or kw_reread:
                    flags = flags_of(name)
                    modseq = old.modseq
                    if flags != old.flags:
                        modseq = issued = issued or self._issue_modseq()
                    info = MessageInfo(uid, base, name, sub, flags, old.size,
                                       old.internaldate, old.recent, modseq)
                    sync.renamed.append(info)
                    mod_rows.append((base, uid, modseq, name))
                    if flags != old.flags:
                        sync.flags_changed.append(info)
            by_uid = sorted(unknown)
        added, issued = _restored(self.path, compare, by_uid, rows, stored, fresh_mtimes,
                                  fresh_sizes, moved, flags_of, new_rows, mod_rows,
                                  self._issue_modseq, issued)
        sync.added += added
        sync.added.sort(key=_by_uid)
        sync.expunged = [uid for uid in known if uid not in seen_uids
                         or known[uid].basename != ul.name(uid)]

        gone_bases = [known[u].basename for u in sync.expunged]
        vanished = [(known[u].basename, u) for u in sync.expunged]
        if not view.loaded:
            gone_bases = [b for b in rows if b not in listing]
            self._index_rows = {}
            # Expunged while the folder was closed (another process, or before a restart).
            vanished = [(b, had[0]) for b, had in stored.items()
                        if b not in listing or uid_of(b) != had[0]]
        if self.index.generation != self._index_generation:
            new_rows = [(i.basename, i.size, i.internaldate) for i in view.infos.values()
                        if i.uid not in sync.expunged] + new_rows
            self._index_generation = self.index.generation
            if view.loaded and not reset:
                # The file was rebuilt empty: what memory holds goes back, but the
                # expunges it remembered are lost.
                self._forget_vanished(ul.uidvalidity)
                self.index.note_modseqs((i.basename, i.uid, i.modseq, i.filename)
                                        for i in view.infos.values())
        if (loaded is None and not view.loaded and not rows and not stored
                and len(new_rows) == len(mod_rows) == len(sync.added) >= DEFERRED_ROWS):
            # The index knew none of them (made anew): their rows, as for a first load.
            loaded, new_rows, mod_rows = sync.added, [], []
        if vanished and not reset:
            self.index.note_expunged(vanished, issued or self._issue_modseq())
        self.index.note_modseqs(mod_rows)
        self.index.note_modseq_meta(highestmodseq=self._modseq_issued,
                                    modseq_uidvalidity=ul.uidvalidity)
        self.index.drop(gone_bases)
        if loaded is not None and len(loaded) >= DEFERRED_ROWS:
            self.index.note_loaded(loaded)
            sync.index_deferred = True
        elif loaded is not None:
            self.index.put_messages((i.basename, i.size, i.internaldate) for i in loaded)
            self.index.note_modseqs((i.basename, i.uid, i.modseq, i.filename) for i in loaded)
        else:
            self.index.put_messages(new_rows)
        self.index.set_meta({"uidvalidity": ul.uidvalidity, "uidnext": ul.nextuid})
        self._meta = {"uidvalidity": str(ul.uidvalidity), "uidnext": str(ul.nextuid)}
        return sync

    def _locked_sync(self, view: FolderView) -> Sync:
        """A sync while the uid list lock is held, so our own uids come after every uid
        another process gave out."""
        try:
            return self._sync_core(view, lock_held=True)
        except BaseException:
            self._uidlist = None
            raise

    def _move_new(self, listing: dict[str, tuple[str, str]]) -> set[str]:
        """Move every file of new/ to cur/ (adding ":2,"); the base names we moved."""
        moved: set[str] = set()
        lost = False
        for base, name in [(b, n) for b, (sub, n) in listing.items() if sub == "new"]:
            dest = name if ":" in name else name + ":2,"
            try:
                os.rename(self.path / "new" / name, self.path / "cur" / dest)
            except FileNotFoundError:
                lost = True  # moved or expunged by someone else: look again below
                del listing[base]
                continue
            except OSError as e:
                log.warning("cannot move %s to cur/: %s", name, e)
                continue
            listing[base] = ("cur", dest)
            moved.add(base)
        if lost:
            for base, where in self._scan().items():
                listing.setdefault(base, where)
        return moved

    # -- mod-sequences -------------------------------------------------------------------------

    def _issue_modseq(self) -> int:
        """A new mod-sequence, above every one handed out before (see the module text)."""
        value = max(self._modseq_issued + 1, time.time_ns() // 1000)
        self._modseq_issued = value
        return value

    def _start_modseqs(self, view: FolderView, uidvalidity: int,
                       reset: bool) -> dict[str, tuple[int, int, str]]:
        """For a scan: the index's rows (base -> (uid, modseq, name)) when the folder is
        being loaded and they can be trusted, else {}.  A first load without trusted rows
        (a new or rebuilt index, or another UIDVALIDITY), and a UIDVALIDITY change, start
        the mod-sequence memory afresh."""
        if view.loaded and not reset:
            return {}
        stored: dict[str, tuple[int, int, str]] = {}
        if not view.loaded:
            meta, stored = self.index.load_modseqs()
            self._modseq_issued = max(self._modseq_issued, meta.get("highestmodseq", 0),
                                      max((r[1] for r in stored.values()), default=0))
            if (meta.get("modseq_uidvalidity") == uidvalidity
                    and meta.get("vanished_after") is not None):
                return stored
        self._forget_vanished(uidvalidity)
        return {}

    def _forget_vanished(self, uidvalidity: int) -> None:
        """Start the expunge memory now: a client whose mod-sequence is older is told every
        uid that does not exist (VANISHED (EARLIER) may name uids that never were)."""
        self.index.note_modseq_reset()
        self.index.note_modseq_meta(vanished_after=self._issue_modseq(),
                                    modseq_uidvalidity=uidvalidity)

    # -- edits ------------------------------------------------------------------------------------

    def _edit(self, view: FolderView, in_thread: bool, work: Callable[..., Edit],
              *args: Any) -> Edit:
        """Run `work` and, when the disk matched `view` before it, note the stamps it
        leaves, so our own renames and uidlist writes do not make the next refresh rescan
        the whole folder (a flag change costs a rename, not a directory listing).  A change
        to new/ meanwhile (another delivery) is left for the refresh to find.  In a thread
        the mod-sequences it made are written before it is applied; inline, the reactor
        has them written (with the cached values) afterwards."""
        self._follow(view)
        try:
            try:
                before = disk_stamps(self.path, self.name) if view.loaded else None
            except NoSuchFolder:
                before = None
            edit = work(view, *args)
            if (before is not None and before == view.stamps and edit.sync is None
                    and (not (view.dirty or edit.dirty) or view.settling)):
                after = disk_stamps(self.path, self.name)
                if after[0] == before[0]:
                    edit.stamps = after
            edit.modseq_issued = self._modseq_issued
            edit.keyword_names = self._keyword_names()
            return edit
        finally:
            if in_thread:
                self.index.write_modseqs()

    # -- flags -----------------------------------------------------------------------------------

    def can_store_inline(self, view: FolderView, flags: frozenset[str], mode: str) -> bool:
        """Whether a STORE of `flags` needs nothing but renames: the keyword table is
        read, unchanged on disk, and has every keyword it sets (one stat)."""
        self._follow(view)
        kw = self._keywords
        return (kw is not None and not kw.changed_on_disk()
                and (mode == "remove" or all(kw.has(f) for f in flags if is_keyword(f))))

    def store(self, view: FolderView, uids: list[int], flags: frozenset[str], mode: str,
              unchanged_since: int | None = None, *, in_thread: bool = True) -> Edit:
        """Set, add or remove (`mode`) `flags` on messages `uids` by renaming their files;
        `unchanged_since`: RFC 7162 3.1.3's UNCHANGEDSINCE."""
        return self._edit(view, in_thread, self._store, uids, flags, mode, unchanged_since)

    def _canonical(self, kw: Keywords, flags: frozenset[str]) -> frozenset[str]:
        return frozenset(kw.canonical(f) if is_keyword(f) else f for f in flags)

    def _store(self, view: FolderView, uids: list[int], flags: frozenset[str], mode: str,
               unchanged_since: int | None) -> Edit:
        kw, _ = self._current_keywords()
        flags = self._canonical(kw, flags)
        plans = []
        edit = Edit()
        infos = view.infos
        for uid in uids:
            info = infos.get(uid)
            if info is None:
                continue
            if unchanged_since is not None and info.modseq > unchanged_since:
                edit.conflicts.append(uid)  # RFC 7162 3.1.3: changed since; not touched
                continue
            new = apply_mode(info.flags, flags, mode)
            if new != info.flags or info.subdir != "cur":
                plans.append(info)
        if not plans:
            return edit
        if mode != "remove" and any(is_keyword(f) and not kw.has(f) for f in flags):
            self._define_keywords(flags)
            kw = self._keywords  # type: ignore[assignment]
        found: dict[str, tuple[str, str]] | None = None
        modseq = 0  # one new mod-sequence for every message this STORE changes
        for info in plans:
            sub, name = info.subdir, info.filename
            current = info.flags
            for _attempt in (1, 2):
                new = apply_mode(current, flags, mode)
                dest = with_letters(name, letters_for(new, kw.letter))
                try:
                    if (sub, name) != ("cur", dest):
                        os.rename(self.path / sub / name, self.path / "cur" / dest)
                except FileNotFoundError:
                    if found is None:
                        found = self._scan()
                    where = found.get(info.basename)
                    if where is None or where == (sub, name):
                        edit.gone.append(info.uid)
                        break
                    if unchanged_since is not None:
                        # Renamed by another process: changed since, whatever the flags.
                        edit.conflicts.append(info.uid)
                        edit.dirty = True
                        break
                    sub, name = where
                    current = self._flags_of(name)
                    continue
                now = self._flags_of(dest)
                if now != info.flags:
                    modseq = modseq or self._issue_modseq()
                    edit.changed.append(MessageInfo(info.uid, info.basename, dest, "cur", now,
                                                    info.size, info.internaldate,
                                                    info.recent, modseq))
                else:
                    edit.renamed.append(MessageInfo(info.uid, info.basename, dest, "cur", now,
                                                    info.size, info.internaldate,
                                                    info.recent, info.modseq))
                break
            else:
                edit.gone.append(info.uid)
        try:
            fsync_directory(self.path / "cur")
        except OSError as e:
            log.warning("fsync of %s failed: %s", self.path, e)
        if edit.gone:
            self.index.note_expunged(((infos[u].basename, u) for u in edit.gone),
                                     modseq or self._issue_modseq())
        self.index.note_modseqs((i.basename, i.uid, i.modseq, i.filename)
                                for i in edit.changed + edit.renamed)
        return edit

    def _define_keywords(self, flags: Iterable[str]) -> None:
        """Give letters to the new keywords among `flags` and store them (all or none)."""
        with DotLock(self.path / "dovecot-uidlist"):
            self._keywords = None
            kw, _ = self._current_keywords()
            try:
                for f in sorted(flags):
                    if is_keyword(f):
                        kw.letter(f)
            except KeywordLimit:
                self._keywords = None  # forget the half-done allocation
                self._current_keywords()
                raise
            if kw.dirty:
                kw.write()

    # -- expunge -----------------------------------------------------------------------------------

    def remove(self, view: FolderView, uids: list[int] | None, only_deleted: bool, *,
               in_thread: bool = True) -> Edit:
        """Unlink messages `uids` (all when None; only those flagged \\Deleted when
        `only_deleted`) and drop them from the uid list."""
        return self._edit(view, in_thread, self._remove, uids, only_deleted)

    def _remove(self, view: FolderView, uids: list[int] | None, only_deleted: bool) -> Edit:
        infos = view.infos
        chosen = infos.values() if uids is None else (infos[u] for u in uids if u in infos)
        targets = [i for i in chosen if not only_deleted or "\\Deleted" in i.flags]
        edit = Edit()
        found: dict[str, tuple[str, str]] | None = None
        removed: list[MessageInfo] = []
        for info in targets:
            try:
                os.unlink(self.path / info.subdir / info.filename)
            except FileNotFoundError:
                if found is None:
                    found = self._scan()
                where = found.get(info.basename)
                if where is not None and where != (info.subdir, info.filename):
                    if only_deleted and "T" not in info_letters(where[1]):
                        edit.dirty = True  # undeleted meanwhile: a refresh will show it
                        continue
                    try:
                        os.unlink(self.path / where[0] / where[1])
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        log.error("cannot expunge %s: %s", where[1], e)
                        continue
            except OSError as e:
                log.error("cannot expunge %s: %s", info.filename, e)
                continue
            removed.append(info)
        if not removed:
            return edit
        edit.expunged = [i.uid for i in removed]
        try:
            fsync_directory(self.path / "cur")
        except OSError as e:
            log.warning("fsync of %s failed: %s", self.path, e)
        try:
            with DotLock(self.path / "dovecot-uidlist"):
                ul = self._current_uidlist(view)
                if ul.uidvalidity == view.uidvalidity:
                    for info in removed:
                        if ul.name(info.uid) == info.basename:
                            ul.remove(info.uid)
                    ul.write()
        except OSError as e:
            # The files are gone whatever happens here; the next sync drops the records.
            self._uidlist = None
            log.error("cannot update %s: %s", self.path, e)
        self.index.note_expunged(((i.basename, i.uid) for i in removed), self._issue_modseq())
        self.index.drop(i.basename for i in removed)
        return edit

    # -- append and copy -------------------------------------------------------------------------

    def append(self, view: FolderView, file: AppendFile, flags: frozenset[str], *,
               in_thread: bool = True) -> Edit:
        """Make `file` durable and give it a place in cur/ with `flags` and a uid."""
        return self._edit(view, in_thread, self._append, file, flags)

    def _append(self, view: FolderView, file: AppendFile, flags: frozenset[str]) -> Edit:
        tmp, base, size = file.finish()
        full_base = f"{base},S={size}"
        if file.crlf_size != size:   # bare LFs: the size IMAP and POP3 send differs
            full_base += f",W={file.crlf_size}"
        try:
            mtime = os.stat(tmp).st_mtime
            with DotLock(self.path / "dovecot-uidlist"):
                edit = Edit(sync=self._locked_sync(view))
                ul = self._current_uidlist(view)
                kw, _ = self._current_keywords()
                flags = self._canonical(kw, flags)
                letters = letters_for(flags, kw.letter)
                if kw.dirty:
                    kw.write()
                name = f"{full_base}:2,{letters}"
                os.rename(tmp, self.path / "cur" / name)
                placed = self.path / "cur" / name
                try:
                    fsync_directory(self.path / "cur")
                    uid = ul.add(full_base)
                    ul.write()
                except BaseException:
                    # The client is told NO: the message must not turn up anyway (a
                    # retry would store it twice).  Under the lock, so no other process
                    # gives it a uid meanwhile.
                    unlink_quietly(placed)
                    raise
        except BaseException:
            self._keywords = None
            self._uidlist = None
            unlink_quietly(tmp)
            raise
        self.index.put_messages([(full_base, size, mtime)])
        modseq = self._issue_modseq()
        self.index.note_modseqs([(full_base, uid, modseq, name)])
        edit.added = [MessageInfo(uid, full_base, name, "cur", self._flags_of(name), size,
                                  mtime, True, modseq)]
        edit.uidnext = ul.nextuid
        return edit

    def copy(self, view: FolderView, src_dir: Path, items: list[MessageInfo], *,
             in_thread: bool = True) -> Edit:
        """Copy the messages `items` of the folder at `src_dir` in, with their flags (hard
        links where possible); `pairs` says which uid each got."""
        return self._edit(view, in_thread, self._copy, src_dir, items)

    def _copy(self, view: FolderView, src_dir: Path, items: list[MessageInfo]) -> Edit:
        placed: list[tuple[int, str, str, int, float]] = []
        created: list[Path] = []
        try:
            with DotLock(self.path / "dovecot-uidlist"):
                edit = Edit(sync=self._locked_sync(view))
                ul = self._current_uidlist(view)
                kw, _ = self._current_keywords()
                wanted = [self._canonical(kw, i.flags) for i in items]
                dropped: set[str] = set()
                letters = [letters_for(f, _letter_or_none(kw, dropped)) for f in wanted]
                if dropped:
                    # As Dovecot: the messages are copied, without the keywords this
                    # folder has no letter left for (a full table must not keep mail
                    # from being filed).
                    log.warning("copy into %s: keywords %s left out (the folder has no "
                                "keyword letter left)", self.name, ", ".join(sorted(dropped)))
                if kw.dirty:
                    kw.write()
                found: dict[str, tuple[str, str]] | None = None
                for info, info_letters_ in zip(items, letters):
                    src = src_dir / info.subdir / info.filename
                    if not src.exists():
                        if found is None:
                            found = scan(src_dir)
                        where = found.get(info.basename)
                        if where is None:
                            continue
                        src = src_dir / where[0] / where[1]
                    new_base = unique_base(self.escaped_host) + _base_fields(info)
                    name = f"{new_base}:2,{info_letters_}"
                    target = self.path / "cur" / name
                    try:
                        self._link_or_copy(src, target, info.internaldate)
                    except FileNotFoundError:
                        continue
                    created.append(target)
                    placed.append((info.uid, new_base, name, info.size, info.internaldate))
                if placed:
                    fsync_directory(self.path / "cur")
                    modseq = self._issue_modseq()
                    for src_uid, new_base, name, size, date in placed:
                        uid = ul.add(new_base)
                        edit.pairs.append((src_uid, uid))
                        edit.added.append(MessageInfo(uid, new_base, name, "cur",
                                                      self._flags_of(name), size, date, True,
                                                      modseq))
                    ul.write()
                    edit.uidnext = ul.nextuid
        except BaseException:
            self._keywords = None
            self._uidlist = None
            for path in created:
                unlink_quietly(path)
            raise
        self.index.put_messages((i.basename, i.size, i.internaldate) for i in edit.added)
        self.index.note_modseqs((i.basename, i.uid, i.modseq, i.filename) for i in edit.added)
        return edit

    def _link_or_copy(self, src: Path, target: Path, mtime: float) -> None:
        try:
            os.link(src, target)
            return
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise
        tmp = self.path / "tmp" / target.name.partition(":")[0]
        fd = os.open(tmp, OPEN_FLAGS, 0o600)
        try:
            try:
                with open(src, "rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(tmp, (mtime, mtime))
            os.rename(tmp, target)
        except BaseException:
            unlink_quietly(tmp)
            raise


class AppendFile:
    """The file of a message on its way into a folder (IMAP APPEND): created in the
    folder's tmp/ at once, written as data arrives (at most FLUSH_THRESHOLD bytes held in
    memory; a disk error is kept for `finish`), made durable by `finish` in a thread.

    The bytes are kept as the client sent them.  A message with bare LFs gets its CRLF
    size as ",W=" in its name, as Dovecot does: IMAP and POP3 send the CRLF form, and
    take ",S=" alone for that size in the names this server gives."""

    def __init__(self, folder_dir: Path, escaped_host: str,
                 internaldate: float | None) -> None:
        self.internaldate = internaldate
        self._buffer = bytearray()
        self._size = 0
        self._newlines = 0       # LF octets, and those with a CR before them
        self._crlf = 0
        self._last_cr = False
        self._error: OSError | None = None
        last: OSError | None = None
        for _ in range(5):
            self.base = unique_base(escaped_host)
            self.tmp = folder_dir / "tmp" / self.base
            try:
                self._fd = os.open(self.tmp, OPEN_FLAGS, 0o600)
                return
            except FileExistsError as e:
                last = e
        assert last is not None
        raise last

    @property
    def size(self) -> int:
        return self._size

    @property
    def crlf_size(self) -> int:
        """The size of the message with every bare LF sent as CRLF."""
        return self._size + self._newlines - self._crlf

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if data:
            self._newlines += data.count(b"\n")
            self._crlf += data.count(b"\r\n") + (self._last_cr and data[:1] == b"\n")
            self._last_cr = data[-1:] == b"\r"
        if self._error is not None:
            return
        self._buffer += data
        if len(self._buffer) >= FLUSH_THRESHOLD:
            try:
                write_all(self._fd, bytes(self._buffer))
            except OSError as e:
                log.error("writing %s failed: %s", self.tmp, e)
                self._error = e
            self._buffer = bytearray()

    def finish(self) -> tuple[Path, str, int]:
        """Flush, fsync, close, set the internal date: (tmp path, base name, size)."""
        try:
            if self._error is not None:
                raise self._error
            write_all(self._fd, bytes(self._buffer))
            self._buffer = bytearray()
            os.fsync(self._fd)
        finally:
            self.close()
        if self.internaldate is not None:
            os.utime(self.tmp, (self.internaldate, self.internaldate))
        return self.tmp, self.base, self._size

    def discard(self) -> None:
        """Drop the file (idempotent)."""
        self._buffer = bytearray()
        self.close()
        unlink_quietly(self.tmp)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


# -- helpers -----------------------------------------------------------------------------------

_by_uid = attrgetter("uid")


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while long-lived objects are made by the
    hundred thousand (a large folder's first load), then run once over everything: its
    collections would otherwise walk the growing pile again and again (and, left to
    after the pause, walk it once per generation), for nothing: they are all kept."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.collect(1)  # the young generations (what was made): not the whole heap
            gc.enable()


class _DirFds:
    """Descriptors of a folder's directories (subdir -> fd), for stat() by name relative
    to them: no path to build and walk per file (a first open stats every file)."""

    def __init__(self, dirs: Mapping[str, str]) -> None:
        self._dirs = dirs
        self._fds: dict[str, int] = {}

    def __enter__(self) -> dict[str, int]:
        try:
            for subdir, path in self._dirs.items():
                self._fds[subdir] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            self.__exit__()
            raise
        return self._fds

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _stat_all(listing: Mapping[str, tuple[str, str]], fds: Mapping[str, int],
              sizes: dict[str, int]) -> list[tuple[int, str, str, str]]:
    """(mtime in ns, base, subdir, file name) of each file of `listing`, in the order new
    files get uids (see newfiles.arrival_order); sizes[base] = its size when the name
    carries none (",S=").  A file that vanished meanwhile is left out.  Only numbers are
    kept of the stat results, and the result is walked in order: a first open goes
    through a hundred thousand of them."""
    stat = os.stat
    entries: list[tuple[int, str, str, str]] | None = None
    if not any(",S=" not in base for base in listing):
        # A file that vanished meanwhile ends the quick pass: the loop below skips it.
        with contextlib.suppress(FileNotFoundError):
            entries = [(stat(name, dir_fd=fds[sub]).st_mtime_ns, base, sub, name)
                       for base, (sub, name) in listing.items()]
    if entries is None:
        entries = []
        for base, (sub, name) in listing.items():
            try:
                st = stat(name, dir_fd=fds[sub])
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, base, sub, name))
            if ",S=" not in base:
                sizes[base] = st.st_size
    entries.sort(key=itemgetter(0))  # by the numbers alone: several times faster
    # Files of one mtime: in arrival order, not by name (see newfiles.arrival_key).
    ties = [k for k in range(1, len(entries)) if entries[k][0] == entries[k - 1][0]]
    if ties:
        by_base = {entry[1]: entry for entry in entries}
        order = arrival_order({entry[1]: entry[0] for entry in entries})
        entries = [by_base[base] for base in order]
    return entries


def _letter_or_none(kw: Keywords, dropped: set[str]) -> Callable[[str], str]:
    """kw.letter, but "" (no letter) for a keyword the table has no room for, whose
    name goes into `dropped`."""
    def letter(name: str) -> str:
        try:
            return kw.letter(name)
        except KeywordLimit:
            dropped.add(name)
            return ""
    return letter


def mtime_seconds(ns: int) -> float:
    """A modification time in ns as the float os.stat gives (st_mtime), to the last bit."""
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec + nsec * 1e-9


def _all_new(folder: Path, entries: list[tuple[int, str, str, str]], first_uid: int,
             sizes: Mapping[str, int], flags_of: Callable[[str], frozenset[str]],
             modseq: int) -> list[MessageInfo]:
    """The messages of a scan where every file (`entries`: (mtime in ns, base, subdir,
    name), by uid from `first_uid` up) got its uid just now, and is \\Recent."""
    added = []
    append = added.append
    for uid, (ns, base, sub, name) in enumerate(entries, first_uid):
        size = size_from_base(base)
        if size is None:
            size = sizes.get(base)
            if size is None:  # ",S=" without a number: the file says
                try:
                    size = os.stat(folder / sub / name).st_size
                except FileNotFoundError:
                    size = 0  # gone: the next scan reports it expunged
        sec, nsec = divmod(ns, 1_000_000_000)
        append(_new_info(uid, base, name, sub, flags_of(name), size, sec + nsec * 1e-9,
                         True, modseq))
    return added


def _restored(folder: Path, listing: Mapping[str, tuple[str, str]],
              by_uid: Iterable[tuple[int, str]], rows: Mapping[str, tuple[int, float]],
              stored: Mapping[str, tuple[int, int, str]], fresh_mtimes: Mapping[str, int],
              fresh_sizes: Mapping[str, int], moved: set[str],
              flags_of: Callable[[str], frozenset[str]],
              new_rows: list[tuple[str, int, float]], mod_rows: list[tuple[str, int, int, str]],
              issue_modseq: Callable[[], int], issued: int = 0
              ) -> tuple[list[MessageInfo], int]:
    """The messages of `listing` that memory does not know (`by_uid`: their (uid, base
    name) in uid order, the order they are returned in): size and date from the index's
    row, else from the name and the file (and a row for the index in `new_rows`); the
    mod-sequence the index has for the same uid and name, else the one this scan issued
    (`issued`, or a new one when 0; its row in `mod_rows`), returned with them."""
    added: list[MessageInfo] = []
    append = added.append
    row_of, had_of, fresh_of, listed = rows.get, stored.get, fresh_mtimes.get, listing.get
    for uid, base in by_uid:
        where = listed(base)
        if where is None:
            continue
        sub, name = where
        row = row_of(base)
        mtime_ns = fresh_of(base)
        recent = mtime_ns is not None or base in moved
        if row is not None and mtime_ns is None:
            size, date = row
        else:
            size = size_from_base(base)
            if mtime_ns is not None and size is None:
                size = fresh_sizes.get(base)
            if mtime_ns is None or size is None:
                try:
                    st = os.stat(os.path.join(folder, sub, name))
                except FileNotFoundError:
                    continue  # vanished
                mtime_ns = st.st_mtime_ns
                if size is None:
                    size = st.st_size
            date = mtime_seconds(mtime_ns)
            new_rows.append((base, size, date))
        had = had_of(base)
        if had is not None and had[0] == uid and had[2] == name:
            modseq = had[1]  # as the index knows it: unchanged since
        else:
            modseq = issued = issued or issue_modseq()
            mod_rows.append((base, uid, modseq, name))
        append(_new_info(uid, base, name, sub, flags_of(name), size, date, recent, modseq))
    return added, issued


def disk_stamps(path: Path, name: str) -> tuple[Any, ...]:
    """What says a folder changed: the mtimes of new/ and cur/ and the identities of
    dovecot-uidlist and dovecot-keywords (four stat() calls, cheap enough for the reactor).
    NoSuchFolder (named `name`) if the folder is gone."""
    try:
        new = os.stat(path / "new").st_mtime_ns
        cur = os.stat(path / "cur").st_mtime_ns
    except FileNotFoundError:
        raise NoSuchFolder(f"folder {name} does not exist") from None
    return (new, cur, FileStamp.of(path / "dovecot-uidlist"),
            FileStamp.of(path / "dovecot-keywords"))


def scan(folder_dir: Path, name: str | None = None) -> dict[str, tuple[str, str]]:
    """base name -> (subdir, file name) of every message file of a folder directory.

    new/ is listed before cur/, so a file moving from one to the other meanwhile is seen
    at least once; cur/ wins when both have it.  A missing directory raises NoSuchFolder
    (named `name`), or counts as empty when `name` is None (another folder's directory).
    """
    listing: dict[str, tuple[str, str]] = {}
    for subdir in ("new", "cur"):
        try:
            names = os.listdir(folder_dir / subdir)
        except FileNotFoundError:
            if name is None:
                continue
            raise NoSuchFolder(f"folder {name} does not exist") from None
        listing.update({entry.partition(":")[0]: (subdir, entry) for entry in names
                        if entry[0] != "." and "\n" not in entry and "\r" not in entry})
    return listing


def find_base(folder_dir: Path, base: str) -> tuple[str, str] | None:
    """(subdir, file name) of the message with base name `base`, if it is there."""
    return scan(folder_dir).get(base)


def vanished_since(index: FolderIndex, modseq: int, present: Sequence[int],
                   within: Sequence[tuple[int, int]] | None, unchanged_below: int,
                   uidnext: int, where: str) -> list[tuple[int, int]]:
    """QRESYNC's VANISHED (EARLIER) from the index's expunge memory (see
    Folder.vanished_since, whose work this is, in a thread)."""
    try:
        after, uids = index.vanished_since(modseq)
    except sqlite3.Error as e:
        log.warning("expunge memory of %s unreadable (%s)", where, e)
        after, uids = None, []
    return vanished_ranges(after, uids, modseq, present, within, unchanged_below, uidnext)


def vanished_ranges(after: int | None, uids: Sequence[int], modseq: int,
                    present: Sequence[int], within: Sequence[tuple[int, int]] | None,
                    unchanged_below: int, uidnext: int) -> list[tuple[int, int]]:
    """VANISHED (EARLIER) from a record of expunged uids exact from mod-sequence `after`
    on (None: no record): those not present when `modseq` is within it, else every uid
    below UIDNEXT that is not present (RFC 7162 allows naming uids that never were)."""
    if after is not None and modseq >= after:
        ranges = uid_ranges(u for u in uids if u < uidnext and not has(present, u))
    else:
        ranges = gaps(present, unchanged_below + 1, uidnext - 1)
    if within is not None:
        ranges = intersect_ranges(ranges, normalize_ranges(within))
    return ranges


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _base_fields(info: MessageInfo) -> str:
    """The ",S=..." (and ",W=...") fields a copy's new base name keeps."""
    fields = [f for f in info.basename.split(",")[1:] if f[:2] in ("S=", "W=")]
    if not any(f.startswith("S=") for f in fields):
        fields.insert(0, f"S={info.size}")
    return "".join("," + f for f in fields)
