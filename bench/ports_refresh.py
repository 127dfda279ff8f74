"""Transparent mode's extra ports: what one refresh of the ports sets costs the host.

The host runs 'egress-proxy nft-sets' (resolve every name of the loaded policies' ports, print the transaction)
and 'nft -f' of its output on a timer (every 15 s on the CDK stack). This measures both, for a small document
(5 names of 4 addresses, one client network: 20 elements) and a large one (50 names, 10 client networks: 2,000
elements), against the harness's DNS server on loopback, in a network namespace of its own. Not measured here: the
'docker exec' around the command on the instance.

    unshare --net -- sh -c 'ip link set lo up && exec "$0" "$@"' .venv/bin/python bench/ports_refresh.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import DnsServer  # noqa: E402
from proxy_runner import egress_proxy_command  # noqa: E402

DNS = "127.0.0.53"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(names: int, client_networks: int, runs: int) -> dict[str, object]:
    records = {f"host{n}.test": [f"198.51.{100 + n // 60}.{n % 60 * 4 + k + 1}" for k in range(4)]
               for n in range(names)}
    dns = DnsServer(records, host=DNS, port=53, ttl=60)
    dns.start()
    try:
        with tempfile.TemporaryDirectory() as state:
            conf = Path(state) / "conf"
            conf.mkdir()
            clients = [f"10.{n}.0.0/16" for n in range(client_networks)]
            rules = [{"policy": "p", "entry": f"{name}:22", "clients": clients, "host": name, "ports": "22"}
                     for name in records]
            (conf / "ports.json").write_text(json.dumps({"rules": rules}))
            env = {**os.environ, "EGRESS_STATE_DIR": state, "EGRESS_TRANSPARENT": "on",
                   "EGRESS_CLIENT_CIDRS": "10.0.0.0/8", "EGRESS_DNS_SERVERS": DNS,
                   "EGRESS_ALLOW_DESTINATIONS": "198.51.100.0/22"}
            ruleset = subprocess.run([*egress_proxy_command(), "nft-rules"], env=env, capture_output=True,
                                     text=True, check=True).stdout
            subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True)
            rows: dict[str, list[float]] = {"sets_wall": [], "sets_cpu": [], "nft_wall": [], "nft_cpu": []}
            elements = 0
            for _ in range(runs):
                cpu, start = _children_cpu(), time.monotonic()
                transaction = subprocess.run([*egress_proxy_command(), "nft-sets"], env=env, capture_output=True,
                                             text=True, check=True).stdout
                rows["sets_wall"].append(time.monotonic() - start)
                rows["sets_cpu"].append(_children_cpu() - cpu)
                cpu, start = _children_cpu(), time.monotonic()
                subprocess.run(["nft", "-f", "-"], input=transaction, text=True, check=True)
                rows["nft_wall"].append(time.monotonic() - start)
                rows["nft_cpu"].append(_children_cpu() - cpu)
                elements = sum(1 for line in transaction.splitlines() if line.startswith("add element"))
            subprocess.run(["nft", "delete", "table", "inet", "egress_proxy"], check=True)
    finally:
        dns.stop()
    return {"names": names, "client_networks": client_networks, "elements": elements, "runs": runs,
            **{key: round(statistics.median(values), 3) for key, values in rows.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| names | client networks | elements | nft-sets wall s | nft-sets CPU s | nft -f wall s | nft -f CPU s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for names, networks in ((5, 1), (50, 10)):
        row = measure(names, networks, args.runs)
        print(f"| {row['names']} | {row['client_networks']} | {row['elements']} | {row['sets_wall']} | "
              f"{row['sets_cpu']} | {row['nft_wall']} | {row['nft_cpu']} |")
    print(f"medians of {args.runs} runs; load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
