"""MIME structure of a stored message with byte offsets, for FETCH and SEARCH.

The parser works on the message bytes in place (an mmap of the file for CRLF files), so
a large message is never copied into memory to answer BODYSTRUCTURE or a partial fetch;
every section IMAP can name (HEADER, TEXT, MIME, part numbers) is a (start, end) span of
the original bytes, so header fetches return the exact bytes stored, in their order.
"""

from __future__ import annotations

import email.utils
import mmap
import re
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

MAX_DEPTH = 20
MAX_PARTS = 5000

_HEADER_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_PARAM = re.compile(
    r"""\s*;\s*([!#-'*+.0-9A-Z^-~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)""", re.S)


class MessageBytes:
    """The octets of a message as IMAP sees them: CRLF line ends, whatever is on disk.

    CRLF files (what this server stores) are mapped, not read; an LF-only file (as
    Dovecot writes by default) is read and converted, which costs memory only for mail
    that was migrated from such a store.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._mmap: mmap.mmap | None = None
        size = _fsize(f)
        if size == 0:
            self.data: bytes | mmap.mmap = b""
            return
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        first_nl = m.find(b"\n")
        if first_nl > 0 and m[first_nl - 1:first_nl] != b"\r":
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
        return part
    if part.is_multipart:
        boundary = dict(part.params).get("boundary")
        if boundary:
            child_default = ("message", "rfc822") if part.subtype == "digest" else ("text", "plain")
            for s, e in _split_multipart(data, body_start, end, boundary.encode("latin-1")):
                part.children.append(_parse_part(data, s, e, child_default, depth + 1, counter))
                if counter[0] > MAX_PARTS:
                    break
        if not part.children:
            # RFC 3501 requires at least one part; treat a broken multipart as text.
            part.maintype, part.subtype = "text", "plain"
    elif (part.maintype, part.subtype) in (("message", "rfc822"), ("message", "global")):
        part.message = _parse_part(data, body_start, end, ("text", "plain"), depth + 1, counter)
    return part


def _split_multipart(data, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """Spans of the body parts between the boundary lines (RFC 2046 5.1.1)."""
    delim = b"--" + boundary
    spans: list[tuple[int, int]] = []
    # Find the first delimiter: at the very start or after a CRLF.
    if data[start:start + len(delim)] == delim:
        pos = start
    else:
        pos = data.find(b"\r\n" + delim, start, end)
        if pos < 0:
            return spans
        pos += 2
    while True:
        after = pos + len(delim)
        if data[after:after + 2] == b"--":
            return spans  # close delimiter before any part content
        line_end = data.find(b"\r\n", after, end)
        if line_end < 0:
            return spans
        part_start = line_end + 2
        nxt = data.find(b"\r\n" + delim, part_start - 2, end)
        if nxt < 0:
            spans.append((part_start, end))
            return spans
        spans.append((part_start, max(part_start, nxt)))
        pos = nxt + 2
        if data[pos + len(delim):pos + len(delim) + 2] == b"--":
            return spans
        if len(spans) > MAX_PARTS:
            return spans


def find_part(root: Part, numbers: Sequence[int]) -> Part | None:
    """The part a section's numbers name (RFC 3501 6.4.5), 1-based."""
    part = root
    for n in numbers:
        if part.message is not None:
            part = part.message
        if part.is_multipart:
            if not 1 <= n <= len(part.children):
                return None
            part = part.children[n - 1]
        elif n != 1:
            return None
    return part


# -- IMAP rendering -----------------------------------------------------------------------

def imap_string(value: bytes | str | None) -> bytes:
    """NIL, a quoted string, or a literal when the value cannot be quoted."""
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8")
    if len(value) < 1024 and not re.search(rb'[\x00\r\n"\\\x80-\xff]', value):
        return b'"' + value + b'"'
    if not re.search(rb"[\x00\r\n\x80-\xff]", value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n%s" % (len(value), value)


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(imap_string(k) + b" "
                            + imap_string(v) for k, v in params) + b")"


def _addresses(value: bytes | None) -> bytes:
    if value is None:
        return b"NIL"
    text = value.decode("utf-8", "surrogateescape")
    out = []
    for name, addr in email.utils.getaddresses([text]):
        if not addr and not name:
            continue
        local, _, host = addr.rpartition("@") if "@" in addr else (addr, "", "")
        out.append(b"(" + imap_string(_enc(name) or None) + b" NIL "
                   + imap_string(_enc(local) if local else None) + b" "
                   + imap_string(_enc(host) if host else None) + b")")
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def envelope(part: Part) -> bytes:
    """RFC 3501 7.4.2 ENVELOPE from the part's header fields."""
    h = part.header
    from_ = h(b"from")
    fields = [
        imap_string(h(b"date")),
        imap_string(h(b"subject")),
        _addresses(from_),
        _addresses(h(b"sender") or from_),
        _addresses(h(b"reply-to") or from_),
        _addresses(h(b"to")),
        _addresses(h(b"cc")),
        _addresses(h(b"bcc")),
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
    return b"(" + imap_string(kind.upper()) + b" " + _param_list(params) + b")"


def _language(part: Part) -> bytes:
    value = part.header(b"content-language")
    if not value:
        return b"NIL"
    langs = [x.strip() for x in value.decode("latin-1").split(",") if x.strip()]
    if len(langs) == 1:
        return imap_string(langs[0])
    return b"(" + b" ".join(imap_string(x) for x in langs) + b")"


def body_structure(part: Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (RFC 3501 7.4.2)."""
    if part.is_multipart:
        inner = b"".join(body_structure(c, extended) for c in part.children)
        out = inner + b" " + imap_string(part.subtype.upper())
        if extended:
            out += b" " + b" ".join([_param_list(part.params), _disposition(part),
                                     _language(part), imap_string(part.header(b"content-location"))])
        return b"(" + out + b")"
    encoding = (part.header(b"content-transfer-encoding") or b"7BIT").strip().upper()
    fields = [
        imap_string(part.maintype.upper()),
        imap_string(part.subtype.upper()),
        _param_list(part.params),
        imap_string(part.header(b"content-id")),
        imap_string(part.header(b"content-description")),
        imap_string(encoding),
        b"%d" % (part.end - part.body_start),
    ]
    if part.message is not None:
        fields += [envelope(part.message), body_structure(part.message, extended),
                   b"%d" % part.lines]
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
