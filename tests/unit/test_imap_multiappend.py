"""RFC 3502 MULTIAPPEND through a real session and store: several messages in one
APPEND, each with its own flags and date, APPENDUID with a uid set (RFC 4315), and all or
nothing when one of them fails (before or after others were stored)."""

from __future__ import annotations

import os
import re

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks

from mailserver.imap.append import MAX_APPEND_MESSAGES
from tests.unit.imap_session_harness import SessionCase

M1 = b"Subject: one\r\n\r\nfirst\r\n"
M2 = b"Subject: two\r\n\r\nsecond\r\n"
M3 = b"Subject: three\r\n\r\nthird\r\n"


def lit(message: bytes) -> bytes:
    """A LITERAL+ literal."""
    return b"{%d+}\r\n" % len(message) + message


class MultiAppend(SessionCase):
    max_message_size = 4096

    def inbox_files(self) -> list[str]:
        inbox = self.user_path
        return sorted(os.listdir(inbox / "cur") + os.listdir(inbox / "new"))

    def tmp_files(self) -> list[str]:
        return sorted(os.listdir(self.user_path / "tmp"))

    @inlineCallbacks
    def test_three_messages_one_command(self):
        out = yield self.command(
            b"a1", b"APPEND INBOX (\\Seen) " + lit(M1) + b" " + lit(M2)
            + b' (\\Flagged $Work) "01-Feb-2024 10:00:00 +0000" ' + lit(M3))
        m = re.search(rb"a1 OK \[APPENDUID (\d+) ([0-9:,]+)\]", out)
        self.assertIsNotNone(m, out)
        self.assertEqual(m.group(2), b"1:3")
        yield self.select()
        out = yield self.command(b"f", b"FETCH 1:3 (FLAGS INTERNALDATE BODY.PEEK[TEXT])")
        rows = out.split(b"* ")[1:]
        self.assertIn(b"first", rows[0])
        self.assertIn(b"\\Seen", rows[0])
        self.assertNotIn(b"\\Seen", rows[1])   # flags belong to their own message
        self.assertIn(b"second", rows[1])
        self.assertIn(b"$Work", rows[2])
        self.assertIn(b"\\Flagged", rows[2])
        self.assertIn(b'"01-Feb-2024 10:00:00 +0000"', rows[2])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_synchronising_literals_each_get_a_continuation(self):
        self.transport.clear()
        self.send(b"a2 APPEND INBOX {%d}\r\n" % len(M1))
        yield self.wait_for(rb"^\+ [^\r\n]*\r\n$")
        self.send(M1 + b" {%d}\r\n" % len(M2))
        yield self.wait_for(rb"^\+ [^\r\n]*\r\n\+ [^\r\n]*\r\n$")
        self.send(M2 + b"\r\n")
        out = yield self.wait_for(rb"a2 OK \[APPENDUID \d+ 1:2\]")
        self.assertEqual(out.count(b"+ "), 2)
        self.assertEqual(len(self.inbox_files()), 2)

    @inlineCallbacks
    def test_too_big_second_message_stores_none(self):
        # A non-synchronising literal over the size limit: refused, and as its octets
        # are on their way the session ends (as for a single APPEND).
        big = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"
        self.send(b"a3 APPEND INBOX " + lit(M1) + b" " + lit(big) + b"\r\n")
        yield self.wait_for(rb"a3 NO \[TOOBIG\][^\r\n]*\r\n\* BYE ")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_too_big_catenated_text_stores_none(self):
        # Within the limit each, over it together: refused, the rest skipped, none kept.
        part = b"x" * 3000
        out = yield self.command(b"a3b", b"APPEND INBOX " + lit(M1) + b" CATENATE (TEXT "
                                 + lit(part) + b" TEXT " + lit(part) + b")")
        self.assertRegex(out, rb"a3b NO \[TOOBIG\]")
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])
        out = yield self.command(b"n", b"NOOP")   # the session goes on after the octets
        self.assertIn(b"n OK", out)

    @inlineCallbacks
    def test_too_big_synchronising_literal_is_refused_before_it_is_sent(self):
        self.transport.clear()
        self.send(b"a4 APPEND INBOX {%d}\r\n" % len(M1))
        yield self.wait_for(rb"^\+ ")
        self.send(M1 + b" {5000}\r\n")
        out = yield self.wait_for(rb"a4 NO \[TOOBIG\][^\r\n]*\r\n$")
        self.assertEqual(out.count(b"+ "), 1)
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_empty_message_cancels_the_command(self):
        # RFC 3502 6.3.11: a zero-length message literal is an error (NO), none is kept.
        out = yield self.command(b"a5", b"APPEND INBOX " + lit(M1) + b" {0+}\r\n")
        self.assertRegex(out, rb"a5 NO ")
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_bad_flag_in_a_later_message_stores_none(self):
        out = yield self.command(b"a6", b"APPEND INBOX " + lit(M1) + b" (\\Bogus) " + lit(M2))
        self.assertRegex(out, rb"a6 BAD ")
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_bad_syntax_between_messages(self):
        out = yield self.command(b"a7", b"APPEND INBOX " + lit(M1) + b" garbage " + lit(M2))
        self.assertRegex(out, rb"a7 BAD ")
        out = yield self.command(b"a8", b"APPEND INBOX " + lit(M1) + b"trailing")
        self.assertRegex(out, rb"a8 BAD ")
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_missing_mailbox_is_trycreate(self):
        out = yield self.command(b"a9", b"APPEND Nowhere " + lit(M1) + b" " + lit(M2))
        self.assertRegex(out, rb"a9 NO \[TRYCREATE\]")
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_message_count_is_bounded(self):
        many = b" ".join([lit(M1)] * (MAX_APPEND_MESSAGES + 1))
        out = yield self.command(b"a10", b"APPEND INBOX " + many)
        self.assertRegex(out, rb"a10 NO \[LIMIT\]")
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])
        out = yield self.command(b"a11", b"APPEND INBOX " + b" ".join([lit(M1)] * MAX_APPEND_MESSAGES))
        self.assertRegex(out, rb"a11 OK \[APPENDUID \d+ 1:%d\]" % MAX_APPEND_MESSAGES)

    @inlineCallbacks
    def test_failure_after_some_were_stored_takes_them_back(self):
        # The first message is committed, the second fails at its commit (its file in
        # tmp/ vanished): the first is removed again and the answer is NO.
        self.send(b"a12 APPEND INBOX " + lit(M1) + b' "01-Feb-2024 10:00:00 +0000" ')
        first = set(self.tmp_files())
        self.assertEqual(len(first), 1)
        self.send(lit(M2))
        second = set(self.tmp_files()) - first
        self.assertEqual(len(second), 1)
        os.unlink(self.user_path / "tmp" / second.pop())
        self.transport.clear()
        self.send(b"\r\n")
        out = yield self.wait_for(rb"a12 NO [^\r\n]*\r\n$")
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)
        self.assertNotIn(b"APPENDUID", out)
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])
        yield self.select()
        out = yield self.command(b"s", b"SEARCH ALL")
        self.assertIn(b"* SEARCH\r\n", out)

    @inlineCallbacks
    def test_over_quota_across_messages(self):
        self.session.imap_account.quota = len(M1) + len(M2) - 1
        out = yield self.command(b"a13", b"APPEND INBOX " + lit(M1) + b" " + lit(M2))
        self.assertRegex(out, rb"a13 NO \[OVERQUOTA\]")
        self.assertEqual(self.inbox_files(), [])
        self.assertEqual(self.tmp_files(), [])

    @inlineCallbacks
    def test_selected_session_sees_all_new_messages(self):
        yield self.select()
        out = yield self.command(b"a14", b"APPEND INBOX " + lit(M1) + b" " + lit(M2))
        self.assertIn(b"* 2 EXISTS", out)
        self.assertLess(out.index(b"* 2 EXISTS"), out.index(b"a14 OK"))


