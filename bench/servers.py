"""The servers the benchmark starts: this mail server and the anchors.

Each lives in its own directory under the run's work directory, with private configuration,
state and mail, listens on free ports on 127.0.0.1 only, and is stopped by `stop()`.
A server that cannot run here raises `Unavailable` (with the reason) from `check()` or
`start()`; the benchmark then reports it as "not runnable" instead of failing.

    setup(users)   write the configuration and accounts (users: local parts of example.test)
    maildir(user)  that user's INBOX Maildir (the load generators fill it or count it)
    start()/stop() one process tree; pids() are its roots for CPU and memory accounting
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import LOOPBACK, Unavailable, free_port, wait_for_banner

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DOMAIN = "example.test"
HOSTNAME = "mailserver.bench.test"   # this server's name: also its Authentication-Results id
DNS_SERVER = REPO_ROOT / "tests" / "e2e" / "dnsserver.py"
PASSWORD = "secret"
BANNERS = {"smtp": b"220", "imap": b"* OK", "pop3": b"+OK"}
TWISTD_BOOT = ("import sys; sys.argv[0] = 'twistd'; "
               "from twisted.scripts.twistd import run; sys.exit(run())")
MAIL_UID = "nobody"   # the unprivileged owner of the anchors' mail (Postfix, Dovecot)
# Every server is measured once it has started, not while it starts: after its banners,
# this long for the work a start leaves running (this server's heap collection and Public
# Suffix List; Dovecot starts its processes on demand).
SETTLE_SECONDS = 1.0

# The password hash every server that reads a Dovecot passwd-file gets (this server imports
# the same file), so that LOGIN costs the same verification on both; see password_scheme().
_password_hash = f"{{PLAIN}}{PASSWORD}"


def password_scheme(scheme: str) -> str:
    """Choose the users' password hash: "argon2id" (this server's own hash, with its
    parameters, as `mailserver-admin user add` stores it) or "plain" ({PLAIN}: logins cost
    no hashing).  Returns the hash."""
    global _password_hash
    if scheme == "plain":
        _password_hash = f"{{PLAIN}}{PASSWORD}"
        return _password_hash
    cp = subprocess.run([sys.executable, "-c", "from mailserver.passwords import hash_password; "
                         f"print(hash_password({PASSWORD!r}))"],
                        capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=60)
    value = cp.stdout.strip()
    if cp.returncode != 0 or not value.startswith("$argon2id$"):
        from argon2 import PasswordHasher  # the server's own dependency
        value = PasswordHasher().hash(PASSWORD)
    _password_hash = "{ARGON2ID}" + value
    return _password_hash


def _env() -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    env.pop("PYTHONSTARTUP", None)
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _chown_tree_dirs(path: Path, user: str) -> None:
    """Give `user` the directories under `path` (files stay as they are: readable by all)."""
    pw = pwd.getpwnam(user)
    for dirpath, _dirs, _files in os.walk(path):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)


def _open_dirs_to(path: Path) -> None:
    """Make each directory from `path` up to / traversable, so unprivileged daemons reach it."""
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):  # best effort: a daemon that can't reach it fails visibly
            mode = p.stat().st_mode
            if mode & 0o011 != 0o011:
                os.chmod(p, mode | 0o011)


class Server:
    key = ""            # short name used in tables and JSON
    label = ""
    services: tuple[str, ...] = ()
    durable = True      # fsyncs before acknowledging a message
    lf_maildir = False  # its Maildir files have LF line ends (it converts to CRLF itself)
    notes = ""

    def __init__(self, workdir: Path) -> None:
        self.dir = Path(workdir) / self.key
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.ports = {s: free_port() for s in self.services}
        self.users: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.available_services: set[str] = set()

    # -- to override
    def check(self) -> None:
        """Raise Unavailable if this server cannot run on this machine."""

    def setup(self, users: list[str]) -> None:
        self.users = list(users)

    def maildir(self, user: str) -> Path:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def version(self) -> str:
        return ""

    def log_tail(self) -> str:
        return ""

    # -- shared
    def port(self, service: str) -> int:
        return self.ports[service]

    def _wait_services(self, timeout: float = 30.0, required: str | None = None) -> None:
        """Wait for `required`'s banner, then note which of the other services answer."""
        alive = (lambda: self.proc is None or self.proc.poll() is None)
        order = [required] if required else []
        order += [s for s in self.services if s != required]
        self.available_services = set()
        for service in order:
            wait = timeout if service == required else (timeout if not self.available_services else 3.0)
            if wait_for_banner(self.ports[service], BANNERS[service], wait, alive):
                self.available_services.add(service)
            elif service == required:
                self.stop()
                raise Unavailable(f"{self.label}: {service} port {self.ports[service]} gave no "
                                  f"banner within {timeout:.0f}s\n{self.log_tail()}")
        time.sleep(SETTLE_SECONDS)

    def __repr__(self) -> str:
        return f"<{self.key} {self.ports}>"


