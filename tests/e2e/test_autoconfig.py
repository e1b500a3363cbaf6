"""Mail client autoconfiguration against the real twistd process, with curl and urllib.

One server (module scope) answers every request: Thunderbird's config-v1.1.xml, Outlook's
autodiscover and Apple's profile over HTTPS, the plain-HTTP listener, and the request
variants that must be refused.  Each document is parsed and checked against the config
the server was started with, and the log must show no server error afterwards.
"""

from __future__ import annotations

import plistlib
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from harness import (DOMAIN, ServerProcess, port_is_listening, requires_tool,
                     tls_client_context)

# Public ports as [autoconfig] announces them: deliberately not the listening ports, as
# behind a port mapping.
PUBLIC = {"hostname": "imap.example.test", "display_name": "Example & <Co>",
          "imaps_port": 10993, "imap_port": 10143, "pop3s_port": 10995, "pop3_port": 10110,
          "submissions_port": 10465, "submission_port": 10587, "https_port": 10443}
AD_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
OUTLOOK_SCHEMA = AD_NS[1:-1]
SERVER_ERRORS = re.compile(r"Traceback|Unhandled Error|Internal Server Error|processingFailed"
                           r"|\b500\b")


@pytest.fixture(scope="module")
def ac_server(tmp_path_factory: pytest.TempPathFactory, accounts_template):
    srv = ServerProcess(tmp_path_factory.mktemp("autoconfig"), {"autoconfig": PUBLIC})
    if accounts_template is None:
        srv.create_accounts()
    else:
        srv.copy_state_from(accounts_template)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def srv(ac_server: ServerProcess):
    """The shared server; after each test its log must show no server error."""
    mark = len(ac_server.log_text())
    yield ac_server
    new = ac_server.log_text()[mark:]
    assert not SERVER_ERRORS.search(new), f"server error in the log:\n{new[-4000:]}"


def https(srv: ServerProcess, path: str) -> str:
    return f"https://127.0.0.1:{srv.ports['autoconfig']}{path}"


def http(srv: ServerProcess, path: str) -> str:
    return f"http://127.0.0.1:{srv.ports['autoconfig_http']}{path}"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
          ) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) with urllib; error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=tls_client_context()), NoRedirect())
    try:
        with opener.open(request, timeout=15) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def curl(url: str, *args: str) -> tuple[int, str, bytes]:
    """(status, content type, body) with curl -k."""
    exe = requires_tool("curl")
    cp = subprocess.run([exe, "-sS", "-k", "--max-time", "15", "-o", "-", "-w",
                         "\n%{http_code} %{content_type}", *args, url],
                        capture_output=True, timeout=30)
    assert cp.returncode == 0, f"curl failed ({cp.returncode}): {cp.stderr.decode()}"
    body, _, trailer = cp.stdout.rpartition(b"\n")
    code, _, ctype = trailer.decode().partition(" ")
    return int(code), ctype, body


def autodiscover_body(address: str) -> bytes:
    return ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover xmlns="http://schemas.'
            'microsoft.com/exchange/autodiscover/outlook/requestschema/2006"><Request>'
            f"<EMailAddress>{escape(address)}</EMailAddress><AcceptableResponseSchema>"
            f"{OUTLOOK_SCHEMA}</AcceptableResponseSchema></Request></Autodiscover>").encode()


def check_thunderbird(body: bytes, domains: list[str]) -> None:
    doc = ET.fromstring(body)
    assert doc.tag == "clientConfig" and doc.get("version") == "1.1"
    providers = doc.findall("emailProvider")
    assert [p.get("id") for p in providers] == domains
    for provider in providers:
        assert provider.findtext("domain") == provider.get("id")
        assert provider.findtext("displayName") == PUBLIC["display_name"]
        got = [(s.tag, s.get("type"), s.findtext("hostname"), int(s.findtext("port")),
                s.findtext("socketType"), s.findtext("username"), s.findtext("authentication"))
               for s in provider if s.tag.endswith("Server")]
        host, user, auth = PUBLIC["hostname"], "%EMAILADDRESS%", "password-cleartext"
        assert got == [
            ("incomingServer", "imap", host, PUBLIC["imaps_port"], "SSL", user, auth),
            ("incomingServer", "imap", host, PUBLIC["imap_port"], "STARTTLS", user, auth),
            ("incomingServer", "pop3", host, PUBLIC["pop3s_port"], "SSL", user, auth),
            ("incomingServer", "pop3", host, PUBLIC["pop3_port"], "STARTTLS", user, auth),
            ("outgoingServer", "smtp", host, PUBLIC["submissions_port"], "SSL", user, auth),
            ("outgoingServer", "smtp", host, PUBLIC["submission_port"], "STARTTLS", user, auth),
        ]


