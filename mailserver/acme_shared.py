"""ACME with several nodes on one shared Maildir root ([storage] shared).

Every node keeps the one ACME store, `<maildir_root>/.mailserver/acme/` (account key,
certificate and key), so all of them serve the same certificate.  Three things make that
work when any of them may renew:

- One node at a time talks to the CA: an order is made under the dot-lock `.order.lock`
  in the store (created with O_EXCL, "<pid>:<host>", Dovecot's format; its mtime is
  refreshed while held, so another host, which can judge it only by its age, breaks it
  only ORDER_LOCK_STALE seconds after its holder died).  A node that finds it taken skips
  that round and tries again later; the certificate the other node stores reaches it
  anyway (the reactor side watches the store's files).
- The CA's validation request may reach any node (DNS round robin, a load balancer): the
  challenges of an order are written to `challenges/http-01/<token>` and
  `challenges/tls-alpn-01/<name>.pem` in the store besides the node's own memory, and the
  CA is told they are ready only PUBLISH_DELAY seconds later.  Another node answers
  http-01 by reading the token's file when asked (SharedChallengeBoard.shared_http01, in
  a thread) and tls-alpn-01 from a copy in memory that it reads again every
  ALPN_POLL_SECONDS (refresh_alpn, in a thread): the TLS handshake cannot wait for a disk.
- Names from the network never name a file unchecked: a token must be base64url
  (RFC 8555 8.1) and a server name a host name, and what a file holds is checked too
  (the key authorization of that token; a validation certificate for that name).

Blocking; imports nothing from Twisted.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mailserver.acme_client import (ACME_IDENTIFIER_OID, HTTP01, TLS_ALPN01, AcmeNames,
                                    AcmeSettings, AcmeStore, ChallengeBoard, Outcome,
                                    PendingChallenge, ensure_certificate, renewal_reason)
from mailserver.addresses import HOST_NAME
from mailserver.fsutil import unlink_quietly, write_durably
from mailserver.maildir.uidlist import DotLock, LockTimeout

log = logging.getLogger(__name__)

ORDER_LOCK_TARGET = ".order"       # the lock file is .order.lock (dot files: not backed up)
# Another host's lock is judged by its age; the holder refreshes it every minute or less
# (maildir.uidlist's keeper), so this is long enough for clocks that differ a little.
ORDER_LOCK_STALE = 300.0
CHALLENGES_DIR = "challenges"
# Seconds between publishing and telling the CA: a few looks of every other node.
PUBLISH_DELAY = 3.0
ALPN_POLL_SECONDS = 1.0
# A challenge file older than this is a leftover of a node that died during an order.
CHALLENGE_MAX_AGE = 3600.0
MAX_HTTP01_BYTES = 1024            # a key authorization is about 90 bytes
MAX_ALPN_BYTES = 16 * 1024         # a validation certificate and its key: about 1 KB
MAX_SHARED_FILES = 256             # per look at a directory (an order has at most 100 names)

# RFC 8555 8.1: tokens are base64url; 8.3: at least 128 bits.  The key authorization is
# token "." base64url(JWK thumbprint).
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_KEY_AUTHORIZATION_RE = re.compile(r"([A-Za-z0-9_-]{16,128})\.[A-Za-z0-9_-]{16,128}")
_KEY_MARKER = b"-----BEGIN PRIVATE KEY-----"


# -- one node at a time ---------------------------------------------------------------------

def order_lock(store: Path) -> DotLock:
    return DotLock(store / ORDER_LOCK_TARGET, timeout=0.0, stale_after=ORDER_LOCK_STALE)


def try_order_lock(store: Path) -> DotLock | None:
    """The order lock, taken; None when another node (or thread) holds it."""
    lock = order_lock(store)
    try:
        lock.acquire()
    except LockTimeout:
        return None
    return lock


def lock_holder(store: Path) -> str:
    """"<pid>:<host>" of the order lock's holder, for the log."""
    try:
        with open(order_lock(store).path, "rb") as f:
            return f.read(256).decode("ascii", "replace").strip() or "?"
    except OSError:
        return "?"


def ensure_certificate_shared(settings: AcmeSettings, wanted: AcmeNames, board: ChallengeBoard,
                              cancel: threading.Event,
                              now: datetime.datetime | None = None) -> Outcome:
    """ensure_certificate under the order lock.  Nothing to do: the stored certificate,
    without the lock.  The lock taken elsewhere: the stored certificate, `busy`.  Under
    the lock the store is read again, since the node that held it may just have renewed."""
    current = AcmeStore(settings.store).load_certificate()
    when = now or datetime.datetime.now(datetime.timezone.utc)
    if renewal_reason(current, wanted, when, settings.renew_before) is None:
        return Outcome(current)
    lock = try_order_lock(settings.store)
    if lock is None:
        return Outcome(current, busy=True,
                       note=f"another node is getting the certificate (lock "
                            f"{order_lock(settings.store).path} held by "
                            f"{lock_holder(settings.store)})")
    try:
        if isinstance(board, SharedChallengeBoard):
            board.sweep()
        return ensure_certificate(settings, wanted, board, cancel, now)
    finally:
        lock.release()


# -- challenges every node can answer --------------------------------------------------------

