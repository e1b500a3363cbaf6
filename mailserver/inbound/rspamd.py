"""rspamd client: ask an rspamd normal worker (or proxy) for a verdict on one spooled message.

The message file is POSTed to `/checkv2` with rspamd's HTTP protocol headers carrying the SMTP
envelope (IP, Helo, From, Rcpt, User, Queue-Id, Hostname, MTA-Name), streamed from disk by a
FileBodyProducer, and rspamd's JSON answer (read up to MAX_RESPONSE_BYTES) becomes a
`SpamVerdict`.  The Deferred never fails: anything that keeps us from a usable answer (timeout,
refused connection, HTTP error, bad or unexpected JSON) is a verdict with action "error" and a
`reason`, and the caller decides what an unavailable filter means (usually a 451 or accept).

rspamd's protocol: https://rspamd.com/doc/developers/protocol.html ("Pass: all" is never sent,
so rspamd may stop early on a pre-result, as for GTUBE).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, protocol, task
from twisted.logger import Logger
from twisted.web.client import (Agent, FileBodyProducer, HTTPConnectionPool, PotentialDataLoss,
                                RequestNotSent, RequestTransmissionFailed, ResponseDone,
                                ResponseFailed, ResponseNeverReceived)
from twisted.web.http_headers import Headers

log = Logger()

MAX_RESPONSE_BYTES = 1 << 20   # rspamd's JSON answer; more is treated as garbage
MAX_SYMBOLS = 500              # symbol names kept from one answer
MAX_TEXT = 1000                # characters kept of "subject" and "messages"

# rspamd's actions (src/libserver/cfg_file.h, rspamd_action_from_str); others are "error".
ACTIONS = frozenset({"no action", "greylist", "add header", "rewrite subject", "soft reject",
                     "reject"})

_SYMBOL_NAME = re.compile(r"[\x21-\x7e]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class SpamVerdict:
    """rspamd's answer for one message, or action "error" when there is none."""

    action: str               # one of ACTIONS, or "error"
    score: float
    required_score: float
    symbols: tuple[str, ...]  # names of the symbols that fired, sorted
    subject: str = ""         # the rewritten Subject for "rewrite subject"
    message: str = ""         # rspamd's reply text (messages.smtp_message), if any
    reason: str = ""          # for "error": what went wrong

    @property
    def error(self) -> bool:
        return self.action == "error"


def error_verdict(reason: str) -> SpamVerdict:
    return SpamVerdict(action="error", score=0.0, required_score=0.0, symbols=(), reason=reason)


class _Timeout(Exception):
    """The whole check took longer than the client's timeout."""


class _TooLarge(Exception):
    """rspamd's answer is longer than the client reads."""


def _clean(text: str) -> str:
    """One line of printable text (it may end up in a header or an SMTP reply)."""
    return _CONTROL.sub(" ", text).strip()[:MAX_TEXT]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is not a number")
    return float(value)


def _symbol_names(symbols: Any) -> tuple[str, ...]:
    """checkv2 gives {"NAME": {...}, ...}; a list of {"name": ...} is accepted too."""
    if isinstance(symbols, dict):
        names = symbols.keys()
    elif isinstance(symbols, list):
        names = [s.get("name") for s in symbols if isinstance(s, dict)]
    else:
        names = []
    kept = sorted({n for n in names if isinstance(n, str) and _SYMBOL_NAME.fullmatch(n)})
    return tuple(kept[:MAX_SYMBOLS])


def _reply_text(messages: Any) -> str:
    if isinstance(messages, str):
        return _clean(messages)
    if not isinstance(messages, dict):
        return ""
    smtp = messages.get("smtp_message")
    if isinstance(smtp, str):
        return _clean(smtp)
    return _clean("; ".join(v for v in messages.values() if isinstance(v, str)))


