"""mailserver-admin through main(argv), against a temporary config and state directory."""

import functools
import os
import textwrap

import pytest

from mailserver import admin
from mailserver.accounts import Accounts
from mailserver.passwords import verify_password

try:
    from mailserver.maildir import MaildirStore  # noqa: F401
    HAVE_MAILDIR = True
except ImportError:
    HAVE_MAILDIR = False


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "etc" / "mailserver.toml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent("""\
        [server]
        hostname = "mail.example.test"
        state_dir = "../var"
        [storage]
        maildir_root = "../maildirs"
        [listen]
        pop3 = ""
        pop3s = ""
    """))
    return path


@pytest.fixture
def run(config, run):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr): conftest's runner with this
    module's config."""
    return functools.partial(run, config)


def accounts_of(config):
    return Accounts(config.parent.parent / "var" / "accounts.sqlite3")


def assert_error(result, text):
    code, out, err = result
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mailserver-admin: error: ")
    assert text in lines[0]


# -- check -------------------------------------------------------------------------------

def test_check_prints_listeners_and_paths(run, config):
    code, out, err = run("check")
    assert code == 0, err
    root = config.parent.parent
    assert "smtp  tcp:2525  (MX, STARTTLS)" in out
    assert "submission  tcp:2587  (submission, STARTTLS, AUTH required)" in out
    assert "submissions  tcp:2465  (submission, implicit TLS, AUTH required)" in out
    assert "imap  tcp:2143  (IMAP, STARTTLS)" in out
    assert "imaps  tcp:2993  (IMAP, implicit TLS)" in out
    assert "pop3" not in out
    assert "mail.example.test" in out
    assert str(root / "var") in out
    assert str(root / "maildirs") in out
    assert "self-signed" in out
    assert "not created yet" in out
    assert "inbound       spf, dkim, dmarc, arc, greet delay 1s; skipped for 127.0.0.0/8" in out
    assert not (root / "var").exists()  # check creates nothing
    run("domain", "add", "example.org")
    code, out, err = run("check")
    assert "1 domains, 0 users, 0 aliases" in out


def test_check_with_configured_certificate(tmp_path, capsys):
    from mailserver.tls import generate_self_signed

    generate_self_signed("mail.example.test", tmp_path / "cert.pem", tmp_path / "key.pem")
    path = tmp_path / "m.toml"
    path.write_text('[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'
                    '[auth]\nallow_plaintext_loopback = true\n'
                    '[inbound]\ndmarc_enforce = false\narc = false\ndnsbl = ["zen.example"]\n'
                    'rspamd_url = "http://127.0.0.1:11333/"\ntrusted_networks = []\n')
    assert admin.main(["--config", str(path), "check"]) == 0
    out, err = capsys.readouterr()
    assert ("spf, dkim, dmarc (not enforced), rspamd http://127.0.0.1:11333, dnsbl zen.example,"
            " greet delay 1s; skipped for none") in out
    assert f"certificate {tmp_path / 'cert.pem'}, key {tmp_path / 'key.pem'}" in out
    assert "allow_plaintext_loopback" in err


@pytest.mark.parametrize("case", ["junk certificate", "key of another", "state_dir file",
                                  "maildir_root file", "port"])
def test_check_refuses_what_the_server_would_refuse(tmp_path, capsys, case):
    """check said "configuration OK" where the server then refused to start."""
    from mailserver.tls import generate_self_signed

    generate_self_signed("mail.example.test", tmp_path / "cert.pem", tmp_path / "key.pem")
    generate_self_signed("other.example.test", tmp_path / "cert2.pem", tmp_path / "key2.pem")
    (tmp_path / "junk.pem").write_text("x")
    (tmp_path / "afile").write_text("x")
    text = {"junk certificate": '[tls]\ncertificate = "junk.pem"\nprivate_key = "key.pem"\n',
            "key of another": '[tls]\ncertificate = "cert.pem"\nprivate_key = "key2.pem"\n',
            "state_dir file": '[server]\nstate_dir = "afile"\n',
            "maildir_root file": '[storage]\nmaildir_root = "afile/mail"\n',
            "port": '[listen]\nsmtp = "tcp:99999"\n'}[case]
    path = tmp_path / "m.toml"
    path.write_text(text + '[listen]\nsmtp = "tcp:0"\n' * (case != "port"))
    code = admin.main(["--config", str(path), "check"])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "configuration OK" not in out
    assert {"junk certificate": "tls.certificate", "key of another": "does not belong",
            "state_dir file": "not a directory", "maildir_root file": "not a directory",
            "port": "not 0-65535"}[case] in err


