"""Changes and locks across nodes: what one node does to a folder reaches the sessions of
every other node at once, and POP3's IN-USE holds across them.  Only when the accounts are
in PostgreSQL ([accounts] url): that database is what the nodes share besides the Maildir
root (mailserver.service wires this in then; a single node changes nothing).

Changes.  After this process changed a folder durably (a delivery committed, an APPEND,
a flag STORE, an EXPUNGE, a COPY or MOVE into it, POP3's DELE at QUIT) the store tells
`changed` its directory; the folder is sent to the other nodes as NOTIFY mail_changed
(payloads: mailbox, folder and this node's id, mailserver.crossnode_pg) from a thread of
its own.  Bursts coalesce: one NOTIFY statement is in flight at a time, and what changed
meanwhile goes with the next.  Every node LISTENs on the accounts replica's connection
(ReplicatedAccounts.subscribe): a burst of other nodes' notifications refreshes each
folder named that this node has open, exactly as its own deliveries do
(MaildirStore.notify_delivered), so IDLE sessions hear EXISTS, FETCH FLAGS and EXPUNGE,
and the next command of any session sees the change.  Its own notifications are skipped
by the node id.  Losing the connection loses nothing: once it listens again, every open
folder is refreshed once, and what could not be sent meanwhile is sent when it can.

One channel for every mailbox, not one per mailbox: PostgreSQL hands each notification
to every connection that listens on its channel, and channel names are identifiers of at
most 63 bytes.  Per-mailbox channels would mean a LISTEN and UNLISTEN on the shared
listening connection whenever a node's first session opens a mailbox or its last one
leaves, hashed names for long addresses, and every LISTEN again after each reconnect;
they would save each node only the dictionary lookup that drops another node's change
to a mailbox nobody here has open.

POP3's IN-USE.  The in-process registry (pop3.mailbox.MailboxLocks) keeps this node's
sessions apart; a PostgreSQL session-level advisory lock on the node's own connection,
keyed by the mailbox, keeps the nodes apart (`NodeMailboxLocks`).  It is released at
QUIT or when the client goes away, and by PostgreSQL when the node's connection ends, a
node killed or its machine dead included.  While the database is unreachable a POP3
login fails with SYS/TEMP rather than risk two sessions deleting in one mailbox; locks
of running sessions are taken again once it is back (a lock another node took meanwhile
is logged).

IMAP needs no lock of its own across nodes.  A folder's uids and keywords change only
under Dovecot's dot-lock in the Maildir (uidlist.py), which is a file created with O_EXCL
on the shared root and so excludes every node; an expunge is an unlink, a flag change a
rename of one file (another node's rename is found by the base name, as Dovecot's is);
CREATE is an exclusive mkdir, DELETE a rename of the directory away, RENAME a rename per
folder that never replaces a non-empty directory; subscriptions and special uses are
rewritten under their own dot-locks.  What the executor serialises in one process
(mailserver.maildir.executor) is the reactor's bookkeeping, not the disk's consistency.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from twisted.application import service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailserver.crossnode_pg import CHANNEL, Heard, Key, LinkDown, NodeLink, decode, encode, \
    lock_key
from mailserver.pop3.mailbox import MailboxLocks, MailboxUnavailable

log = Logger()

T = TypeVar("T")

PENDING_MAX = 10_000   # folders waiting to be told; beyond, "everything" is told
KEEPALIVE = 10.0       # seconds between checks of the link while it holds POP3 locks
RETRY_MIN = 0.5        # seconds before a failed NOTIFY is sent again ...
RETRY_MAX = 5.0        # ... doubling up to this


class CrossNode(service.Service):
    """This node's side of the mail_changed channel and of the POP3 locks."""

    name = "crossnode"

    def __init__(self, replica: Any, store: Any, connect: Callable[[], Any], *,
                 reactor: Any = None, node_id: str | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.reactor = reactor
        self.store = store
        self.node = node_id or uuid.uuid4().hex
        self.link = NodeLink(connect)
        self.pop3_locks = NodeMailboxLocks(self)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="crossnode")
        self._pending: dict[Key, None] = {}
        self._everything = False
        self._sending = False
        self._send_call: Any = None
        self._retry = RETRY_MIN
        self._down_since: float | None = None
        self._listened = False
        self._keepalive = LoopingCall(self._check_link)
        self._keepalive.clock = reactor
        self.sent = 0      # NOTIFY statements sent
        self.heard = 0     # bursts of other nodes' notifications applied
        replica.subscribe(CHANNEL, self._heard_in_thread, self._listening_in_thread)
        store.change_observers.append(self.changed)

    # -- service -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._keepalive.start(KEEPALIVE, now=False)
        log.info("cross-node changes on PostgreSQL channel {channel} as node {node}",
                 channel=CHANNEL, node=self.node)

    def stopService(self) -> Any:
        super().stopService()
        if self._keepalive.running:
            self._keepalive.stop()
        if self._send_call is not None and self._send_call.active():
            self._send_call.cancel()
        self._send_call = None
        # What changed in the last moments still goes out; the connection's close then
        # ends this node's POP3 locks.  The pool's one thread does the work queued before
        # (stop joins it).
        if self._pending or self._everything:
            keys = None if self._everything else list(self._pending)
            self._pending, self._everything = {}, False
            self._pool.callInThread(_quietly, self.link.publish, encode(self.node, keys))
        self._pool.callInThread(self.link.close)
        self._pool.stop()

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """`fn(*args)` on the link's thread, after the work queued before it."""
        d = deferToThreadPool(self.reactor, self._pool, _with_lost, self.link, fn, *args)
        return d.addCallback(self._lost_locks)

    def _lost_locks(self, result: tuple[T, list[int]]) -> T:
        value, lost = result
        if lost:
            log.warn("{count} POP3 mailbox locks were taken by another node while the "
                     "database connection was down; those sessions delete nothing at QUIT",
                     count=len(lost))
            self.pop3_locks.lost(lost)
        return value

    # -- telling the other nodes -------------------------------------------------------------------

    def changed(self, path: Path) -> None:
        """The store's observer: this process changed the folder at `path` durably."""
        key = self._key_of(path)
        if key is None or self._everything:
            return
        self._pending[key] = None
        if len(self._pending) > PENDING_MAX:
            self._pending.clear()
            self._everything = True
        self._kick()

    def _key_of(self, path: Path) -> Key | None:
        """(mailbox, folder) of a folder directory under the root; None elsewhere."""
        try:
            parts = Path(path).relative_to(self.store.root).parts
        except ValueError:
            return None
        if len(parts) == 2:
            return f"{parts[0]}/{parts[1]}", ""
        if len(parts) == 3 and parts[2].startswith("."):
            return f"{parts[0]}/{parts[1]}", parts[2]
        return None

    def _kick(self, delay: float = 0.0) -> None:
        """Send what is pending once the statement in flight (if any) is done; what the
        reactor changes within this turn goes in one."""
        if self._sending or (self._send_call is not None and self._send_call.active()):
            return
        self._send_call = self.reactor.callLater(delay, self._send)

    def _send(self) -> None:
        self._send_call = None
        if not (self._pending or self._everything) or not self.running:
            return
        keys = None if self._everything else list(self._pending)
        self._pending, self._everything = {}, False
        self._sending = True
        self._run(self.link.publish, encode(self.node, keys)).addCallbacks(
            self._sent, self._send_failed, errbackArgs=(keys,))

    def _sent(self, _: None) -> None:
        self._sending = False
        self.sent += 1
        self._retry = RETRY_MIN
        if self._down_since is not None:
            log.info("cross-node changes are sent again")
            self._down_since = None
        if self._pending or self._everything:
            self._kick()

    def _send_failed(self, failure: Failure, keys: list[Key] | None) -> None:
        self._sending = False
        if keys is None:
            self._everything = True
        elif not self._everything:
            for key in keys:
                self._pending.setdefault(key, None)
            if len(self._pending) > PENDING_MAX:
                self._pending.clear()
                self._everything = True
        if self._down_since is None:
            self._down_since = self.reactor.seconds()
            if failure.check(LinkDown):
                log.warn("cross-node changes cannot be sent ({reason}); other nodes see them "
                         "at their sessions' next commands until the database is back",
                         reason=failure.getErrorMessage())
            else:
                log.failure("sending cross-node changes failed; retrying", failure)
        self._kick(self._retry)
        self._retry = min(self._retry * 2, RETRY_MAX)

    # -- hearing them -------------------------------------------------------------------------------

    def _heard_in_thread(self, payloads: list[str]) -> None:
        """The listener thread: a burst of mail_changed payloads."""
        heard = decode(payloads, self.node)
        if heard or heard.unreadable:
            self.reactor.callFromThread(self._apply, heard)

    def _apply(self, heard: Heard) -> None:
        if heard.unreadable:
            log.warn("{count} unreadable entries on channel {channel} ignored",
                     count=heard.unreadable, channel=CHANNEL)
        if heard.everything:
            self.heard += 1
            self.store.refresh_watched()
        elif heard.keys:
            self.heard += 1
            root = self.store.root
            self.store.notify_delivered(
                [root.joinpath(*mailbox.split("/"), folder) for mailbox, folder in heard.keys])

    def _listening_in_thread(self) -> None:
        """The listener thread: LISTEN is in effect (again)."""
        self.reactor.callFromThread(self._listening)

    def _listening(self) -> None:
        count = self.store.refresh_watched(force=True)
        if self._listened:   # not the first time, at start
            log.info("listening for cross-node changes again: {count} open folders "
                     "refreshed", count=count)
        self._listened = True
        self._check_link()   # our own connection, and the POP3 locks on it, back as well

    def _check_link(self) -> Deferred[None]:
        if not self.link.held:
            return succeed(None)
        return self._run(self.link.check).addErrback(lambda f: None)   # retried later


