"""IMAP memory: the server's RSS and PSS (whole process tree) with K idle authenticated
connections (LOGIN + SELECT INBOX, then nothing) and with the same K connections in IDLE.

Each connection is a different user with a small INBOX, as on a real server.  Connections are
opened in waves of 50 (at most `time_limit` seconds in all); the memory is read 1 second
after the last one is ready.
"""

from __future__ import annotations

import asyncio
import time

from common import LOOPBACK, tree_memory_kb


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.n = reader, writer, 0

    async def tagged(self, cmd: str) -> bytes:
        self.n += 1
        tag = f"m{self.n}".encode()
        self.writer.write(tag + b" " + cmd.encode() + b"\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed by the server")
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1:].startswith(b"OK"):
                    raise ConnectionError(f"{cmd.split()[0]}: {line[:100]!r}")
                return line

    async def idle(self) -> None:
        self.n += 1
        self.idle_tag = f"m{self.n}".encode()
        self.writer.write(self.idle_tag + b" IDLE\r\n")
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("closed by the server")
            if line.startswith(b"+"):
                return
            if line.startswith(self.idle_tag):
                raise ConnectionError(f"IDLE: {line[:100]!r}")


async def _open(port: int, user: str, password: str) -> _Conn:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    greeting = await reader.readline()
    if not greeting.startswith(b"* OK"):
        raise ConnectionError(f"greeting {greeting[:80]!r}")
    conn = _Conn(reader, writer)
    await conn.tagged(f'LOGIN "{user}" "{password}"')
    await conn.tagged("SELECT INBOX")
    return conn


async def _measure(port: int, users: list[str], password: str, server_pids,
                   time_limit: float) -> dict:
    out: dict = {"connections": len(users)}
    # one full cycle first, so that what every server loads once is in the baseline
    warm = await _open(port, users[0], password)
    await warm.tagged("LOGOUT")
    warm.writer.close()
    await asyncio.sleep(0.5)
    out["baseline"] = tree_memory_kb(server_pids())

    conns: list[_Conn] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    deadline = time.monotonic() + time_limit
    for start in range(0, len(users), 50):
        if time.monotonic() > deadline:
            errors.append("time limit reached while connecting")
            break
        results = await asyncio.gather(*(_open(port, u, password) for u in users[start:start + 50]),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                errors.append(repr(r))
            else:
                conns.append(r)
    out["connect_s"] = time.perf_counter() - t0
    out["authenticated_ok"] = len(conns)
    await asyncio.sleep(1.0)
    out["authenticated"] = tree_memory_kb(server_pids())

    results = await asyncio.gather(*(c.idle() for c in conns), return_exceptions=True)
    idle_errors = [repr(r) for r in results if isinstance(r, BaseException)]
    out["idle_ok"] = len(conns) - len(idle_errors)
    await asyncio.sleep(1.0)
    out["idle"] = tree_memory_kb(server_pids())
    errors.extend(idle_errors)

    for c in conns:
        c.writer.close()
    await asyncio.sleep(0.5)
    base = out["baseline"]
    for state in ("authenticated", "idle"):
        k = out[f"{state}_ok"] if state == "idle" else out["authenticated_ok"]
        for what in ("rss_kb", "pss_kb"):
            out[f"{state}_{what[:3]}_mb"] = out[state][what] / 1024
            out[f"{state}_{what[:3]}_kb_per_conn"] = ((out[state][what] - base[what]) / k
                                                      if k else None)
    out["baseline_rss_mb"] = base["rss_kb"] / 1024
    out["baseline_pss_mb"] = base["pss_kb"] / 1024
    out["errors"] = len(errors)
    out["error_examples"] = errors[:3]
    return out


def run_once(port: int, users: list[str], password: str, server_pids, time_limit: float) -> dict:
    return asyncio.run(_measure(port, users, password, server_pids, time_limit))
