"""The supervisor's life: startup failures and their exit codes, graceful drain, Squid dying, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import ORIGIN_IP, curl
from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, connect_tunnel, http_get_over, tls_over_tunnel
from proxy_runner import ProxyRunner, egress_proxy_command

BASE_ENV = {"EGRESS_DNS_SERVERS": "127.0.0.1", "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32"}


def _run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
    return subprocess.run([*egress_proxy_command(), *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=timeout)


def _state(public_tmp: Path, name: str) -> Path:
    path = public_tmp / name
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def test_bad_allowlist_at_startup_exits_2_naming_the_entry(public_tmp: Path) -> None:
    result = _run_cli("run", "--allowed-domains", "good.example.com,https://bad.example.com/path,10.0.0.1",
                      "--state-dir", str(_state(public_tmp, "bad-allowlist")), "--port", "3150", "--metrics", "off")
    assert result.returncode == 2
    assert "https://bad.example.com/path" in result.stdout and "10.0.0.1" in result.stdout
    assert "'bad.example.com'" in result.stdout  # the suggested fix


def test_bad_setting_exits_2_naming_the_setting() -> None:
    result = _run_cli("run", env={"EGRESS_CLIENT_CIDRS": "10.0.0.1/8"})
    assert result.returncode == 2
    # run writes JSON lines only, errors included
    error = json.loads(result.stdout)
    assert error["event"] == "startup_failed" and error["exit_code"] == 2
    assert "EGRESS_CLIENT_CIDRS" in error["message"] and "10.0.0.0/8" in error["message"]


def test_missing_allowlist_file_exits_4(public_tmp: Path) -> None:
    result = _run_cli("run", "--allowlist-file", str(public_tmp / "nope.txt"),
                      "--state-dir", str(_state(public_tmp, "no-source")), "--port", "3151", "--metrics", "off")
    assert result.returncode == 4
    assert "no allowlist source reachable at startup" in result.stdout and "nope.txt" in result.stdout


def test_squid_that_cannot_start_exits_3(public_tmp: Path) -> None:
    result = _run_cli("run", "--allowed-domains", "a.example.com", "--squid-binary", "/nonexistent/squid",
                      "--state-dir", str(_state(public_tmp, "no-squid")), "--port", "3152", "--metrics", "off")
    assert result.returncode == 3
    assert "squid-openssl" in result.stdout


def test_check_prints_normalised_allowlist_and_warnings() -> None:
    result = _run_cli("check", "--allowed-domains", "WWW.Example.COM., *.example.org, a.example.org, bücher.example")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [".example.org", "www.example.com", "xn--bcher-kva.example"]
    assert "*.example.org" in result.stderr and "a.example.org" in result.stderr


def test_check_fails_on_bad_entry() -> None:
    result = _run_cli("check", "--allowed-domains", "example.com:443")
    assert result.returncode == 2
    assert "example.com:443" in result.stderr


def test_render_prints_the_config(public_tmp: Path) -> None:
    result = _run_cli("render", "--allowed-domains", ".example.com", "--state-dir", str(public_tmp / "render"))
    assert result.returncode == 0
    assert "ssl_bump splice step2" in result.stdout and str(public_tmp / "render") in result.stdout


def test_custom_error_page(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin) -> None:
    page = public_tmp / "denied.html"
    page.write_text("<html><body><h1>Blocked by ACME egress</h1><p>host=%H reason=@Squid{%{reason}note}</p>"
                    "</body></html>")
    runner = ProxyRunner(_state(public_tmp, "custom-page"), {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test",
                                                             "EGRESS_ERROR_PAGE": str(page)}, port=3153)
    with runner:
        client = requests.Session()
        client.trust_env = False
        response = client.get("http://denied.test/", proxies=runner.proxies, timeout=10)
        assert response.status_code == 403
        assert "Blocked by ACME egress" in response.text
        assert "host=denied.test reason=domain_not_allowlisted" in response.text


def test_sigterm_drains_open_tunnel_then_exits_0(public_tmp: Path, dns: DnsServer, tls_origin: TlsOrigin,
                                                 ca: TestCA) -> None:
    runner = ProxyRunner(_state(public_tmp, "drain"), {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test",
                                                       "EGRESS_DRAIN_SECONDS": "3"}, port=3154)
    runner.start()
    sock, status, _ = connect_tunnel((runner.host, runner.port), "allowed.test", 443)
    assert status == 200
    tls = tls_over_tunnel(sock, "allowed.test", ca.ca_path)
    assert http_get_over(tls, "allowed.test", "/before")[0] == 200
    runner.signal(signal.SIGTERM)
    runner.wait_for(lambda r: r.get("event") == "stopping", timeout=10)
    # During the drain the open tunnel still works...
    assert http_get_over(tls, "allowed.test", "/during-drain")[0] == 200
    # ...but new connections are no longer accepted, once every worker has closed its port.
    runner.wait_for(lambda r: len({m for m in _closed_ports(runner)}) >= 2, timeout=10)
    refused = curl("-x", runner.proxy_url, "http://allowed.test/", timeout=5)
    assert refused.returncode != 0
    assert runner.process is not None
    assert runner.process.wait(timeout=30) == 0
    tls.close()
    assert runner.events("stopped")


def _closed_ports(runner: ProxyRunner) -> set[str]:
    """The Squid workers that logged closing the listening port ("kid1| Closing HTTP(S) port ...")."""
    return {r["message"].split("|")[0].split()[-1] for r in runner.records
            if r.get("type") == "cache_log" and "Closing HTTP(S) port" in r.get("message", "")}


def test_squid_dying_exits_5(public_tmp: Path, dns: DnsServer) -> None:
    runner = ProxyRunner(_state(public_tmp, "dies"), {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test"},
                         port=3155)
    runner.start()
    squid_pid = runner.events("started")[0]["pid"]
    os.kill(squid_pid, signal.SIGKILL)
    assert runner.process is not None
    assert runner.process.wait(timeout=30) == 5
    died = runner.wait_for(lambda r: r.get("event") == "squid_died")
    assert "unexpectedly" in died["message"]


def test_workers_run_unprivileged(proxy: ProxyRunner) -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful when started as root")
    master = proxy.events("started")[0]["pid"]

    def kids() -> tuple[list[str], str]:
        listing = subprocess.run(["ps", "-o", "pid=,user=,args=", "-g", str(master)], capture_output=True,
                                 text=True).stdout
        return [line for line in listing.splitlines() if "--kid" in line], listing

    # A kid forks as root and drops to 'proxy' once it has read its config; on a busy machine ps can catch
    # one in between, so wait (bounded) for the state to settle before judging it.
    deadline = time.monotonic() + 15
    running, listing = kids()
    while not all(line.split()[1] == "proxy" for line in running) and time.monotonic() < deadline:
        time.sleep(0.1)
        running, listing = kids()
    # SMP mode: a coordinator plus the workers, all as the unprivileged 'proxy' user.
    assert len(running) >= 3, listing
    assert all(line.split()[1] == "proxy" for line in running), listing


def test_health_on_a_specific_listen_address(public_tmp: Path, dns: DnsServer, isolated_network: bool) -> None:
    # Only inside the suite's own network namespace: the address is added to its loopback device there.
    if not isolated_network:
        pytest.skip("needs the private network namespace scripts/test creates")
    address = "10.99.0.1"
    subprocess.run(["ip", "addr", "replace", f"{address}/32", "dev", "lo"], check=True)
    env = {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test"}
    state = _state(public_tmp, "specific-address")
    with ProxyRunner(state, env, host=address, port=3156):
        health = _run_cli("health", "--state-dir", str(state), "--listen-address", address, "--port", "3156")
        assert health.returncode == 0, health.stdout
        assert f"healthy: {address}:3156" in health.stdout
