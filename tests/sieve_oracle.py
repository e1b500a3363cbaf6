"""Pigeonhole's `sieve-test` as an oracle for the Sieve interpreter's decisions.

`PigeonholeOracle.run` evaluates a chain of scripts on one message file with
`sieve-test` and returns what it decided as a normalized action set, the same vocabulary
`normalize_ours` (tests/unit/test_sieve_pigeonhole.py) maps our Result to:

    ("store", mailbox, flags, "explicit" | "implicit")   keep, fileinto, the implicit keep
                                                         (one per folder: merge_stores)
    ("discard",)
    ("redirect", address)
    ("reject", "reject" | "ereject", reason)
    ("vacation", to, seconds, subject, from, reason, handle)
    ("error",)                                           run-time error (RFC 5228 2.10.6)

A store's flags are sorted, system flags in their canonical case (IMAP flags are
case-insensitive, RFC 3501 2.3.2; Pigeonhole prints them in lower case). Vacation: `to`
is the address answered, or "no-reply" when the message gets no answer (list, bulk,
auto-submitted, not addressed to the user...), or "" when the caller does not compare
the decision; subject, from and handle are "" when the script left them to their
defaults. A run-time error (or a script Pigeonhole refuses) is ("error",) and the
implicit keep, which is what delivery makes of it.

How it runs `sieve-test`: with a configuration file of its own (-c) in a private work
directory, never /etc/dovecot; the scripts named by location
"file:<script>;bindir=<work>/bin" so no compiled binary is written next to them; the test
mode (no -e) prints the actions; for a result that holds a vacation action, a second run
in execution mode (-e, a fresh mail home with the folders the first run stored into)
tells whether the answer would be sent. Dovecot refuses mail access as root, so under
root it runs with mail_uid = nobody, which must be able to read the corpus.

Known limits of `sieve-test` 2.3: the envelope sender cannot be null (-f refuses "",
a "Return-Path: <>" header is skipped); ereject is not built into Pigeonhole 0.5, so a
script requiring it is run with ereject spelt reject (RFC 5429 2.1 and 2.2 differ only
in how the refusal reaches the sender) and its rejects are reported as "ereject".
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

Action = tuple

SYSTEM_FLAGS = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted",
                                       "\\Draft", "\\Recent")}
REASON_MAX = 128                # Pigeonhole prints at most this many characters of a reason
TIMEOUT = 30.0                  # seconds for one sieve-test run


@dataclass(frozen=True)
class EnvelopeSpec:
    """The SMTP envelope of a delivery: sender (MAIL FROM), recipient (the RCPT TO that
    led to the mailbox: sieve-test -a, `envelope "to"`), user (the mailbox's own
    address: sieve-test -r)."""

    sender: str
    recipient: str
    user: str


@dataclass
class OracleResult:
    actions: tuple[Action, ...]
    command: list[str]
    stdout: str
    stderr: str
    exec_stdout: str = ""
    exec_stderr: str = ""

    def transcript(self) -> str:
        text = f"$ {' '.join(self.command)}\n{self.stdout}{self.stderr}"
        if self.exec_stdout or self.exec_stderr:
            text += f"\n-- execution run (-e):\n{self.exec_stdout}{self.exec_stderr}"
        return text


class OracleError(Exception):
    """sieve-test gave output this module cannot read."""


# ----------------------------------------------------------------------------- parsing


def canonical_flags(flags: Sequence[str]) -> tuple[str, ...]:
    """Sorted, without repeats, system flags in their canonical case."""
    out: dict[str, str] = {}
    for flag in flags:
        if not flag:
            continue
        name = SYSTEM_FLAGS.get(flag.lower(), flag)
        out.setdefault(name.lower(), name)
    return tuple(sorted(out.values()))


def canonical_mailbox(name: str) -> str:
    """INBOX in any case is INBOX (RFC 3501 5.1)."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX.":
        return "INBOX" + name[5:]
    return name


