"""Submission (RFC 6409) end to end: STARTTLS on 587, implicit TLS on 465, AUTH only under
TLS, sender ownership, header fix-ups, local delivery, limits and bad AUTH input."""

from __future__ import annotations

import base64
import smtplib
import subprocess
import time

import pytest

from harness import (HOSTNAME, PASSWORD, header_fields, header_values, make_message,
                     requires_tool, split_header_body, tls_client_context, wait_until)
from outbound_helpers import dns_server, mx_port, outbound_server, submit  # noqa: F401

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"


@pytest.fixture
def port() -> int:
    return mx_port()


@pytest.fixture
def server(make_server, dns_server, port):  # noqa: F811
    return outbound_server(make_server, dns_server, port)


def plain(user: str, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_starttls_and_implicit_tls_deliver_locally(server):
    msg = make_message("<sub-1@example.test>", sender=ALICE, to=BOB, subject="over 587")
    assert submit(server, ALICE, [BOB], msg) == {}
    msg2 = make_message("<sub-2@example.test>", sender=ALICE, to=BOB, subject="over 465")
    assert submit(server, ALICE, [BOB, CAROL], msg2, implicit=True) == {}
    # Local recipients have the message when the 250 arrives.
    bobs = [p.read_bytes() for p in server.messages(BOB)]
    assert len(bobs) == 2 and len(server.messages(CAROL)) == 1
    for data in bobs:
        head, _ = split_header_body(data)
        fields = header_fields(head)
        assert header_values(fields, "Return-Path") == [f"<{ALICE}>"]
        received = header_values(fields, "Received")[0]
        assert f"authenticated user {ALICE}" in received and "ESMTPSA" in received
        assert "TLS" in received
        assert header_values(fields, "DKIM-Signature"), "submitted mail is DKIM-signed"
    assert b"Subject: over 465" in bobs[0] + bobs[1]


def test_auth_not_offered_and_refused_before_tls(server):
    with server.raw(server.ports["submission"]) as c:
        ehlo = c.greet()
        assert not any(line.upper().startswith("AUTH") for line in ehlo.lines), ehlo
        assert "STARTTLS" in ehlo.lines
        r = c.cmd(f"AUTH PLAIN {plain(ALICE)}")
        assert (r.code, r.lines[0].split()[0]) == (538, "5.7.11"), r
        r = c.cmd(f"MAIL FROM:<{ALICE}>")
        assert (r.code, r.lines[0].split()[0]) == (530, "5.7.0"), r
        c.starttls()
        ehlo = c.cmd("EHLO client.example.test")
        assert "AUTH PLAIN LOGIN" in ehlo.lines, ehlo
        r = c.cmd(f"MAIL FROM:<{ALICE}>")
        assert (r.code, r.lines[0].split()[0]) == (530, "5.7.0"), f"MAIL before AUTH: {r}"
        assert c.cmd(f"AUTH PLAIN {plain(ALICE)}").code == 235
        assert c.cmd(f"MAIL FROM:<{ALICE}>").code == 250
        c.quit()


def test_auth_login_mechanism(server):
    with server.raw(server.ports["submission"]) as c:
        c.greet()
        c.starttls()
        c.cmd("EHLO client.example.test")
        r = c.cmd("AUTH LOGIN")
        assert r.code == 334 and base64.b64decode(r.lines[0]) == b"Username:"
        r = c.cmd(base64.b64encode(BOB.encode()).decode())
        assert r.code == 334 and base64.b64decode(r.lines[0]) == b"Password:"
        assert c.cmd(base64.b64encode(PASSWORD.encode()).decode()).code == 235
        c.quit()


def test_wrong_sender_refused(server):
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        for sender in (BOB, "alice@remote.test", "postmaster@example.test"):
            code, text = s.mail(sender)
            assert (code, text.split()[0]) == (553, b"5.7.1"), (sender, code, text)
            s.rset()
        code, text = s.mail("")
        assert code == 553, text
        s.rset()
        # The envelope is fine but the From: header names someone else.
        msg = make_message("<spoof-1@example.test>", sender=BOB, to=CAROL)
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(ALICE, [CAROL], msg)
        assert e.value.smtp_code == 553 and b"5.7.1" in e.value.smtp_error
    assert server.messages(CAROL) == []


def test_alias_of_the_user_may_be_the_sender(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, start=False)
    srv.admin_ok("alias", "add", "sales@example.test", f"{ALICE},{CAROL}")
    srv.start()
    msg = make_message("<alias-sender@example.test>", sender="sales@example.test", to=BOB)
    assert submit(srv, "sales@example.test", [BOB], msg, user=ALICE) == {}
    assert submit(srv, "alice+lists@example.test", [BOB], msg, user=ALICE) == {}
    assert len(srv.messages(BOB)) == 2


def test_missing_date_and_message_id_are_added(server):
    msg = b"From: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: bare\r\n\r\nhi\r\n"
    assert submit(server, ALICE, [BOB], msg) == {}
    [path] = server.messages(BOB)
    head, body = split_header_body(path.read_bytes())
    fields = header_fields(head)
    assert len(header_values(fields, "Date")) == 1
    [msgid] = header_values(fields, "Message-ID")
    assert msgid.startswith("<") and msgid.endswith(f"@{HOSTNAME}>")
    assert body == b"hi\r\n"


def test_remote_recipient_of_unauthenticated_client_is_refused(server):
    # The MX port never relays, and submission never takes MAIL without AUTH.
    with server.raw() as c:
        c.greet()
        assert c.cmd(f"MAIL FROM:<{ALICE}>").code == 250
        r = c.cmd("RCPT TO:<someone@primary.test>")
        assert r.code == 554 and r.lines[0].startswith("5.7.1"), r


def test_recipient_and_rate_limits(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, submission_max_recipients=2,
                          messages_per_hour=2)
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_client_context())
        s.login(ALICE, PASSWORD)
        assert s.mail(ALICE)[0] == 250
        codes = [s.rcpt(r)[0] for r in (BOB, CAROL, "alice+x@example.test")]
        assert codes == [250, 250, 452]
        s.rset()
        msg = make_message("<rate@example.test>", sender=ALICE, to=BOB)
        s.sendmail(ALICE, [BOB], msg)
        s.sendmail(ALICE, [BOB], msg)
        code, text = s.mail(ALICE)
        assert (code, text.split()[0]) == (451, b"4.7.1"), text
    # Another user is not affected.
    assert submit(srv, BOB, [CAROL], make_message("<rate2@example.test>", sender=BOB)) == {}


