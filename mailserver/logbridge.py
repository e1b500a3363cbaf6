"""Disk-side modules log with the standard library's `logging` (they import nothing from
Twisted, so that they can run in any thread or process); this forwards those records into
the server's `twisted.logger` log, with the module as namespace and the level kept."""

from __future__ import annotations

import logging

from twisted.logger import Logger, LogLevel

_LEVELS = ((logging.CRITICAL, LogLevel.critical), (logging.ERROR, LogLevel.error),
           (logging.WARNING, LogLevel.warn), (logging.INFO, LogLevel.info))


class TwistedLogHandler(logging.Handler):
    """A logging.Handler that emits each record as a twisted.logger event."""

    def emit(self, record: logging.LogRecord) -> None:
        level = next((lv for n, lv in _LEVELS if record.levelno >= n), LogLevel.debug)
        try:
            text = record.getMessage()
        except Exception:   # a bad format string must not lose the event
            text = f"{record.msg!r} {record.args!r}"
        Logger(namespace=record.name).emit(level, "{text}", text=text)


def install(root: str = "mailserver") -> TwistedLogHandler:
    """Forward the records of the `root` logger and its children (INFO and up); idempotent."""
    logger = logging.getLogger(root)
    for handler in logger.handlers:
        if isinstance(handler, TwistedLogHandler):
            return handler
    handler = TwistedLogHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
