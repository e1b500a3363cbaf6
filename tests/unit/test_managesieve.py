"""ManageSieve (RFC 5804): the wire syntax, and the session driven over StringTransport
against a real accounts database, portal, login throttle and Maildir store."""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailserver.accounts import Accounts
from mailserver.auth import AuthThrottle, MailRealm, build_portal
from mailserver.config import LimitsConfig, SieveConfig
from mailserver.maildir import MaildirStore
from mailserver.managesieve.account import ISieveAccount, avatar_factory
from mailserver.managesieve.service import ManageSieveFactory
from mailserver.managesieve.session import (MAX_BAD_COMMANDS, ManageSieveContext,
                                            ManageSieveSession)
from mailserver.managesieve.wire import (MAX_QUOTED, Atom, CommandReader, WireError,
                                         response, string)
from mailserver.passwords import hash_password
from mailserver.sieve.parser import CAPABILITIES

ALICE = "alice@example.test"
GOOD = b'require "fileinto";\r\nif header :contains "subject" "x" { fileinto "Junk"; }\r\n'
_HASHES: list[str] = []


def secret_hash() -> str:
    if not _HASHES:
        _HASHES.append(hash_password("secret"))
    return _HASHES[0]


def plain(user: str = ALICE, password: str = "secret") -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


# -- wire syntax -----------------------------------------------------------------------------

def read_all(data: bytes, max_line: int = 100, max_literal: int = 50,
             step: int | None = None) -> list:
    r = CommandReader(max_line, max_literal)
    out = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        r.feed(chunk)
        while (item := r.next()) is not None:
            out.append(item)
    return out


