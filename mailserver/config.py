"""Load and validate the TOML configuration into frozen dataclasses.

Every key is known here: an unknown key or a bad value is a `ConfigError` that names the
key, raised before anything listens, so an operator's typo never silently falls back to a
default.  Relative paths are relative to the directory holding the config file.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

# The shipped config in a source checkout.  An installed package has no etc/ beside it, so
# the default is looked up from the working directory first (see default_config_path).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "mailserver.toml"
# [storage] shared: <maildir_root>/.mailserver holds what the nodes share besides mail.
SHARED_DIR_NAME = ".mailserver"


def default_config_path() -> Path:
    """etc/mailserver.toml in the working directory, else the checkout's shipped one."""
    here = Path.cwd() / "etc" / "mailserver.toml"
    if here.is_file() or not DEFAULT_CONFIG.is_file():
        return here
    return DEFAULT_CONFIG


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


# -- value parsers ---------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
               "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4,
               "TB": 1024**4, "TIB": 1024**4}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_SIZE = 2**63 - 1              # bytes: SQLite's largest integer
MAX_DURATION = 10 * 365 * 86400.0  # seconds


class SizeTooLarge(ValueError):
    """A size past MAX_SIZE."""


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '50M', '1.5G', '2048'."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, float):
        # TOML 1.5 is a float: a size of 1.5 bytes was 1 byte without a word
        if not value.is_integer():
            raise ValueError(f"not a size: {value!r} (use bytes or a string such as '1.5M')")
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use bytes or a number with K, M, G, T)")
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
        size = int(number) if math.isfinite(number) else MAX_SIZE + 1
    if size > MAX_SIZE:
        raise SizeTooLarge(f"size too large: {value!r}")
    return size


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string such as '300', '5m', '4h', '5d'."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds < 0:
            raise ValueError("duration must not be negative")
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
        if not m:
            raise ValueError(f"not a duration: {value!r} (use seconds or a number with s, "
                             f"m, h, d, w)")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    # nan and inf pass every comparison with a limit wrongly (nan made each SMTP
    # connection fail an assertion); ten years is more than any setting needs
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"not a usable duration: {value!r}")
    return seconds


# -- sections ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    state_dir: Path = Path("var")


@dataclass(frozen=True)
class StorageConfig:
    maildir_root: Path = Path("maildirs")
    # Other server nodes use the same root (NFS, CephFS): indexes move to state_dir and
    # mod-sequences come from a change log in each folder (mailserver.maildir.shared_folder).
    shared: bool = False


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = ""
    private_key: str = ""
    reload_interval: float = 60.0    # how often certificate files are checked for a change
    # ACME (mailserver.acme_service): "" = off, else the CA's directory URL.
    acme_directory: str = ""
    acme_email: str = ""
    acme_domains: tuple[str, ...] = ()   # () = server.hostname and the autoconfig names
    acme_ca_bundle: str = ""             # trust anchors for the CA's HTTPS; "" = the system's
    acme_challenge: str = "auto"         # auto | http-01 | tls-alpn-01
    acme_renew_before: float = 30 * 86400.0


# A [listen] value: one Twisted endpoint description ("" switches the service off), or a
# list of them (a tuple here; [] switches it off), every one served by the same factory.
Endpoints = str | tuple[str, ...]


