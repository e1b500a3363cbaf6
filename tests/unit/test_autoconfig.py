"""Mail client autoconfiguration: documents, address checks, bounded bodies, DNS records.

Requests go through the real twisted.web stack (Site, HTTPChannel, Request) over a
StringTransport, so routing, status codes and the body limit are tested as a client
sees them, without sockets.
"""

from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserver.addresses import AddressError
from mailserver.autoconfig import build_factory, safexml
from mailserver.autoconfig.address import parse_address
from mailserver.autoconfig.dns import client_records
from mailserver.autoconfig.site import DRAIN_SECONDS, MAX_BODY
from mailserver.config import ConfigError, parse_config
from mailserver.connlimit import ConnectionLimiter

AD_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
OUTLOOK_SCHEMA = AD_NS[1:-1]
LOCAL = ("example.test", "other.test")


class FakeDomains:
    def __init__(self, domains: tuple[str, ...] = LOCAL) -> None:
        self.domains = domains

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def list_domains(self) -> list[str]:
        return sorted(self.domains)


# The documents here describe a server listening on the standard ports (clients are told
# the listeners' ports unless [autoconfig] sets public ones; see test_admin_frictions.py).
STANDARD_LISTEN = {"imaps": "tcp:993", "imap": "tcp:143", "pop3s": "tcp:995", "pop3": "tcp:110",
                   "submissions": "tcp:465", "submission": "tcp:587", "autoconfig": "tcp:443",
                   "autoconfig_http": "tcp:80"}


def make_config(**sections: dict[str, Any]):
    listen = {**STANDARD_LISTEN, **sections.pop("listen", {})}
    data = {"server": {"hostname": "mail.example.test"}, "listen": listen, **sections}
    return parse_config(data, Path("/nonexistent/mailserver.toml"))


class Response:
    def __init__(self, raw: bytes, closed: bool) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        self.closed = closed

    def xml(self) -> ET.Element:
        return ET.fromstring(self.body)


class Client:
    """Feeds raw HTTP requests to a site built by build_factory."""

    def __init__(self, name: str = "autoconfig", domains: FakeDomains | None = None,
                 limiter: ConnectionLimiter | None = None, **sections: dict[str, Any]) -> None:
        server = SimpleNamespace(config=make_config(**sections), accounts=domains or FakeDomains(),
                                 limiter=limiter)
        self.site = build_factory(server, name)
        self.clock = Clock()
        self.site.reactor = self.clock

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def raw(self, data: bytes) -> Response:
        channel, transport = self.connect()
        channel.dataReceived(data)
        return Response(transport.value(), transport.disconnecting)

    def get(self, target: str, host: str = "mail.example.test") -> Response:
        return self.raw(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

    def post(self, target: str, body: bytes, content_type: str = "text/xml") -> Response:
        head = (f"POST {target} HTTP/1.1\r\nHost: mail.example.test\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
        return self.raw(head.encode() + body)


def autodiscover_body(address: str, schema: str = OUTLOOK_SCHEMA) -> bytes:
    from xml.sax.saxutils import escape
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
        'requestschema/2006"><Request>'
        f"<EMailAddress>{escape(address)}</EMailAddress>"
        f"<AcceptableResponseSchema>{schema}</AcceptableResponseSchema>"
        "</Request></Autodiscover>").encode()


def servers(doc: ET.Element, domain: str) -> list[tuple[str, str, str, str, str, str, str]]:
    provider = next(p for p in doc.findall("emailProvider") if p.get("id") == domain)
    return [(s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"),
             s.findtext("socketType"), s.findtext("username"), s.findtext("authentication"))
            for s in provider if s.tag in ("incomingServer", "outgoingServer")]


# -- Thunderbird -----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/.well-known/autoconfig/mail/config-v1.1.xml",
                                  "/mail/config-v1.1.xml"])
