"""What every IMAP session of one listener shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailserver.metrics import unexported


@dataclass
class IMAPContext:
    hostname: str
    limits: Any      # LimitsConfig
    portal: Any      # twisted.cred Portal
    throttle: Any    # AuthThrottle
    store: Any       # MaildirStore
    tls: Any = None  # server TLS context factory; None: no STARTTLS
    allow_plaintext_loopback: bool = False
    metrics: Any = None  # mailserver.metrics.ServiceMetrics of the listener
    warm: Any = None     # username -> load the INBOX ahead (auth.inbox_warmer)
    # Runs the header pass (imap/headerpass.py) like deferToThread; None: in threads.
    header_workers: Any = None

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = unexported("imap")
