"""Vacation (RFC 5230, RFC 3834): when to answer, the answer, what was answered."""

from __future__ import annotations

import email
import email.header
import email.policy

import pytest

from mailserver.sieve.actions import Vacation
from mailserver.sieve.parser import parse_mailbox
from mailserver.sieve.vacation import VacationMemory, build_reply, should_reply

USER = "alice@example.test"
SENDER = "bob@remote.test"


def header(*lines: str, to: str = USER) -> bytes:
    fields = [f"From: Bob <{SENDER}>", f"To: {to}", "Subject: Lunch?",
              "Message-ID: <m1@remote.test>", *lines]
    return ("\r\n".join(fields) + "\r\n").encode()


def vacation(**kw) -> Vacation:
    kw.setdefault("reason", "I am away.")
    return Vacation(**kw)


# -- should_reply ---------------------------------------------------------------------------

def test_a_personal_message_is_answered() -> None:
    assert should_reply(header(), SENDER, [USER], vacation()) is None


@pytest.mark.parametrize("sender", ["", "<>"])
def test_never_to_a_null_sender(sender: str) -> None:
    assert "null" in should_reply(header(), sender, [USER], vacation())


@pytest.mark.parametrize("sender", ["MAILER-DAEMON@remote.test", "owner-list@remote.test",
                                    "list-request@remote.test", "majordomo@remote.test",
                                    "LISTSERV@remote.test"])
def test_never_to_robots(sender: str) -> None:
    assert should_reply(header(), sender, [USER], vacation()) is not None


@pytest.mark.parametrize("line", ["List-Id: <a.list.remote.test>",
                                  "List-Unsubscribe: <mailto:x@remote.test>",
                                  "List-Post: <mailto:l@remote.test>",
                                  "list-help: <mailto:help@remote.test>"])
def test_never_to_list_mail(line: str) -> None:
    assert "list" in should_reply(header(line), SENDER, [USER], vacation())


@pytest.mark.parametrize("value", ["auto-replied", "auto-generated", "Auto-Notified (x)"])
def test_never_to_automatic_messages(value: str) -> None:
    assert "Auto-Submitted" in should_reply(header(f"Auto-Submitted: {value}"), SENDER, [USER],
                                            vacation())


def test_auto_submitted_no_is_a_person() -> None:
    assert should_reply(header("Auto-Submitted: no (typed by hand)"), SENDER, [USER],
                        vacation()) is None


@pytest.mark.parametrize("value", ["bulk", "list", "junk", " Bulk "])
def test_never_to_bulk_precedence(value: str) -> None:
    assert "Precedence" in should_reply(header(f"Precedence: {value}"), SENDER, [USER],
                                        vacation())


def test_only_when_the_user_is_addressed() -> None:
    other = header(to="team@example.test")
    assert "To/Cc/Bcc" in should_reply(other, SENDER, [USER], vacation())
    # RFC 5230 4.5: :addresses names the user's other addresses
    assert should_reply(other, SENDER, [USER], vacation(addresses=("Team@example.test",))) \
        is None
    # the RCPT that led to the mailbox (an alias) counts too
    assert should_reply(other, SENDER, [USER, "team@example.test"], vacation()) is None
    assert should_reply(header("Cc: Alice <ALICE@example.test>", to="x@remote.test"),
                        SENDER, [USER], vacation()) is None
    assert should_reply(header("Resent-To: alice@example.test", to="x@remote.test"),
                        SENDER, [USER], vacation()) is None


def test_not_to_the_user_himself() -> None:
    assert should_reply(header(), USER, [USER], vacation()) is not None


# -- build_reply ----------------------------------------------------------------------------

def parsed(data: bytes) -> email.message.EmailMessage:
    assert b"\n" not in data.replace(b"\r\n", b"")
    return email.message_from_bytes(data, policy=email.policy.default)


def test_reply_headers() -> None:
    data = build_reply(vacation(), header("References: <r0@remote.test>"), SENDER, USER,
                       "mail.example.test", now=0)
    msg = parsed(data)
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["From"].addresses[0].addr_spec == USER
    assert msg["Subject"] == "Auto: Lunch?"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<m1@remote.test>"
    assert msg["References"].split() == ["<r0@remote.test>", "<m1@remote.test>"]
    assert msg["Message-ID"].endswith("@mail.example.test>")
    assert msg.get_content().strip() == "I am away."


def test_reply_subject_and_from_given() -> None:
    data = build_reply(vacation(subject="Gone fishing", from_address="Alice <a2@example.test>"),
                       header(), SENDER, USER, "mail.example.test")
    msg = parsed(data)
    assert msg["Subject"] == "Gone fishing"
    assert msg["From"].addresses[0].addr_spec == "a2@example.test"


def test_reply_from_with_a_utf8_name_keeps_its_address_outside_the_encoded_word() -> None:
    # RFC 2047 5: the whole "Name <addr>" in one encoded word left From: without address
    data = build_reply(vacation(from_address="Jürgen Müller <a2@example.test>"), header(),
                       SENDER, USER, "h")
    assert b"<a2@example.test>" in data
    msg = parsed(data)
    assert msg["From"].addresses[0].addr_spec == "a2@example.test"
    assert msg["From"].addresses[0].display_name == "Jürgen Müller"


