"""Two server nodes on one machine sharing one Maildir root and one PostgreSQL accounts
database: a change made on one node reaches IMAP sessions IDLE-ing on the other
(NOTIFY mail_changed), POP3's IN-USE holds across the nodes and is released when a node
dies, and a restarted database loses no change.

Real `twistd mailserver` processes, real IMAP, POP3 and SMTP clients over TLS, PostgreSQL
started by tests/pg_helper.py (skipped without it, unless MAILSERVER_REQUIRE_INTEROP=1).
The latency itself is measured by bench/crossnode_idle.py; here a change only has to
arrive within a few seconds.
"""

from __future__ import annotations

import poplib
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (PASSWORD, ServerProcess, make_message,  # noqa: E402
                     tls_client_context, wait_until)
from imap_helpers import ALICE, RawIMAP, deliver  # noqa: E402

import pg_nodes  # noqa: E402
from pg_nodes import cluster  # noqa: E402,F401 (a fixture)
from tests.pg_helper import PgCluster, require_postgresql  # noqa: E402

# A change travels in milliseconds; this only bounds a failure ("within a few seconds").
FEW_SECONDS = 5.0
# Without a notification an IDLE session would still see the change when it looks at the
# disk by itself: a second after a scan of a folder that had just changed
# (mailserver.maildir.folder.DIRTY_WINDOW), and every 5 s of IDLE (imap/server.py
# IDLE_POLL).  So a session waits SETTLE after opening its folder, and a change must
# arrive within AT_ONCE, before IDLE's first look: only a notification can bring it.
SETTLE = 1.2
AT_ONCE = 3.0


def start_nodes(root: Path, url: str, **accounts: object) -> list[ServerProcess]:
    """Two nodes sharing the Maildir root and the accounts database, with the users
    alice, bob and carol."""
    return pg_nodes.start_nodes(root, url, with_users=True, **accounts)


@pytest.fixture
def nodes(tmp_path: Path, cluster: PgCluster) -> Iterator[list[ServerProcess]]:
    started = start_nodes(tmp_path, cluster.create_database())
    yield started
    pg_nodes.stop_nodes(started)


def idle(node: ServerProcess, mailbox: str = "INBOX") -> tuple[RawIMAP, bytes]:
    """A session on `node` IDLE-ing in `mailbox`; and the IDLE command's tag."""
    c = RawIMAP.login(node, select=mailbox)
    tag, line = c.idle_start()
    assert line.startswith(b"+"), line
    time.sleep(SETTLE)
    return c, tag


def idle_again(c: RawIMAP, tag: bytes) -> bytes:
    """End the IDLE `tag` and start a new one (IDLE's own look at the disk starts over)."""
    c.send(b"DONE\r\n")
    done = c.read_result(tag)
    assert done.status == "OK", done
    tag, line = c.idle_start()
    assert line.startswith(b"+"), line
    time.sleep(SETTLE)
    return tag


def pop3(node: ServerProcess, user: str = ALICE) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    p.stls(tls_client_context())
    p.user(user)
    p.pass_(PASSWORD)
    return p


def pop3_login_answer(node: ServerProcess, user: str = ALICE) -> str:
    """"+OK" or the server's -ERR line to PASS (the session is ended either way)."""
    try:
        p = pop3(node, user)
    except poplib.error_proto as e:
        return e.args[0].decode()
    p.quit()
    return "+OK"


