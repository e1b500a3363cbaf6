"""Our Sieve interpreter against Pigeonhole's `sieve-test` on a corpus of scripts and
messages (tests/sieve_corpus/): for every (script or chain, message) pair both must
decide the same actions -- folders and their flags, explicit or implicit keep, discard,
redirect targets, reject and its reason, the vacation answer (to whom, or none; period,
:subject, :from, reason, :handle) and run-time errors.

Where Pigeonhole departs from the RFC, expected-differences.toml records the pairs, the
RFC section and what the RFC asks for, and our interpreter must do that instead; any
other difference fails.  The oracle side is tests/sieve_oracle.py.  Needs sieve-test
(Debian: dovecot-sieve and dovecot-core): skipped without it, failed under
MAILSERVER_REQUIRE_INTEROP=1.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from mailserver.sieve.actions import Discard, FileInto, Keep, Redirect, Reject, Result, Vacation
from mailserver.sieve.interpreter import Envelope, SieveIncludeError, evaluate
from mailserver.sieve.message import Message
from mailserver.sieve.parser import SieveSyntaxError, parse
from tests.sieve_oracle import (Action, EnvelopeSpec, OracleResult, PigeonholeOracle,
                                canonical_address, canonical_flags, canonical_mailbox,
                                default_handle, find_sieve_test, merge_stores,
                                parse_test_output, sanitize_reason)

try:
    from mailserver.sieve import vacation as vacation_module
except ImportError:         # the decision is then left out of the comparison
    vacation_module = None

CORPUS = Path(__file__).resolve().parent.parent / "sieve_corpus"
MANIFEST = tomllib.loads((CORPUS / "corpus.toml").read_text(encoding="utf-8"))
WORKERS = 2                 # sieve-test runs at once


@dataclass(frozen=True)
class Case:
    name: str                   # the script's stem or the chain's name
    scripts: tuple[Path, ...]
    message: Path

    @property
    def id(self) -> str:
        return f"{self.name}:{self.message.stem}"

    @property
    def envelope(self) -> EnvelopeSpec:
        return EnvelopeSpec(**MANIFEST["envelope"][self.message.stem])


def _cases() -> list[Case]:
    chains = [(p.stem, (p,)) for p in sorted((CORPUS / "scripts").glob("*.sieve"))]
    chains += [(c["name"], tuple(CORPUS / s for s in c["scripts"])) for c in MANIFEST["chain"]]
    messages = sorted((CORPUS / "messages").glob("*.eml"))
    return [Case(name, scripts, m) for name, scripts in chains for m in messages]


CASES = _cases()


def _differences() -> list[dict]:
    data = tomllib.loads((CORPUS / "expected-differences.toml").read_text(encoding="utf-8"))
    entries = data.get("difference", [])
    for entry in entries:
        assert set(entry) <= {"script", "messages", "rfc", "why", "pigeonhole_only",
                              "rfc_only"}, entry
        assert entry["rfc"].startswith("RFC ") and entry["why"], entry
        entry["pigeonhole_only"] = _from_toml(entry.get("pigeonhole_only", []))
        entry["rfc_only"] = _from_toml(entry.get("rfc_only", []))
    return entries


def _from_toml(actions: list) -> tuple[Action, ...]:
    return tuple(sorted(tuple(tuple(x) if isinstance(x, list) else x for x in a)
                        for a in actions))


DIFFERENCES = _differences()


# ----------------------------------------------------------------------------- ours


def _load(name: str, is_global: bool):
    path = CORPUS / "include" / ("global" if is_global else "personal") / f"{name}.sieve"
    try:
        return parse(path.read_bytes(), name)
    except (OSError, SieveSyntaxError) as exc:
        raise SieveIncludeError(f"{name}: {exc}") from exc


_EVALUATE_KWARGS = {}
if "mailbox_exists" in inspect.signature(evaluate).parameters:
    # the oracle's mail home holds INBOX alone
    _EVALUATE_KWARGS["mailbox_exists"] = lambda name: name.upper() == "INBOX"


def run_ours(case: Case) -> tuple[Result | None, str]:
    """Our Result for the pair, or None and the parse error."""
    try:
        scripts = [parse(p.read_bytes(), p.stem) for p in case.scripts]
    except SieveSyntaxError as exc:
        return None, f"parse: {exc}"
    env = case.envelope
    message = Message.from_bytes(case.message.read_bytes())
    result = evaluate(scripts, message, Envelope(env.sender, env.recipient, env.user),
                      include=_load, **_EVALUATE_KWARGS)
    return result, result.error or ""


def _vacation_to(vacation: Vacation, case: Case) -> str:
    if vacation_module is None:
        return ""
    env = case.envelope
    header = Message.from_bytes(case.message.read_bytes()).header
    why_not = vacation_module.should_reply(header, env.sender, [env.user, env.recipient],
                                           vacation)
    return env.sender if why_not is None else "no-reply"


def normalize_ours(result: Result | None, case: Case) -> tuple[Action, ...]:
    """Our Result in the oracle's vocabulary (tests/sieve_oracle.py)."""
    if result is None:
        return (("unparsed",),)
    if result.error is not None:
        return (("error",), ("store", "INBOX", (), "implicit"))
    out: list[Action] = []
    for a in result.actions:
        if isinstance(a, Keep):
            out.append(("store", "INBOX", canonical_flags(a.flags),
                        "implicit" if a.implicit else "explicit"))
        elif isinstance(a, FileInto):
            out.append(("store", canonical_mailbox(a.mailbox), canonical_flags(a.flags),
                        "explicit"))
        elif isinstance(a, Discard):
            out.append(("discard",))
        elif isinstance(a, Redirect):
            out.append(("redirect", canonical_address(a.address)))
        elif isinstance(a, Reject):
            out.append(("reject", "ereject" if a.extended else "reject",
                        sanitize_reason(a.reason)))
        elif isinstance(a, Vacation):
            out.append(("vacation", _vacation_to(a, case), int(a.period), a.subject or "",
                        a.from_address or "", a.reason.replace("\r\n", "\n").rstrip(),
                        a.handle))
        else:
            raise AssertionError(f"unknown action {a!r}")
    return tuple(sorted(merge_stores(out)))


