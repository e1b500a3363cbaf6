"""One Maildir folder as every IMAP and POP3 session of the process sees it: the reactor side.

There is exactly one `Folder` per folder directory in the process (MailAccount hands
them out), so a change made by one session, found on disk, or delivered by SMTP reaches
every other session at once through the listeners.

A folder is split where the threads meet:

- `Folder` (here) lives in the reactor thread and owns all mutable state: the messages
  and their flags, the keywords as announced, mod-sequences, the cached lists and counts,
  the listeners (IDLE), and the scheduling of refreshes and cache writes.
- `folder_disk.FolderDisk` does the disk work (scanning, flag renames, expunge, append,
  copy; the uid list, the keyword table, the index's mod-sequence rows) and imports
  nothing from Twisted.  It never sees the Folder: each operation gets a `FolderView`
  snapshot and returns a result (`Sync`, `Edit`) that the Folder applies.  Dovecot's
  rules for the files are told there.
- `executor.FolderExecutor` runs the folder's disk jobs, SEARCH's and SORT's included,
  one at a time in the thread pool; each result is applied here before the next job
  starts, so a job's thread reads the message dicts without a copy (the invariant is
  told in executor.py).  While the executor is idle the reactor may do a small edit itself
  (a STORE on a few messages: a thread hop would cost more than the renames).

`refresh()` is cheap when nothing changed: it compares the mtimes of new/ and cur/ and the
identity of dovecot-uidlist and dovecot-keywords with the last scan, and lists the
directories only when one moved.  A directory whose mtime is less than DIRTY_WINDOW old at
scan time is scanned again next time, since a second change within the file system's
timestamp granularity would not move it.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from operator import attrgetter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Iterable, Protocol, Sequence, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.maildir.executor import INDEX, READ, FolderExecutor
from mailserver.maildir.flags import RECENT, normalize_flag
from mailserver.maildir.folder_disk import (  # noqa: F401 (re-exported: the folder's API)
    AppendFile,
    Edit,
    FolderBusy,
    FolderDisk,
    FolderError,
    FolderExists,
    FolderNotEmpty,
    FolderView,
    InvalidFlag,
    InvalidFolderName,
    MessageInfo,
    NoSuchFolder,
    Sync,
    TooManyKeywords,
    disk_stamps,
    find_base,
    vanished_since,
)
from mailserver.maildir.index import CacheValue, FolderIndex
from mailserver.maildir.keywords import KeywordLimit
from mailserver.maildir.uidlist import LockTimeout
from mailserver.maildir.uidranges import (  # noqa: F401 (re-exported for IMAP)
    NO_UID,
    has,
    intersect_ranges,
    normalize_ranges,
    uid_ranges,
)

log = Logger()

T = TypeVar("T")
_flags_of = attrgetter("flags")
_size_of = attrgetter("size")

INLINE_STORE_MAX = 8       # STOREs on at most this many messages rename in the reactor
DIRTY_WINDOW = 1.0         # seconds: a directory changed this recently is scanned again
CACHE_FLUSH_DELAY = 2.0    # seconds cached values may wait before they are written
CACHE_FLUSH_BATCH = 500    # ... or this many, whichever comes first
FLUSH_PER_WRITE = 5_000    # cached values written in one job of the folder

# Deliveries arriving within this many seconds share one refresh of an open folder.
REFRESH_COALESCE = 0.05
# A first load's index rows wait this long for the folder to have nothing else to do.
ROWS_RETRY = 0.5

__all__ = [
    "AppendWriter", "CACHE_FLUSH_BATCH", "CACHE_FLUSH_DELAY", "DIRTY_WINDOW", "Folder",
    "FolderBusy", "FolderChanges", "FolderError", "FolderExists", "FolderListener",
    "FolderNotEmpty", "FolderView", "INLINE_STORE_MAX", "InvalidFlag", "InvalidFolderName",
    "MessageInfo", "NoSuchFolder", "REFRESH_COALESCE", "TooManyKeywords",
    "intersect_ranges", "normalize_ranges", "uid_ranges",
]


# -- data -----------------------------------------------------------------------------------

@dataclass
class FolderChanges:
    """What a refresh found: new messages, vanished uids, and flag changes."""

    added: list[MessageInfo] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    flags_changed: list[MessageInfo] = field(default_factory=list)
    uidvalidity_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.expunged or self.flags_changed
                    or self.uidvalidity_changed)


class FolderListener(Protocol):
    """What sessions implement to hear about changes (all called in the reactor thread).

    A listener may also define `uidvalidity_changed(folder)`: it is then called instead of
    the other three when the folder's UIDVALIDITY changed (the session should end its
    selection); without it the listener gets every old uid expunged and every message added.
    Likewise `folder_deleted(folder)` when the folder is deleted (else: all expunged).
    """

    def messages_added(self, infos: list[MessageInfo]) -> None: ...
    def messages_expunged(self, uids: list[int]) -> None: ...
    def flags_changed(self, infos: list[MessageInfo]) -> None: ...


# -- the folder ----------------------------------------------------------------------------

class Folder:
    """One Maildir folder, shared by every session of the process.

    Call `refresh()` (and wait for it) before reading anything: the first refresh loads
    the folder.  Operations that change it load it first if need be.
    """

    def __init__(self, path: Path, name: str, escaped_host: str,
                 clock: Any = None) -> None:
        self.path = Path(path)
        self.name = name
        self._escaped_host = escaped_host
        if clock is None:
            from twisted.internet import reactor as clock  # noqa: PLC0415
        self._clock = clock
        self._executor = FolderExecutor()
        self._listeners: list[Any] = []
        self._refresh_call: Any = None
        self._settle_call: Any = None
        self._loaded = False
        # Those waiting for the first load in progress (refresh), None when none runs.
        self._load_waiters: list[Deferred[FolderChanges]] | None = None
        self._deleted = False
        self.uidvalidity = 0
        self.uidnext = 1
        # Changed only while a result is applied (see executor.py): jobs read them.
        self._infos: dict[int, MessageInfo] = {}  # uid order
        self._by_base: dict[str, int] = {}
        self._recent: set[int] = set()
        self._keyword_names: tuple[str, ...] = ()
        self._stamps: tuple[Any, ...] | None = None
        self._dirty = False
        # Thread-safe on its own: cached values are read and put here, written by jobs.
        self._index = FolderIndex(self.path)
        self._disk = FolderDisk(self.path, name, escaped_host, self._index)
        # RFC 7162: what HIGHESTMODSEQ says (the disk side hands the values out).
        self.highestmodseq = 0
        # (modseq, uid) of every change applied since the folder was loaded, ascending;
        # every message whose mod-sequence is above the floor is in it, so CHANGEDSINCE
        # a recent value is a bisection, not a pass over the folder.
        self._modseq_log: list[tuple[int, int]] = []
        self._modseq_log_floor = 0
        self._list_cache: list[MessageInfo] | None = None
        self._uid_cache: list[int] | None = None
        # uids with / without a flag, until the folder changes.
        self._uids_by_flag: dict[tuple[str, bool], list[int]] = {}
        # (unseen, first unseen uid, total size, \\Deleted count), kept across flag changes
        self._stats_cache: tuple[int, int | None, int, int] | None = None
        self._flush_call: Any = None
        self._flushing: Deferred[int] | None = None
        self._flush_again = False
        self._flush_waiters: list[Deferred[int]] = []
        self._rows_call: Any = None
        # Told this folder's path after each durable change of its own (not one a
        # refresh found): MailAccount sets it to MaildirStore.folder_changed.
        self.on_change: Callable[[Path], None] | None = None

    def __repr__(self) -> str:
        return f"<Folder {self.name!r} at {str(self.path)!r}>"

    # -- reading (reactor thread) ----------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def escaped_host(self) -> str:
        """The host part of the base names this server gives (flags.escape_hostname)."""
        return self._escaped_host

    @property
    def messages(self) -> list[MessageInfo]:
        """The messages in uid order (a shared list: do not modify it)."""
        if self._list_cache is None:
            self._list_cache = list(self._infos.values())
        return self._list_cache

    def uids(self) -> list[int]:
        return list(self._infos)

    def shared_uids(self) -> list[int]:
        """The uids in order as one list shared by every caller until the folder changes:
        a session copies it only if it must change its view (copy on write)."""
        if self._uid_cache is None:
            self._uid_cache = list(self._infos)
        return self._uid_cache

    def uids_with_flag(self, flag: str, present: bool) -> list[int]:
        """The uids (in order) that have (or lack) `flag`; kept until the folder changes,
        so a client asking UNSEEN again and again costs one pass per change (a shared
        list: do not modify it)."""
        key = (flag, present)
        found = self._uids_by_flag.get(key)
        if found is None:
            if present:
                found = [u for u, i in self._infos.items() if flag in i.flags]
            else:
                found = [u for u, i in self._infos.items() if flag not in i.flags]
            self._uids_by_flag[key] = found
        return found

    def info_map(self) -> dict[int, MessageInfo]:
        """uid -> MessageInfo, in uid order, for tight loops (a live dict: do not modify)."""
        return self._infos

    def by_uid(self, uid: int) -> MessageInfo | None:
        return self._infos.get(uid)

    # -- mod-sequences (RFC 7162) --------------------------------------------------------------

    def changed_since(self, modseq: int, uids: Sequence[int] | None = None) -> list[int]:
        """The uids (ascending) whose mod-sequence is above `modseq`, among `uids`
        (ascending) or in the whole folder: CHANGEDSINCE answered from memory, from the
        change log when it reaches back to `modseq` (a client that synchronised since
        the folder was loaded), else by a pass over the messages."""
        get = self._infos.get
        if modseq >= self._modseq_log_floor:
            log = self._modseq_log
            found = sorted({u for _, u in log[bisect.bisect_right(log, (modseq, NO_UID)):]
                            if (i := get(u)) is not None and i.modseq > modseq})
            if uids is None:
                return found
            if len(found) <= len(uids):
                return [u for u in found if has(uids, u)]
        elif uids is None:
            return [u for u, i in self._infos.items() if i.modseq > modseq]
        return [u for u in uids if (i := get(u)) is not None and i.modseq > modseq]

    def vanished_since(self, modseq: int, present: Sequence[int],
                       within: Sequence[tuple[int, int]] | None = None,
                       unchanged_below: int = 0) -> Deferred[list[tuple[int, int]]]:
        """The uids expunged since `modseq`, as ascending (first, last) ranges: QRESYNC's
        VANISHED (EARLIER) (RFC 7162 3.2.5.1, 3.2.6).

        `present` (ascending, not changed by the caller meanwhile) is the client's view:
        its uids are left out (an expunge it has not been told of yet is announced as it
        comes).  Only uids inside `within` ((first, last) ranges) when given.  From the
        expunge memory when it reaches back to `modseq`; else every uid below UIDNEXT
        that is not present, above `unchanged_below` (a uid the client's seq-match-data
        shows nothing was expunged under): RFC 7162 allows naming uids that never were.
        """
        return self._executor.run(vanished_since, self._index, modseq, present, within,
                                  unchanged_below, self.uidnext, str(self.path), kind=INDEX)

    def uidlist_fields(self, keys: str, then: Callable[..., Any] | None = None,
                       *args: Any) -> Deferred[Any]:
        """{uid: {key: value}} of the dovecot-uidlist record fields named by the one-letter
        `keys` (Dovecot's P<pop3 uidl>, O<pop3 order>) for every message that has any, as
        the list is on disk now: read in a thread, as a job of the folder's executor.

        With `then`, what fires is `then(view, *args, fields)`, run in the same job (as
        read_in_thread's functions are): one trip to the thread where two would do.
        """
        def read(disk: Any, view: FolderView) -> Any:
            fields = disk.uidlist_fields(view, keys)
            return fields if then is None else then(view, *args, fields)

        def job() -> Deferred[Any]:
            if self._deleted:
                return fail(NoSuchFolder(f"folder {self.name} was deleted"))
            d = self._executor.thread(read, self._disk, self._view())
            return d.addErrback(self._translate)
        return self._executor.submit(job, READ)

    @property
    def exists(self) -> int:
        return len(self._infos)

    def _stats(self) -> tuple[int, int | None, int, int]:
        stats = self._stats_cache
        if stats is None:
            infos = self._infos.values()
            # Counted per set of flags (messages share a few): C-level passes, not a
            # Python loop over a large folder.
            by_flags = Counter(map(_flags_of, infos))
            unseen = sum(n for flags, n in by_flags.items() if "\\Seen" not in flags)
            deleted = sum(n for flags, n in by_flags.items() if "\\Deleted" in flags)
            first = (next(i.uid for i in infos if "\\Seen" not in i.flags) if unseen
                     else None)
            stats = self._stats_cache = (unseen, first, sum(map(_size_of, infos)), deleted)
        return stats

    @property
    def unseen_count(self) -> int:
        return self._stats()[0]

    @property
    def first_unseen_uid(self) -> int | None:
        return self._stats()[1]

    def total_size(self) -> int:
        """Octets of all messages as stored."""
        return self._stats()[2]

    @property
    def deleted_count(self) -> int:
        """Messages flagged \\Deleted (STATUS DELETED, RFC 9051 6.3.11)."""
        return self._stats()[3]

    @property
    def recent_count(self) -> int:
        """Messages that are \\Recent and not yet claimed by a session."""
        return len(self._recent)

    @property
    def keywords(self) -> list[str]:
        """The keywords defined in this folder (for FLAGS / PERMANENTFLAGS)."""
        return list(self._keyword_names)

    @property
    def keyword_names(self) -> tuple[str, ...]:
        """The keywords as a tuple that is replaced, never changed, when they change, and
        only together with the messages: every keyword a message in `messages` carries is
        in it.  Sessions compare it by identity to know when to announce FLAGS again
        (RFC 3501 7.2.6)."""
        return self._keyword_names

    def _note_keywords(self, names: tuple[str, ...] | None) -> None:
        """Take the keyword table's names, as a result brought them, into `keyword_names`
        (where a change is applied, before listeners hear of it).  No table (to be read
        again after a failure or a rename) keeps the names known."""
        if names is not None and names != self._keyword_names:
            self._keyword_names = names

    @property
    def can_create_keywords(self) -> bool:
        """False once all 26 keyword letters are taken (PERMANENTFLAGS without \\*)."""
        return len(self.keywords) < 26

    def claim_recent(self, session: object) -> set[int]:
        """The \\Recent uids nobody claimed yet, now \\Recent for `session` only.

        A session calls it when it SELECTs and again when it hears of new messages;
        EXAMINE does not claim (see `peek_recent`).
        """
        claimed, self._recent = self._recent, set()
        return claimed

    def peek_recent(self) -> set[int]:
        """The \\Recent uids nobody claimed yet, left for the next read-write session: what
        a read-only session (EXAMINE) sees \\Recent (RFC 3501 2.3.2)."""
        return set(self._recent)

    def message_path(self, uid: int) -> Path:
        info = self._infos[uid]
        return self.path / info.subdir / info.filename

    def open_message(self, uid: int) -> BinaryIO:
        """Open a message file for reading (blocking; the caller streams from it).

        KeyError for an unknown uid; FileNotFoundError if the file is gone (expunged by
        another process: the next refresh reports it).  A file renamed by another process
        is found by its base name.
        """
        info = self._infos[uid]
        try:
            return open(self.path / info.subdir / info.filename, "rb")
        except FileNotFoundError:
            self._dirty = True
            found = find_base(self.path, info.basename)
            if found is None:
                raise
            return open(self.path / found[0] / found[1], "rb")

    # -- work in threads on the messages (SEARCH, SORT) -------------------------------------

    def read_in_thread(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """`fn(view, *args)` in a thread, as a job of the folder's executor: `view` (a
        FolderView) has the folder's path, index and messages (`view.by_uid`) as they are
        when the job starts.  Nothing changes them until `fn` returns, so it reads them
        without a copy; it must change nothing (a message file may still have vanished:
        another process)."""
        def job() -> Deferred[T]:
            return self._executor.thread(fn, self._view(), *args)
        return self._executor.submit(job, READ)

    # -- the index cache ---------------------------------------------------------------------

    @property
    def index(self) -> FolderIndex:
        """The folder's index file (thread-safe on its own; blocking writes)."""
        return self._index

    def cache_get(self, uid: int, key: str) -> CacheValue | None:
        """A value the IMAP layer cached for message `uid`, or None."""
        info = self._infos.get(uid)
        return None if info is None else self._index.get(info.basename, key)

    def cache_get_many(self, uids: Iterable[int], key: str) -> dict[int, CacheValue]:
        """`cache_get` for many messages at once (uids without a value are left out)."""
        get = self._infos.get
        infos = [i for u in uids if (i := get(u)) is not None]
        found = self._index.get_many([i.basename for i in infos], key)
        if not found:
            return {}
        return {i.uid: v for i in infos if (v := found.get(i.basename)) is not None}

    def cache_put(self, uid: int, key: str, value: CacheValue) -> None:
        """Remember a value computed from message `uid`; written in batches."""
        info = self._infos.get(uid)
        if info is None:
            return
        self._index.put(info.basename, key, value)
        if self._index.pending >= CACHE_FLUSH_BATCH:
            if self._flushing is None:
                self.flush_cache()
            else:
                self._flush_again = True  # written right after the write in progress
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(CACHE_FLUSH_DELAY, self.flush_cache)

    def close_idle_index(self, idle: float) -> Deferred[bool] | None:
        """Close the index connections if unused for `idle` seconds (in a thread); None
        when there is nothing to close.  The next use opens them again."""
        index = self._index
        if not index.is_open:
            if index.decoded:   # SORT's memos outlive the connections, for a while
                return self._executor.run(index.forget_decoded_if_idle, kind=INDEX)
            return None
        if index.pending or time.monotonic() - index.last_used < idle:
            return None
        return self._executor.run(index.close_if_idle, idle, kind=INDEX)

    def flush_cache(self) -> Deferred[int]:
        """Write the cached values now; fires with how many were written.

        One write at a time per folder: values cached meanwhile go with the next one, so
        a FETCH over a large folder never queues a pile of writes ahead of other work.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._flushing is not None:
            self._flush_again = True
            waiter: Deferred[int] = Deferred()
            self._flush_waiters.append(waiter)
            return waiter
        if not self._index.pending:
            return succeed(0)
        return self._start_flush([])

    def _start_flush(self, waiters: list[Deferred[int]]) -> Deferred[int]:
        # A part at a time (the sort keys of a hundred thousand messages take a second
        # to write): a command queued meanwhile runs between two parts, not after all.
        written = 0

        def part() -> Deferred[int]:
            return self._executor.run(self._index.flush, FLUSH_PER_WRITE,
                                      kind=INDEX).addCallback(next_part)

        def next_part(count: int) -> int | Deferred[int]:
            nonlocal written
            written += count
            if self._index.values_pending and not self._deleted:
                return part()
            return written

        d = self._flushing = part()

        def done(result: Any) -> Any:
            self._flushing = None
            for w in waiters:
                w.callback(result)
            if self._flush_again:
                self._flush_again = False
                later, self._flush_waiters = self._flush_waiters, []
                if self._index.pending:
                    self._start_flush(later)
                else:
                    for w in later:
                        w.callback(0)
            return result
        return d.addBoth(done)

    def _rows_soon(self, delay: float) -> None:
        """A first load's index rows (see folder_disk.FolderDisk.sync) are written a part
        at a time (index.LOADED_PER_WRITE) while the folder has nothing else to do, so
        they never hold up its commands; closing the index writes what is left."""
        if self._rows_call is None or not self._rows_call.active():
            self._rows_call = self._clock.callLater(delay, self._write_rows)

    def _write_rows(self) -> None:
        self._rows_call = None
        if self._deleted or not self._index.loaded_pending:
            return
        if not self._executor.idle:
            self._rows_soon(ROWS_RETRY)
            return
        d = self._executor.run(self._index.write_loaded, kind=INDEX)
        d.addCallbacks(lambda _: self._rows_soon(0), lambda f: log.failure(
            "index rows of {path} not written", f, path=str(self.path)))

    def _stop_rows(self) -> None:
        if self._rows_call is not None and self._rows_call.active():
            self._rows_call.cancel()
        self._rows_call = None

    def close(self) -> Deferred[None]:
        """Write pending cache values and close the index (the folder stays usable: the
        index reopens on next use)."""
        self._stop_rows()
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        self._stop_settling()
        # After a write in progress (it would open the file again behind the close).
        d = self._flushing if self._flushing is not None else succeed(None)
        waiter: Deferred[Any] = Deferred()
        d.addBoth(lambda result: waiter.callback(None) or result)
        waiter.addCallback(lambda _: self._executor.run(self._index.close))
        return waiter.addCallback(lambda _: self._stop_rows())  # one under way came back

    # -- listeners ---------------------------------------------------------------------------

    def add_listener(self, listener: Any) -> None:
        if listener not in self._listeners:
            self._listeners.append(listener)
        self._settle_soon()

    def _settle_soon(self) -> None:
        """A folder scanned while its directories were changing must be looked at again
        (see DIRTY_WINDOW): another process's change within the same timestamp tick would
        not show in the stamps.  For a folder sessions watch, that second look is done in
        the background once the window has passed (and again while changes go on); till
        then commands trust the stamps, so a busy folder (many sessions storing flags)
        is not rescanned at every command.  Another process's change hidden that way
        reaches the sessions within DIRTY_WINDOW."""
        if self._dirty and self._listeners and not self._deleted and self._settle_call is None:
            self._settle_call = self._clock.callLater(DIRTY_WINDOW + 0.1, self._settle)

    def _settle(self) -> None:
        self._settle_call = None
        self.refresh(force=True).addErrback(
            lambda f: log.failure("refresh of {path} failed", f, path=str(self.path)))

    @property
    def _settling(self) -> bool:
        """A background look is due: until then the stamps are trusted though dirty."""
        return self._settle_call is not None

    def _stop_settling(self) -> None:
        if self._settle_call is not None and self._settle_call.active():
            self._settle_call.cancel()
        self._settle_call = None

    @property
    def watched(self) -> bool:
        """Whether any session listens: only then is new mail worth a look at once."""
        return bool(self._listeners)

    def refresh_soon(self, delay: float = REFRESH_COALESCE) -> None:
        """Refresh after `delay`, once for any number of calls meanwhile: a burst of
        deliveries costs one directory scan, not one each.  A sooner call moves a later
        pending one forward."""
        call = self._refresh_call
        if call is not None and call.active():
            if call.getTime() > self._clock.seconds() + delay:
                call.reset(delay)
            return

        def run() -> None:
            self._refresh_call = None
            self.refresh().addErrback(
                lambda f: log.failure("refresh of {path} failed", f, path=str(self.path)))

        self._refresh_call = self._clock.callLater(delay, run)

    def remove_listener(self, listener: Any) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def _notify(self, origin: Any, expunged: Sequence[int] = (),
                changed: Sequence[MessageInfo] = (), added: Sequence[MessageInfo] = (),
                reset: bool = False) -> None:
        if not (expunged or changed or added or reset):
            return
        for listener in list(self._listeners):
            if listener is origin:
                continue
            try:
                if reset and hasattr(listener, "uidvalidity_changed"):
                    listener.uidvalidity_changed(self)
                    continue
                if expunged:
                    listener.messages_expunged(list(expunged))
                if changed:
                    listener.flags_changed(list(changed))
                if added:
                    listener.messages_added(list(added))
            except Exception:
                log.failure("folder listener {listener} failed", listener=listener)

    # -- running disk work ---------------------------------------------------------------------

    def _view(self) -> FolderView:
        """What a disk job starting now gets to read (see FolderView)."""
        return FolderView(self.path, self.name, self._escaped_host, self._index,
                          self._loaded, self.uidvalidity, MappingProxyType(self._infos),
                          MappingProxyType(self._by_base), self._stamps, self._dirty,
                          self._settling)

    def _can_inline(self) -> bool:
        return self._loaded and not self._deleted and self._executor.idle

    def _run(self, op: Callable[..., Edit], apply: Callable[[Edit], Any], *args: Any,
             inline: bool = False, dirty_on_failure: bool = False) -> Deferred[Any]:
        """Run the disk edit `op(view, *args)` (a FolderDisk method) in a thread as a job
        of the folder's executor, loading the folder first if need be, then `apply(result)`
        here before the next job starts.  `dirty_on_failure`: a failed `op` may have left
        the disk changed in ways only a scan finds.

        `inline` (a small edit: a few renames) runs it here at once when the folder is
        loaded and the executor idle: a thread hop would cost more than the work, and
        under many concurrent STOREs the queue would make every command of every session
        on the folder wait.
        """
        if inline and self._can_inline():
            try:
                return succeed(apply(op(self._view(), *args, in_thread=False)))
            except BaseException:
                return fail(self._translate(Failure()))

        def job() -> Deferred[Any]:
            if self._deleted:
                return fail(NoSuchFolder(f"folder {self.name} was deleted"))
            d: Deferred[Any] = succeed(None)
            if not self._loaded:
                d.addCallback(lambda _: self._executor.thread(self._disk.sync, self._view()))
                d.addCallbacks(self._apply_sync, self._sync_failed, callbackArgs=(None,))
            d.addCallback(lambda _: self._executor.thread(op, self._view(), *args))
            if dirty_on_failure:
                d.addErrback(self._sync_failed)
            d.addCallback(apply)
            d.addErrback(self._translate)
            return d
        return self._executor.submit(job)

    def _sync_failed(self, failure: Failure) -> Failure:
        """The disk may be half-changed (or changed by another process): scan next time."""
        self._dirty = True
        return failure

    def _translate(self, failure: Failure) -> Failure:
        if failure.check(KeywordLimit):
            return Failure(TooManyKeywords(str(failure.value)))
        if failure.check(LockTimeout):
            return Failure(FolderBusy(f"folder {self.name} is locked by another process"))
        if failure.check(FileNotFoundError) and not self.path.joinpath("cur").is_dir():
            return Failure(NoSuchFolder(f"folder {self.name} does not exist"))
        return failure

    def _changed(self) -> None:
        self._list_cache = None
        self._uid_cache = None
        self._uids_by_flag = {}
        self._stats_cache = None

    # -- rename and delete (MailAccount) -------------------------------------------------------

    def relocate(self, path: Path, name: str) -> Deferred[None]:
        """The folder's directory was renamed (with the folder): follow it.  Jobs that
        start from now on work in the new place; fires once the work in progress is over
        and the old index is closed."""
        old = self._index
        self.path = Path(path)
        self.name = name
        self._index = FolderIndex(self.path)
        return self._executor.run(old.close)

    def mark_deleted(self) -> Deferred[None]:
        """The folder's directory is gone (deleted through the account): tell sessions.
        Fires once the work in progress is over and the index is closed, so the caller
        may remove the files."""
        uids = list(self._infos)
        self._deleted = True
        self._stop_rows()
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        self._stop_settling()
        # New dicts, not cleared ones: a job's thread may be reading the old ones.
        self._infos = {}
        self._by_base = {}
        self._recent = set()
        self._changed()
        for listener in list(self._listeners):
            try:
                if hasattr(listener, "folder_deleted"):
                    listener.folder_deleted(self)
                elif uids:
                    listener.messages_expunged(list(uids))
            except Exception:
                log.failure("folder listener {listener} failed", listener=listener)
        return self._executor.run(self._index.close)

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> Deferred[FolderChanges]:
        """Catch up with the disk; fires with what changed (listeners hear it too).

        The common case, nothing changed, is answered here: four stat() calls on the
        folder's own files cost microseconds, less than a hop to a thread and back, and
        every IMAP command asks.  `force` rescans whatever the stamps say.
        """
        if (not force and self._loaded and (not self._dirty or self._settling)
                and not self._deleted and not self._executor.changing):
            try:
                unchanged = disk_stamps(self.path, self.name) == self._stamps
            except (NoSuchFolder, OSError):
                unchanged = False
            if unchanged:
                if not self._index.is_open and self._index.path.exists():
                    # Closed by the idle sweep: reopened in a thread before the command's
                    # cache reads, which would otherwise open the file in the reactor.
                    return self._executor.run(self._index.open_reader, kind=INDEX).addCallback(
                        lambda _: FolderChanges())
                return succeed(FolderChanges())

        if not force and not self._loaded and self._load_waiters is not None:
            # The first load is under way: it answers for those who ask meanwhile, as
            # they knew nothing before it (a login's early load, then its SELECT or POP3
            # open).  What changes while it runs, the next refresh finds; a delivery of
            # this process asks for that one itself (refresh_soon).
            waiter: Deferred[FolderChanges] = Deferred()
            self._load_waiters.append(waiter)
            return waiter

        def job() -> Deferred[FolderChanges]:
            if self._deleted:
                return fail(NoSuchFolder(f"folder {self.name} was deleted"))
            d = self._executor.thread(self._disk.sync, self._view(), force)
            d.addCallbacks(self._apply_sync, self._sync_failed, callbackArgs=(None,))
            d.addErrback(self._translate)
            return d
        d = self._executor.submit(job)
        if not self._loaded and self._load_waiters is None:
            waiters = self._load_waiters = []

            def answer(result: Any) -> Any:
                self._load_waiters = None
                for waiter in waiters:
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(result)
                return result
            d.addBoth(answer)
        return d

    def _apply_sync(self, sync: Sync, origin: Any) -> FolderChanges:
        if self._deleted:
            raise NoSuchFolder(f"folder {self.name} was deleted")
        self._stamps = sync.stamps
        # Changed within the window: a second change in the same tick would not show.
        self._dirty = bool(sync.scan_start) and (
            max(sync.stamps[0], sync.stamps[1]) / 1e9 >= sync.scan_start - DIRTY_WINDOW)
        self._settle_soon()
        if sync.unchanged:
            return FolderChanges()
        self.highestmodseq = max(self.highestmodseq, sync.modseq_issued)
        first_load = not self._loaded
        self._loaded = True
        if sync.reset:
            sync.expunged = list(self._infos)
            self._infos.clear()
            self._by_base.clear()
            self._recent.clear()
        if sync.reset or first_load:
            self._modseq_log, self._modseq_log_floor = [], self.highestmodseq
        else:
            self._log_modseqs(sync.renamed)
            self._log_modseqs(sync.added)
        for uid in sync.expunged:
            info = self._infos.pop(uid, None)
            if info is not None and self._by_base.get(info.basename) == uid:
                del self._by_base[info.basename]
            self._recent.discard(uid)
        for info in sync.renamed:
            self._infos[info.uid] = info
        self._add_infos(sync.added)
        self._note_keywords(sync.keyword_names)
        self.uidvalidity = sync.uidvalidity
        self.uidnext = sync.uidnext
        if sync.reset or sync.expunged or sync.renamed or sync.added:
            self._changed()  # a rescan that found nothing new keeps the cached lists
        changes = FolderChanges(added=list(sync.added), expunged=sorted(sync.expunged),
                                flags_changed=list(sync.flags_changed),
                                uidvalidity_changed=sync.reset and not first_load)
        if sync.index_deferred:
            self._rows_soon(CACHE_FLUSH_DELAY)
        if first_load:
            return changes
        self._notify(origin, changes.expunged, changes.flags_changed, changes.added,
                     reset=changes.uidvalidity_changed)
        return changes

    def _restat(self, changed: list[MessageInfo]) -> tuple[int, int | None, int, int] | None:
        """The cached stats (see _stats) after these flag changes (infos not applied
        yet); None to count again (or if nothing was counted)."""
        if self._stats_cache is None:
            return None
        unseen, first, total, deleted = self._stats_cache
        for info in changed:
            before = self._infos[info.uid].flags
            deleted += ("\\Deleted" in info.flags) - ("\\Deleted" in before)
            now = "\\Seen" not in info.flags
            if now == ("\\Seen" not in before):
                continue
            if now:
                unseen += 1
                if first is None or info.uid < first:
                    first = info.uid
            else:
                unseen -= 1
                if info.uid == first:
                    return None  # where the next unseen one is takes a look
        return unseen, first, total, deleted

    def _log_modseqs(self, infos: Iterable[MessageInfo]) -> None:
        """Add applied changes to the change log (values already in it are skipped: a
        rename that kept its mod-sequence); halve the log when it outgrows the folder."""
        log = self._modseq_log
        last = log[-1][0] if log else self._modseq_log_floor + 1
        for info in infos:
            if info.modseq >= last:
                log.append((info.modseq, info.uid))
                last = info.modseq
        if len(log) > 2 * max(len(self._infos), 1000):
            floor = log[len(log) // 2][0]
            self._modseq_log = log[bisect.bisect_right(log, (floor, NO_UID)):]
            self._modseq_log_floor = floor

    def _add_infos(self, infos: Iterable[MessageInfo]) -> None:
        if not self._infos and not self._by_base and isinstance(infos, list):
            # An empty folder filled (its first load: maybe a hundred thousand messages,
            # in uid order): new dicts made in one go.  No job reads the old ones now.
            self._infos = {i.uid: i for i in infos}
            self._by_base = {i.basename: i.uid for i in infos}
            self._recent.update([i.uid for i in infos if i.recent])
            return
        for info in infos:
            self._infos[info.uid] = info
            self._by_base[info.basename] = info.uid
            if info.recent:
                self._recent.add(info.uid)

    # -- flags -----------------------------------------------------------------------------------

    def store_flags(self, uids: Iterable[int], flags: Iterable[str], mode: str,
                    origin: Any = None) -> Deferred[list[MessageInfo]]:
        """Set, add or remove flags (`mode` "set" | "add" | "remove") on messages `uids`.

        Fires with the updated infos of the messages whose flags changed, in uid order.
        \\Recent is ignored; an unknown system flag or a bad keyword fails with
        InvalidFlag, a 27th keyword with TooManyKeywords (nothing is changed then).
        A message that vanished meanwhile is reported expunged to every listener.
        """
        return self._store(uids, flags, mode, origin, None).addCallback(lambda e: e.changed)

    def conditional_store(self, uids: Iterable[int], flags: Iterable[str], mode: str,
                          unchanged_since: int, origin: Any = None
                          ) -> Deferred[tuple[list[MessageInfo], list[int]]]:
        """`store_flags` for STORE (UNCHANGEDSINCE n) (RFC 7162 3.1.3): a message whose
        mod-sequence is above `unchanged_since` when the change is made (or whose file
        another process renamed meanwhile) is left alone.  Fires with (the changed infos,
        the uids left alone), both ascending."""
        return self._store(uids, flags, mode, origin, unchanged_since).addCallback(
            lambda e: (e.changed, sorted(e.conflicts)))

    def _store(self, uids: Iterable[int], flags: Iterable[str], mode: str, origin: Any,
               unchanged_since: int | None) -> Deferred[Edit]:
        try:
            wanted = frozenset(normalize_flag(f) for f in flags if f.lower() != RECENT.lower())
        except ValueError as e:
            return fail(InvalidFlag(str(e)))
        if mode not in ("set", "add", "remove"):
            return fail(ValueError(f"unknown mode {mode!r}"))
        targets = sorted(set(uids))
        small = (len(targets) <= INLINE_STORE_MAX and self._can_inline()
                 and self._disk.can_store_inline(self._view(), wanted, mode))
        return self._run(self._disk.store, lambda e: self._apply_edit(e, origin),
                         targets, wanted, mode, unchanged_since, inline=small)

    def _apply_edit(self, edit: Edit, origin: Any) -> Any:
        """Apply an edit made by `origin`; what the operation's Deferred fires with."""
        if self._deleted:
            raise NoSuchFolder(f"folder {self.name} was deleted")
        if edit.sync is not None:
            self._apply_sync(edit.sync, None)
        if edit.stamps is not None:
            self._stamps = edit.stamps
        if edit.dirty:
            self._dirty = True
        self.highestmodseq = max(self.highestmodseq, edit.modseq_issued)
        if self._index.modseqs_pending:
            # An inline edit's mod-sequences, written from a thread now (with cached values
            # waiting; one write at a time).  The name kept with each covers a crash first.
            self.flush_cache()
        gone = [u for u in edit.gone + edit.expunged if u in self._infos]
        for uid in gone:
            info = self._infos.pop(uid)
            if self._by_base.get(info.basename) == uid:
                del self._by_base[info.basename]
            self._recent.discard(uid)
        changed = edit.changed = [i for i in edit.changed if i.uid in self._infos]
        # Only flags changed (a STORE): the uid list stands and the counts move by what
        # changed, instead of a pass over a large folder at the next SELECT or STATUS.
        flags_only = not gone and not edit.added
        uid_list = self._uid_cache if flags_only else None
        stats = self._restat(changed) if flags_only else None
        for info in changed + [i for i in edit.renamed if i.uid in self._infos]:
            self._infos[info.uid] = info
        self._add_infos(edit.added)
        self._log_modseqs(changed)
        self._log_modseqs(edit.added)
        self._note_keywords(edit.keyword_names)
        if edit.uidnext is not None:
            self.uidnext = max(self.uidnext, edit.uidnext)
        self._changed()
        self._uid_cache, self._stats_cache = uid_list, stats
        removed = set(gone)   # not the list: 60,000 expunged held the reactor 13 s
        vanished = sorted(u for u in edit.gone if u in removed)
        self._notify(None, expunged=vanished)
        self._notify(origin, expunged=sorted(u for u in edit.expunged if u in removed),
                     changed=changed, added=edit.added)
        if self.on_change is not None and (changed or edit.added or edit.expunged):
            self.on_change(self.path)
        return edit

    # -- expunge ---------------------------------------------------------------------------------

    def expunge(self, uids: Iterable[int] | None = None,
                origin: Any = None) -> Deferred[list[int]]:
        """Remove the messages flagged \\Deleted (only among `uids` when given: UID
        EXPUNGE); fires with the expunged uids, ascending."""
        chosen = None if uids is None else sorted(set(uids))
        d = self._run(self._disk.remove, lambda e: self._apply_edit(e, origin), chosen, True)
        return d.addCallback(lambda e: sorted(e.expunged))

    def delete_messages(self, uids: Iterable[int], origin: Any = None) -> Deferred[list[int]]:
        """Remove exactly these messages whatever their flags (POP3 DELE + QUIT, MOVE)."""
        d = self._run(self._disk.remove, lambda e: self._apply_edit(e, origin),
                      sorted(set(uids)), False)
        return d.addCallback(lambda e: sorted(e.expunged))

    # -- append and copy -------------------------------------------------------------------------

    def begin_append(self, flags: Iterable[str] = (), internaldate: float | None = None,
                     origin: Any = None) -> AppendWriter:
        """Start storing a new message in this folder (IMAP APPEND).

        InvalidFlag at once for an unstorable flag; OSError if tmp/ refuses the file.
        """
        try:
            wanted = frozenset(normalize_flag(f) for f in flags if f.lower() != RECENT.lower())
        except ValueError as e:
            raise InvalidFlag(str(e)) from None
        if self._deleted:
            raise NoSuchFolder(f"folder {self.name} was deleted")
        return AppendWriter(self, wanted, internaldate, origin)

    def copy_to(self, uids: Iterable[int], dest: Folder,
                origin: Any = None) -> Deferred[list[tuple[int, int]]]:
        """Copy messages into `dest` with their flags (hard links where possible).

        Fires with (source uid, dest uid) pairs in source uid order; a message that
        vanished meanwhile is skipped.  `dest`'s listeners other than `origin` hear of
        the new messages.
        """
        items = [self._infos[u] for u in sorted(set(uids)) if u in self._infos]
        d = dest._run(dest._disk.copy, lambda e: dest._apply_edit(e, origin),
                      self.path, items, dirty_on_failure=True)
        return d.addCallback(lambda e: e.pairs)


class AppendWriter:
    """A message on its way into a folder: `write` as data arrives, then `commit`.

    The data streams into the folder's tmp/ (folder_disk.AppendFile).  `commit` fsyncs
    it, renames it into cur/ with its flags and ",S=<size>", sets the mtime to the
    internal date, fsyncs cur/, gives it a uid and stores the uid list, and only then
    fires with the MessageInfo: an OK sent on it is true.
    """

    def __init__(self, folder: Folder, flags: frozenset[str], internaldate: float | None,
                 origin: Any) -> None:
        self.folder = folder
        self.flags = flags
        self.internaldate = internaldate
        self.origin = origin
        self._state = "open"
        self._file = AppendFile(folder.path, folder.escaped_host, internaldate)

    @property
    def size(self) -> int:
        return self._file.size

    def write(self, data: bytes) -> None:
        """Append `data`; a disk error is kept and fails the commit."""
        if self._state != "open":
            raise RuntimeError(f"append is {self._state}")
        self._file.write(data)

    def commit(self) -> Deferred[MessageInfo]:
        """Store the message durably; fires with its MessageInfo (uid included)."""
        if self._state != "open":
            raise RuntimeError(f"append is {self._state}")
        self._state = "committing"
        folder = self.folder

        def failed(f: Failure) -> Failure:
            self._state = "failed"
            self._file.discard()
            return f

        def done(edit: Edit) -> MessageInfo:
            self._state = "committed"
            return edit.added[0]

        d = folder._run(folder._disk.append, lambda e: folder._apply_edit(e, self.origin),
                        self._file, self.flags, dirty_on_failure=True)
        return d.addCallbacks(done, failed)

    def abort(self) -> None:
        """Drop the message.  Idempotent; no effect once committing."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._file.discard()
