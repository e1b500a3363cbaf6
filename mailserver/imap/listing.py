"""LIST and LSUB (RFC 3501 6.3.8, 6.3.9) with LIST-EXTENDED (RFC 5258), the SPECIAL-USE
selection and return options (RFC 6154) and RETURN (STATUS ...) (RFC 5819).

Patterns are matched against the names as they travel on the wire (modified UTF-7,
RFC 3501 5.1.3), not against decoded names: any pattern the grammar allows (list-char =
ATOM-CHAR / list-wildcards / resp-specials, RFC 3501 9) is answered OK with whatever it
matches, also one whose "&" does not start valid modified UTF-7.

Which names a command returns (RFC 5258 3, 3.5; RFC 3501 6.3.9):

- a name is *selected* when it satisfies every selection option: it exists (no option),
  is subscribed (SUBSCRIBED, also names of folders that no longer exist: \\NonExistent),
  has a special use (SPECIAL-USE);
- LSUB and RECURSIVEMATCH also return a name that matches a pattern but is not selected
  itself when a selected descendant does not match any pattern (the "%" case): LSUB marks
  it \\Noselect, LIST gives it the CHILDINFO extended data item instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from mailserver.imap.fetch import STATUS_ITEMS
from mailserver.imap.parser import Arguments, BadCommand
from mailserver.maildir import SEPARATOR, encode_folder_name, is_inbox

_SELECTION = {b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"}
_RETURN = {b"SUBSCRIBED", b"CHILDREN", b"SPECIAL-USE"}
_SPECIAL_USE = {"\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive", "\\All", "\\Flagged"}
_HIERARCHY = {"\\Noselect", "\\HasChildren", "\\HasNoChildren", "\\NonExistent"}
DELIMITER = SEPARATOR.encode()


@dataclass
class ListRequest:
    """A parsed LIST or LSUB command; patterns and reference in their wire form."""

    reference: str
    patterns: list[str]
    lsub: bool = False
    extended: bool = False          # RFC 5258 syntax used: "" is no delimiter request
    subscribed: bool = False        # selection SUBSCRIBED
    special_use: bool = False       # selection SPECIAL-USE
    recursive: bool = False         # selection RECURSIVEMATCH
    return_subscribed: bool = False
    status_items: list[bytes] = field(default_factory=list)


def parse_list(args: Arguments, lsub: bool, utf8: bool = False) -> ListRequest:
    """LIST [(selection)] reference (pattern | (patterns)) [RETURN (options)] (RFC 5258 6);
    LSUB reference pattern (RFC 3501 6.3.9).  `utf8`: the client enabled UTF8=ACCEPT, its
    reference and patterns are UTF-8 (RFC 6855 3)."""
    args.space()
    req = ListRequest("", [], lsub=lsub, subscribed=lsub)
    if not lsub and args.peek() == b"(":
        req.extended = True
        chosen = {o.upper() for o in args.paren_list(Arguments.atom)}
        if chosen - _SELECTION:
            raise BadCommand("unknown LIST selection option")
        req.subscribed = req.return_subscribed = b"SUBSCRIBED" in chosen  # RFC 5258 3.1
        req.special_use = b"SPECIAL-USE" in chosen
        req.recursive = b"RECURSIVEMATCH" in chosen
        if req.recursive and not req.subscribed:  # RFC 5258 3.1: needs an option to modify
            raise BadCommand("RECURSIVEMATCH needs the SUBSCRIBED selection option")
        args.space()
    req.reference = wire_text(args.astring(), utf8)
    args.space()
    if not lsub and args.peek() == b"(":
        req.extended = True
        req.patterns = [wire_text(p, utf8) for p in args.paren_list(Arguments.list_mailbox)]
    else:
        req.patterns = [wire_text(args.list_mailbox(), utf8)]
    if not lsub and args.maybe_space():
        if args.atom().upper() != b"RETURN":
            raise BadCommand("expected RETURN")
        args.space()
        req.extended = True
        _parse_return(req, args.paren_list(lambda a: a.generic()))
    args.end()
    return req


def _parse_return(req: ListRequest, options: list[Any]) -> None:
    i = 0
    while i < len(options):
        option = options[i]
        name = option.upper() if isinstance(option, bytes) else b""
        if name == b"STATUS" and i + 1 < len(options) and isinstance(options[i + 1], list):
            items = [bytes(x).upper() for x in options[i + 1]]  # RFC 5819
            if any(x not in STATUS_ITEMS for x in items):
                raise BadCommand("unknown STATUS item")
            req.status_items = list(dict.fromkeys(items))
            i += 1
        elif name not in _RETURN:
            raise BadCommand("unknown LIST return option")
        elif name == b"SUBSCRIBED":
            req.return_subscribed = True
        i += 1


def wire_text(raw: bytes, utf8: bool = False) -> str:
    """A name or pattern as the wire form names are compared in: modified UTF-7 as sent;
    raw UTF-8 (which some clients send) encoded to modified UTF-7; with `utf8` (RFC 6855)
    everything is UTF-8, "&" included."""
    if not utf8:
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            pass
    try:
        return encode_folder_name(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw.decode("latin-1")  # matches no folder name: those are ASCII on the wire


def wire_name(name: str) -> str:
    return "INBOX" if name == "INBOX" else encode_folder_name(name)


class _Pattern:
    """One canonical LIST pattern (RFC 3501 6.3.8): reference and pattern joined, "*" any
    characters, "%" any but the delimiter; INBOX as the first level in any case."""

    def __init__(self, reference: str, pattern: str) -> None:
        full = reference + pattern
        self.glob = _Glob(full)
        self.inbox = (_Glob("INBOX" + full[5:])
                      if is_inbox(full[:5]) and full[:5] != "INBOX" else None)

    def match(self, wire: str) -> bool:
        if self.glob.match(wire):
            return True
        return (self.inbox is not None and wire.partition(SEPARATOR)[0] == "INBOX"
                and self.inbox.match(wire))


class _Glob:
    """A LIST pattern matched in time linear in the name, whatever its wildcards: the
    pattern's positions as bits of one integer, all advanced together for each character
    of the name.  (A backtracking regular expression took 70 s for "*a*a*a*a*a*b" against
    one 200-character name, in the reactor.)"""

    def __init__(self, pattern: str) -> None:
        chars: list[str] = []
        for c in pattern:   # a run of wildcards is one: "*" if it holds one, else "%"
            if c in "*%" and chars and chars[-1] in "*%":
                if c == "*":
                    chars[-1] = "*"
                continue
            chars.append(c)
        self.star = self.percent = 0
        self.literal: dict[str, int] = {}
        for i, c in enumerate(chars):
            bit = 1 << i
            if c == "*":
                self.star |= bit
            elif c == "%":
                self.percent |= bit
            else:
                self.literal[c] = self.literal.get(c, 0) | bit
        self.wild = self.star | self.percent
        self.end = 1 << len(chars)

    def _skip(self, states: int) -> int:
        """`states` and the positions after their wildcards (which may match nothing);
        no wildcard follows another, so one step is all."""
        return states | ((states & self.wild) << 1)

    def match(self, name: str) -> bool:
        states = self._skip(1)
        for ch in name:
            stay = states & (self.star if ch == SEPARATOR else self.wild)
            states = self._skip(((states & self.literal.get(ch, 0)) << 1) | stay)
            if not states:
                return False
        return bool(states & self.end)


@dataclass
class ListEntry:
    """One LIST/LSUB response: the name, its attributes, extended data, selectable."""

    name: str
    attributes: list[str]
    childinfo: bool = False

    @property
    def selectable(self) -> bool:
        return not {"\\Noselect", "\\NonExistent"} & set(self.attributes)

    def line(self, verb: bytes, wire: bytes) -> bytes:
        text = verb + b" (" + " ".join(self.attributes).encode() + b') "' + DELIMITER + b'" ' + wire
        if self.childinfo:
            text += b' ("CHILDINFO" ("SUBSCRIBED"))'
        return text


def list_entries(account: Any, req: ListRequest) -> Iterator[ListEntry]:
    """The responses to `req` over `account`'s folders and subscriptions, INBOX first."""
    if req.patterns == [""] and not req.extended:  # RFC 3501 6.3.8: the delimiter
        yield ListEntry("", ["\\Noselect"])
        return
    patterns = [_Pattern(req.reference, p) for p in req.patterns if p]
    if not patterns:
        return  # RFC 5258 3: an extended LIST ignores "" for matching
    folders = {e.name: list(e.attributes) for e in account.list_folders()}
    subscribed = set(account.subscriptions()) if req.subscribed or req.return_subscribed \
        else set()
    selected = set(subscribed) if req.subscribed else set(folders)
    if req.special_use:
        selected = {n for n in selected if _SPECIAL_USE & set(folders.get(n, ()))}
    below: dict[str, list[str]] = {}  # name -> its selected descendants
    if req.lsub or req.recursive:
        for name in selected:
            for parent in _ancestors(name):
                below.setdefault(parent, []).append(name)
    candidates = selected | set(below)
    wire = {n: wire_name(n) for n in candidates}

    def matches(name: str) -> bool:
        return any(p.match(wire[name]) for p in patterns)

    for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
        if not matches(name):
            continue
        descendants = below.get(name, ())
        if name not in selected and all(matches(d) for d in descendants):
            continue  # RFC 3501 6.3.9, RFC 5258 3.5: for a descendant not listed itself
        attrs = folders.get(name) or ["\\NonExistent", "\\HasNoChildren"]
        if req.lsub:  # \Noselect: not subscribed itself, or no folder (RFC 3501 6.3.9)
            attrs = [a for a in attrs if a in _HIERARCHY and a != "\\NonExistent"]
            if name not in selected or name not in folders:
                attrs = ["\\Noselect"] + [a for a in attrs if a != "\\Noselect"]
        elif req.return_subscribed and name in subscribed:
            attrs = attrs + ["\\Subscribed"]
        yield ListEntry(name, attrs, childinfo=req.recursive and bool(descendants))


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(SEPARATOR)
    for i in range(1, len(parts)):
        yield SEPARATOR.join(parts[:i])
