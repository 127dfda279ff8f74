"""EGRESS_UPSTREAM_PROXY against real Squid: allowed traffic leaves through a recording upstream proxy, refused
traffic never reaches it, EGRESS_UPSTREAM_NO_PROXY names go direct, and an upstream outage is a 503 with reason
``upstream_unavailable`` (for plain HTTP and for CONNECT) in the response and in the log line.

The upstream (tests/integration/upstream_proxy.py) demands Basic credentials, which the proxy reads from
EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE.
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from conftest import ORIGIN_IP
from harness import (
    DnsServer,
    HttpOrigin,
    TestCA,
    TlsOrigin,
    connect_tunnel,
    free_port,
    http_get_over,
    tls_over_tunnel,
)
from harness import client_session as session
from proxy_runner import ProxyRunner
from tls_hello import real_client_hello
from upstream_proxy import RecordingProxy

CREDENTIALS = "egress:s3cret p@ss"  # a blank and an @: the proxy must escape them for Squid
WORKERS = 2  # the default EGRESS_WORKERS
ALLOWLIST = "allowed.test\n.wild.test\ndirect.test\ninternal.test\nupstream-only.test\n"


@pytest.fixture(scope="module")
def upstream(dns: DnsServer) -> Iterator[RecordingProxy]:
    dns.set("direct.test", [ORIGIN_IP])

    def resolve(name: str) -> str | None:
        # The upstream's own view of DNS: the test DNS server, plus a name only the upstream can resolve.
        return ORIGIN_IP if name == "upstream-only.test" else (dns.lookup(name) or [None])[0]

    with RecordingProxy("127.0.0.1", free_port(), resolve, credentials=CREDENTIALS) as proxy:
        yield proxy
    dns.remove("direct.test")


@pytest.fixture(scope="module")
def chained(public_tmp: Path, upstream: RecordingProxy, http_origin: HttpOrigin, tls_origin: TlsOrigin,
            internal_origin: HttpOrigin) -> Iterator[ProxyRunner]:
    allowlist = public_tmp / "upstream-allowlist.txt"
    allowlist.write_text(ALLOWLIST)
    credentials = public_tmp / "upstream-credentials"
    credentials.write_text(CREDENTIALS + "\n")
    runner = ProxyRunner(
        public_tmp / "upstream-state",
        {
            "EGRESS_ALLOWLIST_FILE": str(allowlist),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
            # The upstream is on loopback, which the SSRF guard refuses as a destination: it is not one.
            "EGRESS_UPSTREAM_PROXY": f"http://127.0.0.1:{upstream.port}",
            "EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE": str(credentials),
            "EGRESS_UPSTREAM_NO_PROXY": "direct.test",
        },
        port=free_port(),
    )
    runner.start()
    yield runner
    runner.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


EXPECTED_AUTH = "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()


def test_allowed_traffic_leaves_through_the_upstream(chained: ProxyRunner, upstream: RecordingProxy,
                                                     http_origin: HttpOrigin, ca: TestCA) -> None:
    before = len(upstream.forwarded)
    mark = chained.mark()
    s = session()
    plain = s.get("http://allowed.test/via-upstream", proxies=chained.proxies, timeout=10)
    assert plain.status_code == 200
    assert "/via-upstream" in http_origin.paths()
    sock, status, _ = connect_tunnel((chained.host, chained.port), "allowed.test", 443)
    with tls_over_tunnel(sock, "allowed.test", ca.ca_path) as tls:  # closed: a tunnel is logged when it closes
        assert status == 200
        assert http_get_over(tls, "allowed.test", "/tls-via-upstream")[0] == 200
    seen = upstream.forwarded[before:]
    assert [(f.method, f.target) for f in seen] == [
        ("GET", "http://allowed.test/via-upstream"),
        ("CONNECT", "allowed.test:443"),
    ]
    assert all(f.proxy_authorization == EXPECTED_AUTH for f in seen)
    lines = chained.wait_count(lambda r: r.get("type") == "access" and r.get("host") == "allowed.test", 2,
                               start=mark)
    assert all(line["decision"] == "allowed" and line["reason"] == "allowed" for line in lines)


def test_refused_traffic_never_reaches_the_upstream(chained: ProxyRunner, upstream: RecordingProxy,
                                                    internal_origin: HttpOrigin) -> None:
    before = len(upstream.forwarded)
    mark = chained.mark()
    s = session()
    refusals = {
        "http://denied.test/": "domain_not_allowlisted",
        "http://internal.test/": "destination_not_public",  # allowlisted, but it resolves to 127.0.0.3
        f"http://{ORIGIN_IP}/": "ip_literal",
    }
    for url, reason in refusals.items():
        response = s.get(url, proxies=chained.proxies, timeout=10)
        assert response.status_code == 403 and response.headers["X-Egress-Reason"] == reason, url
    for host in ("denied.test", "internal.test"):
        sock, status, head = connect_tunnel((chained.host, chained.port), host, 443)
        sock.close()
        assert status == 403, head
    chained.wait_count(lambda r: r.get("type") == "access" and r.get("decision") == "denied", 5, start=mark)
    assert upstream.forwarded[before:] == []
    assert internal_origin.paths() == []


def test_a_name_only_the_upstream_resolves_is_left_to_the_upstream(chained: ProxyRunner, upstream: RecordingProxy,
                                                                   http_origin: HttpOrigin) -> None:
    # The SSRF guard judges what the proxy's own resolver answers. No answer, nothing to judge: the allowlisted
    # name goes to the upstream, which resolves it (docs/operations.md, "Upstream proxy", says so).
    before = len(upstream.forwarded)
    response = session().get("http://upstream-only.test/split-horizon", proxies=chained.proxies, timeout=10)
    assert response.status_code == 200
    assert [f.target for f in upstream.forwarded[before:]] == ["http://upstream-only.test/split-horizon"]


def test_no_proxy_names_go_direct(chained: ProxyRunner, upstream: RecordingProxy,
                                  http_origin: HttpOrigin) -> None:
    before = len(upstream.forwarded)
    response = session().get("http://direct.test/direct", proxies=chained.proxies, timeout=10)
    assert response.status_code == 200
    assert "/direct" in http_origin.paths()
    assert upstream.forwarded[before:] == []


def test_upstream_outage_is_a_503_with_a_reason(chained: ProxyRunner, upstream: RecordingProxy) -> None:
    mark = chained.mark()
    upstream.stop()
    try:
        s = session()

        def every_worker_noticed() -> bool:
            # Each worker's probe caches its answer for 1-2 s and logs the change when it sees it. Ask until every
            # worker has (each new connection lands on a random worker), and until several fresh connections in a
            # row were refused for it: a worker's cached answer from before the outage may outlive its log line
            # (seen once in CI). Another host than the one asserted on below, whose access lines must not mix.
            answers = [session().get("http://probe.wild.test/outage", proxies=chained.proxies, timeout=10)
                       for _ in range(2 * WORKERS + 2)]
            noticed = [r for r in chained.records[mark:] if r.get("type") == "cache_log"
                       and "upstream_probe: the upstream proxy" in r.get("message", "")
                       and "is not accepting connections" in r["message"]]
            refused = all(a.status_code == 503 and a.headers.get("X-Egress-Reason") == "upstream_unavailable"
                          for a in answers)
            return len(noticed) >= WORKERS and refused

        wait_until(every_worker_noticed, 30, "every worker noticing the upstream outage")
        mark = chained.mark()
        response = s.get("http://allowed.test/outage", proxies=chained.proxies, timeout=10)
        assert response.status_code == 503 and response.headers["X-Egress-Reason"] == "upstream_unavailable"
        assert "Upstream proxy unavailable" in response.text
        sock, status, head = connect_tunnel((chained.host, chained.port), "allowed.test", 443)
        sock.close()
        assert status == 503 and b"X-Egress-Reason: upstream_unavailable" in head, head
        with pytest.raises(requests.exceptions.ProxyError, match="503"):
            session().get("https://allowed.test/", proxies=chained.proxies, timeout=10)
        lines = chained.wait_count(lambda r: r.get("type") == "access" and r.get("host") == "allowed.test", 3,
                                   start=mark)
        assert [line["reason"] for line in lines] == ["upstream_unavailable"] * 3
        assert [line["status"] for line in lines] == [503] * 3
        # NO_PROXY names do not depend on the upstream.
        direct = s.get("http://direct.test/during-outage", proxies=chained.proxies, timeout=10)
        assert direct.status_code == 200
    finally:
        upstream.start()

    # Every worker's probe must have seen the upstream back (each caches its answer, and each new connection lands
    # on any worker), or the next test meets a stale "unreachable": several fresh connections in a row, as above.
    wait_until(lambda: all(session().get("http://allowed.test/back", proxies=chained.proxies,
                                         timeout=10).status_code == 200 for _ in range(2 * WORKERS + 2)),
               15, "recovery after the outage")


# Claims about the client a client could make itself. The upstream proxy (and what it forwards to) may trust such a
# header from this proxy's address, to log or to choose a policy by: only this proxy speaks for the client there,
# and it says nothing (forwarded_for delete), so a client's own claims are removed too.
FORGED_IDENTITY = (b"Proxy-Authorization: Basic Zm9yZ2VkOmZvcmdlZA==\r\nX-Forwarded-For: 10.9.9.9\r\n"
                   b"Forwarded: for=10.9.9.9;by=egress\r\nX-Real-IP: 10.9.9.9\r\nX-Client-IP: 10.9.9.9\r\n"
                   b"True-Client-IP: 10.9.9.9\r\nVia: 1.1 forged\r\n")
IDENTITY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "via")


def _connect_status(proxy: ProxyRunner) -> bytes:
    """The status code of a plain CONNECT to allowed.test through ``proxy`` (the connection is then closed)."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n")
        return sock.recv(4096).split(b" ", 2)[1]


