"""SORT and THREAD (RFC 5256) with SORT=DISPLAY (RFC 5957).

The first part runs the pure rules of mailserver.imap.sort: base subjects (2.1), sent dates
(2.2), every sort key with REVERSE, the criteria grammar, ORDEREDSUBJECT and REFERENCES
(loops, dummies, duplicate Message-IDs, the subject merge) and the thread-list syntax.
The second part drives the SortingCommands mixin through a real IMAPSession subclass over
StringTransport, logged in through the real portal, on a real Maildir folder.
"""

from __future__ import annotations

import calendar
import random
import shutil
import subprocess
import sys
import tempfile
from functools import cmp_to_key
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.auth import AuthThrottle, MailRealm, build_portal
from mailserver.config import LimitsConfig
from mailserver.imap import sort as SO
from mailserver.imap.context import IMAPContext
from mailserver.imap.mailbox import IIMAPAccount
from mailserver.imap.parser import Arguments, BadCommand
from mailserver.imap.server import IMAPSession
from mailserver.imap.service import avatar_factory
from mailserver.imap.sorting import SORT_CAPABILITIES, SortingCommands
from mailserver.maildir import MaildirStore
from mailserver.passwords import hash_password


def utc(*fields: int) -> float:
    return float(calendar.timegm(fields + (0,) * (6 - len(fields)) + (0, 0, 0)))


def msg(seq: int, subject: str = "", date: str = "", *, uid: int | None = None,
        internal: float | None = None, size: int = 100, mid: str = "", refs: str = "",
        irt: str = "", from_: str = "", to: str = "", cc: str = "") -> SO.SortMessage:
    return SO.SortMessage(
        uid=uid if uid is not None else seq * 10, seq=seq,
        internaldate=internal if internal is not None else utc(2024, 1, 1) + seq,
        size=size, date=date, subject=subject,
        from_=SO.parse_address_list(from_), to=SO.parse_address_list(to),
        cc=SO.parse_address_list(cc), message_id=mid, references=refs, in_reply_to=irt)


def seqs(entries: list[SO.Entry]) -> list[int]:
    return [e.seq for e in entries]


def day(n: int) -> str:
    """A Date: value n days into January 2024 (n up to 28)."""
    return f"Mon, {n:02d} Jan 2024 10:00:00 +0000"


# -- RFC 5256 2.1 base subject -------------------------------------------------------------------

BASE_SUBJECTS = [
    # (subject, base subject, reply or forward)
    ("Hello", "hello", False),
    ("Re: Hello", "hello", True),
    ("RE: re: Re:hello", "hello", True),
    ("Fw: Hello", "hello", True),
    ("FWD: Hello", "hello", True),
    ("Re : Hello", "hello", True),                 # *WSP before the colon
    ("Re[2]: Hello", "hello", True),               # a blob inside subj-refwd
    ("Re [2] : Hello", "hello", True),
    ("Rex: Hello", "rex: hello", False),            # not a subj-refwd
    ("Hello (fwd)", "hello", True),                 # subj-trailer
    ("Hello (FWD) (fwd)  ", "hello", True),
    ("Hello(fwd)x", "hello(fwd)x", False),
    ("[list] Hello", "hello", False),               # step 4: a blob alone is no reply
    ("[list] Re: Hello", "hello", True),            # *subj-blob subj-refwd
    ("[a][b]Re: Hello", "hello", True),
    ("Re: [list] Fwd: (fwd)", "", True),            # everything is leader or trailer
    ("Re: [list] Re: Hello", "hello", True),
    ("Fwd: [list] Hello", "hello", True),
    ("[fwd: Re: x]", "x", True),                    # step 6 wrapper, then from step 2
    ("Re: [fwd: hello]", "hello", True),
    ("[Fwd: [fwd: a] ] (fwd)", "a", True),
    ("[fwd: ]", "", True),
    ("[fwd:x", "[fwd:x", False),                    # no trailer: no wrapper
    ("[blob]", "[blob]", False),                    # a blob alone stays (subj-base)
    ("[blob1] [blob2]", "[blob2]", False),          # ... the last one of several
    ("Re: [a] [b]", "[b]", True),
    ("[unclosed Hello", "[unclosed hello", False),
    ("", "", False),
    ("   ", "", False),
    ("Re:", "", True),
    ("Multi\t word \r\n  subject", "multi word subject", False),  # step 1
    ("CAFÉ Ünïcode", "café ünïcode", False),
]


@pytest.mark.parametrize("subject,base,reply", BASE_SUBJECTS)
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    got, was_reply = SO.base_subject(subject)
    assert (got.lower(), was_reply) == (base, reply)   # case is collation_key's business


def test_base_subject_of_many_blobs_is_linear() -> None:
    import time

    start = time.perf_counter()
    assert SO.base_subject("[a] " * 20000 + "x") == ("x", False)
    assert SO.base_subject("[a]" * 20000)[0] == "[a]"
    assert time.perf_counter() - start < 1.0


# -- RFC 5256 2.2 sent date ----------------------------------------------------------------------

