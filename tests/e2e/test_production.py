"""The way to production, as an administrator walks it: twistd started as root dropping to
--uid on a fresh machine, a log directory that does not exist yet, directories the server
cannot use, ports that are taken (foreground and daemon), several endpoints for one
service, the first delivery's log, and the JSON log for log shippers."""

from __future__ import annotations

import imaplib
import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.logger import eventsFromJSONLogFile

from harness import (
    DOMAIN,
    PASSWORD,
    SERVICES,
    ServerProcess,
    TWISTD_BOOT,
    _env,
    free_port,
    make_message,
    port_is_listening,
    send_mail,
    split_overrides,
    wait_until,
)

ALICE = "alice@example.test"
IS_ROOT = os.geteuid() == 0


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def mailserver_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("mailserver: ")]


@pytest.fixture
def open_dir():
    """A directory every user can reach: pytest's own tmp_path is root's alone."""
    base = Path(tempfile.mkdtemp(prefix="mailserver-prod-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


class DroppingServer(ServerProcess):
    """twistd as the production recipe runs it: as root, --uid/--gid, a log file in a
    directory of its own."""

    def __init__(self, root: Path, overrides: dict, uid: int, gid: int, log_path: Path) -> None:
        super().__init__(root, overrides)
        self.uid, self.gid = uid, gid
        self.log_path = log_path

    def twistd_argv(self) -> list[str]:
        return [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
                f"--logfile={self.log_path}", f"--uid={self.uid}", f"--gid={self.gid}",
                "mailserver", "--config", str(self.config_path)]


def runnable_by(uid: int, gid: int) -> str | None:
    """Why `uid` cannot run this interpreter with the checkout, or None if it can."""
    try:
        cp = subprocess.run([sys.executable, "-c", "import mailserver.service, argon2"],
                            user=uid, group=gid, extra_groups=[], env=_env(), cwd="/",
                            capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"user {uid} cannot run {sys.executable}: {e.strerror}"
    if cp.returncode == 0:
        return None
    last = (cp.stderr.strip().splitlines() or ["?"])[-1]
    return f"user {uid} cannot run {sys.executable} with the checkout: {last}"


# -- the production recipe --------------------------------------------------------------------

@pytest.mark.skipif(not IS_ROOT, reason="the recipe starts twistd as root and drops to --uid")
def test_recipe_as_root_with_uid_nobody_on_a_fresh_machine(open_dir):
    user = pwd.getpwnam("nobody")
    why = runnable_by(user.pw_uid, user.pw_gid)
    if why:
        pytest.skip(why)
    state, mail = open_dir / "lib" / "mailserver", open_dir / "mail" / "vhosts"
    log = open_dir / "log" / "mailserver" / "mailserver.log"   # its directory does not exist
    srv = DroppingServer(open_dir / "etc", split_overrides({
        "server": {"state_dir": str(state)}, "storage": {"maildir_root": str(mail)},
        "auth": {"allow_plaintext_loopback": True}}), user.pw_uid, user.pw_gid, log)
    try:
        # The administrator sets up domain and user as root before the first start:
        # mailserver-admin leaves root-owned 0700 directories.
        srv.create_accounts()
        assert state.stat().st_uid == 0 and (state.stat().st_mode & 0o777) == 0o700
        srv.start()
        message = make_message("<prod-1@remote.test>", to=ALICE)
        assert send_mail(srv, message, [ALICE]) == {}   # 250, not 451
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"])
        try:
            assert imap.login(ALICE, PASSWORD)[0] == "OK"
            typ, data = imap.select("INBOX")
            assert (typ, data) == ("OK", [b"1"])
            typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert b"<prod-1@remote.test>" in data[0][1]
        finally:
            imap.logout()
        for path in (state, state / "accounts.sqlite3", state / "queue", mail,
                     mail / DOMAIN / "alice", log.parent, log):
            assert path.stat().st_uid == user.pw_uid, path
        assert log.parent.parent.stat().st_uid == 0   # made on the way, stays root's
        assert f"set uid/gid {user.pw_uid}/{user.pw_gid}" in srv.log_text()
    finally:
        srv.close()


def test_a_missing_log_directory_is_created(make_server, tmp_path):
    srv = make_server(start=False)
    srv.log_path = tmp_path / "log" / "mailserver" / "mailserver.log"
    srv.start()
    assert srv.log_path.parent.is_dir()
    assert "started" in srv.wait_for_log(lambda text: "started" in text)


def test_a_state_dir_the_server_cannot_write_is_one_line_and_no_start(tmp_path, open_dir):
    """Never half-broken: the server refuses before it listens, naming path and fix."""
    state = open_dir / "var"
    state.mkdir(mode=0o700)
    overrides = split_overrides({"server": {"state_dir": str(state)}})
    if IS_ROOT:   # dropping to nobody; the directory is somebody else's, not the server's
        user = pwd.getpwnam("nobody")
        os.chown(state, 4242, 4242)
        srv: ServerProcess = DroppingServer(tmp_path / "server", overrides, user.pw_uid,
                                            user.pw_gid, tmp_path / "server" / "twistd.log")
        expected_fix = f"chown -R {user.pw_name}:"
    else:
        state.chmod(0o500)
        srv = ServerProcess(tmp_path / "server", overrides)
        expected_fix = "chown -R "
    try:
        code, output = srv.run_to_exit(timeout=60)
    finally:
        srv.close()
        state.chmod(0o700)
    assert code == 1, output
    assert "Traceback" not in output, output
    lines = mailserver_lines(output)
    assert len(lines) == 1, output
    assert "server.state_dir" in lines[0] and str(state) in lines[0], lines[0]
    assert expected_fix in lines[0], lines[0]
    assert not any(port_is_listening(p) for p in srv.ports.values())


# -- ports that are taken ----------------------------------------------------------------------

def taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", free_port()))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_a_port_in_use_is_one_line_naming_the_key(make_server, tmp_path, daemon):
    sock, port = taken_port()
    try:
        srv = make_server(start=False, accounts=False,
                          listen={"imaps": f"tcp:{port}:interface=127.0.0.1"})
        argv = srv.twistd_argv()
        if daemon:
            argv.remove("-n")
            argv[argv.index("--pidfile=")] = f"--pidfile={tmp_path / 'twistd.pid'}"
        cp = subprocess.run(argv, cwd=srv.root, env=_env(), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    finally:
        sock.close()
    output = cp.stdout + cp.stderr
    assert cp.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("mailserver: listen.imaps = ") and str(port) in lines[0], lines[0]
    assert not (tmp_path / "twistd.pid").exists()
    assert not any(port_is_listening(p) for s, p in srv.ports.items() if s != "imaps")


def test_an_endpoint_that_cannot_listen_at_start_is_one_line_naming_the_key(make_server,
                                                                           tmp_path):
    """Past the TCP check: a UNIX socket in a directory that does not exist."""
    path = tmp_path / "missing" / "autoconfig.sock"
    listen = {s: "" for s in SERVICES}   # nothing else: run_to_exit watches the ports
    listen["autoconfig_http"] = f"unix:{path}"
    srv = make_server(start=False, accounts=False, listen=listen)
    code, _ = srv.run_to_exit(timeout=60)
    terminal = srv.output_text()
    assert code == 1, srv.diagnostics()
    assert "Traceback" not in terminal + srv.log_text(), srv.diagnostics()
    lines = mailserver_lines(terminal)
    assert len(lines) == 1, terminal
    assert lines[0].startswith(f"mailserver: listen.autoconfig_http = 'unix:{path}': "), lines[0]
    assert "[mailserver.service#critical] mailserver: listen.autoconfig_http" in srv.log_text()


# -- several endpoints per service -------------------------------------------------------------

def test_one_service_on_two_endpoints(make_server):
    port = free_port()
    if has_ipv6_loopback():
        second, host2 = f"tcp6:{port}:interface=\\:\\:1", "::1"
        port2 = port
    else:
        port2 = free_port()
        second, host2 = f"tcp:{port2}:interface=127.0.0.1", "127.0.0.1"
    first = f"tcp:{port}:interface=127.0.0.1"
    srv = make_server(start=False, listen={"smtp": [first, second]})
    srv.ports["smtp"] = port
    srv.start()
    for n, (host, p) in enumerate((("127.0.0.1", port), (host2, port2))):
        with smtplib.SMTP(host, p, local_hostname="client.remote.test", timeout=30) as client:
            msg = make_message(f"<two-{n}@remote.test>", to=ALICE)
            assert client.sendmail("x@remote.test", [ALICE], msg) == {}
    assert wait_until(lambda: len(srv.messages(ALICE)) == 2, 10)
    cp = srv.admin("check")
    assert cp.returncode == 0, cp.stderr
    smtp = [line for line in cp.stdout.splitlines() if line.startswith("smtp ")]
    assert [line.split()[1] for line in smtp] == [first, second]


# -- the first delivery -------------------------------------------------------------------------

def test_first_delivery_logs_no_runtime_warning(server):
    """The commit process starts with the first delivery; it used to warn that its module
    was imported twice (`python -m` of a module its own package imports)."""
    assert send_mail(server, make_message("<first@remote.test>", to=ALICE), [ALICE]) == {}
    assert server.messages(ALICE)
    server.stop()
    log = server.log_text()
    assert "RuntimeWarning" not in log, log[-3000:]
    assert "commit process:" not in log, log[-3000:]   # nothing on the child's stderr


# -- JSON log -------------------------------------------------------------------------------------

class JSONLoggingServer(ServerProcess):
    """twistd --logger mailserver.logjson.observer, the JSON going to MAILSERVER_LOG_JSON."""

    def __init__(self, root: Path, overrides: dict | None = None) -> None:
        super().__init__(root, overrides)
        self.json_path = self.root / "log" / "mailserver.json"

    def twistd_argv(self) -> list[str]:
        return [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
                "--logger=mailserver.logjson.observer",
                "mailserver", "--config", str(self.config_path)]

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.json_path.parent.glob("mailserver.json*"),
                                       reverse=True))


def test_json_log_one_object_per_line_and_rotation_on_sigusr1(tmp_path, accounts_template,
                                                              monkeypatch):
    srv = JSONLoggingServer(tmp_path / "server")
    monkeypatch.setenv("MAILSERVER_LOG_JSON", str(srv.json_path))
    if accounts_template is None:
        srv.create_accounts()
    else:
        srv.copy_state_from(accounts_template)
    try:
        srv.start()
        assert send_mail(srv, make_message("<json-1@remote.test>", to=ALICE), [ALICE]) == {}
        srv.wait_for_log(lambda text: "json-1" in text or "alice@example.test" in text)
        lines = srv.json_path.read_text().splitlines()
        records = [json.loads(line) for line in lines]   # every line is one JSON object
        assert all({"time", "level", "namespace", "text"} <= r.keys() for r in records)
        started = [r for r in records if r["namespace"] == "mailserver.service"
                   and " started " in r["text"]]
        assert started and started[0]["level"] == "info"
        with srv.json_path.open() as f:
            assert len(list(eventsFromJSONLogFile(f))) == len(records)
        # SIGUSR1: the file rotates to .1 and logging goes on in a new one.
        os.kill(srv.pid, signal.SIGUSR1)
        rotated = srv.json_path.with_name("mailserver.json.1")
        assert wait_until(rotated.exists, 10)
        assert send_mail(srv, make_message("<json-2@remote.test>", to=ALICE), [ALICE]) == {}
        assert wait_until(lambda: srv.json_path.exists() and srv.json_path.stat().st_size > 0, 10)
        for line in srv.json_path.read_text().splitlines():
            json.loads(line)
    finally:
        srv.close()


@pytest.mark.parametrize("environ, daemon, variable", [
    ({"MAILSERVER_LOG_JSON_KEEP": "many"}, False, "MAILSERVER_LOG_JSON_KEEP"),
    ({"MAILSERVER_LOG_JSON_ROTATE": "big"}, False, "MAILSERVER_LOG_JSON_ROTATE"),
    ({}, True, "MAILSERVER_LOG_JSON"),   # a daemon's standard output goes nowhere
])
def test_json_log_settings_that_cannot_work_are_one_line(tmp_path, monkeypatch, environ,
                                                         daemon, variable):
    srv = JSONLoggingServer(tmp_path / "server")
    monkeypatch.delenv("MAILSERVER_LOG_JSON", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    argv = srv.twistd_argv()
    if daemon:
        argv.remove("-n")
        argv[argv.index("--pidfile=")] = f"--pidfile={tmp_path / 'twistd.pid'}"
    cp = subprocess.run(argv, cwd=srv.root, env=_env(), capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=60)
    output = cp.stdout + cp.stderr
    assert cp.returncode == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mailserver: {variable}: "), output
    assert not any(port_is_listening(p) for p in srv.ports.values())
