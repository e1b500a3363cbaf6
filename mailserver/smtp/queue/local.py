"""Local delivery from the queue: a queued message into Maildirs, for local retries.

Used for local mailboxes that could not be written when the message arrived (they are
retried on the queue's schedule), for submission's local recipients and for DSNs to local
senders.  The copy gets what the MX would have written in front of it: Return-Path and,
for a single mailbox, Delivered-To.  A mailbox at or over its quota is a temporary failure
(`452 4.2.2`): retried while it is full, bounced when the message expires.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.smtp.queue.attempt import AttemptResult
from mailserver.smtp.queue.envelope import Envelope, RecipientState

if TYPE_CHECKING:
    from mailserver.accounts import Accounts
    from mailserver.maildir import MaildirStore

log = Logger()
_COPY_CHUNK = 256 * 1024
MAILBOX_FULL = "452 4.2.2 Mailbox full"  # RFC 3463 3.3 (X.2.2): temporary while full

Results = list[tuple[RecipientState, AttemptResult]]


class QueueLocalDelivery:
    def __init__(self, store: "MaildirStore", accounts: "Accounts", sieve: Any = None) -> None:
        self.store = store
        self.accounts = accounts
        self.sieve = sieve  # mailserver.sieve.delivery.SieveDelivery, or None

    @defer.inlineCallbacks
    def deliver(self, env: Envelope, message: Path, recipients: Sequence[RecipientState]):
        results: Results = []
        targets: dict[Path, RecipientState] = {}
        addresses: dict[Path, str] = {}
        for r in recipients:
            user = self.accounts.get_user(r.address)
            if user is None:
                results.append((r, AttemptResult.failed(
                    "550 5.1.1 mailbox no longer exists", "5.1.1")))
                continue
            try:
                path = self.store.user_path(user.domain, user.localpart)
            except ValueError as e:
                results.append((r, AttemptResult.failed(f"unusable mailbox path: {e}", "5.3.0")))
                continue
            if user.quota and (yield self._full(path, user.quota)):
                results.append((r, AttemptResult.temporary(MAILBOX_FULL, "4.2.2")))
                continue
            targets[path] = r
            addresses[path] = user.address
        if not targets:
            return results
        head = f"Return-Path: <{env.sender}>\r\n"
        if len(targets) == 1:
            head += f"Delivered-To: {next(iter(targets.values())).address}\r\n"
        if self.sieve is not None and self.sieve.wanted(targets):
            # Delivery filters and Sieve, as for the MX (the scripts run again on a retry)
            filtered = yield filtered_delivery(self.sieve, env, message, targets, addresses,
                                               head)
            return results + filtered
        head += env.prefix
        try:
            delivery = yield threads.deferToThread(self._write, list(targets), head, message)
            outcome = yield delivery.commit()
        except Exception as e:
            log.error("queue {id}: local delivery failed: {error}", id=env.id, error=e)
            return results + [(r, AttemptResult.temporary(f"local delivery failed: {e}", "4.3.0"))
                              for r in targets.values()]
        by_target = {Path(t): r for t, r in targets.items()}
        for result in outcome:
            r = by_target[Path(result.target)]
            if result.ok:
                results.append((r, AttemptResult.delivered()))
            else:
                results.append((r, AttemptResult.temporary(
                    f"cannot write to mailbox: {result.error}", "4.3.0")))
        return results

    def _full(self, path: Path, limit: int) -> defer.Deferred:
        """Deferred[bool]: the mailbox is at or over `limit` (an unreadable usage is not)."""
        def failed(f: Failure) -> bool:
            log.failure("quota usage of {path} unknown; delivering", f, path=str(path))
            return False
        return self.store.quota.usage(path, limit).addCallbacks(lambda u: u.bytes >= limit,
                                                                failed)

    def _write(self, targets: list[Path], head: str, message: Path):
        """Thread: start a Maildir delivery and copy the queued file into it."""
        delivery = self.store.begin_delivery(targets)
        try:
            delivery.write(head.encode("utf-8", "replace"))
            with open(message, "rb") as f:
                while chunk := f.read(_COPY_CHUNK):
                    delivery.write(chunk)
        except BaseException:
            delivery.abort()
            raise
        return delivery


@defer.inlineCallbacks
def filtered_delivery(sieve: Any, env: Envelope, message: Path,
                      targets: dict[Path, RecipientState], addresses: dict[Path, str],
                      head: str):
    """A queued message through mailserver.sieve.delivery: a filter's reject is a
    permanent failure (a DSN), its defer and a store that failed temporary ones; a
    script's reject is a delivered message (its rejection message went to the sender)."""
    from mailserver.sieve.delivery import Incoming, Target, read_queued
    from mailserver.smtp.replies import SMTPReplyError

    try:
        header, rest, offset = yield threads.deferToThread(read_queued, message)
        msg = Incoming(queue_id=env.id, sender=env.sender, header=header, rest=rest,
                       path=message, rest_offset=offset,
                       prefix=head.encode("utf-8", "replace"),
                       trace=env.prefix.encode("utf-8", "replace"), auth=env.user)
        outcomes = yield sieve.deliver(msg, [Target(addresses[p], p, r.original or r.address)
                                             for p, r in targets.items()])
    except SMTPReplyError as e:
        reply = e.reply
        make = AttemptResult.temporary if reply.temporary else AttemptResult.failed
        return [(r, make(str(reply), reply.enhanced)) for r in targets.values()]
    except Exception as e:
        log.error("queue {id}: filtered local delivery failed: {error}", id=env.id, error=e)
        return [(r, AttemptResult.temporary(f"local delivery failed: {e}", "4.3.0"))
                for r in targets.values()]
    results: Results = []
    for outcome in outcomes:
        r = targets[outcome.target.path]
        if outcome.ok:
            results.append((r, AttemptResult("ok", "rejected by the recipient's Sieve script",
                                             "2.0.0") if outcome.rejected
                            else AttemptResult.delivered()))
        else:
            results.append((r, AttemptResult.temporary(
                f"cannot write to mailbox: {outcome.error}", "4.3.0")))
    return results
