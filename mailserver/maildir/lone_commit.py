"""The thread that commits a lone delivery (see commit_process: when nothing else is
being committed), with as few wake-ups as a hand-over between two threads allows.

Each wake-up costs a scheduling delay, long on a busy machine, and so does every wait for
the GIL.  A Condition (GroupCommitter) adds two: notified while the reactor still holds
the condition's lock and the GIL, the thread woke, slept on the lock, woke, slept on the
GIL and woke again, and the reactor waited for the GIL meanwhile.  Here work is put on a
SimpleQueue from the reactor's next turn (`callLater(0)`), the last thing the reactor runs
before it waits for events and lets the GIL go: the thread wakes once, to a free GIL.  The
result comes back with `callFromThread`, the thread's last step before it waits again.

Creating a file costs a new inode, as much as writing and syncing a small message on a
busy file system (ext4 looks for a free inode past the recently freed ones), so after two
deliveries in a row into the same Maildir the next one's file without a name is made
ahead, while that client is still busy with its next message (Postfix's cleanup, too,
creates its queue file as a message starts, not at its end).  The reactor asks for it
once it has answered the delivery, two turns later: the answer is written to the socket
on the reactor's next turn, after the calls due in that turn, so that the thread never
takes the GIL from the reactor before the answer has gone out.  A delivery into another Maildir closes
the spare file (a file without a name leaves nothing behind), and the pattern has to
repeat before the next spare is made.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailserver.maildir.committer import commit_group
from mailserver.maildir.delivery import Delivery, DeliveryResult, file_without_name

# A job: (delivery, its Deferred) to commit, (directory, None) to make a spare file
# there, None to stop.
_Job = tuple[Delivery, Deferred] | tuple[Path, None] | None


class LoneCommitter:
    """`commit(delivery)`: the delivery's stages (`committer.commit_group`) in one thread
    of this process, one delivery at a time; fires in the reactor."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last: Path | None = None  # where the last delivery's file was made
        self._queued = 0  # deliveries handed to the thread so far

    def commit(self, delivery: Delivery) -> Deferred[list[DeliveryResult]]:
        d: Deferred[list[DeliveryResult]] = Deferred()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="maildir-commit-lone",
                                            daemon=True)
            self._thread.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        where = delivery.file_dir()
        again, self._last = where is not None and where == self._last, where
        self._queued += 1
        self._reactor.callLater(0, self._jobs.put, (delivery, d))
        if again:  # once answered: a spare file for the next one
            d.addBoth(self._spare, where)
        return d

    def _spare(self, result: Any, where: Path) -> Any:
        self._reactor.callLater(0, self._reactor.callLater, 0, self._ask_spare, where,
                                self._queued)
        return result

    def _ask_spare(self, where: Path, queued: int) -> None:
        """Not when another delivery was queued meanwhile: it asks for its own spare if it
        repeats its Maildir, and this one would come after it, for nothing."""
        if queued == self._queued:
            self._jobs.put((where, None))

    def stop(self) -> None:
        """End the thread once it has committed what it holds (at shutdown)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=30)

    def _work(self) -> None:
        spare: tuple[Path, int] | None = None  # (new/, a file without a name open there)
        while (job := self._jobs.get()) is not None:
            if spare is not None and (job[1] is None or job[0].file_dir() != spare[0]):
                os.close(spare[1])  # a new spare, or a delivery to another Maildir
                spare = None
            if job[1] is None:
                try:
                    spare = (job[0], file_without_name(job[0]))
                except OSError:
                    pass  # the delivery makes its own file, and reports the error
                continue
            delivery, d = job
            if spare is not None:
                delivery.take_file(spare[1])
                spare = None
            try:
                ((_, result),) = commit_group([(delivery, None)])
            except BaseException:  # never expected; the delivery fails, the thread goes on
                result = Failure()
            self._reactor.callFromThread(_fire, d, result)
        if spare is not None:
            os.close(spare[1])


def _fire(d: Deferred, result: Any) -> None:
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)
