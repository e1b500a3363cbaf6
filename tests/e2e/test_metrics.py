"""[listen].metrics: Prometheus metrics over HTTP, scraped from a real twistd process while
real clients deliver mail, log in and fail to log in; off unless configured."""

from __future__ import annotations

import http.client
import imaplib
import ipaddress
import poplib
import re
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (PASSWORD, SMTPClient, free_port, make_message, send_mail,
                     tls_client_context, wait_until)

ALICE = "alice@example.test"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers ---------------------------------------------------------------------------------

def http_get(port: int, path: str, method: str = "GET",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """One request to 127.0.0.1 (http.client: no proxy from the environment)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample of GET /metrics, parsed with prometheus_client's own parser; and the
    type of each metric family."""
    status, headers, body = http_get(port, "/metrics")
    assert status == 200, f"GET /metrics: {status} {body[:500]}"
    assert headers["content-type"].startswith("text/plain"), headers
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(body):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series not there yet (nothing counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def tls_versions(samples: Samples, service: str) -> dict[str, float]:
    out = {}
    for (name, labels), v in samples.items():
        label = dict(labels)
        if name == "mailserver_tls_sessions_total" and label.get("service") == service:
            out[label["version"]] = v
    return out


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:   # state LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def metrics_server(make_server):
    port = free_port()
    srv = make_server(listen={"metrics": f"tcp:{port}:interface=127.0.0.1"})
    srv.metrics_port = port
    return srv


# -- tests -----------------------------------------------------------------------------------

def test_metrics_count_real_traffic(metrics_server):
    srv, port = metrics_server, metrics_server.metrics_port
    before, types = scrape(port)
    assert types["mailserver_connections"] == "counter"
    assert types["mailserver_connections_open"] == "gauge"
    assert types["mailserver_delivery_seconds"] == "histogram"
    assert value(before, "mailserver_queue_messages") == 0
    assert value(before, "mailserver_queue_oldest_seconds") == 0
    for service in ("imap", "imaps", "pop3", "pop3s"):
        assert ("mailserver_sessions_logged_in", frozenset({("service", service)})) in before

    # One message accepted; one recipient refused (unknown user) after STARTTLS.
    send_mail(srv, make_message("<metrics-1@remote.test>"), [ALICE])
    with SMTPClient(srv.smtp_port) as c:
        c.greet()
        c.starttls()
        assert c.cmd("EHLO client.remote.test").code == 250
        assert c.cmd("MAIL FROM:<x@remote.test>").code == 250
        reply = c.cmd("RCPT TO:<nobody@example.test>")
        assert reply.code == 550, reply
        c.quit()

    # IMAP over implicit TLS, logged in while scraped; a failed POP3 login over TLS.
    imap = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=tls_client_context(),
                             timeout=15)
    try:
        imap.login(ALICE, PASSWORD)
        pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls_client_context(),
                              timeout=15)
        try:
            pop.user(ALICE)
            with pytest.raises(poplib.error_proto):
                pop.pass_("wrong password")
        finally:
            pop.quit()
        during, _ = scrape(port)
    finally:
        imap.logout()

    assert delta(before, during, "mailserver_messages_received_total", service="smtp") == 1
    assert delta(before, during, "mailserver_local_deliveries_total", service="smtp") == 1
    assert delta(before, during, "mailserver_delivery_seconds_count", service="smtp") == 1
    assert delta(before, during, "mailserver_messages_rejected_total", service="smtp",
                 reason="unknown_recipient") == 1
    assert delta(before, during, "mailserver_connections_total", service="smtp") >= 2
    assert delta(before, during, "mailserver_connections_total", service="imaps") == 1
    assert delta(before, during, "mailserver_connections_total", service="pop3s") == 1
    assert value(during, "mailserver_connections_open", service="imaps") == 1
    assert value(during, "mailserver_sessions_logged_in", service="imaps") == 1
    assert value(during, "mailserver_sessions_logged_in", service="pop3s") == 0
    assert delta(before, during, "mailserver_auth_failures_total", service="pop3s") == 1
    assert delta(before, during, "mailserver_auth_failures_total", service="imaps") == 0
    for service in ("smtp", "imaps", "pop3s"):
        versions = tls_versions(during, service)
        gained = {v: n - tls_versions(before, service).get(v, 0) for v, n in versions.items()}
        assert sum(gained.values()) == 1, (service, versions)
        assert all(re.fullmatch(r"TLSv1\.[23]", v) for v, n in gained.items() if n), gained

    # Closed connections and ended logins leave the gauges.
    def settled() -> bool:
        now, _ = scrape(port)
        return (value(now, "mailserver_connections_open", service="imaps") == 0
                and value(now, "mailserver_sessions_logged_in", service="imaps") == 0)

    assert wait_until(settled, timeout=10, interval=0.1)

    # Labels name services, reasons, versions and levels: never an address.
    for (_, labels), _v in during.items():
        for label, text in labels:
            assert "@" not in text, (label, text)
            with pytest.raises(ValueError):
                ipaddress.ip_address(text)


def test_metrics_page_is_the_only_page(metrics_server):
    port = metrics_server.metrics_port
    for path in ("/", "/metrics/", "/metrics/x", "/other", "/favicon.ico"):
        status, _, _ = http_get(port, path)
        assert status == 404, (path, status)
    status, _, _ = http_get(port, "/metrics", method="POST")
    assert status == 405
    status, headers, body = http_get(port, "/metrics", method="HEAD")
    assert status == 200 and body == ""
    # A scraper that asks for OpenMetrics gets it.
    status, headers, body = http_get(
        port, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text"), headers
    assert body.rstrip().endswith("# EOF")
    # An Accept header the exposition library cannot read: the text format, not a 500
    # (and no critical log line, which alerts would count).
    for accept in ("text/plain; version=abc", "application/openmetrics-text; version=1.x"):
        status, headers, body = http_get(port, "/metrics", headers={"Accept": accept})
        assert status == 200, (accept, status)
        assert headers["content-type"].startswith("text/plain"), headers
        assert "mailserver_" in body
    assert "critical" not in metrics_server.log_text()
    # Scrapes are not in the log (one line each would flood it).
    assert "/metrics" not in metrics_server.log_text()


def test_check_shows_the_metrics_listener(metrics_server):
    cp = metrics_server.admin("check")
    assert cp.returncode == 0, cp.stderr
    line = next((ln for ln in cp.stdout.splitlines() if ln.startswith("metrics ")), "")
    assert f"tcp:{metrics_server.metrics_port}:interface=127.0.0.1" in line, cp.stdout
    assert "Prometheus" in line


def test_metrics_off_by_default(server):
    configured = {int(m.group(1)) for m in re.finditer(r"tcp:(\d+):", server.config_path.read_text())}
    assert listening_ports(server.pid) == configured
    cp = server.admin("check")
    assert cp.returncode == 0, cp.stderr
    assert not any(ln.startswith("metrics") for ln in cp.stdout.splitlines()), cp.stdout


def test_metrics_port_in_use_names_the_key(make_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        srv = make_server(start=False, accounts=False,
                          listen={"metrics": f"tcp:{port}:interface=127.0.0.1"})
        code, output = srv.run_to_exit(timeout=30)
        assert code == 1, output[-2000:]
        assert f"listen.metrics = 'tcp:{port}:interface=127.0.0.1'" in output, output[-2000:]
        assert "already in use" in output
        cp = srv.admin("check")
        assert cp.returncode == 1
        assert "listen.metrics" in cp.stderr
