"""The IMAP listeners' factory and the avatar the cred realm hands to IMAP logins."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mailserver.auth import inbox_warmer
from mailserver.connlimit import LimitedFactory
from mailserver.imap import headerpass
from mailserver.imap.context import IMAPContext
from mailserver.imap.mailbox import IIMAPAccount, IMAPAccount
from mailserver.imap.server import IMAPSession


class IMAPFactory(LimitedFactory):
    refusal = b"* BYE Too many connections, try again later\r\n"

    def __init__(self, context: IMAPContext) -> None:
        self.context = context

    def protocol(self) -> IMAPSession:  # type: ignore[override]
        return IMAPSession(self.context)


def avatar_factory(server: Any):
    """address -> IMAPAccount over that user's Maildir."""

    def make(address: str) -> defer.Deferred[IMAPAccount]:
        user = server.accounts.get_user(address)
        if user is None:
            return defer.fail(LookupError(address))
        return server.store.ensure_user(user.domain, user.localpart).addCallback(
            lambda path: IMAPAccount(user.address, server.store.account(path), user.quota))

    return make


def build_factory(server: Any, name: str) -> IMAPFactory:
    if not getattr(server, "_imap_realm_registered", False):
        server.realm.register(IIMAPAccount, avatar_factory(server))
        server._imap_realm_registered = True
    config = server.config
    context = IMAPContext(hostname=config.server.hostname, limits=config.limits,
                          portal=server.portal, throttle=server.throttle, store=server.store,
                          tls=server.tls if name == "imap" else None,
                          allow_plaintext_loopback=config.auth.allow_plaintext_loopback,
                          metrics=server.metrics.service(name),
                          header_workers=headerpass.workers(),
                          warm=inbox_warmer(server.accounts, server.store))
    return IMAPFactory(context)
