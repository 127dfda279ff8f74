"""Unit tests for policy documents (egress_proxy.policy): parsing, whole-document validation, the reference
decision model, and per-policy diffs."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

# isort: split
from egress_proxy.access_log import REASONS
from egress_proxy.allowlist import AllowlistError, parse_allowlist_value
from egress_proxy.policy import (
    ALWAYS_ENFORCED_REASONS,
    REPORTABLE_REASONS,
    PolicyDocument,
    Tunnel,
    Verdict,
    parse_policy_document,
    parse_policy_value,
)

GATE = tuple(ipaddress.ip_network(c) for c in ("10.0.0.0/8", "127.0.0.0/8", "fd00::/8"))

ISSUE_EXAMPLE: dict[str, Any] = {
    "policies": [
        {"name": "ci-runners", "clients": ["10.0.8.0/22"], "mode": "report",
         "allow": [".github.com", "pypi.org", ".pythonhosted.org"], "deny": ["gist.github.com"]},
        {"name": "default", "clients": ["10.0.0.0/8"], "allow": [".amazonaws.com"]},
    ]
}


def parse(document: object, gate: tuple[Any, ...] = GATE) -> PolicyDocument:
    return parse_policy_value(json.dumps(document), source="test", client_cidrs=gate)


def problems(document: object) -> list[str]:
    with pytest.raises(AllowlistError) as info:
        parse(document)
    return [str(problem) for problem in info.value.problems]


def policy(**fields: Any) -> dict[str, Any]:
    return {"name": "p", "clients": ["10.0.0.0/8"], "allow": ["example.com"], **fields}


# --- the flat list keeps working -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "example.com, .example.org",
    "example.com\n.example.org  # comment\n",
    '{"allowed_domains": ["example.com", ".example.org"]}',
])
def test_flat_list_is_one_default_enforce_policy_over_the_client_cidrs(value: str) -> None:
    document = parse_policy_value(value, source="test", client_cidrs=GATE)
    assert document.flat
    assert [p.name for p in document.policies] == ["default"]
    default = document.policies[0]
    assert default.mode == "enforce"
    assert default.clients == GATE
    assert default.allow == parse_allowlist_value(value, source="test")
    assert document.allowlist.entries == (".example.org", "example.com")
    assert default.deny.entries == ()


@pytest.mark.parametrize("value", [
    "example.com, 10.0.0.1",
    '{"allowed_domains": "example.com"}',
    '{"allowed_domains": ["a.com"], "extra": 1}',
    '{"allowed_domains": ["a.com"',
    '["a.com"]',
])
def test_flat_list_errors_are_exactly_the_flat_parsers(value: str) -> None:
    with pytest.raises(AllowlistError) as flat:
        parse_allowlist_value(value, source="secret x")
    with pytest.raises(AllowlistError) as either:
        parse_policy_value(value, source="secret x", client_cidrs=GATE)
    assert str(either.value) == str(flat.value)


def test_flat_list_warnings_carry_over() -> None:
    document = parse_policy_value("a.example.com, .example.com", source="t", client_cidrs=GATE)
    assert document.warnings == parse_allowlist_value("a.example.com, .example.com", source="t").warnings
    assert any("already covered" in w for w in document.warnings)


def test_json_object_with_neither_key_names_both_forms() -> None:
    with pytest.raises(AllowlistError) as info:
        parse_policy_value('{"policy": []}', source="secret s", client_cidrs=GATE)
    message = str(info.value)
    assert "neither a 'policies' nor an 'allowed_domains' key" in message
    assert '{"policies": [' in message and '"allowed_domains"' in message


def test_a_document_cannot_render_as_one_allowlist() -> None:
    with pytest.raises(ValueError, match="render its policies"):
        _ = parse(ISSUE_EXAMPLE).allowlist


# --- documents: what the renderer gets -------------------------------------------------------------------------


def test_issue_example_parses_into_renderer_data_in_document_order() -> None:
    document = parse(ISSUE_EXAMPLE)
    assert not document.flat
    assert [(p.name, p.mode) for p in document.policies] == [("ci-runners", "report"), ("default", "enforce")]
    ci, default = document.policies
    assert ci.clients == (ipaddress.ip_network("10.0.8.0/22"),)
    assert ci.allow.entries == (".github.com", ".pythonhosted.org", "pypi.org")
    assert ci.deny.entries == ("gist.github.com",)
    assert default.allow.entries == (".amazonaws.com",)
    assert default.deny.entries == ()
    assert document.warnings == ()
    assert document.entry_count == 5


def test_lists_are_normalised_and_minimal() -> None:
    document = parse({"policies": [policy(
        allow=["WWW.Example.COM.", ".example.com", "*.example.org", "bücher.de"],
        deny=["a.example.com", ".x.example.com", "y.x.example.com"])]})
    only = document.policies[0]
    assert only.allow.entries == (".example.com", ".example.org", "xn--bcher-kva.de")
    assert only.deny.entries == (".x.example.com", "a.example.com")
    warnings = "\n".join(document.warnings)
    assert "policies[0].allow[0] 'WWW.Example.COM.' is already covered by '.example.com'" in warnings
    assert "policies[0].allow[2] '*.example.org' was read as '.example.org'" in warnings
    assert "policies[0].deny[2] 'y.x.example.com' is already covered by '.x.example.com'" in warnings


def test_mode_defaults_to_enforce_and_lists_default_to_empty() -> None:
    document = parse({"policies": [{"name": "locked", "clients": ["10.1.0.0/16"]}]})
    only = document.policies[0]
    assert (only.mode, only.allow.entries, only.deny.entries) == ("enforce", (), ())
    assert any("policies[0] (locked): allow is empty: every request from its clients is refused" in w
               for w in document.warnings)


def test_ipv6_clients_and_single_addresses() -> None:
    document = parse({"policies": [policy(clients=["fd00:1::/64", "10.0.0.5", "fd00::7"])]})
    assert [str(n) for n in document.policies[0].clients] == ["fd00:1::/64", "10.0.0.5/32", "fd00::7/128"]


def test_to_json_round_trips_and_is_normalised() -> None:
    document = parse(ISSUE_EXAMPLE)
    again = parse(json.loads(document.to_value()))
    assert again == document
    assert json.loads(document.to_value())["policies"][1] == {
        "name": "default", "clients": ["10.0.0.0/8"], "mode": "enforce", "allow": [".amazonaws.com"], "deny": []}
    flat = parse_policy_value("b.com a.com", source="t", client_cidrs=GATE)
    assert flat.to_value() == '{"allowed_domains": ["a.com", "b.com"]}'


# --- validation: every problem, by path, with a fix ------------------------------------------------------------


def test_every_problem_is_reported_by_path_with_a_fix() -> None:
    bad = {
        "policies": [
            {"name": "CI Runners", "clients": ["10.0.8.1/22", "not-a-cidr", 7], "mode": "Report",
             "allwo": [], "allow": ["ok.com", "1.2.3.4", "https://x.example.com/path", 5],
             "deny": "gist.github.com"},
            {"name": "dup", "allow": []},
            {"name": "dup", "clients": []},
            "default",
        ],
        "allowed_domains": [],
    }
    found = problems(bad)
    assert found == [
        "allowed_domains: is not a key of a policy document (it has only 'policies'); "
        "move it into a policy, or remove it",
        "policies[0]: has an unknown key 'allwo'; did you mean 'allow'? "
        "a policy has only name, clients, mode, allow, deny, ports",
        "policies[0].name: 'CI Runners' is not a valid policy name; use 'ci-runners' "
        "(names are 1-32 lowercase letters, digits and '-', starting with a letter or digit)",
        "policies[0].clients[0]: '10.0.8.1/22' has host bits set; use '10.0.8.0/22' (the network containing it)",
        "policies[0].clients[1]: 'not-a-cidr' is not a client selector; write one of \"10.0.8.0/22\", "
        "\"sg-0123456789abcdef0\", \"ecs:prod/payments\", \"tag:team=payments\", \"vpce-0123456789abcdef0\" or "
        "\"vpce-0123456789abcdef0:10.1.0.0/16\"",
        "policies[0].clients[2]: '7' is a JSON number, not a string; write each CIDR as a string, "
        "e.g. \"10.0.8.0/22\"",
        "policies[0].mode: 'Report' is not a mode; use 'report'",
        "policies[0].allow[1]: '1.2.3.4' is an IP address (IPv4); list the host name instead; "
        "IP destinations are refused by design",
        "policies[0].allow[2]: 'https://x.example.com/path' is a URL, not a domain; use 'x.example.com'",
        "policies[0].allow[3]: '5' is a JSON number, not a string; write each domain as a JSON string, "
        "e.g. \"example.com\"",
        "policies[0].deny: '\"gist.github.com\"' is a JSON string, not a list; write a list of entries, "
        "e.g. [\"example.com\", \".example.org\"]",
        "policies[1].clients: is missing; list the client networks, e.g. \"clients\": [\"10.0.8.0/22\"]",
        "policies[2].name: 'dup' is already the name of policies[1]; give each policy its own name",
        "policies[2].clients: is empty, so the policy applies to nobody; list its client networks, "
        "or remove the policy",
        "policies[3]: '\"default\"' is a JSON string, not an object; write each policy as an object such as "
        "{\"name\": \"default\", \"clients\": [\"10.0.0.0/8\"], \"allow\": [\".example.com\"]}",
    ]


def test_error_message_counts_problems_and_names_the_source() -> None:
    with pytest.raises(AllowlistError) as info:
        parse_policy_value(json.dumps({"policies": [policy(name="A"), policy(name="b", mode="x")]}),
                           source="secret egress/allowlist", client_cidrs=GATE)
    lines = str(info.value).splitlines()
    assert lines[0] == "2 problems in secret egress/allowlist:"
    assert lines[1].startswith("  policies[0].name: 'A' is not a valid policy name; use 'a'")
    assert lines[2] == "  policies[1].mode: 'x' is not a mode; use 'enforce' (refuse) or 'report' (log would_deny)"


def test_single_problem_is_one_line() -> None:
    with pytest.raises(AllowlistError) as info:
        parse_policy_value(json.dumps({"policies": [policy(allow=["a.com", "b.com:443"])]}),
                           source="f.json", client_cidrs=GATE)
    assert str(info.value) == (
        "f.json: policies[0].allow[1]: 'b.com:443' includes a port; drop the port and use 'b.com' "
        "(allowed ports are a separate setting, EGRESS_ALLOWED_PORTS)")


@pytest.mark.parametrize("name", ["a", "ci-runners", "0day", "a" * 32, "x-1-y"])
def test_valid_names(name: str) -> None:
    assert parse({"policies": [policy(name=name)]}).policies[0].name == name


@pytest.mark.parametrize(("name", "fix"), [
    ("", "give the policy a name"),
    ("-lead", "use 'lead'"),
    ("a" * 33, "use '" + "a" * 32 + "'"),
    ("Prod_Env", "use 'prod-env'"),
    ("ünïcode", "use 'n-code'"),
])
def test_invalid_names(name: str, fix: str) -> None:
    (problem,) = problems({"policies": [policy(name=name)]})
    shown = f"{name!r} is not a valid policy name" if name else "is empty"
    assert problem.startswith(f"policies[0].name: {shown}; ")
    assert fix in problem


@pytest.mark.parametrize(("document", "expected"), [
    ([], "is a JSON list, not an object"),
    ({"policies": {"name": "x"}}, "policies: is a JSON object, not a list"),
    ({"policies": None}, "policies: is a JSON null, not a list"),
    ({"policies": [policy(name=None)]}, "policies[0].name: is missing"),
    ({"policies": [policy(name=3)]}, "policies[0].name: '3' is a JSON number, not a string"),
    ({"policies": [policy(clients="10.0.0.0/8")]}, "policies[0].clients: '\"10.0.0.0/8\"' is a JSON string"),
    ({"policies": [policy(allow=[""])]}, "policies[0].allow[0]: is an empty string; remove it from 'allow'"),
    ({"policies": [policy(deny=["a.com b.com"])]}, "policies[0].deny[0]: 'a.com b.com' holds several entries"),
    ({"policies": [policy(allow=[".com"])]}, "policies[0].allow[0]: '.com' is a public suffix"),
])
def test_shape_problems(document: object, expected: str) -> None:
    with pytest.raises(AllowlistError) as info:
        parse_policy_document(document, source="t", client_cidrs=GATE)
    assert expected in str(info.value)


def test_every_bad_entry_is_reported_not_just_the_first_policy() -> None:
    bad = {"policies": [policy(name=f"p{i}", allow=[f"10.0.0.{i}"]) for i in range(30)]}
    with pytest.raises(AllowlistError) as info:
        parse(bad)
    assert len(info.value.problems) == 30
    assert [p.path for p in info.value.problems] == [f"policies[{i}].allow[0]" for i in range(30)]
    assert "... and 10 more" in str(info.value)


# --- warnings --------------------------------------------------------------------------------------------------


def test_policy_shadowed_entirely_by_earlier_ones() -> None:
    document = parse({"policies": [
        policy(name="a", clients=["10.0.0.0/9"]),
        policy(name="b", clients=["10.128.0.0/9"]),
        policy(name="late", clients=["10.0.0.0/8", "10.5.0.0/16"]),
    ]})
    assert document.warnings == (
        "policies[2] (late) never applies: policies[2].clients[0] '10.0.0.0/8' already belongs to earlier "
        "policies (a, b); policies[2].clients[1] '10.5.0.0/16' already belongs to earlier policies (a); "
        "move it up, fix its clients, or remove it",
    )


def test_partly_shadowed_policy_names_the_dead_network_only() -> None:
    document = parse({"policies": [
        policy(name="a", clients=["10.1.0.0/16"]),
        policy(name="b", clients=["10.1.2.0/24", "10.2.0.0/16"]),
    ]})
    assert document.warnings == (
        "policies[1].clients[0] '10.1.2.0/24' already belongs to earlier policies (a), so it never selects 'b'; "
        "remove it, or move the policy up",
    )


def test_overlap_that_leaves_addresses_is_not_a_warning() -> None:
    document = parse(ISSUE_EXAMPLE)  # default's 10/8 still owns everything outside ci-runners' /22
    assert document.warnings == ()


def test_clients_outside_the_client_cidrs() -> None:
    document = parse({"policies": [
        policy(name="outside", clients=["192.168.0.0/16"]),
        policy(name="partly", clients=["0.0.0.0/0"]),
    ]})
    assert document.warnings[0].startswith(
        "policies[0] (outside) never applies: policies[0].clients[0] '192.168.0.0/16' is outside "
        "EGRESS_CLIENT_CIDRS (10.0.0.0/8, 127.0.0.0/8, fd00::/8)")
    assert document.warnings[1].startswith("policies[1].clients[0] '0.0.0.0/0' is partly outside EGRESS_CLIENT_CIDRS")
    assert len(document.warnings) == 2


def test_deny_entry_no_allow_entry_covers_is_a_warning() -> None:
    document = parse({"policies": [policy(
        allow=[".github.com", "api.example.com"],
        deny=["gist.github.com", "evil.com", ".example.com", "other.example.com", ".github.com.evil.net"])]})
    # '.example.com' meets the allowed api.example.com, so it matters; the others match nothing allowed
    # ('other.example.com' is collapsed into '.example.com' first, with its own warning).
    assert [w.split(":", 1)[0] for w in document.warnings if "no allow entry covers it" in w] == [
        "policies[0].deny[4] '.github.com.evil.net'",
        "policies[0].deny[1] 'evil.com'",
    ]


def test_allow_entry_entirely_denied_is_a_warning() -> None:
    document = parse({"policies": [policy(allow=["api.github.com", ".example.com", ".ok.com"],
                                          deny=[".github.com", "www.example.com"])]})
    entirely = [w for w in document.warnings if "entirely covered by the deny list" in w]
    assert entirely == [
        "policies[0].allow[0] 'api.github.com' is entirely covered by the deny list, so it allows nothing; "
        "remove it, or narrow the deny entry"]


def test_empty_policies_list_is_valid_and_refuses_everyone() -> None:
    document = parse({"policies": []})
    assert document.warnings == (
        "policies: the document has no policy: every client is refused (client_not_allowed)",)
    assert document.decide("10.0.0.1", "example.com") == Verdict(None, "denied", "client_not_allowed")


# --- the reference decision model ------------------------------------------------------------------------------

DOCUMENT = {
    "policies": [
        {"name": "ci-runners", "clients": ["10.0.8.0/22", "fd00:8::/64"], "mode": "report",
         "allow": [".github.com", "pypi.org"], "deny": ["gist.github.com"]},
        {"name": "builders", "clients": ["10.0.9.0/24"],  # shadowed by ci-runners' /22
         "allow": [".example.com"]},
        {"name": "default", "clients": ["10.0.0.0/8", "127.0.0.0/8"],
         "allow": [".github.com", ".amazonaws.com"], "deny": ["gist.github.com"]},
    ]
}


@pytest.fixture(scope="module")
def document() -> PolicyDocument:
    return parse(DOCUMENT)


@pytest.mark.parametrize(("client", "host", "expected"), [
    # enforce: allow, deny over allow, not listed, IP literals
    ("10.1.2.3", "api.github.com", Verdict("default", "allowed", "allowed")),
    ("10.1.2.3", "GitHub.com.", Verdict("default", "allowed", "allowed")),
    ("10.1.2.3", "gist.github.com", Verdict("default", "denied", "domain_denied")),
    ("10.1.2.3", "GIST.github.com", Verdict("default", "denied", "domain_denied")),
    ("10.1.2.3", "pypi.org", Verdict("default", "denied", "domain_not_allowlisted")),
    ("10.1.2.3", "1.2.3.4", Verdict("default", "denied", "ip_literal")),
    ("10.1.2.3", "10.1", Verdict("default", "denied", "ip_literal")),
    ("10.1.2.3", "[2001:db8::1]", Verdict("default", "denied", "ip_literal")),
    ("10.1.2.3", "2001:db8::1", Verdict("default", "denied", "ip_literal")),
    ("10.1.2.3", "::ffff:1.2.3.4", Verdict("default", "denied", "ip_literal")),
    ("127.0.0.10", "s3.amazonaws.com", Verdict("default", "allowed", "allowed")),
    # report mode: what enforce would refuse by name goes through as would_deny, with enforce's reason
    ("10.0.8.7", "pypi.org", Verdict("ci-runners", "allowed", "allowed")),
    ("10.0.8.7", "gist.github.com", Verdict("ci-runners", "would_deny", "domain_denied")),
    ("10.0.8.7", "example.net", Verdict("ci-runners", "would_deny", "domain_not_allowlisted")),
    ("10.0.8.7", "1.2.3.4", Verdict("ci-runners", "would_deny", "ip_literal")),
    ("fd00:8::5", "example.net", Verdict("ci-runners", "would_deny", "domain_not_allowlisted")),
    ("::ffff:10.0.8.7", "example.net", Verdict("ci-runners", "would_deny", "domain_not_allowlisted")),
    # first match wins: builders' /24 sits inside ci-runners' /22
    ("10.0.9.1", "www.example.com", Verdict("ci-runners", "would_deny", "domain_not_allowlisted")),
    # the client gate comes first; then a client in no policy is refused
    ("192.168.1.1", "api.github.com", Verdict(None, "denied", "client_not_allowed")),
    ("fd00:9::1", "api.github.com", Verdict(None, "denied", "client_not_allowed")),
])
def test_decide_by_name(document: PolicyDocument, client: str, host: str, expected: Verdict) -> None:
    assert document.decide(client, host) == expected


@pytest.mark.parametrize("client", ["10.1.2.3", "10.0.8.7"])  # enforce, report
@pytest.mark.parametrize("host", ["gist.gith\u00fcb.com", "gist\uff0egithub.com", "gist.github.c%6fm",
                                  "GIST.GITH\u00dcB.COM", "gist github.com",
                                  # no DNS name: a 64-octet label; 254 octets without the trailing dot
                                  "x" * 64 + ".github.com", "a" * 54 + "." + ("b" * 62 + ".") * 3 + "github.com"])
def test_a_host_that_is_not_ascii_is_refused_in_every_mode(document: PolicyDocument, client: str,
                                                           host: str) -> None:
    verdict = document.decide(client, host)
    assert (verdict.decision, verdict.reason) == ("denied", "invalid_host")


@pytest.mark.parametrize("host", ["x" * 63 + ".github.com", "a" * 53 + "." + ("b" * 62 + ".") * 3 + "github.com",
                                  "a" * 53 + "." + ("b" * 62 + ".") * 3 + "github.com."])
def test_the_longest_dns_names_are_judged_by_name(document: PolicyDocument, host: str) -> None:
    assert document.decide("10.1.2.3", host).reason != "invalid_host"


def test_a_client_in_the_gate_but_in_no_policy_is_refused() -> None:
    document = parse({"policies": [policy(name="only", clients=["10.1.0.0/16"])]})
    assert document.select("10.2.0.1") is None
    assert document.decide("10.2.0.1", "example.com") == Verdict(None, "denied", "client_not_allowed")
    assert document.decide("10.1.0.1", "example.com") == Verdict("only", "allowed", "allowed")


def test_a_policy_cannot_admit_a_client_the_gate_refuses() -> None:
    document = parse({"policies": [policy(name="wide", clients=["0.0.0.0/0"])]}, gate=GATE)
    assert document.decide("8.8.8.8", "example.com") == Verdict(None, "denied", "client_not_allowed")


@pytest.mark.parametrize("client", ["10.1.2.3", "10.0.8.7"])
@pytest.mark.parametrize("host", ["api.github.com", "example.net", "gist.github.com"])
def test_always_enforced_checks_hold_in_both_modes(document: PolicyDocument, client: str, host: str) -> None:
    by_name = document.decide(client, host)
    name = by_name.policy
    assert document.decide(client, host, port_allowed=False) == Verdict(name, "denied", "port_not_allowed")
    # The SSRF guard: report mode must never open a private or metadata destination. (Enforce mode refuses
    # a name it does not allow before resolving it, as the README's table orders the checks.)
    after_name = by_name if by_name.decision == "denied" else None
    assert document.decide(client, host, destination_public=False) == (
        after_name or Verdict(name, "denied", "destination_not_public"))
    assert document.decide(client, host, tunnel=Tunnel(tls=False)) == (
        after_name or Verdict(name, "denied", "not_tls"))


@pytest.mark.parametrize(("client", "host", "tunnel", "expected"), [
    # enforce: the SNI is checked like the host, with its own reasons; a denied SNI says which list refused it
    ("10.1.2.3", "api.github.com", Tunnel(sni="api.github.com"), Verdict("default", "allowed", "allowed")),
    ("10.1.2.3", "api.github.com", Tunnel(sni="gist.github.com"), Verdict("default", "denied", "domain_denied")),
    ("10.1.2.3", "api.github.com", Tunnel(sni="evil.example"), Verdict("default", "denied", "sni_not_allowlisted")),
    ("10.1.2.3", "api.github.com", Tunnel(sni=None), Verdict("default", "denied", "sni_missing")),
    ("10.1.2.3", "api.github.com", Tunnel(sni="10.0.0.1"), Verdict("default", "denied", "sni_malformed")),
    ("10.1.2.3", "api.github.com", Tunnel(sni="api.github.com\x00.evil.example"),
     Verdict("default", "denied", "sni_malformed")),
    ("10.1.2.3", "api.github.com", Tunnel(sni="api.github.com", malformed=True),
     Verdict("default", "denied", "sni_malformed")),
    ("10.1.2.3", "api.github.com", Tunnel(sni="api.github.com", checked=False),
     Verdict("default", "denied", "sni_unchecked")),
    ("10.1.2.3", "api.github.com", Tunnel(tls=False), Verdict("default", "denied", "not_tls")),
    # report: SNI refusals become would_deny; not_tls stays enforced
    ("10.0.8.7", "api.github.com", Tunnel(sni="evil.example"),
     Verdict("ci-runners", "would_deny", "sni_not_allowlisted")),
    ("10.0.8.7", "api.github.com", Tunnel(sni=None), Verdict("ci-runners", "would_deny", "sni_missing")),
    ("10.0.8.7", "api.github.com", Tunnel(sni="gist.github.com"),
     Verdict("ci-runners", "would_deny", "domain_denied")),
    ("10.0.8.7", "api.github.com", Tunnel(tls=False), Verdict("ci-runners", "denied", "not_tls")),
    # report: a malformed SNI is a fronting trick, not a name to learn; an unanswered check fails closed
    ("10.0.8.7", "api.github.com", Tunnel(sni="10.0.0.1"), Verdict("ci-runners", "denied", "sni_malformed")),
    ("10.0.8.7", "example.net", Tunnel(sni="pypi.org", malformed=True),
     Verdict("ci-runners", "denied", "sni_malformed")),
    ("10.0.8.7", "api.github.com", Tunnel(sni="pypi.org", checked=False),
     Verdict("ci-runners", "denied", "sni_unchecked")),
    # report: the first refusal is the one logged (the CONNECT host's, before the SNI's)
    ("10.0.8.7", "example.net", Tunnel(sni=None), Verdict("ci-runners", "would_deny", "domain_not_allowlisted")),
])
def test_decide_inside_the_tunnel(document: PolicyDocument, client: str, host: str, tunnel: Tunnel,
                                  expected: Verdict) -> None:
    assert document.decide(client, host, tunnel=tunnel) == expected


def test_flat_list_decisions_match_the_allowlist(document: PolicyDocument) -> None:
    flat = parse_policy_value("example.com, .example.org", source="t", client_cidrs=GATE)
    assert flat.decide("10.9.9.9", "www.example.org") == Verdict("default", "allowed", "allowed")
    assert flat.decide("10.9.9.9", "www.example.com") == Verdict("default", "denied", "domain_not_allowlisted")
    assert flat.decide("203.0.113.9", "example.com") == Verdict(None, "denied", "client_not_allowed")


def test_reason_sets_are_known_reasons() -> None:
    known = set(REASONS) | {"domain_denied"}  # domain_denied arrives with the policy rendering
    assert REPORTABLE_REASONS <= known
    assert ALWAYS_ENFORCED_REASONS <= known
    assert not REPORTABLE_REASONS & ALWAYS_ENFORCED_REASONS


# --- diff ------------------------------------------------------------------------------------------------------


def test_diff_per_policy() -> None:
    old = parse(ISSUE_EXAMPLE)
    changed: dict[str, Any] = json.loads(json.dumps(ISSUE_EXAMPLE))
    changed["policies"][0]["mode"] = "enforce"
    changed["policies"][0]["allow"].append("files.example.com")
    changed["policies"][0]["deny"] = []
    changed["policies"][1]["clients"].append("127.0.0.0/8")
    changed["policies"].insert(0, {"name": "new", "clients": ["10.9.0.0/16"], "allow": ["a.example.com"]})
    diff = old.diff(parse(changed))
    assert diff.lines() == [
        "policy new: added (mode enforce)",
        "  + client 10.9.0.0/16",
        "  + allow a.example.com",
        "policy ci-runners: mode report -> enforce",
        "  + allow files.example.com",
        "  - deny gist.github.com",
        "policy default:",
        "  + client 127.0.0.0/8",
    ]
    assert (diff.added, diff.removed) == (4, 1)
    back = parse(changed).diff(old)
    assert back.lines()[-3:] == ["policy new: removed", "  - client 10.9.0.0/16", "  - allow a.example.com"]
    assert (back.added, back.removed) == (1, 4)


def test_diff_of_a_removed_policy_and_of_order() -> None:
    old = parse(ISSUE_EXAMPLE)
    swapped = {"policies": list(reversed(ISSUE_EXAMPLE["policies"]))}
    diff = old.diff(parse(swapped))
    assert diff and diff.changes == ()
    assert diff.lines() == ["order: ci-runners, default -> default, ci-runners"]
    only_default = {"policies": [ISSUE_EXAMPLE["policies"][1]]}
    diff = old.diff(parse(only_default))
    assert diff.lines() == [
        "policy ci-runners: removed",
        "  - client 10.0.8.0/22",
        "  - allow .github.com",
        "  - allow .pythonhosted.org",
        "  - allow pypi.org",
        "  - deny gist.github.com",
    ]


def test_diff_of_equal_documents_is_empty() -> None:
    reordered_entries: dict[str, Any] = json.loads(json.dumps(ISSUE_EXAMPLE))
    reordered_entries["policies"][0]["allow"].reverse()
    assert not parse(ISSUE_EXAMPLE).diff(parse(reordered_entries))


def test_diff_between_forms() -> None:
    flat = parse_policy_value(".amazonaws.com", source="t", client_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    document = parse({"policies": [ISSUE_EXAMPLE["policies"][1]]})
    diff = flat.diff(document)
    assert diff.lines() == ["form: flat list -> document"]
    assert flat.diff(flat).lines() == []


def test_entries_per_policy_for_the_log() -> None:
    document = parse({"policies": [
        policy(name="team-a", clients=["10.1.0.0/16"], allow=["a.example.com", "b.example.com"],
               deny=["x.a.example.com"]),
        policy(name="watch", clients=["10.2.0.0/16"], mode="report", allow=["c.example.com"]),
    ]})
    assert document.entries_by_policy() == {"team-a": {"mode": "enforce", "allow": 2, "deny": 1},
                                            "watch": {"mode": "report", "allow": 1, "deny": 0}}
    assert document.entries_text() == "team-a: 2 allow + 1 deny, enforce; watch: 1 allow, report"
    assert document.entries_text(limit=1) == "team-a: 2 allow + 1 deny, enforce; and 1 more policies"


def test_mode_changes_in_a_diff() -> None:
    before = parse({"policies": [policy(name="ci", clients=["10.1.0.0/16"], mode="report", allow=["a.example.com"])]})
    after = parse({"policies": [policy(name="ci", clients=["10.1.0.0/16"], allow=["a.example.com"])]})
    change = before.diff(after)
    assert change.mode_changes == (("ci", "report", "enforce"),)
    assert (change.added, change.removed) == (0, 0) and change.lines() == ["policy ci: mode report -> enforce"]


def test_a_deny_rule_holds_for_both_idna_mappings() -> None:
    # IDNA2008 keeps the deviation characters (ß, ς, ZWJ, ZWNJ); IDNA2003 clients map them away: both are denied.
    document = parse({"policies": [policy(name="p", clients=["10.0.0.0/8"], allow=[".example.com"],
                                          deny=["straße.example.com", ".xn--3xa.example.com", "bücher.example.com"])]})
    assert document.policies[0].deny.entries == (".xn--3xa.example.com", ".xn--4xa.example.com", "strasse.example.com",
                                                 "xn--bcher-kva.example.com", "xn--strae-oqa.example.com")
    for host in ("strasse.example.com", "xn--strae-oqa.example.com", "a.xn--4xa.example.com"):
        assert document.decide("10.1.2.3", host).reason == "domain_denied"
    assert document.decide("10.1.2.3", "strasse2.example.com").reason == "allowed"
    assert [w for w in document.warnings if "transitional" in w] == [
        "policies[0].deny[0] 'straße.example.com' is also denied as 'strasse.example.com': clients that map "
        "internationalised names the IDNA2003 (transitional) way send that name for it",
        "policies[0].deny[1] '.xn--3xa.example.com' is also denied as '.σ.example.com': clients that map "
        "internationalised names the IDNA2003 (transitional) way send that name for it"]
