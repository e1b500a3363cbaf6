"""End-to-end test harness: a real `twistd mailserver` process on real sockets.

Every `ServerProcess` lives in its own directory with its own config, state, maildirs,
log and free ports, so end-to-end tests never share anything.  Nothing of the server is
imported or mocked here: the server is driven only through `twistd`, `mailserver-admin`
(`python -m mailserver.admin`) and its network ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
USERS = ("alice@example.test", "bob@example.test", "carol@example.test")
PASSWORD = "secret"
SERVICES = ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s",
            "autoconfig", "autoconfig_http", "managesieve")
SECTIONS = ("server", "storage", "tls", "listen", "limits", "auth", "relay", "queue",
            "autoconfig", "inbound", "sieve", "filters", "accounts")
# [limits].max_message_size when the config does not set it (the schema's default).
DEFAULT_MAX_MESSAGE_SIZE = 52428800

# `python -m twisted` is Twisted's newer `twist` runner, which has neither -n nor
# --pidfile; this runs the real `twistd` entry point with the interpreter under test.
TWISTD_BOOT = ("import sys; sys.argv[0] = 'twistd'; "
               "from twisted.scripts.twistd import run; sys.exit(run())")


# -- ports ---------------------------------------------------------------------------------

_ports_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def _worker_slice(low: int, high: int) -> tuple[int, int]:
    """This worker's part of [low, high]: pytest-xdist names workers gw0, gw1, ... and
    tells how many there are."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count < 2:
        return low, high
    span = (high - low + 1) // count
    start = low + int(worker[2:]) % count * span
    return start, start + span - 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and not yet handed out in this run.

    Ports are picked below the kernel's ephemeral range so the client side of other
    connections cannot grab them between this call and the server's bind.  When the suite
    runs in several worker processes (pytest-xdist), each worker picks from its own slice
    of that range, so two workers never hand out the same port.
    """
    low, high = 20000, 32000
    try:
        eph_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        if eph_low > 1100:
            high = min(high, eph_low - 1)
            low = min(low, high - 1000)
    except (OSError, ValueError, IndexError):
        pass
    low, high = _worker_slice(low, high)
    with _ports_lock:
        for _ in range(1000):
            port = random.randint(low, high)
            if port in _ports_handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _ports_handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # fall back to the kernel
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# -- config --------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        for key, value in values.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def split_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`make_server` keywords -> {section: {key: value}}.

    A keyword naming a section takes a dict (`limits={"max_recipients": 3}`,
    `listen={"smtp": "tcpp:25"}`); any other keyword is a [limits] key
    (`max_recipients=3`).  A value of None removes the key from the config.
    """
    result: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            result.setdefault(key, {}).update(value)
        else:
            result.setdefault("limits", {})[key] = value
    return result


# -- the server process --------------------------------------------------------------------

