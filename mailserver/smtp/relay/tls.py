"""Client TLS for the relay: opportunistic (RFC 3207, RFC 7435) or verified.

Opportunistic TLS encrypts whenever the peer offers STARTTLS but never refuses a peer for
its certificate: most MX certificates cannot be authenticated without DANE or MTA-STS, and
refusing them would only push the mail into plaintext.  The verification result is still
computed and logged.  Verified TLS (TLS-required domains, the smart host) checks the chain
against `[relay].ca_file` or the system store, and the host name (service_identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


@dataclass
class VerifyRecord:
    """What an opportunistic handshake found wrong with the peer's certificate."""

    errors: list[str] = field(default_factory=list)

    def problem(self, hostname: str, connection: Any) -> str | None:
        """None if the certificate verified for `hostname`, else a one-line reason."""
        if self.errors:
            return "; ".join(dict.fromkeys(self.errors))
        try:
            from service_identity import VerificationError
            from service_identity.pyopenssl import verify_hostname
        except ImportError:  # pragma: no cover - service_identity is a dependency
            return None
        try:
            verify_hostname(connection, hostname)
        except VerificationError as e:
            return f"certificate does not match {hostname}: {e}"
        except Exception as e:  # a certificate service_identity cannot read
            return f"certificate name check failed: {e}"
        return None


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticTLS:
    """Accepts any certificate, records why it would not verify; SNI set to the host."""

    def __init__(self, hostname: str, ca_file: str = "") -> None:
        self.hostname = hostname
        self.record = VerifyRecord()
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_options(SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_COMPRESSION)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.set_default_verify_paths()
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
        if not ok:
            self.record.errors.append(
                f"{crypto.X509.get_subject(cert).CN or 'certificate'} (depth {depth}): "
                f"{_verify_error(errno)}")
        return True  # opportunistic: encrypt anyway

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        try:
            conn.set_tlsext_host_name(self.hostname.encode("idna"))
        except (UnicodeError, ValueError):
            pass
        conn.set_connect_state()
        return conn


# The X509_V_ERR_* codes an MX certificate commonly fails with.
_VERIFY_ERRORS = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    62: "host name mismatch",
}


def _verify_error(errno: int) -> str:
    return _VERIFY_ERRORS.get(errno, f"verify error {errno}")


def verified_tls(hostname: str, ca_file: str = "") -> IOpenSSLClientConnectionCreator:
    """A creator that fails the handshake unless the chain and `hostname` verify."""
    if ca_file:
        pem = Path(ca_file).read_bytes()
        certs = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(pem)]
        if not certs:
            raise ValueError(f"no certificate in {ca_file}")
        trust = ssl.trustRootFromCertificates(certs)
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(hostname, trustRoot=trust)


def _pem_blocks(pem: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    out, pos = [], 0
    while (start := pem.find(begin, pos)) >= 0:
        stop = pem.find(end, start)
        if stop < 0:
            break
        out.append(pem[start:stop + len(end)])
        pos = stop + len(end)
    return out
