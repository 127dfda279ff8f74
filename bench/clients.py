"""Load generators: curl (bulk downloads), wrk (plain HTTP requests/s) and a small Python client for new-connection
latency and rate. Each is run the same way direct and through the proxy; only the first hop differs."""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass

from benchenv import ORIGIN_IP, ORIGIN_NAME, OWN_SESSION, PROXY_HOST, PROXY_PORT

CLEAN_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# --- curl: bulk HTTPS downloads ----------------------------------------------------------------------------
def proxy_url(port: int = PROXY_PORT) -> str:
    return f"http://{PROXY_HOST}:{port}"


def curl_command(path: str, cacert: str, via_proxy: bool, proxy_port: int = PROXY_PORT) -> list[str]:
    route = ["-x", proxy_url(proxy_port)] if via_proxy else ["--resolve", f"{ORIGIN_NAME}:443:{ORIGIN_IP}"]
    return ["curl", "-sS", "--fail", "--max-time", "120", "--cacert", cacert, *route, "-o", "/dev/null",
            "-w", "%{size_download} %{time_total}\n", f"https://{ORIGIN_NAME}{path}"]


def download(path: str, cacert: str, via_proxy: bool, streams: int = 1, proxy_port: int = PROXY_PORT,
             cpus: set[int] | None = None) -> dict[str, float]:
    """``streams`` concurrent curl processes fetching ``path`` (on ``cpus`` only, when given); aggregate bytes / wall
    time, and the CPU seconds the curl processes used."""
    command = curl_command(path, cacert, via_proxy, proxy_port)
    if cpus is not None:
        command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLEAN_ENV,
                              **OWN_SESSION) for _ in range(streams)]
    total = 0
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"curl failed ({proc.returncode}): {err.strip()}")
        total += int(float(out.split()[0]))
    wall = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    return {"bytes": total, "seconds": round(wall, 3), "mb_per_s": round(total / wall / 1e6, 1),
            "client_cpu_s": round(client_cpu, 4)}


# --- wrk: plain HTTP requests per second -------------------------------------------------------------------
WRK_PROXY_LUA = f"""
wrk.path = "http://{ORIGIN_NAME}/small"
wrk.headers["Host"] = "{ORIGIN_NAME}"
"""


