"""A small stub resolver that keeps what getaddrinfo() throws away: each answer's TTL.

``egress-proxy nft-sets`` opens a policy's extra ports to the current addresses of a name, and must close them
again once no client can still hold an answer, so it needs the TTL. It asks the same servers Squid asks
(EGRESS_DNS_SERVERS, else /etc/resolv.conf's nameservers): in a VPC that is the VPC resolver, which the clients
ask too. Asking another resolver would make the host and the clients disagree on round-robin and CDN names.

A and AAAA over UDP, over TCP when the answer is truncated; the next server when one does not answer.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

QTYPES = {1: "A", 28: "AAAA"}
RCODE_NXDOMAIN = 3
DEFAULT_TIMEOUT = 2.0


class LookupFailed(Exception):
    """No server answered, or every answer was an error other than 'no such name' (SERVFAIL, REFUSED...)."""


@dataclass(frozen=True)
class Answer:
    address: IPAddress
    ttl: int


def system_servers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[IPAddress]:
    """The nameservers of resolv.conf, as the C library (and Squid, without dns_nameservers) reads them."""
    servers: list[IPAddress] = []
    try:
        lines = resolv_conf.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return servers
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(ipaddress.ip_address(fields[1].split("%")[0]))
            except ValueError:
                continue
    return servers


def resolve(name: str, servers: Sequence[IPAddress], *, timeout: float = DEFAULT_TIMEOUT) -> list[Answer]:
    """The A and AAAA answers for ``name`` (an empty list for a name that does not exist or has no address).
    Raises LookupFailed when no server gives an answer for either type."""
    if not servers:
        raise LookupFailed("no DNS server: set EGRESS_DNS_SERVERS or a nameserver in /etc/resolv.conf")
    answers: list[Answer] = []
    for qtype in QTYPES:
        errors: list[str] = []
        for server in servers:
            try:
                answers += _ask(name, qtype, server, timeout)
                break
            except (OSError, LookupFailed, struct.error, IndexError) as exc:
                errors.append(f"{server}: {exc}")
        else:
            raise LookupFailed(f"{name} {QTYPES[qtype]}: " + "; ".join(errors))
    return answers


def _ask(name: str, qtype: int, server: IPAddress, timeout: float) -> list[Answer]:
    ident = int.from_bytes(os.urandom(2), "big")
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + _encode_name(name) + struct.pack("!HH", qtype, 1)
    family = socket.AF_INET6 if server.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        udp.settimeout(timeout)
        udp.connect((str(server), 53))
        udp.send(query)
        while True:  # a stray datagram (an earlier query's late answer) is not this answer
            reply = udp.recv(4096)
            if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == ident:
                break
    if struct.unpack("!H", reply[2:4])[0] & 0x0200:  # TC: truncated, ask again over TCP
        with socket.create_connection((str(server), 53), timeout=timeout) as tcp:
            tcp.sendall(struct.pack("!H", len(query)) + query)
            length = struct.unpack("!H", _read(tcp, 2))[0]
            reply = _read(tcp, length)
    return _parse(reply, qtype)


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise LookupFailed("the TCP answer was cut short")
        data += chunk
    return data


def _encode_name(name: str) -> bytes:
    encoded = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise LookupFailed(f"{name!r} is not a DNS name")
        encoded += bytes([len(raw)]) + raw
    return encoded + b"\0"


def _skip_name(message: bytes, offset: int) -> int:
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        offset += 1 + length
        if length == 0:
            return offset


def _parse(message: bytes, qtype: int) -> list[Answer]:
    flags, qdcount, ancount = struct.unpack("!HHH", message[2:8])
    rcode = flags & 0x000F
    if rcode == RCODE_NXDOMAIN:
        return []
    if rcode != 0:
        raise LookupFailed(f"rcode {rcode}")
    offset = 12
    for _ in range(qdcount):
        offset = _skip_name(message, offset) + 4
    records: list[tuple[int, int, bytes]] = []
    for _ in range(ancount):
        offset = _skip_name(message, offset)
        rtype, _rclass, ttl, length = struct.unpack("!HHIH", message[offset:offset + 10])
        offset += 10
        records.append((rtype, ttl, message[offset:offset + length]))
        offset += length
    # A CNAME chain: an address may be cached no longer than the shortest TTL along the chain.
    chain_ttl = min((ttl for _, ttl, _ in records), default=0)
    answers = []
    for rtype, _ttl, data in records:
        if rtype == qtype == 1 and len(data) == 4:
            answers.append(Answer(ipaddress.IPv4Address(data), chain_ttl))
        elif rtype == qtype == 28 and len(data) == 16:
            answers.append(Answer(ipaddress.IPv6Address(data), chain_ttl))
    return answers
