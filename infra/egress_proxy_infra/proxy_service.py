"""The ECS service running the proxy, one construct per capacity mode.

Both modes share the deployment and scaling policy (`_deployment_settings`, `_scale_on_cpu`): rolling
deployments that never go below the desired count (minimum healthy 100%) and roll back on failure (circuit
breaker), and CPU target tracking between the MinCapacity and MaxCapacity parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jsii
from aws_cdk import AspectPriority, Aspects, Aws, CfnCondition, CfnParameter, Duration, Fn, IAspect, Tags
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct, IConstruct

from egress_proxy_infra import subnets
from egress_proxy_infra.ec2_lifecycle import EipClaimHook, GroupMaintenance
from egress_proxy_infra.eip_pool import POOL_TAG_KEY, ElasticIpPool
from egress_proxy_infra.l1 import l1
from egress_proxy_infra.parameters import DnsServer
from egress_proxy_infra.proxy_task import ALLOWED_CONNECT_PORTS, ALLOWED_HTTP_PORTS, PROXY_UID, ProxyTask

#: Average service CPU that target tracking holds.
CPU_TARGET_PERCENT = 60
#: Time a new task gets before failing NLB health checks count against it.
HEALTH_CHECK_GRACE = Duration.seconds(60)


#: Instance metadata. Security groups never filter it (nor the Amazon DNS server, nor the ECS agent's
#: 169.254.170.2), so uid-level iptables on the instance is what keeps the proxy container away from it.
IMDS_ADDRESS = "169.254.169.254"
IMDS_BLOCK_UNIT = "egress-proxy-imds-block.service"
#: Inserted first in OUTPUT: packets from the proxy's uid to IMDS are rejected (a fast "connection refused"
#: rather than a timeout). Task credentials still come from the ECS agent at 169.254.170.2.
IMDS_BLOCK_RULE = (f"/usr/sbin/iptables -w -I OUTPUT 1 -d {IMDS_ADDRESS}/32 -m owner --uid-owner {PROXY_UID} "
                   "-j REJECT")


def restrict_egress(security_group: ec2.SecurityGroup, dns_servers: Sequence[DnsServer]) -> None:
    """Out: the proxy's allowed destination ports (the EGRESS_ALLOWED_PORTS the task sets) and DNS to the
    DnsServers only, nothing else.

    AWS API calls (Secrets Manager, CloudWatch, ECR, the ECS and SSM agents) use 443, which is already here.
    The VPC's own resolver, like IMDS, is not subject to security groups (Amazon VPC User Guide, "Security group
    rules": traffic to and from the Amazon DNS server is not filtered), so with DnsServers empty no DNS port opens.
    """
    allow_proxied_egress(security_group, ec2.Peer.any_ipv4(), "Proxied traffic and AWS APIs")
    for index, server in enumerate(dns_servers, start=1):
        for protocol in ("udp", "tcp"):
            rule = ec2.CfnSecurityGroupEgress(
                security_group, f"DnsServer{index}{protocol.upper()}", group_id=security_group.security_group_id,
                ip_protocol=protocol, from_port=53, to_port=53, cidr_ip=server.cidr,
                description=f"DNS over {protocol.upper()} to DnsServers entry {index}")
            rule.cfn_options.condition = server.condition


def allow_proxied_egress(security_group: ec2.SecurityGroup, peer: ec2.IPeer, what: str) -> None:
    """Out to ``peer`` on the ports the proxy forwards to (EGRESS_ALLOWED_PORTS), one rule per port."""
    for port in sorted({*ALLOWED_HTTP_PORTS, *ALLOWED_CONNECT_PORTS}):
        security_group.add_egress_rule(peer, ec2.Port.tcp(port), f"{what} (tcp/{port})")


def grant_ecs_agent(role: iam.Role, cluster: ecs.ICluster) -> None:
    """The ECS container agent's permissions, and nothing else: registration and state changes on this cluster,
    polling for work (Amazon ECS Developer Guide, "Amazon ECS container instance IAM role"). Image pulls and
    awslogs use the task's execution role, so the instance needs neither ECR nor CloudWatch Logs."""
    role.add_to_policy(iam.PolicyStatement(
        sid="RegisterWithThisCluster",
        actions=["ecs:DeregisterContainerInstance", "ecs:RegisterContainerInstance", "ecs:Submit*"],
        resources=[cluster.cluster_arn]))
    role.add_to_policy(iam.PolicyStatement(
        sid="PollThisCluster", actions=["ecs:Poll", "ecs:StartTelemetrySession"], resources=["*"],
        conditions={"ArnEquals": {"ecs:cluster": cluster.cluster_arn}}))
    role.add_to_policy(iam.PolicyStatement(
        sid="FindThePollEndpoint", actions=["ecs:DiscoverPollEndpoint"], resources=["*"]))


