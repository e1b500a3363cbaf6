#!/usr/bin/env python3
"""Measure this mail server and the anchors (Postfix, Dovecot, twistd mail, aiosmtpd) side by
side, in the same run, on the same corpus.

    python bench/run.py --quick                 # small counts, a few minutes
    python bench/run.py                         # the full sizes (10,000 and 100,000 messages)
    python bench/run.py --only smtp,pop3 --servers mailserver,postfix --runs 5
    python bench/run.py --only smtp --servers mailserver,mailserver-checks --smtp-sizes 4096
    python bench/run.py --quick --only smtp --smtp-single --servers mailserver,postfix,twistd-mail

Every server is started by the bench itself on 127.0.0.1 with a private configuration in a
temporary work directory, and stopped at the end.  An anchor that cannot run here (not
installed, not root...) is reported as "not runnable" with the reason; a service of this
server that does not answer yet is reported the same way.  "mailserver-checks" is this
server once more, with the MX's inbound checks (SPF, DKIM, DMARC, ARC) applied to the bench's
loopback clients, against a DNS server the bench starts on loopback; the report compares it
with the server without checks.  Tables go to stdout, raw results
to bench/results/<time>.json.

Anchors: apt-get install postfix dovecot-imapd dovecot-pop3d (for postfix choose "No
configuration"), pip install -r bench/requirements.txt.  The bench must run as root for the
Postfix and Dovecot anchors (their masters start as root and run the mail work as `nobody`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import corpus  # noqa: E402
import imap_bench  # noqa: E402
import memory_bench  # noqa: E402
import pop3_bench  # noqa: E402
import report  # noqa: E402
import servers as S  # noqa: E402
import smtp_bench  # noqa: E402
from common import Unavailable, log, system_busy_seconds  # noqa: E402

AREAS = ("smtp", "imap", "pop3", "memory")
DELETED_MARK = "last-deletion"   # touched when a bench has deleted its servers' directories
DELETIONS_SETTLE_S = 360         # how long ext4 keeps freed inodes out of allocation
PLANS = {
    "quick": {
        "runs": 3,
        "smtp_concurrency": 20, "smtp_counts": {4096: 150, 102400: 80}, "smtp_warmup": 50,
        "smtp_modes": ("per-connection", "pipelined"), "smtp_time_limit": 60,
        "smtp_single_count": 300,
        "imap_corpora": [1000], "imap_mixed_corpus": 1000, "imap_clients": 10,
        "imap_mixed_s": 2.0, "imap_mixed_max_ops": 20000, "imap_restart": True,
        "pop3_count": 1000, "pop3_time_limit": 3,
        "memory_connections": 50, "memory_time_limit": 120,
    },
    "full": {
        "runs": 3,
        "smtp_concurrency": 20, "smtp_counts": {4096: 4000, 102400: 1000}, "smtp_warmup": 300,
        "smtp_modes": ("per-connection", "pipelined"), "smtp_time_limit": 300,
        "smtp_single_count": 2000,
        "imap_corpora": [10000, 100000], "imap_mixed_corpus": 10000, "imap_clients": 20,
        "imap_mixed_s": 20.0, "imap_mixed_max_ops": 200000, "imap_restart": True,
        "pop3_count": 10000, "pop3_time_limit": 30,
        "memory_connections": 1000, "memory_time_limit": 300,
    },
}
USER = "bench"


def default_workdir() -> Path:
    return Path(os.environ.get("MAILSERVER_BENCH_WORKDIR",
                               Path(tempfile.gettempdir()) / "mailserver-bench"))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.plan = dict(PLANS["quick" if args.quick else "full"])
        if args.runs:
            self.plan["runs"] = args.runs
        if args.smtp_sizes:
            sizes = [int(x) for x in args.smtp_sizes.split(",") if x.strip()]
            counts = self.plan["smtp_counts"]
            unknown_sizes = [x for x in sizes if x not in counts]
            if unknown_sizes:
                raise SystemExit(f"--smtp-sizes: no message count for {unknown_sizes} in this "
                                 f"plan; sizes: {','.join(map(str, counts))}")
            self.plan["smtp_counts"] = {x: counts[x] for x in sizes}
        if args.imap_sizes:
            self.plan["imap_corpora"] = [int(x) for x in args.imap_sizes.split(",")]
            if self.plan["imap_mixed_corpus"] not in self.plan["imap_corpora"]:
                self.plan["imap_mixed_corpus"] = self.plan["imap_corpora"][0]
        self.selected = set(args.servers.split(",")) if args.servers else set(S.ALL)
        unknown = self.selected - set(S.ALL)
        if unknown:
            raise SystemExit(f"unknown server(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(S.ALL)}")
        self.selected.add("mailserver")
        self.password_hash = S.password_scheme(args.passwords)
        self.workdir = Path(args.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self.rundir = Path(tempfile.mkdtemp(prefix="run-", dir=self.workdir))
        os.chmod(self.rundir, 0o755)
        self.results: dict = {"meta": {}, "servers": {}, "areas": {}}
        self.unavailable: dict[str, str] = {}

    # -- servers ---------------------------------------------------------------------------

    def classes(self, service: str) -> list[type[S.Server]]:
        return [c for c in S.for_service(service) if c.key in self.selected]

    def note_server(self, srv: S.Server | type[S.Server], status: str = "ok") -> None:
        info = self.results["servers"].setdefault(srv.key, {"label": srv.label,
                                                            "notes": srv.notes})
        if isinstance(srv, S.Server) and not info.get("version"):
            try:
                info["version"] = srv.version()
            except Exception:  # a version string is never worth failing the run
                info["version"] = "?"
        if status != "ok" or "status" not in info:
            info["status"] = status

    def new_server(self, cls: type[S.Server], sub: str) -> S.Server:
        """An instance that passed check(); Unavailable otherwise (remembered)."""
        if cls.key in self.unavailable:
            raise Unavailable(self.unavailable[cls.key])
        srv = cls(self.rundir / sub)
        try:
            srv.check()
        except Unavailable as e:
            self.unavailable[cls.key] = str(e)
            self.note_server(cls, f"not runnable: {e}")
            raise
        return srv

    def start(self, srv: S.Server, service: str) -> None:
        srv.start()
        self.note_server(srv)
        if service not in srv.available_services:
            srv.stop()
            raise Unavailable(f"{srv.label}: {service} is not available (its port does not "
                              f"answer)")

    # -- areas -----------------------------------------------------------------------------

    def area_smtp(self) -> dict:
        p = self.plan
        configs = [{"size": size, "mode": mode, "count": count,
                    "concurrency": p["smtp_concurrency"], "servers": {}}
                   for size, count in p["smtp_counts"].items() for mode in p["smtp_modes"]]
        if 4096 in p["smtp_counts"]:
            # One sender, one 4 KB message per connection, one after the other: what a
            # single client waits for (the latency of each step, not the throughput of many).
            configs.append({"size": 4096, "mode": "per-connection",
                            "count": p["smtp_single_count"], "concurrency": 1, "servers": {}})
        if self.args.smtp_single:
            configs = [c for c in configs if c["concurrency"] == 1]
        # Every server gets the same messages: DKIM-signed by the sender's domain, so that
        # this server with its inbound checks verifies a real signature in each (and the
        # others take the same bytes).
        why_not = smtp_bench.can_sign()
        signed = not why_not
        self.results["meta"]["smtp_messages"] = (
            f"every server gets the same messages, DKIM-signed by {smtp_bench.SENDER_DOMAIN} "
            f"(rsa-sha256, 2048 bits, c=relaxed/relaxed, "
            f"h={':'.join(f.decode() for f in smtp_bench.SIGNED_FIELDS)})" if signed
            else f"unsigned messages ({why_not})")
        if why_not:
            log(f"smtp: warning: {why_not}; the messages go unsigned")
        started: list[S.Server] = []
        try:
            for cls in self.classes("smtp"):
                try:
                    srv = self.new_server(cls, "smtp")
                    srv.setup([USER])
                    self.start(srv, "smtp")
                    started.append(srv)
                except Unavailable as e:
                    log(f"smtp: {cls.key}: not runnable: {e}")
                    for cfg in configs:
                        cfg["servers"][cls.key] = {"unavailable": str(e)}
            # A short unmeasured load first: the first messages start what a server starts
            # on demand (Postfix's smtpd and delivery agents, this server's commit process).
            for srv in started:
                r = smtp_bench.run_once(srv, USER, p["smtp_warmup"], 4096, p["smtp_concurrency"],
                                        "per-connection", f"{srv.key}-warmup",
                                        p["smtp_time_limit"], signed)
                log(f"smtp warm-up: {srv.key:17} {fmt(r['msgs_per_s'])} msgs/s"
                    f"{', errors ' + str(r['errors']) if r['errors'] else ''}{auth_note(r)}")
                if r["errors"]:
                    log(f"  errors, e.g.: {r['error_examples']}\n{srv.log_tail()}")
            # Runs interleave the servers, so that a slow spell of the machine hits all; the
            # order alternates, so that neither of two servers always comes after the other.
            for run in range(p["runs"]):
                for cfg in configs:
                    for srv in (started if run % 2 == 0 else started[::-1]):
                        entry = cfg["servers"].setdefault(srv.key, {"runs": []})
                        run_id = f"{srv.key}-{run}-{cfg['size']}-{cfg['mode'][:4]}"
                        r = smtp_bench.run_once(srv, USER, cfg["count"], cfg["size"],
                                                cfg["concurrency"], cfg["mode"], run_id,
                                                p["smtp_time_limit"], signed)
                        entry["runs"].append(r)
                        log(f"smtp run {run + 1}: {srv.key:17} {cfg['size'] // 1024:>4} KB "
                            f"{cfg['mode']:15} {fmt(r['msgs_per_s'])} msgs/s, p50 "
                            f"{fmt(r['latency_p50_ms'])} ms, p99 {fmt(r['latency_p99_ms'])} ms, "
                            f"CPU {fmt(r['cpu_ms_per_msg'])} ms/msg, check "
                            f"{'ok' if r['maildir_check']['ok'] else 'FAILED'}"
                            f"{', errors ' + str(r['errors']) if r['errors'] else ''}"
                            f"{auth_note(r)}")
                        if r["errors"]:
                            log(f"  errors, e.g.: {r['error_examples']}")
        finally:
            for srv in started:
                srv.stop()  # the runs' messages stay until the bench's work directory goes
        return {"configs": configs}

    def _fill_and_start(self, cls: type[S.Server], sub: str, users: list[str], corpus_dir: Path,
                        manifest: dict, per_user: int | None, service: str) -> S.Server:
        srv = self.new_server(cls, sub)
        srv.setup(users)
        for u in users:
            corpus.link_into(corpus_dir, manifest, srv.maildir(u), per_user, lf=cls.lf_maildir)
        self.start(srv, service)
        return srv

    def _discard(self, srv: S.Server) -> None:
        srv.stop()
        if not self.args.keep:
            shutil.rmtree(srv.dir, ignore_errors=True)

    def area_imap(self) -> dict:
        p = self.plan
        corpora = []
        for count in p["imap_corpora"]:
            corpus_dir, manifest = corpus.cached(self.workdir, count, log=log)
            entry = {"count": count, "total_bytes": manifest["total_bytes"], "servers": {}}
            corpora.append(entry)
            classes = self.classes("imap")
            for run in range(p["runs"]):
                order = classes if run % 2 == 0 else list(reversed(classes))
                for cls in order:
                    if "unavailable" in entry["servers"].get(cls.key, {}):
                        continue
                    res: dict = {}
                    try:
                        t0 = time.monotonic()
                        srv = self._fill_and_start(cls, f"imap-{count}-{run}", [USER],
                                                   corpus_dir, manifest, None, "imap")
                    except Unavailable as e:
                        log(f"imap: {cls.key}: not runnable: {e}")
                        entry["servers"][cls.key] = {"unavailable": str(e)}
                        continue
                    try:
                        port = srv.port("imap")
                        for phase in ("first", "second", "restart"):
                            if phase == "restart":
                                if not p["imap_restart"]:
                                    continue
                                srv.stop()
                                srv.start()
                            res[phase] = imap_bench.single_client(
                                port, f"{USER}@{S.DOMAIN}", S.PASSWORD, manifest, seed=run,
                                server_pids=srv.pids)
                            r = res[phase]
                            log(f"imap {count} run {run + 1}: {cls.key:10} {phase:7} SELECT "
                                f"{fmt(r['select_s'])} s, FLAGS {fmt(r['uid_fetch_flags_s'])} s, "
                                f"ENVELOPE {fmt(r['fetch_envelope_s'])} s, SEARCH "
                                f"{fmt(r['search_subject_s'])} s, checks "
                                f"{'ok' if r['checks']['ok'] else 'MISMATCH'}")
                        if count == p["imap_mixed_corpus"]:
                            res["mixed"] = imap_bench.mixed_loop(
                                port, f"{USER}@{S.DOMAIN}", S.PASSWORD, p["imap_clients"],
                                p["imap_mixed_s"], p["imap_mixed_max_ops"], run, srv.pids)
                            log(f"imap {count} run {run + 1}: {cls.key:10} mixed "
                                f"{fmt(res['mixed']['ops_per_s'])} ops/s, errors "
                                f"{res['mixed']['errors']}")
                    except (OSError, imap_bench.IMAPError) as e:
                        res["error"] = repr(e)
                        log(f"imap: {cls.key}: {e!r}\n{srv.log_tail()}")
                    finally:
                        res["wall_s"] = time.monotonic() - t0
                        self._discard(srv)
                    entry["servers"].setdefault(cls.key, {"runs": []})["runs"].append(res)
        return {"corpora": corpora}

    def area_pop3(self) -> dict:
        p = self.plan
        count = p["pop3_count"]
        corpus_dir, manifest = corpus.cached(self.workdir, count, log=log)
        area = {"count": count, "servers": {}}
        classes = self.classes("pop3")
        for run in range(p["runs"]):
            # the order alternates, as in the other areas: neither always reads first
            for cls in (classes if run % 2 == 0 else classes[::-1]):
                if "unavailable" in area["servers"].get(cls.key, {}):
                    continue
                try:
                    srv = self._fill_and_start(cls, f"pop3-{run}", [USER], corpus_dir, manifest,
                                               None, "pop3")
                except Unavailable as e:
                    log(f"pop3: {cls.key}: not runnable: {e}")
                    area["servers"][cls.key] = {"unavailable": str(e)}
                    continue
                res: dict = {}
                try:
                    for phase in ("first", "second"):
                        res[phase] = pop3_bench.session(srv.port("pop3"), f"{USER}@{S.DOMAIN}",
                                                        S.PASSWORD, manifest, srv.pids,
                                                        p["pop3_time_limit"])
                        r = res[phase]
                        log(f"pop3 run {run + 1}: {cls.key:12} {phase:6} STAT {fmt(r['stat_s'])} s, "
                            f"UIDL {fmt(r['uidl_s'])} s, RETR all {fmt(r['retr_all_s'])} s, "
                            f"checks {'ok' if r['checks']['ok'] else 'MISMATCH'}")
                except (OSError, pop3_bench.POP3Error) as e:
                    res["error"] = repr(e)
                    log(f"pop3: {cls.key}: {e!r}\n{srv.log_tail()}")
                finally:
                    self._discard(srv)
                area["servers"].setdefault(cls.key, {"runs": []})["runs"].append(res)
        return area

    def area_memory(self) -> dict:
        p = self.plan
        k = p["memory_connections"]
        corpus_dir, manifest = corpus.cached(self.workdir, min(p["imap_corpora"]), log=log)
        users = [f"m{i:04d}" for i in range(k)]
        area = {"connections": k, "messages_per_user": 10, "servers": {}}
        for cls in self.classes("imap"):
            try:
                srv = self._fill_and_start(cls, "memory", users, corpus_dir, manifest, 10, "imap")
            except Unavailable as e:
                log(f"memory: {cls.key}: not runnable: {e}")
                area["servers"][cls.key] = {"unavailable": str(e)}
                continue
            try:
                for run in range(p["runs"]):
                    if run:
                        srv.stop()
                        srv.start()
                    r = memory_bench.run_once(srv.port("imap"), [f"{u}@{S.DOMAIN}" for u in users],
                                              S.PASSWORD, srv.pids, p["memory_time_limit"])
                    area["servers"].setdefault(cls.key, {"runs": []})["runs"].append(r)
                    log(f"memory run {run + 1}: {cls.key:10} RSS {fmt(r['baseline_rss_mb'])} -> "
                        f"{fmt(r['authenticated_rss_mb'])} (auth) -> {fmt(r['idle_rss_mb'])} MB "
                        f"(IDLE), {r['authenticated_ok']}/{k} connected, errors {r['errors']}")
            finally:
                self._discard(srv)
        return area

    # -- main --------------------------------------------------------------------------------

    def run(self, areas: list[str]) -> dict:
        t0 = time.monotonic()
        busy0, wall0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        other_load = (system_busy_seconds() - busy0) / (time.monotonic() - wall0)
        meta = self.results["meta"]
        meta.update({
            "plan": "quick" if self.args.quick else "full", "runs": self.plan["runs"],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "areas": areas,
            "machine": f"{os.cpu_count()} cores, {platform.python_implementation()} "
                       f"{platform.python_version()}, {platform.release()}",
            "cores_busy_before_start": round(other_load, 2),
            "plan_parameters": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                                for k, v in self.plan.items()},
            "workdir": str(self.rundir),
            "password_hash": self.password_hash.split("$", 1)[0] + (
                "$" + self.password_hash.split("$")[3] if "$argon2" in self.password_hash else ""),
        })
        if other_load > 0.3:
            log(f"warning: the machine is already busy ({other_load:.1f} cores in use by other "
                f"processes): figures will be noisier")
        self._wait_after_deletions()
        for area in areas:
            log(f"== {area}")
            try:
                self.results["areas"][area] = getattr(self, f"area_{area}")()
            except Exception as e:  # one area failing still leaves the others' figures
                log(f"{area}: failed: {e!r}")
                traceback.print_exc()
                self.results["areas"][area] = {"error": repr(e)}
        for key in self.selected:
            if key not in self.results["servers"]:
                cls = S.ALL[key]
                if any(a in cls.services or (a == "memory" and "imap" in cls.services)
                       for a in areas):
                    self.note_server(cls, "not started")
        meta["elapsed_s"] = time.monotonic() - t0
        if not self.args.keep:
            shutil.rmtree(self.rundir, ignore_errors=True)
            (self.workdir / DELETED_MARK).touch()
        return self.results

    def _wait_after_deletions(self) -> None:
        """Wait until the previous bench's deletions are old enough not to slow this one.

        On ext4 without a journal, creating a file skips, one by one, every inode freed in
        the last minutes (60 s, up to 360 s while its inode table block is dirty); right
        after a bench deleted its tens of thousands of messages, the next one's first
        minutes of file creation cost up to twice the CPU (seen in perf as
        recently_deleted), whichever server happens to create its files there.
        """
        mark = self.workdir / DELETED_MARK
        if self.args.no_wait or not mark.exists():
            return
        left = DELETIONS_SETTLE_S - (time.time() - mark.stat().st_mtime)
        if left > 0:
            log(f"waiting {left:.0f} s: the previous bench deleted its messages less than "
                f"{DELETIONS_SETTLE_S} s ago (see README; --no-wait to skip)")
            time.sleep(left)


def fmt(v) -> str:
    return report.fmt(v)


def auth_note(r: dict) -> str:
    """For a server that checks: whether its stored messages say spf, dkim and dmarc pass
    (loud when not: the checks did not run as measured)."""
    a = r["maildir_check"].get("auth_results")
    if a is None:
        return ""
    if a["ok"]:
        return f", spf/dkim/dmarc=pass {a['passed']}/{a['checked']}"
    return (f"\n  !!! Authentication-Results: {a['failed']} of {a['checked']} stored messages "
            f"lack spf/dkim/dmarc=pass, e.g. {a['examples']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="small counts (a few minutes)")
    ap.add_argument("--only", default=",".join(AREAS),
                    help=f"areas to run, comma-separated (default: {','.join(AREAS)})")
    ap.add_argument("--servers", default="",
                    help=f"servers to run (this one always runs): {','.join(S.ALL)}")
    ap.add_argument("--runs", type=int, default=0, help="runs per figure (default 3)")
    ap.add_argument("--smtp-sizes", default="",
                    help="SMTP message sizes, e.g. 4096 (default: by plan: 4096,102400)")
    ap.add_argument("--smtp-single", action="store_true",
                    help="SMTP: only the one-client case (one 4 KB message per connection)")
    ap.add_argument("--imap-sizes", default="",
                    help="IMAP corpus sizes, e.g. 10000,100000 (default: by plan)")
    ap.add_argument("--workdir", default=str(default_workdir()),
                    help="work directory: corpus cache and the servers' temporary directories "
                         "(default: $MAILSERVER_BENCH_WORKDIR or %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the servers' directories")
    ap.add_argument("--no-wait", action="store_true",
                    help="start at once even if the previous bench deleted its messages less "
                         "than 6 minutes ago")
    ap.add_argument("--passwords", choices=("argon2id", "plain"), default="argon2id",
                    help="users' password hash, the same for this server and Dovecot: argon2id "
                         "(this server's own, default) or plain ({PLAIN}: LOGIN costs no hashing)")
    ap.add_argument("--json", default="", help="raw results file (default: bench/results/TIME.json)")
    ap.add_argument("--report", metavar="JSON", default="",
                    help="only print the tables of an earlier run's raw results file")
    args = ap.parse_args()
    if args.report:
        print(report.render(json.loads(Path(args.report).read_text())))
        return 0
    areas = [a.strip() for a in args.only.split(",") if a.strip()]
    bad = [a for a in areas if a not in AREAS]
    if bad:
        ap.error(f"unknown area(s) {', '.join(bad)}; known: {', '.join(AREAS)}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    bench = Bench(args)
    out = Path(args.json) if args.json else (
        BENCH_DIR / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}"
                                f"{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = bench.run(areas)
    results["meta"]["json"] = str(out)
    out.write_text(json.dumps(results, indent=1, default=str))
    print()
    print(report.render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
