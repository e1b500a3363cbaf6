"""Outlook's POX autodiscover: the request it POSTs and the "outlook" response schema.

https://learn.microsoft.com/exchange/client-developer/web-service-reference/pox-autodiscover-web-service-reference-for-exchange.
The response names one incoming server (IMAP, or POP3 when IMAP is off) and one SMTP
server, each the most preferred enabled endpoint; <Encryption> (SSL or TLS, meaning
STARTTLS) overrides <SSL> in current Outlook versions, <SSL> serves the older ones.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from mailserver.autoconfig import safexml
from mailserver.autoconfig.address import Address
from mailserver.autoconfig.settings import ClientSettings, Endpoint

CONTENT_TYPE = b"text/xml; charset=utf-8"
RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


class BadRequest(ValueError):
    """The request body is not an autodiscover request; the message says why."""


@dataclass(frozen=True)
class AutodiscoverRequest:
    email_address: str
    response_schema: str   # "" when the client did not say


def parse_request(body: bytes) -> AutodiscoverRequest:
    """The EMailAddress and AcceptableResponseSchema of a request body."""
    try:
        root = safexml.parse(body)
    except safexml.XMLRefused as e:
        raise BadRequest(str(e)) from None
    if safexml.local_name(root.tag) != "Autodiscover":
        raise BadRequest("the root element is not Autodiscover")
    request = safexml.child(root, "Request")
    if request is None:
        raise BadRequest("no Request element")
    address = safexml.child(request, "EMailAddress")
    if address is None or not (address.text or "").strip():
        raise BadRequest("no EMailAddress element")
    schema = safexml.child(request, "AcceptableResponseSchema")
    return AutodiscoverRequest((address.text or "").strip(), (schema.text or "").strip()
                               if schema is not None else "")


def wants_outlook_schema(request: AutodiscoverRequest) -> bool:
    return request.response_schema in ("", OUTLOOK_NS)


def outlook_response(settings: ClientSettings, address: Address) -> bytes:
    root = ET.Element("Autodiscover", xmlns=RESPONSE_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_NS)
    account = ET.SubElement(response, "Account")
    _text(account, "AccountType", "email")
    _text(account, "Action", "settings")
    for endpoint in (settings.first("imap", "pop3"), settings.first("smtp")):
        if endpoint is not None:
            _protocol(account, settings.hostname, endpoint, str(address))
    return _serialize(root)


def provider_unavailable() -> bytes:
    """The answer for a client that accepts only schemas other than "outlook" (601)."""
    root = ET.Element("Autodiscover", xmlns=RESPONSE_NS)
    error = ET.SubElement(ET.SubElement(root, "Response"), "Error")
    _text(error, "ErrorCode", "601")
    _text(error, "Message", "Provider is not available")
    ET.SubElement(error, "DebugData")
    return _serialize(root)


def _protocol(account: ET.Element, hostname: str, endpoint: Endpoint, login: str) -> None:
    protocol = ET.SubElement(account, "Protocol")
    _text(protocol, "Type", endpoint.protocol.upper())
    _text(protocol, "Server", hostname)
    _text(protocol, "Port", str(endpoint.port))
    _text(protocol, "LoginName", login)
    _text(protocol, "DomainRequired", "off")
    _text(protocol, "SPA", "off")
    _text(protocol, "SSL", "on")
    _text(protocol, "Encryption", "SSL" if endpoint.implicit_tls else "TLS")
    _text(protocol, "AuthRequired", "on")
    if endpoint.protocol == "smtp":
        _text(protocol, "UsePOPAuth", "off")
        _text(protocol, "SMTPLast", "off")


def _serialize(root: ET.Element) -> bytes:
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _text(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text
