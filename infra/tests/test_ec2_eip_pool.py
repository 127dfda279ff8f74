"""EC2 mode: the Elastic IP pool, its IAM scoping, the launch template and the race-free boot script.

The boot script is exercised for real (bash) against a fake `aws` CLI that implements the one EC2 semantic
the design relies on: AssociateAddress with AllowReassociation=false fails when the address is already
associated. Several "instances" boot at once to show that no address is ever taken twice.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from infra_synth import Synth

POOL_TAG = "egress-proxy:eip-pool"
STACK_NAME = "proxy-stack"


def test_eips_carry_the_pool_tag(ec2: Synth) -> None:
    for eip in ec2.resources("AWS::EC2::EIP").values():
        assert eip["Properties"]["Domain"] == "vpc"
        assert {"Key": POOL_TAG, "Value": {"Ref": "AWS::StackName"}} in eip["Properties"]["Tags"]


def test_instance_role_may_associate_only_pool_addresses(ec2: Synth) -> None:
    (policy,) = [p for k, p in ec2.resources("AWS::IAM::Policy").items() if "InstanceRole" in k]
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    associate = [s for s in statements if "ec2:AssociateAddress" in json.dumps(s["Action"])]
    assert len(associate) == 1
    (statement,) = associate
    assert statement["Action"] == "ec2:AssociateAddress"
    assert statement["Condition"] == {"StringEquals": {f"aws:ResourceTag/{POOL_TAG}": {"Ref": "AWS::StackName"}}}
    kinds = sorted(json.dumps(r).split(":")[-1].rstrip('"]}') for r in statement["Resource"])
    assert kinds == ["elastic-ip/*", "instance/*", "network-interface/*"]
    (describe,) = [s for s in statements if s["Action"] == "ec2:DescribeAddresses"]
    assert describe["Resource"] == "*"
    every_action = json.dumps([s["Action"] for s in statements])
    for forbidden in ("DisassociateAddress", "ReleaseAddress", "AllocateAddress", "ec2:*"):
        assert forbidden not in every_action
    # The task role gets none of it.
    (task_policy,) = [p for k, p in ec2.resources("AWS::IAM::Policy").items() if "TaskRole" in k]
    assert "ec2:" not in json.dumps(task_policy)


def test_launch_template(ec2: Synth) -> None:
    _, template = ec2.only("AWS::EC2::LaunchTemplate")
    data = template["Properties"]["LaunchTemplateData"]
    assert data["ImageId"] == {"Ref": "AmiId"}
    assert data["InstanceType"] == {"Ref": "InstanceType"}
    assert data["KeyName"] == {"Fn::If": ["HasKeyName", {"Ref": "KeyName"}, {"Ref": "AWS::NoValue"}]}
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    (nic,) = data["NetworkInterfaces"]
    assert nic["AssociatePublicIpAddress"] is True  # to reach the EC2 API before the EIP is claimed
    proxy_sg = [k for k in ec2.resources("AWS::EC2::SecurityGroup") if k.startswith("Proxies")][0]
    assert nic["Groups"] == [{"Fn::GetAtt": [proxy_sg, "GroupId"]}]
    assert all(d["Ebs"]["Encrypted"] for d in data["BlockDeviceMappings"])
    tagged = {spec["ResourceType"] for spec in data["TagSpecifications"]
              if {"Key": POOL_TAG, "Value": {"Ref": "AWS::StackName"}} in spec["Tags"]}
    assert tagged == {"instance", "network-interface"}


def test_auto_scaling_group_spans_the_public_subnets_and_never_outgrows_the_pool(ec2: Synth) -> None:
    _, asg = ec2.only("AWS::AutoScaling::AutoScalingGroup")
    assert asg["Properties"]["VPCZoneIdentifier"] == {"Ref": "PublicSubnetIds"}
    assert asg["Properties"]["MaxSize"] == str(len(ec2.resources("AWS::EC2::EIP")))
    assert asg["Properties"]["NewInstancesProtectedFromScaleIn"] is True


# --- the boot script, run for real ---------------------------------------------------------------------

def render_user_data(ec2: Synth, ecs_config: Path) -> str:
    _, template = ec2.only("AWS::EC2::LaunchTemplate")
    parts = template["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
    tokens = {json.dumps({"Ref": "AWS::StackName"}): STACK_NAME}
    text = "".join(p if isinstance(p, str) else tokens.get(json.dumps(p), "test-cluster") for p in parts)
    return text.replace("/etc/ecs/ecs.config", str(ecs_config))


def test_user_data_claims_an_address_before_joining_the_cluster(ec2: Synth, tmp_path: Path) -> None:
    script = render_user_data(ec2, tmp_path / "ecs.config")
    assert "--no-allow-reassociation" in script and "shuf" in script
    assert script.index("associate-address") < script.index("ECS_CLUSTER=test-cluster")
    assert "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


FAKE_AWS = textwrap.dedent('''\
    #!{python}
    """A fake `aws ec2` with AssociateAddress's real semantics, state in a JSON file under a lock."""
    import fcntl, json, os, sys, time
    state_path = os.environ["FAKE_EC2_STATE"]
    args = sys.argv[1:]
    def opt(name):
        """Every value after `name` up to the next option (the CLI takes several filters after one --filters)."""
        if name not in args:
            return []
        values = []
        for a in args[args.index(name) + 1:]:
            if a.startswith("--"):
                break
            values.append(a)
        return values
    with open(state_path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.load(open(state_path))
        if args[:2] == ["ec2", "describe-addresses"]:
            filters = dict(f.split(",Values=", 1) for f in opt("--filters"))
            rows = [a for a in state["addresses"]
                    if all(a["Tags"].get(k[len("Name=tag:"):]) == v for k, v in filters.items() if k.startswith("Name=tag:"))
                    and ("Name=instance-id" not in filters or a["InstanceId"] == filters["Name=instance-id"])]
            query = opt("--query")[0]
            if query == "Addresses[0].AllocationId":
                print(rows[0]["AllocationId"] if rows else "None")
            else:
                print("\\t".join(a["AllocationId"] for a in rows if a["InstanceId"] is None))
        elif args[:2] == ["ec2", "associate-address"]:
            assert "--no-allow-reassociation" in args, "reassociation must be refused"
            (alloc,), (instance,) = opt("--allocation-id"), opt("--instance-id")
            (address,) = [a for a in state["addresses"] if a["AllocationId"] == alloc]
            if address["InstanceId"] is not None:
                print("An error occurred (Resource.AlreadyAssociated)", file=sys.stderr)
                sys.exit(254)
            address["InstanceId"] = instance
            state["log"].append([alloc, instance])
            json.dump(state, open(state_path, "w"))
        else:
            sys.exit("unexpected: " + " ".join(args))
    time.sleep(0.05)  # widen the window between listing and associating, to make instances collide
''')

FAKE_CURL = textwrap.dedent('''\
    #!/bin/sh
    case "$*" in
      *api/token*) echo token ;;
      *instance-id*) echo "$FAKE_INSTANCE_ID" ;;
      *placement/region*) echo eu-west-1 ;;
      *) exit 22 ;;
    esac
