"""ACME (RFC 8555): getting and renewing the server's certificate from a CA such as
Let's Encrypt, with the maintained `acme` library.

Everything here blocks (the library speaks HTTP with `requests`, and waits for the CA), so
it runs in a thread of its own and imports nothing from Twisted.  The reactor side
(mailserver.acme_service) decides when to run it; the challenges in progress are handed
to the listeners through a ChallengeBoard, which the reactor reads:

- http-01 (RFC 8555 8.3): the key authorization at
  http://<name>/.well-known/acme-challenge/<token> (listen.autoconfig_http);
- tls-alpn-01 (RFC 8737): a validation certificate for a TLS handshake that offers the
  "acme-tls/1" protocol with <name> as server name (listen.autoconfig).

The account key and the certificate with its key are kept in state_dir/acme/, all 0600
(with [storage] shared, in the shared root's .mailserver/acme/: mailserver.acme_shared).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailserver.certfiles import (CertificateError, CertificatePair, load_pair_or_previous,
                                  parse_pair, write_pair)
from mailserver.fsutil import write_durably

log = logging.getLogger(__name__)

HTTP01 = "http-01"
TLS_ALPN01 = "tls-alpn-01"
ACME_TLS_PROTOCOL = b"acme-tls/1"                                      # RFC 8737 6.2
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")      # RFC 8737 6.1

NETWORK_TIMEOUT = 30          # seconds per HTTP request to the CA
VALIDATION_TIMEOUT = 180.0    # seconds for the CA to validate every name of an order
FINALIZE_TIMEOUT = 120.0      # seconds for the CA to issue once the order is ready
POLL_SECONDS = 1.0
MAX_NAMES = 100               # Let's Encrypt's limit of names per certificate
REJECTED_IDENTIFIER = "urn:ietf:params:acme:error:rejectedIdentifier"

# Retries after a failed attempt: 5 minutes, doubling, at most 6 hours apart.
RETRY_FIRST = 300.0
RETRY_MAX = 6 * 3600.0


def retry_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1, 2, ...)."""
    return min(RETRY_FIRST * 2 ** max(0, failures - 1), RETRY_MAX)


@dataclass(frozen=True)
class AcmeSettings:
    directory: str           # the CA's directory URL
    email: str               # contact for the account; "" = none
    ca_bundle: str           # trust anchors for the CA's HTTPS; "" = the system's
    challenge: str           # HTTP01 or TLS_ALPN01
    store: Path              # state_dir/acme, or the shared root's (config.acme_dir)
    renew_before: float      # seconds before expiry
    user_agent: str = "mailserver-acme"
    shared: bool = False     # [storage] shared: other nodes use the store too (acme_shared)


@dataclass(frozen=True)
class AcmeNames:
    """The names to ask for, the server's host name first.  `required` ones are never
    left out of a certificate; the others (the autoconfig names derived from the local
    domains) are dropped from an order whose validation fails for them, so one domain
    without DNS does not keep the server from getting a certificate."""

    names: tuple[str, ...]
    required: frozenset[str]


# -- where certificates and the account key live ------------------------------------------

class AcmeStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.account_key_path = directory / "account-key.pem"
        self.certificate_path = directory / "certificate.pem"   # leaf and chain
        self.private_key_path = directory / "private-key.pem"

    def load_certificate(self) -> CertificatePair | None:
        """The stored certificate, or None when there is none (or it is unusable)."""
        if not (self.certificate_path.exists() and self.private_key_path.exists()):
            return None
        try:
            return load_pair_or_previous(self.certificate_path, self.private_key_path)
        except CertificateError as e:
            log.warning("acme: stored certificate not usable (%s); a new one is requested", e)
            return None

    def save_certificate(self, pair: CertificatePair) -> None:
        write_pair(self.certificate_path, self.private_key_path, pair)

    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key (ES256), generated on first use."""
        try:
            data = self.account_key_path.read_bytes()
        except FileNotFoundError:
            data = None
        if data is None:
            key = ec.generate_private_key(ec.SECP256R1())
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            written = write_durably(self.account_key_path, _key_pem(key), mode=0o600,
                                    keep_existing=True)
            if written:
                log.info("acme: account key generated in %s", self.account_key_path)
                return key
            data = self.account_key_path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.account_key_path}: not an EC account key")
        return key


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- challenges in progress, shared with the listeners -------------------------------------

@dataclass(frozen=True)
class PendingChallenge:
    kind: str                       # HTTP01 or TLS_ALPN01
    domain: str
    token: str
    key_authorization: str
    certificate: x509.Certificate | None = field(default=None, compare=False)  # tls-alpn-01
    key: Any = field(default=None, compare=False, repr=False)


class ChallengeBoard:
    """The challenges being validated now.  Written by the ACME thread, read by the
    listeners in the reactor; a lock keeps the two apart (lookups are dictionary reads)."""

    # Seconds between publishing an order's challenges and telling the CA they are ready:
    # none for this node's own listeners (mailserver.acme_shared waits for other nodes).
    publish_delay = 0.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: dict[str, PendingChallenge] = {}
        self._alpn: dict[str, PendingChallenge] = {}

    def publish(self, challenge: PendingChallenge) -> None:
        with self._lock:
            self._table(challenge.kind)[self._key(challenge)] = challenge

    def withdraw(self, challenge: PendingChallenge) -> None:
        with self._lock:
            table = self._table(challenge.kind)
            if table.get(self._key(challenge)) == challenge:
                del table[self._key(challenge)]

    def http01(self, token: str) -> str | None:
        """The key authorization to answer for `token`, while its challenge is on."""
        with self._lock:
            found = self._http.get(token)
        return found.key_authorization if found is not None else None

    def tls_alpn01(self, server_name: str) -> PendingChallenge | None:
        with self._lock:
            return self._alpn.get(server_name.lower().rstrip("."))

    def __len__(self) -> int:
        with self._lock:
            return len(self._http) + len(self._alpn)

    def _table(self, kind: str) -> dict[str, PendingChallenge]:
        return self._http if kind == HTTP01 else self._alpn

    @staticmethod
    def _key(challenge: PendingChallenge) -> str:
        return challenge.token if challenge.kind == HTTP01 else challenge.domain


def tls_alpn01_certificate(domain: str, key_authorization: str
                           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """RFC 8737 3: a self-signed certificate for exactly `domain`, with the critical
    acmeIdentifier extension holding the SHA-256 digest of the key authorization."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        # extnValue: the DER OCTET STRING of the 32-byte digest (RFC 8737 3)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _register_tls_alpn01() -> None:
    """acme 3+ no longer ships a tls-alpn-01 challenge class; without one the library
    hands it over as UnrecognizedChallenge.  Registered under the same type name, it is
    parsed like http-01 (token, key authorization, and the empty response object)."""
    if TLS_ALPN01 in challenges.Challenge.TYPES:
        return

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        typ = TLS_ALPN01

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        typ = TLS_ALPN01
        response_cls = TLSALPN01Response

        def validation(self, account_key: jose.JWK, **unused: Any) -> str:
            return self.key_authorization(account_key)


_register_tls_alpn01()


# -- when a certificate is needed -------------------------------------------------------------

def renewal_reason(current: CertificatePair | None, wanted: AcmeNames,
                   now: datetime.datetime, renew_before: float) -> tuple[str, bool] | None:
    """(why a new certificate is needed, whether the current one is due), or None.

    Due: none yet, or less than `renew_before` seconds left.  Not due but worth asking
    for: names wanted that the certificate does not cover (a new local domain)."""
    if current is None:
        return "no certificate yet", True
    renew_at = current.not_after - datetime.timedelta(seconds=renew_before)
    if now >= renew_at:
        return f"it expires {current.not_after:%Y-%m-%d %H:%M} UTC", True
    missing = [n for n in wanted.names if n not in current.names]
    if missing:
        return f"names not covered yet: {', '.join(missing)}", False
    return None


# -- the protocol ---------------------------------------------------------------------------------

class Cancelled(Exception):
    """The server is stopping."""


class ValidationFailed(Exception):
    """The CA could not validate some names; `names` are those, the message says why."""

    def __init__(self, names: list[str], details: list[str]) -> None:
        super().__init__("; ".join(details))
        self.names = names


