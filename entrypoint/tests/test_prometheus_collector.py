"""The Prometheus collector: every figure read at scrape time, Squid's kilobytes as bytes, a failed Squid read
reported as egress_proxy_squid_up 0 instead of an error."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from egress_proxy.metrics import SEED_COUNTERS, DecisionCounter
from egress_proxy.prometheus import ProxyCollector


@dataclass
class Stats:
    success: int = 2
    failure: int = 1
    loaded_at: float | None = 1000.0
    entries: int = 7


def _scrape(read: str | Exception) -> dict[str, float]:
    decisions = DecisionCounter()
    for record in ({"decision": "allowed", "reason": "allowed"}, {"decision": "denied", "reason": "ip_literal"},
                   {"decision": "denied", "reason": "ip_literal", "policy": "build"}):
        decisions.observe(record)

    def reader() -> str:
        if isinstance(read, Exception):
            raise read
        return read

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(Stats, decisions, reader, clock=lambda: 1012.5))
    text = generate_latest(registry).decode()
    return {sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_figures_and_names() -> None:
    counters = "\n".join(f"{name} = {n}" for n, name in enumerate(SEED_COUNTERS, start=1))
    samples = _scrape(counters)
    assert samples["egress_proxy_requests_total[('decision', 'allowed'), ('policy', ''), ('reason', 'allowed')]"] == 1
    assert samples["egress_proxy_requests_total[('decision', 'denied'), ('policy', ''), ('reason', 'ip_literal')]"] == 1
    assert samples["egress_proxy_requests_total[('decision', 'denied'), ('policy', 'build'), "
                   "('reason', 'ip_literal')]"] == 1
    assert samples["egress_proxy_reloads_total[('result', 'success')]"] == 2
    assert samples["egress_proxy_reloads_total[('result', 'failure')]"] == 1
    assert samples["egress_proxy_allowlist_entries[]"] == 7
    assert samples["egress_proxy_config_age_seconds[]"] == 12.5
    assert samples["egress_proxy_squid_up[]"] == 1
    # client_http.kbytes_in is the 3rd counter in SEED_COUNTERS: 3 KB -> bytes
    assert samples["egress_proxy_client_http_received_bytes_total[]"] == 3 * 1024
    assert samples["egress_proxy_server_requests_total[]"] == 9


def test_squid_down_is_a_gauge_not_an_error() -> None:
    samples = _scrape(OSError("connection refused"))
    assert samples["egress_proxy_squid_up[]"] == 0
    assert not [name for name in samples if name.startswith("egress_proxy_client_http")]
    assert samples["egress_proxy_allowlist_entries[]"] == 7
