"""Outbound SMTP: MX routing, the client protocol, TLS policy, the relay itself."""
