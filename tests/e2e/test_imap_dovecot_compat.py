"""A Maildir written by Dovecot opens over IMAP with Dovecot's UIDs, UIDVALIDITY, flags and
keywords, and stays in Dovecot's format after this server changes it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from imap_helpers import (
    RawIMAP,
    as_int,
    crlf,
    flags_of,
    module_server,
    new_user,
    parse_data,
)

imap_server = module_server()

UIDVALIDITY = 1700000000
GUID = "3a9f1b2c4d5e6f708192a3b4c5d6e7f8"


def lf_message(n: int, lines: int) -> bytes:
    body = "".join(f"Dovecot body line {i} of message {n}.\n" for i in range(lines))
    return (f"Return-Path: <x@remote.test>\nFrom: <x@remote.test>\nTo: <u@example.test>\n"
            f"Subject: migrated {n}\nMessage-ID: <dovecot-{n}@remote.test>\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\n\n{body}").encode()


@dataclass
class DovecotMessage:
    uid: int
    base: str
    letters: str
    data: bytes          # LF line ends, as Dovecot stores them
    flags: set[str]


def write_dovecot_folder(folder: Path, inbox: bool = False) -> list[DovecotMessage]:
    """Write a Maildir folder as Dovecot leaves it: dovecot-uidlist v3, dovecot-keywords,
    files in cur/ with ":2,<letters>" and LF-only messages."""
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if not inbox:
        (folder / "maildirfolder").touch()
    specs = [(3, "1700000001.M100P200.oldhost", "S", {"\\Seen"}, 3, "SW"),
             (5, "1700000002.M101P200.oldhost", "FS", {"\\Flagged", "\\Seen"}, 7, "S"),
             (7, "1700000003.M102P200.oldhost", "a", {"$Forwarded"}, 12, "")]
    messages = []
    for uid, stem, letters, flags, lines, size_fields in specs:
        data = lf_message(uid, lines)
        base = stem
        if "S" in size_fields:
            base += f",S={len(data)}"
        if "W" in size_fields:
            base += f",W={len(crlf(data))}"
        (folder / "cur" / f"{base}:2,{letters}").write_bytes(data)
        messages.append(DovecotMessage(uid, base, letters, data, flags))
    (folder / "dovecot-uidlist").write_text(
        f"3 V{UIDVALIDITY} N10 G{GUID}\n" + "".join(f"{m.uid} :{m.base}\n" for m in messages))
    (folder / "dovecot-keywords").write_text("0 $Forwarded\n")
    return messages


def folder_path(server, user: str, name: str) -> Path:
    root = server.maildir(user)
    return root if name == "INBOX" else root / f".{name}"


@pytest.mark.parametrize("name", ["Migrated", "INBOX"])
def test_dovecot_folder_opens_with_its_uids_flags_and_keywords(imap_server, name):
    user = new_user(imap_server, "dove")
    messages = write_dovecot_folder(folder_path(imap_server, user, name), inbox=name == "INBOX")
    c = RawIMAP.login(imap_server, user)
    try:
        if name != "INBOX":
            r = c.ok(f'LIST "" "{name}"')
            assert r.with_prefix(b"LIST "), f"the Dovecot folder is not listed:\n{r}"
        r = c.select(name)
        codes = r.codes()
        assert int(codes.get("UIDVALIDITY", b"0")) == UIDVALIDITY, f"UIDVALIDITY:\n{r}"
        assert int(codes.get("UIDNEXT", b"0")) == 10, f"UIDNEXT:\n{r}"
        assert r.numbers(b"EXISTS") == [3], str(r)
        defined = flags_of(parse_data(r.with_prefix(b"FLAGS ")[0])[0])
        assert "$Forwarded" in defined, f"keyword from dovecot-keywords missing in FLAGS:\n{r}"
        rows = c.fetch("1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[])", uid=True)
        by_uid = {as_int(row["UID"]): row for row in rows.values()}
        assert sorted(by_uid) == [3, 5, 7], f"UIDs: {sorted(by_uid)}"
        for m in messages:
            row = by_uid[m.uid]
            assert flags_of(row["FLAGS"]) - {"\\Recent"} == m.flags, (m.uid, row["FLAGS"])
            assert as_int(row["RFC822.SIZE"]) == len(crlf(m.data)), \
                f"uid {m.uid}: RFC822.SIZE {row['RFC822.SIZE']!r}, CRLF size {len(crlf(m.data))}"
            assert row["BODY[]"] == crlf(m.data), f"uid {m.uid}: BODY[] is not the CRLF form"
        assert c.command("UID SEARCH KEYWORD $Forwarded").search() == [7]
        assert c.command("UID SEARCH UNSEEN").search() == [7]
        assert c.command("UID SEARCH FLAGGED").search() == [5]
        lf_size = len(messages[2].data)  # LARGER counts the CRLF size, not the file's
        assert c.command(f"SEARCH LARGER {lf_size}").search() == [3], "LARGER on an LF file"
    finally:
        c.close()


def _parse_uidlist(path: Path) -> tuple[re.Match, dict[int, str]]:
    lines = path.read_text().splitlines()
    header = re.fullmatch(r"3 V(\d+) N(\d+) G([0-9a-f]{32})(?: .*)?", lines[0])
    assert header, f"dovecot-uidlist header not in version 3 format: {lines[0]!r}"
    entries = {}
    for line in lines[1:]:
        m = re.fullmatch(r"(\d+)(?: [A-Z]\S*)* :(\S+)", line)
        assert m, f"dovecot-uidlist line not in Dovecot's format: {line!r}"
        entries[int(m.group(1))] = m.group(2)
    return header, entries


def _keywords(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"(\d+) (\S+)", line)
        assert m, f"dovecot-keywords line not in Dovecot's format: {line!r}"
        out[m.group(2)] = int(m.group(1))
    return out


def test_store_keeps_dovecot_format(imap_server):
    user = new_user(imap_server, "dovestore")
    folder = folder_path(imap_server, user, "Migrated")
    messages = write_dovecot_folder(folder)
    c = RawIMAP.login(imap_server, user, select="Migrated")
    try:
        c.ok("UID STORE 3 +FLAGS (\\Answered $Forwarded)")
        c.ok("UID STORE 5 -FLAGS (\\Seen)")
        c.ok("UID STORE 7 +FLAGS (\\Flagged Work)")
        r = c.append("Migrated", b"Subject: new\r\nMessage-ID: <new@x>\r\n\r\nnew\r\n")
        assert r.status == "OK", str(r)
        assert r.codes().get("APPENDUID") == f"{UIDVALIDITY} 10".encode(), f"APPENDUID:\n{r}"
        c.ok("NOOP")
    finally:
        c.close()

    keywords = _keywords(folder / "dovecot-keywords")
    assert keywords.get("$Forwarded") == 0, keywords
    assert "Work" in keywords and keywords["Work"] < 26, keywords
    work = chr(ord("a") + keywords["Work"])
    expected = {3: "RSa", 5: "F", 7: "".join(sorted("F" + "a" + work))}
    files = {p.name.split(":", 1)[0]: p for p in (folder / "cur").iterdir()}
    for m in messages:
        path = files.get(m.base)
        assert path is not None, f"uid {m.uid}: no file for base {m.base} in cur/: {sorted(files)}"
        assert path.name == f"{m.base}:2,{expected[m.uid]}", \
            f"uid {m.uid}: {path.name!r}, expected suffix ':2,{expected[m.uid]}'"
        assert path.read_bytes() == m.data, f"uid {m.uid}: message content rewritten"
    header, entries = _parse_uidlist(folder / "dovecot-uidlist")
    assert int(header.group(1)) == UIDVALIDITY and header.group(3) == GUID, header.group(0)
    assert int(header.group(2)) >= 11, f"N (next uid) after an APPEND of uid 10: {header.group(0)}"
    assert {u: entries.get(u) for u in (3, 5, 7)} == {m.uid: m.base for m in messages}, entries
    assert 10 in entries, f"appended message missing in dovecot-uidlist: {entries}"
    new_files = [p for sub in ("cur", "new") for p in (folder / sub).iterdir()
                 if p.name.split(":", 1)[0] == entries[10]]
    assert len(new_files) == 1, f"no file for uid 10 ({entries[10]})"
