"""EC2 mode with -c transparent=on: what the template adds (assertions on the synthesized template)."""

from __future__ import annotations

import json

import pytest
from aws_cdk.assertions import Match
from egress_proxy_infra.config import ConfigError, InfraConfig
from infra_synth import Synth


def test_only_ec2_mode_can_be_transparent() -> None:
    with pytest.raises(ConfigError, match="needs capacity=ec2"):
        InfraConfig.from_context({"capacity": "fargate", "transparent": "on"})
    with pytest.raises(ConfigError, match="use on or off"):
        InfraConfig.from_context({"capacity": "ec2", "transparent": "maybe"})


def test_off_by_default(ec2: Synth) -> None:
    assert "TransparentRouteTableIds" not in ec2.data["Parameters"]
    assert "EGRESS_TRANSPARENT" not in json.dumps(ec2.data)


def test_route_tables_are_a_parameter(transparent: Synth) -> None:
    assert transparent.data["Parameters"]["TransparentRouteTableIds"]["Type"] == "CommaDelimitedList"


def test_task_opens_the_intercept_ports(transparent: Synth) -> None:
    transparent.template.has_resource_properties("AWS::ECS::TaskDefinition", {"ContainerDefinitions": [
        Match.object_like({"Environment": Match.array_with([{"Name": "EGRESS_TRANSPARENT", "Value": "on"}])})]})


def test_clients_reach_the_instances_on_every_port(transparent: Synth) -> None:
    groups = transparent.template.find_resources("AWS::EC2::SecurityGroup")
    ingress = [rule for group in groups.values() for rule in group["Properties"].get("SecurityGroupIngress", [])]
    ingress += [r["Properties"] for r in transparent.template.find_resources("AWS::EC2::SecurityGroupIngress").values()]
    assert [rule for rule in ingress if rule.get("IpProtocol") == "-1"
            and rule.get("CidrIp") == {"Ref": "ClientCidr"}], ingress


def test_instances_apply_the_products_nft_ruleset_at_boot(transparent: Synth) -> None:
    text = json.dumps(transparent.template.find_resources("AWS::EC2::LaunchTemplate"))
    assert "egress-proxy-nft.service" in text and "Before=docker.service ecs.service" in text
    assert "redirect to :3129" in text and "redirect to :3130" in text and "counter name dropped drop" in text
    assert "${ClientCidr}" in text and "198.18.255.0/24" not in text  # the sentinel was substituted
    assert "shutdown -h now" in text  # fail closed


def test_route_failover_function_runs_on_state_changes_and_every_minute(transparent: Synth) -> None:
    transparent.template.has_resource_properties("AWS::Lambda::Function", {
        "Environment": {"Variables": Match.object_like({
            "ROUTE_TABLE_IDS": {"Fn::Join": [",", {"Ref": "TransparentRouteTableIds"}]}})}})
    transparent.template.has_resource_properties("AWS::Events::Rule", {
        "EventPattern": {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]}})
    transparent.template.has_resource_properties("AWS::Events::Rule", {"ScheduleExpression": "rate(1 minute)"})


def test_route_failover_permissions(transparent: Synth) -> None:
    statements = {s.get("Sid"): s for p in transparent.template.find_resources("AWS::IAM::Policy").values()
                  for s in p["Properties"]["PolicyDocument"]["Statement"]}
    assert statements["RouteTablesOfThisAccountAndRegion"]["Action"] == ["ec2:CreateRoute", "ec2:ReplaceRoute"]
    modify = statements["SourceDestCheckOfPoolInstancesOnly"]
    assert modify["Action"] == "ec2:ModifyInstanceAttribute"
    assert "aws:ResourceTag/egress-proxy:eip-pool" in json.dumps(modify["Condition"])
