"""Policy correctness against real Squid: refusals a client cannot forge, host names that are not ASCII, and
client ranges that Squid would otherwise drop. Clients bind to their own loopback source addresses (127.0.0.3x)
to land in different policies; "refused" always means the recording origin saw nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INTERNAL_IP, ORIGIN_IP, RAW_IP, curl
from harness import DnsServer, HttpOrigin, RawTcpServer, TlsOrigin, free_port
from proxy_runner import ProxyRunner, egress_proxy_command
from tls_hello import closed_without_data, send_hello, with_server_names

from egress_proxy.squid_process import SquidError, parse_check

ENFORCED = "127.0.0.30"  # policy team (enforce)
REPORTED = "127.0.0.31"  # policy watch (report)

DOCUMENT: dict[str, Any] = {"policies": [
    {"name": "team", "clients": [f"{ENFORCED}/32"], "allow": [".idn.test", "allowed.test", "raw.test"],
     "deny": ["bücher.idn.test", "straße.idn.test"]},
    {"name": "watch", "clients": [f"{REPORTED}/32"], "mode": "report", "allow": [".idn.test"],
     "deny": ["bücher.idn.test"]},
]}


@pytest.fixture(scope="module")
def strict_proxy(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin, tls_origin: TlsOrigin
                 ) -> Iterator[ProxyRunner]:
    dns.set_wildcard("idn.test", [ORIGIN_IP])
    with _policy_proxy(public_tmp, "correctness", DOCUMENT, gate="127.0.0.0/24") as runner:
        yield runner
    dns.remove_wildcard("idn.test")


def _policy_proxy(public_tmp: Path, name: str, document: dict[str, Any], *, gate: str) -> ProxyRunner:
    """A proxy (not started: use it as a context manager) judging by ``document``, with ``gate`` as
    EGRESS_CLIENT_CIDRS; the origins' addresses are exempt from the SSRF guard."""
    path = public_tmp / f"{name}.json"
    path.write_text(json.dumps(document))
    return ProxyRunner(
        public_tmp / f"state-{name}",
        {
            "EGRESS_ALLOWLIST_FILE": str(path),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32,{RAW_IP}/32",
            "EGRESS_CLIENT_CIDRS": gate,
        },
        port=free_port(),
    )


