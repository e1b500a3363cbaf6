"""Quotas end to end: the limit set with `mailserver-admin user add --quota` is enforced at
SMTP RCPT (MX and submission: `452 4.2.2`, per recipient), for an alias's full member (its
copy waits in the queue), at IMAP APPEND/COPY (`NO [OVERQUOTA]`), and GETQUOTAROOT says the
same usage; IMAP EXPUNGE and POP3 deletions are counted off; usage lives in the Maildir++
`maildirsize` file, so it survives restarts and follows changes other processes make;
crossing 90% delivers one warning."""

from __future__ import annotations

import glob
import os
import poplib
import re
import time
from pathlib import Path

from harness import DOMAIN, PASSWORD, make_message, tls_client_context, wait_until
from imap_helpers import RawIMAP, as_int, message_files, parse_data, quote
from outbound_helpers import submit

SENDER = "x@remote.test"
BOB = "bob@example.test"


def add_user(srv, local: str, quota: str) -> str:
    address = f"{local}@{DOMAIN}"
    srv.admin_ok("user", "add", address, "--password-stdin", "--quota", quota,
                 input=PASSWORD + "\n")
    return address


def message(n: int, to: str, size: int = 1100, sender: str = SENDER) -> bytes:
    """A message whose body is `size` bytes (1.1 KB by default)."""
    body = (b"q" * 98 + b"\r\n") * (size // 100) + b"q" * (size % 100)
    return make_message(f"<quota-{n}-{time.time_ns()}@remote.test>", sender=sender, to=to,
                        subject=f"quota {n}", body=body)


def transaction(srv, rcpts: list[str], data: bytes, sender: str = SENDER
                ) -> tuple[list[str], str | None]:
    """MAIL, one RCPT each (their replies), DATA if any was accepted (its reply)."""
    with srv.raw() as c:
        c.greet()
        assert c.cmd(f"MAIL FROM:<{sender}>").code == 250
        replies = [str(c.cmd(f"RCPT TO:<{r}>")) for r in rcpts]
        final = None
        if any(r.startswith("250") for r in replies):
            assert c.cmd("DATA").code == 354
            c.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            final = str(c.read_reply())
        c.quit()
    return replies, final


def is_warning(path: Path) -> bool:
    return b"From: Postmaster <postmaster@example.test>" in path.read_bytes()


def mail(srv, address: str) -> list[Path]:
    """The user's INBOX messages other than quota warnings."""
    return [p for p in srv.messages(address) if not is_warning(p)]


def warnings(srv, address: str) -> list[bytes]:
    return [p.read_bytes() for p in srv.messages(address) if is_warning(p)]


def maildirsize(srv, address: str) -> tuple[bytes, int, int]:
    """The quota file's limit line and the sums of its change lines."""
    lines = (srv.maildir(address) / "maildirsize").read_bytes().splitlines()
    total = count = 0
    for line in lines[1:]:
        b, c = line.split()
        total, count = total + int(b), count + int(c)
    return lines[0], total, count


def on_disk(srv, address: str) -> tuple[int, int]:
    """Bytes (the ,S= of each name) and messages in every folder of the Maildir."""
    root = srv.maildir(address)
    total = count = 0
    for folder in [root, *(p for p in root.iterdir() if p.name.startswith(".") and p.is_dir())]:
        for path in message_files(folder):
            m = re.search(r",S=(\d+)", path.name)
            total += int(m.group(1)) if m else path.stat().st_size
            count += 1
    return total, count


def settled(srv, address: str) -> tuple[int, int]:
    """What is on disk, once maildirsize agrees with it (a warning may be on its way)."""
    assert wait_until(lambda: maildirsize(srv, address)[1:] == on_disk(srv, address), 10), \
        (maildirsize(srv, address), on_disk(srv, address))
    return on_disk(srv, address)


def kib(n: int) -> int:
    return (n + 1023) // 1024


def storage(c: RawIMAP, mailbox: str = "INBOX") -> tuple[int, int]:
    """GETQUOTAROOT's STORAGE usage and limit (KiB)."""
    r = c.ok(b"GETQUOTAROOT " + quote(mailbox))
    [quota] = r.with_prefix(b"QUOTA ")
    _, resources = parse_data(quota)
    assert bytes(resources[0]).upper() == b"STORAGE", str(r)
    return as_int(resources[1]), as_int(resources[2])


def storage_is(c: RawIMAP, srv, address: str, limit_kib: int) -> bool:
    """GETQUOTAROOT reports what is on disk (waiting out a warning being delivered)."""
    return wait_until(lambda: storage(c) == (kib(settled(srv, address)[0]), limit_kib), 5,
                      interval=0.1)


def accepted(srv, address: str, n: int, size: int = 100) -> bool:
    return transaction(srv, [address], message(n, address, size))[0][0].startswith("250")


def test_third_message_over_a_2k_quota_is_refused(server):
    dora = add_user(server, "dora", "2K")
    codes = []
    for n in (1, 2, 3):
        replies, final = transaction(server, [dora], message(n, dora))
        codes.append((replies[0][:9], final and final[:3]))
    assert codes[:2] == [("250 2.1.5", "250"), ("250 2.1.5", "250")], codes
    assert codes[2] == ("452 4.2.2", None), codes
    subjects = sorted(re.search(rb"Subject: (quota \d)", p.read_bytes()).group(1)
                      for p in mail(server, dora))
    assert subjects == [b"quota 1", b"quota 2"]
    # Crossing 90% delivers one warning; once it is in, nothing else is on its way.
    assert wait_until(lambda: len(warnings(server, dora)) == 1, 10), server.log_text()
    total, count = settled(server, dora)
    assert maildirsize(server, dora) == (b"2048S", total, count) and total > 2048
    assert "Mailbox full" in server.log_text()


def test_two_recipients_one_full(server):
    dora = add_user(server, "dora", "2K")
    replies, final = transaction(server, [dora], message(1, dora, 2500))
    assert final.startswith("250"), (replies, final)
    replies, final = transaction(server, [dora, BOB], message(2, dora))
    assert replies[0].startswith("452 4.2.2 Mailbox full"), replies
    assert replies[1].startswith("250"), replies
    assert final.startswith("250"), final
    assert len(mail(server, dora)) == 1 and len(server.messages(BOB)) == 1
    # Submission refuses the full mailbox the same way, and delivers to the other one.
    refused = submit(server, BOB, [dora, "carol@example.test"], message(3, dora, sender=BOB))
    assert list(refused) == [dora] and refused[dora][0] == 452, refused
    assert b"4.2.2" in refused[dora][1]
    assert len(server.messages("carol@example.test")) == 1
    assert len(mail(server, dora)) == 1


def queued(srv) -> list[str]:
    env = srv.state_dir / "queue" / "env"
    return sorted(p.stem for p in env.iterdir()) if env.exists() else []


def test_alias_with_a_full_member_queues_its_copy(make_server):
    srv = make_server(queue={"retry_schedule": ["1s"], "delay_warning": 0})
    dora = add_user(srv, "dora", "2K")
    srv.admin_ok("alias", "add", f"team@{DOMAIN}", f"{dora},{BOB}")
    srv.admin_ok("alias", "add", f"full@{DOMAIN}", dora)
    assert transaction(srv, [dora], message(1, dora, 2500))[1].startswith("250")
    # Every mailbox of the alias full: refused like the mailbox itself.
    assert transaction(srv, [f"full@{DOMAIN}"], message(2, dora))[0][0].startswith("452 4.2.2")
    # One of two full: accepted once, bob's copy stored, dora's waits in the queue.
    replies, final = transaction(srv, [f"team@{DOMAIN}"], message(3, "team@example.test"))
    assert replies[0].startswith("250") and final.startswith("250"), (replies, final)
    assert len(srv.messages(BOB)) == 1 and len(mail(srv, dora)) == 1
    assert len(queued(srv)) == 1
    assert wait_until(lambda: srv.log_text().count("deferred: 452 4.2.2 Mailbox full") >= 2,
                      10), srv.log_text()  # retried (and deferred again) from the queue
    listing = srv.admin_ok("queue", "list").stdout
    assert dora in listing and "4.2.2" in listing, listing
    # Room again (the user deletes mail over IMAP): a later retry delivers the copy.
    c = RawIMAP.login(srv, dora, select="INBOX")
    try:
        c.ok("STORE 1:* +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")
    finally:
        c.close()
    assert wait_until(lambda: not queued(srv), 15), srv.log_text()
    [copy] = mail(srv, dora)
    assert b"Subject: quota 3" in copy.read_bytes()
    assert len(srv.messages(BOB)) == 1  # no duplicate for the member that had it


def test_a_full_mailbox_bounces_when_the_message_expires(make_server):
    srv = make_server(queue={"retry_schedule": ["1s"], "max_age": "3s", "delay_warning": 0})
    dora = add_user(srv, "dora", "2K")
    srv.admin_ok("alias", "add", f"team@{DOMAIN}", f"{dora},{BOB}")
    assert transaction(srv, [dora], message(1, dora, 2500))[1].startswith("250")
    replies, final = transaction(srv, [f"team@{DOMAIN}"], message(2, "team@example.test"),
                                 sender="carol@example.test")
    assert final.startswith("250"), final
    assert wait_until(lambda: len(srv.messages("carol@example.test")) == 1, 15), srv.log_text()
    [dsn] = srv.messages("carol@example.test")
    text = dsn.read_bytes()
    assert b"multipart/report" in text and dora.encode() in text
    assert b"Mailbox full" in text
    assert wait_until(lambda: not queued(srv), 5)
    assert len(mail(srv, dora)) == 1 and len(srv.messages(BOB)) == 1


def test_imap_append_and_copy_refused_over_quota(server):
    erin = add_user(server, "erin", "4K")
    assert transaction(server, [erin], message(1, erin, 1500))[1].startswith("250")
    c = RawIMAP.login(server, erin)
    try:
        assert storage_is(c, server, erin, 4)
        r = c.append("INBOX", message(2, erin, 3000))
        assert r.status == "NO" and r.code == b"OVERQUOTA", str(r)
        assert c.append("INBOX", message(3, erin, 800)).status == "OK"
        assert storage_is(c, server, erin, 4)
        c.select("INBOX")
        r = c.command("COPY 1:* Archive")
        assert r.status == "NO" and r.code == b"OVERQUOTA", str(r)
        # MOVE adds nothing to the account: allowed at the limit (a full mailbox can
        # still move mail to Trash).
        before = on_disk(server, erin)
        assert c.command("MOVE 1 Trash").status == "OK"
        assert on_disk(server, erin) == before
        # Over the limit through SMTP's soft limit: APPEND refused, GETQUOTAROOT agrees.
        assert transaction(server, [erin], message(4, erin, 1500))[1].startswith("250")
        assert storage_is(c, server, erin, 4)
        assert storage(c)[0] > 4
        assert c.append("Drafts", message(5, erin, 100)).code == b"OVERQUOTA"
        # Copying nothing adds nothing (RFC 9051 6.4.9): not refused, as MOVE is not.
        assert c.command("UID COPY 999999 Archive").status == "OK"
        # An EXPUNGE is counted off at once: room for an APPEND again.
        c.select("INBOX")  # every message of INBOX in the view
        c.ok("STORE 1:* +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")
        assert storage_is(c, server, erin, 4)
        assert c.append("INBOX", message(6, erin, 100)).status == "OK"
        assert storage_is(c, server, erin, 4)
    finally:
        c.close()
    assert maildirsize(server, erin)[0] == b"4096S"


def remove_message(path: Path) -> None:
    """Remove a message file that the server may move from new/ to cur/ meanwhile (the
    INBOX a login loaded takes its new mail in): by its base name, wherever it is now."""
    base = path.name.split(":")[0]
    for _ in range(50):
        for sub in ("new", "cur"):
            for found in (path.parent.parent / sub).glob(glob.escape(base) + "*"):
                try:
                    found.unlink()
                except FileNotFoundError:   # moved on again meanwhile: look once more
                    continue
                return
        time.sleep(0.02)
    raise AssertionError(f"{base} is in neither new/ nor cur/")


def test_usage_follows_restarts_and_other_processes(server):
    dora = add_user(server, "dora", "2K")
    for n in (1, 2):
        assert accepted(server, dora, n, 1100)
    assert not accepted(server, dora, 3)
    # A restart: the usage comes back from maildirsize.
    server.stop()
    server.start()
    assert not accepted(server, dora, 4)
    c = RawIMAP.login(server, dora)
    try:
        assert storage_is(c, server, dora, 2)
    finally:
        c.close()
    # A Maildir++ program removes mail and says so with change lines: seen within seconds.
    quota_file = server.maildir(dora) / "maildirsize"
    for path in server.messages(dora):
        size = int(re.search(r",S=(\d+)", path.name).group(1))
        remove_message(path)
        with open(quota_file, "ab") as f:
            f.write(b"%d -1\n" % -size)
    assert wait_until(lambda: accepted(server, dora, 5), 10, interval=0.3)
    settled(server, dora)
    # Programs that remove mail without a word to maildirsize: it is counted again when
    # it says full with several change lines, or with one that is 15 minutes old, or when
    # it is gone (README.maildirquota); a fresh one-line file is trusted meanwhile.
    for content, age, counted in ((b"2048S\n3000 2\n500 1\n", 0, True),
                                  (b"2048S\n999999 99\n", 20 * 60, True),
                                  (b"2048S\n999999 99\n", 0, False)):
        server.stop()
        for path in server.messages(dora):
            path.unlink()
        quota_file.write_bytes(content)
        when = time.time() - age
        os.utime(quota_file, (when, when))
        # The user was warned for this crossing already (the mark beside maildirsize):
        # otherwise a warning delivered right after the refused RCPT adds a change line,
        # the file is counted again, and GETQUOTAROOT below races it.
        (quota_file.parent / "maildirsize.warned").touch()
        server.start()
        assert accepted(server, dora, 6) == counted, (content, age)
        c = RawIMAP.login(server, dora)
        try:
            if counted:
                assert storage_is(c, server, dora, 2)
            else:
                assert storage(c) == (kib(999999), 2)
        finally:
            c.close()
    quota_file.unlink()
    assert wait_until(lambda: accepted(server, dora, 7), 10, interval=0.3)
    assert maildirsize(server, dora)[0] == b"2048S"
    settled(server, dora)


def test_warning_at_90_percent_is_delivered_once(server):
    fay = add_user(server, "fay", "40K")
    assert accepted(server, fay, 1, 30000)
    assert accepted(server, fay, 2, 6500)
    assert wait_until(lambda: len(warnings(server, fay)) == 1, 10), server.log_text()
    [warning] = warnings(server, fay)
    assert re.search(rb"\r\nSubject: Your mailbox is 9\d% full\r\n", warning), warning
    assert f"\r\nTo: <{fay}>\r\n".encode() in warning
    assert b"\r\nAuto-Submitted: auto-generated\r\n" in warning
    assert b"\r\nMessage-ID: <" in warning and b"\r\nDate: " in warning
    # The file is visible once renamed into new/; the log line follows the commit.
    assert wait_until(lambda: "quota warning delivered" in server.log_text(), 5), \
        server.log_text()
    # Still above 90%, also after a restart: no second warning.
    assert accepted(server, fay, 3)
    server.stop()
    server.start()
    assert accepted(server, fay, 4)
    settled(server, fay)
    assert len(warnings(server, fay)) == 1
    # Below 90% (mail expunged), then over it again: a new crossing, a new warning.
    c = RawIMAP.login(server, fay, select="INBOX")
    try:
        c.ok("STORE 1:* +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")
        assert storage(c)[0] == 0
    finally:
        c.close()
    assert not (server.maildir(fay) / "maildirsize.warned").exists() or wait_until(
        lambda: not (server.maildir(fay) / "maildirsize.warned").exists(), 5)
    assert accepted(server, fay, 5, 37000)
    assert wait_until(lambda: len(warnings(server, fay)) == 1 and
                      len(server.messages(fay)) == 2, 10), server.log_text()


def test_pop3_deletions_are_counted_off(server):
    gus = add_user(server, "gus", "2K")
    for n in (1, 2):
        assert accepted(server, gus, n, 1100)
    assert not accepted(server, gus, 3)
    assert wait_until(lambda: len(warnings(server, gus)) == 1, 10), server.log_text()
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=15)
    p.stls(tls_client_context())
    p.user(gus)
    p.pass_(PASSWORD)
    count, _ = p.stat()
    for n in range(1, count + 1):
        p.dele(n)
    p.quit()
    assert not server.messages(gus)
    assert accepted(server, gus, 4)  # at once: counted off at QUIT, not at the next read
    assert maildirsize(server, gus)[1:] == settled(server, gus)
