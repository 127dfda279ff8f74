"""Policy documents: per-client allow and deny lists, each enforced or only reported.

Pure, like allowlist.py (whose grammar, normalisation, errors and collapse this module reuses): text in, a
:class:`PolicyDocument` or an :class:`AllowlistError` naming every problem by its path out.

An allowlist value (file, secret or inline) is either

* today's flat list (``parse_allowlist_value``'s comma/newline form or ``{"allowed_domains": [...]}``), read as
  one policy named ``default``, mode ``enforce``, whose clients are ``EGRESS_CLIENT_CIDRS``; or
* a JSON document ``{"policies": [{"name", "clients", "mode", "allow", "deny"}, ...]}``.

A request belongs to the first policy, in document order, whose ``clients`` contain its source address, after
``EGRESS_CLIENT_CIDRS`` has admitted it. :meth:`PolicyDocument.decide` is the reference model of the decision the
Squid configuration renders: the integration tests compare Squid's log lines against it.

What the renderer needs is ``PolicyDocument.policies``: per policy, in document order, its ``name`` (safe in a
Squid ACL name), ``mode``, ``clients`` (networks), and ``allow.entries`` / ``deny.entries``, each minimal (no entry
covered by another of the same list) as Squid's ``dstdomain`` requires.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .allowlist import (
    MAX_WARNINGS,
    Allowlist,
    AllowlistError,
    AllowlistProblem,
    _check_size,
    _json_type,
    _truncate,
    parse_allowlist_items,
    parse_allowlist_value,
    transitional_spelling,
)
from .identity_helper import BadSelector, Selector, normalise_address, parse_cidr, parse_selector, resolve
from .networks import LOOPBACK, covered, normalise, subtract_all
from .sni_helper import Malformed, host_name

__all__ = [
    "ALWAYS_ENFORCED_REASONS",
    "DEFAULT_POLICY",
    "POLICY_KEYS",
    "REPORTABLE_REASONS",
    "Policy",
    "PortRule",
    "PolicyDiff",
    "PolicyDocument",
    "Tunnel",
    "Verdict",
    "parse_policy_document",
    "parse_policy_value",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Mode = Literal["enforce", "report"]
Decision = Literal["allowed", "denied", "would_deny"]

DEFAULT_POLICY = "default"
MODES: tuple[Mode, ...] = ("enforce", "report")
POLICY_KEYS = ("name", "clients", "mode", "allow", "deny", "ports")
# tcp/80 and tcp/443 always go to Squid's name checks (the host redirects them before any forwarding rule), so a
# `ports` entry for them could never apply.
INTERCEPTED_PORTS = (80, 443)
POLICY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

# Report mode turns exactly these refusals into 'would_deny' (they are about names, which is what an operator
# learns from traffic). Everything else stays refused in every mode: report mode must never open the metadata
# service, another port, or the proxy to strangers. A malformed SNI (two names, a NUL, an IP address) is a
# fronting trick, not a name to learn, and an unanswered SNI check fails closed: both stay enforced too.
REPORTABLE_REASONS = frozenset(
    {"domain_not_allowlisted", "domain_denied", "sni_not_allowlisted", "sni_missing", "ip_literal"}
)
ALWAYS_ENFORCED_REASONS = frozenset(
    {"client_not_allowed", "port_not_allowed", "destination_not_public", "not_tls", "manager_denied",
     "sni_malformed", "sni_unchecked", "invalid_host"}
)

# The same host shapes as the template's `ip_literal` ACL: only digits and dots (also short forms such as
# '10.1'), or an IPv6 literal with or without brackets. Hosts are compared lowercased.
_IP_LITERAL = re.compile(r"[0-9.]+|\[?[0-9a-f:.]*:[0-9a-f:.]*\]?")

# A host (HTTP URI host or CONNECT target) holding any character outside these is refused as `invalid_host` before
# any name check, in every mode: the lists hold names in their ASCII (punycode) form, so a raw UTF-8 'bücher.example'
# would pass a deny rule written for it, and a DNS wildcard would still resolve it. Percent escapes, fullwidth dots
# and every other non-LDH character are refused alike. Letters, digits, '-', '.', '_' (some real host names have
# one) and the IPv6 literal's ':[]' (refused as ip_literal later). The template's `invalid_host` ACL is this very
# pattern (POSIX ERE and Python agree on it: ']' first in the set is literal, '-' last is literal).
INVALID_HOST_CHARACTER = r"[^]a-zA-Z0-9._:[-]"
# ... and so is a host no DNS name can be: a label over 63 octets, or over 253 octets in all (254 with the one
# trailing dot). Squid passes such a name on to its resolver, which cannot encode it: the request was held for the
# whole DNS timeout (35 s) and then logged as an allowed request whose forwarding failed, tying up a connection
# for each. (No IPv6 literal has 64 characters without a dot, nor is any IP literal that long.)
INVALID_HOST_SHAPES = (INVALID_HOST_CHARACTER, r"[^.]{64}", r"^.{253}[^.]", r"^.{255}")
_INVALID_HOST = re.compile("|".join(INVALID_HOST_SHAPES))

_EXAMPLE_POLICY = '{"name": "default", "clients": ["10.0.0.0/8"], "allow": [".example.com"]}'
_DOCUMENT_FIX = (
    'use {"policies": [' + _EXAMPLE_POLICY + ']} or the flat form {"allowed_domains": ["example.com"]}'
)


@dataclass(frozen=True)
class Verdict:
    """The outcome for one request: which policy judged it, the decision, and the reason code logged with it.

    ``policy`` is None when no policy applies (the client is outside EGRESS_CLIENT_CIDRS or in no policy).
    ``reason`` is 'allowed' for an allowed request; for 'would_deny' it is the reason enforce mode would give."""

    policy: str | None
    decision: Decision
    reason: str


@dataclass(frozen=True)
class Tunnel:
    """What Squid saw at the start of a CONNECT tunnel it let through step 1 (see sni_helper.py): was it TLS,
    the SNI host name, whether the ClientHello was malformed beyond the name itself (more than one name or
    server_name extension), and whether the SNI check answered at all."""

    tls: bool = True
    sni: str | None = None
    malformed: bool = False
    checked: bool = True


@dataclass(frozen=True)
class PortRule:
    """One ``ports`` entry: the policy's clients may open TCP connections to ``host`` (an exact name, which the
    host's firewall resolves) or to ``network`` (a CIDR), on ports ``first`` to ``last``. These never pass through
    Squid: the host's nftables rules forward them (see nft_rules.py). ``text`` is the normalised entry."""

    text: str
    first: int
    last: int
    host: str | None = None
    network: IPNetwork | None = None

    @property
    def port_text(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Policy:
    """One validated policy. ``allow`` and ``deny`` are minimal, sorted lists in the allowlist grammar.

    ``selectors`` are its ``clients`` items in document order (identity_helper.py's grammar: CIDRs, security
    groups, ECS services, tags, VPC endpoints); ``clients`` are its plain CIDRs among them, the part Squid's
    ``src`` ACLs can judge alone. Without ``selectors``, the policy's clients are ``clients``."""

    name: str
    clients: tuple[IPNetwork, ...]
    mode: Mode = "enforce"
    allow: Allowlist = field(default_factory=lambda: Allowlist(()))
    deny: Allowlist = field(default_factory=lambda: Allowlist(()))
    selectors: tuple[Selector, ...] = ()
    ports: tuple[PortRule, ...] = ()

    def __post_init__(self) -> None:
        if not self.selectors:
            cidrs = tuple(Selector("cidr", str(network), network=network) for network in self.clients)
            object.__setattr__(self, "selectors", cidrs)

    @property
    def by_identity(self) -> bool:
        """Does any selector need more than the source address (AWS membership, or the PROXY header)?"""
        return any(selector.kind != "cidr" for selector in self.selectors)

    def contains(self, address: IPAddress) -> bool:
        return any(address in network for network in self.clients)

    def host_reason(self, host: str) -> str | None:
        """Why this policy's names refuse `host` (the HTTP host or CONNECT target), or None if they allow it.

        The order is the rendered rules' order: an IP literal is never a name; `deny` wins over `allow`."""
        if _is_ip_literal(host):
            return "ip_literal"
        if self.deny.allows(host):
            return "domain_denied"
        if self.allow.allows(host):
            return None
        return "domain_not_allowlisted"

    def sni_reason(self, sni: str | None) -> str | None:
        """Why this policy refuses a tunnel's TLS SNI, or None; in sni_helper.py's order (missing, malformed,
        then the lists). A denied SNI gets the deny list's reason, `domain_denied`, so that the reason always
        says which list to edit; the log line's `sni` field shows that the refusal came from inside the
        tunnel."""
        if sni is None or not sni:
            return "sni_missing"
        try:
            host_name(sni.encode("utf-8", "surrogateescape"))
        except Malformed:
            return "sni_malformed"
        if self.deny.allows(sni):
            return "domain_denied"
        if self.allow.allows(sni):
            return None
        return "sni_not_allowlisted"

    def to_json(self) -> dict[str, object]:
        """The normalised policy, as written back to a document (every key explicit, but ``ports`` only when it
        has entries: it means something in transparent mode only, and most documents never need it)."""
        policy: dict[str, object] = {
            "name": self.name,
            "clients": [selector.text for selector in self.selectors],
            "mode": self.mode,
            "allow": list(self.allow.entries),
            "deny": list(self.deny.entries),
        }
        if self.ports:
            policy["ports"] = [rule.text for rule in self.ports]
        return policy


@dataclass(frozen=True)
class PolicyDocument:
    """A validated allowlist value of either form.

    ``flat`` is True for today's flat list (one policy 'default', enforce, clients = EGRESS_CLIENT_CIDRS).
    ``client_cidrs`` is EGRESS_CLIENT_CIDRS, the gate every request passes before any policy."""

    policies: tuple[Policy, ...]
    client_cidrs: tuple[IPNetwork, ...]
    flat: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_flat(cls, allowlist: Allowlist, client_cidrs: Sequence[IPNetwork]) -> PolicyDocument:
        """A flat list as the one policy it stands for: 'default', enforce, clients = EGRESS_CLIENT_CIDRS."""
        gate = tuple(client_cidrs)
        default = Policy(DEFAULT_POLICY, gate, "enforce", allowlist, Allowlist(()))
        return cls((default,), gate, flat=True, warnings=allowlist.warnings)

    @property
    def allowlist(self) -> Allowlist:
        """The flat list's Allowlist, for code that renders a single list. Raises ValueError for a document."""
        if not self.flat:
            raise ValueError("a policy document has no single allowlist; render its policies")
        return self.policies[0].allow

    @property
    def entry_count(self) -> int:
        return sum(len(policy.allow) + len(policy.deny) for policy in self.policies)

    def entries_by_policy(self) -> dict[str, dict[str, object]]:
        """Per policy, in document order: its mode and the sizes of its lists (the 'started' and 'reloaded'
        log lines carry this, so a rollout can see each policy's state, not one total)."""
        return {policy.name: {"mode": policy.mode, "allow": len(policy.allow), "deny": len(policy.deny)}
                for policy in self.policies}

    def entries_text(self, limit: int = 10) -> str:
        """``team-a: 12 allow + 1 deny, enforce; watch: 3 allow, report``: the first ``limit`` policies (a log
        message stays readable with 200 of them; entries_by_policy has them all)."""
        parts = []
        for policy in self.policies[:limit]:
            deny = f" + {len(policy.deny)} deny" if policy.deny.entries else ""
            parts.append(f"{policy.name}: {len(policy.allow)} allow{deny}, {policy.mode}")
        if len(self.policies) > limit:
            parts.append(f"and {len(self.policies) - limit} more policies")
        return "; ".join(parts) or "no policy"

    def policy(self, name: str) -> Policy | None:
        return next((policy for policy in self.policies if policy.name == name), None)

    @property
    def by_identity(self) -> bool:
        """Does any policy name clients by more than a CIDR? Then the identity helper judges membership."""
        return any(policy.by_identity for policy in self.policies)

    def select(self, client_ip: str | IPAddress, *, endpoint: str | None = None,
               members: Iterable[str] = ()) -> Policy | None:
        """The policy a client belongs to: None outside EGRESS_CLIENT_CIDRS or in no policy. ``endpoint`` is
        the VPC endpoint a PROXY header named; ``members`` the membership selectors AWS lists for the address."""
        found = self.identify(client_ip, endpoint=endpoint, members=members)
        return found[0] if found else None

    def identify(self, client_ip: str | IPAddress, *, endpoint: str | None = None,
                 members: Iterable[str] = ()) -> tuple[Policy, Selector] | None:
        """The policy a client belongs to and the selector that matched (first match in document order)."""
        address = _address(client_ip)
        if not any(address in network for network in self.client_cidrs):
            return None
        found = resolve([(policy.name, policy.selectors) for policy in self.policies], address, endpoint, members)
        if found is None:
            return None
        policy = self.policy(found[0])
        assert policy is not None
        return policy, found[1]

    def decide(
        self,
        client_ip: str | IPAddress,
        host: str,
        *,
        port_allowed: bool = True,
        destination_public: bool = True,
        tunnel: Tunnel | None = None,
        endpoint: str | None = None,
        members: Iterable[str] = (),
    ) -> Verdict:
        """The decision for one request, in the order the rendered Squid rules apply.

        `host` is the HTTP host or the CONNECT target. The facts a pure model cannot know are arguments:
        `port_allowed` (EGRESS_ALLOWED_PORTS for this kind of request), `destination_public` (the SSRF guard's
        verdict on what the name resolves to, or on the literal), and `tunnel` (for a CONNECT that got past its
        first checks: what the ClientHello showed). In report mode each reportable refusal is remembered and
        the request goes on; the first one is the reason logged with 'would_deny'. Always-enforced checks after
        it still refuse, so a report-mode name pointing at a private address is 'denied'."""
        policy = self.select(client_ip, endpoint=endpoint, members=members)
        if policy is None:
            return Verdict(None, "denied", "client_not_allowed")
        if not port_allowed:
            return Verdict(policy.name, "denied", "port_not_allowed")
        if _INVALID_HOST.search(host):
            return Verdict(policy.name, "denied", "invalid_host")
        would_deny: str | None = None
        reason = policy.host_reason(host)
        if reason is not None:
            if policy.mode == "enforce":
                return Verdict(policy.name, "denied", reason)
            would_deny = reason
        if not destination_public:
            return Verdict(policy.name, "denied", "destination_not_public")
        if tunnel is not None:
            if not tunnel.tls:
                return Verdict(policy.name, "denied", "not_tls")
            if not tunnel.checked:
                return Verdict(policy.name, "denied", "sni_unchecked")
            reason = "sni_malformed" if tunnel.malformed else policy.sni_reason(tunnel.sni)
            if reason in ALWAYS_ENFORCED_REASONS:
                return Verdict(policy.name, "denied", str(reason))
            if reason is not None:
                if policy.mode == "enforce":
                    return Verdict(policy.name, "denied", reason)
                would_deny = would_deny or reason
        if would_deny is not None:
            return Verdict(policy.name, "would_deny", would_deny)
        return Verdict(policy.name, "allowed", "allowed")

    def port_rules(self) -> list[dict[str, Any]]:
        """What the host's firewall needs of the ``ports`` entries (``ports.json``, read by ``egress-proxy
        nft-sets``): per entry, the policy, the client networks that really land in it (inside EGRESS_CLIENT_CIDRS,
        minus every network an earlier policy claims: the first match wins, as in Squid; never loopback), the
        target (a ``host`` name or a ``network``) and the ports."""
        rules: list[dict[str, Any]] = []
        earlier: list[IPNetwork] = []
        for policy in self.policies:
            inside = [_smaller(client, gate) for client in policy.clients for gate in self.client_cidrs
                      if _overlap(client, gate)]
            networks = normalise(subtract_all(inside, [*earlier, *LOOPBACK]))
            earlier.extend(policy.clients)
            for rule in policy.ports:
                if not networks:
                    continue
                target = {"host": rule.host} if rule.host is not None else {"network": str(rule.network)}
                rules.append({"policy": policy.name, "entry": rule.text, "clients": [str(net) for net in networks],
                              **target, "ports": rule.port_text})
        return rules

    def to_json(self) -> dict[str, object]:
        if self.flat:
            return {"allowed_domains": list(self.allowlist.entries)}
        return {"policies": [policy.to_json() for policy in self.policies]}

    def to_value(self) -> str:
        """The normalised value `allowlist push` writes: the flat list's JSON form (unchanged from before
        policies existed), or a compact document (Secrets Manager holds at most 64 KiB)."""
        if self.flat:
            return json.dumps(self.to_json())
        return json.dumps(self.to_json(), separators=(",", ":"))

    def diff(self, newer: PolicyDocument) -> PolicyDiff:
        return PolicyDiff.between(self, newer)


# --------------------------------------------------------------------------------------------------------------
# Diff
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyChange:
    """What changes in one policy (matched by name) from the old document to the new one."""

    name: str
    status: Literal["added", "removed", "changed"]
    mode: tuple[str | None, str | None] = (None, None)  # (old, new) when it changes
    clients: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # (added, removed)
    allow: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    deny: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    ports: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

    @property
    def added(self) -> int:
        return len(self.clients[0]) + len(self.allow[0]) + len(self.deny[0]) + len(self.ports[0])

    @property
    def removed(self) -> int:
        return len(self.clients[1]) + len(self.allow[1]) + len(self.deny[1]) + len(self.ports[1])

    def lines(self) -> list[str]:
        old_mode, new_mode = self.mode
        if self.status == "added":
            head = f"policy {self.name}: added (mode {new_mode})"
        elif self.status == "removed":
            head = f"policy {self.name}: removed"
        elif old_mode != new_mode:
            head = f"policy {self.name}: mode {old_mode} -> {new_mode}"
        else:
            head = f"policy {self.name}:"
        lines = [head]
        for kind, (added, removed) in (("client", self.clients), ("allow", self.allow), ("deny", self.deny),
                                       ("port", self.ports)):
            lines.extend(f"  + {kind} {item}" for item in added)
            lines.extend(f"  - {kind} {item}" for item in removed)
        return lines


@dataclass(frozen=True)
class PolicyDiff:
    """Per-policy changes between two documents, plus whether the order of the policies changed (the order
    decides which policy a client lands in). Empty when the new value would change nothing."""

    changes: tuple[PolicyChange, ...]
    order: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (old, new) names when the order changes
    form: tuple[str, str] | None = None  # ('flat', 'document') etc. when the form changes

    @property
    def added(self) -> int:
        return sum(change.added for change in self.changes)

    @property
    def mode_changes(self) -> tuple[tuple[str, str, str], ...]:
        """(policy, old mode, new mode) for each policy kept whose mode changes: a rollout's report -> enforce."""
        return tuple((change.name, str(change.mode[0]), str(change.mode[1])) for change in self.changes
                     if change.status == "changed" and change.mode[0] != change.mode[1])

    @property
    def removed(self) -> int:
        return sum(change.removed for change in self.changes)

    def __bool__(self) -> bool:
        return bool(self.changes or self.order or self.form)

    @classmethod
    def between(cls, old: PolicyDocument, new: PolicyDocument) -> PolicyDiff:
        old_by_name = {policy.name: policy for policy in old.policies}
        new_by_name = {policy.name: policy for policy in new.policies}
        changes: list[PolicyChange] = []
        for policy in new.policies:
            before = old_by_name.get(policy.name)
            if before is None:
                changes.append(PolicyChange(
                    policy.name, "added", mode=(None, policy.mode),
                    clients=(tuple(s.text for s in policy.selectors), ()),
                    allow=(policy.allow.entries, ()), deny=(policy.deny.entries, ()),
                    ports=(tuple(rule.text for rule in policy.ports), ())))
                continue
            change = PolicyChange(
                policy.name, "changed", mode=(before.mode, policy.mode),
                clients=_set_diff([s.text for s in before.selectors], [s.text for s in policy.selectors]),
                allow=before.allow.diff(policy.allow), deny=before.deny.diff(policy.deny),
                ports=_set_diff([rule.text for rule in before.ports], [rule.text for rule in policy.ports]))
            if change.added or change.removed or before.mode != policy.mode:
                changes.append(change)
        for policy in old.policies:
            if policy.name not in new_by_name:
                changes.append(PolicyChange(
                    policy.name, "removed", mode=(policy.mode, None),
                    clients=((), tuple(str(n) for n in policy.clients)),
                    allow=((), policy.allow.entries), deny=((), policy.deny.entries),
                    ports=((), tuple(rule.text for rule in policy.ports))))
        old_order = tuple(name for name in old_by_name if name in new_by_name)
        new_order = tuple(name for name in new_by_name if name in old_by_name)
        order = (tuple(old_by_name), tuple(new_by_name)) if old_order != new_order else None
        form = None
        if old.flat != new.flat:
            form = ("flat" if old.flat else "document", "flat" if new.flat else "document")
        return cls(tuple(changes), order, form)

    def lines(self) -> list[str]:
        lines: list[str] = []
        if self.form is not None:
            shown = {"flat": "flat list", "document": "document"}
            lines.append(f"form: {shown[self.form[0]]} -> {shown[self.form[1]]}")
        for change in self.changes:
            lines.extend(change.lines())
        if self.order is not None:
            lines.append(f"order: {', '.join(self.order[0])} -> {', '.join(self.order[1])}")
        return lines


def _set_diff(old: Iterable[str], new: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    before, after = set(old), set(new)
    return tuple(sorted(after - before)), tuple(sorted(before - after))


# --------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------


def parse_policy_value(value: str, *, source: str, client_cidrs: Sequence[IPNetwork]) -> PolicyDocument:
    """Parse an allowlist value of either form. Raises AllowlistError naming every problem.

    A value whose JSON object has a 'policies' key is a policy document; anything else is handed to
    :func:`parse_allowlist_value` unchanged, so flat lists keep every behaviour and message they had."""
    _check_size(value, source)
    gate = tuple(client_cidrs)
    stripped = value.strip()
    if stripped.startswith("{"):
        try:
            decoded = json.loads(stripped)
        except ValueError:
            decoded = None  # parse_allowlist_value explains the JSON error in its usual words
        if isinstance(decoded, dict):
            if "policies" in decoded:
                return parse_policy_document(decoded, source=source, client_cidrs=gate)
            if "allowed_domains" not in decoded:
                raise AllowlistError([AllowlistProblem(
                    entry=_truncate(stripped), why="has neither a 'policies' nor an 'allowed_domains' key",
                    fix=_DOCUMENT_FIX)], source)
    return PolicyDocument.from_flat(parse_allowlist_value(value, source=source), gate)


def parse_policy_document(
    decoded: object, *, source: str, client_cidrs: Sequence[IPNetwork]
) -> PolicyDocument:
    """Validate a decoded JSON policy document as a whole. Raises AllowlistError with every problem, each
    named by its path ('policies[1].allow[3]') and with a suggested fix."""
    problems: list[AllowlistProblem] = []
    warnings: list[str] = []
    gate = tuple(client_cidrs)
    if not isinstance(decoded, dict):
        raise AllowlistError([AllowlistProblem(
            entry=_truncate(json.dumps(decoded)), why=f"is a JSON {_json_type(decoded)}, not an object",
            fix=_DOCUMENT_FIX)], source)
    for key in decoded:
        if key != "policies":
            problems.append(AllowlistProblem(
                "", "is not a key of a policy document (it has only 'policies')",
                "move it into a policy, or remove it", path=str(key)))
    items = decoded.get("policies")
    if not isinstance(items, list):
        problems.append(AllowlistProblem(
            "", f"is a JSON {_json_type(items)}, not a list", f"write a list of policies: [{_EXAMPLE_POLICY}]",
            path="policies"))
        raise AllowlistError(problems, source)
    if not items:
        warnings.append("policies: the document has no policy: every client is refused (client_not_allowed)")

    policies: list[Policy] = []
    names: dict[str, int] = {}
    for index, item in enumerate(items):
        policy = _parse_policy(item, index, names, problems, warnings)
        if policy is not None:
            policies.append(policy)
    if problems:
        raise AllowlistError(problems, source)

    warnings.extend(_document_warnings(policies, gate))
    if len(warnings) > MAX_WARNINGS:
        hidden = len(warnings) - MAX_WARNINGS
        warnings = warnings[:MAX_WARNINGS] + [f"... and {hidden} more warnings"]
    return PolicyDocument(tuple(policies), gate, flat=False, warnings=tuple(warnings))


def _parse_policy(
    item: object, index: int, names: dict[str, int], problems: list[AllowlistProblem], warnings: list[str]
) -> Policy | None:
    """One policy, or None with its problems appended (every one, not just the first). `names` maps the names
    seen so far to their index."""
    path = f"policies[{index}]"
    if not isinstance(item, dict):
        problems.append(AllowlistProblem(
            _truncate(json.dumps(item)), f"is a JSON {_json_type(item)}, not an object",
            f"write each policy as an object such as {_EXAMPLE_POLICY}", path=path))
        return None
    count = len(problems)
    for key in item:
        if key not in POLICY_KEYS:
            close = difflib.get_close_matches(str(key), POLICY_KEYS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(AllowlistProblem(
                "", f"has an unknown key {key!r}", f"{hint}a policy has only {', '.join(POLICY_KEYS)}",
                path=path))

    name = _parse_name(item.get("name"), f"{path}.name", problems)
    if name is not None:
        if name in names:
            problems.append(AllowlistProblem(
                name, f"is already the name of policies[{names[name]}]", "give each policy its own name",
                path=f"{path}.name"))
        else:
            names[name] = index
    label = f"{path} ({name})" if name else path

    selectors = _parse_clients(item.get("clients"), f"{path}.clients", "clients" in item, problems)

    mode_value = item.get("mode", "enforce")
    mode: Mode = "enforce"
    if mode_value == "report":
        mode = "report"
    elif mode_value != "enforce":
        folded = mode_value.strip().lower() if isinstance(mode_value, str) else None
        fix = f"use '{folded}'" if folded in MODES else "use 'enforce' (refuse) or 'report' (log would_deny)"
        shown = mode_value if isinstance(mode_value, str) else json.dumps(mode_value)
        problems.append(AllowlistProblem(shown, "is not a mode", fix, path=f"{path}.mode"))

    allow = _parse_list(item.get("allow", []), f"{path}.allow", problems, warnings)
    deny = _parse_list(item.get("deny", []), f"{path}.deny", problems, warnings)
    if deny is not None:
        deny = _with_transitional_spellings(deny, item.get("deny", []), f"{path}.deny", warnings)
    ports = _parse_ports(item.get("ports", []), f"{path}.ports", problems)
    if len(problems) > count or name is None or selectors is None or allow is None or deny is None or ports is None:
        return None
    clients = tuple(s.network for s in selectors if s.kind == "cidr" and s.network is not None)
    if ports:
        _check_port_clients(ports, selectors, clients, deny, label, f"{path}.ports", problems, warnings)
        if len(problems) > count:
            return None

    if not allow.entries:
        refused = "would be refused (logged would_deny)" if mode == "report" else "is refused"
        warnings.append(f"{label}: allow is empty: every request from its clients {refused}")
    for entry in deny.entries:
        if not allow.overlaps(entry):
            warnings.append(
                f"{deny.paths.get(entry, path + '.deny')} {entry!r}: no allow entry covers it, so it changes "
                "nothing (requests not allowed are refused anyway); remove it")
    for entry in allow.entries:
        if deny.covers(entry):
            warnings.append(
                f"{allow.paths.get(entry, path + '.allow')} {entry!r} is entirely covered by the deny list, so "
                "it allows nothing; remove it, or narrow the deny entry")
    return Policy(name, clients, mode, allow, deny, selectors, ports)


def _parse_name(value: object, path: str, problems: list[AllowlistProblem]) -> str | None:
    if value is None:
        problems.append(AllowlistProblem(
            "", "is missing", "give the policy a name such as \"ci-runners\" (it appears in every log line)",
            path=path))
        return None
    if not isinstance(value, str):
        problems.append(AllowlistProblem(
            _truncate(json.dumps(value)), f"is a JSON {_json_type(value)}, not a string",
            "write the name as a string such as \"ci-runners\"", path=path))
        return None
    if POLICY_NAME.fullmatch(value):
        return value
    if not value.strip():
        problems.append(AllowlistProblem(
            "", "is empty", "give the policy a name such as \"ci-runners\" (it appears in every log line)",
            path=path))
        return None
    slug = re.sub(r"[^a-z0-9-]+", "-", value.strip().lower()).strip("-")[:32].rstrip("-")
    fix = "names are 1-32 lowercase letters, digits and '-', starting with a letter or digit"
    if slug and POLICY_NAME.fullmatch(slug):
        fix = f"use '{slug}' ({fix})"
    problems.append(AllowlistProblem(value, "is not a valid policy name", fix, path=path))
    return None


def _parse_clients(
    value: object, path: str, present: bool, problems: list[AllowlistProblem]
) -> tuple[Selector, ...] | None:
    """The policy's client selectors: CIDRs through ``_parse_cidr`` (the one CIDR parser), every other kind
    through identity_helper's grammar."""
    if not present:
        problems.append(AllowlistProblem(
            "", "is missing", 'list the client networks, e.g. "clients": ["10.0.8.0/22"]', path=path))
        return None
    if not isinstance(value, list):
        problems.append(AllowlistProblem(
            _truncate(json.dumps(value)), f"is a JSON {_json_type(value)}, not a list",
            'write a list of CIDRs, e.g. ["10.0.8.0/22"]', path=path))
        return None
    if not value:
        problems.append(AllowlistProblem(
            "", "is empty, so the policy applies to nobody", "list its client networks, or remove the policy",
            path=path))
        return None
    return _parse_each(value, path, _parse_selector, "list each client selector once", problems)


_Item = TypeVar("_Item", Selector, PortRule)


def _parse_each(value: list[object], path: str, parse: Callable[[object, str, list[AllowlistProblem]], _Item | None],
                fix_repeat: str, problems: list[AllowlistProblem]) -> tuple[_Item, ...] | None:
    """Each item of a list through ``parse``; an item whose normalised ``text`` repeats an earlier one is a
    problem too. None when any item is bad (every problem appended)."""
    items: list[_Item] = []
    seen: dict[str, int] = {}
    ok = True
    for index, raw in enumerate(value):
        item = parse(raw, f"{path}[{index}]", problems)
        if item is None:
            ok = False
        elif item.text in seen:
            problems.append(AllowlistProblem(
                raw if isinstance(raw, str) else json.dumps(raw), f"repeats {path}[{seen[item.text]}]", fix_repeat,
                path=f"{path}[{index}]"))
            ok = False
        else:
            seen[item.text] = index
            items.append(item)
    return tuple(items) if ok else None


def _parse_selector(raw: object, path: str, problems: list[AllowlistProblem]) -> Selector | None:
    if not isinstance(raw, str) or raw.strip()[:1].isdigit() or (
            ":" in raw and not raw.strip().lower().startswith(("vpce-", "ecs:", "tag:"))):
        network = _parse_cidr(raw, path, problems)
        return None if network is None else Selector("cidr", str(network), network=network)
    try:
        return parse_selector(raw)
    except BadSelector as bad:
        problems.append(AllowlistProblem(raw, bad.why, bad.fix, path=path))
        return None


def _parse_cidr(raw: object, path: str, problems: list[AllowlistProblem]) -> IPNetwork | None:
    if not isinstance(raw, str):
        problems.append(AllowlistProblem(
            _truncate(json.dumps(raw)), f"is a JSON {_json_type(raw)}, not a string",
            'write each CIDR as a string, e.g. "10.0.8.0/22"', path=path))
        return None
    try:
        return parse_cidr(raw.strip())
    except BadSelector as bad:
        problems.append(AllowlistProblem(raw, bad.why, bad.fix, path=path))
        return None


def _with_transitional_spellings(deny: Allowlist, items: list[object], path: str,
                                 warnings: list[str]) -> Allowlist:
    """``deny`` (parsed from ``items``) plus the name each entry has for clients that map IDNA the old
    (transitional) way: deny 'straße.example' and 'strasse.example' is refused too, whichever the client sends."""
    extra: list[object] = []
    for index, entry in enumerate(items):
        spelling = transitional_spelling(entry) if isinstance(entry, str) else None
        if spelling is None:
            continue
        try:
            parse_allowlist_items([spelling], path=f"{path}[{index}]")
        except AllowlistError:
            continue  # no valid name: no client can send it
        extra.append(spelling)
        warnings.append(f"{path}[{index}] {entry!r} is also denied as {spelling!r}: clients that map internationalised "
                        "names the IDNA2003 (transitional) way send that name for it")
    # The entries parsed once already; the warnings were given for them.
    return parse_allowlist_items([*items, *extra], path=path) if extra else deny


_PORT_EXAMPLE = '"ports": ["github.com:22"]'


def _parse_ports(value: object, path: str, problems: list[AllowlistProblem]) -> tuple[PortRule, ...] | None:
    """A policy's ``ports``: ``HOST:PORT``, ``HOST:FIRST-LAST``, ``CIDR:PORT`` or ``[IPV6-CIDR]:PORT``, all TCP."""
    if not isinstance(value, list):
        problems.append(AllowlistProblem(
            _truncate(json.dumps(value)), f"is a JSON {_json_type(value)}, not a list",
            f"write a list of HOST:PORT entries, e.g. {_PORT_EXAMPLE}", path=path))
        return None
    return _parse_each(value, path, _parse_port_rule, "list each port entry once", problems)


def _parse_port_rule(raw: object, path: str, problems: list[AllowlistProblem]) -> PortRule | None:
    def bad(why: str, fix: str) -> None:
        problems.append(AllowlistProblem(raw if isinstance(raw, str) else _truncate(json.dumps(raw)), why, fix,
                                         path=path))

    if not isinstance(raw, str):
        bad(f"is a JSON {_json_type(raw)}, not a string", 'write each entry as a string, e.g. "github.com:22"')
        return None
    text = raw.strip()
    if text.startswith("["):
        target, _, port_text = text[1:].partition("]")
        if not port_text.startswith(":"):
            bad("has no port after the bracketed IPv6 range", "write e.g. \"[2001:db8::/48]:22\"")
            return None
        port_text = port_text[1:]
    else:
        target, colon, port_text = text.rpartition(":")
        if not colon or not target:
            bad("has no port", f"write HOST:PORT, e.g. \"{text or 'github.com'}:22\" (TCP)")
            return None
        if ":" in target:
            bad("is an IPv6 range without brackets", f"write it as \"[{target}]:{port_text}\"")
            return None
    ports = _parse_port_range(port_text)
    if ports is None:
        bad(f"has {port_text!r} for a port", "use a TCP port from 1 to 65535, or a range such as 8000-8100")
        return None
    first, last = ports
    intercepted = [port for port in INTERCEPTED_PORTS if first <= port <= last]
    if intercepted:
        bad(f"includes tcp/{intercepted[0]}, which always goes through the proxy's name checks",
            "allow the name in 'allow' instead (or pick a range without 80 and 443)")
        return None
    port_shown = str(first) if first == last else f"{first}-{last}"
    if target[:1].isdigit() or ":" in target:
        try:
            network = parse_cidr(target if "/" in target else f"{target}/{32 if ':' not in target else 128}")
        except BadSelector as exc:
            bad(exc.why, exc.fix)
            return None
        shown = f"[{network}]" if network.version == 6 else str(network)
        return PortRule(f"{shown}:{port_shown}", first, last, network=network)
    if target.startswith((".", "*")):
        bad("names a whole domain, which the host's firewall cannot resolve (it opens the addresses of names)",
            f"list each host name, e.g. \"{target.lstrip('.*')}:{port_shown}\"")
        return None
    try:
        parsed = parse_allowlist_items([target], path=path)
    except AllowlistError as exc:
        for problem in exc.problems:
            bad(problem.why, problem.fix)
        return None
    return PortRule(f"{parsed.entries[0]}:{port_shown}", first, last, host=parsed.entries[0])


def _parse_port_range(text: str) -> tuple[int, int] | None:
    first, dash, last = text.partition("-")
    if not first.isdigit() or (dash and not last.isdigit()):
        return None
    low, high = int(first), int(last) if dash else int(first)
    return (low, high) if 1 <= low <= high <= 65535 else None


def _check_port_clients(ports: tuple[PortRule, ...], selectors: tuple[Selector, ...], clients: tuple[IPNetwork, ...],
                        deny: Allowlist, label: str, path: str, problems: list[AllowlistProblem],
                        warnings: list[str]) -> None:
    """The host's firewall sees addresses only: ``ports`` apply to a policy's CIDR clients, never to clients it
    names by identity (security group, tag, ECS service, VPC endpoint). A name the deny list refuses is a
    contradiction, not a carve-out: refused."""
    if not clients:
        problems.append(AllowlistProblem(
            "", "belong to a policy that names its clients by identity only, and the host's firewall sees only "
            "source addresses", "give the ports to a policy whose clients are CIDRs", path=path))
        return
    if len(clients) < len(selectors):
        warnings.append(f"{path}: {label} names some clients by identity; its ports apply to its CIDR clients only "
                        "(the host's firewall sees only source addresses)")
    for index, rule in enumerate(ports):
        if rule.host is not None and deny.allows(rule.host):
            problems.append(AllowlistProblem(
                rule.text, "names a host this policy's deny list refuses",
                "remove the port entry, or narrow the deny entry", path=f"{path}[{index}]"))


def _parse_list(
    value: object, path: str, problems: list[AllowlistProblem], warnings: list[str]
) -> Allowlist | None:
    if not isinstance(value, list):
        problems.append(AllowlistProblem(
            _truncate(json.dumps(value)), f"is a JSON {_json_type(value)}, not a list",
            'write a list of entries, e.g. ["example.com", ".example.org"]', path=path))
        return None
    try:
        parsed = parse_allowlist_items(value, path=path)
    except AllowlistError as exc:
        problems.extend(exc.problems)
        return None
    warnings.extend(parsed.warnings)
    return parsed


def _document_warnings(policies: Sequence[Policy], gate: tuple[IPNetwork, ...]) -> list[str]:
    """Client networks that can never select their policy: outside EGRESS_CLIENT_CIDRS (refused before any
    policy), or taken by earlier policies (the first match wins). A policy all of whose networks are like that
    never applies."""
    warnings: list[str] = []
    earlier: list[tuple[IPNetwork, str]] = []
    gate_text = ", ".join(map(str, gate))
    for index, policy in enumerate(policies):
        dead: list[str] = []
        for position, network in enumerate(policy.clients):
            where = f"policies[{index}].clients[{position}] '{network}'"
            inside = [_smaller(network, allowed) for allowed in gate if _overlap(network, allowed)]
            if not inside:
                dead.append(f"{where} is outside EGRESS_CLIENT_CIDRS ({gate_text})")
                continue
            if not covered(network, gate):
                warnings.append(
                    f"{where} is partly outside EGRESS_CLIENT_CIDRS ({gate_text}); those addresses are refused "
                    "before any policy applies: widen EGRESS_CLIENT_CIDRS or narrow the CIDR")
            earlier_networks = [other for other, _ in earlier]
            if all(covered(piece, earlier_networks) for piece in inside):
                owners = sorted({name for other, name in earlier if _overlap(other, network)})
                dead.append(f"{where} already belongs to earlier policies ({', '.join(owners)})")
        if dead and len(dead) == len(policy.clients):
            warnings.append(
                f"policies[{index}] ({policy.name}) never applies: {'; '.join(dead)}; move it up, fix its "
                "clients, or remove it")
        else:
            warnings.extend(
                f"{note}, so it never selects {policy.name!r}; remove it, or move the policy up" for note in dead)
        earlier.extend((network, policy.name) for network in policy.clients)
    warnings.extend(_identity_before_ports(policies))
    return warnings


def _identity_before_ports(policies: Sequence[Policy]) -> list[str]:
    """Squid gives a client the first policy that matches it, by identity or CIDR; the host's firewall sees
    addresses only, so it cannot leave an earlier identity policy's members out of a later policy's ports (as it
    leaves out an earlier policy's CIDRs): they get those ports too. Said, not refused: when the earlier policy is
    the more trusted one (the usual layout) it changes nothing that matters."""
    warnings: list[str] = []
    by_identity: list[str] = []
    for index, policy in enumerate(policies):
        if policy.ports and policy.clients:
            warnings.extend(
                f"policies[{index}].ports: policies[{index}] ({policy.name}) comes after {name}, which names clients "
                "by identity; the host's firewall sees only source addresses, so members of "
                f"{name} inside this policy's CIDRs get these ports too; if they must not, name {name}'s clients by "
                "CIDR (the host then leaves them out)" for name in by_identity)
        if policy.by_identity:
            by_identity.append(policy.name)
    return warnings


def _smaller(first: IPNetwork, second: IPNetwork) -> IPNetwork:
    """The intersection of two overlapping CIDRs (one always contains the other)."""
    return first if first.prefixlen >= second.prefixlen else second


def _overlap(first: IPNetwork, second: IPNetwork) -> bool:
    return first.version == second.version and first.overlaps(second)


def _address(client_ip: str | IPAddress) -> IPAddress:
    return normalise_address(client_ip)


def _is_ip_literal(host: str) -> bool:
    text = host.strip().lower()
    return bool(text) and _IP_LITERAL.fullmatch(text) is not None