def canonical_address(address: str) -> str:
    """The domain in lower case; the local part as it is (RFC 5321 2.4)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def sanitize_reason(text: str) -> str:
    """A reason as Pigeonhole prints it: control characters as "?", at most
    REASON_MAX characters."""
    text = re.sub(r"[\x00-\x1f\x7f]", "?", text)
    return text[:REASON_MAX]


_SECTION = re.compile(r"^## Executing script: .*$", re.M)


@dataclass
class _Store:
    mailbox: str
    explicit_keep: bool         # printed as "keep"
    flags: list[str] = field(default_factory=list)


def _parse_section(text: str) -> tuple[list[Action], list[Action]]:
    """(performed actions, implicit keep actions) of one "Performed actions:" /
    "Implicit keep:" block; a store printed as "keep" has the kind "keep"."""
    performed: list[Action] = []
    implicit: list[Action] = []
    target: list[Action] | None = None
    lines = text.splitlines()
    i = 0
    store: _Store | None = None

    def flush_store(kind: str) -> None:
        nonlocal store
        if store is not None and target is not None:
            target.append(("store", canonical_mailbox(store.mailbox),
                           canonical_flags(store.flags),
                           "keep" if store.explicit_keep and kind == "explicit" else kind))
        store = None

    kind = "explicit"
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if line.startswith("Performed actions:"):
            flush_store(kind)
            target, kind = performed, "explicit"
        elif line.startswith("Implicit keep:"):
            flush_store(kind)
            target, kind = implicit, "implicit"
        elif target is None or not stripped or stripped == "(none)":
            pass
        elif stripped.startswith("* "):
            flush_store(kind)
            body = stripped[2:]
            if body.startswith("store message in folder: "):
                store = _Store(body[len("store message in folder: "):], False)
            elif body == "keep":
                store = _Store("INBOX", True)
            elif body == "discard":
                target.append(("discard",))
            elif body.startswith("redirect message to: "):
                target.append(("redirect", canonical_address(
                    body[len("redirect message to: "):].strip().strip("<>"))))
            elif body.startswith("reject message with reason: "):
                target.append(("reject", "reject", body[len("reject message with reason: "):]))
            elif body.startswith("send vacation message:"):
                fields: dict[str, str] = {}
                i += 1
                while i < len(lines) and lines[i].strip() != "START MESSAGE":
                    m = re.match(r"\s+=> (\w+)\s*: ?(.*)$", lines[i])
                    if m:
                        key, value = m.group(1), m.group(2)
                        fields[key] = value
                    elif "handle" in fields:        # a handle of several lines
                        fields["handle"] += "\n" + lines[i]
                    i += 1
                reason: list[str] = []
                i += 1
                while i < len(lines) and lines[i] != "END MESSAGE":
                    reason.append(lines[i])
                    i += 1
                if i >= len(lines):
                    raise OracleError("vacation message without END MESSAGE")
                handle = fields.get("handle", "").rstrip("\n")
                target.append(("vacation", "", int(fields.get("seconds", "0")),
                               fields.get("subject", ""), fields.get("from", ""),
                               "\n".join(reason).rstrip(), handle))
            else:
                raise OracleError(f"unknown action line: {line!r}")
        elif stripped.startswith("+ "):
            detail = stripped[2:]
            if store is not None and detail.startswith("add IMAP flags: "):
                store.flags.extend(detail[len("add IMAP flags: "):].split())
            # "create mailbox if it does not exist", "preserve implicit keep": the
            # implicit keep they leave shows as an action of its own
        else:
            raise OracleError(f"unexpected line: {line!r}")
        i += 1
    flush_store(kind)
    return performed, implicit


def merge_stores(actions: Sequence[Action]) -> list[Action]:
    """Stores into the same folder as one, flags united, explicit when any was: a
    message is stored in a folder once (RFC 5228 2.10.3), as Pigeonhole and our
    delivery (mailserver/sieve/plan.py) both do."""
    stores: dict[str, tuple[dict[str, str], list[bool]]] = {}
    out: list[Action] = []
    for action in actions:
        if action[0] != "store":
            out.append(action)
            continue
        flags, explicit = stores.setdefault(action[1], ({}, [False]))
        for flag in action[2]:
            flags.setdefault(flag.lower(), flag)
        explicit[0] = explicit[0] or action[3] == "explicit"
    for folder, (flags, explicit) in stores.items():
        out.append(("store", folder, canonical_flags(list(flags.values())),
                    "explicit" if explicit[0] else "implicit"))
    return out


def default_handle(vacation: Action) -> bool:
    """Whether a parsed vacation's handle is Pigeonhole's default (RFC 5230 4.2: built
    from the reason, :subject, :from and :mime)."""
    _, _, _, subject, from_, reason, handle = vacation
    built = reason + (subject or "<default-subject>") + (from_ or "<default-from>")
    handle, built = re.sub(r"\s+", "", handle), re.sub(r"\s+", "", built)
    # Pigeonhole builds it from the arguments as written, before variables are
    # substituted: a ${...} in it stands for any text
    pattern = "".join(".*" if part.startswith("${") else re.escape(part)
                      for part in re.split(r"(\$\{[^}]*\})", handle))
    return any(re.fullmatch(pattern, built + end, re.S) for end in ("<NO-MIME>", "<MIME>"))


def parse_test_output(stdout: str, stderr: str) -> list[Action]:
    """The normalized actions of a `sieve-test` run in test mode (without -e)."""
    if ("final result: success" not in stderr) or "Fatal:" in stderr:
        return [("error",), ("store", "INBOX", (), "implicit")]
    sections = _SECTION.split(stdout)
    sections = [s for s in sections if "Performed actions:" in s]
    if not sections:
        raise OracleError("no result printed")
    actions: list[Action] = []
    # A chain (sieve_before): a script's keep, explicit or implicit, is what lets the
    # next script run, and is dropped when it does; its other actions stay.
    for section in sections[:-1]:
        performed, _ = _parse_section(section)
        actions.extend(a for a in performed if not (a[0] == "store" and a[3] == "keep"))
    performed, implicit = _parse_section(sections[-1])
    actions.extend(performed)
    actions.extend(implicit)
    out: list[Action] = []
    for action in actions:
        if action[0] == "store" and action[3] == "keep":
            action = action[:3] + ("explicit",)
        if action[0] == "vacation" and default_handle(action):
            action = action[:6] + ("",)
        if action[0] == "reject":
            action = (action[0], action[1], sanitize_reason(action[2]))
        out.append(action)
    return merge_stores(out)


_EREJECT = re.compile(r'require\s*(\[[^\]]*)?"ereject"')
_SENT = re.compile(r"vacation action: sent vacation response to <([^>]*)>")
_NOT_SENT = re.compile(r"vacation action: (discard|not sending|ignor)")


def vacation_decision(stderr: str) -> str:
    """The address answered, or "no-reply", from an execution run's log."""
    m = _SENT.search(stderr)
    if m:
        return m.group(1)
    if _NOT_SENT.search(stderr):
        return "no-reply"
    raise OracleError("execution run says nothing about the vacation answer")


