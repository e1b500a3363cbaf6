"""Organizational domains (RFC 7489 3.2) from the Public Suffix List.

DMARC's relaxed alignment compares organizational domains: the public suffix of a name
plus one more label.  The list changes every week, so besides the copy packaged with the
`publicsuffixlist` distribution an operator can point `inbound.psl_file` at a freshly
downloaded public_suffix_list.dat (https://publicsuffix.org/list/public_suffix_list.dat)
and restart, without a new release of the server.

Parsing the list takes some tens of milliseconds; it happens once per `OrgDomains`, on
first use (or in `load()`).  Nothing here imports Twisted, so a lookup may run in any
thread.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from publicsuffixlist import PublicSuffixList

from mailserver.addresses import to_a_labels_as_read
from mailserver.shortcache import cache_short

MAX_PSL_BYTES = 64 * 1024 * 1024   # a PSL file larger than this is not a PSL file
MAX_REMEMBERED = 4096              # organizational domains kept per list

# One rule of the list: "example.com", "*.example.com" or "!www.example.com" (U-labels
# allowed); what the parser takes from a line is its text up to the first space.
_RULE = re.compile(r"(?:\*\.|!)?[^\s!*<>/\\:;=?#\"'()\[\]{}@,]+")


@cache_short(maxsize=4096)   # the same few domains, message after message
def normalize_domain(domain: str) -> str | None:
    """`domain` lower-case, without the final dot, with U-labels turned into A-labels
    (IDNA), so that the forms compare equal; None when it is not a domain name."""
    name = domain.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        return None
    labels = []
    for label in name.split("."):
        if not label.isascii():
            try:
                label = to_a_labels_as_read(label).lower()
            except UnicodeError:
                return None
        if not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label):
            return None
        labels.append(label)
    name = ".".join(labels)
    return name if len(name) <= 253 else None


def read_psl_file(path: Path) -> PublicSuffixList:
    """Parse a downloaded public_suffix_list.dat; OSError when it cannot be read,
    ValueError when it is not a Public Suffix List (an HTML error page, an empty file)."""
    with open(path, "rb") as f:
        data = f.read(MAX_PSL_BYTES + 1)
    if len(data) > MAX_PSL_BYTES:
        raise ValueError(f"{path}: larger than {MAX_PSL_BYTES} bytes")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    rules = 0
    for number, line in enumerate(lines, 1):
        rule = line.strip().split(" ", 1)[0].split("\t", 1)[0]
        if not rule or rule.startswith("//"):
            continue
        if not _RULE.fullmatch(rule):
            raise ValueError(f"{path} line {number}: not a Public Suffix List rule: "
                             f"{rule[:60]!r}")
        rules += 1
    if not rules:
        raise ValueError(f"{path}: no rules")
    # A str source would be taken as the list's text and a path not opened: pass lines.
    # accept_unknown: a name under no listed suffix has its last label as public suffix,
    # the list's implicit "*" rule (RFC 7489 3.2 step 3).
    return PublicSuffixList(lines, accept_unknown=True)


class OrgDomains:
    """RFC 7489 3.2: the organizational domain of a name, by the Public Suffix List.

    psl_file: a public_suffix_list.dat to use instead of the packaged list.  `load()`
    raises OSError / ValueError for a file that cannot be used, so call it at start-up;
    when the file fails at first lookup instead, the packaged list is used and `error`
    says why.
    """

    def __init__(self, psl_file: str | Path | None = None) -> None:
        self.psl_file = Path(psl_file) if psl_file else None
        self.error = ""
        self._psl: PublicSuffixList | None = None
        self._lock = threading.Lock()
        self._orgs: dict[str, str] = {}   # answers given (the same few domains come back)

    def load(self) -> None:
        """Parse the list now (otherwise the first `org_domain` call does)."""
        self._get(strict=True)

    @property
    def loaded(self) -> bool:
        """Whether `org_domain` answers without parsing the list first."""
        return self._psl is not None

    def _get(self, strict: bool = False) -> PublicSuffixList:
        psl = self._psl
        if psl is not None:
            return psl
        with self._lock:
            if self._psl is None:
                if self.psl_file is None:
                    self._psl = PublicSuffixList(accept_unknown=True)
                else:
                    try:
                        self._psl = read_psl_file(self.psl_file)
                    except (OSError, ValueError) as e:
                        if strict:
                            raise
                        self.error = f"{e}; using the packaged list"
                        self._psl = PublicSuffixList(accept_unknown=True)
            return self._psl

    def org_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix of `domain` plus one label; a name that is
        itself a public suffix is its own organizational domain.  Lower-case, no final
        dot, A-labels for IDNs; a string that is not a domain name comes back normalized
        as far as possible, never an exception."""
        org = self._orgs.get(domain)
        if org is not None:
            return org
        name = normalize_domain(domain)
        if name is None:
            return domain.strip().rstrip(".").lower()
        org = self._get().privatesuffix(name) or name
        if len(self._orgs) >= MAX_REMEMBERED:
            self._orgs.clear()
        self._orgs[domain] = org
        return org
