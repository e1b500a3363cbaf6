"""Backups and upgrades end to end: `mailserver-admin backup` of a running server (real
deliveries, flags set over IMAP, a message waiting in the queue), `restore` into a fresh
directory with a fresh config, and a second server that then serves the same messages,
UIDs, flags, users, aliases and queue over IMAP and POP3 with TLS; and a first-release
accounts database upgraded when the server starts, then used for logins and delivery."""

from __future__ import annotations

import hashlib
import imaplib
import json
import poplib
import re
import sqlite3
import sys
from pathlib import Path

from harness import PASSWORD, tls_client_context, wait_until
from imap_helpers import ALICE, BOB, deliver, imap_login, imaplib_ok
from outbound_helpers import dns_server, mx_port, submit  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.accounts_v1 import ALIASES, SHA512_SECRET, USERS, write_v1_database  # noqa: E402

FETCH_RE = re.compile(rb"UID (\d+)|FLAGS \(([^)]*)\)")


def mailbox_state(conn: imaplib.IMAP4, mailbox: str) -> dict:
    """UIDVALIDITY, UIDNEXT and uid -> (flags without \\Recent, sha256 of the message)."""
    imaplib_ok(conn.select(mailbox), f"SELECT {mailbox}")
    uidvalidity = int(conn.response("UIDVALIDITY")[1][0])
    status = imaplib_ok(conn.status(mailbox, "(UIDNEXT)"), "STATUS")[0]
    uidnext = int(re.search(rb"UIDNEXT (\d+)", status).group(1))
    messages = {}
    data = imaplib_ok(conn.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])"), "UID FETCH")
    for item in data:
        if not isinstance(item, tuple):
            continue
        head, body = item
        uid = flags = None
        for m in FETCH_RE.finditer(head):
            if m.group(1):
                uid = int(m.group(1))
            else:
                flags = frozenset(m.group(2).decode().split()) - {"\\Recent"}
        messages[uid] = (flags, hashlib.sha256(body).hexdigest())
    return {"uidvalidity": uidvalidity, "uidnext": uidnext, "messages": messages}


def pop3_state(server, user: str) -> tuple[int, dict[str, int]]:
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_client_context(),
                        timeout=15)
    try:
        p.user(user)
        p.pass_(PASSWORD)
        count, _ = p.stat()
        _, lines, _ = p.uidl()
        sizes = {}
        for line in lines:
            number, uidl = line.decode().split()
            sizes[uidl] = len(b"\r\n".join(p.retr(int(number))[1]))
        return count, sizes
    finally:
        p.quit()


def one_error_line(cp) -> str:
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailserver-admin: error: "), cp.stderr
    return lines[0]


def outbound_settings(dns, port: int) -> dict:
    """Relay through the test DNS server (never the system's); retries an hour apart."""
    return {"relay": {"resolver": dns.address, "port": port, "connect_timeout": 3,
                      "timeout": 20},
            "queue": {"retry_schedule": ["1h"], "delay_warning": 0}}


