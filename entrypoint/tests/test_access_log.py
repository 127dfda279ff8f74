"""The logformat and its JSON reading are one definition."""

from __future__ import annotations

import json

from egress_proxy.access_log import FIELDS, SQUID_LOGFORMAT, is_noise, parse_line, to_json


def _line(**values: str) -> str:
    return "\t".join(values.get(field.name, "-") for field in FIELDS) + "\n"


def test_logformat_has_one_code_per_field() -> None:
    assert SQUID_LOGFORMAT.count("\t") == len(FIELDS) - 1


def test_parse_allowed_tunnel() -> None:
    record = parse_line(_line(time="1700000000.123", client_ip="10.0.0.5", method="CONNECT", host="a.example.com",
                              port="443", sni="a.example.com", status="200", reason="allowed",
                              squid_status="TCP_TUNNEL", bytes_in="700", bytes_out="2800", duration_ms="44"))
    assert record["decision"] == "allowed"
    assert record["time"] == 1700000000.123 and record["port"] == 443 and record["bytes_out"] == 2800
    assert record["error"] is None and record["server_ip"] is None
    assert json.loads(to_json(record)) == record


def test_url_escaped_values_are_decoded() -> None:
    record = parse_line(_line(host="evil%09host", sni="x%0Ay", reason="domain_not_allowlisted", status="403"))
    assert record["host"] == "evil\thost" and record["sni"] == "x\ny"
    assert record["decision"] == "denied"
    assert "\n" not in to_json(record)


def test_missing_reason_is_denied_and_explained() -> None:
    assert parse_line(_line(status="400", error="ERR_INVALID_REQ"))["reason"] == "invalid_request"
    assert parse_line(_line(status="0"))["reason"] == "denied"


def test_malformed_line_is_kept_not_dropped() -> None:
    record = parse_line("garbage without tabs\n")
    assert record == {"type": "access", "unparsed": "garbage without tabs"}


def test_noise_records() -> None:
    probe = parse_line(_line(status="0", error="ERR_CLIENT_GONE", bytes_in="0"))
    interim = parse_line(_line(method="CONNECT", status="200", reason="allowed", squid_status="NONE_NONE"))
    refused_sni = parse_line(_line(method="CONNECT", status="200", reason="sni_missing", squid_status="NONE_NONE"))
    assert is_noise(probe) and is_noise(interim)
    assert not is_noise(refused_sni)


def test_host_forgery_409_has_a_reason_of_its_own() -> None:
    # Squid answers it before any ACL runs, so the line carries no reason note, only the error code.
    record = parse_line(_line(method="GET", host="allowed.example", status="409", error="ERR_CONFLICT_HOST",
                              mode="intercept", squid_status="NONE_NONE"))
    assert record["reason"] == "host_header_forgery" and record["decision"] == "denied"
    assert record["mode"] == "intercept"


def test_mode_is_explicit_unless_noted() -> None:
    assert parse_line(_line(method="GET", reason="allowed", status="200"))["mode"] == "explicit"


def test_clienthello_record_after_a_refused_intercepted_tls_connection_is_a_follow_up() -> None:
    from egress_proxy.access_log import ConnectionFollowUps

    follow_ups = ConnectionFollowUps()
    refused = parse_line(_line(client_ip="10.0.0.5", client_port="4000", method="CONNECT", host="a.example",
                               status="409", error="ERR_CONFLICT_HOST", mode="intercept"))
    hello = parse_line(_line(client_ip="10.0.0.5", client_port="4000", status="0", bytes_in="517"))
    assert not follow_ups.is_follow_up(refused) and follow_ups.is_follow_up(hello)


def test_a_failed_forward_is_not_logged_as_a_plain_success() -> None:
    # The upstream proxy stopped accepting connections while a worker still had "reachable" cached: Squid's own
    # 503 to an allowed request. Reasons alone must not count it as a success.
    failed = parse_line(_line(method="GET", status="503", reason="allowed", error="ERR_CONNECT_FAIL"))
    assert (failed["decision"], failed["reason"]) == ("allowed", "forward_failed")
    assert parse_line(_line(method="GET", status="504", reason="allowed", error="ERR_READ_TIMEOUT"))[
        "reason"] == "forward_failed"
    assert parse_line(_line(method="GET", status="503", reason="allowed", error="ERR_DNS_FAIL"))[
        "reason"] == "forward_failed"
    # An allowed CONNECT whose origin was unreachable: the client saw 200, then a closed tunnel.
    tunnel = parse_line(_line(method="CONNECT", status="503", reason="allowed", squid_status="NONE_NONE"))
    assert (tunnel["status"], tunnel["error"], tunnel["reason"]) == (200, "ERR_CONNECT_FAIL", "forward_failed")
    # Squid's own 403 for a forwarding loop (the request carried this proxy's Via).
    assert parse_line(_line(method="GET", status="403", reason="allowed", error="ERR_ACCESS_DENIED"))[
        "reason"] == "forward_failed"
    # Not failures: the origin's own 5xx or 4xx, an idle tunnel the proxy closed, a client that went away.
    assert parse_line(_line(method="GET", status="502", reason="allowed"))["reason"] == "allowed"
    assert parse_line(_line(method="GET", status="404", reason="allowed"))["reason"] == "allowed"
    assert parse_line(_line(method="CONNECT", status="200", reason="allowed", squid_status="TCP_TUNNEL",
                            error="ERR_READ_TIMEOUT"))["reason"] == "allowed"
    assert parse_line(_line(method="GET", status="0", reason="allowed", error="ERR_CLIENT_GONE"))[
        "reason"] == "allowed"
    # Report mode keeps the reason it exists for.
    assert parse_line(_line(method="GET", status="503", reason="allowed", would_deny="domain_not_allowlisted",
                            error="ERR_CONNECT_FAIL"))["reason"] == "domain_not_allowlisted"


def test_to_json_is_compact_and_keeps_non_ascii() -> None:
    record = {"type": "access", "host": "bücher.example", "status": 200, "sni": None}
    assert to_json(record) == json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    assert to_json(record) == '{"type":"access","host":"bücher.example","status":200,"sni":null}'
