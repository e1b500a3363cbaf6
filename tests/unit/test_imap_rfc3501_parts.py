"""Exact RFC 3501 answers for message/rfc822 parts (6.4.5, 7.4.2), ENVELOPE address groups
(7.4.2) and address SEARCH keys (6.4.4).

The section tests run the real FETCH formatter over messages stored in a real Maildir
folder and compare the literal bytes of each answer with the span of the message it must
be; the ENVELOPE and address tests run the parsers on header values.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from mailserver.imap import fetch as F
from mailserver.imap import mime
from mailserver.imap import search as S
from mailserver.imap.parser import Arguments
from mailserver.maildir import MaildirStore


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


# -- the messages ------------------------------------------------------------------------------

# A forwarded message as a whole message of type message/rfc822 (the reported case: BODY[1]
# gave only the inner body, BODY[1.HEADER] nothing).
FWD_HEADER = crlf("From: user@domain.org\nDate: Sat, 24 Mar 2007 23:00:00 +0200\n"
                  "Mime-Version: 1.0\nContent-Type: message/rfc822\n\n")
FWD_INNER_HEADER = crlf("From: sub@domain.org\nDate: Sun, 12 Aug 2012 12:34:56 +0300\n"
                        "Subject: submsg\n\n")
FWD_INNER_BODY = crlf("Hello world\n")
FORWARDED = FWD_HEADER + FWD_INNER_HEADER + FWD_INNER_BODY

# multipart/mixed: 1 text/plain, 2 message/rfc822 holding a multipart/alternative message,
# 3 message/rfc822 holding a single-part message.
MIX_TOP = crlf("From: Alice <alice@example.test>\nTo: bob@example.test\nSubject: two forwards\n"
               "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"top\"\n\n")
MIX_P1_MIME = crlf("Content-Type: text/plain; charset=us-ascii\n\n")
MIX_P1 = crlf("See the two messages below.\n")
MIX_P2_MIME = crlf("Content-Type: message/rfc822\nContent-Description: first forward\n\n")
MIX_P2_HEADER = crlf("From: Carol <carol@example.test>\nTo: group: g1@d1.org, g2@d2.org;\n"
                     "Subject: inner multipart\nDate: Mon, 01 Jan 2024 09:00:00 +0000\n"
                     "Message-ID: <inner-2@example.test>\nMIME-Version: 1.0\n"
                     "Content-Type: multipart/alternative; boundary=\"alt\"\n\n")
MIX_P21_MIME = crlf("Content-Type: text/plain; charset=utf-8\n\n")
MIX_P21 = crlf("Plain inner.\nSecond line.\n")
MIX_P22_MIME = crlf("Content-Type: text/html; charset=utf-8\n\n")
MIX_P22 = crlf("<p>HTML inner</p>\n")
MIX_P2_TEXT = (b"--alt\r\n" + MIX_P21_MIME + MIX_P21 + b"\r\n--alt\r\n" + MIX_P22_MIME + MIX_P22
               + b"\r\n--alt--\r\n")
MIX_P2 = MIX_P2_HEADER + MIX_P2_TEXT
MIX_P3_MIME = crlf("Content-Type: message/rfc822\n\n")
MIX_P3_HEADER = crlf("From: Dave <dave@remote.test>\nSubject: inner single\n"
                     "Date: Tue, 02 Jan 2024 10:00:00 +0000\n\n")
MIX_P3_TEXT = crlf("Single inner body.\n")
MIX_P3 = MIX_P3_HEADER + MIX_P3_TEXT
MIXED = (MIX_TOP + crlf("preamble\n")
         + b"--top\r\n" + MIX_P1_MIME + MIX_P1
         + b"\r\n--top\r\n" + MIX_P2_MIME + MIX_P2
         + b"\r\n--top\r\n" + MIX_P3_MIME + MIX_P3
         + b"\r\n--top--\r\n")

# message/rfc822 inside message/rfc822 inside the message.
X2_HEADER = crlf("From: user@domain.org\nContent-Type: message/rfc822\n\n")
X2_MID_HEADER = crlf("From: user2@domain.org\nContent-Type: message/rfc822\n\n")
X2_IN_HEADER = crlf("From: sub@domain.org\nSubject: submsg\n\n")
X2_IN_BODY = crlf("Hello world\n")
TWICE = X2_HEADER + X2_MID_HEADER + X2_IN_HEADER + X2_IN_BODY

# A message/rfc822 message holding a multipart/digest (whose parts default to message/rfc822).
DG_HEADER = crlf("From: user@domain.org\nContent-Type: message/rfc822\n\n")
DG_IN_HEADER = crlf("From: sub@domain.org\nSubject: digest\n"
                    "Content-Type: multipart/digest; boundary=\"foo\"\n\n")
DG_M1 = crlf("From: m1@example.com\nSubject: m1\n\nm1 body\n")
DG_M2_MIME = crlf("X-Mime: m2 header\n\n")
DG_M2 = crlf("From: m2@example.com\nSubject: m2\n\nm2 body\n")
DG_IN_TEXT = (b"--foo\r\n\r\n" + DG_M1 + b"\r\n--foo\r\n" + DG_M2_MIME + DG_M2
              + b"\r\n--foo--\r\n")
DIGEST = DG_HEADER + DG_IN_HEADER + DG_IN_TEXT


def header_of(message: bytes) -> bytes:
    return message[:message.index(b"\r\n\r\n") + 4]


def text_of(message: bytes) -> bytes:
    return message[message.index(b"\r\n\r\n") + 4:]


# What each BODY[section] must return (RFC 3501 6.4.5).
EXPECTED: dict[str, dict[str, bytes]] = {
    "forwarded": {
        "1": FWD_INNER_HEADER + FWD_INNER_BODY,
        "1.HEADER": FWD_INNER_HEADER,
        "1.TEXT": FWD_INNER_BODY,
        "1.1": FWD_INNER_BODY,
        "1.HEADER.FIELDS (from subject X-foo)": crlf("From: sub@domain.org\nSubject: submsg\n\n"),
        "1.HEADER.FIELDS.NOT (from subject X-foo)": crlf(
            "Date: Sun, 12 Aug 2012 12:34:56 +0300\n\n"),
        "TEXT": FWD_INNER_HEADER + FWD_INNER_BODY,
    },
    "mixed": {
        "1": MIX_P1,
        "2": MIX_P2,
        "2.MIME": MIX_P2_MIME,
        "2.HEADER": MIX_P2_HEADER,
        "2.TEXT": MIX_P2_TEXT,
        "2.HEADER.FIELDS (SUBJECT FROM)": crlf("From: Carol <carol@example.test>\n"
                                               "Subject: inner multipart\n\n"),
        "2.HEADER.FIELDS.NOT (SUBJECT FROM TO DATE MESSAGE-ID)": crlf(
            "MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=\"alt\"\n\n"),
        "2.1": MIX_P21,
        "2.1.MIME": MIX_P21_MIME,
        "2.2": MIX_P22,
        "2.2.MIME": MIX_P22_MIME,
        "3": MIX_P3,
        "3.MIME": MIX_P3_MIME,
        "3.HEADER": MIX_P3_HEADER,
        "3.TEXT": MIX_P3_TEXT,
        "3.1": MIX_P3_TEXT,
        "3.HEADER.FIELDS (SUBJECT)": crlf("Subject: inner single\n\n"),
    },
    "twice": {
        "1": X2_MID_HEADER + X2_IN_HEADER + X2_IN_BODY,
        "1.HEADER": X2_MID_HEADER,
        "1.TEXT": X2_IN_HEADER + X2_IN_BODY,
        "1.1": X2_IN_HEADER + X2_IN_BODY,
        "1.1.HEADER": X2_IN_HEADER,
        "1.1.TEXT": X2_IN_BODY,
        "1.1.1": X2_IN_BODY,
    },
    "digest": {
        "1": DG_IN_HEADER + DG_IN_TEXT,
        "1.HEADER": DG_IN_HEADER,
        "1.TEXT": DG_IN_TEXT,
        "1.1": DG_M1,
        "1.1.MIME": b"\r\n",
        "1.1.HEADER": header_of(DG_M1),
        "1.1.TEXT": text_of(DG_M1),
        "1.2": DG_M2,
        "1.2.MIME": DG_M2_MIME,
        "1.2.HEADER": header_of(DG_M2),
        "1.2.TEXT": text_of(DG_M2),
    },
}
MESSAGES = {"forwarded": FORWARDED, "mixed": MIXED, "twice": TWICE, "digest": DIGEST}


# -- a real folder and the real FETCH formatter ----------------------------------------------

class FetchSections(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="rfc3501-parts-"))
        self.addCleanup(shutil.rmtree, root, True)
        store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        self.account = store.account(store.create_user("example.test", "alice"))
        self.addCleanup(self.account.close)
        self.folder = self.account.folder("INBOX")
        self.uid: dict[str, int] = {}
        for name, data in MESSAGES.items():
            w = self.folder.begin_append(flags={"\\Seen"})
            w.write(data)
            yield w.commit()
        yield self.folder.refresh()
        for name, uid in zip(MESSAGES, self.folder.uids()):
            self.uid[name] = uid
        uids = self.folder.uids()
        self.session = SimpleNamespace(folder=self.folder, recent=set(),
                                       _seq_of=lambda u: uids.index(u) + 1 if u in uids else None)

    def fetch(self, name: str, items: str) -> bytes:
        """The untagged FETCH response for `items` of one message, as sent."""
        parsed = F.parse_fetch_items(items.encode())
        return b"".join(F.fetch_responses(self.session, [self.uid[name]], parsed, set()))

    def section(self, name: str, section: str) -> bytes:
        out = self.fetch(name, f"BODY.PEEK[{section}]")
        head = b"BODY[" + section.upper().encode() + b"] {"  # names are echoed upper-cased
        assert head in out, out[:300]
        start = out.index(head) + len(head)
        size_end = out.index(b"}\r\n", start)
        size = int(out[start:size_end])
        literal = out[size_end + 3:size_end + 3 + size]
        self.assertEqual(out[size_end + 3 + size:], b")\r\n")
        return literal

    def test_sections_of_message_rfc822_parts(self):
        wrong = []
        for name, sections in EXPECTED.items():
            for section, want in sections.items():
                got = self.section(name, section)
                if got != want:
                    wrong.append(f"{name} BODY[{section}]: {got!r} != {want!r}")
        self.assertEqual(wrong, [])

    def test_partial_fetch_of_an_encapsulated_message(self):
        out = self.fetch("mixed", "BODY.PEEK[2]<6.20>")
        self.assertIn(b"BODY[2]<6> {20}\r\n" + MIX_P2[6:26] + b")\r\n", out)

    def test_bodystructure_of_message_rfc822_parts(self):
        out = self.fetch("mixed", "BODYSTRUCTURE")
        p2_env = (b'("Mon, 01 Jan 2024 09:00:00 +0000" "inner multipart" '
                  b'(("Carol" NIL "carol" "example.test")) '
                  b'(("Carol" NIL "carol" "example.test")) '
                  b'(("Carol" NIL "carol" "example.test")) '
                  b'((NIL NIL "group" NIL)(NIL NIL "g1" "d1.org")(NIL NIL "g2" "d2.org")'
                  b'(NIL NIL NIL NIL)) NIL NIL NIL "<inner-2@example.test>")')
        p2 = (b'("MESSAGE" "RFC822" NIL NIL "first forward" "7BIT" %d ' % len(MIX_P2)
              + p2_env
              + b' (("TEXT" "PLAIN" ("charset" "utf-8") NIL NIL "7BIT" %d %d NIL NIL NIL NIL)'
              % (len(MIX_P21), MIX_P21.count(b"\n"))
              + b'("TEXT" "HTML" ("charset" "utf-8") NIL NIL "7BIT" %d %d NIL NIL NIL NIL)'
              % (len(MIX_P22), MIX_P22.count(b"\n"))
              + b' "ALTERNATIVE" ("boundary" "alt") NIL NIL NIL)'
              + b' %d NIL NIL NIL NIL)' % MIX_P2.count(b"\n"))
        self.assertIn(p2, out)
        p3 = (b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" %d ' % len(MIX_P3)
              + b'("Tue, 02 Jan 2024 10:00:00 +0000" "inner single" '
              + b'(("Dave" NIL "dave" "remote.test")) ' * 3
              + b'NIL NIL NIL NIL NIL) '
              + b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" %d %d NIL NIL NIL NIL)'
              % (len(MIX_P3_TEXT), MIX_P3_TEXT.count(b"\n"))
              + b' %d NIL NIL NIL NIL)' % MIX_P3.count(b"\n"))
        self.assertIn(p3, out)

    def test_bodystructure_of_a_forwarded_message(self):
        inner = FWD_INNER_HEADER + FWD_INNER_BODY
        out = self.fetch("forwarded", "BODY")
        self.assertIn(
            b'BODY ("MESSAGE" "RFC822" NIL NIL NIL "7BIT" %d '
            b'("Sun, 12 Aug 2012 12:34:56 +0300" "submsg" ((NIL NIL "sub" "domain.org")) '
            b'((NIL NIL "sub" "domain.org")) ((NIL NIL "sub" "domain.org")) '
            b'NIL NIL NIL NIL NIL) '
            b'("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" %d 1) %d)'
            % (len(inner), len(FWD_INNER_BODY), inner.count(b"\n")), out)


def test_find_part_numbers_follow_rfc3501():
    """Part numbers: a message/rfc822 part is its whole message; its subparts number the
    encapsulated message's parts, a single-part inner message having just part 1."""
    root = mime.parse_structure(FORWARDED)
    assert mime.find_part(root, [1]) is root
    assert mime.find_part(root, [1, 1]) is root.message
    assert mime.find_part(root, [2]) is None
    mixed = mime.parse_structure(MIXED)
    p2 = mime.find_part(mixed, [2])
    assert p2 is not None and p2.message is not None
    assert mime.find_part(mixed, [2, 2]) is p2.message.children[1]
    assert mime.find_part(mixed, [2, 3]) is None
    assert mime.find_part(mixed, [3, 2]) is None


