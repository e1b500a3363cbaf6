"""IMAP's quota checks count what other commands under way will store, and a usage that
is not known yet is read before the check."""

from __future__ import annotations

import re

from twisted.internet.defer import inlineCallbacks

from tests.unit.imap_session_harness import SessionCase

KB = 1024


def message(size: int) -> bytes:
    head = b"From: a@example.org\r\nSubject: big\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


class QuotaHolds(SessionCase):
    quota = 1000 * KB

    @inlineCallbacks
    def test_parallel_appends_cannot_all_pass_the_check(self):
        other, other_transport = self.new_session()
        big = message(600 * KB)
        self.transport.clear()
        # Both whole before either is stored: the second is checked while the first's
        # files are written.
        self.send(b"a1 APPEND INBOX {%d+}\r\n%s\r\n" % (len(big), big))
        self.send(b"a2 APPEND INBOX {%d+}\r\n%s\r\n" % (len(big), big), other)
        first = yield self.wait_for(rb"a1 (OK|NO)[^\r\n]*\r\n$")
        second = yield self.wait_for(rb"a2 (OK|NO)[^\r\n]*\r\n$", other_transport)
        answers = sorted([re.search(rb"a\d (OK|NO)", first).group(1),
                          re.search(rb"a\d (OK|NO)", second).group(1)])
        self.assertEqual(answers, [b"NO", b"OK"], (first[-200:], second[-200:]))
        self.assertIn(b"[OVERQUOTA]", first + second)

    @inlineCallbacks
    def test_a_usage_not_known_yet_is_read_before_the_check(self):
        """Mail put there before this process read the usage (a restart): the first
        APPEND is checked against it, not against nothing."""
        for i in range(2):
            (self.user_path / "cur" / f"170000000{i}.M{i}P1.host:2,S").write_bytes(
                message(600 * KB))
        out = yield self.command(b"a", b"APPEND INBOX {10+}\r\nSubject: x")
        self.assertIn(b"a NO [OVERQUOTA]", out)
