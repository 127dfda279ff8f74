"""Synthesis helpers for the infra tests (imported by conftest.py before anything else touches aws_cdk).

Environment set-up happens at import time, before anything imports aws_cdk, because the jsii kernel (a Node
process) is started by that import and only sees the environment as it was then.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFRA_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(INFRA_DIR))

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "18,20")
os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")

# A docker tripwire: synthesis must never run docker (image assets are only built by `cdk deploy`).
_TRIPWIRE_DIR = Path(tempfile.mkdtemp(prefix="egress-proxy-docker-tripwire-"))
DOCKER_TRIPWIRE_LOG = _TRIPWIRE_DIR / "calls.log"
_tripwire = _TRIPWIRE_DIR / "docker"
_tripwire.write_text(f'#!/bin/sh\necho "docker $*" >> "{DOCKER_TRIPWIRE_LOG}"\nexit 1\n')
_tripwire.chmod(_tripwire.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
os.environ["PATH"] = f"{_TRIPWIRE_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ["CDK_DOCKER"] = str(_tripwire)

import app as cdk_app_module  # noqa: E402
import aws_cdk as cdk  # noqa: E402  (after the environment above)
from aws_cdk.assertions import Template  # noqa: E402

ECR_IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/egress-proxy:1.0.0"
PUBLIC_IMAGE = "public.ecr.aws/example/egress-proxy:1.0.0"


@dataclass(frozen=True)
class Synth:
    """One synthesized variant of the app."""

    stack: cdk.Stack
    template: Template
    data: dict[str, Any]
    template_path: Path
    outdir: Path
    context: dict[str, Any]

    @property
    def mode(self) -> str:
        return str(self.context.get("capacity", "fargate"))

    def resources(self, type_: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.data["Resources"].items() if v["Type"] == type_}

    def only(self, type_: str) -> tuple[str, dict[str, Any]]:
        found = self.resources(type_)
        assert len(found) == 1, f"expected one {type_}, found {sorted(found)}"
        return next(iter(found.items()))

    def nag_report(self) -> list[dict[str, str]]:
        path = self.outdir / f"AwsSolutions-{self.stack.artifact_id}-NagReport.csv"
        if not path.exists():  # cdk-nag names the report after the stack's path
            (path,) = self.outdir.glob("AwsSolutions-*NagReport.csv")
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))


#: cdk.json's context: the pinned feature flags and the defaults the `cdk` CLI passes to app.py.
CDK_JSON_CONTEXT: dict[str, Any] = json.loads((INFRA_DIR / "cdk.json").read_text())["context"]


def synthesize(outdir: Path, context: dict[str, Any]) -> Synth:
    """Synthesize as `cdk synth -c ...` would: cdk.json's context, overridden by the test's."""
    app = cdk.App(outdir=str(outdir), context={**CDK_JSON_CONTEXT, **context})
    stack = cdk_app_module.build_app(app)
    assembly = app.synth()
    artifact = assembly.get_stack_artifact(stack.artifact_id)
    template_path = Path(assembly.directory) / artifact.template_file
    data = json.loads(template_path.read_text())
    return Synth(stack=stack, template=Template.from_json(data), data=data, template_path=template_path,
                 outdir=Path(assembly.directory), context=context)
