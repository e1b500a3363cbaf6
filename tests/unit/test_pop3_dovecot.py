"""POP3 UIDLs and order stored by Dovecot in dovecot-uidlist (P<uidl>, O<order>): the
uid list's ext fields, what POP3 makes of them, and that rewrites keep them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.maildir import MaildirStore, UidList
from mailserver.pop3.dovecot import apply_fields, stored_uidl
from mailserver.pop3.mailbox import MailboxLocks, open_inbox

UIDLIST = (
    "3 V1700000000 N6 G0123456789abcdef0123456789abcdef\n"
    "1 P000000016548ab2e O2 W40 :1700000001.M1P1.old,S=38,W=40\n"
    "2 O1 :1700000002.M2P2.old,S=38,W=40\n"
    "3 P :1700000003.M3P3.old,S=38,W=40\n"
    "4 :1700000004.M4P4.old,S=38,W=40\n"
    "5 W40 Pdup O1x :1700000005.M5P5.old,S=38,W=40\n"
)


def test_ext_fields_of_the_uid_list(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, UIDLIST.encode())
    assert ul.ext_fields("PO") == {
        1: {"P": "000000016548ab2e", "O": "2"}, 2: {"O": "1"}, 3: {"P": ""},
        5: {"P": "dup", "O": "1x"}}
    assert ul.ext_fields("X") == {}


def test_rewrite_keeps_the_fields(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, UIDLIST.encode())
    ul.remove(4)
    ul.add("1700000009.M9P9.new,S=10")
    text = ul.serialize().decode()
    assert "1 P000000016548ab2e O2 W40 :1700000001.M1P1.old,S=38,W=40\n" in text
    assert "3 P :1700000003.M3P3.old,S=38,W=40\n" in text
    assert "6 :1700000009.M9P9.new,S=10\n" in text
    assert UidList.parse(tmp_path, text.encode()).ext_fields("PO") == {
        1: {"P": "000000016548ab2e", "O": "2"}, 2: {"O": "1"}, 3: {"P": ""},
        5: {"P": "dup", "O": "1x"}}


def test_stored_uidl() -> None:
    assert stored_uidl("000000016548ab2e") == b"000000016548ab2e"
    assert stored_uidl("") is None                    # Dovecot: the base name
    assert stored_uidl("x" * 71) is None              # RFC 1939 7: at most 70
    assert stored_uidl("a\udcffb") is None            # 8-bit
    assert stored_uidl("x" * 70) == b"x" * 70


def _entries(*uids: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(uid=u, uidl=None) for u in uids]


def test_apply_fields_uidls_and_order() -> None:
    entries = _entries(1, 2, 3, 4, 5, 6)
    fields = {1: {"P": "AAA", "O": "3"}, 2: {"O": "1"}, 3: {"P": ""}, 5: {"P": "AAA"},
              6: {"P": "bad id", "O": "x"}}
    listed, unusable = apply_fields(entries, fields)
    assert [e.uid for e in listed] == [2, 1, 3, 4, 5, 6]   # O first, then uid order
    assert [e.uidl for e in listed] == [None, b"AAA", None, None, None, None]
    assert unusable == 2                                   # a repeat and a space


def test_apply_fields_without_order_keeps_uid_order() -> None:
    listed, unusable = apply_fields(_entries(1, 2), {2: {"P": "z"}})
    assert [(e.uid, e.uidl) for e in listed] == [(1, None), (2, b"z")]
    assert unusable == 0
    assert apply_fields(_entries(3), {}) == (_entries(3), 0)


class OpenInbox(unittest.TestCase):
    """The snapshot POP3 takes: the stored UIDLs and order of a Maildir Dovecot wrote."""

    def setUp(self) -> None:
        root = Path(self.mktemp())
        self.store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        self.path = self.store.create_user("example.org", "alice")
        for n in range(1, 6):
            (self.path / "cur" / f"17000000{n:02d}.M{n}P{n}.old,S=38,W=40:2,S").write_bytes(
                b"Subject: %d\n\n" % n + b"x" * 25 + b"\n")   # 38 octets, 40 as CRLF
        (self.path / "dovecot-uidlist").write_text(UIDLIST)
        self.addCleanup(lambda: self.store.account(self.path).folder("INBOX").close())

    @inlineCallbacks
    def test_snapshot(self):
        box = yield open_inbox(self.store, self.path, "alice@example.org", MailboxLocks())
        try:
            listed = [(e.uid, e.unique_id()) for e in box.entries]
            self.assertEqual(listed, [
                (2, b"1700000002.M2P2.old,S=38,W=40"), (1, b"000000016548ab2e"),
                (3, b"1700000003.M3P3.old,S=38,W=40"), (4, b"1700000004.M4P4.old,S=38,W=40"),
                (5, b"dup")])
            self.assertEqual(box.getUidl(1), b"000000016548ab2e")
        finally:
            box.logout()
