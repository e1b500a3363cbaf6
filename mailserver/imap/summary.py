"""A message's header summary: what a first FETCH ENVELOPE, header-field fetches and header
SEARCH keys need, computed in one pass over the header section and kept in the folder index.

For each message the pass reads the header section once (not the body) and produces

- its ENVELOPE (RFC 3501 7.4.2), exactly as `mime.envelope` gives it;
- its search fields (index.py's `search` table): SUBJECT, FROM, TO, CC, BCC decoded and
  case-folded, and DATE, exactly as SEARCH computes them from the file;
- the raw lines of the envelope's header fields (SUMMARY_FIELDS), in message order, as
  stored: BODY[HEADER.FIELDS (...)] for any subset of those names (DATE FROM TO CC SUBJECT
  MESSAGE-ID, what clients list) is then cut from them byte for byte (`fields_from_lines`),
  without the file, as Dovecot answers it from its cache.

Nothing here imports Twisted: `summarize_files` runs in a worker process
(inbound/worker.py) or a thread, reads the files of a batch, writes what it found to the
index itself (index.write_summaries), and returns the envelopes and header lines for the
FETCH that is waiting for them.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import struct
import unicodedata
from typing import NamedTuple, Sequence

from mailserver.imap import mime
from mailserver.maildir.index import write_summaries

log = logging.getLogger(__name__)

ENVELOPE_KEY = "envelope"   # index cache key of the ENVELOPE text (what fetch.py reads)
LINES_KEY = "hdr2"          # index cache key of the header lines (see `lines_value`)
# The envelope's header fields, lower case: the ones whose raw lines are kept.
SUMMARY_FIELDS = (b"date", b"subject", b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc",
                  b"in-reply-to", b"message-id")
SUMMARY_NAMES = frozenset(SUMMARY_FIELDS)
# In a LINES_KEY value each field is named by one character: its place in SUMMARY_FIELDS.
_CODE = {name: b"%c" % (ord("a") + k) for k, name in enumerate(SUMMARY_FIELDS)}
_NAME_OF = {code[0]: name for name, code in _CODE.items()}
_LENGTH = struct.Struct(">I")
_LENGTHS: dict[int, struct.Struct] = {}
# SEARCH's fields (search.py SEARCH_FIELDS, index.SEARCH_COLUMNS order), date last.
SEARCH_FIELDS = (b"subject", b"from", b"to", b"cc", b"bcc", b"date")
ADDRESS_FIELDS = frozenset((b"from", b"to", b"cc", b"bcc"))

# A field of SUMMARY_FIELDS where a field starts, in the lower-cased header with a CRLF put
# before it: after a CRLF, so not a continuation line (what mime.parse_headers splits on).
_FIELD_START = re.compile(
    rb"\r\n(date|subject|from|sender|reply-to|to|cc|bcc|in-reply-to|message-id)[ \t]*:")
FIRST_READ = 8192   # octets read first: the whole header section of most messages


class Summary(NamedTuple):
    envelope: bytes
    lines: bytes                    # lines_value(): the header lines as the index keeps them
    search: tuple[str, ...]         # SEARCH_FIELDS' values (index.SEARCH_COLUMNS)


# -- text as SEARCH matches it -----------------------------------------------------------------

def header_text(value: bytes) -> str:
    """A raw header value as text: UTF-8 (RFC 6532), else Latin-1 (never fails)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


_SPACES = re.compile(r"\s+")


def search_form(text: str) -> str:
    """Text as SEARCH compares it, kept in the index and asked for alike: each run of
    white space one space (a field folded with a TAB, "double  space"), compatibility
    decomposed and case-folded, so that "café" precomposed, decomposed (as macOS writes
    it) and in any case, and a ligature and its letters, are the same (as Dovecot)."""
    text = _SPACES.sub(" ", text)
    if text.isascii():
        return text.casefold()
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())


def decoded_text(value: bytes) -> str:
    """A raw header value with its RFC 2047 encoded words decoded."""
    return mime.decode_words(header_text(value))


def address_text(value: bytes, parsed: list[mime.Address] | None = None) -> str:
    """An address field as FROM/TO/CC/BCC match it (RFC 3501 6.4.4): each address as
    `display name <local@domain>` with the name's encoded words decoded, and groups as
    `name: members;`.  Parsed first, so that comments, route and quoting do not split an
    address (`<user (c)@ (c) domain.org>` holds "user@domain.org") and encoded words are
    decoded only where the header allows them.  `parsed`: the value's addresses when the
    caller has them already."""
    out: list[str] = []
    members: list[str] | None = None
    group = ""
    for a in parsed if parsed is not None else mime.parse_addresses(header_text(value)):
        if a.kind == mime.GROUP_START:
            members, group = [], mime.decode_words(a.mailbox or "")
        elif a.kind == mime.GROUP_END:
            out.append(group + ":" + (" " + ", ".join(members) if members else "") + ";")
            members = None
        else:
            addr = a.mailbox or ""
            if a.host:
                addr += "@" + a.host
            name = mime.decode_words(a.name) if a.name else ""
            text = f"{name} <{addr}>" if name and addr else name or addr
            (out if members is None else members).append(text)
    return ", ".join(out)


