"""CONTEXT=SEARCH and CONTEXT=SORT (RFC 5267 4): update contexts kept by one session while
another session (or the same one) changes the mailbox, through real sessions and a real
store: ADDTO after EXISTS, REMOVEFROM before EXPUNGE, positions in a sorted result,
CANCELUPDATE, NOUPDATE and the limits."""

from __future__ import annotations

import re

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks

from mailserver.imap.livesearch import MAX_CONTEXTS
from tests.unit.imap_session_harness import SessionCase


def message(subject: str) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.org\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\nbody of {subject}\r\n").encode()


def expand(text: bytes) -> list[int]:
    """A sequence-set in the order written (RFC 5267 3.2: ranges ascend)."""
    out: list[int] = []
    for item in text.split(b","):
        a, _, b = item.partition(b":")
        out += range(int(a), int(b or a) + 1)
    return out


def apply_updates(result: list[int], output: bytes, tag: bytes) -> list[int]:
    """What a client holds after the ADDTO / REMOVEFROM of `tag` in `output`, applied in
    order (RFC 5267 4.3.2-4.3.4); a REMOVEFROM at a position must name what is there."""
    result = list(result)
    pattern = rb'\* ESEARCH \(TAG "' + re.escape(tag) + rb'"\)(?: UID)? (.*)\r\n'
    for line in re.findall(pattern, output):
        for kind, payload in re.findall(rb"(ADDTO|REMOVEFROM) \(([^)]*)\)", line):
            words = payload.split()
            for position, numbers in zip(map(int, words[::2]), map(expand, words[1::2])):
                if kind == b"ADDTO":
                    if position == 0:
                        result = sorted(result + numbers)
                    else:
                        result[position - 1:position - 1] = numbers
                elif position == 0:
                    result = [n for n in result if n not in numbers]
                else:
                    assert result[position - 1:position - 1 + len(numbers)] == numbers, \
                        (result, position, numbers)
                    del result[position - 1:position - 1 + len(numbers)]
    return result


