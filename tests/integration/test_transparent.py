"""Transparent mode against real Squid, real nftables and real clients, in network namespaces this module creates.

    client ns                      router ns (the "EC2 instance")               internet ns
    10.200.1.2 (enforce policy)    10.200.1.1 | egress-proxy run (Squid)         198.51.100.2
    10.200.1.3 (report policy) --  nft ruleset from 'egress-proxy nft-rules' -- 203.0.113.10  allowed.test origin
    default route -> router        198.51.100.1, ip_forward on                  203.0.113.66  a "wrong" IP
                                                                                 203.0.113.53  the test's DNS

The client has no proxy setting: its default route points at the router, whose nftables rules redirect tcp/80 and
tcp/443 to Squid's intercept ports and drop everything else. The origins and the DNS server are the harness's,
bound inside the internet namespace, so every request they record is one that really crossed the router
(netns.RoutedTopology builds the namespaces). Clients resolve with curl --resolve: that is the answer a client
holds, which may differ from the proxy's.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DnsServer, HttpOrigin, RawTcpServer, TestCA, TlsOrigin, write_allowlist
from netns import RoutedTopology as Topology
from netns import curl_in, serving
from proxy_runner import NamespacedProxy, running_transparent_proxy

CLIENT = "10.200.1.2"
REPORT_CLIENT = "10.200.1.3"
ROUTER_CLIENT_SIDE = Topology.ROUTER_V4
ORIGIN = "203.0.113.10"
WRONG_IP = "203.0.113.66"
DNS_IP = "203.0.113.53"
OTHER_PORT = 2222

DOCUMENT = {
    "policies": [
        {"name": "apps", "clients": [f"{CLIENT}/32"], "allow": ["allowed.test", ".wild.test"],
         "deny": ["blocked.wild.test"]},
        {"name": "watch", "clients": [f"{REPORT_CLIENT}/32"], "mode": "report", "allow": ["allowed.test"]},
    ]
}


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    topo = Topology("v4", [CLIENT, REPORT_CLIENT], [ORIGIN, WRONG_IP, DNS_IP])
    yield topo
    topo.close()


@pytest.fixture(scope="module")
def origins(topology: Topology, ca: TestCA) -> Iterator[dict[str, Any]]:
    names = ["allowed.test", "wild.test", "*.wild.test"]
    dns = DnsServer({"allowed.test": [ORIGIN], "wild.test": [ORIGIN]}, host=DNS_IP, port=53)
    dns.set_wildcard("wild.test", [ORIGIN])
    with serving(topology.internet, {
        "dns": dns,
        "http": HttpOrigin(ORIGIN, 80, name="internet-http"),
        "tls": TlsOrigin(ORIGIN, 443, ca, names, name="internet-tls"),
        "wrong_http": HttpOrigin(WRONG_IP, 80, name="wrong-http"),
        "wrong_tls": TlsOrigin(WRONG_IP, 443, ca, names, name="wrong-tls"),
        "other_port": RawTcpServer(ORIGIN, OTHER_PORT, banner=b"SSH-2.0-origin\r\n"),
    }) as servers:
        yield servers


@pytest.fixture(scope="module")
def transparent_proxy(topology: Topology, origins: dict[str, Any], public_tmp: Path) -> Iterator[NamespacedProxy]:
    with running_transparent_proxy(topology.router, public_tmp / "transparent-state",
                                   public_tmp / "transparent-policies.json", DOCUMENT,
                                   {"EGRESS_DNS_SERVERS": DNS_IP, "EGRESS_CLIENT_CIDRS": "10.200.1.0/24"}) as runner:
        yield runner

def client_curl(topology: Topology, *args: str, source: str = CLIENT, timeout: float = 10
                ) -> tuple[int, str, str]:
    """curl in the client namespace with no proxy setting (netns.curl_in)."""
    return curl_in(topology.client, source, *args, timeout=timeout)


# --- allowed traffic ---------------------------------------------------------------------------------------------


def test_http_to_an_allowed_name_with_no_proxy_setting(topology: Topology, origins: dict[str, Any],
                                                      transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    code, out, err = client_curl(topology, "--resolve", f"allowed.test:80:{ORIGIN}", "http://allowed.test/t-http")
    assert code == 0, err
    assert "path=/t-http" in out and "internet-http" in out
    line = transparent_proxy.access(start=mark, host="allowed.test")
    assert line["decision"] == "allowed" and line["mode"] == "intercept" and line["client_ip"] == CLIENT
    assert line["policy"] == "apps"


def test_https_to_an_allowed_name_with_no_proxy_setting(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                                       transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    code, out, err = client_curl(topology, "--cacert", str(ca.ca_path), "--resolve", f"allowed.test:443:{ORIGIN}",
                                 "https://allowed.test/t-https")
    assert code == 0, err
    assert "path=/t-https" in out and "internet-tls" in out
    line = transparent_proxy.access(start=mark, sni="allowed.test")
    assert line["decision"] == "allowed" and line["mode"] == "intercept" and line["policy"] == "apps"


def test_explicit_port_keeps_working_beside_the_intercept_ports(topology: Topology, origins: dict[str, Any],
                                                               transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    code, out, err = client_curl(topology, "--proxy", f"http://{ROUTER_CLIENT_SIDE}:3128", "http://allowed.test/t-explicit")
    assert code == 0, err
    assert "path=/t-explicit" in out
    line = transparent_proxy.access(start=mark, host="allowed.test")
    assert line["decision"] == "allowed" and line["mode"] == "explicit"


# --- refusals -----------------------------------------------------------------------------------------------------


def test_http_to_a_name_off_the_list_is_refused(topology: Topology, origins: dict[str, Any],
                                               transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    origins["dns"].set("other.test", [ORIGIN])
    code, out, err = client_curl(topology, "-o", "/dev/null", "-w", "%{http_code}", "--resolve",
                                 f"other.test:80:{ORIGIN}", "http://other.test/t-refused")
    assert code == 0 and out == "403", err
    line = transparent_proxy.access(start=mark, host="other.test")
    assert line["reason"] == "domain_not_allowlisted" and line["mode"] == "intercept"
    assert "/t-refused" not in origins["http"].paths()


def test_https_to_a_denied_name_is_refused(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                          transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    origins["dns"].set("blocked.wild.test", [ORIGIN])
    code, _, _ = client_curl(topology, "--cacert", str(ca.ca_path), "--resolve",
                             f"blocked.wild.test:443:{ORIGIN}", "https://blocked.wild.test/t-denied")
    assert code != 0
    line = transparent_proxy.access(start=mark, sni="blocked.wild.test")
    assert line["reason"] == "domain_denied" and line["decision"] == "denied" and line["mode"] == "intercept"
    assert "blocked.wild.test" not in origins["tls"].snis


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_allowed_name_sent_to_another_ip_is_refused(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                                      transparent_proxy: NamespacedProxy, scheme: str) -> None:
    """The client resolves allowed.test to an IP that allowed.test's DNS does not return: the Host or SNI passes
    the name check, but the destination is not that name's. Squid's host forgery check refuses it, and the wrong
    IP receives nothing."""
    mark = transparent_proxy.mark()
    port = 80 if scheme == "http" else 443
    code, out, err = client_curl(topology, "--cacert", str(ca.ca_path), "-o", "/dev/null", "-w", "%{http_code}",
                                 "--resolve", f"allowed.test:{port}:{WRONG_IP}", f"{scheme}://allowed.test/t-forged")
    if scheme == "http":
        assert code == 0 and out == "409", err
    else:
        assert code != 0  # a plaintext 409 where the client expected TLS
    line = transparent_proxy.access(start=mark, reason="host_header_forgery")
    assert line["decision"] == "denied" and line["mode"] == "intercept" and line["client_ip"] == CLIENT
    wrong = origins["wrong_http"] if scheme == "http" else origins["wrong_tls"]
    assert wrong.requests == [] and getattr(wrong, "snis", []) == []


def test_other_ports_are_dropped_and_counted(topology: Topology, origins: dict[str, Any],
                                            transparent_proxy: NamespacedProxy) -> None:
    before = topology.dropped()
    code, _, err = client_curl(topology, f"telnet://{ORIGIN}:{OTHER_PORT}", timeout=2)
    assert code == 28, err  # curl: timed out; a drop sends no reset
    assert topology.dropped() > before
    assert origins["other_port"].connections == 0


def test_quic_is_dropped(topology: Topology, origins: dict[str, Any], transparent_proxy: NamespacedProxy) -> None:
    with topology.internet.entered():
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((ORIGIN, 443))
    received: list[bytes] = []
    stop = threading.Event()

    def listen() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                received.append(listener.recv(2048))
            except TimeoutError:
                continue

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        before = topology.dropped()
        send = f"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{CLIENT}', 0)); " \
               f"[s.sendto(b'quic-initial', ('{ORIGIN}', 443)) for _ in range(5)]"
        topology.client.run("python3", "-c", send)
        # Each datagram has passed the router (counted dropped) by the time the counter shows all five.
        assert _eventually(lambda: topology.dropped() >= before + 5)
        assert received == []
    finally:
        stop.set()
        thread.join()
        listener.close()


def _eventually(predicate: Any, attempts: int = 200) -> bool:
    import time

    for _ in range(attempts):
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_intercept_ports_cannot_be_dialled_directly(topology: Topology, transparent_proxy: NamespacedProxy) -> None:
    """Only redirected connections reach the intercept ports: a direct dial has no original destination (Squid
    would take its own address for it)."""
    before = topology.dropped()
    code, _, err = client_curl(topology, f"http://{ROUTER_CLIENT_SIDE}:3129/", timeout=2)
    assert code == 28, err
    assert topology.dropped() > before


def test_ip_literal_tls_without_sni_is_refused(topology: Topology, origins: dict[str, Any],
                                              transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    code, _, _ = client_curl(topology, "-k", f"https://{ORIGIN}/t-no-sni")  # curl sends no SNI for an IP
    assert code != 0
    line = transparent_proxy.access(start=mark, client_ip=CLIENT, reason="sni_missing")
    assert line["mode"] == "intercept" and line["decision"] == "denied"
    assert "/t-no-sni" not in origins["tls"].paths()


def test_strict_host_check_leaves_the_explicit_port_as_it_was(
        topology: Topology, origins: dict[str, Any], transparent_proxy: NamespacedProxy) -> None:
    """host_verify_strict is global in Squid 5.7, but on the explicit port a request whose Host header names another
    host than its URL is treated as before (as with transparent mode off): the URL decides, and the origin gets
    the URL's host in its Host header. No 409, and no way to smuggle another Host to an allowed origin."""
    mark = transparent_proxy.mark()
    with topology.client.entered():
        sock = socket.create_connection((ROUTER_CLIENT_SIDE, 3128), timeout=10)
    with sock:
        status, body = _get(sock, "other.test", "http://allowed.test/t-explicit-host")
    assert status == 200 and b"path=/t-explicit-host host=allowed.test" in body
    line = transparent_proxy.access(start=mark, host="allowed.test")
    assert line["mode"] == "explicit" and line["decision"] == "allowed"


