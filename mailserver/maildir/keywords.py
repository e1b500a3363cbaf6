"""dovecot-keywords: which IMAP keyword each letter a..z of a folder's file names means.

The file has one line per keyword, "<index> <name>", index 0..25 standing for the
letters a..z.  A folder can therefore hold at most 26 distinct keywords in its file
names; asking for a 27th raises KeywordLimit, which the caller reports to the client.

Names are matched case-insensitively and keep the spelling they were first stored with,
as in Dovecot.  A letter found in a file name without a line here gets the name
"unknown-<index>", again as Dovecot names it, and that name is stored on the next write.

Dovecot notices a rewrite by the file's mtime in whole seconds, so every write moves the
mtime forward by at least one second.  Writes happen only while the folder's
dovecot-uidlist lock is held, the rule Dovecot follows too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mailserver.maildir.uidlist import FileStamp, replace_locked

log = logging.getLogger(__name__)

KEYWORDS_NAME = "dovecot-keywords"
MAX_KEYWORDS = 26


class KeywordLimit(ValueError):
    """All 26 keyword letters of the folder are taken."""


def letter_of(index: int) -> str:
    return chr(ord("a") + index)


class Keywords:
    """The keyword table of one folder directory (not thread-safe: the folder serializes)."""

    def __init__(self, folder_dir: Path) -> None:
        self.dir = Path(folder_dir)
        self._names: list[str | None] = [None] * MAX_KEYWORDS
        self._by_lower: dict[str, int] = {}
        self.stamp: FileStamp | None = None
        self.dirty = False

    @property
    def path(self) -> Path:
        return self.dir / KEYWORDS_NAME

    @classmethod
    def read(cls, folder_dir: Path) -> Keywords:
        """The table on disk (empty when there is no file or it cannot be read)."""
        kw = cls(folder_dir)
        try:
            with open(kw.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return kw
        except OSError as e:
            log.error("cannot read %s: %s", str(kw.path), e)
            return kw
        kw.stamp = FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)
        kw._parse(data)
        return kw

    def _parse(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").split("\n"):
            index_s, sep, name = line.rstrip("\r").partition(" ")
            if not sep or not index_s.isdigit() or not name:
                if line.strip():
                    log.warning("%s: ignoring line %r", str(self.path), line)
                continue
            index = int(index_s)
            if index >= MAX_KEYWORDS or name.lower() in self._by_lower:
                log.warning("%s: ignoring line %r", str(self.path), line)
                continue
            self._set(index, name)

    def _set(self, index: int, name: str) -> None:
        old = self._names[index]
        if old is not None:
            self._by_lower.pop(old.lower(), None)
        self._names[index] = name
        self._by_lower[name.lower()] = index

    def changed_on_disk(self) -> bool:
        return FileStamp.of(self.path) != self.stamp

    # -- lookups ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The defined keywords, in letter order."""
        return [n for n in self._names if n is not None]

    def name_at(self, index: int) -> str:
        """The keyword of letter number `index`, naming an unknown letter as Dovecot does."""
        name = self._names[index]
        if name is None:
            name = f"unknown-{index}"
            while name.lower() in self._by_lower:
                name += "?"
            self._set(index, name)
            self.dirty = True
        return name

    def canonical(self, name: str) -> str:
        """`name` as spelled in the table, or unchanged if it is not there."""
        index = self._by_lower.get(name.lower())
        return name if index is None else self._names[index]  # type: ignore[return-value]

    def has(self, name: str) -> bool:
        return name.lower() in self._by_lower

    def letter(self, name: str) -> str:
        """The letter of keyword `name`, taking the first free one if it has none.

        KeywordLimit when all 26 are taken; a new keyword makes the table dirty (write it
        before any file name uses the letter).
        """
        index = self._by_lower.get(name.lower())
        if index is None:
            try:
                index = self._names.index(None)
            except ValueError:
                raise KeywordLimit(
                    f"no keyword letter left for {name!r}: a folder holds at most "
                    f"{MAX_KEYWORDS} keywords") from None
            self._set(index, name)
            self.dirty = True
        return letter_of(index)

    # -- writing ----------------------------------------------------------------------------

    def serialize(self) -> bytes:
        return "".join(f"{i} {n}\n" for i, n in enumerate(self._names)
                       if n is not None).encode("utf-8")

    def write(self) -> None:
        """Replace the file (blocking; hold the folder's uid list lock)."""
        previous = self.stamp.mtime_ns // 1_000_000_000 if self.stamp else 0
        current = FileStamp.of(self.path)
        if current is not None:
            previous = max(previous, current.mtime_ns // 1_000_000_000)
        mtime = max(int(time.time()), previous + 1)
        replace_locked(self.path, self.serialize(), mtime=mtime, break_lock=True)
        self.stamp = FileStamp.of(self.path)
        self.dirty = False
