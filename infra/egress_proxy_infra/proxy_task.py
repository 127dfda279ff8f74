"""The proxy task definition shared by both capacity modes: container contract, roles and logs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Aws, CfnCondition, Duration, Fn, IgnoreMode, RemovalPolicy, Stack, Token
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra.allowlist_secret import AllowlistSecret
from egress_proxy_infra.config import Architecture
from egress_proxy_infra.l1 import l1
from egress_proxy_infra.parameters import NON_BLOCKING_MAX_BUFFER_SIZE

CONTAINER_NAME = "proxy"
#: Fargate task size; Squid is light, and CPU target tracking adds tasks before one saturates.
FARGATE_CPU = 512
FARGATE_MEMORY_MIB = 1024
#: EC2 reservation (one task per instance, so this only has to fit on the smallest sensible instance).
EC2_CPU = 1024
EC2_MEMORY_RESERVATION_MIB = 512

#: The image's user (container/Dockerfile: USER 13:13, Debian's `proxy`); Squid's workers run as it too.
PROXY_UID = 13
#: Destination ports the proxy allows (EGRESS_ALLOWED_PORTS); the security group's egress follows them.
ALLOWED_HTTP_PORTS = (80,)
ALLOWED_CONNECT_PORTS = (443,)
#: The image's state directory (EGRESS_STATE_DIR): rendered config, pid file, log FIFOs, the throwaway
#: ssl-bump key and the helpers.
STATE_DIR = "/var/lib/egress-proxy"
#: With a read-only root filesystem, the only writable paths: the state directory, and Squid's SMP IPC
#: sockets (Debian's squid uses /run/squid for them; /dev/shm, Squid's shared memory, is the runtime's tmpfs).
#: container/Dockerfile declares both as VOLUMEs owned by the proxy user, so ECS copies them, with that
#: ownership, into the task's empty volumes (Amazon ECS Developer Guide, "Bind mounts": without it a Fargate
#: bind mount is root-owned, mode 0755, which uid 13 could not write).
WRITABLE_PATHS = {"state": STATE_DIR, "squid-run": "/run/squid"}

_ECR_URI = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/(?P<repo>[^:@]+)"
    r"(?::(?P<tag>[^@]+)|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True, kw_only=True)
class ProxyEnvironment:
    """Values behind the container's EGRESS_* variables (tokens from parameters are fine)."""

    proxy_port: float
    allowlist_secret_arn: str
    dns_servers: str
    client_cidr: str
    reload_interval_seconds: str
    drain_seconds: str
    metrics_namespace: str
    #: The proxy's tunnel idle limit; the stack gives it the NLB's TCP idle timeout (see stack.py).
    tunnel_idle_timeout_seconds: int

    def as_env(self) -> dict[str, str]:
        return {
            "EGRESS_PORT": Token.as_string(self.proxy_port),
            "EGRESS_ALLOWLIST_SECRET": self.allowlist_secret_arn,
            "EGRESS_DNS_SERVERS": self.dns_servers,
            "EGRESS_CLIENT_CIDRS": self.client_cidr,
            "EGRESS_RELOAD_INTERVAL": self.reload_interval_seconds,
            "EGRESS_DRAIN_SECONDS": self.drain_seconds,
            "EGRESS_TUNNEL_IDLE_TIMEOUT": str(self.tunnel_idle_timeout_seconds),
            "EGRESS_METRICS": "on",
            "EGRESS_METRICS_NAMESPACE": self.metrics_namespace,
            "EGRESS_METRICS_INTERVAL": "60",
            "EGRESS_STATE_DIR": STATE_DIR,
            "EGRESS_ALLOWED_PORTS": ",".join([*(f"http:{p}" for p in ALLOWED_HTTP_PORTS),
                                              *(f"connect:{p}" for p in ALLOWED_CONNECT_PORTS)]),
            # boto3 then never asks instance metadata for the region (which the EC2 instances block for uid 13).
            "AWS_REGION": Aws.REGION,
            "AWS_DEFAULT_REGION": Aws.REGION,
        }


