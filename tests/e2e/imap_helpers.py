"""Helpers for the IMAP end-to-end tests: module-scoped servers, fresh users, an imaplib
connection over STARTTLS or implicit TLS, a raw line-level IMAP client that shows every
byte, and a small parser for IMAP response data (FETCH items, BODYSTRUCTURE, LIST).

Nothing of the server is imported: the server is driven through `mailserver-admin` and
its network ports only, as in harness.py.
"""

from __future__ import annotations

import base64
import calendar
import imaplib
import itertools
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pytest

from harness import (
    DOMAIN,
    HOSTNAME,
    PASSWORD,
    ServerProcess,
    make_message,
    send_mail,
    split_overrides,
    tls_client_context,
)

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"

# CAPABILITY after login, exactly (the project's IMAP contract).
AUTHENTICATED_CAPABILITIES = frozenset(
    "IMAP4rev1 IMAP4rev2 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE UNSELECT CHILDREN UIDPLUS MOVE "
    "SPECIAL-USE LIST-EXTENDED LIST-STATUS QUOTA QUOTA=RES-STORAGE ESEARCH SORT SORT=DISPLAY THREAD=ORDEREDSUBJECT "
    "THREAD=REFERENCES SEARCHRES ESORT CONTEXT=SEARCH CONTEXT=SORT CONDSTORE QRESYNC MULTIAPPEND CATENATE BINARY COMPRESS=DEFLATE "
    "STATUS=SIZE CREATE-SPECIAL-USE UTF8=ACCEPT".split())

SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk",
               "Archive": "\\Archive"}


# -- servers and users ----------------------------------------------------------------------

