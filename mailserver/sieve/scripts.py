"""Users' Sieve scripts on disk, in Pigeonhole's layout, so a Maildir tree moved from
Dovecot keeps its filters (and one moved back keeps them too).

In the user's Maildir directory:

    sieve/NAME.sieve       every script the user stored (ManageSieve, mailserver-admin)
    sieve/tmp/             scripts being written (Pigeonhole's place for them too)
    .dovecot.sieve         symlink to the active script: "sieve/NAME.sieve" (relative, as
                           Pigeonhole makes it); no link: no script is active

Neither shows as an IMAP folder: a Maildir++ folder is a "."-prefixed *directory*, and
`.dovecot.sieve` is a link to a file (the listing does not follow links); `sieve/` has
no leading dot.

What Pigeonhole accepts when reading is accepted here too:

- `.dovecot.sieve` as a regular file (written by hand, or by Dovecot before ManageSieve
  was used): it is the active script for delivery, but not a stored one, so listings do
  not show it (as Pigeonhole's do not).  The next activation or deactivation moves it
  into the storage as `dovecot.orig` (Pigeonhole's name for it), so nothing is lost.
- A link whose target ends in `sieve/NAME.sieve` under another directory (an absolute
  link made by Dovecot where the tree lived elsewhere) names the script NAME of this
  Maildir's `sieve/`.  The link's target itself is never opened: only files inside this
  Maildir's `sieve/` are ever read, so a link cannot lead delivery out of the Maildir.

Every change happens under an flock of the `sieve/` directory (the server's threads and
`mailserver-admin` alike), so limits are checked and applied as one step.  Files are
written whole (temporary file, fsync, rename, directory fsync); the active link is
replaced by renaming a new link over it, so a reader sees the old or the new script,
never none.

Disk-side code: imports nothing from Twisted; blocking, run it in a thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mailserver.fsutil import fsync_directory, unlink_quietly, write_durably
from mailserver.sieve.parser import Script, SieveSyntaxError, parse

log = logging.getLogger(__name__)

SIEVE_DIR = "sieve"
TMP_DIR = "tmp"
ACTIVE_LINK = ".dovecot.sieve"
SUFFIX = ".sieve"
RESCUED_NAME = "dovecot.orig"     # Pigeonhole's name for a rescued regular .dovecot.sieve
# A script's file name is NAME.sieve, and file names are at most 255 octets.  RFC 5804
# 1.6 asks for 128 characters; that fits for ASCII names, not for every UTF-8 one (as
# with Pigeonhole's file storage).
MAX_NAME_OCTETS = 255 - len(SUFFIX)
TMP_LEFTOVER_AGE = 3600.0         # seconds; older files in sieve/tmp/ are a crash's leftovers

Owner = tuple[int, int]           # (uid, gid) new files and directories get


# -- errors ------------------------------------------------------------------------------

class ScriptError(Exception):
    """A refused operation; the message says why in words fit for a client."""


class InvalidName(ScriptError):
    pass


class NoSuchScript(ScriptError):      # ManageSieve NONEXISTENT
    pass


class ScriptExists(ScriptError):      # ManageSieve ALREADYEXISTS
    pass


class ScriptIsActive(ScriptError):    # ManageSieve ACTIVE
    pass


class QuotaExceeded(ScriptError):
    """`code`: RFC 5804 1.3's QUOTA/MAXSIZE (a script too large, or all of them
    together) or QUOTA/MAXSCRIPTS (too many scripts)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class InvalidScript(ScriptError):
    """The parser refused the script: `line` (1-based) and `reason` are its."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


# -- values ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What one user may store ([sieve] max_script_size, max_scripts, quota)."""

    max_script_size: int = 64 * 1024
    max_scripts: int = 20
    quota: int = 1024 * 1024

    @classmethod
    def from_config(cls, sieve: object) -> "Limits":
        return cls(max_script_size=getattr(sieve, "max_script_size"),
                   max_scripts=getattr(sieve, "max_scripts"),
                   quota=getattr(sieve, "quota"))


@dataclass(frozen=True)
class ScriptInfo:
    name: str
    active: bool
    size: int


