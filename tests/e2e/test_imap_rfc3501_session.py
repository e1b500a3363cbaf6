"""Exact RFC 3501 / RFC 5258 answers against a real server: LIST and LSUB with unsubscribed
parents, subscribed names that no longer exist, RECURSIVEMATCH and CHILDINFO, patterns made of
every character list-mailbox allows; \\Recent across SELECT, EXAMINE and STATUS; keywords
announced in FLAGS before any FETCH shows them, also under ten concurrent sessions."""

from __future__ import annotations

import re
import socket
import threading
import time
from typing import Any

from imap_helpers import (
    RawIMAP,
    Result,
    crlf,
    deliver,
    flags_of,
    module_server,
    new_user,
    parse_data,
)

imap_server = module_server()

SYSTEM_FLAGS = {"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent"}


def msg(n: int | str) -> bytes:
    return crlf(f"From: <x@remote.test>\nTo: <u@example.test>\nSubject: message {n}\n"
                f"Message-ID: <r{n}@remote.test>\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n\n"
                f"Body {n}.\n")


def listed(r: Result, verb: bytes = b"LIST") -> dict[str, tuple[set[str], list[Any]]]:
    """{mailbox: ({lower-case attributes}, [extended data items])} of LIST/LSUB responses."""
    out: dict[str, tuple[set[str], list[Any]]] = {}
    for rest in r.with_prefix(verb + b" "):
        attrs, delim, name, *extended = parse_data(rest)
        assert delim == b".", f"delimiter {delim!r}:\n{r}"
        key = bytes(name).decode()
        assert key not in out, f"{key} listed twice:\n{r}"
        out[key] = ({bytes(a).decode().lower() for a in attrs}, extended)
    return out


def childinfo(extended: list[Any]) -> set[str] | None:
    """The CHILDINFO values of a LIST response's extended data, None without CHILDINFO."""
    if not extended:
        return None
    items = extended[0]
    for i in range(0, len(items) - 1, 2):
        if bytes(items[i]).upper() == b"CHILDINFO":
            return {bytes(v).decode().upper() for v in items[i + 1]}
    return None


# -- LSUB and LIST-EXTENDED (RFC 3501 6.3.9, RFC 5258) -------------------------------------------

def test_lsub_percent_lists_unsubscribed_parent_as_noselect(imap_server):
    user = new_user(imap_server, "lsub")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE parent.child.leaf")
        c.ok("SUBSCRIBE parent.child.leaf")
        r = c.ok('LSUB "" parent.%')
        got = listed(r, b"LSUB")
        assert set(got) == {"parent.child"}, f"RFC 3501 6.3.9: '%' returns the parent:\n{r}"
        assert "\\noselect" in got["parent.child"][0], f"parent without \\Noselect:\n{r}"
        got = listed(c.ok('LSUB "" %'), b"LSUB")
        assert "\\noselect" in got["parent"][0], got
        assert "parent.child" not in got, got
        r = c.ok('LSUB "" parent.*')
        got = listed(r, b"LSUB")
        assert set(got) == {"parent.child.leaf"}, f"'*' reaches the subscribed name itself:\n{r}"
        assert "\\noselect" not in got["parent.child.leaf"][0], str(r)
        # A subscribed name stays listed after its folder is gone (RFC 3501 6.3.6).
        c.ok("CREATE Gone")
        c.ok("SUBSCRIBE Gone")
        c.ok("DELETE Gone")
        got = listed(c.ok('LSUB "" Gone'), b"LSUB")
        assert set(got) == {"Gone"} and "\\noselect" in got["Gone"][0], got
    finally:
        c.close()


