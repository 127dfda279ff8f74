"""Least privilege at run time: read-only root filesystem, egress limited to the proxy's ports and DNS, the
proxy's uid kept away from instance metadata, and the optional private AWS endpoints.

Two behaviours are run for real rather than only read from the template:
* the supervisor and Squid run with the root filesystem read-only and only the task's volumes writable
  (a private mount namespace, the repository's own venv and Debian's Squid, as the rest of the suite uses);
* the instance's iptables rule, applied inside a private network namespace that has its own
  169.254.169.254 and 169.254.170.2 on loopback, stops uid 13 and nobody else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from infra_synth import Synth

REPO = Path(__file__).resolve().parents[2]
PROXY_UID = 13


def _container(synth: Synth) -> dict[str, Any]:
    _, task = synth.only("AWS::ECS::TaskDefinition")
    (container,) = task["Properties"]["ContainerDefinitions"]
    return dict(container)


def _writable_paths(synth: Synth) -> dict[str, str]:
    _, task = synth.only("AWS::ECS::TaskDefinition")
    volumes = {v["Name"] for v in task["Properties"]["Volumes"]}
    mounts = _container(synth)["MountPoints"]
    assert {m["SourceVolume"] for m in mounts} == volumes
    assert all(m["ReadOnly"] is False for m in mounts)
    # No host path: each task gets fresh, private directories.
    assert all(set(v) == {"Name"} for v in task["Properties"]["Volumes"])
    return {m["SourceVolume"]: m["ContainerPath"] for m in mounts}


def test_root_filesystem_is_read_only_with_state_and_squid_ipc_writable(synth: Synth) -> None:
    container = _container(synth)
    assert container["ReadonlyRootFilesystem"] is True
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert _writable_paths(synth) == {"state": env["EGRESS_STATE_DIR"], "squid-run": "/run/squid"}


def test_dockerfile_declares_the_writable_paths_as_volumes(synth: Synth) -> None:
    """ECS copies a VOLUME's content and ownership from the image into the task's empty volume; without it a
    Fargate bind mount is root-owned 0755 and uid 13 could not write it (ECS Developer Guide, "Bind mounts")."""
    dockerfile = (REPO / "container" / "Dockerfile").read_text()
    (volume_line,) = [line for line in dockerfile.splitlines() if line.startswith("VOLUME ")]
    declared = set(json.loads(volume_line.removeprefix("VOLUME ")))
    assert set(_writable_paths(synth).values()) <= declared
    for path in _writable_paths(synth).values():
        # The image creates each one owned by the proxy user.
        assert re.search(rf"install -d -o proxy -g proxy -m 07[0-9]{{2}} [^\n]*{re.escape(path)}\b", dockerfile), path


def _egress_proxy_bin() -> Path:
    """EGRESS_PROXY_BIN, else the proxy installed in the venv running these tests (infra/scripts/test installs
    ../entrypoint there)."""
    candidate = Path(os.environ.get("EGRESS_PROXY_BIN", Path(sys.executable).parent / "egress-proxy"))
    if not candidate.exists():
        pytest.fail(f"{candidate} is missing: run infra/scripts/test (it installs ../entrypoint into its venv), "
                    "or set EGRESS_PROXY_BIN to an installed egress-proxy")
    return candidate


RO_ROOT_SCRIPT = textwrap.dedent("""\
    set -eu
    mount --make-rprivate /
    ip link set lo up
    for path in $WRITABLE; do
        mkdir -p "$path"
        mount -t tmpfs -o uid={uid},gid={uid},mode=0750 tmpfs "$path"
    done
    mount -o remount,bind,ro /
    if touch /.egress-proxy-ro-probe 2>/dev/null; then echo "the root filesystem is still writable" >&2; exit 90; fi
    run() {{ setpriv --reuid {uid} --regid {uid} --clear-groups "$@"; }}
    setpriv --reuid {uid} --regid {uid} --clear-groups "$EGRESS_PROXY" run > "$LOG" 2>&1 &
    supervisor=$!
    healthy=""
    for _ in $(seq 1 120); do
        if run "$EGRESS_PROXY" health > /dev/null 2>&1; then healthy=yes; break; fi
        kill -0 $supervisor 2>/dev/null || break
        sleep 0.5
    done
    [ -n "$healthy" ] || {{ echo "never healthy" >&2; kill $supervisor 2>/dev/null; exit 91; }}
    curl -sS -o /dev/null -w '%{{http_code}}\\n' -x http://127.0.0.1:3128 http://denied.example/
    kill -TERM $supervisor
    wait $supervisor
