"""End-to-end tests of the MX's inbound checks ([inbound]): SPF, DKIM (RSA and Ed25519),
DMARC, ARC, Authentication-Results, rspamd, DNS blocklists, the greeting delay, HELO
checks and per-session abuse limits, against a real twistd process.

One test DNS server (module-scoped) holds every domain below; the server under test
resolves with it only ([relay].resolver), never with the system resolver.  Messages are
signed and sealed here with dkimpy, as the remote domains and a mailing list would.  Each
test starts its own server with `trusted_networks = []` (loopback clients are checked
like anyone else) and `greet_delay = 0`, unless the test is about those settings.
"""

from __future__ import annotations

import re
import socket
import time

import dkim
import pytest

from harness import (
    HOSTNAME,
    delivered_prefix,
    dot_stuff,
    free_port,
    header_values,
    make_message,
    split_header_body,
    stored_files,
)
from inbound_helpers import (
    AuthResults,
    SigningKeys,
    SourcedClient,
    add_header,
    all_auth_results,
    arc_seal,
    dkim_sign,
    file_keywords,
    folder_messages,
    header_block_fields,
    inbound_server,
    our_auth_results,
    replace_header,
    send,
    strip_comments,
    the_auth_results,
    zone_txt,
)
from outbound_helpers import DNSServer


ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
ELSEWHERE = "192.0.2.1"     # TEST-NET-1: the only address some domains' SPF allows

GOOD = "good.example"               # SPF 127.0.0.1, RSA key "sel", DMARC p=reject
ED = "ed.example"                   # Ed25519 key "ed", DMARC p=none
TAMPER = "tamper.example"           # RSA key "sel", SPF elsewhere, DMARC p=none
REJECT = "reject.example"           # SPF elsewhere, DMARC p=reject
QUARANTINE = "quarantine.example"   # SPF elsewhere, DMARC p=quarantine
SPFONLY = "spfonly.example"         # SPF 127.0.0.1 -all, no DMARC
ORIGIN = "arcorigin.example"        # RSA key "sel", SPF elsewhere, DMARC p=reject
LISTS = "lists.example"             # a mailing list: SPF 127.0.0.1, ARC sealing key "arc"
LOOP = "loop.example"               # SPF includes itself
ODDTAGS = "oddtags.example"         # DMARC p=reject among unknown tags, SPF elsewhere
SLOW = "slow.example"               # its DNS server never answers
DNSBL_ZONE = "zen.example"          # lists 127.0.0.2


def inbound_zone(keys: SigningKeys) -> list[list]:
    spf_here = "v=spf1 ip4:127.0.0.1 -all"
    spf_elsewhere = f"v=spf1 ip4:{ELSEWHERE} -all"
    return [
        [GOOD, "TXT", spf_here],
        [f"sel._domainkey.{GOOD}", "TXT", keys.rsa_record],
        [f"_dmarc.{GOOD}", "TXT", "v=DMARC1; p=reject"],
        [f"ed._domainkey.{ED}", "TXT", keys.ed25519_record],
        [f"_dmarc.{ED}", "TXT", "v=DMARC1; p=none"],
        [TAMPER, "TXT", spf_elsewhere],
        [f"sel._domainkey.{TAMPER}", "TXT", keys.rsa_record],
        [f"_dmarc.{TAMPER}", "TXT", "v=DMARC1; p=none"],
        [REJECT, "TXT", spf_elsewhere],
        [f"_dmarc.{REJECT}", "TXT", "v=DMARC1; p=reject"],
        [QUARANTINE, "TXT", spf_elsewhere],
        [f"_dmarc.{QUARANTINE}", "TXT", "v=DMARC1; p=quarantine"],
        [SPFONLY, "TXT", spf_here],
        [ORIGIN, "TXT", spf_elsewhere],
        [f"sel._domainkey.{ORIGIN}", "TXT", keys.rsa_record],
        [f"_dmarc.{ORIGIN}", "TXT", "v=DMARC1; p=reject"],
        [LISTS, "TXT", spf_here],
        [f"arc._domainkey.{LISTS}", "TXT", keys.rsa_record],
        [LOOP, "TXT", f"v=spf1 include:{LOOP} -all"],
        [ODDTAGS, "TXT", spf_elsewhere],
        [f"_dmarc.{ODDTAGS}", "TXT",
         f"v=DMARC1; p=reject; foo=bar; zz=1; rua=mailto:dmarc@{ODDTAGS}; x-new=yes"],
        [SLOW, "TIMEOUT"],
        [f"2.0.0.127.{DNSBL_ZONE}", "A", "127.0.0.2"],
        [f"2.0.0.127.{DNSBL_ZONE}", "TXT", "listed for testing"],
    ]


