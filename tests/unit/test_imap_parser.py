"""IMAP argument reading (RFC 3501 9): atoms, strings, literals, lists, sequence sets."""

import pytest

from mailserver.imap.fetch import append_target, parse_date_time, quote_mailbox, uid_set
from mailserver.imap.parser import (MAX_NESTING, Arguments, BadCommand, Literal,
                                    parse_sequence_set)


def args(*parts: bytes) -> Arguments:
    return Arguments(list(parts))


def test_atoms_strings_and_literals():
    a = args(b'tag LOGIN "al\\"ice" ', Literal(b"pa ss"), b"")
    assert a.atom() == b"tag"
    a.space()
    assert a.atom() == b"LOGIN"
    a.space()
    assert a.astring() == b'al"ice'
    a.space()
    assert a.astring() == b"pa ss"
    a.end()


def test_flag_lists_and_nesting():
    a = args(b"(\\Seen $Forwarded foo) rest")
    assert a.flag_list() == [b"\\Seen", b"$Forwarded", b"foo"]
    deep = b"(" * (MAX_NESTING + 3) + b")" * (MAX_NESTING + 3)
    with pytest.raises(BadCommand):
        args(deep).generic()


@pytest.mark.parametrize("bad", [b"", b"0", b"1:", b":2", b"a", b"1,,2", b"01", b"99999999999"])
def test_bad_sequence_sets(bad):
    with pytest.raises(BadCommand):
        parse_sequence_set(bad)


def test_sequence_sets_resolve():
    s = parse_sequence_set(b"5:3,1,7:*")
    assert list(s.resolve(8)) == [1, 3, 4, 5, 7, 8]
    assert s.select([1, 2, 4, 9, 20], 20) == [1, 4, 9, 20]
    assert parse_sequence_set(b"*").contains(12, 12)
    assert not parse_sequence_set(b"1:3").contains(4, 10)


def test_a_set_naming_one_range_many_times_selects_it_once():
    """UID STORE 1:*,1:*,... (10,000 times in a 64 KiB line) once copied the whole view
    per repetition: 868 MB for a 10,000-message folder."""
    view = list(range(1, 10_001))
    s = parse_sequence_set(b",".join([b"1:*"] * 10_000))
    picked = s.select(view, view[-1])
    assert picked == view
    assert parse_sequence_set(b"9:3,5,20:*,2").select([2, 4, 5, 8, 20, 25], 25) == \
        [2, 4, 5, 8, 20, 25]
    assert parse_sequence_set(b"30:40").select([2, 4], 4) == []


def test_unterminated_things_are_bad():
    for text in (b'"abc', b"(a b", b"\x01"):
        with pytest.raises(BadCommand):
            args(text).generic()


def test_append_target_and_dates():
    assert append_target([b"a1 APPEND Sent (\\Seen) \"05-Jan-2024 10:00:00 +0100\" "]) == (
        "Sent", [b"\\Seen"], b"05-Jan-2024 10:00:00 +0100")
    assert append_target([b"a1 APPEND inbox "]) == ("INBOX", [], None)
    assert append_target([b"a1 LOGIN x "]) is None
    assert parse_date_time(b"05-Jan-2024 10:00:00 +0100") == 1704445200.0
    with pytest.raises(BadCommand):
        parse_date_time(b"32-Foo-2024 10:00:00 +0100")
    # A moment that exists: timegm alone stored the 1st of March for 29-Feb-2023
    assert parse_date_time(b"29-Feb-2024 10:00:00 +0000") == 1709200800.0
    assert parse_date_time(b"31-Dec-2024 23:59:60 -1200") == 1735732799.0   # leap second
    for bad in (b"29-Feb-2023 10:00:00 +0000", b"31-Apr-2024 10:00:00 +0000",
                b"00-Jan-2024 10:00:00 +0000", b"01-Jan-2024 25:61:61 +0000",
                b"01-Jan-2024 10:00:00 +0099"):
        with pytest.raises(BadCommand):
            parse_date_time(bad)


def test_formatting_helpers():
    assert uid_set([1, 2, 3, 7, 9, 10]) == b"1:3,7,9:10"
    assert quote_mailbox(b"Sent") == b"Sent"
    assert quote_mailbox(b"My Folder") == b'"My Folder"'
    assert quote_mailbox(b'a"b') == b'"a\\"b"'
