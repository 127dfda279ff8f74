"""Benchmarks of egress-proxy against a direct connection and a seed-style Squid, measured in the same run. Run it
with ``sudo bench/run`` (which puts it in a private network namespace first); it refuses to run where more than
loopback exists.

Sections: throughput (curl: 1 and 16 streams on shared cores, 1 stream with the proxy on its own core; CPU per GB
of each party), connections (new HTTPS/HTTP connections: latency and rate), http (wrk requests/s) --
these three measure direct, egress-proxy and the seed-style Squid in turns; scale (allowlist size: reload time,
Squid RSS, latency), supervisor (its CPU and RSS idle and under load), sni (the strict SNI check's cost: the compiled
helper, the Python helper, the seed-style Squid, and an older checkout when EGRESS_BENCH_OLD_TREE names one),
policies (50 policies x 1,000 entries against one 50,000-entry list and against a single policy).
Writes bench/results/<date>.json (<date>-<sections>.json with --only); bench/report.py turns it into .md and plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchenv
import clients
import identity_bench
import policy_bench
import report
from benchenv import ORIGIN_NAME, PROXY_PORT, SEED_PORT, CpuWindow, Proxy, SeedSquid, World, proc_stat
from clients import Target, percentile
from policy_bench import (
    ENTRIES_PER_POLICY,
    LAST_POLICY_CLIENT,
    OLD_TREE,
    POLICY_COUNT,
    background_busy,
    document_text,
    helper_cost,
    loadavg,
    policy_name,
)

RESULTS = benchenv.ROOT / "bench" / "results"
SECTIONS = ("throughput", "connections", "http", "supervisor", "scale", "sni", "sni_variants", "policies",
            "identity")
SCALE_SIZES = (100, 10_000, 100_000)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kb = int(handle.readline().split()[1])

    def version(command: list[str]) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return (out.stdout + out.stderr).strip().splitlines()[0]

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "squid": version(["squid", "-v"]),
        "nginx": version(["nginx", "-v"]),
        "curl": version(["curl", "--version"]),
        "wrk": version(["wrk", "-v"]),
        "python": platform.python_version(),
    }


def allowlist_text(size: int, generation: int) -> str:
    """``size`` entries: the bench origin, then half wildcard domains and half exact hosts (no overlaps, so
    nothing collapses). ``generation`` makes each list different, so writing it is a real change."""
    lines = [f"# bench allowlist: {size} entries, generation {generation}", ORIGIN_NAME]
    for i in range(size - 1):
        if i % 2:
            lines.append(f".tenant{i}-g{generation}.wild-bench.net")
        else:
            lines.append(f"api{i}.svc-g{generation}.exact-bench.org")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_ms": round(percentile(samples, 50), 3),
            "p90_ms": round(percentile(samples, 90), 3), "p99_ms": round(percentile(samples, 99), 3),
            "mean_ms": round(statistics.fmean(samples), 3)}


def interleave(targets: dict[str, Target], count: int, block: int = 50, warmup: int = 20
               ) -> dict[str, list[float]]:
    """``count`` samples of each target, taken in blocks that take turns (the order rotates each block), so drift
    on a noisy machine hits every target alike."""
    for target in targets.values():  # warm-up: DNS cache, Squid's helpers and caches, page cache
        clients.latencies(target, warmup)
    names = list(targets)
    out: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    while len(out[names[0]]) < count:
        n = min(block, count - len(out[names[0]]))
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            out[name] += clients.latencies(targets[name], n)
        turn += 1
    return out


def interleaved_latencies(kind: str, cacert: str, count: int, block: int = 50) -> dict[str, list[float]]:
    """Direct and proxied samples in alternating blocks, so drift on a noisy machine hits both alike."""
    return interleave({"direct": Target(kind, False, cacert), "proxy": Target(kind, True, cacert)}, count, block)


CPU_ROLES = ("supervisor", "squid", "helpers", "logging", "other")


def proxy_cpu_ns(proxy: Proxy | SeedSquid) -> dict[int, tuple[str, int]]:
    """CPU nanoseconds used so far by each process of the proxy, with its role: the supervisor, Squid (the
    coordinator and its workers), the SNI helper ("helpers"), Squid's log daemons ("logging"), or another helper
    (the certificate generator)."""
    out = {}
    for pid in {proxy.pid, proxy.squid_pid, *benchenv.descendants(proxy.squid_pid)}:
        name = benchenv.comm(pid)
        role = ("squid" if name == "squid" else "supervisor" if pid == proxy.pid else
                "helpers" if name in {"sni_helper", "python3"} else "logging" if name == "log_file_daemon" else
                "other")
        out[pid] = (role, benchenv.cpu_ns([pid]))
    return out


def cpu_us_per_request(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], requests: int
                       ) -> dict[str, float]:
    """Per role and in total. A process that started in between counts in full; one that exited is lost."""
    used = dict.fromkeys(CPU_ROLES, 0)
    for pid, (role, ns) in after.items():
        used[role] += ns - before.get(pid, (role, 0))[1]
    out = {role: round(ns / requests / 1000, 1) for role, ns in used.items()}
    out["total"] = round(sum(used.values()) / requests / 1000, 1)
    return out


def compared_latencies(targets: dict[str, Target], proxies: dict[str, Proxy | SeedSquid], rounds: int, count: int,
                       baseline: str, candidate: str) -> dict[str, Any]:
    """``rounds`` independent interleaved measurements of every target (one of them "direct"; ``proxies`` names
    the proxy behind each other target). Per round: each target's p50, its p50 minus direct's, ``candidate``'s
    p50 minus ``baseline``'s, and each proxy's CPU per request (every one of its processes; it serves nothing
    else meanwhile). Then the medians over the rounds, whose spread (min, max) shows how noisy the machine was.
    Blocks are short (5 requests) so that the targets share the machine's drift closely."""
    per_round = []
    pooled: dict[str, list[float]] = {name: [] for name in targets}
    for target in targets.values():
        clients.latencies(target, 20)  # warm-up, outside the CPU windows
    for _ in range(rounds):
        window = CpuWindow({}).start()
        cpu_before = {name: proxy_cpu_ns(proxy) for name, proxy in proxies.items()}
        samples = interleave(targets, count, block=5, warmup=0)
        cpu_after = {name: proxy_cpu_ns(proxy) for name, proxy in proxies.items()}
        busy = window.stop()["machine_busy_percent"]
        cpu_us = {name: cpu_us_per_request(cpu_before[name], cpu_after[name], count) for name in proxies}
        p50 = {name: percentile(values, 50) for name, values in samples.items()}
        per_round.append({"p50_ms": {name: round(v, 3) for name, v in p50.items()},
                          "added_p50_ms": {name: round(p50[name] - p50["direct"], 3) for name in targets
                                           if name != "direct"},
                          "difference_p50_ms": round(p50[candidate] - p50[baseline], 3),
                          "proxy_cpu_us_per_request": cpu_us,
                          "machine_busy_percent": busy})
        for name, values in samples.items():
            pooled[name] += values
    differences = [r["difference_p50_ms"] for r in per_round]
    cpu_differences = [r["proxy_cpu_us_per_request"][candidate]["total"] -
                       r["proxy_cpu_us_per_request"][baseline]["total"] for r in per_round]
    return {"rounds": per_round, "count_per_round": count, "baseline": baseline, "candidate": candidate,
            "pooled": {name: summarize(values) for name, values in pooled.items()},
            "added_p50_ms": {name: round(statistics.median(r["added_p50_ms"][name] for r in per_round), 3)
                             for name in targets if name != "direct"},
            "difference_p50_ms": round(statistics.median(differences), 3),
            "difference_p50_ms_range": [min(differences), max(differences)],
            "proxy_cpu_us_per_request": {name: {role: round(statistics.median(
                r["proxy_cpu_us_per_request"][name][role] for r in per_round), 1)
                for role in (*CPU_ROLES, "total")} for name in proxies},
            "proxy_cpu_difference_us": round(statistics.median(cpu_differences), 1),
            "proxy_cpu_difference_us_range": [round(min(cpu_differences), 1), round(max(cpu_differences), 1)],
            "machine_busy_percent_median": statistics.median(r["machine_busy_percent"] for r in per_round)}