@pytest.fixture(scope="module")
def keys() -> SigningKeys:
    return SigningKeys.generate()


@pytest.fixture(scope="module")
def zone(keys: SigningKeys) -> list[list]:
    return inbound_zone(keys)


@pytest.fixture(scope="module")
def dns(zone: list[list], tmp_path_factory: pytest.TempPathFactory):
    server = DNSServer(zone, tmp_path_factory.mktemp("inbound-dns"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory):
    from tests.rspamd_helper import start_rspamd

    proc = start_rspamd(tmp_path_factory.mktemp("rspamd"))
    yield proc
    proc.stop()


# -- common steps and assertions -----------------------------------------------------------

def message(n: str, sender: str, *, subject: str = "test", to: str = ALICE,
            body: bytes | str = b"Hello.\r\n", extra_headers=()) -> bytes:
    return make_message(f"<{n}@{sender.rpartition('@')[2]}>", sender=sender, to=to,
                        subject=subject, body=body, extra_headers=extra_headers)


def only(paths: list, what: str, srv) -> bytes:
    assert len(paths) == 1, f"{what}: expected one message, found {paths}\n{srv.diagnostics()}"
    return paths[0].read_bytes()


def inbox_message(srv, original: bytes | None = None) -> tuple[bytes, bytes]:
    """(stored bytes, the fields the server put in front) of alice's only INBOX message;
    with `original`, the stored file must be exactly those fields plus it."""
    stored = only(folder_messages(srv, ALICE), "alice's INBOX", srv)
    if original is None:
        return stored, split_header_body(stored)[0]
    prefix = delivered_prefix(stored, original)
    assert prefix is not None, (f"stored message is not the sent one plus fields in front:\n"
                                f"sent:   {original[:400]!r}\nstored: {stored[:900]!r}")
    return stored, prefix


def assert_result(ar: AuthResults, method: str, expected: str,
                  **props: str | tuple[str, ...]) -> None:
    """`ar` has a `method`=`expected` result; each given property (header_d for header.d),
    when the result carries it, has the given value or one of the given values
    (case-insensitive)."""
    wanted = {k.replace("_", "."): tuple(x.lower() for x in ((v,) if isinstance(v, str) else v))
              for k, v in props.items()}
    for r in ar.of(method):
        if r.result == expected and all(r.props[k].lower() in v
                                        for k, v in wanted.items() if k in r.props):
            return
    raise AssertionError(f"no {method}={expected} {wanted or ''} in "
                         f"Authentication-Results: {ar.raw}")


def assert_refused(out, code: int, enhanced: str, srv) -> None:
    assert out.stage == "data", f"expected a refusal at the end of DATA, got {out}\n" \
                                f"{srv.diagnostics()}"
    assert out.code == code and out.text.startswith(enhanced), \
        f"expected {code} {enhanced}, got {out}\n{srv.diagnostics()}"


def assert_nothing_stored(srv) -> None:
    files = stored_files(srv.maildir_root, ("new", "cur", "tmp"))
    assert files == [], f"messages were stored: {files}\n{srv.diagnostics()}"


def assert_accepted(out, srv) -> None:
    assert out.accepted, f"expected 250 at the end of DATA, got {out}\n{srv.diagnostics()}"


# -- 1-3: DKIM and SPF -----------------------------------------------------------------------

def test_aligned_dkim_and_spf_pass(make_server, dns, keys, zone):
    srv = inbound_server(make_server, dns)
    signed = dkim_sign(message("good-1", f"sender@{GOOD}", subject="aligned"), GOOD, "sel", keys)
    assert dkim.verify(signed, dnsfunc=zone_txt(zone)), "the test's own signature verifies"
    out = send(srv, signed, f"sender@{GOOD}")
    assert_accepted(out, srv)
    stored, prefix = inbox_message(srv, signed)
    ar = the_auth_results(prefix)     # in front of the message as it arrived
    assert_result(ar, "dkim", "pass", header_d=GOOD)
    assert_result(ar, "spf", "pass")
    assert_result(ar, "dmarc", "pass", header_from=GOOD)
    assert "fail" not in ar.results_of("dkim"), ar.raw


def test_ed25519_signature_passes(make_server, dns, keys, zone):
    srv = inbound_server(make_server, dns)
    signed = dkim_sign(message("ed-1", f"sender@{ED}", subject="ed25519"), ED, "ed", keys,
                       algorithm="ed25519-sha256")
    assert b"a=ed25519-sha256" in signed
    assert dkim.verify(signed, dnsfunc=zone_txt(zone)), "the test's own signature verifies"
    out = send(srv, signed, f"sender@{ED}")
    assert_accepted(out, srv)
    _, prefix = inbox_message(srv, signed)
    ar = the_auth_results(prefix)
    assert_result(ar, "dkim", "pass", header_d=ED, header_a="ed25519-sha256")
    assert_result(ar, "dmarc", "pass")


def test_body_changed_after_signing_fails_dkim(make_server, dns, keys, zone):
    srv = inbound_server(make_server, dns)
    signed = dkim_sign(message("tamper-1", f"sender@{TAMPER}"), TAMPER, "sel", keys)
    tampered = signed.replace(b"Hello.\r\n", b"Hello, changed on the way.\r\n")
    assert tampered != signed and not dkim.verify(tampered, dnsfunc=zone_txt(zone))
    out = send(srv, tampered, f"sender@{TAMPER}")
    assert_accepted(out, srv)      # DMARC fails, but the domain asks for p=none
    _, prefix = inbox_message(srv, tampered)
    ar = the_auth_results(prefix)
    assert_result(ar, "dkim", "fail", header_d=TAMPER)
    assert "pass" not in ar.results_of("dkim"), ar.raw
    assert_result(ar, "dmarc", "fail")
    assert folder_messages(srv, ALICE, "Junk") == []


# -- 4-6: DMARC policies, SPF ----------------------------------------------------------------

def test_forged_from_of_reject_domain_refused(make_server, dns):
    srv = inbound_server(make_server, dns)
    forged = message("forged-1", f"ceo@{REJECT}", subject="pay this invoice")
    out = send(srv, forged, f"ceo@{REJECT}")
    assert_refused(out, 550, "5.7.1", srv)
    assert_nothing_stored(srv)


def test_quarantine_goes_to_junk_with_keyword(make_server, dns):
    from imap_helpers import close_quietly, imap_login, imaplib_ok

    srv = inbound_server(make_server, dns)
    original = message("quarantine-1", f"news@{QUARANTINE}", subject="quarantined")
    out = send(srv, original, f"news@{QUARANTINE}")
    assert_accepted(out, srv)
    assert folder_messages(srv, ALICE) == [], "not in INBOX"
    junk = folder_messages(srv, ALICE, "Junk")
    stored = only(junk, "alice's Junk", srv)
    prefix = delivered_prefix(stored, original)
    assert prefix is not None, stored[:600]
    assert_result(the_auth_results(prefix), "dmarc", "fail")
    table = junk[0].parent.parent / "dovecot-keywords"
    assert "$Junk" in file_keywords(junk[0]), \
        (f"{junk[0].name}: no $Junk letter; dovecot-keywords: "
         f"{table.read_text() if table.exists() else 'missing'}")
    conn = imap_login(srv, ALICE)
    try:
        imaplib_ok(conn.select("Junk"), "SELECT Junk")
        data = imaplib_ok(conn.fetch("1:*", "(FLAGS)"), "FETCH FLAGS")
        fetched = b" ".join(d if isinstance(d, bytes) else b" ".join(d) for d in data)
        assert re.search(rb"FLAGS \([^)]*\$Junk", fetched), fetched
    finally:
        close_quietly(conn)


def test_spf_fail_from_wrong_ip_is_delivered(make_server, dns):
    srv = inbound_server(make_server, dns)
    original = message("spf-1", f"sender@{SPFONLY}", subject="from the wrong address")
    out = send(srv, original, f"sender@{SPFONLY}", source="127.0.0.2")
    assert_accepted(out, srv)
    _, prefix = inbox_message(srv, original)
    ar = the_auth_results(prefix)
    assert_result(ar, "spf", "fail", smtp_mailfrom=(f"sender@{SPFONLY}", SPFONLY))


# -- 7: Authentication-Results of others ----------------------------------------------------

def test_incoming_authentication_results_with_our_id_removed(make_server, dns):
    srv = inbound_server(make_server, dns)
    original = message("ar-1", f"sender@{SPFONLY}", subject="results", extra_headers=[
        f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=forged.example",
        f"authentication-results: {HOSTNAME};\r\n\tspf=pass smtp.mailfrom=forged2.example",
        f"Authentication-Results: {HOSTNAME.upper()} 1; dmarc=pass header.from=forged3.example",
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=kept.example",
        f"Authentication-Results: {HOSTNAME}.elsewhere.example; dkim=pass header.d=kept2.example",
    ])
    out = send(srv, original, f"sender@{SPFONLY}")
    assert_accepted(out, srv)
    stored, _ = inbox_message(srv)
    head, body = split_header_body(stored)
    assert b"forged" not in head, head.decode(errors="replace")
    ours = our_auth_results(stored)
    assert len(ours) == 1, head.decode(errors="replace")
    assert_result(ours[0], "spf", "pass")
    others = {(ar.authserv_id, tuple((r.method, r.result) for r in ar.results))
              for ar in all_auth_results(stored)} - {(ours[0].authserv_id, tuple(
                  (r.method, r.result) for r in ours[0].results))}
    assert others == {("other.example", (("spf", "pass"),)),
                      (f"{HOSTNAME}.elsewhere.example", (("dkim", "pass"),))}, others
    assert b"kept.example" in head and b"kept2.example" in head
    assert body == b"Hello.\r\n" or body == b"Hello.\n"


# -- 8: ARC ----------------------------------------------------------------------------------

def list_forwarded(keys: SigningKeys, zone: list[list], n: str) -> bytes:
    """A message of arcorigin.example (p=reject, DKIM-signed), passed through a mailing
    list that tags the Subject, adds a footer (DKIM now fails) and seals it with ARC."""
    original = message(n, f"author@{ORIGIN}", subject="meeting notes", to=f"team@{LISTS}",
                       body=b"The notes are attached.\r\n")
    signed = dkim_sign(original, ORIGIN, "sel", keys)
    forwarded = replace_header(signed, "Subject", "[team] meeting notes")
    forwarded = add_header(forwarded, f"List-Id: <team.{LISTS}>")
    forwarded += b"-- \r\nteam mailing list: https://lists.example/team\r\n"
    sealed = arc_seal(forwarded, LISTS, "arc", keys, authserv_id=LISTS,
                      results=(f"dkim=pass header.d={ORIGIN} header.s=sel;\r\n"
                               f" spf=pass smtp.mailfrom=author@{ORIGIN};\r\n"
                               f" dmarc=pass header.from={ORIGIN}"))
    dnsfunc = zone_txt(zone)
    assert not dkim.verify(sealed, dnsfunc=dnsfunc), "the list broke the author's signature"
    cv, _, why = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    assert cv == b"pass", f"the test's own ARC set verifies: {why}"
    return sealed


def test_arc_from_trusted_sealer_overrides_dmarc_reject(make_server, dns, keys, zone):
    srv = inbound_server(make_server, dns, inbound={"trusted_arc_sealers": [LISTS]})
    sealed = list_forwarded(keys, zone, "arc-1")
    out = send(srv, sealed, f"team-bounces@{LISTS}")   # SPF passes, but is not aligned
    assert_accepted(out, srv)
    _, prefix = inbox_message(srv, sealed)
    ar = the_auth_results(prefix)
    assert_result(ar, "arc", "pass")
    assert_result(ar, "dmarc", "fail", header_from=ORIGIN)
    assert_result(ar, "spf", "pass")
    assert "pass" not in ar.results_of("dkim"), ar.raw
    assert folder_messages(srv, ALICE, "Junk") == []


def test_arc_from_untrusted_sealer_refused(make_server, dns, keys, zone):
    srv = inbound_server(make_server, dns, inbound={"trusted_arc_sealers": ["elsewhere.example"]})
    sealed = list_forwarded(keys, zone, "arc-2")
    out = send(srv, sealed, f"team-bounces@{LISTS}")
    assert_refused(out, 550, "5.7.1", srv)
    assert_nothing_stored(srv)


# -- 9: rspamd -------------------------------------------------------------------------------

def test_rspamd_reject_refused_at_end_of_data(make_server, dns, rspamd):
    srv = inbound_server(make_server, dns, inbound={"rspamd_url": rspamd.url})
    spam = message("spam-1", "x@remote.test", subject="cheap RSPAMD-TEST-REJECT offer")
    out = send(srv, spam, "x@remote.test")
    assert_refused(out, 554, "5.7.1", srv)
    assert_nothing_stored(srv)


def test_rspamd_add_header_goes_to_junk(make_server, dns, rspamd):
    srv = inbound_server(make_server, dns, inbound={"rspamd_url": rspamd.url})
    spam = message("spam-2", "x@remote.test", subject="maybe RSPAMD-TEST-ADDHEADER spam")
    out = send(srv, spam, "x@remote.test")
    assert_accepted(out, srv)
    assert folder_messages(srv, ALICE) == [], "not in INBOX"
    junk = folder_messages(srv, ALICE, "Junk")
    stored = only(junk, "alice's Junk", srv)
    fields = header_block_fields(stored)
    flags = [v for v in header_values(fields, "X-Spam")] + \
        [v.split(",")[0] for v in header_values(fields, "X-Spam-Status")]
    assert any(v.strip().lower().startswith("yes") for v in flags), \
        split_header_body(stored)[0].decode(errors="replace")
    assert "$Junk" in file_keywords(junk[0]), junk[0].name


def test_rspamd_unreachable_accepts_by_default(make_server, dns):
    closed = free_port()      # nothing listens there
    srv = inbound_server(make_server, dns, inbound={"rspamd_url": f"http://127.0.0.1:{closed}",
                                                    "rspamd_timeout": 3})
    mark = len(srv.log_text())
    original = message("nofilter-1", "x@remote.test", subject="filter down")
    out = send(srv, original, "x@remote.test")
    assert_accepted(out, srv)
    inbox_message(srv, original)
    log = srv.wait_for_log(lambda t: "rspamd" in t[mark:].lower(), timeout=5)
    assert "rspamd" in log[mark:].lower(), f"no log line about rspamd:\n{log[mark:]}"


def test_rspamd_unreachable_tempfail_mode(make_server, dns):
    closed = free_port()
    srv = inbound_server(make_server, dns, inbound={"rspamd_url": f"http://127.0.0.1:{closed}",
                                                    "rspamd_timeout": 3,
                                                    "rspamd_failure": "tempfail"})
    out = send(srv, message("nofilter-2", "x@remote.test"), "x@remote.test")
    assert_refused(out, 451, "4.7.1", srv)
    assert_nothing_stored(srv)


# -- 10-13: the connection and the session ---------------------------------------------------

def test_dnsbl_listed_client_refused_at_rcpt(make_server, dns):
    srv = inbound_server(make_server, dns, inbound={"dnsbl": [DNSBL_ZONE]})
    with SourcedClient(srv.smtp_port, "127.0.0.2") as c:
        c.greet()           # the banner and EHLO: the listed client is not dropped early
        r = c.cmd("MAIL FROM:<x@remote.test>")
        assert r.code == 250, f"MAIL FROM: {r}\n{srv.diagnostics()}"
        r = c.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 554 and r.lines[0].startswith("5.7.1"), f"RCPT: {r}\n{srv.diagnostics()}"
        assert DNSBL_ZONE in r.text, r
    with SourcedClient(srv.smtp_port, "127.0.0.1") as c:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        r = c.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 250, f"RCPT from an unlisted client: {r}\n{srv.diagnostics()}"


def test_talking_before_the_greeting_refused(make_server, dns):
    delay = 1.0
    srv = inbound_server(make_server, dns, inbound={"greet_delay": delay})
    with socket.create_connection(("127.0.0.1", srv.smtp_port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"EHLO x\r\n")
        data = b""
        closed = False
        s.settimeout(1.0)
        while time.monotonic() - started < delay + 5:
            try:
                chunk = s.recv(4096)
            except (socket.timeout, TimeoutError):
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    first = data.split(b"\r\n", 1)[0]
    assert first.startswith(b"554"), f"expected 554 for talking first, got {data!r}\n" \
                                     f"{srv.diagnostics()}"
    assert closed, f"connection still open after {data!r}"

    c = srv.raw(timeout=10)
    try:
        started = time.monotonic()
        banner = c.read_reply()
        waited = time.monotonic() - started
        assert banner.code == 220, banner
        assert delay - 0.1 <= waited < delay + 4, f"banner after {waited:.2f}s"
        assert c.cmd("EHLO client.remote.test").code == 250
        original = message("patient-1", "x@remote.test", subject="waited for the banner")
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(original))
        assert r.code == 250, f"{r}\n{srv.diagnostics()}"
    finally:
        c.quit()
    inbox_message(srv, original)


def test_helo_with_nul_control_or_bad_utf8_gets_501(make_server, dns):
    srv = inbound_server(make_server, dns)
    c = srv.raw()
    try:
        assert c.read_reply().code == 220
        for arg in (b"bad\x00name.example", b"bad\x01name.example", b"\xff\xfe.example"):
            r = c.cmd(b"EHLO " + arg)
            assert r.code == 501, f"EHLO {arg!r}: {r}"
        assert c.cmd("EHLO client.remote.test").code == 250, "the session goes on"
        original = message("helo-ok-1", "x@remote.test")
        r = c.mail_transaction("x@remote.test", [ALICE], dot_stuff(original))
        assert r.code == 250, f"{r}\n{srv.diagnostics()}"
    finally:
        c.quit()
    inbox_message(srv, original)


DOMAIN_OR_LITERAL = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*\.?"
    r"|\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]")


