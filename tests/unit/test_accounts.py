"""Accounts database: CRUD, recipient resolution, and sharing the file with the admin tool."""

import sqlite3
import stat
import threading

import pytest

from mailserver.accounts import (MAX_ALIAS_DEPTH, SCHEMA_VERSION, Accounts, AccountsError,
                                 Resolution, User)

HASH = "{PLAIN}secret"


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "accounts.sqlite3"


@pytest.fixture
def accounts(db_path):
    a = Accounts(db_path)
    a.add_domain("example.org")
    a.add_domain("example.net")
    yield a
    a.close()


def addresses(resolution: Resolution) -> list[str]:
    return sorted(u.address for u in resolution.local)


# -- opening -------------------------------------------------------------------------------

def test_creates_private_dir_and_file_in_wal_mode(db_path):
    with Accounts(db_path):
        pass
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()


def test_from_config(tmp_path):
    from mailserver.config import parse_config
    config = parse_config({"server": {"state_dir": "var"}}, tmp_path / "m.toml")
    with Accounts.from_config(config) as a:
        assert a.path == tmp_path / "var" / "accounts.sqlite3"
    assert (tmp_path / "var" / "accounts.sqlite3").is_file()


def test_reopen_keeps_data(db_path):
    with Accounts(db_path) as a:
        a.add_domain("example.org")
    with Accounts(db_path) as a:
        assert a.list_domains() == ["example.org"]


def test_newer_schema_is_refused(db_path):
    with Accounts(db_path):
        pass
    db = sqlite3.connect(db_path)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(AccountsError, match="newer"):
        Accounts(db_path)


def test_unopenable_path_is_an_accounts_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AccountsError, match="cannot"):
        Accounts(blocker / "sub" / "accounts.sqlite3")


# -- domains -----------------------------------------------------------------------------

def test_domains_crud(accounts):
    assert accounts.add_domain("Bücher.Example") == "xn--bcher-kva.example"
    assert accounts.list_domains() == ["example.net", "example.org", "xn--bcher-kva.example"]
    assert accounts.is_local_domain("EXAMPLE.org")
    assert accounts.is_local_domain("bücher.example")
    assert not accounts.is_local_domain("example.com")
    assert not accounts.is_local_domain("[192.0.2.1]")
    assert not accounts.is_local_domain("bad domain")
    accounts.del_domain("example.net")
    assert accounts.list_domains() == ["example.org", "xn--bcher-kva.example"]


def test_domain_errors(accounts):
    with pytest.raises(AccountsError, match="already exists"):
        accounts.add_domain("Example.org")
    with pytest.raises(AccountsError, match="no such domain"):
        accounts.del_domain("example.com")
    with pytest.raises(AccountsError, match="bad domain"):
        accounts.add_domain("not a domain")
    with pytest.raises(AccountsError, match="bad domain"):
        accounts.add_domain("[192.0.2.1]")


def test_domain_with_users_or_aliases_cannot_be_deleted(accounts):
    accounts.add_user("alice@example.org", HASH)
    with pytest.raises(AccountsError, match="not empty"):
        accounts.del_domain("example.org")
    accounts.del_user("alice@example.org")
    accounts.add_alias("@example.org", ["bob@example.com"])
    with pytest.raises(AccountsError, match="not empty"):
        accounts.del_domain("example.org")
    accounts.del_alias("@example.org")
    accounts.del_domain("example.org")


# -- users -------------------------------------------------------------------------------

def test_users_crud(accounts):
    user = accounts.add_user("Alice@Example.ORG", HASH, quota=1024)
    assert user == User("alice@example.org", "alice", "example.org", HASH, 1024)
    assert accounts.get_user("ALICE@example.org") == user
    assert accounts.get_user("nobody@example.org") is None
    assert accounts.get_user("not an address") is None
    accounts.add_user("bob@example.net", HASH)
    accounts.add_user("carol@example.org", HASH, quota=0)
    assert [u.address for u in accounts.list_users()] == [
        "bob@example.net", "alice@example.org", "carol@example.org"]
    assert [u.address for u in accounts.list_users("Example.org")] == [
        "alice@example.org", "carol@example.org"]
    assert accounts.get_user("carol@example.org").quota is None  # 0: no limit
    accounts.set_password("alice@example.org", "{PLAIN}new")
    assert accounts.get_user("alice@example.org").password_hash == "{PLAIN}new"
    assert accounts.del_user("Alice@example.org").address == "alice@example.org"
    assert accounts.get_user("alice@example.org") is None


