"""EC2 mode with -c transparent=on: what the template adds (assertions on the synthesized template)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
from aws_cdk.assertions import Match
from egress_proxy_infra.config import PROXY_EGRESS_PORTS, ConfigError, InfraConfig
from egress_proxy_infra.proxy_task import ALLOWED_CONNECT_PORTS, ALLOWED_HTTP_PORTS
from egress_proxy_infra.transparent_mode import (
    CLIENT_IPV6_CIDR_PATTERN,
    IPV6_BYPASS_MARKER,
    forwarding_commands,
    nft_ruleset,
    ports_refresh_script,
)
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


@pytest.mark.parametrize("variant", ["transparent", "transparent_ipv6", "transparent_ipv6_extra_ports"])
def test_user_data_stays_under_ec2s_16_kb(variant: str, request: pytest.FixtureRequest) -> None:
    """EC2 refuses user data over 16 KB (before base64): its literal text, with room left for parameter values."""
    transparent: Synth = request.getfixturevalue(variant)

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


# --- IPv6 (-c transparentIpv6=on) ---------------------------------------------------------------------------------


def _security_group_rules(synth: Synth, direction: str) -> list[dict[str, object]]:
    groups = synth.template.find_resources("AWS::EC2::SecurityGroup")
    key = f"SecurityGroup{direction}"
    rules = [rule for group in groups.values() for rule in group["Properties"].get(key, [])]
    return rules + [r["Properties"] for r in synth.template.find_resources(f"AWS::EC2::{key}").values()]


def _environment(synth: Synth) -> dict[str, object]:
    (task,) = synth.template.find_resources("AWS::ECS::TaskDefinition").values()
    return {e["Name"]: e["Value"] for e in task["Properties"]["ContainerDefinitions"][0]["Environment"]}


def _route_failover_environment(synth: Synth) -> dict[str, object]:
    (function,) = [f for f in synth.template.find_resources("AWS::Lambda::Function").values()
                   if "ROUTE_TABLE_IDS" in f["Properties"].get("Environment", {}).get("Variables", {})]
    variables: dict[str, object] = function["Properties"]["Environment"]["Variables"]
    return variables


def test_ipv6_needs_transparent_mode() -> None:
    with pytest.raises(ConfigError, match="transparentIpv6=on needs transparent=on"):
        InfraConfig.from_context({"capacity": "ec2", "transparentIpv6": "on"})
    with pytest.raises(ConfigError, match="transparentIpv6='v6': use on or off"):
        InfraConfig.from_context({"capacity": "ec2", "transparent": "on", "transparentIpv6": "v6"})


def test_ipv6_is_off_unless_asked_for(transparent: Synth) -> None:
    """IPv4 only: no IPv6 parameter, rule, address or route; the function only reports a ::/0 that bypasses."""
    assert "ClientIpv6Cidr" not in transparent.data["Parameters"]
    assert not [r for d in ("Ingress", "Egress") for r in _security_group_rules(transparent, d) if "CidrIpv6" in r]
    text = json.dumps(transparent.template.find_resources("AWS::EC2::LaunchTemplate"))
    assert "Ipv6AddressCount" not in text and "net.ipv6.conf.all.forwarding" not in text
    assert "net.ipv4.ip_forward=1" in text
    assert _environment(transparent)["EGRESS_CLIENT_CIDRS"] == {"Ref": "ClientCidr"}
    assert _route_failover_environment(transparent)["ROUTE_IPV6"] == "off"


def _bypass_alarms(synth: Synth) -> list[dict[str, object]]:
    return [a["Properties"] for name, a in synth.template.find_resources("AWS::CloudWatch::Alarm").items()
            if "Ipv6RoutesBypassProxy" in name]


def test_ipv6_off_alarms_on_a_route_that_bypasses_the_proxy(transparent: Synth) -> None:
    """The function's WARNING line becomes an alarm on the alarm topic: an unfiltered ::/0 is a hole, not a note."""
    (alarm,) = _bypass_alarms(transparent)
    (topic,) = transparent.template.find_resources("AWS::SNS::Topic")
    assert alarm["Threshold"] == 1 and alarm["AlarmActions"] == [{"Ref": topic}]
    (metric_filter,) = [f["Properties"] for f in transparent.template.find_resources("AWS::Logs::MetricFilter").values()
                        if IPV6_BYPASS_MARKER in f["Properties"]["FilterPattern"]]
    assert metric_filter["FilterPattern"] == f'"{IPV6_BYPASS_MARKER}"'
    assert metric_filter["LogGroupName"]["Ref"].startswith("TransparentRouteFailoverLogs")
    assert metric_filter["MetricTransformations"][0]["MetricName"] == alarm["MetricName"] == "routes.ipv6_bypass"


