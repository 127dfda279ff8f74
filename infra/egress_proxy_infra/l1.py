"""Typed access to an L2 construct's L1 resource, for the property overrides CloudFormation parameters need."""

from __future__ import annotations

from typing import TypeVar, overload

from aws_cdk import CfnResource
from constructs import IConstruct

ResourceT = TypeVar("ResourceT", bound=CfnResource)


@overload
def l1(construct: IConstruct) -> CfnResource: ...
@overload
def l1(construct: IConstruct, kind: type[ResourceT]) -> ResourceT: ...
def l1(construct: IConstruct, kind: type[CfnResource] = CfnResource) -> CfnResource:
    """`construct.node.default_child`, checked to be a `kind` (a CfnResource unless told otherwise)."""
    child = construct.node.default_child
    if not isinstance(child, kind):
        raise TypeError(f"{construct.node.path}: expected a {kind.__name__} as default child, got {child!r}")
    return child
