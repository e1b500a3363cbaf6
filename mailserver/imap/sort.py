"""SORT and THREAD (RFC 5256) with SORT=DISPLAY (RFC 5957) over plain data.

Base subjects, sent dates, the sort keys and both threading algorithms (ORDEREDSUBJECT,
REFERENCES), and the reader that gets what they need out of the message files.  Nothing
here imports Twisted or sees a Folder: the command handlers (sorting.py) run this in a
worker thread over an immutable snapshot of the matched messages, so a SORT over a large
mailbox never stalls the reactor, and every rule is unit-testable on its own.

Per-message work is done once: the header fields a message is sorted or threaded by are
reduced to `SortKeys`, and those are cached in the folder index under CACHE_KEY (a
message's bytes never change), so a warm SORT reads one short row per message instead of
its file, and then only compares precomputed keys.

SORT and THREAD themselves work on positions (the messages in sequence order) and
`Columns`, one list per field: no object per message, C-level sorts, and the answer
written with one join.  A folder keeps its columns, with the order of each key once
sorted, while its index is open (sorttable.py).
"""

from __future__ import annotations

import bisect
import calendar
import datetime
import email.utils
import functools
import json
import os
import re
import sqlite3
import time
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass
from functools import cmp_to_key
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any, BinaryIO, Callable, Iterable, NamedTuple, Sequence

from mailserver.imap import mime
from mailserver.imap.parser import Arguments, BadCommand

# RFC 5256 3 and RFC 5957 4: the sort keys; REVERSE is a modifier, not a key.
SORT_KEYS = frozenset((b"ARRIVAL", b"CC", b"DATE", b"FROM", b"SIZE", b"SUBJECT", b"TO",
                       b"DISPLAYFROM", b"DISPLAYTO"))
THREAD_ALGORITHMS = frozenset((b"ORDEREDSUBJECT", b"REFERENCES"))
CHARSETS = (b"UTF-8", b"US-ASCII")
MAX_CRITERIA = 32          # sort criteria in one SORT (REVERSE not counted)
MAX_REFERENCES = 1000      # msg-ids of one message used for threading (the last ones)
CACHE_KEY = "sort2"        # folder-index cache key of a message's SortKeys (JSON)
HEAD_LIMIT = 256 * 1024    # octets of an oversized header section still looked at
# The header fields read from each message (lower case, as mime.parse_headers gives them).
FIELDS = (b"date", b"subject", b"from", b"to", b"cc", b"message-id", b"references",
          b"in-reply-to")

Address = tuple[str, str]  # (display name, decoded; addr-spec, or a group's name)


# -- the per-message input -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SortMessage:
    """One message as SORT and THREAD see it: its place in the mailbox and the header
    fields they look at (text already RFC 2047 decoded where the header allows it)."""

    uid: int
    seq: int
    internaldate: float
    size: int
    date: str = ""                        # Date: as written
    subject: str = ""
    from_: tuple[Address, ...] = ()
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    message_id: str = ""                  # the raw field values: parsed tolerantly
    references: str = ""
    in_reply_to: str = ""


_JSON = json.JSONDecoder()
_NUMBER_OR_NONE = (float, int, type(None))
_TEXT_OR_NONE = (str, type(None))
_CACHED_TEXT = (str, bool, str, str, str, str, str)


