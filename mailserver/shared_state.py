"""What the nodes of a shared Maildir root ([storage] shared) keep there besides mail.

`<maildir_root>/.mailserver/` (config.shared_dir) holds the DKIM keys (`dkim/`) and the
ACME store (`acme/`: account key, certificate, challenges in progress, the order lock), so
that every node signs with the same keys and serves the same certificate.  No mailbox path
reaches it: domains and local parts never start with "." (maildir.names), and whatever
walks the root for mail (backup, the tmp/ cleaner) skips it.  Directories are 0700 and
files 0600: private keys.

Blocking (a few mkdirs and small copies, at start or in the admin tool); imports nothing
from Twisted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mailserver.dkim.keys import SELECTOR_RE
from mailserver.fsutil import write_durably

log = logging.getLogger(__name__)

# A DKIM key file is about 1.7 KB (RSA-2048 PEM); anything much larger is not one.
MAX_KEY_BYTES = 64 * 1024


def make_private_dirs(path: Path, top: Path) -> None:
    """`path` and each missing directory between `top` (included) and it, mode 0700;
    Path.mkdir(parents=True) would give the ones on the way the umask's mode."""
    path, top = Path(path), Path(top)
    if path != top and top not in path.parents:
        raise ValueError(f"{path} is not inside {top}")
    if not top.is_dir():
        top.parent.mkdir(parents=True, exist_ok=True)
        top.mkdir(mode=0o700, exist_ok=True)
    current = top
    for part in path.relative_to(top).parts:
        current = current / part
        current.mkdir(mode=0o700, exist_ok=True)


def adopt_shared_keys(local: Path, shared: Path, maildir_root: Path) -> None:
    """At a node's start: the shared DKIM directory `shared` exists (0700), and holds the
    keys this node kept in `local` (its state_dir/dkim) before (adopt_local_keys); what
    was done is logged."""
    make_private_dirs(shared, maildir_root)
    copied, differing = adopt_local_keys(local, shared)
    for name in copied:
        log.info("dkim: key %s copied from %s to the shared %s", name, local, shared)
    for name in differing:
        log.warning("dkim: %s differs from the shared key of that name in %s, which every "
                    "node signs with", local / name, shared)


def adopt_local_keys(local_dir: Path, shared_dir: Path) -> tuple[list[str], list[str]]:
    """DKIM keys a node kept in state_dir/dkim before the root was shared: each one the
    shared directory lacks is copied there (the first node's copy of a name wins), so a
    key already published in DNS stays the one mail is signed with.  Returns (names
    copied, names whose local copy differs from the shared one, which is used)."""
    try:
        entries = sorted(os.scandir(local_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    copied: list[str] = []
    differing: list[str] = []
    for entry in entries:
        name = entry.name
        if not _is_key_name(name) or not entry.is_file(follow_symlinks=False):
            continue
        data = _read_small(Path(entry.path))
        if data is None:
            continue
        target = shared_dir / name
        if write_durably(target, data, mode=0o600, keep_existing=True):
            _owned_like(target, shared_dir)
            copied.append(name)
        elif _read_small(target) != data:
            differing.append(name)
    return copied, differing


def _owned_like(path: Path, directory: Path) -> None:
    """Run as root (a start before privileges are dropped): a file written into the
    server user's directory belongs to that user, or the server could not read it."""
    if os.geteuid() != 0:
        return
    st = directory.stat()
    if st.st_uid != 0:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)


def _is_key_name(name: str) -> bool:
    """<domain>.<selector>.key, as mailserver.dkim.keys writes it."""
    if name.startswith(".") or not name.endswith(".key"):
        return False
    domain, _, selector = name[:-4].rpartition(".")
    return bool(domain) and SELECTOR_RE.fullmatch(selector) is not None


def _read_small(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        log.warning("dkim: cannot read %s: %s", path, e.strerror or e)
        return None
    return data if len(data) <= MAX_KEY_BYTES else None
