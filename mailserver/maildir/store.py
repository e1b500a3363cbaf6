"""The Maildir root: where each user's Maildir++ lives, and how deliveries start.

Layout: `<root>/<domain>/<localpart>/` is a user's INBOX (cur/ new/ tmp/); folders are
`.Name` children with their own cur/ new/ tmp/ and an empty `maildirfolder` file, exactly
as Dovecot lays them out.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.fsutil import fsync_directory
from mailserver.maildir.commit_process import ProcessCommitter
from mailserver.maildir.commit_process import available as commit_process_available
from mailserver.maildir.committer import GroupCommitter
from mailserver.maildir.delivery import Delivery, escape_hostname
from mailserver.maildir.names import (
    INBOX,
    SUBSCRIPTIONS_FILE,
    check_path_component,
    folder_dir,
    format_subscriptions,
    is_inside,
    normalized,
)

if TYPE_CHECKING:
    from mailserver.maildir.account import MailAccount

log = Logger()

DEFAULT_FOLDERS = ("Sent", "Drafts", "Trash", "Junk", "Archive")
MAILDIR_SUBDIRS = ("cur", "new", "tmp")
TMP_MAX_AGE = 36 * 3600  # the Maildir spec's limit for files left in tmp/
USER_PATHS_MAX = 4096  # users whose Maildir path is remembered
INDEX_IDLE_SECONDS = 2.0  # a folder index unused this long is closed (reopened on use)


class MaildirStore:
    """All Maildirs under one root directory."""

    folder_dir = staticmethod(folder_dir)

    def __init__(self, root: Path, hostname: str | None = None,
                 commit_process: bool = False) -> None:
        # commit_process: deliveries committed by a child process (the server does that;
        # tests and tools commit in a thread of their own)
        self.commit_process = commit_process
        self.root = normalized(root)
        self.hostname = hostname or socket.gethostname()
        self._escaped_host = escape_hostname(self.hostname)
        self._accounts: dict[Path, MailAccount] = {}
        self._committer: GroupCommitter | ProcessCommitter | None = None
        self._user_paths: dict[tuple[str, str], Path] = {}

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
        return Delivery(targets, self._escaped_host, self.notify_delivered, self._committer,
                        info=info)

    def _new_committer(self) -> GroupCommitter | ProcessCommitter:
        if self.commit_process and commit_process_available():
            return ProcessCommitter()
        return GroupCommitter()

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
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{time.time_ns()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
