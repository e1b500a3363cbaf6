"""Delivery status notifications (RFC 3464): bounces and delay warnings.

A DSN is a multipart/report (RFC 6522) with a human-readable part, the
message/delivery-status part (one per-recipient block per failed or delayed recipient)
and the original message's header section (text/rfc822-headers), sent from MAILER-DAEMON
with a null envelope sender (RFC 5321 4.5.5) so that it can never cause another bounce.
"""

from __future__ import annotations

import email.utils
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Literal

from mailserver.smtp.queue.envelope import Envelope, RecipientState

MAX_ORIGINAL_HEADERS = 64 * 1024
_LINE_CAP = 998  # RFC 5322 2.1.1


def read_original_headers(message: Path, prefix: str, limit: int = MAX_ORIGINAL_HEADERS) -> bytes:
    """The header section of a queued message (prefix included), cut at `limit` bytes on a
    line boundary.  Blocking: call it from a thread."""
    head = prefix.encode("utf-8", "replace")
    with open(message, "rb") as f:
        while len(head) < limit:
            line = f.readline(_LINE_CAP + 2)
            if not line or line in (b"\r\n", b"\n"):
                break
            if not line.endswith(b"\n"):
                # Longer than a line may be: its first 998 octets, the rest skipped (not
                # made into lines of their own that are no header fields).
                _skip_to_line_end(f)
                line = line[:_LINE_CAP].rstrip(b"\r") + b"\r\n"
            head += line
    if len(head) > limit:
        cut = head.rfind(b"\n", 0, limit)
        head = head[:cut + 1] if cut > 0 else b""
    # Keep only complete field lines: a continuation with nothing in front is dropped.
    while head[:1] in (b" ", b"\t"):
        head = head.split(b"\n", 1)[1] if b"\n" in head else b""
    return head


def _skip_to_line_end(f: BinaryIO) -> None:
    """Read past the rest of the current line (bounded pieces, never the whole line)."""
    more = f.readline(_LINE_CAP + 2)
    while more and not more.endswith(b"\n"):
        more = f.readline(_LINE_CAP + 2)


def _ascii(text: str) -> str:
    """A value safe for a 7-bit header-like line: no controls, no 8-bit."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean[:900]


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=True)


def build_dsn(hostname: str, env: Envelope, recipients: Iterable[RecipientState],
              action: Literal["failed", "delayed"], original_headers: bytes, now: float,
              retry_until: float | None = None) -> bytes:
    """The whole DSN message, CRLF line ends, ready to queue."""
    recipients = list(recipients)
    boundary = f"{env.id}.{secrets.token_hex(8)}"   # RFC 2046 5.1.1: 70 characters at most
    failed = action == "failed"
    subject = ("Undelivered Mail Returned to Sender" if failed
               else "Delayed Mail (still being retried)")
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_ascii(env.sender)}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{env.id}.{action}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
    ]
    text = [f"This is the mail system at host {hostname}.", ""]
    if failed:
        text += ["Your message could not be delivered to one or more recipients.",
                 "It is attached below (headers only).", ""]
    else:
        until = f" until {_date(retry_until)}" if retry_until else ""
        text += ["Your message has not been delivered to one or more recipients yet.",
                 f"Delivery will be retried{until}; you do not need to resend it.", ""]
    for r in recipients:   # the reason on a line of its own: each within 998 octets
        where = f" (from {_ascii(r.remote_mta)[:255]})" if r.remote_mta else ""
        text += [f"<{_ascii(r.address)[:300]}>{where}:",
                 f"    {_ascii(r.last_error) or 'no reason given'}"]
    status = [f"Reporting-MTA: dns; {hostname}",
              f"X-Mailserver-Queue-ID: {env.id}",
              f"Arrival-Date: {_date(env.created)}"]
    if env.sender:
        status.append(f"X-Original-Sender: rfc822; {_ascii(env.sender)}")
    for r in recipients:
        status.append("")
        if r.original and r.original != r.address:
            status.append(f"Original-Recipient: rfc822; {_ascii(r.original)}")
        status += [f"Final-Recipient: rfc822; {_ascii(r.address)}",
                   f"Action: {action}",
                   f"Status: {_status(r, action)}"]
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")
        if r.last_error:
            kind = "smtp" if r.last_error[:3].isdigit() else "X-mailserver"
            status.append(f"Diagnostic-Code: {kind}; {_ascii(r.last_error)}")
        status.append(f"Last-Attempt-Date: {_date(now)}")
        if not failed and retry_until:
            status.append(f"Will-Retry-Until: {_date(retry_until)}")
    parts = [
        ("text/plain; charset=us-ascii", "\r\n".join(text) + "\r\n"),
        ("message/delivery-status", "\r\n".join(status) + "\r\n"),
    ]
    out = ["\r\n".join(head), "", "This is a MIME-encapsulated delivery status notification.", ""]
    for ctype, body in parts:
        out += [f"--{boundary}", f"Content-Type: {ctype}", "", body]
    message = ("\r\n".join(out) + "\r\n").encode("ascii")
    originals = _seven_bit(original_headers)
    message += (f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").encode("ascii")
    message += originals + (b"" if originals.endswith(b"\r\n") or not originals else b"\r\n")
    message += f"\r\n--{boundary}--\r\n".encode("ascii")
    return message


def _status(r: RecipientState, action: str) -> str:
    status = r.status or ("5.0.0" if action == "failed" else "4.0.0")
    if action == "delayed" and not status.startswith("4"):
        status = "4" + status[1:]
    return status


def _seven_bit(data: bytes) -> bytes:
    """Original headers as 7-bit text with CRLF (8-bit octets would need a 8BITMIME DSN)."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = bytes(b if b < 128 else 0x3F for b in data)
    return data.replace(b"\n", b"\r\n")

