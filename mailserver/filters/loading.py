"""Finding the configured delivery filters among the installed Twisted plugins, at start.

A plugin named in [filters] plugins that is not installed is a configuration error, so the
server never starts with a filter silently missing.  Runs once at start: the scan imports
the dropin modules (or reads Twisted's dropin.cache), a little blocking work that the
reactor is not yet running for.
"""

from __future__ import annotations

import os
import types
from typing import Any, Sequence

from twisted.logger import ILogObserver, Logger, LogEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailserver.config import ConfigError
from mailserver.filters.api import IDeliveryFilter

log = Logger()

KEY = "filters.plugins"


def load_filters(names: Sequence[str], *,
                 package: types.ModuleType | None = None) -> list[IDeliveryFilter]:
    """The plugins called `names`, in that order, from the IDeliveryFilter providers that
    twisted.plugin.getPlugins finds in `package` (default twisted.plugins: every
    `twisted/plugins/` directory on sys.path, an installed distribution's included).

    ConfigError (filters.plugins) for a name that is not installed, is listed twice,
    belongs to two plugins, or a plugin that does not implement the interface.
    """
    if not names:
        return []
    installed, import_errors = _scan(package)
    chosen: list[IDeliveryFilter] = []
    for name in names:
        if any(getattr(c, "name", None) == name for c in chosen):
            raise ConfigError(KEY, f"{name!r} is listed twice")
        candidates = installed.get(name, [])
        if not candidates:
            known = ", ".join(sorted(installed)) or "none"
            hint = f"; {import_errors[0]}" if import_errors else ""
            raise ConfigError(KEY, f"no delivery filter plugin named {name!r} is installed "
                                   f"(installed: {known}){hint}")
        if len(candidates) > 1:
            where = ", ".join(sorted(type(c).__module__ for c in candidates))
            raise ConfigError(KEY, f"{name!r} names {len(candidates)} plugins ({where})")
        plugin = candidates[0]
        try:
            verifyObject(IDeliveryFilter, plugin)
        except Invalid as e:
            detail = " ".join(str(e).split())
            raise ConfigError(KEY, f"plugin {name!r} does not implement IDeliveryFilter: "
                                   f"{detail}") from None
        chosen.append(plugin)
    log.info("delivery filters: {names}", names=", ".join(names))
    return chosen


def _scan(package: types.ModuleType | None) -> tuple[dict[str, list[Any]], list[str]]:
    """{name: [plugins]} of every IDeliveryFilter found, and one line per dropin module that
    failed to import (Twisted logs those and goes on; a startup error names them, since
    the log file may not be open yet)."""
    errors: list[str] = []

    @implementer(ILogObserver)
    def collect(event: LogEvent) -> None:
        failure = event.get("log_failure") or event.get("failure")   # new, legacy API
        if isinstance(failure, Failure):
            errors.append(_describe(failure, dirs))

    if package is None:
        from twisted import plugins as package
    dirs = [os.path.join(os.path.abspath(d), "") for d in getattr(package, "__path__", [])]
    found: dict[str, list[Any]] = {}
    globalLogPublisher.addObserver(collect)
    try:
        for plugin in getPlugins(IDeliveryFilter, package):
            name = getattr(plugin, "name", None)
            if not isinstance(name, str):
                log.warn("delivery filter plugin {plugin!r} has no name; ignored",
                         plugin=plugin)
                continue
            same = found.setdefault(name, [])
            if not any(p is plugin for p in same):
                same.append(plugin)
    finally:
        globalLogPublisher.removeObserver(collect)
    return found, errors


def _describe(failure: Failure, dirs: list[str]) -> str:
    """"/x/twisted/plugins/y.py failed to import: ModuleNotFoundError: No module named 'z'"."""
    where = "a plugin module"
    for frame in reversed(getattr(failure, "frames", None) or []):
        filename = os.path.abspath(str(frame[1]))
        if any(filename.startswith(d) for d in dirs):
            where = filename
            break
    value = failure.value
    return f"{where} failed to import: {type(value).__name__}: {' '.join(str(value).split())}"
