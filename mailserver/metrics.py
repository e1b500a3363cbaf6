"""Prometheus metrics: what the server counts, and the page [listen].metrics serves.

Every `MailServer` has its own `Metrics` with its own registry (never prometheus_client's
process-wide one), so that two servers in one process never add to each other's numbers.
Protocol code gets the `ServiceMetrics` of its listener through its factory or context and
calls one method per event; the queue runner gets the `Metrics`.  Labels stay few: the
service names of [listen], a rejection reason, a TLS version, a log level; never an
address.

The page is rendered in the reactor: the queue's gauges read the runner's in-memory state
at scrape time (no disk walk), and that state belongs to the reactor thread.
"""

from __future__ import annotations

import time
import weakref
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.web import resource

if TYPE_CHECKING:
    from twisted.web.server import Request

    from mailserver.smtp.queue.runner import QueueRunner
    from mailserver.smtp.replies import Reply

# End of DATA to 250: a commit group's fsync (milliseconds) up to inbound checks that wait
# for DNS or the spam filter (seconds).
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
# One relay attempt: MX lookup, connect, TLS, the transaction; up to relay.timeout per step.
RELAY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Enhanced status codes (RFC 3463) whose meaning is the reason, for replies that carry
# none of their own (Reply.reason).
_REASON_BY_STATUS = {"5.1.1": "unknown_recipient", "4.2.2": "over_quota", "5.2.2": "over_quota",
                     "5.3.4": "size", "4.5.3": "too_many_recipients"}
_REASON_BY_CLASS = {"5.1.": "bad_address", "5.5.": "syntax", "5.7.": "policy"}
# Services whose sessions log in and stay logged in (mailserver_sessions_logged_in).
LOGIN_SERVICES = ("imap", "imaps", "pop3", "pop3s", "managesieve")
# The per-service series each listener exports from the start (ServiceMetrics attributes).
_CONNECTION_SERIES = ("_accepted", "_refused")
_MAIL_SERIES = ("_received", "_delivered", "_delivery_seconds")
_SERIES_OF = {
    "smtp": _CONNECTION_SERIES + _MAIL_SERIES,
    "submission": _CONNECTION_SERIES + _MAIL_SERIES + ("_auth_failures",),
    "submissions": _CONNECTION_SERIES + _MAIL_SERIES + ("_auth_failures",),
    **{name: _CONNECTION_SERIES + ("_auth_failures",) for name in LOGIN_SERVICES},
}
_ERROR_LEVELS = {LogLevel.error: "error", LogLevel.critical: "critical"}