def imds_block_script() -> list[str]:
    """User-data lines: a boot-time unit that keeps uid PROXY_UID away from IMDS, before Docker and ECS start.

    A unit, not a one-off command, so that a reboot (which does not re-run user data) keeps the rule.
    Fail closed: without the rule the instance powers off rather than run the proxy next to the instance
    role's credentials.
    """
    return [
        "# --- the proxy's uid may not reach instance metadata (and so the instance role's credentials) ---",
        f"cat > /etc/systemd/system/{IMDS_BLOCK_UNIT} <<'UNIT'",
        "[Unit]",
        f"Description=egress-proxy: uid {PROXY_UID} may not reach instance metadata ({IMDS_ADDRESS})",
        "Before=docker.service ecs.service",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"ExecStart={IMDS_BLOCK_RULE}",
        "[Install]",
        "WantedBy=multi-user.target",
        "UNIT",
        f"if ! {{ systemctl daemon-reload && systemctl enable --now {IMDS_BLOCK_UNIT}; }}; then",
        f'  echo "egress-proxy: could not block uid {PROXY_UID} from {IMDS_ADDRESS} (systemctl status '
        f'{IMDS_BLOCK_UNIT}); powering off" >&2',
        "  shutdown -h now",
        "  exit 1",
        "fi",
    ]


def _deployment_settings() -> dict[str, Any]:
    return {
        "circuit_breaker": ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
        "min_healthy_percent": 100,
        "max_healthy_percent": 200,
        "health_check_grace_period": HEALTH_CHECK_GRACE,
        # DesiredCount stays unset on purpose: CloudFormation would otherwise reset a scaled-out service to
        # it on every stack update. Application Auto Scaling raises it to MinCapacity after creation.
        "desired_count": None,
    }


def _scale_on_cpu(service: ecs.BaseService, *, min_capacity: CfnParameter, max_capacity: CfnParameter) -> None:
    scaling = service.auto_scale_task_count(min_capacity=2, max_capacity=4)  # placeholders, overridden below
    scaling.scale_on_cpu_utilization(
        "CpuTargetTracking", target_utilization_percent=CPU_TARGET_PERCENT,
        scale_out_cooldown=Duration.seconds(60), scale_in_cooldown=Duration.seconds(300),
    )
    target = l1(scaling.node.find_child("Target"))
    target.add_property_override("MinCapacity", min_capacity.value_as_number)
    target.add_property_override("MaxCapacity", max_capacity.value_as_number)


class FargateProxyService(Construct):
    """Fargate tasks in the public subnets with public IPs (so no NAT): egress IPs are not fixed."""

    def __init__(
        self, scope: Construct, id: str, *,
        cluster: ecs.ICluster,
        task: ProxyTask,
        public_subnet_ids: CfnParameter,
        target_group: elbv2.INetworkTargetGroup,
        min_capacity: CfnParameter,
        max_capacity: CfnParameter,
        dns_servers: Sequence[DnsServer],
    ) -> None:
        super().__init__(scope, id)
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=cluster.vpc, allow_all_outbound=False,
            description="egress-proxy tasks: in from the proxy load balancer only; out on the proxy ports and DNS",
        )
        restrict_egress(self.security_group, dns_servers)
        self.service = ecs.FargateService(
            self, "Service", cluster=cluster, task_definition=task.task_definition,
            assign_public_ip=True, security_groups=[self.security_group],
            vpc_subnets=subnets.placeholder_selection(self, "PublicSubnet", public_subnet_ids),
            platform_version=ecs.FargatePlatformVersion.LATEST,
            **_deployment_settings(),
        )
        subnets.override_with_list(
            l1(self.service), "NetworkConfiguration.AwsvpcConfiguration.Subnets", public_subnet_ids)
        self.service.attach_to_network_target_group(target_group)
        _scale_on_cpu(self.service, min_capacity=min_capacity, max_capacity=max_capacity)


