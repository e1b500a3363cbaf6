"""Checker, throttle, realm and portal, with a real accounts database."""

import shutil
import tempfile
import threading

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest
from zope.interface import Interface
from zope.interface.verify import verifyObject

from mailserver import auth
from mailserver.accounts import Accounts
from mailserver.auth import (AccountsChecker, AuthThrottle, MailRealm, VerifiedLogins,
                             build_portal)
from mailserver.passwords import hash_password


def temp_accounts(case: unittest.TestCase) -> Accounts:
    """A fresh accounts database in a directory removed after the test."""
    directory = tempfile.mkdtemp()
    case.addCleanup(shutil.rmtree, directory, True)
    accounts = Accounts(directory + "/accounts.sqlite3")
    case.addCleanup(accounts.close)
    return accounts


class IFake(Interface):
    """An avatar interface a protocol module would register."""


class IOther(Interface):
    """An interface nobody registered."""


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.accounts = temp_accounts(self)
        self.accounts.add_domain("example.org")
        self.accounts.add_user("alice@example.org", hash_password("right"))
        self.checker = AccountsChecker(self.accounts)
        # an upgrade a test started goes on after its login: done before the accounts close
        self.addCleanup(lambda: defer.DeferredList(list(self.checker.upgrading.values())))

    def test_interface(self):
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    @defer.inlineCallbacks
    def test_success_returns_normalized_address(self):
        avatar_id = yield self.checker.requestAvatarId(
            UsernamePassword(b"alice@example.org", b"right"))
        self.assertEqual(avatar_id, "alice@example.org")

    @defer.inlineCallbacks
    def test_username_is_case_insensitive(self):
        avatar_id = yield self.checker.requestAvatarId(
            UsernamePassword(b"ALICE@Example.ORG", b"right"))
        self.assertEqual(avatar_id, "alice@example.org")
        avatar_id = yield self.checker.requestAvatarId(
            UsernamePassword("Alice@example.org", "right"))
        self.assertEqual(avatar_id, "alice@example.org")

    @defer.inlineCallbacks
    def test_wrong_password(self):
        with self.assertRaises(UnauthorizedLogin):
            yield self.checker.requestAvatarId(UsernamePassword(b"alice@example.org", b"wrong"))

    @defer.inlineCallbacks
    def test_unknown_user_costs_a_dummy_verification(self):
        calls = []
        real = auth.verify_password

        def spy(stored, password):
            calls.append(stored)
            return real(stored, password)

        self.patch(auth, "verify_password", spy)
        for username in (b"nobody@example.org", b"alice", b"not an address", b"\xff@x.org"):
            with self.assertRaises(UnauthorizedLogin):
                yield self.checker.requestAvatarId(UsernamePassword(username, b"right"))
        self.assertEqual(len(calls), 4)
        self.assertTrue(all(c.startswith("$argon2id$") for c in calls))

    @defer.inlineCallbacks
    def test_verification_runs_outside_the_reactor_thread(self):
        threads = []
        real = auth.verify_password

        def spy(stored, password):
            threads.append(threading.current_thread())
            return real(stored, password)

        self.patch(auth, "verify_password", spy)
        yield self.checker.requestAvatarId(UsernamePassword(b"alice@example.org", b"right"))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())

    @defer.inlineCallbacks
    def test_admin_password_change_seen_without_restart(self):
        admin = Accounts(self.accounts.path)
        self.addCleanup(admin.close)
        admin.set_password("alice@example.org", "{PLAIN}changed")
        avatar_id = yield self.checker.requestAvatarId(
            UsernamePassword(b"alice@example.org", b"changed"))
        self.assertEqual(avatar_id, "alice@example.org")

    @defer.inlineCallbacks
    def test_old_scheme_is_upgraded_after_login(self):
        self.accounts.add_user("bob@example.org", "{PLAIN}pw")
        writers: list[threading.Thread] = []
        replace = self.accounts.replace_password_hash

        def recording(*args):
            writers.append(threading.current_thread())
            return replace(*args)

        self.patch(self.accounts, "replace_password_hash", recording)
        avatar_id = yield self.checker.requestAvatarId(UsernamePassword(b"bob@example.org", b"pw"))
        self.assertEqual(avatar_id, "bob@example.org")
        yield self.checker.upgrading["bob@example.org"]   # the login did not wait for it
        self.assertNotIn("bob@example.org", self.checker.upgrading)
        stored = self.accounts.get_user("bob@example.org").password_hash
        self.assertTrue(stored.startswith("$argon2id$"))
        # The SQLite write of the new hash happens in a thread, never in the reactor's.
        self.assertEqual(len(writers), 1)
        self.assertIsNot(writers[0], threading.main_thread())
        avatar_id = yield self.checker.requestAvatarId(UsernamePassword(b"bob@example.org", b"pw"))
        self.assertEqual(avatar_id, "bob@example.org")

    @defer.inlineCallbacks
    def test_login_does_not_wait_for_the_upgrade_write(self):
        # A write that cannot go on (a lock held in the accounts database) must not hold
        # the login: the password was right.
        self.accounts.add_user("bob@example.org", "{PLAIN}pw")
        gate = threading.Event()
        replace = self.accounts.replace_password_hash

        def stuck(*args):
            gate.wait(30)
            return replace(*args)

        self.patch(self.accounts, "replace_password_hash", stuck)
        try:
            avatar_id = yield self.checker.requestAvatarId(
                UsernamePassword(b"bob@example.org", b"pw"))
            self.assertEqual(avatar_id, "bob@example.org")
            pending = self.checker.upgrading["bob@example.org"]
            self.assertNoResult(pending)
            # a second login meanwhile starts no second upgrade
            yield self.checker.requestAvatarId(UsernamePassword(b"bob@example.org", b"pw"))
            self.assertIs(self.checker.upgrading["bob@example.org"], pending)
        finally:
            gate.set()
        yield pending
        self.assertTrue(self.accounts.get_user("bob@example.org").password_hash
                        .startswith("$argon2id$"))

    @defer.inlineCallbacks
    def test_upgrade_can_be_switched_off(self):
        self.accounts.add_user("bob@example.org", "{PLAIN}pw")
        checker = AccountsChecker(self.accounts, upgrade_hashes=False)
        yield checker.requestAvatarId(UsernamePassword(b"bob@example.org", b"pw"))
        self.assertEqual(self.accounts.get_user("bob@example.org").password_hash, "{PLAIN}pw")

    def test_database_error_is_not_an_unauthorized_login(self):
        self.accounts.close()
        d = self.checker.requestAvatarId(UsernamePassword(b"alice@example.org", b"right"))
        failure = self.failureResultOf(d)
        self.assertFalse(failure.check(UnauthorizedLogin))


