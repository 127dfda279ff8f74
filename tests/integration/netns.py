"""Network namespaces for the transparent-mode tests: anonymous, held by one ``sleep`` process each, so nothing is
named in /run/netns (a name there is shared by the whole host) and everything disappears with the processes.

A thread of this process can enter a namespace for a moment (setns is per thread for network namespaces): a
socket bound there stays there. That is how the origins and the DNS server of the harness serve from the
"internet" namespace while recording their requests in this process.
"""

from __future__ import annotations

import ctypes
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