def test_nesting_limit_keeps_bodystructure_well_formed():
    """Beyond MAX_DEPTH a message/rfc822 or multipart part is reported as a plain part,
    never as a MESSAGE/RFC822 without its envelope or a multipart without parts."""
    data = b""
    for _ in range(mime.MAX_DEPTH + 5):
        data += b"Content-Type: message/rfc822\r\n\r\n"
    data += b"Subject: deep\r\n\r\nbody\r\n"
    bs = mime.body_structure(mime.parse_structure(data))
    depth = bs.count(b'"MESSAGE" "RFC822"')
    assert depth == mime.MAX_DEPTH, depth
    assert bs.count(b'"APPLICATION" "OCTET-STREAM"') == 1, bs[-300:]
    mp = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                  for i in range(mime.MAX_DEPTH + 3))
    bs = mime.body_structure(mime.parse_structure(mp + b"\r\nx\r\n"))
    assert b'("TEXT" "PLAIN"' in bs and b'( "MIXED"' not in bs, bs[-300:]


# -- ENVELOPE addresses (RFC 3501 7.4.2) --------------------------------------------------------

def env_addresses(value: bytes) -> bytes:
    """The To member of the ENVELOPE of a message whose To: field is `value`."""
    part = mime.parse_head(b"To: " + value + b"\r\n\r\n")
    return _to_member(mime.envelope(part))


