"""A per-folder cache so that a large folder opens fast and IMAP never re-parses a message.

One SQLite file, `mailserver.index.sqlite3` (WAL mode), in each folder's directory, next
to dovecot-uidlist, so it moves and disappears with the folder on RENAME and DELETE.
Dovecot ignores it; it ignores Dovecot's files.

Everything here is keyed by a message's base name (the file name without ":2,<flags>"):
it identifies the file's contents for good, whatever the flags or the UIDVALIDITY.

- `msg`: size and internal date (file mtime) of every message, so that opening a folder
  needs no stat() per known message;
- `cache`: opaque values the IMAP layer computes once (envelope, bodystructure, header
  subsets...), written in batches; a large folder's header pass (imap/headerpass.py)
  writes its envelopes, header lines and search rows from worker processes, a batch per
  transaction, on connections of their own (`write_summaries`);
- `search`: the decoded header fields SEARCH keys name (subject, from, to, cc, bcc, date),
  so that a header search over a large folder is one SQL scan, not a read of every file;
- `meta`: UIDVALIDITY and UIDNEXT last seen, a fallback when dovecot-uidlist is lost;
  HIGHESTMODSEQ and how far back the expunge memory reaches (RFC 7162);
- `modseq`: each message's mod-sequence with its uid and the file name it had then, so a
  name changed behind our back (by Dovecot, or a write lost in a crash) is noticed;
- `vanished`: expunged uids with the mod-sequence of their expunge (QRESYNC).

It is only a cache: a missing, corrupt or foreign-version file is removed and rebuilt
without a word to the client.  Writes use `synchronous=NORMAL`: a crash may lose the
last writes, never the database.  Mod-sequences survive that too: the folder never hands
out a value below the current time in microseconds (folder_disk.py), so what a lost write
or a rebuilt file forgets is only re-announced, never reused.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

INDEX_NAME = "mailserver.index.sqlite3"
SCHEMA_VERSION = "2"
_BATCH = 900  # host parameters per statement stay below SQLite's default limit
_RANGE_READ = 64  # get_many of at least this many names tries one range read first

CacheValue = bytes | str

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS msg (
    base TEXT PRIMARY KEY, size INTEGER NOT NULL, internaldate REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cache (
    base TEXT NOT NULL, key TEXT NOT NULL, value BLOB,
    PRIMARY KEY (base, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search (
    base TEXT PRIMARY KEY, subject TEXT, from_ TEXT, to_ TEXT, cc TEXT, bcc TEXT,
    date TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS modseq (
    base TEXT PRIMARY KEY, uid INTEGER NOT NULL, modseq INTEGER NOT NULL,
    name TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vanished (uid INTEGER PRIMARY KEY, modseq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS vanished_modseq ON vanished (modseq);
"""
# Expunged uids remembered per folder; beyond this the oldest are forgotten (and the
# memory's start moves up: older clients get the long form of VANISHED (EARLIER)).
VANISHED_KEEP = 200_000
# The header fields SEARCH keys name most, decoded; the text ones case-folded, so that a
# substring test in SQL is IMAP's case-insensitive match (RFC 3501 6.4.4).
SEARCH_COLUMNS = ("subject", "from_", "to_", "cc", "bcc", "date")
# How the search rows' text is written (imap/summary.search_form); "1" was case-folded
# only.  Rows of another form are dropped when the file is opened.
SEARCH_FORM = "2"


DECODED_IDLE_SECONDS = 600.0   # decoded memos (SORT's keys) unused this long are forgotten
# Messages of a first load whose rows one write takes (write_loaded): each write is short,
# so the folder's other jobs are not held up behind a hundred thousand rows.
LOADED_PER_WRITE = 5_000