@jsii.implements(IAspect)
class _DependOnCapacityProviderAssociation:
    """Make the ECS service depend on the cluster's AWS::ECS::ClusterCapacityProviderAssociations."""

    def __init__(self, service: ecs.CfnService) -> None:
        self._service = service

    def visit(self, node: IConstruct) -> None:
        if isinstance(node, ecs.CfnClusterCapacityProviderAssociations):
            self._service.add_resource_dependency(node)


@jsii.implements(ec2.IMachineImage)
class _ParameterImage:
    """The AMI from the AmiId parameter (an SSM-resolved image ID, only known at deploy time)."""

    def __init__(self, image_id: str, user_data: ec2.UserData) -> None:
        self._image_id = image_id
        self._user_data = user_data

    def get_image(self, scope: Construct) -> ec2.MachineImageConfig:
        return ec2.MachineImageConfig(
            image_id=self._image_id, os_type=ec2.OperatingSystemType.LINUX, user_data=self._user_data)


class Ec2ProxyService(Construct):
    """ECS on an EC2 Auto Scaling group in the public subnets: host networking, one task per instance,
    each instance egressing from an Elastic IP of the pool."""

    def __init__(
        self, scope: Construct, id: str, *,
        cluster: ecs.Cluster,
        task: ProxyTask,
        public_subnet_ids: CfnParameter,
        target_group: elbv2.INetworkTargetGroup,
        min_capacity: CfnParameter,
        max_capacity: CfnParameter,
        instance_type: CfnParameter,
        ami_id: CfnParameter,
        key_name: CfnParameter,
        has_key_name: CfnCondition,
        eip_pool: ElasticIpPool,
        dns_servers: Sequence[DnsServer],
    ) -> None:
        super().__init__(scope, id)
        vpc = cluster.vpc
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=False,
            description="egress-proxy instances: in from the proxy load balancer only; out on the proxy ports and DNS",
        )
        restrict_egress(self.security_group, dns_servers)
        self.instance_role = iam.Role(
            self, "InstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="egress-proxy instance: ECS agent and SSM Session Manager only",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        grant_ecs_agent(self.instance_role, cluster)
        NagSuppressions.add_resource_suppressions(self.instance_role, [NagPackSuppression(
            id="AwsSolutions-IAM4",
            applies_to=["Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore"],
            reason="Session Manager is the recommended way into the instances (instead of SSH); this is "
                   "AWS's maintained minimal policy for it.",
        )])
        # The instance role gets no EC2 permission: the lifecycle hook's function associates the address.
        self.eip_claim = EipClaimHook(self, "EipClaim", eip_pool=eip_pool)

        user_data = ec2.UserData.for_linux()
        user_data.add_commands(*imds_block_script())
        user_data.add_commands(*eip_pool.wait_script())
        # Host-networked tasks get task-role credentials only when the agent is told to serve them.
        user_data.add_commands("echo ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true >> /etc/ecs/ecs.config")

        self.launch_template = ec2.LaunchTemplate(
            self, "LaunchTemplate",
            machine_image=_ParameterImage(ami_id.value_as_string, user_data),
            instance_type=ec2.InstanceType(instance_type.value_as_string),
            user_data=user_data,
            # What the cluster grants the group's role is not wanted: it adds logs:CreateLogStream and
            # logs:PutLogEvents on "*" (and ecr:GetAuthorizationToken), which awslogs and image pulls only need
            # without an execution role; this task has one. The agent's own permissions are granted above.
            role=self.instance_role.without_policy_updates(),
            security_group=self.security_group,
            # The user data powers the instance off when it cannot protect IMDS or get a pool address: terminate
            # it then, so a stopped instance never keeps holding an Elastic IP (the group replaces it).
            instance_initiated_shutdown_behavior=ec2.InstanceInitiatedShutdownBehavior.TERMINATE,
            # Burstable types (t3/t4g) default to unlimited, billed per surplus vCPU-hour; standard caps the cost
            # and throttles instead. Ignored by other instance types.
            cpu_credits=ec2.CpuCredits.STANDARD,
            # No temporary public address: the instance's only public address is the pool's Elastic IP, which
            # the lifecycle hook associates while the instance waits (it needs the internet for nothing before).
            associate_public_ip_address=False,
            require_imdsv2=True,
            detailed_monitoring=True,
            block_devices=[ec2.BlockDevice(
                device_name="/dev/xvda",
                volume=ec2.BlockDeviceVolume.ebs(30, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3),
            )],
        )
        cfn_template = l1(self.launch_template)
        cfn_template.add_property_override(
            "LaunchTemplateData.KeyName",
            Fn.condition_if(has_key_name.logical_id, key_name.value_as_string, Aws.NO_VALUE))
        cfn_template.add_property_override("LaunchTemplateData.TagSpecifications", eip_pool.tag_specifications())

        self.auto_scaling_group = autoscaling.AutoScalingGroup(
            self, "Instances", vpc=vpc, launch_template=self.launch_template,
            vpc_subnets=subnets.placeholder_selection(self, "PublicSubnet", public_subnet_ids),
            # Never more instances than addresses: an instance without an address powers itself off.
            min_capacity=0, max_capacity=eip_pool.size,
        )
        cfn_asg = l1(self.auto_scaling_group)
        subnets.override_with_list(cfn_asg, "VPCZoneIdentifier", public_subnet_ids)
        cfn_asg.add_property_override("LifecycleHookSpecificationList", [self.eip_claim.hook_specification()])
        # The functions' IAM conditions recognise this group by the pool tag.
        Tags.of(self.auto_scaling_group).add(POOL_TAG_KEY, eip_pool.pool_tag_value, apply_to_launched_instances=False)
        # Create: the addresses and the claim path exist before the first launch. Delete: the instances are gone
        # before the addresses are released (otherwise CloudFormation releases addresses still in use).
        for address in eip_pool.addresses:
            self.auto_scaling_group.node.add_dependency(address)
        self.auto_scaling_group.node.add_dependency(self.eip_claim)
        NagSuppressions.add_resource_suppressions(self.auto_scaling_group, [NagPackSuppression(
            id="AwsSolutions-AS3",
            reason="Scaling is driven by the ECS capacity provider and watched through the dashboard and "
                   "alarms; ASG notifications would add nothing actionable.",
        )], apply_to_children=True)

        self.capacity_provider = ecs.AsgCapacityProvider(
            self, "CapacityProvider", auto_scaling_group=self.auto_scaling_group,
            enable_managed_termination_protection=True, enable_managed_draining=True,
            target_capacity_percent=100,
        )
        cluster.add_asg_capacity_provider(self.capacity_provider)
        NagSuppressions.add_resource_suppressions(self.instance_role, [NagPackSuppression(
            id="AwsSolutions-IAM5", applies_to=["Resource::*", "Action::ecs:Submit*"],
            reason="The ECS agent's own actions only: ecs:Submit* is limited to this cluster's ARN; "
                   "ecs:Poll and ecs:StartTelemetrySession to this cluster by the ecs:cluster condition; "
                   "ecs:DiscoverPollEndpoint has no resource-level permissions.",
        )], apply_to_children=True)
        self.maintenance = GroupMaintenance(
            self, "GroupMaintenance", group=self.auto_scaling_group,
            launch_template_version=self.launch_template.latest_version_number,
            pool_tag_value=eip_pool.pool_tag_value)

        self.service = ecs.Ec2Service(
            self, "Service", cluster=cluster, task_definition=task.task_definition,
            capacity_provider_strategies=[ecs.CapacityProviderStrategy(
                capacity_provider=self.capacity_provider.capacity_provider_name, weight=1)],
            placement_constraints=[ecs.PlacementConstraint.distinct_instances()],
            placement_strategies=[ecs.PlacementStrategy.spread_across(ecs.BuiltInAttributes.AVAILABILITY_ZONE)],
            **_deployment_settings(),
        )
        # Create: a service whose capacity provider is not yet associated with the cluster fails ("capacity
        # provider ... not associated"). Delete: the service (and its tasks) go before the association, and
        # before the release of scale-in protection, which then runs with no task left to re-protect an instance.
        # The association only appears during synthesis (the cluster's own aspect creates it), hence an aspect.
        Aspects.of(cluster).add(_DependOnCapacityProviderAssociation(l1(self.service, ecs.CfnService)),
                                priority=AspectPriority.READONLY)
        self.service.node.add_dependency(self.maintenance)
        self.service.attach_to_network_target_group(target_group)
        _scale_on_cpu(self.service, min_capacity=min_capacity, max_capacity=max_capacity)

