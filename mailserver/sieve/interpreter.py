"""Sieve evaluation: a chain of parsed scripts, a message and its envelope -> the actions
(mailserver.sieve.actions).  Twisted-free; runs in a worker thread.

Scripts are compiled once into closures (cached per Script) and evaluated many times.
A run-time error (RFC 5228 2.10.6) -- a limit exceeded, a conflicting action, a missing
include, the CPU time spent -- gives the implicit keep and the error, never an exception.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from mailserver.imap import mime
from mailserver.shortcache import cache_short
from mailserver.sieve import dates
from mailserver.sieve.actions import Action, Discard, FileInto, Keep, Redirect, Reject, Result, Vacation
from mailserver.sieve.editing import HeaderView, encode_field, valid_field_name
from mailserver.sieve.fusion import MIN_TESTS, Probe, fuse
from mailserver.sieve.matching import Matcher, ascii_lower, quote_wildcards
from mailserver.sieve.message import Message
from mailserver.sieve.parser import VARIABLE_REF, Node, Script, valid_address

__all__ = ["Envelope", "Limits", "Loader", "SieveIncludeBroken", "SieveIncludeError",
           "evaluate"]

MAX_VARIABLE_SIZE = 4096            # octets of one variable's value, as Pigeonhole
MAX_VARIABLES = 1000                # variables one script may set
MAX_EXPANSION = 1 << 20             # characters of one string after ${...} substitution
MAX_ADDHEADER_SIZE = 2048           # octets of a field addheader adds (Pigeonhole's default)
_TICK_SHIFT = 5                     # the CPU time is checked every 32 commands/tests
_TICK_MASK = (1 << _TICK_SHIFT) - 1

# RFC 5293 6 / 9: never deleted (loop detection relies on them: a script that deleted
# its redirect mark sent a message round two users' redirects for ever)
PROTECTED_FROM_DELETION = frozenset({"received", "auto-submitted", "x-sieve-redirected-from"})
# Octets all addheader actions of one evaluation may add (RFC 5293 6 "implementation
# limitations"): 1,800 fields of 2 KB turned a 70-byte message into 3.4 MB a copy.
MAX_ADDHEADER_TOTAL = 32 * 1024
_SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")}


class SieveIncludeError(Exception):
    """Raised by a Loader for a script that is missing or does not parse."""


class SieveIncludeBroken(SieveIncludeError):
    """Raised by a Loader for a script that is there but cannot be used (it does not
    compile, or cannot be read): a run-time error even for include :optional, which
    excuses only a script that does not exist (RFC 6609 3.2)."""


Loader = Callable[[str, bool], Script]


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the envelope test sees (RFC 5228 5.4): "from" is `sender`, "to" `recipient`."""

    sender: str                 # MAIL FROM; "" for the null sender
    recipient: str              # the RCPT TO (as given) that led to this mailbox
    user: str                   # the mailbox's own address
    auth: str = ""


@dataclass(frozen=True)
class Limits:
    """Bounds of one evaluation (SieveConfig's); going past one is a run-time error,
    except the vacation periods, which are clamped into their range."""

    max_actions: int = 32
    max_redirects: int = 4
    max_include_depth: int = 10
    max_cpu_time: float = 2.0
    vacation_min_period: float = 86400.0
    vacation_max_period: float = 90 * 86400.0


class SieveRuntimeError(Exception):
    """RFC 5228 2.10.6: the script cannot go on; the implicit keep applies."""


class SieveTimeExceeded(SieveRuntimeError):
    """The evaluation used its CPU time (Limits.max_cpu_time)."""


class _Stop(Exception):
    pass


class _Return(Exception):
    pass


# ------------------------------------------------------------------------- run state


_NO_VARIABLES: Mapping[str, str] = MappingProxyType({})


class _Frame:
    """One executing script: its variables (RFC 5229) and match variables."""

    __slots__ = ("vars", "match", "declared")

    def __init__(self) -> None:
        # empty and shared until the script sets something (most never do)
        self.vars: Mapping[str, str] = _NO_VARIABLES
        self.match: Sequence[str] = ()
        self.declared: frozenset[str] = frozenset()


