"""From one recipient's Sieve result to what delivery does, and the folder work it needs.

`plan` turns the actions of mailserver.sieve.actions into stores (folder, flags, header),
redirects, a rejection and a vacation answer, applying the rules that need no I/O:

- keep (explicit or implicit) goes to the default folder: INBOX, or Junk for a message
  judged spam, or a delivery plugin's folder; fileinto names its folder and wins over it;
- the same folder named twice is stored once (RFC 5228 4.1), flags merged;
- a fileinto name that is not a valid folder of this store ("..", "/", NUL, control
  characters, an empty level, over-long) is never used: the message goes to INBOX and a
  note says why;
- a redirect of a message that already carries this user's X-Sieve-Redirected-From mark
  is a loop (as Pigeonhole detects it): not redirected, and the implicit keep it would
  have cancelled is restored.

`prepare_folder` (blocking, for a thread) makes a missing folder when that is wanted and
gives the ":2,<letters>" info a file stored there carries for its flags (system flags as
Maildir letters, keywords as the folder's dovecot-keywords letters).  Twisted-free.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from mailserver.maildir.flags import SYSTEM_FLAG_LETTERS, normalize_flag
from mailserver.maildir.keywords import KeywordLimit, Keywords
from mailserver.maildir.names import INBOX, folder_dir, is_inbox
from mailserver.maildir.uidlist import DotLock
from mailserver.sieve.actions import (Discard, FileInto, Keep, Redirect, Reject, Result,
                                      Vacation)

REDIRECT_MARK = "X-Sieve-Redirected-From"
_MARK_LINE = re.compile(rb"(?im)^x-sieve-redirected-from[ \t]*:[ \t]*<?([^\r\n>]*)>?[ \t]*\r?$")
MAX_FOLDER_CHARS = 200   # characters of a folder name a script may use


@dataclass(frozen=True)
class DefaultFolder:
    """Where keep puts the message: `name` (INBOX, Junk, a plugin's folder), the flags a
    message stored there gets anyway ($Junk), and whether it is made when missing."""

    name: str = INBOX
    flags: tuple[str, ...] = ()
    create: bool = True


INBOX_DEFAULT = DefaultFolder()


@dataclass
class Store:
    """One copy to store for one user."""

    folder: str                        # IMAP name ("INBOX" is the Maildir itself)
    flags: tuple[str, ...] = ()
    header: bytes | None = None        # an edited header block (editheader), else None
    create: bool = False               # make the folder when it is missing
    fallback: bool = False             # may go to INBOX if the folder is missing


@dataclass
class Plan:
    stores: list[Store] = field(default_factory=list)
    redirects: list[Redirect] = field(default_factory=list)
    reject: Reject | None = None
    vacation: Vacation | None = None
    discarded: bool = False
    notes: list[str] = field(default_factory=list)   # what the log line should say
    quiet: bool = False        # no script ran: nothing worth a log line unless noted

    @property
    def summary(self) -> str:
        parts = [("keep" if s.folder == INBOX else f"fileinto {s.folder}")
                 + (f" flags {' '.join(s.flags)}" if s.flags else "") for s in self.stores]
        parts += [f"redirect <{r.address}>" for r in self.redirects]
        if self.reject is not None:
            parts.append("ereject" if self.reject.extended else "reject")
        if self.vacation is not None:
            parts.append("vacation")
        if self.discarded and not self.stores and not self.redirects and self.reject is None:
            parts.append("discard")
        return ", ".join(parts) or "nothing"


def check_folder_name(name: str) -> str | None:
    """Why `name` cannot be a folder a script files into (None: it can)."""
    if not isinstance(name, str) or not name:
        return "empty folder name"
    if len(name) > MAX_FOLDER_CHARS:
        return "folder name too long"
    if "\x00" in name:
        return "NUL in folder name"
    try:
        path = folder_dir(Path("/m"), name)
    except ValueError as e:
        return str(e)
    if path != Path("/m") and path.parent != Path("/m"):
        return "folder name leaves the Maildir"
    return None


def redirect_marks(header: bytes) -> set[str]:
    """The addresses in the header's X-Sieve-Redirected-From fields, lower-cased."""
    if b"edirected-" not in header and b"EDIRECTED-" not in header:
        return set()
    return {m.group(1).strip().decode("utf-8", "replace").lower()
            for m in _MARK_LINE.finditer(header)}


def _merge(a: tuple[str, ...], b: Iterable[str]) -> tuple[str, ...]:
    seen = {f.lower() for f in a}
    out = list(a)
    for flag in b:
        if flag.lower() not in seen:
            seen.add(flag.lower())
            out.append(flag)
    return tuple(out)


def plan(result: Result, header: bytes, user: str, rcpt: str,
         default: DefaultFolder = INBOX_DEFAULT) -> Plan:
    """What to do for one user.  `header`: the header block the script saw (for the
    redirect loop check); `user`: the mailbox's address; `rcpt`: the RCPT that led to it."""
    out = Plan()
    if result.error:
        out.notes.append(f"run-time error: {result.error}")
    by_folder: dict[str, Store] = {}

    def store(folder: str, flags: tuple[str, ...], header: bytes | None, create: bool,
              fallback: bool) -> None:
        key = INBOX if is_inbox(folder) else folder
        known = by_folder.get(key)
        if known is not None:  # RFC 5228 4.1: one copy per folder
            known.flags = _merge(known.flags, flags)
            known.create = known.create or create
            return
        by_folder[key] = s = Store(key, tuple(flags), header, create, fallback)
        out.stores.append(s)

    def keep(flags: tuple[str, ...], header: bytes | None) -> None:
        store(default.name, _merge(tuple(flags), default.flags), header, default.create,
              fallback=default.name.upper() != INBOX)

    marks: set[str] | None = None
    kept_by_loop = False
    cancelled = False   # something other than a looped redirect cancelled the keep
    implicit = False
    for action in result.actions:
        if isinstance(action, Keep):
            implicit = implicit or action.implicit
            keep(action.flags, action.header)
        elif isinstance(action, FileInto):
            cancelled = cancelled or not action.copy
            problem = check_folder_name(action.mailbox)
            if problem is not None:
                out.notes.append(f"fileinto {action.mailbox[:80]!r} refused ({problem}); "
                                 "stored in INBOX")
                store(INBOX, action.flags, action.header, False, False)
            else:
                store(action.mailbox, action.flags, action.header, action.create, True)
        elif isinstance(action, Redirect):
            if marks is None:
                marks = redirect_marks(header)
            if user.lower() in marks or (rcpt and rcpt.lower() in marks):
                out.notes.append(f"not redirected to <{action.address}>: "
                                 f"{REDIRECT_MARK} shows a loop")
                kept_by_loop = kept_by_loop or not action.copy
                continue
            cancelled = cancelled or not action.copy
            if all(r.address.lower() != action.address.lower() for r in out.redirects):
                out.redirects.append(action)
        elif isinstance(action, Reject):
            cancelled = True
            if out.reject is None:
                out.reject = action
        elif isinstance(action, Discard):
            cancelled = True
            out.discarded = True
        elif isinstance(action, Vacation):
            if out.vacation is None:
                out.vacation = action
    if kept_by_loop and not implicit and not cancelled:
        keep((), None)   # the keep the looping redirect cancelled
    return out


def flag_letters(flags: Iterable[str], keyword_letter: Callable[[str], str]) -> str:
    """Maildir info letters for Sieve flags (RFC 5232): system flags as DFRST, keywords
    through `keyword_letter`; flags that are not storable (\\Recent, bad keywords) are
    left out."""
    letters: set[str] = set()
    for flag in flags:
        try:
            flag = normalize_flag(flag)
        except ValueError:
            continue
        if flag.startswith("\\"):
            letters.add(SYSTEM_FLAG_LETTERS[flag])
        else:
            letter = keyword_letter(flag)
            if letter:
                letters.add(letter)
    return "".join(sorted(letters))


def info_for(letters: str) -> str:
    return f":2,{letters}" if letters else ""


def has_keywords(flags: Iterable[str]) -> bool:
    return any(not f.startswith("\\") for f in flags)


def system_letters(flags: Iterable[str]) -> str:
    """The info letters when `flags` has no keyword (no folder file needed)."""
    return flag_letters(flags, lambda _: "")


def prepare_folder(user_path: Path, name: str, flags: tuple[str, ...], create: bool,
                   create_folder: Callable[[str], None]) -> tuple[Path, str] | None:
    """Blocking: the directory of folder `name` of the Maildir at `user_path` and the
    info for `flags`; None when the folder does not exist and is not to be made.

    `create_folder`: the account's create_folder (mkdirs, fsyncs; holds no memory state).
    Keyword letters are taken from (and added to) the folder's dovecot-keywords under its
    dovecot-uidlist lock, as every keyword writer does; a folder whose 26 letters are
    taken gets the message without the keywords that do not fit.
    """
    path = folder_dir(user_path, name)
    if not os.path.isdir(path):
        if not create:
            return None
        try:
            create_folder(name)
        except Exception:
            if not os.path.isdir(path):   # made meanwhile by a client: fine
                raise
    if not has_keywords(flags):
        return path, info_for(system_letters(flags))
    with DotLock(path / "dovecot-uidlist"):
        table = Keywords.read(path)

        def letter(keyword: str) -> str:
            try:
                return table.letter(keyword)
            except KeywordLimit:
                return ""
        letters = flag_letters(flags, letter)
        if table.dirty:
            table.write()
    return path, info_for(letters)
