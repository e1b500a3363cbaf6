"""ESEARCH (RFC 4731), SEARCHRES (RFC 5182), ESORT and CONTEXT (RFC 5267): the RETURN
options of SEARCH and SORT, the ESEARCH response (also for a SORT, in sorted order), what
SAVE keeps for "$", and the ADDTO / REMOVEFROM updates of a context; no I/O, no Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mailserver.imap.parser import Arguments, BadCommand, sequence_text

# RFC 4731 3.1, RFC 5182 2.1, RFC 5267 4.1: result options.
OPTIONS = (b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE", b"CONTEXT", b"UPDATE", b"PARTIAL")
MAX_OPTIONS = 16          # words in one RETURN list (each option may be given once)
MAX_NUMBER = 0xFFFFFFFF   # RFC 3501 nz-number
UPDATE_LINE = 8000        # octets of sets per ADDTO / REMOVEFROM response
SET_PIECE = 500           # numbers per position-0 pair at most


@dataclass(frozen=True)
class ReturnOptions:
    """What a RETURN (...) asks for; RETURN () means ALL (RFC 4731 3.1).  `partial` is
    the (first, last) of PARTIAL as written (RFC 5267 4.4)."""

    min: bool = False
    max: bool = False
    all: bool = False
    count: bool = False
    save: bool = False
    context: bool = False
    update: bool = False
    partial: tuple[int, int] | None = None

    @property
    def answers(self) -> bool:
        """Whether an ESEARCH response is sent: SAVE alone sends none (RFC 5182 2.4); any
        other option, even one with no return data (CONTEXT, UPDATE), sends one."""
        return (self.min or self.max or self.all or self.count or self.context
                or self.update or self.partial is not None)

    @property
    def window(self) -> tuple[int, int] | None:
        """PARTIAL's range, lowest first (RFC 5267 5: 500:400 is 400:500)."""
        if self.partial is None:
            return None
        a, b = self.partial
        return (a, b) if a <= b else (b, a)


def parse_return(args: Arguments) -> ReturnOptions | None:
    """`RETURN (opts) ` at the cursor (then consumed with its trailing space), or None when
    the command has no RETURN; BadCommand for an unknown or repeated option, a bad PARTIAL
    range, or PARTIAL with ALL (RFC 5267 4.4)."""
    if args.upcoming(7).upper() != b"RETURN ":
        return None
    args.atom()
    args.space()
    words: list[bytes] = []
    partial: list[tuple[int, int]] = []

    def option(a: Arguments) -> bytes:
        if len(words) >= MAX_OPTIONS:
            raise BadCommand("too many RETURN options")
        word = a.atom().upper()
        if word not in OPTIONS:
            raise BadCommand(f"unknown RETURN option {word.decode('ascii', 'replace')}")
        if word == b"PARTIAL":
            a.space()
            partial.append(parse_partial_range(a.atom()))
        words.append(word)
        return word

    args.paren_list(option)
    args.space()
    if len(set(words)) != len(words):
        raise BadCommand("repeated RETURN option")
    if not words:
        return ReturnOptions(all=True)
    if partial and b"ALL" in words:
        raise BadCommand("PARTIAL and ALL together")  # RFC 5267 4.4
    return ReturnOptions(min=b"MIN" in words, max=b"MAX" in words, all=b"ALL" in words,
                         count=b"COUNT" in words, save=b"SAVE" in words,
                         context=b"CONTEXT" in words, update=b"UPDATE" in words,
                         partial=partial[0] if partial else None)


def parse_partial_range(text: bytes) -> tuple[int, int]:
    """RFC 5267 5 partial-range: nz-number ":" nz-number, no "*"; each at most 2^32-1."""
    first, sep, last = text.partition(b":")
    if not sep:
        raise BadCommand("invalid PARTIAL range")
    return _nz_number(first), _nz_number(last)


def _nz_number(text: bytes) -> int:
    if not text.isdigit() or text.startswith(b"0") or len(text) > 10 \
            or int(text) > MAX_NUMBER:
        raise BadCommand("invalid PARTIAL range")
    return int(text)


def compact_set(numbers: Sequence[int]) -> bytes:
    """Numbers as a sequence-set in the order given, ascending runs as ranges: 1:3,5,8:9
    (RFC 5267 3.2: a range only where it ascends)."""
    return sequence_text(list(numbers))