class _Run:
    """The state of one evaluation."""

    __slots__ = ("message", "envelope", "limits", "loader", "_now", "mailbox_exists", "headers",
                 "actions", "keys", "lines", "keep_cancelled", "final", "kept", "flags",
                 "globals", "started", "cpu0", "before", "ticks", "redirects", "added",
                 "include_stack", "included_once", "loaded", "vacation_line", "reject_line")

    def __init__(self, message: Message, envelope: Envelope, limits: Limits, loader: Loader | None,
                 now: datetime | None, mailbox_exists: Callable[[str], bool] | None,
                 default_flags: tuple[str, ...]) -> None:
        self.message = message
        self.envelope = envelope
        self.limits = limits
        self.loader = loader
        self._now = now
        self.mailbox_exists = mailbox_exists
        self.headers = HeaderView(message)
        self.actions: list[Action] = []
        self.keys: dict[tuple, int] | None = None   # duplicate-action key -> index in actions
        self.lines: list[int] = []              # script line of each action, for messages
        self.keep_cancelled = False
        self.final = True                       # running the last script of the chain
        self.kept = False                       # an explicit keep in a script before it
        self.flags: list[str] = _flag_list(default_flags) if default_flags else []
        self.globals: Mapping[str, str] = _NO_VARIABLES
        # The thread's CPU clock is a system call: read from the first check on only,
        # the time before it counted as wall-clock time (never less than the CPU time).
        self.started = time.perf_counter()
        self.cpu0 = -1.0
        self.before = 0.0
        self.ticks = 0
        self.redirects = 0
        self.added = 0                          # octets addheader added
        # made by the first include
        self.include_stack: list[tuple[str, bool]] = None  # type: ignore[assignment]
        self.included_once: set[tuple[str, bool]] = None  # type: ignore[assignment]
        self.loaded: dict[tuple[str, bool], Script] = None  # type: ignore[assignment]
        self.vacation_line = 0
        self.reject_line = 0

    @property
    def now(self) -> datetime:
        """The evaluation's clock (aware): the given one, else the system's, read when a
        test first asks (date and currentdate only)."""
        now = self._now
        if now is None:
            now = self._now = datetime.now().astimezone()
        elif now.tzinfo is None:
            now = self._now = now.astimezone()
        return now

    def tick(self) -> None:
        self.ticks += 1
        if not self.ticks & _TICK_MASK:
            self.check_time()

    def spend(self, n: int) -> None:
        """Work worth `n` commands done at once (fused rules): checked as `n` ticks."""
        old = self.ticks
        self.ticks = old + n
        if old >> _TICK_SHIFT != self.ticks >> _TICK_SHIFT:
            self.check_time()

    def check_time(self) -> None:
        limit = self.limits.max_cpu_time
        elapsed = time.perf_counter() - self.started
        if self.cpu0 < 0:
            self.cpu0 = time.thread_time()
            self.before = elapsed
        # while the wall clock says the limit is not reached, the CPU time cannot be
        if elapsed > limit and time.thread_time() - self.cpu0 + self.before > limit:
            raise SieveTimeExceeded(f"CPU time limit of {limit:g} s exceeded")

    # -- variables (RFC 5229 3)

    def lookup(self, frame: _Frame, name: str) -> str:
        if name.isdigit():
            i = int(name)
            return frame.match[i] if i < len(frame.match) else ""
        if "." in name:
            space, _, rest = name.partition(".")
            return self.globals.get(rest, "") if space == "global" else ""
        if name in frame.declared:
            return self.globals.get(name, "")
        return frame.vars.get(name, "")

    def assign(self, frame: _Frame, name: str, value: str) -> None:
        value = _cap(value)
        if "." in name or name in frame.declared:
            if self.globals is _NO_VARIABLES:
                self.globals = {}
            if "." in name:
                name = name.partition(".")[2]
            self.globals[name] = value  # type: ignore[index]
        else:
            if name not in frame.vars and len(frame.vars) >= MAX_VARIABLES:
                raise SieveRuntimeError(f"more than {MAX_VARIABLES} variables")
            if frame.vars is _NO_VARIABLES:
                frame.vars = {}
            frame.vars[name] = value  # type: ignore[index]

    # -- actions (RFC 5228 2.10)

    def add(self, action: Action, key: tuple, line: int, cancels_keep: bool) -> None:
        if isinstance(action, Reject):
            if self.reject_line:
                raise SieveRuntimeError(f"line {line}: a second reject/ereject (the first at line {self.reject_line})")
            for other, oline in zip(self.actions, self.lines):
                if isinstance(other, (Keep, FileInto, Redirect, Vacation)):
                    raise SieveRuntimeError(f"line {line}: reject conflicts with the "
                                            f"{_action_name(other)} at line {oline}")
            self.reject_line = line
        elif isinstance(action, (Keep, FileInto, Redirect, Vacation)) and self.reject_line:
            raise SieveRuntimeError(f"line {line}: {_action_name(action)} conflicts with the "
                                    f"reject at line {self.reject_line}")
        if isinstance(action, Vacation):
            if self.vacation_line:
                raise SieveRuntimeError(f"line {line}: a second vacation (the first at line {self.vacation_line})")
            self.vacation_line = line
        if cancels_keep:                # RFC 5228 2.10.2, a repeated action included
            self.keep_cancelled = True
        if self.keys is None:
            self.keys = {}
        index = self.keys.get(key)
        if index is not None:
            # RFC 5228 2.10.3: done once, the later arguments winning
            old = self.actions[index]
            if isinstance(old, FileInto) and isinstance(action, FileInto):
                action = FileInto(action.mailbox, action.flags, old.create or action.create,
                                  old.copy and action.copy, action.header)
            elif isinstance(old, Redirect) and isinstance(action, Redirect):
                action = Redirect(old.address, old.copy and action.copy, action.header)
            self.actions[index] = action
            return
        if len(self.actions) >= self.limits.max_actions:
            raise SieveRuntimeError(f"line {line}: more than {self.limits.max_actions} actions")
        if isinstance(action, Redirect):
            self.redirects += 1
            if self.redirects > self.limits.max_redirects:
                raise SieveRuntimeError(f"line {line}: more than {self.limits.max_redirects} redirects")
        self.keys[key] = len(self.actions)
        self.actions.append(action)
        self.lines.append(line)


def _action_name(action: Action) -> str:
    return {Keep: "keep", FileInto: "fileinto", Redirect: "redirect", Vacation: "vacation",
            Reject: "reject", Discard: "discard"}[type(action)]


