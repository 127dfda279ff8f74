"""Clients by AWS identity: the task role's permissions for the selectors in use, and the proxy shared as a
PrivateLink endpoint service.

Context (synth time, because they change the template's shape):

* ``-c identitySelectors=sg,tag,ecs:CLUSTER/SERVICE,...``: the kinds of client selectors the policies use.
  ``sg`` and ``tag`` need ``ec2:DescribeNetworkInterfaces``; each ``ecs:CLUSTER/SERVICE`` needs ``ecs:ListTasks``
  and ``ecs:DescribeTasks`` on that cluster. ``vpce`` selectors and CIDRs need no AWS call. Nothing is granted
  when unset, and a policy that uses a selector without its permission keeps failing closed (the proxy logs
  ``identity_refresh_failed`` with the AccessDenied, and ``identity.refresh_failing`` is 1).
* ``-c endpointService=on``: share the proxy's NLB as a VPC endpoint service. Then also
  ``-c endpointServicePrincipals=arn:aws:iam::111122223333:root,...`` (who may create endpoints; none by
  default) and ``-c endpointServiceAcceptance=required|auto`` (``required`` by default: each new consumer's
  endpoint waits for the provider to accept it).

Which permissions cannot be scoped to resources, and why (Service Authorization Reference):

* ``ec2:DescribeNetworkInterfaces``: EC2's Describe actions have no resource types, so ``Resource: *`` is the
  only form. It is read-only, and the proxy filters by group, tag or address itself.
* ``ecs:ListTasks``: its resource type is the container instance, which Fargate tasks do not have; it is scoped
  instead with the ``ecs:cluster`` condition to the clusters the selectors name.
* ``ecs:DescribeTasks`` is scoped to ``task/CLUSTER/*`` of those clusters.

The endpoint service: the NLB's target group gets proxy protocol v2 (the consumer's address, and the endpoint
ID in TLV 0xEA) and stops preserving client IPs (so every connection comes from the NLB's own addresses, the
only ones allowed to send a PROXY header: the LoadBalancerSubnetCidrs parameter becomes
EGRESS_PROXY_PROTOCOL_FROM). NLB health checks carry a PROXY header too once proxy protocol is on, without
client information (Elastic Load Balancing, Network Load Balancers, "Edit target group attributes", proxy
protocol): the health check is TCP, which passes on the TCP handshake whether or not a header follows, and the
proxy accepts a header from the NLB's addresses anyway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aws_cdk import Aws, CfnOutput, CfnParameter, Fn, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra.config import ConfigError
from egress_proxy_infra.l1 import l1
from egress_proxy_infra.load_balancer import ProxyLoadBalancer
from egress_proxy_infra.proxy_task import ProxyTask

CONTEXT_KEYS = ("identitySelectors", "endpointService", "endpointServicePrincipals", "endpointServiceAcceptance")
_ECS_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_PRINCIPAL = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:(root|role/[\w+=,.@/-]+|user/[\w+=,.@/-]+)|\*")


@dataclass(frozen=True, kw_only=True)
class IdentityConfig:
    ec2_selectors: bool = False  # sg- or tag: selectors
    ecs_clusters: tuple[str, ...] = ()  # clusters named by ecs:CLUSTER/SERVICE selectors
    endpoint_service: bool = False
    allowed_principals: tuple[str, ...] = ()
    acceptance_required: bool = True

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> IdentityConfig:
        ec2_selectors = False
        clusters: list[str] = []
        for item in _items(context.get("identitySelectors")):
            kind = item.lower()
            if kind in {"sg", "tag"}:
                ec2_selectors = True
            elif kind in {"vpce", "cidr"}:
                pass
            elif kind.startswith("ecs:"):
                cluster, sep, service = item[4:].partition("/")
                if not sep or not _ECS_NAME.fullmatch(cluster) or not _ECS_NAME.fullmatch(service):
                    raise ConfigError(f"identitySelectors: {item!r} is not ecs:CLUSTER/SERVICE (names, not ARNs)")
                clusters.append(cluster)
            else:
                raise ConfigError(f"identitySelectors: {item!r} is not a selector kind; use sg, tag, vpce or "
                                  "ecs:CLUSTER/SERVICE, comma-separated")
        endpoint = str(context.get("endpointService") or "off").strip().lower()
        if endpoint not in {"on", "off"}:
            raise ConfigError(f"endpointService={endpoint!r}: use on or off")
        principals = tuple(_items(context.get("endpointServicePrincipals")))
        for principal in principals:
            if not _PRINCIPAL.fullmatch(principal):
                raise ConfigError(f"endpointServicePrincipals: {principal!r} is not an IAM principal ARN; use e.g. "
                                  "arn:aws:iam::111122223333:root (an account) or a role ARN")
        acceptance = str(context.get("endpointServiceAcceptance") or "required").strip().lower()
        if acceptance not in {"required", "auto"}:
            raise ConfigError(f"endpointServiceAcceptance={acceptance!r}: use required (each endpoint waits for "
                              "acceptance) or auto")
        if endpoint == "off" and (principals or context.get("endpointServiceAcceptance")):
            raise ConfigError("endpointServicePrincipals/endpointServiceAcceptance need -c endpointService=on")
        return cls(ec2_selectors=ec2_selectors, ecs_clusters=tuple(dict.fromkeys(clusters)),
                   endpoint_service=endpoint == "on", allowed_principals=principals,
                   acceptance_required=acceptance == "required")


def _items(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(item).strip() for item in value if str(item).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def identity_statements(config: IdentityConfig) -> list[iam.PolicyStatement]:
    """Exactly what the selectors in use need (see the module docstring for the scoping)."""
    statements: list[iam.PolicyStatement] = []
    if config.ec2_selectors:
        statements.append(iam.PolicyStatement(actions=["ec2:DescribeNetworkInterfaces"], resources=["*"]))
    if config.ecs_clusters:
        cluster_arns = [f"arn:{Aws.PARTITION}:ecs:{Aws.REGION}:{Aws.ACCOUNT_ID}:cluster/{name}"
                        for name in config.ecs_clusters]
        statements.append(iam.PolicyStatement(actions=["ecs:ListTasks"], resources=["*"],
                                              conditions={"ArnEquals": {"ecs:cluster": cluster_arns}}))
        statements.append(iam.PolicyStatement(
            actions=["ecs:DescribeTasks"],
            resources=[f"arn:{Aws.PARTITION}:ecs:{Aws.REGION}:{Aws.ACCOUNT_ID}:task/{name}/*"
                       for name in config.ecs_clusters]))
    return statements


class ClientIdentity(Construct):
    """The task role's identity permissions and, optionally, the PrivateLink endpoint service."""

    def __init__(self, scope: Construct, id: str, *, config: IdentityConfig, task: ProxyTask,
                 load_balancer: ProxyLoadBalancer) -> None:
        super().__init__(scope, id)
        statements = identity_statements(config)
        for statement in statements:
            task.task_role.add_to_policy(statement)
        if statements:
            NagSuppressions.add_resource_suppressions(task.task_role, [NagPackSuppression(
                id="AwsSolutions-IAM5", applies_to=["Resource::*"],
                reason="ec2:DescribeNetworkInterfaces has no resource-level permissions (EC2 Describe actions); "
                       "ecs:ListTasks's resource type is the container instance, which Fargate tasks lack, so it "
                       "is limited to the selectors' clusters by the ecs:cluster condition instead.",
            )], apply_to_children=True)
            NagSuppressions.add_resource_suppressions(task.task_role, [NagPackSuppression(
                id="AwsSolutions-IAM5", applies_to=[{"regex": "/^Resource::arn:.*:task/.*\\*$/"}],
                reason="ecs:DescribeTasks on the tasks of the clusters the ecs: selectors name: task IDs are "
                       "not known in advance.",
            )], apply_to_children=True)
        self.endpoint_service: ec2.VpcEndpointService | None = None
        if config.endpoint_service:
            self._share(config, task, load_balancer)

    def _share(self, config: IdentityConfig, task: ProxyTask, load_balancer: ProxyLoadBalancer) -> None:
        stack = Stack.of(self)
        subnet_cidrs = CfnParameter(
            stack, "LoadBalancerSubnetCidrs",
            type="CommaDelimitedList",
            description="CIDRs of the load balancer's subnets (PrivateSubnetIds): the only addresses allowed to "
                        "send the PROXY protocol header that carries each consumer's address and endpoint ID.",
        )
        self.endpoint_service = ec2.VpcEndpointService(
            self, "EndpointService", vpc_endpoint_service_load_balancers=[load_balancer.load_balancer],
            acceptance_required=config.acceptance_required,
            allowed_principals=[iam.ArnPrincipal(arn) for arn in config.allowed_principals],
        )
        target_group = load_balancer.target_group
        # The consumer's address and endpoint ID reach the proxy only in the PROXY header; the TCP peer is the
        # NLB for every connection (PrivateLink traffic never preserves client IPs; local clients stop too), so a
        # header is accepted from the NLB's subnets only.
        target_group.set_attribute("proxy_protocol_v2.enabled", "true")
        target_group.set_attribute("preserve_client_ip.enabled", "false")
        # Consumers reach the NLB through PrivateLink from their own address ranges; who may connect is decided by
        # the allowed principals, acceptance and the proxy's vpce- policies, not by the NLB's security group.
        l1(load_balancer.load_balancer).add_property_override(
            "EnforceSecurityGroupInboundRulesOnPrivateLinkTraffic", "off")
        task.container.add_environment("EGRESS_PROXY_PROTOCOL", "required")
        task.container.add_environment("EGRESS_PROXY_PROTOCOL_FROM", Fn.join(",", subnet_cidrs.value_as_list))
        CfnOutput(stack, "EndpointServiceName",
                  value=self.endpoint_service.vpc_endpoint_service_name,
                  # Exported like every other output of the stack (<stack name>-<output name>).
                  export_name=Fn.join("-", [Aws.STACK_NAME, "EndpointServiceName"]),
                  description="Service name consumers create their interface endpoint for (then point "
                              "HTTPS_PROXY at the endpoint's DNS name).")

