"""The one-thread rule, checked on the source: disk-side modules (what runs in worker
threads and processes) import nothing from Twisted, directly or through another module of
ours, and never the reactor-side folder; so they cannot touch reactor state by accident."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Modules whose code runs off the reactor: fed snapshots, returning results.
DISK_MODULES = [
    "mailserver.fsutil",
    "mailserver.accounts_schema",
    "mailserver.accounts_pg_schema",
    "mailserver.crossnode_pg",
    "mailserver.certfiles",
    "mailserver.acme_client",
    "mailserver.acme_shared",
    "mailserver.shared_state",
    "mailserver.rfc5322",
    "mailserver.maildir.changelog",
    "mailserver.maildir.flags",
    "mailserver.maildir.folder_disk",
    "mailserver.maildir.index",
    "mailserver.maildir.keywords",
    "mailserver.maildir.names",
    "mailserver.maildir.newfiles",
    "mailserver.maildir.quota",
    "mailserver.maildir.shared_disk",
    "mailserver.maildir.sizes",
    "mailserver.maildir.specialuse",
    "mailserver.maildir.uidlist",
    "mailserver.maildir.uidranges",
    "mailserver.pop3.dovecot",
    "mailserver.pop3.snapshot",
    "mailserver.imap.esearch",
    "mailserver.imap.fetchitems",
    "mailserver.imap.mime",
    "mailserver.imap.sort",
    "mailserver.imap.sorttable",
    "mailserver.imap.summary",
    "mailserver.inbound.dkimverify",
    "mailserver.inbound.worker",
    "mailserver.passwords",
    "mailserver.sieve.actions",
    "mailserver.sieve.lexer",
    "mailserver.sieve.grammar",
    "mailserver.sieve.parser",
    "mailserver.sieve.message",
    "mailserver.sieve.interpreter",
    "mailserver.sieve.matching",
    "mailserver.sieve.dates",
    "mailserver.sieve.editing",
    "mailserver.sieve.scripts",
    "mailserver.sieve.vacation",
    "mailserver.sieve.reject",
    "mailserver.sieve.plan",
    "mailserver.smtp.spool",
]
FORBIDDEN = ("twisted", "mailserver.maildir.folder")


def _source(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every module named by an import statement anywhere in the file (functions too)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _closure(module: str) -> dict[str, str]:
    """{imported module: the module of ours that imports it}, followed through our own."""
    seen: dict[str, str] = {}
    todo = [module]
    visited = set()
    while todo:
        current = todo.pop()
        if current in visited:
            continue
        visited.add(current)
        path = _source(current)
        if path is None:
            continue
        for name in _imports(path, current):
            seen.setdefault(name, current)
            if name.startswith("mailserver") and _source(name) is not None:
                todo.append(name)
    return seen


@pytest.mark.parametrize("module", DISK_MODULES)
def test_disk_module_imports_no_twisted(module: str) -> None:
    assert _source(module) is not None, f"{module} is gone: update DISK_MODULES"
    bad = {name: by for name, by in _closure(module).items()
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{module} reaches {sorted(bad)} (via {sorted(set(bad.values()))})"


def test_the_check_sees_twisted_imports() -> None:
    """The checker itself: a reactor-side module is caught."""
    assert any(n.startswith("twisted") for n in _closure("mailserver.maildir.folder"))
