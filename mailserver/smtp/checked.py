"""The MX's delivery when inbound checks apply: spool, judge, then deliver.

The verdict decides the folder (INBOX or Junk) and adds header fields in front of the
message, and it needs the whole message (DKIM body hashes, the spam filter).  So the
body streams into a spool file first; at the end of DATA the checks run on it, then the
message is delivered from the spool through the usual delivery (Maildir files synced
before the 250, remote alias targets queued), with our fields in front and any
Authentication-Results of ours that came from outside removed (RFC 8601 5).

A refusal is an SMTPReplyError from commit(), which the session answers (550/554 for a
policy refusal, 451 for try-later); nothing is stored then.  The spool file is removed
in every outcome; one left by a crash is removed when the server starts.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailserver.inbound.authresults import is_ours, remove_fields
from mailserver.inbound.checker import InboundChecker, MessageFacts, Verdict
from mailserver.inbound.junk import JunkFolders
from mailserver.smtp.delivery import IDelivery, Placement, Recipient
from mailserver.smtp.replies import Reply, SMTPReplyError

log = Logger()

# Header bytes a checked message may have: its header section is parsed in the reactor
# (DMARC's From:, DKIM key names, removing forged fields), a few ms for this much.
MAX_HEADER = 256 * 1024
COPY_CHUNK = 256 * 1024
MEMORY_SPOOL = 64 * 1024  # bytes of a message kept in memory while it is checked (as delivery does)
SPAM_FIELDS = frozenset({b"x-spam", b"x-spam-status", b"x-spam-flag", b"x-spam-score",
                         b"x-spam-level", b"x-spamd-result", b"x-rspamd-score"})
_SUBJECT = re.compile(rb"(?im)^subject[ \t]*:.*(?:\r\n[ \t].*)*\r\n")


def clean_spool(spool_dir: Path) -> int:
    """Remove spool files a crash left behind (at start-up, before anything listens)."""
    removed = 0
    try:
        names = os.listdir(spool_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            os.unlink(spool_dir / name)
            removed += 1
        except OSError:
            pass
    return removed


def rewrite_subject(header_block: bytes, subject: str) -> bytes:
    """The header block with its Subject field replaced (or added)."""
    line = b"Subject: " + subject.replace("\r", " ").replace("\n", " ")[:900].encode(
        "utf-8", "replace") + b"\r\n"
    block = header_block if header_block.endswith(b"\r\n") or not header_block \
        else header_block + b"\r\n"
    return _SUBJECT.sub(b"", block) + line


class ClientGone(Exception):
    """The client disconnected before its message was delivered."""


HEADER_TOO_BIG = Reply(552, "5.3.4", "Error: message header size exceeds limit")


def _spool_file(spool_dir: Path, queue_id: str) -> Any:
    return tempfile.NamedTemporaryFile(dir=spool_dir, prefix=queue_id + ".", delete=False)


def _dropped_fields(authserv_id: str, spam_checked: bool) -> Callable[[bytes, bytes], bool]:
    """Fields of the incoming header that must not reach the mailbox: Authentication-
    Results claiming to be ours (RFC 8601 5) and, when the spam filter ran, spam verdict
    fields a sender may have written himself."""
    def drop(name: bytes, value: bytes) -> bool:
        return (spam_checked and name in SPAM_FIELDS) or is_ours(name, value, authserv_id)
    return drop


@implementer(IDelivery)
class CheckedDelivery:
    def __init__(self, checker: InboundChecker, junk: JunkFolders, store: Any,
                 make_inner: Callable[[Placement | None], IDelivery], spool_dir: Path,
                 facts: dict[str, Any], spf: defer.Deferred | None) -> None:
        self.checker = checker
        self.junk = junk
        self.store = store
        self.make_inner = make_inner
        self.facts = facts
        self.spf = spf
        self.verdict: Verdict | None = None
        self.log_text = ""   # the checks' results, for the accepted-message log line
        self._recipients: list[Recipient] = []
        self._prefix = b""
        self._trace = b""
        self._head = bytearray()
        self._header_end = -1       # spool offset where the blank line (or body) starts
        self._header_too_big = False   # no end of the header section within MAX_HEADER
        self._client_gone = False
        self._size = 0
        self._inner: IDelivery | None = None
        self._closed = False
        # A message stays in memory up to MEMORY_SPOOL bytes (checked as bytes, never on
        # disk before its delivery), a larger one goes to a spool file.
        self._memory: bytearray | None = bytearray()
        self._spool_dir = spool_dir
        self._file: Any = None
        self.path: Path | None = None

    def add_recipient(self, recipient: Recipient) -> None:
        self._recipients.append(recipient)

    def write_headers(self, delivery: bytes, trace: bytes) -> None:
        self._prefix, self._trace = delivery, trace

    def write(self, data: bytes) -> None:
        if self._header_end < 0:
            start = max(0, len(self._head) - 3)
            self._head += data
            if self._head[:2] == b"\r\n":
                self._header_end = 0
            else:
                end = self._head.find(b"\r\n\r\n", start)
                if end >= 0:
                    self._header_end = end + 2
            if self._header_end > MAX_HEADER or (self._header_end < 0
                                                 and len(self._head) > MAX_HEADER):
                self._header_too_big = True  # refused at the end of DATA
                self._header_end = 0
            if self._header_end >= 0:
                del self._head[self._header_end:]
        self._size += len(data)
        if self._memory is not None:
            self._memory += data
            if self._size <= MEMORY_SPOOL:
                return
            data, self._memory = bytes(self._memory), None
            self._open_spool()
        self._file.write(data)

    def _open_spool(self) -> None:
        try:
            self._file = _spool_file(self._spool_dir, self.facts["queue_id"])
        except FileNotFoundError:  # removed while running: make it again
            self._spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._file = _spool_file(self._spool_dir, self.facts["queue_id"])
        self.path = Path(self._file.name)

    @property
    def source(self) -> Path | bytes:
        """The message for the checks: its bytes, or the spool file's path."""
        if self._memory is not None:
            return bytes(self._memory)
        assert self.path is not None
        return self.path

    def commit(self) -> defer.Deferred:
        try:
            if self._file is not None:
                self._file.flush()
        except OSError as e:
            self._discard()
            return defer.fail(e)
        if self._header_too_big:
            # Postfix's header_size_limit is 100 KB: a header section over 256 KiB is no mail,
            # and one we cannot strip forged fields from or find the From: in.
            self._discard()
            return defer.fail(SMTPReplyError(HEADER_TOO_BIG))
        if self._header_end < 0:  # the message was all header (no blank line)
            self._header_end = len(self._head)
        facts = MessageFacts(path=self.source, header_block=bytes(self._head),
                             rcpts=tuple(r.address for r in self._recipients), **self.facts)
        d = self.checker.check_message(facts, self.spf)
        d.addCallback(self._judged)
        d.addBoth(self._finished)
        return d

    def client_gone(self) -> None:
        """The connection closed while the checks ran: the client never sees a 250 and
        will send the message again, so this copy is not delivered (no duplicate)."""
        self._client_gone = True

    @defer.inlineCallbacks
    def _judged(self, verdict: Verdict):
        self.verdict = verdict
        if self._client_gone:  # the session logs it: nothing acknowledged, nothing stored
            raise ClientGone()
        checks = " ".join(f"{k}={v}" for k, v in verdict.summary.items())
        # Accepted: the session's accepted-message line carries the results; refused:
        # one line of its own here, the session's line gives the reply.
        self.log_text = f" {checks} -> {verdict.action}" if checks else f" -> {verdict.action}"
        if verdict.action in ("reject", "tempfail"):
            log.info("smtp message {qid} from <{sender}> ip={ip}:{checks}",
                     qid=self.facts["queue_id"], sender=self.facts["mail_from"],
                     ip=self.facts["ip"], checks=self.log_text)
            assert verdict.reply is not None
            raise SMTPReplyError(verdict.reply)
        place: Placement | None = None
        if verdict.action == "junk":
            users = [self.store.user_path(u.domain, u.localpart)
                     for r in self._recipients for u in r.local]
            try:
                yield self.junk.prepare(users)
                place = self.junk.place
            except Exception as e:  # a Junk folder that cannot be made: INBOX, not a retry
                log.error("message {qid}: cannot prepare the Junk folder ({error}); "
                          "delivering to INBOX", qid=self.facts["queue_id"], error=e)
        inner = self._inner = self.make_inner(place)
        for recipient in self._recipients:
            inner.add_recipient(recipient)
        inner.write_headers(self._prefix, verdict.headers + self._trace)
        header = bytes(self._head)
        if header:
            header = remove_fields(header, _dropped_fields(self.checker.authserv_id,
                                                           verdict.spam_checked))
        if verdict.subject is not None:
            header = rewrite_subject(header, verdict.subject)
        inner.write(header)
        if self._memory is not None:
            inner.write(bytes(self._memory[self._header_end:]))
        else:  # a large body: one chunk per reactor turn, other sessions go on meanwhile
            yield task.cooperate(self._copy_body(inner)).whenDone()
        outcome = yield inner.commit()
        return outcome

    def _copy_body(self, inner: IDelivery) -> Iterator[None]:
        with open(self.path, "rb") as f:
            f.seek(self._header_end)
            while True:
                chunk = f.read(COPY_CHUNK)
                if not chunk:
                    return
                inner.write(chunk)
                yield None

    def _finished(self, result: Any) -> Any:
        self._discard()
        return result

    def _discard(self) -> None:
        if not self._closed:
            self._closed = True
            self._memory = None
            if self._file is None:
                return
            try:
                self._file.close()
            except OSError:
                pass
            try:
                os.unlink(self._file.name)
            except OSError:
                pass

    def abort(self) -> None:
        if self._inner is not None:
            self._inner.abort()
        self._discard()
