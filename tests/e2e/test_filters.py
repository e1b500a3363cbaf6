"""Python delivery filters ([filters], IDeliveryFilter plugins) in a real server: found
through Twisted's plugin system on the server's PYTHONPATH, run on messages arriving over
the MX, their header fields and folders seen over IMAP, their refusals as SMTP replies;
a plugin that raises or never answers loses no mail, and the log names it.

The plugins are the example in examples/delivery_filter and this module's own (written
into the test's directory as a `twisted/plugins/` dropin); both directories are copied or
created under the test's tmp_path, where Twisted writes its dropin.cache.
"""

from __future__ import annotations

import email
import hashlib
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from harness import REPO_ROOT, ServerProcess, make_message, split_header_body
from imap_helpers import close_quietly, imap_login, imaplib_ok
from inbound_helpers import send
from outbound_helpers import DNSServer

ALICE, BOB = "alice@example.test", "bob@example.test"
EXAMPLE = REPO_ROOT / "examples" / "delivery_filter"
DELIVERY = REPO_ROOT / "mailserver" / "sieve" / "delivery.py"

needs_delivery = pytest.mark.skipif(
    not DELIVERY.exists(),
    reason="the delivery side that runs the filters (mailserver/sieve/delivery.py) is not "
           "there yet")

TEST_PLUGINS = '''
import hashlib

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailserver.filters import FilterDecision, IDeliveryFilter


def body_digest(open_body):
    """Bytes and SHA-256 of the body, read in a thread as a filter should."""
    digest, size = hashlib.sha256(), 0
    with open_body() as body:
        for chunk in iter(lambda: body.read(65536), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@implementer(IPlugin, IDeliveryFilter)
class Stamp:
    """What the filter was told, as header fields."""
    name = "stamp"

    def filter(self, facts):
        def decide(result):
            size, digest = result
            return FilterDecision(add_headers=(
                ("X-Filter-Stamp", f"queue={facts.queue_id} from={facts.sender} "
                                   f"to={','.join(facts.recipients)}"),
                ("X-Filter-Body", f"{size} {digest}"),
            ))
        return deferToThread(body_digest, facts.open_body).addCallback(decide)


@implementer(IPlugin, IDeliveryFilter)
class Refuse:
    name = "refuse"

    def filter(self, facts):
        subject = " ".join(facts.header_values("Subject")).lower()
        if "refuse me" in subject:
            return FilterDecision("reject", "Refused by local policy\\r\\n250 not really")
        if "later please" in subject:
            return FilterDecision("defer", "Local policy says later")
        return FilterDecision()


@implementer(IPlugin, IDeliveryFilter)
class Raises:
    name = "raises"

    def filter(self, facts):
        raise RuntimeError("this filter has a bug")


@implementer(IPlugin, IDeliveryFilter)
class Hangs:
    name = "hangs"

    def filter(self, facts):
        return defer.Deferred()


@implementer(IPlugin, IDeliveryFilter)
class Sloppy:
    """A bad folder and a bad header field (dropped), a good field (kept)."""
    name = "sloppy"

    def filter(self, facts):
        return FilterDecision(add_headers=(("X-Injected", "a\\nEvil: yes"),
                                           ("X-Sloppy", "kept")),
                              folder="../../outside")


stamp, refuse, raises, hangs, sloppy = Stamp(), Refuse(), Raises(), Hangs(), Sloppy()
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> str:
    """PYTHONPATH entries: a copy of the example, and this module's plugins."""
    example = tmp_path / "example-filter"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("__pycache__", "*.cache"))
    ours = tmp_path / "test-filters"
    (ours / "twisted" / "plugins").mkdir(parents=True)
    (ours / "twisted" / "plugins" / "e2e_delivery_filters.py").write_text(
        textwrap.dedent(TEST_PLUGINS))
    return os.pathsep.join([str(example), str(ours)])


def filtered_server(make_server: Any, plugin_path: str, plugins: list[str], *,
                    env: dict[str, str] | None = None, **overrides: Any) -> ServerProcess:
    filters = {"plugins": plugins, "timeout": overrides.pop("timeout", 10)}
    srv = make_server(start=False, filters=filters, **overrides)
    srv.env.update(env or {}, PYTHONPATH=plugin_path)
    return srv.start()


def mailbox_headers(srv: ServerProcess, mailbox: str,
                    user: str = ALICE) -> list[email.message.Message]:
    """The header of every message in `mailbox`, fetched over IMAP (STARTTLS)."""
    conn = imap_login(srv, user)
    try:
        imaplib_ok(conn.select(f'"{mailbox}"', readonly=True), f"SELECT {mailbox}")
        typ, data = conn.fetch("1:*", "(BODY.PEEK[HEADER])")
        if typ != "OK" or data == [None]:
            return []
        return [email.message_from_bytes(item[1]) for item in data if isinstance(item, tuple)]
    finally:
        close_quietly(conn)


def queue_id(reply_text: str) -> str:
    """The id in "2.0.0 Ok: queued as ID"."""
    return reply_text.rsplit(" ", 1)[-1]


# -- start-up --------------------------------------------------------------------------------

def test_a_plugin_that_is_not_installed_stops_the_server(make_server, plugin_path):
    srv = make_server(start=False, filters={"plugins": ["stamp", "no-such-filter"]})
    srv.env["PYTHONPATH"] = plugin_path
    code, output = srv.run_to_exit()
    assert code == 1, f"exit code {code}\n{srv.diagnostics()}"
    lines = [line for line in output.splitlines() if line.startswith("mailserver:")]
    assert len(lines) == 1, output[-3000:]
    assert "filters.plugins" in lines[0] and "'no-such-filter'" in lines[0], lines[0]
    assert "Traceback" not in srv.output_text()

    cp = srv.admin("check")
    assert cp.returncode == 1, f"{cp.stdout}\n{cp.stderr}"
    assert "filters.plugins" in cp.stderr and "no-such-filter" in cp.stderr, cp.stderr


def test_the_server_starts_with_its_filters(make_server, plugin_path):
    srv = filtered_server(make_server, plugin_path, ["newsletters", "stamp"])
    log = srv.wait_for_log(lambda text: "delivery filters: newsletters, stamp" in text)
    assert "delivery filters: newsletters, stamp" in log, log[-3000:]


def test_check_lists_the_filters(make_server, plugin_path):
    srv = make_server(start=False, accounts=False,
                      filters={"plugins": ["newsletters", "stamp"], "timeout": "5s"})
    srv.env["PYTHONPATH"] = plugin_path
    cp = srv.admin("check")
    assert cp.returncode == 0, f"{cp.stdout}\n{cp.stderr}"
    [line] = [x for x in cp.stdout.splitlines() if x.startswith("filters")]
    assert "newsletters, stamp" in line and "5s" in line, line


# -- delivery ----------------------------------------------------------------------------------

@pytest.fixture
def dns(tmp_path: Path):
    """SPF and DMARC for news.example, which sends from 127.0.0.1."""
    zone = [["news.example", "TXT", "v=spf1 ip4:127.0.0.1 -all"],
            ["_dmarc.news.example", "TXT", "v=DMARC1; p=none"]]
    workdir = tmp_path / "dns"
    workdir.mkdir()
    server = DNSServer(zone, workdir)
    yield server
    server.stop()


@needs_delivery
def test_the_example_files_newsletters_and_summarises_the_checks(make_server, plugin_path, dns):
    srv = filtered_server(make_server, plugin_path, ["newsletters"],
                          relay={"resolver": dns.address},
                          inbound={"trusted_networks": [], "greet_delay": 0})
    conn = imap_login(srv)
    try:
        imaplib_ok(conn.create("Newsletters"), "CREATE Newsletters")
    finally:
        close_quietly(conn)
    sender = "news@news.example"
    for n, subject in ((1, "[Newsletter] March issue"), (2, "Lunch on Friday?")):
        outcome = send(srv, make_message(f"<{n}@news.example>", sender=sender, subject=subject),
                       sender)
        assert outcome.accepted, outcome

    [newsletter] = mailbox_headers(srv, "Newsletters")
    [other] = mailbox_headers(srv, "INBOX")
    assert newsletter["Subject"] == "[Newsletter] March issue"
    assert other["Subject"] == "Lunch on Friday?"
    for msg in (newsletter, other):
        summary = msg.get_all("X-Auth-Summary")
        assert summary and len(summary) == 1, msg.items()
        assert "spf=pass" in summary[0].split(), summary


@needs_delivery
def test_header_fields_and_what_the_filter_is_told(make_server, plugin_path):
    srv = filtered_server(make_server, plugin_path, ["stamp"])
    body = b"".join(b"line %d of a body that the filter reads in a thread\r\n" % i
                    for i in range(2000))
    message = make_message("<stamp@remote.test>", body=body)
    outcome = send(srv, message, "x@remote.test", [ALICE, BOB])
    assert outcome.accepted, outcome
    qid = queue_id(outcome.text)

    expected_body = hashlib.sha256(split_header_body(message)[1]).hexdigest()
    for user in (ALICE, BOB):
        [msg] = mailbox_headers(srv, "INBOX", user)
        stamp = msg["X-Filter-Stamp"]
        assert stamp is not None, msg.items()
        fields = dict(part.split("=", 1) for part in stamp.split())
        assert fields["queue"] == qid
        assert fields["from"] == "x@remote.test"
        assert sorted(fields["to"].split(",")) == [ALICE, BOB]
        assert msg["X-Filter-Body"] == f"{len(split_header_body(message)[1])} {expected_body}"
        assert msg["Subject"] == "test"


@needs_delivery
def test_reject_and_defer_are_smtp_replies(make_server, plugin_path):
    srv = filtered_server(make_server, plugin_path, ["refuse", "stamp"])
    refused = send(srv, make_message("<r@remote.test>", subject="Please refuse me"),
                   "x@remote.test")
    assert 500 <= refused.code < 600, refused
    assert "Refused by local policy" in refused.text, refused
    assert "\n" not in refused.text.strip(), refused
    deferred = send(srv, make_message("<d@remote.test>", subject="later please"),
                    "x@remote.test")
    assert 400 <= deferred.code < 500, deferred
    assert "Local policy says later" in deferred.text, deferred
    accepted = send(srv, make_message("<a@remote.test>", subject="fine"), "x@remote.test")
    assert accepted.accepted, accepted

    [msg] = mailbox_headers(srv, "INBOX")
    assert msg["Subject"] == "fine"
    assert msg["X-Filter-Stamp"] is not None   # the chain went on after "refuse" accepted


@needs_delivery
def test_filters_that_raise_or_hang_lose_no_mail(make_server, plugin_path):
    srv = filtered_server(make_server, plugin_path, ["raises", "hangs", "sloppy", "stamp"],
                          timeout=1)
    outcome = send(srv, make_message("<broken@remote.test>", subject="still here"),
                   "x@remote.test")
    assert outcome.accepted, outcome
    qid = queue_id(outcome.text)

    [msg] = mailbox_headers(srv, "INBOX")
    assert msg["Subject"] == "still here"
    assert msg["X-Sloppy"] == "kept"
    assert msg["X-Injected"] is None and msg["Evil"] is None, msg.items()
    assert msg["X-Filter-Stamp"] is not None   # the plugins after the broken ones ran
    assert not (srv.maildir_root.parent / "outside").exists()

    wanted = (f"delivery filter raises failed on {qid}",
              f"delivery filter hangs gave no answer for {qid}",
              "delivery filter sloppy on " + qid)
    log = srv.wait_for_log(lambda text: all(w in text for w in wanted))
    for w in wanted:
        assert w in log, f"log lacks {w!r}:\n{log[-3000:]}"
    assert "this filter has a bug" in log
