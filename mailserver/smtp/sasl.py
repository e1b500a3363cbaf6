"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954): decoding only, no I/O.

The session feeds base64 lines in and gets a challenge back or, when the exchange is
complete, the credentials.  Every malformed input is a `SASLError` whose reply the
session sends (and counts as a failed login).
"""

from __future__ import annotations

import base64
import binascii

from mailserver.smtp.replies import Reply

MAX_FIELD = 255     # RFC 4616 2: authcid and passwd are at most 255 octets
MECHANISMS = ("PLAIN", "LOGIN")

CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")
BAD_CREDENTIALS_FORMAT = Reply(501, "5.5.2", "Malformed authentication data")


class SASLError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def decode(line: bytes) -> bytes:
    """A base64 response; '=' is the empty initial response (RFC 4954 4)."""
    line = line.strip()
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(CANNOT_DECODE) from None


def _text(value: bytes) -> str:
    if len(value) > MAX_FIELD or b"\0" in value:
        raise SASLError(BAD_CREDENTIALS_FORMAT)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(BAD_CREDENTIALS_FORMAT) from None


class Exchange:
    """One AUTH exchange.  `start`/`step` return the next challenge, or None when done."""

    username = ""
    password = ""

    def start(self, initial: bytes | None) -> bytes | None:
        raise NotImplementedError

    def step(self, response: bytes) -> bytes | None:
        raise NotImplementedError


class Plain(Exchange):
    def start(self, initial: bytes | None) -> bytes | None:
        if initial is None:
            return b""
        return self.step(initial)

    def step(self, response: bytes) -> bytes | None:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SASLError(BAD_CREDENTIALS_FORMAT)
        authzid, self.username, self.password = (_text(p) for p in parts)
        if authzid and authzid.lower() != self.username.lower():
            # Acting for another user is not offered (RFC 4616 2, authorization identity).
            raise SASLError(Reply(535, "5.7.8", "Authentication credentials invalid"))
        return None


class Login(Exchange):
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
                raise SASLError(BAD_CREDENTIALS_FORMAT)
            return b"Password:"
        self.password = _text(response)
        return None


def exchange_for(mechanism: str) -> Exchange | None:
    return {"PLAIN": Plain, "LOGIN": Login}.get(mechanism.upper(), lambda: None)()
