#!/usr/bin/env python3
"""Allowlist reloads under load: failed requests and propagation delay. A script, not a test.

Runs the real supervisor and Squid with a FILE source, local HTTP/TLS origins and DNS (tests/integration/
harness.py), then, for a bounded time, drives through the proxy:
  * ``--short`` workers (default 100), each in a loop: one short request on a NEW connection, alternating
    plain HTTP and HTTPS (CONNECT + TLS handshake + GET through the spliced tunnel), then close;
  * ``--keepalive`` workers using ``requests.Session`` (HTTP keep-alive, as a typical client would);
  * ``--tunnels`` long TLS tunnels opened up front, each sending a GET every 0.5 s for the whole run;
  * a marker probe: after every allowlist write it asks for http://marker.bench.test/ (new connection
    each time) until the answer matches the new list: 200 once added, 403 once removed. The time from the
    file write to the first matching answer is the propagation delay;
  * a connect prober: a bare TCP connect every 5 ms, to see if and how long the listening port is closed.
Every ``--every`` seconds for ``--duration`` seconds the marker domain is added or removed (atomic replace).

Loopback only. Run it as root inside a fresh network namespace (the DNS server binds 127.0.0.1:53 and the
origins 127.0.0.2:80/443):

    unshare --net -- sh -c 'ip link set lo up && exec "${EGRESS_VENV:-.venv}/bin/python" bench/reload_under_load.py'

(from the checkout's root; .venv is the virtualenv scripts/test builds).

Writes bench/results/reload-<date>.json and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import requests  # noqa: E402
from harness import (  # noqa: E402
    DnsServer,
    HttpOrigin,
    TestCA,
    TlsOrigin,
    _read_head,
    connect_tunnel,
    http_get_over,
    read_body,
    tls_over_tunnel,
)
from proxy_runner import ProxyRunner  # noqa: E402

ORIGIN_IP = "127.0.0.2"
BASE = "# bench\nsteady.bench.test\ntunnel.bench.test\n"
MARKER = "marker.bench.test"
FAILURE_PAUSE = 0.05  # seconds a worker waits after a failed request before its next one


class Tally:
    """Thread-safe counters: ok per kind, failures per (kind, error), failure timestamps."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.failure_times: list[tuple[float, str]] = []

    def success(self, kind: str) -> None:
        with self.lock:
            self.ok[kind] += 1

    def failure(self, kind: str, error: str) -> None:
        with self.lock:
            self.failed[f"{kind}:{error}"] += 1
            self.failure_times.append((time.monotonic(), f"{kind}:{error}"))


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError):
        return "connection_reset"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, requests.exceptions.ProxyError):
        return "proxy_error(" + classify_cause(exc) + ")"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection_error(" + classify_cause(exc) + ")"
    if isinstance(exc, ConnectionError):
        return "closed_early"
    return type(exc).__name__


def classify_cause(exc: BaseException) -> str:
    text = str(exc)
    for marker, name in (("Connection refused", "refused"), ("reset", "reset"), ("aborted", "aborted"),
                         ("RemoteDisconnected", "remote_disconnected"), ("timed out", "timeout")):
        if marker in text:
            return name
    return "other"


