"""CDK v2 infrastructure for egress-proxy: an allowlisting Squid proxy on ECS behind an internal NLB."""

from egress_proxy_infra.config import InfraConfig
from egress_proxy_infra.stack import EgressProxyStack

__all__ = ["EgressProxyStack", "InfraConfig"]
