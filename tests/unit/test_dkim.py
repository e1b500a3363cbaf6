"""DKIM keys and signing: the streamed relaxed body hash equals dkimpy's, signatures verify
against the TXT record `mailserver-admin dns` publishes; plus that record set itself."""

from __future__ import annotations

import hashlib
import random
import re

import dkim
import pytest
from dkim.canonicalization import Relaxed

from mailserver.config import parse_config
from mailserver.dkim.keys import default_selector, generate, keys_for
from mailserver.dkim.sign import RelaxedBodyHash, sign_file
from mailserver.dnsrecords import endpoint_port, records, txt_strings


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dkim")
    key, created = generate(directory, "Example.TEST")
    assert created
    return key


def test_streamed_relaxed_body_hash_matches_dkimpy():
    rng = random.Random(5)
    pieces = [b"", b" ", b"\t", b"a", b"b  c", b"x\t \t", b"  y", b".", b"\xc3\xa9"]
    for _ in range(300):
        body = b"".join(rng.choice(pieces) + b"\r\n" for _ in range(rng.randint(0, 30)))
        # (A last line without CRLF never comes out of SMTP DATA; with trailing blanks
        # there dkimpy keeps one where RFC 6376 3.4.4 drops them, so it is not compared.)
        body += rng.choice([b"", b"tail", b"  tail"])
        h, pos = RelaxedBodyHash(), 0
        while pos < len(body):
            n = rng.randint(1, 9)
            h.update(body[pos:pos + n])
            pos += n
        assert h.digest() == hashlib.sha256(Relaxed.canonicalize_body(body)).digest(), body


def test_keys_generate_once_and_newest_selector_wins(tmp_path, key):
    assert key.domain == "example.test" and key.selector == default_selector()
    assert key.path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    again, created = generate(key.path.parent, "example.test")
    assert (again, created) == (key, False)
    newer, created = generate(tmp_path, "example.test", "mail209901")
    older, _ = generate(tmp_path, "example.test", "mail200001")
    assert [k.selector for k in keys_for(tmp_path, "EXAMPLE.test")] == ["mail200001", "mail209901"]
    assert keys_for(tmp_path, "other.test") == []
    with pytest.raises(ValueError):
        generate(tmp_path, "example.test", "bad_selector")


def test_signature_verifies_and_breaks_on_change(tmp_path, key):
    message = (b"Received: from x\r\nFrom: Alice <alice@example.test>\r\nTo: b@remote.test\r\n"
               b"Subject: hello   there\r\n\tfolded\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
               b"\r\nline  with   spaces  \r\n\r\n.dot\r\n" + b"z" * 200000 + b"\r\n\r\n\r\n")
    path = tmp_path / "m"
    path.write_bytes(message)
    signature = sign_file(path, key)
    assert signature.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert signature.endswith(b"\r\n")
    txt = key.txt_record().encode()
    dnsfunc = lambda name, timeout=5: txt if name == f"{key.selector}._domainkey.example.test.".encode() else None  # noqa: E731
    assert dkim.verify(signature + message, dnsfunc=dnsfunc)
    assert dkim.verify(b"Return-Path: <x@y.z>\r\n" + signature + message, dnsfunc=dnsfunc)
    assert not dkim.verify(signature + message.replace(b".dot", b".dog"), dnsfunc=dnsfunc)
    assert not dkim.verify(signature + message.replace(b"Alice", b"Mallory"), dnsfunc=dnsfunc)


def test_fields_a_reader_relies_on_are_oversigned(tmp_path, key):
    """RFC 6376 8.15: a Subject, Reply-To or Cc added above the signed ones (present in
    the message or not) breaks the signature; a Received added by a relay does not."""
    message = (b"From: Alice <alice@example.test>\r\nTo: b@remote.test\r\n"
               b"Subject: pay invoice 1\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
               b"\r\nbody\r\n")
    path = tmp_path / "m"
    path.write_bytes(message)
    signature = sign_file(path, key)
    txt = key.txt_record().encode()
    dnsfunc = lambda name, timeout=5: txt if name == f"{key.selector}._domainkey.example.test.".encode() else None  # noqa: E731
    assert dkim.verify(signature + message, dnsfunc=dnsfunc)
    assert dkim.verify(b"Received: from relay\r\n" + signature + message, dnsfunc=dnsfunc)
    h = re.search(rb"h=([^;]+);", signature.replace(b"\r\n\t", b"")).group(1)
    names = [n.strip() for n in h.split(b":")]
    assert names.count(b"subject") == 2 and names.count(b"reply-to") == 1
    for added in (b"Subject: pay invoice 2\r\n", b"Reply-To: <mallory@evil.test>\r\n",
                  b"Cc: <mallory@evil.test>\r\n", b"From: <mallory@evil.test>\r\n"):
        assert not dkim.verify(signature + added + message, dnsfunc=dnsfunc), added


def test_dns_records(tmp_path, key):
    config = parse_config({"server": {"hostname": "mail.example.test"},
                           "listen": {"submission": "tcp:587:interface=192.0.2.1",
                                      "submissions": "tcp:port=465", "pop3": "", "pop3s": ""}},
                          tmp_path / "c.toml")
    lines = records(config, "example.test", [key])
    text = "\n".join(lines)
    assert "example.test.  " in text and "IN MX    10 mail.example.test." in text
    assert '"v=spf1 mx -all"' in text
    assert f"{key.selector}._domainkey.example.test." in text
    dkim_line = next(line for line in lines if "_domainkey" in line)
    assert "".join(dkim_line.split('"')[1::2]) == key.txt_record()
    srv = {line.split()[0]: " ".join(line.split()[3:]) for line in lines if " SRV " in line}
    assert srv["_submissions._tcp.example.test."] == "0 1 465 mail.example.test."
    assert srv["_submission._tcp.example.test."] == "10 1 587 mail.example.test."
    assert srv["_pop3._tcp.example.test."] == "0 0 0 ."
    assert endpoint_port("tcp6:port=25:interface=\\:\\:1") == 25
    assert endpoint_port("unix:/x") is None
    assert txt_strings("a" * 300).count('"') == 4