def test_thunderbird_document_for_an_address(path):
    r = Client().get(f"{path}?emailaddress=alice%40example.test")
    assert r.status == 200
    assert r.headers["content-type"].startswith("application/xml")
    doc = r.xml()
    assert doc.tag == "clientConfig" and doc.get("version") == "1.1"
    assert [p.get("id") for p in doc.findall("emailProvider")] == ["example.test"]
    assert doc.findtext("emailProvider/domain") == "example.test"
    host, user, auth = "mail.example.test", "%EMAILADDRESS%", "password-cleartext"
    assert servers(doc, "example.test") == [
        ("incomingServer", "imap", host, "993", "SSL", user, auth),
        ("incomingServer", "imap", host, "143", "STARTTLS", user, auth),
        ("incomingServer", "pop3", host, "995", "SSL", user, auth),
        ("incomingServer", "pop3", host, "110", "STARTTLS", user, auth),
        ("outgoingServer", "smtp", host, "465", "SSL", user, auth),
        ("outgoingServer", "smtp", host, "587", "STARTTLS", user, auth),
    ]


def test_thunderbird_without_address_lists_every_local_domain():
    r = Client().get("/mail/config-v1.1.xml", host="127.0.0.1:2080")
    assert r.status == 200
    assert [p.get("id") for p in r.xml().findall("emailProvider")] == sorted(LOCAL)


def test_thunderbird_without_address_uses_the_autoconfig_host_name():
    r = Client().get("/mail/config-v1.1.xml", host="autoconfig.other.test")
    assert [p.get("id") for p in r.xml().findall("emailProvider")] == ["other.test"]


def test_thunderbird_public_ports_and_names_come_from_the_autoconfig_section():
    c = Client(autoconfig={"hostname": "imap.example.net", "imaps_port": 10993,
                           "submission_port": 10587, "display_name": "ACME & Sons"},
               listen={"pop3": "", "pop3s": ""})
    doc = c.get("/mail/config-v1.1.xml?emailaddress=bob@example.test").xml()
    assert doc.findtext("emailProvider/displayName") == "ACME & Sons"
    assert [(s[1], s[2], s[3], s[4]) for s in servers(doc, "example.test")] == [
        ("imap", "imap.example.net", "10993", "SSL"),
        ("imap", "imap.example.net", "143", "STARTTLS"),
        ("smtp", "imap.example.net", "465", "SSL"),
        ("smtp", "imap.example.net", "10587", "STARTTLS"),
    ]


def test_thunderbird_unknown_domain_is_404():
    r = Client().get("/mail/config-v1.1.xml?emailaddress=alice@elsewhere.test")
    assert r.status == 404
    assert b"elsewhere" not in r.body


def test_no_local_domain_at_all_is_404():
    assert Client(domains=FakeDomains(())).get("/mail/config-v1.1.xml").status == 404


@pytest.mark.parametrize("query", ["emailaddress=", "emailaddress=alice",
                                   "emailaddress=%3Calice@example.test%3E",
                                   "emailaddress=a@example.test&emailaddress=b@example.test",
                                   "emailaddress=%FF@example.test"])
def test_thunderbird_bad_address_is_400(query):
    r = Client().get(f"/mail/config-v1.1.xml?{query}")
    assert r.status == 400
    assert b"<" not in r.body and b"alice" not in r.body


def test_head_is_answered_without_a_body():
    r = Client().raw(b"HEAD /mail/config-v1.1.xml HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 200 and r.body == b"" and int(r.headers["content-length"]) > 0


def test_unknown_paths_and_methods():
    c = Client()
    assert c.get("/").status == 404
    assert c.get("/mail/").status == 404
    assert c.get("/mail/config-v1.1.xml/extra").status == 404
    r = c.raw(b"DELETE /mail/config-v1.1.xml HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 405 and "GET" in r.headers["allow"]


# -- Outlook ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml",
                                  "/Autodiscover/Autodiscover.xml",
                                  "/AUTODISCOVER/AUTODISCOVER.XML"])
def test_autodiscover_answers_imap_and_smtp(path):
    r = Client().post(path, autodiscover_body("Alice@Example.test"))
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/xml")
    doc = r.xml()
    assert doc.tag == "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}Autodiscover"
    account = doc.find(f"{AD_NS}Response/{AD_NS}Account")
    assert account.findtext(f"{AD_NS}AccountType") == "email"
    assert account.findtext(f"{AD_NS}Action") == "settings"
    got = [(p.findtext(f"{AD_NS}Type"), p.findtext(f"{AD_NS}Server"), p.findtext(f"{AD_NS}Port"),
            p.findtext(f"{AD_NS}SSL"), p.findtext(f"{AD_NS}Encryption"),
            p.findtext(f"{AD_NS}LoginName"))
           for p in account.findall(f"{AD_NS}Protocol")]
    assert got == [("IMAP", "mail.example.test", "993", "on", "SSL", "Alice@example.test"),
                   ("SMTP", "mail.example.test", "465", "on", "SSL", "Alice@example.test")]