def test_reply_with_a_long_utf8_subject_is_folded_with_crlf() -> None:
    # RFC 5322 2.3: the encoded words of a long subject were folded with bare LFs
    subject = "Grüße aus dem schönen Süden, " * 4
    data = build_reply(vacation(subject=subject), header(), SENDER, USER, "h")
    msg = parsed(data)   # no bare LF
    assert str(msg["Subject"]) == subject.strip()


@pytest.mark.parametrize("value", [
    "alice@example.test, The Boss <bob@example.test>",   # two mailboxes
    "Boss <<bob@example.test>",
    "Smith, John <john@example.test>",
])
def test_from_must_be_one_mailbox(value: str) -> None:
    assert parse_mailbox(value) is None


@pytest.mark.parametrize("value", [
    "bob@example.test <bob@example.test>", "John (work) <j@example.test>",
    "Smith, John <john@example.test>", "alice@example.test, Boss <bob@example.test>",
])
def test_scripts_with_such_addresses_still_compile(value: str) -> None:
    # the check at compile time looks at the last <...> only, as it always did:
    # a stored script must not stop working because its :from has a display name
    from mailserver.sieve.parser import valid_address

    assert valid_address(value)


def test_an_unusable_from_gives_the_users_own_address() -> None:
    data = build_reply(vacation(from_address="alice@example.test, Boss <bob@example.test>"),
                       header(), SENDER, USER, "h")
    msg = parsed(data)
    assert [a.addr_spec for a in msg["From"].addresses] == [USER]


def test_reply_subject_not_doubled() -> None:
    h = header().replace(b"Subject: Lunch?", b"Subject: Auto: Lunch?")
    assert parsed(build_reply(vacation(), h, SENDER, USER, "h"))["Subject"] == "Auto: Lunch?"


def test_reply_in_utf8() -> None:
    h = header().replace(b"Subject: Lunch?", b"Subject: =?utf-8?q?D=C3=A9jeuner?=")
    data = build_reply(vacation(reason="Je suis en congé.\nÀ bientôt"), h, SENDER, USER, "h")
    assert data.isascii()
    msg = parsed(data)
    assert str(msg["Subject"]) == "Auto: Déjeuner"
    assert msg.get_content().replace("\r\n", "\n") == "Je suis en congé.\nÀ bientôt\n"


def test_reply_without_message_id() -> None:
    h = b"From: bob@remote.test\r\nTo: alice@example.test\r\n"
    msg = parsed(build_reply(vacation(), h, SENDER, USER, "h"))
    assert msg["In-Reply-To"] is None and msg["References"] is None
    assert msg["Subject"] == "Auto:"


def test_reply_mime_reason() -> None:
    reason = ("Content-Type: multipart/alternative; boundary=b\n\n--b\n"
              "Content-Type: text/plain\n\nAway\n--b--\n")
    msg = parsed(build_reply(vacation(reason=reason, mime=True), header(), SENDER, USER, "h"))
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["MIME-Version"] == "1.0"


def test_header_injection_in_subject_is_flattened() -> None:
    data = build_reply(vacation(subject="x\r\nBcc: victim@remote.test"), header(), SENDER,
                       USER, "h")
    assert b"\r\nBcc:" not in data


# -- the memory -----------------------------------------------------------------------------

def test_once_per_sender_and_period(tmp_path) -> None:
    m = VacationMemory(tmp_path / "v.sqlite3")
    assert m.claim(USER, "h", SENDER, 86400, now=1000)
    assert not m.claim(USER, "h", SENDER, 86400, now=2000)
    assert not m.claim(USER.upper(), "h", SENDER.upper(), 86400, now=2000)
    assert m.claim(USER, "other handle", SENDER, 86400, now=2000)
    assert m.claim(USER, "h", "carol@remote.test", 86400, now=2000)
    assert m.claim("bob@example.test", "h", SENDER, 86400, now=2000)
    assert m.claim(USER, "h", SENDER, 86400, now=1000 + 86401)   # the period is over
    m.close()


def test_remembered_across_restarts(tmp_path) -> None:
    m = VacationMemory(tmp_path / "v.sqlite3")
    assert m.claim(USER, "h", SENDER, 86400, now=1000)
    m.close()
    again = VacationMemory(tmp_path / "v.sqlite3")
    assert not again.claim(USER, "h", SENDER, 86400, now=5000)
    again.close()


def test_zero_period_always_answers(tmp_path) -> None:
    m = VacationMemory(tmp_path / "v.sqlite3")
    assert m.claim(USER, "h", SENDER, 0, now=1)
    assert m.claim(USER, "h", SENDER, 0, now=2)


def test_release_and_prune(tmp_path) -> None:
    m = VacationMemory(tmp_path / "v.sqlite3")
    assert m.claim(USER, "h", SENDER, 100, now=1000)
    m.release(USER, "h", SENDER)
    assert m.claim(USER, "h", SENDER, 100, now=1001)
    assert m.claim(USER, "h2", SENDER, 100, now=1001)
    assert m.prune(now=1200) == 2
    assert m.prune(now=1200) == 0