DOCKERFILE = "container/Dockerfile"
#: Used when container/Dockerfile.dockerignore is absent: what an image never needs from the repo root.
FALLBACK_EXCLUDES = [".git", "infra", "**/cdk.out", "**/node_modules", "**/.venv", "**/__pycache__",
                     "**/.pytest_cache", "**/.mypy_cache", "**/.ruff_cache", "**/*.egg-info", "state"]


def asset_excludes(asset_dir: Path) -> list[str]:
    """What CDK leaves out when it stages (copies and hashes) the build context.

    The Dockerfile's own ignore file (BuildKit's <Dockerfile>.dockerignore, which CDK does not read) is the
    source of truth, so staging copies only what the build uses and the asset hash changes only when the
    image would. The Dockerfile and its ignore file are always kept: the build needs them.
    """
    ignore_file = asset_dir / f"{DOCKERFILE}.dockerignore"
    if not ignore_file.is_file():
        return FALLBACK_EXCLUDES
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    return [*patterns, f"!{DOCKERFILE}", f"!{DOCKERFILE}.dockerignore"]


def container_image(scope: Construct, *, image_uri: str | None, asset_dir: Path,
                    arch: Architecture = Architecture.X86_64) -> ecs.ContainerImage:
    """The image: built from container/Dockerfile as an asset, or an existing image.

    The asset is built for `arch` explicitly: left to itself, Docker builds for the machine running
    `cdk deploy`, and an arm64 image built on an ARM laptop fails on x86_64 tasks with "exec format error".
    ECR URIs go through from_ecr_repository so the execution role is granted pull on that repository only;
    other registries (public images) need no grant. An existing image must be built for `arch` too.
    """
    if image_uri is None:
        platform = (ecr_assets.Platform.LINUX_AMD64 if arch is Architecture.X86_64
                    else ecr_assets.Platform.LINUX_ARM64)
        return ecs.ContainerImage.from_asset(
            str(asset_dir), file=DOCKERFILE, ignore_mode=IgnoreMode.DOCKER, exclude=asset_excludes(asset_dir),
            platform=platform)
    match = _ECR_URI.match(image_uri)
    if match:
        repository = ecr.Repository.from_repository_attributes(
            scope, "ImageRepository",
            repository_name=match["repo"],
            repository_arn=Stack.of(scope).format_arn(
                service="ecr", resource="repository", resource_name=match["repo"],
                region=match["region"], account=match["account"]),
        )
        return ecs.ContainerImage.from_ecr_repository(repository, match["digest"] or match["tag"] or "latest")
    return ecs.ContainerImage.from_registry(image_uri)


