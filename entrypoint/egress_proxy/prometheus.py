"""Prometheus metrics (EGRESS_PROMETHEUS_PORT): the CloudWatch figures, served by the official client library.

The supervisor serves ``/metrics`` on its own port, bound to EGRESS_LISTEN_ADDRESS (never on Squid's client port).
Every figure is read when Prometheus scrapes, from the same sources the CloudWatch loop (metrics.py) uses: Squid's
cache manager counters, the access-log decision counts and the reload statistics. So the exporter works with
CloudWatch off (Compose, Kubernetes), keeps no state of its own, and cannot disagree with what it reads. Squid's
counters are monotonic totals since Squid started, which is what a Prometheus counter is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .metrics import (
    SEED_COUNTERS,
    DecisionCounter,
    ReloadStatsLike,
    RuntimeFigures,
    manager_host,
    parse_counters,
    read_counters,
)
from .settings import Settings

PREFIX = "egress_proxy_"

# The seed's nine Squid counters under Prometheus names (kbytes become bytes): name, help, scale.
SQUID_COUNTERS: dict[str, tuple[str, str, float]] = {
    "client_http.requests": ("client_http_requests", "Requests received from clients (Squid's "
                             "client_http.requests; a spliced HTTPS tunnel counts twice, and each scrape once).", 1),
    "client_http.hits": ("client_http_hits", "Cache hits (Squid's client_http.hits; always 0: nothing is cached).",
                         1),
    "client_http.errors": ("client_http_errors", "Requests answered with an error (Squid's client_http.errors).", 1),
    "client_http.kbytes_in": ("client_http_received_bytes", "Bytes received from clients (Squid's "
                              "client_http.kbytes_in x 1024).", 1024),
    "client_http.kbytes_out": ("client_http_sent_bytes", "Bytes sent to clients (Squid's client_http.kbytes_out "
                               "x 1024).", 1024),
    "server.all.requests": ("server_requests", "Requests forwarded to servers, the upstream proxy or the refusal "
                            "responder (Squid's server.all.requests).", 1),
    "server.all.errors": ("server_errors", "Failed server requests (Squid's server.all.errors).", 1),
    "server.all.kbytes_in": ("server_received_bytes", "Bytes received from servers (Squid's server.all.kbytes_in "
                             "x 1024).", 1024),
    "server.all.kbytes_out": ("server_sent_bytes", "Bytes sent to servers (Squid's server.all.kbytes_out x 1024).",
                              1024),
}
assert set(SQUID_COUNTERS) == set(SEED_COUNTERS), "one Prometheus name per CloudWatch seed counter"


class ProxyCollector(Collector):
    """Collects on every scrape. Nothing here raises into the HTTP server: a failed Squid read is reported as
    ``egress_proxy_squid_up 0`` and Squid's counters are left out of that scrape."""

    def __init__(self, stats: Callable[[], ReloadStatsLike], decisions: DecisionCounter,
                 read: Callable[[], str], clock: Callable[[], float],
                 runtime: Callable[[], RuntimeFigures] | None = None) -> None:
        self.stats = stats
        self.decisions = decisions
        self.runtime = runtime
        self.read = read
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(PREFIX + "requests", "Requests decided by the proxy, from the access log "
                                       "(decision allowed, denied or would_deny; the reason code; the policy name).",
                                       labels=["decision", "reason", "policy"])
        for (decision, reason, policy), count in sorted(self.decisions.by_label().items()):
            requests.add_metric([decision, reason, policy], count)
        yield requests
        stats = self.stats()
        reloads = CounterMetricFamily(PREFIX + "reloads", "Allowlist changes applied (success) or rejected "
                                      "(failure) since the proxy started.", labels=["result"])
        reloads.add_metric(["success"], stats.success)
        reloads.add_metric(["failure"], stats.failure)
        yield reloads
        yield GaugeMetricFamily(PREFIX + "allowlist_entries", "Entries in the active allowlist.",
                                value=stats.entries)
        if stats.loaded_at is not None:
            yield GaugeMetricFamily(PREFIX + "config_age_seconds", "Seconds since the active config was loaded.",
                                    value=max(0.0, self.clock() - stats.loaded_at))
        identity = getattr(stats, "identity", None)
        if identity is not None and identity.active:
            yield GaugeMetricFamily(PREFIX + "identity_members", "Addresses in the client identity membership "
                                    "table (members of sg-, ecs: and tag: selectors).", value=identity.members)
            polls = CounterMetricFamily(PREFIX + "identity_polls", "AWS membership polls, by result; a failed "
                                        "poll keeps the last known membership.", labels=["result"])
            polls.add_metric(["success"], identity.polls)
            polls.add_metric(["failure"], identity.poll_failures)
            yield polls
            lookups = CounterMetricFamily(PREFIX + "identity_lookups", "On-demand lookups of unknown client "
                                          "addresses, by result (failed ones refuse the client).", labels=["result"])
            lookups.add_metric(["answered"], identity.lookups)
            lookups.add_metric(["failed"], identity.lookup_failures)
            yield lookups
        if self.runtime is not None:
            yield from self._runtime(self.runtime())
        try:
            counters = parse_counters(self.read())
        except (OSError, ValueError):
            counters = None
        yield GaugeMetricFamily(PREFIX + "squid_up", "1 if Squid's cache manager answered this scrape.",
                                value=0 if counters is None else 1)
        for name, value in (counters or {}).items():
            metric, help_text, scale = SQUID_COUNTERS[name]
            yield CounterMetricFamily(PREFIX + metric, help_text, value=value * scale)


    @staticmethod
    def _runtime(figures: RuntimeFigures) -> Iterator[Metric]:
        dropped = CounterMetricFamily(PREFIX + "log_lines_dropped", "Log lines dropped because stdout did not take "
                                      "them and the buffer (EGRESS_LOG_BUFFER_LINES) was full, by type (access, "
                                      "cache_log, supervisor).", labels=["type"])
        for kind, count in sorted(figures.log_lines_dropped.items()):
            dropped.add_metric([kind], count)
        yield dropped
        yield GaugeMetricFamily(PREFIX + "workers_up", "Squid worker processes running now.",
                                value=figures.workers_up)
        yield GaugeMetricFamily(PREFIX + "workers_configured", "Squid worker processes configured (EGRESS_WORKERS).",
                                value=figures.workers_configured)
        yield CounterMetricFamily(PREFIX + "worker_deaths", "Squid worker processes that died since the proxy "
                                  "started (Squid's master revives them).", value=figures.worker_deaths)


class PrometheusExporter:
    """``/metrics`` on EGRESS_LISTEN_ADDRESS:EGRESS_PROMETHEUS_PORT, in a daemon thread of the supervisor."""

    def __init__(self, settings: Settings, stats: Callable[[], ReloadStatsLike], decisions: DecisionCounter,
                 *, clock: Callable[[], float], runtime: Callable[[], RuntimeFigures] | None = None) -> None:
        assert settings.prometheus_port is not None
        self.address = str(settings.listen_address)
        self.port = settings.prometheus_port
        host, squid_port = manager_host(settings), settings.port
        self.registry = CollectorRegistry(auto_describe=False)
        proxy_header = settings.proxy_protocol == "required"
        self.registry.register(ProxyCollector(stats, decisions, lambda: read_counters(
            host, squid_port, proxy_header=proxy_header), clock, runtime))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PrometheusExporter:
        self._server, self._thread = start_http_server(self.port, addr=self.address, registry=self.registry)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
