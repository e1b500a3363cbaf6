"""A real rspamd on loopback for tests, with a standalone configuration written per run.

Nothing from /etc/rspamd is read: no Lua plugins, no Redis, no controller, one normal worker on
a free 127.0.0.1 port, DNS pointed at a closed loopback port (rspamd never asks the system
resolver), caches and logs inside the work directory.  The URL matcher gets a short TLD list:
compiling the package's 9,600-suffix list takes rspamd about 12 s, the short one well under 1 s.

Deterministic rules make each action reachable by message content (the Subject):

    RSPAMD-TEST-REJECT          symbol RSPAMD_TEST_REJECT, score 100     -> "reject"
    RSPAMD-TEST-REWRITESUBJECT  symbol RSPAMD_TEST_REWRITESUBJECT, 10    -> "rewrite subject"
                                (subject becomes "[SPAM] <original>")
    RSPAMD-TEST-ADDHEADER       symbol RSPAMD_TEST_ADDHEADER, score 7    -> "add header"
    RSPAMD-TEST-GREYLIST        symbol RSPAMD_TEST_GREYLIST, score 5     -> "greylist"
    RSPAMD-TEST-SOFTREJECT      forced action "soft reject" with message SOFT_REJECT_MESSAGE
    GTUBE string in the body    rspamd's own GTUBE handling              -> "reject"
    anything else                                                        -> "no action"

What rspamd saw of the envelope can be checked the same way: a header
`X-Rspamd-Test-Expect-<Fact>: value` makes symbol RSPAMD_TEST_SAW_<FACT> fire when rspamd's
value equals it, RSPAMD_TEST_WRONG_<FACT> (option: what rspamd saw) when not.  Facts: IP, HELO,
FROM, RCPT (recipients joined with ","), USER, QUEUE_ID, HOSTNAME, MTA_NAME.

    with start_rspamd(tmp_path) as rspamd:
        ... RspamdClient(rspamd.url, ...) ...
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

THRESHOLDS = {"greylist": 4, "add_header": 6, "rewrite_subject": 8, "reject": 15}
SUBJECT_TEMPLATE = "[SPAM] %s"
SOFT_REJECT_MESSAGE = "Try again later (RSPAMD-TEST-SOFTREJECT)"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ENVELOPE_FACTS = ("IP", "HELO", "FROM", "RCPT", "USER", "QUEUE_ID", "HOSTNAME", "MTA_NAME")

# Suffixes the URL matcher knows (see the module docstring for why not the full list).
TLDS = ("com", "net", "org", "info", "biz", "io", "edu", "gov", "mil", "int", "arpa", "eu",
        "de", "fr", "nl", "it", "es", "ru", "cn", "jp", "br", "in", "au", "ca", "ch", "at",
        "be", "se", "no", "dk", "fi", "pl", "cz", "uk", "co.uk", "org.uk", "us", "xyz", "top",
        "online", "site", "club", "test", "example", "invalid", "localhost", "local")

RULES_LUA = r"""
-- Deterministic rules for tests: each marker in the Subject forces one action.
local function subject_has(task, marker)
  local subject = task:get_header('Subject')
  return subject ~= nil and string.find(subject, marker, 1, true) ~= nil
end

local function marker_symbol(name, marker, score)
  rspamd_config:register_symbol{
    name = name, score = score, group = 'rspamd_test',
    description = 'Subject contains ' .. marker,
    callback = function(task)
      if subject_has(task, marker) then return true end
      return false
    end,
  }
end

marker_symbol('RSPAMD_TEST_REJECT', 'RSPAMD-TEST-REJECT', 100.0)
marker_symbol('RSPAMD_TEST_REWRITESUBJECT', 'RSPAMD-TEST-REWRITESUBJECT', 10.0)
marker_symbol('RSPAMD_TEST_ADDHEADER', 'RSPAMD-TEST-ADDHEADER', 7.0)
marker_symbol('RSPAMD_TEST_GREYLIST', 'RSPAMD-TEST-GREYLIST', 5.0)

