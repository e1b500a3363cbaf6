"""Real IMAP clients against a real server: curl (imap:// with STARTTLS, imaps://) and
mbsync (isync) syncing an account both ways."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from harness import PASSWORD, requires_tool
from imap_helpers import (
    close_quietly,
    crlf_form,
    deliver,
    file_with,
    imap_login,
    imaplib_ok,
    module_server,
    new_user,
)

imap_server = module_server()


def uid_of(server, user: str, msgid: str, mailbox: str = "INBOX") -> int | None:
    conn = imap_login(server, user)
    try:
        imaplib_ok(conn.select(mailbox, readonly=True), "SELECT")
        data = imaplib_ok(conn.uid("SEARCH", None, "HEADER", "Message-ID", f'"{msgid}"'), "SEARCH")
        uids = data[0].split()
        return int(uids[0]) if uids else None
    finally:
        close_quietly(conn)


def run(argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=timeout, **kw)


# -- curl -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["imap", "imaps"])
def test_curl_lists_and_fetches(imap_server, scheme):
    curl = requires_tool("curl")
    user = new_user(imap_server, "curl")
    msgid = f"<curl-{time.time_ns()}@remote.test>"
    deliver(imap_server, user, msgid=msgid, subject="for curl",
            body=b"".join(b"curl line %d\r\n" % i for i in range(20)))
    port = imap_server.ports[scheme]
    tls = ["--ssl-reqd", "-k"] if scheme == "imap" else ["-k"]
    base = [curl, "-sS", "--max-time", "20", *tls, "--user", f"{user}:{PASSWORD}"]

    cp = run([*base, f"{scheme}://127.0.0.1:{port}/"])
    assert cp.returncode == 0, f"curl LIST exited {cp.returncode}: {cp.stderr.decode()}"
    assert b"INBOX" in cp.stdout and b"Sent" in cp.stdout, cp.stdout[:500]

    uid = uid_of(imap_server, user, msgid)
    assert uid is not None, "message not found over IMAP"
    cp = run([*base, f"{scheme}://127.0.0.1:{port}/INBOX;UID={uid}"])
    assert cp.returncode == 0, f"curl fetch exited {cp.returncode}: {cp.stderr.decode()}"
    stored = crlf_form(file_with(imap_server.maildir(user), msgid.encode()).read_bytes())
    assert cp.stdout == stored, f"curl got {cp.stdout[:300]!r}\nstored {stored[:300]!r}"

    # A search through curl's custom request.
    cp = run([*base, f"{scheme}://127.0.0.1:{port}/INBOX?SUBJECT%20curl"])
    assert cp.returncode == 0 and b"SEARCH" in cp.stdout, (cp.returncode, cp.stdout, cp.stderr)

    cp = run([curl, "-sS", "--max-time", "20", *tls, "--user", f"{user}:wrong",
              f"{scheme}://127.0.0.1:{port}/"])
    assert cp.returncode != 0, "curl logged in with a wrong password"


def test_curl_refuses_plaintext_login_without_tls(imap_server):
    """The server offers no way to log in before STARTTLS; curl without TLS cannot log in."""
    curl = requires_tool("curl")
    cp = run([curl, "-sS", "--max-time", "20", "--user", f"alice@example.test:{PASSWORD}",
              f"imap://127.0.0.1:{imap_server.ports['imap']}/"])
    assert cp.returncode != 0, f"curl logged in without TLS: {cp.stdout[:300]!r}"


# -- mbsync -----------------------------------------------------------------------------------

def mbsync_config(server, user: str, local: Path, ssl_type: str) -> Path:
    port = server.ports["imaps" if ssl_type == "IMAPS" else "imap"]
    cert = server.state_dir / "tls" / "cert.pem"
    assert cert.exists(), f"no generated certificate at {cert}"
    cfg = local.parent / f"mbsyncrc-{ssl_type}"
    cfg.write_text(f"""\
IMAPAccount remote
Host 127.0.0.1
Port {port}
User {user}
Pass {PASSWORD}
SSLType {ssl_type}
CertificateFile {cert}
SystemCertificates no
AuthMechs LOGIN PLAIN
PipelineDepth 1
Timeout 30

IMAPStore remote-store
Account remote

