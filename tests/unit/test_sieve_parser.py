"""The Sieve parser (mailserver.sieve.parser): RFC 5228 8 grammar, validation of every
command, test, tag and extension, the line and reason of each syntax error, and the
bounds a hostile script meets (size, nesting, numbers, strings)."""

from __future__ import annotations

import pytest

from mailserver.sieve.parser import CAPABILITIES, Script, SieveSyntaxError, parse, walk


def error(src: str | bytes, **kw) -> SieveSyntaxError:
    with pytest.raises(SieveSyntaxError) as info:
        parse(src, **kw)
    return info.value


# -- the API


def test_capabilities_name_what_the_interpreter_supports() -> None:
    for ext in ("fileinto", "copy", "mailbox", "reject", "ereject", "envelope", "imap4flags",
                "body", "variables", "vacation", "vacation-seconds", "relational", "subaddress",
                "date", "index", "include", "editheader", "encoded-character",
                "comparator-i;ascii-numeric"):
        assert ext in CAPABILITIES
    assert "regex" not in CAPABILITIES
    for ext in CAPABILITIES:        # every capability can be required
        parse(f'require "{ext}";')


def test_script_is_immutable_with_requires_and_includes() -> None:
    s = parse('require ["include", "fileinto"];\ninclude "a";\ninclude :global "b";\n'
              'include :personal :once "a";\nfileinto "x";', "main")
    assert isinstance(s, Script)
    assert s.name == "main"
    assert s.requires == frozenset({"include", "fileinto"})
    assert s.includes == (("a", False), ("b", True))
    with pytest.raises(AttributeError):
        s.name = "other"        # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.commands[0].name = "x"    # type: ignore[misc]


def test_error_str_is_line_and_reason() -> None:
    e = error("keep;\n\nfoo;")
    assert e.line == 3
    assert "unknown command 'foo'" in e.reason
    assert str(e) == f"line 3: {e.reason}"


def test_bytes_and_str_sources() -> None:
    assert parse(b'if header :is "subject" "caf\xc3\xa9" { keep; }').commands
    assert parse('if header :is "subject" "café" { keep; }').commands
    e = error(b'keep;\nif header :is "subject" "caf\xe9" { keep; }')
    assert e.line == 2 and "UTF-8" in e.reason


def test_empty_script_and_comments() -> None:
    assert parse("").commands == ()
    s = parse("# a comment\n/* a\nbracket\ncomment */ keep; # trailing\n")
    assert [n.name for n in s.commands] == ["keep"]


# -- RFC 5228 2.4 lexical


def test_quoted_string_escapes() -> None:
    s = parse(r'if header :is "subject" "a\"b\\c\d" { keep; }')
    assert s.commands[0].tests[0].args[1] == ('a"b\\cd',)


def test_multiline_string_and_dot_stuffing() -> None:
    src = 'require "vacation";\nvacation text:\nline one\n..dotted\n.\n;\n'
    assert parse(src).commands[1].args[0] == "line one\r\n.dotted\r\n"     # CRLF, as 8.1 has it
    src = 'require "vacation";\nvacation text: # comment\r\nx\r\n.\r\n;'
    assert parse(src).commands[1].args[0] == "x\r\n"


def test_numbers_with_quantifiers() -> None:
    s = parse("if size :over 10K { keep; } if size :under 2M { keep; } if size :over 1g { keep; }")
    assert [c.tests[0].args[0] for c in s.commands] == [10 * 1024, 2 << 20, 1 << 30]


def test_identifiers_and_tags_are_case_insensitive() -> None:
    s = parse('IF Header :CONTAINS "Subject" "x" { Keep; }')
    assert s.commands[0].name == "if"
    assert s.commands[0].tests[0].tag("match") == ("contains", None)


def test_capability_names_are_case_sensitive() -> None:
    assert 'unknown extension "Fileinto"' in error('require "Fileinto";').reason


# -- syntax errors: line and reason