@dataclass(frozen=True)
class ListenConfig:
    smtp: Endpoints = "tcp:2525"
    submission: Endpoints = "tcp:2587"
    submissions: Endpoints = "tcp:2465"
    imap: Endpoints = "tcp:2143"
    imaps: Endpoints = "tcp:2993"
    pop3: Endpoints = "tcp:2110"
    pop3s: Endpoints = "tcp:2995"
    autoconfig: Endpoints = "tcp:2443"       # HTTPS: Thunderbird, Outlook, Apple
    autoconfig_http: Endpoints = "tcp:2080"  # plain HTTP for autoconfig.<domain> lookups
    managesieve: Endpoints = "tcp:24190"     # ManageSieve (RFC 5804), STARTTLS
    metrics: Endpoints = ""                  # Prometheus GET /metrics (plain HTTP); off

    def endpoints(self, name: str) -> tuple[str, ...]:
        """The endpoint descriptions of one service; () when it is switched off."""
        value = getattr(self, name)
        if isinstance(value, str):
            return (value,) if value else ()
        return tuple(value)

    def enabled(self) -> dict[str, tuple[str, ...]]:
        """Service name -> its endpoint descriptions, for the services that are switched on."""
        return {f.name: self.endpoints(f.name) for f in fields(self) if self.endpoints(f.name)}

    def keyed(self) -> list[tuple[str, str]]:
        """(config key, description) of every endpoint: 'listen.smtp', or 'listen.smtp[1]'
        for the second element of a list; what error messages name."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                if value:
                    out.append((f"listen.{f.name}", value))
            else:
                out.extend((f"listen.{f.name}[{i}]", d) for i, d in enumerate(value))
        return out


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_line_length: int = 65536
    max_command_length: int = 4096
    idle_timeout: float = 300.0
    max_connections: int = 2000
    max_connections_per_ip: int = 200
    auth_failure_delay_after: int = 3
    auth_failures_per_connection: int = 3
    auth_failure_window: float = 900.0
    # Submission only, per authenticated user.
    submission_max_recipients: int = 100
    messages_per_hour: int = 500
    # MX abuse (RFC 5321 leaves these to the server): RCPT commands per session, duplicates
    # and refused ones counted, and commands answered with an error per session; past
    # either the client gets 421 and is disconnected.
    max_rcpt_commands: int = 1000
    max_command_errors: int = 20


@dataclass(frozen=True)
class AuthConfig:
    # Accept credentials without TLS from loopback clients only; for local testing.
    allow_plaintext_loopback: bool = False
    # How long a verified login is remembered (a keyed hash, in memory only), so that
    # repeated logins skip argon2id; 0: verify every time (mailserver.auth.VerifiedLogins).
    login_cache_ttl: float = 300.0


@dataclass(frozen=True)
class AccountsConfig:
    """Where domains, users and aliases live (mailserver.accounts.open_accounts): "" is
    SQLite in state_dir; a postgresql:// URL is a database several nodes share.  While it
    is unreachable for longer than `fail_closed_after`, logins and RCPT fail closed."""

    url: str = field(default="", repr=False)   # may hold a password: see display_url
    fail_closed_after: float = 30.0


SMARTHOST_TLS_MODES = ("starttls", "tls", "none")


@dataclass(frozen=True)
class RelayConfig:
    """How remote mail leaves: MX lookup and port 25, or one smart host."""

    smarthost: str = ""                    # "host:port" or "[v6addr]:port"; "" = MX delivery
    smarthost_tls: str = "starttls"        # starttls | tls (implicit) | none
    smarthost_username: str = ""
    smarthost_password: str = field(default="", repr=False)
    smarthost_password_file: str = ""
    port: int = 25                          # the port of MX hosts
    resolver: str = ""                      # "ip[:port]" of a DNS server; "" = resolv.conf
    tls_required_domains: tuple[str, ...] = ()
    ca_file: str = ""                       # trust anchors (PEM); "" = the system store
    connect_timeout: float = 30.0
    timeout: float = 300.0                  # per reply (RFC 5321 4.5.3.2 uses 2-10 minutes)

    @property
    def smarthost_address(self) -> tuple[str, int] | None:
        return split_host_port(self.smarthost) if self.smarthost else None

    @property
    def resolver_address(self) -> tuple[str, int] | None:
        if not self.resolver:
            return None
        host, port = split_host_port(self.resolver, default_port=53)
        return host, port


@dataclass(frozen=True)
class QueueConfig:
    retry_schedule: tuple[float, ...] = (300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_age: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0      # 0: no delay warnings
    concurrency: int = 20                   # messages being delivered at the same time


RSPAMD_FAILURE_MODES = ("accept", "tempfail")
MAX_GREET_DELAY = 30.0   # seconds; clients wait 5 minutes for a banner, people less


@dataclass(frozen=True)
class InboundConfig:
    """What the MX checks in mail from the internet (mailserver.inbound)."""

    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    dmarc_enforce: bool = True           # apply p=reject / p=quarantine; false: only record
    arc: bool = True
    trusted_arc_sealers: tuple[str, ...] = ()   # ARC sealers whose pass overrides DMARC
    rspamd_url: str = ""                 # "http://127.0.0.1:11333"; "" = no spam filter
    rspamd_timeout: float = 15.0
    rspamd_failure: str = "accept"       # accept | tempfail, when rspamd does not answer
    dnsbl: tuple[str, ...] = ()          # DNS blocklist zones, checked at connection
    greet_delay: float = 1.0             # seconds before the banner; talking first is refused
    junk_folder: str = "Junk"            # where spam and DMARC quarantine go
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # skip every check
    psl_file: str = ""                   # a newer public_suffix_list.dat; "" = the packaged one

    @property
    def networks(self) -> tuple[Any, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.trusted_networks)


@dataclass(frozen=True)
class SieveConfig:
    """Filtering at delivery (mailserver.sieve) and ManageSieve's limits.

    Users' scripts live in their Maildir in Pigeonhole's layout (sieve/NAME.sieve, the
    active one linked as .dovecot.sieve).  `before` and `after`: administrator scripts
    run around every user's (Pigeonhole's sieve_before / sieve_after); `global_dir`:
    what `include :global` reads.
    """

    enabled: bool = True                 # false: no script runs at delivery
    before: tuple[str, ...] = ()         # script paths, run in order before the user's
    after: tuple[str, ...] = ()          # run after the user's (when it did not stop)
    global_dir: str = ""                 # `include :global "name"`; "" = none
    max_script_size: int = 64 * 1024     # bytes per script (PUTSCRIPT refuses larger)
    max_scripts: int = 20                # scripts per user
    quota: int = 1024 * 1024             # bytes of scripts per user (HAVESPACE)
    max_actions: int = 32                # actions one evaluation may take
    max_redirects: int = 4               # redirects per message
    max_include_depth: int = 10          # nested includes (RFC 6609 3.2 leaves it to us)
    max_cpu_time: float = 2.0            # seconds of evaluation per message; then INBOX
    vacation_min_period: float = 86400.0     # :days / :seconds below this are raised to it
    vacation_max_period: float = 90 * 86400.0


@dataclass(frozen=True)
class FiltersConfig:
    """Python delivery filters (IDeliveryFilter plugins, mailserver.filters): only the
    plugins named here run, in this order; one that fails or takes longer than `timeout`
    is skipped for that message (delivered as if it were absent)."""

    plugins: tuple[str, ...] = ()
    timeout: float = 10.0


@dataclass(frozen=True)
class AutoconfigConfig:
    """What mail clients are told: the public host and ports.  A port left unset is the
    port its [listen] endpoint listens on; set it only when clients reach the service
    through a port mapping (mailserver.autoconfig.settings)."""

    hostname: str = ""              # "" = [server].hostname
    display_name: str = ""          # organisation name shown by clients; "" = the mail domain
    imaps_port: int | None = None
    imap_port: int | None = None
    pop3s_port: int | None = None
    pop3_port: int | None = None
    submissions_port: int | None = None
    submission_port: int | None = None
    https_port: int | None = None   # where [listen].autoconfig is reached (_autodiscover SRV)


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    storage: StorageConfig
    tls: TLSConfig
    listen: ListenConfig
    limits: LimitsConfig
    auth: AuthConfig
    relay: RelayConfig = field(default_factory=RelayConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    autoconfig: AutoconfigConfig = field(default_factory=AutoconfigConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    sieve: SieveConfig = field(default_factory=SieveConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    accounts: AccountsConfig = field(default_factory=AccountsConfig)

    @property
    def state_dir(self) -> Path:
        return self.server.state_dir

    @property
    def maildir_root(self) -> Path:
        return self.storage.maildir_root

    @property
    def accounts_db(self) -> Path:
        return self.server.state_dir / "accounts.sqlite3"

    @property
    def queue_dir(self) -> Path:
        return self.server.state_dir / "queue"

    @property
    def shared_dir(self) -> Path:
        """What every node of a shared Maildir root uses alike (DKIM keys, the ACME
        store): a directory no mailbox path can name, since domains never start with "."."""
        return self.storage.maildir_root / SHARED_DIR_NAME

    @property
    def dkim_dir(self) -> Path:
        if self.storage.shared:   # every node signs with the same keys
            return self.shared_dir / "dkim"
        return self.server.state_dir / "dkim"

    @property
    def acme_dir(self) -> Path:
        if self.storage.shared:   # one account, one certificate for every node
            return self.shared_dir / "acme"
        return self.server.state_dir / "acme"


# -- validation ----------------------------------------------------------------------------

def _expect(kind: type | tuple[type, ...], what: str) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(key, f"expected {what}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(key, f"expected {what}, got {value!r}")
        return value
    return check


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"expected a positive integer, got {value!r}")
    return value


def _nonneg_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"expected a non-negative integer, got {value!r}")
    return value


def _size(key: str, value: Any) -> int:
    try:
        size = parse_size(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None
    if size <= 0:
        raise ConfigError(key, "must be positive")
    return size


def _duration(key: str, value: Any) -> float:
    seconds = _nonneg_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, "must be positive")
    return seconds


def _postgres_url(key: str, value: Any) -> str:
    """"" or a libpq URL (postgresql:// or postgres://); errors never show a password."""
    _expect(str, "a URL such as 'postgresql://mail@db.example.org/mail'")(key, value)
    if not value:
        return value
    if not re.match(r"postgres(ql)?://", value):
        raise ConfigError(key, f"expected a postgresql:// URL, got {display_url(value)!r}")
    if len(value) > 2048 or not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(key, "not a usable URL (longer than 2048 characters, or spaces "
                               "or control characters)")
    return value


def display_url(url: str) -> str:
    """A database URL as it may be shown and logged: a password replaced by '***'."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):[^@/?#]*@", r"\1:***@",
                  re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url))


def _nonneg_duration(key: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None


def _durations(key: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f"expected a non-empty list of durations, got {value!r}")
    return tuple(_duration(f"{key}[{i}]", v) for i, v in enumerate(value))


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(key, f"expected a port number 1-65535, got {value!r}")
    return value


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """('host', port) from 'host:port', '[2001:db8::1]:port', or 'host' with a default."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value)
    if not m:
        raise ValueError(f"expected host:port, got {value!r}")
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {value!r} (host:port)")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, port


def _host_port(key: str, value: Any) -> str:
    _expect(str, "host:port")(key, value)
    if not value:
        return value
    try:
        host, _ = split_host_port(value)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if not _is_ip(host):
        _hostname(key, host)
    return value


def _resolver(key: str, value: Any) -> str:
    _expect(str, "a DNS server address such as '192.0.2.53' or '127.0.0.1:5353'")(key, value)
    if not value:
        return value
    try:
        host, _ = split_host_port(value, default_port=53)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if not _is_ip(host):
        raise ConfigError(key, f"the resolver must be an IP address, got {host!r}")
    return value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}; got {value!r}")
        return value
    return check


