"""Reading IMAP command arguments (RFC 3501 section 9) from an assembled command.

The session assembles a command from its lines and literals first; this module reads the
arguments from that: atoms, quoted strings with escapes, literals, parenthesised lists
(nesting bounded), sequence sets (size bounded) and flags.  Every malformed input raises
`BadCommand`, which the session answers with a tagged BAD.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

MAX_NESTING = 16
MAX_SEQUENCE_RANGES = 10000

# atom-char: any CHAR except ( ) { SP CTL % * " \ ]  (RFC 3501 9, "atom-specials")
_ATOM = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\\]]+")
# astring-char adds "]"; list-mailbox adds "%" and "*"
_ASTRING_ATOM = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\]+")
_LIST_MAILBOX = re.compile(rb"[^(){ \x00-\x1f\x7f\"\\]+")
# tag: any ASTRING-CHAR but "+" (RFC 3501 9), 7-bit
TAG = re.compile(rb"[^(){ \x00-\x1f\x7f-\xff%*\"\\+]+")
# flags are atoms, 7-bit (RFC 3501 9: CHAR is %x01-7F)
_FLAG = re.compile(rb"\\?[^(){ \x00-\x1f\x7f-\xff%*\"\\\]]+|\\\*")
_SEQ = re.compile(rb"[0-9*:,]+")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')


class BadCommand(ValueError):
    """Syntax error in a command: answered with a tagged BAD."""


class Literal(bytes):
    """A literal's content, to tell it apart from text when reading."""


class Quoted(bytes):
    """The content of a quoted string or a literal (a 'string', not an 'atom')."""


@dataclass(frozen=True)
class SequenceSet:
    """A set of message numbers or UIDs; '*' is stored as None until resolved."""

    ranges: tuple[tuple[int | None, int | None], ...]
    text: bytes

    def resolve(self, largest: int) -> Iterator[int]:
        """Numbers in ascending order with '*' as `largest` (RFC 3501 9: a:b == b:a)."""
        for a, b in self.spans(largest):
            yield from range(a, b + 1)

    def spans(self, largest: int) -> list[tuple[int, int]]:
        """The numbers as ascending, disjoint (first, last) runs, '*' as `largest`: what
        `resolve` counts through, for a caller that takes whole runs at once."""
        spans = []
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            if a > b:
                a, b = b, a
            spans.append((a, b))
        spans.sort()
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(max(a, 1), b) for a, b in merged if b >= max(a, 1)]

    def contains(self, n: int, largest: int) -> bool:
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            if min(a, b) <= n <= max(a, b):
                return True
        return False

    def select(self, candidates: list[int], largest: int) -> list[int]:
        """The members of sorted `candidates` (e.g. UIDs) that lie in the set, ascending.
        Over the merged runs: a set that names the same range thousands of times
        ("1:*,1:*,...") costs one slice, not one per repetition."""
        import bisect

        out: list[int] = []
        for a, b in self.spans(largest):
            out.extend(candidates[bisect.bisect_left(candidates, a):
                                  bisect.bisect_right(candidates, b)])
        return out


@dataclass(frozen=True)
class SavedSet(SequenceSet):
    """RFC 5182 "$": the saved search result, always UIDs (2.1), whatever the command;
    `ranges` are those UIDs, so a UID command uses it as any UID set."""

    uids: tuple[int, ...] = ()


def saved_set(uids: Sequence[int]) -> SavedSet:
    """"$" standing for `uids` (ascending)."""
    ranges: list[tuple[int | None, int | None]] = []
    for u in uids:
        if ranges and ranges[-1][1] == u - 1:
            ranges[-1] = (ranges[-1][0], u)
        else:
            ranges.append((u, u))
    return SavedSet(tuple(ranges), b"$", tuple(uids))


def sequence_text(numbers: list[int]) -> bytes:
    """Numbers as a sequence set, '1:3,7' style, runs of consecutive numbers as ranges, in
    the order given (COPYUID pairs must line up)."""
    out: list[bytes] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(b"%d" % numbers[i] if i == j else b"%d:%d" % (numbers[i], numbers[j]))
        i = j + 1
    return b",".join(out)


def parse_sequence_set(text: bytes) -> SequenceSet:
    if not text or not _SEQ.fullmatch(text):
        raise BadCommand("invalid sequence set")
    ranges = []
    for item in text.split(b","):
        if len(ranges) >= MAX_SEQUENCE_RANGES:
            raise BadCommand("sequence set too long")
        lo, sep, hi = item.partition(b":")
        if not lo or (sep and not hi):
            raise BadCommand("invalid sequence set")
        a, b = _seq_number(lo), _seq_number(hi) if sep else _seq_number(lo)
        ranges.append((a, b))
    return SequenceSet(tuple(ranges), text)


def _seq_number(text: bytes) -> int | None:
    if text == b"*":
        return None
    if not text.isdigit() or text.startswith(b"0") or len(text) > 10:
        raise BadCommand("invalid number in sequence set")
    n = int(text)
    if n > 0xFFFFFFFF:
        raise BadCommand("number out of range")
    return n


