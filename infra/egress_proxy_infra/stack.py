"""EgressProxyStack: parameters in, constructs composed, outputs with the seed's (fixed) names out."""

from __future__ import annotations

from typing import Any

from aws_cdk import Aws, CfnOutput, DefaultStackSynthesizer, Duration, Fn, Stack, Token
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from constructs import Construct

from egress_proxy_infra import subnets
from egress_proxy_infra.allowlist_secret import AllowlistSecret
from egress_proxy_infra.client_identity import CONTEXT_KEYS as IDENTITY_CONTEXT
from egress_proxy_infra.client_identity import ClientIdentity, IdentityConfig
from egress_proxy_infra.config import MAX_STOP_TIMEOUT_SECONDS, CapacityMode, InfraConfig
from egress_proxy_infra.eip_pool import ElasticIpPool
from egress_proxy_infra.l1 import l1
from egress_proxy_infra.load_balancer import ProxyLoadBalancer
from egress_proxy_infra.monitoring import AlarmTopic, ProxyMonitoring
from egress_proxy_infra.parameters import ProxyParameters, define_parameters, dns_servers_of
from egress_proxy_infra.proxy_service import Ec2ProxyService, FargateProxyService
from egress_proxy_infra.proxy_task import ProxyEnvironment, ProxyTask, container_image
from egress_proxy_infra.transparent_mode import TransparentMode
from egress_proxy_infra.vpc_endpoints import VpcEndpoints, interface_hostnames

#: Never through the proxy: instance metadata (IMDS) and the ECS task metadata/credentials endpoint.
NO_PROXY = "localhost,127.0.0.1,169.254.169.254,169.254.170.2"
FARGATE_EGRESS_NOTE = ("not fixed in fargate mode: each task egresses from its own public IP; "
                       "deploy with -c capacity=ec2 for fixed Elastic IPs")


