"""Durable delivery of one message into one or more Maildirs.

The ordering is what makes "250 OK" safe:

1. the message streams into a file without a name (O_TMPFILE, mode 0600) created in the
   first target's new/; where the system has no O_TMPFILE, into a tmp/ file (O_EXCL);
2. commit: flush, fsync the file;
3. link it into every target's new/ (a file without a name through /proc/self/fd; or
   copy via that target's tmp/ with its own fsync when links cannot cross); a tmp/ file
   is linked into the other targets, then renamed into its own Maildir's new/;
4. fsync each new/ directory once;
5. only then fire the Deferred, so the caller replies 250 on it.

So new/ only ever receives complete, fsynced files: a crash at any moment leaves nothing
(a file without a name disappears with its descriptor) or, on the tmp/ path, a leftover
in tmp/ that `MaildirStore.clean_tmp` removes later.  The file without a name also spares
the directory work of a tmp/ entry and a rename for every message.  On the tmp/ path the
rename into the file's own Maildir comes last so that a reader moving the message out of
new/ (an IMAP session, POP3) can never pull the source away from under the links.
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.fsutil import (can_sync_filesystem, fsync_directory, sync_by_filesystem,
                               unlink_quietly, write_all)
from mailserver.maildir import quota as quota_file
from mailserver.maildir.flags import escape_hostname  # noqa: F401 (imported from here too)
from mailserver.maildir.names import normalized
from mailserver.maildir.newfiles import (  # noqa: F401 (imported from here too)
    FLUSH_THRESHOLD,
    unique_base,
)
from mailserver.maildir.newfiles import OPEN_FLAGS as _OPEN_FLAGS

log = Logger()

_COPY_CHUNK = 256 * 1024
_LINK_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM})

# Files without a name need O_TMPFILE (Linux 3.11, ext4/xfs/btrfs/tmpfs) and /proc to
# give them one; elsewhere (or if the file system refuses) deliveries use tmp/ files.
_anonymous_files = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
_ANON_FLAGS = os.O_RDWR | getattr(os, "O_TMPFILE", 0) | os.O_CLOEXEC
_ANON_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
_root_fd = -1


def _link_fd(fd: int, dest: Path) -> None:
    """Give the open file `fd` the name `dest` (linkat through /proc/self/fd)."""
    global _root_fd
    if _root_fd < 0:
        _root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # A directory fd makes Python call linkat (with AT_SYMLINK_FOLLOW) rather than link();
    # the absolute source path ignores it.
    os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=_root_fd, follow_symlinks=True)


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome for one target Maildir: `path` is where the message file lies."""

    target: Path
    ok: bool
    path: Path | None
    error: BaseException | None



def sync_directories(dirs: Sequence[Path], whole_filesystems: bool = False
                     ) -> dict[Path, OSError]:
    """Make the directories' entries durable; the errors by directory (empty when all
    went well).  fsync each directory once, or, with `whole_filesystems` and several of
    them, sync each file system they lie on once (one device flush for all)."""
    errors: dict[Path, OSError] = {}
    unique = list(dict.fromkeys(dirs))
    if whole_filesystems and len(unique) > 1 and can_sync_filesystem():
        return sync_by_filesystem(unique, lambda d: os.stat(d).st_dev, lambda d: d)
    for d in unique:
        try:
            fsync_directory(d)
        except OSError as e:
            errors[d] = e
    return errors


