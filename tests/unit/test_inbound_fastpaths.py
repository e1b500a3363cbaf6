"""The inbound checks' quick paths give what the general ones give: header fields found
by bytes.find read as the full parsers read them, the tag-list parser accepts what
dkimpy's does, Authentication-Results written from remembered pieces are the same text,
DMARC and SPF answered at once from cached DNS equal their Deferred answers, and the
worker's answers are read right however the pipe cuts them."""

from __future__ import annotations

import io
import pickle
import random
import re

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer
from twisted.names import dns
from twisted.trial import unittest

from mailserver.config import InboundConfig
from mailserver.inbound import authresults, dkimverify, headerscan, worker
from mailserver.inbound.authresults import format_header, remove_fields
from mailserver.inbound.checker import InboundChecker, MessageFacts
from mailserver.inbound.dmarc import DMARCResult, evaluate, evaluate_now, from_values
from mailserver.inbound.dns import Answer, CachingResolver, StaticResolver
from mailserver.inbound.psl import OrgDomains
from mailserver.inbound.spf import ResultCache, SPFResult
from mailserver.inbound.workers import WorkerFailed, WorkerPool, _Child, _Request
from mailserver.smtp.headers import named_field_values

PIECES = [b"From: a@b.c", b"from :x", b"FROM:\t<y@z>", b" cont", b"\tmore", b"X-From: no",
          b"DKIM-Signature: v=1; d=a.b; s=x", b"dkim-signature :v=1", b"ARC-Seal: i=1",
          b"Authentication-Results: mx.example; spf=pass", b"authentication-results\t: x",
          b"X-Spam: yes", b"Subject: s", b"garbage line", b" ", b"", b"To: t", b"\t", b"\r",
          b" x\ry", b"fromage: z", b"::", b"\xc3\xa9: v", b"\xff"]


def blocks(seed: int, count: int = 20000):
    rng = random.Random(seed)
    for _ in range(count):
        yield rng.choice([b"\r\n", b"\n"]).join(rng.choice(PIECES)
                                                 for _ in range(rng.randint(0, 8)))


# -- finding fields ----------------------------------------------------------------------

def test_field_values_as_the_full_header_parser_reads_them():
    names = (b"from", b"to", b"dkim-signature", b"arc-seal", b"x-spam")
    for block in blocks(1):
        full = [(n.lower(), dkimverify._NEWLINE.sub(b"", v))
                for n, v in dkimverify.parse_header_block(block) if n.lower() in names]
        fast = [(n, dkimverify._NEWLINE.sub(b"", v) + b"\r\n")
                for n, v in headerscan.named_values(block, names)]
        assert [(n, v.rstrip(b"\r\n")) for n, v in fast] == [
            (n, v.rstrip(b"\r\n")) for n, v in full], block


def test_from_values_as_named_field_values():
    for block in blocks(2):
        assert from_values(block) == named_field_values(block, "from"), block


def test_has_field_is_true_exactly_when_remove_fields_would_drop_one():
    names = (b"authentication-results", b"x-spam")
    for block in blocks(3):
        dropped = remove_fields(block, lambda name, value: name in names) != block
        assert headerscan.has_field(block, names) == dropped, block


# -- DKIM ------------------------------------------------------------------------------

def _split_line_by_line(block: bytes) -> list[list[bytes]]:
    """parse_header_block() as first written: line by line, field values concatenated."""
    headers: list[list[bytes]] = []
    in_field = False
    for line in re.split(rb"\r?\n", block):
        if not line:
            break
        if line[0] in (9, 32):
            if in_field:
                headers[-1][1] += line + b"\r\n"
            continue
        m = re.match(rb"([\x21-\x7e]+?):", line)
        if m is None:
            in_field = False
            continue
        headers.append([m.group(1), line[m.end():] + b"\r\n"])
        in_field = True
    return headers


def test_header_fields_split_as_line_by_line():
    rng = random.Random(9)
    pieces = [b"\r\n", b"\n", b"\r", b"A: b", b" c", b"\tx", b"x", b"From:", b"::",
              b"\r\n ", b"a:b\r", b"", b" ", b"\xff:", b"\r\r"]
    for _ in range(100000):
        block = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert dkimverify.parse_header_block(block) == _split_line_by_line(block), block


def test_tag_lists_read_as_dkimpy_reads_them():
    rng = random.Random(4)
    alphabet = [b"a", b"=", b";", b" ", b"\t", b"1", b"_", b"b", b"\x80", b"-", b"\r",
                b"\x0b", b"A", b"v=1", b"; ", b"=="]
    for _ in range(50000):
        text = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            expected = parse_tag_value(text)
        except (InvalidTagValueList, ValueError):
            expected = None
        assert dkimverify.parse_tags(text) == expected, text


def test_b_tag_emptied_as_dkimpy_does():
    rng = random.Random(5)
    alphabet = [b";", b" ", b"\t", b"\r\n", b"b", b"=", b"a", b"/", b"+", b"-", b" b=",
                b";b=", b"\r\n ", b"x"]
    for _ in range(50000):
        value = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert dkimverify._BTAG.sub(b"\\1", value) == dkim.RE_BTAG.sub(b"\\1", value), value


