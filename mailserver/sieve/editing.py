"""The header as a script sees it while editheader (RFC 5293) changes it: the message's
own fields until the first edit, then a private copy; `snapshot()` gives the header
bytes the actions carry (None while unchanged).  Twisted-free."""

from __future__ import annotations

import re
from email.header import Header

from mailserver.sieve.message import Field, Message

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")     # RFC 5322 3.6.8
_LINE_BREAKS = re.compile(r"\r\n|\r|\n")


def valid_field_name(name: str) -> bool:
    return _FIELD_NAME.match(name) is not None


def encode_field(name: str, value: str) -> str:
    """The value as it goes after "Name:" (with its leading space): line breaks in the
    script's value become spaces, non-ASCII text RFC 2047 encoded and long lines folded
    (RFC 5293 4)."""
    value = _LINE_BREAKS.sub(" ", value)
    if value.isascii() and len(name) + len(value) + 2 <= 78:
        return " " + value
    charset = "us-ascii" if value.isascii() else "utf-8"
    encoded = Header(value, charset, maxlinelen=78, header_name=name).encode(linesep="\r\n")
    return " " + encoded


class HeaderView:
    """`cache`: what tests derive from the fields (values per test), emptied by an edit."""

    __slots__ = ("message", "fields", "cache", "_snapshot", "_index")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.fields: list[Field] | None = None
        self.cache: dict = {}
        self._snapshot: bytes | None = None
        self._index: dict[str, list[Field]] | None = None

    def named(self, lname: str) -> list[Field]:
        index = self._index
        if index is None:
            if self.fields is None:
                return self.message.fields_named(lname)
            index = {}
            for f in self.fields:
                index.setdefault(f.lname, []).append(f)
            self._index = index
        return index.get(lname, [])

    def _edit(self) -> list[Field]:
        if self.fields is None:
            self.fields = list(self.message.fields)
        self._snapshot = None
        self._index = None
        self.cache.clear()
        return self.fields

    def add(self, name: str, encoded: str, last: bool) -> None:
        """RFC 5293 4: at the top, or with :last at the end."""
        field = Field(name, encoded, (name + ":" + encoded).encode("ascii", "replace"))
        fields = self._edit()
        if last:
            fields.append(field)
        else:
            fields.insert(0, field)

    def delete(self, doomed: list[Field]) -> None:
        gone = {id(f) for f in doomed}
        self.fields = [f for f in self._edit() if id(f) not in gone]
        self._index = None

    def snapshot(self) -> bytes | None:
        if self.fields is None:
            return None
        if self._snapshot is None:
            out = b"".join(f.line + b"\r\n" for f in self.fields)
            if b"\n" in out.replace(b"\r\n", b""):
                out = out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            self._snapshot = out
        return self._snapshot
