"""Pieces of RFC 5322 header text shared by the readers that need them (IMAP ENVELOPE's
address parser, Authentication-Results' authserv-id); no I/O, no Twisted."""

from __future__ import annotations


def comment_end(text: str, start: int) -> int:
    """RFC 5322 3.2.2: the index of the ")" that closes the comment opening at
    text[start] ("("), comments nesting and quoted pairs skipped; len(text) when it does
    not close."""
    depth, i, n = 0, start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return n
