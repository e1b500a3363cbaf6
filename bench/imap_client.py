"""A small, fast IMAP client for load generation (blocking sockets, stdlib only).

It reads responses without building them into objects: it counts untagged responses, skips
literals by their announced size, and keeps only the lines the caller asks for (by prefix)
and the literal sizes, so that 100,000 FETCH responses cost the client little.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from dataclasses import dataclass, field

_LITERAL = re.compile(rb"\{(\d+)\+?\}$")


class IMAPError(Exception):
    """A tagged NO/BAD or a malformed answer from the server under test."""


@dataclass
class Response:
    status: bytes               # OK / NO / BAD
    text: bytes                 # the tagged line
    untagged: int = 0           # untagged responses ("* ...")
    fetches: int = 0            # untagged FETCH responses
    nbytes: int = 0             # bytes received for this command
    elapsed: float = 0.0        # seconds from sending the command to the tagged reply
    kept: list[bytes] = field(default_factory=list)     # untagged lines with a wanted prefix
    literals: list[int] = field(default_factory=list)   # sizes of the literals received


class IMAPConn:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 600.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self.n = 0
        greeting = self._line()
        if not greeting.startswith(b"* OK"):
            raise IMAPError(f"greeting {greeting[:80]!r}")

    def _fill(self) -> int:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise IMAPError("connection closed by the server")
        if self.pos > (1 << 20):
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += chunk
        return len(chunk)

    def _line(self) -> bytes:
        while True:
            eol = self.buf.find(b"\r\n", self.pos)
            if eol >= 0:
                line = bytes(self.buf[self.pos:eol])
                self.pos = eol + 2
                return line
            self._fill()

    def command(self, cmd: str | bytes, keep: tuple[bytes, ...] = ()) -> Response:
        self.n += 1
        tag = b"b%d" % self.n
        if isinstance(cmd, str):
            cmd = cmd.encode()
        t0 = time.perf_counter()
        self.sock.sendall(tag + b" " + cmd + b"\r\n")
        resp = self._read(tag + b" ", keep)
        resp.elapsed = time.perf_counter() - t0
        return resp

    def _read(self, tagsp: bytes, keep: tuple[bytes, ...]) -> Response:
        untagged = fetches = nbytes = 0
        kept: list[bytes] = []
        literals: list[int] = []
        buf = self.buf
        while True:
            # one logical response line: may be interrupted by literals
            start = self.pos
            scan = start
            first_part = None
            while True:
                eol = buf.find(b"\r\n", scan)
                if eol < 0:
                    self._fill()
                    buf = self.buf
                    # _fill may have compacted the buffer
                    if self.pos != start:
                        shift = start - self.pos
                        start -= shift
                        scan -= shift
                    continue
                if first_part is None:
                    first_part = bytes(buf[start:min(eol, start + 200)])
                m = _LITERAL.search(buf, max(scan, eol - 16), eol)
                if m is None:
                    break
                size = int(m.group(1))
                literals.append(size)
                need = eol + 2 + size
                while len(buf) < need + 2:
                    self._fill()
                    buf = self.buf
                    if self.pos != start:
                        shift = start - self.pos
                        start -= shift
                        eol -= shift
                        need -= shift
                        scan -= shift
                scan = need
            line_end = eol + 2
            nbytes += line_end - start
            self.pos = line_end
            if first_part.startswith(b"* "):
                untagged += 1
                if b" FETCH " in first_part[:30]:
                    fetches += 1
                if keep and first_part.startswith(keep):
                    kept.append(bytes(buf[start:eol]))
                continue
            if first_part.startswith(b"+"):
                raise IMAPError(f"unexpected continuation {first_part[:80]!r}")
            if first_part.startswith(tagsp):
                status = first_part[len(tagsp):].split(b" ", 1)[0]
                return Response(status, first_part, untagged, fetches, nbytes, 0.0, kept,
                                literals)
            raise IMAPError(f"unexpected line {first_part[:80]!r}")

    def ok(self, cmd: str | bytes, keep: tuple[bytes, ...] = ()) -> Response:
        r = self.command(cmd, keep)
        if r.status != b"OK":
            raise IMAPError(f"{cmd[:60]!r}: {r.text[:200]!r}")
        return r

    def login(self, user: str, password: str) -> Response:
        return self.ok(f'LOGIN "{user}" "{password}"')

    def idle_start(self) -> None:
        self.n += 1
        self.idle_tag = b"b%d" % self.n
        self.sock.sendall(self.idle_tag + b" IDLE\r\n")
        line = self._line()
        if not line.startswith(b"+"):
            raise IMAPError(f"IDLE: {line[:80]!r}")

    def idle_done(self) -> Response:
        self.sock.sendall(b"DONE\r\n")
        return self._read(self.idle_tag + b" ", ())

    def logout(self) -> None:
        with contextlib.suppress(OSError, IMAPError):  # the connection may already be gone
            self.command("LOGOUT")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def search_numbers(resp: Response) -> list[int]:
    out: list[int] = []
    for line in resp.kept:
        if line.startswith(b"* SEARCH"):
            out.extend(int(x) for x in line[8:].split() if x.isdigit())
    return out


def exists_of(resp: Response) -> int | None:
    for line in resp.kept:
        parts = line.split()
        if len(parts) == 3 and parts[2] == b"EXISTS":
            return int(parts[1])
    return None
