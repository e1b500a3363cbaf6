"""What clients are told, derived once from the configuration.

The documents publish, for the services whose [listen] endpoint is switched on (a client
is never sent to a service this server does not run), the port that endpoint listens on,
or the public port of [autoconfig] where one is set (a listener behind a port mapping).
An endpoint without a TCP port of its own (a systemd or UNIX socket behind a proxy) is
announced on the service's standard port.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailserver.config import Config
from mailserver.listening import tcp_address

# The IANA ports (RFC 8314 for 465), for endpoints whose description names no TCP port.
STANDARD_PORTS = {"imaps": 993, "imap": 143, "pop3s": 995, "pop3": 110, "submissions": 465,
                  "submission": 587, "autoconfig": 443, "autoconfig_http": 80}

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


def public_port(config: Config, service: str, configured: int | None) -> int:
    """The port clients are told for `service`: the [autoconfig] key when set, else the
    port of the service's first TCP endpoint, else the standard port."""
    if configured is not None:
        return configured
    for description in config.listen.endpoints(service):
        address = tcp_address(description)
        if address is not None and address.port:
            return address.port
    return STANDARD_PORTS[service]


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
            port = public_port(config, service, getattr(ac, port_key))
            endpoint = Endpoint(service, protocol, port, socket_type)
            (on if service in enabled else off).append(endpoint)
        return cls(hostname=ac.hostname or config.server.hostname,
                   display_name=ac.display_name,
                   https_port=public_port(config, "autoconfig", ac.https_port),
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
