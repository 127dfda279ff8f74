"""Synth-time settings read from CDK context (`-c key=value`).

Everything a console user may want to change after synthesis is a CloudFormation parameter instead
(see parameters.py), including the drain and the deregistration delay. Only choices that change the *shape*
of the template live here: the capacity mode, the architecture, the size of the Elastic IP pool, the image
source and the NLB idle timeout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

#: The repository root: the Docker build context for the proxy image (container/Dockerfile lives there).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: ECS refuses a stopTimeout above 120 s on Fargate (Amazon ECS Developer Guide, task definition parameters,
#: "stopTimeout"). The task always gets the maximum: the supervisor exits by itself once it has drained, so this
#: only bounds how long ECS waits before SIGKILL.
MAX_STOP_TIMEOUT_SECONDS = 120
#: What the supervisor needs after its drain to stop Squid and flush the last log lines, before SIGKILL.
STOP_TIMEOUT_MARGIN_SECONDS = 15
#: The longest drain (DrainSeconds) that still ends before SIGKILL.
MAX_DRAIN_SECONDS = MAX_STOP_TIMEOUT_SECONDS - STOP_TIMEOUT_MARGIN_SECONDS
#: The seed reserved four Elastic IPs.
DEFAULT_EIP_POOL_SIZE = 4
#: One proxy per instance and at least two instances; one more EIP is the head-room a rolling deployment
#: needs (a replacement task needs a fresh instance, and a fresh instance needs a free EIP).
MIN_EIP_POOL_SIZE = 3
MAX_EIP_POOL_SIZE = 20
#: An Elastic IP allocation ID (EC2 API, AllocateAddress): "eipalloc-" and 8 or 17 hex digits.
_ALLOCATION_ID = re.compile(r"eipalloc-[0-9a-f]{8,17}")
#: The NLB's TCP idle timeout: AWS's default, and the range AWS accepts for the listener attribute
#: tcp.idle_timeout.seconds (Elastic Load Balancing User Guide for NLBs, "Connection idle timeout").
#: The proxy's own tunnel idle timeout (EGRESS_TUNNEL_IDLE_TIMEOUT) is set to the same value (stack.py).
DEFAULT_NLB_IDLE_TIMEOUT_SECONDS = 350
MIN_NLB_IDLE_TIMEOUT_SECONDS = 60
MAX_NLB_IDLE_TIMEOUT_SECONDS = 6000
#: What the proxy instances always let out for Squid (proxy_service.allow_proxied_egress); a policy's extra ports
#: can never be these (policy.py refuses them too).
PROXY_EGRESS_PORTS = (80, 443)
#: At most this many transparentExtraPorts entries: each is one egress rule per IP family, and a security group
#: holds 60 rules per direction and family by default (the proxy's own rules and DNS take up to 10).
MAX_EXTRA_PORT_ENTRIES = 20


class CapacityMode(StrEnum):
    """Where the proxy tasks run."""

    FARGATE = "fargate"
    EC2 = "ec2"


class Architecture(StrEnum):
    """CPU architecture of the tasks: the image, the Fargate runtime platform, the AMI and instance types."""

    X86_64 = "x86_64"
    ARM64 = "arm64"

    @property
    def docker_platform(self) -> str:
        return "linux/amd64" if self is Architecture.X86_64 else "linux/arm64"


#: Spellings accepted for `-c arch=...` (Docker says amd64, ECS says X86_64, uname says x86_64/aarch64).
_ARCH_ALIASES = {"x86_64": Architecture.X86_64, "amd64": Architecture.X86_64, "x86-64": Architecture.X86_64,
                 "arm64": Architecture.ARM64, "aarch64": Architecture.ARM64, "graviton": Architecture.ARM64}


class ConfigError(ValueError):
    """A context value is unusable; the message says which one and how to fix it."""


@dataclass(frozen=True, kw_only=True)
class InfraConfig:
    """Typed, validated synth-time settings."""

    capacity: CapacityMode = CapacityMode.FARGATE
    eip_pool_size: int = DEFAULT_EIP_POOL_SIZE
    #: Existing Elastic IPs (allocation IDs) to use as the pool instead of allocating new ones; the pool is then
    #: exactly these. Empty: the stack allocates eip_pool_size addresses.
    eip_allocation_ids: tuple[str, ...] = ()
    #: An existing image (ECR or public registry). None builds container/Dockerfile as a CDK asset.
    image_uri: str | None = None
    #: The Docker build context when building the image; tests point it at a scratch directory.
    image_asset_dir: Path = REPO_ROOT
    #: Built for, and run on, this architecture whatever the machine running `cdk deploy` is.
    arch: Architecture = Architecture.X86_64
    nlb_idle_timeout_seconds: int = DEFAULT_NLB_IDLE_TIMEOUT_SECONDS
    #: EC2 mode only: the instances become the private subnets' default route (transparent_mode.py).
    transparent: bool = False
    #: With transparent: the instances also take over ::/0 and admit the ClientIpv6Cidr parameter's range.
    transparent_ipv6: bool = False
    #: With transparent: the TCP ports (first, last) the instances' security group lets out besides 80 and 443,
    #: for the policies' extra ports (`"ports": ["github.com:22"]`); the host's nftables sets decide where to.
    transparent_extra_ports: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.eip_allocation_ids and len(self.eip_allocation_ids) != self.eip_pool_size:
            raise ConfigError(
                f"eipAllocationIds lists {len(self.eip_allocation_ids)} addresses but eipPoolSize="
                f"{self.eip_pool_size}: drop eipPoolSize (the pool is then the listed addresses)")
        bad = [a for a in self.eip_allocation_ids if not _ALLOCATION_ID.fullmatch(a)]
        if bad or len(set(self.eip_allocation_ids)) != len(self.eip_allocation_ids):
            raise ConfigError(f"eipAllocationIds={','.join(self.eip_allocation_ids)}: expected distinct allocation "
                              "IDs such as eipalloc-0123456789abcdef0, comma-separated"
                              + (f" ({', '.join(bad)} is not one)" if bad else ""))
        if self.eip_allocation_ids and self.capacity is not CapacityMode.EC2:
            raise ConfigError("eipAllocationIds: Elastic IPs are for -c capacity=ec2 only")
        if not MIN_EIP_POOL_SIZE <= self.eip_pool_size <= MAX_EIP_POOL_SIZE:
            raise ConfigError(
                f"eipPoolSize={self.eip_pool_size}: use {MIN_EIP_POOL_SIZE}..{MAX_EIP_POOL_SIZE} "
                "(two proxies in two AZs plus one spare for rolling deployments)"
            )
        if not MIN_NLB_IDLE_TIMEOUT_SECONDS <= self.nlb_idle_timeout_seconds <= MAX_NLB_IDLE_TIMEOUT_SECONDS:
            raise ConfigError(
                f"nlbIdleTimeoutSeconds={self.nlb_idle_timeout_seconds}: use {MIN_NLB_IDLE_TIMEOUT_SECONDS}.."
                f"{MAX_NLB_IDLE_TIMEOUT_SECONDS} (the range the NLB accepts; AWS's default is "
                f"{DEFAULT_NLB_IDLE_TIMEOUT_SECONDS})"
            )
        if self.transparent and self.capacity is not CapacityMode.EC2:
            raise ConfigError("transparent=on needs capacity=ec2: only instances can be the route target of the "
                              "private subnets (deploy with -c capacity=ec2 -c transparent=on)")
        if self.transparent_ipv6 and not self.transparent:
            raise ConfigError("transparentIpv6=on needs transparent=on: it adds IPv6 to transparent mode (deploy "
                              "with -c capacity=ec2 -c transparent=on -c transparentIpv6=on)")
        if self.transparent_extra_ports and not self.transparent:
            raise ConfigError("transparentExtraPorts needs transparent=on: the extra ports are a policy's ports in "
                              "transparent mode (deploy with -c capacity=ec2 -c transparent=on "
                              "-c transparentExtraPorts=...)")
        if self.image_uri is not None and not re.fullmatch(r"[^\s]+", self.image_uri):
            raise ConfigError(f"imageUri={self.image_uri!r}: expected an image reference such as repo:tag")

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> InfraConfig:
        """Build from CDK context values; `-c` values arrive as strings, cdk.json values may be typed."""
        if context.get("drainSeconds") not in (None, ""):
            raise ConfigError("drainSeconds: the drain is the DrainSeconds stack parameter (0..105), e.g. "
                              "`cdk deploy --parameters DrainSeconds=60`; drop -c drainSeconds")
        raw_capacity = str(context.get("capacity") or CapacityMode.FARGATE.value).strip().lower()
        try:
            capacity = CapacityMode(raw_capacity)
        except ValueError:
            raise ConfigError(f"capacity={raw_capacity!r}: use 'fargate' or 'ec2'") from None
        raw_allocations = str(context.get("eipAllocationIds") or "")
        allocation_ids = tuple(a.strip() for a in raw_allocations.split(",") if a.strip())
        raw_arch = str(context.get("arch") or Architecture.X86_64.value).strip().lower()
        if raw_arch not in _ARCH_ALIASES:
            raise ConfigError(f"arch={raw_arch!r}: use 'x86_64' (alias amd64) or 'arm64' (Graviton)")
        image_uri = str(context.get("imageUri") or "").strip() or None
        asset_dir = context.get("imageAssetDir")
        return cls(
            capacity=capacity,
            eip_pool_size=_as_int(context, "eipPoolSize", len(allocation_ids) or DEFAULT_EIP_POOL_SIZE),
            eip_allocation_ids=allocation_ids,
            image_uri=image_uri,
            image_asset_dir=Path(asset_dir).resolve() if asset_dir else REPO_ROOT,
            arch=_ARCH_ALIASES[raw_arch],
            nlb_idle_timeout_seconds=_as_int(context, "nlbIdleTimeoutSeconds", DEFAULT_NLB_IDLE_TIMEOUT_SECONDS),
            transparent=_as_on_off(context, "transparent"),
            transparent_ipv6=_as_on_off(context, "transparentIpv6"),
            transparent_extra_ports=_as_port_ranges(context, "transparentExtraPorts"),
        )


def _as_int(context: Mapping[str, Any], key: str, default: int) -> int:
    value = context.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected a whole number") from None


def _as_on_off(context: Mapping[str, Any], key: str) -> bool:
    value = str(context.get(key) or "off").strip().lower()
    if value not in {"on", "off", "true", "false"}:
        raise ConfigError(f"{key}={value!r}: use on or off")
    return value in {"on", "true"}


def _as_port_ranges(context: Mapping[str, Any], key: str) -> tuple[tuple[int, int], ...]:
    """TCP ports and ranges, comma-separated (``22,7999,5432-5433``), as (first, last) pairs in the given order."""
    value = context.get(key)
    # cdk.json may hold a list or a number; `-c` gives a string.
    raw = ",".join(map(str, value)) if isinstance(value, list) else str(value or "").strip()
    example = f"e.g. -c {key}=22,7999,5432-5433"
    ranges: list[tuple[int, int]] = []
    for item in (part.strip() for part in raw.split(",") if raw):
        first, dash, last = item.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or not (
                1 <= int(first) <= int(last if dash else first) <= 65535):
            raise ConfigError(f"{key}={raw!r}: {item!r} is not a TCP port; use ports from 1 to 65535 or ranges "
                              f"such as 5432-5433, comma-separated ({example})")
        span = (int(first), int(last if dash else first))
        shown = item.replace(" ", "")
        always = [port for port in PROXY_EGRESS_PORTS if span[0] <= port <= span[1]]
        if always:
            raise ConfigError(f"{key}={raw!r}: {shown} includes tcp/{always[0]}, which the instances always let out "
                              "for the proxy (and a policy's extra ports cannot include 80 or 443); leave it out"
                              + (" or split the range around it" if span[0] != span[1] else ""))
        if span in ranges:
            raise ConfigError(f"{key}={raw!r}: {shown} is listed twice; list each port or range once")
        ranges.append(span)
    if len(ranges) > MAX_EXTRA_PORT_ENTRIES:
        raise ConfigError(f"{key}: {len(ranges)} entries, at most {MAX_EXTRA_PORT_ENTRIES} (each is a security group "
                          "rule, and a group holds 60 per direction by default); join neighbouring ports into "
                          "ranges such as 5432-5439")
    return tuple(ranges)