class FolderIndex:
    """The index file of one folder directory.

    Writes (`load`, `put_messages`, `drop`, `flush`...) are blocking and meant for a thread;
    `get`/`get_many` are point reads on a second connection, cheap enough for the reactor
    and never held up by a long write (WAL readers do not wait for the writer).
    """

    def __init__(self, folder_dir: Path) -> None:
        self.dir = Path(folder_dir)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._pending: dict[tuple[str, str], CacheValue] = {}
        self._pending_lock = threading.Lock()
        self._broken = False
        # Decoded cache values a reader asked to keep (SORT's keys and table): a second
        # SORT of a large folder neither reads nor decodes them again.  They outlive the
        # connections the idle sweep closes (a client that sorts every few minutes keeps
        # its speed) and are forgotten after DECODED_IDLE_SECONDS unused, when the file
        # is rebuilt, and per message on drop().
        self.decoded: dict[str, dict[str, object]] = {}
        self.generation = 0  # grows whenever the file was rebuilt empty
        # Mod-sequence changes waiting for the next write, kept in order per base name.
        self._mod_reset = False
        self._mod_gone: dict[str, tuple[int, int]] = {}        # base -> (uid, modseq)
        self._mod_rows: dict[str, tuple[int, int, str]] = {}   # base -> (uid, modseq, name)
        self._mod_meta: dict[str, int] = {}
        # The messages of a first load whose rows write_loaded writes (objects with
        # basename, size, internaldate, uid, modseq, filename): a large folder opens
        # before they are written.
        self._loaded: list[Any] = []
        self.last_used = time.monotonic()

    @property
    def path(self) -> Path:
        return self.dir / INDEX_NAME

    # -- connections ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _writer(self) -> sqlite3.Connection:
        """The write connection (caller holds _write_lock); rebuilds a broken file."""
        self.last_used = time.monotonic()
        if self._broken:
            self._rebuild()
        if self._w is None:
            try:
                self._w = self._open_checked()
            except sqlite3.DatabaseError as e:
                log.warning("index %s unusable (%s): rebuilding", str(self.path), e)
                self._rebuild()
        assert self._w is not None
        return self._w

    def _open_checked(self) -> sqlite3.Connection:
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                             (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                conn.close()
                raise sqlite3.DatabaseError(f"schema {row[0]}, expected {SCHEMA_VERSION}")
            form = conn.execute("SELECT value FROM meta WHERE key='search_form'").fetchone()
            if form is None or form[0] != SEARCH_FORM:
                # Search rows written another way (summary.search_form changed): dropped,
                # and made again as SEARCH needs them; the rest of the index stays.
                with conn:
                    conn.execute("DELETE FROM search")
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('search_form', ?)",
                                 (SEARCH_FORM,))
        except BaseException:
            conn.close()
            raise
        return conn

    def _rebuild(self) -> None:
        """Throw the file away and start empty (caller holds _write_lock)."""
        self._close_connections()
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(str(self.path) + suffix)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("cannot remove index %s: %s", str(self.path), e)
        self._broken = False
        self.generation += 1
        self._w = self._open_checked()

    def _close_connections(self, forget_decoded: bool = True) -> None:
        if forget_decoded:
            self.decoded = {}
        with self._read_lock:
            if self._w is not None:
                try:
                    # Closing the last connection checkpoints the WAL inside close(), which
                    # holds the GIL (the whole process waits); a checkpoint statement
                    # first does the same work with the GIL released.
                    self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
            for conn in (self._w, self._r):
                if conn is not None:
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
            self._w = self._r = None

    def _write(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run `fn(conn, *args)` in one transaction; a corrupt file is rebuilt, once."""
        with self._write_lock:
            for attempt in (1, 2):
                conn = self._writer()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(conn, *args)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                    return result
                except sqlite3.DatabaseError as e:
                    if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                        raise
                    if attempt == 2:
                        raise
                    log.warning("index %s damaged (%s): rebuilding", str(self.path), e)
                    self._broken = True

    # -- messages -------------------------------------------------------------------------------

    def load(self) -> tuple[dict[str, str], dict[str, tuple[int, float]]]:
        """(meta, base name -> (size, internaldate)) as stored; empty if rebuilt."""
        def run(conn: sqlite3.Connection):  # type: ignore[no-untyped-def]
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            msgs = {b: (s, d) for b, s, d in
                    conn.execute("SELECT base, size, internaldate FROM msg")}
            return meta, msgs
        try:
            return self._write(run)
        except sqlite3.Error as e:
            log.error("index %s unreadable: %s", str(self.path), e)
            return {}, {}

    def set_meta(self, values: dict[str, str | int]) -> None:
        self._safe(lambda conn: conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [(k, str(v)) for k, v in values.items()]))

    def put_messages(self, rows: Iterable[tuple[str, int, float]]) -> None:
        """Record (base, size, internaldate) of messages."""
        rows = list(rows)
        if rows:
            self._safe(lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO msg VALUES (?, ?, ?)", rows))

    def note_loaded(self, infos: list[Any]) -> None:
        """Queue the rows (messages and mod-sequences) of a folder's first load for
        `write_loaded`, made there from the messages themselves: the first open of a
        large folder answers before anything is done per message for the index."""
        with self._pending_lock:
            self._loaded.extend(infos)

    def write_loaded(self, limit: int | None = None) -> None:
        """Write the rows of up to `limit` (LOADED_PER_WRITE) queued messages of a first
        load (blocking).  A row never replaces one already there: whatever was written
        since the load (a flag change, an expunge and its drop) is newer, and a change
        queued and not written yet replaces this row when it is."""
        taken: list[Any] = []

        def run(conn: sqlite3.Connection) -> None:
            if not taken:  # taken under the write lock, once (a retry reuses it)
                count = LOADED_PER_WRITE if limit is None else limit
                with self._pending_lock:
                    taken.append(self._loaded[:count])
                    self._loaded = self._loaded[count:]
            infos = taken[0]
            conn.executemany("INSERT OR IGNORE INTO msg VALUES (?, ?, ?)",
                             sorted((i.basename, i.size, i.internaldate) for i in infos))
            conn.executemany("INSERT OR IGNORE INTO modseq VALUES (?, ?, ?, ?)",
                             sorted((i.basename, i.uid, i.modseq, i.filename) for i in infos))
        if self._loaded:
            self._safe(run)

    def drop(self, bases: Iterable[str]) -> None:
        """Forget expunged messages and everything cached about them."""
        bases = list(bases)
        if not bases:
            return
        with self._pending_lock:
            gone = set(bases)
            for k in [k for k in self._pending if k[0] in gone]:
                del self._pending[k]
            if self._loaded:
                self._loaded = [i for i in self._loaded if i.basename not in gone]
        for memo in list(self.decoded.values()):
            for base in bases:
                memo.pop(base, None)

        def run(conn: sqlite3.Connection) -> None:
            for i in range(0, len(bases), _BATCH):
                chunk = bases[i:i + _BATCH]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM msg WHERE base IN ({marks})", chunk)
                conn.execute(f"DELETE FROM cache WHERE base IN ({marks})", chunk)
                conn.execute(f"DELETE FROM search WHERE base IN ({marks})", chunk)
        self._safe(run)

    def _safe(self, fn) -> None:  # type: ignore[no-untyped-def]
        """A write whose failure costs only speed: logged, not raised."""
        try:
            self._write(fn)
        except sqlite3.Error as e:
            log.error("index %s write failed: %s", str(self.path), e)

    # -- cached values -----------------------------------------------------------------------

    def put(self, base: str, key: str, value: CacheValue) -> None:
        """Remember a value; it reaches the file on the next `flush`."""
        with self._pending_lock:
            self._pending[(base, key)] = value

    @property
    def pending(self) -> int:
        return len(self._pending) + self.modseqs_pending + bool(self._loaded)

    @property
    def loaded_pending(self) -> bool:
        """Rows of a first load are still to be written (see note_loaded)."""
        return bool(self._loaded)

    @property
    def modseqs_pending(self) -> int:
        """Mod-sequence changes queued and not written yet."""
        return (len(self._mod_rows) + len(self._mod_gone) + bool(self._mod_meta)
                + self._mod_reset)

    @property
    def values_pending(self) -> int:
        """Cached values not written yet."""
        return len(self._pending)

    def flush(self, limit: int | None = None) -> int:
        """Write the pending values (up to `limit` of them) and mod-sequences (blocking);
        how many cache values were written."""
        with self._pending_lock:
            if limit is None or len(self._pending) <= limit:
                batch, self._pending = self._pending, {}
            else:
                keys = list(itertools.islice(self._pending, limit))
                batch = {k: self._pending.pop(k) for k in keys}
        if batch:
            self._safe(lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO cache VALUES (?, ?, ?)",
                [(b, k, v) for (b, k), v in batch.items()]))
        self.write_modseqs()
        return len(batch)

    # -- mod-sequences (RFC 7162) ------------------------------------------------------------
    #
    # The folder queues its changes here as it makes them (`note_*`, cheap enough for the
    # reactor) and writes them from its thread work (`write_modseqs`), in order: a queued
    # change replaces an older one for the same message, and the queue is taken inside
    # the write lock, so two writers never put an older state over a newer one.

    def load_modseqs(self) -> tuple[dict[str, int], dict[str, tuple[int, int, str]]]:
        """(meta, base -> (uid, modseq, name)) as stored (blocking); empty if unreadable.
        meta may hold highestmodseq, modseq_uidvalidity (the UIDVALIDITY the uids belong
        to) and vanished_after (every expunge above it is in the vanished table)."""
        keys = ("highestmodseq", "modseq_uidvalidity", "vanished_after")

        def run(conn: sqlite3.Connection):  # type: ignore[no-untyped-def]
            marks = ",".join("?" * len(keys))
            meta = {k: _int_or_none(v) for k, v in conn.execute(
                f"SELECT key, value FROM meta WHERE key IN ({marks})", keys)}
            rows = {b: (u, m, n) for b, u, m, n in
                    conn.execute("SELECT base, uid, modseq, name FROM modseq")}
            return {k: v for k, v in meta.items() if v is not None}, rows
        try:
            return self._write(run)
        except sqlite3.Error as e:
            log.error("index %s unreadable: %s", str(self.path), e)
            return {}, {}

    def note_modseqs(self, rows: Iterable[tuple[str, int, int, str]]) -> None:
        """Queue (base, uid, modseq, file name) of messages whose mod-sequence or name
        changed."""
        with self._pending_lock:
            for base, uid, modseq, name in rows:
                self._mod_rows[base] = (uid, modseq, name)

    def note_expunged(self, rows: Iterable[tuple[str, int]], modseq: int) -> None:
        """Queue expunged messages (base, uid): their row goes, and their uid is
        remembered as vanished at `modseq`."""
        with self._pending_lock:
            for base, uid in rows:
                self._mod_rows.pop(base, None)
                self._mod_gone[base] = (uid, modseq)

    def note_modseq_meta(self, **values: int) -> None:
        """Queue meta values: highestmodseq, modseq_uidvalidity, vanished_after."""
        with self._pending_lock:
            self._mod_meta.update(values)

    def note_modseq_reset(self) -> None:
        """Forget every stored mod-sequence and vanished uid (UIDVALIDITY changed, or the
        rows cannot be trusted): done before anything queued after this call."""
        with self._pending_lock:
            self._mod_reset = True
            self._mod_rows.clear()
            self._mod_gone.clear()
            self._loaded = []

    def write_modseqs(self) -> None:
        """Write the queued mod-sequence changes in one transaction (blocking); rows in
        key order, which SQLite writes several times faster."""
        if not (self._mod_reset or self._mod_rows or self._mod_gone or self._mod_meta):
            return
        taken: list[Any] = []

        def run(conn: sqlite3.Connection) -> None:
            if not taken:  # taken under the write lock, once (a retry reuses it)
                with self._pending_lock:
                    taken.append((self._mod_reset, self._mod_gone, self._mod_rows,
                                  self._mod_meta))
                    self._mod_reset, self._mod_gone = False, {}
                    self._mod_rows, self._mod_meta = {}, {}
            reset, gone, rows, meta = taken[0]
            if reset:
                conn.execute("DELETE FROM modseq")
                conn.execute("DELETE FROM vanished")
            if gone:
                bases = list(gone)
                for i in range(0, len(bases), _BATCH):
                    chunk = bases[i:i + _BATCH]
                    marks = ",".join("?" * len(chunk))
                    conn.execute(f"DELETE FROM modseq WHERE base IN ({marks})", chunk)
                conn.executemany("INSERT OR REPLACE INTO vanished VALUES (?, ?)",
                                 list(gone.values()))
            if rows:
                conn.executemany("INSERT OR REPLACE INTO modseq VALUES (?, ?, ?, ?)",
                                 sorted((b, u, m, n) for b, (u, m, n) in rows.items()))
            if meta:
                conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [(k, str(v)) for k, v in meta.items()])
            if gone:
                self._prune_vanished(conn)
        self._safe(run)

    @staticmethod
    def _prune_vanished(conn: sqlite3.Connection) -> None:
        """Keep the newest VANISHED_KEEP expunges; what is forgotten moves the start of
        the memory (vanished_after) up past it."""
        (count,) = conn.execute("SELECT count(*) FROM vanished").fetchone()
        if count <= VANISHED_KEEP:
            return
        (cut,) = conn.execute("SELECT modseq FROM vanished ORDER BY modseq LIMIT 1 OFFSET ?",
                              (count - VANISHED_KEEP - 1,)).fetchone()
        conn.execute("DELETE FROM vanished WHERE modseq <= ?", (cut,))
        row = conn.execute("SELECT value FROM meta WHERE key='vanished_after'").fetchone()
        after = max(cut, _int_or_none(row[0]) or 0) if row else cut
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('vanished_after', ?)", (str(after),))

    def vanished_since(self, modseq: int) -> tuple[int | None, list[int]]:
        """(vanished_after, the uids expunged at a mod-sequence above `modseq`, ascending)
        (blocking; sqlite3.Error when unreadable).  The list is complete only when
        `modseq` >= vanished_after; None: the memory's start is not known."""
        self.write_modseqs()
        with self._write_lock:
            conn = self._writer()
            row = conn.execute("SELECT value FROM meta WHERE key='vanished_after'").fetchone()
            uids = [u for (u,) in conn.execute(
                "SELECT uid FROM vanished WHERE modseq > ? ORDER BY uid", (modseq,))]
        return (_int_or_none(row[0]) if row else None), uids

    def get(self, base: str, key: str) -> CacheValue | None:
        value = self._pending.get((base, key))
        if value is not None:
            return value
        rows = self._read("SELECT value FROM cache WHERE base=? AND key=?", (base, key))
        return rows[0][0] if rows else None

    def get_many(self, bases: list[str], key: str) -> dict[str, CacheValue]:
        """The cached `key` of each base name that has one."""
        found: dict[str, CacheValue] = {}
        missing = bases
        pending = self._pending
        if pending:
            missing = []
            for b in bases:
                value = pending.get((b, key))
                if value is not None:
                    found[b] = value
                else:
                    missing.append(b)
        for i in range(0, len(missing), _BATCH):
            chunk = missing[i:i + _BATCH]
            if len(chunk) >= _RANGE_READ and self._read_range(chunk, key, found):
                continue
            found.update(self._read(
                f"SELECT base, value FROM cache WHERE key=? AND base IN ({_marks(len(chunk))})",
                (key, *chunk)))
        return found

    def _read_range(self, bases: list[str], key: str, found: dict[str, CacheValue]) -> bool:
        """The values of `bases` read as one range of base names: consecutive messages
        (a FETCH over a folder) have neighbouring names (they begin with the delivery
        time), so one range walk costs less than as many lookups.  False, nothing taken,
        when the range holds too many others (names that do not follow the uids)."""
        limit = 2 * len(bases)
        rows = self._read("SELECT base, value FROM cache WHERE base BETWEEN ? AND ? AND key=? "
                          "LIMIT ?", (min(bases), max(bases), key, limit + 1))
        if len(rows) > limit:
            return False
        if len(rows) == len(bases) and list(map(_first, rows)) == sorted(bases):
            found.update(rows)  # the range holds these names and no others
        else:
            wanted = set(bases)
            found.update(row for row in rows if row[0] in wanted)
        return True

    # -- search fields (blocking: for threads) -----------------------------------------------

    def search_bases(self) -> set[str]:
        """Base names whose search fields are stored (sqlite3.Error when unreadable)."""
        return {b for (b,) in self._read_strict("SELECT base FROM search", ())}

    def put_search(self, rows: list[tuple[str, ...]]) -> None:
        """Store (base, *SEARCH_COLUMNS) rows."""
        if rows:
            self._write(lambda conn: conn.executemany(
                "INSERT OR REPLACE INTO search VALUES (?, ?, ?, ?, ?, ?, ?)", rows))

    def search_match(self, column: str, needle: str) -> set[str]:
        """Base names whose `column` contains `needle` (both case-folded by the caller)."""
        if column not in SEARCH_COLUMNS:
            raise ValueError(column)
        return {b for (b,) in self._read_strict(
            f"SELECT base FROM search WHERE instr({column}, ?) > 0", (needle,))}

    def search_column(self, column: str) -> dict[str, str]:
        if column not in SEARCH_COLUMNS:
            raise ValueError(column)
        return dict(self._read_strict(f"SELECT base, {column} FROM search", ()))

    def _read_strict(self, sql: str, params: tuple) -> list[tuple]:
        """A read whose failure the caller handles (SEARCH falls back to the files)."""
        with self._write_lock:  # the writer sees its own latest rows; and a broken file
            return self._writer().execute(sql, params).fetchall()  # is rebuilt first

    def open_reader(self) -> None:
        """Open the read connection now (blocking: for a thread), so that the point reads
        the reactor makes after the idle sweep closed it do not open a file themselves."""
        with self._read_lock:
            if self._r is None and self.path.exists():
                try:
                    self._r = self._connect()
                except sqlite3.Error as e:
                    log.warning("index %s: cannot open: %s", str(self.path), e)
            self.last_used = time.monotonic()

    def _read(self, sql: str, params: tuple) -> list[tuple]:
        self.last_used = time.monotonic()
        with self._read_lock:
            try:
                if self._r is None:
                    if not self.path.exists():
                        return []
                    self._r = self._connect()
                return self._r.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                log.warning("index %s read failed: %s", str(self.path), e)
                if self._r is not None:
                    self._r.close()
                    self._r = None
                if not isinstance(e, sqlite3.OperationalError):
                    self._broken = True
                return []

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._w is not None or self._r is not None

    def close_if_idle(self, idle: float) -> bool:
        """Close the connections if unused for `idle` seconds and nothing is pending
        (blocking; never waits for a write in progress).  Each SQLite connection holds
        some 150 KiB: a server with a thousand users in IDLE must not keep two per folder.
        The next use opens them again."""
        if self.pending or time.monotonic() - self.last_used < idle:
            return False
        if not self._write_lock.acquire(blocking=False):
            return False
        try:
            self._close_connections(forget_decoded=False)
        finally:
            self._write_lock.release()
        return True

    def forget_decoded_if_idle(self, idle: float = DECODED_IDLE_SECONDS) -> bool:
        """Drop the decoded memos if unused for `idle` seconds (their memory: some 60 MB
        for a 100,000-message folder that was sorted)."""
        if not self.decoded or time.monotonic() - self.last_used < idle:
            return False
        self.decoded = {}
        return True

    def close(self) -> None:
        """Write what is pending and close the file (blocking)."""
        self.flush()
        while self._loaded:
            self.write_loaded()
        with self._write_lock:
            self._close_connections()


def write_summaries(folder_dir: str | Path, cache_rows: list[tuple[str, str, CacheValue]],
                    search_rows: list[tuple[str, ...]]) -> bool:
    """Store cache values (base, key, value) and search rows (base, *SEARCH_COLUMNS) from
    outside the folder's FolderIndex (the header pass, in a worker process): one
    transaction on a connection of its own, rows in key order (a B-tree filled in order
    is written several times faster).  False, nothing written, when the folder has no
    index of this schema yet: the caller keeps the values itself.  sqlite3.Error when
    the file cannot be written (locked beyond the timeout, damaged)."""
    conn = _summary_connection(Path(folder_dir) / INDEX_NAME)
    if conn is None:
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        if cache_rows:
            conn.executemany("INSERT OR REPLACE INTO cache VALUES (?, ?, ?)",
                             sorted(cache_rows, key=_base_and_key))
        if search_rows:
            conn.executemany("INSERT OR REPLACE INTO search VALUES (?, ?, ?, ?, ?, ?, ?)",
                             sorted(search_rows, key=_first))
    except BaseException:
        conn.execute("ROLLBACK")
        _forget_summary_connection()
        raise
    conn.execute("COMMIT")
    return True


# The header pass writes batch after batch into the same index: its connection (and the
# pages it has read) is kept for the next batch, one per thread, while the file is the
# same one (an index rebuilt meanwhile is another file).
_summary_conns = threading.local()


def _summary_connection(path: Path) -> sqlite3.Connection | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    identity = (str(path), st.st_dev, st.st_ino)
    kept = getattr(_summary_conns, "kept", None)
    if kept is not None and kept[0] == identity:
        return kept[1]
    _forget_summary_connection()
    conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=10.0,
                           isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    except BaseException:
        conn.close()
        raise
    if row is None or row[0] != SCHEMA_VERSION:
        conn.close()
        return None
    _summary_conns.kept = (identity, conn)
    return conn


def _forget_summary_connection() -> None:
    kept = getattr(_summary_conns, "kept", None)
    _summary_conns.kept = None
    if kept is not None:
        with contextlib.suppress(sqlite3.Error):   # dropped either way
            kept[1].close()


def _base_and_key(row: tuple[str, str, CacheValue]) -> tuple[str, str]:
    return row[0], row[1]


_first = itemgetter(0)


def _marks(n: int, _made: dict[int, str] = {}) -> str:  # noqa: B006 (a memo)
    """"?,?,...,?" with `n` marks (made once per length)."""
    text = _made.get(n)
    if text is None:
        text = _made[n] = ",".join("?" * n)
    return text


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