def test_autodiscover_falls_back_to_starttls_when_implicit_tls_is_off():
    c = Client(listen={"imaps": "", "submissions": ""})
    doc = c.post("/autodiscover/autodiscover.xml", autodiscover_body("a@example.test")).xml()
    protocols = doc.findall(f".//{AD_NS}Protocol")
    assert [(p.findtext(f"{AD_NS}Port"), p.findtext(f"{AD_NS}Encryption"))
            for p in protocols] == [("143", "TLS"), ("587", "TLS")]


def test_autodiscover_escapes_the_address():
    address = '"<b>x</b>&\'"@example.test'
    r = Client().post("/autodiscover/autodiscover.xml", autodiscover_body(address))
    assert r.status == 200
    assert b"<b>" not in r.body
    assert r.xml().find(f".//{AD_NS}LoginName").text == address


def test_autodiscover_other_schema_gets_provider_unavailable():
    body = autodiscover_body("a@example.test", schema="http://schemas.microsoft.com/exchange/"
                             "autodiscover/mobilesync/responseschema/2006")
    r = Client().post("/autodiscover/autodiscover.xml", body)
    assert r.status == 200
    assert r.xml().findtext(".//{*}ErrorCode") == "601"


@pytest.mark.parametrize("body, status", [
    (autodiscover_body("alice@elsewhere.test"), 404),
    (autodiscover_body("not an address"), 400),
    (autodiscover_body("<alice@example.test>"), 400),
    (b"", 400),
    (b"<Autodiscover><Request>", 400),
    (b"<Other><Request><EMailAddress>a@example.test</EMailAddress></Request></Other>", 400),
    (b"<Autodiscover><Request></Request></Autodiscover>", 400),
    (b"\xff\xfe garbage", 400),
    (b"<a>" * 100 + b"</a>" * 100, 400),
])
def test_autodiscover_bad_requests(body, status):
    r = Client().post("/autodiscover/autodiscover.xml", body)
    assert r.status == status
    assert r.headers["content-type"].startswith("text/plain")


