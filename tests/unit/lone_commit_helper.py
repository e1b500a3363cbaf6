"""Commits messages one at a time through the server's committer until it is killed: the
subject of test_commit_lone's crash test.

    lone_commit_helper.py ROOT TARGET

Each delivery is alone (the previous one has been answered), so each is committed by the
committer's lone-delivery thread.  Prints "committed SEED" once a delivery's Deferred has
fired (the moment the server would send its 250), so the parent knows which messages
were acknowledged.  Messages are maildir_crash_helper's: their content can be checked
from their headers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import defer, reactor

from maildir_crash_helper import make_message
from mailserver.maildir import MaildirStore


@defer.inlineCallbacks
def loop(store: MaildirStore, target: Path):
    seed = 0
    while True:
        seed += 1
        message = make_message(seed, (seed * 7919) % (200 * 1024))
        delivery = store.begin_delivery([target])
        for i in range(0, len(message), 4000):
            delivery.write(message[i:i + 4000])
        results = yield delivery.commit()
        if not all(r.ok for r in results):
            print("failed", seed, results, flush=True)
            reactor.stop()
            return
        print("committed", seed, flush=True)


def main(argv: list[str]) -> None:
    root, target = argv
    store = MaildirStore(Path(root), hostname="crash.test", commit_process=True)
    reactor.callWhenRunning(loop, store, Path(target))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
