"""What a new administrator ran into on the way to production (issue 15), each pinned down:
password prompts without a terminal, aliases to nobody, domains without DKIM keys from
`user import`, ports that are taken, autoconfig telling clients ports nobody listens on,
several endpoints per service, the directories a server dropping to --uid needs, and the
JSON log observer.  `mailserver-admin` runs through main(argv) or as `python -m`."""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from twisted.logger import LogLevel, Logger, eventsFromJSONLogFile, globalLogPublisher

from mailserver import admin, logjson
from mailserver.accounts import Accounts
from mailserver.autoconfig.dns import client_records
from mailserver.autoconfig.settings import ClientSettings
from mailserver.config import ConfigError, load_config, parse_config
from mailserver.dkim.keys import keys_for
from mailserver.listening import probe, split_description, tcp_address
from mailserver.startup import RunAs, StartupError, prepare_directories, prepare_log_file

REPO_ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0


def free_port(host: str = "127.0.0.1", family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "etc" / "mailserver.toml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent("""\
        [server]
        hostname = "mail.example.test"
        state_dir = "../var"
        [storage]
        maildir_root = "../maildirs"
    """))
    return path


def write_listen(config: Path, listen: dict[str, object]) -> None:
    """Replace the [listen] section: every service off except those given."""
    services = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s",
                "autoconfig", "autoconfig_http", "managesieve")
    lines = ["[listen]"]
    for name in services:
        value = listen.get(name, "")
        lines.append(f"{name} = {json.dumps(value)}")
    text = config.read_text().split("[listen]")[0]
    config.write_text(text + "\n".join(lines) + "\n")


@pytest.fixture
def run(config, run):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr): conftest's runner with this
    module's config."""
    return functools.partial(run, config)


def assert_one_error_line(code: int, err: str, *texts: str) -> str:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mailserver-admin: error: "), err
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def admin_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
    return env


# -- user add without a terminal -----------------------------------------------------------

def test_user_add_without_a_terminal_is_one_error_line(run, config):
    run("domain", "add", "example.org")
    # No controlling terminal (a new session) and stdin closed: getpass has nobody to ask.
    cp = subprocess.run([sys.executable, "-m", "mailserver.admin", "--config", str(config),
                         "user", "add", "alice@example.org"],
                        stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        env=admin_env(), start_new_session=True, timeout=60)
    assert "Traceback" not in cp.stderr
    assert_one_error_line(cp.returncode, cp.stderr, "--password-stdin")
    with Accounts(config.parent.parent / "var" / "accounts.sqlite3") as accounts:
        assert accounts.get_user("alice@example.org") is None


def test_ctrl_d_at_the_password_prompt_is_one_error_line(run, config):
    run("domain", "add", "example.org")
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mailserver.admin", "--config",
                                 str(config), "user", "add", "alice@example.org"],
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=admin_env(), start_new_session=True)
        os.close(slave)
        # The prompt comes after the echo is switched off; Ctrl-D then is end of input.
        seen = b""
        deadline = time.monotonic() + 30
        while b"Password: " not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if ready:
                seen += os.read(proc.stderr.fileno(), 1024)
        assert b"Password: " in seen, seen
        os.write(master, b"\x04")
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(master)
    err_text = (seen + err).decode()
    assert "Traceback" not in err_text
    errors = [line for line in err_text.splitlines() if line.startswith("mailserver-admin:")]
    assert errors == ["mailserver-admin: error: no password given (end of input)"], err_text
    assert proc.returncode == 1


# -- aliases and imported domains ------------------------------------------------------------

def test_alias_to_a_local_address_that_does_not_exist_is_refused(run, config):
    run("domain", "add", "example.org")
    run("user", "add", "alice@example.org", "--password-stdin", stdin="pw\n")
    code, out, err = run("alias", "add", "sales@example.org", "alice@example.org,ghost@example.org")
    assert_one_error_line(code, err, "ghost@example.org")
    assert run("alias", "list")[1] == ""   # nothing stored, not even the good target
    code, _, err = run("alias", "add", "self@example.org", "self@example.org")
    assert_one_error_line(code, err, "self@example.org")
    # What does reach somebody is accepted: a user, a subaddress, a remote address, an
    # alias that reaches a user, and (once it exists) anything under the catch-all.
    assert run("alias", "add", "sales@example.org", "alice+sales@example.org,x@remote.test")[0] == 0
    assert run("alias", "add", "team@example.org", "sales@example.org")[0] == 0
    assert run("alias", "add", "@example.org", "alice@example.org")[0] == 0
    assert run("alias", "add", "info@example.org", "whoever@example.org")[0] == 0
    with Accounts(config.parent.parent / "var" / "accounts.sqlite3") as accounts:
        assert [u.address for u in accounts.resolve("team@example.org").local] == \
            ["alice@example.org"]


