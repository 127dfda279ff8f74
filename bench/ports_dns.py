"""Transparent mode's extra ports when client and host disagree on a name's addresses: how many connections drop.

The host opens a policy's `ports` name to the addresses its own lookups returned (each kept for its TTL, at least
EGRESS_PORT_ADDRESS_HOLD, after it was last seen). A client that resolves the name itself may hold another one:
round robin over a changing subset, or a resolver that answers differently (a CDN). This counts, per answer style,
how many of the client's connections the host dropped.

The namespaces of netns.RoutedTopology; the product's ruleset on the router; a name with two addresses, a TCP
server on each (port 2222); the host refreshes the sets ('egress-proxy nft-sets', then 'nft -f') before every
REFRESH_EVERY-th client connection, standing for the timer; each client connection first resolves the name (with
the host's resolver, or another one), then connects with a 1 s timeout. The host's memory starts empty for each
style. No Squid: nft-sets reads ports.json, written here as the proxy writes it.

    unshare --net -- sh -c 'ip link set lo up && exec "$0" "$@"' .venv/bin/python bench/ports_dns.py [--count N]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import DnsServer, RawTcpServer  # noqa: E402
from netns import RoutedTopology, serving  # noqa: E402
from proxy_runner import egress_proxy_command  # noqa: E402

from egress_proxy.dns_lookup import resolve  # noqa: E402

CLIENT = "10.200.1.2"
NAME = "cdn.test"
ADDRESSES = ["203.0.113.10", "203.0.113.11"]
HOST_RESOLVER = "203.0.113.53"
OTHER_RESOLVER = "203.0.113.54"
PORT = 2222
REFRESH_EVERY = 5


class StyledDns(DnsServer):
    """Answers NAME with both addresses, one picked at random, or always the same one (a CDN that answers each
    resolver with its own address)."""

    style = "random"
    _turn = 0

    def _lookup(self, qname: str) -> Any:
        if qname != NAME:
            return super()._lookup(qname)
        with self._lock:
            self._turn += 1
            turn = self._turn
        addresses = [ipaddress.ip_address(address) for address in ADDRESSES]
        if self.style == "random":
            return [random.choice(addresses)]
        if self.style == "both":
            return addresses[turn % 2:] + addresses[:turn % 2]
        return [addresses[0 if self.style == "first" else 1]]


def refresh(topology: RoutedTopology, env: dict[str, str]) -> None:
    transaction = subprocess.run(topology.router.command([*egress_proxy_command(), "nft-sets"]), env=env,
                                 capture_output=True, text=True, check=True).stdout
    topology.router.run("nft", "-f", "-", input=transaction)


def connect(topology: RoutedTopology, resolver: str) -> bool:
    # The client's lookup is asked from the internet namespace, where the resolvers are: the ruleset drops DNS from
    # the clients to any outside server (in a VPC the resolver answers them without crossing the instance).
    with topology.internet.entered():
        answers = resolve(NAME, [ipaddress.ip_address(resolver)])
    with topology.client.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.bind((CLIENT, 0))
        sock.settimeout(1)
        try:
            sock.connect((str(answers[0].address), PORT))
            return True
        except TimeoutError:
            return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="client connections per style")
    args = parser.parse_args()
    topology = RoutedTopology("bench-ports", [CLIENT], [*ADDRESSES, HOST_RESOLVER, OTHER_RESOLVER])
    host_dns = StyledDns({}, host=HOST_RESOLVER, port=53, ttl=30)
    client_dns = StyledDns({}, host=OTHER_RESOLVER, port=53, ttl=30)
    servers = {"host_dns": host_dns, "client_dns": client_dns,
               **{address: RawTcpServer(address, PORT) for address in ADDRESSES}}
    rows = []
    try:
        with serving(topology.internet, servers), tempfile.TemporaryDirectory() as state:
            conf = Path(state) / "conf"
            conf.mkdir()
            rule = {"policy": "p", "entry": f"{NAME}:{PORT}", "clients": [f"{CLIENT}/32"], "host": NAME,
                    "ports": str(PORT)}
            (conf / "ports.json").write_text(json.dumps({"rules": [rule]}))
            env = {**os.environ, "EGRESS_STATE_DIR": state, "EGRESS_TRANSPARENT": "on",
                   "EGRESS_CLIENT_CIDRS": "10.200.1.0/24", "EGRESS_DNS_SERVERS": HOST_RESOLVER}
            ruleset = subprocess.run([*egress_proxy_command(), "nft-rules"], env=env, capture_output=True,
                                     text=True, check=True).stdout
            topology.router.run("nft", "-f", "-", input=ruleset)
            for label, host_style, client_style, resolver in (
                    ("both addresses (round robin)", "both", "both", HOST_RESOLVER),
                    ("one address, at random", "random", "random", HOST_RESOLVER),
                    ("host: always the first; client's resolver: always the second", "first", "second",
                     OTHER_RESOLVER)):
                host_dns.style, client_dns.style = host_style, client_style
                (Path(state) / "port-addresses.json").unlink(missing_ok=True)
                dropped = []
                for index in range(args.count):
                    if index % REFRESH_EVERY == 0:
                        refresh(topology, env)
                    dropped.append(not connect(topology, resolver))
                rows.append((label, "same" if resolver == HOST_RESOLVER else "another", sum(dropped),
                             sum(dropped[:2 * REFRESH_EVERY]), sum(dropped[2 * REFRESH_EVERY:])))
    finally:
        topology.close()
    print(f"{args.count} connections per style, a refresh before every {REFRESH_EVERY}th, TTL 30 s, "
          "EGRESS_PORT_ADDRESS_HOLD 300 s")
    print("| the resolvers answer | client's resolver | dropped | in the first 2 refreshes | after them |")
    print("|---|---|---:|---:|---:|")
    for label, resolver, total, early, late in rows:
        print(f"| {label} | {resolver} | {total} of {args.count} | {early} of {2 * REFRESH_EVERY} | "
              f"{late} of {args.count - 2 * REFRESH_EVERY} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
