"""What ACME asks for, derived from the configuration: the CA, the challenge type and the
names.  Shared by the server (mailserver.acme_service) and `mailserver-admin check`."""

from __future__ import annotations

from typing import Iterable

from mailserver.acme_client import HTTP01, TLS_ALPN01, AcmeNames, AcmeSettings
from mailserver.config import Config

# The listener each challenge type is answered on.
CHALLENGE_LISTENERS = {HTTP01: "autoconfig_http", TLS_ALPN01: "autoconfig"}


def challenge_type(config: Config) -> str:
    """The configured type; "auto" is http-01 when plain HTTP listens, else tls-alpn-01
    (config validation made sure one of them is there)."""
    chosen = config.tls.acme_challenge
    if chosen != "auto":
        return chosen
    return HTTP01 if "autoconfig_http" in config.listen.enabled() else TLS_ALPN01


def acme_settings(config: Config) -> AcmeSettings | None:
    """None when ACME is off."""
    tls = config.tls
    if not tls.acme_directory:
        return None
    return AcmeSettings(directory=tls.acme_directory, email=tls.acme_email,
                        ca_bundle=tls.acme_ca_bundle, challenge=challenge_type(config),
                        store=config.acme_dir, renew_before=tls.acme_renew_before,
                        shared=config.storage.shared)


def acme_names(config: Config, local_domains: Iterable[str]) -> AcmeNames:
    """[tls].acme_domains when set (every one required); otherwise the host name, the
    public autoconfig host name, and autoconfig.<domain> / autodiscover.<domain> of each
    local domain when an autoconfig listener is on (the names `mailserver-admin dns`
    publishes for mail clients, answered by the same listeners)."""
    hostname = config.server.hostname.lower().rstrip(".")
    if config.tls.acme_domains:
        names = _unique([hostname, *config.tls.acme_domains]
                        if hostname in config.tls.acme_domains else config.tls.acme_domains)
        return AcmeNames(names, frozenset(names))
    wanted = [hostname]
    if config.autoconfig.hostname:
        wanted.append(config.autoconfig.hostname.lower())
    listen = config.listen.enabled()
    if "autoconfig" in listen or "autoconfig_http" in listen:
        for domain in sorted(d.lower().rstrip(".") for d in local_domains):
            wanted += [f"autoconfig.{domain}", f"autodiscover.{domain}"]
    return AcmeNames(_unique(wanted), frozenset({hostname}))


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def describe(config: Config, local_domains: Iterable[str]) -> str:
    """One line for `mailserver-admin check`."""
    settings = acme_settings(config)
    if settings is None:
        return "off"
    names = acme_names(config, local_domains)
    listener = CHALLENGE_LISTENERS[settings.challenge]
    port = 80 if settings.challenge == HTTP01 else 443   # where the CA connects
    shared = f"; store shared by every node: {settings.store}" if settings.shared else ""
    return (f"on: {settings.directory}, {settings.challenge} on listen.{listener} "
            f"(the CA connects to port {port}), for {', '.join(names.names)}{shared}")