class BareLineFeeds(SessionCase):
    @inlineCallbacks
    def test_rfc822_size_is_the_size_of_what_fetch_sends(self):
        """An APPEND with bare LFs is kept as sent; FETCH sends its CRLF form, and
        RFC822.SIZE (from the ",W=" in its name) tells that form's size (RFC 3501 7.4.2)."""
        lf = b"Subject: lf\n\nline1\n..dot\nlast\n"
        crlf = lf.replace(b"\n", b"\r\n")
        out = yield self.command(b"a1", b"APPEND INBOX " + lit(lf))
        self.assertIn(b"a1 OK", out)
        [name] = os.listdir(self.user_path / "cur")
        self.assertIn(f",S={len(lf)},W={len(crlf)}", name)
        yield self.select()
        out = yield self.command(b"f", b"FETCH 1 (RFC822.SIZE BODY.PEEK[])")
        self.assertIn(b"RFC822.SIZE %d" % len(crlf), out)
        self.assertIn(b"BODY[] {%d}\r\n" % len(crlf) + crlf, out)


class InputBounds(SessionCase):
    """What one connection can make the server hold: literals before login, a whole
    command's bytes, and commands pipelined behind a slow one."""

    @inlineCallbacks
    def test_before_login_literals_are_small(self):
        session, transport = self.new_session()
        session.user, session.state = None, "unauth"
        self.send(b"a LOGIN {5000+}\r\n" + b"x" * 5000 + b" y\r\nb NOOP\r\n", session)
        out = yield self.wait_for(rb"b OK", transport)
        self.assertIn(b"a BAD Literal too large\r\n", out)     # once, not "BAD BAD"
        transport.clear()
        # Each literal small, but many in one command: refused once they pass 16 KiB.
        self.send(b"c LOGIN" + b" {4000+}\r\n" + b"x" * 4000 + b" {4000+}\r\n" + b"x" * 4000
                  + (b" {4000+}\r\n" + b"x" * 4000) * 3 + b"\r\nd NOOP\r\n", session)
        out = yield self.wait_for(rb"d OK", transport)
        self.assertIn(b"c BAD Command too long\r\n", out)
        self.assertLess(session._held, 16 * 1024)

    @inlineCallbacks
    def test_commands_pipelined_behind_a_slow_one_pause_reading(self):
        """Past 64 commands waiting, input is not read until half of them have run;
        every command is still answered, in order."""
        self.session._busy = True                # a command still running
        self.send(b"".join(b"n%d NOOP\r\n" % i for i in range(300)))
        self.assertEqual(len(self.session._queue), 64)
        self.assertGreater(self.transport.reading_paused, 0)
        self.assertGreater(len(self.session._buffer), 0)   # the rest waits, unread
        self.session._busy = False
        self.session._run_queue()
        out = yield self.wait_for(rb"n299 OK")
        tags = re.findall(rb"(n\d+) OK", out)
        self.assertEqual(tags, [b"n%d" % i for i in range(300)])
        self.assertEqual(self.transport.reading_paused, 0)


