"""The bench's world on loopback: the harness DNS server and test CA, an nginx origin, and the real supervisor.

Everything binds 127.0.0.0/8 and bench/run puts us in a private network namespace first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import DnsServer, TestCA, wait_for_port  # noqa: E402

ORIGIN_IP = "127.0.0.2"
ORIGIN_NAME = "origin.bench.test"
PROXY_HOST = "127.0.0.1"
PROXY_PORT = 3128
SEED_PORT = 3140  # the seed-style Squid
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
# Each party of a download (curl, nginx, each proxy's Squid) runs in its own session. Linux's scheduler autogroups
# share CPU between sessions first and between their processes second, and egress-proxy's supervisor starts Squid
# in a session of its own (as a service manager would): with nginx, curl and the seed-style Squid left in the bench's
# session, the two proxies were scheduled differently (the seed-style Squid's worker slept 220-500 times per GB,
# egress-proxy's 1,400-3,600, with the same CPU and system calls), which is no difference between the proxies.
OWN_SESSION = {"start_new_session": True}

NGINX_CONF = """\
user root;
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    default_type application/octet-stream;
    server {{
        listen {ip}:80 backlog=4096;
        listen {ip}:443 ssl backlog=4096;
        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        # Every new connection is a full handshake, direct or through the proxy.
        ssl_session_cache off;
        ssl_session_tickets off;
        root {dir}/www;
        location = /small {{ return 200 "ok\\n"; }}
    }}
}}
"""


def stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Send ``sig`` to a process we started, and kill it if it has not exited within ``timeout`` seconds."""
    if process and process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def proc_stat(pid: int) -> tuple[float, int]:
    """(user+system CPU seconds, VmRSS bytes) of one process, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)
    rss = 0
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return cpu, rss


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        out += [child, *descendants(child)]
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages split between the processes sharing them, so the PSS of
    Squid's coordinator and workers adds up without counting the same library twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def group_stat(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, VmRSS bytes) summed over processes; ones that have exited count as zero."""
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            c, r = proc_stat(pid)
        except OSError:
            continue
        cpu, rss = cpu + c, rss + r
    return cpu, rss


def _threads(pids: list[int]) -> Iterator[tuple[int, str]]:
    """(pid, thread id) of every thread of these processes now; processes that have exited are skipped."""
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            yield pid, tid


def cpu_ns(pids: list[int]) -> int:
    """CPU time in nanoseconds used so far by every thread of these processes, from the scheduler's own
    accounting (/proc/<pid>/task/<tid>/schedstat): exact, where /proc/<pid>/stat counts 10 ms ticks. Processes and
    threads that have exited count as zero."""
    total = 0
    for pid, tid in _threads(pids):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def thread_cpu(pid: int) -> dict[str, tuple[int, int]]:
    """(CPU nanoseconds, times scheduled in) so far of each thread of one process, from its schedstat, summed by the
    thread's name in the kernel (its comm; the supervisor names its threads: egress_proxy/threads.py). Times
    scheduled in counts the thread's wake-ups (and preemptions). The main thread is "main". Threads that have exited
    count as zero."""
    out: dict[str, tuple[int, int]] = {}
    for _, tid in _threads([pid]):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                fields = handle.read().split()
            with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                name = "main" if int(tid) == pid else handle.read().strip()
            used, runs = int(fields[0]), int(fields[2])
        except (OSError, ValueError, IndexError):
            continue
        before = out.get(name, (0, 0))
        out[name] = (before[0] + used, before[1] + runs)
    return out


def syscalls(pids: list[int]) -> tuple[int, int, int]:
    """(read-type syscalls, write-type syscalls, bytes read) made so far by these processes, from /proc/<pid>/io:
    counted by the kernel, so reading them costs the traced process nothing (strace would slow it down)."""
    reads = writes = read_bytes = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as handle:
                fields = dict(line.split(":", 1) for line in handle)
        except OSError:
            continue
        reads, writes = reads + int(fields["syscr"]), writes + int(fields["syscw"])
        read_bytes += int(fields["rchar"])
    return reads, writes, read_bytes


def pin(pids: list[int], cpus: set[int]) -> None:
    """Restrict every thread of these processes to ``cpus``; processes that have exited are skipped."""
    for _, tid in _threads(pids):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


