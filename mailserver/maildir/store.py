"""The Maildir root: where each user's Maildir++ lives, and how deliveries start.

Layout: `<root>/<domain>/<localpart>/` is a user's INBOX (cur/ new/ tmp/); folders are
`.Name` children with their own cur/ new/ tmp/ and an empty `maildirfolder` file, exactly
as Dovecot lays them out.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.fsutil import fsync_directory, write_durably
from mailserver.maildir import quota as quota_file
from mailserver.maildir.commit_process import ProcessCommitter
from mailserver.maildir.commit_process import available as commit_process_available
from mailserver.maildir.committer import GroupCommitter
from mailserver.maildir.delivery import Delivery, escape_hostname
from mailserver.maildir.folder_disk import FolderError, NoSuchFolder
from mailserver.maildir.names import (
    INBOX,
    SUBSCRIPTIONS_FILE,
    check_path_component,
    folder_dir,
    format_subscriptions,
    is_inside,
    normalized,
)
from mailserver.maildir.quota import Usage

if TYPE_CHECKING:
    from mailserver.maildir.account import MailAccount
    from mailserver.maildir.folder import Folder
    from mailserver.maildir.shared_folder import SharedStorage

log = Logger()

DEFAULT_FOLDERS = ("Sent", "Drafts", "Trash", "Junk", "Archive")
MAILDIR_SUBDIRS = ("cur", "new", "tmp")
# A folder being made, in the Maildir's tmp/ until it is complete (account.py).
STAGED_FOLDER_PREFIX = ".folder."
TMP_MAX_AGE = 36 * 3600  # the Maildir spec's limit for files left in tmp/
USER_PATHS_MAX = 4096  # users whose Maildir path is remembered
INDEX_IDLE_SECONDS = 2.0  # a folder index unused this long is closed (reopened on use)


class MaildirStore:
    """All Maildirs under one root directory."""

    folder_dir = staticmethod(folder_dir)

    def __init__(self, root: Path, hostname: str | None = None,
                 commit_process: bool = False, shared: SharedStorage | None = None) -> None:
        # commit_process: deliveries committed by a child process (the server does that;
        # tests and tools commit in a thread of their own)
        self.commit_process = commit_process
        # [storage] shared: other nodes use the root too (maildir/shared_folder.py)
        self.shared = shared
        self.root = normalized(root)
        self.hostname = hostname or socket.gethostname()
        self._escaped_host = escape_hostname(self.hostname)
        self._accounts: dict[Path, MailAccount] = {}
        self._committer: GroupCommitter | ProcessCommitter | None = None
        self._user_paths: dict[tuple[str, str], Path] = {}
        self.quota = QuotaTracker(self)
        # Told the directory of a folder this process changed durably (a delivery, or a
        # Folder's own edit: APPEND, STORE, EXPUNGE, COPY): mailserver.crossnode.
        self.change_observers: list[Callable[[Path], None]] = []

    def user_path(self, domain: str, localpart: str) -> Path:
        """The Maildir of `localpart@domain`; ValueError if either is unsafe on disk.

        The same Path object each time for a user (remembered), so the tables keyed by it
        hash it once.
        """
        known = self._user_paths.get((domain, localpart))
        if known is not None:
            return known
        path = self._user_path(domain, localpart)
        if len(self._user_paths) >= USER_PATHS_MAX:
            self._user_paths.clear()
        self._user_paths[(domain, localpart)] = path
        return path

    def _user_path(self, domain: str, localpart: str) -> Path:
        check_path_component(domain, "domain")
        check_path_component(localpart, "local part")
        path = self.root / domain / localpart
        if not is_inside(path, self.root) or path.parent.parent != self.root:
            raise ValueError(f"mailbox path escapes the maildir root: {domain!r}/{localpart!r}")
        return path

    def ensure_user(self, domain: str, localpart: str) -> Deferred[Path]:
        """The user's Maildir, created in a thread when it is not there yet (the first
        login of a user added with mailserver-admin before any mail came)."""
        path = self.user_path(domain, localpart)
        if (path / "cur").is_dir():
            return succeed(path)
        return deferToThread(self.create_user, domain, localpart)

    def warm_inbox(self, domain: str, localpart: str) -> None:
        """Start loading the user's INBOX if it is not in memory yet.

        Called while a login's password is being verified: the first open of a large
        Maildir (a listing and a stat per file) then runs in the folder's thread beside the
        verification in the hashing pool, instead of after it.  Grants, locks and creates
        nothing; a user without a Maildir yet is left to the login's ensure_user.
        """
        try:
            path = self.user_path(domain, localpart)
            if not (path / "cur").is_dir():
                return
            folder = self.account(path).folder("INBOX")
        except (ValueError, OSError, FolderError):
            return
        if folder.loaded:
            return   # the login's own refresh costs a few stat() calls
        folder.refresh().addErrback(lambda f: None if f.check(FolderError) else log.failure(
            "loading {path} ahead of a login failed", f, path=str(folder.path)))

    def create_user(self, domain: str, localpart: str) -> Path:
        """Create the user's Maildir++ with the default folders; keep whatever exists.

        Blocking (a few mkdirs): call it from the admin tool or via deferToThread.
        """
        path = self.user_path(domain, localpart)
        synced: set[Path] = set()
        if not self.root.is_dir():
            os.makedirs(self.root, 0o700, exist_ok=True)
        for d in (self.root / domain, path):
            if _mkdir(d):
                synced.add(d.parent)
        for sub in MAILDIR_SUBDIRS:
            if _mkdir(path / sub):
                synced.add(path)
        for name in DEFAULT_FOLDERS:
            fdir = folder_dir(path, name)
            if _mkdir(fdir):
                synced.add(path)
            for sub in MAILDIR_SUBDIRS:
                if _mkdir(fdir / sub):
                    synced.add(fdir)
            if _create_file(fdir / "maildirfolder", b"", fdir / "tmp"):
                synced.add(fdir)
        subscriptions = format_subscriptions((INBOX, *DEFAULT_FOLDERS))
        if _create_file(path / SUBSCRIPTIONS_FILE, subscriptions, path / "tmp"):
            synced.add(path)
        for d in synced:
            fsync_directory(d)
        return path

    def begin_delivery(self, targets: Sequence[Path], info: str = "") -> Delivery:
        """Start one message for the Maildirs `targets` (each a user's INBOX or a folder).

        Creates the tmp file at once (OSError if no target's tmp/ accepts it, which the
        caller reports as a temporary failure).
        """
        for t in targets:
            if not is_inside(t, self.root):
                raise ValueError(f"delivery target outside the maildir root: {t}")
        if self._committer is None:
            self._committer = self._new_committer()
        return Delivery(targets, self._escaped_host, self._delivered, self._committer,
                        info=info, quota=self.quota)

    def _new_committer(self) -> GroupCommitter | ProcessCommitter:
        if self.commit_process and commit_process_available():
            return ProcessCommitter()
        return GroupCommitter()

    def new_folder(self, path: Path, name: str, escaped_host: str) -> Folder:
        """The Folder object of a folder directory (MailAccount keeps one per folder)."""
        if self.shared is not None:
            return self.shared.folder(path, name, escaped_host)
        from mailserver.maildir.folder import Folder
        return Folder(path, name, escaped_host)

    def account(self, user_path: Path) -> MailAccount:
        """The folder tree of the Maildir at `user_path`: one per user and process, so
        every session shares its Folder objects."""
        from mailserver.maildir.account import MailAccount

        key = normalized(user_path)
        if not is_inside(key, self.root):
            raise ValueError(f"mailbox path outside the maildir root: {user_path}")
        account = self._accounts.get(key)
        if account is None:
            account = self._accounts[key] = MailAccount(self, key)
        return account

    def notify_delivered(self, paths: Iterable[Path]) -> None:
        """Tell open folders that SMTP just committed mail into `paths` (each a user's
        Maildir or one of its folders), so their sessions hear of it at once.

        Folders not in memory are left alone (not loaded for this): they see the mail
        when they are opened.  A folder still loading refreshes right after its load.
        """
        for path in paths:
            key = normalized(path)
            account = self._accounts.get(key) or self._accounts.get(key.parent)
            folder = account.folder_at(key) if account is not None else None
            if folder is None or not folder.watched:
                continue  # nobody listens: whoever opens it next finds the mail on disk
            folder.refresh_soon()

    def _delivered(self, paths: list[Path]) -> None:
        self.notify_delivered(paths)
        for path in paths:
            self.folder_changed(path)

    def folder_changed(self, path: Path) -> None:
        """This process changed the folder at `path` durably: tell the observers."""
        for observer in self.change_observers:
            try:
                observer(path)
            except Exception:
                log.failure("change observer {observer} failed", observer=observer)

    def refresh_watched(self, force: bool = False) -> int:
        """Refresh every folder a session listens to (changes may have gone unheard);
        how many."""
        count = 0
        for account in list(self._accounts.values()):
            for folder in account.loaded_folders():
                if folder.watched:
                    count += 1
                    folder.refresh(force).addErrback(
                        lambda f, p=str(folder.path): None if f.check(NoSuchFolder)
                        else log.failure("refresh of {path} failed", f, path=p))
        return count

    def close_idle_indexes(self, idle: float = INDEX_IDLE_SECONDS) -> None:
        """Close the index files of folders unused for `idle` seconds: each open SQLite
        connection holds about 150 KiB, and a thousand users idling in their INBOX must
        not cost two each.  Run periodically by the service."""
        for account in list(self._accounts.values()):
            for folder in account.loaded_folders():
                d = folder.close_idle_index(idle)
                if d is not None:
                    d.addErrback(lambda f, p=str(folder.path): log.failure(
                        "closing the index of {path} failed", f, path=p))

    def clean_tmp(self, max_age: float = TMP_MAX_AGE) -> Deferred[int]:
        """Remove tmp/ files untouched for `max_age` seconds, in a thread; fires with the count."""
        return deferToThread(self._clean_tmp_sync, max_age)

    def _clean_tmp_sync(self, max_age: float = TMP_MAX_AGE, now: float | None = None) -> int:
        limit = (time.time() if now is None else now) - max_age
        removed = 0
        for tmp in self._tmp_dirs():
            try:
                with os.scandir(tmp) as it:
                    entries = list(it)
            except OSError as e:
                log.warn("cannot scan {dir}: {error}", dir=str(tmp), error=e)
                continue
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        if (entry.name.startswith(STAGED_FOLDER_PREFIX)
                                and entry.is_dir(follow_symlinks=False)
                                and entry.stat(follow_symlinks=False).st_mtime < limit):
                            shutil.rmtree(entry.path)   # a folder a crash left half made
                            removed += 1
                        continue
                    st = entry.stat(follow_symlinks=False)
                    # ctime too: mtime can be set back, ctime moves with every write.
                    if max(st.st_mtime, st.st_ctime) < limit:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as e:
                    log.warn("cannot clean {path}: {error}", path=entry.path, error=e)
        if removed:
            log.info("removed {count} stale tmp files", count=removed)
        return removed

    def _tmp_dirs(self) -> Iterator[Path]:
        """Every tmp/ of every user's INBOX and folders."""
        for domain in _subdirs(self.root):
            if domain.name.startswith("."):
                continue
            for user in _subdirs(domain):
                if user.name.startswith("."):
                    continue
                yield user / "tmp"
                for folder in _subdirs(user):
                    if folder.name.startswith("."):
                        yield folder / "tmp"


QUOTA_FRESH_SECONDS = 2.0  # a usage read from maildirsize is trusted this long
QUOTA_ENTRIES_MAX = 4096   # users whose usage is kept in memory


class _QuotaEntry:
    """What the tracker knows of one user's Maildir."""

    __slots__ = ("usage", "limit", "read_at", "loading", "loading_limit", "waiters",
                 "since", "unsure", "lane", "batch", "warned")

    def __init__(self) -> None:
        self.usage: Usage | None = None   # with this process's changes since the read
        self.limit: int | None = None     # the limit it was last asked against
        self.read_at = float("-inf")      # when maildirsize was read (monotonic)
        self.loading = False              # a read is under way ...
        self.loading_limit: int | None = None
        self.waiters: list[Deferred[Usage]] = []  # ... and these wait for it
        self.since = (0, 0)               # changes counted while it runs
        self.unsure = False               # a delivery was counted while it ran
        self.lane: Deferred[Any] = succeed(None)  # this user's disk work, in order
        self.batch: list[int] | None = None       # change lines not yet written
        self.warned: bool | None = None   # the 90% mark is set (None: not known)


class QuotaTracker:
    """Each user's usage for quota checks, shared by every service of the process: SMTP
    RCPT, local retries from the queue, IMAP APPEND/COPY and GETQUOTA.

    The truth is the Maildir's maildirsize (quota.py), kept by every writer with a change
    line: deliveries write theirs in their commit work (Delivery.record_quota), so do
    other programs that know Maildir++.  Here it is read in a thread and kept in memory;
    this process's changes are added as they happen (`changed`, `stored`), and a read
    older than QUOTA_FRESH_SECONDS is repeated at the next question, which is how other
    processes' changes arrive.  A check that cannot wait (IMAP's literal) takes the last
    known usage (`peek`) and starts a read if it is old.

    Change lines of this process's own (APPEND, COPY, EXPUNGE, POP3 DELE) are appended
    in a thread, one line per user for whatever gathered meanwhile, in one queue per user
    ("lane") with the reads: a read never misses a change made before it was asked for,
    and a change made while it runs is added to its result.  A delivery counted while a
    read runs may or may not be in what it read: that read is used but not trusted as
    fresh.  Crossing 90% of the limit delivers one warning to the user (`quota.py`).
    """

    def __init__(self, store: "MaildirStore", clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._store = store
        self._clock = clock
        self._entries: dict[Path, _QuotaEntry] = {}
        self._reserved: dict[Path, int] = {}
        self.fresh_seconds = QUOTA_FRESH_SECONDS

    def root_of(self, path: Path) -> Path | None:
        """The user's Maildir that `path` (a Maildir or one of its `.Folder`s) belongs
        to; None outside the users' Maildirs."""
        key = normalized(path)
        root = self._store.root
        if key.parent.parent == root:
            return key
        if (key.parent.parent.parent == root and key.name.startswith(".")
                and not key.name.startswith("..")):
            return key.parent
        return None

    # -- questions -----------------------------------------------------------------------

    def usage(self, root: Path, limit: int | None) -> Deferred[Usage]:
        """The usage of the Maildir `root` against `limit` (bytes, None: none): from memory
        when fresh, else read from maildirsize (recalculated when it must be)."""
        entry = self._entry(root)
        if entry.usage is not None and entry.limit == limit and self._fresh(entry):
            return succeed(entry.usage)
        return self._load(root, entry, limit)

    def fresh(self, root: Path, limit: int | None) -> bool:
        """True when `usage` would answer from memory."""
        entry = self._entries.get(root)
        return (entry is not None and entry.usage is not None and entry.limit == limit
                and self._fresh(entry))

    def peek(self, root: Path) -> Usage | None:
        """The last known usage, at once (None: never read); an old one is read again
        in the background for the next question."""
        entry = self._entries.get(root)
        if entry is None or entry.usage is None:
            return None
        if not entry.loading and not self._fresh(entry):
            self._load(root, entry, entry.limit).addErrback(lambda f: None)  # logged there
        return entry.usage

    def reserved(self, root: Path) -> int:
        """Bytes that commands under way (IMAP APPEND, COPY) have checked and not yet
        stored: counted by their next check, so parallel ones cannot all pass it."""
        return self._reserved.get(root, 0)

    def reserve(self, root: Path, nbytes: int) -> Callable[[], None]:
        """Hold `nbytes` (see `reserved`) until the returned function is called, once the
        command has counted what it stored (or stored nothing)."""
        self._reserved[root] = self._reserved.get(root, 0) + nbytes
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                left = self._reserved.get(root, 0) - nbytes
                if left > 0:
                    self._reserved[root] = left
                else:
                    self._reserved.pop(root, None)
        return release

    def is_full(self, root: Path, limit: int) -> bool:
        """From memory (`peek`): at or over `limit`; an unknown usage is not full."""
        usage = self.peek(root)
        return usage is not None and usage.bytes >= limit

    # -- changes ---------------------------------------------------------------------------

    def changed(self, root: Path, nbytes: int, count: int) -> None:
        """This process added or removed mail other than by a delivery (IMAP APPEND, COPY,
        EXPUNGE; POP3 DELE): counted now, its change line written in a thread."""
        entry = self._entry(root)
        self._count(entry, nbytes, count, sure=True)
        batch = entry.batch
        if batch is not None:  # a line waiting for its turn: this change joins it
            batch[0] += nbytes
            batch[1] += count
        else:
            batch = entry.batch = [nbytes, count]

            def flush(_: Any) -> Deferred[bool] | None:
                if entry.batch is batch:
                    entry.batch = None  # later changes: a line of their own, after this
                if not (batch[0] or batch[1]):
                    return None
                return deferToThread(quota_file.append_delta, root, batch[0], batch[1])
            self._lane(entry, flush).addErrback(_logged, "writing the quota usage of", root)
        self._consider_warning(root, entry)

    def stored(self, roots: Mapping[Path, int], size: int) -> None:
        """A delivery of `size` bytes was committed into these Maildirs, as that many
        files each: counted (their change lines were written by the commit work)."""
        for root, files in roots.items():
            entry = self._entries.get(root)
            if entry is not None:
                self._count(entry, size * files, files, sure=False)
                self._consider_warning(root, entry)

    def expunging(self, folder: Any, uids: Iterable[int] | None = None
                  ) -> Callable[[list[int]], list[int]]:
        """Before messages of `folder` are removed (`uids`, or those flagged \\Deleted):
        a callback for the uids actually removed, which counts them off (passing them on).
        A uid whose size was not known before is settled by a recalculation."""
        root = self.root_of(folder.path)
        candidates = folder.uids_with_flag("\\Deleted", True) if uids is None else uids
        sizes: dict[int, int] = {}
        for uid in candidates:
            info = folder.by_uid(uid)
            if info is not None:
                sizes[uid] = info.size

        def removed(gone: list[int]) -> list[int]:
            if root is not None and gone:
                known = [sizes.get(u) for u in gone]
                if None in known:
                    self.recalculate_soon(root)
                else:
                    self.changed(root, -sum(known), -len(known))  # type: ignore[arg-type]
            return gone
        return removed

    def recalculate_soon(self, root: Path) -> None:
        """Mail went without a change line (a folder was deleted): maildirsize is removed,
        and the next question counts the Maildir."""
        entry = self._entry(root)
        entry.read_at = float("-inf")
        entry.unsure = entry.unsure or entry.loading
        self._lane(entry, lambda _: deferToThread(quota_file.forget, root)).addErrback(
            _logged, "removing the quota file of", root)

    # -- inside --------------------------------------------------------------------------------

    def _entry(self, root: Path) -> _QuotaEntry:
        entry = self._entries.get(root)
        if entry is None:
            if len(self._entries) >= QUOTA_ENTRIES_MAX:
                for key, old in list(self._entries.items()):
                    if not old.loading and old.batch is None:
                        del self._entries[key]
            entry = self._entries[root] = _QuotaEntry()
        return entry

    def _fresh(self, entry: _QuotaEntry) -> bool:
        return self._clock() - entry.read_at < self.fresh_seconds

    @staticmethod
    def _count(entry: _QuotaEntry, nbytes: int, count: int, sure: bool) -> None:
        if entry.usage is not None:
            entry.usage = entry.usage.plus(nbytes, count)
            if entry.usage.bytes < 0 or entry.usage.count < 0:
                # Removed more than we knew of: mail another program (Dovecot) added
                # since the read.  What memory holds is wrong: maildirsize is read again.
                entry.usage = None
        if entry.loading:
            entry.since = (entry.since[0] + nbytes, entry.since[1] + count)
            entry.unsure = entry.unsure or not sure

    @staticmethod
    def _lane(entry: _QuotaEntry, job: Callable[[Any], Any]) -> Deferred[Any]:
        """Run `job` after this user's earlier disk work; fires with its result, while
        the lane itself goes on whatever happens."""
        out: Deferred[Any] = Deferred()

        def run(_: Any) -> Deferred[Any]:
            d = maybeDeferred(job, None)
            d.addBoth(_fire, out)
            return d
        entry.lane.addCallback(run)
        return out

    def _load(self, root: Path, entry: _QuotaEntry, limit: int | None) -> Deferred[Usage]:
        waiter: Deferred[Usage] = Deferred()
        if entry.loading:
            entry.waiters.append(waiter)
            if entry.loading_limit == limit:
                return waiter
            return waiter.addBoth(lambda _: self._load(root, entry, limit))
        entry.loading, entry.loading_limit, entry.waiters = True, limit, [waiter]
        entry.limit, entry.since, entry.unsure = limit, (0, 0), False
        # A change line still waiting is written before this read, which sees it: a
        # change from now on must not join it (it would be in the file and in `since`,
        # counted twice), but get a line of its own after the read.
        entry.batch = None
        self._lane(entry, lambda _: deferToThread(_read_quota, root, limit)).addBoth(
            self._loaded, root, entry)
        return waiter

    def _loaded(self, result: Any, root: Path, entry: _QuotaEntry) -> None:
        waiters, entry.waiters = entry.waiters, []
        entry.loading = False
        if isinstance(result, Failure):
            log.failure("reading the quota usage of {path} failed", result, path=str(root))
            for w in waiters:
                w.errback(result)
            return
        usage, warned = result
        entry.usage = usage.plus(*entry.since)
        if entry.usage.bytes < 0 or entry.usage.count < 0:   # see _count: not to be trusted
            entry.usage = Usage(max(entry.usage.bytes, 0), max(entry.usage.count, 0),
                                entry.usage.limit)
            entry.unsure = True
        entry.since = (0, 0)
        entry.read_at = float("-inf") if entry.unsure else self._clock()
        entry.unsure = False
        if entry.warned is None:
            entry.warned = warned
        self._consider_warning(root, entry)
        for w in waiters:
            w.callback(entry.usage)

    def _consider_warning(self, root: Path, entry: _QuotaEntry) -> None:
        """One warning each time usage crosses 90% of the limit (the mark beside
        maildirsize remembers it across restarts and processes)."""
        usage, limit = entry.usage, entry.limit
        if usage is None or not limit:
            return
        high = usage.bytes >= limit * quota_file.WARN_FRACTION
        if high and entry.warned is not True:
            entry.warned = True
            self._lane(entry, lambda _: deferToThread(quota_file.mark_warned, root)
                       ).addCallback(lambda made: self._warn(root, entry) if made else None
                                     ).addErrback(_logged, "the quota warning of", root)
        elif not high and entry.warned is not False:
            entry.warned = False
            self._lane(entry, lambda _: deferToThread(quota_file.clear_warned, root)
                       ).addErrback(_logged, "clearing the quota warning of", root)

    def _warn(self, root: Path, entry: _QuotaEntry) -> Deferred[Any] | None:
        """Deliver the warning into the user's INBOX (never refused: it is small, and the
        user should learn why mail may soon be refused)."""
        address = f"{root.name}@{root.parent.name}"
        usage = entry.usage or Usage(0, 0)
        message = quota_file.warning_message(
            address, Usage(usage.bytes, usage.count, entry.limit), self._store.hostname)

        def done(results: list[Any]) -> None:
            if all(r.ok for r in results):
                log.info("quota warning delivered to {address}: {used} of {limit} bytes",
                         address=address, used=usage.bytes, limit=entry.limit)
            else:
                failed(None)

        def failed(f: Failure | None) -> None:
            log.warn("quota warning to {address} not delivered ({error}); will try again "
                     "at the next crossing", address=address,
                     error=f.getErrorMessage() if f is not None else "write failed")
            entry.warned = None
            self._lane(entry, lambda _: deferToThread(quota_file.clear_warned, root)
                       ).addErrback(_logged, "clearing the quota warning of", root)

        try:
            delivery = self._store.begin_delivery([root])
            delivery.write(message)
        except (OSError, ValueError):
            failed(Failure())
            return None
        return delivery.commit().addCallbacks(done, failed)


def _read_quota(root: Path, limit: int | None) -> tuple[Usage, bool]:
    """Thread: the usage from maildirsize (recalculated when due) and the warning mark."""
    return quota_file.load(root, limit), quota_file.is_warned(root)


def _logged(failure: Failure, what: str, root: Path) -> None:
    log.failure("{what} {path} failed", failure, what=what, path=str(root))


def _fire(result: Any, d: Deferred[Any]) -> None:
    """Hand `result` to `d` (a Failure as its error) and end the chain it came from."""
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mkdir(path: Path) -> bool:
    """mkdir with mode 0700; False if it already existed."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)  # the umask may have taken bits away; never add any beyond 0700
    return True


def _create_file(path: Path, content: bytes, tmp_dir: Path) -> bool:
    """Write a file atomically unless it exists; False (and untouched) if it did.

    A complete temporary file in `tmp_dir` (a Maildir tmp/, so `clean_tmp` removes any
    leftover) is linked into place: a crash never leaves a half-written file, and an
    existing file is never overwritten.
    """
    if os.path.lexists(path):
        return False
    return write_durably(path, content, tmp=tmp_dir / f"{path.name}.{os.getpid()}.{time.time_ns()}",
                         keep_existing=True)
