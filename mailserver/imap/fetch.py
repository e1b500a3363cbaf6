"""Formatting IMAP responses: FETCH (RFC 3501 6.4.5, 7.4.2), STATUS, APPEND
arguments, flag lists and UID sets.

FETCH answers from the folder's metadata and its index cache; message files are opened
only for body sections, and then streamed in chunks with the exact stored bytes.
"""

from __future__ import annotations

import calendar
import datetime
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread

from mailserver.imap import fetchitems, mime, summary
from mailserver.imap.parser import Arguments, BadCommand, sequence_text
from mailserver.maildir import InvalidFolderName, decode_folder_name, is_inbox
from mailserver.maildir.sizes import VSIZE_KEY, known_vsize, own_name_pattern_escaped

if TYPE_CHECKING:
    from mailserver.imap.server import IMAPSession

LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}$")
CHUNK = 64 * 1024
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_DATE_TIME = re.compile(
    rb"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$")
_SAFE_ATOM = re.compile(rb"^[!#$&'+-\[^-z|}~]+$")
UID_ITEM = fetchitems.UID
STATUS_ITEMS = (b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"SIZE",
                b"HIGHESTMODSEQ", b"DELETED")


# -- small formatters ----------------------------------------------------------------------

def flag_list(flags: Iterable[bytes]) -> bytes:
    return b"(" + b" ".join(flags) + b")"


def quote_mailbox(name: bytes) -> bytes:
    if _SAFE_ATOM.match(name) and name.upper() != b"NIL":
        return name
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


uid_set = sequence_text   # '1:3,7' style, in the order given