# --- sections ----------------------------------------------------------------------------------------------------
# The headline sections measure three routes, in turns: direct, egress-proxy, and the seed-style Squid.
ROUTES = ("direct", "proxy", "seed")


def _routes_in_turn(rep: int) -> tuple[str, ...]:
    """The routes' order for repetition ``rep``: each route goes first, second and third equally often."""
    return ROUTES[rep % 3:] + ROUTES[:rep % 3]


def _port(route: str) -> int:
    return SEED_PORT if route == "seed" else PROXY_PORT


def _cpu_share(usage: dict[str, Any]) -> float:
    """Cores used by every process of a proxy (Squid, its helpers, the supervisor) in a CpuWindow's result."""
    return sum(usage[group]["cpu_percent"] for group in ("squid", "helpers", "supervisor") if group in usage) / 100


# The downloads: (name, path, concurrent streams, the proxy on its own core). With every process free to use both
# cores, curl (decrypting), nginx (encrypting) and Squid share them, and the ratio against direct is bounded by CPU
# alone: the proxied route spends Squid's CPU per GB on top of the endpoints'. On AWS the proxy runs on its own
# instances, apart from both endpoints: the "own core" download models that, with curl and nginx on CPU 0 in every
# route (direct included) and every process of both proxies on CPU 1.
DOWNLOADS = (("single_1gib", "/1g", 1, False), ("parallel_16x64mib", "/64m", 16, False),
             ("single_1gib_own_core", "/1g", 1, True))
ENDPOINT_CPUS, PROXY_CPUS = {0}, {1}


def _proxy_tree(proxy: Proxy | SeedSquid) -> list[int]:
    """Every process of a proxy: the supervisor (egress-proxy only), Squid and its helpers."""
    return sorted({proxy.pid, proxy.squid_pid, *benchenv.descendants(proxy.squid_pid)})


def _download(route: str, path: str, streams: int, cacert: str, proxies: dict[str, Proxy | SeedSquid],
              origin_pids: list[int], cpus: set[int] | None) -> dict[str, Any]:
    """One download, with what it cost each party per GB: curl, nginx, Squid and (egress-proxy) its other
    processes; and Squid's read and write system calls per MB, which show how it moves the bytes."""
    proxy = proxies.get(route)
    squid = proxy.squid_pids() if proxy else []
    everything = _proxy_tree(proxy) if proxy else []
    squid0, proxy0, origin0 = benchenv.cpu_ns(squid), benchenv.cpu_ns(everything), benchenv.cpu_ns(origin_pids)
    calls0 = benchenv.syscalls(squid)
    busy0 = benchenv.machine_busy()
    run = clients.download(path, cacert, route != "direct", streams, _port(route), cpus=cpus)
    busy1 = benchenv.machine_busy()
    gb, mb = run["bytes"] / 1e9, run["bytes"] / 1e6
    out: dict[str, Any] = {
        "mb_per_s": run["mb_per_s"],
        "machine_busy_percent": round(100 * (busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1]), 1),
        "client_core_s_per_gb": round(run["client_cpu_s"] / gb, 3),
        "origin_core_s_per_gb": round((benchenv.cpu_ns(origin_pids) - origin0) / 1e9 / gb, 3)}
    if proxy:
        reads, writes, read_bytes = (b - a for a, b in zip(calls0, benchenv.syscalls(squid), strict=True))
        out.update({"squid_core_s_per_gb": round((benchenv.cpu_ns(squid) - squid0) / 1e9 / gb, 3),
                    "proxy_core_s_per_gb": round((benchenv.cpu_ns(everything) - proxy0) / 1e9 / gb, 3),
                    "squid_reads_per_mb": round(reads / mb, 1), "squid_writes_per_mb": round(writes / mb, 1),
                    "squid_kib_per_read": round(read_bytes / max(1, reads) / 1024, 1)})
    return out


def _median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(statistics.median(values), 3) if values else None


def _cpu_ceiling(cost: dict[str, dict[str, float | None]], route: str) -> float:
    """The best ratio against direct that ``route`` can reach when every process shares the same busy cores: the
    endpoints' CPU per GB direct, over the endpoints' plus every proxy process's CPU per GB through the proxy."""
    def endpoints(r: str) -> float:
        return (cost[r]["client"] or 0) + (cost[r]["origin"] or 0)
    return endpoints("direct") / (endpoints(route) + (cost[route]["proxy"] or 0))


