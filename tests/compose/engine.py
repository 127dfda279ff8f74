"""A throwaway Docker engine (Debian's docker.io) that lives only in a network namespace the test creates.

``DockerEngine.start()``:
* ``ip netns add egress-compose-<pid>`` with only loopback up: the engine's bridges, its containers and their
  published ports exist only there, and nothing the test sends can leave it;
* ``dockerd`` in that namespace and in a private mount namespace (``unshare --mount --propagation slave``), so
  its overlay, shm and netns mounts never show on the host and vanish with its last process. Its data root,
  exec root, pid file and socket are under the engine's temp dir. iptables, forwarding and masquerading are
  off (there is nothing to route to), and the cgroupfs driver is used (no systemd here);
* ``docker`` and ``docker compose`` talk to it through DOCKER_HOST and a DOCKER_CONFIG whose cli-plugins/
  holds the pinned Compose v2 plugin (tests/compose/requirements.txt).

``stop()`` always runs (the fixture's finally): SIGTERM to dockerd, which stops its containers; SIGKILL to any
process of ours still in the namespace; the namespace deleted; the temp dir removed; and it checks that no
mount under the temp dir is left on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DOCKERD_FLAGS = [
    "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
    "--exec-opt", "native.cgroupdriver=cgroupfs",
]
DOCKER_CLI = "/usr/bin/docker"  # Debian's docker.io client (a fresh CI machine has no other)
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class EngineError(RuntimeError):
    pass


class DockerEngine:
    def __init__(self, root: Path, compose_plugin: Path) -> None:
        self.root = root
        self.netns = f"egress-compose-{os.getpid()}"
        self.socket = root / "docker.sock"
        self.config_dir = root / "docker-config"
        self.log_path = root / "dockerd.log"
        self.compose_plugin = compose_plugin
        self.process: subprocess.Popen[bytes] | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        for tool in ("dockerd", "containerd", "runc", "docker-proxy", "nsenter", "unshare", "ip"):
            if not shutil.which(tool, path=SYSTEM_PATH):
                raise EngineError(f"{tool} is missing: apt-get install docker.io iproute2 util-linux")
        plugins = self.config_dir / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(self.compose_plugin)
        _check(["ip", "netns", "add", self.netns])
        _check(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "slave",
                 "dockerd", *DOCKERD_FLAGS,
                 "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                 "--pidfile", str(self.root / "dockerd.pid"), "--host", f"unix://{self.socket}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={"PATH": SYSTEM_PATH},
            )
        deadline = time.monotonic() + timeout
        while True:  # poll the API until it answers (or dockerd has exited)
            if self.process.poll() is not None:
                raise EngineError(f"dockerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.run(["version"], check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise EngineError(f"dockerd did not answer within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop dockerd and everything it started, delete the namespace, remove the temp dir. Idempotent."""
        problems: list[str] = []
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # dockerd stops its containers, then exits
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                problems.append("dockerd ignored SIGTERM for 60 s")
        for pid in self.namespace_pids():  # only processes inside our own namespace: ours
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.wait(timeout=30)
        if Path(f"/run/netns/{self.netns}").exists():
            result = subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"ip netns delete {self.netns}: {result.stderr.strip()}")
        left = self.host_mounts()
        if left:
            problems.append(f"mounts left on the host: {left}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        if problems:
            raise EngineError("; ".join(problems))

    def namespace_pids(self) -> list[int]:
        if not Path(f"/run/netns/{self.netns}").exists():
            return []
        result = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def host_mounts(self) -> list[str]:
        """Mount points under the engine's temp dir that the host's mount namespace can see."""
        root = str(self.root)
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return [p for p in points if p == root or p.startswith(root + "/")]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dockerd log)"

    # --- clients --------------------------------------------------------------------------------------------

    def env(self, extra: Mapping[str, str] | None = None, path_prefix: Sequence[Path] = ()) -> dict[str, str]:
        """The environment of a shell talking to this engine: Debian's docker client first on PATH."""
        path = ":".join([*(str(p) for p in path_prefix), SYSTEM_PATH])
        return {"PATH": path, "HOME": str(self.root), "DOCKER_HOST": f"unix://{self.socket}",
                "DOCKER_CONFIG": str(self.config_dir), "LANG": "C.UTF-8", **(extra or {})}

    def run(self, args: Sequence[str], check: bool = True, timeout: float = 300,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` against this engine (no network access needed: it talks over the socket)."""
        result = subprocess.run([DOCKER_CLI, *args], env=self.env(), capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise EngineError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stdout}"
                              f"{result.stderr}")
        return result

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.run(["inspect", container]).stdout)
        return data[0]

    def load(self, archive: Path) -> str:
        with open(archive, "rb") as stream:
            result = subprocess.run([DOCKER_CLI, "load"], stdin=stream, env=self.env(), capture_output=True,
                                    text=True, timeout=600)
        if result.returncode != 0:
            raise EngineError(f"docker load {archive} failed:\n{result.stderr}")
        return result.stdout

    def shell(self, command: str, cwd: Path, env: Mapping[str, str],
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``sh -c COMMAND`` inside the engine's network namespace: localhost:3128 is the published proxy port."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", "sh", "-c", command], cwd=cwd,
                              env=dict(env), capture_output=True, text=True, timeout=timeout)

    def popen(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> subprocess.Popen[str]:
        """A long-running command inside the namespace (e.g. `docker compose logs --follow`)."""
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns}", *argv], cwd=cwd, env=dict(env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def _check(argv: Sequence[str]) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise EngineError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
