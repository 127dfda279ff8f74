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
from egress_proxy_infra.transparent_mode import IPV6_BYPASS_MARKER

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


def _timed_run(ec2: Any, tables: dict[str, str], *, ipv6: bool = False) -> tuple[dict[str, str], float]:
    started = time.perf_counter()
    changes = route_failover.run(ec2, list(tables.values()), POOL_TAG, POOL, ipv6=ipv6)
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


# --- IPv6 (-c transparentIpv6=on): ::/0 moves with 0.0.0.0/0 -----------------------------------------------------
# moto 5.2.5 implements DestinationIpv6CidrBlock in CreateRoute, ReplaceRoute and DescribeRouteTables, and
# egress-only internet gateways: no stand-in needed. Unlike EC2 it lets CreateRoute overwrite an existing ::/0
# (it refuses only an existing IPv4 destination, as EC2 does with RouteAlreadyExists), so the tests also record
# which call the function made, with botocore's own event hooks on the client.


def _route_calls(ec2: Any) -> list[tuple[str, str]]:
    """(CreateRoute or ReplaceRoute, destination) for every route call the client makes from now on."""
    calls: list[tuple[str, str]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in ("CreateRoute", "ReplaceRoute"):
            calls.append((model.name, params.get("DestinationCidrBlock") or params["DestinationIpv6CidrBlock"]))

    ec2.meta.events.register("provide-client-params.ec2.*", record)
    return calls


def _dual_stack_network(ec2: Any) -> tuple[dict[str, str], dict[str, str], str]:
    """_network's, with each private route table sending ::/0 to an egress-only internet gateway: the usual
    dual-stack VPC, where IPv6 would bypass the proxy."""
    public, tables = _network(ec2)
    vpc = ec2.describe_route_tables(RouteTableIds=[tables[AZS[0]]])["RouteTables"][0]["VpcId"]
    gateway = ec2.create_egress_only_internet_gateway(VpcId=vpc)["EgressOnlyInternetGateway"][
        "EgressOnlyInternetGatewayId"]
    for table in tables.values():
        ec2.create_route(RouteTableId=table, DestinationIpv6CidrBlock="::/0", EgressOnlyInternetGatewayId=gateway)
    return public, tables, gateway


def _ipv6_targets(ec2: Any, tables: dict[str, str]) -> dict[str, str | None]:
    """{AZ: the instance, or else the gateway, its table's ::/0 points at}."""
    found: dict[str, str | None] = {}
    for table in ec2.describe_route_tables(RouteTableIds=list(tables.values()))["RouteTables"]:
        routes = [r for r in table["Routes"] if r.get("DestinationIpv6CidrBlock") == "::/0"]
        assert len(routes) <= 1, routes  # replaced, never a second ::/0 beside the first
        found[table["RouteTableId"]] = (routes[0].get("InstanceId") or routes[0].get("EgressOnlyInternetGatewayId")
                                        if routes else None)
    return {az: found[table] for az, table in tables.items()}


def test_ipv6_routes_fail_over_with_the_ipv4_routes_and_back(ec2: Any) -> None:
    public, tables, _ = _dual_stack_network(ec2)
    a, b = _launch(ec2, public[AZS[0]]), _launch(ec2, public[AZS[1]])
    calls = _route_calls(ec2)

    _, first = _timed_run(ec2, tables, ipv6=True)
    assert _targets(ec2, tables) == _ipv6_targets(ec2, tables) == {AZS[0]: a, AZS[1]: b}
    # 0.0.0.0/0 did not exist; ::/0 did (to the egress-only gateway), and EC2 refuses to create it twice. Every
    # IPv4 route first: a failing IPv6 call (which ends the run) cannot hold up another table's IPv4 failover.
    assert calls == [("CreateRoute", "0.0.0.0/0")] * 2 + [("ReplaceRoute", "::/0")] * 2

    ec2.stop_instances(InstanceIds=[a])
    changes, failover = _timed_run(ec2, tables, ipv6=True)
    assert changes == {tables[AZS[0]]: b}
    assert _targets(ec2, tables) == _ipv6_targets(ec2, tables) == {AZS[0]: b, AZS[1]: b}

    replacement = _launch(ec2, public[AZS[0]])
    changes, failback = _timed_run(ec2, tables, ipv6=True)
    assert changes == {tables[AZS[0]]: replacement}
    assert _targets(ec2, tables) == _ipv6_targets(ec2, tables) == {AZS[0]: replacement, AZS[1]: b}
    assert _timed_run(ec2, tables, ipv6=True)[0] == {}
    print(f"route_failover with IPv6 against moto_server: initial {first * 1000:.0f} ms, failover "
          f"{failover * 1000:.0f} ms, failback {failback * 1000:.0f} ms (two routes per table)")


def test_ipv6_off_leaves_the_egress_only_route_and_says_it_bypasses_the_proxy(
        ec2: Any, capsys: pytest.CaptureFixture[str]) -> None:
    public, tables, gateway = _dual_stack_network(ec2)
    a, b = _launch(ec2, public[AZS[0]]), _launch(ec2, public[AZS[1]])
    route_failover.run(ec2, list(tables.values()), POOL_TAG, POOL)
    assert _targets(ec2, tables) == {AZS[0]: a, AZS[1]: b}
    assert _ipv6_targets(ec2, tables) == {AZS[0]: gateway, AZS[1]: gateway}
    out = capsys.readouterr().out
    for table in tables.values():
        assert f"egress-proxy: WARNING {table} {IPV6_BYPASS_MARKER}" in out  # what the alarm's filter counts


def test_turning_ipv6_on_later_takes_over_the_egress_only_route_and_keeps_ipv4(ec2: Any) -> None:
    """The migration: a stack already routing 0.0.0.0/0 is updated with IPv6 on; only ::/0 changes."""
    public, tables, _ = _dual_stack_network(ec2)
    a, b = _launch(ec2, public[AZS[0]]), _launch(ec2, public[AZS[1]])
    route_failover.run(ec2, list(tables.values()), POOL_TAG, POOL)
    calls = _route_calls(ec2)

    changes = route_failover.run(ec2, list(tables.values()), POOL_TAG, POOL, ipv6=True)
    assert changes == {tables[AZS[0]]: a, tables[AZS[1]]: b}
    assert calls == [("ReplaceRoute", "::/0")] * 2
    assert _targets(ec2, tables) == _ipv6_targets(ec2, tables) == {AZS[0]: a, AZS[1]: b}


def test_ipv6_with_no_healthy_instance_keeps_the_egress_only_route(ec2: Any) -> None:
    """Nothing healthy to route to: the function changes no route (as for IPv4) rather than blackhole it."""
    _, tables, gateway = _dual_stack_network(ec2)
    assert route_failover.run(ec2, list(tables.values()), POOL_TAG, POOL, ipv6=True) == {}
    assert _ipv6_targets(ec2, tables) == {AZS[0]: gateway, AZS[1]: gateway}


@pytest.mark.parametrize(("route_ipv6", "moved"), [("on", True), ("off", False)])
def test_the_handler_moves_ipv6_only_with_route_ipv6_on(route_ipv6: str, moved: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The Lambda entry point as deployed: its environment, and boto3 finding moto_server by AWS_ENDPOINT_URL."""
    with serve_moto() as url:
        ec2 = client("ec2", url)
        public, tables, gateway = _dual_stack_network(ec2)
        a, b = _launch(ec2, public[AZS[0]]), _launch(ec2, public[AZS[1]])
        for name, value in {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": ec2.meta.region_name,
                            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "ROUTE_TABLE_IDS": ",".join(tables.values()), "POOL_TAG_KEY": POOL_TAG,
                            "POOL_TAG_VALUE": POOL, "ROUTE_IPV6": route_ipv6}.items():
            monkeypatch.setenv(name, value)
        assert route_failover.handler({}, None) == {tables[AZS[0]]: a, tables[AZS[1]]: b}
        assert _targets(ec2, tables) == {AZS[0]: a, AZS[1]: b}
        assert _ipv6_targets(ec2, tables) == ({AZS[0]: a, AZS[1]: b} if moved else {AZS[0]: gateway, AZS[1]: gateway})