def bench_throughput(proxy: Proxy, seed: SeedSquid, cacert: str, reps: int, origin_pids: list[int]
                     ) -> dict[str, Any]:
    result: dict[str, Any] = {}
    proxies: dict[str, Proxy | SeedSquid] = {"proxy": proxy, "seed": seed}
    all_cpus = os.sched_getaffinity(0)
    for name, path, streams, own_core in DOWNLOADS:
        if own_core and not (ENDPOINT_CPUS | PROXY_CPUS) <= all_cpus:
            log(f"  {name}: skipped, it needs CPUs {sorted(ENDPOINT_CPUS | PROXY_CPUS)}")
            continue
        if own_core:
            benchenv.pin(origin_pids, ENDPOINT_CPUS)
            for p in proxies.values():
                benchenv.pin(_proxy_tree(p), PROXY_CPUS)
        try:
            runs: dict[str, list[dict[str, Any]]] = {route: [] for route in ROUTES}
            for rep in range(reps):
                for route in _routes_in_turn(rep):
                    run = _download(route, path, streams, cacert, proxies, origin_pids,
                                    ENDPOINT_CPUS if own_core else None)
                    runs[route].append(run)
                    squid = (f", Squid {run['squid_core_s_per_gb']} core-s/GB, {run['squid_kib_per_read']} KiB "
                             f"per read" if route != "direct" else "")
                    log(f"  {name} {route}: {run['mb_per_s']} MB/s, machine {run['machine_busy_percent']}% busy, "
                        f"curl {run['client_core_s_per_gb']} and nginx {run['origin_core_s_per_gb']} core-s/GB"
                        f"{squid}")
        finally:
            if own_core:
                benchenv.pin(origin_pids, all_cpus)
                for p in proxies.values():
                    benchenv.pin(_proxy_tree(p), all_cpus)
        # Each ratio is the median of each rep's ratio against the direct run of the same rep: this machine's speed
        # drifts by 2x over a minute, and runs close in time share the drift.
        mb_per_s = {route: [r["mb_per_s"] for r in runs[route]] for route in ROUTES}
        ratios = {route: [p / d for d, p in zip(mb_per_s["direct"], mb_per_s[route], strict=True)]
                  for route in ("proxy", "seed")}
        # Core-seconds per GB, medians over the reps: steadier than MB/s on a busy machine.
        cost = {route: {key: _median_of(runs[route], f"{key}_core_s_per_gb")
                        for key in ("client", "origin", "squid", "proxy")} for route in ROUTES}

        entry: dict[str, Any] = {
            "streams": streams, "total_bytes": 1024**3, "own_core": own_core, "runs": runs,
            "runs_mb_per_s": mb_per_s, **{f"{route}_mb_per_s": statistics.median(mb_per_s[route]) for route in ROUTES},
            "pair_ratios": [round(r, 3) for r in ratios["proxy"]],
            "ratio": round(statistics.median(ratios["proxy"]), 3),
            "seed_pair_ratios": [round(r, 3) for r in ratios["seed"]],
            "seed_ratio": round(statistics.median(ratios["seed"]), 3),
            "core_s_per_gb": cost,
            "machine_busy_percent": {route: _median_of(runs[route], "machine_busy_percent") for route in ROUTES},
            "squid_syscalls": {route: {key: _median_of(runs[route], f"squid_{key}")
                                       for key in ("reads_per_mb", "writes_per_mb", "kib_per_read")}
                               for route in ("proxy", "seed")},
            # Squid's own cost, independent of how many cores the endpoints got: core-seconds per GB.
            "squid_core_s_per_gb": cost["proxy"]["squid"], "seed_squid_core_s_per_gb": cost["seed"]["squid"]}
        if not own_core:
            # When every process shares the cores and they are all busy, no proxy can beat this: the endpoints'
            # CPU per GB direct, over the endpoints' plus the whole proxy's CPU per GB through it.
            for route, key in (("proxy", "cpu_ceiling_ratio"), ("seed", "seed_cpu_ceiling_ratio")):
                entry[key] = round(_cpu_ceiling(cost, route), 3)
        result[name] = entry
    return result


def bench_connections(proxy: Proxy, seed: SeedSquid, cacert: str, count: int, rate_seconds: float, workers: int
                      ) -> dict[str, Any]:
    result: dict[str, Any] = {}
    groups = {"proxy": proxy.groups, "seed": seed.groups, "direct": dict}
    for kind in ("https", "http"):
        samples = interleave({route: Target(kind, route != "direct", cacert, _port(route)) for route in ROUTES},
                             count)
        latency = {route: summarize(samples[route]) for route in ROUTES}
        rates: dict[str, Any] = {}
        for route in ROUTES:
            window = CpuWindow(groups[route]()).start()
            rate: dict[str, Any] = {**clients.connection_rate(Target(kind, route != "direct", cacert, _port(route)),
                                                              rate_seconds, workers)}
            rate["cpu"] = window.stop()
            if route != "direct":
                # Sizing: new connections per second that one core of proxy CPU (every process of it) serves.
                rate["per_core_s"] = round(rate["per_s"] / max(0.01, _cpu_share(rate["cpu"])), 1)
            rates[route] = rate
        result[kind] = {
            "latency": latency,
            "added_p50_ms": round(latency["proxy"]["p50_ms"] - latency["direct"]["p50_ms"], 3),
            "added_p99_ms": round(latency["proxy"]["p99_ms"] - latency["direct"]["p99_ms"], 3),
            "seed_added_p50_ms": round(latency["seed"]["p50_ms"] - latency["direct"]["p50_ms"], 3),
            "seed_added_p99_ms": round(latency["seed"]["p99_ms"] - latency["direct"]["p99_ms"], 3),
            "samples_ms": {k: [round(v, 4) for v in vs] for k, vs in samples.items()},
            "rate": rates,
            "rate_ratio": round(rates["proxy"]["per_s"] / rates["direct"]["per_s"], 3),
            "seed_rate_ratio": round(rates["seed"]["per_s"] / rates["direct"]["per_s"], 3),
            "rate_workers": workers,
            "squid_cpu_us_per_connection": round(rates["proxy"]["cpu"]["squid"]["cpu_percent"] / 100 /
                                                 max(1.0, rates["proxy"]["per_s"]) * 1e6, 1),
            "proxy_cpu_us_per_connection": round(_cpu_share(rates["proxy"]["cpu"]) /
                                                 max(1.0, rates["proxy"]["per_s"]) * 1e6, 1),
            "seed_cpu_us_per_connection": round(_cpu_share(rates["seed"]["cpu"]) /
                                                max(1.0, rates["seed"]["per_s"]) * 1e6, 1),
        }
        log(f"  {kind}: p50 direct {latency['direct']['p50_ms']}, proxy {latency['proxy']['p50_ms']}, seed "
            f"{latency['seed']['p50_ms']} ms; rate {rates['direct']['per_s']} / {rates['proxy']['per_s']} / "
            f"{rates['seed']['per_s']} per s")
    return result


