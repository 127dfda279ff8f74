"""Benchmarks of egress-proxy against a direct connection measured in the same run. Run it with ``sudo bench/run``
(which puts it in a private network namespace first); it refuses to run where more than loopback exists.

Sections: throughput (curl), connections (new HTTPS/HTTP connections: latency and rate), http (wrk requests/s),
scale (allowlist size: reload time, Squid RSS, latency), supervisor (its CPU and RSS idle and under load).
Writes bench/results/<date>.json; bench/report.py turns it into <date>.md and the PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchenv
import clients
import report
from benchenv import ORIGIN_NAME, CpuWindow, Proxy, World, proc_stat
from clients import Target, percentile

RESULTS = benchenv.ROOT / "bench" / "results"
SECTIONS = ("throughput", "connections", "http", "supervisor", "scale")
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


def interleaved_latencies(kind: str, cacert: str, count: int, block: int = 50) -> dict[str, list[float]]:
    """Direct and proxied samples in alternating blocks, so drift on a noisy machine hits both alike."""
    out: dict[str, list[float]] = {"direct": [], "proxy": []}
    for via in (False, True):  # warm-up: DNS cache, SNI helper cache, page cache
        clients.latencies(Target(kind, via, cacert), 20)
    while len(out["proxy"]) < count:
        n = min(block, count - len(out["proxy"]))
        out["direct"] += clients.latencies(Target(kind, False, cacert), n)
        out["proxy"] += clients.latencies(Target(kind, True, cacert), n)
    return out


# --- sections --------------------------------------------------------------------------------------------
def bench_throughput(proxy: Proxy, cacert: str, reps: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    pids = proxy.groups()
    for name, path, streams in (("single_1gib", "/1g", 1), ("parallel_16x64mib", "/64m", 16)):
        runs: dict[str, list[float]] = {"direct": [], "proxy": []}
        cpu: dict[str, Any] = {}
        for rep in range(reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for via in order:
                route = "proxy" if via else "direct"
                window = CpuWindow(pids).start()
                run = clients.download(path, cacert, via, streams)
                cpu[route] = window.stop()
                runs[route].append(run["mb_per_s"])
                log(f"  {name} {route}: {run['mb_per_s']} MB/s, machine {cpu[route]['machine_busy_percent']}% "
                    f"busy, Squid {cpu[route]['squid']['cpu_percent']}% of a core")
        direct, proxied = statistics.median(runs["direct"]), statistics.median(runs["proxy"])
        # The ratio is the median of each rep's back-to-back pair: this machine's speed drifts by 2x over a
        # minute, and a pair shares the drift.
        pairs = [p / d for d, p in zip(runs["direct"], runs["proxy"], strict=True)]
        result[name] = {"streams": streams, "total_bytes": 1024**3, "runs_mb_per_s": runs,
                        "direct_mb_per_s": direct, "proxy_mb_per_s": proxied,
                        "pair_ratios": [round(r, 3) for r in pairs],
                        "ratio": round(statistics.median(pairs), 3), "cpu_last_run": cpu,
                        # Squid's own cost, independent of how many cores the endpoints got: core-seconds per GB.
                        "squid_core_s_per_gb": round(cpu["proxy"]["squid"]["cpu_percent"] / 100 /
                                                     (runs["proxy"][-1] / 1000), 3) or None}
    return result


def bench_connections(proxy: Proxy, cacert: str, count: int, rate_seconds: float, workers: int
                      ) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kind in ("https", "http"):
        samples = interleaved_latencies(kind, cacert, count)
        direct, proxied = summarize(samples["direct"]), summarize(samples["proxy"])
        rates: dict[str, Any] = {}
        for via in (False, True):
            window = CpuWindow(proxy.groups()).start()
            rate = clients.connection_rate(Target(kind, via, cacert), rate_seconds, workers)
            rate["cpu"] = window.stop()
            rates["proxy" if via else "direct"] = rate
        squid_share = rates["proxy"]["cpu"]["squid"]["cpu_percent"] / 100
        result[kind] = {
            "latency": {"direct": direct, "proxy": proxied},
            "added_p50_ms": round(proxied["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(proxied["p99_ms"] - direct["p99_ms"], 3),
            "samples_ms": {k: [round(v, 4) for v in vs] for k, vs in samples.items()},
            "rate": rates,
            "rate_ratio": round(rates["proxy"]["per_s"] / rates["direct"]["per_s"], 3),
            "rate_workers": workers,
            "squid_cpu_us_per_connection": round(squid_share / max(1.0, rates["proxy"]["per_s"]) * 1e6, 1),
        }
        log(f"  {kind}: p50 {direct['p50_ms']} -> {proxied['p50_ms']} ms, p99 {direct['p99_ms']} -> "
            f"{proxied['p99_ms']} ms; rate {rates['direct']['per_s']} -> {rates['proxy']['per_s']}/s")
    return result


def bench_http(proxy: Proxy, seconds: float, connections: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    pids = proxy.groups()
    for keepalive in (True, False):
        name = "keepalive" if keepalive else "new_connection"
        runs = {}
        for via in (False, True):
            lines_before = proxy.access_lines
            window = CpuWindow(pids).start()
            runs["proxy" if via else "direct"] = clients.wrk(via, keepalive, seconds, connections)
            usage = window.stop()
            if via:
                runs["proxy"]["cpu"] = usage  # type: ignore[assignment]
                runs["proxy"]["access_lines_relayed"] = proxy.access_lines - lines_before
        squid_share = runs["proxy"]["cpu"]["squid"]["cpu_percent"] / 100  # type: ignore[index]
        result[name] = {**runs, "connections": connections, "seconds": seconds,
                        "ratio": round(runs["proxy"]["rps"] / runs["direct"]["rps"], 3),
                        "squid_cpu_us_per_request": round(squid_share / max(1.0, runs["proxy"]["rps"]) * 1e6, 1)}
        log(f"  {name}: {runs['direct']['rps']:.0f} -> {runs['proxy']['rps']:.0f} req/s")
    return result


def bench_supervisor(proxy: Proxy, idle_seconds: float, load_seconds: float) -> dict[str, Any]:
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
    return {"idle_seconds": idle_seconds, "idle": idle, "load_seconds": load_seconds, "load_rps": load["rps"],
            "load": busy, "access_lines_per_s": round(relayed / load_seconds, 1)}


def time_render_and_parse(text: str, proxy: Proxy) -> dict[str, float]:
    """The reload's parts, timed separately in this process: allowlist policy, render, ``squid -k parse``."""
    from egress_proxy.allowlist import parse_allowlist_value
    from egress_proxy.settings import load_settings
    from egress_proxy.squid_conf import StatePaths, render

    settings = load_settings({}, proxy.env)
    paths = StatePaths(proxy.state_dir)
    started = time.monotonic()
    allowlist = parse_allowlist_value(text, source="bench")
    policy = time.monotonic() - started
    started = time.monotonic()
    render(settings, allowlist, paths, run_as="proxy", denial_port=39999)
    rendered = time.monotonic() - started
    # The candidate the supervisor just parse-checked and activated is in the state dir; parse it again.
    started = time.monotonic()
    subprocess.run(["squid", "-k", "parse", "-f", str(paths.squid_conf)], capture_output=True, timeout=120,
                   check=True)
    parsed = time.monotonic() - started
    return {"policy_s": round(policy, 3), "render_s": round(rendered, 3), "squid_parse_s": round(parsed, 3)}


