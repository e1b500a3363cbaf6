#!/usr/bin/env python3
"""Two server nodes on this machine against one: SMTP ingestion, the IMAP mixed loop, the
CPU each node spends, and the cross-node IDLE latency.

    python bench/two_nodes.py --quick        # small counts, under 2 minutes
    python bench/two_nodes.py                # 2,000 messages, a 10,000-message folder, 3 runs
    python bench/two_nodes.py --runs 5 --keep

One node is the server as it runs by default: SQLite accounts, a local Maildir root.  Two
nodes are two `twistd mailserver` processes from the working tree with `[storage] shared =
true` on one Maildir root on this machine's disk, each with a `state_dir` of its own
(node-local indexes, queue), and `[accounts] url` pointing at one PostgreSQL cluster the
bench creates (initdb and pg_ctl in a temporary directory, tests/pg_helper.py; Debian's
`postgresql` package, psycopg).  All listen on free ports of 127.0.0.1.

- SMTP: 20 concurrent connections, one 4 KB message per connection (the load generator of
  bench/smtp_bench.py, two instances of 10 connections), both to the one node's MX, or
  one to each node's MX (10 + 10).  Messages/s, end of DATA to 250 (p50, p99), CPU per
  message of each node (its whole process tree, over the messages it accepted) and of
  PostgreSQL, and a check of the Maildir: every accepted message there exactly once.
- IMAP: the mixed loop of bench/imap_bench.py (20 clients on one INBOX of the bench's
  corpus, 10,000 messages) with every client on the one node, or clients alternating
  between the two nodes; ops/s, the median of each operation, CPU per operation per node.
- Cross-node IDLE: bench/crossnode_idle.py --shared (its own two nodes and PostgreSQL),
  run after the rest has stopped: from the 250 on node A to the EXISTS read by a client
  IDLE-ing on node B (and, for reference, on A itself); median and p99.

Each figure is the median (min-max) of --runs runs; the runs alternate which deployment
goes first.  Tables go to stdout, the raw results to bench/results/two-nodes-TIME.json.

What this shows on a 2-core machine: both nodes, PostgreSQL and the load generator share
the same two cores, so a second node adds no CPU; the load that one node spreads over two
cores (its reactor, its threads and commit process) two nodes spread over the same two.
The difference between the columns is therefore the cost of running as two nodes: dot-locks
on the uid list, the shared change log, NOTIFY to PostgreSQL and each node refreshing
folders the other changed, node-local indexes kept twice.  It is not a scaling figure: a
second node adds throughput only when it brings cores (and disks) of its own, which needs
two machines and a shared file system, whose latency (NFS) this bench does not have either.
On a machine busy with other work, two processes also get a larger share of the scheduler
than one, so two nodes can show more msgs/s or ops/s while each message costs more CPU:
compare the CPU per message and operation, not the throughput.  The bench prints how many
cores other processes used during each part.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

import corpus  # noqa: E402
import imap_bench  # noqa: E402
import servers as S  # noqa: E402
import smtp_bench  # noqa: E402
from common import (Unavailable, log, own_cpu_seconds, percentile, summary,  # noqa: E402
                    system_busy_seconds, tree_cpu_seconds)
from imap_client import IMAPConn, exists_of  # noqa: E402
from report import cell, fmt  # noqa: E402
from run import DELETED_MARK, DELETIONS_SETTLE_S, default_workdir  # noqa: E402

SIZE = 4096
CONCURRENCY = 20
LOADS = 2                 # load generators (threads) of CONCURRENCY // LOADS connections each
SMTP_USER = "bench"       # receives the SMTP load
IMAP_USER = "reader"      # holds the corpus the IMAP clients read
PLANS = {
    "quick": {"runs": 3, "smtp_count": 200, "smtp_warmup": 40, "smtp_time_limit": 60,
              "imap_corpus": 1000, "imap_clients": 20, "imap_mixed_s": 3.0,
              "imap_max_ops": 20000, "idle_count": 30, "idle_gap": 0.05, "idle_runs": 1},
    "full": {"runs": 3, "smtp_count": 2000, "smtp_warmup": 200, "smtp_time_limit": 300,
             "imap_corpus": 10000, "imap_clients": 20, "imap_mixed_s": 20.0,
             "imap_max_ops": 200000, "idle_count": 200, "idle_gap": 0.1, "idle_runs": 0},
}
OPS = [name for name, _ in imap_bench.MIX]


class Node(S.MailServer):
    """One of several nodes: the shared Maildir root and the PostgreSQL accounts written
    into its configuration before the users are imported (the second node's import finds
    them there and skips them)."""

    def __init__(self, workdir: Path, name: str, shared_root: Path, accounts_url: str) -> None:
        self.key = name
        self.label = name
        self.shared_root = shared_root
        self.accounts_url = accounts_url
        super().__init__(workdir)

    def write_config(self) -> None:
        self.sections["storage"] = {"maildir_root": str(self.shared_root), "shared": True}
        self.sections["accounts"] = {"url": self.accounts_url}
        super().write_config()

    def maildir(self, user: str) -> Path:
        return self.shared_root / S.DOMAIN / user


class Deployment:
    """The servers of one side of the comparison, and what their CPU is read from."""

    def __init__(self, key: str, label: str, nodes: list[S.MailServer],
                 pg_pids: Callable[[], list[int]] = lambda: []) -> None:
        self.key, self.label, self.nodes, self.pg_pids = key, label, nodes, pg_pids
        self.aside = Path(nodes[0].dir).parent / f"{key}-delivered"

    def maildir(self, user: str) -> Path:
        return self.nodes[0].maildir(user)

    def all_pids(self) -> list[int]:
        return [p for n in self.nodes for p in n.pids()] + self.pg_pids()

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each node's process tree and of PostgreSQL's."""
        out = {n.key: tree_cpu_seconds(n.pids()) for n in self.nodes}
        if self.pg_pids():
            out["postgresql"] = tree_cpu_seconds(self.pg_pids())
        return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