@dataclass
class Placement:
    """Files placed in new/ whose directories still need an fsync.

    Split from the fsync step so that a batcher can place many deliveries, fsync the union
    of their directories once, then call `finish` on each.
    """

    targets: list[Path]
    outcomes: dict[Path, tuple[Path | None, BaseException | None]] = field(default_factory=dict)

    @property
    def dirs(self) -> list[Path]:
        # every placed file is <its key>/new/<name>
        return list(dict.fromkeys(new_dir(key) for key, (p, _) in self.outcomes.items()
                                  if p is not None))

    def finish(self, dir_errors: dict[Path, OSError]) -> list[DeliveryResult]:
        """One result per target, in target order, after the directories were synced.

        A placed file whose directory fsync failed is reported as failed (and left in
        place): a duplicate after the client retries is better than a lost message.
        """
        results = []
        for target in self.targets:
            key = _key(target)
            path, error = self.outcomes[key]
            if path is not None and error is None and new_dir(key) in dir_errors:
                error = dir_errors[new_dir(key)]
            results.append(DeliveryResult(target, error is None, path, error))
        return results


def _key(target: Path) -> Path:
    return normalized(target)


@functools.lru_cache(maxsize=4096)
def new_dir(target: Path) -> Path:
    """`target / "new"`, one Path object per Maildir: a message's every step asks for it
    (create, link, sync, report), and a fresh Path each time costs its parsing and hashing
    again."""
    return target / "new"