def test_received_from_part_is_a_sanitized_name(make_server, dns):
    srv = inbound_server(make_server, dns)
    helos = ["[1.2.3.4]", "foo_bar", "a(b)c.example", 'x"y.example',
             "evil.example)by.forged.example"]
    accepted: dict[str, str] = {}
    for i, helo in enumerate(helos):
        with srv.raw() as c:
            assert c.read_reply().code == 220
            r = c.cmd(f"EHLO {helo}")
            if r.code != 250:
                assert r.code == 501, f"EHLO {helo}: {r}"
                continue
            msgid = f"<helo-{i}@remote.test>"
            r = c.mail_transaction("x@remote.test", [ALICE],
                                   dot_stuff(make_message(msgid, subject=f"helo {i}")))
            assert r.code == 250, f"EHLO {helo}: {r}\n{srv.diagnostics()}"
            accepted[msgid] = helo
            c.quit()
    assert "[1.2.3.4]" in accepted.values(), "an address literal is a valid EHLO argument"
    stored = {m.read_bytes(): m for m in folder_messages(srv, ALICE)}
    assert len(stored) == len(accepted), f"{len(stored)} stored, {len(accepted)} accepted"
    for data in stored:
        fields = header_block_fields(data)
        msgid = header_values(fields, "Message-ID")[-1]
        received = header_values(fields, "Received")[0]   # ours: the top one
        m = re.match(r"from\s+(\S+)", received)
        assert m, f"Received without a from part: {received!r}"
        token = m.group(1)
        assert DOMAIN_OR_LITERAL.fullmatch(token), \
            f"EHLO {accepted[msgid]!r} gave Received: {received!r} (from part {token!r})"
        clauses = re.findall(r"(?:^|\s)by\s+(\S+)", strip_comments(received))
        assert clauses == [HOSTNAME], f"EHLO {accepted[msgid]!r} gave Received: {received!r}"


