"""The SORT and THREAD commands (RFC 5256) with SORT=DISPLAY (RFC 5957), ESORT and
CONTEXT=SORT (RFC 5267 3, 4), as a mixin for the IMAP session.

The search criteria are SEARCH's (search.parse_search / search.search); the matched
messages' header data is then read in a worker thread (sort.load_entries, over a snapshot
of immutable MessageInfo objects and the view) where the sorting or threading and the
formatting of the answer happen too, so a SORT over a large mailbox costs the reactor a
list copy and one write.
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
        if options is None:
            def answer(entries: list[SO.Entry]) -> bytes:  # worker thread
                return SO.sort_response(SO.sort_messages(entries, criteria), uid)

            return self._sorted_answer(tag, query, uid, need_size, answer, b"SORT completed")
        update = self.reserve_update(tag, options, uid, query, criteria)
        keep = isinstance(update, LiveResult)  # a context starts from the sort values

        def esort(entries: list[SO.Entry]) -> tuple[bytes | None, list[int], list[Any]]:
            # worker thread: RFC 5267 3.1, ALL and PARTIAL in the requested order (3.2)
            ordered = SO.sort_messages(entries, criteria)
            uids = [e.uid for e in ordered]
            line = ESEARCH.esearch_response(tag, uids if uid else [e.seq for e in ordered],
                                            options, uid) if options.answers else None
            keys = [SO.sort_key_of(e, criteria) for e in ordered] if keep else []
            return line, uids, keys

        def reply(result: tuple[bytes | None, list[int], list[Any]]) -> None:
            line, uids, keys = result
            self.answer_searching(tag, options, uids, line, update, keys)
            self.done(tag, b"SORT completed", expunges=uid)

        d = self._sorted_answer(tag, query, uid, need_size, esort, b"SORT completed", reply)
        return self.unless_failed(d, update)

    def cmd_select_THREAD(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred:
        # RFC 5256 3: THREAD algorithm charset search-criteria.
        args.space()
        algorithm = SO.parse_thread_algorithm(args.atom())
        args.space()
        _charset(args)
        args.space()
        query = S.parse_search(args)
        build = (SO.thread_references if algorithm == b"REFERENCES"
                 else SO.thread_orderedsubject)

        def answer(entries: list[SO.Entry]) -> bytes:  # worker thread
            return SO.thread_response(build(entries), uid)

        return self._sorted_answer(tag, query, uid, False, answer, b"THREAD completed")

    def _sorted_answer(self, tag: bytes, query: S.Query, uid: bool, need_size: bool,
                       answer: Callable[[list[SO.Entry]], Any], completed: bytes,
                       finish: Callable[[Any], None] | None = None) -> defer.Deferred:
        """Search, then load, order and format in a thread; the answer is one untagged
        line, or what `finish` makes of `answer`'s result.  Like SEARCH, the non-UID form
        sends no EXPUNGE (RFC 3501 7.4.1)."""
        folder = self.folder

        def matched(uids: list[int]) -> defer.Deferred:
            get = folder.info_map().get
            infos = [i for u in uids if (i := get(u)) is not None]  # immutable snapshot
            view = list(self.view)
            return folder.read_in_thread(_load_and_answer, infos, view, need_size, answer)

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

        return S.search(self, query).addCallback(matched).addCallback(reply)  # type: ignore[arg-type]


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


def _load_and_answer(folder: Any, infos: list[Any], view: list[int], need_size: bool,
                     answer: Any) -> tuple[bytes, int]:
    """A thread of the folder's executor (`folder` is its FolderView): the entries (index
    cache, else the files), then the answer line."""
    hint = partial(_size_hint, folder) if need_size else None
    entries, added = SO.load_entries(str(folder.path), infos, view, folder.index, hint,
                                     VSIZE_KEY)
    return answer(entries), added
