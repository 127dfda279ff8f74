"""The stub resolver behind 'egress-proxy nft-sets' (egress_proxy/dns_lookup.py) against the harness's real DNS
server: the answers it keeps, their TTLs, names that do not exist, and servers that do not answer."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import DnsServer

from egress_proxy.dns_lookup import Answer, LookupFailed, resolve, system_servers

SERVER = "127.0.0.54"
SILENT = "127.0.0.55"  # nothing listens here: the query is refused (ICMP port unreachable)


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer({"git.test": ["203.0.113.20", "203.0.113.21", "2001:db8::20"]}, host=SERVER, port=53, ttl=42)
    server.set("empty.test", [])
    server.set("many.test", [f"198.51.100.{n}" for n in range(1, 61)])
    server.start()
    yield server
    server.stop()


def servers(*addresses: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(address) for address in addresses]


def test_a_and_aaaa_answers_with_their_ttl(dns: DnsServer) -> None:
    answers = resolve("git.test", servers(SERVER))
    assert sorted(answers, key=lambda a: str(a.address)) == [
        Answer(ipaddress.ip_address("2001:db8::20"), 42), Answer(ipaddress.ip_address("203.0.113.20"), 42),
        Answer(ipaddress.ip_address("203.0.113.21"), 42)]
    assert ("git.test", "A") in dns.queries and ("git.test", "AAAA") in dns.queries


def test_a_name_with_no_address_or_no_existence_has_no_answer(dns: DnsServer) -> None:
    assert resolve("empty.test", servers(SERVER)) == []
    assert resolve("missing.test", servers(SERVER)) == []


def test_a_truncated_answer_is_asked_again_over_tcp(dns: DnsServer) -> None:
    """60 addresses (about 1 KB) do not fit the 512 bytes of a UDP answer to a query without EDNS: the server
    answers over UDP with its TC bit set and no address, as resolvers do, and all 60 arrive over TCP."""
    assert len(resolve("many.test", servers(SERVER))) == 60


def test_the_next_server_answers_when_one_does_not(dns: DnsServer) -> None:
    assert len(resolve("git.test", servers(SILENT, SERVER), timeout=1)) == 3


def test_no_server_answering_is_a_failure_not_an_empty_answer() -> None:
    with pytest.raises(LookupFailed, match=SILENT):
        resolve("git.test", servers(SILENT), timeout=1)
    with pytest.raises(LookupFailed, match="no DNS server"):
        resolve("git.test", [])


def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # takes the query, answers nothing
        sink.bind(("127.0.0.56", 53))
        with pytest.raises(LookupFailed, match="timed out"):
            resolve("git.test", servers("127.0.0.56"), timeout=0.5)


def test_resolv_conf_nameservers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch ec2.internal\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bad\n")
    assert system_servers(conf) == servers("10.0.0.2", "fe80::1")
    assert system_servers(tmp_path / "absent") == []