def wrk(via_proxy: bool, keepalive: bool, seconds: float, connections: int = 16, threads: int = 1,
        proxy_port: int = PROXY_PORT) -> dict[str, float]:
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency"]
    if not keepalive:
        command += ["-H", "Connection: close"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if via_proxy:
            script.write(WRK_PROXY_LUA)
            script.flush()
            command += ["-s", script.name, proxy_url(proxy_port) + "/"]
        else:
            command += [f"http://{ORIGIN_IP}/small", "-H", f"Host: {ORIGIN_NAME}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, env=CLEAN_ENV)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stderr.strip()}")
    return parse_wrk(result.stdout)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"(\d+) requests in", text)
    out["requests"] = float(match.group(1)) if match else 0.0
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if match:
            out[f"p{pct}_ms"] = round(_ms(match.group(1), match.group(2)), 3)
    errors = re.search(r"Socket errors: (.*)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["errors"] = float(sum(int(n) for n in re.findall(r"\d+", errors.group(1)))) if errors else 0.0
    out["non_2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    return out


# --- a new connection per request: CONNECT + TLS + GET, or plain GET ---------------------------------------
@dataclass(frozen=True)
class Target:
    kind: str  # "https" or "http"
    via_proxy: bool
    cacert: str = ""
    proxy_port: int = PROXY_PORT  # another proxy on the same host (an older version, another config)
    source: str = ""  # bind the client to this loopback address (policies pick clients by source address)


def _read_response(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed mid-response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"unexpected response: {head[:200]!r}")
    return body


def _connect_reply(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("proxy closed the CONNECT")
        data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"CONNECT refused: {data[:200]!r}")


class Requester:
    """One request on a fresh TCP connection, timed from connect() to the last body byte."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.ctx: ssl.SSLContext | None = None
        if target.kind == "https":
            self.ctx = ssl.create_default_context(cafile=target.cacert)
            # No session cache on the server either: each connection is a full handshake.
        if target.via_proxy:
            self.address = (PROXY_HOST, target.proxy_port)
        else:
            self.address = (ORIGIN_IP, 443 if target.kind == "https" else 80)
        if target.kind == "http":
            path = f"http://{ORIGIN_NAME}/small" if target.via_proxy else "/small"
            self.request = f"GET {path} HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\nConnection: close\r\n\r\n".encode()
        else:
            self.request = f"GET /small HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\nConnection: close\r\n\r\n".encode()
        self.connect_line = f"CONNECT {ORIGIN_NAME}:443 HTTP/1.1\r\nHost: {ORIGIN_NAME}:443\r\n\r\n".encode()
        self.source_address = (target.source, 0) if target.source else None

    def once(self) -> float:
        started = time.perf_counter()
        sock = socket.create_connection(self.address, timeout=10, source_address=self.source_address)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.target.kind == "https":
                if self.target.via_proxy:
                    sock.sendall(self.connect_line)
                    _connect_reply(sock)
                assert self.ctx
                tls = self.ctx.wrap_socket(sock, server_hostname=ORIGIN_NAME)
                tls.sendall(self.request)
                _read_response(tls)
                elapsed = time.perf_counter() - started
                tls.close()
                return elapsed
            sock.sendall(self.request)
            _read_response(sock)
            return time.perf_counter() - started
        finally:
            sock.close()


def latencies(target: Target, count: int) -> list[float]:
    """``count`` sequential requests, each on a new connection; milliseconds."""
    requester = Requester(target)
    return [requester.once() * 1000 for _ in range(count)]


def _rate_worker(target: Target, seconds: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    requester = Requester(target)
    deadline = time.monotonic() + seconds
    done = errors = 0
    while time.monotonic() < deadline:
        try:
            requester.once()
            done += 1
        except (OSError, ConnectionError):
            errors += 1
    queue.put((done, errors))


def connection_rate(target: Target, seconds: float, workers: int) -> dict[str, float]:
    """``workers`` processes opening connections back to back for ``seconds``: completed connections per second."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rate_worker, args=(target, seconds, queue)) for _ in range(workers)]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    wall = time.monotonic() - started
    done = sum(r[0] for r in results)
    return {"connections": done, "errors": sum(r[1] for r in results), "seconds": round(wall, 2),
            "per_s": round(done / wall, 1)}


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Probe:
    """A background client making one plain HTTP request through the proxy every ``interval`` seconds, each on a
    new connection: how long does a reload keep new requests waiting, and does it refuse any?"""

    def __init__(self, interval: float = 0.02, target: Target | None = None) -> None:
        import threading

        self.interval = interval
        self.target = target or Target("http", True)
        self.samples: list[float] = []
        self.failures: list[str] = []
        self.failed_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        requester = Requester(self.target)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                requester.once()
                self.samples.append((time.perf_counter() - started) * 1000)
            except (OSError, ConnectionError) as exc:
                self.failures.append(type(exc).__name__)
                self.failed_at.append(time.monotonic())
            self._stop.wait(self.interval)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def summary(self) -> dict[str, float | int | list[str]]:
        return {"requests": len(self.samples), "failed": len(self.failures),
                "failure_kinds": sorted(set(self.failures)),
                "max_ms": round(max(self.samples, default=0.0), 1),
                # first to last refusal: about how long the listening port was closed
                "failure_window_ms": round((self.failed_at[-1] - self.failed_at[0]) * 1000 + self.interval * 1000, 1)
                if self.failed_at else 0.0,
                "p50_ms": round(percentile(self.samples, 50), 3) if self.samples else 0.0}
