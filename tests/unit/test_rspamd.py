"""The rspamd client: verdicts from a real rspamd on loopback (one per class, started by
tests/rspamd_helper.py, each action forced by the Subject), the envelope rspamd saw, and
every way of not getting an answer (refused, silent, HTTP errors, garbage) ending as an
"error" verdict rather than a failed Deferred."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web import resource, server

from mailserver.inbound.rspamd import ACTIONS, RspamdClient, SpamVerdict, parse_verdict
from tests.rspamd_helper import (GTUBE, SOFT_REJECT_MESSAGE, free_port, requires_rspamd,
                                 start_rspamd)


def message(subject: str, *, headers: str = "", body: bytes = b"Hello there.\r\n") -> bytes:
    head = (f"From: Sender <sender@example.net>\r\nTo: rcpt@example.org\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m1@example.net>\r\n{headers}")
    return head.encode() + b"\r\n" + body


def scratch_dir(test: unittest.TestCase) -> Path:
    """A directory removed after the test (trial's mktemp would leave one in the cwd)."""
    path = Path(tempfile.mkdtemp(prefix="rspamd-client-"))
    test.addCleanup(shutil.rmtree, path, True)
    return path


def open_fds_on(path: Path) -> list[str]:
    """File descriptors of this process open on `path` (the client must close its file)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
        except OSError:
            pass
    return found


ENVELOPE = dict(ip="192.0.2.7", helo="client.example.net", mail_from="sender@example.net",
                rcpts=["rcpt@example.org"])


# -- the JSON answer, without a server -------------------------------------------------------

def test_parse_full_answer():
    v = parse_verdict(json.dumps({
        "action": "rewrite subject", "score": 9.5, "required_score": 15,
        "subject": "[SPAM] hi\r\nBcc: x", "symbols": {"B_SYM": {"score": 1}, "A_SYM": {}},
        "messages": {"smtp_message": "go\naway"}}).encode())
    assert v == SpamVerdict("rewrite subject", 9.5, 15.0, ("A_SYM", "B_SYM"),
                            subject="[SPAM] hi Bcc: x", message="go away")


def test_parse_rejects_what_is_not_an_answer():
    for body, why in [(b"", "bad JSON"), (b"<html>", "bad JSON"), (b"[1, 2]", "not an object"),
                      (b'{"score": 1}', "no action"), (b'{"action": 5}', "no action"),
                      (b'{"action": "discard"}', "unknown rspamd action"),
                      (b'{"action": "reject", "score": "high"}', "score"),
                      (b'{"action": "reject", "score": NaN}', "score"),
                      (b'{"error": "message too big"}', "message too big"),
                      (b"[" * 100000, "bad JSON")]:
        v = parse_verdict(body)
        assert v.action == "error" and why in v.reason, (body[:40], v)


def test_parse_odd_but_usable_answers():
    v = parse_verdict(b'{"action": "no action", "symbols": [{"name": "X"}, {"name": "bad name"}],'
                      b' "messages": {"other": "a", "more": "b"}}')
    assert (v.action, v.score, v.symbols, v.message) == ("no action", 0.0, ("X",), "a; b")


# -- a real rspamd -----------------------------------------------------------------------------

class RealRspamdTests(unittest.TestCase):
    """Against rspamd itself; the whole class shares one rspamd process."""

    @classmethod
    def setUpClass(cls):
        requires_rspamd()
        cls.workdir = Path(tempfile.mkdtemp(prefix="rspamd-test-"))
        try:
            cls.rspamd = start_rspamd(cls.workdir / "rspamd")
        except BaseException:
            shutil.rmtree(cls.workdir, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.rspamd.stop()
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def setUp(self):
        self.client = RspamdClient(self.rspamd.url, timeout=10, mta_name="mx.example.org")
        self.addCleanup(self.client.close)
        self.tmp = scratch_dir(self)

    def write(self, data: bytes, name: str = "msg") -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    @defer.inlineCallbacks
    def verdict(self, data: bytes, **envelope):
        kwargs = dict(ENVELOPE, **envelope)
        v = yield self.client.check(self.write(data), **kwargs)
        self.assertIsInstance(v, SpamVerdict)
        return v

    @defer.inlineCallbacks
    def test_plain_message_is_no_action(self):
        v = yield self.verdict(message("Lunch on Friday?"))
        self.assertEqual((v.action, v.score, v.required_score, v.reason),
                         ("no action", 0.0, 15.0, ""), self.rspamd.log()[-2000:])

    @defer.inlineCallbacks
    def test_each_action_by_content(self):
        cases = [("RSPAMD-TEST-REJECT", "reject", "RSPAMD_TEST_REJECT", 100.0),
                 ("RSPAMD-TEST-ADDHEADER", "add header", "RSPAMD_TEST_ADDHEADER", 7.0),
                 ("RSPAMD-TEST-GREYLIST", "greylist", "RSPAMD_TEST_GREYLIST", 5.0),
                 ("RSPAMD-TEST-REWRITESUBJECT", "rewrite subject",
                  "RSPAMD_TEST_REWRITESUBJECT", 10.0)]
        for marker, action, symbol, score in cases:
            v = yield self.verdict(message(f"Offer {marker} now"))
            self.assertEqual((v.action, v.score), (action, score), marker)
            self.assertIn(symbol, v.symbols)
        self.assertEqual(v.subject, "[SPAM] Offer RSPAMD-TEST-REWRITESUBJECT now")

    @defer.inlineCallbacks
    def test_soft_reject_carries_rspamds_message(self):
        v = yield self.verdict(message("RSPAMD-TEST-SOFTREJECT"))
        self.assertEqual((v.action, v.message), ("soft reject", SOFT_REJECT_MESSAGE))
        self.assertIn("RSPAMD_TEST_SOFTREJECT", v.symbols)

    @defer.inlineCallbacks
    def test_gtube(self):
        v = yield self.verdict(message("test", body=GTUBE + b"\r\n"))
        self.assertEqual((v.action, v.message), ("reject", "Gtube pattern"))

    @defer.inlineCallbacks
    def test_rspamd_sees_the_envelope(self):
        expect = {"IP": "2001:db8::25", "HELO": "helo.example.net", "FROM": "bounce@example.net",
                  "RCPT": "a@example.org,b@example.org", "USER": "alice@example.org",
                  "QUEUE-ID": "Q1234", "HOSTNAME": "client.example.net",
                  "MTA-NAME": "mx.example.org"}
        headers = "".join(f"X-Rspamd-Test-Expect-{k}: {v}\r\n" for k, v in expect.items())
        v = yield self.verdict(message("envelope", headers=headers), ip="2001:db8::25",
                               helo="helo.example.net", mail_from="bounce@example.net",
                               rcpts=["a@example.org", "b@example.org"], user="alice@example.org",
                               queue_id="Q1234", hostname="client.example.net")
        saw = {s for s in v.symbols if s.startswith("RSPAMD_TEST_")}
        self.assertEqual(saw, {"RSPAMD_TEST_SAW_" + k.replace("-", "_") for k in expect},
                         self.rspamd.log()[-1500:])

    @defer.inlineCallbacks
    def test_null_sender_and_hostile_helo(self):
        headers = "X-Rspamd-Test-Expect-From: \r\nX-Rspamd-Test-Expect-Helo: a b Pass: all\r\n"
        v = yield self.verdict(message("bounce", headers=headers), mail_from="",
                               helo="a\r\nb\r\nPass: all")
        self.assertIn("RSPAMD_TEST_SAW_FROM", v.symbols)
        self.assertIn("RSPAMD_TEST_SAW_HELO", v.symbols)
        self.assertEqual(v.action, "no action")

    @defer.inlineCallbacks
    def test_concurrent_checks_and_the_file_is_closed(self):
        paths = [self.write(message(f"RSPAMD-TEST-ADDHEADER {i}"), f"m{i}") for i in range(20)]
        verdicts = yield defer.gatherResults([self.client.check(p, **ENVELOPE) for p in paths])
        self.assertEqual({v.action for v in verdicts}, {"add header"})
        for p in paths:
            self.assertEqual(open_fds_on(p), [])

    @defer.inlineCallbacks
    def test_large_message_gets_a_verdict(self):
        line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
        body = line * (10 * 1024 * 1024 // len(line) + 1)
        path = self.write(message("RSPAMD-TEST-ADDHEADER big", body=body), "big")
        self.assertGreater(path.stat().st_size, 10 * 1024 * 1024)
        client = RspamdClient(self.rspamd.url, timeout=30)
        self.addCleanup(client.close)
        v = yield client.check(path, **ENVELOPE)
        self.assertIn(v.action, ACTIONS | {"error"})
        self.assertEqual(open_fds_on(path), [])

    @defer.inlineCallbacks
    def test_missing_file_is_an_error(self):
        v = yield self.client.check(self.tmp / "gone", **ENVELOPE)
        self.assertEqual(v.action, "error")
        self.assertIn("cannot read message", v.reason)


# -- servers that do not give an answer ------------------------------------------------------

class Silent(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)


class HangUp(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.append(self)
        self.transport.loseConnection()


class CannedResource(resource.Resource):
    """Answers every POST with (status, body) and records what it was sent."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.status, self.body = 200, b"{}"
        self.requests = []

    def render_POST(self, request):
        self.requests.append((request.path, request.requestHeaders, request.content.read()))
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return self.body


class FailureTests(unittest.TestCase):
    """No rspamd needed: each of these must end in an "error" verdict, never an exception."""

    def setUp(self):
        self.path = scratch_dir(self) / "msg"
        self.path.write_bytes(message("hello", body=b"x" * 4000 + b"\r\n"))

    def client(self, url: str, timeout: float = 2.0, **kw) -> RspamdClient:
        c = RspamdClient(url, timeout=timeout, **kw)
        self.addCleanup(c.close)
        return c

    def canned(self, status: int, body: bytes, interface: str = "127.0.0.1",
               ) -> tuple[str, CannedResource]:
        res = CannedResource()
        res.status, res.body = status, body
        site = server.Site(res)
        site.noisy = False
        res.connections = 0
        build = site.buildProtocol

        def counted(addr):
            res.connections += 1
            return build(addr)
        site.buildProtocol = counted
        port = reactor.listenTCP(0, site, interface=interface)
        self.addCleanup(port.stopListening)
        host = f"[{interface}]" if ":" in interface else interface
        return f"http://{host}:{port.getHost().port}", res

    def listen(self, proto) -> tuple[str, protocol.Factory]:
        factory = protocol.Factory.forProtocol(proto)
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in factory.connections])
        return f"http://127.0.0.1:{port.getHost().port}", factory

    @defer.inlineCallbacks
    def test_connection_refused_is_a_quick_error(self):
        started = time.monotonic()
        v = yield self.client(f"http://127.0.0.1:{free_port()}").check(self.path, **ENVELOPE)
        self.assertEqual(v.action, "error")
        self.assertIn("refused", v.reason.lower())
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(open_fds_on(self.path), [])

    @defer.inlineCallbacks
    def test_silent_server_times_out(self):
        url, factory = self.listen(Silent)
        started = time.monotonic()
        v = yield self.client(url, timeout=0.5).check(self.path, **ENVELOPE)
        elapsed = time.monotonic() - started
        self.assertEqual((v.action, v.reason), ("error", "timeout after 0.5 s"))
        self.assertTrue(0.45 < elapsed < 2.0, elapsed)
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual(open_fds_on(self.path), [])
        # Cut off in the middle of the upload (socket buffers full): same end.
        big = self.path.with_name("big")
        big.write_bytes(message("big", body=b"y" * (20 << 20)))
        v = yield self.client(url, timeout=0.5).check(big, **ENVELOPE)
        self.assertEqual((v.action, v.reason), ("error", "timeout after 0.5 s"))
        self.assertEqual(open_fds_on(big), [])

    @defer.inlineCallbacks
    def test_cancelled_by_the_caller_is_an_error_verdict(self):
        url, factory = self.listen(Silent)
        d = self.client(url, timeout=5).check(self.path, **ENVELOPE)
        yield deferLater(reactor, 0.1, lambda: None)
        d.cancel()
        v = yield d
        self.assertEqual(v.action, "error")
        self.assertEqual(len(factory.connections), 1)   # not retried
        self.assertEqual(open_fds_on(self.path), [])

    @defer.inlineCallbacks
    def test_server_hanging_up_is_an_error(self):
        url, factory = self.listen(HangUp)
        v = yield self.client(url).check(self.path, **ENVELOPE)
        self.assertEqual(v.action, "error")
        self.assertTrue(v.reason.startswith(("no answer: ", "request not sent: ")), v.reason)
        self.assertEqual(open_fds_on(self.path), [])

    @defer.inlineCallbacks
    def test_pooled_connection_is_reused_and_ipv6_literal(self):
        try:
            url, res = self.canned(200, b'{"action": "greylist", "score": 4.5}', "::1")
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}")
        client = self.client(url)
        for _ in range(3):
            v = yield client.check(self.path, **ENVELOPE)
            self.assertEqual((v.action, v.score), ("greylist", 4.5))
        self.assertEqual((len(res.requests), res.connections), (3, 1))

    @defer.inlineCallbacks
    def test_http_errors_and_garbage(self):
        cases = [(500, b'{"error": "internal"}', "HTTP status 500: internal"),
                 (500, b"<html>oops</html>", "HTTP status 500"),
                 (200, b"this is not json", "bad JSON"),
                 (200, b'{"score": 3.0, "symbols": {}}', "no action"),
                 (200, b'{"action": "quarantine", "score": 3.0}', "unknown rspamd action"),
                 (200, b'{"action": "reject", "pad": "' + b"x" * 2000 + b'"}', "larger than")]
        for status, body, why in cases:
            url, _ = self.canned(status, body)
            v = yield self.client(url, max_response=1000).check(self.path, **ENVELOPE)
            self.assertEqual(v.action, "error", body[:30])
            self.assertIn(why, v.reason)

    @defer.inlineCallbacks
    def test_request_carries_rspamds_protocol_headers_and_the_file(self):
        url, res = self.canned(200, json.dumps({
            "action": "add header", "score": 6.5, "required_score": 15.0,
            "symbols": {"SYM_B": {}, "SYM_A": {}}, "messages": {}}).encode())
        c = self.client(url + "/", password="s3cret", mta_name="mx.example.org")
        v = yield c.check(self.path, ip="198.51.100.4", helo="h.example.net",
                          mail_from="s@example.net", rcpts=["a@example.org", "b@example.org"],
                          user="alice", queue_id="QID1", hostname="ptr.example.net")
        self.assertEqual(v, SpamVerdict("add header", 6.5, 15.0, ("SYM_A", "SYM_B")))
        [(path, headers, body)] = res.requests
        self.assertEqual(path, b"/checkv2")
        self.assertEqual(body, self.path.read_bytes())

        def get(name):
            return headers.getRawHeaders(name)
        self.assertEqual(get(b"rcpt"), [b"a@example.org", b"b@example.org"])
        self.assertEqual([get(n) for n in (b"ip", b"helo", b"from", b"user", b"queue-id",
                                           b"hostname", b"mta-name", b"password")],
                         [[b"198.51.100.4"], [b"h.example.net"], [b"s@example.net"], [b"alice"],
                          [b"QID1"], [b"ptr.example.net"], [b"mx.example.org"], [b"s3cret"]])
        self.assertEqual(get(b"content-length"), [str(self.path.stat().st_size).encode()])
        self.assertIsNone(get(b"pass"))

    @defer.inlineCallbacks
    def test_empty_fields_are_not_sent(self):
        url, res = self.canned(200, b'{"action": "no action"}')
        v = yield self.client(url).check(self.path, ip="", helo="", mail_from="",
                                         rcpts=["x@example.org"])
        self.assertEqual(v.action, "no action")
        [(_, headers, _)] = res.requests
        self.assertEqual(headers.getRawHeaders(b"from"), [b"<>"])
        for name in (b"ip", b"helo", b"user", b"queue-id", b"hostname", b"mta-name", b"password",
                     b"pass"):
            self.assertIsNone(headers.getRawHeaders(name), name)
