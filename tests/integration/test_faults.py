"""Faults that must never become an outage, injected into the real proxy (real Squid, real supervisor, real
clients): stdout stalled under load, a SIGTERM while it is stalled, Squid workers killed (once, and until Squid
gives up on one), and the state dir's disk filling up while the proxy runs."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ORIGIN_IP
from harness import DnsServer, HttpOrigin, RequestLoad, free_port, write_allowlist
from prometheus_client.parser import text_string_to_metric_families
from proxy_runner import ProxyRunner, egress_proxy_command

BASE_ENV = {"EGRESS_DNS_SERVERS": "127.0.0.1", "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32"}


def _state(public_tmp: Path, name: str) -> Path:
    path = public_tmp / name
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _runner(public_tmp: Path, name: str, port: int, **env: str) -> ProxyRunner:
    allowlist = public_tmp / f"{name}-allowlist.txt"
    allowlist.write_text("allowed.test\n")
    return ProxyRunner(_state(public_tmp, f"{name}-state"),
                       {**BASE_ENV, "EGRESS_ALLOWLIST_FILE": str(allowlist),
                        "EGRESS_PROMETHEUS_PORT": str(free_port()), **env}, port=port)


def _metrics(proxy: ProxyRunner) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://{proxy.host}:{proxy.env['EGRESS_PROMETHEUS_PORT']}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _metric(proxy: ProxyRunner, name: str, **labels: str) -> float:
    return _metrics(proxy).get((name, tuple(sorted(labels.items()))), 0.0)


def _health(proxy: ProxyRunner) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*egress_proxy_command(), "health"], env=proxy.env, capture_output=True, text=True,
                          timeout=30)


def _wait(condition: object, what: str, timeout: float) -> None:
    """Poll an observable condition (a metric, /proc) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.1)


def _load(proxy: ProxyRunner, threads: int = 4) -> RequestLoad:
    """GETs of an allowlisted host through ``proxy``."""
    return RequestLoad("http://allowed.test/", proxy.proxies, threads=threads)


def _allowed_lines(proxy: ProxyRunner) -> int:
    return sum(1 for record in list(proxy.records)
               if record.get("type") == "access" and record.get("host") == "allowed.test")


def _dropped_access(proxy: ProxyRunner) -> int:
    return sum(record.get("dropped_by_type", {}).get("access", 0) for record in proxy.events("log_lines_dropped"))


# --- 1. a stalled log sink -----------------------------------------------------------------------------------


def test_a_stalled_stdout_costs_log_lines_never_proxying(public_tmp: Path, dns: DnsServer,
                                                         http_origin: HttpOrigin) -> None:
    # A small buffer, so that 30 s of stall overflow it and the drop accounting is exercised.
    proxy = _runner(public_tmp, "stall", 3191, EGRESS_LOG_BUFFER_LINES="500").start()
    try:
        with _load(proxy) as load:
            unstalled = load.served_during(10)
            proxy.reading.clear()  # the log driver stops taking lines
            first = load.served_during(20)
            _wait(lambda: _metric(proxy, "egress_proxy_log_lines_dropped_total", type="access") > 0,
                  "the drop counter moves while stdout is stalled", 30)
            health = _health(proxy)
            last = load.served_during(10)
            proxy.reading.set()  # the sink recovers
        total = load.ok + len(load.failed)
        assert not load.failed, f"{len(load.failed)} requests failed during the stall: {load.failed[:5]}"
        # Before this fix, nothing at all was served from about 10 s into a stall (548, 222, 2, 0, 0, 4 per 5 s).
        assert last * 10 >= unstalled * 2, (unstalled, first, last)
        assert health.returncode == 0 and health.stdout.startswith("degraded") and "stdout" in health.stdout, (
            health.stdout)
        # Every request is either a line that arrived (in order, after the stall) or a counted drop.
        proxy.wait_for(lambda _: _allowed_lines(proxy) + _dropped_access(proxy) == total, timeout=40)
        dropped = _dropped_access(proxy)
        assert dropped > 0 and _metric(proxy, "egress_proxy_log_lines_dropped_total", type="access") == dropped
        # In order: the requests of one keep-alive connection are served one after another by one worker, so
        # their lines must arrive in that order (the two workers' lines interleave by a millisecond or so).
        by_connection: dict[int, list[float]] = {}
        for record in proxy.records:
            if record.get("type") == "access":
                by_connection.setdefault(record["client_port"], []).append(record["time"])
        assert all(times == sorted(times) for times in by_connection.values())
        assert proxy.stop() == 0
    finally:
        proxy.reading.set()
        proxy.stop()


