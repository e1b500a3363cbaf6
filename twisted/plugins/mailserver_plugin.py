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
        """Called by twistd as root (when started as root), before the log file is opened,
        the process daemonized and privileges dropped: every problem found here is one line
        on the terminal and exit status 1, never a server that runs half-broken."""
        from mailserver.accounts import AccountsError
        from mailserver.config import ConfigError, load_config
        from mailserver.listening import probe
        from mailserver import logjson
        from mailserver.service import make_service
        from mailserver.startup import RunAs, StartupError, prepare_log_file

        twistd = options.parent if options.parent is not None else {}
        try:
            config = load_config(options["config"])
            problems = probe(config.listen.keyed())
            if problems:
                raise StartupError("\n".join(p.message for p in problems))
            run_as = RunAs.from_twistd(twistd.get("uid"), twistd.get("gid"))
            prepare_log_file(twistd.get("logfile"), run_as)
            if getattr(twistd.get("logger"), "__module__", None) == "mailserver.logjson":
                try:
                    json_log = logjson.settings()
                except ValueError as e:
                    raise StartupError(str(e)) from None
                if not json_log.path and not twistd.get("nodaemon"):
                    raise StartupError(f"{logjson.LOG_PATH_VARIABLE}: a daemon has no standard "
                                       f"output to log to; name a file, or run twistd -n")
                prepare_log_file(json_log.path, run_as)
            server = make_service(config, run_as)
            from twisted.internet import reactor

            from mailserver.heap import freeze_startup_heap
            reactor.callWhenRunning(freeze_startup_heap)
            return server
        except ConfigError as e:
            self._exit(f"config error: {e}")
        except (StartupError, AccountsError) as e:
            self._exit(str(e))
        except OSError as e:
            self._exit(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")

    @staticmethod
    def _exit(message: str) -> None:
        for line in message.splitlines():
            sys.stderr.write(f"mailserver: {line}\n")
        sys.stderr.flush()
        raise SystemExit(1)


serviceMaker = MailServerMaker()
