"""The two EC2-mode Lambda handlers (lambda_src/), run for real against moto_server on loopback.

Elastic IP claim: several instances launching at once race for fewer addresses than instances; each address
must end up with exactly one instance, nothing is stolen, the losers' launches are abandoned, and another
stack's pool is never touched. Group maintenance: on Delete, every protected instance of the group is
unprotected (in batches of 50); on an Update with a new launch template version, an instance refresh starts;
CloudFormation gets a SUCCESS response every time, with a reason saying what failed.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aws_emulator import autoscaling_recorder, client, response_recorder, serve_moto
from egress_proxy_infra.lambda_src import claim_eip, group_maintenance
from infra_synth import Synth

POOL_TAG = "egress-proxy:eip-pool"
POOL = "proxy-stack"
HOOK = f"{POOL}-claim-eip"
GROUP = "proxy-stack-ProxiesInstancesASG-1"


@pytest.fixture()
def moto() -> Iterator[str]:
    with serve_moto() as url:
        yield url


def _ami(ec2: Any) -> str:
    return str(ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"])


def _instances(ec2: Any, count: int) -> list[str]:
    reservation = ec2.run_instances(ImageId=_ami(ec2), MinCount=count, MaxCount=count, InstanceType="t3.small")
    return [i["InstanceId"] for i in reservation["Instances"]]


def _pool(ec2: Any, size: int, pool: str = POOL) -> list[str]:
    allocations = []
    for _ in range(size):
        allocation = ec2.allocate_address(Domain="vpc", TagSpecifications=[{
            "ResourceType": "elastic-ip", "Tags": [{"Key": POOL_TAG, "Value": pool}]}])["AllocationId"]
        allocations.append(allocation)
    return allocations


def _holders(ec2: Any) -> dict[str, str | None]:
    return {a["AllocationId"]: a.get("InstanceId") or None for a in ec2.describe_addresses()["Addresses"]}


def _token(instance: str) -> str:
    """A lifecycle action token (a UUID) per instance."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, instance))


def _detail(instance: str) -> dict[str, str]:
    return {"LifecycleHookName": HOOK, "AutoScalingGroupName": GROUP, "LifecycleActionToken": _token(instance),
            "EC2InstanceId": instance, "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING"}


