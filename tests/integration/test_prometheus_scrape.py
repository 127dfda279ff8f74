"""Prometheus metrics against real Squid: scraped with the client library's own parser and compared to known
traffic, as test_metrics_health.py does for CloudWatch (it shares that module's traffic mix)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ORIGIN_IP
from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, free_port
from harness import client_session as session
from prometheus_client.parser import text_string_to_metric_families
from proxy_runner import ProxyRunner
from test_metrics_health import BODY_KB, allowed_traffic, denied_traffic

ALLOWLIST = "allowed.test\n.wild.test\n"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def prometheus_proxy(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin,
                     tls_origin: TlsOrigin) -> Iterator[ProxyRunner]:
    allowlist = public_tmp / "prometheus-allowlist.txt"
    allowlist.write_text(ALLOWLIST)
    runner = ProxyRunner(
        public_tmp / "prometheus-state",
        {
            "EGRESS_ALLOWLIST_FILE": str(allowlist),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
            "EGRESS_PROMETHEUS_PORT": str(free_port()),
        },
        port=free_port(),
    )
    runner.start()
    yield runner
    runner.stop()


def metrics_url(proxy: ProxyRunner) -> str:
    return f"http://{proxy.host}:{proxy.env['EGRESS_PROMETHEUS_PORT']}/metrics"


def scrape(proxy: ProxyRunner) -> Samples:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(metrics_url(proxy), timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_metrics_agree_with_the_traffic(prometheus_proxy: ProxyRunner, ca: TestCA) -> None:
    proxy = prometheus_proxy
    before = scrape(proxy)
    allowed, tunnels = allowed_traffic(proxy, ca)
    denied = denied_traffic(proxy)  # 3 plain HTTP, 2 CONNECT, all domain_not_allowlisted
    # Wait on the metric itself, not on the access log: the log line and the counter are two sources, and a
    # scrape taken right after the line once saw 4 of 5 denials on a busy machine. Each scrape reads Squid's
    # counters through the cache manager, which Squid counts as one client request: count the scrapes.
    after: Samples = before
    scrapes = 0

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def decisions_counted() -> bool:
        nonlocal after, scrapes
        after, scrapes = scrape(proxy), scrapes + 1
        return (delta("egress_proxy_requests_total", decision="allowed", reason="allowed", policy="default")
                >= allowed and delta("egress_proxy_requests_total", decision="denied",
                                     reason="domain_not_allowlisted", policy="default") >= denied)

    wait_until(decisions_counted, 30, "every decision counted in egress_proxy_requests_total")

    print("scraped deltas:", {name: delta(name) for name in (
        "egress_proxy_client_http_requests_total", "egress_proxy_server_requests_total",
        "egress_proxy_server_received_bytes_total", "egress_proxy_client_http_sent_bytes_total")})
    assert delta("egress_proxy_requests_total", decision="allowed", reason="allowed", policy="default") == allowed
    assert delta("egress_proxy_requests_total", decision="denied", reason="domain_not_allowlisted",
                 policy="default") == denied  # a flat allowlist is the one policy "default"
    assert value(after, "egress_proxy_squid_up") == 1
    # Squid's counters, with the CloudWatch test's semantics, plus one per scrape's own read.
    assert delta("egress_proxy_client_http_requests_total") == pytest.approx(allowed + denied + tunnels + scrapes,
                                                                             abs=1)
    assert delta("egress_proxy_client_http_errors_total") == pytest.approx(3, abs=0.5)
    assert delta("egress_proxy_server_requests_total") == pytest.approx(allowed + 2, abs=1)
    assert delta("egress_proxy_server_received_bytes_total") == pytest.approx(3 * BODY_KB * 1024, rel=0.1)
    assert delta("egress_proxy_client_http_sent_bytes_total") >= 3 * BODY_KB * 1024 * 0.97
    assert value(after, "egress_proxy_allowlist_entries") == 2
    assert value(after, "egress_proxy_config_age_seconds") > 0


def test_reload_metrics(prometheus_proxy: ProxyRunner, public_tmp: Path) -> None:
    proxy = prometheus_proxy
    before = scrape(proxy)
    allowlist = public_tmp / "prometheus-allowlist.txt"
    mark = proxy.mark()
    allowlist.write_text(ALLOWLIST + "third.test\n")
    proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)
    allowlist.write_text(ALLOWLIST + "203.0.113.9\n")  # an IP: the whole update is rejected
    proxy.wait_for(lambda r: r.get("event") == "reload_rejected", timeout=20, start=mark)
    after = scrape(proxy)
    for result in ("success", "failure"):
        assert (value(after, "egress_proxy_reloads_total", result=result)
                - value(before, "egress_proxy_reloads_total", result=result)) == 1
    assert value(after, "egress_proxy_allowlist_entries") == 3
    assert 0 <= value(after, "egress_proxy_config_age_seconds") < 30  # the rejected update never loaded
    mark = proxy.mark()
    allowlist.write_text(ALLOWLIST)
    proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)


def test_served_by_the_supervisor_on_the_listen_address_only(prometheus_proxy: ProxyRunner) -> None:
    proxy = prometheus_proxy
    port = int(proxy.env["EGRESS_PROMETHEUS_PORT"])
    started = proxy.events("prometheus_started")
    assert started and started[0]["address"] == proxy.host and started[0]["port"] == port
    # Bound to EGRESS_LISTEN_ADDRESS (127.0.0.1), not to every address: another loopback address is refused.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
    # Squid's client port does not serve it.
    response = session().get(f"http://{proxy.host}:{proxy.port}/metrics", timeout=10)
    assert "egress_proxy_requests_total" not in response.text
