"""Names and tmp/ files of new messages, shared by delivery, APPEND and COPY.

Disk side: nothing here imports Twisted, so folder_disk.py and delivery.py can both use it.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from typing import Mapping

FLUSH_THRESHOLD = 64 * 1024  # bytes buffered in memory before they go to the tmp file
# A new file only: never an existing name, never through a symbolic link.
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

# One counter per process: with the pid and the time it makes every name unique even when
# many deliveries start within the same microsecond.
_counter = itertools.count(1)
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


_DIGITS = re.compile(r"(\d+)")


def arrival_key(base: str) -> list[str | int]:
    """A base name's order among files of the same modification time: its numbers
    compared as numbers (`<secs>.M<usecs>P<pid>Q<counter>`: M99999 came before M100000,
    Q9 before Q10), so new mail gets its UIDs in the order it arrived even when the file
    system's clock tick gave several files one mtime.  Strings and numbers alternate at
    fixed positions, so any two names compare."""
    return [int(t) if i % 2 else t for i, t in enumerate(_DIGITS.split(base))]


def arrival_order(mtimes: Mapping[str, int]) -> list[str]:
    """The base names of `mtimes` (base -> modification time in ns) in the order new files
    get their uids: by modification time, files of one mtime by `arrival_key`, which is
    only worked out for them (a folder's first open gives a hundred thousand files uids)."""
    order = sorted(mtimes, key=mtimes.__getitem__)
    times = [mtimes[b] for b in order]
    i, n = 0, len(order)
    for k in [k for k in range(1, n) if times[k] == times[k - 1]]:
        if k <= i:
            continue  # inside a run sorted already
        i = k - 1
        j = k + 1
        while j < n and times[j] == times[i]:
            j += 1
        order[i:j] = sorted(order[i:j], key=arrival_key)
        i = j
    return order


def unique_base(escaped_host: str) -> str:
    """A new base name `<secs>.M<usecs>P<pid>Q<counter>.<host>` (Maildir spec, Dovecot)."""
    secs, nanos = divmod(time.time_ns(), 1_000_000_000)
    return f"{secs}.M{nanos // 1000}P{_pid}Q{next(_counter)}.{escaped_host}"
