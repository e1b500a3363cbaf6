"""SPF (RFC 7208): is the client allowed to send mail for the MAIL FROM (or HELO) domain?

Evaluated here rather than with pyspf because every DNS question has to go through the
shared non-blocking resolver (`mailserver.inbound.dns`), whose Deferreds never fail and
carry an `Answer`.  DNS is asked lazily, one term at a time in record order, so a record
that matches on its first term costs one TXT lookup.

Every problem a published record can have ends as one of the RFC's results: a record that
breaks the grammar (also anywhere after the term that matched), a loop, or more than 10
DNS-querying terms give "permerror"; a resolver that does not answer gives "temperror".
Nothing raises out of `check_host` or `check_spf`.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Union

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.addresses import to_a_labels_as_read
from mailserver.inbound.dns import Answer

log = Logger()

MAX_DNS_TERMS = 10        # RFC 7208 4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID_LOOKUPS = 2      # RFC 7208 4.6.4: answers with no records / NXDOMAIN
MAX_MX_NAMES = 10         # RFC 7208 4.6.4: more MX names -> permerror
MAX_PTR_NAMES = 10        # RFC 7208 4.6.4: PTR names past this are ignored
MAX_RECORD_BYTES = 8192   # a longer "v=spf1" record is garbage, not a policy
MAX_EXPANSION = 8192      # characters one macro-string may expand to
MAX_EXPLANATION = 512     # characters kept of an exp= text
MAX_ELAPSED = 20.0        # RFC 7208 4.6.4: seconds for one check_host(), then temperror

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class SPFResult:
    """The outcome of one SPF check, ready for Received-SPF / Authentication-Results."""

    result: str        # one of RESULTS
    identity: str      # "mailfrom" or "helo"
    domain: str        # the domain checked (MAIL FROM's domain, or the HELO name)
    sender: str        # the <sender> checked: MAIL FROM, or "postmaster@<helo>"
    reason: str        # short text for logs and header comments
    explanation: str = ""   # from exp= when the result is "fail"


class _PermError(Exception):
    """Ends the whole evaluation with "permerror" (RFC 7208 2.6.7)."""


class _TempError(Exception):
    """Ends the whole evaluation with "temperror" (RFC 7208 2.6.6)."""


# --- Macros (RFC 7208 7) -------------------------------------------------------------

_MACRO_EXPAND = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
_DOMAIN_LETTERS = frozenset("slodiphv")
_EXP_LETTERS = frozenset("slodiphvcrt")


@dataclass(frozen=True)
class _Macro:
    letter: str          # lower-case macro letter
    escape: bool         # upper-case letter: URL-escape the expansion (7.3)
    keep: int | None     # DIGIT transformer: keep this many right-hand parts
    reverse: bool        # "r" transformer
    delimiters: str      # split characters ("" means ".")


_Token = Union[str, _Macro]


def _tokenize(text: str, explanation: bool) -> tuple[list[_Token], str]:
    """RFC 7208 7.1: (tokens, the raw text after the last macro-expand)."""
    letters = _EXP_LETTERS if explanation else _DOMAIN_LETTERS
    tokens: list[_Token] = []
    literal: list[str] = []
    tail_start = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "%":
            if not ("\x21" <= ch <= "\x7e" or (explanation and ch == " ")):
                raise ValueError(f"invalid character {ch!r}")
            literal.append(ch)
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt in ("%", "_", "-"):
            literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])
            i += 2
            tail_start = i
            continue
        m = _MACRO_EXPAND.match(text, i)
        if nxt != "{" or m is None:
            raise ValueError(f"invalid macro at {text[i:i + 12]!r}")
        letter, digits, reverse, delimiters = m.groups()
        if letter.lower() not in letters:
            raise ValueError(f"macro letter {letter!r} not allowed here")
        keep = None
        if digits:
            significant = digits.lstrip("0")
            if not significant:
                raise ValueError("macro keeps zero parts")   # RFC 7208 7.3
            keep = int(significant) if len(significant) <= 5 else 99999
        if literal:
            tokens.append("".join(literal))
            literal = []
        tokens.append(_Macro(letter.lower(), letter.isupper(), keep, bool(reverse), delimiters))
        i = tail_start = m.end()
    if literal:
        tokens.append("".join(literal))
    return tokens, text[tail_start:]


def parse_macro_string(text: str, explanation: bool = False) -> list[_Token]:
    """RFC 7208 7.1: a macro-string (or, with `explanation`, an explain-string) as
    literal strings and `_Macro`s.  Raises ValueError on any syntax error."""
    return _tokenize(text, explanation)[0]


# RFC 7208 7.1: domain-end = "." toplabel ["."], where
# toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_DOMAIN_END = re.compile(
    r"\.(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\.?\Z")


def parse_domain_spec(text: str) -> list[_Token]:
    """RFC 7208 7.1: domain-spec = macro-string domain-end, where domain-end is
    "." toplabel ["."] or a macro-expand.  Raises ValueError."""
    if not text:
        raise ValueError("empty domain-spec")
    tokens, tail = _tokenize(text, False)
    if tail and not _DOMAIN_END.search(tail):
        raise ValueError(f"{text!r} does not end in a valid top-level label")
    return tokens


@dataclass(frozen=True)
class _MacroContext:
    """What the macro letters expand to (RFC 7208 7.3), for one <domain>."""

    client: IPAddress
    sender: str
    domain: str
    helo: str
    ptr_name: str = "unknown"      # "p": the validated name of the client, if looked up
    receiver: str = "unknown"      # "r": RFC 7208 7.3 allows "unknown"


def _local_and_domain(sender: str) -> tuple[str, str]:
    """RFC 7208 4.3: a <sender> without local-part has the local-part "postmaster"."""
    local, at, domain = sender.rpartition("@")
    if not at:
        return "postmaster", sender
    return local or "postmaster", domain


def _ip_dotted(addr: IPAddress) -> str:
    """RFC 7208 7.3: "i" is the dotted quad, or the 32 dot-separated nibbles for IPv6."""
    if addr.version == 4:
        return str(addr)
    return ".".join(addr.exploded.replace(":", ""))


def _letter_value(letter: str, ctx: _MacroContext) -> str:
    local, domain = _local_and_domain(ctx.sender)
    if letter == "s":
        return f"{local}@{domain}"
    if letter == "l":
        return local
    if letter == "o":
        return domain
    if letter == "d":
        return ctx.domain
    if letter == "i":
        return _ip_dotted(ctx.client)
    if letter == "p":
        return ctx.ptr_name
    if letter == "v":
        return "in-addr" if ctx.client.version == 4 else "ip6"
    if letter == "h":
        return ctx.helo
    if letter == "c":
        return str(ctx.client)
    if letter == "r":
        return ctx.receiver
    if letter == "t":
        return str(int(time.time()))
    raise ValueError(f"unknown macro letter {letter!r}")


def _expand_tokens(tokens: list[_Token], ctx: _MacroContext) -> str:
    out: list[str] = []
    size = 0
    for token in tokens:
        if isinstance(token, str):
            piece = token
        else:
            value = _letter_value(token.letter, ctx)
            # RFC 7208 7.3: split on the delimiters, reverse, keep the right-hand parts,
            # join with "."; upper-case letters are URL-escaped afterwards.
            if token.delimiters:
                parts = re.split("[" + re.escape(token.delimiters) + "]", value)
            else:
                parts = value.split(".")
            if token.reverse:
                parts.reverse()
            if token.keep is not None and token.keep < len(parts):
                parts = parts[len(parts) - token.keep:]
            piece = ".".join(parts)
            if token.escape:
                piece = urllib.parse.quote(piece, safe="")
        size += len(piece)
        if size > MAX_EXPANSION:
            raise ValueError("macro expansion too long")
        out.append(piece)
    return "".join(out)


def expand_macros(text: str, ip: str, domain: str, sender: str, helo: str, *,
                  explanation: bool = False, ptr_name: str = "unknown",
                  receiver: str = "unknown") -> str:
    """RFC 7208 7: expand `text` (a domain-spec's macro-string, or with `explanation`
    an exp= text where "c", "r" and "t" are allowed too).  "p" expands to `ptr_name`.
    Raises ValueError on a syntax error (which is a permerror in a record)."""
    client = _client_address(ip)
    if client is None:
        raise ValueError(f"invalid client address {ip!r}")
    ctx = _MacroContext(client, sender, domain, helo, ptr_name, receiver)
    return _expand_tokens(parse_macro_string(text, explanation), ctx)


# --- Names and addresses -------------------------------------------------------------

def _client_address(ip: str) -> IPAddress | None:
    """The client address; IPv4-mapped IPv6 counts as IPv4 (RFC 7208 5, 4.3)."""
    text = ip.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _dns_name_ok(name: str) -> bool:
    """Can `name` (no final dot) be asked in DNS at all: ASCII, 1-63 octet labels,
    at most 253 octets."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    return all(0 < len(label) <= 63 for label in name.split("."))