def module_server(**overrides: Any):
    """A module-scoped fixture: one running server (users alice, bob, carol) shared by the
    tests of a module.  Tests keep out of each other's way with `new_user`."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory, accounts_template: Any):
        srv = ServerProcess(tmp_path_factory.mktemp("imap-server"), split_overrides(overrides))
        try:
            if accounts_template is None:
                srv.create_accounts()
            else:
                srv.copy_state_from(accounts_template)
            srv.start()
            yield srv
        finally:
            srv.close()

    return fixture


_user_counter = itertools.count(1)


def new_user(server: ServerProcess, prefix: str = "u", quota: str | None = None) -> str:
    """Create a fresh account (password "secret") with `mailserver-admin`; its address."""
    address = f"{prefix}{os.getpid()}x{next(_user_counter)}@{DOMAIN}"
    args = ["user", "add", address, "--password-stdin"]
    if quota is not None:
        args += ["--quota", quota]
    server.admin_ok(*args, input=PASSWORD + "\n")
    return address


def deliver(server: ServerProcess, to: str, *, subject: str = "test", body: bytes | str = b"Hello.\r\n",
            sender: str = "x@remote.test", msgid: str | None = None,
            extra_headers: Iterable[str] = ()) -> bytes:
    """Deliver one message over the MX port (durable once it returns); the sent bytes."""
    msgid = msgid or f"<{time.time_ns()}.{next(_user_counter)}@remote.test>"
    message = make_message(msgid, sender=sender, to=to, subject=subject, body=body,
                           extra_headers=extra_headers)
    refused = send_mail(server, message, [to], sender=sender)
    assert not refused, f"delivery to {to} refused: {refused}"
    return message


def drop_into_new(maildir: Path, message: bytes, name: str | None = None) -> Path:
    """Write a message into a Maildir the way another delivery agent does: tmp/ then new/."""
    name = name or f"{int(time.time())}.M{time.time_ns() % 1000000}P{os.getpid()}.otherhost"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(message)
    final = maildir / "new" / name
    os.rename(tmp, final)
    return final


def tree_snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple[str, int, int]]:
    """Every path below `root` (outside `exclude`) with its kind, size and mtime."""
    excluded = [Path(os.path.abspath(p)) for p in exclude]
    out: dict[str, tuple[str, int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            p = Path(os.path.abspath(here / d))
            if any(p == e for e in excluded):
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in [*dirnames, *filenames]:
            p = here / name
            st = os.lstat(p)
            kind = "link" if os.path.islink(p) else ("dir" if p.is_dir() else "file")
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else 0,
                                             st.st_mtime_ns if kind != "dir" else 0)
    return out


# -- imaplib ------------------------------------------------------------------------------

def imap_connect(server: ServerProcess, *, implicit: bool = False, starttls: bool = True,
                 timeout: float = 15) -> imaplib.IMAP4:
    """imaplib connection: to [listen].imaps (implicit TLS) or to [listen].imap + STARTTLS."""
    if implicit:
        return imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"],
                                 ssl_context=tls_client_context(), timeout=timeout)
    conn = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=timeout)
    if starttls:
        conn.starttls(tls_client_context())
    return conn


def imap_login(server: ServerProcess, user: str = ALICE, password: str = PASSWORD, *,
               implicit: bool = False) -> imaplib.IMAP4:
    conn = imap_connect(server, implicit=implicit)
    typ, data = conn.login(user, password)
    assert typ == "OK", f"LOGIN {user}: {typ} {data}"
    return conn


def imaplib_ok(result: tuple[str, list[Any]], what: str = "") -> list[Any]:
    typ, data = result
    assert typ == "OK", f"{what}: {typ} {data}"
    return data


def close_quietly(conn: Any) -> None:
    try:
        if isinstance(conn, RawIMAP):
            conn.close()
        else:
            conn.logout()
    except Exception:
        try:
            conn.shutdown()
        except Exception:
            pass


# -- IMAP response data ----------------------------------------------------------------------

class Atom(bytes):
    """An atom in a response (as opposed to a quoted string or literal, which are bytes)."""

    def __repr__(self) -> str:
        return "Atom(" + bytes.__repr__(self) + ")"


_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n")
_ATOM_STOP = set(b' ()"\r\n')


def parse_data(data: bytes) -> list[Any]:
    """Parse IMAP response data into lists (parenthesised), Atom, bytes (quoted strings and
    literals) and None (NIL).  "BODY[HEADER.FIELDS (A B)]<0>" is one atom."""
    items, pos = _parse_list(data, 0, False)
    return items


def _parse_list(data: bytes, pos: int, nested: bool) -> tuple[list[Any], int]:
    items: list[Any] = []
    n = len(data)
    while pos < n:
        c = data[pos]
        if c in (0x20, 0x0d, 0x0a):
            pos += 1
        elif c == 0x29:  # )
            if not nested:
                raise ValueError(f"unbalanced ')' at {pos}: {data[:200]!r}")
            return items, pos + 1
        elif c == 0x28:  # (
            sub, pos = _parse_list(data, pos + 1, True)
            items.append(sub)
        elif c == 0x22:  # "
            buf = bytearray()
            j = pos + 1
            while True:
                if j >= n:
                    raise ValueError(f"unterminated quoted string: {data[pos:pos + 100]!r}")
                ch = data[j]
                if ch == 0x5c:  # backslash
                    buf.append(data[j + 1])
                    j += 2
                    continue
                if ch == 0x22:
                    break
                buf.append(ch)
                j += 1
            items.append(bytes(buf))
            pos = j + 1
        elif c == 0x7b and _LITERAL.match(data, pos):  # {n}CRLF
            m = _LITERAL.match(data, pos)
            assert m is not None
            size = int(m.group(1))
            items.append(bytes(data[m.end():m.end() + size]))
            pos = m.end() + size
        else:
            j = pos
            while j < n and data[j] not in _ATOM_STOP:
                if data[j] == 0x5b:  # [ ... ] belongs to the atom (section specs)
                    k = data.find(b"]", j)
                    if k < 0:
                        raise ValueError(f"unterminated '[': {data[pos:pos + 100]!r}")
                    j = k + 1
                    continue
                j += 1
            token = data[pos:j]
            items.append(None if token.upper() == b"NIL" else Atom(token))
            pos = j
    if nested:
        raise ValueError(f"unterminated '(': {data[:200]!r}")
    return items, pos


def norm_key(key: bytes | str) -> str:
    """A FETCH item name in a comparable form: upper case, single spaces."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return re.sub(r"\s+", " ", key.upper()).strip()


def fetch_items(data: bytes) -> dict[str, Any]:
    """The (item value ...) list of a FETCH response as {ITEM NAME: value}."""
    parsed = parse_data(data)
    assert len(parsed) == 1 and isinstance(parsed[0], list), f"not a FETCH item list: {data[:300]!r}"
    lst = parsed[0]
    assert len(lst) % 2 == 0, f"odd FETCH item list: {data[:300]!r}"
    return {norm_key(lst[i]): lst[i + 1] for i in range(0, len(lst), 2)}


