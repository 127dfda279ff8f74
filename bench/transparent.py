"""Transparent mode: the cost of an intercepted connection against an explicit one and against direct.

The topology of tests/integration/test_transparent.py (client, router and internet network namespaces; the real
supervisor and the product's nftables ruleset on the router; the harness origins in the internet namespace).
Each sample is one new TCP connection from the client namespace, one request and its response, and the close:
- direct: the router only routes (the ruleset is removed for these rounds), the client reaches the origin itself;
- intercept: no proxy setting, the ruleset redirects to Squid's intercept port;
- explicit: the proxy port, as a proxy-aware client uses it (CONNECT for HTTPS, an absolute URL for HTTP);
- direct6, intercept6: the same over IPv6 (client fd00:c1::2, an origin with an AAAA record only), as a ratio to
  direct6.
The routes run interleaved in rounds, so a busy machine slows them alike; the figures are ratios to direct.

    unshare --net -- sh -c 'ip link set lo up && exec "$0" "$@"' .venv/bin/python bench/transparent.py [--count N]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import random
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from dnslib import DNSRecord  # type: ignore[import-untyped]  # noqa: E402
from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, _read_head, http_get_over, read_body  # noqa: E402
from proxy_runner import egress_proxy_command  # noqa: E402
from test_transparent import (  # noqa: E402
    CLIENT,
    DNS_IP,
    DOCUMENT,
    ORIGIN,
    ROUTER_CLIENT_SIDE,
    NamespacedProxy,
    Topology,
)

EXPLICIT = (ROUTER_CLIENT_SIDE, 3128)
CLIENT6 = "fd00:c1::2"
ORIGIN6 = "fd00:203::10"  # exempt from the SSRF guard below: it stands for public IPv6 space
NAME6 = "v6.wild.test"  # allowed by DOCUMENT's .wild.test; AAAA only
CDN_NAME = "rr.test"
CDN_ADDRESSES = [ORIGIN, "203.0.113.11"]
#: Another resolver, for clients that do not share the proxy's.
CLIENT_RESOLVER = "203.0.113.54"


class RotatingDns(DnsServer):
    """Answers CDN_NAME as a CDN might: every address in a rotating order ("all"), one address per answer, the
    next one each time ("one"), one picked at random ("random"), or always the same one ("first", "second")."""

    style = "all"
    _turn = 0

    def _lookup(self, qname: str) -> Any:
        if qname != CDN_NAME:
            return super()._lookup(qname)
        with self._lock:
            self._turn += 1
            turn = self._turn
        addresses = [ipaddress.ip_address(a) for a in CDN_ADDRESSES]
        if self.style == "random":
            return [random.choice(addresses)]
        if self.style in {"first", "second"}:  # a CDN that answers each resolver with its own address
            return [addresses[0 if self.style == "first" else 1]]
        rotated = addresses[turn % 2:] + addresses[:turn % 2]
        return rotated if self.style == "all" else rotated[:1]


def _client_lookup(topology: Topology, resolver: str) -> str:
    """The client's own lookup of CDN_NAME (a resolver clients reach without crossing the proxy instance, as the
    VPC resolver is, so it is asked from the internet namespace here)."""
    with topology.internet.entered():
        answer = DNSRecord.parse(DNSRecord.question(CDN_NAME).send(resolver, 53, timeout=5))
    return str(answer.rr[0].rdata)


def _dns_refusals(topology: Topology, dns: RotatingDns, resolver: str, context: ssl.SSLContext,
                  count: int) -> dict[str, Any]:
    """Connections to CDN_NAME over intercepted HTTPS, each to the first address of the client's own fresh
    lookup: how many does the destination check refuse?"""
    failed: dict[str, int] = {}
    for _ in range(count):
        address = _client_lookup(topology, resolver)
        with topology.client.entered():
            try:
                with socket.create_connection((address, 443), timeout=10) as sock, \
                        context.wrap_socket(sock, server_hostname=CDN_NAME) as tls:
                    status, _ = http_get_over(tls, CDN_NAME, "/cdn")
                    assert status == 200, status
            except (ssl.SSLError, OSError) as error:
                failed[type(error).__name__] = failed.get(type(error).__name__, 0) + 1
    return {"answers": dns.style, "ttl_s": dns.ttl, "connections": count, "client_failures": failed}


def _target(route: str) -> tuple[str, str]:
    """(origin address, name) of a route: the IPv6 routes end in 6."""
    return (ORIGIN6, NAME6) if route.endswith("6") else (ORIGIN, "allowed.test")


def _cdn_lines(proxy: NamespacedProxy) -> list[dict[str, Any]]:
    return [r for r in proxy.records if r.get("type") == "access" and r.get("sni") == CDN_NAME]


def _https(route: str, context: ssl.SSLContext) -> None:
    address, name = _target(route)
    if route == "explicit":
        sock = socket.create_connection(EXPLICIT, timeout=10)
        sock.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
        assert b" 200 " in _read_head(sock)
    else:
        sock = socket.create_connection((address, 443), timeout=10)
    with context.wrap_socket(sock, server_hostname=name) as tls:
        status, _ = http_get_over(tls, name, "/bench")
        assert status == 200, status


def _http(route: str, _: ssl.SSLContext) -> None:
    address, name = _target(route)
    target = EXPLICIT if route == "explicit" else (address, 80)
    path = "http://allowed.test/bench" if route == "explicit" else "/bench"
    with socket.create_connection(target, timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        head = _read_head(sock)
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        read_body(sock, head)


def _batch(topology: Topology, kind: Callable[[str, ssl.SSLContext], None], route: str, count: int,
           context: ssl.SSLContext) -> list[float]:
    samples = []
    with topology.client.entered():
        for _ in range(count):
            started = time.perf_counter()
            kind(route, context)
            samples.append(time.perf_counter() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=200, help="connections per route per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dns-count", type=int, default=100, help="connections per DNS answer style and TTL")
    parser.add_argument("--name", default=datetime.date.today().isoformat())
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="egress-bench-transparent-"))
    work.chmod(0o755)
    topology = Topology("bench", [CLIENT, CLIENT6], [ORIGIN, ORIGIN6, DNS_IP, CDN_ADDRESSES[1], CLIENT_RESOLVER])
    ca = TestCA(work / "ca")
    servers = []
    try:
        dns = RotatingDns({"allowed.test": [ORIGIN], NAME6: [ORIGIN6]}, host=DNS_IP, port=53)
        client_dns = RotatingDns({}, host=CLIENT_RESOLVER, port=53)
        with topology.internet.entered():
            servers = [dns, client_dns, HttpOrigin(ORIGIN, 80, name="bench-http"),
                       TlsOrigin(ORIGIN, 443, ca, ["allowed.test", CDN_NAME], name="bench-tls"),
                       HttpOrigin(ORIGIN6, 80, name="bench-http6"),
                       TlsOrigin(ORIGIN6, 443, ca, [NAME6], name="bench-tls6"),
                       TlsOrigin(CDN_ADDRESSES[1], 443, ca, [CDN_NAME], name="bench-tls-2")]
            for server in servers:
                server.start()
        # The harness's Python origins and clients write a message in several pieces (a response's head and body, a
        # TLS flight), so Nagle's algorithm waits for the peer's delayed ACK (40 ms) on every path, direct
        # included. ACK at once everywhere: the figures are then the routes' own costs, not Python's write pattern.
        for namespace, gateway in ((topology.client, ROUTER_CLIENT_SIDE), (topology.router, "198.51.100.2"),
                                   (topology.internet, "198.51.100.1")):
            namespace.run("ip", "route", "replace", "default", "via", gateway, "quickack", "1")
        for namespace, net, dev, src in ((topology.client, "10.200.1.0/24", "c0", CLIENT),
                                         (topology.router, "10.200.1.0/24", "r-clients", ROUTER_CLIENT_SIDE),
                                         (topology.router, "198.51.100.0/24", "r-uplink", "198.51.100.1"),
                                         (topology.internet, "198.51.100.0/24", "i0", "198.51.100.2")):
            namespace.run("ip", "route", "replace", net, "dev", dev, "proto", "kernel", "scope", "link", "src", src,
                          "quickack", "1")
        for namespace, gateway in ((topology.client, Topology.ROUTER_V6), (topology.router, "fd00:e0::2"),
                                   (topology.internet, "fd00:e0::1")):
            namespace.run("ip", "-6", "route", "replace", "default", "via", gateway, "quickack", "1")
        for namespace, net, dev in ((topology.client, "fd00:c1::/64", "c0"),
                                    (topology.router, "fd00:c1::/64", "r-clients"),
                                    (topology.router, "fd00:e0::/64", "r-uplink"),
                                    (topology.internet, "fd00:e0::/64", "i0")):
            namespace.run("ip", "-6", "route", "replace", net, "dev", dev, "proto", "kernel", "quickack", "1")
        policy = work / "policies.json"
        document = json.loads(json.dumps(DOCUMENT))
        document["policies"][0]["clients"].append(f"{CLIENT6}/128")
        policy.write_text(json.dumps(document))
        env = {"EGRESS_ALLOWLIST_FILE": str(policy), "EGRESS_DNS_SERVERS": DNS_IP,
               "EGRESS_CLIENT_CIDRS": "10.200.1.0/24,fd00:c1::/64", "EGRESS_ALLOW_DESTINATIONS": "fd00:203::/64",
               "EGRESS_LISTEN_ADDRESS": "0.0.0.0", "EGRESS_TRANSPARENT": "on"}
        proxy = NamespacedProxy(topology.router, work / "state", env, host=ROUTER_CLIENT_SIDE, port=3128)
        rules = subprocess.run([*egress_proxy_command(), "nft-rules"], env=proxy.env, capture_output=True,
                               text=True, check=True).stdout
        proxy.start()
        context = ssl.create_default_context(cafile=str(ca.ca_path))
        samples: dict[str, dict[str, list[float]]] = {"https": {}, "http": {}}
        for _ in range(args.rounds):
            for name, kind in (("https", _https), ("http", _http)):
                topology.router.run("nft", "delete", "table", "inet", "egress_proxy", check=False)
                for route in ("direct", "direct6"):
                    samples[name].setdefault(route, []).extend(_batch(topology, kind, route, args.count, context))
                topology.router.run("nft", "-f", "-", input=rules)
                for route in ("intercept", "explicit", "intercept6"):
                    samples[name].setdefault(route, []).extend(_batch(topology, kind, route, args.count, context))
        proxy.stop()
        # The destination check against changing DNS answers: a fresh proxy for each answer style, so that no
        # style inherits another's cached answers.
        document["policies"][0]["allow"].append(CDN_NAME)
        policy.write_text(json.dumps(document))
        dns_results = []
        # (the proxy's resolver's answers, the client's resolver's answers or None for the same resolver, TTL)
        cases = [("all", None, 1), ("one", None, 1), ("one", None, 30), ("random", None, 1), ("random", None, 30),
                 ("first", "second", 30), ("all", "first", 30)]
        for index, (style, client_style, ttl) in enumerate(cases):
            dns.style, dns.ttl = style, ttl
            client_dns.style, client_dns.ttl = client_style or style, ttl
            fresh = NamespacedProxy(topology.router, work / f"state-dns-{index}", env, host=ROUTER_CLIENT_SIDE,
                                    port=3128)
            fresh.start()
            try:
                row = _dns_refusals(topology, dns, CLIENT_RESOLVER if client_style else DNS_IP, context,
                                    args.dns_count)
                row["client_resolver"] = f"another one, answering {client_style}" if client_style else "the same"
                # Every connection's line, refused or not: the relay may hand the last ones over up to 200 ms late.
                fresh.wait_for(lambda _, p=fresh: len(_cdn_lines(p)) >= args.dns_count, timeout=10)
                reasons = [str(r.get("reason")) for r in _cdn_lines(fresh)]
                row["refused"] = reasons.count("host_header_forgery")  # the proxy's own word, from its log
                row["reasons"] = {reason: reasons.count(reason) for reason in sorted(set(reasons))}
            finally:
                fresh.stop()
            dns_results.append(row)
    finally:
        for server in servers:
            server.stop()
        topology.close()

    report: dict[str, object] = {"name": args.name, "count_per_round": args.count, "rounds": args.rounds,
                                 "unit": "ms per connection (connect, one request and response, close)",
                                 "results": {}}
    lines = [f"# Transparent mode: intercepted vs explicit vs direct ({args.name})", "",
             "| request | route | median ms | p90 ms | median vs direct |", "|---|---|---:|---:|---:|"]
    for name, routes in samples.items():
        for route, values in routes.items():
            direct = statistics.median(routes["direct6" if route.endswith("6") else "direct"])
            median = statistics.median(values)
            p90 = statistics.quantiles(values, n=10)[-1]
            report["results"][f"{name}/{route}"] = {  # type: ignore[index]
                "median_ms": round(median * 1000, 3), "p90_ms": round(p90 * 1000, 3),
                "ratio_to_direct": round(median / direct, 2), "samples": len(values)}
            lines.append(f"| {name} | {route} | {median * 1000:.2f} | {p90 * 1000:.2f} | {median / direct:.2f}x |")
    report["dns_destination_check"] = dns_results
    lines += ["", "Destination check with a name whose DNS answers change (a fresh proxy per row):",
              "", "| proxy's answers | client's resolver | TTL s | connections | refused (host_header_forgery) "
              "| client failures (any cause) |", "|---|---|---:|---:|---:|---|"]
    for row in dns_results:
        lines.append(f"| {row['answers']} | {row['client_resolver']} | {row['ttl_s']} | {row['connections']} "
                     f"| {row['refused']} "
                     f"({row['refused'] / row['connections']:.0%}) | {row['client_failures'] or 'none'} |")
    out = ROOT / "bench" / "results" / f"transparent-{args.name}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
