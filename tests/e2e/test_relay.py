"""Relay end to end: MX order and fallback, retries, bounces (RFC 3464), null MX, smart
host, forwarding by the MX, against a twisted.names DNS server and SMTP receivers on
loopback addresses."""

from __future__ import annotations

import email
import email.policy
import time

import pytest

from harness import make_message, wait_until
from outbound_helpers import (Receiver, dns_server, make_certificate, mx_port,  # noqa: F401
                              outbound_server, submit, wait_queue_empty)

ALICE, BOB = "alice@example.test", "bob@example.test"


@pytest.fixture
def port() -> int:
    return mx_port()


@pytest.fixture
def server(make_server, dns_server, port):  # noqa: F811
    return outbound_server(make_server, dns_server, port)


def dsns(server, address: str = ALICE) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in server.messages(address)]


def delivery_status(dsn) -> list[dict[str, str]]:
    """The per-recipient blocks of a DSN's message/delivery-status part."""
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    [part] = [p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status"]
    raw = part.as_bytes().decode().split("\n\n", 1)[1] if not part.is_multipart() else ""
    if not raw:
        raw = "\n\n".join(str(block) for block in part.get_payload())
    blocks = [b for b in raw.replace("\r\n", "\n").strip().split("\n\n") if b.strip()]
    out = []
    for block in blocks[1:]:  # the first block is per-message
        fields = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith((" ", "\t")):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        out.append(fields)
    return out


def test_lowest_preference_mx_gets_all_recipients_over_one_tls_connection(
        make_server, dns_server, port, tmp_path):  # noqa: F811
    cert = make_certificate(tmp_path, "mx1.primary.test")
    srv = outbound_server(make_server, dns_server, port)
    with Receiver("127.0.0.2", port, name="mx1.primary.test", cert=cert) as mx1, \
            Receiver("127.0.0.3", port, name="mx2.primary.test") as mx2:
        msg = make_message("<mx-1@example.test>", sender=ALICE, to="one@primary.test")
        assert submit(srv, ALICE, ["one@primary.test", "two@primary.test"], msg) == {}
        assert mx1.wait_for(1), srv.diagnostics()
        assert wait_queue_empty(srv)
        [got] = mx1.received
        assert got.rcpts == ["one@primary.test", "two@primary.test"]
        assert got.mail_from == ALICE
        assert got.helo == "mail.example.test"
        assert got.tls, "STARTTLS is used whenever offered"
        assert got.data.endswith(msg)
        assert b"\r\nReturn-Path:" not in got.data and not got.data.startswith(b"Return-Path")
        assert mx1.connections == 1 and mx2.connections == 0


def test_fallback_to_next_mx_when_first_refuses_connections(server, port):
    with Receiver("127.0.0.5", port, name="up.fallback.test") as up:
        msg = make_message("<fb-1@example.test>", sender=ALICE, to="x@fallback.test")
        assert submit(server, ALICE, ["x@fallback.test"], msg) == {}
        assert up.wait_for(1), server.diagnostics()
        assert up.received[0].rcpts == ["x@fallback.test"]
    assert wait_queue_empty(server)


def test_implicit_mx_from_address_record(server, port):
    with Receiver("127.0.0.10", port, name="implicit.test") as rcv:
        msg = make_message("<impl-1@example.test>", sender=ALICE, to="x@implicit.test")
        assert submit(server, ALICE, ["x@implicit.test"], msg) == {}
        assert rcv.wait_for(1), server.diagnostics()


def test_temporary_failure_then_success_delivers_exactly_once(server, port):
    replies = {0: "451 4.3.0 please try again later"}
    with Receiver("127.0.0.6", port, name="mx.retry.test",
                  data_reply=lambda n: replies.get(n)) as rcv:
        msg = make_message("<retry-1@example.test>", sender=ALICE, to="x@retry.test")
        assert submit(server, ALICE, ["x@retry.test"], msg) == {}
        assert rcv.wait_for(1, timeout=20), server.diagnostics()
        assert wait_queue_empty(server)
        time.sleep(1.5)  # one more retry period: nothing may come again
        assert rcv.data_count == 2 and len(rcv.received) == 1
    assert server.messages(ALICE) == [], "no DSN for a message that got through"


def test_permanent_failure_bounces_one_dsn_to_the_sender(server, port):
    def rcpt(address: str):
        return "550 5.1.1 <%s>: no such user here" % address if address.startswith("gone") else None

    with Receiver("127.0.0.7", port, name="mx.reject.test", rcpt_reply=rcpt) as rcv:
        msg = make_message("<bounce-1@example.test>", sender=ALICE, to="gone@reject.test",
                           subject="will bounce")
        assert submit(server, ALICE, ["gone@reject.test", "here@reject.test"], msg) == {}
        assert rcv.wait_for(1), server.diagnostics()
        assert wait_until(lambda: len(server.messages(ALICE)) >= 1, 20), server.diagnostics()
        assert wait_queue_empty(server)
        time.sleep(1.5)
    [dsn] = dsns(server)
    raw = server.messages(ALICE)[0].read_bytes()
    assert raw.startswith(b"Return-Path: <>\r\n"), raw[:100]
    assert dsn["From"].addresses[0].username.upper() == "MAILER-DAEMON"
    assert dsn["Auto-Submitted"] == "auto-replied"
    [status] = delivery_status(dsn)
    assert status["final-recipient"] == "rfc822; gone@reject.test"
    assert status["action"] == "failed"
    assert status["status"] == "5.1.1"
    assert status["remote-mta"] == "dns; mx.reject.test"
    assert "550 5.1.1" in status["diagnostic-code"]
    [headers] = [p for p in dsn.iter_parts() if p.get_content_type() == "text/rfc822-headers"]
    assert b"Subject: will bounce" in headers.as_bytes()
    assert rcv.received[0].rcpts == ["here@reject.test"]


def test_null_mx_and_missing_domain_fail_at_once(server):
    msg = make_message("<null-1@example.test>", sender=ALICE, to="x@null.test")
    assert submit(server, ALICE, ["x@null.test", "y@no-such-domain.test"], msg) == {}
    assert wait_until(lambda: len(server.messages(ALICE)) >= 1, 20), server.diagnostics()
    [dsn] = dsns(server)
    statuses = {s["final-recipient"]: s["status"] for s in delivery_status(dsn)}
    assert statuses == {"rfc822; x@null.test": "5.1.10", "rfc822; y@no-such-domain.test": "5.1.2"}


def test_no_bounce_for_a_null_sender(server, port):
    # A bounce forwarded by the MX to a rejecting host must not bounce again.
    server.admin_ok("alias", "add", "fwd@example.test", "gone@reject.test")
    with Receiver("127.0.0.7", port, name="mx.reject.test",
                  rcpt_reply=lambda a: "550 5.1.1 no such user") as rcv:
        with server.smtp() as s:
            s.sendmail("", ["fwd@example.test"], make_message("<nullsender@remote.test>"))
        assert wait_until(lambda: rcv.connections >= 1, 20)
        assert wait_queue_empty(server)
    assert "no DSN for a message with a null sender" in server.log_text()
    assert list((server.state_dir / "queue" / "env").iterdir()) == []


def test_mx_forwards_remote_alias_targets_and_keeps_the_local_copy(server, port):
    server.admin_ok("alias", "add", "team@example.test", f"{BOB},friend@primary.test")
    server.admin_ok("alias", "add", "away@example.test", "far@primary.test")
    with Receiver("127.0.0.2", port, name="mx1.primary.test") as mx1:
        msg = make_message("<fwd-1@remote.test>", sender="x@remote.test", to="team@example.test")
        with server.smtp() as s:
            assert s.sendmail("x@remote.test", ["team@example.test", "away@example.test"],
                              msg) == {}
        assert len(server.messages(BOB)) == 1
        assert mx1.wait_for(1), server.diagnostics()
        [got] = mx1.received
        assert sorted(got.rcpts) == ["far@primary.test", "friend@primary.test"]
        assert got.mail_from == "x@remote.test"
        assert got.data.endswith(msg)
        assert not got.data.startswith(b"Return-Path") and b"Delivered-To" not in got.data


def test_smart_host_with_starttls_and_auth(make_server, dns_server, port, tmp_path):  # noqa: F811
    cert = make_certificate(tmp_path, "smarthost.test")
    secret = tmp_path / "smarthost.secret"
    secret.write_text("relay-pass\n")
    srv = outbound_server(make_server, dns_server, port, relay={
        "smarthost": f"smarthost.test:{port}", "smarthost_username": "relay-user",
        "smarthost_password_file": str(secret), "ca_file": str(cert[0])})
    with Receiver("127.0.0.9", port, name="smarthost.test", cert=cert,
                  auth=("relay-user", "relay-pass")) as smarthost, \
            Receiver("127.0.0.2", port, name="mx1.primary.test") as mx1:
        msg = make_message("<smart-1@example.test>", sender=ALICE, to="x@primary.test")
        assert submit(srv, ALICE, ["x@primary.test", "y@anywhere.test"], msg) == {}
        assert smarthost.wait_for(1), srv.diagnostics()
        [got] = smarthost.received
        assert got.tls and got.auth == "relay-user"
        assert sorted(got.rcpts) == ["x@primary.test", "y@anywhere.test"]
        assert mx1.connections == 0
    assert wait_queue_empty(srv)


def test_smart_host_with_implicit_tls(make_server, dns_server, port, tmp_path):  # noqa: F811
    cert = make_certificate(tmp_path, "smarthost.test")
    srv = outbound_server(make_server, dns_server, port, relay={
        "smarthost": f"smarthost.test:{port}", "smarthost_tls": "tls",
        "smarthost_username": "u", "smarthost_password": "p", "ca_file": str(cert[0])})
    with Receiver("127.0.0.9", port, name="smarthost.test", cert=cert, implicit_tls=True,
                  auth=("u", "p")) as smarthost:
        msg = make_message("<smart-2@example.test>", sender=ALICE, to="x@elsewhere.test")
        assert submit(srv, ALICE, ["x@elsewhere.test"], msg) == {}
        assert smarthost.wait_for(1), srv.diagnostics()
        assert smarthost.received[0].auth == "u"


def test_tls_required_domain_skips_a_host_whose_certificate_does_not_verify(
        make_server, dns_server, port, tmp_path):  # noqa: F811
    wrong = make_certificate(tmp_path / "a", "someone-else.test")
    right = make_certificate(tmp_path / "b", "mx2.primary.test")
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(wrong[0].read_bytes() + right[0].read_bytes())
    srv = outbound_server(make_server, dns_server, port, relay={
        "tls_required_domains": ["primary.test"], "ca_file": str(anchors)})
    with Receiver("127.0.0.2", port, name="mx1.primary.test", cert=wrong) as mx1, \
            Receiver("127.0.0.3", port, name="mx2.primary.test", cert=right) as mx2:
        msg = make_message("<tlsreq@example.test>", sender=ALICE, to="x@primary.test")
        assert submit(srv, ALICE, ["x@primary.test"], msg) == {}
        assert mx2.wait_for(1), srv.diagnostics()
        assert mx2.received[0].tls
        assert mx1.received == [] and mx1.connections == 1
