"""The POP3 avatar: twisted.mail's POP3 IMailbox over a user's INBOX Folder.

A session works on the snapshot of INBOX taken at login: message numbers never change
during a session (RFC 1939 5).  DELE only marks; the marked messages are removed through
the shared Folder at QUIT (RFC 1939 6), so IMAP sessions on the same folder see them go
as EXPUNGE, and a dropped connection removes nothing.  A message expunged by someone else
meanwhile stays listed but can no longer be retrieved.

Identity is the Maildir base name, as for IMAP and Dovecot: it is the UIDL, and it is how
a snapshot entry finds its message again even if the folder's uids were reset.  A POP3
UIDL and order that Dovecot stored in dovecot-uidlist win over that (pop3/dovecot.py).

Sizes are the octets of the CRLF form POP3 sends (RFC 1939 5, 11), from the index and the
file name wherever possible: Dovecot's ",W=<size>", the shared "vsize" cache that IMAP's
RFC822.SIZE also uses, or ",S=" on files this server wrote (always CRLF).  Any other file
is measured once, in a thread, and the result cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from mailserver.maildir.sizes import VSIZE_KEY, own_name_pattern
from mailserver.pop3 import dovecot
from mailserver.pop3.snapshot import Entry, Snapshot, take_snapshot, uidl_of  # noqa: F401
from mailserver.pop3.wire import crlf_size_of_path

log = Logger()



class MailboxInUse(Exception):
    """Another POP3 session holds this mailbox (RFC 2449 8.1.2 IN-USE)."""


class MailboxLockLost(Exception):
    """The session's cross-node lock was taken by another node's session meanwhile."""


class MailboxUnavailable(Exception):
    """The lock that keeps POP3 sessions apart cannot be taken now (across nodes: the
    database is unreachable): a temporary failure (RFC 3206 SYS/TEMP)."""


class NoSuchMessage(ValueError):
    """A message number outside the listing."""


class MessageDeleted(ValueError):
    """A message this session marked with DELE."""


class MessageGone(ValueError):
    """A message removed by another session or program since login."""


class MailboxLocks:
    """The in-process IN-USE registry: one POP3 session per Maildir at a time.

    On one node a lock in memory is enough.  Nodes sharing the Maildirs and a PostgreSQL
    accounts database use mailserver.crossnode's locks instead, whose `acquire` returns a
    Deferred (of the same bool) and may fail with MailboxUnavailable.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()

    def acquire(self, key: str) -> bool:
        if key in self._held:
            return False
        self._held.add(key)
        return True

    def release(self, key: str) -> None:
        self._held.discard(key)

    def holds(self, key: str) -> bool:
        return key in self._held

    def confirm(self, key: str) -> defer.Deferred[bool]:
        """Whether the session still holds `key`, asked before deleting (here: known)."""
        return defer.succeed(self.holds(key))

    def keys(self) -> list[str]:
        return list(self._held)

    def __contains__(self, key: str) -> bool:
        return key in self._held