class QueueHoldReleased(SessionCase):
    """A full queue of pipelined commands that STARTTLS or COMPRESS drops must not leave
    input paused for good (the handshake or the compressed commands would never be read)."""

    @inlineCallbacks
    def test_compress_drops_a_full_queue_and_input_goes_on(self):
        self.session._busy = True
        self.send(b"c COMPRESS DEFLATE\r\n" + b"".join(b"n%d NOOP\r\n" % i for i in range(70)))
        self.assertIsNotNone(self.session._queue_room)
        self.session._busy = False
        self.session._run_queue()
        yield self.wait_for(rb"c OK")
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(self.session._input_held)
        self.assertEqual(self.transport.reading_paused, 0)

    @inlineCallbacks
    def test_starttls_drops_a_full_queue_and_input_goes_on(self):
        session, transport = self.new_session()
        session.user, session.state = None, "unauth"
        session.canStartTLS = True
        transport.startTLS = lambda ctx: None
        session._busy = True
        self.send(b"s STARTTLS\r\n" + b"".join(b"n%d NOOP\r\n" % i for i in range(70)),
                  session)
        session._busy = False
        session._run_queue()
        out = yield self.wait_for(rb"s OK", transport)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertNotIn(b"n1 OK", out)           # nothing pipelined before TLS counts
        self.assertFalse(session._input_held)
        self.assertEqual(transport.reading_paused, 0)