# -- this server ----------------------------------------------------------------------------

class MailServer(Server):
    key = "mailserver"
    label = "this server"
    services = ("smtp", "imap", "pop3")
    notes = "twistd mailserver from the working tree, fsync before 250"

    def check(self) -> None:
        cp = subprocess.run(
            [sys.executable, "-c", "import dataclasses, json; from mailserver.config import "
             "ListenConfig, LimitsConfig; print(json.dumps([[f.name for f in "
             "dataclasses.fields(c)] for c in (ListenConfig, LimitsConfig)]))"],
            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=60)
        if cp.returncode != 0:
            raise Unavailable(f"this server's config module does not import: "
                              f"{cp.stderr.strip().splitlines()[-1:]}")
        self.listen_keys, self.limit_keys = json.loads(cp.stdout)

    @property
    def config_path(self) -> Path:
        return self.dir / "mailserver.toml"

    def setup(self, users: list[str]) -> None:
        super().setup(users)
        listen = {k: "" for k in self.listen_keys}
        for service, port in self.ports.items():
            listen[service] = f"tcp:{port}:interface={LOOPBACK}"
        limits = {"max_connections": 5000, "max_connections_per_ip": 5000,
                  "idle_timeout": 3600}
        limits = {k: v for k, v in limits.items() if k in self.limit_keys}
        self.sections = {
            "server": {"hostname": HOSTNAME, "state_dir": str(self.dir / "var")},
            "storage": {"maildir_root": str(self.dir / "maildirs")},
            "listen": listen,
            "limits": limits,
            "auth": {"allow_plaintext_loopback": True},
        }
        self.write_config()
        # Users come from a Dovecot passwd-file with the same hash Dovecot gets.
        passwd = self.dir / "users.passwd"
        passwd.write_text("".join(f"{u}@{DOMAIN}:{_password_hash}::::::\n" for u in users))
        self.admin("user", "import", str(passwd))

    def write_config(self) -> None:
        lines = []
        for name, values in self.sections.items():
            lines.append(f"[{name}]")
            for key, value in values.items():
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    def admin(self, *args: str) -> str:
        cp = subprocess.run([sys.executable, "-m", "mailserver.admin", "--config",
                             str(self.config_path), *args], capture_output=True, text=True,
                            env=_env(), cwd=self.dir, timeout=600)
        if cp.returncode != 0:
            raise Unavailable(f"mailserver-admin {' '.join(args)}: {cp.stderr.strip()}")
        return cp.stdout

    def maildir(self, user: str) -> Path:
        return self.dir / "maildirs" / DOMAIN / user

    def start(self) -> None:
        self._out = open(self.dir / "twistd.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
             f"--logfile={self.dir / 'twistd.log'}", "mailserver", "--config",
             str(self.config_path)],
            cwd=self.dir, env=_env(), stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=subprocess.STDOUT)
        self._wait_services(60.0, required="smtp")

    def stop(self) -> None:
        super().stop()
        if getattr(self, "_out", None):
            self._out.close()
            self._out = None

    def log_tail(self) -> str:
        return _tail(self.dir / "twistd.out") + "\n" + _tail(self.dir / "twistd.log")

    def version(self) -> str:
        try:
            head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "working tree"
        return f"git {head}{' + local changes' if dirty else ''}"


