"""Where a message judged spam goes: the recipient's Junk folder, flagged $Junk.

The folder is created when missing (a user may have deleted it), and `$Junk` gets a
keyword letter in the folder's dovecot-keywords, so the delivered file can carry it in
its name (":2,<letter>") and clients see the keyword at once.  Both are prepared once per
folder and process; the keyword file is written in a thread under the folder's
dovecot-uidlist lock, the rule every keyword writer follows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.maildir.folder import FolderExists
from mailserver.maildir.keywords import KeywordLimit, Keywords
from mailserver.maildir.names import folder_dir
from mailserver.maildir.uidlist import DotLock

log = Logger()

JUNK_KEYWORD = "$Junk"


def keyword_letter(folder: Path, keyword: str) -> str:
    """The letter of `keyword` in `folder`'s dovecot-keywords, added when missing ("" when
    all 26 letters are taken: the message is then delivered without it).  Blocking."""
    with DotLock(folder / "dovecot-uidlist"):
        table = Keywords.read(folder)
        try:
            letter = table.letter(keyword)
        except KeywordLimit:
            return ""
        if table.dirty:
            table.write()
    return letter


class JunkFolders:
    """Per user Maildir: (the Junk folder's directory, the ":2,x" info for $Junk)."""

    def __init__(self, store: Any, folder_name: str = "Junk",
                 keyword: str = JUNK_KEYWORD) -> None:
        self.store = store
        self.folder_name = folder_name
        self.keyword = keyword
        self._ready: dict[Path, tuple[Path, int, str]] = {}

    def _current(self, user_path: Path) -> tuple[Path, str] | None:
        entry = self._ready.get(user_path)
        if entry is None:
            return None
        path, inode, info = entry
        try:
            if os.stat(path).st_ino == inode:
                return path, info
        except OSError:
            pass
        del self._ready[user_path]  # deleted or recreated since: prepare it again
        return None

    @defer.inlineCallbacks
    def prepare(self, user_paths: list[Path]):
        """Make sure every user's Junk folder exists and has its $Junk letter."""
        for user_path in dict.fromkeys(user_paths):
            if self._current(user_path) is not None:
                continue
            path = folder_dir(user_path, self.folder_name)
            if not path.is_dir():
                try:
                    self.store.account(user_path).create_folder(self.folder_name)
                except FolderExists:
                    pass
            letter = yield deferToThread(keyword_letter, path, self.keyword)
            self._ready[user_path] = (path, os.stat(path).st_ino,
                                      f":2,{letter}" if letter else "")

    def place(self, user_path: Path) -> tuple[Path, str]:
        """The target and file info for one prepared user (INBOX if not prepared)."""
        current = self._current(user_path)
        return current if current is not None else (user_path, "")
