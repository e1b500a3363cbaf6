"""Mail address parsing and normalisation; pure functions, no I/O.

Every address that reaches the accounts database or the recipient checks goes through
`split_address`, so there is exactly one notion of "the same mailbox": the local part is
lowercased (as Dovecot does with %Lu) and the domain is lowercased and IDNA-encoded to its
ASCII 'xn--' form.  Anything that could route mail somewhere other than where it seems to
point (source routes, '%' hacks, bang paths, several '@', quoted '@') is refused here rather
than interpreted, which is what keeps the MX from being tricked into relaying.
"""

from __future__ import annotations

import ipaddress
import re

import idna

MAX_LOCALPART_OCTETS = 64
MAX_ADDRESS_OCTETS = 254
MAX_DOMAIN_OCTETS = 253

# RFC 5322 atext minus '%' and '!', which only ever serve relay tricks.
_ATOM = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL_TEXT = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LABEL = re.compile(_LABEL_TEXT)
# A host name as DNS hands it over (lower case, no final dot): letters, digits and
# hyphens in dot-separated labels (RFC 1123 2.1), 253 octets at most.
HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL_TEXT}(?:\.{_LABEL_TEXT})*")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]|\s")  # \s: the characters str.isspace() accepts


class AddressError(ValueError):
    """An address that is malformed or could be used to route mail elsewhere."""


