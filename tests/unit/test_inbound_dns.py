"""The inbound checks' DNS cache (mailserver.inbound.dns) over a twisted.names resolver
that answers from a table: TTLs honoured, negative answers kept, errors not kept, one
query for concurrent askers, garbage answers turned into errors."""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import common, dns, error
from twisted.trial import unittest

from mailserver.inbound.dns import MAX_TTL, NEGATIVE_TTL, CachingResolver


class TableResolver(common.ResolverBase):
    """A twisted.names resolver over {(name, type): [payload, ...]} with per-record TTLs;
    names in `failing` time out, names in `pending` wait for the test to answer."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[tuple[int, object]]] = {}
        self.failing: set[str] = set()
        self.pending: dict[str, defer.Deferred] = {}
        self.asked: list[tuple[str, int]] = []

    def _lookup(self, name, cls, type, timeout):  # noqa: A002 - twisted's signature
        key = name.decode() if isinstance(name, bytes) else str(name)
        self.asked.append((key, type))
        if key in self.pending:
            return self.pending[key]
        if key in self.failing:
            return defer.fail(error.DNSQueryTimeoutError(key))
        rows = self.records.get((key, type))
        if rows is None:
            if any(n == key for n, _ in self.records):
                return defer.succeed(([], [], []))
            return defer.fail(error.DNSNameError(key))
        answers = [dns.RRHeader(key.encode(), type, dns.IN, ttl, payload)
                   for ttl, payload in rows]
        return defer.succeed((answers, [], []))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CachingResolverTests(unittest.TestCase):
    def setUp(self) -> None:
        self.upstream = TableResolver()
        self.clock = Clock()
        self.resolver = CachingResolver(self.upstream, clock=self.clock)

    def answer(self, d: defer.Deferred):
        results: list = []
        d.addCallback(results.append)
        self.assertEqual(len(results), 1, "the lookup did not fire")
        return results[0]

    def test_records_of_each_type(self):
        r = self.upstream.records
        r[("example.org", dns.TXT)] = [(60, dns.Record_TXT(b"v=spf1 ", b"-all"))]
        r[("example.org", dns.A)] = [(60, dns.Record_A("192.0.2.1"))]
        r[("example.org", dns.AAAA)] = [(60, dns.Record_AAAA("2001:db8::1"))]
        r[("example.org", dns.MX)] = [(60, dns.Record_MX(10, b"MX.Example.org."))]
        r[("1.2.0.192.in-addr.arpa", dns.PTR)] = [(60, dns.Record_PTR(b"host.example.org"))]
        self.assertEqual(self.answer(self.resolver.txt("Example.ORG.")).records,
                         (b"v=spf1 -all",))
        self.assertEqual(self.answer(self.resolver.a("example.org")).records, ("192.0.2.1",))
        self.assertEqual(self.answer(self.resolver.aaaa("example.org")).records,
                         ("2001:db8::1",))
        self.assertEqual(self.answer(self.resolver.mx("example.org")).records,
                         ((10, "mx.example.org"),))
        self.assertEqual(self.answer(self.resolver.ptr("1.2.0.192.in-addr.arpa")).records,
                         ("host.example.org",))

    def test_positive_answer_kept_for_its_smallest_ttl(self):
        self.upstream.records[("example.org", dns.TXT)] = [
            (300, dns.Record_TXT(b"a")), (30, dns.Record_TXT(b"b"))]
        first = self.answer(self.resolver.txt("example.org"))
        self.clock.now += 29
        self.assertIs(self.answer(self.resolver.txt("example.org")), first)
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.now += 2
        self.answer(self.resolver.txt("example.org"))
        self.assertEqual(len(self.upstream.asked), 2)

    def test_long_ttls_capped(self):
        self.upstream.records[("example.org", dns.A)] = [(10 ** 7, dns.Record_A("192.0.2.1"))]
        self.answer(self.resolver.a("example.org"))
        self.clock.now += MAX_TTL + 1
        self.answer(self.resolver.a("example.org"))
        self.assertEqual(len(self.upstream.asked), 2)

    def test_negative_answers_kept_errors_not(self):
        self.upstream.records[("example.org", dns.A)] = [(60, dns.Record_A("192.0.2.1"))]
        self.assertEqual(self.answer(self.resolver.txt("example.org")).status, "nodata")
        self.assertEqual(self.answer(self.resolver.txt("nowhere.example")).status, "nxdomain")
        self.upstream.failing.add("slow.example")
        answer = self.answer(self.resolver.txt("slow.example"))
        self.assertEqual((answer.status, answer.detail), ("error", "timeout"))
        self.assertTrue(answer.error and not answer.void)
        for name in ("example.org", "nowhere.example", "slow.example"):
            self.answer(self.resolver.txt(name))
        self.assertEqual(len(self.upstream.asked), 4)  # only the error was asked again
        self.clock.now += NEGATIVE_TTL + 1
        self.answer(self.resolver.txt("nowhere.example"))
        self.assertEqual(len(self.upstream.asked), 5)

    def test_concurrent_lookups_share_one_query(self):
        pending = self.upstream.pending["example.org"] = defer.Deferred()
        d1, d2 = self.resolver.txt("example.org"), self.resolver.txt("EXAMPLE.org")
        self.assertEqual(len(self.upstream.asked), 1)
        rr = dns.RRHeader(b"example.org", dns.TXT, dns.IN, 60, dns.Record_TXT(b"x"))
        pending.callback(([rr], [], []))
        first = self.answer(d1)
        self.assertEqual(first.records, (b"x",))
        self.assertIs(self.answer(d2), first)

    def test_garbage_and_invalid_names(self):
        self.upstream.records[("huge.example", dns.TXT)] = [
            (60, dns.Record_TXT(*[b"x" * 255] * 300))]
        self.assertEqual(self.answer(self.resolver.txt("huge.example")).status, "error")
        self.assertEqual(self.answer(self.resolver.txt("a..b")).status, "nxdomain")
        self.assertEqual(self.answer(self.resolver.txt("x" * 64 + ".example")).status,
                         "nxdomain")
        self.assertEqual(len(self.upstream.asked), 1)

    def test_cache_bounded(self):
        resolver = CachingResolver(self.upstream, clock=self.clock, max_entries=3)
        for i in range(5):
            self.answer(resolver.txt(f"n{i}.example"))
        self.answer(resolver.txt("n4.example"))
        self.answer(resolver.txt("n0.example"))
        self.assertEqual(len(self.upstream.asked), 6)


class SPFResultCacheTests(unittest.TestCase):
    """spf.ResultCache over the real DNS cache: a sender's next message reuses the
    evaluation while every answer it read stands, and only then."""

    def setUp(self) -> None:
        from mailserver.inbound.spf import ResultCache

        self.upstream = TableResolver()
        self.clock = Clock()
        self.resolver = CachingResolver(self.upstream, clock=self.clock)
        r = self.upstream.records
        r[("example.org", dns.TXT)] = [(300, dns.Record_TXT(b"v=spf1 include:_spf.example.org -all"))]
        r[("_spf.example.org", dns.TXT)] = [(60, dns.Record_TXT(b"v=spf1 ip4:192.0.2.0/24 -all"))]
        self.cache = ResultCache(self.resolver)

    def result(self, ip: str = "192.0.2.7", sender: str = "a@example.org"):
        out: list = []
        self.cache.check(ip, sender, "mail.example.org").addCallback(out.append)
        self.assertEqual(len(out), 1)
        return out[0]

    def test_reused_while_every_answer_stands(self):
        self.assertEqual(self.result().result, "pass")
        asked = len(self.upstream.asked)
        self.assertEqual(self.result(sender="A@Example.ORG").result, "pass")
        self.assertEqual((self.cache.hits, len(self.upstream.asked)), (1, asked))
        self.assertEqual(self.result(ip="198.51.100.1").result, "fail")   # another key
        self.assertEqual(self.cache.hits, 1)

    def test_evaluated_again_when_one_answer_expires_or_changes(self):
        self.assertEqual(self.result().result, "pass")
        self.upstream.records[("_spf.example.org", dns.TXT)] = [
            (60, dns.Record_TXT(b"v=spf1 -all"))]
        self.clock.now += 61   # the include's answer expired; the top record's did not
        self.assertEqual(self.result().result, "fail")
        self.assertEqual(self.cache.hits, 0)

    def test_dns_errors_are_not_kept(self):
        self.upstream.failing.add("_spf.example.org")
        self.assertEqual(self.result().result, "temperror")
        self.upstream.failing.clear()
        self.assertEqual(self.result().result, "pass")
        self.assertEqual(self.cache.hits, 0)