MaildirStore local-store
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote-store:
Near :local-store:
Patterns INBOX Archive
Create Near
Sync All
Expunge None
SyncState *
""")
    return cfg


def run_mbsync(cfg: Path) -> subprocess.CompletedProcess:
    mbsync = requires_tool("mbsync")
    env = dict(os.environ, HOME=str(cfg.parent))
    cp = subprocess.run([mbsync, "-V", "-c", str(cfg), "-a"], capture_output=True, text=True,
                        timeout=90, env=env)
    assert cp.returncode == 0, (f"mbsync exited {cp.returncode}\nstdout: {cp.stdout[-3000:]}\n"
                                f"stderr: {cp.stderr[-3000:]}")
    return cp


def local_files(maildir: Path) -> list[Path]:
    return sorted(p for sub in ("cur", "new") if (maildir / sub).is_dir()
                  for p in (maildir / sub).iterdir() if p.is_file())


def local_with(maildir: Path, needle: bytes) -> Path:
    found = [p for p in local_files(maildir) if needle in p.read_bytes()]
    assert len(found) == 1, f"local {maildir}: {len(found)} files contain {needle!r}: {found}"
    return found[0]


def without_tuid(data: bytes) -> bytes:
    """mbsync adds an X-TUID header line to the messages it copies; drop it."""
    return re.sub(rb"(?m)^X-TUID: [^\r\n]*\r?\n", b"", data, count=1)


def add_local_flags(path: Path, letters: str) -> Path:
    """Set Maildir flags on a local message the way a mail reader does (rename into cur/)."""
    name = path.name
    base, sep, info = name.partition(":")
    current = info[2:] if sep and info.startswith("2,") else ""
    merged = "".join(sorted(set(current) | set(letters)))
    target = path.parent.parent / "cur" / f"{base}:2,{merged}"
    os.rename(path, target)
    return target


@pytest.mark.parametrize("ssl_type", ["STARTTLS", "IMAPS"])
def test_mbsync_syncs_both_ways(imap_server, tmp_path, ssl_type):
    requires_tool("mbsync")
    user = new_user(imap_server, "mbsync")
    first, second = (f"<mbsync-{i}-{time.time_ns()}@remote.test>" for i in (1, 2))
    deliver(imap_server, user, msgid=first, subject="first")
    deliver(imap_server, user, msgid=second, subject="second")
    local = tmp_path / "Mail"
    local.mkdir()
    cfg = mbsync_config(imap_server, user, local, ssl_type)

    # server -> local
    run_mbsync(cfg)
    inbox = local / "INBOX"
    assert len(local_files(inbox)) == 2, f"local INBOX after the first sync: {local_files(inbox)}"
    got = without_tuid(local_with(inbox, first.encode()).read_bytes())
    stored = file_with(imap_server.maildir(user), first.encode()).read_bytes()
    assert got.replace(b"\r\n", b"\n") == stored.replace(b"\r\n", b"\n"), \
        f"synced message differs from the stored one:\n{got[:600]!r}\n{stored[:600]!r}"

    # local flags and a local new message -> server; a new server message -> local
    add_local_flags(local_with(inbox, first.encode()), "FS")
    uploaded = f"<mbsync-up-{time.time_ns()}@local.test>"
    tmp_file = inbox / "tmp" / f"{int(time.time())}.{os.getpid()}.localhost"
    tmp_file.write_bytes((f"From: <u@example.test>\nTo: <x@remote.test>\nSubject: written locally\n"
                          f"Message-ID: {uploaded}\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n\n"
                          f"Local body.\n").encode())
    os.rename(tmp_file, inbox / "new" / tmp_file.name)
    third = f"<mbsync-3-{time.time_ns()}@remote.test>"
    deliver(imap_server, user, msgid=third, subject="third")
    run_mbsync(cfg)

    conn = imap_login(imap_server, user)
    try:
        imaplib_ok(conn.select("INBOX", readonly=True), "SELECT")
        data = imaplib_ok(conn.search(None, "HEADER", "Message-ID", f'"{first}"'), "SEARCH")
        seq = data[0].split()[0]
        data = imaplib_ok(conn.fetch(seq, "(FLAGS)"), "FETCH")
        assert b"\\Flagged" in data[0] and b"\\Seen" in data[0], f"local flags not on the server: {data}"
        data = imaplib_ok(conn.search(None, "HEADER", "Message-ID", f'"{uploaded}"'), "SEARCH")
        assert data[0].split(), "the locally written message was not uploaded"
        data = imaplib_ok(conn.search(None, "ALL"), "SEARCH")
        assert len(data[0].split()) == 4, f"server INBOX: {data}"
    finally:
        close_quietly(conn)
    local_with(inbox, third.encode())
    assert len(local_files(inbox)) == 4, local_files(inbox)
