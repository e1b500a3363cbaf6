"""End-to-end tests of the MX SMTP service ([listen].smtp) against a real twistd process."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import warnings

import pytest

from harness import (
    HOSTNAME,
    ConnectionClosed,
    SMTPClient,
    delivered_prefix,
    dot_stuff,
    header_fields,
    header_values,
    maildir_size_field,
    make_message,
    send_mail,
    stored_files,
    tls_client_context,
)

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"


# -- helpers ---------------------------------------------------------------------------------

def only_message(server, address: str) -> bytes:
    files = server.messages(address)
    assert len(files) == 1, f"{address}: expected 1 delivered message, found {len(files)}: {files}"
    return files[0].read_bytes()


def assert_delivered(server, address: str, original: bytes) -> list[tuple[str, str]]:
    """Exactly one message in `address`'s INBOX: the original plus prepended headers.
    Returns the prepended header fields."""
    files = server.messages(address)
    assert len(files) == 1, f"{address}: expected 1 delivered message, found {len(files)}: {files}"
    return assert_file_is(files[0], original)


def assert_file_is(path, original: bytes) -> list[tuple[str, str]]:
    stored = path.read_bytes()
    size = maildir_size_field(path)
    assert size == len(stored), f"{path.name}: ,S={size} but the file has {len(stored)} bytes"
    prefix = delivered_prefix(stored, original)
    assert prefix is not None, (f"{path} is not the sent message plus prepended headers:\n"
                                f"sent:   {original[:300]!r}\nstored: {stored[:600]!r}")
    return header_fields(prefix)


def assert_nothing_stored(server) -> None:
    files = stored_files(server.maildir_root, ("new", "tmp", "cur"))
    assert files == [], f"messages were stored: {files}"


def ehlo_keywords(reply) -> dict[str, str]:
    """EHLO reply lines after the greeting -> {KEYWORD: params}."""
    out = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.partition(" ")
        out[keyword.upper()] = params
    return out


def tls11_client_works() -> bool:
    """Can this Python/OpenSSL client speak TLS 1.1 at all? (checked against itself)."""
    import subprocess
    import tempfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            with tempfile.TemporaryDirectory() as d:
                cp = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                                     "-keyout", f"{d}/k.pem", "-out", f"{d}/c.pem",
                                     "-subj", "/CN=probe", "-days", "1"],
                                    capture_output=True, timeout=30)
                if cp.returncode != 0:
                    return False
                srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                srv_ctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
                srv_ctx.minimum_version = ssl.TLSVersion.TLSv1
                srv_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
                ls = socket.socket()
                ls.bind(("127.0.0.1", 0))
                ls.listen(1)

                def serve():
                    conn, _ = ls.accept()
                    try:
                        srv_ctx.wrap_socket(conn, server_side=True).close()
                    except (OSError, ssl.SSLError):
                        conn.close()

                t = threading.Thread(target=serve, daemon=True)
                t.start()
                try:
                    with socket.create_connection(ls.getsockname(), timeout=5) as c:
                        with tls11_context().wrap_socket(c) as s:
                            return s.version() == "TLSv1.1"
                except (OSError, ssl.SSLError):
                    return False
                finally:
                    t.join(5)
                    ls.close()
        except (OSError, subprocess.SubprocessError):
            return False


def tls11_context() -> ssl.SSLContext:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = tls_client_context(minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


# -- greeting and EHLO -----------------------------------------------------------------------

def test_banner_and_ehlo_extensions(server):
    with server.raw() as c:
        banner = c.read_reply()
        assert banner.code == 220 and HOSTNAME in banner.lines[0], f"banner: {banner}"
        ehlo = c.cmd("EHLO client.remote.test")
        assert ehlo.code == 250, f"EHLO: {ehlo}"
        kw = ehlo_keywords(ehlo)
        for ext in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS"):
            assert ext in kw, f"EHLO does not advertise {ext}:\n{ehlo}"
        assert kw.get("SIZE") == str(server.max_message_size), f"SIZE: {kw.get('SIZE')!r}\n{ehlo}"
        assert "AUTH" not in kw, f"the MX port advertises AUTH:\n{ehlo}"

        c.starttls()
        ehlo2 = c.cmd("EHLO client.remote.test")
        assert ehlo2.code == 250, f"EHLO after STARTTLS: {ehlo2}"
        kw2 = ehlo_keywords(ehlo2)
        assert "AUTH" not in kw2, f"the MX port advertises AUTH after STARTTLS:\n{ehlo2}"
        # RFC 3207 4.2: STARTTLS must not be offered again once TLS is up.
        assert "STARTTLS" not in kw2, f"STARTTLS advertised inside TLS:\n{ehlo2}"
        assert kw2.get("SIZE") == str(server.max_message_size), f"SIZE inside TLS:\n{ehlo2}"
        # No AUTH mechanism is usable either.
        r = c.cmd("AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=")
        assert 500 <= r.code < 600, f"AUTH on the MX port: {r}"
        c.quit()


# -- delivery ------------------------------------------------------------------------------

def test_plain_delivery_with_added_headers(server):
    msg = make_message("<plain-1@remote.test>", body=b"Hello Alice.\r\nSecond line.\r\n")
    with server.smtp() as s:
        assert s.sendmail("x@remote.test", [ALICE], msg) == {}
    added = assert_delivered(server, ALICE, msg)
    assert header_values(added, "Return-Path") == ["<x@remote.test>"], f"prepended: {added}"
    received = header_values(added, "Received")
    assert received and HOSTNAME in received[0], f"Received must name {HOSTNAME}: {added}"
    delivered_to = [v.strip("<>").lower() for v in header_values(added, "Delivered-To")]
    assert delivered_to == [ALICE], f"Delivered-To: {added}"


def test_starttls_delivery_received_mentions_tls(server):
    msg = make_message("<tls-1@remote.test>", subject="over TLS")
    with server.smtp() as s:
        s.starttls(context=tls_client_context())
        version, cipher = s.sock.version(), s.sock.cipher()[0]
        assert version in ("TLSv1.2", "TLSv1.3"), version
        assert s.sendmail("x@remote.test", [ALICE], msg) == {}
    added = assert_delivered(server, ALICE, msg)
    received = header_values(added, "Received")
    assert received and HOSTNAME in received[0], f"Received: {added}"
    mentions_tls = (cipher in received[0] or
                    re.search(r"TLS\s*v?" + re.escape(version[-3:]), received[0]) is not None)
    assert mentions_tls, f"Received does not mention {version}/{cipher}: {received[0]!r}"


def test_null_sender_accepted(server):
    # Bounces (MAIL FROM:<>) must be accepted by an MX (RFC 5321 4.5.5).
    msg = make_message("<bounce-1@remote.test>", sender="MAILER-DAEMON@remote.test")
    with server.raw() as c:
        c.greet()
        r = c.mail_transaction("", [ALICE], dot_stuff(msg))
        assert r.code == 250, f"end of data: {r}"
        c.quit()
    added = assert_delivered(server, ALICE, msg)
    assert header_values(added, "Return-Path") == ["<>"], f"prepended: {added}"


def test_three_recipients_three_files(server):
    msg = make_message("<three-1@remote.test>", to="undisclosed-recipients:;")
    assert send_mail(server, msg, [ALICE, BOB, CAROL]) == {}
    for rcpt in (ALICE, BOB, CAROL):
        added = assert_delivered(server, rcpt, msg)
        assert header_values(added, "Return-Path") == ["<x@remote.test>"], f"{rcpt}: {added}"


def test_dot_unstuffing(server):
    body = b"..x\r\n...\r\n..\r\nx..\r\n. y\r\nend\r\n"  # as sent on the wire
    head = make_message("<dots-1@remote.test>", body=b"")
    with server.raw() as c:
        c.greet()
        r = c.mail_transaction("x@remote.test", [ALICE], head + body + b".\r\n")
        assert r.code == 250, f"end of data: {r}"
        c.quit()
    expected = head + b".x\r\n..\r\n.\r\nx..\r\n y\r\nend\r\n"
    assert_delivered(server, ALICE, expected)


def test_eight_bit_message_stored_byte_exact(server):
    body = ("Grüße, café, 日本語\r\n".encode() + bytes(range(0x80, 0x100)).replace(b"\r", b"")
            .replace(b"\n", b"") + b"\r\nLatin-1: \xe9t\xe9\r\n")
    msg = make_message("<8bit-1@remote.test>", subject="\u00c9t\u00e9 \u2603", body=body,
                       extra_headers=["Content-Type: text/plain; charset=utf-8",
                                      "Content-Transfer-Encoding: 8bit"])
    with server.raw() as c:
        c.greet()
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(msg), "BODY=8BITMIME")
        assert r.code == 250, f"end of data: {r}"
        c.quit()
    assert_delivered(server, ALICE, msg)


# -- recipients ----------------------------------------------------------------------------

RELAY_TRICKS = [
    "user@other.test",
    "user%other.test@example.test",
    "@example.test:user@other.test",
    '"user@other.test"@example.test',
    "user@other.test@example.test",
    "other.test!user@example.test",
    "other.test!user",
]


def test_relaying_refused_including_tricks(server):
    failures = []
    with server.raw() as c:
        c.greet()
        r = c.cmd("MAIL FROM:<x@remote.test>")
        assert r.code == 250, f"MAIL FROM: {r}"
        for rcpt in RELAY_TRICKS:
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            if not (r.code == 554 and r.lines[0].startswith("5.7.1")):
                failures.append(f"RCPT TO:<{rcpt}> -> {r}")
        # None of the refusals may leave a recipient behind.
        r = c.cmd("DATA")
        assert r.code in (503, 554), f"DATA without any accepted recipient: {r}"
        c.quit()
    assert not failures, "relaying not refused with 554 5.7.1:\n" + "\n".join(failures)
    assert_nothing_stored(server)


def test_unknown_local_user(server):
    with server.raw() as c:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        r = c.cmd("RCPT TO:<nobody@example.test>")
        assert r.code == 550 and r.lines[0].startswith("5.1.1"), f"unknown user: {r}"
        r = c.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 250, f"a later valid RCPT: {r}"
        c.quit()


def test_subaddress_delivers_to_user(server):
    msg = make_message("<sub-1@remote.test>", to="alice+tag@example.test")
    assert send_mail(server, msg, ["alice+tag@example.test"]) == {}
    added = assert_delivered(server, ALICE, msg)
    assert header_values(added, "Return-Path") == ["<x@remote.test>"]
    assert not server.maildir("alice+tag@example.test").exists()


def test_case_insensitive_addresses(server):
    msg = make_message("<case-1@remote.test>", to="ALICE@Example.TEST")
    assert send_mail(server, msg, ["ALICE@Example.TEST"], sender="X@Remote.TEST") == {}
    assert_delivered(server, ALICE, msg)


def test_alias_delivers_to_every_target(make_server):
    srv = make_server(start=False)
    srv.admin_ok("alias", "add", "sales@example.test", f"{ALICE},{BOB}")
    srv.start()
    msg = make_message("<alias-1@remote.test>", to="sales@example.test")
    assert send_mail(srv, msg, ["sales@example.test"]) == {}
    assert_delivered(srv, ALICE, msg)
    assert_delivered(srv, BOB, msg)
    assert srv.messages(CAROL) == []


def test_catch_all_added_while_running(server):
    # The admin change must reach the running server without a restart.
    with server.raw() as c:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        r = c.cmd("RCPT TO:<whoever@example.test>")
        assert r.code == 550, f"before the catch-all: {r}"
        c.quit()
    server.admin_ok("alias", "add", "@example.test", CAROL)
    msg = make_message("<catchall-1@remote.test>", to="whoever@example.test")
    assert send_mail(server, msg, ["whoever@example.test"]) == {}
    assert_delivered(server, CAROL, msg)
    # Existing users still get their own mail.
    msg2 = make_message("<catchall-2@remote.test>")
    assert send_mail(server, msg2, [ALICE]) == {}
    assert_delivered(server, ALICE, msg2)
    assert len(server.messages(CAROL)) == 1


def test_max_recipients(make_server):
    srv = make_server(max_recipients=3)
    msg = make_message("<maxrcpt-1@remote.test>")
    with srv.raw() as c:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        codes = []
        for rcpt in (ALICE, BOB, CAROL, "alice+four@example.test", "bob+five@example.test"):
            codes.append(c.cmd(f"RCPT TO:<{rcpt}>"))
        assert [r.code for r in codes] == [250, 250, 250, 452, 452], \
            "\n".join(str(r) for r in codes)
        assert all(r.lines[0].startswith("4.5.3") for r in codes[3:]), \
            "\n".join(str(r) for r in codes[3:])
        r = c.cmd("DATA")
        assert r.code == 354, f"DATA: {r}"
        c.send(dot_stuff(msg))
        r = c.read_reply()
        assert r.code == 250, f"end of data: {r}"
        c.quit()
    for rcpt in (ALICE, BOB, CAROL):
        assert len(srv.messages(rcpt)) == 1, f"{rcpt}: {srv.messages(rcpt)}"


# -- size ----------------------------------------------------------------------------------

def test_mail_from_size_above_limit(server):
    limit = server.max_message_size
    with server.raw() as c:
        c.greet()
        r = c.cmd(f"MAIL FROM:<x@remote.test> SIZE={limit + 1}")
        assert r.code == 552 and r.lines[0].startswith("5.3.4"), f"SIZE={limit + 1}: {r}"
        r = c.cmd("RSET")
        assert r.code == 250
        r = c.cmd("MAIL FROM:<x@remote.test> SIZE=1000")
        assert r.code == 250, f"SIZE=1000: {r}"
        c.quit()


def test_oversize_message_refused_nothing_stored(make_server):
    limit = 100_000
    srv = make_server(max_message_size=limit)
    line = b"x" * 76 + b"\r\n"
    msg = make_message("<big-1@remote.test>", body=line * (2 * limit // len(line)))
    with srv.raw() as c:
        ehlo = c.greet()
        assert ehlo_keywords(ehlo).get("SIZE") == str(limit), f"EHLO: {ehlo}"
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(msg))
        assert r.code == 552 and r.lines[0].startswith("5.3.4"), f"oversize message: {r}"
        c.close()
    assert_nothing_stored(srv)


# -- protocol hygiene -------------------------------------------------------------------------

def expect_521_and_close(c: SMTPClient, what: str) -> None:
    try:
        r = c.read_reply()
    except ConnectionClosed:
        pytest.fail(f"{what}: connection closed without a 521 reply")
    assert r.code == 521 and r.lines[0].startswith("5.5.2"), f"{what}: {r}"
    assert c.closed_by_server(5), f"{what}: connection still open after 521"


@pytest.mark.parametrize("bad", [b"\n", b"\r"], ids=["bare-LF", "bare-CR"])
def test_bare_line_ending_in_command(server, bad):
    with server.raw() as c:
        c.greet()
        c.send(b"MAIL FROM:<x@remote.test>" + bad + b"RCPT TO:<alice@example.test>\r\n")
        expect_521_and_close(c, f"command with {bad!r}")
    assert_nothing_stored(server)


@pytest.mark.parametrize("bad", [b"\n", b"\r"], ids=["bare-LF", "bare-CR"])
def test_bare_line_ending_in_data(server, bad):
    with server.raw() as c:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: bare\r\n\r\nfirst" + bad + b"second\r\n.\r\n")
        expect_521_and_close(c, f"data with {bad!r}")
    assert_nothing_stored(server)


def test_lf_dot_lf_never_ends_data(server):
    # SMTP smuggling: <LF>.<LF> followed by a second transaction in the same DATA.
    payload = (b"Subject: first\r\n\r\nhello\n.\n"
               b"MAIL FROM:<spoof@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    with server.raw() as c:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(payload)
        expect_521_and_close(c, "data containing <LF>.<LF>")
    assert_nothing_stored(server)


def test_pipelined_commands_after_starttls_discarded(server):
    # CVE-2011-0411: bytes sent with STARTTLS must not be executed inside TLS.
    with server.raw() as c:
        c.greet()
        c.send(b"STARTTLS\r\nRSET\r\n")
        r = c.read_reply()
        assert r.code == 220, f"STARTTLS: {r}"
        assert c.buf == b"", f"server answered the pipelined RSET in plaintext: {c.buf!r}"
        c.wrap_tls()
        early = c.pending(0.5)
        assert early == b"", f"server sent unasked data inside TLS (answered RSET?): {early!r}"
        ehlo = c.cmd("EHLO client.remote.test")
        assert ehlo.code == 250 and HOSTNAME in ehlo.lines[0] and len(ehlo.lines) > 1, \
            f"first reply inside TLS is not the EHLO answer: {ehlo}"
        assert c.cmd("NOOP").code == 250
        assert c.pending(0.3) == b""
        c.quit()


def test_starttls_resets_session(server):
    with server.raw() as c:
        c.greet()
        c.starttls()
        r = c.cmd("MAIL FROM:<x@remote.test>")
        assert r.code == 503, f"MAIL FROM before EHLO inside TLS: {r}"
        c.cmd("EHLO client.remote.test")
        msg = make_message("<reset-1@remote.test>")
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(msg))
        assert r.code == 250, f"end of data: {r}"
        c.quit()
    assert_delivered(server, ALICE, msg)


def test_tls_1_1_refused(server):
    if not tls11_client_works():
        pytest.skip("this OpenSSL build cannot act as a TLS 1.1 client")
    with server.raw() as c:
        c.greet()
        assert c.cmd("STARTTLS").code == 220
        try:
            c.wrap_tls(tls11_context())
        except OSError:  # ssl.SSLError, reset or EOF: the handshake failed
            pass
        else:
            pytest.fail(f"TLS handshake succeeded with {c.sock.version()}")  # type: ignore
    # TLS 1.2 itself is fine.
    with server.raw() as c:
        c.greet()
        c.starttls(tls_client_context(maximum=ssl.TLSVersion.TLSv1_2))
        assert c.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
        assert c.cmd("EHLO client.remote.test").code == 250
        c.quit()


def test_long_command_line(server):
    with server.raw() as c:
        c.greet()
        r = c.cmd(b"MAIL FROM:<" + b"a" * 5000 + b"@remote.test>")
        assert r.code == 500 and r.lines[0].startswith("5.5.2"), f"5000-byte command: {r}"
        r = c.cmd("NOOP")
        assert r.code == 250, f"session after the long line: {r}"
        msg = make_message("<afterlong-1@remote.test>")
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(msg))
        assert r.code == 250, f"end of data: {r}"
        c.quit()
    assert_delivered(server, ALICE, msg)


def test_long_data_line(make_server):
    srv = make_server(max_line_length=1000)
    ok = make_message("<line-ok@remote.test>", body=b"y" * 900 + b"\r\n")
    bad = make_message("<line-bad@remote.test>", body=b"short\r\n" + b"z" * 2000 + b"\r\nend\r\n")
    with srv.raw() as c:
        c.greet()
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(ok))
        assert r.code == 250, f"900-byte line: {r}"
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(bad))
        assert 500 <= r.code < 600, f"2000-byte line with max_line_length=1000: {r}"
        c.close()
    files = srv.messages(ALICE)
    assert len(files) == 1, f"only the first message may be stored: {files}"
    assert_file_is(files[0], ok)
    assert list((srv.maildir(ALICE) / "tmp").glob("*")) == []


def test_idle_timeout(make_server):
    srv = make_server(idle_timeout=1)
    with srv.raw() as c:
        c.greet()
        start = time.monotonic()
        c.sock.settimeout(10)
        r = c.read_reply()
        waited = time.monotonic() - start
        assert r.code == 421 and r.lines[0].startswith("4.4.2"), f"idle timeout: {r}"
        assert 0.5 <= waited < 8, f"421 after {waited:.1f}s with idle_timeout = 1"
        assert c.closed_by_server(5), "connection still open after 421"


# -- logging -------------------------------------------------------------------------------

def test_log_lines_for_accepted_messages_and_rejected_recipients(server):
    msgid = "<log-1@remote.test>"
    msg = make_message(msgid, sender="logger@remote.test")
    with server.raw() as c:
        c.greet()
        assert c.cmd("MAIL FROM:<logger@remote.test>").code == 250
        assert c.cmd("RCPT TO:<nobody@example.test>").code == 550
        assert c.cmd("RCPT TO:<someone@other.test>").code == 554
        assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(dot_stuff(msg))
        assert c.read_reply().code == 250
        c.quit()
    stored = server.messages(ALICE)[0]
    # "The message id": the Message-ID header, or the server's own id for the message as
    # its Received header gives it ("... with ESMTP id XYZ").
    ids = [msgid.strip("<>")]
    received = header_values(assert_file_is(stored, msg), "Received")
    m = re.search(r"\bid\s+<?([^\s;>]+)", received[0]) if received else None
    if m:
        ids.append(m.group(1))
    sizes = {str(len(msg)), str(len(msg.replace(b"\r\n", b"\n"))), str(stored.stat().st_size)}

    def accepted_lines(text):
        return [line for line in text.splitlines() if any(i in line for i in ids)]

    def rejected_line(text, address, reasons):
        return [line for line in text.splitlines()
                if address in line and any(r in line for r in reasons)]

    text = server.wait_for_log(lambda t: accepted_lines(t)
                               and rejected_line(t, "someone@other.test", ("554", "5.7.1")))
    lines = accepted_lines(text)
    assert len(lines) == 1, f"expected one log line naming one of {ids}, got {lines}"
    line = lines[0]
    assert "logger@remote.test" in line and ALICE in line, f"from/recipient missing: {line}"
    assert any(re.search(rf"\b{s}\b", line) for s in sizes), f"size ({sizes}) missing: {line}"
    assert rejected_line(text, "nobody@example.test", ("550", "5.1.1", "unknown", "Unknown")), \
        f"no log line for the rejected nobody@example.test:\n{text[-3000:]}"
    assert rejected_line(text, "someone@other.test", ("554", "5.7.1", "relay", "Relay")), \
        f"no log line for the rejected someone@other.test:\n{text[-3000:]}"
