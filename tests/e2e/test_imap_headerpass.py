"""The first open of a large folder: the header pass (worker processes summarize every
message once, batch by batch, into the folder index) gives the answers a message-by-message
FETCH gives, byte for byte: ENVELOPE, BODY[HEADER.FIELDS (...)] cut from the kept lines,
header fields it does not keep read from the file, SEARCH on the stored fields; and a first
open cut short by a crash leaves an index the next open completes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from imap_helpers import RawIMAP, new_user

COUNT = 300             # several of the pass's batches would take thousands; one will do
CORE = "DATE FROM TO CC SUBJECT MESSAGE-ID"


def message(i: int) -> bytes:
    """Message i of a varied folder: folded and repeated fields, encoded words, groups,
    fields in any case, a long header, LF-only files."""
    lines = [b"Received: from relay%d.remote.test by mx.example.test;\r\n"
             b"\tMon, 01 Jan 2024 00:00:%02d +0000" % (i, i % 60)]
    if i == 13:  # a header longer than a first read of the file
        lines += [b"Received: from hop%d.remote.test by hop%d.remote.test" % (k, k + 1)
                  for k in range(300)]
    lines.append(b"From: Sender %d <s%d@remote.test>" % (i % 7, i % 7))
    lines.append(b"To: a@example.test,\r\n b@example.test" if i % 3 == 0
                 else b"to: alice@example.test")
    if i % 5 == 0:
        lines.append(b"Cc: =?utf-8?q?J=C3=BCrgen?= <j@remote.test>")
    if i % 4 == 0:
        lines.append(b"Reply-To: list: one@remote.test, two@remote.test;")
    if i % 6 == 0:
        lines.append(b"In-Reply-To: <%d@remote.test>" % (i - 1))
    subject = b"needle number %d" % i if i % 10 == 0 else b"hay %d" % i
    if i % 8 == 0:
        subject += b"\r\n folded"
    lines.append((b"Subject : " if i % 11 == 0 else b"Subject: ") + subject)
    if i % 9 == 0:
        lines.append(b"To: second@example.test")
    lines.append(b"Date: Mon, 01 Jan 2024 00:%02d:00 +0000" % (i % 60))
    lines.append(b"Message-ID: <%d@remote.test>" % i)
    lines.append(b"X-Mailer: mailer %d" % i)
    data = b"\r\n".join(lines) + b"\r\n\r\nbody %d\r\n" % i
    if i % 50 == 7:
        data = data.replace(b"\r\n", b"\n")   # a file another program stored LF-only
    return data


def fill(maildir: Path, count: int) -> list[bytes]:
    """Write `count` messages into cur/ as another program would (no uid list yet);
    the message bytes in uid order (by mtime)."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        data = message(i)
        size = f",S={len(data)}" if i % 17 else ""   # some names without their size
        path = maildir / "cur" / f"{1700000000 + i}.M{i}P1Q{i}.corpus{size}:2,{'S' * (i % 2)}"
        path.write_bytes(data)
        os.utime(path, (1700000000 + i, 1700000000 + i))
        out.append(data)
    return out


