"""fetchmail against the real server: pulls every message into an MDA command, and with
`keep` and UIDL never fetches a message twice across runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness import PASSWORD, make_message, message_id_of, requires_tool, send_mail

ALICE = "alice@example.test"

# The MDA: stores the message fetchmail pipes to it as one file in the directory given.
MDA_SCRIPT = """\
import os, sys, time
data = sys.stdin.buffer.read()
path = os.path.join(sys.argv[1], "%d.%d" % (time.time_ns(), os.getpid()))
with open(path, "wb") as f:
    f.write(data)
"""


class Fetchmail:
    """A fetchmail set-up in its own directory: rc file, id file, MDA and its output."""

    def __init__(self, root: Path, server, *, port: int, ssl: bool, keep: bool) -> None:
        self.exe = requires_tool("fetchmail")
        self.root = root
        self.out = root / "delivered"
        self.out.mkdir(parents=True)
        mda = root / "mda.py"
        mda.write_text(MDA_SCRIPT)
        tls = "ssl" if ssl else "sslproto 'tls1.2+'"  # the latter: STLS, and required
        self.rc = root / "fetchmailrc"
        self.rc.write_text(
            f'set idfile "{root / "fetchids"}"\n'
            "set no bouncemail\n"
            f"poll 127.0.0.1 protocol pop3 port {port} uidl\n"
            f'  user "{ALICE}" password "{PASSWORD}"\n'
            f"  {tls} no sslcertck {'keep' if keep else 'nokeep'}\n"
            f'  mda "{sys.executable} {mda} {self.out}"\n')
        os.chmod(self.rc, 0o600)  # fetchmail refuses a readable rc file

    def run(self) -> subprocess.CompletedProcess:
        env = dict(os.environ, HOME=str(self.root), FETCHMAILHOME=str(self.root))
        cp = subprocess.run([self.exe, "-f", str(self.rc), "--nosyslog", "-v"],
                            capture_output=True, text=True, env=env, timeout=60)
        # 0: mail fetched, 1: no mail; anything else is an error
        assert cp.returncode in (0, 1), \
            f"fetchmail exited {cp.returncode}:\n{cp.stdout}\n{cp.stderr}"
        return cp

    def delivered_ids(self) -> list[str]:
        return sorted(message_id_of(p.read_bytes()) or "" for p in self.out.iterdir())


def deliver(server, count: int, tag: str) -> list[str]:
    ids = []
    for i in range(count):
        msgid = f"<fetchmail-{tag}-{i}-{time.monotonic_ns()}@remote.test>"
        send_mail(server, make_message(msgid, subject=f"{tag} {i}",
                                       body=b"Body line\r\n.starts with a dot\r\n"), [ALICE])
        ids.append(msgid)
    return ids


def test_fetchmail_keep_and_uidl_fetches_each_message_once(server, tmp_path):
    fm = Fetchmail(tmp_path / "fm", server, port=server.ports["pop3s"], ssl=True, keep=True)
    first = deliver(server, 3, "first")
    cp = fm.run()
    assert cp.returncode == 0
    assert fm.delivered_ids() == sorted(first)
    cp = fm.run()
    assert cp.returncode == 1, cp.stdout + cp.stderr  # nothing new: nothing fetched again
    assert fm.delivered_ids() == sorted(first)
    second = deliver(server, 1, "second")
    cp = fm.run()
    assert cp.returncode == 0
    assert fm.delivered_ids() == sorted(first + second)
    assert len(server.messages(ALICE)) == 4  # `keep`: all still on the server
    stored = next(p for p in fm.out.iterdir())
    assert b"\n.starts with a dot" in stored.read_bytes()  # dot-stuffing undone by the client


def test_fetchmail_over_stls_without_keep_removes_fetched_mail(server, tmp_path):
    fm = Fetchmail(tmp_path / "fm", server, port=server.ports["pop3"], ssl=False, keep=False)
    ids = deliver(server, 2, "stls")
    cp = fm.run()
    assert cp.returncode == 0
    assert "STLS" in cp.stdout + cp.stderr
    assert fm.delivered_ids() == sorted(ids)
    assert server.messages(ALICE) == []
    cp = fm.run()
    assert cp.returncode == 1
    assert fm.delivered_ids() == sorted(ids)
