"""dovecot-uidlist: a folder's UIDVALIDITY, UIDNEXT and uid -> base name map.

Written in Dovecot's format version 3 so Dovecot and this server can take turns on the
same Maildir without clients re-downloading anything:

    3 V<uidvalidity> N<nextuid> G<mailbox guid, 32 hex digits> [other header fields]
    <uid> [<ext field>...] :<base name>

Ext fields are one uppercase letter and a value (W<vsize>, S<size>, P<pop3 uidl>, ...);
unknown header and ext fields are kept on rewrite.  Version 1 files (Courier's
courierimapuiddb format, old Dovecot: "1 <uidvalidity> <nextuid>" then "<uid> <name>")
are read too and rewritten as version 3.

Concurrency with Dovecot (and other processes of ours) uses Dovecot's own protocol: the
dot-lock `dovecot-uidlist.lock` is held while the list is read, changed and rewritten; a
rewrite goes to `dovecot-uidlist.tmp`, is fsynced and renamed over the list, and the
directory is fsynced, so a crash at any moment leaves either the old or the new file.
Dovecot may also append lines in place; a changed size or inode means "read it again".
On a Maildir root several nodes share (`[storage] shared`) the same lock keeps them apart:
each node reads the list again under the lock before it hands out a uid (opening the file,
which NFS's close-to-open consistency makes current), and a lock another host holds is
judged stale by its age alone, which its holder keeps young while it works.

A damaged file never stops a folder from opening: whatever parses is kept, the rest is
logged and dropped on the next rewrite.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from mailserver.fsutil import fsync_directory, unlink_quietly, write_all, write_durably
from mailserver.maildir.flags import base_name

log = logging.getLogger(__name__)

UIDLIST_NAME = "dovecot-uidlist"
UIDLIST_TMP_NAME = "dovecot-uidlist.tmp"
LOCK_SUFFIX = ".lock"
VERSION = 3
MAX_UID = 0xFFFFFFFF - 1  # uids and uidvalidity are nz-number (32 bits)
LOCK_STALE_AFTER = 120.0  # Dovecot's MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT
LOCK_TIMEOUT = 30.0
# link(2) refused because the file system has no hard links (vfat, some FUSE ones)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                            errno.EMLINK, errno.EXDEV})
_ENCODING = ("utf-8", "surrogateescape")  # file names are bytes; keep them exactly


# -- file identity --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FileStamp:
    """What tells whether a file changed since it was read: Dovecot rewrites by rename
    (new inode) or appends (new size)."""

    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_ino, st.st_size, st.st_mtime_ns)


# -- UIDVALIDITY ---------------------------------------------------------------------------

_uidvalidity_lock = threading.Lock()
_last_uidvalidity = 0


def new_uidvalidity(previous: int | None = None) -> int:
    """A fresh UIDVALIDITY: the current time as Dovecot uses, but always above `previous`
    and above every value handed out before in this process (so a folder deleted and
    created again within one second still gets a new one)."""
    global _last_uidvalidity
    with _uidvalidity_lock:
        value = max(int(time.time()), _last_uidvalidity + 1, (previous or 0) + 1)
        if value > MAX_UID:
            value = 1  # the year 2106: wrap rather than write an invalid value
        _last_uidvalidity = value
        return value


# -- dot-locks --------------------------------------------------------------------------------

class LockTimeout(OSError):
    """Another process kept a dot-lock for longer than we wait."""


class _Held:
    """This process's state of one dot-lock path: which thread holds it, how often (the
    holder may take it again: an edit that defines a keyword or syncs first), and the
    descriptor of the lock file."""

    __slots__ = ("lock", "owner", "depth", "fd", "since")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.depth = 0
        self.fd = -1
        self.since = 0.0


_local_locks: dict[str, _Held] = {}
_local_locks_guard = threading.Lock()


def _local_lock(path: Path) -> _Held:
    with _local_locks_guard:
        return _local_locks.setdefault(str(path), _Held())


# A lock held longer than this is touched (its mtime set to now) by a keeper thread, so that
# another host, which can judge our lock only by its age, never takes a long hold for a
# crashed one (Dovecot refreshes its dot-locks the same way).
LOCK_REFRESH_AFTER = LOCK_STALE_AFTER / 4
_keeper: threading.Thread | None = None


def refresh_held_locks(older_than: float = LOCK_REFRESH_AFTER) -> int:
    """Set the mtime of every lock file this process has held for `older_than` seconds
    to now; how many.  Run by the keeper thread."""
    now = time.monotonic()
    count = 0
    with _local_locks_guard:
        for state in _local_locks.values():
            if state.fd >= 0 and now - state.since >= older_than:
                try:
                    os.utime(state.fd)
                    state.since = now
                    count += 1
                except OSError:
                    pass
    return count


def _keep_fresh() -> None:
    while True:
        time.sleep(LOCK_REFRESH_AFTER / 2)
        refresh_held_locks()


def _start_keeper() -> None:
    global _keeper
    with _local_locks_guard:
        if _keeper is None or not _keeper.is_alive():
            _keeper = threading.Thread(target=_keep_fresh, name="dotlock-keeper", daemon=True)
            _keeper.start()


def _forget_keeper() -> None:
    global _keeper
    _keeper = None   # a forked child has no such thread


os.register_at_fork(after_in_child=_forget_keeper)


class DotLock:
    """Dovecot's dot-lock on `target`: the file `<target>.lock`, created exclusively and
    holding "<pid>:<host>".

    Blocking (call it in a thread).  A lock is broken as Dovecot breaks it: when it is
    older than LOCK_STALE_AFTER seconds, or, for a lock of this host, when its process is
    gone.  A lock of another host (another node on a shared Maildir root) is judged by its
    age alone: its pid means nothing here.  So that a long hold is not mistaken for a dead
    one, a lock held for LOCK_REFRESH_AFTER seconds gets its mtime refreshed.  Threads of
    this process exclude each other through an in-process lock; the thread holding it may
    take it again (nested holds share the one lock file).
    """

    def __init__(self, target: Path, timeout: float = LOCK_TIMEOUT,
                 stale_after: float = LOCK_STALE_AFTER) -> None:
        self.path = Path(str(target) + LOCK_SUFFIX)
        self.timeout = timeout
        self.stale_after = stale_after
        self._local = _local_lock(self.path)
        self._fd = -1
        self._nested = False

    @property
    def held_here(self) -> bool:
        """Whether the calling thread holds this lock already."""
        return self._local.owner == threading.get_ident()

    def acquire(self) -> int:
        """Take the lock; returns the open descriptor of the lock file (mode 0600)."""
        state = self._local
        if self.held_here:
            state.depth += 1
            self._nested = True
            self._fd = state.fd
            return state.fd
        deadline = time.monotonic() + self.timeout
        if not state.lock.acquire(timeout=self.timeout):
            raise LockTimeout(errno.EAGAIN, "lock busy in this process", str(self.path))
        try:
            delay = 0.005
            while True:
                fd = self._create()
                if fd < 0:
                    if self._break_if_stale():
                        continue
                    if time.monotonic() >= deadline:
                        raise LockTimeout(errno.EAGAIN, "dot-lock held too long",
                                          str(self.path)) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    continue
                self._fd = fd
                with _local_locks_guard:
                    state.fd, state.since = fd, time.monotonic()
                state.owner, state.depth = threading.get_ident(), 1
                if _keeper is None:
                    _start_keeper()
                return fd
        except BaseException:
            state.lock.release()
            raise

    def _create(self) -> int:
        """The lock file, made with its owner already in it: written into a file of its
        own, then linked into place as Dovecot does.  Created empty and written after, a
        crash in between left an empty lock that could not be told dead for two minutes.
        -1 while another holds it.  Where the file system has no hard links, it is
        created exclusively and written at once."""
        owner = f"{os.getpid()}:{_hostname()}".encode()
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        temp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(temp, flags, 0o600)
        linked = False
        try:
            write_all(fd, owner)
            os.link(temp, self.path)
            linked = True
        except FileExistsError:
            return -1
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        finally:
            if not linked:
                os.close(fd)
            unlink_quietly(temp)
        if not linked:   # no hard links on this file system
            return self._create_in_place(owner, flags)
        return fd

    def _create_in_place(self, owner: bytes, flags: int) -> int:
        """Where the file system has no hard links: made exclusively, then written (a
        crash in between leaves an empty lock, broken after LOCK_STALE_AFTER)."""
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            return -1
        try:
            write_all(fd, owner)
        except BaseException:
            os.close(fd)
            unlink_quietly(self.path)
            raise
        return fd

    def release(self, unlink: bool = True) -> None:
        """Drop the lock (`unlink=False` when the lock file was renamed into place)."""
        if self._fd < 0:
            return
        state = self._local
        if self._nested:
            self._nested = False
            self._fd = -1
            state.depth -= 1
            return
        with _local_locks_guard:
            state.fd = -1
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._fd = -1
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        state.owner, state.depth = None, 0
        state.lock.release()

    def _break_if_stale(self) -> bool:
        try:
            st = os.stat(self.path)
            with open(self.path, "rb") as f:
                owner = f.read(256).decode("ascii", "replace")
        except FileNotFoundError:
            return True
        except OSError:
            return False
        # A lock naming no owner is judged by its age alone, as Dovecot judges it: Dovecot's
        # own uid list lock is empty for as long as it is held.
        stale = time.time() - st.st_mtime > self.stale_after
        pid_s, _, host = owner.partition(":")
        if not stale and host == _hostname() and pid_s.isdigit():
            pid = int(pid_s)
            if pid == os.getpid():
                # We hold the in-process lock, so no thread of ours owns this file: it is
                # a leftover of an earlier process that had our pid.
                stale = True
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    stale = True
                except OSError:
                    pass
        if not stale:
            return False
        try:
            if os.stat(self.path).st_ino == st.st_ino:
                os.unlink(self.path)
                log.warning("broke stale lock %s (%s)", str(self.path), owner)
        except FileNotFoundError:
            pass
        return True

    def __enter__(self) -> DotLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HOSTNAME: str | None = None


def _hostname() -> str:
    global _HOSTNAME
    if _HOSTNAME is None:
        _HOSTNAME = socket.gethostname()
    return _HOSTNAME



def replace_locked(path: Path, data: bytes | Callable[[bytes | None], bytes | None],
                   mtime: float | None = None, break_lock: bool = False,
                   timeout: float = LOCK_TIMEOUT) -> bool:
    """Replace a small control file the way Dovecot does: write it as `<path>.lock`
    (which is also the lock), fsync, rename over `path`, fsync the directory.

    `data` may be a function of the current content (None when there is no file), called
    while the lock is held; it returns None to leave the file alone.  True if the file
    was replaced.  `break_lock`: remove a leftover lock file first (Dovecot does so for
    dovecot-keywords, which it only writes while holding the uid list lock).
    """
    lock = DotLock(path, timeout=timeout)
    if lock.held_here:
        raise RuntimeError(f"{lock.path} is held already: it cannot also be the new file")
    if break_lock:
        try:
            os.unlink(lock.path)
        except FileNotFoundError:
            pass
    fd = lock.acquire()
    renamed = False
    try:
        if callable(data):
            try:
                current: bytes | None = path.read_bytes()
            except FileNotFoundError:
                current = None
            data = data(current)
            if data is None:
                return False
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, data)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        os.fsync(fd)
        os.rename(lock.path, path)
        renamed = True
        fsync_directory(path.parent)
        return True
    finally:
        lock.release(unlink=not renamed)


# -- the uid list ------------------------------------------------------------------------------

class UidList:
    """The parsed dovecot-uidlist of one folder directory.

    Records are kept in uid order (uids only ever grow).  Not thread-safe: the folder
    serializes its use.
    """

    def __init__(self, folder_dir: Path, uidvalidity: int = 0, nextuid: int = 1,
                 guid: str | None = None) -> None:
        self.dir = Path(folder_dir)
        self.uidvalidity = uidvalidity
        self.nextuid = nextuid
        self.guid = guid or uuid.uuid4().hex
        self.header_ext: list[str] = []
        self.version = VERSION
        self.damaged = False
        self.stamp: FileStamp | None = None
        self._names: dict[int, str] = {}  # uid -> base name, in uid order
        self._uids: dict[str, int] = {}   # base name -> uid
        self._ext: dict[int, str] = {}    # uid -> its ext fields, verbatim

    # -- paths ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.dir / UIDLIST_NAME

    def lock(self) -> DotLock:
        """The dot-lock to hold while reading, changing and writing the list."""
        return DotLock(self.path)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def create(cls, folder_dir: Path, previous_uidvalidity: int | None = None) -> UidList:
        """A new empty list with a fresh UIDVALIDITY (not yet written)."""
        return cls(folder_dir, new_uidvalidity(previous_uidvalidity), 1)

    @classmethod
    def read(cls, folder_dir: Path) -> UidList | None:
        """The list on disk, or None if there is none (or it cannot be read at all)."""
        path = Path(folder_dir) / UIDLIST_NAME
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read %s: %s", str(path), e)
            return None
        ul = cls.parse(folder_dir, data)
        ul.stamp = FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)
        return ul

    @classmethod
    def parse(cls, folder_dir: Path, data: bytes) -> UidList:
        """Parse a version 1 or 3 file (2 is read like 1); damage is logged, not raised."""
        ul = cls(folder_dir)
        text = data.decode(*_ENCODING)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            ul._damage("empty file")
            return ul
        version = ul._parse_header(lines[0])
        last = 0
        for number, line in enumerate(lines[1:], start=2):
            # Fast path for the common v3 line "<uid> :<name>".
            head, sep, name = line.partition(" :")
            if sep and version == 3 and head.isdigit() and name and ":" not in name \
                    and "/" not in name and "\r" not in name and head[0] != "0":
                uid, ext, base = int(head), "", name
            else:
                parsed = _parse_record(line, version)
                if parsed is None:
                    ul._damage(f"line {number}: unparsable record {line[:80]!r}")
                    continue
                uid, ext, name = parsed
                base = base_name(name)
            if uid <= last or uid > MAX_UID:
                ul._damage(f"line {number}: uid {uid} out of order")
                continue
            last = uid
            old = ul._uids.get(base)
            if old is not None:
                # Dovecot keeps the later record when a file shows up twice.
                ul._damage(f"line {number}: {base} listed again (uid {old} -> {uid})")
                ul._drop(old)
            ul._names[uid] = base
            ul._uids[base] = uid
            if ext:
                ul._ext[uid] = ext
        if ul.nextuid <= last:
            # Dovecot appends its new records to a version 3 file without rewriting the
            # header's N, and reads the next uid as the last one's + 1: so do we, quietly
            # (marked damaged, every Dovecot APPEND cost a warning and a rewrite).
            if version not in (0, 3):
                ul._damage(f"next uid {ul.nextuid} not above last uid {last}")
            ul.nextuid = last + 1
        return ul

    def _parse_header(self, line: str) -> int:
        """Read the header line; the format version (0 when the header is unusable)."""
        fields = line.split()
        version = fields[0] if fields else ""
        if version == "1" or version == "2":
            try:
                self.uidvalidity, self.nextuid = int(fields[1]), int(fields[2])
            except (IndexError, ValueError):
                self._damage("bad version 1 header")
                self.uidvalidity, self.nextuid = 0, 1
                return 0
            self.version = 1
            return 1
        if version != "3":
            self._damage(f"unsupported header {line[:80]!r}")
            return 0
        for field in fields[1:]:
            key, value = field[:1], field[1:]
            try:
                if key == "V":
                    self.uidvalidity = int(value)
                elif key == "N":
                    self.nextuid = int(value)
                elif key == "G":
                    int(value, 16)
                    self.guid = value.lower()
                else:
                    self.header_ext.append(field)
            except ValueError:
                self._damage(f"bad header field {field!r}")
        if not 0 < self.uidvalidity <= MAX_UID or not 0 < self.nextuid <= MAX_UID + 1:
            self._damage(f"bad header {line[:80]!r}")
            self.uidvalidity = 0
            self.nextuid = max(self.nextuid, 1) if 0 < self.nextuid <= MAX_UID + 1 else 1
        return 3

    def _damage(self, what: str) -> None:
        self.damaged = True
        log.warning("damaged %s: %s", str(self.path), what)

    # -- contents ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, base: str) -> bool:
        return base in self._uids

    def mapping(self) -> Mapping[str, int]:
        """base name -> uid, read-only (for bulk lookups)."""
        return self._uids

    def lookup(self, base: str) -> int | None:
        """The uid of base name `base`, None if it has none."""
        return self._uids.get(base)

    def name(self, uid: int) -> str | None:
        return self._names.get(uid)

    def ext(self, uid: int) -> str:
        """The record's ext fields as written ("" when none)."""
        return self._ext.get(uid, "")

    def ext_fields(self, keys: str) -> dict[int, dict[str, str]]:
        """{uid: {key: value}} of the records carrying an ext field with one of the
        one-letter `keys` (Dovecot's P<pop3 uidl>, O<pop3 order>); the first field of a
        key counts, as in Dovecot.  Costs a pass over the records that have ext fields."""
        out: dict[int, dict[str, str]] = {}
        for uid, ext in self._ext.items():
            found: dict[str, str] = {}
            for field in ext.split(" "):
                if field and field[0] in keys:
                    found.setdefault(field[0], field[1:])
            if found:
                out[uid] = found
        return out

    def items(self) -> Iterator[tuple[int, str]]:
        """(uid, base name) in uid order."""
        return iter(self._names.items())

    def add(self, base: str) -> int:
        """Give `base` the next uid (or return the one it has)."""
        uid = self._uids.get(base)
        if uid is not None:
            return uid
        uid = self.nextuid
        if uid > MAX_UID:
            raise OverflowError(f"{self.path}: uids exhausted")
        self.nextuid = uid + 1
        self._names[uid] = base
        self._uids[base] = uid
        return uid

    def add_all(self, bases: Iterable[str]) -> None:
        """`add` each of `bases` in turn, in one go (a folder's first open gives a
        hundred thousand files their uids)."""
        fresh = list(dict.fromkeys(b for b in bases if b not in self._uids))
        first = self.nextuid
        if first + len(fresh) - 1 > MAX_UID:
            raise OverflowError(f"{self.path}: uids exhausted")
        uids = range(first, first + len(fresh))
        self._names.update(zip(uids, fresh))
        self._uids.update(zip(fresh, uids))
        self.nextuid = first + len(fresh)

    def put(self, uid: int, base: str) -> None:
        """Record `base` under a given `uid`, which must be above every listed uid (used
        when messages move to another folder together with their uids)."""
        if self._names and uid <= next(reversed(self._names)):
            raise ValueError(f"uid {uid} is not above the last listed uid")
        old = self._uids.get(base)
        if old is not None:
            self._drop(old)
        self._names[uid] = base
        self._uids[base] = uid
        self.nextuid = max(self.nextuid, uid + 1)

    def remove(self, uid: int) -> bool:
        """Forget `uid`; False if it was not listed."""
        if uid not in self._names:
            return False
        self._drop(uid)
        return True

    def _drop(self, uid: int) -> None:
        base = self._names.pop(uid)
        if self._uids.get(base) == uid:
            del self._uids[base]
        self._ext.pop(uid, None)

    # -- writing --------------------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The version 3 file."""
        head = [f"{VERSION} V{self.uidvalidity} N{self.nextuid} G{self.guid}", *self.header_ext]
        out = [" ".join(head), "\n"]
        ext = self._ext
        if not ext:  # no record fields (a list we made): one format per record
            out.extend(f"{uid} :{base}\n" for uid, base in self._names.items())
            return "".join(out).encode(*_ENCODING)
        for uid, base in self._names.items():
            fields = ext.get(uid)
            out.append(f"{uid} {fields} :{base}\n" if fields else f"{uid} :{base}\n")
        return "".join(out).encode(*_ENCODING)

    def write(self) -> None:
        """Atomically replace the file (hold `lock()` around read-modify-write)."""
        if not self.uidvalidity:
            raise ValueError("a uid list needs a UIDVALIDITY before it is written")
        tmp = self.dir / UIDLIST_TMP_NAME
        unlink_quietly(tmp)   # a crashed writer's leftover: the name is Dovecot's, fixed
        write_durably(self.path, self.serialize(), tmp=tmp)
        self.stamp = FileStamp.of(self.path)
        self.version = VERSION
        self.damaged = False


def _parse_record(line: str, version: int) -> tuple[int, str, str] | None:
    """(uid, ext fields, file name) of one record line, None if it is not one."""
    if version == 3 or (version == 0 and " :" in line):
        head, sep, name = line.partition(" :")
        if not sep:
            return None
        uid_s, _, ext = head.partition(" ")
        ext = " ".join(f for f in ext.split() if "A" <= f[0] <= "Z")
    else:
        parts = line.split(" ")
        if len(parts) < 2:
            return None
        uid_s, ext, name = parts[0], "", parts[-1]
    if not uid_s.isdigit() or not name or "/" in name or "\r" in name:
        return None
    uid = int(uid_s)
    if uid == 0:
        return None
    return uid, ext, name
