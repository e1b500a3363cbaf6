"""FETCH and SEARCH against a real server: FLAGS, UID, INTERNALDATE, RFC822.SIZE,
ENVELOPE, BODYSTRUCTURE, body sections (HEADER, HEADER.FIELDS[.NOT], TEXT, MIME, part
numbers, message/rfc822 parts), partial fetches, RFC822.*, implicit \\Seen, and the SEARCH
grammar."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imap_helpers import (
    Lit,
    RawIMAP,
    as_int,
    crlf,
    crlf_form,
    deliver,
    drop_into_new,
    file_with,
    flags_of,
    header_block,
    imap_login,
    close_quietly,
    module_server,
    multipart_message,
    new_user,
    parse_internaldate,
)

imap_server = module_server()

MULTI_ID = "<multi-1@example.test>"
EIGHTBIT_ID = "<eightbit-1@remote.test>"

EIGHTBIT = (
    b"Received: from relay1.remote.test by mx.remote.test; Mon, 01 Jan 2024 00:00:01 +0000\r\n"
    b"X-Repeated: one\r\n"
    b"Subject: caf\xc3\xa9 \xe9t\xe9 report\r\n"
    b"From: Ren\xc3\xa9 <rene@remote.test>\r\n"
    b"X-Repeated: two\r\n"
    b"To: alice@example.test\r\n"
    b"Received: from relay0.remote.test by relay1.remote.test; Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"X-Folded: first part\r\n"
    b"\tsecond part\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:02 +0000\r\n"
    b"Message-ID: " + EIGHTBIT_ID.encode() + b"\r\n"
    b"lowercase-header: value\r\n"
    b"\r\n"
    b"Body line one.\r\n"
    b"Body line two.\r\n")


@dataclass
class Corpus:
    user: str
    maildir: Path
    multi: object
    eightbit: bytes
    smtp_msgid: str


@pytest.fixture(scope="module")
def corpus(imap_server) -> Corpus:
    """A user whose INBOX holds a multipart message and an 8-bit-header message (written
    into new/ as another delivery agent would) and one message delivered over SMTP."""
    user = new_user(imap_server, "fetch")
    maildir = imap_server.maildir(user)
    multi = multipart_message(MULTI_ID)
    drop_into_new(maildir, multi.data, "1700000001.M1P1.otherhost")
    drop_into_new(maildir, EIGHTBIT, "1700000002.M2P1.otherhost")
    smtp_msgid = f"<smtp-{time.time_ns()}@remote.test>"
    deliver(imap_server, user, subject="via smtp", msgid=smtp_msgid,
            body=b"".join(b"SMTP body line %03d\r\n" % i for i in range(40)))
    return Corpus(user, maildir, multi, EIGHTBIT, smtp_msgid)


def examine(server, user: str, mailbox: str = "INBOX") -> tuple[RawIMAP, dict[str, int]]:
    """A read-only session and {Message-ID: sequence number}."""
    c = RawIMAP.login(server, user)
    c.select(mailbox, examine=True)
    by_id = {}
    for seq, items in c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])").items():
        value = items["BODY[HEADER.FIELDS (MESSAGE-ID)]"]
        mid = value.split(b":", 1)[1].strip().decode()
        by_id[mid] = seq
    return c, by_id


@pytest.fixture
def ro(imap_server, corpus):
    c, by_id = examine(imap_server, corpus.user)
    yield c, by_id
    c.close()


# -- simple items --------------------------------------------------------------------------

def test_fetch_flags_uid_internaldate_size(ro, corpus):
    c, by_id = ro
    assert len(by_id) == 3, by_id
    rows = c.fetch("1:*", "(FLAGS UID INTERNALDATE RFC822.SIZE)")
    assert sorted(rows) == [1, 2, 3], rows
    uids = [as_int(rows[s]["UID"]) for s in (1, 2, 3)]
    assert uids == sorted(uids) and len(set(uids)) == 3 and uids[0] >= 1, uids
    for seq, row in rows.items():
        assert flags_of(row["FLAGS"]) - {"\\Recent"} == set(), row
        parse_internaldate(row["INTERNALDATE"])
    assert as_int(rows[by_id[MULTI_ID]]["RFC822.SIZE"]) == len(corpus.multi.data)
    assert as_int(rows[by_id[EIGHTBIT_ID]]["RFC822.SIZE"]) == len(EIGHTBIT)
    stored = crlf_form(file_with(corpus.maildir, corpus.smtp_msgid.encode()).read_bytes())
    assert as_int(rows[by_id[corpus.smtp_msgid]]["RFC822.SIZE"]) == len(stored)
    # UID FETCH always answers with the UID, even when not asked.
    r = c.ok(f"UID FETCH {uids[1]} FLAGS")
    row = r.fetches()[2]
    assert as_int(row["UID"]) == uids[1], str(r)
    # FAST / ALL / FULL macros.
    for macro, wanted in (("FAST", {"FLAGS", "INTERNALDATE", "RFC822.SIZE"}),
                          ("ALL", {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"}),
                          ("FULL", {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"})):
        got = c.fetch("1", macro)[1]
        assert wanted <= set(got), f"FETCH {macro}: {sorted(got)}"


def test_fetch_envelope(ro):
    c, by_id = ro
    seq = by_id[MULTI_ID]
    env = c.fetch(str(seq), "ENVELOPE")[seq]["ENVELOPE"]
    assert isinstance(env, list) and len(env) == 10, env
    date, subject, from_, sender, reply_to, to, cc, bcc, in_reply_to, message_id = env
    assert date == b"Tue, 02 Jan 2024 10:00:00 +0000"
    assert subject == b"Quarterly report"
    assert from_ == [[b"Alice Example", None, b"alice", b"example.test"]], from_
    assert sender == from_ and reply_to == from_, (sender, reply_to)
    assert to == [[b"Bob", None, b"bob", b"example.test"],
                  [None, None, b"carol", b"example.test"]], to
    assert cc == [[b"Dave", None, b"dave", b"remote.test"]], cc
    assert bcc is None and in_reply_to is None, (bcc, in_reply_to)
    assert message_id == MULTI_ID.encode()


def _upper(v):
    return bytes(v).upper() if v is not None else None


def test_fetch_bodystructure(ro, corpus):
    c, by_id = ro
    m = corpus.multi
    seq = by_id[MULTI_ID]
    r = c.ok(f"FETCH {seq} BODYSTRUCTURE")
    bs = r.fetches()[seq]["BODYSTRUCTURE"]
    assert isinstance(bs, list), bs
    children = [x for x in bs if isinstance(x, list)][:4]
    subtype_at = next(i for i, x in enumerate(bs) if not isinstance(x, list))
    assert subtype_at == 4, f"expected 4 parts before the subtype: {r}"
    assert _upper(bs[4]) == b"MIXED", bs[4]
    # extension data of the multipart: (parameters) with the boundary
    if len(bs) > 5:
        params = bs[5]
        assert isinstance(params, list) and b"outer-b" in params, params
    p1, p2, p3, p4 = children

    # 1: text/plain
    assert [_upper(p1[0]), _upper(p1[1])] == [b"TEXT", b"PLAIN"], p1
    assert [bytes(x).lower() for x in p1[2]] == [b"charset", b"us-ascii"], p1[2]
    assert _upper(p1[5]) == b"7BIT", p1
    assert as_int(p1[6]) == m.sizes["1"] and as_int(p1[7]) == m.lines["1"], (p1, m.sizes["1"], m.lines["1"])

    # 2: multipart/alternative of text/plain + text/html
    assert isinstance(p2[0], list) and isinstance(p2[1], list), p2
    assert _upper(p2[2]) == b"ALTERNATIVE", p2
    t, h = p2[0], p2[1]
    assert [_upper(t[0]), _upper(t[1])] == [b"TEXT", b"PLAIN"], t
    assert as_int(t[6]) == m.sizes["2.1"] and as_int(t[7]) == m.lines["2.1"], (t, m.sizes["2.1"])
    assert [_upper(h[0]), _upper(h[1])] == [b"TEXT", b"HTML"], h
    assert _upper(h[5]) == b"QUOTED-PRINTABLE", h
    assert as_int(h[6]) == m.sizes["2.2"] and as_int(h[7]) == m.lines["2.2"], (h, m.sizes["2.2"])

    # 3: message/rfc822: size, envelope, body structure, lines
    assert [_upper(p3[0]), _upper(p3[1])] == [b"MESSAGE", b"RFC822"], p3
    assert p3[4] == b"forwarded message", p3
    assert as_int(p3[6]) == m.sizes["3"], (p3[6], m.sizes["3"])
    env, inner, lines = p3[7], p3[8], p3[9]
    assert isinstance(env, list) and len(env) == 10 and env[1] == b"Forwarded inner", env
    assert isinstance(inner, list) and [_upper(inner[0]), _upper(inner[1])] == [b"TEXT", b"PLAIN"], inner
    assert as_int(inner[6]) == m.sizes["3.TEXT"] and as_int(inner[7]) == m.lines["3.TEXT"], inner
    assert as_int(lines) == m.lines["3"], (lines, m.lines["3"])

    # 4: application/pdf attachment, base64, with its disposition
    assert [_upper(p4[0]), _upper(p4[1])] == [b"APPLICATION", b"PDF"], p4
    assert [bytes(x).lower() for x in p4[2]] == [b"name", b"report.pdf"], p4[2]
    assert _upper(p4[5]) == b"BASE64", p4
    assert as_int(p4[6]) == m.sizes["4"], (p4[6], m.sizes["4"])
    disposition = p4[8]  # after md5
    assert isinstance(disposition, list) and _upper(disposition[0]) == b"ATTACHMENT", p4
    assert [bytes(x).lower() for x in disposition[1]] == [b"filename", b"report.pdf"], disposition

    # BODY (non-extensible) has the same shape without extension data.
    body = c.fetch(str(seq), "BODY")[seq]["BODY"]
    assert _upper(body[4]) == b"MIXED" and len(body) == 5, body
    assert as_int(body[0][6]) == m.sizes["1"], body[0]


def test_bodystructure_of_simple_message(ro, corpus):
    c, by_id = ro
    seq = by_id[EIGHTBIT_ID]
    bs = c.fetch(str(seq), "BODYSTRUCTURE")[seq]["BODYSTRUCTURE"]
    body = EIGHTBIT.split(b"\r\n\r\n", 1)[1]
    assert [_upper(bs[0]), _upper(bs[1])] == [b"TEXT", b"PLAIN"], bs
    assert as_int(bs[6]) == len(body) and as_int(bs[7]) == body.count(b"\n"), bs


# -- body sections -------------------------------------------------------------------------

SECTIONS = ["", "HEADER", "TEXT", "1", "1.MIME", "2", "2.1", "2.1.MIME", "2.2", "3",
            "3.HEADER", "3.TEXT", "4", "4.MIME"]


def test_body_sections_of_multipart(ro, corpus):
    c, by_id = ro
    seq = by_id[MULTI_ID]
    items = " ".join(f"BODY.PEEK[{s}]" for s in SECTIONS)
    r = c.ok(f"FETCH {seq} ({items})")
    row = r.fetches()[seq]
    wrong = []
    for s in SECTIONS:
        key = f"BODY[{s}]"
        if key not in row:
            wrong.append(f"{key}: missing (got {sorted(row)})")
        elif row[key] != corpus.multi.sections[s]:
            wrong.append(f"{key}: {row[key][:120]!r} != {corpus.multi.sections[s][:120]!r}")
    assert not wrong, "\n".join(wrong)
    assert "FLAGS" not in row or "\\Seen" not in flags_of(row["FLAGS"])


def test_body_header_is_exact_stored_bytes(ro, corpus):
    """Header order, repeated fields, folding and 8-bit bytes exactly as stored."""
    c, by_id = ro
    seq = by_id[EIGHTBIT_ID]
    stored = crlf_form(file_with(corpus.maildir, EIGHTBIT_ID.encode()).read_bytes())
    assert stored == EIGHTBIT, "the stored file differs from the message written to new/"
    row = c.fetch(str(seq), "(BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[])")[seq]
    assert row["BODY[HEADER]"] == header_block(stored), row["BODY[HEADER]"]
    assert row["BODY[TEXT]"] == stored[len(header_block(stored)):]
    assert row["BODY[]"] == stored

    # The SMTP-delivered message: header as in the file, Received etc. included.
    sseq = by_id[corpus.smtp_msgid]
    sstored = crlf_form(file_with(corpus.maildir, corpus.smtp_msgid.encode()).read_bytes())
    srow = c.fetch(str(sseq), "(BODY.PEEK[HEADER] BODY.PEEK[])")[sseq]
    assert srow["BODY[HEADER]"] == header_block(sstored)
    assert srow["BODY[]"] == sstored


def test_header_fields_and_fields_not(ro):
    c, by_id = ro
    seq = by_id[EIGHTBIT_ID]
    r = c.ok(f"FETCH {seq} (BODY.PEEK[HEADER.FIELDS (Subject From)] "
             f"BODY.PEEK[HEADER.FIELDS.NOT (Received X-Repeated)] "
             f"BODY.PEEK[HEADER.FIELDS (x-repeated LOWERCASE-HEADER)])")
    row = r.fetches()[seq]
    fields = row.get("BODY[HEADER.FIELDS (SUBJECT FROM)]")
    assert fields == (b"Subject: caf\xc3\xa9 \xe9t\xe9 report\r\n"
                      b"From: Ren\xc3\xa9 <rene@remote.test>\r\n\r\n"), f"{fields!r}\n{r}"
    not_fields = row.get("BODY[HEADER.FIELDS.NOT (RECEIVED X-REPEATED)]")
    assert not_fields == (b"Subject: caf\xc3\xa9 \xe9t\xe9 report\r\n"
                          b"From: Ren\xc3\xa9 <rene@remote.test>\r\n"
                          b"To: alice@example.test\r\n"
                          b"X-Folded: first part\r\n"
                          b"\tsecond part\r\n"
                          b"Date: Mon, 01 Jan 2024 00:00:02 +0000\r\n"
                          b"Message-ID: " + EIGHTBIT_ID.encode() + b"\r\n"
                          b"lowercase-header: value\r\n"
                          b"\r\n"), f"{not_fields!r}"
    repeated = row.get("BODY[HEADER.FIELDS (X-REPEATED LOWERCASE-HEADER)]")
    assert repeated == (b"X-Repeated: one\r\nX-Repeated: two\r\nlowercase-header: value\r\n\r\n"), \
        f"{repeated!r}"


def test_partial_fetches(ro, corpus):
    c, by_id = ro
    seq = by_id[MULTI_ID]
    data = corpus.multi.data
    r = c.ok(f"FETCH {seq} (BODY[]<0.100>)")
    row = r.fetches()[seq]
    assert row.get("BODY[]<0>") == data[:100], f"BODY[]<0.100>:\n{r}"
    r = c.ok(f"FETCH {seq} (BODY.PEEK[]<100.50>)")
    row = r.fetches()[seq]
    assert row.get("BODY[]<100>") == data[100:150], f"BODY.PEEK[]<100.50>:\n{r}"
    # The raw response names the origin and announces exactly 50 octets.
    assert any(b"BODY[]<100> {50}\r\n" + data[100:150] in u for u in r.untagged), str(r)
    # Past the end: what is there; an origin beyond the end: an empty string.
    n = len(data)
    row = c.fetch(str(seq), f"(BODY.PEEK[]<{n - 10}.100>)")[seq]
    assert row.get(f"BODY[]<{n - 10}>") == data[-10:], row
    row = c.fetch(str(seq), f"(BODY.PEEK[]<{n + 5}.10>)")[seq]
    assert row.get(f"BODY[]<{n + 5}>") == b"", row
    # Partial of a section.
    row = c.fetch(str(seq), "(BODY.PEEK[TEXT]<5.20> BODY.PEEK[2.1]<6.4>)")[seq]
    assert row.get("BODY[TEXT]<5>") == corpus.multi.sections["TEXT"][5:25], row
    assert row.get("BODY[2.1]<6>") == corpus.multi.sections["2.1"][6:10], row


def test_rfc822_items(ro, corpus):
    c, by_id = ro
    seq = by_id[EIGHTBIT_ID]
    row = c.fetch(str(seq), "(RFC822.HEADER RFC822.TEXT RFC822)")[seq]
    assert row.get("RFC822") == EIGHTBIT, sorted(row)
    assert row.get("RFC822.HEADER") == header_block(EIGHTBIT), row.get("RFC822.HEADER")
    assert row.get("RFC822.TEXT") == EIGHTBIT[len(header_block(EIGHTBIT)):], row.get("RFC822.TEXT")


def test_body_fetch_sets_seen_but_peek_does_not(imap_server):
    user = new_user(imap_server, "seen")
    for i in range(4):
        deliver(imap_server, user, subject=f"m{i}")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        r = c.ok("FETCH 1 BODY[]")
        row = r.fetches()[1]
        assert "FLAGS" in row, f"FETCH BODY[] did not report the new \\Seen flag:\n{r}"
        assert "\\Seen" in flags_of(row["FLAGS"]), str(r)
        row = c.fetch("2", "BODY.PEEK[]")[2]
        assert "\\Seen" not in flags_of(row.get("FLAGS", [])), row
        c.fetch("3", "RFC822.HEADER")
        r = c.ok("FETCH 4 RFC822")
        assert "\\Seen" in flags_of(r.fetches()[4].get("FLAGS", [])), str(r)
        flags = {s: flags_of(v["FLAGS"]) for s, v in c.fetch("1:4", "FLAGS").items()}
        assert "\\Seen" in flags[1] and "\\Seen" in flags[4], flags
        assert "\\Seen" not in flags[2] and "\\Seen" not in flags[3], flags
    finally:
        c.close()
    # The flag is stored: another session sees it.
    c2 = RawIMAP.login(imap_server, user)
    try:
        c2.select("INBOX", examine=True)
        flags = {s: flags_of(v["FLAGS"]) for s, v in c2.fetch("1:4", "FLAGS").items()}
        assert ["\\Seen" in flags[s] for s in (1, 2, 3, 4)] == [True, False, False, True], flags
        # EXAMINE: BODY[] does not set \Seen in a read-only mailbox.
        c2.fetch("2", "BODY[]")
        assert "\\Seen" not in flags_of(c2.fetch("2", "FLAGS")[2]["FLAGS"])
    finally:
        c2.close()


def test_fetch_leaves_out_a_message_whose_file_went_away(imap_server):
    """A file unlinked under a FETCH (another session's EXPUNGE, whose thread unlinks
    before the reactor hears of it, or another process): the message is left out (RFC
    2180 4.1.1), not a row cut off by the tagged reply."""
    user = new_user(imap_server, "gone")
    for i in range(3):
        deliver(imap_server, user, subject=f"m{i}")
    c = RawIMAP.login(imap_server, user, select="INBOX")
    try:
        cur = imap_server.maildir(user) / "cur"
        [second] = [f for f in cur.iterdir() if b"Subject: m1\r\n" in f.read_bytes()]
        second.unlink()
        for items in ("BODY.PEEK[]", "(UID BODY.PEEK[HEADER] BODY.PEEK[TEXT])",
                      "(ENVELOPE BODY.PEEK[HEADER.FIELDS (X-NOT-INDEXED)])"):
            r = c.command(f"FETCH 1:3 {items}")
            assert r.status == "OK", (items, str(r))
            assert sorted(r.fetches()) == [1, 3], (items, str(r))
        r = c.ok("NOOP")
        assert r.numbers(b"EXPUNGE") == [2], str(r)
    finally:
        c.close()


def test_fetch_with_imaplib(imap_server, corpus):
    conn = imap_login(imap_server, corpus.user)
    try:
        typ, data = conn.select("INBOX", readonly=True)
        assert typ == "OK" and data == [b"3"], data
        typ, data = conn.uid("SEARCH", None, "ALL")
        assert typ == "OK", data
        uids = data[0].split()
        typ, data = conn.uid("FETCH", uids[0], "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and data[0] is not None, data
        assert b"Subject:" in data[0][1], data
    finally:
        close_quietly(conn)


# -- SEARCH ------------------------------------------------------------------------------------

SEARCH_CORPUS = [
    # (flags, internal date, header fields, body)
    (r"\Seen", "05-Jan-2024 12:00:00 +0000",
     ["From: Alice <alice@example.test>", "To: bob@example.test", "Cc: carol@example.test",
      "Subject: Alpha meeting", "Date: Mon, 01 Jan 2024 12:00:00 +0000"],
     "apple banana\r\n"),
    (r"\Flagged $Forwarded", "12-Feb-2024 12:00:00 +0000",
     ["From: Dave <dave@remote.test>", "To: alice@example.test", "Bcc: eve@remote.test",
      "Subject: Beta report", "Date: Sat, 10 Feb 2024 12:00:00 +0000", "X-Custom: hello-world"],
     "cherry pie\r\n"),
    (r"\Answered \Seen", "20-Mar-2024 12:00:00 +0000",
     ["From: bob@example.test", "To: alice@example.test", "Subject: Gamma",
      "Date: Wed, 20 Mar 2024 12:00:00 +0000"],
     "durian\r\n" * 700),
    (r"\Deleted", "01-Apr-2024 12:00:00 +0000",
     ["From: carol@example.test", "To: alice@example.test",
      "Subject: =?utf-8?q?Caf=C3=A9_menu?=", "Date: Mon, 01 Apr 2024 12:00:00 +0000"],
     "espresso\r\n"),
    (r"\Draft ProjectX", "15-Apr-2024 12:00:00 +0000",
     ["From: alice@example.test", "To: frank@remote.test", "Subject: Delta",
      "Date: Mon, 15 Apr 2024 12:00:00 +0000"],
     "fig\r\n"),
]


def search_message(i: int) -> bytes:
    _, _, headers, body = SEARCH_CORPUS[i]
    return crlf("\n".join(headers + [f"Message-ID: <search-{i + 1}@example.test>"]) + "\n\n") \
        + body.encode()


@pytest.fixture(scope="module")
def search_user(imap_server) -> tuple[str, list[int]]:
    user = new_user(imap_server, "search")
    c = RawIMAP.login(imap_server, user)
    try:
        for i, (flags, date, _, _) in enumerate(SEARCH_CORPUS):
            r = c.append("INBOX", search_message(i), flags=flags, date=date)
            assert r.status == "OK", f"APPEND for the search corpus:\n{r}"
        c.select("INBOX", examine=True)
        uids = c.command("UID SEARCH ALL").search()
    finally:
        c.close()
    assert len(uids) == 5, uids
    return user, uids


@pytest.fixture
def searcher(imap_server, search_user):
    user, uids = search_user
    c = RawIMAP.login(imap_server, user)
    c.select("INBOX", examine=True)
    yield c, uids
    c.close()


def _check_queries(c: RawIMAP, cases: list[tuple[str, list[int]]], uid: bool = False) -> None:
    wrong = []
    for query, expected in cases:
        r = c.command(("UID SEARCH " if uid else "SEARCH ") + query)
        if r.status != "OK":
            wrong.append(f"SEARCH {query}: {r.status} {r.text!r}")
        elif sorted(r.search()) != sorted(expected):
            wrong.append(f"SEARCH {query}: got {sorted(r.search())}, expected {sorted(expected)}")
    assert not wrong, "\n".join(wrong)


def test_search_flags_and_keywords(searcher):
    c, _ = searcher
    _check_queries(c, [
        ("ALL", [1, 2, 3, 4, 5]),
        ("SEEN", [1, 3]), ("UNSEEN", [2, 4, 5]),
        ("FLAGGED", [2]), ("UNFLAGGED", [1, 3, 4, 5]),
        ("ANSWERED", [3]), ("UNANSWERED", [1, 2, 4, 5]),
        ("DELETED", [4]), ("UNDELETED", [1, 2, 3, 5]),
        ("DRAFT", [5]), ("UNDRAFT", [1, 2, 3, 4]),
        ("KEYWORD $Forwarded", [2]), ("UNKEYWORD $Forwarded", [1, 3, 4, 5]),
        ("KEYWORD ProjectX", [5]), ("KEYWORD NoSuchKeyword", []),
    ])


def test_search_headers_and_text(searcher):
    c, _ = searcher
    _check_queries(c, [
        ("FROM dave", [2]), ("FROM alice", [1, 5]), ('FROM "example.test"', [1, 3, 4, 5]),
        ("TO alice", [2, 3, 4]), ("TO frank", [5]),
        ("CC carol", [1]), ("BCC eve", [2]),
        ("SUBJECT beta", [2]), ('SUBJECT "alpha MEETING"', [1]), ("SUBJECT nothing-like-it", []),
        ("BODY cherry", [2]), ("BODY beta", []), ("BODY durian", [3]),
        ("TEXT beta", [2]), ("TEXT cherry", [2]),
        ("HEADER X-Custom hello", [2]), ('HEADER X-Custom ""', [2]),
        ("HEADER Subject gamma", [3]), ("HEADER Message-ID search-4", [4]),
    ])


def test_search_dates(searcher):
    c, _ = searcher
    _check_queries(c, [
        ("BEFORE 12-Feb-2024", [1]), ("ON 12-Feb-2024", [2]), ("SINCE 20-Mar-2024", [3, 4, 5]),
        ("SINCE 1-Jan-2025", []), ("BEFORE 1-Jan-2024", []),
        ("SENTBEFORE 10-Feb-2024", [1]), ("SENTON 10-Feb-2024", [2]),
        ("SENTSINCE 1-Apr-2024", [4, 5]),
        ('SINCE "05-Jan-2024" BEFORE "20-Mar-2024"', [1, 2]),
    ])


def test_search_sizes_and_logic(searcher):
    c, _ = searcher
    _check_queries(c, [
        ("LARGER 4000", [3]), ("SMALLER 4000", [1, 2, 4, 5]),
        ("NOT SEEN", [2, 4, 5]),
        ("OR SEEN FLAGGED", [1, 2, 3]),
        ("OR FROM dave SUBJECT gamma", [2, 3]),
        ("OR (FROM dave) (SUBJECT gamma)", [2, 3]),
        ("(OR SEEN FLAGGED) NOT ANSWERED", [1, 2]),
        ("(SEEN ANSWERED)", [3]),
        ("NOT (OR SEEN FLAGGED)", [4, 5]),
        ("OR OR DRAFT DELETED ANSWERED", [3, 4, 5]),
        ("SEEN UNDELETED SINCE 1-Jan-2024", [1, 3]),
        ("((SEEN) (NOT FLAGGED (LARGER 100)))", [1, 3]),
    ])


def test_search_sequence_and_uid_sets(searcher):
    c, uids = searcher
    u1, u2, u3, u4, u5 = uids
    _check_queries(c, [
        ("2:*", [2, 3, 4, 5]), ("4,1", [1, 4]), ("*", [5]), ("2:4 NOT 3", [2, 4]),
        ("*:4", [4, 5]), ("1:2,5", [1, 2, 5]), ("5:3", [3, 4, 5]),
        (f"UID {u2}:{u4}", [2, 3, 4]), (f"UID {u5},{u1}", [1, 5]), (f"UID {u3}:*", [3, 4, 5]),
        (f"UID {u5 + 100}", []),
    ])
    _check_queries(c, [
        ("ALL", uids), ("2:3", [u2, u3]), (f"UID {u3}:*", [u3, u4, u5]), ("FLAGGED", [u2]),
    ], uid=True)


def test_search_charset(searcher):
    c, _ = searcher
    word = "Café".encode("utf-8")
    r = c.command_parts([b"SEARCH CHARSET UTF-8 SUBJECT ", Lit(word)])
    assert r.status == "OK" and r.search() == [4], f"UTF-8 literal search:\n{r}"
    r = c.command_parts([b"SEARCH CHARSET UTF-8 BODY ", Lit("espresso".encode())])
    assert r.status == "OK" and r.search() == [4], str(r)
    r = c.command("SEARCH CHARSET US-ASCII SUBJECT beta")
    assert r.status == "OK" and r.search() == [2], str(r)
    r = c.command("SEARCH CHARSET foo SUBJECT beta")
    assert r.status == "NO", f"unknown charset:\n{r}"
    assert r.code is not None and r.code.upper().startswith(b"BADCHARSET"), str(r)
    r = c.command("SEARCH FROBNICATE 3")
    assert r.status == "BAD", str(r)


SEARCH_CASES = [   # (message, as Dovecot searches it)
    # 1: 8-bit UTF-8 in a part labelled US-ASCII, 2: in one with no charset, 3: no MIME
    b"Subject: one\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nmislabeled \xc3\xa9t\xc3\xa9 word\r\n",
    b"Subject: two\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    b"no charset \xc3\xa9t\xc3\xa9\r\n",
    b"Subject: three\r\n\r\nplain \xc3\xa9t\xc3\xa9\r\n",
    # 4: decomposed (macOS), 5: precomposed, 6: folded with a TAB, with a Cc
    b"Subject: Cafe\xcc\x81 nfd\r\n\r\nx\r\n",
    b"Subject: Caf\xc3\xa9 nfc\r\n\r\nx\r\n",
    b"Subject: hello\r\n\tworld tabfold\r\nCc: c@example.test\r\n\r\nx\r\n",
    # 7: a forwarded message, whose headers are part of the text; 8: a day June lacks
    b"Subject: fwd\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--b\r\n"
    b"Content-Type: message/rfc822\r\n\r\nFrom: inner@y.example\r\n"
    b"Subject: innersubj\r\n\r\ninner body\r\n--b--\r\n",
    b"Subject: [blob]\r\nDate: Mon, 31 Jun 2020 10:00:00 +0000\r\n\r\nx\r\n",
]


def test_search_as_a_reader_means_it(imap_server):
    """Found by the words a user sees, whatever the mail's bytes: mislabelled 8-bit text,
    decomposed accents, a TAB fold, a forwarded message's headers; an empty string means
    "has the field"; a day the month does not have is no date."""
    user = new_user(imap_server, "searchx")
    c = RawIMAP.login(imap_server, user)
    try:
        for m in SEARCH_CASES:
            assert c.append("INBOX", m).status == "OK"
        c.select("INBOX")

        def search(*parts: bytes | Lit) -> list[int]:
            r = c.command_parts([b"SEARCH CHARSET UTF-8 ", *parts])
            assert r.status == "OK", str(r)
            return r.search()
        assert search(b"BODY ", Lit("\u00e9t\u00e9".encode())) == [1, 2, 3]
        assert search(b"SUBJECT ", Lit("caf\u00e9".encode())) == [4, 5]
        assert search(b"SUBJECT ", Lit("cafe\u0301".encode())) == [4, 5]
        assert search(b'SUBJECT "hello world"') == [6]
        assert search(b'TEXT "hello world"') == [6]
        assert search(b"TEXT innersubj") == [7]
        assert search(b'TEXT "inner@y.example"') == [7]
        assert search(b'CC ""') == [6]
        assert search(b'NOT CC ""') == [1, 2, 3, 4, 5, 7, 8]
        assert search(b"SENTON 1-Jul-2020") == []
        r = c.ok("SORT (SUBJECT) UTF-8 ALL")
        order = [int(x) for x in r.with_prefix(b"SORT")[0].split()]
        assert order[-1] == 8, str(r)   # "[blob]" after the letters (titlecase), as Dovecot
    finally:
        c.close()


def test_search_new_old_recent(imap_server):
    user = new_user(imap_server, "recent")
    c = RawIMAP.login(imap_server, user)
    c2 = None
    try:
        assert c.append("INBOX", search_message(0), flags=r"\Seen").status == "OK"
        assert c.append("INBOX", search_message(1)).status == "OK"
        r = c.select("INBOX")
        assert r.numbers(b"RECENT") == [2], str(r)
        _check_queries(c, [("RECENT", [1, 2]), ("NEW", [2]), ("OLD", []),
                           ("NOT RECENT", [])])
        c2 = RawIMAP.login(imap_server, user)
        r = c2.select("INBOX")
        assert r.numbers(b"RECENT") == [0], f"\\Recent given to a second session:\n{r}"
        _check_queries(c2, [("RECENT", []), ("NEW", []), ("OLD", [1, 2])])
    finally:
        c.close()
        if c2 is not None:
            c2.close()
