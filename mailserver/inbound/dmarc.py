"""DMARC (RFC 7489): the From: domain's published policy, joined to SPF and DKIM.

`from_domain` finds the one RFC5322.From domain (6.6.1), `evaluate` looks the policy
record up (6.6.3), checks identifier alignment (3.1) and applies the sampling rate
(6.6.4).  Whatever DNS or the sender publishes, `evaluate` answers with a `DMARCResult`;
its Deferred never fails.

Record parsing choices (RFC 7489 6.3 leaves room):
- A record must begin with "v=DMARC1" (the tag name in any case, the value exactly;
  whitespace around "=" allowed); other TXT records at the name are not DMARC records
  and are skipped before records are counted (6.6.3 steps 2 and 4).  So are records
  that are not UTF-8 or longer than MAX_RECORD_BYTES.
- "p" may appear anywhere after "v" (6.3 wants it second; receivers do not insist).
  A missing or invalid "p", or an invalid "sp", makes the record act as "v=DMARC1;
  p=none" when "rua" holds at least one valid URI, and otherwise as no record at all
  (6.6.3 step 6).
- Other known tags with a bad value fall back to their default (6.3: "syntax errors
  in the remainder of the record SHOULD be discarded in favor of default values"):
  pct not an integer 0-100 -> 100, adkim/aspf not r|s -> r, fo with an unknown option
  -> 0; rua/ruf keep their valid URIs only.  Unknown tags are ignored.  When a tag
  appears twice the first one counts.
- Tag names and the values of p, sp, adkim, aspf and fo compare case-insensitively
  (RFC 5234 quoted strings); results are lower-case.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.inbound.psl import OrgDomains, normalize_domain
from mailserver.inbound.headerscan import named_values
from mailserver.shortcache import cache_short

log = Logger()

MAX_RECORD_BYTES = 8192      # a longer TXT record is not taken for a DMARC record
MAX_URIS = 20                # rua / ruf URIs kept

POLICIES = ("none", "quarantine", "reject")
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}   # RFC 7489 6.6.4

_VERSION = re.compile(r"[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# RFC 7489 6.4 dmarc-uri: an RFC 3986 URI, "!size" optional; commas and "!" in the URI
# itself are %-encoded, so a comma separates URIs.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s,!;]+(?:![0-9]+[kmgtKMGT]?)?")


class DMARCSyntaxError(ValueError):
    """Not a usable DMARC record (RFC 7489 6.6.3 steps 2, 4 and 6)."""


@dataclass(frozen=True)
class DMARCRecord:
    """One parsed _dmarc TXT record (RFC 7489 6.3)."""

    p: str
    sp: str
    pct: int
    adkim: str
    aspf: str
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"


@dataclass(frozen=True)
class DMARCResult:
    result: str          # "pass" | "fail" | "none" | "temperror" | "permerror"
    from_domain: str     # the RFC5322.From domain ("" if none could be determined)
    policy: str          # the published policy that applies ("" when no record)
    disposition: str     # "none" | "quarantine" | "reject", after pct sampling; "unknown"
                         # when the record could not be looked up and nothing aligned passed
    reason: str          # for logs and the Authentication-Results comment
    record_domain: str = ""    # where the record was found
    sampled_out: bool = False  # pct said: apply the next lower policy


@cache_short(maxsize=1024)   # the same records, message after message
def _is_dmarc(txt: bytes) -> bool:
    """RFC 7489 6.6.3 step 2: does this TXT record claim to be a DMARC record?"""
    if len(txt) > MAX_RECORD_BYTES:
        return False
    try:
        text = txt.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _VERSION.match(text.strip(" \t")) is not None


def _uris(value: str) -> tuple[str, ...]:
    found = []
    for part in value.split(","):
        part = part.strip(" \t")
        if _URI.fullmatch(part) and part.isascii():
            found.append(part)
    return tuple(found[:MAX_URIS])


@cache_short(maxsize=1024)   # records repeat for every message of a domain
def parse_record(txt: bytes) -> DMARCRecord:
    """RFC 7489 6.3/6.4: one TXT record -> DMARCRecord; DMARCSyntaxError when it is no
    DMARC record or one without a usable policy (see the module notes)."""
    if not _is_dmarc(txt):
        raise DMARCSyntaxError("not a DMARC record (no leading v=DMARC1)")
    text = txt.decode("utf-8").strip(" \t")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        part = part.strip(" \t")
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip(" \t").lower()
        if not eq or not _TAG.fullmatch(name):
            continue                  # a syntax error in the remainder: ignored (6.3)
        tags.setdefault(name, value.strip(" \t"))

    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    rua = _uris(tags.get("rua", ""))
    if p not in POLICIES or sp not in POLICIES:
        if not rua:                    # RFC 7489 6.6.3 step 6
            what = "no p tag" if "p" not in tags else f"invalid p={tags['p'][:40]!r}"
            if p in POLICIES:
                what = f"invalid sp={tags['sp'][:40]!r}"
            raise DMARCSyntaxError(f"{what} and no valid rua")
        p = sp = "none"

    pct = 100
    raw_pct = tags.get("pct", "100")
    if re.fullmatch(r"[0-9]{1,3}", raw_pct) and int(raw_pct) <= 100:
        pct = int(raw_pct)
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    fo_parts = [o.strip(" \t").lower() for o in tags.get("fo", "0").split(":")]
    fo = ":".join(fo_parts) if all(o in ("0", "1", "d", "s") for o in fo_parts) else "0"
    return DMARCRecord(p=p, sp=sp, pct=pct,
                       adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r",
                       rua=rua, ruf=_uris(tags.get("ruf", "")), fo=fo)


# -- RFC5322.From (RFC 7489 6.6.1) ------------------------------------------------------

# Tokens of an RFC 5322 address list: an encoded word (RFC 2047) is one word even when
# it holds specials, so "=?utf-8?q?Doe,_J?=" is not split at its comma.
_TOKEN = re.compile(r"""
    (?P<ew>=\?[^?\s]+\?[A-Za-z]\?[^?\s]*\?=)
  | (?P<qs>"(?:[^"\\]|\\.)*"?)
  | (?P<sp>[<>@,;:\[\]])
  | (?P<ws>\s+)
  | (?P<atom>[^\s"<>@,;:()\[\]\\]+|\\.?)
  | (?P<other>.)
""", re.X | re.S)


class _Malformed(ValueError):
    """The From field cannot be read as an address list."""


def _strip_comments(text: str) -> str:
    """Replace RFC 5322 comments (nested, with quoted pairs) by a space, leaving quoted
    strings alone."""
    out, depth, i, quoted = [], 0, 0, False
    while i < len(text):
        c = text[i]
        if c == "\\" and (depth or quoted):
            if not depth:
                out.append(text[i:i + 2])
            i += 2
            continue
        if quoted:
            out.append(c)
            quoted = c != '"'
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
        elif not depth:
            out.append(c)
            quoted = c == '"'
        i += 1
    if depth:
        raise _Malformed("unterminated comment")
    return "".join(out)


@cache_short(maxsize=4096)
def _mailbox_domains(value: str) -> tuple[str | None, ...]:
    """The domain of each mailbox in a From value (None for one without a domain);
    group members count as mailboxes, the group's name does not.  Remembered: the same
    senders write the same From again and again."""
    text = _strip_comments(value)
    tokens = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind != "ws":
            tokens.append((kind, m.group()))
    # Split into mailboxes at "," and at the ":" / ";" of a group, outside <> and [].
    items: list[list[tuple[str, str]]] = [[]]
    angle = bracket = group = False
    for kind, tok in tokens:
        if kind == "sp":
            if tok == "<" and not bracket:
                angle = True
            elif tok == ">" and not bracket:
                angle = False
            elif tok == "[":
                bracket = True
            elif tok == "]":
                bracket = False
            elif tok in ",;" and not angle and not bracket:
                group = group and tok == ","
                items.append([])
                continue
            elif tok == ":" and not angle and not bracket:
                # A group's display name is a phrase: after an address (or a second
                # ":") it is no group, and readers show the address before it.
                if group or any(k == "sp" for k, _ in items[-1]):
                    raise _Malformed("':' after an address")
                group = True
                items[-1] = []
                continue
        items[-1].append((kind, tok))
    domains: list[str | None] = []
    for item in items:
        if not item:
            continue
        opens = [i for i, (k, t) in enumerate(item) if k == "sp" and t == "<"]
        if opens:
            start = opens[0]
            end = next((i for i, (k, t) in enumerate(item)
                        if k == "sp" and t == ">" and i > start), None)
            if end is None:
                raise _Malformed("unterminated <")
            if len(opens) > 1 or end != len(item) - 1:
                raise _Malformed("text after <address>")
            spec = item[start + 1:end]
            # obs-route: "<@relay.test,@other.test:user@example.com>" keeps the last part
            colon = [i for i, (k, t) in enumerate(spec) if k == "sp" and t == ":"]
            if colon:
                spec = spec[colon[-1] + 1:]
            if not spec:
                continue              # "<>": no mailbox at all
        else:
            spec = item
        ats = [i for i, (k, t) in enumerate(spec) if k == "sp" and t == "@"]
        if not ats:
            domains.append(None)
            continue
        if len(ats) > 1:
            raise _Malformed("more than one @ in an address")
        part = spec[ats[-1] + 1:]
        # One dot-atom or one [literal]: "ceo@bank.example x" is no domain "bank.examplex".
        if not (len(part) == 1 and part[0][0] == "atom") and not (
                len(part) >= 2 and part[0] == ("sp", "[") and part[-1] == ("sp", "]")):
            raise _Malformed("not a domain after @")
        domains.append("".join(t for _, t in part))
    return tuple(domains)


_LINE_END = re.compile(rb"\r?\n")


def from_values(header_block: bytes) -> list[str]:
    """The unfolded values of the From fields, as headers.named_field_values() reads
    them (lines stripped of SP/HTAB, joined by one SP), found at memchr speed."""
    out = []
    for _, raw in named_values(header_block, (b"from",), space=True, whole=True):
        lines = _LINE_END.split(raw) if b"\n" in raw else (raw,)
        out.append(" ".join(p for p in (line.strip(b" \t").decode("utf-8", "replace")
                                        for line in lines) if p))
    return out


def from_domain(header_block: bytes) -> tuple[str | None, str]:
    """RFC 7489 6.6.1: (domain, "") when the header holds exactly one From field with
    exactly one mailbox that has a domain; else (None, why).  The domain is lower-case
    with A-labels.  A group in From (RFC 5322 allows none) is read through: its single
    member is the address a reader sees."""
    try:
        values = from_values(header_block)
        if not values:
            return None, "no From header field"
        if len(values) > 1:
            return None, f"{len(values)} From header fields"
        domains = _mailbox_domains(values[0])
    except _Malformed as e:
        return None, f"malformed From: {e}"
    except Exception as e:  # never let a header crash the check
        return None, f"malformed From: {type(e).__name__}"
    if not domains:
        return None, "no address in From"
    if len(domains) > 1:
        return None, f"{len(domains)} addresses in From"
    domain = domains[0]
    if not domain:
        return None, "From address has no domain"
    if domain.startswith("["):
        return None, "From domain is an address literal"
    normalized = normalize_domain(domain)
    if normalized is None:
        return None, f"invalid From domain {domain[:80]!r}"
    return normalized, ""


# -- Policy discovery and alignment (RFC 7489 6.6.2 - 6.6.4) ----------------------------

def _aligned(orgs: OrgDomains, domain: str, from_dom: str, mode: str) -> bool:
    """RFC 7489 3.1.1 / 3.1.2: strict: the same name; relaxed: the same org domain."""
    if domain == from_dom:
        return True
    return mode != "s" and orgs.org_domain(domain) == orgs.org_domain(from_dom)


def _identifiers(spf_result: str, spf_domain: str,
                 dkim_pass_domains: list[str]) -> tuple[list[str], str | None, bool]:
    """The normalized d= of each passing DKIM signature, the SPF-checked domain, and
    whether SPF passed: what alignment is judged on."""
    dkim_domains = [d for d in (normalize_domain(x) for x in dkim_pass_domains if x) if d]
    spf_dom = normalize_domain(spf_domain.rpartition("@")[2]) if spf_domain else None
    return dkim_domains, spf_dom, spf_result.strip().lower() == "pass"


def _dns_error(orgs: OrgDomains, domain: str, name: str, answer: Any, spf_result: str,
               spf_domain: str, dkim_pass_domains: list[str]) -> DMARCResult:
    """RFC 7489 6.6.3: the policy record could not be had.  With an identifier that
    passed and shares the From domain's organizational domain the message would pass
    under any record but a strict one: it goes on, policy none.  Without one it would
    fail under any record there may be, so the disposition is "unknown": the checker
    answers 451 and the sender tries again.  Else a lame delegation for a subdomain of a
    p=reject organisation (_dmarc.old.bank.example timing out) would let its forgeries
    in."""
    detail = f": {answer.detail}" if answer.detail else ""
    reason = f"DNS error looking up _dmarc.{name}{detail}"
    dkim_domains, spf_dom, spf_pass = _identifiers(spf_result, spf_domain, dkim_pass_domains)
    passed = dkim_domains + ([spf_dom] if spf_pass and spf_dom else [])
    if any(_aligned(orgs, d, domain, "r") for d in passed):
        return DMARCResult("temperror", domain, "", "none",
                           reason + "; an aligned identifier passed", name)
    return DMARCResult("temperror", domain, "", "unknown",
                       reason + "; no aligned spf or dkim pass: policy unknown", name)


def _records(answer: Any) -> list[bytes]:
    return [r for r in answer.records if isinstance(r, bytes) and _is_dmarc(r)]


class _Missing(Exception):
    """The evaluation needs a DNS answer that is not at hand yet."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _evaluate(txt: Callable[[str], Any], orgs: OrgDomains, from_dom: str, spf_result: str,
              spf_domain: str, dkim_pass_domains: list[str],
              dkim_temperror_domains: list[str], rand: Callable[[], float]) -> DMARCResult:
    """RFC 7489 6.6 over the answers `txt(name)` gives; it raises _Missing for one it
    does not have, and the caller asks DNS and evaluates again."""
    domain = normalize_domain(from_dom)
    if domain is None:
        return DMARCResult("permerror", "", "", "none",
                           f"invalid From domain {from_dom[:80]!r}")

    # RFC 7489 6.6.3: the From domain's record, else the organizational domain's.
    record_domain = domain
    answer = txt(f"_dmarc.{domain}")
    if answer.status == "error":
        return _dns_error(orgs, domain, domain, answer, spf_result, spf_domain,
                          dkim_pass_domains)
    found = _records(answer) if answer.status == "ok" else []
    org = orgs.org_domain(domain) if not found else domain
    if not found and org != domain:
        record_domain = org
        answer = txt(f"_dmarc.{org}")
        if answer.status == "error":
            return _dns_error(orgs, domain, org, answer, spf_result, spf_domain,
                              dkim_pass_domains)
        found = _records(answer) if answer.status == "ok" else []
    if not found:
        return DMARCResult("none", domain, "", "none", "no DMARC record")
    if len(found) > 1:        # 6.6.3 step 5
        return DMARCResult("none", domain, "", "none",
                           f"{len(found)} DMARC records at _dmarc.{record_domain}",
                           record_domain)
    try:
        record = parse_record(found[0])
    except DMARCSyntaxError as e:
        return DMARCResult("none", domain, "", "none",
                           f"unusable DMARC record at _dmarc.{record_domain}: {e}",
                           record_domain)
    policy = record.p if record_domain == domain else record.sp

    # RFC 7489 3.1: identifier alignment.
    dkim_domains, spf_dom, spf_pass = _identifiers(spf_result, spf_domain, dkim_pass_domains)
    for d in dkim_domains:
        if _aligned(orgs, d, domain, record.adkim):
            return DMARCResult("pass", domain, policy, "none",
                               f"aligned dkim pass for {d}", record_domain)
    if spf_pass and spf_dom and _aligned(orgs, spf_dom, domain, record.aspf):
        return DMARCResult("pass", domain, policy, "none",
                           f"aligned spf pass for {spf_dom}", record_domain)

    notes = []
    if dkim_domains:
        notes.append(f"dkim pass for {', '.join(dkim_domains[:3])} not aligned")
    if spf_pass and spf_dom:
        notes.append(f"spf pass for {spf_dom} not aligned")
    reason = "no aligned spf or dkim pass" + (f" ({'; '.join(notes)})" if notes else "")
    unsure = _unsure(orgs, domain, record, spf_result, spf_dom, dkim_temperror_domains)
    if unsure:
        reason += f"; temporary error for {unsure}: no conclusive result"

    # RFC 7489 6.6.4 / 6.3 pct: a message outside the sample gets the next lower policy.
    disposition, sampled_out = policy, False
    if policy != "none" and rand() * 100 >= record.pct:
        disposition, sampled_out = _LOWER[policy], True
        reason += f"; pct={record.pct}: {policy} not applied"
    return DMARCResult("temperror" if unsure else "fail", domain, policy, disposition, reason,
                       record_domain, sampled_out)


def _unsure(orgs: OrgDomains, domain: str, record: DMARCRecord, spf_result: str,
            spf_dom: str | None, dkim_temperror_domains: list[str]) -> str:
    """The identifiers that might have passed aligned but for a temporary error (a DNS
    timeout, a verification that could not finish), as text; "" when there is none.

    Without them the message fails; with one, RFC 7489 6.6.2 has no pass or fail to go
    on, and a permanent refusal for our own passing trouble would lose a message its
    sender may never send again.  A DKIM temperror with no d= known (the verification
    as a whole failed) may have been aligned.  Unaligned ones change nothing: a forger
    cannot turn a fail into a temperror with a signature of a domain of his own."""
    unsure = []
    for d in dkim_temperror_domains:
        name = normalize_domain(d) if d else None
        if not d:
            unsure.append("dkim")
        elif name and _aligned(orgs, name, domain, record.adkim):
            unsure.append(f"dkim {name}")
    if spf_result.strip().lower() == "temperror" and spf_dom and _aligned(
            orgs, spf_dom, domain, record.aspf):
        unsure.append(f"spf {spf_dom}")
    return ", ".join(dict.fromkeys(unsure))


class _Cached:
    """TXT answers for one evaluation: those fetched for it, else the resolver's cached
    ones (`current`); _Missing for one that is neither."""

    __slots__ = ("current", "fetched")

    def __init__(self, resolver: Any) -> None:
        self.current = getattr(resolver, "current", None)
        self.fetched: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        answer = self.fetched.get(name)
        if answer is None and self.current is not None:
            answer = self.fetched[name] = self.current(name, "TXT")
        if answer is None:
            raise _Missing(name)
        return answer


def evaluate_now(resolver: Any, orgs: OrgDomains, from_domain: str, spf_result: str,
                 spf_domain: str, dkim_pass_domains: list[str], *,
                 dkim_temperror_domains: Sequence[str] = (),
                 rand: Callable[[], float] = random.random) -> DMARCResult | defer.Deferred:
    """RFC 7489 6.6: the DMARCResult at once when the resolver has every answer it needs
    in its cache (`current`), as it has for a sender seen within the records' TTL; else
    a Deferred[DMARCResult].  Never fails.  `dkim_temperror_domains`: the d= of each
    signature whose verification ended in temperror ("" when not known)."""
    txt = _Cached(resolver)
    args = (orgs, from_domain, spf_result, spf_domain, list(dkim_pass_domains),
            list(dkim_temperror_domains), rand)
    try:
        return _evaluate(txt, *args)
    except _Missing as missing:
        d = _fetch(resolver, txt, missing.name, args)
    except Exception:
        d = defer.fail()
    return d.addErrback(_failed, from_domain)


def _fetch(resolver: Any, txt: _Cached, name: str, args: tuple) -> defer.Deferred:
    """Ask DNS for `name`, then evaluate again (and again, for the next missing name)."""
    def answered(answer: Any) -> DMARCResult | defer.Deferred:
        txt.fetched[name] = answer
        try:
            return _evaluate(txt, *args)
        except _Missing as missing:
            return _fetch(resolver, txt, missing.name, args)

    return defer.maybeDeferred(resolver.txt, name).addCallback(answered)


def _failed(failure: Any, from_domain: str) -> DMARCResult:
    log.failure("DMARC evaluation for {domain} failed", failure, domain=from_domain)
    return DMARCResult("temperror", from_domain or "", "", "none",
                       "internal error evaluating DMARC")


def evaluate(resolver: Any, orgs: OrgDomains, from_domain: str, spf_result: str,
             spf_domain: str, dkim_pass_domains: list[str], *,
             dkim_temperror_domains: Sequence[str] = (),
             rand: Callable[[], float] = random.random) -> defer.Deferred:
    """RFC 7489 6.6: Deferred[DMARCResult]; never fails.

    spf_domain: the MAIL FROM domain SPF checked ("" when SPF checked HELO, which DMARC
    does not use); dkim_pass_domains: the d= of each DKIM signature that passed;
    dkim_temperror_domains: of each that ended in temperror.  A message that fails only
    for want of an aligned identifier a temporary error kept from passing is
    "temperror", with the disposition a failure would have had."""
    result = evaluate_now(resolver, orgs, from_domain, spf_result, spf_domain,
                          dkim_pass_domains, dkim_temperror_domains=dkim_temperror_domains,
                          rand=rand)
    return result if isinstance(result, defer.Deferred) else defer.succeed(result)