def subjects(node: ServerProcess) -> list[str]:
    """The Subject of every message in alice's INBOX, as a new session on `node` sees it."""
    c = RawIMAP.login(node, select="INBOX")
    try:
        r = c.ok("FETCH 1:* BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    finally:
        c.close()
    return sorted(m.decode() for m in re.findall(rb"Subject: (\S+)", b"\n".join(r.untagged)))


# -- changes ----------------------------------------------------------------------------------

def test_delivery_on_one_node_wakes_an_idle_on_the_other(nodes):
    a, b = nodes
    deliver(a, ALICE, subject="before")
    watcher, _ = idle(b)
    try:
        deliver(a, ALICE, subject="cross-node")
        line, seen = watcher.wait_for(rb"^\* 2 EXISTS", AT_ONCE)
        assert line is not None, seen
    finally:
        watcher.close()


def test_flags_stored_on_one_node_reach_an_idle_on_the_other(nodes):
    a, b = nodes
    deliver(a, ALICE)
    deliver(a, ALICE)
    watcher, tag = idle(a)
    writer = RawIMAP.login(b, select="INBOX")
    try:
        writer.ok("STORE 2 +FLAGS (\\Flagged)")
        line, seen = watcher.wait_for(rb"^\* 2 FETCH \(.*FLAGS \(", AT_ONCE)
        assert line is not None and b"\\Flagged" in line, seen
        tag = idle_again(watcher, tag)
        writer.ok("STORE 1 +FLAGS (\\Deleted)")
        writer.ok("EXPUNGE")
        line, seen = watcher.wait_for(rb"^\* 1 EXPUNGE", AT_ONCE)
        assert line is not None, seen
        # The next command of a session that does not IDLE sees the change as well.
        watcher.send(b"DONE\r\n")
        other = RawIMAP.login(a, select="INBOX")
        flags = other.fetch("1:*", "FLAGS")
        assert list(flags) == [1] and "\\Flagged" in str(flags[1]["FLAGS"])
        other.close()
    finally:
        watcher.close()
        writer.close()


def test_append_and_move_on_one_node_reach_the_target_on_the_other(nodes):
    a, b = nodes
    watcher, tag = idle(b, "Archive")
    writer = RawIMAP.login(a)
    try:
        r = writer.append("Archive", make_message("<appended@example.test>"))
        assert r.status == "OK", r
        line, seen = watcher.wait_for(rb"^\* 1 EXISTS", AT_ONCE)
        assert line is not None, seen
        deliver(a, ALICE, subject="to be moved")
        writer.select("INBOX")
        tag = idle_again(watcher, tag)
        writer.ok("MOVE 1 Archive")
        line, seen = watcher.wait_for(rb"^\* 2 EXISTS", AT_ONCE)
        assert line is not None, seen
    finally:
        watcher.close()
        writer.close()


# -- POP3 locks --------------------------------------------------------------------------------

def test_pop3_in_use_holds_across_nodes(nodes):
    a, b = nodes
    deliver(a, ALICE)
    holder = pop3(a)
    try:
        answer = pop3_login_answer(b)
        assert answer.startswith("-ERR [IN-USE]"), answer
        assert pop3_login_answer(b, "bob@example.test") == "+OK"   # other mailboxes are free
    finally:
        holder.quit()
    assert wait_until(lambda: pop3_login_answer(b) == "+OK", FEW_SECONDS)
    # And the other way round: B's session keeps A out.
    holder = pop3(b)
    try:
        assert pop3_login_answer(a).startswith("-ERR [IN-USE]")
    finally:
        holder.quit()


def test_a_killed_node_releases_its_pop3_lock(nodes):
    a, b = nodes
    deliver(a, ALICE)
    holder = pop3(b)
    assert pop3_login_answer(a).startswith("-ERR [IN-USE]")
    b.kill9()
    holder.sock.close()
    assert wait_until(lambda: pop3_login_answer(a) == "+OK", FEW_SECONDS), a.diagnostics()


def test_a_pop3_session_whose_lock_went_to_another_node_deletes_nothing(tmp_path, cluster):
    """The node's database connection dropped (here: its backend terminated), PostgreSQL
    released its lock, and a session on the other node took the mailbox: the first
    session deletes nothing at QUIT ([IN-USE]), also before its node's keepalive has
    noticed the dropped connection (QUIT asks the database first)."""
    import psycopg

    url = cluster.create_database()
    started = start_nodes(tmp_path, url)
    try:
        a, b = started
        deliver(a, ALICE, subject="one")
        deliver(a, ALICE, subject="two")
        holder = pop3(a)
        with psycopg.connect(url, autocommit=True) as admin:
            (pid,) = admin.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                                   "AND granted").fetchone()
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        sessions: list[poplib.POP3] = []

        def take() -> bool:
            try:
                sessions.append(pop3(b))
            except poplib.error_proto:
                return False
            return True
        assert wait_until(take, FEW_SECONDS)   # the mailbox is b's now
        other = sessions[0]
        try:
            holder.dele(1)
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                holder.quit()
            assert subjects(b) == ["one", "two"]
        finally:
            other.quit()
    finally:
        pg_nodes.stop_nodes(started)


