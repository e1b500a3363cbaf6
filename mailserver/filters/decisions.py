"""A filter's answer checked before delivery trusts it: plugin code is the operator's, but
a header field or a folder name it gets wrong must not corrupt a stored message or reach
outside the user's Maildir.  No Twisted; every problem is returned as text to log.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from mailserver.filters.api import ACCEPT, ACTIONS, FilterDecision
from mailserver.maildir.names import INBOX, folder_dir_name, is_inbox

MAX_REPLY = 200            # characters of SMTP reply text
MAX_HEADERS = 32           # fields one message may get from all filters together
MAX_FIELD_NAME = 76        # characters: "Name: " still leaves room on a 78-character line
MAX_FIELD_VALUE = 4000     # characters of one value, folding included
MAX_LINE = 998             # RFC 5322 2.1.1: characters of one line, without the CRLF

# RFC 5322 3.6.8: field-name = 1*ftext, ftext = %d33-57 / %d59-126 (printable, not ":").
_FIELD_NAME = re.compile(r"[!-9;-~]{1,%d}" % MAX_FIELD_NAME)
# One physical line of a value: printable ASCII and HTAB only (no CR, LF, NUL, DEL, 8-bit).
_VALUE_LINE = re.compile(r"[\t -~]*")


def clean_reply(text: Any) -> str:
    """The reply text made safe for one SMTP reply line: printable ASCII, white space
    runs (line breaks included) as one space, at most MAX_REPLY characters."""
    if not isinstance(text, str):
        return ""
    printable = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(printable.split())[:MAX_REPLY].rstrip()


def header_problem(name: Any, value: Any) -> str | None:
    """Why (name, value) cannot be added as a header field; None when it can."""
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        return f"bad field name {name!r}"
    if not isinstance(value, str):
        return f"{name}: value is not a string"
    if len(value) > MAX_FIELD_VALUE:
        return f"{name}: value longer than {MAX_FIELD_VALUE} characters"
    # RFC 5322 2.2.3: a line break only as folding, CRLF then white space.
    lines = value.split("\r\n")
    for i, line in enumerate(lines):
        if not _VALUE_LINE.fullmatch(line):
            return f"{name}: value has a bare CR or LF, a control or a non-ASCII character"
        if i and (line[:1] not in (" ", "\t") or not line.strip(" \t")):
            return f"{name}: value has a line break that is not folding"
    if len(name) + 2 + len(lines[0]) > MAX_LINE or any(len(x) > MAX_LINE for x in lines[1:]):
        return f"{name}: a line longer than {MAX_LINE} characters"
    return None


def folder_problem(folder: Any) -> str | None:
    """Why `folder` cannot be the delivery folder (the checks delivery applies to folder
    names, mailserver.maildir.names); None when it can."""
    if not isinstance(folder, str):
        return f"folder {folder!r} is not a string"
    if is_inbox(folder):
        return None
    try:
        folder_dir_name(folder)
    except ValueError as e:
        return f"bad folder name: {e}"
    return None


def checked(decision: Any, room: int = MAX_HEADERS) -> tuple[FilterDecision | None, list[str]]:
    """(the decision as delivery may use it, the problems found).

    None when it is not a FilterDecision or names an unknown action: the filter then
    counts as having accepted with nothing.  Otherwise what is wrong in it is dropped
    alone: a bad header field, a bad folder, header fields beyond `room`.
    """
    if not isinstance(decision, FilterDecision):
        return None, [f"returned {type(decision).__name__}, not a FilterDecision"]
    if decision.action not in ACTIONS:
        return None, [f"unknown action {decision.action!r} (expected one of "
                      f"{', '.join(ACTIONS)})"]
    if decision.action != ACCEPT:
        return FilterDecision(decision.action, clean_reply(decision.reply)), []
    problems: list[str] = []
    headers = _pairs(decision.add_headers, room, problems)
    folder = decision.folder
    if folder is not None:
        problem = folder_problem(folder)
        if problem is not None:
            problems.append(f"{problem}; ignored")
            folder = None
        elif is_inbox(folder):
            folder = INBOX
    return FilterDecision(ACCEPT, "", tuple(headers), folder), problems


def _pairs(add_headers: Any, room: int, problems: list[str]) -> list[tuple[str, str]]:
    """The valid (name, value) pairs, at most `room` of them."""
    if not isinstance(add_headers, (tuple, list)):
        problems.append(f"add_headers is {type(add_headers).__name__}, not a tuple; ignored")
        return []
    good: list[tuple[str, str]] = []
    for i, pair in enumerate(add_headers):
        if len(good) == room:
            problems.append(f"more than {MAX_HEADERS} header fields for one message; "
                            f"{len(add_headers) - i} dropped")
            break
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            problems.append(f"add_headers[{i}] is not a (name, value) pair; dropped")
            continue
        problem = header_problem(*pair)
        if problem is not None:
            problems.append(f"add_headers[{i}]: {problem}; dropped")
            continue
        good.append((pair[0], pair[1]))
    return good


def format_headers(fields: Iterable[tuple[str, str]]) -> bytes:
    """Checked (name, value) fields as header lines (CRLF-terminated) to put in front of
    the stored message."""
    return b"".join(f"{name}: {value}\r\n".encode("ascii") for name, value in fields)