def test_fields_selected_as_dkimpy_selects_them():
    rng = random.Random(6)
    names = [b"From", b"to", b"TO", b"subject", b"x"]
    for _ in range(5000):
        headers = [[rng.choice(names), b"v%d" % i] for i in range(rng.randint(0, 8))]
        include = [rng.choice(names).lower() for _ in range(rng.randint(0, 6))]
        assert dkimverify._select_headers(headers, include) == dkim.select_headers(
            headers, include)


def test_header_section_of_a_message_in_memory_found_as_read_line_by_line():
    rng = random.Random(7)
    pieces = [b"\r\n", b"\n", b"\r", b"A: b", b" c", b"x", b"\r\n\r\n", b"\n\n", b""]
    for _ in range(50000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        buffered = io.BufferedReader(io.BytesIO(data))   # read line by line
        in_memory = io.BytesIO(data)
        assert (dkimverify._read_header(in_memory), in_memory.read()) == (
            dkimverify._read_header(buffered), buffered.read()), data


# -- Authentication-Results ----------------------------------------------------------

def _reference(authserv_id: str, results: list) -> bytes:
    """The field written word by word, nothing remembered."""
    head = f"Authentication-Results: {authresults._value(authserv_id.strip().rstrip('.'))};"
    texts = []
    for method, result, comment, props in results:
        parts = authresults._resinfo_parts(method, result, comment, props)
        if parts:
            texts.append(authresults._fold(parts))
    if not texts:
        return (head + " none\r\n").encode()
    return (head + "\r\n" + ";\r\n".join(texts) + "\r\n").encode()


def test_remembered_pieces_give_the_same_field():
    rng = random.Random(8)
    words = ["spf", "dkim", "pass", "fail", "x y", "a(b)", "é", "\t", "(", ")", "\\",
             "\r\n", "a" * 40, "header.d", "", "PASS", "-x"]
    for _ in range(20000):
        results = []
        for _ in range(rng.randint(0, 4)):
            props = {}
            for _ in range(rng.randint(0, 5)):
                name = rng.choice(["header.d", "header.b", "header.i", "smtp.mailfrom",
                                   "bad name", rng.choice(words)])
                props[name] = rng.choice([None, "".join(rng.choices(words, k=3))])
            results.append((rng.choice(words), rng.choice(words),
                            " ".join(rng.choices(words, k=rng.randint(0, 10))), props))
        assert format_header("mx.example", results) == _reference("mx.example", results)


def test_each_signature_keeps_its_own_header_b():
    def field(b: str) -> bytes:
        return format_header("mx.example", [("dkim", "pass", "signature verified",
                                             {"header.d": "example.org", "header.s": "s",
                                              "header.b": b, "header.i": "@example.org"})])
    first, second = field("AAAAaaaa"), field("BBBBbbbb")
    assert b"header.b=AAAAaaaa" in first and b"header.b=BBBBbbbb" in second
    assert first.replace(b"AAAAaaaa", b"BBBBbbbb") == second


# -- DMARC and SPF from cached answers ---------------------------------------------------

ORGS = OrgDomains()


def fired(d: defer.Deferred):
    out: list = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


class Upstream:
    """A twisted.names resolver answering from a table at once."""

    def __init__(self, records: dict) -> None:
        self.records = records
        self.asked: list = []

    def query(self, query, timeout=None):
        name = str(query.name)
        self.asked.append((name, query.type))
        rrs = [dns.RRHeader(name, dns.TXT, ttl=60, payload=dns.Record_TXT(r, ttl=60))
               for r in self.records.get(name, ())]
        return defer.succeed((rrs, [], []))


def test_dmarc_at_once_from_cached_records_equals_the_deferred_answer():
    zone = {("_dmarc.example.org", "TXT"): Answer("ok", (b"v=DMARC1; p=reject",)),
            ("_dmarc.example.net", "TXT"): Answer("ok", (b"v=DMARC1; p=quarantine; sp=none",))}
    for domain, spf, dkim_domains in [("example.org", ("pass", "example.org"), []),
                                      ("mail.example.org", ("fail", ""), ["example.org"]),
                                      ("sub.example.net", ("pass", "other.example"), []),
                                      ("nothing.example", ("none", ""), [])]:
        now = evaluate_now(StaticResolver(zone), ORGS, domain, *spf, dkim_domains,
                           rand=lambda: 0.0)
        # at once when every name asked is in the table (unknown ones are not "cached")
        assert isinstance(now, DMARCResult) == (domain in ("example.org",))
        now = fired(now) if isinstance(now, defer.Deferred) else now

        class NoCache(StaticResolver):
            current = None
        later = evaluate_now(NoCache(zone), ORGS, domain, *spf, dkim_domains,
                             rand=lambda: 0.0)
        assert isinstance(later, defer.Deferred)
        assert fired(later) == now
        assert fired(evaluate(StaticResolver(zone), ORGS, domain, *spf, dkim_domains,
                              rand=lambda: 0.0)) == now


def test_dmarc_asks_dns_once_then_answers_at_once():
    upstream = Upstream({"_dmarc.example.org": [b"v=DMARC1; p=reject"]})
    resolver = CachingResolver(upstream)
    first = evaluate_now(resolver, ORGS, "mail.example.org", "none", "", [])
    assert isinstance(first, defer.Deferred)   # _dmarc.mail.example.org, then the org's
    result = fired(first)
    assert (result.result, result.policy, result.record_domain) == ("fail", "reject",
                                                                    "example.org")
    asked = len(upstream.asked)
    assert evaluate_now(resolver, ORGS, "mail.example.org", "none", "", []) == result
    assert len(upstream.asked) == asked


def test_spf_result_at_once_while_its_answers_stand():
    upstream = Upstream({"example.org": [b"v=spf1 ip4:192.0.2.0/24 -all"]})
    resolver = CachingResolver(upstream)
    cache = ResultCache(resolver)
    assert cache.cached("192.0.2.7", "a@example.org", "mx.example.org") is None
    first = fired(cache.check("192.0.2.7", "a@example.org", "mx.example.org"))
    assert first.result == "pass"
    assert cache.cached("192.0.2.7", "A@EXAMPLE.ORG", "mx.example.org") == first
    checker = InboundChecker(InboundConfig(trusted_networks=()), "mx.example", resolver,
                             run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    assert isinstance(checker.check_sender("192.0.2.7", "b@example.org", "h.example"),
                      defer.Deferred)
    assert isinstance(checker.check_sender("192.0.2.7", "b@example.org", "h.example"),
                      SPFResult)


def test_verdict_from_cached_answers_same_as_from_deferred_ones():
    zone = {("example.org", "TXT"): Answer("ok", (b"v=spf1 ip4:192.0.2.0/24 -all",)),
            ("_dmarc.example.org", "TXT"): Answer("ok", (b"v=DMARC1; p=reject",))}
    message = (b"From: <a@example.org>\r\nAuthentication-Results: mx.example; x=y\r\n"
               b"Subject: s\r\n\r\nbody\r\n")
    facts = MessageFacts(message, message.split(b"\r\n\r\n")[0] + b"\r\n", "192.0.2.7",
                         "h.example", "a@example.org", ("b@example.net",), "Q1")

    class NoCache(StaticResolver):
        current = None
    verdicts = []
    for resolver in (StaticResolver(zone), NoCache(zone)):
        checker = InboundChecker(InboundConfig(trusted_networks=()), "mx.example", resolver,
                                 run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
        checker.orgs = ORGS
        spf = checker.check_sender("192.0.2.7", "a@example.org", "h.example")
        verdicts.append(fired(checker.check_message(facts, spf)))
    assert verdicts[0].headers == verdicts[1].headers
    assert verdicts[0].summary == verdicts[1].summary == {
        "spf": "pass", "dkim": "none", "arc": "none", "dmarc": "pass:none"}


# -- the worker's answers ----------------------------------------------------------------

class WorkerAnswerTests(unittest.TestCase):
    def child(self) -> tuple[_Child, dict]:
        child = _Child(WorkerPool(processes=1))
        waiting = {key: defer.Deferred() for key in range(1, 5)}
        child.pending.update({key: _Request(d, len, "len", ()) for key, d in waiting.items()})
        return child, waiting

    def test_answers_in_pieces_and_several_at_once(self):
        big = b"x" * 300_000
        stream = b"".join(worker.frame(a) for a in [(1, True, big), (2, False, "Boom: no"),
                                                     (3, True, [1, 2]), (4, True, None)])
        for cut in (1, 7, 4096, 65536, len(stream)):
            child, waiting = self.child()
            got: dict = {}
            for key, d in waiting.items():
                d.addCallbacks(lambda v, k=key: got.__setitem__(k, v),
                               lambda f, k=key: got.__setitem__(k, f.check(WorkerFailed)))
            for at in range(0, len(stream), cut):
                child.outReceived(stream[at:at + cut])
            self.assertEqual(got, {1: big, 2: WorkerFailed, 3: [1, 2], 4: None})
            self.assertEqual(len(child.buffer), 0)

    def test_worker_answers_what_one_read_brings_in_one_write(self):
        requests = b"".join(worker.frame((k, "mailserver.inbound.dkimverify:key_names",
                                          (b"DKIM-Signature: v=1; s=s%d; d=example.org\r\n"
                                           % k,)))
                            for k in range(3))

        class Out(io.BytesIO):
            writes = 0

            def write(self, data):
                Out.writes += 1
                return super().write(data)
        out = Out()
        worker.serve(io.BytesIO(requests), out)
        stream = io.BytesIO(out.getvalue())
        answers = []
        while (data := worker.read_frame(stream)) is not None:
            answers.append(pickle.loads(data))
        self.assertEqual(answers, [(k, True, [f"s{k}._domainkey.example.org"])
                                   for k in range(3)])
        self.assertEqual(Out.writes, 1)

