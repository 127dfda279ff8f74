"""`egress-proxy allowlist suggest`: learn the allowlist from traffic.

Reads the proxy's JSON access lines (see access_log.py) and lists, per policy, the names that were refused
(`denied`) or would have been (`would_deny`, report mode) because they are not on the policy's allow list, with
their request counts, grouped under their registrable domain, in the allowlist grammar.

The counting and formatting (:class:`TrafficSummary`, :func:`format_text`, :func:`merge_into`) are pure. The
readers at the bottom do the I/O: files or stdin, and CloudWatch Logs through boto3.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from publicsuffixlist import PublicSuffixList

from .allowlist import _classify, _normalise_host
from .policy import DEFAULT_POLICY, PolicyDocument, parse_policy_document, parse_policy_value

__all__ = [
    "SUGGESTIBLE_REASONS",
    "DomainSuggestion",
    "HostSuggestion",
    "PolicySuggestion",
    "TrafficSummary",
    "format_text",
    "merge_into",
    "parse_time",
    "read_cloudwatch",
    "read_lines",
]

# The refusals an allow entry fixes, and which field names the host to allow. Everything else (an IP literal,
# a private destination, a port, a client, an explicit deny) is counted but never suggested: adding a name
# would not change it, or would undo a decision somebody wrote down.
SUGGESTIBLE_REASONS: Mapping[str, str] = {"domain_not_allowlisted": "host", "sni_not_allowlisted": "sni"}
REFUSALS = frozenset({"denied", "would_deny"})

# CloudWatch evaluates this server-side, so only refusals cross the network; the lines are checked again here.
CLOUDWATCH_FILTER = '{ ($.decision = "denied") || ($.decision = "would_deny") }'


@dataclass
class _HostCount:
    requests: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    identities: Counter[str] = field(default_factory=Counter)  # client_identity -> refusals (identity policies)


@dataclass(frozen=True)
class HostSuggestion:
    host: str
    requests: int
    decisions: Mapping[str, int]
    reasons: Mapping[str, int]
    identities: Mapping[str, int] = field(default_factory=dict)  # which selectors' clients asked for it


@dataclass(frozen=True)
class DomainSuggestion:
    domain: str  # the registrable domain ('example.co.uk'), or the host itself when it has none
    hosts: tuple[HostSuggestion, ...]

    @property
    def requests(self) -> int:
        return sum(host.requests for host in self.hosts)


@dataclass(frozen=True)
class PolicySuggestion:
    policy: str
    domains: tuple[DomainSuggestion, ...]

    @property
    def requests(self) -> int:
        return sum(domain.requests for domain in self.domains)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(host.host for domain in self.domains for host in domain.hosts)


@dataclass
class TrafficSummary:
    """Counts of refused names per policy, fed one access line (or record) at a time."""

    lines: int = 0
    access: int = 0  # JSON access records read
    unreadable: int = 0  # lines that are not JSON objects
    hosts: dict[str, dict[str, _HostCount]] = field(default_factory=dict)  # policy -> host -> counts
    not_suggested: Counter[str] = field(default_factory=Counter)  # reason -> refusals an allow entry cannot fix
    not_listable: Counter[str] = field(default_factory=Counter)  # refused names the grammar cannot express

    def add_line(self, line: str) -> None:
        self.lines += 1
        text = line.strip()
        if not text:
            return
        # Tolerate a prefix before the JSON (`docker compose logs` writes 'proxy-1  | {...}').
        start = text.find("{")
        try:
            record = json.loads(text[start:]) if start >= 0 else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.unreadable += 1
            return
        self.add_record(record)

    def add_record(self, record: Mapping[str, Any]) -> None:
        if record.get("type") != "access":
            return
        self.access += 1
        decision = record.get("decision")
        if decision not in REFUSALS:
            return
        reason = str(record.get("reason"))
        key = SUGGESTIBLE_REASONS.get(reason)
        if key is None:
            self.not_suggested[reason] += 1
            return
        raw = record.get(key) or record.get("host")
        host = _listable_host(raw) if isinstance(raw, str) else None
        if host is None:
            self.not_listable[str(raw)] += 1
            return
        # Lines written before policies existed carry no 'policy' field: they came from the one flat list.
        policy = str(record.get("policy") or DEFAULT_POLICY)
        counts = self.hosts.setdefault(policy, {}).setdefault(host, _HostCount())
        counts.requests += 1
        counts.decisions[str(decision)] += 1
        counts.reasons[reason] += 1
        if record.get("client_identity"):
            counts.identities[str(record["client_identity"])] += 1

    def suggestions(self, *, min_requests: int = 1, policy: str | None = None) -> list[PolicySuggestion]:
        """Per policy (sorted by name), the hosts with at least `min_requests` refusals, grouped under their
        registrable domain; domains and hosts by descending request count, then by name."""
        result: list[PolicySuggestion] = []
        for name in sorted(self.hosts):
            if policy is not None and name != policy:
                continue
            grouped: dict[str, list[HostSuggestion]] = {}
            for host, counts in self.hosts[name].items():
                if counts.requests < min_requests:
                    continue
                grouped.setdefault(registrable_domain(host), []).append(HostSuggestion(
                    host, counts.requests, dict(counts.decisions), dict(counts.reasons), dict(counts.identities)))
            domains = [
                DomainSuggestion(domain, tuple(sorted(hosts, key=lambda h: (-h.requests, h.host))))
                for domain, hosts in grouped.items()
            ]
            domains.sort(key=lambda d: (-d.requests, d.domain))
            if domains:
                result.append(PolicySuggestion(name, tuple(domains)))
        return result

    def to_json(self, suggestions: Iterable[PolicySuggestion]) -> dict[str, Any]:
        return {
            "policies": [
                {
                    "policy": suggestion.policy,
                    "requests": suggestion.requests,
                    "allow": list(suggestion.hosts),
                    "domains": [
                        {
                            "domain": domain.domain,
                            "requests": domain.requests,
                            "hosts": [_host_json(host) for host in domain.hosts],
                        }
                        for domain in suggestion.domains
                    ],
                }
                for suggestion in suggestions
            ],
            "read": self.read_counts(),
        }

    def read_counts(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "access": self.access,
            "unreadable": self.unreadable,
            "not_suggested": dict(sorted(self.not_suggested.items())),
            "not_listable": sum(self.not_listable.values()),
        }

    def describe(self) -> str:
        """One line for stderr: what was read and what was left out, and why."""
        refused = sum(c.requests for hosts in self.hosts.values() for c in hosts.values())
        parts = [f"read {self.lines} lines: {self.access} access lines, {refused} refused by name"]
        if self.not_suggested:
            other = ", ".join(f"{count} {reason}" for reason, count in sorted(self.not_suggested.items()))
            parts.append(f"not suggested (an allow entry would not change them): {other}")
        if self.not_listable:
            parts.append(f"{sum(self.not_listable.values())} refused names the allowlist grammar cannot list "
                         f"(e.g. {next(iter(sorted(self.not_listable)))!r})")
        if self.unreadable:
            parts.append(f"{self.unreadable} lines that are not JSON skipped")
        return "; ".join(parts)


def format_text(suggestions: Iterable[PolicySuggestion]) -> str:
    """The allowlist grammar with '#' comments: each policy's block can be pasted into a flat allowlist file,
    or its names into the policy's "allow" list."""
    out: list[str] = []
    for suggestion in suggestions:
        if out:
            out.append("")
        hosts = sum(len(domain.hosts) for domain in suggestion.domains)
        out.append(f"# policy {suggestion.policy}: {hosts} {_plural(hosts, 'host')}, "
                   f"{suggestion.requests} refused {_plural(suggestion.requests, 'request')}")
        identities: Counter[str] = Counter()
        for domain in suggestion.domains:
            for host in domain.hosts:
                identities.update(host.identities)
        if identities:
            # Policies that select clients by security group, ECS service, tag or endpoint: who asked.
            out.append("# by client identity: " + ", ".join(
                f"{name} {count} {_plural(count, 'request')}" for name, count in
                sorted(identities.items(), key=lambda item: (-item[1], item[0]))))
        width = max(len(host) for host in suggestion.hosts)
        for domain in suggestion.domains:
            count = len(domain.hosts)
            head = f"# {domain.domain}: {count} {_plural(count, 'host')}, {domain.requests} " \
                   f"{_plural(domain.requests, 'request')}"
            if s3_endpoint(domain.domain) == domain.domain:
                head += f" (one bucket per line; or '.{domain.domain}' for every bucket at this S3 endpoint)"
            elif count > 1 or domain.hosts[0].host != domain.domain:
                head += f" (or '.{domain.domain}' for the domain and all its subdomains)"
            out.append(head)
            for host in domain.hosts:
                out.append(f"{host.host.ljust(width)}  # {host.requests} {_plural(host.requests, 'request')}"
                           f"{_decision_note(host)}")
    return "\n".join(out) + ("\n" if out else "")


