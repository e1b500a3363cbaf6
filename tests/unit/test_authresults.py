"""Authentication-Results (RFC 8601): the field we write (quoting, comments, folding, line
lengths) and the removal of fields that claim our authserv-id (RFC 8601 5)."""

from __future__ import annotations

import re

import pytest

from mailserver.inbound.authresults import authserv_id_of, format_header, strip_ours

ID = "mail.example.test"


def lines_of(field: bytes) -> list[bytes]:
    assert field.endswith(b"\r\n")
    assert field.count(b"\n") == field.count(b"\r\n"), "bare LF"
    assert field.count(b"\r") == field.count(b"\r\n"), "bare CR"
    lines = field[:-2].split(b"\r\n")
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:]), "continuation without WSP"
    assert all(len(line) <= 998 for line in lines)
    return lines


def unfold(field: bytes) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", field.decode("utf-8"))[:-2]


def test_format_header_layout():
    field = format_header(ID, [
        ("spf", "pass", "reason", {"smtp.mailfrom": "example.com"}),
        ("dkim", "pass", "", {"header.d": "example.com", "header.s": "sel",
                              "header.b": "abcdefgh"}),
        ("dmarc", "pass", "", {"header.from": "example.com"}),
    ])
    assert field == (b"Authentication-Results: mail.example.test;\r\n"
                     b"\tspf=pass (reason) smtp.mailfrom=example.com;\r\n"
                     b"\tdkim=pass header.d=example.com header.s=sel header.b=abcdefgh;\r\n"
                     b"\tdmarc=pass header.from=example.com\r\n")


def test_no_results():
    assert format_header(ID, []) == b"Authentication-Results: mail.example.test; none\r\n"
    # a result that cannot be written as a keyword is left out
    assert format_header(ID, [("sp f", "pass", "", {})]) == (
        b"Authentication-Results: mail.example.test; none\r\n")


@pytest.mark.parametrize("value,written", [
    ("example.com", "example.com"),
    ("a@example.com", "a@example.com"),           # RFC 8601 pvalue: local-part@domain
    ("first.last+tag@sub.example.com", "first.last+tag@sub.example.com"),
    ("ab/cd+ef=", '"ab/cd+ef="'),                 # "/" and "=" are tspecials
    ("two words", '"two words"'),
    ("semi;colon", '"semi;colon"'),
    ('say "hi" \\o/', '"say \\"hi\\" \\\\o/"'),
    ("", '""'),
    ("line\r\nInjected: yes", '"line  Injected: yes"'),
    ("@example.com", "@example.com"),
    ("a@b@c.test", '"a@b@c.test"'),
    # RFC 8601's grammar is ASCII: domains (and selectors, DNS labels too) as A-labels,
    # other non-ASCII as "?" (a d= of a forged signature carried raw UTF-8 in).
    ("b\u00e4nk.example", "xn--bnk-qla.example"),
    ("ceo@b\u00e4nk.example", "ceo@xn--bnk-qla.example"),
    ("ceo@fa\u00df.de", "ceo@xn--fa-hia.de"),   # IDNA 2008, not fass.de
    ("s\u00e9l", "xn--sl-bja"),
    ("j\u00f6rg@example.com", "j?rg@example.com"),
])
def test_values_are_quoted_unless_tokens(value, written):
    field = format_header(ID, [("spf", "pass", "", {"smtp.mailfrom": value})])
    lines_of(field)
    assert unfold(field).endswith(f"spf=pass smtp.mailfrom={written}")


def test_comments_are_escaped_and_cleaned():
    field = format_header(ID, [("spf", "fail", "a (nested) \\ b\r\nX-Injected: 1\x00\x7f é",
                                {"smtp.mailfrom": "x@example.com"})])
    lines_of(field)
    text = unfold(field)
    assert "spf=fail (a \\(nested\\) \\\\ b X-Injected: 1 ?) smtp.mailfrom=x@example.com" in text
    assert b"\r\nX-Injected" not in field


def test_folding_keeps_lines_short():
    comment = "the quick brown fox jumps over the lazy dog " * 6
    field = format_header(ID, [
        ("dkim", "pass", comment, {"header.d": "a-rather-long-subdomain.example.com",
                                   "header.s": "selector2024", "header.a": "rsa-sha256",
                                   "header.b": "AbCdEf12", "header.i": "@example.com"}),
        ("arc", "pass", "", {"arc.chain": "one.example:two.example:three.example"}),
    ])
    lines = lines_of(field)
    assert len(lines) > 4
    assert all(len(line) <= 78 for line in lines), lines
    text = unfold(field)
    assert "header.s=selector2024" in text and "arc=pass arc.chain=" in text
    # the comment survives folding word for word
    inside = re.search(r"dkim=pass \((.*?)\)", text).group(1)
    assert inside.split() == comment.split()
    assert authserv_id_of(text.split(":", 1)[1]) == ID


