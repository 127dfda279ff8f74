"""The operations guide's process section says what the code does: every exit code and every handled signal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from egress_proxy.errors import ExitCode
from egress_proxy.supervisor import EventQueue

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


@pytest.fixture(scope="module")
def process_section() -> str:
    text = OPERATIONS.read_text(encoding="utf-8")
    start = text.index("\n## The supervisor process\n")
    return text[start:text.index("\n## ", start + 1)]


def test_every_exit_code_of_run_is_in_the_table(process_section: str) -> None:
    table = dict(re.findall(r"^\| (\d) \| (.+) \|$", process_section, flags=re.MULTILINE))
    documented = {int(code) for code in table}
    assert documented == {int(code) for code in ExitCode if code is not ExitCode.UNHEALTHY}


def test_every_handled_signal_is_documented(process_section: str) -> None:
    for signum in EventQueue.SIGNALS:
        if signum.name == "SIGCHLD":
            continue  # internal: Squid's exit
        assert f"`{signum.name}`" in process_section, signum.name
