"""EC2 mode: a pool of Elastic IPs that instances claim at boot, so the proxies' egress IPs are fixed.

Why race-free: the seed's user data listed the pool, picked an address that looked free and associated it
with AllowReassociation on, so two instances booting together could pick the same address and the second
silently stole it. Here every association uses AllowReassociation=false: EC2 then refuses to associate an
address that is already associated (Resource.AlreadyAssociated), which makes the AssociateAddress call itself
the lock. An instance lists the unassociated pool addresses, tries them in random order (so simultaneous
boots rarely collide at all), moves on to the next one when it loses, and re-lists with a jittered back-off
until it wins. A terminated instance's association disappears with it, which returns the address to the pool.
An instance that cannot get an address within a few minutes powers off, and the Auto Scaling group replaces
it, rather than proxying from an IP nobody allow-listed.
"""

from __future__ import annotations

from aws_cdk import Aws, CfnTag, Fn, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

#: Tag on the pool's addresses, and on the instances/ENIs allowed to take them; the value is the stack name.
POOL_TAG_KEY = "egress-proxy:eip-pool"
#: Attempts (each re-listing the pool) before the instance gives up and powers off; about 5 minutes.
MAX_ATTEMPTS = 60


class ElasticIpPool(Construct):
    def __init__(self, scope: Construct, id: str, *, size: int) -> None:
        super().__init__(scope, id)
        self.pool_tag_value: str = Aws.STACK_NAME
        self.addresses: list[ec2.CfnEIP] = [
            ec2.CfnEIP(
                self, f"Eip{index}", domain="vpc",
                tags=[CfnTag(key=POOL_TAG_KEY, value=self.pool_tag_value),
                      CfnTag(key="Name", value=Fn.join("-", [Aws.STACK_NAME, f"egress-{index}"]))],
            )
            for index in range(1, size + 1)
        ]

    @property
    def public_ips(self) -> list[str]:
        """`Ref` of an AWS::EC2::EIP is its public address."""
        return [address.ref for address in self.addresses]

    def tag_specifications(self) -> list[dict[str, object]]:
        """Launch-template tags so instances (and their ENIs) are recognisable as pool members to IAM."""
        return [
            {"ResourceType": resource_type,
             "Tags": [{"Key": POOL_TAG_KEY, "Value": self.pool_tag_value}]}
            for resource_type in ("instance", "network-interface")
        ]

    def grant_associate(self, role: iam.IRole) -> None:
        """As tight as EC2 allows: associate only pool-tagged addresses with pool-tagged instances/ENIs.

        DescribeAddresses has no resource-level permissions, so it needs "*" (the caller suppresses that
        finding together with the ECS agent's). No Disassociate/Release: the association ends with the instance.
        """
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

    def boot_script(self) -> list[str]:
        """User-data lines that claim one pool address for this instance before the ECS agent starts.

        The ECS-optimized AMI starts the agent after cloud-init's user data, so the proxy never runs from a
        temporary address. The instance launches with an auto-assigned public IP only to reach the EC2 API.
        """
        pool = self.pool_tag_value
        return [
            "# --- claim one Elastic IP from the pool (race-free: AllowReassociation=false is the lock) ---",
            "set -uo pipefail",
            'IMDS_TOKEN=$(curl -sS -X PUT http://169.254.169.254/latest/api/token '
            '-H "X-aws-ec2-metadata-token-ttl-seconds: 600")',
            'imds() { curl -sS -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" '
            '"http://169.254.169.254/latest/meta-data/$1"; }',
            "INSTANCE_ID=$(imds instance-id)",
            "export AWS_DEFAULT_REGION=$(imds placement/region)",
            "command -v aws >/dev/null || dnf install -y -q awscli-2",
            f"POOL_FILTER='Name=tag:{POOL_TAG_KEY},Values={pool}'",
            'CLAIMED=""',
            f"for attempt in $(seq 1 {MAX_ATTEMPTS}); do",
            "  # Already holding one (user data re-run after a reboot)? Keep it.",
            '  CLAIMED=$(aws ec2 describe-addresses --filters "$POOL_FILTER" '
            '"Name=instance-id,Values=$INSTANCE_ID" --query "Addresses[0].AllocationId" --output text)',
            '  if [ -n "$CLAIMED" ] && [ "$CLAIMED" != "None" ]; then break; fi',
            '  CLAIMED=""',
            '  FREE=$(aws ec2 describe-addresses --filters "$POOL_FILTER" '
            '--query "Addresses[?AssociationId==null].AllocationId" --output text | tr -s "\\t " "\\n" | shuf)',
            "  for ALLOCATION in $FREE; do",
            '    if aws ec2 associate-address --instance-id "$INSTANCE_ID" --allocation-id "$ALLOCATION" '
            "--no-allow-reassociation >/dev/null; then",
            '      CLAIMED=$ALLOCATION; break',
            "    fi",
            '    echo "egress-proxy: $ALLOCATION was taken by another instance, trying the next one" >&2',
            "  done",
            '  if [ -n "$CLAIMED" ]; then break; fi',
            "  sleep $((2 + RANDOM % 5))",
            "done",
            'if [ -z "$CLAIMED" ]; then',
            '  echo "egress-proxy: no free Elastic IP in the pool; powering off so the Auto Scaling group '
            'replaces this instance" >&2',
            "  shutdown -h now",
            "  exit 1",
            "fi",
            'echo "egress-proxy: this instance egresses from Elastic IP allocation $CLAIMED"',
        ]
