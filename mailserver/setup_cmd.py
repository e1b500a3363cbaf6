"""`mailserver-admin setup`: what a machine needs before the server's first start as a
service, done once by root and safe to repeat.

- the service user: a system user without a login shell (`useradd --system`), if missing;
- the config: the packaged production template with the host name filled in, unless the
  file exists (an existing config is never touched: its paths are what gets created);
- the directories the server writes: state_dir and maildir_root (0700) and the log
  directory (0750), owned by the service user, which under systemd's ProtectSystem=strict
  the server could not create itself (the unit makes exactly these writable).

Each item is reported as found or changed; a second run changes nothing and says so.
With --root PREFIX everything is done inside an image rooted at PREFIX (as `useradd
--root` and `systemctl --root` do): the config keeps the paths the image will see, and
the user is looked up in and added to PREFIX/etc/passwd.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mailserver.config import Config, ConfigError, load_config, parse_config
from mailserver.startup import _SYSTEM_DIRS, RunAs, StartupError, check_writable, hand_over

DEFAULT_CONFIG = Path("/etc/mailserver/mailserver.toml")
DEFAULT_USER = "mailserver"
DEFAULT_LOG_DIR = Path("/var/log/mailserver")   # the unit's --logfile directory
TEMPLATE = "mailserver.production.toml"
CHECKOUT_TEMPLATE = Path(__file__).resolve().parent.parent / "etc" / TEMPLATE
TEMPLATE_HOSTNAME = "mail.example.org"
# Where the shipped unit expects the installation (README: a virtualenv in /opt/mailserver).
UNIT_TWISTD = Path("/opt/mailserver/bin/twistd")
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
STATE_MODE, MAILDIR_MODE, LOG_MODE, CONFIG_MODE = 0o700, 0o700, 0o750, 0o640


class SetupError(Exception):
    """Setup cannot go on; the message is one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", default=DEFAULT_USER, metavar="NAME",
                        help=f"the system user the server runs as (default: {DEFAULT_USER})")
    parser.add_argument("--hostname", metavar="NAME",
                        help="server.hostname of a new config (default: this machine's FQDN)")
    parser.add_argument("--log-dir", default=str(DEFAULT_LOG_DIR), metavar="DIR",
                        help=f"directory of the server's log file (default: {DEFAULT_LOG_DIR})")
    parser.add_argument("--root", metavar="PREFIX",
                        help="set up the image rooted at PREFIX instead of this machine")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    group: str


