"""The avatar an IMAP login gets from the cred realm: one user's folder tree.

The IMAP session works with the store's Folder API directly (UIDPLUS, MOVE, CONDSTORE,
streaming APPEND and partial FETCH need more than twisted.mail's IMailbox offers), so the
avatar is this small interface of our own rather than twisted.mail's IAccount.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer


class IIMAPAccount(Interface):
    """What an IMAP session needs of the logged-in user's mailboxes."""

    user = Attribute("the user's address")
    quota = Attribute("the user's storage quota in octets, or None")
    account = Attribute("the store's MailAccount (folders, subscriptions)")

    def folder(name: str) -> Any:
        """The shared Folder called `name`."""

    def list_folders() -> list[Any]:
        """Every folder (FolderEntry), INBOX first."""

    def loaded_folder(name: str) -> Any:
        """The Folder of `name` if it is in memory, else None (nothing is loaded)."""

    def create_folder(name: str, special_use: str | None = None) -> None:
        """Create a folder (and missing parents), with a special use (RFC 6154 3)."""

    def delete_folder(name: str) -> None:
        """Delete a folder."""

    def rename_folder(old: str, new: str) -> None:
        """Rename a folder and its children."""

    def subscriptions() -> list[str]:
        """Subscribed names."""

    def subscribe(name: str | bytes) -> bool:
        """Add a subscription."""

    def unsubscribe(name: str | bytes) -> bool:
        """Remove a subscription."""

    def measure_usage() -> defer.Deferred:
        """Deferred[int]: octets used by every folder (the store's shared usage)."""

    def cached_size() -> int:
        """The last known usage, for a quota check without the disk."""

    def reserve(octets: int) -> Callable[[], None]:
        """Hold octets a command checked against the quota until it has counted them."""

    def add_usage(octets: int, count: int = 1) -> None:
        """Count messages added (APPEND, COPY)."""

    def expunging(folder: Any) -> Callable[[list[int]], list[int]]:
        """Before an EXPUNGE of `folder`: the callback that counts off what it removed."""

    def refresh_usage() -> defer.Deferred:
        """Read the usage again if it is old (at login)."""

    def logout() -> None:
        """The session ended."""


@implementer(IIMAPAccount)
class IMAPAccount:
    """One logged-in user's folder tree."""

    def __init__(self, user: str, account: Any, quota: int | None = None) -> None:
        self.user = user
        self.account = account
        self.quota = quota

    # -- what the session uses ----------------------------------------------------------

    def folder(self, name: str) -> Any:
        return self.account.folder(name)

    def list_folders(self) -> list[Any]:
        return self.account.list_folders()

    def loaded_folder(self, name: str) -> Any:
        """The Folder of `name` if it is in memory (None: not loaded, or no such one)."""
        return self.account.loaded_folder(name)

    def create_folder(self, name: str, special_use: str | None = None) -> None:
        self.account.create_folder(name, special_use)

    def delete_folder(self, name: str) -> None:
        self.account.delete_folder(name)
        # Its messages go without a change line each: count the Maildir again.
        self._quota.recalculate_soon(self.account.path)

    def rename_folder(self, old: str, new: str) -> None:
        self.account.rename_folder(old, new)

    def subscriptions(self) -> list[str]:
        return self.account.subscriptions()

    # -- quota (RFC 2087, RFC 5530 OVERQUOTA): the usage every service shares ------------
    # (MaildirStore.quota over the Maildir's maildirsize), so IMAP, SMTP and the queue
    # agree, across sessions, processes and restarts.

    @property
    def _quota(self) -> Any:
        return self.account.store.quota

    def measure_usage(self) -> defer.Deferred:
        """Octets used (GETQUOTA): from memory when fresh, else read in a thread."""
        return self._quota.usage(self.account.path, self.quota).addCallback(lambda u: u.bytes)

    def cached_size(self) -> int:
        """Last known usage, for a quick quota check without touching the disk (an old
        one is read again in the background), with what commands under way hold."""
        usage = self._quota.peek(self.account.path)
        return (usage.bytes if usage is not None else 0) + self._quota.reserved(self.account.path)

    def reserve(self, octets: int) -> Callable[[], None]:
        """Hold `octets` an APPEND or COPY checked, until it has counted them (release)."""
        return self._quota.reserve(self.account.path, octets)

    def add_usage(self, octets: int, count: int = 1) -> None:
        self._quota.changed(self.account.path, octets, count)

    def expunging(self, folder: Any) -> Callable[[list[int]], list[int]]:
        return self._quota.expunging(folder)

    def refresh_usage(self) -> defer.Deferred:
        """Have the usage in memory for the first APPEND (at login), when a quota is set."""
        if self.quota is None:
            return defer.succeed(None)
        return self._quota.usage(self.account.path, self.quota).addErrback(lambda f: None)

    def logout(self) -> None:
        pass

    def subscribe(self, name: str | bytes) -> bool:
        self.account.subscribe(_text(name))
        return True

    def unsubscribe(self, name: str | bytes) -> bool:
        self.account.unsubscribe(_text(name))
        return True


def _text(name: str | bytes) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else name