class Avatar:
    def __init__(self, avatar_id):
        self.avatar_id = avatar_id
        self.logged_out = False

    def logout(self):
        self.logged_out = True


class RealmTests(unittest.TestCase):
    def test_interface(self):
        self.assertTrue(verifyObject(IRealm, MailRealm()))

    def test_registered_interface_gets_its_avatar(self):
        realm = MailRealm()
        realm.register(IFake, Avatar)
        iface, avatar, logout = realm.requestAvatar("alice@example.org", None, IOther, IFake)
        self.assertIs(iface, IFake)
        self.assertEqual(avatar.avatar_id, "alice@example.org")
        logout()
        self.assertTrue(avatar.logged_out)

    def test_bytes_avatar_id_is_decoded_and_logout_defaults_to_noop(self):
        realm = MailRealm()
        realm.register(IFake, lambda avatar_id: [avatar_id])
        iface, avatar, logout = realm.requestAvatar(b"bob@example.org", None, IFake)
        self.assertEqual(avatar, ["bob@example.org"])
        self.assertIsNone(logout())

    def test_factory_may_return_a_deferred(self):
        realm = MailRealm()
        realm.register(IFake, lambda avatar_id: defer.succeed(Avatar(avatar_id)))
        result = self.successResultOf(realm.requestAvatar("a@example.org", None, IFake))
        self.assertIs(result[0], IFake)
        self.assertEqual(result[1].avatar_id, "a@example.org")

    def test_unregistered_interface(self):
        realm = MailRealm()
        realm.register(IFake, Avatar)
        self.assertRaises(NotImplementedError, realm.requestAvatar, "a@example.org", None, IOther)


def alice_portal(case: unittest.TestCase) -> Portal:
    """A portal over accounts holding alice@example.org ("Hello world!"), IFake avatars."""
    accounts = temp_accounts(case)
    accounts.add_domain("example.org")
    accounts.add_user("alice@example.org", "{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1u"
                      "kKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1")
    realm = MailRealm()
    realm.register(IFake, Avatar)
    portal = build_portal(accounts, realm)
    # alice's hash is upgraded after her first login, while the login goes on: done
    # before the accounts close
    checker = portal.checkers[IUsernamePassword]
    case.addCleanup(lambda: defer.DeferredList(list(checker.upgrading.values())))
    return portal


class PortalTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_login_through_the_portal(self):
        portal = alice_portal(self)
        self.assertIsInstance(portal, Portal)
        iface, avatar, logout = yield portal.login(
            UsernamePassword(b"Alice@example.org", b"Hello world!"), None, IFake)
        self.assertIs(iface, IFake)
        self.assertEqual(avatar.avatar_id, "alice@example.org")
        with self.assertRaises(UnauthorizedLogin):
            yield portal.login(UsernamePassword(b"alice@example.org", b"nope"), None, IFake)


