"""DNS blocklists (RFC 5782): is the client's address listed in any configured zone?

Asked once per connection; the session refuses the client's RCPTs (554 5.7.1 naming the
list) instead of dropping it before the banner, so a wrongly listed sender sees why.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

_LISTED = ipaddress.ip_network("127.0.0.0/8")
# Answers that say "not a listing": 127.0.0.1 is never one (RFC 5782 5), and the
# 127.255.255.0/24 block is what large lists answer to resolvers they refuse.
_NOT_LISTINGS = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("127.255.255.0/24"))


@dataclass(frozen=True)
class Listing:
    zone: str
    answer: str    # the 127.0.0.x code the list gave


def query_name(ip: str, zone: str) -> str:
    """RFC 5782 2.1 / 2.4: the address's octets (IPv4) or nibbles (IPv6) reversed, then
    the zone; an IPv4-mapped IPv6 address is asked as IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        labels = str(addr).split(".")
    else:
        labels = list(addr.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone


def interpret(answers: tuple[str, ...]) -> str | None:
    """The listing code among A answers, or None when none of them is one."""
    for value in answers:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            continue
        if addr in _LISTED and not any(addr in n for n in _NOT_LISTINGS):
            return value
    return None


@defer.inlineCallbacks
def check(resolver, ip: str, zones: tuple[str, ...]):
    """Deferred[Listing | None]: the first zone (in order) that lists `ip`.  A list that
    does not answer, or answers nonsense, does not list anyone (logged)."""
    try:
        names = [(zone, query_name(ip, zone)) for zone in zones]
    except ValueError:
        return None
    answers = yield defer.gatherResults([resolver.a(name) for _, name in names])
    for (zone, name), answer in zip(names, answers):
        if answer.error:
            log.info("DNSBL {zone}: no answer for {ip}: {detail}", zone=zone, ip=ip,
                     detail=answer.detail)
            continue
        if answer.status != "ok":
            continue
        code = interpret(answer.records)
        if code is None:
            log.warn("DNSBL {zone}: answer {answer} for {ip} is not a listing code; ignored",
                     zone=zone, answer=",".join(answer.records), ip=ip)
            continue
        return Listing(zone, code)
    return None
