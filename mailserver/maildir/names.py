"""Names on disk: user directories, folder directories, and the subscriptions file.

Folder names follow Dovecot's Maildir++ layout so a mailbox tree can move between this
server and Dovecot unchanged:

- The IMAP-visible hierarchy separator is '.', the same character Maildir++ uses on disk
  (Dovecot's default for this layout).  "Work.2024" is the directory ".Work.2024".
- Each name is stored in IMAP modified UTF-7 (RFC 3501 5.1.3), as Dovecot does by default:
  "Entwürfe" is the directory ".Entw&APw-rfe".
- INBOX (any case) is the Maildir root itself; "INBOX.x" is the child ".INBOX.x".
- A name component must be non-empty and may not contain '/' or control characters, so a
  folder name can never leave its user's Maildir or confuse the uid and index files.

Subscriptions use Dovecot's version 2 file ("V\\t2\\n\\n", then one mailbox per line with its
hierarchy levels separated by TAB, each level in its on-disk modified UTF-7 form and
tab-escaped).  Dovecot 2.2 and later read and keep that format; version 1 files (plain
names with '.' separators, as older Dovecot wrote) are read as well.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
from pathlib import Path
from typing import Iterable

SEPARATOR = "."
INBOX = "INBOX"
SUBSCRIPTIONS_FILE = "subscriptions"
SUBSCRIPTIONS_V2_HEADER = b"V\t2\n\n"
NAME_MAX = 255  # bytes in one path component on the file systems we run on

_BASE64_CHARS = re.compile(r"[A-Za-z0-9+,]+")
# C0 and C1 controls, DEL, and the line and paragraph separators: never in a folder name
# (RFC 6855 3, RFC 9051 5.1), whichever way the client wrote it.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# -- user directories -------------------------------------------------------------------

def is_inbox(name: str) -> bool:
    """INBOX in any ASCII case (RFC 3501 5.1), and only that: str.upper() makes
    "\u0131nbox" (a dotless i) INBOX too."""
    return len(name) == 5 and name.isascii() and name.upper() == INBOX


def check_path_component(value: str, what: str) -> str:
    """Return `value` if it is safe as one directory name under the Maildir root.

    Domain and local part come from the network; this keeps them from naming anything
    but a plain child directory ('..', '/', hidden or over-long names are refused).
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if "/" in value or "\x00" in value:
        raise ValueError(f"{what} must not contain '/' or NUL: {value!r}")
    if value.startswith("."):
        raise ValueError(f"{what} must not start with '.': {value!r}")
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters: {value!r}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode: {value!r}") from None
    if len(encoded) > NAME_MAX:
        raise ValueError(f"{what} is longer than {NAME_MAX} bytes")
    return value


def normalized(path: str | os.PathLike[str]) -> Path:
    """`path` absolute, with '.', '..' and repeated separators resolved by name (no
    symlinks followed): the form every per-path table of the store is keyed by.

    Remembered for absolute paths, since every delivery and notification asks for the
    same few Maildirs again (a relative one depends on the working directory).
    """
    if os.path.isabs(path):
        return _normalized_absolute(path)
    return Path(os.path.normpath(os.path.abspath(path)))


@functools.lru_cache(maxsize=4096)
def _normalized_absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.normpath(path))


def is_inside(path: Path, root: Path) -> bool:
    """True if `path` is `root` or below it, judged on the normalised names."""
    p = str(normalized(path))
    r = str(normalized(root))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


# -- modified UTF-7 -----------------------------------------------------------------------

