"""Network namespaces for the transparent-mode tests: anonymous, held by one ``sleep`` process each, so nothing is
named in /run/netns (a name there is shared by the whole host) and everything disappears with the processes.

A thread of this process can enter a namespace for a moment (setns is per thread for network namespaces): a
socket bound there stays there. That is how the origins and the DNS server of the harness serve from the
"internet" namespace while recording their requests in this process.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class Namespace:
    """One network namespace, with loopback up. ``run`` executes a command inside it; ``entered`` moves the
    calling thread into it for the duration of a ``with`` block."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo ready && exec sleep infinity"],
            stdout=subprocess.PIPE, text=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "ready":
            self._holder.kill()
            raise RuntimeError(f"namespace {name}: unshare --net failed (exit {self._holder.wait()})")
        self.pid = self._holder.pid
        self.path = f"/proc/{self.pid}/ns/net"

    def command(self, args: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 30,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(args), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(args)} exited {result.returncode}: "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    def sysctl(self, key: str, value: str) -> None:
        # /proc/sys/net is per network namespace, as seen by the process that opens it.
        self.run("sh", "-c", f"echo {value} > /proc/sys/{key.replace('.', '/')}")

    @contextmanager
    def entered(self) -> Iterator[None]:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
            os.close(own)

    def close(self) -> None:
        if self._holder.poll() is None:
            self._holder.kill()
        self._holder.wait()


def link(a: Namespace, a_name: str, a_address: str, b: Namespace, b_name: str, b_address: str) -> None:
    """A veth pair between two namespaces, each end up with its address (CIDR notation)."""
    a.run("ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", str(b.pid))
    a.run("ip", "addr", "add", a_address, "dev", a_name)
    a.run("ip", "link", "set", a_name, "up")
    b.run("ip", "addr", "add", b_address, "dev", b_name)
    b.run("ip", "link", "set", b_name, "up")


def nft_counter(namespace: Namespace, table: str, counter: str) -> int:
    """Packets counted so far by the named counter ``counter`` of ``table`` (family inet) in ``namespace``."""
    out = namespace.run("nft", "-j", "list", "counter", "inet", table, counter).stdout
    return int(next(item["counter"]["packets"] for item in json.loads(out)["nftables"] if "counter" in item))


def curl_in(namespace: Namespace, source: str, *args: str, timeout: float = 10) -> tuple[int, str, str]:
    """curl in ``namespace`` from the local address ``source``, with no proxy setting at all (none in its environment
    either; give --proxy to use one). Returns (exit code, stdout, stderr)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    result = namespace.run("curl", "-sS", "--interface", source, "--max-time", str(timeout), *args, check=False,
                           env=env, timeout=timeout + 10)
    return result.returncode, result.stdout, result.stderr


class RoutedTopology:
    """Three namespaces, dual-stack, as a VPC with the proxy instance as the private subnets' route::

        client ns                      router ns (the "EC2 instance")          internet ns
        10.200.1.0/24, fd00:c1::/64 -- 10.200.1.1, fd00:c1::1 | 198.51.100.1, -- 198.51.100.2, fd00:e0::2
        default routes -> router       fd00:e0::1; forwarding on (both)           its addresses on lo

    ``client_addresses`` go on the client's link (each in the client subnet of its family; at least one IPv4),
    ``internet_addresses``
    on the internet namespace's loopback (any address: the router routes everything else there). IPv6 addresses
    are added with ``nodad``, usable at once rather than after Duplicate Address Detection."""

    ROUTER_V4 = "10.200.1.1"
    ROUTER_V6 = "fd00:c1::1"

    def __init__(self, tag: str, client_addresses: Sequence[str], internet_addresses: Sequence[str]) -> None:
        self.namespaces: list[Namespace] = []
        self.client = self._namespace(f"{tag}-client")
        self.router = self._namespace(f"{tag}-router")
        self.internet = self._namespace(f"{tag}-internet")
        v4 = [address for address in client_addresses if ":" not in address]
        v6 = [address for address in client_addresses if ":" in address]
        # The first IPv4 address is the one the client's own sockets use when they bind to none.
        link(self.client, "c0", f"{v4[0]}/24", self.router, "r-clients", f"{self.ROUTER_V4}/24")
        link(self.router, "r-uplink", "198.51.100.1/24", self.internet, "i0", "198.51.100.2/24")
        _add_v6(self.router, f"{self.ROUTER_V6}/64", "r-clients")
        _add_v6(self.router, "fd00:e0::1/64", "r-uplink")
        _add_v6(self.internet, "fd00:e0::2/64", "i0")
        for address in v4[1:]:
            self.client.run("ip", "addr", "add", f"{address}/24", "dev", "c0")
        for address in v6:
            _add_v6(self.client, f"{address}/64", "c0")
        for address in internet_addresses:
            if ":" in address:
                _add_v6(self.internet, f"{address}/128", "lo")
            else:
                self.internet.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        self.client.run("ip", "route", "add", "default", "via", self.ROUTER_V4)
        if v6:
            self.client.run("ip", "-6", "route", "add", "default", "via", self.ROUTER_V6)
        for namespace, via_v4, via_v6 in ((self.router, "198.51.100.2", "fd00:e0::2"),
                                          (self.internet, "198.51.100.1", "fd00:e0::1")):
            namespace.run("ip", "route", "add", "default", "via", via_v4)
            namespace.run("ip", "-6", "route", "add", "default", "via", via_v6)
        self.router.sysctl("net.ipv4.ip_forward", "1")
        self.router.sysctl("net.ipv6.conf.all.forwarding", "1")

    def _namespace(self, name: str) -> Namespace:
        namespace = Namespace(name)
        self.namespaces.append(namespace)
        return namespace

    def close(self) -> None:
        for namespace in reversed(self.namespaces):
            namespace.close()

    def dropped(self) -> int:
        """Packets the transparent-mode ruleset dropped (its ``dropped`` counter)."""
        return nft_counter(self.router, "egress_proxy", "dropped")


def _add_v6(namespace: Namespace, address: str, device: str) -> None:
    namespace.run("ip", "-6", "addr", "add", address, "dev", device, "nodad")


@contextmanager
def serving(namespace: Namespace, servers: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Start the harness's servers (origins, DNS) with their sockets in ``namespace``; stop them on leaving."""
    with namespace.entered():
        for server in servers.values():
            server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()
