"""Vacation (RFC 5230, RFC 6131): whether to answer, the answer, and what was answered.

`should_reply` applies RFC 5230 4.5 (only personal messages) and 4.6 with RFC 3834 2
(never automated or list mail, never a null or robot sender); `build_reply` writes the
answer (RFC 5230 5, RFC 3834 3: Auto-Submitted: auto-replied, In-Reply-To, References,
"Auto:" subject), sent with a null envelope sender (RFC 5230 5.1) so nothing answers it
back; `VacationMemory` remembers which sender got an answer for which handle until the
period ends, in an SQLite file in state_dir, across restarts.

Twisted-free: the memory is blocking and is used from a thread.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import secrets
import sqlite3
import threading
import time
from email.charset import QP, Charset
from email.header import Header, decode_header
from pathlib import Path
from typing import Sequence

from mailserver.sieve.actions import Vacation
from mailserver.sieve.parser import parse_mailbox
from mailserver.smtp.headers import field_values, header_fields

log = logging.getLogger(__name__)

MEMORY_FILE = "sieve-vacation.sqlite3"
MAX_REASON = 64 * 1024          # bytes of :reason text sent
MAX_SUBJECT = 900               # characters of a generated Subject
MAX_REFERENCES = 20             # message ids carried on in References
_FIELD_NAME = re.compile(r"[!-9;-~]+[ \t]*:")   # RFC 5322 2.2 field name, then ":"
MAX_HANDLE = 200                # characters of a :handle stored as it is, longer by digest
PRUNE_EVERY = 256               # answers recorded between two removals of expired rows

# RFC 5230 4.6: any of these fields marks list mail, which is never answered.
LIST_FIELDS = ("list-id", "list-help", "list-subscribe", "list-unsubscribe", "list-post",
               "list-owner", "list-archive")
# RFC 3834 2 and RFC 5230 4.6: senders that are programs, never people.
_ROBOT_LOCAL = re.compile(r"(?i)^(?:mailer-daemon|listserv|majordomo|owner-.*|.*-request)$")
_MSG_ID = re.compile(r"<[^<>\s]{1,250}>")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


def _address_set(values: Sequence[str]) -> set[str]:
    return {a.strip().lower() for a in values if a and a.strip()}


def _header_addresses(fields: list[tuple[str, str]], names: Sequence[str]) -> set[str]:
    values = [v for n, v in fields if n in names]
    return {addr.lower() for _, addr in email.utils.getaddresses(values) if "@" in addr}


def should_reply(header: bytes, sender: str, recipient_addresses: Sequence[str],
                 vacation: Vacation) -> str | None:
    """Why this message gets no vacation answer, or None when it gets one.

    `header`: the message's header block; `sender`: its envelope sender ("" = null);
    `recipient_addresses`: the user's own addresses (the mailbox's address and the RCPT
    that led to it); the action's :addresses are added to them.
    """
    # RFC 5230 4.6 / RFC 3834 2: a null return path is a bounce or an auto-reply.
    if not sender or sender == "<>":
        return "null envelope sender"
    local = sender.rpartition("@")[0] if "@" in sender else sender
    if _ROBOT_LOCAL.match(local):
        return f"sender <{sender}> is an automated address"
    own = _address_set(recipient_addresses) | _address_set(vacation.addresses)
    if sender.lower() in own:
        return "message from the user's own address"
    fields = header_fields(header)
    for name in LIST_FIELDS:
        if field_values(fields, name):
            return f"mailing list message ({name})"
    for value in field_values(fields, "auto-submitted"):
        # RFC 3834 5: any value other than "no" (with its optional comment) is automatic.
        if value.split(";", 1)[0].split("(", 1)[0].strip().lower() != "no":
            return f"Auto-Submitted: {value[:60]}"
    for value in field_values(fields, "precedence"):
        if value.strip().lower() in ("bulk", "list", "junk"):
            return f"Precedence: {value.strip().lower()[:20]}"
    for name in ("x-auto-response-suppress",):
        for value in field_values(fields, name):
            if any(v.strip().lower() in ("all", "oof", "autoreply")
                   for v in value.split(",")):
                return f"{name}: {value[:60]}"
    # RFC 5230 4.5: only messages addressed to the user (not Bcc'd by a list, not spam
    # to a made-up list of addresses) are answered.
    addressed = _header_addresses(fields, ("to", "cc", "bcc", "resent-to", "resent-cc",
                                           "resent-bcc"))
    if not own & addressed:
        return "none of the user's addresses in To/Cc/Bcc"
    return None


def _encode_word(text: str) -> str:
    """A header value: plain when ASCII, else RFC 2047 encoded words."""
    text = " ".join(text.replace("\r", " ").replace("\n", " ").split())
    if text.isascii():
        return text
    return Header(text, "utf-8").encode(linesep="\r\n")   # folded with CRLF, not LF


_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


def _mailbox(name: str, addr: str) -> str:
    """A From: value: the display name encoded (RFC 2047) or quoted as it needs, the
    address as it is, outside any encoded word (RFC 2047 5)."""
    if not name:
        return f"<{addr}>"
    if not name.isascii():
        return f"{_encode_word(name)} <{addr}>"
    if _SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def _original_subject(fields: list[tuple[str, str]]) -> str:
    subjects = field_values(fields, "subject")
    if not subjects:
        return ""
    value = subjects[0]
    # RFC 2047 words of the original are decoded, so the new Subject is encoded once.
    try:
        parts = decode_header(value)
        value = "".join(p.decode(c or "utf-8", "replace") if isinstance(p, bytes) else p
                        for p, c in parts)
    except Exception:  # an unreadable encoded word stays as it was written
        pass
    return value


def build_reply(vacation: Vacation, header: bytes, sender: str, user: str, hostname: str,
                now: float | None = None) -> bytes:
    """The vacation answer to `sender` for a message with `header`, from `user` (or
    :from), CRLF line ends, ready for the queue with a null envelope sender."""
    fields = header_fields(header)
    subject = vacation.subject
    if subject is None:
        # RFC 5230 4.3 / RFC 3834 3.1.5: "Auto:" and the original subject.
        original = _original_subject(fields)
        subject = original if original.lower().startswith("auto:") else f"Auto: {original}".rstrip()
    mailbox = parse_mailbox(vacation.from_address) if vacation.from_address else None
    name, addr = mailbox if mailbox is not None else ("", user)
    lines = [
        f"From: {_mailbox(name, addr)}",
        f"To: <{sender}>",
        f"Subject: {_encode_word(subject[:MAX_SUBJECT])}",
        f"Date: {email.utils.formatdate(now if now is not None else time.time(), localtime=True)}",
        f"Message-ID: <vacation.{secrets.token_hex(8)}@{hostname}>",
        "Auto-Submitted: auto-replied",   # RFC 3834 5, RFC 5230 5.7
        "Precedence: bulk",
    ]
    msgids = _MSG_ID.findall(" ".join(field_values(fields, "message-id")[:1]))
    if msgids:  # RFC 5230 5.5, RFC 5322 3.6.4
        lines.append(f"In-Reply-To: {msgids[0]}")
        refs = _MSG_ID.findall(" ".join(field_values(fields, "references")))
        if not refs:
            refs = _MSG_ID.findall(" ".join(field_values(fields, "in-reply-to")[:1]))
        refs = (refs + msgids[:1])[-MAX_REFERENCES:]
        lines.append("References: " + "\r\n ".join(refs))
    lines.append("MIME-Version: 1.0")
    reason = vacation.reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")
    reason = reason.replace("\r\n", "\n").replace("\r", "\n")
    if vacation.mime:
        # RFC 5230 5.8 (:mime): the reason is a MIME entity, its own header first; of
        # that header only the Content-* fields are kept (a script's From:, Reply-To: or
        # Auto-Submitted: no would be the reply's own, past the checks of :from).
        entity = _mime_entity(reason)
        head = "\r\n".join(lines) + "\r\n"
        return (head + entity.replace("\n", "\r\n")).encode("utf-8", "replace")
    fields, body = text_part(reason)
    return ("\r\n".join(lines + fields) + "\r\n\r\n" + body).encode("utf-8", "replace")


def text_part(text: str) -> tuple[list[str], str]:
    """The Content-Type and Content-Transfer-Encoding fields and the CRLF body of a
    text/plain part: 7bit when ASCII, else UTF-8 in quoted-printable, which a next hop
    without 8BITMIME takes too (RFC 6152)."""
    if text.isascii():
        fields = ["Content-Type: text/plain; charset=us-ascii",
                  "Content-Transfer-Encoding: 7bit"]
        body = text
    else:
        fields = ["Content-Type: text/plain; charset=utf-8",
                  "Content-Transfer-Encoding: quoted-printable"]
        body = _UTF8_QP.body_encode(text)
    body = body.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return fields, body


def _mime_entity(entity: str) -> str:
    """A :mime reason (LF line ends) with only the Content-* fields of its header.  The
    header is the run of field lines at its start, up to an empty line or the first line
    that is no field: a reason without a header (or starting with an empty line) is all
    body, as a mail reader would show it."""
    lines = entity.split("\n")
    kept: list[str] = []
    keep = False
    at = 0
    while at < len(lines):
        line = lines[at]
        if not line:
            at += 1               # the empty line that ends the header
            break
        if line[:1] in (" ", "\t") and at:
            if keep:              # a continuation of the field before
                kept.append(line)
        elif _FIELD_NAME.match(line):
            keep = line.partition(":")[0].strip().lower().startswith("content-")
            if keep:
                kept.append(line)
        else:
            break                 # no field: the body starts here
        at += 1
    head = "".join(line + "\n" for line in kept)
    return head + "\n" + "\n".join(lines[at:])


def _handle_key(handle: str) -> str:
    """The handle as stored: a long one (variables can make it 1 MiB, stored per sender
    for up to 90 days) by its digest; RFC 5230 4.2 only compares handles."""
    if len(handle) <= MAX_HANDLE:
        return handle
    return "sha256:" + hashlib.sha256(handle.encode("utf-8", "surrogatepass")).hexdigest()


class VacationMemory:
    """Which (user, handle, sender) got an answer, until when: RFC 5230 4.2's record.

    One SQLite file (WAL) for the whole server; every call blocks, so it is used from a
    thread.  `claim` is atomic: of two messages from one sender that arrive together,
    only one is answered.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._since_prune = 0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(str(self.path), timeout=10, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS answered (user TEXT NOT NULL, "
                             "handle TEXT NOT NULL, sender TEXT NOT NULL, "
                             "expires REAL NOT NULL, PRIMARY KEY (user, handle, sender))")
            except BaseException:
                conn.close()
                raise
            try:
                self.path.chmod(0o600)
            except OSError:
                pass
            self._conn = conn
        return self._conn

    def claim(self, user: str, handle: str, sender: str, period: float,
              now: float | None = None) -> bool:
        """True (and remembered until now + period) unless `sender` had an answer for
        this handle within its period.  A period of 0 (`:seconds 0`) always answers."""
        now = time.time() if now is None else now
        if period <= 0:
            return True
        key = (user.lower(), _handle_key(handle), sender.lower())
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT expires FROM answered WHERE user=? AND handle=? "
                                 "AND sender=?", key).fetchone()
                if row is not None and row[0] > now:
                    db.execute("COMMIT")
                    return False
                db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?)",
                           (*key, now + period))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY:
                self._since_prune = 0
                self._prune(db, now)
        return True

    def release(self, user: str, handle: str, sender: str) -> None:
        """Forget a claim whose answer could not be queued (the next message tries again)."""
        with self._lock:
            self._db().execute("DELETE FROM answered WHERE user=? AND handle=? AND sender=?",
                               (user.lower(), _handle_key(handle), sender.lower()))

    def prune(self, now: float | None = None) -> int:
        """Remove records whose period is over; the count removed."""
        with self._lock:
            return self._prune(self._db(), time.time() if now is None else now)

    @staticmethod
    def _prune(db: sqlite3.Connection, now: float) -> int:
        return db.execute("DELETE FROM answered WHERE expires <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