def test_backup_of_a_running_server_restored_into_a_fresh_directory(make_server, dns_server,
                                                                     tmp_path):  # noqa: F811
    port = mx_port()
    src = make_server(**outbound_settings(dns_server, port))
    src.admin_ok("alias", "add", "team@example.test", f"{ALICE},{BOB}")
    for n in range(4):
        deliver(src, ALICE, subject=f"inbox {n}", body=f"body {n}\r\n" * (n + 1))
    deliver(src, "team@example.test", subject="for the team")
    # Flags and folders set over IMAP: a gap in the UIDs, system flags, a keyword.
    conn = imap_login(src)
    try:
        imaplib_ok(conn.select("INBOX"))
        imaplib_ok(conn.store("1", "+FLAGS", "(\\Deleted)"))
        imaplib_ok(conn.expunge())
        imaplib_ok(conn.store("1", "+FLAGS", "(\\Seen)"))
        imaplib_ok(conn.store("2", "+FLAGS", "(\\Flagged \\Answered $Important)"))
        imaplib_ok(conn.create("Projects"))
        imaplib_ok(conn.copy("3", "Projects"))
        before = {box: mailbox_state(conn, box) for box in ("INBOX", "Projects")}
    finally:
        conn.logout()
    assert sorted(before["INBOX"]["messages"]) == [2, 3, 4, 5]
    assert before["INBOX"]["messages"][3][0] == {"\\Flagged", "\\Answered", "$Important"}
    bob_before = pop3_state(src, BOB)
    # A message waiting in the queue: later.test's MX does not answer.
    assert submit(src, ALICE, ["someone@later.test"],
                  b"Subject: waits\r\nFrom: <alice@example.test>\r\n\r\nqueued\r\n") == {}
    assert wait_until(lambda: "deferred" in src.log_text(), 15), src.diagnostics()

    # Backup while the server runs.
    backup = tmp_path / "backup"
    out = src.admin_ok("backup", str(backup)).stdout
    assert "accounts (1 domain, 3 users, 1 alias;" in out and "1 queued message" in out, out
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["maildirs"]["messages"] == 6   # 4 in alice's INBOX, 1 copy, 1 for bob
    # The running server is never restored over, and a used directory is never written to.
    assert "the server is running" in one_error_line(src.admin("restore", "--force",
                                                                str(backup)))
    assert "is not empty" in one_error_line(src.admin("backup", str(backup)))
    assert "no such directory" in one_error_line(src.admin("restore", str(tmp_path / "none")))

    # A fresh directory, a fresh config: restore, then start.
    dst = make_server(accounts=False, start=False, **outbound_settings(dns_server, port))
    out = dst.admin_ok("restore", str(backup)).stdout
    assert "restored the accounts database: 1 domain, 3 users, 1 alias" in out, out
    dst.start()

    conn = imap_login(dst, implicit=True)   # the password works, over implicit TLS
    try:
        after = {box: mailbox_state(conn, box) for box in ("INBOX", "Projects")}
    finally:
        conn.logout()
    assert after == before   # same UIDVALIDITY, UIDNEXT, UIDs, flags and contents
    conn = imap_login(dst, BOB)   # STARTTLS
    conn.logout()
    assert pop3_state(dst, BOB) == bob_before
    assert "team@example.test -> alice@example.test, bob@example.test" in \
        dst.admin_ok("alias", "list").stdout
    queue = dst.admin_ok("queue", "list").stdout
    assert "someone@later.test" in queue and "1 message" in queue, queue
    # Delivery to the restored alias; new UIDs follow the old ones.
    deliver(dst, "team@example.test", subject="after the restore")
    conn = imap_login(dst)
    try:
        state = mailbox_state(conn, "INBOX")
    finally:
        conn.logout()
    assert sorted(state["messages"]) == [2, 3, 4, 5, before["INBOX"]["uidnext"]]
    assert pop3_state(dst, BOB)[0] == bob_before[0] + 1


def test_first_release_accounts_database_is_upgraded_at_start(make_server):
    """The accounts database exactly as the first release wrote it (schema version 1):
    the server upgrades it when it starts and then logs users in and delivers with it."""
    srv = make_server(accounts=False, start=False)
    db_path = srv.state_dir / "accounts.sqlite3"
    # Local targets only: nothing may leave for a real domain.
    write_v1_database(db_path, aliases=[a for a in ALIASES if "remote" not in a[2]])
    for address, *_ in USERS:   # the Maildirs `user add` made in that release
        for sub in ("cur", "new", "tmp"):
            (srv.maildir(address) / sub).mkdir(parents=True, mode=0o700)
    srv.start()
    assert "upgraded to schema version 2" in srv.log_text(), srv.diagnostics()
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == 2
        hashes = dict(db.execute("SELECT address, password_hash FROM users"))
    finally:
        db.close()
    assert hashes["bob@example.test"] == SHA512_SECRET   # kept as imported

    # Logins over TLS with the kept hashes ({PLAIN} and Dovecot's SHA512-CRYPT).
    for user, implicit in ((ALICE, False), (BOB, True)):
        conn = imap_login(srv, user, implicit=implicit)
        conn.logout()
    # The quota (2048 bytes) still applies: GETQUOTAROOT shows it, in KiB.
    conn = imap_login(srv, BOB)
    try:
        typ, data = conn.getquotaroot("INBOX")
        assert typ == "OK" and any(b"STORAGE 0 2)" in d for d in data[1]), data
    finally:
        conn.logout()
    # Delivery through the kept aliases: a list and a catch-all.
    deliver(srv, "team@example.test", subject="to the team")
    deliver(srv, "anyone@example.net", subject="to the catch-all")
    assert len(srv.messages(ALICE)) == 1 and len(srv.messages(BOB)) == 1
    assert len(srv.messages("carol@example.test")) == 1
    listing = srv.admin_ok("user", "list").stdout
    assert "bob@example.test  quota=2048" in listing, listing
