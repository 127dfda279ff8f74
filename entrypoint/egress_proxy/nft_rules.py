"""The host's nftables ruleset for transparent mode, rendered from the settings. Pure: returns text.

``egress-proxy nft-rules | nft -f -`` applies it on the host (the EC2 user data at boot), never from inside the
container: the proxy needs no NET_ADMIN, so code it confines cannot flush the rules that confine it.

What the ruleset does, for packets from EGRESS_CLIENT_CIDRS:
- tcp/80 and tcp/443 are redirected to Squid's intercept ports (prerouting, before the routing decision);
- every other packet that the host would forward (any other port, UDP/443 QUIC, DNS to outside resolvers, ICMP)
  is dropped, counted in the named counter ``dropped``, and logged with a rate limit;
- the intercept ports accept only redirected connections: a client that dials them directly is dropped too (Squid
  would treat its own address as the original destination).
Applying it again replaces the table atomically (``nft -f`` runs the file as one transaction).
"""

from __future__ import annotations

import ipaddress

from .networks import normalise
from .settings import IPNetwork, Settings

TABLE = "egress_proxy"
COUNTER = "dropped"
LOG_PREFIX = "egress-proxy drop: "
# A log line per dropped packet would let one noisy client flood the journal; the counter counts every one.
LOG_RATE = "10/second burst 20 packets"


def _set(name: str, kind: str, networks: list[IPNetwork]) -> list[str]:
    elements = ", ".join(str(net) for net in networks)
    return [f"\tset {name} {{", f"\t\ttype {kind}; flags interval;", f"\t\telements = {{ {elements} }}", "\t}"]


# Loopback client ranges (in the default EGRESS_CLIENT_CIDRS) are left out: loopback traffic never arrives from
# another host, so rules for it would only confuse a reader of the ruleset.
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _families(settings: Settings) -> list[tuple[int, list[IPNetwork]]]:
    """(IP version, client networks) for each version that has client ranges."""
    families: list[tuple[int, list[IPNetwork]]] = []
    # Collapsed first: an interval set refuses overlapping elements ("conflicting intervals"), and
    # EGRESS_CLIENT_CIDRS may well list 10.0.0.0/8 beside 10.1.0.0/16.
    clients = normalise(settings.client_cidrs)
    for version in (4, 6):
        networks = [net for net in clients if net.version == version
                    and not any(net.version == lo.version and net.subnet_of(lo) for lo in LOOPBACK)]  # type: ignore[arg-type]
        if networks:
            families.append((version, networks))
    return families


def _redirect_target(settings: Settings, port: int, version: int) -> str:
    """``redirect`` sends a packet to the address of the interface it came in on, which Squid listens on when its
    listen address is unspecified (0.0.0.0). A specific listen address needs a DNAT to that address instead."""
    listen = settings.listen_address
    if listen.is_unspecified:
        return f"redirect to :{port}"
    if listen.version != version:
        return "drop"  # Squid does not listen on this IP version: nothing can be intercepted
    family = "ip" if version == 4 else "ip6"
    address = f"[{listen}]" if version == 6 else str(listen)
    return f"dnat {family} to {address}:{port}"


def _client_match(version: int) -> str:
    return "ip saddr @clients_v4" if version == 4 else "ip6 saddr @clients_v6"


def render_nft_rules(settings: Settings) -> str:
    """The ruleset as ``nft -f`` reads it."""
    http, https = settings.intercept_http_port, settings.intercept_https_port
    families = _families(settings)
    lines = [
        "# egress-proxy transparent mode: apply with 'egress-proxy nft-rules | nft -f -' (as root, on the host).",
        f"# Client ranges (EGRESS_CLIENT_CIDRS): tcp/80 -> :{http}, tcp/443 -> :{https}; everything else they send",
        "# through this host is dropped and counted. Re-applying replaces the table in one transaction.",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f"\tcounter {COUNTER} {{",
        '\t\tcomment "dropped from client ranges: other ports and protocols, QUIC, direct intercept-port dials"',
        "\t}",
    ]
    for version, networks in families:
        lines += _set(f"clients_v{version}", f"ipv{version}_addr", networks)
    lines += ["", "\tchain prerouting {", "\t\ttype nat hook prerouting priority dstnat; policy accept;"]
    for version, _ in families:
        match = _client_match(version)
        lines.append(f"\t\t{match} tcp dport 80 {_redirect_target(settings, http, version)}")
        lines.append(f"\t\t{match} tcp dport 443 {_redirect_target(settings, https, version)}")
    lines += ["\t}", "", "\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;"]
    for version, _ in families:
        match = _client_match(version)
        lines.append(f'\t\t{match} limit rate {LOG_RATE} log prefix "{LOG_PREFIX}" level info')
        lines.append(f"\t\t{match} counter name {COUNTER} drop")
    lines += [
        "\t}",
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        # A redirected connection carries conntrack's DNAT status; a direct dial of the intercept port does not.
        f"\t\ttcp dport {{ {http}, {https} }} ct status dnat accept",
        f"\t\ttcp dport {{ {http}, {https} }} counter name {COUNTER} drop",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"
