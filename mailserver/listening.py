"""The sockets [listen] asks for, and whether they can be had, checked before anything listens.

Twisted reports a port that is taken as a `CannotListenError` traceback from deep inside
twistd (truncated to 100 bytes in daemon mode) that does not say which config key asked for
the port.  The server and `mailserver-admin check` therefore try every TCP endpoint first,
the way Twisted's TCP port binds it (SO_REUSEADDR, bind, listen), and describe a refusal
in one line that names the key.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

# Twisted's default interfaces: TCP4ServerEndpoint "" (all IPv4), TCP6ServerEndpoint "::".
_WILDCARD = {socket.AF_INET: ("", "0.0.0.0"), socket.AF_INET6: ("", "::")}


@dataclass(frozen=True)
class TCPAddress:
    """Where a `tcp:`/`tcp6:` endpoint description listens."""

    family: int        # socket.AF_INET or socket.AF_INET6
    interface: str     # "" = every address of the family
    port: int

    @property
    def wildcard(self) -> bool:
        return self.interface in _WILDCARD[self.family]

    def overlaps(self, other: TCPAddress) -> bool:
        """Both cannot be bound on any system: same family and port, same or wildcard
        interface.  (An IPv4 and an IPv6 wildcard overlap only on dual-stack systems.)"""
        return (self.family == other.family and self.port == other.port != 0
                and (self.wildcard or other.wildcard or self.interface == other.interface))


def split_description(description: str) -> list[str]:
    """Twisted's endpoint syntax: fields separated by ':', where '\\:' is a literal colon."""
    fields, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def tcp_address(description: str) -> TCPAddress | None:
    """The address of a 'tcp:25', 'tcp:port=25:interface=192.0.2.1' or
    'tcp6:25:interface=\\:\\:1' description; None for other endpoint types or nonsense."""
    kind, *args = split_description(description)
    family = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6}.get(kind)
    if family is None:
        return None
    positional = [a for a in args if "=" not in a]
    keywords = dict(a.split("=", 1) for a in args if "=" in a)
    port = keywords.get("port", positional[0] if positional else None)
    interface = keywords.get("interface", positional[1] if len(positional) > 1 else "")
    try:
        number = int(port)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not 0 <= number < 65536:
        return None
    return TCPAddress(family, interface, number)


@dataclass(frozen=True)
class ListenProblem:
    """One endpoint that cannot listen; `message` is one line that names `key`."""

    key: str            # "listen.smtp", or "listen.smtp[1]" for an element of a list
    description: str
    code: int           # the errno of the refusal
    message: str

    @property
    def in_use(self) -> bool:
        return self.code == errno.EADDRINUSE


def probe(endpoints: list[tuple[str, str]]) -> list[ListenProblem]:
    """Try to listen on each (key, description) the way Twisted will, all at the same time
    (so two keys that collide are found too), and give every socket back at once.

    Endpoints other than tcp/tcp6 and port 0 are not tried.  Costs a few system calls.
    """
    problems: list[ListenProblem] = []
    held: list[tuple[TCPAddress, socket.socket]] = []
    try:
        for key, description in endpoints:
            address = tcp_address(description)
            if address is None or address.port == 0:
                continue
            sock = None
            try:
                sock = socket.socket(address.family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address.interface, address.port))
                sock.listen(1)
            except OSError as e:
                if sock is not None:
                    sock.close()
                code = e.errno or 0
                problems.append(ListenProblem(key, description, code,
                                              _explain(key, description, address, code,
                                                       e, held)))
                continue
            held.append((address, sock))
    finally:
        for _, sock in held:
            sock.close()
    return problems


def _explain(key: str, description: str, address: TCPAddress, code: int, error: OSError,
             held: list[tuple[TCPAddress, socket.socket]]) -> str:
    where = f"{key} = {description!r}"
    if code == errno.EADDRINUSE:
        other_family = socket.AF_INET if address.family == socket.AF_INET6 else socket.AF_INET6
        dual_stack = address.wildcard and any(
            a.family == other_family and a.port == address.port and a.wildcard for a, _ in held)
        if dual_stack:
            return (f"{where}: port {address.port} is taken by this config's own "
                    f"{'IPv4' if other_family == socket.AF_INET else 'IPv6'} endpoint: on this "
                    f"system an IPv6 socket on :: also accepts IPv4; use 'tcp6:{address.port}' "
                    f"alone for both, or give each endpoint an interface")
        return (f"{where}: port {address.port} is already in use by another program "
                f"(stop it, or change {key.split('[')[0]})")
    if code in (errno.EACCES, errno.EPERM):
        return (f"{where}: permission denied: ports below 1024 need root (start twistd as root "
                f"with --uid/--gid) or the CAP_NET_BIND_SERVICE capability")
    if code == errno.EAFNOSUPPORT:
        return f"{where}: this machine has no IPv6"
    if code == errno.EADDRNOTAVAIL:
        return f"{where}: {address.interface} is not an address of this machine"
    return f"{where}: cannot listen: {error.strerror or error}"
