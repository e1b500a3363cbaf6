"""SEARCH (RFC 3501 6.4.4): the full key grammar, evaluated over the session's view.

Keys on flags, sizes, dates and UIDs are answered from the folder's metadata; header and
text keys read the message files, in a thread, so a search over a large folder never
stalls other clients.
"""

from __future__ import annotations

import bisect
import datetime
import email
import email.policy
import email.utils
import re
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger

from mailserver.imap import headerpass, mime, summary
from mailserver.imap.condstore import parse_modseq
from mailserver.imap.fetch import vsize_hint_from
from mailserver.maildir.index import SEARCH_COLUMNS
from mailserver.maildir.uidranges import intersect_ranges
from mailserver.maildir.sizes import VSIZE_KEY
from mailserver.imap.parser import (
    Arguments,
    BadCommand,
    SavedSet,
    SequenceSet,
    parse_sequence_set,
)

if TYPE_CHECKING:
    from mailserver.imap.server import IMAPSession

log = Logger()

CHARSETS = ("UTF-8", "US-ASCII")
FIELD_BATCH = 1000  # search-field rows written to the index per transaction
INLINE_RANGES = 64  # ranges of sets a search may resolve in the reactor (_few_ranges)
# Header fields SEARCH keys name most; their decoded text is kept in the folder index
# (in SEARCH_COLUMNS, the same order, date last).
SEARCH_FIELDS = ("subject", "from", "to", "cc", "bcc", "date")
ADDRESS_FIELDS = frozenset(("from", "to", "cc", "bcc"))
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
_COLUMNS = dict(zip(SEARCH_FIELDS, SEARCH_COLUMNS))


@dataclass(slots=True)
class Row:
    """What a search key may look at for one message.

    One Row object is reused for every message of a search (set with `load`): building a
    fresh object per message costs more than the test of most keys.
    """

    largest_seq: int = 0  # what '*' means in a sequence set
    largest_uid: int = 0
    seq: int = 0
    uid: int = 0
    base: str = ""
    flags: frozenset[str] = frozenset()
    known_size: int | None = None  # CRLF size when the name or the index knows it
    internaldate: float = 0.0
    folder_path: Any = None
    info: Any = None
    _headers: list[tuple[bytes, bytes]] | None = None
    _message: Any = None

    def load(self, seq: int, uid: int, info: Any, flags: frozenset[str],
             known_size: int | None, folder_path: Any) -> None:
        self.seq, self.uid, self.base, self.flags = seq, uid, info.basename, flags
        self.known_size, self.internaldate = known_size, info.internaldate
        self.info, self.folder_path = info, folder_path
        self._headers = self._message = None

    @property
    def path(self) -> Any:
        return self.folder_path / self.info.subdir / self.info.filename

    def size(self) -> int:
        """RFC822.SIZE of the message; measured (blocking) when not known."""
        if self.known_size is None:
            with open(self.path, "rb") as f, mime.MessageBytes(f) as mb:
                self.known_size = len(mb.data)
        return self.known_size

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self._headers is None:
            with open(self.path, "rb") as f:
                head = mime.read_head(f)
                if head is None:  # a huge header: map the file
                    f.seek(0)
                    with mime.MessageBytes(f) as mb:
                        hend, _ = mime.header_end(mb.data, 0, len(mb.data))
                        head = bytes(mb.data[:hend])
            self._headers = mime.parse_headers(head)
        return self._headers

    def header_text(self, name: str) -> str:
        key = name.lower().encode("latin-1", "replace")
        return "\n".join(_decode(v) for k, v in self.headers() if k == key)

    def field_text(self, name: str) -> str:
        """What a SEARCH key on header field `name` looks in: the address fields as
        their parsed addresses (address_text), any other field decoded."""
        if name not in ADDRESS_FIELDS:
            return self.header_text(name)
        key = name.encode("ascii")
        return "\n".join(address_text(v) for k, v in self.headers() if k == key)

    def search_fields(self) -> tuple[str, ...]:
        """(base, *SEARCH_COLUMNS) as the index keeps them: text case-folded, date as is."""
        return (self.base, *(search_form(self.field_text(f)) for f in SEARCH_FIELDS[:-1]),
                self.header_text("date"))

    def message(self) -> Any:
        if self._message is None:
            with open(self.path, "rb") as f:
                self._message = email.message_from_binary_file(f, policy=email.policy.default)
        return self._message