def parse_verdict(body: bytes) -> SpamVerdict:
    """rspamd's /checkv2 JSON -> SpamVerdict; anything unexpected -> action "error"."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as e:
        return error_verdict(f"bad JSON from rspamd: {_clean(str(e))[:200]}")
    if not isinstance(answer, dict):
        return error_verdict("bad JSON from rspamd: not an object")
    if "error" in answer:
        return error_verdict(f"rspamd error: {_clean(str(answer['error']))[:300]}")
    action = answer.get("action")
    if not isinstance(action, str):
        return error_verdict("rspamd answer has no action")
    if action not in ACTIONS:
        return error_verdict(f"unknown rspamd action {_clean(action)[:50]!r}")
    try:
        score = _number(answer.get("score", 0.0), "score")
        required = _number(answer.get("required_score", 0.0), "required_score")
    except ValueError as e:
        return error_verdict(f"bad rspamd answer: {e}")
    subject = answer.get("subject")
    return SpamVerdict(action=action, score=score, required_score=required,
                       symbols=_symbol_names(answer.get("symbols")),
                       subject=_clean(subject) if isinstance(subject, str) else "",
                       message=_reply_text(answer.get("messages")))


class _CappedBody(protocol.Protocol):
    """Collects a response body of at most `limit` bytes into `finished`."""

    def __init__(self, limit: int, finished: defer.Deferred) -> None:
        self.limit = limit
        self.finished = finished
        self.parts: list[bytes] = []
        self.size = 0
        self.too_large = False

    def dataReceived(self, data: bytes) -> None:
        if self.too_large:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.too_large = True
            self.parts = []
            self.transport.stopProducing()   # drops the connection
            return
        self.parts.append(data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.finished.called:   # cancelled
            return
        if self.too_large:
            self.finished.errback(_TooLarge())
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _read_body(response, limit: int) -> defer.Deferred:
    def cancel(d: defer.Deferred) -> None:
        if body.transport is not None:
            body.transport.stopProducing()

    finished: defer.Deferred = defer.Deferred(cancel)
    body = _CappedBody(limit, finished)
    response.deliverBody(body)
    return finished


class _Endpoints:
    """Address literals (the usual rspamd URL) get a plain TCP endpoint: HostnameEndpoint
    would resolve them in a thread and report a refused connection only after 0.3 s."""

    def __init__(self, reactor, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout

    def endpointForURI(self, uri):
        if uri.scheme != b"http":
            raise ValueError(f"unsupported scheme {uri.scheme!r}")
        host = uri.host.decode("ascii")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return endpoints.HostnameEndpoint(self._reactor, host, uri.port,
                                              timeout=self._timeout)
        kind = endpoints.TCP6ClientEndpoint if address.version == 6 else \
            endpoints.TCP4ClientEndpoint
        return kind(self._reactor, host, uri.port, timeout=self._timeout)


def _header_value(value: str) -> bytes:
    """Envelope values come from the SMTP client: no control characters reach a header."""
    return _CONTROL.sub(" ", value).strip().encode("utf-8", "surrogateescape")


class RspamdClient:
    """Checks messages against one rspamd at `url` (e.g. "http://127.0.0.1:11333").

    `timeout` bounds each whole check (connect, upload, answer).  `password` is sent as
    rspamd's Password header when set; `mta_name` (our own host name) as MTA-Name.
    """

    def __init__(self, url: str, timeout: float, reactor=None, password: str = "", *,
                 mta_name: str = "", max_response: int = MAX_RESPONSE_BYTES) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.url = url.rstrip("/")
        self._endpoint = (self.url + "/checkv2").encode("ascii")
        self.timeout = timeout
        self._password = password
        self._mta_name = mta_name
        self._max_response = max_response
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 8
        self._pool.cachedConnectionTimeout = 30
        self._pool.retryAutomatically = False   # a POST is retried below, with a fresh body
        self._agent = Agent.usingEndpointFactory(
            reactor, _Endpoints(reactor, max(1, math.ceil(timeout))), pool=self._pool)
        self._cooperator = task.Cooperator(
            scheduler=lambda work: reactor.callLater(0.0001, work))

    def close(self) -> defer.Deferred:
        """Drop idle pooled connections (for a clean shutdown, or a test's tearDown)."""
        self._cooperator.stop()
        return self._pool.closeCachedConnections()

    def headers(self, *, ip: str, helo: str, mail_from: str, rcpts: list[str], user: str = "",
                queue_id: str = "", hostname: str = "") -> Headers:
        """rspamd protocol request headers for one message's envelope."""
        h = Headers({b"User-Agent": [b"mailserver"]})
        for name, value in ((b"IP", ip), (b"Helo", helo), (b"User", user),
                            (b"Queue-Id", queue_id), (b"Hostname", hostname),
                            (b"MTA-Name", self._mta_name), (b"Password", self._password)):
            if value:
                h.addRawHeader(name, _header_value(value))
        h.addRawHeader(b"From", _header_value(mail_from) or b"<>")   # "<>": the null sender
        for rcpt in rcpts:
            if _header_value(rcpt):
                h.addRawHeader(b"Rcpt", _header_value(rcpt))
        return h

    def check(self, path, *, ip: str, helo: str, mail_from: str, rcpts: list[str],
              user: str = "", queue_id: str = "", hostname: str = "") -> defer.Deferred:
        """Deferred[SpamVerdict] for the message in file `path`; never fails.

        `hostname` is the client's verified reverse-DNS name (rspamd's Hostname header),
        `user` the authenticated user if any, `mail_from` "" for the null sender.
        """
        try:
            headers = self.headers(ip=ip, helo=helo, mail_from=mail_from, rcpts=rcpts,
                                   user=user, queue_id=queue_id, hostname=hostname)
        except Exception as e:   # e.g. a non-string where a string belongs
            return defer.succeed(error_verdict(f"bad envelope: {e!r}"))
        state = {"timed_out": False}
        d = self._request(os.fspath(path), headers, state)

        def expire() -> None:
            state["timed_out"] = True
            d.cancel()

        timer = self._reactor.callLater(self.timeout, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        def failed(failure) -> SpamVerdict:
            if state["timed_out"]:
                reason = f"timeout after {self.timeout:g} s"
            elif failure.check(_TooLarge):
                reason = f"rspamd answer larger than {self._max_response} bytes"
            else:
                reason = _describe(failure)
            return error_verdict(reason)

        def report(verdict: SpamVerdict) -> SpamVerdict:
            if verdict.action == "error":
                log.warn("rspamd {url}: {reason} (queue id {queue_id})", url=self.url,
                         reason=verdict.reason, queue_id=queue_id or "-")
            return verdict

        d.addBoth(done)
        d.addErrback(failed)
        d.addCallback(report)
        return d

    @defer.inlineCallbacks
    def _request(self, path: str, headers: Headers, state: dict):
        for attempt in (1, 2):
            try:  # the spooled message: its bytes (a small one) or its file
                body_file = (io.BytesIO(path) if isinstance(path, (bytes, bytearray))
                             else open(path, "rb"))
            except OSError as e:
                return error_verdict(f"cannot read message: {e.strerror or e}")
            producer = FileBodyProducer(body_file, cooperator=self._cooperator)
            try:
                response = yield self._agent.request(b"POST", self._endpoint, headers, producer)
                body = yield _read_body(response, self._max_response)
            except (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived) as e:
                # A pooled connection the server had closed: once more on a new one.
                if attempt == 1 and not state["timed_out"] and not _cancelled(e):
                    continue
                raise
            finally:
                if not body_file.closed:
                    try:
                        producer.stopProducing()   # closes the file, stops the reads
                    except Exception:
                        body_file.close()
            if response.code != 200:
                detail = ""
                with contextlib.suppress(ValueError):  # not JSON: the status says enough
                    answer = json.loads(body)
                    if isinstance(answer, dict) and "error" in answer:
                        detail = ": " + _clean(str(answer["error"]))[:200]
                return error_verdict(f"rspamd HTTP status {response.code}{detail}")
            return parse_verdict(body)


def _cancelled(exc: Exception) -> bool:
    """Whether twisted.web's wrapped failure came from cancelling the request."""
    return any(r.check(defer.CancelledError) for r in getattr(exc, "reasons", ()))


def _describe(failure) -> str:
    """A short reason for logs from a request failure."""
    value = failure.value
    prefix = ""
    if isinstance(value, ResponseNeverReceived):
        prefix = "no answer: "
    elif isinstance(value, (RequestNotSent, RequestTransmissionFailed)):
        prefix = "request not sent: "
    elif isinstance(value, ResponseFailed):
        prefix = "answer cut short: "
    reasons = getattr(value, "reasons", None)   # twisted.web wraps the real failures
    if reasons:
        return prefix + "; ".join(_describe(r) for r in reasons)
    name = type(value).__name__
    text = str(value) or name
    return _clean(text if name in text else f"{name}: {text}")[:300]