def _check_host_domain_ok(name: str) -> bool:
    """RFC 7208 4.3: a malformed or single-label <domain> gives "none"."""
    return _dns_name_ok(name) and "." in name


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?\Z")


def _identity_domain(text: str) -> str | None:
    """RFC 7208 2.3/2.4/4.3: the domain of MAIL FROM or the HELO name as a <domain>, or
    None when it is an address literal or not a domain name (result "none").  A name
    with U-labels is checked in its A-label form (RFC 8616 4)."""
    name = text.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith("["):
        return None
    if not name.isascii():
        try:
            name = to_a_labels_as_read(name)
        except UnicodeError:
            return None
    if not _check_host_domain_ok(name):
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():        # "192.0.2.1" is an address, not a name
        return None
    return name


def _target_name(expanded: str) -> str:
    """RFC 7208 4.8: a final dot is dropped, and a name over 253 characters loses
    labels from the left until it fits."""
    name = expanded[:-1] if expanded.endswith(".") else expanded
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


def _reverse_name(addr: IPAddress) -> str:
    if addr.version == 4:
        return ".".join(reversed(str(addr).split("."))) + ".in-addr.arpa"
    return ".".join(reversed(addr.exploded.replace(":", ""))) + ".ip6.arpa"


def _in_network(client: IPAddress, value: Any, cidr4: int, cidr6: int) -> bool:
    """Is `client` inside the address `value` (a DNS answer) widened to the CIDR length
    of its family?  Garbage answers match nothing."""
    try:
        addr = ipaddress.ip_address(str(value))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.version != client.version:
        return False
    prefix = cidr4 if addr.version == 4 else cidr6
    return client in ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