# -- one header section --------------------------------------------------------------------------

def _fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, raw field with its line end) of each SUMMARY_FIELDS field of the
    header section `head`, in order; a last field without a line end gets one (as
    mime.header_fields answers it)."""
    out: list[tuple[bytes, bytes]] = []
    n = len(head)
    find = head.find
    for m in _FIELD_START.finditer(b"\r\n" + head.lower()):
        start = m.start()   # in `head`: the CRLF put before it is 2 octets long
        pos = m.end() - 2
        while True:
            i = find(b"\r\n", pos)
            if i < 0:
                end = n
                break
            nxt = head[i + 2:i + 3]
            if nxt != b" " and nxt != b"\t":
                end = i + 2
                break
            pos = i + 2
        raw = head[start:end]
        out.append((m.group(1), raw if raw[-2:] == b"\r\n" else raw + b"\r\n"))
    return out


def lines_value(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """What the index keeps under LINES_KEY: a character per field naming it (_CODE), a
    newline, each field's length (4 octets, big-endian), then the fields' raw bytes and
    the blank line that ends a header.  So the usual answer (every field kept is wanted)
    is the value from one known place on, without parsing a thing."""
    return (b"".join(_CODE[name] for name, _ in fields) + b"\n"
            + b"".join(_LENGTH.pack(len(raw)) for _, raw in fields)
            + b"".join(raw for _, raw in fields) + b"\r\n")


def lines_start(count: int) -> int:
    """Where the fields begin in a LINES_KEY value that keeps `count` of them."""
    return (_LENGTH.size + 1) * count + 1


def fields_from_lines(value: bytes, wanted: frozenset[bytes],
                      memo: dict[bytes, tuple[int, ...] | None] | None = None) -> bytes:
    """BODY[HEADER.FIELDS (wanted)] (lower-case names, a subset of SUMMARY_NAMES) from a
    LINES_KEY value: the named fields in message order and the blank line.  `memo` keeps,
    per list of fields kept (few differ within a folder), the fields to leave out."""
    n = value.find(b"\n")   # the number of fields kept
    if n <= 0:
        return b"\r\n"
    codes = value[:n]
    drop = memo.get(codes, False) if memo is not None else False
    if drop is False:
        drop = tuple(k for k, c in enumerate(codes) if _NAME_OF[c] not in wanted) or None
        if memo is not None:
            memo[codes] = drop
    blob = lines_start(n)
    if drop is None:         # every field kept is wanted: the lines as they are
        return value[blob:]
    lengths = _LENGTHS.get(n)
    if lengths is None:
        lengths = _LENGTHS[n] = struct.Struct(">%dI" % n)
    sizes = lengths.unpack_from(value, n + 1)
    out = []
    pos = start = blob       # `start`: where the next piece to keep begins
    done = 0                 # fields before `pos`
    for k in drop:
        pos += sum(sizes[done:k])  # the start of field k
        out.append(value[start:pos])
        pos += sizes[k]
        start, done = pos, k + 1
    out.append(value[start:])  # the fields after the last one left out, the blank line
    return b"".join(out)


# Address fields seen lately -> (ENVELOPE's address list, SEARCH's text): the same
# senders and recipients come back message after message.
_ADDRESSES: dict[bytes, tuple[bytes, str]] = {}
_ADDRESSES_MAX = 5_000


def _address_field(value: bytes) -> tuple[bytes, str]:
    """(ENVELOPE's address list, SEARCH's text) of an address field's value: each as
    mime._addresses and address_text give it, from one parse when they read the value
    alike (ASCII)."""
    known = _ADDRESSES.get(value)
    if known is not None:
        return known
    parsed = mime.parse_addresses(value.decode("utf-8", "surrogateescape"))
    text = address_text(value, parsed if value.isascii() else None)
    known = (mime.envelope_addresses(parsed), text)
    if len(_ADDRESSES) >= _ADDRESSES_MAX:
        _ADDRESSES.clear()
    _ADDRESSES[value] = known
    return known


def summarize(head: bytes) -> Summary:
    """The summary of a message from its header section (mime.read_head's bytes)."""
    fields = _fields(head)
    values: dict[bytes, list[bytes]] = {}
    firsts: dict[bytes, bytes] = {}  # what ENVELOPE shows: each field's first value
    for name, raw in fields:
        value = raw[raw.index(b":") + 1:].replace(b"\r\n", b"").strip()
        found = values.get(name)
        if found is None:
            values[name] = [value]
            firsts[name] = value
        else:
            found.append(value)

    def addresses(value: bytes | None) -> bytes:
        return b"NIL" if value is None else _address_field(value)[0]

    envelope = mime.envelope_of(firsts.get, addresses)
    search: list[str] = []
    for name in SEARCH_FIELDS:
        found = values.get(name)
        if not found:
            search.append("")
        elif name in ADDRESS_FIELDS:
            search.append(search_form("\n".join(_address_field(v)[1] for v in found)))
        elif name == b"date":
            search.append("\n".join(decoded_text(v) for v in found))
        else:
            search.append(search_form("\n".join(decoded_text(v) for v in found)))
    return Summary(envelope, lines_value(fields), tuple(search))


def head_of(path: str) -> bytes:
    """The header section of the message file at `path` (OSError if it cannot be read),
    as FETCH reads it (mime.read_head; the mapped file's for a huge header): one read for
    a CRLF file whose header fits in FIRST_READ."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = os.read(fd, FIRST_READ)
        nl = buf.find(b"\n")
        if nl > 0 and buf[nl - 1] == 13:   # CRLF line ends: read_head takes it as it is
            if buf[:2] == b"\r\n":
                return b"\r\n"
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return buf[:end + 4]
        os.lseek(fd, 0, os.SEEK_SET)
        with open(fd, "rb", closefd=False) as f:
            head = mime.read_head(f)
            if head is None:
                f.seek(0)
                with mime.MessageBytes(f) as mb:
                    hend, _ = mime.header_end(mb.data, 0, len(mb.data))
                    head = bytes(mb.data[:hend])
        return head
    finally:
        os.close(fd)


# -- a batch of files (a worker process or a thread) ---------------------------------------------

def summarize_files(folder_dir: str, items: Sequence[tuple[str, str, str]],
                    index_dir: str | None = None, keys: Sequence[str] = (ENVELOPE_KEY, LINES_KEY)
                    ) -> tuple[list[tuple[str, bytes | None, bytes | None]],
                               list[tuple[str, ...]] | None]:
    """Summaries of the messages `items` ((base name, subdir, file name)) of the folder at
    `folder_dir`: ([(base, envelope, header lines)], search rows), the envelope and lines
    only for those of `keys` the caller wants back (None for the others).  All of it is
    written in one transaction to the folder's index (in `index_dir`, by default the
    folder's own directory) and the search rows come back as None; when the index could
    not take them, everything comes back for the caller to keep.  A file renamed meanwhile (another process changed its flags) is found by
    its base name; a message whose file is gone is left out."""
    found: list[tuple[str, bytes, bytes]] = []  # (base, envelope, lines)
    search_rows: list[tuple[str, ...]] = []
    listing: dict[str, tuple[str, str]] | None = None
    for base, subdir, name in items:
        try:
            head = head_of(os.path.join(folder_dir, subdir, name))
        except FileNotFoundError:
            if listing is None:
                listing = _listing(folder_dir)
            where = listing.get(base)
            if where is None:
                continue
            try:
                head = head_of(os.path.join(folder_dir, *where))
            except OSError:
                continue
        except OSError as e:
            log.warning("cannot read %s: %s", name, e)
            continue
        s = summarize(head)
        found.append((base, s.envelope, s.lines))
        search_rows.append((base, *s.search))
    if found:
        try:
            if write_summaries(
                    index_dir or folder_dir,
                    [(b, ENVELOPE_KEY, env) for b, env, _ in found]
                    + [(b, LINES_KEY, lines) for b, _, lines in found],
                    search_rows):
                envelopes, lines = ENVELOPE_KEY in keys, LINES_KEY in keys
                return [(b, e if envelopes else None, h if lines else None)
                        for b, e, h in found], None
        except sqlite3.Error as e:
            log.warning("index of %s: summaries not written: %s", folder_dir, e)
    return list(found), search_rows


def _listing(folder_dir: str) -> dict[str, tuple[str, str]]:
    listing: dict[str, tuple[str, str]] = {}
    for subdir in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(folder_dir, subdir))
        except OSError:
            continue
        for name in names:
            if not name.startswith("."):
                listing[name.partition(":")[0]] = (subdir, name)
    return listing
