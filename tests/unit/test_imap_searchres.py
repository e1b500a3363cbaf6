"""SEARCHRES (RFC 5182) and ESORT (RFC 5267 3): "$" in the argument reader, the RETURN
options with PARTIAL, what SAVE keeps, the ESEARCH line of a SORT, and whole commands
through a real session and store."""

from __future__ import annotations

import bisect
import random
import re

import pytest
from twisted.internet.defer import inlineCallbacks

from mailserver.imap import sort as SO
from mailserver.imap.esearch import (ReturnOptions, esearch_response, parse_cancelupdate,
                                     parse_return, saved_result, update_lines)
from mailserver.imap.parser import Arguments, BadCommand, SavedSet, saved_set
from tests.unit.imap_session_harness import SessionCase


def message(subject: str, date: str = "Mon, 01 Jan 2024 10:00:00 +0000",
            sender: str = "a@example.org") -> bytes:
    return (f"From: {sender}\r\nTo: b@example.org\r\nSubject: {subject}\r\nDate: {date}\r\n"
            f"\r\nbody of {subject}\r\n").encode()


# -- "$" in the argument reader --------------------------------------------------------------

def test_dollar_is_a_sequence_set_only_where_the_session_allows_it() -> None:
    args = Arguments([b"$ (FLAGS)"])
    with pytest.raises(BadCommand):
        args.sequence_set()
    args = Arguments([b"$ (FLAGS)"])
    args.saved_result = lambda: [3, 4, 5, 9]
    got = args.sequence_set()
    assert isinstance(got, SavedSet) and got.uids == (3, 4, 5, 9)
    assert got.ranges == ((3, 5), (9, 9)) and got.text == b"$"
    assert args.rest() == b" (FLAGS)"
    for text in (b"$,1", b"$1", b"$:3", b"$$"):
        bad = Arguments([text])
        bad.saved_result = lambda: [1]
        with pytest.raises(BadCommand):
            bad.sequence_set()
    inside = Arguments([b"$)"])
    inside.saved_result = lambda: []
    assert inside.sequence_set().uids == ()


def test_saved_set_works_as_a_uid_set() -> None:
    s = saved_set([2, 3, 7])
    assert s.select([1, 2, 3, 4, 7, 8], 8) == [2, 3, 7]
    assert s.contains(7, 8) and not s.contains(4, 8)
    assert list(saved_set([]).resolve(10)) == []


# -- RETURN options --------------------------------------------------------------------------

def opts(text: bytes) -> tuple[ReturnOptions | None, bytes]:
    args = Arguments([text])
    return parse_return(args), args.rest()


def test_context_options() -> None:
    assert opts(b"RETURN (UPDATE CONTEXT COUNT) ALL") == (
        ReturnOptions(update=True, context=True, count=True), b"ALL")
    got, _ = opts(b"RETURN (PARTIAL 500:400 SAVE) ALL")
    assert got == ReturnOptions(partial=(500, 400), save=True)
    assert got.window == (400, 500)
    assert opts(b"RETURN (partial 1:4294967295) ALL")[0].partial == (1, 4294967295)
    assert ReturnOptions(update=True).answers and not ReturnOptions(save=True).answers


@pytest.mark.parametrize("bad", [
    b"RETURN (PARTIAL 0:5) ALL", b"RETURN (PARTIAL 1:*) ALL", b"RETURN (PARTIAL 5) ALL",
    b"RETURN (PARTIAL 1:4294967296) ALL", b"RETURN (PARTIAL 01:5) ALL",
    b"RETURN (PARTIAL -1:5) ALL", b"RETURN (PARTIAL) ALL", b"RETURN (PARTIAL 1:2:3) ALL",
    b"RETURN (PARTIAL 1:5 ALL) ALL", b"RETURN (PARTIAL 1:5 PARTIAL 6:9) ALL",
    b"RETURN (UPDATE UPDATE) ALL", b"RETURN (SAVE " + b"MIN " * 20 + b") ALL",
    b"RETURN (MIN" + b" " * 3,
])
def test_bad_context_options(bad: bytes) -> None:
    with pytest.raises(BadCommand):
        parse_return(Arguments([bad]))


