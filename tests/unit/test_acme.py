"""ACME without a CA: the [tls] acme_* keys, the names asked for, when to renew, the
retry schedule, the challenge board and the tls-alpn-01 validation certificate."""

from __future__ import annotations

import datetime
import hashlib
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailserver.acme_client import (ACME_IDENTIFIER_OID, HTTP01, TLS_ALPN01, AcmeNames,
                                    ChallengeBoard, PendingChallenge, renewal_reason,
                                    retry_delay, tls_alpn01_certificate)
from mailserver.acme_settings import acme_names, acme_settings, challenge_type, describe
from mailserver.certfiles import CertificatePair, parse_pair
from mailserver.config import ConfigError, parse_config

LE = "https://acme-v02.api.letsencrypt.org/directory"
NOW = datetime.datetime(2030, 6, 1, tzinfo=datetime.timezone.utc)


def config(tmp_path: Path, tls: dict | None = None, **sections):
    data = {"server": {"hostname": "mail.example.org", "state_dir": "var"}, **sections}
    if tls is not None:
        data["tls"] = tls
    return parse_config(data, tmp_path / "mailserver.toml")


# -- configuration ---------------------------------------------------------------------------

def test_acme_is_off_by_default(tmp_path):
    c = config(tmp_path)
    assert c.tls.acme_directory == "" and acme_settings(c) is None
    assert describe(c, ["example.org"]) == "off"


def test_acme_settings_from_config(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    c = config(tmp_path, {"acme_directory": LE, "acme_email": "admin@example.org",
                          "acme_ca_bundle": "ca.pem", "acme_renew_before": "20d"})
    s = acme_settings(c)
    assert s is not None
    assert (s.directory, s.email, s.challenge) == (LE, "admin@example.org", HTTP01)
    assert s.ca_bundle == str(tmp_path / "ca.pem")
    assert s.store == tmp_path / "var" / "acme"
    assert s.renew_before == 20 * 86400


@pytest.mark.parametrize("tls, listen, key", [
    ({"acme_directory": "http://ca.example/dir"}, {}, "tls.acme_directory"),
    ({"acme_directory": "ftp://ca"}, {}, "tls.acme_directory"),
    ({"acme_directory": LE, "acme_email": "not-an-address"}, {}, "tls.acme_email"),
    ({"acme_directory": LE, "acme_domains": ["*.example.org"]}, {}, "tls.acme_domains[0]"),
    ({"acme_directory": LE, "acme_domains": "mail.example.org"}, {}, "tls.acme_domains"),
    ({"acme_directory": LE, "acme_challenge": "dns-01"}, {}, "tls.acme_challenge"),
    ({"acme_directory": LE, "acme_renew_before": "soon"}, {}, "tls.acme_renew_before"),
    ({"acme_directory": LE, "acme_ca_bundle": "missing.pem"}, {}, "tls.acme_ca_bundle"),
    ({"acme_directory": LE, "acme_challenge": "http-01"}, {"autoconfig_http": ""},
     "tls.acme_challenge"),
    ({"acme_directory": LE, "acme_challenge": "tls-alpn-01"}, {"autoconfig": ""},
     "tls.acme_challenge"),
    ({"acme_directory": LE}, {"autoconfig": "", "autoconfig_http": ""}, "tls.acme_directory"),
    ({"reload_interval": 0}, {}, "tls.reload_interval"),
])
def test_bad_acme_settings_name_the_key(tmp_path, tls, listen, key):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, tls, listen=listen)
    assert e.value.key == key


def test_acme_and_certificate_files_exclude_each_other(tmp_path):
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError) as e:
        config(tmp_path, {"certificate": "c.pem", "private_key": "k.pem", "acme_directory": LE})
    assert e.value.key == "tls.acme_directory"


def test_certificate_paths_keep_the_other_tls_keys(tmp_path):
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    c = config(tmp_path, {"certificate": "c.pem", "private_key": "k.pem",
                          "reload_interval": "5m"})
    assert c.tls.certificate == str(tmp_path / "c.pem")
    assert c.tls.reload_interval == 300