class SortKeys(NamedTuple):
    """What a message is sorted and threaded by, computed once from its header fields
    (and cached in the folder index).  Strings are in collation_key form.  A named
    tuple: a SORT builds one per message, so construction must be cheap."""

    sent: float | None = None             # RFC 5256 2.2, None: use INTERNALDATE
    subject: str = ""                     # RFC 5256 2.1 base subject (collation_key)
    reply: bool = False                   # the base subject rules removed re/fwd
    from_: str = ""                       # addr-mailbox of the first address
    to: str = ""
    cc: str = ""
    display_from: str = ""                # RFC 5957 3 display sort value
    display_to: str = ""
    message_id: str | None = None         # normalized msg-id, None when absent/invalid
    parents: tuple[str, ...] = ()         # References, else the first In-Reply-To

    def to_cache(self) -> str:
        return json.dumps(self, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_cache(cls, value: Any) -> "SortKeys | None":
        """The keys from a cached value; None when it is missing or not ours."""
        if value is None:
            return None
        try:
            if not isinstance(value, str):
                value = bytes(value).decode("utf-8")
            v, _ = _JSON.raw_decode(value)  # no per-call regex, unlike json.loads
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
        if type(v) is not list or len(v) != 10:
            return None
        types = tuple(map(type, v))
        if (types[0] not in _NUMBER_OR_NONE or types[1:8] != _CACHED_TEXT
                or types[8] not in _TEXT_OR_NONE or types[9] is not list
                or (v[9] and not all(type(p) is str for p in v[9]))):
            return None
        v[9] = tuple(v[9])
        return cls._make(v)


class Entry(NamedTuple):
    """A message ready to sort or thread: its numbers and its precomputed keys."""

    uid: int
    seq: int
    internaldate: float
    size: int
    keys: SortKeys
    sent: float  # RFC 5256 2.2: the Date: header in UTC, else INTERNALDATE


def make_entry(uid: int, seq: int, internaldate: float, size: int, keys: SortKeys) -> Entry:
    return Entry(uid, seq, internaldate, size, keys,
                 internaldate if keys.sent is None else keys.sent)


def entry(message: SortMessage) -> Entry:
    return make_entry(message.uid, message.seq, message.internaldate, message.size,
                      sort_keys(message))


def _entries(messages: Iterable[SortMessage | Entry]) -> list[Entry]:
    return [m if isinstance(m, Entry) else entry(m) for m in messages]


# -- RFC 5256 2.1 base subject -----------------------------------------------------------------

_SPACES = re.compile(r"[ \t\r\n]+")
# subj-refwd = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"   (ABNF strings: any case)
_REFWD = re.compile(r"(?:re|fwd?) *(?:\[[^\[\]]*\] *)?:", re.I)
# subj-blob = "[" *BLOBCHAR "]" *WSP ; BLOBCHAR: any character but "[" and "]"
_BLOB = re.compile(r"\[[^\[\]]*\] *")


def base_subject(subject: str) -> tuple[str, bool]:
    """RFC 5256 2.1: (base subject, case-folded for comparison; whether it is a reply or
    forward, i.e. the rules removed a subj-refwd, a "(fwd)" trailer or a [fwd: ] wrapper).
    `subject` is already RFC 2047 decoded.

    Steps 3-5 are one left-to-right scan: a run of blobs is looked through once for the
    subj-refwd that would make it a subj-leader, so a subject of many blobs costs linear
    time, not quadratic."""
    # (1) tabs and continuations to space, runs of spaces to one
    s = _SPACES.sub(" ", subject)
    reply = False
    while True:
        # (2) remove trailing subj-trailer ("(fwd)" / WSP), repeatedly
        end = len(s)
        while end:
            if s[end - 1] == " ":
                end -= 1
            elif end >= 5 and s[end - 5:end].lower() == "(fwd)":
                end -= 5
                reply = True
            else:
                break
        s = s[:end]
        # (3)-(5) remove subj-leaders ((*subj-blob subj-refwd) / WSP) and, where a
        # non-empty subj-base remains, a leading subj-blob; until neither matches
        p, n = 0, len(s)
        no_leader_before = -1  # blobs starting before this are not followed by a refwd
        while p < n:
            c = s[p]
            if c == " ":
                p += 1
                continue
            if c == "[":
                if p >= no_leader_before:
                    q = p
                    while (m := _BLOB.match(s, q)) is not None:
                        q = m.end()
                    if q > p and (m := _REFWD.match(s, q)) is not None:
                        p = m.end()
                        reply = True
                        continue
                    no_leader_before = q
                m = _BLOB.match(s, p)  # (4)
                if m is not None and m.end() < n:
                    p = m.end()
                    continue
                break
            m = _REFWD.match(s, p)
            if m is None:
                break
            p = m.end()
            reply = True
        s = s[p:]
        # (6) "[fwd:" ... "]" around it all: remove both and repeat from (2)
        if len(s) >= 6 and s[:5].lower() == "[fwd:" and s[-1] == "]":
            s = s[5:-1]
            reply = True
            continue
        # (7) (case is collation_key's business)
        return s, reply


# -- RFC 5256 2.2 sent date ----------------------------------------------------------------------

def parse_sent_date(value: str) -> float | None:
    """RFC 5256 2.2: the Date: field as UTC seconds; an unknown zone counts as UTC.
    None when missing or unparseable (the caller then uses INTERNALDATE)."""
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if not parsed:
            return None
        datetime.date(parsed[0], parsed[1], parsed[2])   # 31 Jun: unparseable, not 1 Jul
        return float(calendar.timegm(parsed[:6] + (0, 0, 0)) - (parsed[9] or 0))
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


# -- addresses (RFC 5256 3 FROM/TO/CC; RFC 5957 3) ----------------------------------------------

def parse_address_list(value: str) -> tuple[Address, ...]:
    """An address header as (display name, addr-spec) pairs, names RFC 2047 decoded.  A
    group's start is the pair ("", group name), as ENVELOPE gives it (addr-mailbox holds
    the group's name, RFC 3501 7.4.2); its end is left out."""
    out: list[Address] = []
    for a in mime.parse_addresses(value):
        if a.kind == mime.GROUP_END:
            continue
        if a.kind == mime.GROUP_START:
            out.append(("", a.mailbox or ""))
            continue
        spec = a.mailbox or ""
        if a.host:
            spec = f"{spec}@{a.host}"
        out.append((mime.decode_words(a.name) if a.name else "", spec))
    return tuple(out)


_QUOTED_PAIR = re.compile(r"\\(.)", re.S)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)


def addr_mailbox(addr_spec: str) -> str:
    """The local part of an addr-spec ([IMAP] addr-mailbox), unquoted."""
    if addr_spec.startswith('"'):
        m = _QUOTED.match(addr_spec)
        if m:
            return _QUOTED_PAIR.sub(r"\1", m.group(1))
    local, at, _ = addr_spec.rpartition("@")
    return local if at else addr_spec


@functools.lru_cache(maxsize=4096)
def _simple_title(c: str) -> str:
    """A character's simple titlecase mapping (UnicodeData.txt, not SpecialCasing.txt):
    "ß" has none, so it stays (its full mapping "Ss" is two characters)."""
    t = c.title()
    return t if len(t) == 1 else c


def collation_key(text: str) -> str:
    """The comparison form of a string under i;unicode-casemap (RFC 5051, the collation
    of I18NLEVEL=1 that RFC 5256 requires): each character titlecased, then decomposed
    (NFKD), compared by code point.  So "Émile" sorts among the e's rather than after
    "z", "[list]" and "_x" after the letters (as in Dovecot), and "ß" is not "ss"."""
    if text.isascii():
        return text.upper()
    return unicodedata.normalize("NFKD", "".join(map(_simple_title, text)))


def _mailbox_key(addresses: tuple[Address, ...]) -> str:
    """RFC 5256 3: addr-mailbox of the first address, collated; "" when none."""
    return collation_key(addr_mailbox(addresses[0][1])) if addresses else ""


def _display_key(addresses: tuple[Address, ...]) -> str:
    """RFC 5957 3: the first address's display name, else its addr-spec (mailbox@host,
    or the mailbox alone), collated; "" when there is no address."""
    if not addresses:
        return ""
    name, spec = addresses[0]
    return collation_key(name or spec)


# -- message ids (RFC 5256 3, REFERENCES) --------------------------------------------------------

_MSG_ID = re.compile(r"<([^<>]*)>")
_CFWS = re.compile(r"[ \t\r\n]+")


def _normalize_id(text: str) -> str | None:
    """A msg-id's content with its quoting removed, so <"a"@b> and <a@b> are one Message
    ID (RFC 5256 3); None when nothing valid is left.  Comparisons stay case-sensitive."""
    if '"' in text:
        text = _QUOTED.sub(lambda m: _QUOTED_PAIR.sub(r"\1", m.group(1)), text)
    text = _CFWS.sub("", text)
    return text or None


def message_ids(value: str) -> list[str]:
    """The valid msg-ids of a References/In-Reply-To value, in order; text around them
    (comments, phrases some mailers write) is ignored."""
    out = []
    for m in _MSG_ID.finditer(value):
        mid = _normalize_id(m.group(1))
        if mid is not None:
            out.append(mid)
    return out


