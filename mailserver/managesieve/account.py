"""The avatar a ManageSieve login gets from the shared cred realm: whose scripts, where."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from zope.interface import Interface, implementer


class ISieveAccount(Interface):
    """What the ManageSieve session asks the portal for (mailserver.auth.MailRealm)."""


@implementer(ISieveAccount)
@dataclass(frozen=True)
class SieveAccount:
    address: str      # the user's normalised address (RFC 5804 OWNER)
    path: Path        # the user's Maildir, where sieve/ and .dovecot.sieve live


def avatar_factory(accounts: Any, store: Any) -> Callable[[str], defer.Deferred[SieveAccount]]:
    """address -> SieveAccount; the Maildir is created on first need (a user added with
    mailserver-admin before any mail came has one already)."""

    def make(address: str) -> defer.Deferred[SieveAccount]:
        user = accounts.get_user(address)
        if user is None:
            return defer.fail(LookupError(address))
        return store.ensure_user(user.domain, user.localpart).addCallback(
            lambda path: SieveAccount(user.address, path))

    return make
