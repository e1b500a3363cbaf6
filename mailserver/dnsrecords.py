"""The DNS records a domain needs to publish for this server (`mailserver-admin dns`).

MX to this host, SPF allowing the MX hosts, a DMARC policy, the DKIM public key of each
selector, and what mail clients use to find the server: the RFC 6186 / RFC 8314 SRV records
and the autoconfig names, from mailserver.autoconfig.dns (public ports of [autoconfig]).
Without that module, SRV records are derived from the [listen] ports here (a service that
is switched off gets the "not offered" target ".").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailserver.dkim.keys import DKIMKey

if TYPE_CHECKING:
    from mailserver.config import Config

TXT_CHUNK = 255  # RFC 1035 3.3: one character-string holds at most 255 octets

# (SRV service label, [listen] key, priority): implicit TLS first (RFC 8314 5.1).
SRV_SERVICES = (
    ("_submissions._tcp", "submissions", 0),
    ("_submission._tcp", "submission", 10),
    ("_imaps._tcp", "imaps", 0),
    ("_imap._tcp", "imap", 10),
    ("_pop3s._tcp", "pop3s", 0),
    ("_pop3._tcp", "pop3", 10),
)


def endpoint_port(description: str) -> int | None:
    """The port of a 'tcp:587:interface=...' endpoint description, or None."""
    parts = description.split(":")
    if parts[0] not in ("tcp", "tcp6"):
        return None
    for part in parts[1:]:
        value = part[5:] if part.startswith("port=") else part
        if "=" not in value and value.isdigit():
            return int(value)
    return None


def txt_strings(value: str) -> str:
    """A TXT value as quoted character-strings of at most 255 octets each."""
    chunks = [value[i:i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"( {quoted} )" if len(chunks) > 1 else quoted


def records(config: "Config", domain: str, keys: list[DKIMKey]) -> list[str]:
    host = config.server.hostname.rstrip(".") + "."
    zone = domain.rstrip(".") + "."
    rows: list[tuple[str, str, str]] = [
        (zone, "MX", f"10 {host}"),
        (zone, "TXT", txt_strings("v=spf1 mx -all")),
        (f"_dmarc.{zone}", "TXT", txt_strings(f"v=DMARC1; p=quarantine; "
                                              f"rua=mailto:postmaster@{domain}")),
    ]
    for key in keys:
        rows.append((f"{key.selector}._domainkey.{zone}", "TXT", txt_strings(key.txt_record())))
    rows += client_rows(config, domain, host, zone)
    rows.append(sieve_row(config, zone))
    width = max(len(name) for name, _, _ in rows)
    out = [f"; DNS records for {domain}, served by {host}",
           f"; {host} needs A/AAAA records with this server's public addresses, and each",
           f"; address a PTR record naming {host} (ask the address's provider).",
           f"{host:<{width}} IN A     <public IPv4 address of this server>"]
    out += [f"{name:<{width}} IN {rtype:<5} {value}" for name, rtype, value in rows]
    if not keys:
        out.append(f"; no DKIM key for {domain}: mail from it is sent unsigned")
    return out


def sieve_row(config: "Config", zone: str) -> tuple[str, str, str]:
    """RFC 5804 1.8: where ManageSieve clients find the server (the host clients are told,
    the port [listen].managesieve listens on; "." when it is switched off)."""
    host = (config.autoconfig.hostname or config.server.hostname).rstrip(".") + "."
    descriptions = config.listen.endpoints("managesieve")
    port = endpoint_port(descriptions[0]) if descriptions else None
    return (f"_sieve._tcp.{zone}", "SRV", f"0 1 {port} {host}" if port else "0 0 0 .")


def client_rows(config: "Config", domain: str, host: str, zone: str) -> list[tuple[str, str, str]]:
    """SRV (and autoconfig) records for mail clients: (name, type, value) rows."""
    try:
        from mailserver.autoconfig.dns import client_records
    except ImportError:
        client_records = None
    if client_records is not None:
        rows = []
        for line in client_records(config, domain):
            fields = line.split("\t")
            if line.startswith(";") or len(fields) != 3:
                continue
            rows.append((fields[0], fields[1], fields[2]))
        if rows:
            return rows
    listen = config.listen.enabled()
    rows = []
    for label, service, priority in SRV_SERVICES:
        port = endpoint_port(listen.get(service, ("",))[0])
        target = f"{priority} 1 {port} {host}" if port else "0 0 0 ."
        rows.append((f"{label}.{zone}", "SRV", target))
    return rows
