"""IMAP4rev2 (RFC 9051) beside IMAP4rev1: what changes once a client sent
ENABLE IMAP4rev2 (RFC 9051 6.3.1).

The server speaks both revisions (RFC 9051 1, Appendix E): IMAP4rev2 is advertised next to
IMAP4rev1, and a client that does not enable it sees the server exactly as before.  After
ENABLE IMAP4rev2:

- no \\Recent flag and no RECENT response (RFC 9051 Appendix E): the session neither
  claims nor peeks at recent messages, so FETCH FLAGS never shows \\Recent, SEARCH RECENT
  and NEW match nothing, and SELECT, EXAMINE and new mail send no "n RECENT";
- SEARCH answers with ESEARCH always, ALL when no RETURN option is given (6.4.4), with the
  (TAG "x") correlator and UID for UID SEARCH (7.3.4);
- mailbox names are UTF-8 both ways (5.1), as after ENABLE UTF8=ACCEPT (imap/utf8.py),
  normalised to NFC (5.1: a denormalised name is taken as its NFC form everywhere);
  unlike UTF8=ACCEPT, SEARCH CHARSET stays allowed (6.4.4) and APPEND takes no
  "UTF8 (...)" data;
- SELECT and EXAMINE send a LIST response for the mailbox (6.3.2) and no UNSEEN response
  code (Appendix E); OK [CLOSED] when they replace a selection (7.1), as with QRESYNC.

What both revisions get: STATUS DELETED (6.3.11, imap/fetch.py) and every extension RFC
9051 folds in (NAMESPACE, UNSELECT, UIDPLUS, ESEARCH, SEARCHRES, ENABLE, IDLE, SASL-IR,
LIST-EXTENDED, LIST-STATUS, MOVE, BINARY, SPECIAL-USE, STATUS=SIZE).  LITERAL- (RFC 7888)
is covered by LITERAL+, which is advertised instead: RFC 7888 forbids advertising both.
LSUB stays (deprecated, still allowed).
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Any

from mailserver.imap import listing as L
from mailserver.imap import utf8 as U
from mailserver.imap.esearch import ReturnOptions

REV2_CAPABILITY = b"IMAP4rev2"
# RFC 9051 6.4.4: a SEARCH without RETURN is answered as RETURN (ALL).
SEARCH_DEFAULT = ReturnOptions(all=True)


def rev2_mailbox_name(raw: bytes) -> str:
    """A mailbox name from an IMAP4rev2 client (RFC 9051 5.1): UTF-8, taken in NFC so that
    CREATE and SELECT of the same denormalised name reach the same mailbox."""
    name = U.decode_utf8_mailbox(raw)
    return unicodedata.normalize("NFC", name)


def select_list_line(account: Any, name: str, wire: bytes) -> bytes:
    """The LIST response SELECT/EXAMINE sends for the mailbox (RFC 9051 6.3.2), with its
    attributes as LIST gives them (without "* ")."""
    attributes: list[str] = []
    for entry in account.list_folders():
        if entry.name == name:
            attributes = list(entry.attributes)
            break
    return L.ListEntry(name, attributes).line(b"LIST", wire)


def oldname_line(wire: bytes, old_wire: bytes) -> bytes:
    """The LIST response naming a mailbox's previous or as-sent name (without "* "): RFC
    9051 6.3.4 (CREATE of a name the server normalised) and 6.3.6 (RENAME's optional LIST),
    with the OLDNAME extended data item (RFC 9051 7.3.1)."""
    return b'LIST () "' + L.DELIMITER + b'" ' + wire + b' ("OLDNAME" (' + old_wire + b"))"


class Rev2Session:
    """The session's IMAP4rev2 state (a mixin of IMAPSession, before UTF8Session)."""

    rev2 = False   # ENABLE IMAP4rev2 was sent (RFC 9051 6.3.1)

    if TYPE_CHECKING:  # what the session provides
        utf8_accept: bool
        recent: set[int]

    def enable_rev2(self, names: list[bytes]) -> list[bytes]:
        """ENABLE (RFC 9051 6.3.1) of IMAP4rev2: the names newly enabled."""
        if REV2_CAPABILITY.upper() not in names or self.rev2:  # names come upper-cased
            return []
        self.rev2 = True
        self.recent = set()  # no \Recent from now on, also in a selected mailbox
        return [REV2_CAPABILITY]

    @property
    def utf8_names(self) -> bool:
        """Whether mailbox names travel as UTF-8 (RFC 6855 3, RFC 9051 5.1)."""
        return self.utf8_accept or self.rev2

    def _decode_name(self, raw: bytes) -> str:
        if self.rev2:
            return rev2_mailbox_name(raw)
        return U.mailbox_name(raw, self.utf8_accept)

    def _wire_name(self, name: str) -> bytes:
        return U.wire_name(name, self.utf8_names)

    def created_as(self, raw: bytes, name: str) -> bytes | None:
        """RFC 9051 6.3.4: a CREATE whose name was normalised (NFC) SHOULD be answered with
        the LIST line giving the name as sent in OLDNAME; None when nothing changed."""
        if not self.rev2:
            return None
        sent = U.decode_utf8_mailbox(raw).rstrip(".")
        if sent == name:
            return None
        return oldname_line(self._wire_name(name), self._wire_name(sent))

    def renamed(self, old: str, new: str) -> bytes | None:
        """RFC 9051 6.3.6: the optional LIST response of RENAME, with the old name in
        OLDNAME, so a client updates its mailbox list without another LIST."""
        if not self.rev2:
            return None
        return oldname_line(self._wire_name(new), self._wire_name(old))

    def search_options(self, options: ReturnOptions | None) -> ReturnOptions | None:
        """SEARCH's RETURN options as this session answers them: ESEARCH always once
        IMAP4rev2 is enabled (RFC 9051 6.4.4)."""
        if options is None and self.rev2:
            return SEARCH_DEFAULT
        return options