@pytest.mark.parametrize("src, line, words", [
    ("keep;\nfoo;", 2, "unknown command 'foo'"),
    ('keep;\nfileinto "x";', 2, 'missing require "fileinto"'),
    ('require "regex";', 1, 'unsupported extension "regex"'),
    ('require "nosuch";', 1, 'unknown extension "nosuch"'),
    ("keep :bogus;", 1, "unknown tag :bogus"),
    ('keep;\nif header :contains "subject" "abc {\nkeep;\n}', 2, "unterminated string"),
    ("keep\nkeep;", 1, "missing ';' after the keep command"),
    ("keep", 1, "missing ';'"),
    ("if true { keep; }\nelsif true { keep; }\nkeep;\nelsif true { keep; }", 4, "elsif without a preceding if"),
    ("else { keep; }", 1, "else without a preceding if"),
    ("if true { keep; }\nrequire \"fileinto\";", 2, "require must come before"),
    ("if true { keep;", 1, "missing '}'"),
    ("keep; }", 1, "'}' without a matching '{'"),
    ("/* never closed", 1, "unterminated bracket comment"),
    ('require "vacation";\nvacation text:\nno end\n', 2, "unterminated multi-line string"),
    ('"string";', 1, "expected a command"),
    ("if (true) { keep; }", 1, "not a test list"),
    ("if allof true { keep; }", 1, "needs a test list"),
    ("if anyof () { keep; }", 1, "expected a test"),
    ("if true keep;", 1, "takes no test"),
    ("if { keep; }", 1, "needs a test"),
    ("if true;", 1, "needs a block"),
    ("keep { keep; }", 1, "takes no block"),
    ("if header \"subject\" { keep; }", 1, "needs 2 positional arguments"),
    ('if header "a" "b" "c" { keep; }', 1, "too many arguments"),
    ('if exists ["a", ] { keep; }', 1, "expected a string in the string list"),
    ('if exists ["a" "b"] { keep; }', 1, "expected ',' or ']'"),
    ("if size 100 { keep; }", 1, "size needs :over or :under"),
    ('if size :over "1" { keep; }', 1, "must be a number"),
    ('redirect ["a@b.c"];', 1, "must be a string"),
    ("if size :over 99999999999999999999999 { keep; }", 1, "number exceeds"),
    ("if size :over 12abc { keep; }", 1, "bad number"),
    ('if header :is :contains "s" "x" { keep; }', 1, "conflicts with an earlier tag"),
    ('if header :comparator "i;nosuch" "s" "x" { keep; }', 1, "unknown comparator"),
    ('if header :comparator "i;ascii-numeric" "s" "x" { keep; }', 1, 'require "comparator-i;ascii-numeric"'),
    ('require "fileinto";\nfileinto "x" :copy;', 2, "after the positional arguments"),
    ('redirect "not an address";', 1, "not a valid address"),
    ("keep :flags \"x\";", 1, 'missing require "imap4flags"'),
    ('if true { keep; }\nif header :index 1 "s" "x" { keep; }', 2, 'missing require "index"'),
    ("stop true;", 1, "missing ';'"),
    ("keep; @", 1, "unexpected character"),
    ("if not (true) { keep; }", 1, "not a test list"),
    ("if header :contains \"s\" { keep; }", 1, "needs 2 positional"),
    ("if truth { keep; }", 1, "unknown test 'truth'"),
    ("if keep { keep; }", 1, "unknown test 'keep' (it is a command)"),
    ("header \"a\" \"b\";", 1, "unknown command 'header' (it is a test)"),
])
def test_syntax_errors(src: str, line: int, words: str) -> None:
    e = error(src)
    assert e.line == line, str(e)
    assert words in e.reason, str(e)


def test_missing_semicolon_between_commands_reports_the_first() -> None:
    e = error('require "fileinto";\nkeep\nfileinto "x";')
    assert (e.line, e.reason) == (2, "missing ';' after the keep command")


# -- extensions: shapes accepted, misuse refused


