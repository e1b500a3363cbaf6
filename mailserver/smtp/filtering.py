"""The MX's local delivery when delivery filters or Sieve apply: held whole, then decided.

Takes LocalDelivery's place (also inside QueueingDelivery, which still queues remote alias
targets and local mailboxes that could not be written): the message is held in a
MessageSpool (memory, or a file when large) instead of streaming into the Maildirs, and
at the end of DATA mailserver.sieve.delivery runs the filter plugins and each mailbox's
scripts and makes the stores.  A refusal (a plugin's reject or defer, a script's reject
when the message has one mailbox) is an SMTPReplyError from commit(), answered by the
session; nothing is stored then.  Used only when `SieveDelivery.wanted` says so: mail for
mailboxes without scripts, with no global script and no plugin, streams as before.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from twisted.internet import defer
from zope.interface import implementer

from mailserver.sieve.delivery import Incoming, SieveDelivery, Target, UserOutcome
from mailserver.sieve.plan import INBOX_DEFAULT, DefaultFolder
from mailserver.smtp.delivery import DeliveryOutcome, IDelivery, MailboxStatus, Recipient
from mailserver.smtp.spool import MessageSpool

if TYPE_CHECKING:
    from mailserver.accounts import User
    from mailserver.maildir import MaildirStore


_NO_CHECKS: Mapping[str, str] = MappingProxyType({})


@implementer(IDelivery)
class FilteringDelivery:
    def __init__(self, sieve: SieveDelivery, store: "MaildirStore", queue_id: str,
                 sender: str, *, default: DefaultFolder = INBOX_DEFAULT, client_ip: str = "",
                 helo: str = "", auth: str = "",
                 checks: Mapping[str, str] | None = None) -> None:
        self.sieve = sieve
        self.store = store
        self.queue_id = queue_id
        self.sender = sender
        self.default = default
        self.client_ip, self.helo, self.auth = client_ip, helo, auth
        self.checks = MappingProxyType(dict(checks)) if checks else _NO_CHECKS
        self._targets: dict[Path, Target] = {}
        self._users: dict[Path, "User"] = {}
        self._full: dict[str, "User"] = {}   # address -> a user whose mailbox is full
        self._rcpts = 0
        self._mailboxes = 0
        self._prefix = b""
        self._trace = b""
        self.spool = MessageSpool(sieve.spool_dir, queue_id)

    @property
    def mailboxes(self) -> list["User"]:
        return list(self._users.values())

    def add_recipient(self, recipient: Recipient) -> None:
        self._rcpts += 1
        self._mailboxes += len(recipient.local) + len(recipient.remote)
        for user in recipient.local:
            if user in recipient.full:
                self._full.setdefault(user.address, user)
                continue
            path = self.store.user_path(user.domain, user.localpart)
            if path not in self._targets:
                self._users[path] = user
                self._targets[path] = Target(user.address, path, recipient.address)

    def write_headers(self, delivery: bytes, trace: bytes) -> None:
        self._prefix, self._trace = delivery, trace

    def write(self, data: bytes) -> None:
        self.spool.write(data)

    def _full_statuses(self) -> list[MailboxStatus]:
        """RFC 3463 3.3 (X.2.2 mailbox full) for each full mailbox no other RCPT got stored."""
        stored = {user.address for user in self._users.values()}
        return [MailboxStatus(address, False, "452 4.2.2 Mailbox full")
                for address in self._full if address not in stored]

    def commit(self) -> defer.Deferred:
        if not self._targets:
            self.spool.discard()
            return defer.succeed(DeliveryOutcome(self._full_statuses()))
        try:
            self.spool.finish()
        except OSError as e:
            self.spool.discard()
            return defer.fail(e)
        spool = self.spool
        msg = Incoming(
            queue_id=self.queue_id, sender=self.sender, header=spool.header,
            rest=spool.rest() if spool.in_memory else None, path=spool.path,
            rest_offset=spool.header_end, prefix=self._prefix, trace=self._trace,
            auth=self.auth, client_ip=self.client_ip, helo=self.helo, checks=self.checks,
            # RFC 5429 2.1.1: refused at SMTP time only when no one else is concerned.
            smtp_time=self._rcpts == 1 and self._mailboxes == 1, default=self.default)
        d = self.sieve.deliver(msg, list(self._targets.values()))
        d.addCallback(self._statuses)
        d.addBoth(self._finished)
        return d

    def _statuses(self, outcomes: list[UserOutcome]) -> DeliveryOutcome:
        out = DeliveryOutcome()
        for o in outcomes:
            out.statuses.append(MailboxStatus(o.target.address, o.ok, o.error, path=o.path))
        out.statuses += self._full_statuses()
        return out

    def _finished(self, result: Any) -> Any:
        self.spool.discard()
        return result

    def abort(self) -> None:
        self.spool.discard()