def test_sent_date_in_utc_with_internaldate_fallback() -> None:
    assert SO.parse_sent_date("Mon, 01 Jan 2024 12:00:00 +0200") == utc(2024, 1, 1, 10)
    assert SO.parse_sent_date("1 Jan 2024 12:00:00 -0130") == utc(2024, 1, 1, 13, 30)
    # an unknown zone is taken as UTC, not as the server's local time
    assert SO.parse_sent_date("Mon, 01 Jan 2024 12:00:00 XYZ") == utc(2024, 1, 1, 12)
    assert SO.parse_sent_date("yesterday") is None
    assert SO.parse_sent_date("") is None
    dated = SO.entry(msg(1, date="Mon, 01 Jan 2024 12:00:00 +0000", internal=5.0))
    undated = SO.entry(msg(2, date="garbage", internal=7.0))
    assert (dated.sent, undated.sent) == (utc(2024, 1, 1, 12), 7.0)


# -- sort keys (RFC 5256 3, RFC 5957 4) ----------------------------------------------------------

SORT_SET = [
    msg(1, "Re: beta", day(3), internal=300.0, size=500, from_="Zed <bob@z.test>",
        to="carol@example.test", cc="Y <y@example.test>"),
    msg(2, "alpha", day(1), internal=100.0, size=200, from_="adam@a.test",
        to="=?utf-8?q?=C3=89mile?= <zz@example.test>"),
    msg(3, "Beta", "", internal=200.0, size=900, from_="\"Carl\" <ann@c.test>",
        to="Bob <aaron@example.test>", cc="x@example.test"),
    msg(4, "[list] ALPHA", day(2), internal=50.0, size=200, from_="",
        to="undisclosed-recipients:;"),
]


@pytest.mark.parametrize("criteria,expected", [
    ("ARRIVAL", [4, 2, 3, 1]),
    ("REVERSE ARRIVAL", [1, 3, 2, 4]),
    ("DATE", [3, 2, 4, 1]),                  # 3 has no Date: its INTERNALDATE (200 s)
    ("REVERSE DATE", [1, 4, 2, 3]),
    ("SIZE", [2, 4, 1, 3]),                  # 2 and 4 tie: sequence order
    ("REVERSE SIZE", [3, 1, 2, 4]),          # ... also reversed
    ("SUBJECT", [2, 4, 1, 3]),               # "alpha" x2, "beta" x2, ties by sequence
    ("REVERSE SUBJECT", [1, 3, 2, 4]),
    ("SUBJECT REVERSE DATE", [4, 2, 1, 3]),
    ("FROM", [4, 2, 3, 1]),                  # "", adam, ann, bob: the local part
    ("REVERSE FROM", [1, 3, 2, 4]),
    ("TO", [3, 1, 4, 2]),                    # aaron, carol, undisclosed-recipients, zz
    ("CC", [2, 4, 3, 1]),                    # missing first, then x, y
    ("DISPLAYFROM", [4, 2, 3, 1]),           # "", adam@a.test, Carl, Zed
    ("REVERSE DISPLAYFROM", [1, 3, 2, 4]),
    ("DISPLAYTO", [3, 1, 2, 4]),             # Bob, carol@..., Émile, undisclosed...
    ("REVERSE DISPLAYTO", [4, 2, 1, 3]),
])
def test_sort_keys(criteria: str, expected: list[int]) -> None:
    parsed = SO.criteria_from_words(criteria.encode().split())
    assert seqs(SO.sort_messages(SORT_SET, parsed)) == expected


def test_display_sort_value_is_the_name_else_the_addr_spec() -> None:
    named = SO.sort_keys(msg(1, from_="=?iso-8859-1?q?J=F6rg?= <z@example.test>"))
    bare = SO.sort_keys(msg(2, from_="Jack@Example.test"))
    comment = SO.sort_keys(msg(3, from_="jill@example.test (Jill Doe)"))
    assert (named.display_from, bare.display_from, comment.display_from) == \
        (SO.collation_key("jörg"), "JACK@EXAMPLE.TEST", "JILL DOE")
    assert (named.from_, bare.from_) == ("Z", "JACK")
    # A quoted local part compares unquoted (the ENVELOPE addr-mailbox).
    assert SO.sort_keys(msg(4, from_='"A B"@example.test')).from_ == "A B"


def test_collation_is_unicode_casemap() -> None:
    # RFC 5051: titlecased/folded, decomposed, compared by octets: case does not count,
    # and an accented letter sorts as its base letter followed by the accent.
    words = ["zoe", "Émile", "eve", "Ángel", "adam", "ÉMILE", "Ezra"]
    ordered = sorted(words, key=SO.collation_key)
    assert ordered == ["adam", "Ángel", "eve", "Ezra", "Émile", "ÉMILE", "zoe"]
    # Titlecase, not lower case: the characters between "Z" and "a" come after the
    # letters, as in Dovecot ("[list]" subjects, "_x" mailboxes).
    assert sorted(["_under", "[blob]", "zz", "AA", "mid"], key=SO.collation_key) == \
        ["AA", "mid", "zz", "[blob]", "_under"]
    # The simple titlecase mapping: "ß" has none, so it is not "ss" (two threads).
    assert SO.collation_key("Straße") != SO.collation_key("STRASSE")
    assert SO.collation_key("ǆ") == SO.collation_key("ǅ") == SO.collation_key("ǅ")


def test_reverse_does_not_reverse_the_sequence_tie_break() -> None:
    same = [msg(n, "same", day(1)) for n in (1, 2, 3)]
    for words in (b"SUBJECT", b"REVERSE SUBJECT", b"REVERSE DATE", b"REVERSE FROM"):
        assert seqs(SO.sort_messages(same, SO.criteria_from_words(words.split()))) == [1, 2, 3]


# -- sort criteria and algorithm names -----------------------------------------------------------

