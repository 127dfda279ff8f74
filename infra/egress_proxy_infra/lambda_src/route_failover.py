"""Transparent mode: point each private route table's 0.0.0.0/0 (and ::/0 with ROUTE_IPV6=on, to the same
instance) at a healthy proxy: its own AZ's, else another's (and back); never a NAT gateway. Idempotent."""
import os
from typing import Any

import boto3

DEFAULTS = {"DestinationCidrBlock": "0.0.0.0/0", "DestinationIpv6CidrBlock": "::/0"}


def plan(tables: dict[str, str], healthy: dict[str, list[str]],
         current: dict[str, str | None]) -> dict[str, str]:
    """{table: instance} to change. tables: {table: AZ}; healthy: {AZ: instances}; current: {table: the
    instance its 0.0.0.0/0 points at}."""
    spare = sorted(i for ids in healthy.values() for i in ids)
    changes = {}
    for table, az in sorted(tables.items()):
        own = sorted(healthy.get(az, []))
        if current.get(table) in own or (not own and current.get(table) in spare):
            continue  # already right: don't move a working route between spares
        if own or spare:
            changes[table] = (own or spare)[0]
    return changes


def run(ec2: Any, table_ids: list[str], tag_key: str, pool: str, ipv6: bool = False) -> dict[str, str]:
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
    tables, current, found = {}, {}, {}
    for table in ec2.describe_route_tables(RouteTableIds=table_ids)["RouteTables"]:
        rtb = table["RouteTableId"]
        subnets = [a["SubnetId"] for a in table.get("Associations", []) if a.get("SubnetId")]
        if not subnets:
            print(f"egress-proxy: {rtb} has no subnet; skipped")
            continue
        tables[rtb] = ec2.describe_subnets(SubnetIds=subnets[:1])["Subnets"][0]["AvailabilityZone"]
        found[rtb] = {k: r for r in table["Routes"] for k, v in DEFAULTS.items() if r.get(k) == v}
        current[rtb] = found[rtb].get("DestinationCidrBlock", {}).get("InstanceId")
        if not ipv6 and "InstanceId" not in found[rtb].get("DestinationIpv6CidrBlock", {"InstanceId": 0}):
            print(f"egress-proxy: WARNING {rtb} routes ::/0 past the proxy (-c transparentIpv6=on moves it)")
    up = {i for ids in healthy.values() for i in ids}
    changes = plan(tables, healthy, current)
    moved = {}
    for key in [*DEFAULTS][:1 + ipv6]:  # IPv4 first: an IPv6 error cannot hold up IPv4 failover
        for rtb in sorted(tables):
            target = changes.get(rtb) or (current[rtb] if current[rtb] in up else None)
            route = found[rtb].get(key)
            if target and (route or {}).get("InstanceId") != target:
                (ec2.replace_route if route else ec2.create_route)(
                    RouteTableId=rtb, InstanceId=target, **{key: DEFAULTS[key]})
                moved[rtb] = target
                print(f"egress-proxy: {rtb} ({tables[rtb]}) {DEFAULTS[key]} -> {target}")
    if not healthy:
        print("egress-proxy: no healthy proxy instance; routes left as they are")
    return moved


def handler(event: Any, context: Any) -> dict[str, str]:
    return run(boto3.client("ec2"), os.environ["ROUTE_TABLE_IDS"].split(","), os.environ["POOL_TAG_KEY"],
               os.environ["POOL_TAG_VALUE"], os.environ.get("ROUTE_IPV6") == "on")
