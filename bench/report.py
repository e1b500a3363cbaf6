"""Tables from the raw results: one per area, this server first, each anchor with the ratio.

A cell is "median (min-max)" over the runs; the ratio is this server's median divided by the
anchor's, so for times, CPU and memory below 1 is better, and for msgs/s and ops/s above 1.
"""

from __future__ import annotations

from typing import Any, Callable

from common import summary

OURS = "mailserver"
CHECKS = "mailserver-checks"   # this server with the MX's inbound checks on
CHECKS_TARGET = 0.85            # issue: with checks, within 15% of the msgs/s without


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a < 1e-9:   # float noise of a difference of sums
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a == 0:
        return "0"
    return f"{v:.3g}"


def cell(s: dict | None) -> str:
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def ratio(ours: dict | None, other: dict | None) -> str:
    if not ours or not other or not other["median"]:
        return "-"
    return f"{ours['median'] / other['median']:.2f}x"


def table(title: str, servers: list[tuple[str, str]], rows: list[tuple[str, Callable[[str], Any]]],
          legend: str = "") -> str:
    """servers: (key, label), this server first.  rows: (label, key -> summary dict | str)."""
    keys = [k for k, _ in servers]
    head = ["", dict(servers).get(OURS, OURS)]
    for key, label in servers:
        if key != OURS:
            head += [label, "ratio"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for label, get in rows:
        ours = get(OURS) if OURS in keys else None
        out = [label, ours if isinstance(ours, str) else cell(ours)]
        for key in keys:
            if key == OURS:
                continue
            v = get(key)
            if isinstance(v, str) or isinstance(ours, str):
                out += [v if isinstance(v, str) else cell(v), ""]
            else:
                out += [cell(v), ratio(ours, v)]
        lines.append("| " + " | ".join(out) + " |")
    if legend:
        lines += ["", legend]
    return "\n".join(lines)


def _runs_metric(runs: list[dict], path: tuple[str, ...]) -> dict | None:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        vals.append(v if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return summary(vals)


def _status_getter(entries: dict, check: Callable[[dict], tuple[bool, str]]):
    def get(key: str) -> str:
        e = entries.get(key)
        if e is None:
            return "-"
        if "unavailable" in e:
            return "not runnable"
        runs = e.get("runs", [])
        bad = [msg for ok, msg in (check(r) for r in runs) if not ok]
        if not runs:
            return "no runs"
        return f"ok {len(runs)}/{len(runs)}" if not bad else f"FAIL {len(bad)}/{len(runs)}: {bad[0]}"
    return get


def _metric_getter(entries: dict, *path: str):
    def get(key: str):
        e = entries.get(key)
        if e is None:
            return None
        if "unavailable" in e:
            return "n/a"
        return _runs_metric(e.get("runs", []), path)
    return get


def _server_list(results: dict, keys: list[str]) -> list[tuple[str, str]]:
    info = results["servers"]
    ordered = [OURS] + [k for k in keys if k != OURS]
    return [(k, info.get(k, {}).get("label", k)) for k in ordered if k in keys]


def smtp_tables(results: dict) -> list[str]:
    area = results["areas"].get("smtp")
    if not area or "configs" not in area:
        return []
    out = []
    busy = [r["other_cpu_s"] / r["elapsed_s"] for cfg in area["configs"]
            for e in cfg["servers"].values() for r in e.get("runs", [])
            if r.get("elapsed_s") and r.get("other_cpu_s") is not None]
    if busy:
        s = summary(busy)
        out.append(f"During the SMTP runs, other processes on the machine used "
                   f"{fmt(s['median'])} cores (median; {fmt(s['min'])}-{fmt(s['max'])}).")
    for cfg in area["configs"]:
        entries = cfg["servers"]
        servers = _server_list(results, list(entries))

        def maildir_check(r: dict) -> tuple[bool, str]:
            c = r["maildir_check"]
            if c["ok"]:
                return True, ""
            return False, (f"accepted {r['accepted']}/{cfg['count']}, stored {c['stored']}, "
                           f"missing {c['missing']}, twice {c['duplicates']}")

        def pipelined(key: str) -> str:
            e = entries.get(key, {})
            flags = {r.get("pipelined") for r in e.get("runs", [])}
            return "n/a" if "unavailable" in e else ("yes" if flags == {True} else "no")

        def auth_check(r: dict) -> tuple[bool, str]:
            a = r["maildir_check"].get("auth_results")
            if a is None or a["ok"]:
                return True, ""
            return False, (f"{a['failed']} of {a['checked']} lack a pass, e.g. "
                           f"{'; '.join(a['examples'][:1])}")

        rows = [("accepted msgs/s", _metric_getter(entries, "msgs_per_s")),
                ("p50 DATA-end to 250 (ms)", _metric_getter(entries, "latency_p50_ms")),
                ("p99 DATA-end to 250 (ms)", _metric_getter(entries, "latency_p99_ms")),
                ("server CPU per msg (ms)", _metric_getter(entries, "cpu_ms_per_msg")),
                ("exactly M in Maildir", _status_getter(entries, maildir_check))]
        if any("auth_results" in r.get("maildir_check", {}) for e in entries.values()
               for r in e.get("runs", [])):
            def auth_row(key: str) -> str:
                e = entries.get(key, {})
                if not any("auth_results" in r.get("maildir_check", {})
                           for r in e.get("runs", [])):
                    return "-"
                return _status_getter(entries, auth_check)(key)
            rows.append(("stored with spf, dkim, dmarc=pass", auth_row))
        if cfg["mode"] == "pipelined":
            rows.append(("PIPELINING used", pipelined))
        out.append(table(f"SMTP: {cfg['size'] // 1024} KB, {cfg['mode']}, "
                         f"{cfg['concurrency']} connections, {cfg['count']} messages",
                         servers, rows))
    return out


def _single_sender_rows(e: dict, verdict: Callable[[bool | None], str]
                        ) -> list[tuple[str, str, str]]:
    """One client, one 4 KB message per connection: msgs/s at least Postfix's and 0.9x
    twistd mail's, p50 end of DATA to 250 no higher than Postfix's."""
    rows = []
    ours, p50 = _median(e, OURS, "msgs_per_s"), _median(e, OURS, "latency_p50_ms")
    postfix, postfix_p50 = _median(e, "postfix", "msgs_per_s"), _median(e, "postfix",
                                                                         "latency_p50_ms")
    twistd = _median(e, "twistd-mail", "msgs_per_s")
    if ours and postfix:
        rows.append(("SMTP 4 KB, 1 client: msgs/s >= Postfix's",
                     f"{fmt(ours)} vs {fmt(postfix)}", verdict(ours >= postfix)))
    if ours and twistd:
        rows.append(("SMTP 4 KB, 1 client: msgs/s >= 0.9x twistd mail's",
                     f"{ours / twistd:.2f}x ({fmt(ours)} vs {fmt(twistd)})",
                     verdict(ours >= 0.9 * twistd)))
    if p50 is not None and postfix_p50 is not None:
        rows.append(("SMTP 4 KB, 1 client: p50 DATA-end to 250 <= Postfix's",
                     f"{fmt(p50)} vs {fmt(postfix_p50)} ms", verdict(p50 <= postfix_p50)))
    return rows


def _paired_ratios(a: dict, b: dict, metric: str) -> dict | None:
    """Run i of `a` over run i of `b` (the runs interleave: run i of both saw the same
    state of the machine), summarised."""
    vals = []
    for ra, rb in zip(a.get("runs", []), b.get("runs", [])):
        va, vb = ra.get(metric), rb.get(metric)
        vals.append(va / vb if va is not None and vb else None)
    return summary(vals)


def checks_tables(results: dict) -> list[str]:
    """This server with and without the MX's inbound checks, from the same run."""
    area = results["areas"].get("smtp")
    if not area or "configs" not in area:
        return []
    rows = []
    verdicts = []
    for cfg in area["configs"]:
        e = cfg["servers"]
        base, checked = e.get(OURS), e.get(CHECKS)
        if not base or not checked or "unavailable" in base or "unavailable" in checked:
            continue
        name = f"{cfg['size'] // 1024} KB {cfg['mode']}" + (
            ", 1 client" if cfg.get("concurrency") == 1 else "")
        for label, metric in (("msgs/s", "msgs_per_s"),
                              ("p50 DATA-end to 250 (ms)", "latency_p50_ms"),
                              ("p99 DATA-end to 250 (ms)", "latency_p99_ms"),
                              ("server CPU per msg (ms)", "cpu_ms_per_msg")):
            a = _runs_metric(base.get("runs", []), (metric,))
            b = _runs_metric(checked.get("runs", []), (metric,))
            paired = _paired_ratios(checked, base, metric)
            rows.append(f"| {name} | {label} | {cell(a)} | {cell(b)} | "
                        f"{_ratio_of(b, a)} | {_ratios_cell(paired)} |")
        a = _runs_metric(base.get("runs", []), ("msgs_per_s",))
        b = _runs_metric(checked.get("runs", []), ("msgs_per_s",))
        if a and b and a["median"] and cfg["size"] == 4096:
            r = b["median"] / a["median"]
            verdicts.append(f"- {name}: with checks {r:.2f}x the msgs/s without "
                            f"(target >= {CHECKS_TARGET:.2f}x): "
                            f"{'met' if r >= CHECKS_TARGET else 'NOT met'}")
    if not rows:
        return []
    lines = ["### SMTP: this server with the MX's inbound checks (SPF, DKIM, DMARC, ARC) vs "
             "without", "",
             "| load | figure | without checks | with checks | with / without (medians) "
             "| with / without, run by run |",
             "|---|---|---|---|---|---|", *rows, ""]
    lines += verdicts
    helpers = [r.get("helper_cpu_s") for cfg in area["configs"]
               for r in cfg["servers"].get(CHECKS, {}).get("runs", [])]
    helpers = [h for h in helpers if h is not None]
    if helpers:
        lines.append(f"- the checks' DNS server (not in the server's CPU figures) used "
                     f"{fmt(max(helpers) * 1000)} ms of CPU in the busiest run: its records "
                     f"are cached by the server (TTL 60 s)")
    return ["\n".join(lines)]


def _ratios_cell(s: dict | None) -> str:
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median']:.2f}x"
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def _ratio_of(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["median"]:
        return "-"
    return f"{a['median'] / b['median']:.2f}x"


IMAP_OPS = [("LOGIN (s)", "login_s"), ("SELECT INBOX (s)", "select_s"),
            ("UID FETCH 1:* (UID FLAGS) (s)", "uid_fetch_flags_s"),
            ("FETCH 1:* (ENVELOPE) (s)", "fetch_envelope_s"),
            ("FETCH 1:* header fields (s)", "fetch_header_fields_s"),
            ("UID SEARCH SUBJECT word (s)", "search_subject_s"),
            ("UID SEARCH UNSEEN (s)", "search_unseen_s"),
            ("100 random bodies, total (s)", "bodies_total_s"),
            ("one body, median (ms)", "body_median_ms"),
            ("whole phase, connect to LOGOUT (s)", "phase_wall_s"),
            ("server CPU, whole phase (s)", "server_cpu_s")]
PHASES = [("first", "first open (no index)"), ("second", "second open (same process)"),
          ("restart", "open after a restart (index on disk)")]
MIXED = [("ops/s", "ops_per_s"), ("server CPU per op (ms)", "server_cpu_ms_per_op"),
         ("headers: 50 x ENVELOPE, median (ms)", "headers_median_ms"),
         ("body: BODY.PEEK[], median (ms)", "body_median_ms"),
         ("store: +/-FLAGS \\Seen, median (ms)", "store_median_ms"),
         ("search: UID SEARCH UNSEEN, median (ms)", "search_median_ms"),
         ("noop: NOOP, median (ms)", "noop_median_ms")]


def _imap_check(phase: str):
    def check(r: dict) -> tuple[bool, str]:
        c = r.get(phase, {}).get("checks")
        if c is None:
            return True, ""
        if c.get("ok"):
            return True, ""
        return False, (f"exists {c.get('exists')}, fetches {c.get('envelope_fetches')}, "
                       f"subject hits {c.get('search_subject_hits')}/"
                       f"{c.get('search_subject_expected')}, unseen "
                       f"{c.get('search_unseen_hits')}/{c.get('search_unseen_expected')}, "
                       f"body sizes {c.get('bodies_size_ok')}/{c.get('bodies')}")
    return check


def imap_tables(results: dict) -> list[str]:
    area = results["areas"].get("imap")
    if not area or "corpora" not in area:
        return []
    out = []
    for corpus in area["corpora"]:
        entries = corpus["servers"]
        servers = _server_list(results, list(entries))
        rows = []
        for phase, label in PHASES:
            if not any(phase in r for e in entries.values() for r in e.get("runs", [])):
                continue
            rows.append((f"**{label}**", lambda key: ""))
            for name, metric in IMAP_OPS:
                rows.append((name, _metric_getter(entries, phase, metric)))
            rows.append(("answers match the corpus", _status_getter(entries, _imap_check(phase))))
        if any("mixed" in r for e in entries.values() for r in e.get("runs", [])):
            clients = next(r["mixed"]["clients"] for e in entries.values()
                           for r in e.get("runs", []) if "mixed" in r)
            rows.append((f"**mixed loop, {clients} clients**", lambda key: ""))
            for name, metric in MIXED:
                rows.append((name, _metric_getter(entries, "mixed", metric)))
        out.append(table(f"IMAP: {corpus['count']:,} messages "
                         f"({corpus['total_bytes'] / 1e6:,.0f} MB)", servers, rows))
    return out


def pop3_tables(results: dict) -> list[str]:
    area = results["areas"].get("pop3")
    if not area or "servers" not in area:
        return []
    entries = area["servers"]
    servers = _server_list(results, list(entries))
    rows = []
    for phase, label in (("first", "first session (no index)"), ("second", "second session")):
        rows.append((f"**{label}**", lambda key: ""))
        for name, metric in (("USER+PASS (s)", "login_s"), ("STAT (s)", "stat_s"),
                             ("UIDL (s)", "uidl_s"), ("RETR every message (s)", "retr_all_s"),
                             ("RETR msgs/s", "retr_msgs_per_s"),
                             ("server CPU per RETR (ms)", "cpu_ms_per_retr")):
            rows.append((name, _metric_getter(entries, phase, metric)))

        def check(r: dict, phase=phase) -> tuple[bool, str]:
            c = r.get(phase, {}).get("checks", {})
            if c.get("ok"):
                return True, ""
            return False, (f"STAT {c.get('stat_count')}, UIDL {c.get('uidl_lines')}, "
                           f"sizes match {c.get('sizes_match')}")
        rows.append(("answers match the corpus", _status_getter(entries, check)))

        def partial(key: str, phase=phase) -> str:
            e = entries.get(key, {})
            if "unavailable" in e:
                return "n/a"
            cut = [r[phase] for r in e.get("runs", []) if phase in r
                   and not r[phase].get("retr_complete", True)]
            if not cut:
                return "no"
            return (f"yes, {cut[0]['checks']['retrieved']}/{cut[0]['checks']['stat_count']} "
                    f"in the time limit: RETR total extrapolated")
        rows.append(("RETR stopped at the time limit", partial))
    return [table(f"POP3: {area['count']:,} messages in INBOX", servers, rows)]


def memory_tables(results: dict) -> list[str]:
    area = results["areas"].get("memory")
    if not area or "servers" not in area:
        return []
    entries = area["servers"]
    servers = _server_list(results, list(entries))
    k = area["connections"]
    rows = [("RSS after start + 1 login (MB)", _metric_getter(entries, "baseline_rss_mb")),
            (f"RSS, {k} authenticated (MB)", _metric_getter(entries, "authenticated_rss_mb")),
            (f"RSS, {k} in IDLE (MB)", _metric_getter(entries, "idle_rss_mb")),
            ("RSS per authenticated connection (KB)",
             _metric_getter(entries, "authenticated_rss_kb_per_conn")),
            ("RSS per IDLE connection (KB)", _metric_getter(entries, "idle_rss_kb_per_conn")),
            (f"PSS, {k} authenticated (MB)", _metric_getter(entries, "authenticated_pss_mb")),
            (f"PSS, {k} in IDLE (MB)", _metric_getter(entries, "idle_pss_mb")),
            (f"time to open {k} (LOGIN+SELECT) (s)", _metric_getter(entries, "connect_s")),
            ("connections that failed", _metric_getter(entries, "errors"))]
    return [table(f"Memory: {k} IMAP connections (whole process tree)", servers, rows)]


def _median(entries: dict, key: str, *path: str) -> float | None:
    e = entries.get(key)
    if not e or "unavailable" in e:
        return None
    s = _runs_metric(e.get("runs", []), path)
    return s["median"] if s else None


def targets(results: dict) -> str:
    """The issue's targets, checked against this run's medians (where this run has the data)."""
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "NOT met")

    smtp = results["areas"].get("smtp", {})
    for cfg in smtp.get("configs", []):
        e = cfg["servers"]
        size = f"{cfg['size'] // 1024} KB"
        ours = _median(e, OURS, "msgs_per_s")
        if cfg.get("concurrency") == 1:
            rows += _single_sender_rows(e, verdict)
            continue
        cpu = _median(e, OURS, "cpu_ms_per_msg")
        others = {k: _median(e, k, "msgs_per_s") for k in e if k not in (OURS, CHECKS)}
        others = {k: v for k, v in others.items() if v}
        if ours and others:
            best = max(others, key=others.get)
            rows.append((f"SMTP {size} {cfg['mode']}: faster than every anchor",
                         f"{fmt(ours)} msgs/s vs best anchor {best} {fmt(others[best])}",
                         verdict(ours > others[best])))
        if cpu is not None and cfg["size"] == 4096:
            rows.append((f"SMTP 4 KB {cfg['mode']}: server CPU < 0.8 ms/msg", f"{fmt(cpu)} ms",
                         verdict(cpu < 0.8)))
        checked = _median(e, CHECKS, "msgs_per_s")
        if ours and checked and cfg["size"] == 4096:
            p99 = (_median(e, OURS, "latency_p99_ms"), _median(e, CHECKS, "latency_p99_ms"))
            rows.append((f"SMTP 4 KB {cfg['mode']}: with inbound checks within 15% of the "
                         f"msgs/s without",
                         f"{checked / ours:.2f}x ({fmt(checked)} vs {fmt(ours)} msgs/s; p99 "
                         f"{fmt(p99[1])} vs {fmt(p99[0])} ms)",
                         verdict(checked >= CHECKS_TARGET * ours)))
    imap = results["areas"].get("imap", {})
    big = max(imap.get("corpora", []), key=lambda c: c["count"], default=None)
    if big:
        e = big["servers"]
        n = f"{big['count']:,}"
        for label, metric, limit in (("SELECT", "select_s", 2), ("UID FETCH FLAGS", "uid_fetch_flags_s", 2),
                                     ("FETCH ENVELOPE", "fetch_envelope_s", 3),
                                     ("SEARCH SUBJECT", "search_subject_s", 3),
                                     ("SEARCH UNSEEN", "search_unseen_s", 3),
                                     ("100 bodies", "bodies_total_s", 3)):
            # The targets are for the warm folder (second open); the open after a
            # restart is shown too, marked as beyond them.
            for phase, pl in (("second", "warm"), ("restart", "after restart (not a target)")):
                a, b = _median(e, OURS, phase, metric), _median(e, "dovecot", phase, metric)
                if a is not None and b:
                    rows.append((f"IMAP {n} {pl}: {label} within {limit}x of Dovecot",
                                 f"{a / b:.2f}x ({fmt(a)} s vs {fmt(b)} s)", verdict(a <= limit * b)))
        sel, wall = _median(e, OURS, "first", "select_s"), _median(e, OURS, "first", "phase_wall_s")
        if sel is not None:
            rows.append((f"IMAP {n} first open < 60 s: SELECT", f"{fmt(sel)} s", verdict(sel < 60)))
        if wall is not None:
            rows.append((f"IMAP {n} first open < 60 s: whole first session", f"{fmt(wall)} s",
                         verdict(wall < 60)))
    for corpus in imap.get("corpora", []):
        e = corpus["servers"]
        a, b = _median(e, OURS, "mixed", "ops_per_s"), _median(e, "dovecot", "mixed", "ops_per_s")
        if a is not None and b:
            rows.append((f"IMAP {corpus['count']:,} mixed loop: ops/s >= half of Dovecot's",
                         f"{a / b:.2f}x ({fmt(a)} vs {fmt(b)})", verdict(a >= 0.5 * b)))
    pop3 = results["areas"].get("pop3", {})
    for phase in ("first", "second"):
        a = _median(pop3.get("servers", {}), OURS, phase, "retr_msgs_per_s")
        b = _median(pop3.get("servers", {}), "dovecot", phase, "retr_msgs_per_s")
        if a is not None and b:
            rows.append((f"POP3 {pop3['count']:,}, {phase} session: RETR msgs/s >= 0.8x "
                         f"Dovecot's", f"{a / b:.2f}x ({fmt(a)} vs {fmt(b)})",
                         verdict(a >= 0.8 * b)))
    mem = results["areas"].get("memory", {})
    if mem.get("servers"):
        for state, label in (("authenticated", "idle authenticated"), ("idle", "IDLE-ing")):
            v = _median(mem["servers"], OURS, f"{state}_rss_mb")
            if v is not None:
                rows.append((f"{mem['connections']} {label} IMAP connections < 150 MB RSS"
                             + ("" if mem["connections"] >= 1000 else " (target is for 1,000)"),
                             f"{fmt(v)} MB", verdict(v < 150)))
    if not rows:
        return ""
    lines = ["### Targets (issue 6), from this run's medians", "",
             "| target | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def render(results: dict) -> str:
    parts = []
    meta = results["meta"]
    parts.append(f"## mailserver benchmark, {meta['plan']} plan, {meta['runs']} runs per figure "
                 f"({meta['started']}, {meta['machine']})")
    parts.append("")
    parts.append("Cells: median (min-max) over the runs. ratio = this server / anchor: for times, "
                 "CPU and memory below 1x is better, for msgs/s and ops/s above 1x is better.")
    parts.append(f"Users' password hash (this server and Dovecot): {meta.get('password_hash', '?')}. "
                 f"Machine CPU busy with other work at the start: "
                 f"{meta.get('cores_busy_before_start', '?')} cores.")
    parts.append("")
    parts.append("Servers:")
    for key, info in results["servers"].items():
        status = info.get("status", "")
        parts.append(f"- {info.get('label', key)}: {info.get('version', '')} "
                     f"{'- ' + info['notes'] if info.get('notes') else ''}"
                     f"{'' if status == 'ok' else ' -- ' + status}")
    if meta.get("smtp_messages") and "smtp" in results["areas"]:
        parts += ["", f"SMTP messages: {meta['smtp_messages']}."]
    for fn in (smtp_tables, checks_tables, imap_tables, pop3_tables, memory_tables):
        for t in fn(results):
            parts += ["", t]
    t = targets(results)
    if t:
        parts += ["", t]
    for area, info in results["areas"].items():
        if "error" in info:
            parts += ["", f"{area}: the area failed: {info['error']}"]
        for note in info.get("notes", []):
            parts += ["", f"Note ({area}): {note}"]
    parts += ["", f"Total time: {meta.get('elapsed_s', 0):.0f} s. Raw results: {meta.get('json', '')}"]
    return "\n".join(parts)