@pytest.mark.parametrize("kind", ["http", "connect"])
def test_the_upstream_sees_no_identity_the_client_claimed(chained: ProxyRunner, upstream: RecordingProxy,
                                                          kind: str) -> None:
    # A worker may still hold the outage test's cached "upstream unreachable" for up to its probe's cache time:
    # such an answer (503 upstream_unavailable) reaches no upstream, so wait for the proxy to see it back.
    wait_until(lambda: all(_connect_status(chained) == b"200" for _ in range(2 * WORKERS + 2)), 15,
               "the upstream seen as back by every worker")
    before = len(upstream.forwarded)
    with socket.create_connection((chained.host, chained.port), timeout=10) as sock:
        if kind == "http":
            sock.sendall(b"GET http://allowed.test/claims HTTP/1.1\r\nHost: allowed.test\r\n" + FORGED_IDENTITY
                         + b"Connection: close\r\n\r\n")
        else:
            sock.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n" + FORGED_IDENTITY
                         + b"\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            sock.sendall(real_client_hello("allowed.test"))
        wait_until(lambda: len(upstream.forwarded) > before, 10, "the request never reached the upstream: "
                   + chained.tail())
    [seen] = upstream.forwarded[before:]
    assert seen.method == ("GET" if kind == "http" else "CONNECT")
    # The proxy's own login, once; never the client's.
    assert seen.proxy_authorization == EXPECTED_AUTH
    assert [line for line in seen.header_lines if line.lower().startswith("proxy-authorization:")] == [
        f"Proxy-Authorization: {EXPECTED_AUTH}"]
    claimed = [line for line in seen.header_lines if line.split(":", 1)[0].strip().lower() in IDENTITY_HEADERS]
    assert claimed == [], seen.header_lines
