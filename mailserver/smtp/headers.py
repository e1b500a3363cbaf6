"""Reading a message's header section (RFC 5322 2.2) for submission and DMARC; no I/O."""

from __future__ import annotations

import email.utils
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
