"""The server's certificate, replaceable while the server runs.

Every implicit-TLS listener and every STARTTLS/STLS upgrade gets its connection from one
ReloadingContextFactory (Twisted's IOpenSSLServerConnectionCreator), which holds the
OpenSSL context of the current certificate.  `swap` puts a new one in place: connections
made afterwards use it, those already open keep theirs.

Sources of a new certificate:
- [tls] certificate/private_key files: looked at every [tls] reload_interval (a stat, in a
  thread) and on SIGHUP; read, parsed and checked in a thread (mailserver.certfiles).  A
  pair that does not parse or whose key does not match is logged and the old one kept.
- ACME (mailserver.acme_service), which swaps in what it obtains; with [storage] shared
  also what another node stored in the shared ACME store, its files watched as above.
"""

from __future__ import annotations

import datetime
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.certfiles import CertificateError, CertificatePair, Signature, check_files, \
    file_signature, load_pair
from mailserver.startup import StartupError
from mailserver.tls import alpn_select, server_context

if TYPE_CHECKING:
    from mailserver.acme_client import ChallengeBoard
    from mailserver.service import MailServer

log = Logger()

CLOCK_SKEW = datetime.timedelta(minutes=10)   # a new certificate may start this much ahead


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingContextFactory:
    """The TLS configuration every listener and STARTTLS shares."""

    def __init__(self, pair: CertificatePair) -> None:
        self._pair = pair
        self._context = server_context(pair)
        self.generation = 0
        self.alpn_challenges: ChallengeBoard | None = None   # set when ACME is on

    @property
    def pair(self) -> CertificatePair:
        return self._pair

    def swap(self, pair: CertificatePair) -> None:
        """Serve `pair` to new connections from now on."""
        self._context = server_context(pair)
        self._pair = pair
        self.generation += 1
        log.info("tls certificate reloaded ({what})", what=pair.describe())

    def context(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)   # for alpn_select
        return connection

    def for_listener(self, name: str) -> Any:
        """What the implicit-TLS listener `name` wraps its connections with: this object,
        or for the HTTPS autoconfig listener with ACME on, a view that also answers the
        tls-alpn-01 challenge (RFC 8737) on the same certificate otherwise."""
        if name == "autoconfig" and self.alpn_challenges is not None:
            return AlpnChallengeListener(self, self.alpn_challenges)
        return self


@implementer(IOpenSSLServerConnectionCreator)
class AlpnChallengeListener:
    """The shared certificate, plus RFC 8737: a handshake that offers only the
    "acme-tls/1" protocol for a name with a challenge in progress gets that challenge's
    validation certificate instead."""

    def __init__(self, parent: ReloadingContextFactory, board: ChallengeBoard) -> None:
        self.parent = parent
        self.board = board
        self._built: tuple[int, SSL.Context] | None = None

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        generation = self.parent.generation
        if self._built is None or self._built[0] != generation:
            context = server_context(self.parent.pair)
            context.set_alpn_select_callback(self._select)
            self._built = (generation, context)
        connection = SSL.Connection(self._built[1], None)
        connection.set_app_data(tlsProtocol)
        return connection

    def _select(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        """The ALPN callback, in the reactor during the handshake (before the certificate
        is sent, so the certificate can still be changed here)."""
        from mailserver.acme_client import ACME_TLS_PROTOCOL

        if ACME_TLS_PROTOCOL not in offered:
            return alpn_select(connection, offered)   # h2 / http/1.1 as on any listener
        try:
            name = (connection.get_servername() or b"").decode("ascii")
        except UnicodeDecodeError:
            name = ""
        challenge = self.board.tls_alpn01(name) if name else None
        if challenge is None:
            return SSL.NO_OVERLAPPING_PROTOCOLS
        # RFC 8737 3: the validation certificate for this name, with acme-tls/1 selected.
        try:
            connection.use_certificate(challenge.certificate)
            connection.use_privatekey(challenge.key)
        except SSL.Error:
            log.failure("acme: tls-alpn-01 validation certificate for {name} not usable",
                        name=name)
            return SSL.NO_OVERLAPPING_PROTOCOLS
        log.info("acme: tls-alpn-01 validation certificate sent for {name}", name=name)
        return ACME_TLS_PROTOCOL


class CertificateFileWatcher(service.Service):
    """Reloads [tls] certificate/private_key when they change on disk, and on SIGHUP."""

    def __init__(self, factory: ReloadingContextFactory, certificate: Any, private_key: Any,
                 interval: float, signature: Signature) -> None:
        self.factory = factory
        self.certificate = certificate
        self.private_key = private_key
        self.interval = interval
        self._signature = signature   # of the files the served pair came from
        self._loop: LoopingCall | None = None
        self._busy: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("watching the tls certificate files failed", f))

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def check(self) -> defer.Deferred:
        """The timer: reload only when a file's inode, size or mtime changed."""
        return self._reload(force=False)

    def reload(self) -> defer.Deferred:
        """SIGHUP: read the files again whatever their metadata says."""
        return self._reload(force=True)

    def _reload(self, force: bool) -> defer.Deferred:
        if self._busy is not None:
            if not force:
                return self._busy
            # A SIGHUP during a timed look (which may have read the files before they
            # changed): a forced read follows it, not the timed look's answer alone.
            return self._busy.addBoth(lambda result: self._reload(force=True))
        last = None if force else self._signature
        d = threads.deferToThread(check_files, self.certificate, self.private_key, last)
        d.addCallback(self._checked, force)
        d.addErrback(lambda f: log.failure("reading the tls certificate files failed", f))

        def done(result: Any) -> Any:
            self._busy = None
            return result
        d.addBoth(done)
        self._busy = d if not d.called else None
        return d

    def _checked(self, found: Any, force: bool) -> None:
        self._signature = found.signature
        if found.error is not None:
            # Logged once per change of the files, not at every look.
            log.warn("tls certificate not reloaded from {path}: {error}; still serving "
                     "({current})", path=str(self.certificate), error=found.error,
                     current=self.factory.pair.describe())
            return
        if found.pair is None:
            return
        if found.pair.fingerprint == self.factory.pair.fingerprint:
            if force:
                log.info("tls certificate unchanged ({what})", what=found.pair.describe())
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        if not found.pair.valid_at(now, CLOCK_SKEW) and self.factory.pair.valid_at(now):
            # Expired, or not valid yet: every client that verifies would fail, where
            # they succeed now.  A bad file never replaces a certificate that works.
            log.warn("tls certificate not reloaded from {path}: it is not valid now "
                     "({what}); still serving ({current})", path=str(self.certificate),
                     what=found.pair.describe(), current=self.factory.pair.describe())
            self._signature = None   # looked at again next time: it may be valid by then
            return
        try:
            self.factory.swap(found.pair)
        except SSL.Error as e:
            log.warn("tls certificate not reloaded from {path}: {error}",
                     path=str(self.certificate), error=str(e))


