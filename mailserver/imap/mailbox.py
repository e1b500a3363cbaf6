"""twisted.mail's IAccount and IMailbox over the Maildir store.

The IMAP session works with the store's richer Folder API directly (UIDPLUS, MOVE,
streaming APPEND and partial FETCH need more than IMailbox offers); these adapters are the
avatar the cred realm hands out and keep the store usable by any code written against
twisted.mail's interfaces.
"""

from __future__ import annotations

import io
import time
from typing import Any

from twisted.internet import defer, threads
from twisted.mail import imap4
from zope.interface import implementer

from mailserver.maildir import NoSuchFolder, encode_folder_name


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class IMAPAccount:
    """One logged-in user's folder tree."""

    def __init__(self, user: str, account: Any, quota: int | None = None) -> None:
        self.user = user
        self.account = account
        self.quota = quota
        self._size: int | None = None

    # -- the richer API the session uses ----------------------------------------------------

    def folder(self, name: str) -> Any:
        return self.account.folder(name)

    def list_folders(self) -> list[Any]:
        return self.account.list_folders()

    def create_folder(self, name: str) -> None:
        self.account.create_folder(name)

    def delete_folder(self, name: str) -> None:
        self.account.delete_folder(name)

    def rename_folder(self, old: str, new: str) -> None:
        self.account.rename_folder(old, new)

    def subscriptions(self) -> list[str]:
        return self.account.subscriptions()

    def total_size(self) -> int:
        """Blocking walk of every folder; call in a thread. Also refreshes cached_size."""
        self._size = self.account.total_size()
        return self._size

    def cached_size(self) -> int:
        """Last known usage, for a quick quota check without touching the disk."""
        return self._size or 0

    def add_usage(self, octets: int) -> None:
        if self._size is not None:
            self._size += octets

    def refresh_usage(self) -> defer.Deferred:
        """Recount the usage in a thread (at login and after removals) when a quota is set."""
        if self.quota is None:
            return defer.succeed(None)
        return threads.deferToThread(self.total_size)

    def logout(self) -> None:
        pass

    # -- twisted.mail.imap4.IAccount -------------------------------------------------------

    def addMailbox(self, name: str, mbox: Any = None) -> bool:
        self.account.create_folder(_text(name))
        return True

    def create(self, pathspec: str) -> bool:
        self.account.create_folder(_text(pathspec).rstrip("."))
        return True

    def select(self, name: str, rw: bool = True) -> "IMAPMailbox | None":
        try:
            return IMAPMailbox(self.account.folder(_text(name)), rw)
        except NoSuchFolder:
            return None

    def delete(self, name: str) -> bool:
        self.account.delete_folder(_text(name))
        return True

    def rename(self, oldname: str, newname: str) -> bool:
        self.account.rename_folder(_text(oldname), _text(newname))
        return True

    def isSubscribed(self, name: str) -> bool:
        return _text(name) in self.account.subscriptions()

    def subscribe(self, name: str | bytes) -> bool:
        self.account.subscribe(_text(name))
        return True

    def unsubscribe(self, name: str | bytes) -> bool:
        self.account.unsubscribe(_text(name))
        return True

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, "IMAPMailbox"]]:
        import fnmatch

        pattern = (_text(ref) + _text(wildcard)).replace("%", "*")
        return [(e.name, IMAPMailbox(self.account.folder(e.name), True))
                for e in self.account.list_folders()
                if "\\Noselect" not in e.attributes and fnmatch.fnmatchcase(e.name, pattern)]

    # -- INamespacePresenter ----------------------------------------------------------------

    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", "."]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None


def _text(name: str | bytes) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else name