def _domains(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of domain names, got {value!r}")
    out = []
    for i, v in enumerate(value):
        out.append(_hostname(f"{key}[{i}]", v).lower())
    return tuple(out)


_HOSTNAME_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def _hostname(key: str, value: Any) -> str:
    _expect(str, "a host name")(key, value)
    if not _HOSTNAME_RE.fullmatch(value):
        raise ConfigError(key, f"not a valid host name: {value!r}")
    return value.rstrip(".")


def _http_url(key: str, value: Any) -> str:
    _expect(str, "a URL such as 'http://127.0.0.1:11333'")(key, value)
    if value and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
        raise ConfigError(key, f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


def _networks(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list of networks such as '192.0.2.0/24', got {value!r}")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(str(ipaddress.ip_network(_expect(str, "a network")(f"{key}[{i}]", v),
                                                 strict=False)))
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", str(e)) from None
    return tuple(out)


def _folder_name(key: str, value: Any) -> str:
    from mailserver.maildir.names import folder_dir_name

    _expect(str, "a folder name")(key, value)
    try:
        if any(c in value for c in "*%") or not value.isprintable():
            raise ValueError("wildcards or control characters")
        folder_dir_name(value)  # the store's own rules for a folder other than INBOX
    except ValueError as e:
        raise ConfigError(key, f"not a usable folder name: {value!r} ({e})") from None
    return value


