"""The POP3 listeners' factory and the avatar the cred realm hands to POP3 logins."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.mail.pop3 import IMailbox

from mailserver.auth import inbox_warmer
from mailserver.connlimit import LimitedFactory
from mailserver.pop3.mailbox import MailboxLocks, POP3Mailbox, open_inbox
from mailserver.pop3.session import POP3Context, POP3Session


class POP3Factory(LimitedFactory):
    refusal = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"  # RFC 3206 4

    def __init__(self, context: POP3Context) -> None:
        self.context = context

    def protocol(self) -> POP3Session:  # type: ignore[override]
        return POP3Session(self.context)


def avatar_factory(accounts: Any, store: Any,
                   locks: MailboxLocks) -> Callable[[str], defer.Deferred[POP3Mailbox]]:
    """address -> POP3Mailbox over that user's INBOX (MailboxInUse if already open)."""

    def make(address: str) -> defer.Deferred[POP3Mailbox]:
        user = accounts.get_user(address)
        if user is None:
            return defer.fail(LookupError(address))
        return store.ensure_user(user.domain, user.localpart).addCallback(
            lambda path: open_inbox(store, path, user.address, locks))

    return make


def build_factory(server: Any, name: str) -> POP3Factory:
    """The factory for listener `name` ("pop3" or "pop3s"; see mailserver.service)."""
    if not getattr(server, "pop3_avatar", False):
        # One lock registry and one avatar for both listeners: IN-USE spans pop3 and pop3s
        # (and every node, when the server set mailserver.crossnode's locks).
        if getattr(server, "pop3_locks", None) is None:
            server.pop3_locks = MailboxLocks()
        server.realm.register(IMailbox, avatar_factory(server.accounts, server.store,
                                                       server.pop3_locks))
        server.pop3_avatar = True
    config = server.config
    context = POP3Context(hostname=config.server.hostname, limits=config.limits,
                          portal=server.portal, throttle=server.throttle,
                          tls=server.tls if name == "pop3" else None,
                          allow_plaintext_loopback=config.auth.allow_plaintext_loopback,
                          service=name, metrics=server.metrics.service(name),
                          warm=inbox_warmer(server.accounts, server.store))
    return POP3Factory(context)
