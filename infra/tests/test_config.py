"""Synth-time context validation (no synthesis needed)."""

from __future__ import annotations

import pytest
from egress_proxy_infra.config import Architecture, CapacityMode, ConfigError, InfraConfig


def test_defaults_are_fargate_with_a_pool_of_four() -> None:
    config = InfraConfig.from_context({})
    assert config.capacity is CapacityMode.FARGATE
    assert config.eip_pool_size == 4 and config.image_uri is None


def test_cli_strings_are_parsed() -> None:
    config = InfraConfig.from_context({"capacity": "EC2", "eipPoolSize": "6", "imageUri": " repo/image:tag "})
    assert config.capacity is CapacityMode.EC2 and config.eip_pool_size == 6
    assert config.image_uri == "repo/image:tag"


@pytest.mark.parametrize(("context", "needle"), [
    ({"capacity": "lambda"}, "capacity"),
    ({"eipPoolSize": "2"}, "eipPoolSize"),
    ({"eipPoolSize": "many"}, "eipPoolSize"),
    ({"drainSeconds": "60"}, "DrainSeconds stack parameter"),  # a parameter now, not context
    ({"arch": "sparc"}, "arch"),
    ({"capacity": "ec2", "eipAllocationIds": "eipalloc-0123456789abcdef0,10.0.0.1,eipalloc-00000000000000001"},
     "10.0.0.1 is not one"),
    ({"capacity": "ec2", "eipAllocationIds": "eipalloc-0123456789abcdef0,eipalloc-0123456789abcdef0,"
                                             "eipalloc-00000000000000001"}, "distinct"),
    ({"capacity": "ec2", "eipAllocationIds": "eipalloc-0123456789abcdef0,eipalloc-00000000000000001"},
     "eipPoolSize=2"),  # a pool of at least 3
    ({"capacity": "ec2", "eipPoolSize": "4", "eipAllocationIds": "eipalloc-0123456789abcdef0,"
                                                                 "eipalloc-00000000000000001,eipalloc-00000000000000002"},
     "drop eipPoolSize"),
    ({"eipAllocationIds": "eipalloc-0123456789abcdef0,eipalloc-00000000000000001,eipalloc-00000000000000002"},
     "capacity=ec2 only"),
    ({"nlbIdleTimeoutSeconds": "30"}, "nlbIdleTimeoutSeconds"),  # the NLB accepts 60..6000
    ({"nlbIdleTimeoutSeconds": "6001"}, "nlbIdleTimeoutSeconds"),
])
def test_bad_context_is_refused_with_a_fix(context: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        InfraConfig.from_context(context)


@pytest.mark.parametrize(("value", "arch"), [("x86_64", Architecture.X86_64), ("AMD64", Architecture.X86_64),
                                             ("arm64", Architecture.ARM64), ("aarch64", Architecture.ARM64)])
def test_arch_spellings(value: str, arch: Architecture) -> None:
    assert InfraConfig.from_context({"arch": value}).arch is arch


def test_defaults_build_for_x86_64_with_the_nlb_default_idle_timeout() -> None:
    config = InfraConfig.from_context({})
    assert config.arch is Architecture.X86_64 and config.arch.docker_platform == "linux/amd64"
    assert config.nlb_idle_timeout_seconds == 350


def test_existing_allocations_make_the_pool() -> None:
    ids = "eipalloc-0123456789abcdef0, eipalloc-00000000000000001,eipalloc-00000000000000002"
    config = InfraConfig.from_context({"capacity": "ec2", "eipAllocationIds": ids})
    assert config.eip_allocation_ids == ("eipalloc-0123456789abcdef0", "eipalloc-00000000000000001",
                                         "eipalloc-00000000000000002")
    assert config.eip_pool_size == 3
