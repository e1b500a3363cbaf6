"""The relay: remote recipients of a queued message, to their MX hosts or a smart host.

Recipients are grouped by domain and each domain's group goes over one connection
(RFC 5321 5.1: hosts in MX preference order, each address of a host in turn, IPv4
first).  With [relay].smarthost every remote recipient goes to that one host instead,
with STARTTLS (verified) or implicit TLS, and AUTH when a user name is configured.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.smtp.queue.attempt import AttemptResult
from mailserver.smtp.queue.envelope import Envelope, RecipientState
from mailserver.smtp.relay.routes import (MAX_MX_HOSTS, MXHost, RouteError, host_addresses,
                                          make_resolver, mx_hosts)
from mailserver.smtp.relay.transaction import (HostFailure, HostTarget, Settings, TLSPolicy,
                                               Transaction)

if TYPE_CHECKING:
    from mailserver.config import Config

log = Logger()

Results = list[tuple[RecipientState, AttemptResult]]
_SMARTHOST_POLICY: dict[str, TLSPolicy] = {"starttls": "required", "tls": "implicit",
                                           "none": "none"}


class Relay:
    def __init__(self, config: "Config", reactor: Any = None, resolver: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.config = config.relay
        self.resolver = resolver or make_resolver(config.relay.resolver_address)
        self.settings = Settings(config.server.hostname, config.relay.connect_timeout,
                                 config.relay.timeout)
        self.connections: set = set()
        self.stopping = False

    def abort_all(self, keep_ending: bool = False) -> None:
        """Drop every connection in progress and start no new one (server shutdown).
        `keep_ending`: not those whose message is sent and whose final reply is awaited:
        dropped now, the message would be sent again after the restart, and the reply
        usually comes within a moment (the caller drops them a little later)."""
        self.stopping = True
        for proto in list(self.connections):
            if not (keep_ending and proto.ending):
                proto.abort()

    def deliver(self, env: Envelope, message: Path,
                recipients: Sequence[RecipientState]) -> defer.Deferred:
        return defer.ensureDeferred(self._deliver(env, message, list(recipients)))

    async def _deliver(self, env: Envelope, message: Path,
                       recipients: list[RecipientState]) -> Results:
        smarthost = self.config.smarthost_address
        if smarthost is not None:
            host, port = smarthost
            return await self._try_hosts(env, message, recipients, [(host, ())], port,
                                         _SMARTHOST_POLICY[self.config.smarthost_tls],
                                         credentials=True)
        by_domain: dict[str, list[RecipientState]] = {}
        for r in recipients:
            by_domain.setdefault(r.address.rpartition("@")[2].lower(), []).append(r)
        groups = await defer.gatherResults(
            [defer.ensureDeferred(self._domain(env, message, domain, group))
             for domain, group in by_domain.items()], consumeErrors=True)
        return [pair for group in groups for pair in group]

    async def _domain(self, env: Envelope, message: Path, domain: str,
                      recipients: list[RecipientState]) -> Results:
        """One domain's results; an unexpected error is a temporary failure of this
        domain's recipients only (the others' results stand: no copy sent twice)."""
        try:
            return await self._domain_hosts(env, message, domain, recipients)
        except Exception:
            log.failure("relay {id}: {domain}: delivery error", id=env.id, domain=domain)
            result = AttemptResult.temporary("internal error relaying to " + domain, "4.3.0")
            return [(r, result) for r in recipients]

    async def _domain_hosts(self, env: Envelope, message: Path, domain: str,
                            recipients: list[RecipientState]) -> Results:
        try:
            hosts = await mx_hosts(self.resolver, domain)
        except RouteError as e:
            log.info("relay {id}: {domain}: {reason}", id=env.id, domain=domain,
                     reason=e.result.text)
            return [(r, e.result) for r in recipients]
        hosts = _below_ourselves(hosts, self.settings.helo)
        if not hosts:
            result = AttemptResult.failed(f"mail for {domain} loops back to myself "
                                          f"({self.settings.helo} is its best MX)", "5.4.6")
            log.info("relay {id}: {domain}: {reason}", id=env.id, domain=domain,
                     reason=result.text)
            return [(r, result) for r in recipients]
        policy: TLSPolicy = ("required" if domain in self.config.tls_required_domains
                             else "opportunistic")
        return await self._try_hosts(env, message, recipients,
                                     [(h.name, h.hint) for h in hosts], self.config.port, policy)

    async def _try_hosts(self, env: Envelope, message: Path, recipients: list[RecipientState],
                         hosts: list[tuple[str, Sequence[str]]], port: int, policy: TLSPolicy,
                         credentials: bool = False) -> Results:
        last: AttemptResult | None = None
        retry: AttemptResult | None = None   # a temporary failure of some host
        # Every MX host without an address, DNS sure of it (and not a list cut short).
        unroutable = not credentials and len(hosts) < MAX_MX_HOSTS
        for name, hint in hosts:
            if self.stopping:
                last = AttemptResult.temporary("the server is shutting down", "4.3.2")
                unroutable = False
                break
            try:
                addresses = list(hint) or await host_addresses(self.resolver, name)
            except RouteError as e:
                last, unroutable = e.result, False
                if not last.permanent:
                    retry = last
                continue
            if not addresses:
                last = AttemptResult.temporary(f"host {name} has no address", "4.4.4", name)
                continue
            unroutable = False
            for address in addresses:
                if self.stopping:
                    break
                target = HostTarget(name, address, port, policy, self.config.ca_file,
                                    self.config.smarthost_username if credentials else "",
                                    self.config.smarthost_password if credentials else "")
                try:
                    return await self._transaction(env, message, recipients, target)
                except HostFailure as failure:
                    last = failure.result
                    if not last.permanent:
                        retry = last
                    log.info("relay {id}: {host}: {reason}", id=env.id, host=target.label,
                             reason=failure.result.text)
                    if self.stopping or not (failure.tls_failed and policy == "opportunistic"):
                        continue
                # RFC 7435: a failed opportunistic handshake falls back to plaintext.
                log.info("relay {id}: {host}: TLS handshake failed, retrying without TLS",
                         id=env.id, host=target.label)
                try:
                    return await self._transaction(env, message, recipients,
                                                   replace(target, tls="none"))
                except HostFailure as failure:
                    last = failure.result
                    if not last.permanent:
                        retry = last
        if unroutable and last is not None:
            # RFC 5321 5.1: a domain (or every MX host of it) without an address is an
            # error to report, not to retry for days.
            last = AttemptResult.failed(f"{last.text}: unable to route", "5.4.4",
                                        last.remote_mta)
        if last is not None and last.permanent and retry is not None:
            # One host could not take it for good (no 8BITMIME), another only for now
            # (down): try again later, when that one may be back.
            last = retry
        if last is None:
            last = AttemptResult.temporary("no host to deliver to", "4.4.4")
        return [(r, last) for r in recipients]

    async def _transaction(self, env: Envelope, message: Path, recipients: list[RecipientState],
                           target: HostTarget) -> Results:
        transaction = Transaction(self.reactor, target, self.settings, env, message, recipients,
                                  self.connections)
        return await transaction.run()


def _below_ourselves(hosts: list[MXHost], hostname: str) -> list[MXHost]:
    """RFC 5321 5.1: when this server is one of the MX hosts, that record and every one of
    equal or worse preference are dropped (we are a backup MX handing mail on, or the
    domain's mail would come back to us)."""
    ours = [h.preference for h in hosts if h.name == hostname.lower().rstrip(".")]
    if not ours:
        return hosts
    return [h for h in hosts if h.preference < min(ours)]
