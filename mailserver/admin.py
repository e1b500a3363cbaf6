"""`mailserver-admin`: the operator's command line for config checks, domains, users, aliases.

It writes the same SQLite accounts database the running server reads (WAL mode), so
every change takes effect without a restart.  Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from mailserver.accounts import Accounts, AccountsError, IAccounts, open_accounts
from mailserver.addresses import AddressError, normalize, normalize_domain, split_address
from mailserver.config import (Config, ConfigError, SizeTooLarge, default_config_path,
                               load_config, parse_size)
from mailserver.listening import probe
from mailserver.passwords import hash_password, is_supported_hash

PROG = "mailserver-admin"

_LISTENER_NOTES = {
    "smtp": "MX, STARTTLS",
    "submission": "submission, STARTTLS, AUTH required",
    "submissions": "submission, implicit TLS, AUTH required",
    "imap": "IMAP, STARTTLS",
    "imaps": "IMAP, implicit TLS",
    "pop3": "POP3, STLS",
    "pop3s": "POP3, implicit TLS",
    "metrics": "Prometheus metrics, HTTP GET /metrics",
    "managesieve": "ManageSieve, STARTTLS",
}


class AdminError(Exception):
    """A failed command; the message is printed as the one error line."""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is our one-line error with exit status 1."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        return _fail(str(e))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        if getattr(args, "writes_config", False):   # setup: the config may not exist yet
            return args.handler(None, args)
        config = load_config(getattr(args, "config", None) or default_config_path())
        return args.handler(config, args)
    except (AdminError, AccountsError, ConfigError) as e:
        return _fail(str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted")


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# -- parser ------------------------------------------------------------------------------

def _build_parser() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="configuration file (default: etc/mailserver.toml in the current "
                             "directory, else the shipped one)")
    parser = _Parser(prog=PROG, parents=[common],
                     description="Administer the mail server: domains, users, aliases.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)

    def leaf(group: argparse._SubParsersAction, name: str, handler: Callable[..., int],
             help: str) -> _Parser:
        p = group.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    leaf(commands, "check", cmd_check,
         "validate the configuration and show what would listen where")

    domain = commands.add_parser("domain", help="manage mail domains")
    actions = domain.add_subparsers(dest="action", metavar="ACTION", required=True)
    leaf(actions, "add", cmd_domain_add, "add a domain").add_argument("domain")
    leaf(actions, "del", cmd_domain_del, "delete an empty domain").add_argument("domain")
    leaf(actions, "list", cmd_domain_list, "list domains")

    user = commands.add_parser("user", help="manage mailbox users")
    actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(actions, "add", cmd_user_add, "add a user and create the Maildir")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.add_argument("--quota", metavar="SIZE", help="mailbox quota, e.g. 2G (default: none)")
    p = leaf(actions, "passwd", cmd_user_passwd, "set a user's password")
    p.add_argument("address")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    leaf(actions, "del", cmd_user_del, "delete a user (the mail stays on disk)"
         ).add_argument("address")
    leaf(actions, "list", cmd_user_list, "list users").add_argument("domain", nargs="?")
    leaf(actions, "import", cmd_user_import, "import users from a Dovecot passwd-file"
         ).add_argument("passwd_file", metavar="PASSWD_FILE")

    alias = commands.add_parser("alias", help="manage aliases and catch-alls")
    actions = alias.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(actions, "add", cmd_alias_add, "add targets to an alias (@domain: catch-all)")
    p.add_argument("alias")
    p.add_argument("targets", metavar="TARGET[,TARGET...]")
    leaf(actions, "del", cmd_alias_del, "delete an alias").add_argument("alias")
    leaf(actions, "list", cmd_alias_list, "list aliases")

    queue = commands.add_parser("queue", help="inspect the outbound queue")
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)
    leaf(actions, "list", cmd_queue_list, "list queued messages")
    leaf(actions, "flush", cmd_queue_flush, "retry every queued message now")
    leaf(actions, "delete", cmd_queue_delete, "delete a queued message (no DSN is sent)"
         ).add_argument("id", metavar="ID")

    leaf(commands, "dns", cmd_dns, "print the DNS records to publish for a domain"
         ).add_argument("domain")

    sieve = commands.add_parser("sieve", help="manage a user's Sieve filter scripts")
    actions = sieve.add_subparsers(dest="action", metavar="ACTION", required=True)
    leaf(actions, "list", cmd_sieve, "list a user's scripts").add_argument("address")
    p = leaf(actions, "put", cmd_sieve, "store a script (checked as ManageSieve checks it)")
    p.add_argument("address")
    p.add_argument("name")
    p.add_argument("file", metavar="FILE", nargs="?", default="-",
                   help="the script (default, or -: standard input)")
    p = leaf(actions, "get", cmd_sieve, "print a script")
    p.add_argument("address")
    p.add_argument("name")
    p = leaf(actions, "activate", cmd_sieve, "make a script the one that runs at delivery "
             "(without NAME: none runs)")
    p.add_argument("address")
    p.add_argument("name", nargs="?", default="")
    p = leaf(actions, "delete", cmd_sieve, "delete a script (not the active one)")
    p.add_argument("address")
    p.add_argument("name")

    p = leaf(commands, "backup", cmd_backup, "back up accounts, Maildirs, queue, DKIM keys, "
             "certificate and config into a new or empty directory (the server may run)")
    p.add_argument("dest", metavar="DEST_DIR")
    p.add_argument("--copy", action="store_true",
                   help="copy every message (default: hard links where DEST_DIR is on the "
                        "same file system)")
    p = leaf(commands, "restore", cmd_restore, "restore a backup into this configuration's "
             "state_dir and maildir_root (stop the server first)")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("--force", action="store_true",
                   help="replace an accounts database with data, Maildirs with mail, and "
                        "differing DKIM keys or certificate")

    from mailserver.setup_cmd import add_arguments as setup_arguments

    p = leaf(commands, "setup", cmd_setup, "as root: create the service user, the production "
             "config (default /etc/mailserver/mailserver.toml) and the server's directories")
    setup_arguments(p)
    p.set_defaults(writes_config=True)
    return parser


# -- check -------------------------------------------------------------------------------

def cmd_check(config: Config, args: argparse.Namespace) -> int:
    accounts, accounts_problem = _accounts_summary(config)
    rows = [("config", str(config.path)),
            ("hostname", config.server.hostname),
            ("state_dir", str(config.state_dir)),
            ("maildir_root", str(config.maildir_root)),
            ("storage", _storage_summary(config)),
            ("tls", _tls_source(config)),
            ("acme", _acme_summary(config)),
            ("accounts", accounts),
            ("relay", _relay_summary(config)),
            ("inbound", _inbound_summary(config)),
            ("filters", _filters_summary(config)),
            ("sieve", _sieve_summary(config))]
    if config.storage.shared:   # what every node signs and serves with
        at = [key for key, _ in rows].index("storage") + 1
        rows.insert(at, ("shared keys", f"DKIM keys in {config.dkim_dir}, ACME store in "
                                        f"{config.acme_dir}"))
    for key, value in rows:
        print(f"{key:<13} {value}")
    listeners = config.listen.keyed()
    running = _server_running(config)
    problems = {p.key: p for p in probe(listeners)}
    taken: list[str] = []
    for key, endpoint in listeners:
        name = key.split(".", 1)[1].split("[")[0]
        line = f"{name}  {endpoint}  ({_LISTENER_NOTES.get(name, name)})"
        problem = problems.get(key)
        if problem is not None and problem.in_use and running:
            line += "  [listening: the server is running]"
        elif problem is not None and problem.in_use:
            line += "  [PORT IN USE]"
            taken.append(problem.message)
        elif problem is not None:
            line += "  [cannot listen]"
            _warn(problem.message)
        print(line)
    if not listeners:
        _warn("no listener is enabled")
    if config.auth.allow_plaintext_loopback:
        _warn("auth.allow_plaintext_loopback: passwords accepted without TLS from loopback")
    if accounts_problem:
        taken.append(accounts_problem)   # the server would not start either
    taken += _start_problems(config)
    if taken:
        # The server would refuse to start: an error, one line per port.
        for message in taken:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    print("configuration OK")
    return 0


def _server_running(config: Config) -> bool:
    """Is a server running on this state_dir (it holds the queue lock)?  Then its own
    ports are in use, as they should be."""
    from mailserver.fsutil import lock_held

    try:
        return lock_held(config.queue_dir / "lock")
    except OSError:
        return False


def _filters_summary(config: Config) -> str:
    """The delivery filters the server would load (ConfigError, as at start, for a name
    that is not installed)."""
    if not config.filters.plugins:
        return "none"
    from mailserver.filters import load_filters

    load_filters(config.filters.plugins)
    return f"{', '.join(config.filters.plugins)} (timeout {config.filters.timeout:g}s)"


def _sieve_summary(config: Config) -> str:
    """Sieve at delivery in one line; the global scripts compiled as at start (ConfigError
    naming the key for one that does not)."""
    sieve = config.sieve
    if not sieve.enabled:
        return "off (users' scripts do not run at delivery)"
    from mailserver.sieve.delivery import compile_globals

    before, after = compile_globals(sieve)
    return (f"users' scripts, {len(before)} before and {len(after)} after"
            + (f", global includes from {sieve.global_dir}" if sieve.global_dir else ""))


def _inbound_summary(config: Config) -> str:
    """What the MX checks, in one line (README: "What the MX checks")."""
    inbound = config.inbound
    checks = [name for name in ("spf", "dkim", "dmarc", "arc") if getattr(inbound, name)]
    if inbound.dmarc and not inbound.dmarc_enforce:
        checks[checks.index("dmarc")] = "dmarc (not enforced)"
    if inbound.rspamd_url:
        checks.append(f"rspamd {inbound.rspamd_url}")
    if inbound.dnsbl:
        checks.append("dnsbl " + ",".join(inbound.dnsbl))
    if inbound.greet_delay:
        checks.append(f"greet delay {inbound.greet_delay:g}s")
    trusted = ", ".join(inbound.trusted_networks) or "none"
    return f"{', '.join(checks) or 'no checks'}; skipped for {trusted}"


def _storage_summary(config: Config) -> str:
    """[storage] shared or not, and whether this user can write the root."""
    root = config.maildir_root
    if config.storage.shared:
        from mailserver.maildir.shared_disk import INDEX_DIR

        mode = (f"shared Maildir root (indexes node-local in {config.state_dir / INDEX_DIR}, "
                f"mod-sequences in each folder's change log)")
    else:
        mode = "local Maildir root (indexes in the folders)"
    if not root.exists():
        return f"{mode}; root not created yet"
    if not os.access(root, os.W_OK | os.X_OK):
        return f"{mode}; ROOT NOT WRITABLE by this user"
    return mode


def _relay_summary(config: Config) -> str:
    relay = config.relay
    if relay.smarthost:
        auth = f", AUTH as {relay.smarthost_username}" if relay.smarthost_username else ""
        return f"smart host {relay.smarthost} ({relay.smarthost_tls}{auth})"
    resolver = relay.resolver or "resolv.conf"
    return f"MX lookup ({resolver}), port {relay.port}, STARTTLS when offered"


def _start_problems(config: Config) -> list[str]:
    """What the server would refuse at its start that loading the config does not see: a
    file where a directory goes, a certificate and key that do not go together."""
    problems = []
    for key, path in (("server.state_dir", config.state_dir),
                      ("storage.maildir_root", config.maildir_root)):
        try:
            existing = next((p for p in (path, *path.parents) if p.exists()), None)
            if existing is not None and not existing.is_dir():
                problems.append(f"{key}: {existing} is not a directory")
        except OSError:   # a directory this user may not look into: the server's to judge
            continue
    if config.tls.certificate:
        from mailserver.certfiles import CertificateError, load_pair
        files = (Path(config.tls.certificate), Path(config.tls.private_key))
        # (os.access, not Path.exists: that raises in a directory this user may not enter)
        unreadable = [str(f) for f in files if not os.access(f, os.R_OK)]
        if unreadable:   # run as a user who may not read the key: the server's to judge
            _warn(f"tls.certificate: not checked: this user cannot read "
                  f"{', '.join(unreadable)}")
        else:
            try:
                load_pair(*files)
            except CertificateError as e:
                problems.append(f"tls.certificate: {e}")
    return problems


def _tls_source(config: Config) -> str:
    if config.tls.certificate:
        return f"certificate {config.tls.certificate}, key {config.tls.private_key}"
    if config.tls.acme_directory:
        return (f"from ACME, kept in {config.state_dir / 'acme'} (self-signed until "
                f"the first is issued)")
    try:
        from mailserver.tls import certificate_paths
        where = str(certificate_paths(config).certificate.parent)
    except ImportError:
        where = str(config.state_dir)
    return f"self-signed certificate for {config.server.hostname}, generated in {where}"


def _acme_summary(config: Config) -> str:
    """Whether ACME is on, and for which names (the local domains as the server sees
    them now)."""
    if not config.tls.acme_directory:
        return "off"
    from mailserver.acme_settings import describe

    domains: list[str] = []
    if config.accounts.url or config.accounts_db.exists():
        try:
            with open_accounts(config) as accounts:
                domains = accounts.list_domains()
        except AccountsError:
            pass   # PostgreSQL not answering: the accounts line says so
    return describe(config, domains)


def _accounts_summary(config: Config) -> tuple[str, str | None]:
    """The accounts line of `check` (SQLite file, or PostgreSQL database, whether it
    answers, its schema version and counts), and the problem that would stop the server."""
    if config.accounts.url:
        from mailserver.config import display_url

        where = f"postgresql {display_url(config.accounts.url)}"
        try:
            with open_accounts(config) as accounts:
                version = accounts.schema_version()  # type: ignore[attr-defined]
                counts = _counts(accounts)
        except AccountsError as e:
            return f"{where}: NOT ANSWERING", str(e)
        return (f"{where}: answering, schema version {version} ({counts}); fail closed "
                f"after {config.accounts.fail_closed_after:g}s unreachable"), None
    path = config.accounts_db
    if not path.exists():
        return f"sqlite {path} (not created yet)", None
    with Accounts(path) as sqlite:
        return f"sqlite {path} ({_counts(sqlite)})", None


def _counts(accounts: IAccounts) -> str:
    domains = len(accounts.list_domains())
    users = len(accounts.list_users())
    aliases = len(accounts.list_aliases())
    return f"{domains} domains, {users} users, {aliases} aliases"


# -- domains -----------------------------------------------------------------------------

def _open_accounts(config: Config) -> IAccounts:
    """The accounts [accounts] url names, queried directly (SQLite file or PostgreSQL)."""
    accounts = open_accounts(config)
    if not config.accounts.url:
        _match_owner([config.accounts_db, Path(f"{config.accounts_db}-wal"),
                      Path(f"{config.accounts_db}-shm")], config.state_dir)
    return accounts


def cmd_domain_add(config: Config, args: argparse.Namespace) -> int:
    with _open_accounts(config) as accounts:
        _add_domain(config, accounts, args.domain)
    return 0


def _add_domain(config: Config, accounts: IAccounts, domain: str) -> str:
    """A new domain with its DKIM key: every way a domain comes into being ends the same."""
    name = accounts.add_domain(domain)
    try:
        key, created = _dkim_key(config, name)
    except OSError as e:
        # Without its key the domain would be half there: listed, "already exists" to a
        # second try, and no `dns` records to publish.  Taken out again.
        accounts.del_domain(name)
        raise AdminError(f"domain {name} not added: cannot write its DKIM key: "
                         f"{e.strerror or e}") from None
    print(f"domain {name} added")
    if created:
        print(f"DKIM key generated: selector {key.selector} ({key.path}); "
              f"publish it with the records from: {PROG} dns {name}")
    return name


def _dkim_key(config: Config, domain: str):
    """The domain's DKIM key, generated (RSA-2048) when it has none; (key, created)."""
    from mailserver.dkim.keys import generate

    if config.storage.shared:   # on the shared root: every node signs with it
        from mailserver.shared_state import make_private_dirs

        make_private_dirs(config.dkim_dir, config.maildir_root)
    key, created = generate(config.dkim_dir, domain)
    if created and config.storage.shared:
        _match_owner([config.shared_dir, config.dkim_dir, key.path], config.maildir_root)
    elif created:
        _match_owner([config.dkim_dir, key.path], config.state_dir)
    return key, created