@dataclass(frozen=True)
class ScriptStat:
    """The active script as delivery needs it: the file to read, and a key that changes
    whenever another script becomes active or the script's content changes (a stored
    script is replaced by a rename: a new inode)."""

    path: Path
    name: str          # "" for a regular .dovecot.sieve file
    key: tuple[int, ...]


# -- names -------------------------------------------------------------------------------

_FORBIDDEN = {chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


def check_name(name: str) -> str:
    """`name` if it may name a script (RFC 5804 1.6: UTF-8, no control characters, no
    U+2028/U+2029), and is safe as a file name inside sieve/: no "/", no leading ".", at
    most MAX_NAME_OCTETS octets.  InvalidName otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidName("empty script name")
    try:
        octets = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidName("script name is not valid UTF-8") from None
    if octets > MAX_NAME_OCTETS:
        raise InvalidName(f"script name longer than {MAX_NAME_OCTETS} octets")
    if any(c in _FORBIDDEN for c in name):
        raise InvalidName("control character in script name")
    if "/" in name:
        raise InvalidName('"/" in script name')
    if name.startswith("."):
        raise InvalidName('script name starts with "."')
    return name


def _script_file(user_path: Path, name: str) -> Path:
    return user_path / SIEVE_DIR / (check_name(name) + SUFFIX)


# -- reading -----------------------------------------------------------------------------

def _stored(user_path: Path) -> dict[str, int]:
    """name -> size of every stored script (regular files NAME.sieve with a valid name)."""
    found: dict[str, int] = {}
    try:
        with os.scandir(user_path / SIEVE_DIR) as it:
            for entry in it:
                if not entry.name.endswith(SUFFIX):
                    continue
                name = entry.name[:-len(SUFFIX)]
                try:
                    check_name(name)
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    found[name] = entry.stat(follow_symlinks=False).st_size
                except (InvalidName, FileNotFoundError):
                    continue
    except (FileNotFoundError, NotADirectoryError):
        pass
    return found


def _link_target_name(target: str) -> str | None:
    """The script a link target names: ".../sieve/NAME.sieve" -> NAME; else None."""
    head, base = os.path.split(target)
    if not base.endswith(SUFFIX) or os.path.basename(os.path.normpath(head)) != SIEVE_DIR:
        return None
    try:
        return check_name(base[:-len(SUFFIX)])
    except InvalidName:
        return None


def _read_active(user_path: Path) -> tuple[str, str | None]:
    """("none", None), ("link", NAME or None when broken), ("file", None), or ("other",
    None): a directory (an IMAP folder "dovecot.sieve" is the Maildir++ directory
    .dovecot.sieve) or anything else that is neither a link nor a regular file."""
    link = user_path / ACTIVE_LINK
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return "none", None
    except OSError as e:
        if e.errno == errno.EINVAL:     # not a link
            try:
                return ("file" if stat.S_ISREG(os.lstat(link).st_mode) else "other"), None
            except FileNotFoundError:
                return "none", None
        if e.errno == errno.ENOTDIR:
            return "none", None
        raise
    return "link", _link_target_name(target)


def _not_in_the_way(user_path: Path) -> None:
    if _read_active(user_path)[0] == "other":
        raise ScriptError(f"{ACTIVE_LINK} in the Maildir is neither a link nor a file (an "
                          f"IMAP folder named \"dovecot.sieve\"?); no script can be active")


def active_name(user_path: Path) -> str | None:
    """The name of the active stored script; None when none is (or the active one is a
    regular .dovecot.sieve file, which is no stored script)."""
    kind, name = _read_active(user_path)
    if kind != "link" or name is None:
        return None
    return name if (user_path / SIEVE_DIR / (name + SUFFIX)).is_file() else None


def active_link(user_path: Path) -> str | None:
    """The relative target ("sieve/NAME.sieve") of the link that makes a stored script
    active, for a backup to make again; None when no stored script is active."""
    name = active_name(user_path)
    return None if name is None else f"{SIEVE_DIR}/{name}{SUFFIX}"


def is_active_link(path: Path) -> bool:
    """Whether `path` is a .dovecot.sieve link naming a script in its own Maildir's
    sieve/ by a relative path: the one link a restore makes again (it never follows it)."""
    try:
        target = os.readlink(path)
    except OSError:
        return False
    return (path.name == ACTIVE_LINK and not os.path.isabs(target)
            and target == f"{SIEVE_DIR}/{os.path.basename(target)}"
            and _link_target_name(target) is not None)


def script_stat(user_path: Path) -> ScriptStat | None:
    """The active script and its change key; None when no script is active.

    Cheap enough for every delivery: one readlink(2) when no script is active, a
    readlink and a stat(2) otherwise; nothing is read or parsed.  A broken link (its
    script deleted behind our back, or a target outside any sieve/ directory) counts as
    no active script."""
    kind, name = _read_active(user_path)
    if kind in ("none", "other"):
        return None
    if kind == "file":
        path = user_path / ACTIVE_LINK
        name = ""
    elif name is None:
        _warn_once(user_path, f"{ACTIVE_LINK} does not point to a script in {SIEVE_DIR}/; "
                              f"no script runs")
        return None
    else:
        path = user_path / SIEVE_DIR / (name + SUFFIX)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return ScriptStat(path, name, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                   st.st_ctime_ns))


_warned: set[tuple[Path, str]] = set()


def _warn_once(user_path: Path, message: str) -> None:
    """A warning per Maildir and problem, not one per delivery (bounded memory)."""
    key = (user_path, message)
    if key in _warned:
        return
    if len(_warned) >= 1000:
        _warned.clear()
    _warned.add(key)
    log.warning("%s: %s", user_path, message)


def active_script(user_path: Path) -> Path | None:
    """The file delivery runs for this user, or None (see `script_stat`)."""
    found = script_stat(user_path)
    return found.path if found is not None else None


def list_scripts(user_path: Path) -> list[ScriptInfo]:
    """Every stored script, sorted by name, the active one marked."""
    active = active_name(user_path)
    return [ScriptInfo(name, name == active, size)
            for name, size in sorted(_stored(user_path).items())]


def get_script(user_path: Path, name: str, max_size: int | None = None) -> bytes:
    """A stored script's content.  NoSuchScript when missing; ScriptError when larger
    than `max_size` (a file put there by other means)."""
    path = _script_file(user_path, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise NoSuchScript(f"no script named {name!r}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NoSuchScript(f"no script named {name!r}") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NoSuchScript(f"no script named {name!r}")
        data = f.read() if max_size is None else f.read(max_size + 1)
    if max_size is not None and len(data) > max_size:
        raise ScriptError(f"script {name!r} is larger than {max_size} octets")
    return data


# -- validation --------------------------------------------------------------------------

def validate(content: bytes, limits: Limits, name: str = "") -> Script:
    """The parsed script, or QuotaExceeded (too large) / InvalidScript (with the
    parser's line and reason)."""
    if len(content) > limits.max_script_size:
        raise QuotaExceeded(f"script larger than {limits.max_script_size} octets",
                            "QUOTA/MAXSIZE")
    try:
        return parse(content, name, max_size=limits.max_script_size)
    except SieveSyntaxError as e:
        raise InvalidScript(e.line, e.reason) from None


def include_warnings(user_path: Path, script: Script, global_dir: str = "",
                     pending: str | None = None) -> list[str]:
    """Words about the scripts `script` includes that do not exist (yet): not an error
    (RFC 6609 lets them be uploaded later; at delivery a missing one is a run-time
    error unless :optional).  `pending`: the name being stored, which exists after."""
    warnings: list[str] = []
    stored: dict[str, int] | None = None
    for name, is_global in script.includes:
        if is_global:
            if global_dir and not (Path(global_dir) / (name + SUFFIX)).is_file():
                warnings.append(f'global script "{name}" does not exist')
            continue
        if stored is None:
            stored = _stored(user_path)
        if name not in stored and name != pending:
            warnings.append(f'included script "{name}" does not exist')
    return warnings


def _check_space(stored: dict[str, int], name: str, size: int, limits: Limits) -> None:
    """RFC 5804 2.5's answer for storing `size` octets as `name` (QuotaExceeded)."""
    if size > limits.max_script_size:
        raise QuotaExceeded(f"script larger than {limits.max_script_size} octets",
                            "QUOTA/MAXSIZE")
    if name not in stored and len(stored) >= limits.max_scripts:
        raise QuotaExceeded(f"at most {limits.max_scripts} scripts", "QUOTA/MAXSCRIPTS")
    total = sum(stored.values()) - stored.get(name, 0) + size
    if total > limits.quota:
        raise QuotaExceeded(f"scripts would take {total} octets, over the quota of "
                            f"{limits.quota}", "QUOTA/MAXSIZE")


def have_space(user_path: Path, name: str, size: int, limits: Limits) -> None:
    """RFC 5804 2.5 HAVESPACE: returns when `size` octets could be stored as `name`."""
    check_name(name)
    _check_space(_stored(user_path), name, size, limits)


# -- changing ----------------------------------------------------------------------------

def _mkdir(path: Path, owner: Owner | None) -> bool:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, *owner)
    return True


def _ensure_dirs(user_path: Path, owner: Owner | None) -> Path:
    if not user_path.is_dir():
        raise ScriptError(f"no Maildir at {user_path}")
    sieve = user_path / SIEVE_DIR
    if _mkdir(sieve, owner):
        fsync_directory(user_path)
    if _mkdir(sieve / TMP_DIR, owner):
        fsync_directory(sieve)
    return sieve


@contextmanager
def _locked(sieve: Path) -> Iterator[None]:
    """Exclusive flock of the sieve/ directory, shared by every process that changes it."""
    fd = os.open(sieve, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)    # releases the lock


def _tmp_name(sieve: Path) -> Path:
    return sieve / TMP_DIR / f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(6)}"


