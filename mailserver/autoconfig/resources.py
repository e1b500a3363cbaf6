"""The twisted.web resources: which URL serves which document.

Outlook varies the case of its path, so every directory matches its children
case-insensitively.  Only local domains are answered; the address is validated before
use and never looked up, so no answer tells whether a mailbox exists.  Error bodies are
fixed texts that never echo the request.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlencode

from twisted.logger import Logger
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import Request

from mailserver.addresses import AddressError
from mailserver.autoconfig import apple, autodiscover, thunderbird
from mailserver.autoconfig.address import Address, parse_address
from mailserver.autoconfig.settings import ClientSettings

log = Logger()

THUNDERBIRD_PATHS = (b"/.well-known/autoconfig/mail/config-v1.1.xml", b"/mail/config-v1.1.xml")
AUTODISCOVER_PATH = b"/autodiscover/autodiscover.xml"
APPLE_PATH = b"/apple/mailserver.mobileconfig"


class Domains(Protocol):
    """The part of `mailserver.accounts.Accounts` these resources use."""

    def is_local_domain(self, domain: str) -> bool: ...
    def list_domains(self) -> list[str]: ...


class HTTPError(Exception):
    """An answer other than 200: status code and a fixed, one-line text."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def error_body(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode() + b"\n"


class Leaf(Resource):
    """The end of a path: any further segment is 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()


class Document(Leaf):
    """Answers with one generated document."""

    allowedMethods: tuple[bytes, ...] = (b"GET", b"HEAD")

    def __init__(self, settings: ClientSettings, domains: Domains) -> None:
        super().__init__()
        self.settings = settings
        self.domains = domains

    def render(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        try:
            return super().render(request)
        except HTTPError as e:
            return error_body(request, e.code, e.text)
        except UnsupportedMethod as e:
            if request.method == b"HEAD" and b"GET" in e.allowedMethods:
                raise  # twisted.web answers HEAD by rendering GET without the body
            request.setHeader(b"allow", b", ".join(e.allowedMethods))
            return error_body(request, 405, "method not allowed")

    def address(self, text: str | None) -> Address:
        """A valid address in a local domain, or HTTPError 400 / 404."""
        if text is None:
            raise HTTPError(400, "missing emailaddress")
        try:
            address = parse_address(text)
        except AddressError:
            raise HTTPError(400, "invalid e-mail address") from None
        self.require_local(address.domain)
        return address

    def require_local(self, domain: str) -> None:
        if not self.domains.is_local_domain(domain):
            raise HTTPError(404, "not a domain served here")


def query_address(request: Request) -> str | None:
    """The one `emailaddress` query argument, or None; HTTPError 400 if unusable."""
    values = (request.args or {}).get(b"emailaddress")
    if not values:
        return None
    if len(values) > 1:
        raise HTTPError(400, "more than one emailaddress")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "invalid e-mail address") from None


class ThunderbirdConfig(Document):
    """config-v1.1.xml: for the address's domain, the Host's domain, or every domain."""

    def render_GET(self, request: Request) -> bytes:
        text = query_address(request)
        if text is not None:
            domains = [self.address(text).domain]
        else:
            domains = self._domains_for_host(request)
        if not domains:
            raise HTTPError(404, "no mail domain is served here")
        request.setHeader(b"content-type", thunderbird.CONTENT_TYPE)
        return thunderbird.config_v11(self.settings, domains)

    def _domains_for_host(self, request: Request) -> list[str]:
        """autoconfig.<domain> or <domain> in the Host header names one domain."""
        host = request.getRequestHostname().decode("ascii", "replace").lower().rstrip(".")
        for candidate in (host, host.removeprefix("autoconfig.")):
            if candidate and self.domains.is_local_domain(candidate):
                return [candidate]
        return self.domains.list_domains()


class AutodiscoverConfig(Document):
    """Outlook's POST with an XML body naming the address."""

    allowedMethods = (b"POST",)

    def render_POST(self, request: Request) -> bytes:
        try:
            parsed = autodiscover.parse_request(request.content.read())
        except autodiscover.BadRequest as e:
            log.info("autodiscover request refused: {reason}", reason=str(e))
            raise HTTPError(400, "not an autodiscover request") from None
        address = self.address(parsed.email_address)
        request.setHeader(b"content-type", autodiscover.CONTENT_TYPE)
        if not autodiscover.wants_outlook_schema(parsed):
            return autodiscover.provider_unavailable()
        return autodiscover.outlook_response(self.settings, address)


class AppleProfile(Document):
    def render_GET(self, request: Request) -> bytes:
        address = self.address(query_address(request))
        try:
            body = apple.mobileconfig(self.settings, address)
        except apple.NotOffered:
            raise HTTPError(404, "no mail account can be configured here") from None
        request.setHeader(b"content-type", apple.CONTENT_TYPE)
        request.setHeader(b"content-disposition",
                          b'attachment; filename="%s.mobileconfig"' % address.domain.encode())
        return body


class ToHTTPS(Leaf):
    """Plain HTTP: send the client to the same document on the HTTPS service.

    This is also Outlook's "HTTP redirect method": a GET to
    http://autodiscover.<domain>/autodiscover/autodiscover.xml answered with a 302 to a
    host whose certificate it can verify.
    """

    def __init__(self, settings: ClientSettings, path: bytes, keep_query: bool) -> None:
        super().__init__()
        self.settings = settings
        self.path = path
        self.keep_query = keep_query

    def render(self, request: Request) -> bytes:
        url = self.settings.https_url(self.path.decode())
        if self.keep_query:
            try:
                text = query_address(request)
            except HTTPError:
                text = None  # the HTTPS service will refuse it; do not echo it here
            if text is not None:
                url += "?" + urlencode({"emailaddress": text})
        request.redirect(url.encode())
        return b""


class Directory(Resource):
    """A path segment whose children match case-insensitively (Outlook's /Autodiscover/)."""

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        return super().getChildWithDefault(path.lower(), request)

    def render(self, request: Request) -> bytes:
        return error_body(request, 404, "not found")

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NotFound()


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return error_body(request, 404, "not found")


def build_tree(settings: ClientSettings, domains: Domains, https: bool) -> Resource:
    """The resource tree of the HTTPS service (`https`) or the plain HTTP one.

    Plain HTTP serves the Thunderbird document (Thunderbird fetches
    http://autoconfig.<domain>/mail/config-v1.1.xml) and redirects the Outlook and Apple
    URLs to HTTPS; when the HTTPS listener is off (TLS ends in a proxy in front), it
    serves everything itself.
    """
    root = Directory()
    tb = ThunderbirdConfig(settings, domains)
    serve_all = https or not settings.https_enabled
    documents: dict[bytes, Resource] = {p: tb for p in THUNDERBIRD_PATHS}
    documents[AUTODISCOVER_PATH] = (AutodiscoverConfig(settings, domains) if serve_all
                                    else ToHTTPS(settings, AUTODISCOVER_PATH, keep_query=False))
    documents[APPLE_PATH] = (AppleProfile(settings, domains) if serve_all
                             else ToHTTPS(settings, APPLE_PATH, keep_query=True))
    for path, leaf in documents.items():
        node = root
        *dirs, name = path.lower().strip(b"/").split(b"/")
        for segment in dirs:
            existing = node.children.get(segment)
            if existing is None:
                existing = Directory()
                node.putChild(segment, existing)
            node = existing
        node.putChild(name, leaf)
    return root
