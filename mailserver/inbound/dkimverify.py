"""DKIM (RFC 6376, RFC 8463 Ed25519, RFC 8301) and ARC (RFC 8617) verification of a
spooled message, its body read as a stream.

A received message can be as large as the SMTP size limit (50 MB), and dkimpy verifies
a message held in memory.  So only the header section is read into memory (at most
MAX_HEADER bytes); the body is read once in chunks and canonicalized on the fly into
every body hash the signatures ask for (each (canonicalization, hash, l=) triple once).
dkimpy's building blocks then do the rest: tag lists, header canonicalization and
selection, the header hash, RSA; Ed25519 keys are checked with `cryptography`, which
the server already depends on.  ARC chains go through dkimpy's own ARC verifier, with
the body hash of the ARC-Message-Signature taken from the same stream.

The caller looks the keys up beforehand (`key_names`, then DNS) and hands them in, so
nothing here touches the network.  Blocking (file reading, RSA): call it from a thread;
it imports nothing from Twisted.

Results, as Authentication-Results (RFC 8601 2.7.1) words:
  pass       signature verified
  fail       body hash mismatch, header signature does not verify, expired (x= past,
             RFC 6376 6.1.1 says PERMFAIL "signature expired": it is a signature that
             verifiably no longer holds, so "fail" and not an error), body shorter than l=
  permerror  malformed signature or key record, unknown algorithm, From not signed,
             no key record (RFC 6376 6.1.2), revoked key, key type/a= mismatch
  temperror  the key lookup failed (DNS error) or was not made
  policy     acceptable by syntax but not by us: rsa-sha1 and RSA keys shorter than
             min_rsa_bits (RFC 8301 3.1, 3.2), signatures past the tenth
"""

from __future__ import annotations

import base64
import binascii
import io
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA1, SHA256
from cryptography.hazmat.primitives.serialization import load_der_public_key
from dkim.crypto import parse_public_key
from dkim.util import InvalidTagValueList, parse_tag_value

from mailserver.inbound.headerscan import named_values
from mailserver.shortcache import cache_short

MAX_HEADER = 1024 * 1024      # header section cap; beyond it signatures are permerror
MAX_SIGNATURES = 10           # DKIM-Signature fields verified; later ones get "policy"
MAX_REPORTED = 20             # DKIM-Signature fields reported at all (the topmost ones)
MAX_KEY_NAMES = 20            # distinct key names looked up for one message
MAX_ARC_INSTANCES = 50        # RFC 8617 4.2.1: i= is 1..50
# An ARC field longer than this makes the chain fail unverified: real ones are about a
# kilobyte, and dkimpy's b= regex takes time quadratic in a long run of folding
# whitespace (a 136 KB ARC-Message-Signature held a worker for 79 s).
MAX_ARC_FIELD = 8 * 1024
CHUNK = 64 * 1024             # body read size (bounds the work of one regex pass too)
LONG_LINE = 64 * 1024         # a body line longer than this is hashed piecewise
EXPIRY_SLOP = 300             # seconds of clock skew forgiven on x= (RFC 6376 3.5)
HEADER_B_MIN = 8              # RFC 6008 2: header.b is at least 8 characters

