"""The ManageSieve listener's factory ([listen].managesieve, STARTTLS)."""

from __future__ import annotations

from typing import Any

from mailserver.connlimit import LimitedFactory
from mailserver.managesieve.account import ISieveAccount, avatar_factory
from mailserver.managesieve.session import ManageSieveContext, ManageSieveSession


class ManageSieveFactory(LimitedFactory):
    refusal = b'BYE (TRYLATER) "Too many connections, try again later"\r\n'  # RFC 5804 1.3

    def __init__(self, context: ManageSieveContext) -> None:
        self.context = context

    def protocol(self) -> ManageSieveSession:  # type: ignore[override]
        return ManageSieveSession(self.context)


def build_factory(server: Any, name: str) -> ManageSieveFactory:
    """The factory for listener `name` ("managesieve"; see mailserver.service)."""
    from mailserver.sieve.parser import CAPABILITIES

    server.realm.register(ISieveAccount, avatar_factory(server.accounts, server.store))
    config = server.config
    context = ManageSieveContext(hostname=config.server.hostname, limits=config.limits,
                                 sieve=config.sieve, portal=server.portal,
                                 throttle=server.throttle, extensions=tuple(CAPABILITIES),
                                 tls=server.tls,
                                 allow_plaintext_loopback=config.auth.allow_plaintext_loopback,
                                 service=name, metrics=server.metrics.service(name))
    return ManageSieveFactory(context)
