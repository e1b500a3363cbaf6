"""A folder's sort table: the SORT and THREAD data of all its messages as columns
(sort.Columns), kept in memory beside the decoded sort keys while the folder's index is
open, so that a SORT or THREAD of a large folder neither builds an object per message nor
sorts a key it sorted before.

The table belongs to the folder's messages as they were when it was built (their base
names and UIDs, in UID order).  A command compares those with the folder's messages now:
the same, and the table serves as it is; messages added at the end (new mail), or some
gone (an expunge), and it is brought up to date in place of a rebuild, its columns and
orders kept; anything else, and a new table is built from the decoded keys.

Like sort.py this imports nothing from Twisted and never sees a Folder: it runs in a job
of the folder's executor (maildir/executor.py), which runs one job at a time, so a table
is never used by two threads at once.
"""

from __future__ import annotations

import bisect
import time
from array import array
from typing import Any, Callable, Mapping, Sequence

from mailserver.imap import sort as SO

TABLE_KEY = "sort-table"  # where FolderIndex.decoded keeps the folder's table
# New messages up to this share of a table are put into its kept orders by bisection;
# beyond it the orders are sorted again when next needed.
INSERT_SHARE = 4


class SortTable(SO.Columns):
    """The columns of a folder's messages in UID order, with their base names."""

    def __init__(self, bases: list[str], uids: list[int], internaldate: list[float],
                 sizes: list[int] | None, keys: list[SO.SortKeys] | None) -> None:
        super().__init__(uids, internaldate, sizes, keys, keep=True)
        self.bases = bases
        self.uidvalidity = 0

    def pop(self, base: str, default: Any = None) -> Any:
        """FolderIndex.drop forgets an expunged message in every decoded memo; a table
        notices on its next use, comparing its messages with the folder's."""
        return default

    def appended(self, bases: list[str], uids: list[int], internaldate: list[float],
                 keys: list[SO.SortKeys] | None, sizes: list[int] | None) -> "SortTable":
        """This table with messages added at the end: columns extended, and the kept
        orders given the new positions (after their equals: ties go by position).  `keys`
        is None only for a table without keys, which has no column or order made of them."""
        n, m = len(self), len(bases)
        table = SortTable(self.bases + bases, self.uids + uids,
                          self.internaldate + internaldate,
                          None if self.sizes is None or sizes is None else self.sizes + sizes,
                          None if self.keys is None or keys is None else self.keys + keys)
        table.uidvalidity = self.uidvalidity
        for name, col in self._columns.items():
            if name in ("internaldate", "size"):
                continue
            table._columns[name] = [*col, *_values(name, keys, internaldate)]
        if m * INSERT_SHARE <= n:
            for name, order in self._orders.items():
                if name != "size" or table.sizes is not None:
                    table._orders[name] = _merged(order, table.column(name), n, m)
        if self._uid_text is not None:
            table._uid_text = self._uid_text + [b"%d" % u for u in uids]
        return table

    def without(self, keep: Sequence[int]) -> "SortTable":
        """This table with only the positions `keep` (ascending): the kept orders and
        ranks filtered (ranks need not be dense to order)."""
        n = len(self)
        new = array("i", [-1]) * n
        for i, p in enumerate(keep):
            new[p] = i
        table = SortTable([self.bases[p] for p in keep], [self.uids[p] for p in keep],
                          [self.internaldate[p] for p in keep],
                          None if self.sizes is None else [self.sizes[p] for p in keep],
                          None if self.keys is None else [self.keys[p] for p in keep])
        table.uidvalidity = self.uidvalidity
        for name, col in self._columns.items():
            if name not in ("internaldate", "size"):
                table._columns[name] = [col[p] for p in keep]
        for name, order in self._orders.items():
            table._orders[name] = array("i", [new[p] for p in order if new[p] >= 0])
        for name, order in self._extra.items():
            table._extra[name] = array("i", [new[p] for p in order if new[p] >= 0])
        for name, rank in self._ranks.items():
            table._ranks[name] = array("i", [rank[p] for p in keep])
        if self._uid_text is not None:
            table._uid_text = [self._uid_text[p] for p in keep]
        return table