@dataclass(frozen=True)
class Outcome:
    """What a check did: the certificate to serve (new or the stored one), whether it was
    just issued and for which names, and a note for the log."""

    pair: CertificatePair | None
    issued: bool = False
    names: tuple[str, ...] = ()
    reason: str = ""
    note: str = ""
    busy: bool = False   # another node holds the order lock: try again later


def ensure_certificate(settings: AcmeSettings, wanted: AcmeNames, board: ChallengeBoard,
                       cancel: threading.Event, now: datetime.datetime | None = None) -> Outcome:
    """Issue or renew when renewal_reason says so; otherwise return the stored one.
    Raises on a failure the caller should retry (network, CA, validation)."""
    store = AcmeStore(settings.store)
    current = store.load_certificate()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if len(wanted.names) > MAX_NAMES:
        # Cut before the comparison too: the names past the limit would otherwise never
        # be covered, and every check would order a new certificate for nothing.
        log.warning("acme: %d names wanted, asking for the first %d", len(wanted.names),
                    MAX_NAMES)
        wanted = AcmeNames(wanted.names[:MAX_NAMES], wanted.required)
    why = renewal_reason(current, wanted, now, settings.renew_before)
    if why is None:
        return Outcome(current)
    reason, due = why
    names = list(wanted.names)
    try:
        pair = issue(settings, names, board, cancel)
    except ValidationFailed as e:
        optional = [n for n in e.names if n not in wanted.required]
        if not due:
            # The certificate still has time: keep it, and try the new names again at
            # the next check rather than at once (the CA counts failed validations).
            return Outcome(current, note=f"names {', '.join(e.names)} not validated ({e}); "
                                         f"keeping the current certificate")
        if not optional or len(optional) < len(e.names):
            raise
        names = [n for n in names if n not in optional]
        log.warning("acme: leaving %s out of the certificate for now: %s",
                    ", ".join(optional), e)
        pair = issue(settings, names, board, cancel)
    store.save_certificate(pair)
    return Outcome(pair, issued=True, names=tuple(names), reason=reason)


def issue(settings: AcmeSettings, names: list[str], board: ChallengeBoard,
          cancel: threading.Event) -> CertificatePair:
    """One order (RFC 8555 7.4) for `names`: a new key, each authorization answered with
    the configured challenge, then finalized with a CSR.  Returns the new pair."""
    account_key = jose.JWKEC(key=AcmeStore(settings.store).account_key())
    acme = _client(settings, account_key)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = _key_pem(key)
    try:
        order = acme.new_order(crypto_util.make_csr(key_pem, names))
    except messages.Error as e:
        if e.typ != REJECTED_IDENTIFIER:
            raise
        # RFC 8555 6.7: the CA will not issue for some names (Let's Encrypt: a name
        # under no public suffix, "corp.lan"); its subproblems say which (6.7.1).
        # Without them, the names the detail quotes (what Let's Encrypt and pebble write).
        rejected = [sub.identifier.value for sub in (e.subproblems or ())
                    if sub.identifier is not None and sub.identifier.value in names]
        rejected = rejected or [n for n in names if f'"{n}"' in (e.detail or "")]
        raise ValidationFailed(rejected or names, [str(e)]) from None
    published: list[PendingChallenge] = []
    try:
        answers: list[messages.ChallengeBody] = []
        for authz in order.authorizations:
            _check_cancel(cancel)
            if authz.body.status == messages.STATUS_VALID:
                continue   # RFC 8555 7.1.4: an authorization the CA still holds valid
            challenge_body = _offered(authz, settings.challenge)
            pending = _pending(challenge_body, authz.body.identifier.value, account_key)
            board.publish(pending)
            published.append(pending)
            answers.append(challenge_body)
        if answers and board.publish_delay > 0:
            cancel.wait(board.publish_delay)   # until every node can answer them
        for challenge_body in answers:
            _check_cancel(cancel)
            # RFC 8555 7.5.1: tell the CA the response is in place.
            acme.answer_challenge(challenge_body, challenge_body.chall.response(account_key))
        order = order.update(authorizations=_wait_until_validated(acme, order, cancel))
        _check_cancel(cancel)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=FINALIZE_TIMEOUT)
        order = acme.finalize_order(order, deadline)   # RFC 8555 7.4 (naive local time)
    finally:
        for pending in published:
            board.withdraw(pending)
    try:
        pair = parse_pair(order.fullchain_pem.encode("ascii"), key_pem)
    except (CertificateError, UnicodeEncodeError) as e:
        raise errors.Error(f"the CA returned an unusable certificate: {e}") from None
    # What comes back replaces a working certificate: it must be the one asked for.
    missing = [n for n in names if n not in pair.names]
    now = datetime.datetime.now(datetime.timezone.utc)
    skew = datetime.timedelta(minutes=10)   # a CA's clock a little ahead of ours
    if missing or not pair.leaf.not_valid_before_utc - skew <= now < pair.not_after:
        raise errors.Error(f"the CA returned a certificate for other names or times "
                           f"({pair.subject}, {', '.join(pair.names)}, valid "
                           f"{pair.leaf.not_valid_before_utc:%Y-%m-%d} to "
                           f"{pair.not_after:%Y-%m-%d}); keeping the current one")
    return pair