def test_check_of_a_key_this_user_cannot_read_is_a_warning(tmp_path, capsys, monkeypatch):
    """Run as a user who may not read the server's key (/etc/letsencrypt/live is 0700):
    the server's to judge, not a start problem of check's."""
    from mailserver.tls import generate_self_signed

    generate_self_signed("mail.example.test", tmp_path / "cert.pem", tmp_path / "key.pem")
    path = tmp_path / "m.toml"
    path.write_text('[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n')
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if str(p).endswith("key.pem") else real_access(p, mode, **kw)))
    from mailserver.config import load_config

    assert admin._start_problems(load_config(path)) == []
    assert "not checked" in capsys.readouterr().err


def test_config_error_names_the_key(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[limits]\nmax_recipients = 0\n")
    assert_error((admin.main(["--config", str(path), "check"]), *capsys.readouterr()),
                 "limits.max_recipients")
    path.write_text("[server]\nbogus = 1\n")
    assert_error((admin.main(["--config", str(path), "domain", "list"]), *capsys.readouterr()),
                 "server.bogus: unknown key")


def test_missing_config_file(tmp_path, capsys):
    code = admin.main(["--config", str(tmp_path / "nope.toml"), "check"])
    assert_error((code, *capsys.readouterr()), "config file not found")


def test_default_config_is_used_without_option(config, monkeypatch, capsys):
    # etc/mailserver.toml in the working directory, as in a checkout or an install dir.
    monkeypatch.chdir(config.parent.parent)
    assert admin.main(["check"]) == 0
    assert "mail.example.test" in capsys.readouterr().out


def test_config_option_after_the_command(config, capsys):
    assert admin.main(["domain", "list", "--config", str(config)]) == 0


# -- usage -------------------------------------------------------------------------------

def test_usage_errors_are_one_line_and_exit_1(run):
    assert_error(run(), "required")
    assert_error(run("frobnicate"), "invalid choice")
    assert_error(run("domain"), "required")
    assert_error(run("domain", "add"), "required")
    assert_error(run("user", "add", "a@example.org", "--bogus"), "unrecognized")


def test_help_exits_0(run):
    code, out, err = run("--help")
    assert code == 0
    assert "domain" in out and "user" in out


# -- domains -----------------------------------------------------------------------------

def test_domain_commands(run):
    code, out, _ = run("domain", "add", "Example.ORG")
    assert code == 0 and out.startswith("domain example.org added\nDKIM key generated"), out
    assert run("domain", "add", "bücher.example")[0] == 0
    assert run("domain", "list")[1] == "example.org\nxn--bcher-kva.example\n"
    assert run("domain", "del", "xn--bcher-kva.example")[0] == 0
    assert run("domain", "list")[1] == "example.org\n"
    assert_error(run("domain", "add", "example.org"), "already exists")
    assert_error(run("domain", "add", "bad domain"), "bad domain")
    assert_error(run("domain", "del", "example.net"), "no such domain")
    run("user", "add", "a@example.org", "--password-stdin", stdin="pw\n")
    assert_error(run("domain", "del", "example.org"), "not empty")


# -- users -------------------------------------------------------------------------------

def test_user_add_with_password_stdin(run, config):
    run("domain", "add", "example.org")
    code, out, err = run("user", "add", "Alice@Example.org", "--password-stdin", "--quota", "1G",
                         stdin="s3cret pass\nignored second line\n")
    assert code == 0, err
    assert out == "user alice@example.org added\n"
    with accounts_of(config) as accounts:
        user = accounts.get_user("alice@example.org")
    assert user.quota == 1024 ** 3
    assert user.password_hash.startswith("$argon2id$")
    assert verify_password(user.password_hash, "s3cret pass")
    if HAVE_MAILDIR:
        maildir = config.parent.parent / "maildirs" / "example.org" / "alice"
        for sub in ("cur", "new", "tmp"):
            assert (maildir / sub).is_dir()
        for folder in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
            assert (maildir / f".{folder}").is_dir()


def test_user_add_strips_crlf_from_stdin(run, config):
    run("domain", "add", "example.org")
    assert run("user", "add", "a@example.org", "--password-stdin", stdin="pw\r\n")[0] == 0
    with accounts_of(config) as accounts:
        assert verify_password(accounts.get_user("a@example.org").password_hash, "pw")


def test_user_add_prompts_twice(run, config, monkeypatch):
    run("domain", "add", "example.org")
    answers = iter(["typed", "typed"])
    prompts = []
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or next(answers))
    assert run("user", "add", "bob@example.org")[0] == 0
    assert len(prompts) == 2
    with accounts_of(config) as accounts:
        assert verify_password(accounts.get_user("bob@example.org").password_hash, "typed")
    answers = iter(["one", "two"])
    assert_error(run("user", "add", "carol@example.org"), "do not match")
    answers = iter(["", ""])
    assert_error(run("user", "add", "carol@example.org"), "empty password")
    with accounts_of(config) as accounts:
        assert accounts.get_user("carol@example.org") is None