""")


def test_supervisor_and_squid_run_with_only_the_task_volumes_writable(synth: Synth, tmp_path: Path) -> None:
    """The paths come from the synthesized task definition; the log goes to /dev/shm (its own tmpfs, as in a
    container), because everything else is read-only in there."""
    for tool in ("unshare", "setpriv", "squid", "curl", "ip"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"this test needs {tool} (CI installs it)")
    binary = _egress_proxy_bin()
    env_values = {e["Name"]: e["Value"] for e in _container(synth)["Environment"]}
    log = Path("/dev/shm") / f"egress-proxy-ro-root-{os.getpid()}.log"
    env = {**os.environ, "WRITABLE": " ".join(_writable_paths(synth).values()), "EGRESS_PROXY": str(binary),
           "LOG": str(log), "EGRESS_STATE_DIR": env_values["EGRESS_STATE_DIR"],
           "EGRESS_ALLOWED_DOMAINS": "example.com", "EGRESS_METRICS": "off", "EGRESS_PORT": "3128",
           "EGRESS_DRAIN_SECONDS": "1", "EGRESS_ALLOWED_PORTS": env_values["EGRESS_ALLOWED_PORTS"],
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        # A PID namespace too: whatever is left running when the script ends is killed with it.
        result = subprocess.run(["unshare", "--mount", "--net", "--pid", "--mount-proc", "--fork", "sh", "-c",
                                 RO_ROOT_SCRIPT.format(uid=PROXY_UID)],
                                env=env, capture_output=True, text=True, timeout=180)
        output = log.read_text() if log.exists() else ""
    finally:
        log.unlink(missing_ok=True)
    assert result.returncode == 0, (result.stderr, output[-3000:])
    assert result.stdout.strip() == "403"  # Squid answered (a denial) from the read-only root
    assert "Read-only file system" not in output, output[-3000:]
    assert '"decision":"denied"' in output


def test_egress_is_limited_to_the_proxy_ports_and_dns(synth: Synth) -> None:
    groups = synth.resources("AWS::EC2::SecurityGroup")
    (proxy_sg,) = [g for k, g in groups.items() if k.startswith("Proxies")]
    rules = sorted((r["IpProtocol"], r["FromPort"], r["ToPort"], r["CidrIp"])
                   for r in proxy_sg["Properties"]["SecurityGroupEgress"])
    assert rules == [("tcp", 80, 80, "0.0.0.0/0"), ("tcp", 443, 443, "0.0.0.0/0")]
    # DNS only to the DnsServers entries, each a rule of its own that exists only when that entry does; with
    # DnsServers empty the proxies use the VPC resolver, which security groups do not filter.
    proxy_sg_id = [k for k in groups if k.startswith("Proxies")][0]
    dns_rules = {k: r for k, r in synth.resources("AWS::EC2::SecurityGroupEgress").items()
                 if r["Properties"]["GroupId"] == {"Fn::GetAtt": [proxy_sg_id, "GroupId"]}}
    assert len(dns_rules) == 8
    padded = {"Fn::Split": [",", {"Fn::Join": ["", [{"Ref": "DnsServers"}, ",,,"]]}]}
    seen = set()
    for rule in dns_rules.values():
        props = rule["Properties"]
        index = int(rule["Condition"].removeprefix("HasDnsServer")) - 1
        assert (props["FromPort"], props["ToPort"]) == (53, 53) and props["IpProtocol"] in ("tcp", "udp")
        assert props["CidrIp"] == {"Fn::Join": ["", [{"Fn::Select": [index, padded]}, "/32"]]}
        assert synth.data["Conditions"][rule["Condition"]] == {
            "Fn::Not": [{"Fn::Equals": [{"Fn::Select": [index, padded]}, ""]}]}
        seen.add((index, props["IpProtocol"]))
    assert seen == {(i, p) for i in range(4) for p in ("tcp", "udp")}
    env = {e["Name"]: e["Value"] for e in _container(synth)["Environment"]}
    assert env["EGRESS_ALLOWED_PORTS"] == "http:80,connect:443"


def test_the_proxys_own_aws_calls_do_not_go_through_the_proxy(synth: Synth) -> None:
    env = {e["Name"]: e["Value"] for e in _container(synth)["Environment"]}
    assert not {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"} & set(env)
    # The region comes from the task, never from instance metadata (blocked for uid 13 on the instances).
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == {"Ref": "AWS::Region"}


# --- instance metadata, blocked for the proxy's uid on the EC2 instances ------------------------------------

def _imds_rule(ec2: Synth) -> str:
    from test_ec2_eip_pool import render_user_data
    script = render_user_data(ec2, Path("/nonexistent/ecs.config"))
    (line,) = [line for line in script.splitlines() if line.startswith("ExecStart=")]
    assert "Before=docker.service ecs.service" in script and "WantedBy=multi-user.target" in script
    return line.removeprefix("ExecStart=")


PROBE = textwrap.dedent("""\
    import socket, sys
    results = []
    for address in ("169.254.169.254", "169.254.170.2"):
        try:
            socket.create_connection((address, 80), timeout=5).close()
            results.append("open")
        except OSError as error:
            results.append(type(error).__name__)
    print(" ".join(results))