class SharedChallengeBoard(ChallengeBoard):
    """The node's own board, published to the shared store as well; lookups fall back to
    what other nodes published there."""

    publish_delay = PUBLISH_DELAY

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.http_dir = self.directory / HTTP01
        self.alpn_dir = self.directory / TLS_ALPN01
        self._shared_alpn: dict[str, PendingChallenge] = {}
        # name -> (file stamp, parsed): a file is parsed once, not at every look.
        self._parsed: dict[str, tuple[tuple[int, int, int], PendingChallenge]] = {}

    # The ACME thread's side.

    def publish(self, challenge: PendingChallenge) -> None:
        path = self._path(challenge)
        if path is None:
            raise ValueError(f"acme: cannot publish a challenge for {challenge.domain!r} "
                             f"(token {challenge.token!r})")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_durably(path, _file_content(challenge), mode=0o600)
        super().publish(challenge)   # only once written: a failed write leaves nothing

    def withdraw(self, challenge: PendingChallenge) -> None:
        super().withdraw(challenge)
        path = self._path(challenge)
        if path is not None:
            unlink_quietly(path)

    def sweep(self) -> None:
        """Remove what nodes that died during an order left (under the order lock)."""
        now = time.time()
        for directory in (self.http_dir, self.alpn_dir):
            for entry in _entries(directory):
                try:
                    if now - entry.stat(follow_symlinks=False).st_mtime > CHALLENGE_MAX_AGE:
                        unlink_quietly(Path(entry.path))
                except OSError:
                    continue

    def _path(self, challenge: PendingChallenge) -> Path | None:
        if challenge.kind == HTTP01:
            return self.http_dir / challenge.token if TOKEN_RE.fullmatch(challenge.token) \
                else None
        return self.alpn_dir / f"{challenge.domain}.pem" if HOST_NAME.fullmatch(challenge.domain) \
            else None

    # The listeners' side.

    def shared_http01(self, token: str) -> str | None:
        """RFC 8555 8.3: the key authorization another node published for `token`.
        Blocking (one small file): call it in a thread."""
        if not TOKEN_RE.fullmatch(token):
            return None
        data = _read_fresh(self.http_dir / token, MAX_HTTP01_BYTES)
        if data is None:
            return None
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            return None
        match = _KEY_AUTHORIZATION_RE.fullmatch(text)
        if match is None or match.group(1) != token:
            return None
        return text

    def tls_alpn01(self, server_name: str) -> PendingChallenge | None:
        own = super().tls_alpn01(server_name)
        if own is not None:
            return own
        with self._lock:
            return self._shared_alpn.get(server_name.lower().rstrip("."))

    def refresh_alpn(self) -> int:
        """Read the tls-alpn-01 challenges other nodes published, for tls_alpn01 to find
        without touching the disk.  Blocking: call it in a thread.  Returns how many."""
        found: dict[str, PendingChallenge] = {}
        parsed: dict[str, tuple[tuple[int, int, int], PendingChallenge]] = {}
        now = time.time()
        for entry in _entries(self.alpn_dir):
            name = entry.name[:-4] if entry.name.endswith(".pem") else ""
            if not HOST_NAME.fullmatch(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime > CHALLENGE_MAX_AGE:
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = self._parsed.get(name)
            if known is not None and known[0] == stamp:
                challenge: PendingChallenge | None = known[1]
            else:
                data = _read_fresh(Path(entry.path), MAX_ALPN_BYTES)
                challenge = _validation_challenge(name, data) if data is not None else None
            if challenge is not None:
                found[name] = challenge
                parsed[name] = (stamp, challenge)
        with self._lock:
            self._shared_alpn = found
        self._parsed = parsed
        return len(found)


def _file_content(challenge: PendingChallenge) -> bytes:
    if challenge.kind == HTTP01:
        return challenge.key_authorization.encode("ascii")
    assert challenge.certificate is not None and challenge.key is not None
    return (challenge.certificate.public_bytes(serialization.Encoding.PEM)
            + challenge.key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def _validation_challenge(name: str, data: bytes) -> PendingChallenge | None:
    """A published tls-alpn-01 file: RFC 8737 3's certificate for exactly `name` (with
    the acmeIdentifier extension) and its key; None for anything else."""
    at = data.find(_KEY_MARKER)
    if at <= 0:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(data[:at])
        key = serialization.load_pem_private_key(data[at:], password=None)
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except (ValueError, TypeError, x509.ExtensionNotFound) as e:
        log.warning("acme: ignoring the shared tls-alpn-01 file for %s: %s", name, e)
        return None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if names != [name] or key.public_key().public_bytes(*public) != \
            certificate.public_key().public_bytes(*public):
        log.warning("acme: ignoring the shared tls-alpn-01 file for %s: not its "
                    "validation certificate", name)
        return None
    return PendingChallenge(TLS_ALPN01, name, "", "", certificate, key)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """At most MAX_SHARED_FILES entries of `directory` (none when it is missing)."""
    out: list[os.DirEntry[str]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if len(out) >= MAX_SHARED_FILES:
                    break
                out.append(entry)
    except FileNotFoundError:
        return out   # nothing shared yet
    except OSError as e:
        log.warning("cannot list %s: %s", directory, e)
    return out


def _read_fresh(path: Path, limit: int) -> bytes | None:
    """A regular file's content (not through a symlink) of at most `limit` bytes, written
    less than CHALLENGE_MAX_AGE ago; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit \
                or time.time() - st.st_mtime > CHALLENGE_MAX_AGE:
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= limit else None