def split_address(addr: str) -> tuple[str, str]:
    """(localpart, domain) of a plain mailbox 'local@domain', both in canonical form.

    A harmless quoted local part ('"alice"@example.org') is unquoted to its content; a
    domain literal ('[192.0.2.1]', '[IPv6:2001:db8::1]') is kept in brackets, normalised.
    """
    if not isinstance(addr, str):
        raise AddressError("address must be text")
    if not addr:
        raise AddressError("empty address")
    if _FORBIDDEN.search(addr):
        raise AddressError("control characters or spaces in address")
    if len(addr.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    if addr.startswith("@"):
        if ":" in addr or "," in addr:
            raise AddressError("source routes are not accepted")
        raise AddressError("empty local part")
    if addr.startswith('"'):
        local, rest = _split_quoted(addr)
    else:
        if "@" not in addr:
            if "!" in addr:
                raise AddressError("bang paths are not accepted")
            raise AddressError("missing domain")
        local, _, rest = addr.partition("@")
        rest = "@" + rest
        if '"' in local:
            raise AddressError("misplaced quote in local part")
    domain = rest[1:]
    if "@" in domain:
        raise AddressError("more than one '@' in address")
    local = _check_localpart(local)
    domain = _normalize_domain_or_literal(domain)
    if len(local) + 1 + len(domain) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address longer than {MAX_ADDRESS_OCTETS} octets")
    return local, domain


def normalize(addr: str) -> str:
    """The canonical 'local@domain' form used as the key everywhere."""
    local, domain = split_address(addr)
    return f"{local}@{domain}"


def check_recipient_syntax(path: str) -> str:
    """Validate an SMTP forward-path (without <>) and return its normalised address.

    The AddressError message is the reason to give the client.  Domain literals pass
    here; they never name a local domain, so the caller's locality check refuses them.
    """
    return normalize(path)


def relay_address(path: str) -> str:
    """A forward-path for a domain hosted elsewhere: checked as check_recipient_syntax
    checks it, the domain normalised, the local part as written.  RFC 5321 2.4: only
    the destination host may interpret a local part, and its case MUST be kept."""
    _, domain = split_address(path)
    local = _split_quoted(path)[0] if path.startswith('"') else path.partition("@")[0]
    return f"{local}@{domain}"


def subaddress_base(localpart: str, separator: str = "+") -> str | None:
    """'alice+tag' -> 'alice'; None when there is no separator or the base is empty."""
    if not separator or separator not in localpart:
        return None
    base = localpart.split(separator, 1)[0]
    return base or None


def normalize_domain(domain: str) -> str:
    """A domain name (not a literal) lowercased and IDNA-encoded; for hosted domains."""
    if not isinstance(domain, str):
        raise AddressError("domain must be text")
    if _FORBIDDEN.search(domain):
        raise AddressError("control characters or spaces in domain")
    if domain.startswith("["):
        raise AddressError("a domain literal cannot be a mail domain")
    return _normalize_domain_name(domain)


def is_domain_literal(domain: str) -> bool:
    """True for '[192.0.2.1]'-style domains (never hosted here)."""
    return domain.startswith("[")


# -- helpers ---------------------------------------------------------------------------

def _split_quoted(addr: str) -> tuple[str, str]:
    """Unquote a quoted local part; return (content, rest starting with '@')."""
    content: list[str] = []
    i = 1
    while i < len(addr):
        c = addr[i]
        if c == "\\":
            if i + 1 >= len(addr):
                break
            content.append(addr[i + 1])
            i += 2
            continue
        if c == '"':
            break
        content.append(c)
        i += 1
    else:
        raise AddressError("unterminated quoted local part")
    if i >= len(addr):
        raise AddressError("unterminated quoted local part")
    text = "".join(content)
    for char, what in (("@", "'@'"), ("%", "'%'"), ("!", "'!'")):
        if char in text:
            raise AddressError(f"quoted local part containing {what} is not accepted")
    rest = addr[i + 1:]
    if not rest.startswith("@"):
        if not rest:
            raise AddressError("missing domain")
        raise AddressError("text after quoted local part")
    if not text:
        raise AddressError("empty local part")
    return text, rest


def _check_localpart(local: str) -> str:
    if not local:
        raise AddressError("empty local part")
    if "%" in local:
        raise AddressError("'%' in local part is not accepted")
    if "!" in local:
        raise AddressError("bang paths are not accepted")
    if not local.isascii():
        raise AddressError("non-ASCII local part is not supported")
    if len(local) > MAX_LOCALPART_OCTETS:
        raise AddressError(f"local part longer than {MAX_LOCALPART_OCTETS} octets")
    if not _DOT_ATOM.fullmatch(local):
        raise AddressError("invalid characters or dots in local part")
    return local.lower()


def _normalize_domain_or_literal(domain: str) -> str:
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        return _normalize_literal(domain)
    return _normalize_domain_name(domain)


def _normalize_literal(domain: str) -> str:
    if not domain.endswith("]"):
        raise AddressError("malformed domain literal")
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[ipv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("malformed domain literal") from None


def _normalize_domain_name(domain: str) -> str:
    if not domain:
        raise AddressError("empty domain")
    if not domain.isascii():
        domain = _idna_encode(domain)
    domain = domain.lower()
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError(f"domain longer than {MAX_DOMAIN_OCTETS} octets")
    labels = domain.split(".")
    for label in labels:
        if not label:
            raise AddressError("empty label in domain")
        if not _LABEL.fullmatch(label):
            raise AddressError(f"invalid domain label {label!r}")
    if labels[-1].isdigit():
        raise AddressError("numeric top-level domain (write an IP address as [literal])")
    return domain


def to_a_labels(name: str) -> str:
    """A domain name (or one label) with its U-labels as A-labels, by IDNA 2008 (UTS 46,
    not transitional), as RFC 8616 and the registries have it: faß.de is xn--fa-hia.de.
    Python's "idna" codec is IDNA 2003, which maps it to fass.de, another domain with
    another owner (and another DMARC policy).  UnicodeError (idna.IDNAError) when it
    has no A-label form."""
    return idna.encode(name, uts46=True, transitional=False).decode("ascii")


def to_a_labels_as_read(name: str) -> str:
    """to_a_labels() for a name someone else wrote (a From: or MAIL FROM domain): one
    IDNA 2008 refuses but IDNA 2003 maps (a zero-width joiner inside "pay\u200dpal.com",
    which a reader shows as paypal.com) is taken as IDNA 2003 reads it, so that the
    policy of the domain a reader sees applies, not none at all."""
    try:
        return to_a_labels(name)
    except UnicodeError:
        return name.encode("idna").decode("ascii")


def _idna_encode(domain: str) -> str:
    try:
        return to_a_labels(domain)
    except UnicodeError as e:
        raise AddressError(f"invalid internationalised domain: {e}") from None