def _with_lost(link: NodeLink, fn: Callable[..., T], *args: Any) -> tuple[T, list[int]]:
    """The link's thread: `fn`, and the locks lost on a reconnect it made (if it fails,
    they are reported by the next call that succeeds)."""
    value = fn(*args)
    return value, link.take_lost()


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """The link's thread at shutdown: `fn`, whose failure nobody would hear of."""
    with contextlib.suppress(LinkDown):   # the link is going away with the server
        fn(*args)


class NodeMailboxLocks:
    """POP3's IN-USE across nodes: the process's registry first, then the node's advisory
    lock on the mailbox (see the module doc).  Keys are the Maildir paths POP3 uses."""

    def __init__(self, crossnode: CrossNode) -> None:
        self._crossnode = crossnode
        self._local = MailboxLocks()
        self._lost: set[str] = set()   # held here, but taken by another node meanwhile
        self._acquiring: set[str] = set()   # asked of the database, not answered yet

    def _pg_key(self, key: str) -> int:
        mailbox = self._crossnode._key_of(Path(key))
        if mailbox is None or mailbox[1]:
            raise ValueError(f"not a mailbox under the Maildir root: {key}")
        return lock_key(mailbox[0])

    def acquire(self, key: str) -> Deferred[bool]:
        """True once this session holds the mailbox on every node; False if another
        session does; MailboxUnavailable while the database cannot be asked."""
        if not self._local.acquire(key):
            return succeed(False)
        try:
            pg_key = self._pg_key(key)
        except ValueError:
            self._local.release(key)
            return fail()
        # A loss reported while the database is asked is not this session's: its lock
        # is taken (or not) by the answer itself.
        self._lost.discard(key)
        self._acquiring.add(key)

        def answered(got: bool) -> bool:
            self._acquiring.discard(key)
            if not got:
                self._local.release(key)
            return got

        def failed(f: Failure) -> Failure:
            self._acquiring.discard(key)
            self._local.release(key)
            if f.check(LinkDown):
                raise MailboxUnavailable(f.getErrorMessage())
            return f

        return self._crossnode._run(self._crossnode.link.try_lock, pg_key).addCallbacks(
            answered, failed)

    def lost(self, pg_keys: list[int]) -> None:
        """These advisory locks went to another node (while this one's connection was
        down): the sessions holding them here no longer hold their mailbox."""
        gone = set(pg_keys)
        for key in self._local.keys():
            if key in self._acquiring:
                continue
            with contextlib.suppress(ValueError):
                if self._pg_key(key) in gone:
                    self._lost.add(key)

    def holds(self, key: str) -> bool:
        """Whether the session that acquired `key` still holds it on every node, as far
        as this node has heard."""
        return key in self._local and key not in self._lost

    def confirm(self, key: str) -> Deferred[bool]:
        """holds(), once the database has been asked: the keepalive hears of a dropped
        connection only every KEEPALIVE seconds, and meanwhile PostgreSQL has let the
        lock go and another node's session may have the mailbox.  The link's check
        reconnects and takes the lock again, or reports it lost; MailboxUnavailable while
        the database cannot be asked (POP3 then deletes nothing)."""
        if not self.holds(key):
            return succeed(False)

        def failed(f: Failure) -> Failure:
            if f.check(LinkDown):
                raise MailboxUnavailable(f.getErrorMessage())
            return f

        d = self._crossnode._run(self._crossnode.link.check)
        return d.addCallbacks(lambda _: self.holds(key), failed)

    def release(self, key: str) -> None:
        self._lost.discard(key)
        if key not in self._local:
            return
        self._local.release(key)
        self._crossnode._run(self._crossnode.link.unlock, self._pg_key(key)).addErrback(
            lambda f: log.failure("releasing the POP3 lock of {key} failed", f, key=key))

    def __contains__(self, key: str) -> bool:
        return key in self._local
