"""mailserver.metrics: rejection reasons, per-server registries, the gauges that follow
sessions, the error-counting log observer and the outbound queue's metrics."""

from __future__ import annotations

import gc
import time

import prometheus_client
import pytest
from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest

from mailserver.config import QueueConfig
from mailserver.inbound.checker import _with_message
from mailserver.metrics import Metrics, rejection_reason
from mailserver.smtp import replies as R
from mailserver.smtp.mx import MAILBOX_FULL
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.queue.runner import QueueRunner
from mailserver.smtp.queue.store import QueueStore
from mailserver.smtp.submission import RATE_LIMITED, SENDER_NOT_OWNED
from tests.unit.test_queue import MESSAGE, FakeDeliverer, tmpdir


@pytest.mark.parametrize("reply, reason", [
    (R.UNKNOWN_USER, "unknown_recipient"),
    (R.RELAY_DENIED, "relay_denied"),
    (R.MESSAGE_TOO_BIG, "size"),
    (MAILBOX_FULL, "over_quota"),
    (R.DMARC_REJECT, "dmarc"),
    (R.SPAM_REJECT, "spam"),
    (R.SPAM_TEMPFAIL, "spam"),
    (RATE_LIMITED, "rate_limit"),
    (R.TOO_MANY_RECIPIENTS, "too_many_recipients"),
    (R.LOCAL_ERROR, "temporary"),
    (R.FILTER_TEMPFAIL, "temporary"),
    (SENDER_NOT_OWNED, "policy"),
    (R.BAD_RECIPIENT_SYNTAX, "bad_address"),
    (R.SYNTAX, "syntax"),
])
def test_rejection_reason(reply, reason):
    assert rejection_reason(reply) == reason


def test_spam_filter_text_keeps_the_reason():
    """rspamd's own message replaces the text, not why the message was refused."""
    reply = _with_message(R.SPAM_REJECT, "Gtube pattern")
    assert reply.text == "Gtube pattern"
    assert rejection_reason(reply) == "spam"
    assert reply == R.Reply(554, "5.7.1", "Gtube pattern")  # the reason is no part of equality


def test_servers_do_not_share_numbers():
    first, second = Metrics(), Metrics()
    first.service("smtp").rejected(R.UNKNOWN_USER)
    first.service("smtp").auth_failed()
    labels = {"service": "smtp", "reason": "unknown_recipient"}
    assert first.registry.get_sample_value("mailserver_messages_rejected_total", labels) == 1
    assert second.registry.get_sample_value("mailserver_messages_rejected_total", labels) is None
    assert prometheus_client.REGISTRY.get_sample_value(
        "mailserver_messages_rejected_total", labels) is None


def test_series_of_a_service_start_at_zero():
    metrics = Metrics()
    for name in ("smtp", "submission", "imaps", "pop3", "autoconfig", "managesieve"):
        metrics.service(name)
    get = metrics.registry.get_sample_value
    assert get("mailserver_sessions_logged_in", {"service": "managesieve"}) == 0
    assert get("mailserver_auth_failures_total", {"service": "managesieve"}) == 0
    assert get("mailserver_messages_received_total", {"service": "smtp"}) == 0
    assert get("mailserver_auth_failures_total", {"service": "submission"}) == 0
    assert get("mailserver_sessions_logged_in", {"service": "imaps"}) == 0
    assert get("mailserver_connections_total", {"service": "autoconfig"}) == 0
    # Only where they mean something: no mail counters for IMAP, no logins for SMTP.
    assert get("mailserver_messages_received_total", {"service": "imaps"}) is None
    assert get("mailserver_sessions_logged_in", {"service": "smtp"}) is None
    assert get("mailserver_auth_failures_total", {"service": "smtp"}) is None


class _Session:
    """Stands for a protocol object (the metrics keep a weak reference)."""