# -- SMTP -----------------------------------------------------------------------------------

def smtp_run(dep: Deployment, everything: Callable[[], list[int]], count: int, run_id: str,
             time_limit: float, prefix: bytes) -> dict:
    """`count` messages over CONCURRENCY connections, one message per connection; load
    generator k sends to node k % len(nodes).  `everything`: every server process of the
    bench (both sides), so that "other" CPU is other people's."""
    maildir = dep.maildir(SMTP_USER)
    rcpt = f"{SMTP_USER}@{S.DOMAIN}"
    smtp_bench.set_aside(maildir, dep.aside)
    os.sync()
    smtp_bench.wait_cpu_quiet(dep.all_pids(), 2.0)
    loads: list[tuple[S.MailServer, smtp_bench.Load]] = []
    offset = 0
    for k in range(LOADS):
        node = dep.nodes[k % len(dep.nodes)]
        n = count // LOADS + (1 if k < count % LOADS else 0)
        load = smtp_bench.Load(node.port("smtp"), rcpt, offset + n, SIZE, CONCURRENCY // LOADS,
                               "per-connection", run_id, time_limit, prefix)
        load.next = offset   # message numbers offset..offset+n-1: one numbering for all
        offset += n
        loads.append((node, load))

    def drive(load: smtp_bench.Load) -> None:
        try:
            load.run()
        except TimeoutError:
            load.errors.append("run did not finish in time")

    cpu0, all0 = dep.cpu(), tree_cpu_seconds(everything())
    client0, busy0 = own_cpu_seconds(), system_busy_seconds()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(load,), daemon=True) for _, load in loads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    busy = system_busy_seconds() - busy0
    client = own_cpu_seconds() - client0
    during = tree_cpu_seconds(everything()) - all0
    accepted = [i for _, load in loads for i in load.accepted]
    waited = smtp_bench.wait_delivered(maildir, len(accepted), 60.0)
    smtp_bench.wait_cpu_quiet(dep.all_pids())
    cpu = _delta(dep.cpu(), cpu0)
    check = smtp_bench.check_maildir(maildir, run_id, accepted, count)
    smtp_bench.set_aside(maildir, dep.aside)
    latencies = [x for _, load in loads for x in load.latencies]
    errors = [e for _, load in loads for e in load.errors]
    by_node = {n.key: sum(len(load.accepted) for node, load in loads if node is n)
               for n in dep.nodes}
    n = len(accepted)
    out = {
        "accepted": n, "errors": len(errors), "error_examples": errors[:3],
        "elapsed_s": elapsed, "msgs_per_s": n / elapsed if n else None,
        "latency_p50_ms": (percentile(latencies, 50) or 0) * 1000 if n else None,
        "latency_p99_ms": (percentile(latencies, 99) or 0) * 1000 if n else None,
        "accepted_by_node": by_node, "cpu_s": cpu,
        "cpu_ms_per_msg": {k: (v / (by_node.get(k) or n) * 1000 if n else None)
                           for k, v in cpu.items()},
        "cpu_ms_per_msg_all": sum(cpu.values()) / n * 1000 if n else None,
        "client_cpu_s": client, "delivery_wait_s": waited,
        "other_cores": max(0.0, busy - client - during) / elapsed if elapsed else None,
        "maildir_check": check,
    }
    return out


