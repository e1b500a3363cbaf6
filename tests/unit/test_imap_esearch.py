"""ESEARCH (RFC 4731) and SEARCHRES (RFC 5182) pieces: RETURN options, the response
line, and what SAVE keeps."""

from __future__ import annotations

import pytest

from mailserver.imap.esearch import (ReturnOptions, compact_set, esearch_response,
                                     parse_return, saved_result)
from mailserver.imap.parser import Arguments, BadCommand


def opts(text: bytes) -> tuple[ReturnOptions | None, bytes]:
    args = Arguments([text])
    return parse_return(args), args.rest()


def test_return_options_parsed_and_consumed():
    assert opts(b"RETURN (MIN MAX) UNSEEN") == (ReturnOptions(min=True, max=True), b"UNSEEN")
    assert opts(b"return () ALL") == (ReturnOptions(all=True), b"ALL")   # RFC 4731 3.1
    assert opts(b"RETURN (SAVE) FLAGGED") == (ReturnOptions(save=True), b"FLAGGED")
    assert opts(b"UNSEEN") == (None, b"UNSEEN")
    assert opts(b"RETURNED") == (None, b"RETURNED")


@pytest.mark.parametrize("bad", [b"RETURN (MIN MIN) ALL", b"RETURN (FOO) ALL",
                                 b"RETURN MIN ALL", b"RETURN (MIN"])
def test_bad_return_options(bad):
    with pytest.raises(BadCommand):
        parse_return(Arguments([bad]))


def test_esearch_lines_as_rfc_4731_shows_them():
    everything = ReturnOptions(min=True, max=True, all=True, count=True)
    assert esearch_response(b"A282", [2, 10, 11], everything, False) == (
        b'ESEARCH (TAG "A282") MIN 2 MAX 11 ALL 2,10:11 COUNT 3')
    assert esearch_response(b"A283", [], everything, True) == b'ESEARCH (TAG "A283") UID COUNT 0'
    assert esearch_response(b"A284", [], ReturnOptions(min=True), False) == (
        b'ESEARCH (TAG "A284")')
    assert not ReturnOptions(save=True).answers


def test_compact_set_and_save():
    assert compact_set([1, 2, 3, 5, 8, 9]) == b"1:3,5,8:9"
    assert saved_result(ReturnOptions(min=True, save=True), [4, 7, 9]) == [4]
    assert saved_result(ReturnOptions(min=True, max=True, save=True), [4, 7, 9]) == [4, 9]
    assert saved_result(ReturnOptions(min=True, max=True, save=True), [4]) == [4]
    assert saved_result(ReturnOptions(min=True, count=True, save=True), [4, 7]) == [4, 7]
    assert saved_result(ReturnOptions(save=True), []) == []
