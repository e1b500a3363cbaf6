"""The PostgreSQL accounts database's schema version and the migrations that reach it.

The same tables, constraints and version numbers as the SQLite file's
(mailserver.accounts_schema), so that "schema version 2" means one thing whichever
database holds the accounts; the version is the one row of `schema_version` here too, and
a release that predates a migration refuses the newer database with its own error line.

Every open (a server node at start, each `mailserver-admin` command) brings the database
to SCHEMA_VERSION.  Each migration runs in its own transaction (PostgreSQL's DDL is
transactional), while the accounts' advisory lock is held, the lock every account write
takes too: nodes and admin commands starting together migrate once, and a failed
migration leaves the database at the previous version.

Text columns compare bytewise (COLLATE "C"), as SQLite's do, so every listing comes out
in the same order from either database.  A statement trigger on each table sends
NOTIFY accounts_changed at the commit of any change, also one made by hand in psql, so
every node's replica (mailserver.accounts_replica) reloads at once.

Blocking (psycopg); imports nothing from Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mailserver.accounts_schema import SchemaError, newer_message

CHANNEL = "accounts_changed"
# pg_advisory_xact_lock key of every account write and migration: b"mail" as an int.
WRITE_LOCK = 0x6D61696C


@dataclass(frozen=True)
class Migration:
    version: int          # the schema version the database has once this ran
    summary: str
    apply: Callable[[Any], None]   # given a psycopg connection inside the transaction


_V1_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE domains (
        name TEXT COLLATE "C" PRIMARY KEY
    )""",
    """CREATE TABLE users (
        address TEXT COLLATE "C" PRIMARY KEY,
        localpart TEXT COLLATE "C" NOT NULL,
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name),
        password_hash TEXT NOT NULL,
        quota BIGINT
    )""",
    "CREATE INDEX users_domain ON users(domain)",
    """CREATE TABLE aliases (
        source TEXT COLLATE "C" NOT NULL,
        domain TEXT COLLATE "C" NOT NULL REFERENCES domains(name),
        target TEXT COLLATE "C" NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (source, target)
    )""",
    "CREATE INDEX aliases_domain ON aliases(domain)",
    f"""CREATE FUNCTION accounts_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', '');
        RETURN NULL;
    END
    $$""",
    *(f"""CREATE TRIGGER {table}_changed
        AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
        FOR EACH STATEMENT EXECUTE FUNCTION accounts_notify()"""
      for table in ("domains", "users", "aliases")),
)

# SQLite's version 2 constraints; PostgreSQL adds them in place (SQLite rebuilt the tables).
# BIGINT already keeps a quota an integer; PostgreSQL text never holds NUL.
_V2_CONSTRAINTS = (
    "UPDATE users SET quota = NULL WHERE quota <= 0",
    r"""ALTER TABLE users
        ADD CONSTRAINT users_localpart CHECK (localpart <> ''),
        ADD CONSTRAINT users_password_hash CHECK (password_hash <> ''
            AND strpos(password_hash, E'\n') = 0 AND strpos(password_hash, E'\r') = 0),
        ADD CONSTRAINT users_quota CHECK (quota IS NULL OR quota > 0),
        ADD CONSTRAINT user_address CHECK (address = localpart || '@' || domain)""",
    """ALTER TABLE aliases
        ADD CONSTRAINT aliases_target CHECK (strpos(target, '@') > 0),
        ADD CONSTRAINT aliases_position CHECK (position >= 0),
        ADD CONSTRAINT alias_domain CHECK (right(source, length(domain) + 1) = '@' || domain)""",
)


def _run(conn: Any, statements: tuple[str, ...]) -> None:
    for statement in statements:
        conn.execute(statement)


def _v1_tables(conn: Any) -> None:
    """Domains, users and aliases, and the trigger that tells every node of a change."""
    _run(conn, _V1_SCHEMA)


def _v2_constraints(conn: Any) -> None:
    """The rules the code keeps, as constraints (see mailserver.accounts_schema)."""
    _run(conn, _V2_CONSTRAINTS)


# In order; append only, in step with mailserver.accounts_schema.MIGRATIONS.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "domains, users and aliases", _v1_tables),
    Migration(2, "constraints on users and aliases", _v2_constraints),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def stored_version(conn: Any) -> int:
    """The database's schema version: 0 when it has no accounts tables yet."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL, "
                       "to_regclass('users') IS NOT NULL").fetchone()
    has_version, has_users = row
    if has_version:
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        if version is not None:
            return int(version)
    return 1 if has_users else 0


def check_known(found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaError(newer_message(found))


def upgrade(conn: Any) -> list[Migration]:
    """Bring the database (an autocommit psycopg connection) to SCHEMA_VERSION; the
    migrations applied.  SchemaError if it is newer than this code or a migration fails
    (the database then stays at the version before that migration)."""
    import psycopg

    current = stored_version(conn)
    check_known(current)
    if current == SCHEMA_VERSION:
        return []
    # Held across the migrations' transactions (a session lock): the version is read again
    # once we have it, in a statement of its own, so the tables another node created
    # while we waited are seen.
    conn.execute("SELECT pg_advisory_lock(%s)", (WRITE_LOCK,))
    try:
        current = stored_version(conn)
        check_known(current)
        applied: list[Migration] = []
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            try:
                with conn.transaction():
                    migration.apply(conn)
                    conn.execute("DELETE FROM schema_version")
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                                 (migration.version,))
            except psycopg.Error as e:
                raise SchemaError(f"upgrade to schema version {migration.version} "
                                  f"({migration.summary}) failed: {first_line(e)}; the "
                                  f"database is unchanged at version {current}") from None
            applied.append(migration)
            current = migration.version
        return applied
    finally:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (WRITE_LOCK,))


def first_line(error: BaseException) -> str:
    """A driver error as one line (psycopg's messages may carry DETAIL lines)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
