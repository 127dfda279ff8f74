"""Optional private AWS endpoints (EnableVpcEndpoints=true): the proxies' and the clients' AWS API calls stay
inside the VPC, and only reach this account's principals and buckets.

Interface endpoints with private DNS for the services the stack itself uses (Secrets Manager, CloudWatch,
CloudWatch Logs, ECR api and dkr) in the private subnets, and, when route tables are given, an S3 gateway
endpoint (ECR serves image layers from S3). Every resource here carries a CloudFormation condition, so the
parameter switches them on and off in one stack update.

Endpoint policies allow only principals of this account (aws:PrincipalAccount), and S3 only this account's
buckets plus ECR's layer bucket (aws:ResourceAccount), so the endpoints cannot carry data to another
account (Amazon VPC AWS PrivateLink Guide, "Control access to VPC endpoints using endpoint policies";
Amazon ECR User Guide, "Amazon ECR interface VPC endpoints": the S3 gateway endpoint and the
prod-<region>-starport-layer-bucket).
"""

from __future__ import annotations

from aws_cdk import Aws, CfnCondition, CfnParameter, Fn
from aws_cdk import aws_ec2 as ec2
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

#: Interface endpoint service suffixes (com.amazonaws.<region>.<suffix>) -> construct id.
INTERFACE_SERVICES = {
    "secretsmanager": "SecretsManager",
    "logs": "Logs",
    "monitoring": "CloudWatch",
    "ecr.api": "EcrApi",
    "ecr.dkr": "EcrDkr",
}


def interface_hostnames() -> list[str]:
    """The names clients should reach directly (no_proxy) when the endpoints exist; private DNS resolves them."""
    region = Aws.REGION
    return [
        Fn.join("", ["secretsmanager.", region, ".amazonaws.com"]),
        Fn.join("", ["logs.", region, ".amazonaws.com"]),
        Fn.join("", ["monitoring.", region, ".amazonaws.com"]),
        Fn.join("", ["api.ecr.", region, ".amazonaws.com"]),
        Fn.join("", [".dkr.ecr.", region, ".amazonaws.com"]),
    ]


def _this_account_only() -> dict[str, object]:
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "ThisAccountsPrincipalsOnly", "Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*",
        "Condition": {"StringEquals": {"aws:PrincipalAccount": Aws.ACCOUNT_ID}},
    }]}


def _s3_policy() -> dict[str, object]:
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "ThisAccountsBuckets", "Effect": "Allow", "Principal": "*", "Action": "s3:*", "Resource": "*",
         "Condition": {"StringEquals": {"aws:ResourceAccount": Aws.ACCOUNT_ID}}},
        {"Sid": "EcrImageLayers", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
         "Resource": Fn.join("", ["arn:", Aws.PARTITION, ":s3:::prod-", Aws.REGION, "-starport-layer-bucket/*"])},
    ]}


class VpcEndpoints(Construct):
    def __init__(
        self, scope: Construct, id: str, *,
        vpc_id: str,
        private_subnet_ids: CfnParameter,
        route_table_ids: CfnParameter,
        client_cidr: str,
        proxy_security_group: ec2.ISecurityGroup,
        use_vpc_endpoints: CfnCondition,
        use_s3_gateway_endpoint: CfnCondition,
    ) -> None:
        super().__init__(scope, id)
        # L1 throughout: the subnets and route tables are list parameters, and every resource needs the condition.
        self.security_group = ec2.CfnSecurityGroup(
            self, "SecurityGroup", vpc_id=vpc_id,
            group_description="egress-proxy VPC endpoints: HTTPS from the proxies and ClientCidr",
            security_group_ingress=[
                ec2.CfnSecurityGroup.IngressProperty(
                    ip_protocol="tcp", from_port=443, to_port=443,
                    source_security_group_id=proxy_security_group.security_group_id,
                    description="AWS API calls of the proxies"),
                ec2.CfnSecurityGroup.IngressProperty(
                    ip_protocol="tcp", from_port=443, to_port=443, cidr_ip=client_cidr,
                    description="AWS API calls of the clients (ClientCidr)"),
            ],
            # An interface endpoint only answers; it never opens connections.
            security_group_egress=[ec2.CfnSecurityGroup.EgressProperty(
                ip_protocol="icmp", from_port=252, to_port=86, cidr_ip="255.255.255.255/32",
                description="Disallow all traffic")],
        )
        self.security_group.cfn_options.condition = use_vpc_endpoints
        NagSuppressions.add_resource_suppressions(self.security_group, [NagPackSuppression(
            id="CdkNagValidationFailure", applies_to=["AwsSolutions-EC23"],
            reason="AwsSolutions-EC23 cannot evaluate the ClientCidr parameter at synth time; the parameter's "
                   "AllowedPattern only accepts /8 to /32, so 0.0.0.0/0 can never be admitted.",
        )])
        self.interface_endpoints: dict[str, ec2.CfnVPCEndpoint] = {}
        for suffix, name in INTERFACE_SERVICES.items():
            endpoint = ec2.CfnVPCEndpoint(
                self, name, vpc_id=vpc_id, vpc_endpoint_type="Interface",
                service_name=Fn.join("", ["com.amazonaws.", Aws.REGION, f".{suffix}"]),
                private_dns_enabled=True, subnet_ids=private_subnet_ids.value_as_list,
                security_group_ids=[self.security_group.attr_group_id],
                policy_document=_this_account_only(),
            )
            endpoint.cfn_options.condition = use_vpc_endpoints
            self.interface_endpoints[suffix] = endpoint
        self.s3_gateway = ec2.CfnVPCEndpoint(
            self, "S3", vpc_id=vpc_id, vpc_endpoint_type="Gateway",
            service_name=Fn.join("", ["com.amazonaws.", Aws.REGION, ".s3"]),
            route_table_ids=route_table_ids.value_as_list, policy_document=_s3_policy(),
        )
        self.s3_gateway.cfn_options.condition = use_s3_gateway_endpoint
