"""SMTP ingestion load: N concurrent clients deliver M messages of size S to one mailbox.

Modes:
  per-connection  every message on a new connection: banner, EHLO, MAIL, RCPT, DATA, QUIT
  pipelined       N connections each deliver their share; MAIL, RCPT and DATA go in one write
                  when the server offers PIPELINING (RFC 2920), one at a time otherwise

Measured: accepted messages/s (first connect to last reply), latency from the end of DATA
(the client's ".") to the 250 (p50, p99), the server's CPU time per message (its whole process
tree, /proc, before the load and after the last message is in the Maildir), and a final
check of the Maildir: every accepted message exactly once, nothing else.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

from common import LOOPBACK, own_cpu_seconds, percentile, system_busy_seconds, tree_cpu_seconds

SENDER = "sender@remote.test"


def make_body(size: int) -> bytes:
    """A CRLF text body of about `size` bytes, already dot-stuffed (lines never start with '.')."""
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return (line * (size // len(line) + 1))[:max(0, size - 2)].rstrip(b"\r\n") + b"\r\n"


def make_header(run_id: str, i: int, rcpt: str) -> bytes:
    return (f"Message-ID: <bench-{run_id}-{i}@client.remote.test>\r\n"
            f"From: Bench <{SENDER}>\r\nTo: <{rcpt}>\r\n"
            f"Subject: bench message {i}\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()


class SMTPError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), lines


class Load:
    def __init__(self, port: int, rcpt: str, count: int, size: int, concurrency: int,
                 mode: str, run_id: str, time_limit: float) -> None:
        self.port, self.rcpt, self.count, self.size = port, rcpt, count, size
        self.concurrency, self.mode, self.run_id = concurrency, mode, run_id
        self.time_limit = time_limit
        self.body = make_body(size)
        self.next = 0
        self.accepted: list[int] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.pipelined = None

    def _take(self) -> int | None:
        if self.next >= self.count or time.monotonic() > self.deadline:
            return None
        i = self.next
        self.next += 1
        return i

    async def _connect(self):
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port, limit=1 << 20)
        code, _ = await _reply(reader)
        if code != 220:
            raise SMTPError(f"banner {code}")
        writer.write(b"EHLO client.remote.test\r\n")
        code, lines = await _reply(reader)
        if code != 250:
            raise SMTPError(f"EHLO {code}")
        pipelining = any(l[4:].strip().upper() == b"PIPELINING" for l in lines)
        return reader, writer, pipelining

    async def _transaction(self, reader, writer, i: int, pipelining: bool) -> None:
        mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        rcpt = f"RCPT TO:<{self.rcpt}>\r\n".encode()
        if pipelining:
            writer.write(mail + rcpt + b"DATA\r\n")
            codes = [(await _reply(reader))[0] for _ in range(3)]
        else:
            codes = []
            for cmd in (mail, rcpt, b"DATA\r\n"):
                writer.write(cmd)
                code, _ = await _reply(reader)
                codes.append(code)
                if code >= 400:
                    break
        if codes[:3] != [250, 250, 354]:
            if len(codes) == 3 and codes[2] == 354:
                writer.write(b".\r\n")
                await _reply(reader)
            raise SMTPError(f"MAIL/RCPT/DATA replies {codes}")
        writer.write(make_header(self.run_id, i, self.rcpt))
        writer.write(self.body)
        writer.write(b".\r\n")
        await writer.drain()
        t0 = time.perf_counter()
        code, lines = await _reply(reader)
        t1 = time.perf_counter()
        if code != 250:
            raise SMTPError(f"end of DATA {code} {lines[-1][:80]!r}")
        self.latencies.append(t1 - t0)
        self.accepted.append(i)

    async def _quit(self, reader, writer) -> None:
        try:
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(_reply(reader), 10)
        except (OSError, SMTPError, asyncio.TimeoutError):
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass

    async def _worker_per_connection(self) -> None:
        while (i := self._take()) is not None:
            try:
                reader, writer, _ = await self._connect()
                self.pipelined = False
                await self._transaction(reader, writer, i, False)
                await self._quit(reader, writer)
            except (OSError, SMTPError, asyncio.IncompleteReadError) as e:
                self.errors.append(f"{i}: {e!r}")

    async def _worker_pipelined(self) -> None:
        conn = None
        while (i := self._take()) is not None:
            try:
                if conn is None:
                    conn = await self._connect()
                    self.pipelined = conn[2]
                await self._transaction(conn[0], conn[1], i, conn[2])
            except (OSError, SMTPError, asyncio.IncompleteReadError) as e:
                self.errors.append(f"{i}: {e!r}")
                if conn:
                    conn[1].close()
                conn = None
        if conn:
            await self._quit(conn[0], conn[1])

    async def run(self) -> float:
        self.deadline = time.monotonic() + self.time_limit
        worker = (self._worker_pipelined if self.mode == "pipelined"
                  else self._worker_per_connection)
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(self.concurrency))),
                               self.time_limit + 60)
        return time.perf_counter() - t0


_MSGID = re.compile(rb"^Message-ID:\s*<bench-([0-9a-z-]+?)-(\d+)@client\.remote\.test>",
                    re.IGNORECASE | re.MULTILINE)


def maildir_files(maildir: Path) -> list[Path]:
    out = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            out.extend(Path(e.path) for e in os.scandir(d) if e.is_file())
    return out


def check_maildir(maildir: Path, run_id: str, accepted: list[int], count: int) -> dict:
    """Every accepted message exactly once in new/ or cur/, and no other file."""
    seen: dict[int, int] = {}
    foreign = 0
    for path in maildir_files(maildir):
        with open(path, "rb") as f:
            head = f.read(16384)
        m = _MSGID.search(head)
        if not m or m.group(1).decode() != run_id:
            foreign += 1
            continue
        i = int(m.group(2))
        seen[i] = seen.get(i, 0) + 1
    want = set(accepted)
    missing = sorted(want - set(seen))
    twice = sorted(i for i, n in seen.items() if n > 1)
    unexpected = sorted(set(seen) - want)
    ok = not missing and not twice and not unexpected and not foreign and len(want) == count
    return {"ok": ok, "stored": sum(seen.values()) + foreign, "missing": len(missing),
            "duplicates": len(twice), "unexpected": len(unexpected), "foreign": foreign,
            "examples": {"missing": missing[:5], "duplicates": twice[:5]}}


def wait_delivered(maildir: Path, expected: int, timeout: float, stall: float = 15.0) -> float:
    """Wait until `expected` files are in the Maildir (an MTA with a queue delivers after
    its 250), at most `timeout` seconds and `stall` seconds without a new file; returns the
    seconds waited."""
    t0 = last_change = time.monotonic()
    last = -1
    while time.monotonic() - t0 < timeout:
        n = len(maildir_files(maildir))
        if n >= expected:
            break
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > stall:
            break
        time.sleep(0.02)
    return time.monotonic() - t0


def wait_cpu_quiet(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until the server tree stops using CPU (background work after the last 250)."""
    end = time.monotonic() + timeout
    last = tree_cpu_seconds(pids)
    while time.monotonic() < end:
        time.sleep(0.2)
        now = tree_cpu_seconds(pids)
        if now - last < 0.005:
            return
        last = now


