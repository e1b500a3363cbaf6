"""The result of one delivery attempt for one recipient, as the queue records it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")
# What is kept of a reply's text: it goes into the envelope (rewritten at every attempt,
# refused when over envelope.MAX_ENVELOPE), the logs and a DSN.  A hostile host's reply
# may be 200 lines of 4,000 octets.
MAX_TEXT = 1000


@dataclass(frozen=True)
class AttemptResult:
    kind: Literal["ok", "temporary", "permanent"]
    text: str = ""          # the SMTP reply, or why there was none (logs, queue list, DSN)
    status: str = ""        # RFC 3463 status code, e.g. "5.1.1"
    remote_mta: str = ""    # the host that answered
    smtp: bool = False      # `text` is an SMTP reply (Diagnostic-Code type "smtp")

    def __post_init__(self) -> None:
        if len(self.text) > MAX_TEXT:
            object.__setattr__(self, "text", self.text[:MAX_TEXT - 3] + "...")

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def permanent(self) -> bool:
        return self.kind == "permanent"

    @classmethod
    def delivered(cls, text: str = "", remote_mta: str = "") -> "AttemptResult":
        return cls("ok", text, "2.0.0", remote_mta, bool(text))

    @classmethod
    def temporary(cls, text: str, status: str = "4.0.0", remote_mta: str = "") -> "AttemptResult":
        return cls("temporary", text, status, remote_mta)

    @classmethod
    def failed(cls, text: str, status: str = "5.0.0", remote_mta: str = "") -> "AttemptResult":
        return cls("permanent", text, status, remote_mta)

    @classmethod
    def from_reply(cls, code: int, text: str, remote_mta: str = "") -> "AttemptResult":
        """From an SMTP reply: 2xx delivered, 4xx temporary, 5xx (and nonsense) permanent;
        the status code from the reply's enhanced code (RFC 2034) or from its class."""
        full = f"{code} {text}".strip()
        m = _ENHANCED.match(text)
        kind = "ok" if 200 <= code < 300 else "temporary" if 400 <= code < 500 else "permanent"
        first = {"ok": "2", "temporary": "4", "permanent": "5"}[kind]
        status = m.group(0) if m and m.group(1) == first else f"{first}.0.0"
        return cls(kind, full, status, remote_mta, True)
