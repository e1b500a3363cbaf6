"""DKIM and ARC checks of a spooled message, the reactor side.

The header section is read in a thread, the keys every signature and ARC set needs are
fetched concurrently through the shared resolver, and the verification itself
(`dkimverify.verify_file`: file reading, hashing, RSA) runs in a thread again.  The
Deferred never fails: whatever goes wrong unexpectedly becomes one temperror result and
a logged failure, so the message still gets exactly one verdict.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.inbound.dkimverify import (
    ARCResult,
    DKIMResult,
    key_names,
    key_names_in_file,
    verify_path,
)

log = Logger()

# Searched in the lower-cased header section (faster than re.I).
_SIGNED = re.compile(rb"(?m)^(?:dkim-signature|arc-seal|arc-message-signature|"
                     rb"arc-authentication-results)[ \t]*:")


def pick_key_record(records: tuple[bytes, ...]) -> bytes | None:
    """RFC 6376 3.6.2.2: of several TXT records at a key name, the first that looks like
    a DKIM key record (starts with v=DKIM1 or has a p= tag); failing that the first
    record, whose verification then reports it malformed."""
    for record in records:
        text = record.strip()
        if text.startswith(b"v=DKIM1") or b"p=" in text:
            return record
    return records[0] if records else None


def _key_value(answer: Any) -> bytes | None | str:
    """An Answer as verify_file wants it: the record, None (no record), or "error"."""
    status = getattr(answer, "status", "error")
    if status == "ok":
        return pick_key_record(tuple(answer.records))
    if status in ("nxdomain", "nodata"):
        return None   # RFC 6376 6.1.2: no key -> permerror
    return "error"    # timeout, SERVFAIL -> temperror


def _verify(resolver: Any, path: Path, run_in_thread: Callable[..., defer.Deferred],
            check_arc: bool, header_block: bytes | None) -> defer.Deferred:
    if header_block is None:
        d = run_in_thread(key_names_in_file, path, check_arc)
        return d.addCallback(_fetch_keys, resolver).addCallback(
            lambda keys: run_in_thread(verify_path, path, keys, check_arc))
    if not _SIGNED.search(header_block.lower()):
        return defer.succeed(([], ARCResult("none", 0, (), "no ARC header fields")))  # no DNS
    keys = _fetch_keys(key_names(header_block, include_arc=check_arc), resolver)
    if isinstance(keys, defer.Deferred):   # a key not in the DNS cache (yet)
        return keys.addCallback(lambda keys: run_in_thread(verify_path, path, keys, check_arc))
    return run_in_thread(verify_path, path, keys, check_arc)


def _fetch_keys(names: list[str], resolver: Any) -> dict[str, bytes | None | str] | defer.Deferred:
    """{name: key record} for verify_path; at once when every answer is in the cache."""
    current = getattr(resolver, "current", None)
    if current is not None:
        answers = [current(name, "TXT") for name in names]
        if all(a is not None for a in answers):
            return {name: _key_value(a) for name, a in zip(names, answers)}
    lookups = []
    for name in names:
        d = defer.maybeDeferred(resolver.txt, name)
        d.addErrback(lambda f, n=name: log.failure("DKIM key lookup {name}", f, name=n))
        lookups.append(d)
    return defer.gatherResults(lookups).addCallback(
        lambda answers: {name: _key_value(a) for name, a in zip(names, answers)})


def verify_message(resolver: Any, path: Path, run_in_thread: Callable[..., defer.Deferred],
                   *, check_arc: bool = True, header_block: bytes | None = None
                   ) -> defer.Deferred:
    """Deferred[(list[DKIMResult], ARCResult)] for the message in `path`; never fails.
    `run_in_thread(callable, *args)` runs blocking work off the reactor and
    returns a Deferred (deferToThread or a pool's equivalent).  `header_block`, the
    message's whole header section when the caller has it already, spares a thread hop
    (and, for an unsigned message, every other step)."""
    d = defer.maybeDeferred(_verify, resolver, path, run_in_thread, check_arc, header_block)

    def failed(failure: Any) -> tuple[list[DKIMResult], ARCResult]:
        # A small message is checked as bytes: its size, not its text, goes to the log.
        what = (f"a message of {len(path)} bytes" if isinstance(path, (bytes, bytearray))
                else str(path))
        log.failure("DKIM/ARC verification of {what} failed", failure, what=what)
        return ([DKIMResult("temperror", "", "", "", "", None, "verification error")],
                ARCResult("none", 0, (), "not verified: verification error"))

    d.addErrback(failed)
    return d