def merge_into(document: PolicyDocument, suggestions: Iterable[PolicySuggestion]) -> tuple[PolicyDocument, list[str]]:
    """`document` with each suggested host added to its policy's allow list (collapsed and validated as any
    document is). Returns the merged document and the names of suggested policies the document lacks."""
    by_policy = {suggestion.policy: suggestion.hosts for suggestion in suggestions}
    missing = sorted(name for name in by_policy if document.policy(name) is None)
    if document.flat:
        merged = list(document.allowlist.entries) + list(by_policy.get(DEFAULT_POLICY, ()))
        return parse_policy_value("\n".join(merged), source="merged allowlist",
                                  client_cidrs=document.client_cidrs), missing
    policies = []
    for policy in document.policies:
        data = policy.to_json()
        data["allow"] = list(policy.allow.entries) + list(by_policy.get(policy.name, ()))
        policies.append(data)
    merged_document = parse_policy_document({"policies": policies}, source="merged document",
                                            client_cidrs=document.client_cidrs)
    return merged_document, missing


def format_document(document: PolicyDocument) -> str:
    """A document as a file: the flat form one entry per line, a policy document as indented JSON."""
    if document.flat:
        return "".join(entry + "\n" for entry in document.allowlist.entries)
    return json.dumps(document.to_json(), indent=2) + "\n"


