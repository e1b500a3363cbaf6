"""IMAP flags <-> the Maildir info suffix ":2,<letters>", exactly as Dovecot reads and writes it.

A message file is named `<base>:2,<letters>`.  The base (everything before the first ':')
never changes, so it is what the uid list and the index key on; the letters change with
the flags, by renaming the file.

Letters (Maildir spec, Dovecot):

- D \\Draft, F \\Flagged, R \\Answered, S \\Seen, T \\Deleted;
- a..z: keyword number 0..25 of the folder's dovecot-keywords file;
- any other letter (P "passed", or whatever another program set) has no IMAP meaning for
  Dovecot, which keeps it on every rename: so do we.

Letters are written sorted by ASCII code, as Dovecot writes them.  An info part that does
not start with "2," carries no flags (Dovecot ignores it and replaces it on the next flag
change); a second ",..." group after the letters is kept untouched, as Dovecot does.
"""

from __future__ import annotations

from typing import Callable, Iterable

def escape_hostname(hostname: str) -> str:
    """The host part of a Maildir name: '/' and ':' (and ',') escaped as Dovecot does.

    ':' starts the flags suffix and ',' the S= field, '/' cannot be in a file name.
    """
    return hostname.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")


INFO_SEP = ":"
FLAGS_PREFIX = "2,"
RECENT = "\\Recent"

SYSTEM_FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_SYSTEM_FLAGS = {v: k for k, v in SYSTEM_FLAG_LETTERS.items()}
_SYSTEM_BY_LOWER = {k.lower(): k for k in SYSTEM_FLAG_LETTERS}

# IMAP flag-keyword = atom: no CTL, SP, "(){%*\"\\]" (RFC 3501 9).  Keywords also end up
# in dovecot-keywords lines, so nothing that could break a line gets in.
_KEYWORD_SPECIALS = frozenset('(){%*"\\]')
KEYWORD_MAX = 128


def split_filename(filename: str) -> tuple[str, str | None]:
    """(base, info) of a message file name; info is what follows the first ':' or None."""
    base, sep, info = filename.partition(INFO_SEP)
    return base, (info if sep else None)


def base_name(filename: str) -> str:
    """The stable part of a message file name: everything before the first ':'."""
    return filename.partition(INFO_SEP)[0]


def info_letters(filename: str) -> str:
    """The flag letters of a file name ("" when it has no ":2," info)."""
    _, info = split_filename(filename)
    if info is None or not info.startswith(FLAGS_PREFIX):
        return ""
    return info[len(FLAGS_PREFIX):].partition(",")[0]


def size_from_base(base: str) -> int | None:
    """The ",S=<size>" field of a base name (the file's exact size), None if absent.
    (By partition: a folder's first open asks this of every message.)"""
    _, found, rest = base.partition(",S=")
    if not found:
        return None
    digits = rest.partition(",")[0]
    return int(digits) if digits.isdigit() and digits.isascii() else None   # not "²"


def normalize_flag(flag: str) -> str:
    """A flag in its canonical case; ValueError for \\Recent, unknown system flags and
    keywords that are not IMAP atoms."""
    if not isinstance(flag, str) or not flag:
        raise ValueError("empty flag")
    if flag.startswith("\\"):
        canonical = _SYSTEM_BY_LOWER.get(flag.lower())
        if canonical is None:
            raise ValueError(f"not a storable system flag: {flag!r}")
        return canonical
    if len(flag) > KEYWORD_MAX or not all(
            "\x21" <= c <= "\x7e" and c not in _KEYWORD_SPECIALS for c in flag):
        raise ValueError(f"not a valid keyword: {flag!r}")
    return flag


def is_keyword(flag: str) -> bool:
    return not flag.startswith("\\")


def flags_from_letters(letters: str, keyword_at: Callable[[int], str | None]) -> frozenset[str]:
    """IMAP flags for info letters; `keyword_at(i)` names keyword letter i (a=0)."""
    flags: set[str] = set()
    for ch in letters:
        system = LETTER_SYSTEM_FLAGS.get(ch)
        if system is not None:
            flags.add(system)
        elif "a" <= ch <= "z":
            name = keyword_at(ord(ch) - ord("a"))
            if name is not None:
                flags.add(name)
    return frozenset(flags)


def letters_for(flags: Iterable[str], letter_of_keyword: Callable[[str], str]) -> str:
    """Info letters for IMAP `flags` (\\Recent and other non-storable ones left out).

    `letter_of_keyword(name)` gives a keyword's letter, allocating it if need be (it may
    raise when the folder has no letter left).
    """
    out: set[str] = set()
    for flag in flags:
        if flag.startswith("\\"):
            letter = SYSTEM_FLAG_LETTERS.get(flag)
            if letter is not None:
                out.add(letter)
        else:
            out.add(letter_of_keyword(flag))
    return "".join(sorted(out))


def with_letters(filename: str, letters: str) -> str:
    """`filename` renamed to carry exactly the known `letters`.

    Letters we do not interpret (uppercase other than DFRST, anything non-alphabetic) are
    kept, and so is a second ",..." group: the result sorts all letters by ASCII, which
    is the order Dovecot writes.
    """
    base, info = split_filename(filename)
    kept = ""
    tail = ""
    if info is not None and info.startswith(FLAGS_PREFIX):
        old, comma, rest = info[len(FLAGS_PREFIX):].partition(",")
        kept = "".join(c for c in old if c not in LETTER_SYSTEM_FLAGS and not "a" <= c <= "z")
        tail = comma + rest
    merged = "".join(sorted(set(letters) | set(kept)))
    return f"{base}{INFO_SEP}{FLAGS_PREFIX}{merged}{tail}"


def apply_mode(current: frozenset[str], flags: frozenset[str], mode: str) -> frozenset[str]:
    """The flags after a STORE in `mode` "set", "add" or "remove"."""
    if mode == "set":
        return flags
    if mode == "add":
        return current | flags
    if mode == "remove":
        return current - flags
    raise ValueError(f"unknown flag store mode: {mode!r}")
