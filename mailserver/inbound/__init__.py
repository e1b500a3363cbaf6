"""Checks of incoming mail on the MX: SPF, DKIM, DMARC, ARC, blocklists, spam filter."""
