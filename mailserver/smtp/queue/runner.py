"""The queue runner: takes due messages from the queue and delivers them, in the reactor.

Every second (and at once when a message is queued) it starts attempts for due messages,
at most `[queue].concurrency` at a time.  After an attempt the envelope is rewritten (in a
thread) before anything else happens to the message, so a recipient that succeeded is
never tried again.  Temporary failures wait for the next step of `[queue].retry_schedule`
(the last step repeats) until `[queue].max_age`; permanent failures and expiry produce
one DSN to the sender (never for a null sender), a long delay one warning.

`mailserver-admin queue flush|delete` leave requests in queue/control/; the runner acts on
them at its next tick (within a second) and removes the request file to say it is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.metrics import Metrics
from mailserver.smtp.queue.attempt import AttemptResult
from mailserver.smtp.queue.dsn import build_dsn, read_original_headers
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.queue.store import QueueLocked, QueueStore, SpoolFile

if TYPE_CHECKING:
    from mailserver.config import QueueConfig

log = Logger()

TICK = 1.0
STOP_GRACE = 3.0  # seconds stopService waits for attempts in flight to record results
# ... of which a delivery whose message is sent gets this long for its final reply
ENDING_GRACE = 2.0

Results = list[tuple[RecipientState, AttemptResult]]
Router = Callable[[str], list[RecipientState]]


class Deliverer:
    """What the runner hands recipients to (QueueLocalDelivery, Relay)."""

    def deliver(self, env: Envelope, message: Any,
                recipients: Sequence[RecipientState]) -> defer.Deferred:  # -> Results
        raise NotImplementedError


class QueueRunner(service.Service):
    name = "queue"

    def __init__(self, store: QueueStore, config: "QueueConfig", hostname: str,
                 local: Deliverer, relay: Deliverer, router: Router,
                 new_id: Callable[[], str], clock: IReactorTime | None = None,
                 metrics: Metrics | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self.config = config
        self.hostname = hostname
        self.local = local
        self.relay = relay
        self.router = router
        self.new_id = new_id
        self.clock = clock
        self.entries: dict[str, Envelope] = {}
        self.busy: dict[str, defer.Deferred] = {}
        self._doomed: dict[str, Any] = {}  # id -> request file: deleted while in flight
        self._loop: task.LoopingCall | None = None
        self._kick_call: Any = None
        self._active = False
        self.ready: defer.Deferred[None] = defer.Deferred()  # fires once the queue is loaded

    # -- life cycle --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        try:
            self.store.lock()
        except QueueLocked:
            log.critical("queue: {path} is locked by another process (a second server on "
                         "the same state_dir?); this server will not deliver queued mail",
                         path=str(self.store.lock_path))
            return
        except OSError as e:
            log.critical("queue: cannot use {dir}: {error}; queued mail is not delivered",
                         dir=str(self.store.root), error=e)
            return
        self._active = True
        # Before any listener runs (this service starts first): a few directory scans.
        try:
            self.store.clean_interrupted()
        except OSError as e:
            log.error("queue: cannot clean up interrupted accepts: {error}", error=e)
        d = threads.deferToThread(lambda: list(self.store.load()))
        d.addErrback(self._load_failed)
        d.addCallback(self._loaded)

    def _load_failed(self, failure: Failure) -> list[Envelope]:
        log.failure("queue: cannot load the queued messages; new ones are still delivered",
                    failure)
        return []

    def _loaded(self, envelopes: list[Envelope]) -> None:
        if not self._active:  # stopped meanwhile
            return
        for env in envelopes:
            self.entries.setdefault(env.id, env)
        if envelopes:
            log.info("queue: {count} messages waiting", count=len(envelopes))
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(TICK, now=True)
        self.ready.callback(None)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._kick_call is not None and self._kick_call.active():
            self._kick_call.cancel()
        abort = getattr(self.relay, "abort_all", None)
        if abort is not None:
            abort(keep_ending=True)
        pending = list(self.busy.values())
        if not pending:
            if abort is not None:
                abort()
            self._release()
            return None
        late = self.clock.callLater(ENDING_GRACE, abort) if abort is not None else None
        d = defer.DeferredList(pending, consumeErrors=True)
        d.addTimeout(STOP_GRACE, self.clock)

        def stopped(_: Any) -> None:
            if late is not None and late.active():
                late.cancel()
            self._release()

        d.addBoth(stopped)
        return d

    def _release(self) -> None:
        self._active = False
        self.store.unlock()

    # -- intake ------------------------------------------------------------------------

    def new_spool(self, queue_id: str) -> SpoolFile:
        return self.store.open_spool(queue_id)

    def commit(self, spool: SpoolFile, env: Envelope, fsync: bool = True) -> defer.Deferred:
        """Finish a spool file and queue it with `env`; fires when both are durable."""
        def work() -> None:
            spool.finish_sync(fsync=fsync)
            self.store.commit(spool, env)

        d = threads.deferToThread(work)
        d.addCallback(lambda _: self.enqueue(env))
        d.addErrback(self._discard_spool, spool)
        return d

    def commit_copy(self, source: Any, env: Envelope, drop_leading: tuple[str, ...]) -> defer.Deferred:
        """Queue a copy of an already stored message file (a Maildir copy)."""
        def work() -> None:
            spool = self.store.copy_to_spool(env.id, source, drop_leading)
            env.size = spool.size
            env.eight_bit = spool.eight_bit
            try:
                self.store.commit(spool, env)
            except BaseException:
                spool.abort()
                raise

        return threads.deferToThread(work).addCallback(lambda _: self.enqueue(env))

    def _discard_spool(self, failure: Failure, spool: SpoolFile) -> Failure:
        spool.abort()
        return failure

    def enqueue(self, env: Envelope) -> None:
        """A message now durably queued: deliver it as soon as a slot is free."""
        self.entries[env.id] = env
        log.info("queue {id}: queued from=<{sender}> to={rcpts} size={size}", id=env.id,
                 sender=env.sender, rcpts=",".join(r.address for r in env.pending),
                 size=env.size)
        self._kick()

    def submit_generated(self, sender: str, recipient: str, data: bytes) -> defer.Deferred:
        """Queue a message the server wrote itself (a DSN) to `recipient`."""
        targets = self.router(recipient)
        if not targets:
            log.warn("queue: no destination for generated message to <{rcpt}>; dropped",
                     rcpt=recipient)
            return defer.succeed(None)
        env = Envelope(self.new_id(), sender, targets, created=self.clock.seconds(),
                       next_attempt=0.0, size=len(data))
        spool = self.store.open_spool(env.id)
        spool.write(data)
        env.eight_bit = spool.eight_bit
        return self.commit(spool, env)

    # -- scheduling --------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._active or self._loop is None:
            return
        if self._kick_call is None or not self._kick_call.active():
            self._kick_call = self.clock.callLater(0, self._run_due)

    def _tick(self) -> None:
        try:
            self._handle_requests()
        except OSError as e:
            log.error("queue: cannot read admin requests: {error}", error=e)
        self._run_due()

    def _run_due(self) -> None:
        now = self.clock.seconds()
        due = sorted((env.next_attempt, env.id) for env in self.entries.values()
                     if env.id not in self.busy and env.next_attempt <= now)
        for _, queue_id in due:
            if len(self.busy) >= self.config.concurrency:
                break
            self._start(self.entries[queue_id])
        if self.config.delay_warning:  # messages waiting long between two attempts
            for env in list(self.entries.values()):
                if (env.id not in self.busy and self._warning_due(env, now)
                        and len(self.busy) < self.config.concurrency):
                    self._start_job(env, self._warn(env))

    def _start(self, env: Envelope) -> None:
        self._start_job(env, self._attempt(env))

    def _start_job(self, env: Envelope, d: defer.Deferred) -> None:
        self.busy[env.id] = d

        def done(result: Any) -> None:
            self.busy.pop(env.id, None)
            if isinstance(result, Failure):
                log.failure("queue {id}: attempt failed", result, id=env.id)
                env.next_attempt = self.clock.seconds() + self.config.retry_schedule[0]
            if env.id in self._doomed:
                self._delete(env.id, self._doomed.pop(env.id))
            elif env.id in self.entries and env.next_attempt <= self.clock.seconds():
                self._kick()

        d.addBoth(done)

    def retry_delay(self, attempts: int) -> float:
        schedule = self.config.retry_schedule
        return schedule[min(max(attempts, 1), len(schedule)) - 1]

    # -- one attempt -------------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, env: Envelope):
        pending = env.pending
        message = self.store.message_path(env.id)
        jobs = []
        local = [r for r in pending if r.kind == "local"]
        remote = [r for r in pending if r.kind == "remote"]
        if local:
            jobs.append(defer.maybeDeferred(self.local.deliver, env, message, local))
        if remote:
            jobs.append(self.metrics.time_relay(
                defer.maybeDeferred(self.relay.deliver, env, message, remote)))
        outcomes = yield defer.DeferredList(jobs, consumeErrors=True)
        results: Results = []
        for (ok, value), group in zip(outcomes, [g for g in (local, remote) if g]):
            if ok:
                results.extend(value)
            else:
                log.failure("queue {id}: delivery error", value, id=env.id)
                results.extend((r, AttemptResult.temporary(
                    f"internal error ({value.type.__name__})", "4.3.0")) for r in group)
        now = self.clock.seconds()
        env.attempts += 1
        # Failures whose DSN could not be queued last time (state failed, not reported).
        newly_failed = [r for r in env.recipients if r.state == "failed" and not r.reported]
        # Logged once the envelope that records them is on disk: a log line never reports
        # an outcome that a crash could still undo.
        outcome: list[tuple[str, dict]] = []
        for r, result in results:
            r.attempts += 1
            self.metrics.queue_result(r.kind, result.ok, result.permanent)
            if result.ok:
                r.state = "delivered"
                outcome.append(("queue {id}: delivered to <{rcpt}> via {mta}: {reply}",
                                dict(rcpt=r.address, mta=result.remote_mta or "local",
                                     reply=result.text)))
                continue
            r.last_error, r.status, r.remote_mta = result.text, result.status, result.remote_mta
            if result.permanent:
                r.state = "failed"
                newly_failed.append(r)
                outcome.append(("queue {id}: <{rcpt}> failed permanently: {error}",
                                dict(rcpt=r.address, error=result.text)))
            else:
                outcome.append(("queue {id}: <{rcpt}> deferred: {error}",
                                dict(rcpt=r.address, error=result.text)))
        if env.pending and now - env.created >= self.config.max_age:
            self.metrics.queue_expired(len(env.pending))
            for r in env.pending:
                r.state = "failed"
                r.status = "4.4.7"  # RFC 3463: delivery time expired
                r.last_error = r.last_error or "delivery time expired"
                newly_failed.append(r)
            log.info("queue {id}: expired after {days:.1f} days", id=env.id,
                     days=(now - env.created) / 86400)
        if env.pending:
            env.next_attempt = min(now + self.retry_delay(env.attempts),
                                   env.created + self.config.max_age)
        elif newly_failed:   # only a DSN is owed: at the first retry if it cannot be queued
            env.next_attempt = now + self.retry_delay(1)
        warn = self._warning_due(env, now)
        if newly_failed or warn:
            # What this attempt delivered goes on disk before a DSN is made: one that
            # cannot be queued (or a crash meanwhile) must not have it delivered again.
            env.warned = env.warned or warn   # at most one warning
            yield self._save(env)
            _log_outcome(env, outcome)
            outcome = []
        if newly_failed:
            yield self._notify(env, newly_failed, "failed")
        if warn:
            yield self._notify(env, env.pending, "delayed")
        yield self._save(env)
        _log_outcome(env, outcome)

    def _warning_due(self, env: Envelope, now: float) -> bool:
        return bool(self.config.delay_warning and env.pending and not env.warned and env.sender
                    and now - env.created >= self.config.delay_warning)

    @defer.inlineCallbacks
    def _warn(self, env: Envelope):
        env.warned = True  # at most one warning, also if this one cannot be queued
        yield self._notify(env, env.pending, "delayed")
        yield self._save(env)

    @defer.inlineCallbacks
    def _notify(self, env: Envelope, recipients: list[RecipientState], action: str):
        """Queue one DSN about `recipients` (durably, before the envelope says so)."""
        if not env.sender:
            log.info("queue {id}: no DSN for a message with a null sender", id=env.id)
            for r in recipients:
                r.reported = True
            return
        headers = yield threads.deferToThread(read_original_headers,
                                              self.store.message_path(env.id), env.prefix)
        data = build_dsn(self.hostname, env, recipients, action, headers,  # type: ignore[arg-type]
                         self.clock.seconds(),
                         retry_until=env.created + self.config.max_age)
        yield self.submit_generated("", env.sender, data)
        for r in recipients:
            r.reported = True
        log.info("queue {id}: {kind} DSN queued to <{sender}> for {rcpts}", id=env.id,
                 kind=action, sender=env.sender, rcpts=",".join(r.address for r in recipients))

    def _save(self, env: Envelope) -> defer.Deferred:
        """Write the envelope, or remove the message once nothing is owed for it: no
        delivery pending, no failure whose DSN is still to be queued."""
        if env.id not in self.entries:
            return defer.succeed(None)
        if env.pending or any(r.state == "failed" and not r.reported for r in env.recipients):
            return threads.deferToThread(self.store.save, env)
        del self.entries[env.id]
        log.info("queue {id}: done, removed from the queue", id=env.id)
        return threads.deferToThread(self.store.remove, env.id)

    # -- admin requests ----------------------------------------------------------------

    def _handle_requests(self) -> None:
        for action, queue_id, path in self.store.requests():
            if action == "flush":
                now = self.clock.seconds()
                for env in self.entries.values():
                    env.next_attempt = min(env.next_attempt, now)
                log.info("queue: flush requested by the administrator")
            elif action == "delete" and queue_id:
                if queue_id in self.busy:
                    self._doomed[queue_id] = path  # answered when the attempt is over
                    continue
                self._delete(queue_id, path)
                continue
            _unlink_request(path)

    def _delete(self, queue_id: str, request: Any = None) -> None:
        self.entries.pop(queue_id, None)
        log.info("queue {id}: deleted by the administrator", id=queue_id)
        d = threads.deferToThread(self.store.remove, queue_id)
        d.addErrback(lambda f: log.failure("queue {id}: delete failed", f, id=queue_id))
        if request is not None:
            d.addBoth(lambda _: _unlink_request(request))


def _log_outcome(env: Envelope, outcome: list[tuple[str, dict]]) -> None:
    for text, fields in outcome:
        log.info(text, id=env.id, **fields)


def _unlink_request(path: Any) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
