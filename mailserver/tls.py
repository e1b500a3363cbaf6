"""Certificate loading/generation and the server TLS context (TLS 1.2 minimum).

With no certificate configured, a self-signed pair for the hostname is generated into
state_dir on first start and reused afterwards, so a fresh install offers STARTTLS at once.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IProtocolNegotiationFactory, ISSLTransport

from mailserver.certfiles import CertificatePair, load_pair
from mailserver.config import Config
from mailserver.fsutil import write_durably

# Forward-secret AEAD suites only; TLS 1.3 suites are always on and not affected.
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


@dataclass(frozen=True)
class CertificatePaths:
    certificate: Path
    private_key: Path
    generated: bool


def certificate_paths(config: Config) -> CertificatePaths:
    """The PEM files to serve: configured ones, or the generated pair in state_dir."""
    if config.tls.certificate:
        return CertificatePaths(Path(config.tls.certificate), Path(config.tls.private_key), False)
    tls_dir = config.state_dir / "tls"
    return CertificatePaths(tls_dir / "cert.pem", tls_dir / "key.pem", True)


def ensure_certificate(config: Config) -> CertificatePaths:
    """Generate the self-signed pair when none is configured and none exists yet."""
    paths = certificate_paths(config)
    if paths.generated and not (paths.certificate.exists() and paths.private_key.exists()):
        generate_self_signed(config.server.hostname, paths.certificate, paths.private_key)
    return paths


def generate_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    san: list[x509.GeneralName] = [x509.DNSName(hostname)]
    try:
        san = [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        pass
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    write_durably(key_path, key_bytes, mode=0o600)
    write_durably(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def server_context_factory(paths: CertificatePaths) -> ssl.CertificateOptions:
    """CertificateOptions for every TLS listener: TLS 1.2+, modern ciphers, full chain."""
    return certificate_options(load_pair(paths.certificate, paths.private_key))


def certificate_options(pair: CertificatePair) -> ssl.CertificateOptions:
    """The TLS settings of every listener (TLS 1.2+, modern ciphers) for one checked pair,
    its whole chain sent."""
    key = crypto.PKey.from_cryptography_key(pair.key)
    certs = [crypto.X509.from_cryptography(c) for c in (pair.leaf, *pair.chain)]
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
    )


def server_context(pair: CertificatePair) -> SSL.Context:
    """The OpenSSL context of certificate_options(pair), with alpn_select for ALPN."""
    context = certificate_options(pair).getContext()
    context.set_alpn_select_callback(alpn_select)
    return context


def alpn_select(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """RFC 7301 3.2: the first protocol the listener's factory speaks that the client
    offered; when there is none, no ALPN answer and the handshake goes on.  (Twisted's
    own callback answers b"" then, which OpenSSL turns into a fatal alert: an IMAPS
    client offering "imap", or a browser offering only "h2", could not connect.)
    The connection's app data is its TLS protocol (serverConnectionForTLS sets it)."""
    tls = connection.get_app_data()
    factory = getattr(getattr(tls, "factory", None), "wrappedFactory", None)
    if IProtocolNegotiationFactory.providedBy(factory):
        for protocol in factory.acceptableProtocols():
            if protocol in offered:
                return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def describe_tls(transport: object) -> str | None:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for a TLS transport, None for a plain one."""
    if not ISSLTransport.providedBy(transport):
        return None
    try:
        conn = transport.getHandle()  # type: ignore[attr-defined]
        version, cipher = conn.get_protocol_version_name(), conn.get_cipher_name()
    except Exception:
        return "TLS"
    if not cipher:
        return "TLS"
    return f"{version} {cipher}"
