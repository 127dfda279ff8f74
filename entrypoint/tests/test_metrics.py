"""Unit tests for the metrics module: parsing, rates across resets, datums, batching, instance id, and the
loop's publish/backoff behaviour with fake Squid and CloudWatch (no I/O)."""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from typing import Any

import pytest

# isort: split
from egress_proxy.metrics import (
    DIMENSION,
    IDENTITY_METRICS,
    MAX_DATUMS_PER_CALL,
    PROXY_METRICS,
    SEED_COUNTERS,
    DecisionCounter,
    MetricsLoop,
    ProxyTotals,
    RuntimeFigures,
    backoff_delay,
    batched,
    build_datums,
    counter_delta,
    counter_rates,
    parse_counters,
    proxy_values,
    resolve_instance_id,
    task_id_from_metadata,
)
from egress_proxy.settings import load_settings

COUNTERS_PAGE = """\
sample_time = 1795771716.780259 (Fri, 27 Nov 2026 09:28:36 GMT)
client_http.requests = 120
client_http.hits = 3
client_http.errors = 7
client_http.kbytes_in = 40
client_http.kbytes_out = 900
client_http.hit_kbytes_out = 0
server.all.requests = 100
server.all.errors = 2
server.all.kbytes_in = 850
server.all.kbytes_out = 35
server.http.requests = 60
cpu_time = 1.234567
"""


def test_parse_counters_reads_the_nine_seed_counters_only() -> None:
    values = parse_counters(COUNTERS_PAGE)
    assert set(values) == set(SEED_COUNTERS)
    assert values["client_http.requests"] == 120
    assert values["client_http.kbytes_out"] == 900
    assert values["server.all.errors"] == 2
    assert "server.http.requests" not in values


def test_parse_counters_refuses_a_page_missing_a_counter() -> None:
    with pytest.raises(ValueError, match="server.all.requests"):
        parse_counters(COUNTERS_PAGE.replace("server.all.requests = 100\n", ""))
    with pytest.raises(ValueError):
        parse_counters("<html>403 Forbidden</html>")


def test_parse_counters_refuses_a_non_numeric_value() -> None:
    with pytest.raises(ValueError, match="client_http.hits"):
        parse_counters(COUNTERS_PAGE.replace("client_http.hits = 3", "client_http.hits = lots"))


def test_counter_delta_normal_and_reset() -> None:
    assert counter_delta(100, 130) == 30
    assert counter_delta(100, 100) == 0
    # Went down: Squid restarted, the new value is everything since the reset.
    assert counter_delta(100, 12) == 12
    assert counter_delta(100, 0) == 0


def test_counter_rates_are_per_second_and_never_negative() -> None:
    previous = parse_counters(COUNTERS_PAGE)
    current = dict(previous, **{"client_http.requests": 180.0, "client_http.kbytes_out": 960.0,
                                "server.all.requests": 5.0})  # server counter reset
    rates = counter_rates(previous, current, elapsed=10.0)
    assert rates["client_http.requests"] == pytest.approx(6.0)
    assert rates["client_http.kbytes_out"] == pytest.approx(6.0)
    assert rates["server.all.requests"] == pytest.approx(0.5)
    assert rates["client_http.errors"] == 0
    assert all(rate >= 0 for rate in rates.values())


def test_counter_rates_take_out_our_own_manager_reads() -> None:
    rates = counter_rates({"client_http.requests": 10.0}, {"client_http.requests": 21.0}, 2.0, own_requests=1)
    assert rates["client_http.requests"] == pytest.approx(5.0)
    # never below zero, even right after a reset
    assert counter_rates({"client_http.requests": 10.0}, {"client_http.requests": 0.0}, 2.0,
                         own_requests=1)["client_http.requests"] == 0


def test_counter_rates_reject_a_non_positive_interval() -> None:
    with pytest.raises(ValueError):
        counter_rates({}, {"client_http.requests": 1.0}, 0.0)


def test_proxy_values_counts_per_interval_and_gauges() -> None:
    values = proxy_values(ProxyTotals(allowed=5, denied=2, would_deny=1, reload_success=1, reload_failure=0,
                                      log_lines_dropped=10),
                          ProxyTotals(allowed=9, denied=2, would_deny=4, reload_success=2, reload_failure=1,
                                      log_lines_dropped=17),
                          entries=42, loaded_at=1000.0, now=1030.5)
    assert values == {
        "requests.allowed": 4, "requests.denied": 0, "requests.would_deny": 3, "allowlist.entries": 42,
        "reload.success": 1, "log.lines_dropped": 7,
        "reload.failure": 1, "config.age_seconds": 30.5,
    }
    assert "config.age_seconds" not in proxy_values(ProxyTotals(), ProxyTotals(), 0, None, 5.0)


