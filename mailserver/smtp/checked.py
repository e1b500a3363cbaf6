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

import re
from pathlib import Path
from typing import Any, Callable, Iterator

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.inbound.authresults import is_ours, remove_fields
from mailserver.inbound.checker import InboundChecker, MessageFacts, Verdict
from mailserver.inbound.headerscan import has_field
from mailserver.inbound.junk import JunkFolders
from mailserver.inbound.spf import SPFResult
from mailserver.smtp.delivery import IDelivery, Placement, Recipient
from mailserver.smtp.replies import LOCAL_ERROR, Reply, SMTPReplyError
from mailserver.smtp.spool import MessageSpool, clean_spool  # noqa: F401 (imported from here too)

log = Logger()

# Header bytes a checked message may have: its header section is parsed in the reactor
# (DMARC's From:, DKIM key names, removing forged fields), a few ms for this much.
MAX_HEADER = 256 * 1024
SPAM_FIELDS = frozenset({b"x-spam", b"x-spam-status", b"x-spam-flag", b"x-spam-score",
                         b"x-spam-level", b"x-spamd-result", b"x-rspamd-score"})
# The names of the fields _dropped_fields() may drop: a header without any is kept as is.
DROPPED = (b"authentication-results",)
DROPPED_SPAM = DROPPED + tuple(sorted(SPAM_FIELDS))
_SUBJECT = re.compile(rb"(?im)^subject[ \t]*:.*(?:\r\n[ \t].*)*\r\n")


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
                 facts: dict[str, Any], spf: SPFResult | defer.Deferred | None) -> None:
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
        self._client_gone = False
        self._inner: IDelivery | None = None
        # A small message is checked as bytes (never on disk before its delivery), a
        # larger one from a spool file.
        self.spool = MessageSpool(spool_dir, facts["queue_id"], max_header=MAX_HEADER)

    def add_recipient(self, recipient: Recipient) -> None:
        self._recipients.append(recipient)

    def write_headers(self, delivery: bytes, trace: bytes) -> None:
        self._prefix, self._trace = delivery, trace

    def write(self, data: bytes) -> None:
        self.spool.write(data)  # a header section too big is refused at the end of DATA

    def commit(self) -> defer.Deferred:
        try:
            self.spool.finish()
        except OSError as e:
            self._discard()
            return defer.fail(e)
        if self.spool.header_too_big:
            # Postfix's header_size_limit is 100 KB: a header section over 256 KiB is no mail,
            # and one we cannot strip forged fields from or find the From: in.
            self._discard()
            return defer.fail(SMTPReplyError(HEADER_TOO_BIG))
        facts = MessageFacts(path=self.spool.source, header_block=self.spool.header,
                             rcpts=tuple(r.address for r in self._recipients), **self.facts)
        d = self.checker.check_message(facts, self.spf)
        d.addCallback(self._judged)
        d.addBoth(self._finished)
        return d

    def client_gone(self) -> None:
        """The connection closed while the checks ran: the client never sees a 250 and
        will send the message again, so this copy is not delivered (no duplicate)."""
        self._client_gone = True

    def _judged(self, verdict: Verdict) -> defer.Deferred:
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
        if verdict.action == "junk":
            users = [self.store.user_path(u.domain, u.localpart)
                     for r in self._recipients for u in r.local]
            d = defer.maybeDeferred(self.junk.prepare, users)
            d.addCallbacks(lambda _: self.junk.place, self._junk_failed)
            return d.addCallback(self._deliver, verdict)
        return self._deliver(None, verdict)

    def _junk_failed(self, failure: Failure) -> None:
        """A Junk folder that cannot be made (a uid-list lock held too long, a file where
        the folder should be): 451, nothing stored, and the sender tries again.  INBOX
        would hand the user what the checks set aside."""
        log.error("message {qid}: cannot prepare the Junk folder ({error}); "
                  "answering try again later", qid=self.facts["queue_id"], error=failure.value)
        raise SMTPReplyError(LOCAL_ERROR)

    def _deliver(self, place: Placement | None, verdict: Verdict) -> defer.Deferred:
        inner = self._inner = self.make_inner(place)
        for recipient in self._recipients:
            inner.add_recipient(recipient)
        inner.write_headers(self._prefix, verdict.headers + self._trace)
        header = self.spool.header
        if header and has_field(header, DROPPED_SPAM if verdict.spam_checked else DROPPED):
            header = remove_fields(header, _dropped_fields(self.checker.authserv_id,
                                                           verdict.spam_checked))
        if verdict.subject is not None:
            header = rewrite_subject(header, verdict.subject)
        inner.write(header)
        if self.spool.in_memory:
            inner.write(self.spool.rest())
            return inner.commit()
        # a large body: one chunk per reactor turn, other sessions go on meanwhile
        d = task.cooperate(self._copy_body(inner)).whenDone()
        return d.addCallback(lambda _: inner.commit())

    def _copy_body(self, inner: IDelivery) -> Iterator[None]:
        for chunk in self.spool.rest_chunks():
            inner.write(chunk)
            yield None

    def _finished(self, result: Any) -> Any:
        self._discard()
        return result

    def _discard(self) -> None:
        self.spool.discard()

    def abort(self) -> None:
        if self._inner is not None:
            self._inner.abort()
        self._discard()
