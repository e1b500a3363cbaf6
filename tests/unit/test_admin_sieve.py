"""`mailserver-admin sieve list|put|get|activate|delete`, run through main(argv) against a
real accounts database and Maildirs: the same checks as ManageSieve's PUTSCRIPT, files
in Pigeonhole's layout owned like the rest of the Maildir, one error line and exit 1."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

import pytest

from mailserver import admin
from mailserver.sieve import scripts

ALICE = "alice@example.test"
GOOD = b'require "fileinto";\nif header :is "x-list" "a" { fileinto "A"; }\n'
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "etc" / "mailserver.toml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent("""\
        [server]
        hostname = "mail.example.test"
        state_dir = "../var"
        [storage]
        maildir_root = "../maildirs"
        [sieve]
        max_script_size = 200
        max_scripts = 2
    """))
    return path


@pytest.fixture
def run(config, capsys, monkeypatch):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr)."""
    def run(*argv, stdin: bytes | None = None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = admin.main(["--config", str(config), *argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def alice(run, tmp_path) -> Path:
    assert run("domain", "add", "example.test")[0] == 0
    assert run("user", "add", ALICE, "--password-stdin", stdin=b"secret\n")[0] == 0
    return tmp_path / "maildirs" / "example.test" / "alice"


def one_error(code: int, err: str, *texts: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailserver-admin: error: "), err
    for text in texts:
        assert text in lines[0], lines[0]


def test_put_from_a_file_and_from_stdin_list_get(run, alice, tmp_path):
    source = tmp_path / "filter.sieve"
    source.write_bytes(GOOD)
    assert run("sieve", "put", ALICE, "filter", str(source)) == (
        0, f"script filter stored for {ALICE}\n", "")
    code, out, _ = run("sieve", "put", "Alice@Example.TEST", "other", stdin=b"keep;\n")
    assert code == 0, out
    assert run("sieve", "put", ALICE, "other", "-", stdin=b"discard;\n")[0] == 0
    assert (alice / "sieve" / "filter.sieve").read_bytes() == GOOD
    code, out, _ = run("sieve", "list", ALICE)
    assert out == f"filter  {len(GOOD)} bytes\nother  9 bytes\n"
    code, out, _ = run("sieve", "get", ALICE, "filter")
    assert (code, out) == (0, GOOD.decode())


def test_activate_deactivate_and_delete(run, alice):
    run("sieve", "put", ALICE, "filter", stdin=GOOD)
    assert run("sieve", "activate", ALICE, "filter")[1] == f"script filter is active for {ALICE}\n"
    assert os.readlink(alice / ".dovecot.sieve") == "sieve/filter.sieve"
    assert run("sieve", "list", ALICE)[1].endswith("  active\n")
    one_error(*run("sieve", "delete", ALICE, "filter")[::2], "active")
    assert run("sieve", "activate", ALICE)[1] == f"no script is active for {ALICE}\n"
    assert not os.path.lexists(alice / ".dovecot.sieve")
    assert run("sieve", "delete", ALICE, "filter")[0] == 0
    assert run("sieve", "list", ALICE)[1] == ""


def test_errors_are_one_line(run, alice):
    code, _, err = run("sieve", "put", ALICE, "bad", stdin=b'keep;\nfileinto "x";\n')
    one_error(code, err, "script 'bad' refused: line 2: ", "fileinto")
    one_error(*run("sieve", "put", ALICE, "big", stdin=b"#" * 201)[::2], "max_script_size")
    one_error(*run("sieve", "put", ALICE, "../escape", stdin=b"keep;")[::2], "bad script name")
    one_error(*run("sieve", "activate", ALICE, "missing")[::2], "no script named")
    one_error(*run("sieve", "get", ALICE, "missing")[::2], "no script named")
    one_error(*run("sieve", "list", "bob@example.test")[::2], "no such user")
    one_error(*run("sieve", "put", ALICE, "x", "/nonexistent/file")[::2], "/nonexistent/file")
    for name in ("a", "b"):
        assert run("sieve", "put", ALICE, name, stdin=b"keep;")[0] == 0
    one_error(*run("sieve", "put", ALICE, "c", stdin=b"keep;")[::2], "at most 2 scripts")
    assert sorted(p.name for p in (alice / "sieve").iterdir()) == ["a.sieve", "b.sieve", "tmp"]
    assert not (alice.parent / "escape.sieve").exists()


def test_include_warnings_go_to_stderr(run, alice):
    code, out, err = run("sieve", "put", ALICE, "main",
                         stdin=b'require "include";\ninclude "helpers";\n')
    assert code == 0
    assert err == 'mailserver-admin: warning: main: included script "helpers" does not exist\n'


def test_a_missing_maildir_is_created(run, alice):
    import shutil
    shutil.rmtree(alice)
    assert run("sieve", "put", ALICE, "filter", stdin=GOOD)[0] == 0
    assert (alice / "cur").is_dir() and (alice / "sieve" / "filter.sieve").is_file()


@pytest.mark.skipif(not IS_ROOT, reason="ownership is only handed over when run as root")
def test_files_are_owned_like_the_maildir(run, alice, tmp_path):
    root = tmp_path / "maildirs"
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, 65534, 65534, follow_symlinks=False)
    run("sieve", "put", ALICE, "filter", stdin=GOOD)
    run("sieve", "activate", ALICE, "filter")
    for path in (alice / "sieve", alice / "sieve" / "tmp", alice / "sieve" / "filter.sieve",
                 alice / scripts.ACTIVE_LINK):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (65534, 65534), path