def test_user_repr_hides_the_hash(accounts):
    user = accounts.add_user("alice@example.org", "{PLAIN}topsecret")
    assert "topsecret" not in repr(user)


def test_user_errors(accounts):
    with pytest.raises(AccountsError, match="no such domain"):
        accounts.add_user("alice@example.com", HASH)
    accounts.add_user("alice@example.org", HASH)
    with pytest.raises(AccountsError, match="already exists"):
        accounts.add_user("ALICE@example.org", HASH)
    with pytest.raises(AccountsError, match="bad address"):
        accounts.add_user("user%other@example.org", HASH)
    with pytest.raises(AccountsError, match="domain literal"):
        accounts.add_user("a@[192.0.2.1]", HASH)
    with pytest.raises(AccountsError, match="empty password hash"):
        accounts.add_user("bob@example.org", "")
    with pytest.raises(AccountsError, match="line breaks"):
        accounts.add_user("bob@example.org", "{PLAIN}a\nb")
    with pytest.raises(AccountsError, match="quota"):
        accounts.add_user("bob@example.org", HASH, quota=-1)
    with pytest.raises(AccountsError, match="no such user"):
        accounts.set_password("bob@example.org", HASH)
    with pytest.raises(AccountsError, match="no such user"):
        accounts.del_user("bob@example.org")


def test_replace_password_hash_is_compare_and_set(accounts):
    accounts.add_user("alice@example.org", "{PLAIN}old")
    assert not accounts.replace_password_hash("alice@example.org", "{PLAIN}other", "$new")
    assert accounts.replace_password_hash("alice@example.org", "{PLAIN}old", "$new")
    assert accounts.get_user("alice@example.org").password_hash == "$new"


# -- aliases -----------------------------------------------------------------------------

def test_aliases_crud(accounts):
    assert accounts.add_alias("Sales@Example.org", ["Alice@example.org", "bob@remote.test"]) == [
        "alice@example.org", "bob@remote.test"]
    # Adding to an existing alias appends new targets and ignores repeats.
    assert accounts.add_alias("sales@example.org", ["bob@remote.test", "carol@example.org"]) == [
        "alice@example.org", "bob@remote.test", "carol@example.org"]
    accounts.add_alias("@example.net", ["postmaster@example.org"])
    assert accounts.list_aliases() == [
        ("@example.net", ["postmaster@example.org"]),
        ("sales@example.org", ["alice@example.org", "bob@remote.test", "carol@example.org"]),
    ]
    accounts.del_alias("SALES@example.org")
    assert accounts.list_aliases() == [("@example.net", ["postmaster@example.org"])]


def test_remote_alias_targets_keep_the_case_of_their_local_part(accounts):
    """RFC 5321 2.4: only the remote domain may interpret its local parts; ours are
    case-insensitive and kept lower-case."""
    accounts.add_user("carol@example.org", "{PLAIN}x")
    assert accounts.add_alias("team@example.org", [
        "John.Smith@Remote.TEST", "john.smith@remote.test", "Carol@Example.org"]) == [
        "John.Smith@remote.test", "john.smith@remote.test", "carol@example.org"]
    res = accounts.resolve("team@example.org")
    assert res.remote == ("John.Smith@remote.test", "john.smith@remote.test")
    assert [u.address for u in res.local] == ["carol@example.org"]
    # The remote domain hosted here later: the target is looked up as ours are.
    accounts.add_domain("remote.test")
    accounts.add_user("john.smith@remote.test", "{PLAIN}x")
    res = accounts.resolve("team@example.org")
    assert res.remote == ()
    assert sorted(u.address for u in res.local) == ["carol@example.org",
                                                     "john.smith@remote.test"]


