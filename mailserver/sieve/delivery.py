"""Sieve at local delivery: which scripts run for a mailbox, and carrying out what they say.

One `SieveDelivery` per server (built by MailServer).  For every message that reaches
local mailboxes while a delivery filter plugin is configured, a global script exists or a
recipient has an active script (`wanted`, one lstat per mailbox), delivery hands it
here whole, and for each mailbox:

1. the delivery filter plugins run once per message (mailserver.filters): a reject or a
   defer refuses the message, added fields go in front of it, a folder becomes the
   implicit keep's folder;
2. the chain [sieve] before..., the user's active script, [sieve] after... is evaluated
   (Pigeonhole's sieve_before / sieve_after) with the envelope: in the reactor for a
   message held in memory, in a thread for one in a file.  Scripts are compiled once and
   kept while the file's stat says it is unchanged; the global ones at start.  A run-time
   error (a missing include, the CPU limit) is the implicit keep and one log line;
3. the stores are made: grouped by (folder info, header) over every mailbox, each group
   one file hard-linked into its folders, durable before the caller answers;
4. then, for the mailboxes stored without error: redirects (a copy queued with the
   original envelope sender and an X-Sieve-Redirected-From mark: a message already marked
   by this user is not redirected again), rejection messages (RFC 5429, not to a null
   sender), and vacation answers (RFC 5230, once per sender and period, remembered in
   state_dir across restarts).  A redirect or rejection message that cannot be queued
   falls back to the keep; a vacation answer that cannot be sent is only logged.

A reject or ereject when the message has a single mailbox and the caller can still refuse
it (the MX at the end of DATA) is a `550 5.7.1` reply instead, with nothing stored.

fileinto of a folder that does not exist, without :create, stores into INBOX (Pigeonhole's
behaviour without lda_mailbox_autocreate); a name that is no valid folder (".." levels,
"/", NUL, over-long) never leaves the Maildir: INBOX too, and a log line.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.logger import Logger

from mailserver.config import ConfigError
from mailserver.maildir.names import INBOX
from mailserver.sieve import reject as rejection
from mailserver.sieve.actions import Keep, Result
from mailserver.sieve.parser import parse_mailbox
from mailserver.sieve import scripts as stored
from mailserver.sieve.interpreter import (Envelope, Limits, SieveIncludeBroken,
                                          SieveIncludeError, evaluate)
from mailserver.sieve.message import Message
from mailserver.sieve.parser import Script, SieveSyntaxError, parse
from mailserver.sieve.plan import (INBOX_DEFAULT, REDIRECT_MARK, DefaultFolder, Plan, Store,
                                   check_folder_name, has_keywords, info_for, plan,
                                   prepare_folder, system_letters)
from mailserver.sieve.vacation import MEMORY_FILE, VacationMemory, build_reply, should_reply
from mailserver.smtp.replies import Reply, SMTPReplyError

if TYPE_CHECKING:
    from mailserver.config import SieveConfig
    from mailserver.maildir import MaildirStore

log = Logger()

SPOOL_DIR = "sieve-spool"        # under state_dir: messages held while their scripts run
MEMORY_MESSAGE = 64 * 1024       # a queued message up to this size is read into memory
MAX_HEADER_READ = 1024 * 1024    # bytes searched for the end of a queued message's header
MAX_INCLUDED = 64                # scripts one chain may include, all levels together
COPY_CHUNK = 256 * 1024
REACTOR_CPU_TIME = 0.02          # seconds a script may run in the reactor before a thread
_DROP_FOR_COPY = (b"return-path:", b"delivered-to:")


@dataclass(frozen=True, slots=True)
class Target:
    """One local mailbox the message is delivered to."""

    address: str        # the mailbox's own address
    path: Path          # its Maildir
    rcpt: str = ""      # the RCPT TO that led to it (an alias, or the address itself)


@dataclass(slots=True)
class Incoming:
    """The message, held whole, with what delivery knows about it.

    The copy stored in a mailbox is `prefix` + `trace` + `header` + the rest; a copy that
    goes on (redirect) leaves `prefix` (Return-Path, Delivered-To) out.  The rest (the
    blank line and the body) is `rest` when in memory, else the bytes of the file `path`
    from `rest_offset` on (the file starts with `header` then).
    """

    queue_id: str
    sender: str
    header: bytes
    rest: bytes | None = None
    path: Path | None = None
    rest_offset: int = 0
    prefix: bytes = b""
    trace: bytes = b""
    auth: str = ""
    client_ip: str = ""
    helo: str = ""
    checks: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    smtp_time: bool = False        # a refusal can still be the SMTP reply
    default: DefaultFolder = INBOX_DEFAULT
    # the parsed message in memory, shared by the mailboxes evaluated in the reactor
    _parsed: Message | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def head(self) -> bytes:
        """The header block a script sees and a mailbox copy starts with."""
        return self.prefix + self.trace + self.header

    @property
    def rest_size(self) -> int:
        if self.rest is not None:
            return len(self.rest)
        assert self.path is not None
        return max(0, os.path.getsize(self.path) - self.rest_offset)

    def rest_chunks(self) -> Iterator[bytes]:
        """The blank line and the body (blocking reads when in a file)."""
        if self.rest is not None:
            yield self.rest
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(self.rest_offset)
            while chunk := f.read(COPY_CHUNK):
                yield chunk

    def own_message(self, head: bytes) -> Message:
        """A Message of the in-memory message that nothing else shares (its parse caches
        fill as it is read): for an evaluation in a thread while the reactor reads the
        shared one."""
        assert self.rest is not None
        body = self.rest[2:] if self.rest.startswith(b"\r\n") else self.rest
        return Message(head, body, size=len(head) + len(self.rest))

    def message(self, head: bytes) -> Message:
        """The message as the interpreter reads it: one object for every mailbox when in
        memory (its fields and body parsed once; a script's edits stay in its own
        HeaderView), a fresh one per evaluation thread when in a file."""
        if self.rest is not None:
            parsed = self._parsed
            if parsed is None or parsed.header != head:
                parsed = self._parsed = self.own_message(head)
            return parsed
        assert self.path is not None
        total = os.path.getsize(self.path)
        offset = self.rest_offset
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.read(2) == b"\r\n":
                offset += 2
        return Message(head, self.path, body_offset=min(offset, total),
                       size=len(head) + total - self.rest_offset)


@dataclass(slots=True)
class UserOutcome:
    """What became of the message for one mailbox: `ok` when everything it had to be
    stored as is durable (or nothing had to be); `path`: one stored file."""

    target: Target
    ok: bool
    error: str = ""
    path: Path | None = None
    rejected: bool = False


def split_header(data: bytes, limit: int = MAX_HEADER_READ) -> int:
    """Where the blank line after the header section starts in `data` (the whole
    message's start, up to `limit` bytes); len(data) when there is none within it."""
    if data.startswith(b"\r\n"):
        return 0
    end = data.find(b"\r\n\r\n", 0, limit)
    return end + 2 if end >= 0 else min(len(data), limit)


def read_queued(path: Path) -> tuple[bytes, bytes | None, int]:
    """Thread: (header, rest in memory or None, rest offset) of a queued message file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= MEMORY_MESSAGE:
            data = f.read()
            end = split_header(data)
            return data[:end], data[end:], end
        start = f.read(MAX_HEADER_READ)
    end = split_header(start)
    return start[:end], None, end


def _drop_delivery_fields(head: bytes) -> bytes:
    """A header block without the Return-Path / Delivered-To fields at its top (they
    belong to a final delivery, not to a copy sent on)."""
    while head[:14].lower().startswith(_DROP_FOR_COPY[0]) or \
            head[:13].lower().startswith(_DROP_FOR_COPY[1]):
        end = head.find(b"\r\n")
        if end < 0:
            return b""
        head = head[end + 2:]
        while head[:1] in (b" ", b"\t"):   # its continuation lines
            end = head.find(b"\r\n")
            head = b"" if end < 0 else head[end + 2:]
    return head


def _compile_file(path: Path, name: str, max_size: int) -> Script:
    """Thread: read and parse one script file (SieveSyntaxError, OSError, ValueError)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_size + 1)
    if len(data) > max_size:
        raise ValueError(f"larger than {max_size} bytes")
    return parse(data, name, max_size=max_size)


