"""Authentication-Results header fields (RFC 8601): writing ours, removing forged ones.

A receiving MTA states its SPF/DKIM/DMARC/ARC verdicts in one Authentication-Results
field named after itself (the authserv-id).  Mail readers trust a field only when the
authserv-id is their own server's, so any such field arriving from outside is a forgery
and is removed before ours is added (RFC 8601 5).
"""

from __future__ import annotations

import re
from typing import Callable

from mailserver.addresses import to_a_labels_as_read
from mailserver.rfc5322 import comment_end
from mailserver.shortcache import cache_short

FIELD = "Authentication-Results"
_FIELD_LOWER = FIELD.lower().encode()
WIDTH = 78            # fold lines longer than this where there is a place to fold
MAX_TOKEN = 900       # longest value or comment word written; keeps lines under 998

# RFC 2045 token: printable US-ASCII except SPACE and tspecials.
_TSPECIALS = '()<>@,;:\\"/[]?='
_TOKEN_RE = re.compile(r"[!#-'*+\-.0-9A-Z^-~]+")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?")       # RFC 8601 2.2
_PROPERTY_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+")
# RFC 8601 pvalue may also be [local-part "@"] domain-name without quotes.
_ADDRESS_RE = re.compile(r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
                         r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)?@"
                         r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                         r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


_SPECIAL = re.compile(r"([()\\])")
_PLAIN = re.compile(r"[ -~]*")   # printable ASCII: nearly every value, nothing to do


def _printable(text: str) -> str:
    """Tabs, CRs and LFs become spaces, other control characters go: nothing of a
    value can end the field or start another."""
    if _PLAIN.fullmatch(text):
        return text
    return "".join(" " if c in "\t\r\n" else c for c in text
                   if c in "\t\r\n" or c.isprintable())


def _ascii(value: str) -> str:
    """`value` in ASCII (RFC 8601's grammar is; no SMTPUTF8 here): a domain, or the
    domain of local@domain, as its A-labels (a selector is a DNS label too), anything
    else that is not ASCII as "?"."""
    local, at, domain = value.rpartition("@")
    try:
        domain = to_a_labels_as_read(domain)
    except UnicodeError:
        domain = "".join(c if c.isascii() else "?" for c in domain)
    return "".join(c if c.isascii() else "?" for c in local) + at + domain


@cache_short(maxsize=4096)
def _value(value: str) -> str:
    """An RFC 2045 token or local-part@domain as it is, anything else quoted.
    Remembered: the same domains, selectors and senders come back message after message."""
    value = _printable(value)
    if not value.isascii():
        value = _ascii(value)
    if (_TOKEN_RE.fullmatch(value) or _ADDRESS_RE.fullmatch(value)) and len(value) <= MAX_TOKEN:
        return value
    out, size = ['"'], 2
    for c in value:
        piece = "\\" + c if c in '\\"' else c
        size += len(piece.encode("utf-8"))
        if size > MAX_TOKEN:
            break
        out.append(piece)
    return "".join(out) + '"'


