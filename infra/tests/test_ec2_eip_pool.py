"""EC2 mode: the Elastic IP pool, who may associate it, the launch template, the group's lifecycle hook, and
the instance's boot script (run for real in bash against a fake instance-metadata service).

The claim itself (several launches racing for fewer addresses) is run against moto_server in
test_lambda_handlers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from infra_synth import Synth

POOL_TAG = "egress-proxy:eip-pool"
STACK_NAME = "proxy-stack"
POOL_IPS = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"]
TAG_CONDITION = {"StringEquals": {f"aws:ResourceTag/{POOL_TAG}": {"Ref": "AWS::StackName"}}}


def test_eips_carry_the_pool_tag(ec2: Synth) -> None:
    for eip in ec2.resources("AWS::EC2::EIP").values():
        assert eip["Properties"]["Domain"] == "vpc"
        assert {"Key": POOL_TAG, "Value": {"Ref": "AWS::StackName"}} in eip["Properties"]["Tags"]


def _statements(synth: Synth, name_part: str) -> list[dict[str, Any]]:
    (policy,) = [p for k, p in synth.resources("AWS::IAM::Policy").items() if name_part in k]
    return list(policy["Properties"]["PolicyDocument"]["Statement"])


def test_only_the_claim_function_may_associate_and_only_pool_addresses(ec2: Synth) -> None:
    statements = _statements(ec2, "EipClaimFunctionRole")
    (associate,) = [s for s in statements if s["Action"] == "ec2:AssociateAddress"]
    assert associate["Condition"] == TAG_CONDITION
    kinds = sorted(json.dumps(r).split(":")[-1].rstrip('"]}') for r in associate["Resource"])
    assert kinds == ["elastic-ip/*", "instance/*", "network-interface/*"]
    (describe,) = [s for s in statements if s["Action"] == "ec2:DescribeAddresses"]
    assert describe["Resource"] == "*"
    (complete,) = [s for s in statements if s["Action"] == "autoscaling:CompleteLifecycleAction"]
    assert complete["Condition"] == TAG_CONDITION
    assert "autoScalingGroup:*:autoScalingGroupName/*" in json.dumps(complete["Resource"])
    every_action = json.dumps([s["Action"] for s in statements])
    for forbidden in ("DisassociateAddress", "ReleaseAddress", "AllocateAddress", "ec2:*", "autoscaling:*"):
        assert forbidden not in every_action
    # Least privilege at run time: neither the instances nor the tasks get any EC2 permission.
    for holder in ("InstanceRole", "TaskRole"):
        assert "ec2:" not in json.dumps(_statements(ec2, holder)), holder


def test_the_maintenance_function_may_only_unprotect_and_refresh_the_pool_group(ec2: Synth) -> None:
    statements = _statements(ec2, "GroupMaintenanceFunctionRole")
    actions = sorted(a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
    assert [a for a in actions if not a.startswith("logs:")] == [
        "autoscaling:DescribeAutoScalingGroups", "autoscaling:SetInstanceProtection",
        "autoscaling:StartInstanceRefresh"]
    for action in ("autoscaling:SetInstanceProtection", "autoscaling:StartInstanceRefresh"):
        (statement,) = [s for s in statements if s["Action"] == action]
        assert statement["Condition"] == TAG_CONDITION
    _, asg = ec2.only("AWS::AutoScaling::AutoScalingGroup")
    # The group carries the tag the conditions test, not propagated to instances (they get it from the template).
    tag = {"Key": POOL_TAG, "Value": {"Ref": "AWS::StackName"}, "PropagateAtLaunch": False}
    assert tag in asg["Properties"]["Tags"]


def test_functions_log_only_to_their_own_log_groups(ec2: Synth) -> None:
    for name_part in ("EipClaimFunctionRole", "GroupMaintenanceFunctionRole"):
        (statement,) = [s for s in _statements(ec2, name_part) if "logs:PutLogEvents" in json.dumps(s)]
        log_group, attribute = statement["Resource"]["Fn::GetAtt"]
        assert ec2.data["Resources"][log_group]["Type"] == "AWS::Logs::LogGroup" and attribute == "Arn"
        assert name_part.replace("Role", "Logs") in log_group
    for role in [k for k in ec2.resources("AWS::IAM::Role") if "Function" in k]:
        assert "ManagedPolicyArns" not in ec2.data["Resources"][role]["Properties"]


def test_launch_template(ec2: Synth) -> None:
    _, template = ec2.only("AWS::EC2::LaunchTemplate")
    data = template["Properties"]["LaunchTemplateData"]
    assert data["ImageId"] == {"Ref": "AmiId"}
    assert data["InstanceType"] == {"Ref": "InstanceType"}
    assert data["KeyName"] == {"Fn::If": ["HasKeyName", {"Ref": "KeyName"}, {"Ref": "AWS::NoValue"}]}
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    (nic,) = data["NetworkInterfaces"]
    # No temporary public address: the pool's Elastic IP is the instance's only one.
    assert nic["AssociatePublicIpAddress"] is False
    proxy_sg = [k for k in ec2.resources("AWS::EC2::SecurityGroup") if k.startswith("Proxies")][0]
    assert nic["Groups"] == [{"Fn::GetAtt": [proxy_sg, "GroupId"]}]
    assert all(d["Ebs"]["Encrypted"] for d in data["BlockDeviceMappings"])
    tagged = {spec["ResourceType"] for spec in data["TagSpecifications"]
              if {"Key": POOL_TAG, "Value": {"Ref": "AWS::StackName"}} in spec["Tags"]}
    assert tagged == {"instance", "network-interface"}
    # The boot script's `shutdown` (no pool address, or no IMDS block) terminates: a stopped instance would keep
    # its Elastic IP and its place in the group.
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    # T3/T4g: no surplus vCPU-hours billed; other instance types ignore it.
    assert data["CreditSpecification"] == {"CpuCredits": "standard"}


def test_instance_role_has_the_ecs_agent_and_session_manager_only(ec2: Synth) -> None:
    """With an execution role, awslogs and image pulls never use the instance's credentials."""
    actions = sorted(a for s in _statements(ec2, "InstanceRole")
                     for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
    assert actions == ["ecs:DeregisterContainerInstance", "ecs:DiscoverPollEndpoint", "ecs:Poll",
                       "ecs:RegisterContainerInstance", "ecs:StartTelemetrySession", "ecs:Submit*"]
    (role,) = [r for k, r in ec2.resources("AWS::IAM::Role").items() if "InstanceRole" in k]
    assert json.dumps(role["Properties"]["ManagedPolicyArns"]).count("arn:") == 1
    assert "AmazonSSMManagedInstanceCore" in json.dumps(role["Properties"]["ManagedPolicyArns"])


def test_elastic_ips_outlive_the_stack(ec2: Synth) -> None:
    """Partners allow-listed them: a stack deletion or replacement must not hand them back to AWS."""
    for name, address in ec2.resources("AWS::EC2::EIP").items():
        assert address["DeletionPolicy"] == "Retain" and address["UpdateReplacePolicy"] == "Retain", name


def test_auto_scaling_group_spans_the_public_subnets_and_never_outgrows_the_pool(ec2: Synth) -> None:
    _, asg = ec2.only("AWS::AutoScaling::AutoScalingGroup")
    assert asg["Properties"]["VPCZoneIdentifier"] == {"Ref": "PublicSubnetIds"}
    assert asg["Properties"]["MaxSize"] == str(len(ec2.resources("AWS::EC2::EIP")))
    assert asg["Properties"]["NewInstancesProtectedFromScaleIn"] is True


def test_launch_lifecycle_hook_is_on_the_group_and_abandons_when_unanswered(ec2: Synth) -> None:
    _, asg = ec2.only("AWS::AutoScaling::AutoScalingGroup")
    (hook,) = asg["Properties"]["LifecycleHookSpecificationList"]
    hook_name = {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "claim-eip"]]}
    assert hook == {"LifecycleHookName": hook_name, "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
                    "DefaultResult": "ABANDON", "HeartbeatTimeout": 300}
    assert not ec2.resources("AWS::AutoScaling::LifecycleHook")  # a separate hook could miss the first launches
    (rule,) = [r for k, r in ec2.resources("AWS::Events::Rule").items() if "EipClaim" in k]
    assert rule["Properties"]["EventPattern"] == {
        "source": ["aws.autoscaling"], "detail-type": ["EC2 Instance-launch Lifecycle Action"],
        "detail": {"LifecycleHookName": [hook_name]}}
    (target,) = rule["Properties"]["Targets"]
    claim_function = [k for k in ec2.resources("AWS::Lambda::Function") if "EipClaim" in k][0]
    assert target["Arn"] == {"Fn::GetAtt": [claim_function, "Arn"]}
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 2
    # The function outlasts its attempts, and the hook outlasts the function.
    _, function = next((k, f) for k, f in ec2.resources("AWS::Lambda::Function").items() if "EipClaim" in k)
    assert function["Properties"]["Timeout"] < hook["HeartbeatTimeout"]


