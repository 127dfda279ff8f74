"""Policies that name clients by security group, in transparent mode: real Squid, real nftables, the real
supervisor with its identity helper, moto_server (EC2 ENIs and security groups through AWS_ENDPOINT_URL), and curl
with no proxy setting in network namespaces this module creates (netns.RoutedTopology):

    client ns                                    router ns (the "EC2 instance")         internet ns
    10.200.1.2, fd00:c1::2  ENI in sg payments    egress-proxy run, nft ruleset          203.0.113.10, fd00:203::10
    10.200.1.3              ENI in sg data        moto_server on its loopback             (pay.test, data.test)
    10.200.1.9              no ENI                                                         203.0.113.53  the DNS

An intercepted connection's client address is the one the ENI has, so the identity helper (keyed on Squid's %>a)
finds its security group as it does for an explicit client. moto 5.2.5 answers DescribeNetworkInterfaces with the
``ipv6-addresses.ipv6-address`` filter (the on-demand lookup of an IPv6 client no poll has seen) with a 500, so the
fixture waits until the poll (by ``group-id``, which moto serves with the ENIs' IPv6 addresses) has found every
client before the tests run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MotoServer, MotoVpc
from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, free_port
from netns import RoutedTopology as Topology
from netns import curl_in, serving
from proxy_runner import NamespacedProxy, running_transparent_proxy

PAYMENTS_CLIENT = "10.200.1.2"
PAYMENTS_CLIENT_V6 = "fd00:c1::2"
DATA_CLIENT = "10.200.1.3"
STRANGER = "10.200.1.9"  # in EGRESS_CLIENT_CIDRS, no ENI
ORIGIN = "203.0.113.10"
ORIGIN_V6 = "fd00:203::10"
DNS_IP = "203.0.113.53"
NAMES = ["pay.test", "data.test"]


class Aws(MotoVpc):
    """The VPC of the client subnet, in a moto_server on the router's loopback (where the proxy calls it)."""

    def __init__(self, moto: MotoServer) -> None:
        super().__init__(moto, "10.200.0.0/16", "10.200.1.0/24", "fd00:c1::/64")
        self.payments = self.group("payments")
        self.data = self.group("data")
        self.eni(PAYMENTS_CLIENT, self.payments, ipv6=PAYMENTS_CLIENT_V6)
        self.eni(DATA_CLIENT, self.data)


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    topo = Topology("identity", [PAYMENTS_CLIENT, DATA_CLIENT, STRANGER, PAYMENTS_CLIENT_V6],
                    [ORIGIN, ORIGIN_V6, DNS_IP])
    yield topo
    topo.close()


@pytest.fixture(scope="module")
def aws(topology: Topology) -> Iterator[Aws]:
    server = MotoServer(free_port(), namespace=topology.router)
    server.start()
    with topology.router.entered():  # boto3 opens its connections to moto_server inside the router namespace
        yield Aws(server)
    server.stop()


@pytest.fixture(scope="module")
def origins(topology: Topology, ca: TestCA) -> Iterator[dict[str, Any]]:
    with serving(topology.internet, {
        "dns": DnsServer({name: [ORIGIN, ORIGIN_V6] for name in NAMES}, host=DNS_IP, port=53),
        "http": HttpOrigin(ORIGIN, 80, name="id-http"),
        "tls": TlsOrigin(ORIGIN, 443, ca, NAMES, name="id-tls"),
        "http_v6": HttpOrigin(ORIGIN_V6, 80, name="id-http-v6"),
        "tls_v6": TlsOrigin(ORIGIN_V6, 443, ca, NAMES, name="id-tls-v6"),
    }) as servers:
        yield servers


