"""Domains, users, aliases and their password hashes: the backend interface, and SQLite.

`IAccounts` is what the server and `mailserver-admin` use, and `open_accounts(config)`
picks its implementation from [accounts] url:

- "" (the default): `Accounts`, SQLite (WAL) under state_dir.  The running server and
  `mailserver-admin` open the same file at the same time.  There is no cache: every lookup
  is a query, so an admin change is visible to the server on its next lookup.  Point
  lookups on primary keys take microseconds, and in WAL mode readers never wait for a
  writer, so querying in the reactor thread is cheap; writes take the lock up front
  (BEGIN IMMEDIATE) and wait up to `BUSY_TIMEOUT_MS` for another writer.
- a postgresql:// URL: `mailserver.accounts_pg.PgAccounts` for `mailserver-admin` (every
  call a query, as here), and for the server `mailserver.accounts_replica.
  ReplicatedAccounts`, which answers reads from an in-memory copy refreshed on NOTIFY, so
  the reactor never waits on the network.

Both SQL backends share `SqlAccounts`: the same statements, checks and error lines, so
every admin command behaves the same against either.  Alias expansion and the sender
rules work over a `Lookup` (a transaction, or the in-memory copy).

All addresses are stored in the canonical form of `mailserver.addresses.normalize`, so
they compare case-insensitively as Dovecot's do.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sqlite3
import threading
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Protocol, Sequence

from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailserver.accounts_schema import SCHEMA_VERSION, SchemaError, upgrade
from mailserver.addresses import (AddressError, is_domain_literal, normalize, normalize_domain,
                                  relay_address, split_address, subaddress_base)

if TYPE_CHECKING:
    from mailserver.config import Config

log = Logger()

BUSY_TIMEOUT_MS = 5000
MAX_ALIAS_DEPTH = 10
RESOLVED_MAX = 4096  # addresses whose resolution is remembered (until the database changes)


class AccountsError(Exception):
    """A refused account change; the message is one line for the operator."""


class AccountsUnavailable(Exception):
    """The accounts cannot be trusted to be current (their database has been unreachable
    for longer than [accounts] fail_closed_after): logins and RCPT fail closed."""


@dataclass(frozen=True)
class User:
    address: str
    localpart: str
    domain: str
    password_hash: str = field(repr=False)
    quota: int | None = None  # bytes; None: no limit


@dataclass(frozen=True)
class Resolution:
    """Where mail for one RCPT TO address goes.

    kind: "nonlocal" (not one of our domains; local and remote are empty), "unknown" (a
    local domain but nothing to deliver to), or "ok".
    """
    kind: Literal["nonlocal", "unknown", "ok"]
    local: tuple[User, ...] = ()
    remote: tuple[str, ...] = ()


class IAccounts(Interface):
    """Domains, users and aliases, as the server and `mailserver-admin` use them.

    Reads (get_user, resolve, may_send_as, is_local_domain, list_*) are called in the
    reactor, so an implementation answers them without waiting on the network.  Writes may
    block: the admin tool calls them, the server only from a thread (the hash upgrade).
    Changes made by any process are seen by every other one without a restart.
    """

    subaddress_separator = Attribute("the separator of 'alice+tag' subaddresses")

    def close() -> None:
        """Release the database connection(s)."""

    def available() -> bool:
        """False while the accounts cannot be trusted to be current (their database
        unreachable for longer than the grace period): logins and RCPT then fail closed."""

    def add_domain(domain: str) -> str:
        """Add a domain; its normalised name.  AccountsError if it exists."""

    def del_domain(domain: str) -> None:
        """Remove an empty domain."""

    def list_domains() -> list[str]:
        """Every domain, sorted."""

    def is_local_domain(domain: str) -> bool:
        """Whether mail for this domain is ours (False for a malformed name)."""

    def add_user(address: str, password_hash: str, quota: int | None = None) -> User:
        """Add a user to an existing domain."""

    def set_password(address: str, password_hash: str) -> None:
        """Replace a user's password hash."""

    def replace_password_hash(address: str, old_hash: str, new_hash: str) -> bool:
        """Compare-and-set of the hash (the upgrade after a login); True if replaced."""

    def del_user(address: str) -> User:
        """Remove a user; the user as it was."""

    def get_user(address: str) -> User | None:
        """The user with this address (any case), or None."""

    def list_users(domain: str | None = None) -> list[User]:
        """Users (of one domain), by domain and local part."""

    def add_alias(alias: str, targets: list[str], *,
                  check_local_targets: bool = False) -> list[str]:
        """Add targets to an alias or catch-all; its full target list."""

    def del_alias(alias: str) -> None:
        """Remove an alias with all its targets."""

    def list_aliases() -> list[tuple[str, list[str]]]:
        """(alias, targets) pairs by domain and alias."""

    def resolve(address: str) -> Resolution:
        """Where mail to `address` goes, as SMTP needs it at RCPT time."""

    def may_send_as(login: str, address: str) -> bool:
        """May the user `login` use `address` as sender?"""


