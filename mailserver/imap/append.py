"""APPEND (RFC 3501 6.3.11) with MULTIAPPEND (RFC 3502), CATENATE (RFC 4469), literal8
message data (RFC 3516 4.4) and UTF8 message data (RFC 6855 4), as a mixin for the IMAP
session.

An APPEND is followed as its lines and literals arrive (`AppendCommand`), so that each
message literal streams into its own file in the folder's tmp/ instead of memory, and a
literal that cannot be taken (too large, over quota, no such mailbox) is refused before
it is read.  Nothing is stored until the whole command is in: then every message is
committed, and if one of them fails the ones already stored are removed again, so the
command stores all of its messages or none (RFC 3502 3).

A CATENATE URL (RFC 4469 3, RFC 5092) names a message or part in the same account; its
octets are copied into the new message a chunk per reactor turn (twisted.internet.task
cooperate), and the session reads no further input meanwhile, so the TEXT literal after a
URL lands behind it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import unquote_to_bytes

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailserver.imap import fetch as F
from mailserver.imap import fetchitems, mime
from mailserver.imap.parser import TAG, BadCommand, Literal
from mailserver.maildir import FolderError, InvalidFolderName, NoSuchFolder

if TYPE_CHECKING:
    from mailserver.imap.server import IMAPSession

log = Logger()

MAX_APPEND_MESSAGES = 100   # messages in one APPEND (each holds a file open until the end)
MAX_URL_LITERAL = 8192      # octets of a CATENATE URL sent as a literal
COPY_CHUNK = 64 * 1024      # octets of a URL's part copied per reactor turn

# RFC 3502 / 4469 / 3516 capabilities the session adds.
APPEND_CAPABILITIES = (b"MULTIAPPEND", b"CATENATE", b"BINARY")

_APPEND_START = re.compile(rb"[^ ]+ APPEND(?: |$)", re.I)
_ATOM = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\\]]+")
_ASTRING_ATOM = re.compile(rb"[^(){ \x00-\x1f\x7f%*\"\\]+")
_FLAG = rb"\\?[^(){ \x00-\x1f\x7f-\xff%*\"\\\]]+"   # 7-bit, as atoms are
_FLAG_LIST = re.compile(rb"\(((?:" + _FLAG + rb")(?: " + _FLAG + rb")*)?\)")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')
_UNSAFE_URL_OCTET = re.compile(rb"[^!-~]|\]")


def is_append(parts: list[bytes]) -> bool:
    """Whether the command being assembled is an APPEND."""
    return bool(parts) and _APPEND_START.match(parts[0]) is not None


def _failed(text: bytes) -> Exception:
    """A tagged NO with `text` (the session's CommandFailed; imported late, as the session
    module imports this one)."""
    from mailserver.imap.server import CommandFailed

    return CommandFailed(text)


# -- IMAP URLs (RFC 5092) ----------------------------------------------------------------------

class BadURL(ValueError):
    """A URL this server cannot resolve (answered NO [BADURL url])."""


@dataclass(frozen=True)
class MessageRef:
    """What a CATENATE URL names: a message (or one of its sections) by mailbox and UID."""

    mailbox: str
    uid: int
    uidvalidity: int | None = None
    section: bytes | None = None       # an RFC 3501 section-spec, decoded
    partial: tuple[int, int | None] | None = None


_URL_TAIL = re.compile(
    rb"(?:;UIDVALIDITY=(?P<uidvalidity>[1-9][0-9]{0,9}))?"
    rb"/;UID=(?P<uid>[1-9][0-9]{0,9})"
    rb"(?:/;SECTION=(?P<section>[^/;]+))?"
    rb"(?:/;PARTIAL=(?P<offset>[0-9]{1,10})(?:\.(?P<length>[1-9][0-9]{0,9}))?)?\Z", re.I)
_REL_TAIL = re.compile(rb";UID=", re.I)


def parse_imap_url(url: bytes, *, user: str, hostname: str,
                   selected: str | None) -> MessageRef:
    """An IMAP URL naming a message or part on this server for this user (RFC 5092 6): an
    absolute "imap://[user@]host/mailbox;UIDVALIDITY=n/;UID=n[/;SECTION=s][/;PARTIAL=o.l]",
    the same from "/mailbox" on, or ";UID=n..." relative to the selected mailbox.
    URLAUTH-authorized URLs are not supported.  BadURL otherwise."""
    rest = url
    if rest[:7].lower() == b"imap://":
        authority, slash, rest = rest[7:].partition(b"/")
        if not slash:
            raise BadURL("no mailbox in the URL")
        userinfo, at, host = authority.rpartition(b"@")
        host = host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host
        if unquote_to_bytes(host).decode("latin-1").lower() != hostname.lower():
            raise BadURL("another server")
        if at:
            who = unquote_to_bytes(userinfo.split(b";", 1)[0]).decode("utf-8", "replace")
            if who.lower() != user.lower():
                raise BadURL("another user's mailbox")
        rest = b"/" + rest
    if rest.startswith(b"/"):
        m = re.search(rb"(;UIDVALIDITY=|/;UID=)", rest, re.I)
        if m is None or m.start() <= 1:
            raise BadURL("no mailbox or UID in the URL")
        raw_mailbox, tail = rest[1:m.start()], rest[m.start():]
        mailbox = _url_mailbox(unquote_to_bytes(raw_mailbox))
    elif _REL_TAIL.match(rest) and selected is not None:
        mailbox, tail = selected, b"/" + rest
    else:
        raise BadURL("not an IMAP message URL")
    found = _URL_TAIL.match(tail)
    if found is None:
        raise BadURL("not an IMAP message URL")
    section = None
    if found.group("section") is not None:
        section = unquote_to_bytes(found.group("section"))
        try:   # the section-spec of RFC 3501 (HEADER, TEXT, 1.2, 1.MIME, HEADER.FIELDS ...)
            fetchitems.parse_fetch_items(b"BODY.PEEK[" + section + b"]")
        except fetchitems.FetchSyntaxError:
            raise BadURL("bad section") from None
    partial = None
    if found.group("offset") is not None:
        length = found.group("length")
        partial = (int(found.group("offset")), int(length) if length else None)
    uidvalidity = found.group("uidvalidity")
    return MessageRef(mailbox, int(found.group("uid")),
                      int(uidvalidity) if uidvalidity else None, section, partial)


def _url_mailbox(raw: bytes) -> str:
    """A URL's mailbox name: UTF-8 (RFC 5092 3.2); modified UTF-7 as older clients send."""
    try:
        return F.decode_mailbox(raw)
    except InvalidFolderName:
        pass
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadURL("mailbox name is not UTF-8") from None
    if "\0" in name:
        raise BadURL("NUL in mailbox name")
    return name