def _lambda_error_alarms(synth: Synth) -> dict[str, dict[str, object]]:
    """AWS/Lambda Errors alarms, by the logical ID of the function they watch."""
    alarms = [a["Properties"] for a in synth.template.find_resources("AWS::CloudWatch::Alarm").values()
              if a["Properties"].get("Namespace") == "AWS/Lambda" and a["Properties"].get("MetricName") == "Errors"]
    return {a["Dimensions"][0]["Value"]["Ref"]: a for a in alarms}


def test_the_route_failover_functions_own_errors_reach_the_alarm_topic(transparent: Synth, ec2: Synth) -> None:
    """A failing failover leaves routes on a failed instance without a word in the route tables: its errors alarm."""
    (function,) = [name for name, f in transparent.resources("AWS::Lambda::Function").items()
                   if "ROUTE_TABLE_IDS" in f["Properties"].get("Environment", {}).get("Variables", {})]
    alarm = _lambda_error_alarms(transparent)[function]
    (topic,) = transparent.template.find_resources("AWS::SNS::Topic")
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": function}}]
    assert alarm["Statistic"] == "Sum" and alarm["Period"] == 300
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold" and alarm["Threshold"] == 1
    assert alarm["TreatMissingData"] == "notBreaching" and alarm["AlarmActions"] == [{"Ref": topic}]
    assert "route failover" in str(alarm["AlarmDescription"])
    # EC2 mode without transparent: only the Elastic IP claim function's errors alarm.
    assert [name for name in _lambda_error_alarms(ec2) if "EipClaim" in name] == list(_lambda_error_alarms(ec2))


def test_ipv6_on_has_no_bypass_alarm(transparent_ipv6: Synth) -> None:
    assert _bypass_alarms(transparent_ipv6) == []


def test_ipv6_client_range_is_a_validated_parameter(transparent_ipv6: Synth) -> None:
    parameter = transparent_ipv6.data["Parameters"]["ClientIpv6Cidr"]
    assert parameter["Type"] == "String" and "Default" not in parameter  # no range is a safe guess
    pattern = re.compile(parameter["AllowedPattern"])
    assert parameter["AllowedPattern"] == CLIENT_IPV6_CIDR_PATTERN
    for good in ("2600:1f18:aaaa:bb00::/56", "2001:db8::/32", "2001:db8:0:1::/64", "2001:db8::1/128"):
        assert pattern.match(good), good
    for bad in ("::/0", "2001:db8::/31", "2001:db8::/129", "10.0.0.0/16", "2001:db8::", "2001:db8::/56 ",
                "fd00::/8", "2001:db8::/56,::/0"):
        assert not pattern.match(bad), bad
    assert "::/0" in transparent_ipv6.data["Parameters"]["TransparentRouteTableIds"]["Description"]


def test_ipv6_clients_reach_the_instances_on_every_port(transparent_ipv6: Synth) -> None:
    ingress = _security_group_rules(transparent_ipv6, "Ingress")
    assert [r for r in ingress if r.get("IpProtocol") == "-1" and r.get("CidrIpv6") == {"Ref": "ClientIpv6Cidr"}]
    assert [r for r in ingress if r.get("IpProtocol") == "-1" and r.get("CidrIp") == {"Ref": "ClientCidr"}]
    # Nothing from the whole IPv6 internet.
    assert not [r for r in ingress if r.get("CidrIpv6") == "::/0"]


