"""One Maildir folder as every IMAP and POP3 session of the process sees it.

There is exactly one `Folder` per folder directory in the process (MailAccount hands
them out), so a change made by one session, found on disk, or delivered by SMTP reaches
every other session at once through the listeners.

The state lives in the reactor thread; disk work runs in the thread pool, one operation
at a time per folder (a DeferredLock), and its result is applied back in the reactor.
Across processes (Dovecot, another instance) the folder follows Dovecot's rules:

- uids come from dovecot-uidlist, changed only under its dot-lock (see uidlist.py);
- flags are the file name's ":2,<letters>" suffix, changed by rename (see flags.py);
- a message in new/ is moved to cur/ (":2," appended) when a sync first sees it, and the
  message is then \\Recent for the first session that claims it (RFC 3501 2.3.2);
- an expunge is an unlink.

`refresh()` is cheap when nothing changed: it compares the mtimes of new/ and cur/ and the
identity of dovecot-uidlist and dovecot-keywords with the last scan, and lists the
directories only when one moved.  A directory whose mtime is less than DIRTY_WINDOW old at
scan time is scanned again next time, since a second change within the file system's
timestamp granularity would not move it.

The first open of a large folder stats each file once (its mtime is the internal date);
sizes come from the ",S=" field of the name.  Both go to the folder's index (index.py),
so the next open, in this process or a new one, needs no per-message stat at all.

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

import bisect
import errno
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.fsutil import fsync_directory, unlink_quietly, write_all
from mailserver.maildir.delivery import (
    _OPEN_FLAGS,
    FLUSH_THRESHOLD,
    unique_base,
)
from mailserver.maildir.flags import (
    RECENT,
    apply_mode,
    base_name,
    flags_from_letters,
    info_letters,
    is_keyword,
    letters_for,
    normalize_flag,
    size_from_base,
    with_letters,
)
from mailserver.maildir.index import CacheValue, FolderIndex
from mailserver.maildir.keywords import KeywordLimit, Keywords
from mailserver.maildir.uidlist import DotLock, FileStamp, LockTimeout, UidList

log = Logger()

INLINE_STORE_MAX = 8       # STOREs on at most this many messages rename in the reactor
DIRTY_WINDOW = 1.0         # seconds: a directory changed this recently is scanned again
CACHE_FLUSH_DELAY = 2.0    # seconds cached values may wait before they are written
CACHE_FLUSH_BATCH = 500    # ... or this many, whichever comes first
_COPY_CHUNK = 256 * 1024


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


# Deliveries arriving within this many seconds share one refresh of an open folder.
REFRESH_COALESCE = 0.05


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


@dataclass
class _Sync:
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
    dirty: bool = False


@dataclass
class _Edit:
    """The outcome of a flag change, expunge, append or copy."""

    sync: _Sync | None = None
    changed: list[MessageInfo] = field(default_factory=list)   # flags differ now
    renamed: list[MessageInfo] = field(default_factory=list)   # only the name differs
    gone: list[int] = field(default_factory=list)              # vanished meanwhile
    expunged: list[int] = field(default_factory=list)          # removed by this edit
    added: list[MessageInfo] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)         # failed UNCHANGEDSINCE
    uidnext: int | None = None
    stamps: tuple[Any, ...] | None = None  # the disk as this edit left it, if nothing else moved


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
        self._lock = DeferredLock()
        self._listeners: list[Any] = []
        self._refresh_call: Any = None
        self._settle_call: Any = None
        self._loaded = False
        self._deleted = False
        self.uidvalidity = 0
        self.uidnext = 1
        self._infos: dict[int, MessageInfo] = {}  # uid order
        self._by_base: dict[str, int] = {}
        self._recent: set[int] = set()
        self._uidlist: UidList | None = None
        self._keywords: Keywords | None = None
        self._keyword_names: tuple[str, ...] = ()
        self._meta: dict[str, str] = {}
        self._index_rows: dict[str, tuple[int, float]] = {}
        self._stamps: tuple[Any, ...] | None = None
        self._dirty = False
        self._index = FolderIndex(self.path)
        self._index_generation = 0
        # RFC 7162: what HIGHESTMODSEQ says (reactor), and the last mod-sequence handed out
        # (by work holding the folder lock, or an inline edit: never two at once).
        self.highestmodseq = 0
        self._modseq_issued = 0
        # Reactor side: (modseq, uid) of every change applied since the folder was loaded,
        # ascending; every message whose mod-sequence is above the floor is in it, so
        # CHANGEDSINCE a recent value is a bisection, not a pass over the folder.
        self._modseq_log: list[tuple[int, int]] = []
        self._modseq_log_floor = 0
        # Thread side (under the folder lock): flags of an info suffix, per keyword table.
        self._letters_cache: dict[str, frozenset[str]] = {}
        self._list_cache: list[MessageInfo] | None = None
        self._uid_cache: list[int] | None = None
        # Reactor side: uids with / without a flag, until the folder changes.
        self._uids_by_flag: dict[tuple[str, bool], list[int]] = {}
        self._stats_cache: tuple[int, int | None, int] | None = None
        self._flush_call: Any = None
        self._flushing: Deferred[int] | None = None
        self._flush_again = False
        self._flush_waiters: list[Deferred[int]] = []

    def __repr__(self) -> str:
        return f"<Folder {self.name!r} at {str(self.path)!r}>"

    # -- reading (reactor thread) ----------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded

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
            found = sorted({u for _, u in log[bisect.bisect_right(log, (modseq, _NO_UID)):]
                            if (i := get(u)) is not None and i.modseq > modseq})
            if uids is None:
                return found
            if len(found) <= len(uids):
                return [u for u in found if _has(uids, u)]
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
        return deferToThread(_vanished, self._index, modseq, present, within,
                             unchanged_below, self.uidnext, str(self.path))

    @property
    def exists(self) -> int:
        return len(self._infos)

    def _stats(self) -> tuple[int, int | None, int]:
        stats = self._stats_cache
        if stats is None:
            unseen, first, total = 0, None, 0
            # A snapshot (one C-level copy): total_size() may be asked from a thread.
            for info in list(self._infos.values()):
                total += info.size
                if "\\Seen" not in info.flags:
                    unseen += 1
                    if first is None:
                        first = info.uid
            stats = self._stats_cache = (unseen, first, total)
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
        in it.  (The table itself changes in a thread while a STORE defines a keyword, and
        is briefly empty then.)  Sessions compare it by identity to know when to announce
        FLAGS again (RFC 3501 7.2.6)."""
        return self._keyword_names

    def _note_keywords(self) -> None:
        """Take the keyword table's names into `keyword_names`.  Called where a change is
        applied in the reactor, before listeners hear of it: no thread works on the table
        then (the folder lock is held, or the edit ran inline).  No table (to be read
        again after a failure or a rename) keeps the names known."""
        if self._keywords is None:
            return
        names = tuple(self._keywords.names())
        if names != self._keyword_names:
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
            found = _find_base(self.path, info.basename)
            if found is None:
                raise
            return open(self.path / found[0] / found[1], "rb")

    # -- the index cache ---------------------------------------------------------------------

    @property
    def index(self) -> FolderIndex:
        """The folder's index file, for blocking use from a thread (SEARCH)."""
        return self._index

    def cache_get(self, uid: int, key: str) -> CacheValue | None:
        """A value the IMAP layer cached for message `uid`, or None."""
        info = self._infos.get(uid)
        return None if info is None else self._index.get(info.basename, key)

    def cache_get_many(self, uids: Iterable[int], key: str) -> dict[int, CacheValue]:
        """`cache_get` for many messages at once (uids without a value are left out)."""
        infos = [self._infos[u] for u in uids if u in self._infos]
        found = self._index.get_many([i.basename for i in infos], key)
        return {i.uid: found[i.basename] for i in infos if i.basename in found}

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
        if not index.is_open or index.pending or time.monotonic() - index.last_used < idle:
            return None
        return deferToThread(index.close_if_idle, idle)

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
        d = self._flushing = deferToThread(self._index.flush)

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

    def close(self) -> Deferred[None]:
        """Write pending cache values and close the index (the folder stays usable: the
        index reopens on next use)."""
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
        return waiter.addCallback(
            lambda _: self._lock.run(lambda: deferToThread(self._index.close)))

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

    def _run(self, work: Callable[..., Any], apply: Callable[[Any], Any],
             *args: Any, inline: bool = False) -> Deferred[Any]:
        """Run `work(*args)` in a thread under the folder lock, loading the folder first
        if need be, then `apply(result)` in the reactor before the lock is released.

        `inline` (a small edit: a few renames) runs it here at once when the folder is
        loaded and nothing else holds the lock: a thread hop would cost more than the
        work, and under many concurrent STOREs the queue for the lock would make every
        command of every session on the folder wait.
        """
        if inline and self._loaded and not self._deleted and not self._lock.locked:
            try:
                return succeed(apply(self._own_edit(work, *args)))
            except BaseException:
                return fail(self._translate(Failure()))

        def locked() -> Deferred[Any]:
            if self._deleted:
                return fail(NoSuchFolder(f"folder {self.name} was deleted"))
            d: Deferred[Any] = succeed(None)
            if not self._loaded:
                d.addCallback(lambda _: deferToThread(self._sync_thread))
                d.addCallback(self._apply_sync, None)
            d.addCallback(lambda _: deferToThread(self._thread_edit, work, *args))
            d.addCallback(apply)
            d.addErrback(self._translate)
            return d
        return self._lock.run(locked)

    def _own_edit(self, work: Callable[..., Any], *args: Any) -> Any:
        """Run `work` and, when the disk matched our view before it, remember the stamps it
        leaves, so our own renames and uidlist writes do not make the next refresh rescan
        the whole folder (a flag change costs a rename, not a directory listing).  A change
        to new/ meanwhile (another delivery) is left for the refresh to find."""
        try:
            before = self._disk_stamps() if self._loaded else None
        except NoSuchFolder:
            before = None
        result = work(*args)
        if (isinstance(result, _Edit) and before is not None and before == self._stamps
                and result.sync is None and (not self._dirty or self._settling)):
            after = self._disk_stamps()
            if after[0] == before[0]:
                result.stamps = after
        return result

    def _thread_edit(self, work: Callable[..., Any], *args: Any) -> Any:
        """`_own_edit` in a thread, writing the mod-sequences it made before it is applied."""
        try:
            return self._own_edit(work, *args)
        finally:
            self._index.write_modseqs()

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

    def _relocate(self, path: Path, name: str) -> FolderIndex:
        """The folder's directory was renamed (with the folder): follow it.  Returns the
        old index, to be closed once work in progress is over."""
        old = self._index
        self.path = Path(path)
        self.name = name
        self._index = FolderIndex(self.path)
        self._index_generation = self._index.generation
        self._uidlist = None
        self._keywords = None
        return old

    def _mark_deleted(self) -> None:
        """The folder's directory is gone (deleted through the account): tell sessions."""
        uids = list(self._infos)
        self._deleted = True
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        self._stop_settling()
        self._infos.clear()
        self._by_base.clear()
        self._recent.clear()
        self._changed()
        for listener in list(self._listeners):
            try:
                if hasattr(listener, "folder_deleted"):
                    listener.folder_deleted(self)
                elif uids:
                    listener.messages_expunged(list(uids))
            except Exception:
                log.failure("folder listener {listener} failed", listener=listener)

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> Deferred[FolderChanges]:
        """Catch up with the disk; fires with what changed (listeners hear it too).

        The common case, nothing changed, is answered here: four stat() calls on the
        folder's own files cost microseconds, less than a hop to a thread and back, and
        every IMAP command asks.  `force` rescans whatever the stamps say.
        """
        if (not force and self._loaded and (not self._dirty or self._settling)
                and not self._deleted and not self._lock.locked):
            try:
                unchanged = self._disk_stamps() == self._stamps
            except (NoSuchFolder, OSError):
                unchanged = False
            if unchanged:
                return succeed(FolderChanges())

        def locked() -> Deferred[FolderChanges]:
            if self._deleted:
                return fail(NoSuchFolder(f"folder {self.name} was deleted"))
            d = deferToThread(self._sync_thread, force)
            d.addCallback(self._apply_sync, None)
            d.addErrback(self._translate)
            return d
        return self._lock.run(locked)

    def _sync_thread(self, force: bool = False) -> _Sync:
        try:
            sync = self._sync_core(lock_held=False, force=force)
        except BaseException:
            self._uidlist = None  # may be half-changed: read it again next time
            self._dirty = True
            raise
        self._index.write_modseqs()
        return sync

    def _apply_sync(self, sync: _Sync, origin: Any) -> FolderChanges:
        if self._deleted:
            raise NoSuchFolder(f"folder {self.name} was deleted")
        self._stamps = sync.stamps
        self._dirty = sync.dirty
        self._settle_soon()
        if sync.unchanged:
            return FolderChanges()
        self.highestmodseq = max(self.highestmodseq, self._modseq_issued)
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
        self._note_keywords()
        self.uidvalidity = sync.uidvalidity
        self.uidnext = sync.uidnext
        if sync.reset or sync.expunged or sync.renamed or sync.added:
            self._changed()  # a rescan that found nothing new keeps the cached lists
        changes = FolderChanges(added=list(sync.added), expunged=sorted(sync.expunged),
                                flags_changed=list(sync.flags_changed),
                                uidvalidity_changed=sync.reset and not first_load)
        if first_load:
            return changes
        self._notify(origin, changes.expunged, changes.flags_changed, changes.added,
                     reset=changes.uidvalidity_changed)
        return changes

    def _restat(self, changed: list[MessageInfo]) -> tuple[int, int | None, int] | None:
        """The cached (unseen, first unseen uid, total size) after these flag changes
        (infos not applied yet); None to count again (or if nothing was counted)."""
        if self._stats_cache is None:
            return None
        unseen, first, total = self._stats_cache
        for info in changed:
            now = "\\Seen" not in info.flags
            if now == ("\\Seen" not in self._infos[info.uid].flags):
                continue
            if now:
                unseen += 1
                if first is None or info.uid < first:
                    first = info.uid
            else:
                unseen -= 1
                if info.uid == first:
                    return None  # where the next unseen one is takes a look
        return unseen, first, total

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
            self._modseq_log = log[bisect.bisect_right(log, (floor, _NO_UID)):]
            self._modseq_log_floor = floor

    def _add_infos(self, infos: Iterable[MessageInfo]) -> None:
        for info in infos:
            self._infos[info.uid] = info
            self._by_base[info.basename] = info.uid
            if info.recent:
                self._recent.add(info.uid)

    # -- the scan (thread; the folder lock is held) -----------------------------------------

    def _disk_stamps(self) -> tuple[Any, ...]:
        try:
            new = os.stat(self.path / "new").st_mtime_ns
            cur = os.stat(self.path / "cur").st_mtime_ns
        except FileNotFoundError:
            raise NoSuchFolder(f"folder {self.name} does not exist") from None
        return (new, cur, FileStamp.of(self.path / "dovecot-uidlist"),
                FileStamp.of(self.path / "dovecot-keywords"))

    def _scan(self) -> dict[str, tuple[str, str]]:
        """base name -> (subdir, file name) of every message file.

        new/ is listed before cur/, so a file moving from one to the other meanwhile is
        seen at least once; cur/ wins when both have it.
        """
        listing: dict[str, tuple[str, str]] = {}
        for subdir in ("new", "cur"):
            try:
                names = os.listdir(self.path / subdir)
            except FileNotFoundError:
                raise NoSuchFolder(f"folder {self.name} does not exist") from None
            for name in names:
                if name[0] == "." or "\n" in name or "\r" in name:
                    continue
                listing[base_name(name)] = (subdir, name)
        return listing

    def _current_uidlist(self) -> UidList:
        """The uid list as on disk now (read again if it changed), created if missing."""
        ul = self._uidlist
        disk = FileStamp.of(self.path / "dovecot-uidlist")
        if ul is not None and disk is not None and ul.stamp == disk:
            return ul
        if ul is not None and disk is None and ul.stamp is None:
            return ul  # created by us, not written yet
        previous = self.uidvalidity or _int(self._meta.get("uidvalidity"))
        fresh = UidList.read(self.path) if disk is not None else None
        if fresh is None:
            if previous and disk is None and self._loaded:
                log.warn("{path}: dovecot-uidlist vanished; new UIDVALIDITY",
                         path=str(self.path))
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

    def _sync_core(self, lock_held: bool, force: bool = False) -> _Sync:
        stamps = self._disk_stamps()
        if (self._loaded and not force and (not self._dirty or self._settling)
                and stamps == self._stamps):
            return _Sync(stamps)
        if not self._loaded and not self._meta:
            self._meta, self._index_rows = self._index.load()
            self._index_generation = self._index.generation
        scan_start = time.time()
        listing = self._scan()
        if any(b not in listing for b in self._by_base):
            # A rename racing with readdir may hide a file: look once more before
            # calling anything expunged.
            for base, where in self._scan().items():
                listing[base] = where
        ul = self._current_uidlist()
        kw, kw_reread = self._current_keywords()
        reset = self._loaded and ul.uidvalidity != self.uidvalidity
        limit = 0 if reset else (next(reversed(self._infos)) if self._infos else 0)
        by_base = {} if reset else self._by_base
        uid_of = ul.mapping().get
        dirs = {"cur": os.path.join(self.path, "cur"), "new": os.path.join(self.path, "new")}

        def needs_uid(base: str) -> bool:
            uid = uid_of(base)
            return uid is None or (uid <= limit and by_base.get(base) != uid)

        need_write = (ul.stamp is None or ul.damaged or ul.version != 3 or kw.dirty
                      or any(sub == "new" or needs_uid(b) for b, (sub, _) in listing.items())
                      or any(b not in listing for _, b in ul.items()))
        if need_write and not lock_held:
            with DotLock(ul.path):
                return self._sync_core(lock_held=True, force=True)

        fresh_stats: dict[str, os.stat_result] = {}
        moved: set[str] = set()
        if need_write:
            moved = self._move_new(listing)
            for uid, base in list(ul.items()):
                if base not in listing:
                    ul.remove(uid)
            fresh = []
            for base in listing:
                if needs_uid(base):
                    old = ul.lookup(base)
                    if old is not None:
                        ul.remove(old)
                    sub, name = listing[base]
                    try:
                        fresh_stats[base] = os.stat(os.path.join(dirs[sub], name))
                    except FileNotFoundError:
                        continue
                    fresh.append(base)
            fresh.sort(key=lambda b: (fresh_stats[b].st_mtime, b))
            for base in fresh:
                ul.add(base)
            for base in [b for b in listing if uid_of(b) is None]:
                del listing[base]  # vanished while we looked
            ul.write()
            if kw.dirty:
                kw.write()

        # Stamps taken after our own changes: anything another process did since the
        # scan started has an mtime inside the dirty window, so it is not missed.
        after = self._disk_stamps()
        sync = _Sync(stamps=after, unchanged=False, uidvalidity=ul.uidvalidity,
                     uidnext=ul.nextuid, reset=reset)
        sync.dirty = max(after[0], after[1]) / 1e9 >= scan_start - DIRTY_WINDOW

        rows = self._index_rows
        new_rows: list[tuple[str, int, float]] = []
        recent_bases = moved | set(fresh_stats)
        known = {} if reset else self._infos
        seen_uids: set[int] = set()
        flags_of = self._flags_of
        # RFC 7162: one new mod-sequence for whatever this scan finds changed.
        stored = self._start_modseqs(ul.uidvalidity, reset)
        mod_rows: list[tuple[str, int, int, str]] = []
        issued = 0
        for base, (sub, name) in listing.items():
            uid = uid_of(base)
            assert uid is not None
            seen_uids.add(uid)
            old = known.get(uid)
            if old is not None and old.basename == base:
                if old.filename != name or old.subdir != sub or kw_reread:
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
                continue
            row = rows.get(base)
            st = fresh_stats.get(base)
            if row is not None and st is None:
                size, date = row
            else:
                size = size_from_base(base)
                if st is None:
                    try:
                        st = os.stat(os.path.join(dirs[sub], name))
                    except FileNotFoundError:
                        continue  # vanished
                date = st.st_mtime
                if size is None:
                    size = st.st_size
                new_rows.append((base, size, date))
            had = stored.get(base)
            if had is not None and had[0] == uid and had[2] == name:
                modseq = had[1]  # as the index knows it: unchanged since
            else:
                modseq = issued = issued or self._issue_modseq()
                mod_rows.append((base, uid, modseq, name))
            sync.added.append(MessageInfo(uid, base, name, sub, flags_of(name),
                                          size, date, base in recent_bases, modseq))
        sync.added.sort(key=lambda i: i.uid)
        sync.expunged = [uid for uid in known if uid not in seen_uids
                         or known[uid].basename != ul.name(uid)]

        gone_bases = [known[u].basename for u in sync.expunged]
        vanished = [(known[u].basename, u) for u in sync.expunged]
        if not self._loaded:
            gone_bases = [b for b in rows if b not in listing]
            self._index_rows = {}
            # Expunged while the folder was closed (another process, or before a restart).
            vanished = [(b, had[0]) for b, had in stored.items()
                        if b not in listing or uid_of(b) != had[0]]
        if self._index.generation != self._index_generation:
            new_rows = [(i.basename, i.size, i.internaldate) for i in self._infos.values()
                        if i.uid not in sync.expunged] + new_rows
            self._index_generation = self._index.generation
            if self._loaded and not reset:
                # The file was rebuilt empty: what memory holds goes back, but the
                # expunges it remembered are lost.
                self._forget_vanished(ul.uidvalidity)
                self._index.note_modseqs((i.basename, i.uid, i.modseq, i.filename)
                                         for i in self._infos.values())
        if vanished and not reset:
            self._index.note_expunged(vanished, issued or self._issue_modseq())
        self._index.note_modseqs(mod_rows)
        self._index.note_modseq_meta(highestmodseq=self._modseq_issued,
                                     modseq_uidvalidity=ul.uidvalidity)
        self._index.drop(gone_bases)
        self._index.put_messages(new_rows)
        self._index.set_meta({"uidvalidity": ul.uidvalidity, "uidnext": ul.nextuid})
        self._meta = {"uidvalidity": str(ul.uidvalidity), "uidnext": str(ul.nextuid)}
        return sync

    # -- mod-sequences (thread side: under the folder lock, or inline) ----------------------

    def _issue_modseq(self) -> int:
        """A new mod-sequence, above every one handed out before (see the module text)."""
        value = max(self._modseq_issued + 1, time.time_ns() // 1000)
        self._modseq_issued = value
        return value

    def _start_modseqs(self, uidvalidity: int, reset: bool) -> dict[str, tuple[int, int, str]]:
        """For a scan: the index's rows (base -> (uid, modseq, name)) when the folder is
        being loaded and they can be trusted, else {}.  A first load without trusted rows
        (a new or rebuilt index, or another UIDVALIDITY), and a UIDVALIDITY change, start
        the mod-sequence memory afresh."""
        if self._loaded and not reset:
            return {}
        stored: dict[str, tuple[int, int, str]] = {}
        if not self._loaded:
            meta, stored = self._index.load_modseqs()
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
        self._index.note_modseq_reset()
        self._index.note_modseq_meta(vanished_after=self._issue_modseq(),
                                     modseq_uidvalidity=uidvalidity)

    def _move_new(self, listing: dict[str, tuple[str, str]]) -> set[str]:
        """Move every file of new/ to cur/ (adding ":2,"); the base names we moved."""
        moved: set[str] = set()
        lost = False
        for base, (sub, name) in list(listing.items()):
            if sub != "new":
                continue
            dest = name if ":" in name else name + ":2,"
            try:
                os.rename(self.path / "new" / name, self.path / "cur" / dest)
            except FileNotFoundError:
                lost = True  # moved or expunged by someone else: look again below
                del listing[base]
                continue
            except OSError as e:
                log.warn("cannot move {name} to cur/: {error}", name=name, error=e)
                continue
            listing[base] = ("cur", dest)
            moved.add(base)
        if lost:
            for base, where in self._scan().items():
                listing.setdefault(base, where)
        return moved

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
               unchanged_since: int | None) -> Deferred[_Edit]:
        try:
            wanted = frozenset(normalize_flag(f) for f in flags if f.lower() != RECENT.lower())
        except ValueError as e:
            return fail(InvalidFlag(str(e)))
        if mode not in ("set", "add", "remove"):
            return fail(ValueError(f"unknown mode {mode!r}"))
        targets = sorted(set(uids))
        kw = self._keywords
        small = (len(targets) <= INLINE_STORE_MAX and kw is not None and not kw.changed_on_disk()
                 and (mode == "remove" or all(kw.has(f) for f in wanted if is_keyword(f))))
        return self._run(self._store_thread, lambda e: self._apply_edit(e, origin),
                         targets, wanted, mode, unchanged_since, inline=small)

    def _canonical(self, kw: Keywords, flags: frozenset[str]) -> frozenset[str]:
        return frozenset(kw.canonical(f) if is_keyword(f) else f for f in flags)

    def _store_thread(self, uids: list[int], flags: frozenset[str], mode: str,
                      unchanged_since: int | None = None) -> _Edit:
        kw, _ = self._current_keywords()
        flags = self._canonical(kw, flags)
        plans = []
        edit = _Edit()
        for uid in uids:
            info = self._infos.get(uid)
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
                        self._dirty = True
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
            log.warn("fsync of {path} failed: {error}", path=str(self.path), error=e)
        if edit.gone:
            self._index.note_expunged(((self._infos[u].basename, u) for u in edit.gone),
                                      modseq or self._issue_modseq())
        self._index.note_modseqs((i.basename, i.uid, i.modseq, i.filename)
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

    def _apply_edit(self, edit: _Edit, origin: Any) -> Any:
        """Apply an edit made by `origin`; what the operation's Deferred fires with."""
        if self._deleted:
            raise NoSuchFolder(f"folder {self.name} was deleted")
        if edit.sync is not None:
            self._apply_sync(edit.sync, None)
        if edit.stamps is not None:
            self._stamps = edit.stamps
        self.highestmodseq = max(self.highestmodseq, self._modseq_issued)
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
        self._note_keywords()
        if edit.uidnext is not None:
            self.uidnext = max(self.uidnext, edit.uidnext)
        self._changed()
        self._uid_cache, self._stats_cache = uid_list, stats
        vanished = sorted(u for u in edit.gone if u in gone)
        self._notify(None, expunged=vanished)
        self._notify(origin, expunged=sorted(u for u in edit.expunged if u in gone),
                     changed=changed, added=edit.added)
        return edit

    # -- expunge ---------------------------------------------------------------------------------

    def expunge(self, uids: Iterable[int] | None = None,
                origin: Any = None) -> Deferred[list[int]]:
        """Remove the messages flagged \\Deleted (only among `uids` when given: UID
        EXPUNGE); fires with the expunged uids, ascending."""
        chosen = None if uids is None else sorted(set(uids))
        d = self._run(self._remove_thread, lambda e: self._apply_edit(e, origin),
                      chosen, True)
        return d.addCallback(lambda e: sorted(e.expunged))

    def delete_messages(self, uids: Iterable[int], origin: Any = None) -> Deferred[list[int]]:
        """Remove exactly these messages whatever their flags (POP3 DELE + QUIT, MOVE)."""
        d = self._run(self._remove_thread, lambda e: self._apply_edit(e, origin),
                      sorted(set(uids)), False)
        return d.addCallback(lambda e: sorted(e.expunged))

    def _remove_thread(self, uids: list[int] | None, only_deleted: bool) -> _Edit:
        chosen = self._infos.values() if uids is None else (
            self._infos[u] for u in uids if u in self._infos)
        targets = [i for i in chosen if not only_deleted or "\\Deleted" in i.flags]
        edit = _Edit()
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
                        self._dirty = True  # undeleted meanwhile: a refresh will show it
                        continue
                    try:
                        os.unlink(self.path / where[0] / where[1])
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        log.error("cannot expunge {name}: {error}", name=where[1], error=e)
                        continue
            except OSError as e:
                log.error("cannot expunge {name}: {error}", name=info.filename, error=e)
                continue
            removed.append(info)
        if not removed:
            return edit
        edit.expunged = [i.uid for i in removed]
        try:
            fsync_directory(self.path / "cur")
        except OSError as e:
            log.warn("fsync of {path} failed: {error}", path=str(self.path), error=e)
        try:
            with DotLock(self.path / "dovecot-uidlist"):
                ul = self._current_uidlist()
                if ul.uidvalidity == self.uidvalidity:
                    for info in removed:
                        if ul.name(info.uid) == info.basename:
                            ul.remove(info.uid)
                    ul.write()
        except OSError as e:
            # The files are gone whatever happens here; the next sync drops the records.
            self._uidlist = None
            log.error("cannot update {path}: {error}", path=str(self.path), error=e)
        self._index.note_expunged(((i.basename, i.uid) for i in removed), self._issue_modseq())
        self._index.drop(i.basename for i in removed)
        return edit

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

    def _append_thread(self, writer: AppendWriter) -> _Edit:
        tmp, base, size = writer._finish_file()
        full_base = f"{base},S={size}"
        try:
            mtime = os.stat(tmp).st_mtime
            with DotLock(self.path / "dovecot-uidlist"):
                edit = _Edit(sync=self._locked_sync())
                ul = self._current_uidlist()
                kw, _ = self._current_keywords()
                flags = self._canonical(kw, writer.flags)
                letters = letters_for(flags, kw.letter)
                if kw.dirty:
                    kw.write()
                name = f"{full_base}:2,{letters}"
                os.rename(tmp, self.path / "cur" / name)
                fsync_directory(self.path / "cur")
                uid = ul.add(full_base)
                ul.write()
        except BaseException:
            self._keywords = None
            self._uidlist = None
            self._dirty = True
            unlink_quietly(tmp)
            raise
        self._index.put_messages([(full_base, size, mtime)])
        modseq = self._issue_modseq()
        self._index.note_modseqs([(full_base, uid, modseq, name)])
        edit.added = [MessageInfo(uid, full_base, name, "cur", self._flags_of(name), size,
                                  mtime, True, modseq)]
        edit.uidnext = ul.nextuid
        return edit

    def _locked_sync(self) -> _Sync:
        """A sync while the uid list lock is held, so our own uids come after every uid
        another process gave out."""
        try:
            return self._sync_core(lock_held=True)
        except BaseException:
            self._uidlist = None
            self._dirty = True
            raise

    def copy_to(self, uids: Iterable[int], dest: Folder,
                origin: Any = None) -> Deferred[list[tuple[int, int]]]:
        """Copy messages into `dest` with their flags (hard links where possible).

        Fires with (source uid, dest uid) pairs in source uid order; a message that
        vanished meanwhile is skipped.  `dest`'s listeners other than `origin` hear of
        the new messages.
        """
        items = [self._infos[u] for u in sorted(set(uids)) if u in self._infos]
        d = dest._run(dest._copy_thread, lambda e: dest._apply_edit(e, origin),
                      self.path, items)
        return d.addCallback(lambda e: e.pairs)

    def _copy_thread(self, src_dir: Path, items: list[MessageInfo]) -> _Edit:
        placed: list[tuple[int, str, str, int, float]] = []
        created: list[Path] = []
        try:
            with DotLock(self.path / "dovecot-uidlist"):
                edit = _Edit(sync=self._locked_sync())
                ul = self._current_uidlist()
                kw, _ = self._current_keywords()
                wanted = [self._canonical(kw, i.flags) for i in items]
                letters = [letters_for(f, kw.letter) for f in wanted]
                if kw.dirty:
                    kw.write()
                found: dict[str, tuple[str, str]] | None = None
                for info, info_letters_ in zip(items, letters):
                    src = src_dir / info.subdir / info.filename
                    if not src.exists():
                        if found is None:
                            found = _scan_dir(src_dir)
                        where = found.get(info.basename)
                        if where is None:
                            continue
                        src = src_dir / where[0] / where[1]
                    new_base = unique_base(self._escaped_host) + _base_fields(info)
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
            self._dirty = True
            for path in created:
                unlink_quietly(path)
            raise
        self._index.put_messages((i.basename, i.size, i.internaldate) for i in edit.added)
        self._index.note_modseqs((i.basename, i.uid, i.modseq, i.filename) for i in edit.added)
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
        fd = os.open(tmp, _OPEN_FLAGS, 0o600)
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


class AppendWriter:
    """A message on its way into a folder: `write` as data arrives, then `commit`.

    The data streams into the folder's tmp/ (at most FLUSH_THRESHOLD bytes held in
    memory).  `commit` fsyncs it, renames it into cur/ with its flags and ",S=<size>",
    sets the mtime to the internal date, fsyncs cur/, gives it a uid and stores the uid
    list, and only then fires with the MessageInfo: an OK sent on it is true.
    """

    def __init__(self, folder: Folder, flags: frozenset[str], internaldate: float | None,
                 origin: Any) -> None:
        self.folder = folder
        self.flags = flags
        self.internaldate = internaldate
        self.origin = origin
        self._buffer = bytearray()
        self._size = 0
        self._state = "open"
        self._error: OSError | None = None
        last: OSError | None = None
        for _ in range(5):
            self._base = unique_base(folder._escaped_host)
            self._tmp = folder.path / "tmp" / self._base
            try:
                self._fd = os.open(self._tmp, _OPEN_FLAGS, 0o600)
                return
            except FileExistsError as e:
                last = e
        assert last is not None
        raise last

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        """Append `data`; a disk error is kept and fails the commit."""
        if self._state != "open":
            raise RuntimeError(f"append is {self._state}")
        self._size += len(data)
        if self._error is not None:
            return
        self._buffer += data
        if len(self._buffer) >= FLUSH_THRESHOLD:
            try:
                write_all(self._fd, bytes(self._buffer))
            except OSError as e:
                log.error("writing {path} failed: {error}", path=str(self._tmp), error=e)
                self._error = e
            self._buffer = bytearray()

    def commit(self) -> Deferred[MessageInfo]:
        """Store the message durably; fires with its MessageInfo (uid included)."""
        if self._state != "open":
            raise RuntimeError(f"append is {self._state}")
        self._state = "committing"
        folder = self.folder

        def failed(f: Failure) -> Failure:
            self._state = "failed"
            self._close()
            unlink_quietly(self._tmp)
            return f

        def done(edit: _Edit) -> MessageInfo:
            self._state = "committed"
            return edit.added[0]

        d = folder._run(folder._append_thread,
                        lambda e: folder._apply_edit(e, self.origin), self)
        return d.addCallbacks(done, failed)

    def abort(self) -> None:
        """Drop the message.  Idempotent; no effect once committing."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = bytearray()
        self._close()
        unlink_quietly(self._tmp)

    def _finish_file(self) -> tuple[Path, str, int]:
        """Thread side of commit: flush, fsync, close, set the internal date."""
        try:
            if self._error is not None:
                raise self._error
            write_all(self._fd, bytes(self._buffer))
            self._buffer = bytearray()
            os.fsync(self._fd)
        finally:
            self._close()
        if self.internaldate is not None:
            os.utime(self._tmp, (self.internaldate, self.internaldate))
        return self._tmp, self._base, self._size

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


# -- helpers -----------------------------------------------------------------------------------

def _vanished(index: FolderIndex, modseq: int, present: Sequence[int],
              within: Sequence[tuple[int, int]] | None, unchanged_below: int, uidnext: int,
              where: str) -> list[tuple[int, int]]:
    """Folder.vanished_since's work (thread)."""
    try:
        after, uids = index.vanished_since(modseq)
    except sqlite3.Error as e:
        log.warn("expunge memory of {path} unreadable ({error})", path=where, error=e)
        after, uids = None, []
    if after is not None and modseq >= after:
        ranges = uid_ranges(u for u in uids if u < uidnext and not _has(present, u))
    else:
        ranges = _gaps(present, unchanged_below + 1, uidnext - 1)
    if within is not None:
        ranges = intersect_ranges(ranges, normalize_ranges(within))
    return ranges


_NO_UID = 2 ** 64  # above every uid: bisects past all entries of a mod-sequence


def _has(sorted_uids: Sequence[int], uid: int) -> bool:
    i = bisect.bisect_left(sorted_uids, uid)
    return i < len(sorted_uids) and sorted_uids[i] == uid


def _gaps(sorted_uids: Sequence[int], first: int, last: int) -> list[tuple[int, int]]:
    """The ranges of [first, last] holding none of `sorted_uids`."""
    out: list[tuple[int, int]] = []
    nxt = first
    for u in sorted_uids[bisect.bisect_left(sorted_uids, first):]:
        if u > last:
            break
        if u > nxt:
            out.append((nxt, u - 1))
        nxt = u + 1
    if nxt <= last:
        out.append((nxt, last))
    return out


def uid_ranges(uids: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending uids as (first, last) runs."""
    out: list[tuple[int, int]] = []
    for u in uids:
        if out and u == out[-1][1] + 1:
            out[-1] = (out[-1][0], u)
        else:
            out.append((u, u))
    return out


def normalize_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, last) pairs, either way round, overlapping or not, as ascending disjoint
    ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((min(a, b), max(a, b)) for a, b in ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def intersect_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two lists of ascending disjoint ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _int(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _scan_dir(folder_dir: Path) -> dict[str, tuple[str, str]]:
    """base name -> (subdir, name) in another folder's directory (missing dirs: empty)."""
    listing: dict[str, tuple[str, str]] = {}
    for subdir in ("new", "cur"):
        try:
            names = os.listdir(folder_dir / subdir)
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith("."):
                listing[base_name(name)] = (subdir, name)
    return listing


def _find_base(folder_dir: Path, base: str) -> tuple[str, str] | None:
    return _scan_dir(folder_dir).get(base)


def _base_fields(info: MessageInfo) -> str:
    """The ",S=..." (and ",W=...") fields a copy's new base name keeps."""
    fields = [f for f in info.basename.split(",")[1:] if f[:2] in ("S=", "W=")]
    if not any(f.startswith("S=") for f in fields):
        fields.insert(0, f"S={info.size}")
    return "".join("," + f for f in fields)
