"""End-to-end test support for the inbound checks of the MX (SPF, DKIM, DMARC, ARC, rspamd,
DNSBL).

- `SigningKeys` / `dkim_sign` / `arc_seal`: the test signs and seals messages itself with
  dkimpy, as a remote domain and a mailing list would, against keys published in the test
  DNS zone (tests/e2e/dnsserver.py, served by `outbound_helpers.DNSServer`).
- `inbound_server`: a server whose checks resolve with the test DNS server only (never
  the system resolver: the machine has no network).
- `send`: one SMTP transaction that reports the reply of the step that ended it instead
  of raising, from any loopback source address.
- `parse_auth_results` / `our_auth_results`: Authentication-Results (RFC 8601) parsed into
  method, result and properties, comments and folding ignored.
"""

from __future__ import annotations

import base64
import re
import smtplib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import dkim

from harness import (
    HOSTNAME,
    ServerProcess,
    SMTPClient,
    header_fields,
    maildir_messages,
    split_header_body,
)

ALICE = "alice@example.test"


# -- keys ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SigningKeys:
    """An RSA 2048 key and an Ed25519 key, in the forms dkimpy and DNS want them."""

    rsa_pem: bytes          # PKCS#1 PEM, for dkimpy
    rsa_public: str         # base64 SubjectPublicKeyInfo, the p= of a k=rsa record
    ed25519_seed: bytes     # base64 of the 32-byte private seed, for dkimpy (PyNaCl form)
    ed25519_public: str     # base64 of the raw 32-byte public key (RFC 8463 4.2)

    @classmethod
    def generate(cls) -> "SigningKeys":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        pub = ed.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
        return cls(pem, base64.b64encode(spki).decode(), base64.b64encode(seed),
                   base64.b64encode(pub).decode())

    @property
    def rsa_record(self) -> str:
        """The TXT value of a selector record (over 255 bytes: dnsserver.py splits it)."""
        return f"v=DKIM1; k=rsa; p={self.rsa_public}"

    @property
    def ed25519_record(self) -> str:
        return f"v=DKIM1; k=ed25519; p={self.ed25519_public}"


# -- signing and sealing ---------------------------------------------------------------------

SIGNED_HEADERS = (b"from", b"to", b"subject", b"date", b"message-id")


def dkim_sign(message: bytes, domain: str, selector: str, keys: SigningKeys, *,
              algorithm: str = "rsa-sha256",
              headers: Iterable[bytes] = SIGNED_HEADERS) -> bytes:
    """`message` with a DKIM-Signature (relaxed/relaxed) of `domain` prepended."""
    key = keys.ed25519_seed if algorithm == "ed25519-sha256" else keys.rsa_pem
    signature = dkim.sign(message, selector.encode(), domain.encode(), key,
                          signature_algorithm=algorithm.encode(),
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=list(headers))
    return signature + message


def arc_seal(message: bytes, domain: str, selector: str, keys: SigningKeys, *,
             authserv_id: str, results: str,
             headers: Iterable[bytes] = SIGNED_HEADERS + (b"list-id",),
             timestamp: int | None = None) -> bytes:
    """`message` as the sealer `domain` passes it on (RFC 8617 4.1): its own
    Authentication-Results "<authserv_id>; <results>" added, then the ARC set that
    dkimpy's arc_sign makes from it (rsa-sha256, relaxed/relaxed)."""
    message = f"Authentication-Results: {authserv_id};\r\n {results}\r\n".encode() + message
    arc_set = dkim.arc_sign(message, selector.encode(), domain.encode(), keys.rsa_pem,
                            authserv_id.encode(), include_headers=list(headers),
                            timestamp=timestamp)
    return b"".join(arc_set) + message


