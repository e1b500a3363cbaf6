"""The idle clock of an IMAP session also runs while a command is answered: a client that
stops reading a long answer is logged out like an idle one, one that reads slowly is not."""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.defer import inlineCallbacks

from tests.unit.imap_session_harness import SessionCase

TIMEOUT = 300.0
BODY = b"".join(b"line %06d of a long message body, read by a slow client\r\n" % i
                for i in range(40000))   # 2.3 MB: several producer bursts
MESSAGE = b"From: a@example.org\r\nSubject: big\r\n\r\n" + BODY


class TimeoutWhileAnswering(SessionCase):
    @inlineCallbacks
    def fetch_started(self):
        """A FETCH of the big message, stopped at its first burst as a client that
        reads nothing more leaves it; the session's clock from then on."""
        yield self.append(MESSAGE)
        yield self.select()
        self.clock = task.Clock()
        self.session.callLater = self.clock.callLater
        self.session.timeOut = TIMEOUT
        self.session.setTimeout(TIMEOUT)
        self.transport.clear()
        self.send(b"f FETCH 1 BODY.PEEK[]\r\n")
        for _ in range(2000):
            if self.transport.producer is not None:
                break
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.assertIsNotNone(self.transport.producer)
        self.transport.producer.resumeProducing()   # one burst taken, then nothing
        self.assertIsNotNone(self.transport.producer)

    @inlineCallbacks
    def test_a_client_that_stops_reading_is_logged_out(self):
        """Aborted, not closed: a close waits for the answer to drain, which a client
        that reads nothing never lets happen."""
        yield self.fetch_started()
        aborted = []
        self.transport.abortConnection = lambda: aborted.append(True)
        self.clock.advance(TIMEOUT - 1)
        self.assertEqual(aborted, [])
        self.clock.advance(2)
        self.assertEqual(aborted, [True])
        self.assertIn(b"* BYE Autologout", self.transport.value())

    @inlineCallbacks
    def test_a_client_that_reads_slowly_is_not(self):
        yield self.fetch_started()
        for _ in range(4):
            self.clock.advance(TIMEOUT - 1)
            self.assertFalse(self.transport.disconnecting)
            if self.transport.producer is not None:
                self.transport.producer.resumeProducing()   # the client takes a burst
        out = yield self.wait_for(rb"f OK FETCH completed\r\n$")
        self.assertIn(BODY[-200:], out)
        self.assertFalse(self.transport.disconnecting)
        self.assertNotIn(b"* BYE", out)


class TimeoutInIdle(SessionCase):
    @inlineCallbacks
    def test_an_idling_client_gets_its_bye(self):
        """IDLE counts as a running command, but its client reads: the autologout is a
        close after the BYE, not an abort that drops the BYE."""
        yield self.select()
        self.clock = task.Clock()
        self.session.callLater = self.clock.callLater
        self.send(b"i IDLE\r\n")
        yield self.wait_for(rb"\+ idling\r\n$")
        aborted = []
        self.transport.abortConnection = lambda: aborted.append(True)
        self.session.timeOut = TIMEOUT
        self.session.setTimeout(TIMEOUT)
        self.clock.advance(TIMEOUT + 1)
        self.assertEqual(aborted, [])
        self.assertTrue(self.transport.disconnecting)
        self.assertIn(b"* BYE Autologout", self.transport.value())
        self.session.connectionLost(Failure(ConnectionDone()))   # the close done