# How SEARCH reads header values: shared with the header pass, which stores the same text.
_text = summary.header_text
_decode = summary.decoded_text
address_text = summary.address_text


Predicate = Callable[[Row], bool]


search_form = summary.search_form


def _contains(haystack: str, needle_form: str) -> bool:
    """`needle_form` (search_form of the key, made once per search) in the text."""
    return needle_form in search_form(haystack)


_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def _parse_date(raw: bytes) -> int:
    m = _DATE.match(raw)
    if not m:
        raise BadCommand("invalid date")
    day, mon, year = m.groups()
    try:
        month = _MONTHS.index(mon.decode().lower()) + 1
        # A day the month has (timegm alone would make 31-Feb the 2nd of March).
        return datetime.date(int(year), month, int(day)).toordinal() - _EPOCH_ORDINAL
    except (ValueError, OverflowError):
        raise BadCommand("invalid date") from None


def _sent_day(value: str) -> int | None:
    parsed = email.utils.parsedate_tz(value) if value else None
    if not parsed:
        return None
    # RFC 3501: compare the date in the header's own time zone, ignoring the time.  A
    # day the month does not have (31 Jun) is no date, not the 1st of July.
    try:
        return datetime.date(parsed[0], parsed[1], parsed[2]).toordinal() - _EPOCH_ORDINAL
    except (ValueError, OverflowError, TypeError):   # year 99999, month 13: no date
        return None


def _body_text(row: Row, with_headers: bool) -> str:
    """The text BODY (or, `with_headers`, TEXT) searches: every text part decoded, and
    for TEXT the header fields of the message and of each part and attached message in
    it (they are all in the message's text, RFC 3501 6.4.4)."""
    msg = row.message()
    texts = []
    for part in msg.walk():
        if with_headers:
            texts.extend(f"{k}: {v}" for k, v in part.items())
        if part.get_content_maintype() == "text":
            texts.append(_part_text(part))
    return "\n".join(texts)


def _part_text(part: Any) -> str:
    """A text part decoded.  8-bit text in a part that names no charset, or US-ASCII (a
    common mislabelling), is read as UTF-8 when it is that, else as Latin-1: decoded as
    ASCII, "été" became replacement characters no search finds."""
    charset = part.get_content_charset()
    if charset in (None, "us-ascii", "ascii"):
        payload = part.get_payload(decode=True) or b""
        if isinstance(payload, bytes) and not payload.isascii():
            try:
                return payload.decode("utf-8")
            except UnicodeDecodeError:
                return payload.decode("latin-1")
    try:
        return part.get_content()
    except Exception:
        payload = part.get_payload(decode=True) or b""
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


class FieldTest:
    """A key on a header field the index keeps (SUBJECT, FROM, ..., SENT*): its answer,
    the set of matching base names, is filled in for all messages at once before the
    predicates run, from one SQL scan of the index."""

    def __init__(self, field: str, needle: str | None = None,
                 day_test: Callable[[int], bool] | None = None) -> None:
        self.column = _COLUMNS[field]
        self.needle = search_form(needle) if needle is not None else None
        self.day_test = day_test
        self.matches: set[str] = set()

    def fill_from_index(self, index: Any) -> None:
        if self.needle is not None:
            self.matches = index.search_match(self.column, self.needle)
        else:
            self.matches = {b for b, v in index.search_column(self.column).items()
                            if self._day_ok(v)}

    def fill_from_rows(self, fields: dict[str, tuple[str, ...]]) -> None:
        i = 1 + SEARCH_COLUMNS.index(self.column)
        if self.needle is not None:
            self.matches = {b for b, f in fields.items() if self.needle in f[i]}
        else:
            self.matches = {b for b, f in fields.items() if self._day_ok(f[i])}

    def _day_ok(self, value: str) -> bool:
        assert self.day_test is not None
        day = _sent_day(value)
        return day is not None and self.day_test(day)


