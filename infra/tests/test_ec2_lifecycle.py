"""EC2 mode is safe to create, update and delete: the resource order CloudFormation follows, and the AMI refresh.

CloudFormation creates a resource after everything it depends on (DependsOn, Ref, Fn::GetAtt) and deletes it
before them (AWS CloudFormation User Guide, "DependsOn attribute"). So each ordering below is checked as a
dependency edge of the synthesized template, followed transitively.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.validate import validate_parameters
from infra_synth import Synth

DEPLOY_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "deploy-aws.md"


def _direct_dependencies(resource: dict[str, Any]) -> set[str]:
    depends_on = resource.get("DependsOn", [])
    found = set([depends_on] if isinstance(depends_on, str) else depends_on)
    text = json.dumps({k: v for k, v in resource.items() if k != "DependsOn"})
    found |= set(re.findall(r'\{"Ref": "([A-Za-z0-9]+)"\}', text))
    found |= set(re.findall(r'\{"Fn::GetAtt": \["([A-Za-z0-9]+)"', text))
    return found


def depends_on(synth: Synth, dependent: str, dependency: str) -> bool:
    """Whether CloudFormation must create `dependency` before `dependent` (and delete it after)."""
    resources = synth.data["Resources"]
    seen, todo = set(), [dependent]
    while todo:
        current = todo.pop()
        for name in _direct_dependencies(resources[current]) & set(resources):
            if name == dependency:
                return True
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return False


def _one(synth: Synth, type_: str, name_part: str = "") -> str:
    (logical_id,) = [k for k in synth.resources(type_) if name_part in k]
    return logical_id


def test_service_waits_for_the_capacity_provider_association(ec2: Synth) -> None:
    service = _one(ec2, "AWS::ECS::Service")
    association = _one(ec2, "AWS::ECS::ClusterCapacityProviderAssociations")
    assert association in ec2.data["Resources"][service]["DependsOn"]
    # The association names the capacity provider, which names the group: created in that order.
    assert depends_on(ec2, association, _one(ec2, "AWS::ECS::CapacityProvider"))


def test_group_is_created_after_and_deleted_before_the_elastic_ips(ec2: Synth) -> None:
    asg = _one(ec2, "AWS::AutoScaling::AutoScalingGroup")
    eips = sorted(ec2.resources("AWS::EC2::EIP"))
    assert len(eips) == 4 and set(eips) <= set(ec2.data["Resources"][asg]["DependsOn"])


def test_group_launches_only_once_the_claim_path_exists(ec2: Synth) -> None:
    asg = _one(ec2, "AWS::AutoScaling::AutoScalingGroup")
    for type_, part in (("AWS::Lambda::Function", "EipClaim"), ("AWS::Events::Rule", "EipClaim"),
                        ("AWS::Lambda::Permission", "EipClaim"), ("AWS::IAM::Policy", "EipClaim")):
        assert depends_on(ec2, asg, _one(ec2, type_, part)), type_


def test_teardown_lifts_scale_in_protection_between_the_service_and_the_group(ec2: Synth) -> None:
    maintenance = _one(ec2, "Custom::ProxyGroupMaintenance")
    service, asg = _one(ec2, "AWS::ECS::Service"), _one(ec2, "AWS::AutoScaling::AutoScalingGroup")
    # Deleted after the service (no task is left to re-protect an instance) and before the group.
    assert depends_on(ec2, service, maintenance)
    assert depends_on(ec2, maintenance, asg)
    props = ec2.data["Resources"][maintenance]["Properties"]
    assert props["AutoScalingGroupName"] == {"Ref": asg}
    function = _one(ec2, "AWS::Lambda::Function", "GroupMaintenance")
    assert props["ServiceToken"] == {"Fn::GetAtt": [function, "Arn"]}
    # Its function and permissions still exist when the Delete call runs.
    assert depends_on(ec2, maintenance, _one(ec2, "AWS::IAM::Policy", "GroupMaintenance"))
    # Managed termination protection stays on: it is what keeps scale-in from killing busy proxies.
    _, provider = ec2.only("AWS::ECS::CapacityProvider")
    assert provider["Properties"]["AutoScalingGroupProvider"]["ManagedTerminationProtection"] == "ENABLED"


def test_a_new_launch_template_version_refreshes_the_instances_after_the_group_has_it(ec2: Synth) -> None:
    """A new AMI (or a new release behind the AmiId SSM parameter) or instance type makes a new launch template
    version; the group points at it, and then the custom resource, whose LaunchTemplateVersion property
    changed, starts the instance refresh (lambda_src/group_maintenance.py, tested in test_lambda_handlers.py)."""
    maintenance = _one(ec2, "Custom::ProxyGroupMaintenance")
    template, asg = _one(ec2, "AWS::EC2::LaunchTemplate"), _one(ec2, "AWS::AutoScaling::AutoScalingGroup")
    props = ec2.data["Resources"][maintenance]["Properties"]
    assert props["LaunchTemplateVersion"] == {"Fn::GetAtt": [template, "LatestVersionNumber"]}
    assert ec2.data["Resources"][asg]["Properties"]["LaunchTemplate"]["Version"] == {
        "Fn::GetAtt": [template, "LatestVersionNumber"]}
    assert depends_on(ec2, maintenance, asg)


def test_fargate_has_none_of_the_ec2_machinery(fargate: Synth) -> None:
    for type_ in ("Custom::ProxyGroupMaintenance", "AWS::Lambda::Function", "AWS::AutoScaling::AutoScalingGroup",
                  "AWS::EC2::EIP", "AWS::ECS::ClusterCapacityProviderAssociations"):
        assert not fargate.resources(type_), type_


# --- the AMI refresh the deploy guide gives -----------------------------------------------------------------------

def _guide_refresh_command() -> list[str]:
    text = DEPLOY_GUIDE.read_text()
    # The command and its continuation lines (ending in a backslash), nothing after it.
    match = re.search(r"aws autoscaling start-instance-refresh ((?:.*\\\n)*.*)", text)
    assert match, "docs/deploy-aws.md gives no start-instance-refresh command"
    command = match.group(1).replace("\\\n", " ")
    return command.split()


def test_guide_instance_refresh_is_valid_and_replaces_protected_instances_one_at_a_time() -> None:
    args = _guide_refresh_command()
    options = dict(zip(args[::2], args[1::2], strict=True))
    preferences = json.loads(options["--preferences"].strip("'"))
    # Valid against the AutoScaling API model that botocore ships (the CLI validates the same way).
    model = botocore.session.get_session().get_service_model("autoscaling")
    validate_parameters({"AutoScalingGroupName": "g", "Preferences": preferences, "Strategy": "Rolling"},
                        model.operation_model("StartInstanceRefresh").input_shape)
    # Instances running a task are protected from scale-in: without this, the refresh waits and fails
    # (Amazon EC2 Auto Scaling User Guide, "Instance refresh": ScaleInProtectedInstances).
    assert preferences["ScaleInProtectedInstances"] == "Refresh"
    # Terminate, then launch: never more instances than the group holds, so no extra Elastic IP is needed.
    assert preferences["MaxHealthyPercentage"] == 100
    assert 0 < preferences["MinHealthyPercentage"] < 100
    assert options["--auto-scaling-group-name"].startswith("<AutoScalingGroupName>") or \
        "AutoScalingGroupName" in options["--auto-scaling-group-name"]
    # The guide's command is the one the stack runs by itself on a new launch template version.
    from egress_proxy_infra.lambda_src.group_maintenance import REFRESH_PREFERENCES
    assert preferences == REFRESH_PREFERENCES


@pytest.mark.parametrize("variant", ["ec2"])
def test_the_group_name_the_refresh_needs_is_an_output(variant: str, request: pytest.FixtureRequest) -> None:
    synth: Synth = request.getfixturevalue(variant)
    asg = _one(synth, "AWS::AutoScaling::AutoScalingGroup")
    assert synth.data["Outputs"]["AutoScalingGroupName"]["Value"] == {"Ref": asg}