def _merged(order: array, col: Sequence[Any], n: int, m: int) -> array:
    """`order` (of positions below n, sorted by `col`) with positions n..n+m-1 put in:
    each after its equals, found by bisection, the runs between copied whole."""
    key = col.__getitem__
    out = array("i")
    start = 0
    for p in sorted(range(n, n + m), key=key):
        i = bisect.bisect_right(order, col[p], start, key=key)
        out += order[start:i]
        out.append(p)
        start = i
    out += order[start:]
    return out


def _values(name: str, keys: list[SO.SortKeys], internaldate: list[float]) -> list[Any]:
    """A derived column for some messages (as Columns.column computes it)."""
    return list(SO.Columns([0] * len(keys), internaldate, None, keys).column(name))


def folder_table(folder_dir: str, infos: Mapping[int, Any], index: Any,
                 size_hint: Callable[[Any], int | None] | None = None,
                 size_key: str = "vsize", uidvalidity: int = 0,
                 need_keys: bool = True) -> tuple[SortTable, int]:
    """(the table of the folder's messages `infos` (uid -> MessageInfo-like, in UID
    order), rows added to the index cache).  The kept table when it is still the
    folder's (the same UIDs under the same UIDVALIDITY are the same messages), else one
    brought up to date or built, and kept if every message's keys could be read.  With
    `size_hint`, the table has RFC822.SIZE values too (sort.read_sizes).  Without
    `need_keys` (a sort by ARRIVAL or SIZE), no message's header is read: a table built
    then has no keys until a command needs them.  Blocking: meant for a worker thread."""
    uids = list(infos)
    decoded = getattr(index, "decoded", None)
    old = decoded.get(TABLE_KEY) if decoded is not None else None
    added = 0
    table = None
    if isinstance(old, SortTable) and old.uidvalidity == uidvalidity and old.uids == uids:
        table = old
        messages: list[Any] | None = None
    else:
        messages = list(infos.values())
        bases = [i.basename for i in messages]
        complete = True
        if isinstance(old, SortTable) and old.uidvalidity == uidvalidity:
            table, added, complete = _updated(old, folder_dir, messages, bases, uids,
                                              index, size_hint, size_key)
        if table is None:
            keys: list[SO.SortKeys] | None = None
            if need_keys:
                keys, added, complete = SO.read_keys(folder_dir, messages, index)
            table = SortTable(bases, uids, [i.internaldate for i in messages], None, keys)
        if not complete:
            decoded = None  # a message's file was missing: not worth keeping
        table.uidvalidity = uidvalidity
    if need_keys and table.keys is None:  # kept from a sort by ARRIVAL or SIZE
        if messages is None:
            messages = list(infos.values())
        table.keys, more, complete = SO.read_keys(folder_dir, messages, index)
        added += more
        if not complete and decoded is not None:
            decoded.pop(TABLE_KEY, None)
            decoded = None
    if size_hint is not None and table.sizes is None:
        table.sizes, more = SO.read_sizes(folder_dir, messages or list(infos.values()),
                                          index, size_hint, size_key)
        added += more
    if decoded is not None:
        decoded[TABLE_KEY] = table
    if index is not None:
        index.last_used = time.monotonic()  # in use: the idle sweep leaves it open
    return table, added


def _updated(old: SortTable, folder_dir: str, infos: Sequence[Any], bases: list[str],
             uids: list[int], index: Any, size_hint: Callable[[Any], int | None] | None,
             size_key: str) -> tuple[SortTable | None, int, bool]:
    """(`old` brought up to the folder's messages now when they only gained messages at
    the end or only lost some, else None; rows added to the index cache; whether every
    new message's file was there)."""
    n = len(old)
    if len(uids) > n and uids[n - 1:n] == old.uids[n - 1:] and uids[:n] == old.uids \
            and bases[:n] == old.bases:
        fresh = infos[n:]
        keys: list[SO.SortKeys] | None = None
        added, complete = 0, True
        if old.keys is not None:
            keys, added, complete = SO.read_keys(folder_dir, fresh, index)
        sizes = None
        if old.sizes is not None and size_hint is not None:
            sizes, more = SO.read_sizes(folder_dir, fresh, index, size_hint, size_key)
            added += more
        return old.appended(bases[n:], uids[n:], [i.internaldate for i in fresh], keys,
                            sizes), added, complete
    if len(uids) < n:
        keep = _kept(old.uids, uids)
        if keep is not None and [old.bases[p] for p in keep] == bases:
            return old.without(keep), 0, True
    return None, 0, True


