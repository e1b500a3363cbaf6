"""The way to production, as an administrator walks it: the README's recipe on a fresh
machine (mailserver-admin setup, then the server as the systemd unit runs it, or twistd
started as root dropping to --uid), the unit file itself, readiness told to the service
manager, a log directory that does not exist yet, directories the server cannot use, ports
that are taken (foreground and daemon), several endpoints for one service, the first
delivery's log, and the JSON log for log shippers."""

from __future__ import annotations

import configparser
import imaplib
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
from twisted.logger import eventsFromJSONLogFile

from harness import (
    DOMAIN,
    HOSTNAME,
    PASSWORD,
    REPO_ROOT,
    SERVICES,
    ServerProcess,
    TWISTD_BOOT,
    _env,
    free_port,
    make_message,
    port_is_listening,
    requires_tool,
    send_mail,
    split_overrides,
    tls_client_context,
    toml_text,
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

UNIT = REPO_ROOT / "etc" / "mailserver.service"
# twistd ends by the signal that stopped it; systemd counts SIGTERM as a clean exit.
CLEAN_EXIT = (0, -signal.SIGTERM)
PRODUCTION_CONFIG = REPO_ROOT / "etc" / "mailserver.production.toml"


def read_unit(path: Path = UNIT) -> dict[str, dict[str, str]]:
    """A systemd unit file as {section: {key: value}}, keys as written."""
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), strict=True)
    parser.optionxform = str   # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return {name: dict(parser[name]) for name in parser.sections()}


def interop_or_skip(why: str) -> None:
    """A test the machine cannot run: skipped, or failed under MAILSERVER_REQUIRE_INTEROP=1
    (CI must run it)."""
    if os.environ.get("MAILSERVER_REQUIRE_INTEROP") == "1":
        pytest.fail(f"{why}; MAILSERVER_REQUIRE_INTEROP=1 requires this test to run "
                    f"(the service user must be able to run the interpreter: chmod o+x "
                    f"on the directories above it, as .ci/run does)", pytrace=False)
    pytest.skip(why)


def free_privileged_port() -> int:
    """A port below 1024 that is free on 127.0.0.1 now (the test runs as root)."""
    for port in random.sample(range(600, 1000), 400):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def notify_socket(directory: Path, mode: int) -> tuple[socket.socket, Path]:
    """A datagram socket standing for systemd's $NOTIFY_SOCKET, its directory `mode`."""
    directory.mkdir(mode=mode)
    directory.chmod(mode)
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    path.chmod(0o777)   # as systemd's /run/systemd/notify
    sock.settimeout(0.2)
    return sock, path


