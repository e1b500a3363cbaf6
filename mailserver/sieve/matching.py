"""Comparators (RFC 4790 via RFC 5228 2.7.3), match types (RFC 5228 2.7.1) and the
relational ones (RFC 5231).  Twisted-free.

:matches is a segment matcher, not a regular expression built from the pattern: the
pattern is cut at its "*"s; the first piece must match at the start, the last at the
end, every middle piece is found leftmost in between (each "*" takes as little as it
can, the last one the rest, as Pigeonhole does).  A piece is found with str.find, or
with a quantifier-free regular expression when it holds "?", so the cost is at most
the text's length times the pattern's, with no backtracking across pieces; and that
search runs a window at a time, calling back between windows, so the caller's CPU time
limit interrupts even a huge pattern on a huge text.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ASCII_LOWER = str.maketrans(_UPPER, _UPPER.lower())


def ascii_lower(s: str) -> str:
    """i;ascii-casemap folds A-Z only (RFC 4790 9.2), not the rest of Unicode."""
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


def _octet(s: str) -> str:
    return s


def fold_for(comparator: str) -> Callable[[str], str]:
    return ascii_lower if comparator == "i;ascii-casemap" else _octet


# -- i;ascii-numeric (RFC 4790 9.1)

_DIGITS = re.compile(r"[0-9]*")


def numeric_key(s: str) -> int | None:
    """The value of the leading digits; None (positive infinity) when there are none."""
    digits = _DIGITS.match(s).group()
    return int(digits) if digits else None


def numeric_cmp(a: str, b: str) -> int:
    ka, kb = numeric_key(a), numeric_key(b)
    if ka is None or kb is None:
        return (ka is None) - (kb is None)
    return (ka > kb) - (ka < kb)


def ordered_cmp(comparator: str, a: str, b: str) -> int:
    """-1, 0, 1 under the comparator's ordering (i;octet: UTF-8 octet order, which is the
    code point order of str)."""
    if comparator == "i;ascii-numeric":
        return numeric_cmp(a, b)
    if comparator == "i;ascii-casemap":
        a, b = ascii_lower(a), ascii_lower(b)
    return (a > b) - (a < b)


_REL = {
    "gt": lambda c: c > 0, "ge": lambda c: c >= 0, "lt": lambda c: c < 0,
    "le": lambda c: c <= 0, "eq": lambda c: c == 0, "ne": lambda c: c != 0,
}


def relational(op: str) -> Callable[[int], bool]:
    return _REL[op]


# -- :matches


class Glob:
    """A compiled :matches pattern (RFC 5228 2.7.1: "*", "?", and "\\" quoting the next
    character).  `pattern` is already folded by the comparator."""

    __slots__ = ("pieces", "stars", "exact", "slots")

    def __init__(self, pattern: str) -> None:
        pieces: list[list[tuple[bool, str]]] = [[]]     # per piece: (is "?", literal text)
        i, n = 0, len(pattern)
        lit: list[str] = []
        cur = pieces[0]

        def flush() -> None:
            if lit:
                cur.append((False, "".join(lit)))
                lit.clear()

        while i < n:
            c = pattern[i]
            if c == "\\" and i + 1 < n:
                lit.append(pattern[i + 1])
                i += 2
                continue
            if c == "*":
                flush()
                cur = []
                pieces.append(cur)
            elif c == "?":
                flush()
                cur.append((True, ""))
            else:
                lit.append(c)
            i += 1
        flush()
        self.pieces = [_Piece(p) for p in pieces]
        self.stars = len(pieces) - 1
        self.exact = self.stars == 0
        # the order of wildcards in the pattern, for match variables: ("*", k) or ("?", piece, j)
        self.slots: list[tuple] = []
        for k, piece in enumerate(self.pieces):
            if k:
                self.slots.append(("*", k - 1))
            for j in range(piece.qcount):
                self.slots.append(("?", k, j))

    def match(self, text: str, orig: str | None = None,
              check: Callable[[], None] | None = None) -> list[str] | None:
        """None, or the match variables: [whole, wildcard 1, wildcard 2, ...].  `check`
        is called between windows of a long search (it may raise to give up)."""
        pieces = self.pieces
        n = len(text)
        first = pieces[0]
        if self.exact:
            if first.length != n:
                return None
            q = first.match_at(text, 0)
            if q is None:
                return None
            return self._vars(orig if orig is not None else text, [], [q])
        last = pieces[-1]
        limit = n - last.length
        if first.length > limit:
            return None
        q0 = first.match_at(text, 0)
        if q0 is None:
            return None
        pos = first.length
        spans: list[tuple[int, int]] = []
        qs = [q0]
        for piece in pieces[1:-1]:
            found = piece.find(text, pos, limit, check)
            if found is None:
                return None
            start, q = found
            spans.append((pos, start))
            qs.append(q)
            pos = start + piece.length
        ql = last.match_at(text, limit)
        if ql is None:
            return None
        spans.append((pos, limit))
        qs.append(ql)
        return self._vars(orig if orig is not None else text, spans, qs)

    def _vars(self, text: str, spans: list[tuple[int, int]], qs: list[list[int]]) -> list[str]:
        out = [text]
        for slot in self.slots:
            if slot[0] == "*":
                a, b = spans[slot[1]]
                out.append(text[a:b])
            else:
                p = qs[slot[1]][slot[2]]
                out.append(text[p:p + 1])
        return out


_WINDOW_STEPS = 1 << 20


class _Piece:
    """A run of literals and "?" between two "*"."""

    __slots__ = ("items", "length", "qcount", "regex", "literal")

    def __init__(self, items: list[tuple[bool, str]]) -> None:
        self.items = items
        self.length = sum(1 if q else len(t) for q, t in items)
        self.qcount = sum(1 for q, _ in items if q)
        if self.qcount:
            self.literal = None
            self.regex = re.compile("".join("(.)" if q else re.escape(t) for q, t in items), re.S)
        else:
            self.literal = "".join(t for _, t in items)
            self.regex = None

    def match_at(self, text: str, pos: int) -> list[int] | None:
        """Positions of the "?"s when the piece matches text[pos:pos+length]."""
        if self.regex is None:
            return [] if text.startswith(self.literal, pos) else None
        m = self.regex.match(text, pos, pos + self.length)
        return None if m is None else [m.start(g) for g in range(1, self.qcount + 1)]

    def find(self, text: str, pos: int, end: int,
             check: Callable[[], None] | None = None) -> tuple[int, list[int]] | None:
        if self.regex is None:
            i = text.find(self.literal, pos, end)
            return None if i < 0 else (i, [])
        # windows of about _WINDOW_STEPS steps (start positions times piece length)
        step = max(64, _WINDOW_STEPS // max(1, self.length))
        while pos < end:
            stop = min(end, pos + step + self.length)
            m = self.regex.search(text, pos, stop)
            if m is not None:
                return m.start(), [m.start(g) for g in range(1, self.qcount + 1)]
            pos += step
            if check is not None and pos < end:
                check()
        return None


def quote_wildcards(s: str) -> str:
    """RFC 5229 4.1.2 :quotewildcard."""
    return s.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


# Comparisons (each weighted by its value's length in KiB, plus one) between two looks at
# the CPU time limit: one test of thousands of keys against thousands of values (or
# megabytes of body) must not run unchecked for seconds, in the reactor at that.
CHECK_EVERY = 512


def work_of(values: Sequence[str], keys: Sequence[Any]) -> int:
    """The weighted comparisons of testing every value against every key."""
    return len(keys) * (len(values) + sum(len(v) for v in values) // 1024)


def _checked_contains(values: Sequence[str], keys: Sequence[str],
                      check: Callable[[], None]) -> bool:
    """Any key in any value, looking at the time limit every CHECK_EVERY of work."""
    work = 0
    for v in values:
        weight = 1 + len(v) // 1024
        step = max(1, CHECK_EVERY // weight)
        for start in range(0, len(keys), step):
            for k in keys[start:start + step]:
                if k in v:
                    return True
            work += weight * step
            if work >= CHECK_EVERY:
                work = 0
                check()
    return False


class Matcher:
    """One (comparator, match type) applied to values and keys (RFC 5228 2.7).

    `test(values, keys)` is true when any value matches any key, values outermost; a
    :matches success answers the match variables (RFC 5229 3.2) instead of True.
    Shared by concurrent evaluations, so it keeps no per-evaluation state."""

    __slots__ = ("comparator", "kind", "op", "fold", "_globs")

    def __init__(self, comparator: str, kind: str, op: str | None) -> None:
        self.comparator = comparator
        self.kind = kind                  # is, contains, matches, value, count
        self.op = relational(op) if op else None
        self.fold = fold_for(comparator)
        self._globs: dict[str, Glob] = {}

    def glob(self, key: str) -> Glob:
        g = self._globs.get(key)
        if g is None:
            if len(self._globs) > 256:
                self._globs.clear()
            g = self._globs[key] = Glob(self.fold(key))
        return g

    def prepare(self, keys: Sequence[str]) -> list:
        """Keys folded (and compiled for :matches) once."""
        if self.kind == "matches":
            return [self.glob(k) for k in keys]
        if self.kind in ("is", "contains") and self.comparator != "i;ascii-numeric":
            return [self.fold(k) for k in keys]
        return list(keys)

    def fast(self, prepared: list) -> Callable[[Sequence[str], Sequence[str]], bool] | None:
        """For constant keys under :is / :contains with i;octet or i;ascii-casemap: a
        function of (values, folded values) doing just the comparison; None otherwise."""
        if self.comparator == "i;ascii-numeric" or self.kind not in ("is", "contains"):
            return None
        keys = tuple(prepared)
        use_folded = self.comparator == "i;ascii-casemap"
        if self.kind == "is":
            wanted = frozenset(keys)

            def is_(values: Sequence[str], folded: Sequence[str],
                    check: Callable[[], None] | None = None) -> bool:
                for v in (folded if use_folded else values):
                    if v in wanted:
                        return True
                return False
            return is_

        def contains(values: Sequence[str], folded: Sequence[str],
                     check: Callable[[], None] | None = None) -> bool:
            vs = folded if use_folded else values
            if check is not None and work_of(vs, keys) > CHECK_EVERY:
                return _checked_contains(vs, keys, check)
            for v in vs:
                for k in keys:
                    if k in v:
                        return True
            return False
        return contains

    def test(self, values: Sequence[str], keys: Sequence[str], prepared: list | None = None,
             folded: Sequence[str] | None = None,
             check: Callable[[], None] | None = None) -> bool | list[str]:
        """`folded`: the values already passed through ascii_lower, when the caller has
        them cached (used only under i;ascii-casemap); `check`: called now and then
        during a long :matches search (the caller's CPU time limit)."""
        kind = self.kind
        if kind == "count":
            count = str(len(values))
            return any(self.op(ordered_cmp(self.comparator, count, k)) for k in keys)
        if prepared is None:
            prepared = self.prepare(keys)
        if self.comparator == "i;octet":
            folded = values
        elif folded is None or self.comparator != "i;ascii-casemap":
            folded = [ascii_lower(v) for v in values] if self.comparator == "i;ascii-casemap" else values
        if check is not None and work_of(folded, prepared) > CHECK_EVERY:
            return self._checked_test(values, folded, prepared, check)
        if kind == "contains":
            for fv in folded:
                for k in prepared:
                    if k in fv:
                        return True
            return False
        if kind == "is":
            if self.comparator == "i;ascii-numeric":
                return any(numeric_cmp(v, k) == 0 for v in values for k in prepared)
            for fv in folded:
                if fv in prepared:
                    return True
            return False
        if kind == "matches":
            for v, fv in zip(values, folded):
                for g in prepared:
                    groups = g.match(fv, v, check)
                    if groups is not None:
                        return groups
            return False
        # :value
        op, cmp = self.op, self.comparator
        return any(op(ordered_cmp(cmp, v, k)) for v in values for k in prepared)

    def _checked_test(self, values: Sequence[str], folded: Sequence[str], prepared: list,
                      check: Callable[[], None]) -> bool | list[str]:
        """test() for much work: the same answers, with `check` called every CHECK_EVERY
        of it (it raises when the script's time is up)."""
        kind = self.kind
        if kind == "contains":
            return _checked_contains(folded, prepared, check)
        if kind == "is" and self.comparator != "i;ascii-numeric":
            wanted = set(prepared)   # string equality, as the list's: one lookup a value
            return any(fv in wanted for fv in folded)
        op, cmp = self.op, self.comparator
        work = 0
        for v, fv in zip(values, folded):
            weight = 1 + len(fv) // 1024
            for k in prepared:
                work += weight
                if work >= CHECK_EVERY:
                    work = 0
                    check()
                if kind == "matches":
                    groups = k.match(fv, v, check)
                    if groups is not None:
                        return groups
                elif kind == "is":
                    if numeric_cmp(v, k) == 0:
                        return True
                elif op(ordered_cmp(cmp, v, k)):
                    return True
        return False
