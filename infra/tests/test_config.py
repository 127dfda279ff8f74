"""Synth-time context validation (no synthesis needed)."""

from __future__ import annotations

import pytest

from egress_proxy_infra.config import CapacityMode, ConfigError, InfraConfig


def test_defaults_are_fargate_with_a_pool_of_four_and_a_30s_drain() -> None:
    config = InfraConfig.from_context({})
    assert config.capacity is CapacityMode.FARGATE
    assert config.eip_pool_size == 4 and config.drain_seconds == 30 and config.image_uri is None
    assert config.stop_timeout_seconds == 45


def test_cli_strings_are_parsed() -> None:
    config = InfraConfig.from_context({"capacity": "EC2", "eipPoolSize": "6", "drainSeconds": "60",
                                       "imageUri": " repo/image:tag "})
    assert config.capacity is CapacityMode.EC2 and config.eip_pool_size == 6
    assert config.drain_seconds == 60 and config.stop_timeout_seconds == 75 and config.image_uri == "repo/image:tag"


@pytest.mark.parametrize(("context", "needle"), [
    ({"capacity": "lambda"}, "capacity"),
    ({"eipPoolSize": "2"}, "eipPoolSize"),
    ({"eipPoolSize": "many"}, "eipPoolSize"),
    ({"drainSeconds": "106"}, "drainSeconds"),  # stopTimeout = drain + 15 must stay <= 120
])
def test_bad_context_is_refused_with_a_fix(context: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        InfraConfig.from_context(context)