def test_parse_sort_criteria() -> None:
    args = Arguments([b"(reverse Date SUBJECT DISPLAYFROM) UTF-8 ALL"])
    assert SO.parse_sort_criteria(args) == [(b"DATE", True), (b"SUBJECT", False),
                                            (b"DISPLAYFROM", False)]
    assert args.peek() == b" "


@pytest.mark.parametrize("text", [
    b"()", b"(REVERSE)", b"(DATE REVERSE)", b"(REVERSE REVERSE DATE)", b"(NOSUCH)",
    b"(DATE", b"DATE", b"((DATE))", b'("DATE")', b"(DATE  SUBJECT)",
    b"(" + b" ".join([b"DATE"] * 33) + b")",
    b"(" + b" ".join([b"REVERSE"] * 5000) + b")",
])
def test_bad_sort_criteria(text: bytes) -> None:
    with pytest.raises(BadCommand):
        SO.parse_sort_criteria(Arguments([text]))


def test_thirty_two_criteria_are_fine() -> None:
    words = b" ".join([b"REVERSE DATE"] * 32)
    assert len(SO.parse_sort_criteria(Arguments([b"(" + words + b")"]))) == 32


def test_thread_algorithm_and_charset_names() -> None:
    assert SO.parse_thread_algorithm(b"references") == b"REFERENCES"
    assert SO.parse_thread_algorithm(b"OrderedSubject") == b"ORDEREDSUBJECT"
    with pytest.raises(BadCommand):
        SO.parse_thread_algorithm(b"REFS")
    assert SO.canonical_charset(b"utf-8") == b"UTF-8"
    assert SO.canonical_charset(b"us-ascii") == b"US-ASCII"
    assert SO.canonical_charset(b"ISO-8859-1") is None


# -- thread-list syntax --------------------------------------------------------------------------

def test_format_threads_example() -> None:
    def node(seq: int, *children: SO.Thread) -> SO.Thread:
        t = SO.Thread(SO.entry(msg(seq)), list(children))
        for c in children:
            c.parent = t
        return t

    threads = [node(2), node(3, node(6, node(4, node(23)), node(44, node(7, node(96)))))]
    assert SO.format_threads(threads) == b"(2)(3 6 (4 23)(44 7 96))"
    assert SO.thread_response(threads, uid=True) == b"THREAD (20)(30 60 (40 230)(440 70 960))"
    assert SO.thread_response([], uid=False) == b"THREAD"
    dummy = SO.Thread(None, [node(5), node(8, node(9))])
    assert SO.format_threads([dummy]) == b"((5)(8 9))"


def thread(messages: list[SO.SortMessage], algorithm: str = "references") -> bytes:
    build = SO.thread_references if algorithm == "references" else SO.thread_orderedsubject
    return SO.format_threads(build(messages))


# -- ORDEREDSUBJECT ------------------------------------------------------------------------------

def test_orderedsubject() -> None:
    messages = [
        msg(1, "Lunch", day(5)),
        msg(2, "Re: lunch", day(6)),
        msg(3, "Budget", day(2)),
        msg(4, "[list] LUNCH", day(1)),     # the earliest of the lunch thread: its root
        msg(5, "Re: Budget", day(3)),
        msg(6, "Single", day(4)),
        msg(7, "Re: Budget", day(3)),       # same date as 5: sequence order
    ]
    # threads ordered by their first message's date: lunch (day 1), budget (2), single (4);
    # a thread is its first message with every other one as its child, no deeper.
    assert thread(messages, "orderedsubject") == b"(4 (1)(2))(3 (5)(7))(6)"
    assert thread(messages[:2], "orderedsubject") == b"(1 2)"
    assert thread([], "orderedsubject") == b""


# -- REFERENCES ----------------------------------------------------------------------------------

def test_references_chain_and_branches() -> None:
    messages = [
        msg(1, "Plan", day(1), mid="<1@x>"),
        msg(2, "Re: Plan", day(2), mid="<2@x>", refs="<1@x>"),
        msg(3, "Re: Plan", day(4), mid="<3@x>", refs="<1@x> <2@x>"),
        msg(4, "Re: Plan", day(3), mid="<4@x>", refs="<1@x>"),
        msg(5, "Other", day(5), mid="<5@x>"),
    ]
    # 1 has two replies (2 on day 2, 4 on day 3); 3 answers 2.
    assert thread(messages) == b"(1 (2 3)(4))(5)"


def test_in_reply_to_only_without_references() -> None:
    messages = [
        msg(1, "A", day(1), mid="<a@x>"),
        msg(2, "B", day(2), mid="<b@x>"),
        msg(3, "Re: B", day(3), mid="<c@x>", refs="<b@x>", irt="<a@x>"),
        msg(4, "Re: A", day(4), mid="<d@x>", irt="<a@x> <b@x>"),   # only the first counts
        msg(5, "Re: A", day(5), mid="<e@x>", irt="Your message of <a@x>"),
    ]
    assert thread(messages) == b"(1 (4)(5))(2 3)"


def test_msg_id_quoting_is_normalized() -> None:
    messages = [
        msg(1, "Q", day(1), mid='<"01KF8JCEOCBS0045PS"@xxx.yyy.com>'),
        msg(2, "X", day(2), mid="<q2@x>", refs="<01KF8JCEOCBS0045PS@xxx.yyy.com>"),
    ]
    assert thread(messages) == b"(1 2)"


