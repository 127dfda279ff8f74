"""Fixtures for the integration suite: real Squid under the real supervisor, local DNS and origins on loopback.

Name plan (all answered by the local DNS server on 127.0.0.1:53, which the proxy uses via EGRESS_DNS_SERVERS):
  allowed.test, *.wild.test, wild.test, evilallowed.test, allowed.test.evil.test, denied.test -> 127.0.0.2
  internal.test (allowlisted)  -> 127.0.0.3   not exempt: the SSRF guard must refuse it
  metadata.test (allowlisted)  -> 169.254.169.254
  raw.test (allowlisted)       -> 127.0.0.4   a non-TLS service on port 443
The proxy exempts only 127.0.0.2/32 and 127.0.0.4/32 from the private-destination deny.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DnsServer, HttpOrigin, RawTcpServer, TestCA, TlsOrigin
from netns import Namespace
from proxy_runner import ProxyRunner

ORIGIN_IP = "127.0.0.2"
INTERNAL_IP = "127.0.0.3"
RAW_IP = "127.0.0.4"
RAW_PORT = 443
PROXY_PORT = 3128
REPO = Path(__file__).resolve().parents[2]

ALLOWLIST = """\
# integration-test allowlist
allowed.test
.wild.test
internal.test
metadata.test
raw.test
"""


def _isolated_network() -> bool:
    """True inside a network namespace that has only the loopback interface (scripts/test runs us in one)."""
    import socket

    return [name for _, name in socket.if_nameindex()] == ["lo"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("squid") is None:
        skip = pytest.mark.skip(reason="squid is not installed (scripts/test installs squid-openssl)")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def isolated_network() -> bool:
    return _isolated_network()


@pytest.fixture(scope="session", autouse=True)
def compiled_sni_helper() -> None:
    """Every proxy these tests start runs the compiled SNI helper built from this checkout's sni_helper.c (the
    rendered config names it when the package has it): built here too, so that a pytest run without scripts/test
    never tests a stale binary or silently falls back to the Python helper."""
    import egress_proxy

    output = Path(egress_proxy.__file__).parent / "compiled" / "sni_helper"
    result = subprocess.run([str(REPO / "scripts" / "build-sni-helper"), str(output)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"scripts/build-sni-helper failed:\n{result.stderr}"


@pytest.fixture(scope="session")
def public_tmp() -> Iterator[Path]:
    """A temp dir Squid's unprivileged worker can traverse (pytest's own tmp dirs are mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="egress-proxy-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(
        {
            "allowed.test": [ORIGIN_IP],
            "wild.test": [ORIGIN_IP],
            "evilallowed.test": [ORIGIN_IP],
            "allowed.test.evil.test": [ORIGIN_IP],
            "denied.test": [ORIGIN_IP],
            "raw.test": [RAW_IP],
            "internal.test": [INTERNAL_IP],
            "metadata.test": ["169.254.169.254"],
        },
        host="127.0.0.1",
        port=53,
    )
    server.set_wildcard("wild.test", [ORIGIN_IP])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http_origin() -> Iterator[HttpOrigin]:
    with HttpOrigin(ORIGIN_IP, 80, name="http-origin") as origin:
        yield origin


@pytest.fixture(scope="session")
def tls_origin(ca: TestCA) -> Iterator[TlsOrigin]:
    names = ["allowed.test", "wild.test", "*.wild.test", "denied.test", "evilallowed.test"]
    with TlsOrigin(ORIGIN_IP, 443, ca, names, name="tls-origin") as origin:
        yield origin


@pytest.fixture(scope="session")
def internal_origin() -> Iterator[HttpOrigin]:
    """An origin on a loopback address the proxy must NOT reach (it is not in EGRESS_ALLOW_DESTINATIONS)."""
    with HttpOrigin(INTERNAL_IP, 80, name="internal-origin") as origin:
        yield origin


