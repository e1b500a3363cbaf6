"""ManageSieve's wire syntax (RFC 5804 4): commands in, responses out.  No I/O, no Twisted.

A command is a line of space-separated atoms and strings; a string is quoted ("...", at
most 1024 octets, only \\" and \\\\ escaped) or a literal whose octets follow the line:
{n+}CRLF (literal-c2s, RFC 5804 4).  The synchronizing form {n} is read the same way, with
no continuation sent, as Pigeonhole does: ManageSieve has no continuation for literals, so
a client sending {n} must not wait for one.

Every input is bounded: the command's text (without literal octets) by `max_line`, each
literal by `max_literal`, and all of one command's literals together by `max_literal` plus
`max_line` (a script and its name).  A bad command is consumed to its end, the octets of a
literal announced at the end of a line too long included, and reported as a `WireError`,
so the session answers NO and goes on with the next one; a literal over the limit is
counted off without being kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_QUOTED = 1024          # RFC 5804 4: quoted strings hold at most 1024 octets
MAX_NUMBER = 4294967295    # RFC 5804 4: number = 1*DIGIT, up to 2^32 - 1

_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}")
_TRAILING_LITERAL = re.compile(rb"\{(\d{1,10})\+?\}\Z")
_ATOM_END = re.compile(rb'[ "(){}\\\x00-\x1f\x7f-\xff]')
# Octets kept from the end of a line being skipped: enough for a literal's header
# ("{4294967295+}" and CR), whose octets belong to the skipped command.
_SKIP_TAIL = 16


class Atom(str):
    """An unquoted word (a command name, a number); strings are bytes."""


Arg = Atom | bytes


@dataclass(frozen=True)
class WireError:
    """A command that could not be read; it has been consumed whole."""

    reason: str
    too_large: bool = False     # a literal over the limit (a script too large)


class CommandReader:
    """Feed bytes in; take complete commands (lists of arguments) or errors out."""

    def __init__(self, max_line: int, max_literal: int) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self._buffer = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._args: list[Arg] = []
        self._text = 0                  # octets of command text read so far
        self._literal_left = 0          # octets of the current literal still to come
        self._literal_total = 0         # octets of all this command's literals
        self._literal: bytearray | None = None   # None while discarding one
        self._in_literal = False
        self._after_literal = False     # the text after a literal continues the command
        self._skipping = False          # an over-long line: dropped up to its LF
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Octets received but not consumed yet."""
        return len(self._buffer)

    @property
    def idle(self) -> bool:
        """No command partly read (nothing but whole commands may be waiting)."""
        return (not self._args and not self._in_literal and not self._skipping
                and not self._after_literal and self._error is None)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def clear(self) -> None:
        """Forget everything received (STARTTLS: nothing pipelined before it counts)."""
        self._buffer.clear()
        self._reset()

    def next(self) -> list[Arg] | WireError | None:
        """The next command's arguments, or a WireError, or None until more input."""
        while True:
            if self._in_literal:
                if not self._read_literal():
                    return None
                continue
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if self._skipping:
                    del self._buffer[:-_SKIP_TAIL]
                elif self._text + len(self._buffer) > self.max_line + 1:
                    self._skipping = True
                    self._fail("Command line too long")
                    del self._buffer[:-_SKIP_TAIL]
                return None
            segment = bytes(self._buffer[:nl])
            del self._buffer[:nl + 1]
            if segment.endswith(b"\r"):
                segment = segment[:-1]
            if not self._skipping:
                self._text += len(segment)
                if self._text > self.max_line:
                    self._fail("Command line too long")
            if self._error is None:
                if self._after_literal and segment and not segment.startswith(b" "):
                    self._fail("Expected a space or the end of the line after a literal")
                else:
                    self._after_literal = False
                    if self._tokenize(segment):
                        continue              # a literal follows
            if self._error is not None:
                # A bad command is consumed to its end: the octets of a literal that
                # ends this line are part of it.
                m = _TRAILING_LITERAL.search(segment)
                if m:
                    self._start_literal(int(m.group(1)))
                    continue
            return self._finish()

    # -- internals ------------------------------------------------------------------------

    def _fail(self, reason: str, too_large: bool = False) -> None:
        if self._error is None:
            self._error = WireError(reason, too_large)

    def _finish(self) -> list[Arg] | WireError:
        result: list[Arg] | WireError = self._error if self._error is not None else self._args
        self._reset()
        return result

    def _start_literal(self, size: int) -> None:
        self._in_literal = True
        self._literal_left = size
        self._literal_total += size
        if self._error is None and size > self.max_literal:
            self._fail(f"Literal larger than {self.max_literal} octets", too_large=True)
        elif self._error is None and self._literal_total > self.max_literal + self.max_line:
            self._fail(f"Literals larger than {self.max_literal + self.max_line} octets in "
                       "one command", too_large=True)
        if self._error is not None:
            self._literal = None
        else:
            self._literal = bytearray()

    def _read_literal(self) -> bool:
        take = min(self._literal_left, len(self._buffer))
        if self._literal is not None:
            self._literal += self._buffer[:take]
        del self._buffer[:take]
        self._literal_left -= take
        if self._literal_left:
            return False
        if self._literal is not None:
            self._args.append(bytes(self._literal))
        self._literal = None
        self._in_literal = False
        self._after_literal = True
        return True

    def _tokenize(self, segment: bytes) -> bool:
        """Append the segment's arguments; True when it ends with a literal header (its
        octets come next).  Errors are recorded with _fail."""
        i, n = 0, len(segment)
        while i < n:
            c = segment[i]
            if c == 0x20:
                i += 1
                continue
            if c == 0x22:                                   # quoted string
                end = self._quoted(segment, i)
                if end < 0:
                    return False
                i = end
            elif c == 0x7B:                                 # {n+} or {n}
                m = _LITERAL.match(segment, i)
                if not m:
                    self._fail("Bad literal")
                    return False
                if m.end() != n:
                    self._fail("Text after a literal's size")
                    return False
                size = int(m.group(1))
                if size > MAX_NUMBER:
                    self._fail("Bad literal")
                    return False
                self._start_literal(size)
                return True
            else:                                           # atom
                m = _ATOM_END.search(segment, i)
                end = m.start() if m else n
                if end == i:
                    self._fail("Invalid character in command")
                    return False
                if end - i > MAX_QUOTED:
                    self._fail("Atom too long")
                    return False
                self._args.append(Atom(segment[i:end].decode("ascii")))
                i = end
                if i < n and segment[i] != 0x20:
                    self._fail("Invalid character in command")
                    return False
        return False

    def _quoted(self, segment: bytes, start: int) -> int:
        """Parse the quoted string at `start`; the index after it, or -1 (error)."""
        out = bytearray()
        i, n = start + 1, len(segment)
        while i < n:
            c = segment[i]
            if c == 0x22:
                break
            if c == 0x5C:
                if i + 1 >= n or segment[i + 1] not in b'"\\':
                    self._fail("Bad escape in quoted string")
                    return -1
                out.append(segment[i + 1])
                i += 2
                continue
            if c == 0:
                self._fail("NUL in quoted string")
                return -1
            out.append(c)
            i += 1
        else:
            self._fail("Unterminated quoted string")
            return -1
        if len(out) > MAX_QUOTED:
            self._fail(f"Quoted string longer than {MAX_QUOTED} octets; use a literal")
            return -1
        try:
            out.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("Invalid UTF-8 in quoted string")
            return -1
        self._args.append(bytes(out))
        i += 1
        if i < n and segment[i] != 0x20:
            self._fail("Expected a space after a quoted string")
            return -1
        return i


# -- responses ---------------------------------------------------------------------------

def string(value: str | bytes) -> bytes:
    """A string for the client: quoted when it can be, else a literal (RFC 5804 4)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) <= MAX_QUOTED and not any(c in data for c in b"\r\n\x00"):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def response(kind: str, text: str | bytes | None = None, code: str | None = None,
             code_arg: str | bytes | None = None) -> bytes:
    """OK / NO / BYE [SP "(" code [SP string] ")"] [SP string] CRLF (RFC 5804 4)."""
    out = kind.encode("ascii")
    if code:
        out += b" (" + code.encode("ascii")
        if code_arg is not None:
            out += b" " + string(code_arg)
        out += b")"
    if text is not None:
        out += b" " + string(text)
    return out + b"\r\n"


def capability_lines(items: list[tuple[str, str | None]]) -> bytes:
    """The capability response's lines (RFC 5804 1.7): "NAME" [SP "value"]."""
    return b"".join(string(name) + (b" " + string(value) if value is not None else b"")
                    + b"\r\n" for name, value in items)