class ZoneServer:
    """The sender's DNS: tests/e2e/dnsserver.py (twisted.names, authoritative, TTL 60 s)
    on a free UDP port of 127.0.0.1, as a child of the bench (it ends with it)."""

    def __init__(self, zone: list[list], directory: Path) -> None:
        zone_file = directory / "zone.json"
        zone_file.write_text(json.dumps(zone, indent=1))
        self.log_path = directory / "dnsserver.out"
        self.proc = subprocess.Popen([sys.executable, str(DNS_SERVER), str(zone_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_env(), cwd=directory)
        line = self.proc.stdout.readline().decode(errors="replace") if self.proc.stdout else ""
        if not line.startswith("PORT "):
            rest = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            self.stop()
            raise Unavailable(f"the bench's DNS server did not start: {line}{rest[-2000:]}")
        self.port = int(line.split()[1])
        # Nothing more is read from its stdout: send the rest (tracebacks) to a file.
        self._drain = open(self.log_path, "ab")
        threading.Thread(target=self._copy_output, daemon=True).start()

    def _copy_output(self) -> None:
        stream = self.proc.stdout
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: stream.read1(65536), b""):
                self._drain.write(chunk)
                self._drain.flush()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        drain = getattr(self, "_drain", None)
        if drain is not None:
            with contextlib.suppress(OSError):
                drain.close()


class MailServerChecked(MailServer):
    """This server with the MX's inbound checks applied to the bench's loopback clients:
    SPF, DKIM, DMARC and ARC (the defaults), resolved through `relay.resolver` at a
    twisted.names server the bench starts on loopback, which holds the SPF, DMARC and
    DKIM key records of the bench's sender domain (smtp_bench.SenderDomain).  No rspamd,
    no DNS blocklist, no greeting delay: the cost measured is that of the checks."""

    key = "mailserver-checks"
    label = "this server, inbound checks on"
    services = ("smtp",)
    notes = ("the same server with [inbound] trusted_networks = [] and greet_delay = 0: "
             "SPF, DKIM, DMARC, ARC for every bench message, DNS from a twisted.names server "
             "on loopback (tests/e2e/dnsserver.py, TTL 60 s); no rspamd, no DNSBL")
    authserv_id = HOSTNAME   # whose Authentication-Results the stored messages must carry

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.dns: ZoneServer | None = None

    def check(self) -> None:
        super().check()
        if not DNS_SERVER.is_file():
            raise Unavailable(f"{DNS_SERVER} is missing (the bench's DNS server)")
        cp = subprocess.run(
            [sys.executable, "-c", "import dataclasses, dkim; from mailserver.config import "
             "InboundConfig; print(' '.join(f.name for f in dataclasses.fields(InboundConfig)))"],
            capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=60)
        if cp.returncode != 0:
            raise Unavailable(f"no inbound checks in this tree (mailserver.config.InboundConfig "
                              f"or dkimpy missing): {cp.stderr.strip().splitlines()[-1:]}")
        missing = {"trusted_networks", "greet_delay", "spf", "dkim", "dmarc"} - set(cp.stdout.split())
        if missing:
            raise Unavailable(f"[inbound] lacks {', '.join(sorted(missing))}")

    def _ensure_dns(self) -> None:
        if self.dns is not None and self.dns.alive():
            return
        import smtp_bench  # the sender domain's records (and key) live with the load generator
        self.dns = ZoneServer(smtp_bench.sender_domain().zone(), self.dir)

    def setup(self, users: list[str]) -> None:
        self._ensure_dns()
        super().setup(users)

    def write_config(self) -> None:
        assert self.dns is not None
        self.sections["relay"] = {"resolver": self.dns.address}
        self.sections["inbound"] = {"trusted_networks": [], "greet_delay": 0,
                                    "spf": True, "dkim": True, "dmarc": True, "arc": True,
                                    "rspamd_url": "", "dnsbl": []}
        super().write_config()

    def start(self) -> None:
        if self.dns is None or not self.dns.alive():  # restarted: new port, new config
            self._ensure_dns()
            self.write_config()
        super().start()

    def stop(self) -> None:
        super().stop()
        if self.dns is not None:
            self.dns.stop()
            self.dns = None

    def helper_pids(self) -> list[int]:
        """Processes serving this server that are not its own (CPU reported apart)."""
        return [self.dns.proc.pid] if self.dns is not None and self.dns.alive() else []

    def log_tail(self) -> str:
        dns_log = _tail(self.dir / "dnsserver.out", 5)
        return super().log_tail() + (f"\n(DNS server) {dns_log}" if dns_log else "")


# -- Postfix ----------------------------------------------------------------------------------

class Postfix(Server):
    key = "postfix"
    label = "Postfix"
    services = ("smtp",)
    notes = "private instance (postfix -c DIR), virtual(8) into Maildir as nobody"

    def check(self) -> None:
        if not shutil.which("postfix"):
            raise Unavailable("postfix is not installed (apt-get install postfix)")
        if os.geteuid() != 0:
            raise Unavailable("Postfix's master must be started as root (run the bench as root)")
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            raise Unavailable("no 'postfix' user (the Debian package creates it)") from None

    def setup(self, users: list[str]) -> None:
        super().setup(users)
        d = self.dir
        for sub in ("conf", "queue", "data", "mail"):
            (d / sub).mkdir(exist_ok=True)
        _open_dirs_to(d)
        pw = pwd.getpwnam(MAIL_UID)
        (d / "mail" / DOMAIN).mkdir(exist_ok=True)
        for u in users:
            for sub in ("cur", "new", "tmp"):
                (self.maildir(u) / sub).mkdir(parents=True, exist_ok=True)
        _chown_tree_dirs(d / "mail", MAIL_UID)
        shutil.chown(d / "data", "postfix")
        (d / "conf" / "vmailbox").write_text(
            "".join(f"{u}@{DOMAIN} {DOMAIN}/{u}/\n" for u in users))
        (d / "conf" / "main.cf").write_text(f"""\
compatibility_level = 3.6
config_directory = {d / 'conf'}
queue_directory = {d / 'queue'}
data_directory = {d / 'data'}
mail_owner = postfix
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
smtpd_peername_lookup = no
message_size_limit = 52428800
virtual_mailbox_limit = 0
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {d / 'mail'}
virtual_mailbox_maps = texthash:{d / 'conf' / 'vmailbox'}
virtual_uid_maps = static:{pw.pw_uid}
virtual_gid_maps = static:{pw.pw_gid}
virtual_minimum_uid = 100
virtual_destination_concurrency_limit = 20
alias_maps =
alias_database =
biff = no
maillog_file = {d / 'maillog'}
maillog_file_prefixes = {d}
""")
        (d / "conf" / "master.cf").write_text(f"""\
{LOOPBACK}:{self.ports['smtp']} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
""")

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / DOMAIN / user

    def _postfix(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.dir / "conf"), action],
                              capture_output=True, text=True, timeout=120)

    def _master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        cp = self._postfix("start")
        if cp.returncode != 0:
            raise Unavailable(f"postfix start failed: {cp.stderr.strip()}\n{self.log_tail()}")
        self._wait_services(30.0, required="smtp")

    def stop(self) -> None:
        pid = self._master_pid()
        self._postfix("stop")
        deadline = time.monotonic() + 30
        while pid and _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def pids(self) -> list[int]:
        pid = self._master_pid()
        return [pid] if pid and _pid_alive(pid) else []

    def log_tail(self) -> str:
        return _tail(self.dir / "maillog")

    def version(self) -> str:
        cp = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                            text=True)
        return f"Postfix {cp.stdout.strip()}"


