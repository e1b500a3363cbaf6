"""How long a client that knows HIGHESTMODSEQ takes to resynchronise a large folder
(RFC 7162 CONDSTORE/QRESYNC), against a real server process on loopback.

    python bench/condstore_resync.py [--messages 100000] [--changes 10] [--rounds 7]

The folder is written straight into the Maildir before the server starts; the first
SELECT gives every message its uid.  Then, each round, another session changes the flags
of `--changes` messages, and the resynchronising client measures, from sending the
command to its tagged OK:

- SELECT INBOX (QRESYNC (uidvalidity modseq)) on a new connection (logged in already),
  and a plain SELECT INBOX after it on the same connection;
- UID FETCH 1:* (FLAGS) (CHANGEDSINCE modseq) in a session that has the folder selected;
- for comparison, UID FETCH 1:* (FLAGS), what a client without CONDSTORE must do.

Prints the median and the worst of the rounds.  A figure, not a test: machines differ.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from harness import ServerProcess  # noqa: E402
from imap_helpers import ALICE, PASSWORD, RawIMAP  # noqa: E402

MESSAGE = (b"From: <x@remote.test>\r\nTo: <alice@example.test>\r\nSubject: bench %d\r\n"
           b"Message-ID: <bench%d@remote.test>\r\n\r\nBody %d.\r\n")


def populate(maildir: Path, count: int) -> None:
    """`count` messages in cur/, as another delivery agent would have left them."""
    cur = maildir / "cur"
    cur.mkdir(parents=True, exist_ok=True)
    for sub in ("new", "tmp"):
        (maildir / sub).mkdir(exist_ok=True)
    base_time = int(time.time()) - count
    for i in range(1, count + 1):
        data = MESSAGE % (i, i, i)
        (cur / f"{base_time + i}.M{i}P1.bench,S={len(data)}:2,").write_bytes(data)


def login(server: ServerProcess, select: str | None = None) -> RawIMAP:
    client = RawIMAP.connect(server, timeout=600)
    client.ok(f'LOGIN "{ALICE}" "{PASSWORD}"')
    if select is not None:
        client.ok(f"SELECT {select}")
    return client


def timed(client: RawIMAP, command: str) -> tuple[float, object]:
    start = time.perf_counter()
    result = client.command(command)
    elapsed = time.perf_counter() - start
    assert result.status == "OK", str(result)[:2000]
    return elapsed, result


def highest(result: object) -> int:
    return int(result.codes()["HIGHESTMODSEQ"])  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="condstore-bench-") as tmp:
        server = ServerProcess(Path(tmp))
        server.create_accounts()
        print(f"writing {opts.messages} messages ...", flush=True)
        populate(server.maildir(ALICE), opts.messages)
        server.start()
        try:
            return run(server, opts)
        finally:
            server.stop()


def run(server: ServerProcess, opts: argparse.Namespace) -> int:
    first = time.perf_counter()
    watcher = login(server)
    watcher.ok("ENABLE QRESYNC")
    r = watcher.command("SELECT INBOX")
    assert r.status == "OK", str(r)
    print(f"first SELECT (uids and mod-sequences for every message): "
          f"{time.perf_counter() - first:.1f} s", flush=True)
    uidvalidity = int(r.codes()["UIDVALIDITY"])
    changer = login(server, select="INBOX")
    rng = random.Random(7162)
    select_times, plain_times, fetch_times, full_times = [], [], [], []
    for round_ in range(opts.rounds):
        known = highest(watcher.ok("SELECT INBOX"))
        uids = rng.sample(range(1, opts.messages + 1), opts.changes)
        flag = "\\Flagged" if round_ % 2 else "$Bench"
        changer.ok(f"UID STORE {','.join(map(str, uids))} +FLAGS.SILENT ({flag})")

        fresh = login(server)
        fresh.ok("ENABLE QRESYNC")
        elapsed, result = timed(fresh, f"SELECT INBOX (QRESYNC ({uidvalidity} {known}))")
        plain_times.append(timed(fresh, "SELECT INBOX")[0])
        fresh.close()
        reported = len(result.fetches())  # type: ignore[attr-defined]
        assert reported == opts.changes, f"{reported} changes reported, {opts.changes} made"
        select_times.append(elapsed)

        elapsed, result = timed(watcher, f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known})")
        fetch_times.append(elapsed)
        if round_ < 3:
            elapsed, _ = timed(watcher, "UID FETCH 1:* (FLAGS)")
            full_times.append(elapsed)
    watcher.close()
    changer.close()

    def show(what: str, times: list[float]) -> None:
        print(f"{what:58s} median {statistics.median(times) * 1000:8.1f} ms   "
              f"worst {max(times) * 1000:8.1f} ms")

    print(f"{opts.messages} messages, {opts.changes} changed per round, "
          f"{opts.rounds} rounds:")
    show("SELECT (QRESYNC (uidvalidity modseq)), new connection", select_times)
    show("SELECT INBOX, plain, after it (for comparison)", plain_times)
    show("UID FETCH 1:* (FLAGS) (CHANGEDSINCE modseq), selected", fetch_times)
    show("UID FETCH 1:* (FLAGS), no CONDSTORE (for comparison)", full_times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
