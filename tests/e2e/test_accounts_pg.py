"""Two server nodes on one machine, one Maildir root and one PostgreSQL database
([accounts] url): what mailserver-admin changes is seen by both nodes at once, and while
the database is down logins and RCPT fail closed, until it is back (no restart).

Real `twistd mailserver` processes, real IMAP and SMTP clients, PostgreSQL started by
tests/pg_helper.py (skipped without it, unless MAILSERVER_REQUIRE_INTEROP=1).
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import DOMAIN, PASSWORD, ServerProcess, tls_client_context, wait_until  # noqa: E402
from imap_helpers import close_quietly, imap_connect  # noqa: E402

import pg_nodes  # noqa: E402
from pg_nodes import cluster  # noqa: E402,F401 (a fixture)
from tests.pg_helper import PgCluster, require_postgresql  # noqa: E402

ALICE = f"alice@{DOMAIN}"
# Generous: a change arrives by NOTIFY within milliseconds; this only bounds a failure.
AT_ONCE = 10.0


# Logins are retried while a change travels: no throttling in these tests.
NO_THROTTLE = {"limits": {"auth_failure_delay_after": 1000, "auth_failures_per_connection": 1000}}


def start_nodes(root: Path, url: str, count: int = 2, **accounts: object) -> list[ServerProcess]:
    """`count` nodes sharing the Maildir root and the accounts database."""
    return pg_nodes.start_nodes(root, url, count, config=NO_THROTTLE, **accounts)


@pytest.fixture
def nodes(tmp_path: Path, cluster: PgCluster) -> Iterator[list[ServerProcess]]:
    started = start_nodes(tmp_path, cluster.create_database())
    yield started
    pg_nodes.stop_nodes(started)


def login(node: ServerProcess, user: str = ALICE, password: str = PASSWORD) -> str:
    """OK, or the server's answer to LOGIN."""
    conn = imap_connect(node)
    try:
        typ, _ = conn.login(user, password)
        return typ
    except imaplib.IMAP4.error as e:
        return str(e)
    finally:
        close_quietly(conn)


def rcpt(node: ServerProcess, address: str) -> int:
    client = node.raw()
    try:
        client.greet()
        assert client.cmd("MAIL FROM:<x@remote.test>").code == 250
        return client.cmd(f"RCPT TO:<{address}>").code
    finally:
        client.cmd("QUIT")


def test_a_user_added_on_one_node_logs_in_on_both_at_once(nodes):
    a, b = nodes
    a.admin_ok("domain", "add", DOMAIN)
    a.admin_ok("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
    for node in (a, b):
        assert wait_until(lambda: login(node) == "OK", AT_ONCE), node.diagnostics()
    # Node B's own mailserver-admin sees the same accounts, and check reports the database.
    assert b.admin_ok("user", "list").stdout.split() == [ALICE]
    check = b.admin_ok("check").stdout
    assert "postgresql postgresql://postgres@127.0.0.1:" in check
    assert "answering, schema version 2 (1 domains, 1 users, 0 aliases)" in check


def test_an_alias_added_is_resolved_by_the_other_nodes_mx_at_once(nodes):
    a, b = nodes
    a.admin_ok("domain", "add", DOMAIN)
    a.admin_ok("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
    assert wait_until(lambda: rcpt(b, ALICE) == 250, AT_ONCE)
    assert rcpt(b, f"sales@{DOMAIN}") == 550
    a.admin_ok("alias", "add", f"sales@{DOMAIN}", ALICE)
    assert wait_until(lambda: rcpt(b, f"sales@{DOMAIN}") == 250, AT_ONCE)
    b.admin_ok("alias", "del", f"sales@{DOMAIN}")
    assert wait_until(lambda: rcpt(a, f"sales@{DOMAIN}") == 550, AT_ONCE)


def test_a_password_change_takes_effect_on_both(nodes):
    a, b = nodes
    a.admin_ok("domain", "add", DOMAIN)
    a.admin_ok("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
    for node in (a, b):
        assert wait_until(lambda: login(node) == "OK", AT_ONCE)
    b.admin_ok("user", "passwd", ALICE, "--password-stdin", input="changed\n")
    for node in (a, b):
        assert wait_until(lambda: login(node, password="changed") == "OK", AT_ONCE)
        assert login(node) != "OK"


def pop3_login(node: ServerProcess) -> str:
    """+OK, or the server's -ERR answer to PASS."""
    p = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    try:
        p.stls(tls_client_context())
        p.user(ALICE)
        return p.pass_(PASSWORD).decode()
    except poplib.error_proto as e:
        return str(e.args[0], "ascii", "replace") if isinstance(e.args[0], bytes) else str(e)
    finally:
        p.close()


def submission_auth(node: ServerProcess) -> int:
    """The reply code to AUTH PLAIN on submission, after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=15) as c:
        c.starttls(context=tls_client_context())
        try:
            return c.login(ALICE, PASSWORD)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


def test_database_down_fails_closed_and_recovers_without_restart(tmp_path):
    own = PgCluster(require_postgresql())   # stopped and started: not the shared one
    started: list[ServerProcess] = []
    try:
        started = start_nodes(tmp_path, own.create_database(), fail_closed_after=1)
        a, b = started
        a.admin_ok("domain", "add", DOMAIN)
        a.admin_ok("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
        for node in started:
            assert wait_until(lambda: login(node) == "OK", AT_ONCE)
        pids = [node.pid for node in started]

        own.stop()
        for node in started:
            assert wait_until(lambda: "UNAVAILABLE" in login(node), 60), node.diagnostics()
            assert rcpt(node, ALICE) == 451                    # deferred, not refused
            assert rcpt(node, "someone@remote.test") == 554    # never a relay
            assert "[SYS/TEMP]" in pop3_login(node)              # RFC 3206 4
            assert submission_auth(node) == 454                  # RFC 4954 6
        cp = a.admin("user", "list")
        assert cp.returncode == 1 and "cannot connect to the accounts database" in cp.stderr

        own.start()
        for node in started:
            assert wait_until(lambda: login(node) == "OK", 60), node.diagnostics()
            assert rcpt(node, ALICE) == 250
        assert [node.pid for node in started] == pids and all(n.running for n in started)
        log = a.log_text()
        assert "unreachable" in log and "reachable again" in log
        # Refused logins during the outage are one line each, not an error with a traceback.
        assert "accounts database unavailable" in log and "Traceback" not in log
    finally:
        for node in started:
            node.close()
        own.destroy()
