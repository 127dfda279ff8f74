"""Access lines say what the client saw: one line per client connection, no denial nobody made."""

from __future__ import annotations

from egress_proxy.access_log import FIELDS, ConnectionFollowUps, is_noise, parse_line
from egress_proxy.squid_process import access_sink


def _line(**values: str) -> str:
    return "\t".join(values.get(field.name, "-") for field in FIELDS) + "\n"


TUNNEL = {"time": "1.000", "client_ip": "10.0.0.1", "client_port": "40000", "method": "CONNECT",
          "host": "a.example.com", "port": "443", "sni": "a.example.com", "reason": "allowed",
          "server_ip": "93.184.216.34", "bytes_in": "600", "bytes_out": "2400", "duration_ms": "12"}


def test_a_tunnel_the_origin_closed_first_is_logged_as_the_200_the_client_saw() -> None:
    record = parse_line(_line(**TUNNEL, status="500", squid_status="TCP_TUNNEL"))
    assert record["status"] == 200 and record["error"] is None and record["decision"] == "allowed"


def test_an_unreachable_origin_is_one_line_with_connect_fail_and_no_denial() -> None:
    lines = [
        _line(**{**TUNNEL, "bytes_in": "0", "bytes_out": "0", "server_ip": "127.0.0.5"}, status="503",
              squid_status="NONE_NONE"),
        # Squid's second record for the same connection: no method, no host, the ClientHello's bytes.
        _line(time="1.000", client_ip="10.0.0.1", client_port="40000", status="0", squid_status="NONE_NONE",
              bytes_in="517", bytes_out="0", duration_ms="0"),
    ]
    written: list[str] = []
    observed: list[dict[str, object]] = []
    sink = access_sink(written.extend, observed.append)
    sink(lines)
    assert len(written) == 1 and len(observed) == 1
    record = observed[0]
    assert record["status"] == 200 and record["error"] == "ERR_CONNECT_FAIL" and record["decision"] == "allowed"
    assert not is_noise(record)


def test_follow_ups_only_for_the_failed_connection() -> None:
    follow_ups = ConnectionFollowUps()
    other = parse_line(_line(client_ip="10.0.0.2", client_port="1", status="0", bytes_in="5"))
    assert not follow_ups.is_follow_up(other)


def test_a_refused_connect_is_tcp_denied_not_tcp_tunnel() -> None:
    record = parse_line(_line(**{**TUNNEL, "reason": "domain_not_allowlisted", "sni": "-"}, status="403",
                              squid_status="TCP_TUNNEL"))
    assert record["squid_status"] == "TCP_DENIED" and record["status"] == 403 and record["server_ip"] is None


def test_the_interim_splice_record_is_still_noise() -> None:
    assert is_noise(parse_line(_line(**TUNNEL, status="200", squid_status="NONE_NONE")))


def test_one_read_from_two_workers_is_written_in_the_order_squid_logged_it() -> None:
    """The listener reads worker by worker: worker 2's earlier line can follow worker 1's later one in a read."""
    worker_1 = [_line(**{**TUNNEL, "time": "5.020", "client_port": "1"}, status="200", squid_status="TCP_TUNNEL")]
    worker_2 = [_line(**{**TUNNEL, "time": "5.010", "client_port": "2"}, status="200", squid_status="TCP_TUNNEL"),
                _line(**{**TUNNEL, "time": "5.030", "client_port": "3"}, status="200", squid_status="TCP_TUNNEL")]
    observed: list[dict[str, object]] = []
    access_sink(lambda lines: None, observed.append)(worker_1 + worker_2)
    assert [record["client_port"] for record in observed] == [2, 1, 3]


def test_a_line_without_a_time_leaves_the_read_in_arrival_order() -> None:
    lines = [_line(**{**TUNNEL, "time": "5.020"}, status="200", squid_status="TCP_TUNNEL"), "not squid's format\n",
             _line(**{**TUNNEL, "time": "5.010"}, status="200", squid_status="TCP_TUNNEL")]
    observed: list[dict[str, object]] = []
    access_sink(lambda lines: None, observed.append)(lines)
    assert [record.get("time") for record in observed] == [5.02, None, 5.01]