def test_recursivematch_needs_an_option_to_modify(imap_server):
    user = new_user(imap_server, "recm")
    c = RawIMAP.login(imap_server, user)
    try:
        for command in ('LIST (RECURSIVEMATCH) "" "*"', 'LIST (REMOTE RECURSIVEMATCH) "" "*"',
                        'LIST (RECURSIVEMATCH REMOTE) "" %', 'LIST (NOSUCHOPTION) "" "*"',
                        'LIST "" "*" RETURN (NOSUCHOPTION)'):
            r = c.command(command)
            assert r.status == "BAD", f"RFC 5258 3: {command} must be BAD:\n{r}"
            assert not r.with_prefix(b"LIST "), str(r)
        plain = listed(c.ok('LIST "" "*"'))
        assert listed(c.ok('LIST (REMOTE) "" "*"')) == plain
        assert listed(c.ok('LIST () "" "*"')) == plain
        # Options given twice count once.
        twice = listed(c.ok('LIST (SUBSCRIBED SUBSCRIBED) "" "*" RETURN (CHILDREN CHILDREN)'))
        assert twice == listed(c.ok('LIST (SUBSCRIBED) "" "*"')), twice
        # An extended LIST does not treat "" as the request for the delimiter (RFC 5258 3).
        r = c.ok('LIST () "" ""')
        assert not r.with_prefix(b"LIST "), str(r)
        r = c.ok('LIST "" ""')
        assert len(r.with_prefix(b"LIST ")) == 1, str(r)
    finally:
        c.close()


def test_list_subscribed_shows_deleted_names_as_nonexistent(imap_server):
    user = new_user(imap_server, "nonex")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Peach")
        c.ok("SUBSCRIBE Peach")
        c.ok("DELETE Peach")
        c.ok("SUBSCRIBE Never.Made")
        r = c.ok('LIST (SUBSCRIBED) "" "*"')
        got = listed(r)
        for name in ("Peach", "Never.Made"):
            assert name in got, f"subscribed {name} missing:\n{r}"
            assert {"\\nonexistent", "\\subscribed"} <= got[name][0], f"RFC 5258 3.1:\n{r}"
        assert "Never" not in got, f"an unsubscribed parent without RECURSIVEMATCH:\n{r}"
        assert "INBOX" in got and "\\nonexistent" not in got["INBOX"][0], str(r)
        assert "Peach" not in listed(c.ok('LIST "" "*"')), "a deleted folder in plain LIST"
        r = c.ok('LIST "" "*" RETURN (SUBSCRIBED)')
        assert "Peach" not in listed(r), f"return options add no names (RFC 5258 3):\n{r}"
        assert "\\subscribed" in listed(r)["INBOX"][0], str(r)
    finally:
        c.close()


def test_list_subscribed_recursivematch_gives_childinfo(imap_server):
    user = new_user(imap_server, "child")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Fruit.Apple")
        c.ok("CREATE Fruit.Banana")
        c.ok("SUBSCRIBE Fruit.Banana")
        c.ok("CREATE Tree.Oak")
        c.ok("SUBSCRIBE Tree")
        c.ok("SUBSCRIBE Tree.Oak")
        c.ok("SUBSCRIBE Ghost.Child")        # no folder anywhere on that path
        r = c.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"')
        got = listed(r)
        assert "Fruit" in got, f"parent of a subscribed child missing:\n{r}"
        attrs, extended = got["Fruit"]
        assert childinfo(extended) == {"SUBSCRIBED"}, f"RFC 5258 3.5 CHILDINFO:\n{r}"
        assert "\\subscribed" not in attrs and "\\nonexistent" not in attrs, str(r)
        assert "\\haschildren" in attrs, str(r)
        attrs, extended = got["Tree"]
        assert "\\subscribed" in attrs and childinfo(extended) == {"SUBSCRIBED"}, str(r)
        attrs, extended = got["Ghost"]
        assert "\\nonexistent" in attrs and childinfo(extended) == {"SUBSCRIBED"}, str(r)
        assert "INBOX" in got and childinfo(got["INBOX"][1]) is None, str(r)
        assert not {"Fruit.Banana", "Tree.Oak", "Ghost.Child"} & set(got), str(r)
        # Without RECURSIVEMATCH: no unsubscribed parent, no CHILDINFO.
        r = c.ok('LIST (SUBSCRIBED) "" "%"')
        got = listed(r)
        assert "Fruit" not in got and "Ghost" not in got, str(r)
        assert all(not ext for _, ext in got.values()), str(r)
        # With "*" the subscribed children are listed themselves: no redundant parent.
        r = c.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "*"')
        got = listed(r)
        assert {"Fruit.Banana", "Tree", "Tree.Oak", "Ghost.Child"} <= set(got), str(r)
        assert "Fruit" not in got and "Ghost" not in got, f"RFC 5258 3.5 SHOULD ONLY:\n{r}"
        assert "Fruit.Apple" not in got, str(r)
    finally:
        c.close()