def test_user_add_errors(run):
    run("domain", "add", "example.org")
    assert_error(run("user", "add", "a@example.com", "--password-stdin", stdin="pw\n"),
                 "no such domain: example.com")
    assert_error(run("user", "add", "a%b@example.org", "--password-stdin", stdin="pw\n"),
                 "bad address")
    assert_error(run("user", "add", "a/b@example.org", "--password-stdin", stdin="pw\n"),
                 "a/b@example.org cannot have a Maildir")
    assert_error(run("user", "add", "a@example.org", "--password-stdin", stdin="\n"),
                 "empty password")
    assert_error(run("user", "add", "a@example.org", "--password-stdin", stdin=""),
                 "empty password")
    assert_error(run("user", "add", "a@example.org", "--password-stdin", "--quota", "lots",
                     stdin="pw\n"), "--quota")
    for size in ("0", "0.5", "100", "99999999999999999999T"):   # none, under 1K, too large
        assert_error(run("user", "add", "q@example.org", "--password-stdin", "--quota", size,
                         stdin="pw\n"), f"--quota {size}: a quota is from 1K to 8388607T")
    assert run("user", "add", "a@example.org", "--password-stdin", stdin="pw\n")[0] == 0
    assert_error(run("user", "add", "A@example.org", "--password-stdin", stdin="pw\n"),
                 "already exists")


def test_user_passwd(run, config):
    run("domain", "add", "example.org")
    run("user", "add", "a@example.org", "--password-stdin", stdin="old\n")
    code, out, err = run("user", "passwd", "A@example.org", "--password-stdin", stdin="new\n")
    assert code == 0, err
    with accounts_of(config) as accounts:
        stored = accounts.get_user("a@example.org").password_hash
    assert verify_password(stored, "new") and not verify_password(stored, "old")
    assert_error(run("user", "passwd", "b@example.org", "--password-stdin", stdin="x\n"),
                 "no such user")
    assert_error(run("user", "passwd", "a@example.org", "--password-stdin", stdin="\n"),
                 "empty password")


def test_user_del_and_list(run, config):
    run("domain", "add", "example.org")
    run("domain", "add", "example.net")
    run("user", "add", "a@example.org", "--password-stdin", "--quota", "10M", stdin="pw\n")
    run("user", "add", "b@example.net", "--password-stdin", stdin="pw\n")
    assert run("user", "list")[1] == (
        "b@example.net\na@example.org  quota=10485760  used=0 (0%)\n")
    # Usage as the server's maildirsize says (Maildir++ quota: limit line, then deltas).
    home = config.parent.parent / "maildirs" / "example.org" / "a"
    (home / "maildirsize").write_text("10485760S\n5242880 3\n")
    assert run("user", "list", "example.org")[1] == (
        "a@example.org  quota=10485760  used=5242880 (50%)\n")
    assert run("user", "list", "example.net")[1] == "b@example.net\n"
    assert_error(run("user", "list", "example.com"), "no such domain")
    code, out, err = run("user", "del", "A@example.org")
    assert code == 0
    assert out.startswith("user a@example.org deleted (mail kept in ")
    assert run("user", "list")[1] == "b@example.net\n"
    assert_error(run("user", "del", "a@example.org"), "no such user")


