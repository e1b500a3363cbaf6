"""LIST/LSUB selection (RFC 3501 6.3.8, 6.3.9, RFC 5258) over a real folder tree; \\Recent
seen by a read-only session without taking it (RFC 3501 2.3.2); keywords announced in FLAGS
between two FETCH responses, never inside one (RFC 3501 7.2.6)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.imap import listing as L
from mailserver.imap.parser import Arguments, BadCommand
from mailserver.imap.server import IMAPSession, _ResponseCursor
from mailserver.maildir import MaildirStore

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def request(text: str, lsub: bool = False) -> L.ListRequest:
    """Parse the arguments of a LIST (or LSUB) command given after the command name."""
    return L.parse_list(Arguments([(" " + text).encode()]), lsub)


class StoreCase(unittest.TestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="rfc3501-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        self.user = self.store.create_user("example.org", "alice")
        self.account = self.store.account(self.user)
        self.addCleanup(self.stop_timers)

    def stop_timers(self) -> None:
        for folder in self.account._folders.values():
            call = folder._refresh_call
            if call is not None and call.active():
                call.cancel()
            folder._stop_settling()

    def listed(self, text: str, lsub: bool = False) -> dict[str, tuple[list[str], bool]]:
        entries = list(L.list_entries(self.account, request(text, lsub)))
        names = [e.name for e in entries]
        self.assertEqual(len(names), len(set(names)), f"a name listed twice: {names}")
        return {e.name: (e.attributes, e.childinfo) for e in entries}


class ListSelection(StoreCase):
    def setUp(self) -> None:
        super().setUp()
        for name in ("parent.child.leaf", "Fruit.Apple", "Fruit.Banana", "Tree.Oak"):
            self.account.create_folder(name)
        for name in ("parent.child.leaf", "Fruit.Banana", "Tree", "Tree.Oak", "Ghost.Child"):
            self.account.subscribe(name)

    def test_lsub_percent_gives_unsubscribed_parent_noselect(self):
        got = self.listed('"" parent.%', lsub=True)
        self.assertEqual(set(got), {"parent.child"})
        self.assertEqual(got["parent.child"][0][0], "\\Noselect")
        self.assertEqual(set(self.listed('"" parent.*', lsub=True)), {"parent.child.leaf"})
        top = self.listed('"" %', lsub=True)
        self.assertIn("\\Noselect", top["parent"][0])
        self.assertIn("\\Noselect", top["Ghost"][0])          # no folder at all
        self.assertNotIn("\\Noselect", top["Tree"][0])        # subscribed itself
        self.assertNotIn("Sent", {n for n, (a, _) in top.items() if "\\Noselect" in a})
        self.assertFalse(any(ci for _, ci in top.values()), "no CHILDINFO in LSUB")

    def test_many_wildcards_against_a_long_name(self):
        """Wildcards are matched in linear time: a backtracking match of this pattern
        against this name took 70 s (with 6 stars) in the reactor."""
        self.account.create_folder("a" * 200)
        self.assertEqual(self.listed('"" "' + "*a" * 40 + '*b"'), {})
        self.assertEqual(set(self.listed('"" "' + "*a" * 40 + '*"')), {"a" * 200})
        self.assertEqual(set(self.listed('"" "%%%*%.%*A%p*e"')), {"Fruit.Apple"})
        self.assertEqual(set(self.listed('"" "inbox%"')), {"INBOX"})

    def test_recursivematch_without_subscribed_is_bad(self):
        for text in ('(RECURSIVEMATCH) "" "*"', '(REMOTE RECURSIVEMATCH) "" "*"',
                     '(SPECIAL-USE RECURSIVEMATCH) "" "*"', '(BOGUS) "" "*"',
                     '"" "*" RETURN (BOGUS)', '"" "*" RETURN (STATUS (BOGUS))'):
            self.assertRaises(BadCommand, request, text)
        self.assertTrue(request('(RECURSIVEMATCH SUBSCRIBED) "" %').recursive)
        self.assertTrue(request('(subscribed) "" %').return_subscribed)

    def test_subscribed_deleted_names_are_nonexistent(self):
        self.account.create_folder("Peach")
        self.account.subscribe("Peach")
        self.account.delete_folder("Peach")
        got = self.listed('(SUBSCRIBED) "" "*"')
        self.assertEqual(got["Peach"][0][0], "\\NonExistent")
        self.assertIn("\\Subscribed", got["Peach"][0])
        self.assertIn("\\Subscribed", got["Ghost.Child"][0])
        self.assertNotIn("Fruit", got)
        self.assertNotIn("\\NonExistent", got["Tree"][0])
        self.assertNotIn("Peach", self.listed('"" "*"'))

    def test_recursivematch_childinfo(self):
        got = self.listed('(SUBSCRIBED RECURSIVEMATCH) "" %')
        self.assertEqual(got["Fruit"], (["\\HasChildren"], True))
        self.assertEqual(got["Tree"], (["\\HasChildren", "\\Subscribed"], True))
        self.assertEqual(got["Ghost"], (["\\NonExistent", "\\HasNoChildren"], True))
        self.assertFalse(got["INBOX"][1])
        self.assertNotIn("Fruit.Banana", got)
        # Children listed themselves: no parent sent only for its CHILDINFO.
        got = self.listed('(SUBSCRIBED RECURSIVEMATCH) "" "*"')
        self.assertNotIn("Fruit", got)
        self.assertNotIn("parent.child", got)
        self.assertTrue(got["Tree"][1])
        self.assertFalse(got["Tree.Oak"][1])
        # Several patterns: a name is one response; one pattern listing the child is enough.
        got = self.listed('(SUBSCRIBED RECURSIVEMATCH) "" (Fruit Fruit.% %)')
        self.assertNotIn("Fruit", got)
        self.assertIn("Fruit.Banana", got)

    def test_extended_list_ignores_empty_pattern(self):
        self.assertEqual(self.listed('"" ""'), {"": (["\\Noselect"], False)})
        self.assertEqual(self.listed('() "" ""'), {})
        self.assertEqual(self.listed('"" ("")'), {})

    def test_patterns_are_matched_on_the_wire_form(self):
        self.account.create_folder("Tom & Jerry")
        self.account.create_folder("Entwürfe")
        self.assertEqual(set(self.listed('"" "Tom &-*"')), {"Tom & Jerry"})
        self.assertEqual(set(self.listed('"" "Entw&APw-*"')), {"Entwürfe"})
        self.assertEqual(set(self.listed('"" "*&APw-*"')), {"Entwürfe"})
        utf8 = L.ListRequest("", [L.wire_text("Entwü*".encode())])
        self.assertEqual([e.name for e in L.list_entries(self.account, utf8)], ["Entwürfe"])
        # Every list-char, and "&" that starts no valid modified UTF-7: no error, no match.
        for pattern in ("!#$&'+,-.0123456789:;<=>?@^_`|[}%*", "a]%", "&Jjo", "&"):
            self.assertEqual(self.listed(f'"" {pattern}'), {})
        self.assertEqual(set(self.listed('"" inbox')), {"INBOX"})
        self.assertEqual(set(self.listed('"" inB%')), set())
        self.assertEqual(set(self.listed('"" Inbox*')), {"INBOX"})
        self.assertEqual(set(self.listed('"parent." %')), {"parent.child"})


class RecentForReadOnly(StoreCase):
    @inlineCallbacks
    def test_peek_leaves_recent_to_the_next_claim(self):
        folder = self.account.folder("INBOX")
        for _ in range(2):
            w = folder.begin_append()
            w.write(MESSAGE)
            yield w.commit()
        yield folder.refresh()
        self.assertEqual(folder.peek_recent(), {1, 2})
        self.assertEqual(folder.peek_recent(), {1, 2})
        self.assertEqual(folder.recent_count, 2)
        self.assertEqual(folder.claim_recent(object()), {1, 2})
        self.assertEqual(folder.peek_recent(), set())
        self.assertEqual(folder.recent_count, 0)


class KeywordCase(StoreCase):
    @inlineCallbacks
    def setUp(self):
        super().setUp()
        self.folder = self.account.folder("INBOX")
        for _ in range(3):
            w = self.folder.begin_append()
            w.write(MESSAGE)
            yield w.commit()
        yield self.folder.refresh()


class KeywordNames(KeywordCase):
    @inlineCallbacks
    def test_listeners_hear_of_a_keyword_after_it_is_named(self):
        seen: list[tuple[str, ...]] = []

        class Listener:
            def flags_changed(inner, infos: list[Any]) -> None:
                seen.append(self.folder.keyword_names)
                for info in infos:
                    for flag in info.flags:
                        if not flag.startswith("\\"):
                            self.assertIn(flag, self.folder.keyword_names)

            def messages_added(inner, infos: list[Any]) -> None:
                pass

            def messages_expunged(inner, uids: list[int]) -> None:
                pass

        self.folder.add_listener(Listener())
        before = self.folder.keyword_names
        yield self.folder.store_flags([1], {"\\Seen"}, "add")
        self.assertIs(self.folder.keyword_names, before, "no new keyword: same tuple")
        yield self.folder.store_flags([2], {"$Work"}, "add")
        self.assertEqual(self.folder.keyword_names, ("$Work",))
        self.assertEqual(seen[-1], ("$Work",))
        named = self.folder.keyword_names
        yield self.folder.store_flags([3], {"$work"}, "add")  # same keyword, other case
        self.assertIs(self.folder.keyword_names, named)
        self.assertEqual(self.folder.keywords, ["$Work"])


class SessionCase(KeywordCase):
    def session(self) -> tuple[IMAPSession, StringTransport]:
        context = SimpleNamespace(tls=None, limits=SimpleNamespace(idle_timeout=300))
        session = IMAPSession(context)  # type: ignore[arg-type]
        transport = StringTransport()
        session.transport = transport
        session.folder = self.folder
        session.readonly = False
        session.view = self.folder.uids()
        session._keywords_told = self.folder.keyword_names
        return session, transport

    @inlineCallbacks
    def test_announcement_waits_for_the_end_of_a_response(self):
        session, _ = self.session()
        chunks = iter([b"* 1 FETCH (UID 1 BODY[] {12}\r\n", b"012345", b"6789\r\n",
                       b")\r\n", b"* 2 FETCH (UID 2 FLAGS ($Late))\r\n"])
        stream = session._announcing_keywords(chunks)
        out = [next(stream)]
        yield self.folder.store_flags([2], {"$Late"}, "add")  # defined mid-literal
        out += list(stream)
        data = b"".join(out)
        first_end = data.index(b"6789\r\n)\r\n") + len(b"6789\r\n)\r\n")
        self.assertTrue(data[first_end:].startswith(b"* FLAGS (\\Answered"), data)
        flags_line = data[first_end:].split(b"\r\n", 1)[0]
        self.assertIn(b"$Late", flags_line)
        self.assertIn(b"* OK [PERMANENTFLAGS (", data[first_end:])
        self.assertLess(data.index(b"* FLAGS"), data.index(b"FLAGS ($Late)"))
        self.assertEqual(data.count(b"* FLAGS"), 1)

    @inlineCallbacks
    def test_announcement_before_a_response_starting_mid_chunk(self):
        session, _ = self.session()
        chunks = iter([b"* 1 FETCH (BODY[] {3}\r\n", b"abc",
                       b" FLAGS ())\r\n* 2 FETCH (BODY[] {2}\r\nxy FLAGS ($Late))\r\n"])
        stream = session._announcing_keywords(chunks)
        out = [next(stream), next(stream)]
        yield self.folder.store_flags([2], {"$Late"}, "add")
        data = b"".join(out + list(stream))
        self.assertIn(b"abc FLAGS ())\r\n* FLAGS (", data)
        self.assertLess(data.index(b"* FLAGS ("), data.index(b"* 2 FETCH"))

    @inlineCallbacks
    def test_announced_once_before_untagged_fetch(self):
        session, transport = self.session()
        yield self.folder.store_flags([1], {"$Other"}, "add")
        session._send_flags(1)
        session._send_flags(1)
        data = transport.value()
        self.assertEqual(data.count(b"* FLAGS "), 1)
        self.assertLess(data.index(b"* FLAGS "), data.index(b"* 1 FETCH"))
        self.assertIn(b"$Other \\*)] Flags permitted", data)


class ResponseCursor(unittest.TestCase):
    def test_between_responses_only_outside_literals(self):
        cursor = _ResponseCursor()
        self.assertTrue(cursor.between)
        steps = [
            (b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (BODY[] {5}\r\n", False),
            (b"ab\r\n", False),            # 4 of the 5 literal octets, ending in CRLF
            (b"c", False),                 # literal complete; the response goes on
            (b")\r\n", True),
            (b"* 3 FETCH (BODY[] {3}\r\nxyz)\r\n", True),
            (b"* 4 FETCH (BODY[] {0}\r\n", False),
            (b")\r\n", True),
            (b"", True),
            (b"* 5 FETCH (ENVELOPE (\"{9}\" NIL)", False),
            (b")\r\n", True),
        ]
        for chunk, between in steps:
            cursor.feed(chunk)
            self.assertEqual(cursor.between, between, chunk)

    def test_first_boundary_in_a_chunk(self):
        cursor = _ResponseCursor()
        self.assertEqual(cursor.first_boundary(b"* 1 FETCH (FLAGS ())\r\n"), 0)
        cursor.feed(b"* 1 FETCH (BODY[] {4}\r\n")
        self.assertIsNone(cursor.first_boundary(b"a\r\nb"))         # all literal
        self.assertEqual(cursor.first_boundary(b"a\r\nb)\r\n* 2"), 7)
        cursor.feed(b"a\r\nb")
        chunk = b" BODY[TEXT] {2}\r\n\r\n)\r\n* 2 FETCH (UID 2)\r\n"
        self.assertEqual(chunk[:cursor.first_boundary(chunk)], b" BODY[TEXT] {2}\r\n\r\n)\r\n")
        self.assertIsNone(cursor.first_boundary(b" BODY[TEXT] {2}\r\n"))
