"""What the server needs from the machine before it starts, settled before anything runs.

twistd builds the service as root, binds the ports, and only then drops to `--uid/--gid`.
Whatever the server (or `mailserver-admin` run as root before the first start) created
as root until then would be unusable afterwards: a root-owned 0700 state_dir makes every
delivery a 451 and every IMAP login a failure while the server looks "started".  So, run
as root for another user, the server creates its directories for that user and hands it
what root created in them; in every case it then checks that the user can write them, and
otherwise refuses to start with one line that names the path and the fix.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mailserver.config import Config

# How deep the Maildir tree is checked and handed over: <root>/<domain>/<localpart>.
# Below a user's directory everything was created by the same hands as that directory.
MAILDIR_LEVELS = 2


class StartupError(Exception):
    """The server cannot run on this machine as configured; the message is one line."""


@dataclass(frozen=True)
class RunAs:
    """The user the server runs as once privileges are dropped."""

    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def group_name(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)

    @property
    def groups(self) -> set[int]:
        try:
            return {self.gid, *os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid)}
        except (KeyError, OSError):
            return {self.gid}

    @property
    def owner(self) -> str:
        return f"{self.name}:{self.group_name}"

    @classmethod
    def current(cls) -> RunAs:
        return cls(os.geteuid(), os.getegid())

    @classmethod
    def from_twistd(cls, uid: int | None, gid: int | None) -> RunAs:
        """The user twistd switches to (--uid/--gid, the gid defaulting to the user's
        primary group as twistd does), or the current one."""
        if uid is None:
            return cls(os.geteuid(), gid if gid is not None else os.getegid())
        if gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = os.getegid()
        return cls(uid, gid)

    @property
    def dropping(self) -> bool:
        """Root now, someone else once twistd has bound the ports."""
        return os.geteuid() == 0 and self.uid != 0


# -- directories ---------------------------------------------------------------------------

def prepare_directories(config: Config, run_as: RunAs) -> None:
    """state_dir and maildir_root exist, belong to `run_as` where root made them, and are
    writable by it; StartupError otherwise."""
    for key, path in (("server.state_dir", config.state_dir),
                      ("storage.maildir_root", config.maildir_root)):
        _make_directory(key, path, run_as, 0o700)
    hand_over(config, run_as)
    check_writable(config, run_as)


def hand_over(config: Config, run_as: RunAs) -> None:
    """Run as root for another user: give that user whatever root created in the state
    directory (all of it: accounts database, keys, certificate, queue) and in the top
    levels of the Maildir tree.  Only root-owned entries change owner, and only in a tree
    that is the server's: owned by that user already, or a private (0700) directory of
    root's that is no system or home directory (what the server's and mailserver-admin's
    own mkdir leave).  Anything else stays as it is, for check_writable to explain."""
    if not run_as.dropping:
        return
    for top, levels in ((config.state_dir, None), (config.maildir_root, MAILDIR_LEVELS)):
        if not _servers_own(top, run_as):
            continue
        for path in _tree(top, levels):
            if _take(path, run_as) and levels is not None and _is_dir(path) and path != top:
                for inner in _tree(path, None):   # root made it: root made what is inside
                    _take(inner, run_as)


def check_writable(config: Config, run_as: RunAs) -> None:
    """Every directory of the state tree, the accounts database and the top of the Maildir
    tree must be writable by `run_as`; the first that is not is the error."""
    checks: list[tuple[str, Path]] = [("server.state_dir", p)
                                      for p in _tree(config.state_dir, None) if _is_dir(p)]
    checks += [("server.state_dir", Path(f"{config.accounts_db}{suffix}"))
               for suffix in ("", "-wal", "-shm")]
    checks += [("storage.maildir_root", p)
               for p in _tree(config.maildir_root, MAILDIR_LEVELS) if _is_dir(p)]
    for key, path in checks:
        if not path.exists():
            continue
        _check_reachable(key, path, run_as)
        if not _may(path, run_as, write=True):
            st = path.stat()
            raise StartupError(
                f"{key}: {path} is not writable by {run_as.name} (owner {_user(st.st_uid)}, "
                f"mode {stat.S_IMODE(st.st_mode):04o}); give it to the server's user: "
                f"chown -R {run_as.owner} {_top(path, config)}")


def prepare_log_file(path: str | None, run_as: RunAs) -> None:
    """twistd opens --logfile (as root, before the drop) in a directory that must exist
    and, to rotate it, be writable by the server's user: create it for that user."""
    if not path or path == "-":
        return
    log = Path(path).absolute()
    _make_directory("--logfile", log.parent, run_as, 0o750, fix="mkdir -p")
    if run_as.dropping and _is_owned_by(log.parent, run_as.uid):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(fd)
        _take(log, run_as)


