"""SMTP: the MX service (inbound for local domains) and, built on the same session, submission."""