@implementer(IMailbox)
class POP3Mailbox:
    """One POP3 session's view of an INBOX (the avatar the realm hands out).

    IMailbox indexes are 0-based; the session uses the 1-based `entry()` API, whose
    errors tell out-of-range, deleted and gone apart.
    """

    loginDelay = 0
    messageExpiration = None
    quota: Any = None  # the store's QuotaTracker: messages removed at QUIT are counted off

    def __init__(self, address: str, folder: Any, entries: list[Entry],
                 locks: MailboxLocks, lock_key: str,
                 by_base: dict[str, Entry] | None = None) -> None:
        self.address = address
        self.folder = folder
        self.entries = entries
        self._locks = locks
        self._lock_key = lock_key
        self._by_base = by_base if by_base is not None else {e.base: e for e in entries}
        self._logged_out = False
        self.retrieved = 0
        folder.add_listener(self)

    # -- the session's API ------------------------------------------------------------------

    def entry(self, number: int) -> Entry:
        """The message with 1-based `number` that is still there to be read or deleted."""
        if not 1 <= number <= len(self.entries):
            raise NoSuchMessage(number)
        e = self.entries[number - 1]
        if e.deleted:
            raise MessageDeleted(number)
        return e

    def listing(self) -> Iterator[tuple[int, Entry]]:
        """(number, entry) of every message not marked deleted."""
        for n, e in enumerate(self.entries, 1):
            if not e.deleted:
                yield n, e

    def stat(self) -> tuple[int, int]:
        """(messages, octets) not marked deleted (RFC 1939 5 STAT)."""
        count = total = 0
        for e in self.entries:
            if not e.deleted:
                count += 1
                total += e.size
        return count, total

    def open(self, e: Entry) -> IO[bytes]:
        """Open a message for streaming (a quick open(2) in the reactor thread).

        MessageGone if it was expunged elsewhere; the Folder finds a file renamed by
        another process by its base name.
        """
        if e.gone:
            raise MessageGone(e.uid)
        info = self.folder.by_uid(e.uid)
        uid = e.uid
        if info is None or info.basename != e.base:
            uid = next((i.uid for i in self.folder.messages if i.basename == e.base), None)
            if uid is None:
                e.gone = True
                raise MessageGone(e.uid)
        try:
            return self.folder.open_message(uid)
        except (KeyError, FileNotFoundError):
            e.gone = True
            raise MessageGone(e.uid) from None

    def commit(self) -> defer.Deferred[tuple[int, int]]:
        """The UPDATE state (RFC 1939 6): remove the marked messages.

        Fires with (removed, not removed); a message already gone counts as removed.
        """
        wanted = {e.base for e in self.entries if e.deleted}
        if not wanted:
            return defer.succeed((0, 0))
        return self._locks.confirm(self._lock_key).addCallback(self._delete, wanted)

    def _delete(self, held: bool, wanted: set[str]) -> defer.Deferred[tuple[int, int]]:
        if not held:
            # Another node's session has the mailbox now (our lock went with this node's
            # database connection): it decides what is deleted.
            raise MailboxLockLost()
        uids = [i.uid for i in self.folder.messages if i.basename in wanted]
        already = len(wanted) - len(uids)
        if not uids:
            return defer.succeed((already, 0))
        counted = self.quota.expunging(self.folder, uids) if self.quota is not None else None
        d = self.folder.delete_messages(uids, origin=self)
        if counted is not None:
            d.addCallback(counted)

        def done(removed: list[int]) -> tuple[int, int]:
            done_uids = set(removed)
            left = [u for u in uids if u not in done_uids and self.folder.by_uid(u)]
            return len(wanted) - len(left), len(left)

        return d.addCallback(done)

    def logout(self) -> None:
        """Release the mailbox; called at QUIT and when the connection drops (idempotent)."""
        if self._logged_out:
            return
        self._logged_out = True
        self.folder.remove_listener(self)
        self._locks.release(self._lock_key)

    # -- twisted.mail.pop3.IMailbox ---------------------------------------------------------

    def _at(self, index: int) -> Entry:
        if not isinstance(index, int) or not 0 <= index < len(self.entries):
            raise ValueError(index)
        return self.entries[index]

    def listMessages(self, index: int | None = None) -> int | list[int]:
        if index is None:
            return [0 if e.deleted else e.size for e in self.entries]
        e = self._at(index)
        return 0 if e.deleted else e.size

    def getMessage(self, index: int) -> IO[bytes]:
        e = self._at(index)
        if e.deleted:
            raise ValueError(index)
        return self.open(e)

    def getUidl(self, index: int) -> bytes:
        e = self._at(index)
        if e.deleted:
            raise ValueError(index)
        return e.unique_id()

    def deleteMessage(self, index: int) -> None:
        self._at(index).deleted = True

    def undeleteMessages(self) -> None:
        for e in self.entries:
            e.deleted = False

    def sync(self) -> defer.Deferred[tuple[int, int]]:
        return self.commit()

    # -- folder listener ----------------------------------------------------------------------

    def messages_added(self, infos: list[Any]) -> None:
        """New mail waits for the next session (RFC 1939 5: the listing is fixed)."""

    def messages_expunged(self, uids: list[int]) -> None:
        gone = set(uids)
        for e in self.entries:
            if e.uid in gone and not e.gone:
                e.gone = True

    def flags_changed(self, infos: list[Any]) -> None:
        """POP3 has no flags."""

    def uidvalidity_changed(self, folder: Any) -> None:
        """Uids were reset on disk: find each snapshot entry again by its base name."""
        uids = {i.basename: i.uid for i in folder.messages}
        for e in self.entries:
            uid = uids.get(e.base)
            if uid is None:
                e.gone = True
            else:
                e.uid = uid


