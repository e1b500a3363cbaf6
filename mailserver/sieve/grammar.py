"""What each Sieve command and test accepts: tags, positional arguments, tests, block,
and the extension that must be required first.  The parser validates against this table
so a script that parses never fails on its shape at run time.  Twisted-free."""

from __future__ import annotations

from dataclasses import dataclass, field

# Every extension the interpreter implements: ManageSieve's SIEVE capability and what
# `require` accepts (RFC 5228 3.2).  "regex" is deliberately absent.
CAPABILITIES: tuple[str, ...] = (
    "fileinto", "reject", "ereject", "envelope", "encoded-character",
    "comparator-i;ascii-numeric", "copy", "mailbox", "imap4flags", "body", "variables", "vacation", "vacation-seconds",
    "relational", "subaddress", "date", "index", "include", "editheader",
)

# Always available (RFC 5228 2.7.3), so `require` accepts them without their being listed.
IMPLICIT = frozenset({"comparator-i;octet", "comparator-i;ascii-casemap"})

# Extensions known to exist but not implemented: `require` names them as unsupported.
KNOWN_UNSUPPORTED = frozenset({
    "regex", "enotify", "notify", "environment", "spamtest", "spamtestplus", "virustest",
    "duplicate", "foreverypart", "mime", "extracttext", "ihave", "imapsieve", "mboxmetadata",
    "servermetadata", "special-use", "convert", "extlists", "fcc", "redirect-dsn",
    "redirect-deliverby", "envelope-dsn", "envelope-deliverby", "vnd.dovecot.debug",
    "vnd.dovecot.environment", "vnd.dovecot.report",
})

COMPARATORS = {
    "i;octet": None,
    "i;ascii-casemap": None,
    "i;ascii-numeric": "comparator-i;ascii-numeric",     # RFC 4790 9.1
}
RELATIONAL_OPS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})   # RFC 5231 4
DATE_PARTS = frozenset({                                            # RFC 5260 4.2
    "year", "month", "day", "date", "julian", "hour", "minute", "second", "time",
    "iso8601", "std11", "zone", "weekday",
})
# RFC 5228 5.1: the address test looks at fields holding addresses (Pigeonhole's list).
ADDRESS_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "sender", "resent-from", "resent-to", "reply-to",
    "resent-reply-to", "resent-sender", "resent-cc", "resent-bcc", "for-approval",
    "for-handling", "for-comment", "apparently-to", "errors-to", "delivered-to",
    "return-receipt-to", "x-admin", "read-receipt-to", "x-confirm-reading-to",
    "return-receipt-requested", "registered-mail-reply-requested-by", "mail-followup-to",
    "mail-reply-to", "abuse-reports-to", "x-complaints-to", "x-report-abuse-to", "x-beenthere",
    "disposition-notification-to",
})
ENVELOPE_PARTS = frozenset({"from", "to"})                          # RFC 5228 5.4
SET_MODIFIERS = {                                                   # RFC 5229 4.1
    "lower": 40, "upper": 40, "lowerfirst": 30, "upperfirst": 30,
    "quotewildcard": 20, "length": 10,
}

# Argument types: "string" (a single string, not a bracketed list), "strings"
# (a string-list), "number".


@dataclass(frozen=True)
class Tag:
    group: str                  # mutually exclusive tags share a group; the node keeps group -> value
    arg: str | None = None      # type of the tag's own argument
    ext: str | None = None      # extension that must be required


@dataclass(frozen=True)
class Spec:
    kind: str                                   # "command", "test", "control"
    ext: str | None = None
    tags: dict[str, Tag] = field(default_factory=dict)
    args: tuple[str, ...] = ()                  # positional types
    optional_first: bool = False                # the first positional may be left out
    optional_last: bool = False                 # the last positional may be left out
    tests: str = "none"                         # "none", "one", "list"
    block: bool = False


_COMPARATOR = {"comparator": Tag("comparator", "string")}
_MATCH = {
    "is": Tag("match"), "contains": Tag("match"), "matches": Tag("match"),
    "value": Tag("match", "string", "relational"), "count": Tag("match", "string", "relational"),
}
_ADDRESS_PART = {
    "all": Tag("address_part"), "localpart": Tag("address_part"), "domain": Tag("address_part"),
    "user": Tag("address_part", None, "subaddress"), "detail": Tag("address_part", None, "subaddress"),
}
_INDEX = {"index": Tag("index", "number", "index"), "last": Tag("last", None, "index")}
_MATCHING = {**_COMPARATOR, **_MATCH}
_FLAGS = {"flags": Tag("flags", "strings", "imap4flags")}

