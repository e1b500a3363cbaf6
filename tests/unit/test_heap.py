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