def check_endpoints(key: str, value: Any) -> Endpoints:
    """One endpoint description, or a list of them (each checked, its index in the key)."""
    if not isinstance(value, list):
        return check_endpoint(key, value)
    out: list[str] = []
    for i, element in enumerate(value):
        where = f"{key}[{i}]"
        if element == "":
            raise ConfigError(where, "empty endpoint in a list (switch the service off with "
                                     "\"\" or [])")
        check_endpoint(where, element)
        if element in out:
            raise ConfigError(where, f"{element!r} is listed twice")
        out.append(element)
    return tuple(out)


def check_endpoint(key: str, value: Any) -> str:
    """Validate a Twisted server endpoint description without listening on it."""
    _expect(str, "an endpoint description such as 'tcp:2525' (or a list of them)")(key, value)
    if not value:
        return value
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, value)
    except Exception as e:  # serverFromString raises ValueError, KeyError, TypeError...
        raise ConfigError(key, f"bad endpoint description {value!r}: {e}") from None
    # serverFromString takes any number for a port; listen() then fails at start
    parts = value.split(":")
    if parts[0].lower() in ("tcp", "tcp6", "ssl") and len(parts) > 1:
        port = next((p[5:] for p in parts[1:] if p.startswith("port=")),
                    parts[1] if "=" not in parts[1] else "")
        if port.isdigit() and int(port) > 65535:
            raise ConfigError(key, f"bad endpoint description {value!r}: port {port} is "
                                   f"not 0-65535")
    return value


