"""IMAP session basics against a real server: listeners, STARTTLS and implicit TLS,
LOGINDISABLED/PRIVACYREQUIRED before TLS, LOGIN and AUTHENTICATE PLAIN (SASL-IR and
continuation), CAPABILITY after login, LITERAL+, ID, ENABLE, NAMESPACE, unknown commands
and garbage in every state."""

from __future__ import annotations

import imaplib
import re
import socket
import ssl

import pytest

from harness import HOSTNAME, PASSWORD, tls_client_context
from imap_helpers import (
    ALICE,
    AUTHENTICATED_CAPABILITIES,
    BOB,
    CAROL,
    ConnectionClosed,
    Lit,
    RawIMAP,
    close_quietly,
    deliver,
    imap_connect,
    imap_login,
    module_server,
    new_user,
    parse_data,
    plain_b64,
    quote,
)

imap_server = module_server()


def caps_of(text: bytes) -> set[str]:
    return set(text.decode().split())


# -- before TLS ------------------------------------------------------------------------------

def test_greeting_and_capability_before_tls(imap_server):
    c = RawIMAP.connect(imap_server, tls=False)
    try:
        assert c.greeting.startswith(b"* OK"), f"greeting: {c.greeting!r}"
        caps = c.capabilities()
        assert "IMAP4rev1" in caps, caps
        assert "STARTTLS" in caps, f"no STARTTLS before TLS: {caps}"
        assert "LOGINDISABLED" in caps, f"no LOGINDISABLED before TLS: {caps}"
        assert "AUTH=PLAIN" not in caps, f"AUTH=PLAIN offered before TLS: {caps}"
        if b"[CAPABILITY " in c.greeting:  # capabilities in the greeting must agree
            greet_caps = caps_of(c.greeting.split(b"[CAPABILITY ", 1)[1].split(b"]", 1)[0])
            assert "STARTTLS" in greet_caps and "LOGINDISABLED" in greet_caps, greet_caps
            assert "AUTH=PLAIN" not in greet_caps, greet_caps
    finally:
        c.close()


def test_login_before_tls_gets_privacyrequired(imap_server):
    c = RawIMAP.connect(imap_server, tls=False)
    try:
        r = c.command(b"LOGIN " + quote(ALICE) + b" " + quote(PASSWORD))
        assert r.status == "NO", f"LOGIN before TLS:\n{r}"
        assert r.code == b"PRIVACYREQUIRED", f"LOGIN before TLS:\n{r}"
        # AUTHENTICATE PLAIN (not offered) must not log in either.
        r = c.command(b"AUTHENTICATE PLAIN " + plain_b64(ALICE, PASSWORD))
        assert r.status in ("NO", "BAD"), f"AUTHENTICATE before TLS:\n{r}"
        r = c.command(b"SELECT INBOX")
        assert r.status in ("NO", "BAD"), f"SELECT after refused logins:\n{r}"
        # The session goes on and can still upgrade.
        c.starttls()
        r = c.command(b"LOGIN " + quote(ALICE) + b" " + quote(PASSWORD))
        assert r.status == "OK", str(r)
    finally:
        c.close()


def test_imaplib_refuses_login_before_tls(imap_server):
    conn = imap_connect(imap_server, starttls=False)
    try:
        assert "LOGINDISABLED" in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(ALICE, PASSWORD)
    finally:
        close_quietly(conn)


# -- STARTTLS --------------------------------------------------------------------------------

def test_starttls_changes_capabilities(imap_server):
    c = RawIMAP.connect(imap_server, tls=False)
    try:
        r = c.starttls()
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3"), c.sock.version()
        caps = c.capabilities()
        assert "AUTH=PLAIN" in caps, f"after STARTTLS: {caps}"
        assert "LOGINDISABLED" not in caps, f"after STARTTLS: {caps}"
        assert "STARTTLS" not in caps, f"STARTTLS still offered inside TLS: {caps}"
        r = c.command(b"STARTTLS")
        assert r.status in ("BAD", "NO"), f"second STARTTLS:\n{r}"
        r = c.command(b"NOOP")
        assert r.status == "OK", str(r)
    finally:
        c.close()