def test_partial_results() -> None:
    window = ReturnOptions(partial=(2, 3))
    assert esearch_response(b"A1", [5, 6, 9, 10], window, True) == (
        b'ESEARCH (TAG "A1") UID PARTIAL (2:3 6,9)')
    assert esearch_response(b"A2", [5, 6], ReturnOptions(partial=(3, 9), count=True),
                            False) == b'ESEARCH (TAG "A2") PARTIAL (3:9 NIL) COUNT 2'
    assert esearch_response(b"A3", [5, 6, 7], ReturnOptions(partial=(9, 2)), False) == (
        b'ESEARCH (TAG "A3") PARTIAL (9:2 6:7)')


def test_sorted_esearch_keeps_the_order() -> None:
    # RFC 5267 3.3: MIN and MAX are the first and last sorted, ALL in sorted order with
    # ranges only where they ascend.
    everything = ReturnOptions(min=True, max=True, all=True, count=True)
    assert esearch_response(b"E01", [23765, 23764, 23763, 23761, 1, 2, 3], everything,
                            True) == (b'ESEARCH (TAG "E01") UID MIN 23765 MAX 3 '
                                      b'ALL 23765,23764,23763,23761,1:3 COUNT 7')


def test_what_save_keeps() -> None:
    # RFC 5182 2.4, and PARTIAL like MIN and MAX: what is returned.
    assert saved_result(ReturnOptions(save=True, partial=(2, 3)), [4, 7, 9, 11]) == [7, 9]
    assert saved_result(ReturnOptions(save=True, partial=(2, 3), min=True),
                        [4, 7, 9, 11]) == [4, 7, 9]
    assert saved_result(ReturnOptions(save=True, partial=(2, 3), count=True),
                        [4, 7, 9, 11]) == [4, 7, 9, 11]
    # A SORT's MIN is its first sorted message.
    assert saved_result(ReturnOptions(save=True, min=True), [9, 2, 5]) == [9]
    assert saved_result(ReturnOptions(save=True, max=True, min=True), [9, 2, 5]) == [5, 9]
    assert saved_result(ReturnOptions(save=True), [9, 2, 5]) == [2, 5, 9]


def test_update_lines() -> None:
    assert update_lines(b"B01", True, [], [(0, [32768, 32769])]) == [
        b'ESEARCH (TAG "B01") UID ADDTO (0 32768:32769)']
    assert update_lines(b"C01", False, [(3, [7, 5])], [(1, [2733]), (1, [2731, 2732])]) == [
        b'ESEARCH (TAG "C01") REMOVEFROM (3 7,5) ADDTO (1 2733 1 2731:2732)']
    many = list(range(1, 20001, 2))   # 10000 single numbers: several lines
    lines = update_lines(b"t", True, [(0, many)], [])
    assert len(lines) > 1 and all(len(line) < 9000 for line in lines)
    back = []
    for line in lines:
        assert line.startswith(b'ESEARCH (TAG "t") UID REMOVEFROM (0 ')
        for part in re.findall(rb"0 ([0-9,:]+)", line):
            back += [int(n) for n in part.split(b",")]
    assert back == many


def test_cancelupdate_arguments() -> None:
    assert parse_cancelupdate(Arguments([b' "B01" "B02"']), 10) == [b"B01", b"B02"]
    for bad in (b"", b" B01", b' "B01" ', b' "a" "b" "c"'):
        with pytest.raises(BadCommand):
            parse_cancelupdate(Arguments([bad]), 2)


def test_sort_order_agrees_with_sort_messages() -> None:
    rng = random.Random(5267)
    subjects = ["a", "b", "c", ""]
    for _ in range(30):
        criteria = [(rng.choice([b"SUBJECT", b"SIZE", b"ARRIVAL", b"FROM", b"DATE"]),
                     rng.random() < 0.5) for _ in range(rng.randint(1, 3))]
        entries = []
        for uid in range(1, 40):
            keys = SO.SortKeys(subject=rng.choice(subjects), from_=rng.choice(subjects),
                               sent=rng.choice([None, 10.0, 20.0]))
            entries.append(SO.make_entry(uid, uid, float(rng.randint(1, 5)),
                                         rng.randint(1, 4), keys))
        expected = [e.uid for e in SO.sort_messages(entries, criteria)]
        order = SO.sort_order(criteria)
        kept: list[tuple] = []
        for e in rng.sample(entries, len(entries)):   # inserted one by one, any order
            key = SO.sort_key_of(e, criteria)
            kept.insert(bisect.bisect_left(kept, order(key), key=order), key)
        assert [k[-1] for k in kept] == expected


# -- whole commands ------------------------------------------------------------------------------

