"""CONDSTORE and QRESYNC (RFC 7162) for the IMAP session: the command syntax they add,
and the session's side of mod-sequences, as a mixin.

The folder keeps a mod-sequence with every message in memory and remembers expunged uids
in its index (maildir/folder.py); what is here is protocol only:

- the arguments: mod-sequence values (RFC 7162 7: at most 2^63-1), SELECT/EXAMINE's
  (CONDSTORE) and (QRESYNC (...)) parameters, FETCH's (CHANGEDSINCE n [VANISHED]) and
  STORE's (UNCHANGEDSINCE n) modifiers;
- when the session becomes CONDSTORE-aware (3.1: the "CONDSTORE enabling commands") and
  what changes then: HIGHESTMODSEQ at once if a mailbox is selected, MODSEQ in every
  untagged FETCH about a flag change;
- QRESYNC (3.2): the resynchronisation at SELECT, VANISHED (EARLIER) for UID FETCH, and
  VANISHED instead of EXPUNGE once enabled.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from twisted.internet import defer

from mailserver.imap import fetch as F
from mailserver.imap.fetchitems import FetchItem
from mailserver.imap.parser import Arguments, BadCommand, SequenceSet
from mailserver.maildir.folder import intersect_ranges, normalize_ranges, uid_ranges

# RFC 7162 3.1 and 3.2: what the session adds to its CAPABILITY list.
CONDSTORE_CAPABILITIES = (b"CONDSTORE", b"QRESYNC")
MAX_MODSEQ = 2 ** 63 - 1          # RFC 7162 7: mod-sequence-value
MAX_SEQ_MATCH = 100_000           # pairs of seq-match-data looked at; beyond: ignored
VANISHED_LINE = 8000              # octets of uid set per VANISHED response (RFC 7162 4)
WRITE_AT_ONCE = 1000              # changed messages a resync answers without a producer
MODSEQ_ITEM = FetchItem("modseq")
FLAGS_ITEM = FetchItem("flags")
_DIGITS = re.compile(rb"[0-9]+")


# -- syntax --------------------------------------------------------------------------------------

def parse_modseq(args: Arguments, zero: bool = True) -> int:
    """mod-sequence-valzer (or, `zero` False, mod-sequence-value): 1 to 2^63-1 (RFC 7162 7);
    anything else is BAD."""
    text = args.atom()
    if not _DIGITS.fullmatch(text) or len(text.lstrip(b"0")) > 19:
        raise BadCommand("invalid mod-sequence")
    value = int(text)
    if value > MAX_MODSEQ or (value == 0 and not zero):
        raise BadCommand("mod-sequence out of range")
    return value


@dataclass(frozen=True)
class Qresync:
    """SELECT's (QRESYNC (uidvalidity modseq [known-uids] [seq-match-data])) (RFC 7162
    3.2.5): what the client knew."""

    uidvalidity: int
    modseq: int
    known_uids: tuple[tuple[int, int], ...] | None = None   # (first, last) ranges
    seq_match: tuple[tuple[int, int], ...] = ()            # (seq, uid) pairs, ascending


def parse_select_params(args: Arguments) -> tuple[bool, Qresync | None]:
    """SELECT/EXAMINE's optional parameter list (RFC 4466 select-params, RFC 7162 3.1.8
    and 3.2.5): (CONDSTORE given, QRESYNC data).  Unknown or repeated parameters are BAD."""
    if args.at_end():
        return False, None
    args.space()
    params = args.paren_list(_select_param)
    args.end()
    names = [name for name, _ in params]
    if not names or len(set(names)) != len(names):
        raise BadCommand("invalid SELECT parameters")
    qresync = next((value for name, value in params if name == b"QRESYNC"), None)
    return b"CONDSTORE" in names, qresync


def _select_param(args: Arguments) -> tuple[bytes, Qresync | None]:
    name = args.atom().upper()
    if name == b"CONDSTORE":
        return name, None
    if name != b"QRESYNC":
        raise BadCommand(f"unknown SELECT parameter {name.decode('ascii', 'replace')}")
    args.space()
    if args.peek() != b"(":
        raise BadCommand("expected '(' after QRESYNC")
    args.pos += 1
    uidvalidity = args.number()
    if not 0 < uidvalidity <= 0xFFFFFFFF:
        raise BadCommand("invalid UIDVALIDITY")
    args.space()
    modseq = parse_modseq(args)
    known: tuple[tuple[int, int], ...] | None = None
    seq_match: tuple[tuple[int, int], ...] = ()
    if args.maybe_space():
        if args.peek() != b"(":
            known = _ranges_of(_no_star_set(args))
            if args.maybe_space():
                seq_match = _seq_match_data(args)
        else:
            seq_match = _seq_match_data(args)
    if args.peek() != b")":
        raise BadCommand("invalid QRESYNC parameter")
    args.pos += 1
    return name, Qresync(uidvalidity, modseq, known, seq_match)


def _no_star_set(args: Arguments) -> SequenceSet:
    """A sequence set without "*" (RFC 7162 7: known-uids, known-sequence-set...)."""
    seqset = args.sequence_set()
    if any(lo is None or hi is None for lo, hi in seqset.ranges):
        raise BadCommand("'*' is not allowed here")
    return seqset


def _ranges_of(seqset: SequenceSet) -> tuple[tuple[int, int], ...]:
    return tuple((min(a, b), max(a, b)) for a, b in seqset.ranges)  # type: ignore[type-var]


def _seq_match_data(args: Arguments) -> tuple[tuple[int, int], ...]:
    """"(" known-sequence-set SP known-uid-set ")" as (seq, uid) pairs.  Sets of unequal
    size are BAD; very large ones are ignored (the data is only a hint)."""
    if args.peek() != b"(":
        raise BadCommand("expected seq-match-data")
    args.pos += 1
    seqs = _no_star_set(args)
    args.space()
    uids = _no_star_set(args)
    if args.peek() != b")":
        raise BadCommand("invalid seq-match-data")
    args.pos += 1
    count = _count(seqs)
    if count != _count(uids):
        raise BadCommand("seq-match-data sets differ in size")
    if count > MAX_SEQ_MATCH:
        return ()
    return tuple(zip(_members(seqs), _members(uids)))


def _count(seqset: SequenceSet) -> int:
    return sum(abs(b - a) + 1 for a, b in seqset.ranges)  # type: ignore[operator]


def _members(seqset: SequenceSet) -> Iterable[int]:
    """The numbers in the order written (RFC 7162: ascending, paired one to one)."""
    for a, b in seqset.ranges:
        assert a is not None and b is not None
        yield from (range(a, b + 1) if a <= b else range(a, b - 1, -1))


@dataclass(frozen=True)
class QresyncPlan:
    """What SELECT (QRESYNC ...) found before selecting (see qresync_prepare)."""

    modseq: int
    within: list[tuple[int, int]] | None
    present: list[int]                 # the folder's uids when the memory was read
    ranges: list[tuple[int, int]]      # expunged since `modseq`


@dataclass(frozen=True)
class FetchModifiers:
    changedsince: int | None = None
    vanished: bool = False


def parse_fetch_modifiers(text: bytes) -> FetchModifiers:
    """" (CHANGEDSINCE n [VANISHED])" in any order (RFC 7162 3.1.4.1, 3.2.6); b"": none."""
    if not text:
        return FetchModifiers()
    args = Arguments([text])
    args.space()
    mods = args.paren_list(_fetch_modifier)
    args.end()
    names = [name for name, _ in mods]
    if not names or len(set(names)) != len(names):
        raise BadCommand("invalid FETCH modifiers")
    values = dict(mods)
    if b"VANISHED" in values and b"CHANGEDSINCE" not in values:
        raise BadCommand("VANISHED needs CHANGEDSINCE")  # RFC 7162 3.2.6
    return FetchModifiers(values.get(b"CHANGEDSINCE"), b"VANISHED" in values)


def _fetch_modifier(args: Arguments) -> tuple[bytes, int | None]:
    name = args.atom().upper()
    if name == b"CHANGEDSINCE":
        args.space()
        return name, parse_modseq(args)
    if name == b"VANISHED":
        return name, None
    raise BadCommand(f"unknown FETCH modifier {name.decode('ascii', 'replace')}")


def parse_store_modifiers(args: Arguments) -> int | None:
    """STORE's optional "(UNCHANGEDSINCE n) " before the item (RFC 7162 3.1.3): n, or None
    when absent."""
    if args.peek() != b"(":
        return None
    mods = args.paren_list(_store_modifier)
    args.space()
    if len(mods) != 1:
        raise BadCommand("invalid STORE modifiers")
    return mods[0]


def _store_modifier(args: Arguments) -> int:
    name = args.atom().upper()
    if name != b"UNCHANGEDSINCE":
        raise BadCommand(f"unknown STORE modifier {name.decode('ascii', 'replace')}")
    args.space()
    return parse_modseq(args)


def format_ranges(ranges: Iterable[tuple[int, int]]) -> bytes:
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in ranges)


def vanished_lines(ranges: Sequence[tuple[int, int]], earlier: bool) -> bytes:
    """VANISHED responses (RFC 7162 3.2.10) for uid ranges, each line's set kept under
    VANISHED_LINE octets (RFC 7162 4)."""
    head = b"* VANISHED (EARLIER) " if earlier else b"* VANISHED "
    out: list[bytes] = []
    line: list[bytes] = []
    size = 0
    for a, b in ranges:
        piece = b"%d" % a if a == b else b"%d:%d" % (a, b)
        if line and size + len(piece) + 1 > VANISHED_LINE:
            out.append(head + b",".join(line) + b"\r\n")
            line, size = [], 0
        line.append(piece)
        size += len(piece) + 1
    if line:
        out.append(head + b",".join(line) + b"\r\n")
    return b"".join(out)


def in_ranges(ranges: Sequence[tuple[int, int]], n: int) -> bool:
    """Whether `n` lies in ascending disjoint (first, last) ranges."""
    i = bisect.bisect_right(ranges, (n, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= n <= ranges[i][1]


# -- the session's side --------------------------------------------------------------------------

class CondstoreSession:
    """What an IMAPSession does for CONDSTORE and QRESYNC beside its command handlers."""

    condstore = False   # the session is CONDSTORE-aware (RFC 7162 3.1)
    qresync = False     # QRESYNC was enabled (RFC 7162 3.2.3)

    if TYPE_CHECKING:  # what the session provides
        folder: Any
        view: list[int]
        _view_shared: bool
        transport: Any

        def untagged(self, line: bytes) -> None: ...
        def send(self, data: bytes) -> None: ...
        def _seq_of(self, uid: int) -> int | None: ...
        def _in_view(self, uid: int) -> bool: ...
        def _remove_all_from_view(self, uids: Iterable[int]) -> list[tuple[int, int]]: ...
        def _announcing_keywords(self, chunks: Any) -> Any: ...
        def stream(self, chunks: Any) -> Any: ...
        _pending_flags: dict[int, Any]
        _pending_expunged: set[int]

    def enable_condstore(self) -> None:
        """A CONDSTORE enabling command (RFC 7162 3.1): from now on every untagged FETCH
        about a change carries MODSEQ; the first one with a mailbox selected reports its
        HIGHESTMODSEQ (3.1.2.1)."""
        if self.condstore:
            return
        self.condstore = True
        if self.folder is not None:
            self.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % self.folder.highestmodseq)

    def enable(self, names: list[bytes]) -> list[bytes]:
        """ENABLE (RFC 5161) of CONDSTORE / QRESYNC (RFC 7162 3.2.3: QRESYNC implies
        CONDSTORE); the names newly enabled, for the ENABLED response."""
        enabled: list[bytes] = []
        for name in names:
            if name == b"CONDSTORE" and not self.condstore:
                self.enable_condstore()
                enabled.append(name)
            elif name == b"QRESYNC" and not self.qresync:
                self.enable_condstore()
                self.qresync = True
                enabled.append(name)
        return enabled

    def modseq_suffix(self, uid: int) -> bytes:
        """" MODSEQ (n)" for an untagged FETCH once CONDSTORE-aware (RFC 7162 3.1)."""
        if not self.condstore:
            return b""
        info = self.folder.by_uid(uid)
        return b" MODSEQ (%d)" % info.modseq if info is not None else b""

    def announce_vanished(self, uids: Iterable[int]) -> None:
        """Expunges as VANISHED once QRESYNC is enabled (RFC 7162 3.2.10), never EXPUNGE."""
        gone = [u for _, u in self._remove_all_from_view(uids)]
        for u in gone:
            self._pending_flags.pop(u, None)
            self._pending_expunged.discard(u)
        if gone:
            self.send(vanished_lines(uid_ranges(gone), earlier=False))

    def vanished_earlier(self, modseq: int, within: Sequence[tuple[int, int]] | None,
                         unchanged_below: int = 0) -> defer.Deferred:
        """Send VANISHED (EARLIER) for what was expunged since `modseq` (RFC 7162 3.2.5.1,
        3.2.6); fires when sent."""
        folder = self.folder
        present = self.view if self._view_shared else list(self.view)
        d = folder.vanished_since(modseq, present, within, unchanged_below)

        def send(ranges: list[tuple[int, int]]) -> None:
            if ranges and self.folder is folder:
                self.send(vanished_lines(ranges, earlier=True))
        return d.addCallback(send)

    def qresync_prepare(self, folder: Any, params: Qresync) -> defer.Deferred:
        """The first half of SELECT/EXAMINE (QRESYNC ...) (RFC 7162 3.2.5.1), before the
        mailbox is selected: what was expunged since the client's mod-sequence (a look at
        the folder's expunge memory, in a thread).  Fires with a QresyncPlan, or None for
        another UIDVALIDITY (the client must start over).  Done first so that the whole
        answer is written at once, not cut in two by the thread."""
        if params.uidvalidity != folder.uidvalidity:
            return defer.succeed(None)
        # A mod-sequence we never handed out (the clock was set back, another server's
        # value): resynchronise everything.
        modseq = params.modseq if params.modseq <= folder.highestmodseq else 0
        within = None if params.known_uids is None else normalize_ranges(params.known_uids)
        present = folder.shared_uids()
        below = 0
        for seq, uid in params.seq_match:  # RFC 7162 3.2.5.2
            if 0 < seq <= len(present) and present[seq - 1] == uid:
                below = max(below, uid)
        d = folder.vanished_since(modseq, present, within, below)
        return d.addCallback(lambda ranges: QresyncPlan(modseq, within, present, ranges))

    def qresync_answer(self, plan: QresyncPlan) -> defer.Deferred | None:
        """The second half, once selected: VANISHED (EARLIER), then FETCH (UID FLAGS
        MODSEQ) for what changed, both kept to the client's known uids."""
        folder, view, ranges = self.folder, self.view, plan.ranges
        if view is not plan.present and view != plan.present:
            # Expunged while the memory was read: told too (a uid more is harmless).
            kept = set(view)
            gone = uid_ranges(u for u in plan.present if u not in kept)
            if plan.within is not None:
                gone = intersect_ranges(gone, plan.within)
            ranges = normalize_ranges([*ranges, *gone])
        if ranges:
            self.send(vanished_lines(ranges, earlier=True))
        changed = folder.changed_since(plan.modseq, view)
        if plan.within is not None:
            changed = [u for u in changed if in_ranges(plan.within, u)]
        return self.stream_fetch(changed, [F.UID_ITEM, FLAGS_ITEM, MODSEQ_ITEM])

    def stream_fetch(self, uids: list[int], items: list[Any]) -> defer.Deferred | None:
        """Untagged FETCH responses (of metadata) for `uids`: written at once when few, so
        they go out with what precedes them (a TLS transport pulls from a producer only
        in a later reactor turn, and the small write left for that turn can wait for the
        client's delayed ACK); streamed when many."""
        if not uids:
            return None
        chunks = self._announcing_keywords(F.fetch_responses(self, uids, items, set()))
        if len(uids) <= WRITE_AT_ONCE:
            self.send(b"".join(chunks))
            return None
        return self.stream(chunks)


def uid_set_ranges(seqset: SequenceSet, largest: int) -> list[tuple[int, int]]:
    """A UID set's ranges with "*" as `largest`, ascending and disjoint."""
    return normalize_ranges((largest if lo is None else lo, largest if hi is None else hi)
                            for lo, hi in seqset.ranges)


__all__ = ["CONDSTORE_CAPABILITIES", "CondstoreSession", "FetchModifiers", "Qresync",
           "parse_fetch_modifiers", "parse_modseq", "parse_select_params",
           "parse_store_modifiers", "uid_set_ranges"]