def own_message_id(value: str) -> str | None:
    """The Message-ID field's msg-id; a bare id@host without brackets is accepted."""
    ids = message_ids(value)
    if ids:
        return ids[0]
    bare = value.strip()
    if bare and "@" in bare and not any(c in bare for c in " \t<>"):
        return bare
    return None


def sort_keys(m: SortMessage) -> SortKeys:
    """Everything SORT and THREAD compare, computed once per message."""
    subject, reply = base_subject(m.subject)
    subject = collation_key(subject)
    msgid = own_message_id(m.message_id)
    # RFC 5256 3: the References ids, else the first valid id of In-Reply-To.
    parents = message_ids(m.references)
    if not parents:
        parents = message_ids(m.in_reply_to)[:1]
    if msgid is not None and msgid in parents:
        parents = [p for p in parents if p != msgid]  # never its own ancestor
    return SortKeys(parse_sent_date(m.date), subject, reply, _mailbox_key(m.from_),
                    _mailbox_key(m.to), _mailbox_key(m.cc), _display_key(m.from_),
                    _display_key(m.to), msgid, tuple(parents[-MAX_REFERENCES:]))


# -- parsing the command arguments --------------------------------------------------------------

def criteria_from_words(words: Sequence[bytes]) -> list[tuple[bytes, bool]]:
    """RFC 5256 4 sort-criteria (the words inside the parentheses): [(key, reverse)]."""
    out: list[tuple[bytes, bool]] = []
    reverse = False
    for raw in words:
        word = raw.upper()
        if word == b"REVERSE" and not reverse:
            reverse = True
            continue
        if word not in SORT_KEYS:
            what = "REVERSE must be followed by a sort key" if reverse and word == b"REVERSE" \
                else f"unknown sort key {word.decode('ascii', 'replace')}"
            raise BadCommand(what)
        out.append((word, reverse))
        reverse = False
        if len(out) > MAX_CRITERIA:
            raise BadCommand("too many sort criteria")
    if reverse:
        raise BadCommand("REVERSE must be followed by a sort key")
    if not out:
        raise BadCommand("empty sort criteria")
    return out


def parse_sort_criteria(args: Arguments) -> list[tuple[bytes, bool]]:
    """'(' sort-criterion *(SP sort-criterion) ')' at the cursor; bounded, BAD on garbage."""
    words: list[bytes] = []

    def word(a: Arguments) -> bytes:
        if len(words) >= 2 * MAX_CRITERIA:
            raise BadCommand("too many sort criteria")
        w = a.atom()
        words.append(w)
        return w

    args.paren_list(word)
    return criteria_from_words(words)


def parse_thread_algorithm(word: bytes) -> bytes:
    algorithm = word.upper()
    if algorithm not in THREAD_ALGORITHMS:
        raise BadCommand(f"unknown threading algorithm {word.decode('ascii', 'replace')}")
    return algorithm


def canonical_charset(raw: bytes) -> bytes | None:
    """UTF-8 or US-ASCII (RFC 5256 3: both MUST be supported), else None."""
    upper = raw.upper()
    return upper if upper in CHARSETS else None


# -- the sort data of many messages, as columns ------------------------------------------------

# The sort keys whose values the folder's message list holds (no header is read for them).
LIST_KEYS = frozenset((b"ARRIVAL", b"SIZE"))
# RFC 5256 3, RFC 5957 4: the column each sort key compares.
SORT_COLUMNS: dict[bytes, str] = {
    b"ARRIVAL": "internaldate", b"CC": "cc", b"DATE": "sent", b"FROM": "from_",
    b"SIZE": "size", b"SUBJECT": "subject", b"TO": "to", b"DISPLAYFROM": "display_from",
    b"DISPLAYTO": "display_to"}
_KEY_FIELDS = frozenset(SortKeys._fields)


