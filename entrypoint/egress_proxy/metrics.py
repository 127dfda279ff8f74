"""CloudWatch metrics: Squid's counters as per-second rates, plus decisions, reloads and config age.

A daemon thread reads Squid's cache manager (``mgr:counters``) over loopback every ``EGRESS_METRICS_INTERVAL``
seconds and publishes with ``put_metric_data`` to ``EGRESS_METRICS_NAMESPACE``, dimension ``ProxyInstance``.
Nothing here can touch proxying: every failure is logged (once per failed attempt, retried with exponential
backoff) and the datums wait in a bounded buffer until CloudWatch answers again.

The pure parts (counter parsing, deltas and rates, datum building, batching, instance id) are plain functions,
unit-tested without Squid or AWS; ``MetricsLoop`` is the I/O around them.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .settings import Settings
from .squid_strings import MANAGER_COUNTERS_PATH
from .threads import named_thread

if TYPE_CHECKING:
    from mypy_boto3_cloudwatch.client import CloudWatchClient
    from mypy_boto3_cloudwatch.literals import StandardUnitType
    from mypy_boto3_cloudwatch.type_defs import MetricDatumTypeDef

DIMENSION = "ProxyInstance"
MAX_DATUMS_PER_CALL = 1000  # the PutMetricData limit
MAX_PENDING_DATUMS = 20_000  # about 20 hours of datums at the default interval; the oldest go first
MAX_BACKOFF_SECONDS = 300.0

# The seed's nine counters, under the seed's names, published as per-second rates.
SEED_COUNTERS: dict[str, StandardUnitType] = {
    "client_http.errors": "Count/Second",
    "client_http.hits": "Count/Second",
    "client_http.kbytes_in": "Kilobytes/Second",
    "client_http.kbytes_out": "Kilobytes/Second",
    "client_http.requests": "Count/Second",
    "server.all.errors": "Count/Second",
    "server.all.kbytes_in": "Kilobytes/Second",
    "server.all.kbytes_out": "Kilobytes/Second",
    "server.all.requests": "Count/Second",
}

# Ours: counts per interval, and two gauges.
PROXY_METRICS: dict[str, StandardUnitType] = {
    "requests.allowed": "Count",
    "requests.denied": "Count",
    "requests.would_deny": "Count",
    "allowlist.entries": "Count",
    "reload.success": "Count",
    "reload.failure": "Count",
    "config.age_seconds": "Seconds",
    "log.lines_dropped": "Count",
    "workers.up": "Count",
    "workers.configured": "Count",
}
# Client identity (membership.py): addresses in the membership table, and 1 while AWS polls fail (the last known
# membership keeps serving meanwhile).
IDENTITY_METRICS: dict[str, StandardUnitType] = {
    "identity.members": "Count",
    "identity.refresh_failing": "Count",
}


# --- pure parts --------------------------------------------------------------------------------------------


def parse_counters(text: str, names: Sequence[str] = tuple(SEED_COUNTERS)) -> dict[str, float]:
    """``mgr:counters`` output (``name = value`` lines) -> the wanted counters. Raises ValueError if any is
    missing, so a truncated or error page is never mistaken for zeros."""
    wanted = set(names)
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, sep, raw = line.partition("=")
        name = name.strip()
        if not sep or name not in wanted:
            continue
        try:
            values[name] = float(raw.strip().split()[0])
        except (ValueError, IndexError):
            raise ValueError(f"counter {name} has no numeric value: {line.strip()!r}") from None
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"cache manager output lacks {', '.join(missing)}")
    return values


def counter_delta(previous: float, current: float) -> float:
    """Increase of a monotonic counter. A counter that went down was reset (Squid restarted): everything it
    counts now happened since the reset, so the new value is the delta. Never negative."""
    return current - previous if current >= previous else current


def counter_rates(previous: Mapping[str, float], current: Mapping[str, float], elapsed: float,
                  own_requests: int = 0) -> dict[str, float]:
    """Per-second rates of every counter in ``current`` over ``elapsed`` seconds. ``own_requests`` (our own
    cache-manager reads that Squid counted in between) is taken out of ``client_http.requests``."""
    if elapsed <= 0:
        raise ValueError("elapsed must be positive")
    rates: dict[str, float] = {}
    for name, value in current.items():
        delta = counter_delta(previous.get(name, 0.0), value)
        if name == "client_http.requests":
            delta = max(0.0, delta - own_requests)
        rates[name] = delta / elapsed
    return rates


@dataclass(frozen=True)
class ProxyTotals:
    """Cumulative counts of the supervisor at one moment (they only grow while the supervisor runs)."""

    allowed: int = 0
    denied: int = 0
    would_deny: int = 0
    reload_success: int = 0
    reload_failure: int = 0
    log_lines_dropped: int = 0


@dataclass(frozen=True)
class RuntimeFigures:
    """The faults the supervisor watches, at one moment: Squid's workers and the log lines stdout did not take."""

    workers_up: int
    workers_configured: int
    worker_deaths: int
    log_lines_dropped: Mapping[str, int]  # by type (access, cache_log, supervisor), since start


