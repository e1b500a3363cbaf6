"""What every front end's connection gets from LimitedProtocolMixin: answers sent without
Nagle's wait (TCP_NODELAY), the connection slot returned when it ends."""

from __future__ import annotations

from twisted.internet import protocol
from twisted.internet.testing import StringTransport

from mailserver.connlimit import LimitedProtocolMixin
from mailserver.imap.server import IMAPSession
from mailserver.managesieve.session import ManageSieveSession
from mailserver.pop3.session import POP3Session
from mailserver.smtp.session import SMTPSession


class TCPStringTransport(StringTransport):
    """A transport with the TCP options of twisted.internet.tcp's (ITCPTransport)."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class Session(LimitedProtocolMixin, protocol.Protocol):
    made = False

    def connectionMade(self) -> None:
        self.made = True


def test_answers_leave_without_waiting_for_the_clients_acks():
    # Nagle's algorithm would hold the end of a large answer (a long SEARCH result, a
    # body) until the client's delayed ACK, 40 ms on Linux.
    transport = TCPStringTransport()
    session = Session()
    session.makeConnection(transport)
    assert transport.no_delay is True
    assert session.made


def test_a_transport_without_tcp_options_is_taken_as_it_is():
    session = Session()
    session.makeConnection(StringTransport())   # a UNIX socket, a test transport
    assert session.made


def test_every_front_end_gets_it():
    for cls in (SMTPSession, IMAPSession, POP3Session, ManageSieveSession):
        assert cls.makeConnection is LimitedProtocolMixin.makeConnection, cls