def test_user_del_names_the_aliases_left_pointing_at_nobody(run, config):
    run("domain", "add", "example.org")
    for user in ("a", "b"):
        run("user", "add", f"{user}@example.org", "--password-stdin", stdin="pw\n")
    run("alias", "add", "sales@example.org", "A@example.org,b@example.org")
    run("alias", "add", "@example.org", "a@example.org")
    run("alias", "add", "help@example.org", "b@example.org")
    code, out, err = run("user", "del", "a@example.org")
    assert code == 0 and out.startswith("user a@example.org deleted")
    assert "warning: 2 alias(es) still name a@example.org" in err
    assert "@example.org, sales@example.org" in err and "help@" not in err
    code, out, err = run("user", "del", "b@example.org")
    assert code == 0 and "sales@example.org" in err and "help@example.org" in err
    run("user", "add", "c@example.org", "--password-stdin", stdin="pw\n")
    code, out, err = run("user", "del", "c@example.org")
    assert code == 0 and err == ""


def test_user_import_dovecot_passwd_file(run, config, tmp_path):
    run("domain", "add", "example.org")
    run("user", "add", "exists@example.org", "--password-stdin", stdin="pw\n")
    sha512 = ("$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTL"
              "iBFdcbYEdFCoEOfaS35inz1")
    passwd = tmp_path / "passwd"
    passwd.write_text(textwrap.dedent(f"""\
        # Dovecot passwd-file
        alice@example.org:{{SHA512-CRYPT}}{sha512}:1000:1000::/home/alice::userdb_quota_rule=*:storage=2G

        Bob@Example.NET:{{PLAIN}}bobpw
        carol@example.org:{{CRYPT}}{sha512}:::
        exists@example.org:{{PLAIN}}other
        not-an-address:{{PLAIN}}x
        nopass@example.org
        empty@example.org::1000
        dave@example.org:{{SSHA}}abcdef
    """))
    code, out, err = run("user", "import", str(passwd))
    assert code == 0, err
    assert "domain example.net added" in out
    assert out.strip().endswith("imported 4 users, skipped 4")
    assert "exists@example.org already exists; skipped" in err
    assert "not-an-address" in err
    assert "nopass@example.org has no password" in err
    assert "empty@example.org has no password" in err
    assert "dave@example.org: unsupported password scheme" in err
    with accounts_of(config) as accounts:
        alice = accounts.get_user("alice@example.org")
        assert alice.password_hash == "{SHA512-CRYPT}" + sha512
        assert alice.quota == 2 * 1024 ** 3
        assert verify_password(alice.password_hash, "Hello world!")
        assert verify_password(accounts.get_user("bob@example.net").password_hash, "bobpw")
        assert verify_password(accounts.get_user("carol@example.org").password_hash,
                               "Hello world!")
        assert not verify_password(accounts.get_user("exists@example.org").password_hash,
                                   "other")
        assert accounts.get_user("dave@example.org") is not None
    if HAVE_MAILDIR:
        assert (config.parent.parent / "maildirs" / "example.net" / "bob" / "new").is_dir()


def test_user_import_quota_out_of_range_is_ignored_with_a_warning(run, config, tmp_path):
    # 99999999T made a traceback (too large for SQLite) and left a Maildir with no user
    run("domain", "add", "example.org")
    passwd = tmp_path / "passwd"
    passwd.write_text("big@example.org:{PLAIN}pw::::::userdb_quota_rule=*:storage=99999999T\n"
                      "tiny@example.org:{PLAIN}pw::::::userdb_quota_rule=*:storage=1\n")
    code, out, err = run("user", "import", str(passwd))
    assert code == 0, err
    assert "imported 2 users" in out
    assert err.count("ignored") == 2
    with accounts_of(config) as accounts:
        assert accounts.get_user("big@example.org").quota is None
        assert accounts.get_user("tiny@example.org").quota is None


