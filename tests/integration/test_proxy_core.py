"""The proxy core against real Squid: every behaviour of the policy, with the decision in the access log."""

from __future__ import annotations

import ssl

import pytest
from conftest import INTERNAL_IP, ORIGIN_IP, PROXY_PORT, curl
from harness import (
    DnsServer,
    HttpOrigin,
    RawTcpServer,
    TestCA,
    TlsOrigin,
    connect_tunnel,
    http_get_over,
    tls_over_tunnel,
)
from harness import (
    client_session as session,
)
from proxy_runner import ProxyRunner

PROXY = ("127.0.0.1", PROXY_PORT)




def refused_connect(target: str, port: int = 443, reason: str = "") -> bytes:
    """A CONNECT the proxy must refuse with a real 403 (before any 200) naming the reason in a header."""
    sock, status, head = connect_tunnel(PROXY, target, port)
    sock.close()
    assert status == 403, head
    assert f"X-Egress-Reason: {reason}".encode() in head, head
    return head


# --- HTTP ----------------------------------------------------------------------------------------------


def test_http_allowed_host_reaches_origin(proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    mark = proxy.mark()
    response = session().get("http://allowed.test/hello", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 200
    assert "hello from http-origin" in response.text and "host=allowed.test" in response.text
    record = proxy.access(mark, host="allowed.test", method="GET")
    assert record["decision"] == "allowed" and record["reason"] == "allowed" and record["status"] == 200
    assert record["server_ip"] == ORIGIN_IP and record["bytes_out"] > 0


@pytest.mark.parametrize("host", ["sub.wild.test", "a.b.wild.test", "wild.test", "ALLOWED.TEST", "allowed.test."])
def test_http_domain_entries_and_normalised_hosts_pass(proxy: ProxyRunner, host: str) -> None:
    response = session().get(f"http://{host}/", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 200, response.text[:300]
    assert "hello from http-origin" in response.text


@pytest.mark.parametrize("host", ["denied.test", "evilallowed.test", "allowed.test.evil.test", "sub.allowed.test"])
def test_http_not_allowlisted_gets_403_page(proxy: ProxyRunner, http_origin: HttpOrigin, host: str) -> None:
    mark = proxy.mark()
    before = len(http_origin.requests)
    response = session().get(f"http://{host}/secret", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403
    assert "Access Denied" in response.text
    assert host in response.text and "domain_not_allowlisted" in response.text
    record = proxy.access(mark, host=host)
    assert record["decision"] == "denied" and record["reason"] == "domain_not_allowlisted"
    assert len(http_origin.requests) == before, "a denied request must never reach the origin"


def test_http_ip_literal_refused(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    response = session().get(f"http://{ORIGIN_IP}/", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403
    assert proxy.access(mark, host=ORIGIN_IP)["reason"] == "ip_literal"


def test_http_port_not_allowed(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    response = session().get("http://allowed.test:8080/", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403
    record = proxy.access(mark, host="allowed.test", port=8080)
    assert record["reason"] == "port_not_allowed"


def test_http_allowlisted_name_resolving_to_private_address_refused(
    proxy: ProxyRunner, internal_origin: HttpOrigin
) -> None:
    mark = proxy.mark()
    response = session().get("http://internal.test/", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403
    assert "destination_not_public" in response.text
    assert proxy.access(mark, host="internal.test")["reason"] == "destination_not_public"
    assert internal_origin.requests == [], "the SSRF guard must refuse before connecting"


def test_http_metadata_address_refused(proxy: ProxyRunner, isolated_network: bool) -> None:
    if not isolated_network:
        pytest.skip("only inside the test network namespace: a regression must not send packets to 169.254/16")
    mark = proxy.mark()
    response = session().get("http://metadata.test/latest/meta-data/", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 403
    record = proxy.access(mark, host="metadata.test")
    assert record["reason"] == "destination_not_public" and record["server_ip"] is None


def test_http_uses_configured_dns_server(proxy: ProxyRunner, dns: DnsServer) -> None:
    dns.set("fresh.wild.test", [ORIGIN_IP])
    assert dns.queries_for("fresh.wild.test") == []
    response = session().get("http://fresh.wild.test/", proxies=proxy.proxies, timeout=10)
    assert response.status_code == 200
    # Squid resolved the name through EGRESS_DNS_SERVERS (our server on 127.0.0.1:53), not /etc/hosts.
    assert "A" in dns.queries_for("fresh.wild.test")


def test_client_outside_cidrs_refused(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    result = curl("--interface", "127.0.0.9", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                  proxy.proxy_url, "http://allowed.test/")
    assert result.stdout == "403"
    record = proxy.access(mark, client_ip="127.0.0.9")
    assert record["reason"] == "client_not_allowed" and record["decision"] == "denied"


def test_client_outside_cidrs_refused_for_connect(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    result = curl("--interface", "127.0.0.9", "-x", proxy.proxy_url, "https://allowed.test/")
    assert result.returncode != 0 and "response 403" in result.stderr
    record = proxy.access(mark, client_ip="127.0.0.9", method="CONNECT")
    assert record["reason"] == "client_not_allowed"


# --- HTTPS (CONNECT + SNI) --------------------------------------------------------------------------------


def test_https_allowed_is_spliced_end_to_end(proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> None:
    mark = proxy.mark()
    with session() as client:
        response = client.get("https://allowed.test/tls", proxies=proxy.proxies, verify=str(ca.ca_path),
                              headers={"Connection": "close"}, timeout=10)
    # The origin closes the connection, which ends the tunnel; Squid writes the tunnel's one log line then.
    assert response.status_code == 200
    assert "hello from tls-origin" in response.text
    # The origin's own certificate verified against the test CA: nothing was decrypted in between.
    assert tls_origin.snis[-1] == "allowed.test"
    record = proxy.access(mark, host="allowed.test", method="CONNECT")
    assert record["decision"] == "allowed" and record["sni"] == "allowed.test"
    assert record["squid_status"] == "TCP_TUNNEL" and record["server_ip"] == ORIGIN_IP
    assert record["bytes_out"] > 1000  # the origin's certificate and response came back through the tunnel


def test_https_with_curl(proxy: ProxyRunner, ca: TestCA) -> None:
    result = curl("--cacert", str(ca.ca_path), "-x", proxy.proxy_url, "https://sub.wild.test/curl")
    assert result.returncode == 0, result.stderr
    assert "hello from tls-origin" in result.stdout


@pytest.mark.parametrize("host", ["denied.test", "evilallowed.test", "allowed.test.evil.test"])
def test_https_connect_to_non_allowlisted_host_refused_before_tunnel(
    proxy: ProxyRunner, tls_origin: TlsOrigin, host: str
) -> None:
    mark = proxy.mark()
    handshakes = len(tls_origin.snis)
    refused_connect(host, reason="domain_not_allowlisted")
    record = proxy.access(mark, host=host, method="CONNECT")
    assert record["decision"] == "denied" and record["reason"] == "domain_not_allowlisted"
    assert record["status"] == 403 and record["server_ip"] is None
    assert len(tls_origin.snis) == handshakes


def test_https_curl_reports_refused_connect(proxy: ProxyRunner, ca: TestCA) -> None:
    result = curl("--cacert", str(ca.ca_path), "-x", proxy.proxy_url, "https://denied.test/")
    assert result.returncode != 0
    assert "CONNECT tunnel failed, response 403" in result.stderr


def test_https_connect_to_ip_literal_refused(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    refused_connect(ORIGIN_IP, reason="ip_literal")
    assert proxy.access(mark, host=ORIGIN_IP, method="CONNECT")["reason"] == "ip_literal"


def test_https_connect_port_not_allowed(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    refused_connect("allowed.test", 8443, reason="port_not_allowed")
    record = proxy.access(mark, host="allowed.test", method="CONNECT", port=8443)
    assert record["reason"] == "port_not_allowed"


def test_https_connect_to_private_destination_refused(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    refused_connect("internal.test", reason="destination_not_public")
    assert proxy.access(mark, host="internal.test", method="CONNECT")["reason"] == "destination_not_public"


def test_https_domain_fronting_sni_refused(proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> None:
    mark = proxy.mark()
    handshakes = len(tls_origin.snis)
    sock, status, _ = connect_tunnel(PROXY, "allowed.test", 443)
    assert status == 200  # the CONNECT host is fine; the SNI inside is not
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls = tls_over_tunnel(sock, "denied.test", ca.ca_path, verify=False)
        http_get_over(tls, "denied.test")
    sock.close()
    record = proxy.access(mark, host="allowed.test", method="CONNECT")
    assert record["decision"] == "denied" and record["reason"] == "sni_not_allowlisted"
    assert record["sni"] == "denied.test"
    assert len(tls_origin.snis) == handshakes, "the fronted handshake must never reach the origin"


def test_https_without_sni_refused(proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> None:
    mark = proxy.mark()
    handshakes = len(tls_origin.snis)
    sock, status, _ = connect_tunnel(PROXY, "allowed.test", 443)
    assert status == 200
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls = tls_over_tunnel(sock, None, ca.ca_path, verify=False)
        http_get_over(tls, "allowed.test")
    sock.close()
    record = proxy.access(mark, host="allowed.test", method="CONNECT")
    assert record["reason"] == "sni_missing" and record["sni"] is None
    assert len(tls_origin.snis) == handshakes


def test_non_tls_stream_inside_connect_refused(proxy: ProxyRunner, raw_server: RawTcpServer) -> None:
    mark = proxy.mark()
    connections = raw_server.connections  # other tests splice real ClientHellos to this server
    sock, status, _ = connect_tunnel(PROXY, "raw.test", 443)
    assert status == 200
    sock.sendall(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n")
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except (TimeoutError, ConnectionError):
        pass
    sock.close()
    assert reply == b"", "a non-TLS stream is closed without an answer (docs/security.md: What a refused client sees)"
    assert b"Host: raw.test" not in raw_server.received, "non-TLS bytes must never be tunnelled to the destination"
    assert raw_server.connections == connections
    record = proxy.access(mark, host="raw.test", method="CONNECT")
    assert record["decision"] == "denied" and record["reason"] == "not_tls"


# --- the log and the page ------------------------------------------------------------------------------------


def test_access_log_line_has_every_documented_field(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    session().get("http://allowed.test/fields", proxies=proxy.proxies, timeout=10)
    record = proxy.access(mark, host="allowed.test")
    for name in ("time", "client_ip", "method", "host", "port", "sni", "status", "decision", "reason",
                 "bytes_in", "bytes_out", "duration_ms"):
        assert name in record, name
    assert record["client_ip"] == "127.0.0.1" and record["port"] == 80


def test_cache_log_is_relayed_and_marked(proxy: ProxyRunner) -> None:
    lines = [r for r in proxy.records if r.get("type") == "cache_log"]
    assert any("Starting Squid Cache version 5" in r["message"] for r in lines)


def test_proxy_does_not_reveal_itself_upstream(proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    session().get("http://allowed.test/headers-check", proxies=proxy.proxies, timeout=10)
    seen = [r for r in http_origin.requests if r["path"] == "/headers-check"][-1]
    names = {k.lower() for k in seen["headers"]}
    assert "via" not in names and "x-forwarded-for" not in names


def test_cache_manager_only_from_localhost(proxy: ProxyRunner) -> None:
    mark = proxy.mark()
    ok = session().get(f"{proxy.proxy_url}/squid-internal-mgr/counters", timeout=10)
    assert ok.status_code == 200 and "client_http.requests" in ok.text
    outside = curl("--interface", "127.0.0.9", "-o", "/dev/null", "-w", "%{http_code}",
                   f"{proxy.proxy_url}/squid-internal-mgr/counters")
    assert outside.stdout == "403"
    # The refused read is logged with its reason; the proxy host's own read is not egress and is not logged (Squid
    # names its own internal URLs by visible_hostname). The local read came first, so its line would be out by now.
    refused = proxy.access(mark, client_ip="127.0.0.9", reason="manager_denied")
    assert refused["status"] == 403 and refused["decision"] == "denied" and refused["host"] == "egress-proxy"
    assert [r for r in proxy.records[mark:] if r.get("type") == "access" and r.get("host") == "egress-proxy"
            and r.get("client_ip") == "127.0.0.1"] == []


def test_internal_origin_never_reached(internal_origin: HttpOrigin, proxy: ProxyRunner) -> None:
    # Self-contained (it used to rely on running after the tests that aim at internal.test): every way a client
    # can aim at the non-exempt loopback origin, then what that origin received meanwhile.
    before = len(internal_origin.requests)
    mark = proxy.mark()
    assert session().get("http://internal.test/never", proxies=proxy.proxies, timeout=10).status_code == 403
    assert session().get(f"http://{INTERNAL_IP}/never", proxies=proxy.proxies, timeout=10).status_code == 403
    refused_connect("internal.test", port=443, reason="destination_not_public")
    refused_connect("internal.test", port=80, reason="port_not_allowed")
    for host, method in (("internal.test", "GET"), (INTERNAL_IP, "GET"), ("internal.test", "CONNECT")):
        assert proxy.access(mark, host=host, method=method)["decision"] == "denied"
    assert internal_origin.requests[before:] == []
