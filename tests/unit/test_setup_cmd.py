"""`mailserver-admin setup`: refused without root; a fresh image (--root) gets the system
user, the production config for its host name and the server's directories; a second run
changes nothing; an existing config is kept and what it names is created; what root made
before is handed over; another user's directory and a bad host name are one line each."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from mailserver.admin import main
from mailserver.config import load_config
from mailserver.setup_cmd import CHECKOUT_TEMPLATE, packaged_template, template_text

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="setup runs as root")
HOST = "mail.example.test"


@pytest.fixture
def open_dir():
    """A directory every user can reach (the service user must, to check its paths)."""
    base = Path(tempfile.mkdtemp(prefix="mailserver-setup-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["setup", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(top: Path) -> dict[str, tuple]:
    """Every entry below `top`: owner, group, mode, modification time, content."""
    found = {}
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        found[str(path.relative_to(top))] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns,
                                             content)
    return found


def image_user(prefix: Path, name: str) -> tuple[int, int]:
    for line in (prefix / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"{name} not in the image's passwd")


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


# -- no root ---------------------------------------------------------------------------------

def test_not_root_is_one_line_and_exit_1(capsys, open_dir):
    config = open_dir / "mailserver.toml"
    if not IS_ROOT:
        code, out, err = run(capsys, "--config", str(config), "--hostname", HOST)
    else:   # as nobody, the way an administrator forgets sudo
        nobody = pwd.getpwnam("nobody")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        try:
            cp = subprocess.run([sys.executable, "-m", "mailserver.admin", "setup", "--config",
                                 str(config), "--hostname", HOST], user=nobody.pw_uid,
                                group=nobody.pw_gid, extra_groups=[], env=env, cwd="/",
                                capture_output=True, text=True, timeout=120)
        except PermissionError as e:
            pytest.skip(f"nobody cannot run {sys.executable}: {e}")
        if "No module named" in cp.stderr or "Permission denied" in cp.stderr:
            pytest.skip(f"nobody cannot run {sys.executable}: {cp.stderr.strip()[-200:]}")
        code, out, err = cp.returncode, cp.stdout, cp.stderr
    assert code == 1
    assert out == ""
    assert err.splitlines() == ["mailserver-admin: error: setup must run as root: it creates "
                                "the system user mailserver and directories owned by it"]
    assert not config.exists()


def test_a_user_name_useradd_would_read_as_an_option_is_refused(capsys, open_dir):
    for name in ("-rf", "Mail Server", "a/b", ""):
        code, out, err = run(capsys, "--root", str(open_dir), f"--user={name}",
                             "--config", "/srv/mail/mailserver.toml")
        assert code == 1 and out == "", (name, out)
        assert err.splitlines() == [f"mailserver-admin: error: --user {name!r}: not a system "
                                    f"user name (lower-case letters, digits, '_' and '-', not "
                                    f"starting with '-')"], err


# -- a fresh image -------------------------------------------------------------------------------

@needs_root
def test_a_fresh_image_then_nothing_changes(capsys, open_dir):
    if shutil.which("useradd") is None:
        pytest.skip("useradd not installed")
    code, out, err = run(capsys, "--root", str(open_dir), "--hostname", HOST)
    assert (code, err) == (0, ""), err
    uid, gid = image_user(open_dir, "mailserver")
    entry = next(line for line in (open_dir / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("mailserver:")).split(":")
    assert entry[5] == "/var/lib/mailserver" and entry[6].endswith(("nologin", "false"))
    assert 0 < uid < 1000   # a system user
    # The config: the production template for this host, readable by the server's group.
    config_file = open_dir / "etc" / "mailserver" / "mailserver.toml"
    assert owner_mode(config_file) == (0, gid, 0o640)
    data = tomllib.loads(config_file.read_text())
    assert data["server"] == {"hostname": HOST, "state_dir": "/var/lib/mailserver"}
    assert data["storage"] == {"maildir_root": "/var/mail/vhosts"}
    # No certificate in the image yet: a generated one until tls.* names it.
    assert (data["tls"]["certificate"], data["tls"]["private_key"]) == ("", "")
    assert f"/etc/letsencrypt/live/{HOST}/fullchain.pem" in config_file.read_text()
    assert data["listen"]["smtp"] == "tcp:25"
    assert not list(config_file.parent.glob(".*"))   # no temporary file left
    # The directories, for the user; parents made on the way stay root's.
    assert owner_mode(open_dir / "var/lib/mailserver") == (uid, gid, 0o700)
    assert owner_mode(open_dir / "var/mail/vhosts") == (uid, gid, 0o700)
    assert owner_mode(open_dir / "var/log/mailserver") == (uid, gid, 0o750)
    assert owner_mode(open_dir / "var/lib") == (0, 0, 0o755)
    assert "user mailserver: created" in out and "setup done" in out
    assert ("mailserver-admin --config /etc/mailserver/mailserver.toml domain add "
            "example.test") in out
    assert "systemctl enable --now mailserver" in out

    before = snapshot(open_dir)
    code, out, err = run(capsys, "--root", str(open_dir), "--hostname", "other.example.test")
    assert (code, err) == (0, ""), err
    assert snapshot(open_dir) == before
    assert "nothing changed" in out
    assert "exists, kept; --hostname not applied" in out
    assert "created" not in out and "written" not in out


@needs_root
def test_an_existing_user_and_config_in_an_image(capsys, open_dir):
    """--user root: no user to create; the config's own (relative) paths are created."""
    (open_dir / "etc").mkdir()
    (open_dir / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (open_dir / "etc" / "group").write_text("root:x:0:\n")
    config_file = open_dir / "srv" / "mail" / "mailserver.toml"
    config_file.parent.mkdir(parents=True)
    config_file.write_text('[server]\nhostname = "mx.example.test"\nstate_dir = "state"\n'
                           '[storage]\nmaildir_root = "mail"\n')
    passwd = (open_dir / "etc" / "passwd").read_text()
    code, out, err = run(capsys, "--root", str(open_dir), "--user", "root",
                         "--config", "/srv/mail/mailserver.toml", "--log-dir", "/srv/mail/log")
    assert (code, err) == (0, ""), err
    assert (open_dir / "etc" / "passwd").read_text() == passwd
    assert owner_mode(open_dir / "srv/mail/state") == (0, 0, 0o700)
    assert owner_mode(open_dir / "srv/mail/mail") == (0, 0, 0o700)
    assert owner_mode(open_dir / "srv/mail/log") == (0, 0, 0o750)
    assert "user root: exists (uid 0" in out
    assert "config /srv/mail/mailserver.toml: exists, kept" in out
    assert "server.state_dir /srv/mail/state: created" in out   # as the image sees it
    # The unit names other paths than these: the next steps say what to edit.
    assert "User=root" in out and "ReadWritePaths: /srv/mail/state /srv/mail/mail" in out
    before = snapshot(open_dir)
    code, out, _ = run(capsys, "--root", str(open_dir), "--user", "root",
                       "--config", "/srv/mail/mailserver.toml", "--log-dir", "/srv/mail/log")
    assert code == 0 and "nothing changed" in out
    assert snapshot(open_dir) == before


@needs_root
@pytest.mark.parametrize("hostname, expected", [
    ("bad_host!.example.test", "server.hostname: not a valid host name"),
    ("mail", "--hostname mail: not a fully qualified domain name"),
    (None, "with --root, give the mail server's name with --hostname"),
])
def test_a_config_that_cannot_be_written_is_one_line(capsys, open_dir, hostname, expected):
    (open_dir / "etc").mkdir()
    (open_dir / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    args = ["--root", str(open_dir), "--user", "root"]
    code, out, err = run(capsys, *args, *(["--hostname", hostname] if hostname else []))
    assert code == 1
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (open_dir / "var").exists()
    assert not list((open_dir / "etc").rglob("*.toml*"))
    assert not list((open_dir / "etc").rglob(".*.setup"))


# -- this machine, an existing config ------------------------------------------------------------

@needs_root
def test_what_root_made_before_is_handed_to_the_user(capsys, open_dir):
    """mailserver-admin run as root before setup leaves root's 0700 directories; setup
    gives them to the service user, as the server does under --uid."""
    nobody = pwd.getpwnam("nobody")
    config_file = open_dir / "mailserver.toml"
    config_file.write_text(f'[server]\nhostname = "{HOST}"\nstate_dir = "var"\n'
                           '[storage]\nmaildir_root = "maildirs"\n')
    state = open_dir / "var"
    state.mkdir(mode=0o700)
    (state / "accounts.sqlite3").write_bytes(b"")
    (open_dir / "maildirs" / "example.test" / "alice" / "new").mkdir(parents=True, mode=0o700)
    (open_dir / "maildirs").chmod(0o700)
    args = ["--config", str(config_file), "--user", "nobody", "--log-dir",
            str(open_dir / "log")]
    code, out, err = run(capsys, *args)
    assert (code, err) == (0, ""), err
    ids = (nobody.pw_uid, nobody.pw_gid)
    for path in (state, state / "accounts.sqlite3", open_dir / "maildirs",
                 open_dir / "maildirs" / "example.test" / "alice" / "new", open_dir / "log"):
        assert owner_mode(path)[:2] == ids, path
    assert f"server.state_dir {state}: owner root -> " in out
    assert "given to nobody" in out
    before = snapshot(open_dir)
    code, out, _ = run(capsys, *args)
    assert code == 0 and "nothing changed" in out
    assert snapshot(open_dir) == before


@needs_root
def test_another_users_directory_is_refused(capsys, open_dir):
    config_file = open_dir / "mailserver.toml"
    config_file.write_text(f'[server]\nhostname = "{HOST}"\nstate_dir = "var"\n'
                           '[storage]\nmaildir_root = "maildirs"\n')
    (open_dir / "var").mkdir()
    os.chown(open_dir / "var", 4242, 4242)
    code, out, err = run(capsys, "--config", str(config_file), "--user", "root",
                         "--log-dir", str(open_dir / "log"))
    assert code == 1
    assert len(err.splitlines()) == 1
    assert f"server.state_dir: {open_dir / 'var'} belongs to 4242" in err
    assert owner_mode(open_dir / "var")[:2] == (4242, 4242)


# -- the template ------------------------------------------------------------------------------

def test_the_packaged_template_is_the_production_config():
    """An installed package has no etc/: it ships a copy, which must not fall behind.
    After editing etc/mailserver.production.toml, copy it to mailserver/templates/."""
    assert CHECKOUT_TEMPLATE.is_file()
    assert packaged_template() == CHECKOUT_TEMPLATE.read_text(), \
        "cp etc/mailserver.production.toml mailserver/templates/"
    assert template_text() == CHECKOUT_TEMPLATE.read_text()


def test_the_template_for_a_host_without_a_certificate_is_a_valid_config(tmp_path):
    from mailserver.setup_cmd import TEMPLATE_HOSTNAME, without_certificate

    assert TEMPLATE_HOSTNAME in template_text()
    text = without_certificate(template_text().replace(TEMPLATE_HOSTNAME, HOST),
                               Path("/etc/letsencrypt/live") / HOST)
    path = tmp_path / "mailserver.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.server.hostname == HOST
    assert config.tls.certificate == "" and config.tls.private_key == ""
