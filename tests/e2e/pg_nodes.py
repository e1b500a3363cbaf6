"""Server nodes on one machine sharing one Maildir root and one PostgreSQL accounts
database ([storage] shared, [accounts] url): the clusters and nodes of the multi-node
tests (test_accounts_pg.py, test_crossnode.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import ServerProcess
from tests.pg_helper import PgCluster, require_postgresql


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    c = PgCluster(require_postgresql())
    yield c
    c.destroy()


def start_nodes(root: Path, url: str, count: int = 2, *, with_users: bool = False,
                config: dict[str, Any] | None = None, **accounts: object
                ) -> list[ServerProcess]:
    """`count` started servers, each with its own state dir and ports; `accounts`: more
    [accounts] keys, `config`: more sections; `with_users`: the harness's users (alice,
    bob, carol) created through the first node before any starts."""
    shared = root / "maildirs"
    nodes = [ServerProcess(root / f"node{i}", {
        "storage": {"maildir_root": str(shared), "shared": True},
        "accounts": {"url": url, **accounts},
        **(config or {}),
    }) for i in range(count)]
    if with_users:
        nodes[0].create_accounts()
    for node in nodes:
        node.start()
    return nodes


def stop_nodes(nodes: list[ServerProcess]) -> None:
    for node in nodes:
        node.close()