def test_user_import_gives_a_new_domain_its_dkim_key_as_domain_add_does(run, config, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("bob@example.net:{PLAIN}bobpw\n")
    code, out, err = run("user", "import", str(passwd))
    assert code == 0, err
    assert "domain example.net added" in out
    assert "DKIM key generated: selector" in out
    dkim_dir = config.parent.parent / "var" / "dkim"
    assert len(keys_for(dkim_dir, "example.net")) == 1


# -- ports -------------------------------------------------------------------------------------

def test_check_reports_a_port_that_is_taken_and_names_the_key(run, config):
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        write_listen(config, {"smtp": f"tcp:{port}:interface=127.0.0.1",
                              "imap": f"tcp:{free_port()}:interface=127.0.0.1"})
        code, out, err = run("check")
        line = assert_one_error_line(code, err, "listen.smtp", str(port), "already in use")
        assert "configuration OK" not in out
        assert "[PORT IN USE]" in next(l for l in out.splitlines() if l.startswith("smtp "))
        assert "listen.imap" not in line
    finally:
        taken.close()


def test_check_while_the_server_runs_says_so_instead_of_failing(run, config):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    write_listen(config, {"smtp": f"tcp:{sock.getsockname()[1]}:interface=127.0.0.1"})
    lock = config.parent.parent / "var" / "queue" / "lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # what a running server holds
        code, out, err = run("check")
        assert code == 0, err
        assert "[listening: the server is running]" in out
        assert out.strip().endswith("configuration OK")
    finally:
        os.close(fd)
        sock.close()


def test_check_lists_every_endpoint_of_a_list(run, config):
    p1, p2 = free_port(), free_port()
    write_listen(config, {"smtp": [f"tcp:{p1}:interface=127.0.0.1",
                                   f"tcp:{p2}:interface=127.0.0.1"]})
    code, out, err = run("check")
    assert code == 0, err
    smtp = [line for line in out.splitlines() if line.startswith("smtp ")]
    assert smtp == [f"smtp  tcp:{p1}:interface=127.0.0.1  (MX, STARTTLS)",
                    f"smtp  tcp:{p2}:interface=127.0.0.1  (MX, STARTTLS)"]


def test_probe_names_the_key_of_a_list_element():
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        free = free_port()
        problems = probe([("listen.smtp[0]", f"tcp:{free}:interface=127.0.0.1"),
                          ("listen.smtp[1]", f"tcp:{port}:interface=127.0.0.1")])
    finally:
        taken.close()
    assert [(p.key, p.code) for p in problems] == [("listen.smtp[1]", errno.EADDRINUSE)]
    assert problems[0].message.startswith(f"listen.smtp[1] = 'tcp:{port}:interface=127.0.0.1': ")
    assert "\n" not in problems[0].message
    assert probe([("listen.smtp", f"tcp:{port}:interface=127.0.0.1")]) == []  # given back


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 on this machine")
def test_probe_explains_an_ipv4_and_ipv6_wildcard_pair_on_a_dual_stack_system():
    try:
        dual = Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "0"
    except OSError:
        dual = False
    if not dual:
        pytest.skip("IPv6 sockets here do not accept IPv4 (bindv6only = 1)")
    port = free_port("", socket.AF_INET)
    problems = probe([("listen.smtp[0]", f"tcp:{port}"), ("listen.smtp[1]", f"tcp6:{port}")])
    assert len(problems) == 1 and problems[0].key == "listen.smtp[1]"
    assert f"'tcp6:{port}' alone" in problems[0].message


def test_endpoint_descriptions_are_split_as_twisted_does():
    assert split_description(r"tcp6:25:interface=\:\:1") == ["tcp6", "25", "interface=::1"]
    a = tcp_address(r"tcp6:port=587:interface=\:\:")
    assert (a.family, a.interface, a.port, a.wildcard) == (socket.AF_INET6, "::", 587, True)
    a = tcp_address("tcp:25:interface=192.0.2.1")
    assert (a.family, a.interface, a.port, a.wildcard) == (socket.AF_INET, "192.0.2.1", 25, False)
    assert tcp_address("unix:/run/mail.sock") is None
    assert tcp_address("tcp:notaport") is None


# -- several endpoints per service -------------------------------------------------------------

def make(listen: dict[str, object], **sections: object):
    return parse_config({"server": {"hostname": "mail.example.test"}, "listen": listen,
                         **sections}, Path("/nonexistent/mailserver.toml"))


def test_listen_accepts_a_list_and_a_string():
    config = make({"smtp": ["tcp:25", r"tcp6:25:interface=\:\:1"], "imap": "tcp:143",
                   "pop3": [], "pop3s": ""})
    assert config.listen.endpoints("smtp") == ("tcp:25", r"tcp6:25:interface=\:\:1")
    assert config.listen.endpoints("imap") == ("tcp:143",)
    assert "pop3" not in config.listen.enabled() and "pop3s" not in config.listen.enabled()
    keyed = dict(config.listen.keyed())
    assert keyed["listen.smtp[0]"] == "tcp:25" and keyed["listen.imap"] == "tcp:143"


@pytest.mark.parametrize("listen, key", [
    ({"smtp": ["tcp:2525", "tcpp:25"]}, "listen.smtp[1]"),
    ({"smtp": ["tcp:2525", ""]}, "listen.smtp[1]"),
    ({"smtp": ["tcp:2525", 25]}, "listen.smtp[1]"),
    ({"smtp": ["tcp:2525", "tcp:2525"]}, "listen.smtp[1]"),
    ({"smtp": ["tcp:2525:interface=127.0.0.1", "tcp:2525"]}, "listen.smtp[1]"),
    ({"smtp": ["tcp:2526", "tcp:2525"], "imap": "tcp:2525"}, "listen.imap"),
    ({"smtp": "tcp:2525", "imap": ["tcp:2143", "tcp:2525"]}, "listen.imap[1]"),
])
def test_a_bad_element_of_a_list_is_named(listen, key):
    with pytest.raises(ConfigError) as e:
        make(listen)
    assert e.value.key == key


def test_ipv4_and_ipv6_on_the_same_port_are_a_valid_config():
    config = make({"smtp": ["tcp:2525:interface=127.0.0.1", r"tcp6:2525:interface=\:\:1"]})
    assert len(config.listen.endpoints("smtp")) == 2


# -- autoconfig tells clients the ports it listens on ------------------------------------------

def test_shipped_config_announces_the_ports_it_listens_on():
    config = load_config(REPO_ROOT / "etc" / "mailserver.toml")
    settings = ClientSettings.from_config(config)
    announced = {e.service: e.port for e in settings.endpoints}
    listening = {name: tcp_address(d[0]).port for name, d in config.listen.enabled().items()}
    for service, port in announced.items():
        assert port == listening[service], service
    assert settings.https_port == listening["autoconfig"]
    assert "_imaps._tcp.example.org.\tSRV\t0 1 2993 mail.example.test." in \
        client_records(config, "example.org")


def test_embedded_defaults_announce_the_default_listeners():
    config = parse_config({"server": {"hostname": "mail.example.test"}},
                          Path("/nonexistent/mailserver.toml"))
    ports = {e.service: e.port for e in ClientSettings.from_config(config).endpoints}
    assert ports == {"imaps": 2993, "imap": 2143, "pop3s": 2995, "pop3": 2110,
                     "submissions": 2465, "submission": 2587}


def test_a_public_port_set_in_autoconfig_still_wins():
    config = make({"imaps": "tcp:2993", "submission": "unix:/run/submission.sock"},
                  autoconfig={"imaps_port": 993})
    ports = {e.service: e.port for e in ClientSettings.from_config(config).endpoints}
    assert ports["imaps"] == 993          # behind a port mapping: the key says so
    assert ports["submission"] == 587     # no TCP port of its own: the standard one
    assert ports["imap"] == 2143          # the embedded default listener


# -- directories for the user the server runs as -----------------------------------------------

def server_config(tmp_path: Path, state: Path, maildirs: Path):
    return parse_config({"server": {"hostname": "mail.example.test", "state_dir": str(state)},
                         "storage": {"maildir_root": str(maildirs)}},
                        tmp_path / "mailserver.toml")


def test_missing_directories_are_created(tmp_path):
    config = server_config(tmp_path, tmp_path / "a" / "var", tmp_path / "b" / "maildirs")
    prepare_directories(config, RunAs.current())
    assert config.state_dir.is_dir() and config.maildir_root.is_dir()
    assert (config.state_dir.stat().st_mode & 0o777) == 0o700


@pytest.mark.skipif(IS_ROOT, reason="root may write anywhere; the root case is tested below")
def test_an_unwritable_state_dir_is_one_line_naming_path_and_fix(tmp_path):
    state = tmp_path / "var"
    state.mkdir(mode=0o500)
    config = server_config(tmp_path, state, tmp_path / "maildirs")
    try:
        with pytest.raises(StartupError) as e:
            prepare_directories(config, RunAs.current())
    finally:
        state.chmod(0o700)
    message = str(e.value)
    assert "\n" not in message
    assert str(state) in message and "chown -R" in message and "server.state_dir" in message


def nobody() -> RunAs:
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    return RunAs(user.pw_uid, user.pw_gid)


@pytest.fixture
def open_dir():
    """A directory that every user can reach (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="mailserver-test-"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="handing directories to another user needs root")
def test_root_made_private_directories_go_to_the_user_after_the_drop(tmp_path, open_dir):
    run_as = nobody()
    state, maildirs = open_dir / "lib", open_dir / "mail"
    # What `mailserver-admin` run as root before the first start leaves: root's, 0700.
    (state / "dkim").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    (state / "accounts.sqlite3").write_bytes(b"")
    (maildirs / "example.org" / "alice" / "new").mkdir(parents=True, mode=0o700)
    maildirs.chmod(0o700)
    config = server_config(tmp_path, state, maildirs)
    prepare_directories(config, run_as)
    for path in (state, state / "dkim", state / "accounts.sqlite3", maildirs,
                 maildirs / "example.org", maildirs / "example.org" / "alice" / "new"):
        assert path.stat().st_uid == run_as.uid, path
    # Missing ones are made for the user directly; their parents stay root's.
    config = server_config(tmp_path, open_dir / "x" / "var", open_dir / "y" / "maildirs")
    prepare_directories(config, run_as)
    assert config.state_dir.stat().st_uid == run_as.uid
    assert (open_dir / "x").stat().st_uid == 0


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_a_directory_that_is_not_clearly_the_servers_is_not_taken(tmp_path, open_dir):
    run_as = nobody()
    state = open_dir / "shared"
    state.mkdir(mode=0o755)            # made by hand, shared: not handed over
    (state / "other").write_text("x")
    foreign = open_dir / "maildirs"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 4242, 4242)      # somebody else's
    config = server_config(tmp_path, state, foreign)
    with pytest.raises(StartupError) as e:
        prepare_directories(config, run_as)
    message = str(e.value)
    assert "\n" not in message and str(state) in message
    assert f"chown -R {run_as.owner} {state}" in message
    assert state.stat().st_uid == 0 and (state / "other").stat().st_uid == 0
    state.chmod(0o700)
    (state / "other").unlink()
    with pytest.raises(StartupError) as e:   # the state dir is now the server's; maildirs not
        prepare_directories(config, run_as)
    assert str(foreign) in str(e.value) and "storage.maildir_root" in str(e.value)
    assert foreign.stat().st_uid == 4242


def test_a_missing_log_directory_is_created(tmp_path):
    log = tmp_path / "log" / "mailserver" / "mailserver.log"
    prepare_log_file(str(log), RunAs.current())
    assert log.parent.is_dir()


# -- JSON log ------------------------------------------------------------------------------------

def test_json_observer_writes_one_object_per_line_that_twisted_reads_back(tmp_path):
    out = io.StringIO()
    observer = logjson.JSONLineObserver(out)
    globalLogPublisher.addObserver(observer)
    try:
        log = Logger(namespace="mailserver.test")
        log.info("accepted {queue_id} from {sender}", queue_id="Q1", sender="a@example.org")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("delivery failed")
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = out.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["text"] == "accepted Q1 from a@example.org"
    assert (records[0]["level"], records[0]["namespace"], records[0]["queue_id"]) == \
        ("info", "mailserver.test", "Q1")
    assert records[0]["time"].endswith("+00:00")
    assert records[1]["level"] == "critical" and "ZeroDivisionError" in records[1]["traceback"]
    events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
    assert events[0]["log_level"] == LogLevel.info and events[0]["sender"] == "a@example.org"


def test_json_log_settings_come_from_the_environment():
    assert logjson.settings({}) == logjson.Settings("", 10 * 1024 * 1024, 10)
    assert logjson.settings({"MAILSERVER_LOG_JSON": "/var/log/m.json",
                             "MAILSERVER_LOG_JSON_ROTATE": "0",
                             "MAILSERVER_LOG_JSON_KEEP": "3"}) == \
        logjson.Settings("/var/log/m.json", 0, 3)
    with pytest.raises(ValueError, match="MAILSERVER_LOG_JSON_ROTATE"):
        logjson.settings({"MAILSERVER_LOG_JSON_ROTATE": "lots"})
    with pytest.raises(ValueError, match="MAILSERVER_LOG_JSON_KEEP"):
        logjson.settings({"MAILSERVER_LOG_JSON_KEEP": "-1"})
