"""A maildrop migrated from Dovecot keeps its POP3 identities and order.

Dovecot stores a message's POP3 UIDL in its dovecot-uidlist record as the ext field
P<uidl> when it differs from what `pop3_uidl_format` gives (a mailbox migrated from
another server, a changed format); "P" with no value means the base file name.  It also
keeps the original POP3 order as O<n>: messages with an O are listed first, by that
number, the others after them in uid order (Dovecot's POP3_ORDER sort).  POP3 answers
both here; messages without the fields keep this server's UIDL (the base name) and uid
order.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

# The dovecot-uidlist ext keys read (Folder.uidlist_fields).
UIDLIST_KEYS = "PO"
_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}")   # RFC 1939 7: unique-id
_ORDER_OK = re.compile(r"[0-9]{1,10}")
_NO_ORDER = 1 << 40   # after every valid O


def stored_uidl(value: str) -> bytes | None:
    """The UIDL of a P<value> field; None for "P" alone (the base name, which is the
    default anyway) or a value RFC 1939 does not allow as a unique-id."""
    if value and _UIDL_OK.fullmatch(value):
        return value.encode("ascii")
    return None


def apply_fields(entries: Sequence[Any], fields: dict[int, dict[str, str]]) -> tuple[list[Any], int]:
    """Give `entries` (snapshot entries in uid order, with `uid` and `uidl`) their stored
    UIDLs and put them in the stored POP3 order.  Returns the entries in listing order
    and how many stored UIDLs could not be used (invalid, or a duplicate: a unique-id
    names one message)."""
    if not fields:
        return list(entries), 0
    unusable = 0
    taken: set[bytes] = set()
    ordered = False
    for e in entries:
        found = fields.get(e.uid)
        if not found:
            continue
        value = found.get("P")
        if value:
            uidl = stored_uidl(value)
            if uidl is None or uidl in taken:
                unusable += 1
            else:
                e.uidl = uidl
                taken.add(uidl)
        ordered = ordered or "O" in found
    if not ordered:
        return list(entries), unusable
    return sorted(entries, key=lambda e: (_order(fields.get(e.uid)), e.uid)), unusable


def _order(found: dict[str, str] | None) -> int:
    value = (found or {}).get("O", "")
    return int(value) if _ORDER_OK.fullmatch(value) else _NO_ORDER