def _race(moto: str, recorder_url: str, instances: list[str], *, attempts: int) -> dict[str, str | None]:
    """Every instance's claim at once (a barrier releases them together); returns instance -> allocation."""
    barrier = threading.Barrier(len(instances))
    results: dict[str, str | None] = {}
    errors: list[BaseException] = []

    def launch(instance: str) -> None:
        ec2, autoscaling = client("ec2", moto), client("autoscaling", recorder_url)
        barrier.wait()
        try:
            # Identity order: every instance goes for the same first free address, so they collide on purpose.
            results[instance] = claim_eip.on_launch(ec2, autoscaling, _detail(instance), POOL_TAG, POOL,
                                                    attempts=attempts, pause=lambda: None, order=lambda _: None)
        except BaseException as error:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(error)

    threads = [threading.Thread(target=launch, args=(i,)) for i in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_five_launches_race_for_four_addresses_and_each_address_goes_to_one_instance(moto: str) -> None:
    ec2 = client("ec2", moto)
    instances = _instances(ec2, 5)
    pool = _pool(ec2, 4)
    (foreign,) = _pool(ec2, 1, pool="another-stack")
    with autoscaling_recorder() as recorder:
        results = _race(moto, recorder.url, instances, attempts=3)
    holders = _holders(ec2)
    # Every pool address is held, each by a different instance, and it is the one that instance was told.
    assert sorted(a for a in holders if a != foreign) == sorted(pool)
    winners = {a: i for a, i in holders.items() if a in pool}
    assert len(set(winners.values())) == 4
    assert {i: a for a, i in winners.items()} == {i: a for i, a in results.items() if a is not None}
    assert holders[foreign] is None  # another stack's pool is never touched
    # One lifecycle action per launch: four CONTINUE, and the loser's launch ABANDONed.
    verdicts = {c["InstanceId"]: c["LifecycleActionResult"] for c in recorder.calls}
    assert sorted(verdicts) == sorted(instances)
    (loser,) = [i for i, a in results.items() if a is None]
    assert verdicts.pop(loser) == "ABANDON" and set(verdicts.values()) == {"CONTINUE"}
    assert all(c["LifecycleHookName"] == HOOK and c["AutoScalingGroupName"] == GROUP
               and c["LifecycleActionToken"] == _token(c["InstanceId"]) for c in recorder.calls)


def test_twelve_launches_race_for_twelve_addresses_and_all_win(moto: str) -> None:
    ec2 = client("ec2", moto)
    instances = _instances(ec2, 12)
    pool = _pool(ec2, 12)
    with autoscaling_recorder() as recorder:
        # Enough attempts for the worst case: each round at least one of the colliding instances wins.
        results = _race(moto, recorder.url, instances, attempts=len(instances) + 1)
    assert None not in results.values()
    assert sorted(str(a) for a in results.values()) == sorted(pool)
    assert {c["LifecycleActionResult"] for c in recorder.calls} == {"CONTINUE"}


def test_a_retried_event_keeps_the_address_the_instance_already_holds(moto: str) -> None:
    ec2 = client("ec2", moto)
    (instance,) = _instances(ec2, 1)
    first, _second = _pool(ec2, 2)
    ec2.associate_address(AllocationId=first, InstanceId=instance, AllowReassociation=False)
    with autoscaling_recorder() as recorder:
        allocation = claim_eip.on_launch(ec2, client("autoscaling", recorder.url), _detail(instance), POOL_TAG,
                                         POOL, pause=lambda: None)
    assert allocation == first
    assert _holders(ec2)[first] == instance and list(_holders(ec2).values()).count(instance) == 1
    assert [c["LifecycleActionResult"] for c in recorder.calls] == ["CONTINUE"]


def test_handler_reads_the_environment_the_template_sets(moto: str, ec2: Synth,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (function,) = [f for k, f in ec2.resources("AWS::Lambda::Function").items() if "EipClaim" in k]
    env = function["Properties"]["Environment"]["Variables"]
    assert env == {"POOL_TAG_KEY": POOL_TAG, "POOL_TAG_VALUE": {"Ref": "AWS::StackName"}}
    ec2_client = client("ec2", moto)
    (instance,) = _instances(ec2_client, 1)
    (allocation,) = _pool(ec2_client, 1)
    with autoscaling_recorder() as recorder:
        for key, value in {"AWS_ENDPOINT_URL": moto, "AWS_ENDPOINT_URL_AUTO_SCALING": recorder.url,
                           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "POOL_TAG_KEY": POOL_TAG,
                           "POOL_TAG_VALUE": POOL}.items():
            monkeypatch.setenv(key, value)
        # The event EventBridge delivers for the hook (Amazon EC2 Auto Scaling User Guide, "Auto Scaling
        # events reference": EC2 Instance-launch Lifecycle Action).
        claim_eip.handler({"source": "aws.autoscaling", "detail-type": "EC2 Instance-launch Lifecycle Action",
                           "detail": _detail(instance)}, None)
    assert _holders(ec2_client)[allocation] == instance
    assert [c["LifecycleActionResult"] for c in recorder.calls] == ["CONTINUE"]
    assert f"egresses from Elastic IP allocation {allocation}" in capsys.readouterr().out


def test_an_exhausted_pool_logs_the_line_the_alarm_counts(moto: str, capsys: pytest.CaptureFixture[str]) -> None:
    from egress_proxy_infra.ec2_lifecycle import POOL_EXHAUSTED_MARKER
    ec2 = client("ec2", moto)
    holder, latecomer = _instances(ec2, 2)
    (allocation,) = _pool(ec2, 1)
    ec2.associate_address(AllocationId=allocation, InstanceId=holder, AllowReassociation=False)
    with autoscaling_recorder() as recorder:
        result = claim_eip.on_launch(ec2, client("autoscaling", recorder.url), _detail(latecomer), POOL_TAG, POOL,
                                     attempts=2, pause=lambda: None)
    assert result is None and _holders(ec2)[allocation] == holder
    assert [c["LifecycleActionResult"] for c in recorder.calls] == ["ABANDON"]
    assert POOL_EXHAUSTED_MARKER in capsys.readouterr().out


# --- group maintenance (the custom resource: protection release, instance refresh) --------------------------

def _protected_group(moto: str, size: int) -> Any:
    autoscaling, ec2 = client("autoscaling", moto), client("ec2", moto)
    ec2.create_launch_template(LaunchTemplateName="proxy", LaunchTemplateData={
        "ImageId": _ami(ec2), "InstanceType": "t3.small"})
    subnet = ec2.describe_subnets()["Subnets"][0]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=GROUP, MinSize=0, MaxSize=size, DesiredCapacity=size,
        LaunchTemplate={"LaunchTemplateName": "proxy", "Version": "$Latest"},
        VPCZoneIdentifier=subnet["SubnetId"], NewInstancesProtectedFromScaleIn=True)
    return autoscaling


def _protection(autoscaling: Any) -> list[bool]:
    (group,) = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"]
    return [i["ProtectedFromScaleIn"] for i in group["Instances"]]


def _cfn_event(request_type: str, response_url: str, *, version: str = "1",
               old_version: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "RequestType": request_type, "ResponseURL": f"{response_url}/presigned?sig=1",
        "StackId": "arn:aws:cloudformation:eu-west-1:123456789012:stack/proxy-stack/1",
        "RequestId": "request-1", "LogicalResourceId": "ProxiesGroupMaintenance",
        "PhysicalResourceId": "ProxiesGroupMaintenance", "ResourceType": "Custom::ProxyGroupMaintenance",
        "ResourceProperties": {"AutoScalingGroupName": GROUP, "LaunchTemplateVersion": version}}
    if old_version is not None:
        event["OldResourceProperties"] = {"AutoScalingGroupName": GROUP, "LaunchTemplateVersion": old_version}
    return event


def _aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "eu-west-1",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)


