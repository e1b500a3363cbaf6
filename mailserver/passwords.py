"""Password hashing (argon2id) and verification of the schemes a Dovecot migration brings.

New hashes are argon2id PHC strings.  Stored hashes may also be what a Dovecot passwd-file
or SQL userdb holds, with or without a '{SCHEME}' prefix, so an imported user logs in with
the old password; `needs_rehash` tells the login path to upgrade such a hash to argon2id.

Verification never raises on bad stored data: a hash it cannot read is simply a failed
login.  Every comparison is constant-time.  These functions block for tens of milliseconds:
the server calls them through deferToThread, never in the reactor thread.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Callable

import argon2
import bcrypt
import nacl.exceptions
import nacl.pwhash.argon2id
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# OWASP's first argon2id recommendation: 46 MiB, one pass, one lane.  It takes ~50 ms on a
# small server core; peak memory is 46 MiB per login being verified at once, so the
# reactor's thread pool (10 threads by default) bounds it at about 460 MiB.
ARGON2_MEMORY_KIB = 47104
ARGON2_TIME_COST = 1
ARGON2_PARALLELISM = 1

_hasher = argon2.PasswordHasher(
    time_cost=ARGON2_TIME_COST,
    memory_cost=ARGON2_MEMORY_KIB,
    parallelism=ARGON2_PARALLELISM,
    hash_len=32,
    salt_len=16,
    type=argon2.Type.ID,
)

_SCHEME_RE = re.compile(r"\{([A-Za-z0-9._-]+)\}(.*)", re.DOTALL)
_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_Verifier = Callable[[str, bytes], bool]
BCRYPT_MAX_PASSWORD = 72  # bytes bcrypt reads; longer passwords are truncated, as crypt(3) does


def hash_password(password: str | bytes) -> str:
    """A new argon2id PHC string ('$argon2id$v=19$m=47104,t=1,p=1$...'); str is UTF-8."""
    return _hasher.hash(password)


def verify_password(stored: str, password: str | bytes) -> bool:
    """True if `password` matches `stored`; False for a mismatch or an unreadable hash."""
    try:
        secret = password.encode("utf-8") if isinstance(password, str) else bytes(password)
        return _verify(stored, secret)
    except Exception:  # bad stored data must read as a failed login, never as a crash
        return False


def needs_rehash(stored: str) -> bool:
    """True unless `stored` is argon2id with the current parameters."""
    try:
        scheme, value = _split_scheme(stored)
        if scheme not in (None, "ARGON2ID") or not value.startswith("$argon2id$"):
            return True
        return _hasher.check_needs_rehash(value)
    except Exception:
        return True


def is_supported_hash(stored: str) -> bool:
    """True if `verify_password` understands the scheme of `stored` (not that it is valid)."""
    try:
        return _verifier(stored) is not None
    except Exception:
        return False


# -- dispatch --------------------------------------------------------------------------

def _split_scheme(stored: str) -> tuple[str | None, str]:
    m = _SCHEME_RE.fullmatch(stored)
    if m:
        return m.group(1).upper(), m.group(2)
    return None, stored


def _crypt_verifier(value: str) -> _Verifier | None:
    """The verifier for a crypt(3)-style string by its '$id$' prefix, or None."""
    if value.startswith(("$argon2id$", "$argon2i$")):
        return _verify_argon2
    if value.startswith(_BCRYPT_PREFIXES):
        return _verify_bcrypt
    if value.startswith(("$5$", "$6$")):
        return _verify_sha_crypt
    return None


def _verifier(stored: str) -> _Verifier | None:
    scheme, value = _split_scheme(stored)
    if scheme is None or scheme == "CRYPT":
        return _crypt_verifier(value)
    if scheme in ("PLAIN", "CLEARTEXT"):
        return _verify_plain
    prefixes = {
        "ARGON2ID": ("$argon2id$",),
        "ARGON2I": ("$argon2i$",),
        "BLF-CRYPT": _BCRYPT_PREFIXES,
        "BCRYPT": _BCRYPT_PREFIXES,
        "SHA512-CRYPT": ("$6$",),
        "SHA256-CRYPT": ("$5$",),
    }.get(scheme)
    if prefixes and value.startswith(prefixes):
        return _crypt_verifier(value)
    return None


def _verify(stored: str, secret: bytes) -> bool:
    if not isinstance(stored, str):
        return False
    verifier = _verifier(stored)
    if verifier is None:
        return False
    return bool(verifier(_split_scheme(stored)[1], secret))


def _verify_plain(value: str, secret: bytes) -> bool:
    return hmac.compare_digest(value.encode("utf-8"), secret)


# What libsodium verifies itself: argon2id, version 19, one lane (it supports no other),
# in at most crypto_pwhash_STRBYTES (128) with the final NUL: a longer one (a 64-byte
# hash) is argon2-cffi's.
SODIUM_HASH_MAX = 127
_SODIUM_ARGON2ID = re.compile(r"\$argon2id\$v=19\$m=\d+,t=\d+,p=1\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")


def sodium_hash(stored: str) -> bytes | None:
    """The argon2id string (ASCII) that `verify_password` would hand libsodium for
    `stored`, or None: what a libsodium elsewhere (hashchild.py) may verify instead."""
    try:
        scheme, value = _split_scheme(stored)
        if scheme not in (None, "CRYPT", "ARGON2ID") or not _SODIUM_ARGON2ID.fullmatch(value):
            return None
        ascii_value = value.encode("ascii")
    except Exception:   # not a str, not ASCII: verify_password says what it says
        return None
    return ascii_value if len(ascii_value) <= SODIUM_HASH_MAX else None


def _verify_argon2(value: str, secret: bytes) -> bool:
    """libsodium (PyNaCl) for the hashes it supports, our own among them: its argon2 is
    built with the CPU's vector instructions, about a third faster than argon2-cffi's
    portable build, and every cold login waits for it.  argon2-cffi for the others."""
    if len(value) <= SODIUM_HASH_MAX and _SODIUM_ARGON2ID.fullmatch(value):
        try:
            return nacl.pwhash.argon2id.verify(value.encode("ascii"), secret)
        except nacl.exceptions.InvalidkeyError:
            return False
    try:
        return _hasher.verify(value, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _verify_bcrypt(value: str, secret: bytes) -> bool:
    if b"\x00" in secret:
        return False
    # $2y$ (PHP, Dovecot) and $2a$ are the same algorithm as $2b$ for any sane password.
    normalized = "$2b$" + value[4:]
    return bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD], normalized.encode("ascii"))


def _verify_sha_crypt(value: str, secret: bytes) -> bool:
    computed = sha_crypt(secret, value)
    return computed is not None and hmac.compare_digest(computed.encode("ascii"),
                                                        value.encode("ascii"))


# -- SHA-crypt ($5$, $6$) ----------------------------------------------------------------
# "Unix crypt using SHA-256 and SHA-512" (U. Drepper), the scheme of glibc crypt(3) and
# Dovecot's SHA256-CRYPT / SHA512-CRYPT.

SHA_CRYPT_ROUNDS_DEFAULT = 5000
SHA_CRYPT_ROUNDS_MIN = 1000
SHA_CRYPT_ROUNDS_MAX = 999_999_999
SHA_CRYPT_SALT_MAX = 16

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Byte triples of the final digest in output order (from the spec's b64_from_24bit calls).
_SHA256_ORDER = [(0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
                 (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29)]
_SHA512_ORDER = [(0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4),
                 (47, 5, 26), (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51),
                 (31, 52, 10), (53, 11, 32), (12, 33, 54), (34, 55, 13), (56, 14, 35),
                 (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60), (40, 61, 19),
                 (62, 20, 41)]

_SETTING_RE = re.compile(r"\$([56])\$(?:rounds=(\d{1,10})\$)?([^$]*)(?:\$.*)?", re.DOTALL)


def sha_crypt(password: bytes, setting: str) -> str | None:
    """crypt(3) of `password` with a '$5$...' or '$6$...' setting; None if unparsable.

    `setting` may be a full stored hash: only its prefix, rounds and salt are used.
    """
    m = _SETTING_RE.fullmatch(setting)
    if not m:
        return None
    variant, rounds_text, salt_text = m.groups()
    if variant == "5":
        digest, size, order = hashlib.sha256, 32, _SHA256_ORDER
    else:
        digest, size, order = hashlib.sha512, 64, _SHA512_ORDER
    custom_rounds = rounds_text is not None
    rounds = SHA_CRYPT_ROUNDS_DEFAULT
    if custom_rounds:
        rounds = min(max(int(rounds_text), SHA_CRYPT_ROUNDS_MIN), SHA_CRYPT_ROUNDS_MAX)
    salt = salt_text.encode("utf-8")[:SHA_CRYPT_SALT_MAX]
    final = _sha_crypt_digest(digest, size, password, salt, rounds)

    out = []
    for triple in order:
        out.append(_b64_from_24bit(*(final[i] for i in triple), 4))
    if variant == "5":
        out.append(_b64_from_24bit(0, final[31], final[30], 3))
    else:
        out.append(_b64_from_24bit(0, 0, final[63], 2))
    prefix = f"${variant}$" + (f"rounds={rounds}$" if custom_rounds else "")
    return prefix + salt.decode("utf-8", "replace") + "$" + "".join(out)


def _repeat_to(block: bytes, length: int) -> bytes:
    """`block` repeated and cut to `length` bytes (the spec's "for each block of N")."""
    return (block * (length // len(block) + 1))[:length]


def _sha_crypt_digest(digest: Callable[..., Any], size: int, password: bytes, salt: bytes,
                      rounds: int) -> bytes:
    plen = len(password)
    b = digest(password + salt + password).digest()
    a = digest(password + salt)
    a.update(_repeat_to(b, plen))
    i = plen
    while i > 0:
        a.update(b if i & 1 else password)
        i >>= 1
    a_result = a.digest()

    p_bytes = _repeat_to(digest(password * plen).digest(), plen) if plen else b""
    s_bytes = _repeat_to(digest(salt * (16 + a_result[0])).digest(), len(salt)) if salt else b""

    c = a_result
    for r in range(rounds):
        ctx = digest(p_bytes if r & 1 else c)
        if r % 3:
            ctx.update(s_bytes)
        if r % 7:
            ctx.update(p_bytes)
        ctx.update(c if r & 1 else p_bytes)
        c = ctx.digest()
    assert len(c) == size
    return c


def _b64_from_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    chars = []
    for _ in range(n):
        chars.append(_CRYPT_ALPHABET[w & 0x3F])
        w >>= 6
    return "".join(chars)
