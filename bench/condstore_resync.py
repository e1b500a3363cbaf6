"""How long a client that knows HIGHESTMODSEQ takes to resynchronise a large folder
(RFC 7162 CONDSTORE/QRESYNC): this server and Dovecot, side by side in the same run, on the
same corpus (bench/corpus.py).

    python bench/condstore_resync.py [--messages 100000] [--changes 10] [--rounds 7]
                                     [--servers mailserver,dovecot]

Per server, after one untimed SELECT that gives every message its uid and mod-sequence,
each round another session makes `--changes` changes, then the resynchronising client
measures, from sending the command to its tagged OK:

- flags rounds: the other session sets a keyword new to the folder on `--changes`
  random messages;
- expunge rounds: it expunges `--changes` random messages (UID EXPUNGE), so QRESYNC must
  answer VANISHED (EARLIER) for them;

and in both:
- SELECT INBOX (QRESYNC (uidvalidity modseq)) on a new connection (logged in already);
- UID FETCH 1:* (FLAGS) (CHANGEDSINCE modseq VANISHED) in a session that has the folder
  selected (RFC 7162 3.2.6);
- for comparison, UID FETCH 1:* (FLAGS), what a client without CONDSTORE must do.

Each answer is checked: the changed messages' FETCH lines, the expunged uids in VANISHED.
Prints the median and the worst of the rounds, and the ratio to Dovecot's medians.  A
figure, not a test: machines differ.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
import servers as S  # noqa: E402
from imap_client import IMAPConn, Response  # noqa: E402

USER = "bench"
CASES = ("QRESYNC SELECT, new connection", "UID FETCH (CHANGEDSINCE .. VANISHED), selected",
         "UID FETCH 1:* (FLAGS), no CONDSTORE")


def login(port: int) -> IMAPConn:
    conn = IMAPConn(port)
    conn.login(f"{USER}@{S.DOMAIN}", S.PASSWORD)
    conn.ok("ENABLE QRESYNC")
    return conn


def code(resp: Response, name: bytes) -> int:
    for line in [resp.text, *resp.kept]:
        m = re.search(rb"\[" + name + rb" (\d+)\]", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"no {name!r} in {resp.text!r}")


def vanished_uids(resp: Response) -> set[int]:
    out: set[int] = set()
    for line in resp.kept:
        if not line.startswith(b"* VANISHED"):
            continue
        for part in line.split()[-1].split(b","):
            lo, _, hi = part.partition(b":")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def all_uids(conn: IMAPConn) -> list[int]:
    resp = conn.ok("UID SEARCH ALL", keep=(b"* SEARCH",))
    return [int(x) for line in resp.kept for x in line[8:].split()]


def measure(port: int, opts: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    watcher = login(port)
    resp = watcher.ok("SELECT INBOX", keep=(b"* OK",))
    uidvalidity = code(resp, b"UIDVALIDITY")
    changer = login(port)
    changer.ok("SELECT INBOX")
    live = all_uids(changer)
    rng = random.Random(7162)
    known = code(resp, b"HIGHESTMODSEQ")
    times: dict[str, dict[str, list[float]]] = {
        kind: {case: [] for case in CASES} for kind in ("flags", "expunge")}
    for round_ in range(2 * opts.rounds):
        kind = "flags" if round_ % 2 == 0 else "expunge"
        picked = rng.sample(live, opts.changes)
        uidset = ",".join(map(str, picked))
        if kind == "flags":
            changer.ok(f"UID STORE {uidset} +FLAGS.SILENT ($Resync{round_})")  # a change to each
        else:
            changer.ok(f"UID STORE {uidset} +FLAGS.SILENT (\\Deleted)")
            changer.ok(f"UID EXPUNGE {uidset}")
            gone = set(picked)
            live = [u for u in live if u not in gone]

        fresh = IMAPConn(port)
        fresh.login(f"{USER}@{S.DOMAIN}", S.PASSWORD)
        fresh.ok("ENABLE QRESYNC")
        got = fresh.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {known}))",
                       keep=(b"* VANISHED", b"* OK"))
        fresh.logout()
        check(kind, got, picked)
        after = code(got, b"HIGHESTMODSEQ")
        times[kind][CASES[0]].append(got.elapsed)

        got = watcher.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)",
                         keep=(b"* VANISHED",))
        if kind == "flags":   # expunged messages also reached the watcher as VANISHED
            check(kind, got, picked)
        times[kind][CASES[1]].append(got.elapsed)
        if round_ < 4:
            times[kind][CASES[2]].append(watcher.ok("UID FETCH 1:* (FLAGS)").elapsed)
        known = after
    watcher.logout()
    changer.logout()
    return times


def check(kind: str, resp: Response, picked: list[int]) -> None:
    if kind == "flags":
        assert resp.fetches >= len(picked), f"{resp.fetches} FETCH for {len(picked)} changes"
    else:
        missing = set(picked) - vanished_uids(resp)
        assert not missing, f"expunged uids not reported VANISHED: {sorted(missing)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7, help="rounds of each kind")
    ap.add_argument("--servers", default="mailserver,dovecot")
    ap.add_argument("--workdir", default="/tmp/mailserver-bench")
    opts = ap.parse_args()
    workdir = Path(opts.workdir)
    corpus_dir, manifest = corpus.cached(workdir, opts.messages)
    classes = {"mailserver": S.MailServer, "dovecot": S.Dovecot}
    results: dict[str, dict] = {}
    for key, srv in corpus.servers_in_turn(opts.servers.split(","), classes, workdir,
                                           "resync", USER, corpus_dir, manifest):
        results[key] = measure(srv.port("imap"), opts)
    report(results, opts)
    return 0


def report(results: dict[str, dict], opts: argparse.Namespace) -> None:
    print(f"\n{opts.messages} messages, {opts.changes} changes per round, {opts.rounds} rounds "
          f"of each kind: median (worst) in ms; ratio = this server / Dovecot")
    ours, dove = results.get("mailserver"), results.get("dovecot")
    for kind in ("flags", "expunge"):
        print(f"  {kind} rounds")
        for case in CASES:
            cells, medians = [], []
            for r in (ours, dove):
                t = r[kind][case] if r else []
                medians.append(statistics.median(t) if t else None)
                cells.append(f"{statistics.median(t) * 1000:8.1f} ({max(t) * 1000:7.1f})"
                             if t else f"{'-':>18s}")
            ratio = (f"{medians[0] / medians[1]:5.2f}x" if all(medians) else "  -  ")
            print(f"    {case:50s} {cells[0]}  {cells[1]}  {ratio}")


if __name__ == "__main__":
    sys.exit(main())
