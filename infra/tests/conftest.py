"""Shared synthesis fixtures: each variant is synthesized once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

# First: sets up the environment the jsii kernel must start with, then imports aws_cdk.
from infra_synth import ECR_IMAGE, PUBLIC_IMAGE, Synth, synthesize


@pytest.fixture(scope="session")
def fargate(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesize(tmp_path_factory.mktemp("fargate"), {"capacity": "fargate", "imageUri": PUBLIC_IMAGE})


@pytest.fixture(scope="session")
def ec2(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesize(tmp_path_factory.mktemp("ec2"), {"capacity": "ec2", "imageUri": ECR_IMAGE})


#: Elastic IPs that exist before the stack (-c eipAllocationIds): the pool is these, none is allocated.
EXISTING_ALLOCATION_IDS = ["eipalloc-0123456789abcdef0", "eipalloc-00000000000000001", "eipalloc-0aaaaaaaaaaaaaaa2"]


@pytest.fixture(scope="session")
def ec2_existing_eips(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesize(tmp_path_factory.mktemp("ec2-existing-eips"),
                      {"capacity": "ec2", "imageUri": ECR_IMAGE, "eipAllocationIds": ",".join(EXISTING_ALLOCATION_IDS)})


@pytest.fixture(scope="session")
def transparent(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """EC2 mode as the private subnets' route target (transparent_mode.py)."""
    return synthesize(tmp_path_factory.mktemp("transparent"),
                      {"capacity": "ec2", "imageUri": ECR_IMAGE, "transparent": "on"})


@pytest.fixture(scope="session")
def transparent_ipv6(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """Transparent mode with IPv6 (-c transparentIpv6=on): ::/0 too, for the ClientIpv6Cidr range."""
    return synthesize(tmp_path_factory.mktemp("transparent-ipv6"),
                      {"capacity": "ec2", "imageUri": ECR_IMAGE, "transparent": "on", "transparentIpv6": "on"})


#: Extra TCP ports the instances let out for the policies' ports (-c transparentExtraPorts), as given.
EXTRA_PORTS = "22,7999,5432-5433"


@pytest.fixture(scope="session")
def transparent_extra_ports(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """Transparent mode whose instances let out the policies' extra ports besides 80 and 443."""
    return synthesize(tmp_path_factory.mktemp("transparent-extra-ports"),
                      {"capacity": "ec2", "imageUri": ECR_IMAGE, "transparent": "on",
                       "transparentExtraPorts": EXTRA_PORTS})


@pytest.fixture(scope="session")
def transparent_ipv6_extra_ports(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """The same over IPv6 too (-c transparentIpv6=on)."""
    return synthesize(tmp_path_factory.mktemp("transparent-ipv6-extra-ports"),
                      {"capacity": "ec2", "imageUri": ECR_IMAGE, "transparent": "on", "transparentIpv6": "on",
                       "transparentExtraPorts": EXTRA_PORTS})


@pytest.fixture(scope="session")
def asset_build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in repo root: the real container/Dockerfile belongs to another part of the repo."""
    root = tmp_path_factory.mktemp("repo")
    (root / "container").mkdir()
    (root / "container" / "Dockerfile").write_text("FROM scratch\n")
    (root / "entrypoint").mkdir()
    (root / "entrypoint" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "infra" / "cdk.out").mkdir(parents=True)
    (root / "infra" / "cdk.out" / "big.bin").write_bytes(b"0" * 1024)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@pytest.fixture(scope="session")
def fargate_asset(tmp_path_factory: pytest.TempPathFactory, asset_build_context: Path) -> Synth:
    """The default `cdk deploy` path: the image built from container/Dockerfile as an asset."""
    return synthesize(tmp_path_factory.mktemp("asset"),
                      {"capacity": "fargate", "imageAssetDir": str(asset_build_context)})


@pytest.fixture(scope="session", params=["fargate", "ec2"])
def synth(request: pytest.FixtureRequest) -> Synth:
    """Both capacity modes, for properties they share."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def fargate_repo_asset(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    """The real default: the repository root as the build context of container/Dockerfile."""
    from egress_proxy_infra.config import REPO_ROOT
    if not (REPO_ROOT / "container" / "Dockerfile").is_file():
        pytest.skip("container/Dockerfile is not in this checkout")
    return synthesize(tmp_path_factory.mktemp("repo-asset"), {"capacity": "fargate"})
