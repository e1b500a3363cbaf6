"""Where mail for a domain goes: MX lookup with twisted.names (RFC 5321 5.1, RFC 7505).

MX records are used in order of preference (equal preferences shuffled, as 5.1 asks);
without MX records the domain itself is the one host (the implicit MX).  A null MX
("0 .", RFC 7505) and a domain that does not exist fail at once and permanently; a DNS
server that does not answer is a temporary failure, retried like an unreachable host.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.names import client, dns, error

from mailserver.addresses import HOST_NAME
from mailserver.inbound.dns import describe_failure
from mailserver.smtp.queue.attempt import AttemptResult


MAX_MX_HOSTS = 8       # hosts tried in one attempt; the rest of a long list waits
MAX_ADDRESSES = 4      # addresses per host
DNS_TIMEOUT = (1, 3, 11)  # seconds per try: 15 s in all, then a temporary failure

# One UDP port per query is normal for the DNS client; do not log each one.
dns.DNSDatagramProtocol.noisy = False


class RouteError(Exception):
    """No host to try: `result` applies to every recipient of the domain."""

    def __init__(self, result: AttemptResult) -> None:
        super().__init__(result.text)
        self.result = result


@dataclass(frozen=True)
class MXHost:
    preference: int
    name: str
    hint: tuple[str, ...] = ()  # addresses from the additional section


def make_resolver(address: tuple[str, int] | None) -> Any:
    """A twisted.names resolver: the configured server, or the system's (resolv.conf,
    /etc/hosts, with a cache)."""
    if address is None:
        return client.createResolver()
    return client.Resolver(servers=[address])


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@defer.inlineCallbacks
def mx_hosts(resolver: Any, domain: str):
    """The hosts to try for `domain`, best first; RouteError when there are none."""
    try:
        answers, _, additional = yield resolver.lookupMailExchange(domain, DNS_TIMEOUT)
    except error.DNSNameError:
        raise RouteError(AttemptResult.failed(
            f"domain {domain} does not exist (DNS NXDOMAIN)", "5.1.2")) from None
    except Exception as e:  # SERVFAIL, REFUSED, timeouts, a cancelled query...
        raise RouteError(AttemptResult.temporary(
            f"DNS lookup of MX {domain} failed: {describe_failure(e)}", "4.4.3")) from None
    records = [a for a in answers if a.type == dns.MX]
    if not records:
        # RFC 5321 5.1: no MX records, the domain itself is the implicit MX.
        return [MXHost(0, domain)]
    hosts = []
    for rr in records:
        exchange = str(rr.payload.name).rstrip(".").lower()
        hosts.append((rr.payload.preference, exchange))
    if any(not name for _, name in hosts):
        if len(hosts) == 1:  # RFC 7505 3: "0 ." alone means the domain accepts no mail
            raise RouteError(AttemptResult.failed(
                f"domain {domain} does not accept mail (null MX)", "5.1.10"))
        hosts = [h for h in hosts if h[1]]
    # RFC 5321 2.3.5: an MX names a host.  Anything else (a CR or LF, a space: DNS carries
    # any octet) is never connected to, nor written into a log line or a bounce.
    usable = [h for h in hosts if HOST_NAME.fullmatch(h[1])]
    if not usable:
        raise RouteError(AttemptResult.temporary(
            f"DNS lookup of MX {domain}: no usable host name in the answer", "4.4.3"))
    hosts = usable
    # Addresses the answer carries along, as host_addresses() would give them: IPv4
    # first, each once, at most MAX_ADDRESSES (a hundred would each get a connect timeout).
    hints: dict[str, list[str]] = {}
    for rr in sorted((rr for rr in additional if rr.type in (dns.A, dns.AAAA)),
                     key=lambda rr: rr.type != dns.A):
        hints.setdefault(str(rr.name).rstrip(".").lower(), []).append(
            rr.payload.dottedQuad() if rr.type == dns.A else _ipv6(rr.payload.address))
    random.shuffle(hosts)
    hosts.sort(key=lambda h: h[0])  # stable: equal preferences stay shuffled
    return [MXHost(pref, name, tuple(dict.fromkeys(hints.get(name, ())))[:MAX_ADDRESSES])
            for pref, name in hosts[:MAX_MX_HOSTS]]


@defer.inlineCallbacks
def host_addresses(resolver: Any, name: str):
    """IPv4 then IPv6 addresses of a host; [] if it has none, RouteError(temporary) when
    DNS does not answer for it."""
    if is_ip(name):
        return [name]
    results = yield defer.DeferredList(
        [resolver.lookupAddress(name, DNS_TIMEOUT), resolver.lookupIPV6Address(name, DNS_TIMEOUT)],
        consumeErrors=True)
    addresses: list[str] = []
    errors = []
    for ok, value in results:
        if not ok:
            if not value.check(error.DNSNameError):
                errors.append(value)
            continue
        answers = value[0]
        for rr in answers:
            if rr.type == dns.A:
                addresses.append(rr.payload.dottedQuad())
            elif rr.type == dns.AAAA:
                addresses.append(_ipv6(rr.payload.address))
    if not addresses and errors:
        raise RouteError(AttemptResult.temporary(
            f"DNS lookup of {name} failed: {describe_failure(errors[0].value)}", "4.4.3"))
    return list(dict.fromkeys(addresses))[:MAX_ADDRESSES]


def _ipv6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))