def _same_or_sub_domain(name: str, domain: str) -> bool:
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


# --- Records (RFC 7208 4.5, 4.6, 5, 6) -----------------------------------------------

def is_spf_record(txt: bytes) -> bool:
    """RFC 7208 4.5: "v=spf1" (any case) followed by a space or the end."""
    return txt[:6].lower() == b"v=spf1" and (len(txt) == 6 or txt[6:7] == b" ")


@dataclass(frozen=True)
class _Directive:
    text: str              # the term as published, for reasons
    qualifier: str         # result when it matches
    mechanism: str         # all include a mx ptr ip4 ip6 exists
    target: tuple = ()     # domain-spec tokens; () means <domain>
    network: Any = None    # ip4/ip6: the network
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    directives: tuple[_Directive, ...]
    redirect: tuple | None     # domain-spec tokens
    exp: tuple | None          # domain-spec tokens


_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)\Z", re.S)
_DIRECTIVE = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.S)
_CIDR4 = r"(?:0|[1-9][0-9]?)"
_CIDR6 = r"(?:0|[1-9][0-9]{0,2})"
_DUAL_CIDR = re.compile(rf"(.*?)(?:/({_CIDR4}))?(?://({_CIDR6}))?\Z", re.S)
_IP_NETWORK = re.compile(r"([^/]*)(?:/(0|[1-9][0-9]{0,2}))?\Z")


def _cidr(value: str | None, maximum: int, what: str) -> int:
    if value is None:
        return maximum
    length = int(value)
    if length > maximum:
        raise _PermError(f"invalid {what} CIDR length /{value}")
    return length


def _domain_spec(text: str, term: str) -> tuple:
    try:
        return tuple(parse_domain_spec(text))
    except ValueError as e:
        raise _PermError(f"invalid domain in \"{_short(term)}\": {e}") from None