def internal_date(ts: float) -> bytes:
    t = time.gmtime(ts)
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (t.tm_mday, _MONTHS[t.tm_mon - 1].encode(),
                                                     t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def parse_date_time(text: bytes) -> float:
    """APPEND's date-time (RFC 3501 9) as a UNIX time."""
    m = _DATE_TIME.match(text)
    if not m:
        raise BadCommand("invalid date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    try:
        month = [x.lower() for x in _MONTHS].index(mon.decode().lower()) + 1
        # A moment that exists (timegm alone makes 29-Feb-2023 the 1st of March and
        # 25:61:61 the next day); a leap second is taken as the second before it.
        moment = datetime.datetime(int(year), month, int(day), int(hh), int(mm),
                                   min(int(ss), 59))
        if int(ss) > 60 or int(zm) > 59:
            raise ValueError("no such time")
        ts = calendar.timegm(moment.timetuple())
    except (ValueError, OverflowError):
        raise BadCommand("invalid date-time") from None
    offset = (int(zh) * 60 + int(zm)) * 60
    return float(ts - offset if sign == b"+" else ts + offset)


def append_options(args: Arguments) -> tuple[list[bytes], bytes | None]:
    """APPEND's optional flag list and date-time (RFC 3501 6.3.11), each followed by a space."""
    flags: list[bytes] = []
    date = None
    if args.peek() == b"(":
        flags = args.flag_list()
        args.space()
    if args.peek() == b'"':
        date = args.date_time()
        args.space()
    return flags, date


def append_target(parts: list[bytes]) -> tuple[str, list[bytes], bytes | None] | None:
    """(mailbox, flags, date) when `parts` is an APPEND command up to its message literal."""
    args = Arguments(parts)
    try:
        args.atom()
        args.space()
        if args.atom().upper() != b"APPEND":
            return None
        args.space()
        raw = args.astring()
        args.space()
        flags, date = append_options(args)
        if not args.at_end():
            return None
    except BadCommand:
        return None
    try:
        name = decode_mailbox(raw)
    except InvalidFolderName:
        return None
    return name, flags, date


# -- STATUS and LIST -------------------------------------------------------------------------

def status_line(folder: Any, items: list[bytes], size: int | None = None) -> bytes:
    """The STATUS data; `size` is RFC 8438's SIZE (imap/statussize.py) when asked."""
    values = {
        b"MESSAGES": lambda: len(folder.messages),
        b"RECENT": lambda: folder.recent_count,
        b"UIDNEXT": lambda: folder.uidnext,
        b"UIDVALIDITY": lambda: folder.uidvalidity,
        b"UNSEEN": lambda: folder.unseen_count,
        b"SIZE": lambda: folder.total_size() if size is None else size,
        b"HIGHESTMODSEQ": lambda: folder.highestmodseq,   # RFC 7162 3.1.7
        # RFC 9051 6.3.11: messages with \\Deleted (both revisions)
        b"DELETED": lambda: folder.deleted_count,
    }
    return b"(" + b" ".join(b"%s %d" % (i, values[i]()) for i in items) + b")"


def decode_mailbox(raw: bytes) -> str:
    """A mailbox name from the wire: modified UTF-7 (RFC 3501 5.1.3), strictly; raw UTF-8
    is accepted as many clients send it; INBOX in any case is INBOX."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidFolderName("mailbox name is neither modified UTF-7 nor UTF-8") from None
    else:
        if "&" in text:
            try:
                text = decode_folder_name(text)
            except ValueError:
                raise InvalidFolderName("invalid modified UTF-7 in mailbox name") from None
    if "\0" in text:
        raise InvalidFolderName("NUL in mailbox name")
    return "INBOX" if is_inbox(text) else text


# -- FETCH ------------------------------------------------------------------------------------

def parse_fetch_items(text: bytes) -> list[fetchitems.FetchItem]:
    try:
        return fetchitems.parse_fetch_items(text)
    except fetchitems.FetchSyntaxError as e:
        raise BadCommand(f"invalid FETCH items: {e}") from None


def parse_fetch_command(text: bytes) -> tuple[list[fetchitems.FetchItem], bytes]:
    """FETCH's attributes and the modifier text after them (b"" when none)."""
    try:
        return fetchitems.parse_fetch_prefix(text)
    except fetchitems.FetchSyntaxError as e:
        raise BadCommand(f"invalid FETCH items: {e}") from None


def sets_seen(items: list[Any]) -> bool:
    """True when the fetch implicitly sets \\Seen (RFC 3501 6.4.5)."""
    for item in items:
        if item.type == "body" and not item.peek and (item.empty or item.header or item.text
                                                      or item.mime or item.part):
            return True
        if item.type in ("rfc822", "rfc822text"):
            return True
        if item.type == "binary" and not item.peek:  # RFC 3516 4.2: as BODY[...]
            return True
    return False


def _section_name(item: Any) -> bytes:
    numbers = b".".join(b"%d" % (n + 1) for n in item.part)
    if item.header is not None:
        spec = b"HEADER"
        if item.header.fields:
            spec += b".FIELDS.NOT" if item.header.negate else b".FIELDS"
            spec += b" (" + b" ".join(_field_name(n) for n in item.header.fields) + b")"
    elif item.text:
        spec = b"TEXT"
    elif item.mime:
        spec = b"MIME"
    else:
        spec = b""
    if numbers and spec:
        return numbers + b"." + spec
    return numbers or spec


def _field_name(name: bytes) -> bytes:
    """A HEADER.FIELDS name as the response echoes it (an astring): an atom when it can
    be one, else quoted, else a literal ('"a\\"b"' sent quoted comes back quoted)."""
    if mime.NOT_QUOTABLE(name):
        return mime.imap_string(name)
    return quote_mailbox(name)


class _Message:
    """Lazily opened message file and its parsed structure, for one FETCH row."""

    def __init__(self, session: "IMAPSession", uid: int) -> None:
        self.session, self.uid = session, uid
        # The folder as the FETCH began: a session may be deselected under a streaming
        # answer (its folder deleted by another session).
        self.folder = session.folder
        self._bytes: mime.MessageBytes | None = None
        self._file: Any = None
        self._root: mime.Part | None = None
        self._head: tuple[bytes, mime.Part] | None = None

    @property
    def data(self) -> Any:
        if self._bytes is None:
            folder = self.folder
            self._file = folder.open_message(self.uid)
            self._bytes = mime.MessageBytes(self._file, crlf=_named_crlf(folder, self.uid))
        return self._bytes.data

    @property
    def root(self) -> mime.Part:
        if self._root is None:
            self._root = mime.parse_structure(self.data)
        return self._root

    def head(self) -> tuple[Any, mime.Part]:
        """(bytes, part) enough for the top-level header: ENVELOPE and header fields read
        only the header section, not the whole file, unless it is mapped already."""
        if self._root is not None or self._bytes is not None:
            return self.data, self.root
        if self._head is None:
            with self.folder.open_message(self.uid) as f:
                head = mime.read_head(f)
            if head is None:  # a huge header: the general path
                return self.data, self.root
            self._head = (head, mime.parse_head(head))
        return self._head

    def close(self) -> None:
        if self._bytes is not None:
            self._bytes.close()
        if self._file is not None:
            self._file.close()


def _named_crlf(folder: Any, uid: int) -> bool:
    """Whether the message's file name says it is stored with CRLF line ends only (its
    CRLF size, W=, equal to its size): what this server and Dovecot with CRLF storage
    write; the file then need not be counted for bare LFs."""
    info = folder.by_uid(uid)
    return info is not None and vsize_hint_from(folder, info, None) == info.size


def _body_span(msg: _Message, item: Any) -> tuple[int, int] | None:
    if not item.part:  # the whole message, its header or its text: no structure needed
        data = msg.data
        if item.text or item.header is not None:
            hend, body = mime.header_end(data, 0, len(data))
            return (body, len(data)) if item.text else (0, hend)
        return 0, len(data)
    part = mime.find_part(msg.root, [n + 1 for n in item.part])
    if part is None:
        return None
    if item.mime:
        return part.start, part.body_start
    if item.header is None and not item.text:
        return part.body_start, part.end
    target = part.message
    if target is None:
        return None
    if item.text:
        return target.body_start, target.end
    hend, _ = mime.header_end(msg.data, target.start, target.end)   # n.HEADER
    return target.start, hend


def section_source(msg: Any, item: Any) -> tuple[Any, int, int]:
    """(octets, start, end) of the section BODY[...] names (RFC 3501 6.4.5), without the
    partial range: a span of the message, or the selected header lines.  `msg` has the
    message's `data` and parsed `root` (FETCH's _Message; CATENATE's URL source)."""
    if item.header is not None and item.header.fields:
        if item.part:
            part = mime.find_part(msg.root, [n + 1 for n in item.part])
            target = part.message if part is not None else None
        else:
            target = msg.root
        data = b"" if target is None else mime.header_fields(
            msg.data, target, item.header.fields, bool(item.header.negate))
        return data, 0, len(data)
    span = _body_span(msg, item)
    start, end = span if span is not None else (0, 0)
    return msg.data, start, end


def _section_chunks(msg: _Message, item: Any) -> Iterator[bytes]:
    name = b"BODY[" + _section_name(item) + b"]"
    source, start, end = section_source(msg, item)
    if item.partial_begin is not None:
        origin = item.partial_begin
        name += b"<%d>" % origin
        start = min(start + origin, end)
        end = min(start + item.partial_length, end)
    yield name + b" {%d}\r\n" % (end - start)
    for pos in range(start, end, CHUNK):
        yield _no_nul(bytes(source[pos:min(pos + CHUNK, end)]))


def _no_nul(data: bytes) -> bytes:
    """RFC 3501 4.3, RFC 9051 4.3: a literal holds no NUL (only BINARY's literal8 may);
    0x80 in its place, as Dovecot sends, the length the same.  (bytes.replace hands the
    same object back when there is none.)"""
    return data.replace(b"\x00", b"\x80")


ROWS_PER_BATCH = 512


class WholeResponses(bytes):
    """A chunk of FETCH output made of whole responses: the stream is between two
    responses after it, which the keyword announcement (server.py) then need not find
    out by scanning it for literals."""

    __slots__ = ()


class _FetchContext:
    """Per-FETCH state: index values read in batches, and flag lists formatted once each."""

    def __init__(self, session: "IMAPSession", items: list[Any]) -> None:
        self.session = session
        self.folder = session.folder
        self.recent = session.recent
        self._flag_text: dict[frozenset[str], bytes] = {}
        self._recent_text: dict[frozenset[str], bytes] = {}
        self.keys = sorted({k for k in (_cache_key(i) for i in items) if k})
        if any(i.type == "rfc822size" for i in items):
            self.keys.append(VSIZE_KEY)
        self.cached: dict[str, dict[int, Any]] = {}
        # BODY[HEADER.FIELDS (...)] cut from the summary's header lines: the names of each
        # such item, and which of the fields kept are wanted, per list of names kept.
        self.line_names = {id(i): names for i in items
                           if (names := summary_fields_wanted(i)) is not None}
        self.lines_memo: dict[bytes, Any] = {}

    def load(self, uids: list[int], known: dict[str, dict[int, Any]] | None = None) -> None:
        """The cached values of these messages: from `known` (what the header pass just
        computed) for its keys, else read from the index."""
        self.cached = {key: known[key] if known is not None and key in known
                       else self.folder.cache_get_many(uids, key) for key in self.keys}

    def get(self, uid: int, key: str, compute: Callable[[], bytes]) -> bytes:
        value = self.cached.get(key, {}).get(uid)
        if value is None:
            value = compute()
            self.folder.cache_put(uid, key, value)
        return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")

    def flags(self, info: Any) -> bytes:
        """The flag list of a message, made once per set of flags (with \\Recent, per
        set of the others: no new set per message of a folder's first session)."""
        flags = info.flags
        if info.uid in self.recent:
            text = self._recent_text.get(flags)
            if text is None:
                text = self._recent_text[flags] = flag_list(
                    sorted(f.encode() for f in flags | {"\\Recent"}))
            return text
        text = self._flag_text.get(flags)
        if text is None:
            text = self._flag_text[flags] = flag_list(sorted(f.encode() for f in flags))
        return text


def summary_fields_wanted(item: Any) -> frozenset[bytes] | None:
    """For BODY[HEADER.FIELDS (names)] of the top-level header, when every name is one of
    the fields whose lines the header summary keeps (summary.SUMMARY_NAMES): the names,
    lower case.  Such a fetch is answered from those lines (index key LINES_KEY)."""
    if (item.type != "body" or item.header is None or not item.header.fields
            or item.header.negate or item.part or item.partial_begin is not None):
        return None
    names = frozenset(n.lower() for n in item.header.fields)
    return names if names <= summary.SUMMARY_NAMES else None


def _cache_key(item: Any) -> str | None:
    """The index key under which an item's answer is kept, for items worth keeping."""
    if item.type == "envelope":
        return summary.ENVELOPE_KEY
    if summary_fields_wanted(item) is not None:
        return summary.LINES_KEY
    if item.type == "bodystructure":
        return "bodystructure"
    if item.type == "body" and _is_plain_body(item):
        return "body"
    if (item.type == "body" and item.header is not None and item.header.fields
            and not item.part and item.partial_begin is None):
        return _header_fields_key(item)
    if item.type in ("binary", "binarysize"):
        return _binary_key(item)
    return None


def _is_plain_body(item: Any) -> bool:
    """FETCH BODY (the structure), as opposed to BODY[...] (a section)."""
    return not (item.empty or item.header is not None or item.text or item.mime or item.part
                or item.partial_begin is not None)


def _header_fields_key(item: Any) -> str:
    names = " ".join(sorted({n.upper().decode("ascii", "replace") for n in item.header.fields}))
    return ("hfn:" if item.header.negate else "hf:") + names


def fetch_responses(session: "IMAPSession", uids: list[int], items: list[Any],
                    seen_changed: set[int],
                    known: dict[str, dict[int, Any]] | None = None) -> Iterator[bytes]:
    """Untagged FETCH responses for `uids`, produced lazily in chunks; index values are
    read for a batch of messages at a time (or taken from `known`: key -> uid -> value)
    and message files opened only when needed."""
    folder = session.folder
    ctx = _FetchContext(session, items)
    if all(i.type in _METADATA for i in items):
        yield from _metadata_responses(session, ctx, uids, items, seen_changed)
        return
    if all(i.type in _METADATA or i.type == "envelope" or id(i) in ctx.line_names
           for i in items):
        yield from _summary_responses(session, ctx, uids, items, seen_changed, known)
        return
    wants_flags = any(i.type == "flags" for i in items)
    wants_modseq = any(i.type == "modseq" for i in items)
    condstore = getattr(session, "condstore", False)
    binary = [i for i in items if i.type in ("binary", "binarysize")]
    batch: list[bytes] = []
    size = 0
    for first_row in range(0, len(uids), ROWS_PER_BATCH):
        rows = uids[first_row:first_row + ROWS_PER_BATCH]
        if ctx.keys:
            ctx.load(rows, known)
        for u in rows:
            info = folder.by_uid(u)
            seq = session._seq_of(u)
            if info is None or seq is None:
                continue  # expunged by another session; its EXPUNGE comes later
            msg = _Message(session, u)
            started = False
            try:
                refusal = _binary_refusal(ctx, msg, u, binary) if binary else None
                if refusal is not None:
                    if batch:  # the responses before this one are sent whole
                        yield b"".join(batch)
                    raise refusal
                out = [b"* %d FETCH (" % seq]
                first = True
                for item in items:
                    piece = _fetch_item(ctx, msg, info, item)
                    if isinstance(piece, bytes):
                        out.append(piece if first else b" " + piece)
                    else:
                        # The file open before any of the row goes out: once open, it
                        # reads to its end even if an expunge unlinks it meanwhile.
                        msg.data  # noqa: B018
                        if not first:
                            out.append(b" ")
                        batch.append(b"".join(out))
                        out = []
                        started = True
                        yield b"".join(batch)
                        batch, size = [], 0
                        yield from piece
                    first = False
                if u in seen_changed and not wants_flags:
                    # The flags as the row began (\Seen already set): a keyword another
                    # session added while a body streamed is not announced yet.
                    out.append(b" FLAGS " + ctx.flags(info))
                    if condstore and not wants_modseq:  # RFC 7162 3.1: with its MODSEQ
                        out.append(b" MODSEQ (%d)" % info.modseq)
                out.append(b")\r\n")
                line = b"".join(out)
                batch.append(line)
                size += len(line)
            except FileNotFoundError:
                if started:
                    raise
                # Expunged meanwhile by another session (its thread unlinks the file
                # before the reactor hears of it) or process: left out, as a message
                # already gone is (RFC 2180 4.1.1); its EXPUNGE comes later.
                continue
            finally:
                msg.close()
            if size > CHUNK:
                yield b"".join(batch)
                batch, size = [], 0
    if batch:
        yield b"".join(batch)


_METADATA = {"uid", "flags", "internaldate", "modseq"}


def _metadata_responses(session: "IMAPSession", ctx: _FetchContext, uids: list[int],
                        items: list[Any], seen_changed: set[int]) -> Iterator[bytes]:
    """FETCH of UID/FLAGS/INTERNALDATE/MODSEQ only (what clients ask for every folder
    sync): answered from memory in one tight loop, without per-item dispatch."""
    infos = ctx.folder.info_map()
    kinds = [i.type for i in items]
    uid_flags = kinds == ["uid", "flags"]  # UID FETCH 1:* (FLAGS): the most common of all
    flags_of = ctx.flags
    batch: list[bytes] = []
    size = 0
    for seq, u in _numbered(session, uids):
        info = infos.get(u)
        if info is None or seq is None:
            continue
        if uid_flags:
            line = b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, u, flags_of(info))
        else:
            parts = []
            for kind in kinds:
                if kind == "uid":
                    parts.append(b"UID %d" % u)
                elif kind == "flags":
                    parts.append(b"FLAGS " + flags_of(info))
                elif kind == "modseq":
                    parts.append(b"MODSEQ (%d)" % info.modseq)
                else:
                    parts.append(b"INTERNALDATE " + internal_date(info.internaldate))
            line = b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))
        batch.append(line)
        size += len(line)
        if size > CHUNK:
            yield WholeResponses(b"".join(batch))
            batch, size = [], 0
    if batch:
        yield WholeResponses(b"".join(batch))


