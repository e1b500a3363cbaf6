"""The MX's inbound checks, put together: one verdict per message.

SPF starts when MAIL FROM is accepted; at the end of DATA, DKIM and ARC (verified in a
thread on the spooled bytes) and rspamd (over HTTP) run side by side, then DMARC joins
the From: domain to the SPF and DKIM results.  The verdict says where the message goes
(INBOX, Junk, refused, or try later) and which header fields go in front of it: our
Authentication-Results (RFC 8601) and, when rspamd ran, X-Spam fields.

Every part fails soft: a DNS server that does not answer, a malformed signature or a
spam filter talking nonsense gives the RFCs' temperror/permerror/none, a log line, and a
message that is accepted or refused exactly once, never lost.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailserver.config import ConfigError, InboundConfig
from mailserver.inbound import dnsbl
from mailserver.inbound.authresults import format_header
from mailserver.inbound.dkimcheck import verify_message
from mailserver.inbound.dmarc import DMARCResult, evaluate_now, from_domain
from mailserver.inbound.psl import OrgDomains
from mailserver.inbound.spf import ResultCache, SPFResult, check_spf
from mailserver.smtp import replies as R
from mailserver.smtp.replies import Reply

log = Logger()

MAX_REMEMBERED = 4096   # client addresses whose trusted_networks answer is kept
# A 50 MB message verifies in under 2 s; a worker silent for this long is stuck on its
# input and is killed: that message gets temperror, the ones behind it go on.
VERIFY_TIMEOUT = 60.0


@dataclass(frozen=True)
class MessageFacts:
    """What the session knows of one message when its data is complete."""

    path: Path | bytes       # the message as received (no trace fields of ours): its
                             # bytes, or for a large one its spool file
    header_block: bytes | None   # its whole header section (no blank line); None if too large
    ip: str
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    queue_id: str


@dataclass
class Verdict:
    action: str                        # "inbox" | "junk" | "reject" | "tempfail"
    reply: Reply | None = None         # for reject / tempfail
    headers: bytes = b""               # fields to add in front of the message
    subject: str | None = None         # rspamd "rewrite subject": the new Subject
    spam_checked: bool = False         # rspamd gave a verdict (its X-Spam fields are ours)
    summary: dict[str, str] = field(default_factory=dict)   # for the log line


class InboundChecker:
    def __init__(self, config: InboundConfig, authserv_id: str, resolver: Any,
                 rspamd: Any = None, orgs: OrgDomains | None = None,
                 run_in_thread: Callable[..., defer.Deferred] = deferToThread) -> None:
        self.config = config
        self.authserv_id = authserv_id
        self.resolver = resolver
        self.rspamd = rspamd
        self.orgs = orgs if orgs is not None else OrgDomains(config.psl_file or None)
        self.run_in_thread = run_in_thread
        self._networks = config.networks
        self._sealers = {s.lower() for s in config.trusted_arc_sealers}
        # Evaluations reused while their DNS answers stand (needs a resolver that can say).
        self._spf = ResultCache(resolver) if hasattr(resolver, "current") else None
        self._orgs_loading: defer.Deferred[None] | None = None
        self._trusted: dict[str, bool] = {}   # client address -> trusted, as answered

    def preload_orgs(self) -> None:
        """Parse the Public Suffix List in a thread now (a fifth of a second of CPU that
        neither the start nor the reactor should pay); DMARC waits for it if need be."""
        if not self.orgs.loaded and self._orgs_loading is None:
            d = self._orgs_loading = deferToThread(self.orgs.load)
            d.addErrback(lambda f: log.failure("loading the Public Suffix List failed", f))

    def _orgs_ready(self) -> defer.Deferred[None] | None:
        if self.orgs.loaded:
            return None
        self.preload_orgs()
        assert self._orgs_loading is not None
        waiter: defer.Deferred[None] = defer.Deferred()
        self._orgs_loading.addBoth(lambda result: waiter.callback(None) or result)
        return waiter

    # -- per connection ----------------------------------------------------------------

    def trusted(self, ip: str) -> bool:
        """Clients in trusted_networks skip every check (local programs, monitoring)."""
        known = self._trusted.get(ip)
        if known is None:
            if len(self._trusted) >= MAX_REMEMBERED:
                self._trusted.clear()
            known = self._trusted[ip] = self._in_networks(ip)
        return known

    def _in_networks(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in n for n in self._networks)

    @property
    def greet_delay(self) -> float:
        return self.config.greet_delay

    def check_client(self, ip: str) -> defer.Deferred:
        """Deferred[Reply | None]: the refusal for a client on a blocklist."""
        if not self.config.dnsbl:
            return defer.succeed(None)

        def refusal(listing: dnsbl.Listing | None) -> Reply | None:
            if listing is None:
                return None
            log.info("smtp {ip}: listed in {zone} ({code})", ip=ip, zone=listing.zone,
                     code=listing.answer)
            return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked "
                                       f"using {listing.zone}", reason="blocklist")

        return dnsbl.check(self.resolver, ip, self.config.dnsbl).addCallback(refusal)

    # -- per transaction ---------------------------------------------------------------

    def check_sender(self, ip: str, mail_from: str, helo: str
                     ) -> SPFResult | defer.Deferred | None:
        """Start SPF for MAIL FROM (RFC 7208 2.4; HELO for bounces): the SPFResult at once
        when a cached evaluation still stands, else a Deferred[SPFResult]; None when off."""
        if not self.config.spf:
            return None
        if self._spf is not None:
            return self._spf.cached(ip, mail_from, helo) or self._spf.check(ip, mail_from, helo)
        return check_spf(self.resolver, ip, mail_from, helo)

    def check_message(self, facts: MessageFacts,
                      spf: SPFResult | defer.Deferred | None) -> defer.Deferred:
        """Deferred[Verdict]; never fails.

        Each step goes on at once with what is at hand (a cached SPF result, DMARC over
        cached records) and waits only for what is not: the DKIM/ARC verification in a
        worker, DNS answers not cached, rspamd."""
        try:
            verdict = self._check_message(facts, spf)
        except Exception:
            verdict = defer.fail()
        if not isinstance(verdict, defer.Deferred):
            return defer.succeed(verdict)
        return verdict.addErrback(self._unchecked, facts)

    def _unchecked(self, failure: Any, facts: MessageFacts) -> Verdict:
        log.failure("message {qid}: inbound checks failed; delivering unchecked", failure,
                    qid=facts.queue_id)
        return Verdict("inbox", headers=format_header(self.authserv_id, []))

    def _check_message(self, facts: MessageFacts,
                       spf: SPFResult | defer.Deferred | None) -> Verdict | defer.Deferred:
        cfg = self.config
        dkim = (verify_message(self.resolver, facts.path, self.run_in_thread,
                               check_arc=cfg.arc, header_block=facts.header_block)
                if cfg.dkim or cfg.arc else ([], None))
        spam = (self.rspamd.check(facts.path, ip=facts.ip, helo=facts.helo,
                                  mail_from=facts.mail_from, rcpts=list(facts.rcpts),
                                  queue_id=facts.queue_id)
                if self.rspamd is not None else None)
        return _then(spf, self._with_spf, facts, dkim, spam)

    def _with_spf(self, spf: SPFResult | None, facts: MessageFacts, dkim: Any,
                  spam: Any) -> Verdict | defer.Deferred:
        return _then(dkim, self._with_dkim, facts, spf, spam)

    def _with_dkim(self, dkim: tuple[list[Any], Any], facts: MessageFacts,
                   spf: SPFResult | None, spam: Any) -> Verdict | defer.Deferred:
        dkim_results, arc = dkim
        if not self.config.dkim:
            dkim_results = []
        dmarc: DMARCResult | defer.Deferred | None = None
        if self.config.dmarc:
            domain, why = from_domain(facts.header_block or b"")
            if domain is None:
                # RFC 7489 6.6.1: no single From: domain to evaluate.  Delivering it to the
                # inbox would let "From: ceo@bank, x@attacker" walk past p=reject; it goes
                # to Junk while the policy is enforced.
                dmarc = DMARCResult("permerror", "", "", "quarantine", why)
            else:
                dmarc = _then(self._orgs_ready(), self._dmarc, domain, spf, dkim_results)
        return _then(dmarc, self._with_dmarc, facts, spf, dkim_results, arc, spam)

    def _dmarc(self, _: None, domain: str, spf: SPFResult | None,
               dkim_results: list[Any]) -> DMARCResult | defer.Deferred:
        # RFC 7489 4.1 / RFC 7208 2.4: with a null MAIL FROM the HELO identity stands
        # in for it, so a bounce can align through its HELO name.
        return evaluate_now(self.resolver, self.orgs, domain,
                            spf.result if spf is not None else "none",
                            spf.domain if spf is not None else "",
                            [r.domain for r in dkim_results if r.result == "pass"],
                            dkim_temperror_domains=[r.domain for r in dkim_results
                                                    if r.result == "temperror"])

    def _with_dmarc(self, dmarc: DMARCResult | None, facts: MessageFacts,
                    spf: SPFResult | None, dkim_results: list[Any], arc: Any,
                    spam: Any) -> Verdict | defer.Deferred:
        return _then(spam, lambda spam: self._decide(facts, spf, dkim_results, arc, dmarc,
                                                     spam))

    def _arc_override(self, arc: Any) -> str:
        """The trusted sealer whose valid ARC chain vouches for the message, or ""."""
        if arc is None or arc.result != "pass" or not arc.sealers:
            return ""
        last = arc.sealers[-1].lower()
        return last if last in self._sealers else ""

    def _decide(self, facts: MessageFacts, spf: SPFResult | None, dkim_results: list[Any],
                arc: Any, dmarc: DMARCResult | None, spam: Any) -> Verdict:
        cfg = self.config
        results: list[tuple[str, str, str, dict[str, str]]] = []
        summary: dict[str, str] = {}
        if spf is not None:
            prop = ({"smtp.mailfrom": spf.sender} if spf.identity == "mailfrom"
                    else {"smtp.helo": spf.domain})
            results.append(("spf", spf.result, spf.reason, prop))
            summary["spf"] = spf.result
        if cfg.dkim:
            for r in dkim_results:
                props = {"header.d": r.domain, "header.s": r.selector, "header.a": r.algorithm,
                         "header.b": r.header_b}
                if r.identity:
                    props["header.i"] = r.identity
                comment = r.reason
                if r.body_length is not None:
                    comment += f"; l={r.body_length}: only part of the body is signed"
                results.append(("dkim", r.result, comment, {k: v for k, v in props.items() if v}))
            if not dkim_results:
                results.append(("dkim", "none", "", {}))
            summary["dkim"] = ",".join(f"{r.result}:{r.domain}" for r in dkim_results) or "none"
        if arc is not None and cfg.arc:
            props = {"arc.chain": ":".join(arc.sealers)} if arc.sealers else {}
            results.append(("arc", arc.result, arc.reason, props))
            summary["arc"] = arc.result
        verdict = Verdict("inbox")
        if dmarc is not None:
            comment = dmarc.reason
            disposition = dmarc.disposition
            if disposition != "none":
                override = (self._arc_override(arc) if dmarc.result in ("fail", "temperror")
                            else "")
                if override:
                    comment += f"; policy {disposition} overridden: ARC sealed by {override}"
                    disposition = "none"
                elif not cfg.dmarc_enforce:
                    comment += ("; not enforced" if disposition == "unknown"
                                else f"; policy {disposition} not enforced")
                    disposition = "none"
            props = {"header.from": dmarc.from_domain} if dmarc.from_domain else {}
            if dmarc.policy:
                props["policy.dmarc"] = dmarc.policy
            results.append(("dmarc", dmarc.result, comment, props))
            summary["dmarc"] = f"{dmarc.result}:{disposition}"
            if disposition != "none" and dmarc.result == "temperror":
                # No pass or fail to act on: the sender tries again, and the policy
                # applies then (a forger stuck on a temperror never gets in).
                verdict = Verdict("tempfail", R.DMARC_TEMPFAIL)
            elif disposition == "reject":
                verdict = Verdict("reject", R.DMARC_REJECT)
            elif disposition == "quarantine":
                verdict = Verdict("junk")
        extra = b""
        if spam is not None:
            summary["spam"] = f"{spam.action}:{spam.score:.2f}"
            if spam.action == "error":
                log.warn("message {qid}: rspamd gave no verdict ({reason}); {what}",
                         qid=facts.queue_id, reason=spam.reason,
                         what="accepting" if cfg.rspamd_failure == "accept" else "try later")
                if cfg.rspamd_failure == "tempfail" and verdict.action != "reject":
                    verdict = Verdict("tempfail", R.FILTER_TEMPFAIL)
            else:
                is_spam = spam.action in ("add header", "rewrite subject", "reject")
                extra = (f"X-Spam: {'Yes' if is_spam else 'No'}\r\n"
                         f"X-Spam-Status: {'Yes' if is_spam else 'No'}, score={spam.score:.2f} "
                         f"required={spam.required_score:.2f}\r\n"
                         f"{_folded_tests(spam.symbols[:40])}\r\n").encode("utf-8", "replace")
                if verdict.action != "reject":
                    if spam.action == "reject":
                        verdict = Verdict("reject", _with_message(R.SPAM_REJECT, spam.message))
                    elif spam.action in ("soft reject", "greylist"):
                        verdict = Verdict("tempfail", _with_message(R.SPAM_TEMPFAIL, spam.message))
                    elif is_spam and verdict.action == "inbox":
                        verdict = Verdict("junk")
                if spam.action == "rewrite subject" and spam.subject:
                    verdict.subject = spam.subject
        verdict.headers = format_header(self.authserv_id, results) + extra
        verdict.spam_checked = bool(extra)
        verdict.summary = summary
        return verdict


def _then(value: Any, step: Callable[..., Any], *args: Any) -> Any:
    """step(value, *args) now, or once `value` has fired when it is a Deferred: the
    checks go on without a Deferred (or a reactor turn) for what is at hand already."""
    if isinstance(value, defer.Deferred):
        return value.addCallback(step, *args)
    return step(value, *args)


def _with_message(reply: Reply, message: str) -> Reply:
    text = "".join(c for c in message if c.isprintable())[:200].strip()
    return replace(reply, text=text) if text else reply


def build_checker(server: Any) -> InboundChecker:
    """The checker of a MailServer: its DNS through relay.resolver (else the system's)."""
    from mailserver.inbound.dns import CachingResolver
    from mailserver.inbound.workers import WorkerPool
    from mailserver.smtp.relay.routes import make_resolver

    config = server.config
    resolver = CachingResolver(make_resolver(config.relay.resolver_address))
    rspamd = None
    if config.inbound.rspamd_url:
        from mailserver.inbound.rspamd import RspamdClient

        rspamd = RspamdClient(config.inbound.rspamd_url, config.inbound.rspamd_timeout,
                              mta_name=config.server.hostname)
    orgs = OrgDomains(config.inbound.psl_file or None)
    workers = WorkerPool(processes=max(1, (os.cpu_count() or 2) // 2),
                         preload=("mailserver.inbound.dkimverify",),
                         request_timeout=VERIFY_TIMEOUT)
    if orgs.psl_file is not None:
        try:
            orgs.load()  # a bad psl_file fails at start, not at the first message
        except (OSError, ValueError) as e:
            raise ConfigError("inbound.psl_file",
                              f"not a usable Public Suffix List: {e}") from None
    checker = InboundChecker(config.inbound, config.server.hostname, resolver, rspamd, orgs,
                             run_in_thread=workers)
    checker.preload_orgs()  # the packaged list: in a thread, once the reactor runs
    return checker


def _folded_tests(symbols: list[str]) -> str:
    """"\ttests=A,B,..." folded before a symbol that would pass 78 columns: forty of
    rspamd's names on one line passed the 998 octets a line may have (RFC 5322 2.1.1)."""
    lines, line = [], "\ttests="
    for i, symbol in enumerate(symbols):
        piece = symbol + ("," if i < len(symbols) - 1 else "")
        if len(line) + len(piece) > 78 and not line.endswith("="):
            lines.append(line)
            line = "\t"
        line += piece
    lines.append(line)
    return "\r\n".join(lines)
