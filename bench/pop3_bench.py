"""POP3 load: one session on a large INBOX: USER/PASS, STAT, UIDL, then RETR of every message
(one at a time, as fetchmail and most clients do), QUIT without DELE.  RETR stops at a time
limit (a server may take 40 ms per message); the time for all is then extrapolated from the
rate, and only the retrieved messages are checked.

Checked: STAT and UIDL count the corpus's messages, and the sizes of the retrieved messages
(after undoing dot-stuffing) are the corpus's sizes.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter

from common import tree_cpu_seconds


class POP3Error(Exception):
    """An -ERR or malformed answer from the server under test."""


class POP3Conn:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 300.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        line = self._line()
        if not line.startswith(b"+OK"):
            raise POP3Error(f"greeting {line[:80]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise POP3Error("connection closed by the server")
        self.buf += chunk

    def _line(self) -> bytes:
        while (eol := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:eol])
        del self.buf[:eol + 2]
        return line

    def simple(self, cmd: str) -> bytes:
        self.sock.sendall(cmd.encode() + b"\r\n")
        line = self._line()
        if not line.startswith(b"+OK"):
            raise POP3Error(f"{cmd.split()[0]}: {line[:100]!r}")
        return line

    def multi(self, cmd: str) -> bytes:
        """A multi-line reply's data (dot-stuffed, with its final CRLF, without the '.')."""
        self.simple(cmd)
        if self.buf.startswith(b".\r\n"):
            del self.buf[:3]
            return b""
        start = 0
        while (end := self.buf.find(b"\r\n.\r\n", start)) < 0:
            start = max(0, len(self.buf) - 4)
            self._fill()
        data = bytes(self.buf[:end + 2])
        del self.buf[:end + 5]
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def unstuffed_size(data: bytes) -> int:
    return len(data) - data.count(b"\r\n..") - (1 if data.startswith(b"..") else 0)


def session(port: int, user: str, password: str, manifest: dict, server_pids,
            time_limit: float) -> dict:
    out: dict = {}
    cpu0 = tree_cpu_seconds(server_pids())
    t0 = time.perf_counter()
    conn = POP3Conn(port)
    try:
        conn.simple(f"USER {user}")
        conn.simple(f"PASS {password}")
        out["login_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        stat = conn.simple("STAT").split()
        out["stat_s"] = time.perf_counter() - t
        count = int(stat[1])
        t = time.perf_counter()
        uidl = conn.multi("UIDL")
        out["uidl_s"] = time.perf_counter() - t
        uidl_lines = uidl.count(b"\r\n")
        sizes = []
        t = time.perf_counter()
        end = time.monotonic() + time_limit
        for n in range(1, count + 1):
            sizes.append(unstuffed_size(conn.multi(f"RETR {n}")))
            if time.monotonic() > end:
                break
        took = time.perf_counter() - t
        out["retr_msgs_per_s"] = len(sizes) / took if took else None
        out["retr_complete"] = len(sizes) == count
        # stopped at the time limit: the time for all of them at the rate measured
        out["retr_all_s"] = took if out["retr_complete"] or not sizes else took * count / len(sizes)
        out["retr_bytes"] = sum(sizes)
        conn.simple("QUIT")
    finally:
        conn.close()
    out["session_s"] = time.perf_counter() - t0
    time.sleep(0.3)
    cpu = tree_cpu_seconds(server_pids()) - cpu0
    out["server_cpu_s"] = cpu
    out["cpu_ms_per_retr"] = cpu / len(sizes) * 1000 if sizes else None
    want = Counter(manifest["sizes"])
    got = Counter(sizes)
    sizes_match = got == want if out["retr_complete"] else not (got - want)
    out["checks"] = {"stat_count": count, "uidl_lines": uidl_lines, "retrieved": len(sizes),
                     "sizes_match": sizes_match,
                     "ok": count == manifest["count"] and uidl_lines == count and sizes_match}
    return out
