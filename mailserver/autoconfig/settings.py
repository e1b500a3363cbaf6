"""What clients are told, derived once from the configuration.

The documents publish the public host and ports of [autoconfig] (the listeners may sit
behind a port mapping), but only for the services whose [listen] endpoint is switched on,
so a client is never sent to a service this server does not run.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailserver.config import Config

SSL = "SSL"            # implicit TLS from the first byte
STARTTLS = "STARTTLS"  # plain connection upgraded with STARTTLS / STLS

# (listen key, protocol, socket type, [autoconfig] port key), most preferred first:
# implicit TLS before STARTTLS, as RFC 8314 recommends.
_SERVICES = (
    ("imaps", "imap", SSL, "imaps_port"),
    ("imap", "imap", STARTTLS, "imap_port"),
    ("pop3s", "pop3", SSL, "pop3s_port"),
    ("pop3", "pop3", STARTTLS, "pop3_port"),
    ("submissions", "smtp", SSL, "submissions_port"),
    ("submission", "smtp", STARTTLS, "submission_port"),
)


@dataclass(frozen=True)
class Endpoint:
    """One service a client may use: protocol, public port, how TLS starts."""

    service: str      # the [listen] key, e.g. "imaps"
    protocol: str     # "imap", "pop3" or "smtp"
    port: int
    socket_type: str  # SSL or STARTTLS

    @property
    def implicit_tls(self) -> bool:
        return self.socket_type == SSL


@dataclass(frozen=True)
class ClientSettings:
    hostname: str
    display_name: str                  # "" = name each domain after itself
    https_port: int
    https_enabled: bool                # [listen].autoconfig is switched on
    endpoints: tuple[Endpoint, ...]    # enabled services, most preferred first
    disabled: tuple[Endpoint, ...]     # services switched off in [listen]

    @classmethod
    def from_config(cls, config: Config) -> ClientSettings:
        ac = config.autoconfig
        enabled = config.listen.enabled()
        on: list[Endpoint] = []
        off: list[Endpoint] = []
        for service, protocol, socket_type, port_key in _SERVICES:
            endpoint = Endpoint(service, protocol, getattr(ac, port_key), socket_type)
            (on if service in enabled else off).append(endpoint)
        return cls(hostname=ac.hostname or config.server.hostname,
                   display_name=ac.display_name,
                   https_port=ac.https_port,
                   https_enabled="autoconfig" in enabled,
                   endpoints=tuple(on), disabled=tuple(off))

    def name_for(self, domain: str) -> str:
        return self.display_name or domain

    def of(self, protocol: str) -> tuple[Endpoint, ...]:
        """The enabled endpoints of one protocol, most preferred first."""
        return tuple(e for e in self.endpoints if e.protocol == protocol)

    def first(self, *protocols: str) -> Endpoint | None:
        """The most preferred enabled endpoint of the first protocol that has one."""
        for protocol in protocols:
            found = self.of(protocol)
            if found:
                return found[0]
        return None

    def https_url(self, path: str) -> str:
        """Absolute URL of `path` on the public HTTPS service."""
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{self.hostname}{port}{path}"