def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of twistd and mailserver-admin: ours, then `extra` (a PYTHONPATH
    there comes after the checkout's)."""
    env = {**os.environ, **(extra or {})}
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    env.pop("PYTHONSTARTUP", None)
    # Every test starts servers: compiled once, not at every start (a third of a second).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # A server that hangs is aborted with SIGABRT: every thread's stack goes to stderr.
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """One mail server: config file, state, maildirs, log and a twistd process."""

    def __init__(self, root: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "mailserver.toml"
        self.state_dir = self.root / "var"
        self.maildir_root = self.root / "maildirs"
        self.log_path = self.root / "twistd.log"
        self.output_path = self.root / "twistd.out"  # twistd's own stdout/stderr
        self.ports = {service: free_port() for service in SERVICES}
        self.sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": HOSTNAME, "state_dir": str(self.state_dir)},
            "storage": {"maildir_root": str(self.maildir_root)},
            "listen": {s: f"tcp:{p}:interface=127.0.0.1" for s, p in self.ports.items()},
        }
        for section, values in (overrides or {}).items():
            target = self.sections.setdefault(section, {})
            for key, value in values.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        self.config_path.write_text(toml_text(self.sections))
        self.proc: subprocess.Popen | None = None
        self._out = None
        self.starts = 0
        # Variables added to the environment of twistd and mailserver-admin (e.g. a
        # PYTHONPATH with a directory of Twisted plugins).
        self.env: dict[str, str] = {}

    # -- configuration as written

    def limit(self, key: str, default: Any = None) -> Any:
        return self.sections.get("limits", {}).get(key, default)

    @property
    def max_message_size(self) -> int:
        return self.limit("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)

    @property
    def smtp_port(self) -> int:
        return self.ports["smtp"]

    # -- administration

    def admin(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `mailserver-admin --config CFG ARGS...` from the checkout."""
        argv = [sys.executable, "-m", "mailserver.admin", "--config", str(self.config_path), *args]
        return subprocess.run(argv, input=input, capture_output=True, text=True, env=_env(self.env),
                              cwd=self.root, timeout=timeout)

    def admin_ok(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """`admin` that fails the test (with the tool's output) unless it exits 0."""
        cp = self.admin(*args, input=input)
        if cp.returncode != 0:
            pytest.fail(f"mailserver-admin {' '.join(args)} exited {cp.returncode}\n"
                        f"stdout: {cp.stdout}\nstderr: {cp.stderr}", pytrace=False)
        return cp

    def create_accounts(self) -> None:
        """Domain example.test and users alice, bob, carol (password "secret")."""
        self.admin_ok("domain", "add", DOMAIN)
        for address in USERS:
            self.admin_ok("user", "add", address, "--password-stdin", input=PASSWORD + "\n")

    def copy_state_from(self, other: "ServerProcess") -> None:
        """Start from a copy of another (stopped) server's state dir and maildirs."""
        for src, dst in ((other.state_dir, self.state_dir), (other.maildir_root, self.maildir_root)):
            if src.exists():
                shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)

    # -- process control

    def twistd_argv(self) -> list[str]:
        return [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
                f"--logfile={self.log_path}", "mailserver", "--config", str(self.config_path)]

    def _spawn(self) -> subprocess.Popen:
        assert not self.running, "server already running"
        if self._out:
            self._out.close()
        self._out = open(self.output_path, "ab")
        self.starts += 1
        self._out.write(f"--- start #{self.starts} ---\n".encode())
        self._out.flush()
        self.proc = subprocess.Popen(self.twistd_argv(), cwd=self.root, env=_env(self.env),
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT)
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server never started"
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        """Start twistd and wait for the SMTP port's 220 banner.

        If a port was taken in the meantime by someone else (twistd exits with "Address
        already in use"), the harness's ports are picked again and the start retried.
        """
        for attempt in range(3):
            log_mark = len(self.log_text()) + len(self.output_text())
            if self._start_once(timeout, last_attempt=attempt == 2):
                return self
            text = (self.log_text() + self.output_text())[log_mark:]
            if "Address already in use" not in text:
                break
            self.repick_ports()
        pytest.fail(f"twistd exited with code {self.proc.returncode if self.proc else None} "
                    f"before the SMTP port answered\n{self.diagnostics()}", pytrace=False)

    def repick_ports(self) -> None:
        """New free ports for every service still on a harness-assigned port."""
        listen = self.sections["listen"]
        for service, port in list(self.ports.items()):
            if listen.get(service) == f"tcp:{port}:interface=127.0.0.1":
                self.ports[service] = free_port()
                listen[service] = f"tcp:{self.ports[service]}:interface=127.0.0.1"
        self.config_path.write_text(toml_text(self.sections))

    def _start_once(self, timeout: float, last_attempt: bool) -> bool:
        """True once the banner is seen; False if twistd exited early."""
        proc = self._spawn()
        deadline = time.monotonic() + timeout
        last = "no connection"
        while True:
            if proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as s:
                    s.settimeout(max(0.5, deadline - time.monotonic()))
                    data = b""
                    while b"\n" not in data:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    last = repr(data)
                    if data.startswith(b"220"):
                        try:
                            s.sendall(b"QUIT\r\n")
                        except OSError:
                            pass
                        return True
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                self.kill9()
                pytest.fail(f"SMTP port {self.smtp_port} gave no 220 banner within {timeout}s "
                            f"(last: {last})\n{self.diagnostics()}", pytrace=False)
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; fails the test if the server ignores SIGTERM."""
        if not self.running:
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            pytest.fail(f"server did not exit within {timeout}s of SIGTERM\n{self.diagnostics()}",
                        pytrace=False)

    def abort(self) -> None:
        """SIGABRT (the stacks of every thread go to stderr), then SIGKILL."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill9()

    def kill9(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        """Teardown: the process never outlives its test."""
        try:
            if self.running:
                self.stop()
        finally:
            self.kill9()
            if self._out:
                self._out.close()
                self._out = None

    def run_to_exit(self, timeout: float = 30.0) -> tuple[int, str]:
        """Run twistd expecting it to refuse to start; returns (exit code, all output).

        Fails at once if the server came up (it logged its start and a configured port
        answers: an answer alone may come from another program on the machine) or if the
        process is still running after `timeout`.
        """
        proc = self._spawn()
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            started = "mailserver " in (log := self.log_text()) and " started (pid " in log
            listening = [s for s, p in self.ports.items() if started and port_is_listening(p)]
            if listening:
                self.kill9()
                pytest.fail(f"server started listening ({', '.join(listening)}) despite the bad "
                            f"config\n{self.diagnostics()}", pytrace=False)
            if time.monotonic() > deadline:
                self.kill9()
                pytest.fail(f"twistd still running after {timeout}s\n{self.diagnostics()}",
                            pytrace=False)
            time.sleep(0.05)
        return proc.returncode, self.output_text() + "\n" + self.log_text()

    # -- observation

    def log_text(self) -> str:
        """The twistd log, rotated parts included, oldest first."""
        parts = []
        rotated = sorted(self.root.glob(self.log_path.name + ".*"),
                         key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
                         reverse=True)
        for path in [*rotated, self.log_path]:
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def output_text(self) -> str:
        if self._out:
            self._out.flush()
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""

    def wait_for_log(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if predicate(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def diagnostics(self) -> str:
        return (f"--- config {self.config_path} ---\n{self.config_path.read_text()}"
                f"--- twistd stdout/stderr (tail) ---\n{_tail(self.output_text(), 200)}\n"
                f"--- {self.log_path} (tail) ---\n{_tail(self.log_text())}")

    def maildir(self, address: str) -> Path:
        localpart, _, domain = address.rpartition("@")
        return self.maildir_root / domain.lower() / localpart.lower()

    def messages(self, address: str) -> list[Path]:
        """Delivered INBOX messages of `address`: files in new/ and cur/."""
        return maildir_messages(self.maildir(address))

    def vm_hwm_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")

    # -- clients

    def smtp(self, timeout: float = 30) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.remote.test",
                            timeout=timeout)

    def raw(self, port: int | None = None, timeout: float = 10) -> "SMTPClient":
        return SMTPClient(port or self.smtp_port, timeout=timeout)


# -- maildir helpers -------------------------------------------------------------------------

def maildir_messages(maildir: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            files.extend(p for p in d.iterdir() if p.is_file())
    return sorted(files)


def stored_files(maildir_root: Path, subdirs: Iterable[str] = ("new", "cur", "tmp")) -> list[Path]:
    """Every file in any new/, cur/ or tmp/ directory below the maildir root."""
    wanted = set(subdirs)
    if not maildir_root.exists():
        return []
    return sorted(p for p in maildir_root.rglob("*")
                  if p.is_file() and p.parent.name in wanted)


_S_RE = re.compile(r",S=(\d+)")


def maildir_size_field(path: Path) -> int | None:
    m = _S_RE.search(path.name)
    return int(m.group(1)) if m else None


def lf_form(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def delivered_prefix(stored: bytes, original: bytes) -> bytes | None:
    """The headers the server prepended, if `stored` is exactly those plus `original`.

    The message must be stored byte for byte as it arrived (after dot-unstuffing); line
    endings may be kept as CRLF or converted to LF as a whole (Maildir files are commonly
    LF), but never mixed.
    """
    for form in (original, lf_form(original)):
        if stored.endswith(form):
            prefix = stored[: len(stored) - len(form)]
            if form is original or b"\r\n" not in prefix:
                return prefix
    return None


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) pairs of a header block."""
    fields: list[tuple[str, str]] = []
    for raw in re.split(rb"\r?\n", block):
        if not raw:
            continue
        line = raw.decode("utf-8", "replace")
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, value = line.split(":", 1)
            fields.append((name.strip(), value.strip()))
        else:
            fields.append((line, ""))
    return fields


def header_values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n.lower() == name.lower()]


def split_header_body(data: bytes) -> tuple[bytes, bytes]:
    m = re.search(rb"\r?\n\r?\n", data)
    if not m:
        return data, b""
    return data[: m.start()], data[m.end():]


_MSGID_RE = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def message_id_of(data: bytes) -> str | None:
    head, _ = split_header_body(data)
    m = _MSGID_RE.search(head)
    return m.group(1).decode() if m else None


def make_message(msgid: str, *, sender: str = "x@remote.test", to: str = "alice@example.test",
                 subject: str = "test", body: bytes | str = b"Hello.\r\n",
                 extra_headers: Iterable[str] = ()) -> bytes:
    """An RFC 5322 message with CRLF line endings, ending with CRLF."""
    if isinstance(body, str):
        body = body.encode()
    head = [f"From: <{sender}>", f"To: <{to}>", f"Subject: {subject}",
            f"Message-ID: {msgid}", "Date: Mon, 01 Jan 2024 00:00:00 +0000", *extra_headers]
    msg = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    if not msg.endswith(b"\r\n"):
        msg += b"\r\n"
    return msg


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload for a CRLF message, with the terminating <CRLF>.<CRLF>."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# -- tools ---------------------------------------------------------------------------------

def requires_tool(name: str) -> str:
    """Path of executable `name`; skips the test when it is missing, unless
    MAILSERVER_REQUIRE_INTEROP=1, then the missing tool fails the test."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("MAILSERVER_REQUIRE_INTEROP") == "1":
        pytest.fail(f"interop tool {name!r} is not installed, and MAILSERVER_REQUIRE_INTEROP=1 "
                    f"requires it (install {name} or unset the variable)", pytrace=False)
    pytest.skip(f"{name} not installed (set MAILSERVER_REQUIRE_INTEROP=1 to make this a failure)")


def tls_client_context(*, maximum: ssl.TLSVersion | None = None,
                       minimum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context that does not verify (the server's certificate is self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# -- a raw SMTP client: sees every byte smtplib would hide ----------------------------------

class ConnectionClosed(Exception):
    """The server closed the connection before a complete reply."""


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return "\n".join(f"{self.code}{'-' if i < len(self.lines) - 1 else ' '}{line}"
                         for i, line in enumerate(self.lines)) or str(self.code)


class SMTPClient:
    """Line-level SMTP client over a plain socket, optionally upgraded with STARTTLS."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionClosed(f"connection closed; unparsed bytes: {self.buf!r}")
        self.buf += chunk

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def read_reply(self) -> Reply:
        lines: list[str] = []
        while True:
            line = self.read_line().decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise AssertionError(f"malformed reply line {line!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), lines)

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.read_reply()

    def greet(self, helo: str = "client.remote.test") -> Reply:
        banner = self.read_reply()
        assert banner.code == 220, f"banner: {banner}"
        reply = self.cmd(f"EHLO {helo}")
        assert reply.code == 250, f"EHLO: {reply}"
        return reply

    def wrap_tls(self, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        assert not self.buf, f"unread plaintext before the TLS handshake: {self.buf!r}"
        self.sock = (context or tls_client_context()).wrap_socket(self.sock,
                                                                   server_hostname=HOSTNAME)
        return self.sock  # type: ignore[return-value]

    def starttls(self, context: ssl.SSLContext | None = None) -> Reply:
        reply = self.cmd("STARTTLS")
        assert reply.code == 220, f"STARTTLS: {reply}"
        self.wrap_tls(context)
        return reply

    def pending(self, wait: float) -> bytes:
        """Whatever the server sends within `wait` seconds without being asked."""
        data, self.buf = self.buf, b""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, TimeoutError):
            pass
        finally:
            self.sock.settimeout(self.timeout)
        return data

    def closed_by_server(self, wait: float = 5.0) -> bool:
        """True if the server closes the connection within `wait` seconds."""
        deadline = time.monotonic() + wait
        self.buf = b""
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    if not self.sock.recv(65536):
                        return True
                except (socket.timeout, TimeoutError):
                    return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        finally:
            try:
                self.sock.settimeout(self.timeout)
            except OSError:
                pass
        return False

    def mail_transaction(self, sender: str, rcpts: Iterable[str], data: bytes,
                         mail_params: str = "") -> Reply:
        """MAIL/RCPT/DATA with `data` already dot-stuffed and terminated; returns the
        reply to the end of data (asserting the earlier steps succeed)."""
        r = self.cmd(f"MAIL FROM:<{sender}>{' ' + mail_params if mail_params else ''}")
        assert r.code == 250, f"MAIL FROM: {r}"
        for rcpt in rcpts:
            r = self.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, f"RCPT TO:<{rcpt}>: {r}"
        r = self.cmd("DATA")
        assert r.code == 354, f"DATA: {r}"
        try:
            self.send(data)
        except OSError:
            pass  # the server may have answered and closed early; read what it said
        return self.read_reply()

    def quit(self) -> None:
        try:
            self.send(b"QUIT\r\n")
            self.read_reply()
        except (OSError, ConnectionClosed, AssertionError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "SMTPClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def send_mail(server: ServerProcess, message: bytes, rcpts: list[str],
              sender: str = "x@remote.test", **kwargs: Any) -> dict:
    """Send with smtplib over the MX port; returns sendmail's refused-recipients dict."""
    with server.smtp() as s:
        return s.sendmail(sender, rcpts, message, **kwargs)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