def test_too_many_rcpt_commands_disconnects(make_server, dns):
    srv = inbound_server(make_server, dns, limits={"max_rcpt_commands": 5})
    c = srv.raw()
    try:
        c.greet()
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        for rcpt in (ALICE, ALICE, "nobody@example.test", BOB, CAROL):   # duplicates, refused
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code != 421, f"RCPT {rcpt} within the limit: {r}"
        r = c.cmd(f"RCPT TO:<{ALICE}>")
        assert r.code == 421, f"6th RCPT: {r}\n{srv.diagnostics()}"
        assert c.closed_by_server(5), "connection closed after 421"
    finally:
        c.close()
    assert_nothing_stored(srv)


def test_too_many_command_errors_disconnects(make_server, dns):
    srv = inbound_server(make_server, dns, limits={"max_command_errors": 3})
    c = srv.raw()
    try:
        c.greet()
        for bad in ("XYZZY", "MAIL FROM:<broken", "FOO BAR"):
            r = c.cmd(bad)
            assert 500 <= r.code < 600, f"{bad}: {r}"
        r = c.cmd("XYZZY")
        assert r.code == 421, f"4th error: {r}\n{srv.diagnostics()}"
        assert c.closed_by_server(5), "connection closed after 421"
    finally:
        c.close()


