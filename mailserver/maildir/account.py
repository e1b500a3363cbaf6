"""One user's folder tree: listing, creating, deleting and renaming folders, subscriptions.

Obtained through `MaildirStore.account(user_path)`, which keeps one per user so that
every session shares the same `Folder` objects.

Layout is Dovecot's Maildir++: INBOX is the user's Maildir itself, every other folder a
".Name" directory beside cur/ new/ tmp/, the hierarchy written into the name with '.'.
Every client-supplied name goes through `names.folder_dir`, and is refused with
InvalidFolderName when it could leave the Maildir or confuse it ('/', NUL and other
controls, empty levels such as "..", ".x" or "x.", the wildcards '*' and '%', over 255
bytes).

Behaviour where IMAP leaves a choice, following Dovecot on Maildir++:

- CREATE makes the missing parents too (RFC 3501 6.3.3 SHOULD); "a." creates "a".
- DELETE of a folder that has children removes the folder itself (its messages and
  directory); the children stay and the name lists as \\Noselect \\HasChildren, since in
  Maildir++ a parent without its own directory is just that.  DELETE of such a \\Noselect
  name fails with FolderNotEmpty (RFC 3501 6.3.4), DELETE of INBOX with FolderError.
- RENAME moves the children along and creates missing parents of the new name;
  subscriptions follow the rename.  RENAME of INBOX moves its messages into the new
  folder, which keeps their uids, keywords and INBOX's UIDVALIDITY; INBOX is left empty
  with its UIDVALIDITY and UIDNEXT, so no uid is reused (RFC 3501 6.3.5).  INBOX's
  children stay where they are.
- Subscribing to a name that has no folder is allowed (RFC 3501 6.3.6).
- A special use given at CREATE (RFC 6154 3) is stored in specialuse.py's file; it follows
  RENAME and goes with DELETE.  A CREATE without one forgets an attribute left by a
  folder of the same name that another program removed.

The tree and subscription changes are synchronous (a few mkdirs, renames and small
fsynced files, never work proportional to the number of messages) and raise FolderError
subclasses; a dot-lock held by another process makes them fail with FolderBusy after
SHORT_LOCK_TIMEOUT.  create_folder, subscribe and unsubscribe touch only the disk, and the
IMAP session runs them in a thread; delete_folder and rename_folder also update the shared
folders, so they run in the reactor and leave the slow part to a thread.  DELETE and RENAME return a Deferred
for the follow-up work they leave to a thread (removing the files, closing indexes); it
never fails, and nobody needs to wait for it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.fsutil import fsync_directory, write_durably
from mailserver.maildir import specialuse
from mailserver.maildir.delivery import escape_hostname
from mailserver.maildir.flags import size_from_base
from mailserver.maildir.folder import (
    Folder,
    FolderBusy,
    FolderError,
    FolderExists,
    FolderNotEmpty,
    InvalidFolderName,
    NoSuchFolder,
)
from mailserver.maildir.keywords import KEYWORDS_NAME
from mailserver.maildir.names import (
    INBOX,
    NAME_MAX,
    SEPARATOR,
    SUBSCRIPTIONS_FILE,
    folder_dir,
    folder_name_from_dir,
    format_subscriptions,
    is_inbox,
    normalized,
    parse_subscriptions,
)
from mailserver.maildir.store import MAILDIR_SUBDIRS, STAGED_FOLDER_PREFIX, _create_file, _mkdir
from mailserver.maildir.uidlist import DotLock, LockTimeout, UidList, replace_locked

log = Logger()

SPECIAL_USE = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}
_DELETED_PREFIX = "..deleted."  # never a valid folder directory (empty first level)
SHORT_LOCK_TIMEOUT = 2.0  # seconds the reactor may wait for another process's dot-lock


@dataclass(frozen=True)
class FolderEntry:
    """One LIST line: the IMAP name and its attributes."""

    name: str
    attributes: tuple[str, ...]

    @property
    def selectable(self) -> bool:
        return "\\Noselect" not in self.attributes


def canonical_name(name: str) -> str:
    """`name` with a leading INBOX level in upper case (INBOX is case-insensitive)."""
    first, sep, rest = name.partition(SEPARATOR)
    return INBOX + sep + rest if is_inbox(first) else name


class MailAccount:
    """The folder tree of the Maildir at `user_path`."""

    def __init__(self, store: Any, user_path: Path) -> None:
        self.store = store
        self.path = Path(user_path)
        self.quota: int | None = None
        self._escaped_host = escape_hostname(store.hostname)
        self._folders: dict[Path, Folder] = {}

    def __repr__(self) -> str:
        return f"<MailAccount {str(self.path)!r}>"

    # -- names --------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        """The directory of folder `name`; InvalidFolderName for anything unsafe."""
        if not isinstance(name, str) or not name:
            raise InvalidFolderName("empty folder name")
        if "*" in name or "%" in name:
            raise InvalidFolderName(f"wildcards are not allowed in folder names: {name!r}")
        if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise InvalidFolderName("folder name too long")
        try:
            path = folder_dir(self.path, name)
        except ValueError as e:
            raise InvalidFolderName(str(e)) from None
        if path != self.path and path.parent != self.path:
            raise InvalidFolderName(f"folder name escapes the maildir: {name!r}")
        return path

    def _name_of(self, path: Path) -> str:
        return INBOX if path == self.path else folder_name_from_dir(path.name)

    # -- listing -----------------------------------------------------------------------------

    def _folder_dirs(self) -> dict[str, Path]:
        """Name -> directory of every existing folder (INBOX first)."""
        found = {INBOX: self.path}
        try:
            with os.scandir(self.path) as it:
                entries = [e for e in it if e.name.startswith(SEPARATOR)
                           and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.name.startswith(_DELETED_PREFIX) or entry.name in (".", ".."):
                continue
            try:
                found[canonical_name(folder_name_from_dir(entry.name))] = Path(entry.path)
            except ValueError:
                log.warn("ignoring directory {name} in {path}: not a folder name",
                         name=entry.name, path=str(self.path))
        return found

    def list_folders(self) -> list[FolderEntry]:
        """Every folder, and every parent name that has children but no folder of its own
        (\\Noselect); INBOX first, then by name.  A folder's special use is the one CREATE
        gave it (RFC 6154 3), else its name's (SPECIAL_USE)."""
        existing = set(self._folder_dirs())
        created = specialuse.read(self.path)
        parents: set[str] = set()
        for name in existing:
            parts = name.split(SEPARATOR)
            for i in range(1, len(parts)):
                parents.add(SEPARATOR.join(parts[:i]))
        entries = []
        for name in sorted(existing | parents, key=lambda n: (n != INBOX, n)):
            attrs = ["\\HasChildren" if name in parents else "\\HasNoChildren"]
            use = created.get(name) or SPECIAL_USE.get(name)
            if name not in existing:
                attrs.insert(0, "\\Noselect")
            elif use is not None:
                attrs.append(use)
            entries.append(FolderEntry(name, tuple(attrs)))
        return entries

    # -- folders ------------------------------------------------------------------------------

    def folder(self, name: str) -> Folder:
        """The shared Folder of `name` (not loaded yet: refresh() it).

        NoSuchFolder if it does not exist, InvalidFolderName if the name is unsafe.
        """
        path = self._dir(name)
        cached = self._folders.get(path)
        if cached is not None:
            return cached
        if not path.is_dir():
            raise NoSuchFolder(f"no folder {name!r}")
        for sub in MAILDIR_SUBDIRS:
            if not (path / sub).is_dir():
                _mkdir(path / sub)  # Dovecot creates missing subdirectories too
        folder = self.store.new_folder(path, self._name_of(path), self._escaped_host)
        folder.on_change = getattr(self.store, "folder_changed", None)
        self._folders[path] = folder
        return folder

    def loaded_folder(self, name: str) -> Folder | None:
        """The Folder of `name` if one exists in memory, else None (nothing is loaded)."""
        try:
            return self._folders.get(self._dir(name))
        except FolderError:
            return None

    def folder_at(self, path: Path) -> Folder | None:
        """The in-memory Folder whose directory is `path`, if any."""
        return self._folders.get(normalized(path))

    def open_folder(self, name: str) -> Deferred[Folder]:
        """`folder(name)`, refreshed: fires when it is loaded."""
        try:
            folder = self.folder(name)
        except FolderError as e:
            return fail(e)
        return folder.refresh().addCallback(lambda _: folder)

    # -- create ---------------------------------------------------------------------------------

    def create_folder(self, name: str, special_use: str | None = None) -> None:
        """Create `name` and any missing parents; FolderExists if it is there already.
        `special_use` (one of specialuse.ATTRIBUTES) is stored with it (RFC 6154 3): if
        that fails, the folder is removed again and the error raised.

        Synchronous: a few mkdirs and one or two small fsynced files.
        """
        if special_use is not None and special_use not in specialuse.ATTRIBUTES:
            raise FolderError(f"special use {special_use!r} cannot be set")
        clean = name[:-1] if isinstance(name, str) and name.endswith(SEPARATOR) \
            and len(name) > 1 else name
        path = self._dir(clean)
        if path == self.path:
            raise FolderExists("INBOX always exists")
        canonical = canonical_name(clean)
        parts = canonical.split(SEPARATOR)
        if path.exists():
            raise FolderExists(f"folder {canonical!r} exists")
        for i in range(1, len(parts)):
            parent = SEPARATOR.join(parts[:i])
            if parent != INBOX:
                self._make_folder_dir(self._dir(parent), exclusive=False)
        self._make_folder_dir(path, exclusive=True)
        fsync_directory(self.path)
        try:
            self._set_special_use(canonical, special_use)
        except (OSError, FolderError):
            if special_use is None:  # only a stale attribute was to go: keep the folder
                log.failure("special use of {name} not cleared", name=canonical)
                return
            shutil.rmtree(path, ignore_errors=True)
            fsync_directory(self.path)
            raise

    def _set_special_use(self, name: str, use: str | None) -> None:
        """Store `use` for folder `name`, or forget an attribute left from a folder of
        that name that was removed behind our back."""
        def change(uses: dict[str, str]) -> dict[str, str] | None:
            if uses.get(name) == use:
                return None
            uses = dict(uses)
            if use is None:
                del uses[name]
            else:
                uses[name] = use
            return uses
        self._update_special_uses(change)

    def _update_special_uses(self, change: Callable[[dict[str, str]], dict[str, str] | None]
                             ) -> None:
        """Change the stored special uses; no lock and no write when `change` (a pure
        function) finds nothing to do in the file as it is."""
        if change(specialuse.read(self.path)) is None:
            return
        try:
            specialuse.update(self.path, change, timeout=SHORT_LOCK_TIMEOUT)
        except LockTimeout:
            raise FolderBusy("special-use attributes are locked by another process") from None

    def _move_special_uses(self, old: str, new: str | None) -> None:
        """After DELETE (new None: `old` alone) or RENAME (`old` and its children) of
        folders: their stored special use goes or follows.  Problems are logged."""
        def change(uses: dict[str, str]) -> dict[str, str] | None:
            if new is None:
                return None if old not in uses else {n: u for n, u in uses.items() if n != old}
            moved = {(new + n[len(old):] if n == old or n.startswith(old + SEPARATOR) else n): u
                     for n, u in uses.items()}
            return None if moved == uses else moved
        try:
            self._update_special_uses(change)
        except (OSError, FolderError) as e:
            log.warn("special-use attributes not updated: {error}", error=e)

    def _make_folder_dir(self, path: Path, exclusive: bool) -> None:
        """A Maildir++ folder at `path` with a fresh uid list (FolderExists if `exclusive`
        and it exists).

        A new folder is made whole in the Maildir's tmp/ and renamed into place: a
        delivery that finds the directory (Sieve's fileinto :create, the Junk folder,
        from several messages at once) or a LIST never sees it without its tmp/, new/ and
        cur/.  One there already (made by another program, or half made before a crash)
        is completed in place."""
        if not os.path.lexists(path):
            stage = self.path / "tmp" / (f"{STAGED_FOLDER_PREFIX}{os.getpid()}."
                                         f"{threading.get_ident()}.{time.time_ns()}")
            try:
                os.mkdir(stage, 0o700)
                for sub in MAILDIR_SUBDIRS:
                    os.mkdir(stage / sub, 0o700)
                _create_file(stage / "maildirfolder", b"", stage / "tmp")
                UidList.create(stage).write()
                fsync_directory(stage)
                os.rename(stage, path)
                return
            except OSError:
                shutil.rmtree(stage, ignore_errors=True)
                if not os.path.isdir(path):
                    raise
            # made by someone else meanwhile
        if not _mkdir(path):
            if exclusive:
                raise FolderExists(f"folder {self._name_of(path)!r} exists")
        for sub in MAILDIR_SUBDIRS:
            _mkdir(path / sub)
        _create_file(path / "maildirfolder", b"", path / "tmp")
        with _short_lock(path / "dovecot-uidlist"):
            if UidList.read(path) is None:
                UidList.create(path).write()
        fsync_directory(path)

    # -- delete ---------------------------------------------------------------------------------

    def delete_folder(self, name: str) -> Deferred[None]:
        """Delete folder `name` with its messages (children stay; see the module doc).

        The folder vanishes at once (its directory is renamed away, sessions that have it
        open hear every message expunged); the returned Deferred fires when the files
        are removed, in a thread (it never fails: problems are logged).
        """
        path = self._dir(name)
        if path == self.path:
            raise FolderError("INBOX cannot be deleted")
        if not path.is_dir():
            if self._children(path):
                raise FolderNotEmpty(f"{name!r} has children and no folder of its own")
            raise NoSuchFolder(f"no folder {name!r}")
        trash = self.path / f"{_DELETED_PREFIX}{os.getpid()}.{time.time_ns()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            raise NoSuchFolder(f"no folder {name!r}") from None
        self._move_special_uses(canonical_name(name), None)
        folder = self._folders.pop(path, None)
        if folder is None:
            return _logged(deferToThread(self._finish_delete))
        # After whatever the folder was doing in a thread is over (and its index closed).
        return _logged(folder.mark_deleted().addCallback(
            lambda _: deferToThread(self._finish_delete)))

    def _finish_delete(self) -> None:
        fsync_directory(self.path)
        self._remove_trash()

    def _remove_trash(self) -> None:
        """Remove deleted folder directories (also what an earlier crash left behind)."""
        with os.scandir(self.path) as it:
            leftovers = [e.path for e in it if e.name.startswith(_DELETED_PREFIX)]
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)

    def _children(self, path: Path) -> list[Path]:
        """Directories of the folders below the one at `path`."""
        prefix = (path.name if path != self.path else SEPARATOR + INBOX) + SEPARATOR
        try:
            with os.scandir(self.path) as it:
                return sorted(Path(e.path) for e in it if e.name.startswith(prefix)
                              and e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    # -- rename ---------------------------------------------------------------------------------

    def rename_folder(self, old: str, new: str) -> Deferred[None]:
        """Rename `old` (with its children) to `new`; INBOX is special, see the module doc.

        The directories are renamed at once (a rename per folder); open Folder objects
        move along, so sessions keep working.  The returned Deferred fires when the
        follow-up work in threads is done (it never fails: problems are logged).
        """
        old_path, new_path = self._dir(old), self._dir(new)
        new_name = canonical_name(new)
        if new_path == self.path:
            raise FolderExists("INBOX always exists")
        if old_path == self.path:
            return self._rename_inbox(new_name, new_path)
        if new_path == old_path or new_path.name.startswith(old_path.name + SEPARATOR):
            raise InvalidFolderName(f"cannot rename {old!r} into itself")
        moves = []
        if old_path.is_dir():
            moves.append((old_path, new_path))
        for child in self._children(old_path):
            target = self.path / (new_path.name + child.name[len(old_path.name):])
            if len(target.name.encode("ascii")) > NAME_MAX:
                raise InvalidFolderName(f"folder name too long: {target.name!r}")
            moves.append((child, target))
        if not moves:
            raise NoSuchFolder(f"no folder {old!r}")
        for _, target in moves:
            if target.exists():
                raise FolderExists(f"folder {self._name_of(target)!r} exists")
        parts = new_name.split(SEPARATOR)
        for i in range(1, len(parts)):
            parent = SEPARATOR.join(parts[:i])
            if parent != INBOX and not self._dir(parent).exists():
                self._make_folder_dir(self._dir(parent), exclusive=False)
        done: list[tuple[Path, Path]] = []
        try:
            for src, dst in moves:
                os.rename(src, dst)
                done.append((src, dst))
        except OSError:
            for src, dst in reversed(done):
                try:
                    os.rename(dst, src)
                except OSError as e:
                    log.error("cannot undo rename of {src}: {error}", src=str(src), error=e)
            raise
        finally:
            fsync_directory(self.path)
        self._rename_subscriptions(canonical_name(old), new_name)
        self._move_special_uses(canonical_name(old), new_name)
        waits = []
        for src, dst in moves:
            folder = self._folders.pop(src, None)
            if folder is not None:
                self._folders[dst] = folder
                waits.append(folder.relocate(dst, self._name_of(dst)))
        return _logged(DeferredList(waits, consumeErrors=True) if waits else succeed(None))

    def _rename_inbox(self, new: str, new_path: Path) -> Deferred[None]:
        """Move INBOX's messages into a new folder, uids and keywords included.

        cur/ and new/ move as whole directories (fresh ones take their place), so the
        move is atomic and takes no time whatever the number of messages.  The new
        folder gets a copy of INBOX's uid list and keeps its UIDVALIDITY: the name is
        new, so no (name, UIDVALIDITY, uid) is ever reused; INBOX keeps its UIDVALIDITY
        and UIDNEXT and drops the records on its next refresh.  The returned Deferred
        fires once INBOX has been refreshed (its sessions see the messages expunged).
        """
        if new_path.exists():
            raise FolderExists(f"folder {new!r} exists")
        parts = new.split(SEPARATOR)
        for i in range(1, len(parts)):
            parent = SEPARATOR.join(parts[:i])
            if parent != INBOX and not self._dir(parent).exists():
                self._make_folder_dir(self._dir(parent), exclusive=False)
        if not _mkdir(new_path):
            raise FolderExists(f"folder {new!r} exists")
        _mkdir(new_path / "tmp")
        _create_file(new_path / "maildirfolder", b"", new_path / "tmp")
        # The new folder's lock too: another node may open it as soon as it exists.
        with _short_lock(self.path / "dovecot-uidlist"), \
                _short_lock(new_path / "dovecot-uidlist"):
            for control in ("dovecot-uidlist", KEYWORDS_NAME):
                if (self.path / control).exists():
                    _copy_file(self.path / control, new_path / control, new_path / "tmp")
            for sub in ("cur", "new"):
                os.rename(self.path / sub, new_path / sub)
                _mkdir(self.path / sub)
        for d in (new_path, self.path, new_path / "new", new_path / "cur"):
            fsync_directory(d)
        fsync_directory(self.path.parent)
        inbox = self._folders.get(self.path)
        if inbox is None:
            return succeed(None)
        return _logged(inbox.refresh())

    # -- subscriptions ----------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        """The subscribed names, as stored (a small file, read at once)."""
        try:
            data = (self.path / SUBSCRIPTIONS_FILE).read_bytes()
        except FileNotFoundError:
            return []
        return parse_subscriptions(data)

    def subscribe(self, name: str) -> None:
        """Add `name` to the subscriptions (synchronous: one small fsynced file)."""
        self._dir(name)
        canonical = canonical_name(name)
        self._update_subscriptions(
            lambda names: None if canonical in names else names + [canonical])

    def unsubscribe(self, name: str) -> None:
        """Remove `name` from the subscriptions, whether or not the folder exists."""
        self._dir(name)
        canonical = canonical_name(name)
        self._update_subscriptions(
            lambda names: [n for n in names if n != canonical] if canonical in names else None)

    def _rename_subscriptions(self, old: str, new: str) -> None:
        def change(names: list[str]) -> list[str] | None:
            renamed = [new + n[len(old):] if n == old or n.startswith(old + SEPARATOR)
                       else n for n in names]
            return None if renamed == names else list(dict.fromkeys(renamed))
        try:
            self._update_subscriptions(change)
        except FolderError as e:
            log.warn("subscriptions not renamed: {error}", error=e)

    def _update_subscriptions(self, change: Callable[[list[str]], list[str] | None]) -> None:
        def rewrite(current: bytes | None) -> bytes | None:
            names = parse_subscriptions(current) if current else []
            result = change(names)
            return None if result is None else format_subscriptions(result)
        try:
            replace_locked(self.path / SUBSCRIPTIONS_FILE, rewrite, timeout=SHORT_LOCK_TIMEOUT)
        except LockTimeout:
            raise FolderBusy("subscriptions are locked by another process") from None

    # -- usage ------------------------------------------------------------------------------------

    def usage(self) -> Deferred[int]:
        """Octets of all messages in all folders (QUOTA): loaded folders answer from the
        reactor's memory now; the others are counted in a thread from their directory
        listings and the ",S=" sizes in the names (a stat only for names without one)."""
        loaded = {p: f.total_size() for p, f in self._folders.items() if f.loaded}

        def count() -> int:
            return sum(loaded[p] if p in loaded else _dir_usage(p)
                       for p in self._folder_dirs().values())
        return deferToThread(count)

    def loaded_folders(self) -> list[Folder]:
        return list(self._folders.values())

    def close(self) -> Deferred[Any]:
        """Flush and close every loaded folder's index."""
        return DeferredList([f.close() for f in self._folders.values()]) if self._folders \
            else succeed(None)


def _short_lock(target: Path) -> DotLock:
    """A dot-lock for synchronous callers; FolderBusy instead of a long wait."""
    return _BusyLock(target, timeout=SHORT_LOCK_TIMEOUT)


class _BusyLock(DotLock):
    def __enter__(self) -> DotLock:
        try:
            return super().__enter__()
        except LockTimeout:
            raise FolderBusy("folder is locked by another process") from None


def _copy_file(src: Path, dst: Path, tmp_dir: Path) -> None:
    """Copy a control file into place atomically (through `tmp_dir`), fsynced."""
    write_durably(dst, src.read_bytes(), tmp=tmp_dir / f"{dst.name}.{os.getpid()}.{time.time_ns()}")


def _logged(d: Deferred[Any]) -> Deferred[None]:
    """Background work's Deferred: errors are logged, never passed on."""
    def failed(f: Any) -> None:
        log.failure("folder maintenance failed", f)
    return d.addCallbacks(lambda _: None, failed)


def _dir_usage(path: Path) -> int:
    total = 0
    for sub in ("cur", "new"):
        try:
            names = os.listdir(path / sub)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith("."):
                continue
            size = size_from_base(name.partition(":")[0])
            if size is None:
                try:
                    size = os.stat(path / sub / name).st_size
                except FileNotFoundError:
                    continue
            total += size
    return total