def _numbered(session: "IMAPSession", uids: list[int]) -> Iterable[tuple[int | None, int]]:
    """(sequence number or None, uid) of each of `uids`: counted up when they are a run of
    the session's view (FETCH 1:*, or any range), else looked up one by one."""
    view = session.view
    start = session._seq_of(uids[0]) if uids else None
    if start is not None and view[start - 1:start - 1 + len(uids)] == uids:
        return enumerate(uids, start)
    return ((session._seq_of(u), u) for u in uids)


def _summary_responses(session: "IMAPSession", ctx: _FetchContext, uids: list[int],
                       items: list[Any], seen_changed: set[int],
                       known: dict[str, dict[int, Any]] | None) -> Iterator[bytes]:
    """FETCH of ENVELOPE and of header fields cut from the header summary's lines, with
    UID/FLAGS/INTERNALDATE/MODSEQ (what a client asks of every message when it first
    lists a folder): answered from the index values in one tight loop.  A message without
    its values goes through _fetch_item (its file is read)."""
    infos = ctx.folder.info_map()
    wants_flags = any(i.type == "flags" for i in items)
    wants_modseq = any(i.type == "modseq" for i in items)
    condstore = getattr(session, "condstore", False)
    # per item: (kind, label or names); kinds: metadata type, "envelope", "lines"
    plan: list[tuple[str, Any, Any]] = []
    for item in items:
        names = ctx.line_names.get(id(item))
        if names is not None:
            plan.append(("lines", b"BODY[" + _section_name(item) + b"] {", names, item))
        else:
            plan.append((item.type, None, None, item))
    memo = ctx.lines_memo
    fields_from_lines = summary.fields_from_lines
    single = plan[0] if len(plan) == 1 and plan[0][0] in ("lines", "envelope") else None
    batch: list[bytes] = []
    size = 0
    for first_row in range(0, len(uids), ROWS_PER_BATCH):
        rows = uids[first_row:first_row + ROWS_PER_BATCH]
        ctx.load(rows, known)
        envelopes = ctx.cached.get(summary.ENVELOPE_KEY, {})
        kept_lines = ctx.cached.get(summary.LINES_KEY, {})
        for seq, u in _numbered(session, rows):
            if single is not None and u not in seen_changed:
                # One item, its value at hand (a client listing a folder): one format.
                value = (kept_lines if single[0] == "lines" else envelopes).get(u)
                if value is not None and seq is not None and u in infos:
                    if single[0] == "lines":
                        # fields_from_lines, its usual case inline: every field kept wanted
                        n = value.find(b"\n")
                        if n > 0 and memo.get(value[:n], False) is None:
                            data = value[summary.lines_start(n):]
                        else:
                            data = fields_from_lines(value, single[2], memo)
                        data = _no_nul(data)
                        line = b"* %d FETCH (%s%d}\r\n%s)\r\n" % (seq, single[1], len(data),
                                                                    data)
                    elif isinstance(value, bytes):
                        line = b"* %d FETCH (ENVELOPE %s)\r\n" % (seq, value)
                    else:
                        line = b"* %d FETCH (ENVELOPE %s)\r\n" % (
                            seq, value.encode("utf-8", "surrogateescape"))
                    batch.append(line)
                    size += len(line)
                    if size > CHUNK:
                        yield WholeResponses(b"".join(batch))
                        batch, size = [], 0
                    continue
            info = infos.get(u)
            if info is None or seq is None:
                continue  # expunged by another session; its EXPUNGE comes later
            try:
                parts = _summary_parts(ctx, plan, u, info, envelopes, kept_lines, memo)
            except FileNotFoundError:
                continue  # expunged meanwhile (see fetch_responses)
            if u in seen_changed and not wants_flags:
                parts.append(b"FLAGS " + ctx.flags(info))
                if condstore and not wants_modseq:  # RFC 7162 3.1: with its MODSEQ
                    parts.append(b"MODSEQ (%d)" % info.modseq)
            line = b"* %d FETCH (%s)\r\n" % (seq, parts[0] if len(parts) == 1
                                                else b" ".join(parts))
            batch.append(line)
            size += len(line)
            if size > CHUNK:
                yield WholeResponses(b"".join(batch))
                batch, size = [], 0
    if batch:
        yield WholeResponses(b"".join(batch))


