"""The host's nftables ruleset for transparent mode, rendered from the settings. Pure: returns text.

``egress-proxy nft-rules | nft -f -`` applies it on the host (the EC2 user data at boot), never from inside the
container: the proxy needs no NET_ADMIN, so code it confines cannot flush the rules that confine it.

What the ruleset does, for packets from EGRESS_CLIENT_CIDRS:
- tcp/80 and tcp/443 are redirected to Squid's intercept ports (prerouting, before the routing decision);
- every other packet that the host would forward (any other port, UDP/443 QUIC, DNS to outside resolvers, ICMP)
  is dropped, counted in the named counter ``dropped``, and logged with a rate limit;
- the intercept ports accept only redirected connections: a client that dials them directly is dropped too (Squid
  would treat its own address as the original destination);
- a policy's extra ports (``"ports": ["github.com:22"]``) are forwarded: a new TCP connection whose (client,
  destination, port) is in the set ``ports_v4``/``ports_v6`` is counted in ``port_flows``, logged with a rate
  limit, marked, and masqueraded to the host's own address (so it leaves from the instance's Elastic IP); its later
  packets pass by the mark. The sets start empty: ``egress-proxy nft-sets`` prints the transaction that fills them
  from fresh DNS answers, and the host runs it on a timer;
- whatever the ports sets hold, nothing is forwarded to a link-local address (``never_forwarded_v4/v6``):
  the sets are filled from the proxy's container, and this ruleset is not.
Applying it again replaces the table atomically (``nft -f`` runs the file as one transaction).

The sets' elements come from the policy document the proxy last loaded (``ports.json`` beside squid.conf, written
from ``PolicyDocument.port_rules`` with the config it belongs to, so a rejected document changes nothing), resolved
with the servers Squid uses. Each name's addresses stay in the set for their TTL, and at least
EGRESS_PORT_ADDRESS_HOLD seconds after DNS last returned them (a client may hold an older answer); the kernel drops
an element when its timeout runs out, so if the refresh stops, the names' addresses close by themselves. CIDR
targets have no timeout.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .networks import LOOPBACK, normalise, subtract_all
from .settings import IPNetwork, Settings

TABLE = "egress_proxy"
COUNTER = "dropped"
LOG_PREFIX = "egress-proxy drop: "
# A log line per dropped packet would let one noisy client flood the journal; the counter counts every one.
LOG_RATE = "10/second burst 20 packets"
PORTS_COUNTER = "port_flows"
PORTS_LOG_PREFIX = "egress-proxy port: "
# The conntrack mark of a flow a `ports` entry admitted: its later packets pass, and only it is masqueraded.
PORTS_MARK = "0x00006570"
#: What the host accepts from `egress-proxy nft-sets` (a POSIX ERE, one line at a time; the CDK's refresh script
#: refuses a transaction with any other line): flushing and filling the two port sets of this table, nothing else.
#: The proxy's container must not be able to hand the host any other nft command.
PORT_SET_LINE = (r"^(|#[^{};]*|flush set inet egress_proxy ports_v[46]|add element inet egress_proxy ports_v[46] "
                 r"\{ [0-9a-f.:/]+ \. [0-9a-f.:/]+ \. [0-9]+(-[0-9]+)?( timeout [0-9]+s)? \})$")


# Never forwarded for a client, whatever the ports sets hold: link-local addresses, where AWS serves the INSTANCE
# (its metadata service and role credentials at 169.254.169.254 and fd00:ec2::254, ECS's task credentials at
# 169.254.170.2, the Route 53 Resolver, Time Sync), and NAT64's image of them. 'egress-proxy nft-sets' already
# leaves out every range of the SSRF guard; this is the host's own floor, because the sets' elements come from the
# proxy's container (checked only against a grammar), and code that took the container over could add any element.
NEVER_FORWARDED: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(cidr) for cidr in (
    "169.254.0.0/16", "64:ff9b::a9fe:0/112", "fd00:ec2::/32", "fe80::/10"))


def _set(name: str, kind: str, networks: list[IPNetwork]) -> list[str]:
    elements = ", ".join(str(net) for net in networks)
    return [f"\tset {name} {{", f"\t\ttype {kind}; flags interval;", f"\t\telements = {{ {elements} }}", "\t}"]


# Loopback client ranges (in the default EGRESS_CLIENT_CIDRS) are left out: loopback traffic never arrives from
# another host, so rules for it would only confuse a reader of the ruleset.


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
        f"\tcounter {PORTS_COUNTER} {{",
        "\t\tcomment \"new TCP connections forwarded for a policy's ports entries\"",
        "\t}",
    ]
    for version, networks in families:
        lines += _set(f"clients_v{version}", f"ipv{version}_addr", networks)
    for version, _ in families:
        lines += _set(f"never_forwarded_v{version}", f"ipv{version}_addr",
                      [net for net in NEVER_FORWARDED if net.version == version])
    for version, _ in families:
        kind = f"ipv{version}_addr"
        # Filled by 'egress-proxy nft-sets': (client network, destination, ports); names' addresses time out.
        lines += [f"\tset ports_v{version} {{", f"\t\ttype {kind} . {kind} . inet_service; flags interval, timeout;",
                  "\t}"]
    lines += ["", "\tchain prerouting {", "\t\ttype nat hook prerouting priority dstnat; policy accept;"]
    for version, _ in families:
        match = _client_match(version)
        lines.append(f"\t\t{match} tcp dport 80 {_redirect_target(settings, http, version)}")
        lines.append(f"\t\t{match} tcp dport 443 {_redirect_target(settings, https, version)}")
    lines += ["\t}", "", "\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;"]
    if families:
        lines.append(f"\t\tct mark {PORTS_MARK} accept")
    for version, _ in families:
        family = "ip" if version == 4 else "ip6"
        # Any source, not only the client ranges: an element may name any client network.
        lines.append(f"\t\t{family} daddr @never_forwarded_v{version} counter name {COUNTER} drop")
    for version, _ in families:
        family = "ip" if version == 4 else "ip6"
        flow = f"{family} saddr . {family} daddr . tcp dport @ports_v{version} ct state new"
        lines.append(f'\t\t{flow} limit rate {LOG_RATE} log prefix "{PORTS_LOG_PREFIX}" level info')
        lines.append(f"\t\t{flow} ct mark set {PORTS_MARK} counter name {PORTS_COUNTER} accept")
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
        "",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        # The host's own address: on EC2 the one its Elastic IP maps to, as for Squid's own connections.
        f"\t\tct mark {PORTS_MARK} masquerade",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


# --- the ports sets -------------------------------------------------------------------------------------------------


#: name -> {address: when it stops being open (epoch seconds)}
Memory = dict[str, dict[str, float]]

#: The longest an address stays open after DNS last returned it, whatever its TTL (and EGRESS_PORT_ADDRESS_HOLD's
#: own maximum). DNS allows TTLs up to 2^31-1 s, and nftables refuses an element timeout beyond about three years
#: ('value too large', kernel-dependent), which would make the host refuse the whole refresh at every run: every
#: policy's ports would age out because one name's owner chose a huge TTL. A day is longer than any client
#: resolver keeps an answer in practice (Squid keeps one at most 6 hours).
MAX_ADDRESS_SECONDS = 86400


def remember(memory: Memory, name: str, answers: Iterable[tuple[str, int]], now: float, hold: int) -> None:
    """Record a fresh DNS answer for ``name``: each address is open until ``now`` plus its TTL (at most
    MAX_ADDRESS_SECONDS), or plus ``hold`` when that is longer. Addresses of earlier answers keep their own expiry
    (a client may still hold them)."""
    known = memory.setdefault(name, {})
    for address, ttl in answers:
        known[address] = max(known.get(address, 0.0), now + max(min(ttl, MAX_ADDRESS_SECONDS), hold))


def forget_expired(memory: Memory, now: float, names: Iterable[str]) -> Memory:
    """The memory without expired addresses, and without names no rule uses any more."""
    wanted = set(names)
    return {name: {address: until for address, until in addresses.items() if until > now}
            for name, addresses in memory.items() if name in wanted}


def _inside(network: IPNetwork, others: Iterable[IPNetwork]) -> bool:
    return any(network.version == other.version and network.subnet_of(other)  # type: ignore[arg-type]
               for other in others)


def render_port_sets(settings: Settings, rules: Iterable[Mapping[str, Any]], memory: Memory, now: float,
                     forbidden: Iterable[IPNetwork]) -> str:
    """The transaction that makes the ports sets exactly this: flush both, then one element per (client network,
    destination, ports), each name's address with its remaining time as the element's timeout. Destinations in
    ``forbidden`` (the SSRF guard's ranges, as Squid's) are never opened. Every line matches PORT_SET_LINE."""
    blocked = list(forbidden)
    elements: dict[tuple[int, str], float] = {}  # (version, element) -> timeout in seconds (inf: none)
    for rule in rules:
        clients = [ipaddress.ip_network(text) for text in rule["clients"]]
        if "network" in rule:
            targets = [(net, math.inf) for net in subtract_all([ipaddress.ip_network(rule["network"])], blocked)]
        else:
            # Capped again here: the memory file may hold a longer time from an earlier version.
            targets = [(ipaddress.ip_network(address), min(until - now, MAX_ADDRESS_SECONDS))
                       for address, until in memory.get(rule["host"], {}).items() if until > now]
            targets = [(net, left) for net, left in targets if not _inside(net, blocked)]
        for client in clients:
            for target, left in targets:
                if target.version != client.version:
                    continue
                shown = str(target.network_address) if target.num_addresses == 1 else str(target)
                key = (client.version, f"{client} . {shown} . {rule['ports']}")
                elements[key] = max(elements.get(key, 0.0), left)
    lines = ["# egress-proxy nft-sets: the policies' ports, from fresh DNS answers (apply with 'nft -f -')"]
    for version, _ in _families(settings):  # the sets render_nft_rules created
        lines.append(f"flush set inet {TABLE} ports_v{version}")
        for (element_version, element), left in sorted(elements.items()):
            if element_version != version:
                continue
            timeout = "" if left == math.inf else f" timeout {max(1, math.ceil(left))}s"
            lines.append(f"add element inet {TABLE} ports_v{version} {{ {element}{timeout} }}")
    return "\n".join(lines) + "\n"