def wait_notification(srv: ServerProcess, sock: socket.socket, assignment: str,
                      timeout: float = 60) -> list[str]:
    """The datagram holding `assignment` (READY=1, STOPPING=1); fails if the server exits
    or sends nothing within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = sock.recv(65536).decode().split("\n")
        except socket.timeout:
            if assignment != "STOPPING=1" and not srv.running:
                pytest.fail(f"the server exited before {assignment}\n{srv.diagnostics()}",
                            pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"no {assignment} on NOTIFY_SOCKET within {timeout}s\n"
                            f"{srv.diagnostics()}", pytrace=False)
            continue
        if assignment in lines:
            return lines


def start_notified(srv: ServerProcess, sock: socket.socket) -> list[str]:
    """Start twistd as the service manager does and wait for READY=1; at that moment
    every configured port must answer already."""
    srv._spawn()
    lines = wait_notification(srv, sock, "READY=1")
    silent = [f"{s}:{p}" for s, p in srv.ports.items() if not port_is_listening(p)]
    assert not silent, f"READY=1 before these ports listened: {silent}"
    return lines


class RecipeServer(ServerProcess):
    """The production config in a fresh directory tree laid out as on a machine
    (etc/mailserver, var/lib/mailserver, var/mail/vhosts, var/log/mailserver), on free
    loopback ports, run either as the systemd unit runs it (`how="unit"`: the unit's
    ExecStart, as its User= with its AmbientCapabilities= and NoNewPrivileges=, through
    setpriv) or as README's recipe without systemd (`how="uid"`: twistd as root with
    --uid/--gid)."""

    def __init__(self, base: Path, how: str, user: pwd.struct_passwd) -> None:
        super().__init__(base / "etc" / "mailserver")
        self.how, self.user = how, user
        self.state_dir = base / "var" / "lib" / "mailserver"
        self.maildir_root = base / "var" / "mail" / "vhosts"
        self.log_path = base / "var" / "log" / "mailserver" / "mailserver.log"
        if how == "unit":   # the capability the unit grants: a port below 1024 for the MX
            self.ports["smtp"] = free_privileged_port()
        sections = tomllib.loads(PRODUCTION_CONFIG.read_text())
        sections["server"].update(hostname=HOSTNAME, state_dir=str(self.state_dir))
        sections["storage"]["maildir_root"] = str(self.maildir_root)
        sections["tls"] = {"certificate": "", "private_key": ""}   # self-signed
        sections["listen"] = {s: f"tcp:{p}:interface=127.0.0.1" for s, p in self.ports.items()}
        self.sections = sections
        self.config_path.write_text(toml_text(sections))

    def twistd_argv(self) -> list[str]:
        boot = [sys.executable, "-c", TWISTD_BOOT]
        if self.how == "uid":
            return [*boot, "-n", "--pidfile=", f"--logfile={self.log_path}",
                    f"--uid={self.user.pw_uid}", f"--gid={self.user.pw_gid}",
                    "mailserver", "--config", str(self.config_path)]
        service = read_unit()["Service"]
        places = {"/etc/mailserver/mailserver.toml": str(self.config_path),
                  "/var/log/mailserver/mailserver.log": str(self.log_path)}
        argv = []
        for arg in shlex.split(service["ExecStart"])[1:]:
            for unit_path, here in places.items():
                arg = arg.replace(unit_path, here)
            argv.append(arg)
        assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
        assert service["NoNewPrivileges"] == "true"
        return [requires_tool("setpriv"), f"--reuid={self.user.pw_uid}",
                f"--regid={self.user.pw_gid}", "--clear-groups",
                "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
                "--no-new-privs", *boot, *argv]


def imap_over_tls(srv: RecipeServer) -> imaplib.IMAP4_SSL:
    """IMAPS, the certificate checked against the one the server generated."""
    context = ssl.create_default_context(cafile=str(srv.state_dir / "tls" / "cert.pem"))
    context.check_hostname = False   # reached by address; the name is checked below
    imap = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=context)
    names = [value for kind, value in imap.sock.getpeercert().get("subjectAltName", ())]
    assert HOSTNAME in names
    return imap


@pytest.mark.skipif(not IS_ROOT, reason="the recipe runs as root: setup, then a server that "
                                        "is the service user")
@pytest.mark.parametrize("how", ["unit", "uid"])
def test_recipe_as_root_with_uid_nobody_on_a_fresh_machine(open_dir, monkeypatch, how):
    """README's "Production deployment", step by step, user nobody for the service user.
    The config is written first, as an administrator who brings one (setup keeps it and
    creates what it names; writing a new one is tests/unit/test_setup_cmd.py's)."""
    user = pwd.getpwnam("nobody")
    why = runnable_by(user.pw_uid, user.pw_gid)
    if why:
        interop_or_skip(why)
    srv = RecipeServer(open_dir, how, user)
    state, mail, log = srv.state_dir, srv.maildir_root, srv.log_path
    # The service manager's notification socket; for --uid, root's alone: the server
    # connects before it drops privileges.
    notify, notify_path = notify_socket(open_dir / "run", 0o755 if how == "unit" else 0o700)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    try:
        if how == "unit":
            # 2. mailserver-admin setup: user (exists), config (kept), directories.
            cp = srv.admin("setup", "--user", "nobody", "--log-dir", str(log.parent))
            assert cp.returncode == 0, cp.stderr
            assert f"config {srv.config_path}: exists, kept" in cp.stdout
            for path, mode in ((state, 0o700), (mail, 0o700), (log.parent, 0o750)):
                st = path.stat()
                assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == \
                    (user.pw_uid, user.pw_gid, mode), path
            assert "systemctl enable --now mailserver" in cp.stdout
            again = srv.admin("setup", "--user", "nobody", "--log-dir", str(log.parent))
            assert again.returncode == 0, again.stderr
            assert "nothing changed" in again.stdout
        # 3. The first domain and user, as root (before the first start for --uid: the
        # directories are root's 0700 until the server hands them over).
        srv.admin_ok("domain", "add", DOMAIN)
        srv.admin_ok("user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
        if how == "uid":
            assert state.stat().st_uid == 0 and (state.stat().st_mode & 0o777) == 0o700
        check = srv.admin("check")
        assert check.returncode == 0, check.stdout + check.stderr
        # 4. Start: systemctl start returns at READY=1.
        ready = start_notified(srv, notify)
        assert any(line.startswith("STATUS=serving ") for line in ready), ready
        uid_line = next(line for line in Path(f"/proc/{srv.pid}/status").read_text()
                        .splitlines() if line.startswith("Uid:")) if how == "unit" else ""
        # 5. Check: mail in over SMTP, out over IMAP with TLS.
        message = make_message("<prod-1@remote.test>", to=ALICE)
        assert send_mail(srv, message, [ALICE]) == {}   # 250, not 451
        imap = imap_over_tls(srv)
        try:
            assert imap.login(ALICE, PASSWORD)[0] == "OK"
            typ, data = imap.select("INBOX")
            assert (typ, data) == ("OK", [b"1"])
            typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert b"<prod-1@remote.test>" in data[0][1]
        finally:
            imap.logout()
        srv.proc.send_signal(signal.SIGTERM)   # systemctl stop
        assert "STOPPING=1" in wait_notification(srv, notify, "STOPPING=1")
        assert srv.proc.wait(60) in CLEAN_EXIT, srv.diagnostics()
        for path in (state, state / "accounts.sqlite3", state / "queue", mail,
                     mail / DOMAIN / "alice", log.parent, log):
            assert path.stat().st_uid == user.pw_uid, path
        assert log.parent.parent.stat().st_uid == 0   # made on the way, stays root's
        if how == "uid":
            assert f"set uid/gid {user.pw_uid}/{user.pw_gid}" in srv.log_text()
        else:   # it never was root: real, effective, saved and file system uid
            assert uid_line.split()[1:] == [str(user.pw_uid)] * 4, uid_line
    finally:
        srv.close()
        notify.close()


def test_the_unit_file():
    """etc/mailserver.service as the recipe installs it: Type=notify (READY=1 from the
    server), the service user with the one capability it needs, the config, log and
    directories that mailserver-admin setup and the production config name."""
    from mailserver.setup_cmd import DEFAULT_CONFIG, DEFAULT_LOG_DIR, DEFAULT_USER, UNIT_TWISTD

    unit = read_unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["User"] == service["Group"] == DEFAULT_USER
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[key] == "true", key
    assert service["ProtectSystem"] == "strict"
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == str(UNIT_TWISTD)
    assert "-n" in argv and "--pidfile=" in argv   # foreground, no pid file in a read-only /
    assert argv[argv.index("mailserver"):] == ["mailserver", "--config", str(DEFAULT_CONFIG)]
    logfile = next(a.split("=", 1)[1] for a in argv if a.startswith("--logfile="))
    production = tomllib.loads(PRODUCTION_CONFIG.read_text())
    writable = service["ReadWritePaths"].split()
    assert sorted(writable) == sorted([production["server"]["state_dir"],
                                       production["storage"]["maildir_root"],
                                       str(DEFAULT_LOG_DIR)])
    assert str(Path(logfile).parent) == str(DEFAULT_LOG_DIR)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path):
    """systemd's own reading of it; ExecStart's twistd is this installation's (the edit
    README asks for when it is not in /opt/mailserver)."""
    analyze = requires_tool("systemd-analyze")
    twistd = Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        pytest.skip(f"no twistd beside {sys.executable}")
    from mailserver.setup_cmd import UNIT_TWISTD

    unit = tmp_path / "mailserver.service"
    unit.write_text(UNIT.read_text().replace(str(UNIT_TWISTD), str(twistd)))
    cp = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
    complaints = [line for line in (cp.stdout + cp.stderr).splitlines()
                  if "mailserver.service" in line]
    assert cp.returncode == 0 and not complaints, cp.stdout + cp.stderr


def test_readiness_is_told_after_every_port_is_bound(make_server, tmp_path, monkeypatch):
    """Type=notify: READY=1 with a STATUS line once every listener answers, STOPPING=1
    on SIGTERM; the server's own user throughout."""
    notify, path = notify_socket(tmp_path / "run", 0o700)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    srv = make_server(start=False)
    try:
        ready = start_notified(srv, notify)
        status = next(line for line in ready if line.startswith("STATUS="))
        assert all(name in status for name in ("smtp", "imaps", "pop3s", "autoconfig"))
        assert HOSTNAME in status
        assert send_mail(srv, make_message("<ready-1@remote.test>", to=ALICE), [ALICE]) == {}
        srv.proc.send_signal(signal.SIGTERM)
        wait_notification(srv, notify, "STOPPING=1")
        assert srv.proc.wait(60) in CLEAN_EXIT, srv.diagnostics()
    finally:
        srv.close()
        notify.close()


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


def test_a_daemon_answers_logins_of_unknown_and_known_users(make_server, tmp_path):
    """twistd builds the server, then forks to become a daemon: threads started before the
    fork are gone after it.  The unknown users' dummy hash, asked for while the server is
    built, once waited forever for such a thread, and with it every login of an unknown
    user."""
    import poplib

    srv = make_server(start=False)
    pidfile = tmp_path / "daemon.pid"
    argv = srv.twistd_argv()
    argv.remove("-n")
    argv[argv.index("--pidfile=")] = f"--pidfile={pidfile}"
    cp = subprocess.run(argv, cwd=srv.root, env=_env(), capture_output=True, text=True,
                        stdin=subprocess.DEVNULL, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    try:
        assert wait_until(lambda: pidfile.exists() and port_is_listening(srv.ports["pop3s"]),
                          30), srv.log_path.read_text()[-3000:]

        def login(user: str, password: str) -> bytes:
            p = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls_client_context(),
                                timeout=10)
            try:
                p.user(user)
                return p.pass_(password)
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                p.close()

        assert login(f"nobody@{DOMAIN}", "x").startswith(b"-ERR [AUTH]")
        assert login(f"alice@{DOMAIN}", PASSWORD).startswith(b"+OK")
        assert login(f"alice@{DOMAIN}", "wrong").startswith(b"-ERR [AUTH]")
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            assert wait_until(lambda: not pidfile.exists(), 30)


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