def test_commands_pipelined_after_starttls_are_discarded(imap_server):
    c = RawIMAP.connect(imap_server, tls=False)
    try:
        c.send(b"a STARTTLS\r\nb NOOP\r\n")
        line = c.read_response()
        while line.startswith(b"* "):
            line = c.read_response()
        assert line.startswith(b"a OK"), f"STARTTLS reply: {line!r}"
        assert c.buf == b"", f"plaintext after the STARTTLS reply: {c.buf!r}"
        try:
            c.sock = tls_client_context().wrap_socket(c.sock, server_hostname=HOSTNAME)
        except (ssl.SSLError, OSError) as e:
            pytest.fail(f"TLS handshake failed (plaintext answer to the pipelined command?): {e}")
        stray = c.pending(1.0)
        assert b"b " not in stray and stray == b"", f"answer to the pipelined command: {stray!r}"
        r = c.command(b"NOOP", tag=b"c")
        assert r.status == "OK", str(r)
        assert not any(u.startswith(b"b ") for u in r.untagged), str(r)
    finally:
        c.close()


def test_implicit_tls_port(imap_server):
    c = RawIMAP.connect(imap_server, implicit=True)
    try:
        assert c.greeting.startswith(b"* OK"), c.greeting
        caps = c.capabilities()
        assert "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps, caps
        assert "STARTTLS" not in caps, f"STARTTLS offered on the implicit TLS port: {caps}"
        r = c.command(b"LOGIN " + quote(BOB) + b" " + quote(PASSWORD))
        assert r.status == "OK", str(r)
    finally:
        c.close()
    conn = imap_login(imap_server, CAROL, implicit=True)
    try:
        typ, data = conn.select("INBOX")
        assert typ == "OK", data
    finally:
        close_quietly(conn)


def test_plaintext_on_imaps_port_gets_no_imap(imap_server):
    """The implicit TLS port speaks TLS first: a plaintext client gets no IMAP greeting."""
    with socket.create_connection(("127.0.0.1", imap_server.ports["imaps"]), timeout=5) as s:
        s.settimeout(1.0)
        try:
            data = s.recv(100)
        except (socket.timeout, TimeoutError):
            data = b""
        assert not data.startswith(b"* OK"), f"plaintext greeting on imaps: {data!r}"


# -- LOGIN and AUTHENTICATE ------------------------------------------------------------------

def test_login_with_imaplib_after_starttls(imap_server):
    conn = imap_connect(imap_server)
    try:
        assert "AUTH=PLAIN" in conn.capabilities, conn.capabilities
        typ, data = conn.login(ALICE, PASSWORD)
        assert typ == "OK", data
        typ, data = conn.select("INBOX")
        assert typ == "OK", data
    finally:
        close_quietly(conn)


