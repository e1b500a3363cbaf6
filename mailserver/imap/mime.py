"""MIME structure of a stored message with byte offsets, for FETCH and SEARCH.

The parser works on the message bytes in place (an mmap of the file for CRLF files), so
a large message is never copied into memory to answer BODYSTRUCTURE or a partial fetch;
every section IMAP can name (HEADER, TEXT, MIME, part numbers) is a (start, end) span of
the original bytes, so header fetches return the exact bytes stored, in their order.
"""

from __future__ import annotations

import binascii
import mmap
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple, Sequence

from mailserver.rfc5322 import comment_end

MAX_DEPTH = 20
MAX_PARTS = 5000

_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
# Each match starts at its ";" (finditer skips what lies between): a leading \s* would
# rescan a run of white space from each of its positions, quadratic in its length.
_PARAM = re.compile(
    r""";\s*([!#-'*+.0-9A-Z^-~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)""", re.S)


class MessageBytes:
    """The octets of a message as IMAP sees them: CRLF line ends, whatever is on disk.

    CRLF files (what this server stores) are mapped, not read; a file with any bare LF
    (LF-only, as Dovecot writes by default, or mixed) is read and converted, which costs
    memory only for mail that was migrated from such a store.  Every bare LF counts, not
    just the first line's: the size is then the one POP3 and STATUS SIZE count
    (maildir/sizes.py), which they share with FETCH under one cache key.
    """

    def __init__(self, f: BinaryIO, crlf: bool = False) -> None:
        """`crlf`: the caller knows the file has no bare LF (its name gives a CRLF size
        equal to its size), so it is not counted."""
        self._mmap: mmap.mmap | None = None
        size = _fsize(f)
        if size == 0:
            self.data: bytes | mmap.mmap = b""
            return
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if not crlf and has_bare_lf(m):
            data = m[:]
            m.close()
            self.data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        else:
            self._mmap = m
            self.data = m

    def __len__(self) -> int:
        return len(self.data)

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> "MessageBytes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SCAN = 1024 * 1024


def has_bare_lf(buf: Any) -> bool:
    """Whether `buf` (bytes or a mapped file) has an LF without a CR before it: counted a
    megabyte at a time (about a millisecond each), never copied whole."""
    size = len(buf)
    for start in range(0, size, _SCAN):
        # One byte of overlap: a CRLF across the boundary is seen whole.
        chunk = buf[max(0, start - 1):start + _SCAN]
        lf = chunk.count(b"\n") - (start > 0 and chunk[:1] == b"\n")
        if lf != chunk.count(b"\r\n"):
            return True
    return False


def _fsize(f: BinaryIO) -> int:
    import os

    return os.fstat(f.fileno()).st_size


@dataclass
class Part:
    start: int  # first octet of the part's header
    body_start: int
    end: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # (lower name, raw value)
    maintype: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    children: list["Part"] = field(default_factory=list)
    message: "Part | None" = None  # the encapsulated message of a message/rfc822 part
    lines: int = 0

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart"


def count_lines(data: bytes | mmap.mmap, start: int, end: int) -> int:
    """Lines in data[start:end], counting a last line without a line end."""
    n = 0
    for pos in range(start, end, 1 << 20):
        n += data[pos:min(pos + (1 << 20), end)].count(b"\n")
    if end > start and data[end - 1:end] != b"\n":
        n += 1
    return n


def header_end(data: bytes | mmap.mmap, start: int, end: int) -> tuple[int, int]:
    """(end of the header section incl. the blank line, start of the body)."""
    if data[start:start + 2] == b"\r\n":
        return start + 2, start + 2
    i = data.find(b"\r\n\r\n", start, end)
    if i < 0:
        return end, end
    return i + 4, i + 4


