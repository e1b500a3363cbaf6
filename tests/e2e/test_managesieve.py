"""End-to-end tests of ManageSieve ([listen].managesieve, RFC 5804) against a real twistd
process: sieve-connect (Debian package), sievelib's client, raw sockets, mailserver-admin
and an IMAP session on the same Maildir.

Both clients verify the server's certificate (the self-signed one the server generated,
for mail.example.test) and authenticate with SASL PLAIN only after STARTTLS.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from harness import HOSTNAME, PASSWORD, requires_tool
from imap_helpers import close_quietly, imap_login, imaplib_ok

ALICE = "alice@example.test"
GOOD = 'require "fileinto";\r\nif header :contains "subject" "[list]" { fileinto "Lists"; }\r\n'
BAD = 'keep;\r\nfileinto "Junk";\r\n'   # fileinto without its require, on line 2


def maildir(server, address: str = ALICE) -> Path:
    return server.maildir(address)


def cert(server) -> Path:
    return server.state_dir / "tls" / "cert.pem"


# -- a raw client ------------------------------------------------------------------------------

class Raw:
    """ManageSieve over a socket, line by line; STARTTLS upgrades it."""

    def __init__(self, server, timeout: float = 15) -> None:
        self.server = server
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", server.ports["managesieve"]), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; got {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def response(self) -> list[bytes]:
        """Lines up to and including the OK/NO/BYE one."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.split(b" ", 1)[0] in (b"OK", b"NO", b"BYE"):
                return lines

    def cmd(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.response()

    def starttls(self) -> list[bytes]:
        assert self.cmd(b"STARTTLS")[-1].startswith(b"OK")
        ctx = ssl.create_default_context(cafile=str(cert(self.server)))
        self.sock = ctx.wrap_socket(self.sock, server_hostname=HOSTNAME)
        return self.response()       # RFC 5804 2.2: the capabilities again, unasked

    def login(self, user: str = ALICE, password: str = PASSWORD) -> list[bytes]:
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        return self.cmd(b'AUTHENTICATE "PLAIN" "' + token + b'"')

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server):
    clients: list[Raw] = []

    def make() -> Raw:
        clients.append(Raw(server))
        clients[-1].response()       # the greeting
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def test_starttls_then_plain_and_refused_before_tls(server, raw):
    c = Raw(server)
    try:
        greeting = c.response()
        assert b'"SASL" ""' in greeting and b'"STARTTLS"' in greeting
        assert greeting[-1].startswith(b"OK")
        refused = c.login()
        assert refused[-1].startswith(b"NO (ENCRYPT-NEEDED)"), refused
        assert c.cmd(b"LISTSCRIPTS")[-1] == b'NO "Authenticate first"'
        caps = c.starttls()
        assert b'"SASL" "PLAIN"' in caps and b'"STARTTLS"' not in caps
        assert b'"VERSION" "1.0"' in caps
        assert c.login() == [b'OK "Logged in"']
        assert c.cmd(b"LISTSCRIPTS") == [b'OK "Listscripts completed"']
    finally:
        c.close()


def test_failed_logins_are_counted_and_close_the_connection(server, raw):
    c = raw()
    c.starttls()
    for _ in range(3):
        reply = c.login(password="wrong")
        assert reply[0] == b'NO "Authentication failed"', reply
    assert c.line() == b'BYE "Too many authentication failures"'
    assert c.closed()
    log = server.wait_for_log(
        lambda text: text.count(f"managesieve login failed for {ALICE} from 127.0.0.1") >= 3)
    assert log.count(f"managesieve login failed for {ALICE} from 127.0.0.1") >= 3


def test_a_script_over_the_limit_is_refused_and_the_session_goes_on(make_server):
    server = make_server(sieve={"max_script_size": 1000, "quota": 3000})
    c = Raw(server)
    try:
        c.response()
        c.starttls()
        c.login()
        c.send(b'PUTSCRIPT "big" {5000+}\r\n' + b"#" * 5000 + b"\r\n")
        reply = c.response()
        assert reply[-1].startswith(b"NO (QUOTA/MAXSIZE)"), reply
        assert c.cmd(b'NOOP "still here"') == [b'OK (TAG "still here") "Done"']
        assert c.cmd(b'HAVESPACE "x" 1001')[-1].startswith(b"NO (QUOTA/MAXSIZE)")
        assert c.cmd(b'HAVESPACE "x" 1000') == [b'OK "Putscript would succeed"']
    finally:
        c.close()
    assert not (maildir(server) / "sieve" / "big.sieve").exists()


# -- sieve-connect -----------------------------------------------------------------------------

def sieve_connect(server, tmp_path: Path, commands: list[str], user: str = ALICE,
                  password: str = PASSWORD) -> subprocess.CompletedProcess:
    """sieve-connect --exec with `commands`; certificate verified, PLAIN only under TLS,
    no DNS (no SRV lookups), the password on a pipe."""
    tool = requires_tool("sieve-connect")
    script = tmp_path / f"commands-{time.monotonic_ns()}"
    script.write_text("\n".join(commands) + "\n")
    r, w = os.pipe()
    os.write(w, password.encode() + b"\n")
    os.close(w)
    try:
        return subprocess.run(
            [tool, "--nosrv", "--server", "127.0.0.1", "--port",
             str(server.ports["managesieve"]), "--user", user, "--passwordfd", str(r),
             "--tlscafile", str(cert(server)), "--tlshostname", HOSTNAME,
             "--authmech", "PLAIN", "--noclearauth", "--exec", str(script)],
            pass_fds=(r,), capture_output=True, text=True, timeout=60)
    finally:
        os.close(r)


