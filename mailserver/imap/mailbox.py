"""The avatar an IMAP login gets from the cred realm: one user's folder tree.

The IMAP session works with the store's Folder API directly (UIDPLUS, MOVE, CONDSTORE,
streaming APPEND and partial FETCH need more than twisted.mail's IMailbox offers), so the
avatar is this small interface of our own rather than twisted.mail's IAccount.
"""

from __future__ import annotations

from typing import Any

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

    def create_folder(name: str) -> None:
        """Create a folder (and missing parents)."""

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
        """Deferred[int]: octets used by every folder, counted again."""

    def cached_size() -> int:
        """The last known usage, for a quota check without the disk."""

    def add_usage(octets: int) -> None:
        """Count octets added since the last measurement."""

    def refresh_usage() -> defer.Deferred:
        """Measure the usage again, in a thread."""

    def logout() -> None:
        """The session ended."""


@implementer(IIMAPAccount)
class IMAPAccount:
    """One logged-in user's folder tree."""

    def __init__(self, user: str, account: Any, quota: int | None = None) -> None:
        self.user = user
        self.account = account
        self.quota = quota
        self._size: int | None = None

    # -- what the session uses ----------------------------------------------------------

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

    def measure_usage(self) -> defer.Deferred:
        """Count the usage again: open folders from the reactor's state, the others by a
        directory walk in a thread (MailAccount.usage); also refreshes cached_size."""
        def measured(size: int) -> int:
            self._size = size
            return size
        return self.account.usage().addCallback(measured)

    def cached_size(self) -> int:
        """Last known usage, for a quick quota check without touching the disk."""
        return self._size or 0

    def add_usage(self, octets: int) -> None:
        if self._size is not None:
            self._size += octets

    def refresh_usage(self) -> defer.Deferred:
        """Recount the usage (at login and after removals) when a quota is set."""
        if self.quota is None:
            return defer.succeed(None)
        return self.measure_usage()

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
