"""The MX with the outbound queue behind it: remote alias targets are queued (forwarding),
and a local mailbox that cannot be written is queued for a retry instead of being lost."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.config import LimitsConfig, QueueConfig
from mailserver.maildir import MaildirStore
from mailserver.smtp.mx import MXSession
from mailserver.smtp.queue.local import QueueLocalDelivery
from mailserver.smtp.queue.runner import QueueRunner
from mailserver.smtp.queue.store import QueueStore
from mailserver.smtp.session import SMTPContext, new_queue_id


class MXForwardingTests(unittest.TestCase):
    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="mx-forward-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.addCleanup(self.accounts.close)
        self.store = MaildirStore(root / "maildirs", "mail.example.test")
        self.accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            self.accounts.add_user(f"{user}@example.test", "{PLAIN}x")
            self.store.create_user("example.test", user)
        self.accounts.add_alias("team@example.test", ["alice@example.test", "out@remote.test"])
        self.accounts.add_alias("away@example.test", ["far@remote.test"])
        self.qstore = QueueStore(root / "var" / "queue")
        self.qstore.ensure()
        local = QueueLocalDelivery(self.store, self.accounts)
        self.queue = QueueRunner(self.qstore, QueueConfig(), "mail.example.test", local, local,
                                 lambda a: [], new_queue_id)

    def session(self, queue=True) -> tuple[MXSession, StringTransport]:
        context = SMTPContext(hostname="mail.example.test", limits=LimitsConfig(),
                              accounts=self.accounts, store=self.store,
                              queue=self.queue if queue else None)
        proto = MXSession(context)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        proto.makeConnection(transport)
        self.addCleanup(proto.connectionLost, None)
        transport.clear()
        return proto, transport

    @defer.inlineCallbacks
    def finals(self, transport, count):
        got = []
        for _ in range(500):
            got += transport.value().split(b"\r\n")[:-1]
            transport.clear()
            finals = [line for line in got if line[3:4] == b" "]
            if len(finals) >= count:
                return finals
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(got)

    def stored(self, user):
        return [p.read_bytes() for p in (self.store.user_path("example.test", user) / "new").iterdir()]

    @defer.inlineCallbacks
    def test_remote_alias_targets_are_queued_and_local_ones_delivered(self):
        proto, t = self.session()
        proto.dataReceived(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<team@example.test>\r\n"
                           b"RCPT TO:<away@example.test>\r\nDATA\r\nSubject: fwd\r\n\r\nhi\r\n.\r\n")
        finals = yield self.finals(t, 6)
        self.assertTrue(finals[-1].startswith(b"250 2.0.0"), finals)
        [alice] = self.stored("alice")
        [queue_id] = self.qstore.ids()
        env = self.qstore.read(queue_id)
        self.assertEqual(sorted((r.address, r.kind, r.original) for r in env.recipients),
                         [("far@remote.test", "remote", "away@example.test"),
                          ("out@remote.test", "remote", "team@example.test")])
        queued = self.qstore.message_path(queue_id).read_bytes()
        self.assertTrue(queued.startswith(b"Received: from c ([192.0.2.7])"), queued[:80])
        self.assertTrue(alice.endswith(queued))
        self.assertTrue(alice.startswith(b"Return-Path: <x@remote.test>\r\n"))

    @defer.inlineCallbacks
    def test_unwritable_mailbox_is_queued_for_a_local_retry(self):
        bob_new = self.store.user_path("example.test", "bob") / "new"
        shutil.rmtree(bob_new)
        bob_new.write_bytes(b"not a directory")  # every write into bob's new/ fails
        proto, t = self.session()
        proto.dataReceived(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                           b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\n")
        finals = yield self.finals(t, 6)
        self.assertTrue(finals[-1].startswith(b"250 2.0.0"), finals)
        [alice] = self.stored("alice")
        [queue_id] = self.qstore.ids()
        env = self.qstore.read(queue_id)
        self.assertEqual([(r.address, r.kind) for r in env.recipients],
                         [("bob@example.test", "local")])
        queued = self.qstore.message_path(queue_id).read_bytes()
        self.assertFalse(queued.startswith(b"Return-Path"))
        self.assertTrue(alice.endswith(queued))
        # Once bob's Maildir is repaired, the queue delivers with the Maildir headers.
        bob_new.unlink()
        bob_new.mkdir()
        results = yield self.queue.local.deliver(env, self.qstore.message_path(queue_id),
                                                 env.recipients)
        self.assertTrue(results[0][1].ok)
        [bob] = self.stored("bob")
        self.assertEqual(bob, b"Return-Path: <x@remote.test>\r\nDelivered-To: bob@example.test\r\n"
                         + queued)

    def test_without_a_queue_remote_only_alias_is_deferred(self):
        proto, t = self.session(queue=False)
        proto.dataReceived(b"EHLO c\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<away@example.test>\r\n")
        self.assertTrue(t.value().split(b"\r\n")[-2].startswith(b"451 4.3.0"))
