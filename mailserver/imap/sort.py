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
"""

from __future__ import annotations

import bisect
import calendar
import email.utils
import json
import os
import re
import sqlite3
import unicodedata
from dataclasses import dataclass
from functools import cmp_to_key
from operator import attrgetter
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
CACHE_KEY = "sort1"        # folder-index cache key of a message's SortKeys (JSON)
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
        # (7)
        return s.casefold(), reply


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


def collation_key(text: str) -> str:
    """The comparison form of a string under i;unicode-casemap (RFC 5051, the collation
    of I18NLEVEL=1 that RFC 5256 requires): case-folded, then decomposed (NFKD), so that
    "Émile" sorts among the e's rather than after "z"."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKD", text.casefold())


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


def sort_messages(messages: Iterable[SortMessage | Entry],
                  criteria: Sequence[tuple[bytes, bool]]) -> list[Entry]:
    """RFC 5256 3: the messages in the order the criteria give; equal ones in sequence
    order (the implicit last criterion, which REVERSE never reverses).

    One stable sort per criterion, the last criterion first: Python's sort keeps equal
    keys in their order, also with reverse=True, so a REVERSE on a string key needs no
    inverted key and sequence order stays ascending among equals."""
    items = sorted(_entries(messages), key=attrgetter("seq"))
    for key, reverse in reversed(criteria):
        items.sort(key=_KEY_FUNCS[key], reverse=reverse)
    return items


def sort_key_of(entry: Entry, criteria: Sequence[tuple[bytes, bool]]) -> tuple[Any, ...]:
    """What a kept SORT result (RFC 5267 CONTEXT=SORT) remembers of a message: its value
    for each criterion, then its UID (the sequence-order tie-break: UIDs ascend with
    sequence numbers)."""
    return (*(_KEY_FUNCS[key](entry) for key, _ in criteria), entry.uid)


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

    def sort_key(self) -> tuple[float, int]:
        """Sent date, then sequence number; a dummy sorts as its first child."""
        node = self
        while node.message is None:
            if not node.children:
                return (0.0, 0)
            node = node.children[0]
        m = node.message
        return (m.sent, m.seq)


def thread_orderedsubject(messages: Iterable[SortMessage | Entry]) -> list[Thread]:
    """RFC 5256 3 ORDEREDSUBJECT: messages sorted by base subject then sent date, split
    into one thread per base subject, threads ordered by the sent date of their first
    message; the first message is the root, every other one its child (no deeper)."""
    # (subject, sent date, sequence) as three stable sorts with C-level keys
    items = sorted(_entries(messages), key=attrgetter("seq"))
    items.sort(key=attrgetter("sent"))
    items.sort(key=attrgetter("keys.subject"))
    threads: list[Thread] = []
    current: Thread | None = None
    subject: str | None = None
    for e in items:
        if current is None or e.keys.subject != subject:
            current = Thread(e)
            subject = e.keys.subject
            threads.append(current)
        else:
            _link(current, Thread(e))
    threads.sort(key=Thread.sort_key)
    return threads


def _is_ancestor(node: Thread, of: Thread) -> bool:
    """Whether `node` is `of` or one of its ancestors (linking `of` under `node`'s
    descendant would make a loop)."""
    p: Thread | None = of
    while p is not None:
        if p is node:
            return True
        p = p.parent
    return False


def _would_loop(parent: Thread, child: Thread) -> bool:
    """RFC 5256 3 (1)(A): making `parent` the parent of `child` is a loop when `parent`
    is `child` or descends from it.  A child without children cannot be an ancestor."""
    if parent is child:
        return True
    return bool(child.children) and _is_ancestor(child, parent)


def _link(parent: Thread, child: Thread) -> None:
    child.parent = parent
    if parent.children:
        parent.children.append(child)
    else:
        parent.children = [child]


def _unlink(child: Thread) -> None:
    parent = child.parent
    if parent is not None:
        parent.children.remove(child)
        child.parent = None


