"""Special-use attributes that CREATE gave to folders (RFC 6154 3), kept per account.

Dovecot has no place for them in a Maildir (its special-use comes from the server's
configuration, per folder name), so they live in a small file of ours in the user's
Maildir, `mailserver-special-use`, which Dovecot ignores:

    <attribute> TAB <folder name in modified UTF-7> LF

one line per folder.  The default folders' attributes (Sent, Drafts, ...) come from their
names and are not written here.  The file is changed under a dot-lock on it and replaced
durably (fsutil.write_durably); a line that does not parse is dropped on the next write.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from mailserver.fsutil import write_durably
from mailserver.maildir.names import decode_folder_name, encode_folder_name
from mailserver.maildir.uidlist import DotLock

log = logging.getLogger(__name__)

SPECIAL_USE_FILE = "mailserver-special-use"
# The uses a real folder can have (RFC 6154 2); \All and \Flagged name virtual views.
ATTRIBUTES = ("\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash")
MAX_FILE = 1 << 20   # octets read; an account with more is damaged, not busy


def parse(data: bytes) -> dict[str, str]:
    """{folder name: attribute} from the file's content; bad lines are skipped."""
    uses: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        attribute, tab, encoded = line.partition("\t")
        if not tab or attribute not in ATTRIBUTES:
            continue
        try:
            name = decode_folder_name(encoded)
        except ValueError:
            continue
        if name and "\t" not in name and "\n" not in name:
            uses[name] = attribute
    return uses


def format_uses(uses: dict[str, str]) -> bytes:
    return "".join(f"{attribute}\t{encode_folder_name(name)}\n"
                   for name, attribute in sorted(uses.items())).encode("ascii")


def read(maildir: Path) -> dict[str, str]:
    """The attributes stored for the account whose Maildir is `maildir` (small: read at
    once)."""
    try:
        with open(maildir / SPECIAL_USE_FILE, "rb") as f:
            return parse(f.read(MAX_FILE))
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("cannot read %s: %s", str(maildir / SPECIAL_USE_FILE), e)
        return {}


def update(maildir: Path, change: Callable[[dict[str, str]], dict[str, str] | None],
           timeout: float) -> bool:
    """Apply `change` (None: nothing to do) to the stored attributes, under the file's
    dot-lock, and write the result durably; True if written.  LockTimeout when another
    process holds the lock for more than `timeout` seconds."""
    path = maildir / SPECIAL_USE_FILE
    with DotLock(path, timeout=timeout):
        result = change(read(maildir))
        if result is None:
            return False
        write_durably(path, format_uses(result))
        return True
