"""`mailserver-admin backup`: what a server needs to come back elsewhere, taken while it runs.

A backup is a directory (made new or empty by `backup`):

    manifest.json              written last: a directory without one is no backup
    config/<file>              the configuration file as it was (restore does not install it)
    state/accounts.sqlite3     the accounts database: one snapshot by SQLite's online backup
    state/dkim/                DKIM private keys
    state/tls/, state/acme/    the self-signed pair the server generated, what ACME got
                               (configured PEM files only when inside state_dir, in place)
    state/queue/msg/, env/     the outbound queue: every queued message with its envelope
    maildirs/                  maildir_root: per folder the messages of cur/ and new/ and the
                               control files (dovecot-uidlist, dovecot-keywords,
                               subscriptions, maildirsize, maildirfolder); tmp/ empty

Left out, because they are rebuilt or only transient: tmp/ contents, the folder indexes
(mailserver.index.sqlite3: a cache rebuilt on the first open; mod-sequences stay above
every value handed out since they follow the clock), Dovecot's own index and cache files,
dot-locks, the inbound check spool, queue requests and the server's lock.

Backup runs while the server does.  Message files never change after delivery, only
their names (flags) do, so they are hard-linked into the backup where it is on the same
file system (copied otherwise, or always with `copy=True`); a folder's control files are
copied and its message list taken while its dovecot-uidlist dot-lock is held, the lock
the server and Dovecot take to assign UIDs, so the uid list and the list of files agree.
A message renamed in between is found again by its base name; one expunged is left out.

Restoring is mailserver.restore.  Blocking; for the admin tool.  Imports nothing from
Twisted.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mailserver import __version__
from mailserver.accounts_schema import stored_version
from mailserver.config import SHARED_DIR_NAME
from mailserver.fsutil import can_sync_filesystem, sync_filesystem, write_durably
from mailserver.maildir.flags import base_name
from mailserver.maildir.index import INDEX_NAME
from mailserver.maildir.uidlist import UIDLIST_NAME, DotLock, UidList
from mailserver.sieve.scripts import ACTIVE_LINK, active_link
from mailserver.smtp.queue.envelope import ID_RE

if TYPE_CHECKING:
    from mailserver.config import Config

FORMAT = 1
MANIFEST_NAME = "manifest.json"
ENVELOPE_MAX = 4 * 1024 * 1024 + 1
LOCK_WAIT = 10.0           # seconds to wait for a folder's uid list lock, then go without
RENAME_RETRIES = 10        # a message renamed again each time it is looked for
MESSAGE_DIRS = ("cur", "new")
MAILDIR_DIRS = ("cur", "new", "tmp")
_COPY_CHUNK = 1024 * 1024

# Files beside cur/ new/ tmp/ that are caches or transient (rebuilt by whoever needs them).
_SKIP_NAMES = frozenset({INDEX_NAME, f"{INDEX_NAME}-wal", f"{INDEX_NAME}-shm",
                         f"{INDEX_NAME}-journal", "dovecot-uidlist.tmp", "dovecot.mailbox.log"})
_SKIP_PREFIXES = ("dovecot.index", "dovecot.list.index")
_SKIP_SUFFIXES = (".lock",)
SKIPPED = ["tmp/ contents", f"folder indexes ({INDEX_NAME}, rebuilt on first open)",
           "Dovecot index and cache files", "dot-locks", "the inbound check spool",
           "queue requests and lock"]


class BackupError(Exception):
    """A refused or failed backup or restore; the message is one line for the operator."""


# -- backup ---------------------------------------------------------------------------------

@dataclass
class _Copier:
    """Places files into the backup: hard links where the file system allows, else copies."""

    link: bool
    linked: int = 0
    copied: int = 0

    def place(self, src: Path, dst: Path) -> int:
        """Link or copy `src` to `dst`; its size.  FileNotFoundError if `src` is gone."""
        if self.link:
            try:
                os.link(src, dst, follow_symlinks=False)
                self.linked += 1
                return os.lstat(dst).st_size
            except FileNotFoundError:
                raise
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                                   errno.EACCES):
                    raise
                if e.errno != errno.EMLINK:   # another file system, or links not allowed
                    self.link = False
        size = copy_file(src, dst)
        self.copied += 1
        return size


def copy_file(src: Path, dst: Path, mode: int = 0o600, *, follow: bool = False) -> int:
    """A new file `dst` (mode `mode`) with the content and mtime of `src`, a regular file
    (a symlink followed only with `follow`); its size.  FileNotFoundError if `src` is gone."""
    nofollow = 0 if follow else getattr(os, "O_NOFOLLOW", 0)
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC | nofollow)
    try:
        st = os.fstat(fin)
        if not stat.S_ISREG(st.st_mode):
            raise BackupError(f"{src}: not a regular file")
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                       | getattr(os, "O_NOFOLLOW", 0), mode)
        try:
            size = 0
            while chunk := os.read(fin, _COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view):]
                size += len(chunk)
            os.fchmod(fout, mode)
            # The mtime is the message's INTERNALDATE.
            os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return size


def sqlite_uri(path: Path, query: str) -> str:
    """An SQLite URI for `path` (absolute, percent-encoded) with `query`."""
    return f"{Path(os.path.abspath(path)).as_uri()}?{query}"


def sync_tree(path: Path) -> None:
    """Everything written under `path` on disk (its file system's syncfs, else sync)."""
    if can_sync_filesystem():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sync_filesystem(fd)
        finally:
            os.close(fd)
    else:
        os.sync()


def make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def make_dirs(path: Path) -> None:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        make_dir(d)


def _skipped_file(name: str) -> bool:
    return (name in _SKIP_NAMES or name.startswith(_SKIP_PREFIXES)
            or name.endswith(_SKIP_SUFFIXES))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_within(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


@dataclass
class _MaildirCounts:
    users: int = 0
    folders: int = 0
    messages: int = 0
    bytes: int = 0
    vanished: int = 0      # expunged between the folder's listing and the copy
    unlocked: int = 0      # folders whose uid list lock could not be had
    skipped_links: int = 0  # symbolic links (not followed, not copied)


@dataclass
class BackupResult:
    dest: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        acc, md = m["accounts"], m["maildirs"]
        parts = ["no accounts database" if acc is None else
                 f"accounts ({counted(acc['domains'], 'domain')}, {counted(acc['users'], 'user')}, "
                 f"{counted(acc['aliases'], 'alias')}; schema version {acc['schema_version']})",
                 f"{counted(md['users'], 'Maildir')} ({counted(md['folders'], 'folder')}, "
                 f"{counted(md['messages'], 'message')}, {md['bytes']} bytes; "
                 f"{counted(md['linked'], 'hard link')}, {counted(md['copied'], 'copy')})",
                 counted(m["queue"]["messages"], "queued message"),
                 counted(len(m["dkim"]), "DKIM key"),
                 counted(len(m["tls"]["files"]), "certificate and key file")
                 + (f" ({m['tls']['note']})" if m["tls"]["note"] else ""),
                 "config file"]
        return f"backup written to {self.dest}: " + ", ".join(parts)


def counted(n: int, noun: str) -> str:
    """'1 user', '2 users', '2 aliases', '2 copies'."""
    if n == 1:
        return f"1 {noun}"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u"):
        return f"{n} {noun[:-1]}ies"
    return f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def backup(config: Config, dest: Path, *, copy: bool = False) -> BackupResult:
    """Write a backup of this configuration's server into `dest` (new or empty)."""
    if config.accounts.url:
        # A backup without its accounts would restore as a server nobody can log into.
        raise BackupError("accounts.url: the accounts are in PostgreSQL, which this command "
                          "does not back up: back the database up with pg_dump (README, "
                          "\"Accounts on PostgreSQL\")")
    dest = Path(os.path.abspath(dest))
    for key, root in (("server.state_dir", config.state_dir),
                      ("storage.maildir_root", config.maildir_root)):
        if root.exists() and is_within(dest, root):
            raise BackupError(f"{dest} is inside {key} ({root}): put the backup elsewhere")
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise BackupError(f"{dest} exists and is not a directory")
        if any(dest.iterdir()):
            raise BackupError(f"{dest} is not empty: a backup goes into a new or empty "
                              f"directory")
    else:
        try:
            os.makedirs(dest, 0o700)
        except OSError as e:
            raise BackupError(f"cannot create {dest}: {e.strerror}") from None
    try:
        return _backup_into(config, dest, copy)
    except (BackupError, OSError, sqlite3.Error) as e:
        what = (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename
                else str(e))
        raise BackupError(f"{what}; {dest} holds an incomplete backup (no manifest): "
                          f"remove it") from None


def _backup_into(config: Config, dest: Path, copy: bool) -> BackupResult:
    files: dict[str, dict[str, Any]] = {}

    def record(rel: str) -> None:
        path = dest / rel
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}

    def record_path(path: Path) -> None:
        record(path.relative_to(dest).as_posix())

    state = dest / "state"
    make_dir(state)
    accounts = _backup_accounts(config.accounts_db, state / "accounts.sqlite3")
    if accounts is not None:
        record("state/accounts.sqlite3")

    copier = _Copier(link=not copy)
    # The queue before the Maildirs: a queued message delivered meanwhile is then in the
    # queue's copy (and maybe in its Maildir's too: a duplicate after a restore, never a
    # loss), where the other order could miss it in both.
    queued = _backup_queue(config.queue_dir, state / "queue", copier, record_path)
    make_dir(dest / "maildirs")
    counts = _MaildirCounts()
    if config.maildir_root.is_dir():
        _backup_maildirs(config.maildir_root, dest / "maildirs", copier, counts, record_path)

    dkim: list[str] = []
    if config.dkim_dir.is_dir():
        make_dir(state / "dkim")
        for entry in sorted(os.scandir(config.dkim_dir), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            rel = f"state/dkim/{entry.name}"
            copy_file(Path(entry.path), dest / rel)
            record(rel)
            dkim.append(rel)

    tls = _backup_tls(config, dest, record)

    make_dir(dest / "config")
    config_rel = f"config/{config.path.name}"
    copy_file(config.path, dest / config_rel, follow=True)
    record(config_rel)

    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mailserver_version": __version__,
        "hostname": config.server.hostname,
        "source": {"config": os.path.abspath(config.path), "state_dir": str(config.state_dir),
                   "maildir_root": str(config.maildir_root)},
        "config": config_rel,
        "accounts": accounts,
        "dkim": dkim,
        "tls": tls,
        "queue": {"messages": queued, "checksummed": True},
        "maildirs": {"users": counts.users, "folders": counts.folders,
                     "messages": counts.messages, "bytes": counts.bytes,
                     "linked": copier.linked, "copied": copier.copied,
                     "expunged_meanwhile": counts.vanished,
                     "without_lock": counts.unlocked, "symlinks_skipped": counts.skipped_links},
        "skipped": SKIPPED,
        "files": files,
    }
    sync_tree(dest)   # everything above on disk before the manifest says the backup is whole
    write_durably(dest / MANIFEST_NAME,
                  (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return BackupResult(dest, manifest)


def _backup_accounts(path: Path, target: Path) -> dict[str, Any] | None:
    """One consistent snapshot of the live database (SQLite's online backup, which WAL
    readers take without stopping the server's writes); its schema version and counts.
    The database is copied as it is: never migrated here."""
    if not path.exists():
        return None
    src = sqlite3.connect(sqlite_uri(path, "mode=rw"), uri=True, timeout=5.0)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            # One self-contained file: no -wal beside it.
            dst.execute("PRAGMA journal_mode = DELETE")
            info = database_facts(dst, str(path))
        finally:
            dst.close()
    finally:
        src.close()
    return {"file": "state/accounts.sqlite3", **info}


def database_facts(db: sqlite3.Connection, where: str) -> dict[str, Any]:
    """Schema version and counts of an accounts database; BackupError if damaged."""
    check = db.execute("PRAGMA integrity_check").fetchone()
    if not check or check[0] != "ok":
        raise BackupError(f"{where}: accounts database damaged ({check[0] if check else '?'})")
    version = stored_version(db)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def count(sql: str, table: str) -> int:
        return db.execute(sql).fetchone()[0] if table in tables else 0

    return {"schema_version": version,
            "domains": count("SELECT count(*) FROM domains", "domains"),
            "users": count("SELECT count(*) FROM users", "users"),
            "aliases": count("SELECT count(DISTINCT source) FROM aliases", "aliases")}


def is_folder(names: list[str]) -> bool:
    return "cur" in names or "new" in names


def _backup_maildirs(root: Path, dest: Path, copier: _Copier, counts: _MaildirCounts,
                     record: Callable[[Path], None]) -> None:
    """Every folder, then each folder listed once more: a message moved (IMAP MOVE) during
    the walk from a folder not yet walked into one already walked is in neither listing
    of the walk, and is placed by the second look."""
    def fail(e: OSError) -> None:
        raise e

    placed: dict[Path, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        here = Path(dirpath)
        rel = here.relative_to(root)
        out = dest / rel
        make_dir(out)
        links = [d for d in dirnames if (here / d).is_symlink()]
        counts.skipped_links += len(links)
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        if here == root:   # the shared DKIM keys and ACME store: in state/ (below)
            dirnames[:] = [d for d in dirnames if d != SHARED_DIR_NAME]
        if is_folder(dirnames):
            counts.folders += 1
            if len(rel.parts) == 2:
                counts.users += 1
            placed[here] = _backup_folder(here, out, copier, counts, record)
            dirnames[:] = [d for d in dirnames if d not in MAILDIR_DIRS]
        else:
            for name in sorted(filenames):
                if _skipped_file(name):
                    continue
                try:
                    if (here / name).is_symlink():
                        counts.skipped_links += 1
                        continue
                    copy_file(here / name, out / name)
                except FileNotFoundError:
                    continue
                record(out / name)   # a Sieve script, subscriptions: checked at restore
    for folder, bases in placed.items():
        finder = _Finder(folder)
        finder.rescan()
        for base, where in finder.names().items():
            if base in bases:
                continue
            size = _place_message(folder, dest / folder.relative_to(root), base, where,
                                  copier, finder)
            if size is not None:
                counts.messages += 1
                counts.bytes += size


def _backup_folder(folder: Path, out: Path, copier: _Copier, counts: _MaildirCounts,
                   record: Callable[[Path], None]) -> set[str]:
    """One Maildir folder: its control files and message list taken under the uid list
    lock, then the messages placed without holding it."""
    for sub in MAILDIR_DIRS:
        make_dir(out / sub)
    lock = DotLock(folder / UIDLIST_NAME, timeout=LOCK_WAIT)
    try:
        lock.acquire()
        locked = True
    except OSError:   # held too long, or the folder is not ours to write
        # Without the lock the order still holds: the uid list is read before the
        # directories are listed, so every uid it names is either found or expunged.
        locked = False
        counts.unlocked += 1
    try:
        with os.scandir(folder) as entries:
            controls = sorted(e.name for e in entries if e.is_file(follow_symlinks=False)
                              and not _skipped_file(e.name))
        for name in controls:
            try:
                copy_file(folder / name, out / name)
            except FileNotFoundError:
                continue
            # The uid list above all: one restored damaged would renumber the folder's
            # messages under the same UIDVALIDITY.
            record(out / name)
        active = active_link(folder)   # the active Sieve script: a link, made again
        if active is not None:
            os.symlink(active, out / ACTIVE_LINK)
        listing: list[tuple[str, str]] = []
        for sub in MESSAGE_DIRS:
            try:
                entries = list(os.scandir(folder / sub))
            except FileNotFoundError:
                continue
            listing.extend((sub, e.name) for e in entries if e.is_file(follow_symlinks=False))
    finally:
        if locked:
            lock.release()
    # Flag changes rename files in cur/ without the lock, and a directory read while names
    # change may miss one: the uid list names every message of cur/, so one it names that
    # the listing lacks is looked for again.
    wanted: dict[str, tuple[str, str] | None] = {}
    for sub, name in listing:
        wanted.setdefault(base_name(name), (sub, name))
    uidlist = out / UIDLIST_NAME
    if uidlist.is_file():
        for base in UidList.parse(folder, uidlist.read_bytes()).mapping():
            wanted.setdefault(base, None)
    finder = _Finder(folder)
    for base, where in wanted.items():
        size = _place_message(folder, out, base, where, copier, finder)
        if size is None:
            counts.vanished += 1
        else:
            counts.messages += 1
            counts.bytes += size
    return set(wanted)


def _place_message(folder: Path, out: Path, base: str, where: tuple[str, str] | None,
                   copier: _Copier, finder: _Finder) -> int | None:
    """Place the message `base`, last seen as `where` (subdir, name); its size, or None
    when it is gone (expunged).  A name gone stale is looked up again by its base."""
    for _ in range(RENAME_RETRIES):
        if where is not None:
            try:
                return copier.place(folder / where[0] / where[1], out / where[0] / where[1])
            except FileNotFoundError:
                pass
        seen = finder.lookup(base)
        if seen is None or seen == where:
            finder.rescan()
            seen = finder.lookup(base)
            if seen is None:
                return None
        where = seen
    return None


class _Finder:
    """A folder's messages by base name, scanned when asked (after a rename was missed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._names: dict[str, tuple[str, str]] | None = None

    def lookup(self, base: str) -> tuple[str, str] | None:
        if self._names is None:
            self.rescan()
        assert self._names is not None
        return self._names.get(base)

    def names(self) -> dict[str, tuple[str, str]]:
        if self._names is None:
            self.rescan()
        assert self._names is not None
        return dict(self._names)

    def rescan(self) -> None:
        names: dict[str, tuple[str, str]] = {}
        for sub in MESSAGE_DIRS:
            try:
                with os.scandir(self.folder / sub) as entries:
                    for entry in entries:
                        if entry.is_file(follow_symlinks=False):
                            names[base_name(entry.name)] = (sub, entry.name)
            except FileNotFoundError:
                continue
        self._names = names


def _backup_queue(queue: Path, out: Path, copier: _Copier,
                  record: Callable[[Path], None]) -> int:
    """Every queued message with its envelope, both checksummed in the manifest (a cut
    envelope was restored as if whole, and its message never sent).  The message goes
    first, as the queue writes it: an envelope in the backup always has its message."""
    env_dir, msg_dir = queue / "env", queue / "msg"
    for sub in ("", "msg", "env"):
        make_dir(out / sub if sub else out)
    try:
        names = sorted(os.listdir(env_dir))
    except FileNotFoundError:
        return 0
    count = 0
    for name in names:
        queue_id = name[:-5]
        if not name.endswith(".json") or not ID_RE.fullmatch(queue_id):
            continue
        try:
            with open(env_dir / name, "rb") as f:
                envelope = f.read(ENVELOPE_MAX)
            copier.place(msg_dir / queue_id, out / "msg" / queue_id)
        except FileNotFoundError:
            continue   # delivered or deleted meanwhile
        write_durably(out / "env" / name, envelope)
        record(out / "msg" / queue_id)
        record(out / "env" / name)
        count += 1
    return count


def _backup_tls(config: Config, dest: Path, record: Callable[[str], None]) -> dict[str, Any]:
    """Certificates and keys that live in state_dir: the pair the server generated
    (state_dir/tls), what ACME obtained (state_dir/acme: account key, certificate, key),
    and configured PEM files placed inside state_dir.  Configured files elsewhere (a
    Let's Encrypt directory) are the operator's to keep."""
    state = config.state_dir.resolve()
    found: list[tuple[Path, str]] = []
    for name, kind in (("cert.pem", "certificate"), ("key.pem", "private_key")):
        if (state / "tls" / name).is_file():
            found.append((state / "tls" / name, kind))
    acme = config.acme_dir   # with [storage] shared, on the shared root: as state/acme/
    acme_files: list[Path] = []
    if acme.is_dir():
        acme_files = [Path(e.path) for e in sorted(os.scandir(acme), key=lambda e: e.name)
                      if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]
        found += [(path, "acme") for path in acme_files]
    note = ""
    if config.tls.certificate:
        configured = [(Path(config.tls.certificate), "certificate"),
                      (Path(config.tls.private_key), "private_key")]
        outside = [str(p) for p, _ in configured if not is_within(p, state)]
        if outside:
            note = ("TLS certificate not included (configured outside state_dir: "
                    f"{', '.join(outside)})")
        found += [(p.resolve(), kind) for p, kind in configured if is_within(p, state)]
    if not found and not note:
        note = "no TLS certificate generated yet"
    included: dict[str, str] = {}
    for path, kind in found:
        rel = (f"state/acme/{path.name}" if path in acme_files
               else "state/" + path.relative_to(state).as_posix())
        if rel in included:
            if kind == "private_key":   # one file holding both: kept as a key is
                included[rel] = kind
            continue
        make_dirs((dest / rel).parent)
        copy_file(path, dest / rel, follow=True)
        record(rel)
        included[rel] = kind
    return {"files": included, "note": note}