def http_once(proxy: tuple[str, int], host: str, path: str = "/") -> int:
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall(f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = _read_head(sock)
        read_body(sock, head)
        return int(head.split()[1])


def https_once(proxy: tuple[str, int], host: str, ca: TestCA) -> int:
    sock, status, _ = connect_tunnel(proxy, host, 443, timeout=10)
    if status != 200:
        sock.close()
        return status
    with tls_over_tunnel(sock, host, ca.ca_path, timeout=10) as tls:
        return http_get_over(tls, host, "/short")[0]


def short_worker(index: int, proxy: tuple[str, int], ca: TestCA, stop: threading.Event, tally: Tally) -> None:
    use_tls = index % 2 == 1
    while not stop.is_set():
        kind = "https_short" if use_tls else "http_short"
        try:
            status = https_once(proxy, "steady.bench.test", ca) if use_tls else http_once(proxy, "steady.bench.test")
        except Exception as exc:  # noqa: BLE001 - every failure is counted, whatever it is
            tally.failure(kind, classify(exc))
            stop.wait(FAILURE_PAUSE)  # a client does not hammer a refusing proxy; keeps the count meaningful
        else:
            if status == 200:
                tally.success(kind)
            else:
                tally.failure(kind, f"status_{status}")
        use_tls = not use_tls


def keepalive_worker(proxy_url: str, stop: threading.Event, tally: Tally) -> None:
    with requests.Session() as session:
        session.trust_env = False
        while not stop.is_set():
            try:
                response = session.get("http://steady.bench.test/keepalive", proxies={"http": proxy_url},
                                       timeout=10)
            except Exception as exc:  # noqa: BLE001
                tally.failure("http_keepalive", classify(exc))
                stop.wait(FAILURE_PAUSE)
                continue
            if response.status_code == 200:
                tally.success("http_keepalive")
            else:
                tally.failure("http_keepalive", f"status_{response.status_code}")


def tunnel_worker(index: int, proxy: tuple[str, int], ca: TestCA, stop: threading.Event, tally: Tally,
                  result: dict[str, Any]) -> None:
    try:
        sock, status, _ = connect_tunnel(proxy, "tunnel.bench.test", 443, timeout=10)
        if status != 200:
            raise ConnectionError(f"CONNECT answered {status}")
        tls = tls_over_tunnel(sock, "tunnel.bench.test", ca.ca_path, timeout=10)
    except Exception as exc:  # noqa: BLE001
        tally.failure("long_tunnel_open", classify(exc))
        result["broken"] = True
        return
    exchanges = 0
    with tls:
        while not stop.wait(0.5):
            try:
                status, _ = http_get_over(tls, "tunnel.bench.test", f"/tunnel-{index}-{exchanges}")
            except Exception as exc:  # noqa: BLE001
                tally.failure("long_tunnel", classify(exc))
                result["broken"] = True
                return
            if status != 200:
                tally.failure("long_tunnel", f"status_{status}")
            else:
                tally.success("long_tunnel")
            exchanges += 1
    result["exchanges"] = exchanges


def connect_prober(proxy: tuple[str, int], stop: threading.Event, refused: list[float]) -> None:
    """A bare TCP connect every 5 ms (closed at once, sends nothing: Squid does not log it)."""
    while not stop.wait(0.005):
        try:
            with socket.create_connection(proxy, timeout=2):
                pass
        except OSError:
            refused.append(time.monotonic())


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lower, upper = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (k - lower)


def windows(times: list[float], gap: float = 0.05) -> list[tuple[float, float, int]]:
    """Group timestamps into (start, end, count) runs separated by more than ``gap`` seconds."""
    runs: list[tuple[float, float, int]] = []
    for t in sorted(times):
        if runs and t - runs[-1][1] <= gap:
            start, _, count = runs[-1]
            runs[-1] = (start, t, count + 1)
        else:
            runs.append((t, t, 1))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of allowlist changes (max 300)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between allowlist changes")
    parser.add_argument("--short", type=int, default=100, help="concurrent short-request workers")
    parser.add_argument("--keepalive", type=int, default=10, help="keep-alive (requests.Session) workers")
    parser.add_argument("--tunnels", type=int, default=8, help="long TLS tunnels held open for the run")
    parser.add_argument("--port", type=int, default=3140)
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = parser.parse_args()
    args.duration = min(args.duration, 300.0)
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        print("refusing to run outside a loopback-only network namespace; see the docstring", file=sys.stderr)
        return 2
    # Many short connections: use the whole ephemeral range of this (private) namespace.
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("1024 65000\n")

    work = Path(tempfile.mkdtemp(prefix="egress-reload-bench-"))
    work.chmod(0o755)
    allowlist = work / "allowlist.txt"
    write_atomic(allowlist, BASE)
    ca = TestCA(work / "ca")
    dns = DnsServer({}, host="127.0.0.1", port=53)
    dns.set_wildcard("bench.test", [ORIGIN_IP])
    dns.start()
    http_origin = HttpOrigin(ORIGIN_IP, 80, name="http-origin")
    tls_origin = TlsOrigin(ORIGIN_IP, 443, ca, ["*.bench.test"], name="tls-origin")
    http_origin.start()
    tls_origin.start()
    proxy = ProxyRunner(work / "state", {
        "EGRESS_ALLOWLIST_FILE": str(allowlist),
        "EGRESS_DNS_SERVERS": "127.0.0.1",
        "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
        "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
    }, port=args.port)
    address = ("127.0.0.1", args.port)
    stop = threading.Event()
    tally = Tally()
    refused_connects: list[float] = []
    tunnel_results: list[dict[str, Any]] = [{} for _ in range(args.tunnels)]
    changes: list[dict[str, Any]] = []
    try:
        proxy.start()
        threads = [threading.Thread(target=tunnel_worker, args=(i, address, ca, stop, tally, tunnel_results[i]),
                                    daemon=True) for i in range(args.tunnels)]
        threads += [threading.Thread(target=short_worker, args=(i, address, ca, stop, tally), daemon=True)
                    for i in range(args.short)]
        threads += [threading.Thread(target=keepalive_worker, args=(proxy.proxy_url, stop, tally), daemon=True)
                    for _ in range(args.keepalive)]
        threads.append(threading.Thread(target=connect_prober, args=(address, stop, refused_connects), daemon=True))
        for thread in threads:
            thread.start()
        time.sleep(3)  # warm up: every worker running, tunnels open
        ok_before = sum(tally.ok.values())
        run_started = time.monotonic()
        present = False
        while time.monotonic() - run_started < args.duration:
            present = not present
            text = BASE + (f"{MARKER}\n" if present else "")
            expect = 200 if present else 403
            written = time.monotonic()
            write_atomic(allowlist, text)
            deadline = written + args.every
            change: dict[str, Any] = {"at": round(written - run_started, 3), "marker": "added" if present
                                      else "removed", "delay_s": None, "probe_errors": 0}
            while time.monotonic() < deadline:
                try:
                    status = http_once(address, MARKER, "/probe")
                except Exception:  # noqa: BLE001 - counted: a probe is a client too
                    change["probe_errors"] += 1
                    tally.failure("probe", "error")
                    status = 0
                if status == expect and change["delay_s"] is None:
                    change["delay_s"] = round(time.monotonic() - written, 3)
                if change["delay_s"] is not None:
                    break
                time.sleep(0.01)
            changes.append(change)
            time.sleep(max(0.0, deadline - time.monotonic()))
        run_seconds = time.monotonic() - run_started
        ok_total = sum(tally.ok.values()) - ok_before
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        time.sleep(0.5)
    finally:
        stop.set()
        code = proxy.stop()
        tls_origin.stop()
        http_origin.stop()
        dns.stop()

    reloads = [r for r in proxy.records if r.get("event") == "reloaded"]
    rejected = [r for r in proxy.records if r.get("event") == "reload_rejected"]
    delays = [c["delay_s"] for c in changes if c["delay_s"] is not None]
    reload_ms = [float(r["duration_ms"]) for r in reloads]
    tunnel_ports: dict[str, set[int]] = collections.defaultdict(set)
    for request in tls_origin.requests:
        path = str(request["path"])
        if path.startswith("/tunnel-"):
            tunnel_ports[path.split("-")[1]].add(int(request["client"][1]))
    refused_runs = windows(refused_connects)
    failure_runs = windows([t for t, _ in tally.failure_times], gap=0.3)
    failures_total = sum(tally.failed.values())
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "squid": "5.7 (Debian squid-openssl)",
        "settings": {"duration_s": args.duration, "every_s": args.every, "short_workers": args.short,
                     "keepalive_workers": args.keepalive, "long_tunnels": args.tunnels, "source": "file (1 s poll)"},
        "run_seconds": round(run_seconds, 1),
        "allowlist_changes": len(changes),
        "reloads": len(reloads),
        "reloads_unconfirmed": sum(1 for r in reloads if not r.get("confirmed")),
        "reloads_rejected": len(rejected),
        "squid_starts": proxy.squid_starts(),
        "requests_ok": dict(tally.ok),
        "requests_ok_total_during_changes": ok_total,
        "requests_failed": dict(tally.failed),
        "requests_failed_total": failures_total,
        "failure_pause_s": FAILURE_PAUSE,
        "failure_windows": {"count": len(failure_runs),
                            "longest_ms": round(max((e - s for s, e, _ in failure_runs), default=0.0) * 1000, 1)},
        "long_tunnels": {"opened": args.tunnels, "broken": sum(1 for t in tunnel_results if t.get("broken")),
                         "exchanges": sum(int(t.get("exchanges", 0)) for t in tunnel_results),
                         "same_origin_connection": all(len(p) == 1 for p in tunnel_ports.values())},
        "propagation_delay_s": {"count": len(delays), "not_within_interval": len(changes) - len(delays),
                                "p50": percentile(delays, 0.5), "p90": percentile(delays, 0.9),
                                "max": max(delays) if delays else None,
                                "mean": round(statistics.mean(delays), 3) if delays else None},
        "reload_duration_ms": {"p50": percentile(reload_ms, 0.5), "p90": percentile(reload_ms, 0.9),
                               "max": max(reload_ms) if reload_ms else None},
        "listening_port_closed": {
            "refused_probe_connects": len(refused_connects),
            "windows": len(refused_runs),
            "longest_window_ms": round(max((end - start for start, end, _ in refused_runs), default=0.0) * 1000, 1),
        },
        "changes": changes,
        "proxy_exit_code": code,
    }
    out = args.out or ROOT / "bench" / "results" / f"reload-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)

    delay = result["propagation_delay_s"]
    print(f"{len(changes)} allowlist changes in {run_seconds:.0f} s -> {len(reloads)} reloads "
          f"({result['reloads_unconfirmed']} unconfirmed), Squid started {result['squid_starts']} time(s)")
    print(f"requests ok during the changes: {ok_total}  ({', '.join(f'{k} {v}' for k, v in sorted(tally.ok.items()))})")
    print(f"requests failed: {failures_total}  {dict(sorted(tally.failed.items()))}")
    print(f"long tunnels: {result['long_tunnels']}")
    print(f"propagation delay (write -> first matching answer): p50 {delay['p50']} s, p90 {delay['p90']} s, "
          f"max {delay['max']} s; {delay['not_within_interval']} not within {args.every:g} s")
    print(f"reload duration (pick-up -> confirmed): {result['reload_duration_ms']}")
    print(f"listening port closed during reconfigure: {result['listening_port_closed']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