def test_every_command_and_test_parses() -> None:
    src = r'''
require ["fileinto", "reject", "envelope", "encoded-character", "copy", "mailbox",
         "imap4flags", "body", "variables", "vacation", "vacation-seconds", "relational",
         "subaddress", "date", "index", "include", "editheader", "ereject",
         "comparator-i;ascii-numeric"];
if allof (address :domain :is "from" "example.com",
          envelope :user :is "to" "joe",
          envelope :detail :contains "to" "x",
          header :index 2 :last :contains "received" "x",
          not exists "x-spam",
          size :under 1M,
          anyof (true, false),
          body :raw :contains "x", body :content ["text", "image/png"] :contains "x",
          body :text :matches "*x*",
          string :count "ge" :comparator "i;ascii-numeric" "${a}" "1",
          hasflag :is "\\Seen", hasflag "var" ["a", "b"],
          date :zone "+0100" :value "ge" "date" "year" "2020",
          date :originalzone :index 1 "date" "weekday" "0",
          currentdate :zone "-0500" "month" "01",
          mailboxexists "INBOX") {
    fileinto :copy :create :flags "\\Seen" "a.b";
    redirect :copy "a@example.com";
    keep :flags ["a", "b"];
    setflag "\\Seen"; addflag "v" "x"; removeflag ["x"];
    set :lower :upperfirst "v" "Value";
    addheader :last "X-A" "b"; deleteheader :index 1 :last :contains "X-A" "b";
    deleteheader "X-B";
    include :global :once :optional "g"; global ["x"]; return;
    vacation :seconds 60 :subject "s" :from "me@example.com" :addresses ["a@b.c"]
             :mime :handle "h" "reason";
    discard; stop;
} elsif true { reject "no"; } else { ereject "no"; }
'''
    s = parse(src)
    names = {n.name for n in walk(s.commands)}
    assert {"fileinto", "redirect", "setflag", "deleteheader", "include", "vacation",
            "mailboxexists", "currentdate", "hasflag", "string", "body", "reject",
            "ereject"} <= names


def test_tag_values_are_normalised() -> None:
    s = parse('require ["relational", "body", "date"];\n'
              'if header :count "GE" "s" "1" { keep; }\n'
              'if body :content "text" :contains "x" { keep; }\n'
              'if date :originalzone "date" "year" "1" { keep; }\n'
              'if header :comparator "I;Octet" "s" "1" { keep; }\n')
    tests = [c.tests[0] for c in s.commands[1:]]
    assert tests[0].tag("match") == ("count", "ge")
    assert tests[1].tag("transform") == ("content", ("text",))
    assert tests[2].tag("zone") == ("originalzone", None)
    assert tests[3].tag("comparator") == "i;octet"


@pytest.mark.parametrize("src, words", [
    ('require "relational"; if header :value "xx" "s" "1" { keep; }', "relational operator"),
    ('require "comparator-i;ascii-numeric"; if header :contains :comparator "i;ascii-numeric" "s" "1" { keep; }',
     "cannot do :contains"),
    ('require "index"; if header :last "s" "x" { keep; }', ":last needs :index"),
    ('require "index"; if header :index 0 "s" "x" { keep; }', ":index must be 1 or more"),
    ('require "envelope"; if envelope "bar" "x" { keep; }', "envelope part 'bar'"),
    ('if address :is ["from", "subject"] "x" { keep; }', "not allowed in the address test"),
    ('require "variables"; set "1" "x";', "match variable"),
    ('require "variables"; set "a-b" "x";', "invalid variable name"),
    ('require "variables"; set "global.x" "1";', "invalid variable name"),
    ('require "variables"; if string "${a.b}" "x" { keep; }', "unknown namespace"),
    ('require "include"; global "x";', 'global needs require "variables"'),
    ('require ["include", "variables"]; global "x.y";', "invalid variable name"),
    ('require ["include", "variables"]; include "a/b";', "invalid script name"),
    ('require ["include", "variables"]; include "${x}";', "constant script name"),
    ('require "vacation"; vacation :from "bad" "x";', "not a valid address"),
    ('require "vacation"; vacation :seconds 5 "x";', 'missing require "vacation-seconds"'),
    ('require "vacation"; vacation :days 1 :days 2 "x";', "conflicts"),
    ('require "editheader"; addheader "a b" "x";', "invalid header field name"),
    ('require "editheader"; deleteheader "a:b";', "invalid header field name"),
    ('require "imap4flags"; setflag "a" "b" "c";', "too many arguments"),
    ('require "encoded-character"; if header "s" "${unicode:D800}" { keep; }', "invalid unicode"),
    ('require "fileinto"; fileinto :create "x";', 'missing require "mailbox"'),
    ('require "fileinto"; fileinto :copy "x";', 'missing require "copy"'),
    ('require "body"; if body :raw :text "x" { keep; }', "conflicts"),
    ('require "date"; if date :zone "+0100" :originalzone "date" "year" "x" { keep; }', "conflicts"),
    ('require "variables"; set :lower :upper "a" "b";', "conflicts"),
    ('require "reject"; ereject "x";', 'missing require "ereject"'),
    ('require "include"; include :personal :global "x";', "conflicts"),
])
def test_extension_misuse(src: str, words: str) -> None:
    assert words in error(src).reason


