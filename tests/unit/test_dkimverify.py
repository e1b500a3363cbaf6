"""DKIM and ARC verification of spooled messages: messages signed and sealed by dkimpy
(and by our own streamed signer, and the RFC 8463 example) verify; any change, missing
key, DNS failure or malformed field gives the RFC's result and never an exception; the
body is hashed as a stream; the reactor side looks keys up through the resolver."""

from __future__ import annotations

import base64
import hashlib
import random
import re
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed, Simple
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from mailserver.dkim.keys import DKIMKey
from mailserver.dkim.sign import sign_file
from mailserver.inbound import dkimverify
from mailserver.inbound.dkimcheck import pick_key_record, verify_message
from mailserver.inbound.dkimverify import (
    MAX_HEADER,
    ARCResult,
    DKIMResult,
    key_names,
    read_header_block,
    verify_file,
)
from mailserver.inbound.dns import Answer, StaticResolver

MESSAGE = (b"Received: from client.example.org by mx.example.org\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: bob@example.net\r\n"
           b"Subject: lunch   plans\r\n\ttomorrow\r\n"
           b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\n"
           b"\r\n"
           b"Hello Bob,  \r\n\r\nshall we meet\tat noon?\r\n.\r\n\r\n\r\n")


def _rsa_pair(bits: int = 2048) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    return _rsa_pair()


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return base64.b64encode(seed), b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)


def sign(message: bytes, pem: bytes, selector: bytes = b"sel", domain: bytes = b"example.org",
         **kwargs) -> bytes:
    kwargs.setdefault("canonicalize", (b"relaxed", b"relaxed"))
    return dkim.sign(message, selector, domain, pem, **kwargs) + message


def verify(tmp_path, message: bytes, keys: dict, **kwargs) -> tuple[list[DKIMResult], ARCResult]:
    path = tmp_path / f"msg{random.random()}"
    path.write_bytes(message)
    return verify_file(path, keys, **kwargs)


def only(results: tuple[list[DKIMResult], ARCResult]) -> DKIMResult:
    dkim_results, _ = results
    assert len(dkim_results) == 1, dkim_results
    return dkim_results[0]


# -- DKIM: good signatures --------------------------------------------------------------

@pytest.mark.parametrize("canon", [(b"relaxed", b"relaxed"), (b"simple", b"simple"),
                                   (b"relaxed", b"simple")])
def test_rsa_signature_passes(tmp_path, rsa_key, canon):
    pem, record = rsa_key
    signed = sign(MESSAGE, pem, canonicalize=canon)
    r = only(verify(tmp_path, signed, {"sel._domainkey.example.org": record}))
    assert (r.result, r.reason) == ("pass", "signature verified")
    assert (r.domain, r.selector, r.algorithm, r.identity) == (
        "example.org", "sel", "rsa-sha256", "@example.org")
    assert r.body_length is None
    b = re.search(rb"b=([^;]*)$", signed.split(b"\r\nFrom:")[0]).group(1)
    assert len(r.header_b) >= 8 and re.sub(rb"\s", b"", b).decode().startswith(r.header_b)


def test_ed25519_signature_passes(tmp_path, ed_key):
    pytest.importorskip("nacl", reason="dkimpy signs Ed25519 with PyNaCl")
    seed, record = ed_key
    signed = sign(MESSAGE, seed, selector=b"ed", signature_algorithm=b"ed25519-sha256")
    r = only(verify(tmp_path, signed, {"ed._domainkey.example.org": record}))
    assert (r.result, r.algorithm) == ("pass", "ed25519-sha256")
    tampered = signed.replace(b"noon", b"nine")
    r = only(verify(tmp_path, tampered, {"ed._domainkey.example.org": record}))
    assert (r.result, r.reason) == ("fail", "body hash mismatch")