class EgressProxyStack(Stack):
    def __init__(self, scope: Construct, id: str, *, config: InfraConfig, **kwargs: Any) -> None:
        if config.image_uri is not None and "synthesizer" not in kwargs:
            # Without assets the template is self-contained, so drop the bootstrap-version check (it reads an
            # SSM parameter) and the template can be launched from the console as the seed's was.
            kwargs["synthesizer"] = DefaultStackSynthesizer(generate_bootstrap_version_rule=False)
        super().__init__(scope, id, **kwargs)
        self.config = config
        ec2_mode = config.capacity is CapacityMode.EC2
        params = define_parameters(self, config=config)
        self.params = params
        port = params.proxy_port.value_as_number

        # The VPC is a parameter; CDK only needs a handle (see subnets.py for the subnet lists).
        vpc = subnets.import_vpc(self, "Vpc", params.vpc_id)

        allowlist = AllowlistSecret(self, "Allowlist", allowed_domains=params.allowed_domains.value_as_string)

        load_balancer = ProxyLoadBalancer(
            self, "LoadBalancer", vpc=vpc, private_subnet_ids=params.private_subnet_ids,
            client_cidr=params.client_cidr.value_as_string, proxy_port=port,
            # awsvpc tasks register by IP; host-networked tasks by instance.
            target_type=elbv2.TargetType.INSTANCE if ec2_mode else elbv2.TargetType.IP,
            deregistration_delay_seconds=params.deregistration_delay_seconds.value_as_string,
            idle_timeout_seconds=config.nlb_idle_timeout_seconds,
            client_routing_policy=params.client_routing_policy.value_as_string,
            cross_zone=params.cross_zone.value_as_string,
        )

        task = ProxyTask(
            self, "ProxyTask", fargate=not ec2_mode,
            image=container_image(self, image_uri=config.image_uri, asset_dir=config.image_asset_dir,
                                  arch=config.arch),
            arch=config.arch,
            environment=ProxyEnvironment(
                proxy_port=port, allowlist_secret_arn=allowlist.secret_arn,
                dns_servers=params.dns_servers.value_as_string, client_cidr=params.client_cidr.value_as_string,
                reload_interval_seconds=Token.as_string(params.reload_interval_seconds.value_as_number),
                drain_seconds=Token.as_string(params.drain_seconds.value_as_number),
                metrics_namespace=params.metrics_namespace.value_as_string,
                # The NLB forgets an idle flow silently (the client's next packet gets a reset); the proxy closes
                # one cleanly. One value for both, so neither limit surprises the other.
                tunnel_idle_timeout_seconds=config.nlb_idle_timeout_seconds,
            ),
            allowlist=allowlist,
            log_retention_days=params.log_retention_days.value_as_number,
            stop_timeout=Duration.seconds(MAX_STOP_TIMEOUT_SECONDS),
            log_driver_mode=params.log_driver_mode.value_as_string,
            non_blocking_logs=params.non_blocking_logs,
        )

        cluster = ecs.Cluster(self, "Cluster", vpc=vpc, container_insights_v2=ecs.ContainerInsights.ENABLED)
        # The L2 takes the setting only as an enum; the ContainerInsights parameter decides it at deploy time.
        l1(cluster).add_property_override(
            "ClusterSettings", [{"Name": "containerInsights", "Value": params.container_insights.value_as_string}])

        dns_servers = dns_servers_of(self, params.dns_servers)
        self.eip_pool: ElasticIpPool | None = None
        proxies: FargateProxyService | Ec2ProxyService
        if ec2_mode:
            self.eip_pool = ElasticIpPool(self, "EgressIps", size=config.eip_pool_size,
                                          existing_allocation_ids=config.eip_allocation_ids)
            assert params.instance_type and params.ami_id and params.key_name and params.has_key_name
            proxies = Ec2ProxyService(
                self, "Proxies", cluster=cluster, task=task, public_subnet_ids=params.public_subnet_ids,
                target_group=load_balancer.target_group, min_capacity=params.min_capacity,
                max_capacity=params.max_capacity, instance_type=params.instance_type, ami_id=params.ami_id,
                key_name=params.key_name, has_key_name=params.has_key_name, eip_pool=self.eip_pool,
                dns_servers=dns_servers,
            )
        else:
            proxies = FargateProxyService(
                self, "Proxies", cluster=cluster, task=task, public_subnet_ids=params.public_subnet_ids,
                target_group=load_balancer.target_group, min_capacity=params.min_capacity,
                max_capacity=params.max_capacity, dns_servers=dns_servers,
            )
        load_balancer.admit(proxies.security_group)
        transparent: TransparentMode | None = None
        if config.transparent and isinstance(proxies, Ec2ProxyService) and self.eip_pool is not None:
            transparent = TransparentMode(self, "Transparent", proxies=proxies, task=task,
                                          client_cidr=params.client_cidr,
                                          pool_tag_value=self.eip_pool.pool_tag_value, ipv6=config.transparent_ipv6,
                                          extra_ports=config.transparent_extra_ports)
        self.proxies = proxies

        VpcEndpoints(
            self, "VpcEndpoints", vpc_id=params.vpc_id.value_as_string,
            private_subnet_ids=params.private_subnet_ids, route_table_ids=params.vpc_endpoint_route_table_ids,
            client_cidr=params.client_cidr.value_as_string, proxy_security_group=proxies.security_group,
            use_vpc_endpoints=params.use_vpc_endpoints, use_s3_gateway_endpoint=params.use_s3_gateway_endpoint,
        )

        self.alarm_topic = AlarmTopic(self, "Alarms", email=params.alarm_email.value_as_string,
                                      has_email=params.has_alarm_email)
        ec2_proxies = proxies if isinstance(proxies, Ec2ProxyService) else None
        ProxyMonitoring(
            self, "Monitoring", namespace=params.metrics_namespace.value_as_string, service=proxies.service,
            load_balancer=load_balancer.load_balancer, target_group=load_balancer.target_group,
            alarm_topic=self.alarm_topic.topic,
            denied_requests_threshold=params.denied_requests_alarm_threshold.value_as_number,
            access_logs=task.log_group,
            eip_claim=ec2_proxies.eip_claim if ec2_proxies else None,
            auto_scaling_group=ec2_proxies.auto_scaling_group if ec2_proxies else None,
            maintenance=ec2_proxies.maintenance if ec2_proxies else None,
            ipv6_bypass_log_group=transparent.ipv6_bypass_log_group if transparent else None,
            route_failover=transparent.function if transparent else None,
        )

        # Clients by AWS identity: the task role's permissions for the selectors in use; optionally the proxy
        # shared as a PrivateLink endpoint service (client_identity.py).
        identity = IdentityConfig.from_context({key: self.node.try_get_context(key) for key in IDENTITY_CONTEXT})
        ClientIdentity(self, "ClientIdentity", config=identity, task=task, load_balancer=load_balancer)

        self._outputs(params=params, load_balancer=load_balancer, task=task, allowlist=allowlist,
                      proxy_security_group=proxies.security_group)

    def _outputs(self, *, params: ProxyParameters, load_balancer: ProxyLoadBalancer, task: ProxyTask,
                 allowlist: AllowlistSecret, proxy_security_group: ec2.ISecurityGroup) -> None:
        # Created on the stack (_output below) so the logical IDs (= output names) are exactly these.
        port = params.proxy_port.value_as_string
        proxy_url = Fn.join("", ["http://", load_balancer.dns_name, ":", port])
        self._output("ProxyDnsName", value=load_balancer.dns_name,
                     description="DNS name of the proxy (internal NLB); set it on the clients.")
        self._output("ProxyPort", value=port, description="Port of the proxy.")
        if self.eip_pool is not None:
            labels = self.eip_pool.labels
            existing = bool(self.eip_pool.existing_allocation_ids)
            self._output("ProxyEgressIps", value=Fn.join(",", labels),
                         description="Elastic IPs the proxies egress from (give these to partners/DNS filters)"
                                     + (": your existing addresses, by allocation ID." if existing else "."))
            for index, label in enumerate(labels, start=1):
                self._output(f"EgressIp{index}", value=label, description=f"Egress Elastic IP {index}"
                             + (" (an existing address, by allocation ID)." if existing else "."))
        else:
            self._output("ProxyEgressIps", value=FARGATE_EGRESS_NOTE,
                      description="Egress IPs of the proxies.")
        self._output("AccessLogGroup", value=task.log_group.log_group_name,
                     description="CloudWatch Logs group with the proxy access logs (JSON lines).")
        self._output("ProxySecurityGroup", value=proxy_security_group.security_group_id,
                     description="Security group of the proxies (the load balancer's group is "
                                 "LoadBalancerSecurityGroup).")
        self._output("LoadBalancerSecurityGroup", value=load_balancer.security_group.security_group_id,
                     description="Security group of the load balancer: admits ClientCidr on ProxyPort.")
        self._output("AllowlistSecretArn", value=allowlist.secret_arn,
                     description="Secret with the allowlist; update it (or egress-proxy allowlist push) to change "
                              "the allowlist without a stack update.")
        # With the endpoints, clients reach those AWS APIs directly (private DNS), not through the proxy.
        endpoint_hosts = Fn.condition_if(params.use_vpc_endpoints.logical_id,
                                         Fn.join("", [",", Fn.join(",", interface_hostnames())]), "").to_string()
        s3_hosts = Fn.condition_if(params.use_s3_gateway_endpoint.logical_id,
                                   Fn.join("", [",.s3.", Aws.REGION, ".amazonaws.com"]), "").to_string()
        self._output("ProxyExportCommand",
                  value=Fn.join("", ["export http_proxy=", proxy_url, " https_proxy=", proxy_url,
                                     " no_proxy=", NO_PROXY, endpoint_hosts, s3_hosts]),
                     description="Paste into a Linux shell to use the proxy.")
        self._output("AlarmTopicArn", value=self.alarm_topic.topic.topic_arn,
                     description="SNS topic every alarm notifies; subscribe to it (or set AlarmEmail).")
        if isinstance(self.proxies, Ec2ProxyService):
            self._output("AutoScalingGroupName", value=self.proxies.auto_scaling_group.auto_scaling_group_name,
                      description="Auto Scaling group of the proxy instances (for an instance refresh).")

    def _output(self, name: str, *, value: str, description: str) -> CfnOutput:
        """An output named `name`, exported as `<stack name>-<name>` for Fn::ImportValue in other stacks."""
        # The parameters own construct ids such as "ProxyPort"; outputs have their own namespace in the template,
        # so the output's construct id differs and its logical id is set to the name.
        output = CfnOutput(self, f"{name}Output", value=value, description=description,
                           export_name=Fn.join("-", [Aws.STACK_NAME, name]))
        output.override_logical_id(name)
        return output