def _to_member(env: bytes) -> bytes:
    """The 6th member (To) of an ENVELOPE, as bytes."""
    members = _split_members(env[1:-1])
    return members[5]


def _split_members(inner: bytes) -> list[bytes]:
    out, depth, start, i, quoted = [], 0, 0, 0, False
    while i < len(inner):
        c = inner[i:i + 1]
        if quoted:
            if c == b"\\":
                i += 1
            elif c == b'"':
                quoted = False
        elif c == b'"':
            quoted = True
        elif c == b"(":
            depth += 1
        elif c == b")":
            depth -= 1
        elif c == b" " and depth == 0:
            out.append(inner[start:i])
            start = i + 1
        i += 1
    out.append(inner[start:])
    return out


@pytest.mark.parametrize("value, expected", [
    (b"group: g1@d1.org, g2@d2.org;",
     b'((NIL NIL "group" NIL)(NIL NIL "g1" "d1.org")(NIL NIL "g2" "d2.org")(NIL NIL NIL NIL))'),
    (b"undisclosed-recipients:;",
     b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'),
    (b"group: g1@d1.org, g2@d2.org;, group2: g3@d3.org;",
     b'((NIL NIL "group" NIL)(NIL NIL "g1" "d1.org")(NIL NIL "g2" "d2.org")(NIL NIL NIL NIL)'
     b'(NIL NIL "group2" NIL)(NIL NIL "g3" "d3.org")(NIL NIL NIL NIL))'),
    (b"a@x.org, Team: \"B, Boss\" <b@y.org> (boss);, c@z.org",
     b'((NIL NIL "a" "x.org")(NIL NIL "Team" NIL)("B, Boss" NIL "b" "y.org")(NIL NIL NIL NIL)'
     b'(NIL NIL "c" "z.org"))'),
    (b"user@domain (Real Name)", b'(("Real Name" NIL "user" "domain"))'),
    (b"<@route:user@domain>", b'((NIL "@route" "user" "domain"))'),
    (b"<user-from (comment)@ (comment) domain.org>", b'(("comment" NIL "user-from" "domain.org"))'),
    (b"John Q. Public <jqp@example.org>", b'(("John Q. Public" NIL "jqp" "example.org"))'),
    (b"=?utf-8?q?J=C3=B6rg?= <j@example.org>",
     b'(("=?utf-8?q?J=C3=B6rg?=" NIL "j" "example.org"))'),
    (b"\"john doe\"@example.org", b'((NIL NIL "\\"john doe\\"" "example.org"))'),
    (b"root", b'((NIL NIL "root" "MISSING_DOMAIN"))'),
    (b"", b"NIL"),
])
def test_envelope_addresses(value, expected):
    assert env_addresses(value) == expected


def test_envelope_sender_and_reply_to_default_to_from():
    part = mime.parse_head(b"From: a@x.org\r\nSender: \r\nReply-To: \r\n\r\n")
    members = _split_members(mime.envelope(part)[1:-1])
    assert members[2] == members[3] == members[4] == b'((NIL NIL "a" "x.org"))', members


# -- address SEARCH text (RFC 3501 6.4.4) --------------------------------------------------------

ADDRESS_MESSAGES = [
    # imaptest's search-addresses corpus, plus encoded and 8-bit display names
    ["From: user-from@domain.org", "To: user-to@domain.org", "Cc: user-cc@domain.org",
     "Bcc: user-bcc@domain.org"],
    ["From: RealFrom <user-from@domain.org>", "To: RealTo <user-to@domain.org>",
     "Cc: RealCc <user-cc@domain.org>", "Bcc: RealBcc <user-bcc@domain.org>"],
    ["From: <user-from (comment)@ (comment) domain.org>", "To: <user-to@domain.org>",
     "Cc: <user-cc@domain.org>", "Bcc: <user-bcc@domain.org>"],
    ["From: user-from@domain.org (RealFrom)", "To: user-to@domain.org (RealTo)",
     "Cc: user-cc@domain.org (RealCc)", "Bcc: user-bcc@domain.org (RealBcc)"],
    ["From: user-from1@domain.org, user-from2@domain.org", "Cc: user-cc@domain.org"],
    ["To: groupname: groupuser1@domain.org, groupuser2@domain.org;,\r\n"
     "  groupname2: groupuser3@domain.org;"],
    ["From: =?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <USER-FROM@Domain.ORG>",
     "Cc: =?iso-8859-1?q?Ren=E9?= =?utf-8?q?_Fran=C3=A7ois?= <rf@domain.org>"],
    ["From: \"=?utf-8?q?Andr=C3=A9?=\" <andre@domain.org>",
     "To: =?x-unknown?q?abc?= =?utf-8?q?Zo=C3=AB?= <zoe@domain.org>"],
]

ADDRESS_SEARCHES = [
    ("FROM user-from@domain.org", [1, 2, 3, 4, 7]),
    ("TO user-to@domain.org", [1, 2, 3, 4]),
    ("CC user-cc@domain.org", [1, 2, 3, 4, 5]),
    ("BCC user-bcc@domain.org", [1, 2, 3, 4]),
    ("FROM realfrom", [2, 4]), ("TO realto", [2, 4]), ("CC realcc", [2, 4]),
    ("BCC realbcc", [2, 4]),
    ("FROM ser-fro", [1, 2, 3, 4, 5, 7]), ("TO ser-t", [1, 2, 3, 4]),
    ("FROM ealfro", [2, 4]), ("BCC ealbc", [2, 4]),
    ("FROM user-from1", [5]), ("FROM user-from2", [5]),
    ("TO groupname", [6]), ("TO groupname2", [6]), ("TO groupuser1", [6]),
    ("TO groupuser3", [6]), ("TO groupuser4", []),
    ("FROM \"Jörg Müller\"", [7]), ("FROM jÖRG", [7]), ("CC \"René François\"", [7]),
    ("FROM André", [8]), ("TO Zoë", [8]), ("TO zoe@domain.org", [8]),
    ("HEADER FROM \"\"", [1, 2, 3, 4, 5, 7, 8]),
]


class AddressSearch(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="rfc3501-search-"))
        self.addCleanup(shutil.rmtree, root, True)
        store = MaildirStore(root / "maildirs", hostname="mx.example.test")
        self.account = store.account(store.create_user("example.test", "alice"))
        self.addCleanup(self.account.close)
        self.folder = self.account.folder("INBOX")
        for headers in ADDRESS_MESSAGES:
            w = self.folder.begin_append()
            w.write(("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode())
            yield w.commit()
        yield self.folder.refresh()

    @inlineCallbacks
    def check(self):
        wrong = []
        for text, expected in ADDRESS_SEARCHES:
            session = SimpleNamespace(folder=self.folder, view=self.folder.uids(), recent=set())
            found: Any = yield S.search(session, S.parse_search(Arguments([text.encode()])))
            if found != expected:
                wrong.append(f"SEARCH {text}: {found} != {expected}")
        self.assertEqual(wrong, [])

    @inlineCallbacks
    def test_address_keys(self):
        yield self.check()
        yield self.check()  # the second time from the index's search table alone


@pytest.mark.parametrize("raw, text", [
    (b"=?UTF-8?B?SsO2cmcgTcO8bGxlcg==?= <user-from@domain.org>",
     "Jörg Müller <user-from@domain.org>"),
    (b"=?x-unknown?q?abc?= =?utf-8?q?Zo=C3=AB?= <zoe@domain.org>",
     "=?x-unknown?q?abc?= Zoë <zoe@domain.org>"),
    (b"caf\xc3\xa9 =?utf-8?q?cr=C3=A8me?= <x@y.org>", "café crème <x@y.org>"),
    (b"<user-from (comment)@ (comment) domain.org>", "comment <user-from@domain.org>"),
    (b"groupname: groupuser1@domain.org, groupuser2@domain.org;, x@y.org",
     "groupname: groupuser1@domain.org, groupuser2@domain.org;, x@y.org"),
])
def test_address_search_text(raw, text):
    assert S.address_text(raw) == text


@pytest.mark.parametrize("value", [
    "Alice Example <alice@example.test>", "Bob <bob@example.test>, carol@example.test",
    "Ren\u00e9 <rene@remote.test>", "<a@b>", "a@b,,c@d,", "John  Q .Public<jqp@x.org>",
    "a.b.c@d.e", "a\u00a0b <x@y>", " , ", "", "=?utf-8?q?J=C3=B6rg?= <j@x>", "a<b@c>",
    "Name <a@b", "a@b c@d", "Mailer-Daemon <>", "root", "a@b@c", "Name <a@b> junk", "a <b@c>d",
])
def test_simple_address_shortcut_agrees_with_the_full_parser(value):
    """The regular-expression path for plain lists answers exactly as the tokenizer would,
    or leaves the value to it."""
    simple = mime._simple_addresses(value)
    assert simple is None or simple == mime._parse_tokens(value)
    assert mime.parse_addresses(value) == mime._parse_tokens(value)


def test_boundary_that_begins_a_nested_boundary():
    """RFC 2046 5.1.1: only a line that is the delimiter (plus white space) or the close
    delimiter ends a part; "--b2" inside is not a delimiter of boundary "b"."""
    inner = (b"--b2\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
             b"--b2\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b2--\r\n")
    msg = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
           b'--b\r\nContent-Type: multipart/alternative; boundary="b2"\r\n\r\n' + inner
           + b"--b \t\r\nContent-Type: text/plain\r\n\r\nsecond\r\n--b--\r\n")
    root = mime.parse_structure(msg)
    assert len(root.children) == 2
    alt = mime.find_part(root, [1])
    assert alt is not None and alt.subtype == "alternative" and len(alt.children) == 2
    assert msg[alt.body_start:alt.end] == inner[:-2]  # the CRLF before "--b" is the delimiter's
    second = mime.find_part(root, [2])
    assert second is not None and msg[second.body_start:second.end] == b"second"