RFC8463_MESSAGE = b"\r\n".join([
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
    b" d=football.example.com; i=@football.example.com;",
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
    b" subject : date : message-id : from : subject : date;",
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;",
    b" d=football.example.com; i=@football.example.com;",
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :",
    b" date : message-id : from : subject : date;",
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3",
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz",
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=",
    b"From: Joe SixPack <joe@football.example.com>",
    b"To: Suzie Q <suzie@shopping.example.net>",
    b"Subject: Is dinner ready?",
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>",
    b"",
    b"Hi.",
    b"",
    b"We lost the game.  Are you hungry yet?",
    b"",
    b"Joe.",
    b""])
RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com":
        b"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
    "test._domainkey.football.example.com":
        b"v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
        b"iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
        b"DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
        b"Ip3G+2kryOTIKT+l/K4w3QIDAQAB",
}


def test_rfc8463_example_verifies(tmp_path):
    """The signed message of RFC 8463 Appendix A: another implementation's Ed25519 and
    RSA signatures over the same body."""
    assert key_names(RFC8463_MESSAGE) == list(RFC8463_KEYS)
    results, arc = verify(tmp_path, RFC8463_MESSAGE, RFC8463_KEYS)
    assert [(r.result, r.algorithm, r.selector) for r in results] == [
        ("pass", "ed25519-sha256", "brisbane"), ("pass", "rsa-sha256", "test")]
    assert results[0].header_b == "/gCrinpc" and results[1].header_b == "F45dVWDf"
    assert arc.result == "none"
    # 1024-bit RSA is below a stricter minimum: RFC 8301 lets us refuse it.
    results, _ = verify(tmp_path, RFC8463_MESSAGE, RFC8463_KEYS, min_rsa_bits=2048)
    assert [r.result for r in results] == ["pass", "policy"]
    assert results[1].reason == "key too short (1024 bits)"
    results, _ = verify(tmp_path, RFC8463_MESSAGE.replace(b"Joe.", b"Jim."), RFC8463_KEYS)
    assert [(r.result, r.reason) for r in results] == [("fail", "body hash mismatch")] * 2


# -- DKIM: changes, keys, DNS ------------------------------------------------------------

def test_changed_body_or_header_fails(tmp_path, rsa_key):
    pem, record = rsa_key
    keys = {"sel._domainkey.example.org": record}
    for canon in [(b"relaxed", b"relaxed"), (b"simple", b"simple")]:
        signed = sign(MESSAGE, pem, canonicalize=canon)
        r = only(verify(tmp_path, signed.replace(b"noon", b"noom"), keys))
        assert (r.result, r.reason) == ("fail", "body hash mismatch")
        r = only(verify(tmp_path, signed.replace(b"lunch", b"dinner"), keys))
        assert (r.result, r.reason) == ("fail", "signature did not verify")
        # A From field added on top of the signed one (RFC 6376 8.15).
        r = only(verify(tmp_path, signed.replace(b"From: Alice",
                                                 b"From: Mallory <m@evil.example>\r\nFrom: Alice"),
                        keys))
        assert r.result == "fail"
    # Whitespace changes survive relaxed but not simple canonicalization.
    relaxed = sign(MESSAGE, pem)
    assert only(verify(tmp_path, relaxed.replace(b"Hello Bob,", b"Hello   Bob,"), keys)).result == "pass"
    simple = sign(MESSAGE, pem, canonicalize=(b"simple", b"simple"))
    assert only(verify(tmp_path, simple.replace(b"Hello Bob,", b"Hello   Bob,"), keys)).result == "fail"
    # Unsigned fields may be added.
    assert only(verify(tmp_path, b"X-Extra: 1\r\n" + relaxed, keys)).result == "pass"