def _parse_directive(term: str) -> _Directive:
    m = _DIRECTIVE.match(term)
    if m is None:
        raise _PermError(f"unknown mechanism {_short(term)}")
    qualifier = _QUALIFIERS[m.group(1) or "+"]
    name, rest = m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"invalid mechanism {_short(term)}")
        return _Directive(term, qualifier, name)
    if name in ("include", "exists"):                       # RFC 7208 5.2, 5.7
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs a domain: {_short(term)}")
        return _Directive(term, qualifier, name, _domain_spec(rest[1:], term))
    if name == "ptr":                                       # RFC 7208 5.5
        if not rest:
            return _Directive(term, qualifier, name)
        if not rest.startswith(":"):
            raise _PermError(f"invalid mechanism {_short(term)}")
        return _Directive(term, qualifier, name, _domain_spec(rest[1:], term))
    if name in ("a", "mx"):                                 # RFC 7208 5.3, 5.4
        if rest and rest[0] not in ":/":
            raise _PermError(f"invalid mechanism {_short(term)}")
        cm = _DUAL_CIDR.match(rest)
        assert cm is not None
        spec, c4, c6 = cm.groups()
        target: tuple = ()
        if spec:
            if not spec.startswith(":"):
                raise _PermError(f"invalid CIDR length in {_short(term)}")
            target = _domain_spec(spec[1:], term)
        return _Directive(term, qualifier, name, target, None,
                          _cidr(c4, 32, "IPv4"), _cidr(c6, 128, "IPv6"))
    if name in ("ip4", "ip6"):                              # RFC 7208 5.6
        nm = _IP_NETWORK.match(rest[1:]) if rest.startswith(":") else None
        if nm is None:
            raise _PermError(f"invalid {name} network in {_short(term)}")
        address, length = nm.groups()
        try:
            if "%" in address:
                raise ValueError("zone index")
            addr = (ipaddress.IPv4Address(address) if name == "ip4"
                    else ipaddress.IPv6Address(address))
        except ValueError:
            raise _PermError(f"invalid {name} address in {_short(term)}") from None
        prefix = _cidr(length, 32 if name == "ip4" else 128, "IPv4" if name == "ip4" else "IPv6")
        return _Directive(term, qualifier, name,
                          network=ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
    raise _PermError(f"unknown mechanism {_short(term)}")


def _parse_record(txt: bytes) -> _Record:
    """RFC 7208 4.6: the whole record is parsed first; any syntax error anywhere makes
    the result "permerror" (raised as _PermError)."""
    if len(txt) > MAX_RECORD_BYTES:
        raise _PermError(f"spf record too long ({len(txt)} bytes)")
    try:
        text = txt.decode("ascii")
    except UnicodeDecodeError:
        raise _PermError("spf record is not ASCII") from None
    if any(not (" " <= ch <= "~") for ch in text):
        raise _PermError("control character in spf record")
    directives: list[_Directive] = []
    modifiers: dict[str, tuple] = {}
    for term in text[6:].split(" "):       # RFC 7208 4.6.1: terms separated by 1*SP
        if not term:
            continue
        m = _MODIFIER.match(term)
        if m is None:
            directives.append(_parse_directive(term))
            continue
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):    # RFC 7208 6: each at most once
            if name in modifiers:
                raise _PermError(f"{name}= given twice")
            modifiers[name] = _domain_spec(value, term)
        else:                              # RFC 7208 6: unknown modifiers are ignored
            try:
                parse_macro_string(value, explanation=True)
            except ValueError as e:
                raise _PermError(f"invalid modifier {_short(term)}: {e}") from None
    return _Record(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _short(term: str, limit: int = 80) -> str:
    return term if len(term) <= limit else term[:limit] + "..."


# --- Evaluation (RFC 7208 4, 5, 6) ---------------------------------------------------

class _Evaluation:
    """One check_host() call and every include/redirect it makes; they share the limits
    of RFC 7208 4.6.4."""

    def __init__(self, resolver: Any, client: IPAddress, sender: str, helo: str) -> None:
        self.resolver = resolver
        self.client = client
        self.sender = sender
        self.helo = helo
        self.dns_terms = 0
        self.void_lookups = 0
        self.deadline = time.monotonic() + MAX_ELAPSED
        self._validated: list[str] | None = None
        self._ptr_answer: Answer | None = None

    # DNS ------------------------------------------------------------------------
    def _query(self, name: str, rtype: str) -> defer.Deferred:
        """Deferred[Answer]; a name DNS cannot carry is answered as NXDOMAIN unasked."""
        if time.monotonic() > self.deadline:
            raise _TempError("spf evaluation took too long")
        if not _dns_name_ok(name):
            return defer.succeed(Answer("nxdomain", detail="not a domain name"))
        return self.resolver.lookup(name, rtype)

    def _count_term(self) -> None:
        """RFC 7208 4.6.4: at most 10 terms that query DNS."""
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermError("too many DNS lookups")

    def _count_void(self, answer: Answer) -> None:
        """RFC 7208 4.6.4: at most 2 lookups that find no records."""
        if answer.void:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise _PermError("too many void DNS lookups")

    @staticmethod
    def _temperror(what: str, name: str, answer: Answer) -> _TempError:
        return _TempError(f"DNS error for {what} {name}: {answer.detail or 'no answer'}")

    @property
    def _address_type(self) -> str:
        return "A" if self.client.version == 4 else "AAAA"

    # Macros -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def _expand(self, tokens: tuple, domain: str):
        """Deferred[str]: the macro-string expanded for <domain>; "p" needs DNS."""
        ptr_name = "unknown"
        if any(isinstance(t, _Macro) and t.letter == "p" for t in tokens):
            ptr_name = yield self._validated_name(domain)
        ctx = _MacroContext(self.client, self.sender, domain, self.helo, ptr_name)
        try:
            return _expand_tokens(list(tokens), ctx)
        except ValueError as e:
            raise _PermError(str(e)) from None

    @defer.inlineCallbacks
    def _target(self, directive_target: tuple, domain: str):
        if not directive_target:
            return domain
        expanded = yield self._expand(directive_target, domain)
        return _target_name(expanded)

    @defer.inlineCallbacks
    def _validated_names(self):
        """RFC 7208 5.5: (PTR answer, the client's names whose addresses include it).
        Only the first 10 PTR names are tried; a DNS error on one skips it."""
        if self._validated is not None:
            return self._ptr_answer, self._validated
        answer = yield self._query(_reverse_name(self.client), "PTR")
        names: list[str] = []
        if answer.status == "ok":
            candidates = [str(n).rstrip(".").lower() for n in answer.records][:MAX_PTR_NAMES]
            lookups = yield defer.gatherResults(
                [self._query(n, self._address_type) for n in candidates])
            for name, addresses in zip(candidates, lookups):
                if addresses.status == "ok" and any(
                        _in_network(self.client, a, 32, 128) for a in addresses.records):
                    names.append(name)
        self._ptr_answer, self._validated = answer, names
        return answer, names

    @defer.inlineCallbacks
    def _validated_name(self, domain: str):
        """RFC 7208 7.3 "p": a validated name, the <domain> or a subdomain preferred."""
        _, names = yield self._validated_names()
        for name in names:
            if name == domain.lower():
                return name
        for name in names:
            if _same_or_sub_domain(name, domain):
                return name
        return names[0] if names else "unknown"

    # check_host -------------------------------------------------------------------
    @defer.inlineCallbacks
    def check_host(self, domain: str, with_explanation: bool):
        """RFC 7208 4: (result, reason, explanation) for <domain>; "permerror" and
        "temperror" are raised (they end every enclosing include/redirect too)."""
        name = domain[:-1] if domain.endswith(".") else domain
        if not _check_host_domain_ok(name):                       # RFC 7208 4.3
            return "none", f"invalid domain {_short(domain)!r}", ""
        answer = yield self._query(name, "TXT")                   # RFC 7208 4.4
        if answer.error:
            raise self._temperror("TXT", name, answer)
        if answer.void:
            return "none", f"no spf record for {name}", ""
        records = [r for r in answer.records if isinstance(r, bytes) and is_spf_record(r)]
        if not records:                                           # RFC 7208 4.5
            return "none", f"no spf record for {name}", ""
        if len(records) > 1:
            raise _PermError(f"more than one spf record for {name}")
        record = _parse_record(records[0])
        result = yield self._evaluate(record, name, with_explanation)
        return result

    @defer.inlineCallbacks
    def _evaluate(self, record: _Record, domain: str, with_explanation: bool):
        """RFC 7208 4.6.2, 4.7: the first matching mechanism decides; then redirect=;
        then "neutral"."""
        ip = str(self.client)
        for directive in record.directives:
            matched = yield self._matches(directive, domain)
            if not matched:
                continue
            reason = f"{ip} matched {_short(directive.text)} in spf record of {domain}"
            explanation = ""
            if directive.qualifier == "fail" and with_explanation and record.exp is not None:
                explanation = yield self._explanation(record.exp, domain)
            return directive.qualifier, reason, explanation
        # RFC 7208 6.1: redirect= is ignored when the record has "all" (which always
        # matches, so evaluation never gets here).
        if record.redirect is not None:
            self._count_term()
            target = yield self._target(record.redirect, domain)
            result, reason, explanation = yield self.check_host(target, with_explanation)
            if result == "none":
                raise _PermError(f"redirect={_short(target)}: {reason}")
            return result, reason, explanation
        return "neutral", f"{ip} matched no mechanism in spf record of {domain}", ""

    @defer.inlineCallbacks
    def _matches(self, d: _Directive, domain: str):
        """RFC 7208 5: does one mechanism match the client?"""
        client = self.client
        if d.mechanism == "all":                                  # RFC 7208 5.1
            return True
        if d.mechanism in ("ip4", "ip6"):                         # RFC 7208 5.6
            return client.version == d.network.version and client in d.network
        self._count_term()
        target = yield self._target(d.target, domain)
        if d.mechanism == "include":                              # RFC 7208 5.2
            result, reason, _ = yield self.check_host(target, False)
            if result == "pass":
                return True
            if result == "none":
                raise _PermError(f"include:{_short(target)}: {reason}")
            return False
        if d.mechanism == "exists":                               # RFC 7208 5.7
            answer = yield self._query(target, "A")
            if answer.error:
                raise self._temperror("A", target, answer)
            self._count_void(answer)
            return answer.status == "ok" and bool(answer.records)
        if d.mechanism == "a":                                    # RFC 7208 5.3
            answer = yield self._query(target, self._address_type)
            if answer.error:
                raise self._temperror(self._address_type, target, answer)
            self._count_void(answer)
            return answer.status == "ok" and any(
                _in_network(client, a, d.cidr4, d.cidr6) for a in answer.records)
        if d.mechanism == "mx":                                   # RFC 7208 5.4
            answer = yield self._query(target, "MX")
            if answer.error:
                raise self._temperror("MX", target, answer)
            self._count_void(answer)
            if answer.status != "ok":
                return False
            if len(answer.records) > MAX_MX_NAMES:                # RFC 7208 4.6.4
                raise _PermError(f"more than {MAX_MX_NAMES} MX names for {target}")
            hosts = []
            for record in answer.records:
                host = str(record[1] if isinstance(record, tuple) else record).rstrip(".")
                if host:                                          # "" is a null MX
                    hosts.append(host)
            lookups = yield defer.gatherResults(
                [self._query(h, self._address_type) for h in hosts])
            for host, addresses in zip(hosts, lookups):
                if addresses.error:
                    raise self._temperror(self._address_type, host, addresses)
                if addresses.status == "ok" and any(
                        _in_network(client, a, d.cidr4, d.cidr6) for a in addresses.records):
                    return True
            return False
        if d.mechanism == "ptr":                                  # RFC 7208 5.5
            answer, names = yield self._validated_names()
            self._count_void(answer)
            return any(_same_or_sub_domain(n, target) for n in names)
        raise _PermError(f"unknown mechanism {_short(d.text)}")  # not reached: parsed

    @defer.inlineCallbacks
    def _explanation(self, exp: tuple, domain: str):
        """RFC 7208 6.2: the exp= text for a "fail"; any problem means no text (and the
        lookup counts against no limit)."""
        try:
            target = yield self._target(exp, domain)
            answer = yield self._query(target, "TXT")
            if answer.status != "ok" or len(answer.records) != 1:
                return ""
            text = answer.records[0].decode("ascii")
            tokens = parse_macro_string(text, explanation=True)
            ptr_name = "unknown"
            if any(isinstance(t, _Macro) and t.letter == "p" for t in tokens):
                ptr_name = yield self._validated_name(domain)
            ctx = _MacroContext(self.client, self.sender, domain, self.helo, ptr_name)
            expanded = _expand_tokens(tokens, ctx)
        except (_PermError, _TempError, ValueError, UnicodeError, AttributeError):
            return ""
        # The text comes from the sender's DNS and macros: printable ASCII only.
        cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in expanded)
        return cleaned[:MAX_EXPLANATION]