def parse_headers(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Header fields in order: (lowercase name, unfolded value without the name)."""
    out: list[tuple[bytes, bytes]] = []
    for line in re.split(rb"\r\n(?![ \t])", raw):
        m = _HEADER_NAME.match(line)
        if not m:
            continue
        value = line[m.end():].replace(b"\r\n", b"").strip()
        out.append((m.group(1).lower(), value))
    return out


def parse_content_type(value: bytes | None, default: tuple[str, str]) -> tuple[str, str, list[tuple[str, str]]]:
    if not value:
        main, sub = default
        return main, sub, [("charset", "us-ascii")] if (main, sub) == ("text", "plain") else []
    text = value.decode("latin-1")
    kind, _, rest = text.partition(";")
    main, _, sub = kind.strip().partition("/")
    if not main or not sub:
        main, sub = default
        return main, sub, [("charset", "us-ascii")] if (main, sub) == ("text", "plain") else []
    params = []
    for m in _PARAM.finditer(";" + rest):
        name, v = m.group(1).lower(), m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.append((name, v))
    return main.strip().lower(), sub.strip().lower(), params


HEAD_READ = 16384
HEAD_MAX = 65536


def read_head(f: BinaryIO) -> bytes | None:
    """The header section of the message in `f` (CRLF line ends, blank line included), read
    with plain reads: what ENVELOPE, header-field fetches and header searches need, without
    mapping or touching the body.  None when the header is longer than HEAD_MAX."""
    buf = b""
    while len(buf) < HEAD_MAX:
        chunk = f.read(HEAD_READ)
        buf += chunk
        first_nl = buf.find(b"\n")
        data = buf
        if first_nl > 0 and buf[first_nl - 1:first_nl] != b"\r":
            data = buf.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # an LF-only file
        if not chunk:  # the whole file: a message without a body is all header
            hend, _ = header_end(data, 0, len(data))
            return data[:hend]
        hend, _ = header_end(data, 0, len(data))
        if hend < len(data) or data.startswith(b"\r\n"):
            return data[:hend]
    return None


def parse_head(head: bytes) -> Part:
    """The top-level part of a message from its header section alone (see read_head)."""
    return Part(start=0, body_start=len(head), end=len(head), headers=parse_headers(head))


def parse_structure(data: bytes | mmap.mmap) -> Part:
    counter = [0]
    return _parse_part(data, 0, len(data), ("text", "plain"), 0, counter)


def _parse_part(data, start: int, end: int, default: tuple[str, str], depth: int,
                counter: list[int]) -> Part:
    counter[0] += 1
    hend, body_start = header_end(data, start, end)
    headers = parse_headers(bytes(data[start:hend]))
    part = Part(start=start, body_start=body_start, end=end, headers=headers)
    ctype = next((v for k, v in headers if k == b"content-type"), None)
    part.maintype, part.subtype, part.params = parse_content_type(ctype, default)
    part.lines = count_lines(data, body_start, end)
    if depth >= MAX_DEPTH or counter[0] > MAX_PARTS:
        _make_leaf(part)
        return part
    if part.is_multipart:
        boundary = dict(part.params).get("boundary")
        if boundary:
            child_default = ("message", "rfc822") if part.subtype == "digest" else ("text", "plain")
            spans = _split_multipart(data, body_start, end, boundary.encode("latin-1"))
            for k, (s, e) in enumerate(spans):
                if counter[0] >= MAX_PARTS and k < len(spans) - 1:
                    # The part-count limit: this part runs over the rest, unparsed, as
                    # in Dovecot; what lies beyond it stays within reach of BODY[n].
                    part.children.append(_parse_part(data, s, spans[-1][1], child_default,
                                                     MAX_DEPTH, counter))
                    break
                part.children.append(_parse_part(data, s, e, child_default, depth + 1, counter))
        if not part.children:
            # RFC 3501 requires at least one part; treat a broken multipart as text.
            part.maintype, part.subtype = "text", "plain"
    elif (part.maintype, part.subtype) in (("message", "rfc822"), ("message", "global")):
        part.message = _parse_part(data, body_start, end, ("text", "plain"), depth + 1, counter)
    return part


def _make_leaf(part: Part) -> None:
    """A part left unparsed at the nesting or part-count limit: reported as a plain part,
    since a MESSAGE/RFC822 without its envelope or a multipart without parts would be a
    malformed BODYSTRUCTURE (RFC 3501 7.4.2)."""
    if part.is_multipart:
        part.maintype, part.subtype = "text", "plain"
    elif part.maintype == "message" and part.subtype in ("rfc822", "global"):
        part.maintype, part.subtype, part.params = "application", "octet-stream", []


def _split_multipart(data, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Spans of the body parts between the boundary lines (RFC 2046 5.1.1)."""
    delim = b"--" + boundary
    spans: list[tuple[int, int]] = []
    found = _next_delimiter(data, start, end, delim, True)
    while found is not None and not found[1]:
        line_end = data.find(b"\r\n", found[0] + len(delim), end)
        if line_end < 0:
            return spans
        part_start = line_end + 2
        found = _next_delimiter(data, line_end, end, delim, False)
        if found is None:
            spans.append((part_start, end))  # no close delimiter: the part runs to the end
            return spans
        if len(spans) == MAX_PARTS - 1:
            # the last part the limit allows runs to the end (see _parse_part)
            spans.append((part_start, end))
            return spans
        spans.append((part_start, max(part_start, found[0] - 2)))
    return spans


# What may follow a boundary delimiter on its line: "--" (the close delimiter), or white
# space to the line's end (RFC 2046 5.1.1).  Possessive: a line of a million blanks and
# then text is refused in one pass, not retried from each blank.
_TAIL = re.compile(rb"(--)|[ \t]*+(?:\r\n|\Z)")


def _next_delimiter(data, pos: int, end: int, delim: bytes,
                    at_line_start: bool) -> tuple[int, bool] | None:
    """(start, is the close delimiter) of the next boundary delimiter line from `pos` on:
    a line that is `delim` followed by "--", or by nothing but white space (RFC 2046
    5.1.1).  A line that only begins with `delim` is content, such as the delimiter of a
    nested multipart whose boundary extends this one ("b" and "b2").

    The usual forms are found with bytes.find, each search stopping at the nearest found
    so far (the scan stays linear in the message); only a delimiter followed by blanks is
    checked further.  Each line beginning with the delimiter was looked at in Python
    before: 2.7 s of the reactor for 7 million of them in one 42 MB message."""
    n = len(delim)
    if at_line_start and data[pos:pos + n] == delim:
        m = _TAIL.match(data, pos + n, end)
        if m is not None:
            return pos, m.group(1) is not None
    line = b"\r\n" + delim
    best: tuple[int, bool] | None = None
    limit = end
    for follow, close in ((b"\r\n", False), (b"--", True)):
        i = data.find(line + follow, pos, limit)
        if i >= 0:
            best, limit = (i, close), i
    for blank in (b" ", b"\t"):
        i = data.find(line + blank, pos, limit)
        while i >= 0:
            if _TAIL.match(data, i + 2 + n, end) is not None:
                best, limit = (i, False), i
                break
            i = data.find(line + blank, i + 1, limit)
    if best is None and end - pos >= len(line) and data[end - len(line):end] == line:
        best = (end - len(line), False)   # the last line, without its line break
    return (best[0] + 2, best[1]) if best is not None else None


def find_part(root: Part, numbers: Sequence[int]) -> Part | None:
    """The part a section's numbers name (RFC 3501 6.4.5), 1-based.

    The numbers of a multipart are its body parts; a message that is not multipart has
    only part 1, its body.  A message/rfc822 part stands for its whole encapsulated
    message (BODY[n] is that message, header and body), and only a further number goes
    inside it, naming the parts of the encapsulated message the same way: for a forwarded
    single-part message n.1 is its body.  The top-level message being message/rfc822
    itself is no exception: BODY[1] is the forwarded message, BODY[1.1] its body.
    """
    part = root
    for i, n in enumerate(numbers):
        if i and part.message is not None:
            part = part.message
        if part.is_multipart:
            if not 1 <= n <= len(part.children):
                return None
            part = part.children[n - 1]
        elif n != 1:
            return None
    return part


# -- IMAP rendering -----------------------------------------------------------------------

_NOT_PLAIN = re.compile(rb'[\x00\r\n"\\\x80-\xff]').search
NOT_QUOTABLE = re.compile(rb"[\x00\r\n\x80-\xff]").search


def imap_string(value: bytes | str | None) -> bytes:
    """NIL, a quoted string, or a literal when the value cannot be quoted.  A str is
    header text decoded as Latin-1 (parse_content_type): encoded back the same way, so
    a UTF-8 file name goes out as the octets it came in as."""
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    if len(value) < 1024 and not _NOT_PLAIN(value):
        return b'"' + value + b'"'
    if not NOT_QUOTABLE(value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    # RFC 3501 4.3: no NUL in a literal (only BINARY's literal8 may hold one); 0x80 in
    # its place, as Dovecot does.
    value = value.replace(b"\x00", b"\x80")
    return b"{%d}\r\n%s" % (len(value), value)


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(imap_string(k) + b" "
                            + imap_string(v) for k, v in params) + b")"


# -- addresses (RFC 5322 3.4, with the obsolete forms of 4.4) --------------------------------

MAILBOX, GROUP_START, GROUP_END = 0, 1, 2
# What ENVELOPE says for a mailbox without a local part or a domain (as Dovecot does): never
# NIL, which would make the address read as a group marker (RFC 3501 7.4.2).
MISSING_MAILBOX, MISSING_DOMAIN = "MISSING_MAILBOX", "MISSING_DOMAIN"


class Address(NamedTuple):
    """One member of an address list: a mailbox, or the start or end of a group (a group
    start carries the group's display name in `mailbox`, where ENVELOPE puts it).  Texts
    are as written in the header: display names keep their RFC 2047 encoded words; quoted
    strings are unquoted; a comment stands in for a missing display name."""

    kind: int
    name: str | None = None
    route: str | None = None  # obsolete source route, "@a,@b"
    mailbox: str | None = None  # local part; None when the field has none
    host: str | None = None  # domain; None when the field has none


_ADDR_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<a>[^ \t\r\n()<>\[\]:;@\\,."]+)
  | (?P<q>"(?P<qtext>(?:[^"\\]|\\.)*)(?:"|\\?\Z))
  | (?P<c>\()
  | (?P<d>\[(?:[^\[\]\\]|\\.)*(?:\]|\\?\Z))
  | (?P<s>[\s\S])
""", re.X)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_DOT_ATOM = re.compile(r"[^ \t\r\n()<>\[\]:;@\\,.\"]+(?:\.[^ \t\r\n()<>\[\]:;@\\,.\"]+)*\Z")
MAX_ADDRESSES = 5000  # members of one list: a hostile header costs bounded work


def _unquote(text: str) -> str:
    return _QUOTED_PAIR.sub(r"\1", text) if "\\" in text else text


def _addr_tokens(text: str) -> list[tuple[str, str, bool]]:
    """(kind, text, preceded by white space or a comment) for each token: kind is "a"
    (atom), "q" (quoted string, unquoted), "d" (domain literal), "c" (comment, its text)
    or the special character itself."""
    out: list[tuple[str, str, bool]] = []
    pos, n, space = 0, len(text), False
    while pos < n:
        for m in _ADDR_TOKEN.finditer(text, pos):
            kind = m.lastgroup
            if kind == "ws":
                space = True
            elif kind == "a" or kind == "d":
                out.append((kind, m.group(), space))
                space = False
            elif kind == "q":
                out.append(("q", _unquote(m.group("qtext")), space))
                space = False
            elif kind == "c":
                pos = m.start()
                break  # comments nest: scanned below
            else:
                out.append((m.group(), m.group(), space))
                space = False
        else:
            return out
        j = comment_end(text, pos)
        out.append(("c", _unquote(text[pos + 1:j]).strip(), space))
        pos, space = j + 1, True
    return out


_WS = "[ \t\r\n]"
_ATEXT = r'[^ \t\r\n()<>\[\]:;@\\,"]'  # with ".": dot-atoms and obsolete phrases
_SIMPLE_MAILBOX = re.compile(
    rf"{_WS}*(?:(?P<name>{_ATEXT}+(?:{_WS}+{_ATEXT}+)*){_WS}*)?"
    rf"<(?P<local>{_ATEXT}+)@(?P<host>{_ATEXT}+)>{_WS}*\Z"
    rf"|{_WS}*(?P<local2>{_ATEXT}+)@(?P<host2>{_ATEXT}+){_WS}*\Z")
_NOT_SIMPLE = re.compile(r'[()\[\]:;\\"]')
_WS_RUN = re.compile(f"{_WS}+")


def parse_addresses(value: str) -> list[Address]:
    """An address-list or mailbox-list header value, leniently: group syntax, route
    addresses, comments as names and broken lists all give an answer."""
    if not _NOT_SIMPLE.search(value):
        simple = _simple_addresses(value)
        if simple is not None:
            return simple
    return _parse_tokens(value)


def _simple_addresses(value: str) -> list[Address] | None:
    """The common case without comments, quotes, groups or literals (`Name <a@b>, c@d`),
    by regular expression: what _parse_tokens gives, in a fraction of the time (every
    message's address fields are parsed for ENVELOPE and the search index).  None when
    some piece is not that simple."""
    out: list[Address] = []
    for piece in value.split(",", MAX_ADDRESSES):
        m = _SIMPLE_MAILBOX.match(piece)
        if m is None:
            if piece.strip(" \t\r\n"):
                return None
            continue
        if m.group("local") is not None:
            name = m.group("name")
            out.append(Address(MAILBOX, _WS_RUN.sub(" ", name) if name else None, None,
                               m.group("local"), m.group("host")))
        else:
            out.append(Address(MAILBOX, None, None, m.group("local2"), m.group("host2")))
    return out if len(out) <= MAX_ADDRESSES else None


def _parse_tokens(value: str) -> list[Address]:
    """parse_addresses by tokens: the whole RFC 5322 syntax, obsolete forms included."""
    toks = _addr_tokens(value)
    out: list[Address] = []
    i = 0
    while i < len(toks) and len(out) < MAX_ADDRESSES:
        if toks[i][0] in (",", ";", ">", ")", "]", "\\", ":"):
            i += 1  # a separator or stray special between addresses
            continue
        j = _address(toks, i, out, True)
        i = j if j > i else i + 1
    return out


def _address(toks: list[tuple[str, str, bool]], i: int, out: list[Address],
             group_ok: bool) -> int:
    """Parse one mailbox (or, when `group_ok`, a group) at toks[i]; the index after it."""
    n = len(toks)
    phrase: list[tuple[str, str, bool]] = []
    comment: str | None = None
    while i < n and toks[i][0] in ("a", "q", ".", "d", "c"):
        if toks[i][0] == "c":
            comment = toks[i][1] or comment
        else:
            phrase.append(toks[i])
        i += 1
    kind = toks[i][0] if i < n else ""
    if kind == ":" and group_ok:
        out.append(Address(GROUP_START, mailbox=_phrase(phrase) or ""))
        i += 1
        while i < n and toks[i][0] != ";" and len(out) < MAX_ADDRESSES:
            if toks[i][0] in (",", ":", ">", ")", "]", "\\"):
                i += 1
                continue
            j = _address(toks, i, out, False)
            i = j if j > i else i + 1
        out.append(Address(GROUP_END))
        return i + 1
    if kind == "<":
        i, route, local, host, inner_comment = _angle_addr(toks, i + 1)
        i, trailing = _comments(toks, i)
        name = _phrase(phrase) or trailing or inner_comment or comment
        out.append(Address(MAILBOX, name or None, route, local, host))
        return i
    if kind == "@":
        local = _local_part(phrase)
        i, host, inner_comment = _domain(toks, i + 1)
        i, trailing = _comments(toks, i)
        name = trailing or inner_comment or comment
        out.append(Address(MAILBOX, name or None, None, local or None, host))
        return i
    if phrase:  # no address at all: a lone local part, or a display name alone
        if len(phrase) == 1 and phrase[0][0] == "a":
            out.append(Address(MAILBOX, comment, None, phrase[0][1], None))
        else:
            out.append(Address(MAILBOX, _phrase(phrase), None, None, None))
    return i


def _phrase(words: list[tuple[str, str, bool]]) -> str:
    """A display name: its words with one space where the header had white space."""
    out: list[str] = []
    for kind, text, space in words:
        if out and space:
            out.append(" ")
        out.append(text)
    return "".join(out)


def _local_part(words: list[tuple[str, str, bool]]) -> str:
    """A local part: atoms, dots and quoted strings joined; a quoted string that is not a
    plain dot-atom keeps its quotes, so that mailbox@host stays a usable address."""
    out: list[str] = []
    for kind, text, _ in words:
        if kind == "q" and not _DOT_ATOM.match(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(text)
    return "".join(out)


def _domain(toks: list[tuple[str, str, bool]], i: int) -> tuple[int, str | None, str | None]:
    """(index after, domain, last comment inside) from toks[i] on.  Two labels with no dot
    between them are two addresses without their comma (`a@b c@d`), not one domain."""
    parts: list[str] = []
    comment = None
    dot = True
    while i < len(toks) and toks[i][0] in ("a", ".", "d", "c"):
        kind = toks[i][0]
        if kind == "c":
            comment = toks[i][1] or comment
        elif kind == ".":
            parts.append(".")
            dot = True
        elif not dot:
            break
        else:
            parts.append(toks[i][1])
            dot = False
        i += 1
    return i, "".join(parts) or None, comment


def _comments(toks: list[tuple[str, str, bool]], i: int) -> tuple[int, str | None]:
    comment = None
    while i < len(toks) and toks[i][0] == "c":
        comment = toks[i][1] or comment
        i += 1
    return i, comment


def _angle_addr(toks: list[tuple[str, str, bool]], i: int
                ) -> tuple[int, str | None, str | None, str | None, str | None]:
    """After "<": (index after ">", route, local part, domain, last comment inside)."""
    n = len(toks)
    route = None
    if i < n and toks[i][0] == "@":  # obs-route: "@a,@b:" before the address
        j, hops = i, []
        while j < n and toks[j][0] == "@":
            j, hop, _ = _domain(toks, j + 1)
            hops.append("@" + (hop or ""))
            while j < n and toks[j][0] in (",", "c"):
                j += 1
        if j < n and toks[j][0] == ":":
            route, i = ",".join(hops), j + 1
    words: list[tuple[str, str, bool]] = []
    comment = None
    while i < n and toks[i][0] in ("a", "q", ".", "c"):
        if toks[i][0] == "c":
            comment = toks[i][1] or comment
        else:
            words.append(toks[i])
        i += 1
    host = None
    if i < n and toks[i][0] == "@":
        i, host, c = _domain(toks, i + 1)
        comment = c or comment
    while i < n and toks[i][0] not in (">", ",", ";"):
        i += 1  # whatever else before the closing bracket
    if i < n and toks[i][0] == ">":
        i += 1
    return i, route, _local_part(words) or None, host, comment


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"[ \t\r\n]+\Z")


def decode_words(text: str, unknown_charset_as_utf8: bool = False) -> str:
    """`text` with its RFC 2047 encoded words decoded (white space between two adjacent
    ones dropped, RFC 2047 6.2).  Each word is decoded on its own: one with broken
    encoding stays as written without spoiling the rest, and 8-bit text around the words
    is left alone.  A word in an unknown charset stays as written too, or, with
    `unknown_charset_as_utf8`, gives its octets read as UTF-8 (6.2's "best effort", what
    Sieve tests see, as in Pigeonhole)."""
    if "=?" not in text:
        return text
    out: list[str] = []
    pos = 0
    after_word = False
    for m in _ENCODED_WORD.finditer(text):
        between = text[pos:m.start()]
        decoded = _decode_word(m.group(1), m.group(2), m.group(3), unknown_charset_as_utf8)
        if decoded is None:
            out.append(between + m.group())
            after_word = False
        else:
            if not (after_word and _BETWEEN_WORDS.match(between)):
                out.append(between)
            out.append(decoded)
            after_word = True
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def _decode_word(charset: str, encoding: str, encoded: str,
                 unknown_charset_as_utf8: bool = False) -> str | None:
    """One encoded word's text, or None when it cannot be decoded."""
    charset = charset.partition("*")[0]  # RFC 2231 5: a language after the charset
    try:
        raw = encoded.encode("ascii")
        if encoding in "Bb":
            data = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
        else:
            data = binascii.a2b_qp(raw, header=True)
    except (ValueError, binascii.Error):
        return None
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace") if unknown_charset_as_utf8 else None


def _addresses(value: bytes | None) -> bytes:
    """An address list of ENVELOPE (RFC 3501 7.4.2): NIL when the field is absent or
    holds no address; a group is (NIL NIL name NIL) ... (NIL NIL NIL NIL)."""
    if value is None:
        return b"NIL"
    return envelope_addresses(parse_addresses(value.decode("utf-8", "surrogateescape")))


def envelope_addresses(addresses: Sequence[Address]) -> bytes:
    """`_addresses` of a field whose value is parsed already."""
    out = []
    for a in addresses:
        if a.kind == GROUP_START:
            out.append(b"(NIL NIL " + imap_string(_enc(a.mailbox or "")) + b" NIL)")
        elif a.kind == GROUP_END:
            out.append(b"(NIL NIL NIL NIL)")
        else:
            out.append(b"(" + imap_string(_enc(a.name) if a.name else None) + b" "
                       + imap_string(_enc(a.route) if a.route else None) + b" "
                       + imap_string(_enc(a.mailbox or MISSING_MAILBOX)) + b" "
                       + imap_string(_enc(a.host or MISSING_DOMAIN)) + b")")
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def _budgeted(budget: list[int]) -> Callable[[bytes | None], bytes]:
    """`_addresses`, each address taken from `budget`; NIL once it is spent."""
    def addresses(value: bytes | None) -> bytes:
        if value is None or budget[0] <= 0:
            return b"NIL"
        parsed = parse_addresses(value.decode("utf-8", "surrogateescape"))
        budget[0] -= len(parsed)
        return envelope_addresses(parsed) if budget[0] >= 0 else b"NIL"
    return addresses


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def envelope(part: Part) -> bytes:
    """RFC 3501 7.4.2 ENVELOPE from the part's header fields."""
    return envelope_of(part.header)


def envelope_of(h: Callable[[bytes], bytes | None],
                addresses: Callable[[bytes | None], bytes] = _addresses) -> bytes:
    """ENVELOPE from `h` (lower-case field name -> the first such field's value, or
    None); `addresses` formats an address field (`_addresses`, or one that reuses a
    parse the caller made anyway)."""
    from_ = addresses(h(b"from"))
    sender = addresses(h(b"sender"))
    reply_to = addresses(h(b"reply-to"))
    fields = [
        imap_string(h(b"date")),
        imap_string(h(b"subject")),
        from_,
        # absent or empty (no address in it): the From member (RFC 3501 7.4.2)
        from_ if sender == b"NIL" else sender,
        from_ if reply_to == b"NIL" else reply_to,
        addresses(h(b"to")),
        addresses(h(b"cc")),
        addresses(h(b"bcc")),
        imap_string(h(b"in-reply-to")),
        imap_string(h(b"message-id")),
    ]
    return b"(" + b" ".join(fields) + b")"


def _disposition(part: Part) -> bytes:
    value = part.header(b"content-disposition")
    if not value:
        return b"NIL"
    kind, _, params = parse_content_type(value.split(b";", 1)[0] + b"/x;" +
                                         (value.split(b";", 1)[1] if b";" in value else b""),
                                         ("", ""))
    return b"(" + imap_string(_upper(kind)) + b" " + _param_list(params) + b")"


def _upper(text: str) -> bytes:
    """Upper case for ASCII letters only (str.upper would turn a Latin-1 "\xff" into
    U+0178, which is no octet)."""
    return text.encode("latin-1", "replace").upper()


def _language(part: Part) -> bytes:
    value = part.header(b"content-language")
    if not value:
        return b"NIL"
    langs = [x.strip() for x in value.decode("latin-1").split(",") if x.strip()]
    if len(langs) == 1:
        return imap_string(langs[0])
    return b"(" + b" ".join(imap_string(x) for x in langs) + b")"


# Addresses in all the ENVELOPEs of one BODYSTRUCTURE (its message/rfc822 parts): each
# list is bounded (MAX_ADDRESSES), but a hundred attached messages of 5,000 each made a
# BODYSTRUCTURE twenty times the message's size.  Past it, their address lists are NIL.
MAX_STRUCTURE_ADDRESSES = 10000


def body_structure(part: Part, extended: bool = True,
                   _budget: list[int] | None = None) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (RFC 3501 7.4.2)."""
    budget = [MAX_STRUCTURE_ADDRESSES] if _budget is None else _budget
    if part.is_multipart:
        inner = b"".join(body_structure(c, extended, budget) for c in part.children)
        out = inner + b" " + imap_string(_upper(part.subtype))
        if extended:
            out += b" " + b" ".join([_param_list(part.params), _disposition(part),
                                     _language(part), imap_string(part.header(b"content-location"))])
        return b"(" + out + b")"
    encoding = (part.header(b"content-transfer-encoding") or b"7BIT").strip().upper()
    fields = [
        imap_string(_upper(part.maintype)),
        imap_string(_upper(part.subtype)),
        _param_list(part.params),
        imap_string(part.header(b"content-id")),
        imap_string(part.header(b"content-description")),
        imap_string(encoding),
        b"%d" % (part.end - part.body_start),
    ]
    if part.message is not None:
        fields += [envelope_of(part.message.header, _budgeted(budget)),
                   body_structure(part.message, extended, budget), b"%d" % part.lines]
    elif part.maintype == "text":
        fields.append(b"%d" % part.lines)
    if extended:
        fields += [imap_string(part.header(b"content-md5")), _disposition(part), _language(part),
                   imap_string(part.header(b"content-location"))]
    return b"(" + b" ".join(fields) + b")"


def header_fields(data, part: Part, names: Sequence[bytes], negate: bool) -> bytes:
    """The header lines of `part` named (or, negated, not named) in `names`, exact bytes,
    in their original order, followed by the blank line (RFC 3501 6.4.5)."""
    wanted = {n.lower() for n in names}
    hend, _ = header_end(data, part.start, part.end)
    raw = bytes(data[part.start:hend])
    out = []
    for field_ in re.split(rb"(?<=\r\n)(?![ \t])", raw):
        m = _HEADER_NAME.match(field_)
        if not m:
            continue
        if (m.group(1).lower() in wanted) != negate:
            out.append(field_ if field_.endswith(b"\r\n") else field_ + b"\r\n")
    return b"".join(out) + b"\r\n"


# -- Content-Transfer-Encoding decoding (RFC 2045 6, for RFC 3516 BINARY) -------------------

DECODE_CHUNK = 64 * 1024  # encoded octets decoded at a time
IDENTITY_ENCODINGS = frozenset({b"7bit", b"8bit", b"binary"})
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_NOT_ALPHABET = bytes(c for c in range(256) if c not in _B64_ALPHABET and c != ord("="))
_QP_MAX_PENDING = 4096  # a quoted-printable line longer than this is decoded in pieces


class Base64Decoder:
    """RFC 2045 6.8 base64, fed in pieces: characters outside the alphabet are ignored,
    and the first "=" ends the data (6.8: padding only comes at the end).  Decoding the
    same input in any split gives the same octets; a trailing group of 2 or 3
    characters gives its 1 or 2 octets, a single stray character none."""

    def __init__(self) -> None:
        self._pending = b""
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        if self._ended:
            return b""
        clean = data.translate(None, _B64_NOT_ALPHABET)
        pad = clean.find(b"=")
        if pad >= 0:
            clean = clean[:pad]
            self._ended = True
        if self._pending:
            clean = self._pending + clean
        usable = len(clean) - len(clean) % 4
        self._pending = clean[usable:]
        out = binascii.a2b_base64(clean[:usable]) if usable else b""
        if self._ended:
            out += self.flush()
        return out

    def flush(self) -> bytes:
        tail, self._pending = self._pending, b""
        if len(tail) < 2:
            return b""
        return binascii.a2b_base64(tail + b"=" * (4 - len(tail)))


class QuotedPrintableDecoder:
    """RFC 2045 6.7 quoted-printable, fed in pieces: decoded a line at a time (a soft
    line break or an "=XX" never straddles two calls); a line without an end is held back
    up to _QP_MAX_PENDING octets, then decoded up to a point outside any "=" escape."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        data = self._pending + data if self._pending else data
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) > _QP_MAX_PENDING:
            cut = len(data)
            # Blanks at the end are held back too: if the line ends right after them
            # they are no data (rule 3).  (A longer run goes out as it is.)
            blank = len(data.rstrip(b" \t\r"))
            if cut - blank <= _QP_MAX_PENDING:
                cut = blank
            floor = cut - 2
            while cut > floor and b"=" in data[cut - 2:cut]:
                cut -= 1  # not inside "=XX" nor before a soft break's line end
        self._pending = data[cut:]
        return binascii.a2b_qp(_without_trailing_blanks(data[:cut])) if cut else b""

    def flush(self) -> bytes:
        tail, self._pending = self._pending, b""
        return binascii.a2b_qp(tail.rstrip(b" \t")) if tail else b""


def _without_trailing_blanks(lines: bytes) -> bytes:
    """RFC 2045 6.7 rule 3: white space at the end of an encoded line is not data (a
    decoder deletes it), and "=" then blanks is still a soft line break.  binascii keeps
    both.  Most encoders leave none: looked for line by line only when there is some."""
    if not any(blank in lines for blank in (b" \n", b"\t\n", b" \r\n", b"\t\r\n")):
        return lines
    out = []
    for line in lines.split(b"\n"):
        if line.endswith(b"\r"):
            out.append(line[:-1].rstrip(b" \t") + b"\r")
        else:
            out.append(line.rstrip(b" \t"))
    return b"\n".join(out)


class IdentityDecoder:
    """7bit, 8bit and binary: the octets as they are (RFC 2045 6.2)."""

    def feed(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def transfer_encoding(part: Part) -> bytes:
    """The part's Content-Transfer-Encoding, lower-case; 7bit when it has none."""
    value = part.header(b"content-transfer-encoding")
    value = value.strip().lower() if value else b""
    return value or b"7bit"


def decoder_for(encoding: bytes) -> Base64Decoder | QuotedPrintableDecoder | IdentityDecoder | None:
    """A decoder for a Content-Transfer-Encoding (as transfer_encoding gives it); None for
    one this server cannot decode (RFC 3516 4.3: answered NO [UNKNOWN-CTE])."""
    if encoding in IDENTITY_ENCODINGS:
        return IdentityDecoder()
    if encoding == b"base64":
        return Base64Decoder()
    if encoding == b"quoted-printable":
        return QuotedPrintableDecoder()
    return None


def decoded_chunks(data: bytes | mmap.mmap, start: int, end: int,
                   encoding: bytes) -> Iterator[bytes]:
    """data[start:end] with `encoding` removed, in pieces of at most about DECODE_CHUNK
    octets (empty pieces left out): a large part is never decoded whole in memory.  The
    pieces are the same for the same input, so sizes measured from them match what is
    later sent.  ValueError for an unknown encoding."""
    decoder = decoder_for(encoding)
    if decoder is None:
        raise ValueError(f"unknown Content-Transfer-Encoding {encoding!r}")
    for pos in range(start, end, DECODE_CHUNK):
        out = decoder.feed(bytes(data[pos:min(pos + DECODE_CHUNK, end)]))
        if out:
            yield out
    out = decoder.flush()
    if out:
        yield out


def decoded_facts(data: bytes | mmap.mmap, start: int, end: int,
                  encoding: bytes) -> tuple[int, bool]:
    """(decoded size, whether it holds a NUL) of data[start:end] under `encoding`, in one
    streaming pass (no decoding at all for the identity encodings)."""
    if encoding in IDENTITY_ENCODINGS:
        return end - start, data.find(b"\0", start, end) >= 0
    size, nul = 0, False
    for piece in decoded_chunks(data, start, end, encoding):
        size += len(piece)
        nul = nul or b"\0" in piece
    return size, nul


def binary_facts(todo: list[tuple[int, str, list[tuple[str, tuple[int, ...]]]]]
                 ) -> tuple[dict[tuple[int, str], bytes], tuple[int, ...] | None]:
    """RFC 3516 4.2/4.3, for a FETCH BINARY before it streams (in a worker thread):
    `todo` is [(uid, file path, [(key, part numbers)])]; the answer is
    {(uid, key): b"<decoded size> <1 if it holds a NUL else 0>"}, and the part numbers of
    the first section whose transfer encoding cannot be removed (else None).  A file
    that is gone is left out: the FETCH reports it as it reports any vanished message."""
    facts: dict[tuple[int, str], bytes] = {}
    for uid, path, sections in todo:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f, MessageBytes(f) as message:
            data = message.data
            root = parse_structure(data) if any(numbers for _, numbers in sections) else None
            for key, numbers in sections:
                if not numbers:
                    start, end, encoding = 0, len(data), b"binary"
                else:
                    assert root is not None
                    part = find_part(root, list(numbers))
                    if part is None:
                        facts[(uid, key)] = b"0 0"
                        continue
                    start, end, encoding = part.body_start, part.end, transfer_encoding(part)
                if decoder_for(encoding) is None:
                    return facts, numbers
                size, nul = decoded_facts(data, start, end, encoding)
                facts[(uid, key)] = b"%d %d" % (size, nul)
    return facts, None