class Delivery:
    """One message on its way into one or more Maildirs, streamed through a tmp/ file.

    Created by `MaildirStore.begin_delivery`.  `write` from the reactor thread as data
    arrives, then `commit` (disk work in a commit thread or process) or `abort`.  A repeated target gets
    the same file and result as its first occurrence: one copy per Maildir.
    """

    def __init__(self, targets: Sequence[Path], escaped_host: str,
                 on_committed: Callable[[list[Path]], None] | None = None,
                 committer: Any = None, info: str = "", quota: Any = None) -> None:
        if not targets:
            raise ValueError("a delivery needs at least one target")
        self.targets = [t if isinstance(t, Path) else Path(t) for t in targets]
        self._on_committed = on_committed
        self._committer = committer  # Group/ProcessCommitter, else a pool thread per commit
        self._unique = list(dict.fromkeys(_key(t) for t in self.targets))
        # The store's QuotaTracker: each target's user Maildir, whose maildirsize gets a
        # change line in the commit work, and which is told once the commit is done.
        self._quota = quota
        self._quota_roots: dict[Path, Path] = {}
        if quota is not None:
            for key in self._unique:
                root = quota.root_of(key)
                if root is not None:
                    self._quota_roots[key] = root
        self._buffer = bytearray()
        self._size = 0
        self._error: OSError | None = None
        self._state = "open"
        self._synced = False
        self._escaped_host = escaped_host
        # ":2,<flags>" for a message placed with flags or keywords (a Junk delivery's
        # $Junk letter); a sync keeps it when it moves the file to cur/.
        self._info = info
        # The tmp file is created when the first buffer is flushed: a message that fits
        # in the buffer touches the disk only in the commit thread, never in the reactor.
        self._fd = -1
        self._home: Path | None = None
        self._base = ""
        self._tmp_path: Path | None = None

    def _open(self) -> None:
        if self._fd < 0 and self._home is None:
            self._fd, self._home, self._base, named = self._create_tmp(self._escaped_host)
            self._tmp_path = self._home / "tmp" / self._base if named else None

    def _create_tmp(self, escaped_host: str) -> tuple[int, Path, str, bool]:
        """Open a fresh file without a name in the first target's new/, or a tmp/ file
        in the first target whose tmp/ accepts one; (fd, target, base, named)."""
        global _anonymous_files
        last: OSError | None = None
        for target in self._unique:
            if _anonymous_files:
                try:
                    fd = os.open(new_dir(target), _ANON_FLAGS, 0o600)
                    return fd, target, unique_base(escaped_host), False
                except OSError as e:
                    if e.errno in _ANON_UNSUPPORTED:
                        log.info("no O_TMPFILE on {path} ({error}): delivering via tmp/",
                                 path=str(target), error=e)
                        _anonymous_files = False
            for _ in range(5):
                base = unique_base(escaped_host)
                try:
                    return os.open(target / "tmp" / base, _OPEN_FLAGS, 0o600), target, base, True
                except FileExistsError as e:
                    last = e
                except OSError as e:
                    last = e
                    break
        assert last is not None
        log.warn("cannot create a tmp file in any target Maildir: {error}", error=last)
        raise last

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def tmp_path(self) -> Path | None:
        """The tmp/ file the message is being written to (None until the first flush,
        and None for a file without a name)."""
        return self._tmp_path

    def write(self, data: bytes) -> None:
        """Append `data`, keeping at most about FLUSH_THRESHOLD bytes in memory.

        A disk error does not raise here (the protocol is mid-DATA); it is kept and makes
        every target fail at commit.
        """
        if self._state != "open":
            raise RuntimeError(f"delivery is {self._state}")
        self._size += len(data)
        if self._error is not None:
            return
        if len(self._buffer) + len(data) < FLUSH_THRESHOLD:
            self._buffer += data
            return
        try:
            self._open()
            self._write_all(self._buffer)
            self._buffer.clear()
            self._write_all(data)
        except OSError as e:
            self._fail(e)

    def _write_all(self, data: bytes | bytearray) -> None:
        write_all(self._fd, data)

    def _fail(self, error: OSError) -> None:
        log.error("writing {path} failed: {error}", path=str(self._tmp_path or self.targets[0]),
                  error=error)
        self._error = error
        self._buffer = bytearray()

    def commit(self) -> Deferred[list[DeliveryResult]]:
        """Store the message durably; fires with one DeliveryResult per target.

        Fires only after the file and directory fsyncs, so a 250 sent on it is true.
        """
        if self._state != "open":
            raise RuntimeError(f"delivery is {self._state}")
        self._state = "committing"
        if self._committer is not None:
            d = self._committer.commit(self)
            d.addCallback(self._log_failures)
        else:
            d = deferToThread(self._commit_sync)
        if self._on_committed is not None or self._quota is not None:
            def tell(results: list[DeliveryResult]) -> list[DeliveryResult]:
                if self._on_committed is not None:
                    self._on_committed([r.target for r in results if r.ok])
                if self._quota is not None:
                    self._quota.stored(self._quota_roots_of(results), self._size)
                return results
            d.addCallback(tell)
        return d

    def _quota_roots_of(self, results: list[DeliveryResult]) -> dict[Path, int]:
        """The user Maildirs that got the message, each with the number of its folders
        that did (a Sieve fileinto into two folders and keep: three files, as a
        recount of the Maildir counts them)."""
        roots: dict[Path, int] = {}
        counted: set[Path] = set()
        for r in results:
            key = _key(r.target)
            root = self._quota_roots.get(key) if r.ok and key not in counted else None
            if root is not None:
                counted.add(key)
                roots[root] = roots.get(root, 0) + 1
        return roots

    def record_quota(self, results: list[DeliveryResult]) -> None:
        """Thread or commit process, after the directory sync: a change line (size, 1)
        in the maildirsize of each user Maildir that got the message (Maildir++)."""
        for root, files in self._quota_roots_of(results).items():
            try:
                quota_file.append_delta(root, self._size * files, files)
            except Exception as e:  # the message is stored: never fail its delivery here
                log.error("cannot record {size} bytes in the quota of {root}: {error}",
                          size=self._size, root=str(root), error=e)

    def abort(self) -> None:
        """Drop the message: close and remove the tmp file.  Idempotent; no-op after commit."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = bytearray()
        self._close()
        if self._tmp_path is not None:
            unlink_quietly(self._tmp_path)

    # -- the thread side --------------------------------------------------------------

    def _commit_sync(self) -> list[DeliveryResult]:
        """All the blocking work of `commit`: place the file, then fsync the directories."""
        placement = self._commit_place()
        results = placement.finish(sync_directories(placement.dirs))
        self.record_quota(results)
        return self._log_failures(results)

    def _commit_place(self) -> Placement:
        """The blocking work of `commit` up to the directory fsync (a group committer
        does that once for many deliveries)."""
        if self._state not in ("open", "committing"):
            raise RuntimeError(f"delivery is {self._state}")
        self._state = "committing"
        placement = self._place()
        self._state = "committed"
        return placement

    @staticmethod
    def _log_failures(results: list[DeliveryResult]) -> list[DeliveryResult]:
        for r in results:
            if not r.ok:
                log.warn("delivery to {target} failed: {error}", target=str(r.target),
                         error=r.error)
        return results

    # The three stages of a commit.  A group committer runs each stage for every message
    # of the group before the next one: with all files written before the first fsync,
    # that fsync's journal commit carries the others' data too, and theirs cost little.

    def stage_write(self) -> None:
        """Write what is buffered to the tmp file (created now if need be)."""
        if self._error is None:
            try:
                self._open()
                self._write_all(self._buffer)
                self._buffer = bytearray()
            except OSError as e:
                self._error = e

    def stage_sync(self) -> None:
        """fsync the file's data."""
        if self._error is None and not self._synced:
            try:
                os.fsync(self._fd)
                self._synced = True
            except OSError as e:
                self._error = e

    # -- a commit done by another process (see commit_process) ----------------------------

    def commit_request(self) -> tuple[dict[str, Any], int, bytes] | None:
        """Describe this delivery for a commit process: (description, the file's
        descriptor to pass along or -1, the message bytes when it is still all in memory).

        A message that fit in the memory buffer travels as bytes and the commit process
        creates its file; a larger one is in its file already (the rest of the buffer is
        written now) and travels as the descriptor.  None if writing failed: the local
        commit then reports the error for every target.
        """
        description: dict[str, Any] = {"targets": [str(t) for t in self.targets],
                                       "size": self._size}
        if self._info:
            description["info"] = self._info
        if self._quota_roots:
            description["quota"] = {str(k): str(r) for k, r in self._quota_roots.items()}
        if self._fd < 0 and self._home is None and self._error is None:
            description["host"] = self._escaped_host
            return description, -1, bytes(self._buffer)
        self.stage_write()
        if self._error is not None or self._home is None:
            return None
        description.update(home=str(self._home), base=self._base,
                           tmp=None if self._tmp_path is None else str(self._tmp_path))
        return description, self._fd, b""

    @classmethod
    def adopt(cls, request: dict[str, Any], fd: int, content: bytes) -> Delivery:
        """The commit process's side of `commit_request`: the delivery whose file is `fd`
        (written), or whose bytes are `content` (its file is created by `stage_write`)."""
        # normalized: the same Path objects for every message to a Maildir (its targets
        # are the server's own, already in that form)
        delivery = cls([normalized(t) for t in request["targets"]], str(request.get("host", "")),
                       info=str(request.get("info", "")))
        delivery._size = int(request["size"])
        delivery._quota_roots = {normalized(k): Path(r)
                                 for k, r in dict(request.get("quota") or {}).items()}
        if fd >= 0:
            delivery._fd = fd
            delivery._home = Path(request["home"])
            delivery._base = str(request["base"])
            delivery._tmp_path = Path(request["tmp"]) if request.get("tmp") else None
        else:
            delivery._buffer = bytearray(content)
        delivery._state = "committing"
        return delivery

    def handed_over(self) -> None:
        """The commit process holds the file now: close this process's descriptor."""
        self._close()

    def message_name(self) -> str:
        """The file name the message gets in every new/ directory."""
        return f"{self._base},S={self._size}{self._info}"

    # -- a file without a name made ahead (lone_commit) -----------------------------------

    def file_dir(self) -> Path | None:
        """The new/ directory this delivery's file without a name would be created in (its
        first target's), while it has no file yet; None once it has one, or where files
        without a name cannot be made."""
        if self._fd >= 0 or self._home is not None or self._error is not None:
            return None
        return new_dir(self._unique[0]) if _anonymous_files else None

    def take_file(self, fd: int) -> None:
        """Make `fd`, a file without a name open for writing in `file_dir()` (see
        `file_without_name`), this delivery's file (in the commit thread, before
        `stage_write`)."""
        self._fd, self._home = fd, self._unique[0]
        self._base = unique_base(self._escaped_host)


    @property
    def unsynced_fd(self) -> int:
        """The file's descriptor while it is written but not yet synced, else -1."""
        return self._fd if self._error is None and not self._synced else -1

    def synced_with_filesystem(self, error: OSError | None) -> None:
        """Its whole file system was synced instead of this file (a group committer does
        that for many files at once): the file is durable, or the sync's error is ours."""
        if self._error is None and not self._synced:
            if error is None:
                self._synced = True
            else:
                self._error = error

    def _place(self) -> Placement:
        """Flush and fsync the file, then link/copy/rename it into every new/ directory."""
        self.stage_write()
        self.stage_sync()
        placement = Placement(self.targets)
        error: BaseException | None = self._error
        if error is not None:
            self._close()
            if self._tmp_path is not None:
                unlink_quietly(self._tmp_path)
            for key in self._unique:
                placement.outcomes[key] = (None, error)
            return placement

        name = self.message_name()
        if self._tmp_path is None:  # a file without a name: link it everywhere, then close
            for key in self._unique:
                try:
                    placement.outcomes[key] = (self._link_anonymous(key, name), None)
                except OSError as e:
                    placement.outcomes[key] = (None, e)
            self._close()
            return placement
        self._close()
        for key in self._unique:
            if key == self._home:
                continue
            try:
                placement.outcomes[key] = (self._link_or_copy(key, name), None)
            except OSError as e:
                placement.outcomes[key] = (None, e)
        dest = new_dir(self._home) / name
        try:
            os.rename(self._tmp_path, dest)
            placement.outcomes[self._home] = (dest, None)
        except OSError as e:
            placement.outcomes[self._home] = (None, e)
            unlink_quietly(self._tmp_path)
        return placement

    def _link_anonymous(self, target: Path, name: str) -> Path:
        """Name the fsynced file without a name in target's new/, or copy it there."""
        dest = new_dir(target) / name
        try:
            _link_fd(self._fd, dest)
            return dest
        except OSError as e:
            if e.errno not in _LINK_FALLBACK_ERRNOS:
                raise
        fd = self._fd

        def chunks() -> Any:
            pos = 0
            while chunk := os.pread(fd, _COPY_CHUNK, pos):
                yield chunk
                pos += len(chunk)
        return self._copy_into(target, name, chunks())

    def _link_or_copy(self, target: Path, name: str) -> Path:
        """Hard-link the fsynced tmp file into target's new/, or copy it if links fail."""
        dest = new_dir(target) / name
        try:
            os.link(self._tmp_path, dest)
            return dest
        except OSError as e:
            if e.errno not in _LINK_FALLBACK_ERRNOS:
                raise

        def chunks() -> Any:
            with open(self._tmp_path, "rb") as src:  # type: ignore[arg-type]
                while chunk := src.read(_COPY_CHUNK):
                    yield chunk
        return self._copy_into(target, name, chunks())

    @staticmethod
    def _copy_into(target: Path, name: str, chunks: Any) -> Path:
        """Copy into target's new/ via its tmp/, with its own fsync (links cannot cross)."""
        dest = new_dir(target) / name
        copy_tmp = target / "tmp" / name
        out = os.open(copy_tmp, _OPEN_FLAGS, 0o600)
        try:
            try:
                for chunk in chunks:
                    write_all(out, chunk)
                os.fsync(out)
            finally:
                os.close(out)
            os.rename(copy_tmp, dest)
        except BaseException:
            unlink_quietly(copy_tmp)
            raise
        return dest

    def _close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


def file_without_name(directory: Path) -> int:
    """A new file without a name (O_TMPFILE, mode 0600) open for writing in `directory`,
    as a delivery makes one (blocking: for a thread)."""
    return os.open(directory, _ANON_FLAGS, 0o600)