class SearchResSession(SessionCase):

    @inlineCallbacks
    def fill(self, count: int = 6):
        for i in range(count):
            yield self.append(message(f"m{i}"))
        yield self.select()

    @inlineCallbacks
    def test_save_then_use_everywhere(self):
        yield self.fill()
        out = yield self.command(b"a1", b"STORE 2,4,5 +FLAGS (\\Flagged)")
        out = yield self.command(b"a2", b"SEARCH RETURN (SAVE) FLAGGED")
        self.assertNotIn(b"* SEARCH", out)     # SAVE alone: no answer (RFC 5182 2.4)
        self.assertNotIn(b"* ESEARCH", out)
        self.assertIn(b"a2 OK", out)
        out = yield self.command(b"a3", b"FETCH $ (FLAGS)")
        self.assertEqual(re.findall(rb"\* (\d+) FETCH", out), [b"2", b"4", b"5"])
        out = yield self.command(b"a4", b"UID FETCH $ (FLAGS)")
        self.assertEqual(re.findall(rb"UID (\d+)", out), [b"2", b"4", b"5"])
        out = yield self.command(b"a5", b"SEARCH $")
        self.assertIn(b"* SEARCH 2 4 5\r\n", out)
        out = yield self.command(b"a6", b"UID SEARCH UID $ NOT 4")
        self.assertIn(b"* SEARCH 2 5\r\n", out)
        out = yield self.command(b"a7", b"STORE $ +FLAGS.SILENT (\\Deleted)")
        self.assertIn(b"a7 OK", out)
        out = yield self.command(b"a8", b"COPY $ INBOX")
        self.assertIn(b"a8 OK [COPYUID", out)
        out = yield self.command(b"a9", b"UID EXPUNGE $")
        self.assertEqual(re.findall(rb"\* (\d+) EXPUNGE", out), [b"2", b"3", b"3"])
        # expunged: they left "$"
        out = yield self.command(b"b1", b"FETCH $ (FLAGS)")
        self.assertNotIn(b"FETCH (", out)
        self.assertIn(b"b1 OK", out)

    @inlineCallbacks
    def test_dollar_before_any_save_and_after_select(self):
        yield self.fill(3)
        out = yield self.command(b"a1", b"FETCH $ (UID)")
        self.assertEqual(out, b"a1 OK FETCH completed\r\n")
        yield self.command(b"d", b"STORE 1:* +FLAGS.SILENT (\\Deleted)")
        for command in (b"UID EXPUNGE $", b"STORE $ -FLAGS (\\Deleted)", b"MOVE $ INBOX"):
            out = yield self.command(b"e", command)   # the empty set is not "all"
            self.assertRegex(out, rb"^e OK [^\r]*\r\n$")
        out = yield self.command(b"d2", b"STORE 1:* -FLAGS.SILENT (\\Deleted)")
        out = yield self.command(b"a2", b"UID SEARCH RETURN (SAVE ALL) ALL")
        self.assertIn(b'* ESEARCH (TAG "a2") UID ALL 1:3', out)
        yield self.select()
        out = yield self.command(b"a3", b"SEARCH $")
        self.assertIn(b"* SEARCH\r\n", out)
        out = yield self.command(b"a4", b"UID SEARCH RETURN (SAVE) ALL")
        yield self.command(b"a5", b"UNSELECT")
        out = yield self.command(b"a6", b"FETCH $ (UID)")
        self.assertIn(b"a6 BAD", out)   # no mailbox selected
        yield self.select()
        out = yield self.command(b"a7", b"SEARCH RETURN (COUNT) $")
        self.assertIn(b'COUNT 0', out)

    @inlineCallbacks
    def test_no_empties_it_bad_keeps_it(self):
        yield self.fill(4)
        yield self.command(b"a1", b"SEARCH RETURN (SAVE) 2:3")
        out = yield self.command(b"a2", b"SEARCH RETURN (SAVE) NOSUCHKEY")
        self.assertIn(b"a2 BAD", out)
        out = yield self.command(b"a3", b"SEARCH $")
        self.assertIn(b"* SEARCH 2 3\r\n", out)
        out = yield self.command(b"a4", b"SEARCH RETURN (SAVE) CHARSET KOI8-R ALL")
        self.assertIn(b"a4 NO [BADCHARSET", out)
        out = yield self.command(b"a5", b"SEARCH $")
        self.assertIn(b"* SEARCH\r\n", out)
        yield self.command(b"a6", b"SEARCH RETURN (SAVE) 1")
        out = yield self.command(b"a7", b"SORT RETURN (SAVE) (DATE) KOI8-R ALL")
        self.assertIn(b"a7 NO [BADCHARSET", out)
        out = yield self.command(b"a8", b"SEARCH $")
        self.assertIn(b"* SEARCH\r\n", out)

    @inlineCallbacks
    def test_min_max_partial_with_save(self):
        yield self.fill(6)
        out = yield self.command(b"a1", b"SEARCH RETURN (SAVE MIN MAX) 2:5")
        self.assertIn(b'* ESEARCH (TAG "a1") MIN 2 MAX 5\r\n', out)
        out = yield self.command(b"a2", b"SEARCH $")
        self.assertIn(b"* SEARCH 2 5\r\n", out)
        out = yield self.command(b"a3", b"SEARCH RETURN (SAVE PARTIAL 2:3) ALL")
        self.assertIn(b'* ESEARCH (TAG "a3") PARTIAL (2:3 2:3)\r\n', out)
        out = yield self.command(b"a4", b"SEARCH RETURN (ALL) $")
        self.assertIn(b'ALL 2:3', out)
        out = yield self.command(b"a5", b"SEARCH RETURN (SAVE MIN COUNT) 4:6")
        out = yield self.command(b"a6", b"SEARCH $")
        self.assertIn(b"* SEARCH 4 5 6\r\n", out)

    @inlineCallbacks
    def test_pipelined_commands_see_the_saved_result(self):
        # RFC 5182 2.2.3: all sent at once, each sees what the one before saved.
        yield self.fill(5)
        self.transport.clear()
        self.send(b"p1 SEARCH RETURN (SAVE) 2,4\r\np2 FETCH $ (UID)\r\n"
                  b"p3 SEARCH RETURN (SAVE) 5\r\np4 UID FETCH $ (UID)\r\n")
        out = yield self.wait_for(rb"p4 OK[^\r]*\r\n")
        self.assertEqual(re.findall(rb"\* (\d+) FETCH", out), [b"2", b"4", b"5"])
        self.assertLess(out.index(b"p2 OK"), out.index(b"p3 OK"))

    @inlineCallbacks
    def test_esort(self):
        yield self.append(message("b", "Mon, 01 Jan 2024 10:00:00 +0000"))
        yield self.append(message("c", "Sun, 31 Dec 2023 10:00:00 +0000"))
        yield self.append(message("a", "Tue, 02 Jan 2024 10:00:00 +0000"))
        yield self.append(message("d", "Wed, 03 Jan 2024 10:00:00 +0000"))
        yield self.select()
        out = yield self.command(b"s1", b"SORT RETURN (MIN MAX ALL COUNT) (SUBJECT) UTF-8 ALL")
        self.assertIn(b'* ESEARCH (TAG "s1") MIN 3 MAX 4 ALL 3,1:2,4 COUNT 4\r\n', out)
        out = yield self.command(b"s2", b"UID SORT RETURN () (REVERSE DATE) UTF-8 ALL")
        self.assertIn(b'* ESEARCH (TAG "s2") UID ALL 4,3,1:2\r\n', out)
        out = yield self.command(b"s3", b"SORT RETURN (PARTIAL 2:3 SAVE) (DATE) UTF-8 ALL")
        self.assertIn(b'* ESEARCH (TAG "s3") PARTIAL (2:3 1,3)\r\n', out)
        out = yield self.command(b"s4", b"SEARCH $")
        self.assertIn(b"* SEARCH 1 3\r\n", out)
        out = yield self.command(b"s5", b"SORT RETURN (SAVE MIN) (DATE) UTF-8 NOT 2")
        self.assertIn(b'* ESEARCH (TAG "s5") MIN 1\r\n', out)
        out = yield self.command(b"s6", b"SEARCH $")
        self.assertIn(b"* SEARCH 1\r\n", out)
        out = yield self.command(b"s7", b"SORT (SUBJECT) UTF-8 ALL")   # unextended
        self.assertIn(b"* SORT 3 1 2 4\r\n", out)
        out = yield self.command(b"s8", b"SORT RETURN (COUNT) (SUBJECT) UTF-8 SUBJECT zzz")
        self.assertIn(b'* ESEARCH (TAG "s8") COUNT 0\r\n', out)
        out = yield self.command(b"s9", b"SORT RETURN (ALL PARTIAL 1:2) (SUBJECT) UTF-8 ALL")
        self.assertIn(b"s9 BAD", out)