def _make_directory(key: str, path: Path, run_as: RunAs, mode: int, fix: str = "") -> None:
    """Create `path` and its missing parents, owned by `run_as` when run as root for it."""
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise StartupError(f"{key}: {p} is not a directory")
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode if directory == path else 0o755)
        except FileExistsError:
            continue
        except OSError as e:
            how = (f"install -d -o {run_as.name} -g {run_as.group_name} -m {mode:o} {path}"
                   if not fix else f"{fix} {path}")
            raise StartupError(f"{key}: cannot create {directory}: {e.strerror}; "
                               f"create it: {how}") from None
        if run_as.dropping and directory == path:   # parents made on the way stay root's
            os.chown(directory, run_as.uid, run_as.gid)


def _check_reachable(key: str, path: Path, run_as: RunAs) -> None:
    for parent in reversed(path.parents):
        if not _may(parent, run_as, write=False):
            st = parent.stat()
            raise StartupError(
                f"{key}: {run_as.name} cannot reach {path}: {parent} is mode "
                f"{stat.S_IMODE(st.st_mode):04o}, owner {_user(st.st_uid)}; "
                f"let it through (chmod o+x {parent}) or choose another path")


def _may(path: Path, run_as: RunAs, write: bool) -> bool:
    """Would `run_as` be allowed to enter (and with `write`, change) `path`?  From the mode
    bits as the kernel reads them; os.access would answer for the current user."""
    if run_as.uid == 0:
        return True
    if run_as.uid == os.geteuid():
        mode = os.X_OK if path.is_dir() else os.R_OK
        return os.access(path, mode | (os.W_OK if write else 0))
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_uid == run_as.uid:
        shift = 6
    elif st.st_gid in run_as.groups:
        shift = 3
    else:
        shift = 0
    bits = (st.st_mode >> shift) & 0o7
    needed = (0o2 if write else 0) | (0o1 if stat.S_ISDIR(st.st_mode) else 0o4)
    return bits & needed == needed


# Never handed over, whatever a config says.
_SYSTEM_DIRS = {Path(p) for p in ("/", "/root", "/home", "/etc", "/usr", "/var", "/var/lib",
                                   "/var/mail", "/var/spool", "/var/log", "/srv", "/opt",
                                   "/tmp", "/var/tmp", "/run", "/mnt", "/media")}


def _servers_own(top: Path, run_as: RunAs) -> bool:
    try:
        st = top.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if st.st_uid == run_as.uid:
        return True
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o700 or top in _SYSTEM_DIRS:
        return False
    others = {Path(user.pw_dir) for user in pwd.getpwall() if user.pw_uid != run_as.uid}
    return top not in others


def _tree(top: Path, levels: int | None) -> Iterator[Path]:
    """`top` and what is below it, `levels` deep (None: all), symlinks not followed."""
    if not top.exists():
        return
    yield top
    if levels == 0 or top.is_symlink() or not top.is_dir():
        return
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _tree(Path(entry.path), None if levels is None else levels - 1)
        else:
            yield Path(entry.path)


def _take(path: Path, run_as: RunAs) -> bool:
    """Hand a root-owned `path` to `run_as`; True if it was root's."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if st.st_uid != 0:
        return False
    os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)
    return True


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _is_owned_by(path: Path, uid: int) -> bool:
    try:
        return path.stat().st_uid == uid
    except OSError:
        return False


def _top(path: Path, config: Config) -> Path:
    for top in (config.state_dir, config.maildir_root):
        if path == top or top in path.parents:
            return top
    return path


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
