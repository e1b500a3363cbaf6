"""DKIM keys and the ACME store shared by the nodes of one Maildir root ([storage] shared):
where they live, how `domain add`, `dns`, backup and restore find them, the ACME order
lock (taken, stale by age, released) and challenges one node publishes and another
answers, with bad tokens and files refused."""

from __future__ import annotations

import datetime
import json
import os
import stat
import textwrap
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial import unittest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mailserver.acme_client import (HTTP01, TLS_ALPN01, AcmeNames, AcmeSettings, AcmeStore,
                                    PendingChallenge, tls_alpn01_certificate)
from mailserver.acme_settings import acme_settings, describe
from mailserver.acme_shared import (CHALLENGE_MAX_AGE, ORDER_LOCK_STALE, SharedChallengeBoard,
                                    ensure_certificate_shared, lock_holder, order_lock,
                                    try_order_lock)
from mailserver.autoconfig.acme_challenge import AcmeChallenges
from mailserver.certfiles import CertificatePair, parse_pair
from mailserver.config import load_config, parse_config
from mailserver.shared_state import adopt_local_keys, make_private_dirs

LE = "https://acme-v02.api.letsencrypt.org/directory"
# Nothing listens there: a test that reached the CA would fail.
NO_CA = "https://127.0.0.1:9/directory"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"          # RFC 8555 8.3's example
THUMB = "nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEY6ptiKtA"
KEY_AUTHORIZATION = f"{TOKEN}.{THUMB}"
WANTED = AcmeNames(("mail.example.org",), frozenset({"mail.example.org"}))