@pytest.fixture(scope="session")
def raw_server() -> Iterator[RawTcpServer]:
    """A non-TLS TCP service on an exempt address, port 443: it only ever sees bytes if the proxy tunnels a
    non-TLS stream."""
    with RawTcpServer(RAW_IP, RAW_PORT, banner=b"SSH-2.0-not-tls\r\n") as server:
        yield server


@pytest.fixture(scope="session")
def proxy(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin,
          tls_origin: TlsOrigin, internal_origin: HttpOrigin, raw_server: RawTcpServer) -> Iterator[ProxyRunner]:
    state = public_tmp / "state"
    allowlist = public_tmp / "allowlist.txt"
    allowlist.write_text(ALLOWLIST)
    runner = ProxyRunner(
        state,
        {
            "EGRESS_ALLOWLIST_FILE": str(allowlist),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32,{RAW_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
        },
        port=PROXY_PORT,
    )
    runner.start()
    yield runner
    runner.stop()


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Real curl, never reading proxy settings from the environment."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args], capture_output=True, text=True,
                          env=env, timeout=timeout + 5)


@pytest.fixture(scope="session")
def state_dir(proxy: ProxyRunner) -> Path:
    return proxy.state_dir


class MotoServer:
    """A real moto_server process on loopback: Secrets Manager and CloudWatch for boto3 via AWS_ENDPOINT_URL.
    ``stop()``/``start()`` simulate an outage; the port stays the same so clients recover by themselves.
    With ``namespace``, it serves on that network namespace's loopback (the transparent-mode tests' router, where
    the proxy runs): make the test's own calls inside ``namespace.entered()``."""

    def __init__(self, port: int, namespace: Namespace | None = None) -> None:
        self.port = port
        self.namespace = namespace
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        import sys

        from harness import wait_for_port

        command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        if self.namespace:
            command = self.namespace.command(command)
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with self.namespace.entered() if self.namespace else contextlib.nullcontext():
            wait_for_port("127.0.0.1", self.port, timeout=30)

    def stop(self) -> None:
        """Gone at once, as in an outage. SIGKILL: moto_server's SIGTERM handler exits through Python, which then
        waits for its request threads, and those serve the proxy's pooled keep-alive connections; under load that
        outlasted a 10 s wait (test_an_aws_outage_keeps_the_last_known_membership failed so once at load 16)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


class MotoVpc:
    """A VPC with one subnet in a moto_server: security groups and ENIs, for the clients named by AWS identity."""

    def __init__(self, moto: MotoServer, cidr: str, subnet_cidr: str, subnet_ipv6_cidr: str | None = None) -> None:
        self.moto = moto
        self.ec2 = moto.client("ec2")
        ipv6 = {"AmazonProvidedIpv6CidrBlock": True} if subnet_ipv6_cidr else {}
        self.vpc = self.ec2.create_vpc(CidrBlock=cidr, **ipv6)["Vpc"]["VpcId"]
        subnet_ipv6 = {"Ipv6CidrBlock": subnet_ipv6_cidr} if subnet_ipv6_cidr else {}
        self.subnet = self.ec2.create_subnet(VpcId=self.vpc, CidrBlock=subnet_cidr, **subnet_ipv6)["Subnet"]["SubnetId"]

    def group(self, name: str) -> str:
        return str(self.ec2.create_security_group(GroupName=name, Description=name, VpcId=self.vpc)["GroupId"])

    def eni(self, address: str, group: str, tags: dict[str, str] | None = None, ipv6: str | None = None) -> str:
        """An ENI with the private IPv4 ``address`` (and the IPv6 address ``ipv6``) in the security group ``group``."""
        spec = [{"ResourceType": "network-interface", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}] \
            if tags else []
        extra = {"Ipv6Addresses": [{"Ipv6Address": ipv6}]} if ipv6 else {}
        eni = self.ec2.create_network_interface(SubnetId=self.subnet, PrivateIpAddress=address, Groups=[group],
                                                TagSpecifications=spec, **extra)["NetworkInterface"]
        return str(eni["NetworkInterfaceId"])


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    from harness import free_port

    server = MotoServer(free_port())
    server.start()
    yield server
    server.stop()
