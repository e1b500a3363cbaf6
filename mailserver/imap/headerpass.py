"""The header pass seen from the reactor: summaries (summary.py) of the messages a FETCH or
SEARCH needs and the folder index lacks, computed a batch at a time in worker processes.

The first FETCH ENVELOPE of a large folder, its first header-field fetch and its first
SEARCH SUBJECT all need every message's header section.  The pass reads each one once,
in worker processes (`workers()`: both cores work, and the reactor only formats and
sends), and each batch stores the envelope, the header lines and the search fields in
the index in one transaction: whichever of those commands comes first, the others then
read the index.  A FETCH streams each batch's answers as soon as the batch is back,
while the next batches are computed (`stream_fetch`).

A pass cut short (the server stopped, a worker died) leaves whole batches in the index
and nothing else: the messages without values are simply summarized at their next turn.
Few missing messages (new mail) are summarized in the session, as before.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.imap import summary
from mailserver.imap.fetch import fetch_responses, summary_fields_wanted

if TYPE_CHECKING:
    from mailserver.imap.server import IMAPSession

log = Logger()

BATCH = 1000        # messages per request to a worker (one index transaction each)
AHEAD = 4           # requests in flight: the workers never wait for the reactor
MIN_PASS = 100      # fewer messages missing in a batch: computed in the session
IDLE_SECONDS = 60.0  # workers without a request this long are ended
# A batch's headers read and stored well within this even from a slow disk; a worker
# silent for longer is stuck, and killed (its batch is answered from the files).
BATCH_TIMEOUT = 300.0

Runner = Callable[..., "defer.Deferred[Any]"]
_workers: Any = None


def workers() -> Runner:
    """The process's pool of header-pass workers (as many as cores), started on first
    use and ended when idle; a runner like deferToThread."""
    global _workers
    if _workers is None:
        from mailserver.inbound.workers import WorkerPool  # noqa: PLC0415

        _workers = WorkerPool(processes=os.cpu_count() or 1, idle_timeout=IDLE_SECONDS,
                              preload=("mailserver.imap.summary",),
                              request_timeout=BATCH_TIMEOUT)
    return _workers


def summary_keys(items: Sequence[Any]) -> list[str]:
    """The index keys of the header summary a FETCH of `items` reads."""
    keys = []
    if any(i.type == "envelope" for i in items):
        keys.append(summary.ENVELOPE_KEY)
    if any(summary_fields_wanted(i) is not None for i in items):
        keys.append(summary.LINES_KEY)
    return keys


def wants_pass(items: Sequence[Any], count: int) -> bool:
    """Whether a FETCH of `items` over `count` messages goes through stream_fetch."""
    return count >= MIN_PASS and bool(summary_keys(items))


def stream_fetch(session: "IMAPSession", uids: list[int], items: list[Any],
                 seen_changed: set[int], send: Callable[[Iterator[bytes]], defer.Deferred],
                 run: Runner | None) -> defer.Deferred[None]:
    """Send FETCH's responses for `uids` a batch at a time (`send` writes one batch's
    chunks), the header summaries each batch lacks computed by `run` (a worker pool;
    None: threads), AHEAD batches ahead of what is being sent."""
    return defer.ensureDeferred(_stream(session, uids, items, seen_changed, send,
                                        run or deferToThread))


async def _stream(session: "IMAPSession", uids: list[int], items: list[Any],
                  seen_changed: set[int], send: Callable[[Iterator[bytes]], defer.Deferred],
                  run: Runner) -> None:
    folder = session.folder
    keys = summary_keys(items)
    batches = [uids[i:i + BATCH] for i in range(0, len(uids), BATCH)]
    waiting: deque[tuple[list[int], defer.Deferred[dict[str, dict[int, Any]]]]] = deque()
    started = 0
    while started < len(batches) or waiting:
        while started < len(batches) and len(waiting) < AHEAD:
            batch = batches[started]
            waiting.append((batch, _prepare(folder, batch, keys, run)))
            started += 1
        batch, ready = waiting.popleft()
        known = await ready
        if session._closing or session.folder is not folder:
            return  # the client is gone: the batches under way still fill the index
        await send(fetch_responses(session, batch, items, seen_changed, known))


def _prepare(folder: Any, batch: list[int], keys: list[str],
             run: Runner) -> defer.Deferred[dict[str, dict[int, Any]]]:
    """The summary values of `batch` (key -> uid -> value): those the index has, and the
    others from the pass when enough are missing (else the session computes them)."""
    known = {key: folder.cache_get_many(batch, key) for key in keys}
    if all(len(values) == len(batch) for values in known.values()):
        return defer.succeed(known)  # the usual case once the folder was seen
    complete = set(batch)
    for values in known.values():
        complete.intersection_update(values)
    infos = [i for u in batch if u not in complete and (i := folder.by_uid(u)) is not None]
    if len(infos) < MIN_PASS:
        return defer.succeed(known)
    uid_of = {i.basename: i.uid for i in infos}
    work = [(i.basename, i.subdir, i.filename) for i in infos]

    def done(result: tuple[list[tuple[str, bytes | None, bytes | None]],
                           list[tuple[str, ...]] | None]) -> dict[str, dict[int, Any]]:
        found, unstored = result
        envelopes = known.setdefault(summary.ENVELOPE_KEY, {})
        lines = known.setdefault(summary.LINES_KEY, {})
        for base, envelope, header_lines in found:
            uid = uid_of.get(base)
            if uid is None:
                continue
            if envelope is not None:
                envelopes[uid] = envelope
            if header_lines is not None:
                lines[uid] = header_lines
            if unstored is not None:  # the index could not take them: kept as any value
                folder.cache_put(uid, summary.ENVELOPE_KEY, envelope)
                folder.cache_put(uid, summary.LINES_KEY, header_lines)
        return known

    def failed(failure: Any) -> dict[str, dict[int, Any]]:
        log.warn("header pass of {path} failed ({error}): answered from the files",
                 path=str(folder.path), error=failure.getErrorMessage())
        return known

    d = run(summary.summarize_files, str(folder.path), work, str(folder.index.dir), keys)
    return d.addCallbacks(done, failed)


def summarize_all(run: Runner, folder_dir: str, index_dir: str,
                  work: list[tuple[str, str, str]]
                  ) -> defer.Deferred[tuple[list[tuple[str, ...]], list[tuple[str, str, str]]]]:
    """Summaries of `work` ((base, subdir, file name)) of the folder at `folder_dir`,
    stored in its index (in `index_dir`), AHEAD batches at a time; fires with (the search
    rows the index could not take, for the caller to keep; the work of batches that
    failed, for the caller to do itself)."""
    return defer.ensureDeferred(_summarize_all(run, folder_dir, index_dir, work))


async def _summarize_all(run: Runner, folder_dir: str, index_dir: str,
                         work: list[tuple[str, str, str]]
                         ) -> tuple[list[tuple[str, ...]], list[tuple[str, str, str]]]:
    unstored: list[tuple[str, ...]] = []
    failed: list[tuple[str, str, str]] = []
    waiting: deque[tuple[list[tuple[str, str, str]], defer.Deferred[Any]]] = deque()

    async def collect() -> None:
        batch, d = waiting.popleft()
        try:
            _, rows = await d
        except Exception as e:
            log.warn("header pass of {path} failed ({error})", path=folder_dir, error=e)
            failed.extend(batch)
        else:
            unstored.extend(rows or ())

    for start in range(0, len(work), BATCH):
        if len(waiting) >= AHEAD:
            await collect()
        batch = work[start:start + BATCH]
        waiting.append((batch, run(summary.summarize_files, folder_dir, batch, index_dir, ())))
    while waiting:
        await collect()
    return unstored, failed