def _echo_url(url: bytes) -> bytes:
    """The URL as it can stand in a BADURL response code."""
    return _UNSAFE_URL_OCTET.sub(lambda m: b"%%%02X" % m.group()[0], url) or b"%22%22"


# -- following the command ----------------------------------------------------------------------

class _Text:
    """A cursor over one text segment of the command (what lies between two literals)."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> bytes:
        return self.text[self.pos:self.pos + 1]

    def rest(self) -> bytes:
        return self.text[self.pos:]

    def take(self, expected: bytes) -> None:
        if not self.maybe(expected):
            raise BadCommand(f"expected {expected.decode()!r}")

    def maybe(self, expected: bytes) -> bool:
        if self.text[self.pos:self.pos + len(expected)].upper() == expected.upper():
            self.pos += len(expected)
            return True
        return False

    def match(self, pattern: re.Pattern[bytes], what: str) -> re.Match[bytes]:
        m = pattern.match(self.text, self.pos)
        if m is None:
            raise BadCommand(f"expected {what}")
        self.pos = m.end()
        return m


@dataclass
class _Draft:
    """One message of the command, on its way into the folder."""

    writer: Any           # the folder's AppendWriter


class AppendCommand:
    """One APPEND command, followed from its first literal (or, without literals, at
    execution) to its end.  The session calls `literal_sink` for each literal announced,
    then `execute` when the command is complete; `abort` whenever it goes away."""

    def __init__(self, session: "IMAPSession") -> None:
        self.session = session
        self.state = "tag"
        self.seen = 0                     # command parts already read
        self.expecting: str | None = None  # what the announced literal holds
        self.mailbox: str | None = None
        self.folder: Any = None
        self.drafts: list[_Draft] = []
        self.current: _Draft | None = None  # the CATENATE message being built
        self.flags: set[str] = set()
        self.date: float | None = None
        self.utf8_after: str | None = None  # the state after a "UTF8 (" literal's ")"
        self.error: Exception | None = None  # found while copying a URL
        self.aborted = False
        self._copies: defer.Deferred = defer.succeed(None)
        self._tasks: list[task.CooperativeTask] = []

    # -- as the command arrives

    def literal_sink(self, parts: list[bytes], size: int) -> tuple[bytes | None, Any]:
        """(refusal, sink) for the literal announced at the end of `parts`: a refusal text
        for the session's _refuse_command, or where the literal's octets go."""
        try:
            self._advance(parts, literal_follows=True)
            if self.error is not None:
                raise self.error
            kind = self.expecting
            if kind in ("mailbox", "url"):
                if size > (MAX_URL_LITERAL if kind == "url" else 1024):
                    return b"BAD Literal too large", None
                return None, bytearray()
            if kind == "message":
                self._check_size(size, size)
                draft = self._new_draft()
            else:
                draft = self.current
                assert draft is not None
                self._check_size(draft.writer.size + size, size)
            return None, draft.writer
        except BadCommand as e:
            return b"BAD " + str(e).encode("utf-8", "replace"), None
        except Exception as e:
            text = getattr(e, "text", None)
            if text is None:
                raise
            return text, None

    def _advance(self, parts: list[bytes], literal_follows: bool) -> None:
        """Read the parts not read yet; the last one is text, followed by a literal or by
        the end of the command."""
        while self.seen < len(parts):
            part = parts[self.seen]
            self.seen += 1
            if isinstance(part, Literal):
                self._literal_done(bytes(part))
            else:
                last = self.seen == len(parts)
                self._segment(_Text(part), literal_next=literal_follows or not last)

    def _segment(self, t: _Text, literal_next: bool) -> None:
        """RFC 3502 / 4469 grammar over one text segment:
            append = "APPEND" SP mailbox 1*append-message
            append-message = [SP flag-list] [SP date-time] SP append-data
            append-data = literal / literal8 / "CATENATE" SP "(" cat-part *(SP cat-part) ")"
                          / utf8-literal
            cat-part = "TEXT" SP (literal / literal8) / "URL" SP astring / utf8-literal
            utf8-literal = "UTF8" SP "(" literal8 ")"     ; RFC 6855 4, literal taken too
        """
        while True:
            state = self.state
            if state == "tag":
                t.match(TAG, "a tag")
                t.take(b" APPEND ")
                self.state = "mailbox"
            elif state == "mailbox":
                if t.at_end():
                    return self._literal_position("mailbox", literal_next)
                if t.peek() == b'"':
                    raw = _unquote(t.match(_QUOTED, "a mailbox").group(1))
                else:
                    raw = t.match(_ASTRING_ATOM, "a mailbox").group()
                self._set_mailbox(raw)
                self.state = "message"
            elif state == "message":
                t.take(b" ")
                self.flags, self.date = set(), None
                if t.peek() == b"(":
                    flags = (t.match(_FLAG_LIST, "a flag list").group(1) or b"").split()
                    self.flags = self.session._parse_flags(flags)
                    t.take(b" ")
                if t.peek() == b'"':
                    self.date = F.parse_date_time(t.match(_QUOTED, "a date-time").group(1))
                    t.take(b" ")
                if t.maybe(b"CATENATE ("):
                    self.current = self._new_draft()
                    self.state = "cat-part"
                    continue
                if t.maybe(b"UTF8 ("):
                    return self._utf8_literal(t, "message", "after", literal_next)
                if t.at_end() or t.rest() == b"~":
                    return self._literal_position("message", literal_next, t.rest() == b"~")
                raise BadCommand("expected a message literal or CATENATE")
            elif state == "cat-part":
                if t.maybe(b"TEXT "):
                    if not (t.at_end() or t.rest() == b"~"):
                        raise BadCommand("expected a literal after TEXT")
                    return self._literal_position("text", literal_next, t.rest() == b"~")
                if t.maybe(b"UTF8 ("):
                    return self._utf8_literal(t, "text", "cat-next", literal_next)
                if t.maybe(b"URL "):
                    if t.at_end():
                        return self._literal_position("url", literal_next)
                    if t.peek() == b'"':
                        url = _unquote(t.match(_QUOTED, "a URL").group(1))
                    else:
                        url = t.match(_ASTRING_ATOM, "a URL").group()
                    self._add_url(url)
                    self.state = "cat-next"
                    continue
                raise BadCommand("expected TEXT or URL")
            elif state == "cat-next":
                if t.maybe(b")"):
                    self.current = None
                    self.state = "after"
                else:
                    t.take(b" ")
                    self.state = "cat-part"
            elif state == "utf8-close":
                t.take(b")")
                self.state, self.utf8_after = self.utf8_after or "after", None
            elif state == "after":   # a whole message read: the end, or another message
                if t.at_end():
                    if literal_next:
                        raise BadCommand("unexpected literal")
                    self.state = "done"
                    return None
                self.state = "message"
            else:
                raise BadCommand("unexpected text after the command")

    def _utf8_literal(self, t: _Text, kind: str, after: str, literal_next: bool) -> None:
        """After "UTF8 (" (RFC 6855 4): the literal of a message or a CATENATE part, then
        ")".  BAD from a session that did not enable UTF8=ACCEPT."""
        if not self.session.utf8_accept:
            raise BadCommand("UTF8 message data needs ENABLE UTF8=ACCEPT")
        if not (t.at_end() or t.rest() == b"~"):
            raise BadCommand("expected a literal after UTF8 (")
        self.utf8_after = after
        return self._literal_position(kind, literal_next, t.rest() == b"~")

    def _literal_position(self, kind: str, literal_next: bool, literal8: bool = False) -> None:
        if not literal_next:
            raise BadCommand("missing argument")
        if literal8 and kind not in ("message", "text"):
            raise BadCommand("literal8 not allowed here")
        self.expecting = kind  # a literal8 (RFC 3516 4.4) is stored as it comes

    def _literal_done(self, value: bytes) -> None:
        kind, self.expecting = self.expecting, None
        if kind == "mailbox":
            self._set_mailbox(value)
            self.state = "message"
        elif kind in ("message", "text") and self.utf8_after is not None:
            self.state = "utf8-close"
        elif kind == "message":
            self.state = "after"
        elif kind == "text":
            self.state = "cat-next"
        elif kind == "url":
            self._add_url(value)
            self.state = "cat-next"
        else:
            raise BadCommand("unexpected literal")

    def _set_mailbox(self, raw: bytes) -> None:
        try:
            self.mailbox = self.session._decode_name(raw)
        except InvalidFolderName:
            raise _failed(b"[CANNOT] Invalid mailbox name") from None

    def _resolve_folder(self) -> Any:
        if self.folder is None:
            try:
                self.folder = self.session.imap_account.folder(self.mailbox)  # type: ignore[union-attr]
            except (NoSuchFolder, InvalidFolderName):
                raise _failed(b"[TRYCREATE] No such mailbox") from None
        return self.folder

    def _new_draft(self) -> _Draft:
        """A new message of the command, with the flags and date read before it."""
        if len(self.drafts) >= MAX_APPEND_MESSAGES:
            raise _failed(b"[LIMIT] At most %d messages in one APPEND" % MAX_APPEND_MESSAGES)
        folder = self._resolve_folder()
        try:
            writer = folder.begin_append(self.flags, self.date)
        except NoSuchFolder:
            raise _failed(b"[TRYCREATE] No such mailbox") from None
        except FolderError as e:
            raise _failed(b"[CANNOT] " + str(e).encode("utf-8", "replace")) from None
        except OSError:
            raise _failed(b"[SERVERBUG] Cannot store the message") from None
        draft = _Draft(writer)
        self.drafts.append(draft)
        return draft

    def _total(self) -> int:
        return sum(d.writer.size for d in self.drafts)

    def _check_size(self, message_size: int, adding: int) -> None:
        if message_size > self.session.context.limits.max_message_size:
            raise _failed(b"[TOOBIG] Message too large")
        over = self.session._over_quota(self._total() + adding)
        if over:
            raise _failed(over)

    # -- CATENATE URLs

    def _add_url(self, url: bytes) -> None:
        draft = self.current
        assert draft is not None
        previous, done = self._copies, defer.Deferred()

        def start(_: Any) -> None:
            d = defer.maybeDeferred(self._copy_url, draft, url)
            d.addErrback(self._copy_failed, url)
            d.addBoth(lambda _: done.callback(None))

        previous.addCallback(start)
        self._copies = done

    def copying(self) -> bool:
        """Whether URLs read so far are still being copied."""
        return not self._copies.called

    def _settled(self) -> defer.Deferred:
        """Fires once the URLs read so far are copied (or have failed)."""
        d: defer.Deferred = defer.Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self._copies.addBoth(fire)
        return d

    def _copy_failed(self, failure: Failure, url: bytes) -> None:
        if self.error is not None or self.aborted:
            return
        if failure.check(BadURL, NoSuchFolder, InvalidFolderName, KeyError, FileNotFoundError):
            self.error = _failed(b"[BADURL " + _echo_url(url) + b"] Cannot use this URL")
            return
        text = getattr(failure.value, "text", None)
        if text is not None:   # TOOBIG, OVERQUOTA
            self.error = failure.value
            return
        log.failure("CATENATE URL {url} failed", failure, url=url)
        self.error = _failed(b"[BADURL " + _echo_url(url) + b"] Cannot read this URL")

    def _copy_url(self, draft: _Draft, url: bytes) -> defer.Deferred | None:
        """RFC 4469 3: the octets the URL names (no transfer decoding) appended to the
        message being built."""
        if self.error is not None or self.aborted:
            return None
        session = self.session
        ref = parse_imap_url(url, user=session.user or "", hostname=session.context.hostname,
                             selected=session.folder.name if session.folder is not None
                             else None)
        folder = session.imap_account.folder(ref.mailbox)  # type: ignore[union-attr]
        d = folder.refresh()
        d.addCallback(lambda _: self._open_ref(folder, ref))
        d.addCallback(lambda found: self._copy_span(draft, *found))
        return d

    def _open_ref(self, folder: Any, ref: MessageRef) -> tuple[Any, int, int, Callable[[], None]]:
        if ref.uidvalidity is not None and ref.uidvalidity != folder.uidvalidity:
            raise BadURL("UIDVALIDITY changed")
        if folder.by_uid(ref.uid) is None:
            raise BadURL("no such message")
        f = folder.open_message(ref.uid)
        message = mime.MessageBytes(f)

        def close() -> None:
            message.close()
            f.close()

        try:
            source = _Source(message.data)
            if ref.section is None:
                data, start, end = message.data, 0, len(message.data)
            else:
                item = fetchitems.parse_fetch_items(b"BODY.PEEK[" + ref.section + b"]")[0]
                data, start, end = F.section_source(source, item)
            if ref.partial is not None:
                offset, length = ref.partial
                start = min(start + offset, end)
                if length is not None:
                    end = min(start + length, end)
        except BaseException:
            close()
            raise
        return data, start, end, close

    def _copy_span(self, draft: _Draft, data: Any, start: int, end: int,
                   close: Callable[[], None]) -> defer.Deferred | None:
        try:
            self._check_size(draft.writer.size + (end - start), end - start)
        except BaseException:
            close()
            raise

        def chunks() -> Iterator[None]:
            for pos in range(start, end, COPY_CHUNK):
                if self.aborted:
                    return
                draft.writer.write(bytes(data[pos:min(pos + COPY_CHUNK, end)]))
                yield None

        job = task.cooperate(chunks())
        self._tasks.append(job)

        def finished(result: Any) -> Any:
            close()
            self._tasks.remove(job)
            if isinstance(result, Failure) and result.check(task.TaskStopped):
                return None
            return result

        return job.whenDone().addBoth(finished)

    # -- the end of the command

    def execute(self, tag: bytes, parts: list[bytes]) -> defer.Deferred:
        """Read the rest of the command, wait for its URLs, then store every message or
        none; answer [APPENDUID uidvalidity uid-set] (RFC 4315 3, RFC 3502 6.3.11)."""
        try:
            self._advance(parts, literal_follows=False)
            if self.state != "done":
                raise BadCommand("incomplete APPEND")
        except BaseException:
            self.abort()
            raise
        d = self._settled()
        d.addCallback(lambda _: self._commit())
        d.addCallback(self._appended, tag)
        d.addErrback(self._fail)
        return d

    def _fail(self, failure: Failure) -> Failure:
        self.abort()
        return failure

    @defer.inlineCallbacks
    def _commit(self) -> Any:
        if self.error is not None:
            raise self.error
        for draft in self.drafts:
            if draft.writer.size == 0:  # RFC 3502 6.3.11: a zero-length message is an error
                raise _failed(b"Empty message")
        account = self.session.imap_account
        if account is not None and account.quota is not None:
            # Known before the check: right after a login or a restart the usage may
            # still be loading, and an unknown usage counts as none.
            yield account.measure_usage()
        over = self.session._over_quota(self._total())
        if over:
            raise _failed(over)
        # Held until _appended counts what is stored (in the same reactor turn as the
        # return below): a parallel APPEND's check counts it.
        release = account.reserve(self._total()) if account is not None else (lambda: None)
        infos: list[Any] = []
        try:
            for draft in self.drafts:
                infos.append((yield draft.writer.commit()))
        except BaseException as e:
            release()
            self.abort()
            if infos:   # all or nothing (RFC 3502 3): take back what is stored already
                try:
                    yield self.folder.delete_messages([i.uid for i in infos])
                except Exception:
                    log.failure("cannot remove the messages of a failed APPEND")
            if isinstance(e, NoSuchFolder):   # deleted while the literal came (6.3.11)
                raise _failed(b"[TRYCREATE] No such mailbox") from None
            raise
        release()
        return infos

    def _appended(self, infos: list[Any], tag: bytes) -> None:
        session = self.session
        size = sum(i.size for i in infos)
        session.imap_account.add_usage(size, len(infos))  # type: ignore[union-attr]
        log.info("imap {user} appended {count} message(s), uids {uids}, to {folder}, "
                 "{size} octets", user=session.user, count=len(infos),
                 uids=F.uid_set([i.uid for i in infos]).decode(), folder=self.mailbox,
                 size=size)
        session.done(tag, b"[APPENDUID %d %s] APPEND completed"
                     % (self.folder.uidvalidity, F.uid_set([i.uid for i in infos])))

    def abort(self) -> None:
        """Drop every message not stored yet and stop any copy.  Idempotent."""
        self.aborted = True
        for job in list(self._tasks):
            try:
                job.stop()
            except (task.TaskDone, task.TaskStopped, task.TaskFailed):
                pass
        for draft in self.drafts:
            draft.writer.abort()


class _Source:
    """A message's octets and (lazily) its structure: what fetch.section_source reads."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self._root: mime.Part | None = None

    @property
    def root(self) -> mime.Part:
        if self._root is None:
            self._root = mime.parse_structure(self.data)
        return self._root