def _cap(value: str, limit: int = MAX_VARIABLE_SIZE) -> str:
    """At most `limit` UTF-8 octets, cut at a character boundary."""
    if len(value) <= limit // 4 or len(value.encode("utf-8", "surrogatepass")) <= limit:
        return value
    return value.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")


def _flag_list(strings: Sequence[str]) -> list[str]:
    """RFC 5232 3: flags are space-separated within each string; duplicates (case
    insensitively) dropped; system flags in their canonical spelling."""
    out: list[str] = []
    seen: set[str] = set()
    for s in strings:
        for flag in s.split():
            low = flag.lower()
            if low not in seen:
                seen.add(low)
                out.append(_SYSTEM_FLAGS.get(low, flag))
    return out


# ------------------------------------------------------------------------- compilation

Fn = Callable[[_Frame, _Run], None]
TestFn = Callable[[_Frame, _Run], bool]


class _Str:
    """A string argument: constant, or with ${...} references (RFC 5229 3)."""

    __slots__ = ("const", "parts")

    def __init__(self, text: str, variables: bool) -> None:
        parts: list = []
        pos = 0
        if variables and "${" in text:
            for m in VARIABLE_REF.finditer(text):
                if m.start() > pos:
                    parts.append(text[pos:m.start()])
                parts.append((m.group(1).lower(),))
                pos = m.end()
        if not parts:
            self.const: str | None = text
            self.parts = None
        else:
            if pos < len(text):
                parts.append(text[pos:])
            self.const = None
            self.parts = parts

    def __call__(self, frame: _Frame, run: _Run) -> str:
        if self.const is not None:
            return self.const
        out = []
        size = 0
        for p in self.parts:
            s = p if p.__class__ is str else run.lookup(frame, p[0])
            size += len(s)
            if size > MAX_EXPANSION:
                raise SieveRuntimeError(f"a string grows beyond {MAX_EXPANSION} characters")
            out.append(s)
        return "".join(out)


class _List:
    """A string-list argument."""

    __slots__ = ("items", "const")

    def __init__(self, items: Sequence[str], variables: bool) -> None:
        self.items = [_Str(s, variables) for s in items]
        self.const: tuple[str, ...] | None = (
            tuple(s.const for s in self.items) if all(s.const is not None for s in self.items) else None)

    def __call__(self, frame: _Frame, run: _Run) -> tuple[str, ...]:
        if self.const is not None:
            return self.const
        return tuple(s(frame, run) for s in self.items)


class _Keys:
    """A key-list with its Matcher; constant keys are folded/compiled once."""

    __slots__ = ("matcher", "keys", "prepared", "setvars", "fast")

    def __init__(self, node: Node, keys: Sequence[str], variables: bool) -> None:
        kind, op = node.tag("match", ("is", None))
        self.matcher = Matcher(node.tag("comparator", "i;ascii-casemap"), kind, op)
        self.keys = _List(keys, variables)
        self.prepared = self.matcher.prepare(self.keys.const) if self.keys.const is not None else None
        self.setvars = variables
        # (values, folded values) -> bool, for constant :is / :contains keys
        self.fast = self.matcher.fast(self.prepared) if self.prepared is not None else None

    def test(self, values: Sequence[str], frame: _Frame, run: _Run,
             folded: Sequence[str] | None = None) -> bool:
        if self.prepared is not None:
            r = self.matcher.test(values, self.keys.const, self.prepared, folded, run.check_time)
        else:
            r = self.matcher.test(values, self.keys(frame, run), None, folded, run.check_time)
        if r.__class__ is list:
            if self.setvars:        # RFC 5229 3.2: only a successful :matches sets them
                frame.match = [_cap(v) for v in r]
            return True
        return r


# script (weakly) -> its code; an entry goes with its script
_COMPILED: "dict[weakref.ref[Script], tuple[Fn, ...]]" = {}
_COMPILED_LOCK = threading.Lock()


def _forget(ref: "weakref.ref[Script]") -> None:
    _COMPILED.pop(ref, None)


def compiled(script: Script) -> tuple[Fn, ...]:
    code = _COMPILED.get(weakref.ref(script))
    if code is None:
        code = _Compiler(script).block(script.commands)
        with _COMPILED_LOCK:
            _COMPILED[weakref.ref(script, _forget)] = code
    return code


def _run_block(block: tuple[Fn, ...], frame: _Frame, run: _Run) -> None:
    for cmd in block:
        run.tick()
        cmd(frame, run)