# -- Dovecot ----------------------------------------------------------------------------------

class Dovecot(Server):
    key = "dovecot"
    label = "Dovecot"
    services = ("imap", "pop3")
    notes = "private instance (dovecot -F -c FILE), passwd-file, mail as nobody"

    def check(self) -> None:
        if not shutil.which("dovecot"):
            raise Unavailable("dovecot is not installed (apt-get install dovecot-imapd "
                              "dovecot-pop3d)")
        if os.geteuid() != 0:
            raise Unavailable("this bench starts Dovecot's master as root (run it as root)")

    def setup(self, users: list[str]) -> None:
        super().setup(users)
        d = self.dir
        for sub in ("run", "state", "mail"):
            (d / sub).mkdir(exist_ok=True)
        _open_dirs_to(d)
        pw = pwd.getpwnam(MAIL_UID)
        (d / "users.passwd").write_text("".join(
            f"{u}@{DOMAIN}:{_password_hash}:{pw.pw_uid}:{pw.pw_gid}::{self.maildir(u)}::\n"
            for u in users))
        (d / "dovecot.conf").write_text(f"""\
base_dir = {d / 'run'}
state_dir = {d / 'state'}
instance_name = bench-dovecot-{os.getpid()}
log_path = {d / 'dovecot.log'}
protocols = imap pop3
listen = {LOOPBACK}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
default_process_limit = 3000
default_client_limit = 10000
first_valid_uid = 100
mail_location = maildir:~
passdb {{
  driver = passwd-file
  args = username_format=%u {d / 'users.passwd'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d / 'users.passwd'}
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.ports['imap']}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {LOOPBACK}
    port = {self.ports['pop3']}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
protocol imap {{
  mail_max_userip_connections = 5000
}}
protocol pop3 {{
  mail_max_userip_connections = 5000
}}
""")

    def prepare_maildirs(self) -> None:
        """After the load generator filled the users' Maildirs: hand them to the mail user."""
        for u in self.users:
            self.maildir(u).mkdir(parents=True, exist_ok=True)
        _chown_tree_dirs(self.dir / "mail", MAIL_UID)

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / DOMAIN / user

    def start(self) -> None:
        self.prepare_maildirs()
        self._out = open(self.dir / "dovecot.out", "ab")
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", str(self.dir / "dovecot.conf")],
                                     cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT)
        self._wait_services(30.0, required="imap")

    def stop(self) -> None:
        super().stop()
        if getattr(self, "_out", None):
            self._out.close()
            self._out = None

    def log_tail(self) -> str:
        return _tail(self.dir / "dovecot.out") + "\n" + _tail(self.dir / "dovecot.log")

    def version(self) -> str:
        cp = subprocess.run(["dovecot", "--version"], capture_output=True, text=True)
        return f"Dovecot {cp.stdout.strip()}"


