"""Accounts in PostgreSQL, queried directly: what `mailserver-admin` uses, and where the
server's replica (mailserver.accounts_replica) loads from and writes to.

The account operations are SqlAccounts' (mailserver.accounts), statement for statement,
so every admin command behaves the same on SQLite and here; only the transactions
differ.  A read is one REPEATABLE READ, READ ONLY transaction (one consistent state for
alias expansion).  A write takes the accounts' advisory lock first, so writers from every
node and admin command run one after the other, as SQLite's BEGIN IMMEDIATE makes them;
at its commit the tables' triggers send NOTIFY accounts_changed
(mailserver.accounts_pg_schema).  Statements are parameterised, never formatted.

A driver error (the database down, a refused connection) is an AccountsError of one line
that shows the URL without its password.  A broken connection is replaced by a new one at
the next call.  Blocking: the server calls this only from threads.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.accounts import AccountsError, IAccounts, SqlAccounts, User
from mailserver.accounts_pg_schema import (CHANNEL, SCHEMA_VERSION, WRITE_LOCK, first_line,
                                           stored_version, upgrade)
from mailserver.accounts_schema import SchemaError
from mailserver.config import display_url

log = Logger()

# libpq settings a URL does not set itself: give up connecting after 10 s, and notice a
# peer that vanished without closing the connection (keepalives for an idle connection,
# a bound on unacknowledged data for a busy one).
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
    "application_name": "mailserver",
}


def connect(url: str) -> psycopg.Connection[Any]:
    """An autocommit connection to the accounts database; AccountsError (one line, no
    password) when there is none."""
    try:
        params = conninfo_to_dict(url)
        for key, value in CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        return psycopg.connect(make_conninfo(**params), autocommit=True)
    except psycopg.Error as e:
        raise AccountsError(f"cannot connect to the accounts database {display_url(url)}: "
                            f"{first_line(e)}") from None


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """SqlAccounts' statements use '?' parameters (sqlite3); psycopg's are '%s'."""
    return sql.replace("?", "%s")


class _Db:
    """A psycopg connection with sqlite3's execute(sql, args) and '?' parameters."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self.conn.execute(_pg_sql(sql), args)  # type: ignore[arg-type]


@implementer(IAccounts)
class PgAccounts(SqlAccounts):
    """The accounts database in PostgreSQL; safe to share between threads of one process
    (one connection, one transaction at a time)."""

    def __init__(self, url: str, subaddress_separator: str = "+", *,
                 statement_timeout: str | None = None) -> None:
        super().__init__(subaddress_separator)
        self.url = url
        self.display = display_url(url)
        self._conn: psycopg.Connection[Any] | None = None
        # A running server's statements wait at most this long, for a lock too (a table
        # locked by someone's CREATE INDEX); the schema upgrade at start is not bound.
        self._timeout: str | None = None
        with self._lock:
            conn = self._connection()
            try:
                applied = upgrade(conn)
                self._timeout = statement_timeout
                self._bound(conn)
            except SchemaError as e:
                self.close()
                raise AccountsError(f"{self.display}: {e}") from None
            except psycopg.Error as e:
                self.close()
                raise AccountsError(f"accounts database {self.display}: {first_line(e)}") \
                    from None
        if applied:
            log.info("accounts database {url} upgraded to schema version {version} "
                     "({steps})", url=self.display, version=SCHEMA_VERSION,
                     steps="; ".join(f"{m.version}: {m.summary}" for m in applied))

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._conn = None
            self._conn = conn = connect(self.url)
            self._bound(conn)
        return conn

    def _bound(self, conn: psycopg.Connection[Any]) -> None:
        if self._timeout is not None:
            for name in ("statement_timeout", "lock_timeout"):
                conn.execute("SELECT set_config(%s, %s, false)", (name, self._timeout))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> PgAccounts:
        return self

    # -- transactions ------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[_Db]:
        with self._lock, self._errors():
            conn = self._connection()
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield _Db(conn)

    @contextmanager
    def _write(self) -> Iterator[_Db]:
        with self._lock, self._errors():
            conn = self._connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                yield _Db(conn)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as e:
            raise AccountsError(f"accounts database {self.display}: {first_line(e)}") \
                from None

    # -- for the replica and mailserver-admin check -----------------------------------------

    def schema_version(self) -> int:
        with self._lock, self._errors():
            return stored_version(self._connection())

    def notify(self, payload: str) -> None:
        """NOTIFY accounts_changed with this payload (every replica wakes up)."""
        with self._lock, self._errors():
            self._connection().execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


Tables = tuple[list[str], list[User], list[tuple[str, str]]]


def read_tables(conn: psycopg.Connection[Any]) -> Tables:
    """Every domain, user and (alias, target) pair, in target order, from one consistent
    state of an autocommit connection.  psycopg.Error when the database is gone."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        domains = [row[0] for row in conn.execute("SELECT name FROM domains")]
        users = [User(*row) for row in conn.execute(
            "SELECT address, localpart, domain, password_hash, quota FROM users")]
        aliases = [(row[0], row[1]) for row in conn.execute(
            "SELECT source, target FROM aliases ORDER BY source, position")]
    return domains, users, aliases


def tables_of(accounts: PgAccounts) -> Tables:
    """read_tables over the accounts' own connection (the first load, at start)."""
    with accounts._lock, accounts._errors():
        return read_tables(accounts._connection())

