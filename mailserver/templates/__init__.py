"""Files `mailserver-admin setup` installs, shipped inside the package (an installed
package has no etc/ beside it).  mailserver.production.toml is a copy of the checkout's
etc/mailserver.production.toml, which stays the one to edit: copy it here after a change
(tests/unit/test_setup_cmd.py fails while the two differ)."""
