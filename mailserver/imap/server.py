"""The IMAP4rev1 session (RFC 3501) with IDLE, UIDPLUS, MOVE, NAMESPACE, LITERAL+,
SPECIAL-USE, CHILDREN, UNSELECT, ENABLE, ID, QUOTA and LIST-STATUS.

Built on twisted.mail's IMAP4Server (greeting, response helpers, timeouts, the
`<state>_<COMMAND>` dispatch convention) with the parts that a server for real desktop
clients cannot use replaced:

- input: commands are assembled from lines and literals first (synchronising and LITERAL+),
  every line and literal is bounded, an APPEND literal streams into the target folder's
  tmp/ as it arrives, and a literal over the size limit is refused before it is read;
- commands run one at a time in order, so a command pipelined behind a SELECT whose answer
  is pending waits instead of getting BAD;
- IDLE ends only on DONE; STARTTLS discards anything pipelined behind it;
- FETCH answers from the folder index and exact file bytes (header order, repeated and
  8-bit headers kept), honours partial fetches, and streams large bodies;
- SELECT/EXAMINE send [UIDNEXT], [PERMANENTFLAGS], [UNSEEN] and [HIGHESTMODSEQ]; error
  codes are bytes;
- CONDSTORE and QRESYNC (RFC 7162, imap/condstore.py): mod-sequences from the folder's
  memory, VANISHED from its expunge memory;
- SEARCHRES, ESORT, CONTEXT=SEARCH and CONTEXT=SORT (RFC 5182, RFC 5267: imap/searching.py,
  imap/livesearch.py): "$", SORT RETURN (...), results kept up to date;
- STATUS=SIZE (RFC 8438, imap/statussize.py), CREATE-SPECIAL-USE (RFC 6154 3,
  imap/specialuse.py) and UTF8=ACCEPT (RFC 6855, imap/utf8.py);
- IMAP4rev2 (RFC 9051, imap/rev2.py) once a client enables it;
- a keyword defined after SELECT (by any session or process) is announced in FLAGS and
  PERMANENTFLAGS before any FETCH shows it, between two responses of a streaming FETCH.
"""

from __future__ import annotations

import base64
import bisect
import re
import time
import unicodedata
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task, threads
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

from mailserver import sasl
from mailserver.accounts import AccountsUnavailable
from mailserver.auth import throttled_login
from mailserver.connlimit import LimitedProtocolMixin
from mailserver.peer import PeerFacts
from mailserver.streaming import ChunkProducer, OutputPacer, close_gracefully
from mailserver.imap import fetch as F
from mailserver.imap import headerpass as HP
from mailserver.imap import listing as L
from mailserver.imap.append import APPEND_CAPABILITIES, AppendCommand, AppendCommands, is_append
from mailserver.imap.compress import COMPRESS_CAPABILITY, CompressCommands
from mailserver.imap import esearch as ESEARCH
from mailserver.imap.mailbox import IIMAPAccount, IMAPAccount
from mailserver.imap.parser import Arguments, BadCommand, Literal, SavedSet
from mailserver.imap.searching import SAVED_RESULT_COMMANDS, SEARCH_CAPABILITIES, SearchCommands
from mailserver.imap.sorting import SORT_CAPABILITIES, SortingCommands
from mailserver.imap import condstore as C
from mailserver.imap import specialuse as SU
from mailserver.imap import utf8 as U
from mailserver.imap import rev2 as R2
from mailserver.imap.statussize import STATUS_SIZE_CAPABILITY, mailbox_size
from mailserver.maildir import (FolderError, FolderExists, FolderNotEmpty, InvalidFolderName,
                               NoSuchFolder)

if TYPE_CHECKING:
    from mailserver.imap.context import IMAPContext

MAX_LINE = 65536           # bytes of command text (long UID sets are legitimate)
MAX_LITERAL = 65536        # bytes of a literal that is not an APPEND message
MAX_LITERALS = 1000        # literals in one command
# Bytes of one command held in memory (its text and the literals that are not APPEND
# messages), after and before login: a stranger gets no more than a LOGIN needs.
MAX_COMMAND = 1024 * 1024
MAX_LITERAL_UNAUTH = 4096
MAX_COMMAND_UNAUTH = 16 * 1024
# Commands read and waiting behind a running one (RFC 3501 5.5 pipelining): past this,
# input is not read until half of them have run.
MAX_QUEUED = 64
UNAUTH_TIMEOUT = 60.0
AUTH_TIMEOUT = 30 * 60.0   # RFC 3501 5.4
IDLE_POLL = 5.0            # seconds between looks at the disk for other processes' changes

