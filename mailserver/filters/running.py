"""Running the configured delivery filters on one message and merging their answers.

A filter can only add to what happens to a message, never lose it: whatever goes wrong
in a plugin (an exception, a failed Deferred, a result that is not a FilterDecision, no
answer within [filters] timeout) is logged, naming the plugin and the queue id, and the
message is delivered as if that plugin were absent.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailserver.filters.api import ACCEPT, DeliveryFacts, FilterDecision, IDeliveryFilter
from mailserver.filters.decisions import MAX_HEADERS, checked

log = Logger()


def run_filters(filters: Sequence[IDeliveryFilter], facts: DeliveryFacts, timeout: float,
                clock: IReactorTime | None = None) -> defer.Deferred[FilterDecision]:
    """The filters' merged decision for `facts`; never fails.

    They run one after the other in the configured order, each given at most `timeout`
    seconds.  The first reject or defer wins and the rest do not run; otherwise the
    header fields of all accumulate (in order, at most MAX_HEADERS) and the last folder
    given wins.
    """
    if clock is None:
        from twisted.internet import reactor as clock   # type: ignore[assignment]
    d = defer.Deferred.fromCoroutine(_chain(filters, facts, timeout, clock))

    def unexpected(failure: Failure) -> FilterDecision:
        log.failure("delivery filters of {queue_id}: unexpected error; delivered unfiltered",
                    failure, queue_id=facts.queue_id)
        return FilterDecision()

    return d.addErrback(unexpected)


async def _chain(filters: Sequence[IDeliveryFilter], facts: DeliveryFacts, timeout: float,
                 clock: IReactorTime) -> FilterDecision:
    headers: list[tuple[str, str]] = []
    folder: str | None = None
    for plugin in filters:
        decision = await _guarded(plugin, facts, timeout, clock, MAX_HEADERS - len(headers))
        if decision is None:
            continue
        if decision.action != ACCEPT:
            log.info("delivery filter {plugin}: {action} {queue_id}: {reply}",
                     plugin=_name(plugin), action=decision.action,
                     queue_id=facts.queue_id, reply=decision.reply)
            return decision
        headers.extend(decision.add_headers)
        if decision.folder is not None:
            folder = decision.folder
    return FilterDecision(ACCEPT, "", tuple(headers), folder)


def _guarded(plugin: IDeliveryFilter, facts: DeliveryFacts, timeout: float,
             clock: IReactorTime, room: int) -> defer.Deferred[FilterDecision | None]:
    """One plugin's checked decision, or None (logged) when it has none to give."""
    name = _name(plugin)
    # The plugin races the clock; the first to end decides.  (Deferred.addTimeout ends
    # the wait by cancelling, which a plugin may refuse: one that caught the
    # cancellation and went on answered after 25 s, one whose canceller raised held
    # the session for ever.)
    d: defer.Deferred[Any] = defer.Deferred()

    def timed_out() -> None:
        d.errback(defer.TimeoutError())
        try:
            result.cancel()   # a courtesy: its answer is not waited for any more
        except Exception:
            log.failure("delivery filter {plugin}: cancelling it failed", plugin=name)

    def arrived(value: Any) -> None:
        if d.called:
            if not isinstance(value, Failure):
                log.info("delivery filter {plugin} answered {queue_id} after the timeout; "
                         "not used", plugin=name, queue_id=facts.queue_id)
            elif not value.check(defer.CancelledError):
                log.failure("delivery filter {plugin} failed on {queue_id} after the "
                            "timeout", value, LogLevel.warn, plugin=name,
                            queue_id=facts.queue_id)
            return None
        timer.cancel()
        if isinstance(value, Failure):
            d.errback(value)
        else:
            d.callback(value)
        return None

    timer = clock.callLater(timeout, timed_out)
    result = defer.maybeDeferred(lambda: plugin.filter(facts))
    result.addBoth(arrived)

    def check(result: Any) -> FilterDecision | None:
        decision, problems = checked(result, room)
        for problem in problems:
            log.warn("delivery filter {plugin} on {queue_id}: {problem}",
                     plugin=name, queue_id=facts.queue_id, problem=problem)
        return decision

    def failed(failure: Failure) -> None:
        if failure.check(defer.TimeoutError):
            log.warn("delivery filter {plugin} gave no answer for {queue_id} within "
                     "{timeout:g}s; delivered as if it were absent",
                     plugin=name, queue_id=facts.queue_id, timeout=timeout)
        else:
            log.failure("delivery filter {plugin} failed on {queue_id}; delivered as if "
                        "it were absent", failure, LogLevel.error, plugin=name,
                        queue_id=facts.queue_id)
        return None

    return d.addCallbacks(check, failed)


def _name(plugin: IDeliveryFilter) -> str:
    name = getattr(plugin, "name", None)
    return name if isinstance(name, str) else repr(plugin)