class ContextSession(SessionCase):

    @inlineCallbacks
    def holds(self, start: list[int], tag: bytes, expected: list[int]):
        """Wait until the updates told so far turn `start` into `expected`."""
        for _ in range(2000):
            self.pump()
            if apply_updates(start, self.transport.value(), tag) == expected:
                return
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.assertEqual(apply_updates(start, self.transport.value(), tag), expected)

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        for subject in ("delta", "alpha", "echo", "charlie", "bravo"):
            yield self.append(message(subject))
        yield self.select()
        self.other, self.other_transport = self.new_session()
        yield self.command(b"o0", b"SELECT INBOX", self.other, self.other_transport)

    def by_other(self, text: bytes):
        return self.command(b"o1", text, self.other, self.other_transport)

    @inlineCallbacks
    def settle(self):
        """Let threads and timers run a little (updates made in a thread)."""
        for _ in range(20):
            yield task.deferLater(reactor, 0.005, lambda: None)

    @inlineCallbacks
    def test_flag_changes_by_another_session(self):
        out = yield self.command(b"c1", b"SEARCH RETURN (UPDATE COUNT) UNSEEN")
        self.assertIn(b'* ESEARCH (TAG "c1") COUNT 5\r\n', out)
        self.transport.clear()
        yield self.by_other(b"STORE 2,4 +FLAGS (\\Seen)")
        # No command runs here: told at once (RFC 5267 4.3.2).
        out = yield self.wait_for(rb"REMOVEFROM")
        self.assertEqual(out, b'* ESEARCH (TAG "c1") REMOVEFROM (0 2,4)\r\n')
        yield self.by_other(b"STORE 4 -FLAGS (\\Seen)")
        out = yield self.wait_for(rb"ADDTO")
        self.assertIn(b'* ESEARCH (TAG "c1") ADDTO (0 4)\r\n', out)
        out = yield self.command(b"n", b"NOOP")   # the FETCH FLAGS come with the next command
        self.assertIn(b"* 2 FETCH (UID 2 FLAGS (\\Recent \\Seen))", out)

    @inlineCallbacks
    def test_own_store_is_told_before_the_tagged_reply(self):
        yield self.command(b"c1", b"UID SEARCH RETURN (UPDATE) UNSEEN")
        out = yield self.command(b"s", b"STORE 3 +FLAGS (\\Seen)")
        self.assertRegex(out, rb'\* 3 FETCH \(UID 3 FLAGS \(\\Recent \\Seen\)\)\r\n'
                              rb'\* ESEARCH \(TAG "c1"\) UID REMOVEFROM \(0 3\)\r\ns OK')

    @inlineCallbacks
    def test_new_mail_is_added_after_exists(self):
        out = yield self.command(b"c1", b"SEARCH RETURN (UPDATE) UNSEEN")
        self.assertIn(b'* ESEARCH (TAG "c1")\r\n', out)   # no return data asked for
        yield self.by_other(b"APPEND INBOX {%d+}\r\n" % len(message("foxtrot"))
                            + message("foxtrot"))
        yield self.settle()
        self.assertNotIn(b"ADDTO", self.transport.value())  # the client knows no 6 yet
        out = yield self.command(b"n", b"NOOP")
        self.assertRegex(out, rb'\* 6 EXISTS\r\n(.*\r\n)?\* ESEARCH \(TAG "c1"\) ADDTO \(0 6\)')

    @inlineCallbacks
    def test_expunge_removes_before_the_expunge_response(self):
        yield self.command(b"c1", b"SEARCH RETURN (UPDATE) UNSEEN")
        yield self.command(b"c2", b"UID SEARCH RETURN (UPDATE) UID 3:*")
        yield self.by_other(b"STORE 3,5 +FLAGS.SILENT (\\Deleted)")
        yield self.by_other(b"EXPUNGE")
        out = yield self.command(b"n", b"NOOP")
        self.assertRegex(out, rb'\* ESEARCH \(TAG "c1"\) REMOVEFROM \(0 3,5\)\r\n'
                              rb'\* ESEARCH \(TAG "c2"\) UID REMOVEFROM \(0 3,5\)\r\n'
                              rb'\* 3 EXPUNGE\r\n\* 4 EXPUNGE\r\n')
        out = yield self.command(b"e", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        out = yield self.command(b"x", b"EXPUNGE")   # own expunge: the same order
        self.assertRegex(out, rb'^\* ESEARCH \(TAG "c1"\) REMOVEFROM \(0 1\)\r\n\* 1 EXPUNGE\r\n')

    @inlineCallbacks
    def test_sorted_context_positions(self):
        out = yield self.command(b"s1", b"UID SORT RETURN (UPDATE ALL) (SUBJECT) UTF-8 UNSEEN")
        # alpha(2) bravo(5) charlie(4) delta(1) echo(3)
        self.assertIn(b'* ESEARCH (TAG "s1") UID ALL 2,5,4,1,3\r\n', out)
        self.transport.clear()
        yield self.by_other(b"STORE 4 +FLAGS (\\Seen)")
        out = yield self.wait_for(rb"REMOVEFROM")
        self.assertIn(b'* ESEARCH (TAG "s1") UID REMOVEFROM (3 4)\r\n', out)
        self.transport.clear()
        for subject in ("baker", "zulu", "able"):
            yield self.by_other(b"APPEND INBOX {%d+}\r\n" % len(message(subject))
                                + message(subject))
        self.send(b"n NOOP\r\n")
        # able(8) alpha(2) baker(6) bravo(5) delta(1) echo(3) zulu(7)
        yield self.holds([2, 5, 1, 3], b"s1", [8, 2, 6, 5, 1, 3, 7])
        out = self.transport.value()
        self.assertLess(out.index(b"* 8 EXISTS\r\n"), out.index(b"ADDTO"))
        self.transport.clear()
        yield self.by_other(b"STORE 2,6 +FLAGS (\\Seen)")
        out = yield self.wait_for(rb"REMOVEFROM")
        # alpha at 2, then baker at 2 too: one pair
        self.assertIn(b'* ESEARCH (TAG "s1") UID REMOVEFROM (2 2,6)\r\n', out)

    @inlineCallbacks
    def test_sorted_context_by_message_number(self):
        yield self.command(b"s1", b"SORT RETURN (UPDATE) (REVERSE SUBJECT) UTF-8 ALL")
        yield self.by_other(b"STORE 1 +FLAGS.SILENT (\\Deleted)")
        yield self.by_other(b"EXPUNGE")
        out = yield self.command(b"n", b"NOOP")
        # echo(3) delta(1) charlie alpha...: delta at 2 goes, before its EXPUNGE
        self.assertRegex(out, rb'REMOVEFROM \(2 1\)\r\n\* 1 EXPUNGE\r\n')

    @inlineCallbacks
    def test_key_read_from_the_files(self):
        yield self.command(b"c1", b'UID SEARCH RETURN (UPDATE) SUBJECT "golf"')
        yield self.by_other(b"APPEND INBOX {%d+}\r\n" % len(message("golf club"))
                            + message("golf club"))
        self.transport.clear()
        self.send(b"n NOOP\r\n")
        out = yield self.wait_for(rb"ADDTO")
        self.assertIn(b'* ESEARCH (TAG "c1") UID ADDTO (0 6)\r\n', out)

    @inlineCallbacks
    def test_idle_hears_updates(self):
        yield self.command(b"c1", b"SEARCH RETURN (UPDATE) FLAGGED")
        self.transport.clear()
        self.send(b"i IDLE\r\n")
        yield self.wait_for(rb"\+ idling\r\n")
        yield self.by_other(b"STORE 5 +FLAGS (\\Flagged)")
        out = yield self.wait_for(rb"ADDTO")
        self.assertIn(b'* ESEARCH (TAG "c1") ADDTO (0 5)\r\n', out)
        self.send(b"DONE\r\n")
        yield self.wait_for(rb"i OK")

    @inlineCallbacks
    def test_cancelupdate_and_deselect_end_updates(self):
        yield self.command(b"c1", b"SEARCH RETURN (UPDATE) FLAGGED")
        yield self.command(b"c2", b"SEARCH RETURN (UPDATE) UNFLAGGED")
        out = yield self.command(b"x", b'CANCELUPDATE "c1"')
        self.assertIn(b"x OK", out)
        out = yield self.command(b"x2", b'CANCELUPDATE "c1" "nope"')
        self.assertIn(b"x2 NO", out)
        out = yield self.command(b"x3", b"CANCELUPDATE c2")
        self.assertIn(b"x3 BAD", out)
        self.transport.clear()
        yield self.by_other(b"STORE 1 +FLAGS (\\Flagged)")
        out = yield self.wait_for(rb"REMOVEFROM")
        self.assertNotIn(b'"c1"', out)
        self.assertIn(b'* ESEARCH (TAG "c2") REMOVEFROM (0 1)', out)
        yield self.command(b"u", b"UNSELECT")
        self.transport.clear()
        yield self.by_other(b"STORE 1 -FLAGS (\\Flagged)")
        yield self.settle()
        self.assertEqual(self.transport.value(), b"")
        yield self.select()
        out = yield self.command(b"x4", b'CANCELUPDATE "c2"')   # it ended with UNSELECT
        self.assertIn(b"x4 NO", out)

    @inlineCallbacks
    def test_limits(self):
        for i in range(MAX_CONTEXTS):
            out = yield self.command(b"c%d" % i, b"SEARCH RETURN (UPDATE) ALL")
            self.assertNotIn(b"NOUPDATE", out)
        out = yield self.command(b"c9", b"SEARCH RETURN (UPDATE COUNT) ALL")
        self.assertIn(b'* NO [NOUPDATE "c9"]', out)
        self.assertIn(b'* ESEARCH (TAG "c9") COUNT 5', out)   # the rest still answered
        self.assertIn(b"c9 OK", out)
        out = yield self.command(b"c0", b"SEARCH RETURN (UPDATE) ALL")
        self.assertIn(b"c0 BAD", out)   # RFC 5267 4.3: the tag names a context
        out = yield self.command(b"x", b'CANCELUPDATE "c0"')
        out = yield self.command(b"c0", b"SORT RETURN (UPDATE) (DATE) UTF-8 ALL")
        self.assertNotIn(b"NOUPDATE", out)
        self.assertIn(b"c0 OK", out)
        out = yield self.command(b"y", b"CANCELUPDATE " + b'"a" ' * 101)
        self.assertIn(b"y BAD", out)
        out = yield self.command(b"n", b"NOOP")
        self.assertIn(b"n OK", out)

    @inlineCallbacks
    def test_partial_with_update(self):
        out = yield self.command(b"p", b"SEARCH RETURN (PARTIAL 2:3 UPDATE) ALL")
        self.assertIn(b'* ESEARCH (TAG "p") PARTIAL (2:3 2:3)\r\n', out)
        out = yield self.command(b"p2", b"UID SORT RETURN (PARTIAL 1:2) (SUBJECT) UTF-8 ALL")
        self.assertIn(b'* ESEARCH (TAG "p2") UID PARTIAL (1:2 2,5)\r\n', out)
        out = yield self.command(b"p3", b"SEARCH RETURN (PARTIAL 9:10) ALL")
        self.assertIn(b'* ESEARCH (TAG "p3") PARTIAL (9:10 NIL)\r\n', out)
        self.transport.clear()
        yield self.by_other(b"STORE 5 +FLAGS (\\Deleted)")
        yield self.settle()
        self.assertNotIn(b"ESEARCH", self.transport.value())   # ALL: still all of them

    @inlineCallbacks
    def test_failed_search_leaves_no_context(self):
        out = yield self.command(b"c1", b"SEARCH RETURN (UPDATE) CHARSET KOI8-R ALL")
        self.assertIn(b"c1 NO", out)
        out = yield self.command(b"c1", b"SEARCH RETURN (UPDATE) ALL")   # not in use
        self.assertIn(b"c1 OK", out)
        self.assertEqual(re.findall(rb"NOUPDATE", out), [])


class AnswersNotTaken(SessionCase):
    """Commands pipelined and answered at once wait for the client to take the answers
    once 64 KB are written in a turn: 18 MB of NOOPs never read grew the process by
    hundreds of MB."""

    @inlineCallbacks
    def test_the_queue_waits_for_the_client(self):
        from mailserver.streaming import OUTPUT_BURST

        count = 20000
        self.transport.clear()
        self.session.dataReceived(b"a NOOP\r\n" * count)
        written = self.transport.value()
        self.assertLess(len(written), OUTPUT_BURST + 1024)
        self.assertIsNotNone(self.transport.producer)        # waiting for the client
        self.assertGreater(self.transport.reading_paused, 0)  # ... and reading no more
        got = written
        self.transport.clear()
        for _ in range(400):
            if got.count(b"a OK") >= count:
                break
            self.pump()                                       # the client takes it all
            yield task.deferLater(reactor, 0.005, lambda: None)
            got += self.transport.value()
            self.transport.clear()
        self.assertEqual(got.count(b"a OK"), count)
        self.assertEqual(self.transport.reading_paused, 0)

    @inlineCallbacks
    def test_commands_answered_through_a_deferred_wait_too(self):
        """NOOP on a selected folder answers through folder.refresh()'s (fired) Deferred:
        it counted as a new turn, and the wait never came."""
        from mailserver.streaming import OUTPUT_BURST

        yield self.command(b"s", b"SELECT INBOX")
        self.transport.clear()
        self.session.dataReceived(b"a NOOP\r\n" * 20000)
        self.assertLess(len(self.transport.value()), OUTPUT_BURST + 1024)
        self.assertIsNotNone(self.transport.producer)

    def test_a_close_the_client_does_not_drain_is_aborted(self):
        """An idle timeout waits for the output to drain: a client that reads nothing
        kept its connection for ever."""
        from mailserver.streaming import CLOSE_GRACE

        clock = task.Clock()
        self.session.callLater = clock.callLater
        self.session.timeoutConnection()
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.disconnected)
        clock.advance(CLOSE_GRACE)
        self.assertTrue(self.transport.disconnected)


