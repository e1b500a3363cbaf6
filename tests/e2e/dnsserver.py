"""A small authoritative DNS server for the end-to-end tests (twisted.names), run as a
subprocess by `outbound_helpers.DNSServer`:

    python dnsserver.py ZONE.json     # prints "PORT <n>" once it answers on 127.0.0.1

ZONE.json is a list of records: ["example.net", "MX", 10, "mx1.example.net"],
["mx1.example.net", "A", "127.0.0.2"], ["null.test", "MX", 0, ""] (a null MX).  Names it
holds no record for are NXDOMAIN; a known name without the asked type is NODATA.  MX
answers carry the exchanges' A records in the additional section.

More record forms:

- ["k._domainkey.example.net", "TXT", "v=DKIM1; ", "k=rsa; p=..."]: the strings of one TXT
  record; a string longer than 255 bytes is cut into 255-byte strings (RFC 7208 3.3,
  RFC 6376 3.6.2.2: readers join them), so a 2048-bit DKIM key can be given whole.
- ["1.0.0.127.in-addr.arpa", "PTR", "host.example.net"].
- ["slow.example", "TIMEOUT"]: no query for that name (any type) is ever answered, as
  with a dead authoritative server; the client times out.
- ["broken.example", "SERVFAIL"]: every query for that name gets SERVFAIL.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, reactor, task
from twisted.names import common, dns, error, server


class ServFail(Exception):
    """A lookup answered with SERVFAIL (not a DomainError: those are NXDOMAIN)."""


class ZoneServerFactory(server.DNSServerFactory):
    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(ServFail):  # expected: answer quietly, no traceback in the log
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return None
        return super().gotResolverError(failure, protocol, message, address)


def txt_strings(args: list[str]) -> list[bytes]:
    """The character-strings of one TXT record: each given string, cut into pieces of at
    most 255 bytes (one length octet each on the wire)."""
    out: list[bytes] = []
    for arg in args:
        data = arg.encode()
        out.extend(data[i:i + 255] for i in range(0, len(data), 255))
        if not data:
            out.append(b"")
    return out


class ZoneAuthority(common.ResolverBase):
    def __init__(self, records: list[list]) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[dns.RRHeader]] = {}
        self.silent: set[str] = set()      # never answered
        self.failing: set[str] = set()     # answered with SERVFAIL
        for name, rtype, *args in records:
            name = name.lower().rstrip(".")
            if rtype == "TIMEOUT":
                self.silent.add(name)
                continue
            if rtype == "SERVFAIL":
                self.failing.add(name)
                continue
            if rtype == "MX":
                payload = dns.Record_MX(args[0], args[1].encode(), ttl=60)
            elif rtype == "A":
                payload = dns.Record_A(args[0], ttl=60)
            elif rtype == "AAAA":
                payload = dns.Record_AAAA(args[0], ttl=60)
            elif rtype == "TXT":
                payload = dns.Record_TXT(*txt_strings(args), ttl=60)
            elif rtype == "PTR":
                payload = dns.Record_PTR(args[0].encode(), ttl=60)
            else:
                raise ValueError(f"record type {rtype} not supported here")
            header = dns.RRHeader(name.encode(), payload.TYPE, dns.IN, 60, payload, auth=True)
            self.records.setdefault((name, payload.TYPE), []).append(header)
        self.names = {name for name, _ in self.records}

    def _lookup(self, name, cls, type, timeout):  # noqa: A002 - twisted's signature
        key = (name.decode() if isinstance(name, bytes) else str(name)).lower().rstrip(".")
        if key in self.silent:
            return defer.Deferred()  # never fires: the server never replies
        if key in self.failing:
            return defer.fail(ServFail(key))
        answers = self.records.get((key, type), [])
        additional = []
        if type == dns.MX:
            for rr in answers:
                exchange = str(rr.payload.name).lower()
                additional += self.records.get((exchange, dns.A), [])
        if answers or key in self.names:
            return defer.succeed((answers, [], additional))
        return defer.fail(error.AuthoritativeDomainError(name))


def main() -> None:
    with open(sys.argv[1]) as f:
        authority = ZoneAuthority(json.load(f))
    factory = ZoneServerFactory(authorities=[authority])
    factory.noisy = False
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    port = udp.getHost().port
    try:
        reactor.listenTCP(port, factory, interface="127.0.0.1")
    except Exception:
        pass  # UDP is what the tests use
    parent = os.getppid()

    def orphaned() -> None:
        if os.getppid() != parent:
            reactor.stop()

    task.LoopingCall(orphaned).start(1.0)
    print(f"PORT {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
