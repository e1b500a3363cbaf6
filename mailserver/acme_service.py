"""When to talk to the ACME CA, and what to do with the answer (the reactor side).

A check runs at start, then daily, and on SIGHUP: in a thread of its own it loads the
stored certificate and, when it is missing, has less than [tls] acme_renew_before left, or
lacks a wanted name, orders a new one (mailserver.acme_client).  A new certificate is
swapped into the server's context factory at once.  A failed attempt is logged and tried
again later (5 minutes, doubling up to 6 hours); meanwhile the server serves what it has:
the stored certificate, or the self-signed one until the first issuance.

With [storage] shared the store is on the shared Maildir root and every node runs this
service (mailserver.acme_shared): an order is made under a lock there, a node finding it
taken tries again RETRY_BUSY later, and the challenges every node may be asked for are
read from there (tls-alpn-01 ones every ALPN_POLL_SECONDS).  What another node stores is
picked up by the watcher tls_reload puts on the store's files.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.acme_client import (TLS_ALPN01, AcmeNames, AcmeSettings, AcmeStore,
                                    Cancelled, ChallengeBoard, Outcome, ensure_certificate,
                                    retry_delay)
from mailserver.acme_settings import acme_names, acme_settings
from mailserver.certfiles import CertificatePair

if TYPE_CHECKING:
    from mailserver.service import MailServer
    from mailserver.tls_reload import ReloadingContextFactory

log = Logger()

CHECK_INTERVAL = 86400.0   # the daily renewal check
RETRY_BUSY = 300.0         # another node holds the order lock: look again this much later
STOP_WAIT = 5.0            # how long a stop waits for a conversation with the CA to end
# A conversation with the CA that has not ended after this long is given up: a CA (or
# something in between) that sends its answer a byte every few seconds never trips the
# per-read timeout, and every later check would otherwise wait on it for ever.
RUN_DEADLINE = 30 * 60.0


class AcmeService(service.Service):
    name = "acme"

    def __init__(self, settings: AcmeSettings, names: Callable[[], AcmeNames],
                 board: ChallengeBoard, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.settings = settings
        self.names = names
        self.board = board
        self.reactor = reactor
        self.tls: ReloadingContextFactory | None = None
        self.failures = 0
        self._cancel = threading.Event()
        self._daily: LoopingCall | None = None
        self._retry: IDelayedCall | None = None
        self._running: defer.Deferred | None = None
        self._deadline: IDelayedCall | None = None   # of the conversation running
        self._given_up: set[defer.Deferred] = set()   # conversations left to their thread
        self._alpn_poll: LoopingCall | None = None
        self._refreshing = False

    @classmethod
    def for_server(cls, server: MailServer) -> AcmeService:
        """The service for the server's config; the challenge board is published on the
        server (`acme_challenges`) for the HTTP listener's challenge resource."""
        settings = acme_settings(server.config)
        assert settings is not None
        board: ChallengeBoard
        if settings.shared:
            from mailserver.acme_shared import CHALLENGES_DIR, SharedChallengeBoard
            from mailserver.shared_state import make_private_dirs

            make_private_dirs(settings.store, server.config.maildir_root)
            board = SharedChallengeBoard(settings.store / CHALLENGES_DIR)
        else:
            settings.store.mkdir(parents=True, exist_ok=True, mode=0o700)
            board = ChallengeBoard()
        server.acme_challenges = board   # type: ignore[attr-defined]
        return cls(settings, lambda: acme_names(server.config, server.accounts.list_domains()),
                   board)

    def stored_certificate(self) -> CertificatePair | None:
        """At start-up (before the reactor runs): what an earlier run obtained."""
        return AcmeStore(self.settings.store).load_certificate()

    def attach(self, tls: ReloadingContextFactory) -> None:
        self.tls = tls
        tls.alpn_challenges = self.board

    def startService(self) -> None:
        super().startService()
        if self._running is not None:
            # A conversation from before a stop (cancelled then, its deadline too): it is
            # left to its thread; a new one starts with the first check.
            self._given_up.add(self._running)
            self._running = None
        self._cancel = threading.Event()
        self._daily = LoopingCall(self.check, "daily check")
        self._daily.clock = self.reactor
        self._daily.start(CHECK_INTERVAL, now=True)
        if self.settings.shared and self.settings.challenge == TLS_ALPN01:
            from mailserver.acme_shared import ALPN_POLL_SECONDS

            # The TLS handshake cannot wait for the disk: other nodes' tls-alpn-01
            # challenges are kept in memory, read again every second.
            self._alpn_poll = LoopingCall(self._refresh_shared_alpn)
            self._alpn_poll.clock = self.reactor
            self._alpn_poll.start(ALPN_POLL_SECONDS, now=True)

    def stopService(self) -> Any:
        self._cancel.set()
        if self._daily is not None and self._daily.running:
            self._daily.stop()
        if self._alpn_poll is not None and self._alpn_poll.running:
            self._alpn_poll.stop()
        for call in (self._retry, self._deadline):
            if call is not None and call.active():
                call.cancel()
        super().stopService()
        if self._running is None:
            return None
        # The conversation sees the cancel between its steps, but a request to the CA
        # in flight ends only with its answer or NETWORK_TIMEOUT: wait a little, without
        # holding the reactor, then leave its (daemon) thread to the process's exit.
        stopped: defer.Deferred[None] = defer.Deferred()

        def settle(result: Any = None) -> Any:
            if not stopped.called:
                if timer.active():
                    timer.cancel()
                else:
                    log.info("acme: not waiting longer for the CA's answer")
                stopped.callback(None)
            return result
        timer = self.reactor.callLater(STOP_WAIT, settle)
        self._running.addBoth(settle)
        return stopped

    def check(self, why: str = "") -> defer.Deferred:
        """Issue or renew if needed.  Never fails (failures are logged and retried)."""
        if self._running is not None:
            return self._running
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        try:
            wanted = self.names()
        except Exception:
            log.failure("acme: cannot list the names to ask for")
            return defer.succeed(None)
        ensure = ensure_certificate
        if self.settings.shared:
            from mailserver.acme_shared import ensure_certificate_shared as ensure
        # One cancel per conversation: one given up on keeps its own, set.
        cancel = self._cancel = threading.Event()
        d = in_own_thread(self.reactor, ensure, self.settings, wanted, self.board, cancel)
        d.addCallbacks(self._current(d, self._succeeded), self._current(d, self._failed))
        self._running = d
        deadline = self._deadline = self.reactor.callLater(RUN_DEADLINE, self._overdue, d,
                                                          cancel)

        def done(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            if self._running is d:
                self._running = None
            return result
        d.addBoth(done)
        return d

    def _current(self, d: defer.Deferred, handle: Callable[[Any], None]
                 ) -> Callable[[Any], None]:
        """`handle` for the result of conversation `d`, unless it was given up: a late
        result would count a failure twice, or set a second retry timer that nothing
        cancels (not even a stop)."""
        def handled(result: Any) -> None:
            if d in self._given_up:
                self._given_up.discard(d)
                log.info("acme: a conversation given up on has ended; its result is "
                         "not used")
                return None
            return handle(result)
        return handled

    def _overdue(self, d: defer.Deferred, cancel: threading.Event) -> None:
        """The conversation has run RUN_DEADLINE: given up.  Its thread (in a read that
        may never end) is left behind and stops at its next step; the next attempt is
        scheduled as after a failure."""
        if self._running is not d:
            return
        cancel.set()
        self._given_up.add(d)
        self._running = None
        self.failures += 1
        delay = retry_delay(self.failures)
        log.error("acme: no end to the conversation with {ca} after {minutes:.0f} minutes; "
                  "given up, trying again in {delay:.0f} s", ca=self.settings.directory,
                  minutes=RUN_DEADLINE / 60, delay=delay)
        if self.running:
            self._retry = self.reactor.callLater(delay, self.check, "retry")

    def _succeeded(self, outcome: Outcome) -> None:
        self.failures = 0
        if outcome.busy:
            log.info("acme: {note}; looking again in {delay:.0f} s", note=outcome.note,
                     delay=RETRY_BUSY)
            if self.running:
                self._retry = self.reactor.callLater(RETRY_BUSY, self.check, "retry")
        elif outcome.issued:
            log.info("acme: certificate issued by {ca} for {names} ({reason})",
                     ca=self.settings.directory, names=", ".join(outcome.names),
                     reason=outcome.reason)
        if outcome.note and not outcome.busy:
            log.warn("acme: {note}", note=outcome.note)
        pair = outcome.pair
        if pair is not None and self.tls is not None \
                and pair.fingerprint != self.tls.pair.fingerprint:
            self.tls.swap(pair)
        elif pair is not None and not outcome.issued and not outcome.busy:
            log.info("acme: certificate valid ({what})", what=pair.describe())

    def _failed(self, failure: Failure) -> None:
        if failure.check(Cancelled) or not self.running:
            return
        self.failures += 1
        delay = retry_delay(self.failures)
        serving = self.tls.pair.describe() if self.tls is not None else "nothing"
        log.warn("acme: getting a certificate from {ca} failed: {error}; trying again in "
                 "{delay:.0f} s; still serving ({serving})", ca=self.settings.directory,
                 error=_one_line(failure), delay=delay, serving=serving)
        self._retry = self.reactor.callLater(delay, self.check, "retry")


    def _refresh_shared_alpn(self) -> None:
        """One look at the tls-alpn-01 challenges other nodes published (in a thread)."""
        if self._refreshing:
            return
        self._refreshing = True
        refresh = self.board.refresh_alpn   # type: ignore[attr-defined]
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), refresh)

        def done(result: Any) -> None:
            self._refreshing = False
        d.addErrback(lambda f: log.failure("acme: reading the shared challenges failed", f))
        d.addBoth(done)


def in_own_thread(reactor: Any, f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """f(*args) in a thread of its own, its result fired in the reactor.

    Not the reactor's pool (an order can take minutes of waiting for the CA) and not a
    pool of our own either: stopping a pool joins its threads, which would hold the
    reactor until a request to the CA times out.  The thread is a daemon, so a stop can
    leave it behind.  (One conversation at a time is AcmeService.check's doing.)
    """
    d: defer.Deferred = defer.Deferred()

    def run() -> None:
        try:
            result = f(*args)
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)
    threading.Thread(target=run, name="acme", daemon=True).start()
    return d


def _one_line(failure: Failure) -> str:
    text = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    return " ".join(text.split())[:1000]

