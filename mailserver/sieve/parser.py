"""Sieve scripts (RFC 5228 8) parsed and validated into an immutable Script.

Validation is complete: every command and test is known, its extension required, its
tags and arguments of the right type and number, constants checked (comparators,
relational operators, addresses, header names, variable names), so the interpreter never
meets a malformed node.  Nesting is refused beyond MAX_NESTING levels.  Twisted-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

from mailserver.sieve import grammar
from mailserver.sieve.grammar import CAPABILITIES, SPECS, Spec
from mailserver.sieve.lexer import SieveSyntaxError, Token, tokenize

__all__ = ["CAPABILITIES", "Node", "Script", "SieveSyntaxError", "parse"]

MAX_NESTING = 64                # blocks and tests inside one another

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAME = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
# RFC 5229 3: variable-ref = "${" [namespace] variable-name "}"
VARIABLE_REF = re.compile(r"\$\{((?:[A-Za-z_][A-Za-z0-9_]*\.(?:" + _NAME + r"\.)*)?" + _NAME + r")\}")
# RFC 5228 2.4.2.4
_ENCODED = re.compile(r"\$\{(hex|unicode):([0-9A-Fa-f \t\r\n]*)\}", re.IGNORECASE)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")          # RFC 5322 3.6.8 ftext
_ZONE = re.compile(r"[+-][0-9]{4}\Z")


@dataclass(frozen=True, slots=True)
class Node:
    """A validated command or test.  `tags`: (group, value) pairs as grammar.py names the
    groups (e.g. ("match", ("contains", None)), ("comparator", "i;octet")); `args`: the
    positional arguments (str, tuple[str, ...] or int; None for a left-out optional one)."""

    name: str
    line: int
    tags: tuple[tuple[str, Any], ...] = ()
    args: tuple[Any, ...] = ()
    tests: tuple["Node", ...] = ()
    block: tuple["Node", ...] = ()

    def tag(self, group: str, default: Any = None) -> Any:
        for key, value in self.tags:
            if key == group:
                return value
        return default


@dataclass(frozen=True, eq=False)
class Script:
    """A parsed script.  `includes`: (name, is_global) of every include it names, so the
    storage can check they exist; `requires`: the extensions it required."""

    name: str
    requires: frozenset[str]
    includes: tuple[tuple[str, bool], ...]
    commands: tuple[Node, ...]


# ---------------------------------------------------------------------------- syntax


@dataclass(slots=True)
class _Raw:
    """A command or test as written, before validation."""

    name: str
    text: str
    line: int
    args: list[Token]                   # "tag", "num", "str" tokens; lists as kind "list"
    tests: list["_Raw"]
    test_list: bool                     # tests given in parentheses
    block: list["_Raw"] | None          # None: ended with ";" (or a test)


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.toks = tokens
        self.pos = 0

    def peek(self) -> Token:
        return self.toks[self.pos]

    def take(self) -> Token:
        tok = self.toks[self.pos]
        if tok.kind != "eof":
            self.pos += 1
        return tok

    def commands(self, depth: int, closing: bool) -> list[_Raw]:
        out: list[_Raw] = []
        while True:
            tok = self.peek()
            if tok.kind == "eof":
                if closing:
                    raise SieveSyntaxError(tok.line, "missing '}' at the end of the script")
                return out
            if tok.kind == "}":
                if not closing:
                    raise SieveSyntaxError(tok.line, "'}' without a matching '{'")
                self.take()
                return out
            out.append(self.command(depth))

    def command(self, depth: int) -> _Raw:
        tok = self.take()
        if tok.kind != "id":
            raise SieveSyntaxError(tok.line, f"expected a command, found {_describe(tok)}")
        raw = self.arguments(tok, depth)
        end = self.take()
        if end.kind == ";":
            return raw
        if end.kind == "{":
            if depth + 1 > MAX_NESTING:
                raise SieveSyntaxError(end.line, f"blocks nested more than {MAX_NESTING} levels deep")
            raw.block = self.commands(depth + 1, True)
            return raw
        raise SieveSyntaxError(
            end.line if end.kind != "eof" else self.toks[self.pos - 1].line,
            f"missing ';' after the {tok.text} command (found {_describe(end)})",
        )

    def arguments(self, ident: Token, depth: int) -> _Raw:
        raw = _Raw(ident.value, ident.text, ident.line, [], [], False, None)
        while True:
            tok = self.peek()
            kind = tok.kind
            if kind in ("tag", "num", "str"):
                raw.args.append(self.take())
            elif kind == "[":
                raw.args.append(self.string_list())
            else:
                break
        tok = self.peek()
        if tok.kind == "id":
            self._deeper(tok, depth)
            raw.tests.append(self.arguments(self.take(), depth + 1))
        elif tok.kind == "(":
            self._deeper(tok, depth)
            self.take()
            raw.test_list = True
            while True:
                t = self.take()
                if t.kind != "id":
                    raise SieveSyntaxError(t.line, f"expected a test in the test list, found {_describe(t)}")
                raw.tests.append(self.arguments(t, depth + 1))
                sep = self.take()
                if sep.kind == ")":
                    break
                if sep.kind != ",":
                    raise SieveSyntaxError(sep.line, f"expected ',' or ')' in the test list, found {_describe(sep)}")
        return raw

    @staticmethod
    def _deeper(tok: Token, depth: int) -> None:
        if depth + 1 > MAX_NESTING:
            raise SieveSyntaxError(tok.line, f"tests nested more than {MAX_NESTING} levels deep")

    def string_list(self) -> Token:
        start = self.take()
        items: list[str] = []
        while True:
            t = self.take()
            if t.kind != "str":
                raise SieveSyntaxError(t.line, f"expected a string in the string list, found {_describe(t)}")
            items.append(t.value)
            sep = self.take()
            if sep.kind == "]":
                return Token("list", tuple(items), start.line)
            if sep.kind != ",":
                raise SieveSyntaxError(sep.line, f"expected ',' or ']' in the string list, found {_describe(sep)}")


def _describe(tok: Token) -> str:
    if tok.kind == "eof":
        return "the end of the script"
    if tok.kind in ("id", "tag"):
        return repr(tok.text)
    if tok.kind == "num":
        return f"number {tok.value}"
    if tok.kind == "str":
        return "a string"
    if tok.kind == "list":
        return "a string list"
    return repr(tok.kind)


# ---------------------------------------------------------------------------- validation


class _Validator:
    def __init__(self) -> None:
        self.requires: set[str] = set()
        self.includes: list[tuple[str, bool]] = []

    # -- strings

    def _has(self, ext: str) -> bool:
        return ext in self.requires

    def decode(self, value: str, line: int) -> str:
        """RFC 5228 2.4.2.4 encoded characters, when required."""
        if "encoded-character" not in self.requires or "${" not in value:
            return value
        return _ENCODED.sub(lambda m: _encoded(m, line), value)

    def check_refs(self, value: str, line: int) -> None:
        """RFC 5229 3: a reference to an unknown namespace is an error."""
        if "variables" not in self.requires or "${" not in value:
            return
        for m in VARIABLE_REF.finditer(value):
            name = m.group(1)
            if "." in name:
                space = name.split(".", 1)[0].lower()
                if not (space == "global" and self._has("include")):
                    raise SieveSyntaxError(line, f"variable '{name}' is in an unknown namespace '{space}'")

    def constant(self, value: str) -> bool:
        return "variables" not in self.requires or VARIABLE_REF.search(value) is None

    def value(self, tok: Token, kind: str) -> Any:
        if tok.kind == "str":
            v = self.decode(tok.value, tok.line)
            self.check_refs(v, tok.line)
            return (v,) if kind == "strings" else v
        if tok.kind == "list":
            out = tuple(self.decode(s, tok.line) for s in tok.value)
            for s in out:
                self.check_refs(s, tok.line)
            return out
        return tok.value

    # -- commands

    def block(self, raws: list[_Raw], top: bool) -> tuple[Node, ...]:
        out: list[Node] = []
        prev = ""
        seen_other = False
        for raw in raws:
            name = raw.name
            if name == "require":
                if not top or seen_other:
                    raise SieveSyntaxError(raw.line, "require must come before every other command, at the top level")
            else:
                seen_other = True
            if name in ("elsif", "else") and prev not in ("if", "elsif"):
                raise SieveSyntaxError(raw.line, f"{raw.text} without a preceding if")
            out.append(self.command(raw))
            prev = name
        return tuple(out)

    def command(self, raw: _Raw) -> Node:
        spec = SPECS.get(raw.name)
        if spec is None or spec.kind == "test":
            hint = " (it is a test)" if spec is not None else ""
            raise SieveSyntaxError(raw.line, f"unknown command '{raw.text}'{hint}")
        self._require_ext(raw, spec, "command")
        node = self.node(raw, spec, "command")
        if raw.name == "require":
            self.require(raw, node.args[0])
        if spec.block:
            if raw.block is None:
                raise SieveSyntaxError(raw.line, f"the {raw.text} command needs a block {{ ... }}")
            block = self.block(raw.block, False)
            node = Node(node.name, node.line, node.tags, node.args, node.tests, block)
        elif raw.block is not None:
            raise SieveSyntaxError(raw.line, f"missing ';' after the {raw.text} command (it takes no block)")
        return node

    def test(self, raw: _Raw) -> Node:
        spec = SPECS.get(raw.name)
        if spec is None or spec.kind != "test":
            hint = " (it is a command)" if spec is not None else ""
            raise SieveSyntaxError(raw.line, f"unknown test '{raw.text}'{hint}")
        self._require_ext(raw, spec, "test")
        return self.node(raw, spec, "test")

    def _require_ext(self, raw: _Raw, spec: Spec, what: str) -> None:
        ext = spec.ext
        if ext and ext not in self.requires:
            raise SieveSyntaxError(raw.line, f'unknown {what} \'{raw.text}\' (missing require "{ext}")')

    def require(self, raw: _Raw, names: tuple[str, ...]) -> None:
        for name in names:
            if name in CAPABILITIES or name in grammar.IMPLICIT:
                self.requires.add(name)
                if name == "vacation-seconds":          # RFC 6131 2: implies "vacation"
                    self.requires.add("vacation")
            elif name in grammar.KNOWN_UNSUPPORTED:
                raise SieveSyntaxError(raw.line, f'unsupported extension "{name}"')
            else:
                raise SieveSyntaxError(raw.line, f'unknown extension "{name}"')

    def node(self, raw: _Raw, spec: Spec, what: str) -> Node:
        tags: dict[str, Any] = {}
        positional: list[Token] = []
        args = raw.args
        i = 0
        while i < len(args):
            tok = args[i]
            i += 1
            if tok.kind != "tag":
                positional.append(tok)
                continue
            if positional:
                raise SieveSyntaxError(tok.line, f"tag {tok.text} after the positional arguments of {raw.text}")
            tag = spec.tags.get(tok.value)
            if tag is None or (tag.ext and tag.ext not in self.requires):
                hint = f' (missing require "{tag.ext}")' if tag is not None else ""
                raise SieveSyntaxError(tok.line, f"unknown tag {tok.text} for the {raw.text} {what}{hint}")
            if tag.group in tags:
                raise SieveSyntaxError(tok.line, f"{tok.text} conflicts with an earlier tag of the {raw.text} {what}")
            value: Any = tok.value
            if tag.arg is not None:
                if i >= len(args):
                    raise SieveSyntaxError(tok.line, f"{tok.text} needs an argument")
                targ = args[i]
                i += 1
                self._type(targ, tag.arg, f"the argument of {tok.text}")
                value = self._tag_value(tok, self.value(targ, tag.arg), targ.line)
            elif tag.group in ("match", "transform", "zone"):
                value = (value, None)
            tags[tag.group] = value
        self._positional_count(raw, spec, positional)
        values: list[Any] = []
        if spec.optional_first and len(positional) < len(spec.args):
            values.append(None)
            types = spec.args[1:]
        else:
            types = spec.args
        for n, (tok, kind) in enumerate(zip(positional, types), 1):
            self._type(tok, kind, f"argument {n} of {raw.text}")
            values.append(self.value(tok, kind))
        if spec.optional_last and len(values) < len(spec.args):
            values.append(None)
        tests = self._tests(raw, spec, what)
        node = Node(raw.name, raw.line, tuple(tags.items()), tuple(values), tests, ())
        self.check(node, raw)
        return node

    def _positional_count(self, raw: _Raw, spec: Spec, positional: list[Token]) -> None:
        want = len(spec.args)
        low = want - 1 if spec.optional_first or spec.optional_last else want
        if not low <= len(positional) <= want:
            if len(positional) > want:
                tok = positional[want]
                raise SieveSyntaxError(tok.line, f"too many arguments for {raw.text}: unexpected {_describe(tok)}")
            raise SieveSyntaxError(raw.line, f"{raw.text} needs {want} positional argument{'s' if want != 1 else ''}, "
                                             f"found {len(positional)}")

    def _type(self, tok: Token, kind: str, where: str) -> None:
        ok = (tok.kind == "num") if kind == "number" else (
            tok.kind == "str" if kind == "string" else tok.kind in ("str", "list"))
        if not ok:
            want = {"number": "a number", "string": "a string", "strings": "a string list"}[kind]
            raise SieveSyntaxError(tok.line, f"{where} must be {want}, found {_describe(tok)}")

    def _tests(self, raw: _Raw, spec: Spec, what: str) -> tuple[Node, ...]:
        if spec.tests == "none":
            if raw.tests and what == "command":
                raise SieveSyntaxError(raw.line, f"missing ';' after the {raw.text} command")
            if raw.tests:
                raise SieveSyntaxError(raw.tests[0].line, f"{raw.text} takes no test, found '{raw.tests[0].text}'")
            return ()
        if spec.tests == "one":
            if not raw.tests:
                raise SieveSyntaxError(raw.line, f"{raw.text} needs a test")
            if raw.test_list:
                raise SieveSyntaxError(raw.line, f"{raw.text} takes one test, not a test list in parentheses")
        elif not raw.test_list:
            raise SieveSyntaxError(raw.line, f"{raw.text} needs a test list in parentheses")
        return tuple(self.test(t) for t in raw.tests)

    def _tag_value(self, tok: Token, value: Any, line: int) -> Any:
        name = tok.value
        if name == "comparator":
            cmp = value.lower()
            if cmp not in grammar.COMPARATORS:
                raise SieveSyntaxError(line, f"unknown comparator '{value}'")
            ext = grammar.COMPARATORS[cmp]
            if ext and ext not in self.requires:
                raise SieveSyntaxError(line, f'comparator \'{value}\' needs require "{ext}"')
            return cmp
        if name in ("value", "count"):
            op = value.lower()
            if op not in grammar.RELATIONAL_OPS:
                raise SieveSyntaxError(line, f"unknown relational operator '{value}' for :{name}")
            return (name, op)
        if name == "index" and value < 1:
            raise SieveSyntaxError(line, ":index must be 1 or more")
        if name == "zone":
            return ("zone", value)
        if name in ("content",):
            return ("content", value)
        if name in ("days", "seconds"):
            return (name, value)
        if name == "from" and self.constant(value) and not valid_address(value):
            raise SieveSyntaxError(line, f"vacation :from '{value}' is not a valid address")
        return value

    # -- per-command constraints not expressible in the table

    def check(self, node: Node, raw: _Raw) -> None:
        name = node.name
        line = node.line
        tags = dict(node.tags)
        if tags.get("comparator") == "i;ascii-numeric" and tags.get("match", ("is",))[0] in ("contains", "matches"):
            raise SieveSyntaxError(line, f"comparator i;ascii-numeric cannot do :{tags['match'][0]} "
                                         f"(RFC 4790 9.1: equality and ordering only)")
        if "last" in tags and "index" not in tags and name != "addheader":
            raise SieveSyntaxError(line, f":last needs :index in the {raw.text} {'test' if SPECS[name].kind == 'test' else 'command'}")
        if name == "size" and "size" not in tags:
            raise SieveSyntaxError(line, "size needs :over or :under")
        if name == "redirect":
            addr = node.args[0]
            if self.constant(addr) and not valid_address(addr):
                raise SieveSyntaxError(line, f"redirect address '{addr}' is not a valid address")
        elif name == "address":
            for field in node.args[0]:      # RFC 5228 5.1: "MUST restrict" to address fields
                if self.constant(field) and field.lower() not in grammar.ADDRESS_HEADERS:
                    raise SieveSyntaxError(line, f"header '{field}' holds no addresses: not allowed in the address test")
        elif name == "envelope":
            for part in node.args[0]:
                if self.constant(part) and part.lower() not in grammar.ENVELOPE_PARTS:
                    raise SieveSyntaxError(line, f"envelope part '{part}' is not supported (from, to)")
        elif name in ("set",):
            self._assignable(node.args[0], line)
        elif name in ("setflag", "addflag", "removeflag") and node.args[0] is not None:
            self._assignable(node.args[0], line)
        elif name == "hasflag" and node.args[0] is not None:
            for var in node.args[0]:
                self._assignable(var, line)
        elif name == "include":
            script = node.args[0]
            if not self.constant(script):
                raise SieveSyntaxError(line, "include needs a constant script name (no variables)")
            if not valid_script_name(script):
                raise SieveSyntaxError(line, f"include: invalid script name '{script}'")
            self.includes.append((script, tags.get("location") == "global"))
        elif name == "global":
            if "variables" not in self.requires:
                raise SieveSyntaxError(line, 'global needs require "variables"')
            for var in node.args[0]:
                if not _IDENT.match(var):
                    raise SieveSyntaxError(line, f"invalid variable name '{var}' for global")
        elif name in ("addheader", "deleteheader"):
            field = node.args[0]
            if self.constant(field) and not _FIELD_NAME.match(field):
                raise SieveSyntaxError(line, f"{name}: invalid header field name '{field}'")

    def _assignable(self, name: str, line: int) -> None:
        """RFC 5229 4: set may not assign to a match variable or an unknown namespace."""
        if name.isdigit():
            raise SieveSyntaxError(line, f"cannot assign to the match variable '{name}'")
        if _IDENT.match(name):
            return
        space, _, rest = name.partition(".")
        if space.lower() == "global" and self._has("include") and _IDENT.match(rest):
            return
        raise SieveSyntaxError(line, f"invalid variable name '{name}'")


def _encoded(m: re.Match, line: int) -> str:
    """One ${hex:..} / ${unicode:..}; a malformed sequence stays as written."""
    kind = m.group(1).lower()
    items = m.group(2).split()
    if not items:
        return m.group(0)
    if kind == "hex":
        if any(len(h) > 2 for h in items):
            return m.group(0)
        return bytes(int(h, 16) for h in items).decode("utf-8", "replace")
    out = []
    for h in items:
        cp = int(h, 16) if len(h) <= 8 else 0x110000
        if 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF:
            raise SieveSyntaxError(line, f"invalid unicode character {h} in ${{unicode:...}}")
        out.append(chr(cp))
    return "".join(out)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = re.compile(
    r'(?:' + _ATOM + r'(?:\.' + _ATOM + r')*|"(?:[^"\\\r\n]|\\.)*")@'
    r'(?:' + _ATOM + r'(?:\.' + _ATOM + r')*|\[[^\[\]\\\r\n]*\])\Z'
)


def valid_address(value: str) -> bool:
    """An RFC 5322 addr-spec, optionally as "Name <addr-spec>" (the last <...> is the
    address; what comes before it is not looked at: scripts written by clients hold
    "bob@x <bob@x>" and "Smith, John <j@x>", and must keep compiling)."""
    value = value.strip()
    if value.endswith(">") and "<" in value:
        value = value[value.rindex("<") + 1:-1].strip()
    return len(value) <= 998 and _ADDR_SPEC.match(value) is not None


# A display name as vacation's From: can carry it: no comma or semicolon (a second
# mailbox or a group would begin), no angle bracket, quote, colon or control.
_NAME = re.compile(r'[^<>,;:"\\\x00-\x1f\x7f]*\Z')
_QUOTED = re.compile(r'"((?:[^"\\\r\n]|\\.)*)"\Z')


def parse_mailbox(value: str) -> tuple[str, str] | None:
    """(display name, addr-spec) of exactly one mailbox, "addr-spec" or "Name
    <addr-spec>" (the name plain or a quoted string); None for anything else, a list of
    mailboxes included: a vacation :from of "me@here, Boss <boss@there>" was checked as
    one address and written into From: whole.  At delivery an unusable :from is ignored
    (RFC 5230 4.4)."""
    value = value.strip()
    name = ""
    if value.endswith(">") and "<" in value:
        name, value = value[:value.rindex("<")].strip(), value[value.rindex("<") + 1:-1].strip()
        quoted = _QUOTED.match(name)
        if quoted:
            name = re.sub(r"\\(.)", r"\1", quoted.group(1))
        elif not _NAME.match(name):
            return None
        name = " ".join(name.split())
    if len(value) > 998 or _ADDR_SPEC.match(value) is None:
        return None
    return name, value


def valid_script_name(name: str) -> bool:
    """RFC 5804 1.6 script names: no control characters; and no path separators."""
    return (0 < len(name) <= 255 and "/" not in name and name not in (".", "..")
            and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name))


def parse(source: str | bytes, name: str = "", *, max_size: int | None = None) -> Script:
    """Parse and validate a script: SieveSyntaxError (line, reason) when it cannot run."""
    if isinstance(source, str):
        size = len(source.encode("utf-8", "surrogatepass"))
        text = source
    else:
        size = len(source)
        text = None
    if max_size is not None and size > max_size:
        raise SieveSyntaxError(1, f"script too large ({size} bytes, at most {max_size})")
    if text is None:
        try:
            text = bytes(source).decode("utf-8")
        except UnicodeDecodeError as exc:
            line = bytes(source)[:exc.start].count(b"\n") + 1
            raise SieveSyntaxError(line, "the script is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    raws = _Parser(tokenize(text)).commands(0, False)
    v = _Validator()
    commands = v.block(raws, True)
    return Script(name, frozenset(v.requires), tuple(dict.fromkeys(v.includes)), commands)


def walk(nodes: tuple[Node, ...]) -> Iterator[Node]:
    """Every node, depth first (commands, their tests, their blocks)."""
    for node in nodes:
        yield node
        yield from walk(node.tests)
        yield from walk(node.block)