class ThrottledLoginTests(unittest.TestCase):
    """The front ends' login: the throttle's delay first, for a right password too, and the
    INBOX load ahead only for a client that is not held back."""

    def setUp(self):
        self.portal = alice_portal(self)
        self.clock = Clock()
        self.throttle = AuthThrottle(delay_after=3, window=900, clock=self.clock)
        self.warmed = []

    def login(self, password=b"Hello world!"):
        return auth.throttled_login(self.portal, self.throttle, self.clock, "192.0.2.1",
                                    "alice@example.org", b"alice@example.org", password,
                                    IFake, self.warmed.append)

    @defer.inlineCallbacks
    def test_no_delay_logs_in_and_warms(self):
        iface, avatar, _ = yield self.login()
        self.assertEqual((iface, avatar.avatar_id), (IFake, "alice@example.org"))
        self.assertEqual(self.warmed, [b"alice@example.org"])

    @defer.inlineCallbacks
    def test_a_held_back_client_waits_and_loads_nothing(self):
        for _ in range(3):
            self.throttle.failure("192.0.2.1", "alice@example.org")
        delay = self.throttle.delay("192.0.2.1", "alice@example.org")
        self.assertGreater(delay, 0)
        answers = []
        self.login().addBoth(answers.append)
        self.clock.advance(delay - 0.01)
        self.assertEqual((answers, self.warmed), ([], []))   # right password, still waiting
        self.clock.advance(0.01)
        for _ in range(200):   # the check itself runs in the hashing pool
            if answers:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(answers[0][1].avatar_id, "alice@example.org")
        self.assertEqual(self.warmed, [])


class ThrottleTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.throttle = AuthThrottle(delay_after=3, window=900, clock=self.clock)

    def fail_n(self, n, ip="192.0.2.1", account="alice@example.org"):
        for _ in range(n):
            self.throttle.failure(ip, account)

    def test_no_delay_until_threshold_then_doubling_capped(self):
        t = self.throttle
        self.assertEqual(t.delay("192.0.2.1", "alice@example.org"), 0)
        delays = []
        for _ in range(9):
            t.failure("192.0.2.1", "alice@example.org")
            delays.append(t.delay("192.0.2.1", "alice@example.org"))
        self.assertEqual(delays, [0, 0, 1, 2, 4, 8, 15, 15, 15])

    def test_failures_expire_after_the_window(self):
        self.fail_n(4)
        self.assertEqual(self.throttle.delay("192.0.2.1", "alice@example.org"), 2)
        self.clock.advance(600)
        self.fail_n(1)
        self.clock.advance(301)  # the first four are now older than the window
        self.assertEqual(self.throttle.failures("192.0.2.1", "alice@example.org"), 1)
        self.assertEqual(self.throttle.delay("192.0.2.1", "alice@example.org"), 0)

    def test_ip_count_covers_every_account(self):
        for i in range(3):
            self.throttle.failure("192.0.2.1", f"user{i}@example.org")
        self.assertEqual(self.throttle.delay("192.0.2.1", "other@example.org"), 1)
        self.assertEqual(self.throttle.delay("192.0.2.2", "other@example.org"), 0)

    def test_account_count_covers_every_ip(self):
        for i in range(4):
            self.throttle.failure(f"198.51.100.{i}", "alice@example.org")
        self.assertEqual(self.throttle.delay("203.0.113.9", "Alice@Example.org"), 2)

    def test_failures_naming_no_account_count_for_their_ip_only(self):
        # undecodable SASL data names no account: under one shared "" key, three such
        # failures anywhere delayed every other client's by up to 15 s
        self.fail_n(5, ip="192.0.2.1", account="")
        self.assertEqual(self.throttle.delay("198.51.100.7", ""), 0)
        self.assertEqual(self.throttle.delay("198.51.100.7", "alice@example.org"), 0)
        self.assertGreater(self.throttle.delay("192.0.2.1", ""), 0)

    def test_success_resets_that_account_only(self):
        self.fail_n(2, account="victim@example.org")
        self.fail_n(2, account="attacker@example.org")
        self.assertEqual(self.throttle.delay("192.0.2.1", "attacker@example.org"), 2)
        self.throttle.success("192.0.2.1", "attacker@example.org")
        # The IP keeps its failures against the other account.
        self.assertEqual(self.throttle.failures("192.0.2.1", "attacker@example.org"), 2)
        self.assertEqual(self.throttle.failures("192.0.2.1", "victim@example.org"), 2)
        self.throttle.success("192.0.2.1", "victim@example.org")
        self.assertEqual(self.throttle.failures("192.0.2.1", "anyone@example.org"), 0)

    def test_ipv6_counts_per_64(self):
        self.throttle.failure("2001:db8::1", "a@example.org")
        self.throttle.failure("2001:db8::2", "b@example.org")
        self.throttle.failure("2001:db8:0:0:ffff::3", "c@example.org")
        self.assertEqual(self.throttle.delay("2001:db8::99", "d@example.org"), 1)
        self.assertEqual(self.throttle.delay("2001:db8:1::1", "d@example.org"), 0)
        self.throttle.failure("::ffff:192.0.2.7", "a@example.org")
        self.assertEqual(self.throttle.failures("192.0.2.7", "x@example.org"), 1)

    def test_delay_after_zero_delays_from_the_first_failure(self):
        t = AuthThrottle(delay_after=0, window=60, clock=self.clock)
        self.assertEqual(t.delay("192.0.2.1", "a@example.org"), 0)
        t.failure("192.0.2.1", "a@example.org")
        self.assertEqual(t.delay("192.0.2.1", "a@example.org"), 2)

    def test_memory_is_bounded(self):
        t = AuthThrottle(delay_after=3, window=900, clock=self.clock, max_entries=50)
        for i in range(1000):
            t.failure(f"10.0.{i // 256}.{i % 256}", f"user{i}@example.org")
            t.failure("192.0.2.1", "alice@example.org")
        self.assertLessEqual(len(t._by_ip), 50)
        self.assertLessEqual(len(t._by_account), 50)
        # The busiest (most recently failing) keys survive eviction.
        self.assertEqual(t.delay("192.0.2.1", "alice@example.org"), 15)
        self.assertEqual(t.failures("10.0.0.0", "user0@example.org"), 0)

    def test_default_clock_is_the_reactor(self):
        from twisted.internet import reactor
        self.assertIs(AuthThrottle(3, 900).clock, reactor)