class Columns:
    """The sort and thread data of n messages in sequence order (position p is the one
    before p+1), one list per field, built when first asked for.  SORT and THREAD work on
    positions and these lists: no object per message, and every sort a C-level one.

    With `keep`, a column's order (its positions sorted by it, ties in position order)
    and its ranks (equal values, equal ranks) are kept too: a folder's table
    (sorttable.py) lives across commands, so each key is sorted once while the folder
    stays unchanged, and later sorts by it compare small integers."""

    def __init__(self, uids: Sequence[int], internaldate: Sequence[float],
                 sizes: Sequence[int] | None, keys: Sequence[SortKeys] | None,
                 keep: bool = False) -> None:
        self.uids = uids
        self.internaldate = internaldate
        self.sizes = sizes  # RFC822.SIZE; None when not read (SIZE not asked for)
        self.keys = keys    # None when not read (only ARRIVAL or SIZE asked for)
        self.keep = keep
        self._columns: dict[str, Sequence[Any]] = {}
        self._orders: dict[str, array] = {}
        self._extra: dict[str, array] = {}  # orders not of one column (kept as they are)
        self._ranks: dict[str, array] = {}
        self._places: dict[str, array] = {}
        self._uid_text: list[bytes] | None = None
        self._seq_text: list[bytes] | None = None
        self._references: tuple[list[tuple[int, ...]], int] | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def column(self, name: str) -> Sequence[Any]:
        """The values of one field: "internaldate", "size", "sent" (RFC 5256 2.2: the
        Date: header, else INTERNALDATE) or a SortKeys field."""
        col = self._columns.get(name)
        if col is None:
            if name == "internaldate":
                col = self.internaldate
            elif name == "size":
                if self.sizes is None:
                    raise ValueError("sizes were not read")
                col = self.sizes
            elif self.keys is None:
                raise ValueError("sort keys were not read")
            elif name == "sent":
                col = [d if s is None else s
                       for s, d in zip(map(itemgetter(0), self.keys), self.internaldate)]
            elif name in _KEY_FIELDS:
                col = list(map(attrgetter(name), self.keys))
            else:
                raise ValueError(name)
            self._columns[name] = col
        return col

    def order(self, name: str) -> Sequence[int]:
        """Every position, sorted by the field (ties in position order)."""
        found = self._orders.get(name)
        if found is not None:
            return found
        order = sorted_in_runs(list(range(len(self))), self.column(name).__getitem__)
        if not self.keep:
            return order
        found = self._orders[name] = array("i", order)
        return found

    def reversed_order(self, name: str) -> Sequence[int]:
        """Every position, sorted by the field descending, ties still in position order
        (RFC 5256 REVERSE)."""
        return self._derived("-" + name, lambda: sorted_in_runs(
            list(range(len(self))), self.sort_key(name), reverse=True))

    def subject_order(self) -> Sequence[int]:
        """Every position by base subject, then sent date and sequence (ORDEREDSUBJECT)."""
        return self._derived("subject,sent", lambda: sorted_in_runs(
            list(self.order("sent")), self.sort_key("subject")))

    def _derived(self, name: str, make: Callable[[], list[int]]) -> Sequence[int]:
        found = self._extra.get(name)
        if found is None:
            found = make()
            if self.keep:
                found = self._extra[name] = array("i", found)
        return found

    def rank(self, name: str) -> Sequence[int]:
        """For each position, the rank of its value among the field's distinct values."""
        found = self._ranks.get(name)
        if found is None:
            col = self.column(name)
            found = array("i", bytes(4 * len(col)))
            r, prev = -1, _NOTHING
            for p in self.order(name):
                v = col[p]
                if v != prev:
                    r += 1
                    prev = v
                found[p] = r
            self._ranks[name] = found
        return found

    def place(self, name: str) -> Sequence[int]:
        """For each position, its place in order(name): a total order, ties broken by
        position (THREAD's "sent date, then sequence number")."""
        found = self._places.get(name)
        if found is None:
            found = array("i", bytes(4 * len(self)))
            for i, p in enumerate(self.order(name)):
                found[p] = i
            if self.keep:
                self._places[name] = found
        return found

    def sort_key(self, name: str) -> Callable[[int], Any]:
        """A C-level key function of positions for the field: its kept ranks (ints
        compare fast), or the values themselves for a table used once."""
        if self.keep:
            return self.rank(name).__getitem__
        return self.column(name).__getitem__

    def references(self, positions: Sequence[int] | None = None
                   ) -> tuple[list[tuple[int, ...]], int]:
        """(each position's References (sort_keys: else its first In-Reply-To) as
        REFERENCES containers, the number of dummies), over every position or just
        `positions` (ascending).  The first message in sequence order with a Message-ID
        stands for that ID; an ID no message has is a dummy, numbered from n on in the
        order the references name them.  Kept for every position."""
        if positions is None and self._references is not None:
            return self._references
        n = len(self)
        mids = self.column("message_id")
        every = range(n) if positions is None else positions
        by_id: dict[str, int] = {mids[p]: p for p in reversed(every) if mids[p] is not None}
        get = by_id.get
        out: list[tuple[int, ...]] = [()] * n
        parents = self.column("parents")
        dummy = n
        for p in every:
            refs = parents[p]
            if refs:
                found = []
                for ref in refs:
                    c = get(ref)
                    if c is None:
                        c = by_id[ref] = dummy
                        dummy += 1
                    found.append(c)
                out[p] = tuple(found)
        result = (out, dummy - n)
        if positions is None and self.keep:
            self._references = result
        return result

    def uid_text(self) -> list[bytes]:
        """Each position's UID as the digits a response carries (kept)."""
        if self._uid_text is None:
            self._uid_text = [b"%d" % u for u in self.uids]
        return self._uid_text

    def seq_text(self) -> list[bytes]:
        """Each position's sequence number (position + 1) as digits, for a session whose
        view is exactly these messages (kept)."""
        if self._seq_text is None:
            self._seq_text = [b"%d" % i for i in range(1, len(self) + 1)]
        return self._seq_text


_NOTHING = object()


def _columns_of(messages: Iterable[SortMessage | Entry]) -> tuple[list[Entry], Columns]:
    """Entries in sequence order and their columns (sequence numbers as positions)."""
    items = sorted(_entries(messages), key=attrgetter("seq"))
    cols = Columns([e.uid for e in items], [e.internaldate for e in items],
                   [e.size for e in items], [e.keys for e in items])
    return items, cols


# -- SORT (RFC 5256 3) ----------------------------------------------------------------------------

_KEY_FUNCS: dict[bytes, Callable[[Entry], Any]] = {
    b"ARRIVAL": attrgetter("internaldate"),
    b"CC": attrgetter("keys.cc"),
    b"DATE": attrgetter("sent"),
    b"FROM": attrgetter("keys.from_"),
    b"SIZE": attrgetter("size"),
    b"SUBJECT": attrgetter("keys.subject"),
    b"TO": attrgetter("keys.to"),
    b"DISPLAYFROM": attrgetter("keys.display_from"),
    b"DISPLAYTO": attrgetter("keys.display_to"),
}


def sort_positions(cols: Columns, criteria: Sequence[tuple[bytes, bool]],
                   positions: Sequence[int] | None = None) -> list[int]:
    """RFC 5256 3: the positions (every one, or `positions`, ascending) in the order the
    criteria give; equal ones in sequence order (the implicit last criterion, which
    REVERSE never reverses).

    One stable sort per criterion, the last criterion first: Python's sort keeps equal
    keys in their order, also with reverse=True, so a REVERSE on a string key needs no
    inverted key and sequence order stays ascending among equals.  A single ascending
    key is its column's order itself (kept by a folder's table)."""
    n = len(cols)
    if len(criteria) == 1 and (positions is None or len(positions) * 8 >= n):
        key, reverse = criteria[0]
        name = SORT_COLUMNS[key]
        order = cols.reversed_order(name) if reverse else cols.order(name)
        if positions is None:
            return list(order)
        return _only(order, positions, n)  # most of them: filter the order, no sort
    items = list(range(n)) if positions is None else list(positions)
    for key, reverse in reversed(criteria):
        items = sorted_in_runs(items, cols.sort_key(SORT_COLUMNS[key]), reverse)
    return items


def _only(order: Sequence[int], positions: Sequence[int], n: int) -> list[int]:
    """The members of `positions` in `order`'s order."""
    keep = bytearray(n)
    for p in positions:
        keep[p] = 1
    return [p for p in order if keep[p]]


