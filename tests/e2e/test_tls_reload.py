"""Certificate files replaced while the server runs: SIGHUP (and the timer) make new
connections, implicit TLS and STARTTLS alike, see the new certificate without a restart; a
broken or mismatched file is refused and the old certificate stays."""

from __future__ import annotations

import datetime
import imaplib
import os
import poplib
import signal
import smtplib
import socket
from pathlib import Path

from cryptography import x509
from harness import HOSTNAME, tls_client_context
from outbound_helpers import make_certificate


def served_certificate(port: int) -> x509.Certificate:
    """The leaf an implicit-TLS port presents now, on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with tls_client_context().wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def starttls_certificates(srv) -> list[x509.Certificate]:
    """The leaf each STARTTLS/STLS upgrade presents (submission, IMAP, POP3)."""
    ctx = tls_client_context()
    out = []
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=ctx)
        out.append(smtp.sock.getpeercert(binary_form=True))
    imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=10)
    try:
        imap.starttls(ssl_context=ctx)
        out.append(imap.sock.getpeercert(binary_form=True))
    finally:
        imap.logout()
    pop = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=10)
    try:
        pop.stls(context=ctx)
        out.append(pop.sock.getpeercert(binary_form=True))
    finally:
        pop.quit()
    return [x509.load_der_x509_certificate(der) for der in out]


def pem_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def replace_file(target: Path, data: bytes) -> None:
    """As certbot and editors do: a new file renamed over the old one."""
    tmp = target.with_name(target.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def reloads(srv) -> int:
    return srv.log_text().count("tls certificate reloaded")


def test_sighup_reloads_the_files_and_a_bad_pair_is_refused(make_server, tmp_path):
    live = tmp_path / "live"
    cert_a, key_a = make_certificate(live, HOSTNAME)
    first = pem_certificate(cert_a)
    srv = make_server(tls={"certificate": str(cert_a), "private_key": str(key_a)})
    assert served_certificate(srv.ports["imaps"]) == first

    # New files, as a renewal writes them; SIGHUP.
    cert_b, key_b = make_certificate(tmp_path / "renewed", HOSTNAME)
    second = pem_certificate(cert_b)
    replace_file(key_a, key_b.read_bytes())
    replace_file(cert_a, cert_b.read_bytes())
    pid = srv.pid
    os.kill(pid, signal.SIGHUP)
    log = srv.wait_for_log(lambda text: "tls certificate reloaded" in text, timeout=30)
    assert "tls certificate reloaded (CN=mail.example.test, not after" in log
    assert srv.running and srv.pid == pid, "the server reloads, it does not restart"
    for service in ("imaps", "pop3s", "submissions", "autoconfig"):
        assert served_certificate(srv.ports[service]) == second, service
    assert starttls_certificates(srv) == [second, second, second]

    # A truncated certificate file: logged, the served certificate stays.
    replace_file(cert_a, cert_b.read_bytes()[:200])
    os.kill(pid, signal.SIGHUP)
    log = srv.wait_for_log(lambda text: "tls certificate not reloaded" in text, timeout=30)
    assert "still serving (CN=mail.example.test" in log
    assert served_certificate(srv.ports["imaps"]) == second

    # A whole certificate whose key is another one: refused the same way.
    cert_c, _key_c = make_certificate(tmp_path / "other", HOSTNAME)
    replace_file(cert_a, cert_c.read_bytes())
    os.kill(pid, signal.SIGHUP)
    log = srv.wait_for_log(
        lambda text: "private key does not belong to the certificate" in text, timeout=30)
    assert "private key does not belong to the certificate" in log
    assert served_certificate(srv.ports["imaps"]) == second
    assert starttls_certificates(srv) == [second, second, second]

    # A whole pair, but expired: every verifying client would fail; refused too.
    cert_d, key_d = make_certificate(tmp_path / "expired", HOSTNAME,
                                     valid_from=datetime.timedelta(days=-100),
                                     valid_until=datetime.timedelta(days=-10))
    replace_file(key_a, key_d.read_bytes())
    replace_file(cert_a, cert_d.read_bytes())
    os.kill(pid, signal.SIGHUP)
    log = srv.wait_for_log(lambda text: "it is not valid now" in text, timeout=30)
    assert "still serving (CN=mail.example.test" in log
    assert served_certificate(srv.ports["imaps"]) == second
    assert reloads(srv) == 1
    assert srv.running


def test_changed_files_are_picked_up_without_a_signal(make_server, tmp_path):
    cert, key = make_certificate(tmp_path / "live", HOSTNAME)
    srv = make_server(tls={"certificate": str(cert), "private_key": str(key),
                           "reload_interval": "1s"})
    new_cert, new_key = make_certificate(tmp_path / "renewed", HOSTNAME)
    replace_file(key, new_key.read_bytes())
    replace_file(cert, new_cert.read_bytes())
    srv.wait_for_log(lambda text: "tls certificate reloaded" in text, timeout=60)
    assert served_certificate(srv.ports["imaps"]) == pem_certificate(new_cert)


def test_generated_certificate_survives_sighup(server):
    """Without configured files SIGHUP reads the generated pair again; it never stops
    the server (the default action of SIGHUP would)."""
    before = served_certificate(server.ports["imaps"])
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log(lambda text: "tls certificate unchanged" in text, timeout=30)
    assert server.running
    assert served_certificate(server.ports["imaps"]) == before


def test_unusable_certificate_at_start_is_one_line(make_server, tmp_path):
    cert, key = make_certificate(tmp_path / "live", HOSTNAME)
    _other_cert, other_key = make_certificate(tmp_path / "other", HOSTNAME)
    srv = make_server(start=False, tls={"certificate": str(cert), "private_key": str(other_key)})
    code, output = srv.run_to_exit()
    assert code == 1
    assert "mailserver: tls.certificate: the private key does not belong to the certificate" \
        in output
    assert "Traceback" not in output


def test_alpn_offers_the_listener_does_not_speak_are_ignored(server):
    """RFC 7301 3.2: with no protocol in common the handshake goes on without ALPN; an
    IMAPS client offering "imap" (and POP3S "pop3", HTTPS "h2" alone) got a fatal
    internal_error alert.  HTTPS still agrees on http/1.1 when it is offered."""
    for service, offer, agreed in (("imaps", ["imap"], None), ("pop3s", ["pop3"], None),
                                   ("submissions", ["smtp"], None),
                                   ("autoconfig", ["h2"], None),
                                   ("autoconfig", ["h2", "http/1.1"], "http/1.1")):
        ctx = tls_client_context()
        ctx.set_alpn_protocols(offer)
        with socket.create_connection(("127.0.0.1", server.ports[service]), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
                assert tls.selected_alpn_protocol() == agreed, (service, offer)
                if service != "autoconfig":
                    assert tls.recv(100)[:1] in (b"*", b"+", b"2"), service   # a greeting