def encode_folder_name(name: str) -> str:
    """IMAP modified UTF-7 for `name`: the form IMAP clients send and Dovecot stores."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            try:
                raw = "".join(pending).encode("utf-16-be")
            except UnicodeEncodeError:
                raise ValueError(f"not valid Unicode: {name!r}") from None
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append(f"&{b64}-")
            pending.clear()

    for ch in name:
        if "\x20" <= ch <= "\x7e":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode_folder_name(encoded: str) -> str:
    """Unicode for a modified UTF-7 name; ValueError unless it is canonical modified UTF-7.

    Strict so that two different byte strings never name the same folder.
    """
    out: list[str] = []
    i, n = 0, len(encoded)
    while i < n:
        ch = encoded[i]
        if ch != "&":
            if not "\x20" <= ch <= "\x7e":
                raise ValueError(f"not modified UTF-7 (raw {ch!r}): {encoded!r}")
            out.append(ch)
            i += 1
            continue
        end = encoded.find("-", i + 1)
        if end < 0:
            raise ValueError(f"unterminated '&' sequence: {encoded!r}")
        chunk = encoded[i + 1:end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        if not _BASE64_CHARS.fullmatch(chunk):
            raise ValueError(f"bad base64 in modified UTF-7: {encoded!r}")
        try:
            raw = base64.b64decode(chunk.replace(",", "/") + "=" * (-len(chunk) % 4),
                                   validate=True)
            if len(raw) % 2:
                raise ValueError("odd number of UTF-16 bytes")
            text = raw.decode("utf-16-be")
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"bad modified UTF-7 {encoded!r}: {e}") from None
        if any("\x20" <= c <= "\x7e" for c in text) or encode_folder_name(text) != f"&{chunk}-":
            raise ValueError(f"non-canonical modified UTF-7: {encoded!r}")
        out.append(text)
    return "".join(out)


# -- folder directories -------------------------------------------------------------------

def _split_folder_name(imap_name: str) -> list[str]:
    """Validated hierarchy levels of an IMAP folder name (INBOX case-normalised)."""
    if not isinstance(imap_name, str) or not imap_name:
        raise ValueError("folder name must be a non-empty string")
    parts = imap_name.split(SEPARATOR)
    if is_inbox(parts[0]):
        parts[0] = INBOX
    for part in parts:
        if not part:
            raise ValueError(f"empty hierarchy level in folder name: {imap_name!r}")
        if "/" in part or _CONTROL.search(part):
            raise ValueError(f"folder name must not contain '/' or control characters: "
                             f"{imap_name!r}")
    return parts


def folder_dir_name(imap_name: str) -> str:
    """The Maildir++ directory name for a folder other than INBOX (".Entw&APw-rfe")."""
    parts = _split_folder_name(imap_name)
    if parts == [INBOX]:
        raise ValueError("INBOX has no folder directory: it is the Maildir root")
    dirname = SEPARATOR + encode_folder_name(SEPARATOR.join(parts))
    if len(dirname.encode("ascii")) > NAME_MAX:
        raise ValueError(f"folder name too long: {imap_name!r}")
    return dirname


def folder_dir(user_path: Path, imap_name: str) -> Path:
    """The directory of folder `imap_name` in the Maildir at `user_path`.

    INBOX is `user_path`; every other name is a direct ".Name" child of it, never
    anything outside (ValueError for names that are unsafe or invalid).
    """
    user_path = Path(user_path)
    if is_inbox(imap_name):
        return user_path
    dirname = folder_dir_name(imap_name)
    path = user_path / dirname
    if path.parent != user_path or dirname in (".", ".."):
        raise ValueError(f"folder name escapes the maildir: {imap_name!r}")
    return path


def folder_name_from_dir(dirname: str) -> str:
    """The IMAP name of a Maildir++ folder directory (".Entw&APw-rfe" -> "Entwürfe")."""
    if not dirname.startswith(SEPARATOR) or dirname in (".", ".."):
        raise ValueError(f"not a Maildir++ folder directory: {dirname!r}")
    name = decode_folder_name(dirname[1:])
    _split_folder_name(name)
    return name


# -- subscriptions ------------------------------------------------------------------------

_TAB_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}
_TAB_UNESCAPES = {v[1]: k for k, v in _TAB_ESCAPES.items()}


def _tab_escape(s: str) -> str:
    return "".join(_TAB_ESCAPES.get(c, c) for c in s)


def _tab_unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\x01" and i + 1 < len(s) and s[i + 1] in _TAB_UNESCAPES:
            out.append(_TAB_UNESCAPES[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def format_subscriptions(names: Iterable[str]) -> bytes:
    """A version 2 Dovecot subscriptions file listing the IMAP folder `names`."""
    lines = []
    for name in names:
        parts = _split_folder_name(name)
        lines.append("\t".join(_tab_escape(encode_folder_name(p)) for p in parts) + "\n")
    return SUBSCRIPTIONS_V2_HEADER + "".join(lines).encode("ascii")


def parse_subscriptions(data: bytes) -> list[str]:
    """IMAP folder names from a Dovecot subscriptions file (version 1 or 2).

    Invalid entries are skipped, as Dovecot drops them too.
    """
    v2 = data.startswith(SUBSCRIPTIONS_V2_HEADER)
    if v2:
        data = data[len(SUBSCRIPTIONS_V2_HEADER):]
    names: list[str] = []
    for raw in data.decode("utf-8", "replace").split("\n"):
        line = raw.rstrip("\r") if not v2 else raw
        if not line:
            continue
        try:
            if v2:
                storage = SEPARATOR.join(_tab_unescape(p) for p in line.split("\t"))
            else:
                storage = line[:-1] if line.endswith(SEPARATOR) else line
            name = decode_folder_name(storage)
            _split_folder_name(name)
        except ValueError:
            continue
        if is_inbox(name):
            name = INBOX
        if name not in names:
            names.append(name)
    return names
