"""Unit tests for learning the allowlist from access lines (egress_proxy.suggest): counting, grouping, output,
merging into a document, and time ranges."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from typing import Any

import pytest

# isort: split
from egress_proxy.access_log import FIELDS
from egress_proxy.allowlist import parse_allowlist
from egress_proxy.policy import parse_policy_value
from egress_proxy.suggest import TrafficSummary, format_document, format_text, merge_into, parse_time

GATE = (ipaddress.ip_network("10.0.0.0/8"),)


def line(host: str | None, reason: str, decision: str = "denied", **extra: Any) -> str:
    """An access line as the supervisor writes it (every field access_log.py defines, plus type/decision)."""
    record: dict[str, Any] = {"type": "access", **{f.name: None for f in FIELDS}}
    record.update(host=host, reason=reason, decision=decision, method="GET", client_ip="10.0.0.5", port=80,
                  status=403 if decision == "denied" else 200)
    record.update(extra)
    return json.dumps(record, separators=(",", ":"))


def summary_of(*lines: str) -> TrafficSummary:
    summary = TrafficSummary()
    for text in lines:
        summary.add_line(text)
    return summary


TRAFFIC = [
    *[line("api.github.com", "domain_not_allowlisted")] * 5,
    *[line("codeload.github.com", "domain_not_allowlisted")] * 2,
    line("files.pythonhosted.org", "domain_not_allowlisted"),
    line("example.co.uk", "domain_not_allowlisted"),
    line("www.example.co.uk", "domain_not_allowlisted"),
    line("allowed.example.com", "allowed", "allowed"),
    line("169.254.169.254", "ip_literal"),
    line("metadata.example.com", "destination_not_public"),
    line("gist.github.com", "domain_denied"),
    line(None, "client_not_allowed"),
]


def test_counts_group_and_order() -> None:
    summary = summary_of(*TRAFFIC)
    (default,) = summary.suggestions()
    assert default.policy == "default"  # lines without a 'policy' field came from the flat list
    assert [(d.domain, [(h.host, h.requests) for h in d.hosts]) for d in default.domains] == [
        ("github.com", [("api.github.com", 5), ("codeload.github.com", 2)]),
        ("example.co.uk", [("example.co.uk", 1), ("www.example.co.uk", 1)]),
        ("pythonhosted.org", [("files.pythonhosted.org", 1)]),
    ]
    assert default.requests == 10
    assert summary.read_counts() == {
        "lines": 15, "access": 15, "unreadable": 0, "not_listable": 0,
        "not_suggested": {"client_not_allowed": 1, "destination_not_public": 1, "domain_denied": 1,
                          "ip_literal": 1},
    }


def test_text_output_is_the_allowlist_grammar() -> None:
    text = format_text(summary_of(*TRAFFIC).suggestions())
    assert text == (
        "# policy default: 5 hosts, 10 refused requests\n"
        "# github.com: 2 hosts, 7 requests (or '.github.com' for the domain and all its subdomains)\n"
        "api.github.com          # 5 requests\n"
        "codeload.github.com     # 2 requests\n"
        "# example.co.uk: 2 hosts, 2 requests (or '.example.co.uk' for the domain and all its subdomains)\n"
        "example.co.uk           # 1 request\n"
        "www.example.co.uk       # 1 request\n"
        "# pythonhosted.org: 1 host, 1 request (or '.pythonhosted.org' for the domain and all its subdomains)\n"
        "files.pythonhosted.org  # 1 request\n"
    )
    # Pasting it as a flat allowlist works as is (comments and all).
    pasted = parse_allowlist(text)
    assert pasted.entries == ("api.github.com", "codeload.github.com", "example.co.uk", "files.pythonhosted.org",
                              "www.example.co.uk")


def test_per_policy_report_mode_and_sni() -> None:
    summary = summary_of(
        line("pypi.org", "domain_not_allowlisted", "would_deny", policy="ci-runners"),
        line("pypi.org", "domain_not_allowlisted", "would_deny", policy="ci-runners"),
        line("pypi.org", "domain_not_allowlisted", "denied", policy="default"),
        line("front.example.com", "sni_not_allowlisted", "denied", policy="default", method="CONNECT",
             sni="hidden.example.net"),
    )
    assert [s.policy for s in summary.suggestions()] == ["ci-runners", "default"]
    text = format_text(summary.suggestions())
    assert "# policy ci-runners: 1 host, 2 refused requests\n# pypi.org: 1 host, 2 requests\n" \
           "pypi.org  # 2 requests (would_deny)\n" in text
    # The SNI is the name the client really wanted: that is the one to allow.
    assert "hidden.example.net  # 1 request (as TLS SNI)\n" in text
    assert "front.example.com" not in text
    assert [s.policy for s in summary.suggestions(policy="ci-runners")] == ["ci-runners"]
    assert summary.suggestions(policy="nope") == []


def test_min_requests() -> None:
    summary = summary_of(*TRAFFIC)
    (default,) = summary.suggestions(min_requests=2)
    assert default.hosts == ("api.github.com", "codeload.github.com")
    assert summary.suggestions(min_requests=6) == []


def test_names_are_normalised_and_unlistable_ones_counted() -> None:
    summary = summary_of(
        line("API.GitHub.com.", "domain_not_allowlisted"),
        line("api.github.com", "domain_not_allowlisted"),
        line("bücher.de", "domain_not_allowlisted"),
        line("localhost", "domain_not_allowlisted"),
        line("co.uk", "domain_not_allowlisted"),
        line("bad_name.example.com", "domain_not_allowlisted"),
    )
    (default,) = summary.suggestions()
    assert sorted(default.hosts) == ["api.github.com", "xn--bcher-kva.de"]
    assert summary.read_counts()["not_listable"] == 3
    assert "3 refused names the allowlist grammar cannot list" in summary.describe()


def test_private_suffixes_group_per_owner() -> None:
    summary = summary_of(line("a.github.io", "domain_not_allowlisted"), line("b.github.io", "domain_not_allowlisted"))
    (default,) = summary.suggestions()
    assert [d.domain for d in default.domains] == ["a.github.io", "b.github.io"]
    assert "'.github.io'" not in format_text([default])


def test_virtual_hosted_s3_offers_one_bucket_or_that_regions_s3() -> None:
    # The public suffix list makes every bucket its own registrable domain; a user picks a bucket, or the region.
    summary = summary_of(*[line("my-bucket.s3.us-east-1.amazonaws.com", "domain_not_allowlisted")] * 2,
                         line("logs.example.s3.us-east-1.amazonaws.com", "domain_not_allowlisted"),
                         line("other.s3.eu-west-1.amazonaws.com", "domain_not_allowlisted"),
                         line("secretsmanager.us-east-1.amazonaws.com", "domain_not_allowlisted"))
    (default,) = summary.suggestions()
    assert [(d.domain, [h.host for h in d.hosts]) for d in default.domains] == [
        ("s3.us-east-1.amazonaws.com", ["my-bucket.s3.us-east-1.amazonaws.com",
                                        "logs.example.s3.us-east-1.amazonaws.com"]),
        ("s3.eu-west-1.amazonaws.com", ["other.s3.eu-west-1.amazonaws.com"]),
        ("secretsmanager.us-east-1.amazonaws.com", ["secretsmanager.us-east-1.amazonaws.com"]),
    ]
    text = format_text([default])
    assert "or '.s3.us-east-1.amazonaws.com' for every bucket at this S3 endpoint" in text
    assert "'.my-bucket.s3" not in text and "'.amazonaws.com'" not in text
    # Both choices are entries the allowlist accepts.
    assert parse_allowlist(".s3.us-east-1.amazonaws.com\nmy-bucket.s3.us-east-1.amazonaws.com").entries


def test_tolerates_prefixes_blank_and_foreign_lines() -> None:
    summary = summary_of(
        "proxy-1  | " + line("a.example.com", "domain_not_allowlisted"),
        "",
        "not json at all",
        '{"type":"supervisor","event":"reloaded"}',
        "[1, 2]",
    )
    assert summary.suggestions()[0].hosts == ("a.example.com",)
    assert summary.read_counts() == {"lines": 5, "access": 1, "unreadable": 2, "not_listable": 0,
                                     "not_suggested": {}}
    assert summary.describe() == "read 5 lines: 1 access lines, 1 refused by name; 2 lines that are not JSON skipped"


def test_json_output() -> None:
    summary = summary_of(*TRAFFIC[:7], line("pypi.org", "domain_not_allowlisted", "would_deny", policy="ci"))
    data = summary.to_json(summary.suggestions())
    assert data["policies"][0] == {
        "policy": "ci", "requests": 1, "allow": ["pypi.org"],
        "domains": [{"domain": "pypi.org", "requests": 1, "hosts": [
            {"host": "pypi.org", "requests": 1, "decisions": {"would_deny": 1},
             "reasons": {"domain_not_allowlisted": 1}}]}],
    }
    assert data["policies"][1]["allow"] == ["api.github.com", "codeload.github.com"]
    assert data["read"]["access"] == 8


def test_merge_into_a_document() -> None:
    document = parse_policy_value(json.dumps({"policies": [
        {"name": "ci", "clients": ["10.0.8.0/22"], "mode": "report", "allow": [".github.com"]},
        {"name": "default", "clients": ["10.0.0.0/8"], "allow": ["pypi.org"]},
    ]}), source="t", client_cidrs=GATE)
    summary = summary_of(
        line("api.github.com", "domain_not_allowlisted", "would_deny", policy="ci"),  # already covered now
        line("files.pythonhosted.org", "domain_not_allowlisted", "would_deny", policy="ci"),
        line("example.org", "domain_not_allowlisted", policy="default"),
        line("x.example.net", "domain_not_allowlisted", policy="gone"),
    )
    merged, missing = merge_into(document, summary.suggestions())
    assert missing == ["gone"]
    assert [p.allow.entries for p in merged.policies] == [
        (".github.com", "files.pythonhosted.org"), ("example.org", "pypi.org")]
    assert merged.policies[0].mode == "report"
    assert any("'api.github.com' is already covered by '.github.com'" in w for w in merged.warnings)
    assert json.loads(format_document(merged)) == merged.to_json()


def test_merge_into_a_flat_list() -> None:
    flat = parse_policy_value("pypi.org", source="t", client_cidrs=GATE)
    merged, missing = merge_into(flat, summary_of(line("example.org", "domain_not_allowlisted")).suggestions())
    assert (missing, merged.flat, format_document(merged)) == ([], True, "example.org\npypi.org\n")


NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("30m", NOW - dt.timedelta(minutes=30)),
    ("24h", NOW - dt.timedelta(hours=24)),
    ("7d", NOW - dt.timedelta(days=7)),
    ("90s", NOW - dt.timedelta(seconds=90)),
    ("now", NOW),
    ("2026-12-01T08:00:00Z", dt.datetime(2026, 12, 1, 8, tzinfo=dt.UTC)),
    ("2026-12-01T08:00:00", dt.datetime(2026, 12, 1, 8, tzinfo=dt.UTC)),
    ("2026-12-01T09:00:00+01:00", dt.datetime(2026, 12, 1, 8, tzinfo=dt.UTC)),
])
def test_parse_time(text: str, expected: dt.datetime) -> None:
    assert parse_time(text, NOW) == expected


def test_parse_time_error_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="use a duration before now such as 30m, 24h or 7d, or an ISO 8601"):
        parse_time("yesterday", NOW)


def test_identity_policies_group_what_they_learn_by_client_identity() -> None:
    summary = TrafficSummary()
    for _ in range(3):
        summary.add_line(line("api.stripe.com", "domain_not_allowlisted", policy="payments",
                              client_identity="sg-0aaaaaaaaaaaaaaaa"))
    summary.add_line(line("api.stripe.com", "domain_not_allowlisted", policy="payments",
                          client_identity="ecs:prod/payments"))
    summary.add_line(line("files.stripe.com", "domain_not_allowlisted", policy="payments",
                          client_identity="ecs:prod/payments"))
    text = format_text(summary.suggestions())
    assert "# by client identity: sg-0aaaaaaaaaaaaaaaa 3 requests, ecs:prod/payments 2 requests" in text
    assert "api.stripe.com    # 4 requests (from ecs:prod/payments, sg-0aaaaaaaaaaaaaaaa)" in text
    assert "files.stripe.com  # 1 request (from ecs:prod/payments)" in text
    hosts = summary.to_json(summary.suggestions())["policies"][0]["domains"][0]["hosts"]
    assert hosts[0]["identities"] == {"ecs:prod/payments": 1, "sg-0aaaaaaaaaaaaaaaa": 3}
