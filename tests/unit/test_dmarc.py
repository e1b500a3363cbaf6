"""DMARC (RFC 7489): record parsing, organizational domains from the Public Suffix List,
policy discovery, identifier alignment, pct sampling and the RFC5322.From domain, over a
StaticResolver whose Deferreds fire at once."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from mailserver.inbound.dmarc import (DMARCRecord, DMARCResult, DMARCSyntaxError, evaluate,
                                      from_domain, parse_record)
from mailserver.inbound.dns import Answer, StaticResolver
from mailserver.inbound.psl import OrgDomains


@pytest.fixture(scope="module")
def orgs() -> OrgDomains:
    return OrgDomains()


def fired(d: defer.Deferred):
    """The result of a Deferred that has fired; fails the test on an errback."""
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert not isinstance(out[0], Exception) and not hasattr(out[0], "raiseException"), out[0]
    return out[0]


def txt(*records: bytes) -> Answer:
    return Answer("ok", tuple(records))


def run(orgs, table, domain, spf=("none", ""), dkim=(), rand=lambda: 0.0,
        dkim_temperror=()) -> DMARCResult:
    resolver = table if isinstance(table, StaticResolver) else StaticResolver(
        {(name, "TXT"): ans for name, ans in table.items()})
    result = fired(evaluate(resolver, orgs, domain, spf[0], spf[1], list(dkim), rand=rand,
                            dkim_temperror_domains=list(dkim_temperror)))
    assert isinstance(result, DMARCResult)
    return result


# -- parse_record ------------------------------------------------------------------------

def test_record_defaults():
    assert parse_record(b"v=DMARC1; p=reject") == DMARCRecord(
        p="reject", sp="reject", pct=100, adkim="r", aspf="r", rua=(), ruf=(), fo="0")


def test_record_all_tags_whitespace_and_case():
    rec = parse_record(b"V = DMARC1 ;P=Quarantine; sp = NONE ;pct=50; adkim=s; ASPF=S; "
                       b"rua=mailto:a@example.com, mailto:b@example.com!10m,not a uri; "
                       b"ruf=mailto:f@example.com; fo=1:D; rf=afrf; ri=86400;")
    assert rec == DMARCRecord(p="quarantine", sp="none", pct=50, adkim="s", aspf="s",
                              rua=("mailto:a@example.com", "mailto:b@example.com!10m"),
                              ruf=("mailto:f@example.com",), fo="1:d")


def test_unknown_tags_ignored_and_first_duplicate_counts():
    rec = parse_record(b"v=DMARC1; np=reject; future=1; nonsense; p=none; p=reject")
    assert (rec.p, rec.sp) == ("none", "none")


@pytest.mark.parametrize("record", [
    b"p=reject",                         # no v
    b"p=reject; v=DMARC1",               # v not first
    b"v=DMARC2; p=reject",
    b"v=dmarc1; p=reject",               # the version value is case-sensitive
    b"v=DMARC1x; p=reject",
    b"v=spf1 -all",
    b"",
    b"v=DMARC1; p=reject\xff\xfe",       # not UTF-8
    b"v=DMARC1; p=reject; x=" + b"a" * 10000,   # huge
])
def test_not_a_dmarc_record(record):
    with pytest.raises(DMARCSyntaxError):
        parse_record(record)


@pytest.mark.parametrize("record", [
    b"v=DMARC1",
    b"v=DMARC1; p=block",
    b"v=DMARC1; p=",
    b"v=DMARC1; p=reject; sp=bogus",     # an invalid sp counts like an invalid p (6.6.3)
    b"v=DMARC1; p=bogus; rua=not-a-uri",
])
def test_invalid_policy_without_rua_is_no_record(record):
    with pytest.raises(DMARCSyntaxError):
        parse_record(record)


@pytest.mark.parametrize("record", [
    b"v=DMARC1; rua=mailto:d@example.com",
    b"v=DMARC1; p=block; rua=mailto:d@example.com",
    b"v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.com",
])
def test_invalid_policy_with_rua_acts_as_p_none(record):
    rec = parse_record(record)
    assert (rec.p, rec.sp, rec.rua) == ("none", "none", ("mailto:d@example.com",))


@pytest.mark.parametrize("value,pct", [(b"0", 0), (b"07", 7), (b"100", 100), (b"150", 100),
                                       (b"-1", 100), (b"abc", 100), (b"", 100), (b"5.5", 100)])
def test_pct_out_of_range_falls_back_to_100(value, pct):
    assert parse_record(b"v=DMARC1; p=reject; pct=" + value).pct == pct


def test_bad_values_of_other_tags_take_defaults():
    rec = parse_record(b"v=DMARC1; p=reject; adkim=x; aspf=relaxed; fo=2; ruf=;")
    assert (rec.adkim, rec.aspf, rec.fo, rec.ruf) == ("r", "r", "0", ())


# -- organizational domains (RFC 7489 3.2) -----------------------------------------------

@pytest.mark.parametrize("domain,org", [
    ("example.co.uk", "example.co.uk"),
    ("www.mail.example.co.uk", "example.co.uk"),
    ("a.b.example.com", "example.com"),
    ("A.B.Example.COM.", "example.com"),
    ("co.uk", "co.uk"),                         # a public suffix is its own org domain
    ("com", "com"),
    ("a.b.example.unlistedtld", "example.unlistedtld"),   # the implicit "*" rule
    ("xn--bcher-kva.example.de", "example.de"),
    ("mail.xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("bücher.de", "xn--bcher-kva.de"),          # U-labels come back as A-labels
    # IDNA 2008: not fass.de, another domain (IDNA 2003's mapping let its p=none stand
    # for faß.de's p=reject)
    ("www.faß.de", "xn--fa-hia.de"),
    ("ς.gr", "xn--3xa.gr"),
    ("www.xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),  # 公司.cn is a suffix
    ("www.city.kobe.jp", "city.kobe.jp"),       # an exception rule (!city.kobe.jp)
])
def test_org_domain(orgs, domain, org):
    assert orgs.org_domain(domain) == org


def test_org_domain_from_a_custom_list(tmp_path):
    psl = tmp_path / "public_suffix_list.dat"
    psl.write_text("// a newer list\n// ===BEGIN ICANN DOMAINS===\ntest\nshop.test\n"
                   "*.wild.test\n!www.wild.test\nuk\n// ===END ICANN DOMAINS===\n")
    custom = OrgDomains(psl)
    assert custom.org_domain("a.example.test") == "example.test"
    assert custom.org_domain("a.b.shop.test") == "b.shop.test"     # packaged: shop.test
    assert custom.org_domain("shop.test") == "shop.test"
    assert custom.org_domain("a.b.c.wild.test") == "b.c.wild.test"
    assert custom.org_domain("x.www.wild.test") == "www.wild.test"
    # the packaged list (with co.uk) is not consulted
    assert custom.org_domain("example.co.uk") == "co.uk"
    assert custom.error == ""


def test_unusable_psl_file(tmp_path):
    missing = OrgDomains(tmp_path / "missing.dat")          # lazy: no error yet
    with pytest.raises(OSError):
        missing.load()
    html = tmp_path / "psl.dat"
    html.write_text("<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n")
    bad = OrgDomains(html)
    with pytest.raises(ValueError):
        bad.load()
    # Used without load(): the packaged list, and the reason is kept.
    fallback = OrgDomains(html)
    assert fallback.org_domain("www.example.co.uk") == "example.co.uk"
    assert "Public Suffix List" in fallback.error


# -- evaluate: policy discovery (RFC 7489 6.6.3) -----------------------------------------

def test_no_record_is_none(orgs):
    r = run(orgs, {}, "example.com", dkim=["example.com"])
    assert (r.result, r.policy, r.disposition, r.from_domain) == ("none", "", "none",
                                                                  "example.com")


def test_record_at_org_domain_uses_sp_for_subdomains(orgs):
    table = {"_dmarc.example.com": txt(b"v=DMARC1; p=reject; sp=quarantine")}
    r = run(orgs, table, "news.example.com")
    assert (r.result, r.policy, r.disposition, r.record_domain) == (
        "fail", "quarantine", "quarantine", "example.com")
    r = run(orgs, table, "example.com")
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")
    # sp defaults to p
    r = run(orgs, {"_dmarc.example.com": txt(b"v=DMARC1; p=reject")}, "a.b.example.com")
    assert (r.policy, r.disposition) == ("reject", "reject")


def test_record_at_from_domain_wins_over_org(orgs):
    resolver = StaticResolver({
        ("_dmarc.news.example.com", "TXT"): txt(b"v=DMARC1; p=none"),
        ("_dmarc.example.com", "TXT"): txt(b"v=DMARC1; p=reject; sp=reject"),
    })
    r = run(orgs, resolver, "news.example.com")
    assert (r.result, r.policy, r.disposition, r.record_domain) == (
        "fail", "none", "none", "news.example.com")
    assert ("_dmarc.example.com", "TXT") not in resolver.asked


def test_other_txt_records_are_skipped_before_counting(orgs):
    table = {
        "_dmarc.news.example.com": txt(b"google-site-verification=abc"),
        "_dmarc.example.com": txt(b"v=spf1 -all", b"v=DMARC1; p=reject\xff",
                                  b"v=DMARC1; p=quarantine"),
    }
    r = run(orgs, table, "news.example.com")
    assert (r.result, r.policy, r.record_domain) == ("fail", "quarantine", "example.com")


def test_two_records_is_no_record(orgs):
    resolver = StaticResolver({
        ("_dmarc.news.example.com", "TXT"): txt(b"v=DMARC1; p=reject", b"v=DMARC1; p=none"),
        ("_dmarc.example.com", "TXT"): txt(b"v=DMARC1; p=reject"),
    })
    r = run(orgs, resolver, "news.example.com")
    assert (r.result, r.policy, r.disposition) == ("none", "", "none")
    assert ("_dmarc.example.com", "TXT") not in resolver.asked      # the set was not empty
    r = run(orgs, {"_dmarc.example.com": txt(b"v=DMARC1; p=reject", b"v=DMARC1;p=reject")},
            "example.com")
    assert (r.result, r.disposition) == ("none", "none")


def test_garbage_records_are_no_record(orgs):
    for record in (b"v=DMARC1; p=reject\xc3", b"v=DMARC1; p=reject; x=" + b"y" * 70000,
                   b"\x00\x01\x02", b"v=DMARC1; p=nope"):
        r = run(orgs, {"_dmarc.example.com": txt(record)}, "example.com")
        assert (r.result, r.disposition) == ("none", "none"), record


def test_invalid_p_with_rua_fails_without_action(orgs):
    r = run(orgs, {"_dmarc.example.com": txt(b"v=DMARC1; p=bogus; rua=mailto:r@example.com")},
            "example.com")
    assert (r.result, r.policy, r.disposition) == ("fail", "none", "none")


def test_dns_error_is_temperror(orgs):
    r = run(orgs, {"_dmarc.example.com": Answer("error", detail="timeout")}, "example.com",
            dkim=["example.com"])
    assert (r.result, r.policy, r.disposition) == ("temperror", "", "none")
    assert "timeout" in r.reason
    r = run(orgs, {"_dmarc.example.com": Answer("error")}, "a.example.com")
    assert r.result == "temperror"


def test_dns_error_without_aligned_pass_leaves_the_policy_unknown(orgs):
    """A lame delegation for one subdomain of a p=reject organisation: the forgery
    passes nothing aligned, so the policy it would fail under is not known (451)."""
    table = {"_dmarc.old.bank.example": Answer("error", detail="timeout"),
             "_dmarc.bank.example": txt(b"v=DMARC1; p=reject")}
    r = run(orgs, table, "old.bank.example", spf=("pass", "x@attacker.example"),
            dkim=["attacker.example"])
    assert (r.result, r.policy, r.disposition) == ("temperror", "", "unknown")
    assert "policy unknown" in r.reason and "timeout" in r.reason
    # An SPF or DKIM pass of the same organization would pass under any relaxed record.
    for spf, dkim in ((("pass", "bounce@mail.bank.example"), ()),
                      (("fail", "x@bank.example"), ["bank.example"]),
                      (("none", ""), ["old.bank.example"])):
        r = run(orgs, table, "old.bank.example", spf=spf, dkim=dkim)
        assert (r.result, r.disposition) == ("temperror", "none"), (spf, dkim)
    # A failure of the organizational domain's lookup counts the same.
    r = run(orgs, {"_dmarc.sub.example.com": txt(),
                   "_dmarc.example.com": Answer("error", detail="SERVFAIL")},
            "sub.example.com")
    assert (r.result, r.disposition, r.record_domain) == ("temperror", "unknown",
                                                          "example.com")
    # An SPF temperror is no pass: still unknown.
    r = run(orgs, table, "old.bank.example", spf=("temperror", "x@bank.example"))
    assert r.disposition == "unknown"


def test_never_fails(orgs):
    class Broken:
        def txt(self, name):
            raise RuntimeError("boom")

    class Nonsense:
        def txt(self, name):
            return defer.succeed(None)

    for resolver in (Broken(), Nonsense()):
        r = fired(evaluate(resolver, orgs, "example.com", "pass", "example.com", []))
        assert (r.result, r.disposition) == ("temperror", "none")
    r = run(orgs, {}, "not a domain!")
    assert (r.result, r.from_domain, r.disposition) == ("permerror", "", "none")


# -- evaluate: alignment (RFC 7489 3.1) --------------------------------------------------

RELAXED = {"_dmarc.example.com": txt(b"v=DMARC1; p=reject")}
STRICT = {"_dmarc.example.com": txt(b"v=DMARC1; p=reject; adkim=s; aspf=s")}


def test_dkim_relaxed_alignment(orgs):
    r = run(orgs, RELAXED, "news.example.com", dkim=["other.test", "Mail.Example.COM"])
    assert (r.result, r.policy, r.disposition) == ("pass", "reject", "none")
    assert "mail.example.com" in r.reason
    r = run(orgs, RELAXED, "example.com", dkim=["example.com.evil.test"])
    assert (r.result, r.disposition) == ("fail", "reject")
    assert "not aligned" in r.reason


def test_alignment_uses_the_public_suffix_list(orgs):
    table = {"_dmarc.victim.co.uk": txt(b"v=DMARC1; p=reject")}
    r = run(orgs, table, "victim.co.uk", spf=("pass", "attacker.co.uk"),
            dkim=["attacker.co.uk"])
    assert (r.result, r.disposition) == ("fail", "reject")


def test_dkim_strict_alignment(orgs):
    r = run(orgs, STRICT, "news.example.com", dkim=["example.com"])
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")
    r = run(orgs, STRICT, "news.example.com", dkim=["NEWS.example.com."])
    assert r.result == "pass"


def test_spf_relaxed_and_strict_alignment(orgs):
    r = run(orgs, RELAXED, "example.com", spf=("pass", "bounces.example.com"))
    assert (r.result, r.disposition) == ("pass", "none")
    assert "spf" in r.reason
    r = run(orgs, RELAXED, "example.com", spf=("pass", "user@bounces.example.com"))
    assert r.result == "pass"
    r = run(orgs, STRICT, "example.com", spf=("pass", "bounces.example.com"))
    assert (r.result, r.disposition) == ("fail", "reject")
    r = run(orgs, STRICT, "example.com", spf=("pass", "example.com"))
    assert r.result == "pass"


def test_spf_must_pass_and_be_mail_from(orgs):
    for spf in (("softfail", "example.com"), ("neutral", "example.com"),
                ("pass", ""), ("none", "example.com")):
        r = run(orgs, RELAXED, "example.com", spf=spf)
        assert (r.result, r.disposition) == ("fail", "reject"), spf


def test_idn_from_domain_aligns_with_a_label_signature(orgs):
    table = {"_dmarc.xn--bcher-kva.example": txt(b"v=DMARC1; p=reject")}
    r = run(orgs, table, "bücher.example", dkim=["xn--bcher-kva.example"])
    assert (r.result, r.from_domain) == ("pass", "xn--bcher-kva.example")


def test_a_temporary_error_of_an_aligned_identifier_is_no_fail(orgs):
    """A DNS timeout on the sender's own key (or SPF record) is no proof of forgery."""
    r = run(orgs, RELAXED, "example.com", dkim_temperror=["mail.example.com"])
    assert (r.result, r.policy, r.disposition) == ("temperror", "reject", "reject")
    assert "temporary error for dkim mail.example.com" in r.reason
    r = run(orgs, RELAXED, "example.com", spf=("temperror", "bounces.example.com"))
    assert (r.result, r.disposition) == ("temperror", "reject")
    assert "spf bounces.example.com" in r.reason
    # the verification as a whole failed: its signatures may have been aligned
    assert run(orgs, RELAXED, "example.com", dkim_temperror=[""]).result == "temperror"
    # an aligned pass decides whatever else went wrong
    r = run(orgs, RELAXED, "example.com", dkim=["example.com"], dkim_temperror=[""],
            spf=("temperror", "example.com"))
    assert (r.result, r.disposition) == ("pass", "none")
    # pct applies as for a fail
    zero = {"_dmarc.example.com": txt(b"v=DMARC1; p=reject; pct=0")}
    r = run(orgs, zero, "example.com", dkim_temperror=["example.com"])
    assert (r.result, r.disposition, r.sampled_out) == ("temperror", "quarantine", True)


