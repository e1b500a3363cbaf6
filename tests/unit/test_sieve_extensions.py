"""Sieve extensions in evaluation: variables (RFC 5229), imap4flags (RFC 5232), body
(RFC 5173), vacation (RFC 5230, RFC 6131), relational (RFC 5231) with
i;ascii-numeric, subaddress (RFC 5233), date and index (RFC 5260), include (RFC 6609),
editheader (RFC 5293), reject/ereject (RFC 5429), copy (RFC 3894), mailbox (RFC 5490)
and encoded-character (RFC 5228 2.4.2.4)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mailserver.sieve.actions import FileInto, Keep, Redirect, Reject, Vacation
from mailserver.sieve.interpreter import (
    MAX_VARIABLE_SIZE, Envelope, Limits, SieveIncludeBroken, SieveIncludeError, evaluate,
)
from mailserver.sieve.message import Message
from mailserver.sieve.parser import Script, parse

MSG = (
    b"Received: from a.example by b.example; Tue, 1 Apr 1997 10:00:00 +0000\r\n"
    b"Received: from c.example by a.example; Tue, 1 Apr 1997 09:30:00 +0000\r\n"
    b"Date: Tue, 1 Apr 1997 09:06:31 -0800\r\n"
    b"From: Joe <joe+lists@example.org>\r\n"
    b"To: Jane <jane@example.net>, bob@example.net\r\n"
    b"Subject: Hello World\r\n"
    b"X-Tag: alpha\r\n"
    b"X-Tag: beta\r\n"
    b"X-Tag: gamma\r\n"
    b"\r\n"
    b"Plain body text.\r\n"
)
ENV = Envelope("joe+lists@example.org", "jane+work@example.net", "jane@example.net")
NOW = datetime(2024, 2, 29, 23, 30, 5, tzinfo=timezone(timedelta(hours=-5)))


def run(src: str, msg: bytes = MSG, **kw):
    kw.setdefault("now", NOW)
    return evaluate([parse(src)], Message.from_bytes(msg), ENV, **kw)


def boxes(src: str, msg: bytes = MSG, **kw) -> list[str]:
    r = run(src, msg, **kw)
    assert r.error is None, r.error
    return [a.mailbox if isinstance(a, FileInto) else type(a).__name__.lower() for a in r.actions]


def truth(test: str, require: str, msg: bytes = MSG, **kw) -> bool:
    return boxes(f'require ["fileinto", {require}];\nif {test} {{ fileinto "yes"; }}', msg, **kw) == ["yes"]


# -- variables (RFC 5229)


def test_set_and_expand() -> None:
    assert boxes('require ["variables", "fileinto"];\nset "Name" "World";\n'
                 'fileinto "Hello ${name}, ${NAME}, ${unknown}!";') == ["Hello World, World, !"]


def test_rfc5229_examples() -> None:
    """RFC 5229 3 and 4."""
    src = ('require ["variables", "vacation"];\n'
           'set "honorific" "Mr";\nset "first_name" "Wile";\nset "last_name" "Coyote";\n'
           'set "vacation" text:\nDear ${HONORIFIC} ${last_name},\n'
           "I'm out, please leave a message after the meep.\n.\n;\n"
           'vacation "${vacation}";')
    assert run(src).actions[0].reason == ("Dear Mr Coyote,\r\n"
                                          "I'm out, please leave a message after the meep.\r\n")
    src = ('require ["variables", "fileinto"];\nset "a" "juMBlEd lETteRS";\n'
           'set :length "b" "${a}"; set :lower "c" "${a}"; set :upper "d" "${a}";\n'
           'set :lowerfirst "e" "${a}"; set :upperfirst "f" "${a}";\n'
           'set :quotewildcard "g" "Rock*";\n'
           'fileinto "${b}|${c}|${d}|${e}|${f}|${g}|${unknown}|${President, ${Vice-President}}";')
    assert boxes(src) == ["15|jumbled letters|JUMBLED LETTERS|juMBlEd lETteRS|JuMBlEd lETteRS|"
                          "Rock\\*||${President, ${Vice-President}}"]


def test_set_modifiers_in_precedence_order() -> None:
    src = ('require ["variables", "fileinto"];\n'
           'set :upperfirst :lower "a" "hELLO";\n'          # lower first, then upperfirst
           'set :length "b" "héllo";\n'
           'set :quotewildcard "c" "a*b?c\\\\";\n'
           'set :lowerfirst "d" "ABC";\n'
           'set :upper :length "e" "abc";\n'
           'fileinto "${a}|${b}|${c}|${d}|${e}";')
    assert boxes(src) == ["Hello|5|a\\*b\\?c\\\\|aBC|3"]


def test_match_variables_from_matches() -> None:
    src = ('require ["variables", "fileinto"];\n'
           'if header :matches "subject" "*o W*" { fileinto "${0}|${1}|${2}|${3}"; }')
    assert boxes(src) == ["Hello World|Hell|orld|"]
    src = ('require ["variables", "fileinto"];\n'
           'if header :matches "subject" "?ello*" { set "x" "${1}-${2}"; }\n'
           'if header :contains "subject" "World" { fileinto "${x}|${1}"; }')   # :contains keeps them
    assert boxes(src) == ["H- World|H"]


def test_match_variables_leftmost_shortest() -> None:
    """Earlier "*" take as little as they can, the last one the rest (as Pigeonhole)."""
    msg = MSG.replace(b"Subject: Hello World", b"Subject: xaxbxcx test")
    src = ('require ["variables", "fileinto"];\n'
           'if header :matches "subject" "*x*x*" { fileinto "${1}|${2}|${3}"; }\n'
           'if header :matches "subject" "?a*?" { fileinto "${1}|${2}|${3}"; }')
    assert boxes(src, msg) == ["|a|bxcx test", "x|xbxcx tes|t"]


def test_string_test() -> None:
    req = '"variables"'
    assert truth('string :is "${unset}" ""', req)
    assert truth('string :contains ["a", "b"] "b"', req)
    src = ('require ["variables", "fileinto"]; set "x" "foo";\n'
           'if string :matches "${x}bar" "f*bar" { fileinto "${1}"; }')
    assert boxes(src) == ["oo"]


def test_variable_size_is_capped() -> None:
    src = ('require ["variables", "fileinto"];\n'
           'set "a" "' + "x" * 3000 + '";\nset "b" "${a}${a}";\n'
           'set :length "n" "${b}";\nfileinto "${n}";')
    assert boxes(src) == [str(MAX_VARIABLE_SIZE)]


def test_expansion_is_not_recursive() -> None:
    src = ('require ["variables", "fileinto"];\nset "a" "${b}";\nset "b" "x";\n'
           'set "c" "$" ; fileinto "${a}|${c}{b}";')
    assert boxes(src) == ["|${b}"]


# -- imap4flags (RFC 5232)


def test_internal_flags_variable() -> None:
    r = run('require ["imap4flags", "fileinto"];\n'
            'setflag "\\\\seen  \\\\Flagged";\naddflag ["\\\\Seen", "x y"];\n'
            'fileinto "a";\nremoveflag "Y";\nfileinto :flags "only" "b";\nkeep;')
    assert r.actions == [FileInto("a", ("\\Seen", "\\Flagged", "x", "y")),
                         FileInto("b", ("only",)), Keep(("\\Seen", "\\Flagged", "x"))]


def test_implicit_keep_takes_the_flags() -> None:
    r = run('require "imap4flags"; addflag "\\\\Answered";', default_flags=("$Junk",))
    assert r.actions == [Keep(("$Junk", "\\Answered"), implicit=True)]


def test_hasflag() -> None:
    req = '"imap4flags", "variables", "relational", "comparator-i;ascii-numeric"'
    pre = 'setflag "\\\\Seen \\\\Flagged"; addflag "var" "a b";'
    assert boxes(f'require ["fileinto", {req}]; {pre}\n'
                 'if hasflag :is "\\\\seen" { fileinto "1"; }\n'
                 'if hasflag :is "\\\\Seen \\\\Flagged" { fileinto "2"; }\n'
                 'if hasflag :is "\\\\Deleted" { fileinto "no"; }\n'
                 'if hasflag :contains "var" "b" { fileinto "3"; }\n'
                 'if hasflag :count "eq" :comparator "i;ascii-numeric" "2" { fileinto "4"; }\n'
                 'if string :is "${var}" "a b" { fileinto "5"; }') == ["1", "2", "3", "4", "5"]


# -- body (RFC 5173)

MULTI = (
    b"From: a@b.example\r\nSubject: multi\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
    b"This is the prologue.\r\n"
    b"--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=E9 au lait\r\n"
    b"--XX\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"PGI+SGVsbG88L2I+IHdvcmxk\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\n\r\nbinary-stuff\r\n"
    b"--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: x@y.example\r\n\r\n"
    b"inner body text\r\n"
    b"--XX--\r\nThe epilogue.\r\n"
)


@pytest.mark.parametrize("test, expected", [
    ('body :contains "Café"', True),                        # :text decodes QP and Latin-1
    ('body :contains "Caf=E9"', False),
    ('body :raw :contains "Caf=E9"', True),
    ('body :raw :contains "PGI+SGVsbG88"', True),
    ('body :content "text/html" :contains "<b>Hello"', True),
    ('body :content "text/plain" :contains "<b>Hello"', False),
    ('body :content "text" :contains "Hello</b>"', True),
    ('body :text :contains "binary-stuff"', False),
    ('body :content "application" :contains "binary-stuff"', True),
    ('body :content "multipart" :contains "prologue"', True),
    ('body :content "multipart" :contains "epilogue"', True),
    ('body :text :contains "prologue"', False),
    ('body :content "message/rfc822" :contains "inner"', True),
    ('body :content "message/rfc822" :contains "inner body"', False),
    ('body :text :contains "inner body"', True),
    ('body :content "" :contains "inner body"', True),
    ('body :matches "*au lait*"', True),
])
def test_body_transforms(test: str, expected: bool) -> None:
    assert truth(test, '"body"', MULTI) is expected


def test_body_single_part_decoding() -> None:
    msg = (b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nw6lsw6h2ZQ==\r\n")
    assert truth('body :contains "élève"', '"body"', msg)
    assert not truth('body :raw :contains "élève"', '"body"', msg)


def test_body_search_is_bounded_to_the_first_mebibyte() -> None:
    head = b"Subject: big\r\n\r\n"
    early = head + b"needle " + b"x" * (1 << 20)
    late = head + b"x" * (1 << 20) + b" needle"
    assert truth('body :contains "needle"', '"body"', early)
    assert not truth('body :contains "needle"', '"body"', late)
    assert not truth('body :raw :contains "needle"', '"body"', late)


# -- vacation (RFC 5230, RFC 6131)


def test_vacation_defaults() -> None:
    r = run('require "vacation"; vacation "Away.";')
    v = r.actions[0]
    assert isinstance(v, Vacation) and v.reason == "Away." and v.period == 7 * 86400
    assert v.subject is None and v.from_address is None and v.addresses == () and not v.mime
    assert v.handle and r.actions[1] == Keep(implicit=True)       # vacation keeps the message
    # RFC 5230 4.2: the same arguments give the same handle, other arguments another one
    assert run('require "vacation"; vacation "Away.";').actions[0].handle == v.handle
    assert run('require "vacation"; vacation :subject "s" "Away.";').actions[0].handle != v.handle


def test_vacation_arguments_and_clamping() -> None:
    r = run('require ["vacation", "variables"]; set "who" "Jane";\n'
            'vacation :days 3 :subject "Re: ${who}" :from "jane@example.net"\n'
            ':addresses ["j@example.net", "jane@example.org"] :mime :handle "h1" "${who} is away";')
    assert r.actions[0] == Vacation("Jane is away", "Re: Jane", "jane@example.net",
                                    ("j@example.net", "jane@example.org"), 3 * 86400.0, "h1", True)
    limits = Limits(vacation_min_period=3600, vacation_max_period=10 * 86400)
    assert run('require "vacation-seconds"; vacation :seconds 60 "x";',
               limits=limits).actions[0].period == 3600
    assert run('require "vacation-seconds"; vacation :seconds 7200 "x";',
               limits=limits).actions[0].period == 7200
    assert run('require "vacation"; vacation :days 365 "x";', limits=limits).actions[0].period == 10 * 86400


def test_second_vacation_is_an_error() -> None:
    r = run('require "vacation"; vacation "a"; vacation "b";')
    assert r.actions == [Keep(implicit=True)] and "second vacation" in r.error


# -- relational (RFC 5231) with i;ascii-numeric (RFC 4790 9.1)

REL = '"relational", "comparator-i;ascii-numeric"'


@pytest.mark.parametrize("test, expected", [
    ('header :count "eq" :comparator "i;ascii-numeric" "x-tag" "3"', True),
    ('header :count "ne" :comparator "i;ascii-numeric" "x-tag" "3"', False),
    ('header :count "eq" :comparator "i;ascii-numeric" "x-none" "0"', True),
    ('address :count "ge" :comparator "i;ascii-numeric" ["to", "from"] "3"', True),
    ('address :count "gt" :comparator "i;ascii-numeric" ["to", "from"] "3"', False),
    ('header :value "gt" "x-tag" "beta"', True),          # "gamma" > "beta"
    ('header :value "lt" "x-tag" "ALPHA"', False),         # casemap: nothing below "alpha"
    ('header :value "le" "x-tag" "ALPHA"', True),
    ('string :value "lt" :comparator "i;ascii-numeric" "9" "10"', True),
    ('string :value "lt" "9" "10"', False),               # as text, "9" > "10"
    ('string :value "eq" :comparator "i;ascii-numeric" "abc" "xyz"', True),   # both infinite
    ('string :value "gt" :comparator "i;ascii-numeric" "abc" "99999"', True),
    ('string :is :comparator "i;ascii-numeric" "007" "7"', True),
    ('string :count "eq" :comparator "i;ascii-numeric" ["a", "", "b"] "2"', True),
])
def test_relational(test: str, expected: bool) -> None:
    assert truth(test, REL + ', "variables"') is expected


# -- subaddress (RFC 5233)


def test_subaddress() -> None:
    req = '"subaddress", "envelope"'
    assert truth('address :user :is "from" "joe"', req)
    assert truth('address :detail :is "from" "lists"', req)
    assert truth('envelope :detail :is "to" "work"', req)
    assert truth('envelope :user :is "to" "jane"', req)
    assert not truth('address :detail :matches "to" "*"', req)     # no "+": no detail
    msg = MSG.replace(b"joe+lists@", b"joe+@")
    assert truth('address :detail :is "from" ""', req, msg)


# -- date and index (RFC 5260)


@pytest.mark.parametrize("part, value", [
    ("year", "1997"), ("month", "04"), ("day", "01"), ("date", "1997-04-01"),
    ("julian", "50539"), ("hour", "09"), ("minute", "06"), ("second", "31"),
    ("time", "09:06:31"), ("iso8601", "1997-04-01T09:06:31-08:00"),
    ("std11", "Tue, 01 Apr 1997 09:06:31 -0800"), ("zone", "-0800"), ("weekday", "2"),
])
def test_date_parts_original_zone(part: str, value: str) -> None:
    assert truth(f'date :originalzone :is "date" "{part}" "{value}"', '"date"')


def test_date_zones() -> None:
    req = '"date"'
    assert truth('date :zone "+0000" :is "date" "iso8601" "1997-04-01T17:06:31Z"', req)
    assert truth('date :zone "+0530" :is "date" "time" "22:36:31"', req)
    # no zone: the local zone, which is the zone of `now`
    assert truth('date :is "date" "time" "12:06:31"', req)
    assert truth('date :is "date" "zone" "-0500"', req)
    assert not truth('date :is "date" "year" "1997"', req, MSG.replace(b"Date: Tue", b"Date: garbage Tue"))
    assert not truth('date :is "x-none" "year" "1997"', req)
    assert not truth('date :is "date" "nosuchpart" "1997"', req)
    # An offset no clock has ("+2500", "-9959") is a malformed zone: the local one, and
    # the run goes on (it ended in an internal error, no rule of the script applied).
    for zone in ("+2500", "-9959", "+2400"):
        assert truth(f'date :zone "{zone}" :is "date" "zone" "-0500"', req)
        assert truth(f'currentdate :zone "{zone}" :value "ge" "year" "2000"', '"date", "relational"')


def test_date_of_received_is_after_the_semicolon() -> None:
    req = '"date", "index"'
    assert truth('date :originalzone :index 1 "received" "time" "10:00:00"', req)
    assert truth('date :originalzone :index 1 :last "received" "time" "09:30:00"', req)


def test_currentdate() -> None:
    req = '"date", "relational"'
    assert truth('currentdate :is "date" "2024-02-29"', req)
    assert truth('currentdate :zone "+0000" :is "date" "2024-03-01"', req)
    assert truth('currentdate :zone "+0000" :is "weekday" "5"', req)
    assert truth('currentdate :value "ge" "date" "2024-01-01"', req)
    assert not truth('currentdate :value "lt" "date" "2024-01-01"', req)
    assert truth('currentdate :is "julian" "60369"', req)


def test_index_on_header_and_address() -> None:
    req = '"index"'
    assert truth('header :index 2 :is "x-tag" "beta"', req)
    assert truth('header :index 1 :last :is "x-tag" "gamma"', req)
    assert not truth('header :index 1 :is "x-tag" "beta"', req)
    assert not truth('header :index 4 :is "x-tag" "gamma"', req)
    assert truth('address :index 1 :is "to" "bob@example.net"', req)


# -- include (RFC 6609)


def loader(scripts: dict[tuple[str, bool], str]):
    calls = []

    def load(name: str, is_global: bool) -> Script:
        calls.append((name, is_global))
        try:
            return parse(scripts[(name, is_global)], name)
        except KeyError:
            raise SieveIncludeError(f"no script {name!r}") from None
    return load, calls


def test_include_personal_and_global() -> None:
    load, calls = loader({
        ("p", False): 'require "fileinto"; fileinto "from-personal";',
        ("g", True): 'require "fileinto"; fileinto "from-global";',
    })
    src = 'require "include"; include "p"; include :global "g";'
    assert boxes(src, include=load) == ["from-personal", "from-global"]
    assert calls == [("p", False), ("g", True)]


def test_include_once_optional_and_missing() -> None:
    load, calls = loader({("p", False): 'require ["fileinto", "copy"]; fileinto :copy "p";'})
    r = run('require "include"; include :once "p"; include :once "p"; include :optional "nope";',
            include=load)
    assert r.error is None and calls == [("p", False), ("nope", False)]
    r = run('require "include"; include "nope";', include=load)
    assert r.actions == [Keep(implicit=True)] and "nope" in r.error
    r = run('require "include"; include "p";')           # no loader at all
    assert r.actions == [Keep(implicit=True)] and r.error

    def broken(name: str, is_global: bool) -> Script:
        raise SieveIncludeBroken(f"{name} does not compile")
    r = run('require ["include", "fileinto"]; include :optional "b"; fileinto "x";',
            include=broken)
    assert r.actions == [Keep(implicit=True)] and "does not compile" in r.error


def test_include_return_and_stop() -> None:
    load, _ = loader({
        ("r", False): 'require ["include", "fileinto"]; fileinto "before-return"; return; fileinto "never";',
        ("s", False): 'require "fileinto"; fileinto "s"; stop;',
    })
    assert boxes('require ["include", "fileinto"]; include "r"; fileinto "after";',
                 include=load) == ["before-return", "after"]
    assert boxes('require ["include", "fileinto"]; include "s"; fileinto "after";', include=load) == ["s"]
    assert boxes('require ["include", "fileinto"]; return; fileinto "no";', include=load) == ["keep"]


def test_include_recursion_and_depth() -> None:
    load, _ = loader({("self", False): 'require "include"; include "self";'})
    r = run('require "include"; include "self";', include=load)
    assert "recursive" in r.error and r.actions == [Keep(implicit=True)]
    chain = {(f"s{i}", False): f'require "include"; include "s{i + 1}";' for i in range(20)}
    chain[("s20", False)] = "keep;"
    load, _ = loader(chain)
    r = run('require "include"; include "s0";', include=load, limits=Limits(max_include_depth=5))
    assert "deeper than 5" in r.error
    assert run('require "include"; include "s0";', include=load,
               limits=Limits(max_include_depth=30)).error is None


def test_global_variables() -> None:
    load, _ = loader({
        ("sub", False): 'require ["include", "variables"]; global "who";\n'
                        'set "who" "${who}+sub"; set "local" "hidden";',
    })
    src = ('require ["include", "variables", "fileinto"]; global "who";\n'
           'set "who" "main"; include "sub";\n'
           'fileinto "${who}|${local}|${global.who}";')
    assert boxes(src, include=load) == ["main+sub||main+sub"]


# -- editheader (RFC 5293)


def test_addheader_and_later_tests_see_it() -> None:
    r = run('require ["editheader", "fileinto", "index"];\n'
            'addheader "X-New" "first";\naddheader :last "X-New" "last";\n'
            'if header :index 1 :is "x-new" "first" { fileinto "a"; }\n'
            'if header :index 1 :last :is "x-new" "last" { fileinto "b"; }')
    assert [a.mailbox for a in r.actions] == ["a", "b"]
    header = r.actions[0].header
    assert header.startswith(b"X-New: first\r\nReceived: ")
    assert header.endswith(b"X-Tag: gamma\r\nX-New: last\r\n")


def test_deleteheader_forms() -> None:
    def header_after(cmd: str) -> bytes:
        r = run(f'require ["editheader"]; {cmd} keep;')
        return r.actions[0].header
    assert b"X-Tag" not in header_after('deleteheader "x-tag";')
    h = header_after('deleteheader :index 2 "X-Tag";')
    assert b"X-Tag: alpha\r\nX-Tag: gamma\r\n" in h
    h = header_after('deleteheader :index 1 :last "X-Tag";')
    assert b"X-Tag: alpha\r\nX-Tag: beta\r\n\r\n" not in h and b"gamma" not in h
    h = header_after('deleteheader :matches "X-Tag" ["b*", "g*"];')
    assert b"X-Tag: alpha\r\n" in h and b"beta" not in h and b"gamma" not in h
    assert header_after('deleteheader :index 1 :contains "X-Tag" "zzz";') is None   # unchanged


def test_protected_fields_are_not_deleted() -> None:
    r = run('require ["editheader"]; deleteheader "received"; deleteheader "Auto-Submitted"; keep;')
    assert r.actions == [Keep()]        # nothing changed: no header snapshot


def test_unedited_messages_carry_no_header() -> None:
    r = run('require ["editheader", "fileinto"]; fileinto "a"; addheader "X-A" "1"; fileinto "b";')
    assert r.actions[0].header is None and r.actions[1].header.startswith(b"X-A: 1\r\n")


def test_addheader_encodes_and_folds() -> None:
    r = run('require ["editheader", "fileinto"];\naddheader "X-Utf" "héllo wörld";\n'
            'addheader "X-Long" "' + "word " * 40 + '";\n'
            'if header :is "x-utf" "héllo wörld" { fileinto "y"; }')
    h = r.actions[0].header
    assert h.startswith(b"X-Long: word") and b"X-Utf: =?utf-8?" in h
    assert all(len(line) <= 80 for line in h.split(b"\r\n"))
    assert r.actions[0].mailbox == "y"


def test_addheader_size_limit() -> None:
    r = run('require "editheader"; addheader "X-Big" "' + "x" * 5000 + '";')
    assert "larger than" in r.error


# -- reject (RFC 5429) and its conflicts


@pytest.mark.parametrize("src", [
    'require ["reject", "fileinto"]; fileinto "x"; reject "no";',
    'require ["reject"]; keep; reject "no";',
    'require ["reject"]; reject "no"; keep;',
    'require ["reject"]; redirect "a@b.example"; reject "no";',
    'require ["reject", "vacation"]; vacation "x"; reject "no";',
    'require ["reject", "copy", "fileinto"]; fileinto :copy "x"; reject "no";',
    'require ["reject", "ereject"]; ereject "x"; reject "no";',
])
def test_reject_conflicts_are_errors(src: str) -> None:
    r = run(src)
    assert r.actions == [Keep(implicit=True)] and r.error


def test_reject_cancels_implicit_keep_and_allows_discard() -> None:
    assert run('require "reject"; discard; reject "x";').actions[1] == Reject("x")
    assert run('require "reject"; reject "x";').actions == [Reject("x")]


# -- mailbox (RFC 5490)


def test_mailboxexists() -> None:
    req = '"mailbox"'
    assert not truth('mailboxexists "INBOX"', req)        # no callback: false
    exists = {"INBOX", "Work"}.__contains__
    assert truth('mailboxexists ["INBOX", "Work"]', req, mailbox_exists=exists)
    assert not truth('mailboxexists ["INBOX", "Play"]', req, mailbox_exists=exists)


def test_redirect_copy() -> None:
    r = run('require "copy"; redirect :copy "a@b.example";')
    assert r.actions == [Redirect("a@b.example", copy=True), Keep(implicit=True)]
