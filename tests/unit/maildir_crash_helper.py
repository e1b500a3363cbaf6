"""Delivers into Maildirs until it is killed: the subject of the crash-safety tests.

    maildir_crash_helper.py slow ROOT TARGET...   one big message, written slowly, never committed
    maildir_crash_helper.py loop ROOT TARGET...   complete messages, one after another

Prints one line per milestone so the parent knows when to send SIGKILL.  Each message
carries its own length and seed, so the parent can check any file that reached new/.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from mailserver.maildir import MaildirStore


def make_message(seed: int, length: int) -> bytes:
    """A message whose body can be recomputed from its headers."""
    head = f"X-Seed: {seed}\nX-Length: {length}\n\n".encode()
    return head + body_for(seed, length)


def body_for(seed: int, length: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).hexdigest().encode() + b"\n"
    return (block * (length // len(block) + 1))[:length]


def slow(store: MaildirStore, targets: list[Path]) -> None:
    delivery = store.begin_delivery(targets)
    chunk = b"x" * 8192
    announced = False
    while True:
        delivery.write(chunk)
        if not announced and delivery.size >= 1 << 20:
            print("writing", delivery.tmp_path, flush=True)
            announced = True
        time.sleep(0.0005)


def loop(store: MaildirStore, targets: list[Path]) -> None:
    seed = 0
    while True:
        seed += 1
        message = make_message(seed, (seed * 7919) % (300 * 1024))
        delivery = store.begin_delivery(targets)
        for i in range(0, len(message), 4000):
            delivery.write(message[i:i + 4000])
        results = delivery._commit_sync()
        assert all(r.ok for r in results), results
        print("committed", seed, flush=True)


def main(argv: list[str]) -> None:
    mode, root, *targets = argv
    if os.environ.get("CRASH_HELPER_NAMED_TMP"):  # as on a system without O_TMPFILE
        from mailserver.maildir import delivery
        delivery._anonymous_files = False
    store = MaildirStore(Path(root), hostname="crash.test")
    {"slow": slow, "loop": loop}[mode](store, [Path(t) for t in targets])


if __name__ == "__main__":
    main(sys.argv[1:])