@implementer(imap4.IMailbox)
class IMAPMailbox:
    """twisted.mail's IMailbox over one shared Folder."""

    def __init__(self, folder: Any, rw: bool = True) -> None:
        self.folder = folder
        self.rw = rw
        self._listeners: list[Any] = []

    def getFlags(self) -> list[str]:
        return ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"] + list(
            self.folder.keywords)

    def getHierarchicalDelimiter(self) -> str:
        return "."

    def getUIDValidity(self) -> int:
        return self.folder.uidvalidity

    def getUIDNext(self) -> int:
        return self.folder.uidnext

    def getUID(self, message: int) -> int:
        return self.folder.messages[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.folder.messages)

    def getRecentCount(self) -> int:
        return self.folder.recent_count

    def getUnseenCount(self) -> int:
        return self.folder.unseen_count

    def isWriteable(self) -> bool:
        return self.rw

    def destroy(self) -> None:
        raise imap4.MailboxException("use DELETE on the account")

    def requestStatus(self, names: list[str]) -> dict[str, int]:
        values = {"MESSAGES": self.getMessageCount, "RECENT": self.getRecentCount,
                  "UIDNEXT": self.getUIDNext, "UIDVALIDITY": self.getUIDValidity,
                  "UNSEEN": self.getUnseenCount}
        return {n: values[n.upper()]() for n in names if n.upper() in values}

    def addListener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        self._listeners.remove(listener)

    def addMessage(self, message: Any, flags: Any = (), date: Any = None) -> defer.Deferred:
        when = None
        if date:
            from email.utils import parsedate_tz, mktime_tz

            parsed = parsedate_tz(_text(date))
            when = float(mktime_tz(parsed)) if parsed else None
        writer = self.folder.begin_append({_text(f) for f in flags}, when)
        message.seek(0)
        while chunk := message.read(65536):
            writer.write(chunk)
        return writer.commit().addCallback(lambda info: info.uid)

    def expunge(self) -> defer.Deferred:
        uids = {m.uid: i + 1 for i, m in enumerate(self.folder.messages)}
        return self.folder.expunge(None).addCallback(lambda gone: [uids[u] for u in gone])

    def fetch(self, messages: Any, uid: bool) -> list[tuple[int, "StoredMessage"]]:
        msgs = self.folder.messages
        out = []
        for i, m in enumerate(msgs):
            n = m.uid if uid else i + 1
            if n in messages:
                out.append((n, StoredMessage(self.folder, m)))
        return out

    def store(self, messages: Any, flags: Any, mode: int, uid: bool) -> defer.Deferred:
        msgs = self.folder.messages
        uids = [m.uid for i, m in enumerate(msgs) if (m.uid if uid else i + 1) in messages]
        how = {1: "add", -1: "remove", 0: "set"}[mode]
        seq = {m.uid: i + 1 for i, m in enumerate(msgs)}
        return self.folder.store_flags(uids, {_text(f) for f in flags}, how).addCallback(
            lambda changed: {(c.uid if uid else seq[c.uid]): sorted(c.flags) for c in changed})


@implementer(imap4.IMessage)
class StoredMessage:
    """A message file seen through twisted.mail's IMessage."""

    def __init__(self, folder: Any, info: Any) -> None:
        self.folder = folder
        self.info = info

    def _read(self) -> bytes:
        with self.folder.open_message(self.info.uid) as f:
            return f.read()

    def getUID(self) -> int:
        return self.info.uid

    def getFlags(self) -> list[str]:
        return sorted(self.info.flags)

    def getInternalDate(self) -> str:
        return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(self.info.internaldate))

    def getHeaders(self, negate: bool, *names: str) -> dict[str, str]:
        import email.parser

        msg = email.parser.BytesHeaderParser().parsebytes(self._read())
        wanted = {n.lower() for n in names}
        return {k.lower(): v for k, v in msg.items()
                if not names or ((k.lower() in wanted) != negate)}

    def getBodyFile(self) -> io.BytesIO:
        data = self._read()
        i = data.find(b"\r\n\r\n")
        return io.BytesIO(data[i + 4:] if i >= 0 else b"")

    def getSize(self) -> int:
        return self.info.size

    def isMultipart(self) -> bool:
        return False

    def getSubPart(self, part: int) -> Any:
        raise TypeError("not multipart")


__all__ = ["IMAPAccount", "IMAPMailbox", "StoredMessage", "encode_folder_name"]