def test_missing_parents_become_dummies() -> None:
    messages = [
        # Two answers to a message not in the mailbox: a dummy at the top holds both.
        msg(1, "Re: Gone", day(2), mid="<1@x>", refs="<gone@x>"),
        msg(2, "Re: Gone", day(1), mid="<2@x>", refs="<gone@x>"),
        # One answer to another missing message: promoted to the top itself.
        msg(3, "Re: Lost", day(3), mid="<3@x>", refs="<lost@x>"),
        # A missing message in the middle of a thread: its child moves up to 4.
        msg(4, "Kept", day(4), mid="<4@x>"),
        msg(5, "Re: Kept", day(5), mid="<5@x>", refs="<4@x> <missing@x>"),
    ]
    assert thread(messages) == b"((2)(1))(3)(4 5)"


def test_reference_loops_are_not_followed() -> None:
    messages = [
        msg(1, "A", day(1), mid="<a@x>", refs="<b@x>"),
        msg(2, "B", day(2), mid="<b@x>", refs="<a@x>"),              # a loop of two
        msg(3, "C", day(3), mid="<c@x>", refs="<c@x>"),              # itself
        msg(4, "D", day(4), mid="<d@x>", refs="<e@x> <d@x> <e@x>"),  # around itself
        msg(5, "E", day(5), mid="<e@x>", refs="<f@x> <g@x> <f@x>"),  # f-g-f in the chain
    ]
    out = thread(messages)
    # Every message exactly once, and the first link made wins: b is a's parent (from
    # message 1), so message 2's own link to a would close the loop and is not made.
    numbers = [int(n) for n in out.replace(b"(", b" ").replace(b")", b" ").split()]
    assert sorted(numbers) == [1, 2, 3, 4, 5]
    assert out == b"(2 1)(3)(5 4)", out


def test_duplicate_message_ids() -> None:
    messages = [
        msg(1, "Dup", day(1), mid="<dup@x>"),
        msg(2, "Dup copy", day(2), mid="<dup@x>"),        # gets an id of its own
        msg(3, "Re: Dup", day(3), mid="<3@x>", refs="<dup@x>"),
        msg(4, "No id", day(4)),
        msg(5, "No id", day(5), mid="not an id"),
    ]
    # 3 answers the first message with that id; the copy stands alone; the messages
    # without a valid Message-ID are threads of their own ... and share a subject.
    assert thread(messages) == b"(1 3)(2)((4)(5))"


def test_subject_merge() -> None:
    messages = [
        # A reply whose client dropped References joins the original (step 5.C, reply).
        msg(1, "Lunch", day(1), mid="<1@x>"),
        msg(2, "Re: Lunch", day(2), mid="<2@x>"),
        # Two originals with one subject: a new dummy holds both.
        msg(3, "Report", day(3), mid="<3@x>"),
        msg(4, "report", day(4), mid="<4@x>"),
        # A dummy (two answers to a missing message) takes the original in as a child.
        msg(5, "Re: Party", day(5), mid="<5@x>", refs="<p@x>"),
        msg(6, "Re: Party", day(7), mid="<6@x>", refs="<p@x>"),
        msg(7, "Party", day(6), mid="<7@x>"),
        # Empty subjects are never merged.
        msg(8, "", day(8), mid="<8@x>"),
        msg(9, "Re:", day(9), mid="<9@x>"),
    ]
    assert thread(messages) == b"(1 2)((3)(4))((5)(7)(6))(8)(9)"


def test_subject_merge_prefers_the_original_as_parent() -> None:
    messages = [
        msg(1, "Re: News", day(1), mid="<1@x>"),   # the reply is first in the mailbox
        msg(2, "News", day(2), mid="<2@x>"),
        msg(3, "Fwd: News", day(3), mid="<3@x>"),
    ]
    assert thread(messages) == b"(2 (1)(3))"


def test_siblings_sorted_by_date_then_sequence() -> None:
    messages = [
        msg(1, "T", day(1), mid="<t@x>"),
        msg(2, "Re: T", day(9), mid="<2@x>", refs="<t@x>"),
        msg(3, "Re: T", day(5), mid="<3@x>", refs="<t@x>"),
        msg(4, "Re: T", day(5), mid="<4@x>", refs="<t@x>"),
        msg(5, "Re: T", "", mid="<5@x>", refs="<t@x>", internal=utc(2024, 1, 7)),
    ]
    assert thread(messages) == b"(1 (3)(4)(5)(2))"


def test_deep_thread_needs_no_recursion() -> None:
    n = 5000
    messages = [msg(1, "Deep", day(1), mid="<0@x>")] + [
        msg(i, "Re: Deep", day(1), mid=f"<{i - 1}@x>", irt=f"<{i - 2}@x>")
        for i in range(2, n + 1)]
    assert thread(messages) == b"(" + b" ".join(b"%d" % i for i in range(1, n + 1)) + b")"


# -- positions and columns: what a folder's table answers ------------------------------------------

def random_messages(rng: random.Random, n: int) -> list[SO.SortMessage]:
    """Messages with few distinct values, so that ties, shared subjects, duplicate and
    missing Message-IDs and reference loops are common."""
    ids = [f"<{i}@x>" for i in range(10)]
    subjects = ["Plan", "Re: plan", "Budget", "", "Fwd: budget", "x"]
    out = []
    for seq in range(1, n + 1):
        refs = " ".join(rng.choice(ids) for _ in range(rng.choice([0, 0, 1, 2, 4])))
        out.append(msg(seq, rng.choice(subjects),
                       day(rng.randint(1, 4)) if rng.random() < 0.8 else "garbage",
                       internal=utc(2024, 1, rng.randint(1, 4)), size=rng.randint(1, 3),
                       mid=rng.choice([*ids, ""]), refs=refs,
                       irt=rng.choice(["", ids[0]]), from_=rng.choice(["a@x", "B <b@x>", ""]),
                       to=rng.choice(["c@x", "Dee <d@x>"]), cc=rng.choice(["", "e@x"])))
    return out


