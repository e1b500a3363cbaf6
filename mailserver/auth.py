"""Authentication shared by SMTP submission, IMAP and POP3: checker, throttle, realm, portal.

Protocol -> portal -> `AccountsChecker` (password against the accounts database) ->
`MailRealm` (the avatar the protocol module registered for its interface).  Password
hashing is slow on purpose, so it runs in a thread pool of its own: as many threads as
cores (argon2id is CPU-bound and takes 46 MiB each), and never queued behind storage work
in the reactor's pool, so a login answers in the same time whatever the folders are doing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer
from zope.interface.interface import InterfaceClass

from mailserver.accounts import AccountsUnavailable, IAccounts
from mailserver.addresses import AddressError, normalize
from mailserver.hashprocess import HashProcess
from mailserver.passwords import hash_password, needs_rehash, verify_password

log = Logger()

HASH_THREADS = max(2, os.cpu_count() or 2)
_hash_pool: ThreadPool | None = None


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


def in_hash_pool(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """Run a password hash function in the hashing pool (started with the reactor, stopped
    with it; its threads never hold up the process's exit)."""
    global _hash_pool
    from twisted.internet import reactor

    if _hash_pool is None:
        pool = ThreadPool(minthreads=0, maxthreads=HASH_THREADS, name="password-hash")
        pool.threadFactory = _daemon_thread  # type: ignore[assignment]
        # Its threads start with the reactor, as the reactor's own pool's do: twistd
        # builds the server (and its checker asks for the unknown users' dummy hash)
        # before the fork that makes it a daemon, and threads do not survive a fork;
        # work queued before then waits for them.
        reactor.callWhenRunning(pool.start)  # type: ignore[attr-defined]
        reactor.addSystemEventTrigger("during", "shutdown", pool.stop)  # type: ignore[attr-defined]
        _hash_pool = pool
    return threads.deferToThreadPool(reactor, _hash_pool, fn, *args)  # type: ignore[arg-type]


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class VerifiedLogins:
    """Logins verified in the last `ttl` seconds, so a client that logs in again (every
    poll, every new IMAP connection) is not made to wait for argon2id each time, as
    Dovecot's auth cache spares it.

    What is kept is an HMAC-SHA256, under a key made at start and never written
    anywhere, of the stored hash and the password: never the password.  An entry counts
    only while the user's stored hash is the one it was made with, so a password change
    (or a hash upgrade) drops it at once, also when `mailserver-admin` made the change.
    Only successes are kept: a wrong password always costs a full verification, so
    guessing gains nothing.  At most `size` entries (the least recently used go).
    """

    def __init__(self, ttl: float, size: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._key = os.urandom(32)
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def _mac(self, stored_hash: str, password: str | bytes) -> bytes:
        secret = password.encode("utf-8") if isinstance(password, str) else password
        return hmac.new(self._key, stored_hash.encode("utf-8") + b"\0" + secret,
                        hashlib.sha256).digest()

    def known(self, address: str, stored_hash: str, password: str | bytes) -> bool:
        """Whether this address logged in with this password (and this stored hash)
        within the last ttl seconds."""
        entry = self._entries.get(address)
        if entry is None:
            return False
        mac, expires = entry
        if self.clock() >= expires:
            del self._entries[address]
            return False
        if not hmac.compare_digest(mac, self._mac(stored_hash, password)):
            return False
        self._entries.move_to_end(address)
        return True

    def remember(self, address: str, stored_hash: str, password: str | bytes) -> None:
        if self.ttl <= 0:
            return
        self._entries[address] = (self._mac(stored_hash, password), self.clock() + self.ttl)
        self._entries.move_to_end(address)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


@implementer(ICredentialsChecker)
class AccountsChecker:
    """Checks an address and password against `Accounts`.

    The username is the full address, in any case; the avatarId is its normalised form,
    as str (not bytes as some Twisted checkers use: addresses are text everywhere here).
    An unknown user still costs one hash verification against a dummy hash, so response
    time does not reveal which addresses exist.  With `upgrade_hashes`, a successful
    login replaces a hash from an older scheme (an imported {SHA512-CRYPT}, {PLAIN}...)
    by argon2id.  While the accounts cannot be trusted to be current (`available()`
    False: their database unreachable too long), every login fails closed with
    AccountsUnavailable, which the protocols answer as a temporary failure.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, accounts: IAccounts, upgrade_hashes: bool = True,
                 verified: VerifiedLogins | None = None,
                 hash_process: HashProcess | None = None) -> None:
        self.accounts = accounts
        self.upgrade_hashes = upgrade_hashes
        self.verified = verified
        self.hash_process = hash_process
        # Same parameters as a real hash, so verifying it costs the same; made in the
        # hashing pool (a tenth of a second of CPU) on first need, not at start.
        self._dummy_hash: str | None = None
        self._dummy_making: defer.Deferred[str] | None = None
        self._dummy()   # ready before the first unknown user asks
        # address -> its hash upgrade under way (one at a time per address)
        self.upgrading: dict[str, defer.Deferred[None]] = {}

    def requestAvatarId(self, credentials: IUsernamePassword) -> defer.Deferred[str]:
        if not self.accounts.available():
            return defer.fail(AccountsUnavailable("accounts database unavailable"))
        try:
            address: str | None = normalize(_text(credentials.username))
        except (AddressError, UnicodeDecodeError):
            address = None
        try:
            user = self.accounts.get_user(address) if address else None
        except Exception:
            return defer.fail()
        password = credentials.password
        if user is not None and self.verified is not None and self.verified.known(
                user.address, user.password_hash, password):
            return defer.succeed(user.address)
        if user is not None:
            d = self._verify(user.password_hash, password)
        else:
            d = self._dummy().addCallback(lambda dummy: self._verify(dummy, password))
        stored = user.password_hash if user else ""

        def checked(ok: bool) -> Any:
            if not (ok and user):
                raise UnauthorizedLogin("invalid credentials")
            if self.upgrade_hashes and needs_rehash(stored):
                # The login does not wait for it: the database write could wait on a
                # lock without bound, and the client has proved its password already.
                if user.address not in self.upgrading:
                    self._upgrade(user.address, stored, password)
                return user.address
            if self.verified is not None:
                self.verified.remember(user.address, stored, password)
            return user.address

        return d.addCallback(checked)

    def _verify(self, stored: str, password: str | bytes) -> defer.Deferred[bool]:
        """The hash process when it can take it (a child that died meanwhile: the
        threads after all), else the hashing threads."""
        if self.hash_process is not None:
            d = self.hash_process.verify(stored, password)
            if d is not None:
                return d.addErrback(
                    lambda _: in_hash_pool(verify_password, stored, password))
        return in_hash_pool(verify_password, stored, password)

    def _dummy(self) -> defer.Deferred[str]:
        """The hash an unknown user's password is verified against."""
        if self._dummy_hash is not None:
            return defer.succeed(self._dummy_hash)
        if self._dummy_making is None:
            def made(value: str) -> str:
                self._dummy_hash = value
                return value

            def failed(f: Any) -> Any:
                self._dummy_making = None   # tried again next time
                return f
            self._dummy_making = in_hash_pool(hash_password, "dummy password for unknown users")
            self._dummy_making.addCallbacks(made, failed)
        waiter: defer.Deferred[str] = defer.Deferred()
        self._dummy_making.addBoth(lambda result: waiter.callback(result) or result)
        return waiter

    def _upgrade(self, address: str, old: str, password: str | bytes) -> None:
        """Re-hash with argon2id after a successful login, and store the new hash, both in
        the hashing pool, while the login goes on; failures only get logged."""
        d = self.upgrading[address] = in_hash_pool(_rehash, self.accounts, address, old,
                                                   password)
        d.addCallback(lambda replaced: replaced and log.info(
            "password hash of {address} upgraded to argon2id", address=address))
        d.addErrback(lambda f: log.failure("cannot upgrade password hash of {address}", f,
                                           address=address))

        def finished(_: Any) -> None:
            del self.upgrading[address]
        d.addBoth(finished)


def _rehash(accounts: IAccounts, address: str, old: str, password: str | bytes) -> bool:
    """In a hashing thread: argon2id of `password`, swapped in if the hash is still `old`."""
    return accounts.replace_password_hash(address, old, hash_password(password))


_Failure = tuple[float, str]  # (time, account)
_Table = OrderedDict[str, deque[_Failure]]


class AuthThrottle:
    """Counts failed logins per client IP and per account; says how long to stall a reply.

    Shared by every protocol, so guessing on IMAP also slows SMTP AUTH from that client.
    The delay is 0 until `delay_after` failures within `window` seconds, then 1, 2, 4, ...
    seconds, capped at MAX_DELAY.  IPv6 clients count per /64, the block one client
    usually controls.  Each table holds at most `max_entries` keys (least recently failed
    evicted first), so a flood of addresses cannot exhaust memory.
    """

    MAX_DELAY = 15.0

    def __init__(self, delay_after: int, window: float, clock: IReactorTime | None = None,
                 max_entries: int = 100_000) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.delay_after = delay_after
        self.window = window
        self.clock = clock
        self.max_entries = max_entries
        # Enough remembered failures to reach the cap; older ones no longer change anything.
        self._keep = max(delay_after, 1) + 8
        self._by_ip: _Table = OrderedDict()
        self._by_account: _Table = OrderedDict()

    def failure(self, ip: str, account: str) -> None:
        """`account` "" when none was named (undecodable SASL data): counted for the IP
        only, never under one key every such client would share."""
        now = self.clock.seconds()
        ip_key, account_key = _ip_key(ip), account.lower()
        self._touch(self._by_ip, ip_key).append((now, account_key))
        if account_key:
            self._touch(self._by_account, account_key).append((now, account_key))

    def success(self, ip: str, account: str) -> None:
        """Forget this account's failures (also from this IP's count, but not the IP's
        failures on other accounts: logging into one's own account must not reset a
        guessing run against others)."""
        ip_key, account_key = _ip_key(ip), account.lower()
        self._by_account.pop(account_key, None)
        entries = self._by_ip.get(ip_key)
        if entries is not None:
            kept = [e for e in entries if e[1] != account_key]
            if kept:
                self._by_ip[ip_key] = deque(kept, maxlen=self._keep)
            else:
                del self._by_ip[ip_key]

    def failures(self, ip: str, account: str) -> int:
        """Recent failures that count for this (ip, account): the larger of the two."""
        cutoff = self.clock.seconds() - self.window
        by_ip = self._by_ip.get(_ip_key(ip), ())
        by_account = self._by_account.get(account.lower(), ()) if account else ()
        return max(sum(1 for t, _ in by_ip if t > cutoff),
                   sum(1 for t, _ in by_account if t > cutoff))

    def delay(self, ip: str, account: str) -> float:
        """Seconds to wait before the next reply to this client about this account."""
        n = self.failures(ip, account)
        if n == 0 or n < self.delay_after:
            return 0.0
        return min(self.MAX_DELAY, float(2 ** min(n - self.delay_after, 8)))

    def _touch(self, table: _Table, key: str) -> deque[_Failure]:
        entries = table.get(key)
        if entries is None:
            self._prune(table)
            entries = table[key] = deque(maxlen=self._keep)
        else:
            table.move_to_end(key)
        return entries

    def _prune(self, table: _Table) -> None:
        cutoff = self.clock.seconds() - self.window
        while table:
            entries = next(iter(table.values()))
            if len(table) >= self.max_entries or not entries or entries[-1][0] <= cutoff:
                table.popitem(last=False)
            else:
                break


def _ip_key(ip: str) -> str:
    """The IP itself, or its /64 for IPv6 (an IPv4-mapped address counts as IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def inbox_warmer(accounts: IAccounts, store: Any) -> Callable[[bytes], None]:
    """username -> start loading that user's INBOX (MaildirStore.warm_inbox) while the
    password is verified; IMAP and POP3 call it as a login begins.  Unknown or malformed
    names cost nothing.  It reveals nothing an MX's RCPT does not: the answer still waits
    for the verification, which costs the same for every name."""

    def warm(username: bytes) -> None:
        try:
            user = accounts.get_user(normalize(_text(username)))
        except Exception:   # a malformed name, accounts unavailable: the login will say
            return
        if user is not None:
            store.warm_inbox(user.domain, user.localpart)

    return warm


def throttled_login(portal: Portal, throttle: AuthThrottle, clock: IReactorTime, ip: str,
                    account: str, user: bytes, password: bytes, interface: InterfaceClass,
                    warm: Callable[[bytes], None] | None = None) -> defer.Deferred[Any]:
    """A front end's password login (IMAP LOGIN and AUTHENTICATE, POP3 PASS and AUTH,
    ManageSieve AUTHENTICATE): the portal's Deferred (interface, avatar, logout), after
    the delay the throttle puts on this client and account, for a right password too (a
    guesser cannot tell success from a quick answer).  `warm` starts loading the user's
    INBOX beside the check, unless the client is being held back."""
    delay = throttle.delay(ip, account)
    if not delay and warm is not None:
        warm(user)
    d: defer.Deferred[Any] = (task.deferLater(clock, delay, lambda: None)
                              if delay else defer.succeed(None))
    return d.addCallback(lambda _: portal.login(UsernamePassword(user, password), None,
                                                interface))


@implementer(IRealm)
class MailRealm:
    """Maps the interface a protocol asks for to the avatar factory registered for it.

    A factory takes the avatarId (the normalised address, str) and returns the avatar or a
    Deferred firing with it.  If the avatar has a callable `logout`, it is the logout
    callback; otherwise logout does nothing.
    """

    def __init__(self) -> None:
        self._factories: dict[InterfaceClass, Callable[[str], Any]] = {}

    def register(self, interface: InterfaceClass, factory: Callable[[str], Any]) -> None:
        self._factories[interface] = factory

    def requestAvatar(self, avatarId: str | bytes, mind: object,
                      *interfaces: InterfaceClass) -> Any:
        avatar_id = _text(avatarId)
        for iface in interfaces:
            factory = self._factories.get(iface)
            if factory is None:
                continue
            result = factory(avatar_id)
            if isinstance(result, defer.Deferred):
                return result.addCallback(lambda avatar, i=iface: _login_tuple(i, avatar))
            return _login_tuple(iface, result)
        raise NotImplementedError(
            f"no avatar for {', '.join(i.__name__ for i in interfaces) or 'no interface'}")


def _login_tuple(iface: InterfaceClass,
                 avatar: Any) -> tuple[InterfaceClass, Any, Callable[[], None]]:
    logout = getattr(avatar, "logout", None)
    return iface, avatar, logout if callable(logout) else (lambda: None)


def build_portal(accounts: IAccounts, realm: MailRealm, login_cache_ttl: float = 0.0,
                 hash_process: HashProcess | None = None) -> Portal:
    """The portal every protocol logs in through; `login_cache_ttl` > 0 keeps verified
    logins that long (VerifiedLogins); `hash_process` verifies what it can."""
    verified = VerifiedLogins(login_cache_ttl) if login_cache_ttl > 0 else None
    return Portal(realm, [AccountsChecker(accounts, verified=verified,
                                          hash_process=hash_process)])