def bench_http(proxy: Proxy, seed: SeedSquid, seconds: float, connections: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    groups = {"proxy": proxy.groups(), "seed": seed.groups(), "direct": {}}
    for keepalive in (True, False):
        name = "keepalive" if keepalive else "new_connection"
        runs: dict[str, Any] = {}
        for route in ROUTES:
            lines_before = proxy.access_lines
            window = CpuWindow(groups[route]).start()
            runs[route] = clients.wrk(route != "direct", keepalive, seconds, connections, proxy_port=_port(route))
            usage = window.stop()
            if route != "direct":
                runs[route]["cpu"] = usage
            if route == "proxy":
                runs[route]["access_lines_relayed"] = proxy.access_lines - lines_before
        result[name] = {**runs, "connections": connections, "seconds": seconds,
                        "ratio": round(runs["proxy"]["rps"] / runs["direct"]["rps"], 3),
                        "seed_ratio": round(runs["seed"]["rps"] / runs["direct"]["rps"], 3),
                        "squid_cpu_us_per_request": round(runs["proxy"]["cpu"]["squid"]["cpu_percent"] / 100 /
                                                          max(1.0, runs["proxy"]["rps"]) * 1e6, 1),
                        "seed_cpu_us_per_request": round(runs["seed"]["cpu"]["squid"]["cpu_percent"] / 100 /
                                                         max(1.0, runs["seed"]["rps"]) * 1e6, 1)}
        log(f"  {name}: {runs['direct']['rps']:.0f} / {runs['proxy']['rps']:.0f} / {runs['seed']['rps']:.0f} req/s")
    return result


def _thread_use(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
                ) -> dict[str, tuple[int, int]]:
    """(ns, wakes) per thread name between two readings of benchenv.thread_cpu; a thread that started in between
    counts in full."""
    return {name: (ns - before.get(name, (0, 0))[0], runs - before.get(name, (0, 0))[1])
            for name, (ns, runs) in after.items()}


def supervisor_threads(proxy: Proxy, target: Target, idle: float, count: int) -> dict[str, Any]:
    """The supervisor's CPU by thread, per new HTTPS connection and per idle second. The latency sections divide
    all of the supervisor's CPU in a window by its connections, so its idle cost (timers, polls) lands on each
    connection in proportion to the window's wall time per connection, which grows with the routes a section
    interleaves. Here: ``idle`` seconds without traffic (CPU and wake-ups per second), then ``count`` new
    connections back to back through this proxy alone; a thread's CPU per connection is its CPU in that window
    minus its idle rate times the window's wall time, over ``count`` (the part the connections cost). "gross"
    keeps the idle share in. CPU is the kernel's accounting (schedstat), which a busy machine does not inflate;
    wakes are the times a thread was scheduled in."""
    time.sleep(1)  # the access-log relay's last reads of earlier traffic (it reads at most every 0.2 s) stay out
    start = benchenv.thread_cpu(proxy.pid)
    started = time.monotonic()
    time.sleep(idle)
    idle_wall = time.monotonic() - started
    middle = benchenv.thread_cpu(proxy.pid)
    lines_before = proxy.access_lines
    started = time.monotonic()
    clients.latencies(target, count)
    load_wall = time.monotonic() - started
    quiet, busy = _thread_use(start, middle), _thread_use(middle, benchenv.thread_cpu(proxy.pid))
    threads: dict[str, dict[str, float]] = {}
    for name in sorted(set(quiet) | set(busy)):
        idle_ns, idle_runs = quiet.get(name, (0, 0))
        load_ns, load_runs = busy.get(name, (0, 0))
        threads[name] = {
            "idle_us_per_s": round(idle_ns / idle_wall / 1000, 1),
            "idle_wakes_per_s": round(idle_runs / idle_wall, 1),
            "us_per_connection": round((load_ns - idle_ns / idle_wall * load_wall) / count / 1000, 2),
            "gross_us_per_connection": round(load_ns / count / 1000, 2),
            "wakes_per_connection": round((load_runs - idle_runs / idle_wall * load_wall) / count, 3)}
    keys = ("idle_us_per_s", "idle_wakes_per_s", "us_per_connection", "gross_us_per_connection",
            "wakes_per_connection")
    return {"idle_seconds": round(idle_wall, 2), "load_seconds": round(load_wall, 2), "connections": count,
            "connections_per_s": round(count / load_wall, 1), "access_lines": proxy.access_lines - lines_before,
            "threads": threads, "total": {key: round(sum(t[key] for t in threads.values()), 2) for key in keys}}


def supervisor_thread_medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per thread and in total, the median of each figure over the rounds of supervisor_threads."""
    names = sorted({name for r in rounds for name in r["threads"]})
    keys = list(rounds[0]["total"])
    zero = dict.fromkeys(keys, 0.0)
    return {"threads": {name: {key: round(statistics.median(r["threads"].get(name, zero)[key] for r in rounds), 2)
                               for key in keys} for name in names},
            "total": {key: round(statistics.median(r["total"][key] for r in rounds), 2) for key in keys},
            "connections_per_s": statistics.median(r["connections_per_s"] for r in rounds), "rounds": len(rounds)}


def bench_supervisor(proxy: Proxy, cacert: str, idle_seconds: float, load_seconds: float, thread_rounds: int,
                     thread_count: int) -> dict[str, Any]:
    pids = proxy.groups()
    window = CpuWindow(pids).start()
    time.sleep(idle_seconds)
    idle = window.stop()
    lines_before = proxy.access_lines
    window = CpuWindow(pids).start()
    load = clients.wrk(True, True, load_seconds, 16)
    busy = window.stop()
    relayed = proxy.access_lines - lines_before
    log(f"  idle: {idle}; under {load['rps']:.0f} req/s: {busy}")
    target = Target("https", True, cacert)
    rounds = [supervisor_threads(proxy, target, idle_seconds / 2, thread_count) for _ in range(thread_rounds)]
    threads = supervisor_thread_medians(rounds)
    log(f"  by thread: {threads['total']}")
    return {"idle_seconds": idle_seconds, "idle": idle, "load_seconds": load_seconds, "load_rps": load["rps"],
            "load": busy, "access_lines_per_s": round(relayed / load_seconds, 1),
            "threads": {**threads, "per_round": rounds}}


def time_render_and_parse(text: str, proxy: Proxy) -> dict[str, float]:
    """The reload's parts, timed separately in this process: validation (the allowlist or document policy),
    render, ``squid -k parse``."""
    from egress_proxy.policy import parse_policy_value
    from egress_proxy.settings import load_settings
    from egress_proxy.squid_conf import StatePaths, render

    settings = load_settings({}, proxy.env)
    paths = StatePaths(proxy.state_dir)
    started = time.monotonic()
    document = parse_policy_value(text, source="bench", client_cidrs=settings.client_cidrs)
    policy = time.monotonic() - started
    started = time.monotonic()
    render(settings, document, paths, run_as="proxy", denial_port=39999, access_log_port=39998)
    rendered = time.monotonic() - started
    # The candidate the supervisor just parse-checked and activated is in the state dir; parse it again.
    started = time.monotonic()
    subprocess.run(["squid", "-k", "parse", "-f", str(paths.squid_conf)], capture_output=True, timeout=120,
                   check=True)
    parsed = time.monotonic() - started
    return {"policy_s": round(policy, 3), "render_s": round(rendered, 3), "squid_parse_s": round(parsed, 3)}


def parse_profile(workdir: Path, proxy: Proxy) -> dict[str, float]:
    """Where ``squid -k parse`` spends its time on a big list: the active allowlist file (written in Squid's own
    comparison order) loaded by a minimal config with one ACL, then by one with both ACLs a seed-style config uses,
    then the same entries label by label (the order written before) and shuffled."""
    import random

    from egress_proxy.squid_conf import StatePaths

    active = StatePaths(proxy.state_dir).policy_list("default", "allow")
    entries = [line for line in active.read_text().splitlines() if line]
    by_labels = workdir / "allowlist-label-order.txt"
    by_labels.write_text("\n".join(sorted(entries, key=lambda e: e.lstrip(".").split(".")[::-1])) + "\n")
    shuffled = workdir / "allowlist-shuffled.txt"
    shuffled.write_text("\n".join(random.Random(1).sample(entries, len(entries))) + "\n")
    variants = {
        "dstdomain_only": f'acl a dstdomain -n "{active}"',
        "dstdomain_and_ssl_server_name": f'acl a dstdomain -n "{active}"\nacl b ssl::server_name "{active}"',
        "dstdomain_only_label_order": f'acl a dstdomain -n "{by_labels}"',
        "dstdomain_only_shuffled": f'acl a dstdomain -n "{shuffled}"',
    }
    out = {}
    for name, acls in variants.items():
        conf = workdir / f"parse-{name}.conf"
        conf.write_text(f"http_port 127.0.0.1:39999\n{acls}\nhttp_access deny all\ncache_log /dev/null\n"
                        f"pid_filename {workdir}/parse.pid\n")
        started = time.monotonic()
        subprocess.run(["squid", "-k", "parse", "-f", str(conf)], capture_output=True, timeout=120, check=True)
        out[f"{name}_s"] = round(time.monotonic() - started, 3)
    log(f"  parse profile at {len(entries)} entries: {out}")
    return out


def bench_scale(proxy: Proxy, workdir: Path, allowlist: Path, cacert: str, count: int, reps: int
                ) -> dict[str, Any]:
    rows = []
    for generation, size in enumerate(SCALE_SIZES, start=1):
        text = allowlist_text(size, generation)
        mark = proxy.mark()
        with clients.Probe() as probe:
            started = time.monotonic()
            write_atomic(allowlist, text)
            event = proxy.wait_event(lambda e: e.get("event") in {"reloaded", "reload_rejected"}, timeout=120,
                                     start=mark)
            wall = time.monotonic() - started
            time.sleep(1)  # let Squid settle (helpers restart after a reconfigure)
        if event["event"] != "reloaded":
            raise RuntimeError(f"allowlist of {size} rejected: {event.get('message')}")
        memory = proxy.squid_memory()
        _, sup_rss = proc_stat(proxy.pid)
        parts = time_render_and_parse(text, proxy)
        latency: dict[str, dict[str, Any]] = {}
        for kind in ("https", "http"):
            samples = interleaved_latencies(kind, cacert, count)
            latency[kind] = {"direct": summarize(samples["direct"]), "proxy": summarize(samples["proxy"])}
            latency[kind]["added_p50_ms"] = round(latency[kind]["proxy"]["p50_ms"] - latency[kind]["direct"]["p50_ms"],
                                                  3)
        if event.get("entries") != size:
            raise RuntimeError(f"expected {size} active entries, the supervisor reports {event.get('entries')}")
        row = {"entries": size, "reload_s": round(event["duration_ms"] / 1000, 3), "confirmed": event["confirmed"],
               "write_to_event_s": round(wall, 3), **parts, "squid_rss_mb": memory["pss_mb"], "squid_memory": memory,
               "supervisor_rss_mb": round(sup_rss / 2**20, 1), "latency": latency,
               "probe_during_reload": probe.summary()}
        if size == max(SCALE_SIZES):
            row["parse_profile"] = parse_profile(workdir, proxy)
        rows.append(row)
        log(f"  {size} entries: reload {row['reload_s']} s (write->event {row['write_to_event_s']} s), "
            f"Squid RSS {row['squid_rss_mb']} MB, https added p50 {latency['https']['added_p50_ms']} ms, "
            f"http added p50 {latency['http']['added_p50_ms']} ms; probe during reload: {row['probe_during_reload']}")
    return {"sizes": rows, "user_reloads": user_reloads(proxy, allowlist, max(SCALE_SIZES), reps)}


def edited(text: str, count: int, tag: str) -> str:
    """``text`` with ``count`` of its entries (never the comment or the bench origin) replaced by new names: an
    operator's edit of a long list."""
    import random

    lines = text.splitlines()
    for i, index in enumerate(random.Random(tag).sample(range(2, len(lines)), count)):
        lines[index] = f"edit{i}-{tag}.edited-bench.net"
    return "\n".join(lines) + "\n"


def user_reloads(proxy: Proxy, allowlist: Path, size: int, reps: int) -> dict[str, Any]:
    """The reload as a user sees it, ``reps`` times for each of two changes, alternating: a new list (every entry
    changed) and an edit (10 entries of the active list replaced). Each is timed from writing the file to the
    supervisor's ``reloaded`` event: detection (the file source's poll), validation, render, the write, and every
    worker accepting again with the new config. The supervisor's own duration and its phases come from the event;
    the 1-minute load average is taken beside each, because on a shared machine it moves the figure most."""
    import random

    rows = []
    text = allowlist.read_text()
    for rep in range(reps):
        for kind in ("new_list", "edit"):
            text = allowlist_text(size, 100 + rep) if kind == "new_list" else edited(text, 10, f"r{rep}")
            time.sleep(random.Random(rep).uniform(0.3, 1.0))  # a write at any point of the poll interval
            mark = proxy.mark()
            load = loadavg()[0]
            started = time.monotonic()
            write_atomic(allowlist, text)
            event = proxy.wait_event(lambda e: e.get("event") in {"reloaded", "reload_rejected"}, timeout=120,
                                     start=mark)
            wall = time.monotonic() - started
            if event["event"] != "reloaded" or event.get("entries") != size:
                raise RuntimeError(f"reload of {size} entries ({kind}) went wrong: {event.get('message')}")
            rows.append({"rep": rep, "kind": kind, "write_to_applied_s": round(wall, 3),
                         "reload_s": round(event["duration_ms"] / 1000, 3), "added": event["added"],
                         "removed": event["removed"], "phases_ms": event.get("phases_ms", {}),
                         "confirmed": event["confirmed"], "loadavg_1m": load})
            log(f"  {kind}: write -> applied {wall:.3f} s (supervisor {rows[-1]['reload_s']} s, "
                f"phases {rows[-1]['phases_ms']}), load {load}")
    summary: dict[str, Any] = {}
    for kind in ("new_list", "edit"):
        walls = [r["write_to_applied_s"] for r in rows if r["kind"] == kind]
        reloads = [r["reload_s"] for r in rows if r["kind"] == kind]
        summary[kind] = {"write_to_applied_s": {"median": round(statistics.median(walls), 3), "min": min(walls),
                                                "max": max(walls)},
                         "reload_s": {"median": round(statistics.median(reloads), 3), "min": min(reloads),
                                      "max": max(reloads)}}
    return {"entries": size, "reps": reps, "rows": rows, "summary": summary,
            "loadavg_1m": [min(r["loadavg_1m"] for r in rows), max(r["loadavg_1m"] for r in rows)]}


def reload_to(proxy: Proxy, allowlist: Path, text: str, entries: int) -> dict[str, Any]:
    """Write ``text`` as the allowlist value, wait for the supervisor's ``reloaded`` event (validate, render,
    parse-check, reconfigure, every worker accepting again), then time the parts in this process."""
    mark = proxy.mark()
    started = time.monotonic()
    write_atomic(allowlist, text)
    event = proxy.wait_event(lambda e: e.get("event") in {"reloaded", "reload_rejected"}, timeout=180, start=mark)
    wall = time.monotonic() - started
    if event["event"] != "reloaded":
        raise RuntimeError(f"reload rejected: {event.get('message')}")
    if event.get("entries") != entries:
        raise RuntimeError(f"expected {entries} active entries, the supervisor reports {event.get('entries')}")
    return {"reload_s": round(event["duration_ms"] / 1000, 3), "confirmed": event["confirmed"],
            "write_to_event_s": round(wall, 3), **time_render_and_parse(text, proxy)}


def bench_policies(proxy: Proxy, workdir: Path, allowlist: Path, cacert: str, reps: int, rounds: int, count: int,
                   lookups: int) -> dict[str, Any]:
    """Issue 14's scale and speed targets. (a) reload time of 50 policies x 1,000 entries against one 50,000-entry
    flat list, alternating (ABBA) on the same proxy; (b) latency of a client in the LAST of 50 policies against the
    same client and list as a single policy, on a second proxy, interleaved with direct; (c) a probe through the
    proxy during every reload of (a): refused or failed requests."""
    total = POLICY_COUNT * ENTRIES_PER_POLICY
    forms = {"flat": lambda g: allowlist_text(total, g),
             "policies": lambda g: document_text(range(POLICY_COUNT), ENTRIES_PER_POLICY, g)}
    result: dict[str, Any] = {"policies": POLICY_COUNT, "entries_per_policy": ENTRIES_PER_POLICY,
                              "flat_entries": total, "client": LAST_POLICY_CLIENT,
                              "background_busy_percent_before": background_busy(), "loadavg_before": loadavg()}
    generation = 100
    reloads: list[dict[str, Any]] = []
    # The probe's client is in the last policy, and in the flat list's "default" (all of 127.0.0.0/8): every one
    # of its requests must be a 200, before, during and after each reload.
    with clients.Probe(target=Target("http", True, source=LAST_POLICY_CLIENT)) as probe:
        for rep in range(reps):
            for form in ("flat", "policies") if rep % 2 == 0 else ("policies", "flat"):
                generation += 1
                row = {"form": form, "rep": rep, **reload_to(proxy, allowlist, forms[form](generation), total)}
                reloads.append(row)
                log(f"  {form}: reload {row['reload_s']} s (policy {row['policy_s']} s, render {row['render_s']} s, "
                    f"squid -k parse {row['squid_parse_s']} s)")
        if reloads[-1]["form"] != "policies":  # (b) needs the document active
            generation += 1
            reloads.append({"form": "policies", "rep": reps, **reload_to(
                proxy, allowlist, forms["policies"](generation), total)})
    document_reloads = sum(1 for r in reloads if r["form"] == "policies")
    by_rep = {(r["rep"], r["form"]): r for r in reloads}
    ratios = [by_rep[(rep, "policies")]["reload_s"] / by_rep[(rep, "flat")]["reload_s"] for rep in range(reps)]
    median_of = {form: {key: round(statistics.median(r[key] for r in reloads if r["form"] == form and
                                                     r["rep"] < reps), 3)
                        for key in ("reload_s", "policy_s", "render_s", "squid_parse_s")} for form in forms}
    result["reload"] = {"runs": reloads, "median": median_of, "pair_ratios": [round(r, 3) for r in ratios],
                        "ratio": round(statistics.median(ratios), 3)}
    result["probe_during_reloads"] = {**probe.summary(), "reloads": len(reloads),
                                      "document_reloads": document_reloads}
    log(f"  reload ratio (policies / flat, median of {reps} pairs): {result['reload']['ratio']}; probe during "
        f"{len(reloads)} reloads: {result['probe_during_reloads']}")

    single_file = workdir / "single-policy.json"
    single_file.write_text(document_text(range(POLICY_COUNT - 1, POLICY_COUNT), ENTRIES_PER_POLICY, generation))
    single = Proxy(workdir, single_file, port=PROXY_PORT + 1, name="state-single-policy").start()
    try:
        latency = {}
        for kind in ("https", "http"):
            targets = {"direct": Target(kind, False, cacert, source=LAST_POLICY_CLIENT),
                       "policies_50": Target(kind, True, cacert, source=LAST_POLICY_CLIENT),
                       "policy_1": Target(kind, True, cacert, PROXY_PORT + 1, LAST_POLICY_CLIENT)}
            latency[kind] = compared_latencies(targets, {"policies_50": proxy, "policy_1": single}, rounds, count,
                                               baseline="policy_1", candidate="policies_50")
            log(f"  {kind}: added p50 with 50 policies {latency[kind]['added_p50_ms']['policies_50']} ms, with one "
                f"{latency[kind]['added_p50_ms']['policy_1']} ms; difference {latency[kind]['difference_p50_ms']} ms "
                f"(rounds: {[r['difference_p50_ms'] for r in latency[kind]['rounds']]}); proxy CPU per request "
                f"{latency[kind]['proxy_cpu_us_per_request']} us")
        hello = policy_bench.client_hello(cacert)
        result["sni_helper"] = {
            "policies_50": helper_cost(proxy.state_dir, policy_name(POLICY_COUNT - 1), hello, lookups),
            "policy_1": helper_cost(single.state_dir, policy_name(POLICY_COUNT - 1), hello, lookups)}
        log(f"  SNI helper: {result['sni_helper']}")
    finally:
        single.stop()
    result["latency"] = latency
    result["background_busy_percent_after"] = background_busy()
    result["loadavg_after"] = loadavg()
    return result


def bench_identity(workdir: Path, cacert: str, rounds: int, count: int, identities: int, churn_per_second: int,
                   churn_seconds: float) -> dict[str, Any]:
    """Clients by AWS identity: (a) added p50 per new connection of a client selected by its security group (its
    identity answer cached by Squid) against the same client selected by a CIDR policy, interleaved with direct;
    (b) ``identities`` ENIs in the group with ``churn_per_second`` joining and as many leaving every second for
    ``churn_seconds``: reconfigures (must be 0), Squid restarts, membership log lines, and the same latency
    measured during the churn."""
    moto = identity_bench.Moto().start()
    result: dict[str, Any] = {"background_busy_percent_before": background_busy(), "loadavg_before": loadavg(),
                              "identities": identities}
    proxies: dict[str, Proxy | SeedSquid] = {}
    try:
        started = time.monotonic()
        enis = identity_bench.Identities(moto, identities)
        result["setup_s"] = round(time.monotonic() - started, 1)
        result["describe_all_s"] = round(enis.describe_seconds(), 3)
        cidr_doc, identity_doc = workdir / "identity-cidr.json", workdir / "identity-sg.json"
        cidr_doc.write_text(json.dumps({"policies": [
            {"name": "team", "clients": [identity_bench.SUBNET], "allow": [ORIGIN_NAME]}]}))
        identity_doc.write_text(json.dumps({"policies": [
            {"name": "team", "clients": [enis.group], "allow": [ORIGIN_NAME]}]}))
        ports = {"cidr": PROXY_PORT + 20, "identity": PROXY_PORT + 21}
        proxies["cidr"] = Proxy(workdir, cidr_doc, port=ports["cidr"], name="state-identity-cidr")
        proxies["identity"] = Proxy(workdir, identity_doc, {**moto.env, "EGRESS_IDENTITY_REFRESH": "2",
                                                            "EGRESS_IDENTITY_TTL": "60"},
                                    port=ports["identity"], name="state-identity-sg")
        for proxy in proxies.values():
            assert isinstance(proxy, Proxy)
            proxy.start()
        identity_proxy = proxies["identity"]
        assert isinstance(identity_proxy, Proxy)
        identity_proxy.wait_event(lambda e: e.get("event") == "identity_membership_changed"
                                  and e.get("members") == identities, timeout=120)
        result["first_poll_after_start_s"] = round(time.monotonic() - started - result["setup_s"], 1)

        def measure() -> dict[str, Any]:
            latency = {}
            for kind in ("https", "http"):
                targets = {"direct": Target(kind, False, cacert),
                           **{name: Target(kind, True, cacert, ports[name], source=identity_bench.CLIENT)
                              for name in ports}}
                latency[kind] = compared_latencies(targets, proxies, rounds, count, baseline="cidr",
                                                   candidate="identity")
                log(f"  {kind}: added p50 {latency[kind]['added_p50_ms']} ms; identity minus CIDR "
                    f"{latency[kind]['difference_p50_ms']} ms")
            return latency

        result["latency"] = measure()
        squid_before = sorted(identity_proxy.squid_pids())
        mark = len(identity_proxy.events)
        enis.churn(churn_per_second)
        churn_started = time.monotonic()
        result["latency_during_churn"] = measure()
        remaining = churn_seconds - (time.monotonic() - churn_started)
        if remaining > 0:
            time.sleep(remaining)
        enis.stop_churn()
        churned = time.monotonic() - churn_started
        events = identity_proxy.events[mark:]
        result["churn"] = {
            "seconds": round(churned, 1), "per_second": churn_per_second, "eni_changes": enis.changes,
            "reconfigures": sum(1 for e in events if e.get("event") in {"reloaded", "reload_skipped"}),
            "squid_restarted": sorted(identity_proxy.squid_pids()) != squid_before,
            "membership_log_lines": sum(1 for e in events if e.get("event") == "identity_membership_changed"),
            "refresh_failures": sum(1 for e in events if e.get("event") == "identity_refresh_failed"),
            "describe_all_s_after": round(enis.describe_seconds(), 3),
        }
        log(f"  churn: {result['churn']}")
    finally:
        stop_all(proxies)
        moto.stop()
    result["background_busy_percent_after"] = background_busy()
    result["loadavg_after"] = loadavg()
    return result


def stop_all(proxies: dict[str, Proxy | SeedSquid]) -> None:
    """Stop the section's own proxies (the seed-style Squid is shared by the whole run and stays up)."""
    for proxy in proxies.values():
        if isinstance(proxy, Proxy):
            proxy.stop()


def package_variant(workdir: Path, name: str, *, compiled: bool = True, edits: dict[str, str] | None = None
                    ) -> Path:
    """A copy of the installed egress_proxy package for PYTHONPATH (it comes before the venv's editable finder):
    without its compiled SNI helper when ``compiled`` is false (the config then runs sni_helper.py), and with
    ``edits`` (old text -> new text) made to squid.conf.j2. Everything else is the same code."""
    import egress_proxy

    target = workdir / f"package-{name}"
    ignore = ["__pycache__"] if compiled else ["__pycache__", "compiled"]
    shutil.copytree(Path(egress_proxy.__file__).parent, target / "egress_proxy",
                    ignore=shutil.ignore_patterns(*ignore), dirs_exist_ok=True)
    template = target / "egress_proxy" / "templates" / "squid.conf.j2"
    text = template.read_text()
    for old, new in (edits or {}).items():
        if old not in text:
            raise RuntimeError(f"variant {name}: squid.conf.j2 no longer has {old!r}")
        text = text.replace(old, new)
    template.write_text(text)
    return target


SNI_HELPER_OPTIONS = "cache=0 concurrency=64 children-max=4 children-startup=1 children-idle=1"
# Variants of egress-proxy for the sni_variants section: what each part of a new HTTPS connection's cost is (by
# taking it away), and what the helper protocol settings buy. (PYTHONPATH package edits, environment)
SNI_VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "no_sni_check": ({"acl sni_ok external sni_check": "acl sni_ok src all"}, {}),
    "no_access_log": ({"access_log tcp://127.0.0.1:{{ access_log_port }} logformat=egress "
                       "buffer-size={{ access_log_buffer }} on-error=drop !local_manager": "access_log none"}, {}),
    "helper_concurrency_1": ({SNI_HELPER_OPTIONS: "cache=0 concurrency=1 children-max=8 children-startup=4 "
                              "children-idle=4"}, {}),
    "helper_children_4": ({SNI_HELPER_OPTIONS: "cache=0 concurrency=64 children-max=4 children-startup=4 "
                           "children-idle=4"}, {}),
}


