"""Sieve's lexical tokens (RFC 5228 8.1): identifiers, tags, numbers, quoted and
multi-line strings, comments.  Twisted-free; errors carry the 1-based line."""

from __future__ import annotations

from typing import NamedTuple

MAX_STRING_LENGTH = 1 << 20     # characters in one string literal
MAX_NUMBER = (1 << 64) - 1      # as Pigeonhole: an unsigned 64-bit number

_QUANTIFIERS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_PUNCT = frozenset("[](){},;")
_ID_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_ID_CHARS = _ID_START | frozenset("0123456789")
_DIGITS = frozenset("0123456789")


class SieveSyntaxError(Exception):
    """A script that cannot run: `line` (1-based) and `reason`, str() as "line N: reason"."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


class Token(NamedTuple):
    kind: str       # "id", "tag", "num", "str", "eof" or the punctuation character itself
    value: object   # identifier/tag name (lower case, tag without ":"), int, str; None else
    line: int
    text: str = ""  # identifiers and tags as written, for messages


def tokenize(src: str) -> list[Token]:
    """The whole script as tokens, ending with an "eof" token."""
    out: list[Token] = []
    append = out.append
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":                                  # hash-comment, RFC 5228 2.3
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif c == "/" and src.startswith("/*", i):      # bracket-comment
            j = src.find("*/", i + 2)
            if j < 0:
                raise SieveSyntaxError(line, "unterminated bracket comment /* ... */")
            line += src.count("\n", i, j)
            i = j + 2
        elif c in _PUNCT:
            append(Token(c, None, line))
            i += 1
        elif c == '"':
            i, line = _quoted(src, i, line, append)
        elif c == ":":
            j = i + 1
            if j >= n or src[j] not in _ID_START:
                raise SieveSyntaxError(line, "':' must start a tag such as :is")
            j += 1
            while j < n and src[j] in _ID_CHARS:
                j += 1
            append(Token("tag", src[i + 1:j].lower(), line, src[i:j]))
            i = j
        elif c in _DIGITS:
            j = i
            while j < n and src[j] in _DIGITS:
                j += 1
            value = int(src[i:j]) if j - i < 40 else MAX_NUMBER + 1
            if j < n and src[j].lower() in _QUANTIFIERS:  # RFC 5228 2.4.1
                value *= _QUANTIFIERS[src[j].lower()]
                j += 1
            if value > MAX_NUMBER:
                raise SieveSyntaxError(line, f"number exceeds the limit {MAX_NUMBER}")
            if j < n and src[j] in _ID_CHARS:
                raise SieveSyntaxError(line, f"bad number {src[i:j + 1]!r}")
            append(Token("num", value, line))
            i = j
        elif c in _ID_START:
            j = i + 1
            while j < n and src[j] in _ID_CHARS:
                j += 1
            word = src[i:j]
            if word.lower() == "text" and j < n and src[j] == ":":
                i, line = _multiline(src, j + 1, line, append)
            else:
                append(Token("id", word.lower(), line, word))
                i = j
        else:
            shown = c if c.isprintable() else f"\\x{ord(c):02x}"
            raise SieveSyntaxError(line, f"unexpected character {shown!r}")
    append(Token("eof", None, line))
    return out


def _quoted(src: str, i: int, line: int, append) -> tuple[int, int]:
    """RFC 5228 2.4.2: \\\\ and \\" are escapes; any other backslash is dropped."""
    start_line = line
    j = i + 1
    n = len(src)
    parts: list[str] = []
    while True:
        k = j
        while k < n and src[k] != '"' and src[k] != "\\":
            k += 1
        if k >= n:
            raise SieveSyntaxError(start_line, "unterminated string (no closing '\"')")
        parts.append(src[j:k])
        if src[k] == '"':
            break
        if k + 1 >= n:
            raise SieveSyntaxError(start_line, "unterminated string (no closing '\"')")
        parts.append(src[k + 1])
        j = k + 2
    value = "".join(parts)
    if len(value) > MAX_STRING_LENGTH:
        raise SieveSyntaxError(start_line, "string too long")
    append(Token("str", value, start_line))
    return k + 1, line + src.count("\n", i, k)


def _multiline(src: str, i: int, line: int, append) -> tuple[int, int]:
    """RFC 5228 2.4.2 multi-line: "text:", then the lines up to a lone "." (a leading
    ".." stands for "."); every line ends in CRLF, as the grammar has it, whatever the
    script file uses."""
    start_line = line
    n = len(src)
    while i < n and src[i] in " \t":
        i += 1
    if i < n and src[i] == "#":
        j = src.find("\n", i)
        i = n if j < 0 else j
    elif i < n and src[i] == "\r" and src.startswith("\r\n", i):
        i += 1
    if i >= n or src[i] != "\n":
        raise SieveSyntaxError(line, "text: must be followed by the end of the line")
    i += 1
    line += 1
    lines: list[str] = []
    size = 0
    while True:
        if i >= n:
            raise SieveSyntaxError(start_line, "unterminated multi-line string (no line with a lone '.')")
        j = src.find("\n", i)
        end = n if j < 0 else j + 1
        text = src[i:end]
        body = text.rstrip("\r\n") if j >= 0 else text
        if body == ".":
            if j < 0:
                raise SieveSyntaxError(start_line, "the '.' ending a multi-line string must end its line")
            i = end
            line += 1
            break
        if text.startswith(".."):
            text = text[1:]
        if j >= 0:
            text = text.rstrip("\r\n") + "\r\n"
        lines.append(text)
        size += len(text)
        if size > MAX_STRING_LENGTH:
            raise SieveSyntaxError(start_line, "string too long")
        i = end
        line += 1
    append(Token("str", "".join(lines), start_line))
    return i, line