class _Compiler:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.variables = "variables" in script.requires

    def s(self, text: str) -> _Str:
        return _Str(text, self.variables)

    def lst(self, items: Sequence[str]) -> _List:
        return _List(items, self.variables)

    # -- commands

    def block(self, nodes: Sequence[Node]) -> tuple[Fn, ...]:
        out: list[Fn] = []
        run: list[tuple] = []           # consecutive if-commands whose tests all fuse
        i = 0
        while i < len(nodes):
            node = nodes[i]
            if node.name == "if":
                branches = [(self.test(node.tests[0]), self.block(node.block))]
                i += 1
                while i < len(nodes) and nodes[i].name in ("elsif", "else"):
                    n = nodes[i]
                    branches.append((self.test(n.tests[0]) if n.name == "elsif" else None, self.block(n.block)))
                    i += 1
                if all(t is None or hasattr(t, "probe") for t, _ in branches):
                    run.append(tuple(branches))
                    continue
                out.extend(_ifs(run))
                run = []
                out.append(_if(tuple(branches)))
                continue
            out.extend(_ifs(run))
            run = []
            fn = getattr(self, "c_" + node.name)(node)
            if fn is not None:
                out.append(fn)
            i += 1
        out.extend(_ifs(run))
        return tuple(out)

    def c_require(self, node: Node) -> None:
        return None

    def c_stop(self, node: Node) -> Fn:
        def stop(frame: _Frame, run: _Run) -> None:
            raise _Stop()
        return stop

    def c_return(self, node: Node) -> Fn:
        def return_(frame: _Frame, run: _Run) -> None:
            raise _Return()
        return return_

    def c_keep(self, node: Node) -> Fn:
        flags = node.tag("flags")
        flags_arg = self.lst(flags) if flags is not None else None
        line = node.line

        def keep(frame: _Frame, run: _Run) -> None:    # RFC 5228 4.3
            if not run.final:           # before the last script: the keep carries on
                run.kept = True
                return
            fl = _flag_list(flags_arg(frame, run)) if flags_arg is not None else run.flags
            run.add(Keep(tuple(fl), run.headers.snapshot()), ("keep",), line, True)
        return keep

    def c_discard(self, node: Node) -> Fn:
        line = node.line

        def discard(frame: _Frame, run: _Run) -> None:     # RFC 5228 4.4
            run.add(Discard(), ("discard",), line, True)
        return discard

    def c_fileinto(self, node: Node) -> Fn:
        mailbox = self.s(node.args[0])
        flags = node.tag("flags")
        flags_arg = self.lst(flags) if flags is not None else None
        copy = bool(node.tag("copy"))
        create = bool(node.tag("create"))
        line = node.line

        def fileinto(frame: _Frame, run: _Run) -> None:    # RFC 5228 4.1, RFC 3894, RFC 5490
            name = mailbox(frame, run)
            if not name or any(c in name for c in "\r\n\0"):
                raise SieveRuntimeError(f"line {line}: invalid mailbox name {name!r}")
            fl = _flag_list(flags_arg(frame, run)) if flags_arg is not None else run.flags
            run.add(FileInto(name, tuple(fl), create, copy, run.headers.snapshot()),
                    ("fileinto", name), line, not copy)
        return fileinto

    def c_redirect(self, node: Node) -> Fn:
        address = self.s(node.args[0])
        copy = bool(node.tag("copy"))
        line = node.line

        def redirect(frame: _Frame, run: _Run) -> None:    # RFC 5228 4.2, RFC 3894
            addr = address(frame, run)
            if not valid_address(addr):
                raise SieveRuntimeError(f"line {line}: invalid redirect address {addr!r}")
            addr = _addr_spec(addr)
            local, _, domain = addr.rpartition("@")
            run.add(Redirect(addr, copy, run.headers.snapshot()),
                    ("redirect", local, domain.lower()), line, not copy)
        return redirect

    def c_reject(self, node: Node) -> Fn:
        return self._reject(node, False)

    def c_ereject(self, node: Node) -> Fn:
        return self._reject(node, True)

    def _reject(self, node: Node, extended: bool) -> Fn:
        reason = self.s(node.args[0])
        line = node.line

        def reject(frame: _Frame, run: _Run) -> None:      # RFC 5429 2.1, 2.2
            run.add(Reject(reason(frame, run), extended), ("reject",), line, True)
        return reject

    def c_vacation(self, node: Node) -> Fn:
        reason = self.s(node.args[0])
        subject = self.s(node.tag("subject")) if node.tag("subject") is not None else None
        from_ = self.s(node.tag("from")) if node.tag("from") is not None else None
        addresses = self.lst(node.tag("addresses", ()))
        handle = self.s(node.tag("handle")) if node.tag("handle") is not None else None
        mime_ = bool(node.tag("mime"))
        unit, amount = node.tag("period", ("days", 7))
        line = node.line

        def vacation(frame: _Frame, run: _Run) -> None:    # RFC 5230 4, RFC 6131
            text = reason(frame, run)
            subj = subject(frame, run) if subject is not None else None
            frm = from_(frame, run) if from_ is not None else None
            if frm is not None and not valid_address(frm):
                frm = None                      # RFC 5230 4.4: an unusable :from is ignored
            period = float(amount) * (86400.0 if unit == "days" else 1.0)
            period = min(max(period, run.limits.vacation_min_period), run.limits.vacation_max_period)
            if handle is not None:
                h = handle(frame, run)
            else:                               # RFC 5230 4.2: built from the arguments
                h = "default-" + hashlib.sha256("\0".join(
                    (text, subj or "", frm or "", "mime" if mime_ else "")).encode("utf-8", "surrogatepass")
                ).hexdigest()[:40]
            run.add(Vacation(text, subj, frm, addresses(frame, run), period, h, mime_),
                    ("vacation",), line, False)
        return vacation

    def c_set(self, node: Node) -> Fn:
        name = node.args[0].lower()
        value = self.s(node.args[1])
        mods = sorted((m for k, m in node.tags if k.startswith("mod")), key=lambda m: -_MOD_PREC[m])

        def set_(frame: _Frame, run: _Run) -> None:        # RFC 5229 4
            v = value(frame, run)
            for m in mods:
                v = _MODIFIERS[m](v)
            run.assign(frame, name, v)
        return set_

    def c_global(self, node: Node) -> Fn:
        names = [n.lower() for n in node.args[0]]

        def global_(frame: _Frame, run: _Run) -> None:     # RFC 6609 3.3
            frame.declared = frame.declared.union(names)
        return global_

    def c_include(self, node: Node) -> Fn:
        name = node.args[0]
        is_global = node.tag("location") == "global"
        once = bool(node.tag("once"))
        optional = bool(node.tag("optional"))
        line = node.line

        def include(frame: _Frame, run: _Run) -> None:     # RFC 6609 3.2
            key = (name, is_global)
            if run.include_stack is None:
                run.include_stack, run.included_once, run.loaded = [], set(), {}
            if once and key in run.included_once:
                return
            if key in run.include_stack:
                raise SieveRuntimeError(f"line {line}: include of {name!r} is recursive")
            if len(run.include_stack) >= run.limits.max_include_depth:
                raise SieveRuntimeError(f"line {line}: includes nested deeper than {run.limits.max_include_depth}")
            script = run.loaded.get(key)
            if script is None:
                if run.loader is None:
                    if optional:
                        return
                    raise SieveRuntimeError(f"line {line}: include {name!r}: no scripts to include from")
                try:
                    script = run.loader(name, is_global)
                except SieveIncludeError as exc:
                    if optional and not isinstance(exc, SieveIncludeBroken):
                        return
                    raise SieveRuntimeError(f"line {line}: include {name!r}: {exc}") from None
                run.loaded[key] = script
            run.included_once.add(key)
            run.include_stack.append(key)
            try:
                _run_block(compiled(script), _Frame(), run)
            except _Return:
                pass
            finally:
                run.include_stack.pop()
        return include

    def _flag_command(self, node: Node, op: str) -> Fn:
        var = node.args[0].lower() if node.args[0] is not None else None
        flags = self.lst(node.args[1])

        def flag_cmd(frame: _Frame, run: _Run) -> None:    # RFC 5232 3
            given = _flag_list(flags(frame, run))
            current = run.flags if var is None else _flag_list((run.lookup(frame, var),))
            if op == "set":
                new = given
            elif op == "add":
                new = _flag_list(current + given)
            else:
                drop = {f.lower() for f in given}
                new = [f for f in current if f.lower() not in drop]
            if var is None:
                run.flags = new
            else:
                run.assign(frame, var, " ".join(new))
        return flag_cmd

    def c_setflag(self, node: Node) -> Fn:
        return self._flag_command(node, "set")

    def c_addflag(self, node: Node) -> Fn:
        return self._flag_command(node, "add")

    def c_removeflag(self, node: Node) -> Fn:
        return self._flag_command(node, "remove")

    def c_addheader(self, node: Node) -> Fn:
        field = self.s(node.args[0])
        value = self.s(node.args[1])
        last = bool(node.tag("last"))
        line = node.line

        def addheader(frame: _Frame, run: _Run) -> None:   # RFC 5293 4
            name = field(frame, run)
            if not valid_field_name(name):
                raise SieveRuntimeError(f"line {line}: addheader: invalid field name {name!r}")
            encoded = encode_field(name, value(frame, run))
            if len(encoded) > MAX_ADDHEADER_SIZE:
                raise SieveRuntimeError(f"line {line}: addheader: the field is larger than {MAX_ADDHEADER_SIZE} octets")
            run.added += len(encoded)
            if run.added > MAX_ADDHEADER_TOTAL:
                raise SieveRuntimeError(f"line {line}: addheader: over {MAX_ADDHEADER_TOTAL} "
                                        "octets added in all")
            run.headers.add(name, encoded, last)
        return addheader

    def c_deleteheader(self, node: Node) -> Fn:
        field = self.s(node.args[0])
        patterns = _Keys(node, node.args[1], self.variables) if node.args[1] is not None else None
        index = node.tag("index")
        last = bool(node.tag("last"))
        line = node.line

        def deleteheader(frame: _Frame, run: _Run) -> None:    # RFC 5293 5
            name = field(frame, run)
            if not valid_field_name(name):
                raise SieveRuntimeError(f"line {line}: deleteheader: invalid field name {name!r}")
            lname = name.lower()
            if lname in PROTECTED_FROM_DELETION:
                return                                  # RFC 5293 6: silently ignored
            fields = run.headers.named(lname)
            if index is not None:
                pos = len(fields) - index if last else index - 1
                if not 0 <= pos < len(fields):
                    return
                candidates = [fields[pos]]
            else:
                candidates = list(fields)
            doomed = [f for f in candidates
                      if patterns is None or patterns.matcher.test(
                          [f.value], patterns.keys(frame, run), patterns.prepared, None, run.check_time)]
            if doomed:
                run.headers.delete(doomed)
        return deleteheader

    # -- tests

    def test(self, node: Node) -> TestFn:
        return getattr(self, "t_" + node.name)(node)

    def t_true(self, node: Node) -> TestFn:
        return lambda frame, run: True

    def t_false(self, node: Node) -> TestFn:
        return lambda frame, run: False

    def t_not(self, node: Node) -> TestFn:
        inner = self.test(node.tests[0])
        return lambda frame, run: not inner(frame, run)

    def t_allof(self, node: Node) -> TestFn:
        tests = tuple(self.test(t) for t in node.tests)

        def allof(frame: _Frame, run: _Run) -> bool:       # RFC 5228 5.2, short-circuit
            for t in tests:
                run.tick()
                if not t(frame, run):
                    return False
            return True
        return allof

    def t_anyof(self, node: Node) -> TestFn:
        tests = tuple(self.test(t) for t in node.tests)

        def anyof(frame: _Frame, run: _Run) -> bool:       # RFC 5228 5.3
            for t in tests:
                run.tick()
                if t(frame, run):
                    return True
            return False
        return anyof

    def t_size(self, node: Node) -> TestFn:
        limit = node.args[0]
        if node.tag("size") == "over":                      # RFC 5228 5.9
            return lambda frame, run: run.message.size > limit
        return lambda frame, run: run.message.size < limit

    def t_exists(self, node: Node) -> TestFn:
        names = self.lst(node.args[0])

        def exists(frame: _Frame, run: _Run) -> bool:      # RFC 5228 5.5
            return all(run.headers.named(n.lower()) for n in names(frame, run))
        return exists

    def _fields(self, node: Node, names: _List) -> Callable[[_Frame, _Run], list]:
        """The header fields named, honouring :index/:last (RFC 5260 6)."""
        index = node.tag("index")
        last = bool(node.tag("last"))
        const = tuple(n.lower() for n in names.const) if names.const is not None else None

        if index is None and const is not None and len(const) == 1:
            only = const[0]
            return lambda frame, run: run.headers.named(only)

        def fields(frame: _Frame, run: _Run) -> list:
            out: list = []
            for n in const if const is not None else [n.lower() for n in names(frame, run)]:
                got = run.headers.named(n)
                if index is not None:
                    pos = len(got) - index if last else index - 1
                    got = [got[pos]] if 0 <= pos < len(got) else []
                out.extend(got)
            return out
        return fields

    def _cache_key(self, node: Node, names: _List, part: str = "") -> tuple | None:
        """The key of a test's values in HeaderView.cache: only for constant names."""
        if names.const is None:
            return None
        return (node.name, tuple(n.lower() for n in names.const), part,
                node.tag("index"), bool(node.tag("last")))

    def t_header(self, node: Node) -> TestFn:
        names = self.lst(node.args[0])
        fields = self._fields(node, names)
        keys = _Keys(node, node.args[1], self.variables)
        key = self._cache_key(node, names)
        counting = keys.matcher.kind == "count"
        fast = keys.fast

        def values(frame: _Frame, run: _Run) -> tuple[list[str], list[str]]:
            cache = run.headers.cache
            got = cache.get(key) if key is not None else None
            if got is None:
                found = fields(frame, run)
                if len(found) == 1:
                    f = found[0]
                    got = ([f.value], [f.lvalue])
                else:
                    got = ([f.value for f in found], [f.lvalue for f in found])
                if key is not None:
                    cache[key] = got
            return got

        def header(frame: _Frame, run: _Run) -> bool:      # RFC 5228 5.7
            got = values(frame, run)
            if not got[0] and not counting:
                return False
            if fast is not None:
                return fast(got[0], got[1], run.check_time)
            return keys.test(got[0], frame, run, got[1])
        return _probed(header, keys, key, values)

    def t_address(self, node: Node) -> TestFn:
        names = self.lst(node.args[0])
        fields = self._fields(node, names)
        keys = _Keys(node, node.args[1], self.variables)
        part = node.tag("address_part", "all")
        key = self._cache_key(node, names, part)
        counting = keys.matcher.kind == "count"
        fast = keys.fast

        def values_of(frame: _Frame, run: _Run) -> tuple[list[str], list[str]]:
            cache = run.headers.cache
            got = cache.get(key) if key is not None else None
            if got is None:
                values: list[str] = []
                folded: list[str] = []
                for f in fields(frame, run):
                    v, fv = _address_values(f, part)
                    values.extend(v)
                    folded.extend(fv)
                got = (values, folded)
                if key is not None:
                    cache[key] = got
            return got

        def address(frame: _Frame, run: _Run) -> bool:     # RFC 5228 5.1
            got = values_of(frame, run)
            if not got[0] and not counting:
                return False
            if fast is not None:
                return fast(got[0], got[1], run.check_time)
            return keys.test(got[0], frame, run, got[1])
        return _probed(address, keys, key, values_of)

    def t_envelope(self, node: Node) -> TestFn:
        parts = self.lst(node.args[0])
        keys = _Keys(node, node.args[1], self.variables)
        part = node.tag("address_part", "all")

        def envelope(frame: _Frame, run: _Run) -> bool:    # RFC 5228 5.4
            values: list[str] = []
            for p in parts(frame, run):
                p = p.lower()
                if p == "from":
                    addr = run.envelope.sender
                elif p == "to":
                    addr = run.envelope.recipient
                else:
                    raise SieveRuntimeError(f"line {node.line}: envelope part {p!r} is not supported")
                addr = addr.strip()
                if addr.startswith("<") and addr.endswith(">"):
                    addr = addr[1:-1]
                if not addr:                    # the null sender: only :all sees ""
                    if part == "all":
                        values.append("")
                    continue
                local, at, domain = addr.rpartition("@")
                if not at:
                    local, domain = addr, ""
                v = _part(local, domain, part)
                if v is not None:
                    values.append(v)
            return keys.test(values, frame, run)
        return envelope

    def t_body(self, node: Node) -> TestFn:
        keys = _Keys(node, node.args[0], self.variables)
        transform, types = node.tag("transform", ("text", None))
        types_arg = self.lst(types) if types is not None else None

        def body(frame: _Frame, run: _Run) -> bool:        # RFC 5173
            t = types_arg(frame, run) if types_arg is not None else ()
            return keys.test(run.message.body_texts(transform, tuple(t)), frame, run)
        if types_arg is not None and types_arg.const is None:
            return body
        const_types = tuple(types_arg.const) if types_arg is not None else ()
        return _probed(body, keys, ("body", transform, const_types),
                       lambda frame, run: (run.message.body_texts(transform, const_types), None))

    def t_string(self, node: Node) -> TestFn:
        source = self.lst(node.args[0])
        keys = _Keys(node, node.args[1], self.variables)
        counting = node.tag("match", ("is", None))[0] == "count"

        def string(frame: _Frame, run: _Run) -> bool:      # RFC 5229 5
            values = source(frame, run)
            if counting:                        # :count counts the non-empty strings
                values = [v for v in values if v != ""]
            return keys.test(values, frame, run)
        return string

    def t_hasflag(self, node: Node) -> TestFn:
        variables = [v.lower() for v in node.args[0]] if node.args[0] is not None else None
        kind = node.tag("match", ("is", None))[0]
        keys = _Keys(node, node.args[1], self.variables)
        split = kind not in ("count", "value")

        def hasflag(frame: _Frame, run: _Run) -> bool:     # RFC 5232 4
            if variables is None:
                values = list(run.flags)
            else:
                values = _flag_list([run.lookup(frame, v) for v in variables])
            if not split:
                return keys.test(values, frame, run)
            wanted = _flag_list(keys.keys(frame, run))
            r = keys.matcher.test(values, wanted, None, None, run.check_time)
            if r.__class__ is list:
                if keys.setvars:
                    frame.match = [_cap(v) for v in r]
                return True
            return r
        return hasflag

    def t_date(self, node: Node) -> TestFn:
        fields = self._fields(node, self.lst([node.args[0]]))
        part = self.s(node.args[1])
        keys = _Keys(node, node.args[2], self.variables)
        zone = self._zone(node)
        received = node.args[0].lower() == "received"

        def date(frame: _Frame, run: _Run) -> bool:        # RFC 5260 4
            p = part(frame, run).lower()
            z, original = zone(frame, run)
            values: list[str] = []
            for f in fields(frame, run):
                text = f.value
                if received or f.lname == "received":
                    text = text.rpartition(";")[2]
                dt = dates.parse_date(text)
                if dt is None:
                    continue
                if not original:
                    dt = dates.in_zone(dt, z if z is not None else run.now.tzinfo)
                v = dates.date_part(dt, p)
                if v is not None:
                    values.append(v)
            if not values:
                return False
            return keys.test(values, frame, run)
        return date

    def t_currentdate(self, node: Node) -> TestFn:
        part = self.s(node.args[0])
        keys = _Keys(node, node.args[1], self.variables)
        zone = self._zone(node)

        def currentdate(frame: _Frame, run: _Run) -> bool:     # RFC 5260 5
            z, _ = zone(frame, run)
            dt = dates.in_zone(run.now, z if z is not None else run.now.tzinfo)
            v = dates.date_part(dt, part(frame, run).lower())
            if v is None:
                return False
            return keys.test([v], frame, run)
        return currentdate

    def _zone(self, node: Node) -> Callable[[_Frame, _Run], tuple]:
        kind, text = node.tag("zone", (None, None))
        if kind == "originalzone":
            return lambda frame, run: (None, True)
        if kind is None:
            return lambda frame, run: (None, False)
        arg = self.s(text)
        return lambda frame, run: (dates.parse_zone(arg(frame, run)), False)

    def t_mailboxexists(self, node: Node) -> TestFn:
        names = self.lst(node.args[0])

        def mailboxexists(frame: _Frame, run: _Run) -> bool:   # RFC 5490 3.1
            check = run.mailbox_exists
            if check is None:
                return False
            return all(check(n) for n in names(frame, run))
        return mailboxexists