def test_a_password_that_is_no_utf8_is_one_error_line(run, monkeypatch):
    import io

    run("domain", "add", "example.org")
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\n"), encoding="utf-8",
                             errors="surrogateescape")
    monkeypatch.setattr("sys.stdin", stdin)
    assert_error(run("user", "add", "a@example.org", "--password-stdin"), "not valid UTF-8")


def test_user_import_missing_file(run, tmp_path):
    assert_error(run("user", "import", str(tmp_path / "nope")), "nope")


# -- aliases -----------------------------------------------------------------------------

def test_alias_commands(run, config):
    run("domain", "add", "example.org")
    run("user", "add", "a@example.org", "--password-stdin", stdin="pw\n")
    code, out, err = run("alias", "add", "Sales@Example.org", "a@example.org, b@remote.test")
    assert code == 0, err
    assert out == "alias sales@example.org -> a@example.org, b@remote.test\n"
    assert run("alias", "add", "@Example.org", "a@example.org")[1] == (
        "alias @example.org -> a@example.org\n")
    assert run("alias", "list")[1] == ("@example.org -> a@example.org\n"
                                       "sales@example.org -> a@example.org, b@remote.test\n")
    with accounts_of(config) as accounts:
        assert accounts.resolve("sales@example.org").remote == ("b@remote.test",)
        assert accounts.resolve("anyone@example.org").kind == "ok"
    assert run("alias", "del", "SALES@example.org")[1] == "alias sales@example.org deleted\n"
    assert run("alias", "list")[1] == "@example.org -> a@example.org\n"
    assert_error(run("alias", "del", "sales@example.org"), "no such alias")
    assert_error(run("alias", "add", "x@example.com", "a@example.org"), "no such domain")
    assert_error(run("alias", "add", "x@example.org", ","), "no alias target")
    assert_error(run("alias", "add", "x@example.org", "a%b@example.org"), "bad alias target")
    assert_error(run("alias", "add", "x y@example.org", "a@example.org"), "bad address")


# -- queue and DNS -------------------------------------------------------------------------

def test_queue_commands_on_an_empty_queue(run):
    assert run("queue", "list")[1] == "0 messages in the queue\n"
    assert "0 queued messages" in run("queue", "flush")[1]
    assert_error(run("queue", "delete", "ABC123"), "no such queued message")
    assert_error(run("queue", "delete", "../etc"), "not a queue id")


def test_domain_add_whose_key_cannot_be_written_adds_nothing(run, config):
    """A 250-octet domain: its key file's name passes NAME_MAX.  The domain stayed, with
    no key, "already exists" to a second try."""
    domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 58])
    assert_error(run("domain", "add", domain), "not added")
    assert run("domain", "list")[1] == ""
    assert_error(run("domain", "add", domain), "not added")   # not "already exists"


def test_queue_list_shows_an_envelope_it_cannot_read(run, config):
    """It went to a log the tool never shows: "0 messages in the queue" with mail in it."""
    queue = config.parent.parent / "var" / "queue"
    for sub in ("env", "msg"):
        (queue / sub).mkdir(parents=True, exist_ok=True)
    (queue / "msg" / "ABC123").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    (queue / "env" / "ABC123.json").write_text('{"id": "ABC12')
    code, out, err = run("queue", "list")
    assert code == 0, err
    assert "ABC123  envelope unreadable, left alone" in out
    assert out.endswith("0 messages in the queue, and 1 whose envelope cannot be read\n")


def test_domain_add_generates_dkim_key_and_dns_prints_it(run, config):
    out = run("domain", "add", "example.org")[1]
    assert "DKIM key generated: selector mail" in out
    [key] = list((config.parent.parent / "var" / "dkim").glob("example.org.*.key"))
    assert key.stat().st_mode & 0o777 == 0o600
    code, out, _ = run("dns", "example.org")
    assert code == 0
    assert any(line.split()[:4] == ["example.org.", "IN", "MX", "10"] and
               line.split()[4] == "mail.example.test." for line in out.splitlines()), out
    assert '"v=spf1 mx -all"' in out
    assert "_dmarc.example.org." in out
    assert "._domainkey.example.org." in out and "v=DKIM1; k=rsa; p=" in out
    assert "_submissions._tcp.example.org." in out
    assert_error(run("dns", "example.com"), "no such domain")


def test_queue_delete_requires_id(run):
    assert_error(run("queue", "delete"), "required")
