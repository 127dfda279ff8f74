"""The CONNECT refusal responder answers 403 with the reason Squid passed in X-Egress-Reason."""

from __future__ import annotations

import socket

import pytest

from egress_proxy.denier import Denier, reason_from_head, refusal


def test_reason_from_head() -> None:
    head = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nX-Egress-Reason: ip_literal\r\n\r\n"
    assert reason_from_head(head) == "ip_literal"
    assert reason_from_head(b"CONNECT a:443 HTTP/1.1\r\n\r\n") == "denied"


def test_an_upstream_outage_is_a_503_not_a_policy_refusal() -> None:
    assert refusal("upstream_unavailable").startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert refusal("domain_not_allowlisted").startswith(b"HTTP/1.1 403 Forbidden\r\n")


def test_unknown_reason_is_not_echoed() -> None:
    assert b"X-Egress-Reason: denied\r\n" in refusal("<script>")


def test_serves_403_over_loopback() -> None:
    denier = Denier().start()
    try:
        with socket.create_connection(("127.0.0.1", denier.port), timeout=5) as sock:
            sock.sendall(b"CONNECT x.example:443 HTTP/1.1\r\nX-Egress-Reason: domain_not_allowlisted\r\n\r\n")
            reply = sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"X-Egress-Reason: domain_not_allowlisted\r\n" in reply
        assert b"not on the allowlist" in reply
    finally:
        denier.stop()


def test_stop_wakes_the_sleeping_thread_and_closes_the_port() -> None:
    # The thread waits for connections without a timeout: stop() must still end it, and the port must close.
    denier = Denier().start()
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", denier.port), timeout=5) as sock:
            sock.sendall(b"CONNECT x.example:443 HTTP/1.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 403 Forbidden\r\n")
    denier.stop()
    assert not denier._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", denier.port), timeout=5)


def test_a_denier_never_started_stops_quietly() -> None:
    Denier().stop()
