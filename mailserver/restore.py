"""`mailserver-admin restore`: a backup (mailserver.backup) put back for a stopped server.

The server must not run: restore refuses while a process holds state_dir/queue/lock.  It
reads the manifest (bounded, checked for shape and format version), checks every file the
manifest lists against its checksum and the Maildir and queue counts against the backup
directory, and opens the backed-up database (integrity check, a schema version this
release knows).  Only then does it look at the target: an accounts database holding data,
a Maildir holding mail, or a DKIM key, certificate or queued message that differs would be
replaced, which is refused (nothing written) unless `force`.  An empty accounts database
or a Maildir without mail (what a first start or `user add` leaves) is replaced without
asking.  The configuration file is not installed: the target is the configuration the
command runs with.

Written with the permissions the server uses: directories 0700, files 0600, the
certificate 0644; the database through SQLite's backup API (never a file copy beside a
stale -wal) and put in WAL mode.  Message files keep their mtime (INTERNALDATE), folders
their dovecot-uidlist (UIDVALIDITY and UIDs).  The folder indexes are rebuilt on first
open.

Blocking; for the admin tool.  Imports nothing from Twisted.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mailserver.fsutil import lock_held
from mailserver.accounts_schema import SCHEMA_VERSION, SchemaError, check_known
from mailserver.backup import (FORMAT, MAILDIR_DIRS, MANIFEST_NAME, MESSAGE_DIRS, BackupError,
                               copy_file, counted, database_facts, is_folder, is_within, make_dir,
                               make_dirs, sha256_file, sqlite_uri, sync_tree)
from mailserver.smtp.queue.envelope import ID_RE
from mailserver.sieve.scripts import is_active_link

if TYPE_CHECKING:
    from mailserver.config import Config

MANIFEST_MAX = 1024 * 1024


# -- manifest -------------------------------------------------------------------------------

def read_manifest(src: Path) -> dict[str, Any]:
    """The manifest of the backup in `src`, checked for shape; BackupError otherwise."""
    if not src.is_dir():
        raise BackupError(f"{src}: no such directory" if not src.exists()
                          else f"{src}: not a directory")
    path = src / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MANIFEST_MAX + 1)
    except FileNotFoundError:
        raise BackupError(f"{src}: no {MANIFEST_NAME}: not a backup made by mailserver-admin "
                          f"backup, or one that did not finish") from None
    if len(data) > MANIFEST_MAX:
        raise BackupError(f"{path}: larger than {MANIFEST_MAX} bytes: not a backup manifest")
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BackupError(f"{path}: not valid JSON ({e}): the manifest is damaged") from None
    if not isinstance(manifest, dict):
        raise BackupError(f"{path}: not a backup manifest (a JSON object expected)")
    version = manifest.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BackupError(f"{path}: no format version: not a backup manifest")
    if version > FORMAT:
        raise BackupError(f"{path}: backup format {version} comes from a newer release "
                          f"(this one reads format {FORMAT})")
    if version != FORMAT:
        raise BackupError(f"{path}: unknown backup format {version}")
    _check_shape(manifest, path)
    return manifest


def _check_shape(m: dict[str, Any], path: Path) -> None:
    def bad(what: str) -> BackupError:
        return BackupError(f"{path}: {what}: the manifest is damaged")

    def number(value: Any, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(f"{what} is not a count")
        return value

    files = m.get("files")
    if not isinstance(files, dict):
        raise bad("no file list")
    for rel, info in files.items():
        if not _safe_relative(rel):
            raise bad(f"unsafe path {rel!r}")
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str)
                or len(info["sha256"]) != 64):
            raise bad(f"no checksum for {rel}")
        number(info.get("size"), f"size of {rel}")
    config = m.get("config")
    if not isinstance(config, str) or config not in files or not config.startswith("config/"):
        raise bad("no config file")
    accounts = m.get("accounts")
    if accounts is not None:
        if not isinstance(accounts, dict) or accounts.get("file") != "state/accounts.sqlite3" \
                or accounts["file"] not in files:
            raise bad("accounts entry")
        for key in ("schema_version", "domains", "users", "aliases"):
            number(accounts.get(key), f"accounts.{key}")
    dkim = m.get("dkim")
    if not isinstance(dkim, list) or any(not isinstance(d, str) or d not in files
                                         or not d.startswith("state/dkim/") for d in dkim):
        raise bad("dkim entry")
    tls = m.get("tls")
    if not isinstance(tls, dict) or not isinstance(tls.get("files"), dict) or any(
            rel not in files or not rel.startswith("state/") or kind not in
            ("certificate", "private_key", "acme") for rel, kind in tls["files"].items()):
        raise bad("tls entry")
    queue = m.get("queue")
    if not isinstance(queue, dict):
        raise bad("queue entry")
    number(queue.get("messages"), "queue.messages")
    if not isinstance(queue.get("checksummed", False), bool):
        raise bad("queue entry")
    maildirs = m.get("maildirs")
    if not isinstance(maildirs, dict):
        raise bad("maildirs entry")
    for key in ("users", "folders", "messages", "bytes"):
        number(maildirs.get(key), f"maildirs.{key}")


def _safe_relative(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel \
            or "\x00" in rel:
        return False
    parts = rel.split("/")
    return (all(p not in ("", ".", "..") for p in parts)
            and parts[0] in ("config", "state", "maildirs"))


# -- restore --------------------------------------------------------------------------------

@dataclass
class _Scan:
    """What the backup directory holds (counted, not trusted from the manifest)."""
    users: list[Path] = field(default_factory=list)   # maildirs/<domain>/<user> folders
    folders: int = 0
    messages: int = 0
    bytes: int = 0
    queue: list[str] = field(default_factory=list)


def verify(src: Path, manifest: dict[str, Any]) -> _Scan:
    """Check the backup's files against its manifest; BackupError naming the first
    difference."""
    for rel, info in manifest["files"].items():
        path = src / rel
        if not path.is_file() or path.is_symlink():
            raise BackupError(f"{src}: {rel} is missing: the backup is incomplete")
        if path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            raise BackupError(f"{src}: {rel} differs from the manifest's checksum: the "
                              f"backup is damaged")
    scan = _scan_maildirs(src / "maildirs")
    md = manifest["maildirs"]
    found = {"users": len(scan.users), "folders": scan.folders, "messages": scan.messages,
             "bytes": scan.bytes}
    for key, value in found.items():
        if md[key] != value:
            raise BackupError(f"{src}: the manifest lists {md[key]} {key} in maildirs/, the "
                              f"backup holds {value}: the backup is damaged")
    scan.queue = _scan_queue(src / "state" / "queue")
    if len(scan.queue) != manifest["queue"]["messages"]:
        raise BackupError(f"{src}: the manifest lists {manifest['queue']['messages']} queued "
                          f"messages, the backup holds {len(scan.queue)}: the backup is damaged")
    if manifest["queue"].get("checksummed"):   # (older backups counted them only)
        for queue_id in scan.queue:
            for rel in (f"state/queue/msg/{queue_id}", f"state/queue/env/{queue_id}.json"):
                if rel not in manifest["files"]:
                    raise BackupError(f"{src}: {rel} is not in the manifest: the backup is "
                                      f"damaged")
    return scan


def _scan_maildirs(root: Path) -> _Scan:
    """Counts of maildirs/; BackupError for what a backup never holds (a link other than
    an active Sieve script's, a special file), before anything is written."""
    scan = _Scan()
    if not root.is_dir():
        return scan
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            mode = os.lstat(here / name).st_mode
            if stat.S_ISLNK(mode) and not (name in filenames and is_active_link(here / name)):
                raise BackupError(f"{here / name} is a symbolic link, which a backup never "
                                  f"holds: the backup is damaged")
            if not (stat.S_ISLNK(mode) or stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise BackupError(f"{here / name} is not a regular file: the backup is damaged")
        if is_folder(dirnames):
            scan.folders += 1
            if len(here.relative_to(root).parts) == 2:
                scan.users.append(here)
            for sub in MESSAGE_DIRS:
                for entry in os.scandir(here / sub) if (here / sub).is_dir() else ():
                    if entry.is_file(follow_symlinks=False):
                        scan.messages += 1
                        scan.bytes += entry.stat(follow_symlinks=False).st_size
            dirnames[:] = [d for d in dirnames if d not in MAILDIR_DIRS]
    return scan


def _scan_queue(queue: Path) -> list[str]:
    """The queue ids whose envelope and message the backup holds; BackupError for a link
    or special file among them, before anything is written (the copy, which follows no
    link, stopped half-way on one, the accounts and Maildirs replaced already)."""
    try:
        names = os.listdir(queue / "env")
    except FileNotFoundError:
        return []
    ids = []
    for name in sorted(names):
        queue_id = name[:-5]
        if not name.endswith(".json") or not ID_RE.fullmatch(queue_id):
            continue
        try:
            modes = [os.lstat(p).st_mode for p in (queue / "env" / name, queue / "msg" / queue_id)]
        except FileNotFoundError:
            continue   # an envelope without its message: never written so by a backup
        if not all(stat.S_ISREG(m) for m in modes):
            raise BackupError(f"{queue / 'msg' / queue_id} or its envelope is not a regular "
                              f"file: the backup is damaged")
        ids.append(queue_id)
    return ids


def _server_running(config: Config) -> bool:
    """A server holds state_dir/queue/lock (flock) for its whole life."""
    return lock_held(config.queue_dir / "lock")


def _has_messages(maildir: Path) -> bool:
    for dirpath, dirnames, _ in os.walk(maildir):
        for sub in MESSAGE_DIRS:
            if sub in dirnames:
                with os.scandir(Path(dirpath) / sub) as it:
                    if any(e.is_file(follow_symlinks=False) for e in it):
                        return True
        dirnames[:] = [d for d in dirnames if d not in MAILDIR_DIRS]
    return False


def _existing_accounts(path: Path, quick: bool = False) -> str | None:
    """What an existing accounts database holds, if anything ("2 domains, 5 users...");
    with `quick`, only whether it is unreadable (its reason, else None)."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(sqlite_uri(path, "mode=rw"), uri=True, timeout=5.0)
        try:
            if quick:
                db.execute("PRAGMA schema_version").fetchone()
                return None
            facts = database_facts(db, str(path))
        finally:
            db.close()
    except (sqlite3.Error, BackupError) as e:
        return f"an unreadable database ({e})"
    if not (facts["domains"] or facts["users"] or facts["aliases"]):
        return None
    return (f"{counted(facts['domains'], 'domain')}, {counted(facts['users'], 'user')}, "
            f"{counted(facts['aliases'], 'alias')}")


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def restore(config: Config, src: Path, *, force: bool = False,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Restore the backup in `src` into this configuration's state_dir and maildir_root
    (the server stopped); the manifest."""
    if config.accounts.url:
        raise BackupError("accounts.url: the accounts are in PostgreSQL, which this command "
                          "does not restore: restore the database from its pg_dump (README, "
                          "\"Accounts on PostgreSQL\")")
    src = Path(os.path.abspath(src))
    manifest = read_manifest(src)
    for key, root in (("server.state_dir", config.state_dir),
                      ("storage.maildir_root", config.maildir_root)):
        if is_within(src, root) or (root.exists() and is_within(root, src)):
            raise BackupError(f"{src} and {key} ({root}) overlap: restore from elsewhere")
    scan = verify(src, manifest)
    accounts = manifest["accounts"]
    if accounts is not None:
        _check_backup_database(src / accounts["file"], accounts)
    if _server_running(config):
        raise BackupError(f"the server is running on {config.state_dir} (it holds "
                          f"{config.queue_dir / 'lock'}): stop it before restoring")

    # What would be replaced: refused unless force.
    replaced: list[str] = []
    if accounts is not None:
        held = _existing_accounts(config.accounts_db)
        if held:
            replaced.append(f"the accounts database {config.accounts_db} ({held})")
    maildirs_with_mail = []
    for user_dir in scan.users:
        rel = user_dir.relative_to(src / "maildirs")
        target = config.maildir_root / rel
        if target.exists() and _has_messages(target):
            maildirs_with_mail.append(target)
            replaced.append(f"the Maildir {target}, which holds mail")
    for rel in [*manifest["dkim"], *manifest["tls"]["files"]]:
        target = _state_target(config, rel)
        if target.exists() and not _same_file(target, src / rel):
            replaced.append(f"{target}, which differs")
    for queue_id in scan.queue:
        if (config.queue_dir / "env" / f"{queue_id}.json").exists():
            replaced.append(f"queued message {queue_id}")
    if replaced and not force:
        more = f" and {len(replaced) - 1} more" if len(replaced) > 1 else ""
        raise BackupError(f"restore would replace {replaced[0]}{more}; nothing was changed "
                          f"(--force replaces them with the backup's)")

    _check_targets(src / "maildirs", config.maildir_root)
    try:
        _write(config, src, manifest, scan, maildirs_with_mail, say)
    except (OSError, sqlite3.Error) as e:
        what = (f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename
                else str(e))
        raise BackupError(f"{what}; the restore stopped half-way: fix that and run it "
                          f"again with --force") from None
    say(f"the backup's configuration is in {src / manifest['config']} (not installed; "
        f"this restore followed {config.path})")
    return manifest


def _write(config: Config, src: Path, manifest: dict[str, Any], scan: _Scan,
           maildirs_with_mail: list[Path], say: Callable[[str], None]) -> None:
    for root in (config.state_dir, config.maildir_root):
        make_dirs(root)
    accounts = manifest["accounts"]
    if accounts is not None:
        _restore_database(src / accounts["file"], config.accounts_db)
        say(f"restored the accounts database: {counted(accounts['domains'], 'domain')}, "
            f"{counted(accounts['users'], 'user')}, {counted(accounts['aliases'], 'alias')} "
            f"(schema version {accounts['schema_version']}"
            + (f"; the server upgrades it to {SCHEMA_VERSION} when it starts)"
               if accounts["schema_version"] < SCHEMA_VERSION else ")"))
    for target in maildirs_with_mail:
        say(f"replacing the Maildir {target}")
    _restore_maildirs(src / "maildirs", config.maildir_root, scan.users)
    say(f"restored {counted(len(scan.users), 'Maildir')} ({counted(scan.folders, 'folder')}, "
        f"{counted(scan.messages, 'message')}) into {config.maildir_root}")
    _restore_queue(src / "state" / "queue", config.queue_dir, scan.queue)
    say(f"restored {counted(len(scan.queue), 'queued message')}")
    for rel in manifest["dkim"]:
        _restore_file(src / rel, _state_target(config, rel), 0o600)
    say(f"restored {counted(len(manifest['dkim']), 'DKIM key')}")
    for rel, kind in manifest["tls"]["files"].items():
        _restore_file(src / rel, _state_target(config, rel),
                      0o644 if kind == "certificate" else 0o600)
    tls_note = manifest["tls"].get("note")
    say(f"restored {counted(len(manifest['tls']['files']), 'certificate and key file')}"
        + (f" ({tls_note})" if isinstance(tls_note, str) and tls_note else ""))
    sync_tree(config.state_dir)
    sync_tree(config.maildir_root)


def _state_target(config: Config, rel: str) -> Path:
    """Where a backup's state/ file goes: DKIM keys and the ACME store follow the
    configuration (with [storage] shared, the shared root's .mailserver/)."""
    top, _, rest = rel[len("state/"):].partition("/")
    if top == "dkim" and rest:
        return config.dkim_dir / rest
    if top == "acme" and rest:
        return config.acme_dir / rest
    return config.state_dir / rel[len("state/"):]


def _check_backup_database(path: Path, accounts: dict[str, Any]) -> None:
    try:
        db = sqlite3.connect(sqlite_uri(path, "mode=ro&immutable=1"), uri=True)
        try:
            facts = database_facts(db, str(path))
        finally:
            db.close()
    except sqlite3.Error as e:
        raise BackupError(f"{path}: not a usable accounts database ({e})") from None
    try:
        check_known(facts["schema_version"])
    except SchemaError as e:
        raise BackupError(f"{path}: {e}") from None
    for key in ("schema_version", "domains", "users", "aliases"):
        if facts[key] != accounts[key]:
            raise BackupError(f"{path}: holds {facts[key]} {key.replace('_', ' ')}, the "
                              f"manifest says {accounts[key]}: the backup is damaged")


def _restore_database(src: Path, target: Path) -> None:
    """SQLite's backup API into the target connection: an existing database (and its
    -wal) is replaced as SQLite replaces pages, never by a file copy beside a stale WAL."""
    make_dirs(target.parent)
    if os.path.lexists(target) and _existing_accounts(target, quick=True) is not None:
        # Not a database SQLite can open (a forced restore over a damaged one): set aside
        # with its journal files, not written into.
        for suffix in ("", "-wal", "-shm", "-journal"):
            old = Path(f"{target}{suffix}")
            if os.path.lexists(old):
                os.replace(old, f"{old}.damaged")
    os.close(os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
    os.chmod(target, 0o600)
    source = sqlite3.connect(sqlite_uri(src, "mode=ro&immutable=1"), uri=True)
    try:
        dst = sqlite3.connect(target, timeout=5.0)
        try:
            # Out of WAL first: SQLite copies into a WAL database only at the same page size.
            dst.execute("PRAGMA journal_mode = DELETE")
            source.backup(dst)
            mode = dst.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BackupError(f"{target}: cannot switch to WAL mode (got {mode})")
        finally:
            dst.close()
    finally:
        source.close()


def _restore_file(src: Path, target: Path, mode: int) -> None:
    make_dirs(target.parent)
    if target.exists() or target.is_symlink():
        target.unlink()
    copy_file(src, target, mode)


def _check_targets(src_root: Path, root: Path) -> None:
    """No directory the restore writes into, below maildir_root, may be a symbolic link:
    the restore runs as root, and would delete and write wherever one points."""
    if not src_root.is_dir():
        return
    for dirpath, dirnames, _ in os.walk(src_root):
        target = root / Path(dirpath).relative_to(src_root)
        if target != root and os.path.islink(target):   # each level in its turn
            raise BackupError(f"{target} is a symbolic link: the restore does not write "
                              f"through one; nothing was changed")


def _restore_maildirs(src_root: Path, root: Path, users: list[Path]) -> None:
    """Copy maildirs/ into maildir_root; the backup's user Maildirs replace same-named
    ones (checked for mail beforehand), other files there are added where missing."""
    user_set = set(users)
    for dirpath, dirnames, filenames in os.walk(src_root):
        here = Path(dirpath)
        target = root / here.relative_to(src_root)
        if here in user_set:
            if target.exists() or target.is_symlink():
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            dirnames[:] = []
            _copy_tree(here, target)
            continue
        make_dirs(target)
        for name in filenames:
            if not os.path.lexists(target / name):
                copy_file(here / name, target / name)


def _copy_tree(src: Path, target: Path) -> None:
    make_dir(target)
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        out = target / here.relative_to(src)
        for d in dirnames:
            make_dir(out / d)
        for name in filenames:
            if (here / name).is_symlink():
                # Only the active Sieve script's link is kept (pointing into its own
                # sieve/); a backup holds no other link, and none is ever followed.
                if is_active_link(here / name):
                    os.symlink(os.readlink(here / name), out / name)
                continue
            copy_file(here / name, out / name)


def _restore_queue(src: Path, queue: Path, ids: list[str]) -> None:
    """Messages first, envelopes last, as the queue writes them."""
    if not ids:
        return
    for sub in ("msg", "env", "tmp", "control"):
        make_dirs(queue / sub)
    for queue_id in ids:
        _restore_file(src / "msg" / queue_id, queue / "msg" / queue_id, 0o600)
    for queue_id in ids:
        _restore_file(src / "env" / f"{queue_id}.json", queue / "env" / f"{queue_id}.json",
                      0o600)