class Query:
    """A compiled search key: its predicate and what it needs beyond the folder's memory.

    `flag_tests` is set when the key is only a conjunction of flag tests (UNSEEN, DELETED
    UNDELETED, ...), which has a fast path without per-message objects.  `modseq` says a
    MODSEQ key is in it (RFC 7162 3.1.6: the response then tells the highest mod-sequence).
    `reads_files` says a key opens message files (HEADER, BODY, TEXT).  `within` holds
    the sequence sets the key is a conjunction with, (is it a UID set, the set): only the
    messages in all of them need testing (`UID SEARCH UID 99990:* UNSEEN` over 100,000
    messages tests a dozen, not all of them).
    """

    def __init__(self, predicate: Predicate, needs_size: bool = False,
                 fields: list[FieldTest] | None = None,
                 flag_tests: list[tuple[str, bool]] | None = None,
                 modseq: bool = False, reads_files: bool = False,
                 within: tuple[tuple[bool, SequenceSet], ...] = ()) -> None:
        self.predicate = predicate
        self.fields = fields or []
        self.needs_size = needs_size
        self.flag_tests = flag_tests
        self.modseq = modseq
        self.reads_files = reads_files
        self.within = within

    @property
    def in_memory(self) -> bool:
        """Whether the key is answered from the folder's memory alone (no disk)."""
        return not (self.fields or self.needs_size or self.reads_files)


def _has_field(field: str) -> Query:
    """RFC 3501 6.4.4 HEADER with an empty string: the messages with a field `field`."""
    name = field.lower().encode("latin-1", "replace")
    return Query(lambda r: any(k == name for k, _ in r.headers()), reads_files=True)


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
    if len(keys) == 1:
        return keys[0]
    preds = [k.predicate for k in keys]
    flag_tests = None
    within = tuple(w for k in keys for w in k.within)
    if all(k.flag_tests is not None for k in keys) and _few_ranges(within):
        flag_tests = [t for k in keys for t in k.flag_tests or ()]
    return _combine(lambda r: all(p(r) for p in preds), keys, flag_tests, within)


def _membership(numbers: SequenceSet) -> Callable[[int, int], bool]:
    """`numbers.contains`, by bisection over its runs once it has more than a few (a
    client may send ten thousand ranges); the runs are made again only when '*' comes to
    mean another number."""
    if len(numbers.ranges) <= 8:
        return numbers.contains
    state: list[tuple[int, list[int], list[tuple[int, int]]] | None] = [None]

    def contains(n: int, largest: int) -> bool:
        runs = state[0]
        if runs is None or runs[0] != largest:
            spans = numbers.spans(largest)
            runs = state[0] = (largest, [a for a, _ in spans], spans)
        i = bisect.bisect_right(runs[1], n) - 1
        return i >= 0 and n <= runs[2][i][1]
    return contains


def _few_ranges(within: tuple[tuple[bool, SequenceSet], ...]) -> bool:
    """Whether sets this small may be resolved in the reactor (the flag path): a client
    may send ten thousand ranges, which go to the thread as other keys do."""
    return sum(len(numbers.ranges) for _, numbers in within) <= INLINE_RANGES


def _combine(predicate: Predicate, keys: list[Query],
             flag_tests: list[tuple[str, bool]] | None = None,
             within: tuple[tuple[bool, SequenceSet], ...] = ()) -> Query:
    """A key made of `keys`; `within` only for a conjunction (OR and NOT reach beyond
    their keys' sets)."""
    return Query(predicate, any(k.needs_size for k in keys),
                 [f for k in keys for f in k.fields], flag_tests, any(k.modseq for k in keys),
                 any(k.reads_files for k in keys), within)


