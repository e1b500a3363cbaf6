"""write_now and close_now over real loopback TCP connections."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from mailserver.fastwrite import close_now, write_now


class _Server(protocol.Protocol):
    """Runs the test's `on_connect(self)` and records when its connection ended."""

    def __init__(self, on_connect) -> None:
        self.on_connect = on_connect
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.on_connect(self)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


class FastWriteTests(unittest.TestCase):
    def _serve(self, on_connect):
        servers: list[_Server] = []

        class Factory(protocol.Factory):
            def buildProtocol(self, addr):
                p = _Server(on_connect)
                servers.append(p)
                return p

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Client()
        connected = protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port)
        return connected.addCallback(lambda _: (client, servers))

    @defer.inlineCallbacks
    def test_write_now_sends_without_queueing(self):
        queued = []

        def on_connect(p):
            write_now(p.transport, b"220 ready\r\n")
            queued.append(len(p.transport.dataBuffer) + p.transport._tempDataLen)
            close_now(p.transport)

        client, _ = yield self._serve(on_connect)
        data = yield client.done
        self.assertEqual(data, b"220 ready\r\n")
        self.assertEqual(queued, [0])

    @defer.inlineCallbacks
    def test_write_now_keeps_order_behind_queued_data(self):
        def on_connect(p):
            p.transport.write(b"first ")  # queued: the direct send must not jump ahead
            write_now(p.transport, b"second")
            p.transport.loseConnection()

        client, _ = yield self._serve(on_connect)
        data = yield client.done
        self.assertEqual(data, b"first second")

    @defer.inlineCallbacks
    def test_close_now_closes_at_once_when_idle(self):
        seen = []

        def on_connect(p):
            write_now(p.transport, b"221 bye\r\n")
            close_now(p.transport)
            seen.append(p.lost.called)  # connectionLost already ran

        client, servers = yield self._serve(on_connect)
        data = yield client.done
        self.assertEqual(data, b"221 bye\r\n")
        self.assertEqual(seen, [True])
        self.assertFalse(servers[0].transport.connected)

    @defer.inlineCallbacks
    def test_close_now_waits_for_queued_data(self):
        payload = b"x" * (4 * 1024 * 1024)  # more than the socket takes at once
        seen = []

        def on_connect(p):
            p.transport.write(payload)
            close_now(p.transport)
            seen.append(p.lost.called)

        client, servers = yield self._serve(on_connect)
        data = yield client.done
        yield servers[0].lost
        self.assertEqual(seen, [False])  # closed later, after the data went out
        self.assertEqual(len(data), len(payload))
