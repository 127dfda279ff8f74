#!/usr/bin/env python3
"""Where Squid's CPU goes per new HTTPS connection: ``perf record`` on the Squid processes of egress-proxy and of
the seed-style Squid (bench/benchenv.py SEED_CONF) while one client opens new HTTPS connections (CONNECT, TLS, one
GET) back to back, one route at a time. A script, not a test; Debian's linux-perf.

Prints and writes (bench/results/<name>.json) the CPU per connection of each route by process kind (squid,
helpers, supervisor) and Squid's self time per symbol (us per connection), biggest differences first. Squid 5.7 in
Debian is stripped, but it exports most of its C++ symbols dynamically, so perf names them.

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/perf_new_connection.py'
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients  # noqa: E402
from benchenv import PROXY_PORT, SEED_PORT, Proxy, SeedSquid, World, isolated  # noqa: E402

from bench import allowlist_text, cpu_us_per_request, proxy_cpu_ns  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FREQUENCY = 4999


def callers(data: Path, leaf: str, depth: int = 6) -> dict[str, int]:
    """Samples whose innermost frame is ``leaf``, by the chain of its callers (innermost first)."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym"], capture_output=True, text=True,
                          check=True).stdout
    chains: dict[str, int] = collections.Counter()
    for block in text.split("\n\n"):
        parts = (line.split(None, 1) for line in block.strip().splitlines())
        frames = [part[1].strip() for part in parts if len(part) == 2]
        if frames and leaf in frames[0]:
            chains[" < ".join(frames[1:depth + 1])] += 1
    return dict(collections.Counter(chains).most_common(15))


def profile(name: str, route: Proxy | SeedSquid, target: clients.Target, seconds: float, workdir: Path,
            leaves: list[str]) -> dict[str, Any]:
    data = workdir / f"perf-{name}.data"
    pids = route.squid_pids()
    before = proxy_cpu_ns(route)
    graph = ["--call-graph", "dwarf,32768", "-F", "499"] if leaves else ["-F", str(FREQUENCY)]
    perf = subprocess.Popen(["perf", "record", "-q", *graph, "-o", str(data),
                             "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # perf attached
    rate = clients.connection_rate(target, seconds, 1)
    perf.send_signal(2)
    perf.wait(timeout=60)
    after = proxy_cpu_ns(route)
    connections = rate["connections"]
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio", "-q",
                             "--sort", "dso,symbol", "-F", "sample,dso,symbol"],
                            capture_output=True, text=True, check=True).stdout
    total_samples = 0
    symbols: dict[str, float] = collections.Counter()
    for line in report.splitlines():
        match = re.match(r"\s*(\d+)\s+(\S+)\s+\[.\]\s+(.*)$", line)
        if not match:
            continue
        samples = int(match.group(1))
        total_samples += samples
        symbol = re.split(r"\s{2,}", match.group(3).strip())[0]  # perf pads the column and adds "-" fields
        symbols[f"{match.group(2)}: {symbol}"] += samples
    per_connection = 1e6 / (499 if leaves else FREQUENCY) / max(1, connections)  # us of CPU a sample, a connection
    return {"connections": connections, "errors": rate["errors"], "per_s": rate["per_s"],
            "cpu_us_per_connection": cpu_us_per_request(before, after, max(1, connections)),
            "sampled_squid_us_per_connection": round(total_samples * per_connection, 1),
            "symbols_us_per_connection": {symbol: round(samples * per_connection, 2)
                                          for symbol, samples in symbols.most_common()},
            "callers": {leaf: callers(data, leaf) for leaf in leaves}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default=f"{datetime.date.today()}-perf-new-connection")
    parser.add_argument("--callers", action="append", default=[], metavar="SYMBOL",
                        help="record call graphs (DWARF) and show who calls SYMBOL (e.g. re_search_internal)")
    args = parser.parse_args()
    if not isolated():
        print("run me in a private network namespace (see the docstring)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="egress-perf-", dir="/tmp"))
    world = World(workdir).start()
    allowlist = workdir / "allowlist.txt"
    allowlist.write_text(allowlist_text(100, 0))
    cacert = str(world.ca.ca_path)
    routes: dict[str, Proxy | SeedSquid] = {}
    try:
        routes["egress_proxy"] = Proxy(workdir, allowlist, port=PROXY_PORT).start()
        routes["seed_style"] = SeedSquid(workdir, allowlist, world.ca, port=SEED_PORT).start()
        targets = {"egress_proxy": clients.Target("https", True, cacert, PROXY_PORT),
                   "seed_style": clients.Target("https", True, cacert, SEED_PORT)}
        for target in targets.values():  # warm up: helpers started, DNS cached
            clients.latencies(target, 50)
        rounds: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            rounds.append({name: profile(name, routes[name], target, args.seconds, workdir, args.callers)
                           for name, target in targets.items()})
    finally:
        for route in routes.values():
            route.stop()
        world.stop()
    result = {"date": str(datetime.date.today()), "seconds": args.seconds, "frequency": FREQUENCY, "rounds": rounds}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    for number, measured in enumerate(rounds, 1):
        ours, seed = measured["egress_proxy"], measured["seed_style"]
        print(f"round {number}: egress-proxy {ours['per_s']} conn/s, CPU {ours['cpu_us_per_connection']}; "
              f"seed-style {seed['per_s']} conn/s, CPU {seed['cpu_us_per_connection']}")
        print(f"  Squid sampled: {ours['sampled_squid_us_per_connection']} against "
              f"{seed['sampled_squid_us_per_connection']} us per connection")
        names = set(ours["symbols_us_per_connection"]) | set(seed["symbols_us_per_connection"])
        diffs = sorted(((ours["symbols_us_per_connection"].get(n, 0.0), seed["symbols_us_per_connection"].get(n, 0.0),
                         n) for n in names), key=lambda t: t[1] - t[0])
        for mine, theirs, symbol in diffs[:40]:
            print(f"  {mine - theirs:+7.2f}  {mine:6.2f} {theirs:6.2f}  {symbol[:110]}")
        for leaf, chains in ours["callers"].items():
            print(f"  egress-proxy's callers of {leaf}:")
            for chain, samples in chains.items():
                print(f"    {samples:5d}  {chain[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
