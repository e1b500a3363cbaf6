"""SEARCH over a real folder: header keys answered from the index's search table (and
from the files when the index is unusable), flag keys from memory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.imap import search as S
from mailserver.imap.parser import Arguments
from mailserver.maildir import MaildirStore
from mailserver.maildir.index import INDEX_NAME

MESSAGES = [
    # (flags, header lines)
    ({"\\Seen"}, ["From: Alice <alice@example.test>", "To: bob@example.test",
                  "Subject: Alpha meeting", "Date: Mon, 01 Jan 2024 12:00:00 +0000"]),
    ({"\\Flagged"}, ["From: Dave <dave@remote.test>", "To: alice@example.test",
                     "Subject: =?utf-8?q?Caf=C3=A9_REPORT?=",
                     "Date: Sat, 10 Feb 2024 12:00:00 +0000"]),
    ({"\\Seen", "\\Deleted"}, ["From: bob@example.test", "To: alice@example.test",
                               "Cc: carol@example.test", "Subject: Gamma",
                               "Date: Wed, 20 Mar 2024 12:00:00 +0000"]),
    (set(), ["From: carol@example.test", "To: alice@example.test", "Subject: alpha beta",
             "Date: Mon, 01 Apr 2024 12:00:00 +0000"]),
]


class FolderOfFour(unittest.TestCase):
    """A folder holding MESSAGES, and a session that sees all of it."""

    @inlineCallbacks
    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="search-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        self.account = store.account(store.create_user("example.test", "alice"))
        self.addCleanup(self.account.close)
        self.folder = self.account.folder("INBOX")
        for flags, headers in MESSAGES:
            w = self.folder.begin_append(flags=flags)
            w.write(("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode())
            yield w.commit()
        yield self.folder.refresh()

    def session(self):
        return SimpleNamespace(folder=self.folder, view=self.folder.uids(), recent=set())

    def run_search(self, text: str):
        return S.search(self.session(), S.parse_search(Arguments([text.encode()])))

    @inlineCallbacks
    def check(self, cases):
        for text, expected in cases:
            found = yield self.run_search(text)
            self.assertEqual(found, expected, text)


class SearchTests(FolderOfFour):
    HEADER_CASES = [
        ("SUBJECT alpha", [1, 4]), ("SUBJECT café", [2]), ("SUBJECT report", [2]),
        ("FROM ALICE", [1]), ("TO alice", [2, 3, 4]), ("CC carol", [3]), ("BCC x", []),
        ("HEADER Subject gamma", [3]), ("OR SUBJECT gamma FROM dave", [2, 3]),
        ("NOT SUBJECT alpha", [2, 3]), ("SUBJECT alpha UNSEEN", [4]),
        ("SENTBEFORE 1-Mar-2024", [1, 2]), ("SENTON 20-Mar-2024", [3]),
    ]

    @inlineCallbacks
    def test_header_keys_from_the_index(self):
        yield self.check(self.HEADER_CASES)
        base = self.folder.by_uid(1).basename
        self.assertIn(base, self.folder.index.search_bases())
        # the second time every message is indexed: same answers from SQL alone
        yield self.check(self.HEADER_CASES)

    @inlineCallbacks
    def test_expunged_messages_leave_the_search_table(self):
        yield self.check([("SUBJECT alpha", [1, 4])])
        base = self.folder.by_uid(1).basename
        yield self.folder.delete_messages([1])
        self.assertNotIn(base, self.folder.index.search_bases())
        yield self.check([("SUBJECT alpha", [4])])

    @inlineCallbacks
    def test_unusable_index_falls_back_to_the_files(self):
        yield self.folder.close()
        index_file = self.folder.path / INDEX_NAME
        index_file.write_bytes(b"this is not an SQLite database" * 100)
        self.folder.index._broken = False
        yield self.check(self.HEADER_CASES)

    @inlineCallbacks
    def test_flag_keys(self):
        cases = [("UNSEEN", [2, 4]), ("SEEN", [1, 3]), ("NOT SEEN", [2, 4]),
                 ("DELETED", [3]), ("UNDELETED SEEN", [1]), ("NOT DELETED", [1, 2, 4]),
                 ("ALL", [1, 2, 3, 4]), ("FLAGGED UNSEEN", [2]), ("SEEN NOT DELETED", [1])]
        for text, _ in cases:
            query = S.parse_search(Arguments([text.encode()]))
            self.assertIsNotNone(query.flag_tests, f"{text}: no fast path")
        yield self.check(cases)
        # the general path gives the same answers
        for text, expected in cases:
            query = S.parse_search(Arguments([text.encode()]))
            query.flag_tests = None
            found = yield S.search(self.session(), query)
            self.assertEqual(found, expected, text)

    @inlineCallbacks
    def test_flag_answers_follow_flag_changes(self):
        yield self.check([("UNSEEN", [2, 4])])
        yield self.folder.store_flags([2], {"\\Seen"}, "add")
        yield self.check([("UNSEEN", [4]), ("SEEN", [1, 2, 3])])
        yield self.folder.delete_messages([4])
        yield self.check([("UNSEEN", []), ("SEEN", [1, 2, 3])])
        # a session that has not caught up with an expunge yet searches its own view
        stale = SimpleNamespace(folder=self.folder, view=[1, 2, 3, 4], recent=set())
        query = S.parse_search(Arguments([b"SEEN"]))
        found = yield S.search(stale, query)
        self.assertEqual(found, [1, 2, 3])


class RangeTests(FolderOfFour):
    """Keys joined with a sequence or UID set (RFC 3501 6.4.4) test only the messages of
    the smallest set, and answer as a test of every message would."""

    RANGE_CASES = [
        ("1:2 UNSEEN", [2]), ("UID 3:* SEEN", [3]), ("2:3 UID 3:4", [3]),
        ("OR 1 4", [1, 4]), ("NOT 1:3", [4]), ("(1:2 UNSEEN)", [2]), ("* UNSEEN", [4]),
        ("UID 9:*", [4]), ("5:7", []), ("UID 5:7 ALL", []), ("SUBJECT alpha 4", [4]),
        ("2,4 NOT UID 4", [2]), ("OR (1:2 UNSEEN) 4", [2, 4]), ("1:* UID 2", [2]),
        ("NOT (1:2 SEEN)", [2, 3, 4]), ("NOT (1:2 UNSEEN)", [1, 3, 4]),
        ("NOT (UID 1 DELETED)", [1, 2, 3, 4]), ("NOT NOT (1:2 SEEN)", [1]),
        ("(NOT (1:2 SEEN)) 3:4", [3, 4]), ("4:2 UID *:3", [3, 4]),
    ]

    @inlineCallbacks
    def test_ranges_answer_as_the_whole_view_would(self):
        yield self.check(self.RANGE_CASES)
        # the same keys without the narrowing: every message tested
        for text, expected in self.RANGE_CASES:
            query = S.parse_search(Arguments([text.encode()]))
            query.within = ()
            query.flag_tests = None
            found = yield S.search(self.session(), query)
            self.assertEqual(found, expected, text)

    def test_sets_and_flags_alone_take_the_flag_path(self):
        for text in ("1:2 UNSEEN", "UID 3:* SEEN", "2:3 UID 3:4", "(1:2 UNSEEN)", "5:7"):
            self.assertIsNotNone(S.parse_search(Arguments([text.encode()])).flag_tests, text)
        for text in ("OR 1 4", "NOT 1:3", "SUBJECT alpha 4"):
            self.assertIsNone(S.parse_search(Arguments([text.encode()])).flag_tests, text)

    @inlineCallbacks
    def test_many_ranges_go_to_the_thread(self):
        many = ",".join(str(n) for n in range(1, 200, 2))   # 100 ranges
        query = S.parse_search(Arguments([f"UID {many} SEEN".encode()]))
        self.assertIsNone(query.flag_tests)   # not resolved in the reactor
        found = yield S.search(self.session(), query)
        self.assertEqual(found, [1, 3])

    def test_the_sets_are_intersected(self):
        view = [1, 5, 9, 12, 20]

        def within(text: str):
            return S.parse_search(Arguments([text.encode()])).within

        self.assertEqual(S.candidates(view, within("UID 5:9")), [(2, 5), (3, 9)])
        self.assertEqual(S.candidates(view, within("2:* UID 10:*")), [(4, 12), (5, 20)])
        self.assertEqual(S.candidates(view, within("1:* 5")), [(5, 20)])
        self.assertEqual(S.candidates(view, within("1:4 UID 9,20 (UID 1:19)")), [(3, 9)])
        self.assertEqual(S.candidates(view, within("UID 30:*")), [(5, 20)])  # '*' is 20
        self.assertEqual(S.candidates(view, within("UID 21:30")), [])
        self.assertEqual(S.candidates(view, within("6:9")), [])
        self.assertEqual(S.candidates([], within("1:*")), [])
        self.assertEqual(within("OR 1 2"), ())
        self.assertEqual(within("NOT 1"), ())

    @inlineCallbacks
    def test_a_stale_view_skips_what_was_expunged(self):
        yield self.folder.delete_messages([2])
        stale = SimpleNamespace(folder=self.folder, view=[1, 2, 3, 4], recent=set())
        found = yield S.search(stale, S.parse_search(Arguments([b"1:3 NOT DELETED"])))
        self.assertEqual(found, [1])


def test_imap_avatar_provides_its_interface(tmp_path):
    """The avatar IMAP logins get implements IIMAPAccount in full (verifyObject)."""
    from zope.interface.verify import verifyObject

    from mailserver.imap.mailbox import IIMAPAccount, IMAPAccount
    from mailserver.maildir import MaildirStore

    store = MaildirStore(tmp_path / "maildirs")
    avatar = IMAPAccount("alice@example.test",
                         store.account(store.create_user("example.test", "alice")))
    assert verifyObject(IIMAPAccount, avatar)


def test_search_rows_of_another_form_are_dropped_on_open(tmp_path):
    """Rows written only case-folded (before search_form) would miss a decomposed
    "café": an index whose rows are of another form loses them, and keeps the rest."""
    import sqlite3

    from mailserver.maildir.index import SEARCH_FORM, FolderIndex

    index = FolderIndex(tmp_path)
    index.put_search([("b1", "caf\u00e9", "", "", "", "", "")])
    index.put_messages([("b1", 10, 1.0)])
    index.flush()
    assert index.search_bases() == {"b1"}
    index.close()
    conn = sqlite3.connect(index.path)
    with conn:
        conn.execute("DELETE FROM meta WHERE key='search_form'")
    conn.close()
    again = FolderIndex(tmp_path)
    try:
        assert again.search_bases() == set()
        assert "b1" in again.load()[1]                  # the message rows stay
        again.put_search([("b1", "cafe\u0301", "", "", "", "", "")])
        again.flush()
        assert again.search_bases() == {"b1"}
    finally:
        again.close()
    conn = sqlite3.connect(index.path)
    assert conn.execute("SELECT value FROM meta WHERE key='search_form'").fetchone() == \
        (SEARCH_FORM,)
    conn.close()
