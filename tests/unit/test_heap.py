"""The startup heap is frozen: later full collections leave it out, and what is made
afterwards is still collected."""

from __future__ import annotations

import gc
import time
import weakref

from mailserver.heap import freeze_startup_heap


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_frozen_objects_leave_collections_and_new_garbage_is_still_freed():
    before = Cycle()
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        assert not any(o is before for o in gc.get_objects())  # out of every generation
        after = Cycle()
        gone = weakref.ref(after)
        del after
        for _ in range(50):   # a collection already running in another thread skips ours
            gc.collect()
            if gone() is None:
                break
            time.sleep(0.01)
        assert gone() is None   # a cycle made after the freeze is collected as before
    finally:
        gc.unfreeze()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_free_pages_between_live_blocks_go_back_to_the_system():
    """What malloc keeps after a burst: freed blocks in holes between blocks still in
    use, which no automatic trim of the heap's end returns."""
    from mailserver import heap

    if heap._malloc_trim() is None:   # another C library: nothing is given back, and
        assert heap.release_free_memory() is False   # the calls say so
        assert heap.can_release_free_memory() is False
        return
    assert heap.can_release_free_memory()
    heap.release_free_memory()
    blocks = [bytearray(8192) for _ in range(8000)]   # 64 MB through malloc
    kept = blocks[::16]                                # one in 16 stays: holes between
    del blocks
    before = _rss_kb()
    assert heap.release_free_memory()
    after = _rss_kb()
    assert before - after > 30_000, (before, after)
    assert len(kept) == 500
