"""What every session (SMTP, IMAP, POP3, ManageSieve) knows of its client in the same way:
its address, whether TLS protects the connection, and so whether credentials may travel.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ISSLTransport

from mailserver.config import is_loopback


class PeerFacts:
    """A mixin for session protocols.  `startedTLS` is set once STARTTLS/STLS completed
    (the name Twisted's SMTP and IMAP servers use); implicit TLS is seen on the transport.
    `plaintext_allowed` needs a `context` with `allow_plaintext_loopback`."""

    startedTLS = False
    _peer_ip = ""
    transport: Any
    context: Any

    @property
    def peer_ip(self) -> str:
        if not self._peer_ip:
            peer = self.transport.getPeer()
            self._peer_ip = getattr(peer, "host", str(peer))
        return self._peer_ip

    @property
    def tls_active(self) -> bool:
        return self.startedTLS or ISSLTransport.providedBy(self.transport)

    def plaintext_allowed(self) -> bool:
        """Credentials travel only under TLS, or from loopback when the config says so
        (auth.allow_plaintext_loopback, for testing)."""
        return self.tls_active or (self.context.allow_plaintext_loopback
                                   and is_loopback(self.peer_ip))
