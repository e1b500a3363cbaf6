"""The server's accounts when they live in PostgreSQL: an in-memory replica, kept current.

Every server process holds the (small) domains, users and aliases tables as one immutable
`Snapshot`, loaded at start and loaded again whenever the database says they changed: the
tables' triggers send NOTIFY accounts_changed at every commit (mailserver-admin on any
node, the server's own hash upgrade, or SQL typed by hand), so a change made on one node
is seen by every node at once, without polling.  Reads (get_user, resolve, may_send_as,
is_local_domain, list_*) are answered from the snapshot in the reactor: no query, nothing
that waits on the network.

Threads.  One listener thread per process holds a connection doing LISTEN; when woken it
gathers every notification that arrives within COALESCE seconds (a burst of commits is
one reload), reads the three tables in one REPEATABLE READ transaction, builds a new
Snapshot and hands it to the reactor (reactor.callFromThread), which swaps it in whole:
no snapshot is ever changed once built, so a read never sees half a change.  Writes (the
server's only one is the argon2id upgrade of a hash after a login, in the hashing thread)
go straight to the database through `PgAccounts` and come back by NOTIFY.

Connection loss.  The listener reconnects with backoff (RECONNECT_MIN doubling up to
RECONNECT_MAX) and reloads once connected, so changes made meanwhile are caught.  The
last snapshot keeps answering for `fail_closed_after` seconds; after that `available()`
is False until a reload succeeds: AccountsChecker refuses every login (AccountsUnavailable,
a temporary failure for the protocols) and the MX answers RCPT for local addresses with
451 4.3.0 instead of trusting a copy that may be stale.  An idle connection is checked
every KEEPALIVE seconds, so a database that went away quietly is noticed too; one
statement that waits (a table locked by hand) fails after STATEMENT_TIMEOUT, and a listener
that has not heard the database for fail_closed_after + KEEPALIVE seconds, stuck in any
other way, fails closed too.  The tables are read again every RELOAD_EVERY seconds
anyway: a change no trigger announced (pg_restore makes the triggers last) is caught.

Other channels.  The same listening connection serves other LISTENers of the process
(`subscribe`: mailserver.crossnode's mail_changed), so a node holds one listening
connection whatever listens: their notifications are handed to them as they come, and
they are told each time the connection is (re)established, to catch up with what they
may have missed while nobody listened.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import psycopg
from twisted.application import service
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.accounts import (RESOLVED_MAX, AccountsError, IAccounts, Resolution, User,
                                 _domain, may_send_as_with, resolve_with)
from mailserver.accounts_pg import PgAccounts, Tables, connect, read_tables, tables_of
from mailserver.accounts_pg_schema import CHANNEL, first_line
from mailserver.addresses import AddressError, normalize, normalize_domain

log = Logger()

COALESCE = 0.02        # seconds to gather more notifications before one reload
KEEPALIVE = 10.0       # seconds between checks of an idle listening connection
# Seconds between reloads with nothing notified: a change no trigger announced (a
# pg_restore loads rows with COPY and makes the triggers last) is caught this late.
RELOAD_EVERY = 60.0
# A statement of the listener's that waits this long (a table locked by another
# session: ALTER TABLE, VACUUM FULL) fails, and the replica counts as unreachable.
STATEMENT_TIMEOUT = "10s"
WAKE = 1.0             # the listener looks at its stop flag at least this often
RECONNECT_MIN = 0.5
RECONNECT_MAX = 5.0
SYNC_PREFIX = "sync "  # NOTIFY payload of `sync`: answered once a reload has seen it
SYNC_RESEND = 0.5
SYNC_SEEN_MAX = 1000
_CHANNEL_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Subscription:
    """Another channel LISTENed on the accounts' connection (see `subscribe`)."""

    channel: str
    on_notify: Callable[[list[str]], None]    # the payloads of one burst
    on_connected: Callable[[], None]          # LISTEN is in effect (again)


