"""RFC 4978 COMPRESS=DEFLATE against a real server, with Python's imaplib and zlib: after
the tagged OK both directions are raw deflate inside TLS (implicit and STARTTLS), large
FETCHes and APPENDs go through, a second COMPRESS is NO [COMPRESSIONACTIVE], and a deflate
bomb or a corrupt stream ends the session with BYE while the server stays small."""

from __future__ import annotations

import imaplib
import socket
import ssl
import time
import zlib

import pytest

from harness import proc_status_kb
from imap_helpers import (
    RawIMAP,
    close_quietly,
    imap_login,
    imaplib_ok,
    module_server,
    new_user,
    quote,
)

imap_server = module_server()

imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))


class Deflated:
    """Raw deflate over an imaplib connection's socket, as RFC 4978 4 asks: every
    command flushed with Z_SYNC_FLUSH, responses inflated as they are read."""

    def __init__(self, conn: imaplib.IMAP4) -> None:
        self.conn = conn
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)
        self.plain = b""
        self.wire_in = 0

    def install(self) -> None:
        conn = self.conn
        conn.send = self.send          # type: ignore[method-assign]
        conn.read = self.read          # type: ignore[method-assign]
        conn.readline = self.readline  # type: ignore[method-assign]

    def send(self, data: bytes) -> None:
        self.conn.sock.sendall(self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH))

    def _fill(self) -> None:
        # Bytes imaplib's file object read ahead are the first compressed ones.
        raw = self.conn.file.read1(65536) if hasattr(self.conn.file, "read1") else b""
        if not raw:
            raise imaplib.IMAP4.abort("connection closed")
        self.wire_in += len(raw)
        self.plain += self.inflate.decompress(raw)

    def read(self, size: int) -> bytes:
        while len(self.plain) < size:
            self._fill()
        data, self.plain = self.plain[:size], self.plain[size:]
        return data

    def readline(self) -> bytes:
        while b"\n" not in self.plain:
            self._fill()
        i = self.plain.index(b"\n") + 1
        line, self.plain = self.plain[:i], self.plain[i:]
        return line


def compress(conn: imaplib.IMAP4) -> Deflated:
    typ, data = conn._simple_command("COMPRESS", "DEFLATE")
    assert typ == "OK", (typ, data)
    d = Deflated(conn)
    d.install()
    return d


@pytest.fixture
def user(imap_server):
    return new_user(imap_server, "zip")


@pytest.mark.parametrize("implicit", [True, False], ids=["imaps", "starttls"])
def test_session_through_compression(imap_server, user, implicit):
    body = b"".join(b"line %d of a rather repetitive message body\r\n" % i for i in range(20000))
    message = b"From: a@remote.test\r\nSubject: compressible\r\n\r\n" + body
    conn = imap_login(imap_server, user, implicit=implicit)
    try:
        caps = imaplib_ok(conn.capability())[0].split()
        assert b"COMPRESS=DEFLATE" in caps
        z = compress(conn)
        imaplib_ok(conn.append("INBOX", "(\\Seen)", None, message), "APPEND")
        imaplib_ok(conn.select("INBOX"))
        before = z.wire_in
        data = imaplib_ok(conn.fetch("1", "(FLAGS BODY.PEEK[])"))
        assert data[0][1] == message
        assert b"\\Seen" in data[0][0]
        assert z.wire_in - before < len(message) // 5, "the FETCH was not compressed"
        typ, resp = conn._simple_command("COMPRESS", "DEFLATE")
        assert typ == "NO" and resp[-1].startswith(b"[COMPRESSIONACTIVE]"), (typ, resp)
        imaplib_ok(conn.noop())
        assert imaplib_ok(conn.search(None, "ALL")) == [b"1"]
        assert conn.logout()[0] == "BYE"
    finally:
        close_quietly(conn)


def _raw_compressed(server, user: str) -> tuple[ssl.SSLSocket, zlib._Compress, zlib._Decompress]:
    """A TLS socket logged in as `user` with COMPRESS active, by hand."""
    c = RawIMAP.connect(server, implicit=True)
    r = c.command(b"LOGIN " + quote(user) + b" " + quote("secret"))
    assert r.status == "OK", str(r)
    r = c.command(b"COMPRESS DEFLATE")
    assert r.status == "OK", str(r)
    assert c.buf == b""
    return c.sock, zlib.compressobj(9, zlib.DEFLATED, -15), zlib.decompressobj(-15)


def _read_until_closed(sock: socket.socket, inflate: zlib._Decompress, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += inflate.decompress(chunk)
    except (socket.timeout, ConnectionResetError, ssl.SSLError, OSError):
        pass
    return out


def test_deflate_bomb_ends_the_session(imap_server, user):
    sock, deflate, inflate = _raw_compressed(imap_server, user)
    rss_before = proc_status_kb(imap_server.pid, "VmRSS")
    try:
        # A command line that inflates to 256 MB from about 256 KB on the wire.
        zeros = b"A" * (1024 * 1024)
        sock.sendall(deflate.compress(b"a NOOP "))
        try:
            for _ in range(256):
                sock.sendall(deflate.compress(zeros))
            sock.sendall(deflate.flush(zlib.Z_SYNC_FLUSH))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass   # the server hung up first
        out = _read_until_closed(sock, inflate, 10)
        assert b"* BYE " in out, out[-300:]
        assert b"a OK" not in out
    finally:
        sock.close()
    grown = proc_status_kb(imap_server.pid, "VmRSS") - rss_before
    assert grown < 32 * 1024, f"the server grew by {grown} KiB"
    # The server goes on serving.
    c = RawIMAP.login(imap_server, user)
    try:
        assert c.command("NOOP").status == "OK"
    finally:
        close_quietly(c)


def test_corrupt_stream_ends_the_session(imap_server, user):
    sock, deflate, inflate = _raw_compressed(imap_server, user)
    try:
        sock.sendall(b"\xff\xfe\xfd this is not deflate data\r\n")
        out = _read_until_closed(sock, inflate, 5)
        assert b"* BYE " in out, out
    finally:
        sock.close()


def test_compress_needs_authentication(imap_server):
    c = RawIMAP.connect(imap_server, implicit=True)
    try:
        assert "COMPRESS=DEFLATE" not in c.capabilities()
        r = c.command(b"COMPRESS DEFLATE")
        assert r.status == "BAD", str(r)
        assert c.command(b"NOOP").status == "OK"   # still uncompressed
    finally:
        close_quietly(c)
