"""Build the twistd service tree from the configuration."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from twisted.application import service, strports
from twisted.internet import protocol
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailserver import logbridge
from mailserver.config import Config
from mailserver.heap import TRIM_SECONDS, can_release_free_memory, release_free_memory
from mailserver.maildir.store import INDEX_IDLE_SECONDS
from mailserver.connlimit import ConnectionLimiter, LimitedFactory
from mailserver.metrics import Metrics
from mailserver.readiness import Readiness
from mailserver.startup import RunAs, hand_over, prepare_directories

log = Logger()

# Services on implicit-TLS ports: the whole connection is wrapped in TLS.
IMPLICIT_TLS = {"submissions", "imaps", "pop3s", "autoconfig"}
# How long a thread running Python (a SORT's keys, a folder's scan) may keep the GIL while
# the reactor waits for it: 1 ms, not Python's 5, so every other session's command waits
# that much less (NOOP during 100,000-message SORTs: p50 1.2 ms instead of 2-5 ms).
SWITCH_INTERVAL = 0.001


# Service name -> "module:function"; the function takes (MailServer, service name) and
# returns the protocol factory.  A service whose module is not there yet is skipped.
FACTORIES = {
    "smtp": "mailserver.smtp.mx:build_factory",
    "submission": "mailserver.smtp.submission:build_factory",
    "submissions": "mailserver.smtp.submission:build_factory",
    "imap": "mailserver.imap.service:build_factory",
    "imaps": "mailserver.imap.service:build_factory",
    "pop3": "mailserver.pop3.service:build_factory",
    "pop3s": "mailserver.pop3.service:build_factory",
    "autoconfig": "mailserver.autoconfig:build_factory",
    "autoconfig_http": "mailserver.autoconfig:build_factory",
    "metrics": "mailserver.metrics:build_factory",
    "managesieve": "mailserver.managesieve:build_factory",
}


def _builder(name: str) -> Callable[["MailServer", str], protocol.ServerFactory] | None:
    module_name, _, function = FACTORIES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return None
    return getattr(module, function, None)


class MailServer(service.MultiService):
    """Owns what the protocol services share: accounts, store, TLS, auth, limits, and the
    outbound queue."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        from mailserver.accounts import open_accounts
        from mailserver.auth import AuthThrottle, MailRealm, build_portal
        from mailserver.hashprocess import HashProcess
        from mailserver.maildir import MaildirStore
        from mailserver.tls import ensure_certificate
        from mailserver.tls_reload import build_tls

        self.config = config
        self.readiness = Readiness()   # systemd's READY=1 / STOPPING=1
        # Python delivery filters ([filters], mailserver.filters): one named there but
        # not installed is a configuration error before anything is created, not mail
        # delivered unfiltered.
        self.filters: list[Any] = []
        if config.filters.plugins:
            from mailserver.filters import load_filters

            self.filters = load_filters(config.filters.plugins)
        for path in (config.state_dir, config.maildir_root):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if config.storage.shared:   # DKIM keys every node signs with (shared_state)
            from mailserver.shared_state import adopt_shared_keys

            adopt_shared_keys(config.state_dir / "dkim", config.dkim_dir,
                              config.maildir_root)
        self.tls_paths = ensure_certificate(config)
        # One context factory for every TLS listener and STARTTLS, its certificate
        # replaced without a restart (files reloaded, ACME renewals): tls_reload.
        self.tls = build_tls(self)
        # SQLite in state_dir, or ([accounts] url) PostgreSQL through an in-memory replica
        # whose listener runs as a child service.
        self.accounts = open_accounts(config, server=True)
        if service.IService.providedBy(self.accounts):
            self.accounts.setServiceParent(self)
        shared = None
        if config.storage.shared:   # other nodes use the root too: indexes in state_dir
            from mailserver.maildir.shared_folder import SharedStorage

            shared = SharedStorage(config.maildir_root, config.state_dir)
        self.store = MaildirStore(config.maildir_root, config.server.hostname,
                                  commit_process=True, shared=shared)
        # Nodes sharing the Maildir root and a PostgreSQL accounts database: each one's
        # folder changes reach the others' sessions, POP3's IN-USE holds across them.
        self.crossnode = None
        if config.accounts.url:
            from mailserver.accounts_pg import connect
            from mailserver.crossnode import CrossNode

            url = config.accounts.url
            self.crossnode = CrossNode(self.accounts, self.store, lambda: connect(url))
            self.crossnode.setServiceParent(self)
            self.pop3_locks = self.crossnode.pop3_locks
        self.limiter = ConnectionLimiter(config.limits.max_connections,
                                         config.limits.max_connections_per_ip)
        # What [listen].metrics serves; counted also when nothing serves it.
        self.metrics = Metrics()
        # One realm and portal for every protocol: each protocol module registers the
        # avatar for its interface when its factory is built.
        self.realm = MailRealm()
        # argon2id verification in a child process of its own (hashprocess.py).
        self.hash_process = HashProcess()
        self.hash_process.setServiceParent(self)
        self.portal = build_portal(self.accounts, self.realm, config.auth.login_cache_ttl,
                                   self.hash_process)
        self.throttle = AuthThrottle(config.limits.auth_failure_delay_after,
                                     config.limits.auth_failure_window)
        # Outbound: the queue (with its runner and relay) that MX forwarding and
        # submission hand messages to, and the per-user submission rate.
        from mailserver.ratelimit import SlidingWindowCounter
        from mailserver.smtp.outbound import build_queue

        self.send_rate = SlidingWindowCounter(config.limits.messages_per_hour, 3600.0)
        # Sieve and the delivery filters at every local delivery (MX, submission's local
        # recipients, the queue's local retries); it queues redirects and answers.
        from mailserver.sieve.delivery import build_sieve

        self.sieve = build_sieve(self)
        self.queue = build_queue(self)
        self.queue.setServiceParent(self)
        if self.sieve is not None:
            self.sieve.queue = self.queue
        # Inbound checks on the MX (SPF, DKIM, DMARC, ARC, blocklists, spam filter).
        self.checker = None
        inbound = config.inbound
        if (inbound.spf or inbound.dkim or inbound.dmarc or inbound.arc or inbound.dnsbl
                or inbound.rspamd_url or inbound.greet_delay > 0):
            from mailserver.inbound.checker import build_checker
            from mailserver.smtp.checked import clean_spool

            clean_spool(config.state_dir / "inbound")
            self.checker = build_checker(self)
        # Every endpoint of a service (listen.smtp may be a list) gets the one factory.
        # listener service name -> (its config key, its endpoint description)
        self.listeners: dict[str, tuple[str, str]] = {}
        for name, descriptions in config.listen.enabled().items():
            build = _builder(name)
            if build is None:
                log.warn("listen.{name} = {desc!r}: this service is not available yet; "
                         "not listening", name=name, desc=list(descriptions))
                continue
            factory = build(self, name)
            if isinstance(factory, LimitedFactory):
                factory.limiter = self.limiter
                factory.metrics = self.metrics.service(name)
            if name in IMPLICIT_TLS:
                factory = TLSMemoryBIOFactory(self.tls.for_listener(name), False, factory)
            single = isinstance(getattr(config.listen, name), str)
            for i, description in enumerate(descriptions):
                listener = strports.service(description, factory)
                listener.setName(name if single else f"{name}[{i}]")
                listener.setServiceParent(self)
                self.listeners[listener.name] = (f"listen.{listener.name}", description)

    def privilegedStartService(self) -> None:
        """Bind the listeners (as root, before twistd drops privileges).  An endpoint that
        cannot listen (a port taken since the check at start-up, a UNIX socket path that
        does not exist) is one line naming its key, in the log and on stderr, and exit
        status 1, instead of twistd's traceback."""
        service.Service.privilegedStartService(self)
        self.readiness.open()   # while still root: the socket may be root's alone
        for child in self:   # what MultiService does, one child at a time
            listener = self.listeners.get(child.name or "")
            if listener is None:
                child.privilegedStartService()
                continue
            try:
                child.privilegedStartService()
            except Exception as e:
                key, description = listener
                reason = (e.socketError if isinstance(e, CannotListenError) else None) or e
                message = f"{key} = {description!r}: cannot listen: {reason}"
                log.critical("mailserver: {message}", message=message)
                # The terminal twistd started from (its sys.stderr now feeds the log).
                terminal = sys.__stderr__
                if terminal is not None and terminal is not sys.stderr:
                    terminal.write(f"mailserver: {message}\n")
                    terminal.flush()
                raise SystemExit(1) from None

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.metrics.count_errors)
        super().startService()
        log.info("mailserver {hostname} started (pid {pid}); maildirs in {root}",
                 hostname=self.config.server.hostname, pid=os.getpid(),
                 root=str(self.config.maildir_root))
        self.readiness.ready(self.config.server.hostname, self.listeners)
        self.store.clean_tmp().addErrback(
            lambda f: log.failure("cleaning tmp/ failed", f))
        self._index_sweep = LoopingCall(self.store.close_idle_indexes)
        self._index_sweep.start(INDEX_IDLE_SECONDS, now=False).addErrback(
            lambda f: log.failure("closing idle folder indexes failed", f))
        if can_release_free_memory():
            self._heap_trim = LoopingCall(deferToThread, release_free_memory)
            self._heap_trim.start(TRIM_SECONDS, now=False).addErrback(
                lambda f: log.failure("returning free memory failed", f))

    def stopService(self) -> Any:
        self.readiness.stopping()
        if getattr(self, "_index_sweep", None) is not None and self._index_sweep.running:
            self._index_sweep.stop()
        if getattr(self, "_heap_trim", None) is not None and self._heap_trim.running:
            self._heap_trim.stop()
        if self.checker is not None and self.checker.rspamd is not None:
            self.checker.rspamd.close()
        if self.sieve is not None:
            self.sieve.close()
        globalLogPublisher.removeObserver(self.metrics.count_errors)
        return super().stopService()


def make_service(config: Config, run_as: RunAs | None = None) -> service.MultiService:
    """The server for `config`.  `run_as`: the user twistd drops to after binding the
    ports (--uid/--gid); default the current one.  Raises StartupError (one line) when the
    directories cannot be made usable for that user."""
    logbridge.install()   # before anything is built: disk modules log from the start
    sys.setswitchinterval(SWITCH_INTERVAL)
    run_as = run_as or RunAs.current()
    prepare_directories(config, run_as)
    server = MailServer(config)
    # What building it created as root (certificate, accounts database, queue directories)
    # goes to the user the server will run as.
    hand_over(config, run_as)
    return server
