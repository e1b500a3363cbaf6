"""SORT/THREAD of a large folder, and the reactor under a cold first open: this server and
Dovecot, side by side in the same run, on the same corpus (bench/corpus.py).

    python bench/imap_sort_stall.py [--messages 100000] [--runs 3] [--servers mailserver,dovecot]

Per server:
- warm SORT and THREAD: after one SELECT and one untimed pass of each command (so caches
  and indexes are built), the median of `--runs` timings of UID SORT (ARRIVAL), (DATE),
  (SUBJECT), (FROM), (REVERSE DATE) and UID THREAD REFERENCES, ORDEREDSUBJECT;
- NOOP during SORT: client C sends NOOP in a loop while client A runs those commands
  `--runs` times more: the NOOP round trips (p50, p99, worst) say whether the sorting held
  up the reactor; and the server's memory (RSS of its process tree) after them;
- stall: the server restarted on the same Maildir with its index files removed; client A
  does the first SELECT + UID SEARCH SUBJECT of the folder, client B APPENDs small messages
  to another folder meanwhile, client C sends NOOP in a loop on a third connection: the NOOP
  round trips while A works (p50, p99, worst) say whether anything held up the server.

Prints the figures and the ratio to Dovecot's.  A figure, not a test: machines differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers as S  # noqa: E402
from common import percentile, tree_memory_kb  # noqa: E402
from imap_client import IMAPConn  # noqa: E402

USER = "bench"
SORTS = ("UID SORT (ARRIVAL) UTF-8 ALL", "UID SORT (DATE) UTF-8 ALL",
         "UID SORT (SUBJECT) UTF-8 ALL", "UID SORT (FROM) UTF-8 ALL",
         "UID SORT (REVERSE DATE) UTF-8 ALL", "UID THREAD REFERENCES UTF-8 ALL",
         "UID THREAD ORDEREDSUBJECT UTF-8 ALL")
APPEND_BODY = b"From: <b@remote.test>\r\nSubject: stall\r\n\r\nappended while the first open runs\r\n"


def login(port: int) -> IMAPConn:
    conn = IMAPConn(port)
    conn.login(f"{USER}@{S.DOMAIN}", S.PASSWORD)
    return conn


def warm_sorts(port: int, runs: int) -> dict[str, float]:
    conn = login(port)
    conn.ok("SELECT INBOX")
    out = {}
    for cmd in SORTS:
        conn.ok(cmd)  # untimed: builds what the server keeps for it
        out[cmd] = statistics.median(conn.ok(cmd).elapsed for _ in range(runs))
    conn.ok("LOGOUT")
    return out


def noop_during_sorts(port: int, pids: list[int], runs: int) -> dict[str, float]:
    """NOOP round trips on one connection while another runs every SORT and THREAD `runs`
    times; then the server's RSS with that folder still selected."""
    noop, sorter = login(port), login(port)
    sorter.ok("SELECT INBOX")
    done = threading.Event()
    rtts: list[float] = []

    def noop_loop() -> None:
        while not done.is_set():
            rtts.append(noop.ok("NOOP").elapsed)
            time.sleep(0.005)

    t = threading.Thread(target=noop_loop)
    t.start()
    time.sleep(0.1)
    for _ in range(runs):
        for cmd in SORTS:
            sorter.ok(cmd)
    done.set()
    t.join()
    rss_kb = tree_memory_kb(pids).get("rss_kb", 0)
    for c in (noop, sorter):
        c.ok("LOGOUT")
    return {"rss_kb": rss_kb, "noops": len(rtts), "noop_p50_ms": percentile(rtts, 50) * 1000,
            "noop_p99_ms": percentile(rtts, 99) * 1000, "noop_max_ms": max(rtts) * 1000}