def _clean_tmp(sieve: Path) -> None:
    """Remove what a crash left in sieve/tmp/ (only old files: a writer not taking the
    lock, such as Dovecot on a shared tree, may be using a new one)."""
    cutoff = time.time() - TMP_LEFTOVER_AGE
    try:
        with os.scandir(sieve / TMP_DIR) as it:
            old = [e.path for e in it
                   if e.is_file(follow_symlinks=False)
                   and e.stat(follow_symlinks=False).st_mtime < cutoff]
    except FileNotFoundError:
        return
    for path in old:
        unlink_quietly(path)


def put_script(user_path: Path, name: str, content: bytes, limits: Limits, *,
               global_dir: str = "", owner: Owner | None = None) -> list[str]:
    """RFC 5804 2.6 PUTSCRIPT: validate, check the limits, store (replacing a script of
    that name; the active one stays active).  Returns warnings (RFC 5804 1.3 WARNINGS)."""
    check_name(name)
    script = validate(content, limits, name)
    sieve = _ensure_dirs(user_path, owner)
    with _locked(sieve):
        _check_space(_stored(user_path), name, len(content), limits)
        _clean_tmp(sieve)
        tmp = _tmp_name(sieve)
        path = sieve / (name + SUFFIX)
        if owner is None:
            write_durably(path, content, tmp=tmp)
        else:
            _write_owned(path, content, tmp, owner)
    return include_warnings(user_path, script, global_dir, pending=name)