def set_aside_dir(server) -> Path:
    """Where a server's delivered messages go between runs (see `set_aside`)."""
    return Path(server.dir) / "delivered"


def set_aside(maildir: Path, aside: Path) -> None:
    """Empty the Maildir by moving its messages into `aside` (same file system).

    Not deleted: on ext4 without a journal, inode allocation skips every inode freed in the
    last 60-300 s, testing them one by one, so thousands of deletions between runs made the
    next runs' deliveries (of every server) pay a third of their CPU time to the file
    system.  They go with the bench's work directory at the very end, so that deleting
    them (and the discards a file system mounted with `discard` then sends) does not
    load the machine during the other areas either.
    """
    aside.mkdir(exist_ok=True)
    start = len(os.listdir(aside))
    for i, path in enumerate(maildir_files(maildir), start):
        os.rename(path, aside / str(i))


def run_once(server, user: str, count: int, size: int, concurrency: int, mode: str,
             run_id: str, time_limit: float) -> dict:
    """One measured run against a started server; the Maildir is emptied afterwards."""
    maildir = server.maildir(user)
    set_aside(maildir, set_aside_dir(server))
    pids = server.pids()
    wait_cpu_quiet(pids, 2.0)
    cpu0, client0, busy0 = tree_cpu_seconds(pids), own_cpu_seconds(), system_busy_seconds()
    load = Load(server.port("smtp"), f"{user}@example.test", count, size, concurrency, mode,
                run_id, time_limit)
    try:
        elapsed = asyncio.run(load.run())
    except asyncio.TimeoutError:
        elapsed = time_limit
        load.errors.append("run did not finish in time")
    client_cpu = own_cpu_seconds() - client0
    busy = system_busy_seconds() - busy0
    server_during = tree_cpu_seconds(pids) - cpu0
    waited = wait_delivered(maildir, len(load.accepted), 60.0)
    wait_cpu_quiet(server.pids())
    cpu = tree_cpu_seconds(pids) - cpu0
    check = check_maildir(maildir, run_id, load.accepted, count)
    set_aside(maildir, set_aside_dir(server))
    n = len(load.accepted)
    return {
        "accepted": n, "errors": len(load.errors), "error_examples": load.errors[:3],
        "elapsed_s": elapsed, "msgs_per_s": n / elapsed if elapsed and n else None,
        "latency_p50_ms": (percentile(load.latencies, 50) or 0) * 1000 if n else None,
        "latency_p99_ms": (percentile(load.latencies, 99) or 0) * 1000 if n else None,
        "server_cpu_s": cpu, "cpu_ms_per_msg": cpu / n * 1000 if n else None,
        "client_cpu_s": client_cpu, "delivery_wait_s": waited,
        # CPU that neither the server nor this client used during the load: other work on
        # the machine, which makes the figures less reliable when it is large
        "other_cpu_s": max(0.0, busy - client_cpu - server_during),
        "pipelined": load.pipelined, "maildir_check": check,
    }
