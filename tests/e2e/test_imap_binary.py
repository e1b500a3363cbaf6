"""RFC 3516 BINARY against a real server: FETCH BINARY / BINARY.PEEK / BINARY.SIZE of
base64, quoted-printable and 7bit parts (literal8 for data with NULs), partial fetches in
decoded octets, \\Seen, NO [UNKNOWN-CTE], APPEND with a literal8, and a 20 MB base64
attachment whose decoding does not grow the server by the size of the part."""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from pathlib import Path

import pytest

from harness import PASSWORD, proc_status_kb
from imap_helpers import (
    RawIMAP,
    close_quietly,
    imap_login,
    imaplib_ok,
    module_server,
    new_user,
    quote,
)

imap_server = module_server()

PAYLOAD = bytes(range(256)) * 64 + b"\x00end"
TEXT = "Grüße aus Köln\r\nzweite Zeile mit = und Leerzeichen  \r\n".encode("utf-8")


def b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def message() -> bytes:
    qp = binascii.b2a_qp(TEXT.replace(b"\r\n", b"\n"), istext=True).replace(b"\n", b"\r\n")
    return (b"From: a@remote.test\r\nTo: b@example.test\r\nSubject: binary parts\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"sep\"\r\n\r\n"
            b"--sep\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp +
            b"\r\n--sep\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(PAYLOAD) +
            b"\r\n--sep\r\nContent-Type: application/x-zipped\r\n"
            b"Content-Transfer-Encoding: x-gzip64\r\n\r\nH4sIAAAAAAAA\r\n"
            b"--sep--\r\n")


def literal(response: bytes, name: bytes) -> tuple[bytes, bytes]:
    """(b"~" for a literal8 else b"", octets) of the item `name` in a FETCH response."""
    m = re.search(re.escape(name) + rb" (~?)\{(\d+)\}\r\n", response)
    assert m, f"no {name!r} literal in {response[:400]!r}"
    return m.group(1), response[m.end():m.end() + int(m.group(2))]


@pytest.fixture(scope="module")
def account(imap_server):
    user = new_user(imap_server, "bin")
    c = RawIMAP.login(imap_server, user)
    r = c.append("INBOX", message())
    assert r.status == "OK", str(r)
    close_quietly(c)
    return user


def test_capability(imap_server, account):
    c = RawIMAP.login(imap_server, account)
    try:
        assert "BINARY" in c.capabilities()
    finally:
        close_quietly(c)


def test_fetch_binary_decodes_each_encoding(imap_server, account):
    c = RawIMAP.login(imap_server, account, select="INBOX")
    try:
        r = c.ok("FETCH 1 (BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[1] BINARY.SIZE[2])")
        line = r.untagged[0]
        assert literal(line, b"BINARY[1]") == (b"", TEXT)       # no NUL: a plain literal
        assert literal(line, b"BINARY[2]") == (b"~", PAYLOAD)   # NULs: literal8
        assert b"BINARY.SIZE[1] %d" % len(TEXT) in line
        assert b"BINARY.SIZE[2] %d" % len(PAYLOAD) in line
        # Partial fetches count decoded octets.
        r = c.ok("FETCH 1 (BINARY.PEEK[2]<100.50> BINARY.PEEK[1]<6.8>)")
        assert literal(r.untagged[0], b"BINARY[2]<100>")[1] == PAYLOAD[100:150]
        assert literal(r.untagged[0], b"BINARY[1]<6>")[1] == TEXT[6:14]
    finally:
        close_quietly(c)


def test_unknown_encoding_is_no_unknown_cte(imap_server, account):
    c = RawIMAP.login(imap_server, account, select="INBOX")
    try:
        for item in ("BINARY.PEEK[3]", "BINARY.SIZE[3]"):
            r = c.command(f"FETCH 1 {item}")
            assert r.status == "NO" and r.code == b"UNKNOWN-CTE", str(r)
        c.ok("STORE 1 -FLAGS (\\Seen)")
        flags_before = c.command("FETCH 1 (FLAGS)").untagged
        # A refused BINARY (not PEEK) must not mark the message read (RFC 3516 4.3).
        r = c.command("FETCH 1 BINARY[3]")
        assert r.status == "NO" and r.code == b"UNKNOWN-CTE", str(r)
        assert c.command("FETCH 1 (FLAGS)").untagged == flags_before
        assert c.command("NOOP").status == "OK"
    finally:
        close_quietly(c)