def _client(settings: AcmeSettings, account_key: jose.JWK) -> client.ClientV2:
    """A client with the account registered (RFC 8555 7.3); an existing account of the
    same key is found again (7.3.1), so only the key needs keeping."""
    net = client.ClientNetwork(account_key, alg=jose.ES256,
                               verify_ssl=settings.ca_bundle or True,  # type: ignore[arg-type]
                               user_agent=settings.user_agent, timeout=NETWORK_TIMEOUT)
    directory = client.ClientV2.get_directory(settings.directory, net)
    acme = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(email=settings.email or None,
                                                      terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as e:
        net.account = messages.RegistrationResource(uri=e.location,
                                                    body=messages.Registration())
    return acme


def _offered(authz: messages.AuthorizationResource, kind: str) -> messages.ChallengeBody:
    for challenge_body in authz.body.challenges:
        if _type_of(challenge_body) == kind:
            return challenge_body
    offered = ", ".join(_type_of(c) for c in authz.body.challenges) or "none"
    raise errors.Error(f"the CA offers no {kind} challenge for "
                       f"{authz.body.identifier.value} (offered: {offered})")


def _type_of(challenge_body: messages.ChallengeBody) -> str:
    chall = challenge_body.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type", "?"))
    return str(chall.typ)


def _pending(challenge_body: messages.ChallengeBody, domain: str,
             account_key: jose.JWK) -> PendingChallenge:
    chall = challenge_body.chall
    key_authorization = chall.key_authorization(account_key)
    token = chall.encode("token")
    domain = domain.lower()
    if chall.typ == TLS_ALPN01:
        certificate, key = tls_alpn01_certificate(domain, key_authorization)
        return PendingChallenge(TLS_ALPN01, domain, token, key_authorization, certificate, key)
    return PendingChallenge(HTTP01, domain, token, key_authorization)


def _wait_until_validated(acme: client.ClientV2, order: messages.OrderResource,
                          cancel: threading.Event) -> list[messages.AuthorizationResource]:
    """Poll each authorization (RFC 8555 7.5.1) until it leaves "pending"; every name
    that ends anything but "valid" is reported together."""
    deadline = time.monotonic() + VALIDATION_TIMEOUT
    done: list[messages.AuthorizationResource] = []
    failed: list[str] = []
    details: list[str] = []
    for authz in order.authorizations:
        while authz.body.status == messages.STATUS_PENDING:
            _check_cancel(cancel)
            if time.monotonic() > deadline:
                raise errors.Error(f"the CA did not validate {authz.body.identifier.value} "
                                   f"within {VALIDATION_TIMEOUT:g} seconds")
            cancel.wait(POLL_SECONDS)
            authz, _ = acme.poll(authz)
        done.append(authz)
        if authz.body.status != messages.STATUS_VALID:
            name = authz.body.identifier.value
            failed.append(name)
            problems = [str(c.error) for c in authz.body.challenges if c.error is not None]
            details.append(f"{name}: {' / '.join(problems) or authz.body.status}")
    if failed:
        raise ValidationFailed(failed, details)
    return done


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled()
