"""EC2 mode: a pool of Elastic IPs, one per instance, so that the proxies' egress IPs are fixed.

Who associates: the launch lifecycle hook's Lambda function (ec2_lifecycle.EipClaimHook, code in
lambda_src/claim_eip.py), never the instance. Every association uses AllowReassociation=false: EC2 then refuses
an address that is already associated (Resource.AlreadyAssociated), which makes AssociateAddress itself the
lock, so simultaneous launches never share or steal an address. A terminated instance's association
disappears with it, which returns the address to the pool.

The instance only waits, in its user data and before the ECS agent starts, until instance metadata shows one
of the pool's addresses as its public IPv4 address. It needs neither the AWS CLI nor any EC2 permission.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Aws, CfnTag, Fn, RemovalPolicy, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

#: Tag on the pool's addresses, and on the instances/ENIs allowed to take them; the value is the stack name.
POOL_TAG_KEY = "egress-proxy:eip-pool"
#: IMDS polls, 5 s apart, before the instance gives up and powers off: the hook's heartbeat (5 min) plus a minute.
MAX_ATTEMPTS = 72


class ElasticIpPool(Construct):
    """The pool: `size` addresses the stack allocates, or the existing ones in `existing_allocation_ids`.

    Existing addresses (e.g. retained from an earlier stack, or already allow-listed by partners) must carry the
    pool tag with this stack's name: the claim function finds the pool, and IAM recognises it, by that tag.
    Their public IPs are not known to the template, so instances then accept whichever address the hook gives
    them (they launch without any other public address).
    """

    def __init__(self, scope: Construct, id: str, *, size: int, existing_allocation_ids: Sequence[str] = ()) -> None:
        super().__init__(scope, id)
        self.pool_tag_value: str = Aws.STACK_NAME
        self.existing_allocation_ids = tuple(existing_allocation_ids)
        self.size = len(self.existing_allocation_ids) or size
        self.addresses: list[ec2.CfnEIP] = [] if self.existing_allocation_ids else [
            ec2.CfnEIP(
                self, f"Eip{index}", domain="vpc",
                tags=[CfnTag(key=POOL_TAG_KEY, value=self.pool_tag_value),
                      CfnTag(key="Name", value=Fn.join("-", [Aws.STACK_NAME, f"egress-{index}"]))],
            )
            for index in range(1, size + 1)
        ]
        for address in self.addresses:
            # Partners allow-list these addresses: deleting (or replacing) the stack must not give them back to
            # AWS. A retained address stays allocated, and billed, until it is released by hand.
            address.apply_removal_policy(RemovalPolicy.RETAIN)

    @property
    def public_ips(self) -> list[str]:
        """`Ref` of an AWS::EC2::EIP is its public address (none known for existing addresses)."""
        return [address.ref for address in self.addresses]

    @property
    def labels(self) -> list[str]:
        """What the outputs show for each address: its public IP, or an existing address's allocation ID."""
        return self.public_ips or list(self.existing_allocation_ids)

    def tag_specifications(self) -> list[dict[str, object]]:
        """Launch-template tags so instances (and their ENIs) are recognisable as pool members to IAM."""
        return [
            {"ResourceType": resource_type,
             "Tags": [{"Key": POOL_TAG_KEY, "Value": self.pool_tag_value}]}
            for resource_type in ("instance", "network-interface")
        ]

    def grant_associate(self, role: iam.IRole | None) -> None:
        """As tight as EC2 allows: associate only pool-tagged addresses with pool-tagged instances/ENIs.

        DescribeAddresses has no resource-level permissions, so it needs "*" (the caller suppresses that
        finding). No Disassociate/Release: the association ends with the instance.
        """
        assert role is not None
        stack = Stack.of(self)
        tag_condition = {"StringEquals": {f"aws:ResourceTag/{POOL_TAG_KEY}": self.pool_tag_value}}
        arns = {
            kind: stack.format_arn(service="ec2", resource=kind, resource_name="*")
            for kind in ("elastic-ip", "instance", "network-interface")
        }
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="AssociatePoolAddressesOnly", actions=["ec2:AssociateAddress"],
            resources=list(arns.values()), conditions=tag_condition,
        ))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="ListAddresses", actions=["ec2:DescribeAddresses"], resources=["*"]))
        NagSuppressions.add_resource_suppressions(role, [NagPackSuppression(
            id="AwsSolutions-IAM5",
            applies_to=[*[f"Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:{kind}/*"
                          for kind in arns]],
            reason="ec2:AssociateAddress is scoped by the pool tag on the address, the instance and its ENI "
                   "(aws:ResourceTag condition): instances do not exist at synth time, and tags are as tight "
                   "as EC2 allows for them.",
        )], apply_to_children=True)

    def wait_script(self) -> list[str]:
        """User-data lines: wait, before the ECS agent starts, until this instance egresses from a pool address.

        Their output reaches the console log.

        The ECS-optimized AMI starts the agent after cloud-init's user data (which is also what lets user
        data write /etc/ecs/ecs.config), so no task runs before this returns. IMDS `public-ipv4` is the
        associated Elastic IP once there is one (Amazon EC2 User Guide, "Instance metadata categories").
        No address after MAX_ATTEMPTS x 5 s: the lifecycle hook has abandoned the launch anyway; power off
        rather than join the cluster with an address nobody allow-listed.
        """
        # Existing addresses: no list to check against (an empty one accepts the address the hook associated).
        pool_ips = Fn.join(" ", self.public_ips) if self.public_ips else ""
        return [
            "# --- wait for a pool Elastic IP (the launch lifecycle hook's function associates it) ---",
            "set -uo pipefail",
            Fn.join("", ['POOL_IPS=" ', pool_ips, ' "']),
            'IMDS_TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token '
            '-H "X-aws-ec2-metadata-token-ttl-seconds: 21600")',
            'PUBLIC_IP=""',
            f"for attempt in $(seq 1 {MAX_ATTEMPTS}); do",
            '  PUBLIC_IP=$(curl -sf -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" '
            'http://169.254.169.254/latest/meta-data/public-ipv4 || true)',
            # Any pool address; with existing addresses (POOL_IPS blank), the one the hook associated.
            '  case "$POOL_IPS" in *" $PUBLIC_IP "*|"  ") [ -n "$PUBLIC_IP" ] && break ;; esac',
            '  PUBLIC_IP=""',
            "  sleep 5",
            "done",
            'if [ -z "$PUBLIC_IP" ]; then',
            f'  echo "egress-proxy: no Elastic IP of the pool after {MAX_ATTEMPTS * 5} s (see the claim '
            'function\'s log); powering off instead of proxying from an address nobody allow-listed" '
            '>&2',
            "  shutdown -h now",
            "  exit 1",
            "fi",
            'echo "egress-proxy: this instance egresses from Elastic IP $PUBLIC_IP"',
        ]