# ----------------------------------------------------------------------------- running


def mutf7(name: str) -> str:
    """IMAP modified UTF-7 (RFC 3501 5.1.3), as Dovecot names Maildir++ folders."""
    out, buf = [], []

    def flush() -> None:
        if buf:
            import base64
            raw = "".join(buf).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",")
                       + "-")
            buf.clear()

    for ch in name:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            buf.append(ch)
    flush()
    return "".join(out)


def _readable_by_others(path: Path) -> bool:
    """Whether a user other than the owner can reach and read every file under path."""
    for parent in [*reversed(path.resolve().parents), path.resolve()]:
        if not parent.stat().st_mode & 0o001:
            return False
    for p in path.rglob("*"):
        mode = p.stat().st_mode
        if not mode & (0o005 if p.is_dir() else 0o004):
            return False
    return True


def find_sieve_test() -> str | None:
    return shutil.which("sieve-test")


class PigeonholeOracle:
    """One work directory (config, compiled binaries, mail homes) for many runs.

    corpus: the directory holding include/personal and include/global; every script and
    message given to run() must lie inside it.
    """

    def __init__(self, binary: str, corpus: Path, work: Path) -> None:
        self.binary = binary
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
            if any(not p.stat().st_mode & 0o001 for p in work.resolve().parents):
                raise OracleError(f"{work}: nobody cannot reach it")
        else:
            self.uid, self.gid = os.geteuid(), os.getegid()
        self.source = corpus.resolve()
        if self.uid != os.geteuid() and not _readable_by_others(self.source):
            # mail_uid cannot read the checkout (a private home directory): the same
            # files, copied where it can
            self.corpus = work / "corpus"
            shutil.copytree(self.source, self.corpus)
            for p in [self.corpus, *self.corpus.rglob("*")]:
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        else:
            self.corpus = self.source
        self.bindir = work / "bin"
        self.bindir.mkdir(exist_ok=True)
        self.translated = work / "ereject"
        self.translated.mkdir(exist_ok=True)
        self.empty_home = work / "home"          # the test mode's mail home: INBOX only
        self.empty_home.mkdir(exist_ok=True)
        for d in (self.bindir, self.empty_home):
            os.chown(d, self.uid, self.gid)
        self.config = work / "dovecot.conf"
        self.config.write_text(self._config(self.empty_home))
        self._lock = threading.Lock()

    def _config(self, home: Path) -> str:
        inc = self.corpus / "include"
        return "\n".join([
            "# sieve-test only: no service reads this file",
            f"mail_uid = {self.uid}",
            f"mail_gid = {self.gid}",
            f"first_valid_uid = {min(self.uid, 500) or 1}",
            f"first_valid_gid = {min(self.gid, 1)}",
            f"mail_home = {home}",
            f"mail_location = maildir:{home}/Maildir",
            "plugin {",
            f"  sieve = file:{inc / 'personal'}",
            f"  sieve_global = {inc / 'global'}",
            # off by default in Pigeonhole, offered by our interpreter
            "  sieve_extensions = +editheader +vacation-seconds",
            # the interpreter's Limits() defaults
            "  sieve_max_actions = 32",
            "  sieve_max_redirects = 4",
            "  sieve_include_max_nesting_depth = 10",
            "  sieve_vacation_min_period = 1d",
            "  sieve_vacation_max_period = 90d",
            # RFC 5230 4.5: the RCPT TO that led to the mailbox is one of the user's
            # addresses too, as our should_reply() is given both
            "  sieve_vacation_use_original_recipient = yes",
            "  recipient_delimiter = +",
            "}",
            "",
        ])

    def _location(self, script: Path) -> str:
        script = self._here(script)
        text = script.read_text(encoding="utf-8")
        if _EREJECT.search(text):
            # Pigeonhole 0.5 has no ereject: the same script with reject, written once
            # (runs go on in several threads)
            with self._lock:
                copy = self.translated / f"{script.parent.name}-{script.name}"
                if not copy.exists():
                    tmp = copy.with_suffix(".tmp")
                    tmp.write_text(re.sub(r"\bereject\b", "reject", text), encoding="utf-8")
                    os.chmod(tmp, 0o644)
                    tmp.rename(copy)
            script = copy
        return f"file:{script};bindir={self.bindir}"

    def _here(self, path: Path) -> Path:
        path = path.resolve()
        if self.corpus != self.source:
            return self.corpus / path.relative_to(self.source)
        return path

    def _command(self, scripts: Sequence[Path], message: Path, envelope: EnvelopeSpec,
                 config: Path, execute: bool) -> list[str]:
        cmd = [self.binary, "-c", str(config)]
        if execute:
            cmd.append("-e")
        if envelope.sender:
            cmd += ["-f", envelope.sender]
        cmd += ["-a", envelope.recipient, "-r", envelope.user]
        for before in scripts[:-1]:
            cmd += ["-s", self._location(before)]
        cmd += [self._location(scripts[-1]), str(self._here(message))]
        return cmd

    def _env(self, home: Path) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
               "USER": "rcpt", "LANG": "C.UTF-8"}
        if "TZ" in os.environ:
            env["TZ"] = os.environ["TZ"]
        return env

    def _run(self, cmd: list[str], home: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=TIMEOUT, env=self._env(home), stdin=subprocess.DEVNULL)

    def run(self, scripts: Sequence[Path], message: Path, envelope: EnvelopeSpec, *,
            decide_vacation: bool = True) -> OracleResult:
        """What Pigeonhole does with `message` delivered through `scripts` (a chain run
        as sieve_before scripts and then the last one)."""
        if not scripts:
            raise ValueError("no script")
        ereject = any(_EREJECT.search(self._here(s).read_text(encoding="utf-8"))
                      for s in scripts)
        cmd = self._command(scripts, message, envelope, self.config, execute=False)
        proc = self._run(cmd, self.empty_home)
        actions = parse_test_output(proc.stdout, proc.stderr)
        if ereject:
            actions = [("reject", "ereject", a[2]) if a[0] == "reject" else a
                       for a in actions]
        result = OracleResult((), cmd, proc.stdout, proc.stderr)
        if any(a[0] == "vacation" for a in actions) and decide_vacation:
            decision, result.exec_stdout, result.exec_stderr = self._decide_vacation(
                scripts, message, envelope, actions)
            actions = [a[:1] + (decision,) + a[2:] if a[0] == "vacation" else a
                       for a in actions]
        result.actions = tuple(sorted(actions))
        return result

    def _decide_vacation(self, scripts: Sequence[Path], message: Path,
                         envelope: EnvelopeSpec, actions: list[Action]
                         ) -> tuple[str, str, str]:
        """Run again with -e in a fresh mail home holding every folder stored into (so
        a fileinto does not fail and take the vacation with it)."""
        home = Path(tempfile.mkdtemp(prefix="home-", dir=self.work))
        try:
            maildir = home / "Maildir"
            folders = [""] + ["." + mutf7(a[1]) for a in actions
                              if a[0] == "store" and a[1] != "INBOX"]
            for folder in folders:
                for sub in ("cur", "new", "tmp"):
                    (maildir / folder / sub).mkdir(parents=True, exist_ok=True)
            for p in [home, *home.rglob("*")]:
                os.chown(p, self.uid, self.gid)
            config = home / "dovecot.conf"
            config.write_text(self._config(home))
            cmd = self._command(scripts, message, envelope, config, execute=True)
            proc = self._run(cmd, home)
            return vacation_decision(proc.stderr), proc.stdout, proc.stderr
        finally:
            shutil.rmtree(home, ignore_errors=True)