class PassingError(str):
    """Why a script cannot be used this time only (the file could not be read: EMFILE,
    EIO...): not remembered, so the next message tries again, where a syntax error is
    kept until the file changes."""


def _stat_key(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Compiled:
    """Scripts compiled from files, each kept while its file's stat key holds."""

    def __init__(self, max_size: int, max_entries: int = 4096) -> None:
        self.max_size = max_size
        self.max_entries = max_entries
        self._entries: dict[Path, tuple[tuple[int, ...], Script | None, str]] = {}
        # a file being compiled: its stat key and who else waits for it
        self._compiling: dict[Path, tuple[tuple[int, ...], list[defer.Deferred]]] = {}

    def get(self, path: Path, key: tuple[int, ...] | None, name: str
            ) -> defer.Deferred | tuple[Script | None, str]:
        """(script or None, error) at once when known, else a Deferred of it; messages
        that arrive together while the file is compiled wait for that one compilation."""
        if key is None:
            self._entries.pop(path, None)
            return None, "not found"
        known = self._entries.get(path)
        if known is not None and known[0] == key:
            return known[1], known[2]
        compiling = self._compiling.get(path)
        if compiling is not None and compiling[0] == key:
            waiter: defer.Deferred = defer.Deferred()
            compiling[1].append(waiter)
            return waiter
        waiters: list[defer.Deferred] = []
        self._compiling[path] = (key, waiters)
        d = threads.deferToThread(_compile_file, path, name, self.max_size)

        def done(script: Script) -> tuple[Script | None, str]:
            return finished(script, "")

        def failed(f: Any) -> tuple[Script | None, str]:
            error = (f"line {f.value.line}: {f.value.reason}" if f.check(SieveSyntaxError)
                     else f.getErrorMessage())
            if f.check(OSError):
                error = PassingError(error)
            log.warn("sieve: {path} cannot be used: {error}", path=str(path), error=error)
            return finished(None, error)

        def finished(script: Script | None, error: str) -> tuple[Script | None, str]:
            if not isinstance(error, PassingError):
                self._remember(path, (key, script, error))
            if self._compiling.get(path, (None,))[0] == key:
                del self._compiling[path]
            for w in waiters:
                w.callback((script, error))
            return script, error
        return d.addCallbacks(done, failed)

    def _remember(self, path: Path, entry: tuple[tuple[int, ...], Script | None, str]) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[path] = entry


def compile_globals(config: "SieveConfig") -> tuple[list[Script], list[Script]]:
    """[sieve] before and after, compiled (at start, and by mailserver-admin check): one
    that does not compile is a ConfigError naming it, since a global filter silently
    missing would deliver everything unfiltered."""
    def compiled(key: str, path: str) -> Script:
        try:
            return _compile_file(Path(path), Path(path).stem, config.max_script_size)
        except SieveSyntaxError as e:
            raise ConfigError(key, f"{path}: line {e.line}: {e.reason}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(key, f"{path}: {e}") from None
    return ([compiled(f"sieve.before[{i}]", p) for i, p in enumerate(config.before)],
            [compiled(f"sieve.after[{i}]", p) for i, p in enumerate(config.after)])


def _now(x: Any) -> defer.Deferred:
    return x if isinstance(x, defer.Deferred) else defer.succeed(x)


def _then(x: Any, f: Any, *args: Any) -> Any:
    """f(x, *args) now, or once the Deferred x fires: steps that have what they need go
    on without a Deferred of their own."""
    if isinstance(x, defer.Deferred):
        return x.addCallback(f, *args)
    return f(x, *args)


def _gather(values: list[Any]) -> Any:
    """The list of values, or a Deferred of it when some are Deferreds (first error)."""
    for v in values:
        if isinstance(v, defer.Deferred):
            break
    else:
        return values
    return defer.gatherResults([_now(v) for v in values], consumeErrors=True).addErrback(
        _first_error)


def _with_header(place: tuple[Path, str], header: bytes | None) -> tuple[Path, str, bytes | None]:
    return place[0], place[1], header


def _kept_unchanged(results: list[Result | None], default: DefaultFolder) -> bool:
    """Every mailbox only keeps the message, into INBOX without flags, its header
    unchanged (no script, or scripts that did nothing else): stored as without scripts."""
    if default.name != INBOX or default.flags:
        return False
    for r in results:
        if r is not None and (not _just_kept(r, default) or r.actions[0].header is not None):
            return False
    return True


def _just_kept(result: Result, default: DefaultFolder) -> bool:
    """Only the implicit keep into INBOX happened: nothing the log needs to say."""
    return (not result.error and default.name == INBOX and len(result.actions) == 1
            and isinstance(result.actions[0], Keep) and result.actions[0].implicit
            and not result.actions[0].flags)


class SieveDelivery:
    """The server's Sieve: scripts, evaluation, and the actions carried out."""

    def __init__(self, config: "SieveConfig", store: "MaildirStore", accounts: Any,
                 hostname: str, state_dir: Path, filters: Sequence[Any] = (),
                 filter_timeout: float = 10.0, queue: Any = None) -> None:
        self.config = config
        self.store = store
        self.accounts = accounts
        self.hostname = hostname
        self.queue = queue              # the outbound queue, set once it exists
        self.filters = list(filters)
        self.filter_timeout = filter_timeout
        self.enabled = config.enabled
        self.spool_dir = Path(state_dir) / SPOOL_DIR
        self.limits = Limits(max_actions=config.max_actions,
                             max_redirects=config.max_redirects,
                             max_include_depth=config.max_include_depth,
                             max_cpu_time=config.max_cpu_time,
                             vacation_min_period=config.vacation_min_period,
                             vacation_max_period=config.vacation_max_period)
        self.before, self.after = compile_globals(config) if self.enabled else ([], [])
        self.global_dir = Path(config.global_dir) if config.global_dir else None
        self.memory = VacationMemory(Path(state_dir) / MEMORY_FILE)
        self._compiled = _Compiled(config.max_script_size)
        # user Maildir -> (stat key of .dovecot.sieve, script, why it cannot be used)
        self._active: dict[Path, tuple[tuple[int, ...], Script | None, str]] = {}
        self._zone: tuple[float, Any] = (0.0, None)

    # -- which messages come here ----------------------------------------------------------

    def wanted(self, paths: Iterable[Path]) -> bool:
        """True when a message for these Maildirs must come here: a filter plugin or a
        global script is configured, or one of them has an active script."""
        if self.filters:
            return True
        if not self.enabled:
            return False
        if self.before or self.after:
            return True
        # One lstat per mailbox: a broken link is found out (and ignored) later.
        return any(os.path.lexists(f"{p}/{stored.ACTIVE_LINK}") for p in paths)

    def close(self) -> None:
        self.memory.close()

    # -- the whole message -------------------------------------------------------------------

    def deliver(self, msg: Incoming, targets: Sequence[Target]) -> defer.Deferred:
        """Filter, evaluate and store `msg` for `targets`; fires with a UserOutcome per
        target.  SMTPReplyError: refused as a whole (a plugin's reject or defer, a
        script's reject at SMTP time); nothing was stored then.

        Each step goes on at once when it has everything (compiled scripts, a message in
        memory, folders that need no thread): the common delivery costs no more than its
        evaluation and the store's own commit."""
        if self.filters:
            return self._filtered(msg, targets).addCallback(self._decide, targets)
        return defer.maybeDeferred(self._decide, msg, targets)

    def _decide(self, msg: Incoming, targets: Sequence[Target]) -> Any:
        head = msg.head
        results = _gather([self._evaluate(msg, head, t) for t in targets])
        return _then(results, self._planned, msg, head, targets)

    def _planned(self, results: list[Result | None], msg: Incoming, head: bytes,
                 targets: Sequence[Target]) -> Any:
        msg._parsed = None          # every evaluation is done: the parse goes now
        if _kept_unchanged(results, msg.default):
            return self._keep_unchanged(results, msg, head, targets)
        plans = self._plans(results, msg, head, targets)
        if msg.smtp_time and len(targets) == 1 and plans[0].reject is not None:
            # RFC 5429 2.1.1 (ereject) and 2.1 (reject may refuse at SMTP time too).
            text = rejection.reply_text(plans[0].reject.reason)
            self._log(msg, targets[0], plans[0], "refused at SMTP time")
            raise SMTPReplyError(Reply(550, "5.7.1", text, reason="sieve"))
        stored = self._store_all(msg, targets, plans)
        return _then(stored, self._after_stores, msg, targets, plans)

    @staticmethod
    def _plans(results: list[Result | None], msg: Incoming, head: bytes,
               targets: Sequence[Target]) -> list[Plan]:
        plans = [plan(result or _IMPLICIT_KEEP, head, t.address, t.rcpt, msg.default)
                 for t, result in zip(targets, results)]
        for p, result in zip(plans, results):
            p.quiet = result is None or _just_kept(result, msg.default)
        return plans

    def _keep_unchanged(self, results: list[Result | None], msg: Incoming, head: bytes,
                        targets: Sequence[Target]) -> defer.Deferred:
        """The message kept as it came into every INBOX: the one file that plan() and
        _store_all() would make for it (info "", the header unchanged), without building
        them; the plans only for the log when a store failed."""
        return self._write_file(msg, "", head, [t.path for t in targets]).addBoth(
            self._kept, results, msg, head, targets)

    def _kept(self, done: Any, results: list[Result | None], msg: Incoming, head: bytes,
              targets: Sequence[Target]) -> Any:
        """The outcomes of _keep_unchanged's file (as _written makes them)."""
        if isinstance(done, Failure):
            error = done.getErrorMessage()
            outcomes = [UserOutcome(t, False, error) for t in targets]
        else:
            by_dir = {r.target: r for r in done}
            outcomes = []
            for t in targets:
                r = by_dir.get(t.path)
                if r is not None and r.ok:
                    outcomes.append(UserOutcome(t, True, path=r.path))
                else:
                    outcomes.append(UserOutcome(t, False, str(r.error) if r is not None else "lost"))
        for o in outcomes:
            if not o.ok:
                return self._after_stores(outcomes, msg, targets,
                                          self._plans(results, msg, head, targets))
        return outcomes

    def _after_stores(self, outcomes: list[UserOutcome], msg: Incoming,
                      targets: Sequence[Target], plans: list[Plan]) -> Any:
        def done(_: Any = None) -> list[UserOutcome]:
            for target, p, outcome in zip(targets, plans, outcomes):
                if not (p.quiet and outcome.ok and not p.notes):
                    self._log(msg, target, p,
                              "" if outcome.ok else f"not stored: {outcome.error}")
            return outcomes
        if any(p.redirects or p.reject is not None or p.vacation is not None for p in plans):
            return self._side_actions(msg, targets, plans, outcomes).addCallback(done)
        return done()

    def _log(self, msg: Incoming, target: Target, p: Plan, extra: str) -> None:
        notes = "; ".join(p.notes + ([extra] if extra else []))
        log.info("sieve {qid} <{user}>: {actions}{notes}", qid=msg.queue_id,
                 user=target.address, actions=p.summary, notes=f" ({notes})" if notes else "")

    # -- delivery filter plugins -----------------------------------------------------------

    @defer.inlineCallbacks
    def _filtered(self, msg: Incoming, targets: Sequence[Target]):
        from mailserver.filters import DeliveryFacts, format_headers, run_filters

        def open_body() -> Any:
            import io
            if msg.rest is not None:
                return io.BytesIO(msg.rest[2:] if msg.rest.startswith(b"\r\n") else msg.rest)
            f = open(msg.path, "rb")  # type: ignore[arg-type]
            f.seek(msg.rest_offset)
            if f.read(2) != b"\r\n":
                f.seek(msg.rest_offset)
            return f

        facts = DeliveryFacts(
            queue_id=msg.queue_id, sender=msg.sender,
            recipients=tuple(dict.fromkeys(t.address for t in targets)),
            client_ip=msg.client_ip, helo=msg.helo, auth_user=msg.auth, header=msg.header,
            checks=MappingProxyType(dict(msg.checks)),
            size=len(msg.header) + (len(msg.rest) if msg.rest is not None else msg.rest_size),
            open_body=open_body)
        decision = yield run_filters(self.filters, facts, self.filter_timeout)
        if decision.action == "reject":
            raise SMTPReplyError(Reply(550, "5.7.1", decision.reply or "Message refused",
                                       reason="filter"))
        if decision.action == "defer":
            raise SMTPReplyError(Reply(451, "4.7.1", decision.reply or "Try again later",
                                       reason="filter"))
        changes: dict[str, Any] = {}
        if decision.add_headers:
            changes["trace"] = format_headers(decision.add_headers) + msg.trace
        if decision.folder and check_folder_name(decision.folder) is None:
            changes["default"] = DefaultFolder(decision.folder, msg.default.flags
                                               if decision.folder == msg.default.name else ())
        return replace(msg, **changes) if changes else msg

    # -- scripts -----------------------------------------------------------------------------

    def _user_script(self, target: Target) -> defer.Deferred | tuple[Script | None, str]:
        """The user's active script and why it cannot be used ("" when it can), from
        memory while a stat(2) of .dovecot.sieve (through the link) shows the same file
        unchanged; else looked up (scripts.script_stat: only a file in the user's
        sieve/ counts) and compiled in a thread."""
        if not self.enabled:
            return None, ""
        try:
            st = os.stat(f"{target.path}/{stored.ACTIVE_LINK}")
        except OSError:
            self._active.pop(target.path, None)
            return None, ""
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._active.get(target.path)
        if known is not None and known[0] == key:
            return known[1], known[2]

        def found(active: Any) -> Any:
            if active is None:
                return None, ""
            return self._compiled.get(active.path, active.key, active.name or "dovecot")

        def remember(entry: tuple[Script | None, str]) -> tuple[Script | None, str]:
            if isinstance(entry[1], PassingError):
                return entry
            if len(self._active) >= 4096:
                self._active.clear()
            self._active[target.path] = (key, *entry)
            return entry

        def failed(f: Any) -> tuple[Script | None, str]:
            # sieve/ could not be read this time: tried again with the next message
            return None, PassingError(f.getErrorMessage())
        d = threads.deferToThread(stored.script_stat, target.path)
        return d.addCallback(found).addErrback(failed).addCallback(remember)

    def _include_path(self, target: Target, name: str, is_global: bool) -> Path | None:
        try:
            stored.check_name(name)
        except stored.ScriptError:
            return None
        if is_global:
            return self.global_dir / (name + stored.SUFFIX) if self.global_dir else None
        return target.path / stored.SIEVE_DIR / (name + stored.SUFFIX)

    @defer.inlineCallbacks
    def _includes(self, target: Target, roots: list[Script]):
        """Every script the chain includes, compiled (those missing left out: the
        interpreter's run-time error, RFC 6609 3.2, unless :optional); one that is there
        but cannot be used, as the reason why (a run-time error even when :optional)."""
        found: dict[tuple[str, bool], Script | str] = {}
        todo = [inc for s in roots for inc in s.includes]
        while todo and len(found) < MAX_INCLUDED:
            name, is_global = todo.pop()
            if (name, is_global) in found:
                continue
            path = self._include_path(target, name, is_global)
            if path is None:
                continue
            script, error = yield _now(self._compiled.get(path, _stat_key(path), name))
            if script is not None:
                found[(name, is_global)] = script
                todo.extend(script.includes)
            elif error != "not found":
                found[(name, is_global)] = str(error) or "cannot be used"
        return found

    def _evaluate(self, msg: Incoming, head: bytes, target: Target) -> Any:
        """The Result for one mailbox (None: it has no script to run), or a Deferred."""
        found = self._user_script(target)
        if isinstance(found, defer.Deferred):
            return found.addCallback(self._evaluate_with, msg, head, target)
        return self._evaluate_with(found, msg, head, target)

    def _evaluate_with(self, found: tuple[Script | None, str], msg: Incoming, head: bytes,
                       target: Target) -> Any:
        user, error = found
        if self.before or self.after:
            chain = [*self.before, *([user] if user is not None else []), *self.after]
        elif user is not None:
            chain = [user]
        elif not error:
            return None   # no script for this mailbox: the keep, nothing to log
        else:
            return Result([Keep(implicit=True)], error=f"script cannot be used: {error}")
        for s in chain:
            if s.includes:
                return self._includes(target, chain).addCallback(
                    self._run_chain, chain, error if user is None else "", msg, head, target)
        return self._run_chain(None, chain, error if user is None else "", msg, head, target)

    def _run_chain(self, includes: dict[tuple[str, bool], Script | str] | None,
                   chain: list[Script],
                   error: str, msg: Incoming, head: bytes, target: Target) -> Any:
        """`includes`: None when no script of the chain includes any (then the loader and,
        unless a script requires "mailbox", the folder check are never asked)."""
        load = mailbox_exists = None
        if includes is not None:
            def load(name: str, is_global: bool) -> Script:
                script = includes.get((name, is_global))
                if script is None:
                    raise SieveIncludeError(f'included script "{name}" not found')
                if isinstance(script, str):
                    raise SieveIncludeBroken(f'included script "{name}" cannot be used: '
                                             f'{script}')
                return script
        if includes is not None or _requires(chain, "mailbox"):
            def mailbox_exists(name: str) -> bool:   # RFC 5490 3.1 (a stat)
                if check_folder_name(name) is not None:
                    return False
                return os.path.isdir(self.store.folder_dir(target.path, name))

        envelope = Envelope(msg.sender, target.rcpt or target.address, target.address, msg.auth)
        # The default folder's own flags ($Junk) go to its keep only (plan), not to the
        # imap4flags variable a fileinto would also use.
        # The clock only for the tests that read it (date, currentdate: RFC 5260).
        now = self._clock() if includes is not None or _requires(chain, "date") else None
        if msg.rest is not None:
            # In memory: evaluated here, in the reactor, for REACTOR_CPU_TIME at most (a
            # short script takes a few µs); a script that needs longer is evaluated
            # again in a thread with the whole limit.  Given its full 2 s here, one
            # user's script held every other session 7.6 s over five messages.
            quick = self.limits if self.limits.max_cpu_time <= REACTOR_CPU_TIME else \
                replace(self.limits, max_cpu_time=REACTOR_CPU_TIME)
            result = _run(chain, msg.message(head), envelope, quick, load, mailbox_exists,
                          now)
            if not (result.out_of_time and quick is not self.limits):
                return _noted(result, error)
            own = msg.own_message(head)   # the shared one stays the reactor's
            return threads.deferToThread(
                lambda: _run(chain, own, envelope, self.limits, load, mailbox_exists,
                             now)).addCallback(_noted, error)
        return threads.deferToThread(
            lambda: _run(chain, msg.message(head), envelope, self.limits, load,
                         mailbox_exists, now)).addCallback(_noted, error)

    def _clock(self) -> datetime:
        """The time for currentdate and date tests, in the local zone; the zone is looked
        up once a minute (a lookup per message costs more than a short script)."""
        now = time.time()
        checked, zone = self._zone
        if zone is None or now - checked > 60:
            zone = datetime.now().astimezone().tzinfo
            self._zone = (now, zone)
        return datetime.fromtimestamp(now, zone)

    # -- stores ------------------------------------------------------------------------------

    def _store_all(self, msg: Incoming, targets: Sequence[Target], plans: list[Plan]) -> Any:
        """Every store of every mailbox, one file per (info, header) group; the
        UserOutcomes, or a Deferred of them."""
        outcomes = [UserOutcome(t, True, rejected=p.reject is not None)
                    for t, p in zip(targets, plans)]
        places = _gather([self._places(t, p) for t, p in zip(targets, plans)])
        return _then(places, self._write_all, msg, outcomes)

    def _write_all(self, places: list[list[tuple[Path, str, bytes | None]]], msg: Incoming,
                   outcomes: list[UserOutcome]) -> Any:
        groups: dict[tuple[str, bytes | None], list[tuple[Path, int]]] = {}
        for i, user_places in enumerate(places):
            for folder_path, info, header in user_places:
                groups.setdefault((info, header), []).append((folder_path, i))
        if not groups:
            return outcomes
        jobs = [self._write_group(msg, info, header, [p for p, _ in members])
                for (info, header), members in groups.items()]
        if len(jobs) == 1:
            d = jobs[0].addCallbacks(lambda v: [(True, v)], lambda f: [(False, f)])
        else:
            d = defer.DeferredList(jobs, consumeErrors=True)
        return d.addCallback(self._written, list(groups.values()), outcomes)

    @staticmethod
    def _written(done: list[tuple[bool, Any]], members_of: list[list[tuple[Path, int]]],
                 outcomes: list[UserOutcome]) -> list[UserOutcome]:
        for (ok, value), members in zip(done, members_of):
            if not ok:
                value = [(p, False, None, value.getErrorMessage()) for p, _ in members]
            by_target = {p: r for p, *r in value}
            for folder_path, i in members:
                stored_ok, path, error = by_target.get(folder_path, (False, None, "lost"))
                out = outcomes[i]
                if stored_ok:
                    out.path = out.path or path
                else:
                    out.ok = False
                    out.error = out.error or str(error)
        return outcomes

    def _places(self, target: Target, p: Plan) -> Any:
        """(folder directory, info, header) of each store of one user."""
        return _gather([_then(self._place(target, s, p), _with_header, s.header)
                        for s in p.stores])

    def _place(self, target: Target, s: Store, p: Plan) -> Any:
        """The folder directory and ":2,..." info for one store (or a Deferred of it);
        INBOX when the folder is missing (and not to be made) or cannot be prepared."""
        if s.folder == INBOX and not has_keywords(s.flags):
            return target.path, info_for(system_letters(s.flags))
        if s.folder != INBOX and not has_keywords(s.flags) and not s.create:
            try:
                path = self.store.folder_dir(target.path, s.folder)
            except ValueError as e:   # not expected: the plan checked the name
                p.notes.append(f"folder {s.folder!r}: {e}; stored in INBOX")
                return target.path, info_for(system_letters(s.flags))
            if os.path.isdir(path):
                return path, info_for(system_letters(s.flags))
            p.notes.append(f"folder {s.folder!r} does not exist; stored in INBOX")
            return target.path, info_for(system_letters(s.flags))
        create = self.store.account(target.path).create_folder
        d = threads.deferToThread(prepare_folder, target.path, s.folder, tuple(s.flags),
                                  s.create, create)

        def prepared(place: tuple[Path, str] | None) -> Any:
            if place is not None:
                return place
            p.notes.append(f"folder {s.folder!r} does not exist; stored in INBOX")
            return self._place(target, replace(s, folder=INBOX, create=False), p)

        def failed(f: Any) -> Any:
            p.notes.append(f"folder {s.folder!r} cannot be used ({f.getErrorMessage()}); "
                           "stored in INBOX")
            if s.folder == INBOX:
                return (target.path, info_for(system_letters(s.flags)))
            return self._place(target, replace(s, folder=INBOX, create=False), p)
        return d.addCallbacks(prepared, failed)

    def _write_group(self, msg: Incoming, info: str, header: bytes | None,
                     dirs: list[Path]) -> defer.Deferred:
        """One stored file for `dirs`; fires with (dir, ok, path, error) per directory."""
        return self._write_file(msg, info, msg.head if header is None else header,
                                dirs).addCallback(_result_tuples)

    def _write_file(self, msg: Incoming, info: str, head: bytes,
                    dirs: list[Path]) -> defer.Deferred:
        """One stored file for `dirs`; fires with the store's DeliveryResults."""
        if msg.rest is not None:
            try:
                delivery = self.store.begin_delivery(dirs, info=info)
                delivery.write(head)
                delivery.write(msg.rest)
            except (OSError, ValueError) as e:
                return defer.fail(e)
            d = delivery.commit()
        else:
            def write() -> Any:
                delivery = self.store.begin_delivery(dirs, info=info)
                try:
                    delivery.write(head)
                    for chunk in msg.rest_chunks():
                        delivery.write(chunk)
                except BaseException:
                    delivery.abort()
                    raise
                return delivery
            d = threads.deferToThread(write).addCallback(lambda delivery: delivery.commit())
        return d

    # -- what happens after the stores -------------------------------------------------------

    @defer.inlineCallbacks
    def _side_actions(self, msg: Incoming, targets: Sequence[Target], plans: list[Plan],
                      outcomes: list[UserOutcome]):
        jobs = []
        for t, p, out in zip(targets, plans, outcomes):
            if out.ok:
                jobs.append(self._queued_actions(msg, t, p, out))
        if jobs:
            yield defer.DeferredList(jobs, consumeErrors=True)
        jobs = [self._vacation(msg, t, p) for t, p, out in zip(targets, plans, outcomes)
                if out.ok and p.vacation is not None]
        if jobs:
            yield defer.DeferredList(jobs, consumeErrors=True)

    @defer.inlineCallbacks
    def _queued_actions(self, msg: Incoming, t: Target, p: Plan, out: UserOutcome):
        """Redirects and the rejection message; one that cannot be queued makes the
        keep happen instead, so the message is never lost."""
        failed = False
        for r in p.redirects:
            try:
                yield self._redirect(msg, t, r)
            except Exception as e:
                p.notes.append(f"redirect to <{r.address}> failed ({e}); kept")
                failed = True
        if p.reject is not None:
            if not msg.sender:
                p.notes.append("no rejection message to a null sender")
            else:
                data = rejection.build_rejection(p.reject.reason, msg.head, msg.sender,
                                                 t.address, t.rcpt, self.hostname)
                try:
                    yield self._generated(msg.sender, data)
                    p.notes.append(f"rejection message queued to <{msg.sender}>")
                except Exception as e:
                    p.notes.append(f"rejection message failed ({e}); kept")
                    failed = True
        if failed and not p.stores:
            keep = Plan(stores=[Store(msg.default.name, msg.default.flags, None,
                                      msg.default.create, True)])
            outcome = (yield _now(self._store_all(msg, [t], [keep])))[0]
            p.notes.extend(keep.notes)
            if not outcome.ok:
                out.ok, out.error = False, outcome.error
            out.path = out.path or outcome.path

    def _generated(self, recipient: str, data: bytes) -> defer.Deferred:
        if self.queue is None:
            return defer.fail(RuntimeError("no outbound queue"))
        return self.queue.submit_generated("", recipient, data)

    def _redirect(self, msg: Incoming, t: Target, r: Any) -> defer.Deferred:
        """RFC 5228 4.2: a copy through the queue with the original envelope sender (null
        stays null), marked with X-Sieve-Redirected-From for loop detection."""
        from mailserver.addresses import AddressError, check_recipient_syntax
        from mailserver.smtp.queue.envelope import Envelope as QueueEnvelope

        queue = self.queue
        if queue is None:
            return defer.fail(RuntimeError("no outbound queue"))
        try:
            address = check_recipient_syntax(r.address)
        except AddressError as e:
            return defer.fail(ValueError(f"bad address: {e}"))
        recipients = queue.router(address)
        if not recipients:
            return defer.fail(ValueError("no such local address"))
        head = _drop_delivery_fields(r.header) if r.header is not None \
            else msg.trace + msg.header
        head = f"{REDIRECT_MARK}: {t.address}\r\n".encode("utf-8", "replace") + head
        env = QueueEnvelope(queue.new_id(), msg.sender, recipients,
                            created=time.time(), next_attempt=0.0)

        def write() -> Any:
            spool = queue.new_spool(env.id)
            try:
                spool.write(head)
                for chunk in msg.rest_chunks():
                    spool.write(chunk)
            except BaseException:
                spool.abort()
                raise
            return spool

        d = defer.maybeDeferred(write) if msg.rest is not None else \
            threads.deferToThread(write)

        def commit(spool: Any) -> defer.Deferred:
            env.size, env.eight_bit = spool.size, spool.eight_bit
            return queue.commit(spool, env)

        def done(_: Any) -> None:
            log.info("sieve {qid} <{user}>: redirected to <{to}> as {id}", qid=msg.queue_id,
                     user=t.address, to=address, id=env.id)
        return d.addCallback(commit).addCallback(done)

    @defer.inlineCallbacks
    def _vacation(self, msg: Incoming, t: Target, p: Plan):
        """RFC 5230: after the message is stored; never fails the delivery."""
        vacation = p.vacation
        assert vacation is not None
        try:
            why_not = should_reply(msg.head, msg.sender, [t.address, t.rcpt], vacation)
            if why_not is not None:
                log.info("sieve {qid} <{user}>: no vacation answer: {why}", qid=msg.queue_id,
                         user=t.address, why=why_not)
                return
            handle = vacation.handle or vacation.reason[:200]
            new = yield threads.deferToThread(self.memory.claim, t.address, handle,
                                              msg.sender, vacation.period)
            if not new:
                log.info("sieve {qid} <{user}>: no vacation answer: <{sender}> already "
                         "answered", qid=msg.queue_id, user=t.address, sender=msg.sender)
                return
            sender_as = t.address
            if vacation.from_address and self._may_send_as(t.address, vacation.from_address):
                sender_as = vacation.from_address
            answer = replace(vacation, from_address=sender_as)
            data = build_reply(answer, msg.head, msg.sender, t.address, self.hostname)
            try:
                yield self._generated(msg.sender, data)
            except Exception:
                yield threads.deferToThread(self.memory.release, t.address, handle,
                                            msg.sender)
                raise
            log.info("sieve {qid} <{user}>: vacation answer queued to <{sender}>",
                     qid=msg.queue_id, user=t.address, sender=msg.sender)
        except Exception as e:
            log.error("sieve {qid} <{user}>: vacation answer failed: {error}",
                      qid=msg.queue_id, user=t.address, error=e)

    def _may_send_as(self, user: str, address: str) -> bool:
        """:from may be any address the user may send as (never someone else's): the
        one mailbox it names, as the reply's From: will carry it."""
        mailbox = parse_mailbox(address)
        if mailbox is None:
            return False
        try:
            return bool(self.accounts.may_send_as(user, mailbox[1]))
        except Exception:
            return False


_IMPLICIT_KEEP = Result([Keep(implicit=True)])


def _run(chain: list[Script], message: Message, envelope: Envelope, limits: Limits,
         load: Any, mailbox_exists: Any, now: datetime | None) -> Any:
    """evaluate(), never raising: a failure in it is a run-time error (the keep)."""
    try:
        return evaluate(chain, message, envelope, limits=limits, include=load,
                        mailbox_exists=mailbox_exists, now=now)
    except Exception as e:  # not expected: the interpreter reports errors in the Result
        log.failure("sieve: evaluation failed")
        return Result([Keep(implicit=True)], error=f"internal error: {e!r}")


def _requires(chain: list[Script], extension: str) -> bool:
    for script in chain:
        if extension in script.requires:
            return True
    return False


def _result_tuples(results: list[Any]) -> list[tuple[Path, bool, Path | None, Any]]:
    return [(r.target, r.ok, r.path, r.error) for r in results]


def _noted(result: Result, error: str) -> Result:
    """The result of the global scripts when the user's script cannot be used."""
    if error and not result.error:
        result.error = f"script cannot be used: {error}"
    return result


def _first_error(failure: Any) -> Any:
    return failure.value.subFailure if failure.check(defer.FirstError) else failure


def build_sieve(server: Any) -> SieveDelivery | None:
    """The server's Sieve delivery (None when neither Sieve nor a filter plugin can
    apply); the spool directory of a previous run emptied."""
    config = server.config
    filters = getattr(server, "filters", [])
    if not config.sieve.enabled and not filters:
        return None
    from mailserver.smtp.spool import clean_spool

    sieve = SieveDelivery(config.sieve, server.store, server.accounts,
                          config.server.hostname, config.state_dir, filters,
                          config.filters.timeout)
    clean_spool(sieve.spool_dir)
    return sieve
