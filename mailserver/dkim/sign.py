"""DKIM signing of a spooled message with dkimpy, the body hashed as a stream.

dkimpy signs a message held in memory; a submitted message can be as large as
[limits].max_message_size.  So the body hash (relaxed canonicalization, RFC 6376 3.4.4)
is computed here while reading the file in chunks, and dkimpy is given only the header
section and that hash: it builds and signs the DKIM-Signature field as usual.  Blocking
(file reading, RSA): call it from a thread.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import dkim

from mailserver.dkim.keys import DKIMKey

CHUNK = 256 * 1024
MAX_HEADER = 1024 * 1024
_WSP_RUN = re.compile(rb"[\t ]+")


class RelaxedBodyHash:
    """sha256 over the relaxed canonical form of a CRLF body fed in arbitrary chunks."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""
        self._empty_run = 0

    def update(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        line = _WSP_RUN.sub(b" ", line).rstrip(b" ")
        if not line:
            self._empty_run += 1  # trailing empty lines do not count (3.4.4 d)
            return
        while self._empty_run:
            n = min(self._empty_run, 65536)
            self._hash.update(b"\r\n" * n)
            self._empty_run -= n
        self._hash.update(line + b"\r\n")

    def digest(self) -> bytes:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        return self._hash.digest()


# RFC 6376 8.15 and 5.4.2: fields a reader relies on are each named once more in h=
# than the message has them (also when it has none), so that a field added above them
# later (a second Subject, a Reply-To) breaks the signature.
OVERSIGNED = (b"from", b"sender", b"reply-to", b"to", b"cc", b"subject", b"date",
              b"message-id", b"in-reply-to", b"references", b"mime-version",
              b"content-type", b"content-transfer-encoding")


class _StreamedBodyDKIM(dkim.DKIM):
    """dkimpy's signer with the body hash (bh=) computed by us over the file."""

    def __init__(self, header: bytes, body_hash: bytes) -> None:
        super().__init__(header + b"\r\n")
        self._bh = base64.b64encode(body_hash)

    def signed_names(self) -> list[bytes]:
        """h=: every field dkimpy would sign, once per occurrence, then OVERSIGNED."""
        wanted = self.should_sign | set(OVERSIGNED)
        return [name.lower() for name, _ in self.headers
                if name.lower() in wanted] + list(OVERSIGNED)

    def gen_header(self, fields, *args, **kwargs):  # type: ignore[no-untyped-def]
        fields = [(k, self._bh if k == b"bh" else v) for k, v in fields]
        return super().gen_header(fields, *args, **kwargs)


def sign_file(path: Path, key: DKIMKey, prefix: bytes = b"") -> bytes:
    """The DKIM-Signature field (CRLF-terminated) for the message `prefix` + file."""
    with open(path, "rb") as f:
        header = bytearray(prefix)
        while True:
            line = f.readline(MAX_HEADER)
            if not line or line == b"\r\n":
                break
            header += line
            if len(header) > MAX_HEADER:
                raise ValueError("header section too large to sign")
        body = RelaxedBodyHash()
        while chunk := f.read(CHUNK):
            body.update(chunk)
    signer = _StreamedBodyDKIM(bytes(header), body.digest())
    return signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                       key.private_pem(), canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=signer.signed_names())