class Setup:
    """One run: each step reports what it found or changed, so a repeat says nothing
    changed."""

    def __init__(self, config_path: Path, user: str, hostname: str | None, log_dir: Path,
                 root: Path | None) -> None:
        self.root = root
        if root is not None and not (config_path.is_absolute() and log_dir.is_absolute()):
            raise SetupError("with --root, --config and --log-dir must be absolute paths")
        self.config_path = config_path if root is not None else config_path.absolute()
        self.user = user
        self.hostname = hostname
        self.log_dir = log_dir if root is not None else log_dir.absolute()
        self.changed = False

    # -- the steps

    def run(self) -> int:
        if os.geteuid() != 0:
            raise SetupError(f"setup must run as root: it creates the system user {self.user} "
                             f"and directories owned by it")
        config_file = self.on_disk(self.config_path)
        new_config = None if config_file.exists() else self.render_config(config_file)
        try:
            config = self.read_config(new_config or config_file)
            account = self.ensure_user(config)
            if new_config is not None:
                new_config.chmod(CONFIG_MODE)
                os.chown(new_config, 0, account.gid)
                os.replace(new_config, config_file)
                new_config = None
                self.report(f"config {self.config_path}: written (server.hostname = "
                            f"{config.server.hostname})", changed=True)
            else:
                kept = ("" if not self.hostname else
                        f"; --hostname not applied (server.hostname there is "
                        f"{config.server.hostname})")
                self.report(f"config {self.config_path}: exists, kept{kept}")
        except ConfigError as e:
            raise SetupError(f"{self.config_path}: {e}") from None
        finally:
            if new_config is not None:
                new_config.unlink(missing_ok=True)
        for key, path, mode in (("server.state_dir", config.state_dir, STATE_MODE),
                                ("storage.maildir_root", config.maildir_root, MAILDIR_MODE),
                                ("log directory", self.log_dir, LOG_MODE)):
            self.ensure_directory(key, path, mode, account)
        if self.root is None:
            self.hand_over(config, account)
        print("setup done" if self.changed else "nothing changed: everything was in place")
        self.next_steps(config, account)
        return 0

    def render_config(self, config_file: Path) -> Path:
        """The production template for this host, validated, in a temporary file beside
        where it goes (moved into place once the user exists)."""
        if self.root is not None and not self.hostname:
            raise SetupError("with --root, give the mail server's name with --hostname")
        hostname = (self.hostname or socket.getfqdn()).rstrip(".").lower()
        if "." not in hostname:   # MX records, HELO and certificates need the full name
            raise SetupError(f"--hostname {hostname}: not a fully qualified domain name"
                             if self.hostname else
                             f"this machine's name {hostname!r} is not a fully qualified "
                             f"domain name: give the mail server's with --hostname")
        text = template_text().replace(TEMPLATE_HOSTNAME, hostname)
        cert_dir = Path("/etc/letsencrypt/live") / hostname
        if self.root is not None or not ((cert_dir / "fullchain.pem").is_file()
                                         and (cert_dir / "privkey.pem").is_file()):
            text = without_certificate(text, cert_dir)
        config_file.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        temporary = config_file.with_name(f".{config_file.name}.setup")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return temporary

    def read_config(self, path: Path) -> Config:
        """The config, validated.  An image's config names files as the image will see
        them (certificate, ...): only what setup needs is checked then, the rest is for
        `mailserver-admin check` on the machine."""
        if self.root is None:
            return load_config(path)
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("", f"invalid TOML: {e}") from None
        return parse_config({k: v for k, v in data.items() if k in ("server", "storage")},
                            path)

    def ensure_user(self, config: Config) -> Account:
        account = self.lookup_user()
        if account is not None:
            self.report(f"user {account.name}: exists (uid {account.uid}, "
                        f"group {account.group})")
            return account
        useradd = shutil.which("useradd")
        if useradd is None:
            raise SetupError(f"useradd not found: create the system user {self.user} (no login "
                             f"shell) yourself, then run setup again")
        shell = next((s for s in NOLOGIN_SHELLS if self.on_disk(Path(s)).exists()),
                     NOLOGIN_SHELLS[0])
        argv = [useradd, "--system", "--user-group", "--no-create-home",
                "--home-dir", str(self.image_path(config.state_dir)), "--shell", shell,
                "--comment", "mail server", "--", self.user]
        if self.root is not None:
            argv[1:1] = ["--root", str(self.root)]
        cp = subprocess.run(argv, capture_output=True, text=True)
        account = self.lookup_user() if cp.returncode == 0 else None
        if account is None:
            why = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
            raise SetupError(f"cannot create the system user {self.user}: {why}")
        self.report(f"user {account.name}: created (system user, uid {account.uid}, "
                    f"no login shell)", changed=True)
        return account

    def ensure_directory(self, key: str, path: Path, mode: int, account: Account) -> None:
        shown = self.image_path(path)
        target = self.on_disk(path)
        owner = f"{account.name}:{account.group}"
        if not target.exists():
            missing = [p for p in (target, *target.parents) if not p.exists()]
            for directory in reversed(missing):   # parents made on the way stay root's
                directory.mkdir(mode=mode if directory == target else 0o755)
            os.chown(target, account.uid, account.gid)
            target.chmod(mode)   # whatever the umask
            self.report(f"{key} {shown}: created, {owner} {mode:04o}", changed=True)
            return
        st = target.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise SetupError(f"{key}: {shown} exists and is not a directory")
        changes = []
        if st.st_uid != account.uid:
            if st.st_uid != 0 or shown in _SYSTEM_DIRS:
                raise SetupError(
                    f"{key}: {shown} belongs to {self.user_name(st.st_uid)}: setup takes only "
                    f"directories of root's or {account.name}'s; choose a directory of the "
                    f"server's own, or chown {owner} {shown} if it is one")
            os.chown(target, account.uid, account.gid)
            changes.append(f"owner root -> {owner}")
        elif st.st_gid != account.gid:
            os.chown(target, account.uid, account.gid)
            changes.append(f"group -> {account.group}")
        if stat.S_IMODE(st.st_mode) != mode:
            target.chmod(mode)
            changes.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
        if changes:
            self.report(f"{key} {shown}: {', '.join(changes)}", changed=True)
        else:
            self.report(f"{key} {shown}: exists, {owner} {mode:04o}")

    def hand_over(self, config: Config, account: Account) -> None:
        """What root made in the directories before (mailserver-admin run before setup)
        goes to the service user, as the server itself does under --uid; then the server
        must be able to write it all."""
        run_as = RunAs(account.uid, account.gid)
        before = _root_owned(config)
        hand_over(config, run_as)
        taken = before - _root_owned(config)
        if taken:
            self.report(f"what root made in server.state_dir and storage.maildir_root "
                        f"given to {account.name}", changed=True)
        try:
            check_writable(config, run_as)
        except StartupError as e:
            raise SetupError(str(e)) from None

    def next_steps(self, config: Config, account: Account) -> None:
        # Always named: mailserver-admin's own default is etc/mailserver.toml.
        admin = f"mailserver-admin --config {self.config_path}"
        hostname = config.server.hostname
        domain = hostname.split(".", 1)[1] if hostname.count(".") >= 2 else hostname
        twistd = Path(sys.executable).parent / "twistd"
        print("next steps:")
        if not config.tls.certificate and not getattr(config.tls, "acme_directory", ""):
            print(f"  - a certificate for {hostname}, in {self.config_path}: tls.acme_directory "
                  f"(the server gets it itself), or tls.certificate and tls.private_key "
                  f"(e.g. from certbot certonly --standalone -d {hostname}; the key readable "
                  f"by group {account.group}). Until then a self-signed one is served")
        print(f"  - {admin} domain add {domain}")
        print(f"  - {admin} user add postmaster@{domain}")
        print(f"  - {admin} dns {domain}      # the DNS records to publish")
        unit = "install -m 0644 etc/mailserver.service /etc/systemd/system/"
        edits = []
        if account.name != DEFAULT_USER:
            edits.append(f"User={account.name} and Group={account.group}")
        if twistd.exists() and twistd != UNIT_TWISTD and self.root is None:
            edits.append(f"ExecStart's {UNIT_TWISTD} -> {twistd}")
        if self.config_path != DEFAULT_CONFIG:
            edits.append(f"--config {self.config_path}")
        if self.log_dir != DEFAULT_LOG_DIR:
            edits.append(f"--logfile and ReadWritePaths: {self.log_dir}")
        if (self.image_path(config.state_dir), self.image_path(config.maildir_root)) != (
                Path("/var/lib/mailserver"), Path("/var/mail/vhosts")):
            edits.append(f"ReadWritePaths: {self.image_path(config.state_dir)} "
                         f"{self.image_path(config.maildir_root)}")
        print(f"  - {unit}" + (f"   (edit it: {'; '.join(edits)})" if edits else ""))
        print("  - systemctl daemon-reload && systemctl enable --now mailserver")
        print(f"  - {admin} check; systemctl status mailserver")

    # -- helpers

    def report(self, line: str, changed: bool = False) -> None:
        self.changed = self.changed or changed
        print(line)

    def on_disk(self, path: Path) -> Path:
        """Where `path` of the machine being set up is from here.  Paths of a config
        inside the image that were relative to it already are."""
        if self.root is None or path.is_relative_to(self.root):
            return path
        return self.root / path.relative_to(path.anchor)

    def image_path(self, path: Path) -> Path:
        """`path` as the machine being set up sees it."""
        if self.root is not None and path.is_relative_to(self.root):
            return Path("/") / path.relative_to(self.root)
        return path

    def lookup_user(self) -> Account | None:
        passwd = _read_db(self.on_disk(Path("/etc/passwd"))) if self.root else None
        groups = _read_db(self.on_disk(Path("/etc/group"))) if self.root else None
        if passwd is None:
            import grp
            import pwd

            try:
                entry = pwd.getpwnam(self.user)
            except KeyError:
                return None
            try:
                group = grp.getgrgid(entry.pw_gid).gr_name
            except KeyError:
                group = str(entry.pw_gid)
            return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, group)
        fields = passwd.get(self.user)
        if fields is None or len(fields) < 4:
            return None
        uid, gid = int(fields[2]), int(fields[3])
        group = next((name for name, g in (groups or {}).items()
                      if len(g) > 2 and g[2] == str(gid)), str(gid))
        return Account(self.user, uid, gid, group)

    def user_name(self, uid: int) -> str:
        if self.root is None:
            import pwd

            try:
                return pwd.getpwuid(uid).pw_name
            except KeyError:
                return str(uid)
        for name, fields in (_read_db(self.on_disk(Path("/etc/passwd"))) or {}).items():
            if len(fields) > 2 and fields[2] == str(uid):
                return name
        return str(uid)