def proxy_values(previous: ProxyTotals, current: ProxyTotals, entries: int, loaded_at: float | None,
                 now: float) -> dict[str, float]:
    """Our metrics for one interval: counts since ``previous``, the entry count and the config age."""
    values = {
        "requests.allowed": counter_delta(previous.allowed, current.allowed),
        "requests.denied": counter_delta(previous.denied, current.denied),
        "requests.would_deny": counter_delta(previous.would_deny, current.would_deny),
        "allowlist.entries": float(entries),
        "reload.success": counter_delta(previous.reload_success, current.reload_success),
        "reload.failure": counter_delta(previous.reload_failure, current.reload_failure),
        "log.lines_dropped": counter_delta(previous.log_lines_dropped, current.log_lines_dropped),
    }
    if loaded_at is not None:
        values["config.age_seconds"] = max(0.0, now - loaded_at)
    return values


def identity_values(stats: object) -> dict[str, float]:
    """The identity gauges, when the stats carry an ``identity`` (membership.IdentityStats)."""
    identity = getattr(stats, "identity", None)
    if identity is None or not identity.active:
        return {}
    return {"identity.members": float(identity.members), "identity.refresh_failing": float(identity.failing)}


def build_datums(values: Mapping[str, float], instance: str, timestamp: datetime.datetime) -> list[MetricDatumTypeDef]:
    """One datum per known metric in ``values``, with its unit and the ``ProxyInstance`` dimension."""
    units = {**SEED_COUNTERS, **PROXY_METRICS, **IDENTITY_METRICS}
    datums: list[MetricDatumTypeDef] = []
    for name, value in values.items():
        if name not in units:
            continue
        datums.append({
            "MetricName": name,
            "Dimensions": [{"Name": DIMENSION, "Value": instance}],
            "Timestamp": timestamp,
            "Value": float(value),
            "Unit": units[name],
        })
    return datums


def batched(datums: Sequence[MetricDatumTypeDef],
            size: int = MAX_DATUMS_PER_CALL) -> Iterator[list[MetricDatumTypeDef]]:
    """Consecutive batches of at most ``size`` datums (the PutMetricData limit), in order."""
    for start in range(0, len(datums), size):
        yield list(datums[start:start + size])


