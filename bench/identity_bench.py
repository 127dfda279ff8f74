"""Inputs for bench.py's ``identity`` section: a moto_server holding the ENIs (EC2 via AWS_ENDPOINT_URL, as the
integration tests use it), their security group, and a churn of ENIs joining and leaving it at a fixed rate."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SUBNET = "127.0.64.0/22"  # the identities' addresses (1,022 usable)
CLIENT = "127.0.64.5"  # the measured client: an ENI in the group, and inside the CIDR policy's range


class Moto:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> Moto:
        venv_bin = Path(os.environ.get("EGRESS_VENV", sys.prefix)) / "bin"
        self.process = subprocess.Popen([str(venv_bin / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def ec2(self) -> Any:
        import boto3

        return boto3.client("ec2", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id="bench", aws_secret_access_key="bench")


class Identities:
    """``count`` ENIs in one security group (the measured client's among them), and a churn thread."""

    def __init__(self, moto: Moto, count: int) -> None:
        self.ec2 = moto.ec2()
        vpc = self.ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET)["Subnet"]["SubnetId"]
        self.group = self.ec2.create_security_group(GroupName="bench", Description="bench", VpcId=vpc)["GroupId"]
        hosts = [str(a) for a in ipaddress.ip_network(SUBNET).hosts() if str(a) != CLIENT][4:]  # AWS reserves 4
        self.free = hosts[count - 1:]
        self.enis: dict[str, str] = {CLIENT: self.create(CLIENT)}
        for address in hosts[:count - 1]:
            self.enis[address] = self.create(address)
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def create(self, address: str) -> str:
        eni = self.ec2.create_network_interface(SubnetId=self.subnet, PrivateIpAddress=address, Groups=[self.group])
        return str(eni["NetworkInterface"]["NetworkInterfaceId"])

    def describe_seconds(self) -> float:
        """One poll's EC2 call, as the proxy makes it (every ENI of the group, paginated)."""
        started = time.monotonic()
        for _ in self.ec2.get_paginator("describe_network_interfaces").paginate(
                Filters=[{"Name": "group-id", "Values": [self.group]}]):
            pass
        return time.monotonic() - started

    def churn(self, per_second: int) -> None:
        """Each second: ``per_second`` ENIs leave (deleted) and as many join (created), never the client's."""
        def run() -> None:
            tick = time.monotonic()
            while not self._stop.is_set():
                for _ in range(per_second):
                    leaving = next(a for a in self.enis if a != CLIENT)
                    self.ec2.delete_network_interface(NetworkInterfaceId=self.enis.pop(leaving))
                    joining = self.free.pop(0)
                    self.enis[joining] = self.create(joining)
                    self.free.append(leaving)
                    self.changes += 2
                tick += 1
                self._stop.wait(max(0.0, tick - time.monotonic()))
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop_churn(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
