"""CREATE-SPECIAL-USE (RFC 6154 3): CREATE's parameter parser, the per-account file
(maildir/specialuse.py) and the account keeping it through CREATE, RENAME and DELETE."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from twisted.internet.defer import inlineCallbacks

from mailserver.imap.parser import Arguments, BadCommand
from mailserver.imap.specialuse import UseAttrRefused, chosen_use, parse_create_params
from mailserver.maildir import specialuse
from tests.unit.imap_session_harness import SessionCase


def params(text: bytes) -> list[bytes] | None:
    return parse_create_params(Arguments([text]))


@pytest.mark.parametrize("text, expected", [
    (b"", None),
    (b" (USE (\\Archive))", [b"\\Archive"]),
    (b" (use (\\archive \\Sent))", [b"\\archive", b"\\Sent"]),
    (b" (USE ())", []),
    (b" (USE (\\X-Whatever))", [b"\\X-Whatever"]),
])
def test_parse_create_params(text: bytes, expected: list[bytes] | None) -> None:
    assert params(text) == expected


@pytest.mark.parametrize("text", [
    b" ()", b" (USE)", b" (USE \\Archive)", b" (USE (Archive))", b" (FOO (\\Archive))",
    b" (USE (\\Archive) USE (\\Sent))", b" (USE (\\Archive)", b" (USE (\\*))", b"(USE ())",
    b" (USE (\\Archive)) x", b" (USE (" + b"\\A " * 20 + b"))",
])
def test_parse_create_params_bad(text: bytes) -> None:
    with pytest.raises(BadCommand):
        params(text)


def test_chosen_use() -> None:
    assert chosen_use(None) is None
    assert chosen_use([]) is None
    assert chosen_use([b"\\archive"]) == "\\Archive"
    assert chosen_use([b"\\Trash", b"\\TRASH"]) == "\\Trash"
    for refused in ([b"\\All"], [b"\\Flagged"], [b"\\Bogus"], [b"\\Sent", b"\\Drafts"]):
        with pytest.raises(UseAttrRefused):
            chosen_use(refused)


def test_file_round_trip(tmp_path: Path) -> None:
    uses = {"Archiv/2024": "\\Archive", "Entwürfe": "\\Drafts", "a.b": "\\Junk"}
    data = specialuse.format_uses(uses)
    assert b"Entw&APw-rfe" in data
    assert specialuse.parse(data) == uses
    # Damage is skipped, not fatal.
    assert specialuse.parse(data + b"\\Bogus\tX\nnot a line\n\\Sent\t&Jjo\n") == uses
    assert specialuse.read(tmp_path) == {}
    assert specialuse.update(tmp_path, lambda u: {**u, "X": "\\Sent"}, timeout=1)
    assert not specialuse.update(tmp_path, lambda u: None, timeout=1)
    assert specialuse.read(tmp_path) == {"X": "\\Sent"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [specialuse.SPECIAL_USE_FILE]


class AccountSpecialUse(SessionCase):

    def attributes(self) -> dict[str, tuple[str, ...]]:
        return {e.name: e.attributes for e in self.account.list_folders()}

    @inlineCallbacks
    def test_create_rename_delete(self):
        self.account.create_folder("Old", "\\Archive")
        self.account.create_folder("Old.Child", "\\Junk")
        self.assertIn("\\Archive", self.attributes()["Old"])
        yield self.account.rename_folder("Old", "New")
        attrs = self.attributes()
        self.assertIn("\\Archive", attrs["New"])
        self.assertIn("\\Junk", attrs["New.Child"])
        self.assertNotIn("Old", attrs)
        yield self.account.delete_folder("New")
        self.assertEqual(specialuse.read(self.user_path), {"New.Child": "\\Junk"})
        self.account.create_folder("New")
        self.assertFalse({"\\Archive", "\\Junk"} & set(self.attributes()["New"]))

    def test_default_folders_keep_their_use(self):
        attrs = self.attributes()
        for name, use in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                          ("Junk", "\\Junk"), ("Archive", "\\Archive")):
            self.assertIn(use, attrs[name])

    def test_stale_attribute_goes_with_a_plain_create(self):
        self.account.create_folder("Box", "\\Trash")
        (self.user_path / ".Box" / "cur").rmdir()   # another program removes the folder
        for sub in ("new", "tmp"):
            (self.user_path / ".Box" / sub).rmdir()
        for f in (self.user_path / ".Box").iterdir():
            f.unlink()
        (self.user_path / ".Box").rmdir()
        self.account.create_folder("Box")
        self.assertNotIn("\\Trash", self.attributes()["Box"])
        self.assertEqual(specialuse.read(self.user_path), {})

    def test_a_failed_write_leaves_no_folder(self):
        lock = self.user_path / (specialuse.SPECIAL_USE_FILE + ".lock")
        lock.write_text(f"{os.getppid()}:{socket.gethostname()}")   # a live process's
        try:
            with self.assertRaises(Exception):
                self.account.create_folder("Locked", "\\Sent")
        finally:
            lock.unlink()
        self.assertNotIn("Locked", self.attributes())

    @inlineCallbacks
    def test_create_command(self):
        out = yield self.command(b"c", b"CREATE Mine (USE (\\Archive))")
        self.assertIn(b"c OK", out)
        out = yield self.command(b"l", b'LIST "" Mine RETURN (SPECIAL-USE)')
        self.assertRegex(out, rb'\* LIST \([^)]*\\Archive[^)]*\) "\." Mine')
        out = yield self.command(b"l2", b'LIST (SPECIAL-USE) "" "*"')
        self.assertIn(b" Mine\r\n", out)
        for tag, text, answer in (
                (b"u", b"CREATE Other (USE (\\Bogus))", b"u NO [USEATTR]"),
                (b"a", b"CREATE Other (USE (\\All))", b"a NO [USEATTR]"),
                (b"t", b"CREATE Other (USE (\\Sent \\Trash))", b"t NO [USEATTR]"),
                (b"g", b"CREATE Other (USE \\Sent)", b"g BAD"),
                (b"p", b"CREATE Other (NOPE)", b"p BAD"),
                (b"e", b"CREATE Mine (USE (\\Sent))", b"e NO [ALREADYEXISTS]"),
                (b"i", b"CREATE INBOX (USE (\\Sent))", b"i NO [ALREADYEXISTS]")):
            out = yield self.command(tag, text)
            self.assertIn(answer, out)
        self.assertNotIn("Other", self.attributes())
        self.assertEqual(specialuse.read(self.user_path), {"Mine": "\\Archive"})