def zone_txt(zone: list[list]) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` answering TXT from the test zone (strings joined)."""
    table: dict[str, bytes] = {}
    for name, rtype, *args in zone:
        if rtype == "TXT":
            table[name.lower().rstrip(".")] = "".join(args).encode()

    def dnsfunc(qname: bytes | str, timeout: int = 5) -> bytes | None:
        if isinstance(qname, bytes):
            qname = qname.decode()
        return table.get(qname.lower().rstrip("."))

    return dnsfunc


# -- message editing -------------------------------------------------------------------------

def replace_header(message: bytes, name: str, value: str) -> bytes:
    """`message` with the (unfolded, single-line) field `name` given a new value."""
    head, sep, body = message.partition(b"\r\n\r\n")
    pattern = re.compile(rb"(?im)^" + re.escape(name.encode()) + rb":[^\r\n]*")
    new_head, n = pattern.subn(f"{name}: {value}".encode().replace(b"\\", b"\\\\"), head, 1)
    assert n == 1, f"no {name} field in {head!r}"
    return new_head + sep + body


def add_header(message: bytes, field_line: str) -> bytes:
    """`message` with one more field at the end of its header section."""
    head, sep, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n" + field_line.encode() + sep + body


# -- the server ------------------------------------------------------------------------------

def inbound_server(make_server: Callable[..., ServerProcess], dns: Any, *, start: bool = True,
                   inbound: dict[str, Any] | None = None,
                   limits: dict[str, Any] | None = None, **overrides: Any) -> ServerProcess:
    """A server (users alice, bob, carol) with the inbound checks on for every client.

    [inbound] defaults for tests: trusted_networks = [] (loopback clients are checked) and
    greet_delay = 0; `inbound` adds to or changes those (a value of None removes the key,
    so the server's own default applies).  DNS goes to the test DNS server only.
    """
    section: dict[str, Any] = {"trusted_networks": [], "greet_delay": 0}
    section.update(inbound or {})
    section = {k: v for k, v in section.items() if v is not None}
    relay = {"resolver": dns.address}
    relay.update(overrides.pop("relay", {}))
    return make_server(start=start, relay=relay, limits=dict(limits or {}), inbound=section,
                       **overrides)


# -- SMTP ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """How one SMTP transaction ended: the step and the reply that ended it."""

    stage: str       # "connect" | "ehlo" | "mail" | "rcpt" | "data" | "done"
    code: int
    text: str
    rcpt_replies: list[tuple[int, str]] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.stage == "done" and 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.stage}: {self.code} {self.text}"


def send(server: ServerProcess, message: bytes, sender: str, rcpts: Iterable[str] = (ALICE,),
         *, source: str = "127.0.0.1", helo: str = "client.remote.test",
         timeout: float = 30) -> Outcome:
    """MAIL / RCPT / DATA over the MX port from loopback address `source`; the reply that
    ended the transaction (end of DATA when it got that far)."""
    rcpts = list(rcpts)
    try:
        client = smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname=helo,
                              timeout=timeout, source_address=(source, 0))
    except (OSError, smtplib.SMTPException) as e:
        return Outcome("connect", 0, repr(e))
    try:
        code, text = client.ehlo()
        if code != 250:
            return Outcome("ehlo", code, text.decode(errors="replace"))
        code, text = client.mail(sender)
        if code != 250:
            return Outcome("mail", code, text.decode(errors="replace"))
        replies = []
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            replies.append((code, text.decode(errors="replace")))
        if not any(200 <= c < 300 for c, _ in replies):
            code, text = replies[-1]
            return Outcome("rcpt", code, text, replies)
        code, text = client.data(message)
        return Outcome("done" if 200 <= code < 300 else "data", code,
                       text.decode(errors="replace"), replies)
    except smtplib.SMTPServerDisconnected as e:
        return Outcome("disconnected", 0, str(e))
    except smtplib.SMTPResponseException as e:      # DATA itself refused
        return Outcome("data-command", e.smtp_code, e.smtp_error.decode(errors="replace"))
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


class SourcedClient(SMTPClient):
    """The harness's raw SMTP client, connecting from a chosen loopback address."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.buf = b""


# -- stored messages -------------------------------------------------------------------------

def folder_messages(server: ServerProcess, address: str, folder: str | None = None) -> list[Path]:
    """Messages in new/ and cur/ of `address`'s INBOX or of a folder (Maildir++ ".Name")."""
    path = server.maildir(address)
    if folder:
        path = path / ("." + folder)
    return maildir_messages(path)


def keyword_letters(folder_dir: Path) -> dict[str, str]:
    """dovecot-keywords of a Maildir folder: {letter: keyword} (index 0 is "a")."""
    out: dict[str, str] = {}
    path = folder_dir / "dovecot-keywords"
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        index, _, name = line.strip().partition(" ")
        if index.isdigit() and name and int(index) < 26:
            out[chr(ord("a") + int(index))] = name
    return out


def file_keywords(path: Path) -> set[str]:
    """The keywords a Maildir file name carries: the letters of its ":2," info mapped
    through its folder's dovecot-keywords."""
    _, sep, info = path.name.rpartition(":2,")
    if not sep:
        return set()
    table = keyword_letters(path.parent.parent)
    return {table.get(c, f"?{c}") for c in info if "a" <= c <= "z"}


# -- Authentication-Results (RFC 8601) ------------------------------------------------------

@dataclass
class AuthResult:
    method: str                    # "spf", "dkim", ... (lower case, version dropped)
    result: str                    # "pass", "fail", ... (lower case)
    props: dict[str, str]          # {"header.d": "example.net", "reason": "...", ...}


@dataclass
class AuthResults:
    authserv_id: str               # lower case
    results: list[AuthResult]
    raw: str

    def of(self, method: str) -> list[AuthResult]:
        return [r for r in self.results if r.method == method]

    def results_of(self, method: str) -> list[str]:
        return [r.result for r in self.of(method)]


def strip_comments(text: str) -> str:
    """CFWS comments (nested parentheses) removed; quoted strings kept as they are."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for c in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(c)
            continue
        if c == "\\":
            escaped = True
            if depth == 0:
                out.append(c)
            continue
        if quoted:
            out.append(c)
            if c == '"':
                quoted = False
            continue
        if c == "(":
            depth += 1
            continue
        if c == ")" and depth:
            depth -= 1
            out.append(" ")
            continue
        if depth:
            continue
        if c == '"':
            quoted = True
        out.append(c)
    return "".join(out)


def _split_unquoted(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def parse_auth_results(value: str) -> AuthResults:
    """One Authentication-Results value (unfolded or not), tolerant of spacing."""
    text = strip_comments(re.sub(r"\r?\n[ \t]", " ", value))
    text = re.sub(r"\s*=\s*", "=", text)
    parts = _split_unquoted(text, ";")
    head = parts[0].split()
    authserv_id = head[0].lower() if head else ""
    results = []
    for part in parts[1:]:
        tokens = part.split()
        if not tokens or tokens[0].lower() == "none":
            continue
        method, _, result = tokens[0].partition("=")
        props = {}
        for token in tokens[1:]:
            key, eq, val = token.partition("=")
            if eq:
                props[key.lower()] = val.strip('"')
        results.append(AuthResult(method.split("/")[0].lower(), result.lower(), props))
    return AuthResults(authserv_id, results, value)


def header_block_fields(data: bytes) -> list[tuple[str, str]]:
    head, _ = split_header_body(data)
    return header_fields(head)


def all_auth_results(data: bytes) -> list[AuthResults]:
    return [parse_auth_results(v) for n, v in header_block_fields(data)
            if n.lower() == "authentication-results"]


def our_auth_results(data: bytes, authserv_id: str = HOSTNAME) -> list[AuthResults]:
    """The Authentication-Results fields of `data` that carry our authserv-id."""
    return [ar for ar in all_auth_results(data) if ar.authserv_id == authserv_id.lower()]


def the_auth_results(data: bytes, authserv_id: str = HOSTNAME) -> AuthResults:
    """Exactly one of ours, or an assertion error that shows the header section."""
    ours = our_auth_results(data, authserv_id)
    head, _ = split_header_body(data)
    assert len(ours) == 1, (f"expected one Authentication-Results of {authserv_id}, found "
                            f"{len(ours)}:\n{head.decode(errors='replace')}")
    return ours[0]
