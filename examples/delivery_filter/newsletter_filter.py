"""An example delivery filter: a summary of the inbound checks in a header field, and
newsletters filed into their own folder.

- `X-Auth-Summary: spf=pass dkim=pass dmarc=pass spam=ham` is added in front of every
  message the inbound checks looked at, so a mail client (or a user's Sieve script:
  `header :contains "X-Auth-Summary" "dmarc=fail"`) can use the verdicts without
  parsing Authentication-Results.  A sender may put a field of the same name lower in
  the message; the one added here is the topmost.
- A message whose Subject starts with "[newsletter]" (any case) goes to the folder
  "Newsletters" instead of INBOX, for every recipient.  A recipient's own Sieve script
  still has the last word.

Settings come from the server's environment (read once, when the server starts):

    NEWSLETTER_FILTER_FOLDER    the folder (default "Newsletters"; "INBOX.Newsletters"
                                for a subfolder of INBOX)
    NEWSLETTER_FILTER_PREFIXES  comma-separated Subject prefixes (default "[newsletter]")

The filter needs only the header, so it answers at once; a filter that reads the body
(facts.open_body()) does so in a thread, e.g. `deferToThread(scan, facts.open_body)`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailserver.filters import DeliveryFacts, FilterDecision, IDeliveryFilter

SUMMARY_FIELD = "X-Auth-Summary"
CHECK_ORDER = ("spf", "dkim", "dmarc", "arc", "spam")   # the others follow, by name
_TOKEN = re.compile(r"[A-Za-z0-9_.+-]{1,40}")


@implementer(IPlugin, IDeliveryFilter)
class NewsletterFilter:
    """The plugin object; one instance serves every message."""

    name = "newsletters"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.folder = environ.get("NEWSLETTER_FILTER_FOLDER", "").strip() or "Newsletters"
        prefixes = environ.get("NEWSLETTER_FILTER_PREFIXES", "[newsletter]")
        self.prefixes = tuple(p.strip().lower() for p in prefixes.split(",") if p.strip())

    def filter(self, facts: DeliveryFacts) -> FilterDecision:
        headers: list[tuple[str, str]] = []
        summary = auth_summary(facts.checks)
        if summary:
            headers.append((SUMMARY_FIELD, summary))
        folder = self.folder if self.is_newsletter(facts) else None
        return FilterDecision(add_headers=tuple(headers), folder=folder)

    def is_newsletter(self, facts: DeliveryFacts) -> bool:
        subjects = facts.header_values("Subject")
        subject = subjects[0].strip().lower() if subjects else ""
        return any(subject.startswith(prefix) for prefix in self.prefixes)


def auth_summary(checks: Mapping[str, str]) -> str:
    """"spf=pass dkim=pass dmarc=pass": the known checks first, then the others by name;
    anything that is not a plain token is left out (a header value must stay ASCII)."""
    order = {name: i for i, name in enumerate(CHECK_ORDER)}
    names = sorted(checks, key=lambda n: (order.get(n, len(order)), n))
    return " ".join(f"{n}={checks[n]}" for n in names
                    if _TOKEN.fullmatch(n) and _TOKEN.fullmatch(str(checks[n])))