def _summary_parts(ctx: _FetchContext, plan: list[tuple[str, Any, Any, Any]], u: int,
                   info: Any, envelopes: dict[int, Any], kept_lines: dict[int, bytes],
                   memo: dict[bytes, Any]) -> list[bytes]:
    """The items of one row of _summary_responses: from the index values where they are,
    else from the file (FileNotFoundError when it is gone)."""
    parts = []
    for kind, label, names, item in plan:
        if kind == "envelope":
            value = envelopes.get(u)
            if value is None:
                parts.append(_fetch_slow(ctx, info, item))
            else:
                parts.append(b"ENVELOPE " + (value if isinstance(value, bytes)
                                             else value.encode("utf-8", "surrogateescape")))
        elif kind == "lines":
            value = kept_lines.get(u)
            if value is None:
                parts.append(_fetch_slow(ctx, info, item))
            else:
                data = _no_nul(summary.fields_from_lines(value, names, memo))
                parts.append(b"%s%d}\r\n%s" % (label, len(data), data))
        elif kind == "uid":
            parts.append(b"UID %d" % u)
        elif kind == "flags":
            parts.append(b"FLAGS " + ctx.flags(info))
        elif kind == "modseq":
            parts.append(b"MODSEQ (%d)" % info.modseq)
        else:
            parts.append(b"INTERNALDATE " + internal_date(info.internaldate))
    return parts