def test_huge_values_never_make_a_line_over_998():
    field = format_header(ID, [
        ("spf", "pass", "x" * 5000 + " (" * 800, {"smtp.mailfrom": "a" * 3000 + "@example.com",
                                                  "smtp.helo": "é\"" * 2000}),
        ("dkim", "fail", "", {"header.b": "/" * 5000}),
    ])
    lines = lines_of(field)
    assert max(len(line) for line in lines) <= 998
    assert field.decode("utf-8")


def test_authserv_id_of():
    assert authserv_id_of(" mail.example.test; spf=pass") == ID
    assert authserv_id_of(b" mail.example.test 1; none") == ID
    assert authserv_id_of("\r\n\t(a (nested) comment) Mail.Example.Test(x);none") == \
        "Mail.Example.Test"
    assert authserv_id_of(' "mail.example.test"; spf=pass') == ID
    assert authserv_id_of(" mail.example.test") == ID
    for value in ("", " ", " ; spf=pass", " (unterminated mail.example.test; spf=pass",
                  ' "unterminated; spf=pass', " mail.example.test/x; spf=pass",
                  " mail.example.test@evil; spf=pass"):
        assert authserv_id_of(value) is None, value


def test_strip_ours_removes_only_ours():
    kept = [
        b"Received: from mx.other.test by mail.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        b"Authentication-Results: mx.other.test; spf=fail smtp.mailfrom=example.com\r\n",
        b"Authentication-Results: mail.example.test.evil; spf=pass\r\n",
        b"Authentication-Results: evil.mail.example.test; spf=pass\r\n",
        b"Authentication-Results: mail.example.testx;\r\n\tdkim=pass\r\n",
        b"Authentication-Results: mail.example.test/x; spf=pass\r\n",          # unparseable
        b"Authentication-Results: (unterminated mail.example.test; spf=pass\r\n",
        b"ARC-Authentication-Results: i=1; mail.example.test; spf=pass\r\n",
        b"X-Authentication-Results: mail.example.test; spf=pass\r\n",
        b"Subject:  Authentication-Results: mail.example.test;  \r\n\tfolded  \r\n",
        b"X-Odd: \xff\xfe bytes\r\n",
    ]
    ours = [
        b"Authentication-Results: mail.example.test; spf=pass\r\n",
        b"authentication-results: MAIL.EXAMPLE.TEST;\r\n\tdkim=pass header.d=example.com\r\n",
        b"AUTHENTICATION-RESULTS:\r\n mail.example.test 1;\r\n\tnone\r\n",
        b"Authentication-Results: (forged) mail.example.test; dmarc=pass\r\n",
        b"Authentication-Results: (a\r\n (nested)) Mail.Example.Test(x);dmarc=pass\r\n",
        b'Authentication-Results: "mail.example.test"; spf=pass\r\n',
        b"Authentication-Results : mail.example.test; spf=pass\r\n",
        b"Authentication-Results: mail.example.test. ; spf=pass\r\n",
    ]
    block = b"".join(kept[:3] + ours[:4] + kept[3:7] + ours[4:] + kept[7:])
    assert strip_ours(block, ID) == b"".join(kept)
    assert strip_ours(block, "MAIL.example.test") == b"".join(kept)
    # the last field without its CRLF
    assert strip_ours(block + b"Authentication-Results: mail.example.test; none", ID) == \
        b"".join(kept)
    assert strip_ours(block + b"X-Last: kept", ID) == b"".join(kept) + b"X-Last: kept"


def test_strip_ours_keeps_everything_else_byte_for_byte():
    block = (b" leading continuation\r\nSubject: a\r\n  b\r\nX: \t\r\nNoColonLine\r\n"
             b"Authentication-Results: other.test; none\r\nTo: x@y.test")
    assert strip_ours(block, ID) == block
    assert strip_ours(b"", ID) == b""


def test_written_field_is_stripped_again():
    field = format_header(ID, [("spf", "pass", "", {"smtp.mailfrom": "a@example.com"})])
    assert strip_ours(b"To: x@example.test\r\n" + field, ID) == b"To: x@example.test\r\n"
