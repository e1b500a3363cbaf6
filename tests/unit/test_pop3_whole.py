"""RETR of a message read whole (pop3/whole.py): the same bytes as the streaming path."""

from __future__ import annotations

import io
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.trial import unittest as trial

from mailserver.maildir import MaildirStore
from mailserver.pop3.mailbox import MailboxLocks, open_inbox
from mailserver.pop3.whole import WHOLE_MAX, multiline, read_whole, response
from mailserver.pop3.wire import message_chunks

SAMPLES = [
    b"",
    b"\r\n",
    b"\n",
    b".",
    b".\r\n",
    b"..\r\n.\r\n",
    b"Subject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\n\r\nno final line end",
    b"Subject: x\r\n\r\nends with a CR\r",
    b"Subject: lf\n\n.starts with a dot\nbody\n",
    b"Subject: mixed\r\n\n.one\r\n.two\n\r\n",
    b"bare\rCR\r\nand .dots\r\n.\r\n..\r\n",
    b".\n.\n.",
]


def streamed(data: bytes) -> bytes:
    return b"".join(message_chunks(io.BytesIO(data)))


def random_messages(n: int) -> list[bytes]:
    rnd = random.Random(1939)
    pieces = [b"a", b"xyz", b".", b"..", b"\r\n", b"\n", b"\r", b" ", b"\r\n.", b"\n."]
    return [b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 60)))
            for _ in range(n)]


@pytest.mark.parametrize("data", SAMPLES)
def test_same_bytes_as_the_streaming_path(data: bytes) -> None:
    assert b"".join(multiline(data)) == streamed(data)


def test_same_bytes_as_the_streaming_path_random_messages() -> None:
    for data in random_messages(500):
        assert b"".join(multiline(data)) == streamed(data), data
        if data.count(b"\n") == data.count(b"\r\n"):
            # a file known to be CRLF (its size is its CRLF size) skips the search
            assert b"".join(multiline(data, crlf=True)) == streamed(data), data


def _crlf_size(data: bytes) -> int:
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


@pytest.mark.parametrize("data", SAMPLES)
def test_response_is_the_head_then_the_streamed_bytes(data: bytes) -> None:
    assert response(b"+OK\r\n", data, _crlf_size(data)) == b"+OK\r\n" + streamed(data)


def test_a_wrong_listed_size_still_converts_bare_lfs() -> None:
    """Only a file exactly the size of its CRLF form skips the search; any other size
    (a name that says something else) is checked and converted."""
    data = b"Subject: lf\n\nbody\n"
    for listed in (len(data) + 1, len(data) + 10, 0):
        assert response(b"", data, listed) == b"Subject: lf\r\n\r\nbody\r\n.\r\n"


class ReadWholeTests(trial.TestCase):
    """read_whole over a real INBOX snapshot (mailbox.py)."""

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="pop3-whole-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = MaildirStore(root / "maildirs", hostname="mail.example.test")
        self.inbox = self.store.create_user("example.test", "alice")
        self.locks = MailboxLocks()

    @defer.inlineCallbacks
    def open(self, files: dict[str, bytes]):
        for name, data in files.items():
            (self.inbox / "new" / name).write_bytes(data)
        mbox = yield open_inbox(self.store, self.inbox, "alice@example.test", self.locks)
        self.addCleanup(mbox.folder.close)  # its index, pending cache writes included
        self.addCleanup(mbox.logout)
        return mbox

    @defer.inlineCallbacks
    def test_small_files_read_larger_ones_left_to_the_stream(self):
        line = b"y" * 98 + b"\r\n"
        at_limit = (line * (WHOLE_MAX // len(line) + 1))[:WHOLE_MAX]
        mbox = yield self.open({"1600000001.M1P1.h": at_limit,
                                "1600000002.M1P1.h": at_limit + b"\r\n",
                                "1600000003.M1P1.h": b""})
        got = [read_whole(mbox, mbox.entry(n)) for n in (1, 2, 3)]
        self.assertEqual(got, [at_limit, None, b""])

    @defer.inlineCallbacks
    def test_a_file_moved_or_removed_meanwhile_is_left_to_mbox_open(self):
        mbox = yield self.open({"1600000001.M1P1.h": b"a\r\n", "1600000002.M1P1.h": b"b\r\n"})
        first, second = mbox.entry(1), mbox.entry(2)
        path = mbox.folder.message_path(first.uid)
        path.rename(self.inbox / "cur" / (path.name + ":2,S"))  # another program's rename
        self.assertIsNone(read_whole(mbox, first))
        with mbox.open(first) as f:  # which finds it by its base name
            self.assertEqual(f.read(), b"a\r\n")
        mbox.folder.message_path(second.uid).unlink()
        self.assertIsNone(read_whole(mbox, second))
