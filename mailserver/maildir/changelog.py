"""A folder's shared change log: the mod-sequences (RFC 7162) every node agrees on.

Only with a shared Maildir root (`[storage] shared`).  Each node keeps its index, and with
it the mod-sequence of each message, in its own state_dir (shared_disk.py); left alone,
two nodes would hand out their own values and a client moving from one to the other could
see HIGHESTMODSEQ go back or miss a change.  So the values are decided in one place, the
file `mailserver-modseq.log` in the folder's directory (it moves with RENAME and goes with
DELETE; Dovecot ignores it):

    MSMODSEQ 1 V<uidvalidity> F<floor>
    <modseq> F <name suffix> <uid set>           flags or file name of these uids changed,
                                                 or they arrived, at <modseq>
    <modseq> X <uid set>                          these uids were expunged at <modseq>
    <modseq> N                                    nothing: the log's highest moves up

A uid set is IMAP's (`3:7,9`).  The name suffix is what follows the base name in the files'
names now (`:2,FS`), `-` for none, `?` when it cannot be written on the line: with it a node
that sees only flag changes renames nothing and lists no directory, it looks at those files.  Lines are appended in ascending mod-sequence, only while
the folder's dovecot-uidlist dot-lock is held (uidlist.py), by the node that made or
found the change, and before that change is reported to any client; a new value is
above the log's highest and above the current time in microseconds (folder_disk.py's
rule).  So the highest value of the log is at least every HIGHESTMODSEQ any node has
announced, and every change above a client's value is in the log, unless compaction
dropped it: the floor F says that every change at or below it may be gone, and a reader
that had not read up to it takes every message as changed at F.  The file is compacted
(rewritten without its oldest lines, the floor raised to the newest dropped) when it
passes COMPACT_AT bytes; it is then a new file (new inode), which tells readers to read
it again from the start.  A log whose V is not the folder's UIDVALIDITY is started anew.

Readers go on from the offset they reached (`LogReader`); a line is used only once its
newline is there.  Nothing here imports Twisted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mailserver.fsutil import fsync_directory, stat_by_open, unlink_quietly, write_all
from mailserver.maildir.uidranges import uid_ranges

log = logging.getLogger(__name__)

CHANGELOG_NAME = "mailserver-modseq.log"
CHANGELOG_TMP_NAME = "mailserver-modseq.log.tmp"
MAGIC = "MSMODSEQ"
VERSION = 1
COMPACT_AT = 1 << 20        # bytes: a longer log is compacted at the next append ...
COMPACT_KEEP = 1 << 18      # ... down to about this many bytes of its newest lines
MAX_LINE = 1 << 16          # a longer line is damage
MAX_SET_UIDS = 10_000_000   # a uid set naming more uids is damage


@dataclass
class LogState:
    """What a read of the log found: the header and the changes above `after`."""

    exists: bool = False
    uidvalidity: int = 0
    floor: int = 0
    highest: int = 0      # the newest line's mod-sequence (the floor when there is none)
    reread: bool = False  # read from the start (first read, or a new file)
    # uid -> (modseq, name suffix: "" none, "?" unknown)
    changed: dict[int, tuple[int, str]] = field(default_factory=dict)
    expunged: dict[int, int] = field(default_factory=dict)             # uid -> modseq
    newest: int = 0       # the highest mod-sequence among the lines returned


def format_uid_set(uids: Iterable[int]) -> str:
    return ",".join(f"{a}" if a == b else f"{a}:{b}" for a, b in uid_ranges(sorted(set(uids))))


def parse_uid_set(text: str) -> list[int]:
    """The uids of `text`; ValueError for anything that is not a uid set."""
    uids: list[int] = []
    for part in text.split(","):
        first, sep, last = part.partition(":")
        a = int(first)
        b = int(last) if sep else a
        if a <= 0 or b < a or len(uids) + b - a + 1 > MAX_SET_UIDS:
            raise ValueError(part)
        uids.extend(range(a, b + 1))
    return uids


def header_line(uidvalidity: int, floor: int) -> bytes:
    return f"{MAGIC} {VERSION} V{uidvalidity} F{floor}\n".encode()


def name_suffix(filename: str, base: str) -> str:
    """What an F line says of a file name: the part after the base ("" for none, "?" when
    it cannot stand on a line)."""
    suffix = filename[len(base):]
    if not suffix:
        return ""
    if suffix[0] != ":" or len(suffix) > 200 or not all("!" <= c <= "~" for c in suffix):
        return "?"
    return suffix


def record_line(modseq: int, kind: str, uids: Iterable[int] = (), suffix: str = "") -> bytes:
    """One line: kind F (with the name suffix, see `name_suffix`), X, or N (no uids)."""
    if kind == "N":
        return f"{modseq} N\n".encode()
    uid_set = format_uid_set(uids)
    if kind == "F":
        return f"{modseq} F {suffix or '-'} {uid_set}\n".encode()
    return f"{modseq} X {uid_set}\n".encode()


def _parse_header(line: bytes) -> tuple[int, int] | None:
    fields = line.decode("ascii", "replace").split()
    if len(fields) < 4 or fields[0] != MAGIC or fields[1] != str(VERSION):
        return None
    try:
        if fields[2][0] != "V" or fields[3][0] != "F":
            return None
        return int(fields[2][1:]), int(fields[3][1:])
    except (ValueError, IndexError):
        return None


class LogReader:
    """Reads one folder's log as it grows (one thread at a time: the folder's disk side).

    `read(after)` returns the lines above mod-sequence `after` that were appended since
    the last read, or all of them when the file is new to it.  It opens the file each
    time, so on NFS close-to-open consistency gives the current size and contents.
    """

    def __init__(self, folder_dir: Path) -> None:
        self.path = Path(folder_dir) / CHANGELOG_NAME
        self._ino: int | None = None
        self._offset = 0
        self.uidvalidity = 0
        self.floor = 0
        self.highest = 0

    def forget(self) -> None:
        """Read from the start next time (after a failure, or the folder moved)."""
        self._ino = None
        self._offset = 0

    def stamp(self) -> tuple[int, int] | None:
        """(inode, size) of the file as it is now (opened: fresh on NFS); None if none."""
        st = stat_by_open(self.path)
        return None if st is None else (st.st_ino, st.st_size)

    @property
    def position(self) -> tuple[int, int] | None:
        """(inode, offset) this reader has reached: equal to `stamp()` when nothing was
        appended since."""
        return None if self._ino is None else (self._ino, self._offset)

    def read(self, after: int) -> LogState:
        state = LogState()
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            self.forget()
            self.uidvalidity = self.floor = self.highest = 0
            return state
        with f:
            st = os.fstat(f.fileno())
            state.exists = True
            if st.st_ino != self._ino or st.st_size < self._offset:
                state.reread = True
                self._ino, self._offset = st.st_ino, 0
                head = f.readline(MAX_LINE)
                parsed = _parse_header(head) if head.endswith(b"\n") else None
                if parsed is None:
                    log.warning("%s: bad header; the log is started again", str(self.path))
                    self.uidvalidity, self.floor, self.highest = 0, 0, 0
                    state.exists = False   # treated as missing: the next writer replaces it
                    self.forget()
                    return state
                self.uidvalidity, self.floor = parsed
                self.highest = self.floor
                self._offset = len(head)
            else:
                f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1   # a line still being written waits for its newline
        self._offset += end
        for line in data[:end].split(b"\n")[:-1]:
            self._apply(line, after, state)
        state.uidvalidity, state.floor, state.highest = self.uidvalidity, self.floor, self.highest
        return state

    def _apply(self, line: bytes, after: int, state: LogState) -> None:
        try:
            fields = line.decode("ascii").split(" ")
            modseq, kind = int(fields[0]), fields[1]
            if kind == "F" and len(fields) == 4 and fields[2][:1] in (":", "-", "?"):
                info = "" if fields[2] == "-" else fields[2]
                uids = parse_uid_set(fields[3])
            elif kind == "X" and len(fields) == 3:
                info, uids = "", parse_uid_set(fields[2])
            elif kind == "N" and len(fields) == 2:
                info, uids = "", []
            else:
                raise ValueError(kind)
        except (ValueError, IndexError, UnicodeDecodeError):
            log.warning("%s: ignoring damaged line %r", str(self.path), line[:80])
            return
        if modseq <= self.highest:
            if modseq < self.highest:
                log.warning("%s: line out of order %r", str(self.path), line[:80])
            if modseq < self.highest or kind == "N":
                return
        self.highest = modseq
        if modseq <= after:
            return
        state.newest = modseq
        if kind == "F":
            for uid in uids:
                state.changed[uid] = (modseq, info)
        elif kind == "X":
            for uid in uids:
                state.expunged[uid] = modseq
                state.changed.pop(uid, None)


class LogWriter:
    """Appends to a folder's log; the caller holds the folder's uid list dot-lock."""

    def __init__(self, folder_dir: Path) -> None:
        self.dir = Path(folder_dir)
        self.path = self.dir / CHANGELOG_NAME

    def start(self, uidvalidity: int, floor: int) -> None:
        """A new log (replacing any): every change at or below `floor` is forgotten."""
        self._replace(header_line(uidvalidity, floor))

    def append(self, lines: list[bytes]) -> bool:
        """Append `lines`; compacts a log grown past COMPACT_AT.  True if the log was
        compacted (it is then a new file).

        Not fsynced, as the index's mod-sequences are not (index.py): on NFS the close()
        sends the data to the server before the lock is released (close-to-open); a crash of
        the machine whose disk holds the file may lose the newest lines, which costs values
        announced again (never reused: a new value is above the clock) and, for a change
        whose line was lost, a new line from the next node that lists the folder and still
        remembers the file's old name."""
        if not lines:
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            data = b"".join(lines)
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data   # a crashed writer's partial line stays one damaged line
            write_all(fd, data)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > COMPACT_AT:
            self.compact()
            return True
        return False

    def compact(self, keep: int | None = None) -> None:
        """Drop the oldest lines, keeping about `keep` bytes (COMPACT_KEEP); the floor
        becomes the newest dropped line's mod-sequence."""
        keep = COMPACT_KEEP if keep is None else keep
        data = self.path.read_bytes()
        head_end = data.find(b"\n") + 1
        parsed = _parse_header(data[:head_end])
        if parsed is None:
            return
        uidvalidity, floor = parsed
        body = data[head_end:data.rfind(b"\n") + 1]
        cut = len(body) - keep
        if cut <= 0:
            return
        cut = body.find(b"\n", cut - 1) + 1  # whole lines only
        dropped = body[:cut].rstrip(b"\n").rpartition(b"\n")[2]
        # A damaged line leaves the floor where it was: the older floor still holds.
        with contextlib.suppress(ValueError):
            floor = max(floor, int(dropped.split(b" ", 1)[0]))
        self._replace(header_line(uidvalidity, floor) + body[cut:])

    def _replace(self, data: bytes) -> None:
        tmp = self.dir / CHANGELOG_TMP_NAME
        unlink_quietly(tmp)   # a crashed writer's leftover: written only under the lock
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        fsync_directory(self.dir)


def vanished_since(folder_dir: Path, uidvalidity: int,
                   modseq: int) -> tuple[int | None, list[int]]:
    """(the log's floor, the uids expunged above `modseq`, ascending), read whole (for
    QRESYNC, in a thread).  The list is complete when `modseq` >= the floor; (None, [])
    when there is no usable log for this UIDVALIDITY."""
    reader = LogReader(folder_dir)
    state = reader.read(modseq)
    if not state.exists or state.uidvalidity != uidvalidity:
        return None, []
    return state.floor, sorted(state.expunged)