@pytest.fixture(scope="module")
def proxy(topology: Topology, aws: Aws, origins: dict[str, Any], public_tmp: Path) -> Iterator[NamespacedProxy]:
    document = {"policies": [
        {"name": "payments", "clients": [aws.payments], "allow": ["pay.test"]},
        {"name": "data", "clients": [aws.data], "allow": ["data.test"]},
    ]}
    env = {
        **aws.moto.env,
        "EGRESS_DNS_SERVERS": DNS_IP,
        "EGRESS_CLIENT_CIDRS": "10.200.1.0/24,fd00:c1::/64",
        "EGRESS_ALLOW_DESTINATIONS": "fd00:203::/64",  # stands for public IPv6 space
        "EGRESS_IDENTITY_REFRESH": "2",
        "EGRESS_IDENTITY_TTL": "1",
    }
    with running_transparent_proxy(topology.router, public_tmp / "transparent-identity-state",
                                   public_tmp / "transparent-identity-policies.json", document, env) as runner:
        for group, address in ((aws.payments, PAYMENTS_CLIENT), (aws.payments, PAYMENTS_CLIENT_V6),
                               (aws.data, DATA_CLIENT)):
            runner.wait_for(lambda r, g=group, a=address: r.get("event") == "identity_membership_changed"
                            and r.get("selector") == g and a in r.get("added", []), timeout=30)
        yield runner

def fetch(topology: Topology, ca: TestCA, source: str, scheme: str, name: str, path: str) -> tuple[int, str]:
    """curl ``scheme://name/path`` from ``source`` with no proxy setting, to the origin of ``source``'s family:
    (exit code, HTTP status)."""
    port = 80 if scheme == "http" else 443
    address = f"[{ORIGIN_V6}]" if ":" in source else ORIGIN
    code, out, _ = curl_in(topology.client, source, "--cacert", str(ca.ca_path), "-o", "/dev/null", "-w",
                           "%{http_code}", "--resolve", f"{name}:{port}:{address}", f"{scheme}://{name}{path}")
    return code, out


def origin_paths(origins: dict[str, Any], source: str, scheme: str) -> list[str]:
    key = ("http" if scheme == "http" else "tls") + ("_v6" if ":" in source else "")
    return [str(path) for path in origins[key].paths()]


CASES = [(PAYMENTS_CLIENT, "payments", "pay.test", "data.test"),
         (PAYMENTS_CLIENT_V6, "payments", "pay.test", "data.test"),
         (DATA_CLIENT, "data", "data.test", "pay.test")]


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize(("source", "policy", "own", "others"), CASES)
def test_an_intercepted_client_gets_its_security_groups_policy(
        topology: Topology, aws: Aws, origins: dict[str, Any], ca: TestCA, proxy: NamespacedProxy,
        scheme: str, source: str, policy: str, own: str, others: str) -> None:
    group = aws.payments if policy == "payments" else aws.data
    path = f"/id-{scheme}-{source.replace(':', '-')}"
    mark = proxy.mark()
    assert fetch(topology, ca, source, scheme, own, f"{path}-own") == (0, "200")
    line = proxy.access(start=mark, client_ip=source, **({"host": own} if scheme == "http" else {"sni": own}))
    assert (line["decision"], line["mode"], line["policy"], line["client_identity"]) == (
        "allowed", "intercept", policy, group)
    assert f"{path}-own" in origin_paths(origins, source, scheme)

    # A name only the other group's policy allows: refused, by this client's policy, and it never left.
    mark = proxy.mark()
    code, status = fetch(topology, ca, source, scheme, others, f"{path}-other")
    reason = "domain_not_allowlisted" if scheme == "http" else "sni_not_allowlisted"
    if scheme == "http":
        assert (code, status) == (0, "403")
    else:
        assert code != 0
    line = proxy.access(start=mark, client_ip=source, reason=reason)
    assert (line["decision"], line["mode"], line["policy"], line["client_identity"]) == (
        "denied", "intercept", policy, group)
    assert (line["host"] if scheme == "http" else line["sni"]) == others
    assert f"{path}-other" not in origin_paths(origins, source, scheme)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_intercepted_client_in_no_security_group_of_a_policy_is_refused(
        topology: Topology, origins: dict[str, Any], ca: TestCA, proxy: NamespacedProxy, scheme: str) -> None:
    mark = proxy.mark()
    code, status = fetch(topology, ca, STRANGER, scheme, "pay.test", f"/id-stranger-{scheme}")
    if scheme == "http":
        assert (code, status) == (0, "403")
    else:
        assert code != 0
    line = proxy.access(start=mark, client_ip=STRANGER, reason="client_not_allowed")
    assert (line["decision"], line["mode"], line["policy"]) == ("denied", "intercept", None)
    assert f"/id-stranger-{scheme}" not in origin_paths(origins, STRANGER, scheme)
