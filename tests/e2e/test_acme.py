"""ACME against a real CA: pebble (Let's Encrypt's test server), validating the
challenges for real over loopback.  Its DNS is the tests' twisted.names server, which
answers the server's names with 127.0.0.1; its http-01 / tls-alpn-01 ports are the
server's autoconfig_http / autoconfig listeners.

Checked: a certificate issued at start and served (chain verified against pebble's root,
fetched from its management API) by implicit TLS and STARTTLS; renewal swapped in without
a restart; the tls-alpn-01 challenge; a CA that cannot be reached (self-signed served,
retried); a name that cannot be validated left out.
"""

from __future__ import annotations

import datetime
import imaplib
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import DOMAIN, HOSTNAME, free_port, requires_tool, tls_client_context, wait_until
from outbound_helpers import DNSServer

NAMES = (HOSTNAME, f"autoconfig.{DOMAIN}", f"autodiscover.{DOMAIN}")
ISSUED = "acme: certificate issued"
# Shorter than the default renewal window of 30 days: every check renews.
SHORT_VALIDITY = 10 * 86400


@pytest.fixture(autouse=True)
def _pebble_installed(monkeypatch):
    requires_tool("pebble")
    # The CA is on loopback: never through a proxy of the environment.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _https_certificate(directory: Path) -> tuple[Path, Path]:
    """The certificate pebble's own HTTPS listeners use (for 127.0.0.1), also the trust
    anchor the server is given for them ([tls] acme_ca_bundle)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test listener")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "listener.crt", directory / "listener.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Pebble:
    """One pebble process with its own config, ports and log."""

    def __init__(self, workdir: Path, dns: str, validity: int | None = None,
                 blocklist: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.blocklist = blocklist
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_bundle, self.key = _https_certificate(workdir)
        self.port, self.management_port = free_port(), free_port()
        self.dns = dns
        self.validity = validity
        self.config = workdir / "pebble-config.json"
        self.log_path = workdir / "pebble.log"
        self.proc: subprocess.Popen | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, srv) -> "Pebble":
        """Validate http-01 on the server's autoconfig_http port and tls-alpn-01 on its
        autoconfig (HTTPS) port."""
        settings = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.ca_bundle),
            "privateKey": str(self.key),
            "httpPort": srv.ports["autoconfig_http"],
            "tlsPort": srv.ports["autoconfig"],
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            settings["certificateValidityPeriod"] = self.validity
        if self.blocklist:   # names the CA refuses to issue for (rejectedIdentifier)
            settings["domainBlocklist"] = list(self.blocklist)
        self.config.write_text(json.dumps({"pebble": settings}))
        env = dict(os.environ)
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)   # every challenge is really validated
        env.update(PEBBLE_VA_NOSLEEP="1",          # no random waits before validating
                   PEBBLE_WFE_NONCEREJECT="0",     # no deliberate badNonce answers
                   PEBBLE_AUTHZREUSE="0")          # a renewal is validated again
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [requires_tool("pebble"), "-config", str(self.config), "-dnsserver", self.dns],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.workdir)
        up = wait_until(lambda: self.proc.poll() is not None
                        or (_listening(self.port) and _listening(self.management_port)), 30)
        if not up or self.proc.poll() is not None:
            self.stop()
            pytest.fail(f"pebble did not start:\n{self.log_text()}", pytrace=False)
        return self

    def root_pem(self) -> str:
        """The root of the CA's chains (pebble makes a new one at every start)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as response:
            return response.read().decode()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def dns(tmp_path):
    """A records 127.0.0.1 for the server's names (autodiscover.<domain> only where a
    test asks: `dns(names)`)."""
    servers: list[DNSServer] = []

    def start(names=NAMES) -> DNSServer:
        workdir = tmp_path / f"dns{len(servers)}"
        workdir.mkdir()
        server = DNSServer([[name, "A", "127.0.0.1"] for name in names], workdir)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def pebbles(tmp_path):
    started: list[Pebble] = []

    def make(dns_server, **kwargs) -> Pebble:
        pebble = Pebble(tmp_path / f"pebble{len(started)}", dns_server.address, **kwargs)
        started.append(pebble)
        return pebble

    yield make
    for pebble in started:
        pebble.stop()


def acme_server(make_server, pebble: Pebble, **tls):
    """A server (not started) that gets its certificate from `pebble`."""
    return make_server(start=False, tls={
        "acme_directory": pebble.directory,
        "acme_email": "postmaster@example.test",
        "acme_ca_bundle": str(pebble.ca_bundle),
        **tls,
    })


def verified_context(root_pem: str) -> ssl.SSLContext:
    """A client that trusts only pebble's root and checks the host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=root_pem)
    return ctx


def served_certificate(port: int, root_pem: str, server_hostname: str = HOSTNAME
                       ) -> x509.Certificate:
    """The leaf served on an implicit-TLS port; the handshake fails unless the chain
    leads to pebble's root and the certificate is valid for `server_hostname`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with verified_context(root_pem).wrap_socket(raw, server_hostname=server_hostname) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def unverified_certificate(port: int) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with tls_client_context().wrap_socket(raw, server_hostname=HOSTNAME) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def dns_names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName))


def wait_for_issuance(srv, count: int, pebble: Pebble, timeout: float = 120) -> str:
    log = srv.wait_for_log(lambda text: text.count(ISSUED) >= count or "Traceback" in text,
                           timeout=timeout)
    if log.count(ISSUED) < count:
        pytest.fail(f"no certificate #{count} from pebble\n{srv.diagnostics()}\n"
                    f"--- pebble log ---\n{pebble.log_text()[-6000:]}", pytrace=False)
    return log