def bench_sni_variants(workdir: Path, seed: SeedSquid, cacert: str, rounds: int, count: int) -> dict[str, Any]:
    """Where a new HTTPS connection's added latency goes: egress-proxy as shipped ("now"), beside variants that each
    take one part away or change the SNI helper's protocol settings, the seed-style Squid and direct, interleaved."""
    result: dict[str, Any] = {"background_busy_percent_before": background_busy(), "loadavg_before": loadavg(),
                              "variants": {name: {"template_edits": edits, "env": env}
                                           for name, (edits, env) in SNI_VARIANTS.items()}}
    allowlist = workdir / "variants-allowlist.txt"
    allowlist.write_text(allowlist_text(100, 0))
    ports = {"now": PROXY_PORT + 5, **{name: PROXY_PORT + 6 + i for i, name in enumerate(SNI_VARIANTS)}}
    proxies: dict[str, Proxy | SeedSquid] = {"now": Proxy(workdir, allowlist, port=ports["now"], name="state-v-now")}
    for name, (edits, env) in SNI_VARIANTS.items():
        extra = {**env, "PYTHONPATH": str(package_variant(workdir, name, edits=edits))} if edits else env
        proxies[name] = Proxy(workdir, allowlist, extra, port=ports[name], name=f"state-v-{name}")
    try:
        for proxy in proxies.values():
            assert isinstance(proxy, Proxy)
            proxy.start()
        proxies["seed"] = seed
        latency = {}
        for kind in ("https",):
            targets = {"direct": Target(kind, False, cacert), "seed": Target(kind, True, cacert, SEED_PORT),
                       **{name: Target(kind, True, cacert, ports[name]) for name in proxies if name != "seed"}}
            latency[kind] = compared_latencies(targets, proxies, rounds, count, baseline="seed", candidate="now")
            log(f"  {kind}: added p50 {latency[kind]['added_p50_ms']} ms; proxy CPU per request "
                f"{ {n: c['total'] for n, c in latency[kind]['proxy_cpu_us_per_request'].items()} } us")
        result["latency"] = latency
    finally:
        stop_all(proxies)
    result["background_busy_percent_after"] = background_busy()
    result["loadavg_after"] = loadavg()
    return result


