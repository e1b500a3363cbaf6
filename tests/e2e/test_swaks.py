"""Interoperability with swaks, a real SMTP client, on the MX port."""

from __future__ import annotations

import subprocess

import pytest

from harness import HOSTNAME, header_values, header_fields, requires_tool, split_header_body

ALICE = "alice@example.test"


def swaks(server, *args: str) -> subprocess.CompletedProcess:
    exe = requires_tool("swaks")
    argv = [exe, "--server", f"127.0.0.1:{server.smtp_port}", "--from", "x@remote.test",
            "--helo", "client.remote.test", "--timeout", "20", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def server(make_server):
    requires_tool("swaks")  # before starting anything
    return make_server()


def test_swaks_plain(server):
    cp = swaks(server, "--to", ALICE)
    assert cp.returncode == 0, f"swaks exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    files = server.messages(ALICE)
    assert len(files) == 1, f"delivered: {files}"
    head, _ = split_header_body(files[0].read_bytes())
    fields = header_fields(head)
    assert header_values(fields, "Return-Path") == ["<x@remote.test>"]
    assert any(HOSTNAME in v for v in header_values(fields, "Received"))


def test_swaks_starttls(server):
    cp = swaks(server, "--to", ALICE, "--tls")
    assert cp.returncode == 0, f"swaks exit {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    assert "TLS started" in cp.stdout + cp.stderr, cp.stdout
    files = server.messages(ALICE)
    assert len(files) == 1, f"delivered: {files}"
    head, _ = split_header_body(files[0].read_bytes())
    received = header_values(header_fields(head), "Received")
    assert received and "TLS" in received[0], f"Received: {received}"


def test_swaks_relay_refused(server):
    cp = swaks(server, "--to", "bob@remote.test")
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, f"swaks succeeded relaying to a remote domain:\n{out}"
    assert "554" in out, out
    assert server.messages(ALICE) == []