def _probed(test: TestFn, keys: _Keys, source: tuple | None,
            values: Callable[[_Frame, _Run], tuple]) -> TestFn:
    """The test, with its Probe when it can be fused with its neighbours: constant names
    (a `source`) and constant :is / :contains keys that set no variables."""
    if source is not None and keys.fast is not None:
        matcher = keys.matcher
        test.probe = Probe(source, values, matcher.kind,                # type: ignore[attr-defined]
                           matcher.comparator == "i;ascii-casemap", tuple(keys.prepared))
    return test


def _ifs(statements: list[tuple]) -> list[Fn]:
    """Consecutive if-commands whose tests are all Probes: one fused command when they
    hold enough tests (mailserver.sieve.fusion), else each on its own."""
    if sum(t is not None for branches in statements for t, _ in branches) >= MIN_TESTS:
        return [fuse([[(t.probe if t is not None else None, block) for t, block in branches]
                      for branches in statements], _run_block)]
    return [_if(branches) for branches in statements]


def _if(branches: tuple) -> Fn:
    def if_(frame: _Frame, run: _Run) -> None:              # RFC 5228 3.1
        for test, block in branches:
            if test is None or test(frame, run):
                _run_block(block, frame, run)
                return
    return if_


# -- set modifiers (RFC 5229 4.1)

