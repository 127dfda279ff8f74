"""CloudFormation custom resource: on Delete, lift scale-in protection from every instance of the group.

With ECS managed termination protection, instances that ran tasks stay protected from scale-in, and a stack
delete can wait on them for hours. This resource is deleted after the ECS service and before the group.
"""
import json
import urllib.request
from typing import Any

import boto3


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


def on_event(autoscaling: Any, event: dict[str, Any]) -> tuple[str, str]:
    if event["RequestType"] != "Delete":
        return "SUCCESS", "nothing to do until the stack is deleted"
    group = event["ResourceProperties"]["AutoScalingGroupName"]
    try:
        released = release(autoscaling, group)
    except Exception as error:  # noqa: BLE001 - reported to CloudFormation with its message
        return "FAILED", f"could not lift scale-in protection in {group}: {error}"
    return "SUCCESS", f"lifted scale-in protection from {len(released)} instance(s) of {group}"


def handler(event: dict[str, Any], context: Any) -> None:
    status, reason = on_event(boto3.client("autoscaling"), event)
    print(f"egress-proxy: {event['RequestType']}: {status}: {reason}")
    respond(event, status, reason)
