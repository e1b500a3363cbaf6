"""Connection limits shared by every listener: in total and per client IP.

A connection over a limit gets one protocol-appropriate refusal line and is closed, so a
flood of idle connections from one address never keeps other clients from being served.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from mailserver.metrics import ServiceMetrics


class ConnectionLimiter:
    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def acquire(self, ip: str) -> bool:
        if self.total >= self.max_total or self.per_ip[ip] >= self.max_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class Refuser(protocol.Protocol):
    """Says one line and hangs up."""

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()


class LimitedFactory(protocol.ServerFactory):
    """A ServerFactory that asks the shared limiter before building a protocol.

    Protocols built by it must call `self.factory.released(self)` from connectionLost;
    `LimitedProtocolMixin` does that.
    """

    log = Logger()
    noisy = False
    refusal: bytes = b"Too many connections\r\n"
    limiter: ConnectionLimiter | None = None
    metrics: "ServiceMetrics | None" = None   # set with the limiter (mailserver.service)

    def buildProtocol(self, addr):  # type: ignore[override]
        ip = addr.host if hasattr(addr, "host") else str(addr)
        if self.limiter is not None and not self.limiter.acquire(ip):
            self.log.warn("connection from {ip} refused: too many connections", ip=ip)
            if self.metrics is not None:
                self.metrics.connection_refused()
            return Refuser(self.refusal)
        p = super().buildProtocol(addr)
        if p is not None:
            p._limited_ip = ip  # type: ignore[attr-defined]
            if self.metrics is not None:
                self.metrics.connection_opened(p)
        return p

    def released(self, proto: protocol.Protocol) -> None:
        ip = getattr(proto, "_limited_ip", None)
        if ip is not None and self.limiter is not None:
            proto._limited_ip = None  # type: ignore[attr-defined]
            self.limiter.release(ip)
        if self.metrics is not None:
            self.metrics.connection_closed(proto)


@implementer(IHandshakeListener)
class LimitedProtocolMixin:
    """Returns the connection slot to the factory's limiter when the connection ends;
    tells the factory's metrics of a completed TLS handshake; sends answers at once."""

    factory: LimitedFactory

    def makeConnection(self, transport):  # type: ignore[no-untyped-def]
        # TCP_NODELAY: with Nagle's algorithm the end of a large answer (a SEARCH of
        # 30,000 uids, a message body) can wait for the client's delayed ACK, 40 ms on
        # Linux.  A TLS transport passes the call on to its TCP transport.
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        super().makeConnection(transport)  # type: ignore[misc]

    def handshakeCompleted(self) -> None:
        """Called by Twisted's TLS layer once the handshake is done (implicit TLS or after
        STARTTLS/STLS)."""
        metrics = getattr(getattr(self, "factory", None), "metrics", None)
        if metrics is not None:
            metrics.tls_established(self.transport)  # type: ignore[attr-defined]

    def connectionLost(self, reason=protocol.connectionDone):  # type: ignore[no-untyped-def]
        factory = getattr(self, "factory", None)
        if isinstance(factory, LimitedFactory):
            factory.released(self)  # type: ignore[arg-type]
        super().connectionLost(reason)  # type: ignore[misc]