def thread_references(messages: Iterable[SortMessage | Entry]) -> list[Thread]:
    """RFC 5256 3 REFERENCES, steps (1)-(6)."""
    items = sorted(_entries(messages), key=attrgetter("seq"))
    by_id: dict[str, Thread] = {}
    nodes: list[Thread] = []     # every container, in creation order

    def container(mid: str) -> Thread:
        node = by_id.get(mid)
        if node is None:  # no message (yet) with this id: a dummy
            node = by_id[mid] = Thread(None)
            nodes.append(node)
        return node

    # (1) link the messages by their references, in sequence order
    for e in items:
        mid = e.keys.message_id
        node = by_id.get(mid) if mid is not None else None
        if node is not None and node.message is None:
            node.message = e                 # the dummy was waiting for this message
        else:
            # No id, or a duplicate of an earlier message's: a unique id of its own.
            node = Thread(e)
            nodes.append(node)
            if mid is not None and mid not in by_id:
                by_id[mid] = node
        parents = e.keys.parents
        # (A) each reference the parent of the next, unless it has one or it would loop
        prev: Thread | None = None
        for ref in parents:
            ref_node = container(ref)
            if (prev is not None and ref_node.parent is None
                    and not _would_loop(prev, ref_node)):
                _link(prev, ref_node)
            prev = ref_node
        # (B) the last reference is the parent; this link takes precedence over (A)'s
        _unlink(node)
        if prev is not None and not _would_loop(prev, node):
            _link(prev, node)

    # (2) the parentless ones are the children of the root
    roots = [n for n in nodes if n.parent is None]

    # (3) prune dummies: one without children goes; one with children is replaced by
    # them, except at the top where only a single child is promoted.
    for node in _post_order(roots):
        if any(c.message is None for c in node.children):
            kept: list[Thread] = []
            for c in node.children:
                if c.message is None:
                    for g in c.children:
                        g.parent = node
                    kept.extend(c.children)
                else:
                    kept.append(c)
            node.children = kept
    top: list[Thread] = []
    for r in roots:
        if r.message is None:
            if len(r.children) == 1:
                child = r.children[0]
                child.parent = None
                top.append(child)
            elif r.children:
                top.append(r)
        else:
            top.append(r)

    # (4) sort the top level by sent date; a dummy by its first child (children first)
    for r in top:
        if r.message is None:
            r.children.sort(key=Thread.sort_key)
    top.sort(key=Thread.sort_key)

    # (5) gather threads with the same base subject
    top = _merge_subjects(top)

    # (6) sort every set of siblings by sent date, the deepest first
    for node in _post_order(top):
        if len(node.children) > 1:
            node.children.sort(key=Thread.sort_key)
    top.sort(key=Thread.sort_key)
    return top


def _thread_subject(node: Thread) -> str:
    """RFC 5256 3 (5)(B)(i): the base subject of the message, or of its first child
    for a dummy."""
    m = node.message if node.message is not None else node.children[0].message
    return m.keys.subject if m is not None else ""


def _is_reply(node: Thread) -> bool:
    return node.message is not None and node.message.keys.reply


def _merge_subjects(top: list[Thread]) -> list[Thread]:
    """RFC 5256 3 (5): merge top-level threads that share a base subject."""
    # (A), (B): one message per thread subject
    table: dict[str, Thread] = {}
    for node in top:
        subject = _thread_subject(node)
        if not subject:
            continue
        held = table.get(subject)
        if held is None:
            table[subject] = node
        elif held.message is not None and (node.message is None
                                           or (_is_reply(held) and not _is_reply(node))):
            table[subject] = node
    # (C) merge
    gone: set[int] = set()
    added: list[Thread] = []
    for node in top:
        if node.parent is not None or id(node) in gone:
            continue  # became a child, or a dummy emptied into another, meanwhile
        subject = _thread_subject(node)
        if not subject:
            continue
        held = table[subject]
        if held is node:
            continue
        if held.message is None and node.message is None:
            for c in node.children:   # both dummies: the children become siblings
                c.parent = held
            held.children = [*held.children, *node.children]
            node.children = _LEAF  # type: ignore[assignment]
            gone.add(id(node))
        elif held.message is None or (_is_reply(node) and not _is_reply(held)):
            _link(held, node)         # under the dummy, or the reply under the original
        else:
            dummy = Thread(None)
            _link(dummy, held)
            _link(dummy, node)
            table[subject] = dummy
            added.append(dummy)
    return [n for n in top if n.parent is None and id(n) not in gone] + added


