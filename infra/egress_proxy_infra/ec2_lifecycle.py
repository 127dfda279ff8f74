"""EC2 mode: the two Lambda functions that make the Auto Scaling group safe to launch into and to delete.

* `EipClaimHook`: a launch lifecycle hook holds each new instance in Pending:Wait while a Lambda function
  associates one Elastic IP of the pool with it (AllowReassociation=false is the lock), then completes the
  action (CONTINUE, or ABANDON when the pool is exhausted). Nothing runs on the instance for this, so the
  minimal ECS AMI needs no AWS CLI, and the instance role needs no EC2 permission at all.
* `GroupMaintenance`: a custom resource that starts an instance refresh when the launch template gets a new
  version (a new AMI or instance type), and on stack delete lifts the scale-in protection ECS managed
  termination protection put on the instances, so that deleting the group cannot hang on them.

Both functions are inline code (lambda_src/), so the template keeps no assets (see lambda_src/__init__.py).
"""

from __future__ import annotations

from importlib import resources

from aws_cdk import ArnFormat, Aws, CustomResource, Duration, Fn, RemovalPolicy, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra.eip_pool import POOL_TAG_KEY, ElasticIpPool
from egress_proxy_infra.l1 import l1

#: CloudFormation's limit for inline (ZipFile) Lambda code (AWS::Lambda::Function Code, ZipFile).
INLINE_CODE_LIMIT = 4096
RUNTIME = lambda_.Runtime.PYTHON_3_14
#: How long the group waits for the hook before it applies the default result (ABANDON).
HOOK_HEARTBEAT = Duration.minutes(5)
#: The claim function's own limit: enough for claim_eip's attempts with their pauses (about 40 x 2 s).
CLAIM_TIMEOUT = Duration.minutes(3)
#: What the claim function logs when the pool is exhausted; the EipPoolExhausted alarm counts these lines.
POOL_EXHAUSTED_MARKER = "egress-proxy: no free Elastic IP in pool"
#: What the maintenance function logs when it could not start an instance refresh (lambda_src/group_maintenance).
REFRESH_NOT_STARTED_MARKER = "egress-proxy: instance refresh not started"


def inline_source(module: str) -> str:
    """The handler's source, as CloudFormation will store it."""
    source = (resources.files("egress_proxy_infra.lambda_src") / f"{module}.py").read_text()
    if len(source) > INLINE_CODE_LIMIT:
        raise ValueError(f"lambda_src/{module}.py has {len(source)} characters; inline code allows "
                         f"{INLINE_CODE_LIMIT}: shorten it")
    return source


def _function(scope: Construct, id: str, *, module: str, description: str, timeout: Duration,
              environment: dict[str, str] | None = None) -> tuple[lambda_.Function, logs.LogGroup]:
    """A Python function from lambda_src/<module>.py with its own log group and a role that may write only there."""
    log_group = logs.LogGroup(scope, f"{id}Logs", retention=logs.RetentionDays.THREE_MONTHS,
                              removal_policy=RemovalPolicy.DESTROY)
    role = iam.Role(scope, f"{id}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                    description=description)
    function = lambda_.Function(
        scope, id, runtime=RUNTIME, handler="index.handler", code=lambda_.Code.from_inline(inline_source(module)),
        description=description, timeout=timeout, memory_size=128, role=role, log_group=log_group,
        environment=environment,
    )
    # The log group's Arn attribute already ends in ":*" (its streams): nothing else in CloudWatch Logs.
    log_group.grant_write(role)
    # CDK makes the function depend on the whole role construct; the role itself is already implied by the
    # Fn::GetAtt of its ARN (cfn-lint W3005), so keep only the policy, which must exist before the first call.
    policy = l1(role.node.find_child("DefaultPolicy"))
    l1(function).add_override("DependsOn", [Stack.of(scope).get_logical_id(policy)])
    return function, log_group


class EipClaimHook(Construct):
    """Launch lifecycle hook -> EventBridge -> claim function -> CompleteLifecycleAction."""

    def __init__(self, scope: Construct, id: str, *, eip_pool: ElasticIpPool) -> None:
        super().__init__(scope, id)
        # Fixed per stack, so that the rule can match it without referring to the group (which depends on it).
        self.hook_name = Fn.join("-", [Aws.STACK_NAME, "claim-eip"])
        self.function, self.log_group = _function(
            self, "Function", module="claim_eip", timeout=CLAIM_TIMEOUT,
            description="egress-proxy: associate a pool Elastic IP with each launching proxy instance",
            environment={"POOL_TAG_KEY": POOL_TAG_KEY, "POOL_TAG_VALUE": eip_pool.pool_tag_value},
        )
        role = self.function.role
        assert role is not None
        eip_pool.grant_associate(role)
        self._grant_complete(role, pool_tag_value=eip_pool.pool_tag_value)

        # Lifecycle actions reach EventBridge without any notification target on the hook
        # (Amazon EC2 Auto Scaling User Guide, "Use EventBridge to handle Auto Scaling events").
        self.rule = events.Rule(
            self, "LaunchRule",
            description="egress-proxy: proxy instance launching; claim an Elastic IP for it",
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"], detail_type=["EC2 Instance-launch Lifecycle Action"],
                detail={"LifecycleHookName": [self.hook_name]},
            ),
            targets=[targets.LambdaFunction(self.function, retry_attempts=2)],
        )

    def hook_specification(self) -> dict[str, object]:
        """The group's LifecycleHookSpecificationList entry.

        On the group itself rather than a separate AWS::AutoScaling::LifecycleHook: a separate hook can be
        created after the group's first instances launched, which would then never get an address
        (AWS CloudFormation User Guide, AWS::AutoScaling::LifecycleHook). ABANDON when nobody answers.
        """
        return {
            "LifecycleHookName": self.hook_name,
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "DefaultResult": "ABANDON",
            "HeartbeatTimeout": int(HOOK_HEARTBEAT.to_seconds()),
        }

    def _grant_complete(self, role: iam.IRole, *, pool_tag_value: str) -> None:
        role.add_to_principal_policy(_pool_group_statement(
            self, "CompleteLaunchOfPoolGroupOnly", "autoscaling:CompleteLifecycleAction", pool_tag_value))
        NagSuppressions.add_resource_suppressions(role, [NagPackSuppression(
            id="AwsSolutions-IAM5",
            applies_to=[
                "Resource::arn:<AWS::Partition>:autoscaling:<AWS::Region>:<AWS::AccountId>:"
                "autoScalingGroup:*:autoScalingGroupName/*",
                *[f"Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:{kind}/*"
                  for kind in ("elastic-ip", "instance", "network-interface")],
                "Resource::*",
            ],
            reason="Scoped by the pool tag (aws:ResourceTag condition) instead of names: the group and its "
                   "instances depend on this function, so their ARNs cannot appear here. ec2:DescribeAddresses "
                   "has no resource-level permissions.",
        )], apply_to_children=True)


