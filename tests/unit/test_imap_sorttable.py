"""A folder's sort table (mailserver/imap/sorttable.py): kept while the folder's index is
open, served again while the folder is unchanged, brought up to date when messages are
added or expunged, and giving the same answers as a table built afresh."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailserver.imap import sort as SO
from mailserver.imap import sorttable as SOT
from mailserver.maildir.index import FolderIndex

CRITERIA = ["ARRIVAL", "DATE", "SUBJECT", "REVERSE FROM", "SIZE REVERSE DATE", "TO SUBJECT"]
WORDS = ["plan", "budget", "lunch", "report", "news"]


def write(folder: Path, uid: int, rng: random.Random) -> SimpleNamespace:
    """A message file (few distinct values: ties are common) and its MessageInfo."""
    base = f"m{uid}"
    refs = f"References: <{rng.randrange(1, uid + 1)}@x>\r\n" if rng.random() < 0.5 else ""
    head = (f"Subject: {rng.choice(['', 'Re: '])}{rng.choice(WORDS)}\r\n"
            f"From: {rng.choice('abc')}@x\r\nTo: {rng.choice('de')}@x\r\n"
            f"Date: Mon, {rng.randint(1, 5):02d} Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{uid}@x>\r\n{refs}\r\n")
    (folder / "cur" / f"{base}:2,").write_bytes(head.encode() + b"body\r\n" * rng.randint(1, 3))
    return SimpleNamespace(uid=uid, basename=base, subdir="cur", filename=f"{base}:2,",
                           internaldate=float(rng.randint(1, 5)), size=0)


@pytest.fixture
def folder(tmp_path: Path):
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    index = FolderIndex(tmp_path)
    yield tmp_path, index
    index.close()


def size_hint(info: SimpleNamespace) -> None:
    return None  # measured from the file (and cached)


def answers(table: SO.Columns) -> list[bytes]:
    """What SORT and THREAD answer over every message of `table`."""
    out = [SO.sort_line(SO.sort_positions(table, SO.criteria_from_words(c.encode().split())),
                        table.uid_text()) for c in CRITERIA]
    for build in (SO.references_forest, SO.orderedsubject_forest):
        out.append(SO.thread_line(build(table), table.uid_text()))
    return out


def fresh(path: Path, infos: dict[int, SimpleNamespace]) -> SO.Columns:
    """The same messages' table built from their files alone."""
    table, _ = SOT.folder_table(str(path), infos, None, size_hint)
    return table


def spy(index: FolderIndex) -> list[list[str]]:
    asked: list[list[str]] = []
    real = index.get_many
    def get_many(bases: list[str], key: str) -> dict:
        asked.append(list(bases))
        return real(bases, key)

    index.get_many = get_many  # type: ignore[method-assign]
    return asked


def test_the_kept_table_serves_while_the_folder_is_unchanged(folder) -> None:
    path, index = folder
    rng = random.Random(1)
    infos = {u: write(path, u, rng) for u in range(1, 30)}
    table, added = SOT.folder_table(str(path), infos, index, size_hint)
    assert added == 2 * len(infos)  # keys and sizes, for the index file
    expected = answers(table)
    index.flush()
    asked = spy(index)
    index.last_used = 0.0
    again, added = SOT.folder_table(str(path), infos, index, size_hint)
    assert again is table and added == 0 and asked == []
    assert answers(again) == expected == answers(fresh(path, infos))
    assert index.last_used > 0  # in use: the idle sweep leaves the index open
    # A new UIDVALIDITY: the same UIDs are other messages now.
    other, _ = SOT.folder_table(str(path), infos, index, size_hint, uidvalidity=7)
    assert other is not table and answers(other) == expected


def test_new_messages_are_added_to_the_kept_table(folder) -> None:
    path, index = folder
    rng = random.Random(2)
    infos = {u: write(path, u, rng) for u in range(1, 60)}
    table, _ = SOT.folder_table(str(path), infos, index, size_hint)
    answers(table)  # the orders of every key are kept now
    index.flush()
    for u in range(60, 64):
        infos[u] = write(path, u, rng)
    asked = spy(index)
    grown, _ = SOT.folder_table(str(path), infos, index, size_hint)
    assert grown is not table
    assert asked == [[f"m{u}" for u in range(60, 64)]] * 2  # keys, sizes: the new ones
    assert answers(grown) == answers(fresh(path, infos))
    # Many new messages at once: the orders are sorted again, with the same answers.
    for u in range(64, 100):
        infos[u] = write(path, u, rng)
    grown, _ = SOT.folder_table(str(path), infos, index, size_hint)
    assert answers(grown) == answers(fresh(path, infos))


def test_expunged_messages_leave_the_kept_table(folder) -> None:
    path, index = folder
    rng = random.Random(3)
    infos = {u: write(path, u, rng) for u in range(1, 50)}
    table, _ = SOT.folder_table(str(path), infos, index, size_hint)
    answers(table)
    gone = [3, 4, 17, 30, 49]
    index.drop([f"m{u}" for u in gone])  # the expunge; the table notices on its next use
    for u in gone:
        (path / "cur" / f"m{u}:2,").unlink()
        del infos[u]
    asked = spy(index)
    shrunk, _ = SOT.folder_table(str(path), infos, index, size_hint)
    assert asked == []  # nothing read again
    assert shrunk.uids == list(infos)
    assert answers(shrunk) == answers(fresh(path, infos))
    # Expunged and added at once: built again from the decoded keys.
    del infos[5]
    infos[50] = write(path, 50, rng)
    mixed, _ = SOT.folder_table(str(path), infos, index, size_hint)
    assert answers(mixed) == answers(fresh(path, infos))


