"""cache_short: parses of header values and DNS records are remembered for short
arguments only, so a sender cannot fill the server's memory through the caches."""

from __future__ import annotations

from mailserver.inbound import dkimverify, dmarc, psl
from mailserver.inbound.dmarc import from_domain
from mailserver.shortcache import cache_short


def test_short_arguments_are_remembered_long_ones_computed_each_time() -> None:
    calls: list[object] = []

    @cache_short(maxsize=8, longest=10)
    def parse(value: str) -> str:
        calls.append(value)
        return value.upper()

    assert parse("abc") == "ABC" and parse("abc") == "ABC"
    assert calls == ["abc"]
    long = "x" * 11
    assert parse(long) == long.upper() and parse(long) == long.upper()
    assert calls == ["abc", long, long]
    assert parse.cache_info().currsize == 1
    parse.cache_clear()
    assert parse.cache_info().currsize == 0


def test_several_arguments_and_tuples_count_together() -> None:
    calls: list[tuple] = []

    @cache_short(maxsize=8, longest=10)
    def join(a: str, pairs: tuple[tuple[str, str], ...], flag: bool | None) -> str:
        calls.append((a, pairs, flag))
        return a + "".join(k + v for k, v in pairs)

    assert join("ab", (("c", "d"),), None) == join("ab", (("c", "d"),), None) == "abcd"
    assert len(calls) == 1
    # 7 + 2 + 2 characters: over 10 together although each is short.
    args = ("abcdefg", (("hi", "jk"),), True)
    join(*args)
    join(*args)
    assert len(calls) == 3
    assert join.cache_info().currsize == 1
    # A tuple subclass counts by its items too.
    from collections import namedtuple
    Pair = namedtuple("Pair", "k v")
    join("", (Pair("x" * 20, "y"),), None)
    assert join.cache_info().currsize == 1


def test_hostile_header_values_do_not_stay_in_the_inbound_caches() -> None:
    """A thousand 200 KB From values held 200 MB per cache before the bound."""
    for fn in (dmarc._mailbox_domains, psl.normalize_domain, dkimverify._key_name_of,
               dkimverify._signed_names):
        fn.cache_clear()
    big = b"x" * 200_000
    assert from_domain(b"From: a@" + big + b".example\r\n") is not None
    dkimverify.key_names(b"DKIM-Signature: v=1; d=" + big + b"; s=s; b=x\r\n")
    dkimverify._signed_names(b"from:" + big)
    for fn in (dmarc._mailbox_domains, psl.normalize_domain, dkimverify._key_name_of,
               dkimverify._signed_names):
        assert fn.cache_info().currsize == 0, fn
    # The ordinary case is still remembered.
    assert from_domain(b"From: Alice <alice@example.org>\r\n") == from_domain(
        b"From: Alice <alice@example.org>\r\n")
    assert dmarc._mailbox_domains.cache_info().hits >= 1
