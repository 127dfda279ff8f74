"""Outputs with the seed's fixed names."""

from __future__ import annotations

import json

import pytest
from infra_synth import Synth

COMMON = {"ProxyDnsName", "ProxyPort", "ProxyEgressIps", "AccessLogGroup", "ProxySecurityGroup",
          "LoadBalancerSecurityGroup", "AllowlistSecretArn", "ProxyExportCommand", "AlarmTopicArn"}


def _logical_id(synth: Synth, type_: str, name_part: str = "") -> str:
    (logical_id,) = [k for k in synth.resources(type_) if name_part in k]
    return logical_id


def test_fargate_outputs(fargate: Synth) -> None:
    assert set(fargate.data["Outputs"]) == COMMON
    assert fargate.data["Outputs"]["ProxyEgressIps"]["Value"].startswith("not fixed in fargate mode")


def test_ec2_outputs_list_the_pool(ec2: Synth) -> None:
    outputs = ec2.data["Outputs"]
    assert set(outputs) == COMMON | {f"EgressIp{i}" for i in range(1, 5)} | {"AutoScalingGroupName"}
    eips = sorted(ec2.resources("AWS::EC2::EIP"))
    assert len(eips) == 4
    refs = [outputs[f"EgressIp{i}"]["Value"] for i in range(1, 5)]
    assert sorted(ref["Ref"] for ref in refs) == eips
    assert outputs["ProxyEgressIps"]["Value"] == {"Fn::Join": [",", refs]}


def test_eip_pool_size_follows_context(tmp_path_factory: pytest.TempPathFactory) -> None:
    from infra_synth import ECR_IMAGE, synthesize
    synth = synthesize(tmp_path_factory.mktemp("pool6"),
                       {"capacity": "ec2", "imageUri": ECR_IMAGE, "eipPoolSize": "6"})
    assert len(synth.resources("AWS::EC2::EIP")) == 6
    assert {f"EgressIp{i}" for i in range(1, 7)} <= set(synth.data["Outputs"])
    assert "EgressIp7" not in synth.data["Outputs"]
    _, asg = synth.only("AWS::AutoScaling::AutoScalingGroup")
    assert asg["Properties"]["MaxSize"] == "6"
    assert synth.data["Parameters"]["MaxCapacity"]["MaxValue"] == 5


def test_common_outputs_point_at_the_right_resources(synth: Synth) -> None:
    outputs = synth.data["Outputs"]
    nlb = _logical_id(synth, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert outputs["ProxyDnsName"]["Value"] == {"Fn::GetAtt": [nlb, "DNSName"]}
    assert outputs["ProxyPort"]["Value"] == {"Ref": "ProxyPort"}
    assert outputs["AccessLogGroup"]["Value"] == {"Ref": _logical_id(synth, "AWS::Logs::LogGroup", "AccessLogs")}
    assert outputs["AlarmTopicArn"]["Value"] == {"Ref": _logical_id(synth, "AWS::SNS::Topic")}
    assert outputs["AllowlistSecretArn"]["Value"] == {"Ref": _logical_id(synth, "AWS::SecretsManager::Secret")}
    # The seed's output held a literal string; ours is the proxies' real security group.
    proxy_sg = _logical_id(synth, "AWS::EC2::SecurityGroup", "Proxies")
    assert outputs["ProxySecurityGroup"]["Value"] == {"Fn::GetAtt": [proxy_sg, "GroupId"]}
    lb_sg = _logical_id(synth, "AWS::EC2::SecurityGroup", "LoadBalancer")
    assert outputs["LoadBalancerSecurityGroup"]["Value"] == {"Fn::GetAtt": [lb_sg, "GroupId"]}


def test_export_command_sets_proxies_and_keeps_metadata_endpoints_direct(synth: Synth) -> None:
    value = synth.data["Outputs"]["ProxyExportCommand"]["Value"]
    parts = value["Fn::Join"][1]
    nlb = _logical_id(synth, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    # The Fn::If parts add the VPC endpoints' names when they exist (test_hardening.py); here they do not.
    rendered = "".join(p if isinstance(p, str) else
                       ("<DNS>" if p == {"Fn::GetAtt": [nlb, "DNSName"]} else
                        "" if "Fn::If" in p else f"<{json.dumps(p)}>") for p in parts)
    rendered = rendered.replace('<{"Ref": "ProxyPort"}>', "<PORT>")
    assert rendered.startswith("export ")
    assert "http_proxy=http://<DNS>:<PORT>" in rendered
    assert "https_proxy=http://<DNS>:<PORT>" in rendered
    no_proxy = rendered.split("no_proxy=")[1].split()[0].split(",")
    assert {"169.254.169.254", "169.254.170.2", "localhost", "127.0.0.1"} <= set(no_proxy)


def test_every_output_is_exported_under_the_stack_name(synth: Synth) -> None:
    """For Fn::ImportValue in other stacks, as the seed's outputs were (under fixed names there)."""
    for name, output in synth.data["Outputs"].items():
        assert output["Export"] == {"Name": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, name]]}}, name