# --- report mode ---------------------------------------------------------------------------------------------------


def test_report_mode_lets_intercepted_traffic_through_and_logs_would_deny(
        topology: Topology, origins: dict[str, Any], ca: TestCA, transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    code, out, err = client_curl(topology, "--resolve", f"watched.wild.test:80:{ORIGIN}",
                                 "http://watched.wild.test/t-report-http", source=REPORT_CLIENT)
    assert code == 0 and "path=/t-report-http" in out, err
    line = transparent_proxy.access(start=mark, host="watched.wild.test")
    assert line["decision"] == "would_deny" and line["reason"] == "domain_not_allowlisted"
    assert line["mode"] == "intercept" and line["policy"] == "watch"

    code, out, err = client_curl(topology, "--cacert", str(ca.ca_path), "--resolve", f"watched.wild.test:443:{ORIGIN}",
                                 "https://watched.wild.test/t-report-https", source=REPORT_CLIENT)
    assert code == 0 and "path=/t-report-https" in out, err
    line = transparent_proxy.access(start=mark, sni="watched.wild.test", squid_status="TCP_TUNNEL")
    assert line["decision"] == "would_deny" and line["reason"] == "sni_not_allowlisted" and line["policy"] == "watch"


def test_report_mode_does_not_relax_the_destination_check(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                                         transparent_proxy: NamespacedProxy) -> None:
    mark = transparent_proxy.mark()
    code, _, _ = client_curl(topology, "--cacert", str(ca.ca_path), "--resolve", f"allowed.test:443:{WRONG_IP}",
                             "https://allowed.test/t-report-forged", source=REPORT_CLIENT)
    assert code != 0
    line = transparent_proxy.access(start=mark, client_ip=REPORT_CLIENT, reason="host_header_forgery")
    assert line["decision"] == "denied"
    assert origins["wrong_tls"].snis == []


# --- reload ----------------------------------------------------------------------------------------------------------


def _get(sock: socket.socket, host: str, path: str) -> tuple[int, bytes]:
    from harness import http_get_over

    return http_get_over(sock, host, path)


def test_reload_during_intercepted_traffic_drops_nothing(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                                        transparent_proxy: NamespacedProxy, public_tmp: Path) -> None:
    """Open intercepted connections (a TLS tunnel, an HTTP keep-alive connection, a streaming response) and a
    stream of new intercepted connections, while the policy document changes three times."""
    import ssl

    policy_file = public_tmp / "transparent-policies.json"
    with topology.client.entered():  # these sockets live in the client namespace
        tunnel = socket.create_connection((ORIGIN, 443), timeout=10)
        keepalive = socket.create_connection((ORIGIN, 80), timeout=10)
        stream = socket.create_connection((ORIGIN, 80), timeout=10)
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    tls = context.wrap_socket(tunnel, server_hostname="allowed.test")
    assert _get(tls, "allowed.test", "/reload-tunnel-0")[0] == 200
    assert _get(keepalive, "allowed.test", "/reload-keepalive-0")[0] == 200
    stream.sendall(b"GET /stream/4 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    received = stream.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")

    outcomes: list[str] = []
    stop = threading.Event()

    def new_connections() -> None:
        with topology.client.entered():
            while not stop.is_set():
                try:
                    with socket.create_connection((ORIGIN, 80), timeout=10) as sock:
                        status, _ = _get(sock, "allowed.test", "/reload-probe")
                        outcomes.append(str(status))
                except OSError as exc:
                    outcomes.append(repr(exc))

    prober = threading.Thread(target=new_connections, daemon=True)
    prober.start()
    try:
        for index in range(1, 4):
            mark = transparent_proxy.mark()
            document = json.loads(json.dumps(DOCUMENT))
            document["policies"][0]["allow"].append(f"reload{index}.test")
            write_allowlist(policy_file, json.dumps(document))
            record = transparent_proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)
            assert record["confirmed"] is True, record
            assert _get(tls, "allowed.test", f"/reload-tunnel-{index}")[0] == 200
    finally:
        stop.set()
        prober.join()
    # The last document applies to intercepted traffic: its new name passes.
    origins["dns"].set("reload3.test", [ORIGIN])
    code, out, err = client_curl(topology, "--resolve", f"reload3.test:80:{ORIGIN}", "http://reload3.test/after")
    assert code == 0 and "path=/after" in out, err

    assert _get(keepalive, "allowed.test", "/reload-keepalive-1")[0] == 200
    while not received.endswith(b"tick %06d\n" % 19):
        chunk = stream.recv(65536)
        assert chunk, f"stream cut after {len(received)} bytes"
        received += chunk
    assert outcomes and set(outcomes) == {"200"}, outcomes
    tunnel_ports = {r["client"][1] for r in origins["tls"].requests if str(r["path"]).startswith("/reload-tunnel-")}
    assert len(tunnel_ports) == 1  # one tunnel throughout
    for sock in (tls, keepalive, stream):
        sock.close()
    write_allowlist(policy_file, json.dumps(DOCUMENT))