def expected_fields(data: bytes, names: str, negate: bool = False) -> bytes:
    """BODY[HEADER.FIELDS (names)] as RFC 3501 6.4.5 defines it, from the message bytes."""
    first = data.split(b"\n", 1)[0]
    if not first.endswith(b"\r"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = data[:data.index(b"\r\n\r\n") + 2]
    wanted = {n.lower().encode() for n in names.split()}
    out = []
    for field in re.split(rb"(?<=\r\n)(?![ \t])", head):
        if b":" not in field:
            continue
        name = field.split(b":", 1)[0].rstrip(b" \t").lower()
        if (name in wanted) != negate:
            out.append(field)
    return b"".join(out) + b"\r\n"


def open_user(server, count: int) -> tuple[str, list[bytes]]:
    user = new_user(server, "hp")
    return user, fill(server.maildir(user), count)


def envelope_lines(conn: RawIMAP, seqset: str = "1:*") -> list[bytes]:
    r = conn.command(f"FETCH {seqset} (ENVELOPE)")
    assert r.status == "OK", str(r)
    return [u for u in r.untagged if b" FETCH " in u]


def fields_of(conn: RawIMAP, names: str, negate: bool = False) -> dict[int, bytes]:
    spec = f"HEADER.FIELDS{'.NOT' if negate else ''} ({names})"
    r = conn.command(f"FETCH 1:* (BODY.PEEK[{spec}])")
    assert r.status == "OK", str(r)
    return {seq: items[f"BODY[{spec}]"] for seq, items in r.fetches().items()}


def test_first_fetch_gives_what_fetching_one_message_at_a_time_gives(make_server) -> None:
    server = make_server()
    user, data = open_user(server, COUNT)
    oracle, _ = open_user(server, COUNT)
    with RawIMAP.login(server, user, select="INBOX") as conn:
        pass_lines = envelope_lines(conn)
        core = fields_of(conn, CORE)
        some = fields_of(conn, "FROM SUBJECT")
        others = fields_of(conn, "REPLY-TO IN-REPLY-TO TO")
    with RawIMAP.login(server, oracle, select="INBOX") as conn:
        one_by_one = [line for n in range(1, COUNT + 1) for line in envelope_lines(conn, str(n))]
    assert len(pass_lines) == COUNT
    assert pass_lines == one_by_one
    for seq, message_bytes in enumerate(data, 1):
        assert core[seq] == expected_fields(message_bytes, CORE), seq
        assert some[seq] == expected_fields(message_bytes, "FROM SUBJECT"), seq
        assert others[seq] == expected_fields(message_bytes, "REPLY-TO IN-REPLY-TO TO"), seq


def test_fields_the_summary_does_not_keep_come_from_the_file(make_server) -> None:
    server = make_server()
    user, data = open_user(server, COUNT)
    with RawIMAP.login(server, user, select="INBOX") as conn:
        envelope_lines(conn)  # the pass has run
        mixed = fields_of(conn, "X-MAILER SUBJECT")
        negated = fields_of(conn, "RECEIVED SUBJECT", negate=True)
    for seq, message_bytes in enumerate(data, 1):
        assert mixed[seq] == expected_fields(message_bytes, "X-MAILER SUBJECT"), seq
        assert negated[seq] == expected_fields(message_bytes, "RECEIVED SUBJECT", True), seq


def test_search_first_runs_the_pass_and_fetch_then_reads_the_index(make_server) -> None:
    server = make_server()
    user, data = open_user(server, COUNT)
    with RawIMAP.login(server, user, select="INBOX") as conn:
        r = conn.command("SEARCH SUBJECT needle")
        assert r.status == "OK", str(r)
        assert r.search() == [i + 1 for i in range(COUNT) if i % 10 == 0]
        r = conn.command('SEARCH FROM "sender 3"')
        assert r.search() == [i + 1 for i in range(COUNT) if i % 7 == 3]
        core = fields_of(conn, CORE)
    index = server.maildir(user) / "mailserver.index.sqlite3"
    assert index.exists()
    for seq, message_bytes in enumerate(data, 1):
        assert core[seq] == expected_fields(message_bytes, CORE), seq


def test_a_first_open_cut_short_by_a_crash_is_completed_by_the_next(make_server) -> None:
    count = 2500  # three batches of the pass: the crash comes while some are under way
    server = make_server()
    user, data = open_user(server, count)
    oracle, _ = open_user(server, count)
    with RawIMAP.login(server, oracle, select="INBOX") as conn:
        whole = envelope_lines(conn)
        uids = conn.command("UID SEARCH ALL").search()
    conn = RawIMAP.login(server, user, select="INBOX")
    conn.send(b"t99 FETCH 1:* (ENVELOPE)\r\n")
    for _ in range(50):
        assert b" FETCH " in conn.read_response()
    server.kill9()  # no clean shutdown: whatever reached the index stays as it is
    conn.close()
    server.start()
    with RawIMAP.login(server, user, select="INBOX") as conn:
        assert conn.command("UID SEARCH ALL").search() == uids
        r = conn.command("SEARCH SUBJECT needle")
        assert r.search() == [i + 1 for i in range(count) if i % 10 == 0]
        assert envelope_lines(conn) == whole
        core = fields_of(conn, CORE)
    for seq in (1, 8, 14, 58, count // 2, count):
        assert core[seq] == expected_fields(data[seq - 1], CORE), seq
