"""Password hashing and every stored scheme a Dovecot migration brings."""

import hashlib

import argon2
import bcrypt
import pytest

from mailserver.passwords import (hash_password, is_supported_hash, needs_rehash, sha_crypt,
                                  sodium_hash, verify_password)

# From "Unix crypt using SHA-256 and SHA-512" (the published test vectors).
SHA_CRYPT_VECTORS = [
    ("$5$saltstring", "Hello world!",
     "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("$5$rounds=10000$saltstringsaltstring", "Hello world!",
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("$5$rounds=5000$toolongsaltstring", "This is just a test",
     "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    ("$5$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    ("$5$rounds=10$roundstoolow", "the minimum number is still observed",
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEd"
     "FCoEOfaS35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0D"
     "p8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUh"
     "x1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring",
     "a very much longer text to encrypt.  This one even stretches over morethan one line.",
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs"
     "66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    ("$6$rounds=10$roundstoolow", "the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaT"
     "fF4ZEQpyUNGc0dqbpBYYBaHHrsX."),
]


@pytest.mark.parametrize("setting, password, expected", SHA_CRYPT_VECTORS)
def test_sha_crypt_known_vectors(setting, password, expected):
    assert sha_crypt(password.encode(), setting) == expected
    assert verify_password(expected, password)
    assert not verify_password(expected, password + "x")


@pytest.mark.parametrize("prefix", ["{SHA512-CRYPT}", "{CRYPT}", ""])
def test_sha512_crypt_with_prefixes(prefix):
    stored = prefix + SHA_CRYPT_VECTORS[5][2]
    assert verify_password(stored, "Hello world!")
    assert not verify_password(stored, "hello world!")


@pytest.mark.parametrize("prefix", ["{SHA256-CRYPT}", "{crypt}", ""])
def test_sha256_crypt_with_prefixes(prefix):
    stored = prefix + SHA_CRYPT_VECTORS[0][2]
    assert verify_password(stored, "Hello world!")
    assert not verify_password(stored, "Hello world")


def test_sha_crypt_scheme_must_match_prefix():
    assert not verify_password("{SHA256-CRYPT}" + SHA_CRYPT_VECTORS[5][2], "Hello world!")


def test_sha_crypt_edge_cases():
    # Empty password and empty salt are valid inputs of the algorithm.
    assert sha_crypt(b"", "$6$salt").startswith("$6$salt$")
    assert sha_crypt(b"x", "$5$").startswith("$5$$")
    assert sha_crypt(b"x", "$1$abc") is None
    assert sha_crypt(b"x", "garbage") is None


def test_argon2id_roundtrip():
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$v=19$")
    assert verify_password(stored, "correct horse")
    assert verify_password(stored, b"correct horse")
    assert not verify_password(stored, "wrong horse")
    assert not needs_rehash(stored)
    assert verify_password("{ARGON2ID}" + stored, "correct horse")
    assert not needs_rehash("{ARGON2ID}" + stored)


def test_argon2i_dovecot_prefix():
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1,
                                   type=argon2.Type.I)
    value = hasher.hash("s3cret")
    assert value.startswith("$argon2i$")
    assert verify_password("{ARGON2I}" + value, "s3cret")
    assert not verify_password("{ARGON2I}" + value, "s3cret!")
    assert verify_password(value, "s3cret")
    assert needs_rehash("{ARGON2I}" + value)
    assert not verify_password("{ARGON2ID}" + value, "s3cret")  # scheme and value disagree


def test_argon2id_with_other_parameters_needs_rehash():
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    assert verify_password(weak, "pw")
    assert needs_rehash(weak)


def test_argon2id_both_implementations_agree():
    """One lane: libsodium verifies (nacl agrees with argon2-cffi on the same string);
    several lanes, which libsodium does not support: argon2-cffi does."""
    import nacl.pwhash.argon2id

    ours = hash_password("pässword")
    assert nacl.pwhash.argon2id.verify(ours.encode(), "pässword".encode())
    made_by_sodium = nacl.pwhash.argon2id.str(b"pw", opslimit=1, memlimit=8192 * 1024).decode()
    assert argon2.PasswordHasher().verify(made_by_sodium, b"pw")
    assert verify_password(made_by_sodium, "pw") and not verify_password(made_by_sodium, "pW")
    lanes = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=4).hash("pw")
    assert ",p=4$" in lanes
    assert verify_password(lanes, "pw") and not verify_password(lanes, "px")
    assert not verify_password(ours[:-4] + "AAAA", "pässword")
    # A 64-byte hash makes a string longer than libsodium takes: argon2-cffi's too.
    long_hash = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1,
                                      hash_len=64).hash("pw")
    assert len(long_hash) > 127
    assert verify_password(long_hash, "pw") and not verify_password(long_hash, "px")
    assert sodium_hash(long_hash) is None and sodium_hash(made_by_sodium) is not None


