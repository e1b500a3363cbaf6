"""Mailbox commands against a real server: SELECT/EXAMINE responses, STORE, COPY, APPEND,
EXPUNGE, CLOSE, UNSELECT, STATUS, LIST/LSUB/SUBSCRIBE, CREATE/RENAME/DELETE, and the
extensions UIDPLUS, MOVE, SPECIAL-USE, CHILDREN, LIST-EXTENDED, LIST-STATUS and QUOTA."""

from __future__ import annotations

import re

from imap_helpers import (
    SPECIAL_USE,
    Lit,
    RawIMAP,
    Result,
    as_int,
    close_quietly,
    crlf,
    deliver,
    flags_of,
    imap_login,
    message_files,
    module_server,
    new_user,
    parse_data,
    parse_internaldate,
)

imap_server = module_server()


def msg(n: int | str, size: int = 0) -> bytes:
    body = "Body of message %s.\n" % n + ("x" * 70 + "\n") * (size // 71)
    return crlf(f"From: <x@remote.test>\nTo: <u@example.test>\nSubject: message {n}\n"
                f"Message-ID: <m{n}@remote.test>\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n\n{body}")


def message_ids(c: RawIMAP, seqset: str = "1:*", uid: bool = False) -> dict[int, str]:
    """{seq (or uid): Message-ID} of the selected mailbox."""
    r = c.command(f"{'UID ' if uid else ''}FETCH {seqset} (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    assert r.status == "OK", str(r)
    out = {}
    for seq, row in r.fetches().items():
        key = as_int(row["UID"]) if uid else seq
        out[key] = row["BODY[HEADER.FIELDS (MESSAGE-ID)]"].split(b":", 1)[1].strip().decode()
    return out


def list_entries(r: Result, verb: bytes = b"LIST") -> dict[str, tuple[set[str], bytes | None]]:
    """{mailbox: ({attributes}, delimiter)} from LIST/LSUB responses."""
    out = {}
    for rest in r.with_prefix(verb + b" "):
        attrs, delim, name = parse_data(rest)
        out[bytes(name).decode()] = ({bytes(a).decode() for a in attrs},
                                     None if delim is None else bytes(delim))
    return out


def status_values(r: Result) -> dict[str, dict[str, int]]:
    out = {}
    for rest in r.with_prefix(b"STATUS "):
        name, values = parse_data(rest)
        out[bytes(name).decode()] = {bytes(values[i]).decode().upper(): as_int(values[i + 1])
                                     for i in range(0, len(values), 2)}
    return out


def lower_attrs(attrs: set[str]) -> set[str]:
    return {a.lower() for a in attrs}


# -- SELECT / EXAMINE ---------------------------------------------------------------------------

def test_select_and_examine_responses(imap_server):
    user = new_user(imap_server, "sel")
    c = RawIMAP.login(imap_server, user)
    try:
        assert c.append("INBOX", msg(1), flags="\\Seen").status == "OK"
        deliver(imap_server, user, subject="two")
        deliver(imap_server, user, subject="three")
        r = c.select("INBOX")
        flags_lines = r.with_prefix(b"FLAGS ")
        assert len(flags_lines) == 1, str(r)
        flags = flags_of(parse_data(flags_lines[0])[0])
        assert {"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"} <= flags, flags
        codes = r.codes()
        assert "PERMANENTFLAGS" in codes, str(r)
        perm = flags_of(parse_data(codes["PERMANENTFLAGS"])[0])
        assert {"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\*"} <= perm, perm
        assert r.numbers(b"EXISTS") == [3], str(r)
        assert r.numbers(b"RECENT") == [3], str(r)
        assert codes.get("UNSEEN") == b"2", f"[UNSEEN 2] expected:\n{r}"
        uidvalidity = int(codes["UIDVALIDITY"])
        uidnext = int(codes["UIDNEXT"])
        assert uidvalidity > 0, str(r)
        uids = c.command("UID SEARCH ALL").search()
        assert uidnext > max(uids), (uidnext, uids)
        assert r.code == b"READ-WRITE", f"tagged OK without [READ-WRITE]:\n{r}"
    finally:
        c.close()
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.select("INBOX", examine=True)
        codes = r.codes()
        assert codes.get("PERMANENTFLAGS") == b"()", f"EXAMINE must give [PERMANENTFLAGS ()]:\n{r}"
        assert r.numbers(b"EXISTS") == [3] and r.numbers(b"RECENT") == [0], str(r)
        assert codes.get("UNSEEN") == b"2", str(r)
        assert int(codes["UIDVALIDITY"]) == uidvalidity and int(codes["UIDNEXT"]) == uidnext, str(r)
        assert r.code == b"READ-ONLY", f"tagged OK without [READ-ONLY]:\n{r}"
        r = c.command("STORE 1 +FLAGS (\\Flagged)")
        assert r.status == "NO", f"STORE in an EXAMINEd mailbox:\n{r}"
        # No unseen message: no [UNSEEN].
        c.ok("CREATE AllSeen")
        assert c.append("AllSeen", msg(9), flags="\\Seen").status == "OK"
        r = c.select("AllSeen")
        assert "UNSEEN" not in r.codes(), f"[UNSEEN] although every message is seen:\n{r}"
        r = c.command("SELECT NoSuchFolder")
        assert r.status == "NO", str(r)
        r = c.command("FETCH 1 FLAGS")
        assert r.status == "BAD", f"a failed SELECT must leave the selected state:\n{r}"
    finally:
        c.close()


# -- STORE ----------------------------------------------------------------------------------

def test_store_flags_and_keywords(imap_server):
    user = new_user(imap_server, "store")
    c = RawIMAP.login(imap_server, user)
    try:
        for i in range(1, 4):
            assert c.append("INBOX", msg(i)).status == "OK"
        c.select("INBOX")

        def flags(seq: int) -> set[str]:
            return flags_of(c.fetch(str(seq), "FLAGS")[seq]["FLAGS"]) - {"\\Recent"}

        r = c.ok("STORE 1 +FLAGS (\\Flagged \\Seen)")
        assert flags_of(r.fetches()[1]["FLAGS"]) - {"\\Recent"} == {"\\Flagged", "\\Seen"}, str(r)
        r = c.ok("STORE 1 -FLAGS (\\Seen)")
        assert flags_of(r.fetches()[1]["FLAGS"]) - {"\\Recent"} == {"\\Flagged"}, str(r)
        r = c.ok("STORE 1 FLAGS (\\Answered $Forwarded)")
        assert flags_of(r.fetches()[1]["FLAGS"]) - {"\\Recent"} == {"\\Answered", "$Forwarded"}, str(r)
        r = c.ok("STORE 2 +FLAGS.SILENT (\\Deleted Work_Project)")
        assert 2 not in r.fetches(), f".SILENT still answered with FETCH:\n{r}"
        assert flags(2) == {"\\Deleted", "Work_Project"}
        r = c.ok("STORE 2:3 -FLAGS.SILENT (\\Deleted)")
        assert not r.fetches(), str(r)
        assert flags(2) == {"Work_Project"} and flags(3) == set()
        uid3 = c.command("UID SEARCH 3").search()[0]
        r = c.ok(f"UID STORE {uid3} +FLAGS (\\Draft)")
        rows = r.fetches()
        assert 3 in rows and as_int(rows[3]["UID"]) == uid3, f"UID STORE must report UID:\n{r}"
        assert flags_of(rows[3]["FLAGS"]) - {"\\Recent"} == {"\\Draft"}, str(r)
        c.ok(f"UID STORE {uid3} FLAGS.SILENT ()")
        assert flags(3) == set()
    finally:
        c.close()
    # Stored: a new session sees the flags, and FLAGS/PERMANENTFLAGS list the keywords.
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.select("INBOX")
        defined = flags_of(parse_data(r.with_prefix(b"FLAGS ")[0])[0])
        assert {"$Forwarded", "Work_Project"} <= defined, f"keywords missing from FLAGS:\n{r}"
        rows = c.fetch("1:3", "FLAGS")
        got = {s: flags_of(v["FLAGS"]) - {"\\Recent"} for s, v in rows.items()}
        assert got == {1: {"\\Answered", "$Forwarded"}, 2: {"Work_Project"}, 3: set()}, got
    finally:
        c.close()


# -- COPY, APPEND, UIDPLUS --------------------------------------------------------------------

def test_copy_and_copyuid(imap_server):
    user = new_user(imap_server, "copy")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Dest")
        assert c.append("Dest", msg("already-there")).status == "OK"
        for i in range(1, 4):
            assert c.append("INBOX", msg(i), flags="\\Flagged" if i == 2 else None).status == "OK"
        c.select("INBOX")
        src_ids = message_ids(c, uid=True)
        r = c.ok("COPY 2:3 Dest")
        code = r.codes().get("COPYUID")
        assert code, f"COPY without [COPYUID]:\n{r}"
        validity, src_set, dst_set = code.split()
        src_uids, dst_uids = _uid_set(src_set), _uid_set(dst_set)
        assert src_uids == sorted(src_ids)[1:3], (src_uids, src_ids)
        assert len(dst_uids) == 2
        r = c.command("COPY 1 NoSuchFolder")
        assert r.status == "NO" and r.code == b"TRYCREATE", f"COPY to a missing mailbox:\n{r}"
        assert message_ids(c) == {1: "<m1@remote.test>", 2: "<m2@remote.test>",
                                  3: "<m3@remote.test>"}, "COPY changed the source"
        r = c.select("Dest")
        assert int(r.codes()["UIDVALIDITY"]) == int(validity), str(r)
        dst_ids = message_ids(c, uid=True)
        for s, d in zip(src_uids, dst_uids):
            assert dst_ids.get(d) == src_ids[s], (s, d, src_ids, dst_ids)
        fl = c.fetch(str(dst_uids[0]), "FLAGS", uid=True)
        assert any("\\Flagged" in flags_of(v["FLAGS"]) for v in fl.values()), f"flags not copied: {fl}"
        # UID COPY
        r = c.ok(f"UID COPY {dst_uids[1]} INBOX")
        assert r.codes().get("COPYUID", b"").split()[1:2] == [str(dst_uids[1]).encode()], str(r)
    finally:
        c.close()


def _uid_set(text: bytes) -> list[int]:
    out = []
    for part in text.decode().split(","):
        lo, _, hi = part.partition(":")
        a, b = int(lo), int(hi or lo)
        out += list(range(a, b + 1)) if a <= b else list(range(a, b - 1, -1))
    return out


def test_copy_into_a_folder_without_keyword_letters_left_drops_only_the_keywords(imap_server):
    """As Dovecot: a full keyword table (26) must not keep a message from being filed."""
    user = new_user(imap_server, "kwfull")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Full")
        many = " ".join(f"kw{i}" for i in range(26))
        assert c.append("Full", msg(1), flags=many).status == "OK"
        assert c.append("INBOX", msg(2), flags="\\Seen kw3 extra").status == "OK"
        c.select("INBOX")
        c.ok("COPY 1 Full")
        c.ok("MOVE 1 Full")
        c.select("Full")
        rows = c.fetch("1:*", "FLAGS")
        assert len(rows) == 3, rows
        for n in (2, 3):
            assert flags_of(rows[n]["FLAGS"]) - {"\\Recent"} == {"\\Seen", "kw3"}, rows[n]
    finally:
        c.close()


def test_append_flags_date_and_appenduid(imap_server):
    user = new_user(imap_server, "append")
    c = RawIMAP.login(imap_server, user)
    try:
        message = msg("appended")
        r = c.append("INBOX", message, flags="\\Seen $Forwarded", date="14-Mar-2024 15:09:26 +0100")
        assert r.status == "OK", str(r)
        code = r.codes().get("APPENDUID")
        assert code, f"APPEND without [APPENDUID]:\n{r}"
        validity, uid = (int(x) for x in code.split())
        r = c.select("INBOX")
        assert int(r.codes()["UIDVALIDITY"]) == validity, str(r)
        rows = c.fetch(str(uid), "(FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])", uid=True)
        assert len(rows) == 1, rows
        row = next(iter(rows.values()))
        assert as_int(row["UID"]) == uid
        assert flags_of(row["FLAGS"]) - {"\\Recent"} == {"\\Seen", "$Forwarded"}, row["FLAGS"]
        assert parse_internaldate(row["INTERNALDATE"]) == parse_internaldate(
            b"14-Mar-2024 15:09:26 +0100"), row["INTERNALDATE"]
        assert row["BODY[]"] == message and as_int(row["RFC822.SIZE"]) == len(message)
        # APPEND to the selected mailbox is announced; APPEND to a missing one: TRYCREATE.
        r = c.append("INBOX", msg("second"))
        assert r.status == "OK", str(r)
        r2 = c.ok("NOOP")
        assert 2 in r.numbers(b"EXISTS") + r2.numbers(b"EXISTS"), f"no * 2 EXISTS:\n{r}\n{r2}"
        r = c.append("NoSuchFolder", msg("lost"))
        assert r.status == "NO" and r.code == b"TRYCREATE", f"APPEND to a missing mailbox:\n{r}"
        assert not r.continuations, f"continuation sent although the mailbox is missing:\n{r}"
        r = c.append("INBOX", msg("bad date"), date="31-Foo-2024 00:00:00 +0000")
        assert r.status == "BAD", f"APPEND with an invalid date-time:\n{r}"
    finally:
        c.close()
    conn = imap_login(imap_server, user)
    try:
        typ, data = conn.append("INBOX", "(\\Draft)", None, msg("imaplib"))
        assert typ == "OK" and b"APPENDUID" in data[0], data
    finally:
        close_quietly(conn)


def test_expunge(imap_server):
    user = new_user(imap_server, "expunge")
    c = RawIMAP.login(imap_server, user)
    try:
        for i in range(1, 6):
            assert c.append("INBOX", msg(i)).status == "OK"
        c.select("INBOX")
        c.ok("STORE 2,4 +FLAGS.SILENT (\\Deleted)")
        r = c.ok("EXPUNGE")
        view = [1, 2, 3, 4, 5]
        for n in r.numbers(b"EXPUNGE"):
            del view[n - 1]
        assert view == [1, 3, 5], f"EXPUNGE responses do not remove 2 and 4:\n{r}"
        assert message_ids(c) == {1: "<m1@remote.test>", 2: "<m3@remote.test>",
                                  3: "<m5@remote.test>"}
        assert len(message_files(imap_server.maildir(user))) == 3
    finally:
        c.close()


def test_expunge_of_a_message_not_yet_announced_leaves_no_ghost(imap_server):
    """A \\Deleted message another session appended, expunged by this session's EXPUNGE
    before this session was told of it: never announced as EXISTS (RFC 3501 7.4.1)."""
    user = new_user(imap_server, "ghost")
    a = RawIMAP.login(imap_server, user, select="INBOX")
    b = RawIMAP.login(imap_server, user)
    try:
        assert b.append("INBOX", msg(1), flags="\\Deleted").status == "OK"
        r = a.ok("EXPUNGE")
        assert r.numbers(b"EXISTS") == [], str(r)
        assert a.command("SEARCH ALL").search() == []
        assert b.append("INBOX", msg(2)).status == "OK"
        r = a.ok("NOOP")
        assert r.numbers(b"EXISTS") == [1], str(r)
        assert message_ids(a) == {1: "<m2@remote.test>"}
    finally:
        a.close()
        b.close()


def test_store_acts_on_the_flags_the_file_has_now(imap_server):
    """A flag another process took away (by renaming the file) is set again by the next
    +FLAGS, not lost because the session's copy still had it."""
    user = new_user(imap_server, "stale")
    c = RawIMAP.login(imap_server, user)
    try:
        assert c.append("INBOX", msg(1)).status == "OK"
        c.select("INBOX")
        c.ok("STORE 1 +FLAGS (\\Seen)")
        [path] = message_files(imap_server.maildir(user))
        assert path.name.endswith(":2,S"), path.name
        path.rename(path.with_name(path.name[:-1]))        # another process: unseen
        r = c.ok("STORE 1 +FLAGS (\\Seen)")
        assert "\\Seen" in flags_of(r.fetches()[1]["FLAGS"]), str(r)
        [path] = message_files(imap_server.maildir(user))
        assert path.name.endswith(":2,S"), path.name
        r = c.ok("NOOP")
        assert not r.fetches() or "\\Seen" in flags_of(r.fetches()[1]["FLAGS"]), str(r)
    finally:
        c.close()


def test_uid_expunge_only_given_uids(imap_server):
    user = new_user(imap_server, "uidexp")
    c = RawIMAP.login(imap_server, user)
    try:
        for i in range(1, 5):
            assert c.append("INBOX", msg(i)).status == "OK"
        c.select("INBOX")
        uids = c.command("UID SEARCH ALL").search()
        c.ok("STORE 1:3 +FLAGS.SILENT (\\Deleted)")
        r = c.ok(f"UID EXPUNGE {uids[1]}")
        assert r.numbers(b"EXPUNGE") == [2], f"UID EXPUNGE {uids[1]}:\n{r}"
        left = c.command("UID SEARCH ALL").search()
        assert left == [uids[0], uids[2], uids[3]], left
        assert c.command("UID SEARCH DELETED").search() == [uids[0], uids[2]]
        r = c.ok(f"UID EXPUNGE {uids[3]}")  # not \Deleted: stays
        assert r.numbers(b"EXPUNGE") == [], str(r)
    finally:
        c.close()


def test_close_expunges_silently_and_unselect_does_not(imap_server):
    user = new_user(imap_server, "close")
    c = RawIMAP.login(imap_server, user)
    try:
        for i in range(1, 5):
            assert c.append("INBOX", msg(i)).status == "OK"
        c.select("INBOX")
        c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        r = c.ok("UNSELECT")
        assert not r.numbers(b"EXPUNGE"), str(r)
        r = c.command("FETCH 1 FLAGS")
        assert r.status == "BAD", f"still selected after UNSELECT:\n{r}"
        r = c.select("INBOX")
        assert r.numbers(b"EXISTS") == [4], f"UNSELECT expunged:\n{r}"
        c.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        r = c.ok("CLOSE")
        assert not r.numbers(b"EXPUNGE"), f"CLOSE sent EXPUNGE responses:\n{r}"
        r = c.command("FETCH 1 FLAGS")
        assert r.status == "BAD", f"still selected after CLOSE:\n{r}"
        r = c.select("INBOX", examine=True)
        assert r.numbers(b"EXISTS") == [2], f"CLOSE did not expunge:\n{r}"
        assert c.command("UNSELECT").status == "OK"
        # CLOSE of an EXAMINEd mailbox expunges nothing.
        c.select("INBOX")
        c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        c.select("INBOX", examine=True)
        c.ok("CLOSE")
        r = c.select("INBOX", examine=True)
        assert r.numbers(b"EXISTS") == [2], str(r)
    finally:
        c.close()


def test_status(imap_server):
    user = new_user(imap_server, "status")
    c = RawIMAP.login(imap_server, user)
    try:
        assert c.append("INBOX", msg(1), flags="\\Seen").status == "OK"
        assert c.append("INBOX", msg(2)).status == "OK"
        deliver(imap_server, user)
        r = c.ok("STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)")
        st = status_values(r).get("INBOX")
        assert st is not None, str(r)
        assert st["MESSAGES"] == 3 and st["UNSEEN"] == 2 and st["RECENT"] == 3, st
        sel = c.select("INBOX", examine=True)
        codes = sel.codes()
        assert st["UIDVALIDITY"] == int(codes["UIDVALIDITY"]), (st, str(sel))
        assert st["UIDNEXT"] == int(codes["UIDNEXT"]), (st, str(sel))
        r = c.ok("STATUS Sent (MESSAGES UNSEEN)")
        assert status_values(r).get("Sent") == {"MESSAGES": 0, "UNSEEN": 0}, str(r)
        r = c.command("STATUS NoSuchFolder (MESSAGES)")
        assert r.status == "NO", str(r)
        r = c.command("STATUS INBOX (FROB)")
        assert r.status == "BAD", str(r)
    finally:
        c.close()


# -- LIST and the folder tree ------------------------------------------------------------------

def test_list_attributes_separator_and_children(imap_server):
    user = new_user(imap_server, "list")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Projects.2024.Q1")
        r = c.ok('LIST "" "*"')
        entries = list_entries(r)
        for name in ("INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive",
                     "Projects", "Projects.2024", "Projects.2024.Q1"):
            assert name in entries, f"{name} missing:\n{r}"
        assert all(delim == b"." for _, delim in entries.values()), str(r)
        assert "\\haschildren" in lower_attrs(entries["Projects"][0]), str(r)
        assert "\\haschildren" in lower_attrs(entries["Projects.2024"][0]), str(r)
        assert "\\hasnochildren" in lower_attrs(entries["Projects.2024.Q1"][0]), str(r)
        assert "\\hasnochildren" in lower_attrs(entries["Sent"][0]), str(r)
        assert "\\noselect" not in lower_attrs(entries["Projects"][0]), "parents must be real folders"
        r = c.ok('LIST "" ""')
        lines = r.with_prefix(b"LIST ")
        assert len(lines) == 1, str(r)
        attrs, delim, name = parse_data(lines[0])
        assert delim == b"." and name == b"", f'LIST "" "" must give the separator:\n{r}'
        top = list_entries(c.ok('LIST "" "%"'))
        assert "Projects" in top and "Projects.2024" not in top and "INBOX" in top, top
        sub = list_entries(c.ok('LIST "Projects." "%"'))
        assert set(sub) == {"Projects.2024"}, sub
        sub = list_entries(c.ok('LIST "" "Projects.*"'))
        assert set(sub) == {"Projects.2024", "Projects.2024.Q1"}, sub
        inbox = list_entries(c.ok('LIST "" "inbox"'))
        assert set(inbox) == {"INBOX"}, f"INBOX is case-insensitive: {inbox}"
        # LIST-EXTENDED: several patterns, selection and return options.
        multi = list_entries(c.ok('LIST "" ("INBOX" "Sent")'))
        assert set(multi) == {"INBOX", "Sent"}, multi
        ret = list_entries(c.ok('LIST "" "*" RETURN (CHILDREN)'))
        assert "\\haschildren" in lower_attrs(ret["Projects"][0]), ret
        c.ok("SUBSCRIBE Projects.2024")
        subscribed = list_entries(c.ok('LIST (SUBSCRIBED) "" "*"'))
        assert "Projects.2024" in subscribed and "Projects" not in subscribed, subscribed
        assert "\\subscribed" in lower_attrs(subscribed["Projects.2024"][0]), subscribed
    finally:
        c.close()


def test_subscribe_lsub_unsubscribe(imap_server):
    user = new_user(imap_server, "sub")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Reading")
        before = list_entries(c.ok('LSUB "" "*"'), b"LSUB")
        assert "INBOX" in before and "Reading" not in before, before
        c.ok("SUBSCRIBE Reading")
        after = list_entries(c.ok('LSUB "" "*"'), b"LSUB")
        assert "Reading" in after and after["Reading"][1] == b".", after
        c.ok("UNSUBSCRIBE Reading")
        again = list_entries(c.ok('LSUB "" "*"'), b"LSUB")
        assert "Reading" not in again, again
        assert c.command("FROB").status == "BAD"
    finally:
        c.close()


def test_create_nested_creates_parents(imap_server):
    user = new_user(imap_server, "create")
    maildir = imap_server.maildir(user)
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE a.b.c")
        entries = list_entries(c.ok('LIST "" "a*"'))
        assert set(entries) == {"a", "a.b", "a.b.c"}, entries
        for name in ("a", "a.b", "a.b.c"):
            assert (maildir / f".{name}" / "cur").is_dir(), f"no Maildir++ directory .{name}"
            c.select(name)
        r = c.command("CREATE a.b")
        assert r.status == "NO", f"CREATE of an existing mailbox:\n{r}"
        r = c.command("CREATE INBOX")
        assert r.status == "NO", f"CREATE INBOX:\n{r}"
        c.ok("CREATE Trailing.")
        assert "Trailing" in list_entries(c.ok('LIST "" "Trailing"')), "CREATE 'Trailing.'"
        c.ok('CREATE "Entw&APw-rfe"')
        assert "Entw&APw-rfe" in list_entries(c.ok('LIST "" "Entw*"'))
        assert (maildir / ".Entw&APw-rfe").is_dir(), "modified UTF-7 name on disk"
    finally:
        c.close()


def test_created_name_is_listed_as_given(imap_server):
    """Mailbox names are modified UTF-7 on the wire (RFC 3501 5.1.3): a name that is
    accepted comes back from LIST exactly as the client wrote it."""
    user = new_user(imap_server, "mutf7")
    c = RawIMAP.login(imap_server, user)
    wrong = []
    try:
        for name in ("Entw&APw-rfe", "Tom &- Jerry", "&AC8-etc", "a&b", "&Jjo"):
            r = c.command_parts([b"CREATE ", Lit(name.encode())])
            if r.status != "OK":
                continue  # refusing an invalid modified UTF-7 name is fine
            r = c.command_parts([b'LIST "" ', Lit(name.encode())])
            listed = list(list_entries(r))
            if listed != [name]:
                wrong.append(f"CREATE {name!r} answered OK, LIST {name!r} gives {listed}")
    finally:
        c.close()
    assert not wrong, "\n".join(wrong)


def test_rename_moves_children(imap_server):
    user = new_user(imap_server, "rename")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Old.Child")
        assert c.append("Old", msg("in-old")).status == "OK"
        assert c.append("Old.Child", msg("in-child")).status == "OK"
        c.ok("RENAME Old New")
        entries = list_entries(c.ok('LIST "" "*"'))
        assert "New" in entries and "New.Child" in entries, entries
        assert "Old" not in entries and "Old.Child" not in entries, entries
        c.select("New")
        assert list(message_ids(c).values()) == ["<min-old@remote.test>"]
        c.select("New.Child")
        assert list(message_ids(c).values()) == ["<min-child@remote.test>"]
        r = c.command("SELECT Old")
        assert r.status == "NO", str(r)
        r = c.command("RENAME NoSuchFolder Other")
        assert r.status == "NO", str(r)
        r = c.command("RENAME New Sent")
        assert r.status == "NO", f"RENAME onto an existing mailbox:\n{r}"
    finally:
        c.close()


def test_rename_inbox(imap_server):
    user = new_user(imap_server, "renin")
    deliver(imap_server, user, msgid="<inbox-1@remote.test>")
    deliver(imap_server, user, msgid="<inbox-2@remote.test>")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("RENAME INBOX Saved")
        c.select("Saved")
        assert sorted(message_ids(c).values()) == ["<inbox-1@remote.test>", "<inbox-2@remote.test>"]
        r = c.select("INBOX")
        assert r.numbers(b"EXISTS") == [0], f"INBOX not empty after RENAME INBOX:\n{r}"
        entries = list_entries(c.ok('LIST "" "*"'))
        assert "INBOX" in entries and "Saved" in entries, entries
        deliver(imap_server, user, msgid="<inbox-3@remote.test>")
        c.ok("NOOP")
        assert list(message_ids(c).values()) == ["<inbox-3@remote.test>"]
    finally:
        c.close()


def test_delete(imap_server):
    user = new_user(imap_server, "delete")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Scratch")
        assert c.append("Scratch", msg(1)).status == "OK"
        c.ok("DELETE Scratch")
        assert "Scratch" not in list_entries(c.ok('LIST "" "*"'))
        assert not (imap_server.maildir(user) / ".Scratch").exists()
        assert c.command("SELECT Scratch").status == "NO"
        assert c.command("DELETE Scratch").status == "NO"
        r = c.command("DELETE INBOX")
        assert r.status == "NO", f"DELETE INBOX:\n{r}"
        c.select("INBOX", examine=True)
        # A name with children and no folder of its own (RFC 9051 7.1)
        c.ok("CREATE Parent.Child")
        c.ok("DELETE Parent")
        r = c.command("DELETE Parent")
        assert r.status == "NO" and r.code == b"HASCHILDREN", str(r)
        r = c.command("STATUS INBOX ()")   # at least one item (RFC 3501 9)
        assert r.status == "BAD", str(r)
    finally:
        c.close()


def test_selected_mailbox_deleted_by_another_session_ends_the_session(imap_server):
    """As Dovecot: a BYE and the end of the connection, not a session whose NOOP, CHECK,
    CLOSE and EXPUNGE all fail from then on."""
    user = new_user(imap_server, "delsel")
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user)
    idle = RawIMAP.login(imap_server, user)
    try:
        a.ok("CREATE Gone")
        assert a.append("Gone", msg(1)).status == "OK"
        b.select("Gone")
        idle.select("Gone")
        idle.send(b"i1 IDLE\r\n")
        assert idle.wait_for(rb"^\+ ", 5)[0] is not None
        a.ok("DELETE Gone")
        r = b.command("NOOP")
        assert any(u.startswith(b"BYE ") for u in r.untagged), str(r)
        assert b.closed_by_server()
        line, seen = idle.wait_for(rb"^\* BYE ", 5)
        assert line is not None, seen
        assert idle.closed_by_server()
        # The same name made again is a new folder, which a new session sees as such.
        a.ok("CREATE Gone")
        c = RawIMAP.login(imap_server, user)
        r = c.select("Gone")
        assert r.numbers(b"EXISTS") == [0], str(r)
        c.close()
    finally:
        for conn in (a, b, idle):
            conn.close()


def test_selected_mailbox_deleted_on_disk_ends_the_session(imap_server):
    """Removed by another process (not through this server): found at the next command."""
    import shutil

    user = new_user(imap_server, "delsel2")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Away")
        assert c.append("Away", msg(1)).status == "OK"
        c.select("Away")
        shutil.rmtree(imap_server.maildir(user) / ".Away")
        r = c.command("NOOP")
        assert r.status == "NO", str(r)
        line, seen = c.wait_for(rb"^\* BYE ", 5)
        assert line is not None, seen
        assert c.closed_by_server()
    finally:
        c.close()


def test_selected_mailbox_deleted_on_disk_during_idle_ends_the_session(imap_server):
    """IDLE's look for outside changes found the folder gone: BYE then, not a stopped
    look and an idling client told nothing until it sent DONE."""
    import shutil

    user = new_user(imap_server, "delidle")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Away")
        c.select("Away")
        c.send(b"i1 IDLE\r\n")
        assert c.wait_for(rb"^\+ ", 5)[0] is not None
        shutil.rmtree(imap_server.maildir(user) / ".Away")
        line, seen = c.wait_for(rb"^\* BYE ", 15)   # within a poll period or two
        assert line is not None, seen
        assert c.closed_by_server()
    finally:
        c.close()


def _three_messages_renumbered(c: RawIMAP, maildir) -> int:
    """Three messages appended and INBOX selected; then, as another process would, the
    uid list replaced by one with the next UIDVALIDITY and the uids in reverse order.
    Returns the UIDVALIDITY before."""
    import time

    for i in range(3):
        assert c.append("INBOX", msg(i)).status == "OK"
    c.select("INBOX")
    uidlist = maildir / "dovecot-uidlist"
    lines = uidlist.read_text().splitlines()
    head = lines[0].split()
    v = next(int(h[1:]) for h in head if h.startswith("V"))
    head = [f"V{v + 1}" if h.startswith("V") else h for h in head]
    names = [line.split(" ", 1)[1] for line in lines[1:]][::-1]
    time.sleep(1.1)   # a new mtime
    new = uidlist.with_name("uidlist.new")
    new.write_text(" ".join(head) + "\n"
                   + "".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    new.rename(uidlist)
    return v


def test_uidvalidity_changed_by_another_process_ends_the_session(imap_server):
    """Another process rewrote the uid list with a new UIDVALIDITY (and the uids in
    another order): the client's uids may name other messages now (RFC 3501 2.3.1.1).
    It got EXPUNGEs and EXISTS and kept its UIDVALIDITY, so uid 1 was another message
    under the same UIDVALIDITY; now BYE, and a new session sees the new UIDVALIDITY."""
    user = new_user(imap_server, "uidv")
    c = RawIMAP.login(imap_server, user)
    try:
        v = _three_messages_renumbered(c, imap_server.maildir(user))
        r = c.command("NOOP")
        assert any(u.startswith(b"BYE ") for u in r.untagged), str(r)
        assert c.closed_by_server()
        fresh = RawIMAP.login(imap_server, user)
        try:
            r = fresh.command("STATUS INBOX (UIDVALIDITY MESSAGES)")
            assert b"UIDVALIDITY %d" % (v + 1) in b" ".join(r.untagged), str(r)
        finally:
            fresh.close()
    finally:
        c.close()


def test_store_across_a_uidvalidity_change_touches_no_other_message(imap_server):
    """STORE looks at the files first; when that look found the folder renumbered by
    another process, the STORE went on with the old uids on the new list and flagged
    another message (then failed on the closed selection)."""
    user = new_user(imap_server, "uidvs")
    c = RawIMAP.login(imap_server, user)
    try:
        _three_messages_renumbered(c, imap_server.maildir(user))
        r = c.command("UID STORE 1 +FLAGS (\\Deleted)")   # uid 1 was message 0
        assert r.status != "OK" or any(u.startswith(b"BYE ") for u in r.untagged), str(r)
    finally:
        c.close()
    first = msg(0).split(b"\r\n\r\n")[0]
    for path in (imap_server.maildir(user) / "cur").iterdir():
        if "T" in path.name.partition(":2,")[2]:
            assert path.read_bytes().startswith(first), path.name
    assert "object has no attribute 'by_uid'" not in imap_server.log_text()


def test_delete_closes_the_selection_by_folder_not_by_name(imap_server):
    """The selection follows a RENAME: DELETE of a new folder under the old name leaves it
    alone, DELETE under the new name (any INBOX case) closes it."""
    user = new_user(imap_server, "delren")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE C1")
        assert c.append("C1", msg(1)).status == "OK"
        c.select("C1")
        c.ok("RENAME C1 C2")
        c.ok("CREATE C1")
        r = c.ok("DELETE C1")
        assert "CLOSED" not in r.codes(), str(r)
        assert c.command("FETCH 1 (UID)").status == "OK"   # still selected: C2
        r = c.ok("DELETE C2")
        assert "CLOSED" in r.codes(), str(r)
        assert c.command("FETCH 1 (UID)").status == "BAD"  # not selected any more
        c.ok("CREATE INBOX.x")
        c.select("inbox.x")
        r = c.ok("DELETE INBOX.x")
        assert "CLOSED" in r.codes(), str(r)
        assert c.command("NOOP").status == "OK"
    finally:
        c.close()


def test_append_to_a_mailbox_deleted_while_its_literal_comes_is_trycreate(imap_server):
    """RFC 3501 6.3.11: [TRYCREATE] whenever the mailbox does not exist, also when it was
    deleted after the check made before the literal."""
    user = new_user(imap_server, "appgone")
    a = RawIMAP.login(imap_server, user)
    b = RawIMAP.login(imap_server, user)
    try:
        a.ok("CREATE Gone")
        body = msg(1)
        a.send(b"t1 APPEND Gone {%d}\r\n" % len(body))
        line, seen = a.wait_for(rb"^\+", 5)
        assert line is not None, seen
        b.ok("DELETE Gone")
        a.send(body + b"\r\n")
        line, seen = a.wait_for(rb"^t1 ", 5)
        assert line is not None and line.startswith(b"t1 NO [TRYCREATE]"), seen
        assert not (imap_server.maildir(user) / ".Gone").exists()
    finally:
        a.close()
        b.close()


def test_catenate_relative_url_follows_a_renamed_selection(imap_server):
    """A relative URL (;UID=n) means the selected mailbox, under whatever name it has now,
    not a new mailbox made under its old name."""
    user = new_user(imap_server, "catren")
    a = RawIMAP.login(imap_server, user)
    other = RawIMAP.login(imap_server, user)
    try:
        a.ok("CREATE R1")
        assert a.append("R1", msg("first")).status == "OK"
        a.select("R1")
        other.ok("RENAME R1 R2")
        other.ok("CREATE R1")
        assert other.append("R1", msg("second")).status == "OK"
        r = a.command('APPEND Drafts CATENATE (URL ";UID=1")')
        assert r.status == "OK", str(r)
        a.select("Drafts")
        assert list(message_ids(a).values()) == ["<mfirst@remote.test>"]
    finally:
        a.close()
        other.close()


def test_folder_names_without_controls_or_separators_and_in_nfc(imap_server):
    """RFC 6855 3 / RFC 9051 5.1, for clients of every kind: no C1 controls, no U+2028 or
    U+2029, and new names in NFC (else an IMAP4rev2 client could not reach them)."""
    user = new_user(imap_server, "names")
    c = RawIMAP.login(imap_server, user)
    try:
        for name in ('"x&AIU-y"', '"&ICg-"', '"&ICk-"', '"e&AwE-"'):   # U+0085, 2028, 2029, NFD
            r = c.command(f"CREATE {name}")
            assert r.status == "NO", (name, str(r))
        c.ok('CREATE "&AOk-"')   # é precomposed: NFC
        r = c.command('RENAME "&AOk-" "e&AwE-"')
        assert r.status == "NO", str(r)
        assert "&AOk-" in list_entries(c.ok('LIST "" "*"'))
    finally:
        c.close()


# -- extensions -------------------------------------------------------------------------------

def test_special_use(imap_server):
    user = new_user(imap_server, "special")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Ordinary")
        entries = list_entries(c.ok('LIST "" "*"'))
        for name, attr in SPECIAL_USE.items():
            assert attr.lower() in lower_attrs(entries[name][0]), (name, entries[name])
        assert not lower_attrs(entries["Ordinary"][0]) & {a.lower() for a in SPECIAL_USE.values()}
        only = list_entries(c.ok('LIST (SPECIAL-USE) "" "*"'))
        assert set(only) == set(SPECIAL_USE), f"LIST (SPECIAL-USE): {only}"
        ret = list_entries(c.ok('LIST "" "*" RETURN (SPECIAL-USE)'))
        assert "\\sent" in lower_attrs(ret["Sent"][0]), ret
    finally:
        c.close()


def test_list_status(imap_server):
    user = new_user(imap_server, "lstatus")
    c = RawIMAP.login(imap_server, user)
    try:
        c.ok("CREATE Parent.Kid")
        assert c.append("INBOX", msg(1), flags="\\Seen").status == "OK"
        assert c.append("INBOX", msg(2)).status == "OK"
        assert c.append("Parent.Kid", msg(3)).status == "OK"
        r = c.ok('LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN))')
        entries = list_entries(r)
        statuses = status_values(r)
        selectable = [n for n, (attrs, _) in entries.items()
                      if not lower_attrs(attrs) & {"\\noselect", "\\nonexistent"}]
        assert set(selectable) <= set(statuses), f"STATUS missing for {set(selectable) - set(statuses)}:\n{r}"
        assert statuses["INBOX"] == {"MESSAGES": 2, "UNSEEN": 1}, statuses["INBOX"]
        assert statuses["Parent.Kid"] == {"MESSAGES": 1, "UNSEEN": 1}, statuses
        assert statuses["Sent"] == {"MESSAGES": 0, "UNSEEN": 0}, statuses
    finally:
        c.close()


def test_move_and_uid_move(imap_server):
    user = new_user(imap_server, "move")
    c = RawIMAP.login(imap_server, user)
    try:
        for i in range(1, 5):
            assert c.append("INBOX", msg(i)).status == "OK"
        c.select("INBOX")
        uids = c.command("UID SEARCH ALL").search()
        r = c.ok("MOVE 2 Archive")
        copyuid = [u for u in r.untagged if re.match(rb"OK \[COPYUID ", u, re.I)]
        assert copyuid, f"MOVE without an untagged OK [COPYUID ...] (RFC 6851):\n{r}"
        code = copyuid[0].split(b"[", 1)[1].split(b"]", 1)[0].split()
        assert int(code[2]) == uids[1], f"COPYUID source uid:\n{r}"
        moved_to = int(code[3])
        assert r.numbers(b"EXPUNGE") == [2], f"MOVE must expunge message 2:\n{r}"
        assert c.command("UID SEARCH ALL").search() == [uids[0], uids[2], uids[3]]
        r = c.ok(f"UID MOVE {uids[2]}:{uids[3]} Archive")
        assert any(re.match(rb"OK \[COPYUID ", u, re.I) for u in r.untagged), str(r)
        view = [1, 2, 3]
        for n in r.numbers(b"EXPUNGE"):
            del view[n - 1]
        assert view == [1], f"UID MOVE expunges:\n{r}"
        r = c.command("MOVE 1 NoSuchFolder")
        assert r.status == "NO" and r.code == b"TRYCREATE", str(r)
        r = c.select("Archive")
        ids = message_ids(c, uid=True)
        assert ids.get(moved_to) == "<m2@remote.test>", ids
        assert sorted(ids.values()) == ["<m2@remote.test>", "<m3@remote.test>", "<m4@remote.test>"]
        c.select("INBOX")
        assert list(message_ids(c).values()) == ["<m1@remote.test>"]
    finally:
        c.close()


def test_quota(imap_server):
    user = new_user(imap_server, "quota", quota="1M")
    deliver(imap_server, user, body=b"x" * 3000 + b"\r\n")
    c = RawIMAP.login(imap_server, user)
    try:
        r = c.ok("GETQUOTAROOT INBOX")
        roots = r.with_prefix(b"QUOTAROOT ")
        assert roots, f"no * QUOTAROOT:\n{r}"
        root_names = parse_data(roots[0])
        assert bytes(root_names[0]).upper() == b"INBOX" and len(root_names) >= 2, str(r)
        quotas = r.with_prefix(b"QUOTA ")
        assert quotas, f"no * QUOTA:\n{r}"
        qroot, resources = parse_data(quotas[0])
        assert bytes(qroot) == bytes(root_names[1]), str(r)
        res = {bytes(resources[i]).upper(): (as_int(resources[i + 1]), as_int(resources[i + 2]))
               for i in range(0, len(resources), 3)}
        used, limit = res[b"STORAGE"]
        assert limit == 1024, f"limit in KiB for a 1M quota: {res}"
        on_disk = sum(p.stat().st_size for p in message_files(imap_server.maildir(user)))
        assert abs(used - on_disk / 1024) <= 2, (used, on_disk)
        # GETQUOTA on the root agrees.
        r = c.ok(b"GETQUOTA " + (b'"' + bytes(qroot) + b'"'))
        assert r.with_prefix(b"QUOTA "), str(r)
        # Fill up to the limit: 600 KB fits, a second 600 KB does not.
        big = msg("big1", 600 * 1024)
        r = c.append("INBOX", big)
        assert r.status == "OK", f"APPEND within the quota:\n{r}"
        r = c.append("INBOX", msg("big2", 600 * 1024))
        assert r.status == "NO" and r.code == b"OVERQUOTA", f"APPEND over the quota:\n{r}"
        r = c.append("Sent", msg("big3", 2 * 1024 * 1024), non_sync=True)
        assert r.status == "NO", f"non-synchronising APPEND over the quota:\n{r}"
        assert c.command("NOOP").status == "OK", "session lost after an over-quota APPEND"
        c.select("INBOX")
        assert c.command("SEARCH ALL").search() == [1, 2], "an over-quota APPEND stored something"
    finally:
        c.close()
    # A user without a quota: no quota root limits, and no OVERQUOTA.
    c = RawIMAP.login(imap_server, new_user(imap_server, "noquota"))
    try:
        r = c.command("GETQUOTAROOT INBOX")
        assert r.status == "OK", str(r)
        assert not any(b"STORAGE" in q for q in r.with_prefix(b"QUOTA ")), str(r)
    finally:
        c.close()
