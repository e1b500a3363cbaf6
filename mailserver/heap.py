"""The garbage collector and the C allocator beside one reactor.

CPython's full collection walks every object the collector tracks, holding the GIL and
with it the reactor, whichever thread set it off.  Right after start the server holds
about 73,000 of them (modules, classes, functions, Twisted's and ours), which no
collection will ever free: 37 ms of every full collection, before a single folder is
loaded.  Frozen once the server runs (gc.freeze), they are left out of all later ones;
what the server makes afterwards is collected as before.

glibc's malloc keeps what a burst freed (a thousand logins, a large FETCH) for reuse, in
holes between what stays: 1,000 idle IMAP connections held 131 MB of RSS after their
logins, 107 MB once those free pages went back to the system.  release_free_memory() gives
them back; the server calls it every TRIM_SECONDS from a thread (0.2 ms when there is
nothing to give back, 3 ms after such a burst; the GIL is not held meanwhile).
"""

from __future__ import annotations

import ctypes
import functools
import gc
from typing import Callable

TRIM_SECONDS = 1.0


def freeze_startup_heap() -> int:
    """Collect once, then move everything alive into the permanent generation; how many
    objects that froze.  Called once the reactor runs (the twistd plugin).  Should a
    thread be collecting at that moment, ours is skipped and whatever garbage is left
    stays, frozen: memory, not behaviour."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def can_release_free_memory() -> bool:
    """Whether release_free_memory() can do anything here (glibc): where it cannot, the
    server does not call it every second for nothing."""
    return _malloc_trim() is not None


def release_free_memory() -> bool:
    """Return the C allocator's free pages to the system (glibc's malloc_trim); False
    where there is no such call (another C library): nothing to do then."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim   # the process's own C library
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