def test_a_table_with_a_vanished_file_is_not_kept(folder) -> None:
    path, index = folder
    rng = random.Random(4)
    infos = {u: write(path, u, rng) for u in range(1, 5)}
    (path / "cur" / "m2:2,").unlink()  # expunged by another process, not yet noticed
    table, _ = SOT.folder_table(str(path), infos, index)
    assert table.keys[1] == SO.SortKeys()
    assert SOT.TABLE_KEY not in index.decoded
    del infos[2]
    kept, _ = SOT.folder_table(str(path), infos, index)
    assert index.decoded[SOT.TABLE_KEY] is kept
    infos[5] = SimpleNamespace(uid=5, basename="m5", subdir="cur", filename="m5:2,",
                               internaldate=1.0, size=0)  # its file is gone already
    grown, _ = SOT.folder_table(str(path), infos, index)
    assert grown.uids == [1, 3, 4, 5] and grown.keys[3] == SO.SortKeys()
    assert index.decoded[SOT.TABLE_KEY] is kept


def test_a_few_messages_of_a_folder_without_a_table(folder) -> None:
    # SORT of a handful of messages reads their keys only; once the folder has a table,
    # even a few are answered from it.
    path, index = folder
    rng = random.Random(5)
    infos = {u: write(path, u, rng) for u in range(1, 41)}
    few = [4, 9, 30]
    cols, positions, _ = SOT.table_for(str(path), infos, few, index)
    assert positions is None and cols.uids == few
    assert SOT.TABLE_KEY not in index.decoded
    assert set(index.decoded[SO.CACHE_KEY]) == {"m4", "m9", "m30"}
    table, positions, _ = SOT.table_for(str(path), infos, list(infos), index)
    assert positions is None and isinstance(table, SOT.SortTable)
    again, positions, _ = SOT.table_for(str(path), infos, few, index)
    assert again is table and positions == [3, 8, 29]
    criteria = SO.criteria_from_words([b"REVERSE", b"DATE"])
    assert [again.uids[p] for p in SO.sort_positions(again, criteria, positions)] == \
        [cols.uids[p] for p in SO.sort_positions(cols, criteria)]


def test_numbering_by_the_sessions_view() -> None:
    cols = SO.Columns([2, 5, 7, 9], [1.0] * 4, None, [SO.SortKeys()] * 4)
    same = SOT.Numbering(cols, [2, 5, 7, 9])
    assert same.seqs([3, 0]) == [4, 1]
    assert list(same.text(False, None)) == [b"1", b"2", b"3", b"4"]
    assert list(same.text(True, None)) == [b"2", b"5", b"7", b"9"]
    # The session has not been told of 9 yet, and still sees 3 (expunged meanwhile).
    behind = SOT.Numbering(cols, [2, 3, 5, 7])
    assert behind.seqs([0, 1, 2, 3]) == [1, 3, 4, 0]
    assert [behind.text(False, [1, 2])[p] for p in (1, 2)] == [b"3", b"4"]


def test_sorttable_imports_nothing_from_twisted() -> None:
    code = ("import sys, mailserver.imap.sorttable; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_arrival_and_size_read_no_header_and_keys_come_when_needed(folder, monkeypatch) -> None:
    # A webmail's default sort (ARRIVAL) of a large folder: the folder's list has the
    # values, so no message file is opened; the first sort by a header key reads them.
    path, index = folder
    rng = random.Random(7)
    infos = {u: write(path, u, rng) for u in range(1, 40)}
    real_read_keys = SO.read_keys
    reads: list[int] = []

    def read_keys(folder_dir, messages, index, files=None):
        reads.append(len(messages))
        return real_read_keys(folder_dir, messages, index, files)
    monkeypatch.setattr(SO, "read_keys", read_keys)
    uids = list(infos)
    expected = fresh(path, infos)
    reads.clear()
    for words in (["ARRIVAL"], ["REVERSE", "SIZE", "ARRIVAL"]):
        criteria = SO.criteria_from_words([w.encode() for w in words])
        table, positions, _ = SOT.table_for(str(path), infos, uids, index, size_hint,
                                            need_keys=False)
        assert table.keys is None and positions is None
        assert SO.sort_line(SO.sort_positions(table, criteria), table.uid_text()) == \
            SO.sort_line(SO.sort_positions(expected, criteria), expected.uid_text())
    assert reads == []
    # new mail at the end: still no header read for ARRIVAL
    infos[40] = write(path, 40, rng)
    table, _, _ = SOT.table_for(str(path), infos, list(infos), index, need_keys=False)
    assert table.keys is None and len(table) == 40
    # SUBJECT needs the keys: read once, for every message, into the kept table
    table, _, _ = SOT.table_for(str(path), infos, list(infos), index, size_hint)
    assert table.keys is not None and reads[-1] == len(infos)
    assert answers(table) == answers(fresh(path, infos))
    again, _, _ = SOT.table_for(str(path), infos, list(infos), index, size_hint)
    assert again is table
