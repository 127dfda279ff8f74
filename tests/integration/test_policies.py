"""Policy documents against real Squid (issue 14): per-client allow lists, deny over allow, report mode, a client in
no policy, and a bad document keeping the last good one. Clients bind to different loopback source addresses
(127.0.0.10, .11, .12) to land in different policies; curl does it with --interface, raw sockets with bind()."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INTERNAL_IP, ORIGIN_IP, RAW_IP, curl
from harness import (
    DnsServer,
    HttpOrigin,
    RawTcpServer,
    TestCA,
    TlsOrigin,
    connect_tunnel,
    free_port,
    http_get_over,
    proxy_get,
    tls_over_tunnel,
    write_allowlist,
)
from proxy_runner import ProxyRunner
from tls_hello import closed_without_data, send_hello, with_server_names

TEAM = "127.0.0.10"  # policy team-a (enforce)
WATCHED = "127.0.0.11"  # policy watch (report)
STRANGER = "127.0.0.12"  # inside EGRESS_CLIENT_CIDRS, in no policy
LOCAL = "127.0.0.1"  # policy default (enforce)

DOCUMENT: dict[str, Any] = {"policies": [
    {"name": "team-a", "clients": [f"{TEAM}/32"], "allow": [".wild.test"], "deny": ["gist.wild.test"]},
    {"name": "watch", "clients": [f"{WATCHED}/32"], "mode": "report", "allow": ["allowed.test"],
     "deny": ["blocked.wild.test"]},
    {"name": "default", "clients": [f"{LOCAL}/32"], "allow": ["allowed.test"]},
]}


@pytest.fixture(scope="module")
def policy_file(public_tmp: Path) -> Path:
    return public_tmp / "policies.json"


@pytest.fixture(scope="module")
def policy_proxy(public_tmp: Path, policy_file: Path, dns: DnsServer, http_origin: HttpOrigin,
                 tls_origin: TlsOrigin, internal_origin: HttpOrigin, raw_server: RawTcpServer
                 ) -> Iterator[ProxyRunner]:
    policy_file.write_text(json.dumps(DOCUMENT))
    runner = ProxyRunner(
        public_tmp / "state-policies",
        {
            "EGRESS_ALLOWLIST_FILE": str(policy_file),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32,{RAW_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.0/24",
        },
        port=free_port(),
    )
    runner.start()
    yield runner
    runner.stop()


def _https_curl(proxy: ProxyRunner, source: str, url: str, ca: TestCA) -> Any:
    return curl("--interface", source, "-x", proxy.proxy_url, "--cacert", str(ca.ca_path), "-o", "/dev/null",
                "-w", "%{http_code}", url)


def _paths(origin: HttpOrigin, path: str) -> list[str]:
    return [r["host"] for r in origin.requests if r["path"] == path]


# --- per-policy allow lists ------------------------------------------------------------------------------------


def test_each_client_gets_its_own_policy(policy_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    mark = policy_proxy.mark()
    status, _, _ = proxy_get(policy_proxy.address, TEAM, "http://build.wild.test/own-policy")
    assert status == 200
    assert policy_proxy.access(mark, host="build.wild.test", client_ip=TEAM)["policy"] == "team-a"
    # The same name from the default policy's client is not on its list.
    status, head, body = proxy_get(policy_proxy.address, LOCAL, "http://build.wild.test/own-policy")
    assert status == 403 and b"X-Egress-Reason: domain_not_allowlisted" in head
    assert b"X-Egress-Policy: default" in head and b"default" in body  # the page names the policy
    record = policy_proxy.access(mark, host="build.wild.test", client_ip=LOCAL)
    assert record["policy"] == "default" and record["decision"] == "denied"
    # ... and team-a's list does not hold the default policy's name.
    status, head, _ = proxy_get(policy_proxy.address, TEAM, "http://allowed.test/own-policy")
    assert status == 403 and b"X-Egress-Policy: team-a" in head
    assert _paths(http_origin, "/own-policy") == ["build.wild.test"]


# --- deny over allow -------------------------------------------------------------------------------------------


def test_deny_wins_over_allow_for_http(policy_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    mark = policy_proxy.mark()
    status, head, _ = proxy_get(policy_proxy.address, TEAM, "http://gist.wild.test/deny-http")
    assert status == 403 and b"X-Egress-Reason: domain_denied" in head
    record = policy_proxy.access(mark, host="gist.wild.test")
    assert (record["decision"], record["reason"], record["policy"]) == ("denied", "domain_denied", "team-a")
    assert _paths(http_origin, "/deny-http") == []


def test_deny_wins_over_allow_for_connect(policy_proxy: ProxyRunner, tls_origin: TlsOrigin) -> None:
    handshakes = len(tls_origin.snis)
    mark = policy_proxy.mark()
    sock, status, head = connect_tunnel((policy_proxy.host, policy_proxy.port), "gist.wild.test", 443, source=TEAM)
    sock.close()
    assert status == 403, head
    assert b"X-Egress-Reason: domain_denied" in head and b"X-Egress-Policy: team-a" in head
    assert policy_proxy.access(mark, host="gist.wild.test", method="CONNECT")["policy"] == "team-a"
    assert len(tls_origin.snis) == handshakes


def test_deny_wins_over_allow_for_the_sni(policy_proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> None:
    # An allowed CONNECT target fronting a denied name in the SNI.
    handshakes = len(tls_origin.snis)
    mark = policy_proxy.mark()
    sock, status, _ = connect_tunnel((policy_proxy.host, policy_proxy.port), "build.wild.test", 443, source=TEAM)
    assert status == 200
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_over_tunnel(sock, "gist.wild.test", ca.ca_path).close()
    sock.close()
    record = policy_proxy.access(mark, host="build.wild.test", method="CONNECT", reason="domain_denied")
    assert record["decision"] == "denied" and record["policy"] == "team-a" and record["sni"] == "gist.wild.test"
    assert len(tls_origin.snis) == handshakes


def test_allowed_https_through_a_policy(policy_proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> None:
    mark = policy_proxy.mark()
    result = _https_curl(policy_proxy, TEAM, "https://build.wild.test/policy-https", ca)
    assert result.stdout == "200", result.stderr
    record = policy_proxy.access(mark, host="build.wild.test", method="CONNECT")
    assert (record["decision"], record["policy"]) == ("allowed", "team-a")


# --- report mode -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "reason"), [("denied.test", "domain_not_allowlisted"),
                                              ("blocked.wild.test", "domain_denied")])
def test_report_mode_lets_http_through_and_logs_would_deny(policy_proxy: ProxyRunner, http_origin: HttpOrigin,
                                                            host: str, reason: str) -> None:
    mark = policy_proxy.mark()
    status, _, body = proxy_get(policy_proxy.address, WATCHED, f"http://{host}/report-http")
    assert status == 200 and b"hello from http-origin" in body
    record = policy_proxy.access(mark, host=host)
    assert (record["decision"], record["reason"], record["policy"]) == ("would_deny", reason, "watch")
    assert host in _paths(http_origin, "/report-http")


def test_report_mode_lets_https_through_and_logs_would_deny(policy_proxy: ProxyRunner, tls_origin: TlsOrigin,
                                                             ca: TestCA) -> None:
    mark = policy_proxy.mark()
    result = _https_curl(policy_proxy, WATCHED, "https://denied.test/report-https", ca)
    assert result.stdout == "200", result.stderr
    record = policy_proxy.access(mark, host="denied.test", method="CONNECT")
    # The CONNECT target is the first refusal enforce mode would give; the SNI's would come second.
    assert (record["decision"], record["reason"], record["policy"]) == ("would_deny", "domain_not_allowlisted",
                                                                        "watch")
    assert "denied.test" in [r["host"] for r in tls_origin.requests if r["path"] == "/report-https"]


def test_report_mode_logs_a_fronted_sni(policy_proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> None:
    mark = policy_proxy.mark()
    sock, status, _ = connect_tunnel((policy_proxy.host, policy_proxy.port), "allowed.test", 443, source=WATCHED)
    assert status == 200
    with tls_over_tunnel(sock, "denied.test", ca.ca_path) as tls:
        code, _ = http_get_over(tls, "denied.test", "/report-fronted")
    assert code == 200
    record = policy_proxy.access(mark, host="allowed.test", method="CONNECT")
    assert (record["decision"], record["reason"], record["sni"]) == ("would_deny", "sni_not_allowlisted",
                                                                     "denied.test")


@pytest.mark.parametrize("host", ["internal.test", "metadata.test"])
def test_report_mode_never_relaxes_the_ssrf_guard(policy_proxy: ProxyRunner, internal_origin: HttpOrigin,
                                                  host: str) -> None:
    mark = policy_proxy.mark()
    status, head, _ = proxy_get(policy_proxy.address, WATCHED, f"http://{host}/report-ssrf")
    assert status == 403 and b"X-Egress-Reason: destination_not_public" in head
    record = policy_proxy.access(mark, host=host)
    assert (record["decision"], record["reason"], record["policy"]) == ("denied", "destination_not_public",
                                                                        "watch")
    sock, status, head = connect_tunnel((policy_proxy.host, policy_proxy.port), host, 443, source=WATCHED)
    sock.close()
    assert status == 403 and b"X-Egress-Reason: destination_not_public" in head
    assert [r for r in internal_origin.requests if r["client"][0] != INTERNAL_IP] == []


def test_report_mode_still_refuses_a_malformed_sni(policy_proxy: ProxyRunner, raw_server: RawTcpServer) -> None:
    connections = raw_server.connections
    mark = policy_proxy.mark()
    hello = with_server_names([b"allowed.test"], [b"denied.test"])
    assert closed_without_data(send_hello((policy_proxy.host, policy_proxy.port), "raw.test", hello, source=WATCHED))
    record = policy_proxy.access(mark, host="raw.test", method="CONNECT", reason="sni_malformed")
    assert record["decision"] == "denied"
    assert raw_server.connections == connections


# --- a client in no policy -------------------------------------------------------------------------------------


def test_a_client_in_no_policy_is_refused(policy_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    mark = policy_proxy.mark()
    status, head, _ = proxy_get(policy_proxy.address, STRANGER, "http://allowed.test/no-policy")
    assert status == 403 and b"X-Egress-Reason: client_not_allowed" in head
    sock, status, head = connect_tunnel((policy_proxy.host, policy_proxy.port), "allowed.test", 443, source=STRANGER)
    sock.close()
    assert status == 403 and b"X-Egress-Reason: client_not_allowed" in head
    record = policy_proxy.access(mark, client_ip=STRANGER, method="CONNECT")
    assert record["reason"] == "client_not_allowed" and record["policy"] is None
    assert _paths(http_origin, "/no-policy") == []


# --- live changes: a bad document keeps the last good one; report -> enforce -----------------------------------


def test_bad_document_keeps_the_last_good_one(policy_proxy: ProxyRunner, policy_file: Path) -> None:
    mark = policy_proxy.mark()
    bad = json.loads(json.dumps(DOCUMENT))
    bad["policies"][0]["allow"].append("https://nope.example/")
    bad["policies"][1]["clients"] = ["not-a-cidr"]
    write_allowlist(policy_file, json.dumps(bad))
    rejected = policy_proxy.wait_for(lambda r: r.get("event") == "reload_rejected", timeout=15, start=mark)
    assert "policies[0].allow[1]" in rejected["bad_entries"] and "policies[1].clients[0]" in rejected["bad_entries"]
    # The last good document keeps serving: team-a's name still passes, gist is still denied.
    assert proxy_get(policy_proxy.address, TEAM, "http://build.wild.test/still-good")[0] == 200
    assert proxy_get(policy_proxy.address, TEAM, "http://gist.wild.test/still-good")[0] == 403
    write_allowlist(policy_file, json.dumps(DOCUMENT))
    policy_proxy.wait_for(lambda r: r.get("event") in {"reloaded", "reload_skipped"}, timeout=15, start=mark)


def test_switching_report_to_enforce_takes_effect_live(policy_proxy: ProxyRunner, policy_file: Path) -> None:
    assert proxy_get(policy_proxy.address, WATCHED, "http://denied.test/rollout")[0] == 200
    enforced = json.loads(json.dumps(DOCUMENT))
    enforced["policies"][1]["mode"] = "enforce"
    mark = policy_proxy.mark()
    write_allowlist(policy_file, json.dumps(enforced))
    try:
        policy_proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)
        status, head, _ = proxy_get(policy_proxy.address, WATCHED, "http://denied.test/rollout")
        assert status == 403 and b"X-Egress-Reason: domain_not_allowlisted" in head
    finally:
        mark = policy_proxy.mark()
        write_allowlist(policy_file, json.dumps(DOCUMENT))
        policy_proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)
