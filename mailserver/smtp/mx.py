"""The MX service: accepts mail for local domains from anyone, and never relays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from mailserver.accounts import any_postmaster, with_postmaster
from mailserver.addresses import AddressError, check_recipient_syntax
from mailserver.connlimit import LimitedFactory
from mailserver.smtp import replies as R
from mailserver.inbound.junk import JunkFolders
from mailserver.sieve.plan import INBOX_DEFAULT, DefaultFolder
from mailserver.smtp.checked import CheckedDelivery
from mailserver.smtp.delivery import IDelivery, LocalDelivery, Placement, Recipient
from mailserver.smtp.envelope import EnvelopeSyntaxError, parse_command_path
from mailserver.smtp.filtering import FilteringDelivery
from mailserver.smtp.forwarding import QueueingDelivery
from mailserver.smtp.replies import SMTPReplyError
from mailserver.smtp.session import SMTPContext, SMTPSession

if TYPE_CHECKING:
    from mailserver.accounts import User

# Characters that only appear in a recipient to route it somewhere else.
_ROUTING_CHARS = set("%!@:,\"")

MAILBOX_FULL = R.Reply(452, "4.2.2", "Mailbox full")  # RFC 3463 3.3 (X.2.2), RFC 5321 4.2.3


def resolve_local(context: SMTPContext, path: str) -> Recipient:
    """Recipient for a local address, or SMTPReplyError: relay denied / user unknown, or
    451 4.3.0 while the accounts cannot be trusted to be current."""
    if path.lower() == "postmaster":  # RFC 5321 4.5.1: must be accepted without a domain
        _require_current(context)
        res = any_postmaster(context.accounts)
        if res is None:
            raise SMTPReplyError(R.UNKNOWN_USER)
        return Recipient(res[0], res[1].local, res[1].remote)
    try:
        address = check_recipient_syntax(path)
    except AddressError:
        local_part = path.rpartition("@")[0] if "@" in path else path
        if path.startswith("@") or _ROUTING_CHARS & set(local_part) or "@" not in path:
            raise SMTPReplyError(R.RELAY_DENIED) from None
        raise SMTPReplyError(R.BAD_RECIPIENT_SYNTAX) from None
    res = context.accounts.resolve(address)
    if res.kind == "nonlocal":
        raise SMTPReplyError(R.RELAY_DENIED)
    _require_current(context)
    res = with_postmaster(context.accounts, address, res)
    if res.kind != "ok" or not (res.local or res.remote):
        raise SMTPReplyError(R.UNKNOWN_USER)
    return Recipient(address, res.local, res.remote)


def _require_current(context: SMTPContext) -> None:
    """Fail closed while the accounts' database has been unreachable too long: a local
    address is neither accepted nor refused on a copy that may be stale, but deferred
    (RFC 5321 4.2.3: 451, the client tries again; RFC 3463 X.3.0)."""
    if not context.accounts.available():
        raise SMTPReplyError(R.LOCAL_ERROR)


def _with_quota(context: SMTPContext, recipient: Recipient) -> list[tuple["User", Path]]:
    """The recipient's local users that have a quota, with their Maildirs."""
    out = []
    for user in recipient.local:
        if user.quota:
            try:
                out.append((user, context.store.user_path(user.domain, user.localpart)))
            except ValueError:
                continue  # refused by delivery anyway
    return out


def usage_lookups(context: SMTPContext, recipient: Recipient) -> defer.Deferred | None:
    """Reads of the usage of the recipient's mailboxes that have a quota and whose usage
    the store does not know fresh; None when there is nothing to wait for."""
    tracker = context.store.quota
    waits = [tracker.usage(path, user.quota) for user, path in _with_quota(context, recipient)
             if not tracker.fresh(path, user.quota)]
    return defer.DeferredList(waits, consumeErrors=True) if waits else None


def apply_quota(context: SMTPContext, recipient: Recipient) -> Recipient:
    """RCPT for mailboxes at or over their quota (the usage the store knows now).

    One mailbox, or an alias whose every mailbox is full (and nothing remote): 452 4.2.2,
    that recipient only.  An alias with other mailboxes: accepted, the full ones marked
    for a local retry from the queue (retried, then bounced: never dropped).  A message
    that takes a mailbox over its quota is still taken; the next one is refused.
    """
    tracker = context.store.quota
    full = tuple(user for user, path in _with_quota(context, recipient)
                 if tracker.is_full(path, user.quota))  # type: ignore[arg-type]
    if not full:
        return recipient
    if (len(full) == len(recipient.local) and not recipient.remote) or context.queue is None:
        raise SMTPReplyError(MAILBOX_FULL)
    return replace(recipient, full=full)