def test_list_pattern_of_every_list_char_is_ok(imap_server):
    """RFC 3501 9: list-char = ATOM-CHAR / list-wildcards / resp-specials."""
    user = new_user(imap_server, "chars")
    c = RawIMAP.login(imap_server, user)
    try:
        pattern = "!#$&'+,-.0123456789:;<=>?@^_`|[}%*"
        for command in (f'LIST "" {pattern}', f'LIST "" {pattern}]', f'LSUB "" {pattern}',
                        f'LIST "" "{pattern}]"', 'LIST "" a]%', 'LIST "" "&Jjo"',
                        'LIST "" ("&" "x&y*")', f'LIST (SUBSCRIBED) "" {pattern}'):
            r = c.command(command)
            assert r.status == "OK", f"{command} must be OK:\n{r}"
        c.ok('CREATE "Tom &- Jerry"')
        r = c.ok('LIST "" "Tom &-*"')
        assert set(listed(r)) == {"Tom &- Jerry"}, str(r)
        r = c.ok('LIST "" "Tom*"')
        assert set(listed(r)) == {"Tom &- Jerry"}, str(r)
    finally:
        c.close()


# -- \Recent (RFC 3501 2.3.2) ----------------------------------------------------------------------

def status_recent(c: RawIMAP, mailbox: str = "INBOX") -> int:
    r = c.ok(f"STATUS {mailbox} (RECENT MESSAGES)")
    (rest,) = r.with_prefix(b"STATUS ")
    _, values = parse_data(rest)
    items = {bytes(values[i]).upper(): int(bytes(values[i + 1])) for i in range(0, len(values), 2)}
    return items[b"RECENT"]


def test_recent_survives_examine_and_status_until_select(imap_server):
    user = new_user(imap_server, "recent")
    deliver(imap_server, user, subject="one")
    deliver(imap_server, user, subject="two")
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user)
    c = RawIMAP.login(imap_server, user)
    try:
        assert status_recent(a) == 2
        r = a.select("INBOX", examine=True)
        assert r.numbers(b"RECENT") == [2], f"EXAMINE must report \\Recent:\n{r}"
        rows = a.fetch("1:*", "FLAGS")
        assert all("\\Recent" in flags_of(row["FLAGS"]) for row in rows.values()), rows
        assert a.command("SEARCH RECENT").search() == [1, 2]
        assert status_recent(b) == 2, "EXAMINE took \\Recent away"
        r = b.select("INBOX", examine=True)
        assert r.numbers(b"RECENT") == [2], f"a second EXAMINE:\n{r}"
        b.ok("CLOSE")
        r = b.select("INBOX")
        assert r.numbers(b"RECENT") == [2], f"SELECT after EXAMINE and STATUS:\n{r}"
        assert b.command("SEARCH RECENT").search() == [1, 2]
        # b took them: nobody else sees them \Recent now.
        assert status_recent(c) == 0
        r = c.select("INBOX")
        assert r.numbers(b"RECENT") == [0], str(r)
        r = c.select("INBOX", examine=True)
        assert r.numbers(b"RECENT") == [0], str(r)
        # A message arriving while an EXAMINE and a SELECT are open: the read-write
        # session takes it; the read-only one may see it \Recent but never takes it.
        deliver(imap_server, user, subject="three")
        rc = c.ok("NOOP")
        assert rc.numbers(b"EXISTS") == [3], str(rc)
        rb = b.ok("NOOP")
        assert rb.numbers(b"EXISTS") == [3], str(rb)
        assert b.command("SEARCH RECENT").search() == [1, 2, 3], str(rb)
    finally:
        for conn in (a, b, c):
            conn.close()


# -- keywords announced before use (RFC 3501 7.2.6, 7.1 PERMANENTFLAGS) --------------------------