def _field_key(field: str, needle: str | None = None,
               day_test: Callable[[int], bool] | None = None) -> Query:
    test = FieldTest(field, needle, day_test)
    return Query(lambda r: r.base in test.matches, fields=[test])


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
    if args.peek() in (b"*", b"$") or args.peek().isdigit():
        seqset = args.sequence_set()
        if isinstance(seqset, SavedSet):  # RFC 5182 2.1: "$" is UIDs, here too
            return _saved_key(seqset)
        within = ((False, seqset),)
        return Query(lambda r, contains=_membership(seqset): contains(r.seq, r.largest_seq),
                     flag_tests=[] if _few_ranges(within) else None, within=within)
    word = args.atom().upper()
    if word == b"ALL":
        return Query(lambda r: True, flag_tests=[])
    if word in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[word]
        return Query(lambda r: (flag in r.flags) == present,
                     flag_tests=[(flag, present)])
    if word in (b"NEW", b"OLD", b"RECENT"):
        if word == b"NEW":
            return Query(lambda r: "\\Recent" in r.flags and "\\Seen" not in r.flags)
        if word == b"OLD":
            return Query(lambda r: "\\Recent" not in r.flags)
        return Query(lambda r: "\\Recent" in r.flags)
    if word in (b"KEYWORD", b"UNKEYWORD"):
        args.space()
        kw = args.flag().decode("ascii", "replace")
        present = word == b"KEYWORD"
        return Query(lambda r: any(f.lower() == kw.lower() for f in r.flags) == present)
    if word in _HEADER_KEYS:
        field = _HEADER_KEYS[word]
        needle = _text_arg(args, charset)
        if not needle:   # as HEADER: the messages that have the field (not every one)
            return _has_field(field)
        return _field_key(field, needle)
    if word == b"HEADER":
        args.space()
        field = args.astring().decode("ascii", "replace")
        needle = _text_arg(args, charset)
        if not needle:
            return _has_field(field)
        if field.lower() in _COLUMNS and field.lower() != "date":
            return _field_key(field.lower(), needle)
        wanted = search_form(needle)
        return Query(lambda r: _contains(r.header_text(field), wanted), reads_files=True)
    if word in (b"BODY", b"TEXT"):
        needle = _text_arg(args, charset)
        with_headers = word == b"TEXT"
        wanted = search_form(needle)
        return Query(lambda r: _contains(_body_text(r, with_headers), wanted),
                     reads_files=True)
    if word in (b"BEFORE", b"ON", b"SINCE"):
        args.space()
        day = _parse_date(args.astring())
        cmp = {b"BEFORE": lambda d: d < day, b"ON": lambda d: d == day,
               b"SINCE": lambda d: d >= day}[word]
        return Query(lambda r: cmp(int(r.internaldate) // 86400))
    if word in (b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
        args.space()
        day = _parse_date(args.astring())
        cmp = {b"SENTBEFORE": lambda d: d < day, b"SENTON": lambda d: d == day,
               b"SENTSINCE": lambda d: d >= day}[word]
        return _field_key("date", day_test=cmp)
    if word in (b"LARGER", b"SMALLER"):
        args.space()
        n = args.number()
        if word == b"LARGER":
            return Query(lambda r: r.size() > n, needs_size=True)
        return Query(lambda r: r.size() < n, needs_size=True)
    if word == b"NOT":
        args.space()
        inner = _key(args, charset, depth + 1)
        flag_tests = None
        # NOT (1:2 SEEN) is not UNSEEN: only a lone flag test, bounded by no set, flips.
        if inner.flag_tests is not None and len(inner.flag_tests) == 1 and not inner.within:
            flag, present = inner.flag_tests[0]
            flag_tests = [(flag, not present)]
        return _combine(lambda r: not inner.predicate(r), [inner], flag_tests)
    if word == b"OR":
        args.space()
        a = _key(args, charset, depth + 1)
        args.space()
        b = _key(args, charset, depth + 1)
        return _combine(lambda r: a.predicate(r) or b.predicate(r), [a, b])
    if word == b"UID":
        args.space()
        uidset = args.sequence_set()
        if isinstance(uidset, SavedSet):
            return _saved_key(uidset)
        within = ((True, uidset),)
        return Query(lambda r, contains=_membership(uidset): contains(r.uid, r.largest_uid),
                     flag_tests=[] if _few_ranges(within) else None, within=within)
    if word == b"MODSEQ":  # RFC 7162 3.1.5
        args.space()
        if args.peek() == b'"':
            # entry-name entry-type-req: one mod-sequence per message here, whatever flag
            # the entry names.
            args.string()
            args.space()
            if args.atom().lower() not in (b"priv", b"shared", b"all"):
                raise BadCommand("invalid MODSEQ entry type")
            args.space()
        least = parse_modseq(args)
        return Query(lambda r: r.info.modseq >= least, modseq=True)
    raise BadCommand(f"unknown search key {word.decode('ascii', 'replace')}")


def _saved_key(saved: SavedSet) -> Query:
    """`$` or `UID $` (RFC 5182): the messages of the saved result, as it was when the
    command was read."""
    uids = frozenset(saved.uids)
    within = ((True, saved),)
    return Query(lambda r: r.uid in uids, flag_tests=[] if _few_ranges(within) else None,
                 within=within)


def search(session: "IMAPSession", query: Query) -> Deferred[list[int]]:
    """Deferred list of matching UIDs, in sequence order.

    A conjunction of flag keys (UNSEEN, DELETED, ...) is answered from memory at once;
    anything else runs in a thread: flags, dates, UIDs and known sizes from memory, header
    keys from the search fields in the folder index (computed from the files, once, for
    messages not indexed yet), body keys from the files.
    """
    folder = session.folder
    if query.flag_tests is not None:
        return succeed(_flag_search(folder, _narrowed(session.view, query), query.flag_tests))
    view = list(session.view)
    sizes: dict[int, Any] = folder.cache_get_many(view, VSIZE_KEY) if query.needs_size else {}
    recent = set(session.recent)
    return folder.read_in_thread(_run, view, recent, query, sizes, _summarizer(session, query))


def _summarizer(session: "IMAPSession", query: Query) -> Callable[..., Any] | None:
    """For a search with header-field keys: what the job's thread calls to have the header
    pass summarize the messages the index lacks, in worker processes (headerpass), and
    waits for.  None without workers (the thread reads the files itself)."""
    run = getattr(getattr(session, "context", None), "header_workers", None)
    if not query.fields or run is None:
        return None
    from twisted.internet import reactor  # noqa: PLC0415

    return lambda folder_dir, index_dir, work: blockingCallFromThread(
        reactor, headerpass.summarize_all, run, folder_dir, index_dir, work)


def matcher(session: "IMAPSession", query: Query) -> Callable[[Any], list[int]]:
    """SEARCH as the first step of a job that goes on with what matched (SORT, THREAD):
    prepared here in the reactor (the session's view, \\Recent, the sizes known), then
    called in the job's thread with its FolderView; gives what `search` would, the
    matching UIDs in sequence order, without a thread hop and a pass in the reactor."""
    folder = session.folder
    view = list(session.view)
    if query.flag_tests is not None:
        tests, view = query.flag_tests, _narrowed(view, query)
        return lambda disk: _flags_matching(disk.infos, view, tests)
    sizes: dict[int, Any] = folder.cache_get_many(view, VSIZE_KEY) if query.needs_size else {}
    recent = set(session.recent)
    summarize = _summarizer(session, query)
    return lambda disk: _run(disk, view, recent, query, sizes, summarize)


def search_among(session: "IMAPSession", query: Query, uids: list[int],
                 inline_limit: int = 0) -> Deferred[set[int]]:
    """Which of `uids` (ascending: messages of the view, or new ones beyond it) match
    `query` now, for the results a context keeps up to date (RFC 5267 4.3).  Answered at
    once when the key needs nothing but memory and there are at most `inline_limit` of
    them; else in a thread, as SEARCH."""
    folder = session.folder
    if query.in_memory and len(uids) <= inline_limit:
        return succeed(match_some(folder, session.view, uids, session.recent, query, {}))
    sizes: dict[int, Any] = folder.cache_get_many(uids, VSIZE_KEY) if query.needs_size else {}
    return folder.read_in_thread(match_some, list(session.view), uids, set(session.recent),
                                 query, sizes)


def match_some(folder: Any, view: list[int], uids: list[int], recent: set[int], query: Query,
               sizes: dict[int, Any]) -> set[int]:
    """The members of `uids` that match (the Folder in the reactor, or its FolderView in
    a job's thread).  `view` (the session's, ascending) gives sequence numbers; a uid
    beyond it counts as the next new message."""
    if query.fields:
        _fill_fields(folder, uids, query.fields)
    count = len(view)
    last = view[-1] if view else 0
    new = [u for u in uids if u > last]

    def numbered() -> Iterator[tuple[int, int]]:
        for u in uids:
            i = bisect.bisect_left(view, u)
            if i < len(view) and view[i] == u:
                yield i + 1, u
            elif u > last:
                yield count + bisect.bisect_left(new, u) + 1, u
            # else: expunged from the view meanwhile

    row = Row(count + len(new), new[-1] if new else last)
    return set(_matching(folder, numbered(), row, recent, query, sizes))


def _matching(folder: Any, numbered: Iterable[tuple[int, int]], row: Row, recent: set[int],
              query: Query, sizes: dict[int, Any]) -> Iterator[int]:
    """The uids of (sequence number, uid) pairs whose message matches, in their order."""
    folder_path = folder.path
    predicate = query.predicate
    for seq, u in numbered:
        info = folder.by_uid(u)
        if info is None:
            continue  # expunged meanwhile
        known = vsize_hint_from(folder, info, sizes.get(u)) if query.needs_size else None
        flags = info.flags | {"\\Recent"} if u in recent else info.flags
        row.load(seq, u, info, flags, known, folder_path)
        try:
            if predicate(row):
                yield u
        except OSError:
            continue  # expunged meanwhile
        except (RecursionError, ValueError, LookupError, UnicodeError) as e:
            # One message the parser cannot take (MIME nested a thousand deep...) does
            # not fail the search of every other: it matches nothing.
            log.warn("search: {path} uid {uid} cannot be read ({error}); taken as no match",
                     path=str(folder_path), uid=u, error=f"{type(e).__name__}: {e}")


def _flag_search(folder: Any, view: list[int], tests: list[tuple[str, bool]]) -> list[int]:
    if len(tests) == 1 and _is_whole_folder(folder, view):
        return folder.uids_with_flag(*tests[0])
    return _flags_matching(folder.info_map(), view, tests)


def _flags_matching(infos: Mapping[int, Any], view: list[int],
                    tests: list[tuple[str, bool]]) -> list[int]:
    """The uids of `view` still in `infos` whose flags pass every test (none: ALL)."""
    if not tests:
        return [u for u in view if u in infos]
    get = infos.get
    if len(tests) == 1:
        flag, present = tests[0]
        if present:
            return [u for u in view if (i := get(u)) is not None and flag in i.flags]
        return [u for u in view if (i := get(u)) is not None and flag not in i.flags]
    return [u for u in view if (i := get(u)) is not None
            and all((flag in i.flags) == present for flag, present in tests)]


def _is_whole_folder(folder: Any, view: list[int]) -> bool:
    """Whether the session sees exactly the folder's messages (the usual case)."""
    shared = folder.shared_uids()
    return view is shared or view == shared


def _run(folder: Any, view: list[int], recent: set[int], query: Query,
         sizes: dict[int, Any], summarize: Callable[..., Any] | None = None) -> list[int]:
    """The search itself (a thread of the folder's executor; `folder` is its FolderView):
    fills the field tests, then tests every message."""
    if query.within:
        numbered = candidates(view, query.within)
        if not numbered:
            return []
        view_part = [u for _, u in numbered]
    else:
        numbered, view_part = list(enumerate(view, 1)), view
    if query.fields:
        _fill_fields(folder, view_part, query.fields, summarize)
    row = Row(len(view), view[-1] if view else 0)
    return list(_matching(folder, numbered, row, recent, query, sizes))


def _narrowed(view: list[int], query: Query) -> list[int]:
    """The uids of `view` in every set of `query.within` (`view` itself when that is all
    of it, as for "1:*", so that a flag search keeps its whole-folder answer)."""
    if not query.within:
        return view
    spans = _common_spans(view, query.within)
    if spans == [(1, len(view))]:
        return view
    return [u for a, b in spans for u in view[a - 1:b]]


def candidates(view: list[int], within: Iterable[tuple[bool, SequenceSet]]
               ) -> list[tuple[int, int]]:
    """(sequence number, uid) of the messages of `view` (ascending uids) in every set a
    search key is a conjunction with (RFC 3501 6.4.4: a sequence set, or a UID set with
    "UID"; '*' the last message), found by intersecting the sets' runs, not by asking
    each set about each message."""
    return [(seq, view[seq - 1]) for a, b in _common_spans(view, within)
            for seq in range(a, b + 1)]


def _common_spans(view: list[int], within: Iterable[tuple[bool, SequenceSet]]
                  ) -> list[tuple[int, int]]:
    """The runs of sequence numbers of `view` that lie in every set."""
    common = [(1, len(view))] if view else []
    for is_uid, numbers in within:
        common = intersect_ranges(common, _seq_spans(view, is_uid, numbers))
        if not common:
            break
    return common


def _seq_spans(view: list[int], is_uid: bool, numbers: SequenceSet
               ) -> list[tuple[int, int]]:
    """A set's members in `view` as ascending runs of sequence numbers."""
    count = len(view)
    if not is_uid:
        return [(a, min(b, count)) for a, b in numbers.spans(count) if a <= count]
    spans = []
    for a, b in numbers.spans(view[-1] if view else 0):
        i, j = bisect.bisect_left(view, a), bisect.bisect_right(view, b)
        if i < j:
            spans.append((i + 1, j))
    return spans


def _fill_fields(folder: Any, view: list[int], tests: list[FieldTest],
                 summarize: Callable[..., Any] | None = None) -> None:
    """Answer the header-field keys for the whole folder: index the messages it does not
    know yet (by the header pass in worker processes when `summarize` is given and many
    are missing, else read from their files here), then one SQL scan per key.  An
    unusable index costs speed only: the fields are then computed from every file."""
    index = folder.index
    row = Row()
    try:
        have = index.search_bases()
    except sqlite3.Error as e:
        log.warn("search index of {folder} unusable ({error}): reading the messages",
                 folder=str(folder.path), error=e)
        index = None
        have = set()
    computed: dict[str, tuple[str, ...]] = {}
    batch: list[tuple[str, ...]] = []
    get = folder.by_uid
    missing = [i for u in view if (i := get(u)) is not None and i.basename not in have]
    passed = False
    if index is not None and summarize is not None and len(missing) >= headerpass.MIN_PASS:
        unstored, failed = summarize(str(folder.path), str(index.dir),
                                     [(i.basename, i.subdir, i.filename) for i in missing])
        index = _put_fields(index, unstored)
        failed_bases = {f[0] for f in failed}
        missing = [i for i in missing if i.basename in failed_bases]
        passed = True
    for info in missing:
        row.load(0, info.uid, info, info.flags, None, folder.path)
        try:
            fields = row.search_fields()
        except OSError:
            continue  # expunged meanwhile
        computed[info.basename] = fields
        batch.append(fields)
        if index is not None and len(batch) >= FIELD_BATCH:
            index = _put_fields(index, batch)
            batch = []
    if index is not None:
        index = _put_fields(index, batch)
    complete = not have and not passed  # `computed` holds every message
    for test in tests:
        if index is not None:
            try:
                test.fill_from_index(index)
                continue
            except sqlite3.Error as e:
                log.warn("search index of {folder} unreadable ({error})",
                         folder=str(folder.path), error=e)
                index = None
        if not complete:
            computed, complete = _fields_from_files(folder, view), True
        test.fill_from_rows(computed)


def _put_fields(index: Any, batch: list[tuple[str, ...]]) -> Any:
    try:
        index.put_search(batch)
        return index
    except sqlite3.Error as e:
        log.warn("search index write failed: {error}", error=e)
        return None


def _fields_from_files(folder: Any, view: list[int]) -> dict[str, tuple[str, ...]]:
    row = Row()
    fields: dict[str, tuple[str, ...]] = {}
    for u in view:
        info = folder.by_uid(u)
        if info is None:
            continue
        row.load(0, u, info, info.flags, None, folder.path)
        try:
            fields[info.basename] = row.search_fields()
        except OSError:
            continue
    return fields


__all__ = ["parse_search", "search", "parse_sequence_set"]
