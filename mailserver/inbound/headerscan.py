"""Finding named fields in a message's header section without splitting it.

The checks read a few fields of every message (DKIM-Signature and ARC fields for the key
names, From for DMARC, Authentication-Results to remove ours), in the reactor.  A field
starts a line with its name (RFC 5322 2.2), so the lower-cased header is searched for
"\\n<name>" with bytes.find, which skips through it at memchr speed, where a multi-line
regular expression tests every position for a line start.  No Twisted: the worker side
uses it too.
"""

from __future__ import annotations

import re

_FIELD_END = re.compile(rb"\n(?![ \t])")   # a line break not followed by a continuation
_COLON = re.compile(rb"[ \t]*:")


def section_end(block: bytes) -> int:
    """Where the header section in `block` ends: at its first empty line, if any."""
    if block[:1] == b"\n" or block[:2] == b"\r\n" or block == b"\r":
        return 0
    ends = [i + 1 for i in (block.find(b"\n\r\n"), block.find(b"\n\n")) if i >= 0]
    if block.endswith(b"\n\r"):
        ends.append(len(block) - 1)
    return min(ends) if ends else len(block)


def line_starts(lowered: bytes, prefix: bytes, stop: int) -> list[int]:
    """Offsets of the lines of lowered[:stop] that begin with `prefix` (lower-case)."""
    found = [0] if lowered.startswith(prefix) and len(prefix) <= stop else []
    needle = b"\n" + prefix
    i = lowered.find(needle, 0, stop)
    while i >= 0:
        found.append(i + 1)
        i = lowered.find(needle, i + 1, stop)
    return found


def value_end(block: bytes, start: int, stop: int) -> int:
    """Where the value that starts at `start` ends: before the line break (CRLF or LF)
    of its last line, continuation lines (starting with SP or HTAB) included."""
    nl = _FIELD_END.search(block, start, stop)
    if nl is None:
        return stop
    end = nl.start()
    return end - 1 if end > 0 and block[end - 1] == 13 else end


def field_spans(block: bytes, names: tuple[bytes, ...], *, space: bool = False,
                whole: bool = False) -> list[tuple[int, int, int, bytes]]:
    """(start, value start, value end, lower-case name) of the fields called one of
    `names` (lower-case), in header order.  `space`: SP/HTAB may come between the name
    and its colon (RFC 5322's obsolete syntax); otherwise the colon follows at once.
    The header section ends at its first empty line, unless `whole` (the block is known
    to be a header section)."""
    low = block.lower()
    stop = len(block) if whole else section_end(block)
    spans: list[tuple[int, int, int, bytes]] = []
    for name in names:
        for at in line_starts(low, name, stop):
            after = at + len(name)
            if space:
                m = _COLON.match(low, after, stop)
                if m is None:
                    continue
                after = m.end()
            elif after < stop and low[after] == 58:   # ":"
                after += 1
            else:
                continue
            spans.append((at, after, value_end(block, after, stop), name))
    if len(names) > 1:
        spans.sort()
    return spans


def named_values(block: bytes, names: tuple[bytes, ...], *, space: bool = False,
                 whole: bool = False) -> list[tuple[bytes, bytes]]:
    """(lower-case name, raw value) of the fields field_spans() finds."""
    return [(name, block[start:end])
            for _, start, end, name in field_spans(block, names, space=space, whole=whole)]


def has_field(block: bytes, names: tuple[bytes, ...]) -> bool:
    """Whether a field called one of `names` (lower-case; SP/HTAB allowed before the
    colon) starts a line of `block`: the cheap test before rewriting a header."""
    low = block.lower()
    for name in names:
        for at in line_starts(low, name, len(block)):
            if _COLON.match(low, at + len(name)):
                return True
    return False