def check_autodiscover(body: bytes, login: str) -> None:
    doc = ET.fromstring(body)
    assert doc.tag == "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}Autodiscover"
    account = doc.find(f"{AD_NS}Response/{AD_NS}Account")
    assert account is not None, body.decode()
    assert account.findtext(f"{AD_NS}AccountType") == "email"
    got = [(p.findtext(f"{AD_NS}Type"), p.findtext(f"{AD_NS}Server"), int(p.findtext(f"{AD_NS}Port")),
            p.findtext(f"{AD_NS}SSL"), p.findtext(f"{AD_NS}Encryption"),
            p.findtext(f"{AD_NS}LoginName"), p.findtext(f"{AD_NS}AuthRequired"))
           for p in account.findall(f"{AD_NS}Protocol")]
    host = PUBLIC["hostname"]
    assert got == [("IMAP", host, PUBLIC["imaps_port"], "on", "SSL", login, "on"),
                   ("SMTP", host, PUBLIC["submissions_port"], "on", "SSL", login, "on")]


def check_profile(body: bytes, address: str) -> dict:
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration"
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAddress"] == address
    assert (mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"],
            mail["IncomingMailServerUseSSL"], mail["IncomingMailServerUsername"]) == \
        (PUBLIC["hostname"], PUBLIC["imaps_port"], True, address)
    assert (mail["OutgoingMailServerHostName"], mail["OutgoingMailServerPortNumber"],
            mail["OutgoingMailServerUseSSL"], mail["OutgoingMailServerUsername"]) == \
        (PUBLIC["hostname"], PUBLIC["submissions_port"], True, address)
    uuid.UUID(profile["PayloadUUID"])
    return profile


# -- the documents -------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/.well-known/autoconfig/mail/config-v1.1.xml",
                                  "/mail/config-v1.1.xml"])
def test_thunderbird_with_curl(srv, path):
    code, ctype, body = curl(https(srv, f"{path}?emailaddress=alice%40{DOMAIN}"))
    assert code == 200 and ctype.startswith("application/xml")
    check_thunderbird(body, [DOMAIN])


def test_thunderbird_with_urllib_without_address_and_over_plain_http(srv):
    code, _, body = fetch(https(srv, "/mail/config-v1.1.xml"))
    assert code == 200
    check_thunderbird(body, [DOMAIN])  # every local domain; the template has one
    code, _, body = fetch(http(srv, "/mail/config-v1.1.xml?emailaddress=bob@example.test"),
                          headers={"Host": f"autoconfig.{DOMAIN}"})
    assert code == 200
    check_thunderbird(body, [DOMAIN])


def test_https_uses_the_servers_certificate(srv):
    served = ssl.get_server_certificate(("127.0.0.1", srv.ports["autoconfig"]))
    on_disk = (srv.state_dir / "tls" / "cert.pem").read_text()
    first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", on_disk, re.S)
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(first.group(0))


@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml",
                                  "/Autodiscover/Autodiscover.xml",
                                  "/AutoDiscover/AutoDiscover.xml"])
def test_autodiscover_with_urllib(srv, path):
    code, headers, body = fetch(https(srv, path), data=autodiscover_body("alice@example.test"),
                                headers={"Content-Type": "text/xml"})
    assert code == 200 and headers["content-type"].startswith("text/xml")
    check_autodiscover(body, "alice@example.test")


def test_autodiscover_with_curl(srv):
    code, ctype, body = curl(https(srv, "/Autodiscover/Autodiscover.xml"),
                             "-H", "Content-Type: text/xml",
                             "--data-binary", autodiscover_body("Bob@Example.TEST").decode())
    assert code == 200 and ctype.startswith("text/xml")
    check_autodiscover(body, "Bob@example.test")


def test_apple_profile_with_curl_and_urllib(srv):
    url = https(srv, "/apple/mailserver.mobileconfig?emailaddress=alice@example.test")
    code, ctype, body = curl(url)
    assert code == 200 and ctype == "application/x-apple-aspen-config"
    first = check_profile(body, "alice@example.test")
    code, headers, body = fetch(url)
    assert code == 200 and headers["content-type"] == "application/x-apple-aspen-config"
    again = check_profile(body, "alice@example.test")
    assert again["PayloadUUID"] == first["PayloadUUID"]
    code, _, body = fetch(https(srv, "/apple/mailserver.mobileconfig?emailaddress=bob@example.test"))
    assert check_profile(body, "bob@example.test")["PayloadUUID"] != first["PayloadUUID"]


def test_plain_http_redirects_outlook_to_https(srv):
    code, headers, _ = fetch(http(srv, "/autodiscover/autodiscover.xml"))
    assert code == 302
    assert headers["location"] == (f"https://{PUBLIC['hostname']}:{PUBLIC['https_port']}"
                                   "/autodiscover/autodiscover.xml")


