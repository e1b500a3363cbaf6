"""Parse the MAIL FROM / RCPT TO arguments (RFC 5321 4.1.2) into a path and ESMTP parameters."""

from __future__ import annotations

import re

_PARAM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]*))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 4.1.2 A-d-l: "@one.example,@[192.0.2.1],@[IPv6:2001:db8::1]" before the ":"
# that ends a source route.
_AT_DOMAIN = r"@(?:[^\s,:@<>\"\[\]]+|\[[^\s@<>\"\[\]]+\])"
_ROUTE = re.compile(rf"({_AT_DOMAIN}(?:,{_AT_DOMAIN})*):")


class EnvelopeSyntaxError(ValueError):
    pass


def _split_path(rest: str) -> tuple[str, str]:
    """Split '<path> params' (or a bare path) into the path without brackets and the rest."""
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">")
        if end > 0 and '"' not in rest[1:end]:  # nearly every path: no quoted local part
            return rest[1:end], rest[end + 1:]
        i, quoted = 1, False
        while i < len(rest):
            c = rest[i]
            if c == "\\" and quoted:
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                return rest[1:i], rest[i + 1:]
            i += 1
        raise EnvelopeSyntaxError("unterminated path")
    # Tolerate a path without angle brackets, as many servers do.
    path, _, params = rest.partition(" ")
    if not path:
        raise EnvelopeSyntaxError("missing path")
    return path, " " + params if params else ""


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        raise EnvelopeSyntaxError("garbage after path")
    for word in text.split():
        m = _PARAM_RE.fullmatch(word)
        if not m:
            raise EnvelopeSyntaxError(f"bad parameter {word!r}")
        key = m.group(1).upper()
        if key in params:
            raise EnvelopeSyntaxError(f"duplicate parameter {key}")
        params[key] = m.group(2)
    return params


def parse_command_path(arg: bytes, keyword: str) -> tuple[str, dict[str, str | None]]:
    """('path', {PARAM: value}) from b'FROM:<a@b> SIZE=12' given keyword 'FROM'."""
    try:
        text = arg.decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeSyntaxError("8-bit characters in address") from None
    head = text[:len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise EnvelopeSyntaxError(f"expected {keyword}:")
    path, rest = _split_path(text[len(keyword) + 1:])
    if _CONTROL.search(path):
        raise EnvelopeSyntaxError("control character in address")
    if path.startswith("@"):
        # RFC 5321 3.3 and C: a source route is accepted and ignored; the mailbox after
        # it is the path (never relayed through the hosts it names).
        route = _ROUTE.match(path)
        if route is None or route.end() == len(path):
            raise EnvelopeSyntaxError("bad source route")
        path = path[route.end():]
    return path, _parse_params(rest.rstrip(" "))
