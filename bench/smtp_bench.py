"""SMTP ingestion load: N concurrent clients deliver M messages of size S to one mailbox.

Modes:
  per-connection  every message on a new connection: banner, EHLO, MAIL, RCPT, DATA, QUIT
  pipelined       N connections each deliver their share; MAIL, RCPT and DATA go in one write
                  when the server offers PIPELINING (RFC 2920), one at a time otherwise

Measured: accepted messages/s (first connect to last reply), latency from the end of DATA
(the client's ".") to the 250 (p50, p99), the server's CPU time per message (its whole process
tree, /proc, before the load and after the last message is in the Maildir), and a final
check of the Maildir: every accepted message exactly once, nothing else.

Every message carries a valid DKIM-Signature of the sender's domain (remote.test, RSA
2048, a key the bench generates), the same for every server, so that a server that
checks DKIM does a real RSA verification per message and the servers that do not get
exactly the same bytes.  The signature covers only fields that are the same in every
message of a run (From, To, Date, MIME-Version, Content-Type) and the body, so it is
computed once per (size, recipient) and put in front of each message; Message-ID and
Subject, which carry the message's index, are not signed.  With a server that checks
(`authserv_id`), the stored messages must carry its Authentication-Results with
spf=pass, dkim=pass and dmarc=pass.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import LOOPBACK, own_cpu_seconds, percentile, system_busy_seconds, tree_cpu_seconds

SENDER_DOMAIN = "remote.test"
SENDER = f"sender@{SENDER_DOMAIN}"
DKIM_SELECTOR = "bench"
# RFC 6376 5.4: the fields signed; all the same in every message of a run.
SIGNED_FIELDS = (b"from", b"to", b"date", b"mime-version", b"content-type")


@dataclass(frozen=True)
class SenderDomain:
    """The bench's sender domain as DNS publishes it: SPF for the loopback client, DMARC
    p=reject (a message that fails is refused, so a broken check shows as errors), and an
    RSA 2048 DKIM key under selector "bench"."""

    private_pem: bytes    # PKCS#1 PEM, as dkimpy signs with it
    key_record: str       # the selector's TXT record ("v=DKIM1; k=rsa; p=...")

    @classmethod
    def generate(cls) -> "SenderDomain":
        import tempfile

        from mailserver.dkim.keys import generate  # the server's own key generation

        with tempfile.TemporaryDirectory(prefix="bench-dkim-") as directory:
            key, _ = generate(Path(directory), SENDER_DOMAIN, DKIM_SELECTOR)
            return cls(key.private_pem(), key.txt_record())

    def zone(self) -> list[list]:
        """Records in tests/e2e/dnsserver.py's zone format (it splits the long key string)."""
        return [[SENDER_DOMAIN, "TXT", "v=spf1 ip4:127.0.0.1 -all"],
                [f"_dmarc.{SENDER_DOMAIN}", "TXT", "v=DMARC1; p=reject"],
                [f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}", "TXT", self.key_record]]


_sender_domain: SenderDomain | None = None
_signatures: dict[tuple[str, int], bytes] = {}
_sign_lock = threading.Lock()


def sender_domain() -> SenderDomain:
    """The key of this bench process (generated at first use)."""
    global _sender_domain
    with _sign_lock:
        if _sender_domain is None:
            _sender_domain = SenderDomain.generate()
        return _sender_domain


def can_sign() -> str:
    """"" when this process can DKIM-sign (dkimpy and cryptography import), else why not."""
    try:
        import cryptography  # noqa: F401
        import dkim  # noqa: F401
    except ImportError as e:
        return f"cannot DKIM-sign the bench's messages: {e}"
    return ""


def dkim_signature(rcpt: str, size: int) -> bytes:
    """The DKIM-Signature field (CRLF-terminated) valid for every message to `rcpt` with
    a body of `size` (make_header + make_body): signed once, then reused."""
    key = (rcpt, size)
    sig = _signatures.get(key)
    if sig is None:
        import dkim  # the server's own dependency

        message = make_header("sign", 0, rcpt) + make_body(size)
        sig = dkim.sign(message, DKIM_SELECTOR.encode(), SENDER_DOMAIN.encode(),
                        sender_domain().private_pem, include_headers=list(SIGNED_FIELDS),
                        canonicalize=(b"relaxed", b"relaxed"))
        if not sig.startswith(b"DKIM-Signature:") or not sig.endswith(b"\r\n"):
            raise RuntimeError(f"unexpected DKIM-Signature from dkimpy: {sig[:80]!r}")
        if not dkim.verify(sig + message, dnsfunc=_local_key):
            raise RuntimeError("the bench's DKIM signature does not verify locally")
        _signatures[key] = sig
    return sig


def _local_key(name: bytes, timeout: int = 5) -> bytes:
    """dkimpy's DNS hook for the self-test in dkim_signature: the key record, no DNS."""
    want = f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}."
    if name.decode().rstrip(".") + "." == want:
        return sender_domain().key_record.encode()
    return b""