class ProxyTask(Construct):
    """Task definition, roles, log group and the one proxy container.

    Task role: read the allowlist secret and put metrics in MetricsNamespace, nothing else.
    Execution role: pull the image and write to the log group (CDK grants exactly those).
    """

    def __init__(
        self, scope: Construct, id: str, *,
        fargate: bool,
        image: ecs.ContainerImage,
        environment: ProxyEnvironment,
        allowlist: AllowlistSecret,
        log_retention_days: float,
        stop_timeout: Duration,
        log_driver_mode: str,
        non_blocking_logs: CfnCondition,
        arch: Architecture = Architecture.X86_64,
    ) -> None:
        super().__init__(scope, id)

        self.log_group = logs.LogGroup(
            self, "AccessLogs",
            # Access logs are the audit trail of what left the VPC; keep them when the stack goes.
            removal_policy=RemovalPolicy.RETAIN,
        )
        # Retention comes from a parameter, which the L2's enum cannot take.
        l1(self.log_group).add_property_override("RetentionInDays", log_retention_days)

        self.task_role = iam.Role(
            self, "TaskRole", assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com"),
            description="egress-proxy task: read the allowlist secret, put metrics in its namespace",
        )
        allowlist.grant_read(self.task_role)
        self.task_role.add_to_policy(iam.PolicyStatement(
            actions=["cloudwatch:PutMetricData"], resources=["*"],
            conditions={"StringEquals": {"cloudwatch:namespace": environment.metrics_namespace}},
        ))
        NagSuppressions.add_resource_suppressions(self.task_role, [NagPackSuppression(
            id="AwsSolutions-IAM5", applies_to=["Resource::*"],
            reason="cloudwatch:PutMetricData has no resource-level permissions; it is limited to the "
                   "MetricsNamespace by the cloudwatch:namespace condition.",
        )], apply_to_children=True)

        if fargate:
            self.task_definition: ecs.TaskDefinition = ecs.FargateTaskDefinition(
                self, "TaskDefinition", cpu=FARGATE_CPU, memory_limit_mib=FARGATE_MEMORY_MIB,
                task_role=self.task_role,
                runtime_platform=ecs.RuntimePlatform(
                    operating_system_family=ecs.OperatingSystemFamily.LINUX,
                    cpu_architecture=(ecs.CpuArchitecture.X86_64 if arch is Architecture.X86_64
                                      else ecs.CpuArchitecture.ARM64)),
            )
            cpu, memory_reservation = None, None
        else:
            # Host networking: the proxy's egress address is the instance's Elastic IP, and one task per
            # instance follows from the fixed host port.
            self.task_definition = ecs.Ec2TaskDefinition(
                self, "TaskDefinition", network_mode=ecs.NetworkMode.HOST, task_role=self.task_role)
            cpu, memory_reservation = EC2_CPU, EC2_MEMORY_RESERVATION_MIB

        self.container = self.task_definition.add_container(
            CONTAINER_NAME,
            image=image,
            essential=True,
            cpu=cpu,
            memory_reservation_mib=memory_reservation,
            environment=environment.as_env(),
            port_mappings=[ecs.PortMapping(
                container_port=environment.proxy_port,
                host_port=None if fargate else environment.proxy_port,
                protocol=ecs.Protocol.TCP)],
            health_check=ecs.HealthCheck(
                command=["CMD-SHELL", "egress-proxy health"],
                interval=Duration.seconds(15), timeout=Duration.seconds(5), retries=3,
                start_period=Duration.seconds(30),
            ),
            # The supervisor drains for EGRESS_DRAIN_SECONDS after SIGTERM and then exits; SIGKILL only after this.
            stop_timeout=stop_timeout,
            logging=ecs.LogDrivers.aws_logs(stream_prefix="proxy", log_group=self.log_group),
            # Read-only image; the proxy writes only to the WRITABLE_PATHS volumes.
            readonly_root_filesystem=True,
        )
        # Pinned, never left to the account's default (non-blocking since mid-2025 when unset). The L2 takes the
        # mode only as an enum, and the buffer size only belongs to non-blocking mode, hence the overrides.
        options = "ContainerDefinitions.0.LogConfiguration.Options"
        cfn_task = l1(self.task_definition)
        cfn_task.add_property_override(f"{options}.mode", log_driver_mode)
        cfn_task.add_property_override(f"{options}.max-buffer-size", Fn.condition_if(
            non_blocking_logs.logical_id, NON_BLOCKING_MAX_BUFFER_SIZE, Aws.NO_VALUE))
        for name, path in WRITABLE_PATHS.items():
            # No host path: a fresh, task-private directory that lives as long as the task.
            self.task_definition.add_volume(name=name)
            self.container.add_mount_points(ecs.MountPoint(container_path=path, source_volume=name, read_only=False))
        NagSuppressions.add_resource_suppressions(self.task_definition, [NagPackSuppression(
            id="AwsSolutions-ECS2",
            reason="The EGRESS_* variables are non-secret settings (port, CIDR, namespace, the allowlist "
                   "secret's ARN); the allowlist itself is read at run time by the task role.",
        )])
        execution_role = self.task_definition.obtain_execution_role()
        NagSuppressions.add_resource_suppressions(execution_role, [NagPackSuppression(
            id="AwsSolutions-IAM5", applies_to=["Resource::*"],
            reason="ecr:GetAuthorizationToken has no resource-level permissions; image pulls themselves are "
                   "limited to the image's repository.",
        )], apply_to_children=True)