@dataclass(frozen=True)
class Snapshot:
    """The accounts tables at one moment; a Lookup for alias expansion.  Never changed."""

    domains: frozenset[str]
    users: Mapping[str, User]
    aliases: Mapping[str, tuple[str, ...]]   # source -> targets in position order

    @classmethod
    def build(cls, tables: Tables) -> Snapshot:
        domains, users, alias_rows = tables
        aliases: dict[str, list[str]] = {}
        for source, target in alias_rows:
            aliases.setdefault(source, []).append(target)
        return cls(frozenset(domains),
                   MappingProxyType({u.address: u for u in users}),
                   MappingProxyType({s: tuple(t) for s, t in aliases.items()}))

    def has_domain(self, name: str) -> bool:
        return name in self.domains

    def user(self, address: str) -> User | None:
        return self.users.get(address)

    def targets(self, source: str) -> tuple[str, ...]:
        return self.aliases.get(source, ())

    def counts(self) -> str:
        return (f"{len(self.domains)} domains, {len(self.users)} users, "
                f"{len(self.aliases)} aliases")


@implementer(IAccounts)
class ReplicatedAccounts(service.Service):
    """IAccounts for a server node: reads from the replica, writes to the database.

    A twisted.application Service: the listener thread runs between startService and
    stopService (started with the server, after twistd has forked).  `call_in_reactor`
    hands the listener's results to the thread that reads (reactor.callFromThread by
    default; the tests, without a running reactor, call at once).
    """

    def __init__(self, url: str, subaddress_separator: str = "+",
                 fail_closed_after: float = 30.0, *,
                 call_in_reactor: Callable[..., Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.subaddress_separator = subaddress_separator
        self.fail_closed_after = fail_closed_after
        self.clock = clock
        if call_in_reactor is None:
            from twisted.internet import reactor

            call_in_reactor = reactor.callFromThread  # type: ignore[attr-defined]
        self._call = call_in_reactor
        # blocking: before the reactor
        self._store = PgAccounts(url, subaddress_separator, statement_timeout=STATEMENT_TIMEOUT)
        self.display = self._store.display
        try:
            self._snapshot = Snapshot.build(tables_of(self._store))
        except BaseException:
            self._store.close()
            raise
        self._resolved: dict[str, Resolution] = {}
        self._lost_since: float | None = None
        # When the listener last heard the database (set from its thread; read here):
        # a listener stuck anywhere fails closed as a lost connection does.
        self.last_contact = clock()
        self._listener: _Listener | None = None
        self._synced = threading.Condition()
        self._sync_seen: set[str] = set()
        self._subscriptions: list[Subscription] = []
        self.reloads = 0   # snapshots loaded by the listener (counted in its thread)
        log.info("accounts in {url}: {counts}", url=self.display,
                 counts=self._snapshot.counts())

    # -- other channels ----------------------------------------------------------------------

    def subscribe(self, channel: str, on_notify: Callable[[list[str]], None],
                  on_connected: Callable[[], None]) -> None:
        """LISTEN on `channel` too, on the listener's connection (call before the service
        starts).  Both callbacks run in the listener thread and must return at once (hand
        the work to the reactor): `on_notify(payloads)` with each burst of the channel's
        notifications, `on_connected()` each time the connection is (re)established, once
        LISTEN is in effect, since whatever was sent meanwhile was heard by nobody."""
        if not _CHANNEL_NAME.fullmatch(channel) or channel == CHANNEL:
            raise ValueError(f"not a channel to subscribe to: {channel!r}")
        self._subscriptions.append(Subscription(channel, on_notify, on_connected))

    # -- service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Opened before twistd forked to run in the background: the next write (from
        # this process's thread) opens a connection of its own.
        self._store.close()
        if self._listener is None:
            self._listener = _Listener(self)
            self._listener.start()

    def stopService(self) -> None:
        super().stopService()
        self._stop_listener()

    def _stop_listener(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def close(self) -> None:
        self._stop_listener()
        self._store.close()

    def __enter__(self) -> ReplicatedAccounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the listener hands over (in the reactor) ----------------------------------------

    def _install(self, snapshot: Snapshot, synced: frozenset[str]) -> None:
        """Swap in a newer snapshot, whole."""
        if self._lost_since is not None:
            log.info("accounts database {url} reachable again; reloaded ({counts})",
                     url=self.display, counts=snapshot.counts())
        self._snapshot = snapshot
        self._resolved = {}
        self._lost_since = None
        if synced:
            with self._synced:
                if len(self._sync_seen) > SYNC_SEEN_MAX:   # tokens nobody waits for
                    self._sync_seen.clear()
                self._sync_seen |= synced
                self._synced.notify_all()

    def _lost(self, since: float, reason: str) -> None:
        if self._lost_since is None:
            self._lost_since = since
            log.warn("accounts database {url} unreachable ({reason}); reconnecting. The "
                     "accounts as last loaded answer for {grace:g} s, then logins and RCPT "
                     "fail closed until it is back", url=self.display, reason=reason,
                     grace=self.fail_closed_after)

    def available(self) -> bool:
        lost = self._lost_since
        if lost is not None:
            return self.clock() - lost < self.fail_closed_after
        return self.clock() - self.last_contact < self.fail_closed_after + KEEPALIVE

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait (blocking; never in the reactor) until the replica holds every change
        committed before this call; False if that took longer than `timeout`.  The
        notification is sent again now and then: one sent while the listener was
        (re)connecting is heard by nobody."""
        deadline = time.monotonic() + timeout
        tokens: set[str] = set()
        while True:
            token = uuid.uuid4().hex
            tokens.add(token)
            self._store.notify(SYNC_PREFIX + token)
            left = deadline - time.monotonic()
            with self._synced:
                done = self._synced.wait_for(lambda: bool(tokens & self._sync_seen),
                                             min(SYNC_RESEND, max(left, 0.0)))
                if done or left <= SYNC_RESEND:
                    self._sync_seen -= tokens
                    return done

    # -- reads: from the snapshot ---------------------------------------------------------

    def list_domains(self) -> list[str]:
        return sorted(self._snapshot.domains)

    def is_local_domain(self, domain: str) -> bool:
        try:
            return normalize_domain(domain) in self._snapshot.domains
        except AddressError:
            return False

    def get_user(self, address: str) -> User | None:
        try:
            return self._snapshot.user(normalize(address))
        except AddressError:
            return None

    def list_users(self, domain: str | None = None) -> list[User]:
        users: Iterable[User] = self._snapshot.users.values()
        if domain is not None:
            name = _domain(domain)
            users = [u for u in users if u.domain == name]
        return sorted(users, key=lambda u: (u.domain, u.localpart))

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        aliases = self._snapshot.aliases
        order = sorted(aliases, key=lambda source: (source.rpartition("@")[2], source))
        return [(source, list(aliases[source])) for source in order]

    def resolve(self, address: str) -> Resolution:
        """resolve_with over the snapshot, remembered until the next one."""
        resolved = self._resolved
        known = resolved.get(address)
        if known is None:
            known = resolve_with(self._snapshot, address, self.subaddress_separator)
            if len(resolved) >= RESOLVED_MAX:
                resolved.clear()
            resolved[address] = known
        return known

    def may_send_as(self, login: str, address: str) -> bool:
        return may_send_as_with(self._snapshot, login, address, self.subaddress_separator)

    # -- writes: to the database (blocking; from a thread) -----------------------------------

    def add_domain(self, domain: str) -> str:
        return self._store.add_domain(domain)

    def del_domain(self, domain: str) -> None:
        self._store.del_domain(domain)

    def add_user(self, address: str, password_hash: str, quota: int | None = None) -> User:
        return self._store.add_user(address, password_hash, quota)

    def set_password(self, address: str, password_hash: str) -> None:
        self._store.set_password(address, password_hash)

    def replace_password_hash(self, address: str, old_hash: str, new_hash: str) -> bool:
        return self._store.replace_password_hash(address, old_hash, new_hash)

    def del_user(self, address: str) -> User:
        return self._store.del_user(address)

    def add_alias(self, alias: str, targets: list[str], *,
                  check_local_targets: bool = False) -> list[str]:
        return self._store.add_alias(alias, targets, check_local_targets=check_local_targets)

    def del_alias(self, alias: str) -> None:
        self._store.del_alias(alias)


class _Listener(threading.Thread):
    """LISTEN accounts_changed; reload and hand over on every burst of notifications."""

    def __init__(self, replica: ReplicatedAccounts) -> None:
        super().__init__(name="accounts-listener", daemon=True)
        self.replica = replica
        self._stopping = threading.Event()
        self._down = False     # a loss was reported and no reload has succeeded since
        self._served = False   # this connection loaded a snapshot

    def stop(self) -> None:
        """Ask the thread to end (within WAKE seconds); its connection is closed then."""
        self._stopping.set()

    def run(self) -> None:
        delay = RECONNECT_MIN
        while not self._stopping.is_set():
            self._served = False
            try:
                conn = connect(self.replica.url)
            except AccountsError as e:
                self._lost(str(e))
            else:
                try:
                    self._serve(conn)
                except psycopg.Error as e:
                    self._lost(first_line(e))
                except Exception as e:   # a bug here must not end the replica's updates
                    self._lost(f"{type(e).__name__}: {e}")
                finally:
                    conn.close()
            # After a connection that worked, the first retry comes soon; then slower.
            delay = RECONNECT_MIN if self._served else min(delay * 2, RECONNECT_MAX)
            if self._stopping.wait(delay):
                break

    def _serve(self, conn: psycopg.Connection[Any]) -> None:
        """Listen and reload until stopped (returns) or the connection fails (raises)."""
        conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
        conn.execute(f"SET lock_timeout = '{STATEMENT_TIMEOUT}'")
        conn.execute(f"LISTEN {CHANNEL}")
        subscriptions = list(self.replica._subscriptions)
        for sub in subscriptions:
            conn.execute(f"LISTEN {sub.channel}")
        self._reload(conn, frozenset())   # what changed while nobody listened
        for sub in subscriptions:
            self._hand(sub.on_connected)
        idle = 0.0
        reloaded = time.monotonic()
        while not self._stopping.is_set():
            notes = list(conn.notifies(timeout=WAKE, stop_after=1))
            if self._stopping.is_set():
                return
            if time.monotonic() - reloaded >= RELOAD_EVERY:
                self._reload(conn, frozenset())
                reloaded, idle = time.monotonic(), 0.0
            if not notes:
                idle += WAKE
                if idle >= KEEPALIVE:
                    conn.execute("SELECT 1")   # a connection that died quietly fails here
                    self.replica.last_contact = self.replica.clock()
                    idle = 0.0
                continue
            idle = 0.0
            self.replica.last_contact = self.replica.clock()
            notes += conn.notifies(timeout=COALESCE)
            for sub in subscriptions:
                payloads = [n.payload for n in notes if n.channel == sub.channel]
                if payloads:
                    self._hand(sub.on_notify, payloads)
            accounts = [n for n in notes if n.channel == CHANNEL]
            if not accounts:
                continue
            synced = frozenset(n.payload[len(SYNC_PREFIX):] for n in accounts
                               if n.payload.startswith(SYNC_PREFIX))
            self._reload(conn, synced)
            reloaded = time.monotonic()

    def _reload(self, conn: psycopg.Connection[Any], synced: frozenset[str]) -> None:
        snapshot = Snapshot.build(read_tables(conn))
        self.replica.last_contact = self.replica.clock()
        self.replica.reloads += 1
        self._down = False
        self._served = True
        self.replica._call(self.replica._install, snapshot, synced)

    @staticmethod
    def _hand(callback: Callable[..., None], *args: Any) -> None:
        """A subscriber's callback; its bug must not end the accounts' updates."""
        try:
            callback(*args)
        except Exception:
            log.failure("a LISTEN subscriber failed")

    def _lost(self, reason: str) -> None:
        if not self._down:
            self._down = True
            self.replica._call(self.replica._lost, self.replica.clock(), reason)
