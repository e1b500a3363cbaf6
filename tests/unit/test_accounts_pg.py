"""Accounts on PostgreSQL, against a throwaway cluster (tests/pg_helper.py).

The behaviour tests of test_accounts.py run here again against both PostgreSQL
implementations: `PgAccounts` (what mailserver-admin uses: every call a query) and
`ReplicatedAccounts` (the server's: reads from an in-memory copy that NOTIFY refreshes).
Then what only PostgreSQL does: schema and constraints, changes seen by a running
replica at once (also from SQL typed by hand), a NOTIFY storm as few reloads, immutable
snapshots, and fail-closed logins while the database is down.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest
from twisted.application.service import IService
from twisted.cred.credentials import UsernamePassword
from zope.interface.verify import verifyObject

from mailserver import accounts_schema
from mailserver.accounts import (Accounts, AccountsError, AccountsUnavailable, IAccounts,
                                 User, open_accounts)
from mailserver.config import ConfigError, parse_config
from tests.pg_helper import PgCluster, require_postgresql, wait_until
from tests.unit import test_accounts as base

HASH = "{PLAIN}secret"


# -- the cluster and the backends ----------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    c = PgCluster(require_postgresql())
    yield c
    c.destroy()


@pytest.fixture
def pg_url(cluster) -> str:
    """Tables of their own for each test: a schema (a database copies megabytes)."""
    return cluster.create_schema()


def call_now(f, *args):
    """The replica's hand-over without a running reactor: at once, in the listener."""
    f(*args)


def replica(url: str, **kwargs):
    from mailserver.accounts_replica import ReplicatedAccounts

    r = ReplicatedAccounts(url, call_in_reactor=call_now, **kwargs)
    r.startService()
    assert wait_until(lambda: r.reloads > 0), "the listener never loaded the tables"
    return r


class Synced:
    """A replica whose writes return once the replica holds them (it learns of them by
    NOTIFY, a moment later), as the behaviour tests expect of the lookup that follows."""

    WRITES = {"add_domain", "del_domain", "add_user", "set_password",
              "replace_password_hash", "del_user", "add_alias", "del_alias"}

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name not in self.WRITES:
            return attr

        def write(*args, **kwargs):
            result = attr(*args, **kwargs)
            assert self.inner.sync(), "the replica did not catch up"
            return result
        return write


def open_backend(kind: str, tmp_path: Path, url: str | None):
    if kind == "sqlite":
        return Accounts(tmp_path / "accounts.sqlite3")
    from mailserver.accounts_pg import PgAccounts

    if kind == "postgresql":
        return PgAccounts(url)
    return Synced(replica(url))


@pytest.fixture(params=["postgresql", "replica"])
def accounts(request, tmp_path):
    a = open_backend(request.param, tmp_path, request.getfixturevalue("pg_url"))
    a.add_domain("example.org")
    a.add_domain("example.net")
    yield a
    a.close()


@pytest.fixture(params=["sqlite", "postgresql", "replica"])
def any_accounts(request, tmp_path):
    url = request.getfixturevalue("pg_url") if request.param != "sqlite" else None
    a = open_backend(request.param, tmp_path, url)
    yield a
    a.close()


# The behaviour tests of test_accounts.py that use only these fixtures run here on both
# PostgreSQL backends (the SQLite ones there).
populated = base.populated
for _name, _test in list(vars(base).items()):
    if _name.startswith("test_") and callable(_test) and \
            set(inspect.signature(_test).parameters) <= {"accounts", "populated"}:
        globals()[_name] = _test
del _name, _test


# -- the interface -------------------------------------------------------------------------

def test_every_backend_provides_the_interface(any_accounts):
    inner = getattr(any_accounts, "inner", any_accounts)
    assert verifyObject(IAccounts, inner)
    assert inner.available()


