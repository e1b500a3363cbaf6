"""`mailserver-admin backup` and `restore` through main(argv), on real directories: what a
backup holds and leaves out, a restore into a fresh directory with its permissions, the
refusals (non-empty destination, missing or damaged backup, existing data without
--force, a running server), and a backup taken while flags change."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import textwrap
import threading
from pathlib import Path

import pytest

from mailserver.accounts import Accounts
from mailserver.accounts_schema import SCHEMA_VERSION
from mailserver.config import load_config
from mailserver.passwords import verify_password
from mailserver.sieve.scripts import active_name
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.queue.store import QueueStore
from mailserver.tls import generate_self_signed
from tests.accounts_v1 import write_v1_database

INDEX = "mailserver.index.sqlite3"
MTIME = 1_700_000_000


def make_config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "mailserver.toml"
    path.write_text(textwrap.dedent("""\
        [server]
        hostname = "mail.example.test"
        state_dir = "var"
        [storage]
        maildir_root = "maildirs"
    """))
    return path


def assert_error(result, *texts: str) -> str:
    code, out, err = result
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mailserver-admin: error: ")
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def put(path: Path, data: bytes, mtime: float = MTIME) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o600)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def source(tmp_path, run):
    """A server's directories as it leaves them: accounts, DKIM key, certificate, two
    Maildirs with messages and control files, caches, a queued message."""
    config = make_config(tmp_path / "a")
    assert run(config, "domain", "add", "example.test")[0] == 0
    for user, quota in (("alice", "1M"), ("bob", None)):
        args = ["user", "add", f"{user}@example.test", "--password-stdin"]
        if quota:
            args += ["--quota", quota]
        assert run(config, *args, stdin="secret\n")[0] == 0
    assert run(config, "alias", "add", "team@example.test",
               "alice@example.test,bob@example.test,far@remote.test")[0] == 0
    cfg = load_config(config)
    generate_self_signed("mail.example.test", cfg.state_dir / "tls" / "cert.pem",
                         cfg.state_dir / "tls" / "key.pem")
    put(cfg.state_dir / "acme" / "account-key.pem", b"-----BEGIN PRIVATE KEY-----\n")
    alice = cfg.maildir_root / "example.test" / "alice"
    put(alice / "cur" / "1700000001.M1P1.host,S=20:2,FS", b"Subject: one\n\nfirst\n",
        MTIME + 1)
    put(alice / "cur" / "1700000002.M2P1.host,S=21:2,a", b"Subject: two\n\nsecond\n",
        MTIME + 2)
    put(alice / "new" / "1700000003.M3P1.host", b"Subject: three\n\nthird\n", MTIME + 3)
    put(alice / "dovecot-uidlist", b"3 V1700000000 N3 G0123456789abcdef0123456789abcdef\n"
        b"1 :1700000001.M1P1.host,S=20\n2 :1700000002.M2P1.host,S=21\n")
    put(alice / "dovecot-keywords", b"0 $Important\n")
    put(alice / "maildirsize", b"1048576S\n41 2\n")
    put(alice / INDEX, b"cache")
    put(alice / f"{INDEX}-wal", b"cache")
    put(alice / "dovecot.index.cache", b"dovecot cache")
    put(alice / "dovecot-uidlist.lock", b"1:host")
    put(alice / "tmp" / "1700000009.M9P1.host", b"half written")
    put(alice / ".Sent" / "cur" / "1700000004.M4P1.host,S=5:2,S", b"sent\n", MTIME + 4)
    put(alice / ".Sent" / "dovecot-uidlist", b"3 V1700000005 N2 G00\n1 :1700000004.M4P1.host,S=5\n")
    put(alice / ".Sent" / INDEX, b"cache")
    store = QueueStore(cfg.queue_dir)
    store.ensure()
    spool = store.open_spool("Q1A2B3")
    spool.write(b"Subject: queued\r\n\r\nout\r\n")
    spool.finish_sync()
    store.commit(spool, Envelope("Q1A2B3", "alice@example.test",
                                 [RecipientState("far@remote.test")], size=spool.size))
    put(cfg.queue_dir / "tmp" / "Q9.msg", b"interrupted")
    put(cfg.queue_dir / "control" / "flush", b"")
    return config


def files_below(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file, and directories as (-1, 0)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = (-1, 0)
        for name in filenames:
            st = os.lstat(Path(dirpath) / name)
            out[str((Path(dirpath) / name).relative_to(root))] = (st.st_size, int(st.st_mtime))
    return out


# -- backup ---------------------------------------------------------------------------------

def test_backup_holds_what_matters_and_leaves_caches_out(source, run, tmp_path):
    dest = tmp_path / "backup"
    code, out, err = run(source, "backup", str(dest))
    assert code == 0, err
    assert out.startswith(f"backup written to {dest}: accounts (1 domain, 2 users, 1 alias; "
                          f"schema version {SCHEMA_VERSION}), 2 Maildirs ("), out
    assert "4 messages" in out and "1 queued message" in out and "1 DKIM key" in out
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700

    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["hostname"] == "mail.example.test"
    assert manifest["accounts"] == {"file": "state/accounts.sqlite3",
                                    "schema_version": SCHEMA_VERSION,
                                    "domains": 1, "users": 2, "aliases": 1}
    assert manifest["maildirs"]["users"] == 2 and manifest["maildirs"]["messages"] == 4
    assert manifest["queue"] == {"messages": 1, "checksummed": True}
    assert {"state/queue/msg/Q1A2B3", "state/queue/env/Q1A2B3.json"} <= set(manifest["files"])
    assert manifest["tls"]["files"] == {"state/tls/cert.pem": "certificate",
                                        "state/tls/key.pem": "private_key",
                                        "state/acme/account-key.pem": "acme"}

    cfg = load_config(source)
    alice = dest / "maildirs" / "example.test" / "alice"
    kept = files_below(alice)
    assert kept["cur/1700000001.M1P1.host,S=20:2,FS"] == (20, MTIME + 1)
    assert "new/1700000003.M3P1.host" in kept
    for name in ("dovecot-uidlist", "dovecot-keywords", "maildirsize", "subscriptions",
                 ".Sent/cur/1700000004.M4P1.host,S=5:2,S", ".Sent/dovecot-uidlist",
                 ".Sent/maildirfolder"):
        assert name in kept, name
    for name in (INDEX, f"{INDEX}-wal", "dovecot.index.cache", "dovecot-uidlist.lock",
                 "tmp/1700000009.M9P1.host", f".Sent/{INDEX}"):
        assert name not in kept, name
    assert kept["tmp"] == (-1, 0)   # the directory is there, empty
    # Messages are hard links into the live Maildir (same file system), control files copies.
    live = cfg.maildir_root / "example.test" / "alice"
    assert os.stat(alice / "cur" / "1700000001.M1P1.host,S=20:2,FS").st_ino == \
        os.stat(live / "cur" / "1700000001.M1P1.host,S=20:2,FS").st_ino
    assert os.stat(alice / "maildirsize").st_ino != os.stat(live / "maildirsize").st_ino
    assert manifest["maildirs"]["linked"] == 5   # 4 messages + the queued one
    # The queue: the message and its envelope, not interrupted spool files or requests.
    assert sorted(files_below(dest / "state" / "queue")) == [
        "env", "env/Q1A2B3.json", "msg", "msg/Q1A2B3"]
    # The database is one self-contained snapshot.
    db = sqlite3.connect(dest / "state" / "accounts.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 2
    db.close()
    assert not (dest / "state" / "accounts.sqlite3-wal").exists()
    assert (dest / "config" / "mailserver.toml").read_bytes() == source.read_bytes()
    for rel, info in manifest["files"].items():
        assert stat.S_IMODE((dest / rel).stat().st_mode) == 0o600, rel


def test_backup_with_copy_makes_independent_files_with_the_same_dates(source, run, tmp_path):
    dest = tmp_path / "backup"
    code, out, err = run(source, "backup", "--copy", str(dest))
    assert code == 0, err
    assert "0 hard links, 5 copies" in out
    live = load_config(source).maildir_root / "example.test" / "alice" / "cur"
    name = "1700000002.M2P1.host,S=21:2,a"
    copy = dest / "maildirs" / "example.test" / "alice" / "cur" / name
    assert os.stat(copy).st_ino != os.stat(live / name).st_ino
    assert os.stat(copy).st_mtime == MTIME + 2   # INTERNALDATE
    assert copy.read_bytes() == (live / name).read_bytes()


def test_backup_refuses_a_non_empty_destination(source, run, tmp_path):
    dest = tmp_path / "backup"
    dest.mkdir()
    (dest / "something").write_text("x")
    assert_error(run(source, "backup", str(dest)), "is not empty")
    assert sorted(os.listdir(dest)) == ["something"]
    assert_error(run(source, "backup", str(dest / "something")), "not a directory")
    inside = load_config(source).state_dir / "backup"
    assert_error(run(source, "backup", str(inside)), "inside server.state_dir")
    assert not inside.exists()


def test_backup_into_an_existing_empty_directory(source, run, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    assert run(source, "backup", str(dest))[0] == 0
    assert (dest / "manifest.json").is_file()


def test_backup_copies_the_database_as_it_is_without_upgrading_it(tmp_path, run):
    """`backup` before an upgrade keeps the old schema (and does not upgrade the live file);
    the restored database is upgraded by the next open."""
    config = make_config(tmp_path / "a")
    live = tmp_path / "a" / "var" / "accounts.sqlite3"
    write_v1_database(live)
    code, out, err = run(config, "backup", str(tmp_path / "backup"))
    assert code == 0, err
    assert "schema version 1" in out
    for path in (live, tmp_path / "backup" / "state" / "accounts.sqlite3"):
        db = sqlite3.connect(path)
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 1
        db.close()
    target = make_config(tmp_path / "b")
    code, out, err = run(target, "restore", str(tmp_path / "backup"))
    assert code == 0, err
    assert f"schema version 1; the server upgrades it to {SCHEMA_VERSION} when it starts" in out
    with Accounts(tmp_path / "b" / "var" / "accounts.sqlite3") as accounts:
        assert {u.address: u.quota for u in accounts.list_users()}["bob@example.test"] == 2048


def test_backup_while_flags_change_keeps_every_message_once(tmp_path, run):
    """Another process renames messages (flag changes, new/ -> cur/) during the backup:
    each message is in the backup exactly once, under one of its names."""
    config = make_config(tmp_path / "a")
    assert run(config, "domain", "add", "example.test")[0] == 0
    assert run(config, "user", "add", "alice@example.test", "--password-stdin",
               stdin="secret\n")[0] == 0
    inbox = load_config(config).maildir_root / "example.test" / "alice"
    bases = [f"17000{n:05d}.M{n}P1.host,S=6" for n in range(400)]
    for n, base in enumerate(bases):
        put(inbox / ("new" if n % 2 else "cur") / (base if n % 2 else base + ":2,"), b"hello\n")
    put(inbox / "dovecot-uidlist", f"3 V1700000000 N401 G{'0' * 32}\n".encode()
        + b"".join(f"{n + 1} :{base}\n".encode() for n, base in enumerate(bases)))
    stop = threading.Event()

    def rename_all_the_time():
        flags = ["S", ""]
        turn = 0
        while not stop.is_set():
            for n, base in enumerate(bases):
                for sub in ("cur", "new"):
                    for old in (base, f"{base}:2,", f"{base}:2,S"):
                        try:
                            os.rename(inbox / sub / old,
                                      inbox / "cur" / f"{base}:2,{flags[(turn + n) % 2]}")
                        except FileNotFoundError:
                            continue
            turn += 1

    renamer = threading.Thread(target=rename_all_the_time)
    renamer.start()
    try:
        code, out, err = run(config, "backup", "--copy", str(tmp_path / "backup"))
    finally:
        stop.set()
        renamer.join()
    assert code == 0, err
    saved = [name for sub in ("cur", "new")
             for name in os.listdir(tmp_path / "backup" / "maildirs" / "example.test" /
                                    "alice" / sub)]
    assert sorted(name.split(":")[0] for name in saved) == sorted(bases)
    assert "400 messages" in out


# -- restore --------------------------------------------------------------------------------

def test_restore_into_a_fresh_directory(source, run, tmp_path):
    assert run(source, "backup", str(tmp_path / "backup"))[0] == 0
    target = make_config(tmp_path / "b")
    code, out, err = run(target, "restore", str(tmp_path / "backup"))
    assert code == 0, err
    assert "restored the accounts database: 1 domain, 2 users, 1 alias" in out
    assert "restored 2 Maildirs (12 folders, 4 messages)" in out
    assert "restored 1 queued message" in out and "restored 1 DKIM key" in out
    assert "restored 3 certificate and key files" in out
    assert "(not installed; this restore followed" in out

    a, b = load_config(source), load_config(target)
    # Maildirs: every message with its name and date, the control files, no caches.
    before = {k: v for k, v in files_below(a.maildir_root).items()
              if "tmp/" not in k and INDEX not in k and "dovecot.index" not in k
              and not k.endswith(".lock")}
    after = files_below(b.maildir_root)
    assert {k: v for k, v in after.items() if v[0] >= 0 and "cur/" in k or "new/" in k} == \
        {k: v for k, v in before.items() if v[0] >= 0 and "cur/" in k or "new/" in k}
    assert set(after) == set(before)
    # Permissions as the server makes them.
    for rel, (size, _) in after.items():
        mode = stat.S_IMODE((b.maildir_root / rel).stat().st_mode)
        assert mode == (0o700 if size < 0 else 0o600), rel
    for path in (b.state_dir, b.state_dir / "dkim", b.state_dir / "tls", b.queue_dir / "env"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE(b.accounts_db.stat().st_mode) == 0o600
    assert stat.S_IMODE((b.state_dir / "tls" / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((b.state_dir / "tls" / "cert.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((b.state_dir / "acme" / "account-key.pem").stat().st_mode) == 0o600
    assert (b.state_dir / "tls" / "key.pem").read_bytes() == \
        (a.state_dir / "tls" / "key.pem").read_bytes()
    assert sorted(os.listdir(b.dkim_dir)) == sorted(os.listdir(a.dkim_dir))
    # Accounts: users with their hashes and quotas, the alias.
    with Accounts(b.accounts_db) as restored, Accounts(a.accounts_db) as original:
        assert restored.list_users() == original.list_users()
        assert restored.list_aliases() == original.list_aliases()
        assert verify_password(restored.get_user("alice@example.test").password_hash, "secret")
    db = sqlite3.connect(b.accounts_db)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    # The queue, as `queue list` sees it.
    code, out, err = run(target, "queue", "list")
    assert code == 0 and "Q1A2B3" in out and "far@remote.test" in out, (out, err)


def test_restore_refuses_existing_data_unless_forced(source, run, tmp_path):
    assert run(source, "backup", str(tmp_path / "backup"))[0] == 0
    target = make_config(tmp_path / "b")
    # A first start leaves an empty database and `user add` an empty Maildir: no conflict.
    with Accounts(load_config(target).accounts_db):
        pass
    assert run(target, "restore", str(tmp_path / "backup"))[0] == 0
    # Now there is data: refused, nothing changed.
    assert run(target, "user", "del", "bob@example.test")[0] == 0
    mail = put(load_config(target).maildir_root / "example.test" / "alice" / "new" / "later",
               b"arrived after the backup\n")
    # (the accounts, alice's Maildir with mail, the queued message already there)
    assert_error(run(target, "restore", str(tmp_path / "backup")),
                 "restore would replace the accounts database",
                 "1 domain, 1 user, 1 alias", "and 2 more", "nothing was changed", "--force")
    assert mail.exists()
    with Accounts(load_config(target).accounts_db) as accounts:
        assert [u.address for u in accounts.list_users()] == ["alice@example.test"]
    # --force: the backup's accounts and Maildir replace them.
    code, out, err = run(target, "restore", "--force", str(tmp_path / "backup"))
    assert code == 0, err
    assert "replacing the Maildir" in out
    assert not mail.exists()
    with Accounts(load_config(target).accounts_db) as accounts:
        assert len(accounts.list_users()) == 2


def test_restore_refuses_while_the_server_runs(source, run, tmp_path):
    assert run(source, "backup", str(tmp_path / "backup"))[0] == 0
    target = make_config(tmp_path / "b")
    store = QueueStore(load_config(target).queue_dir)
    store.lock()   # what the running server holds
    try:
        assert_error(run(target, "restore", "--force", str(tmp_path / "backup")),
                     "the server is running", "stop it before restoring")
    finally:
        store.unlock()
    assert not load_config(target).accounts_db.exists()


def test_restore_bad_input_is_one_line(source, run, tmp_path):
    target = make_config(tmp_path / "b")
    backup = tmp_path / "backup"
    assert_error(run(target, "restore", str(tmp_path / "missing")), "no such directory")
    assert_error(run(target, "restore", str(source)), "not a directory")
    assert_error(run(target, "restore", str(tmp_path / "a")), "no manifest.json")
    assert run(source, "backup", str(backup))[0] == 0
    manifest = backup / "manifest.json"
    good = manifest.read_bytes()

    def with_manifest(data: bytes, *texts: str) -> None:
        manifest.write_bytes(data)
        assert_error(run(target, "restore", str(backup)), *texts)
        manifest.write_bytes(good)

    with_manifest(b"{not json", "not valid JSON", "the manifest is damaged")
    with_manifest(b"[]", "not a backup manifest")
    with_manifest(b'{"format": 1}', "the manifest is damaged")
    with_manifest(b"\x00" * (2 * 1024 * 1024), "larger than")
    data = json.loads(good)
    with_manifest(json.dumps({**data, "format": 7}).encode(), "backup format 7",
                  "newer release")
    data_bad_path = json.loads(good)
    data_bad_path["files"]["state/../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    with_manifest(json.dumps(data_bad_path).encode(), "unsafe path")
    data_count = json.loads(good)
    data_count["maildirs"]["messages"] = 5
    with_manifest(json.dumps(data_count).encode(), "lists 5 messages", "holds 4",
                  "damaged")
    # A damaged file: checksum.
    key = next(backup.glob("state/dkim/*.key"))
    key.write_bytes(key.read_bytes()[:-1] + b"X")
    assert_error(run(target, "restore", str(backup)), "differs from the manifest's checksum")
    assert not load_config(target).state_dir.exists()


def test_restore_refuses_a_database_newer_than_this_release(source, run, tmp_path):
    backup = tmp_path / "backup"
    assert run(source, "backup", str(backup))[0] == 0
    db_file = backup / "state" / "accounts.sqlite3"
    db = sqlite3.connect(db_file)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["accounts"]["schema_version"] = 99
    from mailserver.backup import sha256_file
    manifest["files"]["state/accounts.sqlite3"] = {"sha256": sha256_file(db_file),
                                                  "size": db_file.stat().st_size}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    target = make_config(tmp_path / "b")
    assert_error(run(target, "restore", str(backup)), "schema version 99",
                 f"up to {SCHEMA_VERSION}")


def test_sieve_scripts_and_the_active_one_survive_backup_and_restore(source, run, tmp_path):
    """The scripts are files in sieve/; which one is active is the .dovecot.sieve link,
    made again on both sides.  Any other link is neither copied nor followed."""
    script = tmp_path / "vacation.sieve"
    script.write_text('require "fileinto";\nif header :contains "subject" "x" { fileinto "X"; }\n')
    assert run(source, "sieve", "put", "alice@example.test", "rules", str(script))[0] == 0
    assert run(source, "sieve", "put", "alice@example.test", "other", str(script))[0] == 0
    assert run(source, "sieve", "activate", "alice@example.test", "rules")[0] == 0
    a = load_config(source)
    alice = a.maildir_root / "example.test" / "alice"
    os.symlink("/etc/passwd", alice / "sieve" / "stolen.sieve")
    assert run(source, "backup", str(tmp_path / "backup"))[0] == 0
    assert os.readlink(tmp_path / "backup" / "maildirs" / "example.test" / "alice"
                       / ".dovecot.sieve") == "sieve/rules.sieve"
    target = make_config(tmp_path / "b")
    code, out, err = run(target, "restore", str(tmp_path / "backup"))
    assert code == 0, err
    restored = load_config(target).maildir_root / "example.test" / "alice"
    assert active_name(restored) == "rules"
    assert os.readlink(restored / ".dovecot.sieve") == "sieve/rules.sieve"
    assert (restored / "sieve" / "other.sieve").read_bytes() == script.read_bytes()
    assert not os.path.lexists(restored / "sieve" / "stolen.sieve")
    code, out, err = run(target, "sieve", "list", "alice@example.test")
    assert code == 0 and "rules" in out and "other" in out, (out, err)


def test_restore_refuses_links_in_the_backup_and_in_its_target(source, run, tmp_path):
    """A link in maildirs/ (the backup is damaged) or in maildir_root (the restore runs
    as root: it would delete and write where the link points) stops it before it writes."""
    backup = tmp_path / "backup"
    assert run(source, "backup", str(backup))[0] == 0
    target = make_config(tmp_path / "b")
    evil = backup / "maildirs" / "example.test" / "zz-evil"
    evil.symlink_to("/etc/shadow")
    assert_error(run(target, "restore", str(backup)), "zz-evil is a symbolic link", "damaged")
    evil.unlink()
    assert not load_config(target).state_dir.exists()

    outside = tmp_path / "outside"
    put(outside / "alice" / "precious.txt", b"not the server's")
    root = load_config(target).maildir_root
    root.mkdir(parents=True)
    (root / "example.test").symlink_to(outside)
    assert_error(run(target, "restore", "--force", str(backup)),
                 "example.test is a symbolic link", "nothing was changed")
    assert (outside / "alice" / "precious.txt").read_bytes() == b"not the server's"
    assert not load_config(target).accounts_db.exists()


def test_a_damaged_queue_in_the_backup_is_refused_before_anything_is_written(source, run,
                                                                             tmp_path):
    """A cut envelope was restored as if whole (its message then never sent, the queue
    listing it nowhere); a link in place of a queued message stopped the restore
    half-way, the accounts and Maildirs replaced already."""
    backup = tmp_path / "backup"
    assert run(source, "backup", str(backup))[0] == 0
    target = make_config(tmp_path / "b")
    envelope = backup / "state" / "queue" / "env" / "Q1A2B3.json"
    whole = envelope.read_bytes()
    envelope.write_bytes(whole[:len(whole) // 2])
    assert_error(run(target, "restore", str(backup)), "Q1A2B3.json",
                 "differs from the manifest's checksum")
    envelope.write_bytes(whole)
    message = backup / "state" / "queue" / "msg" / "Q1A2B3"
    message.unlink()
    message.symlink_to("/etc/hostname")
    assert_error(run(target, "restore", str(backup)), "Q1A2B3", "damaged")
    assert not load_config(target).state_dir.exists()
    assert not load_config(target).maildir_root.exists()


def test_a_pem_file_holding_certificate_and_key_is_restored_as_a_key(tmp_path, run):
    config = make_config(tmp_path / "a")
    cfg = load_config(config)
    generate_self_signed("mail.example.test", cfg.state_dir / "tls" / "cert.pem",
                         cfg.state_dir / "tls" / "key.pem")
    combined = cfg.state_dir / "certs" / "combined.pem"
    put(combined, (cfg.state_dir / "tls" / "key.pem").read_bytes()
        + (cfg.state_dir / "tls" / "cert.pem").read_bytes())
    with open(config, "a") as f:
        f.write(f'[tls]\ncertificate = "{combined}"\nprivate_key = "{combined}"\n')
    assert run(config, "backup", str(tmp_path / "backup"))[0] == 0
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_bytes())
    assert manifest["tls"]["files"]["state/certs/combined.pem"] == "private_key"
    target = make_config(tmp_path / "b")
    assert run(target, "restore", str(tmp_path / "backup"))[0] == 0
    restored = load_config(target).state_dir / "certs" / "combined.pem"
    assert stat.S_IMODE(restored.stat().st_mode) == 0o600


def test_a_message_moved_between_folders_during_the_backup_is_in_it(source, run, tmp_path,
                                                                    monkeypatch):
    """IMAP MOVE from a folder not yet walked into one already walked: the second look
    at every folder finds it."""
    from mailserver import backup as backup_module

    cfg = load_config(source)
    alice = cfg.maildir_root / "example.test" / "alice"
    victim = put(alice / ".Archive" / "cur" / "1700000050.M50P1.host,S=7:2,S", b"victim\n")
    real = backup_module._backup_folder
    moved = []

    def folder_then_move(folder, out, *args):
        placed = real(folder, out, *args)
        if folder == alice and not moved:   # INBOX walked; .Archive not yet
            moved.append(victim.rename(alice / "cur" / "1700000051.M51P1.host,S=7:2,S"))
        return placed
    monkeypatch.setattr(backup_module, "_backup_folder", folder_then_move)
    assert run(source, "backup", str(tmp_path / "backup"))[0] == 0
    assert moved
    found = list((tmp_path / "backup" / "maildirs" / "example.test" / "alice").rglob(
        "1700000051.M51P1.host*"))
    assert len(found) == 1 and found[0].read_bytes() == b"victim\n"
    target = make_config(tmp_path / "b")
    assert run(target, "restore", str(tmp_path / "backup"))[0] == 0


def test_a_damaged_uid_list_or_sieve_script_in_the_backup_is_refused(source, run, tmp_path):
    """A uid list restored damaged would renumber a folder's messages under the same
    UIDVALIDITY (clients would show one message for another): control files and Sieve
    scripts have their checksums in the manifest too."""
    backup = tmp_path / "backup"
    assert run(source, "backup", str(backup))[0] == 0
    put(load_config(source).maildir_root / "example.test" / "alice" / "sieve" / "rules.sieve",
        b"keep;\n")
    assert run(source, "backup", str(tmp_path / "backup2"))[0] == 0
    target = make_config(tmp_path / "b")
    uidlist = backup / "maildirs" / "example.test" / "alice" / "dovecot-uidlist"
    good = uidlist.read_bytes()
    uidlist.write_bytes(good[:20])
    assert_error(run(target, "restore", str(backup)), "alice/dovecot-uidlist",
                 "differs from the manifest's checksum")
    uidlist.unlink()
    assert_error(run(target, "restore", str(backup)), "alice/dovecot-uidlist", "is missing")
    script = tmp_path / "backup2" / "maildirs" / "example.test" / "alice" / "sieve" / "rules.sieve"
    script.write_bytes(b"discard;\n")
    assert_error(run(target, "restore", str(tmp_path / "backup2")), "rules.sieve",
                 "differs from the manifest's checksum")
    assert not load_config(target).state_dir.exists()



def test_a_forced_restore_sets_a_damaged_accounts_database_aside(source, run, tmp_path):
    assert run(source, "backup", str(tmp_path / "backup"))[0] == 0
    target = make_config(tmp_path / "b")
    db = load_config(target).accounts_db
    put(db, os.urandom(8192))
    assert_error(run(target, "restore", str(tmp_path / "backup")), "an unreadable database")
    code, out, err = run(target, "restore", "--force", str(tmp_path / "backup"))
    assert code == 0, err
    assert Path(f"{db}.damaged").stat().st_size == 8192
    with Accounts(db) as accounts:
        assert len(accounts.list_users()) == 2
