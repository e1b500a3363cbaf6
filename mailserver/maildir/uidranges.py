"""Uid ranges: (first, last) pairs as QRESYNC's VANISHED and known-uids data carry them.

Pure functions over ascending uids (disk side: no Twisted), used by the folder and IMAP.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Sequence

NO_UID = 2 ** 64  # above every uid: bisects past all (value, uid) entries of a value


def has(sorted_uids: Sequence[int], uid: int) -> bool:
    """Whether `uid` is in the ascending `sorted_uids` (a bisection)."""
    i = bisect.bisect_left(sorted_uids, uid)
    return i < len(sorted_uids) and sorted_uids[i] == uid


def gaps(sorted_uids: Sequence[int], first: int, last: int) -> list[tuple[int, int]]:
    """The ranges of [first, last] holding none of `sorted_uids`."""
    out: list[tuple[int, int]] = []
    nxt = first
    for u in sorted_uids[bisect.bisect_left(sorted_uids, first):]:
        if u > last:
            break
        if u > nxt:
            out.append((nxt, u - 1))
        nxt = u + 1
    if nxt <= last:
        out.append((nxt, last))
    return out


def uid_ranges(uids: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending uids as (first, last) runs."""
    out: list[tuple[int, int]] = []
    for u in uids:
        if out and u == out[-1][1] + 1:
            out[-1] = (out[-1][0], u)
        else:
            out.append((u, u))
    return out


def normalize_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(first, last) pairs, either way round, overlapping or not, as ascending disjoint
    ranges."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((min(a, b), max(a, b)) for a, b in ranges):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def intersect_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The intersection of two lists of ascending disjoint ranges."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out
