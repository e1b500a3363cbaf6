"""Thunderbird's autoconfig document, the "config-v1.1.xml" format.

https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat.  Servers are
listed most preferred first (Thunderbird tries them in order); the user name is the whole
address, which Thunderbird fills in for %EMAILADDRESS%.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from mailserver.autoconfig.settings import ClientSettings

CONTENT_TYPE = b"application/xml; charset=utf-8"


def config_v11(settings: ClientSettings, domains: Iterable[str]) -> bytes:
    """One emailProvider per domain, all served by the same host and ports."""
    root = ET.Element("clientConfig", version="1.1")
    for domain in domains:
        provider = ET.SubElement(root, "emailProvider", id=domain)
        _text(provider, "domain", domain)
        _text(provider, "displayName", settings.name_for(domain))
        _text(provider, "displayShortName", settings.name_for(domain))
        for endpoint in settings.endpoints:
            tag = "outgoingServer" if endpoint.protocol == "smtp" else "incomingServer"
            server = ET.SubElement(provider, tag, type=endpoint.protocol)
            _text(server, "hostname", settings.hostname)
            _text(server, "port", str(endpoint.port))
            _text(server, "socketType", endpoint.socket_type)
            _text(server, "authentication", "password-cleartext")
            _text(server, "username", "%EMAILADDRESS%")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _text(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text
