"""The DNS records that let mail clients find this server (for `mailserver-admin dns`).

RFC 6186 SRV records for IMAP, POP3 and submission (RFC 8314 adds _submissions), with
implicit TLS preferred (priority 0 before 10) and the "." target of RFC 6186 section 3.4
for a service this server does not run; the autoconfig.<domain> and autodiscover.<domain>
names Thunderbird and Outlook try; and Outlook's _autodiscover._tcp SRV record.  Hosts and
ports are the public ones of [autoconfig], as the documents served over HTTP say.
"""

from __future__ import annotations

from mailserver.addresses import normalize_domain
from mailserver.autoconfig.settings import SSL, ClientSettings, Endpoint
from mailserver.config import Config

_SRV_NAMES = {"imaps": "_imaps", "imap": "_imap", "pop3s": "_pop3s", "pop3": "_pop3",
              "submissions": "_submissions", "submission": "_submission"}


def client_records(config: Config, domain: str) -> list[str]:
    """Zone-file lines (absolute names, no TTL) to publish for `domain`.

    The first line is a comment.  Raises mailserver.addresses.AddressError (a ValueError)
    for a malformed domain.
    """
    settings = ClientSettings.from_config(config)
    domain = normalize_domain(domain.rstrip("."))
    target = settings.hostname.lower().rstrip(".") + "."
    lines = ["; mail client autoconfiguration (RFC 6186 SRV, Thunderbird, Outlook)"]
    published = sorted(settings.endpoints + settings.disabled,
                       key=lambda e: list(_SRV_NAMES).index(e.service))
    for endpoint in published:
        lines.append(_srv_line(endpoint, domain, target, endpoint in settings.endpoints))
    listen = config.listen.enabled()
    if "autoconfig" in listen or "autoconfig_http" in listen:
        for label in ("autoconfig", "autodiscover"):
            name = f"{label}.{domain}."
            if name != target:
                lines.append(f"{name}\tCNAME\t{target}")
        lines.append(f"_autodiscover._tcp.{domain}.\tSRV\t0 1 {settings.https_port} {target}")
    return lines


def _srv_line(endpoint: Endpoint, domain: str, target: str, enabled: bool) -> str:
    name = f"{_SRV_NAMES[endpoint.service]}._tcp.{domain}."
    if not enabled:
        return f"{name}\tSRV\t0 0 0 ."
    priority = 0 if endpoint.socket_type == SSL else 10
    return f"{name}\tSRV\t{priority} 1 {endpoint.port} {target}"
