"""CloudFormation parameters, named after the seed's (see the table in docs/deploy-aws.md).

They are created on the stack itself (not inside a construct) so that their logical IDs are exactly these
names and the synthesized template can be launched from the CloudFormation console like the seed's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from aws_cdk import CfnCondition, CfnParameter, CfnRule, CfnRuleAssertion, Fn, ICfnConditionExpression, Stack, Token

from egress_proxy_infra.config import MAX_DRAIN_SECONDS, Architecture, CapacityMode, InfraConfig

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
#: An IPv4 CIDR whose prefix is /8../32, as in the seed's NetworkAllowedCIDR.
CLIENT_CIDR_PATTERN = rf"^{_IPV4}/([8-9]|[12][0-9]|3[0-2])$"
#: The security group opens DNS to each configured server by itself (one rule per address), so their number
#: is bounded; four is more than any filtering DNS service hands out.
MAX_DNS_SERVERS = 4
#: Empty (use the VPC resolver) or up to MAX_DNS_SERVERS comma-separated IPv4 addresses, no spaces (each one
#: becomes a security group rule's CidrIp as it is).
DNS_SERVERS_PATTERN = rf"^$|^{_IPV4}(,{_IPV4}){{0,{MAX_DNS_SERVERS - 1}}}$"
#: CloudWatch namespaces: 1..255 of these characters and not starting with "AWS/" (reserved for AWS).
METRICS_NAMESPACE_PATTERN = r"^(?!AWS/)[0-9A-Za-z.\-_/#:]{1,255}$"
#: Values CloudWatch Logs accepts for RetentionInDays.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557,
                      2922, 3288, 3653)
#: Latest ECS-optimized Amazon Linux 2023 AMI per architecture, resolved by CloudFormation at deploy time
#: (Amazon ECS Developer Guide, "Retrieving Amazon ECS-optimized Linux AMI metadata").
ECS_AL2023_AMI_SSM_PARAMETERS = {
    Architecture.X86_64: "/aws/service/ecs/optimized-ami/amazon-linux-2023/recommended/image_id",
    Architecture.ARM64: "/aws/service/ecs/optimized-ami/amazon-linux-2023/arm64/recommended/image_id",
}
ECS_AL2023_AMI_SSM_PARAMETER = ECS_AL2023_AMI_SSM_PARAMETERS[Architecture.X86_64]
#: Instance types of the architecture: Intel/AMD, or Graviton (the "g" after the generation digit).
DEFAULT_INSTANCE_TYPES = {Architecture.X86_64: "t3.small", Architecture.ARM64: "t4g.small"}
INSTANCE_TYPE_PATTERNS = {
    Architecture.X86_64: r"^(?![a-z]+[0-9]g)[a-z][a-z0-9-]*\.[a-z0-9]+$",
    Architecture.ARM64: r"^[a-z]+[0-9]g[a-z0-9-]*\.[a-z0-9]+$",
}

#: Empty: an empty allowlist (see allowlist_secret.py and docs/deploy-aws.md, "Private AWS endpoints").
DEFAULT_ALLOWED_DOMAINS = ""
DEFAULT_CLIENT_CIDR = "172.31.0.0/16"
DEFAULT_PROXY_PORT = 3128
DEFAULT_INSTANCE_TYPE = DEFAULT_INSTANCE_TYPES[Architecture.X86_64]
#: Denied requests (all proxies together) per 5 minutes above which the DeniedRequestsSurge alarm fires.
DEFAULT_DENIED_REQUESTS_THRESHOLD = 500
DEFAULT_LOG_RETENTION_DAYS = 90
DEFAULT_METRICS_NAMESPACE = "Proxy"
DEFAULT_RELOAD_INTERVAL_SECONDS = 30
#: One proxy is allowed (the seed allowed one instance), with the availability warning in the description.
MIN_TASKS = 1
DEFAULT_MIN_TASKS = 2  # one per AZ in two AZs
#: The supervisor's graceful drain on SIGTERM (EGRESS_DRAIN_SECONDS's default in the container).
DEFAULT_DRAIN_SECONDS = 30
#: AWS's own default for a target group; the NLB accepts 0..3600 (Elastic Load Balancing User Guide for
#: NLBs, target group attributes, deregistration_delay.timeout_seconds).
DEFAULT_DEREGISTRATION_DELAY_SECONDS = 300
MAX_DEREGISTRATION_DELAY_SECONDS = 3600
#: dns_record.client_routing_policy values (Elastic Load Balancing User Guide for NLBs, "Availability Zone DNS
#: affinity"). Affinity by default: it keeps a client's connection to the NLB in the client's AZ and costs no
#: availability, because with cross-zone load balancing on every NLB node still reaches every proxy.
CLIENT_ROUTING_POLICIES = ("availability_zone_affinity", "partial_availability_zone_affinity",
                           "any_availability_zone")
DEFAULT_CLIENT_ROUTING_POLICY = "availability_zone_affinity"
#: awslogs delivery modes (Amazon ECS Developer Guide, "awslogs": mode). Blocking by default: the proxy keeps its
#: own bounded log buffer that never blocks Squid and counts what it drops (log.lines_dropped), and its
#: "no log, no traffic" setting needs a driver that pushes back.
LOG_DRIVER_MODES = ("blocking", "non-blocking")
#: ECS cluster setting containerInsights (Amazon ECS Developer Guide, "Container Insights"): its metrics are billed
#: as custom metrics, so it is a cost line of its own; the stack's dashboard and alarms do not need it.
CONTAINER_INSIGHTS_VALUES = ("enabled", "enhanced", "disabled")
#: The buffer the driver drops from in non-blocking mode (set explicitly rather than left to the 1 MB default).
NON_BLOCKING_MAX_BUFFER_SIZE = "25m"


@dataclass(frozen=True, kw_only=True)
class ProxyParameters:
    """Every parameter of the template; the EC2-only ones are None in fargate mode."""

    allowed_domains: CfnParameter
    dns_servers: CfnParameter
    proxy_port: CfnParameter
    vpc_id: CfnParameter
    public_subnet_ids: CfnParameter
    private_subnet_ids: CfnParameter
    client_cidr: CfnParameter
    min_capacity: CfnParameter
    max_capacity: CfnParameter
    log_retention_days: CfnParameter
    metrics_namespace: CfnParameter
    reload_interval_seconds: CfnParameter
    enable_vpc_endpoints: CfnParameter
    vpc_endpoint_route_table_ids: CfnParameter
    alarm_email: CfnParameter
    denied_requests_alarm_threshold: CfnParameter
    drain_seconds: CfnParameter
    deregistration_delay_seconds: CfnParameter
    client_routing_policy: CfnParameter
    cross_zone: CfnParameter
    log_driver_mode: CfnParameter
    container_insights: CfnParameter
    use_vpc_endpoints: CfnCondition
    use_s3_gateway_endpoint: CfnCondition
    has_alarm_email: CfnCondition
    non_blocking_logs: CfnCondition
    instance_type: CfnParameter | None = None
    ami_id: CfnParameter | None = None
    key_name: CfnParameter | None = None
    has_key_name: CfnCondition | None = None


def max_tasks_limit(config: InfraConfig) -> int:
    """Upper bound for MaxCapacity.

    In EC2 mode each task needs its own instance and each instance its own Elastic IP, and a rolling
    deployment (minimum healthy 100%) needs one spare instance to start a replacement before stopping an old
    task: so at most pool - 1 tasks. Fargate is bounded only by taste.
    """
    return config.eip_pool_size - 1 if config.capacity is CapacityMode.EC2 else 20


def define_parameters(stack: Stack, *, config: InfraConfig) -> ProxyParameters:
    ec2_mode = config.capacity is CapacityMode.EC2
    task_limit = max_tasks_limit(config)

    allowed_domains = CfnParameter(
        stack, "AllowedDomains", type="String", default=DEFAULT_ALLOWED_DOMAINS,
        description="Comma-separated domains the proxy allows; a leading dot also allows subdomains "
                    "(e.g. .example.org,api.partner.example). Empty (the default) denies everything: the "
                    "proxy's own AWS calls do not go through it. Seeds the allowlist secret; later changes can "
                    "go straight to the secret "
                    "(egress-proxy allowlist push) without a stack update.",
    )
    dns_servers = CfnParameter(
        stack, "DnsServers", type="String", default="", allowed_pattern=DNS_SERVERS_PATTERN,
        constraint_description=f"empty, or 1 to {MAX_DNS_SERVERS} comma-separated IPv4 addresses without spaces",
        description=f"Optional DNS servers for the proxy (e.g. a filtering DNS service): up to {MAX_DNS_SERVERS} "
                    "IPv4 addresses, comma-separated. Empty uses the VPC resolver, and opens no DNS port. "
                    "Changing it replaces every task.",
    )
    proxy_port = CfnParameter(
        stack, "ProxyPort", type="Number", default=DEFAULT_PROXY_PORT, min_value=1024, max_value=65535,
        description="TCP port of the proxy, on the load balancer and on the proxies. Changing it replaces every "
                    "task.",
    )
    vpc_id = CfnParameter(
        stack, "VpcId", type="AWS::EC2::VPC::Id",
        description="The VPC to deploy into (it needs an internet gateway for the public subnets).",
    )
    public_subnet_ids = CfnParameter(
        stack, "PublicSubnetIds", type="List<AWS::EC2::Subnet::Id>",
        description="2-3 public subnets in different AZs (routed to an internet gateway): the proxies.",
    )
    private_subnet_ids = CfnParameter(
        stack, "PrivateSubnetIds", type="List<AWS::EC2::Subnet::Id>",
        description="2-3 private subnets in different AZs: the internal Network Load Balancer.",
    )
    client_cidr = CfnParameter(
        stack, "ClientCidr", type="String", default=DEFAULT_CLIENT_CIDR, allowed_pattern=CLIENT_CIDR_PATTERN,
        constraint_description="an IPv4 CIDR block with a /8 to /32 prefix, e.g. 10.0.0.0/16",
        description="Clients allowed to use the proxy (/8 to /32). Admitted by the load balancer's security "
                    "group and by the proxy itself. Changing it replaces every task.",
    )
    min_capacity = CfnParameter(
        stack, "MinCapacity", type="Number", default=DEFAULT_MIN_TASKS, min_value=MIN_TASKS, max_value=task_limit,
        description="Minimum number of proxies, spread across AZs. 2 or more for availability: with 1, losing "
                    "that proxy or its AZ stops all egress until a replacement is healthy (minutes).",
    )
    max_capacity = CfnParameter(
        stack, "MaxCapacity", type="Number", default=min(4, task_limit), min_value=MIN_TASKS,
        max_value=task_limit,
        description="Maximum number of proxies for CPU target tracking"
                    + (f" (at most {task_limit}: the Elastic IP pool of {config.eip_pool_size} keeps one spare "
                       "for rolling deployments)." if ec2_mode else "."),
    )
    log_retention_days = CfnParameter(
        stack, "LogRetentionDays", type="Number", default=str(DEFAULT_LOG_RETENTION_DAYS),
        allowed_values=[str(days) for days in LOG_RETENTION_DAYS],
        description="Days to keep the proxy access logs in CloudWatch Logs.",
    )
    metrics_namespace = CfnParameter(
        stack, "MetricsNamespace", type="String", default=DEFAULT_METRICS_NAMESPACE,
        allowed_pattern=METRICS_NAMESPACE_PATTERN,
        constraint_description="1-255 characters of [0-9A-Za-z.-_/#:], not starting with AWS/",
        description="CloudWatch namespace of the proxy metrics (the task may publish only here). Changing it "
                    "replaces every task.",
    )
    reload_interval = CfnParameter(
        stack, "ReloadIntervalSeconds", type="Number", default=DEFAULT_RELOAD_INTERVAL_SECONDS,
        min_value=5, max_value=3600,
        description="How often the proxies poll the allowlist secret; allowlist changes apply without dropping "
                    "connections. Changing this interval replaces every task.",
    )

    enable_vpc_endpoints = CfnParameter(
        stack, "EnableVpcEndpoints", type="String", default="false", allowed_values=["true", "false"],
        description="true: create interface endpoints (Secrets Manager, CloudWatch, CloudWatch Logs, ECR api and "
                    "dkr) with private DNS in PrivateSubnetIds. The VPC must have DNS hostnames and DNS support "
                    "on, and no such endpoints yet.",
    )
    vpc_endpoint_route_table_ids = CfnParameter(
        stack, "VpcEndpointRouteTableIds", type="CommaDelimitedList", default="",
        description="With EnableVpcEndpoints: route tables for an S3 gateway endpoint (limited to this account's "
                    "buckets and ECR's image layers), e.g. the public subnets' and the clients'. Empty: none.",
    )
    alarm_email = CfnParameter(
        stack, "AlarmEmail", type="String", default="",
        allowed_pattern=r"^$|^[^\s@]+@[^\s@]+\.[^\s@]+$", constraint_description="empty, or one email address",
        description="Optional email address subscribed to the alarm topic (confirm the subscription email).",
    )
    denied_threshold = CfnParameter(
        stack, "DeniedRequestsAlarmThreshold", type="Number", default=DEFAULT_DENIED_REQUESTS_THRESHOLD,
        min_value=1,
        description="Denied requests (all proxies) per 5 minutes above which the DeniedRequestsSurge alarm fires.",
    )
    drain_seconds = CfnParameter(
        stack, "DrainSeconds", type="Number", default=DEFAULT_DRAIN_SECONDS, min_value=0, max_value=MAX_DRAIN_SECONDS,
        description="After SIGTERM, how long a stopping proxy keeps its open connections before it closes them "
                    f"(0-{MAX_DRAIN_SECONDS}: ECS kills the task 120 s after SIGTERM). Changing it replaces every "
                    "task.",
    )
    deregistration_delay = CfnParameter(
        stack, "DeregistrationDelaySeconds", type="Number", default=DEFAULT_DEREGISTRATION_DELAY_SECONDS,
        min_value=0, max_value=MAX_DEREGISTRATION_DELAY_SECONDS,
        description="On a deployment, scale-in or instance replacement, how long a proxy keeps serving its open "
                    "connections (and gets no new ones) before ECS stops it (0-3600). A connection longer than "
                    "this plus DrainSeconds (WebSockets, long downloads) is cut; each deployment takes at least "
                    "this long.",
    )
    client_routing_policy = CfnParameter(
        stack, "ClientRoutingPolicy", type="String", default=DEFAULT_CLIENT_ROUTING_POLICY,
        allowed_values=list(CLIENT_ROUTING_POLICIES),
        description="Which load balancer addresses the load balancer's DNS name gives a client that uses the VPC "
                    "resolver: those in the client's own AZ (availability_zone_affinity), 85% of the time "
                    "(partial_...), or any (any_availability_zone). Affinity avoids one AZ crossing, billed per GB.",
    )
    cross_zone = CfnParameter(
        stack, "CrossZoneLoadBalancing", type="String", default="true", allowed_values=["true", "false"],
        description="true: every load balancer node forwards to proxies in every AZ (a crossing for most bytes "
                    "when there are 2 AZs, billed per GB). false: only to proxies in its own AZ; an AZ with no "
                    "healthy proxy leaves DNS, and every AZ of PrivateSubnetIds then needs public subnets and "
                    "enough proxies of its own.",
    )
    log_driver_mode = CfnParameter(
        stack, "LogDriverMode", type="String", default="blocking", allowed_values=list(LOG_DRIVER_MODES),
        description="awslogs delivery. blocking: a CloudWatch Logs stall holds the proxy's log writer, whose "
                    "bounded buffer then drops and counts lines (metric log.lines_dropped) without blocking "
                    "traffic. non-blocking: the driver drops silently once its "
                    f"{NON_BLOCKING_MAX_BUFFER_SIZE} buffer is full. Changing it replaces every task.",
    )
    container_insights = CfnParameter(
        stack, "ContainerInsights", type="String", default="enabled", allowed_values=list(CONTAINER_INSIGHTS_VALUES),
        description="CloudWatch Container Insights on the cluster: per-task and per-service CPU, memory, network and "
                    "storage metrics, billed as custom metrics (about $12 a month here; enhanced costs more). The "
                    "stack's own dashboard and alarms do not need it: disabled saves that.",
    )
    use_vpc_endpoints = CfnCondition(
        stack, "UseVpcEndpoints", expression=Fn.condition_equals(enable_vpc_endpoints.value_as_string, "true"))
    use_s3_gateway_endpoint = CfnCondition(
        stack, "UseS3GatewayEndpoint", expression=Fn.condition_and(
            # A CfnCondition is a condition expression ({"Condition": name}); jsii's typing does not say so.
            cast(ICfnConditionExpression, use_vpc_endpoints),
            Fn.condition_not(Fn.condition_equals(
                Fn.join("", vpc_endpoint_route_table_ids.value_as_list), ""))))
    has_alarm_email = CfnCondition(
        stack, "HasAlarmEmail", expression=Fn.condition_not(Fn.condition_equals(alarm_email.value_as_string, "")))
    non_blocking_logs = CfnCondition(
        stack, "NonBlockingLogs", expression=Fn.condition_equals(log_driver_mode.value_as_string, "non-blocking"))

    _min_not_above_max(stack, min_capacity=min_capacity, max_capacity=max_capacity, task_limit=task_limit)

    # The console validates these before anything is created: both subnet lists must be in the chosen VPC, and
    # the proxies only in AZs where the load balancer has a node (it never sends traffic to targets in an AZ it
    # is not enabled in, so such proxies would cost money and carry nothing).
    CfnRule(
        stack, "SubnetsInVpc",
        assertions=[
            CfnRuleAssertion(
                assert_=Fn.condition_each_member_equals(
                    Fn.value_of_all("AWS::EC2::Subnet::Id", "VpcId"), vpc_id.value_as_string),
                assert_description="All subnets must belong to the VPC given in VpcId.",
            ),
            CfnRuleAssertion(
                assert_=Fn.condition_each_member_in(
                    _subnet_azs(public_subnet_ids), _subnet_azs(private_subnet_ids)),
                assert_description="Every AZ of PublicSubnetIds needs a subnet in PrivateSubnetIds too: the load "
                                   "balancer never uses proxies in an AZ it has no subnet in.",
            ),
        ],
    )
    # Without cross-zone load balancing, a load balancer node only forwards to proxies in its own AZ.
    CfnRule(
        stack, "ZonalProxiesInEveryLoadBalancerAz",
        rule_condition=Fn.condition_equals(cross_zone.value_as_string, "false"),
        assertions=[CfnRuleAssertion(
            assert_=Fn.condition_each_member_in(_subnet_azs(private_subnet_ids), _subnet_azs(public_subnet_ids)),
            assert_description="With CrossZoneLoadBalancing=false, every AZ of PrivateSubnetIds needs a subnet in "
                               "PublicSubnetIds: its load balancer node can only reach proxies in its own AZ.",
        )],
    )

    instance_type = ami_id = key_name = has_key_name = None
    if ec2_mode:
        arch = config.arch
        instance_type = CfnParameter(
            stack, "InstanceType", type="String", default=DEFAULT_INSTANCE_TYPES[arch],
            allowed_pattern=INSTANCE_TYPE_PATTERNS[arch],
            constraint_description=f"an EC2 instance type for {arch.value} such as {DEFAULT_INSTANCE_TYPES[arch]} "
                                   "(synthesize with -c arch=arm64 for Graviton types, x86_64 otherwise)",
            description=f"EC2 instance type of the proxies (one proxy per instance; {arch.value}).",
        )
        ami_id = CfnParameter(
            stack, "AmiId", type="AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>",
            default=ECS_AL2023_AMI_SSM_PARAMETERS[arch],
            description=f"SSM parameter holding the ECS-optimized AMI ({arch.value}); the default follows the "
                        "latest Amazon Linux 2023 release.",
        )
        key_name = CfnParameter(
            stack, "KeyName", type="String", default="",
            description="Optional EC2 key pair for SSH. SSM Session Manager is the recommended way in and "
                        "needs none.",
        )
        has_key_name = CfnCondition(
            stack, "HasKeyName", expression=Fn.condition_not(Fn.condition_equals(key_name.value_as_string, "")))

    _add_console_groups(stack, ec2_mode=ec2_mode)

    return ProxyParameters(
        allowed_domains=allowed_domains, dns_servers=dns_servers, proxy_port=proxy_port, vpc_id=vpc_id,
        public_subnet_ids=public_subnet_ids, private_subnet_ids=private_subnet_ids, client_cidr=client_cidr,
        min_capacity=min_capacity, max_capacity=max_capacity, log_retention_days=log_retention_days,
        metrics_namespace=metrics_namespace, reload_interval_seconds=reload_interval,
        enable_vpc_endpoints=enable_vpc_endpoints, vpc_endpoint_route_table_ids=vpc_endpoint_route_table_ids,
        alarm_email=alarm_email, denied_requests_alarm_threshold=denied_threshold,
        drain_seconds=drain_seconds, deregistration_delay_seconds=deregistration_delay,
        client_routing_policy=client_routing_policy, cross_zone=cross_zone, log_driver_mode=log_driver_mode,
        container_insights=container_insights,
        non_blocking_logs=non_blocking_logs, use_vpc_endpoints=use_vpc_endpoints,
        use_s3_gateway_endpoint=use_s3_gateway_endpoint,
        has_alarm_email=has_alarm_email, instance_type=instance_type, ami_id=ami_id, key_name=key_name,
        has_key_name=has_key_name,
    )


@dataclass(frozen=True)
class DnsServer:
    """One possible entry of DnsServers: present when `condition` holds, then at `cidr` (a /32)."""

    condition: CfnCondition
    cidr: str


def dns_servers_of(stack: Stack, dns_servers: CfnParameter) -> list[DnsServer]:
    """One DnsServer per possible address of the DnsServers list (MAX_DNS_SERVERS), for per-server rules.

    The list is padded with empty entries before it is split, so that Fn::Select never runs past its end.
    """
    padded = Fn.split(",", Fn.join("", [dns_servers.value_as_string, "," * (MAX_DNS_SERVERS - 1)]))
    servers = []
    for index in range(MAX_DNS_SERVERS):
        address = Fn.select(index, padded)
        condition = CfnCondition(stack, f"HasDnsServer{index + 1}",
                                 expression=Fn.condition_not(Fn.condition_equals(address, "")))
        servers.append(DnsServer(condition=condition, cidr=Fn.join("", [address, "/32"])))
    return servers


def _subnet_azs(subnet_ids: CfnParameter) -> list[str]:
    """The AZs of a subnet list parameter, for a rule (Fn::ValueOf gives one value per listed subnet)."""
    return Token.as_list(Fn.value_of(subnet_ids.logical_id, "AvailabilityZone"))


def _min_not_above_max(stack: Stack, *, min_capacity: CfnParameter, max_capacity: CfnParameter,
                       task_limit: int) -> None:
    """A template Rule: MinCapacity <= MaxCapacity, checked before anything is created.

    Rule conditions have no comparison operator, only Fn::Equals, Fn::Contains, Fn::Not, Fn::Or, ... (AWS
    CloudFormation User Guide, "Rules"), but both values are small whole numbers with known bounds, so each
    possible MinCapacity m gets an assertion "MinCapacity != m or MaxCapacity in {m..limit}". Without it, a
    MinCapacity above MaxCapacity would fail halfway, at the scalable target.
    """
    assertions = [
        CfnRuleAssertion(
            assert_=Fn.condition_or(
                Fn.condition_not(Fn.condition_equals(min_capacity.value_as_string, str(minimum))),
                Fn.condition_contains([str(m) for m in range(minimum, task_limit + 1)],
                                      max_capacity.value_as_string)),
            assert_description=f"MaxCapacity must be at least MinCapacity ({minimum}).",
        )
        for minimum in range(MIN_TASKS + 1, task_limit + 1)
    ]
    if assertions:
        CfnRule(stack, "MinCapacityNotAboveMaxCapacity", assertions=assertions)


def _add_console_groups(stack: Stack, *, ec2_mode: bool) -> None:
    """Group and order the parameters in the console the way the seed's launch page did."""
    proxy = ["AllowedDomains", "DnsServers", "ProxyPort"]
    if ec2_mode:
        proxy += ["InstanceType", "AmiId", "KeyName"]
    stack.template_options.metadata = {
        "AWS::CloudFormation::Interface": {
            "ParameterGroups": [
                {"Label": {"default": "Proxy"}, "Parameters": proxy},
                {"Label": {"default": "Network"},
                 "Parameters": ["VpcId", "PublicSubnetIds", "PrivateSubnetIds", "ClientCidr"]},
                {"Label": {"default": "Load balancing and deployments"},
                 "Parameters": ["ClientRoutingPolicy", "CrossZoneLoadBalancing", "DeregistrationDelaySeconds",
                                "DrainSeconds"]},
                {"Label": {"default": "Private AWS endpoints"},
                 "Parameters": ["EnableVpcEndpoints", "VpcEndpointRouteTableIds"]},
                {"Label": {"default": "Scaling and operations"},
                 "Parameters": ["MinCapacity", "MaxCapacity", "LogRetentionDays", "MetricsNamespace",
                                "ReloadIntervalSeconds", "AlarmEmail", "DeniedRequestsAlarmThreshold",
                                "LogDriverMode", "ContainerInsights"]},
            ],
        },
    }
