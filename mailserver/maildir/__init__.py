"""Maildir++ storage, Dovecot-compatible: durable delivery and the on-disk names.

IMAP folder, uid and flag handling build on these pieces.
"""

from mailserver.maildir.account import FolderEntry, MailAccount
from mailserver.maildir.delivery import Delivery, DeliveryResult
from mailserver.maildir.folder import (
    AppendWriter,
    Folder,
    FolderBusy,
    FolderChanges,
    FolderError,
    FolderExists,
    FolderListener,
    FolderNotEmpty,
    InvalidFlag,
    InvalidFolderName,
    MessageInfo,
    NoSuchFolder,
    TooManyKeywords,
)
from mailserver.maildir.index import FolderIndex
from mailserver.maildir.keywords import Keywords
from mailserver.maildir.names import (
    SEPARATOR,
    decode_folder_name,
    encode_folder_name,
    folder_dir,
    folder_dir_name,
    folder_name_from_dir,
    format_subscriptions,
    is_inbox,
    parse_subscriptions,
)
from mailserver.maildir.store import DEFAULT_FOLDERS, MaildirStore
from mailserver.maildir.uidlist import UidList

__all__ = [
    "AppendWriter",
    "DEFAULT_FOLDERS",
    "Delivery",
    "DeliveryResult",
    "Folder",
    "FolderBusy",
    "FolderChanges",
    "FolderEntry",
    "FolderError",
    "FolderExists",
    "FolderIndex",
    "FolderListener",
    "FolderNotEmpty",
    "InvalidFlag",
    "InvalidFolderName",
    "Keywords",
    "MailAccount",
    "MaildirStore",
    "MessageInfo",
    "NoSuchFolder",
    "TooManyKeywords",
    "UidList",
    "SEPARATOR",
    "decode_folder_name",
    "encode_folder_name",
    "folder_dir",
    "folder_dir_name",
    "folder_name_from_dir",
    "format_subscriptions",
    "is_inbox",
    "parse_subscriptions",
]