def test_build_datums_units_and_dimension() -> None:
    stamp = datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC)
    values = {name: 1.0 for name in [*SEED_COUNTERS, *PROXY_METRICS]}
    values["unknown.metric"] = 3.0
    datums = build_datums(values, "task-123", stamp)
    by_name = {d["MetricName"]: d for d in datums}
    assert set(by_name) == set(SEED_COUNTERS) | set(PROXY_METRICS)
    assert by_name["client_http.requests"]["Unit"] == "Count/Second"
    assert by_name["server.all.kbytes_in"]["Unit"] == "Kilobytes/Second"
    assert by_name["requests.denied"]["Unit"] == "Count"
    assert by_name["config.age_seconds"]["Unit"] == "Seconds"
    for datum in datums:
        assert datum["Dimensions"] == [{"Name": DIMENSION, "Value": "task-123"}]
        assert datum["Timestamp"] == stamp


def test_batched_respects_the_put_metric_data_limit() -> None:
    stamp = datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC)
    datums = build_datums({"requests.allowed": 1.0}, "x", stamp) * 2500
    sizes = [len(batch) for batch in batched(datums)]
    assert sizes == [MAX_DATUMS_PER_CALL, MAX_DATUMS_PER_CALL, 500]
    assert list(batched([])) == []


def test_backoff_doubles_and_caps() -> None:
    assert backoff_delay(0, 60) == 0
    assert [backoff_delay(n, 10, cap=100) for n in range(1, 6)] == [10, 20, 40, 80, 100]
    assert backoff_delay(1000, 60) == 300


def test_task_id_from_metadata() -> None:
    arn = "arn:aws:ecs:eu-west-1:123456789012:task/egress-cluster/0123456789abcdef0123456789abcdef"
    assert task_id_from_metadata({"TaskARN": arn}) == "0123456789abcdef0123456789abcdef"
    assert task_id_from_metadata({}) is None
    assert task_id_from_metadata({"TaskARN": ""}) is None


def test_instance_id_prefers_the_setting_then_ecs_then_hostname() -> None:
    arn = "arn:aws:ecs:eu-west-1:123456789012:task/c/abc123"
    seen: list[str] = []

    def fetch(url: str) -> dict[str, Any]:
        seen.append(url)
        return {"TaskARN": arn}

    def broken(url: str) -> dict[str, Any]:
        raise OSError("connection refused")

    ecs = {"ECS_CONTAINER_METADATA_URI_V4": "http://169.254.170.2/v4/abc/"}
    assert resolve_instance_id("proxy-a", ecs, fetch, lambda: "host") == "proxy-a"
    assert seen == []
    assert resolve_instance_id(None, ecs, fetch, lambda: "host") == "abc123"
    assert seen == ["http://169.254.170.2/v4/abc/task"]
    assert resolve_instance_id(None, ecs, broken, lambda: "host") == "host"
    assert resolve_instance_id(None, {}, fetch, lambda: "host") == "host"


def test_decision_counter_is_thread_safe() -> None:
    counter = DecisionCounter()

    def work() -> None:
        for i in range(10_000):
            counter.observe({"decision": ("denied", "would_deny", "allowed", "allowed")[i % 4]})
        counter.observe({"type": "access", "unparsed": "x"})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.totals() == (4 * 5000, 4 * 2500, 4 * 2500)


# --- the loop, with fakes -------------------------------------------------------------------------------


@dataclass
class FakeStats:
    success: int = 0
    failure: int = 0
    loaded_at: float | None = 1000.0
    entries: int = 5


