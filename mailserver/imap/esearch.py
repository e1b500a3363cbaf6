"""ESEARCH (RFC 4731) and SEARCHRES (RFC 5182): the RETURN options of SEARCH (and, with
ESORT, of SORT), the ESEARCH response, and what SAVE keeps for "$"; no I/O, no Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailserver.imap.parser import Arguments, BadCommand, sequence_text

# RFC 4731 3.1 / RFC 5182 2.1 result options.
OPTIONS = (b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE")


@dataclass(frozen=True)
class ReturnOptions:
    """What a SEARCH RETURN (...) asks for; RETURN () means ALL (RFC 4731 3.1)."""

    min: bool = False
    max: bool = False
    all: bool = False
    count: bool = False
    save: bool = False

    @property
    def answers(self) -> bool:
        """Whether an ESEARCH response is sent: SAVE alone sends none (RFC 5182 2.4)."""
        return self.min or self.max or self.all or self.count


def parse_return(args: Arguments) -> ReturnOptions | None:
    """`RETURN (opts) ` at the cursor (then consumed with its trailing space), or None when
    the SEARCH has no RETURN; BadCommand for an unknown or repeated option."""
    if args.upcoming(7).upper() != b"RETURN ":
        return None
    args.atom()
    args.space()
    words = args.paren_list(lambda a: a.atom().upper())
    args.space()
    if len(set(words)) != len(words):
        raise BadCommand("repeated RETURN option")
    unknown = [w for w in words if w not in OPTIONS]
    if unknown:
        raise BadCommand(f"unknown RETURN option {unknown[0].decode('ascii', 'replace')}")
    if not words:
        return ReturnOptions(all=True)
    return ReturnOptions(min=b"MIN" in words, max=b"MAX" in words, all=b"ALL" in words,
                         count=b"COUNT" in words, save=b"SAVE" in words)


def compact_set(numbers: list[int]) -> bytes:
    """Ascending numbers as a sequence-set with ranges: 1:3,5,8:9."""
    return sequence_text(numbers)


def esearch_response(tag: bytes, numbers: list[int], options: ReturnOptions,
                     uid: bool) -> bytes:
    """The untagged ESEARCH line (without "* "), RFC 4731 3.1: MIN, MAX and ALL only when
    something matched; COUNT always when asked.  `numbers`: ascending."""
    out = [b'ESEARCH (TAG "' + tag.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'")']
    if uid:
        out.append(b"UID")
    if numbers:
        if options.min:
            out.append(b"MIN %d" % numbers[0])
        if options.max:
            out.append(b"MAX %d" % numbers[-1])
        if options.all:
            out.append(b"ALL " + compact_set(numbers))
    if options.count:
        out.append(b"COUNT %d" % len(numbers))
    return b" ".join(out)


def saved_result(options: ReturnOptions, uids: list[int]) -> list[int]:
    """What SAVE keeps (RFC 5182 2.1): with MIN and/or MAX but neither ALL nor COUNT, only
    those messages; otherwise every match.  UIDs, ascending."""
    if not uids:
        return []
    if (options.min or options.max) and not (options.all or options.count):
        kept = []
        if options.min:
            kept.append(uids[0])
        if options.max and uids[-1] not in kept:
            kept.append(uids[-1])
        return kept
    return list(uids)
