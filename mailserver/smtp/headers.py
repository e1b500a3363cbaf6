"""Reading a message's header section (RFC 5322 2.2) as submission needs it; no I/O."""

from __future__ import annotations

import email.utils
import re

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each field; lines that are not fields are
    skipped (a message from a sloppy client is still sent, just not trusted)."""
    fields: list[tuple[str, str]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + " " + line.strip().decode("utf-8", "replace"))
            continue
        m = _FIELD_NAME.match(line)
        if m is None:
            continue
        fields.append((m.group(1).decode("ascii").lower(),
                       line[m.end():].strip().decode("utf-8", "replace")))
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
