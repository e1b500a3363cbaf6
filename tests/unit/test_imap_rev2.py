"""IMAP4rev2 (RFC 9051) pieces: ENABLE, mailbox names in NFC UTF-8, SEARCH's default
RETURN, the LIST line SELECT sends, STATUS DELETED."""

from __future__ import annotations

import unicodedata
from types import SimpleNamespace

import pytest

from mailserver.imap.esearch import ReturnOptions
from mailserver.imap.fetch import STATUS_ITEMS, status_line
from mailserver.imap.rev2 import Rev2Session, rev2_mailbox_name, select_list_line
from mailserver.imap.utf8 import UTF8Session
from mailserver.maildir import InvalidFolderName


class Session(Rev2Session, UTF8Session):
    recent: set[int] = set()


def test_enable_once_any_case():
    s = Session()
    s.recent = {1, 2}
    assert not s.utf8_names
    assert s.enable_rev2([b"CONDSTORE"]) == []
    assert s.enable_rev2([b"IMAP4REV2"]) == [b"IMAP4rev2"]
    assert s.rev2 and s.utf8_names and s.recent == set()
    assert s.enable_rev2([b"IMAP4REV2"]) == []


def test_names_utf8_and_nfc():
    s = Session()
    assert s._decode_name(b"Entw&APw-rfe") == "Entwürfe"      # modified UTF-7 before
    s.enable_rev2([b"IMAP4REV2"])
    assert s._decode_name(b"R&D") == "R&D"                    # "&" is an ampersand
    nfd = unicodedata.normalize("NFD", "Entwürfe").encode()
    assert s._decode_name(nfd) == "Entwürfe"
    assert s._decode_name(b"inbox") == "INBOX"
    assert s._wire_name("Entwürfe") == '"Entwürfe"'.encode()
    assert s._wire_name("INBOX") == b"INBOX"


@pytest.mark.parametrize("bad", [b"\xff\xfe", "a\u0085b".encode(), b"x\x01"])
def test_bad_names(bad):
    with pytest.raises(InvalidFolderName):
        rev2_mailbox_name(bad)


def test_search_default_return():
    s = Session()
    assert s.search_options(None) is None
    s.enable_rev2([b"IMAP4REV2"])
    assert s.search_options(None) == ReturnOptions(all=True)
    count = ReturnOptions(count=True)
    assert s.search_options(count) is count


def test_select_list_line():
    account = SimpleNamespace(list_folders=lambda: [
        SimpleNamespace(name="INBOX", attributes=("\\HasNoChildren",)),
        SimpleNamespace(name="Sent", attributes=("\\HasNoChildren", "\\Sent"))])
    assert select_list_line(account, "Sent", b"Sent") == (
        b'LIST (\\HasNoChildren \\Sent) "." Sent')
    assert select_list_line(account, "Gone", b"Gone") == b'LIST () "." Gone'


def test_status_deleted():
    assert b"DELETED" in STATUS_ITEMS
    folder = SimpleNamespace(deleted_count=1)   # kept by the folder (test_imap_condstore)
    assert status_line(folder, [b"DELETED"]) == b"(DELETED 1)"


def test_oldname_lines():
    s = Session()
    nfd = unicodedata.normalize("NFD", "Brouillés")
    assert s.created_as(nfd.encode(), "Brouillés") is None         # rev1: nothing
    assert s.renamed("a", "b") is None
    s.enable_rev2([b"IMAP4REV2"])
    assert s.created_as(nfd.encode(), "Brouillés") == (
        'LIST () "." "Brouillés" ("OLDNAME" ("' + nfd + '"))').encode()
    assert s.created_as(b"Plain.", "Plain") is None                 # trailing "." only
    assert s.renamed("Old", "New") == b'LIST () "." New ("OLDNAME" (Old))'