_PREHASHED = {"sha256": SHA256(), "sha1": SHA1()}
_HASHES = {b"rsa-sha256": "sha256", b"ed25519-sha256": "sha256", b"rsa-sha1": "sha1"}
_KEY_TYPES = {b"rsa-sha256": b"rsa", b"rsa-sha1": b"rsa", b"ed25519-sha256": b"ed25519"}
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")   # as dkimpy's rfc822_parse
_NEWLINE = re.compile(rb"\r?\n")
_WSP = re.compile(rb"\t[\t ]*| [\t ]+")   # WSP runs other than a lone SP (3.4.4)
# dkimpy's RE_BTAG with its FWS written as the \s* it amounts to, and the base64
# taken in runs rather than a character per repetition: the same matches (white space
# and base64 characters are disjoint, so nothing backtracks), in a tenth of the time.
_BTAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")
_SPACES = b"\t\r\n "   # removed from base64 values: bytes.translate(None, _SPACES)
_WSP_RUN = re.compile(rb"[\t ]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_UNPRINTABLE = re.compile(r"[\x00-\x20\x7f]")
_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")


@dataclass(frozen=True)
class DKIMResult:
    result: str      # "pass" | "fail" | "neutral" | "temperror" | "permerror" | "policy"
    domain: str      # d=  ("" if unparseable)
    selector: str    # s=
    algorithm: str   # a=  e.g. "rsa-sha256", "ed25519-sha256"
    header_b: str    # shortest unique prefix (>= 8 chars) of b= (RFC 6008 header.b)
    body_length: int | None   # l= when present: only that much of the body is signed
    reason: str      # short text for the Authentication-Results comment
    identity: str = ""  # i= when present


@dataclass(frozen=True)
class ARCResult:
    result: str      # "none" | "pass" | "fail"  (RFC 8617 cv= of the chain as we see it)
    instances: int   # the highest i= (0 when none)
    sealers: tuple[str, ...]   # d= of each ARC-Seal, in instance order
    reason: str
    # the highest instance's ARC-Authentication-Results value (unfolded), for DMARC
    # override decisions (RFC 8617 7.2); meaningful only when result is "pass"
    last_aar: str = ""


# -- header section ---------------------------------------------------------------------

def _read_header(f: Any) -> tuple[bytes, bool]:
    """(header section without the blank line, whether it ended within MAX_HEADER).
    Leaves `f` at the first body byte when it did."""
    if isinstance(f, io.BytesIO):   # a message in memory: found, not read line by line
        data = f.getvalue()
        end, body = _header_end(data)
        if end <= MAX_HEADER:
            f.seek(body)
            return data[:end], True
    out = bytearray()
    while True:
        line = f.readline(MAX_HEADER + 1)
        if not line or line in (b"\r\n", b"\n"):
            return bytes(out), True
        if len(out) + len(line) > MAX_HEADER:
            return bytes(out), False
        out += line


def _header_end(data: bytes) -> tuple[int, int]:
    """(end of the header section, start of the body) as the line by line reading
    finds them: the section ends before the first empty line (CRLF or LF), else at the
    end of the data."""
    if data[:2] == b"\r\n":
        return 0, 2
    if data[:1] == b"\n":
        return 0, 1
    crlf, lf = data.find(b"\n\r\n"), data.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return len(data), len(data)
    if lf < 0 or 0 <= crlf < lf:
        return crlf + 1, crlf + 3
    return lf + 1, lf + 2


def _open(source: Any) -> Any:
    """The message: its bytes (a small message kept in memory) or the file it is in."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    return open(source, "rb")


def read_header_block(path: Any) -> bytes:
    """The header section (up to the blank line, without it), capped at MAX_HEADER bytes
    (whole lines)."""
    with _open(path) as f:
        return _read_header(f)[0]


def parse_header_block(block: bytes) -> list[list[bytes]]:
    """[name, value] pairs as dkimpy's rfc822_parse makes them (value with its folding
    and a final CRLF), except that lines that are not fields are skipped instead of
    raising: one junk line must not stop the other signatures from being checked."""
    lines = block.split(b"\n")
    last = lines.pop()   # not followed by a line break: a CR at its end stays
    lines = [line[:-1] if line[-1:] == b"\r" else line for line in lines]
    lines.append(last)
    headers: list[list[Any]] = []
    parts: list[bytes] | None = None   # the lines of the field being read
    match = _FIELD_NAME.match
    for line in lines:
        if not line:
            break
        if line[0] in (9, 32):
            if parts is not None:
                parts.append(line)
            continue
        m = match(line)
        if m is None:
            parts = None
            continue
        parts = [line[m.end():]]
        headers.append([m.group(1), parts])
    for field in headers:
        parts = field[1]
        field[1] = (parts[0] if len(parts) == 1 else b"\r\n".join(parts)) + b"\r\n"
    return headers


def parse_tags(tag_list: bytes) -> dict[bytes, bytes] | None:
    """RFC 6376 3.2 tag list (folding already removed), or None when it is not one:
    what dkimpy's parse_tag_value accepts (a tag name starts with a letter, no tag
    twice, a trailing ";" allowed), without its regex and list per tag; every
    signature of every message goes through here, in the reactor and in the workers."""
    specs = tag_list.strip().split(b";")
    if not specs[-1]:
        specs.pop()
    tags: dict[bytes, bytes] = {}
    for spec in specs:
        name, eq, value = spec.partition(b"=")
        if not eq:
            return None
        name = name.strip()
        if not name[:1].isalpha() or name in tags:   # bytes.isalpha: ASCII letters only
            return None
        tags[name] = value.strip()
    return tags


def _unfold(value: bytes) -> bytes:
    """The value without its line breaks (CRLF or LF): RFC 5322 unfolding."""
    if b"\n" not in value:
        return value
    return value.replace(b"\r\n", b"").replace(b"\n", b"")


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    """RFC 6376 3.2 tag list of a field value, or None when it is not one."""
    return parse_tags(_unfold(value))


def _lenient_tags(value: bytes) -> dict[bytes, bytes]:
    """Whatever tags can be read from a malformed list, for reporting d=/s=/a=/b=."""
    out: dict[bytes, bytes] = {}
    for spec in _NEWLINE.sub(b"", value).split(b";"):
        name, eq, val = spec.partition(b"=")
        name = name.strip()
        if eq and name and name not in out:
            out[name] = val.strip()
    return out


_PRINTABLE = re.compile(rb"[\x21-\x7e]*")


def _text(value: bytes | None, limit: int = 255) -> str:
    if not value:
        return ""
    if _PRINTABLE.fullmatch(value):   # nearly always: nothing to replace or drop
        return value[:limit].decode("ascii")
    return _UNPRINTABLE.sub("", value.decode("utf-8", "replace"))[:limit]


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    """"<s>._domainkey.<d>" (RFC 6376 3.6.2.1), lower-case, or None when s= or d= is not
    a DNS name."""
    s, d = tags.get(b"s"), tags.get(b"d")
    if s is None or d is None:
        return None
    return _key_name_of(s, d)


@cache_short(maxsize=1024)   # a sender's selector and domain, message after message
def _key_name_of(s_tag: bytes, d_tag: bytes) -> str | None:
    try:
        s = s_tag.decode("ascii").lower()
        d = d_tag.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None
    if not (_DNS_NAME.fullmatch(s) and _DNS_NAME.fullmatch(d)):
        return None
    name = f"{s}._domainkey.{d}"
    return name if len(name) <= 253 else None


def _instance(tags: dict[bytes, bytes] | None) -> int:
    """An ARC field's i= (RFC 8617 4.2.1), 0 when missing or not a number."""
    if tags is None:
        return 0
    value = tags.get(b"i", b"")
    return int(value) if value.isdigit() and len(value) <= 3 else 0


