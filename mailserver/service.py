"""Build the twistd service tree from the configuration."""

from __future__ import annotations

import os
from typing import Callable

from twisted.application import service, strports
from twisted.internet import protocol, threads
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailserver.config import Config
from mailserver.connlimit import ConnectionLimiter, LimitedFactory

log = Logger()

# Services on implicit-TLS ports: the whole connection is wrapped in TLS.
IMPLICIT_TLS = {"submissions", "imaps", "pop3s"}


class MailServer(service.MultiService):
    """Owns what the protocol services share: accounts, store, TLS context, limits."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        from mailserver.accounts import Accounts
        from mailserver.maildir import MaildirStore
        from mailserver.tls import ensure_certificate, server_context_factory

        self.config = config
        for path in (config.state_dir, config.maildir_root):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tls_paths = ensure_certificate(config)
        self.tls = server_context_factory(self.tls_paths)
        self.accounts = Accounts(config.accounts_db)
        self.store = MaildirStore(config.maildir_root, config.server.hostname)
        self.limiter = ConnectionLimiter(config.limits.max_connections,
                                         config.limits.max_connections_per_ip)
        builders: dict[str, Callable[[], protocol.ServerFactory]] = {
            "smtp": self._mx_factory,
        }
        for name, description in config.listen.enabled().items():
            build = builders.get(name)
            if build is None:
                log.warn("listen.{name} = {desc!r}: this service is not available yet; "
                         "not listening", name=name, desc=description)
                continue
            factory = build()
            if isinstance(factory, LimitedFactory):
                factory.limiter = self.limiter
            if name in IMPLICIT_TLS:
                factory = TLSMemoryBIOFactory(self.tls, False, factory)
            listener = strports.service(description, factory)
            listener.setName(name)
            listener.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        log.info("mailserver {hostname} started (pid {pid}); maildirs in {root}",
                 hostname=self.config.server.hostname, pid=os.getpid(),
                 root=str(self.config.maildir_root))
        threads.deferToThread(self.store.clean_tmp).addErrback(
            lambda f: log.failure("cleaning tmp/ failed", f))

    def _smtp_context(self, service_name: str):
        from mailserver.smtp.session import SMTPContext

        return SMTPContext(hostname=self.config.server.hostname, limits=self.config.limits,
                           accounts=self.accounts, store=self.store, tls=self.tls,
                           service=service_name)

    def _mx_factory(self) -> protocol.ServerFactory:
        from mailserver.smtp.mx import MXSession, SMTPFactory

        return SMTPFactory(self._smtp_context("smtp"), MXSession)


def make_service(config: Config) -> service.MultiService:
    return MailServer(config)