class HangupSignal(service.Service):
    """SIGHUP runs each action (certificate files read again, an ACME check).  Twisted has
    no public API for signals other than its own; the handler is installed with
    signal.signal from the main thread and only hands the work to the reactor."""

    def __init__(self) -> None:
        self.actions: list[Callable[[], Any]] = []
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        if (hasattr(signal, "SIGHUP")
                and threading.current_thread() is threading.main_thread()):
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
            self._installed = True

    def stopService(self) -> Any:
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
            self._installed = False
        return super().stopService()

    def _on_signal(self, signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(self.run)   # type: ignore[attr-defined]

    def run(self) -> None:
        log.info("SIGHUP: reloading tls certificates")
        for action in self.actions:
            defer.maybeDeferred(action).addErrback(
                lambda f: log.failure("SIGHUP action failed", f))


def build_tls(server: MailServer) -> ReloadingContextFactory:
    """The server's context factory, with what keeps its certificate current: the file
    watcher for configured files, or ACME; and the SIGHUP handler for both."""
    config, paths = server.config, server.tls_paths
    hangup = HangupSignal()
    acme = None
    if config.tls.acme_directory:
        from mailserver.acme_service import AcmeService

        acme = AcmeService.for_server(server)
    initial = acme.stored_certificate() if acme is not None else None
    source = str(paths.certificate)
    if initial is not None:
        source = f"ACME, {acme.settings.store}"   # type: ignore[union-attr]
    if initial is None:
        initial = _load_at_start(paths.certificate, paths.private_key, paths.generated)
    factory = ReloadingContextFactory(initial)
    log.info("tls certificate ({what}) from {source}", what=initial.describe(), source=source)
    if acme is not None:
        acme.attach(factory)
        acme.setServiceParent(server)
        hangup.actions.append(lambda: acme.check("SIGHUP"))
        if acme.settings.shared:
            # Another node may be the one that renews: what it stores in the shared
            # store is served here within [tls] reload_interval (SIGHUP's check reads it
            # too).
            from mailserver.acme_client import AcmeStore

            store = AcmeStore(acme.settings.store)
            CertificateFileWatcher(factory, store.certificate_path, store.private_key_path,
                                   config.tls.reload_interval,
                                   file_signature(store.certificate_path,
                                                  store.private_key_path)
                                   ).setServiceParent(server)
    else:
        # The generated pair is watched too: replacing it by hand works like any file.
        watcher = CertificateFileWatcher(factory, paths.certificate, paths.private_key,
                                         config.tls.reload_interval,
                                         file_signature(paths.certificate, paths.private_key))
        watcher.setServiceParent(server)
        hangup.actions.append(watcher.reload)
    hangup.setServiceParent(server)
    return factory


def _load_at_start(certificate: Any, private_key: Any, generated: bool) -> CertificatePair:
    """At start-up (before the reactor runs) a pair that cannot be served is one line and
    exit status 1, naming the key that points at it."""
    try:
        return load_pair(certificate, private_key)
    except CertificateError as e:
        where = "server.state_dir (generated certificate)" if generated else "tls.certificate"
        raise StartupError(f"{where}: {e}") from None