SPECS: dict[str, Spec] = {
    # RFC 5228 3: control
    "require": Spec("control", args=("strings",)),
    "if": Spec("control", tests="one", block=True),
    "elsif": Spec("control", tests="one", block=True),
    "else": Spec("control", block=True),
    "stop": Spec("control"),
    # RFC 5228 4: actions
    "keep": Spec("command", tags=dict(_FLAGS)),
    "discard": Spec("command"),
    "redirect": Spec("command", tags={"copy": Tag("copy", None, "copy")}, args=("string",)),
    "fileinto": Spec("command", "fileinto", tags={
        "copy": Tag("copy", None, "copy"), "create": Tag("create", None, "mailbox"), **_FLAGS,
    }, args=("string",)),
    # RFC 5429
    "reject": Spec("command", "reject", args=("string",)),
    "ereject": Spec("command", "ereject", args=("string",)),
    # RFC 5230 / RFC 6131
    "vacation": Spec("command", "vacation", tags={
        "days": Tag("period", "number"), "seconds": Tag("period", "number", "vacation-seconds"),
        "subject": Tag("subject", "string"), "from": Tag("from", "string"),
        "addresses": Tag("addresses", "strings"), "mime": Tag("mime"),
        "handle": Tag("handle", "string"),
    }, args=("string",)),
    # RFC 5232
    "setflag": Spec("command", "imap4flags", args=("string", "strings"), optional_first=True),
    "addflag": Spec("command", "imap4flags", args=("string", "strings"), optional_first=True),
    "removeflag": Spec("command", "imap4flags", args=("string", "strings"), optional_first=True),
    # RFC 5229
    "set": Spec("command", "variables", tags={
        name: Tag(f"mod{prec}") for name, prec in SET_MODIFIERS.items()
    }, args=("string", "string")),
    # RFC 5293
    "addheader": Spec("command", "editheader", tags={"last": Tag("last")},
                      args=("string", "string")),
    "deleteheader": Spec("command", "editheader", tags={
        "index": Tag("index", "number"), "last": Tag("last"), **_MATCHING,
    }, args=("string", "strings"), optional_last=True),
    # RFC 6609
    "include": Spec("command", "include", tags={
        "personal": Tag("location"), "global": Tag("location"),
        "once": Tag("once"), "optional": Tag("optional"),
    }, args=("string",)),
    "return": Spec("command", "include"),
    "global": Spec("command", "include", args=("strings",)),
    # RFC 5228 5: tests
    "address": Spec("test", tags={**_MATCHING, **_ADDRESS_PART, **_INDEX},
                    args=("strings", "strings")),
    "envelope": Spec("test", "envelope", tags={**_MATCHING, **_ADDRESS_PART},
                     args=("strings", "strings")),
    "header": Spec("test", tags={**_MATCHING, **_INDEX}, args=("strings", "strings")),
    "exists": Spec("test", args=("strings",)),
    "size": Spec("test", tags={"over": Tag("size"), "under": Tag("size")}, args=("number",)),
    "allof": Spec("test", tests="list"),
    "anyof": Spec("test", tests="list"),
    "not": Spec("test", tests="one"),
    "true": Spec("test"),
    "false": Spec("test"),
    # RFC 5173
    "body": Spec("test", "body", tags={
        **_MATCHING, "raw": Tag("transform"), "content": Tag("transform", "strings"),
        "text": Tag("transform"),
    }, args=("strings",)),
    # RFC 5229 5
    "string": Spec("test", "variables", tags=dict(_MATCHING), args=("strings", "strings")),
    # RFC 5232 4
    "hasflag": Spec("test", "imap4flags", tags=dict(_MATCHING), args=("strings", "strings"),
                    optional_first=True),
    # RFC 5260
    "date": Spec("test", "date", tags={
        **_MATCHING, **_INDEX, "zone": Tag("zone", "string"), "originalzone": Tag("zone"),
    }, args=("string", "string", "strings")),
    "currentdate": Spec("test", "date", tags={**_MATCHING, "zone": Tag("zone", "string")},
                        args=("string", "strings")),
    # RFC 5490 3.1
    "mailboxexists": Spec("test", "mailbox", args=("strings",)),
}

ACTION_COMMANDS = frozenset({
    "keep", "discard", "redirect", "fileinto", "reject", "ereject", "vacation",
})