class VerifiedLoginsTests(unittest.TestCase):
    """Repeated logins skip argon2id for `ttl` seconds, never for a wrong or changed
    password."""

    def setUp(self):
        self.accounts = temp_accounts(self)
        self.accounts.add_domain("example.org")
        self.accounts.add_user("alice@example.org", hash_password("right"))
        self.now = 1000.0
        self.verified = VerifiedLogins(60.0, size=2, clock=lambda: self.now)
        self.checker = AccountsChecker(self.accounts, verified=self.verified)
        self.verifications = 0
        real = auth.verify_password

        def counting(stored, password):
            self.verifications += 1
            return real(stored, password)
        self.patch(auth, "verify_password", counting)

    def login(self, password, user=b"alice@example.org"):
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    @defer.inlineCallbacks
    def test_second_login_skips_the_hash_until_ttl(self):
        self.assertEqual((yield self.login(b"right")), "alice@example.org")
        self.assertEqual((yield self.login(b"right")), "alice@example.org")
        self.assertEqual(self.verifications, 1)
        self.now += 61
        yield self.login(b"right")
        self.assertEqual(self.verifications, 2)

    @defer.inlineCallbacks
    def test_wrong_password_is_always_verified(self):
        yield self.login(b"right")
        for _ in range(2):
            with self.assertRaises(UnauthorizedLogin):
                yield self.login(b"wrong")
        self.assertEqual(self.verifications, 3)

    @defer.inlineCallbacks
    def test_password_change_drops_the_entry(self):
        yield self.login(b"right")
        self.accounts.set_password("alice@example.org", hash_password("new one"))
        with self.assertRaises(UnauthorizedLogin):
            yield self.login(b"right")
        self.assertEqual((yield self.login(b"new one")), "alice@example.org")
        self.assertEqual(self.verifications, 3)

    @defer.inlineCallbacks
    def test_bounded_and_keeps_no_password(self):
        for name in ("bob", "carol"):
            self.accounts.add_user(f"{name}@example.org", hash_password("pw"))
        yield self.login(b"right")
        yield self.login(b"pw", b"bob@example.org")
        yield self.login(b"pw", b"carol@example.org")   # alice, least recent, dropped
        self.assertEqual(list(self.verified._entries), ["bob@example.org", "carol@example.org"])
        for mac, _ in self.verified._entries.values():
            self.assertNotIn(b"pw", mac)
        yield self.login(b"right")
        self.assertEqual(self.verifications, 4)

    def test_configured_through_the_portal(self):
        portal = build_portal(self.accounts, MailRealm(), login_cache_ttl=0)
        self.assertIsNone(portal.checkers[IUsernamePassword].verified)
        portal = build_portal(self.accounts, MailRealm(), login_cache_ttl=300)
        self.assertEqual(portal.checkers[IUsernamePassword].verified.ttl, 300)
