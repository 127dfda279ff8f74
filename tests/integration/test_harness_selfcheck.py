"""Self-checks for the integration harness: no proxy involved, loopback only."""

from __future__ import annotations

import pathlib
import socket
import ssl
import threading
import time

import pytest
import requests
from dnslib import RCODE, DNSRecord  # type: ignore[import-untyped]
from harness import (
    DnsServer,
    HttpOrigin,
    RawTcpServer,
    TestCA,
    TlsOrigin,
    connect_tunnel,
    free_port,
    http_get_over,
    read_body,
    tls_over_tunnel,
    wait_for_port,
)


def _session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # never pick up *_PROXY from the environment
    return s


def _ask(
    dns: DnsServer, name: str, qtype: str = "A", tcp: bool = False
) -> tuple[str, list[str]]:
    q = DNSRecord.question(name, qtype)
    raw: bytes = q.send(dns.host, dns.port, tcp=tcp, timeout=2.0)
    reply = DNSRecord.parse(raw)
    rcode: str = RCODE.get(reply.header.rcode)
    answers = [str(rr.rdata) for rr in reply.rr]
    return rcode, answers


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


# --------------------------------------------------------------------- DNS


def test_dns_answers() -> None:
    port = free_port("127.0.0.1")
    records = {"Web.Test.": ["127.0.0.2", "::1"], "v4only.test": ["127.0.0.3"]}
    with DnsServer(records, host="127.0.0.1", port=port) as dns:
        assert dns.port == port
        wait_for_port("127.0.0.1", port)

        assert _ask(dns, "web.test", "A") == ("NOERROR", ["127.0.0.2"])
        assert _ask(dns, "WEB.test.", "AAAA") == ("NOERROR", ["::1"])
        # exists but no AAAA: NOERROR with an empty answer, not NXDOMAIN
        assert _ask(dns, "v4only.test", "AAAA") == ("NOERROR", [])
        assert _ask(dns, "v4only.test", "MX") == ("NOERROR", [])
        assert _ask(dns, "missing.test", "A") == ("NXDOMAIN", [])
        assert _ask(dns, "missing.test", "AAAA") == ("NXDOMAIN", [])
        # TCP works too
        assert _ask(dns, "web.test", "A", tcp=True) == ("NOERROR", ["127.0.0.2"])

        # answers carry a small TTL
        reply = DNSRecord.parse(
            DNSRecord.question("web.test", "A").send("127.0.0.1", port, timeout=2.0)
        )
        assert reply.header.aa == 1
        assert [rr.ttl for rr in reply.rr] == [1]

        assert dns.queries == [
            ("web.test", "A"),
            ("web.test", "AAAA"),
            ("v4only.test", "AAAA"),
            ("v4only.test", "MX"),
            ("missing.test", "A"),
            ("missing.test", "AAAA"),
            ("web.test", "A"),
            ("web.test", "A"),
        ]
        assert dns.queries_for("v4only.test") == ["AAAA", "MX"]


def test_dns_wildcard_and_changes() -> None:
    with DnsServer(host="127.0.0.1", port=free_port()) as dns:
        dns.set_wildcard("wild.test", ["127.0.0.3"])
        assert _ask(dns, "x.wild.test") == ("NOERROR", ["127.0.0.3"])
        assert _ask(dns, "a.b.Wild.Test") == ("NOERROR", ["127.0.0.3"])
        assert _ask(dns, "wild.test") == ("NXDOMAIN", [])  # only names *under* it
        assert _ask(dns, "notwild.test") == ("NXDOMAIN", [])
        # exact entries beat the wildcard
        dns.set("exact.wild.test", ["127.0.0.4"])
        assert _ask(dns, "exact.wild.test") == ("NOERROR", ["127.0.0.4"])

        # change answers while running
        dns.set("moving.test", ["127.0.0.2"])
        assert _ask(dns, "moving.test") == ("NOERROR", ["127.0.0.2"])
        dns.set("moving.test.", ["127.0.0.5", "127.0.0.6"])
        assert _ask(dns, "moving.test") == ("NOERROR", ["127.0.0.5", "127.0.0.6"])
        dns.set("moving.test", [])
        assert _ask(dns, "moving.test") == ("NOERROR", [])
        dns.remove("moving.test")
        assert _ask(dns, "moving.test") == ("NXDOMAIN", [])
        assert ("a.b.wild.test", "A") in dns.queries


