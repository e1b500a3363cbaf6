"""DNS for the inbound checks: twisted.names lookups with a cache that honours TTLs.

Every check (SPF, DKIM keys, DMARC, ARC, blocklists) asks through one `CachingResolver`,
which never fails its Deferred: an answer is an `Answer` whose status says what DNS said
("ok", "nxdomain", "nodata") or that it said nothing usable ("error": a timeout,
SERVFAIL, REFUSED, a garbled reply), which the RFCs turn into temperror.

Positive answers are kept for their smallest TTL (capped), "no such name/data" for
NEGATIVE_TTL (RFC 2308 would use the SOA minimum, which twisted.names does not hand
us), errors not at all.  Concurrent lookups of the same name share one query.
"""

from __future__ import annotations

import abc
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error

log = Logger()

LOOKUP_TIMEOUT = (1, 2)   # seconds per try; 3 s in all, then status "error"
MAX_TTL = 3600            # a record is kept at most this long
NEGATIVE_TTL = 300        # NXDOMAIN / NODATA kept this long
MAX_ENTRIES = 20000       # cached answers (oldest dropped first)
MAX_TXT_BYTES = 65535     # one TXT record's strings joined; longer is treated as garbage

dns.DNSDatagramProtocol.noisy = False

_TYPES = {"TXT": dns.TXT, "A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "PTR": dns.PTR}


@dataclass(frozen=True)
class Answer:
    """What DNS said for one (name, type).

    records: TXT -> tuple of bytes (each record's strings joined, RFC 7208 3.3);
    A/AAAA -> tuple of address strings; MX -> tuple of (preference, host) with the host
    lower-case without the final dot ("" for a null MX); PTR -> tuple of host names.
    """

    status: str            # "ok" | "nxdomain" | "nodata" | "error"
    records: tuple = ()
    detail: str = ""       # for logs: why "error"

    @property
    def void(self) -> bool:
        """No such name, or no records of the type (an SPF "void lookup", RFC 7208 4.6.4)."""
        return self.status in ("nxdomain", "nodata")

    @property
    def error(self) -> bool:
        return self.status == "error"


def _payload_value(rtype: int, payload: Any) -> Any:
    if rtype == dns.TXT:
        value = b"".join(s if isinstance(s, bytes) else s.encode() for s in payload.data)
        if len(value) > MAX_TXT_BYTES:
            raise ValueError("TXT record too long")
        return value
    if rtype == dns.A:
        return payload.dottedQuad()
    if rtype == dns.AAAA:
        return str(ipaddress.IPv6Address(payload.address))
    if rtype == dns.MX:
        return (int(payload.preference), str(payload.name).rstrip(".").lower())
    if rtype == dns.PTR:
        return str(payload.name).rstrip(".").lower()
    raise ValueError(f"unexpected type {rtype}")


def answer_from_records(rtype: int, name: str, answers: list[Any]) -> tuple[Answer, int]:
    """(Answer, ttl) from twisted.names RRHeaders; only records of `rtype` count (a CNAME
    chain's own records are skipped)."""
    values = []
    ttl = MAX_TTL
    for rr in answers:
        if rr.type != rtype:
            continue
        try:
            values.append(_payload_value(rtype, rr.payload))
        except (ValueError, AttributeError, UnicodeError) as e:
            return Answer("error", detail=f"garbled {dns.QUERY_TYPES.get(rtype)} "
                                          f"record for {name}: {e}"), 0
        ttl = min(ttl, max(int(rr.ttl), 0))
    if not values:
        return Answer("nodata"), NEGATIVE_TTL
    return Answer("ok", tuple(values)), ttl


def describe_failure(e: BaseException) -> str:
    if isinstance(e, (error.DNSQueryTimeoutError, defer.TimeoutError)):
        return "timeout"
    if isinstance(e, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(e, error.DNSQueryRefusedError):
        return "query refused"
    return type(e).__name__


class Lookups(abc.ABC):
    """The per-type shorthands of a resolver with `lookup(name, type)`."""

    @abc.abstractmethod
    def lookup(self, name: str, rtype_name: str) -> defer.Deferred:
        """Deferred[Answer] for `name` and "TXT", "A", "AAAA", "MX" or "PTR"."""

    def txt(self, name: str) -> defer.Deferred:
        return self.lookup(name, "TXT")

    def a(self, name: str) -> defer.Deferred:
        return self.lookup(name, "A")

    def aaaa(self, name: str) -> defer.Deferred:
        return self.lookup(name, "AAAA")

    def mx(self, name: str) -> defer.Deferred:
        return self.lookup(name, "MX")

    def ptr(self, name: str) -> defer.Deferred:
        return self.lookup(name, "PTR")


class CachingResolver(Lookups):
    """Cached TXT/A/AAAA/MX/PTR lookups over a twisted.names resolver (IResolver)."""

    def __init__(self, resolver: Any, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES,
                 timeout: tuple[int, ...] = LOOKUP_TIMEOUT) -> None:
        self.resolver = resolver
        self.clock = clock
        self.max_entries = max_entries
        self.timeout = timeout
        self._cache: OrderedDict[tuple[str, int], tuple[float, Answer]] = OrderedDict()
        self._pending: dict[tuple[str, int], list[defer.Deferred]] = {}
        self.queries = 0  # queries sent (for tests and stats)

    def lookup(self, name: str, rtype_name: str) -> defer.Deferred:
        """Deferred[Answer]; never fails."""
        rtype = _TYPES[rtype_name]
        name = name.rstrip(".").lower()
        if not name or len(name) > 253 or any(len(label) > 63 or not label
                                              for label in name.split(".")):
            return defer.succeed(Answer("nxdomain", detail="not a domain name"))
        key = (name, rtype)
        cached = self._cache.get(key)
        if cached is not None:
            expires, answer = cached
            if expires > self.clock():
                return defer.succeed(answer)
            del self._cache[key]
        d: defer.Deferred = defer.Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[key] = [d]
        self.queries += 1
        try:
            query = self.resolver.query(dns.Query(name, rtype, dns.IN), self.timeout)
        except Exception as e:  # a resolver that fails at once
            query = defer.fail(e)
        query.addCallbacks(self._answered, self._failed, callbackArgs=(key,),
                           errbackArgs=(key,))
        return d

    def current(self, name: str, rtype_name: str) -> Answer | None:
        """The cached answer still in force for (name, type), else None (no query)."""
        cached = self._cache.get((name.rstrip(".").lower(), _TYPES[rtype_name]))
        if cached is None or cached[0] <= self.clock():
            return None
        return cached[1]

    def _answered(self, result: Any, key: tuple[str, int]) -> None:
        name, rtype = key
        try:
            answers = result[0]
            answer, ttl = answer_from_records(rtype, name, answers)
        except Exception as e:
            answer, ttl = Answer("error", detail=f"garbled answer: {e}"), 0
        self._settle(key, answer, ttl)

    def _failed(self, failure: Any, key: tuple[str, int]) -> None:
        if failure.check(error.DNSNameError):
            self._settle(key, Answer("nxdomain"), NEGATIVE_TTL)
            return
        detail = describe_failure(failure.value)
        log.info("DNS {type} {name}: {detail}", type=dns.QUERY_TYPES.get(key[1]), name=key[0],
                 detail=detail)
        self._settle(key, Answer("error", detail=detail), 0)

    def _settle(self, key: tuple[str, int], answer: Answer, ttl: int) -> None:
        if ttl > 0 and answer.status != "error":
            self._cache[key] = (self.clock() + min(ttl, MAX_TTL), answer)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        for d in self._pending.pop(key, []):
            d.callback(answer)


class StaticResolver(Lookups):
    """The same interface over a fixed table: {(name, "TXT"): Answer}; unknown names are
    NXDOMAIN.  For unit tests of the checks and for `mailserver-admin` dry runs."""

    def __init__(self, table: dict[tuple[str, str], Answer]) -> None:
        self.table = {(n.rstrip(".").lower(), t): a for (n, t), a in table.items()}
        self.asked: list[tuple[str, str]] = []

    def lookup(self, name: str, rtype_name: str) -> defer.Deferred:
        name = name.rstrip(".").lower()
        self.asked.append((name, rtype_name))
        answer = self.table.get((name, rtype_name))
        if answer is None:
            known = any(n == name for n, _ in self.table)
            answer = Answer("nodata" if known else "nxdomain")
        return defer.succeed(answer)

    def current(self, name: str, rtype_name: str) -> Answer | None:
        """The table's answer (what lookup() would give, as the same object)."""
        name = name.rstrip(".").lower()
        answer = self.table.get((name, rtype_name))
        if answer is not None:
            self.asked.append((name, rtype_name))
        return answer

