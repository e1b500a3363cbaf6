"""The shared change log of a folder (mailserver.maildir.changelog): its lines, a reader
that goes on where it stopped, compaction with a floor, and what damage does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailserver.maildir.changelog import (
    CHANGELOG_NAME,
    LogReader,
    LogWriter,
    format_uid_set,
    name_suffix,
    parse_uid_set,
    record_line,
    vanished_since,
)


def started(tmp_path: Path, uidvalidity: int = 77, floor: int = 1000) -> LogWriter:
    w = LogWriter(tmp_path)
    w.start(uidvalidity, floor)
    return w


def test_uid_sets_round_trip() -> None:
    assert format_uid_set([9, 3, 4, 5, 7, 4]) == "3:5,7,9"
    assert parse_uid_set("3:5,7,9") == [3, 4, 5, 7, 9]
    for bad in ("0", "5:3", "x", "", "1:20000000"):
        with pytest.raises(ValueError):
            parse_uid_set(bad)


def test_name_suffix_says_what_a_line_can_carry() -> None:
    assert name_suffix("123.M1P2.host,S=10:2,FS", "123.M1P2.host,S=10") == ":2,FS"
    assert name_suffix("123.M1P2.host,S=10", "123.M1P2.host,S=10") == ""
    assert name_suffix("123.host:2,S with space", "123.host") == "?"


def test_lines_are_read_with_their_values(tmp_path: Path) -> None:
    w = started(tmp_path)
    w.append([record_line(1001, "F", [1, 2, 3], ":2,S"), record_line(1002, "F", [2], ""),
              record_line(1003, "X", [3]), record_line(1004, "N")])
    state = LogReader(tmp_path).read(0)
    assert (state.exists, state.uidvalidity, state.floor, state.highest) == (True, 77, 1000, 1004)
    assert state.changed == {1: (1001, ":2,S"), 2: (1002, "")}
    assert state.expunged == {3: 1003}
    assert (tmp_path / CHANGELOG_NAME).read_text().splitlines() == [
        "MSMODSEQ 1 V77 F1000", "1001 F :2,S 1:3", "1002 F - 2", "1003 X 3", "1004 N"]


def test_a_reader_goes_on_where_it_stopped(tmp_path: Path) -> None:
    w = started(tmp_path)
    reader = LogReader(tmp_path)
    w.append([record_line(1001, "F", [1], ":2,")])
    first = reader.read(0)
    assert first.reread and first.changed == {1: (1001, ":2,")}
    assert reader.position == reader.stamp()
    w.append([record_line(1002, "F", [2], ":2,F")])
    assert reader.position != reader.stamp()   # something to read
    second = reader.read(1001)
    assert not second.reread and second.changed == {2: (1002, ":2,F")}
    # Lines at or below `after` are skipped, the highest still follows them.
    w.append([record_line(1003, "F", [3], ":2,")])
    assert reader.read(5000).changed == {} and reader.highest == 1003


def test_a_line_without_its_newline_waits(tmp_path: Path) -> None:
    started(tmp_path)
    reader = LogReader(tmp_path)
    reader.read(0)
    with open(tmp_path / CHANGELOG_NAME, "ab") as f:
        f.write(b"1001 F :2, 5")            # a writer in the middle of its write
    assert reader.read(0).changed == {}
    with open(tmp_path / CHANGELOG_NAME, "ab") as f:
        f.write(b"\n")
    assert reader.read(0).changed == {5: (1001, ":2,")}


def test_a_crashed_writers_partial_line_stays_one_damaged_line(tmp_path: Path) -> None:
    w = started(tmp_path)
    with open(tmp_path / CHANGELOG_NAME, "ab") as f:
        f.write(b"1001 F :2, 1:")         # the writer died here
    w.append([record_line(1002, "X", [4])])
    state = LogReader(tmp_path).read(0)
    assert state.changed == {} and state.expunged == {4: 1002} and state.highest == 1002


def test_damaged_and_out_of_order_lines_are_ignored(tmp_path: Path) -> None:
    w = started(tmp_path)
    with open(tmp_path / CHANGELOG_NAME, "ab") as f:
        f.write(b"1005 F :2, 1\nnonsense\n1003 F :2, 2\n1006 Q 3\n1007 X 0:1\n")
    w.append([record_line(1008, "F", [4], ":2,T")])
    state = LogReader(tmp_path).read(0)
    assert state.changed == {1: (1005, ":2,"), 4: (1008, ":2,T")}
    assert state.highest == 1008


def test_compaction_drops_old_lines_and_raises_the_floor(tmp_path: Path) -> None:
    w = started(tmp_path, floor=1000)
    reader = LogReader(tmp_path)
    lines = [record_line(1000 + n, "F", [n], ":2,S") for n in range(1, 201)]
    w.append(lines)
    reader.read(0)
    ino = os.stat(tmp_path / CHANGELOG_NAME).st_ino
    w.compact(keep=len(b"".join(lines[-50:])))
    assert os.stat(tmp_path / CHANGELOG_NAME).st_ino != ino   # readers start over
    state = reader.read(1100)
    assert state.reread
    assert state.floor == 1150 and state.highest == 1200
    assert sorted(state.changed) == list(range(151, 201))
    # A reader that had stopped below the floor can tell it missed lines.
    assert LogReader(tmp_path).read(0).floor > 1100


def test_append_compacts_a_long_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailserver.maildir import changelog
    monkeypatch.setattr(changelog, "COMPACT_AT", 4000)
    monkeypatch.setattr(changelog, "COMPACT_KEEP", 1000)
    w = started(tmp_path)
    compacted = False
    for n in range(1, 400):
        compacted |= w.append([record_line(1000 + n, "F", [n], ":2,")])
    assert compacted and (tmp_path / CHANGELOG_NAME).stat().st_size < 4000
    state = LogReader(tmp_path).read(0)
    assert state.floor > 1000 and state.highest == 1399 and 399 in state.changed


def test_a_bad_header_counts_as_no_log(tmp_path: Path) -> None:
    (tmp_path / CHANGELOG_NAME).write_bytes(b"something else\n1001 F :2, 1\n")
    assert not LogReader(tmp_path).read(0).exists
    assert not LogReader(tmp_path / "nowhere").read(0).exists


def test_vanished_since_reads_the_expunges(tmp_path: Path) -> None:
    w = started(tmp_path, uidvalidity=5, floor=100)
    w.append([record_line(101, "X", [3, 4]), record_line(102, "F", [5], ":2,"),
              record_line(103, "X", [9])])
    assert vanished_since(tmp_path, 5, 100) == (100, [3, 4, 9])
    assert vanished_since(tmp_path, 5, 101) == (100, [9])
    assert vanished_since(tmp_path, 6, 100) == (None, [])   # another UIDVALIDITY's log