def bench_sni(workdir: Path, seed: SeedSquid, cacert: str, rounds: int, count: int, lookups: int) -> dict[str, Any]:
    """The strict SNI check's cost per new connection: egress-proxy with the compiled helper ("now") and with the
    Python helper, the seed-style Squid (no helper, no strict check), and an older checkout when one is named
    (EGRESS_BENCH_OLD_TREE), all with the same 100-entry list on their own ports, interleaved with direct."""
    result: dict[str, Any] = {"background_busy_percent_before": background_busy(), "loadavg_before": loadavg()}
    allowlist = workdir / "sni-allowlist.txt"
    allowlist.write_text(allowlist_text(100, 0))
    proxies: dict[str, Proxy | SeedSquid] = {
        "now": Proxy(workdir, allowlist, port=PROXY_PORT + 2, name="state-now"),
        # PYTHONPATH comes before the venv's editable finder, so these supervisors run the copied package.
        "python_helper": Proxy(workdir, allowlist,
                               {"PYTHONPATH": str(package_variant(workdir, "python-helper", compiled=False))},
                               port=PROXY_PORT + 3, name="state-python-helper")}
    if OLD_TREE is not None:
        if not (OLD_TREE / "entrypoint" / "egress_proxy").is_dir():
            raise RuntimeError(f"EGRESS_BENCH_OLD_TREE={OLD_TREE} is not an egress-proxy checkout")
        result.update(old_tree=str(OLD_TREE), old_commit=old_commit(OLD_TREE))
        proxies["old_tree"] = Proxy(workdir, allowlist, {"PYTHONPATH": str(OLD_TREE / "entrypoint")},
                                    port=PROXY_PORT + 4, name="state-old-tree")
    ports = {"now": PROXY_PORT + 2, "python_helper": PROXY_PORT + 3, "old_tree": PROXY_PORT + 4}
    try:
        for proxy in proxies.values():
            assert isinstance(proxy, Proxy)
            proxy.start()
        helpers = {name: " ".join(policy_bench.sni_helper_command(proxy.state_dir)[:-1])
                   for name, proxy in proxies.items() if isinstance(proxy, Proxy) and name != "old_tree"}
        if not helpers["now"].endswith("/bin/sni_helper") or "sni_helper.py" not in helpers["python_helper"]:
            raise RuntimeError(f"not the two helpers expected (build it: scripts/build-sni-helper): {helpers}")
        result["helpers"] = helpers
        proxies["seed"] = seed
        latency = {}
        for kind in ("https", "http"):
            targets = {"direct": Target(kind, False, cacert), "seed": Target(kind, True, cacert, SEED_PORT),
                       **{name: Target(kind, True, cacert, ports[name]) for name in proxies if name != "seed"}}
            latency[kind] = compared_latencies(targets, proxies, rounds, count, baseline="python_helper",
                                               candidate="now")
            log(f"  {kind}: added p50 {latency[kind]['added_p50_ms']} ms; compiled minus Python helper "
                f"{latency[kind]['difference_p50_ms']} ms (rounds: "
                f"{[r['difference_p50_ms'] for r in latency[kind]['rounds']]}); proxy CPU per request "
                f"{latency[kind]['proxy_cpu_us_per_request']} us")
        result["latency"] = latency
        hello = policy_bench.client_hello(cacert)
        result["sni_helper"] = helper_cost(proxies["now"].state_dir, "default", hello, lookups)  # type: ignore[union-attr]
        result["python_sni_helper"] = helper_cost(proxies["python_helper"].state_dir,  # type: ignore[union-attr]
                                                  "default", hello, lookups)
        log(f"  SNI helper: compiled {result['sni_helper']}; Python {result['python_sni_helper']}")
    finally:
        stop_all(proxies)
    result["background_busy_percent_after"] = background_busy()
    result["loadavg_after"] = loadavg()
    return result