def _align_handles(ours: tuple[Action, ...], theirs: tuple[Action, ...]) -> tuple[Action, ...]:
    """Pigeonhole's default handle (RFC 5230 4.2) is its own string, ours another: where
    Pigeonhole used its default, the handle is not compared."""
    if not any(a[0] == "vacation" and a[6] == "" for a in theirs):
        return ours
    return tuple(sorted(a[:6] + ("",) if a[0] == "vacation" else a for a in ours))


# ----------------------------------------------------------------------------- oracle


def _require_sieve_test() -> str:
    path = find_sieve_test()
    if path:
        return path
    if os.environ.get("MAILSERVER_REQUIRE_INTEROP") == "1":
        pytest.fail("sieve-test is not installed, and MAILSERVER_REQUIRE_INTEROP=1 requires "
                    "it (apt-get install dovecot-sieve dovecot-core)", pytrace=False)
    pytest.skip("sieve-test not installed (set MAILSERVER_REQUIRE_INTEROP=1 to make this "
                "a failure)")


@pytest.fixture(scope="module")
def pigeonhole(request: pytest.FixtureRequest) -> Iterator[dict[str, OracleResult | BaseException]]:
    """sieve-test's result for every selected pair, run a few at a time."""
    binary = _require_sieve_test()
    # not under pytest's private temporary directory: under root sieve-test works as
    # nobody, which must reach its configuration, binaries and mail homes
    work = Path(tempfile.mkdtemp(prefix="sieve-pigeonhole-"))
    try:
        yield _run_oracle(PigeonholeOracle(binary, CORPUS, work), request)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_oracle(oracle: PigeonholeOracle, request: pytest.FixtureRequest
                ) -> dict[str, OracleResult | BaseException]:
    selected = {item.callspec.params["case"].id: item.callspec.params["case"]
                for item in request.session.items
                if getattr(item, "callspec", None) is not None
                and isinstance(item.callspec.params.get("case"), Case)}

    def one(case: Case) -> OracleResult | BaseException:
        try:
            return oracle.run(case.scripts, case.message, case.envelope,
                              decide_vacation=vacation_module is not None)
        except Exception as exc:    # reported by the pair's test
            return exc

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(selected, pool.map(one, selected.values())))