def test_autodiscover_get_is_405():
    r = Client().get("/autodiscover/autodiscover.xml?x=<script>")
    assert r.status == 405 and r.headers["allow"] == "POST"
    assert b"script" not in r.body


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Autodiscover><Request><EMailAddress>&lol9;@example.test</EMailAddress></Request></Autodiscover>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Autodiscover><Request><EMailAddress>&xxe;</EMailAddress></Request></Autodiscover>
"""


@pytest.mark.parametrize("body", [BILLION_LAUGHS, EXTERNAL_ENTITY,
                                  b'<!DOCTYPE a SYSTEM "http://192.0.2.1/x.dtd"><a/>',
                                  # encodings expat cannot use: a 500 and a traceback before
                                  b'<?xml version="1.0" encoding="x-no-such-codec"?><a/>',
                                  b'<?xml version="1.0" encoding="utf-7"?><a/>',
                                  b'<?xml version="1.0" encoding="hex"?><a/>',
                                  b'<?xml version="1.0" encoding="utf-16-be"?><a/>'])
def test_dtds_and_entities_are_refused(body):
    with pytest.raises(safexml.XMLRefused):
        safexml.parse(body)
    assert Client().post("/autodiscover/autodiscover.xml", body).status == 400


def test_safexml_says_why_it_refused():
    with pytest.raises(safexml.XMLRefused, match="DOCTYPE|entit"):
        safexml.parse(b'<!DOCTYPE x [<!ENTITY a "b">]><a/>')
    with pytest.raises(safexml.XMLRefused) as deep:
        safexml.parse(b"<Autodiscover>" + b"<a>" * 40)
    assert "encoding" not in str(deep.value)


def test_safexml_keeps_namespaces_and_text():
    root = safexml.parse(b'<a xmlns="urn:x"><b>1 &amp; 2</b></a>')
    assert root.tag == "{urn:x}a" and root[0].text == "1 & 2"


def test_oversized_body_is_refused_from_its_headers():
    c = Client()
    channel, transport = c.connect()
    channel.dataReceived(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
    r = Response(transport.value(), transport.disconnecting)
    assert r.status == 400 and b"100 Continue" not in transport.value()
    assert r.headers["connection"] == "close"
    # What the client still sends is read and dropped, then the connection closes.
    for _ in range(15):
        channel.dataReceived(b"x" * 65536)
    assert not transport.disconnecting
    channel.dataReceived(b"x" * (1000000 - 15 * 65536))
    assert transport.disconnecting


def test_oversized_body_drain_is_bounded_in_time():
    c = Client()
    channel, transport = c.connect()
    channel.dataReceived(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 999999999\r\n\r\n" + b"x" * 1000)
    assert not transport.disconnecting
    c.clock.advance(DRAIN_SECONDS + 1)
    assert transport.disconnecting


def test_a_request_trickled_byte_by_byte_is_cut_off():
    """Slowloris: each byte restarted the idle timer, so a client sending one every few
    seconds held a connection slot for good.  A whole request gets REQUEST_SECONDS."""
    from mailserver.autoconfig.site import REQUEST_SECONDS
    c = Client()
    channel, transport = c.connect()
    head = (b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 60000\r\n\r\n")
    elapsed = 0.0
    for byte in head + b"x" * 100:
        channel.dataReceived(bytes([byte]))
        c.clock.advance(1.0)
        elapsed += 1.0
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert elapsed <= REQUEST_SECONDS + 1
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    # A request that arrives in time is answered and the connection kept open.
    channel, transport = c.connect()
    channel.dataReceived(b"GET /mail/config-v1.1.xml?emailaddress=alice%40example.test "
                         b"HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
    c.clock.advance(REQUEST_SECONDS + 1)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"408" not in transport.value()


def test_the_request_clock_stops_when_a_body_is_refused_or_an_answer_is_pending():
    """No 408 after the 400 of a refused body, nor in front of the answer to an earlier
    request while a pipelined one waits."""
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET
    c = Client()
    channel, transport = c.connect()
    channel.dataReceived(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\n")
    c.clock.advance(25)
    channel.dataReceived(b"Host: x\r\nContent-Length: 999999999\r\n\r\n")
    c.clock.advance(6)
    assert transport.value().count(b"HTTP/1.1 ") == 1

    pending = []

    class Slow(Resource):
        isLeaf = True

        def render_GET(self, request):
            pending.append(request)
            return NOT_DONE_YET

    c.site.resource = Slow()
    channel, transport = c.connect()
    channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    c.clock.advance(31)
    pending[0].write(b"hello")
    pending[0].finish()
    assert b"408" not in transport.value()
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_oversized_chunked_body_is_cut_off():
    c = Client()
    channel, transport = c.connect()
    channel.dataReceived(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 16384
    for _ in range(MAX_BODY // len(chunk) + 2):
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    channel.dataReceived(b"0\r\n\r\n")
    value = transport.value()
    assert value.startswith(b"HTTP/1.1 400 ") and value.count(b"HTTP/1.1") == 1


def test_body_at_the_limit_is_parsed():
    body = autodiscover_body("a@example.test")
    body += b" " * (MAX_BODY - len(body))
    assert Client().post("/autodiscover/autodiscover.xml", body).status == 200


# -- Apple -----------------------------------------------------------------------------

def test_apple_profile():
    r = Client().get("/apple/mailserver.mobileconfig?emailaddress=Alice@example.test")
    assert r.status == 200
    assert r.headers["content-type"] == "application/x-apple-aspen-config"
    profile = plistlib.loads(r.body)
    assert profile["PayloadType"] == "Configuration"
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["EmailAddress"] == "Alice@example.test"
    assert (mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"],
            mail["IncomingMailServerUseSSL"], mail["IncomingMailServerUsername"]) == \
        ("mail.example.test", 993, True, "Alice@example.test")
    assert (mail["OutgoingMailServerHostName"], mail["OutgoingMailServerPortNumber"],
            mail["OutgoingMailServerUseSSL"], mail["OutgoingMailServerUsername"]) == \
        ("mail.example.test", 465, True, "Alice@example.test")
    for p in (profile, mail):
        assert uuid.UUID(p["PayloadUUID"])
    assert profile["PayloadUUID"] != mail["PayloadUUID"]


def test_apple_payload_uuid_is_stable_and_unique_per_address():
    c = Client()

    def uuids(address: str) -> tuple[str, str]:
        p = plistlib.loads(c.get(f"/apple/mailserver.mobileconfig?emailaddress={address}").body)
        return p["PayloadUUID"], p["PayloadContent"][0]["PayloadUUID"]

    assert uuids("alice@example.test") == uuids("ALICE@Example.TEST")
    assert uuids("alice@example.test") != uuids("bob@example.test")
    other_host = Client(autoconfig={"hostname": "mx.example.test"})
    p = plistlib.loads(other_host.get(
        "/apple/mailserver.mobileconfig?emailaddress=alice@example.test").body)
    assert p["PayloadUUID"] != uuids("alice@example.test")[0]


def test_apple_escapes_the_address():
    r = Client().get('/apple/mailserver.mobileconfig?emailaddress=%22%3Cb%3E%26%22@example.test')
    assert r.status == 200 and b"<b>" not in r.body
    assert plistlib.loads(r.body)["PayloadContent"][0]["EmailAddress"] == '"<b>&"@example.test'


@pytest.mark.parametrize("query, status", [("", 400), ("?emailaddress=a@elsewhere.test", 404),
                                           ("?emailaddress=a<b>@example.test", 400)])
def test_apple_refusals(query, status):
    assert Client().get(f"/apple/mailserver.mobileconfig{query}").status == status


def test_apple_without_any_outgoing_service_is_404():
    c = Client(listen={"submission": "", "submissions": ""})
    assert c.get("/apple/mailserver.mobileconfig?emailaddress=a@example.test").status == 404


# -- plain HTTP ------------------------------------------------------------------------

def test_plain_http_serves_thunderbird_and_redirects_the_rest():
    c = Client("autoconfig_http", autoconfig={"https_port": 8443})
    assert c.get("/mail/config-v1.1.xml?emailaddress=a@example.test").status == 200
    r = c.get("/AutoDiscover/AutoDiscover.xml")
    assert r.status == 302
    assert r.headers["location"] == "https://mail.example.test:8443/autodiscover/autodiscover.xml"
    r = c.get("/apple/mailserver.mobileconfig?emailaddress=a%2Bb@example.test")
    assert r.headers["location"] == ("https://mail.example.test:8443/apple/"
                                     "mailserver.mobileconfig?emailaddress=a%2Bb%40example.test")


def test_plain_http_serves_everything_when_https_is_off():
    c = Client("autoconfig_http", listen={"autoconfig": ""})
    r = c.post("/autodiscover/autodiscover.xml", autodiscover_body("a@example.test"))
    assert r.status == 200


# -- addresses -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["alice@example.test", "a.b+c@Example.Test",
                                  '"with space"@example.test', '"<x>\\"y"@example.test',
                                  '"a@b"@example.test', "!#$%&'*+/=?^_`{|}~-@example.test",
                                  "a@b\u00fccher.example"])
def test_valid_addresses(text):
    address = parse_address(text)
    assert address.domain == address.domain.lower()


@pytest.mark.parametrize("text", ["", "alice", "@example.test", "alice@", "<alice@example.test>",
                                  'al"ice@example.test', '"unterminated@example.test',
                                  "a..b@example.test", ".a@example.test", "a b@example.test",
                                  "a@[192.0.2.1]", "a@exa_mple.test", "\u00e4@example.test",
                                  "a" * 65 + "@example.test",
                                  "a@" + ".".join(["b" * 60] * 5) + ".test"])
def test_invalid_addresses(text):
    with pytest.raises(AddressError):
        parse_address(text)


def test_address_length_limit_is_254_octets():
    domain = ".".join(["d" * 60] * 3) + ".exampl"           # 189 octets
    ok = "l" * 64 + "@" + domain                                # 254 octets
    assert len(ok) == 254 and parse_address(ok)
    with pytest.raises(AddressError):
        parse_address("l" * 64 + "@x" + domain)


# -- limits and logs -------------------------------------------------------------------

def test_connection_limit_is_shared_with_the_server():
    limiter = ConnectionLimiter(max_total=10, max_per_ip=1)
    c = Client(limiter=limiter)
    first, _ = c.connect()
    refused, transport = c.connect()
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    first.connectionLost(None)
    assert limiter.total == 0


# -- DNS ---------------------------------------------------------------------------------

def test_client_records_follow_the_config():
    config = make_config(autoconfig={"hostname": "imap.example.net", "imaps_port": 10993,
                                     "https_port": 8443}, listen={"pop3": ""})
    records = client_records(config, "Example.ORG.")
    assert records[0].startswith(";")
    rows = [line.split("\t") for line in records[1:]]
    assert ["_imaps._tcp.example.org.", "SRV", "0 1 10993 imap.example.net."] in rows
    assert ["_imap._tcp.example.org.", "SRV", "10 1 143 imap.example.net."] in rows
    assert ["_pop3s._tcp.example.org.", "SRV", "0 1 995 imap.example.net."] in rows
    assert ["_pop3._tcp.example.org.", "SRV", "0 0 0 ."] in rows
    assert ["_submissions._tcp.example.org.", "SRV", "0 1 465 imap.example.net."] in rows
    assert ["_submission._tcp.example.org.", "SRV", "10 1 587 imap.example.net."] in rows
    assert ["autoconfig.example.org.", "CNAME", "imap.example.net."] in rows
    assert ["autodiscover.example.org.", "CNAME", "imap.example.net."] in rows
    assert ["_autodiscover._tcp.example.org.", "SRV", "0 1 8443 imap.example.net."] in rows
    assert len(rows) == 9


def test_client_records_without_http_listeners_have_no_autoconfig_names():
    config = make_config(listen={"autoconfig": "", "autoconfig_http": ""})
    text = "\n".join(client_records(config, "example.org"))
    assert "autoconfig." not in text and "autodiscover" not in text
    assert "_imaps._tcp.example.org.\tSRV\t0 1 993 mail.example.test." in text


def test_client_records_refuse_a_bad_domain():
    with pytest.raises(AddressError):
        client_records(make_config(), "bad domain")


# -- config ----------------------------------------------------------------------------

@pytest.mark.parametrize("values, key", [
    ({"imaps_port": 0}, "autoconfig.imaps_port"),
    ({"https_port": "443"}, "autoconfig.https_port"),
    ({"hostname": "not a host"}, "autoconfig.hostname"),
    ({"display_name": "two\nlines"}, "autoconfig.display_name"),
    ({"display_name": "x" * 101}, "autoconfig.display_name"),
    ({"smtp_port": 25}, "autoconfig.smtp_port"),
])
def test_autoconfig_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError) as e:
        make_config(autoconfig=values)
    assert e.value.key == key


def test_autoconfig_config_defaults():
    ac = make_config().autoconfig
    assert (ac.hostname, ac.display_name, ac.imaps_port, ac.imap_port, ac.pop3s_port,
            ac.pop3_port, ac.submissions_port, ac.submission_port, ac.https_port) == \
        ("", "", None, None, None, None, None, None, None)   # None: the listener's port


@pytest.mark.parametrize("head", [
    b"GET /.well-known/autoconfig/mail/config-v1.1.xml HTTP/1.1\r\n\r\n",
    b"GET /.well-known/autoconfig/mail/config-v1.1.xml HTTP/1.1\r\nHost: a.test\r\n"
    b"Host: mail.example.test\r\n\r\n",
])
def test_http11_request_without_exactly_one_host_is_400(head):
    # RFC 9112 3.2
    response = Client().raw(head)
    assert response.status == 400
    assert b"Host" in response.body


def test_http10_request_without_host_is_served():
    response = Client().raw(b"GET /.well-known/autoconfig/mail/config-v1.1.xml HTTP/1.0\r\n\r\n")
    assert response.status == 200
