#!/usr/bin/env python3
"""CDK app: `cdk synth|deploy [-c capacity=fargate|ec2] [-c arch=x86_64|arm64] [-c eipPoolSize=4] [-c imageUri=...]
[-c transparent=on [-c transparentIpv6=on] [-c transparentExtraPorts=22,7999]]` (transparent: EC2 mode only)."""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from egress_proxy_infra import EgressProxyStack, InfraConfig

STACK_NAME_CONTEXT = "stackName"


def build_app(app: cdk.App) -> EgressProxyStack:
    """Compose the app; tests call this with their own App(outdir=..., context=...)."""
    node = app.node
    context = {key: node.try_get_context(key)
               for key in ("capacity", "eipPoolSize", "imageUri", "drainSeconds", "imageAssetDir", "arch",
                           "nlbIdleTimeoutSeconds", "eipAllocationIds", "transparent", "transparentIpv6",
                           "transparentExtraPorts")}
    config = InfraConfig.from_context(context)
    stack = EgressProxyStack(
        app, node.try_get_context(STACK_NAME_CONTEXT) or "EgressProxy", config=config,
        description=f"egress-proxy: allowlisting HTTP(S) egress proxy on ECS ({config.capacity.value}) "
                    "behind an internal NLB",
    )
    # Every AwsSolutions finding must be fixed or suppressed with a reason next to its cause.
    cdk.Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return stack


if __name__ == "__main__":
    cdk_app = cdk.App()
    build_app(cdk_app)
    cdk_app.synth()