# -- IMAP -----------------------------------------------------------------------------------

def imap_warm(dep: Deployment, expected: int) -> None:
    """Open the folder once on every node (each builds its node-local index), unmeasured."""
    for node in dep.nodes:
        conn = IMAPConn(node.port("imap"))
        try:
            conn.login(f"{IMAP_USER}@{S.DOMAIN}", S.PASSWORD)
            exists = exists_of(conn.ok("SELECT INBOX", keep=(b"* ",)))
            if exists != expected:
                raise Unavailable(f"{node.key}: SELECT INBOX gave {exists} messages, "
                                  f"not {expected}")
            conn.ok("UID FETCH 1:* (UID FLAGS)")
            conn.logout()
        finally:
            conn.close()


def imap_run(dep: Deployment, everything: Callable[[], list[int]], plan: dict,
             seed: int) -> dict:
    ports = [n.port("imap") for n in dep.nodes]
    smtp_bench.wait_cpu_quiet(dep.all_pids(), 2.0)
    cpu0, all0 = dep.cpu(), tree_cpu_seconds(everything())
    client0, busy0, t0 = own_cpu_seconds(), system_busy_seconds(), time.perf_counter()
    r = imap_bench.mixed_loop(ports, f"{IMAP_USER}@{S.DOMAIN}", S.PASSWORD,
                              plan["imap_clients"], plan["imap_mixed_s"], plan["imap_max_ops"],
                              seed, dep.all_pids)
    wall = time.perf_counter() - t0
    busy, client = system_busy_seconds() - busy0, own_cpu_seconds() - client0
    during = tree_cpu_seconds(everything()) - all0
    cpu = _delta(dep.cpu(), cpu0)
    ops_by_node = {n.key: r["ops_by_port"].get(n.port("imap"), 0) for n in dep.nodes}
    total = r["ops"]
    r["cpu_s"] = cpu
    r["ops_by_node"] = ops_by_node
    r["cpu_ms_per_op"] = {k: (v / (ops_by_node.get(k) or total) * 1000 if total else None)
                          for k, v in cpu.items()}
    r["cpu_ms_per_op_all"] = sum(cpu.values()) / total * 1000 if total else None
    r["other_cores"] = max(0.0, busy - client - during) / wall if wall else None
    return r


# -- cross-node IDLE ------------------------------------------------------------------------

_IDLE_LINE = re.compile(r"^\s+(cross-node|same node)\b.*?median\s+([\d.]+)\s+p90\s+([\d.]+)"
                        r"\s+p99\s+([\d.]+)\s+max\s+([\d.]+)\s+\(n=(\d+)\)", re.MULTILINE)


