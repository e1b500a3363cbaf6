"""SASL PLAIN (RFC 4616) and LOGIN, decoded the same way for SMTP AUTH (RFC 4954), IMAP
AUTHENTICATE (RFC 3501 6.2.2) and POP3 AUTH (RFC 5034): decoding only, no I/O, no
Twisted.

A session feeds the client's base64 lines in and gets the next challenge back or, when
the exchange is complete, the credentials.  Every malformed input is a `SASLError`
whose `reason` the front end turns into its own reply (and counts as a failed login).
"""

from __future__ import annotations

import base64
import binascii

MAX_FIELD = 255     # RFC 4616 2: authzid, authcid and passwd are at most 255 octets
MECHANISMS = ("PLAIN", "LOGIN")

# SASLError reasons
CANNOT_DECODE = "cannot-decode"     # not base64
MALFORMED = "malformed"             # wrong field count, empty, too long, NUL, not UTF-8
PROXY = "proxy"                     # an authorization identity other than the user's


class SASLError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Cancelled(Exception):
    """The client sent "*": it gives up the exchange.  Not a failed password, but the
    services count it toward the per-connection limit, so AUTH-then-cancel cannot loop."""


def is_cancel(line: bytes) -> bool:
    """"*" ends an exchange (RFC 4954 4, RFC 3501 6.2.2, RFC 5034 4)."""
    return line.strip() == b"*"


def decode(line: bytes) -> bytes:
    """A base64 response; '=' is the empty initial response (RFC 4954 4, RFC 4959 3)."""
    line = line.strip()
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(CANNOT_DECODE) from None


def _text(value: bytes) -> str:
    if len(value) > MAX_FIELD or b"\0" in value:
        raise SASLError(MALFORMED)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(MALFORMED) from None


class Exchange:
    """One exchange.  `start`/`step` return the next challenge, or None when done."""

    name = ""
    username = ""
    password = ""

    def start(self, initial: bytes | None) -> bytes | None:
        raise NotImplementedError

    def step(self, response: bytes) -> bytes | None:
        raise NotImplementedError

    def respond(self, line: bytes) -> bytes | None:
        """The client's base64 line to a challenge: the next challenge, or None when the
        exchange is complete.  Cancelled for "*", SASLError for a malformed response."""
        if is_cancel(line):
            raise Cancelled()
        return self.step(decode(line))


class Plain(Exchange):
    name = "PLAIN"

    def start(self, initial: bytes | None) -> bytes | None:
        if initial is None:
            return b""
        return self.step(initial)

    def step(self, response: bytes) -> bytes | None:  # RFC 4616 2
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SASLError(MALFORMED)
        authzid, self.username, self.password = (_text(p) for p in parts)
        if authzid and authzid.lower() != self.username.lower():
            # Acting for another user is not offered (RFC 4616 2, authorization identity).
            raise SASLError(PROXY)
        return None


class Login(Exchange):
    """The LOGIN mechanism (draft-murchison-sasl-login): what Outlook still uses."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._have_user = False

    def start(self, initial: bytes | None) -> bytes | None:
        if initial is None:
            return b"Username:"
        return self.step(initial)

    def step(self, response: bytes) -> bytes | None:
        if not self._have_user:
            self.username, self._have_user = _text(response), True
            if not self.username:
                raise SASLError(MALFORMED)
            return b"Password:"
        self.password = _text(response)
        return None


def exchange_for(mechanism: str | bytes) -> Exchange | None:
    if isinstance(mechanism, bytes):
        mechanism = mechanism.decode("ascii", "replace")
    return {"PLAIN": Plain, "LOGIN": Login}.get(mechanism.upper(), lambda: None)()
