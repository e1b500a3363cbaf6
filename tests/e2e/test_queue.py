"""The outbound queue end to end: kill -9 between accept and relay, no second delivery to a
recipient that succeeded, and `mailserver-admin queue list|flush|delete` against the
running server."""

from __future__ import annotations

import re
import time

import pytest

from harness import make_message, wait_until
from outbound_helpers import Receiver, dns_server, mx_port, outbound_server, submit  # noqa: F401

ALICE = "alice@example.test"


@pytest.fixture
def port() -> int:
    return mx_port()


def queued(server) -> list[str]:
    env = server.state_dir / "queue" / "env"
    return sorted(p.stem for p in env.iterdir()) if env.exists() else []


def test_queue_survives_kill_9_and_never_repeats_a_delivery(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port)
    with Receiver("127.0.0.2", port, name="mx1.primary.test") as mx1:
        msg = make_message("<kill-1@example.test>", sender=ALICE, to="x@primary.test",
                           body=b"survives\r\n" * 1000)
        # later.test has no server yet: its recipient waits in the queue.
        assert submit(srv, ALICE, ["x@primary.test", "y@later.test"], msg) == {}
        assert mx1.wait_for(1), srv.diagnostics()
        assert wait_until(lambda: "deferred" in srv.log_text(), 10), srv.diagnostics()
        srv.kill9()
        assert len(queued(srv)) == 1
        with Receiver("127.0.0.8", port, name="mx.later.test") as later:
            srv.start()
            assert later.wait_for(1), srv.diagnostics()
            assert wait_until(lambda: not queued(srv), 10)
            time.sleep(1.5)
            assert len(later.received) == 1 and later.received[0].rcpts == ["y@later.test"]
            assert later.received[0].data.endswith(msg)
        assert len(mx1.received) == 1, "the recipient that succeeded got it once"
    assert srv.messages(ALICE) == []


def test_kill_9_right_after_the_250(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, queue={"retry_schedule": ["1h"]})
    msg = make_message("<kill-2@example.test>", sender=ALICE, to="z@later.test")
    assert submit(srv, ALICE, ["z@later.test"], msg) == {}
    srv.kill9()  # acknowledged means on disk, whatever the runner had done
    assert len(queued(srv)) == 1
    with Receiver("127.0.0.8", port, name="mx.later.test") as later:
        srv.start()
        if not later.wait_for(1, timeout=3):  # the 1 h retry: ask for it now
            srv.admin_ok("queue", "flush")
            assert later.wait_for(1), srv.diagnostics()
        assert later.received[0].data.endswith(msg)
    assert wait_until(lambda: not queued(srv), 10)


def test_admin_queue_list_flush_delete(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, queue={"retry_schedule": ["1h"]})
    ids = []
    for n in (1, 2):
        msg = make_message(f"<q-{n}@example.test>", sender=ALICE, to=f"r{n}@later.test")
        assert submit(srv, ALICE, [f"r{n}@later.test"], msg) == {}
    assert wait_until(lambda: srv.log_text().count("deferred") >= 2, 10), srv.diagnostics()
    listing = srv.admin_ok("queue", "list").stdout
    ids = re.findall(r"^([0-9A-F]+)  ", listing, re.M)
    assert len(ids) == 2 and "2 messages in the queue" in listing, listing
    assert "r1@later.test (remote) pending: connect to mx.later.test" in listing, listing
    assert "connection refused" in listing
    first = next(i for i in ids if f"r1@later.test" in listing.split(i, 1)[1].split("\n")[1])
    with Receiver("127.0.0.8", port, name="mx.later.test") as later:
        assert "deleted" in srv.admin_ok("queue", "delete", first).stdout
        assert first not in queued(srv)
        started = time.monotonic()
        srv.admin_ok("queue", "flush")
        assert later.wait_for(1, timeout=10), srv.diagnostics()
        assert time.monotonic() - started < 5
        time.sleep(1)
        assert [r.rcpts for r in later.received] == [["r2@later.test"]]
    assert wait_until(lambda: not queued(srv), 10)
    assert "0 messages in the queue" in srv.admin_ok("queue", "list").stdout
    cp = srv.admin("queue", "delete", first)
    assert cp.returncode == 1 and "no such queued message" in cp.stderr


def test_admin_queue_without_a_running_server(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, queue={"retry_schedule": ["1h"]})
    msg = make_message("<offline@example.test>", sender=ALICE, to="o@later.test")
    assert submit(srv, ALICE, ["o@later.test"], msg) == {}
    assert wait_until(lambda: "deferred" in srv.log_text(), 10)
    srv.stop()
    [queue_id] = queued(srv)
    assert queue_id in srv.admin_ok("queue", "list").stdout
    assert "server not running" in srv.admin_ok("queue", "flush").stdout
    with Receiver("127.0.0.8", port, name="mx.later.test") as later:
        srv.start()
        assert later.wait_for(1), srv.diagnostics()