def _fetch_slow(ctx: _FetchContext, info: Any, item: Any) -> bytes:
    """One item of one message by the general path (its file read when need be)."""
    msg = _Message(ctx.session, info.uid)
    try:
        piece = _fetch_item(ctx, msg, info, item)
        return piece if isinstance(piece, bytes) else b"".join(piece)
    finally:
        msg.close()


def _fetch_item(ctx: _FetchContext, msg: _Message, info: Any, item: Any) -> bytes | Iterator[bytes]:
    kind = item.type
    u = info.uid
    if kind == "uid":
        return b"UID %d" % u
    if kind == "flags":
        return b"FLAGS " + ctx.flags(info)
    if kind == "internaldate":
        return b"INTERNALDATE " + internal_date(info.internaldate)
    if kind == "modseq":  # RFC 7162 3.1.4.2
        return b"MODSEQ (%d)" % info.modseq
    if kind == "rfc822size":
        return b"RFC822.SIZE %d" % _crlf_size(ctx, msg, info)
    if kind == "envelope":
        return b"ENVELOPE " + ctx.get(u, "envelope", lambda: mime.envelope(msg.head()[1]))
    if kind == "bodystructure":
        return b"BODYSTRUCTURE " + ctx.get(u, "bodystructure",
                                           lambda: mime.body_structure(msg.root, True))
    if kind == "body" and _is_plain_body(item):
        return b"BODY " + ctx.get(u, "body", lambda: mime.body_structure(msg.root, False))
    if kind == "body":
        names = ctx.line_names.get(id(item))
        if names is not None:  # cut from the header summary's lines
            lines = ctx.cached.get(summary.LINES_KEY, {}).get(u)
            if lines is None:
                lines = _summarize(ctx, msg, u).lines
            data = _no_nul(summary.fields_from_lines(lines, names, ctx.lines_memo))
            return b"BODY[" + _section_name(item) + b"] {%d}\r\n" % len(data) + data
        key = _cache_key(item)
        if key is not None:  # header fields: small, asked for again and again by clients
            # (_no_nul on what the index gives too: rows kept before it held NUL)
            data = _no_nul(ctx.get(u, key, lambda: mime.header_fields(
                *msg.head(), item.header.fields, bool(item.header.negate))))
            return b"BODY[" + _section_name(item) + b"] {%d}\r\n" % len(data) + data
        return _section_chunks(msg, item)
    if kind == "rfc822":
        return _labelled(b"RFC822", msg, 0, None)
    if kind == "rfc822header":
        hend, _ = mime.header_end(msg.data, 0, len(msg.data))
        return _labelled(b"RFC822.HEADER", msg, 0, hend)
    if kind == "rfc822text":
        _, body = mime.header_end(msg.data, 0, len(msg.data))
        return _labelled(b"RFC822.TEXT", msg, body, None)
    if kind in ("binary", "binarysize"):
        return _binary_item(ctx, msg, info, item)
    raise BadCommand(f"unsupported FETCH item {kind}")


