"""What happens to a submitted message: header fix-ups, DKIM, local delivery, the queue.

The message streams into a queue spool file.  On the way its header section (held in
memory up to MAX_HEADER bytes) is checked and completed: every From address must belong
to the authenticated user, and a missing From, Date or Message-ID is added (RFC 6409 8).
At the end, in a thread: the file is flushed (fsynced when anything is queued) and
DKIM-signed for the From domain when a key exists; local recipients get their copy at once
from the spool file; remote recipients (and local mailboxes whose write failed) are queued
with it.  Only then does the session reply 250.
"""

from __future__ import annotations

import email.utils
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.addresses import AddressError, normalize_domain
from mailserver.dkim.keys import keys_for
from mailserver.smtp.delivery import DeliveryOutcome, IDelivery, MailboxStatus, Recipient
from mailserver.smtp.headers import (field_values, header_fields, mailbox_addresses,
                                     without_fields)
from mailserver.smtp.outbound import recipient_states
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.queue.local import QueueLocalDelivery
from mailserver.smtp.queue.store import SpoolFile
from mailserver.smtp.replies import Reply, SMTPReplyError

if TYPE_CHECKING:
    from mailserver.accounts import Accounts
    from mailserver.smtp.queue.runner import QueueRunner

log = Logger()

MAX_HEADER = 1024 * 1024
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header section too large")
FROM_NOT_OWNED = Reply(553, "5.7.1", "From: header address not owned by the authenticated user")
FROM_UNREADABLE = Reply(553, "5.7.1", "From: header has no address that can be checked")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender: or Resent- header address not owned by the "
                                      "authenticated user")
# Each address is an accounts lookup in the reactor: 45,000 of them in a 1 MB From: held
# every session for two seconds.  A message from more authors than this is no mail.
MAX_AUTHOR_ADDRESSES = 100
MAX_AUTHOR_OCTETS = 16 * 1024
TOO_MANY_AUTHORS = Reply(553, "5.7.1", "too many addresses in the From:, Sender: or "
                                      "Resent- header fields")
# Checked as From is: each names who sent the message (RFC 5322 3.6.2, 3.6.6), and the
# DKIM signature covers them.
_SENDER_FIELDS = ("sender", "resent-from", "resent-sender")
# RFC 5322 3.6.3: the blind copies' addresses are not shown to the other recipients.
_BLIND_FIELDS = frozenset({"bcc", "resent-bcc"})