def _post_order(roots: list[Thread]) -> list[Thread]:
    """Every node below and including `roots`, children before their parent (iterative:
    a thread may be thousands of messages deep)."""
    out: list[Thread] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    out.reverse()
    return out


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


def load_entries(folder_dir: str, infos: Sequence[Any], view: Sequence[int], index: Any,
                 size_hint: Callable[[Any], int | None] | None = None,
                 size_key: str = "vsize") -> tuple[list[Entry], int]:
    """(entries, rows added to the index cache) for the messages `infos` (immutable
    MessageInfo-like objects: uid, basename, subdir, filename, internaldate, size) of the
    folder at `folder_dir`; `view` (ascending UIDs) gives sequence numbers.  Blocking:
    meant for a worker thread.

    Keys come from the index cache (CACHE_KEY), else from the file's header section and
    are then put into the index (`index.put`; the caller writes them out).  With
    `size_hint`, sizes are RFC822.SIZE: the hint (from the file name), else the cached
    `size_key` value, else measured (and cached); without it the stored size is used."""
    # Keys decoded by an earlier SORT while the index stayed open; the rest from the file.
    memo: dict[str, SortKeys] = ({} if index is None or not hasattr(index, "decoded")
                                 else index.decoded.setdefault(CACHE_KEY, {}))
    bases = [i.basename for i in infos if i.basename not in memo]
    cached = _get_many(index, bases, CACHE_KEY)
    sizes: dict[str, int] = {}
    if size_hint is not None:
        unknown = []
        for info in infos:
            hint = size_hint(info)
            if hint is None:
                unknown.append(info.basename)
            else:
                sizes[info.basename] = hint
        for base, value in _get_many(index, unknown, size_key).items():
            try:
                sizes[base] = int(value)
            except (TypeError, ValueError):
                pass
    files = _Files(folder_dir)
    out: list[Entry] = []
    added = 0
    for info in infos:
        i = bisect.bisect_left(view, info.uid)
        seq = i + 1 if i < len(view) and view[i] == info.uid else 0
        base = info.basename
        keys = memo.get(base)
        if keys is None:
            keys = SortKeys.from_cache(cached.get(base))
        size = sizes.get(base, info.size) if size_hint is not None else info.size
        if keys is None or (size_hint is not None and base not in sizes):
            f = files.open(info)
            if f is None:  # gone meanwhile: sorted as empty, and not remembered
                if keys is None:
                    out.append(make_entry(info.uid, seq, info.internaldate, size, SortKeys()))
                    continue
            else:
                with f:
                    if keys is None:
                        head = read_head(f)
                        keys = sort_keys(message_from_head(head, info.uid, seq,
                                                           info.internaldate, info.size))
                        if index is not None:
                            index.put(base, CACHE_KEY, keys.to_cache())
                            added += 1
                    if size_hint is not None and base not in sizes:
                        f.seek(0)
                        with mime.MessageBytes(f) as mb:
                            size = len(mb)
                        if index is not None:
                            index.put(base, size_key, str(size))
                            added += 1
        if base not in memo:
            memo[base] = keys
        out.append(make_entry(info.uid, seq, info.internaldate, size, keys))
    return out, added
