"""Sieve reject / ereject (RFC 5429): the SMTP reply and the rejection message.

At SMTP time the reason becomes the text of a `550 5.7.1` reply (RFC 5429 2.1.1); after
it (several recipients, or delivery from the queue) the sender gets an MDN (RFC 8098,
RFC 5429 2.1) with the disposition "deleted", the reason in its human-readable part and
the original header section, sent with a null envelope sender so that it never causes
another bounce.  Twisted-free.
"""

from __future__ import annotations

import email.utils
import secrets
import time

from mailserver.sieve.vacation import text_part
from mailserver.smtp.headers import field_values, header_fields

MAX_REPLY_TEXT = 200           # characters of a reason in an SMTP reply line
MAX_REASON = 16 * 1024         # bytes of a reason in the rejection message
MAX_ORIGINAL_HEADER = 64 * 1024


def reply_text(reason: str) -> str:
    """The reason as one line of printable ASCII for `550 5.7.1 <text>`: CR, LF and
    controls would break the reply, 8-bit needs SMTPUTF8 the client may not have."""
    text = " ".join(reason.split())
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:MAX_REPLY_TEXT]
    return text or "Message rejected"


def _ascii(text: str, limit: int = 900) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


def _seven_bit_header(header: bytes) -> bytes:
    """The original header section, 7-bit with CRLF, cut on a line boundary."""
    data = header.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if len(data) > MAX_ORIGINAL_HEADER:
        cut = data.rfind(b"\n", 0, MAX_ORIGINAL_HEADER)
        data = data[:cut + 1] if cut > 0 else b""
        while data[:1] in (b" ", b"\t"):   # no continuation without its field
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    data = bytes(b if b < 128 else 0x3F for b in data)
    data = data.replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") or not data else data + b"\r\n"


def build_rejection(reason: str, header: bytes, sender: str, user: str, original_rcpt: str,
                    hostname: str, now: float | None = None) -> bytes:
    """The RFC 5429 2.1 rejection message to `sender` about the message with `header`
    that `user`'s script rejected; CRLF line ends, ready to queue with sender ""."""
    now = time.time() if now is None else now
    fields = header_fields(header)
    subjects = field_values(fields, "subject")
    subject = _ascii(subjects[0] if subjects else "", 200)
    msgids = field_values(fields, "message-id")
    boundary = f"{secrets.token_hex(12)}/{hostname}"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{_ascii(sender)}>",
        f"Subject: Rejected: {subject}" if subject else "Subject: Rejected message",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: <reject.{secrets.token_hex(8)}@{hostname}>",
        "Auto-Submitted: auto-replied (rejected)",   # RFC 5429 2.1, RFC 3834 5
        "Precedence: bulk",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=disposition-notification;\r\n"
        f'\tboundary="{boundary}"',
    ]
    if msgids:
        head.append(f"In-Reply-To: {_ascii(msgids[0])}")
    text_reason = reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")
    text_reason = text_reason.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    text = (f"Your message to <{_ascii(user)}> was automatically rejected:\r\n\r\n"
            f"{text_reason}\r\n")
    report = [f"Reporting-UA: {hostname}; mailserver Sieve"]
    if original_rcpt and original_rcpt.lower() != user.lower():
        report.append(f"Original-Recipient: rfc822; {_ascii(original_rcpt)}")
    report.append(f"Final-Recipient: rfc822; {_ascii(user)}")
    if msgids:
        report.append(f"Original-Message-ID: {_ascii(msgids[0])}")
    report.append("Disposition: automatic-action/MDN-sent-automatically; deleted")
    out = "\r\n".join(head) + "\r\n\r\nThis is a MIME-encapsulated rejection notice.\r\n\r\n"
    fields, body = text_part(text)   # never 8-bit: the next hop may lack 8BITMIME
    out += (f"--{boundary}\r\n" + "\r\n".join(fields) + "\r\nContent-Disposition: inline"
            f"\r\n\r\n{body}\r\n")
    out += (f"--{boundary}\r\nContent-Type: message/disposition-notification\r\n\r\n"
            + "\r\n".join(report) + "\r\n\r\n")
    out += f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    data = out.encode("utf-8", "replace") + _seven_bit_header(header)
    return data + f"\r\n--{boundary}--\r\n".encode("ascii")