def test_a_temporary_error_of_an_unaligned_identifier_changes_nothing(orgs):
    """A forger's signature of his own domain with a key that never answers, or an SPF
    error for another domain, leaves the message failing."""
    for kw in ({"dkim_temperror": ["attacker.test"]},
               {"spf": ("temperror", "attacker.test")},
               {"dkim_temperror": ["example.com.attacker.test"]}):
        r = run(orgs, RELAXED, "example.com", **kw)
        assert (r.result, r.disposition) == ("fail", "reject"), kw
    r = run(orgs, STRICT, "example.com", dkim_temperror=["mail.example.com"],
            spf=("temperror", "bounces.example.com"))
    assert (r.result, r.disposition) == ("fail", "reject")   # not aligned when strict


# -- evaluate: pct (RFC 7489 6.6.4) ------------------------------------------------------

def test_pct_sampling(orgs):
    zero = {"_dmarc.example.com": txt(b"v=DMARC1; p=reject; pct=0")}
    r = run(orgs, zero, "example.com", rand=lambda: 0.0)
    assert (r.result, r.policy, r.disposition, r.sampled_out) == (
        "fail", "reject", "quarantine", True)
    quarantine = {"_dmarc.example.com": txt(b"v=DMARC1; p=quarantine; pct=0")}
    r = run(orgs, quarantine, "example.com")
    assert (r.disposition, r.sampled_out) == ("none", True)
    half = {"_dmarc.example.com": txt(b"v=DMARC1; p=reject; pct=50")}
    assert run(orgs, half, "example.com", rand=lambda: 0.49).disposition == "reject"
    r = run(orgs, half, "example.com", rand=lambda: 0.5)
    assert (r.disposition, r.sampled_out) == ("quarantine", True)
    r = run(orgs, RELAXED, "example.com", rand=lambda: 0.9999)
    assert (r.disposition, r.sampled_out) == ("reject", False)
    r = run(orgs, zero, "example.com", dkim=["example.com"])
    assert (r.result, r.disposition, r.sampled_out) == ("pass", "none", False)


