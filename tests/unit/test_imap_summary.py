"""The header summary (imap/summary.py): one pass over a header section gives exactly what
ENVELOPE, BODY[HEADER.FIELDS (...)] and the SEARCH fields give from the file, and a batch
of files is stored in the folder index by the pass itself."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailserver.imap import mime, summary
from mailserver.imap.search import Row
from mailserver.maildir.index import INDEX_NAME, FolderIndex, write_summaries

CORE = (b"DATE", b"FROM", b"TO", b"CC", b"SUBJECT", b"MESSAGE-ID")

HEADS = {
    "plain": (b"From: Ann Example <ann@example.org>\r\nTo: bob@example.test\r\n"
              b"Subject: hello\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
              b"Message-ID: <1@example.org>\r\n\r\nbody\r\n"),
    "folded and repeated": (
        b"Received: from a by b;\r\n\tMon, 01 Jan 2024 00:00:00 +0000\r\n"
        b"To: one@example.test,\r\n two@example.test\r\n"
        b"Subject: a long\r\n  folded subject\r\n"
        b"X-Mailer: mutt\r\n"
        b"To: three@example.test\r\n"
        b"From: x@example.org\r\n"
        b"Cc: \r\n"
        b"Date: Tue, 02 Jan 2024 00:00:00 +0000\r\n\r\n"),
    "encoded and odd names": (
        b"subject : =?utf-8?q?caf=C3=A9?= =?utf-8?b?w6l0w6k=?=\r\n"
        b"FROM: =?iso-8859-1?q?Ren=E9?= <rene@example.org>\r\n"
        b"reply-to: list: a@example.org, b@example.org;\r\n"
        b"In-Reply-To: <0@example.org>\r\n"
        b"Sender: (comment) s@example.org\r\n"
        b"Bcc: hidden@example.test\r\n"
        b"Message-ID: <2@example.org>\r\n\r\n"),
    "eight bit": (b"Subject: caf\xc3\xa9 \xe9t\xe9\r\nFrom: Ren\xe9 <r@example.org>\r\n"
                  b"To: \"Quoted, Name\" <q@example.org>\r\n\r\nx\r\n"),
    "no fields of interest": b"X-Only: this\r\nReceived: by here\r\n\r\nbody\r\n",
    "no body, no blank line": b"Subject: the end\r\nFrom: a@example.org",
    "field first, continuation first line": b" broken continuation\r\nSubject: ok\r\n\r\n",
    "lf only": b"From: a@example.org\nSubject: lf\n folded\nTo: b@example.test\n\nbody\n",
}


def head_of_bytes(tmp_path: Path, data: bytes) -> bytes:
    path = tmp_path / "m"
    path.write_bytes(data)
    return summary.head_of(str(path))


def reference_head(data: bytes) -> bytes:
    """The header section as FETCH read it before the summary (mime.read_head)."""
    import io

    head = mime.read_head(io.BytesIO(data))
    assert head is not None
    return head


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_of_reads_what_read_head_reads(tmp_path: Path, name: str) -> None:
    assert head_of_bytes(tmp_path, HEADS[name]) == reference_head(HEADS[name])


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path: Path) -> None:
    data = b"".join(b"Received: from relay%d by relay%d\r\n" % (i, i + 1) for i in range(400))
    data += b"Subject: deep\r\n\r\nbody\r\n"
    assert len(data) > summary.FIRST_READ
    head = head_of_bytes(tmp_path, data)
    assert head == reference_head(data)
    assert summary.summarize(head).search[0] == "deep"


def test_a_huge_header_is_read_from_the_mapped_file(tmp_path: Path) -> None:
    data = b"X-Big: " + b"y" * (mime.HEAD_MAX + 10) + b"\r\nSubject: big\r\n\r\nbody\r\n"
    head = head_of_bytes(tmp_path, data)
    assert head == data[:data.index(b"\r\n\r\n") + 4]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_envelope_is_the_one_fetch_computes(name: str) -> None:
    head = reference_head(HEADS[name])
    assert summary.summarize(head).envelope == mime.envelope(mime.parse_head(head))


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("names", [CORE, (b"SUBJECT",), (b"TO",), (b"FROM", b"SUBJECT"),
                                   (b"REPLY-TO", b"IN-REPLY-TO", b"SENDER", b"BCC"),
                                   tuple(n.upper() for n in summary.SUMMARY_FIELDS)])
def test_header_fields_are_the_bytes_of_the_file(name: str, names: tuple[bytes, ...]) -> None:
    head = reference_head(HEADS[name])
    lines = summary.summarize(head).lines
    expected = mime.header_fields(head, mime.parse_head(head), names, False)
    wanted = frozenset(n.lower() for n in names)
    assert summary.fields_from_lines(lines, wanted) == expected
    memo: dict = {}
    for _ in range(2):  # the choice kept per list of names gives the same bytes
        assert summary.fields_from_lines(lines, wanted, memo) == expected


def test_repeated_fields_keep_their_order_and_folding() -> None:
    head = reference_head(HEADS["folded and repeated"])
    data = summary.fields_from_lines(summary.summarize(head).lines, frozenset({b"to", b"subject"}))
    assert data == (b"To: one@example.test,\r\n two@example.test\r\n"
                    b"Subject: a long\r\n  folded subject\r\n"
                    b"To: three@example.test\r\n\r\n")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_search_fields_are_the_ones_search_computes(tmp_path: Path, name: str) -> None:
    (tmp_path / "cur").mkdir()
    (tmp_path / "cur" / "m:2,").write_bytes(HEADS[name])
    row = Row()
    info = SimpleNamespace(basename="m", subdir="cur", filename="m:2,", internaldate=0.0)
    row.load(0, 1, info, frozenset(), None, tmp_path)
    head = summary.head_of(str(tmp_path / "cur" / "m:2,"))
    assert (info.basename, *summary.summarize(head).search) == row.search_fields()


def make_folder(tmp_path: Path, count: int) -> list[tuple[str, str, str]]:
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    items = []
    for i in range(count):
        base = f"17000000{i:02d}.M{i}P1.host,S=100"
        name = base + ":2,S"
        (tmp_path / "cur" / name).write_bytes(
            b"From: n%d@example.org\r\nSubject: number %d\r\n\r\nbody\r\n" % (i, i))
        items.append((base, "cur", name))
    return items


def test_a_batch_is_stored_in_the_index(tmp_path: Path) -> None:
    items = make_folder(tmp_path, 5)
    index = FolderIndex(tmp_path)
    index.load()  # creates the file with its schema
    found, rows = summary.summarize_files(str(tmp_path), items)
    assert rows is None  # stored: nothing left for the caller
    assert [b for b, _, _ in found] == [b for b, _, _ in items]
    envelopes = index.get_many([b for b, _, _ in items], summary.ENVELOPE_KEY)
    assert envelopes == {b: env for b, env, _ in found}
    assert index.get(items[2][0], summary.LINES_KEY) == found[2][2]
    assert index.search_match("subject", "number 3") == {items[3][0]}
    index.close()


def test_a_renamed_file_is_found_and_a_vanished_one_left_out(tmp_path: Path) -> None:
    items = make_folder(tmp_path, 3)
    base, sub, name = items[0]
    os.rename(tmp_path / sub / name, tmp_path / sub / (base + ":2,FS"))  # flags changed
    os.unlink(tmp_path / items[1][1] / items[1][2])
    found, rows = summary.summarize_files(str(tmp_path), items)
    assert [b for b, _, _ in found] == [items[0][0], items[2][0]]
    assert rows is not None and len(rows) == 2  # no index yet: the caller keeps them


def test_without_an_index_of_this_schema_nothing_is_written(tmp_path: Path) -> None:
    assert write_summaries(tmp_path, [("b", "envelope", b"x")], []) is False
    assert not (tmp_path / INDEX_NAME).exists()
    conn = sqlite3.connect(tmp_path / INDEX_NAME)
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "INSERT INTO meta VALUES ('schema', 'other');")
    conn.close()
    assert write_summaries(tmp_path, [("b", "envelope", b"x")], []) is False


def test_the_index_may_live_elsewhere(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    items = make_folder(folder, 2)
    index = FolderIndex(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    index.load()
    found, rows = summary.summarize_files(str(folder), items, str(tmp_path / "elsewhere"))
    assert rows is None and len(found) == 2
    assert not (folder / INDEX_NAME).exists()
    assert index.get(items[1][0], summary.ENVELOPE_KEY) == found[1][1]
    index.close()