RUN = 16384  # positions one C-level sort or join handles at a time


def sorted_in_runs(items: list[int], key: Callable[[int], Any],
                   reverse: bool = False) -> list[int]:
    """`items` sorted (stably) by `key`.  A C-level sort holds the GIL throughout, and the
    reactor waits for it: a long list is sorted in runs of RUN, and the runs then merged
    by one more sort, which finds them (about as many comparisons in all, but no single
    step of more than a few milliseconds)."""
    if len(items) <= RUN:
        items.sort(key=key, reverse=reverse)
        return items
    runs = [sorted(items[i:i + RUN], key=key, reverse=reverse)
            for i in range(0, len(items), RUN)]
    merged = list(chain.from_iterable(runs))
    merged.sort(key=key, reverse=reverse)
    return merged


def sort_messages(messages: Iterable[SortMessage | Entry],
                  criteria: Sequence[tuple[bytes, bool]]) -> list[Entry]:
    """RFC 5256 3: the messages in the order the criteria give (see sort_positions)."""
    items, cols = _columns_of(messages)
    return [items[p] for p in sort_positions(cols, criteria)]


def sort_key_of(entry: Entry, criteria: Sequence[tuple[bytes, bool]]) -> tuple[Any, ...]:
    """What a kept SORT result (RFC 5267 CONTEXT=SORT) remembers of a message: its value
    for each criterion, then its UID (the sequence-order tie-break: UIDs ascend with
    sequence numbers)."""
    return (*(_KEY_FUNCS[key](entry) for key, _ in criteria), entry.uid)


def sort_values(cols: Columns, p: int, criteria: Sequence[tuple[bytes, bool]]) -> tuple[Any, ...]:
    """sort_key_of for the message at position `p` of `cols`."""
    return (*(cols.column(SORT_COLUMNS[key])[p] for key, _ in criteria), cols.uids[p])


def sort_order(criteria: Sequence[tuple[bytes, bool]]) -> Callable[[tuple[Any, ...]], Any]:
    """A key function over sort_key_of tuples giving sort_messages' order, for bisecting
    into a kept sorted result: criterion by criterion (REVERSE flips one), then UID."""
    reverse = [r for _, r in criteria]

    def compare(a: tuple[Any, ...], b: tuple[Any, ...]) -> int:
        for i, flip in enumerate(reverse):
            x, y = a[i], b[i]
            if x != y:
                c = -1 if x < y else 1
                return -c if flip else c
        return (a[-1] > b[-1]) - (a[-1] < b[-1])

    return cmp_to_key(compare)


def sort_response(entries: Sequence[Entry], uid: bool) -> bytes:
    """RFC 5256 4 sort-data: b"SORT n n n" (UIDs for UID SORT)."""
    nums = [e.uid for e in entries] if uid else [e.seq for e in entries]
    return b" ".join([b"SORT", *(b"%d" % n for n in nums)])


def sort_line(order: Sequence[int], text: Sequence[bytes]) -> bytes:
    """RFC 5256 4 sort-data from positions and each position's number as digits (joined
    RUN at a time: see sorted_in_runs)."""
    if not order:
        return b"SORT"
    get = text.__getitem__
    return b"SORT " + b" ".join([b" ".join(map(get, order[i:i + RUN]))
                                 for i in range(0, len(order), RUN)])


# -- THREAD (RFC 5256 3) --------------------------------------------------------------------------

_LEAF: tuple[()] = ()


class Thread:
    """A node of a thread tree; `message` None is a dummy (a message that is referred to
    but not among the searched ones, or a subject-merge placeholder)."""

    __slots__ = ("message", "children", "parent")

    def __init__(self, message: Entry | None, children: list["Thread"] | None = None,
                 parent: "Thread | None" = None) -> None:
        self.message = message
        # Most nodes stay leaves: they share one empty tuple until a child comes (a
        # list per node is a third of the objects a large THREAD allocates).
        self.children: list[Thread] = children if children is not None else _LEAF  # type: ignore[assignment]
        self.parent = parent

    def __repr__(self) -> str:
        m = self.message
        return f"Thread({'dummy' if m is None else m.seq}, {len(self.children)} children)"


class Forest:
    """Threads over n positions.  Container c below n is the message at position c, one
    from n on a dummy; the children of c are flat[lo[c]:hi[c]] (one array for them all:
    no list per node, so a THREAD of a large folder leaves little for the cyclic garbage
    collector); `top` is the threads in order.  What both algorithms build; written out
    (`line`) or as Thread objects (`threads`)."""

    __slots__ = ("n", "lo", "hi", "flat", "top")

    def __init__(self, n: int, lo: Sequence[int], hi: Sequence[int], flat: Sequence[int],
                 top: list[int]) -> None:
        self.n = n
        self.lo = lo
        self.hi = hi
        self.flat = flat
        self.top = top

    def children(self, c: int) -> Sequence[int]:
        return self.flat[self.lo[c]:self.hi[c]]

    def threads(self, messages: Sequence[Entry]) -> list[Thread]:
        """The threads as Thread objects over `messages` (indexed by position)."""
        n = self.n
        made: dict[int, Thread] = {}
        stack = list(self.top)
        while stack:
            c = stack.pop()
            made[c] = Thread(messages[c] if c < n else None)
            stack.extend(self.children(c))
        for c, node in made.items():
            children = self.children(c)
            if children:
                node.children = [made[k] for k in children]
                for child in node.children:
                    child.parent = node
        return [made[c] for c in self.top]

    def line(self, text: Sequence[bytes]) -> bytes:
        """RFC 5256 4 thread-list for each thread (as format_threads), `text` giving
        each position's number as digits."""
        n, lo, hi = self.n, self.lo, self.hi
        out: list[bytes] = []
        append = out.append
        run: list[bytes] = []  # consecutive threads of one message: b"(1)(2)(3)" at once
        for t in self.top:
            if t < n and lo[t] == hi[t]:
                run.append(text[t])
                if len(run) >= RUN:
                    append(b"(" + b")(".join(run) + b")")
                    run = []
                continue
            if run:
                append(b"(" + b")(".join(run) + b")")
                run = []
            self._write(t, text, append)
        if run:
            append(b"(" + b")(".join(run) + b")")
        return b"".join(out)

    def _write(self, top: int, text: Sequence[bytes], append: Callable[[bytes], None]) -> None:
        """One thread's thread-list: a message with one child is followed by it inline,
        more children are parenthesised lists, a dummy is the lists of its children."""
        n = self.n
        stack = [top]
        while stack:
            c = stack.pop()
            if c < 0:
                append(b")")
                continue
            append(b"(")
            if c >= n:
                stack.append(-1)
                stack.extend(reversed(self.children(c)))
                continue
            nums = [text[c]]
            children = self._visible(c)
            while len(children) == 1:
                c = children[0]
                nums.append(text[c])
                children = self._visible(c)
            append(b" ".join(nums))
            stack.append(-1)
            if children:
                append(b" ")
                stack.extend(reversed(children))

    def _visible(self, c: int) -> Sequence[int]:
        """A message's children as written: a dummy below a message (which the
        algorithms never leave) stands for its children, so the syntax stays valid."""
        children = self.children(c)
        n = self.n
        if not children or max(children) < n:
            return children
        out: list[int] = []
        stack = list(reversed(children))
        while stack:
            k = stack.pop()
            if k >= n:
                stack.extend(reversed(self.children(k)))
            else:
                out.append(k)
        return out