class QuotaChecks:
    """RCPT against the recipients' quotas, for the MX and submission sessions.

    When the usage of a recipient's mailbox is not known fresh, RCPT waits for it (the
    session's input paused, as for a blocklist lookup) and is then handled again; the
    session subclass implements `resolve_mailboxes` (its own RCPT policy) and its
    `do_RCPT` calls `_usage_wait` and `_rcpt_wait`.
    """

    context: SMTPContext
    _sender: str | None
    _closing: bool
    _usage_checked = False  # this RCPT already waited for the usage
    _rcpt_waits = 0

    def resolve_mailboxes(self, path: str) -> Recipient:
        raise NotImplementedError

    def resolve_recipient(self, path: str) -> Recipient:
        return apply_quota(self.context, self.resolve_mailboxes(path))

    def _usage_wait(self, rest: bytes) -> defer.Deferred | None:
        """The reads this RCPT must wait for (None: answer now)."""
        if self._usage_checked or self._sender is None:
            return None
        try:
            path, _ = parse_command_path(rest, "TO")
            return usage_lookups(self.context, self.resolve_mailboxes(path))
        except (EnvelopeSyntaxError, SMTPReplyError):
            return None  # RCPT answers that itself

    def _rcpt_wait(self, d: defer.Deferred, rest: bytes, usage: bool = False) -> None:
        """Hold this RCPT (and the input behind it) until `d` fires, then handle it again."""
        self._rcpt_waits += 1
        self._pause()  # type: ignore[attr-defined]
        d.addBoth(self._rcpt_again, rest, self._rcpt_waits, usage)

    def _rcpt_again(self, result: Any, rest: bytes, ticket: int, usage: bool) -> None:
        self._usage_checked = usage
        try:
            if not self._closing:
                self.do_RCPT(rest)  # type: ignore[attr-defined]
        finally:
            self._usage_checked = False
            if self._rcpt_waits == ticket:  # not waiting again for something else
                self._resume()  # type: ignore[attr-defined]