rspamd_config:register_symbol{
  name = 'RSPAMD_TEST_SOFTREJECT', type = 'prefilter', priority = 10, group = 'rspamd_test',
  callback = function(task)
    if subject_has(task, 'RSPAMD-TEST-SOFTREJECT') then
      task:insert_result('RSPAMD_TEST_SOFTREJECT', 1.0)
      task:set_pre_result('soft reject', SOFT_REJECT_MESSAGE, 'rspamd_test')
    end
  end,
}

local function addresses(list)
  local out = {}
  for _, a in ipairs(list or {}) do out[#out + 1] = a.addr or '' end
  return table.concat(out, ',')
end

local seen = {
  IP = function(task)
    local ip = task:get_from_ip()
    if ip and ip:is_valid() then return ip:to_string() end
    return ''
  end,
  HELO = function(task) return task:get_helo() or '' end,
  FROM = function(task) return addresses(task:get_from('smtp')) end,
  RCPT = function(task) return addresses(task:get_recipients('smtp')) end,
  USER = function(task) return task:get_user() or '' end,
  QUEUE_ID = function(task) return task:get_queue_id() or '' end,
  HOSTNAME = function(task) return task:get_hostname() or '' end,
  MTA_NAME = function(task) return task:get_request_header('MTA-Name') or '' end,
}

local envelope_id = rspamd_config:register_symbol{
  name = 'RSPAMD_TEST_ENVELOPE', type = 'callback', group = 'rspamd_test',
  callback = function(task)
    for fact, get in pairs(seen) do
      local expected = task:get_header('X-Rspamd-Test-Expect-' .. fact:gsub('_', '-'))
      if expected ~= nil then
        local actual = tostring(get(task))
        if actual == expected then
          task:insert_result('RSPAMD_TEST_SAW_' .. fact, 1.0)
        else
          task:insert_result('RSPAMD_TEST_WRONG_' .. fact, 1.0, actual)
        end
      end
    end
  end,
}
for fact, _ in pairs(seen) do
  for _, kind in ipairs({'SAW', 'WRONG'}) do
    rspamd_config:register_symbol{
      name = 'RSPAMD_TEST_' .. kind .. '_' .. fact, type = 'virtual', parent = envelope_id,
      score = 0.0, group = 'rspamd_test',
    }
  end
end
"""


def rspamd_binary() -> str | None:
    return shutil.which("rspamd")


def rspamd_available() -> bool:
    return rspamd_binary() is not None


def requires_rspamd() -> str:
    """Path of rspamd; skips the test when it is missing, unless MAILSERVER_REQUIRE_INTEROP=1,
    then the missing binary fails the test (as tests/e2e/harness.py requires_tool does)."""
    path = rspamd_binary()
    if path:
        return path
    if os.environ.get("MAILSERVER_REQUIRE_INTEROP") == "1":
        pytest.fail("rspamd is not installed, and MAILSERVER_REQUIRE_INTEROP=1 requires it "
                    "(apt-get install rspamd, or unset the variable)", pytrace=False)
    pytest.skip("rspamd not installed (set MAILSERVER_REQUIRE_INTEROP=1 to make this a failure)")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ucl(value: str) -> str:
    return json.dumps(value)   # a JSON string is a valid UCL string


@dataclass(eq=False)
class RspamdProcess:
    """One running rspamd; `url` is its normal worker ("http://127.0.0.1:PORT")."""

    workdir: Path
    port: int
    process: subprocess.Popen
    startup_seconds: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "rspamd.log"

    def log(self) -> str:
        """rspamd's log (and its early stderr), for assertion messages."""
        parts = []
        for name in ("rspamd.out", "rspamd.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (rspamd's main process stops its workers), SIGKILL of the process group
        after 5 s."""
        if self._stopped:
            return
        self._stopped = True
        _running.discard(self)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)   # its own session: only its workers
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(5)

    def __enter__(self) -> "RspamdProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_running: set[RspamdProcess] = set()


@atexit.register
def _stop_all() -> None:
    for proc in list(_running):
        proc.stop()


def write_config(workdir: Path, port: int, *, extra_lua: str = "", extra_config: str = "") -> Path:
    """Write rspamd.conf, rules.lua and tlds.dat into `workdir`; returns the config path."""
    for sub in ("db", "run", "tmp"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    (workdir / "tlds.dat").write_text("\n".join(TLDS) + "\n")
    lua = RULES_LUA.replace("SOFT_REJECT_MESSAGE", json.dumps(SOFT_REJECT_MESSAGE))
    (workdir / "rules.lua").write_text(lua + "\n" + extra_lua)
    dns_port = free_port(socket.SOCK_DGRAM)   # closed: every query fails at once, on loopback
    db = workdir / "db"
    actions = "\n".join(f"  {name} = {score};" for name, score in THRESHOLDS.items())
    config = f"""
options {{
  pidfile = {_ucl(str(workdir / "run" / "rspamd.pid"))};
  filters = "";
  dns {{
    nameserver = [{_ucl(f"127.0.0.1:{dns_port}")}];
    timeout = 0.2s;
    retransmits = 1;
    sockets = 1;
  }}
  tempdir = {_ucl(str(workdir / "tmp"))};
  url_tld = {_ucl(str(workdir / "tlds.dat"))};
  hs_cache_dir = {_ucl(str(db) + "/")};
  cache_file = {_ucl(str(db / "symbols.cache"))};
  stats_file = {_ucl(str(db / "stats.ucl"))};
  history_file = {_ucl(str(db / "rspamd.history"))};
  dynamic_conf = {_ucl(str(db / "rspamd_dynamic"))};
  disable_hyperscan = true;
  allow_raw_input = true;
  local_addrs = [];
  task_timeout = 8s;
}}
logging {{
  type = "file";
  filename = {_ucl(str(workdir / "rspamd.log"))};
  level = "info";
}}
worker "normal" {{
  bind_socket = {_ucl(f"127.0.0.1:{port}")};
  count = 1;
  mime = true;
}}
actions {{
{actions}
  subject = {_ucl(SUBJECT_TEMPLATE)};
}}
lua = {_ucl(str(workdir / "rules.lua"))};
{extra_config}
"""
    path = workdir / "rspamd.conf"
    path.write_text(config)
    return path


def _pings(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/ping")
        response = conn.getresponse()
        return response.status == 200 and response.read().strip() == b"pong"
    except OSError:
        return False
    finally:
        conn.close()


def start_rspamd(workdir: Path, *, extra_lua: str = "", extra_config: str = "",
                 timeout: float = 30.0) -> RspamdProcess:
    """Start rspamd with the configuration above in `workdir` (created if needed) and wait
    until it answers GET /ping.  `extra_lua` is appended to the rules, `extra_config` to the
    top level of the configuration.  Raises RuntimeError (with rspamd's log) on failure."""
    binary = requires_rspamd()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for _ in range(3):   # the free port may be taken between the check and rspamd's bind
        port = free_port()
        config = write_config(workdir, port, extra_lua=extra_lua, extra_config=extra_config)
        for name in ("rspamd.log", "rspamd.out"):
            (workdir / name).unlink(missing_ok=True)
        variables = []
        for name, value in (("DBDIR", workdir / "db"), ("RUNDIR", workdir / "run"),
                            ("LOGDIR", workdir), ("CONFDIR", workdir),
                            ("LOCAL_CONFDIR", workdir)):
            variables += ["--var", f"{name}={value}"]
        started = time.monotonic()
        with open(workdir / "rspamd.out", "wb") as out:
            # -f: stay in the foreground; -i: allowed to run as root (tests run as root in CI)
            process = subprocess.Popen([binary, "-f", "-i", "-c", str(config), *variables],
                                       stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        proc = RspamdProcess(workdir, port, process)
        _running.add(proc)
        deadline = started + timeout
        while time.monotonic() < deadline and proc.alive():
            if _pings(port):
                proc.startup_seconds = time.monotonic() - started
                return proc
            time.sleep(0.05)
        last_log = proc.log()
        proc.stop()
        if "bind" not in last_log.lower():
            break
    raise RuntimeError(f"rspamd did not start:\n{last_log[-4000:]}")