def test_sieve_connect_put_activate_list_get(server, tmp_path):
    local = tmp_path / "filter.sieve"
    local.write_bytes(GOOD.encode())
    out = tmp_path / "downloaded.sieve"
    cp = sieve_connect(server, tmp_path, [f"put {local} filter", "activate filter", "list",
                                          f"get filter {out}"])
    assert cp.returncode == 0, cp.stderr
    assert '"filter" ACTIVE' in cp.stdout
    assert out.read_bytes() == GOOD.encode()
    link = maildir(server) / ".dovecot.sieve"
    assert os.readlink(link) == "sieve/filter.sieve"
    assert (maildir(server) / "sieve" / "filter.sieve").read_bytes() == GOOD.encode()


def test_sieve_connect_bad_script_active_delete_and_hostile_names(server, tmp_path):
    good, bad = tmp_path / "good.sieve", tmp_path / "bad.sieve"
    good.write_bytes(GOOD.encode())
    bad.write_bytes(BAD.encode())
    cp = sieve_connect(server, tmp_path, [f"put {good} filter", "activate filter",
                                          f"put {bad} broken", "delete filter",
                                          f"put {good} ../../escape", f"put {good} .hidden"])
    assert cp.returncode == 1, cp.stdout + cp.stderr
    lines = cp.stderr.splitlines()
    broken = [x for x in lines if x.startswith("PUTSCRIPT(broken) failed")]
    assert broken and 'NO "line 2: ' in broken[0] and "fileinto" in broken[0], cp.stderr
    assert any(x.startswith("DELETESCRIPT(filter) failed: NO (ACTIVE)") for x in lines), cp.stderr
    assert any(x.startswith("PUTSCRIPT(../../escape) failed: NO") for x in lines), cp.stderr
    assert any(x.startswith("PUTSCRIPT(.hidden) failed: NO") for x in lines), cp.stderr
    stored = sorted(p.name for p in (maildir(server) / "sieve").iterdir())
    assert stored == ["filter.sieve", "tmp"]
    assert not (maildir(server).parent / "escape.sieve").exists()


def test_sieve_connect_wrong_password(server, tmp_path):
    cp = sieve_connect(server, tmp_path, ["list"], password="wrong")
    assert cp.returncode != 0
    assert "Authentication failed" in cp.stderr, cp.stderr


# -- sievelib ----------------------------------------------------------------------------------

def sievelib_for(server, monkeypatch, clients: list):
    """connect(user, password, starttls) -> (sievelib Client, connected?), trusting the
    server's certificate: sievelib's STARTTLS uses ssl.create_default_context(), which
    this points at that certificate (the host name is still checked)."""
    try:
        from sievelib import managesieve
    except ImportError:
        if os.environ.get("MAILSERVER_REQUIRE_INTEROP") == "1":
            pytest.fail("sievelib is not installed, and MAILSERVER_REQUIRE_INTEROP=1 "
                        "requires it (pip install sievelib)", pytrace=False)
        pytest.skip("sievelib not installed (set MAILSERVER_REQUIRE_INTEROP=1 to make this "
                    "a failure)")
    anchor, default_context = str(cert(server)), ssl.create_default_context
    monkeypatch.setattr(managesieve.ssllib, "create_default_context",   # the ssl module
                        lambda *a, **kw: default_context(cafile=anchor))
    monkeypatch.setattr(managesieve.Client, "read_timeout", 30)

    def connect(user: str = ALICE, password: str = PASSWORD, starttls: bool = True):
        client = managesieve.Client("127.0.0.1", server.ports["managesieve"],
                                    srvhostname=HOSTNAME)
        clients.append(client)
        return client, client.connect(user, password, starttls=starttls, authmech="PLAIN")

    return connect


@pytest.fixture
def sievelib_clients():
    clients: list = []
    yield clients
    for client in clients:
        try:
            if client.authenticated:
                client.logout()
        except Exception:
            pass


@pytest.fixture
def sievelib(server, monkeypatch, sievelib_clients):
    return sievelib_for(server, monkeypatch, sievelib_clients)


