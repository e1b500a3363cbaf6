"""SPF (RFC 7208) over a StaticResolver: record selection, every mechanism and qualifier,
include/redirect/exp, macros (the RFC 7208 7.4 examples), the limits of 4.6.4, and that
garbage in DNS or in the SMTP identities ends as an RFC result, never an exception."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from mailserver.inbound.dns import Answer, StaticResolver
from mailserver.inbound.spf import SPFResult, check_host, check_spf, expand_macros

IP4 = "192.0.2.3"
IP6 = "2001:db8::cb01"


def txt(*records: str | bytes) -> Answer:
    return Answer("ok", tuple(r if isinstance(r, bytes) else r.encode() for r in records))


def a(*addresses: str) -> Answer:
    return Answer("ok", tuple(addresses))


def mx(*hosts: str) -> Answer:
    return Answer("ok", tuple((10 * i, h) for i, h in enumerate(hosts)))


def ptr(*names: str) -> Answer:
    return Answer("ok", tuple(names))


def result_of(d: defer.Deferred):
    """StaticResolver answers synchronously, so the Deferred has fired."""
    out: list = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    assert not isinstance(out[0], Exception) and not hasattr(out[0], "getTraceback"), out[0]
    return out[0]


def spf(records: dict, ip: str = IP4, mail_from: str = "alice@example.com",
        helo: str = "mail.example.net") -> SPFResult:
    resolver = StaticResolver(records)
    return result_of(check_spf(resolver, ip, mail_from, helo))


def record(text: str, ip: str = IP4, extra: dict | None = None) -> str:
    """The result for example.com publishing `text`."""
    table = {("example.com", "TXT"): txt(text)}
    table.update(extra or {})
    return spf(table, ip).result


# --- Record selection (RFC 7208 4.4, 4.5) --------------------------------------------

def test_selection():
    assert record("v=spf1 -all") == "fail"
    assert record("V=SpF1 -all") == "fail"                 # case-insensitive
    assert record("v=spf1") == "neutral"                   # empty record
    assert spf({("example.com", "TXT"): txt("v=spf10 -all")}).result == "none"
    assert spf({("example.com", "TXT"): txt("v=spf1-all")}).result == "none"
    assert spf({("example.com", "TXT"): txt("google-site-verification=x",
                                            "v=spf1 -all")}).result == "fail"
    assert spf({("example.com", "A"): a("192.0.2.1")}).result == "none"      # nodata
    assert spf({}).result == "none"                                          # nxdomain
    two = spf({("example.com", "TXT"): txt("v=spf1 +all", "v=spf1 -all")})
    assert two.result == "permerror" and "more than one" in two.reason
    error = spf({("example.com", "TXT"): Answer("error", detail="timeout")})
    assert error.result == "temperror" and "timeout" in error.reason


def test_an_idn_sender_domain_is_checked_in_its_idna_2008_form():
    # RFC 8616 4: faß.de is xn--fa-hia.de; IDNA 2003 made it fass.de, another domain
    table = {("xn--fa-hia.de", "TXT"): txt("v=spf1 -all"),
             ("fass.de", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 -all")}
    r = spf(table, mail_from="x@fa\u00df.de")
    assert (r.result, r.domain) == ("fail", "xn--fa-hia.de")


def test_result_fields():
    r = spf({("example.com", "TXT"): txt("v=spf1 ip4:192.0.2.0/24 -all")}, ip=IP4,
            mail_from="Alice@Example.COM")
    assert r == SPFResult("pass", "mailfrom", "Example.COM", "Alice@Example.COM",
                          "192.0.2.3 matched ip4:192.0.2.0/24 in spf record of Example.COM")
    r = spf({("example.com", "TXT"): txt("v=spf1 -all")}, ip="192.0.2.200")
    assert r.result == "fail" and r.reason == \
        "192.0.2.200 matched -all in spf record of example.com" and r.explanation == ""


# --- Mechanisms and qualifiers (RFC 7208 4.6.2, 5) -----------------------------------

@pytest.mark.parametrize("text,expected", [
    ("v=spf1 all", "pass"), ("v=spf1 +all", "pass"), ("v=spf1 -all", "fail"),
    ("v=spf1 ~all", "softfail"), ("v=spf1 ?all", "neutral"),
    ("v=spf1 -ip4:192.0.2.3 +all", "fail"), ("v=spf1 ~ip4:192.0.2.0/24 -all", "softfail"),
    ("v=spf1 ?ip4:192.0.2.3/32", "neutral"), ("v=spf1 ip4:192.0.2.4 -all", "fail"),
    ("v=spf1 ip4:192.0.2.0/30 -all", "pass"), ("v=spf1 ip4:192.0.2.4/30 -all", "fail"),
    ("v=spf1 ip4:192.0.2.200/0 -all", "pass"), ("v=spf1 ip6:2001:db8::/32 -all", "fail"),
    ("v=spf1 ip4:192.0.2.3", "pass"), ("v=spf1 ip4:192.0.2.4", "neutral"),
])
def test_qualifiers_ip4_all(text, expected):
    assert record(text) == expected


def test_ip6():
    assert record("v=spf1 ip6:2001:db8::cb01 -all", IP6) == "pass"
    assert record("v=spf1 ip6:2001:db8::/32 -all", IP6) == "pass"
    assert record("v=spf1 ip6:2001:db8:1::/48 -all", IP6) == "fail"
    assert record("v=spf1 ip4:192.0.2.0/24 -all", IP6) == "fail"
    # RFC 7208 5: an IPv4-mapped client is IPv4 and never matches ip6.
    assert record("v=spf1 ip4:192.0.2.3 -all", "::ffff:192.0.2.3") == "pass"
    assert record("v=spf1 ip6:::ffff:192.0.2.3 -all", "::ffff:192.0.2.3") == "fail"


def test_a():
    hosts = {("example.com", "A"): a("192.0.2.3"), ("example.com", "AAAA"): a("2001:db8::1"),
             ("mail.example.net", "A"): a("192.0.2.10", "192.0.2.130")}
    assert record("v=spf1 a -all", extra=hosts) == "pass"
    assert record("v=spf1 a:mail.example.net -all", extra=hosts) == "fail"
    assert record("v=spf1 a:mail.example.net/24 -all", extra=hosts) == "pass"
    assert record("v=spf1 a:mail.example.net/29 -all", extra=hosts) == "fail"
    # IPv6 clients look up AAAA and use the second (ip6) CIDR length.
    assert record("v=spf1 a -all", IP6, hosts) == "fail"
    assert record("v=spf1 a//64 -all", IP6, hosts) == "pass"
    assert record("v=spf1 a/32//64 -all", IP6, hosts) == "pass"
    assert record("v=spf1 a/0 -all", IP6, {("example.com", "A"): a("192.0.2.3")}) == "fail"
    assert record("v=spf1 a:nowhere.example.net/0 -all", extra=hosts) == "fail"   # void
    assert record("v=spf1 a/33 -all") == "permerror"
    assert record("v=spf1 a//129 -all") == "permerror"
    assert record("v=spf1 a/24/64 -all") == "permerror"
    assert record("v=spf1 a: -all") == "permerror"
    error = {("example.com", "A"): Answer("error", detail="timeout")}
    assert record("v=spf1 a -all", extra=error) == "temperror"


def test_mx():
    table = {("example.com", "MX"): mx("mx1.example.com", "mx2.example.net"),
             ("mx1.example.com", "A"): a("192.0.2.10"),
             ("mx2.example.net", "A"): a("192.0.2.3"),
             ("mx2.example.net", "AAAA"): a("2001:db8::cb00")}
    assert record("v=spf1 mx -all", extra=table) == "pass"
    assert record("v=spf1 mx -all", IP6, table) == "fail"
    assert record("v=spf1 mx//120 -all", IP6, table) == "pass"
    assert record("v=spf1 -mx:example.com/28 +all", "192.0.2.12", table) == "fail"
    assert record("v=spf1 mx:example.net -all", extra=table) == "fail"    # no MX
    null_mx = {("example.com", "MX"): mx("")}
    assert record("v=spf1 mx ?all", extra=null_mx) == "neutral"
    # RFC 7208 5.4: no MX means no match, never an implicit MX.
    assert record("v=spf1 mx ?all", extra={("example.com", "A"): a(IP4)}) == "neutral"
    broken = dict(table)
    broken[("mx1.example.com", "A")] = Answer("error", detail="timeout")
    assert record("v=spf1 mx -all", extra=broken) == "temperror"


def test_ptr():
    table = {("3.2.0.192.in-addr.arpa", "PTR"): ptr("host.example.com", "liar.example.net"),
             ("host.example.com", "A"): a(IP4), ("liar.example.net", "A"): a("192.0.2.99")}
    assert record("v=spf1 ptr -all", extra=table) == "pass"
    assert record("v=spf1 ptr:example.com -all", extra=table) == "pass"
    assert record("v=spf1 ptr:Host.Example.COM -all", extra=table) == "pass"
    assert record("v=spf1 ptr:ost.example.com -all", extra=table) == "fail"
    # The PTR name liar.example.net does not resolve back to the client.
    assert record("v=spf1 ptr:example.net -all", extra=table) == "fail"
    assert record("v=spf1 ptr/24 -all") == "permerror"
    v6 = {("1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR"):
          ptr("host.example.com"), ("host.example.com", "AAAA"): a(IP6)}
    assert record("v=spf1 ptr -all", IP6, v6) == "pass"
    error = {("3.2.0.192.in-addr.arpa", "PTR"): Answer("error", detail="timeout")}
    assert record("v=spf1 ptr ?all", extra=error) == "neutral"   # RFC 7208 5.5: no match


def test_exists():
    table = {("3.2.0.192.in-addr._spf.example.com", "A"): a("192.0.2.1")}
    assert record("v=spf1 exists:%{ir}.%{v}._spf.%{d} -all", extra=table) == "pass"
    assert record("v=spf1 exists:%{ir}.%{v}._spf.%{d} -all", "192.0.2.4", table) == "fail"
    # The lookup is for A even for an IPv6 client.
    v6 = {("example.net", "A"): a("192.0.2.1")}
    assert record("v=spf1 exists:example.net -all", IP6, v6) == "pass"
    assert record("v=spf1 exists -all") == "permerror"
    error = {("example.net", "A"): Answer("error", detail="timeout")}
    assert record("v=spf1 exists:example.net -all", extra=error) == "temperror"


# --- include and redirect (RFC 7208 5.2, 6.1) ----------------------------------------

@pytest.mark.parametrize("inner,expected", [
    ("v=spf1 +all", "pass"),                 # inner pass: the include matches
    ("v=spf1 -all", "softfail"),             # fail, softfail, neutral: no match
    ("v=spf1 ~all", "softfail"),
    ("v=spf1 ?all", "softfail"),
    ("v=spf1", "softfail"),
    ("v=spf1 include:nowhere.example.net", "permerror"),
    ("v=spf1 bogus", "permerror"),           # inner permerror
    (None, "permerror"),                     # inner none
    (Answer("error", detail="timeout"), "temperror"),
])
def test_include(inner, expected):
    table = {("example.com", "TXT"): txt("v=spf1 include:_spf.example.net ~all")}
    if isinstance(inner, str):
        table[("_spf.example.net", "TXT")] = txt(inner)
    elif inner is not None:
        table[("_spf.example.net", "TXT")] = inner
    assert spf(table).result == expected


def test_include_qualifier_and_domain_macro():
    table = {("example.com", "TXT"): txt("v=spf1 -include:_spf.example.net +all"),
             ("_spf.example.net", "TXT"): txt("v=spf1 a:%{d} -all"),
             ("_spf.example.net", "A"): a(IP4)}
    assert spf(table).result == "fail"
    assert spf(table, ip="192.0.2.9").result == "pass"


def test_redirect():
    table = {("example.com", "TXT"): txt("v=spf1 ip4:192.0.2.9 redirect=_spf.example.net"),
             ("_spf.example.net", "TXT"): txt("v=spf1 a -all"),
             ("_spf.example.net", "A"): a(IP4),
             ("example.com", "A"): a("192.0.2.50")}
    assert spf(table).result == "pass"       # "a" means the redirect target's A
    assert spf(table, ip="192.0.2.9").result == "pass"
    r = spf(table, ip="192.0.2.50")
    assert r.result == "fail" and "_spf.example.net" in r.reason
    # RFC 7208 6.1: ignored when the record has "all"; a target without record is permerror.
    assert record("v=spf1 redirect=_spf.example.net ?all",
                  extra={("_spf.example.net", "TXT"): txt("v=spf1 +all")}) == "neutral"
    assert record("v=spf1 redirect=nowhere.example.net") == "permerror"
    assert record("v=spf1 redirect=") == "permerror"
    assert record("v=spf1 redirect=a.example.net redirect=a.example.net") == "permerror"


# --- exp= (RFC 7208 6.2) -------------------------------------------------------------

def test_explanation():
    table = {("example.com", "TXT"): txt("v=spf1 ip4:192.0.2.100 -all exp=why.%{d}"),
             ("why.example.com", "TXT"): txt("%{i} may not send for %{o} (%{c} at %{r})")}
    r = spf(table)
    assert r.result == "fail"
    assert r.explanation == "192.0.2.3 may not send for example.com (192.0.2.3 at unknown)"
    assert spf(table, ip=IP6).explanation == \
        "2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.b.0.1 may not send for " \
        "example.com (2001:db8::cb01 at unknown)"
    assert spf(table, ip="192.0.2.100").explanation == ""       # only for fail
    soft = dict(table)
    soft[("example.com", "TXT")] = txt("v=spf1 ~all exp=why.%{d}")
    assert spf(soft).explanation == ""
    for broken in (txt("one", "two"), txt("bad %{x} macro"), txt(b"caf\xc3\xa9"),
                   Answer("error", detail="timeout"), Answer("nxdomain")):
        table[("why.example.com", "TXT")] = broken
        r = spf(table)
        assert (r.result, r.explanation) == ("fail", "")
    # exp of an included record is never used; the redirect target's is.
    included = {("example.com", "TXT"): txt("v=spf1 -include:_spf.example.net"),
                ("_spf.example.net", "TXT"): txt("v=spf1 +all exp=inner.example.net"),
                ("inner.example.net", "TXT"): txt("inner")}
    assert spf(included).explanation == ""
    redirected = {("example.com", "TXT"): txt("v=spf1 exp=outer.example.net "
                                              "redirect=_spf.example.net"),
                  ("_spf.example.net", "TXT"): txt("v=spf1 -all exp=inner.example.net"),
                  ("outer.example.net", "TXT"): txt("outer"),
                  ("inner.example.net", "TXT"): txt("inner %{d}")}
    assert spf(redirected).explanation == "inner _spf.example.net"
    assert record("v=spf1 -all exp=") == "permerror"
    assert record("v=spf1 -all exp=%{c}.example.net") == "permerror"   # c only in the text
    assert record("v=spf1 -all exp=a.example.net exp=b.example.net") == "permerror"


# --- Macros (RFC 7208 7) -------------------------------------------------------------

RFC_7_4 = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]


@pytest.mark.parametrize("macro,expansion", RFC_7_4)
def test_rfc_7208_7_4_examples(macro, expansion):
    assert expand_macros(macro, IP4, "email.example.com", "strong-bad@email.example.com",
                         "mail.example.net") == expansion


def test_rfc_7208_7_4_ipv6_example():
    assert expand_macros("%{ir}.%{v}._spf.%{d2}", IP6, "email.example.com",
                         "strong-bad@email.example.com", "mail.example.net") == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


def test_macro_details():
    def x(text, **kw):
        return expand_macros(text, IP4, "example.com", "a-b+c@example.net",
                             "mail.example.net", **kw)
    assert x("%%%_%-") == "% %20"
    assert x("%{h}%{v}") == "mail.example.netin-addr"
    assert x("%{l2r+-}") == "b.a"                          # several delimiters
    assert x("%{L}") == "a-b%2Bc"                          # upper case: URL-escaped
    assert x("%{S}") == "a-b%2Bc%40example.net"
    assert x("%{d99}") == "example.com"
    assert x("%{p}") == "unknown"
    assert x("%{t}", explanation=True).isdigit()
    for bad in ("%{x}", "%{d0}", "%(d)", "%", "a%b", "%{d", "%{c}", "%{r}", "%{t}", "a b"):
        with pytest.raises(ValueError):
            x(bad)
    assert expand_macros("%{l}", IP4, "example.com", "@example.com", "h.example.net") \
        == "postmaster"


def test_macro_errors_in_record_are_permerror():
    for text in ("v=spf1 a:%{z}.example.com", "v=spf1 exists:%(i).example.com",
                 "v=spf1 exists:%{i0}.example.com", "v=spf1 a:foo%.example.com",
                 "v=spf1 ip4:192.0.2.3 x-mod=%q"):
        assert record(text) == "permerror", text


def test_p_macro_uses_validated_name():
    table = {("3.2.0.192.in-addr.arpa", "PTR"): ptr("other.example.net", "mx.example.com"),
             ("other.example.net", "A"): a(IP4), ("mx.example.com", "A"): a(IP4),
             ("mx.example.com.ok.example.net", "A"): a("192.0.2.1")}
    # Both names validate; the one inside <domain> is preferred (RFC 7208 7.3).
    assert record("v=spf1 exists:%{p}.ok.example.net -all", extra=table) == "pass"
    assert record("v=spf1 exists:%{p}.ok.example.net -all", "192.0.2.4", table) == "fail"


def test_long_expansion_is_truncated_from_the_left():
    sender = "x" * 60 + "@" + ".".join(["label"] * 40) + ".example.com"
    resolver = StaticResolver({("example.com", "TXT"): txt("v=spf1 exists:%{o}.%{o} -all")})
    assert result_of(check_host(resolver, IP4, "example.com", sender, "h.example.net"))[0] \
        == "fail"
    name, rtype = resolver.asked[-1]
    assert rtype == "A" and len(name) <= 253 and name.endswith(".label.example.com")


# --- Limits (RFC 7208 4.6.4) ---------------------------------------------------------

def test_ten_dns_terms_allowed_eleven_not():
    hosts = {(f"h{i}.example.net", "A"): a("192.0.2.200") for i in range(12)}
    ten = " ".join(f"a:h{i}.example.net" for i in range(9))
    assert record(f"v=spf1 {ten} a:h9.example.net ip4:192.0.2.3 -all", extra=hosts) == "pass"
    r = spf({("example.com", "TXT"): txt(f"v=spf1 {ten} a:h9.example.net a:h10.example.net "
                                         "ip4:192.0.2.3 -all"), **hosts})
    assert (r.result, r.reason) == ("permerror", "too many DNS lookups")
    # Terms never evaluated are not counted: a match ends the evaluation first.
    assert record(f"v=spf1 ip4:192.0.2.3 {ten} a a a -all", extra=hosts) == "pass"


def test_lookups_count_across_includes():
    table = {("example.com", "TXT"): txt("v=spf1 a include:_spf.example.net a -all"),
             ("_spf.example.net", "TXT"): txt("v=spf1 " + "a " * 8),
             ("example.com", "A"): a("192.0.2.200"), ("_spf.example.net", "A"): a("192.0.2.201")}
    assert spf(table).result == "permerror"


def test_void_lookups():
    assert record("v=spf1 a:n1.example.net a:n2.example.net ?all") == "neutral"
    r = spf({("example.com", "TXT"):
             txt("v=spf1 a:n1.example.net mx:n2.example.net exists:n3.example.net ?all")})
    assert (r.result, r.reason) == ("permerror", "too many void DNS lookups")


def test_self_include_and_redirect_loops():
    r = spf({("example.com", "TXT"): txt("v=spf1 include:example.com -all")})
    assert (r.result, r.reason) == ("permerror", "too many DNS lookups")
    loop = {("example.com", "TXT"): txt("v=spf1 include:example.net -all"),
            ("example.net", "TXT"): txt("v=spf1 include:example.com -all")}
    assert spf(loop).result == "permerror"
    assert record("v=spf1 ip4:192.0.2.9 redirect=example.com") == "permerror"


def test_mx_and_ptr_name_limits():
    names = [f"mx{i}.example.net" for i in range(11)]
    table = {("example.com", "MX"): mx(*names), ("mx10.example.net", "A"): a(IP4)}
    assert record("v=spf1 mx -all", extra=table) == "permerror"
    table[("example.com", "MX")] = mx(*names[1:])
    assert record("v=spf1 mx -all", extra=table) == "pass"
    # Only the first 10 PTR names are tried (the 11th would match).
    ptrs = {("3.2.0.192.in-addr.arpa", "PTR"): ptr(*names), ("mx10.example.net", "A"): a(IP4)}
    assert record("v=spf1 ptr:example.net -all", extra=ptrs) == "fail"
    ptrs[("3.2.0.192.in-addr.arpa", "PTR")] = ptr(*names[1:])
    assert record("v=spf1 ptr:example.net -all", extra=ptrs) == "pass"


# --- Syntax and garbage --------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "v=spf1 ip4:192.0.2.3 foo -all",          # unknown mechanism, even after a match
    "v=spf1 ip4:192.0.2.3 -all.", "v=spf1 ip4:192.0.2.3 all:x", "v=spf1 ip4:192.0.2.3 all/8",
    "v=spf1 ip4:192.0.2.3/33", "v=spf1 ip4:192.0.2.3/032", "v=spf1 ip4:192.0.2",
    "v=spf1 ip4:192.0.2.3:25", "v=spf1 ip4", "v=spf1 ip6:2001:db8::1/129", "v=spf1 ip6",
    "v=spf1 ip6:2001:db8::1//64", "v=spf1 ip6:2001::db8::1", "v=spf1 ip6:fe80::1%eth0",
    "v=spf1 ip4:192.0.2.3 a:example", "v=spf1 ip4:192.0.2.3 a:example.123",
    "v=spf1 ip4:192.0.2.3 include:example.com:25", "v=spf1 ip4:192.0.2.3 include",
    "v=spf1 ip4:192.0.2.3 redirect:example.net", "v=spf1 ip4:192.0.2.3 =x",
    "v=spf1 ip4:192.0.2.3 1x=y", "v=spf1 ip4:192.0.2.3\t-all", "v=spf1 ip4:192.0.2.3 \x00",
    "v=spf1 ip4:192.0.2.3 a:example.-com",
])
def test_syntax_errors_are_permerror(text):
    assert record(text) == "permerror"


def test_unknown_modifiers_ignored():
    assert record("v=spf1 ip4:192.0.2.3 default=deny moo.cow-far_out=man:dog/cat -all") == "pass"
    assert record("v=spf1  ip4:192.0.2.3   -all  ") == "pass"      # runs of spaces


def test_garbage_records():
    assert spf({("example.com", "TXT"): txt(b"v=spf1 \xff -all")}).result == "permerror"
    huge = "v=spf1 " + "ip4:192.0.2.1 " * 2000 + "-all"
    r = spf({("example.com", "TXT"): txt(huge)})
    assert r.result == "permerror" and "too long" in r.reason
    # Non-SPF garbage next to the SPF record is none of our business.
    assert spf({("example.com", "TXT"): txt(b"\x96\x00", "v=spf1 -all")}).result == "fail"


def test_invalid_domains_give_none():
    long_label = "x" * 64
    assert spf({}, mail_from=f"a@{long_label}.example.com").result == "none"
    assert spf({}, mail_from="a@example..com").result == "none"
    assert spf({}, mail_from="a@[192.0.2.1]").result == "none"
    assert spf({}, mail_from="no-domain").result == "none"
    resolver = StaticResolver({})
    assert result_of(check_host(resolver, IP4, "localhost", "a@localhost", "h"))[0] == "none"
    assert resolver.asked == []          # nothing worth asking DNS
    # An include target that is not a domain name: "none" there, so permerror.
    table = {("example.com", "TXT"): txt("v=spf1 include:%{l}.example.net -all")}
    assert spf(table, mail_from=f"{long_label}@example.com").result == "permerror"


# --- Identities (RFC 7208 2.3, 2.4) --------------------------------------------------

def test_empty_mail_from_checks_helo():
    table = {("mail.example.net", "TXT"): txt("v=spf1 a -all"),
             ("mail.example.net", "A"): a(IP4)}
    r = spf(table, mail_from="", helo="mail.example.net")
    assert r == SPFResult("pass", "helo", "mail.example.net", "postmaster@mail.example.net",
                          "192.0.2.3 matched a in spf record of mail.example.net")
    assert spf(table, mail_from="<>", helo="mail.example.net").identity == "helo"
    assert spf(table, ip="192.0.2.4", mail_from="", helo="mail.example.net").result == "fail"
    for helo in ("[192.0.2.3]", "192.0.2.3", "localhost", "", "bad_host!.example.net"):
        r = spf(table, mail_from="", helo=helo)
        assert (r.result, r.identity) == ("none", "helo"), helo


def test_mail_from_macros_and_empty_local_part():
    table = {("example.com", "TXT"): txt("v=spf1 exists:%{l}.users.%{d} -all"),
             ("postmaster.users.example.com", "A"): a("192.0.2.1")}
    r = spf(table, mail_from="@example.com")
    assert (r.result, r.sender) == ("pass", "postmaster@example.com")
    assert spf(table, mail_from="bob@example.com").result == "fail"


def test_dns_is_asked_lazily_in_order():
    resolver = StaticResolver({
        ("example.com", "TXT"): txt("v=spf1 ip4:192.0.2.3 a:a.example.net mx -all"),
        ("a.example.net", "A"): a("192.0.2.3")})
    assert result_of(check_spf(resolver, IP4, "x@example.com", "h.example.net")).result == "pass"
    assert resolver.asked == [("example.com", "TXT")]
    resolver.asked.clear()
    assert result_of(check_spf(resolver, "192.0.2.9", "x@example.com", "h.example.net")) \
        .result == "fail"
    assert resolver.asked == [("example.com", "TXT"), ("a.example.net", "A"),
                              ("example.com", "MX")]


def test_never_fails():
    class Broken(StaticResolver):
        def lookup(self, name, rtype):
            raise RuntimeError("resolver bug")

    r = result_of(check_spf(Broken({}), IP4, "x@example.com", "h.example.net"))
    assert (r.result, r.reason) == ("temperror", "internal error")
    assert result_of(check_host(Broken({}), IP4, "example.com", "x@example.com", "h")) == \
        ("temperror", "internal error")
    r = spf({("example.com", "TXT"): txt("v=spf1 +all")}, ip="not-an-ip")
    assert r.result == "none"


def test_check_host_directly():
    resolver = StaticResolver({("example.net", "TXT"): txt("v=spf1 ip6:2001:db8::/32 -all")})
    assert result_of(check_host(resolver, IP6, "example.net", "x@example.com", "h")) == (
        "pass", "2001:db8::cb01 matched ip6:2001:db8::/32 in spf record of example.net")
    assert result_of(check_host(resolver, IP4, "example.net", "", "h"))[0] == "fail"
