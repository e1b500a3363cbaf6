"""A bad config stops twistd before anything listens, and `mailserver-admin check` names
the offending key; a good config is listed by `check`, listener by listener."""

from __future__ import annotations

import re

import pytest

from harness import SERVICES, port_is_listening


def key_pattern(section: str, key: str) -> re.Pattern:
    """`section.key` or `[section] key` / `[section].key`."""
    s, k = re.escape(section), re.escape(key)
    return re.compile(rf"\b{s}\.{k}\b|\[{s}\]\.?\s*{k}\b")


BAD_CONFIGS = {
    "unknown-key": ({"limits": {"max_recipientz": 5}}, ("limits", "max_recipientz")),
    "wrong-type": ({"limits": {"max_recipients": "many"}}, ("limits", "max_recipients")),
    "bad-endpoint": ({"listen": {"smtp": "tcpp:25"}}, ("listen", "smtp")),
    "missing-certificate": (
        {"tls": {"certificate": "missing/cert.pem", "private_key": "missing/key.pem"}},
        ("tls", "certificate")),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_refused(make_server, case):
    overrides, (section, key) = BAD_CONFIGS[case]
    srv = make_server(start=False, accounts=False, **overrides)
    pattern = key_pattern(section, key)

    code, output = srv.run_to_exit(timeout=30)
    assert code == 1, f"twistd exit code {code} (expected 1)\n{srv.diagnostics()}"
    assert pattern.search(output), f"twistd output does not name {section}.{key}:\n{output[-3000:]}"
    listening = [s for s, p in srv.ports.items() if port_is_listening(p)]
    assert not listening, f"listening after a refused start: {listening}"

    cp = srv.admin("check")
    assert cp.returncode == 1, f"check exit code {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    assert pattern.search(cp.stderr), f"check stderr does not name {section}.{key}: {cp.stderr!r}"
    assert "Traceback" not in cp.stderr, f"check printed a traceback:\n{cp.stderr}"


def test_check_lists_every_listener(make_server):
    srv = make_server(start=False, accounts=False)
    cp = srv.admin("check")
    assert cp.returncode == 0, f"check exit code {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    lines = cp.stdout.splitlines()
    for service in SERVICES:
        port = str(srv.ports[service])
        hits = [line for line in lines
                if re.search(rf"\b{service}\b", line) and re.search(rf"\b{port}\b", line)]
        assert hits, f"check does not list {service} on port {port}:\n{cp.stdout}"
    assert not any(port_is_listening(p) for p in srv.ports.values())
