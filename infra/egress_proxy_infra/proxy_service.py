"""The ECS service running the proxy, one construct per capacity mode.

Both modes share the deployment and scaling policy (`_deployment_settings`, `_scale_on_cpu`): rolling
deployments that never go below the desired count (minimum healthy 100%) and roll back on failure (circuit
breaker), and CPU target tracking between the MinCapacity and MaxCapacity parameters.
"""

from __future__ import annotations

from typing import Any

import jsii
from aws_cdk import Aws, CfnCondition, CfnParameter, Duration, Fn
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra import subnets
from egress_proxy_infra.eip_pool import ElasticIpPool
from egress_proxy_infra.proxy_task import CONTAINER_NAME, ProxyTask

#: Average service CPU that target tracking holds.
CPU_TARGET_PERCENT = 60
#: Time a new task gets before failing NLB health checks count against it.
HEALTH_CHECK_GRACE = Duration.seconds(60)


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
    target = scaling.node.find_child("Target").node.default_child
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
    ) -> None:
        super().__init__(scope, id)
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=cluster.vpc, allow_all_outbound=True,
            description="egress-proxy tasks: in from the proxy load balancer only; out to the internet",
        )
        self.service = ecs.FargateService(
            self, "Service", cluster=cluster, task_definition=task.task_definition,
            assign_public_ip=True, security_groups=[self.security_group],
            vpc_subnets=subnets.placeholder_selection(self, "PublicSubnet", public_subnet_ids),
            platform_version=ecs.FargatePlatformVersion.LATEST,
            **_deployment_settings(),
        )
        subnets.override_with_list(
            self.service.node.default_child, "NetworkConfiguration.AwsvpcConfiguration.Subnets", public_subnet_ids)
        self.service.attach_to_network_target_group(target_group)
        _scale_on_cpu(self.service, min_capacity=min_capacity, max_capacity=max_capacity)


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
    ) -> None:
        super().__init__(scope, id)
        vpc = cluster.vpc
        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=True,
            description="egress-proxy instances: in from the proxy load balancer only; out to the internet",
        )
        self.instance_role = iam.Role(
            self, "InstanceRole", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="egress-proxy instance: ECS agent, SSM Session Manager, claim a pool Elastic IP",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        NagSuppressions.add_resource_suppressions(self.instance_role, [NagPackSuppression(
            id="AwsSolutions-IAM4",
            applies_to=["Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore"],
            reason="Session Manager is the recommended way into the instances (instead of SSH); this is "
                   "AWS's maintained minimal policy for it.",
        )])
        eip_pool.grant_associate(self.instance_role)

        user_data = ec2.UserData.for_linux()
        user_data.add_commands(*eip_pool.boot_script())
        # Host-networked tasks get task-role credentials only when the agent is told to serve them.
        user_data.add_commands("echo ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true >> /etc/ecs/ecs.config")

        self.launch_template = ec2.LaunchTemplate(
            self, "LaunchTemplate",
            machine_image=_ParameterImage(ami_id.value_as_string, user_data),
            instance_type=ec2.InstanceType(instance_type.value_as_string),
            user_data=user_data,
            role=self.instance_role,
            security_group=self.security_group,
            # A public IP only to reach the EC2 API at boot; the pool's Elastic IP replaces it.
            associate_public_ip_address=True,
            require_imdsv2=True,
            detailed_monitoring=True,
            block_devices=[ec2.BlockDevice(
                device_name="/dev/xvda",
                volume=ec2.BlockDeviceVolume.ebs(30, encrypted=True, volume_type=ec2.EbsDeviceVolumeType.GP3),
            )],
        )
        cfn_template = self.launch_template.node.default_child
        cfn_template.add_property_override(
            "LaunchTemplateData.KeyName",
            Fn.condition_if(has_key_name.logical_id, key_name.value_as_string, Aws.NO_VALUE))
        cfn_template.add_property_override("LaunchTemplateData.TagSpecifications", eip_pool.tag_specifications())

        self.auto_scaling_group = autoscaling.AutoScalingGroup(
            self, "Instances", vpc=vpc, launch_template=self.launch_template,
            vpc_subnets=subnets.placeholder_selection(self, "PublicSubnet", public_subnet_ids),
            # Never more instances than addresses: an instance without an address powers itself off.
            min_capacity=0, max_capacity=len(eip_pool.addresses),
        )
        cfn_asg = self.auto_scaling_group.node.default_child
        subnets.override_with_list(cfn_asg, "VPCZoneIdentifier", public_subnet_ids)
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
            reason="CDK's ECS agent policy: ecs:Submit* is limited to this cluster's ARN. Actions without resource-level permissions: ec2:DescribeAddresses (listing the Elastic IP "
                   "pool at boot) and the ECS agent's ecs:DiscoverPollEndpoint/ecs:Poll/ecs:StartTelemetrySession/"
                   "ecr:GetAuthorizationToken and friends.",
        )], apply_to_children=True)

        self.service = ecs.Ec2Service(
            self, "Service", cluster=cluster, task_definition=task.task_definition,
            capacity_provider_strategies=[ecs.CapacityProviderStrategy(
                capacity_provider=self.capacity_provider.capacity_provider_name, weight=1)],
            placement_constraints=[ecs.PlacementConstraint.distinct_instances()],
            placement_strategies=[ecs.PlacementStrategy.spread_across(ecs.BuiltInAttributes.AVAILABILITY_ZONE)],
            **_deployment_settings(),
        )
        self.service.attach_to_network_target_group(target_group)
        _scale_on_cpu(self.service, min_capacity=min_capacity, max_capacity=max_capacity)