def test_delete_unprotects_every_instance_in_batches_of_50(moto: str) -> None:
    autoscaling = _protected_group(moto, 55)
    assert _protection(autoscaling) == [True] * 55
    reason = group_maintenance.on_event(autoscaling, _cfn_event("Delete", "http://unused"))
    assert "55 instance(s)" in reason
    assert _protection(autoscaling) == [False] * 55


def test_create_and_an_update_without_a_new_launch_template_change_nothing(moto: str) -> None:
    autoscaling = _protected_group(moto, 2)
    group_maintenance.on_event(autoscaling, _cfn_event("Create", "http://unused"))
    reason = group_maintenance.on_event(autoscaling, _cfn_event("Update", "http://unused", version="3",
                                                                old_version="3"))
    assert "nothing to do" in reason
    assert _protection(autoscaling) == [True, True]


def test_a_new_launch_template_version_starts_a_refresh_of_every_instance() -> None:
    """moto lacks StartInstanceRefresh: the Auto Scaling stand-in records the call (aws_emulator.py)."""
    with autoscaling_recorder() as recorder:
        reason = group_maintenance.on_event(client("autoscaling", recorder.url),
                                            _cfn_event("Update", "http://unused", version="4", old_version="3"))
    assert reason == f"instance refresh refresh-1 of {GROUP}: launch template version 3 -> 4"
    (call,) = recorder.calls
    preferences = {key.removeprefix("Preferences."): value for key, value in call.items()
                   if key.startswith("Preferences.")}
    assert call["AutoScalingGroupName"] == GROUP and call["Strategy"] == "Rolling"
    # Protected instances (every one running a task) are replaced too, one at a time, terminate-then-launch.
    assert preferences == {"MinHealthyPercentage": "50", "MaxHealthyPercentage": "100", "InstanceWarmup": "300",
                           "ScaleInProtectedInstances": "Refresh", "StandbyInstances": "Terminate"}


