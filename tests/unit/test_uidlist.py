"""dovecot-uidlist, dovecot-keywords and the ":2," info suffix, in Dovecot's formats."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailserver.maildir import flags as flagsmod
from mailserver.maildir import uidlist as uidlistmod
from mailserver.maildir.keywords import KeywordLimit, Keywords
from mailserver.maildir.uidlist import DotLock, LockTimeout, UidList, new_uidvalidity

REPO = Path(__file__).resolve().parent.parent.parent

# As Dovecot 2.3 writes it: header with V/N/G, records with and without ext fields.
DOVECOT_V3 = (
    "3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
    "25011 :1275660100.M1P1.mail.example.org,S=3734\n"
    "25015 W3790 :1275660150.M2P2.mail.example.org,S=3700,W=3790\n"
    "25020 W120 P0a1b2c3d :1275660200.M3P3.mail.example.org,S=118\n"
)


# -- version 3 -------------------------------------------------------------------------------

def test_parse_dovecot_v3(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, DOVECOT_V3.encode())
    assert not ul.damaged
    assert (ul.uidvalidity, ul.nextuid, ul.guid) == (
        1275660208, 25022, "3085f01b7f11094c501100008c4a11c1")
    assert list(ul.items()) == [
        (25011, "1275660100.M1P1.mail.example.org,S=3734"),
        (25015, "1275660150.M2P2.mail.example.org,S=3700,W=3790"),
        (25020, "1275660200.M3P3.mail.example.org,S=118"),
    ]
    assert ul.ext(25020) == "W120 P0a1b2c3d"
    assert ul.lookup("1275660150.M2P2.mail.example.org,S=3700,W=3790") == 25015


def test_v3_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    data = DOVECOT_V3.replace("\n", " X42 Zfoo\n", 1).encode()
    ul = UidList.parse(tmp_path, data)
    assert ul.header_ext == ["X42", "Zfoo"]
    assert ul.serialize() == data
    uid = ul.add("1275660300.M4P4.mail.example.org,S=10")
    assert uid == 25022 and ul.nextuid == 25023
    again = UidList.parse(tmp_path, ul.serialize())
    assert list(again.items()) == list(ul.items())
    assert again.ext(25015) == "W3790" and again.header_ext == ["X42", "Zfoo"]


def test_file_names_with_info_are_stored_as_base(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, b"3 V1 N5 G00\n3 :abc,S=1:2,FS\n")
    assert ul.lookup("abc,S=1") == 3
    assert b":2," not in ul.serialize()


def test_version_1(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, b"1 1100000000 7\n2 100.M1P1.host\n5 200.M2P2.host:2,S\n")
    assert not ul.damaged
    assert (ul.uidvalidity, ul.nextuid) == (1100000000, 7)
    assert list(ul.items()) == [(2, "100.M1P1.host"), (5, "200.M2P2.host")]
    out = ul.serialize().decode()
    assert out.startswith("3 V1100000000 N7 G")
    assert out.endswith("2 :100.M1P1.host\n5 :200.M2P2.host\n")


def test_damaged_file_keeps_what_parses(tmp_path: Path) -> None:
    data = (b"3 V1234 N10 G00ff\n"
            b"1 :one\n"
            b"garbage line\n"
            b"3 :three\n"
            b"2 :two-out-of-order\n"
            b"4 :\n"
            b"12 :twelve\n"
            b"\xff\xfe :weird\n")
    ul = UidList.parse(tmp_path, data)
    assert ul.damaged
    assert ul.uidvalidity == 1234
    assert list(ul.items()) == [(1, "one"), (3, "three"), (12, "twelve")]
    assert ul.nextuid == 13  # never below a listed uid


def test_records_dovecot_appended_after_the_header_are_not_damage(tmp_path: Path) -> None:
    """Dovecot appends to a version 3 file without rewriting N, and takes the last uid
    + 1 as the next one: a quiet read, not a warning and a rewrite per Dovecot APPEND."""
    ul = UidList.parse(tmp_path, b"3 V1796401612 N2 G00\n1 :ours,S=133\n"
                                 b"2 :1796401612.M450115P12523.vm,S=126,W=133\n")
    assert not ul.damaged
    assert ul.nextuid == 3 and ul.lookup("1796401612.M450115P12523.vm,S=126,W=133") == 2
    assert UidList.parse(tmp_path, b"1 1100000000 2\n1 a\n5 b\n").damaged   # version 1


def test_broken_header(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, b"3 Vxyz N\n1 :one\n")
    assert ul.damaged and ul.uidvalidity == 0
    assert list(ul.items()) == [(1, "one")] and ul.nextuid == 2
    for junk in (b"", b"\n", b"9 nonsense\n", os.urandom(200)):
        UidList.parse(tmp_path, junk)  # never raises


def test_duplicate_base_keeps_later_record(tmp_path: Path) -> None:
    ul = UidList.parse(tmp_path, b"3 V1 N9 G00\n1 :a\n2 :b\n5 :a\n")
    assert list(ul.items()) == [(2, "b"), (5, "a")]


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    data = b"3 V1 N3 G00\n2 :caf\xe9.M1P1.host\n"
    ul = UidList.parse(tmp_path, data)
    assert ul.serialize() == data


def test_read_write(tmp_path: Path) -> None:
    assert UidList.read(tmp_path) is None
    ul = UidList.create(tmp_path)
    ul.add("a")
    ul.add("b")
    ul.write()
    assert not (tmp_path / "dovecot-uidlist.tmp").exists()
    assert oct((tmp_path / "dovecot-uidlist").stat().st_mode & 0o777) == "0o600"
    back = UidList.read(tmp_path)
    assert back is not None and back.stamp == ul.stamp
    assert (back.uidvalidity, back.nextuid, back.guid) == (ul.uidvalidity, 3, ul.guid)
    assert list(back.items()) == [(1, "a"), (2, "b")]


def test_new_uidvalidity_is_fresh() -> None:
    now = int(time.time())
    a = new_uidvalidity()
    b = new_uidvalidity()
    assert now <= a < b
    assert new_uidvalidity(previous=b + 100) == b + 101


# -- atomic rewrite ------------------------------------------------------------------------------

def test_only_rename_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the rename the old file is intact and the new one complete and fsynced."""
    old = UidList.create(tmp_path)
    for i in range(100):
        old.add(f"old{i}")
    old.write()
    old_bytes = (tmp_path / "dovecot-uidlist").read_bytes()
    new = UidList.read(tmp_path)
    assert new is not None
    for i in range(100):
        new.add(f"new{i}")
    synced: list[int] = []
    seen: list[tuple[bytes, bytes]] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(uidlistmod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def rename(src, dst):  # type: ignore[no-untyped-def]
        seen.append((Path(dst).read_bytes(), Path(src).read_bytes()))
        assert synced, "renamed before fsync"
        return real_rename(src, dst)
    monkeypatch.setattr(uidlistmod.os, "rename", rename)
    new.write()
    assert seen == [(old_bytes, new.serialize())]
    assert (tmp_path / "dovecot-uidlist").read_bytes() == new.serialize()


_REWRITER = """
import sys
from pathlib import Path
from mailserver.maildir.uidlist import UidList
d = Path(sys.argv[1])
n = 0
print("ready", flush=True)
while True:
    n += 1
    ul = UidList(d, uidvalidity=n, nextuid=1)
    for i in range(3000 + n % 7):
        ul.add(f"{n}.M{i}P1.host,S={i}")
    ul.write()
"""


def test_killed_rewrite_leaves_a_whole_file(tmp_path: Path) -> None:
    """SIGKILL at random moments of a rewrite loop: the list always parses completely."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(7)
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _REWRITER, str(tmp_path)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        ul = UidList.read(tmp_path)
        if ul is None:
            continue  # killed before the first rename
        n = ul.uidvalidity
        assert not ul.damaged
        assert len(ul) == 3000 + n % 7
        assert ul.name(3000 + n % 7) == f"{n}.M{2999 + n % 7}P1.host,S={2999 + n % 7}"


# -- dot-locks ------------------------------------------------------------------------------------

def test_dotlock_excludes_and_releases(tmp_path: Path) -> None:
    target = tmp_path / "dovecot-uidlist"
    with DotLock(target):
        lock = tmp_path / "dovecot-uidlist.lock"
        assert lock.read_text() == f"{os.getpid()}:{uidlistmod._hostname()}"
    assert not (tmp_path / "dovecot-uidlist.lock").exists()


def test_dotlock_of_dead_process_is_broken(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / "x.lock").write_text(f"{proc.pid}:{uidlistmod._hostname()}")
    with DotLock(tmp_path / "x", timeout=2):
        pass


def test_dotlock_held_by_live_process_times_out(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "x.lock").write_text(f"{proc.pid}:{uidlistmod._hostname()}")
        with pytest.raises(LockTimeout):
            DotLock(tmp_path / "x", timeout=0.3).acquire()
        old = time.time() - 1000
        os.utime(tmp_path / "x.lock", (old, old))  # older than the stale limit
        with DotLock(tmp_path / "x", timeout=2):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_an_empty_dotlock_is_judged_by_its_age_as_dovecot_does(tmp_path: Path) -> None:
    """Dovecot's own uid list lock is empty while held: broken only past the stale age."""
    lock = tmp_path / "x.lock"
    lock.write_bytes(b"")
    old = time.time() - 60   # a slow Dovecot sync, still going
    os.utime(lock, (old, old))
    with pytest.raises(LockTimeout):
        DotLock(tmp_path / "x", timeout=0.3).acquire()
    old = time.time() - uidlistmod.LOCK_STALE_AFTER - 1
    os.utime(lock, (old, old))
    with DotLock(tmp_path / "x", timeout=2):   # broken, and taken by us
        assert lock.read_bytes() == f"{os.getpid()}:{uidlistmod._hostname()}".encode()


def test_dotlock_without_hard_links_is_made_in_place(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with DotLock(tmp_path / "x") as lock:
        assert lock.path.read_bytes() == f"{os.getpid()}:{uidlistmod._hostname()}".encode()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]
    assert list(tmp_path.iterdir()) == []


def test_dotlock_without_hard_links_that_cannot_be_written_closes_once(
        tmp_path: Path, monkeypatch) -> None:
    # a second close of a descriptor number shuts whatever another thread opened since
    opened: list[int] = []
    closed: list[int] = []
    real_open, real_close, real_write = os.open, os.close, uidlistmod.write_all
    writes = []

    def open_(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        return fd

    def close(fd):
        closed.append(fd)
        real_close(fd)

    def write_all(fd, data):
        writes.append(fd)
        if len(writes) == 2:   # the lock's own, after the temporary file's
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(os, "link", lambda s, d: (_ for _ in ()).throw(
        OSError(errno.EPERM, "Operation not permitted")))
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(uidlistmod, "write_all", write_all)
    with pytest.raises(OSError):
        DotLock(tmp_path / "x", timeout=0.3).acquire()
    monkeypatch.undo()
    assert len(opened) == len(closed) == 2   # each descriptor closed once
    assert list(tmp_path.iterdir()) == []


def test_dotlock_is_never_empty_and_leaves_no_file_behind(tmp_path: Path) -> None:
    target = tmp_path / "dovecot-uidlist"
    with DotLock(target) as lock:
        assert lock.path.read_bytes() == f"{os.getpid()}:{uidlistmod._hostname()}".encode()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dovecot-uidlist.lock"]
        with pytest.raises(LockTimeout):   # taken: another process's attempt waits
            proc = subprocess.run(
                [sys.executable, "-c", "import sys; from pathlib import Path; "
                 "from mailserver.maildir.uidlist import DotLock; "
                 f"DotLock(Path({str(target)!r}), timeout=0.2).acquire()"],
                capture_output=True, text=True)
            if "LockTimeout" in proc.stderr:
                raise LockTimeout(0, "held", "")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dovecot-uidlist.lock"]
    assert list(tmp_path.iterdir()) == []


# -- keywords ------------------------------------------------------------------------------------

def test_keywords_file(tmp_path: Path) -> None:
    (tmp_path / "dovecot-keywords").write_bytes(b"0 $Junk\n2 Work\nbad line\n30 x\n")
    kw = Keywords.read(tmp_path)
    assert kw.names() == ["$Junk", "Work"]
    assert kw.name_at(0) == "$Junk" and kw.name_at(2) == "Work"
    assert kw.letter("work") == "c" and kw.canonical("WORK") == "Work"
    assert not kw.dirty
    assert kw.letter("$Forwarded") == "b"  # first free letter
    assert kw.dirty
    kw.write()
    assert (tmp_path / "dovecot-keywords").read_bytes() == b"0 $Junk\n1 $Forwarded\n2 Work\n"
    assert not (tmp_path / "dovecot-keywords.lock").exists()


def test_keywords_limit(tmp_path: Path) -> None:
    kw = Keywords(tmp_path)
    letters = [kw.letter(f"k{i}") for i in range(26)]
    assert "".join(letters) == "abcdefghijklmnopqrstuvwxyz"
    with pytest.raises(KeywordLimit):
        kw.letter("one-too-many")
    assert kw.letter("K3") == "d"


def test_unknown_letter_named_as_dovecot_does(tmp_path: Path) -> None:
    kw = Keywords(tmp_path)
    assert kw.name_at(4) == "unknown-4"
    assert kw.letter("unknown-4") == "e"


def test_keywords_mtime_grows_each_write(tmp_path: Path) -> None:
    """Dovecot notices a rewrite by the mtime in seconds."""
    kw = Keywords(tmp_path)
    stamps = []
    for i in range(3):
        kw.letter(f"k{i}")
        kw.write()
        stamps.append(int((tmp_path / "dovecot-keywords").stat().st_mtime))
    assert stamps[0] < stamps[1] < stamps[2]


# -- the info suffix --------------------------------------------------------------------------

def test_flags_from_file_names() -> None:
    names = {0: "$Junk", 1: "Work"}.get
    assert flagsmod.flags_from_letters(flagsmod.info_letters("x,S=1:2,FRS"), names) == {
        "\\Flagged", "\\Answered", "\\Seen"}
    assert flagsmod.flags_from_letters(flagsmod.info_letters("x:2,DPSTab"), names) == {
        "\\Draft", "\\Seen", "\\Deleted", "$Junk", "Work"}
    assert flagsmod.info_letters("x") == ""
    assert flagsmod.info_letters("x:1,S") == ""  # not a flags info
    assert flagsmod.base_name("123.M4P5.host,S=9:2,S") == "123.M4P5.host,S=9"
    assert flagsmod.size_from_base("123.M4P5.host,S=9,W=11") == 9
    assert flagsmod.size_from_base("123.M4P5.host") is None
    assert flagsmod.size_from_base("123.M4P5.host,S=\u00b2") is None   # a digit, not 0-9


def test_with_letters_keeps_unknown_and_sorts() -> None:
    assert flagsmod.with_letters("x", "S") == "x:2,S"
    assert flagsmod.with_letters("x:2,PS", "FR") == "x:2,FPR"  # P kept, S dropped
    assert flagsmod.with_letters("x:2,Sa,extra", "aT") == "x:2,Ta,extra"
    assert flagsmod.with_letters("x:1,foo", "S") == "x:2,S"
    letters = flagsmod.letters_for({"\\Seen", "\\Draft", "$X", "\\Recent"}, lambda k: "c")
    assert letters == "DSc"


def test_normalize_flag() -> None:
    assert flagsmod.normalize_flag("\\SEEN") == "\\Seen"
    assert flagsmod.normalize_flag("$Label1") == "$Label1"
    for bad in ("\\Recent", "\\Bogus", "a b", "x(", "", "k\u00e9", "a*"):
        with pytest.raises(ValueError):
            flagsmod.normalize_flag(bad)