def test_key_record_missing_or_dns_error(tmp_path, rsa_key):
    pem, record = rsa_key
    signed = sign(MESSAGE, pem)
    r = only(verify(tmp_path, signed, {"sel._domainkey.example.org": None}))
    assert (r.result, r.reason, r.domain) == ("permerror", "key not found", "example.org")
    r = only(verify(tmp_path, signed, {"sel._domainkey.example.org": "error"}))
    assert (r.result, r.reason) == ("temperror", "key lookup failed (DNS error)")
    r = only(verify(tmp_path, signed, {}))
    assert r.result == "temperror"
    # A record given as text works like bytes.
    r = only(verify(tmp_path, signed, {"sel._domainkey.example.org": record.decode()}))
    assert r.result == "pass"


def test_bad_key_records(tmp_path, rsa_key, ed_key):
    pem, record = rsa_key
    p = record.split(b"p=")[1]
    signed = sign(MESSAGE, pem)
    cases = [
        (b"v=DKIM1; k=rsa; p=", "permerror", "key revoked"),
        (b"v=DKIM1; k=rsa", "permerror", "malformed key record (no p=)"),
        (b"not a key record", "permerror", "malformed key record"),
        (b"v=DKIM2; p=" + p, "permerror", "bad key record version"),
        (b"v=DKIM1; k=dsa; p=" + p, "permerror", "unknown key type"),
        (ed_key[1], "permerror", "key type does not match a="),
        (b"v=DKIM1; h=sha1; p=" + p, "permerror", "hash algorithm not allowed by key"),
        (b"v=DKIM1; s=tlsrpt; p=" + p, "permerror", "key not for email"),
        (b"v=DKIM1; p=AAAA" + p, "permerror", "malformed public key"),
        (b"v=DKIM1; p=%%%", "permerror", "malformed public key"),
        (b"v=DKIM1; h=sha1:sha256; s=email:*; t=y; p=" + p, "pass", "signature verified"),
        (b"v=DKIM1; t=s; p=" + p, "pass", "signature verified"),   # i=@example.org
    ]
    for key, result, reason in cases:
        r = only(verify(tmp_path, signed, {"sel._domainkey.example.org": key}))
        assert (r.result, r.reason) == (result, reason), key
    r = only(verify(tmp_path, signed, {"sel._domainkey.example.org": record}, min_rsa_bits=4096))
    assert (r.result, r.reason) == ("policy", "key too short (2048 bits)")
    sub = dkim.sign(MESSAGE, b"sel", b"example.org", pem, identity=b"@sub.example.org",
                    canonicalize=(b"relaxed", b"relaxed")) + MESSAGE
    assert only(verify(tmp_path, sub, {"sel._domainkey.example.org": record})).result == "pass"
    r = only(verify(tmp_path, sub, {"sel._domainkey.example.org": b"t=s; p=" + p}))
    assert r.result == "permerror"


def test_length_limited_signature_covers_only_its_part(tmp_path, rsa_key):
    pem, record = rsa_key
    keys = {"sel._domainkey.example.org": record}
    signed = sign(MESSAGE, pem, length=True)
    canonical = Relaxed.canonicalize_body(MESSAGE.split(b"\r\n\r\n", 1)[1])
    appended = signed + b"--\r\nUnsubscribe: https://lists.example.net/\r\n"
    r = only(verify(tmp_path, appended, keys))
    assert (r.result, r.body_length) == ("pass", len(canonical))
    assert r.body_length < len(appended.split(b"\r\n\r\n", 1)[1])
    # Changing the signed part still fails; cutting the body below l= fails.
    r = only(verify(tmp_path, appended.replace(b"noon", b"nine"), keys))
    assert (r.result, r.reason) == ("fail", "body hash mismatch")
    r = only(verify(tmp_path, signed.replace(b"shall we meet\tat noon?\r\n", b""), keys))
    assert (r.result, r.reason, r.body_length) == ("fail", "body shorter than l=", len(canonical))
    simple = sign(MESSAGE, pem, length=True, canonicalize=(b"simple", b"simple"))
    r = only(verify(tmp_path, simple + b"appended\r\n", keys))
    assert r.result == "pass"
    assert r.body_length == len(Simple.canonicalize_body(MESSAGE.split(b"\r\n\r\n", 1)[1]))