def test_challenge_type_auto_prefers_http(tmp_path):
    assert challenge_type(config(tmp_path, {"acme_directory": LE})) == HTTP01
    no_http = config(tmp_path, {"acme_directory": LE}, listen={"autoconfig_http": ""})
    assert challenge_type(no_http) == TLS_ALPN01
    explicit = config(tmp_path, {"acme_directory": LE, "acme_challenge": "tls-alpn-01"})
    assert challenge_type(explicit) == TLS_ALPN01


# -- names ----------------------------------------------------------------------------------------

def test_default_names_are_the_hostname_and_the_autoconfig_names(tmp_path):
    c = config(tmp_path, {"acme_directory": LE}, autoconfig={"hostname": "mx.example.org"})
    names = acme_names(c, ["example.net", "Example.org"])
    assert names.names == ("mail.example.org", "mx.example.org",
                           "autoconfig.example.net", "autodiscover.example.net",
                           "autoconfig.example.org", "autodiscover.example.org")
    assert names.required == {"mail.example.org"}
    assert "for mail.example.org, mx.example.org, autoconfig.example.net" in describe(
        c, ["example.net", "example.org"])


def test_no_autoconfig_names_without_an_autoconfig_listener(tmp_path):
    c = config(tmp_path, {"acme_directory": LE, "acme_challenge": "tls-alpn-01"},
               listen={"autoconfig_http": ""})
    assert acme_names(c, ["example.org"]).names[0] == "mail.example.org"
    c = parse_config({"server": {"hostname": "mail.example.org"},
                      "listen": {"autoconfig": "", "autoconfig_http": ""}},
                     tmp_path / "m.toml")
    assert acme_names(c, ["example.org"]).names == ("mail.example.org",)


def test_configured_names_are_all_required(tmp_path):
    c = config(tmp_path, {"acme_directory": LE,
                          "acme_domains": ["imap.example.org", "MAIL.example.org"]})
    names = acme_names(c, ["example.org"])
    assert names.names == ("mail.example.org", "imap.example.org")
    assert names.required == {"mail.example.org", "imap.example.org"}


# -- when to renew, how often to retry -------------------------------------------------------------

