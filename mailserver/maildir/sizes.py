"""The size of a message as IMAP and POP3 send it (CRLF line ends), without reading it
where the file name or the folder cache already says.

Files this server writes are stored with CRLF, so their `,S=` is that size (an APPEND with
bare LFs is kept as sent and named with `,W=` too); Dovecot's
files (LF by default) carry it as `,W=`; anything else is measured once and cached
under VSIZE_KEY, which IMAP and POP3 share.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Iterable, Protocol

from mailserver.maildir.flags import escape_hostname

VSIZE_KEY = "vsize"
_CHUNK = 256 * 1024


def own_name_pattern(hostname: str) -> re.Pattern[str]:
    """Base names this server's delivery and APPEND give (`unique_base` + ',S=')."""
    return own_name_pattern_escaped(escape_hostname(hostname))


@functools.lru_cache(maxsize=16)
def own_name_pattern_escaped(escaped_host: str) -> re.Pattern[str]:
    return re.compile(r"\d+\.M\d+P\d+Q\d+\." + re.escape(escaped_host) + r",S=\d+")


# A `,W=<digits>` field after the unique part of a Maildir name (Dovecot's CRLF size).
_W_FIELD = re.compile(r",W=([0-9]+)(?=,|$)")


def known_vsize(base: str, size: int, own: re.Pattern[str]) -> int | None:
    """The CRLF size when the name tells it, else None (then: cache, then measure).
    One regular-expression search, not a split of the name: a POP3 login lists every
    message of the mailbox through here."""
    if ",W=" in base:
        m = _W_FIELD.search(base)
        if m is not None:
            return int(m.group(1))
    if own.fullmatch(base):
        return size
    return None


def crlf_size_of_path(path: str | os.PathLike[str]) -> int:
    """Octets of a file's CRLF form (every bare LF counted as CRLF, as IMAP's MessageBytes
    and POP3 send it), counted without converting anything (blocking: for threads)."""
    total = lf = crlf = 0
    last_cr = False
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(chunk)
            lf += chunk.count(b"\n")
            crlf += chunk.count(b"\r\n") + (last_cr and chunk[:1] == b"\n")
            last_cr = chunk[-1:] == b"\r"
    return total + lf - crlf


class _Cache(Protocol):
    def get_many(self, bases: list[str], key: str) -> dict[str, Any]: ...


def total_vsize(infos: Iterable[Any], folder_dir: Path, cache: _Cache,
                own: re.Pattern[str]) -> tuple[int, dict[int, tuple[str, int]]]:
    """The sum of the CRLF sizes of `infos` (a folder's MessageInfo snapshot): RFC 8438
    STATUS SIZE, at least the sum of what FETCH RFC822.SIZE says for each message.

    Each size is what FETCH takes too: the file name's, else the index's VSIZE_KEY value,
    else the file is measured (blocking: for a thread).  Returns the total and what was
    measured, {uid: (base name, size)}, for the caller to cache.  A file that vanished
    meanwhile counts twice its stored size (no CRLF form is larger) and is not cached.
    """
    total = 0
    unknown = []
    for info in infos:
        size = known_vsize(info.basename, info.size, own)
        if size is None:
            unknown.append(info)
        else:
            total += size
    measured: dict[int, tuple[str, int]] = {}
    if not unknown:
        return total, measured
    cached = cache.get_many([i.basename for i in unknown], VSIZE_KEY)
    for info in unknown:
        try:
            total += int(cached[info.basename])
            continue
        except (KeyError, TypeError, ValueError):
            pass
        try:
            size = crlf_size_of_path(folder_dir / info.subdir / info.filename)
        except OSError:
            total += 2 * info.size
            continue
        measured[info.uid] = (info.basename, size)
        total += size
    return total, measured
