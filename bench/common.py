"""Shared helpers of the benchmark: ports, process-tree CPU and memory from /proc, statistics.

Everything here is stdlib only and Linux-specific (/proc).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
LOOPBACK = "127.0.0.1"


class Unavailable(Exception):
    """A server or one of its services cannot be measured here; the message says why."""


# -- ports -----------------------------------------------------------------------------------

_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range, not handed out before."""
    low, high = 20000, 32000
    # Stay below the kernel's range for outgoing ports when it can be read.
    with contextlib.suppress(OSError, ValueError, IndexError):
        eph_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if eph_low > 1100:
            high = min(high, eph_low - 1)
            low = min(low, high - 1000)
    with _ports_lock:
        for _ in range(1000):
            port = random.randint(low, high)
            if port in _ports_handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    continue
            _ports_handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def wait_for_banner(port: int, prefix: bytes, timeout: float,
                    alive: Callable[[], bool] = lambda: True) -> bool:
    """True once a connection to `port` gets a first line starting with `prefix`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        with contextlib.suppress(OSError):  # not listening yet: try again
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(prefix):
                    return True
        time.sleep(0.05)
    return False


def port_answers(port: int, prefix: bytes, timeout: float = 3.0) -> bool:
    return wait_for_banner(port, prefix, timeout)


# -- /proc -----------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = raw[raw.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """utime+stime of every live process under `roots`, plus cutime+cstime (the reaped
    children's time) of each: the CPU the whole tree has used since it started."""
    ticks = 0
    seen: set[int] = set()
    for root in roots:
        for pid in process_tree(root):
            if pid in seen:
                continue
            seen.add(pid)
            fields = _stat_fields(pid)
            if fields is None:
                continue
            # fields[11..14] are utime, stime, cutime, cstime (stat fields 14..17)
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def tree_memory_kb(roots: Iterable[int]) -> dict[str, int]:
    """Summed Rss and Pss (kB) of every process under `roots`, and the process count."""
    rss = pss = count = 0
    seen: set[int] = set()
    for root in roots:
        for pid in process_tree(root):
            if pid in seen:
                continue
            seen.add(pid)
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            count += 1
            for line in text.splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return {"rss_kb": rss, "pss_kb": pss, "processes": count}


def system_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- statistics ------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Iterable[float | None]) -> dict | None:
    """Median, min and max of the runs' values (None values are skipped)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return time.monotonic() >= self.end


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