class Lookup(Protocol):
    """The three questions alias expansion asks, of one consistent state."""

    def has_domain(self, name: str) -> bool: ...
    def user(self, address: str) -> User | None: ...
    def targets(self, source: str) -> Sequence[str]: ...


class Db(Protocol):
    """A connection that runs one SQL statement with '?' parameters."""

    def execute(self, sql: str, args: Sequence[Any] = ..., /) -> Any: ...


@implementer(IAccounts)
class SqlAccounts(abc.ABC):
    """The account operations over SQL, shared by the SQLite and PostgreSQL backends: a
    subclass provides the connection handling (`_read`, `_write`, `close`)."""

    subaddress_separator = "+"

    def __init__(self, subaddress_separator: str = "+") -> None:
        self.subaddress_separator = subaddress_separator
        self._lock = threading.RLock()

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connections."""

    def __enter__(self) -> SqlAccounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Db]:
        """One snapshot for several queries (fresh for every call)."""

    @abc.abstractmethod
    def _write(self) -> AbstractContextManager[Db]:
        """One transaction, serialised with every other writer."""

    def available(self) -> bool:
        """A database read on every lookup is always current (or fails loudly)."""
        return True

    def resolve(self, address: str) -> Resolution:
        """Where mail to `address` goes, as SMTP needs it at RCPT time (`resolve_with`)."""
        return self._resolve(address)

    # -- domains ---------------------------------------------------------------------

    def add_domain(self, domain: str) -> str:
        name = _domain(domain)
        with self._write() as db:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise AccountsError(f"domain already exists: {name}")
            db.execute("INSERT INTO domains (name) VALUES (?)", (name,))
        return name

    def del_domain(self, domain: str) -> None:
        """Remove an empty domain; refused while users or aliases remain in it."""
        name = _domain(domain)
        with self._write() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone():
                raise AccountsError(f"no such domain: {name}")
            users = db.execute("SELECT count(*) FROM users WHERE domain = ?", (name,)).fetchone()[0]
            aliases = db.execute("SELECT count(DISTINCT source) FROM aliases WHERE domain = ?",
                                 (name,)).fetchone()[0]
            if users or aliases:
                raise AccountsError(f"domain {name} is not empty ({users} users, {aliases} "
                                    "aliases): delete them first")
            db.execute("DELETE FROM domains WHERE name = ?", (name,))

    def list_domains(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT name FROM domains ORDER BY name")]

    def is_local_domain(self, domain: str) -> bool:
        try:
            name = normalize_domain(domain)
        except AddressError:
            return False
        with self._read() as db:
            return self._has_domain(db, name)

    @staticmethod
    def _has_domain(db: Db, name: str) -> bool:
        return db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is not None

    def _require_domain(self, db: Db, name: str) -> None:
        if not self._has_domain(db, name):
            raise AccountsError(f"no such domain: {name} (add it first)")

    # -- users -----------------------------------------------------------------------

    def add_user(self, address: str, password_hash: str, quota: int | None = None) -> User:
        local, domain = _address(address)
        user = User(f"{local}@{domain}", local, domain, _hash(password_hash), _quota(quota))
        with self._write() as db:
            self._require_domain(db, domain)
            if self._get_user(db, user.address):
                raise AccountsError(f"user already exists: {user.address}")
            db.execute("INSERT INTO users (address, localpart, domain, password_hash, quota) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (user.address, local, domain, user.password_hash, user.quota))
        return user

    def set_password(self, address: str, password_hash: str) -> None:
        addr = "@".join(_address(address))
        with self._write() as db:
            cur = db.execute("UPDATE users SET password_hash = ? WHERE address = ?",
                             (_hash(password_hash), addr))
            if cur.rowcount == 0:
                raise AccountsError(f"no such user: {addr}")

    def replace_password_hash(self, address: str, old_hash: str, new_hash: str) -> bool:
        """Swap the hash only if it is still `old_hash` (an upgrade must not undo a change
        the admin made meanwhile); True if replaced."""
        addr = "@".join(_address(address))
        with self._write() as db:
            cur = db.execute("UPDATE users SET password_hash = ? "
                             "WHERE address = ? AND password_hash = ?",
                             (_hash(new_hash), addr, old_hash))
            return cur.rowcount > 0

    def del_user(self, address: str) -> User:
        addr = "@".join(_address(address))
        with self._write() as db:
            user = self._get_user(db, addr)
            if user is None:
                raise AccountsError(f"no such user: {addr}")
            db.execute("DELETE FROM users WHERE address = ?", (addr,))
        return user

    def get_user(self, address: str) -> User | None:
        """The user with this address (any case), or None, also for a malformed address."""
        try:
            addr = normalize(address)
        except AddressError:
            return None
        with self._read() as db:
            return self._get_user(db, addr)

    def list_users(self, domain: str | None = None) -> list[User]:
        query = "SELECT address, localpart, domain, password_hash, quota FROM users"
        args: tuple[str, ...] = ()
        if domain is not None:
            query += " WHERE domain = ?"
            args = (_domain(domain),)
        with self._read() as db:
            return [User(*row) for row in db.execute(query + " ORDER BY domain, localpart", args)]

    @staticmethod
    def _get_user(db: Db, address: str) -> User | None:
        row = db.execute("SELECT address, localpart, domain, password_hash, quota FROM users "
                         "WHERE address = ?", (address,)).fetchone()
        return User(*row) if row else None

    # -- aliases ---------------------------------------------------------------------

    def add_alias(self, alias: str, targets: list[str], *,
                  check_local_targets: bool = False) -> list[str]:
        """Add targets to an alias (created if new); returns the alias's full target list.

        `alias` may be '@domain', the catch-all for that domain.  Targets are addresses,
        local or remote.  With `check_local_targets` (the admin command), a target in a
        local domain must lead to a mailbox now (a user, an alias, a subaddress or the
        domain's catch-all), else AccountsError: mail to it would only be dropped and
        logged at delivery.  Without, such targets are stored and cut when resolved.
        """
        source, domain = _alias_source(alias)
        if not targets:
            raise AccountsError("an alias needs at least one target")
        checked: list[tuple[str, str]] = []   # (normalised, as written but its domain)
        for target in targets:
            try:
                t = normalize(target.strip())
                written = relay_address(target.strip())
            except AddressError as e:
                raise AccountsError(f"bad alias target {target!r}: {e}") from None
            if is_domain_literal(t.rpartition("@")[2]):
                raise AccountsError(f"bad alias target {target!r}: domain literal")
            checked.append((t, written))
        with self._write() as db:
            self._require_domain(db, domain)
            # RFC 5321 2.4: a local part in a domain hosted elsewhere keeps its case
            # (only that domain's server may interpret it); ours are case-insensitive.
            clean: list[str] = []
            for t, written in checked:
                if not self._has_domain(db, t.rpartition("@")[2]):
                    t = written
                if t not in clean:
                    clean.append(t)
            if check_local_targets:
                for t in clean:
                    self._require_mailbox(db, source, t)
            existing = self._targets(db, source)
            position = len(existing)
            for t in clean:
                if t not in existing:
                    db.execute("INSERT INTO aliases (source, domain, target, position) "
                               "VALUES (?, ?, ?, ?)", (source, domain, t, position))
                    existing.append(t)
                    position += 1
            return existing

    def _require_mailbox(self, db: Db, source: str, target: str) -> None:
        """A local alias target must reach somebody (remote targets are not checked)."""
        domain = target.rpartition("@")[2]
        if not self._has_domain(db, domain):
            return
        if target == source:   # the alias keeps a copy in the mailbox of the same name
            if self._get_user(db, target) is None:
                raise AccountsError(f"alias target {target} is the alias itself, and there "
                                    f"is no user {target} to keep a copy")
            return
        if not _Expansion(_DbLookup(db), self.subaddress_separator, {}, {}).expand(target, 0):
            raise AccountsError(f"alias target {target}: no such user or alias in {domain} "
                                f"(a local domain), so mail to it would be dropped")

    def del_alias(self, alias: str) -> None:
        source, _ = _alias_source(alias)
        with self._write() as db:
            if db.execute("DELETE FROM aliases WHERE source = ?", (source,)).rowcount == 0:
                raise AccountsError(f"no such alias: {source}")

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        with self._read() as db:
            rows = db.execute("SELECT source, target FROM aliases "
                              "ORDER BY domain, source, position").fetchall()
        result: dict[str, list[str]] = {}
        for source, target in rows:
            result.setdefault(source, []).append(target)
        return list(result.items())

    @staticmethod
    def _targets(db: Db, source: str) -> list[str]:
        return [r[0] for r in db.execute(
            "SELECT target FROM aliases WHERE source = ? ORDER BY position", (source,))]

    # -- resolution --------------------------------------------------------------------

    def _resolve(self, address: str) -> Resolution:
        with self._read() as db:
            return resolve_with(_DbLookup(db), address, self.subaddress_separator)

    def may_send_as(self, login: str, address: str) -> bool:
        """May the user `login` use `address` as sender (`may_send_as_with`)?"""
        with self._read() as db:
            return may_send_as_with(_DbLookup(db), login, address, self.subaddress_separator)


@implementer(IAccounts)
class Accounts(SqlAccounts):
    """The SQLite accounts database; safe to share between threads of one process."""

    def __init__(self, path: str | Path, subaddress_separator: str = "+") -> None:
        super().__init__(subaddress_separator)
        self.path = Path(path)
        self._db = _open(self.path)
        # resolve() answers by address, valid while the database is unchanged: SQLite's
        # data_version tells of other processes' commits (mailserver-admin), _write of ours.
        self._resolved: dict[str, Resolution] = {}
        self._resolved_version: int | None = None
        try:
            self._init_schema()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def from_config(cls, config: Config) -> Accounts:
        """The SQLite accounts database of this configuration (config.accounts_db);
        `open_accounts` picks the backend [accounts] names."""
        return cls(config.accounts_db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Accounts:
        return self

    # -- transactions --------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise AccountsError(f"accounts database busy: {e}") from None
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._resolved.clear()

    def _init_schema(self) -> None:
        """Bring the file to this release's schema (mailserver.accounts_schema)."""
        with self._lock:
            try:
                applied = upgrade(self._db)
            except SchemaError as e:
                raise AccountsError(f"{self.path}: {e}") from None
            finally:
                self._resolved.clear()
        if applied:
            log.info("accounts database {path} upgraded to schema version {version} "
                     "({steps})", path=str(self.path), version=SCHEMA_VERSION,
                     steps="; ".join(f"{m.version}: {m.summary}" for m in applied))

    def resolve(self, address: str) -> Resolution:
        """Where mail to `address` goes (`resolve_with`), remembered while the file is
        unchanged: SQLite's data_version tells of other processes' commits."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._resolved_version:
                self._resolved.clear()
                self._resolved_version = version
            known = self._resolved.get(address)
            if known is None:
                known = self._resolve(address)
                if len(self._resolved) >= RESOLVED_MAX:
                    self._resolved.clear()
                self._resolved[address] = known
            return known


# -- resolution ----------------------------------------------------------------------------

class _DbLookup:
    """A Lookup inside one read or write transaction."""

    def __init__(self, db: Db) -> None:
        self.db = db

    def has_domain(self, name: str) -> bool:
        return SqlAccounts._has_domain(self.db, name)

    def user(self, address: str) -> User | None:
        return SqlAccounts._get_user(self.db, address)

    def targets(self, source: str) -> list[str]:
        return SqlAccounts._targets(self.db, source)


def resolve_with(lookup: Lookup, address: str, separator: str) -> Resolution:
    """Where mail to `address` goes, as SMTP needs it at RCPT time.

    Lookup order: an exact alias, then a user, then the subaddress base ('alice+tag'
    -> alias or user 'alice'), then the domain's catch-all '@domain'.  Aliases expand
    recursively; loops and chains deeper than MAX_ALIAS_DEPTH are cut, and a local
    target that leads nowhere is dropped (logged).  A malformed address is "unknown".
    """
    try:
        local, domain = split_address(address)
    except AddressError:
        return Resolution("unknown")
    if is_domain_literal(domain) or not lookup.has_domain(domain):
        return Resolution("nonlocal")
    users: dict[str, User] = {}
    remote: dict[str, None] = {}
    _Expansion(lookup, separator, users, remote).expand(f"{local}@{domain}", 0)
    if not users and not remote:
        return Resolution("unknown")
    return Resolution("ok", tuple(users.values()), tuple(remote))


def any_postmaster(accounts: IAccounts) -> tuple[str, Resolution] | None:
    """The first local domain's postmaster that leads somewhere: its address and where
    it goes (None when no domain has one)."""
    for domain in accounts.list_domains():
        address = f"postmaster@{domain}"
        res = accounts.resolve(address)
        if res.kind == "ok" and (res.local or res.remote):
            return address, res
    return None


def with_postmaster(accounts: IAccounts, address: str, res: Resolution) -> Resolution:
    """`res` for `address`, except that a local domain's postmaster with no user or alias
    of its own is another domain's (any_postmaster): RFC 5321 4.5.1 wants postmaster@
    every domain we take mail for, and `domain add` does not make one."""
    if res.kind != "unknown" or address.rpartition("@")[0].lower() != "postmaster":
        return res
    found = any_postmaster(accounts)
    return found[1] if found is not None else res


def may_send_as_with(lookup: Lookup, login: str, address: str, separator: str) -> bool:
    """May the user `login` use `address` as sender (RFC 6409 8.1 territory)?

    Yes for the user's own address and its subaddresses ('alice+news'), and for an
    alias (not a catch-all) that delivers to the user.  Lookup order is that of
    `resolve`, so an address that reaches someone else is never the user's.
    """
    try:
        local, domain = split_address(address)
        owner = normalize(login)
    except AddressError:
        return False
    if is_domain_literal(domain) or not lookup.has_domain(domain):
        return False
    candidates = [f"{local}@{domain}"]
    base = subaddress_base(local, separator)
    if base is not None:
        candidates.append(f"{base}@{domain}")
    for candidate in candidates:
        targets = lookup.targets(candidate)
        if targets:
            users: dict[str, User] = {}
            _Expansion(lookup, separator, users, {})._expand_targets(candidate, targets, 0)
            return owner in users
        if candidate == owner:
            return lookup.user(owner) is not None
        if lookup.user(candidate) is not None:
            return False
    return False


class _Expansion:
    """One recursive alias expansion over one consistent state."""

    def __init__(self, lookup: Lookup, separator: str,
                 users: dict[str, User], remote: dict[str, None]) -> None:
        self.separator = separator
        self.lookup = lookup
        self.users = users
        self.remote = remote
        self.active: set[str] = set()     # being expanded: meeting one again is a loop
        self.done: dict[str, bool] = {}   # expanded already: its result is counted

    def expand(self, address: str, depth: int) -> bool:
        """Collect where `address` (in a local domain) leads; False if nowhere."""
        if address in self.done:
            return self.done[address]
        if address in self.active:
            log.info("alias loop at {address}: cut", address=address)
            return False
        if depth > MAX_ALIAS_DEPTH:
            log.warn("alias chain deeper than {max} at {address}: cut",
                     max=MAX_ALIAS_DEPTH, address=address)
            return False
        self.active.add(address)
        try:
            found = self._lookup(address, depth)
        finally:
            self.active.discard(address)
        self.done[address] = found
        return found

    def _lookup(self, address: str, depth: int) -> bool:
        lookup = self.lookup
        targets = lookup.targets(address)
        if targets:
            return self._expand_targets(address, targets, depth)
        if self._add_user(address):
            return True
        local, domain = address.rsplit("@", 1)
        base = subaddress_base(local, self.separator)
        if base is not None:
            base_address = f"{base}@{domain}"
            targets = lookup.targets(base_address)
            if targets:
                return self._expand_targets(base_address, targets, depth)
            if self._add_user(base_address):
                return True
        catch_all = "@" + domain
        targets = lookup.targets(catch_all)
        if targets:
            return self._expand_targets(catch_all, targets, depth)
        return False

    def _add_user(self, address: str) -> bool:
        user = self.lookup.user(address)
        if user is None:
            return False
        self.users.setdefault(user.address, user)
        return True

    def _expand_targets(self, source: str, targets: Sequence[str], depth: int) -> bool:
        found = False
        for target in targets:
            if not self.lookup.has_domain(target.rpartition("@")[2]):
                self.remote.setdefault(target, None)
                found = True
                continue
            if not target.islower():   # written when its domain was hosted elsewhere
                with contextlib.suppress(AddressError):
                    target = normalize(target)
            if target == source:
                # An alias naming itself keeps a copy in the same-named mailbox.
                if self._add_user(target):
                    found = True
                else:
                    log.warn("alias {source} names itself but there is no such user: "
                             "dropped", source=source)
            elif self.expand(target, depth + 1):
                found = True
            else:
                log.warn("alias target {target} (of {source}) leads nowhere: dropped",
                         target=target, source=source)
        return found


# -- the backend of a configuration --------------------------------------------------------

def open_accounts(config: Config, *, server: bool = False) -> IAccounts:
    """The accounts [accounts] url names: SQLite in state_dir when it is empty, else
    PostgreSQL, for the server (`server=True`) as an in-memory replica refreshed on
    NOTIFY (a twisted.application Service: start it with the server), for
    mailserver-admin as direct queries.  AccountsError (one line) when it cannot be opened.
    """
    url = config.accounts.url
    if not url:
        return Accounts(config.accounts_db)
    try:
        if server:
            from mailserver.accounts_replica import ReplicatedAccounts

            return ReplicatedAccounts(url, fail_closed_after=config.accounts.fail_closed_after)
        from mailserver.accounts_pg import PgAccounts

        return PgAccounts(url)
    except ImportError as e:
        if (e.name or "").partition(".")[0] != "psycopg":
            raise
        raise AccountsError("accounts.url names a PostgreSQL database, but the driver is "
                            "not installed: pip install 'mailserver[postgresql]' "
                            "(psycopg)") from None


# -- helpers -------------------------------------------------------------------------------

def _open(path: Path) -> sqlite3.Connection:
    """Open (creating with private permissions) the database in WAL mode."""
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, mode=0o700)
            os.chmod(parent, 0o700)
        except OSError as e:
            raise AccountsError(f"cannot create {parent}: {e.strerror}") from None
    try:
        # Created 0600 before SQLite touches it; SQLite gives its -wal/-shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as e:
        raise AccountsError(f"cannot open accounts database {path}: {e}") from None
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AccountsError(f"{path}: cannot switch to WAL mode (got {mode})")
        db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as e:
        db.close()
        raise AccountsError(f"cannot open accounts database {path}: {e}") from None
    return db


def _domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except AddressError as e:
        raise AccountsError(f"bad domain {domain!r}: {e}") from None


def _address(address: str) -> tuple[str, str]:
    try:
        local, domain = split_address(address)
    except AddressError as e:
        raise AccountsError(f"bad address {address!r}: {e}") from None
    if is_domain_literal(domain):
        raise AccountsError(f"bad address {address!r}: a domain literal cannot be hosted")
    return local, domain


def _alias_source(alias: str) -> tuple[str, str]:
    """(source key, domain) for 'alias@domain' or the catch-all '@domain'."""
    if isinstance(alias, str) and alias.startswith("@") and alias.count("@") == 1:
        domain = _domain(alias[1:])
        return "@" + domain, domain
    local, domain = _address(alias)
    return f"{local}@{domain}", domain


def _hash(password_hash: str) -> str:
    if not isinstance(password_hash, str) or not password_hash:
        raise AccountsError("empty password hash")
    if any(c in password_hash for c in "\r\n\x00"):
        raise AccountsError("password hash contains line breaks or NUL")
    return password_hash


def _quota(quota: int | None) -> int | None:
    if quota is None:
        return None
    if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
        raise AccountsError(f"bad quota {quota!r}: expected bytes >= 0")
    return quota or None
