"""The garbage collector beside one reactor.

CPython's full collection walks every object the collector tracks, holding the GIL and
with it the reactor, whichever thread set it off.  Right after start the server holds
about 73,000 of them (modules, classes, functions, Twisted's and ours), which no
collection will ever free: 37 ms of every full collection, before a single folder is
loaded.  Frozen once the server runs (gc.freeze), they are left out of all later ones;
what the server makes afterwards is collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then move everything alive into the permanent generation; how many
    objects that froze.  Called once the reactor runs (the twistd plugin).  Should a
    thread be collecting at that moment, ours is skipped and whatever garbage is left
    stays, frozen: memory, not behaviour."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