def test_sievelib_scripts(server, sievelib):
    client, ok = sievelib()
    assert ok, client.errmsg
    assert "fileinto" in client.get_sieve_capabilities()
    assert client.putscript("filter", GOOD)
    assert client.putscript("other", "keep;\r\n")
    assert not client.putscript("broken", BAD)
    assert client.errmsg.startswith(b"line 2: ") and b"fileinto" in client.errmsg
    assert client.checkscript(GOOD)
    assert not client.checkscript(BAD) and client.errmsg.startswith(b"line 2: ")

    assert client.setactive("filter")
    assert os.readlink(maildir(server) / ".dovecot.sieve") == "sieve/filter.sieve"
    assert client.listscripts() == ("filter", ["other"])
    assert client.getscript("filter").replace("\n", "\r\n") + "\r\n" == GOOD

    assert client.renamescript("filter", "renamed")
    assert client.listscripts() == ("renamed", ["other"])
    assert os.readlink(maildir(server) / ".dovecot.sieve") == "sieve/renamed.sieve"
    assert not client.renamescript("renamed", "other")
    assert client.errcode == b"ALREADYEXISTS"

    assert not client.deletescript("renamed")
    assert client.errcode == b"ACTIVE"
    assert client.setactive("")
    assert not os.path.lexists(maildir(server) / ".dovecot.sieve")
    assert client.deletescript("renamed")
    assert not client.getscript("renamed")
    assert client.errcode == b"NONEXISTENT"
    assert client.listscripts() == (None, ["other"])


def test_sievelib_havespace_and_quota(make_server, monkeypatch, sievelib_clients):
    server = make_server(sieve={"max_script_size": 1000, "max_scripts": 2, "quota": 1500})
    client, ok = sievelib_for(server, monkeypatch, sievelib_clients)()
    assert ok, client.errmsg
    assert client.havespace("a", 1000)
    assert not client.havespace("a", 1001)
    assert client.errcode == b"QUOTA/MAXSIZE"
    assert client.putscript("a", "#" * 898)
    assert not client.havespace("b", 700)            # 900 + 700 > 1500
    assert client.errcode == b"QUOTA/MAXSIZE"
    assert client.putscript("b", "keep;")
    assert not client.havespace("c", 1)
    assert client.errcode == b"QUOTA/MAXSCRIPTS"
    assert not client.putscript("c", "keep;")
    assert client.errcode == b"QUOTA/MAXSCRIPTS"


def test_sievelib_without_starttls_cannot_log_in(server, sievelib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # sievelib 1.6 warns of credentials in the clear
        client, ok = sievelib(starttls=False)
    assert not ok
    assert not client.authenticated


def test_sievelib_hostile_names(server, sievelib):
    client, ok = sievelib()
    assert ok, client.errmsg
    for name in ("../escape", "../../../../tmp/x", ".dovecot", "a/b", "x\x01y"):
        assert not client.putscript(name, "keep;"), name
        assert not client.setactive(name), name
    assert not (maildir(server) / "sieve").exists() or \
        [p.name for p in (maildir(server) / "sieve").iterdir()] == ["tmp"]
    assert not os.path.lexists(maildir(server) / ".dovecot.sieve")


# -- the Maildir as IMAP sees it ----------------------------------------------------------------

def test_imap_list_does_not_show_the_sieve_files(server, raw):
    c = raw()
    c.starttls()
    c.login()
    script = GOOD.encode()
    assert c.cmd(b'PUTSCRIPT "filter" {%d+}\r\n' % len(script) + script) == [b"OK"]
    assert c.cmd(b'SETACTIVE "filter"') == [b"OK"]
    # A regular .dovecot.sieve (Dovecot before ManageSieve) must not show either.
    bob = maildir(server, "bob@example.test")
    (bob / ".dovecot.sieve").write_bytes(b"keep;\r\n")
    for user in (ALICE, "bob@example.test"):
        assert os.path.lexists(maildir(server, user) / ".dovecot.sieve")
        imap = imap_login(server, user)
        try:
            listed = imaplib_ok(imap.list('""', "*"), "LIST")
        finally:
            close_quietly(imap)
        names = sorted(line.decode().rsplit(" ", 1)[-1].strip('"') for line in listed)
        assert names == ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"], names


# -- mailserver-admin while the server runs ---------------------------------------------------------

def test_admin_changes_are_seen_by_a_running_server_at_once(server, raw, tmp_path):
    c = raw()
    c.starttls()
    c.login()
    source = tmp_path / "admin.sieve"
    source.write_bytes(GOOD.encode())
    server.admin_ok("sieve", "put", ALICE, "admin-filter", str(source))
    server.admin_ok("sieve", "activate", ALICE, "admin-filter")
    assert c.cmd(b"LISTSCRIPTS") == [b'"admin-filter" ACTIVE', b'OK "Listscripts completed"']
    assert c.cmd(b'DELETESCRIPT "admin-filter"')[-1].startswith(b"NO (ACTIVE)")
    cp = server.admin("sieve", "put", ALICE, "broken", input=BAD)
    assert cp.returncode == 1
    assert cp.stderr.startswith("mailserver-admin: error: script 'broken' refused: line 2: ")
    assert len(cp.stderr.strip().splitlines()) == 1
    server.admin_ok("sieve", "activate", ALICE)
    assert c.cmd(b"LISTSCRIPTS") == [b'"admin-filter"', b'OK "Listscripts completed"']
    assert c.cmd(b'PUTSCRIPT "from-client" "keep;"') == [b"OK"]
    listed = server.admin_ok("sieve", "list", ALICE).stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["admin-filter", "from-client"]
    assert server.admin_ok("sieve", "get", ALICE, "from-client").stdout == "keep;"
