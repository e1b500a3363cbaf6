"""sd_notify(3) over a real unix datagram socket bound by the test, as the service manager
binds it: filesystem and abstract addresses, nothing without NOTIFY_SOCKET, a connection
made before the socket file is closed to the sender, and a manager that is gone."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from mailserver.readiness import Readiness
from mailserver.sdnotify import MAX_STATUS, Notifier, socket_address, status_assignment


@pytest.fixture
def manager(tmp_path: Path):
    """A datagram socket standing for systemd's notification socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode().split("\n")


def test_ready_and_status_in_one_datagram(manager):
    sock, path = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier is not None
    try:
        assert notifier.ready("serving smtp, imaps as mail.example.test")
        assert received(sock) == ["READY=1", "STATUS=serving smtp, imaps as mail.example.test"]
        assert notifier.stopping()
        assert received(sock) == ["STOPPING=1", "STATUS=stopping"]
    finally:
        notifier.close()


def test_abstract_namespace_address():
    name = f"mailserver-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
    except OSError as e:   # only Linux has the abstract namespace
        sock.close()
        pytest.skip(f"no abstract unix sockets here: {e}")
    sock.settimeout(10)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None and notifier.ready("up")
        assert received(sock) == ["READY=1", "STATUS=up"]
        notifier.close()
    finally:
        sock.close()


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_nothing_without_a_unix_socket_address(value):
    assert Notifier.from_environment({"NOTIFY_SOCKET": value} if value else {}) is None


def test_readiness_without_notify_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    readiness = Readiness()
    readiness.open()
    readiness.ready("mail.example.test", ["smtp"])
    readiness.stopping()
    assert readiness.notifier is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket root's alone")
def test_connected_before_the_socket_was_closed_to_the_sender(manager, tmp_path):
    """What the server does under twistd --uid: connect as root, send after the drop.
    Closing the socket file's permissions after connecting stands for the drop: a
    connected datagram socket is not checked again."""
    sock, path = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier is not None
    os.chmod(path, 0o000)
    tmp_path.chmod(0o000)
    pid = os.fork()
    if pid == 0:   # the child drops to nobody, as twistd does
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os._exit(0 if notifier.ready("dropped") else 3)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    tmp_path.chmod(0o700)
    assert os.waitstatus_to_exitcode(status) == 0
    assert received(sock) == ["READY=1", "STATUS=dropped"]
    notifier.close()


def test_a_manager_that_is_gone_is_reported_not_raised(tmp_path):
    path = tmp_path / "gone"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    sock.close()
    path.unlink()
    assert notifier is not None
    assert notifier.ready("up") is False
    assert isinstance(notifier.last_error, OSError)
    notifier.close()
    assert notifier.ready("up") is False


def test_a_socket_that_appears_later_is_found(tmp_path):
    path = tmp_path / "later"
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    assert notifier is not None and notifier.ready("early") is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        assert notifier.ready("late")
        assert received(sock) == ["READY=1", "STATUS=late"]
    finally:
        sock.close()
        notifier.close()


def test_status_is_one_bounded_line():
    assert status_assignment("two\nlines\r\n here") == "STATUS=two lines here"
    assert len(status_assignment("x" * 5000)) == len("STATUS=") + MAX_STATUS
    assert socket_address("@name") == b"\0name"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