@pytest.mark.parametrize("variant", [b"2b", b"2y", b"2a"])
@pytest.mark.parametrize("prefix", ["{BLF-CRYPT}", "{BCRYPT}", "{CRYPT}", ""])
def test_bcrypt_variants(variant, prefix):
    value = bcrypt.hashpw(b"hunter2", bcrypt.gensalt(rounds=4, prefix=b"2b"))
    value = b"$" + variant + value[3:]
    stored = prefix + value.decode()
    assert verify_password(stored, "hunter2")
    assert not verify_password(stored, "hunter3")
    assert needs_rehash(stored)


def test_bcrypt_long_password_truncated_like_crypt():
    long = b"p" * 72
    value = bcrypt.hashpw(long, bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(value, long + b"ignored beyond 72 bytes")
    assert not verify_password(value, b"p" * 71)
    assert not verify_password(value, b"p\x00")


@pytest.mark.parametrize("scheme", ["{PLAIN}", "{CLEARTEXT}", "{plain}"])
def test_plain(scheme):
    assert verify_password(scheme + "pa$$w:rd ü", "pa$$w:rd ü")
    assert not verify_password(scheme + "password", "Password")
    assert not verify_password(scheme + "password", "")
    assert needs_rehash(scheme + "password")


def test_dovecot_passwd_file_line():
    # The password field of a Dovecot passwd-file line, as an import keeps it.
    line = ("alice@example.org:{SHA512-CRYPT}" + SHA_CRYPT_VECTORS[5][2] +
            ":1000:1000::/home/alice::userdb_quota_rule=*:storage=1G")
    stored = line.split(":", 7)[1]
    assert verify_password(stored, "Hello world!")
    assert is_supported_hash(stored)


@pytest.mark.parametrize("stored", [
    "", "nonsense", "{SSHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "{MD5-CRYPT}$1$abc$def",
    "$1$abc$def", "{SHA512-CRYPT}", "{BLF-CRYPT}$2y$99$zzzz", "$2b$04$short",
    "$argon2id$v=19$m=bogus", "{ARGON2ID}$argon2id$", "{", "{PLAIN", "$6$rounds=x",
    "{CRYPT}abcdefghijklm",  # DES crypt: not supported
])
def test_unknown_or_broken_stored_data_is_false_never_raises(stored):
    assert verify_password(stored, "anything") is False
    assert verify_password(stored, "") is False
    assert needs_rehash(stored)


def test_non_string_stored_is_false():
    assert verify_password(None, "x") is False  # type: ignore[arg-type]
    assert verify_password(b"{PLAIN}x", "x") is False  # type: ignore[arg-type]


def test_is_supported_hash():
    assert is_supported_hash(hash_password("x"))
    assert is_supported_hash("{PLAIN}x")
    assert is_supported_hash("{BLF-CRYPT}$2y$05$abc")
    assert not is_supported_hash("{SSHA}abc")
    assert not is_supported_hash("$1$abc$def")


def test_sha_crypt_is_not_plain_sha():
    # Guards against a verifier that would accept an unsalted digest.
    digest = hashlib.sha512(b"pw").hexdigest()
    assert not verify_password("$6$" + digest, "pw")