def test_two_signatures_one_broken(tmp_path, rsa_key, ed_key):
    pem, record = rsa_key
    other_pem, other_record = _rsa_pair(1024)
    signed = sign(MESSAGE, pem)
    signed = dkim.sign(signed, b"s2", b"example.net", other_pem) + signed
    keys = {"sel._domainkey.example.org": record, "s2._domainkey.example.net": other_record}
    assert sorted(key_names(signed)) == sorted(keys)
    results, _ = verify(tmp_path, signed, keys)
    assert [(r.result, r.domain) for r in results] == [("pass", "example.net"),
                                                      ("pass", "example.org")]
    at = signed.index(b" b=") + 3   # the first signature's b=
    broken = signed[:at] + (b"B" if signed[at:at + 1] != b"B" else b"C") + signed[at + 1:]
    results, _ = verify(tmp_path, broken, keys)
    assert [(r.result, r.domain, r.reason) for r in results] == [
        ("fail", "example.net", "signature did not verify"),
        ("pass", "example.org", "signature verified")]
    assert results[0].header_b != results[1].header_b


def _field(signed: bytes) -> bytes:
    return signed[:signed.index(b"\r\nFrom:") + 2]


@pytest.mark.parametrize("change,result,reason", [
    ((rb"\bbh=[^;]*;", b""), "permerror", "missing bh= tag"),
    ((rb"\ba=rsa-sha256", b"a=rsa-md5"), "permerror", "unknown algorithm"),
    ((rb"\ba=rsa-sha256", b"a=rsa-sha1"), "policy", "rsa-sha1 not accepted (RFC 8301)"),
    ((rb"\bv=1", b"v=2"), "permerror", "unsupported version"),
    ((rb"\bbh=", b"bh=!!!"), "permerror", "bad base64 in bh="),
    ((rb"\bb=", b"b=*"), "permerror", "bad base64 in b="),
    ((rb"\bh=[^;]*;", b"h=to : subject;"), "permerror", "From field not signed"),
    ((rb"\bd=example.org", b"d=exa mple.org"), "permerror", "bad d= or s= value"),
    ((rb"\bi=@example.org", b"i=@evil.example"), "permerror", "i= not within d="),
    ((rb"\bq=dns/txt", b"q=http"), "permerror", "unsupported q= method"),
    ((rb"\bc=relaxed/relaxed", b"c=fancy/relaxed"), "permerror", "bad c= value fancy"),
    ((rb"\bt=(\d+)", b"t=\\1; x=1000"), "permerror", "x= before t="),
    ((rb"\bt=(\d+)", b"x=1000"), "fail", "signature expired"),
    ((rb"\bt=(\d+)", b"t=\\1; l=12x"), "permerror", "bad l= value"),
    ((rb"\bs=sel;", b"s=sel; s=again;"), "permerror", "malformed tag list"),
])
def test_malformed_signature_fields(tmp_path, rsa_key, change, result, reason):
    pem, record = rsa_key
    signed = sign(MESSAGE, pem)
    field = _field(signed)
    bad = re.sub(change[0], change[1], field, count=1)
    assert bad != field
    r = only(verify(tmp_path, bad + MESSAGE, {"sel._domainkey.example.org": record}))
    assert (r.result, r.reason) == (result, reason)


def test_garbage_signatures_never_raise(tmp_path, rsa_key):
    pem, record = rsa_key
    rng = random.Random(7)
    field = _field(sign(MESSAGE, pem))
    garbage = [b"DKIM-Signature: this is not a tag list\r\n", b"DKIM-Signature:\r\n",
               b"DKIM-Signature: ;;;=\r\n", b"DKIM-Signature: v=1; a=rsa-sha256; d=\xff\xfe; s=x\r\n"]
    for _ in range(150):
        chars = bytearray(field)
        for _ in range(rng.randint(1, 6)):
            chars[rng.randrange(15, len(chars) - 2)] = rng.choice(b"=;: \t\r\nab0+/\x00\xff")
        garbage.append(bytes(chars))
    for g in garbage:
        results, arc = verify(tmp_path, g + MESSAGE, {"sel._domainkey.example.org": record})
        assert len(results) == 1 and arc.result == "none"
        assert results[0].result in ("pass", "fail", "permerror", "policy", "temperror")
    r = only(verify(tmp_path, garbage[0] + MESSAGE, {}))
    assert (r.result, r.domain, r.reason) == ("permerror", "", "malformed tag list")
    r = only(verify(tmp_path, garbage[3] + MESSAGE, {}))
    assert r.result == "permerror"


