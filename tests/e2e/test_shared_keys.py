"""Two server nodes on one shared Maildir root ([storage] shared = true, each its own
state_dir and SQLite accounts): a DKIM key made by `mailserver-admin domain add` on node A
is the one node B signs with, and a certificate node A gets from a real CA (pebble), whose
validation requests reach node B only, is then served by node B too.

Real `twistd mailserver` processes, submission over STARTTLS, signatures checked with
dkimpy, certificates compared over TLS connections.
"""

from __future__ import annotations

import base64
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from harness import DOMAIN, PASSWORD, make_message, maildir_messages, requires_tool, wait_until
from outbound_helpers import submit
from test_acme import (ISSUED, NAMES, dns, pebbles, served_certificate,  # noqa: F401
                       unverified_certificate, wait_for_issuance)

dkim = pytest.importorskip("dkim")

ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
BUSY = "another node is getting the certificate"


def make_nodes(make_server, shared: Path, count: int = 2, accounts: bool = False,
               **sections: dict) -> list:
    """`count` servers (not started) with their own state_dir and ports, one Maildir root."""
    storage = {"maildir_root": str(shared), "shared": True}
    return [make_server(start=False, accounts=accounts, storage=storage, **sections)
            for _ in range(count)]


def published_dkim(output: str) -> tuple[str, str]:
    """(record name, TXT value) of the DKIM record in `mailserver-admin dns` output."""
    for line in output.splitlines():
        name = line.split(" ", 1)[0]
        if "._domainkey." in name and " TXT " in line:
            return name, "".join(re.findall(r'"([^"]*)"', line))
    raise AssertionError(f"no DKIM record in:\n{output}")


def test_a_key_made_on_node_a_signs_on_node_b(make_server, tmp_path):
    shared = tmp_path / "shared-maildirs"
    a, b = make_nodes(make_server, shared)
    out = a.admin_ok("domain", "add", DOMAIN).stdout
    assert "DKIM key generated" in out
    keys = list((shared / ".mailserver" / "dkim").iterdir())
    assert len(keys) == 1 and stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert not (a.state_dir / "dkim").exists()
    # Node B keeps its own accounts: the domain is added there too, and finds its key.
    assert "DKIM key generated" not in b.admin_ok("domain", "add", DOMAIN).stdout
    for node in (a, b):
        for address in (ALICE, BOB):
            node.admin_ok("user", "add", address, "--password-stdin", input=PASSWORD + "\n")
    name, txt = published_dkim(a.admin_ok("dns", DOMAIN).stdout)
    assert published_dkim(b.admin_ok("dns", DOMAIN).stdout) == (name, txt)
    selector = name.split(".", 1)[0]
    key = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert txt == f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return txt.encode() if qname == name.encode() else None

    b.start()
    msg = make_message("<shared-dkim-b@example.test>", sender=ALICE, to=BOB,
                       subject="signed on node B", body=b"Signed by B with A's key.\r\n")
    assert submit(b, ALICE, [BOB], msg) == {}
    [stored] = maildir_messages(shared / DOMAIN / "bob")
    signed = stored.read_bytes()
    assert f"s={selector}".encode() in signed and f"d={DOMAIN}".encode() in signed
    assert dkim.verify(signed, dnsfunc=dnsfunc), "node B's signature verifies with A's key"
    assert not dkim.verify(signed.replace(b"Signed by B", b"Signed by C"), dnsfunc=dnsfunc)


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_a_certificate_node_a_gets_is_served_by_node_b(make_server, dns, pebbles,  # noqa: F811
                                                       tmp_path, monkeypatch, challenge):
    """Node B finds the order lock taken and skips; node A orders while the CA's
    validation requests reach node B only (B answers from the shared directory); then
    node B serves what A stored."""
    requires_tool("pebble")
    # The CA is on loopback: never through a proxy of the environment.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    shared = tmp_path / "shared-maildirs"
    pebble = pebbles(dns())
    tls = {"acme_directory": pebble.directory, "acme_email": "postmaster@example.test",
           "acme_ca_bundle": str(pebble.ca_bundle), "acme_challenge": challenge,
           "reload_interval": "1s"}
    a, b = make_nodes(make_server, shared, accounts=True, tls=tls)
    pebble.start(b)   # http-01 and tls-alpn-01 are validated on node B's ports

    # A node on another host holds the order lock: B skips this round.
    store = shared / ".mailserver" / "acme"
    store.mkdir(parents=True, mode=0o700)
    lock = store / ".order.lock"
    lock.write_bytes(b"4242:node-c.example.net")
    b.start()
    log = b.wait_for_log(lambda text: BUSY in text or "Traceback" in text, timeout=30)
    assert BUSY in log and "4242:node-c.example.net" in log, b.diagnostics()
    assert ISSUED not in log
    lock.unlink()

    a.start()
    log = wait_for_issuance(a, 1, pebble)
    assert "out of the certificate" not in log, log   # every name validated, through B
    root = pebble.root_pem()
    issued = served_certificate(a.ports["imaps"], root)
    assert {n.value for n in issued.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value} == set(NAMES)
    stored = x509.load_pem_x509_certificate((store / "certificate.pem").read_bytes())
    assert stored == issued
    assert not lock.exists()   # released after the order
    for name in ("account-key.pem", "certificate.pem", "private-key.pem"):
        assert stat.S_IMODE((store / name).stat().st_mode) == 0o600, name
    assert not [p for p in (store / "challenges").rglob("*") if p.is_file()]   # withdrawn

    # B picks up the stored certificate without a restart and without ordering one.
    fingerprint = issued.fingerprint(hashes.SHA256())
    assert wait_until(lambda: unverified_certificate(b.ports["imaps"]).fingerprint(
        hashes.SHA256()) == fingerprint, 30, interval=0.5), b.diagnostics()
    for port in ("imaps", "submissions", "pop3s"):
        assert served_certificate(b.ports[port], root).fingerprint(hashes.SHA256()) \
            == fingerprint, port
    b_log = b.log_text()
    assert "tls certificate reloaded" in b_log and ISSUED not in b_log
    if challenge == "tls-alpn-01":   # B's handshakes answered A's order
        for name in NAMES:
            assert f"tls-alpn-01 validation certificate sent for {name}" in b_log