def test_issued_at_start_then_renewed_without_restart(make_server, dns, pebbles):
    pebble = pebbles(dns(), validity=SHORT_VALIDITY)
    srv = acme_server(make_server, pebble)
    pebble.start(srv)

    check = srv.admin_ok("check").stdout
    acme_line = next(line for line in check.splitlines() if line.startswith("acme"))
    assert f"on: {pebble.directory}, http-01 on listen.autoconfig_http (the CA connects to " \
           f"port 80)" in acme_line
    assert f"for {', '.join(NAMES)}" in acme_line

    srv.start()
    log = wait_for_issuance(srv, 1, pebble)
    assert f"for {', '.join(NAMES)} (no certificate yet)" in log
    root = pebble.root_pem()
    first = served_certificate(srv.ports["imaps"], root)
    assert dns_names(first) == set(NAMES)
    assert served_certificate(srv.ports["submissions"], root).serial_number == first.serial_number
    # The HTTPS autoconfig listener serves it for its own names too.
    served_certificate(srv.ports["autoconfig"], root, server_hostname=f"autoconfig.{DOMAIN}")
    # STARTTLS uses the same certificate, verified the same way.
    with srv.raw(srv.ports["submission"]) as smtp:
        smtp.greet()
        smtp.starttls(verified_context(root))   # checks the chain and mail.example.test
        assert smtp.cmd("EHLO client.example").code == 250
    acme_dir = srv.state_dir / "acme"
    for name in ("account-key.pem", "certificate.pem", "private-key.pem"):
        assert stat.S_IMODE((acme_dir / name).stat().st_mode) == 0o600, name

    # Only challenges in progress are answered.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.ports['autoconfig_http']}"
                               f"/.well-known/acme-challenge/{'A' * 43}", timeout=10)
    assert refused.value.code == 404

    # Pebble's certificates last 10 days, less than the 30-day window: the next check
    # (SIGHUP runs one at once; otherwise the daily timer) renews.
    pid = srv.pid
    os.kill(pid, signal.SIGHUP)
    log = wait_for_issuance(srv, 2, pebble)
    assert "(it expires" in log.split(ISSUED)[2]
    assert srv.running and srv.pid == pid
    second = served_certificate(srv.ports["imaps"], root)
    assert second.serial_number != first.serial_number
    assert served_certificate(srv.ports["pop3s"], root).serial_number == second.serial_number
    imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=10)
    imap.host = HOSTNAME   # the name STARTTLS checks the certificate against
    try:
        imap.starttls(ssl_context=verified_context(root))
        assert x509.load_der_x509_certificate(
            imap.sock.getpeercert(binary_form=True)).serial_number == second.serial_number
    finally:
        imap.logout()
    stored = x509.load_pem_x509_certificate((acme_dir / "certificate.pem").read_bytes())
    assert stored.serial_number == second.serial_number

    # A restart serves the stored certificate from the first connection on.
    srv.stop()
    srv.start()
    assert served_certificate(srv.ports["imaps"], root).serial_number == second.serial_number


def test_tls_alpn_01_on_the_https_listener(make_server, dns, pebbles):
    pebble = pebbles(dns())
    srv = acme_server(make_server, pebble, acme_challenge="tls-alpn-01")
    pebble.start(srv)
    srv.start()
    log = wait_for_issuance(srv, 1, pebble)
    for name in NAMES:
        assert f"tls-alpn-01 validation certificate sent for {name}" in log
    root = pebble.root_pem()
    assert dns_names(served_certificate(srv.ports["imaps"], root)) == set(NAMES)
    # After validation the HTTPS listener serves the real certificate again, also to a
    # client that offers acme-tls/1 (no challenge is in progress).
    ctx = verified_context(root)
    ctx.set_alpn_protocols(["acme-tls/1"])
    with socket.create_connection(("127.0.0.1", srv.ports["autoconfig"]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOSTNAME) as s:
            assert s.selected_alpn_protocol() is None


def test_unreachable_ca_then_recovery(make_server, dns, pebbles):
    """The CA is down at start: the self-signed certificate is served, the failure is
    logged with the retry; once the CA is back a check (SIGHUP) gets the certificate."""
    pebble = pebbles(dns())
    srv = acme_server(make_server, pebble)   # pebble not started yet
    srv.start()
    log = srv.wait_for_log(lambda text: "acme: getting a certificate from" in text, timeout=60)
    assert "failed" in log and "trying again in 300 s" in log
    generated = x509.load_pem_x509_certificate((srv.state_dir / "tls" / "cert.pem").read_bytes())
    assert unverified_certificate(srv.ports["imaps"]) == generated

    pebble.start(srv)
    os.kill(srv.pid, signal.SIGHUP)
    wait_for_issuance(srv, 1, pebble)
    assert dns_names(served_certificate(srv.ports["imaps"], pebble.root_pem())) == set(NAMES)


@pytest.mark.parametrize("why", ["no DNS record", "refused by the CA"])
def test_a_derived_name_that_cannot_be_had_is_left_out(make_server, dns, pebbles, why):
    """autodiscover.<domain> has no DNS record (its validation fails), or the CA refuses
    to order it at all (rejectedIdentifier, as Let's Encrypt does for a name under no
    public suffix): the certificate is issued without it rather than not at all."""
    autodiscover = f"autodiscover.{DOMAIN}"
    if why == "no DNS record":
        pebble = pebbles(dns(NAMES[:2]))
    else:
        pebble = pebbles(dns(NAMES), blocklist=(autodiscover,))
    srv = acme_server(make_server, pebble)
    pebble.start(srv)
    srv.start()
    log = wait_for_issuance(srv, 1, pebble)
    assert f"leaving {autodiscover} out of the certificate" in log
    cert = served_certificate(srv.ports["imaps"], pebble.root_pem())
    assert dns_names(cert) == set(NAMES) - {autodiscover}