def pair(not_after: datetime.datetime, names: tuple[str, ...]) -> CertificatePair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - datetime.timedelta(days=90)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return parse_pair(cert.public_bytes(serialization.Encoding.PEM),
                      key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


WANTED = AcmeNames(("mail.example.org", "autoconfig.example.org"), frozenset({"mail.example.org"}))
MONTH = 30 * 86400.0


def test_no_certificate_is_due():
    assert renewal_reason(None, WANTED, NOW, MONTH) == ("no certificate yet", True)


def test_renewal_starts_renew_before_expiry():
    fresh = pair(NOW + datetime.timedelta(days=31), WANTED.names)
    assert renewal_reason(fresh, WANTED, NOW, MONTH) is None
    due = pair(NOW + datetime.timedelta(days=29), WANTED.names)
    reason, is_due = renewal_reason(due, WANTED, NOW, MONTH)
    assert is_due and reason.startswith("it expires")
    expired = pair(NOW - datetime.timedelta(days=1), WANTED.names)
    assert renewal_reason(expired, WANTED, NOW, MONTH)[1]


def test_a_new_name_asks_for_a_certificate_without_being_due():
    current = pair(NOW + datetime.timedelta(days=60), ("mail.example.org",))
    reason, is_due = renewal_reason(current, WANTED, NOW, MONTH)
    assert not is_due and "autoconfig.example.org" in reason


def test_over_a_hundred_names_is_one_certificate_not_one_a_check(tmp_path, monkeypatch):
    """Only the first 100 names are ordered (the CA's limit); the others must not count
    as "not covered yet", which ordered a new certificate at every check."""
    from mailserver import acme_client

    settings = acme_settings(config(tmp_path, {"acme_directory": LE}))
    names = ("mail.example.org",) + tuple(f"autoconfig.d{i}.example" for i in range(150))
    wanted = AcmeNames(names, frozenset({"mail.example.org"}))
    orders = []

    def issue(settings, asked, board, cancel):
        orders.append(asked)
        return pair(NOW + datetime.timedelta(days=90), tuple(asked))
    monkeypatch.setattr(acme_client, "issue", issue)
    first = acme_client.ensure_certificate(settings, wanted, None, threading.Event(), NOW)
    assert first.issued and len(orders[0]) == 100
    again = acme_client.ensure_certificate(settings, wanted, None, threading.Event(),
                                           NOW + datetime.timedelta(days=1))
    assert not again.issued and len(orders) == 1


def test_a_certificate_the_ca_returns_for_other_names_or_times_is_refused(tmp_path,
                                                                           monkeypatch):
    from acme import errors

    from mailserver import acme_client

    settings = acme_settings(config(tmp_path, {"acme_directory": LE}))
    ca_key = ec.generate_private_key(ec.SECP256R1())

    class Order:
        authorizations: list = []

        def __init__(self, pem: str = "") -> None:
            self.fullchain_pem = pem

        def update(self, **changes):
            return self

    class CA:
        """Signs the CSR's key, for `names`, valid from `start` for 90 days."""

        def __init__(self, names, start) -> None:
            self.names, self.start = names, start

        def new_order(self, csr_pem):
            self.key = x509.load_pem_x509_csr(csr_pem).public_key()
            return Order()

        def finalize_order(self, order, deadline):
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.names[0])])
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(self.key).serial_number(x509.random_serial_number())
                    .not_valid_before(self.start)
                    .not_valid_after(self.start + datetime.timedelta(days=90))
                    .add_extension(x509.SubjectAlternativeName(
                        [x509.DNSName(n) for n in self.names]), critical=False)
                    .sign(ca_key, hashes.SHA256()))
            return Order(cert.public_bytes(serialization.Encoding.PEM).decode())

    now = datetime.datetime.now(datetime.timezone.utc)
    for names, start, good in [(("mail.example.org",), now - datetime.timedelta(days=1), True),
                               (("www.other.example",), now - datetime.timedelta(days=1), False),
                               (("mail.example.org",), now - datetime.timedelta(days=100), False),
                               (("mail.example.org",), now + datetime.timedelta(days=2), False)]:
        monkeypatch.setattr(acme_client, "_client", lambda *a, ca=CA(names, start): ca)
        if good:
            assert acme_client.issue(settings, ["mail.example.org"], None,
                                     threading.Event()).names == names
        else:
            with pytest.raises(errors.Error, match="other names or times"):
                acme_client.issue(settings, ["mail.example.org"], None, threading.Event())


def test_retries_back_off_and_are_capped():
    delays = [retry_delay(n) for n in range(1, 10)]
    assert delays[:3] == [300, 600, 1200]
    assert delays == sorted(delays) and max(delays) == 6 * 3600


# -- challenges -----------------------------------------------------------------------------------

def test_board_answers_only_challenges_in_progress():
    board = ChallengeBoard()
    http = PendingChallenge(HTTP01, "mail.example.org", "tok" * 8, "tok.thumb")
    alpn = PendingChallenge(TLS_ALPN01, "mail.example.org", "t2" * 8, "t2.thumb")
    assert board.http01(http.token) is None
    board.publish(http)
    board.publish(alpn)
    assert board.http01(http.token) == "tok.thumb"
    assert board.http01("other") is None
    assert board.tls_alpn01("MAIL.example.org.") == alpn
    board.withdraw(http)
    board.withdraw(alpn)
    assert board.http01(http.token) is None and board.tls_alpn01("mail.example.org") is None
    assert len(board) == 0


def test_board_is_shared_between_threads():
    board = ChallengeBoard()
    challenge = PendingChallenge(HTTP01, "a.example", "x" * 20, "x.y")
    t = threading.Thread(target=board.publish, args=(challenge,))
    t.start()
    t.join()
    assert board.http01("x" * 20) == "x.y"


def test_tls_alpn_01_validation_certificate():
    """RFC 8737 3: one dNSName, and the critical acmeIdentifier extension holding the
    DER OCTET STRING of SHA-256(key authorization)."""
    cert, key = tls_alpn01_certificate("mail.example.org", "token.thumbprint")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org"]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
