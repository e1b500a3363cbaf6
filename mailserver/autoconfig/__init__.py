"""Mail client autoconfiguration over HTTP(S): Thunderbird, Outlook, Apple.

A client that knows only the user's address and password asks a well-known URL for the
servers, ports and security to use; this package answers from the configuration.
`build_factory` is what mailserver.service calls for [listen].autoconfig (HTTPS; the
service wraps it in TLS) and [listen].autoconfig_http (plain HTTP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailserver.autoconfig.resources import build_tree
from mailserver.autoconfig.settings import ClientSettings
from mailserver.autoconfig.site import AutoconfigSite

if TYPE_CHECKING:
    from mailserver.service import MailServer

__all__ = ["build_factory"]

# HTTP clients here fetch one small document; an idle connection is not kept longer.
MAX_IDLE_SECONDS = 60.0


def build_factory(server: MailServer, name: str) -> AutoconfigSite:
    settings = ClientSettings.from_config(server.config)
    tree = build_tree(settings, server.accounts, https=(name == "autoconfig"))
    board = getattr(server, "acme_challenges", None)
    if board is not None and name == "autoconfig_http":
        from mailserver.autoconfig.acme_challenge import add_challenge_resource

        add_challenge_resource(tree, board)   # ACME http-01 (RFC 8555 8.3)
    timeout = min(server.config.limits.idle_timeout, MAX_IDLE_SECONDS)
    metrics = getattr(server, "metrics", None)
    return AutoconfigSite(tree, timeout=timeout, name=name,
                          limiter=getattr(server, "limiter", None),
                          metrics=metrics.service(name) if metrics is not None else None)
