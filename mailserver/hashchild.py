"""The child side of `hashprocess.HashProcess`: verifies argon2id hashes with libsodium,
one request at a time, in a process of its own.

libsodium maps argon2's 46 MiB with MAP_POPULATE: faulting them in holds the address
space's lock for several milliseconds, and in the server's own process every thread
that maps memory meanwhile (a first login's folder scan, running beside the
verification) waits behind it.  Here only this process waits.

It is run by path, ``python -I -S hashchild.py LIBSODIUM``, and imports nothing but the
standard library's ctypes: about 9 MB, not the 16-20 MB of an interpreter that imports
the server's password module.  LIBSODIUM is the shared object to load (PyNaCl's own,
which carries libsodium).

Frames on stdin: 4-byte big-endian length, then a 4-byte request key, a 2-byte hash
length, the PHC hash (ASCII) and the password.  Answers on stdout: the 4-byte key and
one byte, 1 when the password matches, 0 when not.  The peer is only ever the server
that started this process; a malformed frame ends it (the server then verifies in
threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from typing import BinaryIO

MAX_FRAME = 64 * 1024


def serve(verify: "ctypes._CFuncPtr", stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until end of input (the server closed the pipe or is gone)."""
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        size = int.from_bytes(head, "big")
        if not 6 <= size <= MAX_FRAME:
            raise ValueError(f"frame of {size} bytes")
        body = stdin.read(size)
        if len(body) < size:
            return
        hash_size = int.from_bytes(body[4:6], "big")
        stored, password = body[6:6 + hash_size], body[6 + hash_size:]
        if len(stored) < hash_size or b"\0" in stored:
            raise ValueError("malformed request")
        ok = verify(stored, password, len(password)) == 0
        stdout.write(body[:4] + (b"\1" if ok else b"\0"))
        stdout.flush()


def main() -> None:
    # The server's stop (systemd's SIGTERM to the whole unit, a terminal's ^C to the
    # process group) reaches this process too: it leaves when its input closes, after
    # the answer it owes, as the server's shutdown asks.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    sodium = ctypes.CDLL(sys.argv[1])
    if sodium.sodium_init() < 0:   # also picks argon2's vectorised implementation
        raise SystemExit("libsodium cannot start")
    verify = sodium.crypto_pwhash_str_verify
    verify.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong)
    verify.restype = ctypes.c_int
    # The server gone (a closed pipe): nothing is owed to anyone.
    with contextlib.suppress(BrokenPipeError):
        serve(verify, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