# -- RFC5322.From (RFC 7489 6.6.1) -------------------------------------------------------

@pytest.mark.parametrize("block,domain", [
    (b"From: Alice <alice@Example.COM>\r\nTo: b@example.net", "example.com"),
    (b"Subject: x\r\nfrom:\r\n  Alice\r\n <a@example.com>\r\nTo: y@z.test", "example.com"),
    (b"From: a@example.com", "example.com"),
    (b"From : a@example.com\r\n", "example.com"),                          # obs-optional
    (b"From: a@example.com\nTo: b@other.test\n", "example.com"),            # bare LF
    (b"From: =?utf-8?q?Doe,_J=C3=B6rg?= <j@example.org>\r\n", "example.org"),
    (b"From: =?UTF-8?B?Sm9obiBEb2U=?= <j@example.org>\r\n", "example.org"),
    (b"From: =?utf-8?q?Doe,John?= <j@example.org>\r\n", "example.org"),   # raw comma inside
    (b"From: =?utf-8?q?ceo@paypal.com?= <x@attacker.test>\r\n", "attacker.test"),
    (b'From: "ceo@paypal.com, Bob" <x@attacker.test>\r\n', "attacker.test"),
    (b'From: "Bob \\" <ceo@paypal.com>" <x@attacker.test>\r\n', "attacker.test"),
    (b"From: (Alice <a@paypal.com>) a@attacker.test (x (nested))\r\n", "attacker.test"),
    (b"From: <@relay.test:a@example.com>\r\n", "example.com"),              # obs-route
    (b"From: Friends: a@example.net;\r\n", "example.net"),                  # a group
    ("From: Jörg <j@bücher.example>\r\n".encode(), "xn--bcher-kva.example"),
    ("From: ceo@faß.de\r\n".encode(), "xn--fa-hia.de"),
    # IDNA 2008 refuses a joiner here; read as a reader sees it (paypal.com's policy)
    ("From: ceo@pay\u200dpal.com\r\n".encode(), "paypal.com"),
    (b"Resent-From: a@other.test\r\nX-From: b@other.test\r\nFrom: c@example.com\r\n",
     "example.com"),
])
def test_from_domain(block, domain):
    assert from_domain(block) == (domain, "")


