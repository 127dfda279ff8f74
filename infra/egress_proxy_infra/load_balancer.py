"""The internal Network Load Balancer in front of the proxies."""

from __future__ import annotations

from aws_cdk import CfnParameter, Duration
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra import subnets
from egress_proxy_infra.l1 import l1

#: Healthy proxies an AZ needs to stay in the NLB's DNS answers.
DNS_FAILOVER_MIN_HEALTHY = 1


class ProxyLoadBalancer(Construct):
    """Internal NLB with a TCP listener on the proxy port.

    AZ routing comes from two parameters. ClientRoutingPolicy is the NLB's dns_record.client_routing_policy:
    with affinity, a client that resolves the name through the VPC resolver gets the NLB address in its own AZ.
    CrossZoneLoadBalancing is set on the target group (whose setting wins over the NLB's): on, each NLB node
    forwards to proxies in every AZ; off, only to its own AZ's, and an AZ whose healthy proxies fall below
    DNS_FAILOVER_MIN_HEALTHY leaves the NLB's DNS answers (target group health, DNS failover).

    The NLB has its own security group, which is the client gate: it admits only ClientCidr on the proxy
    port. The proxies' security group then admits only this group (see `admit`), which covers both
    forwarded client traffic and the NLB's health checks whatever ClientCidr is. Client IPs are preserved so
    that the proxy's own ACL (EGRESS_CLIENT_CIDRS) sees the real client address.
    """

    def __init__(
        self, scope: Construct, id: str, *,
        vpc: ec2.IVpc,
        private_subnet_ids: CfnParameter,
        client_cidr: str,
        proxy_port: float,
        target_type: elbv2.TargetType,
        deregistration_delay_seconds: str,
        idle_timeout_seconds: int,
        client_routing_policy: str,
        cross_zone: str,
    ) -> None:
        super().__init__(scope, id)
        self._proxy_port = proxy_port

        self.security_group = ec2.SecurityGroup(
            self, "SecurityGroup", vpc=vpc, allow_all_outbound=False,
            description="egress-proxy load balancer: ClientCidr on the proxy port only",
        )
        self.security_group.add_ingress_rule(
            ec2.Peer.ipv4(client_cidr), ec2.Port.tcp(proxy_port), "Proxy clients (ClientCidr)")
        NagSuppressions.add_resource_suppressions(self.security_group, [NagPackSuppression(
            id="CdkNagValidationFailure", applies_to=["AwsSolutions-EC23"],
            reason="AwsSolutions-EC23 cannot evaluate the ClientCidr parameter at synth time; the parameter's "
                   "AllowedPattern only accepts /8 to /32, so 0.0.0.0/0 can never be admitted.",
        )], apply_to_children=True)

        self.load_balancer = elbv2.NetworkLoadBalancer(
            self, "Nlb", vpc=vpc, internet_facing=False, cross_zone_enabled=True,
            vpc_subnets=subnets.placeholder_selection(self, "PrivateSubnet", private_subnet_ids),
            security_groups=[self.security_group],
        )
        self.load_balancer.set_attribute("dns_record.client_routing_policy", client_routing_policy)
        cfn_lb = l1(self.load_balancer)
        subnets.override_with_list(cfn_lb, "Subnets", private_subnet_ids)
        cfn_lb.add_property_deletion_override("SubnetMappings")
        NagSuppressions.add_resource_suppressions(self.load_balancer, [NagPackSuppression(
            id="AwsSolutions-ELB2",
            reason="NLB access logs exist only for TLS listeners; this is a TCP listener. The proxies log every "
                   "request (client, destination, verdict) to the AccessLogGroup instead.",
        )])

        self.target_group = elbv2.NetworkTargetGroup(
            self, "Targets", vpc=vpc, port=proxy_port, protocol=elbv2.Protocol.TCP, target_type=target_type,
            preserve_client_ip=True,
            health_check=elbv2.HealthCheck(
                protocol=elbv2.Protocol.TCP, port="traffic-port", interval=Duration.seconds(10),
                healthy_threshold_count=2, unhealthy_threshold_count=2,
            ),
        )
        # ECS deregisters a stopping task first and sends SIGTERM only once the delay is over. Meanwhile the NLB
        # sends it no new connection and keeps its open ones; then the proxy drains for DrainSeconds. So a
        # connection survives a deployment if it ends within DeregistrationDelaySeconds + DrainSeconds.
        self.target_group.set_attribute("deregistration_delay.timeout_seconds", deregistration_delay_seconds)
        self.target_group.set_attribute("load_balancing.cross_zone.enabled", cross_zone)
        # AWS's default, made explicit because CrossZoneLoadBalancing=false relies on it: an AZ with fewer healthy
        # proxies than this is taken out of the NLB's DNS answers (within the record's 60 s TTL).
        self.target_group.set_attribute("target_group_health.dns_failover.minimum_healthy_targets.count",
                                        str(DNS_FAILOVER_MIN_HEALTHY))
        self.listener = self.load_balancer.add_listener(
            "Listener", port=proxy_port, protocol=elbv2.Protocol.TCP, default_target_groups=[self.target_group])
        # The NLB silently forgets a TCP flow idle for this long (350 s unless set; Elastic Load Balancing, Network
        # Load Balancers, "Listeners": tcp.idle_timeout.seconds, 60-6000). Set explicitly so it can be matched
        # with the proxy's own tunnel idle timeout (issue 17).
        l1(self.listener).add_property_override("ListenerAttributes", [
            {"Key": "tcp.idle_timeout.seconds", "Value": str(idle_timeout_seconds)}])

    def admit(self, proxy_security_group: ec2.ISecurityGroup) -> None:
        """Let this NLB (clients and health checks) reach the proxies on the proxy port, and nothing else."""
        port = ec2.Port.tcp(self._proxy_port)
        proxy_security_group.add_ingress_rule(self.security_group, port, "From the proxy load balancer")
        self.security_group.add_egress_rule(proxy_security_group, port, "To the proxies")

    @property
    def dns_name(self) -> str:
        return self.load_balancer.load_balancer_dns_name
