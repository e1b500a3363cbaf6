"""The MX service: accepts mail for local domains from anyone, and never relays."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from mailserver.addresses import AddressError, check_recipient_syntax
from mailserver.fastwrite import write_now
from mailserver.connlimit import LimitedFactory
from mailserver.smtp import replies as R
from mailserver.inbound.junk import JunkFolders
from mailserver.smtp.checked import CheckedDelivery
from mailserver.smtp.delivery import IDelivery, LocalDelivery, Placement, Recipient
from mailserver.smtp.forwarding import QueueingDelivery
from mailserver.smtp.replies import SMTPReplyError
from mailserver.smtp.session import SMTPContext, SMTPSession

# Characters that only appear in a recipient to route it somewhere else.
_ROUTING_CHARS = set("%!@:,\"")


def resolve_local(context: SMTPContext, path: str) -> Recipient:
    """Recipient for a local address, or SMTPReplyError: relay denied / user unknown."""
    if path.lower() == "postmaster":  # RFC 5321 4.5.1: must be accepted without a domain
        for domain in context.accounts.list_domains():
            res = context.accounts.resolve(f"postmaster@{domain}")
            if res.kind == "ok":
                return Recipient(f"postmaster@{domain}", res.local, res.remote)
        raise SMTPReplyError(R.UNKNOWN_USER)
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
    if res.kind != "ok" or not (res.local or res.remote):
        raise SMTPReplyError(R.UNKNOWN_USER)
    return Recipient(address, res.local, res.remote)


class MXSession(SMTPSession):
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
    _spf: defer.Deferred | None = None

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
            write_now(self.transport, banner)
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
            self._pause()
            self._blocked.addBoth(self._rcpt_after_lookup, rest)
            return
        super().do_RCPT(rest)
        if self._checks and self._recipients and self._spf is None:
            # SPF (RFC 7208 2.4) from the first accepted recipient on: by the end of DATA
            # it has usually answered, and a client that never gets that far (a
            # blocklisted one, MAIL/RSET loops) costs no DNS queries.
            self._spf = self.context.checker.check_sender(self.peer_ip, self._sender or "",
                                                          self._helo_given)

    def _rcpt_after_lookup(self, result: Any, rest: bytes) -> None:
        try:
            if not self._closing:
                self.do_RCPT(rest)
        finally:
            self._resume()

    def resolve_recipient(self, path: str) -> Recipient:
        if self._blocked is not None:  # a listed client: every recipient refused
            raise SMTPReplyError(self._blocked)
        recipient = resolve_local(self.context, path)
        if recipient.remote and self.context.queue is None:
            if not recipient.local:
                raise SMTPReplyError(R.Reply(451, "4.3.0", "Error: forwarding not available"))
            self.log.warn("{rcpt}: no outbound queue; remote alias targets {targets} skipped",
                          rcpt=recipient.address, targets=",".join(recipient.remote))
        return recipient

    def _inner_delivery(self, queue_id: str, sender: str,
                        place: Placement | None = None) -> IDelivery:
        if self.context.queue is None:
            return LocalDelivery(self.context.store, place)
        return QueueingDelivery(self.context.store, self.context.queue, queue_id, sender, place)

    def make_delivery(self, queue_id: str) -> IDelivery:
        sender = self._sender or ""
        if self._checks:
            delivery: IDelivery = CheckedDelivery(
                self.context.checker, self.context.junk, self.context.store,
                lambda place: self._inner_delivery(queue_id, sender, place),
                self.context.spool_dir,
                dict(ip=self.peer_ip, helo=self._helo_name, mail_from=sender,
                     queue_id=queue_id),
                self._spf)
        else:
            delivery = self._inner_delivery(queue_id, sender)
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
                          service=name, queue=getattr(server, "queue", None))
    context.checker = getattr(server, "checker", None)
    if context.checker is not None:
        context.junk = JunkFolders(server.store, server.config.inbound.junk_folder)
        context.spool_dir = server.config.state_dir / "inbound"
    return SMTPFactory(context, MXSession)