class WireTests(unittest.SynchronousTestCase):
    def test_atoms_quoted_and_literals(self):
        data = (b'PUTSCRIPT "my \\"script\\"" {5+}\r\nab\r\nc\r\n'
                b'HAVESPACE {3}\r\nfoo 42\r\nnoop\r\n')
        for step in (None, 1, 2, 7):
            self.assertEqual(read_all(data, step=step), [
                [Atom("PUTSCRIPT"), b'my "script"', b"ab\r\nc"],
                [Atom("HAVESPACE"), b"foo", Atom("42")],
                [Atom("noop")]], step)

    def test_bare_lf_and_empty_lines(self):
        self.assertEqual(read_all(b"\r\nLOGOUT\n"), [[], [Atom("LOGOUT")]])

    def test_a_literal_may_sit_between_arguments(self):
        self.assertEqual(read_all(b"RENAMESCRIPT {1+}\r\na {1+}\r\nb\r\n"),
                         [[Atom("RENAMESCRIPT"), b"a", b"b"]])

    def test_bad_commands_are_consumed_whole(self):
        cases = [b'X "unterminated\r\n', b'X "bad \\q escape"\r\n', b'X "nul\x00"\r\n',
                 b'X "\xff\xfe"\r\n', b'X "' + b"a" * (MAX_QUOTED + 1) + b'"\r\n',
                 b"X {3+} more\r\n", b'X "a"b\r\n', b"X {2+}\r\nabc\r\n", b"X (list)\r\n",
                 b"X {bad}\r\n", b"X \x01\r\n"]
        for case in cases:
            out = read_all(case + b"NOOP\r\n", max_line=2000)
            self.assertIsInstance(out[0], WireError, case)
            self.assertEqual(out[1:], [[Atom("NOOP")]], case)

    def test_a_bad_command_with_a_literal_does_not_run_the_literal(self):
        out = read_all(b'PUTSCRIPT "bad\\q" {8+}\r\nLOGOUT\r\n\r\nNOOP\r\n')
        self.assertIsInstance(out[0], WireError)
        self.assertEqual(out[1:], [[Atom("NOOP")]])

    def test_line_too_long(self):
        out = read_all(b"X " + b"a" * 500 + b"\r\nNOOP\r\n", max_line=100, step=10)
        self.assertEqual(out[0], WireError("Command line too long"))
        self.assertEqual(out[1:], [[Atom("NOOP")]])

    def test_a_line_too_long_ending_in_a_literal_does_not_run_the_literal(self):
        """The literal's octets belong to the refused command, whether the long line
        arrives whole or in pieces (a script's text must never run as commands)."""
        data = (b'PUTSCRIPT "' + b"a" * 300 + b'" {23+}\r\nDELETESCRIPT "victim"\r\n'
                b"\r\nNOOP\r\n")
        for step in (None, 1, 7, 64, 303, 305):
            out = read_all(data, max_line=100, step=step)
            self.assertEqual(out, [WireError("Command line too long"), [Atom("NOOP")]], step)

    def test_all_literals_of_one_command_are_bounded_together(self):
        """Each literal under the limit, but many of them in one command: refused as too
        large once they pass max_literal + max_line together, and not kept."""
        r = CommandReader(100, 50)
        r.feed(b"NOOP" + (b" {50+}\r\n" + b"x" * 50) * 10)
        self.assertIsNone(r.next())
        self.assertLessEqual(sum(len(a) for a in r._args if isinstance(a, bytes)), 150)
        r.feed(b"\r\nNOOP {50+}\r\n" + b"y" * 50 + b" {50+}\r\n" + b"z" * 50 + b"\r\n")
        self.assertEqual(r.next(), WireError("Literals larger than 150 octets in one command",
                                             too_large=True))
        self.assertEqual(r.next(), [Atom("NOOP"), b"y" * 50, b"z" * 50])

    def test_literal_too_large_is_counted_off_not_kept(self):
        r = CommandReader(100, 50)
        r.feed(b'PUTSCRIPT "s" {100000+}\r\n')
        for _ in range(100):
            r.feed(b"x" * 1000)
            self.assertIsNone(r.next())
            self.assertEqual(r.buffered, 0)
        r.feed(b"\r\nNOOP\r\n")
        self.assertEqual(r.next(), WireError("Literal larger than 50 octets", too_large=True))
        self.assertEqual(r.next(), [Atom("NOOP")])

    def test_strings_out(self):
        self.assertEqual(string("plain"), b'"plain"')
        self.assertEqual(string('a "q" \\'), b'"a \\"q\\" \\\\"')
        self.assertEqual(string("two\r\nlines"), b"{10}\r\ntwo\r\nlines")
        self.assertEqual(string("x" * 1025), b"{1025}\r\n" + b"x" * 1025)
        self.assertEqual(response("NO", "gone", "NONEXISTENT"), b'NO (NONEXISTENT) "gone"\r\n')
        self.assertEqual(response("OK", "Done", "TAG", "t1"), b'OK (TAG "t1") "Done"\r\n')
        self.assertEqual(response("OK"), b"OK\r\n")


# -- sessions ------------------------------------------------------------------------------

class TLSStringTransport(StringTransport):
    tls_started_with = None

    def startTLS(self, context) -> None:
        self.tls_started_with = context


class Server:
    """Accounts, store, portal and realm as mailserver.service builds them."""

    def __init__(self, root: Path, **sieve) -> None:
        self.accounts = Accounts(root / "var" / "accounts.sqlite3")
        self.store = MaildirStore(root / "maildirs", "mail.example.test")
        self.accounts.add_domain("example.test")
        for user in ("alice", "bob"):
            self.accounts.add_user(f"{user}@example.test", secret_hash())
        self.realm = MailRealm()
        self.realm.register(ISieveAccount, avatar_factory(self.accounts, self.store))
        self.portal = build_portal(self.accounts, self.realm)
        self.clock = task.Clock()
        self.throttle = AuthThrottle(3, 900, clock=self.clock)
        self.limits = LimitsConfig(max_command_length=1000, idle_timeout=60)
        self.sieve = SieveConfig(**{"max_script_size": 2000, "max_scripts": 3,
                                    "quota": 5000, **sieve})

    def context(self, tls: object = "tls-context", loopback: bool = False
                ) -> ManageSieveContext:
        return ManageSieveContext(hostname="mail.example.test", limits=self.limits,
                                  sieve=self.sieve, portal=self.portal,
                                  throttle=self.throttle, extensions=CAPABILITIES, tls=tls,
                                  allow_plaintext_loopback=loopback, clock=self.clock)

    def maildir(self, user: str = "alice") -> Path:
        return self.store.user_path("example.test", user)