def test_ipv6_the_instances_connect_out_over_ipv6_on_the_proxy_ports_only(transparent_ipv6: Synth) -> None:
    egress = [r for r in _security_group_rules(transparent_ipv6, "Egress") if "CidrIpv6" in r]
    assert sorted((r["CidrIpv6"], r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in egress) == [
        ("::/0", "tcp", 80, 80), ("::/0", "tcp", 443, 443)]


def test_ipv6_the_instances_get_an_ipv6_address(transparent_ipv6: Synth) -> None:
    transparent_ipv6.template.has_resource_properties("AWS::EC2::LaunchTemplate", {"LaunchTemplateData": {
        "NetworkInterfaces": [Match.object_like({"DeviceIndex": 0, "AssociatePublicIpAddress": False,
                                                 "Ipv6AddressCount": 1})]}})


def test_ipv6_the_proxy_admits_both_client_ranges(transparent_ipv6: Synth) -> None:
    assert _environment(transparent_ipv6)["EGRESS_CLIENT_CIDRS"] == {
        "Fn::Join": [",", [{"Ref": "ClientCidr"}, {"Ref": "ClientIpv6Cidr"}]]}


def test_ipv6_the_route_failover_moves_ipv6_too(transparent_ipv6: Synth) -> None:
    assert _route_failover_environment(transparent_ipv6)["ROUTE_IPV6"] == "on"


def test_ipv6_the_boot_unit_intercepts_the_ipv6_range_and_forwards_ipv6(transparent_ipv6: Synth) -> None:
    (template,) = transparent_ipv6.template.find_resources("AWS::EC2::LaunchTemplate").values()
    text = json.dumps(template)
    assert "elements = { ${ClientIpv6Cidr} }" in text and "elements = { ${ClientCidr} }" in text
    assert "2001:db8:ffff:ff00::/56" not in text and "198.18.255.0/24" not in text  # the sentinels were replaced
    # The Fn::Sub gets both parameters.
    subs = [part["Fn::Sub"] for part in template["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"][
        "Fn::Join"][1] if isinstance(part, dict) and "Fn::Sub" in part]
    assert [sub[1] for sub in subs] == [{name: {"Ref": name} for name in ("ClientCidr", "ClientIpv6Cidr")}]
    for line in forwarding_commands(ipv6=True):
        assert json.dumps(line)[1:-1] in text, line
    # Forwarding before the ruleset, in the unit that powers the instance off when it fails.
    assert text.index("net.ipv6.conf.all.forwarding=1") < text.index("ExecStart=/usr/sbin/nft -f")


@pytest.mark.parametrize("ipv6", [False, True])
def test_the_rendered_ruleset_is_valid_nftables(ipv6: bool, tmp_path: Path) -> None:
    """What the boot unit applies, with the parameters filled in, checked by nft itself (in a namespace of its
    own, -c: nothing is applied)."""
    rules = nft_ruleset(ipv6=ipv6).replace("${ClientCidr}", "10.0.0.0/16")
    rules = rules.replace("${ClientIpv6Cidr}", "2600:1f18:aaaa:bb00::/56")
    assert "${" not in rules and ("2600:1f18:aaaa:bb00::/56" in rules) is ipv6
    (tmp_path / "rules.nft").write_text(rules)
    result = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(tmp_path / "rules.nft")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


FORWARDING_CHECK = textwrap.dedent("""\
    set -eu
    ip link add kernel-ra type veth peer name networkd-ra
    echo 1 > /proc/sys/net/ipv6/conf/kernel-ra/accept_ra
    echo 0 > /proc/sys/net/ipv6/conf/networkd-ra/accept_ra
    ( {commands} ) > /dev/null
    echo "$(cat /proc/sys/net/ipv4/ip_forward) $(cat /proc/sys/net/ipv6/conf/all/forwarding)" \
         "$(cat /proc/sys/net/ipv6/conf/kernel-ra/accept_ra) $(cat /proc/sys/net/ipv6/conf/networkd-ra/accept_ra)"
""")


def test_the_forwarding_commands_keep_router_advertisements(tmp_path: Path) -> None:
    """The unit's ExecStartPre lines run for real (as systemd would: $$ is $) in a network namespace of their own:
    forwarding on for both families, and an interface where the kernel takes router advertisements (EC2's IPv6
    default route) keeps taking them (2), one where systemd-networkd does (0) is left alone."""
    commands = []
    for line in forwarding_commands(ipv6=True):
        argv = shlex.split(line.removeprefix("ExecStartPre=").replace("$$", "$"))
        commands.append(shlex.join(argv))
    result = subprocess.run(["unshare", "--net", "sh", "-c", FORWARDING_CHECK.format(commands=" && ".join(commands))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1", "2", "0"]


# --- a policy's extra ports through the security group (-c transparentExtraPorts) ----------------------------------


def _egress_ports(synth: Synth, family: str) -> list[tuple[str, object, object]]:
    """(protocol, from, to) of the proxies' egress rules to the whole internet of ``family`` (CidrIp/CidrIpv6)."""
    anywhere = {"CidrIp": "0.0.0.0/0", "CidrIpv6": "::/0"}[family]
    return sorted((str(r["IpProtocol"]), r["FromPort"], r["ToPort"]) for r in _security_group_rules(synth, "Egress")
                  if r.get(family) == anywhere)


def test_extra_ports_are_closed_by_default(transparent: Synth, transparent_ipv6: Synth) -> None:
    """Without the context value the instances let out only what Squid forwards: a policy's extra port is
    forwarded by the host and dropped by the security group."""
    assert _egress_ports(transparent, "CidrIp") == [("tcp", 80, 80), ("tcp", 443, 443)]
    assert _egress_ports(transparent_ipv6, "CidrIpv6") == [("tcp", 80, 80), ("tcp", 443, 443)]


def test_extra_ports_open_the_security_group_over_ipv4(transparent_extra_ports: Synth) -> None:
    assert _egress_ports(transparent_extra_ports, "CidrIp") == [
        ("tcp", 22, 22), ("tcp", 80, 80), ("tcp", 443, 443), ("tcp", 5432, 5433), ("tcp", 7999, 7999)]
    assert not [r for r in _security_group_rules(transparent_extra_ports, "Egress") if "CidrIpv6" in r]


def test_changing_the_extra_ports_replaces_no_instance(transparent: Synth, transparent_extra_ports: Synth) -> None:
    """Only the security group changes (rules update in place): the launch template is the same, so a stack update
    that adds a port starts no instance refresh and cuts no connection."""
    assert transparent.template.find_resources("AWS::EC2::LaunchTemplate") == (
        transparent_extra_ports.template.find_resources("AWS::EC2::LaunchTemplate"))
    (group,) = [name for name, resource in transparent_extra_ports.resources("AWS::EC2::SecurityGroup").items()
                if any(rule.get("FromPort") == 7999 for rule in resource["Properties"].get("SecurityGroupEgress", []))]
    assert group in transparent.resources("AWS::EC2::SecurityGroup")  # the same group, with more inline rules


def test_extra_ports_open_the_security_group_over_ipv6_with_the_ipv6_switch(
        transparent_ipv6_extra_ports: Synth) -> None:
    expected = [("tcp", 22, 22), ("tcp", 80, 80), ("tcp", 443, 443), ("tcp", 5432, 5433), ("tcp", 7999, 7999)]
    assert _egress_ports(transparent_ipv6_extra_ports, "CidrIp") == expected
    assert _egress_ports(transparent_ipv6_extra_ports, "CidrIpv6") == expected
    # Inbound is unchanged: only the client ranges, on every port (the host rules decide).
    ingress = _security_group_rules(transparent_ipv6_extra_ports, "Ingress")
    assert not [r for r in ingress if r.get("CidrIp") == "0.0.0.0/0" or r.get("CidrIpv6") == "::/0"]


def test_extra_ports_are_parsed_in_order() -> None:
    config = InfraConfig.from_context({"capacity": "ec2", "transparent": "on",
                                       "transparentExtraPorts": " 7999, 22,5432-5433 "})
    assert config.transparent_extra_ports == ((7999, 7999), (22, 22), (5432, 5433))
    # cdk.json may hold a number or a list.
    for typed in (22, [22, "7999"]):
        config = InfraConfig.from_context({"capacity": "ec2", "transparent": "on", "transparentExtraPorts": typed})
        assert config.transparent_extra_ports[0] == (22, 22)
    assert InfraConfig.from_context({"capacity": "ec2", "transparent": "on"}).transparent_extra_ports == ()


@pytest.mark.parametrize(("value", "message"), [
    ("ssh", "transparentExtraPorts='ssh': 'ssh' is not a TCP port; use ports from 1 to 65535 or ranges such as "
            "5432-5433, comma-separated (e.g. -c transparentExtraPorts=22,7999,5432-5433)"),
    ("22,0", "'0' is not a TCP port"),
    ("65536", "'65536' is not a TCP port"),
    ("5433-5432", "'5433-5432' is not a TCP port"),
    ("22,,7999", "'' is not a TCP port"),
    ("-22", "'-22' is not a TCP port"),
    ("22,443", "transparentExtraPorts='22,443': 443 includes tcp/443, which the instances always let out for the "
               "proxy (and a policy's extra ports cannot include 80 or 443); leave it out"),
    ("22,1-1024", "1-1024 includes tcp/80, which the instances always let out for the proxy (and a policy's extra "
                  "ports cannot include 80 or 443); leave it out or split the range around it"),
    ("22,7999,22", "transparentExtraPorts='22,7999,22': 22 is listed twice; list each port or range once"),
    (",".join(str(port) for port in range(1000, 1021)), "21 entries, at most 20 (each is a security group rule"),
])
def test_bad_extra_ports_are_refused_with_the_value_and_a_fix(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        InfraConfig.from_context({"capacity": "ec2", "transparent": "on", "transparentExtraPorts": value})
    assert message in str(refused.value)


def test_extra_ports_need_transparent_mode() -> None:
    with pytest.raises(ConfigError, match="transparentExtraPorts needs transparent=on"):
        InfraConfig.from_context({"capacity": "ec2", "transparentExtraPorts": "22"})


def test_the_ports_the_proxy_always_lets_out_are_the_tasks() -> None:
    assert sorted(PROXY_EGRESS_PORTS) == sorted({*ALLOWED_HTTP_PORTS, *ALLOWED_CONNECT_PORTS})
