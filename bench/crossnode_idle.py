#!/usr/bin/env python3
"""Cross-node IDLE latency: how long after node A answers 250 to a message does an IMAP
session IDLE-ing on node B see its EXISTS (and, beside it, one IDLE-ing on A itself).

    python bench/crossnode_idle.py                 # 200 deliveries
    python bench/crossnode_idle.py --count 500 --gap 0.05
    python bench/crossnode_idle.py --shared        # [storage] shared = true on both nodes

Two `twistd mailserver` nodes from the working tree on this machine, sharing one Maildir
root and one PostgreSQL accounts database (a private cluster: initdb and pg_ctl in a
temporary directory, tests/pg_helper.py; Debian's `postgresql` package).  One SMTP client
on A sends one 4 KB message at a time over a reused connection; the time runs from the
`250` after DATA to the `* n EXISTS` line read by each watcher, whose sockets are read by
one thread each.  Printed: median, p90, p99 and max, in milliseconds, per watcher.  A
figure of this machine (two nodes and PostgreSQL on the same cores), not a test.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from harness import ServerProcess, SMTPClient, dot_stuff, make_message  # noqa: E402
from imap_helpers import ALICE, ConnectionClosed, RawIMAP  # noqa: E402

from tests.pg_helper import PgCluster, find_bindir  # noqa: E402

BODY = (b"x" * 76 + b"\r\n") * 52   # with the header: about 4 KB


class Watcher(threading.Thread):
    """An IDLE session; records when each EXISTS count is first read."""

    def __init__(self, node: ServerProcess, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.conn = RawIMAP.login(node, select="INBOX")
        tag, line = self.conn.idle_start()
        assert line.startswith(b"+"), line
        self.seen: dict[int, float] = {}
        self.cond = threading.Condition()
        self.stopping = False

    def run(self) -> None:
        self.conn.sock.settimeout(0.5)
        while not self.stopping:
            try:
                line = self.conn.read_response()
            except ConnectionClosed:
                return
            except (TimeoutError, OSError):
                continue
            m = re.match(rb"\* (\d+) EXISTS", line)
            if m:
                with self.cond:
                    self.seen.setdefault(int(m.group(1)), time.monotonic())
                    self.cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: max(self.seen, default=0) >= count, timeout)
            return next((t for n, t in sorted(self.seen.items()) if n >= count), None)

    def close(self) -> None:
        self.stopping = True
        self.conn.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="deliveries (200)")
    parser.add_argument("--gap", type=float, default=0.1,
                        help="seconds between one EXISTS and the next message (0.1)")
    parser.add_argument("--shared", action="store_true",
                        help="[storage] shared = true on both nodes")
    args = parser.parse_args()
    if find_bindir() is None:
        print("not runnable: PostgreSQL server binaries not found (apt-get install postgresql)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="crossnode-bench-"))
    cluster = PgCluster(find_bindir())   # type: ignore[arg-type]
    nodes: list[ServerProcess] = []
    watchers: list[Watcher] = []
    missed = 0
    try:
        url = cluster.create_database("bench")
        nodes = [ServerProcess(work / f"node{i}", {
            "storage": {"maildir_root": str(work / "maildirs"),
                        **({"shared": True} if args.shared else {})},
            "accounts": {"url": url},
        }) for i in range(2)]
        nodes[0].create_accounts()
        for node in nodes:
            node.start()
        a, b = nodes
        watchers = [Watcher(b, "cross-node (IDLE on B)"), Watcher(a, "same node (IDLE on A)")]
        for w in watchers:
            w.start()
        time.sleep(1.5)   # past the folders' settling look (folder.DIRTY_WINDOW)
        latencies: dict[str, list[float]] = {w.name: [] for w in watchers}
        smtp = SMTPClient(a.smtp_port)
        smtp.greet()
        for i in range(1, args.count + 1):
            data = dot_stuff(make_message(f"<bench-{i}@remote.test>", to=ALICE,
                                          subject=f"bench {i}", body=BODY))
            reply = smtp.mail_transaction("x@remote.test", [ALICE], data)
            accepted = time.monotonic()
            assert reply.code == 250, reply
            for w in watchers:
                at = w.wait(i)
                if at is None:
                    missed += 1
                else:
                    latencies[w.name].append(max(0.0, at - accepted) * 1000)
            if missed >= 6:
                print(f"!!! stopped after message {i}: EXISTS not seen {missed} times "
                      f"(logs in {work})")
                return 1
            time.sleep(args.gap)
        smtp.quit()
        print(f"{args.count} deliveries of {len(BODY) + 200} bytes to node A, "
              f"{args.gap:g} s apart; ms from 250 to EXISTS:")
        for name, values in latencies.items():
            print(f"  {name:24s} median {statistics.median(values):7.1f}  "
                  f"p90 {percentile(values, 90):7.1f}  p99 {percentile(values, 99):7.1f}  "
                  f"max {max(values):7.1f}  (n={len(values)})")
        if missed:
            print(f"  !!! {missed} EXISTS not seen within 10 s (logs in {work})")
        return 1 if missed else 0
    finally:
        for w in watchers:
            w.close()
        for node in nodes:
            node.close()
        cluster.destroy()
        if not missed:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