""")

NETNS_SCRIPT = textwrap.dedent("""\
    set -eu
    ip link set lo up
    ip addr add 169.254.169.254/32 dev lo
    ip addr add 169.254.170.2/32 dev lo
    {rule}
    "$PYTHON" -c 'import socket,threading,time
    servers = []
    for a in ("169.254.169.254", "169.254.170.2"):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((a, 80)); s.listen(16)
        servers.append(s)
    open("'"$READY"'", "w").close()
    time.sleep(60)' &
    listener=$!
    while [ ! -e "$READY" ]; do sleep 0.05; done
    echo "root: $("$PYTHON" -c "$PROBE")"
    echo "uid{uid}: $(setpriv --reuid {uid} --regid {uid} --clear-groups "$PYTHON" -c "$PROBE")"
    kill $listener
""")


def test_uid_13_cannot_reach_instance_metadata_but_can_reach_the_ecs_agent(ec2: Synth, tmp_path: Path) -> None:
    rule = _imds_rule(ec2)
    assert rule.split()[0] == "/usr/sbin/iptables"
    if not Path("/usr/sbin/iptables").exists():
        pytest.fail("this test needs iptables (infra/scripts/test installs it)")
    script = NETNS_SCRIPT.format(rule=rule, uid=PROXY_UID)
    env = {**os.environ, "PYTHON": sys.executable, "PROBE": PROBE, "READY": str(tmp_path / "ready")}
    result = subprocess.run(["unshare", "--net", "--pid", "--mount-proc", "--fork", "sh", "-c", script], env=env,
                            capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert lines["root"] == "open open"  # the ECS agent and everything else on the instance: unaffected
    assert lines[f"uid{PROXY_UID}"] == "ConnectionRefusedError open", result.stdout
    assert shlex.split(rule)[-2:] == ["-j", "REJECT"]


# --- private AWS endpoints ------------------------------------------------------------------------------

def test_vpc_endpoints_are_optional_and_private(synth: Synth) -> None:
    params = synth.data["Parameters"]
    assert params["EnableVpcEndpoints"]["Default"] == "false"
    assert params["EnableVpcEndpoints"]["AllowedValues"] == ["true", "false"]
    endpoints = synth.resources("AWS::EC2::VPCEndpoint")
    interface = {k: e for k, e in endpoints.items() if e["Properties"]["VpcEndpointType"] == "Interface"}
    services = sorted(json.dumps(e["Properties"]["ServiceName"]).split('".')[-1].rstrip('"]}')
                      for e in interface.values())
    assert services == ["ecr.api", "ecr.dkr", "logs", "monitoring", "secretsmanager"]
    for endpoint in interface.values():
        props = endpoint["Properties"]
        assert endpoint["Condition"] == "UseVpcEndpoints"
        assert props["PrivateDnsEnabled"] is True and props["SubnetIds"] == {"Ref": "PrivateSubnetIds"}
        (statement,) = props["PolicyDocument"]["Statement"]
        assert statement["Condition"] == {"StringEquals": {"aws:PrincipalAccount": {"Ref": "AWS::AccountId"}}}
    (s3,) = [e for e in endpoints.values() if e["Properties"]["VpcEndpointType"] == "Gateway"]
    assert s3["Condition"] == "UseS3GatewayEndpoint"
    assert s3["Properties"]["RouteTableIds"] == {"Ref": "VpcEndpointRouteTableIds"}
    buckets, layers = s3["Properties"]["PolicyDocument"]["Statement"]
    assert buckets["Condition"] == {"StringEquals": {"aws:ResourceAccount": {"Ref": "AWS::AccountId"}}}
    assert layers["Action"] == "s3:GetObject" and "starport-layer-bucket" in json.dumps(layers["Resource"])
    conditions = synth.data["Conditions"]
    assert conditions["UseVpcEndpoints"] == {"Fn::Equals": [{"Ref": "EnableVpcEndpoints"}, "true"]}
    assert conditions["UseS3GatewayEndpoint"]["Fn::And"][0] == {"Condition": "UseVpcEndpoints"}


def test_endpoint_security_group_admits_https_from_proxies_and_clients_only(synth: Synth) -> None:
    (group_id, group) = [(k, g) for k, g in synth.resources("AWS::EC2::SecurityGroup").items()
                         if k.startswith("VpcEndpoints")][0]
    assert group["Condition"] == "UseVpcEndpoints"
    ingress = group["Properties"]["SecurityGroupIngress"]
    assert all(r["FromPort"] == r["ToPort"] == 443 and r["IpProtocol"] == "tcp" for r in ingress)
    sources = sorted(json.dumps(r.get("CidrIp") or r.get("SourceSecurityGroupId")) for r in ingress)
    proxy_sg = [k for k in synth.resources("AWS::EC2::SecurityGroup") if k.startswith("Proxies")][0]
    assert sources == sorted([json.dumps({"Ref": "ClientCidr"}),
                              json.dumps({"Fn::GetAtt": [proxy_sg, "GroupId"]})])
    assert group_id


def test_default_allowlist_is_empty_and_says_why(synth: Synth) -> None:
    p = synth.data["Parameters"]["AllowedDomains"]
    assert p["Default"] == "" and "MinLength" not in p
    _, secret = synth.only("AWS::SecretsManager::Secret")
    assert secret["Properties"]["SecretString"] == {
        "Fn::If": ["AllowedDomainsIsEmpty", '{"allowed_domains": []}', {"Ref": "AllowedDomains"}]}
    assert synth.data["Conditions"]["AllowedDomainsIsEmpty"] == {
        "Fn::Equals": [{"Ref": "AllowedDomains"}, ""]}
    assert ".amazonaws.com" not in json.dumps(synth.data["Parameters"])


def test_export_command_bypasses_the_proxy_for_the_endpoints_when_they_exist(synth: Synth) -> None:
    parts = synth.data["Outputs"]["ProxyExportCommand"]["Value"]["Fn::Join"][1]
    conditional = [p for p in parts if isinstance(p, dict) and "Fn::If" in p]
    assert [c["Fn::If"][0] for c in conditional] == ["UseVpcEndpoints", "UseS3GatewayEndpoint"]
    assert all(c["Fn::If"][2] == "" for c in conditional)
    assert "secretsmanager." in json.dumps(conditional[0]) and ".dkr.ecr." in json.dumps(conditional[0])
    assert ".s3." in json.dumps(conditional[1])