class CpuWindow:
    """CPU used by groups of processes between start() and stop(), as a share of one core; plus the whole
    machine's busy share (100% = every core busy), which tells whether a run was CPU-bound."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._machine0 = (0.0, 0.0)

    def start(self) -> CpuWindow:
        self._t0 = time.monotonic()
        self._cpu0 = {name: group_stat(pids)[0] for name, pids in self.groups.items()}
        self._machine0 = machine_busy()
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        busy, total = machine_busy()
        out: dict[str, Any] = {"machine_busy_percent": round(100 * (busy - self._machine0[0]) /
                                                             max(1.0, total - self._machine0[1]), 1)}
        for name, pids in self.groups.items():
            cpu, rss = group_stat(pids)
            out[name] = {"cpu_percent": round(100 * (cpu - self._cpu0[name]) / wall, 1),
                         "rss_mb": round(rss / MiB, 1)}
        return out


class Origin:
    """nginx on 127.0.0.2:80 and :443 (a cert from the test CA): /small (3 bytes), /64m, /1g (sparse files)."""

    def __init__(self, workdir: Path, ca: TestCA, workers: int = 1) -> None:
        self.dir = workdir / "nginx"
        self.ca = ca
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Origin:
        (self.dir / "www").mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        for name, size in (("1g", 1024 * MiB), ("64m", 64 * MiB)):
            with open(self.dir / "www" / name, "wb") as handle:
                handle.truncate(size)
        cert, key = self.ca.issue([ORIGIN_NAME])
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, ip=ORIGIN_IP, name=ORIGIN_NAME, cert=cert, key=key,
                                          workers=self.workers))
        self.process = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(self.dir / "error.log")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **OWN_SESSION)
        wait_for_port(ORIGIN_IP, 443)
        wait_for_port(ORIGIN_IP, 80)
        # Warm the page cache so the first measured download does not pay for it.
        for name in ("1g", "64m"):
            with open(self.dir / "www" / name, "rb") as handle:
                while handle.read(8 * MiB):
                    pass
        return self

    def pids(self) -> list[int]:
        """nginx's master and workers."""
        assert self.process
        return [self.process.pid, *descendants(self.process.pid)]

    def stop(self) -> None:
        stop_process(self.process, signal.SIGQUIT, 10)


class Proxy:
    """``egress-proxy run`` as a subprocess. Its stdout is read by a thread that only counts access lines (so
    logging costs what it would cost in production, and our memory does not grow) and keeps supervisor events."""

    def __init__(self, workdir: Path, allowlist_file: Path, extra_env: dict[str, str] | None = None, *,
                 port: int = PROXY_PORT, name: str = "state") -> None:
        self.state_dir = workdir / name
        self.port = port
        venv_bin = Path(os.environ.get("EGRESS_VENV", sys.prefix)) / "bin"
        self.command = [str(venv_bin / "egress-proxy"), "run"]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EGRESS_") and "proxy" not in k.lower()},
            "EGRESS_STATE_DIR": str(self.state_dir),
            "EGRESS_LISTEN_ADDRESS": PROXY_HOST,
            "EGRESS_PORT": str(port),
            "EGRESS_METRICS": "off",
            "EGRESS_DRAIN_SECONDS": "1",
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.0/8",
            "EGRESS_ALLOWLIST_FILE": str(allowlist_file),
            **(extra_env or {}),
        }
        self.events: list[dict[str, Any]] = []
        self.access_lines = 0
        self.tail: list[str] = []
        self._cond = threading.Condition()
        self.process: subprocess.Popen[bytes] | None = None
        self.squid_pid = 0

    @property
    def pid(self) -> int:
        assert self.process
        return self.process.pid

    def squid_pids(self) -> list[int]:
        """Squid's own processes: the one the supervisor started and, in SMP mode, its coordinator's workers
        (helpers such as the SNI checker are not counted)."""
        return [self.squid_pid, *(p for p in descendants(self.squid_pid) if comm(p) == "squid")]

    def helper_pids(self) -> list[int]:
        """Squid's helpers (the SNI checker, the certificate generator) as they are now."""
        return [p for p in descendants(self.squid_pid) if comm(p) != "squid"]

    def groups(self) -> dict[str, list[int]]:
        return {"squid": self.squid_pids(), "supervisor": [self.pid], "helpers": self.helper_pids()}

    def squid_memory(self) -> dict[str, float]:
        pids = self.squid_pids()
        return {"processes": len(pids), "pss_mb": round(sum(pss(p) for p in pids) / MiB, 1),
                "rss_sum_mb": round(group_stat(pids)[1] / MiB, 1)}

    def start(self, timeout: float = 120) -> Proxy:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()
        started = self.wait_event(lambda e: e.get("event") in {"started", "startup_failed"}, timeout=timeout)
        if started.get("event") != "started":
            raise RuntimeError("proxy failed to start:\n" + "\n".join(self.tail))
        self.squid_pid = int(started["pid"])
        wait_for_port(PROXY_HOST, self.port)
        return self

    def _read(self) -> None:
        assert self.process and self.process.stdout
        for raw in self.process.stdout:
            if raw.startswith(b'{"type":"access"'):
                self.access_lines += 1
                continue
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                record = json.loads(line)
            except ValueError:
                record = {"type": "raw", "message": line}
            with self._cond:
                self.tail = [*self.tail[-40:], line]
                if record.get("type") == "supervisor":
                    self.events.append(record)
                    self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0
                   ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[start:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no matching supervisor event; last lines:\n" + "\n".join(self.tail))
                self._cond.wait(remaining)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # A supervisor that died on its own leaves Squid behind (it runs in its own session): end it too.
        if self.squid_pid and comm(self.squid_pid) == "squid":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.squid_pid, signal.SIGKILL)


