"""Certificate/key files: what is accepted, what is refused (and why, in one line), how a
change on disk is noticed, and how an obtained pair is stored."""

from __future__ import annotations

import datetime
import os
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailserver.certfiles import (MAX_PEM_BYTES, CertificateError, check_files, file_signature,
                                  load_pair, load_pair_or_previous, parse_pair, previous_key,
                                  write_pair)


def make_pem(cn: str = "mail.example.org", issuer_key=None) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(issuer_key or key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_a_chain_before_the_certificate_is_named_as_such():
    leaf, key = make_pem()
    intermediate, _ = make_pem("Intermediate CA")
    with pytest.raises(CertificateError, match="must come first"):
        parse_pair(intermediate + leaf, key)
    _, other_key = make_pem("other.example.org")
    with pytest.raises(CertificateError, match="does not belong"):
        parse_pair(leaf + intermediate, other_key)


def test_a_matching_pair_with_its_chain():
    leaf, key = make_pem()
    intermediate, _ = make_pem("Intermediate CA")
    pair = parse_pair(leaf + intermediate, key)
    assert pair.subject == "CN=mail.example.org"
    assert pair.names == ("mail.example.org",)
    assert len(pair.chain) == 1
    assert pair.describe().startswith("CN=mail.example.org, not after ")


def test_the_fingerprint_covers_the_chain():
    # a reload compares fingerprints: the same leaf with its intermediate added is new
    leaf, key = make_pem()
    intermediate, _ = make_pem("Intermediate CA")
    alone, chained = parse_pair(leaf, key), parse_pair(leaf + intermediate, key)
    assert alone.fingerprint != chained.fingerprint
    assert chained.fingerprint == parse_pair(leaf + intermediate, key).fingerprint


@pytest.mark.parametrize("case, message", [
    ("garbage certificate", "not a PEM certificate"),
    ("garbage key", "not a PEM private key"),
    ("other key", "does not belong to the certificate"),
    ("encrypted key", "encrypted keys are not supported"),
])
def test_unusable_pairs_are_refused_with_a_reason(case, message):
    cert, key = make_pem()
    _, other_key = make_pem()
    if case == "garbage certificate":
        cert = cert[:100]
    elif case == "garbage key":
        key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    elif case == "other key":
        key = other_key
    else:
        loaded = serialization.load_pem_private_key(key, None)
        key = loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(CertificateError, match=message):
        parse_pair(cert, key)


def test_missing_empty_and_oversized_files(tmp_path):
    cert, key = make_pem()
    (tmp_path / "key.pem").write_bytes(key)
    with pytest.raises(CertificateError, match="cert.pem"):
        load_pair(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "cert.pem").write_bytes(b"")
    with pytest.raises(CertificateError, match="empty"):
        load_pair(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "cert.pem").write_bytes(cert + b"\n" * MAX_PEM_BYTES)
    with pytest.raises(CertificateError, match="larger than"):
        load_pair(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_changes_are_seen_from_metadata(tmp_path):
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert, key = make_pem()
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    first = check_files(cert_path, key_path, None)
    assert first.pair is not None and first.error is None
    assert check_files(cert_path, key_path, first.signature).pair is None   # unchanged
    new_cert, new_key = make_pem("mail2.example.org")
    tmp = tmp_path / "new"
    tmp.write_bytes(new_cert)
    os.replace(tmp, cert_path)                       # a new inode: seen
    half = check_files(cert_path, key_path, first.signature)
    assert half.pair is None and "does not belong" in half.error
    key_path.write_bytes(new_key)                    # rewritten in place: size/mtime
    after = check_files(cert_path, key_path, half.signature)
    assert after.pair is not None and after.pair.subject == "CN=mail2.example.org"


def test_a_chain_cut_inside_a_certificate_is_refused():
    """The parser skips a block cut short: the intermediate would silently be gone."""
    leaf, key = make_pem()
    intermediate, _ = make_pem("Intermediate CA")
    whole = leaf + intermediate
    for cut in (len(leaf) + 40, len(whole) - 30, len(whole) - 5):
        with pytest.raises(CertificateError, match="cut short"):
            parse_pair(whole[:cut], key)
    assert len(parse_pair(whole, key).chain) == 1


def test_a_permission_change_is_a_change(tmp_path):
    """chmod/chgrp of a key that could not be read: only its ctime changes."""
    cert, key = make_pem()
    (tmp_path / "key.pem").write_bytes(key)
    before = file_signature(tmp_path / "key.pem")
    time.sleep(0.05)   # the kernel's ctime moves in clock ticks, not nanoseconds
    os.chmod(tmp_path / "key.pem", 0o640)
    assert file_signature(tmp_path / "key.pem") != before


def test_signature_of_a_missing_file(tmp_path):
    assert file_signature(tmp_path / "nope") == (None,)


def test_stored_pairs_are_private(tmp_path):
    cert, key = make_pem()
    target = tmp_path / "acme"
    write_pair(target / "certificate.pem", target / "private-key.pem", parse_pair(cert, key))
    for name in ("certificate.pem", "private-key.pem"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert load_pair(target / "certificate.pem", target / "private-key.pem").key_pem == key


def test_a_crash_between_key_and_certificate_keeps_the_old_pair_servable(tmp_path):
    """kill -9 after the new key is in place and before the new certificate: the old
    certificate with the old key (kept beside it) is what loads, not nothing."""
    cert_path, key_path = tmp_path / "certificate.pem", tmp_path / "private-key.pem"
    old_cert, old_key = make_pem("old.example.org")
    new_cert, new_key = make_pem("new.example.org")
    write_pair(cert_path, key_path, parse_pair(old_cert, old_key))
    assert not previous_key(key_path).exists()
    previous_key(key_path).write_bytes(old_key)   # what write_pair keeps first ...
    key_path.write_bytes(new_key)                  # ... then the new key: the crash here
    with pytest.raises(CertificateError, match="does not belong"):
        load_pair(cert_path, key_path)
    assert load_pair_or_previous(cert_path, key_path).subject == "CN=old.example.org"
    write_pair(cert_path, key_path, parse_pair(new_cert, new_key))   # the next renewal
    assert load_pair_or_previous(cert_path, key_path).subject == "CN=new.example.org"
    assert not previous_key(key_path).exists()
