"""SEARCH (RFC 3501 6.4.4) with the RETURN options of ESEARCH (RFC 4731), the saved result
"$" of SEARCHRES (RFC 5182) and the update contexts and partial results of CONTEXT=SEARCH
(RFC 5267 4), as a mixin for the IMAP session.  SORT (sorting.py) shares the RETURN
handling here for ESORT and CONTEXT=SORT.

"$" is kept as UIDs whatever command saved it or uses it (RFC 5182 2.1), so it needs no
renumbering: an expunged message leaves it when the client is told of the expunge, and
it is read back as the saved UIDs still in the session's view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from mailserver.imap import esearch as ESEARCH
from mailserver.imap import search as S
from mailserver.imap.livesearch import MAX_CONTEXTS, MAX_SORTED_RESULTS, LiveResult, LiveResults
from mailserver.imap.parser import Arguments, BadCommand

# RFC 5182 2.1, RFC 5267 3.1 and 4.1: what the session adds to its CAPABILITY list.
SEARCH_CAPABILITIES = (b"SEARCHRES", b"ESORT", b"CONTEXT=SEARCH", b"CONTEXT=SORT")
# Commands whose sequence sets may be "$" (RFC 5182 3: sequence-set =/ seq-last-command).
SAVED_RESULT_COMMANDS = frozenset((b"FETCH", b"STORE", b"COPY", b"MOVE", b"SEARCH", b"SORT",
                                   b"THREAD", b"EXPUNGE"))
MAX_CANCEL = 100          # tags in one CANCELUPDATE
REFUSED = object()        # an UPDATE the session will not keep (NOUPDATE)


class SearchCommands:
    """SEARCH's answer, CANCELUPDATE, "$", and the session's update contexts."""

    _saved: list[int] = []            # RFC 5182 search result variable: UIDs, ascending
    _live: LiveResults | None = None  # RFC 5267 4.3 update contexts

    if TYPE_CHECKING:  # what the session provides
        folder: Any

        def untagged(self, line: bytes) -> None: ...
        def done(self, tag: bytes, text: bytes, status: bytes = b"OK",
                 expunges: bool = True) -> None: ...
        def enable_condstore(self) -> None: ...
        def _seq_of(self, uid: int) -> int | None: ...
        def _in_view(self, uid: int) -> bool: ...

    # -- RFC 5182: "$" ---------------------------------------------------------------------

    def saved_result(self) -> list[int]:
        """What "$" names now: the saved UIDs the client has not been told are expunged."""
        return [u for u in self._saved if self._in_view(u)]

    def with_saved_result(self, options: ESEARCH.ReturnOptions | None,
                          work: Callable[[], defer.Deferred | None]) -> defer.Deferred | None:
        """Run a searching command (SEARCH or SORT) under RFC 5182 2.1: one with SAVE that
        fails with NO leaves "$" empty; one answered BAD leaves "$" as it was."""
        if options is None or not options.save:
            return work()
        try:
            d = work()
        except Exception as e:
            self._save_failed(e)
            raise
        if isinstance(d, defer.Deferred):
            d.addErrback(lambda f: (self._save_failed(f.value), f)[1])
        return d

    def _save_failed(self, error: BaseException) -> None:
        if not (isinstance(error, BadCommand) or getattr(error, "status", None) == b"BAD"):
            self._saved = []

    # -- SEARCH ------------------------------------------------------------------------------

    def search_command(self, tag: bytes, args: Arguments, uid: bool,
                       options: ESEARCH.ReturnOptions | None) -> defer.Deferred:
        """SEARCH / UID SEARCH from its criteria on, `options` its RETURN (RFC 3501 6.4.4;
        RFC 4731 3.1, RFC 5182 2.1, RFC 5267 4); run under with_saved_result."""
        query = S.parse_search(args)
        if query.modseq:  # RFC 7162 3.1.5: a CONDSTORE enabling command
            self.enable_condstore()
        update = self.reserve_update(tag, options, uid, query, None)

        def answer(found: list[int]) -> None:
            nums = found if uid else [self._seq_of(u) or 0 for u in found]
            # RFC 7162 3.1.5: of the messages returned: MIN's, MAX's (the higher of the two
            # with both), PARTIAL's; every match with ALL or COUNT, or without RETURN.
            returned = found if options is None else ESEARCH.saved_result(options, found)
            infos = [self.folder.by_uid(u) for u in returned] if query.modseq else []
            highest = max((i.modseq for i in infos if i is not None), default=0)
            if options is None:
                line = ("SEARCH " + " ".join(map(str, nums))).rstrip().encode()
                if highest:  # RFC 7162 3.1.6: the highest mod-sequence of what matched
                    line += b" (MODSEQ %d)" % highest
                self.untagged(line)
            else:   # RFC 4731 3.1; RFC 7162 3.1.5 MODSEQ return data
                line = ESEARCH.esearch_response(tag, nums, options, uid) \
                    if options.answers else None
                if line is not None and highest:
                    line += b" MODSEQ %d" % highest
                self.answer_searching(tag, options, found, line, update, found)
            self.done(tag, b"SEARCH completed", expunges=uid)

        return self.unless_failed(S.search(self, query).addCallback(answer), update)  # type: ignore[arg-type]

    # -- shared with SORT ---------------------------------------------------------------------

    def reserve_update(self, tag: bytes, options: ESEARCH.ReturnOptions | None, uid: bool,
                       query: S.Query, criteria: list[tuple[bytes, bool]] | None) -> Any:
        """RFC 5267 4.3: a context for RETURN (UPDATE) before the search runs, REFUSED
        when the session keeps as many as it will (4.3.1), None without UPDATE; BAD when
        the tag already names a context."""
        if options is None or not options.update:
            return None
        if self._live is None:
            self._live = LiveResults(self)  # type: ignore[arg-type]
        if tag in self._live:
            raise BadCommand("Tag reuse")
        if len(self._live) >= MAX_CONTEXTS:
            return REFUSED
        return self._live.reserve(tag, uid, query, criteria)

    def unless_failed(self, d: defer.Deferred, update: Any) -> defer.Deferred:
        """A reserved context ends with its command if that fails."""
        def failed(failure: Failure) -> Failure:
            if isinstance(update, LiveResult) and self._live is not None:
                self._live.end(update.tag)
            return failure
        return d.addErrback(failed)

    def answer_searching(self, tag: bytes, options: ESEARCH.ReturnOptions,
                         ordered: Sequence[int], line: bytes | None, update: Any,
                         initial: list[Any]) -> None:
        """The untagged part of a SEARCH or SORT answer with RETURN: NOUPDATE (RFC 5267
        4.3.1; the other options still honoured), the ESEARCH line, then "$" (RFC 5182)
        and the context (RFC 5267 4.3) set.  `ordered`: the matching UIDs in result order;
        `initial`: what the context starts from."""
        live = self._live
        if update is REFUSED and live is not None:
            live.refuse(tag, b"Too many update contexts")
        elif isinstance(update, LiveResult) and update.sorted \
                and len(initial) > MAX_SORTED_RESULTS and live is not None:
            live.refuse(tag, b"Too many results to keep up to date")
            live.end(tag)
            update = None
        if line is not None:
            self.untagged(line)
        if options.save:
            self._saved = ESEARCH.saved_result(options, ordered)
        if isinstance(update, LiveResult) and live is not None:
            live.start(update, initial)

    # -- RFC 5267 4.3.5 ------------------------------------------------------------------------

    def cmd_select_CANCELUPDATE(self, tag: bytes, args: Arguments) -> None:
        tags = ESEARCH.parse_cancelupdate(args, MAX_CANCEL)
        live = self._live
        unknown = [t for t in tags if live is None or not live.end(t)]
        if unknown:
            self.done(tag, b"No such update context", status=b"NO")
        else:
            self.done(tag, b"CANCELUPDATE completed")

    # -- the session's hooks -------------------------------------------------------------------

    def searches_expunging(self, uids: Sequence[int]) -> None:
        """Messages are about to be told expunged: REMOVEFROM first (RFC 5267 4.3.4), and
        they leave "$" (RFC 5182 2.1)."""
        if self._live is not None and self._live.contexts:
            self._live.expunging(uids)
        if self._saved:
            gone = set(uids)
            self._saved = [u for u in self._saved if u not in gone]

    def searches_flush(self) -> None:
        """The session tells its changes: the contexts' updates go with them (after EXISTS)."""
        if self._live is not None and self._live.contexts:
            self._live.flush()

    def searches_reset(self) -> None:
        """No mailbox selected any more: "$" is empty (RFC 5182 2.1) and updates cease
        (RFC 5267 4.3)."""
        self._saved = []
        if self._live is not None:
            self._live.close()
            self._live = None