def thread_line(forest: Forest, text: Sequence[bytes]) -> bytes:
    """RFC 5256 4 thread-data: b"THREAD" and the thread lists."""
    if not forest.top:
        return b"THREAD"
    return b"THREAD " + forest.line(text)


def _all_positions(cols: Columns, positions: Sequence[int] | None) -> Sequence[int]:
    return range(len(cols)) if positions is None else positions


def _zeros(count: int) -> array:
    return array("i", bytes(4 * count))


def orderedsubject_forest(cols: Columns, positions: Sequence[int] | None = None) -> Forest:
    """RFC 5256 3 ORDEREDSUBJECT: messages sorted by base subject then sent date, split
    into one thread per base subject, threads ordered by the sent date of their first
    message; the first message is the root, every other one its child (no deeper)."""
    n = len(cols)
    # (subject, sent date, sequence): a thread's messages are one run of it
    flat = cols.subject_order()
    if positions is not None and len(positions) < n:
        flat = _only(flat, positions, n)
    if not isinstance(flat, array):
        flat = array("i", flat)
    subject_of = cols.sort_key("subject")
    lo, hi = _zeros(n), _zeros(n)
    roots: list[int] = []
    root, subject, start = -1, None, 0
    for i, p in enumerate(flat):
        s = subject_of(p)
        if root < 0 or s != subject:
            if root >= 0:
                lo[root], hi[root] = start, i
            root, subject, start = p, s, i + 1
            roots.append(p)
    if root >= 0:
        lo[root], hi[root] = start, len(flat)
    return Forest(n, lo, hi, flat, sorted_in_runs(roots, cols.place("sent").__getitem__))


def references_forest(cols: Columns, positions: Sequence[int] | None = None) -> Forest:
    """RFC 5256 3 REFERENCES, steps (1)-(6), over containers numbered as in Forest, with
    parent pointers and child counts until the end, when the children of all are laid
    out, sorted, in one array.  The order of siblings matters only where (4) and (6)
    sort them, so it is not kept before.

    Container p is the message at position p from the start: the first message with a
    Message-ID is the container of that ID (the one a reference made before the message
    came would have been filled by it); a later message with that ID, or one without an
    ID, has its own.  Dummies, IDs no message has, come after n (Columns.references)."""
    n = len(cols)
    refs_of, dummies = cols.references(positions)
    every = _all_positions(cols, positions)
    par: list[int] = [-1] * (n + dummies)   # container -> parent, -1: none
    count: list[int] = [0] * (n + dummies)  # container -> how many children

    def would_loop(parent: int, child: int) -> bool:
        # (1)(A): a loop when `parent` is `child` or descends from it; a child without
        # children cannot be an ancestor.
        if parent == child:
            return True
        if not count[child]:
            return False
        a = parent
        while a >= 0:
            if a == child:
                return True
            a = par[a]
        return False

    # (1) link the messages by their references, in sequence order
    for p in every:
        prev = -1
        # (A) each reference the parent of the next, unless it has one or it loops
        for c in refs_of[p]:
            if prev >= 0 and par[c] < 0 and not would_loop(prev, c):
                par[c] = prev
                count[prev] += 1
            prev = c
        # (B) the last reference is the parent (none: no parent); this link takes
        # precedence over (A)'s
        old = par[p]
        if old >= 0:
            count[old] -= 1
            par[p] = -1
        if prev >= 0 and not would_loop(prev, p):
            par[p] = prev
            count[prev] += 1

    # (2), (3) prune dummies: one below another container is replaced by its children,
    # so a message's parent becomes its nearest ancestor that is a message or a dummy at
    # the top (the chains of dummies passed are shortened on the way: each is walked
    # once).  A dummy at the top with no child left goes, one with a single child is
    # replaced by it.
    for p in every:
        q = par[p]
        if q >= n and par[q] >= 0:
            path = []
            while q >= n and par[q] >= 0:
                path.append(q)
                q = par[q]
            for d in path:
                par[d] = q
            par[p] = q
    key = list(cols.place("sent"))  # (sent date, sequence); a dummy: its first child's
    key += [-1] * dummies
    first: dict[int, int] = {}      # a top dummy's first child (so far)
    tally: dict[int, int] = {}      # how many children it has
    for p in every:
        d = par[p]
        if d >= n:
            if d in first:
                tally[d] += 1
                if key[p] < key[first[d]]:
                    first[d] = p
            else:
                tally[d] = 1
                first[d] = p
    held: dict[int, list[int]] = {}  # the top dummies kept, and their children
    for d, k in tally.items():
        if k == 1:
            par[first[d]] = -1
        else:
            held[d] = []
            key[d] = key[first[d]]
    if held:
        for p in every:
            if par[p] in held:
                held[par[p]].append(p)
    top = [p for p in every if par[p] < 0]
    top += held

    # (4) the top level by sent date, a dummy by its first child; (5) gathers threads
    # with the same base subject, in that order
    top = _merge_subjects(top, cols, n, par, key, first, held)

    # (6) every set of siblings by sent date, then the top level (a dummy by its first
    # child)
    below = [c for c in range(len(par)) if par[c] >= 0 and (c < n or c in held)]
    below = sorted_in_runs(sorted_in_runs(below, key.__getitem__), par.__getitem__)
    flat = array("i", below)
    lo, hi = _zeros(len(par)), _zeros(len(par))
    last = -1
    for i, c in enumerate(flat):
        q = par[c]
        if q != last:
            lo[q] = i
            last = q
        hi[q] = i + 1
    for c in top:
        if c >= n:
            key[c] = key[flat[lo[c]]]
    return Forest(n, lo, hi, flat, sorted_in_runs(top, key.__getitem__))