def make_body(size: int) -> bytes:
    """A CRLF text body of about `size` bytes, already dot-stuffed (lines never start with '.')."""
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return (line * (size // len(line) + 1))[:max(0, size - 2)].rstrip(b"\r\n") + b"\r\n"


def make_header(run_id: str, i: int, rcpt: str) -> bytes:
    return (f"Message-ID: <bench-{run_id}-{i}@client.remote.test>\r\n"
            f"From: Bench <{SENDER}>\r\nTo: <{rcpt}>\r\n"
            f"Subject: bench message {i}\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()


class SMTPError(Exception):
    pass


_REPLY_END = re.compile(rb"^\d{3}(?: [^\n]*)?\r?\n", re.MULTILINE)


class _Connection:
    """One client connection's state (see Load: a state machine driven by replies)."""

    __slots__ = ("sock", "inbuf", "out", "state", "index", "codes", "sent_at", "pipelining",
                 "events", "done_message")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.out = memoryview(b"")
        self.state = "connect"
        self.index: int | None = None   # the message this connection is delivering
        self.codes: list[int] = []      # replies to a pipelined MAIL/RCPT/DATA group
        self.sent_at = 0.0
        self.pipelining = False
        self.events = 0
        self.done_message = False


class Load:
    """`concurrency` clients on one thread, driven by readiness (selectors, non-blocking
    sockets), not by coroutines: a load generator on the same machine as the server takes
    CPU the server could use, and asyncio's streams cost about 0.35 ms of it per message,
    a plain state machine much less; every server gets the same client."""

    def __init__(self, port: int, rcpt: str, count: int, size: int, concurrency: int,
                 mode: str, run_id: str, time_limit: float, prefix: bytes = b"") -> None:
        self.port, self.rcpt, self.count, self.size = port, rcpt, count, size
        self.concurrency, self.mode, self.run_id = concurrency, mode, run_id
        self.time_limit = time_limit
        self.prefix = prefix   # fields in front of every message (the DKIM-Signature)
        self.body = make_body(size) + b".\r\n"
        self.next = 0
        self.accepted: list[int] = []
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.pipelined: bool | None = None
        self._mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        self._rcpt = f"RCPT TO:<{rcpt}>\r\n".encode()
        self._workers = 0

    def _take(self) -> int | None:
        if self.next >= self.count or time.monotonic() > self.deadline:
            return None
        i = self.next
        self.next += 1
        return i

    def run(self) -> float:
        """Deliver the messages; the seconds from the first connect to the last reply."""
        self.deadline = time.monotonic() + self.time_limit
        self._selector = selectors.DefaultSelector()
        t0 = time.perf_counter()
        self._failed_connects = 0
        for _ in range(self.concurrency):
            self._workers += 1
            self._open(self._take())
        hard_end = self.deadline + 60
        try:
            while self._workers:
                if time.monotonic() > hard_end:
                    raise TimeoutError("the load did not finish")
                wait = 0 if self._failed_connects else 1.0
                for key, events in self._selector.select(timeout=wait):
                    conn: _Connection = key.data
                    if events & selectors.EVENT_WRITE and conn.sock is not None:
                        self._writable(conn)
                    if events & selectors.EVENT_READ and conn.sock is not None:
                        self._readable(conn)
                while self._failed_connects:  # refused at once: next message, no recursion
                    self._failed_connects -= 1
                    self._open(self._take())
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()
            self._selector.close()
        return time.perf_counter() - t0

    # -- connections -------------------------------------------------------------------

    def _open(self, index: int | None) -> None:
        """A new connection for message `index` (and, pipelined, the messages after it);
        with None, this client is done."""
        if index is None:
            self._workers -= 1
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's clients
        conn = _Connection(sock)
        conn.index = index
        err = sock.connect_ex((LOOPBACK, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.errors.append(f"{index}: connect: {os.strerror(err)}")
            self._failed_connects += 1
            return
        self._watch(conn, selectors.EVENT_WRITE)

    def _watch(self, conn: _Connection, events: int) -> None:
        if conn.events == events:
            return
        if conn.events:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Connection) -> None:
        if conn.sock is not None:
            if conn.events:
                self._selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def _fail(self, conn: _Connection, why: str) -> None:
        """The connection failed: count its message as an error, go on with the next."""
        if conn.index is not None and not conn.done_message:
            self.errors.append(f"{conn.index}: {why}")
        self._close(conn)
        self._open(self._take())

    def _send(self, conn: _Connection, data: bytes) -> None:
        conn.out = memoryview(data)
        self._writable(conn)

    def _writable(self, conn: _Connection) -> None:
        if conn.state == "connect":
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(conn, f"connect: {os.strerror(err)}")
                return
            conn.state = "greeting"
            self._watch(conn, selectors.EVENT_READ)
            return
        try:
            while conn.out:
                conn.out = conn.out[conn.sock.send(conn.out):]
        except BlockingIOError:
            pass
        except OSError as e:
            self._fail(conn, f"send: {e!r}")
            return
        if conn.out:
            self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        self._watch(conn, selectors.EVENT_READ)
        if conn.state == "message":
            conn.sent_at = time.perf_counter()  # the "." is in the kernel: the wait begins

    def _readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(conn, f"recv: {e!r}")
            return
        if not data:
            if conn.state == "quit":
                self._quit_done(conn)
            else:
                self._fail(conn, f"connection closed in state {conn.state}")
            return
        conn.inbuf += data
        while conn.sock is not None:
            m = _REPLY_END.search(conn.inbuf)
            if m is None:
                return
            reply, conn.inbuf = conn.inbuf[:m.end()], conn.inbuf[m.end():]
            self._reply(conn, int(m.group()[:3]), reply)

    # -- the SMTP dialogue ---------------------------------------------------------------

    def _reply(self, conn: _Connection, code: int, reply: bytes) -> None:
        state = conn.state
        if state == "greeting":
            if code != 220:
                return self._fail(conn, f"banner {code}")
            conn.state = "ehlo"
            self._send(conn, b"EHLO client.remote.test\r\n")
        elif state == "ehlo":
            if code != 250:
                return self._fail(conn, f"EHLO {code}")
            conn.pipelining = (self.mode == "pipelined" and any(
                line[4:].strip().upper() == b"PIPELINING" for line in reply.splitlines()))
            if self.mode == "pipelined":
                self.pipelined = conn.pipelining
            else:
                self.pipelined = False
            self._transaction(conn)
        elif state == "mail":
            if code != 250:
                return self._refused(conn, [code])
            conn.state = "rcpt"
            self._send(conn, self._rcpt)
        elif state == "rcpt":
            if code != 250:
                return self._refused(conn, [250, code])
            conn.state = "data"
            self._send(conn, b"DATA\r\n")
        elif state == "data":
            if code != 354:
                return self._refused(conn, [250, 250, code])
            self._message(conn)
        elif state == "group":  # MAIL, RCPT and DATA sent together
            conn.codes.append(code)
            if len(conn.codes) < 3:
                return
            if conn.codes != [250, 250, 354]:
                return self._refused(conn, conn.codes)
            self._message(conn)
        elif state == "message":
            self.latencies.append(time.perf_counter() - conn.sent_at)
            conn.done_message = True
            if code != 250:
                self.errors.append(f"{conn.index}: end of DATA {code} {reply[:80]!r}")
            else:
                self.accepted.append(conn.index)  # type: ignore[arg-type]
            self._transaction(conn)
        elif state == "refused-data":  # the "." after a refusal that came with a 354
            self._transaction(conn)
        elif state == "quit":
            self._quit_done(conn)

    def _transaction(self, conn: _Connection) -> None:
        """Start the next message on this connection, or say QUIT."""
        if conn.done_message:
            conn.index = self._take() if self.mode == "pipelined" else None
            conn.done_message = False
        if conn.index is None:
            conn.state = "quit"
            self._send(conn, b"QUIT\r\n")
            return
        conn.codes = []
        if conn.pipelining:
            conn.state = "group"
            self._send(conn, self._mail + self._rcpt + b"DATA\r\n")
        else:
            conn.state = "mail"
            self._send(conn, self._mail)

    def _message(self, conn: _Connection) -> None:
        conn.state = "message"
        self._send(conn, self.prefix + make_header(self.run_id, conn.index, self.rcpt)  # type: ignore[arg-type]
                   + self.body)

    def _refused(self, conn: _Connection, codes: list[int]) -> None:
        self.errors.append(f"{conn.index}: MAIL/RCPT/DATA replies {codes}")
        conn.done_message = True
        if len(codes) == 3 and codes[2] == 354:  # end the DATA the server opened
            conn.state = "refused-data"
            self._send(conn, b".\r\n")
            return
        self._transaction(conn)

    def _quit_done(self, conn: _Connection) -> None:
        self._close(conn)
        self._open(self._take() if self.mode == "per-connection" else None)


_MSGID = re.compile(rb"^Message-ID:\s*<bench-([0-9a-z-]+?)-(\d+)@client\.remote\.test>",
                    re.IGNORECASE | re.MULTILINE)


def maildir_files(maildir: Path) -> list[Path]:
    out = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            out.extend(Path(e.path) for e in os.scandir(d) if e.is_file())
    return out


_AUTH_RESULTS = re.compile(rb"^Authentication-Results[ \t]*:(.*(?:\r?\n[ \t].*)*)",
                           re.IGNORECASE | re.MULTILINE)
_RESULT = re.compile(r"(?<![\w.-])(spf|dkim|dmarc|arc)[ \t]*=[ \t]*([a-z]+)", re.IGNORECASE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
WANT_PASS = ("spf", "dkim", "dmarc")


def _uncomment(text: str) -> str:
    """RFC 5322 3.2.2: the text without its (possibly nested) comments."""
    out, depth, escaped = [], 0, False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\" and depth:
            escaped = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(c)
    return "".join(out)


def auth_results(head: bytes, authserv_id: str) -> dict[str, list[str]] | None:
    """The results (method -> results) of the Authentication-Results fields of
    `authserv_id` in a message's header section; None when it has none."""
    end = _HEADER_END.search(head)
    header = head[:end.start() + 2] if end else head
    found: dict[str, list[str]] | None = None
    for m in _AUTH_RESULTS.finditer(header):
        value = _uncomment(re.sub(r"\r?\n", "", m.group(1).decode("utf-8", "replace")))
        ident, sep, rest = value.strip().partition(";")
        if ident.strip().lower() != authserv_id.lower():
            continue
        found = found if found is not None else {}
        for method, result in _RESULT.findall(rest):
            found.setdefault(method.lower(), []).append(result.lower())
    return found


def check_maildir(maildir: Path, run_id: str, accepted: list[int], count: int,
                  authserv_id: str | None = None) -> dict:
    """Every accepted message exactly once in new/ or cur/, and no other file; with
    `authserv_id`, each carries that server's Authentication-Results with spf, dkim and
    dmarc all "pass" (and the counts say how many did not)."""
    seen: dict[int, int] = {}
    foreign = 0
    auth = {"checked": 0, "passed": 0, "failed": 0, "examples": []}
    for path in maildir_files(maildir):
        with open(path, "rb") as f:
            head = f.read(16384)
        m = _MSGID.search(head)
        if not m or m.group(1).decode() != run_id:
            foreign += 1
            continue
        i = int(m.group(2))
        seen[i] = seen.get(i, 0) + 1
        if authserv_id is not None:
            results = auth_results(head, authserv_id)
            auth["checked"] += 1
            bad = ("no Authentication-Results of " + authserv_id if results is None else
                   ", ".join(f"{k}={'/'.join(results.get(k, [])) or 'absent'}"
                             for k in WANT_PASS if results.get(k) != ["pass"]))
            if bad:
                auth["failed"] += 1
                if len(auth["examples"]) < 3:
                    auth["examples"].append(f"{path.name}: {bad}")
            else:
                auth["passed"] += 1
    want = set(accepted)
    missing = sorted(want - set(seen))
    twice = sorted(i for i, n in seen.items() if n > 1)
    unexpected = sorted(set(seen) - want)
    ok = not missing and not twice and not unexpected and not foreign and len(want) == count
    out = {"ok": ok, "stored": sum(seen.values()) + foreign, "missing": len(missing),
           "duplicates": len(twice), "unexpected": len(unexpected), "foreign": foreign,
           "examples": {"missing": missing[:5], "duplicates": twice[:5]}}
    if authserv_id is not None:
        auth["ok"] = auth["checked"] > 0 and auth["failed"] == 0
        out["auth_results"] = auth
    return out


def wait_delivered(maildir: Path, expected: int, timeout: float, stall: float = 15.0) -> float:
    """Wait until `expected` files are in the Maildir (an MTA with a queue delivers after
    its 250), at most `timeout` seconds and `stall` seconds without a new file; returns the
    seconds waited."""
    t0 = last_change = time.monotonic()
    last = -1
    while time.monotonic() - t0 < timeout:
        n = len(maildir_files(maildir))
        if n >= expected:
            break
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > stall:
            break
        time.sleep(0.02)
    return time.monotonic() - t0


def wait_cpu_quiet(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until the server tree stops using CPU (background work after the last 250)."""
    end = time.monotonic() + timeout
    last = tree_cpu_seconds(pids)
    while time.monotonic() < end:
        time.sleep(0.2)
        now = tree_cpu_seconds(pids)
        if now - last < 0.005:
            return
        last = now


def set_aside_dir(server) -> Path:
    """Where a server's delivered messages go between runs (see `set_aside`)."""
    return Path(server.dir) / "delivered"


def set_aside(maildir: Path, aside: Path) -> None:
    """Empty the Maildir by moving its messages into `aside` (same file system).

    Not deleted: on ext4 without a journal, inode allocation skips every inode freed in the
    last 60-300 s, testing them one by one, so thousands of deletions between runs made the
    next runs' deliveries (of every server) pay a third of their CPU time to the file
    system.  They go with the bench's work directory at the very end, so that deleting
    them (and the discards a file system mounted with `discard` then sends) does not
    load the machine during the other areas either.
    """
    aside.mkdir(exist_ok=True)
    start = len(os.listdir(aside))
    for i, path in enumerate(maildir_files(maildir), start):
        os.rename(path, aside / str(i))


def run_once(server, user: str, count: int, size: int, concurrency: int, mode: str,
             run_id: str, time_limit: float, signed: bool = True) -> dict:
    """One measured run against a started server; the Maildir is emptied afterwards.
    `signed`: every message carries the sender domain's DKIM-Signature."""
    maildir = server.maildir(user)
    rcpt = f"{user}@example.test"
    prefix = dkim_signature(rcpt, size) if signed else b""
    authserv_id = getattr(server, "authserv_id", None)
    helpers = server.helper_pids() if hasattr(server, "helper_pids") else []
    set_aside(maildir, set_aside_dir(server))
    # Start from a file system with nothing left to write back: the previous run's unsynced
    # writes (twistd mail never syncs; 100 KB runs leave 100 MB) would otherwise be written
    # back during this run, and slow whichever server comes next.
    os.sync()
    pids = server.pids()
    wait_cpu_quiet(pids, 2.0)
    cpu0, client0, busy0 = tree_cpu_seconds(pids), own_cpu_seconds(), system_busy_seconds()
    helpers0 = tree_cpu_seconds(helpers)
    load = Load(server.port("smtp"), rcpt, count, size, concurrency, mode, run_id, time_limit,
                prefix)
    try:
        elapsed = load.run()
    except TimeoutError:
        elapsed = time_limit
        load.errors.append("run did not finish in time")
    client_cpu = own_cpu_seconds() - client0
    busy = system_busy_seconds() - busy0
    server_during = tree_cpu_seconds(pids) - cpu0
    helpers_cpu = tree_cpu_seconds(helpers) - helpers0
    waited = wait_delivered(maildir, len(load.accepted), 60.0)
    wait_cpu_quiet(server.pids())
    cpu = tree_cpu_seconds(pids) - cpu0
    check = check_maildir(maildir, run_id, load.accepted, count, authserv_id)
    set_aside(maildir, set_aside_dir(server))
    n = len(load.accepted)
    return {
        "accepted": n, "errors": len(load.errors), "error_examples": load.errors[:3],
        "elapsed_s": elapsed, "msgs_per_s": n / elapsed if elapsed and n else None,
        "latency_p50_ms": (percentile(load.latencies, 50) or 0) * 1000 if n else None,
        "latency_p99_ms": (percentile(load.latencies, 99) or 0) * 1000 if n else None,
        "server_cpu_s": cpu, "cpu_ms_per_msg": cpu / n * 1000 if n else None,
        "client_cpu_s": client_cpu, "delivery_wait_s": waited,
        # CPU that neither the server nor this client used during the load: other work on
        # the machine, which makes the figures less reliable when it is large
        "other_cpu_s": max(0.0, busy - client_cpu - server_during - helpers_cpu),
        # the server's helpers outside its process tree (the checks' DNS server)
        "helper_cpu_s": helpers_cpu if helpers else None,
        "pipelined": load.pipelined, "maildir_check": check,
        "message_bytes": len(prefix) + len(make_header(run_id, 0, rcpt)) + len(load.body) - 3,
        "dkim_signed": bool(prefix),
    }