def rejection_reason(reply: "Reply") -> str:
    """The `reason` label of a refusal: the reply's own tag, else its status code's meaning,
    else 'temporary' (4xx) or 'other'."""
    tagged = getattr(reply, "reason", "")
    if tagged:
        return tagged
    status = reply.enhanced
    if status in _REASON_BY_STATUS:
        return _REASON_BY_STATUS[status]
    if reply.temporary:
        return "temporary"
    return _REASON_BY_CLASS.get(status[:4], "other")


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Counter(
            "mailserver_connections", "Connections accepted, per service",
            ["service"], registry=r)
        self.connections_refused = Counter(
            "mailserver_connections_refused", "Connections refused at limits.max_connections "
            "or max_connections_per_ip, per service", ["service"], registry=r)
        self.connections_open = Gauge(
            "mailserver_connections_open", "Connections open now, per service",
            ["service"], registry=r)
        self.tls_sessions = Counter(
            "mailserver_tls_sessions", "TLS handshakes completed (implicit TLS and STARTTLS), "
            "per service and protocol version", ["service", "version"], registry=r)
        self.auth_failures = Counter(
            "mailserver_auth_failures", "Failed logins (AUTH, LOGIN, USER/PASS), per service",
            ["service"], registry=r)
        self.logged_in = Gauge(
            "mailserver_sessions_logged_in", "IMAP, POP3 and ManageSieve sessions logged in now",
            ["service"], registry=r)
        self.received = Counter(
            "mailserver_messages_received", "Messages accepted (250 after DATA), per service",
            ["service"], registry=r)
        self.rejected = Counter(
            "mailserver_messages_rejected", "Refusals of a message (at MAIL or after DATA) or "
            "of one recipient (at RCPT), per service and reason", ["service", "reason"],
            registry=r)
        self.local_deliveries = Counter(
            "mailserver_local_deliveries", "Copies of accepted messages stored into local "
            "mailboxes before the 250 (one per mailbox)", ["service"], registry=r)
        self.delivery_seconds = Histogram(
            "mailserver_delivery_seconds", "From the end of DATA to the 250 reply (message "
            "durable in every mailbox or the queue)", ["service"], buckets=DELIVERY_BUCKETS,
            registry=r)
        self.queue_delivered = Counter(
            "mailserver_queue_delivered", "Recipients the outbound queue delivered: relayed "
            "(remote) or stored on a retry (local)", ["destination"], registry=r)
        self.queue_deferred = Counter(
            "mailserver_queue_deferred", "Queue delivery attempts that failed temporarily, per "
            "recipient", ["destination"], registry=r)
        self.queue_bounced = Counter(
            "mailserver_queue_bounced", "Queued recipients that failed permanently or expired "
            "(reported to the sender in a DSN)", registry=r)
        self.relay_seconds = Histogram(
            "mailserver_relay_seconds", "Duration of one relay attempt of a queued message "
            "(all its remote recipients)", buckets=RELAY_BUCKETS, registry=r)
        self.log_errors = Counter(
            "mailserver_log_errors", "Events logged at level error or critical",
            ["level"], registry=r)
        for destination in ("local", "remote"):
            self.queue_delivered.labels(destination)
            self.queue_deferred.labels(destination)
        for level in _ERROR_LEVELS.values():
            self.log_errors.labels(level)
        self._services: dict[str, ServiceMetrics] = {}

    def service(self, name: str) -> ServiceMetrics:
        """The metrics of one listener ("smtp", "imaps", ...)."""
        if name not in self._services:
            self._services[name] = ServiceMetrics(self, name)
        return self._services[name]

    # -- the outbound queue -----------------------------------------------------------------

    def watch_queue(self, runner: "QueueRunner") -> None:
        """Export the runner's length and oldest entry, read when scraped."""
        self.registry.register(_QueueCollector(runner))

    def queue_result(self, destination: str, ok: bool, permanent: bool) -> None:
        """One recipient's attempt: `destination` is 'local' or 'remote'."""
        if ok:
            self.queue_delivered.labels(destination).inc()
        elif permanent:
            self.queue_bounced.inc()
        else:
            self.queue_deferred.labels(destination).inc()

    def queue_expired(self, count: int) -> None:
        """Recipients that bounce because the message reached queue.max_age."""
        self.queue_bounced.inc(count)

    def time_relay(self, d: defer.Deferred) -> defer.Deferred:
        """Observe how long the relay attempt `d` takes; returns `d` unchanged."""
        start = time.monotonic()

        def observe(result: Any) -> Any:
            self.relay_seconds.observe(time.monotonic() - start)
            return result

        return d.addBoth(observe)

    # -- the log ------------------------------------------------------------------------------

    def count_errors(self, event: dict[str, Any]) -> None:
        """A twisted.logger observer: counts events at level error and critical."""
        level = _ERROR_LEVELS.get(event.get("log_level"))  # type: ignore[arg-type]
        if level is not None:
            self.log_errors.labels(level).inc()


def unexported(service: str) -> ServiceMetrics:
    """Metrics for a protocol built without a server (as its unit tests do): counted in a
    registry of their own that nothing serves."""
    return Metrics().service(service)


