"""Run the real supervisor (``egress-proxy run``) as a subprocess and read its JSON log lines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness import wait_for_port, write_allowlist
from log_reader import LogReader
from netns import Namespace, RoutedTopology


def egress_proxy_command() -> list[str]:
    found = shutil.which("egress-proxy", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "egress_proxy.cli"]


class ProxyRunner(LogReader):
    def __init__(self, state_dir: Path, env: Mapping[str, str], host: str = "127.0.0.1", port: int = 3128,
                 args: list[str] | None = None) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EGRESS_") and "proxy" not in k.lower()},
            "EGRESS_STATE_DIR": str(state_dir),
            "EGRESS_LISTEN_ADDRESS": host,
            "EGRESS_PORT": str(port),
            "EGRESS_METRICS": "off",
            "EGRESS_DRAIN_SECONDS": "1",
            **env,
        }
        super().__init__()
        self.args = args or []
        self.process: subprocess.Popen[str] | None = None
        self.exit_code: int | None = None
        self.reading = threading.Event()  # clear it to stop reading stdout: the proxy's log sink stalls
        self.reading.set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def proxies(self) -> dict[str, str]:
        return {"http": self.proxy_url, "https": self.proxy_url}

    def command(self) -> list[str]:
        """The command line of the proxy (a subclass may wrap it, e.g. to run it in another network namespace)."""
        return [*egress_proxy_command(), "run", *self.args]

    def wait_until_listening(self) -> None:
        wait_for_port(self.host, self.port)

    def start(self, wait: bool = True) -> ProxyRunner:
        self.process = subprocess.Popen(
            self.command(), env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_for(lambda r: r.get("event") in {"started", "startup_failed"}, timeout=60)
            started = [r for r in self.records if r.get("event") == "started"]
            if not started:
                raise RuntimeError("proxy failed to start:\n" + "\n".join(self.raw_lines[-30:]))
            self.wait_until_listening()
        return self

    def _read(self) -> None:
        assert self.process and self.process.stdout
        while True:
            self.reading.wait()
            line = self.process.stdout.readline()
            if not line:
                return
            self.feed(line)

    def squid_starts(self) -> dict[str, int]:
        """How often each Squid process (kid1, kid2, ... in SMP mode) logged its start. All 1 = never restarted."""
        counts: dict[str, int] = {}
        with self._changed:
            for record in self.records:
                message = record.get("message", "") if record.get("type") == "cache_log" else ""
                if "Starting Squid Cache" in message:
                    match = re.search(r"\b(kid\d+)\|", message)
                    process = match.group(1) if match else "squid"
                    counts[process] = counts.get(process, 0) + 1
        return counts

    def stop_and_check_no_restart(self) -> None:
        """Stop; assert a clean exit and that no Squid process restarted (reloads must reconfigure, never restart)."""
        code = self.stop()
        assert code == 0, "\n".join(self.raw_lines[-30:])
        starts = self.squid_starts()
        if not starts or set(starts.values()) != {1}:
            cache_log = [r.get("message", "") for r in self.records if r.get("type") == "cache_log"]
            raise AssertionError(f"Squid was restarted: {starts}; its log:\n" + "\n".join(cache_log[-80:]))

    def signal(self, signum: int) -> None:
        assert self.process
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return -1
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exit_code = self.process.wait()
        return self.exit_code

    def __enter__(self) -> ProxyRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NamespacedProxy(ProxyRunner):
    """The real supervisor, run inside a network namespace (the transparent-mode tests' router, the "EC2
    instance"). ``host`` is an address of that namespace: where its explicit port is awaited (the ruleset drops
    direct dials of the intercept ports)."""

    def __init__(self, namespace: Namespace, *args: Any, **kwargs: Any) -> None:
        self.namespace = namespace
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        return self.namespace.command(super().command())

    def wait_until_listening(self) -> None:
        with self.namespace.entered():
            wait_for_port(self.host, self.port)

    def apply_nft_rules(self) -> str:
        """``egress-proxy nft-rules | nft -f -`` in the namespace, with this proxy's settings; returns the ruleset."""
        rules = subprocess.run([*egress_proxy_command(), "nft-rules"], env=self.env, capture_output=True, text=True,
                               check=True).stdout
        self.namespace.run("nft", "-f", "-", input=rules)
        return rules


@contextmanager
def running_transparent_proxy(router: Namespace, state_dir: Path, policy_file: Path, document: Mapping[str, Any],
                              env: Mapping[str, str]) -> Iterator[NamespacedProxy]:
    """The real supervisor in transparent mode in ``router`` (a netns.RoutedTopology's), its policy ``document`` in
    ``policy_file`` (rewrite the file to reload), the host's ruleset applied; stopped on leaving. Its explicit port
    is 3128 on the router's client-side IPv4 address; ``env`` adds settings (the client ranges, the DNS server)."""
    write_allowlist(policy_file, json.dumps(document))
    runner = NamespacedProxy(router, state_dir, {"EGRESS_ALLOWLIST_FILE": str(policy_file),
                                                 "EGRESS_LISTEN_ADDRESS": "0.0.0.0", "EGRESS_TRANSPARENT": "on",
                                                 **env}, host=RoutedTopology.ROUTER_V4, port=3128)
    runner.apply_nft_rules()
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
