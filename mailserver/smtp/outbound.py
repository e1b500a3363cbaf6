"""Builds the outbound side the SMTP services share: queue store, runner, relay.

Also the mapping from what an SMTP session accepted (a Recipient with local users and
remote targets) to queue recipients, used by the MX, submission and DSNs alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailserver.accounts import with_postmaster
from mailserver.smtp.delivery import Recipient
from mailserver.smtp.queue.envelope import RecipientState
from mailserver.smtp.queue.local import QueueLocalDelivery
from mailserver.smtp.queue.runner import QueueRunner
from mailserver.smtp.queue.store import QueueStore
from mailserver.smtp.relay.relay import Relay
from mailserver.smtp.session import new_queue_id

if TYPE_CHECKING:
    from mailserver.accounts import Accounts
    from mailserver.service import MailServer


def recipient_states(recipient: Recipient) -> list[RecipientState]:
    """Queue recipients for an accepted RCPT: its local mailboxes and remote targets."""
    original = recipient.address
    out = [RecipientState(u.address, "local", original=original) for u in recipient.local]
    out += [RecipientState(a, "remote", original=original) for a in recipient.remote]
    return out


def route_address(accounts: "Accounts", address: str) -> list[RecipientState]:
    """Where a message the server writes itself (a DSN) to `address` goes; [] if nowhere."""
    res = with_postmaster(accounts, address, accounts.resolve(address))
    if res.kind == "nonlocal":
        return [RecipientState(address, "remote")]
    if res.kind != "ok":
        return []
    return recipient_states(Recipient(address, res.local, res.remote))


def build_queue(server: "MailServer") -> QueueRunner:
    config = server.config
    runner = QueueRunner(
        QueueStore(config.queue_dir), config.queue, config.server.hostname,
        local=QueueLocalDelivery(server.store, server.accounts, getattr(server, "sieve", None)),
        relay=Relay(config),
        router=lambda address: route_address(server.accounts, address),
        new_id=new_queue_id, metrics=server.metrics)
    server.metrics.watch_queue(runner)
    return runner