def parse_profile(workdir: Path, proxy: Proxy) -> dict[str, float]:
    """Where ``squid -k parse`` spends its time on a big list: the same allowlist file loaded by minimal configs
    with one ACL, with both ACLs the template uses, and with the entries sorted the way Squid compares them."""
    from egress_proxy.squid_conf import StatePaths

    active = StatePaths(proxy.state_dir).allowlist
    entries = [line for line in active.read_text().splitlines() if line]
    by_reversed_labels = workdir / "allowlist-sorted.txt"
    by_reversed_labels.write_text("\n".join(sorted(entries, key=lambda e: e.lstrip(".").split(".")[::-1])) + "\n")
    variants = {
        "dstdomain_only": f'acl a dstdomain -n "{active}"',
        "dstdomain_and_ssl_server_name": f'acl a dstdomain -n "{active}"\nacl b ssl::server_name "{active}"',
        "dstdomain_only_sorted_by_reversed_labels": f'acl a dstdomain -n "{by_reversed_labels}"',
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


def bench_scale(proxy: Proxy, workdir: Path, allowlist: Path, cacert: str, count: int) -> dict[str, Any]:
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
        latency = {}
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
    return {"sizes": rows}


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
        "machine": machine(), "sections": sections,
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
    try:
        world.start()
        cacert = str(world.ca.ca_path)
        allowlist = workdir / "allowlist.txt"
        allowlist.write_text(allowlist_text(100, 0))
        proxy = Proxy(workdir, allowlist).start()
        conf = (proxy.state_dir / "conf" / "squid.conf").read_text()
        workers = [line.split()[1] for line in conf.splitlines() if line.startswith("workers ")]
        results["squid_workers"] = int(workers[0]) if workers else 1
        results["squid_processes"] = len(proxy.squid_pids())
        log(f"proxy up: supervisor pid {proxy.pid}, squid pids {proxy.squid_pids()}, "
            f"{results['squid_workers']} worker(s)")
        if "throughput" in sections:
            log("throughput")
            results["throughput"] = bench_throughput(proxy, cacert, reps=1 if quick else 5)
        if "connections" in sections:
            log("new connections")
            results["connections"] = bench_connections(proxy, cacert, count=200 if quick else 1000,
                                                       rate_seconds=2 if quick else 5, workers=4)
        if "http" in sections:
            log("plain HTTP requests/s (wrk)")
            results["http"] = bench_http(proxy, seconds=2 if quick else 5, connections=16)
        if "supervisor" in sections:
            log("supervisor cost")
            results["supervisor"] = bench_supervisor(proxy, idle_seconds=3 if quick else 10,
                                                     load_seconds=2 if quick else 5)
        if "scale" in sections:
            log("allowlist scale")
            results["scale"] = bench_scale(proxy, workdir, allowlist, cacert, count=100 if quick else 300)
    finally:
        if proxy:
            proxy.stop()
        world.stop()
    results["reload_under_load"] = reload_under_load_results()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"{date}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {out}")
    report.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
