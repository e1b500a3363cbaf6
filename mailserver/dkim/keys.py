"""DKIM keys on disk: state_dir/dkim/<domain>.<selector>.key, PEM, mode 0600.

`mailserver-admin domain add` generates an RSA-2048 key with a dated selector
("mail202507"), so a later key can be published next to the old one before it is used
(rotation without a gap).  The server looks keys up when it signs, so a key created while
it runs is used from the next message on; the newest selector of a domain wins.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mailserver.fsutil import write_durably

SELECTOR_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
RSA_BITS = 2048


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    path: Path

    def private_pem(self) -> bytes:
        return self.path.read_bytes()

    def txt_record(self) -> str:
        """The TXT value to publish at <selector>._domainkey.<domain> (RFC 6376 3.6.1)."""
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(self.private_pem(), password=None)
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def default_selector(today: datetime.date | None = None) -> str:
    today = today or datetime.date.today()
    return f"mail{today:%Y%m}"


def keys_for(dkim_dir: Path, domain: str) -> list[DKIMKey]:
    """The domain's keys, oldest selector first (so [-1] is the one to sign with)."""
    prefix = domain.lower() + "."
    try:
        names = os.listdir(dkim_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".key")):
            continue
        selector = name[len(prefix):-4]
        if SELECTOR_RE.fullmatch(selector):
            found.append(DKIMKey(domain.lower(), selector, dkim_dir / name))
    return sorted(found, key=lambda k: k.selector)


def generate(dkim_dir: Path, domain: str, selector: str | None = None) -> tuple[DKIMKey, bool]:
    """The domain's newest key, generating an RSA-2048 one if it has none.
    Returns (key, created)."""
    existing = keys_for(dkim_dir, domain)
    if existing and selector is None:
        return existing[-1], False
    selector = selector or default_selector()
    if not SELECTOR_RE.fullmatch(selector):
        raise ValueError(f"bad DKIM selector {selector!r}")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    # PKCS#1 ("RSA PRIVATE KEY"): the form dkimpy's signer reads.
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    dkim_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = dkim_dir / f"{domain.lower()}.{selector}.key"
    # Never replaces a key that exists: a published key stays valid.
    created = write_durably(path, pem, mode=0o600, keep_existing=True)
    return DKIMKey(domain.lower(), selector, path), created