def _unquote(text: bytes) -> bytes:
    return re.sub(rb"\\(.)", rb"\1", text)


# -- the session side ---------------------------------------------------------------------------

class AppendCommands:
    """APPEND for an IMAPSession, and the input hold CATENATE needs."""

    if TYPE_CHECKING:  # what the session provides
        _input_held: bool
        _closing: bool
        _append_writer: Any
        _literal_left: int
        _literal_sink: Any
        transport: Any

        def _resume_input(self) -> None: ...

        def _refuse_command(self, text: bytes, non_sync: bool, size: int) -> None: ...

        def send(self, data: bytes) -> None: ...

    def cmd_auth_APPEND(self, tag: bytes, args: Any, writer: Any = None) -> defer.Deferred:
        # RFC 3501 6.3.11, RFC 3502, RFC 4469 5, RFC 3516 4.4.  `writer` is the
        # AppendCommand that followed the command's literals, if it had any.
        command = writer if writer is not None else AppendCommand(self)  # type: ignore[arg-type]
        return command.execute(tag, args.parts)

    def _literal_after_copies(self, non_sync: bool, size: int) -> None:
        """A literal announced while URLs before it are copied: its octets must land
        behind theirs, so no input is read until the copies end; a synchronising one
        gets its continuation only then, or, when a URL failed, the tagged NO instead
        (the client then does not send it)."""
        command = self._append_writer
        settled = command._settled()

        def decide(_: Any) -> None:
            if self._closing or self._append_writer is not command or non_sync:
                return
            if command.error is not None:
                self._literal_left, self._literal_sink = 0, None
                self._refuse_command(command.error.text, False, size)
            else:
                self.send(b"+ Ready for literal data\r\n")

        settled.addCallback(decide)
        self._hold_input(settled)

    def _hold_input(self, until: defer.Deferred) -> None:
        """Read no input until `until` fires (and ask the transport to stop reading)."""
        self._input_held = True
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()

        def release(_: Any) -> None:
            self._input_held = False
            if self._closing:
                return
            resume = getattr(self.transport, "resumeProducing", None)
            if resume is not None:
                resume()
            self._resume_input()

        until.addBoth(release)