class CopyOfExpunged(SessionCase):
    @inlineCallbacks
    def test_copy_and_move_of_messages_expunged_elsewhere_say_no(self):
        """RFC 4315 3: COPYUID needs two non-empty uid sets; when every message named was
        expunged by another session meanwhile the answer is NO [EXPUNGEISSUED]."""
        yield self.append(M1)
        yield self.append(M2)
        yield self.select()
        folder = self.account.loaded_folder("INBOX")
        yield folder.delete_messages([i.uid for i in folder.messages])   # another session
        for tag, command in ((b"c1", b"COPY 1 Trash"), (b"c2", b"MOVE 2 Trash"),
                             (b"c3", b"UID COPY 1:2 Trash")):
            out = yield self.command(tag, command)
            self.assertIn(tag + b" NO [EXPUNGEISSUED]", out)
            self.assertNotIn(b"COPYUID", out)


class EightBitFlags(SessionCase):
    @inlineCallbacks
    def test_a_flag_with_an_8bit_octet_is_bad(self):
        """Flags are atoms, 7-bit (RFC 3501 9): STORE and APPEND answer BAD instead of
        an internal error or a dropped connection."""
        yield self.append(M1)
        yield self.select()
        out = yield self.command(b"s1", b"STORE 1 +FLAGS (caf\xe9)")
        self.assertIn(b"s1 BAD", out)
        out = yield self.command(b"a1", b"APPEND INBOX (caf\xe9) " + lit(M2))
        self.assertIn(b"a1 BAD", out)
        out = yield self.command(b"n1", b"NOOP")
        self.assertIn(b"n1 OK", out)
        self.assertEqual(self.flushLoggedErrors(), [])


class DeleteSelected(SessionCase):
    @inlineCallbacks
    def test_deleting_the_selected_mailbox_says_it_is_closed(self):
        out = yield self.command(b"c", b"CREATE Work")
        self.assertIn(b"c OK", out)
        yield self.select(b"Work")
        out = yield self.command(b"d", b"DELETE Work")
        self.assertIn(b"* OK [CLOSED]", out)
        self.assertIn(b"d OK", out)
        out = yield self.command(b"f", b"FETCH 1 FLAGS")
        self.assertIn(b"f BAD", out)          # no longer selected, as the client was told
        from mailserver.maildir.account import _DELETED_PREFIX
        for _ in range(400):                  # the files go in a thread: let it finish
            if not any(n.startswith(_DELETED_PREFIX) for n in os.listdir(self.user_path)):
                break
            yield task.deferLater(reactor, 0.005, lambda: None)


class Tags(SessionCase):
    @inlineCallbacks
    def test_a_tag_may_hold_a_closing_bracket(self):
        """RFC 3501 9: tag is any ASTRING-CHAR but "+", and "]" is one (APPEND too)."""
        out = yield self.command(b"a]1", b"NOOP")
        self.assertIn(b"a]1 OK", out)
        out = yield self.command(b"b]2", b"APPEND INBOX " + lit(M1))
        self.assertIn(b"b]2 OK", out)
        self.transport.clear()
        self.send(b"a+1 NOOP\r\n")
        out = yield self.wait_for(rb"BAD")
        self.assertNotIn(b"a+1 OK", out)


class HugeLiteralBeforeLogin(SessionCase):
    @inlineCallbacks
    def test_a_literal_over_the_message_size_is_refused_with_one_status(self):
        session, transport = self.new_session()
        session.user, session.state = None, "unauth"
        self.send(b"a LOGIN {20000000+}\r\n", session)
        out = yield self.wait_for(rb"BYE", transport)
        self.assertIn(b"a BAD Literal too large\r\n", out)
        self.assertNotIn(b"NO BAD", out)