def _summarize(ctx: _FetchContext, msg: _Message, uid: int) -> summary.Summary:
    """A message's header summary computed here (a few messages the header pass did not
    do: new mail, a small FETCH); its envelope and lines are kept in the index."""
    data, root = msg.head()
    hend, _ = mime.header_end(data, root.start, root.end)
    result = summary.summarize(bytes(data[root.start:hend]))
    ctx.folder.cache_put(uid, summary.ENVELOPE_KEY, result.envelope)
    ctx.folder.cache_put(uid, summary.LINES_KEY, result.lines)
    ctx.cached.setdefault(summary.ENVELOPE_KEY, {})[uid] = result.envelope
    return result


def _labelled(label: bytes, msg: _Message, start: int, end: int | None) -> Iterator[bytes]:
    data = msg.data
    end = len(data) if end is None else end
    yield label + b" {%d}\r\n" % (end - start)
    for pos in range(start, end, CHUNK):
        yield _no_nul(bytes(data[pos:min(pos + CHUNK, end)]))


def _crlf_size(ctx: _FetchContext, msg: _Message, info: Any) -> int:
    """RFC822.SIZE: octets as sent (CRLF), from the name or the index, else measured."""
    size = vsize_hint_from(ctx.folder, info, None)
    if size is not None:
        return size
    return int(ctx.get(info.uid, VSIZE_KEY, lambda: b"%d" % len(msg.data)))