_FETCH_LINE = re.compile(rb"(\d+) FETCH ", re.I)


def fetch_responses(untagged: Iterable[bytes]) -> dict[int, dict[str, Any]]:
    """{sequence number: {item: value}} from untagged responses (several per message merged)."""
    out: dict[int, dict[str, Any]] = {}
    for line in untagged:
        m = _FETCH_LINE.match(line)
        if m:
            out.setdefault(int(m.group(1)), {}).update(fetch_items(line[m.end():]))
    return out


def flags_of(value: Any) -> set[str]:
    return {bytes(f).decode() for f in value}


def as_int(value: Any) -> int:
    return int(bytes(value))


def response_code(text: bytes) -> bytes | None:
    """The "[CODE ...]" at the start of a response text, without brackets."""
    m = re.match(rb"\s*\[([^\]]*)\]", text)
    return m.group(1) if m else None


_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def parse_internaldate(value: bytes) -> float:
    """An INTERNALDATE / date-time "dd-Mon-yyyy hh:mm:ss +zzzz" as a UNIX time."""
    m = re.fullmatch(rb"\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)",
                     bytes(value))
    assert m, f"not an IMAP date-time: {value!r}"
    d, mon, y, hh, mm, ss, sign, zh, zm = m.groups()
    ts = calendar.timegm((int(y), _MONTHS.index(mon.decode().capitalize()) + 1, int(d),
                          int(hh), int(mm), int(ss), 0, 0, 0))
    offset = (int(zh) * 60 + int(zm)) * 60
    return float(ts - offset if sign == b"+" else ts + offset)


# -- a raw IMAP client ---------------------------------------------------------------------

class ConnectionClosed(Exception):
    """The server closed the connection."""


@dataclass
class Result:
    """One command's outcome: the untagged responses before the tagged one."""

    command: bytes
    tag: bytes
    status: str = ""           # OK / NO / BAD; "" if the connection closed first
    text: bytes = b""          # the tagged line after the status
    untagged: list[bytes] = field(default_factory=list)   # without the leading "* "
    continuations: list[bytes] = field(default_factory=list)

    @property
    def code(self) -> bytes | None:
        return response_code(self.text)

    def __str__(self) -> str:
        lines = [f"C: {self.tag.decode()} {self.command[:300].decode('utf-8', 'replace')}"]
        lines += [f"S: + {c[:300]!r}" for c in self.continuations]
        lines += [f"S: * {u[:300]!r}" for u in self.untagged]
        lines.append(f"S: {self.tag.decode()} {self.status} {self.text[:300]!r}"
                     if self.status else "S: (connection closed)")
        return "\n".join(lines)

    def with_prefix(self, prefix: bytes) -> list[bytes]:
        """Untagged responses starting with `prefix` (case-insensitive), prefix removed."""
        p = prefix.upper()
        return [u[len(p):] for u in self.untagged if u[:len(p)].upper() == p]

    def numbers(self, keyword: bytes) -> list[int]:
        """n of every "* n KEYWORD" (EXISTS, RECENT, EXPUNGE)."""
        out = []
        for u in self.untagged:
            m = re.fullmatch(rb"(\d+) " + re.escape(keyword), u, re.I)
            if m:
                out.append(int(m.group(1)))
        return out

    def codes(self) -> dict[str, bytes]:
        """Response codes of untagged OK/NO/BAD responses and the tagged one: {NAME: rest}."""
        out: dict[str, bytes] = {}
        for u in [*self.untagged, b"OK " + self.text]:
            m = re.match(rb"(?:OK|NO|BAD) \[([A-Za-z0-9.-]+)(?: ([^\]]*))?\]", u, re.I)
            if m:
                out[m.group(1).upper().decode()] = m.group(2) or b""
        return out

    def search(self) -> list[int]:
        nums: list[int] = []
        for rest in self.with_prefix(b"SEARCH"):
            nums += [int(x) for x in rest.split()]
        return nums

    def fetches(self) -> dict[int, dict[str, Any]]:
        return fetch_responses(self.untagged)


