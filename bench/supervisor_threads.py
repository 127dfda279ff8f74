#!/usr/bin/env python3
"""The supervisor's CPU by thread: per new HTTPS connection, and per second at idle. A script, not a test.

The bench's CPU per connection (bench.py compared_latencies) divides everything the supervisor used in a window by
the connections made in it, so the supervisor's idle cost (timers, polls) lands on each connection in proportion
to the window's wall time per connection: the more routes a section interleaves, the more it weighs. This script
separates the two. Per round: ``--idle`` seconds with no traffic (CPU per second, per thread), then ``--count`` new
HTTPS connections (CONNECT, TLS, one GET) back to back through egress-proxy alone. A thread's CPU per connection is
its CPU in the load window minus its idle rate times the window's wall time, over the connections: the part the
connections themselves cost. CPU is the kernel's own accounting (/proc/<pid>/task/<tid>/schedstat), which a busy
machine slows down but does not inflate; "wakes" are the times a thread was scheduled in.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/supervisor_threads.py --name NAME'

Writes bench/results/<name>.json and prints the medians over the rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients  # noqa: E402
from benchenv import PROXY_PORT, Proxy, World, isolated, thread_cpu  # noqa: E402
from policy_bench import background_busy, loadavg  # noqa: E402

from bench import allowlist_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _used(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """(ns, wakes) per thread name between two readings; a thread that started in between counts in full."""
    return {name: (ns - before.get(name, (0, 0))[0], runs - before.get(name, (0, 0))[1])
            for name, (ns, runs) in after.items()}


def measure_round(proxy: Proxy, target: clients.Target, idle: float, count: int) -> dict[str, Any]:
    start = thread_cpu(proxy.pid)
    started = time.monotonic()
    time.sleep(idle)
    idle_wall = time.monotonic() - started
    middle = thread_cpu(proxy.pid)
    lines_before = proxy.access_lines
    started = time.monotonic()
    clients.latencies(target, count)
    load_wall = time.monotonic() - started
    end = thread_cpu(proxy.pid)
    quiet, busy = _used(start, middle), _used(middle, end)
    threads: dict[str, Any] = {}
    for name in sorted(set(quiet) | set(busy)):
        idle_ns, idle_runs = quiet.get(name, (0, 0))
        load_ns, load_runs = busy.get(name, (0, 0))
        per_second = idle_ns / idle_wall
        threads[name] = {
            "idle_us_per_s": round(per_second / 1000, 1),
            "idle_wakes_per_s": round(idle_runs / idle_wall, 1),
            "gross_us_per_connection": round(load_ns / count / 1000, 2),
            "us_per_connection": round((load_ns - per_second * load_wall) / count / 1000, 2),
            "wakes_per_connection": round((load_runs - idle_runs / idle_wall * load_wall) / count, 3)}
    total = {key: round(sum(t[key] for t in threads.values()), 2) for key in next(iter(threads.values()))}
    return {"idle_seconds": round(idle_wall, 2), "load_seconds": round(load_wall, 2),
            "connections_per_s": round(count / load_wall, 1), "access_lines": proxy.access_lines - lines_before,
            "threads": threads, "total": total}


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    names = sorted({name for r in rounds for name in r["threads"]})
    keys = list(rounds[0]["total"])
    zero = dict.fromkeys(keys, 0.0)
    return {"threads": {name: {key: round(statistics.median(r["threads"].get(name, zero)[key] for r in rounds), 2)
                               for key in keys} for name in names},
            "total": {key: round(statistics.median(r["total"][key] for r in rounds), 2) for key in keys},
            "connections_per_s": statistics.median(r["connections_per_s"] for r in rounds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="new HTTPS connections per round")
    parser.add_argument("--idle", type=float, default=10.0, help="idle seconds per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default=f"{datetime.date.today()}-supervisor-threads")
    args = parser.parse_args()
    if not isolated():
        print("run me in a private network namespace (see the docstring)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="egress-supthreads-", dir="/tmp"))
    world = World(workdir).start()
    allowlist = workdir / "allowlist.txt"
    allowlist.write_text(allowlist_text(100, 0))
    target = clients.Target("https", True, str(world.ca.ca_path), PROXY_PORT)
    result: dict[str, Any] = {"date": str(datetime.date.today()), "count": args.count, "idle": args.idle,
                              "loadavg_before": loadavg(), "background_busy_percent_before": background_busy()}
    proxy = Proxy(workdir, allowlist, port=PROXY_PORT)
    try:
        proxy.start()
        clients.latencies(target, 50)  # helpers started, DNS cached, every worker's logger connected
        time.sleep(1)
        rounds = [measure_round(proxy, target, args.idle, args.count) for _ in range(args.rounds)]
    finally:
        proxy.stop()
        world.stop()
    result.update(rounds=rounds, median=medians(rounds), loadavg_after=loadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    summary = result["median"]
    print(f"{args.rounds} rounds of {args.idle:g} s idle + {args.count} new HTTPS connections "
          f"({summary['connections_per_s']} conn/s); medians. load average {result['loadavg_before']}")
    print(f"{'thread':<18} {'idle us/s':>10} {'idle wakes/s':>13} {'us/conn':>9} {'gross us/conn':>14} "
          f"{'wakes/conn':>11}")
    for name, row in [*summary["threads"].items(), ("TOTAL", summary["total"])]:
        print(f"{name:<18} {row['idle_us_per_s']:>10} {row['idle_wakes_per_s']:>13} {row['us_per_connection']:>9} "
              f"{row['gross_us_per_connection']:>14} {row['wakes_per_connection']:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
