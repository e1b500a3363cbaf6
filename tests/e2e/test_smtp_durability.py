"""End-to-end durability of the MX service: concurrency, large messages, kill -9."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import threading
import time
from pathlib import Path

from harness import (
    ConnectionClosed,
    SMTPClient,
    delivered_prefix,
    maildir_size_field,
    make_message,
    message_id_of,
    split_header_body,
    wait_until,
)

ALICE = "alice@example.test"


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"sender threads still running after {timeout}s: {alive}"


# -- many concurrent senders -------------------------------------------------------------------

def test_concurrent_senders_every_message_exactly_once(server):
    senders, per_sender = 50, 20
    sent: dict[str, bytes] = {}
    errors: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def sender(n: int) -> None:
        go.wait()
        try:
            with server.smtp(timeout=60) as s:
                for i in range(per_sender):
                    msgid = f"<c{n}.{i}@remote.test>"
                    msg = make_message(msgid, sender=f"s{n}@remote.test",
                                       body=f"sender {n} message {i}\r\n".encode() * (1 + i % 5))
                    refused = s.sendmail(f"s{n}@remote.test", [ALICE], msg)
                    assert refused == {}, refused
                    with lock:
                        sent[msgid] = msg
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(f"sender {n}: {e!r}")

    threads = [threading.Thread(target=sender, args=(n,), name=f"s{n}") for n in range(senders)]
    for t in threads:
        t.start()
    go.set()
    _join_all(threads, 120)
    assert not errors, f"{len(errors)} senders failed, e.g.: {errors[:5]}"
    assert len(sent) == senders * per_sender

    files = server.messages(ALICE)
    ids = [message_id_of(p.read_bytes()) for p in files]
    assert len(files) == senders * per_sender, f"{len(files)} files for {len(sent)} messages"
    assert sorted(ids) == sorted(sent), "Message-IDs stored differ from those sent"
    for path in files:
        stored = path.read_bytes()
        assert delivered_prefix(stored, sent[message_id_of(stored)]) is not None, \
            f"{path.name} is not byte-exact"


# -- large messages in parallel ------------------------------------------------------------------

def _large_body(seed: int, size: int) -> tuple[list[bytes], str, str]:
    """Pieces of a ~`size`-byte body of 76-character lines (one random block repeated,
    each copy preceded by a numbered line), with the sha256 of the body as CRLF and as LF."""
    rnd = random.Random(seed)
    block_raw = rnd.randbytes(57 * 13_000)  # base64 lines of 76 chars
    b64 = base64.b64encode(block_raw)
    block = b"".join(b64[i:i + 76] + b"\r\n" for i in range(0, len(b64), 76))
    chunks = []
    total = 0
    k = 0
    while total < size:
        chunks += [f"chunk {k:06d} of sender {seed}\r\n".encode(), block]
        total += len(chunks[-2]) + len(block)
        k += 1
    crlf, lf = hashlib.sha256(), hashlib.sha256()
    for c in chunks:
        crlf.update(c)
        lf.update(c.replace(b"\r\n", b"\n"))
    return chunks, crlf.hexdigest(), lf.hexdigest()


def test_large_messages_streamed_byte_exact_bounded_memory(server):
    size = 20 * 1024 * 1024
    # Warm up the code paths first so the baseline includes them.
    with SMTPClient(server.smtp_port) as c:
        c.greet()
        r = c.mail_transaction("warm@remote.test", [ALICE],
                               make_message("<warm@remote.test>") + b".\r\n")
        assert r.code == 250, f"warm-up: {r}"
        c.quit()
    baseline_kb = server.vm_hwm_kb()

    bodies = {n: _large_body(n, size) for n in range(5)}
    results: dict[int, str] = {}
    lock = threading.Lock()

    def sender(n: int) -> None:
        chunks = bodies[n][0]
        head = make_message(f"<large{n}@remote.test>", sender=f"big{n}@remote.test", body=b"")
        try:
            with SMTPClient(server.smtp_port, timeout=120) as c:
                c.greet()
                assert c.cmd(f"MAIL FROM:<big{n}@remote.test> SIZE={size + 4096}").code == 250
                assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
                assert c.cmd("DATA").code == 354
                c.send(head)
                for chunk in chunks:
                    c.send(chunk)
                c.send(b".\r\n")
                r = c.read_reply()
                outcome = "ok" if r.code == 250 else f"end of data: {r}"
                c.quit()
        except Exception as e:  # noqa: BLE001
            outcome = repr(e)
        with lock:
            results[n] = outcome

    threads = [threading.Thread(target=sender, args=(n,), name=f"big{n}") for n in range(5)]
    for t in threads:
        t.start()
    _join_all(threads, 180)
    assert all(v == "ok" for v in results.values()) and len(results) == 5, results
    growth_mb = (server.vm_hwm_kb() - baseline_kb) / 1024
    print(f"server VmHWM: baseline {baseline_kb} kB, growth {growth_mb:.1f} MB")

    by_id = {}
    for path in server.messages(ALICE):
        stored = path.read_bytes()
        assert maildir_size_field(path) == len(stored), f"{path.name}: S= vs {len(stored)}"
        by_id[message_id_of(stored)] = stored
    for n, (_chunks, crlf_hash, lf_hash) in bodies.items():
        stored = by_id.get(f"<large{n}@remote.test>")
        assert stored is not None, f"large message {n} not delivered"
        _head, body = split_header_body(stored)
        digest = hashlib.sha256(body).hexdigest()
        assert digest in (crlf_hash, lf_hash), f"large message {n}: body differs (sha256)"
        del stored, body
    assert growth_mb < 40, f"server peak RSS grew by {growth_mb:.1f} MB for 5 x 20 MB messages"


# -- kill -9 -----------------------------------------------------------------------------------

END_MARKER = b"END-OF-MESSAGE"


class Senders:
    """Threads sending small messages to alice continuously; records every message whose
    end of data got a 250."""

    def __init__(self, server, round_no: int) -> None:
        self.server = server
        self.round = round_no
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.attempted: dict[str, bytes] = {}
        self.acked: dict[str, bytes] = {}
        self.threads: list[threading.Thread] = []

    def message(self, n: int, i: int) -> tuple[str, bytes]:
        msgid = f"<k{self.round}.{n}.{i}@remote.test>"
        rnd = random.Random(msgid)
        lines = b"".join(f"r{self.round} s{n} m{i} line {j} ".encode() + b"q" * rnd.randint(0, 70)
                         + b"\r\n" for j in range(rnd.randint(5, 300)))
        body = lines + END_MARKER + b" " + msgid.encode() + b"\r\n"
        return msgid, make_message(msgid, sender=f"k{n}@remote.test", body=body)

    def run(self, n: int) -> None:
        i = 0
        try:
            with SMTPClient(self.server.smtp_port, timeout=20) as c:
                c.greet()
                while not self.stop.is_set():
                    msgid, msg = self.message(n, i)
                    i += 1
                    with self.lock:
                        self.attempted[msgid] = msg
                    r = c.mail_transaction(f"k{n}@remote.test", [ALICE], msg + b".\r\n")
                    if r.code == 250:
                        with self.lock:
                            self.acked[msgid] = msg
                    else:
                        return
        except (OSError, ConnectionClosed, AssertionError):
            return  # the server went away

    def start(self, count: int) -> None:
        for n in range(count):
            t = threading.Thread(target=self.run, args=(n,), name=f"r{self.round}s{n}")
            self.threads.append(t)
            t.start()

    def join(self) -> None:
        self.stop.set()
        _join_all(self.threads, 60)


def _stream_large(server, size: int, half_sent: threading.Event, release: threading.Event,
                  attempted: dict) -> None:
    """One large message sent in chunks; `half_sent` is set once half of it is out, then
    the rest waits for `release` (the kill)."""
    msgid = "<kill-large@remote.test>"
    head = make_message(msgid, sender="large@remote.test", body=b"")
    line = b"L" * 76 + b"\r\n"
    chunk = line * 1000
    chunks = size // len(chunk)
    attempted[msgid] = None  # never complete: must never appear in new/
    try:
        with SMTPClient(server.smtp_port, timeout=30) as c:
            c.greet()
            assert c.cmd("MAIL FROM:<large@remote.test>").code == 250
            assert c.cmd(f"RCPT TO:<{ALICE}>").code == 250
            assert c.cmd("DATA").code == 354
            c.send(head)
            for k in range(chunks):
                c.send(chunk)
                if k == chunks // 2:
                    half_sent.set()
                    release.wait(30)  # hold the message mid-DATA until the kill
            c.send(END_MARKER + b" " + msgid.encode() + b"\r\n.\r\n")
            c.read_reply()
    except (OSError, ConnectionClosed, AssertionError):
        pass
    finally:
        half_sent.set()


def commit_children(pid: int) -> list[int]:
    """The server's commit processes (children running mailserver.maildir.commit_process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"mailserver.maildir.commit_process" in cmdline:
            found.append(int(entry))
    return found