def test_a_refresh_that_cannot_start_is_reported_not_failed(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A FAILED update would roll back, and the rollback's own Update would fail the same way."""
    from egress_proxy_infra.ec2_lifecycle import REFRESH_NOT_STARTED_MARKER
    with autoscaling_recorder(refresh_in_progress=True) as recorder, response_recorder() as responses:
        _aws_env(monkeypatch, recorder.url)
        group_maintenance.handler(_cfn_event("Update", responses.url, version="5", old_version="4"), None)
    (call,) = responses.calls
    assert call["body"]["Status"] == "SUCCESS"
    reason = call["body"]["Reason"]
    assert REFRESH_NOT_STARTED_MARKER in reason and "InstanceRefreshInProgress" in reason
    # The line the InstanceRefreshNotStarted alarm's metric filter counts.
    assert REFRESH_NOT_STARTED_MARKER in capsys.readouterr().out


def test_handler_answers_cloudformation(moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    autoscaling = _protected_group(moto, 2)
    _aws_env(monkeypatch, moto)
    with response_recorder() as responses:
        group_maintenance.handler(_cfn_event("Delete", responses.url), None)
    (call,) = responses.calls
    assert call["path"] == "/presigned?sig=1" and call["content_type"] == ""
    body = call["body"]
    assert body["Status"] == "SUCCESS" and "2 instance(s)" in body["Reason"]
    assert {k: body[k] for k in ("StackId", "RequestId", "LogicalResourceId", "PhysicalResourceId")} == {
        "StackId": "arn:aws:cloudformation:eu-west-1:123456789012:stack/proxy-stack/1", "RequestId": "request-1",
        "LogicalResourceId": "ProxiesGroupMaintenance", "PhysicalResourceId": "ProxiesGroupMaintenance"}
    assert _protection(autoscaling) == [False, False]


def test_an_unreachable_api_still_lets_the_delete_go_on_and_says_how_to_finish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Best effort: DELETE_FAILED would strand the stack, while the group's own deletion may well succeed."""
    # Nothing listens on port 9 of loopback: the call fails at once.
    _aws_env(monkeypatch, "http://127.0.0.1:9")
    with response_recorder() as responses:
        group_maintenance.handler(_cfn_event("Delete", responses.url), None)
    (call,) = responses.calls
    assert call["body"]["Status"] == "SUCCESS"
    reason = call["body"]["Reason"]
    assert f"could not lift scale-in protection in {GROUP}" in reason
    assert "aws autoscaling set-instance-protection" in reason and "--no-protected-from-scale-in" in reason


def test_a_malformed_request_is_still_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception before the response would leave CloudFormation waiting an hour."""
    _aws_env(monkeypatch, "http://127.0.0.1:9")
    event = _cfn_event("Delete", "http://unused")
    with response_recorder() as responses:
        event["ResponseURL"] = f"{responses.url}/presigned?sig=1"
        del event["ResourceProperties"]
        group_maintenance.handler(event, None)
    (call,) = responses.calls
    assert call["body"]["Status"] == "SUCCESS" and "unexpected error" in call["body"]["Reason"]


def test_handlers_fit_inline_and_are_shipped_verbatim(ec2: Synth) -> None:
    from egress_proxy_infra.ec2_lifecycle import INLINE_CODE_LIMIT, inline_source
    functions = ec2.resources("AWS::Lambda::Function")
    for module, name_part in (("claim_eip", "EipClaim"), ("group_maintenance", "GroupMaintenance")):
        (function,) = [f for k, f in functions.items() if name_part in k]
        source = inline_source(module)
        assert function["Properties"]["Code"]["ZipFile"] == source
        assert len(source) <= INLINE_CODE_LIMIT
        assert function["Properties"]["Handler"] == "index.handler"
        assert function["Properties"]["Runtime"].startswith("python3.")
    # Neither handler needs anything the Lambda runtime lacks.
    for module in ("claim_eip", "group_maintenance"):
        imports = {line.split()[1].split(".")[0] for line in inline_source(module).splitlines()
                   if line.startswith(("import ", "from "))}
        runtime = {"os", "random", "time", "typing", "collections", "json", "urllib", "boto3", "botocore"}
        assert imports <= runtime, imports
