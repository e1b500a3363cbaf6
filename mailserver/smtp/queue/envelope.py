"""The envelope of one queued message: sender, per-recipient state, schedule; as JSON.

The envelope file is the queue's record of truth: a message is queued exactly when its
envelope exists, and a recipient marked delivered is never tried again, so a restart (or a
kill -9) repeats at most the one delivery that was in flight.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FORMAT_VERSION = 1
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024  # a corrupt or hostile file is refused, not parsed
ID_RE = re.compile(r"[0-9A-Za-z]{1,64}")

Kind = Literal["remote", "local"]
State = Literal["pending", "delivered", "failed"]


class EnvelopeError(ValueError):
    """An envelope file that cannot be read back."""


@dataclass
class RecipientState:
    """One destination: a remote address, or a local mailbox (its user's address)."""

    address: str
    kind: Kind = "remote"
    state: State = "pending"
    original: str = ""        # the RCPT TO address (an alias) when it differs (RFC 3464 2.3.1)
    attempts: int = 0
    last_error: str = ""      # "550 5.1.1 User unknown", or why no reply was had
    status: str = ""          # RFC 3463 code for a DSN: "5.1.1", "4.4.1"
    remote_mta: str = ""      # the host that gave last_error
    reported: bool = False    # a DSN about this failure has been queued

    @property
    def pending(self) -> bool:
        return self.state == "pending"


@dataclass
class Envelope:
    id: str
    sender: str                              # "" is the null sender: never bounced
    recipients: list[RecipientState]
    created: float = field(default_factory=time.time)
    next_attempt: float = 0.0
    attempts: int = 0
    warned: bool = False                     # a delay warning was sent
    prefix: str = ""                         # header fields to send before the file (DKIM)
    size: int = 0
    eight_bit: bool = False                  # the message has octets > 127 (BODY=8BITMIME)
    user: str = ""                           # who submitted it (for the log and queue list)

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.pending]

    def to_json(self) -> bytes:
        data = asdict(self)
        data["version"] = FORMAT_VERSION
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> "Envelope":
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise EnvelopeError("envelope file too large")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:   # deeply nested too
            raise EnvelopeError(f"not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise EnvelopeError("unknown envelope format")
        try:
            recipients = [_recipient(r) for r in data["recipients"]]
            env = cls(
                id=_str(data["id"]), sender=_str(data["sender"]), recipients=recipients,
                created=float(data["created"]), next_attempt=float(data["next_attempt"]),
                attempts=int(data["attempts"]), warned=bool(data["warned"]),
                prefix=_str(data.get("prefix", "")), size=int(data.get("size", 0)),
                eight_bit=bool(data.get("eight_bit", False)), user=_str(data.get("user", "")))
        except (KeyError, TypeError, ValueError, OverflowError) as e:   # "attempts": 1e999
            raise EnvelopeError(f"bad envelope field: {e}") from None
        if not ID_RE.fullmatch(env.id):
            raise EnvelopeError(f"bad queue id {env.id!r}")
        if not (math.isfinite(env.created) and math.isfinite(env.next_attempt)):
            raise EnvelopeError("bad envelope field: a time that is not a number")
        return env


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _recipient(data: Any) -> RecipientState:
    if not isinstance(data, dict):
        raise TypeError("recipient is not an object")
    r = RecipientState(
        address=_str(data["address"]), kind=data["kind"], state=data["state"],
        original=_str(data.get("original", "")), attempts=int(data.get("attempts", 0)),
        last_error=_str(data.get("last_error", "")), status=_str(data.get("status", "")),
        remote_mta=_str(data.get("remote_mta", "")), reported=bool(data.get("reported", False)))
    if r.kind not in ("remote", "local") or r.state not in ("pending", "delivered", "failed"):
        raise ValueError(f"bad recipient kind/state {r.kind!r}/{r.state!r}")
    return r
