"""POP3 RETR of messages read and sent whole (pop3/whole.py) against a real twistd
process: the bytes on the wire over plain TCP and TLS, pipelined RETRs answered in order,
and a client that does not read holding the server to one message in memory."""

from __future__ import annotations

import poplib
import socket
import time
from pathlib import Path

import pytest

from harness import PASSWORD, proc_status_kb, tls_client_context

ALICE = "alice@example.test"
WHOLE_MAX = 64 * 1024  # pop3/whole.py: larger files are streamed


def expected(data: bytes) -> bytes:
    """RFC 1939 3: the message's lines with CRLF, a leading "." doubled, then "."."""
    text = data.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    ended = text.endswith(b"\n")
    if ended:
        lines.pop()
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return body + b".\r\n"


def put(server, name: str, data: bytes) -> None:
    """A file written into INBOX by another program (its size is measured at login)."""
    (server.maildir(ALICE) / "new" / name).write_bytes(data)


class Plain:
    """POP3 over the plain port (allowed from loopback in these servers' config)."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        assert self.line().startswith(b"+OK")
        self.sock.sendall(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n".encode())
        assert self.line().startswith(b"+OK")
        assert self.line().startswith(b"+OK")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed; unparsed {self.buf[:200]!r}")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def multi_raw(self) -> tuple[bytes, bytes]:
        """A multi-line answer: its first line and the rest as sent (through ".\\r\\n")."""
        first = self.line()
        if self.buf.startswith(b".\r\n"):
            self.buf = self.buf[3:]
            return first, b".\r\n"
        start = 0
        while (end := self.buf.find(b"\r\n.\r\n", start)) < 0:
            start = max(0, len(self.buf) - 4)
            self._fill()
        body, self.buf = self.buf[:end + 5], self.buf[end + 5:]
        return first, body

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def plain_server(make_server):
    return make_server(auth={"allow_plaintext_loopback": True})


MESSAGES = [
    ("1600000000.M1P1.other.host", b"Subject: crlf\r\n\r\nbody\r\n.dot line\r\n"),
    ("1600000001.M1P1.other.host", b"Subject: lf only\n\n.starts with a dot\n..two\nend\n"),
    ("1600000002.M1P1.other.host", b"Subject: no final line end\r\n\r\nlast"),
    ("1600000003.M1P1.other.host", b"Subject: at the limit\r\n\r\n"
     + (b"z" * 78 + b"\r\n") * ((WHOLE_MAX - 26) // 80) + b"."),
    ("1600000004.M1P1.other.host", b"Subject: streamed\r\n\r\n"
     + (b".z" * 39 + b"\r\n") * (2 * WHOLE_MAX // 80)),
]


def test_pipelined_retrs_over_plain_tcp_byte_exact(plain_server):
    for name, data in MESSAGES:
        put(plain_server, name, data)
    c = Plain(plain_server.ports["pop3"])
    try:
        # every RETR (and a TOP) in one write: answered in order (RFC 2449 6.6)
        c.sock.sendall(b"".join(b"RETR %d\r\n" % (i + 1) for i in range(len(MESSAGES)))
                       + b"TOP 2 0\r\nRETR 2\r\n")
        for _, data in MESSAGES:
            first, body = c.multi_raw()
            crlf_size = len(data) + data.count(b"\n") - data.count(b"\r\n")
            assert first == b"+OK %d octets" % crlf_size
            assert body == expected(data)
        first, body = c.multi_raw()
        assert first.startswith(b"+OK") and body == b"Subject: lf only\r\n\r\n.\r\n"
        first, body = c.multi_raw()
        assert body == expected(MESSAGES[1][1])
        c.sock.sendall(b"QUIT\r\n")
        assert c.line().startswith(b"+OK")
    finally:
        c.close()
    assert len(plain_server.messages(ALICE)) == len(MESSAGES)  # RETR deletes nothing


def test_retr_over_tls_byte_exact(plain_server):
    for name, data in MESSAGES:
        put(plain_server, name, data)
    p = poplib.POP3_SSL("127.0.0.1", plain_server.ports["pop3s"],
                        context=tls_client_context(), timeout=30)
    try:
        p.user(ALICE)
        p.pass_(PASSWORD)
        for i, (_, data) in enumerate(MESSAGES, 1):
            _, lines, _ = p.retr(i)
            # poplib: lines without their CRLF, dot-unstuffed
            assert b"\r\n".join(lines) + b"\r\n" == data.replace(b"\r\n", b"\n").replace(
                b"\n", b"\r\n") + (b"" if data.endswith(b"\n") else b"\r\n")
    finally:
        p.quit()


def test_a_client_that_does_not_read_holds_one_message_in_memory(plain_server):
    """400 RETRs of 60 KB asked in one go by a client that reads nothing for a while: the
    server sends what the socket takes and waits for it to drain before the next one,
    so its memory does not grow by the 24 MB asked for."""
    count, size = 400, 60 * 1024
    line = b"m" * 78 + b"\r\n"
    for i in range(count):
        put(plain_server, f"16000{i:05d}.M1P1.other.host",
            b"Subject: %d\r\n\r\n" % i + line * (size // len(line)))
    c = Plain(plain_server.ports["pop3"], timeout=60)
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:
            Path(f"/proc/{plain_server.pid}/clear_refs").write_text("5")
        except OSError as e:
            pytest.skip(f"cannot reset the peak memory count: {e}")
        rss_before = proc_status_kb(plain_server.pid, "VmRSS")
        c.sock.sendall(b"".join(b"RETR %d\r\n" % (i + 1) for i in range(count)))
        time.sleep(2)  # the server fills the socket buffers, then waits
        growth_mb = (plain_server.vm_hwm_kb() - rss_before) / 1024
        for i in range(count):
            first, body = c.multi_raw()
            assert first.startswith(b"+OK") and body.startswith(b"Subject: %d\r\n" % i)
        assert growth_mb < 8, f"server memory grew by {growth_mb:.1f} MB"
    finally:
        c.close()
