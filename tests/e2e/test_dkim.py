"""DKIM end to end: `mailserver-admin dns` publishes the key, and what the relay sends (and
what local users get) verifies with dkimpy against it."""

from __future__ import annotations

import base64
import re

import pytest

from harness import make_message
from outbound_helpers import Receiver, dns_server, mx_port, outbound_server, submit  # noqa: F401

ALICE, BOB = "alice@example.test", "bob@example.test"

dkim = pytest.importorskip("dkim")


def published_dkim(output: str) -> tuple[str, str]:
    """(record name, TXT value) of the DKIM record in `mailserver-admin dns` output."""
    for line in output.splitlines():
        name = line.split(" ", 1)[0]
        if "._domainkey." in name and " TXT " in line:
            return name, "".join(re.findall(r'"([^"]*)"', line))
    raise AssertionError(f"no DKIM record in:\n{output}")


def test_dkim_signature_verifies_against_the_published_key(make_server, dns_server):  # noqa: F811
    from cryptography.hazmat.primitives import serialization

    port = mx_port()
    srv = outbound_server(make_server, dns_server, port)
    out = srv.admin_ok("dns", "example.test").stdout
    name, txt = published_dkim(out)
    selector = name.split(".", 1)[0]
    assert name == f"{selector}._domainkey.example.test."
    # The published key is the key the server signs with.
    key_file = srv.state_dir / "dkim" / f"example.test.{selector}.key"
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.key_size == 2048
    assert txt == f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"
    for expected in ("IN MX    10 mail.example.test.", '"v=spf1 mx -all"', "_dmarc.example.test.",
                     "_submission._tcp.example.test.", "_imaps._tcp.example.test."):
        assert expected in out, out

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        return txt.encode() if qname == name.encode() else None

    body = (b"Dots and spaces:\r\n.leading dot\r\n..two\r\ntrailing   \r\n\ttab\t \r\n"
            + "caf\u00e9\r\n".encode() + b"x" * 900 + b"\r\n\r\n\r\n")
    msg = make_message("<dkim-1@example.test>", sender=ALICE, to="x@primary.test",
                       subject="signed", body=body,
                       extra_headers=["Content-Type: text/plain; charset=utf-8",
                                      "Content-Transfer-Encoding: 8bit"])
    with Receiver("127.0.0.2", port, name="mx1.primary.test") as mx1:
        assert submit(srv, ALICE, ["x@primary.test", BOB], msg) == {}
        assert mx1.wait_for(1), srv.diagnostics()
        relayed = mx1.received[0].data
    assert relayed.startswith(b"DKIM-Signature: "), relayed[:200]
    assert f"s={selector}".encode() in relayed and b"d=example.test" in relayed
    assert dkim.verify(relayed, dnsfunc=dnsfunc), "relayed copy verifies"
    [local] = srv.messages(BOB)
    assert dkim.verify(local.read_bytes(), dnsfunc=dnsfunc), "local copy verifies"
    assert not dkim.verify(relayed.replace(b"trailing", b"Trailing"), dnsfunc=dnsfunc)


def test_no_signature_for_a_domain_without_key(make_server, dns_server):  # noqa: F811
    port = mx_port()
    srv = outbound_server(make_server, dns_server, port, start=False)
    for key in (srv.state_dir / "dkim").glob("example.test.*"):
        key.unlink()
    srv.start()
    msg = make_message("<nodkim@example.test>", sender=ALICE, to=BOB)
    assert submit(srv, ALICE, [BOB], msg) == {}
    [local] = srv.messages(BOB)
    assert b"DKIM-Signature" not in local.read_bytes()
    # A key made while the server runs is used from the next message on.
    srv.admin_ok("dns", "example.test")
    assert submit(srv, ALICE, [BOB], msg) == {}
    assert sum(b"DKIM-Signature" in p.read_bytes() for p in srv.messages(BOB)) == 1
