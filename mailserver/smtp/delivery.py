"""Delivery of one received message: recipients, streamed body, commit with per-mailbox status.

The session talks to `IDelivery` only.  `LocalDelivery` puts the message into the Maildirs of
local users (one stored copy each, hard links where possible) and reports a status for each
mailbox, so that a failure for one mailbox never makes the sender retry the others.
A mailbox can also end up `queued`: handed to the outbound queue (a remote target, or a
local mailbox whose write failed, or that was full when its alias was accepted, and will be
retried from the queue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from zope.interface import Interface, implementer

from mailserver.maildir.delivery import DeliveryResult

if TYPE_CHECKING:
    from mailserver.accounts import User
    from mailserver.maildir import MaildirStore


@dataclass(frozen=True)
class Recipient:
    """An accepted RCPT: the address given, and what it resolved to.

    `full`: local users (among `local`) whose mailbox was at its quota when the RCPT was
    accepted (an alias with other members): their copy is not written now but retried
    from the queue (reported as not stored, which QueueingDelivery queues).
    """

    address: str
    local: tuple["User", ...] = ()
    remote: tuple[str, ...] = ()
    full: tuple["User", ...] = ()


@dataclass(frozen=True)
class MailboxStatus:
    """The outcome for one destination mailbox (a local user or a remote address).

    ok: stored in the Maildir (`path`) or, with `queued`, durably in the outbound queue.
    """

    mailbox: str
    ok: bool
    error: str = ""
    queued: bool = False
    path: Path | None = None


@dataclass
class DeliveryOutcome:
    statuses: list[MailboxStatus] = field(default_factory=list)

    @property
    def delivered(self) -> list[MailboxStatus]:
        """Stored in a Maildir."""
        return [s for s in self.statuses if s.ok and not s.queued]

    @property
    def queued(self) -> list[MailboxStatus]:
        return [s for s in self.statuses if s.ok and s.queued]

    @property
    def lost(self) -> list[MailboxStatus]:
        """Neither stored nor queued."""
        return [s for s in self.statuses if not s.ok]


class IDelivery(Interface):
    """One message on its way to its recipients."""

    def add_recipient(recipient: Recipient) -> None:
        """Register an accepted recipient; called before any body data."""

    def write_headers(delivery: bytes, trace: bytes) -> None:
        """The header fields the server adds in front of the message, before any data:
        `delivery` (Return-Path, Delivered-To) belongs only in a final Maildir copy,
        `trace` (Received) in every copy, also the one relayed onwards."""

    def write(data: bytes) -> None:
        """Append message bytes (already dot-unstuffed, CRLF line ends)."""

    def commit() -> defer.Deferred:
        """Make the message durable for every mailbox; fires with a DeliveryOutcome."""

    def abort() -> None:
        """Forget the message; nothing of it stays visible anywhere."""


Placement = Callable[[Path], tuple[Path, str]]


def _all_failed(failure: Any, targets: list[Path]) -> list[DeliveryResult]:
    return [DeliveryResult(t, False, None, failure.value) for t in targets]


@implementer(IDelivery)
class LocalDelivery:
    """Writes into the Maildirs of local users through the store.

    `place` maps a user's Maildir to the folder that gets the message and the ":2,..."
    info its file name carries (a Junk delivery: the user's Junk folder and its $Junk
    keyword letter); without it every message goes to INBOX, unflagged.  One stored file
    per distinct info suffix (nearly always one), hard-linked into every target.
    """

    def __init__(self, store: "MaildirStore", place: Placement | None = None) -> None:
        self.store = store
        self.place = place
        self._users: dict[Path, "User"] = {}
        self._infos: dict[Path, str] = {}
        self._full: dict[str, "User"] = {}  # address -> a user whose mailbox is full
        self._deliveries: dict[str, Any] | None = None

    @property
    def mailboxes(self) -> list["User"]:
        return list(self._users.values())

    def add_recipient(self, recipient: Recipient) -> None:
        for user in recipient.local:
            if user in recipient.full:
                self._full.setdefault(user.address, user)
                continue
            path = self.store.user_path(user.domain, user.localpart)
            info = ""
            if self.place is not None:
                path, info = self.place(path)
            if path not in self._users:
                self._users[path] = user
                self._infos[path] = info

    def write_headers(self, delivery: bytes, trace: bytes) -> None:
        self.write(delivery + trace)

    def write(self, data: bytes) -> None:
        if self._deliveries is None:
            groups: dict[str, list[Path]] = {}
            for path, info in self._infos.items():
                groups.setdefault(info, []).append(path)
            self._deliveries = {info: self.store.begin_delivery(paths, info=info)
                                for info, paths in groups.items()}
        for delivery in self._deliveries.values():
            delivery.write(data)

    def _full_statuses(self) -> list[MailboxStatus]:
        """RFC 3463 3.3 (X.2.2 mailbox full) for each full mailbox no other RCPT got stored."""
        stored = {user.address for user in self._users.values()}
        return [MailboxStatus(address, False, "452 4.2.2 Mailbox full")
                for address in self._full if address not in stored]

    def commit(self) -> defer.Deferred:
        if not self._users:
            return defer.succeed(DeliveryOutcome(self._full_statuses()))
        if self._deliveries is None:
            self.write(b"")
        assert self._deliveries is not None
        deliveries = list(self._deliveries.values())
        if len(deliveries) == 1:
            d = deliveries[0].commit()
        else:
            # One stored file per info suffix: a group that fails is reported failed for
            # its own mailboxes only (the queue retries those), never for the others.
            d = defer.gatherResults([x.commit().addErrback(_all_failed, x.targets)
                                     for x in deliveries])
            d.addCallback(lambda lists: [r for results in lists for r in results])

        def statuses(results) -> DeliveryOutcome:
            out = DeliveryOutcome()
            for result in results:
                user = self._users[result.target]
                out.statuses.append(MailboxStatus(user.address, result.ok,
                                                  "" if result.ok else str(result.error),
                                                  path=result.path))
            out.statuses += self._full_statuses()
            return out

        return d.addCallback(statuses)

    def abort(self) -> None:
        for delivery in (self._deliveries or {}).values():
            delivery.abort()