@implementer(IDelivery)
class SubmissionDelivery:
    def __init__(self, queue: "QueueRunner", accounts: "Accounts",
                 local: QueueLocalDelivery, hostname: str, dkim_dir: Path | None, queue_id: str,
                 sender: str, user: str) -> None:
        self.queue = queue
        self.accounts = accounts
        self.local = local
        self.hostname = hostname
        self.dkim_dir = dkim_dir
        self.queue_id = queue_id
        self.sender = sender
        self.user = user
        self.recipients: list[RecipientState] = []
        self._seen: set[tuple[str, str]] = set()
        self._spool: SpoolFile | None = None
        self._head = bytearray()
        self._scanned = 0
        self._head_done = False
        self._error: Reply | None = None
        self.from_domain = ""

    def add_recipient(self, recipient: Recipient) -> None:
        for state in recipient_states(recipient):
            if (state.kind, state.address) not in self._seen:
                self._seen.add((state.kind, state.address))
                self.recipients.append(state)

    # -- streaming ---------------------------------------------------------------------

    def write_headers(self, delivery: bytes, trace: bytes) -> None:
        # Return-Path and Delivered-To are written by each final delivery, not spooled.
        self._spool = self.queue.new_spool(self.queue_id)
        self.write(trace)

    def write(self, data: bytes) -> None:
        assert self._spool is not None
        if self._head_done:
            if self._error is None:
                self._spool.write(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(self._head)
            if len(self._head) > MAX_HEADER:
                self._error, self._head_done, self._head = HEADER_TOO_LARGE, True, bytearray()
            return
        head, rest = bytes(self._head[:end + 2]), bytes(self._head[end + 2:])
        self._head, self._head_done = bytearray(), True
        self._spool.write(self._complete(head))
        self._spool.write(rest)

    def _complete(self, head: bytes) -> bytes:
        """The header section with what is missing added and Bcc taken out; records a
        refusal of a From:, Sender: or Resent- address the user does not own."""
        fields = header_fields(head)
        added = []
        from_values = field_values(fields, "from")
        if not from_values:
            added.append(f"From: <{self.sender}>")
            addresses = [self.sender]
        else:
            named = _authors(from_values)
            addresses = [] if isinstance(named, Reply) else named or []
            if isinstance(named, Reply):
                self._error = named
            elif not addresses:
                self._error = FROM_UNREADABLE
            elif not self._owns(addresses):
                self._error = FROM_NOT_OWNED
        if addresses:
            # the form keys are stored under (a From: may name its domain in Unicode)
            domain = addresses[0].rpartition("@")[2]
            try:
                self.from_domain = normalize_domain(domain)
            except AddressError:
                self.from_domain = domain.lower()
        for name in _SENDER_FIELDS:
            values = field_values(fields, name)
            if values and self._error is None:
                named = _authors(values)
                if isinstance(named, Reply):
                    self._error = named
                elif not named or not self._owns(named):
                    self._error = SENDER_NOT_OWNED
        if any(n in _BLIND_FIELDS for n, _ in fields):
            head = without_fields(head, _BLIND_FIELDS)
        if not field_values(fields, "date"):  # RFC 6409 8.2
            added.append("Date: " + email.utils.formatdate(localtime=True))
        if not field_values(fields, "message-id"):  # RFC 6409 8.3
            added.append(f"Message-ID: <{self.queue_id}.{secrets.token_hex(6)}@{self.hostname}>")
        if not added:
            return head
        return head + ("\r\n".join(added) + "\r\n").encode("utf-8", "replace")

    def _owns(self, addresses: list[str]) -> bool:
        return all(self.accounts.may_send_as(self.user, a)
                   for a in dict.fromkeys(a.lower() for a in addresses))

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.abort()

    # -- the end of DATA ---------------------------------------------------------------

    @defer.inlineCallbacks
    def commit(self):
        spool = self._spool
        assert spool is not None
        if not self._head_done:  # header fields only, no body
            head, self._head, self._head_done = bytes(self._head), bytearray(), True
            spool.write(self._complete(head))
        if self._error is not None:
            raise SMTPReplyError(self._error)
        remote = [r for r in self.recipients if r.kind == "remote"]
        local = [r for r in self.recipients if r.kind == "local"]
        prefix = yield threads.deferToThread(self._finish_and_sign, spool, bool(remote))
        env = Envelope(self.queue_id, self.sender, [], prefix=prefix, size=spool.size,
                       eight_bit=spool.eight_bit, user=self.user)
        outcome = DeliveryOutcome()
        retry: list[RecipientState] = []
        if local:
            results = yield self.local.deliver(env, spool.path, local)
            for r, result in results:
                if result.ok:
                    outcome.statuses.append(MailboxStatus(r.address, True))
                else:
                    retry.append(r)
        queued = remote + retry
        if not queued:
            spool.abort()  # every copy is in its Maildir
            return outcome
        env.recipients = queued
        try:
            yield self.queue.commit(spool, env)
        except Exception as e:
            log.error("message {qid}: cannot queue: {error}", qid=self.queue_id, error=e)
            outcome.statuses += [MailboxStatus(r.address, False, str(e)) for r in queued]
            return outcome
        outcome.statuses += [MailboxStatus(r.address, True, r.kind, queued=True) for r in queued]
        return outcome

    def _finish_and_sign(self, spool: SpoolFile, durable: bool) -> str:
        """Thread: close the spool file and sign it; returns the header fields to prepend."""
        spool.finish_sync(fsync=durable)
        if not self.from_domain or self.dkim_dir is None:
            return ""
        keys = keys_for(self.dkim_dir, self.from_domain)
        if not keys:
            log.debug("message {qid}: no DKIM key for {domain}; not signed", qid=self.queue_id,
                      domain=self.from_domain)
            return ""
        from mailserver.dkim.sign import sign_file
        try:
            signature = sign_file(spool.path, keys[-1])
        except Exception as e:  # dkimpy refuses some header sections; send unsigned
            log.warn("message {qid}: DKIM signing for {domain} failed: {error}",
                     qid=self.queue_id, domain=self.from_domain, error=e)
            return ""
        return signature.decode("ascii")


def _authors(values: list[str]) -> list[str] | Reply | None:
    """The addresses author fields name (None when one cannot be read), or the refusal
    of fields too long or too many to be worth a lookup each."""
    if sum(len(v) for v in values) > MAX_AUTHOR_OCTETS:   # not even parsed
        return TOO_MANY_AUTHORS
    named = mailbox_addresses(values)
    if named is not None and len(named) > MAX_AUTHOR_ADDRESSES:
        return TOO_MANY_AUTHORS
    return named