def test_gauges_follow_sessions():
    metrics = Metrics()
    imap = metrics.service("imap")
    get = metrics.registry.get_sample_value
    labels = {"service": "imap"}
    one, two = _Session(), _Session()
    imap.connection_opened(one)
    imap.connection_opened(two)
    imap.logged_in(one)
    assert get("mailserver_connections_total", labels) == 2
    assert get("mailserver_connections_open", labels) == 2
    assert get("mailserver_sessions_logged_in", labels) == 1
    imap.connection_closed(one)
    imap.connection_closed(one)          # twice: still counted once
    assert get("mailserver_connections_open", labels) == 1
    assert get("mailserver_sessions_logged_in", labels) == 0
    del two                              # a session gone without connectionLost
    gc.collect()
    assert get("mailserver_connections_open", labels) == 0
    assert get("mailserver_connections_total", labels) == 2


def test_message_received_counts_mailboxes_and_latency():
    metrics = Metrics()
    smtp = metrics.service("smtp")
    smtp.message_received(data_ended=time.monotonic() - 100, mailboxes=3)
    smtp.message_received(data_ended=time.monotonic() - 100, mailboxes=0)  # all queued
    get = metrics.registry.get_sample_value
    labels = {"service": "smtp"}
    assert get("mailserver_messages_received_total", labels) == 2
    assert get("mailserver_local_deliveries_total", labels) == 3
    assert get("mailserver_delivery_seconds_count", labels) == 2
    assert get("mailserver_delivery_seconds_bucket", {**labels, "le": "60.0"}) == 0
    assert get("mailserver_delivery_seconds_bucket", {**labels, "le": "+Inf"}) == 2


def test_errors_are_counted_by_level():
    metrics = Metrics()
    log = Logger(observer=metrics.count_errors)
    log.info("fine")
    log.warn("hmm")
    log.error("broken")
    log.critical("very broken")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("failed")   # a failure is logged at level critical
    get = metrics.registry.get_sample_value
    assert get("mailserver_log_errors_total", {"level": "error"}) == 1
    assert get("mailserver_log_errors_total", {"level": "critical"}) == 2


class QueueMetricsTests(unittest.TestCase):
    """The queue runner's results, and its gauges computed when scraped."""

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics()
        self.relay = FakeDeliverer(["temp", "ok", "perm"])
        self.local = FakeDeliverer([])
        ids = iter(f"G{n}" for n in range(1, 100))
        self.runner = QueueRunner(
            QueueStore(tmpdir(self) / "queue"), QueueConfig(retry_schedule=(10.0,),
                                                            delay_warning=0.0),
            "mail.example.test", self.local, self.relay,
            lambda address: [RecipientState(address, "local")], lambda: next(ids),
            clock=self.clock, metrics=self.metrics)
        self.metrics.watch_queue(self.runner)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        yield self.runner.ready

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    @defer.inlineCallbacks
    def settle(self):
        for _ in range(20):
            self.clock.advance(0)
            busy = list(self.runner.busy.values())
            if not busy:
                return
            yield defer.DeferredList(busy)
            yield task.deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def submit(self, queue_id: str, rcpts: tuple[str, ...]):
        env = Envelope(queue_id, "alice@example.test", [RecipientState(a) for a in rcpts],
                       created=self.clock.seconds())
        spool = self.runner.new_spool(env.id)
        spool.write(MESSAGE)
        yield self.runner.commit(spool, env)
        yield self.settle()

    @defer.inlineCallbacks
    def test_results_and_gauges(self):
        assert self.value("mailserver_queue_messages") == 0
        assert self.value("mailserver_queue_oldest_seconds") == 0
        yield self.submit("M1", ("x@remote.test", "y@remote.test"))   # deferred
        assert self.value("mailserver_queue_deferred_total", destination="remote") == 2
        assert self.value("mailserver_relay_seconds_count") == 1
        self.clock.advance(5)
        assert self.value("mailserver_queue_messages") == 1
        assert self.value("mailserver_queue_oldest_seconds") == 5
        self.clock.advance(5)                                           # the retry: delivered
        yield self.settle()
        assert self.value("mailserver_queue_delivered_total", destination="remote") == 2
        assert self.value("mailserver_queue_messages") == 0
        assert self.value("mailserver_queue_oldest_seconds") == 0
        yield self.submit("M2", ("z@remote.test",))                     # bounced
        yield self.settle()
        assert self.value("mailserver_queue_bounced_total") == 1
        # The DSN to alice went to her mailbox through the queue's local delivery.
        assert self.value("mailserver_queue_delivered_total", destination="local") == 1
        assert self.value("mailserver_relay_seconds_count") == 3