class FlagWatcher:
    """Follows one session's responses in order: the flags announced by FLAGS and
    PERMANENTFLAGS, and every FETCH FLAGS that shows a flag not announced before it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.known: set[str] = set()
        self.permanent: set[str] = set()
        self.violations: list[str] = []

    def feed(self, r: Result) -> None:
        for line in r.untagged:
            if line.upper().startswith(b"FLAGS "):
                self.known = {f.lower() for f in flags_of(parse_data(line[6:])[0])}
                continue
            m = re.match(rb"OK \[PERMANENTFLAGS \(([^)]*)\)\]", line, re.I)
            if m:
                self.permanent = {f.decode().lower() for f in m.group(1).split()}
                continue
            m = re.match(rb"(\d+) FETCH ", line, re.I)
            if not m:
                continue
            items = parse_data(line[m.end():])[0]
            for i in range(0, len(items) - 1, 2):
                if bytes(items[i]).upper() != b"FLAGS":
                    continue
                for flag in flags_of(items[i + 1]):
                    if flag in SYSTEM_FLAGS:
                        continue
                    if flag.lower() not in self.known:
                        self.violations.append(f"{self.name}: {flag} in FETCH before FLAGS "
                                               f"({r.command!r}): {line!r}")
                    elif self.permanent and "\\*" not in self.permanent \
                            and flag.lower() not in self.permanent:
                        self.violations.append(f"{self.name}: {flag} not in PERMANENTFLAGS")


def test_keyword_from_another_session_announced_before_fetch(imap_server):
    user = new_user(imap_server, "kwses")
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user)
    try:
        for i in range(3):
            assert a.append("INBOX", msg(i)).status == "OK"
        wa, wb = FlagWatcher("a"), FlagWatcher("b")
        wa.feed(a.select("INBOX"))
        wb.feed(b.select("INBOX"))
        assert "$custom1" not in wa.known
        r = b.ok("STORE 2 +FLAGS ($Custom1)")
        wb.feed(r)
        r = a.ok("NOOP")
        wa.feed(r)
        assert "$custom1" in wa.known, f"no FLAGS update after another session's keyword:\n{r}"
        assert "$custom1" in wa.permanent, f"no PERMANENTFLAGS update:\n{r}"
        r = a.ok("FETCH 1:* FLAGS")
        wa.feed(r)
        assert "$Custom1" in flags_of(r.fetches()[2]["FLAGS"]), str(r)
        # STORE in the session itself announces its new keyword before the FETCH reply.
        r = a.ok("STORE 3 +FLAGS ($Own)")
        wa.feed(r)
        assert "$own" in wa.known, str(r)
        assert not wa.violations + wb.violations, "\n".join(wa.violations + wb.violations)
    finally:
        a.close()
        b.close()


def test_keyword_from_another_process_announced_before_fetch(imap_server):
    """A delivery from outside (e.g. $Junk set by a spam filter's delivery) writes the
    keyword table and a file carrying the letter; the session says FLAGS first."""
    user = new_user(imap_server, "kwproc")
    maildir = imap_server.maildir(user)
    a = RawIMAP.login(imap_server, user)
    try:
        assert a.append("INBOX", msg("first")).status == "OK"
        w = FlagWatcher("a")
        w.feed(a.select("INBOX"))
        assert "$junk" not in w.known
        table = maildir / "dovecot-keywords"
        existing = table.read_text() if table.exists() else ""
        used = {int(line.split()[0]) for line in existing.splitlines() if line.strip()}
        index = min(set(range(26)) - used)
        table.write_text(existing + f"{index} $Junk\n")
        name = f"{int(time.time())}.M1P1.otherhost:2,{chr(ord('a') + index)}"
        (maildir / "tmp" / name).write_bytes(msg("junk"))
        (maildir / "tmp" / name).rename(maildir / "new" / name)
        deadline = time.monotonic() + 5
        while True:
            r = a.ok("NOOP")
            w.feed(r)
            if r.numbers(b"EXISTS") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.numbers(b"EXISTS") == [2], str(r)
        assert "$junk" in w.known, f"$Junk not announced:\n{r}"
        r = a.ok("FETCH 2 FLAGS")
        w.feed(r)
        assert "$Junk" in flags_of(r.fetches()[2]["FLAGS"]), str(r)
        assert not w.violations, "\n".join(w.violations)
    finally:
        a.close()


def test_keyword_defined_during_a_streaming_fetch_announced_between_responses(imap_server):
    """A FETCH of a large body is written as the client reads; a keyword another session
    defines meanwhile is announced after the response being written, not inside its
    literal, and before the next response that shows it."""
    user = new_user(imap_server, "kwstream")
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user)
    try:
        big = msg("big") + b"x" * 76 + b"\r\n"
        big += (b"y" * 78 + b"\r\n") * (8 * 1024 * 1024 // 80)
        assert a.append("INBOX", big).status == "OK"
        assert a.append("INBOX", msg("small")).status == "OK"
        w = FlagWatcher("a")
        w.feed(a.select("INBOX"))
        b.select("INBOX")
        # A small receive buffer (no autotuning): the server cannot get far ahead.
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        tag = a.next_tag()
        a.send(tag + b" FETCH 1:2 (BODY.PEEK[] FLAGS)\r\n")
        head = a.read_line()  # the server has begun the first response; a reads no more
        m = re.match(rb"\* 1 FETCH \(.*\{(\d+)\}\r\n$", head)
        assert m, head
        b.ok("STORE 2 +FLAGS ($Midway)")
        body = a.read_exact(int(m.group(1)))
        first = head + body + a.read_line()
        assert first.endswith(b")\r\n") and body == big, first[-200:]
        r = a.read_result(tag, b"FETCH 1:2 (BODY.PEEK[] FLAGS)")
        assert r.status == "OK", str(r)
        r.untagged.insert(0, first[2:-2])
        w.feed(r)
        assert "$midway" in w.known, f"no FLAGS announcement: {[u[:80] for u in r.untagged]}"
        assert "$Midway" in flags_of(r.fetches()[2]["FLAGS"]), [u[:80] for u in r.untagged]
        assert not w.violations, "\n".join(w.violations)
    finally:
        a.close()
        b.close()


def test_ten_sessions_storing_keywords_never_show_unannounced_ones(imap_server):
    user = new_user(imap_server, "kwload")
    setup = RawIMAP.login(imap_server, user)
    try:
        setup.ok("CREATE Load")
        for i in range(5):
            assert setup.append("Load", msg(f"load{i}")).status == "OK"
    finally:
        setup.close()
    sessions = 10
    rounds = 2  # 20 keywords: within the 26 letters a Maildir folder has
    watchers = [FlagWatcher(f"s{n}") for n in range(sessions)]
    errors: list[str] = []
    start, stored = threading.Barrier(sessions), threading.Barrier(sessions)

    def run(n: int) -> None:
        w = watchers[n]
        try:
            c = RawIMAP.login(imap_server, user)
            try:
                w.feed(c.select("Load"))
                start.wait(timeout=30)
                for k in range(rounds):
                    w.feed(c.ok(f"STORE {n % 5 + 1} +FLAGS (kw{n}x{k})"))
                    for _ in range(3):
                        w.feed(c.ok("FETCH 1:* (FLAGS)"))
                        w.feed(c.ok("NOOP"))
                for _ in range(3):
                    w.feed(c.ok("FETCH 1:* (UID FLAGS)"))
                stored.wait(timeout=30)  # every STORE answered: all keywords are there
                final = c.ok("FETCH 1:* FLAGS")
                w.feed(final)
                shown = set().union(*(flags_of(row["FLAGS"]) for row in final.fetches().values()))
                missing = {f"kw{m}x{k}" for m in range(sessions) for k in range(rounds)} - shown
                if missing:
                    errors.append(f"s{n}: final FETCH lacks {sorted(missing)}")
            finally:
                c.close()
        except Exception as e:  # reported below; the other sessions go on
            errors.append(f"s{n}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(n,)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    violations = [v for w in watchers for v in w.violations]
    assert not errors, "\n".join(errors)
    assert not violations, "\n".join(violations[:20])
