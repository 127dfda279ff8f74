"""Address lists: the set operations every rendered list goes through (collapse, subtract, cover).

Pure, standard library only. The one CIDR parser is ``identity_helper.parse_cidr`` (the identity helper runs
standalone inside Squid, so the parser lives there): settings (EGRESS_CLIENT_CIDRS, EGRESS_ALLOW_DESTINATIONS,
EGRESS_PROXY_PROTOCOL_FROM) and policy documents (``clients``) use it. squid_conf.py renders every address list
through :func:`normalise` and cuts ranges with :func:`subtract_all`; policy.py's warnings use :func:`covered`.

Why this matters to Squid 5.7 (measured):

* A ``src``/``dst`` ACL keeps its addresses in a splay tree that cannot hold overlapping ranges. Given
  ``127.0.0.28/32 127.0.0.0/8`` it logs "... is ignored to keep splay tree searching predictable" and drops one
  of them (here the /8), so .27 was refused and .28 allowed. Every list is collapsed before it is rendered.
* Squid stores IPv4 addresses as IPv4-mapped IPv6 (``::ffff:a.b.c.d``). It parsed ``::ffff:127.0.0.24/128`` as
  ``::/0`` ("Netmask masks away part of the specified IP"), which matched every client; and an IPv6 range that
  contains ``::ffff:0:0/96`` would stand for IPv4 clients that the policy model does not see in it. So
  ``parse_cidr`` refuses a CIDR inside or around the mapped block, with the IPv4 CIDR to write instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["LOOPBACK", "IPAddress", "IPNetwork", "covered", "normalise", "subtract", "subtract_all"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def normalise(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The same addresses as the fewest CIDRs, none overlapping another (what a Squid src/dst ACL needs):
    IPv4 first, each family in address order."""
    listed = list(networks)
    v4 = [net for net in listed if isinstance(net, ipaddress.IPv4Network)]
    v6 = [net for net in listed if isinstance(net, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def subtract(network: IPNetwork, hole: IPNetwork) -> list[IPNetwork]:
    """``network`` without the addresses of ``hole``, as CIDRs (``[]`` when the hole covers it)."""
    if network.version != hole.version or not network.overlaps(hole):
        return [network]
    if network.subnet_of(hole):  # type: ignore[arg-type]
        return []
    return list(network.address_exclude(hole))  # type: ignore[arg-type]


def subtract_all(networks: Iterable[IPNetwork], holes: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Every address of ``networks`` that no hole contains."""
    remaining = list(networks)
    for hole in holes:
        remaining = [piece for network in remaining for piece in subtract(network, hole)]
    return remaining


def covered(network: IPNetwork, others: Iterable[IPNetwork]) -> bool:
    """True if the union of ``others`` contains every address of ``network``."""
    return not subtract_all([network], others)