@defer.inlineCallbacks
def _run(resolver: Any, ip: str, domain: str, sender: str, helo: str,
         with_explanation: bool):
    """Deferred[(result, reason, explanation)]; fails only on a bug."""
    client = _client_address(ip)
    if client is None:
        return "none", f"invalid client address {_short(ip)!r}", ""
    evaluation = _Evaluation(resolver, client, sender, helo)
    try:
        result = yield evaluation.check_host(domain, with_explanation)
    except _PermError as e:
        return "permerror", str(e), ""
    except _TempError as e:
        return "temperror", str(e), ""
    return result


def check_host(resolver: Any, ip: str, domain: str, sender: str,
               helo: str) -> defer.Deferred:
    """RFC 7208 4: Deferred[(result, reason)] for client `ip`, <domain> and <sender>;
    never fails."""
    d = _run(resolver, ip, domain, sender, helo, False)
    d.addCallback(lambda r: (r[0], r[1]))
    d.addErrback(_internal_error, (ip, domain), lambda reason: ("temperror", reason))
    return d


def _internal_error(failure: Any, what: tuple, make: Any) -> Any:
    log.failure("SPF check of {what} failed", failure, what=what)
    return make("internal error")


def check_spf(resolver: Any, ip: str, mail_from: str, helo: str) -> defer.Deferred:
    """RFC 7208 2.3, 2.4: Deferred[SPFResult] for the MAIL FROM identity, or for the
    HELO identity ("postmaster@<helo>") when MAIL FROM is empty.  Never fails."""
    mail_from = (mail_from or "").strip()
    if mail_from.startswith("<") and mail_from.endswith(">"):
        mail_from = mail_from[1:-1].strip()
    helo = (helo or "").strip()
    if mail_from:
        identity = "mailfrom"
        local, at, raw_domain = mail_from.rpartition("@")
        if not at:
            local, raw_domain = "", ""
        domain = _identity_domain(raw_domain)
        sender = f"{local or 'postmaster'}@{domain}"
        if domain is None:
            return defer.succeed(SPFResult("none", identity, raw_domain, mail_from,
                                           "MAIL FROM has no valid domain"))
    else:
        identity = "helo"
        domain = _identity_domain(helo)
        sender = f"postmaster@{domain or helo}"
        if domain is None:
            return defer.succeed(SPFResult("none", identity, helo, sender,
                                           "HELO name is not a domain"))
    d = _run(resolver, ip, domain, sender, helo, True)
    d.addCallback(lambda r: SPFResult(r[0], identity, domain, sender, r[1], r[2]))
    d.addErrback(_internal_error, (ip, domain),
                 lambda reason: SPFResult("temperror", identity, domain, sender, reason))
    return d


