"""Maildir++ quota: the `maildirsize` file in a user's Maildir root, as Courier
(README.maildirquota), maildrop, Exim and Dovecot's quota=maildir keep it, so that usage
is known without walking the folders and every program writing to the Maildir agrees.

The file::

    2048S               the limit: bytes ("S"), optionally ",<n>C" messages; "0S": none
    1393 1              then one line per change: signed bytes and message count,
    -1393 -1            appended (O_APPEND, one write) by whoever adds or removes mail

The usage is the sum of the lines.  It is recalculated by a full scan of every folder's
new/ and cur/ (sizes from the ",S=" of the names, a stat only for names without one) and
written whole through a temporary file and a rename when: the file is missing, it is
5120 bytes or larger, it cannot be parsed, a sum is negative, its limit is not the
configured one, or it says the mailbox is full while holding more than one change line
or being older than 15 minutes (changes made by programs that do not keep the file).

Disk-side: nothing here imports Twisted; errors go to the standard library's `logging`.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from mailserver.fsutil import write_durably
from mailserver.maildir.flags import size_from_base

log = logging.getLogger(__name__)

MAILDIRSIZE = "maildirsize"
WARNED_MARKER = "maildirsize.warned"  # beside it: the 90% warning was sent (removed below 90%)
MAX_FILE = 5120            # bytes; a file this large is recalculated (Maildir++)
STALE_SECONDS = 15 * 60    # a full mailbox's file this old is recalculated (Maildir++)
SCAN_ATTEMPTS = 3          # scans while folders keep changing under the scan
WARN_FRACTION = 0.9


@dataclass(frozen=True)
class Usage:
    """What a Maildir holds, and the byte limit it is measured against (None: no limit)."""

    bytes: int
    count: int
    limit: int | None = None

    @property
    def full(self) -> bool:
        """At or over the limit: new mail is refused (a message that crosses the limit
        is still taken, the next one is not)."""
        return self.limit is not None and self.bytes >= self.limit

    def plus(self, nbytes: int, count: int) -> Usage:
        return Usage(self.bytes + nbytes, self.count + count, self.limit)


@dataclass(frozen=True)
class QuotaFile:
    """A parsed maildirsize: its limits (None: none) and the sums of its change lines."""

    limit: int | None
    count_limit: int | None
    bytes: int
    count: int
    lines: int  # change lines after the limit line


def parse(data: bytes) -> QuotaFile | None:
    """The file's contents, or None when they cannot be trusted: no limit line, a NUL, a
    limit or change line that is not what the format allows.  An unfinished last line
    (a writer caught mid-append) is ignored, as Dovecot does."""
    if b"\0" in data:
        return None
    end = data.rfind(b"\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\n")
    limit = count_limit = None
    for part in lines[0].strip().split(b","):
        if not part:
            continue
        value, kind = part[:-1], part[-1:]
        if not value.isdigit() or kind not in (b"S", b"C"):
            return None
        if kind == b"S":
            limit = int(value) or None
        else:
            count_limit = int(value) or None
    nbytes = count = 0
    for line in lines[1:]:
        fields = line.split()
        if len(fields) != 2:
            return None
        try:
            nbytes += int(fields[0])
            count += int(fields[1])
        except ValueError:
            return None
    return QuotaFile(limit, count_limit, nbytes, count, len(lines) - 1)


def format_file(limit: int | None, nbytes: int, count: int) -> bytes:
    """A whole maildirsize: the limit line and one summary line."""
    return b"%dS\n%d %d\n" % (limit or 0, nbytes, count)


def format_line(nbytes: int, count: int) -> bytes:
    return b"%d %d\n" % (nbytes, count)


# Sums no mailbox reaches: the file is damaged (one line "99999999999999999999 1").
IMPLAUSIBLE_BYTES = 1 << 50      # 1 PiB
IMPLAUSIBLE_COUNT = 1 << 32


def recalc_reason(qf: QuotaFile | None, size: int, mtime: float, limit: int | None,
                  now: float) -> str | None:
    """Why the file must be recalculated (None: its sums can be used)."""
    if qf is None:
        return "unreadable"
    if size >= MAX_FILE:
        return "too large"
    if qf.bytes < 0 or qf.count < 0:
        return "negative"
    if qf.bytes > IMPLAUSIBLE_BYTES or qf.count > IMPLAUSIBLE_COUNT:
        return "implausible"   # a damaged line; trusted, it would refuse mail and warn
    if qf.limit != limit:
        return "limit changed"
    if qf.lines == 0:
        return "no totals"
    if limit is not None and qf.bytes >= limit and (
            qf.lines > 1 or now - mtime >= STALE_SECONDS):
        # Full by the file: check that mail removed by programs that do not keep the
        # file is not what keeps it full (README.maildirquota).
        return "full"
    return None


# -- the scan --------------------------------------------------------------------------------

def folder_dirs(root: Path) -> list[Path]:
    """INBOX (the root) and every Maildir++ folder: `.Name` directories; not `..`-names
    (a folder being deleted is renamed to one)."""
    dirs = [root]
    try:
        with os.scandir(root) as it:
            for entry in it:
                if (entry.name.startswith(".") and not entry.name.startswith("..")
                        and entry.is_dir(follow_symlinks=False)):
                    dirs.append(Path(entry.path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(dirs)


def _dir_stamp(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None


def _sum_dir(path: Path) -> tuple[int, int]:
    """Bytes and messages in one new/ or cur/ directory."""
    nbytes = count = 0
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        size = size_from_base(entry.name.partition(":")[0])
        if size is None:
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # removed meanwhile
        nbytes += size
        count += 1
    return nbytes, count


def scan(root: Path) -> tuple[int, int, dict[Path, int | None]]:
    """Bytes and messages in every folder, and the mtime of each new/ and cur/ as it was
    before it was read (to tell whether anything changed during the scan)."""
    nbytes = count = 0
    stamps: dict[Path, int | None] = {}
    for folder in folder_dirs(root):
        for sub in ("new", "cur"):
            d = folder / sub
            stamps[d] = _dir_stamp(d)
            b, c = _sum_dir(d)
            nbytes += b
            count += c
    return nbytes, count, stamps


def recalculate(root: Path, limit: int | None) -> Usage:
    """Count the Maildir again and write a fresh maildirsize (temporary file in tmp/,
    renamed into place).  Rescans while folders change under the scan (a message added
    then may have been counted by neither the scan nor the old file); after
    SCAN_ATTEMPTS the last count is kept and the next recalculation corrects it."""
    nbytes = count = 0
    for _ in range(SCAN_ATTEMPTS):
        nbytes, count, stamps = scan(root)
        if not stamps:
            return Usage(0, 0, limit)  # no Maildir (yet): nothing to write
        tmp = root / "tmp" / f"{MAILDIRSIZE}.{os.getpid()}.{time.time_ns()}"
        try:
            write_durably(root / MAILDIRSIZE, format_file(limit, nbytes, count), tmp=tmp)
        except OSError as e:
            log.warning("cannot write %s: %s", root / MAILDIRSIZE, e)
            break
        if all(_dir_stamp(d) == s for d, s in stamps.items()):
            break
    return Usage(nbytes, count, limit)


# -- reading -----------------------------------------------------------------------------------

def _read(root: Path) -> tuple[QuotaFile | None, int, float] | None:
    """(parsed file, its size, its mtime); None if there is none."""
    try:
        fd = os.open(root / MAILDIRSIZE, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        data = b""
        while len(data) < MAX_FILE:
            chunk = os.read(fd, MAX_FILE - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return parse(data), max(st.st_size, len(data)), st.st_mtime


def load(root: Path, limit: int | None, now: float | None = None) -> Usage:
    """The usage of the Maildir at `root` against `limit` (bytes; None: no limit), from
    maildirsize, recalculated (and rewritten) when the file says it must be.  Blocking:
    the server runs it in a thread."""
    now = time.time() if now is None else now
    try:
        found = _read(root)
    except OSError as e:
        log.warning("cannot read %s: %s", root / MAILDIRSIZE, e)
        found = None
    if found is not None:
        qf, size, mtime = found
        reason = recalc_reason(qf, size, mtime, limit, now)
        if reason is None:
            assert qf is not None
            return Usage(qf.bytes, qf.count, limit)
        log.debug("recalculating %s: %s", root / MAILDIRSIZE, reason)
    return recalculate(root, limit)


def read_usage(root: Path, limit: int | None = None) -> Usage:
    """The usage of the Maildir at `root`, for a report (`mailserver-admin user list`):
    from maildirsize when it can be trusted, else counted, and never written (the tool
    may run as another user than the server).  `limit` None: the file's own limit."""
    try:
        found = _read(root)
    except OSError:
        found = None
    if found is not None:
        qf, size, mtime = found
        if qf is not None:
            wanted = qf.limit if limit is None else limit
            if recalc_reason(qf, size, mtime, wanted, time.time()) is None:
                return Usage(qf.bytes, qf.count, wanted)
            if limit is None:
                limit = qf.limit
    nbytes, count, _ = scan(root)
    return Usage(nbytes, count, limit)


