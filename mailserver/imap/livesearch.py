"""Search and sort results kept up to date for one IMAP session: the update contexts of
RFC 5267 4.3 (CONTEXT=SEARCH, CONTEXT=SORT), made by RETURN (UPDATE).

A `LiveResults` listens to the selected folder while the session has a context, so it
hears of every change, the session's own included (the folder leaves out only the
session itself).  A changed or new message is marked in every context and tested again
against the context's search key: from memory at once when the key needs nothing else,
in a thread otherwise (and always for a SORT context, which needs the new message's sort
values).  What the tests found is told to the client as ADDTO / REMOVEFROM, never about a
message the client has not been told of (an ADDTO comes after the EXISTS, 4.3.3), and at
the places the session tells other changes: at the end of a command, in IDLE, or at once
when no command runs.  Expunges are told by the session itself through `expunging`,
before the EXPUNGE (or VANISHED) responses (4.3.4).

The client's result is kept as it was told: UIDs in mailbox order for a SEARCH (updates at
context position 0), the sort values and UIDs in sorted order for a SORT (updates at the
positions they take).  A message's sort values never change (its header and size are
fixed), so only membership moves with flag changes.
"""

from __future__ import annotations

import bisect
import heapq
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from twisted.internet import defer, reactor
from twisted.logger import Logger

from mailserver.imap import esearch as ESEARCH
from mailserver.imap import fetch as F
from mailserver.imap import search as S
from mailserver.imap import sort as SO
from mailserver.maildir.sizes import VSIZE_KEY

if TYPE_CHECKING:
    from mailserver.imap.server import IMAPSession

log = Logger()

MAX_CONTEXTS = 5              # live update contexts per session (4.3.1: at least one)
MAX_SORTED_RESULTS = 50_000   # results a SORT context keeps, each with its sort values
INLINE_TESTS = 1000           # changed messages tested in the reactor (memory-only keys)
SMALL_CHANGE = 32             # list edits done in place; more: the list is rebuilt


class LiveResult(ABC):
    """One context: the result as the client holds it and what is still to be told."""

    sorted = False

    def __init__(self, tag: bytes, uid: bool, query: S.Query) -> None:
        self.tag = tag
        self.uid = uid                     # numbers are UIDs (UID SEARCH / UID SORT)
        self.query = query
        self.live = False                  # the command has answered: updates may flow
        self.dirty: dict[int, int] = {}    # uid -> generation of its last change
        self.ready: dict[int, Any] = {}    # uid -> what its test found, not yet told
        self.testing = False
        self.ended = False

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def test(self, session: "IMAPSession", uids: list[int]) -> defer.Deferred:
        """Deferred {uid: outcome} for `uids` (ascending)."""
        ...

    @abstractmethod
    def deliver(self, session: "IMAPSession") -> tuple[list[ESEARCH.Pair], list[ESEARCH.Pair]]:
        """Apply what is ready about messages the client knows: (removed, added) pairs."""
        ...

    @abstractmethod
    def remove(self, session: "IMAPSession", uids: Iterable[int]) -> list[ESEARCH.Pair]:
        """Take expunged messages out; the REMOVEFROM pairs (numbers as before)."""
        ...

    def number(self, session: "IMAPSession", uid: int) -> int:
        return uid if self.uid else session._seq_of(uid) or 0


