"""A deterministic mail corpus written straight into a Maildir's cur/.

    python bench/corpus.py --count 10000 DIR      # writes DIR/{cur,new,tmp} and DIR/manifest.json

Message i depends only on (seed, i), so the first 10,000 messages of the 100,000 corpus are the
10,000 corpus.  Messages are plain text, multipart/alternative (text + HTML) or
multipart/mixed with a base64 attachment, 2 to 50 KB (log-uniform), with CRLF line ends (as
this server stores mail), varied headers (display names, encoded words, Cc, Reply-To,
In-Reply-To/References, List-Id, 1-4 Received, time zones), and about 70% of them \\Seen.

File names are Dovecot-style `<secs>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size>:2,<flags>`
(W= equals S= since the files are CRLF already); the file's mtime (the IMAP internal date) is
<secs>.  Seconds grow with i, so every server that sorts new files by name gives message i
UID i+1.  No index, no dovecot-uidlist: each server builds its own on first open.

manifest.json lists what the load generators check the answers against: the size and flags
of every message, which subjects hold the search word, and the message count.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

VERSION = 2
DEFAULT_SEED = 6
T0 = 1_700_000_000          # the first message's internal date
SEARCH_WORD = "zanzibar"     # in about 2% of the subjects, never inside another word
HOST = "corpus.example.test"

WORDS = """the of and to in is was for that with as on by at from his it an were are which
this be or has had first one their its new after who they have her she two been other when
there all during into school time may years more most only over city some world would where
later up such used many can state about national out known university united then made
team between states under first following group american three family game film both music
war season several became called well number county series south part north league early
system same people area city river played album best year second high around different
against north life new government club public while work series place life until since
power company three including york band law including water common small large total four
meeting report budget review quarter draft schedule invoice project update agenda notes
server message client delivery folder backup network storage release patch ticket issue
summary question answer lunch travel contract office proposal design feedback""".split()
NAMES = ["Alice Martin", "Bob Durand", "Carol Smith", "David Brown", "Eve Johnson",
         "Frank Miller", "Grace Lee", "Heidi Schmidt", "Ivan Petrov", "Judy Garcia",
         "Mallory White", "Niaj Kumar", "Olivia Rossi", "Peggy Dubois", "Rupert Young",
         "Sybil Novak", "Trent Walker", "Victor Hugo", "Walter Kim", "Zoe Moreau"]
UTF8_NAMES = ["Jürgen Groß", "Zoë Faßbender", "Łukasz Żółw", "Renée Côté", "Søren Ærø"]
UTF8_WORDS = ["Grüße", "café", "naïve", "Übersicht", "réunion", "déjà", "Straße", "crème"]
DOMAINS = ["example.org", "example.net", "corp.example.com", "lists.example.org",
           "mail.example.edu"]
TIMEZONES = [0, 60, 120, -300, -420, 330, 540, -180]


def _q_encode(text: str) -> str:
    out = []
    for b in text.encode():
        c = chr(b)
        if c == " ":
            out.append("_")
        elif c.isalnum() and b < 128:
            out.append(c)
        else:
            out.append(f"={b:02X}")
    return "=?UTF-8?Q?" + "".join(out) + "?="


def _b_encode(text: str) -> str:
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="


def _address(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    local = name.lower().replace(" ", ".")
    addr = f"{local}@{rng.choice(DOMAINS)}"
    kind = rng.random()
    if kind < 0.15:
        return f"{_q_encode(rng.choice(UTF8_NAMES))} <{addr}>"
    if kind < 0.3:
        return addr
    if kind < 0.4:
        return f'"{name.split()[1]}, {name.split()[0]}" <{addr}>'
    return f"{name} <{addr}>"


def _subject(rng: random.Random, marked: bool) -> str:
    words = rng.choices(WORDS, k=rng.randint(3, 8))
    if marked:
        words.insert(rng.randint(0, len(words)), SEARCH_WORD)
    text = " ".join(words).capitalize()
    prefix = rng.choices(["", "Re: ", "Fwd: ", "RE: Re: "], weights=[70, 20, 7, 3])[0]
    kind = rng.random()
    if kind < 0.1:
        return prefix + _q_encode(text + " " + rng.choice(UTF8_WORDS))
    if kind < 0.15 and not marked:
        return prefix + _b_encode(rng.choice(UTF8_WORDS) + " " + text)
    return prefix + text


def _text(rng: random.Random, size: int) -> list[str]:
    lines: list[str] = []
    total = 0
    while total < size:
        n = rng.randint(6, 13)
        line = " ".join(rng.choices(WORDS, k=n))
        if rng.random() < 0.08:
            lines.append("")
            total += 2
        if rng.random() < 0.01:
            line = "." + line   # a line that SMTP and POP3 must dot-stuff
        lines.append(line)
        total += len(line) + 2
    return lines


def _date(rng: random.Random, ts: int) -> str:
    offset = rng.choice(TIMEZONES)
    tz = timezone(timedelta(minutes=offset))
    dt = datetime.fromtimestamp(ts - rng.randint(5, 900), tz)
    return dt.strftime("%a, %d %b %Y %H:%M:%S ") + dt.strftime("%z")


def message(seed: int, i: int) -> tuple[bytes, str, bool]:
    """(contents with CRLF, flags, subject holds SEARCH_WORD) of message i."""
    rng = random.Random(f"{seed}:{i}")
    target = int(math.exp(rng.uniform(math.log(2048), math.log(50 * 1024))))
    marked = rng.random() < 0.02
    r = rng.random()
    flags = "".join(sorted(
        ("S" if r < 0.7 else "") + ("F" if rng.random() < 0.05 else "")
        + ("R" if r < 0.7 and rng.random() < 0.12 else "")))
    ts = T0 + i
    head = []
    for hop in range(rng.randint(1, 4)):
        head.append(f"Received: from mx{hop}.{rng.choice(DOMAINS)} (mx{hop}.{rng.choice(DOMAINS)}"
                    f" [192.0.2.{rng.randint(1, 254)}])\r\n\tby {HOST} with ESMTPS id "
                    f"{rng.getrandbits(48):012X}\r\n\tfor <bench@example.test>; {_date(rng, ts)}")
    head.append(f"Return-Path: <{_address(rng).split('<')[-1].rstrip('>')}>")
    head.append(f"From: {_address(rng)}")
    head.append("To: " + ", ".join(_address(rng) for _ in range(rng.randint(1, 3))))
    if rng.random() < 0.25:
        head.append("Cc: " + ", ".join(_address(rng) for _ in range(rng.randint(1, 4))))
    if rng.random() < 0.1:
        head.append(f"Reply-To: {_address(rng)}")
    head.append(f"Subject: {_subject(rng, marked)}")
    head.append(f"Date: {_date(rng, ts)}")
    head.append(f"Message-ID: <{i}.{seed}.{rng.getrandbits(32):08x}@{HOST}>")
    if rng.random() < 0.3:
        parent = f"<{rng.randrange(max(i, 1))}.{seed}.parent@{HOST}>"
        head.append(f"In-Reply-To: {parent}")
        head.append(f"References: <{rng.getrandbits(40):x}@{rng.choice(DOMAINS)}> {parent}")
    if rng.random() < 0.2:
        head.append(f"List-Id: Team list <team{rng.randint(1, 9)}.{rng.choice(DOMAINS)}>")
    if rng.random() < 0.5:
        head.append(f"X-Mailer: {rng.choice(['Thunderbird 115.3', 'Evolution 3.48', 'mutt 2.2'])}")
    head.append("MIME-Version: 1.0")

    kind = rng.random()
    body: list[str]
    target -= sum(len(h) + 2 for h in head) + 120  # what the body still needs to add
    if kind < 0.6:
        head.append("Content-Type: text/plain; charset=utf-8; format=flowed")
        head.append("Content-Transfer-Encoding: 8bit")
        body = _text(rng, target)
    elif kind < 0.85:
        boundary = f"=_alt_{rng.getrandbits(64):016x}"
        head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        text = _text(rng, (target - 200) // 2)
        body = ["This is a multi-part message in MIME format.", "", f"--{boundary}",
                "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 7bit", "",
                *text, "", f"--{boundary}", "Content-Type: text/html; charset=utf-8",
                "Content-Transfer-Encoding: 7bit", "", "<html><body>",
                *(f"<p>{line}</p>" if line else "" for line in text),
                "</body></html>", f"--{boundary}--", ""]
    else:
        boundary = f"=_mix_{rng.getrandbits(64):016x}"
        head.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        text = _text(rng, min(2000, target // 4))
        raw = rng.randbytes(max(256, (target - 400 - min(2000, target // 4)) * 3 // 4))
        encoded = base64.encodebytes(raw).decode().splitlines()
        name = f"{rng.choice(WORDS)}-{i}.{rng.choice(['pdf', 'png', 'zip'])}"
        ctype = {"pdf": "application/pdf", "png": "image/png", "zip": "application/zip"}[name[-3:]]
        body = ["This is a multi-part message in MIME format.", "", f"--{boundary}",
                "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 7bit", "",
                *text, "", f"--{boundary}", f'Content-Type: {ctype}; name="{name}"',
                f'Content-Disposition: attachment; filename="{name}"',
                "Content-Transfer-Encoding: base64", "", *encoded, f"--{boundary}--", ""]
    data = ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode()
    return data, flags, marked


def file_name(i: int, size: int, flags: str) -> str:
    return (f"{T0 + i}.M{(i * 7919) % 1000000}P{1000 + i % 30000}Q{i}.{HOST}"
            f",S={size},W={size}:2,{flags}")


def _write_range(args: tuple[str, int, int, int]) -> list[tuple[int, int, str, bool]]:
    directory, seed, start, stop = args
    cur = Path(directory) / "cur"
    out = []
    for i in range(start, stop):
        data, flags, marked = message(seed, i)
        path = cur / file_name(i, len(data), flags)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.utime(path, (T0 + i, T0 + i))
        out.append((i, len(data), flags, marked))
    return out


def generate(directory: Path, count: int, seed: int = DEFAULT_SEED, workers: int | None = None,
             progress=None) -> dict:
    """Write `count` messages into directory/cur and return the manifest."""
    directory = Path(directory)
    for sub in ("cur", "new", "tmp"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    chunk = 2000
    ranges = [(str(directory), seed, s, min(s + chunk, count)) for s in range(0, count, chunk)]
    rows: list[tuple[int, int, str, bool]] = []
    if workers == 1 or count <= chunk:
        for r in ranges:
            rows.extend(_write_range(r))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_write_range, ranges):
                rows.extend(part)
                if progress:
                    progress(len(rows), count)
    rows.sort()
    manifest = {
        "version": VERSION, "seed": seed, "count": count, "search_word": SEARCH_WORD,
        "sizes": [r[1] for r in rows], "flags": [r[2] for r in rows],
        "marked": [r[0] for r in rows if r[3]],
        "unseen": sum(1 for r in rows if "S" not in r[2]),
        "total_bytes": sum(r[1] for r in rows),
        "names": [file_name(r[0], r[1], r[2]) for r in rows],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def cached(cache_root: Path, count: int, seed: int = DEFAULT_SEED, log=print) -> tuple[Path, dict]:
    """The corpus of `count` messages under cache_root, generated once and reused."""
    directory = Path(cache_root) / f"corpus-v{VERSION}-seed{seed}-{count}"
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("count") == count and len(os.listdir(directory / "cur")) == count:
            return directory, manifest
    if directory.exists():
        shutil.rmtree(directory)
    t0 = time.monotonic()
    log(f"generating a {count}-message corpus in {directory} (once; reused later)")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            log(f"  corpus: {done}/{total}")

    manifest = generate(directory, count, seed, progress=progress)
    log(f"corpus of {count} messages ({manifest['total_bytes'] / 1e6:.0f} MB) written in "
        f"{time.monotonic() - t0:.1f}s")
    return directory, manifest


def link_into(corpus_dir: Path, manifest: dict, maildir: Path, count: int | None = None,
              lf: bool = False) -> None:
    """Hard-link the corpus's message files into maildir/cur (creating cur, new, tmp).

    Links share the files' contents (no copy), but each Maildir has its own names, so a
    server renaming a file to change its flags does not touch the corpus or another copy.
    With `lf`, the files are copied with LF line ends instead (for a server whose Maildir
    files are LF-only), named with the LF size in S= and the CRLF size in W=.

    Either way every file's contents end up in the page cache: a copy was just written,
    and a link is read once.  Otherwise a server given links would read from the disk
    what the other reads from memory, whenever the corpus had left the cache since its
    last use (the first POP3 session of a run then took 2.5 s instead of 1.6).
    """
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    src, dst = corpus_dir / "cur", maildir / "cur"
    names = manifest["names"] if count is None else manifest["names"][:count]
    for name in names:
        if not lf:
            os.link(src / name, dst / name)
            (dst / name).read_bytes()  # into the page cache (see above)
            continue
        data = (src / name).read_bytes().replace(b"\r\n", b"\n")
        base, _, flags = name.partition(":2,")
        head = base.split(",S=")[0]
        crlf = base.split(",W=")[1]
        target = dst / f"{head},S={len(data)},W={crlf}:2,{flags}"
        target.write_bytes(data)
        st = (src / name).stat()
        os.utime(target, (st.st_mtime, st.st_mtime))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    t0 = time.monotonic()
    m = generate(args.directory, args.count, args.seed, args.workers)
    print(f"{m['count']} messages, {m['total_bytes']} bytes, {m['unseen']} unseen, "
          f"{len(m['marked'])} with '{SEARCH_WORD}' in the subject, "
          f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def started_server(cls: Any, directory: Path, user: str, corpus_dir: Path,
                   manifest: dict) -> Any:
    """A server of `cls` (bench/servers.py) in `directory`, with the corpus in `user`'s
    Maildir, started; None (said on stdout) when it cannot run on this machine."""
    from common import Unavailable  # noqa: PLC0415 (the servers' module, not the corpus's)

    srv = cls(directory)
    try:
        srv.check()
    except Unavailable as e:
        print(f"{cls.key}: not runnable: {e}")
        return None
    srv.setup([user])
    link_into(corpus_dir, manifest, srv.maildir(user), lf=cls.lf_maildir)
    srv.start()
    return srv


def servers_in_turn(keys: list[str], classes: dict[str, Any], workdir: Path, prefix: str,
                    user: str, corpus_dir: Path, manifest: dict) -> Iterator[tuple[str, Any]]:
    """(key, server) for each runnable server of `keys` in turn, started in
    workdir/<prefix>-<key> with the corpus in `user`'s Maildir; stopped and its directory
    removed once the caller moves on to the next (or leaves the loop)."""
    for key in keys:
        srv = started_server(classes[key], workdir / f"{prefix}-{key}", user, corpus_dir,
                             manifest)
        if srv is None:
            continue
        try:
            yield key, srv
        finally:
            srv.stop()
            shutil.rmtree(srv.dir, ignore_errors=True)
