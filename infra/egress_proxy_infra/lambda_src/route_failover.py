"""Transparent mode: point each private route table's default route at a healthy proxy instance.

Its own AZ's instance when one is healthy, else a healthy one in another AZ (and back once its AZ has one
again). Never a NAT gateway: that would let traffic out unfiltered. Healthy: running, status checks not
impaired. Also turns off source/dest checking on the pool's instances. Run on every EC2 state change and
every minute; each run is idempotent.
"""
import os
from typing import Any

import boto3

DEFAULT = "0.0.0.0/0"


def plan(tables: dict[str, str], healthy: dict[str, list[str]],
         current: dict[str, str | None]) -> dict[str, str]:
    """{route table: instance} for the routes to change. tables: {route table: its AZ}; healthy: {AZ: instance
    ids}; current: {route table: the instance its default route points at}."""
    spare = sorted(i for ids in healthy.values() for i in ids)
    changes = {}
    for table, az in sorted(tables.items()):
        own = sorted(healthy.get(az, []))
        if current.get(table) in own or (not own and current.get(table) in spare):
            continue  # already right: don't move a working route between spares
        if own or spare:
            changes[table] = (own or spare)[0]
    return changes


def run(ec2: Any, table_ids: list[str], tag_key: str, pool: str) -> dict[str, str]:
    reservations = ec2.describe_instances(Filters=[
        {"Name": f"tag:{tag_key}", "Values": [pool]}, {"Name": "instance-state-name", "Values": ["running"]}])
    instances = [i for r in reservations["Reservations"] for i in r["Instances"]]
    impaired = set()
    if instances:
        for status in ec2.describe_instance_status(InstanceIds=[i["InstanceId"] for i in instances])[
                "InstanceStatuses"]:
            if "impaired" in (status["InstanceStatus"]["Status"], status["SystemStatus"]["Status"]):
                impaired.add(status["InstanceId"])
    healthy: dict[str, list[str]] = {}
    for instance in instances:
        if instance["InstanceId"] in impaired:
            continue
        if instance.get("SourceDestCheck", True):
            ec2.modify_instance_attribute(InstanceId=instance["InstanceId"], SourceDestCheck={"Value": False})
        healthy.setdefault(instance["Placement"]["AvailabilityZone"], []).append(instance["InstanceId"])
    tables, current, has_default = {}, {}, set()
    for table in ec2.describe_route_tables(RouteTableIds=table_ids)["RouteTables"]:
        subnets = [a["SubnetId"] for a in table.get("Associations", []) if a.get("SubnetId")]
        if not subnets:
            print(f"egress-proxy: {table['RouteTableId']} has no subnet; skipped")
            continue
        az = ec2.describe_subnets(SubnetIds=subnets[:1])["Subnets"][0]["AvailabilityZone"]
        tables[table["RouteTableId"]] = az
        routes = [r for r in table["Routes"] if r.get("DestinationCidrBlock") == DEFAULT]
        current[table["RouteTableId"]] = routes[0].get("InstanceId") if routes else None
        if routes:
            has_default.add(table["RouteTableId"])
    changes = plan(tables, healthy, current)
    for table, instance in changes.items():
        route = {"RouteTableId": table, "DestinationCidrBlock": DEFAULT, "InstanceId": instance}
        (ec2.replace_route if table in has_default else ec2.create_route)(**route)
        print(f"egress-proxy: {table} ({tables[table]}) -> {instance}")
    if not healthy:
        print("egress-proxy: no healthy proxy instance; routes left as they are")
    return changes


def handler(event: Any, context: Any) -> dict[str, str]:
    return run(boto3.client("ec2"), os.environ["ROUTE_TABLE_IDS"].split(","), os.environ["POOL_TAG_KEY"],
               os.environ["POOL_TAG_VALUE"])
