"""Runs of if-commands evaluated together: most scripts are long lists of rules that each
compare fixed keys with a header, an address or the body ("if header :contains "subject"
"x" { fileinto "X"; stop; }"), and a message matches few of them, if any.  Tried one by
one, every rule costs a few calls however little it compares.

Such a run is compiled once into tables: per source of values (the same header names,
address part and index, or the same body transform) the :is keys in a dict from key to
the rules naming it, the :contains keys in rule order.  At run time each source's values
are got once (through the same caches as the single tests) and looked up, and the first
rule whose test holds (RFC 5228 3.1: in order, the first true branch of an if/elsif
chain, else the else) runs its block; then the search goes on after its if-command,
looking at the values again, since a block may have edited the header.

The tests taken are exactly those whose outcome depends only on the message as the
script sees it at that moment and that set no match variables: header, address and body
under :is or :contains, with constant names and keys, comparator i;octet or
i;ascii-casemap (`Probe`).  Looking a source up before its rule's turn changes nothing
then.  Twisted-free.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mailserver.sieve.matching import ascii_lower

__all__ = ["Probe", "fuse", "MIN_TESTS"]

MIN_TESTS = 2          # fewer tests in a run: the plain if-commands are as fast
PIECE = 32             # :contains keys tried between two looks at the CPU time


@dataclass(frozen=True)
class Probe:
    """What a fusible test compares: `values(frame, run)` gives (values, the values under
    i;ascii-casemap or None when not at hand); `source` names those values (equal
    sources, equal values); `keys` are already folded when `casemap`."""

    source: tuple
    values: Callable[[Any, Any], tuple[Sequence[str], Sequence[str] | None]]
    kind: str                       # "is" or "contains"
    casemap: bool                   # i;ascii-casemap, else i;octet
    keys: tuple[str, ...]


class _Source:
    """The rules of a run that look at one source of values."""

    __slots__ = ("values", "indices", "is_tables", "contains", "folds")

    def __init__(self, values: Callable) -> None:
        self.values = values
        self.indices: list[int] = []
        self.is_tables: dict[bool, dict[str, list[int]]] = {}
        self.contains: dict[bool, list[tuple[int, tuple[str, ...]]]] = {}
        self.folds = False

    def add(self, index: int, probe: Probe) -> None:
        self.indices.append(index)
        self.folds = self.folds or probe.casemap
        if probe.kind == "is":
            table = self.is_tables.setdefault(probe.casemap, {})
            for key in probe.keys:
                hits = table.setdefault(key, [])
                if not hits or hits[-1] != index:
                    hits.append(index)
        else:
            self.contains.setdefault(probe.casemap, []).append((index, probe.keys))

    def frozen(self) -> tuple:
        is_tables = tuple((casemap, {k: tuple(v) for k, v in table.items()})
                          for casemap, table in self.is_tables.items())
        # every key of the :contains rules too, in pieces: one pass over them says when
        # none can hold
        contains = tuple((casemap, tuple(rules), _pieces(tuple(dict.fromkeys(
            k for _, keys in rules for k in keys)))) for casemap, rules in self.contains.items())
        return (self.values, tuple(self.indices), is_tables, contains, self.folds)


def _pieces(keys: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple(keys[i:i + PIECE] for i in range(0, len(keys), PIECE))


def _contained(rules: tuple[tuple[int, tuple[str, ...]], ...],
               pieces: tuple[tuple[str, ...], ...], values: Sequence[str], start: int,
               best: int, run: Any) -> int:
    """The first rule at or after `start` (and before `best`) a key of which is in one
    of the values; else `best`.  The keys are tried a piece at a time, each key counted
    as a command for the CPU time limit (a value can be a whole body)."""
    for v in values:
        for piece in pieces:
            run.spend(len(piece))
            if any(map(v.__contains__, piece)):
                return _first_contained(rules, values, start, best, run)
    return best


def _first_contained(rules: tuple[tuple[int, tuple[str, ...]], ...], values: Sequence[str],
                     start: int, best: int, run: Any) -> int:
    for index, keys in rules:
        if index < start:
            continue
        if index >= best:
            return best
        run.spend(len(keys))
        for v in values:
            for k in keys:
                if k in v:
                    return index
    return best


def fuse(statements: Sequence[Sequence[tuple[Probe | None, tuple]]],
         run_block: Callable[[tuple, Any, Any], None]) -> Callable[[Any, Any], None]:
    """One command for consecutive if-commands, each given as its branches (probe, block)
    with probe None for an else; every test a Probe."""
    blocks: list[tuple] = []
    after: list[int] = []               # where the search goes on after a branch ran
    always: list[int] = []              # else branches
    sources: dict[tuple, _Source] = {}
    for branches in statements:
        first = len(blocks)
        for probe, block in branches:
            index = len(blocks)
            blocks.append(block)
            if probe is None:
                always.append(index)
            else:
                sources.setdefault(probe.source, _Source(probe.values)).add(index, probe)
        after.extend([first + len(branches)] * len(branches))
    count = len(blocks)
    # sources in the order their first rule comes: the later ones are often not needed
    order = tuple(s.frozen() for s in sorted(sources.values(), key=lambda s: s.indices[0]))
    elses = tuple(always)
    block_of = tuple(blocks)
    after_of = tuple(after)

    def first_true(start: int, frame: Any, run: Any) -> int:
        best = count
        for index in elses:
            if index >= start:
                best = index
                break
        for values_of, indices, is_tables, contains, folds in order:
            k = bisect_left(indices, start)
            if k == len(indices) or indices[k] >= best:
                continue
            values, folded = values_of(frame, run)
            if not values:
                continue
            if folds and folded is None:
                folded = [ascii_lower(v) for v in values]
            for casemap, table in is_tables:
                for v in (folded if casemap else values):
                    hits = table.get(v)
                    if hits is not None:
                        for index in hits:
                            if index >= start:
                                if index < best:
                                    best = index
                                break
            for casemap, rules, pieces in contains:
                best = _contained(rules, pieces, folded if casemap else values, start, best, run)
        return best

    def rules(frame: Any, run: Any) -> None:        # RFC 5228 3.1, rule after rule
        start = 0
        while start < count:
            run.tick()
            index = first_true(start, frame, run)
            if index >= count:
                return
            run_block(block_of[index], frame, run)
            start = after_of[index]
    return rules