def stall(port: int, word: str) -> dict[str, float]:
    """NOOP round trips on one connection while another opens the cold folder."""
    noop, appender, opener = login(port), login(port), login(port)
    appender.ok("CREATE Stall")
    done = threading.Event()
    rtts: list[float] = []
    appended = [0]

    def append_loop() -> None:
        while not done.is_set():
            lit = b"{%d+}\r\n" % len(APPEND_BODY)
            appender.ok(b"APPEND Stall " + lit + APPEND_BODY)
            appended[0] += 1

    def noop_loop() -> None:
        while not done.is_set():
            rtts.append(noop.ok("NOOP").elapsed)
            time.sleep(0.005)

    threads = [threading.Thread(target=append_loop), threading.Thread(target=noop_loop)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    select = opener.ok("SELECT INBOX").elapsed
    search = opener.ok(f"UID SEARCH SUBJECT {word}").elapsed
    total = time.perf_counter() - t0
    done.set()
    for t in threads:
        t.join()
    for c in (noop, appender, opener):
        c.ok("LOGOUT")
    return {"select_s": select, "search_s": search, "open_s": total, "noops": len(rtts),
            "appends": appended[0], "noop_p50_ms": percentile(rtts, 50) * 1000,
            "noop_p99_ms": percentile(rtts, 99) * 1000, "noop_max_ms": max(rtts) * 1000}


def remove_indexes(srv: S.Server) -> None:
    """What a first open finds: the Maildir and its uid list, no index or cache (ours:
    mailserver.index.sqlite3*; Dovecot's: dovecot.index*, dovecot.list.index*)."""
    for path in list(srv.maildir(USER).rglob("*")):
        if path.name.startswith(("mailserver.index.sqlite3", "dovecot.index",
                                 "dovecot.list.index")) and path.is_file():
            path.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", default="mailserver,dovecot")
    ap.add_argument("--workdir", default="/tmp/mailserver-bench")
    ap.add_argument("--no-stall", action="store_true", help="skip the first-open measurement")
    opts = ap.parse_args()
    workdir = Path(opts.workdir)
    corpus_dir, manifest = corpus.cached(workdir, opts.messages)
    word = manifest["search_word"]
    classes = {"mailserver": S.MailServer, "dovecot": S.Dovecot}
    results: dict[str, dict] = {}
    for key, srv in corpus.servers_in_turn(opts.servers.split(","), classes, workdir,
                                           "sortstall", USER, corpus_dir, manifest):
        results[key] = {"sort": warm_sorts(srv.port("imap"), opts.runs),
                        "during": noop_during_sorts(srv.port("imap"), srv.pids(), opts.runs)}
        if not opts.no_stall:
            srv.stop()
            remove_indexes(srv)
            srv.start()
            results[key]["stall"] = stall(srv.port("imap"), word)
    report(results, opts.messages)
    return 0


def report(results: dict[str, dict], count: int) -> None:
    ours, dove = results.get("mailserver"), results.get("dovecot")
    print(f"\n{count} messages, warm, median (seconds); ratio = this server / Dovecot")
    for cmd in SORTS:
        a = ours["sort"][cmd] if ours else None
        b = dove["sort"][cmd] if dove else None
        ratio = f"{a / b:5.2f}x" if a and b else "  -  "
        print(f"  {cmd:40s} {a or 0:8.3f} {b or 0:8.3f}  {ratio}")
    print("\nNOOP on another connection while SORT and THREAD run; RSS after them")
    for key, r in results.items():
        s = r["during"]
        print(f"  {key:10s} NOOP p50 {s['noop_p50_ms']:6.1f} ms  p99 {s['noop_p99_ms']:6.1f} ms  "
              f"worst {s['noop_max_ms']:6.1f} ms  ({s['noops']} NOOPs)  "
              f"RSS {s['rss_kb'] / 1024:6.0f} MB")
    print("\nfirst open (indexes removed, restarted) with NOOP and APPEND clients beside it")
    for key, r in results.items():
        if "stall" not in r:
            continue
        s = r["stall"]
        print(f"  {key:10s} SELECT {s['select_s']:6.2f} s  SEARCH {s['search_s']:6.2f} s  "
              f"NOOP p50 {s['noop_p50_ms']:6.1f} ms  p99 {s['noop_p99_ms']:6.1f} ms  "
              f"worst {s['noop_max_ms']:6.1f} ms  ({s['noops']} NOOPs, {s['appends']} APPENDs)")


if __name__ == "__main__":
    sys.exit(main())
