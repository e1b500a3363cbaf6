"""Message submission (RFC 6409) on [listen].submission (STARTTLS) and .submissions
(implicit TLS, RFC 8314): the organisation's users sending mail.

AUTH PLAIN and LOGIN (RFC 4954) are offered and accepted only under TLS (or, with
[auth].allow_plaintext_loopback, from loopback), checked through the shared cred portal,
with the shared per-IP throttle: after a few failures replies are delayed, after
[limits].auth_failures_per_connection the connection is closed.  MAIL needs AUTH, and the
sender (MAIL FROM and From:) must be the user's own address or an alias of theirs.
Recipients anywhere are accepted from an authenticated user: local ones are delivered at
once, remote ones queued (see submission_delivery.py).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailserver.accounts import AccountsUnavailable
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailserver.addresses import (AddressError, check_recipient_syntax, is_domain_literal,
                                 relay_address)
from mailserver import sasl
from mailserver.config import is_loopback
from mailserver.smtp import replies as R
from mailserver.smtp.delivery import IDelivery, Recipient
from mailserver.smtp.mx import QuotaChecks, SMTPFactory, resolve_local
from mailserver.smtp.queue.local import QueueLocalDelivery
from mailserver.smtp.replies import Reply, SMTPReplyError
from mailserver.smtp.session import SMTPContext, SMTPSession
from mailserver.smtp.submission_delivery import SubmissionDelivery

if TYPE_CHECKING:
    from twisted.cred.portal import Portal

    from mailserver.auth import AuthThrottle
    from mailserver.config import AuthConfig
    from mailserver.ratelimit import SlidingWindowCounter

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11",
                            "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
SASL_REPLIES = {   # RFC 4954 4 / 6
    sasl.CANNOT_DECODE: Reply(501, "5.5.2", "Cannot decode response"),
    sasl.MALFORMED: Reply(501, "5.5.2", "Malformed authentication data"),
    sasl.PROXY: AUTH_FAILED,
}
TOO_MANY_FAILURES = Reply(421, "4.7.0", "Error: too many failed authentications")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by the "
                         "authenticated user")
RATE_LIMITED = Reply(451, "4.7.1", "Error: message rate limit exceeded, try again later",
                     reason="rate_limit")
DOMAIN_LITERAL = Reply(550, "5.1.2", "Recipient address rejected: domain literals are not "
                       "accepted")


class ISubmitter(Interface):
    """The avatar of an authenticated submission client."""


@implementer(ISubmitter)
@dataclass(frozen=True)
class Submitter:
    address: str


@dataclass
class SubmissionContext(SMTPContext):
    portal: "Portal | None" = None
    throttle: "AuthThrottle | None" = None
    auth: "AuthConfig | None" = None
    rate: "SlidingWindowCounter | None" = None
    local: QueueLocalDelivery | None = None
    dkim_dir: Path | None = None  # state_dir/dkim; None: nothing is signed


class SubmissionSession(QuotaChecks, SMTPSession):
    context: SubmissionContext

    def __init__(self, context: SubmissionContext) -> None:
        self._sasl: sasl.Exchange | None = None
        self._auth_failures = 0
        super().__init__(context)

    def _reset_session(self) -> None:
        super()._reset_session()
        # RFC 3207 4.2: STARTTLS forgets everything, an authentication too.
        self.authenticated = False
        self.username = ""
        self._sasl = None

    @property
    def auth_allowed(self) -> bool:
        """Credentials only under TLS (RFC 8314 and DESIGN), or from loopback if configured."""
        if self.tls_active:
            return True
        auth = self.context.auth
        return bool(auth and auth.allow_plaintext_loopback and is_loopback(self.peer_ip))

    def extensions(self) -> list[bytes]:  # type: ignore[override]
        ext = super().extensions()
        if self.auth_allowed:
            ext.append(b"AUTH PLAIN LOGIN")
        return ext

    # -- AUTH (RFC 4954) ---------------------------------------------------------------

    def ext_AUTH(self, rest: bytes) -> None:  # RFC 4954 4
        if not self._greeted:
            return self.reply(R.BAD_SEQUENCE_HELO)
        if not self.auth_allowed:
            return self.reply(ENCRYPTION_REQUIRED)
        if self.authenticated:
            return self.reply(ALREADY_AUTHENTICATED)
        if self._sender is not None:
            return self.reply(AUTH_IN_TRANSACTION)
        parts = rest.split(None, 1)
        mechanism = parts[0].decode("ascii", "replace") if parts else ""
        exchange = sasl.exchange_for(mechanism)
        if exchange is None:
            return self.reply(UNKNOWN_MECHANISM)
        try:
            initial = sasl.decode(parts[1]) if len(parts) > 1 else None
            challenge = exchange.start(initial)
        except sasl.SASLError as e:
            return self._auth_bad_input(SASL_REPLIES[e.reason], exchange.username)
        self._auth_next(exchange, challenge)

    def _auth_next(self, exchange: sasl.Exchange, challenge: bytes | None) -> None:
        if challenge is None:
            self._sasl = None
            self._auth_check(exchange.username, exchange.password)
        else:
            self._sasl = exchange
            self.sendCode(334, base64.b64encode(challenge))

    def lineReceived(self, line: bytes) -> None:
        exchange = self._sasl
        if exchange is None:
            return super().lineReceived(line)
        self.resetTimeout()
        self._sasl = None
        try:
            challenge = exchange.respond(line)
        except sasl.Cancelled:  # RFC 4954 4
            self._auth_failures += 1
            return self.reply(AUTH_ABORTED)
        except sasl.SASLError as e:
            return self._auth_bad_input(SASL_REPLIES[e.reason], exchange.username)
        self._auth_next(exchange, challenge)

    def line_too_long(self, head: bytes) -> None:
        if self._sasl is not None or head[:5].upper() == b"AUTH ":
            username = self._sasl.username if self._sasl is not None else ""
            self._sasl = None
            return self._auth_bad_input(AUTH_LINE_TOO_LONG, username)
        super().line_too_long(head)

    def _auth_bad_input(self, reply: Reply, username: str) -> None:
        """Malformed AUTH input counts as a failed login, with the same delay."""
        throttle = self.context.throttle
        if throttle is not None:
            throttle.failure(self.peer_ip, username)
        self.log.info("submission {ip}: AUTH refused: {reply}", ip=self.peer_ip, reply=str(reply))
        self.context.metrics.auth_failed()
        self._after_failure(reply, throttle.delay(self.peer_ip, username) if throttle else 0.0)

    def _auth_check(self, username: str, password: str) -> None:
        portal, throttle = self.context.portal, self.context.throttle
        if portal is None:
            return self.reply(AUTH_TEMPORARY)
        # The delay comes before the check, for a right password too: a guesser cannot
        # tell success from a quick answer.
        delay = throttle.delay(self.peer_ip, username) if throttle else 0.0
        self._pause()
        d: defer.Deferred = defer.Deferred()
        call = self.callLater(delay, lambda: d.callback(None))
        d.addCallback(lambda _: portal.login(UsernamePassword(username.encode("utf-8"),
                                                              password.encode("utf-8")),
                                             None, ISubmitter))
        d.addCallbacks(self._auth_succeeded, self._auth_failed,
                       errbackArgs=(username,))
        d.addErrback(lambda f: self.log.failure("submission: AUTH handling failed", f))
        self._pending_call = call

    def _auth_succeeded(self, result: tuple[Any, Submitter, Any]) -> None:
        _, avatar, _ = result
        if self._closing:
            return
        self.authenticated = True
        self.username = avatar.address
        if self.context.throttle is not None:
            self.context.throttle.success(self.peer_ip, avatar.address)
        self.log.info("submission {ip}: {user} authenticated", ip=self.peer_ip,
                      user=avatar.address)
        self.reply(AUTH_OK)
        self._resume()

    def _auth_failed(self, failure: Failure, username: str) -> None:
        if self._closing:
            return
        if failure.check(AccountsUnavailable):  # a subsystem is down: no traceback, no throttle
            self.log.info("submission {ip}: login for {user!r} refused: accounts database "
                          "unavailable", ip=self.peer_ip, user=username[:100])
            self.reply(AUTH_TEMPORARY)
            self._resume()
            return
        if not failure.check(UnauthorizedLogin):
            self.log.failure("submission: authentication error", failure)
            self.reply(AUTH_TEMPORARY)
            self._resume()
            return
        if self.context.throttle is not None:
            self.context.throttle.failure(self.peer_ip, username)
        self.log.info("submission {ip}: authentication failed for {user!r}", ip=self.peer_ip,
                      user=username[:100])
        self.context.metrics.auth_failed()
        self._after_failure(AUTH_FAILED, 0.0)

    def _after_failure(self, reply: Reply, delay: float) -> None:
        self._auth_failures += 1
        self._pause()

        def answer() -> None:
            if self._closing:
                return
            self.reply(reply)
            if self._auth_failures >= self.limits.auth_failures_per_connection:
                self.log.info("submission {ip}: {n} failed logins, disconnecting",
                              ip=self.peer_ip, n=self._auth_failures)
                self.reply(TOO_MANY_FAILURES)
                self._close()
                return
            self._resume()

        self._pending_call = self.callLater(delay, answer)

    _pending_call: Any = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._pending_call is not None and self._pending_call.active():
            self._pending_call.cancel()
        super().connectionLost(reason)

    # -- the envelope ------------------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:  # RFC 6409 4.2, RFC 4954 6
        if self._greeted and self._sender is None:
            if not self.authenticated:
                return self.reply(AUTH_REQUIRED if self.auth_allowed else STARTTLS_FIRST)
            refusal = self._over_rate()
            if refusal is not None:
                self.context.metrics.rejected(refusal)
                return self.reply(refusal)
        super().do_MAIL(rest)

    def _over_rate(self) -> Reply | None:
        """RATE_LIMITED when the user has sent messages_per_hour messages this hour."""
        rate = self.context.rate
        if rate is None or rate.allowed(self.username):
            return None
        self.log.info("submission {ip}: {user} over the hourly message limit",
                      ip=self.peer_ip, user=self.username)
        return RATE_LIMITED

    def check_mail_param(self, key: str, value: str | None) -> None:
        if key == "AUTH":  # RFC 4954 5: accepted; we know who the user is
            return
        super().check_mail_param(key, value)

    def check_sender(self, sender: str) -> str:
        sender = super().check_sender(sender)
        if not sender or not self.context.accounts.may_send_as(self.username, sender):
            raise SMTPReplyError(SENDER_NOT_OWNED)
        return sender

    @property
    def max_recipients(self) -> int:
        return self.limits.submission_max_recipients

    def do_RCPT(self, rest: bytes) -> None:
        usage = self._usage_wait(rest)  # local mailboxes at their quota: 452 4.2.2
        if usage is not None:
            self._rcpt_wait(usage, rest, usage=True)
            return
        super().do_RCPT(rest)

    def resolve_mailboxes(self, path: str) -> Recipient:
        try:
            address = check_recipient_syntax(path)
        except AddressError:
            return resolve_local(self.context, path)  # the MX's answer for odd paths
        domain = address.rpartition("@")[2]
        if is_domain_literal(domain):
            raise SMTPReplyError(DOMAIN_LITERAL)
        if not self.context.accounts.is_local_domain(domain):
            # Relayed (the user is authenticated), the local part's case as written.
            remote = relay_address(path)
            return Recipient(remote, (), (remote,))
        return resolve_local(self.context, path)

    def make_delivery(self, queue_id: str) -> IDelivery:
        ctx = self.context
        assert ctx.queue is not None and ctx.local is not None
        delivery = SubmissionDelivery(ctx.queue, ctx.accounts, ctx.local, ctx.hostname,
                                      ctx.dkim_dir, queue_id, self._sender or "", self.username)
        for recipient in self._recipients:
            delivery.add_recipient(recipient)
        return delivery

    def message_complete(self) -> Reply | None:
        """The hourly limit checked again and counted as the message ends, before its
        commit: MAIL's check alone let parallel connections all pass before any of their
        messages counted.  (A commit that then fails still counts: rare, and on the safe
        side.)"""
        refusal = self._over_rate()
        if refusal is None and self.context.rate is not None:
            self.context.rate.record(self.username)
        return refusal


def build_factory(server: Any, name: str) -> SMTPFactory:
    """The submission listener's factory (see mailserver.service.FACTORIES)."""
    server.realm.register(ISubmitter, Submitter)
    config = server.config
    context = SubmissionContext(
        hostname=config.server.hostname, limits=config.limits, accounts=server.accounts,
        store=server.store, tls=server.tls, service=name, queue=server.queue,
        portal=server.portal, throttle=server.throttle, auth=config.auth,
        rate=server.send_rate,
        local=QueueLocalDelivery(server.store, server.accounts, getattr(server, "sieve", None)),
        dkim_dir=config.dkim_dir, metrics=server.metrics.service(name))
    return SMTPFactory(context, SubmissionSession)  # type: ignore[arg-type]