def _lowerfirst(v: str) -> str:
    return v[:1].lower() + v[1:]


def _upperfirst(v: str) -> str:
    return v[:1].upper() + v[1:]


def _length(v: str) -> str:
    return str(len(v))


_MODIFIERS: dict[str, Callable[[str], str]] = {
    "lower": str.lower, "upper": str.upper, "lowerfirst": _lowerfirst,
    "upperfirst": _upperfirst, "quotewildcard": quote_wildcards, "length": _length,
}
_MOD_PREC = {"lower": 40, "upper": 40, "lowerfirst": 30, "upperfirst": 30, "quotewildcard": 20, "length": 10}


# -- addresses


def _addr_spec(value: str) -> str:
    value = value.strip()
    if value.endswith(">") and "<" in value:
        value = value[value.rindex("<") + 1:-1].strip()
    return value


def _part(local: str, domain: str, part: str) -> str | None:
    """RFC 5228 2.7.4 address parts and RFC 5233 :user / :detail ("+" separator)."""
    if part == "all":
        return f"{local}@{domain}" if domain else local
    if part == "localpart":
        return local
    if part == "domain":
        return domain
    user, sep, detail = local.partition("+")
    if part == "user":
        return user
    return detail if sep else None             # no separator: :detail matches nothing


@cache_short(maxsize=512, longest=200)
def _address_pairs(value: str) -> tuple[tuple[str, str], ...] | bool:
    """(local part, domain) of each address of a field's value, group names skipped;
    False when one is not a whole address."""
    pairs = []
    for a in mime.parse_addresses(value):
        if a.kind != mime.MAILBOX:
            continue
        if not a.mailbox or not a.host:
            return False
        pairs.append((a.mailbox, a.host))
    return tuple(pairs)