class RawIMAP:
    """An IMAP client over a plain socket that shows the exact bytes of every response."""

    def __init__(self, port: int, *, implicit_tls: bool = False, timeout: float = 15,
                 host: str = "127.0.0.1") -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if implicit_tls:
            self.sock = tls_client_context().wrap_socket(self.sock, server_hostname=HOSTNAME)
        self.buf = b""
        self._tags = itertools.count(1)
        self.greeting = self.read_response()
        self.transcript: list[bytes] = []

    # -- construction shortcuts

    @classmethod
    def connect(cls, server: ServerProcess, *, implicit: bool = False, tls: bool = True,
                timeout: float = 15) -> "RawIMAP":
        """Connected (and, unless tls=False, TLS-protected) but not logged in."""
        c = cls(server.ports["imaps" if implicit else "imap"], implicit_tls=implicit,
                timeout=timeout)
        if tls and not implicit:
            c.starttls()
        return c

    @classmethod
    def login(cls, server: ServerProcess, user: str = ALICE, password: str = PASSWORD, *,
              implicit: bool = False, select: str | None = None) -> "RawIMAP":
        c = cls.connect(server, implicit=implicit)
        r = c.command(b"LOGIN " + quote(user) + b" " + quote(password))
        assert r.status == "OK", f"login as {user} failed:\n{r}"
        if select is not None:
            r = c.command(b"SELECT " + quote(select))
            assert r.status == "OK", f"SELECT {select}:\n{r}"
        return c

    # -- bytes

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ConnectionClosed(f"connection reset ({e}); unparsed: {self.buf[:300]!r}") from None
        if not chunk:
            raise ConnectionClosed(f"connection closed; unparsed: {self.buf[:300]!r}")
        self.buf += chunk

    def read_line(self) -> bytes:
        """One line including its CRLF."""
        while b"\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self) -> bytes:
        """One response with its literals inline ("... {n}\\r\\n<n octets>..."), no final CRLF."""
        out = self.read_line()
        while True:
            m = re.search(rb"\{(\d+)\}\r?\n$", out)
            if not m:
                break
            out += self.read_exact(int(m.group(1)))
            out += self.read_line()
        return out[:-2] if out.endswith(b"\r\n") else out.rstrip(b"\n")

    # -- commands

    def next_tag(self) -> bytes:
        return b"t%d" % next(self._tags)

    def command(self, text: bytes | str, *literals: bytes, tag: bytes | None = None,
                non_sync: bool = False) -> Result:
        """Send `tag text` and read to the tagged reply.  With `literals`, `text` ends where
        the (single) literal goes: command(b"APPEND X ", msg)."""
        if isinstance(text, str):
            text = text.encode()
        if literals:
            return self.command_parts([text, *[Lit(x) for x in literals]], tag=tag,
                                      non_sync=non_sync)
        tag = tag or self.next_tag()
        self.send(tag + b" " + text + b"\r\n")
        return self.read_result(tag, text)

    def command_parts(self, parts: list[bytes], *, tag: bytes | None = None,
                      non_sync: bool = False) -> Result:
        """A command made of text pieces and `Lit` literals, in order."""
        tag = tag or self.next_tag()
        shown = b" ".join(p if not isinstance(p, Lit) else b"{%d}" % len(p) for p in parts)
        result = Result(shown, tag)
        pending = tag + b" "
        for part in parts:
            if isinstance(part, Lit):
                if non_sync:  # LITERAL+: the octets follow at once
                    pending += b"{%d+}\r\n" % len(part) + bytes(part)
                    continue
                self.send(pending + b"{%d}\r\n" % len(part))
                while True:
                    line = self.read_response()
                    if line.startswith(b"+"):
                        result.continuations.append(line)
                        break
                    if line.startswith(tag + b" "):
                        self._finish(result, line)
                        return result  # refused before the literal
                    result.untagged.append(line[2:] if line.startswith(b"* ") else line)
                pending = bytes(part)  # sent together with what follows it
            else:
                pending += part
        self.send(pending + b"\r\n")
        return self.read_result(tag, shown, result)

    def read_result(self, tag: bytes, command: bytes = b"", result: Result | None = None) -> Result:
        result = result or Result(command, tag)
        try:
            while True:
                line = self.read_response()
                if line.startswith(tag + b" "):
                    self._finish(result, line)
                    return result
                if line.startswith(b"* "):
                    result.untagged.append(line[2:])
                elif line.startswith(b"+"):
                    result.continuations.append(line)
                else:
                    result.untagged.append(line)
        except ConnectionClosed:
            return result

    @staticmethod
    def _finish(result: Result, line: bytes) -> None:
        rest = line[len(result.tag) + 1:]
        status, _, text = rest.partition(b" ")
        result.status = status.upper().decode("ascii", "replace")
        result.text = text

    def ok(self, text: bytes | str, *literals: bytes) -> Result:
        r = self.command(text, *literals)
        assert r.status == "OK", f"expected OK:\n{r}"
        return r

    def starttls(self, context: ssl.SSLContext | None = None) -> Result:
        r = self.command(b"STARTTLS")
        assert r.status == "OK", f"STARTTLS:\n{r}"
        assert not self.buf, f"plaintext bytes after the STARTTLS reply: {self.buf!r}"
        self.sock = (context or tls_client_context()).wrap_socket(self.sock,
                                                                   server_hostname=HOSTNAME)
        return r

    def capabilities(self) -> set[str]:
        r = self.ok(b"CAPABILITY")
        caps: set[str] = set()
        for rest in r.with_prefix(b"CAPABILITY "):
            caps |= set(rest.decode().split())
        return caps

    def select(self, mailbox: str, examine: bool = False) -> Result:
        r = self.command((b"EXAMINE " if examine else b"SELECT ") + quote(mailbox))
        assert r.status == "OK", f"{'EXAMINE' if examine else 'SELECT'} {mailbox}:\n{r}"
        return r

    def append(self, mailbox: str, message: bytes, flags: str | None = None,
               date: str | None = None, non_sync: bool = False) -> Result:
        head = b"APPEND " + quote(mailbox)
        if flags is not None:
            head += b" (" + flags.encode() + b")"
        if date is not None:
            head += b' "' + date.encode() + b'"'
        return self.command_parts([head + b" ", Lit(message)], non_sync=non_sync)

    def fetch(self, seqset: str, items: str, uid: bool = False) -> dict[int, dict[str, Any]]:
        r = self.ok(f"{'UID ' if uid else ''}FETCH {seqset} {items}")
        return r.fetches()

    def idle_start(self) -> tuple[bytes, bytes]:
        tag = self.next_tag()
        self.send(tag + b" IDLE\r\n")
        line = self.read_response()
        return tag, line

    # -- observation

    def pending(self, wait: float) -> bytes:
        """Whatever arrives within `wait` seconds without being asked (buffered bytes too)."""
        data, self.buf = self.buf, b""
        deadline = time.monotonic() + wait
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
            pass
        except (ConnectionResetError, OSError):
            pass
        finally:
            try:
                self.sock.settimeout(self.timeout)
            except OSError:
                pass
        return data

    def wait_for(self, pattern: bytes, timeout: float) -> tuple[bytes | None, bytes]:
        """Read responses until one matches regex `pattern` (returned) or `timeout` passes;
        also returns everything read."""
        seen = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, seen
                self.sock.settimeout(left)
                try:
                    line = self.read_response()
                except (socket.timeout, TimeoutError):
                    return None, seen
                seen += line + b"\r\n"
                if re.search(pattern, line):
                    return line, seen
        finally:
            try:
                self.sock.settimeout(self.timeout)
            except OSError:
                pass

    def closed_by_server(self, wait: float = 5.0) -> bool:
        deadline = time.monotonic() + wait
        self.buf = b""
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    if not self.sock.recv(65536):
                        return True
                except (socket.timeout, TimeoutError):
                    return False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
            return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def logout(self) -> None:
        try:
            self.send(b"zz LOGOUT\r\n")
            self.pending(0.2)
        except OSError:
            pass
        self.close()

    def __enter__(self) -> "RawIMAP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Lit(bytes):
    """A literal argument for RawIMAP.command_parts."""