class ServiceMetrics:
    """The metrics of one listener, with its label value bound once.

    The series a service has are exported from the start (at 0), so that a rate over the
    first event is right; others appear with their first event."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.metrics = metrics
        self.name = name
        # Sessions, not counts: closing a connection twice or one never counted changes
        # nothing, and a protocol object that is gone is gone from the gauge too.
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._logged_in: weakref.WeakSet[Any] = weakref.WeakSet()
        metrics.connections_open.labels(name).set_function(lambda: len(self._open))
        if name in LOGIN_SERVICES:
            metrics.logged_in.labels(name).set_function(lambda: len(self._logged_in))
        for attribute in _SERIES_OF.get(name, _CONNECTION_SERIES):
            getattr(self, attribute)

    @cached_property
    def _accepted(self) -> Any:
        return self.metrics.connections.labels(self.name)

    @cached_property
    def _refused(self) -> Any:
        return self.metrics.connections_refused.labels(self.name)

    @cached_property
    def _auth_failures(self) -> Any:
        return self.metrics.auth_failures.labels(self.name)

    @cached_property
    def _received(self) -> Any:
        return self.metrics.received.labels(self.name)

    @cached_property
    def _delivered(self) -> Any:
        return self.metrics.local_deliveries.labels(self.name)

    @cached_property
    def _delivery_seconds(self) -> Any:
        return self.metrics.delivery_seconds.labels(self.name)

    def connection_opened(self, protocol: Any) -> None:
        self._accepted.inc()
        self._open.add(protocol)

    def connection_closed(self, protocol: Any) -> None:
        self._open.discard(protocol)
        self._logged_in.discard(protocol)

    def connection_refused(self) -> None:
        self._refused.inc()

    def tls_established(self, transport: Any) -> None:
        """A completed handshake, counted by protocol version (e.g. 'TLSv1.3')."""
        try:
            version = transport.getHandle().get_protocol_version_name()
        except Exception:
            version = "unknown"
        self.metrics.tls_sessions.labels(self.name, version).inc()

    def auth_failed(self) -> None:
        self._auth_failures.inc()

    def logged_in(self, session: Any) -> None:
        """An IMAP, POP3 or ManageSieve session logged in; it counts until its connection closes."""
        self._logged_in.add(session)

    def message_received(self, data_ended: float, mailboxes: int) -> None:
        """A message accepted: `data_ended` is time.monotonic() at the end of its DATA,
        `mailboxes` the local mailboxes it was stored in."""
        self._received.inc()
        self._delivery_seconds.observe(time.monotonic() - data_ended)
        if mailboxes:
            self._delivered.inc(mailboxes)

    def rejected(self, reply: "Reply") -> None:
        """A refusal given to the client (see `rejection_reason`)."""
        self.metrics.rejected.labels(self.name, rejection_reason(reply)).inc()


class _QueueCollector:
    """Gauges of the outbound queue, computed from the runner's entries when scraped."""

    def __init__(self, runner: "QueueRunner") -> None:
        self.runner = runner

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families(None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return self._families(self.runner)

    @staticmethod
    def _families(runner: "QueueRunner | None") -> Iterator[GaugeMetricFamily]:
        length = GaugeMetricFamily("mailserver_queue_messages",
                                   "Messages in the outbound queue")
        oldest = GaugeMetricFamily("mailserver_queue_oldest_seconds",
                                   "Age of the oldest message in the outbound queue (0: empty)")
        if runner is not None:
            entries = list(runner.entries.values())
            length.add_metric([], len(entries))
            now = runner.clock.seconds()
            oldest.add_metric([], max(0.0, now - min(e.created for e in entries))
                              if entries else 0.0)
        yield length
        yield oldest


# -- the page ---------------------------------------------------------------------------------

class _WithoutCreated:
    """The registry without the `_created` series prometheus_client adds to every counter
    and histogram: in the text format they double the series and nothing reads them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        for metric in self.registry.collect():   # new Metric objects on every collect
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class MetricsPage(resource.Resource):
    """GET /metrics: the registry in the exposition format the scraper asks for (the
    Prometheus text format unless it asks for OpenMetrics)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: "Request") -> bytes:
        try:
            encoder, content_type = choose_encoder(
                (request.getHeader(b"accept") or b"").decode("latin-1"))  # type: ignore[union-attr]
        except Exception:  # an Accept it cannot read (version=abc): the text format
            encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encoder(_WithoutCreated(self.registry))

    def render_HEAD(self, request: "Request") -> bytes:  # RFC 9110 9.3.2: GET's headers
        request.setHeader(b"content-length", b"%d" % len(self.render_GET(request)))
        return b""

    def render(self, request: "Request") -> bytes:
        if request.postpath:   # /metrics/anything
            return resource.NoResource().render(request)
        return super().render(request)


class MetricsRoot(resource.Resource):
    """/metrics and nothing else: every other path is 404."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.putChild(b"metrics", MetricsPage(registry))

    def getChild(self, path: bytes, request: "Request") -> resource.Resource:
        return resource.NoResource()

    def render(self, request: "Request") -> bytes:   # "/"
        return resource.NoResource().render(request)


def build_factory(server: Any, name: str) -> Any:
    """The [listen].metrics listener's factory (see mailserver.service.FACTORIES): the
    autoconfig service's HTTP site (request bodies bounded, the shared connection limits),
    imported only when metrics are served."""
    from mailserver.autoconfig.site import AutoconfigSite

    timeout = min(server.config.limits.idle_timeout, 60.0)
    site = AutoconfigSite(MetricsRoot(server.metrics.registry), timeout=timeout, name=name,
                          limiter=getattr(server, "limiter", None))
    site.log = _no_access_log  # type: ignore[method-assign]
    return site


def _no_access_log(request: Any) -> None:
    """Scrapes are not logged: one every few seconds would fill the log."""
