"""Apple Mail / iOS: an unsigned configuration profile with one mail account payload.

https://developer.apple.com/documentation/devicemanagement/mail.  The PayloadUUIDs are
derived from the host and the lower-cased address, so fetching the profile again yields
the same identifiers and installing it replaces the earlier copy instead of adding a
second account.  The password is not in the profile: the device asks for it.
"""

from __future__ import annotations

import plistlib
import uuid

from mailserver.autoconfig.address import Address
from mailserver.autoconfig.settings import ClientSettings

CONTENT_TYPE = b"application/x-apple-aspen-config"
# Fixed for this server software: changing it would change every profile's identity.
NAMESPACE = uuid.UUID("6f0c61a4-7a51-4d47-9c36-1d2a3b9b0e57")
_ACCOUNT_TYPES = {"imap": "EmailTypeIMAP", "pop3": "EmailTypePOP"}


class NotOffered(LookupError):
    """No incoming or no outgoing service is enabled, so no account can be described."""


def payload_uuid(settings: ClientSettings, address: Address, kind: str) -> str:
    """Stable per (host, address, payload kind); `kind` is "profile" or "mail"."""
    name = f"{kind}\0{settings.hostname.lower()}\0{str(address).lower()}"
    return str(uuid.uuid5(NAMESPACE, name)).upper()


def mobileconfig(settings: ClientSettings, address: Address) -> bytes:
    incoming = settings.first("imap", "pop3")
    outgoing = settings.first("smtp")
    if incoming is None or outgoing is None:
        raise NotOffered("no incoming or no outgoing mail service is enabled")
    login = str(address)
    name = settings.name_for(address.domain)
    identifier = ".".join(reversed(settings.hostname.lower().split(".")))
    profile_uuid = payload_uuid(settings, address, "profile")
    mail_uuid = payload_uuid(settings, address, "mail")
    account = {
        "EmailAccountDescription": name,
        "EmailAccountType": _ACCOUNT_TYPES[incoming.protocol],
        "EmailAddress": login,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": settings.hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": incoming.implicit_tls,
        "IncomingMailServerUsername": login,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": settings.hostname,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": outgoing.implicit_tls,
        "OutgoingMailServerUsername": login,
        "OutgoingPasswordSameAsIncomingPassword": True,
        "PayloadDescription": f"Mail account {login}",
        "PayloadDisplayName": f"{name} mail",
        "PayloadIdentifier": f"{identifier}.account.{mail_uuid}",
        "PayloadType": "com.apple.mail.managed",
        "PayloadUUID": mail_uuid,
        "PayloadVersion": 1,
        "PreventAppSheet": False,
        "PreventMove": False,
        "SMIMEEnabled": False,
    }
    profile = {
        "PayloadContent": [account],
        "PayloadDescription": f"Sets up the mail account {login} on {settings.hostname}.",
        "PayloadDisplayName": f"{name} mail",
        "PayloadIdentifier": f"{identifier}.mailprofile.{profile_uuid}",
        "PayloadOrganization": name,
        "PayloadRemovalDisallowed": False,
        "PayloadType": "Configuration",
        "PayloadUUID": profile_uuid,
        "PayloadVersion": 1,
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)
