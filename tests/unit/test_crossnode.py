"""Changes and locks across nodes, piece by piece: the mail_changed payloads (bounded,
validated, own ones skipped), the node's link to PostgreSQL (NOTIFY, POP3's advisory
locks, reconnects that take the locks again), the accounts replica's connection shared
with another channel, and the store telling its observers of this process's own changes.

PostgreSQL from tests/pg_helper.py (skipped without it, unless MAILSERVER_REQUIRE_INTEROP=1);
the payload and store tests need none.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.accounts_pg_schema import WRITE_LOCK
from mailserver.crossnode_pg import (CHANNEL, PAYLOAD_MAX, LinkDown, NodeLink, decode, encode,
                                     lock_key)
from mailserver.maildir import MaildirStore
from tests.pg_helper import PgCluster, require_postgresql, wait_until

NODE = "a" * 32


# -- payloads ------------------------------------------------------------------------------

def test_a_burst_of_folders_travels_in_payloads_below_the_limit():
    keys = [(f"example.org/user{i:05d}", f".Folder{i % 7}" if i % 3 else "")
            for i in range(3000)]
    payloads = encode(NODE, keys)
    assert len(payloads) > 1
    assert all(len(p.encode()) < PAYLOAD_MAX for p in payloads)
    heard = decode(payloads, own="b" * 32)
    assert list(heard.keys) == keys and not heard.everything and not heard.unreadable


def test_names_outside_ascii_survive_and_a_node_skips_its_own():
    keys = [("exämple.org/jörg", ".Entwürfe"), ("example.org/\udcff", "")]
    payloads = encode(NODE, keys)
    assert all(p.isascii() for p in payloads)
    assert list(decode(payloads, own="other").keys) == keys
    assert not decode(payloads, own=NODE)


def test_everything():
    heard = decode(encode(NODE, None), own="other")
    assert heard.everything and not heard.keys
    # A name too long to be a folder is told as "everything", never split or cut.
    assert encode(NODE, [("example.org/" + "x" * 8000, "")]) == encode(NODE, None)


@pytest.mark.parametrize("entry", [
    ["example.org/../../etc", ""], ["example.org/alice", "../bob"], ["example.org/alice", "Sent"],
    ["example.org/alice/.Sent", ""], ["..", ""], ["example.org/alice", "."],
    ["example.org/al\0ce", ""], ["example.org/", ""], ["/etc/passwd", ""], ["a/b", 5],
    ["a/b"], "a/b", None, ["a/b", "", "x"],
])
def test_entries_that_are_not_a_folder_under_the_root_are_left_alone(entry):
    payload = json.dumps({"node": NODE, "f": [entry, ["example.org/alice", ".Sent"]]})
    heard = decode([payload], own="other")
    assert list(heard.keys) == [("example.org/alice", ".Sent")]
    assert heard.unreadable == 1


@pytest.mark.parametrize("payload", [
    "", "not json", "[]", "{}", '{"node": ""}', '{"node": 5, "f": []}',
    '{"node": "n", "f": {}}', json.dumps({"node": "n" * 65, "f": []}),
    json.dumps({"node": "n", "f": [["a/b", ""]] * 5000}), "x" * 9000,
])
def test_unreadable_payloads_are_counted_not_followed(payload):
    heard = decode([payload], own="other")
    assert not heard and heard.unreadable == 1


def test_lock_keys():
    a, b = lock_key("example.org/alice"), lock_key("example.org/bob")
    assert a != b and -2**63 <= a < 2**63
    assert a == lock_key("example.org/alice")   # the same on every node and every start
    assert WRITE_LOCK not in (a, b)


# -- the node's link ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    c = PgCluster(require_postgresql())
    yield c
    c.destroy()


def link(cluster: PgCluster) -> NodeLink:
    from mailserver.accounts_pg import connect

    url = cluster.url()
    return NodeLink(lambda: connect(url))


def backend_pid(l: NodeLink) -> int:
    l.check()
    return l._conn.info.backend_pid   # type: ignore[union-attr]


def test_notify_reaches_listeners(cluster):
    listener = cluster.connect()
    listener.execute(f"LISTEN {CHANNEL}")
    sender = link(cluster)
    try:
        payloads = encode(NODE, [("example.org/alice", ""), ("example.org/bob", ".Sent")])
        sender.publish(payloads)
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=len(payloads))]
        assert got == payloads
    finally:
        sender.close()
        listener.close()


def test_advisory_locks_keep_nodes_apart_and_end_with_the_connection(cluster):
    a, b = link(cluster), link(cluster)
    key = lock_key("example.org/alice")
    try:
        assert a.try_lock(key) and not b.try_lock(key)
        assert b.try_lock(lock_key("example.org/bob"))
        a.unlock(key)
        assert b.try_lock(key) and not a.try_lock(key)
        b.close()   # a node that dies: PostgreSQL releases what its connection held
        assert wait_until(lambda: a.try_lock(key), 5)
    finally:
        a.close()
        b.close()


def test_a_broken_connection_is_replaced_and_its_locks_taken_again(cluster):
    a, other = link(cluster), link(cluster)
    alice, bob = lock_key("example.org/alice"), lock_key("example.org/bob")
    admin = cluster.connect()
    try:
        assert a.try_lock(alice) and a.try_lock(bob)
        first = backend_pid(a)
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        # While a's connection is gone another node takes bob.
        assert wait_until(lambda: other.try_lock(bob), 5)
        a.check()   # the next call reconnects (once, at once) and takes alice again
        assert backend_pid(a) != first
        assert a.take_lost() == [bob] and a.held == 1
        assert not other.try_lock(alice)
    finally:
        a.close()
        other.close()
        admin.close()


def test_no_database_is_linkdown_at_once_with_backoff():
    calls = []
    now = [100.0]

    def refuse() -> Any:
        calls.append(now[0])
        raise OSError("connection refused")

    l = NodeLink(refuse, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(LinkDown, match="connection refused|retrying soon"):
            l.publish(["x"])
    assert len(calls) == 1   # the others failed at once, without a new attempt
    now[0] += 0.6
    with pytest.raises(LinkDown):
        l.try_lock(1)
    assert len(calls) == 2
    l.unlock(1)   # never fails


# -- the replica's connection, shared ---------------------------------------------------------

def test_the_accounts_listener_serves_another_channel(cluster):
    from mailserver.accounts_replica import ReplicatedAccounts

    url = cluster.create_schema()
    heard: list[str] = []
    connected = threading.Event()
    r = ReplicatedAccounts(url, call_in_reactor=lambda f, *a: f(*a))
    with pytest.raises(ValueError):
        r.subscribe("accounts_changed", heard.extend, connected.set)
    with pytest.raises(ValueError):
        r.subscribe("mail changed; DROP", heard.extend, connected.set)
    r.subscribe(CHANNEL, heard.extend, connected.set)
    r.startService()
    try:
        assert connected.wait(10)
        assert wait_until(lambda: r.reloads > 0)
        reloads = r.reloads
        sender = link(cluster)
        payloads = [encode(NODE, [(f"example.org/u{i}", "")])[0] for i in range(3)]
        sender.publish(payloads)
        sender.close()
        assert wait_until(lambda: len(heard) == 3, 5)
        assert heard == payloads and r.reloads == reloads   # no accounts reload
        # A reconnect tells the subscriber again (it catches up with what it missed).
        connected.clear()
        admin = cluster.connect()
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'mailserver' AND pid <> pg_backend_pid()")
        admin.close()
        assert connected.wait(15)
    finally:
        r.close()


# -- the store tells of this process's own changes ----------------------------------------------

class StoreObservers(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="crossnode-test-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = MaildirStore(self.root / "maildirs", hostname="mx.example.test")
        self.user = self.store.create_user("example.org", "alice")
        self.account = self.store.account(self.user)
        self.changed: list[Path] = []
        self.store.change_observers.append(self.changed.append)
        self.addCleanup(self.quiet)

    def quiet(self) -> None:
        for folder in self.account.loaded_folders():
            call = folder._refresh_call
            if call is not None and call.active():
                call.cancel()
            folder._stop_settling()

    @inlineCallbacks
    def test_each_durable_change_of_this_process_is_told(self):
        inbox = self.account.folder("INBOX")
        yield inbox.refresh()
        delivery = self.store.begin_delivery([self.user, self.user / ".Sent"])
        delivery.write(b"Subject: one\r\n\r\nbody\r\n")
        yield delivery.commit()
        self.assertEqual(self.changed, [self.user, self.user / ".Sent"])
        del self.changed[:]

        yield inbox.refresh()   # found on disk (a delivery's file): not a change of its own
        self.assertEqual(self.changed, [])
        uid = inbox.uids()[0]
        yield inbox.store_flags([uid], {"\\Seen"}, "add")
        yield inbox.store_flags([uid], {"\\Seen"}, "add")   # nothing changed: nothing told
        self.assertEqual(self.changed, [self.user])

        archive = self.account.folder("Archive")
        yield inbox.copy_to([uid], archive)
        writer = archive.begin_append({"\\Flagged"})
        writer.write(b"Subject: two\r\n\r\nbody\r\n")
        yield writer.commit()
        self.assertEqual(self.changed, [self.user, archive.path, archive.path])

        yield inbox.store_flags([uid], {"\\Deleted"}, "add")
        yield inbox.expunge()
        yield archive.delete_messages(archive.uids())
        self.assertEqual(self.changed[3:], [self.user, self.user, archive.path])


class LostLocks(unittest.TestCase):
    """A reconnect's report of locks taken by another node concerns the sessions that
    held them then, not one whose own lock request is still being answered."""

    def locks(self):
        from twisted.internet.defer import Deferred

        from mailserver.crossnode import NodeMailboxLocks

        answers: list[Deferred] = []

        class Node:
            link = type("Link", (), {"try_lock": None, "unlock": None, "check": None})()

            def _key_of(self, path):
                return (path.name, False)

            def _run(self, fn, *args):
                answers.append(Deferred())
                return answers[-1]
        return NodeMailboxLocks(Node()), answers

    def test_a_loss_reported_during_an_acquire_is_not_that_sessions(self):
        locks, answers = self.locks()
        key = "/maildirs/example.org/alice"
        d = locks.acquire(key)
        locks.lost([lock_key("alice")])   # a reconnect reports it meanwhile
        answers[0].callback(True)
        self.assertTrue(self.successResultOf(d))
        self.assertTrue(locks.holds(key))

    def held(self):
        """(locks, answers, key) with alice's mailbox taken."""
        locks, answers = self.locks()
        key = "/maildirs/example.org/alice"
        d = locks.acquire(key)
        answers[0].callback(True)
        self.assertTrue(self.successResultOf(d))
        return locks, answers, key

    def test_a_loss_of_a_held_lock_stays_with_that_session_only(self):
        locks, answers, key = self.held()
        locks.lost([lock_key("alice")])
        self.assertFalse(locks.holds(key))
        locks.release(key)
        again = locks.acquire(key)
        answers[-1].callback(True)
        self.assertTrue(self.successResultOf(again))
        self.assertTrue(locks.holds(key))

    def test_confirm_asks_the_database_and_hears_of_a_loss(self):
        """QUIT's question: the link's check runs first, and a loss it reports (the
        connection had dropped, another node has the lock now) answers False."""
        locks, answers, key = self.held()
        asked = locks.confirm(key)
        self.assertNoResult(asked)
        locks.lost([lock_key("alice")])   # what the check's reconnect reported
        answers[-1].callback(None)
        self.assertFalse(self.successResultOf(asked))

    def test_confirm_while_the_database_cannot_be_asked_is_unavailable(self):
        from mailserver.crossnode_pg import LinkDown
        from mailserver.pop3.mailbox import MailboxUnavailable

        locks, answers, key = self.held()
        asked = locks.confirm(key)
        answers[-1].errback(LinkDown("database unreachable"))
        self.failureResultOf(asked, MailboxUnavailable)
        self.assertTrue(locks.holds(key))   # nothing known to be lost: QUIT deletes nothing
