"""Metrics and health against real Squid, with moto_server as the CloudWatch endpoint.

A proxy with EGRESS_METRICS=on and a 1-second interval publishes to its own moto_server (module-scoped, so its
outage test cannot disturb other modules' secrets). The tests send a known mix of allowed and denied requests
and read the metrics back through boto3. ``egress-proxy health`` is checked against a running and a killed Squid.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ORIGIN_IP, MotoServer
from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, free_port, wait_for_port
from harness import client_session as session
from log_reader import Record
from proxy_runner import ProxyRunner, egress_proxy_command

PORT = 3140
HEALTH_PORT = 3141
INTERVAL = 1.0
NAMESPACE = "ProxyTest"
INSTANCE = "test-proxy"
DIMENSIONS = [{"Name": "ProxyInstance", "Value": INSTANCE}]
SEED = [
    "client_http.errors", "client_http.hits", "client_http.kbytes_in", "client_http.kbytes_out",
    "client_http.requests", "server.all.errors", "server.all.kbytes_in", "server.all.kbytes_out",
    "server.all.requests",
]
OURS = ["requests.allowed", "requests.denied", "allowlist.entries", "reload.success", "reload.failure",
        "config.age_seconds"]
BODY_KB = 100
ALLOWLIST = "allowed.test\n.wild.test\n"




@pytest.fixture(scope="module")
def cloudwatch_server() -> Iterator[MotoServer]:
    server = MotoServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def metrics_proxy(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin, tls_origin: TlsOrigin,
                  cloudwatch_server: MotoServer) -> Iterator[ProxyRunner]:
    allowlist = public_tmp / "metrics-allowlist.txt"
    allowlist.write_text(ALLOWLIST)
    runner = ProxyRunner(
        public_tmp / "metrics-state",
        {
            **cloudwatch_server.env,
            "EGRESS_ALLOWLIST_FILE": str(allowlist),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
            "EGRESS_METRICS": "on",
            "EGRESS_METRICS_INTERVAL": str(INTERVAL),
            "EGRESS_METRICS_NAMESPACE": NAMESPACE,
            "EGRESS_INSTANCE_ID": INSTANCE,
        },
        port=PORT,
    )
    runner.start()
    runner.wait_for(lambda r: r.get("event") == "metrics_started", timeout=10)
    yield runner
    runner.stop()


def sums(client: Any, names: list[str]) -> dict[str, tuple[float, float]]:
    """(Sum, SampleCount) of every metric over the last hour, for our dimension."""
    now = datetime.datetime.now(datetime.UTC)
    result: dict[str, tuple[float, float]] = {}
    for name in names:
        points = client.get_metric_statistics(
            Namespace=NAMESPACE, MetricName=name, Dimensions=DIMENSIONS, StartTime=now - datetime.timedelta(hours=1),
            EndTime=now + datetime.timedelta(hours=1), Period=3600, Statistics=["Sum", "SampleCount"],
        )["Datapoints"]
        result[name] = (sum(p["Sum"] for p in points), sum(p["SampleCount"] for p in points))
    return result


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.25)


def allowed_traffic(proxy: ProxyRunner, ca: TestCA) -> tuple[int, int]:
    """Allowed requests of every kind: plain HTTP (some with 100 KB bodies) and spliced HTTPS.
    Returns (requests, of which HTTPS tunnels)."""
    s = session()
    count = 0
    for i in range(4):
        assert s.get(f"http://allowed.test/hello/{i}", proxies=proxy.proxies, timeout=10).status_code == 200
        count += 1
    for _ in range(3):
        response = s.get(f"http://sub.wild.test/bytes/{BODY_KB * 1024}", proxies=proxy.proxies, timeout=10)
        assert response.status_code == 200 and len(response.content) == BODY_KB * 1024
        count += 1
    for _ in range(2):
        tls = session()  # a new session: one CONNECT tunnel per request
        assert tls.get("https://allowed.test/tls", proxies=proxy.proxies, verify=str(ca.ca_path),
                       timeout=10).status_code == 200
        tls.close()
        count += 1
    return count, 2


def denied_traffic(proxy: ProxyRunner) -> int:
    s = session()
    count = 0
    for host in ("denied.test", "evilallowed.test", "other.denied.test"):
        assert s.get(f"http://{host}/", proxies=proxy.proxies, timeout=10).status_code == 403
        count += 1
    for _ in range(2):
        with pytest.raises(requests.exceptions.ProxyError):
            session().get("https://denied.test/", proxies=proxy.proxies, timeout=10)
        count += 1
    return count


def test_metrics_agree_with_the_traffic(metrics_proxy: ProxyRunner, cloudwatch_server: MotoServer,
                                        ca: TestCA) -> None:
    proxy = metrics_proxy
    mark = proxy.mark()
    allowed, tunnels = allowed_traffic(proxy, ca)
    denied = denied_traffic(proxy)  # 3 plain HTTP, 2 CONNECT
    # Every request is in the access log (a tunnel is logged when it closes)...
    wait_until(lambda: len([r for r in proxy.records[mark:] if r.get("type") == "access"]) >= allowed + denied,
               10, "access log lines")
    logged = [r for r in proxy.records[mark:] if r.get("type") == "access"]
    assert sum(r["decision"] == "allowed" for r in logged) == allowed
    assert sum(r["decision"] == "denied" for r in logged) == denied
    # ...and then in CloudWatch within a few intervals.
    client = cloudwatch_server.client("cloudwatch")

    def decisions_published() -> bool:
        counts = sums(client, ["requests.allowed", "requests.denied"])
        return counts["requests.allowed"][0] == allowed and counts["requests.denied"][0] == denied

    wait_until(decisions_published, 20, "decision counts in CloudWatch")
    # Two more publications, so every metric covers the same intervals (waiting on CloudWatch, not the clock).
    samples = sums(client, ["client_http.requests"])["client_http.requests"][1]
    wait_until(lambda: sums(client, ["client_http.requests"])["client_http.requests"][1] >= samples + 2, 20,
               "two more publications")
    listed = client.list_metrics(Namespace=NAMESPACE)["Metrics"]
    names = {m["MetricName"] for m in listed if m["Dimensions"] == DIMENSIONS}
    assert set(SEED) | set(OURS) <= names, f"missing: {set(SEED) | set(OURS) - names}"
    values = sums(client, SEED + OURS)
    total = {name: value * INTERVAL for name, (value, _) in values.items()}  # rate x interval = count
    print("metrics read back:", {name: round(v, 2) for name, v in total.items()},
          f"(allowed={allowed}, denied={denied})")
    assert values["requests.allowed"][0] == allowed
    assert values["requests.denied"][0] == denied
    # Squid's own counters, with Squid's semantics: a spliced tunnel is two client requests (the CONNECT, then
    # the tunnel after the peek at the ClientHello). The metrics loop's own counter reads are taken out.
    assert total["client_http.requests"] == pytest.approx(allowed + denied + tunnels, abs=1.0)
    assert total["client_http.errors"] == pytest.approx(3, abs=0.5)  # the three 403 pages
    # Forwarded by Squid: every allowed request, and the two refused CONNECTs (relayed to the loopback refusal
    # responder, never to their destination).
    assert total["server.all.requests"] == pytest.approx(allowed + 2, abs=1.0)
    assert total["client_http.kbytes_out"] >= 3 * BODY_KB * 0.97
    assert total["server.all.kbytes_in"] == pytest.approx(3 * BODY_KB, rel=0.1)
    assert values["reload.success"][0] == 0 and values["reload.failure"][0] == 0
    samples = values["allowlist.entries"][1]
    assert samples >= 3
    assert values["allowlist.entries"][0] == 2 * samples  # two entries, every interval
    assert values["config.age_seconds"][0] > 0


def latest(client: Any, name: str) -> float | None:
    now = datetime.datetime.now(datetime.UTC)
    result = client.get_metric_data(
        MetricDataQueries=[{"Id": "m", "MetricStat": {"Metric": {"Namespace": NAMESPACE, "MetricName": name,
                                                                  "Dimensions": DIMENSIONS},
                                                       "Period": 1, "Stat": "Maximum"}}],
        StartTime=now - datetime.timedelta(hours=1), EndTime=now + datetime.timedelta(hours=1),
        ScanBy="TimestampDescending",
    )["MetricDataResults"][0]
    points = sorted(zip(result["Timestamps"], result["Values"], strict=True))
    return points[-1][1] if points else None


def test_reload_metrics(metrics_proxy: ProxyRunner, cloudwatch_server: MotoServer, public_tmp: Path) -> None:
    proxy = metrics_proxy
    client = cloudwatch_server.client("cloudwatch")
    allowlist = public_tmp / "metrics-allowlist.txt"
    mark = proxy.mark()
    allowlist.write_text(ALLOWLIST + "third.test\n")
    proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)
    allowlist.write_text(ALLOWLIST + "203.0.113.9\n")  # an IP: the whole update is rejected
    proxy.wait_for(lambda r: r.get("event") == "reload_rejected", timeout=20, start=mark)

    def reloads_published() -> bool:
        counts = sums(client, ["reload.success", "reload.failure"])
        return counts["reload.success"][0] == 1 and counts["reload.failure"][0] == 1

    wait_until(reloads_published, 20, "reload counts in CloudWatch")
    wait_until(lambda: latest(client, "allowlist.entries") == 3, 10, "the new entry count")
    age = latest(client, "config.age_seconds")
    assert age is not None and 0 <= age < 30  # the config loaded a moment ago (the rejected one never loaded)
    mark = proxy.mark()
    allowlist.write_text(ALLOWLIST)  # back to the fixture's list; Squid has taken it before the next test
    proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)


def test_cloudwatch_outage_never_breaks_proxying(metrics_proxy: ProxyRunner, cloudwatch_server: MotoServer) -> None:
    proxy = metrics_proxy
    mark = proxy.mark()
    cloudwatch_server.stop()
    try:
        failed = proxy.wait_for(lambda r: r.get("event") == "metrics_publish_failed", timeout=10, start=mark)
        assert failed["level"] == "warning" and "put_metric_data failed" in failed["message"]
        s = session()
        denied_during_outage = 0
        for _ in range(3):  # proxying is untouched while CloudWatch is down
            assert s.get("http://allowed.test/during-outage", proxies=proxy.proxies, timeout=10).status_code == 200
            assert s.get("http://denied.test/during-outage", proxies=proxy.proxies, timeout=10).status_code == 403
            denied_during_outage += 1

        def failures_so_far() -> list[Record]:
            return [r for r in proxy.records[mark:] if r.get("event") == "metrics_publish_failed"]

        # A few attempts during the outage (observed in the log, not waited for by the clock).
        wait_until(lambda: len(failures_so_far()) >= 3, 30, "three failed publications")
        failures = failures_so_far()
        # logged once per attempt, and the attempts back off (1, 2, 4 ... s): far fewer than one per interval
        assert 2 <= len(failures) <= 5, [f["retry_in"] for f in failures]
        assert [f["retry_in"] for f in failures] == sorted(f["retry_in"] for f in failures)
        assert proxy.process is not None and proxy.process.poll() is None
    finally:
        cloudwatch_server.start()  # a fresh, empty moto on the same port
    resumed = proxy.wait_for(lambda r: r.get("event") == "metrics_publish_resumed", timeout=30, start=mark)
    assert resumed["level"] == "info"
    # The datums kept during the outage arrive too: nothing was lost.
    client = cloudwatch_server.client("cloudwatch")
    wait_until(lambda: sums(client, ["requests.denied"])["requests.denied"][0] == denied_during_outage, 10,
               "the outage's denied requests in CloudWatch")


# --- health ---------------------------------------------------------------------------------------------


def health(state: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_") and "proxy" not in k.lower()}
    env.update({"EGRESS_STATE_DIR": str(state), "EGRESS_PORT": str(port), "EGRESS_LISTEN_ADDRESS": "127.0.0.1"})
    return subprocess.run([*egress_proxy_command(), "health"], env=env, capture_output=True, text=True, timeout=30)


def test_health_follows_squid(public_tmp: Path, dns: DnsServer) -> None:
    state = public_tmp / "health-state"
    before = health(state, HEALTH_PORT)
    assert before.returncode == 1 and "no status" in before.stdout
    runner = ProxyRunner(state, {"EGRESS_ALLOWED_DOMAINS": "allowed.test", "EGRESS_DNS_SERVERS": "127.0.0.1"},
                         port=HEALTH_PORT)
    runner.start()
    try:
        wait_for_port("127.0.0.1", HEALTH_PORT)
        running = health(state, HEALTH_PORT)
        assert running.returncode == 0, running.stdout + running.stderr
        assert running.stdout.startswith("healthy") and "1 entries" in running.stdout
        squid_pid = runner.events("started")[0]["pid"]
        os.kill(squid_pid, signal.SIGKILL)
        runner.wait_for(lambda r: r.get("event") == "squid_died", timeout=15)
        stopped = health(state, HEALTH_PORT)
        assert stopped.returncode == 1, stopped.stdout
        assert stopped.stdout.startswith("unhealthy") and str(HEALTH_PORT) in stopped.stdout
    finally:
        assert runner.stop() == 5  # the supervisor reports Squid's death with its own exit code


def test_stop_flushes_the_partial_interval(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin,
                                           cloudwatch_server: MotoServer) -> None:
    """With an hour-long interval nothing is published while running; the stop publishes what the partial
    interval counted, after the access log was drained (so the last requests are in it)."""
    namespace, instance = "ProxyFlushTest", "flush-proxy"
    runner = ProxyRunner(public_tmp / "metrics-flush-state", {
        **cloudwatch_server.env,
        "EGRESS_ALLOWED_DOMAINS": "allowed.test",
        "EGRESS_DNS_SERVERS": "127.0.0.1",
        "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
        "EGRESS_METRICS": "on",
        "EGRESS_METRICS_INTERVAL": "3600",
        "EGRESS_METRICS_NAMESPACE": namespace,
        "EGRESS_INSTANCE_ID": instance,
    }, port=3142)
    runner.start()
    runner.wait_for(lambda r: r.get("event") == "metrics_started", timeout=10)
    s = session()
    for _ in range(3):
        assert s.get("http://allowed.test/flush", proxies=runner.proxies, timeout=10).status_code == 200
    assert s.get("http://denied.test/flush", proxies=runner.proxies, timeout=10).status_code == 403
    assert runner.stop() == 0, runner.tail()
    client = cloudwatch_server.client("cloudwatch")
    now = datetime.datetime.now(datetime.UTC)
    counts = {}
    for name in ("requests.allowed", "requests.denied"):
        points = client.get_metric_statistics(
            Namespace=namespace, MetricName=name, Dimensions=[{"Name": "ProxyInstance", "Value": instance}],
            StartTime=now - datetime.timedelta(hours=1), EndTime=now + datetime.timedelta(hours=1), Period=3600,
            Statistics=["Sum"])["Datapoints"]
        counts[name] = sum(p["Sum"] for p in points)
    assert counts == {"requests.allowed": 3, "requests.denied": 1}, counts