ACME_CHALLENGES = ("auto", "http-01", "tls-alpn-01")


def _acme_directory(key: str, value: Any) -> str:
    """RFC 8555 6.1: the ACME server is reached over HTTPS only."""
    _expect(str, "a URL such as 'https://acme-v02.api.letsencrypt.org/directory'")(key, value)
    if value and not re.fullmatch(r"https://[^\s/?#]+(/[^\s#]*)?", value):
        raise ConfigError(key, f"expected an https:// URL, got {value!r}")
    return value


def _email_or_empty(key: str, value: Any) -> str:
    _expect(str, "an e-mail address")(key, value)
    if value and (len(value) > 254 or not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s.]+", value)):
        raise ConfigError(key, f"not an e-mail address: {value!r}")
    return value


def _hostname_or_empty(key: str, value: Any) -> str:
    return _hostname(key, value) if value != "" else value


def _paths(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"expected a list of paths, got {value!r}")
    return tuple(value)


def _names(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) for v in value):
        raise ConfigError(key, f"expected a list of plugin names, got {value!r}")
    return tuple(value)


def _display_name(key: str, value: Any) -> str:
    _expect(str, "a name")(key, value)
    if len(value) > 100 or not value.isprintable():
        raise ConfigError(key, f"expected at most 100 printable characters, got {value!r}")
    return value.strip()


