"""PEM certificate/key pairs: read, checked, described and written, off the reactor.

A TLS listener is only ever given a pair that parses and whose key belongs to its
certificate.  Anything else (a half-written file while certbot renews, a key of another
certificate, an encrypted key) is refused here with a one-line reason, so a bad file never
replaces a certificate that works.  This module runs in threads: it imports nothing from
Twisted.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailserver.fsutil import unlink_quietly, write_durably

# A certificate chain or a key file is a few KB; a bigger file is not one of them.
MAX_PEM_BYTES = 1024 * 1024


class CertificateError(ValueError):
    """A pair that cannot be served; the message says why, in one line."""


@dataclass(frozen=True)
class CertificatePair:
    """A parsed, matching certificate chain (leaf first) and private key."""

    certificate_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: Any   # a cryptography private key

    @property
    def subject(self) -> str:
        return self.leaf.subject.rfc4514_string() or "(empty subject)"

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def names(self) -> tuple[str, ...]:
        """The DNS names the certificate is valid for (subjectAltName), lower case."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return ()
        return tuple(n.lower() for n in san.value.get_values_for_type(x509.DNSName))

    @property
    def fingerprint(self) -> str:
        """Of what a client is sent: the leaf and its chain.  Of the leaf alone, a chain
        put right under the same leaf (the intermediate forgotten, then added) read as
        unchanged, and clients kept failing to verify until a restart."""
        digest = hashlib.sha256()
        for certificate in (self.leaf, *self.chain):
            digest.update(certificate.public_bytes(serialization.Encoding.DER))
        return digest.hexdigest()

    def valid_at(self, when: datetime.datetime,
                 skew: datetime.timedelta = datetime.timedelta(0)) -> bool:
        """Whether `when` (aware) lies in the certificate's validity period, its start
        taken `skew` early (a CA whose clock runs ahead)."""
        return (self.leaf.not_valid_before_utc - skew <= when
                <= self.leaf.not_valid_after_utc)

    def describe(self) -> str:
        """'CN=mail.example.org, not after 2026-01-31 12:00:00 UTC'"""
        return f"{self.subject}, not after {self.not_after:%Y-%m-%d %H:%M:%S} UTC"


def parse_pair(certificate_pem: bytes, key_pem: bytes) -> CertificatePair:
    """The pair from PEM bytes; CertificateError when it cannot be served."""
    try:
        certificates = x509.load_pem_x509_certificates(certificate_pem)
    except ValueError as e:
        raise CertificateError(f"certificate: not a PEM certificate ({e})") from None
    # A block cut short (a file copied in place, a full disk) is skipped by the parser:
    # the chain would go out without its intermediate.
    begun = certificate_pem.count(b"-----BEGIN CERTIFICATE-----")
    if begun != len(certificates) or begun != certificate_pem.count(b"-----END CERTIFICATE-----"):
        raise CertificateError(f"certificate: {begun} certificate blocks begin, "
                               f"{len(certificates)} can be read: the file is cut short")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError("private key: encrypted keys are not supported") from None
    except Exception as e:  # ValueError, or cryptography's UnsupportedAlgorithm
        raise CertificateError(f"private key: not a PEM private key ({e})") from None
    leaf = certificates[0]
    mine = _public_der(key.public_key())
    if mine != _public_der(leaf.public_key()):
        if any(mine == _public_der(c.public_key()) for c in certificates[1:]):
            raise CertificateError("certificate: the server's own certificate must come "
                                   "first in the file, before the chain")
        raise CertificateError("the private key does not belong to the certificate")
    return CertificatePair(certificate_pem, key_pem, leaf, tuple(certificates[1:]), key)


def load_pair(certificate: Path, private_key: Path) -> CertificatePair:
    """Read and check the two files; CertificateError (naming the file) otherwise."""
    return parse_pair(_read(certificate), _read(private_key))


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise CertificateError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{path}: larger than {MAX_PEM_BYTES} bytes")
    if not data.strip():
        raise CertificateError(f"{path}: empty")
    return data


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


# (device, inode, size, mtime in ns) of each file, None for a file that is not there.
Signature = tuple[tuple[int, int, int, int, int] | None, ...]


def file_signature(*paths: Path) -> Signature:
    """What changes when a file is replaced or rewritten (symlinks followed, as certbot's
    live/ links are), without reading it."""
    out: list[tuple[int, int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        # ctime too: a chmod or chgrp that makes an unreadable key readable is a change
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


@dataclass(frozen=True)
class FileCheck:
    """What a look at the certificate files found: their signature, and the pair when they
    changed (or a reload was asked for), or why it cannot be used."""

    signature: Signature
    pair: CertificatePair | None = None
    error: str | None = None


def check_files(certificate: Path, private_key: Path, last: Signature | None) -> FileCheck:
    """Reload the pair if the files changed since `last` (None: reload anyway).  The
    signature is taken before reading, so a write that lands during the read is seen as
    a change on the next check."""
    signature = file_signature(certificate, private_key)
    if last is not None and signature == last:
        return FileCheck(signature)
    try:
        return FileCheck(signature, pair=load_pair(certificate, private_key))
    except CertificateError as e:
        return FileCheck(signature, error=str(e))


def previous_key(private_key: Path) -> Path:
    """Where write_pair keeps the key it replaces until the new certificate is in place."""
    return private_key.with_name(private_key.name + ".prev")


def write_pair(certificate: Path, private_key: Path, pair: CertificatePair) -> None:
    """Store the pair, both files 0600, the key first: a crash between the two leaves a
    mismatch that load_pair refuses, never a certificate served with a wrong key.  The
    key it replaces is kept (`previous_key`) until the certificate is written, so the
    old pair can still be served after such a crash (load_pair_or_previous)."""
    certificate.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = previous_key(private_key)
    # One kept from a crash before is the key of the certificate still in place: kept.
    if private_key.exists() and not previous.exists():
        write_durably(previous, private_key.read_bytes(), mode=0o600)
    write_durably(private_key, pair.key_pem, mode=0o600)
    write_durably(certificate, pair.certificate_pem, mode=0o600)
    unlink_quietly(previous)


def load_pair_or_previous(certificate: Path, private_key: Path) -> CertificatePair:
    """load_pair; when the key does not match because a crash came between write_pair's
    two files (new key, old certificate), the old pair from the key kept beside it."""
    try:
        return load_pair(certificate, private_key)
    except CertificateError:
        previous = previous_key(private_key)
        if not previous.exists():
            raise
        return load_pair(certificate, previous)
