"""`mailserver-admin queue list|flush|delete`: the outbound queue seen from the shell.

Reading is done on the files directly.  Changes go to the running server as requests in
queue/control/ (it owns the queue while it runs; see mailserver.smtp.queue.store), and the
command waits until the server has handled them; without a running server the files are
changed here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from mailserver.config import Config
from mailserver.smtp.queue.envelope import ID_RE
from mailserver.smtp.queue.store import QueueStore

REQUEST_WAIT = 10.0  # seconds to wait for the running server to handle a request


class QueueAdminError(Exception):
    pass


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def list_queue(config: Config, out: Callable[[str], None]) -> int:
    store = QueueStore(config.queue_dir)
    now = time.time()
    count = 0
    damaged: list[str] = []

    def unreadable(queue_id: str, error: Exception) -> None:
        damaged.append(queue_id)
        out(f"{queue_id}  envelope unreadable, left alone: {error}")

    for env in store.load(unreadable):
        count += 1
        sender = env.sender or "<> (DSN)"
        due = "now" if env.next_attempt <= now else f"in {_age(env.next_attempt - now)}"
        out(f"{env.id}  {env.size} bytes  age {_age(now - env.created)}  from {sender}  "
            f"attempts {env.attempts}  next {due}")
        for r in env.recipients:
            line = f"    {r.address} ({r.kind}) {r.state}"
            if r.last_error:
                line += f": {r.last_error}"
            out(line)
    out(f"{count} message{'s' if count != 1 else ''} in the queue"
        + (f", and {len(damaged)} whose envelope cannot be read" if damaged else ""))
    return count + len(damaged)


def _wait_handled(path, what: str) -> None:
    deadline = time.monotonic() + REQUEST_WAIT
    while path.exists():
        if time.monotonic() > deadline:
            raise QueueAdminError(f"the running server did not take the {what} request within "
                                  f"{REQUEST_WAIT:.0f}s; it stays in {path.parent}")
        time.sleep(0.05)


def flush_queue(config: Config, fix_owner: Callable[[list[Path]], None] = lambda p: None) -> str:
    """`fix_owner` gets the files written here (run as root, they must go to the server's
    user)."""
    store = QueueStore(config.queue_dir)
    if store.server_running():
        _wait_handled(store.request("flush"), "flush")
        return f"flush done: the server is retrying {len(store.ids())} queued messages now"
    n = 0
    for env in store.load():
        env.next_attempt = 0.0
        store.save(env)
        fix_owner([store.envelope_path(env.id)])
        n += 1
    return f"server not running: {n} queued messages will be tried as soon as it starts"


def delete_message(config: Config, queue_id: str) -> str:
    if not ID_RE.fullmatch(queue_id):
        raise QueueAdminError(f"not a queue id: {queue_id!r}")
    store = QueueStore(config.queue_dir)
    if not store.envelope_path(queue_id).exists():
        raise QueueAdminError(f"no such queued message: {queue_id}")
    if store.server_running():
        _wait_handled(store.request("delete", queue_id), "delete")
        return f"message {queue_id} deleted"
    store.remove(queue_id)
    return f"message {queue_id} deleted"
