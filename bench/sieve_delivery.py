#!/usr/bin/env python3
"""Sieve at delivery: the server's CPU time per 4 KB message delivered over SMTP to a user
without a script and to a user with a 50-rule script, in the same server and run.

    python bench/sieve_delivery.py                 # 3 runs of 400 messages per user
    python bench/sieve_delivery.py --runs 5 --count 1000 --mode pipelined
    python bench/sieve_delivery.py --fast-path     # no script: Sieve on against off

The server is this one from the working tree (bench/servers.py's MailServer: private
configuration, loopback ports, fsync before 250).  Users "plain" (no script) and "sieve"
(an active script of 50 rules: header :contains, address :is / :domain, one body
:contains; none matches, so every message ends in INBOX by the implicit keep and the
bench's Maildir check holds) get the same load (bench/smtp_bench.py's client: 20
concurrent connections, one message per connection by default), runs alternating between
them.  CPU is the server's whole process tree from /proc (its commit process included),
until the last message is in the Maildir.  Printed: per user the median and range of CPU
ms per message, msgs/s and p50 latency, and the difference the script makes per message
(target: at most 0.2 ms).  A figure of this machine, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import servers as S  # noqa: E402
import smtp_bench  # noqa: E402
from common import Unavailable, log  # noqa: E402

USERS = ("plain", "sieve")
TARGET_MS = 0.2


def script(rules_wanted: int = 50) -> str:
    """50 rules of the usual kinds, none matching the bench's messages (fewer: the first
    `rules_wanted` of them; 0: an empty script, only the implicit keep)."""
    rules = ['require ["fileinto", "body", "imap4flags"];']
    for i in range(17):
        rules.append(f'if header :contains "subject" "project-{i}" '
                     f'{{ fileinto "Projects.p{i}"; stop; }}')
    for i in range(16):
        rules.append(f'if address :is "from" "person{i}@example.org" '
                     f'{{ fileinto "People.p{i}"; stop; }}')
    for i in range(16):
        rules.append(f'if address :domain :is ["to", "cc"] "list{i}.example.net" '
                     f'{{ addflag "\\\\Seen"; fileinto "Lists.l{i}"; stop; }}')
    rules.append('if body :contains "unsubscribe-now-please" { fileinto "Junk"; stop; }')
    return "\n".join(rules[:1 + rules_wanted]) + "\n"


def install_script(maildir: Path, text: str) -> None:
    """The user's active script in Pigeonhole's layout (as ManageSieve stores it)."""
    (maildir / "sieve").mkdir(parents=True, exist_ok=True)
    (maildir / "sieve" / "bench.sieve").write_text(text)
    link = maildir / ".dovecot.sieve"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("sieve/bench.sieve")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=400, help="messages per run and user")
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--mode", choices=("per-connection", "pipelined"), default="per-connection")
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--rules", type=int, default=50, help="rules of the script (0-50)")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--fast-path", action="store_true",
                    help="instead: a user without a script, [sieve] enabled = false against "
                         "the default (two servers): what the check for a script costs")
    args = ap.parse_args()
    if args.fast_path:
        return fast_path(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sieve-"))
    srv = S.MailServer(workdir)
    results: dict[str, list[dict]] = {u: [] for u in USERS}
    try:
        srv.check()
        srv.setup(list(USERS))
        install_script(srv.maildir("sieve"), script(args.rules))
        srv.start()
        for user in USERS:   # unmeasured: the commit process, caches, the compiled script
            smtp_bench.run_once(srv, user, 50, 4096, args.concurrency, args.mode,
                                f"warmup-{user}", args.time_limit, signed=False)
        for run in range(args.runs):
            for user in (USERS if run % 2 == 0 else USERS[::-1]):
                r = smtp_bench.run_once(srv, user, args.count, 4096, args.concurrency,
                                        args.mode, f"{user}-{run}", args.time_limit,
                                        signed=False)
                results[user].append(r)
                log(f"run {run + 1}: {user:6} {r['msgs_per_s'] or 0:7.1f} msgs/s, CPU "
                    f"{r['cpu_ms_per_msg'] or 0:.3f} ms/msg, p50 {r['latency_p50_ms'] or 0:.1f} "
                    f"ms, check {'ok' if r['maildir_check']['ok'] else 'FAILED'}"
                    f"{', errors ' + str(r['errors']) if r['errors'] else ''}")
                if r["errors"] or not r["maildir_check"]["ok"]:
                    log(f"  {r['error_examples']} {r['maildir_check']}\n{srv.log_tail()}")
    except Unavailable as e:
        log(f"not runnable: {e}")
        return 1
    finally:
        srv.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    cpu = {u: [r["cpu_ms_per_msg"] for r in results[u] if r["cpu_ms_per_msg"]] for u in USERS}
    print(f"\n4 KB messages over SMTP ({args.mode}, {args.concurrency} clients, "
          f"{args.count} per run, {args.runs} runs per user)")
    print(f"{'user':8} {'CPU ms/msg':>11} {'min-max':>15} {'msgs/s':>8} {'p50 ms':>7}")
    for u in USERS:
        rate = median([r["msgs_per_s"] or 0 for r in results[u]])
        p50 = median([r["latency_p50_ms"] or 0 for r in results[u]])
        span = f"{min(cpu[u]):.3f}-{max(cpu[u]):.3f}" if cpu[u] else "-"
        label = "script" if u == "sieve" else "none"
        print(f"{label:8} {median(cpu[u]):11.3f} {span:>15} {rate:8.1f} {p50:7.1f}")
    diff = median(cpu["sieve"]) - median(cpu["plain"])
    print(f"difference: {diff:+.3f} ms of CPU per message with the {args.rules}-rule script "
          f"(target: at most {TARGET_MS} ms)")
    return 0


def fast_path(args: argparse.Namespace) -> int:
    """The same load on two servers, one with Sieve switched off: mail for a mailbox
    without a script streams into the Maildir either way, after one lstat per mailbox."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-sieve-"))
    servers = {}
    results: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for label in ("off", "on"):
            srv = S.MailServer(workdir / label)
            srv.check()
            srv.setup(["plain"])
            if label == "off":
                srv.sections["sieve"] = {"enabled": False}
                srv.write_config()
            srv.start()
            servers[label] = srv
            smtp_bench.run_once(srv, "plain", 50, 4096, args.concurrency, args.mode,
                                f"warmup-{label}", args.time_limit, signed=False)
        for run in range(args.runs):
            for label in (("off", "on") if run % 2 == 0 else ("on", "off")):
                r = smtp_bench.run_once(servers[label], "plain", args.count, 4096,
                                        args.concurrency, args.mode, f"{label}-{run}",
                                        args.time_limit, signed=False)
                results[label].append(r)
                log(f"run {run + 1}: sieve {label:3} {r['msgs_per_s'] or 0:7.1f} msgs/s, CPU "
                    f"{r['cpu_ms_per_msg'] or 0:.3f} ms/msg, check "
                    f"{'ok' if r['maildir_check']['ok'] else 'FAILED'}")
    except Unavailable as e:
        log(f"not runnable: {e}")
        return 1
    finally:
        for srv in servers.values():
            srv.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n4 KB messages over SMTP to a user without a script ({args.mode}, "
          f"{args.concurrency} clients, {args.count} per run, {args.runs} runs per server)")
    print(f"{'[sieve]':14} {'CPU ms/msg':>11} {'msgs/s':>8}")
    for label, name in (("off", "enabled=false"), ("on", "enabled=true")):
        cpu = median([r["cpu_ms_per_msg"] or 0 for r in results[label]])
        rate = median([r["msgs_per_s"] or 0 for r in results[label]])
        print(f"{name:14} {cpu:11.3f} {rate:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
