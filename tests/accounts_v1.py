"""An accounts database as the first release (schema version 1) wrote it, for upgrade tests.

The SQL is that release's `_SCHEMA` (mailserver/accounts.py of commit b8dba68), copied
here on purpose: the test must not follow later changes of the code it checks.  Only the
standard library is used, so the end-to-end tests can write the file too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    localpart TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    password_hash TEXT NOT NULL,
    quota INTEGER
);
CREATE INDEX IF NOT EXISTS users_domain ON users(domain);
CREATE TABLE IF NOT EXISTS aliases (
    source TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name),
    target TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE INDEX IF NOT EXISTS aliases_domain ON aliases(domain);
"""

# A Dovecot SHA512-CRYPT hash of "secret" (the kind `user import` keeps as it is).
# (openssl passwd -6 -salt saltsalt secret)
SHA512_SECRET = ("{SHA512-CRYPT}$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S"
                 "5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1")
PLAIN_SECRET = "{PLAIN}secret"

DOMAINS = ["example.test", "example.net"]
# (address, localpart, domain, password_hash, quota)
USERS = [
    ("alice@example.test", "alice", "example.test", PLAIN_SECRET, None),
    ("bob@example.test", "bob", "example.test", SHA512_SECRET, 2048),
    ("carol@example.test", "carol", "example.test", PLAIN_SECRET, 0),   # 0: no limit
]
# (source, domain, target, position)
ALIASES = [
    ("team@example.test", "example.test", "alice@example.test", 0),
    ("team@example.test", "example.test", "bob@example.test", 1),
    ("team@example.test", "example.test", "friend@remote.test", 2),
    ("@example.net", "example.net", "carol@example.test", 0),
]


def write_v1_database(path: Path, *, version_row: bool = True,
                      extra_users: list[tuple] = (), aliases: list[tuple] = ALIASES) -> None:
    """The database file at `path` (new) as the first release left it, with DOMAINS,
    USERS (+ `extra_users`) and `aliases`; `version_row=False`: without the version row."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN")
        for statement in V1_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if version_row:
            db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.executemany("INSERT INTO domains (name) VALUES (?)", [(d,) for d in DOMAINS])
        db.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?)", [*USERS, *extra_users])
        db.executemany("INSERT INTO aliases VALUES (?, ?, ?, ?)", aliases)
        db.execute("COMMIT")
    finally:
        db.close()
    path.chmod(0o600)
