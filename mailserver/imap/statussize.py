"""STATUS=SIZE (RFC 8438): a mailbox's size for STATUS and LIST-STATUS.

The size is the sum of the messages' RFC822.SIZE (CRLF octets), which is more than the
stored size of a file with bare LF line ends (Dovecot's), so the folder's own
`total_size()` (what the quota counts) will not do.  The sum comes from what is known
without reading a message, the file name (",W=", or ",S=" on our CRLF files) and the
folder index's cached sizes, worked out in a thread (a read job of the folder's
executor, over its message list as it stands then); a message nobody measured yet is
measured there once, and its size cached for FETCH and POP3.  The result is kept per
folder until its message list changes.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet import defer

from mailserver.maildir.sizes import VSIZE_KEY, own_name_pattern_escaped, total_vsize

STATUS_SIZE_CAPABILITY = b"STATUS=SIZE"

# folder -> (the message list the total was computed from, the total)
_totals: "weakref.WeakKeyDictionary[Any, tuple[list[Any], int]]" = weakref.WeakKeyDictionary()


def mailbox_size(folder: Any) -> defer.Deferred[int]:
    """The RFC 8438 size of a loaded (refreshed) folder."""
    messages = folder.messages   # replaced, never changed, when the folder changes
    known = _totals.get(folder)
    if known is not None and known[0] is messages:
        return defer.succeed(known[1])
    own = own_name_pattern_escaped(folder.escaped_host)
    d = folder.read_in_thread(
        lambda view: total_vsize(view.infos.values(), view.path, view.index, own))

    def done(result: tuple[int, dict[int, tuple[str, int]]]) -> int:
        total, measured = result
        for uid, (base, size) in measured.items():
            info = folder.by_uid(uid)
            if info is not None and info.basename == base:
                folder.cache_put(uid, VSIZE_KEY, str(size))
        if folder.messages is messages:  # nothing changed meanwhile: keep it
            _totals[folder] = (messages, total)
        return total

    return d.addCallback(done)