# A system user name as useradd takes it, never an option ("-rf").
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def run_setup(args: argparse.Namespace) -> int:
    if not _USER_NAME.fullmatch(args.user):
        raise SetupError(f"--user {args.user!r}: not a system user name (lower-case "
                         f"letters, digits, '_' and '-', not starting with '-')")
    config = getattr(args, "config", None)
    setup = Setup(Path(config) if config else DEFAULT_CONFIG, args.user, args.hostname,
                  Path(args.log_dir), Path(args.root).absolute() if args.root else None)
    try:
        return setup.run()
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise SetupError(f"{where}{e.strerror or e}") from None


def template_text() -> str:
    """The production config: the checkout's etc/ one when run from a checkout, else the
    copy shipped inside the package (an installed package has no etc/)."""
    if CHECKOUT_TEMPLATE.is_file():
        return CHECKOUT_TEMPLATE.read_text("utf-8")
    return packaged_template()


def packaged_template() -> str:
    return resources.files("mailserver.templates").joinpath(TEMPLATE).read_text("utf-8")


def without_certificate(text: str, cert_dir: Path) -> str:
    """No certificate yet: empty tls paths (a self-signed pair is generated), with the
    paths to set in a comment."""
    lines = {"certificate": f"{cert_dir / 'fullchain.pem'}",
             "private_key": f"{cert_dir / 'privkey.pem'}"}
    for key, path in lines.items():
        text, count = re.subn(rf'(?m)^{key} = ".*"$',
                              f'{key} = ""   # once it exists: "{path}"', text,
                              count=1)
        if count != 1:
            raise SetupError(f"the packaged {TEMPLATE} has no tls.{key} line")
    return text


def _read_db(path: Path) -> dict[str, list[str]] | None:
    """A passwd or group file of an image: name -> its colon-separated fields."""
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return {}
    return {line.split(":", 1)[0]: line.split(":")
            for line in text.splitlines() if line and not line.startswith("#")}


def _root_owned(config: Config) -> set[str]:
    """Root-owned entries of the state tree and the top two levels of the Maildir tree
    (what hand_over may give away), to report what it did."""
    found: set[str] = set()
    for top, depth in ((config.state_dir, None), (config.maildir_root, 2)):
        for dirpath, dirnames, filenames in os.walk(top):
            names = [*dirnames, *filenames]
            if depth is not None and len(Path(dirpath).relative_to(top).parts) + 1 >= depth:
                dirnames[:] = []   # the entries of this level are the last looked at
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_uid == 0:
                        found.add(path)
                except OSError:
                    pass
    return found
