"""Client selectors by identity: the grammar, first match over every kind, the PROXY endpoint, and what the
renderer makes of a document that uses them (the integration tests run the helper inside Squid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egress_proxy.allowlist import AllowlistError
from egress_proxy.identity_helper import (
    BadSelector,
    Helper,
    Membership,
    endpoint_from_tlv,
    needs_lookup,
    parse_selector,
)
from egress_proxy.policy import parse_policy_value
from egress_proxy.settings import SettingsError, load_settings
from egress_proxy.squid_conf import StatePaths, render

GATE = load_settings({}, {}).client_cidrs
SG_A = "sg-0aaaaaaaaaaaaaaaa"
SG_B = "sg-0bbbbbbbbbbbbbbbb"
VPCE_A = "vpce-0aaaaaaaaaaaaaaaa"
VPCE_B = "vpce-0bbbbbbbbbbbbbbbb"


def _document(*policies: dict[str, object]) -> str:
    return json.dumps({"policies": list(policies)})


@pytest.mark.parametrize(("raw", "kind", "text"), [
    ("10.0.8.0/22", "cidr", "10.0.8.0/22"),
    ("fd00:1::/64", "cidr", "fd00:1::/64"),
    ("SG-0AAAAAAAAAAAAAAAA", "sg", SG_A),
    ("sg-12345678", "sg", "sg-12345678"),
    ("ecs:prod/payments-api", "ecs", "ecs:prod/payments-api"),
    ("tag:team=payments", "tag", "tag:team=payments"),
    ("tag:aws:cloudformation:stack-name=egress", "tag", "tag:aws:cloudformation:stack-name=egress"),
    (VPCE_A, "vpce", VPCE_A),
    (f"{VPCE_A}:10.1.0.0/16", "vpce", f"{VPCE_A}:10.1.0.0/16"),
    (f"{VPCE_A}:fd00:1::/64", "vpce", f"{VPCE_A}:fd00:1::/64"),
])
def test_selectors_parse_to_their_canonical_form(raw: str, kind: str, text: str) -> None:
    selector = parse_selector(raw)
    assert (selector.kind, selector.text) == (kind, text)


@pytest.mark.parametrize(("raw", "why", "fix"), [
    ("sg-xyz", "is not a security group ID", "sg- and 8 or 17 hex digits"),
    ("vpce-0aaa", "does not start with a VPC endpoint ID", "vpce-0123456789abcdef0:10.1.0.0/16"),
    (f"{VPCE_A}:10.1.0.1/16", "has a range that has host bits set", f"use '{VPCE_A}:10.1.0.0/16'"),
    ("ecs:prod", "is not an ECS service selector", "ecs:CLUSTER/SERVICE"),
    ("ecs:arn:aws:ecs:us-east-1:1:cluster/prod/svc", "is not an ECS service selector", "not ARNs"),
    ("tag:team", "is not a tag selector", "tag:KEY=VALUE"),
    ("tag:team=pay ments", "is not a tag selector", "no spaces"),
    ("payments", "is not a client selector", "sg-0123456789abcdef0"),
])
def test_bad_selectors_say_why_and_how_to_fix(raw: str, why: str, fix: str) -> None:
    with pytest.raises(BadSelector) as caught:
        parse_selector(raw)
    assert caught.value.why == why
    assert fix in caught.value.fix


def test_document_errors_name_the_item_and_its_path() -> None:
    value = _document(
        {"name": "a", "clients": ["sg-nothex", "ecs:prod", SG_A, SG_A.upper()], "allow": ["a.com"]})
    with pytest.raises(AllowlistError) as caught:
        parse_policy_value(value, source="test", client_cidrs=GATE)
    lines = str(caught.value)
    assert "policies[0].clients[0]: 'sg-nothex' is not a security group ID" in lines
    assert "policies[0].clients[1]: 'ecs:prod' is not an ECS service selector" in lines
    assert f"policies[0].clients[3]: '{SG_A.upper()}' repeats policies[0].clients[2]; list each client selector once" \
        in lines


def test_first_match_in_document_order_runs_over_every_kind() -> None:
    document = parse_policy_value(_document(
        {"name": "wide", "clients": ["10.9.0.0/16"], "allow": ["wide.com"]},
        {"name": "payments", "clients": [SG_A, "ecs:prod/pay"], "allow": ["pay.com"]},
        {"name": "tagged", "clients": ["tag:team=data", "10.0.0.0/8"], "allow": ["data.com"]},
    ), source="test", client_cidrs=GATE)
    # A CIDR listed first wins over a later security group for the same address...
    assert document.identify("10.9.0.5", members=[SG_A])[0].name == "wide"  # type: ignore[index]
    # ...and a security group listed first wins over a later CIDR.
    policy, selector = document.identify("10.1.0.5", members=[SG_A, "tag:team=data"])  # type: ignore[misc]
    assert (policy.name, selector.text) == ("payments", SG_A)
    assert document.identify("10.1.0.5", members=["ecs:prod/pay"])[1].text == "ecs:prod/pay"  # type: ignore[index]
    assert document.identify("10.1.0.5")[1].text == "10.0.0.0/8"  # type: ignore[index]
    assert document.identify("192.0.2.1", members=[SG_A]) is None  # outside EGRESS_CLIENT_CIDRS
    verdict = document.decide("10.1.0.5", "pay.com", members=[SG_A])
    assert (verdict.policy, verdict.decision) == ("payments", "allowed")
    assert document.decide("10.1.0.5", "pay.com").decision == "denied"  # not a member: 'tagged' judges it


def test_an_endpoint_connection_matches_only_its_endpoint_selectors() -> None:
    document = parse_policy_value(_document(
        {"name": "local", "clients": ["10.0.0.0/8", SG_A], "allow": ["local.com"]},
        {"name": "consumer-a", "clients": [f"{VPCE_A}:10.1.0.0/16"], "allow": ["a.com"]},
        {"name": "consumer-b", "clients": [f"{VPCE_B}:10.1.0.0/16", VPCE_B], "allow": ["b.com"]},
    ), source="test", client_cidrs=GATE)
    # The same consumer address, told apart by its endpoint (and never taken by the local CIDR or group).
    assert document.select("10.1.2.3", endpoint=VPCE_A, members=[SG_A]).name == "consumer-a"  # type: ignore[union-attr]
    assert document.select("10.1.2.3", endpoint=VPCE_B).name == "consumer-b"  # type: ignore[union-attr]
    assert document.identify("10.2.0.1", endpoint=VPCE_B)[1].text == VPCE_B  # type: ignore[index]
    assert document.select("10.2.0.1", endpoint=VPCE_A) is None  # outside A's range
    assert document.select("10.1.2.3").name == "local"  # type: ignore[union-attr]


def test_endpoint_tlv_as_squid_hands_it_to_the_helper() -> None:
    assert endpoint_from_tlv("%01" + VPCE_A) == VPCE_A
    assert endpoint_from_tlv(VPCE_A.upper()) == VPCE_A
    assert endpoint_from_tlv("-") is None
    assert endpoint_from_tlv("%01not-an-endpoint") is None


def test_a_lookup_is_needed_only_when_a_membership_selector_could_claim_the_address() -> None:
    document = parse_policy_value(_document(
        {"name": "wide", "clients": ["10.9.0.0/16"], "allow": ["wide.com"]},
        {"name": "payments", "clients": [SG_A], "allow": ["pay.com"]},
        {"name": "rest", "clients": ["10.0.0.0/8"], "allow": ["rest.com"]},
    ), source="test", client_cidrs=GATE)
    policies = [(p.name, p.selectors) for p in document.policies]
    import ipaddress
    assert not needs_lookup(policies, ipaddress.ip_address("10.9.0.1"), None)
    assert needs_lookup(policies, ipaddress.ip_address("10.1.0.1"), None)
    assert not needs_lookup(policies, ipaddress.ip_address("10.1.0.1"), VPCE_A)


def test_the_helper_answers_from_the_membership_file_and_fails_closed(tmp_path: Path) -> None:
    document = parse_policy_value(_document(
        {"name": "payments", "clients": [SG_A], "allow": ["pay.com"]},
        {"name": "rest", "clients": ["10.0.0.0/8"], "allow": ["rest.com"]},
    ), source="test", client_cidrs=GATE)
    members = tmp_path / "members.json"
    members.write_text(json.dumps({"members": {"10.1.0.1": [SG_A], "10.1.0.2": []}}))
    helper = Helper([(p.name, p.selectors) for p in document.policies], Membership(str(members)),
                    str(tmp_path / "no.sock"), 0.5)
    assert helper.answer("10.1.0.1", "-") == f"OK client_policy=payments client_identity={SG_A}"
    assert helper.answer("10.1.0.2", "-") == "OK client_policy=rest client_identity=10.0.0.0/8"
    # Unknown to every poll, and the supervisor does not answer: refused, with the reason.
    assert helper.answer("10.1.0.3", "-") == "ERR identity_error=lookup_unavailable"


def test_identity_documents_render_the_helper_and_cidr_documents_do_not() -> None:
    settings = load_settings({}, {"EGRESS_PROXY_PROTOCOL": "required", "EGRESS_PROXY_PROTOCOL_FROM": "10.0.0.0/24"})
    paths = StatePaths(Path("/s"))
    identity = parse_policy_value(_document(
        {"name": "payments", "clients": [SG_A], "allow": ["pay.com"]},
        {"name": "consumer-a", "clients": [VPCE_A], "mode": "report", "allow": ["a.com"]},
    ), source="test", client_cidrs=GATE)
    rendered = render(settings, identity, paths, run_as=None, denial_port=1, access_log_port=2)
    conf = rendered.squid_conf
    assert "external_acl_type client_identity ttl=5 negative_ttl=5 " in conf
    assert " %>a %{234}proxy_protocol::>h " in conf
    assert "acl policy_payments note client_policy payments" in conf
    assert "acl report_clients note policy consumer-a" in conf
    assert " require-proxy-header" in conf
    assert "proxy_protocol_access allow proxy_protocol_from" in conf
    assert json.loads(rendered.identity or "")["policies"][0] == {"name": "payments", "clients": [SG_A]}
    cidr = parse_policy_value(_document({"name": "a", "clients": ["10.0.0.0/8"], "allow": ["a.com"]}),
                              source="test", client_cidrs=GATE)
    plain = render(load_settings({}, {}), cidr, paths, run_as=None, denial_port=1, access_log_port=2)
    assert "client_identity" not in plain.squid_conf.split("logformat")[0]
    assert plain.identity is None
    assert "require-proxy-header" not in plain.squid_conf


@pytest.mark.parametrize(("env", "name"), [
    ({"EGRESS_PROXY_PROTOCOL": "required"}, "proxy_protocol_from"),
    ({"EGRESS_PROXY_PROTOCOL_FROM": "10.0.0.0/24"}, "proxy_protocol_from"),
    ({"EGRESS_PROXY_PROTOCOL": "v2"}, "proxy_protocol"),
])
def test_proxy_protocol_settings_are_checked(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, env)
    assert caught.value.name == name


def test_endpoint_selectors_without_the_proxy_protocol_are_warned_about() -> None:
    from egress_proxy.squid_conf import settings_warnings

    document = parse_policy_value(_document(
        {"name": "consumer", "clients": ["10.0.0.0/8", VPCE_A], "allow": ["a.com"]}), source="test", client_cidrs=GATE)
    (warning,) = settings_warnings(load_settings({}, {}), document)
    assert warning.startswith(f"policies[0].clients[1] '{VPCE_A}' can never match: EGRESS_PROXY_PROTOCOL is off")
    on = load_settings({}, {"EGRESS_PROXY_PROTOCOL": "required", "EGRESS_PROXY_PROTOCOL_FROM": "10.0.0.0/24"})
    assert settings_warnings(on, document) == []


def test_a_silent_supervisor_is_a_timeout_within_the_bound(tmp_path: Path) -> None:
    import socket as socket_module

    from egress_proxy.identity_helper import ask_supervisor

    path = str(tmp_path / "silent.sock")
    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)  # accepts (the kernel does), never answers
        assert ask_supervisor(path, "10.0.0.1", 0.3) == (None, "lookup_timeout")
