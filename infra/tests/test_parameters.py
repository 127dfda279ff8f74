"""Seed parity of the CloudFormation parameters (names, types, defaults, validation)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from infra_synth import Synth

COMMON = {"AllowedDomains", "DnsServers", "ProxyPort", "VpcId", "PublicSubnetIds", "PrivateSubnetIds",
          "ClientCidr", "MinCapacity", "MaxCapacity", "LogRetentionDays", "MetricsNamespace",
          "ReloadIntervalSeconds", "EnableVpcEndpoints", "VpcEndpointRouteTableIds", "AlarmEmail",
          "DeniedRequestsAlarmThreshold", "DrainSeconds", "DeregistrationDelaySeconds", "ClientRoutingPolicy",
          "CrossZoneLoadBalancing", "LogDriverMode", "ContainerInsights"}
EC2_ONLY = {"InstanceType", "AmiId", "KeyName"}


def test_fargate_parameters_are_exactly_the_common_set(fargate: Synth) -> None:
    assert set(fargate.data["Parameters"]) == COMMON


def test_ec2_parameters_add_instance_type_ami_and_key(ec2: Synth) -> None:
    assert set(ec2.data["Parameters"]) == COMMON | EC2_ONLY


def test_parameter_types_and_defaults(synth: Synth) -> None:
    p = synth.data["Parameters"]
    assert p["AllowedDomains"]["Type"] == "String" and p["AllowedDomains"]["Default"] == ""
    assert p["AlarmEmail"]["Default"] == "" and p["VpcEndpointRouteTableIds"]["Type"] == "CommaDelimitedList"
    assert p["DeniedRequestsAlarmThreshold"]["Default"] == 500
    assert p["DnsServers"]["Default"] == ""
    assert p["ProxyPort"] == {**p["ProxyPort"], "Type": "Number", "Default": 3128}
    assert p["VpcId"]["Type"] == "AWS::EC2::VPC::Id"
    assert p["PublicSubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert p["PrivateSubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"
    assert "2-3" in p["PublicSubnetIds"]["Description"] and "2-3" in p["PrivateSubnetIds"]["Description"]
    assert p["ClientCidr"]["Default"] == "172.31.0.0/16"
    # One proxy is allowed (as the seed allowed one instance); the description says what it costs.
    assert p["MinCapacity"]["Default"] == 2 and p["MinCapacity"]["MinValue"] == 1
    assert "with 1, losing that proxy or its AZ stops all egress" in p["MinCapacity"]["Description"]
    assert p["MaxCapacity"]["MinValue"] == 1
    assert p["MetricsNamespace"]["Default"] == "Proxy"
    assert p["ReloadIntervalSeconds"]["Default"] == 30
    retention = p["LogRetentionDays"]
    assert retention["Default"] in retention["AllowedValues"]
    assert {"1", "30", "90", "365", "3653"} <= set(retention["AllowedValues"])


def test_ec2_parameters(ec2: Synth) -> None:
    p = ec2.data["Parameters"]
    assert p["InstanceType"]["Default"] == "t3.small"
    assert p["AmiId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert p["AmiId"]["Default"] == "/aws/service/ecs/optimized-ami/amazon-linux-2023/recommended/image_id"
    assert p["KeyName"]["Default"] == ""  # optional
    assert "Session Manager" in p["KeyName"]["Description"]
    assert ec2.data["Conditions"]["HasKeyName"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "KeyName"}, ""]}]}
    # One task per instance, one EIP per instance, one spare EIP for a rolling deployment.
    assert p["MaxCapacity"]["MaxValue"] == 3 and p["MinCapacity"]["MaxValue"] == 3


@pytest.mark.parametrize("cidr", ["172.31.0.0/16", "10.0.0.0/8", "10.1.2.3/32", "192.168.0.0/24",
                                  "255.255.255.255/32"])
def test_client_cidr_accepts_slash_8_to_32(synth: Synth, cidr: str) -> None:
    assert re.fullmatch(synth.data["Parameters"]["ClientCidr"]["AllowedPattern"], cidr)


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "10.0.0.0/7", "10.0.0.0/33", "256.0.0.0/16", "10.0.0/16",
                                  "10.0.0.0", "", "10.0.0.0/16,0.0.0.0/0", "01.2.3.4/16"])
def test_client_cidr_rejects_everything_else(synth: Synth, cidr: str) -> None:
    assert not re.fullmatch(synth.data["Parameters"]["ClientCidr"]["AllowedPattern"], cidr)


@pytest.mark.parametrize(("value", "ok"), [("", True), ("1.1.1.1", True), ("208.67.222.222,208.67.220.220", True),
                                           ("9.9.9.9,149.112.112.112,1.1.1.1,8.8.8.8", True),
                                           ("9.9.9.9, 149.112.112.112", False),  # each one is a CidrIp as it is
                                           ("1.1.1.1,1.0.0.1,8.8.8.8,8.8.4.4,9.9.9.9", False),  # at most 4 rules
                                           ("dns.example", False), ("1.1.1.1;reboot", False), ("300.1.1.1", False)])
def test_dns_servers_pattern(synth: Synth, value: str, ok: bool) -> None:
    assert bool(re.search(synth.data["Parameters"]["DnsServers"]["AllowedPattern"], value)) is ok


def test_metrics_namespace_pattern_refuses_aws_namespaces(synth: Synth) -> None:
    pattern = synth.data["Parameters"]["MetricsNamespace"]["AllowedPattern"]
    assert re.fullmatch(pattern, "Proxy") and re.fullmatch(pattern, "Egress/Proxy")
    assert not re.fullmatch(pattern, "AWS/EC2") and not re.fullmatch(pattern, "")


def test_subnets_must_belong_to_the_vpc_and_proxies_to_the_load_balancers_azs(synth: Synth) -> None:
    in_vpc, in_nlb_azs = synth.data["Rules"]["SubnetsInVpc"]["Assertions"]
    assert in_vpc["Assert"] == {"Fn::EachMemberEquals": [{"Fn::ValueOfAll": ["AWS::EC2::Subnet::Id", "VpcId"]},
                                                         {"Ref": "VpcId"}]}
    # The NLB never routes to targets in an AZ it has no subnet in.
    assert in_nlb_azs["Assert"] == {"Fn::EachMemberIn": [{"Fn::ValueOf": ["PublicSubnetIds", "AvailabilityZone"]},
                                                         {"Fn::ValueOf": ["PrivateSubnetIds", "AvailabilityZone"]}]}
    # Without cross-zone, each NLB node needs proxies in its own AZ as well.
    zonal = synth.data["Rules"]["ZonalProxiesInEveryLoadBalancerAz"]
    assert zonal["RuleCondition"] == {"Fn::Equals": [{"Ref": "CrossZoneLoadBalancing"}, "false"]}
    (assertion,) = zonal["Assertions"]
    assert assertion["Assert"] == {"Fn::EachMemberIn": [{"Fn::ValueOf": ["PrivateSubnetIds", "AvailabilityZone"]},
                                                        {"Fn::ValueOf": ["PublicSubnetIds", "AvailabilityZone"]}]}


def test_console_groups_cover_every_parameter(synth: Synth) -> None:
    groups = synth.data["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    grouped = [name for group in groups for name in group["Parameters"]]
    assert sorted(grouped) == sorted(synth.data["Parameters"])


@pytest.mark.parametrize(("value", "ok"), [("", True), ("ops@example.com", True), ("a.b+alarms@sub.example.org", True),
                                           ("not-an-email", False), ("a@b", False), ("a @b.c", False)])
def test_alarm_email_pattern(synth: Synth, value: str, ok: bool) -> None:
    assert bool(re.search(synth.data["Parameters"]["AlarmEmail"]["AllowedPattern"], value)) is ok


def _evaluate(condition: Any, values: dict[str, str]) -> bool:
    """The rule functions this template uses, evaluated as CloudFormation does (on the parameters' strings)."""
    (function, args), = condition.items()
    if function == "Fn::Or":
        return any(_evaluate(a, values) for a in args)
    if function == "Fn::Not":
        return not _evaluate(args[0], values)
    if function == "Fn::Equals":
        left, right = (values[a["Ref"]] if isinstance(a, dict) else a for a in args)
        return bool(left == right)
    if function == "Fn::Contains":
        candidates, needle = args
        return values[needle["Ref"]] in candidates
    raise AssertionError(f"unexpected rule function {function}")


def test_min_capacity_above_max_capacity_fails_at_launch(synth: Synth) -> None:
    """Every (MinCapacity, MaxCapacity) pair the parameters admit: the rule passes exactly when min <= max."""
    params = synth.data["Parameters"]
    rule = synth.data["Rules"]["MinCapacityNotAboveMaxCapacity"]
    assert "RuleCondition" not in rule  # always checked
    low = params["MinCapacity"]["MinValue"]
    high = params["MaxCapacity"]["MaxValue"]
    assert params["MinCapacity"]["MaxValue"] == high
    for minimum in range(low, high + 1):
        for maximum in range(params["MaxCapacity"]["MinValue"], high + 1):
            values = {"MinCapacity": str(minimum), "MaxCapacity": str(maximum)}
            passed = all(_evaluate(a["Assert"], values) for a in rule["Assertions"])
            assert passed is (minimum <= maximum), values
    assert all("MaxCapacity must be at least MinCapacity" in a["AssertDescription"] for a in rule["Assertions"])


def test_arm64_synthesizes_graviton_defaults(tmp_path_factory: pytest.TempPathFactory) -> None:
    from infra_synth import ECR_IMAGE, synthesize
    synth = synthesize(tmp_path_factory.mktemp("arm64-ec2"), {"capacity": "ec2", "imageUri": ECR_IMAGE,
                                                             "arch": "arm64"})
    p = synth.data["Parameters"]
    assert p["AmiId"]["Default"] == "/aws/service/ecs/optimized-ami/amazon-linux-2023/arm64/recommended/image_id"
    assert p["InstanceType"]["Default"] == "t4g.small"
    pattern = p["InstanceType"]["AllowedPattern"]
    for ok in ("t4g.small", "c7gn.large", "m8g.xlarge", "r7gd.2xlarge"):
        assert re.fullmatch(pattern, ok), ok
    for wrong in ("t3.small", "c6i.large", "m7a.large"):
        assert not re.fullmatch(pattern, wrong), wrong


def test_x86_instance_types_refuse_graviton(ec2: Synth) -> None:
    pattern = ec2.data["Parameters"]["InstanceType"]["AllowedPattern"]
    for ok in ("t3.small", "c6i.large", "m7a.large", "c6in.xlarge", "g5.xlarge"):
        assert re.fullmatch(pattern, ok), ok
    for wrong in ("t4g.small", "c7gn.large", "m8g.xlarge"):
        assert not re.fullmatch(pattern, wrong), wrong
