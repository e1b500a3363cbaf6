"""The FETCH attribute list (RFC 3501 6.4.5 and 9 fetch-att; RFC 3516 BINARY; RFC 7162
MODSEQ) parsed into `FetchItem`s; no I/O, no Twisted.

Items keep the shape the FETCH code reads: `type` names the attribute, `part` holds the
section's part numbers zero-based, `header` the HEADER / HEADER.FIELDS[.NOT] spec, and
`partial_begin` / `partial_length` the <origin.octets> of a partial fetch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_ITEMS = 64          # attributes in one FETCH
MAX_FIELDS = 256        # names in one HEADER.FIELDS list
MAX_PART_DEPTH = 32     # numbers in one section part ("1.2.3...")
MAX_NUMBER = 2 ** 32 - 1


class FetchSyntaxError(ValueError):
    """The attribute list is not RFC 3501 fetch-att syntax (answered BAD)."""


@dataclass(frozen=True)
class HeaderSpec:
    fields: tuple[bytes, ...] = ()   # HEADER.FIELDS names, upper-case; () for plain HEADER
    negate: bool = False             # HEADER.FIELDS.NOT


@dataclass(frozen=True)
class FetchItem:
    type: str                        # body bodystructure envelope flags internaldate rfc822
                                     # rfc822header rfc822size rfc822text uid binary
                                     # binarysize modseq
    peek: bool = False               # BODY.PEEK / BINARY.PEEK: \Seen is not set
    empty: bool = False              # BODY[] (the whole message)
    part: tuple[int, ...] = ()       # section part numbers, zero-based
    header: HeaderSpec | None = None
    text: bool = False
    mime: bool = False
    partial_begin: int | None = None
    partial_length: int | None = None

    @property
    def is_section(self) -> bool:
        """BODY[...] / BINARY[...] as opposed to BODY (the structure)."""
        return (self.empty or self.header is not None or self.text or self.mime
                or bool(self.part) or self.partial_begin is not None)


UID = FetchItem("uid")

_SIMPLE = {
    b"ENVELOPE": "envelope", b"FLAGS": "flags", b"INTERNALDATE": "internaldate",
    b"RFC822": "rfc822", b"RFC822.HEADER": "rfc822header", b"RFC822.SIZE": "rfc822size",
    b"RFC822.TEXT": "rfc822text", b"BODYSTRUCTURE": "bodystructure", b"UID": "uid",
    b"MODSEQ": "modseq",
}
# RFC 3501 6.4.5 macros.
_MACROS = {
    b"ALL": ("flags", "internaldate", "rfc822size", "envelope"),
    b"FAST": ("flags", "internaldate", "rfc822size"),
    b"FULL": ("flags", "internaldate", "rfc822size", "envelope", "body"),
}
_NAME = re.compile(rb"[A-Za-z0-9.]+")
_NUMBER = re.compile(rb"[0-9]+")
_ASTRING_CHAR = re.compile(rb'[^\x00-\x20\x7f(){%*"\\\]]+')


class _Reader:
    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> bytes:
        return self.text[self.pos:self.pos + 1]

    def take(self, expected: bytes) -> None:
        if not self.text.startswith(expected, self.pos):
            raise FetchSyntaxError(f"expected {expected.decode()!r} at {self.pos}")
        self.pos += len(expected)

    def maybe(self, expected: bytes) -> bool:
        if self.text.startswith(expected, self.pos):
            self.pos += len(expected)
            return True
        return False

    def match(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise FetchSyntaxError(f"expected {what} at {self.pos}")
        self.pos = m.end()
        return m.group()

    def number(self, nonzero: bool = False) -> int:
        digits = self.match(_NUMBER, "a number")
        value = int(digits) if len(digits) <= 10 else MAX_NUMBER + 1
        if value > MAX_NUMBER or (nonzero and value == 0):
            raise FetchSyntaxError(f"number out of range at {self.pos}")
        return value

    def astring(self) -> bytes:
        if self.peek() == b'"':   # quoted string (RFC 3501 9)
            out = bytearray()
            self.pos += 1
            while True:
                c = self.peek()
                if not c or c in b"\r\n":
                    raise FetchSyntaxError("unterminated quoted string")
                self.pos += 1
                if c == b'"':
                    return bytes(out)
                if c == b"\\":
                    c = self.peek()
                    if c not in (b'"', b"\\"):
                        raise FetchSyntaxError("bad quoted pair")
                    self.pos += 1
                out += c
        return self.match(_ASTRING_CHAR, "a header field name")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)


def parse_fetch_items(text: bytes) -> list[FetchItem]:
    """The attributes of `text` (a macro, one fetch-att, or a parenthesised list) in the
    order given; FetchSyntaxError for anything else.  Leaves nothing unread."""
    items, rest = parse_fetch_prefix(text)
    if rest:
        raise FetchSyntaxError(f"unexpected text at {len(text) - len(rest)}")
    return items


def parse_fetch_prefix(text: bytes) -> tuple[list[FetchItem], bytes]:
    """The attributes at the start of `text` and what follows them: b"" or, when FETCH
    modifiers follow (RFC 4466 fetch-modifiers, e.g. RFC 7162 CHANGEDSINCE), the text
    from the space before them."""
    r = _Reader(text)
    items: list[FetchItem] = []
    if r.maybe(b"("):
        while True:
            items.append(_fetch_att(r))
            if len(items) > MAX_ITEMS:
                raise FetchSyntaxError("too many FETCH items")
            if r.maybe(b")"):
                break
            r.take(b" ")
        if not items:
            raise FetchSyntaxError("empty FETCH item list")
    else:
        m = _NAME.match(text)
        macro = m.group().upper() if m is not None else b""
        if macro in _MACROS and m is not None and text[m.end():m.end() + 1] in (b"", b" "):
            r.pos = m.end()
            items = [FetchItem(t) for t in _MACROS[macro]]
        else:
            items.append(_fetch_att(r))
    rest = text[r.pos:]
    if rest and not rest.startswith(b" "):
        raise FetchSyntaxError(f"unexpected text at {r.pos}")
    return items, rest


def _fetch_att(r: _Reader) -> FetchItem:
    name = r.match(_NAME, "a FETCH item").upper()
    if name in (b"BODY", b"BODY.PEEK") and r.peek() == b"[":
        return _section_item("body", r, peek=name == b"BODY.PEEK")
    if name in (b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"):   # RFC 3516 4.2
        if r.peek() != b"[":
            raise FetchSyntaxError(f"{name.decode()} needs a section")
        kind = "binarysize" if name == b"BINARY.SIZE" else "binary"
        return _section_item(kind, r, peek=name == b"BINARY.PEEK", binary=True)
    if name == b"BODY":
        return FetchItem("body")
    kind = _SIMPLE.get(name)
    if kind is None:
        raise FetchSyntaxError(f"unknown FETCH item {name.decode('ascii', 'replace')}")
    return FetchItem(kind)


def _section_item(kind: str, r: _Reader, peek: bool, binary: bool = False) -> FetchItem:
    """section ["<" number "." nz-number ">"] (RFC 3501 9); BINARY takes only part
    numbers (RFC 3516 section-binary) and BINARY.SIZE no partial."""
    r.take(b"[")
    part: list[int] = []
    header: HeaderSpec | None = None
    text = mime = False
    if r.peek().isdigit():
        part.append(r.number(nonzero=True) - 1)
        while r.maybe(b"."):
            if not r.peek().isdigit():
                break
            part.append(r.number(nonzero=True) - 1)
            if len(part) > MAX_PART_DEPTH:
                raise FetchSyntaxError("section part too deep")
        else:
            r.take(b"]")
            return _finish(kind, r, peek, tuple(part), None, False, False)
        if binary:
            raise FetchSyntaxError("BINARY takes part numbers only")
    if r.maybe(b"]"):
        if part:   # "1.]" is not a section
            raise FetchSyntaxError("incomplete section")
        return _finish(kind, r, peek, (), None, False, False, empty=True)
    if binary:
        raise FetchSyntaxError("BINARY takes part numbers only")
    spec = r.match(_NAME, "a section text").upper()
    if spec == b"HEADER":
        header = HeaderSpec()
    elif spec in (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        r.take(b" (")
        names = [r.astring()]
        while r.maybe(b" "):
            names.append(r.astring())
            if len(names) > MAX_FIELDS:
                raise FetchSyntaxError("too many header field names")
        r.take(b")")
        # Echoed upper-case in the response, as Twisted's parser and Dovecot do.
        header = HeaderSpec(tuple(n.upper() for n in names), spec.endswith(b".NOT"))
    elif spec == b"TEXT":
        text = True
    elif spec == b"MIME" and part:   # MIME only after part numbers
        mime = True
    else:
        raise FetchSyntaxError(f"unknown section {spec.decode('ascii', 'replace')}")
    r.take(b"]")
    return _finish(kind, r, peek, tuple(part), header, text, mime)


def _finish(kind: str, r: _Reader, peek: bool, part: tuple[int, ...],
            header: HeaderSpec | None, text: bool, mime: bool,
            empty: bool = False) -> FetchItem:
    begin = length = None
    if r.maybe(b"<"):
        if kind == "binarysize":
            raise FetchSyntaxError("BINARY.SIZE takes no partial range")
        begin = r.number()
        r.take(b".")
        length = r.number(nonzero=True)
        r.take(b">")
    return FetchItem(kind, peek=peek, empty=empty and not part, part=part, header=header,
                     text=text, mime=mime, partial_begin=begin, partial_length=length)