SEED_CONF = """\
# A seed-style Squid: the seed's squid.conf for an explicit proxy. One process, a dstdomain allowlist for plain
# HTTP and the CONNECT, a peek at step 1 and a splice when ssl::server_name (Squid's own SNI, from the same list)
# matches. No helper, no policies, no SSRF guard, no strict ClientHello check.
http_port {host}:{port} ssl-bump cert={cert} key={key} generate-host-certificates=on dynamic_cert_mem_cache_size=1MB
sslcrtd_program {certgen} -s {dir}/ssl_db -M 1MB
sslcrtd_children 1 startup=0 idle=1
cache_effective_user proxy
pid_filename {dir}/squid.pid
coredump_dir {dir}
visible_hostname seed-squid
pinger_enable off
shutdown_lifetime 1 seconds
dns_nameservers 127.0.0.1
cache deny all
logformat seed %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %ssl::>sni %Sh/%<a %mt
access_log stdio:{dir}/access.log logformat=seed
cache_log {dir}/cache.log
acl allowed_http_sites dstdomain "{allowlist}"
acl allowed_https_sites ssl::server_name "{allowlist}"
acl step1 at_step SslBump1
http_access allow allowed_http_sites
http_access deny all
ssl_bump peek step1 all
ssl_bump splice allowed_https_sites
ssl_bump terminate all
"""


class SeedSquid:
    """The seed-style Squid beside egress-proxy: the same Squid 5.7 package, SEED_CONF, started directly (no
    supervisor) on SEED_PORT. It logs to a file, as the seed did (an agent shipped the file to CloudWatch)."""

    def __init__(self, workdir: Path, allowlist_file: Path, ca: TestCA, port: int = SEED_PORT) -> None:
        self.dir = workdir / "seed-squid"
        self.allowlist = allowlist_file
        self.ca = ca
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process
        return self.process.pid

    @property
    def squid_pid(self) -> int:
        return self.pid

    def squid_pids(self) -> list[int]:
        return [self.pid, *(p for p in descendants(self.pid) if comm(p) == "squid")]

    def groups(self) -> dict[str, list[int]]:
        return {"squid": self.squid_pids(), "helpers": [p for p in descendants(self.pid) if comm(p) != "squid"]}

    def start(self) -> SeedSquid:
        from egress_proxy.squid_strings import CERTGEN

        self.dir.mkdir(parents=True, exist_ok=True)
        cert, key = self.ca.issue(["seed-squid.bench.test"])
        conf = self.dir / "squid.conf"
        conf.write_text(SEED_CONF.format(host=PROXY_HOST, port=self.port, cert=cert, key=key, certgen=CERTGEN,
                                         dir=self.dir, allowlist=self.allowlist))
        subprocess.run([CERTGEN, "-c", "-s", str(self.dir / "ssl_db"), "-M", "1MB"], check=True,
                       capture_output=True)
        for path in (self.dir, self.dir / "ssl_db", *(self.dir / "ssl_db").rglob("*")):
            shutil.chown(path, "proxy", "proxy")
        for name in ("access.log", "cache.log"):
            (self.dir / name).touch()
            shutil.chown(self.dir / name, "proxy", "proxy")
        # -N: no daemon, no SMP (the seed ran one process); its own -n service name keeps its IPC apart.
        self.process = subprocess.Popen(["squid", "-N", "-n", "seedbench", "-f", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **OWN_SESSION)
        try:
            wait_for_port(PROXY_HOST, self.port)
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError("the seed-style Squid did not start:\n"
                               + (self.dir / "cache.log").read_text()[-3000:]) from exc
        return self

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, 30)


class World:
    """DNS + CA + origin in a 0755 temp dir (Squid's worker runs as 'proxy' and must traverse it)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.chmod(0o755)
        self.ca = TestCA(workdir / "ca")
        # A realistic TTL: clients and Squid cache the answer, as they would in production.
        self.dns = DnsServer({ORIGIN_NAME: [ORIGIN_IP]}, host="127.0.0.1", port=53, ttl=300)
        self.origin = Origin(workdir, self.ca)

    def start(self) -> World:
        self.dns.start()
        self.origin.start()
        return self

    def stop(self) -> None:
        self.origin.stop()
        self.dns.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def isolated() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]
