"""Exact RFC 3501 answers over imaplib against the real server: message/rfc822 parts as
BODY[n], n.HEADER, n.TEXT, n.MIME, n.HEADER.FIELDS and nested n.m sections and in
BODYSTRUCTURE (6.4.5, 7.4.2); ENVELOPE address groups (7.4.2); FROM/TO/CC/BCC searches on
parsed addresses and decoded display names (6.4.4)."""

from __future__ import annotations

import imaplib
from typing import Any

import pytest

from imap_helpers import (
    close_quietly,
    crlf,
    drop_into_new,
    fetch_items,
    imap_login,
    imaplib_ok,
    module_server,
    new_user,
)

imap_server = module_server()


# -- messages ----------------------------------------------------------------------------------

# A forwarded message that is message/rfc822 as a whole (the case reported wrong).
FWD_INNER_HEADER = crlf("From: sub@domain.org\nDate: Sun, 12 Aug 2012 12:34:56 +0300\n"
                        "Subject: submsg\n\n")
FWD_INNER_BODY = crlf("Hello world\n")
FORWARDED = (crlf("From: user@domain.org\nDate: Sat, 24 Mar 2007 23:00:00 +0200\n"
                  "Message-ID: <fwd@e2e.test>\nMime-Version: 1.0\n"
                  "Content-Type: message/rfc822\n\n") + FWD_INNER_HEADER + FWD_INNER_BODY)

# multipart/mixed: 1 text, 2 message/rfc822 (inner multipart/alternative), 3 message/rfc822
# (inner single part).
P2_MIME = crlf("Content-Type: message/rfc822\nContent-Description: first forward\n\n")
P2_HEADER = crlf("From: Carol <carol@example.test>\nTo: group: g1@d1.org, g2@d2.org;\n"
                 "Cc: undisclosed-recipients:;\nSubject: inner multipart\n"
                 "Message-ID: <inner-2@e2e.test>\nMIME-Version: 1.0\n"
                 "Content-Type: multipart/alternative; boundary=\"alt\"\n\n")
P21 = crlf("Plain inner.\nSecond line.\n")
P22 = crlf("<p>HTML inner</p>\n")
P2_TEXT = (b"--alt\r\nContent-Type: text/plain\r\n\r\n" + P21
           + b"\r\n--alt\r\nContent-Type: text/html\r\n\r\n" + P22 + b"\r\n--alt--\r\n")
P3_HEADER = crlf("From: Dave <dave@remote.test>\nSubject: inner single\n\n")
P3_TEXT = crlf("Single inner body.\n")
MIXED = (crlf("From: Alice <alice@example.test>\nTo: bob@example.test\n"
              "Subject: two forwards\nMessage-ID: <mixed@e2e.test>\nMIME-Version: 1.0\n"
              "Content-Type: multipart/mixed; boundary=\"top\"\n\n")
         + b"--top\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
         + b"\r\n--top\r\n" + P2_MIME + P2_HEADER + P2_TEXT
         + b"\r\n--top\r\nContent-Type: message/rfc822\r\n\r\n" + P3_HEADER + P3_TEXT
         + b"\r\n--top--\r\n")

# imaptest's search-addresses corpus, and display names in RFC 2047 encoded words.
ADDRESSED = [
    ["From: user-from@domain.org", "To: user-to@domain.org", "Cc: user-cc@domain.org",
     "Bcc: user-bcc@domain.org"],
    ["From: RealFrom <user-from@domain.org>", "To: RealTo <user-to@domain.org>",
     "Cc: RealCc <user-cc@domain.org>", "Bcc: RealBcc <user-bcc@domain.org>"],
    ["From: <user-from (comment)@ (comment) domain.org>", "To: <user-to@domain.org>",
     "Cc: <user-cc@domain.org>", "Bcc: <user-bcc@domain.org>"],
    ["From: user-from@domain.org (RealFrom)", "To: user-to@domain.org (RealTo)",
     "Cc: user-cc@domain.org (RealCc)", "Bcc: user-bcc@domain.org (RealBcc)"],
    ["From: user-from1@domain.org, user-from2@domain.org", "Cc: user-cc@domain.org"],
    ["To: groupname: groupuser1@domain.org, groupuser2@domain.org;,\r\n"
     "  groupname2: groupuser3@domain.org;"],
    ["From: =?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <USER-FROM@Domain.ORG>",
     "Cc: =?x-unknown?q?abc?= =?iso-8859-1?q?Ren=E9?= <rene@domain.org>"],
]