def test_alias_errors(accounts):
    with pytest.raises(AccountsError, match="no such domain"):
        accounts.add_alias("x@example.com", ["a@example.org"])
    with pytest.raises(AccountsError, match="no such domain"):
        accounts.add_alias("@example.com", ["a@example.org"])
    with pytest.raises(AccountsError, match="at least one target"):
        accounts.add_alias("x@example.org", [])
    with pytest.raises(AccountsError, match="bad alias target"):
        accounts.add_alias("x@example.org", ["user%relay@example.org"])
    with pytest.raises(AccountsError, match="bad alias target"):
        accounts.add_alias("x@example.org", ["@example.net"])
    with pytest.raises(AccountsError, match="bad alias target"):
        accounts.add_alias("x@example.org", ["root@[192.0.2.1]"])
    with pytest.raises(AccountsError, match="no such alias"):
        accounts.del_alias("x@example.org")


# -- resolution --------------------------------------------------------------------------

@pytest.fixture
def populated(accounts):
    for name in ("alice", "bob", "carol", "postmaster"):
        accounts.add_user(f"{name}@example.org", HASH)
    return accounts


def test_resolve_nonlocal_and_unknown(populated):
    assert populated.resolve("someone@example.com") == Resolution("nonlocal")
    assert populated.resolve("postmaster@[192.0.2.1]").kind == "nonlocal"
    assert populated.resolve("nobody@example.org") == Resolution("unknown")
    assert populated.resolve("not an address").kind == "unknown"


def test_resolve_sees_changes_made_here_and_by_another_process(populated, db_path):
    # resolve() remembers its answers; a change must still be seen at the next RCPT.
    assert populated.resolve("dave@example.org").kind == "unknown"
    populated.add_user("dave@example.org", HASH)             # this connection
    assert addresses(populated.resolve("dave@example.org")) == ["dave@example.org"]
    with Accounts(db_path) as admin:                         # another one (mailserver-admin)
        admin.add_alias("dave@example.org", ["bob@example.org"])
    assert addresses(populated.resolve("dave@example.org")) == ["bob@example.org"]
    with Accounts(db_path) as admin:
        admin.del_alias("dave@example.org")
        admin.del_user("dave@example.org")
    assert populated.resolve("dave@example.org").kind == "unknown"


def test_resolve_user_case_insensitive(populated):
    r = populated.resolve("ALICE@Example.ORG")
    assert r.kind == "ok"
    assert addresses(r) == ["alice@example.org"]
    assert r.remote == ()


def test_resolve_exact_alias_wins_over_user(populated):
    populated.add_alias("alice@example.org", ["bob@example.org"])
    assert addresses(populated.resolve("alice@example.org")) == ["bob@example.org"]


def test_resolve_alias_naming_itself_keeps_a_copy(populated):
    populated.add_alias("alice@example.org", ["alice@example.org", "alice@phone.test"])
    r = populated.resolve("alice@example.org")
    assert addresses(r) == ["alice@example.org"]
    assert r.remote == ("alice@phone.test",)


def test_resolve_subaddress(populated):
    assert addresses(populated.resolve("alice+lists@example.org")) == ["alice@example.org"]
    populated.add_alias("sales@example.org", ["bob@example.org"])
    assert addresses(populated.resolve("sales+web@example.org")) == ["bob@example.org"]
    # An exact user or alias with the '+' in it wins over the base.
    populated.add_user("carol+work@example.org", HASH)
    assert addresses(populated.resolve("carol+work@example.org")) == ["carol+work@example.org"]
    assert populated.resolve("nobody+tag@example.org").kind == "unknown"


def test_resolve_subaddress_of_self_alias_keeps_copy(populated):
    populated.add_alias("alice@example.org", ["alice@example.org", "bob@example.org"])
    assert addresses(populated.resolve("alice+x@example.org")) == [
        "alice@example.org", "bob@example.org"]


def test_resolve_catch_all_is_last(populated):
    populated.add_alias("@example.org", ["postmaster@example.org"])
    assert addresses(populated.resolve("anything@example.org")) == ["postmaster@example.org"]
    assert addresses(populated.resolve("bob@example.org")) == ["bob@example.org"]
    assert addresses(populated.resolve("bob+tag@example.org")) == ["bob@example.org"]


def test_resolve_catch_all_to_missing_user_is_unknown(populated):
    populated.add_alias("@example.org", ["ghost@example.org"])
    assert populated.resolve("anything@example.org").kind == "unknown"