def _write_owned(path: Path, content: bytes, tmp: Path, owner: Owner) -> None:
    """write_durably, the file handed to `owner` before it takes its name."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    placed = False
    try:
        try:
            os.fchown(fd, *owner)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        placed = True
        fsync_directory(path.parent)
    finally:
        if not placed:
            unlink_quietly(tmp)


def _replace_link(user_path: Path, target: str | None, owner: Owner | None) -> None:
    """Point .dovecot.sieve at `target` (relative), or remove it (None): a new link made
    under a temporary name and renamed over the old one, so it is replaced in one step."""
    link = user_path / ACTIVE_LINK
    if target is None:
        try:
            os.unlink(link)
        except FileNotFoundError:
            return
    else:
        tmp = user_path / f"{ACTIVE_LINK}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        os.symlink(target, tmp)
        try:
            if owner is not None:
                os.chown(tmp, *owner, follow_symlinks=False)
            os.rename(tmp, link)
        except BaseException:
            unlink_quietly(tmp)
            raise
    fsync_directory(user_path)


def _rescue_regular_file(user_path: Path, sieve: Path) -> None:
    """A regular .dovecot.sieve is moved into the storage before a link replaces it (as
    Pigeonhole does): dovecot.orig, or dovecot.orig-N when that name is taken."""
    if _read_active(user_path)[0] != "file":
        return
    stored = _stored(user_path)
    name, n = RESCUED_NAME, 1
    while name in stored or (sieve / (name + SUFFIX)).exists():
        n += 1
        name = f"{RESCUED_NAME}-{n}"
    os.rename(user_path / ACTIVE_LINK, sieve / (name + SUFFIX))
    fsync_directory(sieve)
    fsync_directory(user_path)
    log.info("%s: the regular file %s was moved to %s/%s%s", user_path, ACTIVE_LINK,
             SIEVE_DIR, name, SUFFIX)


def activate(user_path: Path, name: str, *, owner: Owner | None = None) -> None:
    """RFC 5804 2.8 SETACTIVE: make `name` the active script ("" deactivates)."""
    if name == "":
        deactivate(user_path, owner=owner)
        return
    path = _script_file(user_path, name)
    sieve = user_path / SIEVE_DIR
    if not sieve.is_dir():
        raise NoSuchScript(f"no script named {name!r}")
    with _locked(sieve):
        if not path.is_file() or path.is_symlink():
            raise NoSuchScript(f"no script named {name!r}")
        _not_in_the_way(user_path)
        _rescue_regular_file(user_path, sieve)
        kind, current = _read_active(user_path)
        if kind == "link" and current == name and os.readlink(
                user_path / ACTIVE_LINK) == f"{SIEVE_DIR}/{name}{SUFFIX}":
            return
        _replace_link(user_path, f"{SIEVE_DIR}/{name}{SUFFIX}", owner)


def deactivate(user_path: Path, *, owner: Owner | None = None) -> None:
    """SETACTIVE "": no script active.  A regular .dovecot.sieve is kept in the storage."""
    sieve = user_path / SIEVE_DIR
    kind, _ = _read_active(user_path)
    if kind in ("none", "other"):
        return
    if kind == "file":
        sieve = _ensure_dirs(user_path, owner)
        with _locked(sieve):
            _rescue_regular_file(user_path, sieve)
        return
    if not sieve.is_dir():
        _replace_link(user_path, None, owner)
        return
    with _locked(sieve):
        if _read_active(user_path)[0] == "link":
            _replace_link(user_path, None, owner)


def delete_script(user_path: Path, name: str) -> None:
    """RFC 5804 2.10 DELETESCRIPT; the active script is refused (ScriptIsActive)."""
    path = _script_file(user_path, name)
    sieve = user_path / SIEVE_DIR
    if not sieve.is_dir():
        raise NoSuchScript(f"no script named {name!r}")
    with _locked(sieve):
        if not path.is_file() or path.is_symlink():
            raise NoSuchScript(f"no script named {name!r}")
        if active_name(user_path) == name:
            raise ScriptIsActive(f"script {name!r} is active; deactivate it first")
        os.unlink(path)
        fsync_directory(sieve)


def rename_script(user_path: Path, old: str, new: str, *,
                  owner: Owner | None = None) -> None:
    """RFC 5804 2.11 RENAMESCRIPT: the active script stays active under its new name.
    The new name is linked first (never replacing an existing script), the active link
    moved, then the old name removed: a crash leaves both names, never neither."""
    old_path = _script_file(user_path, old)
    new_path = _script_file(user_path, new)
    sieve = user_path / SIEVE_DIR
    if not sieve.is_dir():
        raise NoSuchScript(f"no script named {old!r}")
    with _locked(sieve):
        if not old_path.is_file() or old_path.is_symlink():
            raise NoSuchScript(f"no script named {old!r}")
        try:
            os.link(old_path, new_path)
        except FileExistsError:
            raise ScriptExists(f"a script named {new!r} exists") from None
        fsync_directory(sieve)
        if active_name(user_path) == old:
            _replace_link(user_path, f"{SIEVE_DIR}/{new}{SUFFIX}", owner)
        os.unlink(old_path)
        fsync_directory(sieve)
