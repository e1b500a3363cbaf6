"""`mailserver-admin sieve list|put|get|activate|delete`: a user's Sieve scripts, stored
exactly as ManageSieve stores them (mailserver.sieve.scripts: the same validation and
limits), in the user's Maildir, owned like the rest of it.

Nothing is cached anywhere: a running server's ManageSieve sessions read the scripts
from disk for every command, and delivery looks at the active script's stat() before
every message, so a change made here is seen at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import BinaryIO

from mailserver.config import Config
from mailserver.sieve import scripts


class SieveAdminError(Exception):
    """A refused command; the message is the one error line."""


def owner_for(config: Config) -> scripts.Owner | None:
    """Run as root, new files go to the owner of the maildir root (the server's user);
    otherwise they are ours already."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        st = config.maildir_root.stat()
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def run(config: Config, args: argparse.Namespace, address: str, user_path: Path) -> int:
    """One `sieve` action for the user whose Maildir is `user_path`."""
    limits = scripts.Limits.from_config(config.sieve)
    owner = owner_for(config)
    try:
        if args.action == "list":
            return _list(user_path)
        if args.action == "get":
            data = scripts.get_script(user_path, args.name)
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return 0
        if args.action == "put":
            content = _read(args.file, limits.max_script_size)
            warnings = scripts.put_script(user_path, args.name, content, limits,
                                          global_dir=config.sieve.global_dir, owner=owner)
            for warning in warnings:
                print(f"mailserver-admin: warning: {args.name}: {warning}", file=sys.stderr)
            print(f"script {args.name} stored for {address}")
            return 0
        if args.action == "activate":
            scripts.activate(user_path, args.name or "", owner=owner)
            print(f"script {args.name} is active for {address}" if args.name
                  else f"no script is active for {address}")
            return 0
        if args.action == "delete":
            scripts.delete_script(user_path, args.name)
            print(f"script {args.name} deleted for {address}")
            return 0
    except scripts.InvalidName as e:
        raise SieveAdminError(f"bad script name {args.name!r}: {e}") from None
    except scripts.InvalidScript as e:
        raise SieveAdminError(f"script {args.name!r} refused: line {e.line}: {e.reason}") from None
    except scripts.ScriptError as e:
        raise SieveAdminError(str(e)) from None
    raise SieveAdminError(f"unknown action {args.action!r}")


def _list(user_path: Path) -> int:
    for info in scripts.list_scripts(user_path):
        print(f"{info.name}  {info.size} bytes{'  active' if info.active else ''}")
    found = scripts.script_stat(user_path)
    if found is not None and found.name == "":
        print(f"({scripts.ACTIVE_LINK} is a regular file: it runs at delivery; the next "
              f"activate moves it to {scripts.SIEVE_DIR}/{scripts.RESCUED_NAME}"
              f"{scripts.SUFFIX})")
    return 0


def _read(source: str, limit: int) -> bytes:
    """The script from a file or standard input ("-"), at most `limit` + 1 octets read
    (one more tells that it is too large)."""
    if source == "-":
        return _read_bounded(sys.stdin.buffer, limit)
    try:
        with open(source, "rb") as f:
            return _read_bounded(f, limit)
    except OSError as e:
        raise SieveAdminError(f"{source}: {e.strerror or e}") from None


def _read_bounded(f: BinaryIO, limit: int) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise SieveAdminError(f"script larger than sieve.max_script_size ({limit} octets)")
    return data