class _Recording:
    """A resolver seen through: every (name, type, answer) an evaluation read."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.read: list[tuple[str, str, Answer]] = []

    def lookup(self, name: str, rtype: str) -> defer.Deferred:
        def note(answer: Answer) -> Answer:
            self.read.append((name, rtype, answer))
            return answer
        return self.resolver.lookup(name, rtype).addCallback(note)


class ResultCache:
    """Finished SPF evaluations, reused while every DNS answer they read is still the one
    the resolver holds: the same answers give the same result (RFC 7208 4 is a function
    of the client address, the identities and DNS), so a busy sender's next message costs
    a few dictionary lookups instead of a whole evaluation.  Results that met a DNS error
    are not kept.  The resolver must have `current(name, type)` (CachingResolver)."""

    def __init__(self, resolver: Any, size: int = 4096) -> None:
        self.resolver = resolver
        self.size = size
        self._results: OrderedDict[tuple[str, str, str], tuple[SPFResult, tuple]] = OrderedDict()
        self.hits = 0

    def cached(self, ip: str, mail_from: str, helo: str) -> SPFResult | None:
        """The result of check() when it can be given at once from the cache, else None."""
        key = (ip, mail_from.lower(), helo.lower())
        kept = self._results.get(key)
        if kept is None:
            return None
        result, read = kept
        current = self.resolver.current
        for name, rtype, answer in read:
            if current(name, rtype) is not answer:
                del self._results[key]
                return None
        self.hits += 1
        self._results.move_to_end(key)
        return result

    def check(self, ip: str, mail_from: str, helo: str) -> defer.Deferred:
        """check_spf(), from the cache when it may."""
        result = self.cached(ip, mail_from, helo)
        if result is not None:
            return defer.succeed(result)
        key = (ip, mail_from.lower(), helo.lower())
        recording = _Recording(self.resolver)
        d = check_spf(recording, ip, mail_from, helo)

        def keep(result: SPFResult) -> SPFResult:
            if result.result != "temperror" and not any(a.error for _, _, a in recording.read):
                self._results[key] = (result, tuple(recording.read))
                while len(self._results) > self.size:
                    self._results.popitem(last=False)
            return result

        return d.addCallback(keep)