def _kept(old: list[int], new: list[int]) -> list[int] | None:
    """The positions in `old` (ascending UIDs) of every UID of `new` when `new` is a
    subsequence of it, else None."""
    keep = []
    i, n = 0, len(old)
    for u in new:
        i = bisect.bisect_left(old, u, i)
        if i == n or old[i] != u:
            return None
        keep.append(i)
        i += 1
    return keep


def positions_of(table: SO.Columns, uids: Sequence[int]) -> list[int] | None:
    """The positions of `uids` (ascending, all in the table): None for all of them."""
    all_uids = table.uids
    if len(uids) == len(all_uids) and uids == all_uids:
        return None
    find = bisect.bisect_left
    return [find(all_uids, u) for u in uids]


def table_for(folder_dir: str, infos: Mapping[int, Any], uids: list[int], index: Any,
              size_hint: Callable[[Any], int | None] | None = None, size_key: str = "vsize",
              uidvalidity: int = 0, need_keys: bool = True
              ) -> tuple[SO.Columns, list[int] | None, int]:
    """(columns, the positions of `uids` in them (None: all), rows added to the index
    cache) for sorting or threading the messages `uids` (ascending) of a folder whose
    messages are `infos` (uid -> MessageInfo, in UID order).

    The folder's table when most of the folder is asked for or the table is kept
    anyway; for a few messages of a folder without one, columns of just those (a SORT
    of ten messages must not read the keys of a hundred thousand)."""
    decoded = getattr(index, "decoded", None)
    if len(uids) * 4 >= len(infos) or (decoded is not None and TABLE_KEY in decoded):
        table, added = folder_table(folder_dir, infos, index, size_hint, size_key,
                                    uidvalidity, need_keys)
        return table, positions_of(table, uids), added
    some = [infos[u] for u in uids]
    keys: list[SO.SortKeys] | None = None
    added = 0
    if need_keys:
        keys, added, _ = SO.read_keys(folder_dir, some, index)
    sizes = None
    if size_hint is not None:
        sizes, more = SO.read_sizes(folder_dir, some, index, size_hint, size_key)
        added += more
    return SO.Columns(list(uids), [i.internaldate for i in some], sizes, keys), None, added


class Numbering:
    """What a session calls the messages of some columns: their UIDs, or their sequence
    numbers in the session's view (`view`, ascending UIDs)."""

    def __init__(self, cols: SO.Columns, view: list[int]) -> None:
        self.cols = cols
        self.view = view
        self._same: bool | None = None

    def _view_is_cols(self) -> bool:
        if self._same is None:
            self._same = self.view == self.cols.uids
        return self._same

    def seqs(self, positions: Sequence[int]) -> list[int]:
        """The sequence numbers of `positions` (0 for a message not in the view)."""
        if self._view_is_cols():
            return [p + 1 for p in positions]
        uids, view, find = self.cols.uids, self.view, bisect.bisect_left
        out = []
        for p in positions:
            u = uids[p]
            i = find(view, u)
            out.append(i + 1 if i < len(view) and view[i] == u else 0)
        return out

    def text(self, uid: bool, positions: Sequence[int] | None) -> Sequence[bytes]:
        """Each position's number as the digits a response carries; with `positions`,
        only theirs need be right."""
        if uid:
            return self.cols.uid_text()
        if self._view_is_cols():
            return self.cols.seq_text()
        every = range(len(self.cols)) if positions is None else positions
        out = [b"0"] * len(self.cols)
        for p, seq in zip(every, self.seqs(every)):
            out[p] = b"%d" % seq
        return out