def fetch(conn: imaplib.IMAP4, seq: str, items: str) -> dict[str, Any]:
    """One message's FETCH items as {ITEM: value}, from imaplib's pieces put back together."""
    data = imaplib_ok(conn.fetch(seq, items), f"FETCH {seq} {items}")
    raw = b""
    for piece in data:
        if isinstance(piece, tuple):
            raw += piece[0] + b"\r\n" + piece[1]
        else:
            raw += piece
    number, _, rest = raw.partition(b" ")
    assert number == seq.encode(), raw[:200]
    return fetch_items(rest)


@pytest.fixture(scope="module")
def mailbox(imap_server):
    """A user with the forwarded and mixed messages and the addressed ones, in this order."""
    user = new_user(imap_server, "parts")
    maildir = imap_server.maildir(user)
    drop_into_new(maildir, FORWARDED, "1700000001.M1P1.otherhost")
    drop_into_new(maildir, MIXED, "1700000002.M2P1.otherhost")
    for i, headers in enumerate(ADDRESSED, 1):
        message = ("\r\n".join(headers) + f"\r\nMessage-ID: <addr-{i}@e2e.test>\r\n\r\nbody\r\n")
        drop_into_new(maildir, message.encode(), f"17000001{i:02d}.M{i}P2.otherhost")
    return user


