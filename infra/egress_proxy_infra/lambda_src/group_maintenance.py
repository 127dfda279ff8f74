"""Custom resource for the proxy group. Update with a new launch template version (AMI, instance type):
start an instance refresh that replaces every instance, protected ones too, one at a time (terminate first,
so no spare address is needed). Delete (after the ECS service, before the group): lift the scale-in
protection ECS put on the instances, so deleting the group cannot hang. Every request is answered SUCCESS,
the reason saying what failed: FAILED leaves DELETE_FAILED, or fails an update's own rollback.
"""
import json
import urllib.request
from typing import Any

import boto3

REFRESH_PREFERENCES = {"MinHealthyPercentage": 50, "MaxHealthyPercentage": 100, "InstanceWarmup": 300,
                       "ScaleInProtectedInstances": "Refresh", "StandbyInstances": "Terminate"}
NOT_REFRESHED = "egress-proxy: instance refresh not started"


def release(autoscaling: Any, group: str) -> list[str]:
    """Unprotect every protected instance of `group`; returns their IDs."""
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
    protected = [i["InstanceId"] for g in groups for i in g["Instances"] if i.get("ProtectedFromScaleIn")]
    for start in range(0, len(protected), 50):  # the API takes at most 50 instances per call
        autoscaling.set_instance_protection(AutoScalingGroupName=group, InstanceIds=protected[start:start + 50],
                                            ProtectedFromScaleIn=False)
    return protected


def respond(event: dict[str, Any], status: str, reason: str) -> None:
    """The custom resource response: a PUT of this JSON to the pre-signed ResponseURL."""
    body = json.dumps({
        "Status": status, "Reason": reason[:1000],
        "PhysicalResourceId": event.get("PhysicalResourceId") or event["LogicalResourceId"],
        "StackId": event["StackId"], "RequestId": event["RequestId"],
        "LogicalResourceId": event["LogicalResourceId"],
    }).encode()
    request = urllib.request.Request(event["ResponseURL"], data=body, method="PUT",
                                     headers={"Content-Type": ""})
    with urllib.request.urlopen(request, timeout=30):
        pass


def on_event(autoscaling: Any, event: dict[str, Any]) -> str:
    kind, props = event["RequestType"], event["ResourceProperties"]
    group = props["AutoScalingGroupName"]
    if kind == "Delete":
        try:
            released = release(autoscaling, group)
        except Exception as error:  # noqa: BLE001 - best effort: the group's own deletion may still succeed
            return (f"could not lift scale-in protection in {group} ({error}); if deleting the group waits, run "
                    f"aws autoscaling set-instance-protection --auto-scaling-group-name {group} "
                    "--no-protected-from-scale-in --instance-ids ...")
        return f"lifted scale-in protection from {len(released)} instance(s) of {group}"
    old = event.get("OldResourceProperties", {}).get("LaunchTemplateVersion")
    if kind != "Update" or old == props.get("LaunchTemplateVersion"):
        return "no new launch template version: nothing to do"
    try:
        started = autoscaling.start_instance_refresh(AutoScalingGroupName=group, Strategy="Rolling",
                                                     Preferences=REFRESH_PREFERENCES)
    except Exception as error:  # noqa: BLE001 - reported, and counted by an alarm, never a failed update
        return f"{NOT_REFRESHED} in {group} ({error}); start it by hand (see the deploy guide)"
    return f"instance refresh {started['InstanceRefreshId']} of {group}: launch template version {old} -> " + str(
        props.get("LaunchTemplateVersion"))


def handler(event: dict[str, Any], context: Any) -> None:
    try:
        reason = on_event(boto3.client("autoscaling"), event)
    except Exception as error:  # noqa: BLE001 - CloudFormation must hear back, or it waits an hour
        reason = f"unexpected error: {error!r}"
    print(f"egress-proxy: {event.get('RequestType')}: {reason}")
    respond(event, "SUCCESS", reason)
