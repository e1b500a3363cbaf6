"""The MX's delivery with the queue behind it: forwarding and local retries.

Local mailboxes are written exactly as LocalDelivery does (streamed, hard links).  Remote
targets of local aliases get a second stream into a queue spool file (only the Received
field in front: Return-Path and Delivered-To belong to final delivery), queued with the
remote recipients.  A local mailbox that cannot be written joins that queue entry, or,
when there is none, a copy of a stored Maildir file is queued for it: either way it is
retried from the queue and the message is acknowledged, without a duplicate for the
mailboxes that have it already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.smtp.delivery import (DeliveryOutcome, IDelivery, LocalDelivery, MailboxStatus,
                                      Placement, Recipient)
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.queue.store import SpoolFile

if TYPE_CHECKING:
    from mailserver.maildir import MaildirStore
    from mailserver.smtp.queue.runner import QueueRunner

log = Logger()

MAILDIR_ONLY_FIELDS = ("Return-Path", "Delivered-To")


@implementer(IDelivery)
class QueueingDelivery:
    def __init__(self, store: "MaildirStore", queue: "QueueRunner", queue_id: str,
                 sender: str, place: Placement | None = None, local: Any = None) -> None:
        # `local`: what writes the local mailboxes, LocalDelivery's interface (a
        # FilteringDelivery when delivery filters or Sieve apply)
        self.local = local if local is not None else LocalDelivery(store, place)
        self.queue = queue
        self.queue_id = queue_id
        self.sender = sender
        self._remote: dict[str, str] = {}     # remote target -> the RCPT that led to it
        self._original: dict[str, str] = {}   # local mailbox -> the RCPT that led to it
        self._spool: SpoolFile | None = None

    def add_recipient(self, recipient: Recipient) -> None:
        self.local.add_recipient(recipient)
        for user in recipient.local:
            self._original.setdefault(user.address, recipient.address)
        for address in recipient.remote:
            self._remote.setdefault(address, recipient.address)

    _has_local = False

    def write_headers(self, delivery: bytes, trace: bytes) -> None:
        self._has_local = bool(self.local.mailboxes)
        if self._has_local:
            self.local.write_headers(delivery, trace)
        if self._remote:
            self._spool = self.queue.new_spool(self.queue_id)
            self._spool.write(trace)

    def write(self, data: bytes) -> None:
        if self._has_local:
            self.local.write(data)
        if self._spool is not None:
            self._spool.write(data)

    def abort(self) -> None:
        self.local.abort()
        if self._spool is not None:
            self._spool.abort()

    def commit(self) -> defer.Deferred:
        return self.local.commit().addCallback(self._after_local)

    def _after_local(self, outcome: DeliveryOutcome) -> DeliveryOutcome | defer.Deferred:
        """Every mailbox stored and nothing remote: done (the common case, no queue)."""
        failed = {s.mailbox for s in outcome.lost}
        queued = [RecipientState(a, "remote", original=o) for a, o in self._remote.items()]
        queued += [RecipientState(m, "local", original=self._original.get(m, ""))
                   for m in failed]
        if not queued:
            return outcome
        return self._queue(outcome, failed, queued)

    @defer.inlineCallbacks
    def _queue(self, outcome: DeliveryOutcome, failed: set[str],
               queued: list[RecipientState]):
        sources = [s.path for s in outcome.delivered if s.path is not None]
        if self._spool is None and not sources:
            return outcome  # nothing stored anywhere: the client retries (451)
        env = Envelope(self.queue_id, self.sender, queued)
        try:
            if self._spool is not None:
                env.size, env.eight_bit = self._spool.size, self._spool.eight_bit
                yield self.queue.commit(self._spool, env)
            else:
                yield self.queue.commit_copy(sources[0], env, MAILDIR_ONLY_FIELDS)
        except Exception as e:
            log.error("message {qid}: cannot queue for {rcpts}: {error}", qid=self.queue_id,
                      rcpts=",".join(r.address for r in queued), error=e)
            outcome.statuses += [MailboxStatus(a, False, f"not queued: {e}")
                                 for a in self._remote]
            return outcome
        result = DeliveryOutcome([s for s in outcome.statuses if s.ok])
        result.statuses += [MailboxStatus(r.address, True, r.kind, queued=True) for r in queued]
        if failed:
            log.info("message {qid}: {mailboxes} queued for a local retry", qid=self.queue_id,
                     mailboxes=",".join(sorted(failed)))
        return result
