"""End-to-end tests of POP3 ([listen].pop3 with STLS, [listen].pop3s) against a real twistd
process: poplib, raw sockets, curl, and an IMAP session on the same mailbox."""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from harness import (HOSTNAME, PASSWORD, make_message, port_is_listening, proc_status_kb,
                     requires_tool, send_mail, tls_client_context, wait_until)

ALICE, BOB = "alice@example.test", "bob@example.test"


# -- helpers ---------------------------------------------------------------------------------

def deliver(server, count: int, to: str = ALICE, body: bytes = b"Hello.\r\n") -> list[bytes]:
    """`count` messages through the MX port; the messages as sent."""
    sent = []
    for i in range(count):
        msg = make_message(f"<pop3-{i}-{time.monotonic_ns()}@remote.test>", to=to,
                           subject=f"message {i}", body=body)
        send_mail(server, msg, [to])
        sent.append(msg)
    return sent


def pop3_stls(server, user: str | None = ALICE) -> poplib.POP3:
    """poplib over [listen].pop3 upgraded with STLS, logged in as `user` (None: not)."""
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=15)
    p.stls(tls_client_context())
    if user:
        p.user(user)
        p.pass_(PASSWORD)
    return p


def pop3s(server, user: str | None = ALICE) -> poplib.POP3_SSL:
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_client_context(),
                        timeout=15)
    if user:
        p.user(user)
        p.pass_(PASSWORD)
    return p


def base_names(server, address: str = ALICE) -> list[str]:
    return sorted(p.name.split(":")[0] for p in server.messages(address))


def uidl_map(p: poplib.POP3) -> dict[int, str]:
    _, lines, _ = p.uidl()
    return {int(n): u for n, u in (line.decode().split() for line in lines)}


def as_sent(message: bytes) -> bytes:
    """What poplib's retr() hands back for a stored CRLF message: lines joined by CRLF,
    dot-unstuffed, no final line end."""
    return message.rstrip(b"\r\n")


def reset_peak_memory(server) -> int:
    """Restart the server's VmHWM count from its current size (Linux clear_refs); returns
    VmRSS in kB.  Start-up peaks higher than a session ever should, so a peak measured
    from process start would hide what one RETR costs."""
    try:
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak memory count: {e}")
    return proc_status_kb(server.pid, "VmRSS")