class Arguments:
    """A cursor over the parts of one command: text, literal, text, literal, ..."""

    # RFC 5182: where "$" may stand for a sequence set, the saved result (ascending UIDs
    # of the selected mailbox); None: "$" is not a sequence set here.
    saved_result: Callable[[], Sequence[int]] | None = None

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.i = 0
        self.pos = 0

    # -- position ------------------------------------------------------------------

    @property
    def _text(self) -> bytes:
        return self.parts[self.i] if self.i < len(self.parts) else b""

    def _at_literal(self) -> bool:
        return (self.pos >= len(self._text) and self.i + 1 < len(self.parts)
                and isinstance(self.parts[self.i + 1], Literal))

    def at_end(self) -> bool:
        return self.i >= len(self.parts) - 1 and self.pos >= len(self._text)

    def peek(self) -> bytes:
        if self._at_literal():
            return b"{"
        return self._text[self.pos:self.pos + 1]

    def upcoming(self, n: int) -> bytes:
        """The next `n` bytes of text (fewer before a literal or the end), not consumed."""
        return self._text[self.pos:self.pos + n]

    def space(self) -> None:
        if self.peek() != b" ":
            raise BadCommand("expected a space")
        self.pos += 1

    def maybe_space(self) -> bool:
        if self.peek() == b" ":
            self.pos += 1
            return True
        return False

    def end(self) -> None:
        if not self.at_end():
            raise BadCommand("unexpected extra arguments")

    def rest(self) -> bytes:
        """The remaining text of the command (no literals allowed in it)."""
        if self.i != len(self.parts) - 1:
            raise BadCommand("literal not allowed here")
        text = self._text[self.pos:]
        self.pos = len(self._text)
        return text

    # -- tokens --------------------------------------------------------------------

    def _match(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        m = pattern.match(self._text, self.pos)
        if not m:
            raise BadCommand(f"expected {what}")
        self.pos = m.end()
        return m.group(0)

    def atom(self) -> bytes:
        return self._match(_ATOM, "an atom")

    def tag(self) -> bytes:
        """RFC 3501 9: tag = 1*<any ASTRING-CHAR except "+"> ("]" allowed)."""
        return self._match(TAG, "a tag")

    def number(self) -> int:
        text = self.atom()
        if not text.isdigit() or len(text) > 10:
            raise BadCommand("expected a number")
        return int(text)

    def string(self) -> Quoted:
        if self._at_literal():
            self.i += 1
            lit = self.parts[self.i]
            self.i += 1
            self.pos = 0
            return Quoted(lit)
        m = _QUOTED.match(self._text, self.pos)
        if not m:
            raise BadCommand("expected a string")
        self.pos = m.end()
        return Quoted(re.sub(rb"\\(.)", rb"\1", m.group(1)))

    def astring(self) -> bytes:
        c = self.peek()
        if c in (b'"', b"{"):
            return self.string()
        return self._match(_ASTRING_ATOM, "an astring")

    def nstring(self) -> bytes | None:
        if self._text[self.pos:self.pos + 3].upper() == b"NIL":
            self.pos += 3
            return None
        return self.string()

    def list_mailbox(self) -> bytes:
        """The pattern argument of LIST/LSUB: a string or atom with % and *."""
        c = self.peek()
        if c in (b'"', b"{"):
            return self.string()
        return self._match(_LIST_MAILBOX, "a mailbox pattern")

    def flag(self) -> bytes:
        return self._match(_FLAG, "a flag")

    def paren_list(self, item: Callable[["Arguments"], T]) -> list[T]:
        """'(' item *(SP item) ')' ; an empty list is allowed."""
        if self.peek() != b"(":
            raise BadCommand("expected '('")
        self.pos += 1
        items: list[T] = []
        while self.peek() != b")":
            if items:
                self.space()
            if self.at_end():
                raise BadCommand("unterminated list")
            items.append(item(self))
        self.pos += 1
        return items

    def flag_list(self) -> list[bytes]:
        """A parenthesised flag list, or (STORE) a bare list of flags."""
        if self.peek() == b"(":
            return self.paren_list(Arguments.flag)
        flags = [self.flag()]
        while self.maybe_space():
            flags.append(self.flag())
        return flags

    def sequence_set(self) -> SequenceSet:
        """A sequence set, or (RFC 5182 seq-last-command) "$" where the session allows it."""
        if self.saved_result is not None and self.upcoming(1) == b"$" \
                and self._text[self.pos + 1:self.pos + 2] in (b"", b" ", b")"):
            self.pos += 1
            return saved_set(self.saved_result())
        return parse_sequence_set(self._match(_SEQ, "a sequence set"))

    def date_time(self) -> bytes:
        """A quoted date-time (APPEND): returned as its text."""
        s = self.string()
        return bytes(s)

    def generic(self, depth: int = 0) -> object:
        """Any argument: atom (bytes), string (Quoted), or nested list (list)."""
        if depth > MAX_NESTING:
            raise BadCommand("nesting too deep")
        c = self.peek()
        if c == b"(":
            return self.paren_list(lambda a: a.generic(depth + 1))
        if c in (b'"', b"{"):
            return self.string()
        return self._match(_ASTRING_ATOM, "an argument")