@pytest.mark.parametrize("block,why", [
    (b"To: b@example.net\r\nSubject: hi", "no From"),
    (b"From: a@example.com\r\nFrom: b@example.org\r\n", "2 From"),
    (b"From: a@example.com, b@example.org\r\n", "2 addresses"),
    (b"From: a@example.com, b@example.com\r\n", "2 addresses"),
    (b"From: Team: a@example.com, b@example.com;\r\n", "2 addresses"),
    (b"From: undisclosed-recipients:;\r\n", "no address"),
    (b"From: \r\n", "no address"),
    (b"From: <>\r\n", "no address"),
    (b"From: alice\r\n", "no domain"),
    (b"From: a@[192.0.2.1]\r\n", "literal"),
    (b"From: a@paypal.com@attacker.test\r\n", "malformed"),
    (b"From: a@paypal.com b@attacker.test\r\n", "malformed"),
    (b"From: Alice <a@example.com\r\n", "malformed"),
    (b"From: Alice <a@example.com> <b@example.org>\r\n", "malformed"),
    (b"From: (unterminated a@example.com\r\n", "malformed"),
    (b"From: a@exa mple..com\r\n", "malformed"),
    (b"From: ceo@bank.example x\r\n", "malformed"),      # no "bank.examplex"
    (b"From: CEO <ceo@bank.example>:x@attacker.example;\r\n", "malformed"),
    (b"From: a@bank.example: x@attacker.example;\r\n", "malformed"),
    (b"From: G1: G2: x@attacker.example;;\r\n", "malformed"),
    (b"From: a@" + b"x" * 300 + b".com\r\n", "invalid"),
])
def test_from_domain_refused(block, why):
    domain, reason = from_domain(block)
    assert domain is None
    assert why in reason


def test_from_domain_survives_garbage():
    rng = __import__("random").Random(7)
    alphabet = b'From:<>@,;:"()\\[] \t\r\nax.=?\xff'
    for _ in range(500):
        block = b"From: " + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        domain, why = from_domain(block)
        assert (domain is None) == bool(why)


def test_from_values_read_as_the_full_header_parser_does():
    """DMARC reads From: without splitting the whole header; on odd blocks it must find
    the same values as header_fields() (folding, bare LF, stray CR, junk lines)."""
    import random

    from mailserver.smtp.headers import field_values, header_fields, named_field_values

    pieces = [b"From: a@b.c", b"from :x", b"FROM:\t<y@z>", b" cont", b"\tmore", b"X-From: no",
              b"Subject: s", b"garbage line", b" ", b"", b"From:", b"To: t", b"\t",
              b"From: (c) d@e.f ", b"From: r\r", b"\r", b" x\ry"]
    rng = random.Random(3)
    for _ in range(20000):
        block = rng.choice([b"\r\n", b"\n"]).join(rng.choice(pieces)
                                                  for _ in range(rng.randint(0, 8)))
        assert named_field_values(block, "from") == field_values(header_fields(block), "from")