def test_listings_come_out_in_the_same_order_everywhere(any_accounts):
    # Bytewise order, as SQLite's: a collation that skips punctuation would differ.
    for domain in ("ab.example", "a-b.example", "a.example", "b.example"):
        any_accounts.add_domain(domain)
        any_accounts.add_user(f"x-y@{domain}", HASH)
        any_accounts.add_user(f"xy@{domain}", HASH)
        any_accounts.add_alias(f"@{domain}", [f"xy@{domain}"])
    domains = ["a-b.example", "a.example", "ab.example", "b.example"]
    assert any_accounts.list_domains() == domains
    assert [u.address for u in any_accounts.list_users()] == [
        address for d in domains for address in (f"x-y@{d}", f"xy@{d}")]
    assert [source for source, _ in any_accounts.list_aliases()] == [f"@{d}" for d in domains]


def test_may_send_as(any_accounts):
    a = any_accounts
    a.add_domain("example.org")
    for name in ("alice", "bob"):
        a.add_user(f"{name}@example.org", HASH)
    a.add_alias("sales@example.org", ["alice@example.org", "ext@remote.test"])
    a.add_alias("@example.org", ["alice@example.org"])
    assert a.may_send_as("alice@example.org", "Alice@example.org")
    assert a.may_send_as("alice@example.org", "alice+news@example.org")
    assert a.may_send_as("alice@example.org", "sales@example.org")
    assert a.may_send_as("alice@example.org", "sales+web@example.org")
    assert not a.may_send_as("alice@example.org", "bob@example.org")
    assert not a.may_send_as("bob@example.org", "sales@example.org")
    assert not a.may_send_as("alice@example.org", "anything@example.org")   # catch-all
    assert not a.may_send_as("alice@example.org", "alice@remote.test")
    assert not a.may_send_as("alice@example.org", "alice@[192.0.2.1]")


# -- schema ----------------------------------------------------------------------------------

def test_schema_is_created_at_the_sqlite_version(pg_url, cluster):
    from mailserver.accounts_pg import PgAccounts
    from mailserver.accounts_pg_schema import SCHEMA_VERSION

    assert SCHEMA_VERSION == accounts_schema.SCHEMA_VERSION
    with PgAccounts(pg_url) as a:
        assert a.schema_version() == SCHEMA_VERSION
    with PgAccounts(pg_url) as a:   # opening again changes nothing
        assert a.schema_version() == SCHEMA_VERSION
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]