def test_dns_ephemeral_port_and_restart() -> None:
    dns = DnsServer({"a.test": ["127.0.0.2"]}, port=0)
    dns.start()
    try:
        assert dns.port != 0
        assert _ask(dns, "a.test") == ("NOERROR", ["127.0.0.2"])
    finally:
        dns.stop()
    dns.stop()  # idempotent


# ------------------------------------------------------------- HTTP origin


def test_http_origin_keepalive_and_routes() -> None:
    with HttpOrigin("127.0.0.3", free_port("127.0.0.3"), name="plain") as origin:
        s = _session()
        r1 = s.get(origin.url("/one?x=1"), timeout=5)
        r2 = s.get(origin.url("/two"), timeout=5)
        assert r1.status_code == 200
        assert r1.text == (
            f"hello from plain 127.0.0.3:{origin.port} path=/one?x=1 "
            f"host=127.0.0.3:{origin.port}\n"
        )
        assert r2.headers["Content-Length"] == str(len(r2.content))
        assert [r["path"] for r in origin.requests] == ["/one?x=1", "/two"]
        # the same TCP connection served both requests
        c1, c2 = origin.requests[0]["client"], origin.requests[1]["client"]
        assert c1 == c2
        assert c1[0] == "127.0.0.1"

        r = s.get(origin.url("/bytes/300000"), timeout=5)
        assert r.content == b"x" * 300000
        r = s.get(origin.url("/status/503"), timeout=5)
        assert r.status_code == 503
        t0 = time.monotonic()
        r = s.get(origin.url("/slow/0.3"), timeout=5)
        assert r.status_code == 200 and time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        r = s.get(origin.url("/stream/0.6"), timeout=5)
        assert r.content == b"tick 000000\ntick 000001\ntick 000002\n"
        assert time.monotonic() - t0 >= 0.4
        s.close()

        # the raw client helper, twice on one socket
        with socket.create_connection(("127.0.0.3", origin.port), timeout=5) as sock:
            assert http_get_over(sock, "a.test", "/p1") == (
                200,
                f"hello from plain 127.0.0.3:{origin.port} path=/p1 host=a.test\n".encode(),
            )
            status, body = http_get_over(sock, "a.test", "/bytes/10")
            assert (status, body) == (200, b"x" * 10)
        assert origin.requests[-1]["host"] == "a.test"
        assert origin.requests[-1]["sni"] is None