# -- 14: bad DNS ------------------------------------------------------------------------------

def test_spf_include_loop_is_permerror_and_delivered(make_server, dns):
    srv = inbound_server(make_server, dns)
    original = message("loop-1", f"x@{LOOP}", subject="spf loop")
    out = send(srv, original, f"x@{LOOP}")
    assert_accepted(out, srv)
    _, prefix = inbox_message(srv, original)
    assert_result(the_auth_results(prefix), "spf", "permerror")


def test_dmarc_record_with_unknown_tags_still_applies(make_server, dns):
    srv = inbound_server(make_server, dns)
    forged = message("oddtags-1", f"ceo@{ODDTAGS}", subject="odd tags")
    out = send(srv, forged, f"ceo@{ODDTAGS}")
    assert_refused(out, 550, "5.7.1", srv)
    assert_nothing_stored(srv)


def test_dns_timeout_gives_temperror_in_bounded_time(make_server, dns):
    srv = inbound_server(make_server, dns)
    original = message("slow-1", f"x@{SLOW}", subject="dns down")
    started = time.monotonic()
    out = send(srv, original, f"x@{SLOW}", timeout=20)
    took = time.monotonic() - started
    assert_accepted(out, srv)
    assert took < 10, f"the transaction took {took:.1f}s"
    _, prefix = inbox_message(srv, original)
    assert_result(the_auth_results(prefix), "spf", "temperror")


# -- 15: trusted networks ----------------------------------------------------------------------

def test_trusted_network_clients_skip_the_checks(make_server, dns):
    # default trusted_networks: loopback, where this client is
    srv = inbound_server(make_server, dns, inbound={"trusted_networks": None})
    forged = message("trusted-1", f"ceo@{REJECT}", subject="from a local program")
    out = send(srv, forged, f"ceo@{REJECT}")
    assert_accepted(out, srv)
    stored, prefix = inbox_message(srv, forged)
    for ar in our_auth_results(stored):
        assert not ar.results, f"checks reported for a trusted client: {ar.raw}"