def _describe(ours: tuple, theirs: tuple) -> str:
    only_ours = [a for a in ours if a not in theirs]
    only_theirs = [a for a in theirs if a not in ours]
    return (f"\n  expected: {list(theirs)}\n  ours:     {list(ours)}"
            f"\n  only expected: {only_theirs}\n  only ours:     {only_ours}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_actions_as_pigeonhole(case: Case, pigeonhole: dict) -> None:
    oracle = pigeonhole[case.id]
    if isinstance(oracle, BaseException):
        raise oracle
    result, error = run_ours(case)
    theirs = oracle.actions
    ours = _align_handles(normalize_ours(result, case), theirs)
    # where Pigeonhole departs from the RFC, the RFC's answer
    expected, sections = list(theirs), []
    for entry in DIFFERENCES:
        if entry["script"] != case.name or case.message.stem not in entry["messages"]:
            continue
        stale = ([a for a in entry["pigeonhole_only"] if a not in expected]
                 + [a for a in entry["rfc_only"] if a in expected])
        assert not stale, (f"{case.id}: Pigeonhole no longer departs from {entry['rfc']} "
                           f"({stale}): update expected-differences.toml\n{oracle.transcript()}")
        expected = [a for a in expected if a not in entry["pigeonhole_only"]]
        expected += entry["rfc_only"]
        sections.append(f"{entry['rfc']}: {entry['why']}")
    expected = tuple(sorted(expected))
    why = "".join(f"\n  where the RFC wins ({s})" for s in sections)
    assert ours == expected, (f"{case.id}: our actions differ from "
                              f"{'the RFC' if sections else 'Pigeonhole'}'s{why}"
                              f"{_describe(ours, expected)}\n  our error: {error or '-'}"
                              f"\n{oracle.transcript()}")


# ----------------------------------------------------------------------------- corpus


def test_corpus_size() -> None:
    scripts = list((CORPUS / "scripts").glob("*.sieve"))
    messages = list((CORPUS / "messages").glob("*.eml"))
    assert len(scripts) >= 60 and len(messages) >= 20
    assert set(MANIFEST["envelope"]) == {m.stem for m in messages}


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*/*.sieve")) + sorted(
    CORPUS.glob("include/*/*.sieve")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_script_parses(path: Path) -> None:
    """Every corpus script is valid Sieve (Pigeonhole compiles them all but the ones
    naming a missing or recursive include, which only running them can tell)."""
    parse(path.read_bytes(), path.stem)


def test_expected_differences_name_real_pairs() -> None:
    names = {c.name for c in CASES}
    messages = {c.message.stem for c in CASES}
    for entry in DIFFERENCES:
        assert entry["script"] in names, entry
        assert entry["messages"] and set(entry["messages"]) <= messages, entry


# ------------------------------------------------------------------ sieve-test output


def test_parse_single_script_output() -> None:
    out = ("\nPerformed actions:\n\n * store message in folder: Foo\n"
           "        + create mailbox if it does not exist\n"
           "        + add IMAP flags: \\flagged foo\n"
           " * redirect message to: <X@Example.NET>\n        + preserve implicit keep\n"
           " * send vacation message:\n    => seconds : 259200\n    => subject : Gone\n"
           "    => handle  : awayGone<default-from><NO-MIME>\n\nSTART MESSAGE\naway\n\n"
           "END MESSAGE\n * reject message with reason: line one??two??\n\n"
           "Implicit keep:\n\n * store message in folder: INBOX\n"
           "        + add IMAP flags: \\seen\n")
    assert sorted(parse_test_output(out, "sieve-test: Info: final result: success\n")) == [
        ("redirect", "X@example.net"),
        ("reject", "reject", "line one??two??"),
        ("store", "Foo", ("\\Flagged", "foo"), "explicit"),
        ("store", "INBOX", ("\\Seen",), "implicit"),
        ("vacation", "", 259200, "Gone", "", "away", ""),
    ]


def test_parse_chain_output_drops_the_keep_of_earlier_scripts() -> None:
    out = ("\n## Executing script: a\n\nPerformed actions:\n\n"
           " * store message in folder: First\n * keep\n        + add IMAP flags: \\seen\n\n"
           "Implicit keep:\n\n  (none)\n\n## Executing script: b\n\nPerformed actions:\n\n"
           "  (none)\n\nImplicit keep:\n\n * keep\n        + add IMAP flags: \\seen Foo\n")
    assert sorted(parse_test_output(out, "Info: final result: success")) == [
        ("store", "First", (), "explicit"),
        ("store", "INBOX", ("Foo", "\\Seen"), "implicit"),
    ]


def test_parse_failure_is_the_implicit_keep() -> None:
    err = ("x: line 1: error: ...\nsieve-test: Info: final result: failed; resolved with "
           "successful implicit keep\n")
    assert parse_test_output("", err) == [("error",), ("store", "INBOX", (), "implicit")]


def test_default_handle_with_variables() -> None:
    vacation = ("vacation", "", 1, "Re: x (away)", "", "About x.",
                "About ${s}.Re: ${s} (away)<default-from><NO-MIME>")
    assert default_handle(vacation)
    assert not default_handle(vacation[:6] + ("my-handle",))
