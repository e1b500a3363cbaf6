"""The size of a message as IMAP and POP3 send it (CRLF line ends), without reading it
where the file name or the folder cache already says.

Files this server writes are stored with CRLF, so their `,S=` is that size; Dovecot's
files (LF by default) carry it as `,W=`; anything else is measured once and cached
under VSIZE_KEY, which IMAP and POP3 share.
"""

from __future__ import annotations

import functools
import re

from mailserver.maildir.flags import escape_hostname

VSIZE_KEY = "vsize"


def name_field(base: str, key: str) -> int | None:
    """The number of a `,<key><digits>` field in a Maildir base name (key like 'W=')."""
    for part in base.split(",")[1:]:
        if part.startswith(key) and part[len(key):].isdigit():
            return int(part[len(key):])
    return None


def own_name_pattern(hostname: str) -> re.Pattern[str]:
    """Base names this server's delivery and APPEND give (`unique_base` + ',S=')."""
    return own_name_pattern_escaped(escape_hostname(hostname))


@functools.lru_cache(maxsize=16)
def own_name_pattern_escaped(escaped_host: str) -> re.Pattern[str]:
    return re.compile(r"\d+\.M\d+P\d+Q\d+\." + re.escape(escaped_host) + r",S=\d+")


def known_vsize(base: str, size: int, own: re.Pattern[str]) -> int | None:
    """The CRLF size when the name tells it, else None (then: cache, then measure)."""
    w = name_field(base, "W=")
    if w is not None:
        return w
    if own.fullmatch(base):
        return size
    return None