def test_pop3_on_one_node_while_imap_expunges_on_the_other(nodes):
    a, b = nodes
    sent = [deliver(a, ALICE, subject=f"m{i}", body=f"body {i}\r\n" * (i + 1))
            for i in range(6)]
    p = pop3(a)
    count, octets = p.stat()
    assert count == 6
    listed = {int(n): int(s) for n, s in (line.split() for line in p.list()[1])}
    assert sum(listed.values()) == octets

    # On B, IMAP removes messages 2 and 4 while A's POP3 session is open.
    imap = RawIMAP.login(b, select="INBOX")
    imap.ok("STORE 2,4 +FLAGS (\\Deleted)")
    imap.ok("EXPUNGE")

    # A's session keeps its listing (RFC 1939), cannot serve what is gone, serves the
    # rest whole at the sizes it listed.
    assert p.stat() == (6, octets)
    retrieved = {}
    for n in range(1, 7):
        try:
            _, lines, size = p.retr(n)
        except poplib.error_proto as e:
            assert n in (2, 4), (n, e)
            continue
        retrieved[n] = b"\r\n".join(lines)
        assert n not in (2, 4)
        assert size == listed[n]
    assert set(retrieved) == {1, 3, 5, 6}
    for n, data in retrieved.items():
        assert data.endswith(sent[n - 1].split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n"))
    for n in (1, 3):
        p.dele(n)
    p.quit()

    # Both nodes now agree: messages 5 and 6 are left, once each; B's session was told.
    assert subjects(a) == subjects(b) == ["m4", "m5"]
    again = pop3(b)
    try:
        assert again.stat()[0] == 2
    finally:
        again.quit()
    assert imap.ok("NOOP") and imap.fetch("1:*", "UID").keys() == {1, 2}
    imap.close()


# -- the database restarted ----------------------------------------------------------------------

def test_notifications_resume_after_postgresql_restarts(tmp_path):
    own = PgCluster(require_postgresql())   # stopped and started: not the shared one
    started: list[ServerProcess] = []
    try:
        started = start_nodes(tmp_path, own.create_database())
        a, b = started
        watcher, _ = idle(b)
        try:
            own.stop()
            # Delivered while nobody can be told: B looks once it listens again.
            deliver(a, ALICE, subject="while-down")
            own.start()
            line, seen = watcher.wait_for(rb"^\* 1 EXISTS", 30)
            assert line is not None, seen + b.log_text().encode()
        finally:
            watcher.close()
        assert wait_until(lambda: "listening for cross-node changes again: 1 open folders "
                          "refreshed" in b.log_text(), FEW_SECONDS), b.log_text()
        assert "cross-node changes are sent again" in a.wait_for_log(
            lambda t: "cross-node changes are sent again" in t)
        # Later changes are told at once, as before.
        watcher, _ = idle(b)
        try:
            deliver(a, ALICE, subject="after")
            line, seen = watcher.wait_for(rb"^\* 2 EXISTS", AT_ONCE)
            assert line is not None, seen
        finally:
            watcher.close()
        # POP3's locks work again as well.
        holder = pop3(a)
        try:
            assert pop3_login_answer(b).startswith("-ERR [IN-USE]")
        finally:
            holder.quit()
        assert subjects(b) == ["after", "while-down"]
    finally:
        for node in started:
            node.close()
        own.destroy()
