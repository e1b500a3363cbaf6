"""IMAP LOGIN (RFC 3501 6.2.3) loads the user's INBOX while the password is verified, so a
client's first SELECT of a large Maildir does not start its scan only after the login."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.auth import AuthThrottle, MailRealm, build_portal, inbox_warmer
from mailserver.config import LimitsConfig
from mailserver.imap.context import IMAPContext
from mailserver.imap.mailbox import IIMAPAccount
from mailserver.imap.server import IMAPSession
from mailserver.imap.service import avatar_factory
from mailserver.maildir import MaildirStore
from mailserver.passwords import hash_password

_HASH: list[str] = []
MESSAGE = b"From: <x@remote.test>\r\nSubject: hello\r\n\r\nHello.\r\n"


class LoginLoadsTheInbox(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="imap-login-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        if not _HASH:
            _HASH.append(hash_password("secret"))
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.addCleanup(self.accounts.close)
        self.store = MaildirStore(root / "maildirs", "mail.example.test")
        self.accounts.add_domain("example.test")
        self.accounts.add_user("alice@example.test", _HASH[0])
        self.path = self.store.create_user("example.test", "alice")
        (self.path / "new" / "1700000000.M1P1.other.host").write_bytes(MESSAGE)
        realm = MailRealm()
        realm.register(IIMAPAccount, avatar_factory(
            SimpleNamespace(accounts=self.accounts, store=self.store)))
        self.throttle = AuthThrottle(3, 900, clock=task.Clock())
        self.context = IMAPContext(
            hostname="mail.example.test", limits=LimitsConfig(),
            portal=build_portal(self.accounts, realm), throttle=self.throttle,
            store=self.store, allow_plaintext_loopback=True,
            warm=inbox_warmer(self.accounts, self.store))
        self.addCleanup(self._close_folders)

    @defer.inlineCallbacks
    def _close_folders(self):
        account = self.store.account(self.path)
        for folder in list(account.loaded_folders()):
            yield folder.close()

    def session(self) -> tuple[IMAPSession, StringTransport]:
        proto = IMAPSession(self.context)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
        proto.makeConnection(transport)
        self.addCleanup(proto.connectionLost, None)
        transport.clear()
        return proto, transport

    @defer.inlineCallbacks
    def answer(self, transport: StringTransport, tag: bytes):
        for _ in range(2000):
            out = transport.value()
            if b"\r\n" + tag + b" " in b"\r\n" + out:
                transport.clear()
                return out
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.fail(f"no answer tagged {tag!r}: {transport.value()!r}")

    @defer.inlineCallbacks
    def loaded(self, folder):
        """Wait for a load nobody else asked for; the login may be answered before it ends."""
        for _ in range(2000):
            if folder.loaded:
                return
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.fail("the INBOX's load begun at login never ended")

    def inbox(self):
        return self.store.account(self.path).loaded_folder("INBOX")

    @defer.inlineCallbacks
    def test_the_inbox_loads_while_the_password_is_checked(self):
        proto, transport = self.session()
        proto.dataReceived(b"a LOGIN alice@example.test secret\r\n")
        self.assertEqual(transport.value(), b"")      # the verification is under way
        folder = self.inbox()
        self.assertIsNotNone(folder)                  # ... and so is the INBOX's first load
        out = yield self.answer(transport, b"a")
        self.assertIn(b"a OK", out)
        yield self.loaded(folder)                     # the load begun at LOGIN ends by itself
        proto.dataReceived(b"b SELECT INBOX\r\n")
        out = yield self.answer(transport, b"b")
        self.assertIn(b"* 1 EXISTS\r\n", out)
        self.assertIn(b"b OK [READ-WRITE]", out)

    @defer.inlineCallbacks
    def test_unknown_names_and_guessing_clients_load_nothing(self):
        proto, transport = self.session()
        proto.dataReceived(b"a LOGIN bob@example.test secret\r\n")
        out = yield self.answer(transport, b"a")
        self.assertIn(b"a NO", out)
        for _ in range(3):
            self.throttle.failure("127.0.0.1", "alice@example.test")
        proto.dataReceived(b"b LOGIN alice@example.test wrong\r\n")
        self.assertIsNone(self.inbox())               # held back by the throttle, unloaded
        out = yield self.answer(transport, b"b")
        self.assertIn(b"b NO", out)
        self.assertIsNone(self.inbox())