def cmd_domain_del(config: Config, args: argparse.Namespace) -> int:
    with _open_accounts(config) as accounts:
        accounts.del_domain(args.domain)
    print(f"domain {_domain_name(args.domain)} deleted")
    return 0


def cmd_domain_list(config: Config, args: argparse.Namespace) -> int:
    with _open_accounts(config) as accounts:
        for name in accounts.list_domains():
            print(name)
    return 0


def _domain_name(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except AddressError as e:
        raise AdminError(f"bad domain {domain!r}: {e}") from None


# -- users -------------------------------------------------------------------------------

def _address(address: str) -> tuple[str, str]:
    try:
        return split_address(address)
    except AddressError as e:
        raise AdminError(f"bad address {address!r}: {e}") from None


def _read_password(from_stdin: bool) -> str:
    """The new password: first stdin line, or typed twice at a getpass prompt."""
    if from_stdin:
        password = sys.stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    else:
        password = _prompt("Password: ")
        if password != _prompt("Retype password: "):
            raise AdminError("passwords do not match")
    if not password:
        raise AdminError("empty password refused")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:   # octets that are no UTF-8, read with surrogateescape
        raise AdminError("the password is not valid UTF-8") from None
    return password


def _prompt(prompt: str) -> str:
    """getpass at the terminal.  Without one getpass would read standard input with the
    echo on (after a warning); here that is refused, and end of input (Ctrl-D, stdin
    closed) is an error line too, not a traceback."""
    no_terminal = AdminError("no terminal to ask for the password; give it on standard "
                             "input with --password-stdin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(prompt)
        except getpass.GetPassWarning:
            raise no_terminal from None
        except EOFError:
            print(file=sys.stderr)   # end the prompt's line
            raise AdminError("no password given (end of input)") from None


# A quota the accounts database and IMAP's QUOTA (in KiB) can hold; 0 is no quota.
QUOTA_MIN, QUOTA_MAX = 1024, 8388607 << 40   # 1K to 8388607T: below 2^63 (SQLite)


def cmd_user_add(config: Config, args: argparse.Namespace) -> int:
    local, domain = _address(args.address)
    address = f"{local}@{domain}"
    quota = None
    if args.quota is not None:
        try:
            quota = parse_size(args.quota)
        except SizeTooLarge:
            quota = QUOTA_MAX + 1
        except ValueError as e:
            raise AdminError(f"--quota: {e}") from None
        if not QUOTA_MIN <= quota <= QUOTA_MAX:
            raise AdminError(f"--quota {args.quota}: a quota is from 1K to 8388607T "
                             f"(leave --quota out for none)")
    with _open_accounts(config) as accounts:
        if not accounts.is_local_domain(domain):
            raise AdminError(f"no such domain: {domain} (add it with: {PROG} domain add {domain})")
        if accounts.get_user(address):
            raise AdminError(f"user already exists: {address}")
        password_hash = hash_password(_read_password(args.password_stdin))
        _create_maildir(config, domain, local)
        accounts.add_user(address, password_hash, quota)
    print(f"user {address} added")
    return 0


def _create_maildir(config: Config, domain: str, local: str) -> None:
    """The user's Maildir with INBOX and the standard folders (idempotent)."""
    try:
        from mailserver.maildir import MaildirStore
    except ImportError as e:
        if e.name and e.name.startswith("mailserver.maildir"):
            _warn(f"Maildir for {local}@{domain} not created: {e}")
            return
        raise
    try:
        MaildirStore(config.maildir_root).create_user(domain, local)
    except ValueError as e:   # a name no directory may have ('a/b'): no such user
        raise AdminError(f"{local}@{domain} cannot have a Maildir: {e}") from None
    _match_owner([config.maildir_root / domain], config.maildir_root, recursive=True)


def cmd_user_passwd(config: Config, args: argparse.Namespace) -> int:
    local, domain = _address(args.address)
    address = f"{local}@{domain}"
    with _open_accounts(config) as accounts:
        if accounts.get_user(address) is None:
            raise AdminError(f"no such user: {address}")
        accounts.set_password(address, hash_password(_read_password(args.password_stdin)))
    print(f"password of {address} changed")
    return 0


def cmd_user_del(config: Config, args: argparse.Namespace) -> int:
    local, domain = _address(args.address)
    with _open_accounts(config) as accounts:
        user = accounts.del_user(f"{local}@{domain}")
        naming = _aliases_naming(accounts, user.address)
    maildir = config.maildir_root / user.domain / user.localpart
    print(f"user {user.address} deleted (mail kept in {maildir})")
    if naming:
        # What `alias add` refuses to make: a local target that reaches nobody.
        _warn(f"{len(naming)} alias(es) still name {user.address}, whose mail now goes nowhere "
              f"there: {', '.join(naming)} (see `alias list`; `alias del` removes one)")
    return 0


def _aliases_naming(accounts: IAccounts, address: str) -> list[str]:
    """The aliases (and catch-alls) with `address` among their targets, any case."""
    out = []
    for source, targets in accounts.list_aliases():
        for target in targets:
            try:
                if normalize(target) == address:
                    out.append(source)
                    break
            except AddressError:
                continue
    return out


def cmd_user_list(config: Config, args: argparse.Namespace) -> int:
    with _open_accounts(config) as accounts:
        if args.domain is not None and not accounts.is_local_domain(args.domain):
            raise AdminError(f"no such domain: {_domain_name(args.domain)}")
        from mailserver.maildir import MaildirStore
        from mailserver.maildir.quota import read_usage

        store = MaildirStore(config.maildir_root)
        for user in accounts.list_users(args.domain):
            if user.quota is None:
                print(user.address)
                continue
            # Usage from maildirsize (counted when it cannot be trusted; never written).
            usage = read_usage(store.user_path(user.domain, user.localpart), user.quota)
            print(f"{user.address}  quota={user.quota}  used={usage.bytes} "
                  f"({100 * usage.bytes // max(user.quota, 1)}%)")
    return 0


def cmd_user_import(config: Config, args: argparse.Namespace) -> int:
    """Dovecot passwd-file lines: user@domain:{SCHEME}hash:uid:gid:gecos:home:shell:extra."""
    path = Path(args.passwd_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AdminError(f"{path}: not UTF-8 text") from None
    imported = skipped = 0
    with _open_accounts(config) as accounts:
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path.name}:{number}"
            fields = line.split(":", 7)
            user_field = fields[0].strip()
            password_hash = fields[1].strip() if len(fields) > 1 else ""
            try:
                local, domain = split_address(user_field)
            except AddressError as e:
                _warn(f"{where}: bad address {user_field!r}: {e}; skipped")
                skipped += 1
                continue
            address = f"{local}@{domain}"
            if not password_hash:
                _warn(f"{where}: {address} has no password; skipped")
                skipped += 1
                continue
            if accounts.get_user(address):
                _warn(f"{where}: {address} already exists; skipped")
                skipped += 1
                continue
            if not is_supported_hash(password_hash):
                _warn(f"{where}: {address}: unsupported password scheme, imported but "
                      f"cannot log in until: {PROG} user passwd {address}")
            if not accounts.is_local_domain(domain):
                # As `domain add` does, DKIM key included: a migrated domain signs its
                # mail from the first message (the passwd-file names the domains moving).
                _add_domain(config, accounts, domain)
            quota = _passwd_file_quota(fields[7] if len(fields) > 7 else "", where)
            try:
                _create_maildir(config, domain, local)
            except AdminError as e:
                _warn(f"{where}: {e}; skipped")
                skipped += 1
                continue
            accounts.add_user(address, password_hash, quota)
            imported += 1
    print(f"imported {imported} users" + (f", skipped {skipped}" if skipped else ""))
    return 0


def _passwd_file_quota(extra: str, where: str) -> int | None:
    """The storage limit from a 'userdb_quota_rule=*:storage=1G' extra field, if any."""
    for item in extra.split():
        key, _, value = item.partition("=")
        if key not in ("userdb_quota_rule", "quota_rule") or not value.startswith("*:storage="):
            continue
        size = value[len("*:storage="):]
        try:
            quota = parse_size(size)
        except ValueError:
            _warn(f"{where}: quota {size!r} not understood; ignored")
            continue
        if quota == 0:
            return None
        if not QUOTA_MIN <= quota <= QUOTA_MAX:   # as `user add --quota` allows
            _warn(f"{where}: quota {size!r} is not from 1K to 8388607T; ignored")
            continue
        return quota
    return None


# -- aliases -----------------------------------------------------------------------------

def cmd_alias_add(config: Config, args: argparse.Namespace) -> int:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise AdminError("no alias target given")
    source = _alias_name(args.alias)
    with _open_accounts(config) as accounts:
        all_targets = accounts.add_alias(source, targets, check_local_targets=True)
    print(f"alias {source} -> {', '.join(all_targets)}")
    return 0


def cmd_alias_del(config: Config, args: argparse.Namespace) -> int:
    source = _alias_name(args.alias)
    with _open_accounts(config) as accounts:
        accounts.del_alias(source)
    print(f"alias {source} deleted")
    return 0


def _alias_name(alias: str) -> str:
    """'Sales@Example.org' -> 'sales@example.org'; '@Example.org' (catch-all) likewise."""
    if alias.startswith("@") and alias.count("@") == 1:
        return "@" + _domain_name(alias[1:])
    return "@".join(_address(alias))


def cmd_alias_list(config: Config, args: argparse.Namespace) -> int:
    with _open_accounts(config) as accounts:
        for source, targets in accounts.list_aliases():
            print(f"{source} -> {', '.join(targets)}")
    return 0


# -- queue -------------------------------------------------------------------------------

def cmd_queue_list(config: Config, args: argparse.Namespace) -> int:
    from mailserver.queueadmin import list_queue

    list_queue(config, print)
    return 0


def cmd_queue_flush(config: Config, args: argparse.Namespace) -> int:
    from mailserver.queueadmin import QueueAdminError, flush_queue

    try:
        print(flush_queue(config, lambda paths: _match_owner(paths, config.state_dir)))
    except QueueAdminError as e:
        raise AdminError(str(e)) from None
    return 0


def cmd_queue_delete(config: Config, args: argparse.Namespace) -> int:
    from mailserver.queueadmin import QueueAdminError, delete_message

    try:
        print(delete_message(config, args.id))
    except QueueAdminError as e:
        raise AdminError(str(e)) from None
    return 0


# -- setup (mailserver/setup_cmd.py) -------------------------------------------------------

def cmd_setup(config: None, args: argparse.Namespace) -> int:
    from mailserver.setup_cmd import SetupError, run_setup

    try:
        return run_setup(args)
    except SetupError as e:
        raise AdminError(str(e)) from None


# -- backup and restore (mailserver/backup.py, mailserver/restore.py) -----------------------

def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    from mailserver.backup import BackupError, backup

    try:
        result = backup(config, Path(args.dest), copy=args.copy)
    except BackupError as e:
        raise AdminError(str(e)) from None
    print(result.summary())
    return 0


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    from mailserver.backup import BackupError
    from mailserver.restore import restore

    try:
        restore(config, Path(args.src), force=args.force, say=print)
    except BackupError as e:
        raise AdminError(str(e)) from None
    # Run as root: what was written belongs to the server's user, as other commands do.
    _match_owner([config.state_dir], config.state_dir, recursive=True)
    _match_owner([config.maildir_root], config.maildir_root, recursive=True)
    return 0


# -- Sieve scripts -------------------------------------------------------------------------

def cmd_sieve(config: Config, args: argparse.Namespace) -> int:
    """mailserver-admin sieve ACTION ADDRESS ...: mailserver.sieveadmin on the user's Maildir."""
    from mailserver.sieveadmin import SieveAdminError, run

    local, domain = _address(args.address)
    with _open_accounts(config) as accounts:
        user = accounts.get_user(f"{local}@{domain}")
    if user is None:
        raise AdminError(f"no such user: {local}@{domain}")
    user_path = config.maildir_root / user.domain / user.localpart
    if args.action != "list" and not (user_path / "cur").is_dir():
        _create_maildir(config, user.domain, user.localpart)
    try:
        return run(config, args, user.address, user_path)
    except SieveAdminError as e:
        raise AdminError(str(e)) from None


# -- DNS records ---------------------------------------------------------------------------

def cmd_dns(config: Config, args: argparse.Namespace) -> int:
    from mailserver.dkim.keys import keys_for
    from mailserver.dnsrecords import records

    name = _domain_name(args.domain)
    with _open_accounts(config) as accounts:
        if not accounts.is_local_domain(name):
            raise AdminError(f"no such domain: {name} (add it with: {PROG} domain add {name})")
    if not keys_for(config.dkim_dir, name):
        key, _ = _dkim_key(config, name)  # a domain added before DKIM keys existed
        _warn(f"DKIM key generated for {name}: selector {key.selector}")
    for line in records(config, name, keys_for(config.dkim_dir, name)):
        print(line)
    return 0


# -- ownership -----------------------------------------------------------------------------

def _match_owner(paths: list[Path], reference: Path, recursive: bool = False) -> None:
    """Run as root, hand new files to the owner of `reference` (the server's user), so a
    server that dropped privileges can still write what the admin created."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    try:
        st = reference.stat()
    except OSError:
        return
    if st.st_uid == 0:
        return
    for path in paths:
        if not path.exists():
            continue
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
        if recursive and path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), st.st_uid, st.st_gid,
                             follow_symlinks=False)


if __name__ == "__main__":
    sys.exit(main())