def _address_values(field, part: str) -> tuple[list[str], list[str]]:
    """The address parts of one field's addresses, and the same under i;ascii-casemap;
    group names skipped, cached on the field.  A field that does not parse as addresses
    is one invalid address: its text for :all, nothing for the other parts (RFC 5228
    5.1)."""
    if field.parts is None:
        field.parts = {}
    got = field.parts.get(part)
    if got is not None:
        return got
    cache = field.addresses
    if cache is None:
        unfolded = field.unfolded
        cache = field.addresses = _address_pairs(unfolded)
    if cache is False:
        values = [field.value] if part == "all" else []
    else:
        values = []
        for local, domain in cache:
            v = _part(local, domain, part)
            if v is not None:
                values.append(v)
    got = field.parts[part] = (values, [ascii_lower(v) for v in values])
    return got


# ------------------------------------------------------------------------- evaluate


def evaluate(scripts: Sequence[Script], message: Message, envelope: Envelope, *,
             limits: Limits = Limits(), include: Loader | None = None,
             now: datetime | None = None, default_flags: tuple[str, ...] = (),
             mailbox_exists: Callable[[str], bool] | None = None) -> Result:
    """Run the chain as Pigeonhole runs sieve_before / the user's / sieve_after: the next
    script runs while the message is still kept (the implicit keep not cancelled, or an
    explicit keep, which before the last script only carries the keep on); "stop" ends
    its own script.  The implicit keep comes once, at the end.  `now` (aware) is
    currentdate's clock and its zone the local zone of date tests; the system's when
    None (read only if such a test runs).  Never raises for a parsed script and any
    message."""
    run = _Run(message, envelope, limits, include, now, mailbox_exists, default_flags)
    try:
        keep = True
        for i, script in enumerate(scripts):
            run.globals = _NO_VARIABLES
            run.final = i == len(scripts) - 1
            run.keep_cancelled = run.kept = False
            try:
                _run_block(compiled(script), _Frame(), run)
            except (_Return, _Stop):            # RFC 6609 3.4: return at the top is stop
                pass
            keep = run.kept or not run.keep_cancelled
            if not keep:
                break
        actions = run.actions
        if keep and not run.keep_cancelled:     # RFC 5228 2.10.2
            header = run.headers.snapshot()
            actions.append(Keep(tuple(run.flags), header, implicit=True)
                           if run.flags or header is not None else _IMPLICIT_KEEP)
        return Result(actions)
    except SieveTimeExceeded as exc:
        result = _failed(str(exc), default_flags)
        result.out_of_time = True
        return result
    except SieveRuntimeError as exc:
        return _failed(str(exc), default_flags)
    except RecursionError:
        return _failed("script nesting too deep", default_flags)
    except Exception as exc:       # noqa: BLE001 - RFC 5228 2.10.6: never lose the message
        return _failed(f"internal error: {exc.__class__.__name__}: {exc}", default_flags)


_IMPLICIT_KEEP = Keep(implicit=True)


def _failed(error: str, default_flags: tuple[str, ...]) -> Result:
    return Result([Keep(tuple(_flag_list(default_flags)), implicit=True)], error=error)
