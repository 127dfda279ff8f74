"""EC2 mode with -c transparent=on: what the template adds (assertions on the synthesized template)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from aws_cdk.assertions import Match
from egress_proxy_infra.config import ConfigError, InfraConfig
from egress_proxy_infra.transparent_mode import ports_refresh_script
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


def test_instances_refresh_the_ports_sets_on_a_timer(transparent: Synth) -> None:
    user_data = json.dumps(transparent.template.find_resources("AWS::EC2::LaunchTemplate"))
    assert "egress-proxy-ports.timer" in user_data and "OnUnitActiveSec=15s" in user_data
    assert "systemctl enable --now egress-proxy-ports.timer" in user_data
    assert "docker exec" in user_data and "egress-proxy nft-sets" in user_data


def _run_refresh(tmp_path: Path, transaction: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The refresh script with stand-ins for docker (a running proxy container whose nft-sets prints
    ``transaction``) and nft (which records what it was asked to apply)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    applied = tmp_path / "applied.nft"
    (tmp_path / "transaction").write_text(transaction)
    (bin_dir / "docker").write_text(f"#!/bin/sh\nif [ \"$1\" = ps ]; then echo 0123abcd; exit 0; fi\n"
                                    f"cat {tmp_path / 'transaction'}\n")
    (bin_dir / "nft").write_text(f"#!/bin/sh\n[ \"$1\" = -f ] && cat \"$2\" > {applied}\n")
    for tool in ("docker", "nft"):
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "refresh"
    script.write_text(ports_refresh_script())
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    return result, applied


GOOD = ("# egress-proxy nft-sets\nflush set inet egress_proxy ports_v4\n"
        "add element inet egress_proxy ports_v4 { 10.0.8.0/22 . 140.82.112.3 . 22 timeout 300s }\n"
        "add element inet egress_proxy ports_v4 { 10.0.8.0/22 . 203.0.113.0/24 . 5432 }\n")


def test_the_refresh_applies_the_ports_transaction(tmp_path: Path) -> None:
    result, applied = _run_refresh(tmp_path, GOOD)
    assert result.returncode == 0, result.stderr
    assert applied.read_text() == GOOD


@pytest.mark.parametrize("hostile", [
    "flush ruleset", "delete table inet egress_proxy", "add rule inet egress_proxy forward accept",
    "add element inet egress_proxy clients_v4 { 0.0.0.0/0 }",
    "add element inet egress_proxy ports_v4 { 0.0.0.0/0 . 0.0.0.0/0 . 1-65535 }; flush ruleset",
])
def test_the_refresh_refuses_anything_but_the_ports_sets(tmp_path: Path, hostile: str) -> None:
    """The container prints the transaction; the host applies nothing unless every line fills the ports sets."""
    result, applied = _run_refresh(tmp_path, GOOD + hostile + "\n")
    assert result.returncode == 1 and hostile in result.stderr
    assert not applied.exists()


def test_user_data_stays_under_ec2s_16_kb(transparent: Synth) -> None:
    """EC2 refuses user data over 16 KB (before base64): its literal text, with room left for parameter values."""
    def strings(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [text for item in node for text in strings(item)]
        if isinstance(node, dict):
            return [text for value in node.values() for text in strings(value)]
        return []

    for template in transparent.template.find_resources("AWS::EC2::LaunchTemplate").values():
        literal = sum(map(len, strings(template["Properties"]["LaunchTemplateData"]["UserData"])))
        assert 4096 < literal < 16384 - 2048, literal
