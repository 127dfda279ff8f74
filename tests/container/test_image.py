"""The real image, built from container/Dockerfile by scripts/build-image, filters like the integration suite says.

It runs the image's own ENTRYPOINT (tini -> egress-proxy run -> Squid) as the image's user, with an allowlist
file bind-mounted read-only, and proves from the host: an allowed HTTP request reaches the origin, a denied one
gets the 403 page and never reaches it, an allowed CONNECT is tunnelled to the origin's own certificate (ssl-bump
peek as the non-root user) and a denied one is refused, an allowlist edit applies without a restart,
`egress-proxy health` works inside, everything runs as uid 13, and STOPSIGNAL drains and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from compose_file import load_compose, service_argv, service_env
from conftest import ORIGIN_IP, PROXY_IP
from connect_probe import ConnectProbe
from harness import (
    DnsServer,
    HttpOrigin,
    TestCA,
    TlsOrigin,
    connect_tunnel,
    free_port,
    http_get_over,
    tls_over_tunnel,
    wait_for_port,
)
from harness import (
    client_session as session,
)
from runtime import Container, make_container

pytestmark = pytest.mark.container

PROXY_USER_UID = 13  # Debian's 'proxy', Squid's user
ALLOWLIST_IN_IMAGE = "/etc/egress-proxy/allowlist.txt"
ALLOWLIST = """\
# container-test allowlist
allowed.container.test
"""




@pytest.fixture(scope="module")
def allowlist_dir(public_tmp: Path) -> Path:
    """Mounted as a directory, as docker-compose.yml does, so an atomic rename shows up inside."""
    directory = public_tmp / "allowlist"
    directory.mkdir(mode=0o755)
    (directory / "allowlist.txt").write_text(ALLOWLIST)
    (directory / "allowlist.txt").chmod(0o644)
    return directory


@pytest.fixture(scope="module")
def proxy_port() -> int:
    return free_port(PROXY_IP)


@pytest.fixture(scope="module")
def proxy_env(proxy_port: int, http_origin: HttpOrigin, tls_origin: TlsOrigin) -> dict[str, str]:
    return {
        "EGRESS_LISTEN_ADDRESS": PROXY_IP,
        "EGRESS_PORT": str(proxy_port),
        "EGRESS_ALLOWLIST_FILE": ALLOWLIST_IN_IMAGE,
        "EGRESS_DNS_SERVERS": "127.0.7.53",
        "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
        "EGRESS_ALLOWED_PORTS": f"http:{http_origin.port},connect:{tls_origin.port}",
        "EGRESS_METRICS": "off",
        "EGRESS_DRAIN_SECONDS": "1",
    }


@pytest.fixture(scope="module")
def container(image: str, dns: DnsServer, allowlist_dir: Path, proxy_env: dict[str, str]) -> Iterator[Container]:
    box = make_container(image)
    try:
        box.start(proxy_env, [(allowlist_dir, str(Path(ALLOWLIST_IN_IMAGE).parent))])
        started = box.wait_for(lambda r: r.get("event") in {"started", "startup_failed"}, timeout=90)
        assert started.get("event") == "started", box.tail()
        yield box
    finally:
        if box.exit_code is None:
            box.stop(timeout=60)
        box.remove()


@pytest.fixture(scope="module")
def proxies(proxy_port: int) -> dict[str, str]:
    url = f"http://{PROXY_IP}:{proxy_port}"
    return {"http": url, "https": url}


# --- the image's metadata -----------------------------------------------------------------------------------


def test_image_metadata(container: Container) -> None:
    config = container.image_config()
    assert config["Entrypoint"][-2:] == ["egress-proxy", "run"]
    assert config["User"] in {"13", "13:13", "proxy", "proxy:proxy"}
    assert config.get("StopSignal") == "SIGTERM"
    assert "3128/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["EGRESS_STATE_DIR"] == "/var/lib/egress-proxy" and env["EGRESS_PORT"] == "3128"
    assert config["Healthcheck"]["Test"] == ["CMD", "egress-proxy", "health"]


def test_no_toolchain_and_no_setuid_helper_in_image(container: Container) -> None:
    code, output = container.exec(
        ["sh", "-c", "for t in gcc cc make pip pip3 python3-config; do command -v $t >/dev/null && echo found $t; "
                     "done; /opt/egress-proxy/bin/python -c 'import pip' 2>/dev/null && echo found pip module; "
                     "find /usr/lib/squid -perm -4000 -printf 'setuid %p\\n'; echo done"]
    )
    assert code == 0 and output.strip().endswith("done"), output
    assert "found" not in output and "setuid" not in output, output


# --- who runs ----------------------------------------------------------------------------------------------


def test_runs_as_proxy_user(container: Container) -> None:
    code, output = container.exec(["id", "-u"])
    assert code == 0 and output.strip() == str(PROXY_USER_UID)
    processes = container.processes()
    names = {name for _, name, _, _ in processes}
    assert "squid" in names and any(name.startswith("python") or name == "egress-proxy" for name in names), processes
    for pid, name, real, effective in processes:
        assert (real, effective) == (PROXY_USER_UID, PROXY_USER_UID), f"{name} (pid {pid}) runs as {real}/{effective}"


def test_health_inside(container: Container) -> None:
    code, output = container.exec(["egress-proxy", "health"])
    assert code == 0, output
    assert output.startswith("healthy"), output


def test_state_dir_owned_by_proxy_user_and_holds_the_throwaway_cert(container: Container) -> None:
    code, output = container.exec(["sh", "-c", "stat -c '%u %n' /var/lib/egress-proxy; ls /var/lib/egress-proxy"])
    assert code == 0, output
    assert output.splitlines()[0] == f"{PROXY_USER_UID} /var/lib/egress-proxy"


# --- filtering (the integration suite's assertions) ----------------------------------------------------------


def test_http_allowed_host_reaches_origin(container: Container, proxies: dict[str, str],
                                          http_origin: HttpOrigin) -> None:
    mark = container.mark()
    response = session().get(f"http://allowed.container.test:{http_origin.port}/hello", proxies=proxies, timeout=15)
    assert response.status_code == 200, response.text[:500]
    assert "hello from http-origin" in response.text and "host=allowed.container.test" in response.text
    record = container.access(mark, host="allowed.container.test", method="GET")
    assert record["decision"] == "allowed" and record["reason"] == "allowed" and record["status"] == 200
    assert record["server_ip"] == ORIGIN_IP and record["bytes_out"] > 0


def test_http_not_allowlisted_gets_403_page(container: Container, proxies: dict[str, str],
                                            http_origin: HttpOrigin) -> None:
    mark = container.mark()
    before = len(http_origin.requests)
    response = session().get(f"http://denied.container.test:{http_origin.port}/secret", proxies=proxies,
                             timeout=15)
    assert response.status_code == 403
    assert "Access Denied" in response.text
    assert "denied.container.test" in response.text and "domain_not_allowlisted" in response.text
    record = container.access(mark, host="denied.container.test")
    assert record["decision"] == "denied" and record["reason"] == "domain_not_allowlisted"
    assert len(http_origin.requests) == before, "a denied request must never reach the origin"


def test_https_allowed_is_spliced_end_to_end(container: Container, proxy_port: int, tls_origin: TlsOrigin,
                                             ca: TestCA) -> None:
    mark = container.mark()
    sock, status, _ = connect_tunnel((PROXY_IP, proxy_port), "allowed.container.test", tls_origin.port,
                                     timeout=15)
    with sock:
        assert status == 200
        # The origin's own certificate verifies against the test CA: nothing was decrypted in between.
        with tls_over_tunnel(sock, "allowed.container.test", ca.ca_path, timeout=15) as tls:
            code, body = http_get_over(tls, "allowed.container.test", "/tls", headers={"Connection": "close"})
    assert code == 200 and b"hello from tls-origin" in body
    assert tls_origin.snis[-1] == "allowed.container.test"
    record = container.access(mark, host="allowed.container.test", method="CONNECT")
    assert record["decision"] == "allowed" and record["sni"] == "allowed.container.test"
    assert record["squid_status"] == "TCP_TUNNEL" and record["server_ip"] == ORIGIN_IP


def test_https_connect_to_non_allowlisted_host_refused(container: Container, proxy_port: int,
                                                      tls_origin: TlsOrigin) -> None:
    mark = container.mark()
    handshakes = len(tls_origin.snis)
    try:
        sock, status, _ = connect_tunnel((PROXY_IP, proxy_port), "denied.container.test", tls_origin.port,
                                         timeout=15)
        sock.close()
    except (ConnectionError, OSError, ValueError):
        status = 0
    assert status != 200, "no tunnel may be established"
    record = container.access(mark, host="denied.container.test", method="CONNECT")
    assert record["decision"] == "denied" and record["reason"] == "domain_not_allowlisted"
    assert len(tls_origin.snis) == handshakes


def test_allowlist_edit_applies_without_restart(container: Container, proxies: dict[str, str],
                                                http_origin: HttpOrigin, allowlist_dir: Path) -> None:
    url = f"http://later.container.test:{http_origin.port}/"
    assert session().get(url, proxies=proxies, timeout=15).status_code == 403
    mark = container.mark()
    proxy_address = proxies["http"].removeprefix("http://").rsplit(":", 1)
    allowed_url = f"http://allowed.container.test:{http_origin.port}/probe"
    # No new connection may be refused while the proxy reloads: a probe runs across the reload.
    with ConnectProbe((proxy_address[0], int(proxy_address[1])), allowed_url, "allowed.container.test") as probe:
        # An editor's save: write a new file and rename it over the old one (the mounted directory shows it).
        new = allowlist_dir / ".allowlist.txt.new"
        new.write_text(ALLOWLIST + "later.container.test\n")
        new.chmod(0o644)
        os.replace(new, allowlist_dir / "allowlist.txt")
        reloaded = container.wait_for(lambda r: r.get("event") in {"reloaded", "reload_rejected"}, timeout=30,
                                      start=mark)
    assert reloaded["event"] == "reloaded" and reloaded["added"] == 1, reloaded
    probe.assert_clean()
    response = session().get(url, proxies=proxies, timeout=15)  # once: a confirmed reload needs no retry
    assert response.status_code == 200, response.text[:300]
    assert not container.events("started")[1:], "the edit must not restart the proxy"


# --- stopping ----------------------------------------------------------------------------------------------


def test_stop_signal_drains_and_exits_zero(container: Container) -> None:
    running = [pid for pid, *_ in container.processes()]
    assert running
    code = container.stop(timeout=60)
    assert code == 0, container.tail()
    assert container.events("stopping") and container.events("stopped"), container.tail()
    if os.environ.get("EGRESS_CONTAINER_RUNTIME", "buildah") == "buildah":
        leftovers = [pid for pid in running if Path(f"/proc/{pid}").exists()]
        assert not leftovers, f"processes left behind after the stop: {leftovers}"


def test_build_script_is_idempotent_and_reports_size(image: str) -> None:
    if os.environ.get("EGRESS_TEST_IMAGE"):
        pytest.skip("image given by EGRESS_TEST_IMAGE")
    result = subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts" / "build-image"), "--tag", image],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"image {image} size " in result.stdout
    assert "debootstrap" not in result.stderr, "the cached base must be reused"


# --- the compose file's "secrets" profile, run with the image: seed a secret, serve it, push a change ---------


@pytest.fixture(scope="module")
def secrets_emulator() -> Iterator[str]:
    """moto's Secrets Manager on loopback (docker-compose.yml runs the same moto as the `moto` service)."""
    host, port = "127.0.7.5", free_port("127.0.7.5")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(host, port, timeout=30)
        yield f"http://{host}:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_compose_secrets_profile_seeds_serves_and_hot_reloads_the_secret(
    image: str, dns: DnsServer, http_origin: HttpOrigin, public_tmp: Path, secrets_emulator: str
) -> None:
    compose = load_compose()["services"]
    seed_argv = service_argv(compose["seed-allowlist"], [])
    secret_env = service_env(compose["proxy-secrets"])
    # The compose file's own values, with loopback addresses in place of compose's service names and ports.
    aws = {k: v for k, v in secret_env.items() if k.startswith("AWS_")} | {"AWS_ENDPOINT_URL": secrets_emulator}
    seed_dir = public_tmp / "seed"
    seed_dir.mkdir(mode=0o755)
    (seed_dir / "allowlist.txt").write_text(ALLOWLIST)
    (seed_dir / "allowlist.txt").chmod(0o644)
    mounts = [(seed_dir, str(Path(ALLOWLIST_IN_IMAGE).parent))]
    port = free_port(PROXY_IP)
    env = secret_env | aws | {
        "EGRESS_LISTEN_ADDRESS": PROXY_IP,
        "EGRESS_PORT": str(port),
        "EGRESS_DNS_SERVERS": "127.0.7.53",
        "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
        "EGRESS_ALLOWED_PORTS": f"http:{http_origin.port}",
        "EGRESS_DRAIN_SECONDS": "1",
    }
    proxies = {"http": f"http://{PROXY_IP}:{port}"}
    box = make_container(image)
    try:
        code, output = box.exec(seed_argv, env=aws, mounts=mounts)  # the `seed-allowlist` one-shot
        assert code == 0, output
        assert "+ allowed.container.test" in output, output
        box.start(env)
        started = box.wait_for(lambda r: r.get("event") in {"started", "startup_failed"}, timeout=90)
        assert started.get("event") == "started", box.tail()
        assert "secret" in str(started.get("source")), started
        allowed = session().get(f"http://allowed.container.test:{http_origin.port}/", proxies=proxies, timeout=15)
        assert allowed.status_code == 200 and "hello from http-origin" in allowed.text
        later = f"http://later.container.test:{http_origin.port}/"
        assert session().get(later, proxies=proxies, timeout=15).status_code == 403
        # `egress-proxy allowlist push` against the emulator changes the list live (README walkthrough).
        mark = box.mark()
        (seed_dir / "allowlist.txt").write_text(ALLOWLIST + "later.container.test\n")
        push = [arg for arg in seed_argv if arg != "--create"]
        code, output = box.exec(push, env=aws, mounts=mounts)
        assert code == 0 and "+ later.container.test" in output, output
        reloaded = box.wait_for(lambda r: r.get("event") in {"reloaded", "reload_rejected"}, timeout=60,
                                start=mark)
        assert reloaded["event"] == "reloaded" and reloaded["added"] == 1, reloaded
        assert session().get(later, proxies=proxies, timeout=15).status_code == 200  # no retry needed
        assert box.stop(timeout=60) == 0, box.tail()
    finally:
        if box.exit_code is None:
            box.stop(timeout=60)
        box.remove()