class Conn:
    def __init__(self, server: Server, ip: str = "192.0.2.7", tls: bool = True,
                 context: ManageSieveContext | None = None) -> None:
        self.proto = ManageSieveSession(context or server.context())
        self.proto.factory = ManageSieveFactory(self.proto.context)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", ip, 4321))
        self.proto.makeConnection(self.transport)
        if tls:
            self.proto.startedTLS = True
        self.greeting = self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    @defer.inlineCallbacks
    def wait_for(self, count: int = 1, timeout: float = 10.0):
        """Output up to and including the `count`-th OK/NO/BYE line."""
        got = b""
        for _ in range(int(timeout / 0.005)):
            got += self.take()
            if len(final_lines(got)) >= count:
                return got
            yield task.deferLater(reactor, 0.005, lambda: None)
        raise AssertionError(f"incomplete response: {got[-300:]!r}")

    def cmd(self, line: bytes, count: int = 1):
        self.send(line + b"\r\n")
        return self.wait_for(count)

    @defer.inlineCallbacks
    def login(self, user: str = ALICE, password: str = "secret"):
        r = yield self.cmd(b'AUTHENTICATE "PLAIN" "' + plain(user, password) + b'"')
        return r

    def close(self) -> None:
        if not self.proto._lost:
            self.proto.connectionLost(None)


_FINAL = re.compile(rb"^(OK|NO|BYE)\b.*\r\n", re.M)


def final_lines(data: bytes) -> list[bytes]:
    """The OK/NO/BYE lines, literals skipped."""
    out, i = [], 0
    while i < len(data):
        nl = data.find(b"\r\n", i)
        if nl < 0:
            break
        line = data[i:nl]
        m = re.search(rb"\{(\d+)\}$", line)
        if m:
            i = nl + 2 + int(m.group(1))
            if _FINAL.match(line + b"\r\n"):
                out.append(line)
            continue
        if _FINAL.match(line + b"\r\n"):
            out.append(line)
        i = nl + 2
    return out


def capabilities(data: bytes) -> dict[str, str | None]:
    caps: dict[str, str | None] = {}
    for line in data.split(b"\r\n"):
        m = re.fullmatch(rb'"([^"]+)"(?: "([^"]*)")?', line)
        if m:
            caps[m.group(1).decode()] = m.group(2).decode() if m.group(2) is not None else None
    return caps