def node_config(root: Path, node: str, shared: bool = True, **tls: str) -> Path:
    """A config of node `node` with its own state_dir and the Maildir root root/maildirs."""
    path = root / node / "mailserver.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(f"""\
        [server]
        hostname = "mail.example.test"
        state_dir = "var"
        [storage]
        maildir_root = "{root / 'maildirs'}"
        shared = {'true' if shared else 'false'}
    """)
    if tls:
        text += "[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
    path.write_text(text)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- where shared things live -----------------------------------------------------------------

def test_shared_paths_are_on_the_root_only_when_shared(tmp_path):
    shared = load_config(node_config(tmp_path, "a"))
    root = tmp_path / "maildirs"
    assert shared.shared_dir == root / ".mailserver"
    assert shared.dkim_dir == root / ".mailserver" / "dkim"
    assert shared.acme_dir == root / ".mailserver" / "acme"
    local = load_config(node_config(tmp_path, "b", shared=False))
    assert local.dkim_dir == tmp_path / "b" / "var" / "dkim"
    assert local.acme_dir == tmp_path / "b" / "var" / "acme"


def test_acme_settings_use_the_shared_store(tmp_path):
    c = parse_config({"server": {"hostname": "mail.example.org", "state_dir": "var"},
                      "storage": {"maildir_root": "m", "shared": True},
                      "tls": {"acme_directory": LE}}, tmp_path / "mailserver.toml")
    settings = acme_settings(c)
    assert settings is not None and settings.shared
    assert settings.store == tmp_path / "m" / ".mailserver" / "acme"
    assert describe(c, []).endswith(f"; store shared by every node: {settings.store}")
    local = parse_config({"server": {"hostname": "mail.example.org", "state_dir": "var"},
                          "tls": {"acme_directory": LE}}, tmp_path / "mailserver.toml")
    assert not acme_settings(local).shared and "shared" not in describe(local, [])


def test_private_dirs_are_0700_on_the_way_down(tmp_path):
    top = tmp_path / "root"
    make_private_dirs(top / ".mailserver" / "acme", top)
    for path in (top, top / ".mailserver", top / ".mailserver" / "acme"):
        assert mode(path) == 0o700, path
    with pytest.raises(ValueError):
        make_private_dirs(tmp_path / "elsewhere", top)


def test_keys_a_node_kept_locally_are_adopted_once(tmp_path):
    local, shared = tmp_path / "var" / "dkim", tmp_path / "shared"
    local.mkdir(parents=True)
    shared.mkdir()
    (local / "example.org.mail202601.key").write_bytes(b"key one")
    (local / "example.net.mail202601.key").write_bytes(b"local two")
    (shared / "example.net.mail202601.key").write_bytes(b"shared two")
    (local / "notes.txt").write_bytes(b"not a key")
    (local / "example.org.BAD_SELECTOR.key").write_bytes(b"x")
    copied, differing = adopt_local_keys(local, shared)
    assert copied == ["example.org.mail202601.key"]
    assert differing == ["example.net.mail202601.key"]
    assert (shared / "example.org.mail202601.key").read_bytes() == b"key one"
    assert mode(shared / "example.org.mail202601.key") == 0o600
    # The shared copy of a name is never replaced.
    assert (shared / "example.net.mail202601.key").read_bytes() == b"shared two"
    assert sorted(p.name for p in shared.iterdir()) == ["example.net.mail202601.key",
                                                         "example.org.mail202601.key"]
    assert adopt_local_keys(local, shared) == ([], ["example.net.mail202601.key"])
    assert adopt_local_keys(tmp_path / "missing", shared) == ([], [])


def test_domain_add_on_one_node_gives_the_key_every_node_uses(tmp_path, run):
    a, b = node_config(tmp_path, "a"), node_config(tmp_path, "b")
    code, out, err = run(a, "domain", "add", "example.test")
    assert code == 0, err
    dkim = tmp_path / "maildirs" / ".mailserver" / "dkim"
    [key] = list(dkim.iterdir())
    assert f"({key})" in out
    assert mode(dkim) == mode(dkim.parent) == 0o700 and mode(key) == 0o600
    assert not (tmp_path / "a" / "var" / "dkim").exists()
    # Node B (its own accounts) adds the domain: the key is there already.
    code, out, err = run(b, "domain", "add", "example.test")
    assert code == 0 and "DKIM key generated" not in out
    assert list(dkim.iterdir()) == [key]
    published = [run(c, "dns", "example.test")[1] for c in (a, b)]
    assert published[0] == published[1] and "._domainkey.example.test." in published[0]
    code, out, _ = run(b, "check")
    assert f"shared keys   DKIM keys in {dkim}, ACME store in {dkim.parent / 'acme'}" in out


def test_backup_takes_the_shared_keys_and_restore_puts_them_back(tmp_path, run):
    a = node_config(tmp_path, "a")
    assert run(a, "domain", "add", "example.test")[0] == 0
    config = load_config(a)
    [key] = list(config.dkim_dir.iterdir())
    make_private_dirs(config.acme_dir, config.maildir_root)
    (config.acme_dir / "account-key.pem").write_bytes(b"account")
    (config.acme_dir / ".order.lock").write_bytes(b"1:host")
    code, out, err = run(a, "backup", str(tmp_path / "backup"))
    assert code == 0, err
    backup = tmp_path / "backup"
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["dkim"] == [f"state/dkim/{key.name}"]
    assert manifest["tls"]["files"] == {"state/acme/account-key.pem": "acme"}
    assert not (backup / "maildirs" / ".mailserver").exists()
    assert ", 1 DKIM key, 1 certificate and key file, " in out, out

    fresh = node_config(tmp_path / "new", "a")
    code, out, err = run(fresh, "restore", str(backup))
    assert code == 0, err
    restored = load_config(fresh)
    assert (restored.dkim_dir / key.name).read_bytes() == key.read_bytes()
    assert (restored.acme_dir / "account-key.pem").read_bytes() == b"account"
    assert not (restored.state_dir / "dkim").exists()


# -- one node at a time talks to the CA -------------------------------------------------------

def other_hosts_lock(store: Path, age: float = 0.0) -> Path:
    store.mkdir(parents=True, exist_ok=True)
    path = order_lock(store).path
    path.write_bytes(b"4242:node-b.example.net")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def settings(store: Path) -> AcmeSettings:
    return AcmeSettings(directory=NO_CA, email="", ca_bundle="", challenge=HTTP01,
                        store=store, renew_before=30 * 86400.0, shared=True)


def test_a_lock_another_host_holds_means_skip_this_round(tmp_path):
    store = tmp_path / "acme"
    path = other_hosts_lock(store)
    assert try_order_lock(store) is None
    assert lock_holder(store) == "4242:node-b.example.net"
    outcome = ensure_certificate_shared(settings(store), WANTED,
                                        SharedChallengeBoard(store / "challenges"),
                                        threading.Event())
    assert outcome.busy and outcome.pair is None and not outcome.issued
    assert "another node is getting the certificate" in outcome.note
    assert "4242:node-b.example.net" in outcome.note
    assert path.read_bytes() == b"4242:node-b.example.net"   # left alone


def test_a_lock_older_than_the_stale_age_is_broken(tmp_path):
    store = tmp_path / "acme"
    path = other_hosts_lock(store, age=ORDER_LOCK_STALE + 60)
    lock = try_order_lock(store)
    assert lock is not None
    try:
        assert path.read_bytes().decode().startswith(f"{os.getpid()}:")
    finally:
        lock.release()
    assert not path.exists()


def test_the_lock_is_released_and_excludes_threads_too(tmp_path):
    store = tmp_path / "acme"
    store.mkdir()
    held = try_order_lock(store)
    assert held is not None
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(try_order_lock(store)))
    t.start()
    t.join()
    assert other == [None]
    held.release()
    assert not order_lock(store).path.exists()
    again = try_order_lock(store)
    assert again is not None
    again.release()


def certificate_pair(names: tuple[str, ...], days: int) -> CertificatePair:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return parse_pair(cert.public_bytes(serialization.Encoding.PEM),
                      key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


def test_a_certificate_another_node_stored_is_used_without_the_lock(tmp_path):
    store = tmp_path / "acme"
    stored = certificate_pair(WANTED.names, days=80)
    AcmeStore(store).save_certificate(stored)
    other_hosts_lock(store)
    outcome = ensure_certificate_shared(settings(store), WANTED,
                                        SharedChallengeBoard(store / "challenges"),
                                        threading.Event())
    assert not outcome.busy and not outcome.issued
    assert outcome.pair is not None and outcome.pair.fingerprint == stored.fingerprint


# -- challenges every node answers ------------------------------------------------------------

def boards(tmp_path: Path) -> tuple[SharedChallengeBoard, SharedChallengeBoard]:
    """Two nodes' boards over one shared challenge directory."""
    directory = tmp_path / "acme" / "challenges"
    return SharedChallengeBoard(directory), SharedChallengeBoard(directory)


