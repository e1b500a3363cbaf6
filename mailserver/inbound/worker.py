"""The child side of `workers.WorkerProcess`: runs Twisted-free functions (DKIM and ARC
verification, a folder's header pass) for the server, one request at a
time, in its own interpreter.

A thread would share the server's GIL: the reactor and the working thread then take
turns, each hand-off a futex call, and the work's CPU time comes out of the reactor's.
Here it runs beside it.  Requests and answers are pickled frames on stdin/stdout
(4-byte length, then `(id, "module:function", args)` / `(id, ok, value)`); the peer is
only ever the server that started this process, and only functions of the modules in
ALLOWED can be called.

Run as ``python -m mailserver.inbound.worker [MODULE ...]`` (by the server): the modules
named (of ALLOWED; all of them when none is) are imported before the first request.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import sys
from typing import Any, BinaryIO

# DKIM/ARC verification; the IMAP header pass (a folder's first FETCH ENVELOPE or SEARCH).
ALLOWED = frozenset({"mailserver.inbound.dkimverify", "mailserver.imap.summary"})
MAX_FRAME = 16 * 1024 * 1024
READ_SIZE = 256 * 1024


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    data = stream.read(size)
    return data if len(data) == size else None


def frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(4, "big") + data


def resolve(name: str) -> Any:
    module_name, _, function = name.partition(":")
    if module_name not in ALLOWED:
        raise ValueError(f"{module_name} may not be called here")
    return getattr(importlib.import_module(module_name), function)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until end of input (the server closed the pipe or is gone).

    Whatever one read brings is answered in one write: requests that arrived together
    (several messages ending at once) cost the server one wake-up for their answers."""
    functions: dict[str, Any] = {}
    buffer = bytearray()
    while True:
        chunk = stdin.read1(READ_SIZE)  # type: ignore[attr-defined]
        if not chunk:
            return
        buffer += chunk
        answers = []
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big")
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            if len(buffer) < 4 + size:
                break
            key, name, args = pickle.loads(buffer[4:4 + size])
            del buffer[:4 + size]
            try:
                function = functions.get(name) or functions.setdefault(name, resolve(name))
                answer = (key, True, function(*args))
            except Exception as e:  # the server turns it into a temperror result
                answer = (key, False, f"{type(e).__name__}: {e}")
            answers.append(frame(answer))
        if answers:
            stdout.write(b"".join(answers))
            stdout.flush()


def main() -> None:
    # Imported up front: the first request does not wait for them.
    for module in [m for m in sys.argv[1:] if m in ALLOWED] or sorted(ALLOWED):
        importlib.import_module(module)
    # The server gone (a closed pipe) or interrupted: nothing is owed to anyone.
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
