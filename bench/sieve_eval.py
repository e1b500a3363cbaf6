"""Sieve evaluation speed: a 50-rule script (header :contains, address :is / :domain, one
body :contains) on a 4 KB message, parsed once and evaluated many times.

    python bench/sieve_eval.py [--runs 2000]

Prints the CPU microseconds per evaluation (a fresh Message each time, so the header is
parsed and decoded anew) and the parse time.  A figure, not a test: machines differ.
"""

from __future__ import annotations

import argparse
import time

from mailserver.sieve.interpreter import Envelope, evaluate
from mailserver.sieve.message import Message
from mailserver.sieve.parser import parse


def script() -> str:
    rules = ['require ["fileinto", "body"];']
    for i in range(16):
        rules.append(f'if header :contains "subject" "project-{i}" {{ fileinto "Projects.p{i}"; stop; }}')
    for i in range(16):
        rules.append(f'if address :is "from" "person{i}@example.org" {{ fileinto "People.p{i}"; stop; }}')
    for i in range(17):
        rules.append(f'if address :domain :is ["to", "cc"] "list{i}.example.net" {{ fileinto "Lists.l{i}"; stop; }}')
    rules.append('if body :contains "unsubscribe-now-please" { fileinto "Junk"; stop; }')
    return "\n".join(rules) + "\n"


def message() -> bytes:
    header = (
        "Return-Path: <someone@example.com>\r\n"
        "Received: from mx.example.com (mx.example.com [192.0.2.1])\r\n"
        "\tby mail.example.net with ESMTPS id abc123\r\n"
        "\tfor <user@example.net>; Tue, 1 Apr 2025 09:06:31 +0000\r\n"
        "From: Someone Else <someone@example.com>\r\n"
        "To: User <user@example.net>, other@example.net\r\n"
        "Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.de>\r\n"
        "Subject: =?utf-8?q?Quarterly_r=C3=A9sum=C3=A9?= of the things we did\r\n"
        "Date: Tue, 1 Apr 2025 09:06:31 +0000\r\n"
        "Message-ID: <1234567890@example.com>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
    )
    line = "The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * ((4096 - len(header)) // len(line))
    return (header + "\r\n" + body).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    src = script()
    t0 = time.process_time()
    parsed = parse(src)
    parse_us = (time.process_time() - t0) * 1e6
    raw = message()
    env = Envelope("someone@example.com", "user@example.net", "user@example.net")
    result = evaluate([parsed], Message.from_bytes(raw), env)      # compiles once
    assert result.error is None, result.error
    t0 = time.process_time()
    for _ in range(args.runs):
        evaluate([parsed], Message.from_bytes(raw), env)
    per = (time.process_time() - t0) / args.runs * 1e6
    print(f"parse: {parse_us:.0f} us for {len(src)} bytes, 50 rules")
    print(f"evaluate: {per:.1f} us CPU per evaluation ({len(raw)}-byte message, {args.runs} runs)")
    print(f"actions: {result.actions}")


if __name__ == "__main__":
    main()