def columns(entries: list[SO.Entry], keep: bool) -> SO.Columns:
    return SO.Columns([e.uid for e in entries], [e.internaldate for e in entries],
                      [e.size for e in entries], [e.keys for e in entries], keep=keep)


def sorted_by_definition(entries: list[SO.Entry],
                         criteria: list[tuple[bytes, bool]]) -> list[int]:
    """RFC 5256 3 read literally: compare criterion by criterion (REVERSE flips one),
    then by sequence number."""
    fields = {b"ARRIVAL": lambda e: e.internaldate, b"DATE": lambda e: e.sent,
              b"SIZE": lambda e: e.size, b"SUBJECT": lambda e: e.keys.subject,
              b"FROM": lambda e: e.keys.from_, b"TO": lambda e: e.keys.to,
              b"CC": lambda e: e.keys.cc, b"DISPLAYFROM": lambda e: e.keys.display_from,
              b"DISPLAYTO": lambda e: e.keys.display_to}

    def compare(a: SO.Entry, b: SO.Entry) -> int:
        for key, reverse in criteria:
            x, y = fields[key](a), fields[key](b)
            if x != y:
                return (1 if x > y else -1) * (-1 if reverse else 1)
        return a.seq - b.seq

    return [e.seq for e in sorted(entries, key=cmp_to_key(compare))]


SORT_CRITERIA = ["ARRIVAL", "REVERSE DATE", "SUBJECT", "REVERSE FROM", "SIZE REVERSE SUBJECT",
                 "TO CC DATE", "DISPLAYFROM REVERSE DISPLAYTO ARRIVAL", "REVERSE SIZE DATE"]