_SCHEMA: dict[str, tuple[type, dict[str, Callable[[str, Any], Any]]]] = {
    "server": (ServerConfig, {"hostname": _hostname, "state_dir": _expect(str, "a path")}),
    "storage": (StorageConfig, {"maildir_root": _expect(str, "a path"),
                                "shared": _expect(bool, "true or false")}),
    "tls": (TLSConfig, {"certificate": _expect(str, "a path"),
                        "private_key": _expect(str, "a path"),
                        "reload_interval": _duration,
                        "acme_directory": _acme_directory,
                        "acme_email": _email_or_empty,
                        "acme_domains": _domains,
                        "acme_ca_bundle": _expect(str, "a path"),
                        "acme_challenge": _choice(*ACME_CHALLENGES),
                        "acme_renew_before": _duration}),
    "listen": (ListenConfig, {f.name: check_endpoints for f in fields(ListenConfig)}),
    "limits": (LimitsConfig, {
        "max_message_size": _size,
        "max_recipients": _positive_int,
        "max_line_length": _positive_int,
        "max_command_length": _positive_int,
        "idle_timeout": _duration,
        "max_connections": _positive_int,
        "max_connections_per_ip": _positive_int,
        "auth_failure_delay_after": _nonneg_int,
        "auth_failures_per_connection": _positive_int,
        "auth_failure_window": _duration,
        "submission_max_recipients": _positive_int,
        "messages_per_hour": _nonneg_int,
        "max_rcpt_commands": _positive_int,
        "max_command_errors": _positive_int,
    }),
    "auth": (AuthConfig, {"allow_plaintext_loopback": _expect(bool, "true or false"),
                          "login_cache_ttl": _nonneg_duration}),
    "accounts": (AccountsConfig, {"url": _postgres_url,
                                  "fail_closed_after": _duration}),
    "relay": (RelayConfig, {
        "smarthost": _host_port,
        "smarthost_tls": _choice(*SMARTHOST_TLS_MODES),
        "smarthost_username": _expect(str, "a user name"),
        "smarthost_password": _expect(str, "a password"),
        "smarthost_password_file": _expect(str, "a path"),
        "port": _port,
        "resolver": _resolver,
        "tls_required_domains": _domains,
        "ca_file": _expect(str, "a path"),
        "connect_timeout": _duration,
        "timeout": _duration,
    }),
    "queue": (QueueConfig, {
        "retry_schedule": _durations,
        "max_age": _duration,
        "delay_warning": _nonneg_duration,
        "concurrency": _positive_int,
    }),
    "inbound": (InboundConfig, {
        "spf": _expect(bool, "true or false"),
        "dkim": _expect(bool, "true or false"),
        "dmarc": _expect(bool, "true or false"),
        "dmarc_enforce": _expect(bool, "true or false"),
        "arc": _expect(bool, "true or false"),
        "trusted_arc_sealers": _domains,
        "rspamd_url": _http_url,
        "rspamd_timeout": _duration,
        "rspamd_failure": _choice(*RSPAMD_FAILURE_MODES),
        "dnsbl": _domains,
        "greet_delay": _nonneg_duration,
        "junk_folder": _folder_name,
        "trusted_networks": _networks,
        "psl_file": _expect(str, "a path"),
    }),
    "sieve": (SieveConfig, {
        "enabled": _expect(bool, "true or false"),
        "before": _paths,
        "after": _paths,
        "global_dir": _expect(str, "a path"),
        "max_script_size": _size,
        "max_scripts": _positive_int,
        "quota": _size,
        "max_actions": _positive_int,
        "max_redirects": _nonneg_int,
        "max_include_depth": _positive_int,
        "max_cpu_time": _duration,
        "vacation_min_period": _duration,
        "vacation_max_period": _duration,
    }),
    "filters": (FiltersConfig, {
        "plugins": _names,
        "timeout": _duration,
    }),
    "autoconfig": (AutoconfigConfig, {
        "hostname": _hostname_or_empty,
        "display_name": _display_name,
        **{f.name: _port for f in fields(AutoconfigConfig) if f.name.endswith("_port")},
    }),
}


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _section(name: str, raw: Any, base: Path) -> Any:
    cls, checks = _SCHEMA[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(name, "expected a table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        if key not in checks:
            raise ConfigError(dotted, f"unknown key (known: {', '.join(sorted(checks))})")
        if _has_nul(value):   # no name, path or text holds one (a path's made a traceback)
            raise ConfigError(dotted, "contains a NUL character")
        values[key] = checks[key](dotted, value)
    for key in ("state_dir", "maildir_root"):
        if key in values:
            values[key] = (base / values[key]).resolve()
    return cls(**values)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    """Build a Config from already-parsed TOML; `path` anchors relative paths."""
    base = path.resolve().parent
    for name in data:
        if name not in _SCHEMA:
            raise ConfigError(name, f"unknown section (known: {', '.join(sorted(_SCHEMA))})")
    sections = {name: _section(name, data.get(name), base) for name in _SCHEMA}
    # Defaults for paths are relative to the config directory too.
    server: ServerConfig = sections["server"]
    if not server.state_dir.is_absolute():
        sections["server"] = ServerConfig(server.hostname, (base / server.state_dir).resolve())
    storage: StorageConfig = sections["storage"]
    if not storage.maildir_root.is_absolute():
        storage = sections["storage"] = replace(
            storage, maildir_root=(base / storage.maildir_root).resolve())
    state_dir = sections["server"].state_dir
    if storage.shared and (state_dir == storage.maildir_root
                           or storage.maildir_root in state_dir.parents):
        # Each node's indexes, queue and certificates must be its own.
        raise ConfigError("storage.shared", f"server.state_dir ({state_dir}) is inside the "
                          f"shared maildir_root ({storage.maildir_root}); give each node a "
                          "state_dir of its own outside it")
    tls: TLSConfig = sections["tls"]
    if bool(tls.certificate) != bool(tls.private_key):
        raise ConfigError("tls.certificate" if not tls.certificate else "tls.private_key",
                          "set both certificate and private_key, or neither")
    resolved = {}
    for key in ("certificate", "private_key"):
        value = getattr(tls, key)
        if value:
            p = (base / value).resolve()
            if not p.is_file():
                raise ConfigError(f"tls.{key}", f"file not found: {p}")
            resolved[key] = str(p)
    if resolved:
        sections["tls"] = replace(tls, **resolved)
    sections["tls"] = _check_acme(sections["tls"], sections["listen"], base)
    _check_distinct_endpoints(sections["listen"])
    sections["relay"] = _check_relay(sections["relay"], base)
    inbound: InboundConfig = sections["inbound"]
    if inbound.dmarc and not (inbound.spf and inbound.dkim):
        # RFC 7489 4: DMARC passes on an aligned SPF or DKIM pass; with one of them off,
        # mail that authenticates only through it would fail (and be refused).
        raise ConfigError("inbound.dmarc", "needs inbound.spf and inbound.dkim switched on")
    if inbound.greet_delay > MAX_GREET_DELAY:
        raise ConfigError("inbound.greet_delay", f"at most {MAX_GREET_DELAY:g} seconds")
    if inbound.psl_file:
        p = (base / inbound.psl_file).resolve()
        if not p.is_file():
            raise ConfigError("inbound.psl_file", f"file not found: {p}")
        sections["inbound"] = replace(inbound, psl_file=str(p))
    sections["sieve"] = _check_sieve(sections["sieve"], base)
    return Config(path=path.resolve(), **sections)


def _check_sieve(sieve: SieveConfig, base: Path) -> SieveConfig:
    """Global scripts must exist (a typo would silently filter nothing); paths absolute."""
    resolved: dict[str, Any] = {}
    for key in ("before", "after"):
        paths = []
        for i, value in enumerate(getattr(sieve, key)):
            p = (base / value).resolve()
            if not p.is_file():
                raise ConfigError(f"sieve.{key}[{i}]", f"file not found: {p}")
            paths.append(str(p))
        resolved[key] = tuple(paths)
    if sieve.global_dir:
        p = (base / sieve.global_dir).resolve()
        if not p.is_dir():
            raise ConfigError("sieve.global_dir", f"directory not found: {p}")
        resolved["global_dir"] = str(p)
    if sieve.vacation_min_period > sieve.vacation_max_period:
        raise ConfigError("sieve.vacation_min_period", "greater than vacation_max_period")
    return replace(sieve, **resolved)


def _check_relay(relay: RelayConfig, base: Path) -> RelayConfig:
    """Cross-key rules: credentials only with a smart host and never in the clear."""
    changes: dict[str, Any] = {}
    if relay.smarthost_password and relay.smarthost_password_file:
        raise ConfigError("relay.smarthost_password_file",
                          "set smarthost_password or smarthost_password_file, not both")
    if (relay.smarthost_password or relay.smarthost_password_file) and not relay.smarthost_username:
        raise ConfigError("relay.smarthost_username", "a smart host password needs a user name")
    if relay.smarthost_username:
        if not relay.smarthost:
            raise ConfigError("relay.smarthost_username", "set only together with relay.smarthost")
        if relay.smarthost_tls == "none":
            raise ConfigError("relay.smarthost_tls",
                              "AUTH to the smart host needs TLS (starttls or tls), not none")
    if relay.smarthost_password_file:
        p = (base / relay.smarthost_password_file).resolve()
        try:
            password = p.read_text(encoding="utf-8").splitlines()[0] if p.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("relay.smarthost_password_file", f"cannot read {p}: {e}") from None
        if not password:
            raise ConfigError("relay.smarthost_password_file", f"{p} is empty")
        changes["smarthost_password_file"] = str(p)
        changes["smarthost_password"] = password
    if relay.ca_file:
        p = (base / relay.ca_file).resolve()
        if not p.is_file():
            raise ConfigError("relay.ca_file", f"file not found: {p}")
        changes["ca_file"] = str(p)
    return replace(relay, **changes) if changes else relay


def _check_acme(tls: TLSConfig, listen: ListenConfig, base: Path) -> TLSConfig:
    """ACME needs a listener to answer the CA's challenge on, and replaces configured
    certificate files rather than sitting beside them."""
    if not tls.acme_directory:
        return tls
    if tls.certificate:
        raise ConfigError("tls.acme_directory", "set either acme_directory or "
                                                "certificate/private_key, not both")
    enabled = listen.enabled()
    needs = {"http-01": "autoconfig_http", "tls-alpn-01": "autoconfig"}
    if tls.acme_challenge in needs and needs[tls.acme_challenge] not in enabled:
        raise ConfigError("tls.acme_challenge",
                          f"{tls.acme_challenge} is answered on listen."
                          f"{needs[tls.acme_challenge]}, which is switched off")
    if tls.acme_challenge == "auto" and not any(n in enabled for n in needs.values()):
        raise ConfigError("tls.acme_directory",
                          "the CA's challenge is answered on listen.autoconfig_http (http-01) "
                          "or listen.autoconfig (tls-alpn-01); switch one of them on")
    if tls.acme_ca_bundle:
        p = (base / tls.acme_ca_bundle).resolve()
        if not p.is_file():
            raise ConfigError("tls.acme_ca_bundle", f"file not found: {p}")
        tls = replace(tls, acme_ca_bundle=str(p))
    return tls


def _check_distinct_endpoints(listen: ListenConfig) -> None:
    """Two endpoints that can never both listen (same port, family and interface, or one
    of them on every interface) are a config error; a port taken by another program is
    found when the server starts (mailserver.listening)."""
    from mailserver.listening import tcp_address

    seen: list[tuple[Any, str]] = []
    for key, description in listen.keyed():
        address = tcp_address(description)
        if address is None:
            continue
        for other, other_key in seen:
            if address.overlaps(other):
                raise ConfigError(key, f"port {address.port} is also used by {other_key}")
        seen.append((address, key))


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the config file; raises ConfigError naming the bad key."""
    p = Path(path) if path else default_config_path()
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{p}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError("", f"{p}: {e.strerror}") from None
    return parse_config(data, p)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped address (::ffff:127.0.0.1: an IPv4
    client of a dual-stack listener)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
