"""The blocking half of mailserver.crossnode: what travels on the `mail_changed` channel,
and the one PostgreSQL connection per node that sends it and holds the POP3 locks.

Payloads.  A notification names the node that sent it and the folders it changed, as
JSON in ASCII: {"node": "<id>", "f": [["example.org/alice", ""], ["example.org/alice",
".Sent"]]}, the mailbox as its directory under the Maildir root (every node shares that
root, wherever it is mounted) and the folder as its directory in the mailbox ("" for
INBOX).  {"node": "<id>", "all": true} stands for "anything may have changed".
PostgreSQL refuses a payload of 8000 bytes or more: a burst of changes becomes as many
payloads below PAYLOAD_MAX as it needs.  A payload that is not ours to read (too large,
malformed, a name that is not a path component) is left alone: a node only ever refreshes
a folder below its own root.

Locks.  POP3's IN-USE holds across nodes through PostgreSQL's session-level advisory
locks, keyed by a hash of the mailbox's directory under the root (LOCK_SPACE keeps them
apart from the accounts' own lock).  They are held on `NodeLink`'s connection for as long
as the POP3 session lasts: released by pg_advisory_unlock at QUIT or when the client goes
away, and by PostgreSQL itself when the connection ends, also when the node dies (the
server is told to probe an idle client, see SESSION_SETTINGS).  Session locks are
reentrant on one connection: the caller keeps one holder per mailbox in the process.

Blocking (psycopg), used by one thread at a time; imports nothing from Twisted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Any, Callable, Iterable

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "mail_changed"
PAYLOAD_MAX = 7900        # bytes; PostgreSQL's limit is 8000
ENTRIES_MAX = 4000        # folders read from one payload at most
NODE_MAX = 64             # characters of a node id
LOCK_SPACE = b"mailserver pop3 in-use\0"
RECONNECT_MIN = 0.5       # seconds before a new connection is tried after a failure ...
RECONNECT_MAX = 5.0       # ... doubling up to this
# Settings of the link's session: a node that vanished without closing its connection
# (a machine that died) loses its locks within about 25 s, not the kernel's two hours; a
# statement never waits longer than 10 s.  (PostgreSQL ignores the keepalives on a Unix
# socket, where the peer's death is always seen at once.)
SESSION_SETTINGS = (
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("statement_timeout", "10s"),
)

Key = tuple[str, str]     # (mailbox, folder): ("example.org/alice", ".Sent")


class LinkDown(Exception):
    """No connection to the database now; the message is one line."""


# -- payloads ------------------------------------------------------------------------------

def encode(node: str, keys: Iterable[Key] | None) -> list[str]:
    """The payloads that tell of `keys` (None: of everything), each below PAYLOAD_MAX."""
    if keys is None:
        return [json.dumps({"node": node, "all": True}, separators=(",", ":"))]
    head = json.dumps({"node": node, "f": []}, separators=(",", ":"))[:-2]  # ...,"f":[
    payloads: list[str] = []
    parts: list[str] = []
    size = len(head) + 2
    for key in keys:
        item = json.dumps(list(key), separators=(",", ":"))   # ASCII: \\u escapes
        if len(item) + len(head) + 2 >= PAYLOAD_MAX:
            # A name this long is not a real folder: tell everything instead.
            return encode(node, None)
        if parts and size + len(item) + 1 >= PAYLOAD_MAX:
            payloads.append(head + ",".join(parts) + "]}")
            parts, size = [], len(head) + 2
        parts.append(item)
        size += len(item) + 1
    if parts:
        payloads.append(head + ",".join(parts) + "]}")
    return payloads


class Heard:
    """What a burst of notifications from other nodes says: the folders, or everything."""

    def __init__(self) -> None:
        self.keys: dict[Key, None] = {}
        self.everything = False
        self.unreadable = 0

    def __bool__(self) -> bool:
        return self.everything or bool(self.keys)


def decode(payloads: Iterable[str], own: str) -> Heard:
    """The folders other nodes changed, from a burst of payloads; this node's own (`own`
    in "node") are skipped, unreadable ones counted."""
    heard = Heard()
    for payload in payloads:
        try:
            if len(payload) >= 8000:
                raise ValueError("too long")
            data = json.loads(payload)
            node = data["node"]
            if not isinstance(node, str) or not node or len(node) > NODE_MAX:
                raise ValueError("no node")
            if node == own:
                continue
            if data.get("all") is True:
                heard.everything = True
                continue
            entries = data["f"]
            if not isinstance(entries, list) or len(entries) > ENTRIES_MAX:
                raise ValueError("no folders")
            for entry in entries:
                key = _key(entry)
                if key is None:
                    heard.unreadable += 1
                else:
                    heard.keys[key] = None
        except (ValueError, KeyError, TypeError, AttributeError):
            heard.unreadable += 1
    return heard


def _key(entry: Any) -> Key | None:
    """A (mailbox, folder) entry whose every part is one harmless path component."""
    if not isinstance(entry, list) or len(entry) != 2:
        return None
    mailbox, folder = entry
    if not isinstance(mailbox, str) or not isinstance(folder, str):
        return None
    parts = mailbox.split("/")
    if len(parts) != 2 or not all(_component(p) for p in parts):
        return None
    if folder and not (folder.startswith(".") and _component(folder)):
        return None
    return mailbox, folder


def _component(name: str) -> bool:
    return (0 < len(name) <= 255 and name not in (".", "..") and "/" not in name
            and "\0" not in name)


def lock_key(mailbox: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of a mailbox's directory under the
    root ("example.org/alice")."""
    digest = hashlib.sha256(LOCK_SPACE + mailbox.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# -- the node's connection -------------------------------------------------------------------

class NodeLink:
    """The node's own connection: NOTIFY mail_changed, and POP3's advisory locks.

    One thread at a time (the caller's single worker).  A broken connection is replaced
    at the next call, at most every RECONNECT_MIN..RECONNECT_MAX seconds; a call made
    while there is none raises LinkDown at once.  The locks a broken connection lost are
    taken again on the new one; those another node took meanwhile are reported by
    `take_lost`.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._connect = connect
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0
        self._delay = RECONNECT_MIN
        self._held: set[int] = set()
        self._lost: list[int] = []
        self.reconnects = 0

    # -- calls

    def publish(self, payloads: list[str]) -> None:
        """NOTIFY mail_changed with each payload, in one statement."""
        if payloads:
            self._execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                          (CHANNEL, payloads))

    def try_lock(self, key: int) -> bool:
        """Take the session lock `key` unless another connection holds it."""
        row = self._execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        got = bool(row and row[0])
        if got:
            self._held.add(key)
        return got

    def unlock(self, key: int) -> None:
        """Release `key`.  Never fails: a lock of a lost connection is released already."""
        if key not in self._held:
            return
        self._held.discard(key)
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error as e:
            log.warning("releasing a POP3 lock: %s (the connection is replaced)",
                        _first_line(e))
            self._drop()

    def check(self) -> None:
        """Make sure the connection is alive (and the locks held), reconnecting if not."""
        self._execute("SELECT 1")

    def take_lost(self) -> list[int]:
        """The locks that could not be taken again after a reconnect (since the last call)."""
        lost, self._lost = self._lost, []
        return lost

    @property
    def held(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._drop()

    # -- the connection

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> psycopg.Cursor[Any]:
        """Run one statement; a connection that broke since its last use (a restarted
        database) is replaced and the statement tried once more on the new one."""
        while True:
            conn, new = self._connection()
            try:
                return conn.execute(sql, args)  # type: ignore[arg-type]
            except psycopg.Error as e:
                self._drop()
                if new:
                    self._failed()
                    raise LinkDown(_first_line(e)) from None

    def _connection(self) -> tuple[psycopg.Connection[Any], bool]:
        """The connection, and whether it was made just now."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        self._drop()
        if self._clock() < self._retry_at:
            raise LinkDown("database unreachable; retrying soon")
        try:
            conn = self._connect()
        except Exception as e:   # psycopg.Error, or the connect callable's own error
            self._failed()
            raise LinkDown(_first_line(e)) from None
        self._conn = conn
        try:
            for name, value in SESSION_SETTINGS:
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        except psycopg.Error as e:
            self._drop()
            self._failed()
            raise LinkDown(_first_line(e)) from None
        self._delay = RECONNECT_MIN
        self.reconnects += 1
        self._relock(conn)
        return conn, True

    def _relock(self, conn: psycopg.Connection[Any]) -> None:
        """A new connection: take the locks the old one held (ended with it) again."""
        for key in sorted(self._held):
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            except psycopg.Error:
                self._drop()
                self._failed()
                raise LinkDown("database unreachable; retrying soon") from None
            if not (row and row[0]):
                self._held.discard(key)
                self._lost.append(key)

    def _failed(self) -> None:
        self._retry_at = self._clock() + self._delay
        self._delay = min(self._delay * 2, RECONNECT_MAX)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Abandoned for a new one: closing a broken connection may fail, and changes
            # nothing then.
            with contextlib.suppress(Exception):
                conn.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
