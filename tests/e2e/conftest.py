"""Fixtures for the end-to-end tests: real twistd processes, one per test.

`server`       a running server with domain example.test and users alice, bob, carol
               (password "secret").
`make_server`  factory for servers with other settings:
                   make_server(max_recipients=3)                      # [limits] keys
                   make_server(listen={"imap": ""}, tls={...})        # any [section]
                   make_server(start=False)                           # configure, then .start()
                   make_server(accounts=False, start=False)           # bare config

The accounts are created once per test session with `mailserver-admin` in a template
directory whose state dir and maildirs are then copied into each test's own directory
(saving four admin runs per test).  Set MAILSERVER_E2E_FRESH_ACCOUNTS=1 to run the admin
commands in every test instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ServerProcess, split_overrides  # noqa: E402


@pytest.fixture(scope="session")
def accounts_template(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess | None:
    if os.environ.get("MAILSERVER_E2E_FRESH_ACCOUNTS") == "1":
        return None
    template = ServerProcess(tmp_path_factory.mktemp("accounts-template"))
    template.create_accounts()
    return template


@pytest.fixture
def make_server(tmp_path: Path, request: pytest.FixtureRequest):
    servers: list[ServerProcess] = []

    def factory(*, start: bool = True, accounts: bool = True, **overrides) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"server{len(servers)}", split_overrides(overrides))
        servers.append(srv)
        if accounts:
            template = request.getfixturevalue("accounts_template")
            if template is None:
                srv.create_accounts()
            else:
                srv.copy_state_from(template)
        if start:
            srv.start()
        return srv

    yield factory
    errors = []
    for srv in servers:
        try:
            srv.close()
        except BaseException as e:  # report every server, stop all of them
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def server(make_server) -> ServerProcess:
    return make_server()