''')


def _install_fakes(bin_dir: Path, marker_dir: Path) -> None:
    bin_dir.mkdir()
    fakes = {
        "aws": FAKE_AWS.format(python=sys.executable),
        "curl": FAKE_CURL,
        "sleep": "#!/bin/sh\nexit 0\n",
        "shutdown": f'#!/bin/sh\ntouch "{marker_dir}/shutdown-$FAKE_INSTANCE_ID"\n',
    }
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _boot(script: Path, bin_dir: Path, state: Path, instance_ids: list[str]) -> list[subprocess.CompletedProcess[str]]:
    env_base = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_EC2_STATE": str(state)}
    procs = [subprocess.Popen(["bash", str(script)], env={**env_base, "FAKE_INSTANCE_ID": i},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in instance_ids]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _state(addresses: int) -> dict[str, Any]:
    pool = [{"AllocationId": f"eipalloc-{i}", "InstanceId": None, "Tags": {POOL_TAG: STACK_NAME}}
            for i in range(addresses)]
    foreign = {"AllocationId": "eipalloc-foreign", "InstanceId": None, "Tags": {POOL_TAG: "another-stack"}}
    return {"addresses": [*pool, foreign], "log": []}


@pytest.fixture()
def boot_env(ec2: Synth, tmp_path: Path) -> tuple[Path, Path, Path]:
    if shutil.which("shuf") is None or shutil.which("bash") is None:
        pytest.skip("needs bash and coreutils shuf")
    bin_dir, marker_dir = tmp_path / "bin", tmp_path / "markers"
    marker_dir.mkdir()
    _install_fakes(bin_dir, marker_dir)
    script = tmp_path / "user-data.sh"
    # Few attempts: `sleep` is a no-op here, and the pool is either big enough or clearly exhausted.
    script.write_text(render_user_data(ec2, tmp_path / "ecs.config").replace("$(seq 1 60)", "$(seq 1 5)"))
    return script, bin_dir, marker_dir


def test_simultaneous_boots_each_get_a_different_address(boot_env: tuple[Path, Path, Path], tmp_path: Path) -> None:
    script, bin_dir, markers = boot_env
    state = tmp_path / "ec2.json"
    state.write_text(json.dumps(_state(addresses=4)))
    instances = [f"i-{n}" for n in range(4)]
    results = _boot(script, bin_dir, state, instances)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    final = json.loads(state.read_text())
    holders = {a["AllocationId"]: a["InstanceId"] for a in final["addresses"]}
    assert sorted(v for k, v in holders.items() if k != "eipalloc-foreign") == instances
    assert holders["eipalloc-foreign"] is None  # never touches another stack's pool
    assert len(final["log"]) == 4  # one association per address: nothing was stolen or re-done
    assert not list(markers.iterdir())
    assert all("ECS_CLUSTER=test-cluster" in (tmp_path / "ecs.config").read_text() for _ in results)


def test_an_instance_without_a_free_address_powers_off(boot_env: tuple[Path, Path, Path], tmp_path: Path) -> None:
    script, bin_dir, markers = boot_env
    state = tmp_path / "ec2.json"
    state.write_text(json.dumps(_state(addresses=2)))
    results = _boot(script, bin_dir, state, ["i-a", "i-b", "i-c"])
    final = json.loads(state.read_text())
    assert len(final["log"]) == 2 and len({alloc for alloc, _ in final["log"]}) == 2
    losers = [r for r in results if r.returncode != 0]
    assert len(losers) == 1 and "no free Elastic IP" in losers[0].stderr
    assert len(list(markers.glob("shutdown-*"))) == 1
    # The loser never joined the cluster.
    assert (tmp_path / "ecs.config").read_text().count("ECS_CLUSTER=") == 2


def test_a_rebooted_instance_keeps_its_address(boot_env: tuple[Path, Path, Path], tmp_path: Path) -> None:
    script, bin_dir, _ = boot_env
    state = tmp_path / "ec2.json"
    initial = _state(addresses=3)
    initial["addresses"][1]["InstanceId"] = "i-again"
    state.write_text(json.dumps(initial))
    (result,) = _boot(script, bin_dir, state, ["i-again"])
    assert result.returncode == 0, result.stderr
    assert json.loads(state.read_text())["log"] == []
