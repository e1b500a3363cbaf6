"""Reading a message's header section (RFC 5322 2.2) for submission and DMARC; no I/O."""

from __future__ import annotations

import email.utils
import functools
import re

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_LINE_END = re.compile(rb"\r?\n")


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field; lines that are not fields are
    skipped with their continuation lines (a message from a sloppy client is still sent,
    just not trusted).  Linear in the block's size: it may be a megabyte of folding."""
    fields: list[tuple[str, str]] = []
    name: str | None = None
    parts: list[str] = []
    for line in _LINE_END.split(block):
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                part = line.strip(b" \t").decode("utf-8", "replace")
                if part:
                    parts.append(part)
            continue
        if name is not None:
            fields.append((name, " ".join(parts)))
            name = None
        m = _FIELD_NAME.match(line)
        if m is not None:
            name = m.group(1).decode("ascii").lower()
            first = line[m.end():].strip(b" \t").decode("utf-8", "replace")
            parts = [first] if first else []
    if name is not None:
        fields.append((name, " ".join(parts)))
    return fields


def without_fields(block: bytes, names: frozenset[str]) -> bytes:
    """`block` without the fields called one of `names` (lower-case), each with its
    continuation lines; every other line as it was."""
    out = []
    dropping = False
    for line in block.split(b"\n"):
        if line[:1] not in (b" ", b"\t"):
            m = _FIELD_NAME.match(line)
            dropping = m is not None and m.group(1).decode("ascii").lower() in names
        if not dropping:
            out.append(line)
    return b"\n".join(out)


def named_field_values(block: bytes, name: str) -> list[str]:
    """The unfolded values of the fields called `name`, as header_fields() would give
    them, found without splitting the whole block: a field is a line that starts with
    its name (RFC 5322 2.2), and its value runs on through the lines that start with
    white space.  DMARC needs only From, of a header that may be long."""
    out = []
    for m in _named_line(name).finditer(block):
        end = m.end()
        while True:   # continuation lines: the value goes on while a line starts with WSP
            nl = block.find(b"\n", end)
            if nl < 0 or block[nl + 1:nl + 2] not in (b" ", b"\t"):
                value_end = len(block) if nl < 0 else nl - (block[nl - 1:nl] == b"\r")
                break
            end = nl + 1
        lines = _LINE_END.split(block[m.end():value_end])
        parts = [p for p in (line.strip(b" \t").decode("utf-8", "replace") for line in lines)
                 if p]
        out.append(" ".join(parts))
    return out


@functools.lru_cache(maxsize=64)
def _named_line(name: str) -> re.Pattern[bytes]:
    return re.compile(rb"(?im)^" + re.escape(name.encode("ascii")) + rb"[ \t]*:")


def field_values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n == name]


def mailbox_addresses(values: list[str]) -> list[str] | None:
    """The addr-specs in address fields such as From; None if one cannot be parsed."""
    out = []
    for name, addr in email.utils.getaddresses(values):
        if not addr or "@" not in addr:
            return None
        out.append(addr)
    return out or None
