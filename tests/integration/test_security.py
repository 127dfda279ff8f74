"""Attacks that got through once (issue 12), each refused now with nothing reaching the forbidden origin:
mixed DNS answers against the SSRF guard, ClientHellos with more than one or a malformed SNI, and refused
CONNECTs under concurrency (every one a 403 with its reason, never Squid's 500)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import INTERNAL_IP, ORIGIN_IP, PROXY_PORT, RAW_IP
from harness import DnsServer, HttpOrigin, RawTcpServer, connect_tunnel
from harness import client_session as session
from proxy_runner import ProxyRunner
from tls_hello import closed_without_data, real_client_hello, send_hello, with_server_names

PROXY = ("127.0.0.1", PROXY_PORT)
SetName = Callable[[str, list[str]], str]


@pytest.fixture
def dns_names(dns: DnsServer) -> Iterator[SetName]:
    """Sets names (under the allowlisted .wild.test domain) for one test, and removes them afterwards."""
    names: list[str] = []

    def set_name(name: str, addresses: list[str]) -> str:
        dns.set(name, addresses)
        names.append(name)
        return name

    yield set_name
    for name in names:
        dns.remove(name)


# --- 1. SSRF guard: any forbidden address in the answer refuses the name ---------------------------------


@pytest.mark.parametrize(
    ("label", "addresses"),
    [
        ("mixed-forbidden-first", [INTERNAL_IP, ORIGIN_IP]),  # Squid would connect to the first: 127.0.0.3
        ("mixed-exempt-first", [ORIGIN_IP, INTERNAL_IP]),
        ("mixed-metadata", ["169.254.169.254", ORIGIN_IP]),
    ],
)
def test_http_mixed_answer_is_refused(proxy: ProxyRunner, dns_names: SetName, http_origin: HttpOrigin,
                                      internal_origin: HttpOrigin, label: str, addresses: list[str]) -> None:
    host = dns_names(f"{label}.wild.test", addresses)
    mark = proxy.mark()
    response = session().get(f"http://{host}/ssrf", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403, response.text[:300]
    assert response.headers.get("X-Egress-Reason") == "destination_not_public"
    record = proxy.access(mark, host=host)
    assert record["decision"] == "denied" and record["reason"] == "destination_not_public"
    assert [r for r in internal_origin.requests if r["path"] == "/ssrf"] == []
    assert [r for r in http_origin.requests if r["path"] == "/ssrf"] == []


@pytest.mark.parametrize(
    ("label", "addresses"),
    [
        ("connect-mixed-forbidden-first", [INTERNAL_IP, RAW_IP]),
        ("connect-mixed-exempt-first", [RAW_IP, INTERNAL_IP]),
    ],
)
def test_connect_mixed_answer_is_refused(proxy: ProxyRunner, dns_names: SetName, raw_server: RawTcpServer,
                                         label: str, addresses: list[str]) -> None:
    host = dns_names(f"{label}.wild.test", addresses)
    connections = raw_server.connections
    mark = proxy.mark()
    sock, status, head = connect_tunnel(PROXY, host, 443)
    sock.close()
    assert status == 403, head
    assert b"X-Egress-Reason: destination_not_public" in head
    record = proxy.access(mark, host=host, method="CONNECT")
    assert record["decision"] == "denied" and record["status"] == 403
    assert raw_server.connections == connections


@pytest.mark.parametrize(
    ("label", "addresses"),
    [
        ("aaaa-loopback", ["::1"]),
        ("aaaa-mapped", [f"::ffff:{INTERNAL_IP}"]),
        ("aaaa-mapped-metadata", ["::ffff:169.254.169.254"]),
        ("aaaa-nat64-metadata", ["64:ff9b::a9fe:a9fe"]),
        ("aaaa-ec2-metadata", ["fd00:ec2::254"]),
        ("aaaa-mixed", [ORIGIN_IP, "::1"]),
    ],
)
def test_ipv6_answers_are_guarded_too(proxy: ProxyRunner, dns_names: SetName, http_origin: HttpOrigin,
                                      internal_origin: HttpOrigin, label: str, addresses: list[str]) -> None:
    host = dns_names(f"{label}.wild.test", addresses)
    mark = proxy.mark()
    response = session().get(f"http://{host}/ssrf6", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403, response.text[:300]
    assert proxy.access(mark, host=host)["reason"] == "destination_not_public"
    assert [r for r in internal_origin.requests + http_origin.requests if r["path"] == "/ssrf6"] == []


def test_exempt_only_answer_still_passes(proxy: ProxyRunner, dns_names: SetName, http_origin: HttpOrigin) -> None:
    # The control: the same shape with only exempt addresses reaches the origin.
    host = dns_names("exempt-only.wild.test", [ORIGIN_IP])
    response = session().get(f"http://{host}/exempt", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 200 and "hello from http-origin" in response.text
    assert [r["host"] for r in http_origin.requests if r["path"] == "/exempt"] == [host]


# --- 2 and 3. SNI: exactly one valid, allowlisted host name --------------------------------------------------


def _send_hello(hello: bytes) -> socket.socket:
    return send_hello(PROXY, "raw.test", hello)


@pytest.mark.parametrize(
    ("case", "hello", "reason"),
    [
        ("fronted name in a first extension", with_server_names([b"denied.test"], [b"raw.test"]), "sni_malformed"),
        ("fronted name in a second extension", with_server_names([b"raw.test"], [b"denied.test"]), "sni_malformed"),
        ("two names in one list", with_server_names([b"raw.test", b"denied.test"]), "sni_malformed"),
        ("two names, fronted first", with_server_names([b"denied.test", b"raw.test"]), "sni_malformed"),
        ("NUL inside the name", with_server_names([b"raw.test\x00.evil.test"]), "sni_malformed"),
        ("control byte", with_server_names([b"raw\x01.test"]), "sni_malformed"),
        ("IPv4 address", with_server_names([RAW_IP.encode()]), "sni_malformed"),
        ("IPv6 address", with_server_names([b"::1"]), "sni_malformed"),
        ("label over 63 octets", with_server_names([b"a" * 64 + b".raw.test"]), "sni_malformed"),
        ("empty name list", with_server_names([]), "sni_malformed"),
        ("no server_name extension", with_server_names(), "sni_missing"),
        ("fronted, split over two records", with_server_names([b"denied.test"], split_at=40), "sni_not_allowlisted"),
    ],
)
def test_malformed_or_fronted_sni_is_refused(proxy: ProxyRunner, raw_server: RawTcpServer, case: str, hello: bytes,
                                             reason: str) -> None:
    connections = raw_server.connections
    mark = proxy.mark()
    assert closed_without_data(_send_hello(hello)), case
    record = proxy.access(mark, host="raw.test", method="CONNECT", reason=reason)
    assert record["decision"] == "denied"
    assert raw_server.connections == connections, f"{case}: the ClientHello reached the origin"


@pytest.mark.parametrize("split_at", [None, 40])
def test_one_valid_sni_is_spliced(proxy: ProxyRunner, raw_server: RawTcpServer, split_at: int | None) -> None:
    # The control for the cases above: the same hand-built ClientHello with one allowlisted name reaches the
    # origin byte for byte, also when it is split over two TLS records.
    hello = with_server_names([b"raw.test"], split_at=split_at)
    connections = raw_server.connections
    sock = _send_hello(hello)
    try:
        raw_server.wait_for(hello, timeout=10)
    finally:
        sock.close()
    assert raw_server.connections == connections + 1


def test_real_client_hello_with_uppercase_sni_is_spliced(proxy: ProxyRunner, raw_server: RawTcpServer) -> None:
    hello = real_client_hello("RAW.test")
    sock = _send_hello(hello)
    try:
        raw_server.wait_for(hello, timeout=10)
    finally:
        sock.close()


def test_squid_runs_the_compiled_sni_helper(proxy: ProxyRunner) -> None:
    """The SNI tests above ran against the compiled helper (sni_helper.c), which the rendered config names when the
    package has it; sni_helper.py is its reference model (the differential test compares the two)."""
    binary = proxy.state_dir / "bin" / "sni_helper"
    conf = (proxy.state_dir / "conf" / "squid.conf").read_text()
    [line] = [line for line in conf.splitlines() if line.startswith("external_acl_type sni_check ")]
    assert line.endswith(f" {binary} {proxy.state_dir / 'conf' / 'policies'}"), (
        f"Squid runs {line.split('%{policy}note ')[-1]!r}, not the compiled helper: build it with "
        "scripts/build-sni-helper (scripts/test does)")
    running = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/exe") == str(binary):
                running.append(pid)
    assert running, f"no process runs {binary}"


# --- 4. refused CONNECTs are 403s, also under concurrency ---------------------------------------------------


def test_parallel_refused_connects_are_all_403(proxy: ProxyRunner, raw_server: RawTcpServer) -> None:
    """Thousands of refusals from many clients at once, as retrying SDKs produce them: each one a 403 with its
    reason, never Squid's 500 (which it answered once the refusal responder was counted as a dead peer)."""
    targets = [("denied.test", 443, "domain_not_allowlisted"), ("raw.test", 8443, "port_not_allowed"),
               ("127.0.0.4", 443, "ip_literal")]
    total = 2400

    def refuse(index: int) -> tuple[int, str]:
        host, port, _ = targets[index % len(targets)]
        sock, status, head = connect_tunnel(PROXY, host, port, timeout=30)
        sock.close()
        reasons = [line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"x-egress-reason:")]
        return status, reasons[0] if reasons else ""

    connections = raw_server.connections
    mark = proxy.mark()
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = Counter(pool.map(refuse, range(total)))
    expected = Counter({(403, reason): total // len(targets) for _, _, reason in targets})
    assert answers == expected
    assert raw_server.connections == connections
    # The log tells the same story: one denied line per refusal, each with the status the client saw.
    # (Only these targets' lines: a tunnel from an earlier test may close, and be logged, meanwhile.)
    ours = {(host, port) for host, port, _ in targets}

    def refusal_line(record: dict[str, object]) -> bool:
        return record.get("type") == "access" and record.get("method") == "CONNECT" and (
            record.get("host"), record.get("port")) in ours

    logged = Counter((r["status"], r["reason"]) for r in proxy.wait_count(refusal_line, total, start=mark,
                                                                           timeout=60))
    assert logged == expected
    # Squid never judged the refusal responder dead, and its per-refusal "failed" note is not relayed as noise.
    cache_log = [r["message"] for r in proxy.records[mark:] if r.get("type") == "cache_log"]
    assert [m for m in cache_log if "DEAD" in m or "TCP connection to 127.0.0.1" in m] == []
