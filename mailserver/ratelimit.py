"""Per-key event counting over a sliding window: messages per hour per submitting user."""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.interfaces import IReactorTime


class SlidingWindowCounter:
    """At most `limit` events per key within `window` seconds; limit 0 means no limit.

    Each key keeps at most `limit` timestamps and the table at most `max_keys` keys
    (least recently used dropped), so memory stays bounded whatever the callers do.
    """

    def __init__(self, limit: int, window: float, clock: IReactorTime | None = None,
                 max_keys: int = 100_000) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, key: str) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        cutoff = self.clock.seconds() - self.window
        while events and events[0] <= cutoff:
            events.popleft()
        return len(events)

    def allowed(self, key: str) -> bool:
        return self.limit == 0 or self.count(key) < self.limit

    def record(self, key: str) -> None:
        if self.limit == 0:
            return
        events = self._events.get(key)
        if events is None:
            while len(self._events) >= self.max_keys:
                self._events.popitem(last=False)
            events = self._events[key] = deque(maxlen=self.limit)
        else:
            self._events.move_to_end(key)
        events.append(self.clock.seconds())
