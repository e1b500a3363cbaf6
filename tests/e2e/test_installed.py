"""The README's run command as a user runs it: the installed `twistd` script, from a
directory outside the checkout, without PYTHONPATH, finds the mailserver plugin and
serves.  Whichever of the README's two install commands ran last (`pip install .` or the
editable `pip install -e '.[test]'` of the test command), this must hold."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from harness import HOSTNAME, free_port, port_is_listening, toml_text, wait_until


def _twistd() -> str:
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if not found:
        pytest.fail("no twistd script installed beside this Python", pytrace=False)
    return found


def _user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return env


def test_twistd_lists_the_plugin_outside_the_checkout(tmp_path):
    cp = subprocess.run([_twistd(), "--help"], cwd=tmp_path, env=_user_env(),
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert any(line.split()[:1] == ["mailserver"] for line in cp.stdout.splitlines()), \
        cp.stdout


def test_twistd_mailserver_serves_outside_the_checkout(tmp_path):
    port = free_port()
    listen = {s: "" for s in ("submission", "submissions", "imap", "imaps", "pop3",
                              "pop3s", "autoconfig", "autoconfig_http", "managesieve")}
    listen["smtp"] = f"tcp:{port}:interface=127.0.0.1"
    config = tmp_path / "mailserver.toml"
    config.write_text(toml_text({"server": {"hostname": HOSTNAME, "state_dir": "var"},
                                 "storage": {"maildir_root": "maildirs"},
                                 "listen": listen}))
    proc = subprocess.Popen([_twistd(), "-n", "--pidfile=", "--logfile=twistd.log",
                             "mailserver", "--config", str(config)], cwd=tmp_path,
                            env=_user_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: port_is_listening(port) or proc.poll() is not None, 60)
        assert proc.poll() is None, (tmp_path / "twistd.log").read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            code, banner = client.ehlo("client.example.test")
        assert code == 250 and HOSTNAME.encode() in banner
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
