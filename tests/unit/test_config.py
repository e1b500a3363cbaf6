"""Config validation: every bad value is an error that names its key."""

from pathlib import Path

import pytest

from mailserver.config import (DEFAULT_CONFIG, ConfigError, load_config, parse_config,
                               parse_duration, parse_size)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mailserver.toml"
    p.write_text(text)
    return p


def test_shipped_config_loads():
    config = load_config(DEFAULT_CONFIG)
    assert config.listen.smtp == "tcp:2525"
    assert config.state_dir == (DEFAULT_CONFIG.parent / ".." / "var").resolve()
    assert config.maildir_root == (DEFAULT_CONFIG.parent / ".." / "maildirs").resolve()


def test_production_config_parses_apart_from_certificates(tmp_path):
    text = (DEFAULT_CONFIG.parent / "mailserver.production.toml").read_text()
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.key == "tls.certificate"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "etc").mkdir()
    p = tmp_path / "etc" / "m.toml"
    p.write_text('[server]\nstate_dir = "../state"\n[storage]\nmaildir_root = "mail"\n')
    config = load_config(p)
    assert config.state_dir == tmp_path / "state"
    assert config.maildir_root == tmp_path / "etc" / "mail"


@pytest.mark.parametrize("text, key", [
    ("[limits]\nmax_recipientz = 5\n", "limits.max_recipientz"),
    ("[limits]\nmax_recipients = \"many\"\n", "limits.max_recipients"),
    ("[limits]\nmax_recipients = 0\n", "limits.max_recipients"),
    ("[limits]\nmax_recipients = true\n", "limits.max_recipients"),
    ("[limits]\nmax_message_size = \"huge\"\n", "limits.max_message_size"),
    ("[limits]\nidle_timeout = \"soon\"\n", "limits.idle_timeout"),
    ("[listen]\nsmtp = \"tcpp:25\"\n", "listen.smtp"),
    ("[listen]\nsmtp = 25\n", "listen.smtp"),
    ("[listen]\nsmtp = \"tcp:2525\"\nimap = \"tcp:2525\"\n", "listen.imap"),
    ("[server]\nhostname = \"not a host\"\n", "server.hostname"),
    ("[tls]\ncertificate = \"missing.pem\"\nprivate_key = \"missing.key\"\n", "tls.certificate"),
    ("[tls]\ncertificate = \"x.pem\"\n", "tls.private_key"),
    ("[auth]\nallow_plaintext_loopback = \"yes\"\n", "auth.allow_plaintext_loopback"),
    ("[nonsense]\na = 1\n", "nonsense"),
    ("limits = 3\n", "limits"),
    # each of these passed, then failed in the server or the tool with a traceback
    ("[limits]\nidle_timeout = nan\n", "limits.idle_timeout"),
    ("[limits]\nidle_timeout = inf\n", "limits.idle_timeout"),
    ("[queue]\nmax_age = nan\n", "queue.max_age"),
    ("[inbound]\ngreet_delay = nan\n", "inbound.greet_delay"),
    ("[limits]\nmax_message_size = \"" + "9" * 400 + "\"\n", "limits.max_message_size"),
    ("[limits]\nmax_message_size = 1.5\n", "limits.max_message_size"),
    ("[server]\nstate_dir = \"a\\u0000b\"\n", "server.state_dir"),
    ("[tls]\ncertificate = \"c\\u0000.pem\"\nprivate_key = \"k.pem\"\n", "tls.certificate"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.key == key
    assert key in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_empty_endpoint_disables_a_service(tmp_path):
    config = load_config(write(tmp_path, '[listen]\npop3 = ""\npop3s = ""\n'))
    assert "pop3" not in config.listen.enabled()
    assert "smtp" in config.listen.enabled()


def test_sizes_and_durations():
    assert parse_size("50M") == 50 * 1024 * 1024
    assert parse_size("1.5k") == 1536
    assert parse_size(10) == 10
    assert parse_duration("5m") == 300
    assert parse_duration("4h") == 14400
    assert parse_duration(2) == 2.0
    assert parse_size(2048.0) == 2048
    for bad in ("5 parsecs", "-3", "", "9" * 400, 1.5, "99999999T"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in (float("nan"), float("inf"), "9" * 400):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_duration("fortnight")


def test_limits_accept_units(tmp_path):
    config = parse_config({"limits": {"max_message_size": "10M", "idle_timeout": "2m"}},
                          tmp_path / "c.toml")
    assert config.limits.max_message_size == 10 * 1024 * 1024
    assert config.limits.idle_timeout == 120.0


@pytest.mark.parametrize("text, key", [
    ("[relay]\nsmarthost = \"smtp.example.net\"\n", "relay.smarthost"),
    ("[relay]\nsmarthost = \"bad host:25\"\n", "relay.smarthost"),
    ("[relay]\nsmarthost_tls = \"ssl\"\n", "relay.smarthost_tls"),
    ("[relay]\nsmarthost_username = \"u\"\n", "relay.smarthost_username"),
    ("[relay]\nsmarthost = \"h.example:587\"\nsmarthost_password = \"p\"\n",
     "relay.smarthost_username"),
    ("[relay]\nsmarthost = \"h.example:25\"\nsmarthost_tls = \"none\"\n"
     "smarthost_username = \"u\"\n", "relay.smarthost_tls"),
    ("[relay]\nsmarthost = \"h.example:587\"\nsmarthost_username = \"u\"\n"
     "smarthost_password_file = \"missing\"\n", "relay.smarthost_password_file"),
    ("[relay]\nport = 70000\n", "relay.port"),
    ("[relay]\nresolver = \"dns.example\"\n", "relay.resolver"),
    ("[relay]\ntls_required_domains = \"example.org\"\n", "relay.tls_required_domains"),
    ("[relay]\nca_file = \"missing.pem\"\n", "relay.ca_file"),
    ("[queue]\nretry_schedule = []\n", "queue.retry_schedule"),
    ("[queue]\nmax_age = 0\n", "queue.max_age"),
    ("[queue]\ndelay_warning = \"later\"\n", "queue.delay_warning"),
    ("[limits]\nmessages_per_hour = -1\n", "limits.messages_per_hour"),
    ("[limits]\nsubmission_max_recipients = 0\n", "limits.submission_max_recipients"),
])
def test_outbound_keys_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.key.startswith(key), e.value.key


def test_outbound_settings(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    config = load_config(write(tmp_path, """
[relay]
smarthost = "[2001:db8::25]:465"
smarthost_tls = "tls"
smarthost_username = "relay@example.org"
smarthost_password_file = "pw"
resolver = "127.0.0.1:5353"
tls_required_domains = ["Bank.Example"]
[queue]
retry_schedule = ["30s", "2m", 3600]
delay_warning = 0
"""))
    assert config.relay.smarthost_address == ("2001:db8::25", 465)
    assert config.relay.smarthost_password == "s3cret"
    assert "s3cret" not in repr(config.relay)
    assert config.relay.resolver_address == ("127.0.0.1", 5353)
    assert config.relay.tls_required_domains == ("bank.example",)
    assert config.queue.retry_schedule == (30.0, 120.0, 3600.0)
    assert config.queue.delay_warning == 0
    assert config.queue_dir == config.state_dir / "queue"


@pytest.mark.parametrize("text,key", [
    ('[inbound]\nspf = "yes"\n', "inbound.spf"),
    ('[inbound]\ntrusted_networks = ["10.0.0.0/33"]\n', "inbound.trusted_networks[0]"),
    ('[inbound]\ntrusted_networks = "127.0.0.1"\n', "inbound.trusted_networks"),
    ('[inbound]\nrspamd_url = "127.0.0.1:11333"\n', "inbound.rspamd_url"),
    ('[inbound]\nrspamd_failure = "drop"\n', "inbound.rspamd_failure"),
    ('[inbound]\nrspamd_timeout = "soon"\n', "inbound.rspamd_timeout"),
    ('[inbound]\ndnsbl = ["not a zone"]\n', "inbound.dnsbl[0]"),
    ('[inbound]\ngreet_delay = -1\n', "inbound.greet_delay"),
    ('[inbound]\njunk_folder = "INBOX"\n', "inbound.junk_folder"),
    ('[inbound]\njunk_folder = "../x"\n', "inbound.junk_folder"),
    ('[inbound]\njunk_folder = "Junk."\n', "inbound.junk_folder"),
    ('[inbound]\ngreet_delay = 31\n', "inbound.greet_delay"),
    ('[inbound]\nspf = false\n', "inbound.dmarc"),
    ('[inbound]\ndkim = false\n', "inbound.dmarc"),
    ('[inbound]\npsl_file = "missing.dat"\n', "inbound.psl_file"),
    ('[inbound]\ntrusted_arc_sealers = [1]\n', "inbound.trusted_arc_sealers[0]"),
    ('[inbound]\nbogus = 1\n', "inbound.bogus"),
    ('[limits]\nmax_rcpt_commands = 0\n', "limits.max_rcpt_commands"),
    ('[limits]\nmax_command_errors = "many"\n', "limits.max_command_errors"),
])
def test_inbound_keys_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.key == key


def test_inbound_settings(tmp_path):
    (tmp_path / "psl.dat").write_text("test\n")
    config = load_config(write(tmp_path, '[inbound]\ntrusted_networks = ["192.0.2.1", "2001:db8::/32"]\n'
                                         'rspamd_url = "http://127.0.0.1:11333/"\n'
                                         'greet_delay = "2s"\npsl_file = "psl.dat"\n'
                                         'trusted_arc_sealers = ["Lists.Example.ORG"]\n'))
    inbound = config.inbound
    assert inbound.trusted_networks == ("192.0.2.1/32", "2001:db8::/32")
    assert inbound.rspamd_url == "http://127.0.0.1:11333"
    assert inbound.greet_delay == 2.0
    assert inbound.psl_file == str(tmp_path / "psl.dat")
    assert inbound.trusted_arc_sealers == ("lists.example.org",)
    assert (inbound.spf, inbound.dkim, inbound.dmarc, inbound.dmarc_enforce, inbound.arc) == \
        (True, True, True, True, True)


# -- [sieve] and [filters] ---------------------------------------------------------------

def test_sieve_global_scripts_resolved_and_must_exist(tmp_path):
    from mailserver.config import ConfigError, parse_config
    script = tmp_path / "spam.sieve"
    script.write_text('require "fileinto"; if header :is "X-Spam-Flag" "YES" { fileinto "Junk"; }')
    config = parse_config({"sieve": {"before": ["spam.sieve"], "max_script_size": "32K"}},
                          tmp_path / "mailserver.toml")
    assert config.sieve.before == (str(script.resolve()),)
    assert config.sieve.max_script_size == 32 * 1024
    with pytest.raises(ConfigError, match=r"sieve.after\[0\]: file not found"):
        parse_config({"sieve": {"after": ["missing.sieve"]}}, tmp_path / "mailserver.toml")
    with pytest.raises(ConfigError, match="sieve.global_dir"):
        parse_config({"sieve": {"global_dir": "nowhere"}}, tmp_path / "mailserver.toml")


def test_filters_plugin_names_checked(tmp_path):
    from mailserver.config import ConfigError, parse_config
    config = parse_config({"filters": {"plugins": ["tagger"], "timeout": "5s"}},
                          tmp_path / "mailserver.toml")
    assert config.filters.plugins == ("tagger",) and config.filters.timeout == 5.0
    with pytest.raises(ConfigError, match="filters.plugins"):
        parse_config({"filters": {"plugins": ["../evil"]}}, tmp_path / "mailserver.toml")
    with pytest.raises(ConfigError, match="sieve.unknown"):
        parse_config({"sieve": {"unknown": 1}}, tmp_path / "mailserver.toml")


def test_loopback_includes_ipv4_mapped_addresses():
    """A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.1."""
    from mailserver.config import is_loopback

    for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "fe80::1%lo"):
        assert is_loopback(host) is (host != "fe80::1%lo"), host
    for host in ("192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "localhost", ""):
        assert not is_loopback(host), host