def _exchange(proxy: ProxyRunner, source: str, request: bytes) -> tuple[int, bytes]:
    """Send one raw request from ``source``; (status, response head). The connection is closed after it."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(request)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    head = response.partition(b"\r\n\r\n")[0]
    return int(head.split()[1]), head


def _headers(head: bytes, name: str) -> list[bytes]:
    prefix = name.lower().encode() + b":"
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:] if line.lower().startswith(prefix)]


# --- a refusal comes from the proxy alone ------------------------------------------------------------------------

FORGED = (b"X-Egress-Reason: upstream_unavailable\r\nX-Egress-Policy: rep\r\n"
          b"x-egress-explanation: forged\r\n")


# Naming the proxy's own headers as hop-by-hop must not make Squid drop the ones it adds.
HOP_BY_HOP = b"Connection: X-Egress-Reason, X-Egress-Policy\r\n"


@pytest.mark.parametrize("kind", ["connect", "http", "connect-hop-by-hop"])
def test_a_client_cannot_forge_its_refusal(strict_proxy: ProxyRunner, tls_origin: TlsOrigin,
                                           http_origin: HttpOrigin, kind: str) -> None:
    mark = strict_proxy.mark()
    if kind.startswith("connect"):
        extra = HOP_BY_HOP if kind.endswith("hop-by-hop") else b""
        request = b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n" + FORGED + extra + b"\r\n"
    else:
        request = (b"GET http://denied.test/forged HTTP/1.1\r\nHost: denied.test\r\n" + FORGED
                   + b"Connection: close\r\n\r\n")
    status, head = _exchange(strict_proxy, ENFORCED, request)
    record = strict_proxy.access(mark, host="denied.test", client_ip=ENFORCED)
    assert (record["status"], record["reason"], record["policy"]) == (403, "domain_not_allowlisted", "team")
    # The answer is the log line: one reason and one policy header each, the proxy's own.
    assert status == 403, head
    assert _headers(head, "X-Egress-Reason") == [b"domain_not_allowlisted"], head
    assert _headers(head, "X-Egress-Policy") == [b"team"], head
    assert b"forged" not in head
    assert not [r for r in http_origin.requests if r["path"] == "/forged"]


def test_a_huge_request_head_cannot_hide_the_proxys_reason(strict_proxy: ProxyRunner) -> None:
    # Squid appends its own header after the client's: 40 KiB of client headers (Squid accepts up to 64 KiB)
    # must not push it past what the refusal responder reads.
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(40))
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, ENFORCED,
                             b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n" + padding + b"\r\n")
    record = strict_proxy.access(mark, host="denied.test", client_ip=ENFORCED, method="CONNECT")
    assert (status, record["status"], record["reason"]) == (403, 403, "domain_not_allowlisted"), head
    assert _headers(head, "X-Egress-Reason") == [b"domain_not_allowlisted"], head
    assert _headers(head, "X-Egress-Policy") == [b"team"], head


def test_an_origin_cannot_pass_its_answer_off_as_a_refusal(strict_proxy: ProxyRunner) -> None:
    # An allowed origin answering with the proxy's own refusal headers: the client must not read them as the
    # proxy's verdict (the log says allowed).
    forged = (b"HTTP/1.1 200 OK\r\nX-Egress-Reason: domain_denied\r\nX-Egress-Policy: watch\r\n"
              b"X-Egress-Explanation: forged\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    with RawTcpServer(RAW_IP, 80, banner=forged) as origin:
        mark = strict_proxy.mark()
        status, head = _exchange(strict_proxy, ENFORCED,
                                 b"GET http://raw.test/ HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n")
        record = strict_proxy.access(mark, host="raw.test", client_ip=ENFORCED)
        # the origin answers on connect, so the client can read that answer before the origin's thread has
        # recorded the request: wait for the request itself
        assert origin.wait_for(b"GET / HTTP/1.1").startswith(b"GET / HTTP/1.1")
    assert (status, record["decision"]) == (200, "allowed"), head
    assert b"x-egress" not in head.lower(), head


# --- host names that are not ASCII -------------------------------------------------------------------------------

# Each a spelling of a name the deny list holds (bücher.idn.test, stored as xn--bcher-kva.idn.test) or a trick
# around the lists; the DNS wildcard for idn.test resolves whatever the proxy asks.
NOT_ASCII = {
    "utf-8": "bücher.idn.test".encode(),
    "uppercase": "BÜCHER.idn.test".encode(),
    "fullwidth-dot": "bücher\uff0eidn.test".encode(),
    "fullwidth-letter": "\uff42ücher.idn.test".encode(),
    "mixed-script": "bu\u0308cher.idn.test".encode(),  # a combining diaeresis, not a precomposed ü
    "percent-utf-8": b"b%C3%BCcher.idn.test",
    "percent-latin-1": b"b%FCcher.idn.test",
    "raw-latin-1": b"b\xfccher.idn.test",  # not UTF-8: before the check, Squid held it until the client gave up
}


@pytest.mark.parametrize("client", [ENFORCED, REPORTED], ids=["enforce", "report"])
@pytest.mark.parametrize("spelling", NOT_ASCII, ids=list(NOT_ASCII))
def test_a_host_that_is_not_ascii_is_refused_for_http(strict_proxy: ProxyRunner, http_origin: HttpOrigin,
                                                      client: str, spelling: str) -> None:
    host = NOT_ASCII[spelling]
    path = f"/not-ascii-{spelling}".encode()
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, client, b"GET http://" + host + path + b" HTTP/1.1\r\nHost: " + host
                             + b"\r\nConnection: close\r\n\r\n")
    record = strict_proxy.access(mark, client_ip=client, method="GET")
    assert (status, record["reason"], record["decision"]) == (403, "invalid_host", "denied"), head
    assert _headers(head, "X-Egress-Reason") == [b"invalid_host"]
    assert not [r for r in http_origin.requests if r["path"] == path.decode()]


@pytest.mark.parametrize("client", [ENFORCED, REPORTED], ids=["enforce", "report"])
@pytest.mark.parametrize("spelling", NOT_ASCII, ids=list(NOT_ASCII))
def test_a_host_that_is_not_ascii_is_refused_for_connect(strict_proxy: ProxyRunner, tls_origin: TlsOrigin,
                                                         client: str, spelling: str) -> None:
    host = NOT_ASCII[spelling]
    handshakes = len(tls_origin.snis)
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, client, b"CONNECT " + host + b":443 HTTP/1.1\r\nHost: " + host
                             + b":443\r\n\r\n")
    record = strict_proxy.access(mark, client_ip=client, method="CONNECT")
    assert (status, record["reason"], record["decision"]) == (403, "invalid_host", "denied"), head
    assert _headers(head, "X-Egress-Reason") == [b"invalid_host"]
    assert len(tls_origin.snis) == handshakes


@pytest.mark.parametrize("client", [ENFORCED, REPORTED], ids=["enforce", "report"])
def test_a_sni_that_is_not_ascii_is_malformed(strict_proxy: ProxyRunner, tls_origin: TlsOrigin,
                                              client: str) -> None:
    # An allowed CONNECT target, then a ClientHello naming the denied host in raw UTF-8: refused in both modes
    # (sni_malformed is never only reported).
    handshakes = len(tls_origin.snis)
    mark = strict_proxy.mark()
    with send_hello((strict_proxy.host, strict_proxy.port), "allowed.idn.test",
                    with_server_names(["bücher.idn.test".encode()]), source=client) as sock:
        assert closed_without_data(sock)
    record = strict_proxy.access(mark, client_ip=client, method="CONNECT", host="allowed.idn.test")
    assert (record["reason"], record["decision"]) == ("sni_malformed", "denied")
    assert len(tls_origin.snis) == handshakes


@pytest.mark.parametrize("spelling", ["xn--bcher-kva.idn.test.", "XN--BCHER-KVA.IDN.TEST"])
def test_punycode_spellings_meet_the_deny_rule(strict_proxy: ProxyRunner, http_origin: HttpOrigin,
                                               spelling: str) -> None:
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, ENFORCED, f"GET http://{spelling}/puny HTTP/1.1\r\nHost: {spelling}\r\n"
                             "Connection: close\r\n\r\n".encode())
    record = strict_proxy.access(mark, client_ip=ENFORCED, method="GET")
    assert (status, record["reason"]) == (403, "domain_denied"), head
    assert not [r for r in http_origin.requests if r["path"] == "/puny"]


def test_the_uri_decides_not_the_host_header(strict_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    # A forward proxy request names its host in the URI; a contradicting Host header is replaced, never believed.
    mark = strict_proxy.mark()
    status, _ = _exchange(strict_proxy, ENFORCED, "GET http://allowed.idn.test/host-header HTTP/1.1\r\n"
                          "Host: bücher.idn.test\r\nConnection: close\r\n\r\n".encode())
    record = strict_proxy.access(mark, client_ip=ENFORCED, method="GET")
    assert (status, record["host"], record["decision"]) == (200, "allowed.idn.test", "allowed")
    assert [r["host"] for r in http_origin.requests if r["path"] == "/host-header"] == ["allowed.idn.test"]


def test_real_clients_send_punycode(strict_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    # What curl and requests do with a Unicode URL: they convert it, and the deny rule holds.
    mark = strict_proxy.mark()
    result = curl("--interface", ENFORCED, "-x", strict_proxy.proxy_url, "-o", "/dev/null", "-w", "%{http_code}",
                  "http://bücher.idn.test/real-client")
    assert result.stdout == "403", result.stderr
    assert strict_proxy.access(mark, client_ip=ENFORCED)["reason"] in {"domain_denied", "invalid_host"}
    assert not [r for r in http_origin.requests if r["path"] == "/real-client"]


# --- address lists Squid would drop ------------------------------------------------------------------------------

FIRST, SECOND, SECOND_LISTED = "127.0.0.40", "127.0.0.33", "127.0.0.44"
OVERLAPPING: dict[str, Any] = {"policies": [
    {"name": "first", "clients": [f"{FIRST}/32"], "allow": ["allowed.test"]},
    # .44 is inside the /27 (and .40 is taken by the first policy): Squid keeps only one of two overlapping
    # entries of a src ACL, so unnormalised this list loses either the /27 or the /32.
    {"name": "second", "clients": ["127.0.0.32/27", f"{SECOND_LISTED}/32"], "allow": [".wild.test"]},
    # A catch-all last policy: Squid refuses 0.0.0.0/0 in an ACL ("needs to be replaced by the term 'all'").
    {"name": "rest", "clients": ["0.0.0.0/0"], "allow": ["allowed.test", "other.wild.test"]},
]}


@pytest.fixture(scope="module")
def overlapping_proxy(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin) -> Iterator[ProxyRunner]:
    # The gate lists the narrower range first: Squid 5.7 kept it and ignored the /24.
    with _policy_proxy(public_tmp, "overlapping", OVERLAPPING, gate=f"{SECOND_LISTED}/32,127.0.0.0/24") as runner:
        yield runner


@pytest.mark.parametrize(("client", "policy", "allowed", "refused"), [
    (FIRST, "first", "allowed.test", "build.wild.test"),
    (SECOND, "second", "build.wild.test", "allowed.test"),
    (SECOND_LISTED, "second", "build.wild.test", "allowed.test"),
    ("127.0.0.70", "rest", "other.wild.test", "build.wild.test"),
])
def test_overlapping_client_ranges_keep_every_client(overlapping_proxy: ProxyRunner, http_origin: HttpOrigin,
                                                     client: str, policy: str, allowed: str, refused: str) -> None:
    path = f"/overlap-{client}"
    for host, status, reason in ((allowed, 200, "allowed"), (refused, 403, "domain_not_allowlisted")):
        mark = overlapping_proxy.mark()
        got, head = _exchange(overlapping_proxy, client, f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n"
                              "Connection: close\r\n\r\n".encode())
        record = overlapping_proxy.access(mark, client_ip=client, host=host)
        assert (got, record["reason"], record["policy"]) == (status, reason, policy), head
    assert [r["host"] for r in http_origin.requests if r["path"] == path] == [allowed]
    # Squid parsed what was rendered: nothing of it was dropped.
    assert not [r for r in overlapping_proxy.records if r.get("type") == "cache_log"
                and "ignor" in r.get("message", "").lower()]


def test_a_dropped_acl_entry_fails_the_parse_check(tmp_path: Path) -> None:
    # The guard behind the normalisation: a config Squid would load with part of an ACL ignored is refused.
    conf = tmp_path / "squid.conf"
    conf.write_text("http_port 127.0.0.1:1\nacl clients src 127.0.0.28/32 127.0.0.0/8\n"
                    "http_access allow clients\nhttp_access deny all\n")
    with pytest.raises(SquidError, match="ignored"):
        parse_check("squid", conf)
    conf.write_text("http_port 127.0.0.1:1\nacl clients src ::ffff:127.0.0.24/128\nhttp_access deny all\n")
    with pytest.raises(SquidError, match="masks away"):
        parse_check("squid", conf)


@pytest.mark.parametrize(("clients", "said"), [
    (["::ffff:127.0.0.24/128"], "use '127.0.0.24/32'"),
    (["::/0"], "contains the IPv4-mapped range"),
])
def test_check_refuses_ipv4_mapped_clients(public_tmp: Path, clients: list[str], said: str) -> None:
    document = public_tmp / "mapped.json"
    document.write_text(json.dumps({"policies": [
        {"name": "mapped", "clients": clients, "allow": ["allowed.test"]},
        {"name": "range", "clients": ["127.0.0.0/27"], "allow": [".wild.test"]},
    ]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
    result = subprocess.run([*egress_proxy_command(), "check", "--allowlist-file", str(document)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "policies[0].clients[0]" in result.stderr and said in result.stderr, result.stderr


# --- a request that failed is not an allowed success -------------------------------------------------------------


def test_an_allowed_request_that_could_not_be_forwarded_says_so(strict_proxy: ProxyRunner) -> None:
    # raw.test is allowed and resolves, but nothing listens on its port 80: Squid answers its own 503.
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, ENFORCED, b"GET http://raw.test/unreachable HTTP/1.1\r\nHost: raw.test\r\n"
                             b"Connection: close\r\n\r\n")
    record = strict_proxy.access(mark, client_ip=ENFORCED, host="raw.test")
    assert status == 503, head
    assert (record["decision"], record["reason"], record["error"]) == ("allowed", "forward_failed", "ERR_CONNECT_FAIL")


# --- the rollout: what an operator reads ---------------------------------------------------------------------------


def test_start_and_reload_lines_name_each_policy_and_its_mode(overlapping_proxy: ProxyRunner,
                                                               public_tmp: Path) -> None:
    [started] = overlapping_proxy.events("started")
    assert started["policy_entries"] == {"first": {"mode": "enforce", "allow": 1, "deny": 0},
                                         "second": {"mode": "enforce", "allow": 1, "deny": 0},
                                         "rest": {"mode": "enforce", "allow": 2, "deny": 0}}
    assert "(first: 1 allow, enforce; second: 1 allow, enforce; rest: 2 allow, enforce)" in started["message"]
    document = json.loads(json.dumps(OVERLAPPING))
    document["policies"][1]["mode"] = "report"
    try:
        mark = overlapping_proxy.mark()
        (public_tmp / "overlapping.json").write_text(json.dumps(document))
        changed = overlapping_proxy.wait_for(lambda r: r.get("event") == "policy_mode_changed", timeout=20,
                                             start=mark)
        assert (changed["policy"], changed["old_mode"], changed["new_mode"]) == ("second", "enforce", "report")
        reloaded = overlapping_proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)
        assert "+0 -0 entries" in reloaded["message"] and "policy second: mode enforce -> report" in reloaded["message"]
        assert reloaded["policy_entries"]["second"]["mode"] == "report"
    finally:
        mark = overlapping_proxy.mark()
        (public_tmp / "overlapping.json").write_text(json.dumps(OVERLAPPING))
        overlapping_proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=20, start=mark)


def test_allowlist_diff_compares_two_files(public_tmp: Path) -> None:
    active, proposed = public_tmp / "diff-active.json", public_tmp / "diff-proposed.json"
    report = {"policies": [{"name": "ci", "clients": ["10.0.8.0/22"], "mode": "report", "allow": ["pypi.org"]}]}
    enforce = {"policies": [{**report["policies"][0], "mode": "enforce",  # type: ignore[dict-item]
                             "allow": ["pypi.org", "files.pythonhosted.org"]}]}
    active.write_text(json.dumps(report))
    proposed.write_text(json.dumps(enforce))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGRESS_", "AWS_"))}
    result = subprocess.run([*egress_proxy_command(), "allowlist", "diff", str(proposed), "--against", str(active)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["policy ci: mode report -> enforce", "  + allow files.pythonhosted.org"]
    assert "1 to add, 0 to remove, 1 mode change" in result.stderr


def test_punycode_spellings_meet_the_deny_rule_in_a_tunnel(strict_proxy: ProxyRunner, tls_origin: TlsOrigin) -> None:
    handshakes = len(tls_origin.snis)
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, ENFORCED, b"CONNECT XN--BCHER-KVA.idn.test.:443 HTTP/1.1\r\n"
                             b"Host: XN--BCHER-KVA.idn.test.:443\r\n\r\n")
    assert (status, _headers(head, "X-Egress-Reason")) == (403, [b"domain_denied"]), head
    # An allowed CONNECT target fronting the denied name's punycode, in capitals, in the SNI.
    with send_hello((strict_proxy.host, strict_proxy.port), "allowed.idn.test",
                    with_server_names([b"XN--BCHER-KVA.IDN.TEST"]), source=ENFORCED) as sock:
        assert closed_without_data(sock)
    record = strict_proxy.access(mark, client_ip=ENFORCED, method="CONNECT", host="allowed.idn.test")
    assert (record["reason"], record["decision"]) == ("domain_denied", "denied")
    assert len(tls_origin.snis) == handshakes


# --- neighbours: names no DNS name can be, numeric spellings of private addresses, forwarding claims --------------

LONG_LABEL = "x" * 64 + ".idn.test"
LONG_NAME = ("a" * 62 + ".") * 4 + "idn.test"  # 260 octets, every label valid


@pytest.mark.parametrize("client", [ENFORCED, REPORTED], ids=["enforce", "report"])
@pytest.mark.parametrize("host", [LONG_LABEL, LONG_NAME], ids=["label-over-63", "name-over-253"])
def test_a_name_dns_cannot_carry_is_refused_at_once(strict_proxy: ProxyRunner, http_origin: HttpOrigin,
                                                    tls_origin: TlsOrigin, client: str, host: str) -> None:
    # Allowed by '.idn.test', but no resolver can encode it: Squid held such a request for its whole DNS timeout
    # (35 s), then logged it as allowed with a failed forward. The client's own 10 s timeout fails this test then.
    path = f"/dns-cannot-{len(host)}"
    handshakes = len(tls_origin.snis)
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, client, f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n"
                             "Connection: close\r\n\r\n".encode())
    logged = host[:255]  # Squid keeps (and logs) at most 255 characters of a host
    record = strict_proxy.access(mark, client_ip=client, method="GET", host=logged)
    assert (status, record["reason"], record["decision"]) == (403, "invalid_host", "denied"), head
    status, head = _exchange(strict_proxy, client, f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    record = strict_proxy.access(mark, client_ip=client, method="CONNECT", host=logged)
    assert (status, _headers(head, "X-Egress-Reason"), record["reason"]) == (403, [b"invalid_host"], "invalid_host")
    assert not [r for r in http_origin.requests if r["path"] == path]
    assert len(tls_origin.snis) == handshakes


def test_the_longest_names_dns_can_carry_still_pass(strict_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    # The edges of the rule above: a 63-octet label, and 253 octets (254 with the trailing dot).
    longest = ("a" * 62 + ".") * 3 + "b" * (253 - 63 * 3 - len(".idn.test")) + ".idn.test"
    assert len(longest) == 253
    for host in ("y" * 63 + ".idn.test", longest, longest + "."):
        path = f"/dns-can-{len(host)}"
        status, head = _exchange(strict_proxy, ENFORCED, f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n"
                                 "Connection: close\r\n\r\n".encode())
        assert status == 200, (host, head)
        assert [r["path"] for r in http_origin.requests if r["path"] == path] == [path]


def test_an_origin_sees_no_identity_the_client_claimed(strict_proxy: ProxyRunner, http_origin: HttpOrigin) -> None:
    # An origin may trust a forwarding header from the proxy's fixed address; the proxy forwards none, so a client
    # cannot make one up either (the upstream-proxy suite checks the same towards the upstream).
    forged = (b"X-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\n"
              b"X-Client-IP: 10.9.9.9\r\nTrue-Client-IP: 10.9.9.9\r\nVia: 1.1 forged\r\n")
    status, head = _exchange(strict_proxy, ENFORCED, b"GET http://allowed.test/claims HTTP/1.1\r\n"
                             b"Host: allowed.test\r\n" + forged + b"Connection: close\r\n\r\n")
    assert status == 200, head
    [seen] = [r for r in http_origin.requests if r["path"] == "/claims"]
    claims = {"x-forwarded-for", "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "via"}
    assert not [name for name in seen["headers"] if name.lower() in claims], seen["headers"]


# 127.0.0.3 (not exempt from the SSRF guard) as a resolver library spells it: decimal, hex, octal, short forms and
# IPv4-mapped IPv6. Squid reads each as that address, and so does the guard.
INTERNAL_SPELLINGS = ["2130706435", "0x7f000003", "0x7f.0.0.3", "0177.0.0.3", "127.3", "0177.3", "127.0.0.3.",
                      "[::ffff:127.0.0.3]", "[::ffff:7f00:3]"]


@pytest.mark.parametrize(("client", "reason"), [(ENFORCED, "ip_literal"), (REPORTED, "destination_not_public")],
                         ids=["enforce", "report"])
@pytest.mark.parametrize("spelling", INTERNAL_SPELLINGS)
def test_a_private_address_in_any_spelling_is_refused(strict_proxy: ProxyRunner, internal_origin: HttpOrigin,
                                                      client: str, reason: str, spelling: str) -> None:
    path = f"/spelt-{spelling}"
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, client, f"GET http://{spelling}{path} HTTP/1.1\r\nHost: {spelling}\r\n"
                             "Connection: close\r\n\r\n".encode())
    # Squid reads every spelling as the address, and logs it so.
    record = strict_proxy.access(mark, client_ip=client, method="GET", host=INTERNAL_IP)
    assert (status, _headers(head, "X-Egress-Reason"), record["reason"]) == (403, [reason.encode()], reason), head
    with RawTcpServer(INTERNAL_IP, 443) as internal_tls:
        status, head = _exchange(strict_proxy, client, f"CONNECT {spelling}:443 HTTP/1.1\r\nHost: {spelling}:443\r\n"
                                 "\r\n".encode())
        record = strict_proxy.access(mark, client_ip=client, method="CONNECT", host=INTERNAL_IP)
        assert (status, _headers(head, "X-Egress-Reason"), record["reason"]) == (403, [reason.encode()], reason)
        assert internal_tls.connections == 0
    assert not [r for r in internal_origin.requests if r["path"] == path]


@pytest.mark.parametrize("spelling", ["strasse.idn.test", "xn--strae-oqa.idn.test", "STRASSE.idn.test."])
def test_a_deny_rule_holds_for_both_idna_mappings(strict_proxy: ProxyRunner, http_origin: HttpOrigin,
                                                  tls_origin: TlsOrigin, spelling: str) -> None:
    # The deny list says 'straße.idn.test'. IDNA2008 clients send xn--strae-oqa; IDNA2003 (transitional) ones, Python's
    # own 'idna' codec among them, send 'strasse': two DNS names, one that a wildcard resolves as well as the other.
    assert "straße.idn.test".encode("idna") == b"strasse.idn.test"
    path = f"/deviation-{spelling}"
    handshakes = len(tls_origin.snis)
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, ENFORCED, f"GET http://{spelling}{path} HTTP/1.1\r\nHost: {spelling}\r\n"
                             "Connection: close\r\n\r\n".encode())
    assert (status, _headers(head, "X-Egress-Reason")) == (403, [b"domain_denied"]), head
    status, head = _exchange(strict_proxy, ENFORCED, f"CONNECT {spelling}:443 HTTP/1.1\r\nHost: {spelling}:443\r\n"
                             "\r\n".encode())
    assert (status, _headers(head, "X-Egress-Reason")) == (403, [b"domain_denied"]), head
    record = strict_proxy.access(mark, client_ip=ENFORCED, method="CONNECT")
    assert (record["reason"], record["policy"]) == ("domain_denied", "team")
    assert not [r for r in http_origin.requests if r["path"] == path]
    assert len(tls_origin.snis) == handshakes


def test_metadata_stays_refused_under_a_broad_exemption(public_tmp: Path, dns: DnsServer,
                                                        isolated_network: bool) -> None:
    # An operator exempts link-local (for some internal service) from the SSRF guard: the instance metadata service,
    # and the proxy's own credentials behind it, must still be out of reach. Here something listens on it.
    if not isolated_network:
        pytest.skip("needs the private network namespace scripts/test creates")
    subprocess.run(["ip", "addr", "replace", "169.254.169.254/32", "dev", "lo"], check=True)
    document = {"policies": [{"name": "team", "clients": [f"{ENFORCED}/32"], "allow": ["metadata.test"]}]}
    runner = _policy_proxy(public_tmp, "metadata-exempt", document, gate="127.0.0.0/24")
    runner.env["EGRESS_ALLOW_DESTINATIONS"] = "169.254.0.0/16"
    with HttpOrigin("169.254.169.254", 80, name="imds") as imds, runner:
        mark = runner.mark()
        status, head = _exchange(runner, ENFORCED, b"GET http://metadata.test/latest/meta-data/ HTTP/1.1\r\n"
                                 b"Host: metadata.test\r\nConnection: close\r\n\r\n")
        record = runner.access(mark, client_ip=ENFORCED, host="metadata.test")
        assert (status, record["reason"]) == (403, "destination_not_public"), head
        assert imds.requests == []


def test_a_forwarding_loop_is_not_logged_as_an_allowed_success(strict_proxy: ProxyRunner,
                                                               http_origin: HttpOrigin) -> None:
    # A client can send a Via naming this proxy; Squid then sees a loop and answers 403 itself. The line said
    # 'allowed'; it must say the request failed, as for any other answer of Squid's own to an allowed request.
    mark = strict_proxy.mark()
    status, head = _exchange(strict_proxy, ENFORCED, b"GET http://allowed.test/looped HTTP/1.1\r\n"
                             b"Host: allowed.test\r\nVia: 1.1 egress-proxy (squid)\r\nConnection: close\r\n\r\n")
    record = strict_proxy.access(mark, client_ip=ENFORCED, host="allowed.test")
    assert status == 403, head
    assert (record["decision"], record["reason"], record["error"]) == ("allowed", "forward_failed", "ERR_ACCESS_DENIED")
    assert not [r for r in http_origin.requests if r["path"] == "/looped"]
