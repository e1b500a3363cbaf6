"""IMAP4rev1 (RFC 3501) over the Maildir store, with the extensions desktop clients use."""
