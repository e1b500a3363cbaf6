"""twistd plugin: `twistd -n mailserver [--config PATH]`."""

from __future__ import annotations

import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path to mailserver.toml (default: the shipped etc/mailserver.toml)"],
    ]


@implementer(IServiceMaker, IPlugin)
class MailServerMaker:
    tapname = "mailserver"
    description = "Mail server: SMTP (MX and submission), IMAP and POP3 over Maildir."
    options = Options

    def makeService(self, options):
        from mailserver.config import ConfigError, load_config
        from mailserver.service import make_service

        try:
            config = load_config(options["config"])
            return make_service(config)
        except ConfigError as e:
            sys.stderr.write(f"mailserver: config error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1)


serviceMaker = MailServerMaker()
