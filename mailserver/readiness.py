"""Tell the service manager when the server is ready and when it stops (systemd's
`Type=notify`), from the service tree's start and stop.

Order matters: the notifier is opened in privilegedStartService (still root when twistd
drops to --uid afterwards), READY=1 goes out once every listener's port is bound and the
services have started, and only when the reactor runs, so that `systemctl start` returns
when connections are really being answered.
"""

from __future__ import annotations

from typing import Iterable

from twisted.logger import Logger

from mailserver.sdnotify import Notifier

log = Logger()


class Readiness:
    """The server's side of the notification protocol; does nothing without
    $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.notifier: Notifier | None = None
        self._opened = False

    def open(self) -> None:
        """Connect to $NOTIFY_SOCKET; called before privileges are dropped."""
        if self._opened:
            return
        self._opened = True
        try:
            self.notifier = Notifier.from_environment()
        except OSError as e:   # no unix sockets at all (a sandbox): run without
            log.warn("NOTIFY_SOCKET: cannot open a socket: {error}", error=e)

    def ready(self, hostname: str, services: Iterable[str]) -> None:
        """READY=1 once the reactor runs: called after every listener is bound (TCP and
        UNIX endpoints listen synchronously in privilegedStartService)."""
        self.open()
        if self.notifier is None:
            return
        names = sorted({name.split("[")[0] for name in services})
        status = f"serving {', '.join(names) or 'nothing'} as {hostname}"
        from twisted.internet import reactor

        reactor.callWhenRunning(self._send, "ready", status)

    def stopping(self) -> None:
        if self.notifier is not None:
            self._send("stopping", "stopping")

    def _send(self, what: str, status: str) -> None:
        assert self.notifier is not None
        sent = (self.notifier.ready(status) if what == "ready"
                else self.notifier.stopping(status))
        if not sent:
            log.warn("NOTIFY_SOCKET {address!r}: cannot tell the service manager the server "
                     "is {what}: {error}", address=self.notifier.address, what=what,
                     error=self.notifier.last_error)