class Raw:
    """Line-level POP3 over a socket, for what poplib hides or refuses to send."""

    def __init__(self, port: int, tls: bool = False, timeout: float = 10) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls_client_context().wrap_socket(sock, server_hostname=HOSTNAME) if tls \
            else sock
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unparsed {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def multi(self, line: bytes) -> tuple[bytes, list[bytes]]:
        first = self.cmd(line)
        lines = []
        if first.startswith(b"+OK"):
            while (ln := self.line()) != b".":
                lines.append(ln)
        return first, lines

    def starttls(self) -> None:
        assert self.cmd(b"STLS").startswith(b"+OK")
        assert not self.buf
        self.sock = tls_client_context().wrap_socket(self.sock, server_hostname=HOSTNAME)

    def closed(self, wait: float = 5.0) -> bool:
        self.sock.settimeout(wait)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


# -- poplib over STLS: every command -----------------------------------------------------------

def test_poplib_over_stls_every_command(server):
    sent = deliver(server, 3, body=b"line\r\n.dotted line\r\n")
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=15)
    try:
        assert p.getwelcome().startswith(b"+OK")
        caps = p.capa()
        assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.user(ALICE)
        p.stls(tls_client_context())
        caps = p.capa()
        assert {"TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"} <= set(caps)
        assert caps["SASL"] == ["PLAIN", "LOGIN"] and "STLS" not in caps
        p.user(ALICE)
        assert p.pass_(PASSWORD).startswith(b"+OK")

        count, octets = p.stat()
        assert count == 3
        files = {path.name.split(":")[0]: path.read_bytes() for path in server.messages(ALICE)}
        assert octets == sum(len(data) for data in files.values())
        _, listing, _ = p.list()
        sizes = {int(n): int(s) for n, s in (ln.split() for ln in listing)}
        uidls = uidl_map(p)
        assert sorted(uidls.values()) == sorted(files)
        for n, uidl in uidls.items():
            assert sizes[n] == len(files[uidl])  # octets of the CRLF form as stored
            _, lines, size = p.retr(n)
            assert b"\r\n".join(lines) == as_sent(files[uidl])
            assert b".dotted line" in lines  # byte-stuffed on the wire, unstuffed by poplib
        assert p.list(2).split()[1:] == [b"2", str(sizes[2]).encode()]
        assert p.uidl(2).split()[2].decode() == uidls[2]
        _, top, _ = p.top(1, 1)
        assert top[-2:] == [b"", b"line"]
        assert any(h.startswith(b"Subject: message") for h in top)
        assert p.noop().startswith(b"+OK")
        assert sent  # delivered as sent, plus trace headers: checked by the SMTP tests

        # DELE marks, RSET unmarks, errors for bad numbers and deleted messages
        assert p.dele(1).startswith(b"+OK")
        for bad in (lambda: p.retr(1), lambda: p.dele(1), lambda: p.list(1),
                    lambda: p.retr(4), lambda: p.retr(0), lambda: p._shortcmd("RETR x"),
                    lambda: p.top(2, -1)):
            with pytest.raises(poplib.error_proto):
                bad()
        assert p.stat()[0] == 2
        assert p.rset().startswith(b"+OK")
        assert p.stat() == (3, octets)

        # DELE + QUIT removes exactly that file
        p.dele(2)
        assert len(server.messages(ALICE)) == 3  # not before QUIT
        assert p.quit().startswith(b"+OK")
    finally:
        p.close()
    assert base_names(server) == sorted(u for n, u in uidls.items() if n != 2)


def test_pop3s_uidl_stable_across_reconnect_and_restart(server):
    deliver(server, 2)
    p = pop3s(server)
    first = uidl_map(p)
    p.quit()
    assert sorted(first.values()) == base_names(server)  # the Maildir base names

    deliver(server, 1)
    p = pop3_stls(server)
    second = uidl_map(p)
    p.quit()
    assert [second[n] for n in (1, 2)] == [first[1], first[2]]
    assert len(second) == 3

    server.stop()
    server.start()
    p = pop3s(server)
    assert uidl_map(p) == second
    p.dele(1)
    p.quit()
    server.stop()
    server.start()
    p = pop3s(server)
    after = uidl_map(p)
    p.quit()
    assert sorted(after.values()) == sorted([second[2], second[3]]) == base_names(server)


def test_rset_and_dropped_connection_keep_messages(server):
    deliver(server, 2)
    before = base_names(server)
    p = pop3s(server)
    p.dele(1)
    p.dele(2)
    p.rset()
    p.quit()
    assert base_names(server) == before

    p = pop3s(server)
    p.dele(1)
    p.dele(2)
    p.close()  # no QUIT: no UPDATE state
    time.sleep(0.2)
    assert base_names(server) == before

    def can_log_in() -> bool:  # the dropped session's mailbox lock is gone too
        try:
            pop3s(server).quit()
            return True
        except poplib.error_proto:
            return False
    assert wait_until(can_log_in, 5)


def test_second_session_gets_in_use(server):
    deliver(server, 1)
    first = pop3_stls(server)
    for connect in (pop3_stls, pop3s):
        other = connect(server, user=None)
        other.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[IN-USE\]"):
            other.pass_(PASSWORD)
        other.quit()
    bob = pop3s(server, BOB)  # other mailboxes are not affected
    bob.quit()
    first.quit()
    pop3s(server).quit()
    assert "mailbox in use" in server.wait_for_log(lambda t: "mailbox in use" in t)


# -- TLS policy, AUTH, bad input ---------------------------------------------------------------