# -- opening a mailbox --------------------------------------------------------------------

def _inbox(store: Any, path: Path) -> Any:
    """The shared INBOX Folder of the Maildir at `path`."""
    return store.account(path).folder("INBOX")


def open_inbox(store: Any, path: Path, address: str,
               locks: MailboxLocks) -> defer.Deferred[POP3Mailbox]:
    """Lock the mailbox (MailboxInUse if another POP3 session has it), catch up with the
    disk and take the session's snapshot."""
    key = str(path)
    locked = locks.acquire(key)
    if isinstance(locked, defer.Deferred):
        return locked.addCallback(
            lambda got: _open_locked(store, path, address, locks, key, got))
    return _open_locked(store, path, address, locks, key, locked)


def _open_locked(store: Any, path: Path, address: str, locks: MailboxLocks, key: str,
                 locked: bool) -> defer.Deferred[POP3Mailbox]:
    if not locked:
        return defer.fail(MailboxInUse(address))
    try:
        folder = _inbox(store, path)
        d = folder.refresh()
    except Exception:
        locks.release(key)
        return defer.fail()
    own = own_name_pattern(store.hostname)
    # The listing of a large mailbox is made in the folder's thread, not in the reactor,
    # in the job that reads Dovecot's stored UIDLs and order.
    d.addCallback(lambda _: folder.uidlist_fields(dovecot.UIDLIST_KEYS, take_snapshot, own))

    def snapshot(taken: Snapshot) -> defer.Deferred[POP3Mailbox]:
        if taken.unusable:
            log.warn("{count} POP3 UIDLs in {path}/dovecot-uidlist are not usable "
                     "(RFC 1939 7, or repeated): those messages keep their own",
                     count=taken.unusable, path=str(folder.path))
        mailbox = POP3Mailbox(address, folder, taken.entries, locks, key, taken.by_base)
        mailbox.quota = getattr(store, "quota", None)
        if not taken.unknown:
            return defer.succeed(mailbox)
        return _measure(folder, mailbox, taken.unknown).addCallback(lambda _: mailbox)

    def failed(f: Any) -> Any:
        locks.release(key)
        return f

    return d.addCallback(snapshot).addErrback(failed)


def _measure(folder: Any, mailbox: POP3Mailbox, entries: list[Entry]) -> defer.Deferred[None]:
    """Count the CRLF octets of files nobody measured yet, in a thread; cache them."""
    paths = [(e, folder.message_path(e.uid)) for e in entries]

    def measure(items: Iterable[tuple[Entry, Path]]) -> list[tuple[Entry, int]]:
        out = []
        for e, p in items:
            try:
                out.append((e, crlf_size_of_path(p)))
            except OSError:
                pass  # renamed or removed meanwhile: keep the stored size
        return out

    def store(results: list[tuple[Entry, int]]) -> None:
        for e, size in results:
            e.size = size
            info = folder.by_uid(e.uid)
            if info is not None and info.basename == e.base:
                folder.cache_put(e.uid, VSIZE_KEY, str(size))

    def failed(f: Any) -> Any:
        mailbox.logout()
        return f

    return threads.deferToThread(measure, paths).addCallbacks(store, failed)
