"""End-to-end helpers for sending mail out: a DNS server, receiving SMTP servers, clients.

- `DNSServer`: tests/e2e/dnsserver.py (twisted.names) in a subprocess on a free loopback
  UDP port, serving ZONE below; the mail server under test uses it as [relay].resolver.
- `Receiver`: a small SMTP server in a thread on 127.0.0.X:port recording what it gets,
  able to refuse (4xx/5xx per RCPT or DATA), to offer STARTTLS, implicit TLS and AUTH.
  "Different MX hosts" are different loopback addresses on one port, the [relay].port.
- `submit`: smtplib over submission (STARTTLS) or submissions (implicit TLS) with AUTH.
"""

from __future__ import annotations

import base64
import datetime
import json
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from harness import PASSWORD, free_port, tls_client_context, wait_until

HERE = Path(__file__).resolve().parent

# Every test domain and its MX hosts; each host is a different loopback address.
ZONE = [
    ["primary.test", "MX", 10, "mx1.primary.test"],
    ["primary.test", "MX", 20, "mx2.primary.test"],
    ["mx1.primary.test", "A", "127.0.0.2"],
    ["mx2.primary.test", "A", "127.0.0.3"],
    ["fallback.test", "MX", 10, "down.fallback.test"],
    ["fallback.test", "MX", 20, "up.fallback.test"],
    ["down.fallback.test", "A", "127.0.0.4"],
    ["up.fallback.test", "A", "127.0.0.5"],
    ["retry.test", "MX", 10, "mx.retry.test"],
    ["mx.retry.test", "A", "127.0.0.6"],
    ["reject.test", "MX", 10, "mx.reject.test"],
    ["mx.reject.test", "A", "127.0.0.7"],
    ["later.test", "MX", 10, "mx.later.test"],
    ["mx.later.test", "A", "127.0.0.8"],
    ["smarthost.test", "A", "127.0.0.9"],
    ["implicit.test", "A", "127.0.0.10"],
    ["null.test", "MX", 0, ""],
]

# Services the outbound tests do not need (and whose default ports could collide).
UNUSED_LISTENERS = ("imap", "imaps", "pop3", "pop3s", "autoconfig", "autoconfig_http")