_AAR_INSTANCE = re.compile(rb"\s*i\s*=\s*(\d{1,3})\s*;")


def _arc_instance(name: bytes, value: bytes) -> int:
    """i= of an ARC field: a tag of ARC-Seal and ARC-Message-Signature, the leading
    "i=N;" of ARC-Authentication-Results (RFC 8617 4.1.1); 0 when invalid."""
    if name == b"arc-authentication-results":
        m = _AAR_INSTANCE.match(_NEWLINE.sub(b"", value))
        return int(m.group(1)) if m else 0
    return _instance(_tags(value))


_KEYED_NAMES = (b"dkim-signature", b"arc-seal", b"arc-message-signature")


def _keyed_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value) of the fields that name keys, in order, as
    parse_header_block() would give them, without splitting the rest of the header."""
    return named_values(block, _KEYED_NAMES)


def key_names(header_block: bytes, *, include_arc: bool = True) -> list[str]:
    """The DNS TXT names whose keys verification needs: "<s>._domainkey.<d>" for every
    DKIM-Signature verified (the first MAX_SIGNATURES), then for the newest
    ARC-Message-Signature and every ARC-Seal; deduplicated, at most MAX_KEY_NAMES."""
    headers = _keyed_fields(header_block)
    names: list[str] = []

    def add(tags: dict[bytes, bytes] | None) -> None:
        name = _key_name(tags) if tags is not None else None
        if name is not None and name not in names and len(names) < MAX_KEY_NAMES:
            names.append(name)

    sigs = [v for n, v in headers if n == b"dkim-signature"]
    for value in sigs[:MAX_SIGNATURES]:
        add(_tags(value))
    if include_arc:
        seals: list[tuple[int, dict[bytes, bytes] | None]] = []
        newest: tuple[int, dict[bytes, bytes] | None] = (0, None)
        for lname, v in headers:
            if lname == b"arc-seal":
                tags = _tags(v)
                seals.append((_instance(tags), tags))
            elif lname == b"arc-message-signature":
                tags = _tags(v)
                if _instance(tags) > newest[0]:
                    newest = (_instance(tags), tags)
        add(newest[1])
        for _, tags in sorted(seals, key=lambda s: -s[0]):
            add(tags)
    return names


# -- body hashes ------------------------------------------------------------------------

BodyKey = tuple[bool, str, "int | None"]   # (relaxed, hash name, l=)


class _LimitedHash:
    """One body hash over at most `limit` canonical bytes (l=, RFC 6376 3.4.5)."""

    def __init__(self, hash_name: str, limit: int | None) -> None:
        self.hash = hashlib.new(hash_name)
        self.limit = limit
        self.fed = 0

    def update(self, data: bytes) -> None:
        if self.limit is not None:
            room = self.limit - self.fed
            if room <= 0:
                return
            if len(data) > room:
                data = data[:room]
            self.fed += len(data)
        self.hash.update(data)


class _BodyCanonicalizer:
    """The simple (RFC 6376 3.4.3) or relaxed (3.4.4) canonical form of a CRLF body fed
    in arbitrary chunks, handed on to body hashes as it is produced.  Trailing empty
    lines are held back (they are dropped at the end); a line is held until its CRLF,
    except that an overlong one is passed on piecewise, keeping only what could still
    turn into trailing whitespace."""

    def __init__(self, relaxed: bool, sinks: list[_LimitedHash]) -> None:
        self.relaxed = relaxed
        self.sinks = sinks
        self.partial = b""
        self.pending = 0          # empty lines not yet known not to be trailing
        self.line_open = False    # part of the current line already passed on
        self.length = 0           # canonical bytes produced

    def update(self, data: bytes) -> None:
        buf = self.partial + data if self.partial else data
        cut = buf.rfind(b"\r\n")
        if cut < 0:
            self.partial = buf
        else:
            self._lines(buf[:cut + 2])
            self.partial = buf[cut + 2:]
        if len(self.partial) > LONG_LINE:
            self._flush_partial()

    def finish(self) -> None:
        if self.partial:
            # A last line without CRLF gets one (3.4.3, 3.4.4).
            data, self.partial = self.partial + b"\r\n", b""
            self._lines(data)
        elif self.line_open:
            self._emit(b"\r\n")
            self.line_open = False
        if not self.relaxed and self.length == 0:
            self._emit(b"\r\n")   # 3.4.3: an empty body is one CRLF

    def _lines(self, data: bytes) -> None:
        """Whole lines (data ends with CRLF)."""
        if self.relaxed:
            if b"\t" in data or b"  " in data:   # most text has neither: skip the scan
                data = _WSP.sub(b" ", data)
            data = data.replace(b" \r\n", b"\r\n")
        end = _content_end(data)
        if end == 0:   # only empty lines
            n = len(data) // 2
            if self.line_open:
                self._emit(b"\r\n")
                self.line_open = False
                n -= 1
            self.pending += n
            return
        self._flush_pending()
        self._emit(data[:end + 2])
        self.pending = (len(data) - end - 2) // 2
        self.line_open = False

    def _flush_partial(self) -> None:
        p = self.partial
        if self.relaxed:
            p = _WSP.sub(b" ", p)
            keep = len(p)
            if p.endswith(b"\r"):
                keep -= 1
            if keep and p[keep - 1] == 32:
                keep -= 1
        else:
            keep = len(p) - 1 if p.endswith(b"\r") else len(p)
        if keep:
            self._flush_pending()
            self._emit(p[:keep])
            self.line_open = True
        self.partial = p[keep:]

    def _flush_pending(self) -> None:
        while self.pending:
            n = min(self.pending, 32768)
            self._emit(b"\r\n" * n)
            self.pending -= n

    def _emit(self, data: bytes) -> None:
        self.length += len(data)
        for sink in self.sinks:
            sink.update(data)


def _content_end(data: bytes) -> int:
    """Where the trailing run of whole CRLF pairs of `data` begins."""
    stripped = len(data.rstrip(b"\r\n"))
    tail = len(data) - stripped
    if tail % 2 == 0 and data.endswith(b"\r\n" * (tail // 2)):
        return stripped
    end = len(data)
    while end - 2 >= stripped and data[end - 2:end] == b"\r\n":
        end -= 2
    return end


def _hash_body(f: Any, wanted: Iterable[BodyKey]) -> dict[BodyKey, tuple[bytes, int]]:
    """{body key: (digest, canonical body length)} over the rest of `f`."""
    hashes: dict[BodyKey, _LimitedHash] = {}
    for key in wanted:
        if key not in hashes:
            hashes[key] = _LimitedHash(key[1], key[2])
    canons = {}
    for relaxed in (False, True):
        sinks = [h for k, h in hashes.items() if k[0] == relaxed]
        if sinks:
            canons[relaxed] = _BodyCanonicalizer(relaxed, sinks)
    if not canons:
        return {}
    while chunk := f.read(CHUNK):
        for c in canons.values():
            c.update(chunk)
    for c in canons.values():
        c.finish()
    return {k: (h.hash.digest(), canons[k[0]].length) for k, h in hashes.items()}


def _body_key(tags: dict[bytes, bytes], default_c: bytes = b"simple/simple") -> BodyKey:
    """The body hash a signature asks for; ValueError when c=, a= or l= is bad."""
    relaxed = _relaxed_body(tags.get(b"c", default_c))
    hash_name = _HASHES.get(tags.get(b"a", b""))
    if hash_name is None:
        raise ValueError("unknown algorithm")
    length = tags.get(b"l")
    if length is not None and not (length.isdigit() and len(length) <= 76):
        raise ValueError("bad l= value")
    return (relaxed, hash_name, int(length) if length is not None else None)


@cache_short(maxsize=64)
def _relaxed_body(c: bytes) -> bool:
    """Whether a c= value asks for the relaxed body canonicalization; ValueError when it
    is not a c= value.  Remembered: there are four valid values and few invalid ones."""
    try:
        policy = CanonicalizationPolicy.from_c_value(c)
    except InvalidCanonicalizationPolicyError as e:
        raise ValueError(f"bad c= value {_text(e.args[0] if e.args else b'')}") from None
    return policy.body_algorithm.name == b"relaxed"


# -- DKIM -------------------------------------------------------------------------------

class _Verdict(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _b64(value: bytes, tag: str) -> bytes:
    try:
        decoded = base64.b64decode(value.translate(None, _SPACES), validate=True)
    except (binascii.Error, ValueError):
        raise _Verdict("permerror", f"bad base64 in {tag}=") from None
    if not decoded:
        raise _Verdict("permerror", f"empty {tag}=")
    return decoded


@dataclass
class _Signature:
    """One DKIM-Signature field between parsing and verification."""

    field: list[bytes]
    tags: dict[bytes, bytes]
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""
    body_length: int | None = None
    identity: str = ""
    verdict: _Verdict | None = None     # decided before the body is read
    key_name: str = ""
    include: tuple[bytes, ...] = ()
    body_key: BodyKey | None = None
    signature: bytes = b""
    body_hash: bytes = b""


def _prepare(fld: list[bytes], now: float) -> _Signature:
    """Parse and check the field (RFC 6376 3.5, 6.1.1); never raises."""
    tags = _tags(fld[1])
    shown = tags if tags is not None else _lenient_tags(fld[1])
    length = shown.get(b"l", b"")
    sig = _Signature(fld, tags or {}, domain=_text(shown.get(b"d")).lower(),
                     selector=_text(shown.get(b"s")).lower(),
                     algorithm=_text(shown.get(b"a"), 40).lower(),
                     b=_text(shown.get(b"b", b"").translate(None, _SPACES), 1024),
                     body_length=int(length) if length.isdigit() and len(length) <= 76 else None,
                     identity=_text(shown.get(b"i")))
    try:
        if tags is None:
            raise _Verdict("permerror", "malformed tag list")
        _check_fields(sig, tags, now)
    except _Verdict as v:
        sig.verdict = v
    except Exception as e:   # never let one odd field stop the others
        sig.verdict = _Verdict("permerror", f"malformed signature ({type(e).__name__})")
    return sig


def _check_fields(sig: _Signature, tags: dict[bytes, bytes], now: float) -> None:
    """RFC 6376 6.1.1: what makes a signature unusable before any key is fetched."""
    for tag in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s"):
        if tag not in tags:
            raise _Verdict("permerror", f"missing {tag.decode()}= tag")
    if tags[b"v"] != b"1":
        raise _Verdict("permerror", "unsupported version")
    algorithm = tags[b"a"].lower()
    if algorithm not in _HASHES:
        raise _Verdict("permerror", "unknown algorithm")
    tags[b"a"] = algorithm
    sig.signature = _b64(tags[b"b"], "b")
    sig.body_hash = _b64(tags[b"bh"], "bh")
    try:
        sig.body_key = _body_key(tags)
    except ValueError as e:
        raise _Verdict("permerror", str(e)) from None
    name = _key_name(tags)
    if name is None:
        raise _Verdict("permerror", "bad d= or s= value")
    sig.key_name = name
    sig.include = _signed_names(tags[b"h"])
    if b"from" not in sig.include:
        raise _Verdict("permerror", "From field not signed")   # 5.4, 6.1.1
    if b"i" in tags:
        i_domain = tags[b"i"].rpartition(b"@")[2].lower().rstrip(b".")
        d = tags[b"d"].lower().rstrip(b".")
        if b"@" not in tags[b"i"] or not (i_domain == d or i_domain.endswith(b"." + d)):
            raise _Verdict("permerror", "i= not within d=")
    q = tags.get(b"q")
    if q is not None and b"dns/txt" not in [m.strip().lower() for m in q.split(b":")]:
        raise _Verdict("permerror", "unsupported q= method")
    t = tags.get(b"t")
    if t is not None and not t.isdigit():
        raise _Verdict("permerror", "bad t= value")
    x = tags.get(b"x")
    if x is not None:
        if not x.isdigit():
            raise _Verdict("permerror", "bad x= value")
        if t is not None and int(x) < int(t):
            raise _Verdict("permerror", "x= before t=")   # 3.5 x=
        if int(x) + EXPIRY_SLOP < now:
            raise _Verdict("fail", "signature expired")
    if algorithm == b"rsa-sha1":
        raise _Verdict("policy", "rsa-sha1 not accepted (RFC 8301)")


@cache_short(maxsize=256)   # h= is the same for all of a sender's mail
def _signed_names(h: bytes) -> tuple[bytes, ...]:
    """The lower-case field names of h= (RFC 6376 3.5), in order.  (Split at the colons,
    then stripped: a regular expression's split on white space around them rescans a
    long run of it from each of its positions.)"""
    return tuple(name.strip().lower() for name in h.split(b":") if name.strip())


@cache_short(maxsize=512, longest=4096)   # an RSA-4096 key record is about 750 bytes
def _key_record(record: bytes) -> tuple[dict[bytes, bytes], bytes, Any, int] | _Verdict:
    """A key record parsed once (RFC 6376 3.6.1, RFC 8463 4): (tags, key type, public key,
    bits), or the verdict for a record that cannot be used.  Remembered: the same few
    keys sign most of the mail a server receives, and loading one costs more than the
    verification itself."""
    try:
        key = parse_tag_value(_NEWLINE.sub(b"", record))
    except (InvalidTagValueList, ValueError):
        return _Verdict("permerror", "malformed key record")
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        return _Verdict("permerror", "bad key record version")
    if b"p" not in key:
        return _Verdict("permerror", "malformed key record (no p=)")
    p = key[b"p"].translate(None, _SPACES)
    if not p:
        return _Verdict("permerror", "key revoked")
    ktype = key.get(b"k", b"rsa").lower()
    if ktype not in (b"rsa", b"ed25519"):
        return _Verdict("permerror", "unknown key type")
    try:
        raw = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        return _Verdict("permerror", "malformed public key")
    if ktype == b"ed25519":
        if len(raw) != 32:
            return _Verdict("permerror", "malformed public key")
        return key, ktype, Ed25519PublicKey.from_public_bytes(raw), 256
    try:
        public = load_der_public_key(raw)   # SubjectPublicKeyInfo, what RFC 6376 3.6.1 says
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:   # some publish a bare RSAPublicKey; dkimpy's reader takes both
            numbers = parse_public_key(raw)
            public = RSAPublicNumbers(numbers["publicExponent"],
                                      numbers["modulus"]).public_key()
        except Exception:   # dkimpy's ASN.1 reader fails many ways
            return _Verdict("permerror", "malformed public key")
    if not isinstance(public, RSAPublicKey):
        return _Verdict("permerror", "malformed public key")
    return key, ktype, public, public.key_size


def _public_key(record: bytes, sig: _Signature, min_rsa_bits: int) -> tuple[bytes, Any]:
    """(key type, key) for this signature, or a _Verdict raised (RFC 6376 3.6.1)."""
    parsed = _key_record(record)
    if isinstance(parsed, _Verdict):   # a fresh one: a remembered exception would keep tracebacks
        raise _Verdict(parsed.result, parsed.reason)
    key, ktype, public, bits = parsed
    algorithm = sig.tags[b"a"]
    if b"h" in key:
        allowed = [h.strip().lower() for h in key[b"h"].split(b":")]
        if _HASHES[algorithm].encode() not in allowed:
            raise _Verdict("permerror", "hash algorithm not allowed by key")
    if b"s" in key:
        services = [s.strip().lower() for s in key[b"s"].split(b":")]
        if b"*" not in services and b"email" not in services:
            raise _Verdict("permerror", "key not for email")
    flags = [f.strip().lower() for f in key.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in sig.tags:
        i_domain = sig.tags[b"i"].rpartition(b"@")[2].lower().rstrip(b".")
        if i_domain != sig.tags[b"d"].lower().rstrip(b"."):
            raise _Verdict("permerror", "i= domain must equal d= for this key (t=s)")
    if ktype != _KEY_TYPES[algorithm]:
        raise _Verdict("permerror", "key type does not match a=")
    if ktype == b"rsa" and bits < min_rsa_bits:
        raise _Verdict("policy", f"key too short ({bits} bits)")   # RFC 8301 3.2
    return ktype, public


def _verify(sig: _Signature, headers: list[list[bytes]], keys: dict[str, Any],
            bodies: dict[BodyKey, tuple[bytes, int]], min_rsa_bits: int) -> tuple[str, str]:
    """RFC 6376 6.1.2 (key) and 6.1.3 (body hash, then header hash and signature)."""
    if sig.verdict is not None:
        return sig.verdict.result, sig.verdict.reason
    try:
        record = keys.get(sig.key_name, ...)
        if record is ...:
            raise _Verdict("temperror", "key not looked up")
        if isinstance(record, str):
            if record == "error":
                raise _Verdict("temperror", "key lookup failed (DNS error)")
            record = record.encode("utf-8", "replace")
        if record is None:
            raise _Verdict("permerror", "key not found")
        ktype, key = _public_key(record, sig, min_rsa_bits)
        assert sig.body_key is not None
        digest, canonical_length = bodies[sig.body_key]
        limit = sig.body_key[2]
        if limit is not None and limit > canonical_length:
            raise _Verdict("fail", "body shorter than l=")
        if digest != sig.body_hash:
            raise _Verdict("fail", "body hash mismatch")
        # A second From field would slip past a signature that signed only one (8.15).
        froms = sum(1 for n, _ in headers if n.lower() == b"from")
        if froms > sig.include.count(b"from"):
            raise _Verdict("fail", "unsigned From field present")
        hasher = hashlib.new(sig.body_key[1])
        _hash_headers(hasher, sig, headers)
        try:
            if ktype == b"ed25519":
                key.verify(sig.signature, hasher.digest())   # RFC 8463 3
            else:   # RFC 8017 8.2.2, OpenSSL's through cryptography
                key.verify(sig.signature, hasher.digest(), PKCS1v15(),
                           Prehashed(_PREHASHED[sig.body_key[1]]))
            ok = True
        except InvalidSignature:
            ok = False
        except ValueError:   # a signature of the wrong length for the key
            ok = False
        if not ok:
            raise _Verdict("fail", "signature did not verify")
        return "pass", "signature verified"
    except _Verdict as v:
        return v.result, v.reason


def _relaxed_headers(fields: Iterable[Any]) -> list[tuple[bytes, bytes]]:
    """RFC 6376 3.4.2, as dkimpy's Relaxed.canonicalize_headers: name lower-case without
    trailing white space; value unfolded, WSP runs as one SP, stripped, CRLF."""
    out = []
    for name, value in fields:
        value = _unfold(value)
        if b"\t" in value or b"  " in value:
            value = _WSP_RUN.sub(b" ", value)
        out.append((name.lower().rstrip(), value.strip() + b"\r\n"))
    return out


def _select_headers(headers: list[list[bytes]], include: Iterable[bytes]) -> list[list[bytes]]:
    """RFC 6376 5.4.2, as dkim.select_headers: for each name of h= (lower-case), the
    next field of that name from the bottom up; a name with no field left selects none."""
    names = [h[0].lower() for h in headers]
    selected = []
    last: dict[bytes, int] = {}
    for name in include:
        i = last.get(name, len(headers))
        while i > 0:
            i -= 1
            if names[i] == name:
                selected.append(headers[i])
                break
        last[name] = i
    return selected


def _hash_headers(hasher: Any, sig: _Signature, headers: list[list[bytes]]) -> None:
    """RFC 6376 3.7: the fields h= names (bottom-up, 5.4.2), then the signature field
    with b= emptied and no final CRLF, canonicalized as c= says; what dkimpy's
    hash_headers does, with a b= stripper that is linear in the field."""
    relaxed = sig.tags.get(b"c", b"simple/simple").split(b"/")[0].strip() == b"relaxed"
    fields = _select_headers(headers, sig.include)
    own = [(sig.field[0], _BTAG.sub(b"\\1", sig.field[1]))]
    if relaxed:   # canonicalization is per field: only the selected ones need it
        fields, own = _relaxed_headers(fields), _relaxed_headers(own)
    parts = []
    for name, value in fields:
        parts += (name, b":", value)
    for name, value in own:
        parts += (name, b":", value.rstrip())
    hasher.update(b"".join(parts))


def _header_b(values: list[str]) -> list[str]:
    """RFC 6008 2: the shortest prefix of each b= (at least HEADER_B_MIN characters) that
    no other signature's b= shares."""
    out = []
    for i, b in enumerate(values):
        n = min(HEADER_B_MIN, len(b))
        others = [o for j, o in enumerate(values) if j != i and o != b]
        while n < len(b) and any(o.startswith(b[:n]) for o in others):
            n += 1
        out.append(b[:n])
    return out


