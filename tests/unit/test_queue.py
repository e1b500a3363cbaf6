"""The outbound queue: envelope files, the store's crash rules and lock, the runner's schedule,
expiry, DSNs and admin requests (with a fake clock and fake deliverers), DSN format."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailserver.config import QueueConfig
from mailserver.smtp.queue.attempt import AttemptResult
from mailserver.smtp.queue.dsn import build_dsn, read_original_headers
from mailserver.smtp.queue.envelope import Envelope, EnvelopeError, RecipientState
from mailserver.smtp.queue.runner import QueueRunner
from mailserver.smtp.queue.store import QueueLocked, QueueStore

MESSAGE = b"Received: from x\r\nFrom: <alice@example.test>\r\nSubject: hi\r\n\r\nbody\r\n"


def tmpdir(case: unittest.TestCase) -> Path:
    path = Path(tempfile.mkdtemp(prefix="queue-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def queue_message(store: QueueStore, env: Envelope, data: bytes = MESSAGE) -> None:
    spool = store.open_spool(env.id)
    spool.write(data)
    spool.finish_sync()
    env.size = spool.size
    store.commit(spool, env)


# -- envelope and store ----------------------------------------------------------------------

def test_envelope_round_trip_and_bad_files():
    env = Envelope("ABC1", "a@example.test", [RecipientState("x@remote.test", original="l@x.t")],
                   prefix="DKIM-Signature: x\r\n", eight_bit=True)
    back = Envelope.from_json(env.to_json())
    assert back == env
    for bad in (b"", b"[]", b"{}", b'{"version": 1, "id": "../x"}',
                env.to_json().replace(b'"remote"', b'"sideways"'),
                env.to_json().replace(b'"ABC1"', b'"A/B"'),
                # numbers out of range, nesting too deep: one bad file, not a crash
                re.sub(rb'"attempts":\d+', b'"attempts":1e999', env.to_json()),
                re.sub(rb'"created":[0-9.e+-]+', b'"created":1e999', env.to_json()),
                re.sub(rb'"next_attempt":[0-9.e+-]+', b'"next_attempt":-1e999', env.to_json()),
                b"[" * 100000 + b"]" * 100000):
        with pytest.raises(EnvelopeError):
            Envelope.from_json(bad)


def test_store_commit_recover_and_remove(tmp_path):
    store = QueueStore(tmp_path / "queue")
    store.ensure()
    env = Envelope("M1", "a@example.test", [RecipientState("x@remote.test")])
    queue_message(store, env)
    # Leftovers of interrupted accepts: a tmp file and a message without envelope.
    (store.tmp_dir / "M2.msg").write_bytes(b"partial")
    (store.msg_dir / "M3").write_bytes(b"never acknowledged")
    (store.env_dir / "M4.json").write_bytes(b"{broken")
    loaded = store.recover()
    assert [e.id for e in loaded] == ["M1"]
    assert loaded[0].recipients[0].address == "x@remote.test"
    assert sorted(os.listdir(store.msg_dir)) == ["M1"]
    assert os.listdir(store.tmp_dir) == []
    assert (store.env_dir / "M4.json").exists(), "an unreadable envelope is left for the admin"
    assert store.message_path("M1").read_bytes() == MESSAGE
    assert store.remove("M1") and not store.remove("M1")
    assert not store.message_path("M1").exists()
    with pytest.raises(ValueError):
        store.message_path("../../etc/passwd")


def test_spool_copy_drops_maildir_fields(tmp_path):
    store = QueueStore(tmp_path / "queue")
    store.ensure()
    source = tmp_path / "maildir-file"
    source.write_bytes(b"Return-Path: <a@b.test>\r\nDelivered-To: c@d.test\r\n" + MESSAGE)
    spool = store.copy_to_spool("C1", source, ("Return-Path", "Delivered-To"))
    assert spool.path.read_bytes() == MESSAGE and spool.synced


def test_lock_and_requests(tmp_path):
    store = QueueStore(tmp_path / "queue")
    assert not store.server_running()
    store.lock()
    try:
        assert store.server_running()
        with pytest.raises(QueueLocked):
            QueueStore(tmp_path / "queue").lock()
        store.request("flush")
        store.request("delete", "ABC")
        assert [(a, i) for a, i, _ in store.requests()] == [("delete", "ABC"), ("flush", "")]
        with pytest.raises(ValueError):
            store.request("delete", "a/b")
    finally:
        store.unlock()
    assert not store.server_running()


def test_attempt_result_from_reply():
    r = AttemptResult.from_reply(550, "5.1.1 no such user", "mx.test")
    assert (r.kind, r.status, r.text) == ("permanent", "5.1.1", "550 5.1.1 no such user")
    assert AttemptResult.from_reply(451, "try later").status == "4.0.0"
    assert AttemptResult.from_reply(452, "5.1.1 mismatched").status == "4.0.0"
    assert AttemptResult.from_reply(250, "ok").ok


# -- DSN ---------------------------------------------------------------------------------

def test_dsn_is_a_multipart_report(tmp_path):
    env = Envelope("Q1", "alice@example.test", [
        RecipientState("gone@remote.test", state="failed", last_error="550 5.1.1 unknown \xe9",
                       status="5.1.1", remote_mta="mx.remote.test", original="sales@x.test"),
        RecipientState("slow@remote.test", state="failed", last_error="connect failed",
                       status="4.4.7")])
    path = tmp_path / "m"
    path.write_bytes(b"Subject: caf\xc3\xa9\r\nX-Long: " + b"y" * 3000 + b"\r\n\r\nsecret body\r\n")
    headers = read_original_headers(path, "DKIM-Signature: sig\r\n", limit=1000)
    assert headers.startswith(b"DKIM-Signature: sig\r\nSubject: ") and b"secret body" not in headers
    assert len(headers) <= 1000
    data = build_dsn("mail.example.test", env, env.recipients, "failed", headers, 1_700_000_000)
    assert all(b < 128 for b in data)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    parts = [p.get_content_type() for p in msg.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    text = data.decode()
    assert "Final-Recipient: rfc822; gone@remote.test\r\nAction: failed\r\nStatus: 5.1.1" in text
    assert "Original-Recipient: rfc822; sales@x.test" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 unknown ?" in text
    assert "Diagnostic-Code: X-mailserver; connect failed" in text
    assert "Status: 4.4.7" in text
    delayed = build_dsn("mail.example.test", env, env.recipients[:1], "delayed", b"", 0,
                        retry_until=86400)
    assert b"Action: delayed\r\nStatus: 4.1.1" in delayed and b"Will-Retry-Until:" in delayed


def test_dsn_lines_stay_lines_whatever_the_remote_side_sent(tmp_path):
    """A hostile MX name (DNS carries any octet) and a long reply cannot add lines of their
    own to our bounce or make one longer than RFC 5322's 998 octets; over-long header
    lines of the original are cut, not split into lines that are no header fields."""
    env = Envelope("Q1", "alice@example.test", [
        RecipientState("a" * 60 + "@" + "d" * 60 + ".test", state="failed",
                       last_error="550-5.7.1 " + "x" * 300 + " / " + "y" * 600,
                       status="5.7.1",
                       remote_mta="mx\r\nyour account is suspended\nbare-lf." + "m" * 400)])
    path = tmp_path / "m"
    path.write_bytes(b"References: <" + b"r" * 1500 + b">\r\nX-Exact: " + b"e" * 990
                     + b"\r\nSubject: kept\r\n\r\nbody\r\n")
    headers = read_original_headers(path, "")
    assert headers.split(b"\r\n")[1:] == [b"X-Exact: " + b"e" * 989, b"Subject: kept", b""]
    data = build_dsn("mail.example.test", env, env.recipients, "failed", headers, 0)
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert b"\r\nyour account" not in data
    boundary = email.message_from_bytes(data).get_boundary()
    assert len(boundary) <= 70


# -- the runner --------------------------------------------------------------------------

class FakeDeliverer:
    """Answers each attempt from a script of result kinds, recording what it was given."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.calls: list[tuple[Envelope, list[str], bytes]] = []

    def deliver(self, env, message, recipients):
        self.calls.append((env, [r.address for r in recipients], Path(message).read_bytes()))
        kind = self.script.pop(0) if self.script else "ok"
        result = {"ok": AttemptResult.delivered("250 ok", "mx.test"),
                  "temp": AttemptResult.from_reply(451, "4.3.0 later", "mx.test"),
                  "perm": AttemptResult.from_reply(550, "5.1.1 gone", "mx.test")}[kind]
        return defer.succeed([(r, result) for r in recipients])


class RunnerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def runner(self, script: list[str], **config):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.store = QueueStore(tmpdir(self) / "queue")
        self.relay = FakeDeliverer(script)
        self.local = FakeDeliverer([])
        config.setdefault("retry_schedule", (10.0, 20.0))
        config.setdefault("delay_warning", 0.0)
        ids = iter(f"G{n}" for n in range(1, 100))
        self.runner = QueueRunner(
            self.store, QueueConfig(**config), "mail.example.test", self.local, self.relay,
            lambda address: [RecipientState(address, "local")], lambda: next(ids),
            clock=self.clock)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        yield self.runner.ready

    @defer.inlineCallbacks
    def settle(self):
        """Run what is due now and wait for every attempt (thread work included)."""
        for _ in range(20):
            self.clock.advance(0)
            busy = list(self.runner.busy.values())
            if not busy:
                return
            yield defer.DeferredList(busy)
            yield task.deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def submit(self, sender: str = "alice@example.test", rcpts=("x@remote.test",)):
        env = Envelope("M1", sender, [RecipientState(a) for a in rcpts],
                       created=self.clock.seconds())
        spool = self.runner.new_spool(env.id)
        spool.write(MESSAGE)
        yield self.runner.commit(spool, env)
        yield self.settle()
        return env

    @defer.inlineCallbacks
    def test_temporary_failure_is_retried_on_schedule_then_removed(self):
        yield self.runner(["temp", "temp", "ok"])
        env = yield self.submit()
        self.assertEqual(len(self.relay.calls), 1)
        saved = self.store.read("M1")
        self.assertEqual((saved.attempts, saved.recipients[0].last_error),
                         (1, "451 4.3.0 later"))
        self.assertEqual(saved.next_attempt, env.created + 10)
        self.clock.advance(9.5)
        yield self.settle()
        self.assertEqual(len(self.relay.calls), 1)
        self.clock.advance(0.5)
        yield self.settle()
        self.assertEqual(len(self.relay.calls), 2)
        self.clock.advance(19)
        yield self.settle()
        self.assertEqual(len(self.relay.calls), 2, "the second step of the schedule is 20 s")
        self.clock.advance(1)
        yield self.settle()
        self.assertEqual(len(self.relay.calls), 3)
        self.assertEqual(self.store.ids(), [])
        self.assertFalse(self.store.message_path("M1").exists())
        self.assertEqual(self.local.calls, [], "no DSN for a delivered message")

    @defer.inlineCallbacks
    def test_only_pending_recipients_are_tried_again(self):
        yield self.runner([])
        self.relay.deliver = self._half
        yield self.submit(rcpts=("a@one.test", "b@two.test"))
        self.clock.advance(10)
        yield self.settle()
        self.assertEqual(self.tried, [["a@one.test", "b@two.test"], ["b@two.test"]])

    tried: list = []

    def _half(self, env, message, recipients):
        self.tried = self.tried + [[r.address for r in recipients]]
        first = len(self.tried) == 1
        return defer.succeed([(r, AttemptResult.temporary("later") if first and
                               r.address.startswith("b") else AttemptResult.delivered())
                              for r in recipients])

    @defer.inlineCallbacks
    def test_permanent_failure_queues_one_dsn(self):
        yield self.runner(["perm"])
        yield self.submit()
        self.assertNotIn("M1", self.store.ids())
        [(dsn_env, rcpts, data)] = self.local.calls
        self.assertEqual((dsn_env.sender, rcpts), ("", ["alice@example.test"]))
        self.assertIn(b"Status: 5.1.1", data)
        self.assertIn(b"Subject: hi", data)

    @defer.inlineCallbacks
    def test_a_dsn_that_cannot_be_queued_leaves_the_deliveries_recorded(self):
        """The accounts database down when the bounce is routed: what was delivered is on
        disk all the same (a restart delivers it no second time), and the DSN is queued at
        the next retry, where nothing is delivered again."""
        yield self.runner([])
        self.relay.deliver = self._ok_and_gone
        routes = [RuntimeError("accounts database unavailable")]

        def router(address):
            if routes:
                raise routes.pop()
            return [RecipientState(address, "local")]
        self.runner.router = router
        yield self.submit(rcpts=("ok@remote.test", "gone@remote.test"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        saved = self.store.read("M1")
        self.assertEqual([(r.address, r.state, r.reported) for r in saved.recipients],
                         [("ok@remote.test", "delivered", False),
                          ("gone@remote.test", "failed", False)])
        self.assertEqual(self.local.calls, [])
        self.clock.advance(10)
        yield self.settle()
        self.assertEqual(self.tried, [["ok@remote.test", "gone@remote.test"]])
        [(dsn_env, rcpts, data)] = self.local.calls
        self.assertEqual(rcpts, ["alice@example.test"])
        self.assertIn(b"<gone@remote.test>", data)
        self.assertNotIn(b"ok@remote.test", data)
        self.assertEqual(self.store.ids(), [])

    def _ok_and_gone(self, env, message, recipients):
        self.tried = self.tried + [[r.address for r in recipients]]
        return defer.succeed([(r, AttemptResult.delivered() if r.address.startswith("ok")
                               else AttemptResult.from_reply(550, "5.1.1 gone", "mx.test"))
                              for r in recipients])

    @defer.inlineCallbacks
    def test_no_dsn_for_null_sender(self):
        yield self.runner(["perm"])
        yield self.submit(sender="")
        self.assertEqual(self.store.ids(), [])
        self.assertEqual(self.local.calls, [])

    @defer.inlineCallbacks
    def test_expiry_after_max_age_bounces_with_4_4_7(self):
        yield self.runner(["temp"] * 10, retry_schedule=(30.0,), max_age=100.0)
        yield self.submit()
        for _ in range(4):
            self.clock.advance(30)
            yield self.settle()
        self.assertEqual(len(self.relay.calls), 5, "the last try is at max_age exactly")
        self.assertEqual(self.store.ids(), [])
        [(_, _, data)] = self.local.calls
        self.assertIn(b"Status: 4.4.7", data)
        self.assertIn(b"Action: failed", data)

    @defer.inlineCallbacks
    def test_one_delay_warning(self):
        yield self.runner(["temp"] * 10, retry_schedule=(30.0,), delay_warning=50.0)
        yield self.submit()
        for _ in range(5):
            self.clock.advance(30)
            yield self.settle()
        [(_, _, data)] = self.local.calls
        self.assertIn(b"Action: delayed", data)
        self.assertTrue(self.store.read("M1").warned)

    @defer.inlineCallbacks
    def test_admin_flush_and_delete_requests(self):
        yield self.runner(["temp", "temp"], retry_schedule=(3600.0,))
        yield self.submit()
        self.store.request("flush")
        self.clock.advance(1)  # the tick that reads requests
        yield self.settle()
        self.assertEqual(len(self.relay.calls), 2)
        self.assertEqual(list(self.store.control_dir.iterdir()), [])
        self.store.request("delete", "M1")
        self.clock.advance(1)
        for _ in range(100):
            if not self.store.ids():
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.store.ids(), [])
        self.assertNotIn("M1", self.runner.entries)
