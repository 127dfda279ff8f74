"""Client identity: which policy a connection belongs to when policies name clients by AWS identity.

Standard library only: Squid runs this file as an external ACL helper (``client_identity`` in squid.conf.j2),
as its unprivileged user, with the system python3 (like sni_helper.py). policy.py imports the selector grammar
and :func:`resolve` from here, so the reference model and the helper cannot drift apart.

Selectors in a policy's ``clients`` (first match in document order, over every kind):

* ``10.0.0.0/8``: a CIDR, as before;
* ``sg-0123abcd``: every client whose network interface (ENI) is in that security group;
* ``ecs:CLUSTER/SERVICE``: the awsvpc tasks of one ECS service (their ENI addresses);
* ``tag:KEY=VALUE``: every client whose ENI carries that tag;
* ``vpce-0123abcd``: every connection arriving through that interface endpoint of the proxy's endpoint service
  (the NLB's PROXY protocol v2 header names it in TLV 0xEA);
* ``vpce-0123abcd:10.1.0.0/16``: the same, from those consumer addresses only (consumers' ranges overlap, so a
  CIDR means nothing without its endpoint).

A connection that came through an endpoint matches only ``vpce-`` selectors: its source address is in the
consumer's VPC, where the proxy's own CIDRs, security groups and tasks mean nothing. A connection without one
matches every other kind.

The helper reads ``%>a`` (and, with the PROXY protocol, ``%{234}proxy_protocol::>h``) per line, and answers
``OK client_policy=NAME client_identity=SELECTOR`` or ``ERR client_identity=-`` from the rendered policy file and
the membership file the supervisor rewrites atomically (re-read when it changes). An address that no poll has
seen, and that a membership selector could claim before any CIDR does, is looked up once on the supervisor's
unix socket (time-bounded; the supervisor rate-limits and caches). A lookup that fails or times out answers ERR
with ``identity_error``: fail closed, with a reason.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Kinds whose members come from the AWS APIs (the membership table), as opposed to CIDRs and endpoints that
# the connection itself shows.
MEMBERSHIP_KINDS = ("sg", "ecs", "tag")

_SG = re.compile(r"sg-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_VPCE = re.compile(r"vpce-[0-9a-f]{8}(?:[0-9a-f]{9})?")
_ECS_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
# AWS allows spaces and a few more characters in tags; these are the ones that stay one token in a helper
# answer and a log field without quoting.
_TAG_KEY = re.compile(r"[A-Za-z0-9_.:/+\-@]{1,128}")
_TAG_VALUE = re.compile(r"[A-Za-z0-9_.:/=+\-@]{0,256}")

EXAMPLES = ('"10.0.8.0/22", "sg-0123456789abcdef0", "ecs:prod/payments", "tag:team=payments", '
            '"vpce-0123456789abcdef0" or "vpce-0123456789abcdef0:10.1.0.0/16"')


class BadSelector(ValueError):
    """A ``clients`` item that is no selector: ``why`` it is not, and the ``fix``."""

    def __init__(self, why: str, fix: str) -> None:
        super().__init__(why)
        self.why = why
        self.fix = fix


@dataclass(frozen=True)
class Selector:
    """One parsed ``clients`` item. ``text`` is its canonical form (what logs and documents show)."""

    kind: str  # cidr | sg | ecs | tag | vpce
    text: str
    network: IPNetwork | None = None  # cidr, and vpce with a range
    endpoint: str | None = None  # vpce

    @property
    def membership(self) -> bool:
        return self.kind in MEMBERSHIP_KINDS

    def matches(self, address: IPAddress, endpoint: str | None, members: Iterable[str]) -> bool:
        """Does a connection from ``address`` (through ``endpoint``, or directly when None) belong to this
        selector, given the membership selectors ``members`` that AWS lists for the address?"""
        if endpoint is not None:
            return (self.kind == "vpce" and self.endpoint == endpoint
                    and (self.network is None or _within(address, self.network)))
        if self.kind == "cidr":
            return self.network is not None and _within(address, self.network)
        return self.membership and self.text in members


IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_cidr(text: str) -> IPNetwork:
    """A strict CIDR, or BadSelector naming the network that was probably meant. The one CIDR parser: policy
    clients, vpce- ranges and the settings' address lists all use it.

    Nothing IPv4-mapped: Squid keeps IPv4 addresses as ``::ffff:a.b.c.d`` internally and parsed
    ``::ffff:127.0.0.24/128`` as ``::/0`` (every client), while a range holding ``::ffff:0:0/96`` would match
    IPv4 clients that the model (and this helper, which compares IPv4 clients as IPv4) never puts in it."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise BadSelector(f"is not an IPv4 or IPv6 CIDR ({exc})",
                              'write e.g. "10.0.8.0/22" or "fd00:1::/64"') from None
        raise BadSelector("has host bits set", f"use '{fixed}' (the network containing it)") from None
    if isinstance(network, ipaddress.IPv6Network) and network.overlaps(IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        if network.subnet_of(IPV4_MAPPED) and mapped is not None:
            raise BadSelector("is an IPv4-mapped IPv6 range, which Squid reads as another range",
                              f"use '{ipaddress.IPv4Network((mapped, network.prefixlen - 96))}' (the same "
                              "clients, written as IPv4)")
        raise BadSelector(f"contains the IPv4-mapped range {IPV4_MAPPED}, so Squid would match IPv4 clients with it",
                          "list the IPv6 ranges you mean (e.g. fc00::/7) and the IPv4 ones as IPv4 CIDRs")
    return network


def parse_selector(raw: str) -> Selector:
    """One ``clients`` item. Raises BadSelector."""
    text = raw.strip()
    lowered = text.lower()
    if lowered.startswith("sg-"):
        if not _SG.fullmatch(lowered):
            raise BadSelector("is not a security group ID",
                              "write sg- and 8 or 17 hex digits, e.g. sg-0123456789abcdef0")
        return Selector("sg", lowered)
    if lowered.startswith("vpce-"):
        endpoint, sep, cidr = lowered.partition(":")
        if not _VPCE.fullmatch(endpoint):
            raise BadSelector("does not start with a VPC endpoint ID",
                              "write vpce- and 8 or 17 hex digits, optionally :CIDR, e.g. "
                              "vpce-0123456789abcdef0:10.1.0.0/16")
        if not sep:
            return Selector("vpce", endpoint, endpoint=endpoint)
        try:
            network = parse_cidr(cidr)
        except BadSelector as bad:
            raise BadSelector(f"has a range that {bad.why}", bad.fix.replace("'", f"'{endpoint}:", 1)
                              if bad.fix.startswith("use '") else bad.fix) from None
        return Selector("vpce", f"{endpoint}:{network}", network=network, endpoint=endpoint)
    if lowered.startswith("ecs:"):
        cluster, sep, service = text[4:].partition("/")
        if not sep or not _ECS_NAME.fullmatch(cluster) or not _ECS_NAME.fullmatch(service):
            fix = ("write ecs:CLUSTER/SERVICE with the cluster's and the service's names (not ARNs), "
                   "e.g. ecs:prod/payments")
            raise BadSelector("is not an ECS service selector", fix)
        return Selector("ecs", f"ecs:{cluster}/{service}")
    if lowered.startswith("tag:"):
        key, sep, value = text[4:].partition("=")
        if not sep or not _TAG_KEY.fullmatch(key) or not _TAG_VALUE.fullmatch(value):
            raise BadSelector("is not a tag selector",
                              "write tag:KEY=VALUE, e.g. tag:team=payments (letters, digits and _ . : / + - @; "
                              "no spaces)")
        return Selector("tag", f"tag:{key}={value}")
    if "/" not in text and _looks_like_address(text):
        raise BadSelector("is an address, not a CIDR", f"use '{text}/{32 if ':' not in text else 128}' for one host")
    if not text or not (text[0].isdigit() or ":" in text):
        raise BadSelector("is not a client selector", f"write one of {EXAMPLES}")
    return Selector("cidr", str(parse_cidr(text)), network=parse_cidr(text))


def _looks_like_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _within(address: IPAddress, network: IPNetwork) -> bool:
    return address.version == network.version and address in network


def normalise_address(raw: str | IPAddress) -> IPAddress:
    address = ipaddress.ip_address(raw) if isinstance(raw, str) else raw
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; selectors are written in IPv4.
        return address.ipv4_mapped
    return address


PolicySelectors = Sequence[tuple[str, Sequence[Selector]]]  # (policy name, its selectors) in document order


def resolve(policies: PolicySelectors, address: IPAddress, endpoint: str | None,
            members: Iterable[str]) -> tuple[str, Selector] | None:
    """The first policy (in document order) with a selector matching the connection, and that selector."""
    member_set = frozenset(members)
    for name, selectors in policies:
        for selector in selectors:
            if selector.matches(address, endpoint, member_set):
                return name, selector
    return None


def needs_lookup(policies: PolicySelectors, address: IPAddress, endpoint: str | None) -> bool:
    """Could a membership selector claim ``address`` before anything the connection itself shows does? Only
    then is an address that no poll has seen worth an AWS lookup."""
    if endpoint is not None:
        return False
    for _, selectors in policies:
        for selector in selectors:
            if selector.membership:
                return True
            if selector.matches(address, None, ()):
                return False
    return False


def endpoint_from_tlv(raw: str) -> str | None:
    """The endpoint ID from ``%{234}proxy_protocol::>h`` as a helper receives it (URL-escaped): AWS's TLV 0xEA
    value is a subtype byte (0x01, the endpoint ID) followed by the ID. None when absent ('-') or not an ID."""
    if raw in {"", "-"}:
        return None
    value = urllib.parse.unquote_to_bytes(raw)
    if value[:1] == b"\x01":
        value = value[1:]
    text = value.decode("ascii", "replace").strip().lower()
    return text if _VPCE.fullmatch(text) else None


# --- the helper process --------------------------------------------------------------------------------------


def load_policies(path: str) -> list[tuple[str, list[Selector]]]:
    """The rendered policy file: {"policies": [{"name": ..., "clients": [selector, ...]}, ...]}."""
    with open(path, encoding="utf-8") as handle:
        decoded = json.load(handle)
    return [(item["name"], [parse_selector(text) for text in item["clients"]]) for item in decoded["policies"]]


class Membership:
    """The supervisor's membership file ({"members": {address: [selector, ...]}}), re-read when it changes.
    A file that cannot be read keeps the last one read (the supervisor logs its own write failures)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._members: dict[str, list[str]] = {}

    def lookup(self) -> Mapping[str, list[str]]:
        try:
            info = os.stat(self.path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as handle:
                    self._members = json.load(handle).get("members", {})
                self._stamp = stamp
        except (OSError, ValueError):
            pass
        return self._members


def ask_supervisor(socket_path: str, address: str, timeout: float) -> tuple[list[str] | None, str | None]:
    """One on-demand lookup: (the address's membership selectors, None) or (None, why it failed). The whole
    exchange takes at most ``timeout`` seconds: Squid waits for this answer."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(address.encode("ascii") + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
    except TimeoutError:
        return None, "lookup_timeout"
    except (OSError, ValueError):
        return None, "lookup_unavailable"
    if answer.get("error"):
        return None, str(answer["error"])
    return list(answer.get("members", [])), None


class Helper:
    def __init__(self, policies: PolicySelectors, membership: Membership, socket_path: str,
                 timeout: float) -> None:
        self.policies = policies
        self.membership = membership
        self.socket_path = socket_path
        self.timeout = timeout
        self._out = threading.Lock()

    def answer(self, address_text: str, tlv: str) -> str:
        try:
            address = normalise_address(urllib.parse.unquote(address_text))
        except ValueError:
            return "ERR identity_error=bad_address"
        endpoint = endpoint_from_tlv(tlv)
        members = self.membership.lookup().get(str(address))
        if members is None and needs_lookup(self.policies, address, endpoint):
            members, error = ask_supervisor(self.socket_path, str(address), self.timeout)
            if error is not None:
                return f"ERR identity_error={error}"
        found = resolve(self.policies, address, endpoint, members or ())
        if found is None:
            return "ERR"
        name, selector = found
        return f"OK client_policy={name} client_identity={selector.text}"

    def serve(self, lines: Iterable[str]) -> None:
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            channel, address, tlv = (parts + ["-", "-"])[:3]
            # A lookup may wait on AWS: answer it from its own thread (Squid matches answers by channel), so
            # one new client never holds up the cached answers for everyone else.
            if self.membership.lookup().get(address) is None:
                threading.Thread(target=self._reply, args=(channel, address, tlv), daemon=True).start()
            else:
                self._reply(channel, address, tlv)

    def _reply(self, channel: str, address: str, tlv: str) -> None:
        try:
            result = self.answer(address, tlv)
        except Exception as exc:  # never leave Squid waiting: fail closed with a reason
            result = f"ERR identity_error={type(exc).__name__}"
        with self._out:
            sys.stdout.write(f"{channel} {result}\n")
            sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: identity_helper.py POLICY_FILE MEMBERSHIP_FILE LOOKUP_SOCKET TIMEOUT", file=sys.stderr)
        return 2
    helper = Helper(load_policies(argv[1]), Membership(argv[2]), argv[3], float(argv[4]))
    helper.serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