@cache_short(maxsize=1024)
def _comment_words(comment: str) -> tuple[str, ...]:
    """A comment's words, "(" on the first and ")" on the last, ( ) \\ escaped and
    non-ASCII replaced, so the comment can be folded between any two words.
    Remembered: comments are the checks' few fixed reasons."""
    text = _printable(comment)
    if not text.isascii():
        text = "".join(c if c.isascii() else "?" for c in text)
    words = []
    for word in text.split():
        # Cut before escaping (which at most doubles a piece) so no escape is split.
        for start in range(0, len(word), MAX_TOKEN // 2):
            words.append(_SPECIAL.sub(r"\\\1", word[start:start + MAX_TOKEN // 2]))
    if not words:
        return ()
    words[0] = "(" + words[0]
    words[-1] += ")"
    return tuple(words)


@cache_short(maxsize=64)
def _keyword(text: str, lower: bool) -> str | None:
    """A method or result as written (RFC 8601 2.2 keyword), None when it is not one."""
    text = _printable(text).strip()
    if lower:
        text = text.lower()
    return text if _KEYWORD_RE.fullmatch(text) else None


@cache_short(maxsize=256)
def _property_ok(name: str) -> bool:
    return _PROPERTY_RE.fullmatch(name) is not None


def _resinfo_parts(method: str, result: str, comment: str,
                   properties: dict[str, str]) -> list[str] | None:
    """The words of one resinfo (RFC 8601 2.2); None when method or result is not a
    keyword (such a result is left out rather than written malformed)."""
    head = _head_words(str(method), str(result), str(comment or ""))
    if head is None:
        return None
    return [*head, *(_property_word(str(n), v) for n, v in properties.items()
                     if v is not None and _property_ok(str(n).strip()))]


@cache_short(maxsize=256)
def _head_words(method: str, result: str, comment: str) -> tuple[str, ...] | None:
    """"method=result" and the comment's words; None when either is not a keyword."""
    method_word = _keyword(method, False)
    result_word = _keyword(result, True)
    if method_word is None or result_word is None:
        return None
    return (f"{method_word.lower()}={result_word}", *_comment_words(comment))


def _property_word(name: str, value: str) -> str:
    return f"{name.strip()}={_value(str(value))}"


def _fold(parts: list[str]) -> str:
    """One resinfo on lines of its own: a new line where the next word would pass WIDTH."""
    line = "\t" + parts[0]
    lines = []
    for part in parts[1:]:
        if len(line) + 1 + len(part) > WIDTH:
            lines.append(line)
            line = "\t" + part
        else:
            line += " " + part
    lines.append(line)
    return "\r\n".join(lines)


@cache_short(maxsize=1024)
def _folded(method: str, result: str, comment: str,
            properties: tuple[tuple[str, str], ...]) -> str | None:
    """A resinfo's folded text (each starts a line of its own, so it does not depend
    on the others).  Remembered: SPF, DMARC and ARC give the same few results for the
    same senders message after message."""
    parts = _resinfo_parts(method, result, comment, dict(properties))
    return _fold(parts) if parts else None


def _resinfo_text(method: str, result: str, comment: str,
                  properties: dict[str, str]) -> str | None:
    if "header.b" in properties:   # DKIM: a value of its own in every message
        try:
            head = _dkim_words(method, result, comment, tuple(properties.items()))
        except TypeError:   # something unhashable
            head = None
        if head is None:
            parts = _resinfo_parts(method, result, comment, properties)
            return _fold(parts) if parts else None
        words, at = head
        b = properties["header.b"]
        if b is not None:
            words = [*words[:at], f"header.b={_value(str(b))}", *words[at:]]
        return _fold(words)
    try:
        return _folded(method, result, comment, tuple(properties.items()))
    except TypeError:   # something unhashable: not remembered
        parts = _resinfo_parts(method, result, comment, properties)
        return _fold(parts) if parts else None


def _dkim_words(method: str, result: str, comment: str,
                properties: tuple[tuple[str, str], ...]) -> tuple[tuple[str, ...], int] | None:
    """A DKIM resinfo's words but header.b's, and where header.b goes.  All but b= are
    the same for a sender's every message: they are remembered, without b=."""
    names = [n for n, _ in properties]
    at = names.index("header.b")
    return _words_around(method, result, comment, properties[:at], properties[at + 1:])


@cache_short(maxsize=256)
def _words_around(method: str, result: str, comment: str,
                  before: tuple[tuple[str, str], ...],
                  after: tuple[tuple[str, str], ...]) -> tuple[tuple[str, ...], int] | None:
    head = _head_words(str(method), str(result), str(comment or ""))
    if head is None:
        return None
    words = [*head, *(_property_word(str(n), v) for n, v in before
                      if v is not None and _property_ok(str(n).strip()))]
    at = len(words)
    words += [_property_word(str(n), v) for n, v in after
              if v is not None and _property_ok(str(n).strip())]
    return tuple(words), at


def format_header(authserv_id: str,
                  results: list[tuple[str, str, str, dict[str, str]]]) -> bytes:
    """RFC 8601 2.2: one Authentication-Results field, CRLF-terminated, each result on
    its own folded line; "<id>; none" when there are no results."""
    head = f"{FIELD}: {_value(authserv_id.strip().rstrip('.'))};"
    resinfos = [t for t in (_resinfo_text(*r) for r in results) if t]
    if not resinfos:
        return (head + " none\r\n").encode("utf-8")
    return (head + "\r\n" + ";\r\n".join(resinfos) + "\r\n").encode("utf-8")


# -- reading: RFC 8601 2.2 authserv-id ---------------------------------------------------

def _skip_cfws(text: str, i: int) -> int | None:
    """Index after any whitespace and (nested) comments at i; None if a comment does not
    end."""
    while i < len(text):
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            end = comment_end(text, i)
            if end >= len(text):
                return None
            i = end + 1
        else:
            break
    return i


def authserv_id_of(value: bytes | str) -> str | None:
    """The authserv-id of an Authentication-Results field value (the part after the
    colon, folded or not): the first token or quoted string after any comments, when
    it is followed by whitespace, a comment, ";" or the end; else None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = value
    i = _skip_cfws(text, 0)
    if i is None or i >= len(text):
        return None
    if text[i] == '"':
        out = []
        i += 1
        while i < len(text) and text[i] != '"':
            if text[i] == "\\" and i + 1 < len(text):
                i += 1
            if text[i] not in "\r\n":
                out.append(text[i])
            i += 1
        if i >= len(text):
            return None
        ident = "".join(out)
        i += 1
    else:
        start = i
        while i < len(text) and text[i] not in _TSPECIALS and text[i] not in " \t\r\n" \
                and (ord(text[i]) > 0x7F or 0x20 < ord(text[i]) < 0x7F):
            i += 1
        ident = text[start:i]
    if not ident or (i < len(text) and text[i] not in " \t\r\n(;"):
        return None
    return ident


def _same_id(a: str, b: str) -> bool:
    return a.strip().rstrip(".").lower() == b.strip().rstrip(".").lower()


def remove_fields(header_block: bytes, drop: Callable[[bytes, bytes], bool]) -> bytes:
    """The header section without the fields for which drop(lower-case name, raw value
    with its folding) is true; every other line is kept byte for byte."""
    lines = re.findall(rb"[^\n]*\n|[^\n]+", header_block)
    out: list[bytes] = []
    field: list[bytes] = []

    def flush() -> None:
        if field:
            name, colon, rest = field[0].partition(b":")
            if not colon or not drop(name.rstrip(b" \t").lower(), rest + b"".join(field[1:])):
                out.extend(field)
        field.clear()

    for line in lines:
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
            continue
        flush()
        field.append(line)
    flush()
    return b"".join(out)


def is_ours(name: bytes, value: bytes, authserv_id: str) -> bool:
    """An Authentication-Results field (lower-case name, raw value) claiming our id."""
    if name != _FIELD_LOWER:
        return False
    ident = authserv_id_of(value)
    return ident is not None and _same_id(ident, authserv_id)


def strip_ours(header_block: bytes, authserv_id: str) -> bytes:
    """RFC 8601 5: the header section without any Authentication-Results field that
    carries our authserv-id (case-insensitive; comments and a version after it do not
    matter).  Every other line is kept byte for byte, unparseable fields included."""
    return remove_fields(header_block, lambda name, value: is_ours(name, value, authserv_id))