@pytest.fixture
def conn(imap_server, mailbox):
    c = imap_login(imap_server, mailbox)
    imaplib_ok(c.select("INBOX", readonly=True), "SELECT")
    seqs = {}
    for seq in range(1, 3 + len(ADDRESSED)):
        value = fetch(c, str(seq), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        seqs[value["BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b":", 1)[1].strip().decode()] = seq
    yield c, seqs
    close_quietly(c)


def test_forwarded_message_sections(conn):
    """RFC 3501 6.4.5: BODY[1] of a message/rfc822 message is the whole forwarded message."""
    c, seqs = conn
    seq = str(seqs["<fwd@e2e.test>"])
    row = fetch(c, seq, "(BODY.PEEK[1] BODY.PEEK[1.HEADER] BODY.PEEK[1.TEXT] BODY.PEEK[1.1] "
                        "BODY.PEEK[1.HEADER.FIELDS (FROM SUBJECT)])")
    assert row["BODY[1]"] == FWD_INNER_HEADER + FWD_INNER_BODY
    assert row["BODY[1.HEADER]"] == FWD_INNER_HEADER
    assert row["BODY[1.TEXT]"] == FWD_INNER_BODY
    assert row["BODY[1.1]"] == FWD_INNER_BODY
    assert row["BODY[1.HEADER.FIELDS (FROM SUBJECT)]"] == crlf(
        "From: sub@domain.org\nSubject: submsg\n\n")


def test_message_rfc822_parts_of_a_multipart(conn):
    c, seqs = conn
    seq = str(seqs["<mixed@e2e.test>"])
    sections = {
        "2": P2_HEADER + P2_TEXT, "2.MIME": P2_MIME, "2.HEADER": P2_HEADER, "2.TEXT": P2_TEXT,
        "2.1": P21, "2.2": P22, "2.HEADER.FIELDS (SUBJECT)": crlf("Subject: inner multipart\n\n"),
        "3": P3_HEADER + P3_TEXT, "3.HEADER": P3_HEADER, "3.TEXT": P3_TEXT, "3.1": P3_TEXT,
    }
    row = fetch(c, seq, "(" + " ".join(f"BODY.PEEK[{s}]" for s in sections) + ")")
    wrong = [f"BODY[{s}]: {row.get(f'BODY[{s}]')!r} != {want!r}"
             for s, want in sections.items() if row.get(f"BODY[{s}]") != want]
    assert not wrong, "\n".join(wrong)


def test_bodystructure_carries_the_inner_message(conn):
    """RFC 3501 7.4.2: a MESSAGE/RFC822 part has the inner ENVELOPE, BODYSTRUCTURE and
    its size in lines."""
    c, seqs = conn
    bs = fetch(c, str(seqs["<mixed@e2e.test>"]), "BODYSTRUCTURE")["BODYSTRUCTURE"]
    p2, p3 = bs[1], bs[2]
    assert [bytes(x).upper() for x in p2[:2]] == [b"MESSAGE", b"RFC822"], p2
    assert int(p2[6]) == len(P2_HEADER + P2_TEXT)
    env, inner, lines = p2[7], p2[8], p2[9]
    assert env[1] == b"inner multipart" and env[9] == b"<inner-2@e2e.test>", env
    assert env[5] == [[None, None, b"group", None], [None, None, b"g1", b"d1.org"],
                      [None, None, b"g2", b"d2.org"], [None, None, None, None]], env[5]
    assert isinstance(inner[0], list) and isinstance(inner[1], list), inner
    assert bytes(inner[2]).upper() == b"ALTERNATIVE", inner
    assert int(lines) == (P2_HEADER + P2_TEXT).count(b"\n")
    env3, inner3, lines3 = p3[7], p3[8], p3[9]
    assert env3[1] == b"inner single" and env3[2] == [[b"Dave", None, b"dave", b"remote.test"]]
    assert [bytes(x).upper() for x in inner3[:2]] == [b"TEXT", b"PLAIN"], inner3
    assert int(inner3[6]) == len(P3_TEXT) and int(lines3) == (P3_HEADER + P3_TEXT).count(b"\n")
    fwd = fetch(c, str(seqs["<fwd@e2e.test>"]), "BODYSTRUCTURE")["BODYSTRUCTURE"]
    assert fwd[7][1] == b"submsg" and int(fwd[6]) == len(FWD_INNER_HEADER + FWD_INNER_BODY), fwd


def test_envelope_groups(conn):
    """RFC 3501 7.4.2: group syntax as (NIL NIL name NIL) ... (NIL NIL NIL NIL)."""
    c, seqs = conn
    env = fetch(c, str(seqs["<addr-6@e2e.test>"]), "ENVELOPE")["ENVELOPE"]
    assert env[5] == [[None, None, b"groupname", None],
                      [None, None, b"groupuser1", b"domain.org"],
                      [None, None, b"groupuser2", b"domain.org"],
                      [None, None, None, None],
                      [None, None, b"groupname2", None],
                      [None, None, b"groupuser3", b"domain.org"],
                      [None, None, None, None]], env[5]
    # the inner message's Cc: undisclosed-recipients:; (an empty group)
    bs = fetch(c, str(seqs["<mixed@e2e.test>"]), "BODYSTRUCTURE")["BODYSTRUCTURE"]
    assert bs[1][7][6] == [[None, None, b"undisclosed-recipients", None],
                           [None, None, None, None]], bs[1][7][6]


SEARCHES = [
    ("FROM user-from@domain.org", [1, 2, 3, 4, 7]),
    ("TO user-to@domain.org", [1, 2, 3, 4]),
    ("CC user-cc@domain.org", [1, 2, 3, 4, 5]),
    ("BCC user-bcc@domain.org", [1, 2, 3, 4]),
    ("FROM realfrom", [2, 4]), ("BCC ealbc", [2, 4]), ("FROM ser-fro", [1, 2, 3, 4, 5, 7]),
    ("TO groupname2", [6]), ("TO groupuser3", [6]), ("TO groupuser4", []),
    ("FROM USER-FROM@DOMAIN.ORG", [1, 2, 3, 4, 7]),
]
UTF8_SEARCHES = [("FROM", "jörg müller", [7]), ("CC", "René", [7]), ("FROM", "MÜLLER", [7])]


def _addressed(seqs: dict[str, int], found: bytes) -> list[int]:
    by_seq = {seq: int(mid[6:-len("@e2e.test>")]) for mid, seq in seqs.items()
              if mid.startswith("<addr-")}
    return sorted(by_seq[int(n)] for n in found.split() if int(n) in by_seq)


def test_search_addresses(conn):
    """RFC 3501 6.4.4: FROM/TO/CC/BCC match the addresses and display names, whatever the
    comments, groups and encoded words of the field, case-insensitively."""
    c, seqs = conn
    wrong = []
    for criteria, expected in SEARCHES:
        data = imaplib_ok(c.search(None, *criteria.split(" ", 1)), f"SEARCH {criteria}")
        if _addressed(seqs, data[0]) != expected:
            wrong.append(f"SEARCH {criteria}: {data[0]!r}, expected {expected}")
    for key, text, expected in UTF8_SEARCHES:
        c.literal = text.encode("utf-8")
        data = imaplib_ok(c.search("UTF-8", key), f"SEARCH {key} {text}")
        if _addressed(seqs, data[0]) != expected:
            wrong.append(f"SEARCH CHARSET UTF-8 {key} {text}: {data[0]!r}, expected {expected}")
    assert not wrong, "\n".join(wrong)
