"""Transparent mode for IPv6 clients and IPv6 origins: real Squid, real nftables (the same ``table inet`` ruleset),
real curl with no proxy setting, in network namespaces this module creates. Only ULA addresses (fd00::/8) that
exist inside those namespaces; nothing leaves them.

    client ns                        router ns (the "EC2 instance")                 internet ns
    fd00:c1::2 (10.200.1.2)          fd00:c1::1 (10.200.1.1) | egress-proxy run      fd00:203::10  allowed6.test
    fd00:c1::9 (in no policy)  ----  nft ruleset from 'egress-proxy nft-rules'  --  fd00:203::66  a "wrong" IP
    default route -> router          IPv6 forwarding on                              fd00:204::10  internal6.test
                                                                                     fd00:203::53  the test's DNS
(netns.RoutedTopology builds it.)

A dual-stack client subnet, as in a dual-stack VPC, with the proxy's default EGRESS_LISTEN_ADDRESS (0.0.0.0): the
explicit port stays IPv4, and the intercept ports must take IPv6 clients too. The origins have AAAA records only.
fd00:203::/64 is exempt from the SSRF guard (EGRESS_ALLOW_DESTINATIONS), standing for public IPv6 space; the rest
of fc00::/7, such as internal6.test's fd00:204::10, stays forbidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DnsServer, HttpOrigin, RawTcpServer, TestCA, TlsOrigin
from netns import RoutedTopology as Topology
from netns import curl_in, serving
from proxy_runner import NamespacedProxy, running_transparent_proxy

CLIENT = "fd00:c1::2"
STRANGER = "fd00:c1::9"  # in EGRESS_CLIENT_CIDRS, in no policy
CLIENT_V4 = "10.200.1.2"
ROUTER_CLIENT_SIDE = Topology.ROUTER_V6
ROUTER_CLIENT_SIDE_V4 = Topology.ROUTER_V4
ORIGIN = "fd00:203::10"
WRONG_IP = "fd00:203::66"
INTERNAL = "fd00:204::10"
DNS_IP = "fd00:203::53"
OTHER_PORT = 2222

DOCUMENT = {"policies": [
    {"name": "v6apps", "clients": [f"{CLIENT}/128", "10.200.1.0/24"], "allow": ["allowed6.test", "internal6.test"]},
]}


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    topo = Topology("v6", [CLIENT, STRANGER, CLIENT_V4], [ORIGIN, WRONG_IP, INTERNAL, DNS_IP])
    yield topo
    topo.close()


@pytest.fixture(scope="module")
def origins(topology: Topology, ca: TestCA) -> Iterator[dict[str, Any]]:
    names = ["allowed6.test", "internal6.test", "other6.test"]
    with serving(topology.internet, {
        "dns": DnsServer({"allowed6.test": [ORIGIN], "internal6.test": [INTERNAL], "other6.test": [ORIGIN]},
                         host=DNS_IP, port=53),
        "http": HttpOrigin(ORIGIN, 80, name="v6-http"),
        "tls": TlsOrigin(ORIGIN, 443, ca, names, name="v6-tls"),
        "wrong_http": HttpOrigin(WRONG_IP, 80, name="wrong-http"),
        "wrong_tls": TlsOrigin(WRONG_IP, 443, ca, names, name="wrong-tls"),
        "internal_http": HttpOrigin(INTERNAL, 80, name="internal-http"),
        "internal_tls": TlsOrigin(INTERNAL, 443, ca, names, name="internal-tls"),
        "other_port": RawTcpServer(ORIGIN, OTHER_PORT, banner=b"SSH-2.0-origin\r\n"),
    }) as servers:
        yield servers


@pytest.fixture(scope="module")
def proxy6(topology: Topology, origins: dict[str, Any], public_tmp: Path) -> Iterator[NamespacedProxy]:
    with running_transparent_proxy(topology.router, public_tmp / "transparent-ipv6-state",
                                   public_tmp / "transparent-ipv6-policies.json", DOCUMENT,
                                   {"EGRESS_DNS_SERVERS": DNS_IP, "EGRESS_CLIENT_CIDRS": "10.200.1.0/24,fd00:c1::/64",
                                    "EGRESS_ALLOW_DESTINATIONS": "fd00:203::/64"}) as runner:
        yield runner

def client_curl(topology: Topology, *args: str, source: str = CLIENT, timeout: float = 10) -> tuple[int, str, str]:
    return curl_in(topology.client, source, *args, timeout=timeout)


def test_http_to_an_allowed_name_over_ipv6(topology: Topology, origins: dict[str, Any],
                                          proxy6: NamespacedProxy) -> None:
    mark = proxy6.mark()
    code, out, err = client_curl(topology, "--resolve", f"allowed6.test:80:[{ORIGIN}]", "http://allowed6.test/v6-http")
    assert code == 0, err
    assert "path=/v6-http" in out and "v6-http" in out
    line = proxy6.access(start=mark, host="allowed6.test")
    assert (line["decision"], line["mode"], line["client_ip"], line["policy"]) == ("allowed", "intercept", CLIENT,
                                                                                   "v6apps")
    # The origin has no A record: Squid's own lookup (for the forgery check and the SSRF guard) went by AAAA.
    assert ("allowed6.test", "AAAA") in origins["dns"].queries


def test_https_to_an_allowed_name_over_ipv6(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                           proxy6: NamespacedProxy) -> None:
    mark = proxy6.mark()
    code, out, err = client_curl(topology, "--cacert", str(ca.ca_path), "--resolve",
                                 f"allowed6.test:443:[{ORIGIN}]", "https://allowed6.test/v6-https")
    assert code == 0, err
    assert "path=/v6-https" in out and "v6-tls" in out
    line = proxy6.access(start=mark, sni="allowed6.test")
    assert (line["decision"], line["mode"], line["client_ip"]) == ("allowed", "intercept", CLIENT)


def refused(topology: Topology, ca: TestCA, scheme: str, name: str, address: str, path: str, status: str,
            source: str = CLIENT) -> None:
    """``scheme://name/path`` sent to ``address`` (the answer the client holds) from ``source`` is refused: over
    HTTP with ``status``; over HTTPS the connection fails (closed, or a plaintext 409 where TLS was expected)."""
    port = 80 if scheme == "http" else 443
    code, out, err = client_curl(topology, "--cacert", str(ca.ca_path), "-o", "/dev/null", "-w", "%{http_code}",
                                 "--resolve", f"{name}:{port}:[{address}]", f"{scheme}://{name}{path}", source=source)
    if scheme == "http":
        assert code == 0 and out == status, err
    else:
        assert code != 0, out


def the_name(line: dict[str, Any], scheme: str) -> str:
    """The name a refused line judged: the Host (HTTP) or the SNI (HTTPS)."""
    return str(line["host"] if scheme == "http" else line["sni"])


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_name_off_the_list_is_refused_over_ipv6(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                                  proxy6: NamespacedProxy, scheme: str) -> None:
    mark = proxy6.mark()
    refused(topology, ca, scheme, "other6.test", ORIGIN, "/v6-refused", "403")
    reason = "domain_not_allowlisted" if scheme == "http" else "sni_not_allowlisted"
    line = proxy6.access(start=mark, client_ip=CLIENT, reason=reason)
    assert (line["decision"], line["mode"], the_name(line, scheme)) == ("denied", "intercept", "other6.test")
    origin = origins["http"] if scheme == "http" else origins["tls"]
    assert "/v6-refused" not in origin.paths() and "other6.test" not in getattr(origin, "snis", [])


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_allowed_name_sent_to_another_ipv6_address_is_refused(
        topology: Topology, origins: dict[str, Any], ca: TestCA, proxy6: NamespacedProxy, scheme: str) -> None:
    """allowed6.test's AAAA is ORIGIN; the client sends it to WRONG_IP. Squid's host forgery check compares the
    IPv6 original destination with the AAAA answers and refuses; WRONG_IP receives nothing."""
    mark = proxy6.mark()
    refused(topology, ca, scheme, "allowed6.test", WRONG_IP, "/v6-forged", "409")
    line = proxy6.access(start=mark, client_ip=CLIENT, reason="host_header_forgery")
    assert (line["decision"], line["mode"], the_name(line, scheme)) == ("denied", "intercept", "allowed6.test")
    wrong = origins["wrong_http"] if scheme == "http" else origins["wrong_tls"]
    assert wrong.requests == [] and getattr(wrong, "snis", []) == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_allowed_name_on_a_forbidden_ipv6_address_is_refused(
        topology: Topology, origins: dict[str, Any], ca: TestCA, proxy6: NamespacedProxy, scheme: str) -> None:
    """internal6.test is allowlisted and its AAAA really is INTERNAL (fd00:204::10, private ULA space): the forgery
    check passes, the SSRF guard refuses, and INTERNAL receives nothing."""
    mark = proxy6.mark()
    refused(topology, ca, scheme, "internal6.test", INTERNAL, "/v6-internal", "403")
    line = proxy6.access(start=mark, client_ip=CLIENT, reason="destination_not_public")
    assert (line["decision"], line["mode"], line["policy"]) == ("denied", "intercept", "v6apps")
    assert the_name(line, scheme) == "internal6.test"
    internal = origins["internal_http"] if scheme == "http" else origins["internal_tls"]
    assert internal.requests == [] and getattr(internal, "snis", []) == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_ipv6_client_in_no_policy_is_refused(topology: Topology, origins: dict[str, Any], ca: TestCA,
                                               proxy6: NamespacedProxy, scheme: str) -> None:
    mark = proxy6.mark()
    refused(topology, ca, scheme, "allowed6.test", ORIGIN, "/v6-stranger", "403", source=STRANGER)
    line = proxy6.access(start=mark, client_ip=STRANGER, reason="client_not_allowed")
    assert (line["decision"], line["mode"], line["policy"]) == ("denied", "intercept", None)
    assert the_name(line, scheme) == "allowed6.test"
    assert "/v6-stranger" not in origins["http" if scheme == "http" else "tls"].paths()


def test_other_ipv6_ports_are_dropped_and_counted(topology: Topology, origins: dict[str, Any],
                                                 proxy6: NamespacedProxy) -> None:
    before = topology.dropped()
    code, _, err = client_curl(topology, f"telnet://[{ORIGIN}]:{OTHER_PORT}", timeout=2)
    assert code == 28, err  # curl: timed out; a drop sends no reset
    assert topology.dropped() > before
    assert origins["other_port"].connections == 0



def test_the_intercept_ports_cannot_be_dialled_directly_over_ipv6(topology: Topology,
                                                                  proxy6: NamespacedProxy) -> None:
    """The ruleset's input chain admits only redirected connections, in both families."""
    before = topology.dropped()
    code, _, err = client_curl(topology, f"http://[{ROUTER_CLIENT_SIDE}]:3129/", timeout=2)
    assert code == 28, err
    assert topology.dropped() > before


def test_ipv6_literal_tls_without_sni_is_refused(topology: Topology, origins: dict[str, Any],
                                                proxy6: NamespacedProxy) -> None:
    mark = proxy6.mark()
    code, _, _ = client_curl(topology, "-k", f"https://[{ORIGIN}]/v6-no-sni")  # curl sends no SNI for an IP
    assert code != 0
    line = proxy6.access(start=mark, client_ip=CLIENT, reason="sni_missing")
    assert (line["mode"], line["decision"]) == ("intercept", "denied")
    assert "/v6-no-sni" not in origins["tls"].paths()
