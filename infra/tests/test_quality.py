"""The issue's quality bar: synth offline, cfn-lint clean, cdk-nag clean (suppressions carry reasons)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match
from cfnlint.api import lint_file
from cfnlint.config import ManualArgs
from infra_synth import DOCKER_TRIPWIRE_LOG, Synth

VARIANTS = ["fargate", "ec2", "fargate_asset", "ec2_existing_eips", "transparent", "transparent_ipv6",
            "transparent_ipv6_extra_ports"]
LINT_REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2"]


def cfn_lint(template_path: Path) -> list[str]:
    """cfn-lint's Python API (the same rules as the CLI) in a few regions; returns errors and warnings."""
    matches = lint_file(template_path, config=ManualArgs(regions=LINT_REGIONS))
    return [f"{m.rule.id} {m.message} ({m.path})" for m in matches if m.rule.id[0] in ("E", "W")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cfn_lint_reports_no_errors_or_warnings(variant: str, request: pytest.FixtureRequest) -> None:
    synth: Synth = request.getfixturevalue(variant)
    assert cfn_lint(synth.template_path) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_unsuppressed_cdk_nag_findings(variant: str, request: pytest.FixtureRequest) -> None:
    synth: Synth = request.getfixturevalue(variant)
    annotations = Annotations.from_stack(synth.stack)
    pattern = Match.string_like_regexp(r"(AwsSolutions|CdkNag)")
    findings = annotations.find_error("*", pattern) + annotations.find_warning("*", pattern)
    assert findings == [], [f"{m.id}: {str(m.entry.data)[:200]}" for m in findings]
    rows = synth.nag_report()
    assert rows, "cdk-nag wrote no report: is AwsSolutionsChecks applied?"
    assert {row["Compliance"] for row in rows} <= {"Compliant", "Suppressed"}, [
        row for row in rows if row["Compliance"] not in ("Compliant", "Suppressed")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_synth_has_no_cdk_warnings_or_errors(variant: str, request: pytest.FixtureRequest) -> None:
    synth: Synth = request.getfixturevalue(variant)
    annotations = Annotations.from_stack(synth.stack)
    messages = annotations.find_error("*", Match.any_value()) + annotations.find_warning("*", Match.any_value())
    assert messages == [], [f"{m.id}: {str(m.entry.data)[:200]}" for m in messages]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_suppression_has_a_written_reason(variant: str, request: pytest.FixtureRequest) -> None:
    synth: Synth = request.getfixturevalue(variant)
    suppressions = [
        rule
        for resource in synth.data["Resources"].values()
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
    ]
    assert suppressions, "expected documented suppressions"
    for rule in suppressions:
        assert len(rule["reason"].split()) >= 8, rule
    suppressed_rows = [row for row in synth.nag_report() if row["Compliance"] == "Suppressed"]
    assert all(row["Exception Reason"].strip() for row in suppressed_rows)


def test_asset_image_synthesizes_without_docker(fargate_asset: Synth, fargate: Synth) -> None:
    # The tripwire docker on PATH / CDK_DOCKER records any call; synthesis must not make one.
    assert not DOCKER_TRIPWIRE_LOG.exists(), DOCKER_TRIPWIRE_LOG.read_text()
    manifest = json.loads(next(fargate_asset.outdir.glob("*.assets.json")).read_text())
    (image,) = manifest["dockerImages"].values()
    assert image["source"]["dockerFile"] == "container/Dockerfile"
    staged = fargate_asset.outdir / image["source"]["directory"]
    assert (staged / "container" / "Dockerfile").is_file()
    # The build context is the repo root minus what an image never needs.
    assert (staged / "entrypoint" / "pyproject.toml").is_file()
    assert not (staged / "infra").exists()
    assert not (staged / ".git").exists()
    # The task uses the asset's ECR image, and the template keeps the bootstrap check that cdk deploy needs.
    _, task = fargate_asset.only("AWS::ECS::TaskDefinition")
    image_ref = json.dumps(task["Properties"]["ContainerDefinitions"][0]["Image"])
    assert "cdk-hnb659fds-container-assets" in image_ref
    assert "BootstrapVersion" in fargate_asset.data["Parameters"]
    # With imageUri there is no asset at all, so the template can be launched from the console.
    assert "BootstrapVersion" not in fargate.data["Parameters"]
    assert not list(fargate.outdir.glob("asset.*"))


def test_ecr_image_uri_grants_pull_on_that_repository_only(ec2: Synth) -> None:
    _, task = ec2.only("AWS::ECS::TaskDefinition")
    image = json.dumps(task["Properties"]["ContainerDefinitions"][0]["Image"])
    assert "123456789012.dkr.ecr.eu-west-1" in image and "egress-proxy:1.0.0" in image
    policies = [p for name, p in ec2.resources("AWS::IAM::Policy").items() if "ExecutionRole" in name]
    (policy,) = policies
    pull = [s for s in policy["Properties"]["PolicyDocument"]["Statement"]
            if "ecr:BatchGetImage" in s["Action"]]
    (statement,) = pull
    assert "repository/egress-proxy" in json.dumps(statement["Resource"])


def test_app_entrypoint_runs_like_the_cdk_cli(tmp_path: Path) -> None:
    """`cdk synth -c capacity=ec2` runs `python3 app.py` with CDK_OUTDIR/CDK_CONTEXT_JSON; do the same."""
    infra = Path(__file__).resolve().parents[1]
    assert json.loads((infra / "cdk.json").read_text())["app"] == "python3 app.py"
    env = {**__import__("os").environ, "CDK_OUTDIR": str(tmp_path),
           "CDK_CONTEXT_JSON": json.dumps({"capacity": "ec2", "imageUri": "example/egress-proxy:1"})}
    result = subprocess.run([sys.executable, "app.py"], cwd=infra, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    template = json.loads((tmp_path / "EgressProxy.template.json").read_text())
    assert "EgressIp4" in template["Outputs"]
    assert "AmiId" in template["Parameters"]


def test_real_build_context_stages_only_what_the_dockerfile_uses(fargate_repo_asset: Synth) -> None:
    assert not DOCKER_TRIPWIRE_LOG.exists(), DOCKER_TRIPWIRE_LOG.read_text()
    manifest = json.loads(next(fargate_repo_asset.outdir.glob("*.assets.json")).read_text())
    (image,) = manifest["dockerImages"].values()
    assert image["source"]["dockerFile"] == "container/Dockerfile"
    staged = fargate_repo_asset.outdir / image["source"]["directory"]
    assert (staged / "container" / "Dockerfile").is_file()
    assert (staged / "requirements.txt").is_file() and (staged / "entrypoint").is_dir()
    for never in (".git", "infra", "tests"):
        assert not (staged / never).exists(), never
    assert cfn_lint(fargate_repo_asset.template_path) == []


# --- feature flags, toolchain, build platform ------------------------------------------------------------

def _jsii_package_file(name: str) -> Any:
    """A file of the aws-cdk-lib npm package that the Python wheel embeds (its jsii tarball)."""
    import tarfile

    import aws_cdk
    (tarball,) = (Path(aws_cdk.__file__).parent / "_jsii").glob("aws-cdk-lib@*.jsii.tgz")
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(f"package/{name}")
        assert member is not None
        return json.loads(member.read())


def test_every_recommended_feature_flag_is_pinned_in_cdk_json() -> None:
    """The CLI's `cdk flags` counts unset flags; new projects get these recommended values (`cdk init`)."""
    recommended = _jsii_package_file("recommended-feature-flags.json")
    context = json.loads((Path(__file__).resolve().parents[1] / "cdk.json").read_text())["context"]
    assert {flag: context.get(flag) for flag in recommended} == recommended


def test_deploy_guide_node_requirement_matches_aws_cdk_lib() -> None:
    engines = _jsii_package_file("package.json")["engines"]["node"]
    assert engines == ">= 20.0.0"
    guide = (Path(__file__).resolve().parents[2] / "docs" / "deploy-aws.md").read_text()
    assert "Node.js 22 or 24" in guide and "engines" in guide and ">= 20" in guide


@pytest.mark.parametrize(("arch", "platform", "cpu"), [("x86_64", "linux/amd64", "X86_64"),
                                                       ("arm64", "linux/arm64", "ARM64")])
def test_image_asset_is_built_for_the_task_platform(arch: str, platform: str, cpu: str,
                                                     tmp_path_factory: pytest.TempPathFactory,
                                                     asset_build_context: Path) -> None:
    from infra_synth import synthesize
    synth = synthesize(tmp_path_factory.mktemp(f"asset-{arch}"),
                       {"capacity": "fargate", "imageAssetDir": str(asset_build_context), "arch": arch})
    manifest = json.loads(next(synth.outdir.glob("*.assets.json")).read_text())
    (image,) = manifest["dockerImages"].values()
    assert image["source"]["platform"] == platform
    _, task = synth.only("AWS::ECS::TaskDefinition")
    assert task["Properties"]["RuntimePlatform"] == {"CpuArchitecture": cpu, "OperatingSystemFamily": "LINUX"}
    assert cfn_lint(synth.template_path) == []


def test_nlb_tcp_idle_timeout_is_explicit_and_configurable(fargate: Synth,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    from infra_synth import PUBLIC_IMAGE, synthesize
    _, listener = fargate.only("AWS::ElasticLoadBalancingV2::Listener")
    assert listener["Properties"]["ListenerAttributes"] == [{"Key": "tcp.idle_timeout.seconds", "Value": "350"}]
    synth = synthesize(tmp_path_factory.mktemp("idle"), {"capacity": "fargate", "imageUri": PUBLIC_IMAGE,
                                                         "nlbIdleTimeoutSeconds": "900"})
    _, listener = synth.only("AWS::ElasticLoadBalancingV2::Listener")
    assert listener["Properties"]["ListenerAttributes"] == [{"Key": "tcp.idle_timeout.seconds", "Value": "900"}]


def test_proxy_tunnel_idle_timeout_matches_the_nlb(fargate: Synth, ec2: Synth,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Issue 17: the proxy closes an idle tunnel (EGRESS_TUNNEL_IDLE_TIMEOUT, Squid's read_timeout) when the NLB
    would forget it, for the default and for a configured value, in both capacity modes."""
    from infra_synth import PUBLIC_IMAGE, synthesize

    def limits(synth: Synth) -> tuple[str, str]:
        _, listener = synth.only("AWS::ElasticLoadBalancingV2::Listener")
        (attribute,) = listener["Properties"]["ListenerAttributes"]
        _, task = synth.only("AWS::ECS::TaskDefinition")
        (container,) = task["Properties"]["ContainerDefinitions"]
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        return attribute["Value"], env["EGRESS_TUNNEL_IDLE_TIMEOUT"]

    assert limits(fargate) == limits(ec2) == ("350", "350")
    custom = synthesize(tmp_path_factory.mktemp("idle-1200"), {"capacity": "fargate", "imageUri": PUBLIC_IMAGE,
                                                               "nlbIdleTimeoutSeconds": "1200"})
    assert limits(custom) == ("1200", "1200")
