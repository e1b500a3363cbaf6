"""The relay's parts: dot-stuffing, reply parsing, MX routing (RFC 5321 5.1, RFC 7505) with
a fake resolver, and one transaction against a scripted server on loopback TCP."""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.names import dns, error
from twisted.protocols import basic
from twisted.trial import unittest

from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.relay.client import DotStuffer, ServerReply, parse_extensions
from mailserver.smtp.relay.routes import RouteError, host_addresses, mx_hosts
from mailserver.smtp.relay.transaction import HostFailure, HostTarget, Settings, Transaction


def reference_stuff(message: bytes) -> bytes:
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def test_dot_stuffing_over_any_chunking():
    rng = random.Random(3)
    for _ in range(300):
        lines = [rng.choice([b"", b".", b"..", b".x", b"a.b", b"x"]) for _ in range(rng.randint(0, 12))]
        message = b"\r\n".join(lines) + rng.choice([b"\r\n", b""])
        stuffer, out, pos = DotStuffer(), b"", 0
        while pos < len(message):
            n = rng.randint(1, 5)
            out += stuffer(message[pos:pos + n])
            pos += n
        out += stuffer.end()
        if message:
            assert out == reference_stuff(message), message
        else:
            assert out == b".\r\n"


def test_reply_and_extensions():
    reply = ServerReply(250, ("mx.test hello", "PIPELINING", "SIZE 1000", "starttls",
                              "AUTH PLAIN LOGIN", "b@d! x"))
    assert parse_extensions(reply) == {"PIPELINING": "", "SIZE": "1000", "STARTTLS": "",
                                       "AUTH": "PLAIN LOGIN"}
    assert ServerReply(550, ("5.1.1 gone",)).enhanced == "5.1.1"
    assert str(ServerReply(451, ("a", "b"))) == "451 a / b"


# -- routes with a fake resolver -----------------------------------------------------------

def mx(pref: int, name: str) -> dns.RRHeader:
    return dns.RRHeader(b"d.test", dns.MX, payload=dns.Record_MX(pref, name.encode()))


def a(name: str, address: str) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), dns.A, payload=dns.Record_A(address))


class FakeResolver:
    def __init__(self, mx_answer=None, mx_error=None, addresses=None):
        self.mx_answer, self.mx_error = mx_answer or [], mx_error
        self.addresses = addresses or {}

    def lookupMailExchange(self, name, timeout=None):
        if self.mx_error:
            return defer.fail(self.mx_error)
        return defer.succeed((self.mx_answer, [], [a("mx2.d.test", "192.0.2.2")]))

    def lookupAddress(self, name, timeout=None):
        if name not in self.addresses:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed(([a(name, ip) for ip in self.addresses[name]], [], []))

    def lookupIPV6Address(self, name, timeout=None):
        return defer.succeed(([], [], []))


class RouteTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_mx_order_hints_and_implicit_mx(self):
        r = FakeResolver([mx(20, "mx2.d.test"), mx(10, "mx1.d.test"), mx(30, "mx3.d.test")])
        hosts = yield mx_hosts(r, "d.test")
        self.assertEqual([(h.preference, h.name) for h in hosts],
                         [(10, "mx1.d.test"), (20, "mx2.d.test"), (30, "mx3.d.test")])
        self.assertEqual(hosts[1].hint, ("192.0.2.2",))
        hosts = yield mx_hosts(FakeResolver([]), "d.test")
        self.assertEqual([(h.preference, h.name) for h in hosts], [(0, "d.test")])

    @defer.inlineCallbacks
    def test_address_hints_are_ordered_deduplicated_and_few(self):
        """The additional section's addresses of an MX host as host_addresses() gives
        them: IPv4 first, each once, at most MAX_ADDRESSES (each costs a connect timeout)."""
        from mailserver.smtp.relay.routes import MAX_ADDRESSES

        extra = [dns.RRHeader(b"mx1.d.test", dns.AAAA, payload=dns.Record_AAAA("2001:db8::1"))]
        extra += [a("mx1.d.test", f"192.0.2.{i % 50}") for i in range(100)]

        class Many(FakeResolver):
            def lookupMailExchange(self, name, timeout=None):
                return defer.succeed(([mx(10, "mx1.d.test")], [], extra))

        hosts = yield mx_hosts(Many(), "d.test")
        self.assertEqual(hosts[0].hint, tuple(f"192.0.2.{i}" for i in range(MAX_ADDRESSES)))

    @defer.inlineCallbacks
    def test_permanent_and_temporary_route_errors(self):
        cases = [(FakeResolver([mx(0, "")]), "permanent", "5.1.10"),
                 (FakeResolver(mx_error=error.DNSNameError("d.test")), "permanent", "5.1.2"),
                 (FakeResolver(mx_error=error.DNSServerError("x")), "temporary", "4.4.3"),
                 (FakeResolver(mx_error=error.DNSQueryTimeoutError("x")), "temporary", "4.4.3")]
        for resolver, kind, status in cases:
            with self.assertRaises(RouteError) as e:
                yield mx_hosts(resolver, "d.test")
            self.assertEqual((e.exception.result.kind, e.exception.result.status), (kind, status))
        # A null MX next to real ones is ignored (RFC 7505 3 says it must be alone).
        hosts = yield mx_hosts(FakeResolver([mx(0, ""), mx(10, "mx1.d.test")]), "d.test")
        self.assertEqual([h.name for h in hosts], ["mx1.d.test"])

    @defer.inlineCallbacks
    def test_mx_names_that_are_no_host_names_are_never_used(self):
        """DNS carries any octet: a name with a CR, an LF or a space is skipped (it would
        end up in log lines and in the text of a bounce), and one with nothing else is a
        temporary failure, as a malformed answer is."""
        hosts = yield mx_hosts(FakeResolver([mx(5, "mx\r\nyou have been hacked.d.test"),
                                             mx(10, "mx1.d.test"), mx(20, "bad name.d.test")]),
                               "d.test")
        self.assertEqual([h.name for h in hosts], ["mx1.d.test"])
        with self.assertRaises(RouteError) as e:
            yield mx_hosts(FakeResolver([mx(5, "mx\nevil.d.test")]), "d.test")
        self.assertEqual((e.exception.result.kind, e.exception.result.status),
                         ("temporary", "4.4.3"))

    @defer.inlineCallbacks
    def test_host_addresses(self):
        r = FakeResolver(addresses={"mx1.d.test": ["192.0.2.1", "192.0.2.1", "192.0.2.9"]})
        self.assertEqual((yield host_addresses(r, "mx1.d.test")), ["192.0.2.1", "192.0.2.9"])
        self.assertEqual((yield host_addresses(r, "nothing.d.test")), [])
        self.assertEqual((yield host_addresses(r, "192.0.2.77")), ["192.0.2.77"])


# -- one transaction against a scripted server ----------------------------------------------

class ScriptedServer(basic.LineReceiver):
    """Answers from factory.script: command prefix -> reply; records commands and data."""

    delimiter = b"\r\n"

    def connectionMade(self):
        self.factory.connections += 1
        self.in_data = False
        self.sendLine(self.factory.script.get("greeting", b"220 scripted ESMTP"))

    def lineReceived(self, line):
        f = self.factory
        if self.in_data:
            if f.script.get("reset in data"):
                self.transport.abortConnection()
                return
            if line == b".":
                self.in_data = False
                end = f.script.get("end", b"250 2.0.0 ok")
                if f.script.get("end delay"):
                    reactor.callLater(f.script["end delay"], self.sendLine, end)
                else:
                    self.sendLine(end)
            else:
                f.data.append(line)
            return
        f.commands.append(line)
        for prefix, reply in f.script.items():
            if prefix != "greeting" and line.upper().startswith(prefix.upper().encode()):
                if reply == b"354 go":
                    self.in_data = True
                if reply is None:
                    self.transport.loseConnection()
                    return
                if reply == "silent":
                    return
                self.sendLine(reply)
                if prefix == "STARTTLS" and f.script.get("no handshake"):
                    self.transport.loseConnection()
                if prefix == f.script.get("close after"):
                    self.transport.loseConnection()
                return
        self.sendLine(b"250 ok")


