"""Users' Sieve scripts on disk (mailserver.sieve.scripts): Pigeonhole's layout, names,
limits, the active link, and what a Maildir moved from Dovecot may hold."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mailserver.maildir import MaildirStore
from mailserver.sieve import scripts
from mailserver.sieve.scripts import Limits

GOOD = b'require "fileinto";\r\nif header :contains "subject" "spam" { fileinto "Junk"; }\r\n'
OTHER = b"keep;\r\n"
LIMITS = Limits(max_script_size=1000, max_scripts=3, quota=2000)


@pytest.fixture
def user(tmp_path: Path) -> Path:
    store = MaildirStore(tmp_path / "maildirs", "mail.example.test")
    return store.create_user("example.test", "alice")


def link_target(user: Path) -> str:
    return os.readlink(user / ".dovecot.sieve")


# -- names -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["filter", "Vacation rules", "ümlaut ✓", "a.b", "x" * 249,
                                  "tmp", "dovecot.orig", "with \"quotes\" and \\"])
def test_acceptable_names(name):
    assert scripts.check_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "../escape", "a/b", "/etc/passwd",
                                  "nul\x00", "tab\there", "line\nbreak", "del\x7f",
                                  "c1\x85", "sep\u2028", "para\u2029", "x" * 250,
                                  "é" * 125, "bad\udcff"])
def test_refused_names(name):
    with pytest.raises(scripts.InvalidName):
        scripts.check_name(name)


def test_a_hostile_name_writes_nothing_anywhere(user, tmp_path):
    before = sorted(p for p in tmp_path.rglob("*"))
    for name in ("../../escape", "../sieve", ".dovecot", "/tmp/x", "a/../../b"):
        with pytest.raises(scripts.InvalidName):
            scripts.put_script(user, name, GOOD, LIMITS)
        with pytest.raises(scripts.InvalidName):
            scripts.activate(user, name)
        with pytest.raises(scripts.InvalidName):
            scripts.get_script(user, name)
    assert sorted(p for p in tmp_path.rglob("*")) == before


# -- storing and reading -----------------------------------------------------------------

def test_put_list_get_round_trip(user):
    assert scripts.put_script(user, "filter", GOOD, LIMITS) == []
    path = user / "sieve" / "filter.sieve"
    assert path.read_bytes() == GOOD
    assert path.stat().st_mode & 0o777 == 0o600
    assert scripts.get_script(user, "filter") == GOOD
    assert scripts.list_scripts(user) == [scripts.ScriptInfo("filter", False, len(GOOD))]
    assert list((user / "sieve" / "tmp").iterdir()) == []   # nothing left behind
    assert not (user / ".dovecot.sieve").exists()           # storing does not activate


def test_put_refuses_a_bad_script_with_line_and_reason(user):
    with pytest.raises(scripts.InvalidScript) as e:
        scripts.put_script(user, "bad", b'keep;\r\nfileinto "x";\r\n', LIMITS)
    assert e.value.line == 2
    assert "fileinto" in e.value.reason
    assert str(e.value) == f"line 2: {e.value.reason}"
    assert scripts.list_scripts(user) == []


def test_get_of_a_missing_script(user):
    with pytest.raises(scripts.NoSuchScript):
        scripts.get_script(user, "nothing")


def test_replacing_the_active_script_keeps_it_active(user):
    scripts.put_script(user, "filter", OTHER, LIMITS)
    scripts.activate(user, "filter")
    before = scripts.script_stat(user)
    scripts.put_script(user, "filter", GOOD, LIMITS)
    assert scripts.list_scripts(user) == [scripts.ScriptInfo("filter", True, len(GOOD))]
    after = scripts.script_stat(user)
    assert after is not None and before is not None
    assert after.key != before.key
    assert after.path.read_bytes() == GOOD


def test_files_that_are_not_scripts_are_not_listed(user):
    scripts.put_script(user, "filter", GOOD, LIMITS)
    sieve = user / "sieve"
    (sieve / "notes.txt").write_text("x")
    (sieve / "filter.svbin").write_bytes(b"\0")          # Pigeonhole's compiled binary
    (sieve / ".hidden.sieve").write_bytes(OTHER)
    (sieve / "dir.sieve").mkdir()
    (sieve / "link.sieve").symlink_to("/etc/passwd")
    assert [s.name for s in scripts.list_scripts(user)] == ["filter"]
    with pytest.raises(scripts.NoSuchScript):
        scripts.get_script(user, "link")                 # a link out is never followed
    with pytest.raises(scripts.NoSuchScript):
        scripts.activate(user, "link")


# -- limits ------------------------------------------------------------------------------

def test_script_too_large(user):
    with pytest.raises(scripts.QuotaExceeded) as e:
        scripts.put_script(user, "big", b"#" * 1001, LIMITS)
    assert e.value.code == "QUOTA/MAXSIZE"


def test_too_many_scripts_but_replacing_is_fine(user):
    for name in ("a", "b", "c"):
        scripts.put_script(user, name, OTHER, LIMITS)
    with pytest.raises(scripts.QuotaExceeded) as e:
        scripts.put_script(user, "d", OTHER, LIMITS)
    assert e.value.code == "QUOTA/MAXSCRIPTS"
    scripts.put_script(user, "a", GOOD, LIMITS)
    assert [s.name for s in scripts.list_scripts(user)] == ["a", "b", "c"]


def test_total_size_over_the_quota(user):
    limits = Limits(max_script_size=1000, max_scripts=10, quota=1500)
    scripts.put_script(user, "a", b"#" * 900 + b"\r\n", limits)
    with pytest.raises(scripts.QuotaExceeded) as e:
        scripts.put_script(user, "b", b"#" * 700 + b"\r\n", limits)
    assert e.value.code == "QUOTA/MAXSIZE"
    scripts.put_script(user, "a", b"#" * 500 + b"\r\n", limits)   # replacing frees the old size
    scripts.put_script(user, "b", b"#" * 700 + b"\r\n", limits)


def test_have_space(user):
    scripts.have_space(user, "a", 1000, LIMITS)
    with pytest.raises(scripts.QuotaExceeded) as e:
        scripts.have_space(user, "a", 1001, LIMITS)
    assert e.value.code == "QUOTA/MAXSIZE"
    for name in ("a", "b", "c"):
        scripts.put_script(user, name, OTHER, LIMITS)
    scripts.have_space(user, "a", 100, LIMITS)
    with pytest.raises(scripts.QuotaExceeded) as e:
        scripts.have_space(user, "new", 1, LIMITS)
    assert e.value.code == "QUOTA/MAXSCRIPTS"
    with pytest.raises(scripts.InvalidName):
        scripts.have_space(user, "../x", 1, LIMITS)


def test_limits_hold_under_concurrent_writers(user):
    """The flock makes check-and-store one step: ten writers, room for three."""
    errors: list[Exception] = []

    def put(name: str) -> None:
        try:
            scripts.put_script(user, name, OTHER, LIMITS)
        except scripts.QuotaExceeded as e:
            errors.append(e)

    threads = [threading.Thread(target=put, args=(f"s{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(scripts.list_scripts(user)) == 3
    assert len(errors) == 7


# -- the active script -------------------------------------------------------------------

def test_activate_makes_a_relative_link_as_pigeonhole_does(user):
    scripts.put_script(user, "filter", GOOD, LIMITS)
    scripts.put_script(user, "other", OTHER, LIMITS)
    scripts.activate(user, "filter")
    assert (user / ".dovecot.sieve").is_symlink()
    assert link_target(user) == "sieve/filter.sieve"
    assert scripts.active_script(user) == user / "sieve" / "filter.sieve"
    assert scripts.active_name(user) == "filter"
    first = scripts.script_stat(user)
    scripts.activate(user, "other")
    assert link_target(user) == "sieve/other.sieve"
    second = scripts.script_stat(user)
    assert first is not None and second is not None and first.key != second.key
    assert second.name == "other"
    assert [p.name for p in user.iterdir() if p.name.startswith(".dovecot")] == [".dovecot.sieve"]
    assert [(s.name, s.active) for s in scripts.list_scripts(user)] == [("filter", False),
                                                                       ("other", True)]


def test_deactivate(user):
    scripts.put_script(user, "filter", GOOD, LIMITS)
    scripts.activate(user, "filter")
    scripts.activate(user, "")
    assert not os.path.lexists(user / ".dovecot.sieve")
    assert scripts.active_script(user) is None and scripts.script_stat(user) is None
    scripts.activate(user, "")                              # nothing active: fine
    assert scripts.list_scripts(user)[0].active is False


def test_activate_missing(user):
    with pytest.raises(scripts.NoSuchScript):
        scripts.activate(user, "nothing")
    scripts.put_script(user, "filter", GOOD, LIMITS)
    with pytest.raises(scripts.NoSuchScript):
        scripts.activate(user, "nothing")


def test_delete_refuses_the_active_script(user):
    scripts.put_script(user, "filter", GOOD, LIMITS)
    scripts.activate(user, "filter")
    with pytest.raises(scripts.ScriptIsActive):
        scripts.delete_script(user, "filter")
    scripts.activate(user, "")
    scripts.delete_script(user, "filter")
    assert scripts.list_scripts(user) == []
    with pytest.raises(scripts.NoSuchScript):
        scripts.delete_script(user, "filter")


def test_rename_keeps_the_active_script_active(user):
    scripts.put_script(user, "filter", GOOD, LIMITS)
    scripts.put_script(user, "other", OTHER, LIMITS)
    scripts.activate(user, "filter")
    scripts.rename_script(user, "filter", "renamed")
    assert [(s.name, s.active) for s in scripts.list_scripts(user)] == [("other", False),
                                                                       ("renamed", True)]
    assert link_target(user) == "sieve/renamed.sieve"
    assert scripts.get_script(user, "renamed") == GOOD
    with pytest.raises(scripts.ScriptExists):
        scripts.rename_script(user, "renamed", "other")
    with pytest.raises(scripts.ScriptExists):
        scripts.rename_script(user, "other", "other")
    with pytest.raises(scripts.NoSuchScript):
        scripts.rename_script(user, "gone", "new")
    scripts.rename_script(user, "other", "third")
    assert [(s.name, s.active) for s in scripts.list_scripts(user)] == [("renamed", True),
                                                                       ("third", False)]


def test_a_script_deleted_behind_our_back_is_no_active_script(user):
    scripts.put_script(user, "filter", GOOD, LIMITS)
    scripts.activate(user, "filter")
    os.unlink(user / "sieve" / "filter.sieve")
    assert scripts.script_stat(user) is None
    assert scripts.active_name(user) is None
    scripts.put_script(user, "new", OTHER, LIMITS)
    scripts.activate(user, "new")                           # replaces the broken link
    assert link_target(user) == "sieve/new.sieve"


# -- Maildirs from Dovecot ---------------------------------------------------------------

def test_a_regular_dovecot_sieve_file_runs_and_is_rescued_on_activation(user):
    (user / ".dovecot.sieve").write_bytes(OTHER)
    found = scripts.script_stat(user)
    assert found is not None and found.path == user / ".dovecot.sieve" and found.name == ""
    assert scripts.list_scripts(user) == []                 # not a stored script
    scripts.put_script(user, "filter", GOOD, LIMITS)
    scripts.activate(user, "filter")
    assert link_target(user) == "sieve/filter.sieve"
    assert scripts.get_script(user, "dovecot.orig") == OTHER
    assert [(s.name, s.active) for s in scripts.list_scripts(user)] == [
        ("dovecot.orig", False), ("filter", True)]


def test_deactivating_a_regular_file_keeps_its_content(user):
    (user / "sieve").mkdir()
    (user / "sieve" / "dovecot.orig.sieve").write_bytes(GOOD)
    (user / ".dovecot.sieve").write_bytes(OTHER)
    scripts.activate(user, "")
    assert not os.path.lexists(user / ".dovecot.sieve")
    assert scripts.get_script(user, "dovecot.orig-2") == OTHER
    assert scripts.get_script(user, "dovecot.orig") == GOOD


def test_an_absolute_link_from_elsewhere_names_our_script(user):
    """A tree moved from /var/vmail keeps its active script: the link's target names a
    script of this Maildir's sieve/, and only that file is ever read."""
    scripts.put_script(user, "filter", GOOD, LIMITS)
    (user / ".dovecot.sieve").symlink_to("/var/vmail/example.test/alice/sieve/filter.sieve")
    assert scripts.active_name(user) == "filter"
    assert scripts.active_script(user) == user / "sieve" / "filter.sieve"
    assert scripts.list_scripts(user)[0].active is True


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../etc/shadow.sieve",
                                    "sieve/../../other/x.sieve", "x.sieve", "sieve/.x.sieve"])