def _pool_group_statement(scope: Construct, sid: str, action: str, pool_tag_value: str) -> iam.PolicyStatement:
    """``action`` on Auto Scaling groups carrying this stack's pool tag only. A tag condition instead of the
    group's ARN: the group depends on the functions holding this statement, so its name cannot appear here."""
    return iam.PolicyStatement(
        sid=sid, actions=[action],
        resources=[Stack.of(scope).format_arn(
            service="autoscaling", resource="autoScalingGroup", resource_name="*:autoScalingGroupName/*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME)],
        conditions={"StringEquals": {f"aws:ResourceTag/{POOL_TAG_KEY}": pool_tag_value}},
    )


class GroupMaintenance(Construct):
    """Instance refresh on a new launch template version; on stack delete, unprotect the group's instances
    before CloudFormation deletes the group."""

    def __init__(self, scope: Construct, id: str, *, group: autoscaling.AutoScalingGroup,
                 launch_template_version: str, pool_tag_value: str) -> None:
        super().__init__(scope, id)
        self.function, self.log_group = _function(
            self, "Function", module="group_maintenance", timeout=Duration.minutes(2),
            description="egress-proxy: refresh the proxy instances on a new launch template version; on stack "
                        "delete, lift their scale-in protection",
        )
        role = self.function.role
        assert role is not None
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="DescribeGroups", actions=["autoscaling:DescribeAutoScalingGroups"], resources=["*"]))
        role.add_to_principal_policy(_pool_group_statement(
            self, "UnprotectPoolGroupOnly", "autoscaling:SetInstanceProtection", pool_tag_value))
        role.add_to_principal_policy(_pool_group_statement(
            self, "RefreshPoolGroupOnly", "autoscaling:StartInstanceRefresh", pool_tag_value))
        NagSuppressions.add_resource_suppressions(role, [NagPackSuppression(
            id="AwsSolutions-IAM5",
            applies_to=["Resource::*", "Resource::arn:<AWS::Partition>:autoscaling:<AWS::Region>:"
                        "<AWS::AccountId>:autoScalingGroup:*:autoScalingGroupName/*"],
            reason="autoscaling:DescribeAutoScalingGroups has no resource-level permissions; "
                   "SetInstanceProtection and StartInstanceRefresh are limited to groups carrying this stack's "
                   "pool tag.",
        )], apply_to_children=True)
        # Referencing the group makes this resource depend on it: CloudFormation updates it after the group (so the
        # refresh replaces instances with the group's new launch template version), and deletes it (running the
        # Delete handler) before the group.
        self.resource = CustomResource(
            self, "Resource", service_token=self.function.function_arn,
            resource_type="Custom::ProxyGroupMaintenance",
            properties={"AutoScalingGroupName": group.auto_scaling_group_name,
                        "LaunchTemplateVersion": launch_template_version},
        )
        # The function's policy must outlive the Delete call.
        self.resource.node.add_dependency(role)