# -- writing -----------------------------------------------------------------------------------

def append_delta(root: Path, nbytes: int, count: int) -> bool:
    """Record a change (signed bytes and messages) in the Maildir's maildirsize: one line,
    one write with O_APPEND, so that concurrent writers never interleave.  Nothing is
    created: without the file the next reader counts the Maildir anyway.  True if
    recorded; an error is logged, never raised (the file is a cache of the truth)."""
    if not nbytes and not count:
        return True
    try:
        fd = os.open(root / MAILDIRSIZE,
                     os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        log.warning("cannot open %s: %s", root / MAILDIRSIZE, e)
        return False
    try:
        line = format_line(nbytes, count)
        if os.write(fd, line) != len(line):
            log.warning("short write to %s", root / MAILDIRSIZE)
            return False
        return True
    except OSError as e:
        log.warning("cannot write %s: %s", root / MAILDIRSIZE, e)
        return False
    finally:
        os.close(fd)


def forget(root: Path) -> None:
    """Remove maildirsize, so that the next reader counts the Maildir (a folder was
    deleted: its messages went without a change line each)."""
    try:
        os.unlink(root / MAILDIRSIZE)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", root / MAILDIRSIZE, e)


# -- the 90% warning ---------------------------------------------------------------------------

def mark_warned(root: Path) -> bool:
    """Note that the user was warned; True only for the caller that created the mark
    (so one warning per crossing, whichever process sees it first)."""
    try:
        fd = os.open(root / WARNED_MARKER,
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except OSError as e:
        log.warning("cannot create %s: %s", root / WARNED_MARKER, e)
        return False
    os.close(fd)
    return True


def clear_warned(root: Path) -> bool:
    """Usage went below the warning level: the next crossing warns again.  True if a
    mark was removed."""
    try:
        os.unlink(root / WARNED_MARKER)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        log.warning("cannot remove %s: %s", root / WARNED_MARKER, e)
        return False


def is_warned(root: Path) -> bool:
    return os.path.exists(root / WARNED_MARKER)


def _kib(n: int) -> str:
    return f"{(n + 1023) // 1024} KiB"


def warning_message(address: str, usage: Usage, hostname: str,
                    now: float | None = None) -> bytes:
    """The RFC 5322 message that tells `address` its mailbox is nearly full, from
    postmaster of its domain, marked as automatic (RFC 3834) with a null Return-Path so
    that nothing answers or bounces it."""
    domain = address.rpartition("@")[2]
    now = time.time() if now is None else now
    limit = usage.limit or 0
    percent = 100 * usage.bytes // limit if limit else 0
    lines = [
        "Return-Path: <>",
        f"From: Postmaster <postmaster@{domain}>",
        f"To: <{address}>",
        f"Subject: Your mailbox is {percent}% full",
        "Date: " + email.utils.formatdate(now, localtime=True),
        f"Message-ID: <quota.{time.time_ns()}.{os.getpid()}@{hostname}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"Your mailbox {address} holds {_kib(usage.bytes)} of the {_kib(limit)} it may",
        f"hold ({percent}%).",
        "",
        "When it is full, new messages for you are refused or held back until there",
        "is room again.  Please delete messages you no longer need, and empty the",
        "Trash folder.",
        "",
    ]
    return "\r\n".join(lines).encode("ascii", "replace")
