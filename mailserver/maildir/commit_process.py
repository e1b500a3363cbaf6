"""Group commit in a process of its own, so delivery's disk work never waits for the GIL.

The group committer's thread spent most of a group waiting to get the GIL back after each
system call (open, write, fsync, link, close) while the reactor thread ran Python: a group
of five messages took 3-4 ms instead of under one, and every hand-off cost both threads a
futex call and a context switch.  Here the reactor sends each delivery over a Unix socket
to a child process: a message still in memory (under 64 KiB) as its bytes, a larger one,
already streamed into its file without a name, as the file's descriptor (SCM_RIGHTS).
The child runs the very same stages (`committer.commit_group`: write, sync the files,
link them into new/, sync the directories) for whatever is waiting, and answers once per
delivery, after the syncs.  So a 250 still means the file and its directory entry are on
disk, and the reactor does no file system work for a small message at all.

A lone delivery is committed by a thread of the server instead (`lone_commit.py`): the
same stages, without the child's round trip (the request and answer encoded,
a second process woken up and scheduled), which cost about as much again as the two fsyncs
when one client sends one message at a time.  The reactor is idle meanwhile (its one
client waits for the 250), so the thread does not wait for the GIL either.  Lone means:
nothing in the child, nothing waiting, nothing in that thread, and the same for the
LONE_AFTER deliveries before it.  Under load the child's groups come and go, and one
delivery now and then would find it idle: in the thread it would fight the busy reactor
for the GIL and sync alone instead of with the next group (with twenty pipelining clients
that cost a quarter of the messages per second), so a delivery that meets another one
sends the next LONE_AFTER to the child too.

If the child dies, the deliveries in flight fail (the client gets a 451 and retries) and
the next one starts a new child; a child that keeps dying at start makes the store fall
back to the thread committer.  A crash of the server itself leaves the child to finish its
group and exit at end of file: nothing acknowledged depends on it afterwards.

The store starts the child as ``python -c CHILD_BOOT FD`` (FD: the socket), not with
``-m``: the package's __init__ imports this module, so ``-m`` would run it a second time
as __main__ (and runpy warns about exactly that in the server's log).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from array import array
from collections import deque
from itertools import count
from pathlib import Path
from typing import Any

from twisted.internet import error as twisted_error
from twisted.internet import protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.maildir.committer import MAX_GROUP, GroupCommitter, commit_group
from mailserver.maildir.delivery import Delivery, DeliveryResult, new_dir
from mailserver.maildir.lone_commit import LoneCommitter

log = Logger()

MAX_IN_FLIGHT = 64          # requests in the socket at once (its buffer holds them all)
REQUEST_MAX = 512 * 1024    # bytes of one request record (targets, a message under 64 KiB)
REPLY_MAX = 1024 * 1024     # bytes of one answer (a result per target)
QUICK_DEATH_SECONDS = 5.0   # a child dying this soon after its start twice: fall back
STOP_WAIT = 10.0            # seconds shutdown waits for the answers in flight
LONE_AFTER = 16             # deliveries in a row that met no other before one is lone

CHILD_FD = 3
# The child's program: import this module once, by its name, and run main(["-c", FD]).
CHILD_BOOT = ("import sys; from mailserver.maildir.commit_process import main; "
              "sys.exit(main(sys.argv))")


def available() -> bool:
    """Linux with SOCK_SEQPACKET Unix sockets and descriptor passing."""
    return (sys.platform.startswith("linux") and hasattr(socket, "SOCK_SEQPACKET")
            and hasattr(socket, "send_fds"))


def encode_request(description: dict[str, Any], content: bytes) -> bytes:
    """One request record: 4 bytes of header length, the JSON header, the message bytes."""
    header = json.dumps(description).encode()
    return len(header).to_bytes(4, "big") + header + content


# -- the server's side -------------------------------------------------------------------

class ProcessCommitter:
    """`commit(delivery)` like GroupCommitter, done by a child process (module docstring)."""

    # A delivery that would be alone in the child is committed by a thread of this
    # process instead (module docstring); False: every delivery goes to the child.
    lone_in_thread = True

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self._ids = count(1)
        self._sock: socket.socket | None = None
        self._reader: _ReplyReader | None = None
        self._process: Any = None
        self._started = 0.0
        self._quick_deaths = 0
        self._fallback: GroupCommitter | None = None
        self._alone: LoneCommitter | None = None  # the lone deliveries' thread
        self._alone_busy = False
        self._lone_streak = LONE_AFTER  # deliveries in a row that met no other one
        self._shutdown_hooked = False
        self._stopping = False
        # id -> (Deferred, the targets in order)
        self._in_flight: dict[int, tuple[Deferred, list[Path]]] = {}
        # (id, request record, descriptor to pass or -1, delivery, Deferred)
        self._waiting: deque[tuple[int, bytes, int, Delivery, Deferred]] = deque()

    def commit(self, delivery: Delivery) -> Deferred[list[DeliveryResult]]:
        d: Deferred[list[DeliveryResult]] = Deferred()
        self._enqueue(delivery, d)
        return d

    def _enqueue(self, delivery: Delivery, d: Deferred[list[DeliveryResult]]) -> None:
        if self._alone_busy or self._in_flight or self._waiting:
            self._lone_streak = 0
        else:
            self._lone_streak += 1
            if (self.lone_in_thread and self._lone_streak > LONE_AFTER
                    and self._fallback is None and not self._stopping):
                self._commit_alone(delivery).chainDeferred(d)
                return
        if self._fallback is not None or self._stopping or (
                not self._running() and not self._start()):
            self._thread_commit(delivery).chainDeferred(d)
            return
        request = delivery.commit_request()
        if request is None:  # the file could not be written: report it for every target
            _local_result(delivery).chainDeferred(d)
            return
        description, fd, content = request
        key = next(self._ids)
        description["id"] = key
        self._waiting.append((key, encode_request(description, content), fd, delivery, d))
        self._send_waiting()

    def _commit_alone(self, delivery: Delivery) -> Deferred[list[DeliveryResult]]:
        """Commit `delivery` in this process's lone-delivery thread (module docstring)."""
        if self._alone is None:
            self._alone = LoneCommitter(self._reactor)
        self._alone_busy = True

        def idle(result: Any) -> Any:
            self._alone_busy = False
            return result
        return self._alone.commit(delivery).addBoth(idle)

    def _thread_commit(self, delivery: Delivery) -> Deferred[list[DeliveryResult]]:
        if self._fallback is None:
            self._fallback = GroupCommitter(self._reactor)
        return self._fallback.commit(delivery)

    # -- the child ---------------------------------------------------------------------

    def _running(self) -> bool:
        return self._sock is not None

    def _start(self) -> bool:
        if not self._shutdown_hooked:
            self._shutdown_hooked = True
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._child = _ChildProtocol()
        try:
            self._process = self._reactor.spawnProcess(
                self._child, sys.executable,
                # -P: not the working directory first on sys.path (a module there
                # would be imported in its place).
                [sys.executable, "-P", "-c", CHILD_BOOT, str(CHILD_FD)],
                env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r",
                                                CHILD_FD: theirs.fileno()})
        except (OSError, twisted_error.ProcessExitedAlready) as e:
            log.error("cannot start the commit process ({error}): committing in a thread",
                      error=e)
            ours.close()
            self._fallback = GroupCommitter(self._reactor)
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._started = time.monotonic()
        self._reader = _ReplyReader(self, ours)
        self._reactor.addReader(self._reader)
        return True

    def stop(self) -> Deferred[None]:
        """At shutdown: wait for the answers in flight, close the socket (the child leaves
        at end of file) and wait for the child to end; STOP_WAIT seconds at most."""
        self._stopping = True
        waiting, self._waiting = self._waiting, deque()
        for _, _, _, delivery, d in waiting:  # never sent: commit them here
            self._thread_commit(delivery).chainDeferred(d)
        if self._in_flight and self._sock is not None:
            self._drained = Deferred()
            drained: Deferred[None] = self._drained
        else:
            drained = succeed(None)
        child = self._child
        drained.addCallback(lambda _: self._close())
        if child is not None and not child.ended.called:
            drained.addCallback(lambda _: child.ended)
        out: Deferred[None] = Deferred()

        def give_up() -> None:
            self._close()
            _fire(out)

        timeout = self._reactor.callLater(STOP_WAIT, give_up)

        def done(_: object) -> None:
            if timeout.active():
                timeout.cancel()
            _fire(out)
        drained.addBoth(done)
        return out

    _drained: Deferred[None] | None = None
    _child: _ChildProtocol | None = None

    def _close(self) -> None:
        for committer in (self._alone, self._fallback):
            if committer is not None:
                committer.stop()
        self._disconnect()

    def _disconnect(self) -> None:
        """Stop reading answers and close the socket (the child leaves at end of file)."""
        if self._reader is not None:
            self._reactor.removeReader(self._reader)
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_waiting(self) -> None:
        while self._waiting and self._sock is not None and len(self._in_flight) < MAX_IN_FLIGHT:
            key, record, fd, delivery, d = self._waiting[0]
            try:
                if fd >= 0:
                    socket.send_fds(self._sock, [record], [fd])
                else:
                    self._sock.send(record)
            except BlockingIOError:
                if not self._in_flight:  # nothing will come back to retry on: poll once
                    self._reactor.callLater(0.005, self._send_waiting)
                return
            except OSError as e:
                if e.errno == errno.EMSGSIZE:  # too big for one record
                    self._waiting.popleft()
                    self._thread_commit(delivery).chainDeferred(d)
                    continue
                self._lost(Failure(e))  # the child is gone: this one goes to the next
                return
            self._waiting.popleft()
            self._in_flight[key] = (d, list(delivery.targets))
            delivery.handed_over()

    def _replied(self, record: bytes) -> None:
        key, name, outcomes = json.loads(record)
        entry = self._in_flight.pop(key, None)
        if entry is None:
            return
        d, targets = entry
        if self._drained is not None and not self._in_flight:
            self._reactor.callLater(0, _fire, self._drained)
        if isinstance(outcomes, str):
            d.errback(Failure(RuntimeError(f"commit process: {outcomes}")))
            return
        results = []
        for target, (ok, code, message) in zip(targets, outcomes):
            error = None if ok else OSError(code or errno.EIO, message)
            results.append(DeliveryResult(target, bool(ok),
                                          new_dir(target) / name if ok else None, error))
        d.callback(results)

    def _lost(self, reason: Failure) -> None:
        """The child is gone: fail what it held, start another at the next commit."""
        self._disconnect()
        in_flight, self._in_flight = self._in_flight, {}
        if in_flight and not self._stopping:
            log.error("the commit process ended with {n} deliveries in flight: {reason}",
                      n=len(in_flight), reason=reason.getErrorMessage())
        for d, _ in in_flight.values():
            d.errback(Failure(OSError(errno.EIO, "the commit process ended")))
        if time.monotonic() - self._started < QUICK_DEATH_SECONDS:
            self._quick_deaths += 1
            if self._quick_deaths >= 2 and self._fallback is None:
                log.error("the commit process keeps ending at start: committing in a thread")
                self._fallback = GroupCommitter(self._reactor)
        waiting, self._waiting = self._waiting, deque()
        for _, _, _, delivery, d in waiting:  # never reached the child: to the next one
            self._enqueue(delivery, d)