# --- real clients with no proxy setting ------------------------------------------------------------------------------


def _client_with_hosts(topology: Topology, tmp_path: Path, *command: str) -> None:
    """Run ``command`` in the client namespace with allowed.test in /etc/hosts (a private mount namespace): pip and
    git resolve names themselves and have no --resolve. No proxy variable is set."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{ORIGIN} allowed.test\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)}
    topology.client.run("unshare", "--mount", "--", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "sh",
                        *command, check=False, env=env, timeout=60)


@pytest.mark.parametrize("client", ["pip", "git"])
def test_pip_and_git_reach_an_allowed_origin_with_no_proxy_setting(
        topology: Topology, origins: dict[str, Any], ca: TestCA, transparent_proxy: NamespacedProxy,
        tmp_path: Path, client: str) -> None:
    """The origin is no package index or git server, so the clients fail after their first request; what counts is
    that the request reached the origin through the intercept port, as the client sent it."""
    import sys

    mark = transparent_proxy.mark()
    if client == "pip":
        _client_with_hosts(topology, tmp_path, sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                           "--retries", "0", "--cert", str(ca.ca_path), "--index-url", "https://allowed.test/simple/",
                           "-d", str(tmp_path), "egress-probe")
        path, agent = "/simple/egress-probe/", "pip/"
    else:
        _client_with_hosts(topology, tmp_path, "git", "-c", f"http.sslCAInfo={ca.ca_path}", "ls-remote",
                           "https://allowed.test/probe.git")
        path, agent = "/probe.git/info/refs?service=git-upload-pack", "git/"
    seen = [r for r in origins["tls"].requests if r["path"] == path]
    assert seen and seen[0]["headers"].get("User-Agent", "").startswith(agent), origins["tls"].requests[-3:]
    line = transparent_proxy.access(start=mark, sni="allowed.test", client_ip=CLIENT)
    assert line["mode"] == "intercept" and line["decision"] == "allowed"