def test_login_wrong_password_and_unknown_user(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        r = c.command(b"LOGIN " + quote(ALICE) + b" " + quote("wrong"))
        assert r.status == "NO", str(r)
        r = c.command(b"LOGIN " + quote("nobody@example.test") + b" " + quote(PASSWORD))
        assert r.status == "NO", str(r)
    finally:
        c.close()


def test_authenticate_plain_sasl_ir(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        r = c.command(b"AUTHENTICATE PLAIN " + plain_b64(BOB, PASSWORD))
        assert r.status == "OK", f"AUTHENTICATE PLAIN with initial response:\n{r}"
        assert not r.continuations, f"continuation despite SASL-IR:\n{r}"
        r = c.command(b"SELECT INBOX")
        assert r.status == "OK", str(r)
    finally:
        c.close()


def test_authenticate_plain_with_continuation(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        line = c.read_response()
        assert line.startswith(b"+"), f"expected a '+ ' continuation, got {line!r}"
        c.send(plain_b64(CAROL, PASSWORD) + b"\r\n")
        r = c.read_result(b"a", b"AUTHENTICATE PLAIN")
        assert r.status == "OK", str(r)
    finally:
        c.close()
    # imaplib does the same dance.
    conn = imap_connect(imap_server)
    try:
        typ, data = conn.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{PASSWORD}".encode())
        assert typ == "OK", data
    finally:
        close_quietly(conn)


def test_authenticate_plain_failures(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        r = c.command(b"AUTHENTICATE PLAIN " + plain_b64(ALICE, "wrong"))
        assert r.status == "NO", str(r)
        # Authorising as someone else is never allowed.
        r = c.command(b"AUTHENTICATE PLAIN " + plain_b64(ALICE, PASSWORD, authz=BOB))
        assert r.status == "NO", f"proxy authorisation as another user:\n{r}"
        c.send(b"x AUTHENTICATE PLAIN\r\n")
        assert c.read_response().startswith(b"+")
        c.send(b"*\r\n")  # client cancels
        r = c.read_result(b"x")
        assert r.status == "BAD", f"cancelled AUTHENTICATE:\n{r}"
        r = c.command(b"NOOP")
        assert r.status == "OK", str(r)
    finally:
        c.close()


def test_authenticate_login_and_the_shared_field_checks(imap_server):
    """AUTHENTICATE LOGIN (Outlook's mechanism) with base64 challenges, and the checks the
    SASL decoder shared with SMTP and POP3 makes: over-long and NUL-carrying fields are
    refused, the session goes on."""
    import base64

    c = RawIMAP.connect(imap_server)
    try:
        caps = c.command(b"CAPABILITY")
        assert b"AUTH=LOGIN" in caps.untagged[0] and b"AUTH=PLAIN" in caps.untagged[0], str(caps)
        r = c.command(b"AUTHENTICATE PLAIN " + base64.b64encode(b"\0" + b"x" * 300 + b"\0pw"))
        assert r.status == "BAD", f"a 300-octet authcid:\n{r}"
        r = c.command(b"AUTHENTICATE PLAIN " + base64.b64encode(
            b"\0" + ALICE.encode() + b"\0pass\0word"))
        assert r.status == "BAD", f"a NUL inside the password:\n{r}"
        r = c.command(b"AUTHENTICATE PLAIN !!notbase64")
        assert r.status == "BAD", str(r)
        c.send(b"l AUTHENTICATE LOGIN\r\n")
        assert c.read_response().rstrip() == b"+ " + base64.b64encode(b"Username:")
        c.send(base64.b64encode(ALICE.encode()) + b"\r\n")
        assert c.read_response().rstrip() == b"+ " + base64.b64encode(b"Password:")
        c.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
        r = c.read_result(b"l", b"AUTHENTICATE LOGIN")
        assert r.status == "OK", str(r)
        assert c.command(b"SELECT INBOX").status == "OK"
    finally:
        c.close()


def test_first_login_creates_a_missing_maildir(imap_server):
    """A user whose Maildir is not there (removed, or the tree restored without it) logs in
    over IMAP: the Maildir is made then (off the reactor), with the default folders."""
    import shutil

    user = new_user(imap_server, "fresh")
    local, domain = user.split("@")
    shutil.rmtree(imap_server.maildir_root / domain / local)
    conn = imap_connect(imap_server)
    try:
        assert conn.login(user, PASSWORD)[0] == "OK"
        assert conn.select("INBOX")[0] == "OK"
        typ, listing = conn.list()
        assert typ == "OK" and any(b"Sent" in line for line in listing), listing
    finally:
        close_quietly(conn)
    assert (imap_server.maildir_root / domain / local / "cur").is_dir()


def test_imap_uses_the_same_accounts_as_smtp(imap_server):
    """An account made with mailserver-admin receives over SMTP and logs in over IMAP;
    a password change is seen without a restart."""
    user = new_user(imap_server, "acct")
    msg = deliver(imap_server, user, subject="over smtp")
    conn = imap_login(imap_server, user)
    try:
        typ, data = conn.select("INBOX")
        assert typ == "OK" and data == [b"1"], data
        typ, data = conn.fetch("1", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK" and msg.split(b"Message-ID: ")[1].split(b"\r\n")[0] in data[0][1], data
    finally:
        close_quietly(conn)
    imap_server.admin_ok("user", "passwd", user, "--password-stdin", input="n3w-pass\n")
    conn = imap_connect(imap_server)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(user, PASSWORD)
    finally:
        close_quietly(conn)
    conn = imap_login(imap_server, user, "n3w-pass")
    close_quietly(conn)


# -- CAPABILITY after login --------------------------------------------------------------------

def test_capability_after_login_is_exact(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        r = c.command(b"LOGIN " + quote(ALICE) + b" " + quote(PASSWORD))
        assert r.status == "OK", str(r)
        if r.code and r.code.upper().startswith(b"CAPABILITY "):
            assert caps_of(r.code[len(b"CAPABILITY "):]) == AUTHENTICATED_CAPABILITIES, str(r)
        caps = c.capabilities()
        assert caps == AUTHENTICATED_CAPABILITIES, (
            f"missing: {sorted(AUTHENTICATED_CAPABILITIES - caps)}, "
            f"unexpected: {sorted(caps - AUTHENTICATED_CAPABILITIES)}")
    finally:
        c.close()
    c = RawIMAP.login(imap_server, BOB, implicit=True)
    try:
        assert c.capabilities() == AUTHENTICATED_CAPABILITIES
    finally:
        c.close()


def test_literal_plus_and_synchronising_literals(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        # LITERAL+: no continuation is sent, the octets follow at once.
        user, pw = ALICE.encode(), PASSWORD.encode()
        c.send(b"a LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (len(user), user, len(pw), pw))
        r = c.read_result(b"a", b"LOGIN {n+} {n+}")
        assert r.status == "OK", f"LOGIN with non-synchronising literals:\n{r}"
        assert not r.continuations, f"continuation for a LITERAL+ literal:\n{r}"
        r = c.command_parts([b"SELECT ", Lit(b"INBOX")])
        assert r.status == "OK", f"SELECT with a synchronising literal:\n{r}"
        assert len(r.continuations) == 1, f"expected one '+' continuation:\n{r}"
    finally:
        c.close()


def test_id_enable_namespace(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        r = c.command(b'ID ("name" "e2e-test" "version" "1")')
        assert r.status == "OK", str(r)
        ids = r.with_prefix(b"ID ")
        assert len(ids) == 1, f"expected one * ID response:\n{r}"
        parsed = parse_data(ids[0])
        assert parsed[0] is None or isinstance(parsed[0], list), f"ID response: {ids[0]!r}"
        if isinstance(parsed[0], list):
            assert len(parsed[0]) % 2 == 0, ids[0]
        r = c.command(b"ID NIL")
        assert r.status == "OK" and r.with_prefix(b"ID "), str(r)
        r = c.command(b"LOGIN " + quote(ALICE) + b" " + quote(PASSWORD))
        assert r.status == "OK", str(r)
        r = c.command(b"ENABLE CONDSTORE UTF8=ACCEPT X-NONSENSE")
        assert r.status == "OK", str(r)
        enabled = r.with_prefix(b"ENABLED")
        assert len(enabled) == 1, f"expected one * ENABLED response:\n{r}"
        assert b"X-NONSENSE" not in enabled[0].upper(), f"enabled an unknown extension:\n{r}"
        r = c.command(b"NAMESPACE")
        assert r.status == "OK", str(r)
        ns = r.with_prefix(b"NAMESPACE ")
        assert len(ns) == 1, str(r)
        assert parse_data(ns[0]) == [[[b"", b"."]], None, None], f"NAMESPACE: {ns[0]!r}"
    finally:
        c.close()


# -- bad input ------------------------------------------------------------------------------

GARBAGE = [
    b"a FOOBAR",
    b"a",
    b"*",
    b"+",
    b")))",
    b"a \x00\xff\xfe garbage",
    b"a LOGIN",
    b"a SELECT",
    b'a SELECT "unterminated',
    b"a FETCH 1:* (FLAGS",
    b"a FETCH 0 FLAGS",
    b"a FETCH x:y FLAGS",
    b"a STORE 1 PLUSFLAGS (\\Seen)",
    b"a UID FROB 1",
    b"a SEARCH FROB",
    b"a SEARCH (((((((((((((((((((((((((((((((((((((((((((((((((((((((((((ALL",
    b"a LIST",
    b"a STATUS INBOX (FROB)",
    b"a COPY",
    b"a NOOP extra arguments",
    b"a CAPABILITY x",
]


def _bad_and_continues(c: RawIMAP, garbage: bytes) -> str | None:
    """None if `garbage` got a BAD and the session answers the next command; else why not."""
    c.send(garbage + b"\r\nzz NOOP\r\n")
    try:
        r = c.read_result(b"zz")
    except (ConnectionClosed, OSError) as e:
        return f"{garbage[:60]!r}: connection lost ({e})"
    if r.status != "OK":
        return f"{garbage[:60]!r}: session did not go on:\n{r}"
    bads = [u for u in r.untagged if u.startswith(b"BAD") or re.match(rb"\S+ BAD", u)]
    if not bads:
        return f"{garbage[:60]!r}: no BAD:\n{r}"
    if r.continuations:
        return f"{garbage[:60]!r}: answered with a continuation line:\n{r}"
    return None


def _session(server, state: str) -> RawIMAP:
    c = RawIMAP.connect(server)
    if state != "not authenticated":
        c.ok(b"LOGIN " + quote(ALICE) + b" " + quote(PASSWORD))
    if state == "selected":
        c.select("INBOX", examine=True)
    return c


@pytest.mark.parametrize("state", ["not authenticated", "authenticated", "selected"])
def test_garbage_in_every_state_gets_bad(imap_server, state):
    problems = []
    c = _session(imap_server, state)
    try:
        for garbage in GARBAGE:
            problem = _bad_and_continues(c, garbage)
            if problem:
                problems.append(problem)
                if "connection lost" in problem or "did not go on" in problem:
                    c.close()
                    c = _session(imap_server, state)
        # A command not valid in this state is BAD (or NO) and changes nothing.
        wrong_state = {"not authenticated": b"SELECT INBOX", "authenticated": b"EXPUNGE",
                       "selected": b"LOGIN x y"}[state]
        r = c.command(wrong_state)
        if r.status not in ("BAD", "NO"):
            problems.append(f"{wrong_state!r} in state {state}:\n{r}")
        if c.command(b"NOOP").status != "OK":
            problems.append("NOOP failed at the end")
    finally:
        c.close()
    assert not problems, f"[{state}]\n" + "\n".join(problems)


@pytest.mark.parametrize("state", ["not authenticated", "authenticated", "selected"])
def test_unknown_command_gets_bad(imap_server, state):
    c = RawIMAP.connect(imap_server)
    try:
        if state != "not authenticated":
            c.ok(b"LOGIN " + quote(BOB) + b" " + quote(PASSWORD))
        if state == "selected":
            c.select("INBOX")
        r = c.command(b"XYZZY 1 2 3")
        assert r.status == "BAD", f"unknown command in state {state}:\n{r}"
        assert c.command(b"NOOP").status == "OK"
    finally:
        c.close()


def test_logout(imap_server):
    c = RawIMAP.login(imap_server, ALICE)
    try:
        r = c.command(b"LOGOUT")
        assert r.status == "OK", str(r)
        assert any(u.startswith(b"BYE") for u in r.untagged), f"no * BYE before LOGOUT OK:\n{r}"
        assert c.closed_by_server(5), "connection still open after LOGOUT"
    finally:
        c.close()