def backoff_delay(failures: int, base: float, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Wait before the next attempt after ``failures`` consecutive failures: base, 2*base, 4*base... capped."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 30)))


def task_id_from_metadata(document: Mapping[str, Any]) -> str | None:
    """ECS task metadata v4 ``/task`` document -> the task id (the last segment of ``TaskARN``)."""
    arn = document.get("TaskARN")
    if not isinstance(arn, str) or not arn.strip():
        return None
    return arn.strip().rsplit("/", 1)[-1] or None


def resolve_instance_id(setting: str | None, environ: Mapping[str, str],
                        fetch_json: Callable[[str], Mapping[str, Any]], hostname: Callable[[], str]) -> str:
    """The dimension value: the setting, else the ECS task id (when the metadata endpoint is advertised and
    answers), else the host name."""
    if setting:
        return setting
    endpoint = environ.get("ECS_CONTAINER_METADATA_URI_V4")
    if endpoint:
        try:
            task_id = task_id_from_metadata(fetch_json(endpoint.rstrip("/") + "/task"))
        except (OSError, ValueError):
            task_id = None
        if task_id:
            return task_id
    return hostname()


# --- the supervisor's side -----------------------------------------------------------------------------------


class DecisionCounter:
    """Thread-safe count of access-log decisions; the access-log relay calls ``observe`` for every record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._allowed = 0
        self._denied = 0
        self._would_deny = 0
        self._by_label: dict[tuple[str, str, str], int] = {}  # (decision, reason, policy) -> count

    def observe(self, record: Mapping[str, Any]) -> None:
        decision = record.get("decision")
        with self._lock:
            if decision == "allowed":
                self._allowed += 1
            elif decision == "denied":
                self._denied += 1
            elif decision == "would_deny":  # let through by a report-mode policy: neither allowed nor denied
                self._would_deny += 1
            else:
                return
            key = (decision, str(record.get("reason") or ""), str(record.get("policy") or ""))
            self._by_label[key] = self._by_label.get(key, 0) + 1

    def by_label(self) -> dict[tuple[str, str, str], int]:
        """Counts by (decision, reason, policy), for the Prometheus exporter."""
        with self._lock:
            return dict(self._by_label)

    def totals(self) -> tuple[int, int, int]:
        """(allowed, denied, would_deny) so far."""
        with self._lock:
            return self._allowed, self._denied, self._would_deny


class ReloadStatsLike(Protocol):
    success: int
    failure: int
    loaded_at: float | None
    entries: int


class EventLogger(Protocol):
    def event(self, level: str, event: str, message: str, **fields: Any) -> None: ...


# --- I/O ---------------------------------------------------------------------------------------------------------


def manager_host(settings: Settings) -> str:
    host = str(settings.listen_address)
    if host == "0.0.0.0":
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class _ProxyHeaderConnection(http.client.HTTPConnection):
    """Starts with a PROXY v1 ``UNKNOWN`` header: on a port that requires one (EGRESS_PROXY_PROTOCOL=required),
    Squid then keeps the connection's real (loopback) addresses, which its rules allow to read the manager."""

    def connect(self) -> None:
        super().connect()
        self.sock.sendall(b"PROXY UNKNOWN\r\n")


def read_counters(host: str, port: int, timeout: float = 5.0, *, proxy_header: bool = False) -> str:
    """GET /squid-internal-mgr/counters straight from Squid (not through any proxy from the environment).
    ``proxy_header``: the port requires a PROXY protocol header (EGRESS_PROXY_PROTOCOL=required)."""
    kind = _ProxyHeaderConnection if proxy_header else http.client.HTTPConnection
    connection = kind(host, port, timeout=timeout)
    try:
        connection.request("GET", MANAGER_COUNTERS_PATH, headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read().decode("utf-8", errors="replace")
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"cache manager answered HTTP {response.status}")
    return body


def fetch_json(url: str, timeout: float = 2.0) -> Mapping[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    with opener.open(url, timeout=timeout) as response:
        document = json.loads(response.read().decode("utf-8"))
    if not isinstance(document, dict):
        raise ValueError("task metadata is not a JSON object")
    return document


def cloudwatch_client() -> CloudWatchClient:
    import boto3
    from botocore.config import Config

    # Short timeouts and few retries: a slow CloudWatch must not hold the loop; our own backoff retries.
    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.session.Session().client("cloudwatch", config=config)


@dataclass
class _Sample:
    at: float  # monotonic
    counters: dict[str, float]
    totals: ProxyTotals
    from_read: bool  # our read of it is itself counted by Squid in the next sample


class MetricsLoop:
    """Samples every interval and publishes; runs in its own daemon thread and never raises out of it."""

    def __init__(self, settings: Settings, logger: EventLogger, stats: Callable[[], ReloadStatsLike],
                 decisions: DecisionCounter, *, client_factory: Callable[[], CloudWatchClient] = cloudwatch_client,
                 read: Callable[[], str] | None = None, instance_id: Callable[[], str] | None = None,
                 runtime: Callable[[], RuntimeFigures] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.logger = logger
        self.stats = stats
        self.decisions = decisions
        self.runtime = runtime
        self.namespace = settings.metrics_namespace
        self.interval = settings.metrics_interval
        self._client_factory = client_factory
        self._client: CloudWatchClient | None = None
        host, port = manager_host(settings), settings.port
        proxy_header = settings.proxy_protocol == "required"
        self._read = read or (lambda: read_counters(host, port, proxy_header=proxy_header))
        self._instance_id = instance_id or (lambda: resolve_instance_id(
            settings.instance_id, os.environ, fetch_json, socket.gethostname))
        self.clock = clock
        self.wall = wall
        self.instance: str | None = None
        self.pending: deque[MetricDatumTypeDef] = deque()
        self.dropped = 0
        self.failures = 0
        self.next_attempt = 0.0
        self.published = 0
        self._read_failing = False
        self._previous: _Sample | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Call right after Squid is up: its counters start at zero, which is the first baseline."""
        self.baseline()
        self._thread = named_thread(self._run, "metrics")
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """End the thread, then flush the partial interval since the last sample (the supervisor calls this
        after Squid has exited and the access log is drained, so every decision is counted)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.sample(final=True)
            self.publish()
        except Exception as exc:  # never let a metrics bug turn a clean stop into a crash
            self.logger.event("error", "metrics_error", f"final metrics flush failed: {type(exc).__name__}: {exc}")

    def baseline(self) -> None:
        """Squid was just started by us, so every counter is zero now: the first interval counts everything."""
        self._previous = _Sample(self.clock(), dict.fromkeys(SEED_COUNTERS, 0.0), self._totals(), False)

    def _run(self) -> None:
        try:
            self.instance = self._instance_id()
        except Exception as exc:  # never let the thread die
            self.instance = socket.gethostname()
            self.logger.event("warning", "metrics_instance_id", f"cannot determine the instance id ({exc}); "
                              f"using the host name {self.instance}")
        self.logger.event("info", "metrics_started", f"publishing metrics to CloudWatch namespace {self.namespace} "
                          f"every {self.interval:g} s as {DIMENSION}={self.instance}",
                          namespace=self.namespace, interval=self.interval, instance=self.instance)
        next_tick = self.clock() + self.interval
        while not self._stop.wait(max(0.0, next_tick - self.clock())):
            next_tick += self.interval
            if next_tick < self.clock():  # fell behind (e.g. a slow CloudWatch call): skip, don't burst
                next_tick = self.clock() + self.interval
            try:
                self.tick()
            except Exception as exc:  # a bug here must not end metrics, and never proxying
                self.logger.event("error", "metrics_error", f"metrics tick failed: {type(exc).__name__}: {exc}")

    # --- one step ----------------------------------------------------------------------------------------------
    def _totals(self) -> ProxyTotals:
        allowed, denied, would_deny = self.decisions.totals()
        stats = self.stats()
        dropped = sum(self.runtime().log_lines_dropped.values()) if self.runtime is not None else 0
        return ProxyTotals(allowed, denied, would_deny, stats.success, stats.failure, dropped)

    def _gauges(self) -> dict[str, float]:
        if self.runtime is None:
            return {}
        figures = self.runtime()
        return {"workers.up": float(figures.workers_up), "workers.configured": float(figures.workers_configured)}

    def tick(self) -> None:
        """Sample, turn the sample into datums, publish what is pending (unless backing off)."""
        self.sample()
        self.publish()

    def sample(self, final: bool = False) -> None:
        """``final``: the last, partial interval; Squid may be gone, so without its counters our own counts
        (decisions, reloads) are still published."""
        now, wall = self.clock(), self.wall()
        totals = self._totals()
        try:
            counters = parse_counters(self._read())
        except (OSError, ValueError) as exc:
            if final and self._previous is not None and now > self._previous.at:
                stats = self.stats()
                own = proxy_values(self._previous.totals, totals, stats.entries, stats.loaded_at, wall)
                own.update(self._gauges())
                timestamp = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
                self._queue(build_datums(own, self.instance or socket.gethostname(), timestamp))
                return
            # Keep the previous sample as the baseline: the next good read covers the whole gap.
            if not self._read_failing:
                self.logger.event("warning", "metrics_read_failed",
                                  f"cannot read Squid's counters: {exc}; retrying every {self.interval:g} s")
            self._read_failing = True
            return
        if self._read_failing:
            self.logger.event("info", "metrics_read_resumed", "reading Squid's counters again")
            self._read_failing = False
        previous = self._previous
        self._previous = _Sample(now, counters, totals, True)
        if previous is None or now <= previous.at:
            return  # no baseline yet: this sample is it
        stats = self.stats()
        values: dict[str, float] = counter_rates(previous.counters, counters, now - previous.at,
                                                 own_requests=1 if previous.from_read else 0)
        values.update(proxy_values(previous.totals, totals, stats.entries, stats.loaded_at, wall))
        values.update(identity_values(stats))
        values.update(self._gauges())
        timestamp = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
        self._queue(build_datums(values, self.instance or socket.gethostname(), timestamp))

    def _queue(self, datums: list[MetricDatumTypeDef]) -> None:
        self.pending.extend(datums)
        while len(self.pending) > MAX_PENDING_DATUMS:
            self.pending.popleft()
            self.dropped += 1

    def publish(self) -> None:
        if not self.pending or self.clock() < self.next_attempt:
            return
        try:
            if self._client is None:
                self._client = self._client_factory()
            for batch in batched(list(self.pending)):
                self._client.put_metric_data(Namespace=self.namespace, MetricData=batch)
                for _ in batch:
                    self.pending.popleft()
                self.published += len(batch)
        except Exception as exc:  # botocore raises many kinds; none of them may escape
            self.failures += 1
            delay = backoff_delay(self.failures, self.interval)
            self.next_attempt = self.clock() + delay
            dropped = f"; {self.dropped} oldest datums dropped so far" if self.dropped else ""
            self.logger.event("warning", "metrics_publish_failed",
                              f"CloudWatch put_metric_data failed: {type(exc).__name__}: {exc}; "
                              f"{len(self.pending)} datums kept, retry in {delay:g} s{dropped}",
                              failures=self.failures, retry_in=delay, pending=len(self.pending))
            return
        if self.failures:
            self.logger.event("info", "metrics_publish_resumed",
                              f"CloudWatch accepted metrics again after {self.failures} failed attempts",
                              failures=self.failures)
        self.failures = 0
        self.next_attempt = 0.0