def test_sorting_positions_follows_the_definition() -> None:
    # A table used once (values compared) and a kept one (ranks compared), over every
    # message and over some; asked twice, the second time from what the table kept.
    rng = random.Random(5256)
    for _ in range(150):
        entries = [SO.entry(m) for m in random_messages(rng, rng.randint(0, 24))]
        some = sorted(rng.sample(range(len(entries)), len(entries) // 3))
        for keep in (False, True):
            cols = columns(entries, keep)
            for words in SORT_CRITERIA:
                criteria = SO.criteria_from_words(words.encode().split())
                expected = sorted_by_definition(entries, criteria)
                for _ in range(2):
                    order = SO.sort_positions(cols, criteria)
                    assert [entries[p].seq for p in order] == expected, words
                assert SO.sort_line(order, cols.uid_text()) == \
                    b" ".join([b"SORT", *(b"%d" % (s * 10) for s in expected)])
                for chosen in (some, some[::4]):  # filtered from the order, or sorted
                    assert [entries[p].seq for p in SO.sort_positions(cols, criteria, chosen)] \
                        == sorted_by_definition([entries[p] for p in chosen], criteria), words
                assert SO.sort_values(cols, some[0], criteria) == \
                    SO.sort_key_of(entries[some[0]], criteria) if some else True


def test_long_lists_are_sorted_in_runs() -> None:
    rng = random.Random(9)
    items = list(range(3 * SO.RUN + 5))
    values = [rng.choice("abcdefg") + str(rng.randint(0, 40)) for _ in items]
    for reverse in (False, True):
        assert SO.sorted_in_runs(list(items), values.__getitem__, reverse) == \
            sorted(items, key=values.__getitem__, reverse=reverse)


def test_thread_lines_agree_with_the_thread_trees() -> None:
    # The line written straight from the positions is the thread trees' (format_threads),
    # and threading some of the messages is threading those messages alone.
    rng = random.Random(3)
    for _ in range(300):
        entries = [SO.entry(m) for m in random_messages(rng, rng.randint(0, 24))]
        some = sorted(rng.sample(range(len(entries)), len(entries) // 2))
        for build in (SO.references_forest, SO.orderedsubject_forest):
            for keep in (False, True):
                cols = columns(entries, keep)
                forest = build(cols)
                line = SO.thread_line(forest, cols.uid_text())
                assert line == SO.thread_response(forest.threads(entries), uid=True)
                numbers = sorted(int(n) for n in
                                 line[6:].replace(b"(", b" ").replace(b")", b" ").split())
                assert numbers == [e.uid for e in entries]  # each message once
                alone = [entries[p] for p in some]
                expected = build(columns(alone, False)).threads(alone)
                assert SO.thread_line(build(cols, some), cols.uid_text()) == \
                    SO.thread_response(expected, uid=True)


def test_long_chains_of_missing_messages() -> None:
    # A thousand references to messages not in the mailbox, and many answers to the
    # last of them: the dummies between are pruned once, not once per answer.
    chain = " ".join(f"<gone{i}@x>" for i in range(SO.MAX_REFERENCES))
    messages = [msg(1, "Start", day(1), mid="<s@x>", refs=chain)] + [
        msg(i, "Re: Start", day(2), mid=f"<{i}@x>", refs=f"<gone{SO.MAX_REFERENCES - 1}@x>")
        for i in range(2, 3000)]
    # All hang from the dummy of the last missing message, the first one included.
    assert thread(messages) == b"(" + b"".join(b"(%d)" % i for i in range(1, 3000)) + b")"


# -- reading and caching ---------------------------------------------------------------------------

HEAD = (b"Subject: =?utf-8?q?Re=3A_Caf=C3=A9?=\r\n"
        b"From: =?utf-8?b?w4lyaWM=?= <eric@example.test>\r\n"
        b"To: team: a@example.test, b@example.test;\r\n"
        b"Date: Tue, 02 Jan 2024 08:00:00 -0500\r\n"
        b"Message-ID: <m1@example.test>\r\n"
        b"References: <r1@example.test>\r\n <r2@example.test>\r\n"
        b"Subject: second subject is ignored\r\n\r\n")


def test_message_from_head_and_cached_keys() -> None:
    m = SO.message_from_head(HEAD, 7, 3, 1.0, 42)
    assert m.subject == "Re: Café" and m.from_ == (("Éric", "eric@example.test"),)
    assert m.to[0] == ("", "team") and m.cc == ()
    keys = SO.sort_keys(m)
    assert keys == SO.SortKeys(utc(2024, 1, 2, 13), "CAFE\u0301", True, "ERIC", "TEAM", "",
                               "E\u0301RIC", "TEAM", "m1@example.test",
                               ("r1@example.test", "r2@example.test"))
    assert SO.SortKeys.from_cache(keys.to_cache()) == keys
    assert SO.SortKeys.from_cache("not json") is None
    assert SO.SortKeys.from_cache('[1, 2]') is None


def test_load_entries_finds_renamed_files_and_skips_vanished_ones(tmp_path) -> None:
    # The snapshot names a file another session has renamed since (a flag change) and
    # one that is gone (expunged): the first is found by its base name, the second
    # still answers (with empty keys) until the expunge is announced.
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "b1:2,S").write_bytes(HEAD + b"body\r\n")
    (tmp_path / "cur" / "b2:2,").write_bytes(b"Subject: two\n\nbody\n")
    infos = [SimpleNamespace(uid=3, basename="b1", subdir="cur", filename="b1:2,",
                             internaldate=5.0, size=10),
             SimpleNamespace(uid=7, basename="b2", subdir="cur", filename="b2:2,",
                             internaldate=6.0, size=20),
             SimpleNamespace(uid=9, basename="b3", subdir="cur", filename="b3:2,",
                             internaldate=7.0, size=30)]
    entries, added = SO.load_entries(str(tmp_path), infos, [3, 7, 9], None,
                                     size_hint=lambda info: None)
    assert added == 0
    assert [(e.uid, e.seq, e.keys.subject) for e in entries] == \
        [(3, 1, "CAFE\u0301"), (7, 2, "TWO"), (9, 3, "")]
    # RFC822.SIZE: measured with CRLF line ends; the vanished file keeps its stored size
    assert [e.size for e in entries] == [len(HEAD) + 6, 19 + 3, 30]
    assert entries[2].sent == 7.0


def test_keys_decoded_once_are_kept_while_the_index_is_open(tmp_path) -> None:
    # A second SORT reads no keys from the index file; an expunge (drop) forgets them, the
    # idle sweep's close of the connections does not (they go after DECODED_IDLE_SECONDS
    # unused), closing the index does; a vanished file's empty keys are never kept.
    from mailserver.maildir.index import FolderIndex

    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "b1:2,").write_bytes(HEAD + b"body\r\n")
    infos = [SimpleNamespace(uid=1, basename="b1", subdir="cur", filename="b1:2,",
                             internaldate=5.0, size=10),
             SimpleNamespace(uid=2, basename="gone", subdir="cur", filename="gone:2,",
                             internaldate=6.0, size=20)]
    index = FolderIndex(tmp_path)
    try:
        first, added = SO.load_entries(str(tmp_path), infos, [1, 2], index)
        assert added == 1 and first[0].keys.subject == "CAFE\u0301"
        index.flush()
        asked: list[list[str]] = []
        real = index.get_many
        index.get_many = lambda bases, key: asked.append(list(bases)) or real(bases, key)
        again, added = SO.load_entries(str(tmp_path), infos, [1, 2], index)
        assert added == 0 and again[0].keys == first[0].keys
        assert asked == [["gone"]]        # b1 came from memory; the vanished one is asked again
        index.drop(["b1"])
        assert "b1" not in index.decoded[SO.CACHE_KEY]
        SO.load_entries(str(tmp_path), infos[:1], [1], index)
        assert "b1" in index.decoded[SO.CACHE_KEY]
        # The idle sweep closes the connections but keeps the keys, for a while.
        index.flush()
        assert index.close_if_idle(0.0) and not index.is_open
        assert "b1" in index.decoded[SO.CACHE_KEY]
        assert not index.forget_decoded_if_idle(60.0)
        assert index.forget_decoded_if_idle(0.0) and index.decoded == {}
        SO.load_entries(str(tmp_path), infos[:1], [1], index)
        index.close()
        assert index.decoded == {}
    finally:
        index.close()


def test_sort_module_imports_nothing_from_twisted() -> None:
    code = ("import sys, mailserver.imap.sort; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# -- the commands, through a real session ----------------------------------------------------------

_HASH: list[str] = []


if issubclass(IMAPSession, SortingCommands):
    SortingSession = IMAPSession
else:
    class SortingSession(SortingCommands, IMAPSession):  # type: ignore[no-redef]
        """The session class with the mixin, as server.py is to combine them."""

        def capability_list(self) -> list[bytes]:
            return IMAPSession.capability_list(self) + list(SORT_CAPABILITIES)


class Client:
    """One IMAP session over StringTransport; `cmd` waits for the tagged answer."""

    def __init__(self, context: IMAPContext) -> None:
        self.proto = SortingSession(context)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()
        self.tags = 0

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @defer.inlineCallbacks
    def cmd(self, text: bytes, timeout: float = 10.0):
        self.tags += 1
        tag = b"t%d" % self.tags
        self.proto.dataReceived(tag + b" " + text + b"\r\n")
        got = b""
        for _ in range(int(timeout / 0.005)):
            got += self.take()
            lines = got.split(b"\r\n")
            done = [ln for ln in lines if ln.startswith(tag + b" ")]
            if done:
                return [ln for ln in lines if ln.startswith(b"* ")], done[0][len(tag) + 1:]
            yield task.deferLater(reactor, 0.005, lambda: None)
        raise AssertionError(f"no answer to {text!r}: {got[-300:]!r}")

    @defer.inlineCallbacks
    def ok(self, text: bytes):
        untagged, status = yield self.cmd(text)
        assert status.startswith(b"OK"), (text, status, untagged)
        return untagged

    def close(self) -> None:
        self.proto.connectionLost(None)


def answer_line(untagged: list[bytes], name: bytes) -> bytes:
    found = [u for u in untagged if u == b"* " + name or u.startswith(b"* " + name + b" ")]
    assert len(found) == 1, untagged
    return found[0][len(b"* " + name):].strip()


def message(subject: str, date: str, mid: str, refs: str = "", frm: str = "x@example.test",
            to: str = "alice@example.test", body: str = "body\r\n") -> bytes:
    lines = [f"From: {frm}", f"To: {to}", f"Subject: {subject}", f"Message-ID: {mid}"]
    if date:
        lines.append(f"Date: {date}")
    if refs:
        lines.append(f"References: {refs}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


STORED = [
    # (internal date, message)
    (utc(2024, 2, 1), message("Re: Plan", day(3), "<2@x>", "<1@x>", "Zed <zed@z.test>",
                              body="a longer body than the others\r\n" * 20)),
    (utc(2024, 2, 2), message("Plan", day(1), "<1@x>", "", "Adam <adam@a.test>")),
    (utc(2024, 1, 15), message("Budget", "", "<3@x>", "", "bob@b.test")),
    (utc(2024, 2, 3), message("Re: Plan", day(2), "<4@x>", "<1@x>", "Carl <carl@c.test>")),
]


class SessionTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="sort-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        if not _HASH:
            _HASH.append(hash_password("secret"))
        accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.addCleanup(accounts.close)
        store = MaildirStore(root / "maildirs", "mail.example.test")
        accounts.add_domain("example.test")
        accounts.add_user("alice@example.test", _HASH[0])
        account = store.account(store.create_user("example.test", "alice"))
        self.addCleanup(account.close)
        realm = MailRealm()
        realm.register(IIMAPAccount,
                       avatar_factory(SimpleNamespace(accounts=accounts, store=store)))
        self.context = IMAPContext(
            hostname="mail.example.test", limits=LimitsConfig(), portal=build_portal(accounts, realm),
            throttle=AuthThrottle(3, 900, clock=task.Clock()), store=store,
            allow_plaintext_loopback=True)
        self.folder = account.folder("INBOX")
        for when, data in STORED:
            w = self.folder.begin_append(internaldate=when)
            w.write(data)
            yield w.commit()
        self.client = Client(self.context)
        self.addCleanup(self.client.close)
        yield self.client.ok(b"LOGIN alice@example.test secret")
        yield self.client.ok(b"SELECT INBOX")

    @defer.inlineCallbacks
    def sort(self, text: bytes, name: bytes = b"SORT") -> defer.Deferred:
        untagged = yield self.client.ok(text)
        return answer_line(untagged, name)

    @defer.inlineCallbacks
    def test_capabilities(self):
        untagged = yield self.client.ok(b"CAPABILITY")
        caps = untagged[0].split()
        for cap in (b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"):
            self.assertIn(cap, caps)

    @defer.inlineCallbacks
    def test_sort(self):
        cases = [
            (b"SORT (SUBJECT) UTF-8 ALL", b"3 1 2 4"),
            (b"SORT (REVERSE ARRIVAL) US-ASCII ALL", b"4 2 1 3"),
            (b"SORT (DATE) UTF-8 ALL", b"2 4 1 3"),           # 3 has no Date: Jan 15
            (b"SORT (REVERSE SIZE) UTF-8 ALL", b"1 4 2 3"),     # 4: longest header
            (b"SORT (FROM) UTF-8 ALL", b"2 3 4 1"),
            (b"SORT (DISPLAYFROM) UTF-8 ALL", b"2 3 4 1"),   # Adam, bob@b.test, Carl, Zed
            (b'SORT (SUBJECT DATE) "UTF-8" SUBJECT plan', b"2 4 1"),
            (b"SORT (SUBJECT) UTF-8 SUBJECT nothing-matches", b""),
            (b"SORT (ARRIVAL) UTF-8 2:3", b"3 2"),
        ]
        for command, expected in cases:
            self.assertEqual((yield self.sort(command)), expected, command)
        # The keys went into the folder index: the answers do not change when they are
        # read from there instead of the files.
        yield self.folder.flush_cache()
        base = self.folder.by_uid(1).basename
        self.assertIn(base, self.folder.index.get_many([base], SO.CACHE_KEY))
        for command, expected in cases:
            self.assertEqual((yield self.sort(command)), expected, command)

    @defer.inlineCallbacks
    def test_thread(self):
        # 2 (Jan 1) has the replies 4 (Jan 2) and 1 (Jan 3); 3 has no Date: (Jan 15).
        self.assertEqual((yield self.sort(b"THREAD REFERENCES UTF-8 ALL", b"THREAD")),
                         b"(2 (4)(1))(3)")
        self.assertEqual((yield self.sort(b"THREAD ORDEREDSUBJECT UTF-8 ALL", b"THREAD")),
                         b"(2 (4)(1))(3)")
        self.assertEqual((yield self.sort(b"THREAD REFERENCES UTF-8 1,3,4", b"THREAD")),
                         b"((4)(1))(3)")   # 2 not searched: a dummy holds its replies
        self.assertEqual((yield self.sort(b"THREAD REFERENCES UTF-8 SUBJECT none", b"THREAD")),
                         b"")

    @defer.inlineCallbacks
    def test_uid_forms_answer_uids(self):
        yield self.folder.delete_messages([2])   # UIDs 1 3 4 are now sequence 1 2 3
        yield self.client.ok(b"NOOP")
        untagged, status = yield self.client.cmd(b"UID SORT (SUBJECT) UTF-8 ALL")
        if b"Unknown UID command" in status:   # dispatch of UID SORT lives in server.py
            untagged = yield self.direct(self.client.proto.cmd_select_SORT,
                                         b" (SUBJECT) UTF-8 ALL")
        else:
            self.assertTrue(status.startswith(b"OK"), status)
        self.assertEqual(answer_line(untagged, b"SORT"), b"3 1 4")
        self.assertEqual((yield self.sort(b"SORT (SUBJECT) UTF-8 ALL")), b"2 1 3")
        untagged, status = yield self.client.cmd(b"UID THREAD REFERENCES UTF-8 ALL")
        if b"Unknown UID command" in status:
            untagged = yield self.direct(self.client.proto.cmd_select_THREAD,
                                         b" REFERENCES UTF-8 ALL")
        self.assertEqual(answer_line(untagged, b"THREAD"), b"((4)(1))(3)")

    @defer.inlineCallbacks
    def direct(self, handler, args: bytes):
        """The handler called as the session calls it for a UID command."""
        self.client.take()
        yield handler(b"u1", Arguments([args]), uid=True)
        lines = self.client.take().split(b"\r\n")
        self.assertIn(b"u1 OK", [ln[:5] for ln in lines])
        return [ln for ln in lines if ln.startswith(b"* ")]

    @defer.inlineCallbacks
    def test_bad_input_and_the_session_goes_on(self):
        bad = [
            b"SORT", b"SORT ()", b"SORT (SUBJECT)", b"SORT (SUBJECT) UTF-8",
            b"SORT (NOSUCH) UTF-8 ALL", b"SORT (REVERSE) UTF-8 ALL",
            b"SORT (REVERSE REVERSE DATE) UTF-8 ALL", b"SORT SUBJECT UTF-8 ALL",
            b"SORT (" + b" ".join([b"DATE"] * 40) + b") UTF-8 ALL",
            b"SORT (DATE) UTF-8 NOSUCHKEY", b"SORT (DATE) UTF-8 ALL)",
            b"THREAD", b"THREAD REFS UTF-8 ALL", b"THREAD (REFERENCES) UTF-8 ALL",
            b"THREAD REFERENCES UTF-8", b"THREAD REFERENCES UTF-8 FROM",
        ]
        for command in bad:
            _, status = yield self.client.cmd(command)
            self.assertTrue(status.startswith(b"BAD"), (command, status))
        for command in (b"SORT (DATE) KOI8-R ALL", b"THREAD REFERENCES ISO-8859-1 ALL"):
            _, status = yield self.client.cmd(command)
            self.assertEqual(status, b"NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
        self.assertEqual((yield self.sort(b"SORT (SUBJECT) UTF-8 ALL")), b"3 1 2 4")

    @defer.inlineCallbacks
    def test_not_before_select(self):
        yield self.client.ok(b"UNSELECT")
        _, status = yield self.client.cmd(b"SORT (DATE) UTF-8 ALL")
        self.assertTrue(status.startswith(b"BAD"), status)

    @defer.inlineCallbacks
    def test_size_is_rfc822_size_of_foreign_files(self):
        # Files written by another program with LF line ends and no size in the name:
        # SIZE compares the octets as sent (CRLF), measured once and cached.
        inbox = self.folder.path
        lines = b"Subject: lf a\n\n" + b"\n" * 30              # 45 octets, 77 as CRLF
        long = b"Subject: lf b\n\n" + b"y" * 50 + b"\n"        # 66 octets, 69 as CRLF
        (inbox / "new" / "1700000000.M1P1.other").write_bytes(lines)
        (inbox / "new" / "1700000000.M2P1.other").write_bytes(long)
        yield self.client.ok(b"NOOP")
        a = answer_line((yield self.client.ok(b"SEARCH SUBJECT \"lf a\"")), b"SEARCH")
        b = answer_line((yield self.client.ok(b"SEARCH SUBJECT \"lf b\"")), b"SEARCH")
        self.assertEqual((yield self.sort(b"SORT (SIZE) UTF-8 SUBJECT lf")), b + b" " + a)
        yield self.folder.flush_cache()
        self.assertEqual((yield self.sort(b"SORT (SIZE) UTF-8 SUBJECT lf")), b + b" " + a)
