"""systemd's service notification protocol (sd_notify(3)), for `Type=notify` units.

The service manager names a unix datagram socket in $NOTIFY_SOCKET (a path, or an abstract
address when it starts with '@'); the service sends it newline-separated assignments such
as `READY=1` or `STATUS=...`.  Without $NOTIFY_SOCKET nothing is sent.

The socket is connected when the notifier is made, which the server does while it may
still be root (twistd binds the ports, then drops to --uid): a connected datagram socket
keeps working after the drop even when the socket file is root's alone.  Sending never
blocks and never raises: a manager that does not listen must not stop the server.

Plain stdlib, no Twisted: the service tree decides when to call it.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

VARIABLE = "NOTIFY_SOCKET"
# Far below the socket's datagram limit; a STATUS line longer than this is cut.
MAX_STATUS = 1024


class Notifier:
    """One connection to the service manager's notification socket."""

    def __init__(self, address: str | bytes, sock: socket.socket, connected: bool) -> None:
        self.address = address
        self._sock: socket.socket | None = sock
        self._connected = connected
        self.last_error: OSError | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None,
                         ) -> Notifier | None:
        """A notifier for $NOTIFY_SOCKET, or None when it is unset or not a unix socket
        (systemd also knows `vsock:` addresses, for virtual machines, not used here)."""
        value = (os.environ if environ is None else environ).get(VARIABLE, "")
        address = socket_address(value)
        if address is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(address)
            connected = True
        except OSError:
            connected = False   # not there yet, or not ours: try again at each send
        return cls(address, sock, connected)

    def send(self, *assignments: str) -> bool:
        """Send `assignments` (`"READY=1"`, ...) in one datagram; False when it could not
        be sent (the reason in `last_error`)."""
        if self._sock is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._connected:
                self._sock.send(data)
            else:
                self._sock.sendto(data, self.address)
        except OSError as e:
            self.last_error = e
            return False
        return True

    def ready(self, status: str) -> bool:
        """Every listener is up: `systemctl start` returns, dependent units start."""
        return self.send("READY=1", status_assignment(status))

    def status(self, status: str) -> bool:
        return self.send(status_assignment(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", status_assignment(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def socket_address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET as a socket address: a filesystem path, or an abstract name
    ('@' stands for the leading NUL byte)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    return None


def status_assignment(status: str) -> str:
    """One `STATUS=` line: the protocol is line based, so no line breaks in the text."""
    text = " ".join(status.split())
    return f"STATUS={text[:MAX_STATUS]}"