def _correlator(tag: bytes) -> bytes:
    return b'(TAG "' + tag.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'")'


def esearch_response(tag: bytes, numbers: Sequence[int], options: ReturnOptions,
                     uid: bool) -> bytes:
    """The untagged ESEARCH line (without "* "), RFC 4731 3.1: MIN, MAX and ALL only when
    something matched; COUNT always when asked; PARTIAL always, NIL when its range holds
    nothing (RFC 5267 4.4).  `numbers` in result order: ascending for a SEARCH, the
    requested order for a SORT, whose MIN and MAX are the first and last sorted (RFC 5267
    3.1)."""
    out = [b"ESEARCH " + _correlator(tag)]
    if uid:
        out.append(b"UID")
    if numbers:
        if options.min:
            out.append(b"MIN %d" % numbers[0])
        if options.max:
            out.append(b"MAX %d" % numbers[-1])
        if options.all:
            out.append(b"ALL " + compact_set(numbers))
    if options.partial is not None:
        piece = partial_results(numbers, options)
        out.append(b"PARTIAL (%d:%d %s)" % (*options.partial,
                                             compact_set(piece) if piece else b"NIL"))
    if options.count:
        out.append(b"COUNT %d" % len(numbers))
    return b" ".join(out)


def partial_results(numbers: Sequence[int], options: ReturnOptions) -> Sequence[int]:
    """The results PARTIAL names (1 is the first), as many as there are (RFC 5267 4.4)."""
    window = options.window
    if window is None:
        return []
    return numbers[window[0] - 1:window[1]]


def saved_result(options: ReturnOptions, uids: Sequence[int]) -> list[int]:
    """What SAVE keeps (RFC 5182 2.4), ascending: with ALL or COUNT every match; otherwise
    what MIN, MAX and PARTIAL return, when any of them is asked; else every match.  `uids`
    in result order (for a SORT the sorted order: its MIN is the first sorted)."""
    if not uids:
        return []
    if options.all or options.count or not (options.min or options.max
                                            or options.partial is not None):
        return sorted(uids)
    kept = set(partial_results(uids, options))
    if options.min:
        kept.add(uids[0])
    if options.max:
        kept.add(uids[-1])
    return sorted(kept)


# -- RFC 5267 4.3: updates to a context ----------------------------------------------------------

Pair = tuple[int, Sequence[int]]   # (context position, numbers in the requested order)


def update_lines(tag: bytes, uid: bool, removed: Sequence[Pair],
                 added: Sequence[Pair]) -> list[bytes]:
    """ESEARCH responses (without "* ") carrying REMOVEFROM and then ADDTO data (RFC 5267
    4.3.3, 4.3.4), processed by the client in this order; a long update is cut into
    several responses of at most about UPDATE_LINE octets of sets each."""
    head = b"ESEARCH " + _correlator(tag) + (b" UID" if uid else b"")
    items: list[tuple[bytes, bytes]] = []
    for name, pairs in ((b"REMOVEFROM", removed), (b"ADDTO", added)):
        for position, numbers in pairs:
            step = SET_PIECE if position == 0 else len(numbers) or 1
            for i in range(0, len(numbers), step):
                piece = numbers[i:i + step]
                items.append((name, b"%d %s" % (position, compact_set(piece))))
    lines: list[bytes] = []
    current: list[bytes] = []
    size = 0
    last_name = b""
    for name, pair in items:
        if current and size + len(pair) > UPDATE_LINE:
            lines.append(head + b" " + b" ".join(current) + b")")
            current, size, last_name = [], 0, b""
        if name == last_name:
            current[-1] = current[-1] + b" " + pair
        else:
            if current:
                current[-1] += b")"
            current.append(name + b" (" + pair)
            last_name = name
        size += len(pair) + 1
    if current:
        lines.append(head + b" " + b" ".join(current) + b")")
    return lines


def parse_cancelupdate(args: Arguments, limit: int) -> list[bytes]:
    """CANCELUPDATE's arguments (RFC 5267 5): 1*(SP quoted), at most `limit` of them."""
    tags: list[bytes] = []
    while True:
        args.space()
        tags.append(bytes(args.string()))
        if len(tags) > limit:
            raise BadCommand("too many tags")
        if args.at_end():
            return tags