def _fire(d: Deferred[None]) -> None:
    if not d.called:
        d.callback(None)


def _local_result(delivery: Delivery) -> Deferred[list[DeliveryResult]]:
    """The outcome of a delivery whose file could not be written (no disk work left)."""
    ((_, result),) = commit_group([(delivery, None)])
    d: Deferred[list[DeliveryResult]] = Deferred()
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)
    return d


@implementer(IReadDescriptor)
class _ReplyReader:
    """The reactor's reader of the child's answers."""

    def __init__(self, owner: ProcessCommitter, sock: socket.socket) -> None:
        self._owner = owner
        self._sock = sock
        self._buffer = bytearray(REPLY_MAX)

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:
        return "commit-process"

    def doRead(self) -> Any:
        buffer = self._buffer
        while True:
            try:
                size = self._sock.recv_into(buffer)
            except BlockingIOError:
                break
            except OSError as e:
                return e
            if not size:
                return twisted_error.ConnectionDone()
            self._owner._replied(bytes(buffer[:size]))
        self._owner._send_waiting()
        return None

    def connectionLost(self, reason: Failure) -> None:
        if self._owner._reader is self:
            self._owner._lost(reason if isinstance(reason, Failure) else Failure(reason))


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("commit process: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        if not reason.check(twisted_error.ProcessDone):
            log.info("commit process ended: {reason}", reason=reason.getErrorMessage())
        self.ended.callback(None)


# -- the child's side --------------------------------------------------------------------

def serve(sock: socket.socket) -> None:
    """Commit what arrives, a group at a time, until end of file.

    One group at a time: several threads each syncing their own group cost more CPU and
    were no faster (concurrent syncfs calls write back the same dirty pages).
    """
    buffer = bytearray(REQUEST_MAX)
    while True:
        group: list[tuple[Delivery, int]] = []
        done = _receive(sock, buffer, group, 0)
        while not done and len(group) < MAX_GROUP:
            try:
                done = _receive(sock, buffer, group, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        for (delivery, _), (key, outcome) in zip(group, commit_group(group)):
            _answer(sock, key, delivery.message_name(), outcome)
        if done:
            return


_FD_SPACE = socket.CMSG_SPACE(array("i", [0]).itemsize)


def _receive(sock: socket.socket, buffer: bytearray, group: list[tuple[Delivery, int]],
             flags: int) -> bool:
    """Add one request to `group`; True at end of file.

    A record: 4 bytes of header length, the JSON header, then the message's bytes (none
    when its file comes as a descriptor).
    """
    size, ancillary, msg_flags, _ = sock.recvmsg_into([buffer], _FD_SPACE, flags)
    fds = array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if size == 0 and not fds:
        return True
    key = None
    try:
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
            raise ValueError("truncated request")
        length = int.from_bytes(buffer[:4], "big")
        request = json.loads(bytes(buffer[4:4 + length]))
        key = int(request["id"])
        content = bytes(buffer[4 + length:size]) if not fds else b""
        group.append((Delivery.adopt(request, fds[0] if fds else -1, content), key))
    except (ValueError, KeyError, TypeError) as e:
        for fd in fds:
            os.close(fd)
        if key is not None:
            _answer(sock, key, "", Failure(e))
    return False


def _answer(sock: socket.socket, key: int, name: str,
            outcome: list[DeliveryResult] | Failure) -> None:
    if isinstance(outcome, Failure):
        body: Any = outcome.getErrorMessage()
    else:
        body = [[r.ok, getattr(r.error, "errno", None), str(r.error or "")] for r in outcome]
    try:
        sock.sendall(json.dumps([key, name, body]).encode())
    except OSError:
        pass  # the server is gone: nobody waits for this answer


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: finish the group, leave at end of file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    try:
        serve(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
