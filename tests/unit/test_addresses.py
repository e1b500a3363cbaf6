"""Address parsing: canonical forms, and every relay trick refused."""

import re

import pytest

from mailserver.addresses import (AddressError, check_recipient_syntax, is_domain_literal,
                                  normalize, normalize_domain, relay_address, split_address,
                                  subaddress_base)


@pytest.mark.parametrize("addr, expected", [
    ("alice@example.org", ("alice", "example.org")),
    ("Alice.Smith@Example.ORG", ("alice.smith", "example.org")),
    ("a+tag@sub.example.org", ("a+tag", "sub.example.org")),
    ("o'brien@example.org", ("o'brien", "example.org")),
    ("x_y-z=1@example-1.org", ("x_y-z=1", "example-1.org")),
    ("user@localhost", ("user", "localhost")),
    ("user@xn--bcher-kva.example", ("user", "xn--bcher-kva.example")),
])
def test_split_address_accepts_normal_mailboxes(addr, expected):
    assert split_address(addr) == expected


def test_idna_domain_is_encoded():
    assert split_address("user@Bücher.Example") == ("user", "xn--bcher-kva.example")
    assert normalize("Info@MÜNCHEN.de") == "info@xn--mnchen-3ya.de"
    with pytest.raises(AddressError, match="non-ASCII"):
        split_address("jürgen@example.org")


def test_normalize_is_case_insensitive_canonical_form():
    assert normalize("BOB@EXAMPLE.ORG") == "bob@example.org"
    assert normalize('"Bob"@Example.org') == "bob@example.org"


@pytest.mark.parametrize("path, reason", [
    ("@a,@b:user@c", "source route"),
    ("@local:user@other", "source route"),
    ("user%other@local", "'%'"),
    ("other!user@local", "bang path"),
    ("other!user", "bang path"),
    ("user@other@local", "more than one '@'"),
    ('"user@other"@local', "'@'"),
    ('"user%other"@local', "'%'"),
    ('"other!user"@local', "'!'"),
    ("@local", "empty local part"),
    ('""@local', "empty local part"),
    ("user@", "empty domain"),
    ("user", "missing domain"),
    ("", "empty address"),
    ("a" * 65 + "@example.org", "local part longer than 64"),
    ("a@" + ".".join(["b" * 50] * 5) + ".org", "longer than 254"),
    ("us er@example.org", "spaces"),
    ("user@exam ple.org", "spaces"),
    ("user\x00@example.org", "control"),
    ("user\r\n@example.org", "control"),
    ("user\t@example.org", "control"),
    ('"john doe"@example.org', "spaces"),
    ("user\u00a0x@example.org", "spaces"),  # Unicode spaces too (SMTPUTF8 addresses)
    ("user@exam\u2003ple.org", "spaces"),
    ("user@-bad.org", "invalid domain label"),
    ("user@exa_mple.org", "invalid domain label"),
    ("user@example..org", "empty label"),
    ("user@example.org.", "empty label"),
    (".user@example.org", "dots"),
    ("us..er@example.org", "dots"),
    ("user.@example.org", "dots"),
    ("us,er@example.org", "invalid characters"),
    ("user@1.2.3.4", "numeric top-level"),
    ("user@[300.1.1.1]", "domain literal"),
    ("user@[192.0.2.1", "domain literal"),
    ('"unterminated@example.org', "unterminated"),
    ('"abc"x@example.org', "after quoted"),
    ('ab"c"@example.org', "quote"),
])
def test_relay_tricks_and_malformed_paths_refused(path, reason):
    with pytest.raises(AddressError, match=re.escape(reason)):
        check_recipient_syntax(path)


def test_address_error_is_a_value_error():
    assert issubclass(AddressError, ValueError)


def test_quoted_harmless_local_part_is_unquoted():
    assert check_recipient_syntax('"alice"@example.org') == "alice@example.org"
    assert check_recipient_syntax('"a.b"@Example.org') == "a.b@example.org"
    assert check_recipient_syntax('"a\\b"@example.org') == "ab@example.org"


def test_recipient_syntax_returns_normalized():
    assert check_recipient_syntax("Alice+News@Example.Org") == "alice+news@example.org"


def test_domain_literals_are_kept_and_recognised():
    assert check_recipient_syntax("postmaster@[192.0.2.1]") == "postmaster@[192.0.2.1]"
    assert check_recipient_syntax("u@[IPv6:2001:DB8:0::1]") == "u@[ipv6:2001:db8::1]"
    assert is_domain_literal("[192.0.2.1]")
    assert not is_domain_literal("example.org")
    with pytest.raises(AddressError):
        normalize_domain("[192.0.2.1]")


def test_length_limits_at_the_boundary():
    local = "a" * 64
    assert split_address(f"{local}@example.org")[0] == local
    domain = ".".join(["b" * 63] * 3) + "." + "c" * 55  # 247 octets
    addr = "abcdef@" + domain
    assert len(addr) == 254
    assert normalize(addr) == addr
    with pytest.raises(AddressError):
        normalize("x" + addr)


def test_normalize_domain():
    assert normalize_domain("Example.ORG") == "example.org"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"
    for bad in ("", "exa mple.org", "a..b", "-a.org", "x" * 64 + ".org"):
        with pytest.raises(AddressError):
            normalize_domain(bad)


def test_non_text_is_refused():
    with pytest.raises(AddressError):
        split_address(b"alice@example.org")  # type: ignore[arg-type]


@pytest.mark.parametrize("local, base", [
    ("alice+tag", "alice"),
    ("alice+", "alice"),
    ("alice+a+b", "alice"),
    ("alice", None),
    ("+tag", None),
])
def test_subaddress_base(local, base):
    assert subaddress_base(local) == base


def test_subaddress_base_other_separator():
    assert subaddress_base("alice-tag", "-") == "alice"
    assert subaddress_base("alice+tag", "-") is None
    assert subaddress_base("alice+tag", "") is None


def test_relay_address_keeps_the_local_part_as_written():
    assert relay_address("John.Smith@Remote.Example") == "John.Smith@remote.example"
    assert relay_address('"John.Smith"@Remote.Example') == "John.Smith@remote.example"
    assert relay_address("O'Neil+Tag@xn--bcher-kva.example") == "O'Neil+Tag@xn--bcher-kva.example"
    for bad in ("a%b@remote.example", "a@b@remote.example", "@r:a@remote.example",
                "a b@x.example", "a@remote..example"):
        with pytest.raises(AddressError):
            relay_address(bad)
