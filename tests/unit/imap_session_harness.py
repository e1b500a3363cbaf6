"""An IMAP session over a real Maildir store and an in-memory transport, for unit tests of
whole commands: bytes in through dataReceived, bytes out as the session wrote them.

The store, the folders and the session are the real ones; only the network is replaced
(twisted.internet.testing.StringTransport), and FETCH's producer is driven by hand as a
transport would.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.imap.mailbox import IMAPAccount
from mailserver.imap.server import IMAPSession
from mailserver.maildir import MaildirStore

USER = "alice@example.org"
HOSTNAME = "mx.example.test"


class SessionTransport(StringTransport):
    """StringTransport that also takes pauseProducing/resumeProducing (a TCP transport's
    reading) and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.reading_paused = 0

    def pauseProducing(self) -> None:
        self.reading_paused += 1

    def resumeProducing(self) -> None:
        self.reading_paused -= 1


class SessionCase(unittest.TestCase):
    """A logged-in session of USER over a fresh store."""

    max_message_size = 10 * 1024 * 1024
    quota: int | None = None

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="imap-session-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = MaildirStore(root / "maildirs", hostname=HOSTNAME)
        self.user_path = self.store.create_user("example.org", "alice")
        self.account = self.store.account(self.user_path)
        self.addCleanup(self._close_folders)
        self.session, self.transport = self.new_session()

    def new_session(self) -> tuple[IMAPSession, SessionTransport]:
        limits = SimpleNamespace(idle_timeout=300, max_message_size=self.max_message_size,
                                 auth_failures_per_connection=3)
        context = SimpleNamespace(tls=None, hostname=HOSTNAME, limits=limits, portal=None,
                                  throttle=None, store=self.store,
                                  allow_plaintext_loopback=True)
        session = IMAPSession(context)  # type: ignore[arg-type]
        transport = SessionTransport()
        session.makeConnection(transport)
        session.timeOut = None
        session.setTimeout(None)
        imap_account = IMAPAccount(USER, self.account, self.quota)
        session.user = USER
        session.imap_account = imap_account
        session.state = "auth"
        transport.clear()
        self.addCleanup(self._end, session)
        return session, transport

    def _end(self, session: IMAPSession) -> None:
        session.setTimeout(None)
        abort = session._abort_call   # a close's abort timer: the connection is over now
        if abort is not None and abort.active():
            abort.cancel()
        if not session._closing:
            session._deselect()
            if session._append_writer is not None:
                session._append_writer.abort()

    @inlineCallbacks
    def _close_folders(self) -> Any:
        for folder in list(self.account._folders.values()):
            yield folder.close()

    # -- talking to the session

    def send(self, data: bytes, session: IMAPSession | None = None) -> None:
        (session or self.session).dataReceived(data)

    def pump(self, transport: StringTransport | None = None) -> None:
        """Let a registered producer (a streaming FETCH) write everything it has."""
        transport = transport or self.transport
        for _ in range(100000):
            producer = transport.producer
            if producer is None:
                return
            producer.resumeProducing()

    @inlineCallbacks
    def wait_for(self, pattern: bytes, transport: StringTransport | None = None,
                 timeout: float = 10.0) -> Any:
        """Wait (letting threads and timers run) until the output matches `pattern`;
        returns the output so far."""
        transport = transport or self.transport
        waited = 0.0
        while True:
            self.pump(transport)
            out = transport.value()
            if re.search(pattern, out, re.S):
                return out
            if waited > timeout:
                self.fail(f"no {pattern!r} in {out[-2000:]!r}")
            yield task.deferLater(reactor, 0.005, lambda: None)
            waited += 0.005

    @inlineCallbacks
    def command(self, tag: bytes, text: bytes, session: IMAPSession | None = None,
                transport: StringTransport | None = None) -> Any:
        """Send `tag text` CRLF (literals inline, as a LITERAL+ client would) and wait for
        the tagged reply; returns everything written meanwhile."""
        transport = transport or self.transport
        transport.clear()
        self.send(tag + b" " + text + b"\r\n", session)
        out = yield self.wait_for(rb"(^|\r\n)" + re.escape(tag) + rb" (OK|NO|BAD)[^\r\n]*\r\n$",
                                  transport)
        return out

    @inlineCallbacks
    def append(self, message: bytes, mailbox: bytes = b"INBOX", flags: bytes = b"") -> Any:
        """APPEND through the session; the new UID."""
        opts = b" (" + flags + b")" if flags else b""
        out = yield self.command(b"ap", b"APPEND " + mailbox + opts + b" {%d+}\r\n"
                                 % len(message) + message)
        m = re.search(rb"ap OK \[APPENDUID \d+ (\d+)\]", out)
        self.assertIsNotNone(m, out)
        return int(m.group(1))

    @inlineCallbacks
    def select(self, mailbox: bytes = b"INBOX") -> Any:
        out = yield self.command(b"sel", b"SELECT " + mailbox)
        self.assertIn(b"sel OK", out)
        return out