def test_bad_auth_input_is_counted_and_disconnects(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, auth_failures_per_connection=3,
                          auth_failure_delay_after=100, max_command_length=512)
    with srv.raw(srv.ports["submission"]) as c:
        c.greet()
        c.starttls()
        c.cmd("EHLO client.example.test")
        r = c.cmd("AUTH PLAIN !!!notbase64")
        assert (r.code, r.lines[0].split()[0]) == (501, "5.5.2"), r
        r = c.cmd("AUTH PLAIN " + "A" * 2000)
        assert (r.code, r.lines[0].split()[0]) == (500, "5.5.6"), r
        r = c.cmd(f"AUTH PLAIN {plain(ALICE, 'wrong')}")
        assert (r.code, r.lines[0].split()[0]) == (535, "5.7.8"), r
        r = c.read_reply()
        assert r.code == 421, r
        assert c.closed_by_server(5)


def test_repeated_failures_delay_the_next_reply(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, auth_failures_per_connection=10,
                          auth_failure_delay_after=2)
    with srv.raw(srv.ports["submission"]) as c:
        c.greet()
        c.starttls()
        c.cmd("EHLO client.example.test")
        for _ in range(2):
            assert c.cmd(f"AUTH PLAIN {plain(ALICE, 'wrong')}").code == 535
        started = time.monotonic()
        assert c.cmd(f"AUTH PLAIN {plain(ALICE, 'wrong')}").code == 535
        assert time.monotonic() - started >= 0.9, "the third failure is answered late"


def test_unfinished_data_costs_nothing_after_idle_timeout(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port, idle_timeout=1)
    with srv.raw(srv.ports["submissions"]) as c:
        c.wrap_tls()
        c.greet()
        assert c.cmd(f"AUTH PLAIN {plain(ALICE)}").code == 235
        assert c.cmd(f"MAIL FROM:<{ALICE}>").code == 250
        assert c.cmd("RCPT TO:<someone@primary.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: never finished\r\n\r\n" + b"x" * 10000 + b"\r\n")
        assert c.closed_by_server(5)
    queue_tmp = srv.state_dir / "queue" / "tmp"
    assert wait_until(lambda: not any(queue_tmp.iterdir()), 3), list(queue_tmp.iterdir())
    assert not any((srv.state_dir / "queue" / "env").iterdir())


def swaks(server, *args: str) -> subprocess.CompletedProcess:
    exe = requires_tool("swaks")
    argv = [exe, "--server", "127.0.0.1", "--helo", "client.example.test", "--timeout", "20",
            "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
            "--from", ALICE, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_swaks(server, mode):
    if mode == "starttls":
        cp = swaks(server, "--port", str(server.ports["submission"]), "--tls", "--to", BOB)
    else:
        cp = swaks(server, "--port", str(server.ports["submissions"]), "--tlsc", "--to", BOB)
    assert cp.returncode == 0, f"swaks exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    assert len(server.messages(BOB)) == 1
