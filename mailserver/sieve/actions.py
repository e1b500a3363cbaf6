"""What a Sieve evaluation decides for one recipient: the actions, in execution order.

The interpreter (mailserver.sieve.interpreter) produces these; delivery
(mailserver.sieve.delivery) carries them out.  Both sides know only this module, so
an action means the same thing to both.  Twisted-free.

`header` on Keep, FileInto and Redirect: the message's header block (CRLF lines, ending
with the blank line's CRLF excluded) as it was when the action ran, after editheader
(RFC 5293) changes; None when the script did not change the header, so delivery can
hard-link one stored file for every recipient whose header is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Keep:
    """Store in the default folder (INBOX, or Junk for a message judged as spam):
    RFC 5228 4.3, and the implicit keep (2.10.2).  `flags`: RFC 5232 :flags or the
    internal variable at the time of the keep."""

    flags: tuple[str, ...] = ()
    header: bytes | None = None
    implicit: bool = False


@dataclass(frozen=True)
class FileInto:
    """RFC 5228 4.1 with :copy (RFC 3894), :create (RFC 5490 3.2), :flags (RFC 5232).

    `mailbox`: the IMAP mailbox name as the script gave it (UTF-8, "." hierarchy
    separator); delivery checks it and maps it to the user's Maildir++ folder.
    """

    mailbox: str
    flags: tuple[str, ...] = ()
    create: bool = False
    copy: bool = False
    header: bytes | None = None


@dataclass(frozen=True)
class Redirect:
    """RFC 5228 4.2 (with :copy, RFC 3894): resent through the outbound queue with the
    original envelope sender."""

    address: str
    copy: bool = False
    header: bytes | None = None


@dataclass(frozen=True)
class Reject:
    """RFC 5429: `extended` is ereject.  Refused at SMTP time when the message has one
    recipient, else a rejection message to the envelope sender."""

    reason: str
    extended: bool = False


@dataclass(frozen=True)
class Discard:
    """RFC 5228 4.4: cancels the implicit keep; nothing is stored."""


@dataclass(frozen=True)
class Vacation:
    """RFC 5230 (and :seconds, RFC 6131): what to answer; whether to send it at all
    (once per sender and handle per period, never to lists, bulk, auto-submitted or null
    senders) is decided by delivery, which remembers what it sent.

    `period`: seconds (from :days or :seconds, defaulted and clamped by the caller's
    limits); `handle`: the :handle given, else RFC 5230 4.2's default built from the
    reason, subject, from and mime arguments; `addresses`: :addresses as given.
    `reason`: the body text (a MIME entity when `mime`).
    """

    reason: str
    subject: str | None = None
    from_address: str | None = None
    addresses: tuple[str, ...] = ()
    period: float = 7 * 86400.0
    handle: str = ""
    mime: bool = False


Action = Keep | FileInto | Redirect | Reject | Discard | Vacation


@dataclass(slots=True)
class Result:
    """The outcome of evaluating a recipient's scripts.

    `actions` in the order they were executed, the implicit keep included as
    Keep(implicit=True) when it applies.  `error`: a run-time error (RFC 5228 2.10.6):
    then `actions` is just the implicit keep and the caller logs the error.
    """

    actions: list[Action] = field(default_factory=list)
    error: str | None = None
    out_of_time: bool = False   # the error is the CPU time limit
