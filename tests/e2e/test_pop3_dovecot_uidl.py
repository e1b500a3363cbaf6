"""POP3 keeps the UIDLs and order Dovecot stored in dovecot-uidlist (P<uidl>, O<order>) for
a Maildir migrated from Dovecot, over real poplib with implicit TLS and with STLS: stored
UIDLs answered, "P" alone meaning the base name, messages with an O listed first in that
order; the fields survive the server's rewrites of the uid list (a delivery, DELE+QUIT)
and a restart; messages without them keep the base name as UIDL."""

from __future__ import annotations

import poplib
import time

from harness import PASSWORD, make_message, send_mail, tls_client_context

ALICE = "alice@example.test"
HOST = "dovecothost"


def dovecot_message(n: int) -> bytes:
    """A message as Dovecot stores it by default: LF line ends."""
    return (f"From: sender{n}@remote.test\nTo: {ALICE}\nSubject: migrated {n}\n"
            f"Message-ID: <m{n}@remote.test>\n\nbody of message {n}\n").encode()


def dovecot_name(n: int, data: bytes) -> str:
    vsize = len(data.replace(b"\n", b"\r\n"))
    return f"17000000{n:02d}.M{n}P{n}.{HOST},S={len(data)},W={vsize}"


# uid -> ext fields as Dovecot writes them (pop3_uidl_format "%08Xu%08Xv" for two of
# them, as after a migration; "P" alone: the base name; O: the original POP3 order).
FIELDS = {1: "P000000016548ab2e O2", 2: "O1", 3: "P", 4: "", 5: "W9999 P00000005656f3c11"}


def write_dovecot_maildir(server) -> dict[int, str]:
    """INBOX as Dovecot left it: files in cur/ and a dovecot-uidlist with P/O fields;
    {uid: base name}."""
    maildir = server.maildir(ALICE)
    names = {}
    lines = ["3 V1700000000 N6 G0123456789abcdef0123456789abcdef"]
    for uid in range(1, 6):
        data = dovecot_message(uid)
        base = dovecot_name(uid, data)
        (maildir / "cur" / (base + ":2,S")).write_bytes(data)
        names[uid] = base
        lines.append(f"{uid} {FIELDS[uid]} :{base}" if FIELDS[uid] else f"{uid} :{base}")
    (maildir / "dovecot-uidlist").write_text("\n".join(lines) + "\n")
    return names


def pop3s(server) -> poplib.POP3_SSL:
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_client_context(),
                        timeout=15)
    p.user(ALICE)
    p.pass_(PASSWORD)
    return p


def uidls(p: poplib.POP3) -> list[str]:
    _, lines, _ = p.uidl()
    out = []
    for n, line in enumerate(lines, 1):
        num, uidl = line.decode().split()
        assert int(num) == n
        out.append(uidl)
    return out


def test_dovecot_uidls_and_order(server):
    names = write_dovecot_maildir(server)
    expected = [names[2], "000000016548ab2e", names[3], names[4], "00000005656f3c11"]
    p = pop3s(server)
    try:
        assert uidls(p) == expected
        assert p.uidl(2).split()[1:] == [b"2", b"000000016548ab2e"]
        _, lines, _ = p.retr(1)
        assert b"Subject: migrated 2" in lines         # O1 is listed first
        _, lines, _ = p.retr(2)
        assert b"Subject: migrated 1" in lines
        _, listing, _ = p.list()
        assert [int(x.split()[1]) for x in listing] == [
            len(dovecot_message(u).replace(b"\n", b"\r\n")) for u in (2, 1, 3, 4, 5)]
        p.quit()
    finally:
        p.close()

    # A delivery makes the server rewrite the uid list: the fields stay.
    msg = make_message(f"<new-{time.time_ns()}@remote.test>", to=ALICE, subject="fresh")
    assert not send_mail(server, msg, [ALICE])
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=15)
    try:
        p.stls(tls_client_context())
        p.user(ALICE)
        p.pass_(PASSWORD)
        now = uidls(p)
        assert now[:5] == expected and len(now) == 6
        new_base = now[5]
        assert new_base not in names.values()
        uidlist = (server.maildir(ALICE) / "dovecot-uidlist").read_text()
        assert f"1 P000000016548ab2e O2 :{names[1]}\n" in uidlist, uidlist
        assert f"6 :{new_base}\n" in uidlist, uidlist
        assert p.dele(2).startswith(b"+OK")           # the message with a stored UIDL
        p.quit()
    finally:
        p.close()

    server.stop()
    server.start()
    p = pop3s(server)
    try:
        assert uidls(p) == [names[2], names[3], names[4], "00000005656f3c11", new_base]
        p.quit()
    finally:
        p.close()
    uidlist = (server.maildir(ALICE) / "dovecot-uidlist").read_text()
    assert names[1] not in uidlist
    assert f"5 W9999 P00000005656f3c11 :{names[5]}\n" in uidlist, uidlist