class ManyExpunged(SessionCase):
    def test_numbers_are_those_after_the_ones_before_go(self):
        """RFC 3501 7.4.1: each EXPUNGE's number as it is once the ones before it are
        gone; the view is made again once, not shifted per message."""
        import random

        rng = random.Random(7)
        view = sorted(rng.sample(range(1, 200_000), 50_000))
        gone = set(rng.sample(view, 30_000)) | {10**9}        # one never in the view
        self.session.view, self.session._view_shared = list(view), False
        self.transport.clear()
        self.session._announce_expunged(list(gone))
        numbers = [int(line.split()[1]) for line in self.transport.value().splitlines()]
        self.assertEqual(len(numbers), 30_000)
        replay = list(view)
        for n in numbers:                                     # as a client applies them
            del replay[n - 1]
        self.assertEqual(replay, self.session.view)
        self.assertEqual(self.session.view, [u for u in view if u not in gone])

    def test_queued_appends_let_go_when_the_connection_goes(self):
        """APPENDs read in full but queued behind answers the client has not taken hold
        an open file in tmp/ each: the connection's end closes and removes them."""
        self.transport.clear()
        self.session._busy = True   # a command running (a wait for the client, a FETCH)
        self.session.dataReceived(b"".join(b"p%d APPEND INBOX {5+}\r\nhello\r\n" % i
                                           for i in range(3)))
        tmp = self.user_path / "tmp"
        self.assertEqual(len(list(tmp.iterdir())), 3)          # queued, files open
        self.session.connectionLost(None)
        self.assertEqual(list(tmp.iterdir()), [])
        self.assertEqual(self.session._queue, [])


class AnsweredAtOnce(SessionCase):
    def test_a_command_answered_through_a_fired_deferred_sets_the_idle_timer(self):
        """A LOGIN answered from the login cache fires its Deferred at once; its 30
        minutes (RFC 3501 5.4) must still replace the 60 s of a stranger."""
        from twisted.internet import defer

        clock = task.Clock()
        self.session.callLater = clock.callLater

        def execute(parts, writer):
            self.session.timeOut = 1800.0    # what a LOGIN sets
            return defer.succeed(None)
        self.patch(self.session, "_execute", execute)
        self.session.timeOut = 60.0
        self.session.setTimeout(60.0)
        self.session._queue.append(([b"a LOGIN x y"], None))
        self.session._run_queue()
        [timer] = clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 1800.0)
