"""A minimal durable SMTP receiver on aiosmtpd: the benchmark's "plain asyncio" anchor.

    python bench/anchors/aiosmtpd_maildir.py --port PORT --root DIR --domain example.test \
        --users bench,other

Accepts RCPT only for the listed users of the domain (550 otherwise) and delivers each
message like this server does: write to <root>/<domain>/<user>/tmp/, fsync, rename into
new/, fsync new/, and only then "250".  The blocking file work runs in the default thread
pool so that several deliveries overlap.  Needs aiosmtpd (bench/requirements.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import time

from aiosmtpd.smtp import SMTP

_counter = itertools.count()
_host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(maildir: str, data: bytes) -> str:
    secs, nanos = divmod(time.time_ns(), 1_000_000_000)
    base = f"{secs}.M{nanos // 1000}P{os.getpid()}Q{next(_counter)}.{_host}"
    tmp = os.path.join(maildir, "tmp", base)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = os.path.join(maildir, "new", f"{base},S={len(data)}")
    os.rename(tmp, final)
    _fsync_dir(os.path.join(maildir, "new"))
    return final


class MaildirHandler:
    def __init__(self, root: str, domain: str, users: set[str]) -> None:
        self.root = root
        self.domain = domain.lower()
        self.users = users
        for user in users:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(root, self.domain, user, sub), exist_ok=True)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain or local.lower() not in self.users:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode()
        header = f"Return-Path: <{envelope.mail_from}>\r\n".encode()
        loop = asyncio.get_running_loop()
        for rcpt in envelope.rcpt_tos:
            maildir = os.path.join(self.root, self.domain, rcpt.rpartition("@")[0].lower())
            await loop.run_in_executor(None, deliver, maildir, header + data)
        return "250 2.0.0 OK"


async def serve(args: argparse.Namespace) -> None:
    handler = MaildirHandler(args.root, args.domain, set(u.lower() for u in args.users.split(",")))
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(handler, hostname="aiosmtpd.bench.test", decode_data=False,
                    data_size_limit=52428800, ident="aiosmtpd bench anchor")

    server = await loop.create_server(factory, host="127.0.0.1", port=args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--users", required=True)
    asyncio.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