class Scripted(protocol.ServerFactory):
    protocol = ScriptedServer

    def __init__(self, script):
        self.script = script
        self.commands, self.data, self.connections = [], [], 0


class TransactionTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="relay-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.message = self.dir / "msg"
        self.message.write_bytes(b"Subject: t\r\n\r\n.dot line\r\nend\r\n")

    def serve(self, script):
        factory = Scripted(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def run_tx(self, port, rcpts, tls="opportunistic", size=0):
        env = Envelope("T1", "a@example.test", [RecipientState(r) for r in rcpts],
                       size=size or self.message.stat().st_size, prefix="X-Signed: yes\r\n")
        target = HostTarget("mx.test", "127.0.0.1", port, tls)
        tx = Transaction(reactor, target, Settings("mail.example.test", 5, 5), env,
                         self.message, env.recipients)
        return defer.ensureDeferred(tx.run())

    @defer.inlineCallbacks
    def test_pipelined_transaction_with_per_recipient_results(self):
        f, port = self.serve({"EHLO": b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100000",
                              "RCPT TO:<bad": b"550 5.1.1 unknown", "RCPT TO:<full":
                              b"452 4.2.2 mailbox full", "DATA": b"354 go"})
        results = yield self.run_tx(port, ["ok@d.test", "bad@d.test", "full@d.test"])
        got = {r.address: (res.kind, res.status) for r, res in results}
        self.assertEqual(got, {"ok@d.test": ("ok", "2.0.0"), "bad@d.test": ("permanent", "5.1.1"),
                               "full@d.test": ("temporary", "4.2.2")})
        self.assertIn(b"MAIL FROM:<a@example.test> SIZE=", f.commands[1])
        self.assertEqual(f.data, [b"X-Signed: yes", b"Subject: t", b"", b"..dot line", b"end"])
        self.assertEqual(f.commands[-1], b"QUIT")

    @defer.inlineCallbacks
    def test_without_pipelining_and_all_recipients_refused(self):
        f, port = self.serve({"RCPT": b"550 5.1.1 unknown", "DATA": b"354 go"})
        results = yield self.run_tx(port, ["x@d.test"])
        self.assertEqual(results[0][1].kind, "permanent")
        self.assertNotIn(b"DATA", f.commands)

    @defer.inlineCallbacks
    def test_host_failures_try_the_next_host(self):
        for script in ({"greeting": b"554 go away"}, {"MAIL": b"421 4.3.2 shutting down"},
                       {"EHLO": None}):
            f, port = self.serve(script)
            with self.assertRaises(HostFailure) as e:
                yield self.run_tx(port, ["x@d.test"])
            self.assertEqual(e.exception.result.kind, "temporary")
        with self.assertRaises(HostFailure) as e:
            yield self.run_tx(1, ["x@d.test"])  # nothing listens on port 1
        self.assertIn("connection refused", e.exception.result.text)

    @defer.inlineCallbacks
    def test_tls_required_but_not_offered(self):
        f, port = self.serve({})
        with self.assertRaises(HostFailure) as e:
            yield self.run_tx(port, ["x@d.test"], tls="required")
        self.assertEqual(e.exception.result.status, "4.7.4")
        self.assertNotIn(b"MAIL", b" ".join(f.commands))

    @defer.inlineCallbacks
    def test_message_larger_than_the_host_accepts(self):
        f, port = self.serve({"EHLO": b"250-mx.test\r\n250 SIZE 10"})
        results = yield self.run_tx(port, ["x@d.test"])
        self.assertEqual((results[0][1].kind, results[0][1].status), ("permanent", "5.3.4"))

    @defer.inlineCallbacks
    def test_8bit_data_only_to_a_host_that_offers_8bitmime(self):
        """RFC 6152 3: no 8-bit octets to a host without 8BITMIME; a permanent failure
        of that host (the next MX may take it), nothing sent."""
        self.message.write_bytes("Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0\r\n".encode())
        f, port = self.serve({"EHLO": b"250-mx.test\r\n250 PIPELINING", "DATA": b"354 go"})
        env = Envelope("T4", "a@example.test", [RecipientState("x@d.test")],
                       size=self.message.stat().st_size, eight_bit=True)
        tx = Transaction(reactor, HostTarget("mx.test", "127.0.0.1", port, "none"),
                         Settings("mail.example.test", 5, 5), env, self.message, env.recipients)
        with self.assertRaises(HostFailure) as e:
            yield defer.ensureDeferred(tx.run())
        self.assertEqual((e.exception.result.kind, e.exception.result.status),
                         ("permanent", "5.6.3"))
        self.assertNotIn(b"MAIL", b" ".join(f.commands))
        f, port = self.serve({"EHLO": b"250-mx.test\r\n250 8BITMIME", "DATA": b"354 go"})
        tx = Transaction(reactor, HostTarget("mx.test", "127.0.0.1", port, "none"),
                         Settings("mail.example.test", 5, 5), env, self.message, env.recipients)
        results = yield defer.ensureDeferred(tx.run())
        self.assertEqual(results[0][1].kind, "ok")
        self.assertIn(b"BODY=8BITMIME", b" ".join(f.commands))

    @defer.inlineCallbacks
    def test_a_reply_whose_lines_disagree_is_no_delivery(self):
        """RFC 5321 4.2.1: all lines of a reply carry one code; "550-" then "250" after
        the message was taken as delivered (the last line's code)."""
        f, port = self.serve({"DATA": b"354 go", "end": b"550-5.7.1 no\r\n250 2.0.0 ok"})
        with self.assertRaises(HostFailure) as e:
            yield self.run_tx(port, ["x@d.test"])
        self.assertEqual(e.exception.result.kind, "temporary")
        self.assertIn("different codes", e.exception.result.text)

    @defer.inlineCallbacks
    def test_a_2xx_answer_to_data_is_no_delivery(self):
        """RFC 5321 4.3.2: DATA gets 354 or an error; a 250 before any octet was sent
        is retried, never recorded as delivered."""
        for ehlo in (b"250-mx.test\r\n250 PIPELINING", b"250 mx.test"):
            f, port = self.serve({"EHLO": ehlo, "DATA": b"250 2.0.0 ok"})
            results = yield self.run_tx(port, ["x@d.test"])
            self.assertEqual((results[0][1].kind, results[0][1].status), ("temporary", "4.5.0"))
            self.assertIn("not 354", results[0][1].text)
            self.assertEqual(f.data, [])

    @defer.inlineCallbacks
    def test_a_2xx_other_than_250_to_mail_or_rcpt_is_no_delivery(self):
        """RFC 5321 4.3.2: MAIL succeeds with 250, RCPT with 250 or 251.  A "252 will
        try" was taken as delivered: the queue dropped the message, nothing was sent,
        no DSN went out."""
        for ehlo in (b"250-mx.test\r\n250 PIPELINING", b"250 mx.test"):
            for script in ({"MAIL": b"252 2.1.0 hm"},
                           {"RCPT": b"252 2.1.5 will try", "DATA": b"354 go"}):
                f, port = self.serve({"EHLO": ehlo, **script})
                results = yield self.run_tx(port, ["x@d.test", "y@d.test"])
                self.assertEqual([(res.kind, res.status) for _, res in results],
                                 [("temporary", "4.5.0")] * 2, script)
                self.assertIn("252", results[0][1].text)
                self.assertEqual(f.data, [])

    @defer.inlineCallbacks
    def test_a_pipelined_refusal_then_close_is_the_refusal(self):
        """A blocklist's 554 to MAIL, then the connection closed: the refusal is the
        answer (a bounce now), not a lost connection retried for days."""
        pipelining = b"250-mx.test\r\n250 PIPELINING"
        f, port = self.serve({"EHLO": pipelining, "MAIL": b"554 5.7.1 your IP is listed",
                              "close after": "MAIL"})
        results = yield self.run_tx(port, ["x@d.test", "y@d.test"])
        self.assertEqual([(res.kind, res.status) for _, res in results],
                         [("permanent", "5.7.1")] * 2)
        self.assertIn("listed", results[0][1].text)
        # a refused recipient keeps its refusal; the one whose answer never came is
        # this host's failure for now
        f, port = self.serve({"EHLO": pipelining, "RCPT TO:<bad": b"550 5.1.1 unknown",
                              "close after": "RCPT TO:<bad"})
        results = yield self.run_tx(port, ["bad@d.test", "ok@d.test"])
        got = {r.address: (res.kind, res.status) for r, res in results}
        self.assertEqual(got, {"bad@d.test": ("permanent", "5.1.1"),
                               "ok@d.test": ("temporary", "4.4.1")})
        # nothing definite before the close: the next host's turn, as before
        f, port = self.serve({"EHLO": pipelining, "MAIL": None})
        with self.assertRaises(HostFailure):
            yield self.run_tx(port, ["x@d.test"])

    @defer.inlineCallbacks
    def test_connection_reset_during_data_is_this_hosts_failure(self):
        """The host resets the connection while the message is being sent: HostFailure
        (try the next host, retry later), not an error that fails the whole message."""
        self.message.write_bytes(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20000)
        f, port = self.serve({"DATA": b"354 go", "reset in data": True})
        with self.assertRaises(HostFailure) as e:
            yield self.run_tx(port, ["x@d.test"])
        self.assertEqual(e.exception.result.kind, "temporary")
        self.assertFalse(e.exception.tls_failed)

    @defer.inlineCallbacks
    def test_failed_starttls_handshake_is_marked_for_the_plaintext_retry(self):
        """RFC 7435: an opportunistic relay whose handshake fails tries again without
        TLS; the failure says so (it did not: the flag was cleared before it was read)."""
        f, port = self.serve({"EHLO": b"250-mx.test\r\n250 STARTTLS", "STARTTLS": b"220 go",
                              "no handshake": True})
        with self.assertRaises(HostFailure) as e:
            yield self.run_tx(port, ["x@d.test"])
        self.assertTrue(e.exception.tls_failed)
        f, port = self.serve({"EHLO": b"250-mx.test\r\n250 STARTTLS", "STARTTLS": b"220 go",
                              "no handshake": True})
        with self.assertRaises(HostFailure) as e:
            yield self.run_tx(port, ["x@d.test"], tls="required")
        self.assertTrue(e.exception.tls_failed)

    @defer.inlineCallbacks
    def test_replies_sent_with_the_220_before_tls_end_the_connection(self):
        """RFC 3207 4.2: what follows the 220 to STARTTLS in the same plaintext read is
        no answer to anything.  Read on as replies, it answered the EHLO, RCPT and DATA
        meant for the TLS session: a peer on the path, with no certificate, bounced the
        mail although verified TLS was required."""
        injected = (b"220 go\r\n250-injected\r\n250 PIPELINING\r\n250 ok\r\n"
                    b"550 5.1.1 <x@d.test>: injected, no such user\r\n554 no\r\n221 bye")
        for tls in ("required", "opportunistic"):
            f, port = self.serve({"EHLO": b"250-mx.test\r\n250 STARTTLS",
                                  "STARTTLS": injected})
            with self.assertRaises(HostFailure) as e:
                yield self.run_tx(port, ["x@d.test"], tls=tls)
            self.assertEqual(e.exception.result.kind, "temporary")    # never 5.1.1
            self.assertTrue(e.exception.tls_failed)
            self.assertFalse(any(c.startswith(b"MAIL") or c.startswith(b"RCPT")
                                 for c in f.commands), f.commands)


class Dripping(protocol.Protocol):
    """A peer that sends its greeting one byte every 50 ms."""

    def connectionMade(self):
        self.left = b"220 " + b"s" * 60 + b"\r\n"
        self.call = reactor.callLater(0, self.drip)

    def drip(self):
        if self.left and self.transport is not None:
            self.transport.write(self.left[:1])
            self.left = self.left[1:]
            self.call = reactor.callLater(0.05, self.drip)

    def connectionLost(self, reason):
        self.factory.unsent.append(len(self.left))
        if self.call.active():
            self.call.cancel()


class NoAddress(FakeResolver):
    def lookupMailExchange(self, name, timeout=None):
        return defer.succeed((self.mx_answer, [], []))   # no address hints

    def lookupIPV6Address(self, name, timeout=None):
        if name not in self.addresses:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed(([], [], []))

    def lookupAddress(self, name, timeout=None):
        if name == "broken.d.test":
            return defer.fail(error.DNSServerError(name))
        return super().lookupAddress(name, timeout)


def make_relay(resolver, port: int = 25):
    """A Relay over `resolver` that connects to `port` (the MX hosts are loopback)."""
    from types import SimpleNamespace
    from mailserver.smtp.relay.relay import Relay
    relay_cfg = SimpleNamespace(resolver_address=None, connect_timeout=1, timeout=1,
                                smarthost_address=None, port=port, tls_required_domains=(),
                                ca_file="", smarthost_username="", smarthost_password="")
    config = SimpleNamespace(relay=relay_cfg, server=SimpleNamespace(hostname="mx.test"))
    return Relay(config, reactor, resolver)  # type: ignore[arg-type]


class UnroutableTests(unittest.TestCase):
    def relay(self, resolver):
        return make_relay(resolver)

    @defer.inlineCallbacks
    def test_a_domain_without_any_address_is_bounced_not_retried(self):
        """RFC 5321 5.1: no MX and no A/AAAA (or MX hosts that have none) is an error
        to report; a DNS failure on the way is still retried."""
        env = Envelope("T3", "a@example.test", [RecipientState("x@d.test")])
        results = yield self.relay(NoAddress()).deliver(env, Path("/nonexistent"),
                                                        env.recipients)
        self.assertEqual((results[0][1].kind, results[0][1].status), ("permanent", "5.4.4"))
        resolver = NoAddress(mx_answer=[mx(10, "broken.d.test"), mx(20, "gone.d.test")])
        results = yield self.relay(resolver).deliver(env, Path("/nonexistent"),
                                                     env.recipients)
        self.assertEqual(results[0][1].kind, "temporary")


class HostOrderTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="relay-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def relay_on(self, resolver, port):
        return make_relay(resolver, port)

    @defer.inlineCallbacks
    def test_a_temporary_failure_of_one_host_outweighs_a_permanent_one_of_another(self):
        """The preferred MX is down, the backup takes no 8-bit data: try again later
        (the preferred one may be back), not a bounce."""
        (self.dir / "m").write_bytes("Subject: caf\u00e9\r\n\r\nx\r\n".encode())
        f = Scripted({"EHLO": b"250-backup\r\n250 PIPELINING"})
        port = reactor.listenTCP(0, f, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        resolver = NoAddress(mx_answer=[mx(10, "mx1.d.test"), mx(20, "mx2.d.test")],
                             addresses={"mx1.d.test": ["127.0.0.2"], "mx2.d.test": ["127.0.0.1"]})
        env = Envelope("T5", "a@example.test", [RecipientState("x@d.test")], size=20,
                       eight_bit=True)
        results = yield self.relay_on(resolver, port.getHost().port).deliver(
            env, self.dir / "m", env.recipients)
        self.assertEqual(results[0][1].kind, "temporary")

    @defer.inlineCallbacks
    def test_no_address_among_the_first_hosts_of_a_long_list_is_no_bounce(self):
        """Only the first MAX_MX_HOSTS hosts are tried: that they have no address does
        not make the domain unroutable."""
        from mailserver.smtp.relay.routes import MAX_MX_HOSTS
        answers = [mx(10, f"gone{i}.d.test") for i in range(MAX_MX_HOSTS)]
        answers.append(mx(20, "ok.d.test"))
        resolver = NoAddress(mx_answer=answers, addresses={"ok.d.test": ["127.0.0.1"]})
        env = Envelope("T6", "a@example.test", [RecipientState("x@d.test")], size=16)
        results = yield self.relay_on(resolver, 1).deliver(env, self.dir / "m", env.recipients)
        self.assertEqual(results[0][1].kind, "temporary")


class StopTests(unittest.TestCase):
    """At shutdown a delivery whose message is sent is let alone for its final reply:
    dropped, it would be sent again after the restart."""

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="relay-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        (self.dir / "m").write_bytes(b"Subject: t\r\n\r\nbody\r\n")

    @defer.inlineCallbacks
    def delivering(self, script, until):
        """(relay, Deferred of its results) for one message to a scripted MX, once
        `until(relay)` holds."""
        f = Scripted(script)
        port = reactor.listenTCP(0, f, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        resolver = NoAddress(mx_answer=[mx(10, "mx1.d.test")],
                             addresses={"mx1.d.test": ["127.0.0.1"]})
        relay = make_relay(resolver, port.getHost().port)
        env = Envelope("T7", "a@example.test", [RecipientState("x@d.test")], size=20)
        d = relay.deliver(env, self.dir / "m", env.recipients)
        for _ in range(200):
            if until(relay):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(until(relay))
        return relay, d

    @defer.inlineCallbacks
    def test_abort_keeps_a_delivery_awaiting_its_final_reply(self):
        relay, d = yield self.delivering({"DATA": b"354 go", "end delay": 0.3},
                                         lambda r: any(p.ending for p in r.connections))
        relay.abort_all(keep_ending=True)
        results = yield d
        self.assertEqual(results[0][1].kind, "ok")

    @defer.inlineCallbacks
    def test_abort_drops_a_delivery_still_sending(self):
        relay, d = yield self.delivering({"DATA": "silent"},   # DATA never answered
                                         lambda r: bool(r.connections))
        relay.abort_all(keep_ending=True)
        results = yield d   # at once, not after the 1 s reply timeout
        self.assertEqual(results[0][1].kind, "temporary")
        self.assertIn("aborted", results[0][1].text)


class OurselvesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_our_own_name_among_the_mx_hosts(self):
        """RFC 5321 5.1: our own record and worse ones are dropped; when we are the best
        MX there is nowhere to send it (a loop), and it bounces with 5.4.6."""
        from mailserver.smtp.relay.relay import _below_ourselves
        from mailserver.smtp.relay.routes import MXHost
        hosts = [MXHost(10, "a.d.test"), MXHost(20, "mx.test"), MXHost(20, "b.d.test"),
                 MXHost(30, "c.d.test")]
        self.assertEqual([h.name for h in _below_ourselves(hosts, "MX.test.")], ["a.d.test"])
        self.assertEqual(_below_ourselves(hosts, "other.test"), hosts)
        resolver = NoAddress(mx_answer=[mx(10, "mx.test"), mx(20, "b.d.test")])
        env = Envelope("T7", "a@example.test", [RecipientState("x@d.test")])
        results = yield make_relay(resolver).deliver(env, Path("/nonexistent"), env.recipients)
        self.assertEqual((results[0][1].kind, results[0][1].status), ("permanent", "5.4.6"))


class SlowReplyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_reply_must_end_within_the_timeout_however_it_drips(self):
        """Each byte used to restart the timer: one byte every 50 ms held a 0.5 s
        timeout for the whole 3 s greeting (and a delivery slot for as long as a peer
        likes)."""
        factory = protocol.Factory.forProtocol(Dripping)
        factory.unsent = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        d = Path(tempfile.mkdtemp(prefix="relay-"))
        self.addCleanup(shutil.rmtree, d, True)
        (d / "msg").write_bytes(b"Subject: t\r\n\r\nx\r\n")
        env = Envelope("T2", "a@example.test", [RecipientState("x@d.test")], size=16)
        target = HostTarget("mx.test", "127.0.0.1", port.getHost().port, "none")
        tx = Transaction(reactor, target, Settings("mail.example.test", 5, 0.5), env,
                         d / "msg", env.recipients)
        with self.assertRaises(HostFailure) as e:
            yield defer.ensureDeferred(tx.run())
        self.assertIn("timeout", e.exception.result.text)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(factory.unsent), 1)
        self.assertGreater(factory.unsent[0], 0)      # given up inside the greeting


def test_a_reply_text_is_kept_short():
    """A hostile host's 800 KB reply would make the envelope too large to load again."""
    from mailserver.smtp.queue.attempt import MAX_TEXT, AttemptResult
    result = AttemptResult.from_reply(451, "x" * 800_000)
    assert len(result.text) == MAX_TEXT and result.text.endswith("...")
    assert AttemptResult.temporary("short").text == "short"
