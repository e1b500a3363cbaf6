"""DKIM (RFC 6376): per-domain keys in state_dir/dkim, and signing of submitted mail."""
