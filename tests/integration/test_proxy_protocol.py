"""PROXY protocol v2 (EGRESS_PROXY_PROTOCOL=required) against real Squid: the header's source address is the
client's, its AWS VPC endpoint TLV (type 0xEA: subtype 0x01, then the endpoint ID) selects vpce- policies, and
consumers whose address ranges overlap are told apart by their endpoint. Only EGRESS_PROXY_PROTOCOL_FROM may send
a header; a connection without one is refused. The headers are built by hand here, byte by byte, as an NLB sends
them; the "load balancer" is the loopback address LB."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import DnsServer, HttpOrigin, free_port
from proxy_runner import ProxyRunner, egress_proxy_command

LB = "127.0.20.1"  # inside EGRESS_PROXY_PROTOCOL_FROM
STRANGER = "127.0.21.1"  # outside it
VPCE_A = "vpce-0aaaaaaaaaaaaaaaa"
VPCE_B = "vpce-0bbbbbbbbbbbbbbbb"
CONSUMER = "10.1.2.3"  # the same address in both consumers' VPCs

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_AWS = 0xEA
PP2_SUBTYPE_AWS_VPCE_ID = 0x01


def proxy_v2(source: str, destination: str, source_port: int, destination_port: int,
             endpoint: str | None = None) -> bytes:
    """A PROXY protocol v2 header: version 2 + PROXY command, TCP over IPv4, the addresses and ports, and the
    AWS TLV naming the VPC endpoint when ``endpoint`` is given."""
    addresses = (ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
                 + struct.pack("!HH", source_port, destination_port))
    tlvs = b""
    if endpoint is not None:
        value = bytes([PP2_SUBTYPE_AWS_VPCE_ID]) + endpoint.encode("ascii")
        tlvs = struct.pack("!BH", PP2_TYPE_AWS, len(value)) + value
    return SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses) + len(tlvs)) + addresses + tlvs


@pytest.fixture(scope="module")
def pp_proxy(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin) -> Iterator[ProxyRunner]:
    document = {"policies": [
        {"name": "consumer-a", "clients": [f"{VPCE_A}:10.1.0.0/16"], "allow": ["allowed.test"]},
        {"name": "consumer-b", "clients": [f"{VPCE_B}:10.1.0.0/16"], "allow": ["a.wild.test"]},
        {"name": "local", "clients": ["10.1.0.0/16"], "allow": ["b.wild.test"]},
    ]}
    policy_file = public_tmp / "proxy-protocol-policies.json"
    policy_file.write_text(json.dumps(document))
    runner = ProxyRunner(public_tmp / "state-proxy-protocol", {
        "EGRESS_ALLOWLIST_FILE": str(policy_file),
        "EGRESS_DNS_SERVERS": "127.0.0.1",
        "EGRESS_ALLOW_DESTINATIONS": "127.0.0.2/32",
        "EGRESS_CLIENT_CIDRS": "10.0.0.0/8",
        "EGRESS_PROXY_PROTOCOL": "required",
        "EGRESS_PROXY_PROTOCOL_FROM": "127.0.20.0/24",
    }, port=free_port())
    runner.start()
    yield runner
    runner.stop()


def _request(proxy: ProxyRunner, source: str, header: bytes, url: str) -> bytes:
    """Send ``header`` then a plain-HTTP proxy request from ``source``; everything the proxy answered."""
    host = url.split("/")[2]
    with socket.create_connection((proxy.host, proxy.port), timeout=15, source_address=(source, 0)) as sock:
        sock.sendall(header + f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
        except ConnectionResetError:
            pass
    return response


def _status(response: bytes) -> int:
    return int(response.split()[1])


def _hits(origin: HttpOrigin, path: str) -> int:
    return sum(1 for r in origin.requests if r["path"] == path)


def test_the_endpoint_tlv_selects_the_consumers_policy(pp_proxy: ProxyRunner) -> None:
    mark = pp_proxy.mark()
    header = proxy_v2(CONSUMER, "10.0.0.5", 40000, 3128, VPCE_A)
    assert _status(_request(pp_proxy, LB, header, "http://allowed.test/pp-a")) == 200
    record = pp_proxy.access(mark, host="allowed.test")
    assert (record["client_ip"], record["policy"], record["client_identity"]) == \
        (CONSUMER, "consumer-a", f"{VPCE_A}:10.1.0.0/16")


def test_overlapping_consumer_ranges_are_told_apart_by_endpoint(pp_proxy: ProxyRunner, http_origin: HttpOrigin
                                                               ) -> None:
    header = proxy_v2(CONSUMER, "10.0.0.5", 40001, 3128, VPCE_B)
    mark = pp_proxy.mark()
    response = _request(pp_proxy, LB, header, "http://allowed.test/pp-b")
    assert _status(response) == 403 and b"X-Egress-Policy: consumer-b" in response
    assert _hits(http_origin, "/pp-b") == 0
    assert _status(_request(pp_proxy, LB, header, "http://a.wild.test/pp-b")) == 200
    record = pp_proxy.access(mark, host="a.wild.test")
    assert (record["client_ip"], record["policy"]) == (CONSUMER, "consumer-b")


def test_a_header_without_the_endpoint_tlv_is_a_local_client(pp_proxy: ProxyRunner) -> None:
    mark = pp_proxy.mark()
    header = proxy_v2(CONSUMER, "10.0.0.5", 40002, 3128)
    assert _status(_request(pp_proxy, LB, header, "http://b.wild.test/pp-local")) == 200
    record = pp_proxy.access(mark, host="b.wild.test")
    assert (record["client_ip"], record["policy"], record["client_identity"]) == (CONSUMER, "local", "10.1.0.0/16")
    # The endpoint's own policy does not apply without the TLV.
    assert _status(_request(pp_proxy, LB, header, "http://allowed.test/pp-local")) == 403


def test_a_header_from_a_forbidden_address_is_refused(pp_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    header = proxy_v2(CONSUMER, "10.0.0.5", 40003, 3128, VPCE_A)
    assert _request(pp_proxy, STRANGER, header, "http://allowed.test/pp-forbidden") == b""
    # The same header from the load balancer passes, so it was the sender that was refused.
    assert _status(_request(pp_proxy, LB, header, "http://allowed.test/pp-forbidden")) == 200
    assert _hits(http_origin, "/pp-forbidden") == 1


def test_a_connection_without_a_header_is_refused(pp_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    response = _request(pp_proxy, LB, b"", "http://allowed.test/pp-missing")
    assert not response.startswith(b"HTTP/1.1 200")
    assert _hits(http_origin, "/pp-missing") == 0


def test_an_nlb_health_check_with_a_local_header_is_harmless(pp_proxy: ProxyRunner) -> None:
    """With proxy protocol on, an NLB's health check connection carries a PROXY v2 header with the LOCAL command
    and no addresses, then closes. The TCP check passes on the handshake; the proxy keeps serving."""
    local = SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    for _ in range(3):
        with socket.create_connection((pp_proxy.host, pp_proxy.port), timeout=5, source_address=(LB, 0)) as sock:
            sock.sendall(local)
    header = proxy_v2(CONSUMER, "10.0.0.5", 40004, 3128, VPCE_A)
    assert _status(_request(pp_proxy, LB, header, "http://allowed.test/pp-after-health-checks")) == 200


def test_the_health_check_reads_squid_through_the_proxy_header_port(pp_proxy: ProxyRunner) -> None:
    """`egress-proxy health` (the container's health check) and the metrics read Squid's cache manager over
    loopback; on a port that requires a PROXY header they send "PROXY UNKNOWN" first."""
    result = subprocess.run([*egress_proxy_command(), "health"], env=pp_proxy.env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("healthy:")
