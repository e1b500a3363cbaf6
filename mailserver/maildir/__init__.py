"""Maildir++ storage, Dovecot-compatible: durable delivery and the on-disk names.

IMAP folder, uid and flag handling build on these pieces.
"""

from mailserver.maildir.delivery import Delivery, DeliveryResult
from mailserver.maildir.names import (
    SEPARATOR,
    decode_folder_name,
    encode_folder_name,
    folder_dir,
    folder_dir_name,
    folder_name_from_dir,
    format_subscriptions,
    parse_subscriptions,
)
from mailserver.maildir.store import DEFAULT_FOLDERS, MaildirStore

__all__ = [
    "DEFAULT_FOLDERS",
    "Delivery",
    "DeliveryResult",
    "MaildirStore",
    "SEPARATOR",
    "decode_folder_name",
    "encode_folder_name",
    "folder_dir",
    "folder_dir_name",
    "folder_name_from_dir",
    "format_subscriptions",
    "parse_subscriptions",
]