def vsize_hint_from(folder: Any, info: Any, cached: Any) -> int | None:
    """The CRLF size from the file name or an index value; None if it must be measured.
    `folder` is a Folder, or its FolderView in a thread."""
    size = known_vsize(info.basename, info.size, own_name_pattern_escaped(folder.escaped_host))
    if size is not None:
        return size
    return int(cached) if cached is not None else None


# -- BINARY (RFC 3516) ------------------------------------------------------------------------

def _binary_key(item: Any) -> str:
    """Index key of a section's decoded size and NUL flag: what BINARY.SIZE answers and
    BINARY needs before it can send its literal's length."""
    return "bin:" + ".".join(str(n + 1) for n in item.part)


def _binary_section(msg: _Message, item: Any) -> tuple[int, int, bytes] | None:
    """(start, end, transfer encoding) of what BINARY[part] names (RFC 3516 4.2): the
    part's body with its Content-Transfer-Encoding (a message/rfc822 part: the whole
    encapsulated message, the spans BODY[part] has); BINARY[] is the whole message, which
    has no encoding to remove.  None for a part the message does not have."""
    if not item.part:
        return 0, len(msg.data), b"binary"
    part = mime.find_part(msg.root, [n + 1 for n in item.part])
    if part is None:
        return None
    return part.body_start, part.end, mime.transfer_encoding(part)


