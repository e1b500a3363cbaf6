"""The MX service: accepts mail for local domains from anyone, and never relays."""

from __future__ import annotations

from mailserver.addresses import AddressError, check_recipient_syntax
from mailserver.connlimit import LimitedFactory
from mailserver.smtp import replies as R
from mailserver.smtp.delivery import IDelivery, Recipient
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
    """Port 25: no AUTH, local recipients only; remote alias targets via the queue."""

    def resolve_recipient(self, path: str) -> Recipient:
        recipient = resolve_local(self.context, path)
        if recipient.remote and self.context.queue is None:
            if not recipient.local:
                raise SMTPReplyError(R.Reply(451, "4.3.0", "Error: forwarding not available"))
            self.log.warn("{rcpt}: no outbound queue; remote alias targets {targets} skipped",
                          rcpt=recipient.address, targets=",".join(recipient.remote))
        return recipient

    def make_delivery(self, queue_id: str) -> IDelivery:
        if self.context.queue is None:
            return super().make_delivery(queue_id)
        delivery = QueueingDelivery(self.context.store, self.context.queue, queue_id,
                                    self._sender or "")
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
    return SMTPFactory(context, MXSession)