SYSTEM_FLAGS = (b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Seen", b"\\Draft")
_SETTABLE_SYSTEM = {f.lower(): f for f in SYSTEM_FLAGS}


_LITERAL_MARK = re.compile(rb"\{(\d+)\}\r\n")


class _ResponseCursor:
    """Follows a stream of responses to tell whether it stands between two of them (after
    a response's CRLF, outside any literal): the only place another untagged response may
    go.  A literal's "{n}" CRLF is expected within one chunk, as FETCH writes it."""

    def __init__(self) -> None:
        self.between = True
        self._literal_left = 0

    def feed(self, chunk: bytes) -> None:
        """Move past `chunk`, the next piece of the stream."""
        pos, end = 0, len(chunk)
        if not end:
            return
        if isinstance(chunk, F.WholeResponses) and not self._literal_left:
            self.between = True  # FETCH says so: no need to look for literals
            return
        while True:
            if self._literal_left:
                step = min(self._literal_left, end - pos)
                self._literal_left -= step
                pos += step
                if self._literal_left:
                    self.between = False
                    return
            mark = _LITERAL_MARK.search(chunk, pos)
            if mark is None:
                break
            self._literal_left = int(mark.group(1))
            pos = mark.end()
        # Outside literals a CRLF ends a response; text after a literal means it goes on.
        self.between = pos < end and chunk.endswith(b"\r\n")

    def first_boundary(self, chunk: bytes) -> int | None:
        """Where in `chunk` (fed next) the stream is first between two responses: 0 if it
        is already, else just after the first response's end in it; None if none ends."""
        if self.between:
            return 0
        pos, end, left = 0, len(chunk), self._literal_left
        while True:
            pos += min(left, end - pos)
            eol = chunk.find(b"\r\n", pos)
            if eol < 0:
                return None
            mark = _LITERAL_MARK.search(chunk, pos, eol + 2)
            if mark is None or mark.end() != eol + 2:
                return eol + 2
            left, pos = int(mark.group(1)), mark.end()


class CommandFailed(Exception):
    """Answer the command with a tagged NO (or BAD) carrying this text."""

    def __init__(self, text: bytes, status: bytes = b"NO") -> None:
        super().__init__(text)
        self.text = text
        self.status = status


def _nfc_only(name: str) -> str:
    """A name for a new folder (CREATE, RENAME's target) in Unicode NFC (RFC 9051 5.1).
    An IMAP4rev2 client's names are normalised as they come; another client's are taken
    as sent, and one made in another form would be out of an IMAP4rev2 client's reach."""
    if not name.isascii() and unicodedata.normalize("NFC", name) != name:
        raise CommandFailed(b"[CANNOT] Mailbox names must be in Unicode normalization form C")
    return name


class IMAPSession(SearchCommands, SortingCommands, C.CondstoreSession, R2.Rev2Session,
                  U.UTF8Session, AppendCommands, CompressCommands, PeerFacts,
                  LimitedProtocolMixin, imap4.IMAP4Server):
    log = Logger()
    IDENT = b"IMAP4rev1 ready"

    def __init__(self, context: "IMAPContext") -> None:
        imap4.IMAP4Server.__init__(self, contextFactory=context.tls)
        self.context = context
        # RFC 3501 5.4: at least 30 minutes once logged in; a stranger gets much less.
        self.timeOut = min(UNAUTH_TIMEOUT, context.limits.idle_timeout)
        self._buffer = b""
        self._parts: list[bytes] = []       # the command being assembled
        self._held = 0                      # its bytes in memory (text, literals)
        self._queue_room: defer.Deferred | None = None   # input held: too many queued
        self._pacer = OutputPacer()   # answers the client has not been seen to take
        self._abort_call: Any = None
        self._literal_left = 0
        self._literal_sink: Any = None      # bytearray, or an AppendWriter for APPEND
        self._append_writer: Any = None     # the APPEND being assembled (AppendCommand)
        self._input_held = False            # CATENATE: input waits for a URL's copy
        self._discard = False               # skipping the rest of a refused command
        self._queue: list[tuple[list[bytes], Any]] = []
        self._busy = False
        self._closing = False
        self._continuation: Callable[[bytes], None] | None = None
        self._auth_failures = 0
        self.user: str | None = None
        self.imap_account: IMAPAccount | None = None
        # Selected state:
        self.folder: Any = None
        self.readonly = True
        self.view: list[int] = []           # UIDs; sequence number = index + 1
        self._view_shared = False           # view is the folder's list: copy before changing
        self.recent: set[int] = set()
        self._pending_added: list[Any] = []
        self._pending_expunged: set[int] = set()
        self._pending_flags: dict[int, Any] = {}
        self._idle_tag: bytes | None = None
        self._idle_poll: task.LoopingCall | None = None
        self._keywords_told: tuple[str, ...] = ()  # folder.keyword_names last announced

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.tags = {}
        self.canStartTLS = (self.context.tls is not None and not self.tls_active
                            and hasattr(self.transport, "startTLS"))
        self.setTimeout(self.timeOut)
        self.sendPositiveResponse(message=b"[CAPABILITY " + b" ".join(self.capability_list())
                                  + b"] " + self.context.hostname.encode() + b" " + self.IDENT)

    def stream(self, chunks: Iterator[bytes]) -> defer.Deferred:
        """Send a long answer as fast as the client takes it (streaming.ChunkProducer);
        fires when it is sent or the connection is gone."""
        return ChunkProducer(self.transport, self._counted(chunks), self.resetTimeout,
                             stopped=self._connection_going).start()

    def _counted(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """The chunks, counted as answers written (the transport takes a first burst at
        once: pipelined FETCHes of small messages are paced as other answers are)."""
        wrote = self._pacer.wrote
        for chunk in chunks:
            wrote(len(chunk))
            yield chunk

    def _connection_going(self) -> None:
        """The connection is gone (told before connectionLost, by a stopped answer or
        wait): nothing queued runs any more, and what queued APPENDs hold is let go."""
        self._closing = True
        self._drop_queue()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._connection_going()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._end_idle_poll()
        if self._append_writer is not None:
            self._append_writer.abort()
            self._append_writer = None
        self._deselect()
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        self.transport.write(b"* BYE Autologout; connection idle too long\r\n")
        if self._busy and self._idle_tag is None:
            # An answer the client stopped reading: a close would wait for it to drain
            # (and the producer to finish), which is for ever.  (IDLE is a command
            # running too, but its client reads: it gets its BYE, which an abort drops.)
            self._closing = True
            self._buffer = b""
            self.transport.abortConnection()
            return
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._buffer = b""
        if self._abort_call is None:
            self._abort_call = close_gracefully(self.transport, self.callLater)

    def send(self, data: bytes) -> None:
        self._pacer.wrote(len(data))
        self.transport.write(data)

    def untagged(self, line: bytes) -> None:
        self._pacer.wrote(len(line) + 4)
        self.transport.write(b"* " + line + b"\r\n")

    def tagged(self, tag: bytes, status: bytes, text: bytes) -> None:
        self._pacer.wrote(len(tag) + len(status) + len(text) + 4)
        self.transport.write(tag + b" " + status + b" " + text + b"\r\n")

    # -- capabilities ------------------------------------------------------------------

    def capability_list(self) -> list[bytes]:
        # RFC 9051 1: both revisions; LITERAL+ covers IMAP4rev2's LITERAL- (imap/rev2.py).
        caps = [b"IMAP4rev1", R2.REV2_CAPABILITY, b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE",
                b"IDLE", b"NAMESPACE", b"UNSELECT", b"CHILDREN", b"UIDPLUS", b"MOVE",
                b"SPECIAL-USE", b"LIST-EXTENDED", b"LIST-STATUS", b"QUOTA",
                b"QUOTA=RES-STORAGE", b"ESEARCH",   # RFC 9208 3.1: the resource it has
                *SORT_CAPABILITIES, *SEARCH_CAPABILITIES, *C.CONDSTORE_CAPABILITIES,
                *APPEND_CAPABILITIES, STATUS_SIZE_CAPABILITY, SU.CREATE_SPECIAL_USE_CAPABILITY,
                U.UTF8_CAPABILITY]
        if self.canStartTLS and not self.tls_active:
            caps.append(b"STARTTLS")
        if self.user is not None:
            caps.append(COMPRESS_CAPABILITY)  # RFC 4978: once authenticated
        if self.user is None:
            if self.plaintext_allowed():
                caps += [b"AUTH=" + m.encode() for m in sasl.MECHANISMS]
            else:
                caps.append(b"LOGINDISABLED")
        return caps

    # -- input: assembling commands from lines and literals --------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._pacer.new_turn()
        if self._inflater is not None:  # RFC 4978 3: compressed after COMPRESS
            self._compressed_input(data)
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._drain_input()

    def _drain_input(self) -> None:
        self._pacer.new_turn()
        while self._buffer and not self._closing and not self._input_held:
            if self._literal_left:
                self._take_literal()
                continue
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if len(self._buffer) > MAX_LINE:
                    self.untagged(b"BAD Command line too long")
                    self._close()
                return
            line, self._buffer = self._buffer[:nl], self._buffer[nl + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                self.untagged(b"BAD Command line too long")
                self._close()
                return
            self.resetTimeout()
            self._line(line)

    def _take_literal(self) -> None:
        chunk = self._buffer[:self._literal_left]
        self._buffer = self._buffer[len(chunk):]
        self._literal_left -= len(chunk)
        sink = self._literal_sink
        if sink is not None:
            if isinstance(sink, bytearray):
                sink += chunk
            else:
                sink.write(chunk)
        if self._literal_left == 0:
            if isinstance(sink, bytearray):
                self._parts.append(Literal(bytes(sink)))
            else:
                self._parts.append(Literal(b""))  # the message went to the writer
            self._literal_sink = None
        self.resetTimeout()

    def _line(self, line: bytes) -> None:
        if self._continuation is not None:
            cont, self._continuation = self._continuation, None
            cont(line)
            return
        if self._idle_tag is not None:
            self._idle_line(line)
            return
        literal = F.LITERAL_AT_END.search(line)
        text = line[:literal.start()] if literal else line
        if self._discard:
            if not literal:
                self._discard = False
                self._parts, self._held = [], 0
            elif literal.group(2):  # non-synchronising: its octets follow, skip them
                self._start_literal(int(literal.group(1)), None)
            return
        self._parts.append(text)
        self._held += len(text)
        if not literal:
            if self._held > self._command_limit():
                self._refuse_command(b"BAD Command too long", False, 0)
                return
            parts, self._parts, self._held = self._parts, [], 0
            writer, self._append_writer = self._append_writer, None
            self._enqueue(parts, writer)
            return
        size, non_sync = int(literal.group(1)), bool(literal.group(2))
        if len(self._parts) > MAX_LITERALS * 2:
            return self._refuse_command(b"BAD Too many literals", non_sync, size)
        refusal, sink = self._literal_sink_for(size)
        if refusal is not None:
            return self._refuse_command(refusal, non_sync, size)
        self._start_literal(size, sink)
        if self._append_writer is not None and self._append_writer.copying():
            self._literal_after_copies(non_sync, size)  # RFC 4469: URL octets go first
        elif not non_sync:
            self.send(b"+ Ready for literal data\r\n")

    def _start_literal(self, size: int, sink: Any) -> None:
        self._literal_left = size
        self._literal_sink = sink
        if size == 0:
            self._take_literal()

    def _refuse_command(self, text: bytes, non_sync: bool, size: int) -> None:
        tag = self._parts[0].split(b" ", 1)[0] if self._parts and self._parts[0] else b"*"
        self._parts, self._held = [], 0
        # `text` starts with its status, or is a NO's text (a [CODE] from APPEND).
        status, _, rest = text.partition(b" ")
        if status not in (b"NO", b"BAD"):
            status, rest = b"NO", text
        if self._append_writer is not None:
            self._append_writer.abort()
            self._append_writer = None
        if non_sync:
            # The client sends the octets without waiting: too many to skip, so hang up.
            if size > self.context.limits.max_message_size:
                self.tagged(tag, status, rest)
                self.untagged(b"BYE Literal too large")
                self._close()
                return
            self._discard = True
            self._start_literal(size, None)
            self.tagged(tag, status, rest)
            return
        self.tagged(tag, status, rest)
        self._discard = False

    def _literal_sink_for(self, size: int) -> tuple[bytes | None, Any]:
        """Where a literal goes: APPEND's messages stream to the folder; others to memory."""
        if self._append_writer is None and self.user and is_append(self._parts):
            self._append_writer = AppendCommand(self)
        if self._append_writer is not None:
            return self._append_writer.literal_sink(self._parts, size)
        if size > (MAX_LITERAL if self.user else MAX_LITERAL_UNAUTH):
            return b"BAD Literal too large", None
        if self._held + size > self._command_limit():
            return b"BAD Command too long", None
        self._held += size
        return None, bytearray()

    def _command_limit(self) -> int:
        return MAX_COMMAND if self.user else MAX_COMMAND_UNAUTH

    # -- command execution -----------------------------------------------------------------

    def _enqueue(self, parts: list[bytes], writer: Any) -> None:
        self._queue.append((parts, writer))
        if not self._busy:
            self._run_queue()
        if len(self._queue) >= MAX_QUEUED and self._queue_room is None and not self._closing:
            # A client pipelining behind a slow command: read on once half have run.
            self._queue_room = defer.Deferred()
            self._hold_input(self._queue_room)

    def _run_queue(self) -> None:
        while self._queue and not self._busy and not self._closing:
            if self._pacer.due:
                # Answers the client has not taken: the rest of the queue waits until it
                # has (the queue, then the input, is held meanwhile).  18 MB of NOOPs
                # never read grew the process by hundreds of MB.
                self._busy = True
                waited = self._pacer.wait(self.transport)
                waited.addCallback(self._taken).addBoth(self._command_done)
                return
            parts, writer = self._queue.pop(0)
            if len(self._queue) <= MAX_QUEUED // 2:
                self._open_queue()
            d = self._execute(parts, writer)
            if d is None:
                continue
            finished: list[bool] = []
            d.addBoth(lambda _: finished.append(True))
            if finished:
                if not self._closing and self._idle_tag is None:
                    self.setTimeout(self.timeOut)   # a LOGIN's 30 minutes (RFC 3501 5.4)
            else:
                # Not answered yet (answered already, as a NOOP with nothing new on the
                # disk is, the loop goes on in this turn).  The idle clock runs on: a
                # client that stops reading the answer (a FETCH's producer then waits
                # for ever) is logged out like an idle one; each part of the answer the
                # client takes, and any input, restart it.
                self._busy = True
                d.addBoth(self._command_done)

    def _open_queue(self) -> None:
        """Read input again after a full queue (from the next turn, not inside a read)."""
        if self._queue_room is not None:
            room, self._queue_room = self._queue_room, None
            self.callLater(0, lambda: room.callback(None))

    def _forget_input(self) -> None:
        """Everything read and not run yet, whole commands and a half-read one alike (its
        open literal would take the first octets sent after the handshake)."""
        self._buffer = b""
        self._parts, self._held = [], 0
        self._literal_left = 0
        self._literal_sink = None
        self._discard = False
        self._continuation = None
        if self._append_writer is not None:
            self._append_writer.abort()
            self._append_writer = None
        self._drop_queue()

    def _drop_queue(self) -> None:
        """Forget what was pipelined (STARTTLS, COMPRESS: none of it counts)."""
        for _, writer in self._queue:
            if writer is not None:
                writer.abort()
        self._queue = []
        self._open_queue()

    def _taken(self, drained: bool) -> None:
        if not drained:   # the connection is going: nothing more is run
            self._connection_going()

    def _command_done(self, _: Any) -> None:
        self._pacer.new_turn()
        self._busy = False
        if not self._closing and self._idle_tag is None:
            self.setTimeout(self.timeOut)
        self._run_queue()

    def _execute(self, parts: list[bytes], writer: Any) -> defer.Deferred | None:
        args = Arguments(parts)
        tag = None
        try:
            tag = args.tag() if args.peek() not in (b"", b" ") else None
            if tag is None or b"+" in tag:
                raise BadCommand("missing or bad tag")
            args.space()
            name = args.atom().upper()
        except BadCommand:
            if writer is not None:
                writer.abort()
            first = parts[0].split(b" ")[0] if parts and parts[0] else b""
            if tag is not None and tag == first and b"+" not in tag:
                self.tagged(tag, b"BAD", b"Missing command")
            else:
                self.untagged(b"BAD Missing tag or command")
            return None
        uid = False
        if name == b"UID" and self.state == "select":
            try:
                args.space()
                name = args.atom().upper()
            except BadCommand:
                self.tagged(tag, b"BAD", b"Missing UID command")
                return None
            if name not in (b"FETCH", b"SEARCH", b"STORE", b"COPY", b"MOVE", b"EXPUNGE",
                            b"SORT", b"THREAD"):
                self.tagged(tag, b"BAD", b"Unknown UID command")
                return None
            uid = True
        if self.state == "select" and name in SAVED_RESULT_COMMANDS:
            args.saved_result = self.saved_result  # RFC 5182: "$" as a sequence set
        handler = self._lookup(name)
        if handler is None:
            if writer is not None:
                writer.abort()
            known = any(hasattr(self, f"{s}_{name.decode('ascii', 'replace')}")
                        for s in ("unauth", "auth", "select"))
            self.tagged(tag, b"BAD", b"Command not valid in this state" if known
                        else b"Unknown command")
            return None
        try:
            if writer is not None:
                result = handler(tag, args, writer=writer)
            elif uid:
                result = handler(tag, args, uid=True)
            else:
                result = handler(tag, args)
        except Exception:
            if writer is not None:
                writer.abort()
            self._command_error(Failure(), tag)
            return None
        if isinstance(result, defer.Deferred):
            return result.addErrback(self._command_error, tag)
        return None

    def _lookup(self, name: bytes) -> Callable[..., Any] | None:
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text.isalpha():
            return None
        states = {"unauth": ("any", "unauth"), "auth": ("any", "auth"),
                  "select": ("any", "auth", "select")}.get(self.state, ("any",))
        for state in states:
            method = getattr(self, f"cmd_{state}_{text}", None)
            if method is not None:
                return method
        return None

    def _command_error(self, failure: Failure, tag: bytes) -> None:
        if failure.check(BadCommand):
            self.tagged(tag, b"BAD", str(failure.value).encode("utf-8", "replace"))
        elif failure.check(CommandFailed):
            err = failure.value
            self.tagged(tag, err.status, err.text)
        elif failure.check(NoSuchFolder):
            self.tagged(tag, b"NO", b"[NONEXISTENT] No such mailbox")
            if self.folder is not None and not self.folder.path.is_dir():
                self.folder_deleted(self.folder)  # by another process: seen only now
        elif failure.check(FolderExists):
            self.tagged(tag, b"NO", b"[ALREADYEXISTS] Mailbox already exists")
        elif failure.check(FolderNotEmpty):   # RFC 9051 7.1 HASCHILDREN
            self.tagged(tag, b"NO", b"[HASCHILDREN] Mailbox has children and no messages "
                        b"of its own to delete")
        elif failure.check(InvalidFolderName):
            self.tagged(tag, b"NO", b"[CANNOT] Invalid mailbox name")
        elif failure.check(FolderError):
            self.tagged(tag, b"NO", str(failure.value).encode("utf-8", "replace"))
        else:
            self.log.failure("IMAP command failed", failure)
            self.tagged(tag, b"NO", b"[SERVERBUG] Internal error")

    def done(self, tag: bytes, text: bytes, status: bytes = b"OK", expunges: bool = True) -> None:
        """Send pending mailbox updates, then the tagged completion."""
        self.flush_updates(expunges)
        self.tagged(tag, status, text)

    # -- any state (RFC 3501 6.1) ---------------------------------------------------------

    def cmd_any_CAPABILITY(self, tag: bytes, args: Arguments) -> None:
        args.end()
        self.untagged(b"CAPABILITY " + b" ".join(self.capability_list()))
        self.done(tag, b"CAPABILITY completed")

    def cmd_any_NOOP(self, tag: bytes, args: Arguments) -> defer.Deferred | None:
        args.end()
        if self.folder is None:
            self.done(tag, b"NOOP completed")
            return None
        return self.folder.refresh().addCallback(lambda _: self.done(tag, b"NOOP completed"))

    def cmd_any_LOGOUT(self, tag: bytes, args: Arguments) -> None:
        args.end()
        self.untagged(b"BYE Logging out")
        self.tagged(tag, b"OK", b"LOGOUT completed")
        self.state = "logout"
        self._close()

    def cmd_any_ID(self, tag: bytes, args: Arguments) -> None:  # RFC 2971
        args.space()
        if args.peek() == b"(":
            args.generic()
        else:
            args.atom()
        args.end()
        self.untagged(b'ID ("name" "mailserver" "version" "0.1")')
        self.done(tag, b"ID completed")

    # -- not authenticated (RFC 3501 6.2) -------------------------------------------------

    def cmd_unauth_STARTTLS(self, tag: bytes, args: Arguments) -> None:
        args.end()
        if not self.canStartTLS or self.tls_active:
            self.tagged(tag, b"BAD", b"TLS not available")
            return
        self.tagged(tag, b"OK", b"Begin TLS negotiation now")
        self._forget_input()  # nothing pipelined before the handshake counts
        self.transport.startTLS(self.context.tls)
        self.startedTLS = True
        self.canStartTLS = False

    def cmd_unauth_LOGIN(self, tag: bytes, args: Arguments) -> defer.Deferred | None:
        args.space()
        user = args.astring()
        args.space()
        password = args.astring()
        args.end()
        if not self.plaintext_allowed():
            self.tagged(tag, b"NO", b"[PRIVACYREQUIRED] Use STARTTLS first")
            return None
        return self._login(tag, user, password)

    def cmd_unauth_AUTHENTICATE(self, tag: bytes, args: Arguments) -> defer.Deferred | None:
        """RFC 3501 6.2.2, RFC 4959 SASL-IR; PLAIN and LOGIN through the decoder SMTP and
        POP3 use (mailserver.sasl)."""
        args.space()
        mechanism = args.atom()
        initial = None
        if args.maybe_space():
            initial = args.atom() if args.peek() != b"=" else args.rest()
        args.end()
        exchange = sasl.exchange_for(mechanism)
        if exchange is None:
            self.tagged(tag, b"NO", b"Unsupported authentication mechanism")
            return None
        if not self.plaintext_allowed():
            self.tagged(tag, b"NO", b"[PRIVACYREQUIRED] Use STARTTLS first")
            return None
        d: defer.Deferred = defer.Deferred()

        def refused(error: sasl.SASLError) -> None:
            if error.reason == sasl.PROXY:
                self.tagged(tag, b"NO", b"[AUTHORIZATIONFAILED] Proxy login not allowed")
            elif error.reason == sasl.CANNOT_DECODE:
                self.tagged(tag, b"BAD", b"Invalid base64")
            else:
                self.tagged(tag, b"BAD", b"Malformed authentication data")
            d.callback(None)

        def advance(challenge: bytes | None) -> None:
            if challenge is None:
                self._login(tag, exchange.username.encode(),
                            exchange.password.encode()).chainDeferred(d)
                return
            self._continuation = response
            self.send(b"+ " + base64.b64encode(challenge) + b"\r\n")

        def response(line: bytes) -> None:
            try:
                following = exchange.respond(line)
            except sasl.Cancelled:   # RFC 3501 6.2.2
                self.tagged(tag, b"BAD", b"Authentication cancelled")
                d.callback(None)
                return
            except sasl.SASLError as e:
                refused(e)
                return
            advance(following)

        try:   # RFC 4959: an initial response, "=" for an empty one
            advance(exchange.start(None if initial is None else sasl.decode(initial)))
        except sasl.SASLError as e:
            refused(e)
        return d

    def _login(self, tag: bytes, user: bytes, password: bytes) -> defer.Deferred:
        ip = self.peer_ip
        account = user.decode("utf-8", "replace").lower()
        throttle = self.context.throttle
        d = throttled_login(self.context.portal, throttle, reactor, ip, account, user,
                            password, IIMAPAccount, self.context.warm)

        def ok(result: tuple[Any, IMAPAccount, Callable[[], None]]) -> None:
            _, avatar, logout = result
            throttle.success(ip, account)
            self._onLogout = logout
            self.imap_account = avatar
            avatar.refresh_usage()
            self.user = avatar.user
            self.account = avatar
            self.state = "auth"
            self.timeOut = AUTH_TIMEOUT
            self.log.info("imap login {user} from {ip} tls={tls}", user=self.user, ip=ip,
                          tls=self.tls_active)
            self.context.metrics.logged_in(self)
            self.tagged(tag, b"OK", b"[CAPABILITY " + b" ".join(self.capability_list())
                        + b"] Logged in")

        def failed(f: Failure) -> None:
            if f.check(AccountsUnavailable):   # RFC 5530 3: a subsystem is down, not a guess
                self.log.info("imap login for {user} from {ip} refused: accounts database "
                              "unavailable", user=account, ip=ip)
                self.tagged(tag, b"NO", b"[UNAVAILABLE] Accounts unavailable, try again later")
                return
            if not f.check(UnauthorizedLogin):
                self.log.failure("imap login error", f)
            throttle.failure(ip, account)
            self._auth_failures += 1
            self.log.info("imap login failed for {user} from {ip}", user=account, ip=ip)
            self.context.metrics.auth_failed()
            self.tagged(tag, b"NO", b"[AUTHENTICATIONFAILED] Authentication failed")
            if self._auth_failures >= self.context.limits.auth_failures_per_connection:
                self.untagged(b"BYE Too many authentication failures")
                self._close()

        return d.addCallbacks(ok, failed)

    # -- authenticated (RFC 3501 6.3) --------------------------------------------------------

    def _mailbox_name(self, args: Arguments) -> str:
        # Modified UTF-7, or UTF-8 once UTF8=ACCEPT is enabled (RFC 6855 3); names go
        # back to the client through _wire_name (imap/utf8.py).
        return self._decode_name(args.astring())

    def cmd_auth_SELECT(self, tag: bytes, args: Arguments, readonly: bool = False) -> defer.Deferred:
        args.space()
        name = self._mailbox_name(args)
        condstore, qresync = C.parse_select_params(args)  # RFC 7162 3.1.8, 3.2.5
        if qresync is not None and not self.qresync:
            raise BadCommand("QRESYNC is not enabled")
        if self.folder is not None and (self.qresync or self.rev2):
            self.untagged(b"OK [CLOSED] Previous mailbox closed")  # RFC 7162 3.2.11, RFC 9051 7.1
        self._deselect()
        if condstore:
            self.enable_condstore()
        folder = self.imap_account.folder(name)  # type: ignore[union-attr]
        d = folder.refresh()
        if qresync is None:
            return d.addCallback(lambda _: self._selected(tag, folder, readonly, name))
        d.addCallback(lambda _: self.qresync_prepare(folder, qresync))
        return d.addCallback(lambda plan: None if self._closing
                             else self._selected(tag, folder, readonly, name, plan))

    def cmd_auth_EXAMINE(self, tag: bytes, args: Arguments) -> defer.Deferred:
        return self.cmd_auth_SELECT(tag, args, readonly=True)

    def _selected(self, tag: bytes, folder: Any, readonly: bool, folder_name: str,
                  qresync: C.QresyncPlan | None = None) -> defer.Deferred | None:
        self.folder = folder
        self.readonly = readonly
        self.state = "select"
        self.view = folder.shared_uids()
        self._view_shared = True
        # RFC 3501 2.3.2: \Recent for the first read-write session only; a read-only one
        # sees it without taking it away.
        # RFC 9051: no \Recent after ENABLE IMAP4rev2.
        self.recent = (set() if self.rev2 else folder.peek_recent() if readonly
                       else set(folder.claim_recent(self)))
        folder.add_listener(self)
        self._keywords_told = folder.keyword_names
        self.send(self._flag_responses(self._keywords_told))
        self.untagged(b"%d EXISTS" % len(self.view))
        if self.rev2:  # RFC 9051 6.3.2: LIST, no RECENT, no UNSEEN
            self.untagged(R2.select_list_line(self.imap_account, folder_name,
                                              self._wire_name(folder_name)))
        else:
            self.untagged(b"%d RECENT" % len(self.recent))
        first_unseen = 0 if self.rev2 else self._seq_of(folder.first_unseen_uid or 0)
        if first_unseen:
            self.untagged(b"OK [UNSEEN %d] First unseen" % first_unseen)
        self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity)
        self.untagged(b"OK [UIDNEXT %d] Predicted next UID" % folder.uidnext)
        # RFC 7162 3.1.2.1: with every SELECT/EXAMINE (all our folders keep mod-sequences).
        self.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % folder.highestmodseq)
        text = b"[READ-ONLY] EXAMINE completed" if readonly else b"[READ-WRITE] SELECT completed"
        sending = self.qresync_answer(qresync) if qresync is not None else None
        if sending is None:
            self.tagged(tag, b"OK", text)
            return None
        return sending.addCallback(lambda _: self.tagged(tag, b"OK", text))

    def _flag_responses(self, keywords: tuple[str, ...]) -> bytes:
        """The untagged FLAGS (RFC 3501 7.2.6) and OK [PERMANENTFLAGS] (7.1) responses for
        the selected folder with these keywords; \\* while it can take new ones."""
        flags = F.flag_list(SYSTEM_FLAGS + tuple(k.encode() for k in keywords))
        out = b"* FLAGS " + flags + b"\r\n"
        if self.readonly:
            return out + b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n"
        if self.folder.can_create_keywords:
            flags = flags[:-1] + b" \\*)"
        return out + b"* OK [PERMANENTFLAGS " + flags + b"] Flags permitted\r\n"

    def _announce_keywords(self) -> None:
        """RFC 3501 7.2.6: a keyword defined since the session last said FLAGS (by another
        session's STORE, a delivery from another process, this session's own STORE) is
        announced before any FETCH shows it.  Costs an identity check when none is new."""
        keywords = self.folder.keyword_names
        if keywords is not self._keywords_told:
            self._keywords_told = keywords
            self.send(self._flag_responses(keywords))

    def _announcing_keywords(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """FETCH response chunks with the announcement of a keyword that appears meanwhile
        (a large FETCH streams over many reactor turns while other sessions store) put at
        the first place between two responses in the next chunk: a response that starts
        in a chunk was made after any change before the chunk was asked for."""
        cursor = _ResponseCursor()
        try:
            for chunk in chunks:
                told = self._keywords_told
                keywords = self.folder.keyword_names if self.folder is not None else told
                at = cursor.first_boundary(chunk) if keywords is not told else None
                cursor.feed(chunk)
                if at is not None:
                    self._keywords_told = keywords
                    if at:
                        yield chunk[:at]
                    yield self._flag_responses(keywords)
                    chunk = chunk[at:]
                if chunk:
                    yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _deselect(self) -> None:
        if self.folder is not None:
            self.folder.remove_listener(self)
        self.folder = None
        self.view = []
        self._view_shared = False
        self.recent = set()
        self._pending_added, self._pending_expunged, self._pending_flags = [], set(), {}
        self.searches_reset()  # RFC 5182 2.1 "$" empty; RFC 5267 4.3 updates cease
        if self.state == "select":
            self.state = "auth"

    def cmd_auth_CREATE(self, tag: bytes, args: Arguments) -> defer.Deferred:
        args.space()
        raw = args.astring()
        name = _nfc_only(self._decode_name(raw).rstrip("."))
        attributes = SU.parse_create_params(args)  # RFC 4466 2.2, RFC 6154 3 USE
        if name == "INBOX":
            raise CommandFailed(b"[ALREADYEXISTS] INBOX always exists")
        try:
            use = SU.chosen_use(attributes)
        except SU.UseAttrRefused as e:
            raise CommandFailed(b"[USEATTR] " + str(e).encode()) from None
        # mkdirs, a fresh uid list and fsyncs: in a thread, like the dot-lock waits.
        normalised = self.created_as(raw, name)

        def created(_: Any) -> None:
            if normalised is not None:
                self.untagged(normalised)
            self.done(tag, b"CREATE completed")
        return threads.deferToThread(
            self.imap_account.create_folder, name, use,  # type: ignore[union-attr]
        ).addCallback(created)

    def _in_thread(self, work: Any, name: str, tag: bytes, text: bytes) -> defer.Deferred:
        """A folder-tree or subscription change that touches only the disk (no reactor
        state): run off the reactor, answered when it is done (errors as usual)."""
        return threads.deferToThread(work, name).addCallback(lambda _: self.done(tag, text))

    def cmd_auth_DELETE(self, tag: bytes, args: Arguments) -> None:
        args.space()
        name = self._mailbox_name(args)
        args.end()
        if name == "INBOX":
            raise CommandFailed(b"[CANNOT] INBOX cannot be deleted")
        selected = self.imap_account.loaded_folder(name)  # type: ignore[union-attr]
        if self.folder is not None and selected is self.folder:
            # The client is told it is no longer in the selected state (RFC 9051 7.1,
            # RFC 7162 3.2.11): its next FETCH would otherwise get a BAD out of nowhere.
            self._deselect()
            self.untagged(b"OK [CLOSED] The selected mailbox is being deleted")
        self.imap_account.delete_folder(name)  # type: ignore[union-attr]
        self.done(tag, b"DELETE completed")

    def cmd_auth_RENAME(self, tag: bytes, args: Arguments) -> None:
        args.space()
        old = self._mailbox_name(args)
        args.space()
        new = _nfc_only(self._mailbox_name(args).rstrip("."))
        args.end()
        if new == "INBOX":
            raise CommandFailed(b"[ALREADYEXISTS] INBOX always exists")
        self.imap_account.rename_folder(old, new)  # type: ignore[union-attr]
        line = self.renamed(old, new)
        if line is not None:
            self.untagged(line)
        self.done(tag, b"RENAME completed")

    def cmd_auth_SUBSCRIBE(self, tag: bytes, args: Arguments) -> defer.Deferred:
        args.space()
        name = self._mailbox_name(args)
        args.end()
        return self._in_thread(self.imap_account.subscribe, name,  # type: ignore[union-attr]
                               tag, b"SUBSCRIBE completed")

    def cmd_auth_UNSUBSCRIBE(self, tag: bytes, args: Arguments) -> defer.Deferred:
        args.space()
        name = self._mailbox_name(args)
        args.end()
        return self._in_thread(self.imap_account.unsubscribe, name,  # type: ignore[union-attr]
                               tag, b"UNSUBSCRIBE completed")

    def cmd_auth_LIST(self, tag: bytes, args: Arguments, lsub: bool = False) -> defer.Deferred | None:
        """RFC 3501 6.3.8 / 6.3.9, RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS."""
        request = L.parse_list(args, lsub, self.utf8_names)
        verb = b"LSUB" if lsub else b"LIST"
        entries = L.list_entries(self.imap_account, request)
        if not request.status_items:
            for entry in entries:
                self.untagged(entry.line(verb, self._wire_name(entry.name)))
            self.done(tag, verb + b" completed")
            return None

        @defer.inlineCallbacks
        def with_status() -> Any:  # RFC 5819 LIST-STATUS
            for entry in list(entries):
                self.untagged(entry.line(verb, self._wire_name(entry.name)))
                if entry.selectable:
                    try:
                        status = yield self._status(entry.name, request.status_items)
                    except FolderError:
                        continue
                    self.untagged(b"STATUS " + self._wire_name(entry.name) + b" " + status)
            self.done(tag, b"LIST completed")

        return with_status()

    def cmd_auth_LSUB(self, tag: bytes, args: Arguments) -> defer.Deferred | None:
        return self.cmd_auth_LIST(tag, args, lsub=True)

    def cmd_auth_STATUS(self, tag: bytes, args: Arguments) -> defer.Deferred:
        args.space()
        name = self._mailbox_name(args)
        args.space()
        items = [i.upper() for i in args.paren_list(Arguments.atom)]
        args.end()
        if not items:   # RFC 3501 9: status-att *(SP status-att), at least one
            raise BadCommand("STATUS needs at least one item")
        for item in items:
            if item not in F.STATUS_ITEMS:
                raise BadCommand(f"unknown STATUS item {item.decode('ascii', 'replace')}")
        if b"HIGHESTMODSEQ" in items:  # RFC 7162 3.1.7: a CONDSTORE enabling command
            self.enable_condstore()
        return self._status(name, items).addCallback(
            lambda status: (self.untagged(b"STATUS " + self._wire_name(name) + b" " + status),
                            self.done(tag, b"STATUS completed")))

    def _status(self, name: str, items: list[bytes]) -> defer.Deferred:
        folder = self.imap_account.folder(name)  # type: ignore[union-attr]
        d = folder.refresh()
        # RFC 8438: SIZE is the sum of RFC822.SIZE, worked out in a thread.
        d.addCallback(lambda _: mailbox_size(folder) if b"SIZE" in items else None)
        return d.addCallback(lambda size: F.status_line(folder, items, size))

    def cmd_auth_NAMESPACE(self, tag: bytes, args: Arguments) -> None:  # RFC 2342
        args.end()
        self.untagged(b'NAMESPACE (("" ".")) NIL NIL')
        self.done(tag, b"NAMESPACE completed")

    def cmd_auth_ENABLE(self, tag: bytes, args: Arguments) -> None:  # RFC 5161
        args.space()
        names = [args.atom().upper()]
        while args.maybe_space():
            names.append(args.atom().upper())
        args.end()
        # RFC 7162 3.1.1, 3.2.3; RFC 6855 3; anything else is ignored
        enabled = self.enable(names) + self.enable_utf8(names) + self.enable_rev2(names)
        self.untagged(b" ".join([b"ENABLED", *enabled]))
        self.done(tag, b"ENABLE completed")

    def cmd_auth_GETQUOTAROOT(self, tag: bytes, args: Arguments) -> defer.Deferred:  # RFC 2087
        args.space()
        name = self._mailbox_name(args)
        args.end()
        self.imap_account.folder(name)  # type: ignore[union-attr]
        quota = self.imap_account.quota  # type: ignore[union-attr]
        if quota is None:
            self.untagged(b"QUOTAROOT " + self._wire_name(name))
            self.done(tag, b"GETQUOTAROOT completed")
            return defer.succeed(None)
        return self._usage().addCallback(lambda used: (
            self.untagged(b'QUOTAROOT ' + self._wire_name(name) + b' ""'),
            self.untagged(b'QUOTA "" (STORAGE %d %d)' % ((max(used, 0) + 1023) // 1024, quota // 1024)),
            self.done(tag, b"GETQUOTAROOT completed")))

    def cmd_auth_GETQUOTA(self, tag: bytes, args: Arguments) -> defer.Deferred:
        args.space()
        root = args.astring()
        args.end()
        quota = self.imap_account.quota  # type: ignore[union-attr]
        if root != b"" or quota is None:
            raise CommandFailed(b"No such quota root")
        return self._usage().addCallback(lambda used: (
            self.untagged(b'QUOTA "" (STORAGE %d %d)' % ((max(used, 0) + 1023) // 1024, quota // 1024)),
            self.done(tag, b"GETQUOTA completed")))

    def cmd_auth_SETQUOTA(self, tag: bytes, args: Arguments) -> None:
        args.rest()
        raise CommandFailed(b"[NOPERM] Quotas are set by the administrator")

    def _usage(self) -> defer.Deferred:
        return self.imap_account.measure_usage()  # type: ignore[union-attr]

    def _over_quota(self, adding: int) -> bytes | None:
        quota = self.imap_account.quota if self.imap_account else None  # type: ignore[union-attr]
        if quota is None:
            return None
        if self.imap_account.cached_size() + adding > quota:  # type: ignore[union-attr]
            return b"[OVERQUOTA] Quota exceeded"
        return None

    def cmd_auth_IDLE(self, tag: bytes, args: Arguments) -> defer.Deferred:  # RFC 2177
        args.end()
        self._idle_tag = tag
        self._idle_done: defer.Deferred = defer.Deferred()
        self.send(b"+ idling\r\n")
        self.flush_updates(True)
        if self.folder is not None:
            self._idle_poll = task.LoopingCall(self._poll_folder)
            self._idle_poll.start(IDLE_POLL, now=False).addErrback(
                lambda f: self.log.failure("IDLE poll failed", f))
        self.setTimeout(AUTH_TIMEOUT)
        return self._idle_done

    def _poll_folder(self) -> defer.Deferred | None:
        """Look for changes made by other processes; one look per folder per period, however
        many sessions are idling on it (changes made in this process arrive at once)."""
        folder = self.folder
        if folder is None:
            return None
        now = time.monotonic()
        if now - getattr(folder, "_idle_polled", 0.0) < IDLE_POLL * 0.9:
            return None
        folder._idle_polled = now
        return folder.refresh().addErrback(self._poll_failed, folder)

    def _poll_failed(self, failure: Failure, folder: Any) -> None:
        """A look that failed ends neither IDLE nor its polling (a LoopingCall stops at
        its first failure): the folder deleted by another process is told as a command
        would tell it; anything else is logged, and the next period looks again."""
        if failure.check(NoSuchFolder) or not folder.path.is_dir():
            self.folder_deleted(folder)
            return
        self.log.failure("IDLE: looking for changes in {folder} failed", failure,
                         folder=folder.name)

    def _idle_line(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        self._end_idle_poll()
        if line.strip().upper() == b"DONE":
            self.done(tag, b"IDLE terminated")  # type: ignore[arg-type]
        else:
            self.tagged(tag, b"BAD", b"Expected DONE")  # type: ignore[arg-type]
        d, self._idle_done = self._idle_done, None  # type: ignore[assignment]
        d.callback(None)

    def _end_idle_poll(self) -> None:
        if self._idle_poll is not None and self._idle_poll.running:
            self._idle_poll.stop()
        self._idle_poll = None

    # -- selected (RFC 3501 6.4) -------------------------------------------------------------

    def cmd_select_CHECK(self, tag: bytes, args: Arguments) -> defer.Deferred:
        args.end()
        return self.folder.refresh().addCallback(lambda _: self.done(tag, b"CHECK completed"))

    def cmd_select_CLOSE(self, tag: bytes, args: Arguments) -> defer.Deferred | None:
        args.end()
        folder, readonly = self.folder, self.readonly
        self._deselect()
        if readonly:
            self.tagged(tag, b"OK", b"CLOSE completed")
            return None
        counted = self.imap_account.expunging(folder)  # type: ignore[union-attr]
        return folder.expunge(None, origin=self).addCallback(counted).addCallback(
            lambda _: self.tagged(tag, b"OK", b"CLOSE completed"))

    def cmd_select_UNSELECT(self, tag: bytes, args: Arguments) -> None:  # RFC 3691
        args.end()
        self._deselect()
        self.tagged(tag, b"OK", b"UNSELECT completed")

    def _require_writable(self) -> None:
        if self.readonly:
            raise CommandFailed(b"[READ-ONLY] Mailbox is read-only")

    def cmd_select_EXPUNGE(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred:
        restrict = None
        if uid:  # RFC 4315 UID EXPUNGE
            args.space()
            uidset = args.sequence_set()
            restrict = uidset.select(self.view, self.view[-1] if self.view else 0)
        args.end()
        self._require_writable()
        counted = self.imap_account.expunging(self.folder)  # type: ignore[union-attr]
        return self.folder.expunge(restrict, origin=self).addCallback(counted).addCallback(
            lambda uids: (self._announce_expunged(uids),
                          self.done(tag, self._expunge_text())))

    def _expunge_text(self) -> bytes:
        """RFC 7162 3.2.7: once QRESYNC is enabled, EXPUNGE's OK tells HIGHESTMODSEQ (the
        expunged messages have no FETCH to carry it)."""
        if self.qresync and self.folder is not None:
            return b"[HIGHESTMODSEQ %d] EXPUNGE completed" % self.folder.highestmodseq
        return b"EXPUNGE completed"

    def _announce_expunged(self, uids: list[int]) -> None:
        self.searches_expunging(uids)  # RFC 5267 4.3.4 REMOVEFROM first; RFC 5182 "$"
        if self.qresync:  # RFC 7162 3.2.10: VANISHED, never EXPUNGE
            self.announce_vanished(uids)
            return
        # Each number as it is once the ones before it are gone (ascending order: the
        # k-th removed, at index i of the view as it was, is message i + 1 - k); the
        # view made again once, not shifted per message (60,000 expunged from 100,000
        # took a second of the reactor).
        lines = []
        removed = self._remove_all_from_view(uids)
        for k, (i, u) in enumerate(removed):
            lines.append(b"* %d EXPUNGE\r\n" % (i + 1 - k))
            self._pending_flags.pop(u, None)
            self._pending_expunged.discard(u)
        if lines:
            self.send(b"".join(lines))

    # The view is the session's UIDs in ascending order (sequence number = index + 1); it
    # shares the folder's int objects, so a session on a large folder costs one pointer
    # per message, and lookups bisect instead of keeping an index per session.

    def _seq_of(self, uid: int) -> int | None:
        view = self.view
        i = bisect.bisect_left(view, uid)
        return i + 1 if i < len(view) and view[i] == uid else None

    def _in_view(self, uid: int) -> bool:
        return self._seq_of(uid) is not None

    def _own_view(self) -> list[int]:
        """The view, copied first if it is still the folder's shared list."""
        if self._view_shared:
            self.view = list(self.view)
            self._view_shared = False
        return self.view

    def _remove_all_from_view(self, uids: Iterable[int]) -> list[tuple[int, int]]:
        """Take `uids` out of the view at once; (index in the view before, uid) of those
        that were in it, ascending."""
        view = self.view
        found = []
        for u in sorted(set(uids)):
            i = bisect.bisect_left(view, u)
            if i < len(view) and view[i] == u:
                found.append((i, u))
        if not found:
            return found
        if len(found) == 1:
            del self._own_view()[found[0][0]]
        else:
            gone = {u for _, u in found}
            self.view = [u for u in view if u not in gone]
            self._view_shared = False
        self.recent.difference_update(u for _, u in found)
        return found

    def _resolve(self, seqset: Any, uid: bool) -> list[int]:
        """UIDs in the view named by a sequence set of message numbers or UIDs."""
        if isinstance(seqset, SavedSet):  # RFC 5182 2.1: "$" is UIDs in any command
            return list(seqset.uids)
        if not self.view:
            return []
        if uid:
            return seqset.select(self.view, self.view[-1])
        out: list[int] = []
        for first, last in seqset.spans(len(self.view)):  # whole runs: 1:* is one slice
            if last > len(self.view):
                raise BadCommand("message number out of range")
            out.extend(self.view[first - 1:last])
        return out

    def cmd_select_SEARCH(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred | None:
        args.space()
        # RFC 4731 3.1, RFC 5182 2.1, RFC 5267 4: SEARCH RETURN (...); imap/searching.py
        options = self.search_options(ESEARCH.parse_return(args))  # RFC 9051 6.4.4
        if self.utf8_accept and U.names_charset(args):  # RFC 6855 3
            raise BadCommand("no CHARSET after ENABLE UTF8=ACCEPT")
        return self.with_saved_result(
            options, lambda: self.search_command(tag, args, uid, options))

    def cmd_select_FETCH(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred:
        args.space()
        seqset = args.sequence_set()
        args.space()
        items, modifiers = F.parse_fetch_command(args.rest())
        mods = C.parse_fetch_modifiers(modifiers)  # RFC 7162 3.1.4.1, 3.2.6
        if mods.vanished and not (uid and self.qresync):
            raise BadCommand("VANISHED needs UID FETCH and ENABLE QRESYNC")
        uids = self._resolve(seqset, uid)
        if uid and not any(i.type == "uid" for i in items):
            items.insert(0, F.UID_ITEM)
        if mods.changedsince is not None or any(i.type == "modseq" for i in items):
            self.enable_condstore()  # RFC 7162 3.1
        if mods.changedsince is not None:
            uids = self.folder.changed_since(mods.changedsince, uids)
            if not any(i.type == "modseq" for i in items):
                items.append(C.MODSEQ_ITEM)
        marks = ([u for u in uids if "\\Seen" not in self._flags_of(u)]
                 if not self.readonly and F.sets_seen(items) else [])
        # BINARY sections decoded in a thread first: a refusal (UNKNOWN-CTE) comes before
        # \\Seen is set, and the stream below never decodes a large part in one go.
        d = F.prepare_binary(self, uids, items)

        def refused(refusal: Exception | None) -> None:
            if refusal is not None:
                raise refusal
        d.addCallback(refused)
        if mods.vanished:  # VANISHED (EARLIER) first (RFC 7162 3.2.6)
            largest = max(self.view[-1] if self.view else 0, self.folder.uidnext - 1)
            d.addCallback(lambda _: self.vanished_earlier(mods.changedsince or 0,
                                                          C.uid_set_ranges(seqset, largest)))
        d.addCallback(lambda _: self.folder.store_flags(marks, {"\\Seen"}, "add", origin=self)
                      if marks else [])

        def stream(changed: list[Any]) -> defer.Deferred:
            changed_uids = {m.uid for m in changed}
            if HP.wants_pass(items, len(uids)):  # header summaries made in batches aside
                return HP.stream_fetch(
                    self, uids, items, changed_uids,
                    lambda chunks: self.stream(self._announcing_keywords(chunks)),
                    getattr(self.context, "header_workers", None))
            chunks = self._announcing_keywords(
                F.fetch_responses(self, uids, items, changed_uids))
            return self.stream(chunks)

        d.addCallback(stream)
        d.addCallback(lambda _: self.done(tag, b"FETCH completed", expunges=uid))
        return d

    def _flags_of(self, uid: int) -> frozenset[str]:
        info = self.folder.by_uid(uid)
        flags = info.flags if info is not None else frozenset()
        return flags | {"\\Recent"} if uid in self.recent else flags

    def _parse_flags(self, flags: list[bytes]) -> set[str]:
        out = set()
        for f in flags:
            if f.startswith(b"\\"):
                canon = _SETTABLE_SYSTEM.get(f.lower())
                if canon is None:
                    if f.lower() == b"\\recent":
                        continue
                    raise BadCommand(f"invalid flag {f.decode('ascii', 'replace')}")
                out.add(canon.decode())
            else:
                out.add(f.decode("ascii"))
        return out

    def cmd_select_STORE(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred:
        args.space()
        seqset = args.sequence_set()
        args.space()
        unchanged_since = C.parse_store_modifiers(args)  # RFC 7162 3.1.3
        item = args.atom().upper()
        args.space()
        flags = self._parse_flags(args.flag_list())
        args.end()
        silent = item.endswith(b".SILENT")
        op = item[:-7] if silent else item
        mode = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}.get(op)
        if mode is None:
            raise BadCommand("invalid STORE item")
        self._require_writable()
        uids = self._resolve(seqset, uid)
        if unchanged_since is not None:
            self.enable_condstore()  # RFC 7162 3.1
        folder = self.folder
        validity = folder.uidvalidity

        def store(_: Any) -> defer.Deferred:
            self._same_uids(folder, validity)
            if unchanged_since is None:
                return folder.store_flags(uids, flags, mode, origin=self).addCallback(
                    lambda changed: (changed, []))
            return folder.conditional_store(uids, flags, mode, unchanged_since, origin=self)
        # On the flags as the files have them now: a change another process made (a
        # rename of the file) would otherwise make this STORE look like no change, and
        # be lost; UNCHANGEDSINCE compares with mod-sequences that count it.  (Four
        # stat() calls when nothing changed.)
        d = folder.refresh().addCallback(store)

        def stored(result: tuple[list[Any], list[int]]) -> None:
            if self.folder is not folder:   # deselected meanwhile: the session is closing
                return
            changed, conflicts = result
            if not silent:  # RFC 3501 6.4.6: the new flags of every message named
                refused = set(conflicts)
                for u in uids:
                    if u not in refused and self.folder.by_uid(u) is not None:
                        self._send_flags(u)
            elif self.condstore:  # RFC 7162 3.1.3: .SILENT still tells the new MODSEQ
                for info in changed:
                    self._send_flags(info.uid, silent=True)
            # RFC 7162 3.1.3: what failed UNCHANGEDSINCE
            named = conflicts if uid else [n for n in map(self._seq_of, conflicts) if n]
            if named:
                self.done(tag, b"[MODIFIED %s] Conditional STORE failed"
                          % F.uid_set(sorted(named)), expunges=uid)
                return
            self.done(tag, b"STORE completed", expunges=uid)

        return d.addCallback(stored)

    def _send_flags(self, u: int, silent: bool = False) -> None:
        """An untagged FETCH about message `u`'s flags; with MODSEQ once CONDSTORE-aware
        (RFC 7162 3.1), and only that (with UID) for a .SILENT STORE."""
        seq = self._seq_of(u)
        if seq is None:
            return
        if silent:
            self.untagged(b"%d FETCH (UID %d%s)" % (seq, u, self.modseq_suffix(u)))
            return
        self._announce_keywords()
        flags = F.flag_list(sorted(f.encode() for f in self._flags_of(u)))
        self.untagged(b"%d FETCH (UID %d FLAGS %s%s)" % (seq, u, flags, self.modseq_suffix(u)))

    def cmd_select_COPY(self, tag: bytes, args: Arguments, uid: bool = False,
                        move: bool = False) -> defer.Deferred:
        args.space()
        seqset = args.sequence_set()
        args.space()
        name = self._mailbox_name(args)
        args.end()
        if move:
            self._require_writable()
        uids = self._resolve(seqset, uid)
        try:
            dest = self.imap_account.folder(name)  # type: ignore[union-attr]
        except NoSuchFolder:
            raise CommandFailed(b"[TRYCREATE] No such mailbox") from None
        size = sum(self.folder.by_uid(u).size for u in uids if self.folder.by_uid(u))
        # A MOVE within the account adds nothing (RFC 6851; Dovecot does not check it
        # either): a full mailbox can still move mail to Trash.
        # Copying nothing adds nothing: no quota to refuse it for (RFC 9051 6.4.9).
        over = None if move or not uids else self._over_quota(size)
        if over:
            raise CommandFailed(over)
        if not uids:
            self.done(tag, b"%s completed" % (b"MOVE" if move else b"COPY"), expunges=uid)
            return defer.succeed(None)
        source, validity = self.folder, self.folder.uidvalidity
        files = {u: i.basename for u in uids if (i := source.by_uid(u)) is not None}

        def copied(pairs: list[tuple[int, int]]) -> Any:
            if move and (self.folder is not source or source.uidvalidity != validity):
                # Another process renumbered the folder during the copy (this session is
                # being closed): the originals are found by their files, not by uids
                # that now name other messages, so the MOVE still ends once.
                moved = {files[s] for s, _ in pairs if s in files}
                return source.delete_messages(
                    [i.uid for i in source.messages if i.basename in moved], origin=self)
            if not pairs:
                # Every one was expunged by another session meanwhile: no COPYUID with
                # empty sets (RFC 4315 3), a NO as RFC 2180 4.4 and RFC 5530 allow.
                raise CommandFailed(b"[EXPUNGEISSUED] The messages no longer exist")
            if not move:
                added = [i for i in (dest.by_uid(d) for _, d in pairs) if i is not None]
                self.imap_account.add_usage(sum(i.size for i in added),  # type: ignore[union-attr]
                                            len(added))
            code = b"COPYUID %d %s %s" % (dest.uidvalidity, F.uid_set([s for s, _ in pairs]),
                                          F.uid_set([d for _, d in pairs]))
            if not move:
                self.done(tag, b"[" + code + b"] COPY completed", expunges=uid)
                return None
            self.untagged(b"OK [" + code + b"] Moved")
            return self.folder.delete_messages([s for s, _ in pairs], origin=self).addCallback(
                lambda gone: (self._announce_expunged(gone), self.done(tag, b"MOVE completed")))

        # Held while the copy runs: a parallel APPEND's or COPY's check counts it.
        release = (lambda: None) if move else self.imap_account.reserve(size)  # type: ignore[union-attr]
        d = self.folder.copy_to(uids, dest).addCallback(copied)
        return d.addBoth(lambda result: (release(), result)[1])

    def cmd_select_MOVE(self, tag: bytes, args: Arguments, uid: bool = False) -> defer.Deferred:  # RFC 6851
        return self.cmd_select_COPY(tag, args, uid=uid, move=True)

    # -- mailbox events (folder listener) ---------------------------------------------------

    def messages_added(self, infos: list[Any]) -> None:
        self._pending_added.extend(infos)
        self._push_if_idle()

    def messages_expunged(self, uids: list[int]) -> None:
        self._pending_expunged.update(uids)
        self._push_if_idle()

    def folder_deleted(self, folder: Any) -> None:
        """The selected folder was deleted by another session or process (a DELETE of
        this session deselects first).  As Dovecot does: a BYE and the end of the
        connection, since nothing the client knows of the folder holds any more and
        every later command on it would fail; the client reconnects and sees the tree
        as it is."""
        if folder is not self.folder or self._closing:
            return
        self._deselect()
        self.untagged(b"BYE Selected mailbox was deleted, have to disconnect")
        self._close()

    def _same_uids(self, folder: Any, validity: int) -> None:
        """After a wait inside a command: the uids it resolved still name what the client
        meant.  Another process may have given the folder new uids meanwhile (the session
        is then being closed, uidvalidity_changed): acting on the old numbers would touch
        other messages."""
        if self.folder is not folder or folder.uidvalidity != validity:
            raise CommandFailed(b"Mailbox UIDVALIDITY changed; nothing done")

    def uidvalidity_changed(self, folder: Any) -> None:
        """Another process gave the selected folder new uids (it rewrote the uid list
        with a new UIDVALIDITY): each uid this client holds may now name another message
        (RFC 3501 2.3.1.1), and its sequence numbers no longer match.  As Dovecot does:
        BYE; the client reconnects, sees the new UIDVALIDITY and drops its cache."""
        if folder is not self.folder or self._closing:
            return
        self._deselect()
        self.untagged(b"BYE Mailbox UIDVALIDITY changed, have to disconnect")
        self._close()

    def flags_changed(self, infos: list[Any]) -> None:
        for info in infos:
            self._pending_flags[info.uid] = info
        self._push_if_idle()

    def _push_if_idle(self) -> None:
        if self._idle_tag is not None:
            self.flush_updates(True)

    def flush_updates(self, expunges: bool) -> None:
        """Tell the client what changed in the selected mailbox (RFC 3501 7.3.1, 7.4.1)."""
        if self.folder is None:
            return
        self._announce_keywords()
        if expunges and self._pending_expunged:
            gone = sorted(u for u in self._pending_expunged if self._in_view(u))
            self._pending_expunged = set()
            self._announce_expunged(gone)
        if self._pending_added:
            # Not one the folder no longer has: expunged before this session was told of
            # it (by this session's own EXPUNGE, which tells no one else, or another's).
            by_uid = self.folder.by_uid
            added = [i for i in self._pending_added if not self._in_view(i.uid)
                     and i.uid not in self._pending_expunged and by_uid(i.uid) is not None]
            self._pending_added = []
            if added:
                for info in sorted(added, key=lambda i: i.uid):
                    if not self.view or info.uid > self.view[-1]:
                        self._own_view().append(info.uid)
                if not self.rev2:  # RFC 9051: no \Recent, no RECENT
                    if self.readonly:
                        self.recent |= self.folder.peek_recent() & {i.uid for i in added}
                    else:
                        self.recent |= set(self.folder.claim_recent(self))
                self.untagged(b"%d EXISTS" % len(self.view))
                if not self.rev2:
                    self.untagged(b"%d RECENT" % len(self.recent))
        if self._pending_flags:
            pending, self._pending_flags = self._pending_flags, {}
            for u in sorted(pending):
                if self._in_view(u) and u not in self._pending_expunged:
                    self._send_flags(u)
        self.searches_flush()  # RFC 5267 4.3.3: ADDTO after EXISTS

