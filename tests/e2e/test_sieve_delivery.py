"""End-to-end tests of Sieve at delivery against a real twistd process: users' scripts
(Pigeonhole's layout in the Maildir) and global ones, over the MX, alias expansion,
submission and the queue's local deliveries; what landed where is read over IMAP or from
the Maildir, redirects arrive at a receiving SMTP server the test runs, vacation answers
and rejection messages in the sender's own mailbox.

Senders are local users (carol) or domains of the test DNS zone, so that nothing the
server sends goes to the system resolver.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import time
from pathlib import Path

import pytest

from harness import HOSTNAME, ServerProcess, wait_until
from imap_helpers import RawIMAP, flags_of
from inbound_helpers import file_keywords, folder_messages, inbound_server, send
from outbound_helpers import (Receiver, dns_server, mx_port, outbound_server,  # noqa: F401
                              submit, wait_queue_empty)

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"


# -- helpers --------------------------------------------------------------------------------

def install_script(server: ServerProcess, address: str, text: str, name: str = "main") -> Path:
    """Store `text` as the user's script NAME and make it the active one, in Pigeonhole's
    layout (sieve/NAME.sieve, .dovecot.sieve -> sieve/NAME.sieve), as ManageSieve does."""
    maildir = server.maildir(address)
    (maildir / "sieve").mkdir(parents=True, exist_ok=True)
    path = maildir / "sieve" / f"{name}.sieve"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    link = maildir / ".dovecot.sieve"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"sieve/{name}.sieve")
    return path


def message(msgid: str, *, sender: str = CAROL, to: str = ALICE, subject: str = "test",
            extra: str = "", body: str = "Hello.\r\n") -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: {msgid}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n{extra}")
    return (head + "\r\n" + body).encode()


def mx_send(server: ServerProcess, msg: bytes, rcpts: list[str], sender: str = CAROL):
    """One MX transaction; (code, text) of the end of DATA."""
    with server.smtp() as client:
        client.ehlo("client.remote.test")
        code, _ = client.mail(sender)
        assert code == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        try:
            code, text = client.data(msg)
        except smtplib.SMTPDataError as e:
            code, text = e.smtp_code, e.smtp_error
        return code, text.decode(errors="replace")


def holding(server: ServerProcess, address: str, needle: bytes,
            folder: str | None = None) -> list[Path]:
    return [p for p in folder_messages(server, address, folder) if needle in p.read_bytes()]


def wait_for_file(server: ServerProcess, address: str, needle: bytes,
                  folder: str | None = None, timeout: float = 15) -> list[Path]:
    wait_until(lambda: holding(server, address, needle, folder), timeout, 0.05)
    return holding(server, address, needle, folder)


def imap_flags(server: ServerProcess, user: str, folder: str) -> list[set[str]]:
    """FLAGS of every message of `folder`, over IMAP."""
    with RawIMAP.login(server, user) as imap:
        imap.select(folder)
        fetched = imap.fetch("1:*", "(FLAGS)")
        return [flags_of(items["FLAGS"]) for _, items in sorted(fetched.items())]


# -- fileinto, keep, discard ------------------------------------------------------------------

def test_fileinto_existing_folder_with_flags_seen_over_imap(server):
    install_script(server, ALICE, 'require ["fileinto", "imap4flags"];\n'
                   'if header :contains "subject" "invoice" {\n'
                   '  fileinto :flags ["\\\\Flagged", "$billing"] "Archive"; }\n')
    assert mx_send(server, message("<f1@example.test>", subject="Your invoice"), [ALICE])[0] \
        == 250
    assert mx_send(server, message("<f2@example.test>", subject="hello"), [ALICE])[0] == 250
    [filed] = holding(server, ALICE, b"<f1@example.test>", "Archive")
    assert file_keywords(filed) == {"$billing"}
    assert holding(server, ALICE, b"<f2@example.test>") and \
        not holding(server, ALICE, b"<f1@example.test>")
    [flags] = imap_flags(server, ALICE, "Archive")
    assert {"\\Flagged", "$billing"} <= flags
    assert "sieve" in server.log_text() and "fileinto Archive" in server.log_text()


def test_fileinto_create_and_missing_folder(server):
    install_script(server, ALICE, 'require ["fileinto", "mailbox"];\n'
                   'if header :is "x-list" "python" { fileinto :create "Lists.Python"; stop; }\n'
                   'fileinto "Nowhere";\n')
    assert mx_send(server, message("<c1@example.test>", extra="X-List: python\r\n"),
                   [ALICE])[0] == 250
    assert mx_send(server, message("<c2@example.test>"), [ALICE])[0] == 250
    assert holding(server, ALICE, b"<c1@example.test>", "Lists.Python")
    # fileinto of a folder that does not exist, without :create: INBOX (and a log line)
    assert holding(server, ALICE, b"<c2@example.test>")
    assert not (server.maildir(ALICE) / ".Nowhere").exists()
    assert "'Nowhere' does not exist; stored in INBOX" in server.log_text()
    with RawIMAP.login(server, ALICE) as imap:
        listing = imap.ok('LIST "" "*"').untagged
        assert any(b"Lists.Python" in line for line in listing)
        assert imap.select("Lists.Python").numbers(b"EXISTS") == [1]


def test_discard_and_keep_with_fileinto_copy(server):
    install_script(server, ALICE, 'require ["fileinto", "copy"];\n'
                   'if header :is "subject" "drop" { discard; stop; }\n'
                   'fileinto :copy "Archive";\n')
    assert mx_send(server, message("<d1@example.test>", subject="drop"), [ALICE])[0] == 250
    assert mx_send(server, message("<d2@example.test>", subject="keep"), [ALICE])[0] == 250
    assert holding(server, ALICE, b"<d2@example.test>")
    [archived] = holding(server, ALICE, b"<d2@example.test>", "Archive")
    [inbox] = holding(server, ALICE, b"<d2@example.test>")
    assert os.stat(archived).st_ino == os.stat(inbox).st_ino   # one file, hard-linked
    root = server.maildir(ALICE)
    assert not any(b"<d1@example.test>" in p.read_bytes()
                   for p in root.rglob("*") if p.is_file() and p.parent.name in ("new", "cur"))


def test_hostile_fileinto_names_stay_in_the_maildir(server):
    install_script(server, ALICE, 'require ["fileinto", "mailbox"];\n'
                   'fileinto :create "../../../escaped";\n'
                   'fileinto :create "a/../../b";\n'
                   'fileinto :create "${x}\\u0000";\n'
                   f'fileinto :create "{"L" * 300}";\n')
    assert mx_send(server, message("<h1@example.test>"), [ALICE])[0] == 250
    [stored] = holding(server, ALICE, b"<h1@example.test>")
    assert stored.parent.parent == server.maildir(ALICE)
    outside = [p for p in server.root.rglob("*escaped*")] + \
        [p for p in server.maildir_root.rglob("b") if p.is_dir()]
    assert outside == []
    assert "refused" in server.log_text()


# -- reject ---------------------------------------------------------------------------------------

def test_reject_with_one_recipient_is_refused_at_smtp_time(server):
    install_script(server, ALICE, 'require "reject";\n'
                   'if header :contains "subject" "buy" { reject "No ads, thanks."; }\n')
    code, text = mx_send(server, message("<r1@example.test>", subject="buy now"), [ALICE])
    assert code == 550 and text.startswith("5.7.1") and "No ads, thanks." in text
    assert not holding(server, ALICE, b"<r1@example.test>")
    assert mx_send(server, message("<r2@example.test>"), [ALICE])[0] == 250


def test_ereject_with_two_recipients_sends_a_rejection_message(server):
    install_script(server, ALICE, 'require "ereject";\nereject "Not for me.";\n')
    code, _ = mx_send(server, message("<r3@example.test>", to=BOB), [ALICE, BOB])
    assert code == 250
    assert holding(server, BOB, b"<r3@example.test>")
    assert not holding(server, ALICE, b"<r3@example.test>")
    # the sender (carol, a local user here) gets the RFC 5429 rejection message
    [mdn] = wait_for_file(server, CAROL, b"disposition-notification")
    data = mdn.read_bytes()
    assert b"Not for me." in data and b"Message-ID: <r3@example.test>" in data
    assert b"Return-Path: <>" in data
    assert b"Disposition: automatic-action/MDN-sent-automatically; deleted" in data


def test_reject_of_a_submitted_message_is_a_rejection_message(server):
    install_script(server, ALICE, 'require "reject";\nreject "Go away.";\n')
    msg = message("<r4@example.test>")
    assert submit(server, CAROL, [ALICE], msg) == {}
    [mdn] = wait_for_file(server, CAROL, b"disposition-notification")
    assert b"Go away." in mdn.read_bytes()
    assert not holding(server, ALICE, b"<r4@example.test>")


# -- redirect ---------------------------------------------------------------------------------

@pytest.fixture
def port() -> int:
    return mx_port()


def test_redirect_keeps_the_envelope_sender(make_server, dns_server, port):  # noqa: F811
    srv = outbound_server(make_server, dns_server, port)
    install_script(srv, ALICE, 'redirect "friend@primary.test";\n')
    with Receiver("127.0.0.2", port, name="mx1.primary.test") as mx1:
        outcome = send(srv, message("<x1@example.test>", sender="bob@fallback.test"),
                       "orig-sender@fallback.test", [ALICE])
        assert outcome.accepted, outcome
        assert mx1.wait_for(1), srv.diagnostics()
        got = mx1.received[0]
        assert got.mail_from == "orig-sender@fallback.test"
        assert got.rcpts == ["friend@primary.test"]
        assert got.data.startswith(b"X-Sieve-Redirected-From: alice@example.test\r\n")
        assert b"<x1@example.test>" in got.data
        assert b"Return-Path:" not in got.data
    assert not holding(srv, ALICE, b"<x1@example.test>")   # redirect cancels the keep


def test_redirect_loop_between_users_stops(server):
    install_script(server, ALICE, f'redirect "{BOB}";\n')
    install_script(server, BOB, f'redirect "{ALICE}";\n')
    assert mx_send(server, message("<loop@example.test>"), [ALICE])[0] == 250
    # alice -> bob (from the queue) -> alice, whose mark stops it: kept in her INBOX
    [kept] = wait_for_file(server, ALICE, b"<loop@example.test>")
    assert wait_until(lambda: "shows a loop" in server.log_text(), 10)
    assert wait_queue_empty(server)
    time.sleep(0.5)
    assert len(holding(server, ALICE, b"<loop@example.test>")) == 1
    assert not holding(server, BOB, b"<loop@example.test>")
    data = kept.read_bytes()
    assert b"X-Sieve-Redirected-From: bob@example.test" in data
    assert b"X-Sieve-Redirected-From: alice@example.test" in data


# -- vacation -----------------------------------------------------------------------------------

VACATION = ('require "vacation";\n'
            'vacation :days 7 :subject "Away" :addresses ["alias@example.test"] '
            '"Back next week.";\n')


def replies(server: ServerProcess, address: str) -> list[Path]:
    return [p for p in folder_messages(server, address) if b"Subject: Away" in p.read_bytes()]


def test_vacation_once_per_period_and_across_restarts(server):
    install_script(server, ALICE, VACATION)
    assert mx_send(server, message("<v1@example.test>"), [ALICE])[0] == 250
    assert wait_until(lambda: replies(server, CAROL), 15), server.diagnostics()
    [reply] = replies(server, CAROL)
    data = reply.read_bytes()
    assert b"Return-Path: <>" in data
    assert b"Auto-Submitted: auto-replied" in data
    assert b"In-Reply-To: <v1@example.test>" in data
    assert b"Back next week." in data
    assert holding(server, ALICE, b"<v1@example.test>")   # stored as well
    assert mx_send(server, message("<v2@example.test>"), [ALICE])[0] == 250
    assert wait_until(lambda: "already answered" in server.log_text(), 10)
    server.stop()
    server.start()
    assert mx_send(server, message("<v3@example.test>"), [ALICE])[0] == 250
    assert wait_until(lambda: server.log_text().count("already answered") >= 2, 10)
    assert wait_queue_empty(server)
    assert len(replies(server, CAROL)) == 1


@pytest.mark.parametrize("extra,sender", [
    ("List-Id: <team.lists.example.test>\r\n", CAROL),
    ("Auto-Submitted: auto-generated\r\n", CAROL),
    ("Precedence: bulk\r\n", CAROL),
    ("", ""),
])
def test_no_vacation_answer_to_lists_robots_and_null_senders(server, extra, sender):
    install_script(server, ALICE, VACATION)
    assert mx_send(server, message("<n1@example.test>", extra=extra), [ALICE],
                   sender=sender)[0] == 250
    assert wait_until(lambda: "no vacation answer" in server.log_text(), 10)
    assert holding(server, ALICE, b"<n1@example.test>")
    assert wait_queue_empty(server)
    assert replies(server, CAROL) == []


def test_two_users_on_vacation_answer_once(server):
    install_script(server, ALICE, VACATION)
    install_script(server, BOB, VACATION)
    # bob writes to alice: alice's answer goes to bob, whose vacation does not answer it
    assert mx_send(server, message("<p1@example.test>", sender=BOB), [ALICE],
                   sender=BOB)[0] == 250
    assert wait_until(lambda: replies(server, BOB), 15)
    assert wait_queue_empty(server)
    assert wait_until(lambda: "no vacation answer" in server.log_text(), 10)
    time.sleep(0.5)
    assert len(replies(server, BOB)) == 1
    assert replies(server, ALICE) == []


# -- global scripts, errors, changes ------------------------------------------------------------

def test_global_before_script_spam_to_junk(make_server, tmp_path):
    before = tmp_path / "spam.sieve"
    before.write_text('require "fileinto";\n'
                      'if header :is "X-Spam-Flag" "YES" { fileinto "Junk"; stop; }\n')
    srv = make_server(sieve={"before": [str(before)]})
    install_script(srv, ALICE, 'require "fileinto";\nfileinto "Archive";\n')
    assert mx_send(srv, message("<s1@example.test>", extra="X-Spam-Flag: YES\r\n"),
                   [ALICE, BOB])[0] == 250
    assert mx_send(srv, message("<s2@example.test>"), [ALICE, BOB])[0] == 250
    # before the user's own script, for every user, with or without a script
    assert holding(srv, ALICE, b"<s1@example.test>", "Junk")
    assert holding(srv, BOB, b"<s1@example.test>", "Junk")
    assert holding(srv, ALICE, b"<s2@example.test>", "Archive")   # the user's script ran
    assert holding(srv, BOB, b"<s2@example.test>")


def test_run_time_error_delivers_to_inbox_and_logs(server):
    install_script(server, ALICE, 'require ["include", "fileinto"];\n'
                   'include :personal "missing";\nfileinto "Archive";\n')
    assert mx_send(server, message("<e1@example.test>"), [ALICE])[0] == 250
    assert holding(server, ALICE, b"<e1@example.test>")
    assert not holding(server, ALICE, b"<e1@example.test>", "Archive")
    log = server.log_text()
    assert re.search(r"sieve \w+ <alice@example.test>: keep \(run-time error: .*missing", log), \
        log[-2000:]


def test_optional_include_of_a_broken_script_is_a_run_time_error(server):
    """RFC 6609 3.2: :optional excuses a script that does not exist, not one that does
    not compile (Pigeonhole: error, implicit keep; the rest of the script did run)."""
    maildir = server.maildir(ALICE)
    install_script(server, ALICE, 'require ["include", "fileinto"];\n'
                   'include :optional "absent";\ninclude :optional "broken";\n'
                   'fileinto "Archive";\n')
    (maildir / "sieve" / "broken.sieve").write_text("if {\n")
    assert mx_send(server, message("<ob1@example.test>"), [ALICE])[0] == 250
    assert holding(server, ALICE, b"<ob1@example.test>")
    assert not holding(server, ALICE, b"<ob1@example.test>", "Archive")
    assert re.search(r"keep \(run-time error: .*broken", server.log_text())
    # Mended: the optional includes are fine again (the missing one is still excused).
    (maildir / "sieve" / "broken.sieve").write_text("keep;\n")
    assert mx_send(server, message("<ob2@example.test>"), [ALICE])[0] == 250
    assert holding(server, ALICE, b"<ob2@example.test>", "Archive")


def test_a_changed_script_is_used_by_the_next_delivery(server):
    install_script(server, ALICE, 'require "fileinto";\nfileinto "Archive";\n')
    assert mx_send(server, message("<ch1@example.test>"), [ALICE])[0] == 250
    install_script(server, ALICE, 'require "fileinto";\nfileinto "Trash";\n')
    assert mx_send(server, message("<ch2@example.test>"), [ALICE])[0] == 250
    install_script(server, ALICE, 'require "fileinto";\nfileinto "Drafts";\n', name="other")
    assert mx_send(server, message("<ch3@example.test>"), [ALICE])[0] == 250
    (server.maildir(ALICE) / ".dovecot.sieve").unlink()
    assert mx_send(server, message("<ch4@example.test>"), [ALICE])[0] == 250
    assert holding(server, ALICE, b"<ch1@example.test>", "Archive")
    assert holding(server, ALICE, b"<ch2@example.test>", "Trash")
    assert holding(server, ALICE, b"<ch3@example.test>", "Drafts")
    assert holding(server, ALICE, b"<ch4@example.test>")


# -- every way in ---------------------------------------------------------------------------------

def test_alias_to_several_users_runs_each_users_script(server):
    server.admin_ok("alias", "add", "team@example.test", f"{ALICE},{BOB},{CAROL}")
    install_script(server, ALICE, 'require "fileinto";\nfileinto "Archive";\n')
    install_script(server, BOB, 'require ["fileinto", "envelope"];\n'
                   'if envelope :is "to" "team@example.test" { fileinto "Trash"; }\n')
    assert mx_send(server, message("<a1@example.test>", to="team@example.test",
                                   sender="x@example.test"), ["team@example.test"],
                   sender="x@example.test")[0] == 250
    assert holding(server, ALICE, b"<a1@example.test>", "Archive")
    assert holding(server, BOB, b"<a1@example.test>", "Trash")   # envelope "to": the RCPT
    assert holding(server, CAROL, b"<a1@example.test>")


def test_submission_to_a_local_user_runs_the_script(server):
    install_script(server, ALICE, 'require ["fileinto", "envelope"];\n'
                   f'if envelope :is "from" "{CAROL}" {{ fileinto "Archive"; }}\n')
    assert submit(server, CAROL, [ALICE], message("<sub1@example.test>")) == {}
    assert wait_for_file(server, ALICE, b"<sub1@example.test>", "Archive")


def test_large_message_is_filtered_from_a_spool_file(server):
    install_script(server, ALICE, 'require ["fileinto", "body"];\n'
                   'if body :contains "needle" { fileinto "Archive"; }\n')
    body = ("x" * 76 + "\r\n") * 3000 + "needle\r\n"
    assert mx_send(server, message("<big1@example.test>", body=body), [ALICE])[0] == 250
    [stored] = holding(server, ALICE, b"<big1@example.test>", "Archive")
    assert stored.read_bytes().endswith(body.encode())
    spool = server.state_dir / "sieve-spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def test_with_inbound_checks(make_server, dns_server):  # noqa: F811
    srv = inbound_server(make_server, dns_server, inbound={"spf": True, "dkim": False,
                                                           "dmarc": False, "arc": False})
    install_script(srv, ALICE, 'require "fileinto";\n'
                   'if header :contains "Authentication-Results" "spf=" '
                   '{ fileinto "Archive"; }\n')
    outcome = send(srv, message("<i1@example.test>", sender="x@primary.test"),
                   "x@primary.test", [ALICE])
    assert outcome.accepted, outcome
    [stored] = holding(srv, ALICE, b"<i1@example.test>", "Archive")
    assert f"Authentication-Results: {HOSTNAME}".encode() in stored.read_bytes()


def test_scripts_stored_with_mailserver_admin(server):
    script = 'require "fileinto";\nif header :contains "subject" "report" { fileinto "Archive"; }\n'
    server.admin_ok("sieve", "put", ALICE, "reports", "-", input=script)
    server.admin_ok("sieve", "activate", ALICE, "reports")
    assert mx_send(server, message("<adm1@example.test>", subject="weekly report"),
                   [ALICE])[0] == 250
    assert holding(server, ALICE, b"<adm1@example.test>", "Archive")


def test_delivery_filter_plugin_then_the_users_script(make_server, tmp_path, monkeypatch):
    # the example plugin (examples/delivery_filter), installed by its directory on the path
    plugin_dir = tmp_path / "plugin"
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "delivery_filter",
                    plugin_dir)
    monkeypatch.setenv("PYTHONPATH", str(plugin_dir))
    srv = make_server(filters={"plugins": ["newsletters"]})
    install_script(srv, BOB, 'require "fileinto";\nfileinto "Archive";\n')
    assert mx_send(srv, message("<nl1@example.test>", subject="[Newsletter] May"),
                   [ALICE, BOB])[0] == 250
    # the plugin's folder is the keep's folder; bob's fileinto wins over it
    assert holding(srv, ALICE, b"<nl1@example.test>", "Newsletters")
    assert holding(srv, BOB, b"<nl1@example.test>", "Archive")
    assert mx_send(srv, message("<nl2@example.test>"), [ALICE])[0] == 250
    assert holding(srv, ALICE, b"<nl2@example.test>")