def crossnode_run(count: int, gap: float) -> dict:
    """One run of bench/crossnode_idle.py --shared; its printed figures."""
    cmd = [sys.executable, str(BENCH_DIR / "crossnode_idle.py"), "--shared",
           "--count", str(count), "--gap", str(gap)]
    busy0, t0 = system_busy_seconds(), time.monotonic()
    cp = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        timeout=120 + count * (gap + 10))
    out: dict = {"returncode": cp.returncode, "wall_s": time.monotonic() - t0,
                 "machine_busy_cores": (system_busy_seconds() - busy0)
                 / max(1e-9, time.monotonic() - t0)}
    for m in _IDLE_LINE.finditer(cp.stdout):
        out["cross" if m.group(1) == "cross-node" else "same"] = {
            "median_ms": float(m.group(2)), "p90_ms": float(m.group(3)),
            "p99_ms": float(m.group(4)), "max_ms": float(m.group(5)), "n": int(m.group(6))}
    if cp.returncode != 0 or "cross" not in out:
        out["output"] = (cp.stdout + cp.stderr)[-2000:]
    return out


# -- the bench ------------------------------------------------------------------------------

class TwoNodeBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = dict(PLANS["quick" if args.quick else "full"])
        if args.runs:
            self.plan["runs"] = args.runs
        if not self.plan["idle_runs"]:
            self.plan["idle_runs"] = self.plan["runs"]
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix="two-nodes-", dir=self.workdir))
        os.chmod(self.rundir, 0o755)
        self.results: dict = {"meta": {}, "smtp": {}, "imap": {}, "idle": []}
        self.cluster = None
        self.deployments: list[Deployment] = []

    # -- setting up

    def _wait_after_deletions(self) -> None:
        """As bench/run.py: on ext4, files freed in the last minutes slow file creation."""
        mark = self.workdir / DELETED_MARK
        if self.args.no_wait or not mark.exists():
            return
        left = DELETIONS_SETTLE_S - (time.time() - mark.stat().st_mtime)
        if left > 0:
            log(f"waiting {left:.0f} s: a bench deleted its messages less than "
                f"{DELETIONS_SETTLE_S} s ago (--no-wait to skip)")
            time.sleep(left)

    def _postgresql(self) -> str:
        from tests.pg_helper import PgCluster, find_bindir

        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is not installed (pip install -e '.[test]')") from None
        bindir = find_bindir()
        if bindir is None:
            raise Unavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.cluster = PgCluster(bindir)
        return self.cluster.create_database("twonodes")

    def _pg_pids(self) -> list[int]:
        try:
            pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError, AttributeError):
            return []
        return [pid]

    def setup(self, corpus_dir: Path, manifest: dict) -> None:
        users = [SMTP_USER, IMAP_USER]
        one = S.MailServer(self.rundir / "one-node")
        one.check()
        self.results["meta"]["version"] = one.version()
        one.setup(users)
        url = self._postgresql()
        shared = self.rundir / "shared-maildirs"
        nodes = [Node(self.rundir, f"node-{x}", shared, url) for x in "ab"]
        for node in nodes:
            node.check()
            node.setup(users)
        self.deployments = [Deployment("one", "one node", [one]),
                            Deployment("two", "two nodes", nodes, self._pg_pids)]
        for dep in self.deployments:
            corpus.link_into(corpus_dir, manifest, dep.maildir(IMAP_USER))
            for srv in dep.nodes:
                srv.start()
                if not {"smtp", "imap"} <= srv.available_services:
                    raise Unavailable(f"{srv.key}: SMTP or IMAP does not answer\n"
                                      f"{srv.log_tail()}")
            imap_warm(dep, manifest["count"])

    def everything(self) -> list[int]:
        return [p for dep in self.deployments for p in dep.all_pids()]

    def stop(self) -> None:
        for dep in self.deployments:
            for srv in dep.nodes:
                srv.stop()
        if self.cluster is not None:
            self.cluster.destroy()
            self.cluster = None

    # -- running

    def run(self) -> dict:
        p = self.plan
        busy0, wall0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        other = (system_busy_seconds() - busy0) / (time.monotonic() - wall0)
        self.results["meta"].update({
            "plan": "quick" if self.args.quick else "full", "plan_parameters": p,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(),
            "cores_busy_before_start": round(other, 2), "workdir": str(self.rundir),
        })
        if other > 0.3:
            log(f"warning: the machine is already busy ({other:.1f} cores in use by other "
                f"processes): figures will be noisier")
        self._wait_after_deletions()
        t0 = time.monotonic()
        corpus_dir, manifest = corpus.cached(self.workdir, p["imap_corpus"], log=log)
        S.password_scheme(self.args.passwords)
        why_not = smtp_bench.can_sign()
        prefix = smtp_bench.dkim_signature(f"{SMTP_USER}@{S.DOMAIN}", SIZE) if not why_not else b""
        try:
            log("starting one node, then PostgreSQL and two nodes")
            self.setup(corpus_dir, manifest)
            log(f"servers up in {time.monotonic() - t0:.0f} s")
            self._smtp(prefix)
            self._imap()
        finally:
            self.stop()
        self._idle()
        self.results["meta"]["elapsed_s"] = time.monotonic() - wall0
        if not self.args.keep:
            shutil.rmtree(self.rundir, ignore_errors=True)
            (self.workdir / DELETED_MARK).touch()
        return self.results

    def _order(self, run: int) -> list[Deployment]:
        return self.deployments if run % 2 == 0 else self.deployments[::-1]

    def _smtp(self, prefix: bytes) -> None:
        p = self.plan
        for dep in self.deployments:   # unmeasured: starts what starts on demand
            r = smtp_run(dep, self.everything, p["smtp_warmup"], f"{dep.key}-warmup",
                         p["smtp_time_limit"], prefix)
            if r["errors"]:
                log(f"smtp warm-up {dep.key}: errors, e.g. {r['error_examples']}")
        for run in range(p["runs"]):
            for dep in self._order(run):
                r = smtp_run(dep, self.everything, p["smtp_count"], f"{dep.key}-{run}",
                             p["smtp_time_limit"], prefix)
                self.results["smtp"].setdefault(dep.key, []).append(r)
                per = ", ".join(f"{k} {fmt(v)}" for k, v in r["cpu_ms_per_msg"].items())
                log(f"smtp run {run + 1}: {dep.label:9} {fmt(r['msgs_per_s'])} msgs/s, p50 "
                    f"{fmt(r['latency_p50_ms'])} ms, p99 {fmt(r['latency_p99_ms'])} ms, CPU "
                    f"ms/msg {per}, check {'ok' if r['maildir_check']['ok'] else 'FAILED'}"
                    f"{', errors ' + str(r['errors']) if r['errors'] else ''}")
                if r["errors"]:
                    log(f"  errors, e.g.: {r['error_examples']}")

    def _imap(self) -> None:
        p = self.plan
        for run in range(p["runs"]):
            for dep in self._order(run):
                r = imap_run(dep, self.everything, p, seed=run)
                self.results["imap"].setdefault(dep.key, []).append(r)
                log(f"imap run {run + 1}: {dep.label:9} {fmt(r['ops_per_s'])} ops/s "
                    f"({', '.join(f'{k} {v}' for k, v in r['ops_by_node'].items())}), "
                    f"errors {r['errors']}")
                if r["errors"]:
                    log(f"  errors, e.g.: {r['error_examples']}")

    def _idle(self) -> None:
        p = self.plan
        for run in range(p["idle_runs"]):
            r = crossnode_run(p["idle_count"], p["idle_gap"])
            self.results["idle"].append(r)
            if "cross" in r:
                log(f"cross-node IDLE run {run + 1}: median {fmt(r['cross']['median_ms'])} ms, "
                    f"p99 {fmt(r['cross']['p99_ms'])} ms")
            else:
                log(f"cross-node IDLE run {run + 1}: failed (exit {r['returncode']}):\n"
                    f"{r.get('output', '')}")