def test_kill9_never_loses_acknowledged_mail(server):
    attempted: dict[str, bytes | None] = {}
    acked: dict[str, bytes] = {}

    # Round 1: kill while small messages are flowing.
    r1 = Senders(server, 1)
    r1.start(4)
    assert wait_until(lambda: len(r1.acked) >= 40, 20), f"only {len(r1.acked)} acked in 20s"
    committers = commit_children(server.pid)
    assert committers, "no commit process behind the server"
    server.kill9()
    r1.join()
    # The commit process finishes its group and leaves once the server is gone.
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in committers),
                      15), "the commit process outlived the server"
    attempted.update(r1.attempted)
    acked.update(r1.acked)

    # Round 2: restart on the same state; kill while a large message is mid-DATA.
    server.start()
    r2 = Senders(server, 2)
    r2.start(3)
    half_sent, release = threading.Event(), threading.Event()
    large = threading.Thread(target=_stream_large, name="large",
                             args=(server, 16 * 1024 * 1024, half_sent, release, attempted))
    large.start()
    assert half_sent.wait(30), "large message never got half way"
    assert server.running, "server died before the kill"
    server.kill9()
    release.set()
    r2.join()
    large.join(30)
    assert not large.is_alive()
    attempted.update(r2.attempted)
    acked.update(r2.acked)
    assert len(acked) >= 40

    # Round 3: restart again; the server still delivers.
    server.start()
    final = make_message("<after-kill@remote.test>", body=b"still here\r\n")
    with SMTPClient(server.smtp_port) as c:
        c.greet()
        r = c.mail_transaction("x@remote.test", [ALICE], final + b".\r\n")
        assert r.code == 250, f"after restart: {r}"
        c.quit()
    attempted["<after-kill@remote.test>"] = final
    acked["<after-kill@remote.test>"] = final

    seen: dict[str, int] = {}
    problems: list[str] = []
    for path in server.messages(ALICE):
        stored = path.read_bytes()
        if maildir_size_field(path) != len(stored):
            problems.append(f"{path.name}: S={maildir_size_field(path)} but {len(stored)} bytes")
        msgid = message_id_of(stored)
        seen[msgid] = seen.get(msgid, 0) + 1
        original = attempted.get(msgid)
        if original is None:
            problems.append(f"{path.name}: {msgid} was never completely sent, yet it is in new/")
            continue
        if msgid != "<after-kill@remote.test>" and not stored.rstrip(b"\r\n").endswith(
                END_MARKER + b" " + msgid.encode()):
            problems.append(f"{path.name}: partial message (no end marker)")
        if delivered_prefix(stored, original) is None:
            problems.append(f"{path.name}: {msgid} not byte-exact")
    print(f"kill -9: {len(acked)} acknowledged, {len(attempted)} attempted, "
          f"{sum(seen.values())} files in new/; tmp/ has "
          f"{len(list((server.maildir(ALICE) / 'tmp').glob('*')))} leftovers")
    lost = sorted(set(acked) - set(seen))
    duplicated = sorted(m for m in acked if seen.get(m, 0) > 1)
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]}"
    assert not duplicated, f"acknowledged messages stored twice: {duplicated[:5]}"
    assert not problems, "\n".join(problems[:20])
