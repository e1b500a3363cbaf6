"""CREATE-SPECIAL-USE (RFC 6154 3): CREATE's "(USE (attributes))" parameter.

    create        = "CREATE" SP mailbox [create-params]          ; RFC 4466 2.2
    create-params = SP "(" create-param *( SP create-param) ")"
    create-param  =/ "USE" SP "(" [use-attr *(SP use-attr)] ")"  ; RFC 6154 6
    use-attr      = "\\All" / "\\Archive" / ... / "\\" atom

A malformed or unknown parameter is BAD (RFC 4466 2.1).  Well-formed attributes this
server cannot give a folder are refused with NO [USEATTR] (RFC 6154 3, 7): an unknown
one, \\All and \\Flagged (they name virtual views of all or of flagged messages, which a
Maildir folder is not), and more than one attribute at once.
"""

from __future__ import annotations

from mailserver.imap.parser import Arguments, BadCommand
from mailserver.maildir.specialuse import ATTRIBUTES

CREATE_SPECIAL_USE_CAPABILITY = b"CREATE-SPECIAL-USE"
MAX_USE_ATTRIBUTES = 16
_CANONICAL = {a.lower().encode(): a for a in ATTRIBUTES}


class UseAttrRefused(ValueError):
    """Attributes that are well-formed but cannot be given (NO [USEATTR])."""


def parse_create_params(args: Arguments) -> list[bytes] | None:
    """The USE attributes of CREATE's optional parameter list (the cursor after the
    mailbox name); None without USE.  Leaves the cursor at the end of the command."""
    if args.at_end():
        return None
    args.space()
    params = args.paren_list(_create_param)
    args.end()
    if not params or len(params) != len({name for name, _ in params}):
        raise BadCommand("invalid CREATE parameters")
    return params[0][1]


def _create_param(args: Arguments) -> tuple[bytes, list[bytes]]:
    name = args.atom().upper()
    if name != b"USE":
        raise BadCommand(f"unknown CREATE parameter {name.decode('ascii', 'replace')}")
    args.space()
    attributes = args.paren_list(_use_attr)
    if len(attributes) > MAX_USE_ATTRIBUTES:
        raise BadCommand("too many USE attributes")
    return name, attributes


def _use_attr(args: Arguments) -> bytes:
    flag = args.flag()
    if not flag.startswith(b"\\") or flag == b"\\*":
        raise BadCommand("a USE attribute is a backslash and an atom")
    return flag


def chosen_use(attributes: list[bytes] | None) -> str | None:
    """The one special use to store (None for no USE or USE ()); UseAttrRefused for what
    this server cannot give."""
    if not attributes:
        return None
    known = [_CANONICAL.get(a.lower()) for a in attributes]
    if None in known:
        raise UseAttrRefused("Unsupported special-use attribute")
    if len(set(known)) > 1:
        raise UseAttrRefused("Only one special-use attribute per mailbox")
    return known[0]