def test_resolve_recursive_alias_dedupes(populated):
    populated.add_alias("team@example.org", ["dev@example.org", "ops@example.org",
                                             "alice@example.org"])
    populated.add_alias("dev@example.org", ["alice@example.org", "bob@example.org",
                                            "ext@remote.test"])
    populated.add_alias("ops@example.org", ["bob@example.org", "carol@example.org",
                                            "ext@remote.test", "pager@example.net"])
    populated.add_user("pager@example.net", HASH)
    r = populated.resolve("team@example.org")
    assert r.kind == "ok"
    assert addresses(r) == ["alice@example.org", "bob@example.org", "carol@example.org",
                            "pager@example.net"]
    assert len(r.local) == 4
    assert r.remote == ("ext@remote.test",)


def test_resolve_loop_is_cut(populated):
    populated.add_alias("a@example.org", ["b@example.org", "alice@example.org"])
    populated.add_alias("b@example.org", ["a@example.org", "bob@example.org"])
    r = populated.resolve("a@example.org")
    assert addresses(r) == ["alice@example.org", "bob@example.org"]
    populated.add_alias("x@example.org", ["y@example.org"])
    populated.add_alias("y@example.org", ["x@example.org"])
    assert populated.resolve("x@example.org") == Resolution("unknown")


def test_resolve_depth_is_limited(populated):
    chain = [f"l{i}@example.org" for i in range(MAX_ALIAS_DEPTH + 3)]
    for source, target in zip(chain, chain[1:]):
        populated.add_alias(source, [target])
    populated.add_alias(chain[-1], ["alice@example.org"])
    assert populated.resolve(chain[0]) == Resolution("unknown")
    # Starting closer to the end stays within the limit.
    assert addresses(populated.resolve(chain[5])) == ["alice@example.org"]


def test_resolve_remote_only_and_dropped_local_target(populated):
    populated.add_alias("fwd@example.org", ["Someone@Remote.Test", "ghost@example.org"])
    r = populated.resolve("fwd@example.org")
    assert r == Resolution("ok", (), ("Someone@remote.test",))   # its case kept


def test_resolve_domain_case_and_idna(accounts):
    accounts.add_domain("bücher.example")
    accounts.add_user("info@BÜCHER.example", HASH)
    assert addresses(accounts.resolve("Info@xn--bcher-kva.EXAMPLE")) == [
        "info@xn--bcher-kva.example"]


def test_resolution_is_frozen():
    r = Resolution("unknown")
    with pytest.raises(AttributeError):
        r.kind = "ok"  # type: ignore[misc]


# -- sharing the file ----------------------------------------------------------------------

def test_admin_change_is_seen_by_a_running_instance(db_path):
    server = Accounts(db_path)
    admin = Accounts(db_path)
    try:
        assert server.resolve("alice@example.org").kind == "nonlocal"
        admin.add_domain("example.org")
        assert server.resolve("alice@example.org").kind == "unknown"
        admin.add_user("alice@example.org", HASH)
        assert server.resolve("alice@example.org").kind == "ok"
        admin.set_password("alice@example.org", "{PLAIN}changed")
        assert server.get_user("alice@example.org").password_hash == "{PLAIN}changed"
        admin.add_alias("sales@example.org", ["alice@example.org"])
        assert server.resolve("sales@example.org").kind == "ok"
        admin.del_alias("sales@example.org")
        admin.del_user("alice@example.org")
        assert server.resolve("alice@example.org").kind == "unknown"
        assert server.get_user("alice@example.org") is None
    finally:
        server.close()
        admin.close()


def test_reader_not_blocked_by_open_write_transaction(db_path):
    server = Accounts(db_path)
    server.add_domain("example.org")
    server.add_user("alice@example.org", HASH)
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM users")
        # WAL: the server still reads the last committed state while the admin writes.
        assert server.get_user("alice@example.org") is not None
        writer.execute("COMMIT")
        assert server.get_user("alice@example.org") is None
    finally:
        writer.close()
        server.close()


def test_usable_from_another_thread(accounts):
    accounts.add_user("alice@example.org", HASH)
    result = []
    t = threading.Thread(target=lambda: result.append(accounts.resolve("alice@example.org")))
    t.start()
    t.join()
    assert result[0].kind == "ok"