# -- what must be refused, and what must not be revealed ------------------------------------

def test_unknown_domain_is_404_everywhere(srv):
    other = "alice@elsewhere.test"
    assert fetch(https(srv, f"/mail/config-v1.1.xml?emailaddress={other}"))[0] == 404
    assert curl(https(srv, f"/apple/mailserver.mobileconfig?emailaddress={other}"))[0] == 404
    code, _, body = fetch(https(srv, "/autodiscover/autodiscover.xml"),
                          data=autodiscover_body(other))
    assert code == 404 and b"elsewhere" not in body


def test_answers_do_not_reveal_whether_a_user_exists(srv):
    def answers(address: str) -> tuple:
        tb = fetch(https(srv, f"/mail/config-v1.1.xml?emailaddress={address}"))
        ad = fetch(https(srv, "/autodiscover/autodiscover.xml"), data=autodiscover_body(address))
        return tb[0], tb[2], ad[0], ad[2].replace(address.encode(), b"ADDRESS")

    assert answers("alice@example.test") == answers("nobody@example.test")


def test_malformed_xml_and_xml_bomb_are_400(srv):
    url = https(srv, "/autodiscover/autodiscover.xml")
    for body in (b"<Autodiscover><Request>", b"not xml at all", b"",
                 b"<Autodiscover><Request><EMailAddress>&undefined;</EMailAddress>"
                 b"</Request></Autodiscover>"):
        assert fetch(url, data=body)[0] == 400, body
    entities = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    bomb = (f'<?xml version="1.0"?><!DOCTYPE Autodiscover [<!ENTITY l0 "lol">{entities}]>'
            "<Autodiscover><Request><EMailAddress>&l9;</EMailAddress></Request>"
            "</Autodiscover>").encode()
    started = time.monotonic()
    code, _, _ = curl(url, "-H", "Content-Type: text/xml", "--data-binary", bomb.decode())
    assert code == 400 and time.monotonic() - started < 5
    assert fetch(url, data=bomb)[0] == 400


def test_one_megabyte_body_is_refused(srv, tmp_path: Path):
    url = https(srv, "/autodiscover/autodiscover.xml")
    big = autodiscover_body("alice@example.test") + b" " * 1_000_000
    code, _, body = fetch(url, data=big, headers={"Content-Type": "text/xml"})
    assert code == 400 and b"larger than" in body
    path = tmp_path / "big.xml"
    path.write_bytes(big)
    for extra in ((), ("-H", "Expect:"), ("-H", "Transfer-Encoding: chunked")):
        code, _, body = curl(url, "-H", "Content-Type: text/xml", *extra,
                             "--data-binary", f"@{path}")
        assert code == 400 and b"larger than" in body, extra
    assert fetch(https(srv, "/mail/config-v1.1.xml"))[0] == 200  # still serving


def test_addresses_with_quotes_and_angle_brackets(srv):
    quoted = '"<b>x</b>"@example.test'   # a valid RFC 5321 quoted local part
    code, _, body = fetch(https(srv, "/autodiscover/autodiscover.xml"),
                          data=autodiscover_body(quoted))
    assert code == 200 and b"<b>" not in body
    check_autodiscover(body, quoted)
    query = urllib.parse.urlencode({"emailaddress": quoted})
    code, _, body = fetch(https(srv, f"/apple/mailserver.mobileconfig?{query}"))
    assert code == 200 and b"<b>" not in body
    check_profile(body, quoted)
    for bad in ("<alice@example.test>", 'al"ice@example.test', '"<script>@example.test',
                "alice<script>@example.test"):
        query = urllib.parse.urlencode({"emailaddress": bad})
        for path in ("/mail/config-v1.1.xml", "/apple/mailserver.mobileconfig"):
            code, _, body = fetch(https(srv, f"{path}?{query}"))
            assert code == 400 and b"<" not in body, (bad, path)
        code, _, body = fetch(https(srv, "/autodiscover/autodiscover.xml"),
                              data=autodiscover_body(bad))
        assert code == 400 and b"<" not in body, bad
    long_address = "a" * 64 + "@" + "b" * 186 + ".test"   # 256 octets
    assert fetch(https(srv, f"/mail/config-v1.1.xml?emailaddress={long_address}"))[0] == 400


def test_empty_listen_values_disable_both_listeners(make_server):
    srv = make_server(accounts=False, listen={"autoconfig": "", "autoconfig_http": ""})
    assert port_is_listening(srv.smtp_port)
    assert not port_is_listening(srv.ports["autoconfig"])
    assert not port_is_listening(srv.ports["autoconfig_http"])
