"""A mail server for small organisations: SMTP (MX and submission), IMAP and POP3 over Maildir."""

__version__ = "0.1.0"
