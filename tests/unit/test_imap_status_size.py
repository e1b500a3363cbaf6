"""STATUS=SIZE (RFC 8438): the thread-side sum (maildir/sizes.py) and STATUS / LIST-STATUS
through a real session and store."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.defer import inlineCallbacks

from mailserver.maildir.sizes import (VSIZE_KEY, crlf_size_of_path, known_vsize,
                                      own_name_pattern, total_vsize)
from mailserver.pop3.wire import crlf_size
from tests.unit.imap_session_harness import SessionCase

OWN = re.compile(r"\d+\.M\d+P\d+Q\d+\.mx,S=\d+")


@pytest.mark.parametrize("data", [
    b"", b"a", b"\n", b"\r", b"\r\n", b"a\nb\n", b"a\r\nb\r\n", b"a\r\nb\nc\r", b"\r\r\n\n",
    b"x" * (256 * 1024 - 1) + b"\r\nz\n",      # a CRLF split across two reads
    b"x" * (256 * 1024 - 1) + b"\r" + b"y\n",  # a bare CR at the end of a read
])
def test_crlf_size_of_path_counts_as_pop3_and_imap_convert(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m"
    path.write_bytes(data)
    assert crlf_size_of_path(path) == crlf_size(io.BytesIO(data))


class _Cache:
    def __init__(self, values: dict[str, object]) -> None:
        self.values = values
        self.asked: list[str] = []

    def get_many(self, bases: list[str], key: str) -> dict[str, object]:
        assert key == VSIZE_KEY
        self.asked += bases
        return {b: self.values[b] for b in bases if b in self.values}


def _info(uid: int, base: str, size: int, filename: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(uid=uid, basename=base, size=size, subdir="cur",
                           filename=filename or base + ":2,")


def test_total_vsize_reads_names_then_cache_then_files(tmp_path: Path) -> None:
    (tmp_path / "cur").mkdir()
    (tmp_path / "cur" / "3.lf:2,").write_bytes(b"a\nb\n")        # 4 octets, 6 as CRLF
    infos = [
        _info(1, "1.M1P1Q1.mx,S=100", 100),                      # ours: CRLF already
        _info(2, "2.M2P2.dovecot,S=90,W=95", 90),                # Dovecot's W=
        _info(3, "3.lf", 4),                                     # measured
        _info(4, "4.cached", 50),                                # from the index
        _info(5, "5.gone", 30),                                  # vanished: twice stored
    ]
    cache = _Cache({"4.cached": b"55"})
    total, measured = total_vsize(infos, tmp_path, cache, OWN)
    assert total == 100 + 95 + 6 + 55 + 60
    assert measured == {3: ("3.lf", 6)}
    assert sorted(cache.asked) == ["3.lf", "4.cached", "5.gone"]


def test_total_vsize_of_nothing(tmp_path: Path) -> None:
    assert total_vsize([], tmp_path, _Cache({}), OWN) == (0, {})


class StatusSize(SessionCase):

    def drop(self, name: str, data: bytes) -> None:
        path = self.user_path / "cur" / (name + ":2,")
        path.write_bytes(data)

    @inlineCallbacks
    def sizes_by_fetch(self) -> object:
        out = yield self.command(b"f", b"FETCH 1:* (RFC822.SIZE)")
        return [int(n) for n in re.findall(rb"RFC822\.SIZE (\d+)", out)]

    @inlineCallbacks
    def status_size(self, mailbox: bytes = b"INBOX") -> object:
        out = yield self.command(b"s", b"STATUS " + mailbox + b" (MESSAGES SIZE)")
        m = re.search(rb"\* STATUS \S+ \(MESSAGES (\d+) SIZE (\d+)\)", out)
        self.assertIsNotNone(m, out)
        return int(m.group(1)), int(m.group(2))

    @inlineCallbacks
    def test_status_size_is_the_sum_of_rfc822_size(self):
        yield self.append(b"Subject: a\r\n\r\nbody\r\n")
        self.drop("1700000000.M1P1.other,S=13,W=15", b"Subject: w\nx\n")  # as Dovecot
        lf = b"Subject: lf\n\nline\nline\n"
        self.drop("1700000001.M2P2.procmail", lf)
        count, size = yield self.status_size()   # first: measures the procmail file
        self.assertEqual(count, 3)
        yield self.select()
        fetched = yield self.sizes_by_fetch()
        self.assertEqual(size, sum(fetched))
        # The measured size is in the cache FETCH and POP3 read.
        folder = self.account.folder("INBOX")
        info = next(i for i in folder.messages if i.basename.endswith("procmail"))
        self.assertEqual(int(folder.cache_get(info.uid, VSIZE_KEY)),
                         len(lf.replace(b"\n", b"\r\n")))

    @inlineCallbacks
    def test_size_follows_changes(self):
        yield self.append(b"Subject: a\r\n\r\nbody\r\n")
        _, before = yield self.status_size()
        yield self.append(b"Subject: b\r\n\r\nmore body\r\n")
        _, after = yield self.status_size()
        self.assertEqual(after - before, len(b"Subject: b\r\n\r\nmore body\r\n"))
        yield self.select()
        yield self.command(b"st", b"STORE 1 +FLAGS (\\Deleted)")
        yield self.command(b"x", b"EXPUNGE")
        _, last = yield self.status_size()
        self.assertEqual(last, after - before)

    @inlineCallbacks
    def test_list_status_size(self):
        self.account.create_folder("Box")
        yield self.append(b"Subject: a\r\n\r\nbody\r\n", mailbox=b"Box")
        out = yield self.command(b"l", b'LIST "" "Box" RETURN (STATUS (SIZE MESSAGES))')
        self.assertIn(b"* STATUS Box (SIZE %d MESSAGES 1)" % len(b"Subject: a\r\n\r\nbody\r\n"),
                      out)

    @inlineCallbacks
    def test_empty_and_bad(self):
        count, size = yield self.status_size()
        self.assertEqual((count, size), (0, 0))
        out = yield self.command(b"b", b"STATUS INBOX (SIZE BOGUS)")
        self.assertIn(b"b BAD", out)
        out = yield self.command(b"b2", b"STATUS INBOX (SIZE")
        self.assertIn(b"b2 BAD", out)
        out = yield self.command(b"n", b"NOOP")
        self.assertIn(b"n OK", out)


@pytest.mark.parametrize("base, size, expected", [
    ("1700000000.M1P2Q3.corpus.example,S=2612,W=2650", 2612, 2650),   # Dovecot's W=
    ("1700000000.M1P2Q3.corpus.example,W=12a,W=40", 9, 40),          # the first good one
    ("1700000000.M1P2Q3.corpus.example,W=", 9, None),
    ("1700000000.M1P2Q3.corpus.example,XW=5", 9, None),
    ("1700000000.M1P2Q3.mx.example,S=77", 77, 77),                   # ours: S= is CRLF
    ("1700000000.M1P2Q3.other.example,S=77", 77, None),              # another's S=: LF?
    ("1700000000.M1P2Q3.mx.example,W=\u0663", 9, None),              # digits are ASCII
])
def test_known_vsize_from_the_name(base: str, size: int, expected: int | None) -> None:
    assert known_vsize(base, size, own_name_pattern("mx.example")) == expected
