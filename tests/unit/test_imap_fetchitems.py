"""The FETCH attribute parser (RFC 3501 9 fetch-att, RFC 3516 BINARY, RFC 7162 MODSEQ)."""

from __future__ import annotations

import pytest

from mailserver.imap.fetchitems import (FetchItem, FetchSyntaxError, HeaderSpec,
                                        parse_fetch_items)


def one(text: bytes) -> FetchItem:
    items = parse_fetch_items(text)
    assert len(items) == 1
    return items[0]


def test_macros_expand_as_rfc_3501_6_4_5_says():
    assert [i.type for i in parse_fetch_items(b"ALL")] == [
        "flags", "internaldate", "rfc822size", "envelope"]
    assert [i.type for i in parse_fetch_items(b"fast")] == ["flags", "internaldate", "rfc822size"]
    assert [i.type for i in parse_fetch_items(b"FULL")][-1] == "body"
    with pytest.raises(FetchSyntaxError):
        parse_fetch_items(b"(ALL)")   # a macro is not a fetch-att


def test_simple_attributes_in_a_list():
    items = parse_fetch_items(b"(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE "
                              b"BODY RFC822 RFC822.HEADER RFC822.TEXT MODSEQ)")
    assert [i.type for i in items] == ["uid", "flags", "internaldate", "rfc822size", "envelope",
                                       "bodystructure", "body", "rfc822", "rfc822header",
                                       "rfc822text", "modseq"]
    assert not items[6].is_section


def test_sections():
    assert one(b"BODY[]") == FetchItem("body", empty=True)
    assert one(b"BODY.PEEK[HEADER]") == FetchItem("body", peek=True, header=HeaderSpec())
    assert one(b"body[text]<0.100>") == FetchItem("body", text=True, partial_begin=0,
                                                   partial_length=100)
    assert one(b"BODY[1.2.MIME]") == FetchItem("body", part=(0, 1), mime=True)
    assert one(b"BODY[3]") == FetchItem("body", part=(2,))
    assert one(b'BODY.PEEK[2.HEADER.FIELDS.NOT (Received "X-Spam")]') == FetchItem(
        "body", peek=True, part=(1,), header=HeaderSpec((b"RECEIVED", b"X-SPAM"), True))
    assert one(b"BODY[1.TEXT]").text and one(b"BODY[1.TEXT]").part == (0,)


def test_binary_rfc_3516():
    assert one(b"BINARY[1]") == FetchItem("binary", part=(0,))
    assert one(b"BINARY.PEEK[1.2]<5.10>") == FetchItem("binary", peek=True, part=(0, 1),
                                                       partial_begin=5, partial_length=10)
    assert one(b"BINARY.SIZE[2]") == FetchItem("binarysize", part=(1,))
    assert one(b"BINARY[]").empty


@pytest.mark.parametrize("bad", [
    b"", b"()", b"(UID", b"UID)", b"(UID  FLAGS)", b"NONSENSE", b"BODY[", b"BODY[0]",
    b"BODY[1.]", b"BODY[MIME]", b"BODY[HEADER.FIELDS]", b"BODY[HEADER.FIELDS ()]",
    b"BODY[]<1>", b"BODY[]<1.0>", b"BODY[]<99999999999.1>", b"BINARY[HEADER]",
    b"BINARY[1.TEXT]", b"BINARY.SIZE[1]<0.1>", b"BINARY", b'BODY[HEADER.FIELDS ("a)]',
    b"(" + b"UID " * 70 + b"UID)", b"BODY[" + b"1." * 40 + b"1]",
])
def test_garbage_is_a_syntax_error(bad):
    with pytest.raises(FetchSyntaxError):
        parse_fetch_items(bad)
