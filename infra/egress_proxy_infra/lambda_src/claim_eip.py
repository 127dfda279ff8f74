"""Give a launching instance one Elastic IP of the pool, then let the Auto Scaling group go on.

Called by EventBridge for the group's launch lifecycle hook. AssociateAddress with AllowReassociation=false
is the lock: EC2 refuses an address that is already associated (Resource.AlreadyAssociated), so concurrent
launches never share or steal one. No address within the attempts: ABANDON, and the group terminates it.
"""
import os
import random
import time
from collections.abc import Callable
from typing import Any

import boto3
from botocore.exceptions import ClientError

NOT_READY = ("IncorrectInstanceState", "InvalidInstanceID.NotFound")


def claim(ec2: Any, instance_id: str, tag_key: str, pool: str, attempts: int = 40,
          pause: Callable[[], None] = lambda: time.sleep(1 + 2 * random.random()),
          order: Callable[[list[str]], None] = random.shuffle) -> str | None:
    """The pool address this instance holds (claiming a free one if needed), or None."""
    filters = [{"Name": f"tag:{tag_key}", "Values": [pool]}]
    for _ in range(attempts):
        addresses = ec2.describe_addresses(Filters=filters)["Addresses"]
        for address in addresses:
            if address.get("InstanceId") == instance_id:
                return str(address["AllocationId"])  # a retried event: already done
        free = [a["AllocationId"] for a in addresses if not a.get("AssociationId")]
        order(free)  # random order: simultaneous launches rarely even collide
        for allocation in free:
            try:
                ec2.associate_address(AllocationId=allocation, InstanceId=instance_id,
                                      AllowReassociation=False)
                return str(allocation)
            except ClientError as error:
                code = error.response["Error"]["Code"]
                if code in NOT_READY:
                    break  # the instance is still pending: wait, then try again
                if code != "Resource.AlreadyAssociated":
                    raise
                print(f"egress-proxy: {allocation} was taken by another instance, trying the next one")
        pause()
    return None


def complete(autoscaling: Any, detail: dict[str, str], result: str) -> None:
    autoscaling.complete_lifecycle_action(
        LifecycleHookName=detail["LifecycleHookName"], AutoScalingGroupName=detail["AutoScalingGroupName"],
        LifecycleActionToken=detail["LifecycleActionToken"], InstanceId=detail["EC2InstanceId"],
        LifecycleActionResult=result)


def on_launch(ec2: Any, autoscaling: Any, detail: dict[str, str], tag_key: str, pool: str,
              **claim_options: Any) -> str | None:
    instance = detail["EC2InstanceId"]
    allocation = claim(ec2, instance, tag_key, pool, **claim_options)
    if allocation is None:
        print(f"egress-proxy: no free Elastic IP in pool {pool} for {instance}; abandoning the launch "
              "(raise eipPoolSize or lower MaxCapacity)")
        complete(autoscaling, detail, "ABANDON")
    else:
        print(f"egress-proxy: {instance} egresses from Elastic IP allocation {allocation}")
        complete(autoscaling, detail, "CONTINUE")
    return allocation


def handler(event: dict[str, Any], context: Any) -> None:
    on_launch(boto3.client("ec2"), boto3.client("autoscaling"), event["detail"],
              os.environ["POOL_TAG_KEY"], os.environ["POOL_TAG_VALUE"])