class SearchResult(LiveResult):
    """A SEARCH context: UIDs ascending; updates at context position 0 (4.3.3, 4.3.4)."""

    def __init__(self, tag: bytes, uid: bool, query: S.Query) -> None:
        super().__init__(tag, uid, query)
        self.uids: list[int] = []

    def __len__(self) -> int:
        return len(self.uids)

    def begin(self, uids: list[int]) -> None:
        self.uids = list(uids)

    def _has(self, uid: int) -> bool:
        i = bisect.bisect_left(self.uids, uid)
        return i < len(self.uids) and self.uids[i] == uid

    def test(self, session: "IMAPSession", uids: list[int]) -> defer.Deferred:
        d = S.search_among(session, self.query, uids, INLINE_TESTS)
        return d.addCallback(lambda found: {u: u in found for u in uids})

    def deliver(self, session: "IMAPSession") -> tuple[list[ESEARCH.Pair], list[ESEARCH.Pair]]:
        add, drop = [], []
        for u, match in _deliverable(self, session):
            if match and not self._has(u):
                add.append(u)
            elif not match and self._has(u):
                drop.append(u)
        removed = self.remove(session, drop)
        if not add:
            return removed, []
        add.sort()
        if len(add) <= SMALL_CHANGE:
            for u in add:
                bisect.insort(self.uids, u)
        else:
            self.uids = list(heapq.merge(self.uids, add))
        return removed, [(0, [self.number(session, u) for u in add])]

    def remove(self, session: "IMAPSession", uids: Iterable[int]) -> list[ESEARCH.Pair]:
        gone = sorted(u for u in set(uids) if self._has(u))
        if not gone:
            return []
        numbers = [self.number(session, u) for u in gone]
        if len(gone) <= SMALL_CHANGE:
            for u in gone:
                del self.uids[bisect.bisect_left(self.uids, u)]
        else:
            dropped = set(gone)
            self.uids = [u for u in self.uids if u not in dropped]
        return [(0, sorted(numbers))]