def test_a_link_anywhere_else_is_no_active_script(user, target):
    scripts.put_script(user, "x", GOOD, LIMITS)
    (user / ".dovecot.sieve").symlink_to(target)
    assert scripts.script_stat(user) is None
    assert scripts.active_script(user) is None
    assert scripts.list_scripts(user)[0].active is False


# -- include warnings --------------------------------------------------------------------

def test_missing_includes_are_warnings_not_errors(user, tmp_path):
    global_dir = tmp_path / "global"
    global_dir.mkdir()
    (global_dir / "spam.sieve").write_bytes(OTHER)
    script = (b'require "include";\r\ninclude :personal "helpers";\r\n'
              b'include :global "spam";\r\ninclude :global "absent";\r\n')
    warnings = scripts.put_script(user, "main", script, LIMITS, global_dir=str(global_dir))
    assert warnings == ['included script "helpers" does not exist',
                        'global script "absent" does not exist']
    scripts.put_script(user, "helpers", OTHER, LIMITS)
    assert scripts.put_script(user, "main", script, LIMITS, global_dir=str(global_dir)) == [
        'global script "absent" does not exist']


# -- ownership ---------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_owner_is_given_to_every_new_file_and_link(user):
    owner = (65534, 65534)
    scripts.put_script(user, "filter", GOOD, LIMITS, owner=owner)
    scripts.activate(user, "filter", owner=owner)
    for path in (user / "sieve", user / "sieve" / "tmp", user / "sieve" / "filter.sieve",
                 user / ".dovecot.sieve"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == owner, path


def test_an_imap_folder_named_dovecot_sieve_is_never_touched(user):
    """IMAP folder "dovecot.sieve" is the Maildir++ directory .dovecot.sieve: no script is
    active, activating says why, and the folder is neither moved nor replaced."""
    folder = user / ".dovecot.sieve"
    (folder / "cur").mkdir(parents=True)
    (folder / "cur" / "1.msg").write_bytes(b"Subject: x\r\n\r\n")
    scripts.put_script(user, "filter", GOOD, LIMITS)
    assert scripts.script_stat(user) is None and scripts.active_name(user) is None
    with pytest.raises(scripts.ScriptError) as e:
        scripts.activate(user, "filter")
    assert "dovecot.sieve" in str(e.value)
    scripts.activate(user, "")
    assert (folder / "cur" / "1.msg").is_file()
    assert [s.name for s in scripts.list_scripts(user)] == ["filter"]