def test_an_http_01_token_published_by_another_node_is_answered(tmp_path):
    a, b = boards(tmp_path)
    challenge = PendingChallenge(HTTP01, "mail.example.org", TOKEN, KEY_AUTHORIZATION)
    assert b.shared_http01(TOKEN) is None
    a.publish(challenge)
    path = a.http_dir / TOKEN
    assert mode(path) == 0o600 and mode(a.http_dir) == 0o700
    assert a.http01(TOKEN) == KEY_AUTHORIZATION         # A's own, from memory
    assert b.http01(TOKEN) is None                       # not in B's memory...
    assert b.shared_http01(TOKEN) == KEY_AUTHORIZATION   # ...but in the shared directory
    a.withdraw(challenge)
    assert not path.exists() and b.shared_http01(TOKEN) is None


@pytest.mark.parametrize("token", [
    "../../dkim/example.test.mail202601.key", "..", "", "short", "A" * 129,
    f"{TOKEN}/x", f"{TOKEN}.", "tok%2F..%2Fen" + "A" * 8, TOKEN + "\x00",
])
def test_a_bad_token_names_no_file(tmp_path, token):
    a, b = boards(tmp_path)
    a.http_dir.mkdir(parents=True)
    (a.http_dir.parent / "secret").write_text(KEY_AUTHORIZATION)
    assert b.shared_http01(token) is None


def test_a_challenge_file_must_hold_its_token_s_key_authorization(tmp_path):
    a, b = boards(tmp_path)
    a.http_dir.mkdir(parents=True)
    other = "B" * 43
    (a.http_dir / other).write_text(KEY_AUTHORIZATION)     # another token's answer
    (a.http_dir / TOKEN).write_text("x" * 2000)            # too long
    assert b.shared_http01(other) is None and b.shared_http01(TOKEN) is None
    (a.http_dir / TOKEN).write_text(KEY_AUTHORIZATION)
    old = time.time() - CHALLENGE_MAX_AGE - 60              # a dead node's leftover
    os.utime(a.http_dir / TOKEN, (old, old))
    assert b.shared_http01(TOKEN) is None
    a.sweep()
    assert not (a.http_dir / TOKEN).exists() and (a.http_dir / other).exists()
    os.symlink(a.http_dir / other, a.http_dir / TOKEN)      # never followed
    assert b.shared_http01(TOKEN) is None