def test_stls_discards_pipelined_commands_and_auth_plain(server):
    deliver(server, 1)
    r = Raw(server.ports["pop3"])
    try:
        first, caps = r.multi(b"CAPA")
        assert b"STLS" in caps and b"USER" not in caps and not any(c.startswith(b"SASL")
                                                                   for c in caps)
        assert r.cmd(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=").startswith(b"-ERR [AUTH]")
        # Everything sent with STLS before the handshake is dropped, never answered.
        r.send(b"STLS\r\nUSER alice@example.test\r\nPASS secret\r\n")
        assert r.line().startswith(b"+OK")
        r.sock = tls_client_context().wrap_socket(r.sock, server_hostname=HOSTNAME)
        assert r.cmd(b"STAT").startswith(b"-ERR")  # not logged in
        first, mechs = r.multi(b"AUTH")
        assert first.startswith(b"+OK") and mechs == [b"PLAIN", b"LOGIN"]
        assert r.cmd(b"AUTH PLAIN") == b"+ "
        assert r.cmd(b"AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=").startswith(b"+OK")
        assert r.cmd(b"STAT").startswith(b"+OK 1 ")
        assert r.cmd(b"QUIT").startswith(b"+OK")
    finally:
        r.close()
    r = Raw(server.ports["pop3s"], tls=True)
    try:
        assert r.cmd(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=").startswith(b"+OK")
    finally:
        r.close()


def hash_processes(server_pid: int) -> list[int]:
    """The server's password hash children (mailserver/hashchild.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue   # gone meanwhile
        if ppid == server_pid and b"hashchild.py" in command:
            found.append(int(entry.name))
    return found


def test_logins_go_on_when_the_hash_process_dies(make_server):
    """argon2id is verified in a child process of the server; killing it costs a login
    nothing: the threads verify it meanwhile (no login cache, so each is verified)."""
    server = make_server(auth={"login_cache_ttl": 0})
    assert wait_until(lambda: len(hash_processes(server.pid)) == 1, 10)
    (child,) = hash_processes(server.pid)
    pop3_stls(server).quit()
    os.kill(child, signal.SIGKILL)
    assert wait_until(lambda: not hash_processes(server.pid), 10)
    p = pop3_stls(server)
    assert p.stat()[0] == 0
    p.quit()
    p = pop3_stls(server, user=None)
    p.user(ALICE)
    with pytest.raises(poplib.error_proto):
        p.pass_("not the password")
    p.quit()
    assert server.running


def test_wrong_passwords_count_toward_the_limit(make_server):
    server = make_server(auth_failures_per_connection=2, auth_failure_delay_after=10)
    r = Raw(server.ports["pop3s"], tls=True)
    assert r.cmd(b"USER alice@example.test").startswith(b"+OK")
    assert r.cmd(b"PASS wrong").startswith(b"-ERR [AUTH]")
    assert r.cmd(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==").startswith(b"-ERR [AUTH]")
    assert r.closed()
    log = server.wait_for_log(lambda t: t.count("pop3s login failed for alice") >= 2)
    assert log.count("pop3s login failed for alice@example.test") == 2


def test_bad_input_and_idle_timeout(make_server):
    server = make_server(idle_timeout=1, max_command_length=512)
    deliver(server, 1)
    r = Raw(server.ports["pop3s"], tls=True)
    try:
        assert r.cmd(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=").startswith(b"+OK")
        assert r.cmd(b"NOOP " + b"x" * 2000) == b"-ERR Line too long"
        assert r.cmd(b"NO\0OP") .startswith(b"-ERR")
        assert r.cmd(b"NOOP \xff\xfe").startswith(b"-ERR")
        for bad in (b"RETR 0", b"RETR 2", b"RETR -1", b"RETR one", b"TOP 1 x", b"DELE",
                    b"LIST 1 2", b"XYZZY"):
            assert r.cmd(bad).startswith(b"-ERR"), bad
        assert r.cmd(b"STAT").startswith(b"+OK 1 ")
        assert r.closed(wait=4)  # idle for longer than idle_timeout
    finally:
        r.close()
    assert len(server.messages(ALICE)) == 1


# -- size, streaming and Maildirs from elsewhere -----------------------------------------------

def test_large_message_streams_and_lf_files_count_as_crlf(server):
    inbox = server.maildir(ALICE)
    lf = b"From: <x@remote.test>\nSubject: lf only\n\n.starts with a dot\nbody\n"
    (inbox / "new" / "1600000000.M1P1.dovecot.host").write_bytes(lf)
    big_line = b"X" * 998 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + big_line * (50 * 1024 * 1024 // len(big_line))
    (inbox / "new" / "1600000001.M1P1.other.host").write_bytes(big)

    p = pop3s(server)
    try:
        _, listing, _ = p.list()
        sizes = [int(ln.split()[1]) for ln in listing]
        assert sizes == [len(lf.replace(b"\n", b"\r\n")), len(big)]
        _, lines, _ = p.retr(1)
        assert lines == lf.rstrip(b"\n").split(b"\n")
        rss_before = reset_peak_memory(server)
        p.sock.settimeout(60)
        _, lines, octets = p.retr(2)
        assert len(lines) == 2 + len(big) // len(big_line)
        growth_mb = (server.vm_hwm_kb() - rss_before) / 1024
        assert growth_mb < 12, f"server memory grew by {growth_mb:.1f} MB for a 50 MB RETR"
    finally:
        p.quit()


# -- interoperation ------------------------------------------------------------------------------

def test_curl_pop3s_and_stls(server):
    curl = requires_tool("curl")
    sent = deliver(server, 2)
    base = f"pop3s://127.0.0.1:{server.ports['pop3s']}"
    auth = ["-u", f"{ALICE}:{PASSWORD}", "-k", "-s", "-S", "--max-time", "20"]
    listing = subprocess.run([curl, *auth, base + "/"], capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert [ln.split()[0] for ln in listing.stdout.splitlines()] == [b"1", b"2"]
    first = subprocess.run([curl, *auth, base + "/1"], capture_output=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert first.stdout.endswith(sent[0])
    stls = subprocess.run([curl, *auth, "--ssl-reqd",
                           f"pop3://127.0.0.1:{server.ports['pop3']}/2"],
                          capture_output=True, timeout=30)
    assert stls.returncode == 0, stls.stderr
    assert stls.stdout.endswith(sent[1])
    plain = subprocess.run([curl, "-u", f"{ALICE}:{PASSWORD}", "-s", "--max-time", "20",
                            f"pop3://127.0.0.1:{server.ports['pop3']}/1"],
                           capture_output=True, timeout=30)
    assert plain.returncode != 0  # no credentials without TLS


def _imap(server) -> imaplib.IMAP4_SSL:
    if not port_is_listening(server.ports["imaps"]):
        pytest.skip("listen.imaps is not served yet (IMAP not available in this build)")
    m = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=tls_client_context(),
                          timeout=15)
    m.login(ALICE, PASSWORD)
    return m


def test_imap_session_sees_pop3_deletion_and_the_reverse(server):
    deliver(server, 3)
    m = _imap(server)
    try:
        typ, data = m.select("INBOX")
        assert typ == "OK" and int(data[0]) == 3
        p = pop3s(server)
        p.dele(1)
        p.quit()
        typ, _ = m.noop()
        assert typ == "OK"
        expunges = [r for r in m.untagged_responses.get("EXPUNGE", [])]
        assert expunges == [b"1"], m.untagged_responses
        typ, data = m.search(None, "ALL")
        assert data[0].split() == [b"1", b"2"]
        # and the other way round: IMAP expunges, the next POP3 session no longer has it
        p = pop3s(server)
        before = uidl_map(p)
        p.quit()
        m.store("1", "+FLAGS", "\\Deleted")
        m.expunge()
        p = pop3s(server)
        after = uidl_map(p)
        p.quit()
        assert list(after.values()) == [before[2]]
    finally:
        m.logout()
