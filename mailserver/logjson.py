"""JSON log output for log shippers: `twistd --logger mailserver.logjson.observer mailserver`.

twistd's `--logger` takes the name of a factory that makes the process's log observer (it
replaces `--logfile`'s text lines).  This one writes every event as one JSON object per line
through twisted.logger's jsonFileLogObserver: the event's own fields as twisted.logger keeps
them (`log_format`, `log_namespace`, the values, a failure as `log_failure`), so that
`twisted.logger.eventsFromJSONLogFile` reads the file back, plus flat fields that shippers
index without knowing Twisted: `time` (ISO 8601, UTC), `level`, `namespace`, `text` (the
line the text log shows) and, for a failure, `traceback`.

The factory takes no arguments (twistd calls it so); it is told where to write by the
environment:

    MAILSERVER_LOG_JSON          a file, or "-" / unset for standard output (foreground
                                 only: journald, a container runtime)
    MAILSERVER_LOG_JSON_ROTATE   size at which the file rotates (to FILE.1, FILE.2, ...),
                                 default "10M"; "0": never (an external tool rotates)
    MAILSERVER_LOG_JSON_KEEP     rotated files kept, default 10; "0": all

SIGUSR1 rotates the file now, as it does twistd's own --logfile; with rotation off it
reopens the file instead, which is what logrotate's `postrotate` needs.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, TextIO

from twisted.logger import ILogObserver, formatEvent, jsonFileLogObserver
from twisted.python.logfile import LogFile
from zope.interface import implementer

LOG_PATH_VARIABLE = "MAILSERVER_LOG_JSON"
ROTATE_VARIABLE = "MAILSERVER_LOG_JSON_ROTATE"
KEEP_VARIABLE = "MAILSERVER_LOG_JSON_KEEP"
DEFAULT_ROTATE = "10M"
DEFAULT_KEEP = 10


@dataclass(frozen=True)
class Settings:
    path: str          # "" = standard output
    rotate: int        # bytes; 0 = never
    keep: int          # rotated files kept; 0 = all


def settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """The destination from the environment; ValueError naming the variable if bad."""
    from mailserver.config import parse_size

    path = environ.get(LOG_PATH_VARIABLE, "")
    try:
        rotate = parse_size(environ.get(ROTATE_VARIABLE, DEFAULT_ROTATE))
    except ValueError as e:
        raise ValueError(f"{ROTATE_VARIABLE}: {e}") from None
    keep_text = environ.get(KEEP_VARIABLE, str(DEFAULT_KEEP))
    if not keep_text.isdigit():
        raise ValueError(f"{KEEP_VARIABLE}: expected a number of files, got {keep_text!r}")
    return Settings("" if path == "-" else path, rotate, int(keep_text))


@implementer(ILogObserver)
class JSONLineObserver:
    """One JSON object per event and line, with flat fields added for shippers."""

    def __init__(self, out: TextIO | LogFile) -> None:
        self.out = out
        self._write = jsonFileLogObserver(out, recordSeparator="")

    def __call__(self, event: dict[str, Any]) -> None:
        flat: dict[str, Any] = dict(event)
        when = event.get("log_time")
        if isinstance(when, (int, float)):
            flat["time"] = datetime.fromtimestamp(when, timezone.utc).isoformat()
        level = event.get("log_level")
        flat["level"] = getattr(level, "name", None)
        flat["namespace"] = event.get("log_namespace")
        flat["text"] = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                flat["traceback"] = failure.getTraceback()
            except Exception:   # a log line must never take the observer down
                flat["traceback"] = repr(failure)
        self._write(flat)


def observer() -> JSONLineObserver:
    """The `--logger` factory."""
    chosen = settings()
    if not chosen.path:
        return JSONLineObserver(sys.stdout)
    out = LogFile.fromFullPath(chosen.path, rotateLength=chosen.rotate or None,
                               maxRotatedFiles=chosen.keep or None)
    if not signal.getsignal(signal.SIGUSR1):   # unset, as twistd checks for its own log
        action = out.rotate if chosen.rotate else out.reopen

        def on_usr1(signum: int, frame: Any) -> None:
            from twisted.internet import reactor
            reactor.callFromThread(action)

        signal.signal(signal.SIGUSR1, on_usr1)
    return JSONLineObserver(out)
