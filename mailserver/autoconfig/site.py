"""HTTP plumbing: a twisted.web Site whose request bodies are bounded before buffering.

twisted.web buffers a whole request body before the resource sees it.  Here a declared
Content-Length above MAX_BODY is answered at once, from the headers (before any
"100 Continue", so a polite client never sends the body), and a chunked body is cut off
when it passes the limit.  The rest of the body is then read and discarded, up to
DRAIN_LIMIT bytes or DRAIN_SECONDS, so that a client still sending sees the answer
rather than a reset connection; nothing of it is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from mailserver.connlimit import ConnectionLimiter, Refuser

if TYPE_CHECKING:
    from mailserver.metrics import ServiceMetrics

log = Logger()

MAX_BODY = 64 * 1024
DRAIN_LIMIT = 4 * 1024 * 1024
DRAIN_SECONDS = 10.0
# A whole request, header and body, must arrive within this from its first octet: the
# idle timeout alone let a client sending a byte every few seconds hold a connection slot
# (shared with SMTP, IMAP and POP3) for as long as it liked.
REQUEST_SECONDS = 30.0
TOO_LARGE = b"request body larger than %d bytes\n" % MAX_BODY


def _plain_response(code: int, reason: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, reason, len(text), text))


# The issue asks for 400 for an oversized body (413 would also be fitting).
REFUSAL_TOO_LARGE = _plain_response(400, b"Bad Request", TOO_LARGE)
REFUSAL_TOO_SLOW = _plain_response(408, b"Request Timeout",
                                   b"request not received within %d seconds\n"
                                   % REQUEST_SECONDS)


class BoundedRequest(server.Request):
    """A Request that keeps at most MAX_BODY bytes of body, always in memory."""

    def gotLength(self, length: int | None) -> None:
        self._body_length = 0
        # None (chunked) would make twisted.web spool to a temporary file.
        super().gotLength(0 if length is None else length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_length += len(data)
        if self._body_length > MAX_BODY:
            self.channel.refuse_body(self._body_length)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.channel is None or self.channel.refused:
            return  # answered already by the channel; the body was cut off
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # RFC 9112 3.2: an HTTP/1.1 request without a Host field, or with more than one,
        # is a 400.  The answers here depend on the name asked for (autoconfig's
        # redirects), and two names would leave it to chance which one counts.
        hosts = self.requestHeaders.getRawHeaders(b"host", [])
        if self.clientproto == b"HTTP/1.1" and len(hosts) != 1:
            self.setResponseCode(400)
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self.write(b"an HTTP/1.1 request needs one Host header field\n")
            self.finish()
            return
        super().process()


@implementer(IHandshakeListener)
class BoundedChannel(http.HTTPChannel):
    """HTTP/1.1 channel that answers an oversized body itself and drains the rest."""

    refused = False
    limiter: ConnectionLimiter | None = None   # set by the site with the client's IP
    client_ip = ""
    _drain_left = 0
    _drain_call: IDelayedCall | None = None
    _closing = False

    _request_call: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        # The clock starts with a request's first octet; not for octets of a pipelined
        # request that arrive while an earlier one is being answered (twisted.web keeps
        # them, and hands them here again once that answer is done).
        if (data and self._request_call is None and not self.requests and not self.refused
                and not self._closing):
            self._request_call = self.callLater(REQUEST_SECONDS, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_request_clock()
        super().allContentReceived()

    def _stop_request_clock(self) -> None:
        if self._request_call is not None and self._request_call.active():
            self._request_call.cancel()
        self._request_call = None

    def _too_slow(self) -> None:
        self._request_call = None
        log.info("{service}: request not received within {seconds} s, closing",
                 service=getattr(self.site, "name", "autoconfig"), seconds=REQUEST_SECONDS)
        if not self._closing:
            self._closing = True
            self.transport.write(REFUSAL_TOO_SLOW)
            self.loseConnection()

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_BODY:
            self.refuse_body(self.length)
            return
        super().allHeadersReceived()

    def refuse_body(self, length: int) -> None:
        """Answer 400 now; read and drop what the client still sends, then close."""
        if self.refused:
            return
        self.refused = True
        self._stop_request_clock()   # answered already: the drain has its own bound
        self.persistent = False
        log.info("{service}: request body of {length} bytes refused (limit {limit})",
                 service=getattr(self.site, "name", "autoconfig"), length=length,
                 limit=MAX_BODY)
        self.transport.write(REFUSAL_TOO_LARGE)
        declared = self.length if self.length is not None else DRAIN_LIMIT
        self._drain_left = min(declared, DRAIN_LIMIT)
        self._drain_call = self.callLater(DRAIN_SECONDS, self._end_drain)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            self._drain_left -= len(data)
            if self._drain_left <= 0:
                self._end_drain()
            return
        super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:
            super().lineReceived(line)

    def _end_drain(self) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if not self._closing:
            self._closing = True
            self.loseConnection()

    def connectionLost(self, reason: object) -> None:  # type: ignore[override]
        self._stop_request_clock()
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if self.limiter is not None:
            self.limiter.release(self.client_ip)
            self.limiter = None
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.connection_closed(self)
        super().connectionLost(reason)

    def handshakeCompleted(self) -> None:  # IHandshakeListener: HTTPS on [listen].autoconfig
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.tls_established(self.transport)


class AutoconfigSite(server.Site):
    """The Site: counts against the server's connection limits; logs without queries.

    Not a connlimit.LimitedFactory: that class's `log` attribute would hide the access
    log method twisted.web calls, so the same limiter is applied here directly.
    """

    protocol = BoundedChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False
    refusal = _plain_response(503, b"Service Unavailable", b"too many connections\n")

    def __init__(self, resource: Resource, timeout: float, name: str,
                 limiter: ConnectionLimiter | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        super().__init__(resource, requestFactory=BoundedRequest, timeout=timeout,
                         parsePOSTFormSubmission=False)
        self.name = name
        self.limiter = limiter
        self.metrics = metrics

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        ip = getattr(addr, "host", str(addr))
        if self.limiter is not None and not self.limiter.acquire(ip):
            log.warn("{service}: connection from {ip} refused: too many connections",
                     service=self.name, ip=ip)
            if self.metrics is not None:
                self.metrics.connection_refused()
            return Refuser(self.refusal)
        channel = super().buildProtocol(addr)
        if self.limiter is not None:
            channel.limiter, channel.client_ip = self.limiter, ip
        if self.metrics is not None:
            self.metrics.connection_opened(channel)
        return channel

    def log(self, request: server.Request) -> None:
        """One line per request; the path without its query (it holds the address)."""
        log.info("{service}: {ip} {method} {path} {code}", service=self.name,
                 ip=_client_ip(request), method=_text(request.method),
                 path=_text(request.path[:200]), code=request.code)


def _client_ip(request: server.Request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", str(peer))


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "backslashreplace")
