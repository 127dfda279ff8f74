"""The supervisor's loop with the real process: signals while a Secrets Manager call hangs, SIGHUP, a drain that
loses no access line, Squid dying with its supervisor, and startup errors with their documented codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ORIGIN_IP, MotoServer
from harness import (
    DnsServer,
    HttpOrigin,
    RawTcpServer,
    TestCA,
    TlsOrigin,
    connect_tunnel,
    http_get_over,
    tls_over_tunnel,
)
from proxy_runner import ProxyRunner, egress_proxy_command

BASE_ENV = {"EGRESS_DNS_SERVERS": "127.0.0.1", "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32"}
# botocore's read timeout in the secret source: a loop that waited for a hung call would take at least this long.
SECRET_READ_TIMEOUT = 5.0


def _state(public_tmp: Path, name: str) -> Path:
    path = public_tmp / name
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def _aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class SwitchableForwarder:
    """A TCP forwarder to moto_server that can be told to go silent: from then on it accepts connections and
    swallows what it receives, never answering (an AWS endpoint that hangs)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = threading.Event()
        self.swallowed = threading.Event()  # set once a request arrived while silent
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None if self.silent.is_set() else socket.create_connection(("127.0.0.1", self.target_port))
        if upstream is not None:
            self._sockets.append(upstream)
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket | None, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.silent.is_set():
                    self.swallowed.set()
                    continue
                if sink is not None:
                    sink.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture()
def forwarder(moto: MotoServer) -> Iterator[SwitchableForwarder]:
    forwarder = SwitchableForwarder(moto.port)
    yield forwarder
    forwarder.close()


def test_sigterm_while_the_first_secrets_manager_call_hangs(public_tmp: Path) -> None:
    with RawTcpServer("127.0.0.1", 0) as silent:  # accepts, never answers
        env = {**BASE_ENV, "EGRESS_ALLOWLIST_SECRET": "egress/allowlist",
               **_aws_env(f"http://127.0.0.1:{silent.port}")}
        runner = ProxyRunner(_state(public_tmp, "hang-startup"), env, port=3170)
        runner.start(wait=False)
        silent.wait_for_connection(timeout=30)  # the call is out, and will not be answered
        sent = time.monotonic()
        runner.signal(signal.SIGTERM)
        assert runner.process is not None
        code = runner.process.wait(timeout=SECRET_READ_TIMEOUT)
        elapsed = time.monotonic() - sent
        assert code == 0, runner.tail()
        stopped = runner.wait_for(lambda r: r.get("event") == "stopped")
        assert "before Squid started" in stopped["message"]
        print(f"SIGTERM during a hung startup call: exited after {elapsed:.2f} s")


def test_sigterm_while_a_running_poll_hangs(public_tmp: Path, moto: MotoServer, dns: DnsServer,
                                            forwarder: SwitchableForwarder) -> None:
    secrets = moto.client("secretsmanager")
    secrets.create_secret(Name="egress/hang-running", SecretString="allowed.test")
    env = {**BASE_ENV, "EGRESS_ALLOWLIST_SECRET": "egress/hang-running", "EGRESS_RELOAD_INTERVAL": "0.5",
           **_aws_env(f"http://127.0.0.1:{forwarder.port}")}
    runner = ProxyRunner(_state(public_tmp, "hang-running"), env, port=3171)
    runner.start()
    forwarder.silent.set()
    assert forwarder.swallowed.wait(timeout=30), "the supervisor never polled the silent endpoint"
    mark = runner.mark()
    sent = time.monotonic()
    runner.signal(signal.SIGTERM)
    runner.wait_for(lambda r: r.get("event") == "stopping", start=mark, timeout=SECRET_READ_TIMEOUT)
    acted = time.monotonic() - sent
    assert runner.process is not None and runner.process.wait(timeout=30) == 0, runner.tail()
    print(f"SIGTERM while a poll hung: 'stopping' logged after {acted:.2f} s")


def test_sighup_polls_the_secret_now(public_tmp: Path, moto: MotoServer, dns: DnsServer) -> None:
    secrets = moto.client("secretsmanager")
    secrets.create_secret(Name="egress/hup", SecretString="allowed.test")
    env = {**BASE_ENV, "EGRESS_ALLOWLIST_SECRET": "egress/hup", "EGRESS_RELOAD_INTERVAL": "3600",
           **moto.env}
    runner = ProxyRunner(_state(public_tmp, "hup"), env, port=3172)
    runner.start()
    try:
        version = secrets.put_secret_value(SecretId="egress/hup", SecretString="allowed.test,.wild.test")["VersionId"]
        mark = runner.mark()
        runner.signal(signal.SIGHUP)
        runner.wait_for(lambda r: r.get("event") == "hup", start=mark)
        reloaded = runner.wait_for(lambda r: r.get("event") == "reloaded", start=mark, timeout=30)
        assert reloaded["version"] == version and reloaded["confirmed"] is True
        assert runner.process is not None and runner.process.poll() is None  # SIGHUP does not end us
    finally:
        runner.stop_and_check_no_restart()


