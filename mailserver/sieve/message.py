"""The message a Sieve script looks at: its header fields parsed once, lazily, and
decoded on demand (cached per field name); the body read only when a body test asks.
Twisted-free."""

from __future__ import annotations

import codecs
import html
import os
import re
from typing import Iterator, Sequence

from mailserver.imap import mime
from mailserver.shortcache import cache_short
from mailserver.sieve.matching import ascii_lower

MAX_HEADER_FIELDS = 5000            # fields scanned; a hostile header costs bounded work
BODY_SEARCH_LIMIT = 1 << 20         # decoded text searched per part by the body test

_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


def _stray_octets(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return error.object[error.start:error.end].decode("latin-1"), error.end


codecs.register_error("mailserver-sieve-latin1", _stray_octets)


def _text(raw: bytes) -> str:
    """Bytes as text: UTF-8 (RFC 6532), each octet that is no part of valid UTF-8 read as
    Latin-1, so no octet is lost, and one stray octet does not turn the UTF-8 around it
    into mojibake ("caf\xc3\xa9 na\xefve" still contains "café")."""
    return raw.decode("utf-8", "mailserver-sieve-latin1")


def unfold(value: str) -> str:
    """RFC 5322 2.2.3 unfolding, then the leading and trailing white space removed, as
    the header test compares (RFC 5228 5.7).  The white space after a fold stays, TAB
    included ("simply removing any CRLF"), where Dovecot turns a TAB into a space."""
    if "\n" in value:
        value = _UNFOLD.sub("", value)
    return value.strip(" \t\r\n")


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded as Sieve tests see them (RFC 5228 2.7.2): a word in
    an unknown charset gives its octets as UTF-8 (as Pigeonhole)."""
    return mime.decode_words(text, unknown_charset_as_utf8=True)


class Field:
    """One header field: `name` as written, `lname` lower-case ("" for a line that is no
    field, kept only to be written back), `raw` the value as written (folding kept),
    `line` the field's bytes without the final line end."""

    __slots__ = ("_name", "lname", "raw", "line", "addresses", "parts", "_decoded", "_lvalue")

    def __init__(self, name: str, raw: str, line: bytes) -> None:
        self._name: str | None = name
        self.lname = name.lower()
        self.raw = raw
        self.line = line
        # caches filled on first use
        self.addresses: list | bool | None = None                  # the address test's parse
        self.parts: dict[str, tuple[list[str], list[str]]] | None = None  # address part -> values
        self._decoded: str | None = None
        self._lvalue: str | None = None

    @classmethod
    def found(cls, lname: str, raw: str, line: bytes) -> "Field":
        """A field found by its lower-case name (its name as written taken from `line`
        when asked for)."""
        f = cls.__new__(cls)
        f._name = None
        f.lname = lname
        f.raw = raw
        f.line = line
        f.addresses = f.parts = f._decoded = f._lvalue = None
        return f

    @property
    def name(self) -> str:
        name = self._name
        if name is None:
            line = self.line
            name = self._name = line[:line.find(b":")].rstrip(b" \t").decode("ascii")
        return name

    @property
    def value(self) -> str:
        """Unfolded, trimmed and RFC 2047-decoded (RFC 5228 2.7.2)."""
        d = self._decoded
        if d is None:
            d = self._decoded = decode_words(unfold(self.raw))
        return d

    @property
    def lvalue(self) -> str:
        """`value` under i;ascii-casemap, cached: most tests compare that."""
        v = self._lvalue
        if v is None:
            v = self._lvalue = ascii_lower(self.value)
        return v

    @property
    def unfolded(self) -> str:
        """Unfolded and trimmed, encoded words left as written (for address parsing)."""
        return unfold(self.raw)


def parse_fields(header: bytes) -> list[Field]:
    """The fields in order; past MAX_HEADER_FIELDS the rest is one opaque entry."""
    lines: list[bytes] = []
    for line in header.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\r\n" + line          # a folded continuation (RFC 5322 2.2.3)
        else:
            lines.append(line)
    fields: list[Field] = []
    append = fields.append
    for i, line in enumerate(lines):
        if i >= MAX_HEADER_FIELDS:
            rest = [x for x in lines[i:] if x]
            if rest:
                append(Field("", "", b"\r\n".join(rest)))
            break
        colon = line.find(b":")
        name = line[:colon].rstrip(b" \t") if colon > 0 else b""
        if not (name.replace(b"-", b"").isalnum() and name.isascii()) and (
                colon <= 0 or _NAME.match(line) is None):
            if line:
                append(Field("", "", line))         # not a field: kept to be written back
            continue
        value = line[colon + 1:]
        text = _text(value)
        append(Field(name.decode("ascii"), text, line))
    return fields


_LOOKUP_NAME = re.compile(r"[!-9;-~]+\Z")
_NEEDLES: dict[str, bytes | None] = {}


def _needle(lname: str) -> bytes | None:
    """What _Lookup searches for a field name (None: a name it cannot search for)."""
    needle = _NEEDLES.get(lname, b"")
    if needle == b"":
        needle = b"\n" + lname.encode("ascii") if _LOOKUP_NAME.match(lname) else None
        if len(_NEEDLES) >= 1024:
            _NEEDLES.clear()
        _NEEDLES[lname] = needle
    return needle


class _Lookup:
    """Fields found by name in a plain header (no bare LF, fewer lines than
    MAX_HEADER_FIELDS), each made once and kept by its offset; gives the same fields as
    parse_fields."""

    __slots__ = ("header", "lowered", "by_name", "at")

    def __init__(self, header: bytes) -> None:
        self.header = header
        self.lowered = b"\n" + header.lower()    # "\n" + name finds it at a line's start
        self.by_name: dict[str, list[Field]] = {}
        self.at: dict[int, Field] = {}

    @classmethod
    def of(cls, header: bytes) -> "_Lookup | None":
        # A bare LF is a line end to parse_fields (a bare CR is kept in its line, as here).
        lf = header.count(b"\n")
        if lf >= MAX_HEADER_FIELDS or lf != header.count(b"\r\n"):
            return None
        return cls(header)

    def named(self, lname: str) -> list[Field] | None:
        """None for a name the search cannot look for (parse_fields decides then)."""
        got = self.by_name.get(lname)
        if got is not None:
            return got
        needle = _needle(lname)
        if needle is None:
            return None
        got = []
        lowered = self.lowered
        pos = lowered.find(needle)
        while pos >= 0:
            # lowered[pos] is the line end before the line, which starts at header[pos];
            # lowered[j] is header[j - 1]
            j = pos + len(needle)
            while lowered.startswith((b" ", b"\t"), j):
                j += 1
            if lowered.startswith(b":", j):
                got.append(self._field_at(pos, j - 1, lname))
            pos = lowered.find(needle, j)
        self.by_name[lname] = got
        return got

    def _field_at(self, start: int, colon: int, lname: str) -> Field:
        f = self.at.get(start)
        if f is None:
            header = self.header
            end = header.find(b"\r\n", colon)
            while end >= 0 and header.startswith((b" ", b"\t"), end + 2):   # folded (RFC 5322 2.2.3)
                end = header.find(b"\r\n", end + 2)
            if end < 0:                                 # the last line, without CRLF
                end = len(header) - 1 if header.endswith(b"\r") else len(header)
            value = header[colon + 1:end]
            text = _text(value)
            f = self.at[start] = Field.found(lname, text, header[start:end])
        return f

    def merged(self, fields: list[Field]) -> list[Field]:
        """parse_fields' list with the fields made here put in their places."""
        if not self.at:
            return fields
        out = []
        pos = 0
        for f in fields:
            start = self.header.find(f.line, pos)
            pos = start + len(f.line)
            made = self.at.get(start) if f.lname else None
            out.append(made if made is not None and made.line == f.line else f)
        return out


class Message:
    """A message for the interpreter.  `header`: the header block (CRLF lines, without
    the blank line); `body`: the body bytes, or a path to a file holding the whole
    message whose body starts at `body_offset`; `size`: RFC 5228 5.9's size, counted
    here when not given."""

    __slots__ = ("header", "_body", "_path", "_body_offset", "size", "_fields", "_index",
                 "_lookup", "_structure", "_mapped", "_body_cache")

    def __init__(self, header: bytes, body: bytes | str | os.PathLike = b"", body_offset: int = 0,
                 size: int | None = None) -> None:
        self.header = bytes(header)
        if isinstance(body, (bytes, bytearray, memoryview)):
            self._body: bytes | None = bytes(body)
            self._path: str | None = None
        else:
            self._body = None
            self._path = os.fspath(body)
        self._body_offset = body_offset
        if size is None:
            if self._path is not None:
                size = os.path.getsize(self._path)
            else:
                size = len(self.header) + 2 + len(self._body)
        self.size = size
        self._fields: list[Field] | None = None
        self._index: dict[str, list[Field]] | None = None
        self._lookup: _Lookup | None | bool = None
        self._structure: tuple | None = None
        self._mapped: mime.MessageBytes | None = None
        self._body_cache: dict[tuple, list[str]] | None = None

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Message":
        """Split a whole message at its first empty line (CRLF or bare LF files)."""
        raw = bytes(raw)
        if raw.startswith(b"\r\n") or raw.startswith(b"\n"):
            return cls(b"", raw[2 if raw.startswith(b"\r\n") else 1:], size=len(raw))
        i = raw.find(b"\r\n\r\n")
        # a bare-LF blank line counts only before the CRLF one
        j = raw.find(b"\n\n", 0, i + 1) if i >= 0 else raw.find(b"\n\n")
        if i >= 0 and (j < 0 or i <= j + 1):
            return cls(raw[:i + 2], raw[i + 4:], size=len(raw))
        if j >= 0:
            return cls(raw[:j + 1], raw[j + 2:], size=len(raw))
        return cls(raw if raw.endswith(b"\n") or not raw else raw + b"\r\n", b"", size=len(raw))

    # -- header

    @property
    def fields(self) -> list[Field]:
        if self._fields is None:
            fields = parse_fields(self.header)
            if isinstance(self._lookup, _Lookup):   # the fields handed out already stay the same objects
                fields = self._lookup.merged(fields)
            self._fields = fields
        return self._fields

    def index(self) -> dict[str, list[Field]]:
        """{lower-case name: its fields in order}, built once."""
        index = self._index
        if index is None:
            index = {}
            for f in self.fields:
                index.setdefault(f.lname, []).append(f)
            self._index = index
        return index

    def fields_named(self, lname: str) -> list[Field]:
        """The fields named `lname` (lower-case), in order: found by searching the header
        for the name when the header is plain (CRLF lines, within MAX_HEADER_FIELDS), so
        that a script looking at a few fields does not parse them all."""
        if self._index is None:
            lookup = self._lookup
            if lookup is None:
                lookup = self._lookup = _Lookup.of(self.header) or False
            if lookup is not False:
                got = lookup.named(lname)
                if got is not None:
                    return got
        return self.index().get(lname, [])

    # -- body

    def body_bytes(self, limit: int = BODY_SEARCH_LIMIT) -> bytes:
        """The first `limit` octets of the body as stored (the :raw transform)."""
        if self._body is not None:
            return self._body[:limit]
        with open(self._path, "rb") as f:
            f.seek(self._body_offset)
            return f.read(limit)

    def structure(self) -> tuple[bytes, "mime.Part"]:
        """(the whole message with CRLF lines, its MIME structure): a stored file is
        mapped, not read (mime.MessageBytes), and stays mapped while this object lives."""
        if self._structure is None:
            if self._body is not None:
                data = self.header + b"\r\n" + self._body
                if mime.has_bare_lf(data):
                    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            else:
                with open(self._path, "rb") as f:
                    self._mapped = mime.MessageBytes(f)
                data = self._mapped.data
            self._structure = (data, mime.parse_structure(data))
        return self._structure

    def _single_part(self) -> tuple[bytes, str, str, Sequence[tuple[str, str]], bytes] | None:
        """(body bytes, main type, subtype, parameters, transfer encoding) when the
        message is neither multipart nor an encapsulated message: the common case,
        answered without parsing a structure."""
        ctype = self.fields_named("content-type")
        value = ctype[0].unfolded.encode("utf-8", "surrogateescape") if ctype else None
        maintype, subtype, params = _content_type(value)
        if maintype in ("multipart", "message"):
            return None
        body = self.body_bytes(BODY_SEARCH_LIMIT * 4)      # room for base64's growth
        cte = self.fields_named("content-transfer-encoding")
        # as mime.transfer_encoding reads it from a part
        encoding = cte[0].unfolded.encode("utf-8", "surrogateescape").strip().lower() if cte else b""
        return body, maintype, subtype, params, encoding or b"7bit"

    def body_texts(self, transform: str, types: tuple[str, ...] = ()) -> list[str]:
        """What the body test (RFC 5173) compares, cached per transform.

        :raw is the body as stored; :content the parts whose Content-Type matches one of
        `types` ("" every part, "text" a main type, "text/html" a full type), transfer
        encoding removed and text/* charsets decoded; :text is :content "text".  Only
        the first BODY_SEARCH_LIMIT octets (1 MiB) of each part's decoded content, or
        of the raw body, are searched: a huge message costs bounded work."""
        key = (transform, types)
        cache = self._body_cache
        if cache is None:
            cache = self._body_cache = {}
        elif key in cache:
            return cache[key]
        if transform == "raw":
            out = [_text(self.body_bytes())]
        else:
            text = transform == "text"
            if text:
                types = ("text",)
            types = tuple(t.lower() for t in types)
            single = self._single_part()
            if single is not None:          # no MIME structure to walk: the body is the part
                body, maintype, subtype, params, encoding = single
                out = ([_content(body, 0, len(body), encoding, maintype, subtype, params, text)]
                       if _types_match(maintype, subtype, types) else [])
            else:
                data, root = self.structure()
                out = []
                _collect(data, root, types, out, text)
        cache[key] = out
        return out


@cache_short(maxsize=256, longest=200)   # most messages carry one of a few
def _content_type(value: bytes | None) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """mime.parse_content_type with text/plain as the default."""
    maintype, subtype, params = mime.parse_content_type(value, ("text", "plain"))
    return maintype, subtype, tuple(params)


def _type_matches(part: "mime.Part", types: tuple[str, ...]) -> bool:
    return _types_match(part.maintype, part.subtype, types)


def _types_match(maintype: str, subtype: str, types: tuple[str, ...]) -> bool:
    for t in types:
        if t == "":
            return True
        main, _, sub = t.partition("/")
        if main == maintype and (not sub or sub == subtype):
            return True
    return False


def _collect(data, part: "mime.Part", types: tuple[str, ...], out: list[str], text: bool) -> None:
    """RFC 5173 5.2 in document order: a matching multipart gives its prologue and
    epilogue, a matching message/rfc822 its encapsulated header, a leaf its content."""
    if part.is_multipart and part.children:
        if _type_matches(part, types):
            first, last = part.children[0], part.children[-1]
            prologue = bytes(data[part.body_start:max(part.body_start, first.start)])
            prologue = prologue[:prologue.rfind(b"--")] if b"--" in prologue else prologue
            epilogue = bytes(data[last.end:part.end])
            nl = epilogue.find(b"\n", epilogue.find(b"--"))
            epilogue = epilogue[nl + 1:] if nl >= 0 else b""
            out.append(_text((prologue + epilogue)[:BODY_SEARCH_LIMIT]))
        for child in part.children:
            _collect(data, child, types, out, text)
        return
    if part.message is not None:
        if _type_matches(part, types):
            inner = part.message
            out.append(_text(bytes(data[inner.start:min(inner.body_start, inner.start + BODY_SEARCH_LIMIT)])))
        _collect(data, part.message, types, out, text)
        return
    if _type_matches(part, types):
        out.append(_decoded(data, part, text))


_HTML_HIDDEN = re.compile(r"<!--|<script\b|<style\b", re.I)
_HTML_BREAK = re.compile(r"<(?:br|/?p|/?div|/?tr|/?li|/?h[1-6]|/?table|/?blockquote)\b[^<>]*>", re.I)
_HTML_TAG = re.compile(r"<[^<>]*>")        # stops at the next "<": linear


def html_text(markup: str) -> str:
    """The text of an HTML part (RFC 5173 5.1 :text: its markup is not text): comments,
    scripts and styles dropped, block tags as line breaks, other tags removed, character
    references decoded."""
    text = _drop_hidden(markup)
    text = _HTML_BREAK.sub("\n", text)
    return html.unescape(_HTML_TAG.sub("", text))


def _drop_hidden(markup: str) -> str:
    """Comments, scripts and styles removed in one pass: each found once, its end
    searched once (an unclosed one hides the rest), so the cost stays linear."""
    out: list[str] = []
    pos = 0
    lower = markup.lower()
    while True:
        m = _HTML_HIDDEN.search(markup, pos)
        if m is None:
            out.append(markup[pos:])
            return "".join(out)
        out.append(markup[pos:m.start()])
        opener = m.group().lower()
        closer = "-->" if opener == "<!--" else "</" + opener[1:]
        end = lower.find(closer, m.end())
        if end < 0:
            return "".join(out)
        end = markup.find(">", end + len(closer) - 1)
        pos = len(markup) if end < 0 else end + 1


def _decoded(data, part: "mime.Part", text: bool = False) -> str:
    return _content(data, part.body_start, part.end, mime.transfer_encoding(part),
                    part.maintype, part.subtype, part.params, text)


def _content(data, start: int, end: int, encoding: bytes, maintype: str, subtype: str,
             params: Sequence[tuple[str, str]], text: bool) -> str:
    """A leaf's content as the body test sees it: data[start:end] with its transfer
    encoding removed, the first BODY_SEARCH_LIMIT octets, a text/* charset decoded."""
    if encoding in mime.IDENTITY_ENCODINGS:     # what decoded_chunks would give, at once
        raw = bytes(data[start:min(end, start + BODY_SEARCH_LIMIT)])
    else:
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in mime.decoded_chunks(data, start, end, encoding):
                chunks.append(chunk)
                size += len(chunk)
                if size >= BODY_SEARCH_LIMIT:
                    break
        except ValueError:          # an unknown transfer encoding: searched as it is
            chunks = [bytes(data[start:min(end, start + BODY_SEARCH_LIMIT)])]
        raw = b"".join(chunks)[:BODY_SEARCH_LIMIT]
    if maintype == "text":
        charset = "us-ascii"
        for name, value in params:          # the last one, as dict(params) has it
            if name == "charset":
                charset = value
        try:
            decoded = raw.decode(charset or "us-ascii", "replace")
        except LookupError:
            decoded = _text(raw)
        return html_text(decoded) if text and subtype == "html" else decoded
    return _text(raw)


def leaf_parts(part: "mime.Part") -> Iterator["mime.Part"]:
    """The parts a body test looks at (RFC 5173 5.1): leaves, the parts of multiparts,
    and the inside of an encapsulated message."""
    if part.children:
        for child in part.children:
            yield from leaf_parts(child)
    elif part.message is not None:
        yield from leaf_parts(part.message)
    else:
        yield part
