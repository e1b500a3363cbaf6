"""POP3 (RFC 1939) over the INBOX of each user's Maildir: [listen].pop3 with STLS and
[listen].pop3s with implicit TLS (service.py wraps that one in TLS)."""