def old_commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True)
    return out.stdout.strip() or "unknown"


def reload_under_load_results() -> dict[str, Any] | None:
    """bench/reload_under_load.py (owned by the live-allowlist work) writes bench/results/reload-<date>.json;
    include the newest."""
    found = sorted([*RESULTS.glob("reload-*.json"), *RESULTS.glob("reload_under_load*.json")],
                   key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    try:
        data = json.loads(found[-1].read_text())
    except ValueError:
        return None
    return {"file": found[-1].name, "data": data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--name", help="results file name without .json (default: the date, plus the sections "
                        "when not all of them run)")
    args = parser.parse_args()
    if not benchenv.isolated():
        print("refusing to run outside a private network namespace with only loopback: use bench/run",
              file=sys.stderr)
        return 2
    sections = args.only or list(SECTIONS)
    quick = args.quick
    started = time.monotonic()
    date = datetime.date.today().isoformat()
    results: dict[str, Any] = {
        "date": date, "started": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick,
        "machine": machine(), "sections": sections, "niceness": os.nice(0), "loadavg_at_start": loadavg(),
    }
    # Other work on the machine skews everything; record how busy it was before we started.
    before = benchenv.machine_busy()
    time.sleep(2)
    after = benchenv.machine_busy()
    busy = round(100 * (after[0] - before[0]) / max(1, after[1] - before[1]), 1)
    results["machine_busy_before_start_percent"] = busy
    if busy > 20:
        log(f"warning: the machine is already {busy}% busy with other work; the figures will be noisy")
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-", dir="/tmp"))
    world = World(workdir)
    proxy: Proxy | None = None
    seed: SeedSquid | None = None
    try:
        world.start()
        cacert = str(world.ca.ca_path)
        allowlist = workdir / "allowlist.txt"
        allowlist.write_text(allowlist_text(100, 0))
        proxy = Proxy(workdir, allowlist).start()
        seed_allowlist = workdir / "seed-allowlist.txt"
        seed_allowlist.write_text(allowlist_text(100, 0))
        seed = SeedSquid(workdir, seed_allowlist, world.ca).start()
        results["seed_squid_conf"] = (seed.dir / "squid.conf").read_text()
        results["sni_helper_command"] = " ".join(policy_bench.sni_helper_command(proxy.state_dir)[:-1])
        conf = (proxy.state_dir / "conf" / "squid.conf").read_text()
        workers = [line.split()[1] for line in conf.splitlines() if line.startswith("workers ")]
        results["squid_workers"] = int(workers[0]) if workers else 1
        results["squid_processes"] = len(proxy.squid_pids())
        log(f"proxy up: supervisor pid {proxy.pid}, squid pids {proxy.squid_pids()}, "
            f"{results['squid_workers']} worker(s)")
        if "throughput" in sections:
            log("throughput")
            results["throughput"] = bench_throughput(proxy, seed, cacert, reps=1 if quick else 5,
                                                     origin_pids=world.origin.pids())
        if "connections" in sections:
            log("new connections")
            results["connections"] = bench_connections(proxy, seed, cacert, count=200 if quick else 1000,
                                                       rate_seconds=2 if quick else 5, workers=4)
        if "http" in sections:
            log("plain HTTP requests/s (wrk)")
            results["http"] = bench_http(proxy, seed, seconds=2 if quick else 5, connections=16)
        if "supervisor" in sections:
            log("supervisor cost")
            results["supervisor"] = bench_supervisor(proxy, cacert, idle_seconds=3 if quick else 10,
                                                     load_seconds=2 if quick else 5, thread_rounds=1 if quick else 3,
                                                     thread_count=200 if quick else 1000)
        if "scale" in sections:
            log("allowlist scale")
            results["scale"] = bench_scale(proxy, workdir, allowlist, cacert, count=100 if quick else 300,
                                           reps=2 if quick else 5)
        if "sni" in sections:
            log("SNI helper: compiled vs Python vs the seed-style Squid, same run")
            results["sni"] = bench_sni(workdir, seed, cacert, rounds=2 if quick else 7, count=100 if quick else 300,
                                       lookups=500 if quick else 5000)
        if "sni_variants" in sections:
            log("SNI variants: where a new HTTPS connection's time goes, and the helper's protocol settings")
            results["sni_variants"] = bench_sni_variants(workdir, seed, cacert, rounds=2 if quick else 7,
                                                         count=100 if quick else 300)
        if "policies" in sections:
            log(f"policies: {POLICY_COUNT} x {ENTRIES_PER_POLICY:,} entries")
            results["policies"] = bench_policies(proxy, workdir, allowlist, cacert, reps=2 if quick else 4,
                                                 rounds=2 if quick else 7, count=100 if quick else 300,
                                                 lookups=500 if quick else 5000)
        if "identity" in sections:
            log("identity: security-group policy vs CIDR policy, and a membership churn")
            results["identity"] = bench_identity(workdir, cacert, rounds=2 if quick else 7,
                                                 count=100 if quick else 300, identities=200 if quick else 1000,
                                                 churn_per_second=10, churn_seconds=20 if quick else 60)
    finally:
        if proxy:
            proxy.stop()
        if seed:
            seed.stop()
        world.stop()
    if set(sections) - {"sni", "policies", "identity"}:  # the flat-list reload figures belong with the other sections
        results["reload_under_load"] = reload_under_load_results()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["loadavg_at_end"] = loadavg()
    args.output.mkdir(parents=True, exist_ok=True)
    name = args.name or (date if args.only is None else "-".join([date, *sections]))
    out = args.output / f"{name}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {out}")
    report.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