class DNSServer:
    def __init__(self, zone: list[list], workdir: Path) -> None:
        zone_file = workdir / "zone.json"
        zone_file.write_text(json.dumps(zone))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "dnsserver.py"), str(zone_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"DNS server did not start: {line}{self.proc.stdout.read()}")
        self.port = int(line.split()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(ZONE, tmp_path_factory.mktemp("dns"))
    yield server
    server.stop()


def make_certificate(directory: Path, hostname: str, *,
                     valid_from: datetime.timedelta = datetime.timedelta(hours=-1),
                     valid_until: datetime.timedelta = datetime.timedelta(days=2)
                     ) -> tuple[Path, Path]:
    """A self-signed certificate for `hostname` (also usable as its own trust anchor),
    valid from now + `valid_from` to now + `valid_until`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + valid_from)
            .not_valid_after(now + valid_until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{hostname}.crt", directory / f"{hostname}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- receiving SMTP servers ----------------------------------------------------------------

@dataclass
class Received:
    helo: str
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool
    auth: str | None
    commands: list[str] = field(default_factory=list)


class _Closed(Exception):
    pass


class Receiver:
    """An SMTP server on host:port in a thread; records every message it accepts.

    rcpt_reply(address) and data_reply(n) (n: how many DATA it has answered before) return
    the reply line; None means the usual 250.
    """

    def __init__(self, host: str, port: int, *, name: str = "mx.test",
                 cert: tuple[Path, Path] | None = None, implicit_tls: bool = False,
                 auth: tuple[str, str] | None = None,
                 rcpt_reply: Callable[[str], str | None] | None = None,
                 data_reply: Callable[[int], str | None] | None = None,
                 pipelining: bool = True) -> None:
        self.host, self.port, self.name = host, port, name
        self.ctx = None
        if cert is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(*cert)
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.pipelining = pipelining
        self.received: list[Received] = []
        self.connections = 0
        self.auth_attempts: list[tuple[str, str]] = []
        self.data_count = 0
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"rcv-{host}")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wait_for(self, count: int, timeout: float = 20) -> bool:
        return wait_until(lambda: len(self.received) >= count, timeout, 0.05)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.implicit_tls:
                assert self.ctx is not None
                conn = self.ctx.wrap_socket(conn, server_side=True)
            _Session(self, conn, tls=self.implicit_tls).run()
        except (_Closed, OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass


class _Session:
    def __init__(self, receiver: Receiver, conn: socket.socket, tls: bool) -> None:
        self.r, self.conn, self.tls = receiver, conn, tls
        self.buf = b""
        self.helo = ""
        self.authed: str | None = None
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.commands: list[str] = []

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise _Closed()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def send(self, text: str) -> None:
        self.conn.sendall(text.encode() + b"\r\n")

    def run(self) -> None:
        self.send(f"220 {self.r.name} ESMTP test receiver")
        while True:
            raw = self.line()
            cmd = raw.decode("utf-8", "replace")
            self.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            arg = cmd[len(verb):].strip()
            if verb == "EHLO":
                self.helo = arg
                ext = ["SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES"]
                if self.r.pipelining:
                    ext.append("PIPELINING")
                if self.r.ctx is not None and not self.tls:
                    ext.append("STARTTLS")
                if self.r.auth and self.tls:
                    ext.append("AUTH PLAIN LOGIN")
                lines = [self.r.name] + ext
                self.send("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")
            elif verb == "HELO":
                self.helo = arg
                self.send(f"250 {self.r.name}")
            elif verb == "STARTTLS" and self.r.ctx is not None and not self.tls:
                self.send("220 2.0.0 go ahead")
                assert not self.buf
                self.conn = self.r.ctx.wrap_socket(self.conn, server_side=True)
                self.tls, self.helo, self.buf = True, "", b""
            elif verb == "AUTH" and self.r.auth and self.tls:
                parts = arg.split()
                if parts[0].upper() == "PLAIN" and len(parts) == 2:
                    _, user, password = base64.b64decode(parts[1]).split(b"\0")
                    self.r.auth_attempts.append((user.decode(), password.decode()))
                    if (user.decode(), password.decode()) == self.r.auth:
                        self.authed = user.decode()
                        self.send("235 2.7.0 ok")
                    else:
                        self.send("535 5.7.8 bad credentials")
                else:
                    self.send("504 5.5.4 PLAIN only here")
            elif verb == "MAIL":
                if self.r.auth and not self.authed:
                    self.send("530 5.7.0 authentication required")
                    continue
                self.mail_from = arg[5:].split(">")[0].lstrip("<") if arg.upper().startswith("FROM:") else arg
                self.rcpts = []
                self.send("250 2.1.0 ok")
            elif verb == "RCPT":
                address = arg[3:].strip().strip("<>")
                reply = self.r.rcpt_reply(address) if self.r.rcpt_reply else None
                if reply is None:
                    self.rcpts.append(address)
                    reply = "250 2.1.5 ok"
                self.send(reply)
            elif verb == "DATA":
                if self.mail_from is None or not self.rcpts:
                    self.send("554 5.5.1 no valid recipients")
                    continue
                self.send("354 go ahead")
                data = bytearray()
                while True:
                    line = self.line()
                    if line == b".":
                        break
                    data += (line[1:] if line.startswith(b".") else line) + b"\r\n"
                with self.r.lock:
                    n = self.r.data_count
                    self.r.data_count += 1
                reply = self.r.data_reply(n) if self.r.data_reply else None
                if reply is None or reply.startswith("2"):
                    with self.r.lock:
                        self.r.received.append(Received(self.helo, self.mail_from,
                                                        list(self.rcpts), bytes(data),
                                                        self.tls, self.authed,
                                                        list(self.commands)))
                self.send(reply or "250 2.0.0 queued")
                self.mail_from, self.rcpts = None, []
            elif verb == "RSET":
                self.mail_from, self.rcpts = None, []
                self.send("250 2.0.0 ok")
            elif verb == "NOOP":
                self.send("250 2.0.0 ok")
            elif verb == "QUIT":
                self.send("221 2.0.0 bye")
                return
            else:
                self.send("502 5.5.2 not implemented")


# -- the server under test -----------------------------------------------------------------

def outbound_server(make_server, dns: DNSServer, mx_port: int, *, start: bool = True,
                    relay: dict | None = None, queue: dict | None = None, **overrides):
    """A mail server that resolves with the test DNS server and relays to `mx_port`."""
    listen = {name: "" for name in UNUSED_LISTENERS if _known_listener(name)}
    listen.update(overrides.pop("listen", {}))
    relay_cfg = {"resolver": dns.address, "port": mx_port, "connect_timeout": 3, "timeout": 20}
    relay_cfg.update(relay or {})
    queue_cfg = {"retry_schedule": ["1s"], "delay_warning": 0}
    queue_cfg.update(queue or {})
    return make_server(start=start, listen=listen, relay=relay_cfg, queue=queue_cfg, **overrides)


def _known_listener(name: str) -> bool:
    from dataclasses import fields

    from mailserver.config import ListenConfig
    return name in {f.name for f in fields(ListenConfig)}


def submit(server, sender: str, rcpts: list[str], message: bytes, *, implicit: bool = False,
           user: str | None = None, password: str = PASSWORD) -> dict:
    """Send over submission (STARTTLS) or submissions (implicit TLS), authenticated as
    `user` (default: the sender); returns smtplib's refused-recipients dict."""
    ctx = tls_client_context()
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"],
                                                local_hostname="client.example.test",
                                                context=ctx, timeout=30)
    else:
        client = smtplib.SMTP("127.0.0.1", server.ports["submission"],
                              local_hostname="client.example.test", timeout=30)
        client.starttls(context=ctx)
    with client:
        client.login(user or sender, password)
        return client.sendmail(sender, rcpts, message)


def mx_port() -> int:
    """A port free on every loopback address the receivers use."""
    for _ in range(50):
        port = free_port()
        try:
            for i in range(2, 11):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{i}", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port on 127.0.0.2-10")


def wait_queue_empty(server, timeout: float = 20) -> bool:
    env = server.state_dir / "queue" / "env"
    return wait_until(lambda: not env.exists() or not any(env.iterdir()), timeout, 0.05)

