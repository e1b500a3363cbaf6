"""Where a message judged spam goes: the recipient's Junk folder, flagged $Junk.

The folder is created when missing (a user may have deleted it), and `$Junk` gets a
keyword letter in the folder's dovecot-keywords, so the delivered file can carry it in
its name (":2,<letter>") and clients see the keyword at once.  Both are prepared in a
thread, once per folder and process (again when the keyword table changes); the keyword
file is written under the folder's dovecot-uidlist lock, the rule every keyword writer
follows.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.maildir.folder import FolderExists
from mailserver.maildir.keywords import KEYWORDS_NAME, KeywordLimit, Keywords
from mailserver.maildir.names import folder_dir
from mailserver.maildir.uidlist import DotLock

log = Logger()

JUNK_KEYWORD = "$Junk"


def _stamp(folder: Path) -> tuple[int, int, int]:
    """Identity of the folder's keyword table file (zeros when there is none)."""
    try:
        st = os.stat(folder / KEYWORDS_NAME)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def keyword_letter(folder: Path, keyword: str) -> tuple[str, tuple[int, int, int]]:
    """The letter of `keyword` in `folder`'s dovecot-keywords, added when missing ("" when
    all 26 letters are taken: the message is then delivered without it), and the table
    file's stamp after that.  Blocking."""
    with DotLock(folder / "dovecot-uidlist"):
        table = Keywords.read(folder)
        try:
            letter = table.letter(keyword)
        except KeywordLimit:
            letter = ""
        if table.dirty:
            table.write()
        return letter, _stamp(folder)


def prepare_folder(create: Callable[[str], None], folder: Path, name: str,
                   keyword: str) -> tuple[Path, str, tuple[int, int, int]]:
    """The folder made when missing (`create`: the account's create_folder, which holds
    no state in memory), then keyword_letter's answer.  Blocking."""
    if not folder.is_dir():
        with contextlib.suppress(FolderExists):  # made meanwhile by a client: fine
            create(name)
    letter, stamp = keyword_letter(folder, keyword)
    return folder, letter, stamp


class JunkFolders:
    """Per user Maildir: (the Junk folder's directory, the ":2,x" info for $Junk)."""

    def __init__(self, store: Any, folder_name: str = "Junk",
                 keyword: str = JUNK_KEYWORD) -> None:
        self.store = store
        self.folder_name = folder_name
        self.keyword = keyword
        self._ready: dict[Path, tuple[Path, tuple[int, int, int], str]] = {}

    def _current(self, user_path: Path) -> tuple[Path, str] | None:
        """The prepared (folder, info) while the folder's keyword table is the one we
        read: a rewritten table (a client's new keyword, the folder deleted and made
        again) may have moved the letter, so it is looked up again then."""
        entry = self._ready.get(user_path)
        if entry is None:
            return None
        path, stamp, info = entry
        if _stamp(path) == stamp:
            return path, info
        del self._ready[user_path]
        return None

    def prepare(self, user_paths: list[Path]) -> defer.Deferred:
        """Make sure every user's Junk folder exists and has its $Junk letter: the disk
        work in threads (a few mkdirs and fsyncs, a dot-lock), all users at once."""
        work = []
        for user_path in dict.fromkeys(user_paths):
            if self._current(user_path) is None:
                create = self.store.account(user_path).create_folder
                d = deferToThread(prepare_folder, create, folder_dir(user_path,
                                                                     self.folder_name),
                                  self.folder_name, self.keyword)
                work.append(d.addCallback(self._prepared, user_path))
        return defer.gatherResults(work, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure if f.check(defer.FirstError) else f)

    def _prepared(self, answer: tuple[Path, str, tuple[int, int, int]], user_path: Path) -> None:
        path, letter, stamp = answer
        self._ready[user_path] = (path, stamp, f":2,{letter}" if letter else "")

    def place(self, user_path: Path) -> tuple[Path, str]:
        """The target and file info for one prepared user (INBOX if not prepared)."""
        current = self._current(user_path)
        return current if current is not None else (user_path, "")