def test_sigterm_while_stdout_is_stalled_exits_within_the_drain_time(public_tmp: Path, dns: DnsServer,
                                                                     http_origin: HttpOrigin) -> None:
    proxy = _runner(public_tmp, "stall-term", 3192, EGRESS_LOG_BUFFER_LINES="200").start()
    try:
        with _load(proxy, threads=2):
            proxy.reading.clear()
            _wait(lambda: _metric(proxy, "egress_proxy_log_lines_dropped_total", type="access") > 0,
                  "stdout stalled and the buffer full", 60)
            assert proxy.process is not None
            proxy.process.send_signal(signal.SIGTERM)
            # The bound comes from the settings: the drain (EGRESS_DRAIN_SECONDS=1), the supervisor's SIGKILL
            # margin after it (10 s), the last lines' flush (5 s); plus slack for a busy machine.
            code = proxy.process.wait(timeout=1 + 10 + 5 + 30)
        assert code == 0
    finally:
        proxy.reading.set()
        proxy.stop()


def test_no_log_no_traffic_refuses_while_stdout_is_stalled_and_loses_no_allowed_line(
        public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin) -> None:
    proxy = _runner(public_tmp, "stall-refuse", 3195, EGRESS_LOG_FULL="refuse", EGRESS_LOG_BUFFER_LINES="3000").start()
    try:
        with _load(proxy) as load:
            _wait(lambda: load.count() > 50, "traffic flowing", 30)
            proxy.reading.clear()
            # Each worker caches the gate's answer for a second, so give both the time to see it.
            _wait(lambda: load.refused() > 100, "requests refused with reason log_unavailable", 60)
            served_while_refusing = load.count()
            _wait(lambda: load.refused() > 400, "the proxy keeps answering (refusals) while stdout is stalled", 60)
            assert load.count() - served_while_refusing < 20, "requests served while no line could be written"
            proxy.reading.set()
            _wait(lambda: load.count() > served_while_refusing + 100, "requests served again", 60)
        assert not load.failed, f"requests that neither succeeded nor were refused: {load.failed[:5]}"
        # The audit property: every request that went through has its access line (none was dropped).
        proxy.wait_for(lambda _: sum(1 for r in list(proxy.records) if r.get("type") == "access"
                                     and r.get("decision") == "allowed") == load.ok, timeout=40)
        refusals = [r for r in proxy.records if r.get("reason") == "log_unavailable"]
        assert refusals and all(r["status"] == 503 and r["decision"] == "denied" for r in refusals)
        assert proxy.events("log_refusing") and proxy.events("log_flowing")
        assert proxy.stop() == 0
    finally:
        proxy.reading.set()
        proxy.stop()


# --- 2. dying workers ------------------------------------------------------------------------------------------


def _squid_workers(proxy: ProxyRunner) -> dict[str, int]:
    """name -> pid of Squid's workers, from /proc (the supervisor's child 'squid' is the master)."""
    assert proxy.process is not None
    supervisor = proxy.process.pid
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    workers: dict[str, int] = {}
    for master in children:
        try:
            kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                argv0 = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if argv0.startswith("(squid-") and argv0[7:-1].isdigit():
                workers[argv0[1:-1]] = int(kid)
    return workers


