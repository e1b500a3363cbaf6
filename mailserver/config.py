"""Load and validate the TOML configuration into frozen dataclasses.

Every key is known here: an unknown key or a bad value is a `ConfigError` that names the
key, raised before anything listens, so an operator's typo never silently falls back to a
default.  Relative paths are relative to the directory holding the config file.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "mailserver.toml"


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


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '50M', '1.5G', '2048'."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or a number with K, M, G, T)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string such as '300', '5m', '4h', '5d'."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use seconds or a number with s, m, h, d, w)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


# -- sections ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    state_dir: Path = Path("var")


@dataclass(frozen=True)
class StorageConfig:
    maildir_root: Path = Path("maildirs")


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = ""
    private_key: str = ""


@dataclass(frozen=True)
class ListenConfig:
    smtp: str = "tcp:2525"
    submission: str = "tcp:2587"
    submissions: str = "tcp:2465"
    imap: str = "tcp:2143"
    imaps: str = "tcp:2993"
    pop3: str = "tcp:2110"
    pop3s: str = "tcp:2995"

    def enabled(self) -> dict[str, str]:
        """Service name -> endpoint description, for the services that are switched on."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


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


@dataclass(frozen=True)
class AuthConfig:
    # Accept credentials without TLS from loopback clients only; for local testing.
    allow_plaintext_loopback: bool = False


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig
    storage: StorageConfig
    tls: TLSConfig
    listen: ListenConfig
    limits: LimitsConfig
    auth: AuthConfig

    @property
    def state_dir(self) -> Path:
        return self.server.state_dir

    @property
    def maildir_root(self) -> Path:
        return self.storage.maildir_root

    @property
    def accounts_db(self) -> Path:
        return self.server.state_dir / "accounts.sqlite3"


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
    try:
        seconds = parse_duration(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None
    if seconds <= 0:
        raise ConfigError(key, "must be positive")
    return seconds


_HOSTNAME_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def _hostname(key: str, value: Any) -> str:
    _expect(str, "a host name")(key, value)
    if not _HOSTNAME_RE.fullmatch(value):
        raise ConfigError(key, f"not a valid host name: {value!r}")
    return value.rstrip(".")


def check_endpoint(key: str, value: Any) -> str:
    """Validate a Twisted server endpoint description without listening on it."""
    _expect(str, "an endpoint description such as 'tcp:2525'")(key, value)
    if not value:
        return value
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, value)
    except Exception as e:  # serverFromString raises ValueError, KeyError, TypeError...
        raise ConfigError(key, f"bad endpoint description {value!r}: {e}") from None
    return value


_SCHEMA: dict[str, tuple[type, dict[str, Callable[[str, Any], Any]]]] = {
    "server": (ServerConfig, {"hostname": _hostname, "state_dir": _expect(str, "a path")}),
    "storage": (StorageConfig, {"maildir_root": _expect(str, "a path")}),
    "tls": (TLSConfig, {"certificate": _expect(str, "a path"),
                        "private_key": _expect(str, "a path")}),
    "listen": (ListenConfig, {f.name: check_endpoint for f in fields(ListenConfig)}),
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
    }),
    "auth": (AuthConfig, {"allow_plaintext_loopback": _expect(bool, "true or false")}),
}


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
        sections["storage"] = StorageConfig((base / storage.maildir_root).resolve())
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
        sections["tls"] = TLSConfig(**resolved)
    _check_distinct_endpoints(sections["listen"])
    return Config(path=path.resolve(), **sections)


def _check_distinct_endpoints(listen: ListenConfig) -> None:
    seen: dict[str, str] = {}
    for name, desc in listen.enabled().items():
        port = _port_of(desc)
        if port is not None and port in seen and port != 0:
            raise ConfigError(f"listen.{name}", f"port {port} is also used by listen.{seen[port]}")
        if port is not None:
            seen[port] = name


def _port_of(description: str) -> Any:
    """The (interface, port) a tcp endpoint description names, or None."""
    parts = description.split(":")
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2:
        return None
    port = None
    interface = ""
    for part in parts[1:]:
        if part.startswith("port="):
            port = part[5:]
        elif part.startswith("interface="):
            interface = part[10:]
        elif "=" not in part and port is None:
            port = part
    try:
        return int(port) if int(port) == 0 else (interface, int(port))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the config file; raises ConfigError naming the bad key."""
    p = Path(path) if path else DEFAULT_CONFIG
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
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
