"""Clients by AWS identity against real Squid, the real supervisor, moto_server (EC2 ENIs, security groups, tags
through AWS_ENDPOINT_URL) and the ECS stand-in (ecs_standin.py says why). Clients bind to their ENI's address
(127.0.10.x, local inside the test's network namespace), so the proxy sees them as AWS would.

Timing: polls every EGRESS_IDENTITY_REFRESH=2 s, Squid caches answers EGRESS_IDENTITY_TTL=1 s; a departed client
must be refused within 2 + 1 s (plus one poll's own duration: DEPARTURE_BOUND below). Waits are on log lines, or on
the answers themselves (each request is a round trip through Squid), never on sleeps."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MotoServer, MotoVpc, curl
from ecs_standin import EcsStandIn
from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, free_port, proxy_get
from proxy_runner import ProxyRunner
from tls_hello import closed_without_data, send_hello, with_server_names

SETTLING_URL = "http://settling.wild.test/settling"  # a host no other request uses
REFRESH = 2
TTL = 1
DEPARTURE_BOUND = REFRESH + TTL + 5  # the documented bound, plus a poll's duration and this busy machine's slack


class Aws(MotoVpc):
    """The test's own moto_server (the API-failure test stops it) and its VPC on 127.0.0.0/16."""

    def __init__(self, moto: MotoServer) -> None:
        super().__init__(moto, "127.0.0.0/16", "127.0.10.0/24")
        self.payments = self.group("payments")
        self.data = self.group("data")
        self.elsewhere = self.group("elsewhere")  # in no policy


@pytest.fixture(scope="module")
def aws() -> Iterator[Aws]:
    server = MotoServer(free_port())
    server.start()
    yield Aws(server)
    server.stop()


@pytest.fixture(scope="module")
def ecs() -> Iterator[EcsStandIn]:
    standin = EcsStandIn().start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def identity_proxy(public_tmp: Path, aws: Aws, ecs: EcsStandIn, dns: DnsServer, http_origin: HttpOrigin,
                   tls_origin: TlsOrigin, internal_origin: HttpOrigin) -> Iterator[ProxyRunner]:
    document = {"policies": [
        {"name": "payments", "clients": [aws.payments], "allow": ["allowed.test", "internal.test"]},
        {"name": "data", "clients": [aws.data, "ecs:prod/etl"], "mode": "report", "allow": ["a.wild.test"]},
        {"name": "tagged", "clients": ["tag:team=ml"], "allow": ["b.wild.test"]},
        {"name": "local", "clients": ["127.0.0.1/32"], "allow": ["c.wild.test"]},
    ]}
    policy_file = public_tmp / "identity-policies.json"
    policy_file.write_text(json.dumps(document))
    runner = ProxyRunner(public_tmp / "state-identity", {
        **aws.moto.env,
        "AWS_ENDPOINT_URL_ECS": ecs.endpoint,
        "EGRESS_ALLOWLIST_FILE": str(policy_file),
        "EGRESS_DNS_SERVERS": "127.0.0.1",
        "EGRESS_ALLOW_DESTINATIONS": "127.0.0.2/32",
        "EGRESS_CLIENT_CIDRS": "127.0.0.0/8",
        "EGRESS_IDENTITY_REFRESH": str(REFRESH),
        "EGRESS_IDENTITY_TTL": str(TTL),
    }, port=free_port())
    runner.start()
    yield runner
    runner.stop()


def _hits(origin: HttpOrigin, path: str) -> int:
    return sum(1 for r in origin.requests if r["path"] == path)


def _after_change(proxy: ProxyRunner, start: int, selector: str, address: str, change: str, source: str,
                  url: str) -> list[dict[str, Any]]:
    """Wait (at most DEPARTURE_BOUND s) for the poll that logs ``address`` ``change``d ('added'/'removed') for
    ``selector``; keep requesting until every Squid worker's cached answer from before it has expired
    (EGRESS_IDENTITY_TTL, paced by the round trips themselves); then return the access records of four more
    requests (enough to reach both workers)."""
    proxy.wait_for(lambda r: r.get("event") == "identity_membership_changed" and r.get("selector") == selector
                   and address in r.get(change, []), start=start, timeout=DEPARTURE_BOUND)
    expired = time.monotonic() + TTL + 0.5
    while time.monotonic() < expired:
        proxy_get(proxy.address, source, SETTLING_URL)
    host = url.split("/")[2]
    mark = proxy.mark()
    for _ in range(4):
        proxy_get(proxy.address, source, url)
    # Access lines may trail the responses (Squid's logger is asynchronous): match them by client and host.
    proxy.wait_for(lambda _: len(_lines(proxy, mark, source, host)) >= 4, start=mark)
    return _lines(proxy, mark, source, host)