class MXSession(QuotaChecks, SMTPSession):
    """Port 25: no AUTH, local recipients only; remote alias targets via the queue.

    With inbound checks (context.checker) for a client outside the trusted networks: the
    banner waits greet_delay seconds and a client that talks first is refused
    (postscreen's pregreet test); its address is looked up in the DNS blocklists while
    it waits, a listed client has its RCPTs refused; SPF starts at the first accepted
    RCPT; and the message goes through CheckedDelivery (DKIM, DMARC, ARC, spam filter,
    Junk).
    """

    _checks = False
    _banner: bytes | None = None
    _banner_call: Any = None
    _blocked: Any = None          # Deferred[Reply | None] while the blocklists answer
    _spf: Any = None              # SPFResult, or Deferred[SPFResult] while it is evaluated

    def connectionMade(self) -> None:
        checker = self.context.checker
        self._checks = checker is not None and not checker.trusted(self.peer_ip)
        if not self._checks:
            super().connectionMade()
            return
        self._blocked = checker.check_client(self.peer_ip)
        self._blocked.addBoth(self._listed)
        delay = checker.greet_delay
        if delay <= 0:
            super().connectionMade()
            return
        self._replies = []  # the banner is built now and held back
        super().connectionMade()
        self._banner, self._replies = b"".join(self._replies), None
        self.setTimeout(None)  # the idle timeout runs from the banner on
        self._banner_call = reactor.callLater(delay, self._greet)

    def _listed(self, refusal: Any) -> Any:
        if isinstance(refusal, Failure):  # not expected; a list that cannot be asked lists no one
            self.log.failure("{service} {ip}: blocklist check failed", refusal,
                             service=self.context.service, ip=self.peer_ip)
            refusal = None
        self._blocked = refusal  # the Reply, or None: not listed
        return refusal

    def _greet(self) -> None:
        self._banner_call = None
        banner, self._banner = self._banner, None
        if banner and not self._closing:
            self.transport.write(banner)
            self.setTimeout(self.timeout)
            if self._buffer:  # cannot happen: input before the banner was refused
                self._drain()

    def dataReceived(self, data: bytes) -> None:
        if self._banner is not None:  # RFC 5321 3.1: the client must wait for the 220
            self._banner = None
            if self._banner_call is not None and self._banner_call.active():
                self._banner_call.cancel()
            self.log.info("{service} {ip}: talked before the greeting, refused",
                          service=self.context.service, ip=self.peer_ip)
            self.reply(R.PREGREET)
            self._close()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._banner_call is not None and self._banner_call.active():
            self._banner_call.cancel()
        super().connectionLost(reason)

    def _reset_transaction(self) -> None:
        super()._reset_transaction()
        self._spf = None

    def do_RCPT(self, rest: bytes) -> None:
        if isinstance(self._blocked, defer.Deferred):  # the blocklists have not answered
            self._rcpt_wait(self._blocked, rest)
            return
        usage = self._usage_wait(rest)
        if usage is not None:
            self._rcpt_wait(usage, rest, usage=True)
            return
        super().do_RCPT(rest)
        if self._checks and self._recipients and self._spf is None:
            # SPF (RFC 7208 2.4) from the first accepted recipient on: by the end of DATA
            # it has usually answered, and a client that never gets that far (a
            # blocklisted one, MAIL/RSET loops) costs no DNS queries.
            self._spf = self.context.checker.check_sender(self.peer_ip, self._sender or "",
                                                          self._helo_given)

    def resolve_mailboxes(self, path: str) -> Recipient:
        if self._blocked is not None:  # a listed client: every recipient refused
            raise SMTPReplyError(self._blocked)
        recipient = resolve_local(self.context, path)
        if recipient.remote and self.context.queue is None:
            if not recipient.local:
                raise SMTPReplyError(R.Reply(451, "4.3.0", "Error: forwarding not available"))
            self.log.warn("{rcpt}: no outbound queue; remote alias targets {targets} skipped",
                          rcpt=recipient.address, targets=",".join(recipient.remote))
        return recipient

    def _inner_delivery(self, queue_id: str, sender: str, place: Placement | None = None,
                        filtered: bool = False, checked: CheckedDelivery | None = None
                        ) -> IDelivery:
        local = None
        if filtered:  # delivery filters or Sieve: the message is held whole, then decided
            junk = self.context.junk
            verdict = checked.verdict if checked is not None else None
            local = FilteringDelivery(
                self.context.sieve, self.context.store, queue_id, sender,
                default=(DefaultFolder(junk.folder_name, (junk.keyword,))
                         if place is not None and junk is not None else INBOX_DEFAULT),
                client_ip=self.peer_ip, helo=self._helo_name or "",
                checks=verdict.summary if verdict is not None else None)
        if self.context.queue is None:
            return local or LocalDelivery(self.context.store, place)
        return QueueingDelivery(self.context.store, self.context.queue, queue_id, sender, place,
                                local=local)

    def _filtered(self) -> bool:
        """Whether this transaction's mailboxes need the filters or Sieve (an lstat
        per mailbox); otherwise the message streams into the Maildirs as it arrives."""
        sieve = self.context.sieve
        if sieve is None:
            return False
        paths = []
        for recipient in self._recipients:
            for user in recipient.local:
                try:
                    paths.append(self.context.store.user_path(user.domain, user.localpart))
                except ValueError:
                    continue
        return bool(paths) and sieve.wanted(paths)

    def make_delivery(self, queue_id: str) -> IDelivery:
        sender = self._sender or ""
        filtered = self._filtered()
        if self._checks:
            checked = CheckedDelivery(
                self.context.checker, self.context.junk, self.context.store,
                lambda place: self._inner_delivery(queue_id, sender, place, filtered, checked),
                self.context.spool_dir,
                dict(ip=self.peer_ip, helo=self._helo_name, mail_from=sender,
                     queue_id=queue_id),
                self._spf)
            delivery: IDelivery = checked
        else:
            delivery = self._inner_delivery(queue_id, sender, None, filtered)
        for recipient in self._recipients:
            delivery.add_recipient(recipient)
        return delivery


class SMTPFactory(LimitedFactory):
    refusal = b"421 4.7.0 Error: too many connections, try again later\r\n"

    def __init__(self, context: SMTPContext, session_class: type[SMTPSession] = MXSession) -> None:
        self.context = context
        self.session_class = session_class

    def protocol(self):  # type: ignore[override]
        return self.session_class(self.context)


def build_factory(server, name: str) -> SMTPFactory:
    """The MX listener's factory (see mailserver.service.FACTORIES)."""
    context = SMTPContext(hostname=server.config.server.hostname, limits=server.config.limits,
                          accounts=server.accounts, store=server.store, tls=server.tls,
                          service=name, queue=getattr(server, "queue", None),
                          metrics=server.metrics.service(name))
    context.checker = getattr(server, "checker", None)
    context.sieve = getattr(server, "sieve", None)
    if context.checker is not None:
        context.junk = JunkFolders(server.store, server.config.inbound.junk_folder)
        context.spool_dir = server.config.state_dir / "inbound"
    return SMTPFactory(context, MXSession)