# -- ARC --------------------------------------------------------------------------------

class _StreamedARC(dkim.ARC):
    """dkimpy's ARC verifier over a header list, with ARC-Message-Signature body hashes
    taken from the streamed body instead of a body in memory."""

    def __init__(self, headers: list[list[bytes]], keys: dict[str, Any],
                 min_rsa_bits: int) -> None:
        super().__init__(None, minkey=min_rsa_bits)
        self.headers = headers
        self.body = b""
        self.keys = keys
        self.bodies: dict[BodyKey, tuple[bytes, int]] = {}
        self.problems: list[str] = []
        self.newest = 0

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):  # type: ignore[no-untyped-def]
        # Only the newest ARC-Message-Signature must validate (RFC 8617 5.2 step 4):
        # older ones are neither looked up nor hashed.
        if b"bh" in sig and _instance(sig) != self.newest:
            return False
        return super().verify_sig(sig, include_headers, sig_header, dnsfunc)

    def lookup(self, name: bytes, timeout: int = 5) -> bytes | None:
        key = name.decode("ascii", "replace").lower().rstrip(".")
        record = self.keys.get(key, ...)
        if record is ...:
            self.problems.append(f"key {key} not looked up")
            raise dkim.DnsTimeoutError(key)
        if record == "error":
            self.problems.append(f"key {key}: DNS error")
            raise dkim.DnsTimeoutError(key)
        if record is None:
            self.problems.append(f"key {key} not found")
        elif isinstance(record, str):
            record = record.encode("utf-8", "replace")
        return record

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):  # type: ignore[no-untyped-def]
        if b"bh" in sig:
            try:
                wanted = base64.b64decode(sig[b"bh"].translate(None, _SPACES), validate=True)
                got = self.bodies.get(_body_key(sig, b"relaxed/relaxed"))
            except (binascii.Error, ValueError):
                raise dkim.ValidationError("malformed bh=") from None
            if got is None:   # an older instance's body hash: not needed (RFC 8617 5.2)
                raise dkim.ValidationError("body not hashed")
            if got[0] != wanted:
                self.problems.append("body hash mismatch")
                raise dkim.ValidationError("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)


class _ArcCheck:
    """RFC 8617 5.2 chain validation, in two steps around the body stream."""

    def __init__(self, headers: list[list[bytes]], keys: dict[str, Any],
                 min_rsa_bits: int) -> None:
        self.fields = [(n.lower(), v) for n, v in headers if n.lower() in _ARC_FIELDS]
        # dkimpy's verifier only for a chain to verify (most mail has none)
        self.arc = _StreamedARC(headers, keys, min_rsa_bits) if self.fields else None
        self.max_instance = 0
        self.body_keys: list[BodyKey] = []
        self.early: ARCResult | None = None
        self.sealers: tuple[str, ...] = ()
        self.last_aar = ""
        try:
            self._prepare()
        except Exception as e:   # dkimpy on garbage: a broken chain, not a crash
            self.early = ARCResult("fail", self.max_instance, self.sealers,
                                   f"malformed ARC header fields ({type(e).__name__})")

    def _prepare(self) -> None:
        if not self.fields:
            self.early = ARCResult("none", 0, (), "no ARC header fields")
            return
        instances = [(name, _arc_instance(name, v), v) for name, v in self.fields]
        self.max_instance = max(i for _, i, _ in instances)
        seals = {i: _tags(v) or {} for name, i, v in instances if name == b"arc-seal"}
        self.sealers = tuple(_text(seals[i].get(b"d")).lower()
                             for i in sorted(seals) if i)
        for name, i, v in instances:
            if name == b"arc-authentication-results" and i == self.max_instance:
                self.last_aar = _NEWLINE.sub(b"", v).decode("utf-8", "replace").strip()
        if any(i == 0 for _, i, _ in instances):
            self.early = ARCResult("fail", self.max_instance, self.sealers,
                                   "ARC header field without a valid i=")
            return
        if self.max_instance > MAX_ARC_INSTANCES:
            self.early = ARCResult("fail", self.max_instance, self.sealers,
                                   "too many ARC sets")
            return
        if any(len(v) > MAX_ARC_FIELD for _, _, v in instances):
            self.early = ARCResult("fail", self.max_instance, self.sealers,
                                   f"ARC header field over {MAX_ARC_FIELD} bytes")
            return
        for name, i, v in instances:
            if name == b"arc-message-signature" and i == self.max_instance:
                tags = _tags(v)
                if tags is not None:
                    try:
                        self.body_keys.append(_body_key(tags, b"relaxed/relaxed"))
                    except ValueError:
                        pass   # dkimpy reports it while verifying

    def finish(self, bodies: dict[BodyKey, tuple[bytes, int]]) -> ARCResult:
        if self.early is not None:
            return self.early
        assert self.arc is not None   # there are ARC fields: no early result otherwise
        self.arc.bodies = bodies
        self.arc.newest = self.max_instance
        try:
            cv, _, reason = self.arc.verify(dnsfunc=self.arc.lookup)
        except Exception as e:
            cv, reason = dkim.CV_Fail, f"malformed ARC set ({type(e).__name__})"
        if cv == dkim.CV_Pass:
            return ARCResult("pass", self.max_instance, self.sealers, "chain validated",
                             self.last_aar)
        detail = _text(reason.encode() if isinstance(reason, str) else reason, 160)
        if self.arc.problems:
            detail += f" ({'; '.join(dict.fromkeys(self.arc.problems))})"
        return ARCResult("fail", self.max_instance, self.sealers, detail[:300], self.last_aar)


# -- the whole message ------------------------------------------------------------------

def verify_file(path: Any, keys: dict[str, bytes | None | str], *, check_arc: bool = True,
                min_rsa_bits: int = 1024) -> tuple[list[DKIMResult], ARCResult]:
    """Verify the DKIM-Signature fields (the topmost MAX_SIGNATURES; the next ones up to
    MAX_REPORTED are reported as "policy", any further ones not at all) and the ARC
    chain of the message in `path` (CRLF, as received).  `keys` maps the names from
    key_names() to the TXT record (None: no such record; "error": the lookup failed).
    Results are in header order.  Raises only OSError when the file cannot be read."""
    now = time.time()
    with _open(path) as f:
        block, complete = _read_header(f)
        headers = parse_header_block(block)
        sig_fields = [h for h in headers if h[0].lower() == b"dkim-signature"]
        sigs = [_prepare(h, now) for h in sig_fields[:MAX_REPORTED]]
        for sig in sigs[MAX_SIGNATURES:]:
            sig.verdict = _Verdict("policy", "too many signatures")
        arc = _ArcCheck(headers, keys, min_rsa_bits) if check_arc else None
        if not complete:
            for sig in sigs:
                sig.verdict = _Verdict("permerror", "header section too large")
            if arc is not None and arc.early is None:
                arc.early = ARCResult("fail", arc.max_instance, arc.sealers,
                                      "header section too large")
        wanted = [s.body_key for s in sigs if s.verdict is None and s.body_key is not None]
        if arc is not None and arc.early is None:
            wanted += arc.body_keys
        bodies = _hash_body(f, wanted) if wanted else {}
    arc_result = (arc.finish(bodies) if arc is not None
                  else ARCResult("none", 0, (), "not checked"))
    return _results(sigs, headers, keys, bodies, min_rsa_bits), arc_result


def _results(sigs: list[_Signature], headers: list[list[bytes]], keys: dict[str, Any],
             bodies: dict[BodyKey, tuple[bytes, int]], min_rsa_bits: int) -> list[DKIMResult]:
    results = []
    for sig, b in zip(sigs, _header_b([s.b for s in sigs])):
        try:
            result, reason = _verify(sig, headers, keys, bodies, min_rsa_bits)
        except Exception as e:   # garbage dkimpy did not expect: still just a result
            result, reason = "permerror", f"unverifiable signature ({type(e).__name__})"
        results.append(DKIMResult(result, sig.domain, sig.selector, sig.algorithm, b,
                                  sig.body_length, reason, sig.identity))
    return results


def key_names_in_file(path: Any, include_arc: bool) -> list[str]:
    """key_names() of the message in `path` (positional arguments: a worker calls it)."""
    return key_names(read_header_block(path), include_arc=include_arc)


def verify_path(path: Any, keys: dict[str, bytes | None | str],
                check_arc: bool) -> tuple[list[DKIMResult], ARCResult]:
    """verify_file() with positional arguments (a worker calls it)."""
    return verify_file(path, keys, check_arc=check_arc)
