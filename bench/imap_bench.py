"""IMAP load: one client through the usual operations of a large folder, and C clients in a
mixed loop.

Single client (one "phase"): LOGIN, SELECT INBOX, UID FETCH 1:* (UID FLAGS),
FETCH 1:* (ENVELOPE), FETCH 1:* (BODY.PEEK[HEADER.FIELDS (...)]), UID SEARCH SUBJECT <word>,
UID SEARCH UNSEEN, then 100 full bodies (UID FETCH n BODY.PEEK[]) of randomly chosen
messages (the same choice for every server).  Each answer is checked against the corpus
manifest (message count, search hits, body sizes).

Mixed loop: C connections on the same INBOX, each repeating a weighted mix of
  headers  UID FETCH <50 consecutive uids> (UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)
  body     UID FETCH <uid> BODY.PEEK[]
  store    UID STORE <uid> +FLAGS (\\Seen) or -FLAGS (\\Seen)
  search   UID SEARCH UNSEEN
  noop     NOOP
for a fixed time (and at most a fixed number of operations); ops/s and the median latency of
each operation type.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Sequence

from common import Deadline, percentile, tree_cpu_seconds
from imap_client import IMAPConn, IMAPError, exists_of, search_numbers

HEADER_FIELDS = "DATE FROM TO CC SUBJECT MESSAGE-ID"
MIX = (("headers", 30), ("body", 25), ("store", 20), ("search", 10), ("noop", 15))
BODY_SAMPLE = 100


def single_client(port: int, user: str, password: str, manifest: dict, seed: int,
                  server_pids, bodies: int = BODY_SAMPLE) -> dict:
    """One client through the list of operations; seconds per operation and checks."""
    out: dict = {}
    checks: dict = {}
    cpu0 = tree_cpu_seconds(server_pids())
    t_start = time.perf_counter()
    conn = IMAPConn(port)
    try:
        out["login_s"] = conn.login(user, password).elapsed
        r = conn.ok("SELECT INBOX", keep=(b"* ",))
        out["select_s"] = r.elapsed
        exists = exists_of(r)
        checks["exists"] = exists
        checks["exists_ok"] = exists == manifest["count"]

        r = conn.ok("UID FETCH 1:* (UID FLAGS)")
        out["uid_fetch_flags_s"] = r.elapsed
        checks["flags_fetches"] = r.fetches

        r = conn.ok("FETCH 1:* (ENVELOPE)")
        out["fetch_envelope_s"] = r.elapsed
        checks["envelope_fetches"] = r.fetches
        out["envelope_bytes"] = r.nbytes

        r = conn.ok(f"FETCH 1:* (BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})])")
        out["fetch_header_fields_s"] = r.elapsed
        checks["header_fetches"] = r.fetches

        r = conn.ok(f"UID SEARCH SUBJECT {manifest['search_word']}", keep=(b"* SEARCH",))
        out["search_subject_s"] = r.elapsed
        checks["search_subject_hits"] = len(search_numbers(r))
        checks["search_subject_expected"] = len(manifest["marked"])

        r = conn.ok("UID SEARCH UNSEEN", keep=(b"* SEARCH",))
        out["search_unseen_s"] = r.elapsed
        checks["search_unseen_hits"] = len(search_numbers(r))
        checks["search_unseen_expected"] = manifest["unseen"]

        uids = sorted(search_numbers(conn.ok("UID SEARCH ALL", keep=(b"* SEARCH",))))
        rng = random.Random(seed)
        picks = rng.sample(range(len(uids)), min(bodies, len(uids)))
        times, size_ok = [], 0
        t0 = time.perf_counter()
        for idx in picks:
            r = conn.ok(f"UID FETCH {uids[idx]} BODY.PEEK[]")
            times.append(r.elapsed)
            if r.literals and r.literals[-1] == manifest["sizes"][idx]:
                size_ok += 1
        out["bodies_total_s"] = time.perf_counter() - t0
        out["body_median_ms"] = (percentile(times, 50) or 0) * 1000
        checks["bodies"] = len(picks)
        checks["bodies_size_ok"] = size_ok
        conn.logout()
        out["phase_wall_s"] = time.perf_counter() - t_start
    finally:
        conn.close()
    time.sleep(0.3)   # a per-connection process (Dovecot) is reaped and counted by its parent
    out["server_cpu_s"] = tree_cpu_seconds(server_pids()) - cpu0
    n = manifest["count"]
    checks["ok"] = bool(checks.get("exists_ok")
                        and checks.get("flags_fetches") == n
                        and checks.get("envelope_fetches") == n
                        and checks.get("header_fetches") == n
                        and checks.get("search_subject_hits") == checks.get("search_subject_expected")
                        and checks.get("search_unseen_hits") == checks.get("search_unseen_expected")
                        and checks.get("bodies_size_ok") == checks.get("bodies"))
    out["checks"] = checks
    return out


def mixed_loop(port: int | Sequence[int], user: str, password: str, clients: int,
               duration: float, max_ops: int, seed: int, server_pids) -> dict:
    """`clients` connections on the same INBOX in a weighted mix of operations.  With
    several ports (nodes sharing one store), client k connects to ports[k % len(ports)]."""
    ports = [port] if isinstance(port, int) else list(port)
    setup = IMAPConn(ports[0])
    setup.login(user, password)
    setup.ok("EXAMINE INBOX")
    uids = sorted(search_numbers(setup.ok("UID SEARCH ALL", keep=(b"* SEARCH",))))
    setup.logout()
    if not uids:
        raise IMAPError("empty INBOX")
    names = [name for name, _ in MIX]
    weights = [w for _, w in MIX]
    lat: dict[str, list[float]] = {name: [] for name in names}
    errors: list[str] = []
    counter = {"ops": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    deadline_box: list[Deadline] = []
    by_port = [0] * len(ports)   # operations done through each port

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        local: dict[str, list[float]] = {name: [] for name in names}
        conn = None
        try:
            conn = IMAPConn(ports[k % len(ports)])
            conn.login(user, password)
            conn.ok("SELECT INBOX")
        except (OSError, IMAPError) as e:
            errors.append(f"client {k} setup: {e!r}")
        barrier.wait()
        if conn is None:
            return
        deadline = deadline_box[0]
        try:
            while not deadline.passed():
                with lock:
                    if counter["ops"] >= max_ops:
                        break
                    counter["ops"] += 1
                op = rng.choices(names, weights)[0]
                if op == "headers":
                    i = rng.randrange(max(1, len(uids) - 50))
                    cmd = (f"UID FETCH {uids[i]}:{uids[min(i + 49, len(uids) - 1)]} "
                           f"(UID FLAGS RFC822.SIZE INTERNALDATE ENVELOPE)")
                elif op == "body":
                    cmd = f"UID FETCH {rng.choice(uids)} BODY.PEEK[]"
                elif op == "store":
                    cmd = f"UID STORE {rng.choice(uids)} {rng.choice('+-')}FLAGS (\\Seen)"
                elif op == "search":
                    cmd = "UID SEARCH UNSEEN"
                else:
                    cmd = "NOOP"
                r = conn.command(cmd)
                if r.status != b"OK":
                    errors.append(f"{cmd}: {r.text[:100]!r}")
                local[op].append(r.elapsed)
            conn.logout()
        except (OSError, IMAPError) as e:
            errors.append(f"client {k}: {e!r}")
        finally:
            conn.close()
            with lock:
                for name in names:
                    lat[name].extend(local[name])
                by_port[k % len(ports)] += sum(len(v) for v in local.values())

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    cpu0 = tree_cpu_seconds(server_pids())
    deadline_box.append(Deadline(duration))
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(duration + 120)
    elapsed = time.perf_counter() - t0
    cpu = tree_cpu_seconds(server_pids()) - cpu0
    total = sum(len(v) for v in lat.values())
    out = {"clients": clients, "elapsed_s": elapsed, "ops": total,
           "ops_per_s": total / elapsed if elapsed else None,
           "server_cpu_ms_per_op": cpu / total * 1000 if total else None,
           "errors": len(errors), "error_examples": errors[:3],
           "ops_by_port": dict(zip(ports, by_port))}
    for name in names:
        out[f"{name}_median_ms"] = (percentile(lat[name], 50) or 0) * 1000 if lat[name] else None
        out[f"{name}_count"] = len(lat[name])
    return out
