"""The SASL exchange every front end drives (SMTP AUTH, IMAP AUTHENTICATE, POP3 AUTH,
ManageSieve AUTHENTICATE): one response line at a time."""

import base64

import pytest

from mailserver import sasl


def test_respond_completes_plain():
    exchange = sasl.Plain()
    assert exchange.start(None) == b""
    assert exchange.respond(base64.b64encode(b"\0alice@example.org\0secret") + b"\r\n") is None
    assert (exchange.username, exchange.password) == ("alice@example.org", "secret")


def test_respond_steps_through_login():
    exchange = sasl.Login()
    assert exchange.start(None) == b"Username:"
    assert exchange.respond(base64.b64encode(b"bob@example.org")) == b"Password:"
    assert exchange.respond(base64.b64encode(b"pw")) is None
    assert (exchange.username, exchange.password) == ("bob@example.org", "pw")


@pytest.mark.parametrize("line", [b"*", b"*\r\n", b" * "])
def test_star_cancels(line):
    exchange = sasl.Plain()
    exchange.start(None)
    with pytest.raises(sasl.Cancelled):
        exchange.respond(line)


@pytest.mark.parametrize("line, reason", [
    (b"not base64!", sasl.CANNOT_DECODE),
    (base64.b64encode(b"no separators"), sasl.MALFORMED),
    (base64.b64encode(b"other@example.org\0alice@example.org\0pw"), sasl.PROXY),
])
def test_malformed_responses_are_sasl_errors(line, reason):
    exchange = sasl.Plain()
    exchange.start(None)
    with pytest.raises(sasl.SASLError) as e:
        exchange.respond(line)
    assert e.value.reason == reason