def _host_json(host: HostSuggestion) -> dict[str, Any]:
    data: dict[str, Any] = {"host": host.host, "requests": host.requests,
                            "decisions": dict(sorted(host.decisions.items())),
                            "reasons": dict(sorted(host.reasons.items()))}
    if host.identities:  # only lines from policies that select clients by identity carry one
        data["identities"] = dict(sorted(host.identities.items()))
    return data


def _decision_note(host: HostSuggestion) -> str:
    notes = []
    if host.decisions.get("would_deny"):
        notes.append("would_deny" if len(host.decisions) == 1 else f"{host.decisions['would_deny']} would_deny")
    if host.reasons.get("sni_not_allowlisted"):
        notes.append("as TLS SNI")
    if host.identities:
        notes.append("from " + ", ".join(sorted(host.identities)))
    return f" ({', '.join(notes)})" if notes else ""


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _listable_host(raw: str) -> str | None:
    """The host as an allowlist entry would name it, or None if no entry can (IPs, single labels...)."""
    host = _normalise_host(raw)
    if host is None or not isinstance(_classify(host), tuple):
        return None
    return host


@functools.cache
def _private_psl() -> PublicSuffixList:
    # Grouping uses the whole list, private section included: 'a.github.io' and 'b.github.io' belong to
    # different owners, and suggesting '.github.io' would allow every GitHub Pages site.
    return PublicSuffixList()


def registrable_domain(host: str) -> str:
    """What a host is grouped under: its registrable domain, or, for a virtual-hosted S3 name, its S3 endpoint."""
    return s3_endpoint(host) or str(_private_psl().privatesuffix(host) or host)


_S3_ENDPOINT = re.compile(r"s3[.-].*\.amazonaws\.com(?:\.cn)?|s3\.amazonaws\.com(?:\.cn)?")


def s3_endpoint(host: str) -> str | None:
    """The S3 endpoint of a virtual-hosted S3 name ('s3.us-east-1.amazonaws.com' for
    'my-bucket.s3.us-east-1.amazonaws.com', also dualstack, access-point and legacy 's3-REGION' forms), or of a
    path-style request to the endpoint itself; None for anything else. The public suffix list makes each bucket its
    own 'registrable domain', so grouping by it would offer a bucket's own subdomains, which nobody wants: a user
    picks one bucket (the host line) or that region's S3 (the endpoint and every bucket under it)."""
    suffix = _private_psl().publicsuffix(host)
    return str(suffix) if suffix and _S3_ENDPOINT.fullmatch(str(suffix)) else None


# --------------------------------------------------------------------------------------------------------------
# Readers (I/O)
# --------------------------------------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: dt.datetime) -> dt.datetime:
    """'30m', '24h', '7d' (that long before `now`), or an ISO 8601 time (UTC unless it says otherwise).
    Raises ValueError with a message that says what is accepted."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - dt.timedelta(seconds=int(relative.group(1)) * _UNITS[relative.group(2)])
    if value == "now":
        return now
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time; use a duration before now such as 30m, 24h or 7d, or an ISO 8601 time "
            "such as 2026-12-01T08:00:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def read_lines(stream: TextIO) -> Iterator[str]:
    yield from stream


def read_cloudwatch(log_group: str, start: dt.datetime, end: dt.datetime, client: Any = None) -> Iterator[str]:
    """Every refusal line in `log_group` between `start` and `end`, through boto3 (its normal credential chain,
    region and AWS_ENDPOINT_URL). Raises botocore's ClientError / BotoCoreError."""
    if client is None:
        import boto3

        client = boto3.client("logs")
    paginator = client.get_paginator("filter_log_events")
    pages = paginator.paginate(
        logGroupName=log_group, startTime=int(start.timestamp() * 1000), endTime=int(end.timestamp() * 1000),
        filterPattern=CLOUDWATCH_FILTER)
    for page in pages:
        for event in page.get("events", ()):
            yield str(event.get("message", ""))
