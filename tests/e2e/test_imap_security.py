"""Hostile input against a real server: mailbox names that try to leave the user's Maildir
or reach another user's mail, huge literals, over-long lines, password guessing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness import PASSWORD
from imap_helpers import (
    ConnectionClosed,
    Lit,
    RawIMAP,
    deliver,
    module_server,
    new_user,
    plain_b64,
    quote,
    tree_snapshot,
)

imap_server = module_server()

MARKER = f"imapescape{os.getpid()}"


def must_refuse(name: bytes) -> bool:
    """Names no server may accept as a mailbox name of its own."""
    return (b"/" in name or b"\x00" in name or b".." in name or name.startswith(b".")
            or len(name) > 255 or b"*" in name or b"%" in name)


def make_victim(server) -> tuple[str, str, Path]:
    """Another user with a delivered message and a folder made on disk."""
    victim = new_user(server, "victim")
    secret = f"<secret-{time.time_ns()}@remote.test>"
    deliver(server, victim, msgid=secret, subject="victim's secret")
    vdir = server.maildir(victim)
    folder = vdir / ".VictimSecret"
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "maildirfolder").touch()
    return victim, secret, vdir


def visible_message_ids(c: RawIMAP) -> bytes:
    r = c.command("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    return b"".join(r.untagged)


def hostile_names(victim_local: bytes, victim: bytes) -> list[bytes]:
    v = victim_local
    return [
        b"..", b".", b"...", b"../" + v, b"../../example.test/" + v, b"../" + v + b"/.VictimSecret",
        b".." + v, b"..VictimSecret", b"../../../../../../tmp/" + MARKER.encode(),
        b"/tmp/" + MARKER.encode(), b"/etc", b"a/b", b"INBOX/../../" + v, b"INBOX..", b"INBOX/..",
        b"." + MARKER.encode(), b"x" * 300, b"y." * 130 + b"z",
        b"&AC8-tmp&AC8-" + MARKER.encode(),   # modified UTF-7 for "/tmp/..."
        b"&AC4ALg-",                           # ".." in modified UTF-7
        b"*", b"%", b"a*b", b"a%b", b"INBOX.*",
        b"a\x00b", b"\x00", b"..\x00/" + v,
        b"~" + v, b"~" + v + b"/INBOX", b"#shared." + v, b"#shared/" + v, b"#users." + v,
        b"#mh/" + v, b"Other Users." + v, b"user." + v, b"shared." + v, victim, v,
    ]


def test_mailbox_names_cannot_leave_the_maildir_or_reach_other_users(imap_server):
    attacker = new_user(imap_server, "attacker")
    victim, secret, vdir = make_victim(imap_server)
    adir = imap_server.maildir(attacker)
    victim_before = tree_snapshot(vdir)
    others_before = tree_snapshot(imap_server.maildir_root, exclude=[adir])
    root_before = {p.name for p in imap_server.root.iterdir()}
    parent_before = {p.name for p in imap_server.root.parent.iterdir()}

    c = RawIMAP.login(imap_server, attacker)
    wrong: list[str] = []
    try:
        assert c.append("INBOX", b"Subject: mine\r\nMessage-ID: <mine@x>\r\n\r\nmine\r\n").status == "OK"
        c.ok("CREATE Legit")
        victim_local = victim.split("@")[0].encode()
        for name in hostile_names(victim_local, victim.encode()):
            shown = repr(name[:60])
            refuse = must_refuse(name)

            def run(*parts: bytes):
                try:
                    return c.command_parts(list(parts))
                except ConnectionClosed:
                    pytest.fail(f"connection closed by the server on {shown}")

            for verb in (b"CREATE", b"SELECT", b"EXAMINE", b"STATUS", b"APPEND", b"SUBSCRIBE",
                         b"RENAME-TO", b"RENAME-FROM", b"DELETE", b"COPY"):
                if verb == b"STATUS":
                    r = run(b"STATUS ", Lit(name), b" (MESSAGES)")
                elif verb == b"APPEND":
                    r = run(b"APPEND ", Lit(name), b" ", Lit(b"Subject: x\r\n\r\nx\r\n"))
                elif verb == b"RENAME-TO":
                    r = run(b"RENAME Legit ", Lit(name))
                    if r.status == "OK":  # put it back for the next name
                        c.command_parts([b"RENAME ", Lit(name), b" Legit"])
                elif verb == b"RENAME-FROM":
                    r = run(b"RENAME ", Lit(name), b" Stolen")
                elif verb == b"COPY":
                    c.select("INBOX")
                    r = run(b"COPY 1 ", Lit(name))
                else:
                    r = run(verb + b" ", Lit(name))
                if refuse and r.status == "OK" and verb != b"SUBSCRIBE":
                    wrong.append(f"{verb.decode()} {shown} answered OK: {r.text!r}")
                if verb in (b"SELECT", b"EXAMINE") and r.status == "OK":
                    seen = visible_message_ids(c)
                    if secret.encode() in seen:
                        wrong.append(f"{verb.decode()} {shown} shows the victim's mail")
                if verb == b"RENAME-FROM" and r.status == "OK":  # a folder of its own: put it back
                    c.command_parts([b"RENAME Stolen ", Lit(name)])
            for ref, pattern in ((name, b"*"), (b"", name), (name, b"%")):
                r = run(b"LIST ", Lit(ref), b" ", Lit(pattern))
                if any(b"VictimSecret" in u for u in r.untagged):
                    wrong.append(f"LIST {ref[:40]!r} {pattern[:40]!r} lists the victim's folder")
            c.command("UNSELECT")
        r = c.command('LIST "" "*"')
        assert not any(b"VictimSecret" in u for u in r.untagged), f"victim's folder listed:\n{r}"
        assert c.command("NOOP").status == "OK"
    finally:
        c.close()

    # The file system: nothing outside the attacker's Maildir, the victim's untouched.
    if tree_snapshot(vdir) != victim_before:
        wrong.append("the victim's Maildir changed")
    others_after = tree_snapshot(imap_server.maildir_root, exclude=[adir])
    added = sorted(set(others_after) - set(others_before))
    if added:
        wrong.append(f"created outside the attacker's Maildir: {added}")
    if {p.name for p in imap_server.root.iterdir()} != root_before:
        wrong.append(f"server directory changed: {sorted(p.name for p in imap_server.root.iterdir())}")
    if {p.name for p in imap_server.root.parent.iterdir()} != parent_before:
        wrong.append("something was created next to the server directory")
    if any(MARKER in p for p in os.listdir("/tmp")):
        wrong.append("a name reached /tmp")
    # A deleted folder is renamed aside and removed in a thread: wait for that to end,
    # so the walk below does not race it.
    deadline = time.monotonic() + 15
    while any(p.name.startswith("..deleted.") for p in adir.iterdir()):
        assert time.monotonic() < deadline, "deleted folders were never removed"
        time.sleep(0.05)
    for p in adir.rglob("*"):
        if p.is_symlink() or ".." in p.relative_to(adir).parts:
            wrong.append(f"unexpected entry in the attacker's Maildir: {p}")
    for p in adir.iterdir():
        if p.is_dir() and p.name not in ("cur", "new", "tmp"):
            if not p.name.startswith(".") or p.name in (".", "..") or len(p.name.encode()) > 255:
                wrong.append(f"unexpected directory in the attacker's Maildir: {p.name!r}")
    assert not wrong, "\n".join(wrong)


def test_cannot_log_in_or_authorize_as_another_user(imap_server):
    victim, secret, _ = make_victim(imap_server)
    attacker = new_user(imap_server, "attacker")
    c = RawIMAP.connect(imap_server)
    try:
        r = c.command(b"AUTHENTICATE PLAIN " + plain_b64(attacker, PASSWORD, authz=victim))
        assert r.status == "NO", f"authorising as another user:\n{r}"
        r = c.command(b"LOGIN " + quote(victim) + b" " + quote("secretx"))
        assert r.status == "NO", str(r)
        r = c.command(b"LOGIN " + quote(victim.upper() + "\x00") + b" " + quote(PASSWORD))
        assert r.status in ("NO", "BAD"), str(r)
    finally:
        c.close()


# -- literals and lines ---------------------------------------------------------------------

def test_nothing_half_read_before_starttls_survives_it(imap_server):
    """CVE-2011-0411 class: a command cut short by STARTTLS (its literal announced in
    plaintext) must not take the first octets the client sends inside TLS.  It could
    when 64 KB of unread answers held the session behind STARTTLS."""
    from imap_helpers import HOSTNAME, tls_client_context

    c = RawIMAP.connect(imap_server, tls=False)
    try:
        c.send(b"".join(b"x%d CAPABILITY\r\n" % i for i in range(175))
               + b"a STARTTLS\r\n" + b"z LOGIN {30+}\r\n")
        line, seen = c.wait_for(rb"^a OK", 10)
        assert line is not None, seen[-300:]
        c.sock = tls_client_context().wrap_socket(c.sock, server_hostname=HOSTNAME)
        c.buf = b""
        r = c.command(b"CAPABILITY")
        assert r.status == "OK" and r.tag != b"z", str(r)
        assert not any(u.startswith(b"z ") for u in r.untagged), str(r)
    finally:
        c.close()


def test_huge_literal_refused_without_continuation(imap_server):
    user = new_user(imap_server, "literal")
    bystander = RawIMAP.login(imap_server, user, select="INBOX")
    c = RawIMAP.login(imap_server, user)
    try:
        c.send(b"a APPEND INBOX {4294967296}\r\n")
        line = c.read_response()
        assert not line.startswith(b"+"), f"continuation for a 4 GB literal: {line!r}"
        assert line.startswith(b"a NO"), f"expected a tagged NO: {line!r}"
        assert c.command("NOOP").status == "OK", "session lost after a refused literal"
        assert c.command("SELECT INBOX").status == "OK"
        # Non-synchronising: the client is already sending; the server says NO/BYE and hangs up.
        c.send(b"b APPEND INBOX {4294967296+}\r\n" + b"x" * 65536)
        data = c.pending(3.0)
        assert b"b NO" in data or b"* BYE" in data, f"no NO/BYE for a 4 GB LITERAL+: {data[:300]!r}"
        assert b"b OK" not in data, data[:300]
        assert c.closed_by_server(5), "connection still open after a 4 GB non-synchronising literal"
    finally:
        c.close()
    try:
        r = bystander.command("NOOP")
        assert r.status == "OK" and not r.numbers(b"EXISTS"), f"other client affected:\n{r}"
    finally:
        bystander.close()
    assert imap_server.running
    fresh = RawIMAP.login(imap_server, user, select="INBOX")
    fresh.close()


def test_huge_literal_before_login(imap_server):
    c = RawIMAP.connect(imap_server)
    try:
        c.send(b"a LOGIN {4294967296}\r\n")
        line = c.read_response()
        assert not line.startswith(b"+"), f"continuation for a 4 GB literal: {line!r}"
        assert line.startswith(b"a NO") or line.startswith(b"a BAD") or line.startswith(b"* BYE"), line
    finally:
        c.close()


def test_overlong_command_line(imap_server):
    bystander = RawIMAP.login(imap_server, "bob@example.test")
    c = RawIMAP.login(imap_server, "carol@example.test")
    try:
        try:
            c.send(b"a NOOP " + b"x" * 300_000 + b"\r\n")
        except OSError:
            pass  # the server may hang up while we are still sending
        data = c.pending(3.0)
        assert b"BAD" in data or b"BYE" in data, f"over-long line: {data[:300]!r}"
        assert b"a OK" not in data, data[:300]
    finally:
        c.close()
    r = bystander.command("NOOP")
    bystander.close()
    assert r.status == "OK", str(r)
    # A line that never ends.
    c = RawIMAP.connect(imap_server)
    try:
        try:
            for _ in range(20):
                c.send(b"y" * 16384)
        except OSError:
            pass
        data = c.pending(3.0)
        assert b"BAD" in data or b"BYE" in data or c.closed_by_server(2), \
            f"endless line neither refused nor closed: {data[:200]!r}"
    finally:
        c.close()
    assert imap_server.running


# -- password guessing ------------------------------------------------------------------------

def test_failed_logins_are_delayed_then_disconnected(make_server):
    server = make_server(auth_failure_delay_after=2, auth_failures_per_connection=3)
    bystander = RawIMAP.login(server, "bob@example.test", select="INBOX")
    c = RawIMAP.connect(server)
    try:
        times = []
        for i, cmd in enumerate([b"LOGIN " + quote("alice@example.test") + b" " + quote("wrong1"),
                                 b"AUTHENTICATE PLAIN " + plain_b64("alice@example.test", "wrong2")]):
            start = time.monotonic()
            r = c.command(cmd)
            times.append(time.monotonic() - start)
            assert r.status == "NO", f"failed login {i + 1}:\n{r}"
        assert max(times) < 0.8, f"the first failures were already delayed: {times}"
        # Third failure: the reply is delayed; meanwhile other clients are served at once.
        start = time.monotonic()
        c.send(b"t3 LOGIN " + quote("alice@example.test") + b" " + quote("wrong3") + b"\r\n")
        time.sleep(0.1)
        noop_start = time.monotonic()
        r = bystander.command("NOOP")
        noop_time = time.monotonic() - noop_start
        assert r.status == "OK" and noop_time < 0.6, f"bystander waited {noop_time:.2f}s"
        r = c.read_result(b"t3")
        delay = time.monotonic() - start
        assert r.status == "NO", str(r)
        assert delay >= 0.9, f"third failed login answered after {delay:.2f}s, not delayed"
        assert any(u.startswith(b"BYE") for u in r.untagged) or b"* BYE" in c.pending(1.0), \
            f"no BYE after auth_failures_per_connection failures:\n{r}"
        assert c.closed_by_server(5), "connection not closed after too many failures"
    finally:
        c.close()
        bystander.close()
    # Another client still logs in (possibly delayed, never refused).
    other = RawIMAP(server.ports["imap"], timeout=30)
    try:
        other.starttls()
        r = other.command(b"LOGIN " + quote("carol@example.test") + b" " + quote(PASSWORD))
        assert r.status == "OK", str(r)
    finally:
        other.close()


def test_idle_unauthenticated_connection_is_closed(make_server):
    """Before login the timeout is short (min(60 s, limits.idle_timeout)); a client that
    says nothing is told BYE and disconnected, and a fresh client is still served."""
    server = make_server(idle_timeout=2)
    idle = RawIMAP(server.ports["imap"], timeout=10)
    try:
        started = time.monotonic()
        assert idle.closed_by_server(wait=8), "idle unauthenticated connection stayed open"
        assert time.monotonic() - started < 8
    finally:
        idle.close()
    fresh = RawIMAP(server.ports["imap"], timeout=10)
    try:
        assert fresh.command(b"NOOP").status == "OK"
    finally:
        fresh.close()
