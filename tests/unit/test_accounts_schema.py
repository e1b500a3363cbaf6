"""The accounts database's schema version and migrations: a database of the first release
is upgraded at open with its domains, users, hashes, quotas and aliases; a newer one is
refused in one line; a failed migration changes nothing."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from mailserver import admin
from mailserver.accounts import Accounts, AccountsError
from mailserver.accounts_schema import MIGRATIONS, SCHEMA_VERSION, stored_version
from mailserver.passwords import verify_password
from tests.accounts_v1 import ALIASES, DOMAINS, USERS, write_v1_database


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "var" / "accounts.sqlite3"


def version_of(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT version FROM schema_version").fetchone()[0]
    finally:
        db.close()


def schema_of(path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                          "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall()
    finally:
        db.close()


def test_migrations_are_numbered_in_order():
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    assert SCHEMA_VERSION >= 2


def test_fresh_database_is_at_the_current_version(db_path):
    with Accounts(db_path):
        pass
    assert version_of(db_path) == SCHEMA_VERSION


@pytest.mark.parametrize("version_row", [True, False], ids=["version-1", "no-version-row"])
def test_first_release_database_is_upgraded_keeping_everything(db_path, version_row):
    write_v1_database(db_path, version_row=version_row)
    with Accounts(db_path) as accounts:
        assert version_of(db_path) == SCHEMA_VERSION
        assert accounts.list_domains() == sorted(DOMAINS)
        users = {u.address: u for u in accounts.list_users()}
        assert set(users) == {row[0] for row in USERS}
        for address, local, domain, password_hash, quota in USERS:
            user = users[address]
            assert (user.localpart, user.domain) == (local, domain)
            assert user.password_hash == password_hash   # kept byte for byte
            assert verify_password(user.password_hash, "secret")
            assert user.quota == (quota or None)         # 0 always meant "no limit"
        assert dict(accounts.list_aliases()) == {
            "team@example.test": ["alice@example.test", "bob@example.test",
                                  "friend@remote.test"],
            "@example.net": ["carol@example.test"]}
        # Resolution works on the upgraded tables.
        team = accounts.resolve("team@example.test")
        assert sorted(u.address for u in team.local) == ["alice@example.test",
                                                         "bob@example.test"]
        assert team.remote == ("friend@remote.test",)
        assert [u.address for u in accounts.resolve("anyone@example.net").local] == [
            "carol@example.test"]
        # And the database takes changes.
        accounts.add_user("dave@example.test", "{PLAIN}x", 4096)
        accounts.add_alias("team@example.test", ["dave@example.test"])
    assert len(ALIASES) == 4


def test_upgraded_and_fresh_databases_have_the_same_schema(tmp_path):
    old, fresh = tmp_path / "old.sqlite3", tmp_path / "fresh.sqlite3"
    write_v1_database(old)
    with Accounts(old), Accounts(fresh):
        pass
    assert schema_of(old) == schema_of(fresh)


def test_upgraded_tables_refuse_rows_the_server_would_misread(db_path):
    write_v1_database(db_path)
    with Accounts(db_path):
        pass
    db = sqlite3.connect(db_path)
    try:
        bad_rows = [
            ("INSERT INTO users VALUES ('x@example.test', 'y', 'example.test', '{PLAIN}a', NULL)"),
            ("INSERT INTO users VALUES ('x@example.test', 'x', 'example.test', '', NULL)"),
            ("INSERT INTO users VALUES ('x@example.test', 'x', 'example.test', "
             "'{PLAIN}a' || char(10), NULL)"),
            ("INSERT INTO users VALUES ('x@example.test', 'x', 'example.test', '{PLAIN}a', 0)"),
            ("INSERT INTO users VALUES ('x@example.test', 'x', 'example.test', '{PLAIN}a', '1G')"),
            ("INSERT INTO aliases VALUES ('a@example.net', 'example.test', 'b@example.test', 0)"),
            ("INSERT INTO aliases VALUES ('a@example.test', 'example.test', 'nobody', 0)"),
        ]
        for sql in bad_rows:
            with pytest.raises(sqlite3.IntegrityError):
                db.execute(sql)
        db.execute("INSERT INTO users VALUES ('x@example.test', 'x', 'example.test', "
                   "'{PLAIN}a', 1024)")
        db.execute("INSERT INTO aliases VALUES ('@example.test', 'example.test', "
                   "'x@example.test', 0)")
    finally:
        db.close()


def test_failed_migration_leaves_the_previous_version_untouched(db_path):
    """A row the new constraints refuse (written by hand): the upgrade stops in one line,
    the database stays at version 1 with every row, and the old tables still work."""
    write_v1_database(db_path, extra_users=[("odd@example.test", "even", "example.test",
                                             "{PLAIN}x", None)])
    before = schema_of(db_path)
    with pytest.raises(AccountsError) as caught:
        Accounts(db_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "upgrade to schema version 2" in message and "unchanged at version 1" in message
    assert version_of(db_path) == 1
    assert schema_of(db_path) == before
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("SELECT count(*) FROM users").fetchone()[0] == len(USERS) + 1
    finally:
        db.close()


def test_newer_database_is_refused_naming_both_versions(db_path):
    with Accounts(db_path):
        pass
    db = sqlite3.connect(db_path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    db.commit()
    db.close()
    with pytest.raises(AccountsError) as caught:
        Accounts(db_path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"schema version {SCHEMA_VERSION + 5}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert version_of(db_path) == SCHEMA_VERSION + 5   # left alone


def test_admin_tool_refuses_a_newer_database_in_one_line(tmp_path, capsys):
    config = tmp_path / "mailserver.toml"
    config.write_text('[server]\nstate_dir = "var"\n[storage]\nmaildir_root = "maildirs"\n')
    with Accounts(tmp_path / "var" / "accounts.sqlite3"):
        pass
    db = sqlite3.connect(tmp_path / "var" / "accounts.sqlite3")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    assert admin.main(["--config", str(config), "domain", "list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mailserver-admin: error: ")
    assert "schema version 99" in err[0] and f"up to {SCHEMA_VERSION}" in err[0]


def test_admin_tool_upgrades_a_first_release_database(tmp_path, capsys):
    config = tmp_path / "mailserver.toml"
    config.write_text('[server]\nstate_dir = "var"\n[storage]\nmaildir_root = "maildirs"\n')
    write_v1_database(tmp_path / "var" / "accounts.sqlite3")
    assert admin.main(["--config", str(config), "user", "list"]) == 0
    out = capsys.readouterr().out
    assert "bob@example.test  quota=2048" in out and "alice@example.test" in out
    assert version_of(tmp_path / "var" / "accounts.sqlite3") == SCHEMA_VERSION


def test_two_processes_opening_at_once_upgrade_once(db_path):
    """Each migration takes the write lock and looks at the version again inside it."""
    write_v1_database(db_path)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_it():
        try:
            barrier.wait()
            with Accounts(db_path) as accounts:
                assert len(accounts.list_users()) == len(USERS)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert version_of(db_path) == SCHEMA_VERSION
    db = sqlite3.connect(db_path)
    try:
        assert stored_version(db) == SCHEMA_VERSION
        assert db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    finally:
        db.close()
