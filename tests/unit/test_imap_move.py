"""MOVE (RFC 6851) when the source folder changes under it."""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from tests.unit.imap_session_harness import SessionCase


class MoveAcrossARenumbering(SessionCase):
    """Another process gave the folder new uids while a MOVE copied: the originals are
    removed by their files (the uids the MOVE held now name other messages), so the
    MOVE still ends once: not in both folders, and no other message removed."""

    @inlineCallbacks
    def test_the_originals_are_found_by_their_files(self):
        for n in range(3):
            yield self.append(b"Subject: m%d\r\n\r\nbody %d\r\n" % (n, n))
        out = yield self.command(b"c", b"CREATE Dest")
        self.assertIn(b"c OK", out)
        yield self.select()
        folder = self.session.folder
        copy_to = folder.copy_to

        def renumbering_copy(uids, dest):
            def renumber(pairs):
                uidlist = folder.path / "dovecot-uidlist"
                lines = uidlist.read_bytes().splitlines()
                head = [b"V%d" % (folder.uidvalidity + 1) if h.startswith(b"V") else h
                        for h in lines[0].split()]
                names = [line.split(b" ", 1)[1] for line in lines[1:]][::-1]
                uidlist.write_bytes(b" ".join(head) + b"\n" + b"".join(
                    b"%d %s\n" % (i + 1, n) for i, n in enumerate(names)))
                os.utime(uidlist, (time.time() + 5, time.time() + 5))
                return folder.refresh().addCallback(lambda _: pairs)
            return copy_to(uids, dest).addCallback(renumber)

        folder.copy_to = renumbering_copy
        self.send(b"m UID MOVE 1 Dest\r\n")
        yield self.wait_for(rb"\* BYE ")
        for _ in range(200):
            left = sorted(p.read_bytes().split(b"\r\n")[0]
                          for p in (self.user_path / "cur").iterdir())
            if len(left) == 2:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(left, [b"Subject: m1", b"Subject: m2"])
        moved = [p.read_bytes().split(b"\r\n")[0]
                 for p in (self.user_path / ".Dest" / "cur").iterdir()]
        self.assertEqual(moved, [b"Subject: m0"])
