"""Access lines that tell the truth, with the real Squid: a spliced tunnel that the origin closes first is logged
with the 200 the client saw (and Squid's error counter does not move); an unreachable allowlisted origin is one
line with ERR_CONNECT_FAIL and no denial; a refused CONNECT says TCP_DENIED; no line on stdout is raw text."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ORIGIN_IP
from harness import DnsServer, TestCA, connect_tunnel, tls_over_tunnel
from proxy_runner import ProxyRunner

CLOSER_IP = "127.0.0.5"  # a TLS origin that closes first, without close_notify
DOWN_IP = "127.0.0.6"  # nothing listens here
PORT = 3177


def read_counter(host: str, port: int, name: str) -> float:
    """One counter from Squid's cache manager (loopback reads are allowed and not access-logged)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/squid-internal-mgr/counters")
        body = connection.getresponse().read().decode()
    finally:
        connection.close()
    for line in body.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return float(value.strip())
    raise AssertionError(f"{name} not in the cache manager's counters")


class ClosingTlsOrigin:
    """Answers one HTTP response over TLS, then closes the TCP connection without a TLS close_notify (as many
    origins do, and as a keep-alive expiry looks to the proxy)."""

    def __init__(self, ca: TestCA) -> None:
        cert, key = ca.issue(["closer.test"])
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server((CLOSER_IP, 443))
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                tls = self.context.wrap_socket(client, server_side=True)
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                self.served += 1
                tls.close()  # no unwrap(): no close_notify
            except OSError:
                client.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def truth_proxy(public_tmp: Path, dns: DnsServer, ca: TestCA) -> Iterator[ProxyRunner]:
    dns.set("closer.test", [CLOSER_IP])
    dns.set("down.test", [DOWN_IP])
    origin = ClosingTlsOrigin(ca)
    state = public_tmp / "truth"
    state.mkdir(mode=0o755, exist_ok=True)
    runner = ProxyRunner(state, {
        "EGRESS_DNS_SERVERS": "127.0.0.1",
        "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32,{CLOSER_IP}/32,{DOWN_IP}/32",
        "EGRESS_ALLOWED_DOMAINS": "allowed.test,closer.test,down.test",
    }, port=PORT)
    runner.start()
    yield runner
    runner.stop()
    origin.close()


def test_tunnel_closed_by_the_origin_is_logged_as_200(truth_proxy: ProxyRunner, ca: TestCA) -> None:
    errors_before = read_counter(truth_proxy.host, PORT, "client_http.errors")
    ports = []
    for _ in range(3):
        sock, status, _ = connect_tunnel((truth_proxy.host, PORT), "closer.test", 443)
        assert status == 200
        ports.append(sock.getsockname()[1])
        tls = tls_over_tunnel(sock, "closer.test", ca.ca_path)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: closer.test\r\n\r\n")
        received = b""
        while chunk := tls.recv(65536):  # until the origin's close reaches us through the tunnel
            received += chunk
        assert received.endswith(b"ok")
        tls.close()
    for port in ports:
        line = truth_proxy.access(client_port=port)
        assert line["status"] == 200 and line["squid_status"] == "TCP_TUNNEL" and line["error"] is None
        assert line["decision"] == "allowed" and line["bytes_out"] > 0
    # Squid's own error counter (published as client_http.errors) is not inflated by these tunnels.
    assert read_counter(truth_proxy.host, PORT, "client_http.errors") == errors_before


def test_unreachable_origin_is_one_line_and_no_denial(truth_proxy: ProxyRunner, ca: TestCA) -> None:
    mark = truth_proxy.mark()
    sock, status, _ = connect_tunnel((truth_proxy.host, PORT), "down.test", 443)
    assert status == 200  # Squid answers before it connects (it must read the ClientHello first)
    client_port = sock.getsockname()[1]
    with pytest.raises((ssl.SSLError, OSError)):
        tls_over_tunnel(sock, "down.test", ca.ca_path)
    sock.close()
    line = truth_proxy.access(mark, client_port=client_port)
    assert line["error"] == "ERR_CONNECT_FAIL" and line["status"] == 200 and line["decision"] == "allowed"
    # A marker through the same worker pool; then everything before it has been relayed.
    marker, marker_status, _ = connect_tunnel((truth_proxy.host, PORT), "denied.test", 443)
    marker_port = marker.getsockname()[1]
    marker.close()
    assert marker_status == 403
    refused = truth_proxy.access(mark, client_port=marker_port)
    assert refused["squid_status"] == "TCP_DENIED" and refused["status"] == 403
    truth_proxy.stop()  # drains every relay: all lines are in now
    lines = [r for r in truth_proxy.records[mark:] if r.get("type") == "access" and r.get("client_port") == client_port]
    assert lines == [line], lines
    warnings = [r for r in truth_proxy.records if "without an HTTP request" in r.get("message", "")]
    assert warnings == []


def test_every_output_line_is_json(truth_proxy: ProxyRunner) -> None:
    truth_proxy.stop()
    raw = [r for r in truth_proxy.records if r.get("type") == "raw"]
    assert raw == [], raw[:5]
    assert any(r.get("event") == "fd_budget" for r in truth_proxy.records)