# -- the report -----------------------------------------------------------------------------

def _s(runs: list[dict], get: Callable[[dict], float | None]) -> dict | None:
    return summary(get(r) for r in runs)


def _table(title: str, rows: list[tuple[str, str, str, str]], legend: str = "") -> str:
    lines = [f"### {title}", "", "| | one node | two nodes | two / one |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    if legend:
        lines += ["", legend]
    return "\n".join(lines)


def _row(label: str, one: dict | None, two: dict | None, show_ratio: bool = True) -> tuple:
    ratio = (f"{two['median'] / one['median']:.2f}x"
             if show_ratio and one and two and one["median"] else "")
    return (label, cell(one), cell(two), ratio)


def render(results: dict) -> str:
    meta, p = results["meta"], results["meta"]["plan_parameters"]
    out = [f"Two nodes against one: {meta['cores']} cores, this server {meta.get('version', '')}, "
           f"plan {meta['plan']}, median (min-max) of {p['runs']} runs.",
           f"Other processes used {meta['cores_busy_before_start']} cores before the start."]
    one, two = results["smtp"].get("one", []), results["smtp"].get("two", [])
    if one or two:
        def row(label: str, get: Callable[[dict], float | None], ratio: bool = True) -> tuple:
            return _row(label, _s(one, get), _s(two, get), ratio)

        def cpu(label: str, node_one: str | None, node_two: str) -> tuple:
            return _row(label, _s(one, lambda r: r["cpu_ms_per_msg"].get(node_one)),
                        _s(two, lambda r: r["cpu_ms_per_msg"].get(node_two)), bool(node_one))

        def per_node(runs: list[dict]) -> str:
            if not runs:
                return "-"
            return " / ".join(str(v) for v in runs[-1]["accepted_by_node"].values())

        def checked(runs: list[dict]) -> str:
            errors = sum(r["errors"] for r in runs)
            return (f"{sum(r['maildir_check']['ok'] for r in runs)}/{len(runs)} runs ok"
                    + (f", {errors} errors" if errors else ""))

        rows = [row("msgs/s", lambda r: r["msgs_per_s"]),
                row("end of DATA to 250, p50 ms", lambda r: r["latency_p50_ms"]),
                row("end of DATA to 250, p99 ms", lambda r: r["latency_p99_ms"]),
                cpu("CPU ms/msg, node A (its messages)", "mailserver", "node-a"),
                cpu("CPU ms/msg, node B (its messages)", None, "node-b"),
                cpu("CPU ms/msg, PostgreSQL", None, "postgresql"),
                row("CPU ms/msg, all server processes", lambda r: r["cpu_ms_per_msg_all"]),
                ("messages accepted per node (last run)", per_node(one), per_node(two), ""),
                ("Maildir: each accepted message once", checked(one), checked(two), ""),
                row("other processes, cores", lambda r: r["other_cores"], False)]
        out += ["", _table(f"SMTP: {p['smtp_count']:,} messages of 4 KB, {CONCURRENCY} "
                           f"concurrent connections, one message per connection", rows,
                           "Two nodes: 10 connections to each node's MX. CPU: each node's "
                           "process tree over the messages it accepted; PostgreSQL's and the "
                           "total over all messages.")]
    one, two = results["imap"].get("one", []), results["imap"].get("two", [])
    if one or two:
        def row(label: str, get: Callable[[dict], float | None], ratio: bool = True) -> tuple:
            return _row(label, _s(one, get), _s(two, get), ratio)

        def cpu(label: str, node_one: str | None, node_two: str) -> tuple:
            return _row(label, _s(one, lambda r: r["cpu_ms_per_op"].get(node_one)),
                        _s(two, lambda r: r["cpu_ms_per_op"].get(node_two)), bool(node_one))

        rows = [row("ops/s", lambda r: r["ops_per_s"])]
        rows += [row(f"{op} median ms", lambda r, op=op: r[f"{op}_median_ms"]) for op in OPS]
        rows += [cpu("CPU ms/op, node A (its clients)", "mailserver", "node-a"),
                 cpu("CPU ms/op, node B (its clients)", None, "node-b"),
                 cpu("CPU ms/op, PostgreSQL", None, "postgresql"),
                 row("CPU ms/op, all server processes", lambda r: r["cpu_ms_per_op_all"]),
                 ("errors", *(str(sum(r["errors"] for r in runs)) for runs in (one, two)), ""),
                 row("other processes, cores", lambda r: r["other_cores"], False)]
        out += ["", _table(f"IMAP mixed loop: {p['imap_clients']} clients, one INBOX of "
                           f"{p['imap_corpus']:,} messages, {p['imap_mixed_s']:g} s", rows,
                           "Two nodes: clients alternate between the nodes (10 + 10). Mix: "
                           + ", ".join(f"{n} {w}%" for n, w in imap_bench.MIX) + ".")]
    idle = results["idle"]
    if idle:
        ok = [r for r in idle if "cross" in r]
        lines = [f"### Cross-node IDLE (bench/crossnode_idle.py --shared, {p['idle_count']} "
                 f"deliveries {p['idle_gap']:g} s apart, {len(ok)}/{len(idle)} runs)", "",
                 "| ms from 250 on node A to EXISTS | median | p99 |", "|---|---|---|"]
        for key, label in (("cross", "IDLE on node B"), ("same", "IDLE on node A (reference)")):
            runs = [r for r in ok if key in r]
            lines.append(f"| {label} | {cell(_s(runs, lambda r: r[key]['median_ms']))} | "
                         f"{cell(_s(runs, lambda r: r[key]['p99_ms']))} |")
        busy = _s(idle, lambda r: r.get("machine_busy_cores"))
        lines += ["", f"Machine busy during these runs (these nodes and PostgreSQL included): "
                      f"{cell(busy)} cores."]
        for r in idle:
            if "cross" not in r:
                lines.append(f"A run failed (exit {r['returncode']}): "
                             f"{r.get('output', '').strip().splitlines()[-1:]}")
        out += ["", "\n".join(lines)]
    out += ["", f"On {meta['cores']} cores the two nodes, PostgreSQL and the load generator "
                "share the same CPUs: the two-node column adds no capacity, so its difference "
                "from one node is the cost of coordination (dot-locks, the change log, NOTIFY, "
                "a second node-local index), not scaling. With other work on the machine, "
                "two processes also get a larger share of the scheduler than one: compare "
                "CPU per message and per operation rather than throughput."]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="small counts, under 2 minutes")
    ap.add_argument("--runs", type=int, default=0, help="runs per figure (default 3)")
    ap.add_argument("--workdir", default=str(default_workdir()),
                    help="work directory: corpus cache and the servers' directories "
                         "(default: $MAILSERVER_BENCH_WORKDIR or %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the servers' directories")
    ap.add_argument("--no-wait", action="store_true",
                    help="start at once even if a bench deleted its messages less than 6 "
                         "minutes ago")
    ap.add_argument("--passwords", choices=("argon2id", "plain"), default="argon2id",
                    help="users' password hash (as bench/run.py)")
    ap.add_argument("--json", default="", help="raw results file "
                                               "(default: bench/results/two-nodes-TIME.json)")
    ap.add_argument("--report", metavar="JSON", default="",
                    help="only print the tables of an earlier run's raw results file")
    args = ap.parse_args()
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    out = Path(args.json) if args.json else (
        BENCH_DIR / "results" / f"two-nodes-{time.strftime('%Y%m%d-%H%M%S')}"
                                f"{'-quick' if args.quick else ''}.json")
    bench = TwoNodeBench(args)
    try:
        results = bench.run()
    except Unavailable as e:
        print(f"not runnable: {e}")
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    results["meta"]["json"] = str(out)
    out.write_text(json.dumps(results, indent=1, default=str))
    print()
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
