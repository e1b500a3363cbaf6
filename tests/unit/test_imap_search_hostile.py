"""SEARCH in a folder that holds a hostile message: one message nobody can parse or date
does not make every search of the folder fail; and MODSEQ of ESEARCH's MIN and MAX."""

from __future__ import annotations

import re

from twisted.internet.defer import inlineCallbacks

from tests.unit.imap_session_harness import SessionCase

NORMAL = (b"From: a@example.org\r\nSubject: normal\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
          b"\r\nneedle here\r\n")


def nested(depth: int) -> bytes:
    """A message of `depth` multipart/mixed parts, each inside the one before."""
    head = b"From: a@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    opening, closing = [], []
    for i in range(depth):
        opening.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
        closing.append(b"\r\n--b%d--\r\n" % i)
    return (head + b"".join(opening) + b"Content-Type: text/plain\r\n\r\nneedle deep\r\n"
            + b"".join(reversed(closing)))


class HostileMessages(SessionCase):
    @inlineCallbacks
    def test_a_date_in_year_99999_leaves_the_sent_keys_working(self):
        yield self.append(NORMAL)
        yield self.append(NORMAL.replace(b"Mon, 01 Jan 2024", b"Mon, 01 Jan 99999")
                          .replace(b"normal", b"future"))
        yield self.select()
        for key, want in [(b"SENTBEFORE 1-Jan-2025", b"* SEARCH 1\r\n"),
                          (b"SENTON 1-Jan-2024", b"* SEARCH 1\r\n"),
                          (b"OR SENTSINCE 1-Jan-2000 SUBJECT future", b"* SEARCH 1 2\r\n")]:
            out = yield self.command(b"s", b"SEARCH " + key)
            self.assertIn(b"s OK", out)
            self.assertIn(want, out)

    @inlineCallbacks
    def test_mime_nested_too_deep_to_parse_matches_nothing_and_fails_nothing(self):
        yield self.append(NORMAL)
        yield self.append(nested(1200))
        yield self.select()
        for key in (b"BODY needle", b"TEXT needle", b"OR BODY needle SUBJECT normal"):
            out = yield self.command(b"s", b"SEARCH " + key)
            self.assertIn(b"s OK", out)
            self.assertIn(b"* SEARCH 1\r\n", out)
        out = yield self.command(b"s", b"SEARCH SUBJECT deep")
        self.assertIn(b"* SEARCH 2\r\n", out)

    @inlineCallbacks
    def test_esearch_modseq_is_that_of_the_messages_returned(self):
        """RFC 7162 3.1.5: MIN alone, its message's; MIN and MAX, the higher of the two;
        ALL or COUNT, the highest of every match."""
        for i in range(4):
            yield self.append(NORMAL.replace(b"normal", b"m%d" % i))
        yield self.select()
        yield self.command(b"st", b"STORE 2 +FLAGS (\\Flagged)")   # 2 now has the highest
        out = yield self.command(b"f", b"FETCH 1:4 (MODSEQ)")
        modseq = {int(n): int(m) for n, m in re.findall(rb"\* (\d+) FETCH \(MODSEQ \((\d+)\)\)",
                                                        out)}
        self.assertEqual(max(modseq, key=modseq.get), 2)
        for options, which in [(b"MIN", [1]), (b"MAX", [4]), (b"MIN MAX", [1, 4]),
                               (b"MIN COUNT", [1, 2, 3, 4]), (b"ALL", [1, 2, 3, 4])]:
            out = yield self.command(b"e", b"SEARCH RETURN (" + options + b") MODSEQ 1")
            got = int(re.search(rb"MODSEQ (\d+)", out).group(1))
            self.assertEqual(got, max(modseq[n] for n in which), options)

    @inlineCallbacks
    def test_a_day_the_month_does_not_have_is_bad(self):
        yield self.append(NORMAL)
        yield self.select()
        for key in (b"BEFORE 31-Feb-2024", b"SINCE 0-Feb-2024", b"SENTON 29-Feb-2023"):
            out = yield self.command(b"s", b"SEARCH " + key)
            self.assertIn(b"s BAD", out)
        out = yield self.command(b"s", b"SEARCH SENTON 1-Jan-2024")
        self.assertIn(b"* SEARCH 1\r\n", out)