def _merge_subjects(top: list[int], cols: Columns, n: int, par: list[int], key: list[int],
                    first: dict[int, int], held: dict[int, list[int]]) -> list[int]:
    """RFC 5256 3 (5): merge top-level threads that share a base subject.  A thread's
    subject is its message's, or its first child's for a dummy (5)(B)(i).  Only the
    threads whose subject another thread has too take part, in (4)'s order.  A dummy
    added here is appended to `par` and `key`."""
    replies = cols.column("reply")
    # Subjects as ranks where the table keeps them (ints compare fast); empty ones
    # never merge.
    subject_of = cols.sort_key("subject")
    empty: Any = ""
    if cols.keep:  # the rank of "" (the least subject) if there is one
        order = cols.order("subject")
        empty = 0 if order and not cols.column("subject")[order[0]] else None
    subjects = [subject_of(c if c < n else first[c]) for c in top]
    shared = {s for s, k in Counter(subjects).items() if k > 1 and s != empty}
    if not shared:
        return top
    subject = {c: s for c, s in zip(top, subjects) if s in shared}
    ordered = sorted(subject, key=key.__getitem__)

    def is_reply(c: int) -> bool:
        return c < n and replies[c]

    # (A), (B): one thread per subject
    table: dict[Any, int] = {}
    for c in ordered:
        s = subject[c]
        h = table.get(s)
        if h is None:
            table[s] = c
        elif h < n and (c >= n or (is_reply(h) and not is_reply(c))):
            table[s] = c
    # (C) merge
    gone: set[int] = set()
    added: list[int] = []
    for c in ordered:
        if par[c] >= 0 or c in gone:
            continue  # became a child, or a dummy emptied into another, meanwhile
        s = subject[c]
        h = table[s]
        if h == c:
            continue
        if h >= n and c >= n:
            for x in held[c]:            # both dummies: the children become siblings
                par[x] = h
            gone.add(c)
        elif h >= n or (is_reply(c) and not is_reply(h)):
            par[c] = h                   # under the dummy, or the reply under the original
        else:
            dummy = len(par)
            par.append(-1)
            key.append(-1)
            held[dummy] = [h, c]
            par[h] = par[c] = dummy
            table[s] = dummy
            added.append(dummy)
    return [c for c in top if par[c] < 0 and c not in gone] + added


def thread_orderedsubject(messages: Iterable[SortMessage | Entry]) -> list[Thread]:
    """ORDEREDSUBJECT over messages (see orderedsubject_forest), as Thread objects."""
    items, cols = _columns_of(messages)
    return orderedsubject_forest(cols).threads(items)


def thread_references(messages: Iterable[SortMessage | Entry]) -> list[Thread]:
    """REFERENCES over messages (see references_forest), as Thread objects."""
    items, cols = _columns_of(messages)
    return references_forest(cols).threads(items)


def format_threads(threads: Sequence[Thread],
                   number: Callable[[Entry], int] = attrgetter("seq")) -> bytes:
    """RFC 5256 4 thread-list for each thread, e.g. b"(2)(3 6 (4 23)(44 7 96))": a node
    with one child is followed by it inline, more children are parenthesised lists, a
    dummy is the lists of its children.  `number` gives a message's number (sequence
    number, or UID for UID THREAD)."""
    out: list[bytes] = []
    stack: list[Thread | bytes] = list(reversed(threads))
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            out.append(item)
            continue
        node = item
        out.append(b"(")
        if node.message is None:
            stack.append(b")")
            stack.extend(reversed(node.children))
            continue
        nums = [b"%d" % number(node.message)]
        children = _visible(node)
        while len(children) == 1:
            node = children[0]
            nums.append(b"%d" % number(node.message))  # type: ignore[arg-type]
            children = _visible(node)
        out.append(b" ".join(nums))
        stack.append(b")")
        if children:
            out.append(b" ")
            stack.extend(reversed(children))
    return b"".join(out)


def _visible(node: Thread) -> list[Thread]:
    """A message's children as written: a dummy below a message (which the algorithms
    never leave) stands for its children, so the syntax stays valid."""
    if all(c.message is not None for c in node.children):
        return node.children
    out: list[Thread] = []
    stack = list(reversed(node.children))
    while stack:
        c = stack.pop()
        if c.message is None:
            stack.extend(reversed(c.children))
        else:
            out.append(c)
    return out


def thread_response(threads: Sequence[Thread], uid: bool) -> bytes:
    """RFC 5256 4 thread-data: b"THREAD" and the thread lists."""
    if not threads:
        return b"THREAD"
    return b"THREAD " + format_threads(threads, attrgetter("uid") if uid else attrgetter("seq"))


# -- reading the messages (worker thread) ---------------------------------------------------------