# -- twistd mail -------------------------------------------------------------------------------

class TwistdMail(Server):
    key = "twistd-mail"
    label = "twistd mail"
    services = ("smtp", "pop3")
    durable = False
    lf_maildir = True   # it stores LF and sends every LF as CRLF
    notes = ("stock twisted.mail.tap service from bench/anchors/twistd_mail.tac, which works "
             "around its Python 3 str/bytes bugs; no fsync")

    def setup(self, users: list[str]) -> None:
        super().setup(users)
        cfg = {"root": str(self.dir / "mail" / DOMAIN), "domain": DOMAIN,
               "users": {u: PASSWORD for u in users},
               "smtp": f"tcp:{self.ports['smtp']}:interface={LOOPBACK}",
               "pop3": f"tcp:{self.ports['pop3']}:interface={LOOPBACK}"}
        (self.dir / "config.json").write_text(json.dumps(cfg))
        (self.dir / "mail" / DOMAIN).mkdir(parents=True, exist_ok=True)
        for u in users:
            for sub in ("cur", "new", "tmp"):
                (self.maildir(u) / sub).mkdir(parents=True, exist_ok=True)

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / DOMAIN / user

    def start(self) -> None:
        env = _env()
        env["BENCH_TWISTD_MAIL_CONFIG"] = str(self.dir / "config.json")
        self._out = open(self.dir / "twistd.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TWISTD_BOOT, "-n", "--pidfile=",
             f"--logfile={self.dir / 'twistd.log'}", "-y",
             str(BENCH_DIR / "anchors" / "twistd_mail.tac")],
            cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=subprocess.STDOUT)
        self._wait_services(30.0, required="smtp")

    def stop(self) -> None:
        super().stop()
        if getattr(self, "_out", None):
            self._out.close()
            self._out = None

    def log_tail(self) -> str:
        return _tail(self.dir / "twistd.out") + "\n" + _tail(self.dir / "twistd.log")

    def version(self) -> str:
        import twisted
        return f"Twisted {twisted.__version__}"


# -- aiosmtpd ----------------------------------------------------------------------------------

class Aiosmtpd(Server):
    key = "aiosmtpd"
    label = "aiosmtpd+fsync"
    services = ("smtp",)
    notes = "bench/anchors/aiosmtpd_maildir.py: fsync file and new/ before 250"

    def check(self) -> None:
        cp = subprocess.run([sys.executable, "-c", "import aiosmtpd; print(aiosmtpd.__version__)"],
                            capture_output=True, text=True)
        if cp.returncode != 0:
            raise Unavailable("aiosmtpd is not installed "
                              "(pip install -r bench/requirements.txt)")
        self._version = cp.stdout.strip()

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / DOMAIN / user

    def start(self) -> None:
        self._out = open(self.dir / "aiosmtpd.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "anchors" / "aiosmtpd_maildir.py"),
             "--port", str(self.ports["smtp"]), "--root", str(self.dir / "mail"),
             "--domain", DOMAIN, "--users", ",".join(self.users)],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        self._wait_services(30.0, required="smtp")

    def stop(self) -> None:
        super().stop()
        if getattr(self, "_out", None):
            self._out.close()
            self._out = None

    def log_tail(self) -> str:
        return _tail(self.dir / "aiosmtpd.out")

    def version(self) -> str:
        return f"aiosmtpd {getattr(self, '_version', '?')}"


ALL = {cls.key: cls for cls in (MailServer, MailServerChecked, Postfix, Dovecot, TwistdMail,
                                 Aiosmtpd)}


def for_service(service: str) -> list[type[Server]]:
    return [cls for cls in ALL.values() if service in cls.services]