def test_binary_sets_seen_like_body(imap_server):
    user = new_user(imap_server, "binseen")
    c = RawIMAP.login(imap_server, user)
    try:
        assert c.append("INBOX", message()).status == "OK"
        c.select("INBOX")
        r = c.ok("FETCH 1 (BINARY.PEEK[1] FLAGS)")
        assert b"\\Seen" not in r.untagged[0]
        r = c.ok("FETCH 1 BINARY[1]")
        assert b"\\Seen" in b"".join(r.untagged)
    finally:
        close_quietly(c)


def test_append_literal8_with_imaplib_and_raw(imap_server):
    user = new_user(imap_server, "bin8")
    data = b"Subject: raw\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\x02\xff\r\n"
    c = RawIMAP.login(imap_server, user)
    try:
        tag = c.next_tag()
        c.send(tag + b" APPEND INBOX ~{%d}\r\n" % len(data))
        assert c.read_response().startswith(b"+")
        c.send(data + b"\r\n")
        r = c.read_result(tag)
        assert r.status == "OK" and "APPENDUID" in r.codes(), str(r)
        c.select("INBOX")
        r = c.ok("FETCH 1 (BINARY.PEEK[1] RFC822.SIZE)")
        assert literal(r.untagged[0], b"BINARY[1]") == (b"~", b"\x00\x01\x02\xff\r\n")
        assert b"RFC822.SIZE %d" % len(data) in r.untagged[0]
    finally:
        close_quietly(c)
    # imaplib cannot read a literal8, but asks BINARY.SIZE and BODY fine.
    conn = imap_login(imap_server, user)
    try:
        imaplib_ok(conn.select("INBOX"))
        data_ = imaplib_ok(conn.fetch("1", "(BINARY.SIZE[1])"))
        assert b"BINARY.SIZE[1] 6" in data_[0]
    finally:
        close_quietly(conn)


def _rss_kib(pid: int) -> int:
    # Anonymous memory only: the message file is mapped, and its pages (page cache,
    # shared and clean) count in VmRSS without costing memory of their own.
    return proc_status_kb(pid, "RssAnon")


def test_twenty_megabyte_base64_part_streams(imap_server):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    user = new_user(imap_server, "binbig")
    raw = os.urandom(20 * 1024 * 1024)
    big = (b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(raw))
    c = RawIMAP.connect(imap_server, timeout=120)
    try:
        assert c.command(b"LOGIN " + quote(user) + b" " + quote(PASSWORD)).status == "OK"
        assert c.append("INBOX", big, non_sync=True).status == "OK"
        c.select("INBOX")
        pid = imap_server.pid
        before = _rss_kib(pid)
        tag = c.next_tag()
        c.send(tag + b" FETCH 1 BINARY.PEEK[1]\r\n")
        head = c.read_line()
        m = re.search(rb"BINARY\[1\] (~?)\{(\d+)\}\r\n$", head)
        assert m and int(m.group(2)) == len(raw), head[:200]
        received = 0
        digest_ok = True
        peak = before
        step = 2 * 1024 * 1024
        while received < len(raw):
            chunk = c.read_exact(min(step, len(raw) - received))
            digest_ok = digest_ok and chunk == raw[received:received + len(chunk)]
            received += len(chunk)
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.01)   # a slow reader: the server must not run ahead in memory
        r = c.read_result(tag)
        assert r.status == "OK", str(r)
        assert digest_ok, "decoded attachment differs"
        # Decoding a 20 MB part must not cost anything near its size, let alone 3x.
        assert peak - before < 8 * 1024, f"anonymous RSS grew by {peak - before} KiB"
        r = c.ok("FETCH 1 BINARY.SIZE[1]")
        assert b"BINARY.SIZE[1] %d" % len(raw) in r.untagged[0]
    finally:
        close_quietly(c)
