"""The e-mail address a client sends: RFC 5321 syntax, at most 254 octets.

Deliberately separate from `mailserver.addresses`, which refuses harmless but unusual
local parts (quoted strings) to keep the MX safe: here an address is only echoed back to
its own client, escaped, so any syntactically valid mailbox is accepted.  No lookup of the
user is ever made, so an answer never tells whether a mailbox exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailserver.addresses import AddressError, normalize_domain

MAX_ADDRESS_OCTETS = 254   # RFC 5321 4.5.3.1.3 path (256) minus the angle brackets
MAX_LOCALPART_OCTETS = 64  # RFC 5321 4.5.3.1.1

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LOCAL_PART = re.compile(rf"(?:{_DOT_STRING}|{_QUOTED_STRING})")


@dataclass(frozen=True)
class Address:
    local: str    # as the client wrote it (a quoted string keeps its quotes)
    domain: str   # lower-case, IDNA A-labels

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_address(text: str) -> Address:
    """Validate `text` as a Mailbox of RFC 5321; raises AddressError with the reason."""
    if len(text.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError("missing '@'")
    if not _LOCAL_PART.fullmatch(local):
        raise AddressError("local part is not an RFC 5321 dot-string or quoted string")
    if len(local) > MAX_LOCALPART_OCTETS:
        raise AddressError(f"local part longer than {MAX_LOCALPART_OCTETS} octets")
    return Address(local, normalize_domain(domain))
