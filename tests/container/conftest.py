"""Fixtures for the container tests: the image built by scripts/build-image, loopback DNS and origins.

The image test runs on the host network (buildah's chroot isolation has no network namespace of its own), so
every address here is on 127.0.7.0/24, apart from the integration suite's 127.0.0.x, and nothing else is
contacted. Name plan (answered by the local DNS server on 127.0.7.53:53, which the proxy uses through
EGRESS_DNS_SERVERS):
  allowed.container.test, denied.container.test, later.container.test -> 127.0.7.2 (HTTP and TLS origins)
The proxy exempts only 127.0.7.2/32 from its private-destination deny.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the shared loopback fixtures (harness.py)

from harness import DnsServer, HttpOrigin, TestCA, TlsOrigin, free_port  # noqa: E402

DNS_IP = "127.0.7.53"
ORIGIN_IP = "127.0.7.2"
PROXY_IP = "127.0.7.1"
NAMES = ["allowed.container.test", "denied.container.test", "later.container.test"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "container: builds and runs the container image (root, buildah)")


@pytest.fixture(scope="session")
def image() -> str:
    """The image under test: EGRESS_TEST_IMAGE if set (already built), else scripts/build-image builds it."""
    preset = os.environ.get("EGRESS_TEST_IMAGE")
    if preset:
        return preset
    if os.geteuid() != 0:
        pytest.fail("the container test builds with debootstrap and buildah --isolation chroot: run it as root")
    tag = "localhost/egress-proxy:test"
    result = subprocess.run([str(REPO / "scripts" / "build-image"), "--tag", tag], capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        pytest.fail(f"scripts/build-image failed ({result.returncode}):\n{result.stderr[-6000:]}")
    print(result.stdout.strip())  # "image ... size N bytes": shown with pytest -s and in CI logs on failure
    return tag


@pytest.fixture(scope="session")
def public_tmp() -> Iterator[Path]:
    """Bind-mount sources the image's proxy user (uid 13) can read: pytest's own tmp dirs are mode 0700."""
    path = Path(tempfile.mkdtemp(prefix="egress-proxy-container-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def dns() -> Iterator[DnsServer]:
    server = DnsServer({name: [ORIGIN_IP] for name in NAMES}, host=DNS_IP, port=53)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http_origin() -> Iterator[HttpOrigin]:
    with HttpOrigin(ORIGIN_IP, free_port(ORIGIN_IP), name="http-origin") as origin:
        yield origin


@pytest.fixture(scope="session")
def tls_origin(ca: TestCA) -> Iterator[TlsOrigin]:
    with TlsOrigin(ORIGIN_IP, free_port(ORIGIN_IP), ca, NAMES, name="tls-origin") as origin:
        yield origin
