"""ManageSieve (RFC 5804): users manage their Sieve scripts remotely over
[listen].managesieve (STARTTLS, then SASL PLAIN).  The scripts live in the user's Maildir
in Pigeonhole's layout (mailserver.sieve.scripts)."""

from mailserver.managesieve.service import ManageSieveFactory, build_factory

__all__ = ["ManageSieveFactory", "build_factory"]
