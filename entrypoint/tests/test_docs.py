"""The README documents every setting and every reason code the code knows (so neither can rot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress_proxy.access_log import REASONS
from egress_proxy.settings import OPTIONS, Option

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.env)
def test_every_setting_is_in_the_settings_table(readme: str, option: Option) -> None:
    assert f"| `{option.env}` | `{option.flag}` |" in readme


@pytest.mark.parametrize("reason", [r for r in REASONS if r not in {"allowed", "denied"}])
def test_every_reason_code_is_documented(readme: str, reason: str) -> None:
    assert f"`{reason}`" in readme