def _binary_refusal(ctx: _FetchContext, msg: _Message, uid: int,
                    items: list[Any]) -> Exception | None:
    """RFC 3516 4.3: NO [UNKNOWN-CTE] when a section's encoding cannot be removed.  A
    section whose facts are in the index was decoded before: no need to look again
    (prepare_binary has looked at every other one, unless its file changed since)."""
    for item in items:
        if ctx.cached.get(_binary_key(item), {}).get(uid) is not None:
            continue
        section = _binary_section(msg, item)
        if section is not None and mime.decoder_for(section[2]) is None:
            return unknown_cte(tuple(n + 1 for n in item.part))
    return None


def unknown_cte(numbers: tuple[int, ...]) -> Exception:
    """RFC 3516 4.3 NO [UNKNOWN-CTE] for the section with these part numbers."""
    from mailserver.imap.server import CommandFailed

    name = b".".join(b"%d" % n for n in numbers)
    return CommandFailed(b"[UNKNOWN-CTE] Cannot decode the transfer encoding of section "
                         + (name or b"[]"))


def prepare_binary(session: "IMAPSession", uids: list[int],
                   items: list[Any]) -> Deferred[Exception | None]:
    """Before a FETCH with BINARY items streams (and before it sets \\Seen): the decoded
    size and NUL flag of every section not in the index yet, found by decoding it in a
    thread (a large base64 part takes tens of milliseconds) and then kept in the index;
    fires with the UNKNOWN-CTE refusal when a section cannot be decoded, else None."""
    binary = [i for i in items if i.type in ("binary", "binarysize")]
    if not binary:
        return succeed(None)
    folder = session.folder
    wanted = {(_binary_key(i), tuple(n + 1 for n in i.part)) for i in binary}
    cached = {key: folder.cache_get_many(uids, key) for key, _ in wanted}
    todo = []
    for u in uids:
        missing = sorted((key, numbers) for key, numbers in wanted if cached[key].get(u) is None)
        if missing and folder.by_uid(u) is not None:
            todo.append((u, str(folder.message_path(u)), missing))
    if not todo:
        return succeed(None)

    def keep(result: tuple[dict[tuple[int, str], bytes], tuple[int, ...] | None]
             ) -> Exception | None:
        facts, refused = result
        for (u, key), value in facts.items():
            folder.cache_put(u, key, value)
        return None if refused is None else unknown_cte(refused)

    return deferToThread(mime.binary_facts, todo).addCallback(keep)


def _binary_item(ctx: _FetchContext, msg: _Message, info: Any, item: Any) -> bytes | Iterator[bytes]:
    """BINARY[part]<partial> or BINARY.SIZE[part] (RFC 3516 4.2, 4.3)."""
    numbers = b".".join(b"%d" % (n + 1) for n in item.part)

    def facts() -> bytes:  # one decoding pass; kept in the index for the next time
        section = _binary_section(msg, item)
        if section is None:
            return b"0 0"
        size, nul = mime.decoded_facts(msg.data, *section)
        return b"%d %d" % (size, nul)

    size_text, nul_text = ctx.get(info.uid, _binary_key(item), facts).split()
    size = int(size_text)
    if item.type == "binarysize":
        return b"BINARY.SIZE[" + numbers + b"] %d" % size
    return _binary_chunks(msg, item, numbers, size, nul_text == b"1")


def _binary_chunks(msg: _Message, item: Any, numbers: bytes, size: int,
                   nul: bool) -> Iterator[bytes]:
    """The decoded section as a literal, streamed: decoded a piece at a time, so a large
    base64 attachment never sits in memory whole.  A literal8 (~{n}) when the decoded
    section holds a NUL, else a plain literal (RFC 3516 4.3)."""
    name = b"BINARY[" + numbers + b"]"
    begin, stop = 0, size
    if item.partial_begin is not None:  # offsets in the decoded data (RFC 3516 4.2)
        name += b"<%d>" % item.partial_begin
        begin = min(item.partial_begin, size)
        stop = min(begin + item.partial_length, size)
    yield name + (b" ~{%d}\r\n" if nul else b" {%d}\r\n") % (stop - begin)
    if stop <= begin:
        return
    section = _binary_section(msg, item)
    if section is None:
        return
    pos = 0
    sent = 0
    for piece in mime.decoded_chunks(msg.data, *section):
        piece_end = pos + len(piece)
        if piece_end > begin:
            chunk = piece[max(begin - pos, 0):stop - pos]
            sent += len(chunk)
            yield chunk
        pos = piece_end
        if pos >= stop:
            break
    if sent != stop - begin:  # the file changed under a cached size: keep the framing
        yield b"\0" * (stop - begin - sent) if nul else b" " * (stop - begin - sent)