def test_a_tunnel_closing_during_the_drain_is_logged(public_tmp: Path, dns: DnsServer, tls_origin: TlsOrigin,
                                                     ca: TestCA) -> None:
    runner = ProxyRunner(_state(public_tmp, "drain-log"), {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test",
                                                           "EGRESS_DRAIN_SECONDS": "20"}, port=3173)
    runner.start()
    sock, status, _ = connect_tunnel((runner.host, runner.port), "allowed.test", 443)
    assert status == 200
    client_port = sock.getsockname()[1]
    tls = tls_over_tunnel(sock, "allowed.test", ca.ca_path)
    assert http_get_over(tls, "allowed.test", "/before")[0] == 200
    runner.signal(signal.SIGTERM)
    runner.wait_for(lambda r: r.get("event") == "stopping")
    assert http_get_over(tls, "allowed.test", "/during-drain")[0] == 200
    tls.close()  # the last tunnel closes: Squid logs it and exits before the drain time is up
    assert runner.process is not None and runner.process.wait(timeout=30) == 0
    line = runner.access(client_port=client_port, method="CONNECT")
    assert line["host"] == "allowed.test" and line["bytes_out"] > 0
    # The access line came before the supervisor's last words: the relays were drained, then it stopped.
    assert runner.records.index(line) < runner.records.index(runner.events("stopped")[0])


def _one_request(host: str, port: int) -> tuple[int, int]:
    """A plain GET through the proxy on its own connection: (client port, status or 0)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        client_port = sock.getsockname()[1]
        try:
            sock.sendall(b"GET http://allowed.test/load HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
            head = sock.recv(65536)
        except OSError:
            return client_port, 0
        parts = head.split(b" ", 2)
        return client_port, int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def test_sigterm_under_load_loses_no_access_line(public_tmp: Path, dns: DnsServer, http_origin: HttpOrigin) -> None:
    runner = ProxyRunner(_state(public_tmp, "load-stop"), {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test"},
                         port=3174)
    runner.start()
    answered: list[int] = []
    stop = threading.Event()
    enough = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                port, status = _one_request(runner.host, runner.port)
            except OSError:
                return  # the proxy stopped accepting
            if status == 200:
                answered.append(port)
                if len(answered) >= 50:
                    enough.set()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(timeout=60), runner.tail()
    runner.signal(signal.SIGTERM)
    assert runner.process is not None and runner.process.wait(timeout=30) == 0
    stop.set()
    for thread in threads:
        thread.join()
    runner.wait_for(lambda r: r.get("event") == "stopped")
    logged = {r.get("client_port") for r in runner.records if r.get("type") == "access"}
    missing = [port for port in answered if port not in logged]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no access line"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_squid_dies_with_its_supervisor(public_tmp: Path, dns: DnsServer) -> None:
    runner = ProxyRunner(_state(public_tmp, "orphan"), {**BASE_ENV, "EGRESS_ALLOWED_DOMAINS": "allowed.test"},
                         port=3175)
    runner.start()
    master = runner.events("started")[0]["pid"]
    listing = subprocess.run(["pgrep", "-g", str(master)], capture_output=True, text=True).stdout.split()
    squids = [int(pid) for pid in listing]
    assert master in squids and len(squids) >= 3  # master, coordinator, workers
    assert runner.process is not None
    runner.process.kill()  # SIGKILL: no handler, no cleanup in the supervisor
    runner.process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in squids) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling an observable (the processes), not synchronising on time
    assert not [pid for pid in squids if _alive(pid)], "Squid outlived its supervisor"
    with pytest.raises(OSError):
        socket.create_connection((runner.host, runner.port), timeout=2).close()


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_")}
    return subprocess.run([*egress_proxy_command(), *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)


def test_run_without_a_source_exits_2_naming_the_three_ways() -> None:
    result = _run_cli("run", "--metrics", "off")
    assert result.returncode == 2
    error = json.loads(result.stdout)
    for way in ("EGRESS_ALLOWLIST_FILE", "EGRESS_ALLOWLIST_SECRET", "EGRESS_ALLOWED_DOMAINS"):
        assert way in error["message"]


def test_unknown_variable_exits_2_naming_the_closest_setting() -> None:
    result = _run_cli("run", env={"EGRESS_ALLOWLIST_FLIE": "/etc/allowlist.txt"})
    assert result.returncode == 2
    assert "did you mean EGRESS_ALLOWLIST_FILE?" in json.loads(result.stdout)["message"]


def test_unusable_state_dir_exits_6_with_a_message(public_tmp: Path) -> None:
    blocker = public_tmp / "not-a-dir"
    blocker.write_text("a file where the state dir's parent should be")
    result = _run_cli("run", "--allowed-domains", "a.example.com", "--state-dir", str(blocker / "state"),
                      "--port", "3176", "--metrics", "off")
    assert result.returncode == 6, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [r for r in lines if r.get("event") == "startup_failed"]
    assert failed and "EGRESS_STATE_DIR" in failed[0]["message"] and str(blocker) in failed[0]["message"]
    assert result.stderr == ""  # no traceback