# --- the boot script, run for real ---------------------------------------------------------------------

def render_user_data(ec2: Synth, ecs_config: Path) -> str:
    _, template = ec2.only("AWS::EC2::LaunchTemplate")
    parts = template["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    eips = sorted(ec2.resources("AWS::EC2::EIP"))
    tokens = {json.dumps({"Ref": "AWS::StackName"}): STACK_NAME}
    tokens.update({json.dumps({"Ref": eip}): ip for eip, ip in zip(eips, POOL_IPS[:len(eips)], strict=True)})

    def render(part: Any) -> str:
        if isinstance(part, str):
            return part
        if "Fn::Join" in part:
            separator, items = part["Fn::Join"]
            return str(separator).join(render(item) for item in items)
        return tokens.get(json.dumps(part), "test-cluster")

    text = "".join(render(p) for p in parts)
    return text.replace("/etc/ecs/ecs.config", str(ecs_config))


def test_user_data_waits_for_a_pool_address_before_joining_the_cluster(ec2: Synth, tmp_path: Path) -> None:
    script = render_user_data(ec2, tmp_path / "ecs.config")
    assert f'POOL_IPS=" {" ".join(POOL_IPS)} "' in script
    assert script.index("meta-data/public-ipv4") < script.index("ECS_CLUSTER=test-cluster")
    assert "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true" in script
    # Nothing to install and no AWS API to call: the minimal ECS AMI has what this needs (curl, systemd).
    for absent in ("dnf ", "yum ", "aws ec2", "associate-address"):
        assert absent not in script, absent
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


FAKE_CURL = textwrap.dedent('''\
    #!/bin/sh
    # Instance metadata: the public IPv4 address is whatever $FAKE_IMDS_DIR/public-ipv4 holds (404 when absent).
    case "$*" in
      *api/token*) echo token ;;
      *public-ipv4*) [ -s "$FAKE_IMDS_DIR/public-ipv4" ] && cat "$FAKE_IMDS_DIR/public-ipv4" || exit 22 ;;
      *) exit 22 ;;
    esac
''')


@pytest.fixture()
def boot(ec2: Synth, tmp_path: Path) -> Any:
    return boot_runner(ec2, tmp_path)


def boot_runner(ec2: Synth, tmp_path: Path) -> Any:
    """Runs the synthesized user data in bash, with fake curl (IMDS), sleep, shutdown and systemctl."""
    if shutil.which("bash") is None:
        pytest.fail("the boot-script tests need bash")
    bin_dir, imds = tmp_path / "bin", tmp_path / "imds"
    bin_dir.mkdir()
    imds.mkdir()
    fakes = {
        "curl": FAKE_CURL,
        # Each "sleep" is one poll interval gone by: on the third, the hook's function associates an address.
        "sleep": f'#!/bin/sh\necho x >> "{tmp_path}/polls"\n'
                 f'[ "$(wc -l < "{tmp_path}/polls")" -ge 3 ] && [ -n "$FAKE_ASSOCIATE" ] && '
                 f'echo "$FAKE_ASSOCIATE" > "{imds}/public-ipv4"\nexit 0\n',
        "shutdown": f'#!/bin/sh\ntouch "{tmp_path}/powered-off"\n',
        "systemctl": f'#!/bin/sh\necho "$*" >> "{tmp_path}/systemctl.log"\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    script_text = render_user_data(ec2, tmp_path / "ecs.config")
    # The unit file goes to a scratch directory instead of /etc/systemd/system.
    script_text = script_text.replace("/etc/systemd/system/", f"{tmp_path}/")
    script = tmp_path / "user-data.sh"
    script.write_text(script_text)

    def run(associate: str | None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_IMDS_DIR": str(imds),
               "FAKE_ASSOCIATE": associate or ""}
        return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)

    return run


def test_instance_joins_the_cluster_once_its_pool_address_appears(boot: Any, tmp_path: Path) -> None:
    result = boot(POOL_IPS[2])
    assert result.returncode == 0, result.stderr
    assert f"egresses from Elastic IP {POOL_IPS[2]}" in result.stdout
    assert "ECS_CLUSTER=test-cluster" in (tmp_path / "ecs.config").read_text()
    assert not (tmp_path / "powered-off").exists()
    assert "enable --now egress-proxy-imds-block.service" in (tmp_path / "systemctl.log").read_text()


def test_an_address_outside_the_pool_is_not_enough(boot: Any, tmp_path: Path) -> None:
    result = boot("203.0.113.9")  # e.g. an auto-assigned address: never proxy from it
    assert result.returncode != 0
    assert "no Elastic IP of the pool" in result.stderr and "powering off" in result.stderr
    assert (tmp_path / "powered-off").exists()
    assert not (tmp_path / "ecs.config").exists()


def test_no_address_at_all_powers_off_with_a_clear_console_line(boot: Any, tmp_path: Path) -> None:
    result = boot(None)
    assert result.returncode != 0
    assert "egress-proxy: no Elastic IP of the pool after 360 s" in result.stderr
    assert (tmp_path / "powered-off").exists() and not (tmp_path / "ecs.config").exists()


# --- existing Elastic IPs (-c eipAllocationIds) ---------------------------------------------------------------

from conftest import EXISTING_ALLOCATION_IDS as EXISTING  # noqa: E402


def test_existing_addresses_are_the_pool_and_none_is_allocated(ec2_existing_eips: Synth) -> None:
    """Addresses partners already allow-listed (or retained from an earlier stack) are used as they are."""
    assert not ec2_existing_eips.resources("AWS::EC2::EIP")
    _, asg = ec2_existing_eips.only("AWS::AutoScaling::AutoScalingGroup")
    assert asg["Properties"]["MaxSize"] == str(len(EXISTING))
    assert ec2_existing_eips.data["Parameters"]["MaxCapacity"]["MaxValue"] == len(EXISTING) - 1
    outputs = ec2_existing_eips.data["Outputs"]
    assert [outputs[f"EgressIp{i}"]["Value"] for i in range(1, 4)] == EXISTING
    assert outputs["ProxyEgressIps"]["Value"] == ",".join(EXISTING)
    # The claim function still finds, and IAM still recognises, the pool by its tag (which the operator adds).
    statements = _statements(ec2_existing_eips, "EipClaimFunctionRole")
    (associate,) = [s for s in statements if s["Action"] == "ec2:AssociateAddress"]
    assert associate["Condition"] == TAG_CONDITION


def test_with_existing_addresses_an_instance_takes_the_one_the_hook_gives_it(ec2_existing_eips: Synth,
                                                                            tmp_path: Path) -> None:
    """Their public IPs are not in the template; the instance has no other public address to mistake."""
    result = boot_runner(ec2_existing_eips, tmp_path)("198.51.100.77")
    assert result.returncode == 0, result.stderr
    assert "egresses from Elastic IP 198.51.100.77" in result.stdout
    assert "ECS_CLUSTER=test-cluster" in (tmp_path / "ecs.config").read_text()


def test_with_existing_addresses_no_address_still_powers_off(ec2_existing_eips: Synth, tmp_path: Path) -> None:
    result = boot_runner(ec2_existing_eips, tmp_path)(None)
    assert result.returncode != 0 and "no Elastic IP of the pool" in result.stderr
    assert (tmp_path / "powered-off").exists() and not (tmp_path / "ecs.config").exists()
