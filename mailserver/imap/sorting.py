"""The SORT and THREAD commands (RFC 5256) with SORT=DISPLAY (RFC 5957), ESORT and
CONTEXT=SORT (RFC 5267 3, 4), as a mixin for the IMAP session.

The search criteria are SEARCH's (search.parse_search); the search, the reading of the
matched messages' sort data (the folder's sort table, sorttable.py) and the sorting or
threading and formatting of the answer all run in one job of the folder, in a worker
thread, over the folder's read-only view, so a SORT over a large mailbox costs the reactor
two list copies and one write.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.imap import esearch as ESEARCH
from mailserver.imap import fetch as F
from mailserver.imap import search as S
from mailserver.imap import sort as SO
from mailserver.imap import sorttable as SOT
from mailserver.imap.livesearch import LiveResult
from mailserver.imap.parser import Arguments
from mailserver.maildir.sizes import VSIZE_KEY

log = Logger()

# RFC 5256 1, RFC 5957 1: what the session adds to its CAPABILITY list.
SORT_CAPABILITIES = (b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES")


class SortingCommands:
    """SORT, UID SORT, THREAD and UID THREAD for an IMAPSession (selected state)."""

    if TYPE_CHECKING:  # what the session provides
        folder: Any
        view: list[int]

        def untagged(self, line: bytes) -> None: ...

        def done(self, tag: bytes, text: bytes, status: bytes = b"OK",
                 expunges: bool = True) -> None: ...

        # searching.SearchCommands
        def with_saved_result(self, options: Any, work: Any) -> Any: ...
        def reserve_update(self, tag: bytes, options: Any, uid: bool, query: Any,
                           criteria: Any) -> Any: ...
        def unless_failed(self, d: defer.Deferred, update: Any) -> defer.Deferred: ...
        def answer_searching(self, tag: bytes, options: Any, ordered: Any, line: Any,
                             update: Any, initial: Any) -> None: ...

    def cmd_select_SORT(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred | None:
        # RFC 5256 3: SORT (sort-criteria) charset search-criteria; RFC 5957 4 keys;
        # RFC 5267 3.1: SORT RETURN (...) answered with ESEARCH (ESORT).
        args.space()
        options = ESEARCH.parse_return(args)
        return self.with_saved_result(options, lambda: self._sort(tag, args, uid, options))

    def _sort(self, tag: bytes, args: Arguments, uid: bool,
              options: ESEARCH.ReturnOptions | None) -> defer.Deferred:
        criteria = SO.parse_sort_criteria(args)
        args.space()
        _charset(args)
        args.space()
        query = S.parse_search(args)
        need_size = any(key == b"SIZE" for key, _ in criteria)
        # ARRIVAL and SIZE come from the folder's list: no message header is read for them
        need_keys = any(key not in SO.LIST_KEYS for key, _ in criteria)
        if options is None:
            def answer(cols: SO.Columns, positions: list[int] | None,
                       numbers: SOT.Numbering) -> bytes:  # worker thread
                order = SO.sort_positions(cols, criteria, positions)
                return SO.sort_line(order, numbers.text(uid, order))

            return self._sorted_answer(tag, query, uid, need_size, answer, b"SORT completed",
                                       need_keys=need_keys)
        update = self.reserve_update(tag, options, uid, query, criteria)
        keep = isinstance(update, LiveResult)  # a context starts from the sort values

        def esort(cols: SO.Columns, positions: list[int] | None,
                  numbers: SOT.Numbering) -> tuple[bytes | None, list[int], list[Any]]:
            # worker thread: RFC 5267 3.1, ALL and PARTIAL in the requested order (3.2)
            ordered = SO.sort_positions(cols, criteria, positions)
            uids = [cols.uids[p] for p in ordered]
            line = ESEARCH.esearch_response(tag, uids if uid else numbers.seqs(ordered),
                                            options, uid) if options.answers else None
            keys = [SO.sort_values(cols, p, criteria) for p in ordered] if keep else []
            return line, uids, keys

        def reply(result: tuple[bytes | None, list[int], list[Any]]) -> None:
            line, uids, keys = result
            self.answer_searching(tag, options, uids, line, update, keys)
            self.done(tag, b"SORT completed", expunges=uid)

        d = self._sorted_answer(tag, query, uid, need_size, esort, b"SORT completed", reply,
                                need_keys=need_keys)
        return self.unless_failed(d, update)

    def cmd_select_THREAD(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred:
        # RFC 5256 3: THREAD algorithm charset search-criteria.
        args.space()
        algorithm = SO.parse_thread_algorithm(args.atom())
        args.space()
        _charset(args)
        args.space()
        query = S.parse_search(args)
        build = (SO.references_forest if algorithm == b"REFERENCES"
                 else SO.orderedsubject_forest)

        def answer(cols: SO.Columns, positions: list[int] | None,
                   numbers: SOT.Numbering) -> bytes:  # worker thread
            return SO.thread_line(build(cols, positions), numbers.text(uid, positions))

        return self._sorted_answer(tag, query, uid, False, answer, b"THREAD completed")

    def _sorted_answer(self, tag: bytes, query: S.Query, uid: bool, need_size: bool,
                       answer: Callable[[SO.Columns, list[int] | None, SOT.Numbering], Any],
                       completed: bytes,
                       finish: Callable[[Any], None] | None = None, *,
                       need_keys: bool = True) -> defer.Deferred:
        """Search, load, order and format in one job of the folder, in a thread; the
        answer is one untagged line, or what `finish` makes of `answer`'s result.  Like
        SEARCH, the non-UID form sends no EXPUNGE (RFC 3501 7.4.1)."""
        folder = self.folder
        match = S.matcher(self, query)
        view = list(self.view)

        def reply(result: tuple[Any, int]) -> None:
            line, added = result
            if added:  # the computed keys reach the index file: the next SORT reads them
                folder.flush_cache().addErrback(
                    lambda f: log.failure("writing sort keys to the index failed", f))
            if finish is not None:
                finish(line)
                return
            self.untagged(line)
            self.done(tag, completed, expunges=uid)

        d = folder.read_in_thread(_search_and_answer, match, view, need_size, answer,
                                  need_keys)
        return d.addCallback(reply)


def _charset(args: Arguments) -> bytes:
    """RFC 5256 3: the charset is mandatory; UTF-8 and US-ASCII, others NO [BADCHARSET]."""
    charset = SO.canonical_charset(args.astring())
    if charset is None:
        from mailserver.imap.server import CommandFailed  # the session module imports us

        raise CommandFailed(b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
    return charset


def _size_hint(folder: Any, info: Any) -> int | None:
    """RFC822.SIZE from the file name where it tells (thread-safe: reads a string)."""
    return F.vsize_hint_from(folder, info, None)


def _search_and_answer(folder: Any, match: Callable[[Any], list[int]], view: list[int],
                       need_size: bool, answer: Any, need_keys: bool) -> tuple[Any, int]:
    """A thread of the folder's executor (`folder` is its FolderView): the matching
    messages, their columns (the folder's sort table, else the index cache or the
    files), then the answer."""
    uids = match(folder)
    hint = partial(_size_hint, folder) if need_size else None
    cols, positions, added = SOT.table_for(str(folder.path), folder.infos, uids,
                                           folder.index, hint, VSIZE_KEY,
                                           folder.uidvalidity, need_keys)
    return answer(cols, positions, SOT.Numbering(cols, view)), added