def test_a_killed_worker_is_logged_counted_and_degrades_health_until_back(public_tmp: Path, dns: DnsServer,
                                                                         http_origin: HttpOrigin) -> None:
    proxy = _runner(public_tmp, "workers", 3193).start()
    try:
        _wait(lambda: _metric(proxy, "egress_proxy_workers_up") == 2, "both workers up", 20)
        assert _metric(proxy, "egress_proxy_workers_configured") == 2
        victim = _squid_workers(proxy)["squid-1"]
        os.kill(victim, signal.SIGKILL)
        died = proxy.wait_for(lambda r: r.get("event") == "worker_died", timeout=20)
        assert died["worker"] == "squid-1" and died["pid"] == victim and died["level"] == "error"
        proxy.wait_for(lambda r: r.get("event") == "worker_started" and r.get("worker") == "squid-1", timeout=20)
        assert _metric(proxy, "egress_proxy_worker_deaths_total") == 1
        health = _health(proxy)
        assert health.returncode == 0 and health.stdout.startswith("degraded") and "worker" in health.stdout, (
            health.stdout)

        # Kill it each time Squid revives it: after about five quick deaths Squid stops reviving it for
        # hopeless_kid_revival_delay (30 s here, one hour by Squid's default). Meanwhile: one worker serves.
        pid = _squid_workers(proxy).get("squid-1")
        for _ in range(8):
            if pid is None:
                break
            os.kill(pid, signal.SIGKILL)
            old = pid
            deadline = time.monotonic() + 3
            while (pid := _squid_workers(proxy).get("squid-1")) in (old, None) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid == old:
                pid = None
        assert pid is None, "Squid kept reviving the worker"
        _wait(lambda: _metric(proxy, "egress_proxy_workers_up") == 1, "workers_up at 1", 20)
        health = _health(proxy)
        assert health.returncode == 0 and "1 of 2 Squid workers up" in health.stdout, health.stdout
        for _ in range(5):
            assert requests.get("http://allowed.test/", proxies=proxy.proxies, timeout=10).status_code == 200
        # Squid revives it after the delay set in squid.conf, by itself.
        start = proxy.mark()
        proxy.wait_for(lambda r: r.get("event") == "worker_started" and r.get("worker") == "squid-1",
                       timeout=90, start=start)
        _wait(lambda: _metric(proxy, "egress_proxy_workers_up") == 2, "workers_up back at 2", 20)
        assert proxy.stop() == 0
    finally:
        proxy.stop()


# --- 3. a full disk --------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(public_tmp: Path) -> Iterator[Path]:
    """A 24 MB tmpfs as the state dir, unmounted afterwards."""
    path = _state(public_tmp, "full-disk-state")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=755", "egress-proxy-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the disk refuses (ENOSPC), down to its last page."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_refuses_the_reload_keeps_serving_and_recovers(public_tmp: Path, dns: DnsServer,
                                                                   http_origin: HttpOrigin,
                                                                   small_disk: Path) -> None:
    allowlist = public_tmp / "full-disk-allowlist.txt"
    allowlist.write_text("allowed.test\n")
    proxy = ProxyRunner(small_disk, {**BASE_ENV, "EGRESS_ALLOWLIST_FILE": str(allowlist)}, port=3194).start()
    session = requests.Session()
    session.trust_env = False

    def status(host: str) -> int:
        return session.get(f"http://{host}/", proxies=proxy.proxies, timeout=10).status_code

    try:
        assert (status("allowed.test"), status("denied.test")) == (200, 403)
        filler = _fill(small_disk)
        start = proxy.mark()
        write_allowlist(allowlist, "allowed.test\ndenied.test\n")
        rejected = proxy.wait_for(lambda r: r.get("event") == "reload_rejected", start=start, timeout=30)
        assert rejected["reason"] == "write_failed" and rejected["errno"] == "ENOSPC", rejected
        assert rejected["path"].startswith(str(small_disk)), rejected
        failed = proxy.wait_for(lambda r: r.get("event") == "write_failed", start=start)
        assert failed["errno"] == "ENOSPC" and failed["path"].startswith(str(small_disk))
        # The last good config keeps serving, and keeps serving past the status refresh that used to exit 6:
        # the retry (every 10 s) is logged again while the process lives on.
        assert (status("allowed.test"), status("denied.test")) == (200, 403)
        retried = proxy.mark()
        try:
            proxy.wait_for(lambda r: r.get("event") == "reload_rejected", start=retried, timeout=40)
        except TimeoutError:
            proxy.signal(signal.SIGUSR2)  # the supervisor's thread stacks, for the failure message
            time.sleep(2)
            raise AssertionError("no retry of the reload:\n" + proxy.tail(60)) from None
        assert proxy.process is not None and proxy.process.poll() is None, proxy.tail()
        assert not proxy.events("startup_failed")
        health = _health(proxy)
        assert health.returncode == 0 and health.stdout.startswith("degraded"), health.stdout
        assert "ENOSPC" in health.stdout or "is full" in health.stdout, health.stdout
        # Space returns: the pending version is applied by itself.
        filler.unlink()
        proxy.wait_for(lambda r: r.get("event") == "reloaded", start=start, timeout=40)
        assert status("denied.test") == 200
        proxy.wait_for(lambda r: r.get("event") == "write_recovered", start=start, timeout=30)
        health = _health(proxy)
        assert health.returncode == 0 and health.stdout.startswith("healthy"), health.stdout
        assert proxy.stop() == 0
    finally:
        proxy.stop()
