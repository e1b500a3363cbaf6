"""What a delivery filter plugin sees and answers: the interface and its two value types.

Plugin authors import these from `mailserver.filters`; the server's delivery builds the
facts and carries the merged decision out (mailserver.filters.running merges them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO, Callable, Mapping

from zope.interface import Attribute, Interface

from mailserver.smtp.headers import named_field_values

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

ACCEPT, REJECT, DEFER = "accept", "reject", "defer"
ACTIONS = (ACCEPT, REJECT, DEFER)


class IDeliveryFilter(Interface):
    """A Python filter run on every message the server delivers locally, after the
    inbound checks and before the recipients' Sieve scripts.

    A plugin is an object providing this and twisted.plugin.IPlugin, defined at module
    level in a `twisted/plugins/*.py` dropin so that Twisted's plugin system finds it.
    Only the plugins [filters] plugins names run, in that order.
    """

    name = Attribute("short unique name ([A-Za-z0-9_.-], at most 64): what [filters] "
                     "plugins lists")

    def filter(facts: DeliveryFacts) -> Deferred[FilterDecision] | FilterDecision:
        """Decide about one message: a FilterDecision, or a Deferred (or coroutine) that
        fires with one.  Runs in the reactor thread: never block it (read the body and do
        other slow work with twisted.internet.threads.deferToThread or asynchronous
        clients).  An exception, a failure, another kind of result or no answer within
        [filters] timeout is logged and counts as "accept, nothing changed"."""


def _empty_body() -> BinaryIO:
    return io.BytesIO(b"")


@dataclass(frozen=True)
class DeliveryFacts:
    """One message as delivery sees it, for the filters.

    `recipients`: the local mailbox addresses it is delivered to.  `header`: the header
    block as received (CRLF lines), without the fields this server adds in front.
    `checks`: the inbound checks' results by name, e.g. {"spf": "pass", "dkim": "pass",
    "dmarc": "pass", "spam": "ham"}; empty when no check ran (a trusted network,
    submission, or no check configured).  `open_body()`: a new binary reader positioned
    at the start of the body on every call; it may read a spool file on disk, so a
    plugin that reads more than a few kilobytes does it in a thread (deferToThread) and
    closes the reader when done.
    """

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    client_ip: str
    helo: str
    auth_user: str = ""
    header: bytes = b""
    checks: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    size: int = 0
    open_body: Callable[[], BinaryIO] = _empty_body

    def header_values(self, name: str) -> list[str]:
        """The unfolded values of the header fields called `name` (any case), in order;
        non-UTF-8 bytes replaced.  Encoded words (RFC 2047) are left as they are."""
        return named_field_values(self.header, name)


@dataclass(frozen=True)
class FilterDecision:
    """A filter's answer.

    `action`: "accept", "reject" (a permanent refusal: 5xx at SMTP time) or "defer"
    (try again later: 4xx).  `reply`: text for the SMTP reply on reject/defer (made
    printable ASCII, one line, at most 200 characters).  `add_headers`: (name, value)
    fields added in front of the message, the value ASCII (RFC 2047 for other text) and
    folded only with CRLF followed by white space.  `folder`: the folder the message goes
    to for every recipient instead of INBOX (the Sieve implicit keep; a user's script
    still decides over it).
    """

    action: str = ACCEPT
    reply: str = ""
    add_headers: tuple[tuple[str, str], ...] = ()
    folder: str | None = None
