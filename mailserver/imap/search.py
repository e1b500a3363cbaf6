"""SEARCH (RFC 3501 6.4.4): the full key grammar, evaluated over the session's view.

Keys on flags, sizes, dates and UIDs are answered from the folder's metadata; header and
text keys read the message files, in a thread, so a search over a large folder never
stalls other clients.
"""

from __future__ import annotations

import calendar
import json
import email
import email.header
import email.policy
import email.utils
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import threads

from mailserver.imap import mime
from mailserver.imap.fetch import vsize_hint_from
from mailserver.maildir.sizes import VSIZE_KEY
from mailserver.imap.parser import Arguments, BadCommand, parse_sequence_set

if TYPE_CHECKING:
    from mailserver.imap.server import IMAPSession

CHARSETS = ("UTF-8", "US-ASCII")
# Header fields SEARCH keys name most; their decoded text is kept in the folder index.
SEARCH_FIELDS = ("subject", "from", "to", "cc", "bcc", "date")
SEARCH_KEY = "search"
_DATE = re.compile(rb'^"?(\d{1,2})-([A-Za-z]{3})-(\d{4})"?$')
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_FLAG_KEYS = {
    b"ANSWERED": ("\\Answered", True), b"UNANSWERED": ("\\Answered", False),
    b"DELETED": ("\\Deleted", True), b"UNDELETED": ("\\Deleted", False),
    b"DRAFT": ("\\Draft", True), b"UNDRAFT": ("\\Draft", False),
    b"FLAGGED": ("\\Flagged", True), b"UNFLAGGED": ("\\Flagged", False),
    b"SEEN": ("\\Seen", True), b"UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {b"BCC": "bcc", b"CC": "cc", b"FROM": "from", b"SUBJECT": "subject", b"TO": "to"}


@dataclass(slots=True)
class Row:
    """What a search key may look at for one message."""

    seq: int
    uid: int
    flags: frozenset[str]
    known_size: int | None  # CRLF size when the name or the index knows it
    internaldate: float
    path: Any
    largest_seq: int = 0  # what '*' means in a sequence set
    largest_uid: int = 0
    fields: dict[str, str] | None = None  # SEARCH_FIELDS from the index, or computed
    fields_computed: bool = False
    _headers: list[tuple[bytes, bytes]] | None = None
    _message: Any = None

    def size(self) -> int:
        """RFC822.SIZE of the message; measured (blocking) when not known."""
        if self.known_size is None:
            with open(self.path, "rb") as f, mime.MessageBytes(f) as mb:
                self.known_size = len(mb.data)
        return self.known_size

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self._headers is None:
            with open(self.path, "rb") as f:
                with mime.MessageBytes(f) as mb:
                    data = mb.data
                    hend, _ = mime.header_end(data, 0, len(data))
                    self._headers = mime.parse_headers(bytes(data[:hend]))
        return self._headers

    def header_text(self, name: str) -> str:
        name = name.lower()
        if name in SEARCH_FIELDS:
            if self.fields is None:
                self.fields = {f: self._decoded(f) for f in SEARCH_FIELDS}
                self.fields_computed = True
            return self.fields[name]
        return self._decoded(name)

    def _decoded(self, name: str) -> str:
        key = name.encode("latin-1", "replace")
        return "\n".join(_decode(v) for k, v in self.headers() if k == key)

    def message(self) -> Any:
        if self._message is None:
            with open(self.path, "rb") as f:
                self._message = email.message_from_binary_file(f, policy=email.policy.default)
        return self._message


def _decode(value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        return text


Predicate = Callable[[Row], bool]


def _contains(haystack: str, needle: str) -> bool:
    return needle.casefold() in haystack.casefold()


def _parse_date(raw: bytes) -> int:
    m = _DATE.match(raw)
    if not m:
        raise BadCommand("invalid date")
    day, mon, year = m.groups()
    try:
        month = _MONTHS.index(mon.decode().lower()) + 1
        return calendar.timegm((int(year), month, int(day), 0, 0, 0, 0, 0, 0)) // 86400
    except (ValueError, OverflowError):
        raise BadCommand("invalid date") from None


def _sent_day(row: Row) -> int | None:
    value = row.header_text("date")
    parsed = email.utils.parsedate_tz(value) if value else None
    if not parsed:
        return None
    # RFC 3501: compare the date in the header's own time zone, ignoring the time.
    return calendar.timegm((parsed[0], parsed[1], parsed[2], 0, 0, 0, 0, 0, 0)) // 86400


def _body_text(row: Row, with_headers: bool) -> str:
    msg = row.message()
    texts = []
    if with_headers:
        texts.extend(f"{k}: {v}" for k, v in msg.items())
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            try:
                texts.append(part.get_content())
            except Exception:
                payload = part.get_payload(decode=True) or b""
                texts.append(payload.decode("utf-8", "replace"))
    return "\n".join(texts)


class Query:
    """A compiled search key: its predicate and whether it may have to read files."""

    def __init__(self, predicate: Predicate, needs_files: bool, needs_size: bool = False,
                 needs_fields: bool = False) -> None:
        self.predicate = predicate
        self.needs_files = needs_files or needs_size or needs_fields
        self.needs_size = needs_size
        self.needs_fields = needs_fields


def parse_search(args: Arguments) -> Query:
    charset = "UTF-8"
    if args._text[args.pos:args.pos + 8].upper() == b"CHARSET ":
        args.atom()
        args.space()
        charset = args.astring().decode("ascii", "replace").upper()
        if charset not in CHARSETS:
            from mailserver.imap.server import CommandFailed

            raise CommandFailed(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        args.space()
    keys = [_key(args, charset, 0)]
    while args.maybe_space():
        keys.append(_key(args, charset, 0))
    args.end()
    return _and(keys)


def _and(keys: list[Query]) -> Query:
    preds = [k.predicate for k in keys]
    return _combine(lambda r: all(p(r) for p in preds), keys)


def _combine(predicate: Predicate, keys: list[Query]) -> Query:
    return Query(predicate, any(k.needs_files for k in keys), any(k.needs_size for k in keys),
                 any(k.needs_fields for k in keys))


def _text_arg(args: Arguments, charset: str) -> str:
    args.space()
    raw = args.astring()
    try:
        return raw.decode("utf-8" if charset == "UTF-8" else "ascii")
    except UnicodeDecodeError:
        raise BadCommand("search string not in the given charset") from None


def _key(args: Arguments, charset: str, depth: int) -> Query:
    if depth > 32:
        raise BadCommand("search nesting too deep")
    if args.peek() == b"(":
        keys = args.paren_list(lambda a: _key(a, charset, depth + 1))
        if not keys:
            raise BadCommand("empty search list")
        return _and(keys)
    if args.peek() in (b"*",) or args.peek().isdigit():
        seqset = args.sequence_set()
        return Query(lambda r, s=seqset: s.contains(r.seq, r.largest_seq), False)
    word = args.atom().upper()
    if word == b"ALL":
        return Query(lambda r: True, False)
    if word in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[word]
        return Query(lambda r: (flag in r.flags) == present, False)
    if word in (b"NEW", b"OLD", b"RECENT"):
        if word == b"NEW":
            return Query(lambda r: "\\Recent" in r.flags and "\\Seen" not in r.flags, False)
        if word == b"OLD":
            return Query(lambda r: "\\Recent" not in r.flags, False)
        return Query(lambda r: "\\Recent" in r.flags, False)
    if word in (b"KEYWORD", b"UNKEYWORD"):
        args.space()
        kw = args.flag().decode("ascii", "replace")
        present = word == b"KEYWORD"
        return Query(lambda r: any(f.lower() == kw.lower() for f in r.flags) == present, False)
    if word in _HEADER_KEYS:
        name = _HEADER_KEYS[word]
        needle = _text_arg(args, charset)
        return Query(lambda r: _contains(r.header_text(name), needle), False, needs_fields=True)
    if word == b"HEADER":
        args.space()
        field = args.astring().decode("ascii", "replace")
        needle = _text_arg(args, charset)
        if not needle:
            return Query(lambda r: any(k == field.lower().encode() for k, _ in r.headers()), True)
        return Query(lambda r: _contains(r.header_text(field), needle), True)
    if word in (b"BODY", b"TEXT"):
        needle = _text_arg(args, charset)
        with_headers = word == b"TEXT"
        return Query(lambda r: _contains(_body_text(r, with_headers), needle), True)
    if word in (b"BEFORE", b"ON", b"SINCE"):
        args.space()
        day = _parse_date(args.astring())
        cmp = {b"BEFORE": lambda d: d < day, b"ON": lambda d: d == day,
               b"SINCE": lambda d: d >= day}[word]
        return Query(lambda r: cmp(int(r.internaldate) // 86400), False)
    if word in (b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
        args.space()
        day = _parse_date(args.astring())
        cmp = {b"SENTBEFORE": lambda d: d < day, b"SENTON": lambda d: d == day,
               b"SENTSINCE": lambda d: d >= day}[word]
        return Query(lambda r: (lambda d: d is not None and cmp(d))(_sent_day(r)), False,
                     needs_fields=True)
    if word in (b"LARGER", b"SMALLER"):
        args.space()
        n = args.number()
        if word == b"LARGER":
            return Query(lambda r: r.size() > n, False, needs_size=True)
        return Query(lambda r: r.size() < n, False, needs_size=True)
    if word == b"NOT":
        args.space()
        inner = _key(args, charset, depth + 1)
        return _combine(lambda r: not inner.predicate(r), [inner])
    if word == b"OR":
        args.space()
        a = _key(args, charset, depth + 1)
        args.space()
        b = _key(args, charset, depth + 1)
        return _combine(lambda r: a.predicate(r) or b.predicate(r), [a, b])
    if word == b"UID":
        args.space()
        uidset = args.sequence_set()
        return Query(lambda r, s=uidset: s.contains(r.uid, r.largest_uid), False)
    raise BadCommand(f"unknown search key {word.decode('ascii', 'replace')}")


def search(session: "IMAPSession", query: Query):
    """Deferred list of matching UIDs, in sequence order.

    Flags, dates, UIDs and known sizes come from memory; header keys use the decoded
    fields kept in the folder index (read for all rows in batches, computed from the files
    in a thread for messages not indexed yet, then stored); body keys read the files.
    """
    from twisted.internet import defer

    folder = session.folder
    view = list(session.view)
    largest_seq, largest_uid = len(view), view[-1] if view else 0
    sizes: dict[int, Any] = {}
    if query.needs_size:
        sizes = folder.cache_get_many(view, VSIZE_KEY)
    rows = []
    for i, u in enumerate(view):
        info = folder.by_uid(u)
        if info is None:
            continue
        known = None
        if query.needs_size:
            known = vsize_hint_from(folder, info, sizes.get(u))
        rows.append(Row(i + 1, u, session._flags_of(u), known, info.internaldate,
                        folder.message_path(u) if query.needs_files else None,
                        largest_seq, largest_uid))

    def run() -> list[int]:
        if query.needs_fields:  # index reads for a whole folder: here, not in the reactor
            for i in range(0, len(rows), 1000):
                chunk = rows[i:i + 1000]
                found = folder.cache_get_many([r.uid for r in chunk], SEARCH_KEY)
                for r in chunk:
                    cached = found.get(r.uid)
                    if cached is not None:
                        r.fields = json.loads(cached)
        out = []
        for row in rows:
            try:
                if query.predicate(row):
                    out.append(row.uid)
            except OSError:
                continue  # expunged meanwhile
        return out

    def remember(found: list[int]) -> list[int]:
        for row in rows:
            if row.fields_computed and row.fields is not None:
                folder.cache_put(row.uid, SEARCH_KEY, json.dumps(row.fields))
        return found

    if not query.needs_files:
        return defer.maybeDeferred(run)
    return threads.deferToThread(run).addCallback(remember)


__all__ = ["parse_search", "search", "parse_sequence_set"]