def test_a_tls_alpn_01_certificate_published_by_another_node_is_served(tmp_path):
    a, b = boards(tmp_path)
    certificate, key = tls_alpn01_certificate("mail.example.org", KEY_AUTHORIZATION)
    challenge = PendingChallenge(TLS_ALPN01, "mail.example.org", TOKEN, KEY_AUTHORIZATION,
                                 certificate, key)
    a.publish(challenge)
    assert mode(a.alpn_dir / "mail.example.org.pem") == 0o600
    assert b.tls_alpn01("mail.example.org") is None      # not read yet
    assert b.refresh_alpn() == 1
    found = b.tls_alpn01("MAIL.example.org.")
    assert found is not None and found.certificate == certificate
    assert found.key.public_key().public_numbers() == key.public_key().public_numbers()
    a.withdraw(challenge)
    assert b.refresh_alpn() == 0 and b.tls_alpn01("mail.example.org") is None


def test_shared_tls_alpn_01_files_that_are_not_validation_certificates_are_ignored(tmp_path):
    a, b = boards(tmp_path)
    a.alpn_dir.mkdir(parents=True)
    certificate, key = tls_alpn01_certificate("mail.example.org", KEY_AUTHORIZATION)
    pem = (certificate.public_bytes(serialization.Encoding.PEM)
           + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
    (a.alpn_dir / "other.example.org.pem").write_bytes(pem)   # another name's certificate
    (a.alpn_dir / "garbage.example.org.pem").write_bytes(b"not PEM at all")
    (a.alpn_dir / "Bad_Name.pem").write_bytes(pem)
    plain = certificate_pair(("plain.example.org",), days=5)  # no acmeIdentifier
    (a.alpn_dir / "plain.example.org.pem").write_bytes(plain.certificate_pem + plain.key_pem)
    os.symlink(a.alpn_dir / "other.example.org.pem", a.alpn_dir / "mail.example.org.pem")
    assert b.refresh_alpn() == 0
    for name in ("other.example.org", "garbage.example.org", "bad_name", "plain.example.org",
                 "mail.example.org"):
        assert b.tls_alpn01(name) is None


def test_publishing_refuses_a_name_or_token_that_is_no_file_name(tmp_path):
    a, _ = boards(tmp_path)
    with pytest.raises(ValueError):
        a.publish(PendingChallenge(HTTP01, "mail.example.org", "../" + TOKEN, "x"))
    assert a.http01("../" + TOKEN) is None
    assert a.publish_delay > 0


class SharedHttpChallengeTests(unittest.TestCase):
    """The http-01 resource: a token of another node's order is read from the shared
    directory (in a thread), an unknown or bad one is 404."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()) / "challenges"
        self.publisher = SharedChallengeBoard(directory)
        self.resource = AcmeChallenges(SharedChallengeBoard(directory))

    async def get(self, token: bytes) -> tuple[int, bytes]:
        request = DummyRequest([b".well-known", b"acme-challenge", token])
        child = self.resource.getChild(token, request)
        result = child.render(request)
        if result == NOT_DONE_YET:
            await request.notifyFinish()
        else:
            request.write(result)
        return request.responseCode or 200, b"".join(request.written)

    async def test_another_node_s_token_is_answered(self) -> None:
        self.publisher.publish(PendingChallenge(HTTP01, "mail.example.org", TOKEN,
                                                KEY_AUTHORIZATION))
        code, body = await self.get(TOKEN.encode())
        self.assertEqual((code, body), (200, KEY_AUTHORIZATION.encode()))

    async def test_unknown_and_bad_tokens_are_404(self) -> None:
        self.publisher.publish(PendingChallenge(HTTP01, "mail.example.org", TOKEN,
                                                KEY_AUTHORIZATION))
        for token in (b"C" * 43, b"..", b"%2e%2e", b"short"):
            code, _ = await self.get(token)
            self.assertEqual(code, 404, token)