def test_constraints_refuse_rows_written_by_hand(pg_url):
    import psycopg
    from mailserver.accounts_pg import PgAccounts

    PgAccounts(pg_url).close()
    bad = [
        ("INSERT INTO users VALUES ('a@example.org', 'b', 'example.org', 'h', NULL)",),
        ("INSERT INTO users VALUES ('a@example.org', 'a', 'example.org', '', NULL)",),
        ("INSERT INTO users VALUES ('a@example.org', 'a', 'example.org', E'x\\ny', NULL)",),
        ("INSERT INTO users VALUES ('a@example.org', 'a', 'example.org', 'h', 0)",),
        ("INSERT INTO users VALUES ('a@example.com', 'a', 'example.com', 'h', NULL)",),
        ("INSERT INTO aliases VALUES ('x@example.net', 'example.org', 'a@b', 0)",),
        ("INSERT INTO aliases VALUES ('x@example.org', 'example.org', 'nobody', 0)",),
        ("INSERT INTO aliases VALUES ('x@example.org', 'example.org', 'a@b', -1)",),
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO domains VALUES ('example.org')")
        for (statement,) in bad:
            with pytest.raises(psycopg.errors.IntegrityError):
                conn.execute(statement)
        conn.execute("INSERT INTO users VALUES ('a@example.org', 'a', 'example.org', 'h', 5)")


def test_newer_schema_is_refused(pg_url):
    import psycopg
    from mailserver.accounts_pg import PgAccounts
    from mailserver.accounts_pg_schema import SCHEMA_VERSION

    PgAccounts(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(AccountsError, match="newer release"):
        PgAccounts(pg_url)


def test_nodes_opening_a_new_database_together_migrate_it_once(pg_url):
    from mailserver.accounts_pg import PgAccounts

    results: list[object] = []

    def open_one() -> None:
        try:
            with PgAccounts(pg_url) as a:
                results.append(a.schema_version())
        except Exception as e:  # reported below
            results.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [accounts_schema.SCHEMA_VERSION] * 4


# -- the replica -----------------------------------------------------------------------------

def test_admin_changes_reach_a_running_replica(pg_url):
    from mailserver.accounts_pg import PgAccounts

    server = replica(pg_url)
    admin = PgAccounts(pg_url)
    try:
        assert server.resolve("alice@example.org").kind == "nonlocal"
        admin.add_domain("example.org")
        admin.add_user("alice@example.org", HASH)
        # No sync here: NOTIFY alone brings the change.
        assert wait_until(lambda: server.resolve("alice@example.org").kind == "ok")
        admin.set_password("alice@example.org", "{PLAIN}changed")
        assert wait_until(lambda: server.get_user("alice@example.org").password_hash
                          == "{PLAIN}changed")
        admin.add_alias("sales@example.org", ["alice@example.org"])
        assert wait_until(lambda: server.resolve("sales@example.org").kind == "ok")
        admin.del_alias("sales@example.org")
        admin.del_user("alice@example.org")
        assert wait_until(lambda: server.get_user("alice@example.org") is None)
        assert server.resolve("sales@example.org").kind == "unknown"
    finally:
        admin.close()
        server.close()


def test_sql_typed_by_hand_notifies_too(pg_url):
    import psycopg

    server = replica(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO domains (name) VALUES ('example.org')")
            conn.execute("INSERT INTO users VALUES "
                         "('bob@example.org', 'bob', 'example.org', '{PLAIN}x', NULL)")
        assert wait_until(lambda: server.get_user("bob@example.org") is not None)
        assert server.is_local_domain("Example.ORG")
    finally:
        server.close()


def test_rows_loaded_without_a_notify_are_seen_at_the_next_periodic_reload(pg_url,
                                                                           monkeypatch):
    """pg_restore loads rows with COPY and makes the triggers last: no NOTIFY at all."""
    import psycopg

    from mailserver import accounts_replica

    monkeypatch.setattr(accounts_replica, "RELOAD_EVERY", 1.0)
    server = replica(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE domains DISABLE TRIGGER USER")
            conn.execute("ALTER TABLE users DISABLE TRIGGER USER")
            conn.execute("INSERT INTO domains (name) VALUES ('example.org')")
            conn.execute("INSERT INTO users VALUES "
                         "('eve@example.org', 'eve', 'example.org', '{PLAIN}x', NULL)")
            conn.execute("ALTER TABLE domains ENABLE TRIGGER USER")
            conn.execute("ALTER TABLE users ENABLE TRIGGER USER")
        assert wait_until(lambda: server.get_user("eve@example.org") is not None, timeout=10)
    finally:
        server.close()


def test_a_reload_stuck_behind_a_lock_fails_closed_then_recovers(pg_url, monkeypatch):
    """A session holding a table lock (ALTER TABLE, VACUUM FULL, LOCK TABLE typed by hand)
    once kept the listener waiting for ever, the stale copy answering all along."""
    import psycopg

    from mailserver import accounts_replica

    monkeypatch.setattr(accounts_replica, "STATEMENT_TIMEOUT", "500ms")
    server = replica(pg_url, fail_closed_after=0.5)
    locker = psycopg.connect(pg_url)
    try:
        locker.execute("LOCK TABLE aliases IN ACCESS EXCLUSIVE MODE")   # a transaction held
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_notify('accounts_changed', 'x')")
        assert wait_until(lambda: not server.available(), timeout=15)
        locker.rollback()
        assert wait_until(server.available, timeout=15)
    finally:
        locker.close()
        server.close()


def test_a_notify_storm_is_one_reload(pg_url):
    import psycopg

    server = replica(pg_url)
    try:
        assert server.sync()
        before = server.reloads
        with psycopg.connect(pg_url, autocommit=True) as conn:
            with conn.transaction():   # 500 notifications, delivered together at commit
                conn.execute("SELECT pg_notify('accounts_changed', 'storm ' || i) "
                             "FROM generate_series(1, 500) AS i")
        assert server.sync()
        # The storm and the sync's own notification: a reload or two, not 500.
        assert 1 <= server.reloads - before <= 3
    finally:
        server.close()


def test_snapshots_are_swapped_whole_never_changed(pg_url):
    from mailserver.accounts_pg import PgAccounts

    server = replica(pg_url)
    admin = PgAccounts(pg_url)
    try:
        admin.add_domain("example.org")
        assert server.sync()
        old = server._snapshot
        admin.add_user("carol@example.org", HASH)
        assert server.sync()
        assert server._snapshot is not old
        assert old.user("carol@example.org") is None
        assert server.get_user("carol@example.org") is not None
        with pytest.raises(TypeError):
            old.users["x@example.org"] = None   # type: ignore[index]
    finally:
        admin.close()
        server.close()


def test_a_write_stuck_behind_a_lock_fails_within_the_bound(pg_url, monkeypatch):
    """A running server's write (a login's hash upgrade) waited for ever while someone
    held a lock on users (CREATE INDEX takes SHARE), reads going on meanwhile."""
    import time

    import psycopg

    from mailserver import accounts_replica

    monkeypatch.setattr(accounts_replica, "STATEMENT_TIMEOUT", "500ms")
    server = Synced(replica(pg_url))
    locker = psycopg.connect(pg_url)
    try:
        server.add_domain("example.org")
        server.add_user("alice@example.org", "{PLAIN}old")
        locker.execute("LOCK TABLE users IN SHARE MODE")   # a transaction held
        started = time.monotonic()
        with pytest.raises(AccountsError):
            server.inner.replace_password_hash("alice@example.org", "{PLAIN}old",
                                               "$argon2id$new")
        assert time.monotonic() - started < 10
        locker.rollback()
        assert server.inner.replace_password_hash("alice@example.org", "{PLAIN}old",
                                                  "$argon2id$new")
    finally:
        locker.close()
        server.inner.close()


def test_hash_upgrade_from_a_thread_comes_back(pg_url):
    server = Synced(replica(pg_url))
    try:
        server.add_domain("example.org")
        server.add_user("alice@example.org", "{PLAIN}old")
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(server.inner.replace_password_hash(
            "alice@example.org", "{PLAIN}old", "$argon2id$new")))
        t.start()
        t.join()
        assert result == [True]
        assert wait_until(lambda: server.get_user("alice@example.org").password_hash
                          == "$argon2id$new")
    finally:
        server.close()


def test_database_down_fails_closed_after_the_grace_then_recovers():
    """pg_ctl stop: the last copy answers during the grace period, then logins fail closed;
    pg_ctl start: the replica reconnects and reloads, and changes flow again."""
    from mailserver.accounts_pg import PgAccounts
    from mailserver.auth import AccountsChecker

    own = PgCluster(require_postgresql())   # stopped and started: not the shared one
    try:
        url = own.create_database()
        now = [1000.0]
        server = replica(url, fail_closed_after=30.0, clock=lambda: now[0])
        admin = PgAccounts(url)
        admin.add_domain("example.org")
        admin.add_user("alice@example.org", HASH)
        assert server.sync()
        admin.close()
        checker = AccountsChecker(server)

        own.stop()
        assert wait_until(lambda: server._lost_since is not None, timeout=30)
        assert server.available()                              # within the grace period
        assert server.get_user("alice@example.org") is not None
        now[0] += 31
        assert not server.available()
        assert server.get_user("alice@example.org") is not None  # reads still answer...
        failures: list[object] = []
        checker.requestAvatarId(UsernamePassword(b"alice@example.org", b"secret")) \
            .addErrback(failures.append)
        assert failures and failures[0].check(AccountsUnavailable)   # ...logins do not
        with pytest.raises(AccountsError, match="cannot connect"):
            PgAccounts(url)

        own.start()
        assert wait_until(server.available, timeout=30)
        with PgAccounts(url) as admin:
            admin.add_user("bob@example.org", HASH)
        assert wait_until(lambda: server.get_user("bob@example.org") is not None)
        server.close()
    finally:
        own.destroy()


# -- configuration and the factory -----------------------------------------------------------

def test_accounts_config(tmp_path):
    path = tmp_path / "m.toml"
    config = parse_config({}, path)
    assert config.accounts.url == "" and config.accounts.fail_closed_after == 30.0
    config = parse_config({"accounts": {"url": "postgres://mail:hunter2@db.example/mail",
                                        "fail_closed_after": "1m"}}, path)
    assert config.accounts.fail_closed_after == 60.0
    assert "hunter2" not in repr(config)
    for bad in ("mysql://mail:hunter2@db/mail", "postgresql://db/mail name", 5):
        with pytest.raises(ConfigError, match="accounts.url") as e:
            parse_config({"accounts": {"url": bad}}, path)
        assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="accounts.fail_closed_after"):
        parse_config({"accounts": {"fail_closed_after": 0}}, path)
    with pytest.raises(ConfigError, match="accounts.size"):
        parse_config({"accounts": {"size": 1}}, path)


def test_open_accounts_picks_the_backend(tmp_path, pg_url):
    from mailserver.accounts_pg import PgAccounts
    from mailserver.accounts_replica import ReplicatedAccounts

    path = tmp_path / "m.toml"
    with open_accounts(parse_config({"server": {"state_dir": "var"}}, path)) as a:
        assert isinstance(a, Accounts) and a.path == tmp_path / "var" / "accounts.sqlite3"
    config = parse_config({"server": {"state_dir": "pgvar"}, "accounts": {"url": pg_url}},
                          path)
    with open_accounts(config) as a:
        assert isinstance(a, PgAccounts)
    with open_accounts(config, server=True) as a:
        assert isinstance(a, ReplicatedAccounts) and IService.providedBy(a)
    assert not (tmp_path / "pgvar").exists()   # no SQLite file beside PostgreSQL


def test_errors_never_show_the_password(cluster):
    from mailserver.accounts_pg import PgAccounts

    url = cluster.url("postgres", password="hunter2").replace(str(cluster.port), "1")
    with pytest.raises(AccountsError) as e:
        PgAccounts(url)
    message = str(e.value)
    assert "hunter2" not in message and "postgres:***@127.0.0.1:1/" in message
    assert "\n" not in message


def test_admin_check_reports_the_database(tmp_path, cluster, pg_url, capsys):
    from mailserver import admin

    path = tmp_path / "m.toml"
    listen = "".join(f'{name} = ""\n' for name in (
        "smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s", "autoconfig",
        "autoconfig_http"))
    url = pg_url.replace("postgres@", "postgres:hunter2@")
    path.write_text(f'[accounts]\nurl = "{url}"\n[listen]\n{listen}')
    assert admin.main(["--config", str(path), "domain", "add", "example.org"]) == 0
    assert admin.main(["--config", str(path), "check"]) == 0
    out, err = capsys.readouterr()
    line = next(x for x in out.splitlines() if x.startswith("accounts"))
    assert f"postgresql {url.replace('hunter2', '***')}: answering, schema version" in line
    assert "1 domains, 0 users, 0 aliases" in line
    assert "hunter2" not in out + err
    path.write_text(f'[accounts]\nurl = "{url.replace(str(cluster.port), "1")}"\n'
                    f'[listen]\n{listen}')
    assert admin.main(["--config", str(path), "check"]) == 1
    out, err = capsys.readouterr()
    assert "NOT ANSWERING" in out and "cannot connect" in err
    assert "hunter2" not in out + err


def test_backup_and_restore_refuse_postgresql(tmp_path):
    from mailserver.backup import BackupError, backup
    from mailserver.restore import restore

    config = parse_config({"server": {"state_dir": "var"},
                           "accounts": {"url": "postgresql://mail@db.example/mail"}},
                          tmp_path / "m.toml")
    with pytest.raises(BackupError, match="pg_dump"):
        backup(config, tmp_path / "backup")
    with pytest.raises(BackupError, match="pg_dump"):
        restore(config, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()


def test_user_is_frozen_and_hides_its_hash_in_the_replica(pg_url):
    server = Synced(replica(pg_url))
    try:
        server.add_domain("example.org")
        server.add_user("alice@example.org", "{PLAIN}topsecret", quota=10)
        user = server.get_user("alice@example.org")
        assert user == User("alice@example.org", "alice", "example.org", "{PLAIN}topsecret", 10)
        assert "topsecret" not in repr(user)
    finally:
        server.close()