class SessionTests(unittest.TestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="managesieve-session-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.server = Server(root)
        self.addCleanup(self.server.accounts.close)
        self.conns: list[Conn] = []
        self.addCleanup(lambda: [c.close() for c in self.conns])

    def conn(self, **kw) -> Conn:
        c = Conn(self.server, **kw)
        self.conns.append(c)
        return c

    @defer.inlineCallbacks
    def logged_in(self, **kw):
        c = self.conn(**kw)
        r = yield c.login()
        self.assertEqual(r, b'OK "Logged in"\r\n')
        return c

    def test_answers_the_client_does_not_take_hold_the_input(self):
        """Pipelined NOOPs whose answers are never read: past 64 KB of answers the next
        command waits for the client; one that never reads is timed out, then aborted."""
        from mailserver.streaming import CLOSE_GRACE, OUTPUT_BURST
        c = self.conn()
        c.send(b"NOOP\r\n" * 20000)
        self.assertLess(len(c.take()), OUTPUT_BURST + 1024)
        self.assertIsNotNone(c.transport.producer)         # waiting for the client
        for _ in range(int(self.server.limits.idle_timeout + CLOSE_GRACE) // 5 + 40):
            self.server.clock.advance(5)                   # it takes nothing, ever
        self.assertTrue(c.transport.disconnecting)
        self.assertTrue(c.transport.disconnected)

    # -- greeting, capabilities, TLS

    def test_greeting_before_tls(self):
        c = self.conn(tls=False)
        caps = capabilities(c.greeting)
        self.assertEqual(caps["SASL"], "")           # RFC 5804 1.7: empty beside STARTTLS
        self.assertIn("STARTTLS", caps)
        self.assertEqual(caps["SIEVE"], " ".join(CAPABILITIES))
        self.assertEqual(caps["VERSION"], "1.0")
        self.assertEqual(caps["MAXREDIRECTS"], "4")
        self.assertIn("IMPLEMENTATION", caps)
        self.assertNotIn("NOTIFY", caps)
        self.assertTrue(c.greeting.endswith(b'OK "mail.example.test ManageSieve ready"\r\n'))

    @defer.inlineCallbacks
    def test_authenticate_refused_before_tls_and_not_counted(self):
        c = self.conn(tls=False)
        r = yield c.login()
        self.assertTrue(r.startswith(b"NO (ENCRYPT-NEEDED)"), r)
        self.assertEqual(self.server.throttle.failures("192.0.2.7", ALICE), 0)
        r = yield c.cmd(b"LISTSCRIPTS")
        self.assertEqual(r, b'NO "Authenticate first"\r\n')

    @defer.inlineCallbacks
    def test_starttls_reissues_capabilities_and_drops_pipelined_input(self):
        c = self.conn(tls=False)
        c.send(b"STARTTLS\r\nAUTHENTICATE \"PLAIN\" \"" + plain() + b"\"\r\n")
        r = yield c.wait_for(2)
        self.assertEqual(c.transport.tls_started_with, "tls-context")
        first, _, rest = r.partition(b"\r\n")
        self.assertEqual(first, b'OK "Begin TLS negotiation now"')
        caps = capabilities(rest)
        self.assertEqual(caps["SASL"], "PLAIN")
        self.assertNotIn("STARTTLS", caps)
        self.assertTrue(rest.endswith(b'OK "TLS negotiation successful"\r\n'))
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(c.take(), b"")                # the pipelined AUTHENTICATE is gone
        r = yield c.cmd(b"STARTTLS")
        self.assertEqual(r, b'NO "Already using TLS"\r\n')

    @defer.inlineCallbacks
    def test_plaintext_from_loopback_when_configured(self):
        c = self.conn(ip="127.0.0.1", tls=False, context=self.server.context(loopback=True))
        self.assertEqual(capabilities(c.greeting)["SASL"], "PLAIN")
        r = yield c.login()
        self.assertEqual(r, b'OK "Logged in"\r\n')

    # -- AUTHENTICATE

    @defer.inlineCallbacks
    def test_authenticate_with_continuation_and_literal(self):
        c = self.conn()
        c.send(b'AUTHENTICATE "PLAIN"\r\n')
        yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(c.take(), b'""\r\n')          # the empty challenge
        data = plain()
        r = yield c.cmd(b"{%d+}\r\n" % len(data) + data)
        self.assertEqual(r, b'OK "Logged in"\r\n')
        caps = capabilities((yield c.cmd(b"CAPABILITY")))
        self.assertEqual(caps["OWNER"], ALICE)

    @defer.inlineCallbacks
    def test_authenticate_cancelled(self):
        c = self.conn()
        c.send(b'AUTHENTICATE "PLAIN"\r\n')
        r = yield c.cmd(b'"*"')
        self.assertEqual(r, b'""\r\nNO "Authentication cancelled"\r\n')
        r = yield c.login()
        self.assertEqual(r, b'OK "Logged in"\r\n')

    @defer.inlineCallbacks
    def test_unsupported_mechanism_and_bad_base64(self):
        c = self.conn()
        r = yield c.cmd(b'AUTHENTICATE "DIGEST-MD5"')
        self.assertTrue(r.startswith(b'NO "Unsupported'), r)
        r = yield c.cmd(b'AUTHENTICATE "PLAIN" "!!!"')
        self.assertEqual(r, b'NO "Invalid base64"\r\n')

    @defer.inlineCallbacks
    def test_unreadable_login_data_counts_as_a_failed_login(self):
        c = self.conn()
        for _ in range(3):
            r = yield c.cmd(b'AUTHENTICATE "PLAIN" "!!!"')
            self.assertTrue(r.startswith(b'NO "Invalid base64"'), r)
        self.assertIn(b'BYE "Too many authentication failures"', r)
        self.assertTrue(c.transport.disconnecting)
        c = self.conn()      # cancelled exchanges count too
        for _ in range(3):
            c.send(b'AUTHENTICATE "PLAIN"\r\n')
            r = yield c.cmd(b'"*"')
            self.assertIn(b'NO "Authentication cancelled"', r)
        self.assertIn(b'BYE "Too many authentication failures"', r)
        self.assertTrue(c.transport.disconnecting)

    @defer.inlineCallbacks
    def test_failed_logins_are_throttled_and_close_the_connection(self):
        c = self.conn()
        for i in range(3):
            r = yield c.login(password="wrong")
            self.assertTrue(r.startswith(b'NO "Authentication failed"'), r)
            self.assertEqual(self.server.throttle.failures("192.0.2.7", ALICE), i + 1)
        self.assertIn(b'BYE "Too many authentication failures"', r)
        self.assertTrue(c.transport.disconnecting)

    # -- script commands

    @defer.inlineCallbacks
    def test_putscript_listscripts_setactive_getscript(self):
        c = yield self.logged_in()
        r = yield c.cmd(b'PUTSCRIPT "filter" {%d+}\r\n' % len(GOOD) + GOOD)
        self.assertEqual(r, b"OK\r\n")
        self.assertEqual((self.server.maildir() / "sieve" / "filter.sieve").read_bytes(), GOOD)
        r = yield c.cmd(b'SETACTIVE "filter"')
        self.assertEqual(r, b"OK\r\n")
        self.assertEqual(os.readlink(self.server.maildir() / ".dovecot.sieve"),
                         "sieve/filter.sieve")
        yield c.cmd(b'PUTSCRIPT "other" "keep;"')
        r = yield c.cmd(b"LISTSCRIPTS")
        self.assertEqual(r, b'"filter" ACTIVE\r\n"other"\r\nOK "Listscripts completed"\r\n')
        r = yield c.cmd(b'GETSCRIPT "filter"')
        self.assertEqual(r, b"{%d}\r\n" % len(GOOD) + GOOD + b"\r\nOK\r\n")
        r = yield c.cmd(b'SETACTIVE ""')
        self.assertEqual(r, b"OK\r\n")
        self.assertFalse(os.path.lexists(self.server.maildir() / ".dovecot.sieve"))

    @defer.inlineCallbacks
    def test_putscript_and_checkscript_errors_carry_line_and_reason(self):
        c = yield self.logged_in()
        bad = b'keep;\r\nfileinto "Junk";\r\n'
        r = yield c.cmd(b'PUTSCRIPT "bad" {%d+}\r\n' % len(bad) + bad)
        self.assertTrue(re.fullmatch(rb'NO "line 2: [^\r\n]*fileinto[^\r\n]*"\r\n', r), r)
        self.assertFalse((self.server.maildir() / "sieve" / "bad.sieve").exists())
        r = yield c.cmd(b"CHECKSCRIPT {%d+}\r\n" % len(bad) + bad)
        self.assertTrue(r.startswith(b'NO "line 2: '), r)
        r = yield c.cmd(b"CHECKSCRIPT {%d+}\r\n" % len(GOOD) + GOOD)
        self.assertEqual(r, b"OK\r\n")
        include = b'require "include";\r\ninclude "helpers";\r\n'
        r = yield c.cmd(b"CHECKSCRIPT {%d+}\r\n" % len(include) + include)
        self.assertEqual(r, b'OK (WARNINGS) "included script \\"helpers\\" does not exist"\r\n')

    @defer.inlineCallbacks
    def test_quota_responses(self):
        c = yield self.logged_in()
        r = yield c.cmd(b'HAVESPACE "s" 2000')
        self.assertEqual(r, b'OK "Putscript would succeed"\r\n')
        r = yield c.cmd(b'HAVESPACE "s" 2001')
        self.assertTrue(r.startswith(b"NO (QUOTA/MAXSIZE) "), r)
        for name in (b"a", b"b", b"c"):
            r = yield c.cmd(b'PUTSCRIPT "%s" "keep;"' % name)
            self.assertEqual(r, b"OK\r\n")
        r = yield c.cmd(b'HAVESPACE "d" 10')
        self.assertTrue(r.startswith(b"NO (QUOTA/MAXSCRIPTS) "), r)
        r = yield c.cmd(b'PUTSCRIPT "d" "keep;"')
        self.assertTrue(r.startswith(b"NO (QUOTA/MAXSCRIPTS) "), r)
        r = yield c.cmd(b'HAVESPACE "a" 10')
        self.assertEqual(r, b'OK "Putscript would succeed"\r\n')
        r = yield c.cmd(b'HAVESPACE "a" 99999999999')
        self.assertTrue(r.startswith(b'NO "Bad arguments'), r)

    @defer.inlineCallbacks
    def test_a_script_over_the_size_limit_is_refused_and_the_session_goes_on(self):
        c = yield self.logged_in()
        c.send(b'PUTSCRIPT "big" {3000+}\r\n' + b"#" * 3000 + b"\r\n")
        r = yield c.cmd(b'NOOP "after"', count=2)
        self.assertEqual(r, b'NO (QUOTA/MAXSIZE) "Literal larger than 2000 octets"\r\n'
                            b'OK (TAG "after") "Done"\r\n')
        self.assertFalse((self.server.maildir() / "sieve" / "big.sieve").exists())

    @defer.inlineCallbacks
    def test_literals_before_login_are_small(self):
        context = self.server.context()
        context.sieve = SieveConfig(max_script_size=8000, quota=8000)
        c = self.conn(context=context)
        c.send(b'AUTHENTICATE "PLAIN" {5000+}\r\n' + b"A" * 5000 + b"\r\n")
        r = yield c.cmd(b"NOOP", count=2)
        self.assertEqual(r, b'NO (QUOTA/MAXSIZE) "Literal larger than 4096 octets"\r\n'
                            b'OK "Done"\r\n')
        r = yield c.login()
        self.assertEqual(r, b'OK "Logged in"\r\n')
        r = yield c.cmd(b'PUTSCRIPT "s" {5000+}\r\n' + b"#" * 4998 + b"\r\n")
        self.assertEqual(r, b"OK\r\n")

    @defer.inlineCallbacks
    def test_delete_rename_and_response_codes(self):
        c = yield self.logged_in()
        yield c.cmd(b'PUTSCRIPT "a" "keep;"')
        yield c.cmd(b'PUTSCRIPT "b" "keep;"')
        yield c.cmd(b'SETACTIVE "a"')
        r = yield c.cmd(b'DELETESCRIPT "a"')
        self.assertTrue(r.startswith(b"NO (ACTIVE) "), r)
        r = yield c.cmd(b'RENAMESCRIPT "a" "b"')
        self.assertTrue(r.startswith(b"NO (ALREADYEXISTS) "), r)
        r = yield c.cmd(b'RENAMESCRIPT "a" "renamed"')
        self.assertEqual(r, b"OK\r\n")
        r = yield c.cmd(b"LISTSCRIPTS")
        self.assertEqual(r, b'"b"\r\n"renamed" ACTIVE\r\nOK "Listscripts completed"\r\n')
        for line in (b'DELETESCRIPT "a"', b'GETSCRIPT "a"', b'SETACTIVE "a"',
                     b'RENAMESCRIPT "a" "c"'):
            r = yield c.cmd(line)
            self.assertTrue(r.startswith(b"NO (NONEXISTENT) "), (line, r))
        r = yield c.cmd(b'DELETESCRIPT "b"')
        self.assertEqual(r, b"OK\r\n")

    @defer.inlineCallbacks
    def test_hostile_names_are_refused(self):
        c = yield self.logged_in()
        root = self.server.maildir().parent.parent
        before = sorted(root.rglob("*"))
        for name in (b"../../escape", b".dovecot", b"a/b", b"{5+}\r\nx\x01y", b"\xc3\x28"):
            r = yield c.cmd(b'PUTSCRIPT {%d+}\r\n' % len(name) + name + b' "keep;"')
            self.assertTrue(r.startswith(b'NO "Invalid script name'), (name, r))
        self.assertEqual(sorted(root.rglob("*")), before)

    @defer.inlineCallbacks
    def test_pipelined_commands_are_answered_in_order(self):
        c = yield self.logged_in()
        c.send(b'PUTSCRIPT "a" "keep;"\r\nSETACTIVE "a"\r\nLISTSCRIPTS\r\nNOOP "t"\r\n')
        r = yield c.wait_for(4)
        self.assertEqual(r, b'OK\r\nOK\r\n"a" ACTIVE\r\nOK "Listscripts completed"\r\n'
                            b'OK (TAG "t") "Done"\r\n')

    @defer.inlineCallbacks
    def test_unauthenticate_and_logout(self):
        c = yield self.logged_in()
        r = yield c.cmd(b"UNAUTHENTICATE")
        self.assertEqual(r, b'OK "Unauthenticated"\r\n')
        r = yield c.cmd(b"LISTSCRIPTS")
        self.assertEqual(r, b'NO "Authenticate first"\r\n')
        r = yield c.cmd(b"LOGOUT")
        self.assertEqual(r, b'OK "Logout completed"\r\n')
        self.assertTrue(c.transport.disconnecting)

    @defer.inlineCallbacks
    def test_too_many_bad_commands(self):
        c = self.conn()
        for _ in range(MAX_BAD_COMMANDS - 1):
            r = yield c.cmd(b"FROB")
            self.assertEqual(r, b'NO "Unknown command"\r\n')
        r = yield c.cmd(b"FROB")
        self.assertEqual(r, b'NO "Unknown command"\r\nBYE "Too many bad commands"\r\n')
        self.assertTrue(c.transport.disconnecting)

    def test_idle_timeout(self):
        c = self.conn()
        self.server.clock.advance(59)
        self.assertFalse(c.transport.disconnecting)
        c.send(b"NOOP\r\n")
        self.server.clock.advance(59)
        self.assertFalse(c.transport.disconnecting)
        self.server.clock.advance(1)
        self.assertTrue(c.transport.disconnecting)
        self.assertTrue(c.take().endswith(b'BYE "Disconnected for inactivity"\r\n'))

    def test_connections_over_the_limit_are_refused_with_bye(self):
        self.assertEqual(ManageSieveFactory.refusal,
                         b'BYE (TRYLATER) "Too many connections, try again later"\r\n')


def test_dns_srv_record_for_managesieve(tmp_path):
    """RFC 5804 1.8: `mailserver-admin dns` prints _sieve._tcp (target "." when off)."""
    from mailserver.config import parse_config
    from mailserver.dnsrecords import records

    def srv(listen: dict) -> str:
        config = parse_config({"server": {"hostname": "mail.example.test"},
                               "listen": listen}, tmp_path / "m.toml")
        return next(" ".join(line.split()[3:]) for line in records(config, "example.test", [])
                    if line.startswith("_sieve._tcp.example.test."))

    assert srv({"managesieve": "tcp:4190"}) == "0 1 4190 mail.example.test."
    assert srv({"managesieve": ""}) == "0 0 0 ."