def test_http_origin_stop_cuts_idle_and_busy_connections() -> None:
    origin = HttpOrigin("127.0.0.1", 0)
    origin.start()
    idle = socket.create_connection(("127.0.0.1", origin.port), timeout=5)
    assert http_get_over(idle, "x", "/")[0] == 200  # now an idle keep-alive conn
    busy = socket.create_connection(("127.0.0.1", origin.port), timeout=5)
    busy.sendall(b"GET /slow/30 HTTP/1.1\r\nHost: x\r\n\r\n")
    deadline = time.monotonic() + 5
    while len(origin.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    origin.stop()
    assert time.monotonic() - t0 < 3
    assert busy.recv(100) == b""
    idle.close()
    busy.close()
    with pytest.raises(TimeoutError, match="127.0.0.1"):
        wait_for_port("127.0.0.1", origin.port, timeout=0.3)


# -------------------------------------------------------------- TLS origin


def test_tls_origin_requests_with_ip_san(ca: TestCA) -> None:
    port = free_port("127.0.0.2")
    with TlsOrigin("127.0.0.2", port, ca, ["secure.test"]) as origin:
        assert origin.url("/x") == f"https://127.0.0.2:{port}/x"
        s = _session()
        r = s.get(origin.url("/hello"), verify=str(ca.ca_path), timeout=5)
        assert r.status_code == 200
        assert r.text.startswith(f"hello from tls-origin 127.0.0.2:{port} path=/hello")
        # an IP literal in the URL: Python sends no SNI
        assert origin.snis == [None]
        # keep-alive over TLS as well
        s.get(origin.url("/again"), verify=str(ca.ca_path), timeout=5)
        assert origin.requests[0]["client"] == origin.requests[1]["client"]
        assert origin.snis == [None]
        s.close()
        # an untrusted client fails verification
        with pytest.raises(requests.exceptions.SSLError):
            _session().get(origin.url("/"), verify=True, timeout=5)


def test_tls_origin_records_sni_and_no_sni(ca: TestCA) -> None:
    with TlsOrigin("127.0.0.2", 0, ca, ["secure.test", "*.wild.test"]) as origin:
        # raw TLS with SNI, verified against the DNS SAN
        with socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw:
            tls = tls_over_tunnel(raw, "secure.test", ca.ca_path)
            assert http_get_over(tls, "secure.test", "/a")[0] == 200
            assert http_get_over(tls, "secure.test", "/b")[0] == 200
            tls.close()
        assert origin.snis == ["secure.test"]
        assert [r["sni"] for r in origin.requests] == ["secure.test", "secure.test"]

        # raw ssl socket sending no SNI at all
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(ca.ca_path))
        ctx.check_hostname = False
        with (
            socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=None) as tls,
        ):
            status, body = http_get_over(tls, "secure.test", "/nosni")
            assert status == 200 and b"path=/nosni" in body
        assert origin.snis == ["secure.test", None]

        # the helper with server_hostname=None behaves the same
        with (
            socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw,
            tls_over_tunnel(raw, None, ca.ca_path) as tls,
        ):
            assert http_get_over(tls, "h", "/")[0] == 200
        # wildcard name, and verify=False towards a name the cert lacks
        with (
            socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw,
            tls_over_tunnel(raw, "a.wild.test", ca.ca_path) as tls,
        ):
            assert http_get_over(tls, "a.wild.test", "/")[0] == 200
        with (
            socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            tls_over_tunnel(raw, "other.test", ca.ca_path)
        with (
            socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw,
            tls_over_tunnel(raw, "other.test", ca.ca_path, verify=False) as tls,
        ):
            assert http_get_over(tls, "other.test", "/")[0] == 200
        assert origin.snis[2:] == [None, "a.wild.test", "other.test", "other.test"]

        # plaintext to the TLS port is a recorded handshake failure
        with socket.create_connection(("127.0.0.2", origin.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                raw.recv(100)
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 5
        while not origin.tls_errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert origin.tls_errors


def test_ca_issue_writes_chain(ca: TestCA, tmp_path: pathlib.Path) -> None:
    chain, key = ca.issue(["a.test"], ["127.0.0.9"])
    assert chain.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    assert b"PRIVATE KEY" in key.read_bytes()
    assert ca.ca_path.name == "ca.pem" and ca.ca_path.exists()
    assert ca.ca_key_path.exists()
    other = TestCA(tmp_path)
    assert other.ca_path == tmp_path / "ca.pem"


# ---------------------------------------------------------------- raw TCP


def test_raw_tcp_server_records_bytes() -> None:
    with RawTcpServer(
        "127.0.0.3", free_port("127.0.0.3"), banner=b"SSH-2.0-x\r\n"
    ) as srv:
        with socket.create_connection(("127.0.0.3", srv.port), timeout=5) as c:
            assert c.recv(100) == b"SSH-2.0-x\r\n"
            c.sendall(b"hello ")
            c.sendall(b"world")
        assert srv.wait_for(b"hello world") == b"hello world"
        with socket.create_connection(("127.0.0.3", srv.port), timeout=5) as c:
            c.recv(100)
            c.sendall(b"!")
        srv.wait_for(b"world!")
        assert srv.received == b"hello world!"
        assert srv.connections == 2
        with pytest.raises(TimeoutError):
            srv.wait_for(b"never", timeout=0.2)


def _fake_proxy(reply: bytes, got: list[bytes]) -> tuple[int, threading.Thread]:
    """One-shot fake proxy: records the request, sends ``reply``, then records
    whatever the client sends next."""
    listener = socket.create_server(("127.0.0.1", 0))
    port: int = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                got.append(conn.recv(1000))
                conn.sendall(reply)
                got.append(conn.recv(1000))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return port, t


def test_connect_tunnel_does_not_overread() -> None:
    got: list[bytes] = []
    port, t = _fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\nBANNER", got)
    sock, status, head = connect_tunnel(("127.0.0.1", port), "t.test", 443)
    with sock:
        assert status == 200
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert sock.recv(6) == b"BANNER"  # tunnel bytes left in the socket
        sock.sendall(b"ping")
        t.join(5)
    assert got == [b"CONNECT t.test:443 HTTP/1.1\r\nHost: t.test:443\r\n\r\n", b"ping"]


def test_connect_tunnel_refused_with_body() -> None:
    got: list[bytes] = []
    reply = (
        b"HTTP/1.1 403 Forbidden\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\n"
        b"Content-Length: 6\r\n\r\ndenied"
    )
    port, t = _fake_proxy(reply, got)
    sock, status, head = connect_tunnel(("127.0.0.1", port), "10.0.0.1", 22)
    with sock:
        assert status == 403
        assert b"ERR_ACCESS_DENIED" in head
        assert read_body(sock, head) == b"denied"
    t.join(5)
    assert got[0].startswith(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\n")
