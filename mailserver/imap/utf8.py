"""UTF8=ACCEPT (RFC 6855) for the IMAP session: what changes once a client sent
ENABLE UTF8=ACCEPT.

- Mailbox names travel as UTF-8 (quoted strings) both ways instead of modified UTF-7
  (RFC 6855 3): what the client sends is taken as UTF-8 as it is ("&" is an ampersand),
  LIST patterns too, and every name the server sends is UTF-8.  A name with a control
  character (U+0000-U+001F, U+007F-U+009F) or U+2028/U+2029 is refused (RFC 6855 3).
  On disk names stay modified UTF-7 (Dovecot's layout), whatever the client enabled.
- APPEND (and CATENATE) take "UTF8 (" literal8 ")" message data (RFC 6855 4); a plain
  literal inside is accepted too.  The octets are stored as they come: messages with
  UTF-8 header fields (RFC 6532) are kept unchanged.
- SEARCH with a CHARSET is BAD (RFC 6855 3).

A client that did not enable it sees the server as before: modified UTF-7 names sent
(raw UTF-8 names still accepted, as many clients send them), SEARCH CHARSET as usual,
"UTF8 (...)" in APPEND refused with BAD (RFC 6855 4), and messages with UTF-8 header
fields sent as stored (no downgrade as in RFC 6857): 8-bit header text reaches such a
client in literals (ENVELOPE, BODY[HEADER]) as it did before.
"""

from __future__ import annotations

import re

from mailserver.imap.fetch import decode_mailbox, quote_mailbox
from mailserver.imap.parser import Arguments
from mailserver.maildir import InvalidFolderName, encode_folder_name, is_inbox

UTF8_CAPABILITY = b"UTF8=ACCEPT"
_NOT_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def decode_utf8_mailbox(raw: bytes) -> str:
    """A mailbox name from a client that enabled UTF8=ACCEPT (RFC 6855 3): UTF-8 as it
    is; INBOX in any case is INBOX."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidFolderName("mailbox name is not UTF-8") from None
    if _NOT_IN_NAMES.search(text):
        raise InvalidFolderName("control character in mailbox name")
    return "INBOX" if is_inbox(text) else text


def mailbox_name(raw: bytes, utf8: bool) -> str:
    """A mailbox name argument as the client's mode says."""
    return decode_utf8_mailbox(raw) if utf8 else decode_mailbox(raw)


def wire_name(name: str, utf8: bool) -> bytes:
    """A mailbox name as sent to the client: UTF-8 once enabled, else modified UTF-7."""
    if is_inbox(name):
        return b"INBOX"
    if utf8:
        return quote_mailbox(name.encode("utf-8"))
    return quote_mailbox(encode_folder_name(name).encode("ascii"))


def names_charset(args: Arguments) -> bool:
    """Whether the SEARCH criteria at the cursor start with a CHARSET specification."""
    return args.upcoming(8).upper() == b"CHARSET "


class UTF8Session:
    """The session's UTF8=ACCEPT state (a mixin of IMAPSession)."""

    utf8_accept = False

    def enable_utf8(self, names: list[bytes]) -> list[bytes]:
        """ENABLE (RFC 5161) of UTF8=ACCEPT (RFC 6855 3): the names newly enabled."""
        if UTF8_CAPABILITY in names and not self.utf8_accept:
            self.utf8_accept = True
            return [UTF8_CAPABILITY]
        return []

    def _decode_name(self, raw: bytes) -> str:
        return mailbox_name(raw, self.utf8_accept)

    def _wire_name(self, name: str) -> bytes:
        return wire_name(name, self.utf8_accept)
