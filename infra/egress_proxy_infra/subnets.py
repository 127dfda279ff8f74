"""Subnet lists that arrive as CloudFormation parameters.

CDK's L2 constructs need concrete subnet objects at synth time, but the subnets here are a
`List<AWS::EC2::Subnet::Id>` parameter only known at deploy time. So (measured with aws-cdk-lib 2.275, see
DESIGN.md) we hand the L2s two `Fn::Select`-ed placeholders to satisfy their synth-time checks, then
override the L1 property with the whole list parameter. The template thus takes any number of subnets
(the seed's 2-3) and cfn-lint passes. Every such override goes through this module.
"""

from __future__ import annotations

from aws_cdk import Annotations, CfnParameter, CfnResource, Fn
from aws_cdk import aws_ec2 as ec2
from constructs import Construct

#: How many placeholders the L2s get; two, the minimum the parameters' descriptions ask for.
PLACEHOLDER_COUNT = 2


def placeholder_selection(scope: Construct, id: str, subnet_ids: CfnParameter) -> ec2.SubnetSelection:
    """A synth-time selection of the first two subnets of a list parameter (overridden later)."""
    subnets = [
        ec2.Subnet.from_subnet_id(scope, f"{id}{index}", Fn.select(index, subnet_ids.value_as_list))
        for index in range(PLACEHOLDER_COUNT)
    ]
    for subnet in subnets:
        # Nothing here routes through these subnets, so their route tables are never needed.
        Annotations.of(subnet).acknowledge_warning(
            "@aws-cdk/aws-ec2:noSubnetRouteTableId", "Placeholders only; no construct reads their route table.")
    return ec2.SubnetSelection(subnets=subnets)


def override_with_list(resource: CfnResource, property_path: str, subnet_ids: CfnParameter) -> None:
    """Replace the placeholder subnets in `property_path` of an L1 resource with the whole list parameter."""
    resource.add_property_override(property_path, subnet_ids.value_as_list)


def import_vpc(scope: Construct, id: str, vpc_id: CfnParameter) -> ec2.IVpc:
    """A handle on the VpcId parameter's VPC; subnets are always passed explicitly (above), never looked up."""
    vpc = ec2.Vpc.from_vpc_attributes(scope, id, vpc_id=vpc_id.value_as_string, availability_zones=Fn.get_azs())
    Annotations.of(vpc).acknowledge_warning(
        "@aws-cdk/aws-ec2:vpcAttributeIsListTokenavailabilityZones",
        "Every construct gets explicit subnets from placeholder_selection(); none asks the VPC for its subnets.")
    return vpc