def test_no_signature_and_limits(tmp_path, rsa_key):
    pem, record = rsa_key
    keys = {"sel._domainkey.example.org": record}
    assert verify(tmp_path, MESSAGE, keys) == (
        [], ARCResult("none", 0, (), "no ARC header fields"))
    field = _field(sign(MESSAGE, pem))
    results, _ = verify(tmp_path, field * 12 + MESSAGE, keys)
    assert [r.result for r in results] == ["pass"] * 10 + ["policy"] * 2
    assert results[-1].reason == "too many signatures"
    results, _ = verify(tmp_path, field * 30 + MESSAGE, keys)
    assert [r.result for r in results] == ["pass"] * 10 + ["policy"] * 10
    # A header section past the cap: signatures cannot be checked.
    big = field + b"".join(b"Received: from host%d\r\n" % i for i in range(MAX_HEADER // 20))
    results, _ = verify(tmp_path, big + MESSAGE, keys)
    assert [(r.result, r.reason) for r in results] == [("permerror", "header section too large")]
    path = tmp_path / "big"
    path.write_bytes(big + MESSAGE)
    block = read_header_block(path)
    assert len(block) <= MAX_HEADER and block.endswith(b"\r\n") and block.startswith(field)
    # Message without a body at all.
    assert only(verify(tmp_path, field + MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n", keys)).result == "fail"


def test_key_names(rsa_key):
    pem, _ = rsa_key
    fields = b"".join(dkim.sign(MESSAGE, b"S%d" % (i % 3), b"Example.ORG", pem)
                      for i in range(4))
    fields += b"DKIM-Signature: v=1; s=bad name; d=example.org\r\nDKIM-Signature: junk\r\n"
    fields += (b"ARC-Seal: i=2; a=rsa-sha256; cv=pass; d=b.example; s=k2; b=x\r\n"
               b"ARC-Message-Signature: i=2; a=rsa-sha256; d=b.example; s=m2; h=from; bh=x; b=x\r\n"
               b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=a.example; s=k1; b=x\r\n"
               b"ARC-Message-Signature: i=1; a=rsa-sha256; d=a.example; s=m1; h=from; bh=x; b=x\r\n")
    assert key_names(fields) == ["s0._domainkey.example.org", "s1._domainkey.example.org",
                                 "s2._domainkey.example.org", "m2._domainkey.b.example",
                                 "k2._domainkey.b.example", "k1._domainkey.a.example"]
    assert key_names(fields, include_arc=False) == key_names(fields)[:3]
    many = b"".join(b"DKIM-Signature: v=1; s=s%d; d=d%d.example\r\n" % (i, i) for i in range(30))
    assert len(key_names(many)) == dkimverify.MAX_SIGNATURES
    assert key_names(b"") == [] and key_names(b"\xff\x00garbage") == []


def test_streamed_body_canonicalization_matches_dkimpy():
    rng = random.Random(11)
    pieces = [b"", b" ", b"\t", b"a", b"b  c", b"x\t \t", b"  y", b".", b"\r\n", b"\r\n\r\n"]
    for _ in range(400):
        body = b"".join(rng.choice(pieces) + b"\r\n" for _ in range(rng.randint(0, 25)))
        for relaxed, ref in ((False, Simple), (True, Relaxed)):
            for limit in (None, 0, 7):
                h = dkimverify._LimitedHash("sha256", limit)
                c = dkimverify._BodyCanonicalizer(relaxed, [h])
                pos = 0
                while pos < len(body):
                    n = rng.randint(1, 9)
                    c.update(body[pos:pos + n])
                    pos += n
                c.finish()
                expected = ref.canonicalize_body(body)
                assert c.length == len(expected), body
                assert h.hash.digest() == hashlib.sha256(expected[:limit]).digest(), body


def test_large_body_is_streamed(tmp_path, rsa_key):
    """A 20 MB body signed by our own streamed signer verifies while only a small part of
    it is ever in memory."""
    pem, record = rsa_key
    (tmp_path / "key.pem").write_bytes(pem)
    key = DKIMKey("example.org", "big", tmp_path / "key.pem")
    body = tmp_path / "body"
    line = b"The quick  brown fox\tjumps over the lazy dog. " * 20 + b" \r\n"
    with open(body, "wb") as f:
        f.write(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
        block = line * (1024 * 1024 // len(line) + 1)
        for _ in range(20):
            f.write(block)
        f.write(b"\r\n" * 1000)
    size = body.stat().st_size
    assert size > 20 * 1024 * 1024
    field = sign_file(body, key)
    path = tmp_path / "signed"
    with open(path, "wb") as out, open(body, "rb") as f:
        out.write(field)
        while chunk := f.read(1 << 20):
            out.write(chunk)
    keys = {"big._domainkey.example.org": record}
    tracemalloc.start()
    try:
        results, _ = verify_file(path, keys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.result for r in results] == ["pass"]
    assert peak < 4 * 1024 * 1024, peak


# -- ARC --------------------------------------------------------------------------------

def seal(message: bytes, pem: bytes, domain: bytes, srv_id: bytes, results: bytes) -> bytes:
    message = b"Authentication-Results: " + srv_id + b"; " + results + b"\r\n" + message
    fields = dkim.arc_sign(message, b"arc", domain, pem, srv_id)
    assert len(fields) == 3
    return b"".join(fields) + message


def test_arc_chain(tmp_path, rsa_key):
    pytest.importorskip("authres", reason="dkimpy seals ARC sets with authres")
    pem, record = rsa_key
    signed = sign(MESSAGE, pem)
    hop1 = seal(signed, pem, b"lists.example.net", b"mx.lists.example.net",
                b"dkim=pass header.d=example.org; spf=pass smtp.mailfrom=example.org")
    keys = {"sel._domainkey.example.org": record, "arc._domainkey.lists.example.net": record,
            "arc._domainkey.relay.example.com": record}
    assert key_names(hop1) == ["sel._domainkey.example.org", "arc._domainkey.lists.example.net"]
    results, arc = verify(tmp_path, hop1, keys)
    assert [r.result for r in results] == ["pass"]
    assert (arc.result, arc.instances, arc.sealers) == ("pass", 1, ("lists.example.net",))
    assert arc.last_aar.startswith("i=1; mx.lists.example.net;")
    assert "dkim=pass header.d=example.org" in arc.last_aar

    # The list rewrites the body: DKIM breaks, the second hop's seal vouches for hop 1.
    changed = hop1.replace(b"noon?", b"noon?\r\n-- \r\nlist footer")
    hop2 = seal(changed, pem, b"relay.example.com", b"mx.relay.example.com",
                b"arc=pass smtp.remote-ip=192.0.2.1")
    results, arc = verify(tmp_path, hop2, keys)
    assert [r.result for r in results] == ["fail"]
    assert (arc.result, arc.instances) == ("pass", 2)
    assert arc.sealers == ("lists.example.net", "relay.example.com")
    assert arc.last_aar.startswith("i=2; mx.relay.example.com;")

    # A change after the last seal breaks the newest ARC-Message-Signature.
    results, arc = verify(tmp_path, hop2.replace(b"list footer", b"list f00ter"), keys)
    assert (arc.result, arc.instances) == ("fail", 2)
    assert "body hash mismatch" in arc.reason
    results, arc = verify(tmp_path, hop1.replace(b"lunch", b"brunch"), keys)
    assert arc.result == "fail"
    # A missing sealer key, a DNS error, or a missing ARC field fails the chain.
    arc = verify(tmp_path, hop2, {**keys, "arc._domainkey.lists.example.net": None})[1]
    assert arc.result == "fail"
    arc = verify(tmp_path, hop2, {**keys, "arc._domainkey.relay.example.com": "error"})[1]
    assert arc.result == "fail" and "DNS error" in arc.reason
    arc = verify(tmp_path, hop2, {"arc._domainkey.relay.example.com": record})[1]
    assert arc.result == "fail" and "not looked up" in arc.reason
    no_aar = re.sub(rb"ARC-Authentication-Results: i=1;.*?\r\n(?=\S)", b"", hop2, flags=re.S)
    assert no_aar != hop2
    arc = verify(tmp_path, no_aar, keys)[1]
    assert arc.result == "fail"
    # Not checked when asked not to.
    arc = verify(tmp_path, hop2, keys, check_arc=False)[1]
    assert arc.result == "none"


def test_arc_garbage(tmp_path):
    cases = [b"ARC-Seal: nonsense\r\n", b"ARC-Seal: i=1; cv=none; d=x.example\r\n",
             b"ARC-Seal: i=99; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AAAA\r\n",
             b"ARC-Message-Signature: i=1; a=rsa-sha256; h=from; d=x.example; s=s; bh=AA; b=AA\r\n"
             b"ARC-Authentication-Results: i=1; x.example; none\r\n"
             b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n"]
    for fields in cases:
        results, arc = verify(tmp_path, fields + MESSAGE, {"s._domainkey.x.example": None})
        assert results == [] and arc.result == "fail", (fields, arc)


# -- the reactor side -------------------------------------------------------------------

def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


def result_of(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def test_verify_message_with_resolver(tmp_path, rsa_key):
    pem, record = rsa_key
    path = tmp_path / "m"
    path.write_bytes(sign(MESSAGE, pem))
    name = "sel._domainkey.example.org"
    resolver = StaticResolver({(name, "TXT"): Answer("ok", (b"v=spf1 -all", record))})
    results, arc = result_of(verify_message(resolver, path, run_now))
    assert [r.result for r in results] == ["pass"] and arc.result == "none"
    assert resolver.asked == [(name, "TXT")]
    results, _ = result_of(verify_message(StaticResolver({}), path, run_now))
    assert [(r.result, r.reason) for r in results] == [("permerror", "key not found")]
    resolver = StaticResolver({(name, "TXT"): Answer("error", detail="timeout")})
    results, _ = result_of(verify_message(resolver, path, run_now))
    assert [r.result for r in results] == ["temperror"]


def test_pick_key_record():
    assert pick_key_record((b"v=spf1 -all", b"v=DKIM1; p=AB", b"p=CD")) == b"v=DKIM1; p=AB"
    assert pick_key_record((b"k=rsa; p=CD",)) == b"k=rsa; p=CD"
    assert pick_key_record((b"hello",)) == b"hello"
    assert pick_key_record(()) is None


class VerifyMessageInThreads(unittest.TestCase):
    def setUp(self) -> None:
        self.pem, self.record = _rsa_pair(1024)
        self.dir = Path(tempfile.mkdtemp(prefix="dkimverify-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = self.dir / "signed"
        self.path.write_bytes(sign(MESSAGE, self.pem))

    @defer.inlineCallbacks
    def test_deferToThread(self):
        resolver = StaticResolver({("sel._domainkey.example.org", "TXT"):
                                   Answer("ok", (self.record,))})
        results, arc = yield verify_message(resolver, self.path, deferToThread)
        self.assertEqual([(r.result, r.domain) for r in results], [("pass", "example.org")])
        self.assertEqual(arc.result, "none")

    @defer.inlineCallbacks
    def test_unexpected_failure_is_temperror(self):
        results, arc = yield verify_message(StaticResolver({}), self.dir / "missing",
                                            deferToThread)
        self.assertEqual([r.result for r in results], ["temperror"])
        self.assertEqual(arc.result, "none")
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)

        class Broken:
            def txt(self, name):
                raise RuntimeError("resolver bug")

        results, _ = yield verify_message(Broken(), self.path, deferToThread)
        self.assertEqual([(r.result, r.reason) for r in results],
                         [("temperror", "key lookup failed (DNS error)")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def test_keyed_fields_read_as_the_full_parser_does():
    """key_names() finds the key-naming fields without splitting the whole header; on
    every odd block (folding, bare LF, stray CR, blank line, junk lines) it must read the
    same fields with the same values as parse_header_block()."""
    def full(block):
        return [(n.lower(), dkimverify._NEWLINE.sub(b"", v)) for n, v in dkimverify.parse_header_block(block)
                if n.lower() in (b"dkim-signature", b"arc-seal", b"arc-message-signature")]

    pieces = [b"DKIM-Signature: v=1; d=a.b; s=x;", b"dkim-signature:d=c.d; s=y", b" b=abc;",
              b"\tbh=xyz", b"ARC-Seal: i=1; d=e.f; s=z", b"arc-message-signature: i=2; s=w",
              b"X: y", b"garbage", b" ", b"DKIM-Signature : v=1", b"\t", b"Dkim-Signature:\r",
              b"\r", b" a\rb", b""]
    rng = random.Random(5)
    for _ in range(20000):
        block = rng.choice([b"\r\n", b"\n"]).join(rng.choice(pieces)
                                                  for _ in range(rng.randint(0, 8)))
        fast = [(n, dkimverify._NEWLINE.sub(b"", v)) for n, v in dkimverify._keyed_fields(block)]
        assert fast == full(block), block


def test_relaxed_header_canonicalization_equals_dkimpy():
    """RFC 6376 3.4.2 as dkimpy does it, on random names and values (folds, tabs, runs)."""
    rng = random.Random(2)
    chars = [b"a", b"B", b" ", b"\t", b"\r\n", b"\n", b"\r", b"x", b"  "]
    for _ in range(20000):
        name = b"".join(rng.choice([b"Sub", b"J", b" ", b"\t"]) for _ in range(rng.randint(1, 3)))
        value = b"".join(rng.choice(chars) for _ in range(rng.randint(0, 10)))
        assert dkimverify._relaxed_headers([(name, value)]) == [
            tuple(x) for x in Relaxed.canonicalize_headers([(name, value)])]


def test_an_oversized_arc_field_fails_the_chain_without_hashing_it():
    """dkimpy's b= regex is quadratic in folding whitespace: a 60 KB ARC-Message-Signature
    would hold a worker for seconds (minutes at the header cap)."""
    import time

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mailserver.inbound.dkimverify import MAX_ARC_FIELD, key_names, verify_file

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    msg = (b"From: ceo@bank.example\r\nTo: alice@example.test\r\nSubject: pay\r\n"
           b"Authentication-Results: lists.example; spf=pass\r\n\r\nbody\r\n")
    signed = b"".join(dkim.arc_sign(msg, b"sel", b"lists.example", pem, b"lists.example")) + msg
    end = signed.index(b"\r\nARC-Authentication-Results",
                       signed.index(b"ARC-Message-Signature:"))
    bloated = signed[:end] + b"\r\n " * 20000 + b";" + signed[end:]
    header = bloated.split(b"\r\n\r\n")[0] + b"\r\n"
    started = time.monotonic()
    _, arc = verify_file(bloated, {name: None for name in key_names(header)})
    assert time.monotonic() - started < 5   # about 15 s before the bound
    assert arc.result == "fail"
    assert f"over {MAX_ARC_FIELD} bytes" in arc.reason
