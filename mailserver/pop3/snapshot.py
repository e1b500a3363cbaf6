"""A POP3 session's listing of its mailbox, made in the folder's thread (no Twisted here):
one entry per message with its CRLF size from the file name or the index cache, and the
UIDLs and order Dovecot stored (dovecot.py).  For 100,000 messages this is a tenth of a
second of Python, which the reactor does not wait through.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from mailserver.maildir.sizes import VSIZE_KEY, known_vsize
from mailserver.pop3 import dovecot

UIDL_MAX = 70         # RFC 1939 7: 1 to 70 characters in the range 0x21 to 0x7E
_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}")


def uidl_of(base: str) -> bytes:
    """The UIDL of a message: its base name, or, for a name RFC 1939 does not allow as a
    unique-id (too long, spaces, 8-bit), a digest of it that is just as stable."""
    if _UIDL_OK.fullmatch(base):
        return base.encode("ascii")
    return b"H" + hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:40].encode()


@dataclass(slots=True)
class Entry:
    """One message of the session's snapshot."""

    uid: int
    base: str
    size: int
    deleted: bool = False
    gone: bool = False
    uidl: bytes | None = None   # stored by Dovecot (P<uidl>), else the base name's

    def unique_id(self) -> bytes:
        """The message's UIDL (RFC 1939 7)."""
        return self.uidl if self.uidl is not None else uidl_of(self.base)


class Snapshot(NamedTuple):
    entries: list[Entry]          # in listing order
    unknown: list[Entry]          # sizes still to be measured (provisional until then)
    unusable: int                 # stored UIDLs that could not be used
    by_base: dict[str, Entry]


def take_snapshot(view: Any, own: re.Pattern[str],
                  fields: dict[int, dict[str, str]]) -> Snapshot:
    """The listing of the folder `view` (a FolderView, in a job of the folder's
    executor): sizes where the name or the index cache knows them, then Dovecot's stored
    UIDLs and order (`fields`: dovecot-uidlist's fields by uid)."""
    entries: list[Entry] = []
    unknown: list[Entry] = []
    for info in view.infos.values():
        base = info.basename
        # Most names end with their W field (Dovecot's and imported mail): read it here,
        # without a call and a regular expression per message; any other name asks
        # known_vsize.
        w = base.partition(",W=")[2]
        size = int(w) if w.isdigit() and w.isascii() else known_vsize(base, info.size, own)
        entry = Entry(info.uid, base, info.size if size is None else size)
        entries.append(entry)
        if size is None:
            unknown.append(entry)
    if unknown:
        cached = view.index.get_many([e.base for e in unknown], VSIZE_KEY)
        still = []
        for e in unknown:
            try:
                e.size = int(cached.get(e.base))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                still.append(e)
        unknown = still
    entries, unusable = dovecot.apply_fields(entries, fields)
    return Snapshot(entries, unknown, unusable, {e.base: e for e in entries})