def quote(value: str | bytes) -> bytes:
    """An IMAP quoted string."""
    if isinstance(value, str):
        value = value.encode()
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def plain_b64(user: str, password: str, authz: str = "") -> bytes:
    return base64.b64encode(f"{authz}\0{user}\0{password}".encode())


# -- test messages ---------------------------------------------------------------------------

def crlf(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("utf-8")
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class MultipartMessage:
    """A multipart/mixed message and the exact bytes of each section IMAP can name."""

    data: bytes
    sections: dict[str, bytes]       # "HEADER", "TEXT", "1", "1.MIME", "2.1", "3.HEADER", ...
    sizes: dict[str, int]            # body sizes as in BODYSTRUCTURE
    lines: dict[str, int]            # body line counts as in BODYSTRUCTURE


def multipart_message(msgid: str = "<multi-1@example.test>") -> MultipartMessage:
    """multipart/mixed:
        1   text/plain
        2   multipart/alternative: 2.1 text/plain, 2.2 text/html
        3   message/rfc822 (a text/plain message)
        4   application/pdf attachment (base64)
    """
    top_header = crlf(
        "From: Alice Example <alice@example.test>\n"
        "To: Bob <bob@example.test>, carol@example.test\n"
        "Cc: Dave <dave@remote.test>\n"
        "Subject: Quarterly report\n"
        "Date: Tue, 02 Jan 2024 10:00:00 +0000\n"
        f"Message-ID: {msgid}\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="outer-b"\n'
        "\n")
    p1_mime = crlf("Content-Type: text/plain; charset=us-ascii\n\n")
    p1_body = crlf("Intro text.\nSecond intro line.\n")
    p21_mime = crlf("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 7bit\n\n")
    p21_body = crlf("Plain line one.\nPlain line two.\nPlain line three.\n")
    p22_mime = crlf("Content-Type: text/html; charset=utf-8\n"
                    "Content-Transfer-Encoding: quoted-printable\n\n")
    p22_body = crlf("<html><body><p>HTML body</p></body></html>\n")
    p2_body = (b"--inner-b\r\n" + p21_mime + p21_body + b"\r\n--inner-b\r\n" + p22_mime + p22_body
               + b"\r\n--inner-b--\r\n")
    p2_mime = crlf('Content-Type: multipart/alternative; boundary="inner-b"\n\n')
    inner_header = crlf("From: Carol <carol@example.test>\n"
                        "To: alice@example.test\n"
                        "Subject: Forwarded inner\n"
                        "Date: Mon, 01 Jan 2024 09:00:00 +0000\n"
                        "Message-ID: <inner-1@example.test>\n\n")
    inner_text = crlf("Inner body line one.\nInner body line two.\n")
    p3_body = inner_header + inner_text
    p3_mime = crlf("Content-Type: message/rfc822\nContent-Description: forwarded message\n\n")
    p4_mime = crlf('Content-Type: application/pdf; name="report.pdf"\n'
                   'Content-Disposition: attachment; filename="report.pdf"\n'
                   "Content-Transfer-Encoding: base64\n\n")
    p4_body = crlf("JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoK\n"
                   "dHJhaWxlcgo8PC9Sb290IDEgMCBSPj4KJSVFT0YK\n")
    text = (crlf("This is a multi-part message in MIME format.\n")
            + b"--outer-b\r\n" + p1_mime + p1_body
            + b"\r\n--outer-b\r\n" + p2_mime + p2_body
            + b"\r\n--outer-b\r\n" + p3_mime + p3_body
            + b"\r\n--outer-b\r\n" + p4_mime + p4_body
            + b"\r\n--outer-b--\r\n")
    data = top_header + text
    sections = {
        "": data, "HEADER": top_header, "TEXT": text,
        "1": p1_body, "1.MIME": p1_mime,
        "2": p2_body, "2.MIME": p2_mime, "2.1": p21_body, "2.1.MIME": p21_mime, "2.2": p22_body,
        "3": p3_body, "3.MIME": p3_mime, "3.HEADER": inner_header, "3.TEXT": inner_text,
        "4": p4_body, "4.MIME": p4_mime,
    }
    sizes = {k: len(v) for k, v in sections.items()}
    lines = {k: v.count(b"\n") for k, v in sections.items()}
    return MultipartMessage(data, sections, sizes, lines)


def header_block(message: bytes) -> bytes:
    """The header of a CRLF message including the blank line."""
    i = message.find(b"\r\n\r\n")
    return message[:i + 4] if i >= 0 else message


def crlf_form(stored: bytes) -> bytes:
    """A stored file as IMAP must present it: CRLF line ends (LF-only files converted)."""
    first = stored.find(b"\n")
    if first > 0 and stored[first - 1:first] != b"\r":
        return stored.replace(b"\n", b"\r\n")
    return stored


def message_files(maildir: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            files += [p for p in d.iterdir() if p.is_file()]
    return sorted(files)


def file_with(maildir: Path, needle: bytes) -> Path:
    found = [p for p in message_files(maildir) if needle in p.read_bytes()]
    assert len(found) == 1, f"expected one file in {maildir} containing {needle!r}, found {found}"
    return found[0]