def _text(value: bytes) -> str:
    """A raw header value as text: UTF-8 (RFC 6532), else Latin-1 (never fails)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def read_head(f: BinaryIO) -> bytes:
    """The header section of a message file; an oversized one is cut at HEAD_LIMIT."""
    head = mime.read_head(f)
    if head is not None:
        return head
    f.seek(0)
    data = f.read(HEAD_LIMIT)
    first_nl = data.find(b"\n")
    if first_nl > 0 and data[first_nl - 1:first_nl] != b"\r":
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    hend, _ = mime.header_end(data, 0, len(data))
    return data[:hend]


def message_from_head(head: bytes, uid: int, seq: int, internaldate: float,
                      size: int) -> SortMessage:
    """A SortMessage from a header section (the first of each field counts)."""
    fields: dict[bytes, bytes] = {}
    for name, value in mime.parse_headers(head):
        if name in FIELDS and name not in fields:
            fields[name] = value
    get = fields.get
    return SortMessage(
        uid, seq, internaldate, size,
        date=_text(get(b"date", b"")),
        subject=mime.decode_words(_text(get(b"subject", b""))),
        from_=parse_address_list(_text(get(b"from", b""))),
        to=parse_address_list(_text(get(b"to", b""))),
        cc=parse_address_list(_text(get(b"cc", b""))),
        message_id=_text(get(b"message-id", b"")),
        references=_text(get(b"references", b"")),
        in_reply_to=_text(get(b"in-reply-to", b"")))


class _Files:
    """Opens message files by snapshot name, finding one renamed meanwhile (a flag change
    by another session) by its base name, with one directory listing per call."""

    def __init__(self, folder_dir: str) -> None:
        self.dir = folder_dir
        self._by_base: dict[str, str] | None = None

    def open(self, info: Any) -> BinaryIO | None:
        try:
            return open(os.path.join(self.dir, info.subdir, info.filename), "rb")
        except FileNotFoundError:
            pass
        if self._by_base is None:
            self._by_base = {}
            for sub in ("cur", "new"):
                try:
                    with os.scandir(os.path.join(self.dir, sub)) as it:
                        for d in it:
                            self._by_base[d.name.split(":", 1)[0]] = os.path.join(sub, d.name)
                except OSError:
                    continue
        rel = self._by_base.get(info.basename)
        if rel is None:
            return None  # expunged meanwhile; the client hears of it later
        try:
            return open(os.path.join(self.dir, rel), "rb")
        except OSError:
            return None


def _get_many(index: Any, bases: list[str], key: str) -> dict[str, Any]:
    if index is None or not bases:
        return {}
    try:
        return index.get_many(bases, key)
    except sqlite3.Error:
        return {}  # an unusable index costs speed only


def read_keys(folder_dir: str, infos: Sequence[Any], index: Any,
              files: "_Files | None" = None) -> tuple[list[SortKeys], int, bool]:
    """(each message's SortKeys, rows added to the index cache, whether every message's
    file was there) for the messages `infos` (immutable MessageInfo-like objects:
    basename, subdir, filename, uid, internaldate, size) of the folder at `folder_dir`.
    Blocking: meant for a worker thread.

    Keys decoded by an earlier command while the index stayed open come from memory
    (`index.decoded`); else from the index cache (CACHE_KEY); else from the file's header
    section, and are then put into the index (`index.put`; the caller writes them out).
    A message whose file is gone gets empty keys, not remembered."""
    memo: dict[str, SortKeys] = {}
    if index is not None and hasattr(index, "decoded"):
        memo = index.decoded.setdefault(CACHE_KEY, {})
        index.last_used = time.monotonic()  # in use: the idle sweep leaves it open
    try:
        return list(map(memo.__getitem__, [i.basename for i in infos])), 0, True
    except KeyError:
        pass
    cached = _get_many(index, [i.basename for i in infos if i.basename not in memo],
                       CACHE_KEY)
    files = files or _Files(folder_dir)
    out: list[SortKeys] = []
    added = 0
    complete = True
    for info in infos:
        base = info.basename
        keys = memo.get(base)
        if keys is None:
            keys = SortKeys.from_cache(cached.get(base))
            if keys is None:
                f = files.open(info)
                if f is None:  # gone meanwhile: sorted as empty, and not remembered
                    out.append(_NO_KEYS)
                    complete = False
                    continue
                with f:
                    keys = sort_keys(message_from_head(read_head(f), info.uid, 0,
                                                       info.internaldate, info.size))
                if index is not None:
                    index.put(base, CACHE_KEY, keys.to_cache())
                    added += 1
            memo[base] = keys
        out.append(keys)
    return out, added, complete


_NO_KEYS = SortKeys()


def read_sizes(folder_dir: str, infos: Sequence[Any], index: Any,
               size_hint: Callable[[Any], int | None], size_key: str = "vsize",
               files: "_Files | None" = None) -> tuple[list[int], int]:
    """(each message's RFC822.SIZE, rows added to the index cache): the hint (from the
    file name), else the cached `size_key` value, else measured (and cached); the stored
    size for a file gone meanwhile.  Blocking: meant for a worker thread."""
    sizes: list[int | None] = [size_hint(info) for info in infos]
    unknown = [info.basename for info, size in zip(infos, sizes) if size is None]
    if not unknown:
        return sizes, 0  # type: ignore[return-value]
    cached = _get_many(index, unknown, size_key)
    files = files or _Files(folder_dir)
    added = 0
    for i, info in enumerate(infos):
        if sizes[i] is not None:
            continue
        try:
            sizes[i] = int(cached[info.basename])
            continue
        except (KeyError, TypeError, ValueError):
            pass
        f = files.open(info)
        if f is None:
            sizes[i] = info.size
            continue
        with f, mime.MessageBytes(f) as mb:
            sizes[i] = len(mb)
        if index is not None:
            index.put(info.basename, size_key, str(sizes[i]))
            added += 1
    return sizes, added  # type: ignore[return-value]


def load_entries(folder_dir: str, infos: Sequence[Any], view: Sequence[int], index: Any,
                 size_hint: Callable[[Any], int | None] | None = None,
                 size_key: str = "vsize") -> tuple[list[Entry], int]:
    """(entries, rows added to the index cache) for the messages `infos` (see read_keys)
    of the folder at `folder_dir`; `view` (ascending UIDs) gives sequence numbers.  With
    `size_hint`, sizes are RFC822.SIZE (see read_sizes); without it the stored size is
    used.  Blocking: meant for a worker thread."""
    files = _Files(folder_dir)
    keys, added, _ = read_keys(folder_dir, infos, index, files)
    if size_hint is not None:
        sizes, more = read_sizes(folder_dir, infos, index, size_hint, size_key, files)
        added += more
    else:
        sizes = [info.size for info in infos]
    out: list[Entry] = []
    for info, k, size in zip(infos, keys, sizes):
        i = bisect.bisect_left(view, info.uid)
        seq = i + 1 if i < len(view) and view[i] == info.uid else 0
        out.append(make_entry(info.uid, seq, info.internaldate, size, k))
    return out, added
