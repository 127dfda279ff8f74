"""Transparent mode's route failover (lambda_src/route_failover.py), run for real against moto_server on loopback:
two AZs, a private route table per AZ whose default route must point at a healthy proxy instance: its own AZ's,
else one in another AZ, and back once its AZ has a healthy instance again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from aws_emulator import client, serve_moto
from egress_proxy_infra.lambda_src import route_failover
from egress_proxy_infra.lambda_src.route_failover import plan

POOL_TAG = "egress-proxy:eip-pool"
POOL = "proxy-stack"
AZS = ("eu-west-1a", "eu-west-1b")


# --- the decision, case by case ------------------------------------------------------------------------------------


def test_each_table_gets_its_own_azs_instance() -> None:
    assert plan({"rtb-a": "a", "rtb-b": "b"}, {"a": ["i-a"], "b": ["i-b"]}, {"rtb-a": None, "rtb-b": "i-x"}) \
        == {"rtb-a": "i-a", "rtb-b": "i-b"}


def test_a_table_whose_az_has_no_healthy_instance_fails_over_to_another_az() -> None:
    assert plan({"rtb-a": "a", "rtb-b": "b"}, {"b": ["i-b"]}, {"rtb-a": "i-a", "rtb-b": "i-b"}) == {"rtb-a": "i-b"}


def test_failback_once_the_az_has_a_healthy_instance_again() -> None:
    assert plan({"rtb-a": "a"}, {"a": ["i-a2"], "b": ["i-b"]}, {"rtb-a": "i-b"}) == {"rtb-a": "i-a2"}


def test_a_working_failover_route_is_not_moved_between_spares() -> None:
    assert plan({"rtb-a": "a"}, {"b": ["i-b"], "c": ["i-c"]}, {"rtb-a": "i-c"}) == {}


def test_no_healthy_instance_anywhere_changes_nothing() -> None:
    # Never a NAT gateway or an internet gateway: clients lose egress rather than bypass the filter.
    assert plan({"rtb-a": "a", "rtb-b": "b"}, {}, {"rtb-a": "i-a", "rtb-b": None}) == {}


# --- against the EC2 API emulator --------------------------------------------------------------------------------


@pytest.fixture()
def ec2() -> Iterator[Any]:
    with serve_moto() as url:
        yield client("ec2", url)


def _network(ec2: Any) -> tuple[dict[str, str], dict[str, str]]:
    """{AZ: public subnet} for the instances, {AZ: private route table}."""
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    public, tables = {}, {}
    for index, az in enumerate(AZS):
        public[az] = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{100 + index}.0/24",
                                       AvailabilityZone=az)["Subnet"]["SubnetId"]
        private = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{index}.0/24",
                                    AvailabilityZone=az)["Subnet"]["SubnetId"]
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.associate_route_table(RouteTableId=table, SubnetId=private)
        tables[az] = table
    return public, tables


def _launch(ec2: Any, subnet: str, pool: str = POOL) -> str:
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.small", SubnetId=subnet,
                                 TagSpecifications=[{"ResourceType": "instance",
                                                     "Tags": [{"Key": POOL_TAG, "Value": pool}]}])
    return str(instance["Instances"][0]["InstanceId"])


def _targets(ec2: Any, tables: dict[str, str]) -> dict[str, str | None]:
    found = {}
    for table in ec2.describe_route_tables(RouteTableIds=list(tables.values()))["RouteTables"]:
        default = [r for r in table["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
        found[table["RouteTableId"]] = default[0].get("InstanceId") if default else None
    return {az: found[table] for az, table in tables.items()}


def _timed_run(ec2: Any, tables: dict[str, str]) -> tuple[dict[str, str], float]:
    started = time.perf_counter()
    changes = route_failover.run(ec2, list(tables.values()), POOL_TAG, POOL)
    return changes, time.perf_counter() - started


def test_routes_fail_over_to_another_az_and_back(ec2: Any) -> None:
    public, tables = _network(ec2)
    a, b = _launch(ec2, public[AZS[0]]), _launch(ec2, public[AZS[1]])
    _launch(ec2, public[AZS[0]], pool="another-stack")  # never a target: not this stack's pool

    _, first = _timed_run(ec2, tables)  # creates the default routes
    assert _targets(ec2, tables) == {AZS[0]: a, AZS[1]: b}
    for instance in (a, b):  # the instances forward packets that are not addressed to them
        attribute = ec2.describe_instance_attribute(InstanceId=instance, Attribute="sourceDestCheck")
        assert attribute["SourceDestCheck"]["Value"] is False

    ec2.stop_instances(InstanceIds=[a])
    changes, failover = _timed_run(ec2, tables)
    assert changes == {tables[AZS[0]]: b}
    assert _targets(ec2, tables) == {AZS[0]: b, AZS[1]: b}

    replacement = _launch(ec2, public[AZS[0]])
    changes, failback = _timed_run(ec2, tables)
    assert changes == {tables[AZS[0]]: replacement}
    assert _targets(ec2, tables) == {AZS[0]: replacement, AZS[1]: b}

    assert _timed_run(ec2, tables)[0] == {}  # idempotent: a run with nothing to do changes nothing
    print(f"route_failover against moto_server: initial {first * 1000:.0f} ms, failover {failover * 1000:.0f} ms, "
          f"failback {failback * 1000:.0f} ms (the function's own work; detection adds the EventBridge delay)")


def test_a_table_without_a_default_route_and_none_healthy_is_left_alone(ec2: Any) -> None:
    _, tables = _network(ec2)
    assert _timed_run(ec2, tables)[0] == {}
    assert _targets(ec2, tables) == {AZS[0]: None, AZS[1]: None}