def test_vacation_seconds_implies_vacation() -> None:
    assert "vacation" in parse('require "vacation-seconds"; vacation :seconds 10 "x";').requires


def test_implicit_comparators_may_be_required() -> None:
    parse('require ["comparator-i;octet", "comparator-i;ascii-casemap"];')


def test_optional_positional_arguments() -> None:
    s = parse('require ["imap4flags", "editheader"];\nsetflag "\\\\Seen";\n'
              'setflag "v" "x";\ndeleteheader "x";\ndeleteheader "x" "y";')
    assert s.commands[1].args == (None, ("\\Seen",))
    assert s.commands[2].args == ("v", ("x",))
    assert s.commands[3].args == ("x", None)
    assert s.commands[4].args == ("x", ("y",))


def test_encoded_character() -> None:
    s = parse('require "encoded-character";\n'
              'if header :is "s" "${hex:41 42}${unicode:263a}${hex:zz}${HEX:43}" { keep; }')
    assert s.commands[1].tests[0].args[1] == ("AB\u263a${hex:zz}C",)
    # without the require, the text is literal
    s = parse('if header :is "s" "${hex:41}" { keep; }')
    assert s.commands[0].tests[0].args[1] == ("${hex:41}",)


def test_variables_without_require_are_literal_text() -> None:
    s = parse('if header :is "s" "${a.b}" { keep; }')       # no "variables": no namespace check
    assert s.commands[0].tests[0].args[1] == ("${a.b}",)


# -- bounds


def test_max_size() -> None:
    src = "keep;\n" * 100
    assert parse(src, max_size=len(src))
    e = error(src, max_size=len(src) - 1)
    assert e.line == 1 and "too large" in e.reason
    e = error(src.encode(), max_size=10)
    assert "too large" in e.reason


def test_nesting_depth_limit() -> None:
    ok = "if true {" * 64 + "keep;" + "}" * 64
    parse(ok)
    deep = "if true {" * 65 + "keep;" + "}" * 65
    assert "nested more than 64" in error(deep).reason
    tests = "if " + "not " * 63 + "true { keep; }"       # 64 tests, one inside the other
    parse(tests)
    assert "nested more than 64" in error("if " + "not " * 65 + "true { keep; }").reason
    lists = "if " + "anyof(" * 70 + "true" + ")" * 70 + " { keep; }"
    assert "nested more than 64" in error(lists).reason
    # far deeper input still answers with an error, not a crash
    assert "nested" in error("if true {" * 10000).reason


def test_string_length_limit() -> None:
    big = "x" * ((1 << 20) + 1)
    assert "string too long" in error(f'if header :is "s" "{big}" {{ keep; }}').reason


def test_require_appears_only_first() -> None:
    parse('require "fileinto";\nrequire "copy";\nfileinto :copy "x";')
    assert "require must come before" in error('if true { require "fileinto"; }').reason
