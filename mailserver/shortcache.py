"""Memoizing pure functions of header values and DNS records, for short arguments only.

The inbound checks parse the same few From values, DKIM tags and key records message
after message, so their parses are remembered.  But those values come from senders: an
``lru_cache`` counts entries, not bytes, and a thousand messages with 200 KB From fields
would keep 200 MB alive.  Arguments longer than ``longest`` characters are computed
every time and never kept, which bounds a cache to about ``maxsize * longest`` bytes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

__all__ = ["cache_short"]

F = TypeVar("F", bound=Callable[..., Any])


def _length(value: object) -> int:
    """The characters a cache key made of `value` holds: strings and bytes by length,
    tuples by the sum of their items, anything else (None, bool, int) as nothing."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, tuple):
        total = 0
        for item in value:
            total += _length(item)
        return total
    return 0


def cache_short(maxsize: int, longest: int = 1024) -> Callable[[F], F]:
    """`functools.lru_cache(maxsize)` for calls whose arguments hold at most `longest`
    characters together; longer calls run uncached.  The wrapper keeps `cache_info` and
    `cache_clear`."""

    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            total = 0
            for arg in args:
                total += _length(arg)
            return cached(*args) if total <= longest else fn(*args)

        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate
