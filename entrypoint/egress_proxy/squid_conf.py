"""Render squid.conf and its companion files from settings + a policy document. Pure: returns text, writes nothing.

The Squid knowledge lives in ``templates/squid.conf.j2``; this module only prepares its inputs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import sys
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from . import __version__
from .access_log import REASONS, tagged_logformat
from .allowlist import Allowlist
from .networks import IPNetwork, normalise, subtract_all
from .policy import INVALID_HOST_SHAPES, REPORTABLE_REASONS, PolicyDocument
from .settings import Settings
from .squid_strings import CERTGEN

# Destinations refused after DNS resolution unless exempted by EGRESS_ALLOW_DESTINATIONS: "this" network,
# RFC 1918, CGNAT, loopback, link-local (169.254.169.254 IMDS, 169.254.170.2 ECS task metadata), IETF
# protocol assignments, benchmarking, multicast and reserved; IPv6 unspecified, loopback, ULA (includes AWS's
# fd00:ec2::254 IMDS), link-local and multicast. IPv4-mapped IPv6 is not listed because Squid stores IPv4
# addresses in that form internally and the entry would match every IPv4 destination.
PRIVATE_DESTINATIONS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)

# Never exempt, whatever EGRESS_ALLOW_DESTINATIONS says: the endpoints that hand out the proxy's own credentials
# and identity. An exemption such as 169.254.0.0/16 (for a link-local service) or a broad 0.0.0.0/0 would otherwise
# let every client read the task role's or the instance's credentials through the proxy: EC2's instance metadata
# (IPv4 and IPv6) and ECS's task metadata and credentials endpoint.
METADATA_DESTINATIONS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr) for cidr in ("169.254.169.254/32", "169.254.170.2/32", "fd00:ec2::254/128"))

# NAT64's well-known prefix (RFC 6052): with DNS64 on (Route 53 Resolver offers it per subnet), an IPv4-only name
# is answered 64:ff9b::<IPv4>, and a NAT gateway translates it back. So every private IPv4 range is private
# inside this prefix too.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

# The SNI helper's interpreter. It needs only the standard library, but it runs as Squid's unprivileged user, who
# may not reach the supervisor's own interpreter (a pyenv build under /root, say), so the system python3 comes
# first. -I (isolated mode) in the template: no user site, no PYTHON* variables.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else (sys.executable or "python3")
TEMPLATES = resources.files("egress_proxy") / "templates"


@dataclass(frozen=True)
class StatePaths:
    """Where everything lives under the state directory. The config refers to these absolute paths."""

    state: Path

    @property
    def conf_dir(self) -> Path:
        return self.state / "conf"

    @property
    def squid_conf(self) -> Path:
        return self.conf_dir / "squid.conf"

    @property
    def policy_dir(self) -> Path:
        return self.conf_dir / "policies"

    def policy_list(self, policy: str, kind: str) -> Path:
        """One policy's ``allow`` or ``deny`` list, one entry a line, read by Squid (dstdomain) and the SNI
        helper alike."""
        return self.policy_dir / f"{policy}.{kind}"

    @property
    def port_rules(self) -> Path:
        """The loaded document's ``ports`` entries, for ``egress-proxy nft-sets`` (PolicyDocument.port_rules)."""
        return self.conf_dir / "ports.json"

    @property
    def port_addresses(self) -> Path:
        """``egress-proxy nft-sets``' memory of the addresses it opened, and until when."""
        return self.state / "port-addresses.json"

    @property
    def candidate_dir(self) -> Path:
        return self.state / "candidate"

    @property
    def cert(self) -> Path:
        return self.state / "tls" / "bump.pem"

    @property
    def key(self) -> Path:
        return self.state / "tls" / "bump.key"

    @property
    def ssl_db(self) -> Path:
        return self.state / "tls" / "ssl_db"

    @property
    def errors(self) -> Path:
        return self.state / "errors"

    @property
    def pid(self) -> Path:
        return self.state / "squid.pid"

    @property
    def cache_fifo(self) -> Path:
        return self.state / "logs" / "cache.fifo"

    @property
    def sni_helper(self) -> Path:
        return self.state / "bin" / "sni_helper.py"

    @property
    def sni_helper_binary(self) -> Path:
        return self.state / "bin" / "sni_helper"

    @property
    def upstream_probe(self) -> Path:
        return self.state / "bin" / "upstream_probe.py"

    @property
    def log_gate(self) -> Path:
        return self.state / "bin" / "log_gate.py"

    @property
    def log_blocked_flag(self) -> Path:
        """Exists while the supervisor cannot write log lines (EGRESS_LOG_FULL=refuse); log_gate.py checks it."""
        return self.state / "logs" / "log_blocked"

    @property
    def identity_helper(self) -> Path:
        return self.state / "bin" / "identity_helper.py"

    @property
    def empty_list(self) -> Path:
        """An empty list file: what Squid's coordinator reads in place of every policy list (see squid.conf.j2)."""
        return self.conf_dir / "empty.list"

    @property
    def identity_policies(self) -> Path:
        """Each policy's client selectors in document order, for the identity helper (rendered with the config:
        Squid restarts its helpers on every reconfigure, so they read the active one)."""
        return self.conf_dir / "identity.json"

    @property
    def identity_dir(self) -> Path:
        return self.state / "identity"

    @property
    def membership(self) -> Path:
        """The membership table (address -> sg-/ecs:/tag: selectors), rewritten atomically by the supervisor."""
        return self.identity_dir / "members.json"

    @property
    def lookup_socket(self) -> Path:
        """The supervisor's on-demand lookup (by private IP), for addresses no poll has seen."""
        return self.identity_dir / "lookup.sock"

    @property
    def status(self) -> Path:
        return self.state / "status.json"

    def in_dir(self, conf_dir: Path) -> StatePaths:
        """The same paths, but with the config files in another directory (for parse-checking candidates)."""
        return _CandidatePaths(self.state, conf_dir)


@dataclass(frozen=True)
class _CandidatePaths(StatePaths):
    candidate_conf_dir: Path

    @property
    def conf_dir(self) -> Path:
        return self.candidate_conf_dir


# A rendered list line as the policy writes it: a host name or ".domain", lower-case LDH labels (underscores too).
_PLAIN_LIST_LINE = re.compile(r"\.?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")


def _directives(squid_conf: str) -> list[str]:
    """squid.conf without its comments (the header counts the entries) and blank lines: what Squid parses."""
    return [line for line in squid_conf.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class RenderedConfig:
    squid_conf: str
    lists: dict[tuple[str, str], str]  # (policy name, "allow" | "deny") -> the list file's text
    identity: str | None = None  # the identity helper's policy file, when policies name clients by identity
    ports: str = ""  # ports.json: the policies' extra ports, for the host's firewall (PolicyDocument.port_rules)

    def differs_in_plain_lists_only(self, active: RenderedConfig | None) -> bool:
        """True when this config differs from ``active`` only in what its list files hold, and every line of them is
        a plain host name or ``.domain`` (the policy validated them; this re-checks the rendered text). Squid's
        dstdomain reads such lines without an error, so a candidate ``squid -k parse`` of this config (over a second
        at 100,000 entries) can prove nothing that the active config's parse did not."""
        if active is None or (_directives(self.squid_conf), self.identity, set(self.lists)) != (
                _directives(active.squid_conf), active.identity, set(active.lists)):
            return False
        return all(_PLAIN_LIST_LINE.fullmatch(line) for text in self.lists.values() for line in text.splitlines())

    def files(self, paths: StatePaths) -> dict[Path, str]:
        listed = {paths.policy_list(name, kind): text for (name, kind), text in self.lists.items()}
        if self.identity is not None:
            listed[paths.identity_policies] = self.identity
        return {**listed, paths.empty_list: "", paths.port_rules: self.ports, paths.squid_conf: self.squid_conf}

    def relocated(self, rendered_for: StatePaths, to: StatePaths) -> RenderedConfig:
        """The same config with its own files (squid.conf, the lists, the identity file) in ``to``'s config
        directory instead of ``rendered_for``'s: a candidate is parse-checked in a copy without rendering it
        twice. Only the config directory moves; every other path (state, certificates, logs) stays."""
        old, new = f"{rendered_for.conf_dir}/", f"{to.conf_dir}/"
        return replace(self, squid_conf=self.squid_conf.replace(old, new))


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (TEMPLATES / name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # squid.conf, not HTML
    )


# The access-log token of a config rendered for reading only (no listener will check it).
PLACEHOLDER_ACCESS_LOG_TOKEN = "TOKEN"


def render(
    settings: Settings, document: PolicyDocument, paths: StatePaths, *, run_as: str | None, denial_port: int,
    access_log_port: int, upstream_login: str | None = None, access_log_token: str = PLACEHOLDER_ACCESS_LOG_TOKEN,
) -> RenderedConfig:
    """Render the config for ``document``. ``run_as`` is the user Squid drops to when started as root;
    ``denial_port`` is the supervisor's loopback CONNECT refusal responder (see denier.py); ``access_log_port`` is
    the supervisor's loopback access-log listener (squid_process.AccessLogListener), and ``access_log_token`` the
    secret it requires at the start of every access line (the default only for a config no listener reads:
    ``egress-proxy render``, tests); ``upstream_login``
    (user:password) is the upstream proxy's login when it is not in EGRESS_UPSTREAM_PROXY itself."""
    listen = settings.listen_address
    listen_text = f"[{listen}]" if listen.version == 6 else str(listen)
    # Intercept ports on an unspecified listen address take a bare port: Squid then opens one socket for IPv4 and
    # IPv6, as the nft ruleset redirects both families' clients there (0.0.0.0:PORT would refuse IPv6 clients).
    intercept_text = "" if listen.is_unspecified else f"{listen_text}:"
    policies = _rendered_policies(document, paths)
    identity = _identity_context(settings, document)
    context = {
        "version": __version__,
        "entry_count": document.entry_count,
        "listen": f"{listen_text}:{settings.port}",
        "paths": paths,
        "certgen": CERTGEN,
        "run_as": run_as,
        "drain_seconds": _squid_seconds(settings.drain_seconds),
        "dns_servers": [str(ip) for ip in settings.dns_servers],
        "client_cidrs": address_list(settings.client_cidrs),
        "policies": policies,
        "policy_groups": _policy_groups(policies),
        "policy_clients": address_list(net for policy in policies for net in policy["networks"]),
        "report_clients": address_list(net for policy in policies if policy["mode"] == "report"
                                       for net in policy["networks"]),
        "report_policies": any(policy["mode"] == "report" for policy in policies),
        "reportable_reasons": sorted(REPORTABLE_REASONS),
        "invalid_host_shapes": INVALID_HOST_SHAPES,
        "allowed_ports": settings.allowed_ports,
        "forbidden_destinations": [str(net) for net in forbidden_destinations(settings.allow_destinations)],
        "reasons": list(REASONS),
        "logformat": tagged_logformat(access_log_token),
        "denial_port": denial_port,
        "access_log_port": access_log_port,
        "access_log_buffer": ACCESS_LOG_BUFFER,
        "workers": settings.workers,
        "worker_revival_delay": WORKER_REVIVAL_DELAY_SECONDS,
        "log_gate": ({"script": paths.log_gate, "flag": paths.log_blocked_flag} if settings.log_full == "refuse"
                     else None),
        "own_address": "" if listen.is_unspecified or listen.is_loopback else str(listen),
        "python": PYTHON,
        "sni_helper": _sni_helper_command(paths),
        "websockets": settings.websockets,
        "tunnel_idle_timeout": settings.tunnel_idle_timeout,
        "client_idle_timeout": settings.client_idle_timeout,
        "upstream": _upstream_context(settings, upstream_login),
        "identity": identity,
        "proxy_protocol_from": ([str(net) for net in normalise(settings.proxy_protocol_from)]
                                if settings.proxy_protocol == "required" else []),
        "transparent": settings.transparent,
        "intercept": {"http": f"{intercept_text}{settings.intercept_http_port}",
                      "https": f"{intercept_text}{settings.intercept_https_port}"},
    }
    squid_conf = _environment().get_template("squid.conf.j2").render(context)
    # Squid reads an empty ACL file as "matches nothing", which is what an empty list means.
    lists = {(policy.name, kind): _list_text(getattr(policy, kind))
             for policy in document.policies for kind in ("allow", "deny")}
    return RenderedConfig(squid_conf=squid_conf, lists=lists, identity=identity_policy_file(document),
                          ports=json.dumps({"rules": document.port_rules()}, indent=1) + "\n")


# How long the identity helper waits for the supervisor's on-demand lookup (one EC2 call) before it answers ERR.
# Squid holds the request meanwhile, so this bounds the wait of a client nobody has seen yet.
IDENTITY_LOOKUP_TIMEOUT = 2.0


def identity_policy_file(document: PolicyDocument) -> str | None:
    """The identity helper's policy file (None when every policy names clients by CIDR only)."""
    if not document.by_identity:
        return None
    return json.dumps({"policies": [{"name": policy.name, "clients": [s.text for s in policy.selectors]}
                                    for policy in document.policies]}, indent=1)


def settings_warnings(settings: Settings, document: PolicyDocument) -> list[str]:
    """Selectors that the settings make unmatchable: a vpce- selector needs the endpoint ID that only a PROXY
    header carries."""
    if settings.proxy_protocol == "required":
        return []
    return [f"policies[{index}].clients[{position}] {selector.text!r} can never match: EGRESS_PROXY_PROTOCOL is "
            "off, so no connection carries a VPC endpoint ID; set EGRESS_PROXY_PROTOCOL=required behind the endpoint "
            "service's load balancer"
            for index, policy in enumerate(document.policies)
            for position, selector in enumerate(policy.selectors) if selector.kind == "vpce"]


def _identity_context(settings: Settings, document: PolicyDocument) -> dict[str, Any] | None:
    """With any identity selector, the helper judges every policy's membership: first match in document order
    runs over all kinds, so a CIDR policy listed after a security group's must not claim that group's members."""
    if not document.by_identity:
        return None
    selectors = list(dict.fromkeys(s.text for policy in document.policies for s in policy.selectors))
    return {"ttl": settings.identity_ttl, "timeout": IDENTITY_LOOKUP_TIMEOUT, "selectors": selectors,
            "report_policies": [policy.name for policy in document.policies if policy.mode == "report"]}


# Squid's hopeless_kid_revival_delay (the template says why this value).
WORKER_REVIVAL_DELAY_SECONDS = 30
# Each worker's access-log buffer (access_log tcp:// ... buffer-size): the lines a worker holds while the supervisor
# is not reading (its relay waits up to 200 ms between reads at a trickle, or it is starved of CPU). 4 MB is about
# 12,000 lines, over a second of a busy worker's log; a full buffer drops lines (counted), never blocks.
ACCESS_LOG_BUFFER = "4MB"


def listeners(settings: Settings) -> int:
    """How many ports each worker listens on (the template's http_port and https_port lines). Each logs its own
    "Accepting" line, so "every worker accepts" means workers x this many lines: counting one line per worker let
    the supervisor declare Squid serving while a worker's intercept port was still closed."""
    return 3 if settings.transparent else 1


# A source address no TCP client has (IPv4 broadcast): stands in for an empty client list, which Squid rejects.
NO_ADDRESS = "255.255.255.255/32"


def _rendered_policies(document: PolicyDocument, paths: StatePaths) -> list[dict[str, Any]]:
    """The policies as the template needs them, each with the clients it really judges: its own CIDRs minus those
    of every earlier policy (a client belongs to the first policy that contains it), so that the rendered rules
    can name one policy's clients without repeating "and not an earlier policy's". A policy left with no clients
    never applies (the document's warnings say so) and is not rendered. With identity selectors the helper
    judges membership, so every policy is rendered (its ``clients`` are then unused)."""
    rendered: list[dict[str, Any]] = []
    earlier: list[IPNetwork] = []
    for policy in document.policies:
        own = normalise(subtract_all(policy.clients, earlier))
        earlier += policy.clients
        if own or document.by_identity:
            rendered.append({
                "name": policy.name,
                "mode": policy.mode,
                "networks": own,
                "clients": address_list(own),
                "allow": paths.policy_list(policy.name, "allow"),
                "deny": paths.policy_list(policy.name, "deny"),
            })
    return rendered


def _list_text(entries: Allowlist) -> str:
    return "".join(entry + "\n" for entry in sorted(entries.entries, key=squid_domain_order))


def _policy_groups(policies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The policies in document order, cut into about sqrt(N) groups of about sqrt(N) each: the rules walk one
    membership check per group, then one per policy of the client's group (see the name checks in squid.conf.j2).
    ``clients`` is the union of the group's clients (disjoint already: each policy holds only its own)."""
    size = max(1, math.isqrt(len(policies) - 1) + 1) if policies else 1
    return [{"name": f"policies_{start // size + 1}", "policies": policies[start:start + size],
             "clients": address_list(net for policy in policies[start:start + size] for net in policy["networks"])}
            for start in range(0, len(policies), size)]


def address_list(networks: Iterable[IPNetwork]) -> list[str]:
    """An address list as a Squid src/dst ACL takes it: collapsed (Squid drops one of two overlapping entries,
    networks.py), never empty (Squid rejects an empty list; NO_ADDRESS matches no client), and without
    0.0.0.0/0, which Squid 5.7 rejects ("needs to be replaced by the term 'all'", and 'all' would take IPv6 too):
    its two halves say the same."""
    listed: list[str] = []
    for net in normalise(networks):
        listed += ["0.0.0.0/1", "128.0.0.0/1"] if net == EVERY_IPV4 else [str(net)]
    return listed or [NO_ADDRESS]


EVERY_IPV4 = ipaddress.IPv4Network("0.0.0.0/0")


def _upstream_context(settings: Settings, login: str | None) -> dict[str, object] | None:
    upstream = settings.upstream_proxy
    if upstream is None:
        return None
    login = upstream.login or login
    # Squid URL-unescapes cache_peer login=, so escaping makes any character one safe squid.conf token.
    escaped = ":".join(urllib.parse.quote(part, safe="") for part in login.split(":", 1)) if login else None
    return {"host": upstream.host, "port": upstream.port, "login": escaped,
            "no_proxy": list(settings.upstream_no_proxy)}


def forbidden_destinations(exempt: tuple[IPNetwork, ...]) -> list[IPNetwork]:
    """The SSRF guard's ranges: every private range (and its NAT64 image) minus the exempt ones.

    One ``dst`` ACL must say it: Squid's ``dst`` matches when ANY resolved address matches, so the obvious
    ``deny private_destination !exempt_destination`` lets an answer holding one exempt address disarm the rule,
    and Squid then connects to another, non-exempt one. ``deny forbidden_destination`` refuses a name when any of
    its addresses is forbidden. The metadata endpoints stay forbidden whatever is exempt (so the ACL is never
    empty)."""
    private = list(PRIVATE_DESTINATIONS) + [_nat64(net) for net in _ipv4(PRIVATE_DESTINATIONS)]
    holes = list(exempt) + [_nat64(net) for net in _ipv4(exempt)]
    metadata = list(METADATA_DESTINATIONS) + [_nat64(net) for net in _ipv4(METADATA_DESTINATIONS)]
    return list(normalise([*subtract_all(private, holes), *metadata]))


def _ipv4(networks: Iterable[IPNetwork]) -> list[ipaddress.IPv4Network]:
    return [net for net in networks if isinstance(net, ipaddress.IPv4Network)]


def _nat64(net: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    base = int(NAT64_PREFIX.network_address) + int(net.network_address)
    return ipaddress.IPv6Network((base, 96 + net.prefixlen))


def squid_domain_order(entry: str) -> str:
    """The order of Squid's dstdomain splay tree (matchDomainName, via aclDomainCompare): names compared character
    by character from their right end (the leading '.' of a '.domain' entry aside), a '.' before every other
    character, and a name before the longer names it ends. Written in that order, each entry a worker reads on a
    reconfigure lands at the tree's edge after a comparison or two; in any other order each insert splays through
    about log2(n) entries, and each comparison walks the common suffix with a tolower() per character. ``squid -k
    parse`` of the bench's 100,000 entries took 0.06 s of CPU in this order against 0.86 s label by label (the order
    written before) or shuffled; of 100,000 varied names, 0.04 s against 0.15 s and 0.43 s. Only the speed depends
    on it: a minimal list (no entry covers another) loads the same entries in any order. Lists hold lower-case LDH
    names only, so no case folding is needed here."""
    return entry.lstrip(".")[::-1].replace(".", "\0")  # '\0' sorts before every character of a name


def service_name(paths: StatePaths) -> str:
    """Squid's -n service name, unique per state dir: SMP mode names its IPC sockets (in /run/squid) and shared
    memory segments after it, so two proxies on one host (tests, or a sidecar) must not share one."""
    digest = hashlib.sha256(str(paths.state.resolve()).encode()).hexdigest()[:10]
    return f"egress{digest}"


def _squid_seconds(seconds: float) -> int:
    # Squid's time units are whole; round up so a short drain is never zero by accident.
    return max(0, int(-(-seconds // 1)))


def default_error_page() -> str:
    return (TEMPLATES / "ERR_EGRESS_DENIED.html").read_text(encoding="utf-8")


def upstream_error_page() -> str:
    return (TEMPLATES / "ERR_EGRESS_UPSTREAM.html").read_text(encoding="utf-8")


def identity_helper_script() -> str:
    return (resources.files("egress_proxy") / "identity_helper.py").read_text(encoding="utf-8")


def compiled_sni_helper() -> Path | None:
    """The compiled SNI helper (sni_helper.c, built by scripts/build-sni-helper into the package), or None when
    this install has none. It answers exactly as sni_helper.py does (a differential test checks it), in a few
    microseconds of CPU per lookup instead of about 230."""
    path = Path(str(resources.files("egress_proxy") / "compiled" / "sni_helper"))
    return path if path.is_file() else None


def _sni_helper_command(paths: StatePaths) -> str:
    """The compiled helper when the package has one (prepare_state_dir copies it into the state dir), else the
    reference model in Python."""
    if compiled_sni_helper() is not None:
        return str(paths.sni_helper_binary)
    return f"{PYTHON} -I {paths.sni_helper}"


def sni_helper_script() -> str:
    return (resources.files("egress_proxy") / "sni_helper.py").read_text(encoding="utf-8")


def log_gate_script() -> str:
    return (resources.files("egress_proxy") / "log_gate.py").read_text(encoding="utf-8")


def upstream_probe_script() -> str:
    return (resources.files("egress_proxy") / "upstream_probe.py").read_text(encoding="utf-8")
