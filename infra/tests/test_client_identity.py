"""Clients by AWS identity in the CDK app: the task role gets exactly what the selectors in use need, and the
PrivateLink option shares the NLB with proxy protocol v2 (client_identity.py)."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match
from egress_proxy_infra.client_identity import IdentityConfig
from egress_proxy_infra.config import ConfigError
from infra_synth import PUBLIC_IMAGE, Synth, synthesize
from test_quality import cfn_lint

PRINCIPAL = "arn:aws:iam::111122223333:root"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesize(tmp_path_factory.mktemp("identity"), {
        "capacity": "fargate", "imageUri": PUBLIC_IMAGE,
        "identitySelectors": "sg,tag,vpce,ecs:prod/payments,ecs:prod/etl,ecs:batch/jobs",
        "endpointService": "on", "endpointServicePrincipals": PRINCIPAL,
    })


def _task_role_statements(synth: Synth) -> list[dict[str, Any]]:
    policies = synth.resources("AWS::IAM::Policy")
    return [statement for policy in policies.values()
            if any("TaskRole" in role.get("Ref", "") for role in policy["Properties"]["Roles"])
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]]


def _actions(statements: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    for statement in statements:
        actions = statement["Action"]
        found |= {actions} if isinstance(actions, str) else set(actions)
    return found


def test_no_selectors_grant_nothing_more(fargate: Synth) -> None:
    actions = _actions(_task_role_statements(fargate))
    assert not {a for a in actions if a.startswith(("ec2:", "ecs:"))}
    assert not fargate.resources("AWS::EC2::VPCEndpointService")


def test_the_selectors_in_use_get_exactly_their_permissions(shared: Synth) -> None:
    statements = _task_role_statements(shared)
    assert {a for a in _actions(statements) if a.startswith(("ec2:", "ecs:"))} == {
        "ec2:DescribeNetworkInterfaces", "ecs:ListTasks", "ecs:DescribeTasks"}
    by_action = {statement["Action"]: statement for statement in statements if isinstance(statement["Action"], str)}
    assert by_action["ec2:DescribeNetworkInterfaces"]["Resource"] == "*"
    clusters = by_action["ecs:ListTasks"]["Condition"]["ArnEquals"]["ecs:cluster"]
    assert sorted(c["Fn::Join"][1][-1] for c in clusters) == [":cluster/batch", ":cluster/prod"]
    tasks = by_action["ecs:DescribeTasks"]["Resource"]
    assert sorted(t["Fn::Join"][1][-1] for t in tasks) == [":task/batch/*", ":task/prod/*"]


def test_the_endpoint_service_shares_the_nlb_with_proxy_protocol(shared: Synth) -> None:
    shared.template.has_resource_properties("AWS::EC2::VPCEndpointService", {
        "AcceptanceRequired": True, "NetworkLoadBalancerArns": [Match.any_value()]})
    shared.template.has_resource_properties("AWS::EC2::VPCEndpointServicePermissions", {
        "AllowedPrincipals": [PRINCIPAL]})
    shared.template.has_resource_properties("AWS::ElasticLoadBalancingV2::TargetGroup", {
        "TargetGroupAttributes": Match.array_with([{"Key": "proxy_protocol_v2.enabled", "Value": "true"}]),
        "HealthCheckProtocol": "TCP"})  # passes on the handshake, with or without the NLB's PROXY header
    shared.template.has_resource_properties("AWS::ElasticLoadBalancingV2::TargetGroup", {
        "TargetGroupAttributes": Match.array_with([{"Key": "preserve_client_ip.enabled", "Value": "false"}])})
    shared.template.has_resource_properties("AWS::ElasticLoadBalancingV2::LoadBalancer", {
        "EnforceSecurityGroupInboundRulesOnPrivateLinkTraffic": "off"})
    shared.template.has_resource_properties("AWS::ECS::TaskDefinition", {"ContainerDefinitions": [
        Match.object_like({"Environment": Match.array_with([
            {"Name": "EGRESS_PROXY_PROTOCOL", "Value": "required"},
            {"Name": "EGRESS_PROXY_PROTOCOL_FROM", "Value": {"Fn::Join": [",", {"Ref": "LoadBalancerSubnetCidrs"}]}},
        ])})]})
    assert "EndpointServiceName" in shared.data["Outputs"]
    assert shared.data["Outputs"]["EndpointServiceName"]["Export"] == {
        "Name": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "EndpointServiceName"]]}}
    assert shared.data["Parameters"]["LoadBalancerSubnetCidrs"]["Type"] == "CommaDelimitedList"


def test_the_shared_variant_passes_cfn_lint_and_cdk_nag(shared: Synth) -> None:
    assert cfn_lint(shared.template_path) == []
    pattern = Match.string_like_regexp(r"(AwsSolutions|CdkNag)")
    annotations = Annotations.from_stack(shared.stack)
    findings = annotations.find_error("*", pattern) + annotations.find_warning("*", pattern)
    assert findings == [], [f"{m.id}: {str(m.entry.data)[:200]}" for m in findings]


@pytest.mark.parametrize(("context", "message"), [
    ({"identitySelectors": "security-groups"}, "is not a selector kind"),
    ({"identitySelectors": "ecs:arn:aws:ecs:eu-west-1:1:cluster/prod"}, "is not ecs:CLUSTER/SERVICE"),
    ({"endpointService": "yes"}, "use on or off"),
    ({"endpointService": "on", "endpointServicePrincipals": "111122223333"}, "is not an IAM principal ARN"),
    ({"endpointServicePrincipals": PRINCIPAL}, "need -c endpointService=on"),
])
def test_bad_context_says_how_to_fix_it(context: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        IdentityConfig.from_context(context)