def _lines(proxy: ProxyRunner, start: int, source: str, host: str) -> list[dict[str, Any]]:
    return [r for r in proxy.records[start:]
            if r.get("type") == "access" and r.get("client_ip") == source and r.get("host") == host]


def test_a_new_eni_gets_its_groups_policy_on_its_first_request(
        identity_proxy: ProxyRunner, aws: Aws, http_origin: HttpOrigin) -> None:
    aws.eni("127.0.10.11", aws.payments)
    mark = identity_proxy.mark()
    status, _, _ = proxy_get(identity_proxy.address, "127.0.10.11", "http://allowed.test/first-request")
    assert status == 200
    record = identity_proxy.access(mark, client_ip="127.0.10.11", host="allowed.test")
    assert (record["policy"], record["client_identity"], record["decision"]) == ("payments", aws.payments, "allowed")
    status, head, _ = proxy_get(identity_proxy.address, "127.0.10.11", "http://a.wild.test/first-request")
    assert status == 403 and b"X-Egress-Policy: payments" in head
    assert _hits(http_origin, "/first-request") == 1


def test_an_address_in_no_selector_is_refused(identity_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    mark = identity_proxy.mark()
    status, head, _ = proxy_get(identity_proxy.address, "127.0.10.99", "http://allowed.test/stranger")
    assert status == 403 and b"X-Egress-Reason: client_not_allowed" in head
    assert identity_proxy.access(mark, client_ip="127.0.10.99", host="allowed.test")["policy"] is None
    assert _hits(http_origin, "/stranger") == 0


def test_cidr_and_tag_selectors_in_the_same_document(identity_proxy: ProxyRunner, aws: Aws) -> None:
    mark = identity_proxy.mark()
    assert proxy_get(identity_proxy.address, "127.0.0.1", "http://c.wild.test/cidr")[0] == 200
    assert identity_proxy.access(mark, client_ip="127.0.0.1", host="c.wild.test")["client_identity"] == "127.0.0.1/32"
    aws.eni("127.0.10.31", aws.elsewhere, tags={"team": "ml"})
    mark = identity_proxy.mark()
    assert proxy_get(identity_proxy.address, "127.0.10.31", "http://b.wild.test/tag")[0] == 200
    record = identity_proxy.access(mark, client_ip="127.0.10.31", host="b.wild.test")
    assert (record["policy"], record["client_identity"]) == ("tagged", "tag:team=ml")


def test_an_eni_leaving_its_group_is_refused_within_the_documented_time(
        identity_proxy: ProxyRunner, aws: Aws, http_origin: HttpOrigin) -> None:
    eni = aws.eni("127.0.10.12", aws.payments)
    assert proxy_get(identity_proxy.address, "127.0.10.12", "http://allowed.test/leaving")[0] == 200
    mark = identity_proxy.mark()
    aws.ec2.modify_network_interface_attribute(NetworkInterfaceId=eni, Groups=[aws.elsewhere])
    records = _after_change(identity_proxy, mark, aws.payments, "127.0.10.12", "removed", "127.0.10.12",
                            "http://allowed.test/left")
    assert {(r["reason"], r["policy"]) for r in records} == {("client_not_allowed", None)}
    assert _hits(http_origin, "/left") == 0  # refused: none of them reached the origin


def test_a_reused_address_takes_the_new_groups_policy(identity_proxy: ProxyRunner, aws: Aws) -> None:
    old = aws.eni("127.0.10.13", aws.payments)
    assert proxy_get(identity_proxy.address, "127.0.10.13", "http://allowed.test/reused")[0] == 200
    mark = identity_proxy.mark()
    aws.ec2.delete_network_interface(NetworkInterfaceId=old)
    aws.eni("127.0.10.13", aws.data)
    records = _after_change(identity_proxy, mark, aws.payments, "127.0.10.13", "removed", "127.0.10.13",
                            "http://a.wild.test/reused")
    assert {(r["policy"], r["client_identity"], r["decision"]) for r in records} == {("data", aws.data, "allowed")}
    # Once moved, never back: the old identity is not carried over.
    mark = identity_proxy.mark()
    assert proxy_get(identity_proxy.address, "127.0.10.13", "http://allowed.test/reused")[0] == 200  # report mode
    record = identity_proxy.access(mark, client_ip="127.0.10.13", host="allowed.test")
    assert (record["policy"], record["decision"]) == ("data", "would_deny")


def test_ecs_service_tasks_by_their_eni_address(identity_proxy: ProxyRunner, ecs: EcsStandIn) -> None:
    ecs.set_tasks("prod", "etl", {"task1": "127.0.10.21", "bridge1": None})
    mark = identity_proxy.mark()
    assert proxy_get(identity_proxy.address, "127.0.10.21", "http://a.wild.test/ecs")[0] == 200
    record = identity_proxy.access(mark, client_ip="127.0.10.21", host="a.wild.test")
    assert (record["policy"], record["client_identity"]) == ("data", "ecs:prod/etl")
    identity_proxy.wait_for(lambda r: r.get("event") == "identity_ecs_not_awsvpc", start=0,
                            timeout=DEPARTURE_BOUND)
    mark = identity_proxy.mark()
    ecs.set_tasks("prod", "etl", {})  # scaled in
    records = _after_change(identity_proxy, mark, "ecs:prod/etl", "127.0.10.21", "removed", "127.0.10.21",
                            "http://a.wild.test/ecs")
    assert {r["reason"] for r in records} == {"client_not_allowed"}


def test_report_mode_ssrf_and_sni_checks_hold_for_identity_policies(
        identity_proxy: ProxyRunner, aws: Aws, http_origin: HttpOrigin, ca: TestCA) -> None:
    aws.eni("127.0.10.41", aws.data)  # data: report mode
    aws.eni("127.0.10.42", aws.payments)  # payments: enforce
    mark = identity_proxy.mark()
    assert proxy_get(identity_proxy.address, "127.0.10.41", "http://allowed.test/report")[0] == 200
    record = identity_proxy.access(mark, client_ip="127.0.10.41", host="allowed.test")
    assert (record["decision"], record["reason"], record["policy"]) == ("would_deny", "domain_not_allowlisted", "data")
    assert _hits(http_origin, "/report") == 1
    # SSRF: an allowlisted name that resolves to a private address is refused in every mode.
    status, head, _ = proxy_get(identity_proxy.address, "127.0.10.42", "http://internal.test/ssrf")
    assert status == 403 and b"X-Egress-Reason: destination_not_public" in head
    # SNI: a tunnel to an allowed name whose ClientHello names another host is refused, for an identity policy.
    mark = identity_proxy.mark()
    sock = send_hello((identity_proxy.host, identity_proxy.port), "allowed.test",
                      with_server_names([b"c.wild.test"]), source="127.0.10.42")
    with sock:
        assert closed_without_data(sock)
    record = identity_proxy.access(mark, client_ip="127.0.10.42", reason="sni_not_allowlisted")
    assert (record["policy"], record["client_identity"]) == ("payments", aws.payments)
    # An allowed tunnel's own log line (written when it closes) names the identity too.
    mark = identity_proxy.mark()
    result = curl("--interface", "127.0.10.42", "-x", identity_proxy.proxy_url, "--cacert", str(ca.ca_path),
                  "-o", "/dev/null", "-w", "%{http_code}", "https://allowed.test/tunnel")
    assert result.stdout == "200", result.stderr
    record = identity_proxy.access(mark, client_ip="127.0.10.42", method="CONNECT", decision="allowed")
    assert (record["policy"], record["client_identity"]) == ("payments", aws.payments)


def test_an_aws_outage_keeps_the_last_known_membership(
        identity_proxy: ProxyRunner, aws: Aws, http_origin: HttpOrigin) -> None:
    """Last in the module: it stops this module's moto_server for good."""
    aws.eni("127.0.10.51", aws.payments)
    assert proxy_get(identity_proxy.address, "127.0.10.51", "http://allowed.test/outage")[0] == 200
    identity_proxy.wait_for(lambda r: r.get("event") == "identity_membership_changed"
                            and "127.0.10.51" in r.get("added", []), timeout=DEPARTURE_BOUND)
    mark = identity_proxy.mark()
    aws.moto.stop()
    identity_proxy.wait_for(lambda r: r.get("event") == "identity_refresh_failed", start=mark, timeout=30)
    # Past Squid's cache of the last answer (EGRESS_IDENTITY_TTL), the helper still answers from the table.
    until = time.monotonic() + TTL + 1
    while time.monotonic() < until:
        status, _, _ = proxy_get(identity_proxy.address, "127.0.10.51", "http://allowed.test/outage")
        assert status == 200
    failures = [r for r in identity_proxy.records[mark:] if r.get("event") == "identity_refresh_failed"]
    assert len(failures) == 1  # logged once per change, not once per poll
