"""Two server nodes on one machine sharing one Maildir root (`[storage] shared = true`):
concurrent deliveries and APPENDs from both get unique uids and lose nothing, a flag change
on one is seen by the other's next command, a CONDSTORE/QRESYNC client moving between them
sees every change and a HIGHESTMODSEQ that never goes back, and a node killed with SIGKILL
in the middle of deliveries loses nothing it acknowledged and repairs its own index when it
starts again.

Real `twistd mailserver` processes, real SMTP and IMAP clients over TLS.  Each node has
its own state_dir (its accounts in SQLite, made with its own mailserver-admin), so nothing
here needs PostgreSQL: the nodes meet only in the Maildir root.
"""

from __future__ import annotations

import random
import re
import smtplib
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DOMAIN, PASSWORD, ServerProcess, make_message, wait_until  # noqa: E402
from imap_helpers import RawIMAP, as_int, flags_of  # noqa: E402

ALICE = f"alice@{DOMAIN}"
PER_NODE = 1000        # messages each node takes: half over SMTP, half by APPEND
INDEX = "mailserver.index.sqlite3"
CHANGELOG = "mailserver-modseq.log"


def start_nodes(root: Path, count: int = 2) -> list[ServerProcess]:
    shared = root / "maildirs"
    nodes = []
    for i in range(count):
        node = ServerProcess(root / f"node{i}", {
            "storage": {"maildir_root": str(shared), "shared": True},
            "limits": {"auth_failure_delay_after": 1000, "auth_failures_per_connection": 1000},
        })
        node.admin_ok("domain", "add", DOMAIN)
        node.admin_ok("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
        nodes.append(node)
    for node in nodes:
        node.start()
    return nodes


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started = start_nodes(tmp_path)
    yield started
    for node in started:
        node.close()


def inbox(root: Path) -> Path:
    return root / "maildirs" / DOMAIN / "alice"


def message(msgid: str, subject: str = "shared") -> bytes:
    return make_message(msgid, to=ALICE, subject=subject, body=f"Body of {msgid}.\r\n")


def msgid_map(node: ServerProcess) -> dict[int, str]:
    """uid -> Message-ID of every message in alice's INBOX, as the node serves it."""
    c = RawIMAP.login(node, ALICE, select="INBOX")
    try:
        r = c.ok("UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        out: dict[int, str] = {}
        for row in r.fetches().values():
            header = next(v for k, v in row.items() if k.startswith("BODY["))
            m = re.search(rb"<[^>]+>", header)
            assert m, row
            uid = as_int(row["UID"])
            assert uid not in out, f"uid {uid} twice"
            out[uid] = m.group().decode()
        return out
    finally:
        c.logout()


def stored_flags(row: dict) -> set[str]:
    """A FETCH row's flags but \\Recent, which is per session (and per node)."""
    return flags_of(row["FLAGS"]) - {"\\Recent"}


def highest(result) -> int:
    return int(result.codes()["HIGHESTMODSEQ"])


# -- concurrent deliveries and APPENDs ---------------------------------------------------------

def smtp_worker(node: ServerProcess, ids: list[str], acked: list[str], errors: list[str]) -> None:
    try:
        with node.smtp(timeout=60) as s:
            for msgid in ids:
                refused = s.sendmail("x@remote.test", [ALICE], message(msgid))
                assert not refused, refused
                acked.append(msgid)
    except Exception as e:  # reported by the test
        errors.append(f"SMTP to {node.root.name}: {e!r}")


def append_worker(node: ServerProcess, ids: list[str], acked: list[str],
                  errors: list[str]) -> None:
    try:
        c = RawIMAP.login(node, ALICE)
        try:
            for n, msgid in enumerate(ids):
                flags = "\\Seen" if n % 3 == 0 else None
                r = c.append("INBOX", message(msgid), flags=flags, non_sync=True)
                assert r.status == "OK", str(r)
                assert r.code is not None and r.code.startswith(b"APPENDUID"), str(r)
                acked.append(msgid)
        finally:
            c.logout()
    except Exception as e:
        errors.append(f"APPEND on {node.root.name}: {e!r}")


def test_concurrent_deliveries_and_appends_on_both_nodes_get_unique_uids(nodes, tmp_path):
    a, b = nodes
    # A session on each node has the folder open, so both also scan it while mail arrives.
    watchers = [RawIMAP.login(node, ALICE, select="INBOX") for node in nodes]
    expected: list[str] = []
    acked: list[str] = []
    errors: list[str] = []
    threads = []
    for node in nodes:
        for kind, worker in (("smtp", smtp_worker), ("append", append_worker)):
            for t in range(2):
                ids = [f"<{node.root.name}.{kind}{t}.{i}@shared.test>"
                       for i in range(PER_NODE // 4)]
                expected += ids
                threads.append(threading.Thread(target=worker, args=(node, ids, acked, errors)))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for w in watchers:
            w.ok("NOOP")
        time.sleep(0.2)
    for t in threads:
        t.join()
    for w in watchers:
        w.logout()
    assert not errors, errors
    assert sorted(acked) == sorted(expected)

    seen_a, seen_b = msgid_map(a), msgid_map(b)
    assert len(seen_a) == 2 * PER_NODE
    assert sorted(seen_a.values()) == sorted(expected)   # nothing lost, nothing twice
    assert seen_b == seen_a                              # the same uid for each message
    uidlist = (inbox(tmp_path) / "dovecot-uidlist").read_text().splitlines()
    assert len(uidlist) == 2 * PER_NODE + 1
    # Indexes are each node's own, never in the shared root.
    assert not list((tmp_path / "maildirs").rglob(INDEX + "*"))
    for node in nodes:
        assert (node.state_dir / "indexes" / DOMAIN / "alice" / INDEX).is_file()


# -- flags across nodes ---------------------------------------------------------------------------

def test_flags_stored_on_one_node_are_seen_by_the_others_next_command(nodes):
    a, b = nodes
    on_a = RawIMAP.login(a, ALICE, select="INBOX")
    on_b = RawIMAP.login(b, ALICE, select="INBOX")
    try:
        for n in range(3):
            on_a.append("INBOX", message(f"<flags{n}@shared.test>"))
        assert b"3 EXISTS" in on_b.ok("NOOP").untagged
        on_b.ok("UID STORE 2 +FLAGS (\\Flagged $Work)")
        r = on_a.ok("NOOP")
        assert any(re.fullmatch(rb"FLAGS \(.*\$Work.*\)", u) for u in r.untagged), str(r)
        (row,) = r.fetches().values()
        assert flags_of(row["FLAGS"]) >= {"\\Flagged", "$Work"}, str(r)
        flags = flags_of(on_a.fetch("2", "FLAGS")[2]["FLAGS"]) - {"\\Recent"}
        assert flags == {"\\Flagged", "$Work"}
        # An expunge on A reaches B's next command too.
        on_a.ok("UID STORE 1 +FLAGS (\\Deleted)")
        on_a.ok("EXPUNGE")
        r = on_b.ok("NOOP")
        assert b"1 EXPUNGE" in r.untagged, str(r)
        flags = flags_of(on_b.fetch("1", "FLAGS")[1]["FLAGS"]) - {"\\Recent"}
        assert flags == {"\\Flagged", "$Work"}
    finally:
        on_a.logout()
        on_b.logout()
    assert "shared Maildir root (indexes node-local in " in a.admin_ok("check").stdout


# -- CONDSTORE / QRESYNC across nodes ---------------------------------------------------------------

class Replica:
    """What a QRESYNC client keeps of a mailbox: uid -> flags, UIDVALIDITY, HIGHESTMODSEQ."""

    def __init__(self) -> None:
        self.flags: dict[int, set[str]] = {}
        self.uidvalidity = 0
        self.modseq = 0

    def sync(self, node: ServerProcess) -> list[int]:
        """Resynchronise on `node` (RFC 7162 3.2.5) and check the result against a full
        fetch; the HIGHESTMODSEQs seen, in order."""
        c = RawIMAP.login(node, ALICE)
        try:
            c.ok("ENABLE QRESYNC")
            if self.uidvalidity:
                known = ",".join(str(u) for u in sorted(self.flags)) or "1"
                r = c.ok(f"SELECT INBOX (QRESYNC ({self.uidvalidity} {self.modseq} {known}))")
            else:
                r = c.ok("SELECT INBOX")
            self.uidvalidity = int(r.codes()["UIDVALIDITY"])
            seen = [highest(r)]
            for line in r.untagged:
                m = re.fullmatch(rb"VANISHED \(EARLIER\) ([0-9:,]+)", line)
                if m:
                    for part in m.group(1).split(b","):
                        lo, _, hi = part.partition(b":")
                        for uid in range(int(lo), int(hi or lo) + 1):
                            self.flags.pop(uid, None)
            for row in r.fetches().values():
                self.flags[as_int(row["UID"])] = stored_flags(row)
            top = max(self.flags, default=0)
            news = c.ok(f"UID FETCH {top + 1}:* (UID FLAGS)")
            for row in news.fetches().values():
                uid = as_int(row["UID"])
                if uid > top:
                    self.flags[uid] = stored_flags(row)
            truth = {as_int(row["UID"]): stored_flags(row)
                     for row in c.ok("UID FETCH 1:* (UID FLAGS)").fetches().values()}
            assert self.flags == truth, (node.root.name, self.flags, truth)
            self.modseq = seen[0]
            return seen
        finally:
            c.logout()


def change_something(node: ServerProcess, rng: random.Random, round_: int) -> None:
    """A few flag changes, an expunge now and then, and new mail, by another client."""
    c = RawIMAP.login(node, ALICE, select="INBOX")
    try:
        uids = c.ok("UID SEARCH ALL").search()
        for uid in rng.sample(uids, min(3, len(uids))):
            flag = rng.choice(["\\Seen", "\\Flagged", "\\Answered", "$Todo"])
            c.ok(f"UID STORE {uid} {rng.choice('+-')}FLAGS ({flag})")
        if uids and round_ % 3 == 1:
            c.ok(f"UID STORE {rng.choice(uids)} +FLAGS (\\Deleted)")
            c.ok("EXPUNGE")
        c.append("INBOX", message(f"<cs{round_}.{rng.random()}@shared.test>"))
    finally:
        c.logout()


def test_a_qresync_client_moving_between_nodes_misses_nothing(nodes):
    a, b = nodes
    c = RawIMAP.login(a, ALICE)
    for n in range(6):
        c.append("INBOX", message(f"<start{n}@shared.test>"), flags="\\Seen" if n % 2 else None)
    c.logout()
    replica = Replica()
    rng = random.Random(7)
    last = 0
    for round_ in range(12):
        writer = rng.choice(nodes)
        change_something(writer, rng, round_)
        reader = nodes[round_ % 2]
        for value in replica.sync(reader):
            assert value >= last, f"HIGHESTMODSEQ went back on {reader.root.name}"
            last = value


def test_changedsince_after_changes_on_the_other_node(nodes):
    a, b = nodes
    on_a = RawIMAP.login(a, ALICE)
    for n in range(5):
        on_a.append("INBOX", message(f"<chg{n}@shared.test>"))
    r = on_a.ok("SELECT INBOX (CONDSTORE)")
    before = highest(r)
    on_a.logout()
    on_b = RawIMAP.login(b, ALICE, select="INBOX")
    on_b.ok("UID STORE 2,4 +FLAGS (\\Answered)")
    on_b.logout()
    on_a = RawIMAP.login(a, ALICE)
    try:
        r = on_a.ok("SELECT INBOX (CONDSTORE)")
        assert highest(r) > before
        rows = on_a.ok(f"UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE {before})").fetches()
        assert sorted(as_int(v["UID"]) for v in rows.values()) == [2, 4]
        # UNCHANGEDSINCE on A sees B's change: the older value no longer holds.
        r = on_a.ok(f"UID STORE 2 (UNCHANGEDSINCE {before}) +FLAGS (\\Seen)")
        assert r.codes().get("MODIFIED") == b"2", str(r)
    finally:
        on_a.logout()


# -- a node killed during deliveries ------------------------------------------------------------

def test_node_killed_during_deliveries_loses_nothing_it_acknowledged(nodes, tmp_path):
    a, b = nodes
    acked: list[str] = []
    stop = threading.Event()

    def deliver_to_a() -> None:
        n = 0
        while not stop.is_set():
            try:
                with a.smtp(timeout=10) as s:
                    while not stop.is_set():
                        msgid = f"<killed{n}@shared.test>"
                        n += 1
                        s.sendmail("x@remote.test", [ALICE], message(msgid))
                        acked.append(msgid)
            except (OSError, smtplib.SMTPException):
                return   # the node is gone

    watcher = RawIMAP.login(a, ALICE, select="INBOX")   # A scans and indexes meanwhile
    sender = threading.Thread(target=deliver_to_a)
    sender.start()
    try:
        assert wait_until(lambda: len(acked) >= 150, 60), a.diagnostics()
        watcher.ok("NOOP")
        assert wait_until(lambda: len(acked) >= 250, 60)
        a.kill9()
    finally:
        stop.set()
        sender.join(30)
        watcher.close()
    served = set(msgid_map(b).values())
    assert set(acked) <= served, sorted(set(acked) - served)[:5]

    a.start()   # its index lags behind what B did since: repaired as the folder opens
    on_a, on_b = msgid_map(a), msgid_map(b)
    assert on_a == on_b
    a.stop()
    index = a.state_dir / "indexes" / DOMAIN / "alice" / INDEX
    with sqlite3.connect(index) as db:
        (rows,) = db.execute("SELECT count(*) FROM msg").fetchone()
    assert rows == len(on_b)
    a.start()

    # Without any index at all, A builds one again: same uids, HIGHESTMODSEQ never lower.
    c = RawIMAP.login(b, ALICE)
    before = highest(c.ok("SELECT INBOX (CONDSTORE)"))
    c.logout()
    a.stop()
    for path in index.parent.glob(INDEX + "*"):
        path.unlink()
    a.start()
    c = RawIMAP.login(a, ALICE)
    try:
        assert highest(c.ok("SELECT INBOX (CONDSTORE)")) >= before
    finally:
        c.logout()
    assert msgid_map(a) == on_b
    assert index.is_file()
    assert (inbox(tmp_path) / CHANGELOG).is_file()
