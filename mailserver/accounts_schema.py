"""The accounts database's schema version and the ordered migrations that reach it.

The version is the one row of the table `schema_version`, which the first release
created with version 1 (not `PRAGMA user_version`): a release that predates a migration
reads that table and refuses the newer database with its own error line, instead of
running on tables it does not know.  A database with the tables but no version row is
the first layout (version 1).

Every open (the server at start, each `mailserver-admin` command) brings the file to
SCHEMA_VERSION: each migration runs in its own transaction (BEGIN IMMEDIATE, so a server
and an admin command opening the file together migrate it once), the version row is
written in the same transaction, and a failed migration leaves the database as it was at
the previous version.  A fresh database runs every migration from version 0, so it has
exactly the tables an upgraded one has.

Blocking (SQLite); imports nothing from Twisted.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable


class SchemaError(Exception):
    """The database cannot be brought to this release's schema; one line for the operator."""


@dataclass(frozen=True)
class Migration:
    version: int          # the schema version the database has once this ran
    summary: str
    apply: Callable[[sqlite3.Connection], None]


# The first release's tables, character for character as it created them (SQLite keeps the
# text, so a fresh database and an upgraded one compare equal).
_V1_SCHEMA = """
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


def _v1_tables(db: sqlite3.Connection) -> None:
    """Domains, users and aliases as the first release made them."""
    for statement in _V1_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def _v2_constraints(db: sqlite3.Connection) -> None:
    """The rules the code keeps become constraints of the tables, so that a row written by
    hand (the sqlite3 shell, a provisioning script) that the server would misread is
    refused by the database: an address that is not localpart@domain, an empty hash or one
    with a line break (Accounts never stores those), a quota that is not a positive
    integer, an alias whose key is not in its domain.  SQLite adds CHECK constraints only by
    rebuilding the table.  A quota of 0 or less always meant "no limit" (the code stores
    None for it) and is carried over as NULL; other rows are copied as they are."""
    db.execute("""
        CREATE TABLE users_v2 (
            address TEXT PRIMARY KEY,
            localpart TEXT NOT NULL CHECK (localpart <> ''),
            domain TEXT NOT NULL REFERENCES domains(name),
            password_hash TEXT NOT NULL
                CHECK (password_hash <> '' AND instr(password_hash, char(10)) = 0
                       AND instr(password_hash, char(13)) = 0),
            quota INTEGER CHECK (quota IS NULL OR (typeof(quota) = 'integer' AND quota > 0)),
            CONSTRAINT user_address CHECK (address = localpart || '@' || domain)
        )""")
    db.execute("""
        INSERT INTO users_v2 (address, localpart, domain, password_hash, quota)
        SELECT address, localpart, domain, password_hash,
               CASE WHEN quota > 0 THEN quota END
        FROM users""")
    db.execute("DROP TABLE users")
    db.execute("ALTER TABLE users_v2 RENAME TO users")
    db.execute("CREATE INDEX users_domain ON users(domain)")
    db.execute("""
        CREATE TABLE aliases_v2 (
            source TEXT NOT NULL,
            domain TEXT NOT NULL REFERENCES domains(name),
            target TEXT NOT NULL CHECK (instr(target, '@') > 0),
            position INTEGER NOT NULL CHECK (position >= 0),
            PRIMARY KEY (source, target),
            CONSTRAINT alias_domain CHECK (substr(source, -length(domain) - 1) = '@' || domain)
        )""")
    db.execute("""
        INSERT INTO aliases_v2 (source, domain, target, position)
        SELECT source, domain, target, position FROM aliases""")
    db.execute("DROP TABLE aliases")
    db.execute("ALTER TABLE aliases_v2 RENAME TO aliases")
    db.execute("CREATE INDEX aliases_domain ON aliases(domain)")


# In order; append only.  A released migration is never changed: write a new one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "domains, users and aliases", _v1_tables),
    Migration(2, "constraints on users and aliases", _v2_constraints),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def stored_version(db: sqlite3.Connection) -> int:
    """The database's schema version: 0 for an empty file, 1 for the first layout without
    a version row."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" in tables:
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        if row is not None and row[0] is not None:
            return int(row[0])
    return 1 if "users" in tables else 0


def newer_message(found: int) -> str:
    return (f"schema version {found} was written by a newer release of mailserver "
            f"(this one knows versions up to {SCHEMA_VERSION}): install that release, or "
            f"restore a backup made before the upgrade")


def check_known(found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaError(newer_message(found))


def upgrade(db: sqlite3.Connection) -> list[Migration]:
    """Bring the database (an autocommit connection) to SCHEMA_VERSION; the migrations
    applied, none when it was current.  SchemaError if it is newer than this code or a
    migration fails (the database then stays at the version before that migration)."""
    current = stored_version(db)
    check_known(current)
    applied: list[Migration] = []
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise SchemaError(f"cannot upgrade: database busy ({e})") from None
        try:
            # Another process may have migrated since we looked.
            current = stored_version(db)
            check_known(current)
            if migration.version > current:   # == current + 1: they run in order
                migration.apply(db)
                _set_version(db, migration.version)
                applied.append(migration)
                current = migration.version
        except BaseException as e:
            db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise SchemaError(f"upgrade to schema version {migration.version} "
                                  f"({migration.summary}) failed: {e}; the database is "
                                  f"unchanged at version {current}") from None
            raise
        db.execute("COMMIT")
    return applied


def _set_version(db: sqlite3.Connection, version: int) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    db.execute("DELETE FROM schema_version")
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
