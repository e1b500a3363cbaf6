"""Maildir++ store: layout, names, and the durability of delivery."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from twisted.trial import unittest as trial

from mailserver.fsutil import can_sync_filesystem
from mailserver.maildir import (
    DEFAULT_FOLDERS,
    Delivery,
    DeliveryResult,
    MaildirStore,
    decode_folder_name,
    encode_folder_name,
    folder_dir,
    folder_dir_name,
    folder_name_from_dir,
    format_subscriptions,
    parse_subscriptions,
)
from mailserver.maildir import delivery as delivery_mod
from mailserver.maildir.delivery import FLUSH_THRESHOLD, escape_hostname

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+)$")


@pytest.fixture
def store(tmp_path: Path) -> MaildirStore:
    return MaildirStore(tmp_path / "maildirs", hostname="mx.example.test")


@pytest.fixture
def named_tmp(monkeypatch) -> None:
    """Deliver through named tmp/ files, as on systems without O_TMPFILE."""
    monkeypatch.setattr(delivery_mod, "_anonymous_files", False)


def users(store: MaildirStore, n: int) -> list[Path]:
    return [store.create_user("example.org", f"user{i}") for i in range(n)]


def new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


def tmp_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "tmp").iterdir())


def deliver(store: MaildirStore, targets: list[Path], data: bytes,
            piece: int = 1000) -> list[DeliveryResult]:
    d = store.begin_delivery(targets)
    for i in range(0, len(data), piece):
        d.write(data[i:i + piece])
    return d._commit_sync()


MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


# -- layout -----------------------------------------------------------------------------

def test_create_user_layout(store: MaildirStore) -> None:
    path = store.create_user("example.org", "alice")
    assert path == store.root / "example.org" / "alice"
    for d in [path] + [path / f".{f}" for f in DEFAULT_FOLDERS]:
        for sub in ("cur", "new", "tmp"):
            assert (d / sub).is_dir()
            assert stat.S_IMODE((d / sub).stat().st_mode) == 0o700
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in DEFAULT_FOLDERS:
        assert (path / f".{f}" / "maildirfolder").read_bytes() == b""
    assert not (path / "maildirfolder").exists()
    subs = (path / "subscriptions").read_bytes()
    assert subs == b"V\t2\n\nINBOX\nSent\nDrafts\nTrash\nJunk\nArchive\n"
    assert parse_subscriptions(subs) == ["INBOX", *DEFAULT_FOLDERS]
    assert stat.S_IMODE((path / "subscriptions").stat().st_mode) == 0o600
    assert tmp_files(path) == []
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["cur", "new", "tmp", "subscriptions"] + [f".{f}" for f in DEFAULT_FOLDERS])


def test_create_user_is_idempotent(store: MaildirStore) -> None:
    path = store.create_user("example.org", "alice")
    (path / "subscriptions").write_bytes(b"V\t2\n\nSent\n")
    deliver(store, [path], MESSAGE)
    (path / ".Trash" / "cur" / "1.M1P1.h,S=1:2,S").write_bytes(b"x")
    assert store.create_user("example.org", "alice") == path
    assert (path / "subscriptions").read_bytes() == b"V\t2\n\nSent\n"
    assert len(new_files(path)) == 1
    assert (path / ".Trash" / "cur" / "1.M1P1.h,S=1:2,S").read_bytes() == b"x"


def test_create_user_restores_missing_parts(store: MaildirStore) -> None:
    path = store.create_user("example.org", "alice")
    (path / ".Junk" / "new").rmdir()
    (path / "subscriptions").unlink()
    store.create_user("example.org", "alice")
    assert (path / ".Junk" / "new").is_dir()
    assert parse_subscriptions((path / "subscriptions").read_bytes())[0] == "INBOX"


BAD_COMPONENTS = ["..", ".", "a/b", "/", ".hidden", "a\x00b", "x" * 300, "ü" * 128, "",
                  "a\nb"]


@pytest.mark.parametrize("bad", BAD_COMPONENTS)
def test_unsafe_names_refused(store: MaildirStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.user_path(bad, "alice")
    with pytest.raises(ValueError):
        store.user_path("example.org", bad)
    with pytest.raises(ValueError):
        store.create_user("example.org", bad)
    assert not store.root.exists() or list(store.root.rglob("*")) == []


def test_user_path_inside_root(store: MaildirStore) -> None:
    p = store.user_path("example.org", "a.b-c+d")
    assert p.parent.parent == store.root
    assert store.user_path("xn--bcher-kva.example", "ü" * 127).parent.parent == store.root


# -- names ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, encoded", [
    ("Entwürfe", "Entw&APw-rfe"),
    ("a&b", "a&-b"),
    ("&", "&-"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 5.1.3
    ("😀 smile", "&2D3eAA- smile"),                                  # outside the BMP
    ("Gelöschte Elemente", "Gel&APY-schte Elemente"),
    ("plain.ascii_name", "plain.ascii_name"),
])
def test_modified_utf7(name: str, encoded: str) -> None:
    assert encode_folder_name(name) == encoded
    assert decode_folder_name(encoded) == name


def test_modified_utf7_round_trip_random() -> None:
    rng = random.Random(3501)
    alphabet = "abc&-+,/. ~" + "äöüß€日本" + "\U0001F600\U00010348"
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert decode_folder_name(encode_folder_name(s)) == s


@pytest.mark.parametrize("bad", ["&", "&Jjo", "&Jjo!-", "ü", "&AGE-", "&2D0-", "&A-"])
def test_modified_utf7_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_folder_name(bad)


def test_encode_rejects_lone_surrogate() -> None:
    with pytest.raises(ValueError):
        encode_folder_name("a\ud800b")


def test_folder_dir(tmp_path: Path) -> None:
    u = tmp_path / "u"
    assert folder_dir(u, "INBOX") == u
    assert folder_dir(u, "inbox") == u
    assert folder_dir(u, "Sent") == u / ".Sent"
    assert folder_dir(u, "Entwürfe") == u / ".Entw&APw-rfe"
    assert folder_dir(u, "Work.2024.Q1") == u / ".Work.2024.Q1"
    assert folder_dir(u, "inbox.Sub") == u / ".INBOX.Sub"
    assert MaildirStore.folder_dir(u, "a&b") == u / ".a&-b"
    assert folder_dir_name("Entwürfe") == ".Entw&APw-rfe"


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/etc", "a..b", ".x", "x.",
                                 "a\x00b", "a\nb", "x" * 255])
def test_folder_dir_refuses_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        folder_dir(tmp_path, bad)


def test_folder_name_from_dir() -> None:
    assert folder_name_from_dir(".Entw&APw-rfe") == "Entwürfe"
    assert folder_name_from_dir(".Work.2024") == "Work.2024"
    for bad in ["Sent", ".", "..", ".&", ".a..b"]:
        with pytest.raises(ValueError):
            folder_name_from_dir(bad)


def test_subscriptions_formats() -> None:
    data = format_subscriptions(["INBOX", "Entwürfe", "Work.2024"])
    assert data == b"V\t2\n\nINBOX\nEntw&APw-rfe\nWork\t2024\n"
    assert parse_subscriptions(data) == ["INBOX", "Entwürfe", "Work.2024"]
    # version 1, as older Dovecot wrote it: '.'-separated, trailing separators tolerated
    assert parse_subscriptions(b"Sent\nEntw&APw-rfe\nWork.2024.\n\n") == [
        "Sent", "Entwürfe", "Work.2024"]
    # invalid entries are skipped, like Dovecot drops them
    assert parse_subscriptions(b"V\t2\n\nSent\n&bad\nx\t\ty\n") == ["Sent"]


# -- unique names -------------------------------------------------------------------------

def test_unique_names_and_size(store: MaildirStore) -> None:
    (u,) = users(store, 1)
    sizes = {}
    for i in range(1000):
        data = MESSAGE + b"x" * i
        (r,) = deliver(store, [u], data, piece=17)
        assert r.ok and r.error is None
        sizes[r.path.name] = len(data)
    names = [p.name for p in new_files(u)]
    assert len(names) == len(set(names)) == 1000
    for name in names:
        m = NAME_RE.match(name)
        assert m, name
        assert m.group(3) == str(os.getpid())
        assert m.group(5) == "mx.example.test"
        assert int(m.group(6)) == sizes[name] == (u / "new" / name).stat().st_size
    assert tmp_files(u) == []


def test_hostname_is_escaped(tmp_path: Path) -> None:
    assert escape_hostname("a/b:c") == r"a\057b\072c"
    store = MaildirStore(tmp_path / "m", hostname="odd/host:name")
    (u,) = users(store, 1)
    (r,) = deliver(store, [u], MESSAGE)
    assert r.path.name.split(".", 2)[2].startswith(r"odd\057host\072name,S=")
    assert ":" not in r.path.name and "/" not in r.path.name


# -- delivery -----------------------------------------------------------------------------

def test_three_targets_share_one_file(store: MaildirStore) -> None:
    targets = users(store, 3)
    data = MESSAGE * 5000
    results = deliver(store, targets, data)
    assert [r.target for r in results] == targets
    assert all(r.ok for r in results)
    files = [new_files(t) for t in targets]
    assert all(len(f) == 1 for f in files)
    assert len({f[0].name for f in files}) == 1
    assert all(f[0].read_bytes() == data for f in files)
    assert len({f[0].stat().st_ino for f in files}) == 1
    assert files[0][0].stat().st_nlink == 3
    assert [r.path for r in results] == [f[0] for f in files]
    assert all(tmp_files(t) == [] for t in targets)


def test_missing_new_fails_alone(store: MaildirStore) -> None:
    targets = users(store, 3)
    (targets[1] / "new").rmdir()
    results = deliver(store, targets, MESSAGE)
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, FileNotFoundError) and results[1].path is None
    assert new_files(targets[0])[0].read_bytes() == MESSAGE
    assert new_files(targets[2])[0].read_bytes() == MESSAGE


def test_first_target_failing_still_delivers_others(store: MaildirStore) -> None:
    targets = users(store, 3)
    (targets[0] / "new").rmdir()
    results = deliver(store, targets, MESSAGE)
    assert [r.ok for r in results] == [False, True, True]
    assert new_files(targets[1])[0].read_bytes() == MESSAGE
    assert new_files(targets[2])[0].stat().st_nlink == 2
    assert tmp_files(targets[0]) == []


def test_first_target_without_tmp(named_tmp: None, store: MaildirStore) -> None:
    targets = users(store, 2)
    (targets[0] / "tmp").rmdir()
    d = store.begin_delivery(targets)
    d.write(MESSAGE)
    results = d._commit_sync()
    assert d.tmp_path.parent == targets[1] / "tmp"
    assert all(r.ok for r in results)
    assert new_files(targets[0])[0].read_bytes() == MESSAGE
    assert tmp_files(targets[1]) == []


def test_nothing_stored_cleans_tmp(store: MaildirStore) -> None:
    targets = users(store, 2)
    for t in targets:
        (t / "new").rmdir()
    results = deliver(store, targets, MESSAGE)
    assert not any(r.ok for r in results)
    assert all(tmp_files(t) == [] for t in targets)


def test_no_usable_tmp_fails_at_commit(named_tmp: None, store: MaildirStore) -> None:
    # The tmp file is created lazily (in the commit thread for small messages).
    (u,) = users(store, 1)
    (u / "tmp").rmdir()
    d = store.begin_delivery([u])
    d.write(MESSAGE)
    (r,) = d._commit_sync()
    assert not r.ok and isinstance(r.error, OSError)
    assert new_files(u) == []


def test_small_message_touches_no_file_before_commit(store: MaildirStore) -> None:
    (u,) = users(store, 1)
    d = store.begin_delivery([u])
    d.write(MESSAGE)
    assert tmp_files(u) == [] and d.tmp_path is None
    (r,) = d._commit_sync()
    assert r.ok and r.path.read_bytes() == MESSAGE


def test_begin_delivery_checks_targets(store: MaildirStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store.begin_delivery([])
    with pytest.raises(ValueError):
        store.begin_delivery([tmp_path / "elsewhere"])


def test_duplicate_targets_get_one_copy(store: MaildirStore) -> None:
    a, b = users(store, 2)
    results = deliver(store, [a, b, a], MESSAGE)
    assert all(r.ok for r in results)
    assert results[0].path == results[2].path
    assert len(new_files(a)) == 1


def test_deliver_into_folder(store: MaildirStore) -> None:
    (u,) = users(store, 1)
    junk = folder_dir(u, "Junk")
    (r,) = deliver(store, [junk], MESSAGE)
    assert r.ok and r.path.parent == junk / "new"


def test_abort_removes_tmp(named_tmp: None, store: MaildirStore) -> None:
    (u,) = users(store, 1)
    d = store.begin_delivery([u])
    d.write(b"x" * (FLUSH_THRESHOLD * 3))
    assert d.tmp_path.exists()
    d.abort()
    assert tmp_files(u) == [] and new_files(u) == []
    d.abort()
    with pytest.raises(RuntimeError):
        d.write(b"more")


def test_abort_after_commit_does_nothing(store: MaildirStore) -> None:
    (u,) = users(store, 1)
    d = store.begin_delivery([u])
    d.write(MESSAGE)
    (r,) = d._commit_sync()
    d.abort()
    assert r.path.read_bytes() == MESSAGE
    with pytest.raises(RuntimeError):
        d.write(b"x")
    with pytest.raises(RuntimeError):
        d._commit_sync()


def test_streams_without_holding_the_message(named_tmp: None, store: MaildirStore) -> None:
    (u,) = users(store, 1)
    d = store.begin_delivery([u])
    assert isinstance(d, Delivery)
    for _ in range(2000):
        d.write(b"y" * 999)
        assert len(d._buffer) < FLUSH_THRESHOLD
        on_disk = d.tmp_path.stat().st_size if d.tmp_path is not None else 0
        assert d.size - on_disk == len(d._buffer)
    d.write(b"z" * (FLUSH_THRESHOLD * 4))  # one big write goes straight to the file
    assert len(d._buffer) == 0
    assert d.size == 2000 * 999 + FLUSH_THRESHOLD * 4
    assert stat.S_IMODE(d.tmp_path.stat().st_mode) == 0o600
    (r,) = d._commit_sync()
    assert r.path.stat().st_size == d.size


def test_write_error_fails_every_target(store: MaildirStore, monkeypatch) -> None:
    targets = users(store, 2)
    d = store.begin_delivery(targets)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    d.write(b"x" * (FLUSH_THRESHOLD + 1))  # does not raise into the protocol
    d.write(b"more")
    monkeypatch.undo()
    results = d._commit_sync()
    assert not any(r.ok for r in results)
    assert all(r.error.errno == errno.ENOSPC for r in results)
    assert all(tmp_files(t) == [] and new_files(t) == [] for t in targets)


def test_fsync_order(named_tmp: None, store: MaildirStore, monkeypatch) -> None:
    targets = users(store, 3)
    events: list[tuple[str, int]] = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file", st.st_ino))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", os.stat(src).st_ino))
        real_rename(src, dst)

    def link(src, dst):
        events.append(("link", os.stat(src).st_ino))
        real_link(src, dst)

    d = store.begin_delivery(targets)
    d.write(MESSAGE * 100)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    results = d._commit_sync()
    monkeypatch.undo()
    assert all(r.ok for r in results)
    ino = results[0].path.stat().st_ino
    kinds = [k for k, _ in events]
    assert kinds == ["fsync-file", "link", "link", "rename",
                     "fsync-dir", "fsync-dir", "fsync-dir"]
    assert all(i == ino for k, i in events if k != "fsync-dir")
    assert {i for k, i in events if k == "fsync-dir"} == {
        (t / "new").stat().st_ino for t in targets}


def test_file_without_a_name_is_never_visible(store: MaildirStore) -> None:
    """The default path: the message is written to a file without a name (O_TMPFILE) in
    new/, which gets its names only once fsynced; nothing ever appears in tmp/."""
    if not delivery_mod._anonymous_files:
        pytest.skip("no O_TMPFILE here")
    targets = users(store, 3)
    d = store.begin_delivery(targets)
    data = b"w" * (FLUSH_THRESHOLD * 3)
    d.write(data)  # beyond the buffer: on disk already
    assert d.tmp_path is None and d._fd >= 0
    assert all(tmp_files(t) == [] and new_files(t) == [] for t in targets)
    results = d._commit_sync()
    assert all(r.ok for r in results)
    files = [new_files(t)[0] for t in targets]
    assert all(f.read_bytes() == data for f in files)
    assert len({f.stat().st_ino for f in files}) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert all(tmp_files(t) == [] for t in targets)


def test_file_without_a_name_abort_leaves_nothing(store: MaildirStore) -> None:
    (u,) = users(store, 1)
    d = store.begin_delivery([u])
    d.write(b"x" * (FLUSH_THRESHOLD * 2))
    d.abort()
    assert tmp_files(u) == [] and new_files(u) == []


def test_file_without_a_name_fsync_order(store: MaildirStore, monkeypatch) -> None:
    if not delivery_mod._anonymous_files:
        pytest.skip("no O_TMPFILE here")
    targets = users(store, 2)
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def link(src, dst, **kw):
        events.append("link")
        real_link(src, dst, **kw)

    d = store.begin_delivery(targets)
    d.write(MESSAGE)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    results = d._commit_sync()
    monkeypatch.undo()
    assert all(r.ok for r in results)
    assert events == ["fsync-file", "link", "link", "fsync-dir", "fsync-dir"]


def test_file_without_a_name_copies_when_links_fail(store: MaildirStore, monkeypatch) -> None:
    targets = users(store, 2)

    def no_link(src, dst, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    data = MESSAGE * 10000
    results = deliver(store, targets, data)
    monkeypatch.undo()
    assert all(r.ok for r in results)
    assert all(new_files(t)[0].read_bytes() == data for t in targets)
    assert all(tmp_files(t) == [] for t in targets)


# syncfs(2) that reports write-back errors: Linux 5.8 and later (CI has it)
needs_syncfs = pytest.mark.skipif(not can_sync_filesystem(), reason="no syncfs here")


@pytest.mark.parametrize("whole_fs", [pytest.param(True, marks=needs_syncfs), False],
                         ids=["syncfs", "fsync-each"])
def test_group_commit_stages(store: MaildirStore, monkeypatch, whole_fs: bool) -> None:
    """A group: every file written, then every file synced (one syncfs for the file
    system, or an fsync each where there is no syncfs), then placed, then one fsync of the
    shared new/ directory, and one result list per delivery."""
    from mailserver import fsutil
    from mailserver.maildir.committer import commit_group

    if not whole_fs:
        monkeypatch.setattr(fsutil, "_syncfs", None)
    (user,) = users(store, 1)
    deliveries = [store.begin_delivery([user]) for _ in range(3)]
    for i, d in enumerate(deliveries):
        d.write(MESSAGE + b"%d\r\n" % i)
    events: list[str] = []
    real_fsync, real_rename, real_link, real_write = os.fsync, os.rename, os.link, os.write
    real_syncfs = fsutil.sync_filesystem

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def syncfs(fd):
        events.append("syncfs")
        real_syncfs(fd)

    def rename(src, dst):  # a tmp/ file is renamed into new/
        events.append("place")
        real_rename(src, dst)

    def link(src, dst, **kw):  # a file without a name is linked into new/
        events.append("place")
        real_link(src, dst, **kw)

    def write(fd, data):
        events.append("write")
        return real_write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fsutil, "sync_filesystem", syncfs)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "write", write)
    out = commit_group([(d, None) for d in deliveries])
    monkeypatch.undo()
    synced = ["syncfs"] if whole_fs else ["fsync-file"] * 3
    assert events == ["write"] * 3 + synced + ["place"] * 3 + ["fsync-dir"]
    assert [len(results) for _, results in out] == [1, 1, 1]
    assert all(r.ok for _, results in out for r in results)
    assert sorted(p.read_bytes() for p in new_files(user)) == [
        MESSAGE + b"%d\r\n" % i for i in range(3)]
    assert tmp_files(user) == []


@needs_syncfs
def test_group_commit_syncs_many_directories_with_their_file_system(
        store: MaildirStore, monkeypatch) -> None:
    from mailserver import fsutil
    from mailserver.maildir import delivery as delivery_module
    from mailserver.maildir.committer import commit_group

    targets = users(store, 4)
    deliveries = [store.begin_delivery([t]) for t in targets]
    for d in deliveries:
        d.write(MESSAGE)
    synced: list[int] = []
    dir_fsyncs: list[str] = []
    real_syncfs = fsutil.sync_filesystem

    def syncfs(fd):  # the directories' sync (the files have one of their own)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(fd)
        real_syncfs(fd)

    monkeypatch.setattr(fsutil, "sync_filesystem", syncfs)
    monkeypatch.setattr(delivery_module, "fsync_directory", lambda d: dir_fsyncs.append(d))
    out = commit_group([(d, None) for d in deliveries])
    assert len(synced) == 1 and dir_fsyncs == []  # four new/ directories, one file system
    assert all(r.ok for _, results in out for r in results)
    assert all(len(new_files(t)) == 1 for t in targets)


@needs_syncfs
def test_group_commit_syncfs_error_fails_the_group(store: MaildirStore, monkeypatch) -> None:
    """A failed syncfs means none of the group's files is known to be durable: every
    delivery fails (the client retries) and nothing is placed."""
    from mailserver import fsutil
    from mailserver.maildir.committer import commit_group

    (user,) = users(store, 1)
    deliveries = [store.begin_delivery([user]) for _ in range(4)]
    for d in deliveries:
        d.write(MESSAGE)

    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fsutil, "sync_filesystem", failing)
    out = commit_group([(d, None) for d in deliveries])
    assert [[r.ok for r in results] for _, results in out] == [[False]] * 4
    assert all(results[0].error.errno == errno.EIO for _, results in out)
    assert new_files(user) == [] and tmp_files(user) == []


def test_group_commit_failure_stays_with_its_delivery(store: MaildirStore) -> None:
    from mailserver.maildir.committer import commit_group

    good, bad = users(store, 2)
    (bad / "new").rmdir()
    deliveries = [store.begin_delivery([t]) for t in (good, bad, good)]
    for d in deliveries:
        d.write(MESSAGE)
    out = commit_group([(d, None) for d in deliveries])
    assert [[r.ok for r in results] for _, results in out] == [[True], [False], [True]]
    assert len(new_files(good)) == 2 and tmp_files(bad) == []


def test_link_fallback_copies(named_tmp: None, store: MaildirStore, monkeypatch) -> None:
    targets = users(store, 3)
    events: list[str] = []
    real_fsync = os.fsync

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "fsync", fsync)
    data = MESSAGE * 10000
    results = deliver(store, targets, data)
    monkeypatch.undo()
    assert all(r.ok for r in results)
    files = [new_files(t)[0] for t in targets]
    assert all(f.read_bytes() == data for f in files)
    assert len({f.stat().st_ino for f in files}) == 3
    assert all(tmp_files(t) == [] for t in targets)
    # message file, two copies, then the three new/ directories
    assert events == ["fsync"] * 6


def test_directory_fsync_failure_is_reported(store: MaildirStore, monkeypatch) -> None:
    targets = users(store, 2)
    bad_dir = targets[1] / "new"
    real = delivery_mod.fsync_directory

    def fsync_directory(path):
        if Path(path) == bad_dir:
            raise OSError(errno.EIO, "I/O error")
        real(path)

    monkeypatch.setattr(delivery_mod, "fsync_directory", fsync_directory)
    results = deliver(store, targets, MESSAGE)
    assert [r.ok for r in results] == [True, False]
    assert results[1].error.errno == errno.EIO


def test_clean_tmp(named_tmp: None, store: MaildirStore) -> None:
    (u,) = users(store, 1)
    stale = [u / "tmp" / "old1", u / ".Sent" / "tmp" / "old2"]
    for p in stale:
        p.write_bytes(b"partial")
    live = store.begin_delivery([u])
    live.write(b"in progress" * FLUSH_THRESHOLD)  # big enough to be on disk already
    assert store._clean_tmp_sync(now=time.time()) == 0
    assert store._clean_tmp_sync(max_age=36 * 3600, now=time.time() + 37 * 3600) == 3
    assert not any(p.exists() for p in stale) and not live.tmp_path.exists()
    assert (u / "subscriptions").exists() and (u / ".Sent" / "maildirfolder").exists()


def test_a_folder_is_made_whole_before_it_appears(named_tmp: None, store: MaildirStore) -> None:
    """Made in tmp/ and renamed into place; one a crash left half made there goes with
    the stale tmp files."""
    (u,) = users(store, 1)
    account = store.account(u)
    account.create_folder("Reports.2026")
    for name in (".Reports", ".Reports.2026"):
        assert all((u / name / sub).is_dir() for sub in ("cur", "new", "tmp"))
        assert (u / name / "dovecot-uidlist").exists()
    assert [p.name for p in (u / "tmp").iterdir()] == []
    half = u / "tmp" / ".folder.1.2.3"
    (half / "cur").mkdir(parents=True)
    assert store._clean_tmp_sync(now=time.time()) == 0
    assert store._clean_tmp_sync(max_age=36 * 3600, now=time.time() + 37 * 3600) == 1
    assert not half.exists() and (u / ".Reports.2026" / "cur").is_dir()


def test_clean_tmp_on_missing_root(tmp_path: Path) -> None:
    assert MaildirStore(tmp_path / "none")._clean_tmp_sync() == 0


# -- through the reactor ------------------------------------------------------------------

class ReactorTests(trial.TestCase):
    """commit() and clean_tmp() via deferToThread and a running reactor."""

    def setUp(self) -> None:
        # not self.mktemp(): that writes below the working directory when run by pytest
        root = Path(tempfile.mkdtemp(prefix="maildir-test-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        self.targets = [self.store.create_user("example.org", n) for n in ("a", "b")]

    def test_commit(self):
        d = self.store.begin_delivery(self.targets)
        d.write(MESSAGE)
        deferred = d.commit()
        with self.assertRaises(RuntimeError):
            d.commit()

        def check(results):
            self.assertEqual([r.target for r in results], self.targets)
            self.assertTrue(all(r.ok for r in results))
            for t in self.targets:
                self.assertEqual(new_files(t)[0].read_bytes(), MESSAGE)
                self.assertEqual(tmp_files(t), [])

        return deferred.addCallback(check)

    def test_commit_partial_failure(self):
        (self.targets[0] / "new").rmdir()
        d = self.store.begin_delivery(self.targets)
        d.write(MESSAGE)
        return d.commit().addCallback(
            lambda results: self.assertEqual([r.ok for r in results], [False, True]))

    def test_many_commits_at_once(self):
        """Twenty commits queued together all land, each with its own result."""
        from twisted.internet.defer import gatherResults

        deliveries = []
        for i in range(20):
            d = self.store.begin_delivery([self.targets[i % 2]])
            d.write(MESSAGE + b"%d\r\n" % i)
            deliveries.append(d.commit())

        def check(all_results):
            self.assertTrue(all(r.ok for results in all_results for r in results))
            self.assertEqual(len(new_files(self.targets[0])) + len(new_files(self.targets[1])),
                             20)
        return gatherResults(deliveries).addCallback(check)

    def test_clean_tmp(self):
        (self.targets[0] / "tmp" / "stale").write_bytes(b"x")
        deferred = self.store.clean_tmp(max_age=-3600)
        return deferred.addCallback(self.assertEqual, 1)


# -- crashes ------------------------------------------------------------------------------

def _spawn(mode: str, store: MaildirStore, targets: list[Path],
           named_tmp: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    if named_tmp:
        env["CRASH_HELPER_NAMED_TMP"] = "1"
    return subprocess.Popen(
        [sys.executable, str(HERE / "maildir_crash_helper.py"), mode, str(store.root),
         *map(str, targets)],
        stdout=subprocess.PIPE, text=True, env=env)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _check_complete(path: Path) -> None:
    """A file in new/ must be a whole message: S= right and the body recomputable."""
    sys.path.insert(0, str(HERE))
    try:
        from maildir_crash_helper import make_message
    finally:
        sys.path.remove(str(HERE))
    data = path.read_bytes()
    m = NAME_RE.match(path.name)
    assert m and int(m.group(6)) == len(data), path.name
    seed = int(re.search(rb"X-Seed: (\d+)", data).group(1))
    length = int(re.search(rb"X-Length: (\d+)", data).group(1))
    assert data == make_message(seed, length)


@pytest.mark.parametrize("named", [False, True], ids=["without-name", "tmp-file"])
def test_crash_mid_write_leaves_new_empty(store: MaildirStore, named: bool) -> None:
    if not named and not delivery_mod._anonymous_files:
        pytest.skip("no O_TMPFILE here")
    (u,) = users(store, 1)
    proc = _spawn("slow", store, [u], named_tmp=named)
    line = proc.stdout.readline()
    assert line.startswith("writing"), line
    _kill(proc)
    assert new_files(u) == []
    leftovers = tmp_files(u)
    if not named:  # the file without a name went with the process
        assert leftovers == []
    else:
        assert len(leftovers) == 1 and leftovers[0].stat().st_size >= 1 << 20
    (r,) = deliver(store, [u], MESSAGE)
    assert r.ok and new_files(u) == [r.path]
    assert store._clean_tmp_sync(now=time.time() + 37 * 3600) == (1 if named else 0)
    assert tmp_files(u) == [] and new_files(u) == [r.path]


@pytest.mark.parametrize("attempt", range(4))
def test_crash_at_random_moment_leaves_only_complete_messages(
        store: MaildirStore, attempt: int) -> None:
    targets = users(store, 2)
    proc = _spawn("loop", store, targets, named_tmp=attempt % 2 == 1)
    assert proc.stdout.readline().startswith("committed")
    time.sleep(random.Random(attempt).uniform(0.0, 0.3))
    _kill(proc)
    delivered = [f for t in targets for f in new_files(t)]
    assert delivered
    for f in delivered:
        _check_complete(f)
    (r1, r2) = deliver(store, targets, MESSAGE)
    assert r1.ok and r2.ok