class SortResult(LiveResult):
    """A SORT context: sort values (SO.sort_key_of) in sorted order; updates at the
    positions the messages take or took (4.3.3, 4.3.4)."""

    sorted = True

    def __init__(self, tag: bytes, uid: bool, query: S.Query,
                 criteria: list[tuple[bytes, bool]]) -> None:
        super().__init__(tag, uid, query)
        self.criteria = criteria
        self.order = SO.sort_order(criteria)
        self.keys: list[tuple[Any, ...]] = []
        self.members: dict[int, tuple[Any, ...]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def begin(self, keys: list[tuple[Any, ...]]) -> None:
        self.keys = list(keys)
        self.members = {k[-1]: k for k in keys}

    def _index(self, key: tuple[Any, ...]) -> int:
        return bisect.bisect_left(self.keys, self.order(key), key=self.order)

    def test(self, session: "IMAPSession", uids: list[int]) -> defer.Deferred:
        folder = session.folder
        query, criteria, members = self.query, self.criteria, self.members
        view, recent = list(session.view), set(session.recent)
        sizes = folder.cache_get_many(uids, VSIZE_KEY) if query.needs_size else {}
        by_size = any(key == b"SIZE" for key, _ in criteria)

        def work(disk: Any) -> tuple[dict[int, Any], int]:  # a job of the folder's executor
            found = S.match_some(disk, view, uids, recent, query, sizes)
            # `members` is read, never changed, here: a hint of whose values are known.
            infos = [i for u in sorted(found) if u not in members
                     and (i := disk.by_uid(u)) is not None]
            hint = (lambda info: F.vsize_hint_from(disk, info, None)) if by_size else None
            entries, added = SO.load_entries(str(disk.path), infos, view, disk.index,
                                             hint, VSIZE_KEY)
            keys = {e.uid: SO.sort_key_of(e, criteria) for e in entries}
            return {u: (u in found, keys.get(u)) for u in uids}, added

        def loaded(result: tuple[dict[int, Any], int]) -> dict[int, Any]:
            outcomes, added = result
            if added:
                folder.flush_cache().addErrback(
                    lambda f: log.failure("writing sort keys to the index failed", f))
            return outcomes

        return folder.read_in_thread(work).addCallback(loaded)

    def deliver(self, session: "IMAPSession") -> tuple[list[ESEARCH.Pair], list[ESEARCH.Pair]]:
        add, drop = [], []
        for u, (match, key) in _deliverable(self, session):
            if match and u not in self.members:
                if key is None:
                    self.dirty[u] = -1  # its values were not read: test it again
                else:
                    add.append(key)
            elif not match and u in self.members:
                drop.append(u)
        return self.remove(session, drop), self._insert(session, add)

    def remove(self, session: "IMAPSession", uids: Iterable[int]) -> list[ESEARCH.Pair]:
        keys = [self.members[u] for u in set(uids) if u in self.members]
        if not keys:
            return []
        at = sorted(self._index(k) for k in keys)
        pairs: list[ESEARCH.Pair] = []
        for j, i in enumerate(at):  # removed first to last: each shifts the later ones
            position, n = i - j + 1, self.number(session, self.keys[i][-1])
            if pairs and pairs[-1][0] == position:
                pairs[-1][1].append(n)  # type: ignore[attr-defined]
            else:
                pairs.append((position, [n]))
        for k in keys:
            del self.members[k[-1]]
        if len(at) <= SMALL_CHANGE:
            for i in reversed(at):
                del self.keys[i]
        else:
            dropped = set(at)
            self.keys = [k for i, k in enumerate(self.keys) if i not in dropped]
        return pairs

    def _insert(self, session: "IMAPSession", keys: list[tuple[Any, ...]]) -> list[ESEARCH.Pair]:
        if not keys:
            return []
        keys.sort(key=self.order)
        pairs: list[ESEARCH.Pair] = []
        for j, k in enumerate(keys):  # inserted first to last: each after the earlier ones
            position, n = self._index(k) + j + 1, self.number(session, k[-1])
            if pairs and pairs[-1][0] + len(pairs[-1][1]) == position:
                pairs[-1][1].append(n)  # type: ignore[attr-defined]
            else:
                pairs.append((position, [n]))
        if len(keys) <= SMALL_CHANGE:
            for k in keys:
                self.keys.insert(self._index(k), k)
        else:
            self.keys = list(heapq.merge(self.keys, keys, key=self.order))
        for k in keys:
            self.members[k[-1]] = k
        return pairs


def _deliverable(result: LiveResult, session: "IMAPSession") -> list[tuple[int, Any]]:
    """Take from `result.ready` what may be told now: messages the client knows (in the
    view).  One expunged before the client heard of it is forgotten; one not announced
    yet waits."""
    out = []
    folder = session.folder
    for u, outcome in list(result.ready.items()):
        if session._in_view(u):
            del result.ready[u]
            out.append((u, outcome))
        elif folder.by_uid(u) is None:
            del result.ready[u]
    out.sort()
    return out


class LiveResults:
    """The update contexts of one session, by tag, and its ear on the selected folder."""

    def __init__(self, session: "IMAPSession") -> None:
        self.session = session
        self.folder: Any = None
        self.contexts: dict[bytes, LiveResult] = {}
        self._generation = 0
        self._tell_call: Any = None

    def __len__(self) -> int:
        return len(self.contexts)

    def __contains__(self, tag: bytes) -> bool:
        return tag in self.contexts

    # -- making and ending contexts --------------------------------------------------------

    def reserve(self, tag: bytes, uid: bool, query: S.Query,
                criteria: list[tuple[bytes, bool]] | None) -> LiveResult:
        """A context for a command about to search: it hears of changes from now on, so
        none made while the search runs is missed."""
        result: LiveResult = (SearchResult(tag, uid, query) if criteria is None
                              else SortResult(tag, uid, query, criteria))
        self.contexts[tag] = result
        folder = self.session.folder
        if self.folder is not folder:
            self._unlisten()
            self.folder = folder
            folder.add_listener(self)
        return result

    def start(self, result: LiveResult, initial: list[Any]) -> None:
        """The command answered with `initial` (UIDs ascending, or sort values in order):
        from now on the client is told of changes.  Whatever the session has not told
        yet is tested again, as is what changed while the search ran."""
        if result.ended:
            return
        result.begin(initial)  # type: ignore[attr-defined]
        result.live = True
        session = self.session
        pending = [i.uid for i in session._pending_added] + list(session._pending_flags)
        self._mark(pending, [result])
        self._test(result)

    def end(self, tag: bytes) -> bool:
        """CANCELUPDATE (4.3.5): no more updates for `tag`; False if there is no such."""
        result = self.contexts.pop(tag, None)
        if result is None:
            return False
        result.ended = True
        if not self.contexts:
            self._unlisten()
        return True

    def close(self) -> None:
        """The mailbox is no longer selected: every context ends (4.3)."""
        for tag in list(self.contexts):
            self.end(tag)
        self._unlisten()
        if self._tell_call is not None and self._tell_call.active():
            self._tell_call.cancel()
        self._tell_call = None

    def _unlisten(self) -> None:
        if self.folder is not None:
            self.folder.remove_listener(self)
        self.folder = None

    # -- the folder's listener -------------------------------------------------------------

    def messages_added(self, infos: list[Any]) -> None:
        self._mark([i.uid for i in infos])

    def flags_changed(self, infos: list[Any]) -> None:
        self._mark([i.uid for i in infos])

    def messages_expunged(self, uids: list[int]) -> None:
        """Told by the session when it tells the client (`expunging`)."""

    # -- testing -------------------------------------------------------------------------------

    def _mark(self, uids: Sequence[int], only: Iterable[LiveResult] | None = None) -> None:
        if not uids:
            return
        self._generation += 1
        generation = self._generation
        for result in list(only if only is not None else self.contexts.values()):
            for u in uids:
                result.dirty[u] = generation
            if result.live:
                self._test(result)

    def _test(self, result: LiveResult) -> None:
        """Test the messages marked in `result` (one batch at a time per context)."""
        if result.testing or result.ended or not result.dirty or self.session.folder is None:
            return
        batch = dict(result.dirty)
        result.testing = True
        try:
            d = result.test(self.session, sorted(batch))
        except Exception:
            result.testing = False
            log.failure("testing changed messages for an update context failed")
            return

        def tested(outcomes: dict[int, Any]) -> None:
            result.testing = False
            if result.ended:
                return
            for u, generation in batch.items():
                if result.dirty.get(u) == generation:  # else changed again: test again
                    del result.dirty[u]
                    result.ready[u] = outcomes.get(u, (False, None) if result.sorted
                                                   else False)
            self._tell_soon()
            self._test(result)

        def failed(failure: Any) -> None:
            result.testing = False
            log.failure("testing changed messages for an update context failed", failure)

        d.addCallbacks(tested, failed)

    # -- telling the client ------------------------------------------------------------------

    def _tell_soon(self) -> None:
        """Tell what is ready if the session may: in IDLE (with everything else that
        changed) or between commands; a running command tells it when it ends.  Looked
        at in the next reactor turn: a change a command makes inline is heard before the
        command counts as running, and its own responses go first."""
        if self._tell_call is None or not self._tell_call.active():
            self._tell_call = reactor.callLater(0, self._tell_now)

    def _tell_now(self) -> None:
        self._tell_call = None
        session = self.session
        if session._closing or session.folder is None or not self.contexts:
            return
        if session._idle_tag is not None:
            session._push_if_idle()
        elif not session._busy:
            self.flush()

    def flush(self) -> None:
        """ADDTO / REMOVEFROM for what is ready about messages the client knows (called
        where the session tells its other changes, after EXISTS)."""
        session = self.session
        for result in list(self.contexts.values()):
            if not result.live or not result.ready:
                continue
            removed, added = result.deliver(session)
            if result.dirty:
                self._test(result)
            if isinstance(result, SortResult) and len(result) > MAX_SORTED_RESULTS:
                self.refuse(result.tag, b"Too many results to keep up to date")
                self.end(result.tag)
                continue
            for line in ESEARCH.update_lines(result.tag, result.uid, removed, added):
                session.untagged(line)

    def expunging(self, uids: Sequence[int]) -> None:
        """REMOVEFROM for messages about to be told expunged, before that (4.3.4)."""
        session = self.session
        for result in list(self.contexts.values()):
            for u in uids:
                result.dirty.pop(u, None)
                result.ready.pop(u, None)
            if not result.live:
                continue
            removed = result.remove(session, uids)
            for line in ESEARCH.update_lines(result.tag, result.uid, removed, []):
                session.untagged(line)

    def refuse(self, tag: bytes, text: bytes) -> None:
        """The untagged NO [NOUPDATE "tag"] of 4.3.1."""
        quoted = tag.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        self.session.untagged(b'NO [NOUPDATE "' + quoted + b'"] ' + text)