class FakeLogger:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []

    def event(self, level: str, event: str, message: str, **fields: Any) -> None:
        self.events.append((level, event, message, fields))

    def named(self, name: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        return [e for e in self.events if e[1] == name]


class FakeCloudWatch:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.down = False

    def put_metric_data(self, **kwargs: Any) -> None:
        if self.down:
            raise ConnectionError("endpoint unreachable")
        self.calls.append(kwargs)

    def values(self, name: str) -> list[float]:
        return [d["Value"] for call in self.calls for d in call["MetricData"] if d["MetricName"] == name]


class FakeSquid:
    def __init__(self) -> None:
        self.requests = 0
        self.up = True

    def read(self) -> str:
        if not self.up:
            raise ConnectionRefusedError("connection refused")
        page = COUNTERS_PAGE.replace("client_http.requests = 120", f"client_http.requests = {self.requests}")
        self.requests += 1  # Squid counts our read after answering it
        return page


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_loop(interval: str = "10") -> tuple[MetricsLoop, FakeCloudWatch, FakeSquid, FakeLogger, Clock,
                                             DecisionCounter, FakeStats]:
    settings = load_settings({"metrics_interval": interval, "allowed_domains": "example.com"}, {})
    cloudwatch, squid, logger, clock = FakeCloudWatch(), FakeSquid(), FakeLogger(), Clock()
    decisions, stats = DecisionCounter(), FakeStats()
    runtime = RuntimeFigures(workers_up=1, workers_configured=2, worker_deaths=3, log_lines_dropped={"access": 4})
    loop = MetricsLoop(settings, logger, lambda: stats, decisions, client_factory=lambda: cloudwatch,  # type: ignore[arg-type,return-value]
                       read=squid.read, instance_id=lambda: "test", clock=clock, wall=lambda: 2000.0,
                       runtime=lambda: runtime)
    loop.instance = "test"
    return loop, cloudwatch, squid, logger, clock, decisions, stats


def test_loop_publishes_rates_excluding_its_own_reads() -> None:
    loop, cloudwatch, squid, _, clock, decisions, stats = make_loop()
    loop.baseline()  # Squid just started: everything at zero
    clock.now = 110.0
    squid.requests = 30  # 30 client requests in the first 10 s
    for _ in range(3):
        decisions.observe({"decision": "allowed"})
    decisions.observe({"decision": "denied"})
    loop.tick()
    assert cloudwatch.values("client_http.requests") == [pytest.approx(3.0)]
    assert cloudwatch.values("requests.allowed") == [3]
    assert cloudwatch.values("requests.denied") == [1]
    assert {d["MetricName"] for d in cloudwatch.calls[0]["MetricData"]} == set(SEED_COUNTERS) | set(PROXY_METRICS)
    clock.now = 120.0
    squid.requests += 20  # 20 more client requests; Squid also counted our previous read
    stats.success = 1
    loop.tick()
    assert cloudwatch.values("client_http.requests")[-1] == pytest.approx(2.0)
    assert cloudwatch.values("requests.allowed")[-1] == 0
    assert cloudwatch.values("reload.success")[-1] == 1
    assert cloudwatch.values("config.age_seconds")[-1] == 1000.0
    assert cloudwatch.values("allowlist.entries")[-1] == 5


def test_loop_without_baseline_uses_the_first_read_as_baseline() -> None:
    loop, cloudwatch, squid, _, clock, _, _ = make_loop()
    squid.requests = 50
    loop.tick()
    assert cloudwatch.calls == []
    clock.now = 110.0
    squid.requests += 10
    loop.tick()
    assert cloudwatch.values("client_http.requests") == [pytest.approx(1.0)]


def test_loop_thread_starts_and_stops() -> None:
    loop, _, _, logger, _, _, _ = make_loop()
    loop.start()
    loop.stop()
    assert loop._thread is not None
    loop._thread.join(timeout=5)
    assert not loop._thread.is_alive()
    assert logger.named("metrics_started")[0][3]["instance"] == "test"


def test_loop_outage_is_logged_with_backoff_and_datums_are_kept() -> None:
    loop, cloudwatch, squid, logger, clock, decisions, _ = make_loop()
    loop.baseline()
    cloudwatch.down = True
    for step in range(1, 8):
        clock.now = 100.0 + 10 * step
        decisions.observe({"decision": "denied"})
        loop.tick()
    failures = logger.named("metrics_publish_failed")
    # attempts at 110 (fail, wait 10), 120 (fail, wait 20), 140 (fail, wait 40): 3 attempts, 3 log lines
    assert [f[3]["retry_in"] for f in failures] == [10, 20, 40]
    assert cloudwatch.calls == []
    cloudwatch.down = False
    clock.now = 190.0
    loop.tick()
    assert logger.named("metrics_publish_resumed")
    assert not loop.pending
    # nothing lost: one denied request per interval, 8 intervals
    assert sum(cloudwatch.values("requests.denied")) == 7
    assert len(cloudwatch.values("requests.denied")) == 8


def test_loop_squid_read_failure_keeps_the_baseline() -> None:
    loop, cloudwatch, squid, logger, clock, _, _ = make_loop()
    loop.baseline()
    clock.now = 110.0
    squid.requests = 10
    loop.tick()
    squid.up = False
    clock.now = 120.0
    loop.tick()
    clock.now = 130.0
    loop.tick()
    assert len(logger.named("metrics_read_failed")) == 1
    squid.up = True
    squid.requests += 20
    clock.now = 140.0
    loop.tick()
    assert logger.named("metrics_read_resumed")
    # 20 requests over the 30 s since the last good read
    assert cloudwatch.values("client_http.requests")[-1] == pytest.approx(20 / 30)


def test_loop_survives_a_broken_client_factory() -> None:
    loop, _, _, logger, clock, _, _ = make_loop()

    def no_region() -> Any:
        raise RuntimeError("You must specify a region.")

    loop._client_factory = no_region
    loop.baseline()
    clock.now = 110.0
    loop.tick()
    assert logger.named("metrics_publish_failed")
    assert loop.pending


def test_operations_guide_lists_every_metric_with_its_unit() -> None:
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in guide.splitlines() if line.startswith("| `")}
    for name, unit in {**SEED_COUNTERS, **PROXY_METRICS, **IDENTITY_METRICS}.items():
        assert rows.get(name) == unit, f"docs/operations.md: metric {name} should be listed with unit {unit}"
