"""A throwaway PostgreSQL cluster for the tests: initdb, pg_ctl start, databases, pg_ctl stop.

The server binaries come from Debian's `postgresql` package (/usr/lib/postgresql/<v>/bin,
not on PATH) or from PATH.  A test that needs them skips when they (or psycopg) are
missing, and fails instead when MAILSERVER_REQUIRE_INTEROP=1, as the other interop tests.

initdb and postgres refuse to run as root: run as root, the cluster belongs to the
`postgres` user (else `nobody`), its directory made for that user under /tmp (pytest's
own temporary directories are private to root).  It listens on 127.0.0.1 at a free port
and on a Unix socket in that directory; every local connection is trusted.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

SUPERUSER = "postgres"


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("MAILSERVER_REQUIRE_INTEROP") == "1":
        pytest.fail(f"{reason}, and MAILSERVER_REQUIRE_INTEROP=1 requires it", pytrace=False)
    pytest.skip(f"{reason} (set MAILSERVER_REQUIRE_INTEROP=1 to make this a failure)")


def find_bindir() -> Path | None:
    """The directory with initdb, pg_ctl and postgres: PATH, else the newest Debian one."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "initdb").is_file() and d.parent.name.isdigit():
            versions.append((int(d.parent.name), d))
    return max(versions)[1] if versions else None


def require_postgresql() -> Path:
    """The binaries' directory and a working psycopg, or skip (fail under
    MAILSERVER_REQUIRE_INTEROP=1)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _fail_or_skip("psycopg is not installed (pip install -e '.[test]')")
    bindir = find_bindir()
    if bindir is None:
        _fail_or_skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    return bindir  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One PostgreSQL server in a temporary directory, stopped and removed by `destroy`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.owner = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.owner is None:
                _fail_or_skip("running as root, but no 'postgres' or 'nobody' user to run "
                              "PostgreSQL as")
        self.root = Path(tempfile.mkdtemp(prefix="mailserver-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgresql.log"
        self.port = _free_port()
        self._counter = 0
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--no-locale", "-E", "UTF8", "--no-sync")
        self.start()

    # -- process control

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kwargs: dict[str, Any] = {}
        if self.owner is not None:
            kwargs.update(user=self.owner.pw_uid, group=self.owner.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
               "HOME": str(self.root)}
        cp = subprocess.run([str(self.bindir / tool), *args], cwd=self.root, env=env,
                            capture_output=True, text=True, timeout=120, **kwargs)
        if check and cp.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} exited {cp.returncode}:\n"
                               f"{cp.stdout}\n{cp.stderr}\n{self.log_text()}")
        return cp

    def start(self) -> None:
        options = " ".join([
            f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.root}",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=200", "-c shared_buffers=16MB",
        ])
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Fast shutdown: every client's connection is ended at once."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop",
                  check=False)

    def destroy(self) -> None:
        """Stop at once (immediate: nothing is kept) and remove the directory."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60",
                      "stop", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- databases

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.url(dbname), autocommit=True)

    def _name(self, prefix: str) -> str:
        self._counter += 1
        return re.sub(r"[^a-z0-9_]", "_", f"{prefix}_{os.getpid()}_{self._counter}".lower())

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        name = self._name(prefix)
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_schema(self, prefix: str = "s") -> str:
        """A new, empty schema in the database "postgres"; the URL of a connection that
        works in it (search_path).  Milliseconds, where a database copies megabytes."""
        name = self._name(prefix)
        with self.connect() as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url()}?options=-csearch_path%3D{name}"


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
