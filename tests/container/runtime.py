"""Run the built egress-proxy image and read its JSON log: with buildah (no Docker engine) or the Docker SDK.

Both runtimes share one interface, so tests/container/test_image.py holds one set of assertions:

* ``image_config()``: the image's Entrypoint, User, StopSignal, Healthcheck, ExposedPorts, Env;
* ``start(env, mounts)``: run the image's own ENTRYPOINT with extra environment and read-only bind mounts,
  on the host network (every address the tests use is on 127.0.0.0/8);
* ``exec(argv)``: run a command in the same container (same rootfs, same state dir, image user);
* ``processes()``: ``(pid, command name, real uid, effective uid)`` of everything running in the container;
* ``stop()``: the image's STOPSIGNAL to PID 1 (tini), which forwards it to the supervisor; returns its exit code;
* ``wait_for`` / ``access`` / ``mark``: the JSON log lines (tests/integration/log_reader.py, shared with ProxyRunner).

buildah: ``buildah from`` + ``buildah run --isolation chroot`` (no PID or network namespace: the processes are
host processes, found as descendants of the ``buildah run`` process). Docker (used when
EGRESS_CONTAINER_RUNTIME=docker): ``network_mode=host``, as the tests need the host's loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from log_reader import LogReader  # tests/integration, on sys.path via conftest

Mount = tuple[Path, str]  # (host path, path in the container), always read-only


def _run(argv: Sequence[str], timeout: float = 120) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(root: int) -> list[int]:
    tree = _children()
    found: list[int] = []
    todo = list(tree.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def _proc_info(pid: int) -> tuple[str, int, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    real, effective = (int(v) for v in fields["Uid"].split()[:2])
    return fields["Name"].strip(), real, effective


class BuildahContainer(LogReader):
    default_timeout = 15.0  # the image starts slower than a local process
    """The image run with ``buildah run --isolation chroot``: its entrypoint on the host network."""

    def __init__(self, image: str) -> None:
        super().__init__()
        self.image = image
        self.name = f"egress-proxy-test-{uuid.uuid4().hex[:8]}"
        _run(["buildah", "from", "--pull=never", "--name", self.name, image])
        self._env: dict[str, str] = {}
        self._mounts: list[Mount] = []
        self._entrypoint: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.exit_code: int | None = None

    def image_config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(_run(["podman", "image", "inspect", "--format", "{{json .Config}}",
                                                  self.image]))
        # podman shows the docker-format healthcheck beside .Config.
        health = _run(["podman", "image", "inspect", "--format", "{{json .HealthCheck}}", self.image]).strip()
        config["Healthcheck"] = json.loads(health) if health and health != "null" else None
        return config

    def _run_args(self, env: Mapping[str, str], mounts: Sequence[Mount]) -> list[str]:
        args = ["buildah", "run", "--isolation", "chroot"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        for host, target in mounts:
            args += ["-v", f"{host}:{target}:ro"]
        return args

    def start(self, env: Mapping[str, str], mounts: Sequence[Mount] = ()) -> None:
        entrypoint = self._entrypoint = list(self.image_config()["Entrypoint"])
        # Under chroot isolation tini is not PID 1 (no PID namespace): as a registered subreaper it still
        # reaps orphans and does not warn. Under Docker/ECS it is PID 1 and this variable changes nothing.
        self._env = {"TINI_SUBREAPER": "1", **env}
        self._mounts = list(mounts)
        self.process = subprocess.Popen(
            [*self._run_args(self._env, self._mounts), self.name, "--", *entrypoint],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process and self.process.stdout
        for line in self.process.stdout:
            self.feed(line)

    def exec(self, argv: Sequence[str], timeout: float = 60, env: Mapping[str, str] | None = None,
             mounts: Sequence[Mount] | None = None) -> tuple[int, str]:
        """Run argv in the container; env and mounts default to those the entrypoint was started with."""
        result = subprocess.run(
            [*self._run_args(self._env if env is None else env, self._mounts if mounts is None else mounts),
             self.name, "--", *argv],
            capture_output=True, text=True, timeout=timeout,
        )
        return result.returncode, result.stdout + result.stderr

    def processes(self) -> list[tuple[int, str, int, int]]:
        """The entrypoint's first process (what is PID 1 under Docker) and everything below it.

        buildah's own helpers between ``buildah run`` and the entrypoint are not part of the image's process tree.
        """
        assert self.process
        first = Path(self._entrypoint[0]).name[:15]  # /proc/PID/status Name is at most 15 characters
        tree = _descendants(self.process.pid)
        roots = [pid for pid in tree if (_proc_info(pid) or ("",))[0] == first]
        if not roots:
            return []
        found = []
        for pid in [roots[0], *_descendants(roots[0])]:
            info = _proc_info(pid)
            if info is not None:
                found.append((pid, *info))
        return found

    def stop(self, timeout: float = 60) -> int:
        """STOPSIGNAL to the entrypoint's first process, as `docker stop` would send it to PID 1."""
        if self.process is None:
            return -1
        if self.process.poll() is None:
            stop_signal = signal.Signals[self.image_config().get("StopSignal") or "SIGTERM"]
            for pid, *_ in self.processes()[:1]:
                os.kill(pid, stop_signal)
        try:
            self.exit_code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.exit_code = self.process.wait()
        return self.exit_code

    def kill(self) -> None:
        """Last resort: SIGKILL everything this container started (our own process tree only)."""
        if self.process is None:
            return
        for pid in reversed(_descendants(self.process.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
            self.process.wait(timeout=30)
        subprocess.run(["buildah", "rm", self.name], capture_output=True, timeout=120)


class DockerContainer(LogReader):
    default_timeout = 15.0
    """The same with a Docker engine, through the docker SDK (``pip install docker``), on the host network."""

    def __init__(self, image: str) -> None:
        super().__init__()
        import docker  # type: ignore[import-not-found]  # only where a Docker engine is used

        self.client = docker.from_env()
        self.image = image
        self.container: Any = None
        self._env: dict[str, str] = {}
        self.exit_code: int | None = None

    def image_config(self) -> dict[str, Any]:
        config: dict[str, Any] = dict(self.client.images.get(self.image).attrs["Config"])
        return config

    def start(self, env: Mapping[str, str], mounts: Sequence[Mount] = ()) -> None:
        self._env = dict(env)
        self.container = self.client.containers.run(
            self.image, detach=True, network_mode="host", environment=self._env,
            volumes={str(host): {"bind": target, "mode": "ro"} for host, target in mounts},
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        buffer = b""
        for chunk in self.container.logs(stream=True, follow=True):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self.feed(line.decode("utf-8", "replace"))

    def exec(self, argv: Sequence[str], timeout: float = 60, env: Mapping[str, str] | None = None,
             mounts: Sequence[Mount] | None = None) -> tuple[int, str]:
        if self.container is None:  # nothing running yet: a one-shot container, as compose runs one
            output = self.client.containers.run(
                self.image, entrypoint=list(argv), network_mode="host", environment=dict(env or {}),
                volumes={str(h): {"bind": t, "mode": "ro"} for h, t in mounts or ()}, remove=True,
                stdout=True, stderr=True,
            )
            return 0, output.decode("utf-8", "replace")
        code, output = self.container.exec_run(list(argv), environment=self._env if env is None else dict(env))
        return int(code), output.decode("utf-8", "replace")

    def processes(self) -> list[tuple[int, str, int, int]]:
        top = self.container.top(ps_args="-eo pid,comm,ruid,euid")
        return [(int(p[0]), p[1], int(p[2]), int(p[3])) for p in top["Processes"]]

    def stop(self, timeout: float = 60) -> int:
        self.container.stop(timeout=int(timeout))
        self.exit_code = int(self.container.wait(timeout=timeout)["StatusCode"])
        return self.exit_code

    def remove(self) -> None:
        if self.container is not None:
            self.container.remove(force=True)


Container = BuildahContainer | DockerContainer


def make_container(image: str) -> Container:
    if os.environ.get("EGRESS_CONTAINER_RUNTIME", "buildah") == "docker":
        return DockerContainer(image)
    return BuildahContainer(image)
