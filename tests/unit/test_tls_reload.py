"""The certificate file watcher's reload logic (the files on disk, a real thread)."""

from __future__ import annotations

import threading
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailserver import tls_reload
from mailserver.certfiles import check_files, parse_pair
from mailserver.tls_reload import CertificateFileWatcher, ReloadingContextFactory
from tests.unit.test_certfiles import make_pem


class SighupDuringATimedLook(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_sighup_while_a_timed_look_runs_reads_the_files_after_it(self):
        """The timed look may have read the files before they changed: the SIGHUP that
        came meanwhile is not answered by that look alone (it was, so a renewed
        certificate waited one more interval)."""
        root = Path(self.mktemp())
        root.mkdir()
        cert, key = root / "cert.pem", root / "key.pem"
        first_cert, first_key = make_pem("first.example.org")
        cert.write_bytes(first_cert)
        key.write_bytes(first_key)
        factory = ReloadingContextFactory(parse_pair(first_cert, first_key))
        watcher = CertificateFileWatcher(factory, cert, key, 3600.0, None)
        has_read, go_on = threading.Event(), threading.Event()
        self.addCleanup(go_on.set)

        def slow_check(*args):
            found = check_files(*args)          # the files as they are now ...
            has_read.set()
            go_on.wait(10)                      # ... answered only later
            return found
        self.patch(tls_reload, "check_files", slow_check)
        timed = watcher.check()                 # a timed look under way, in a thread
        for _ in range(1000):
            if has_read.is_set():
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(has_read.is_set())
        second_cert, second_key = make_pem("second.example.org")
        key.write_bytes(second_key)
        cert.write_bytes(second_cert)
        forced = watcher.reload()               # SIGHUP meanwhile
        go_on.set()
        yield defer.gatherResults([timed, forced])
        self.assertIn("second.example.org", factory.pair.subject)
