"""Strict settings: unknown EGRESS_* variables, a missing allowlist source, and the places that set EGRESS_*
variables for the proxy (docker-compose.yml, the CDK task environment) checked against the one declaration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from egress_proxy.errors import ExitCode, exit_code_of
from egress_proxy.settings import OPTIONS_BY_ENV, TOOLING_ENV, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_variable_names_the_closest_setting() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, {"EGRESS_ALLOWLIST_FLIE": "/etc/allowlist.txt"})
    message = str(caught.value)
    assert "EGRESS_ALLOWLIST_FLIE" in message and "did you mean EGRESS_ALLOWLIST_FILE?" in message
    assert exit_code_of(caught.value) is ExitCode.BAD_CONFIG


def test_unknown_variable_without_a_close_name() -> None:
    with pytest.raises(SettingsError, match="EGRESS_ZZZ") as caught:
        load_settings({}, {"EGRESS_ZZZ": "1"})
    assert "did you mean" not in str(caught.value)


def test_tooling_variables_and_other_prefixes_are_not_settings_errors() -> None:
    load_settings({}, {name: "x" for name in TOOLING_ENV} | {"HTTP_PROXY": "x", "EGRESSX": "1"})


def test_run_needs_an_allowlist_source_and_names_the_three_ways() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, {}, require_source=True)
    message = str(caught.value)
    for way in ("EGRESS_ALLOWLIST_FILE", "EGRESS_ALLOWLIST_SECRET", "EGRESS_ALLOWED_DOMAINS"):
        assert way in message
    assert exit_code_of(caught.value) is ExitCode.BAD_CONFIG


def test_an_explicitly_empty_inline_list_is_a_source() -> None:
    settings = load_settings({}, {"EGRESS_ALLOWED_DOMAINS": ""}, require_source=True)
    assert settings.source_kind == "inline" and settings.allowed_domains is None


def test_an_empty_file_setting_is_no_source() -> None:
    with pytest.raises(SettingsError):
        load_settings({}, {"EGRESS_ALLOWLIST_FILE": ""}, require_source=True)


def test_os_errors_map_to_the_startup_io_code() -> None:
    assert exit_code_of(PermissionError(13, "Permission denied", "/var/lib/egress-proxy")) is ExitCode.STARTUP_IO
    assert exit_code_of(RuntimeError("a bug")) is None


# --- the places that configure the proxy -----------------------------------------------------------------------


def _compose_environments() -> list[tuple[str, dict[str, str]]]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    found = []
    for name, service in (document.get("services") or {}).items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        egress = {key: str(value) for key, value in environment.items() if key.startswith("EGRESS_")}
        if egress:
            found.append((name, egress))
    return found


def test_docker_compose_sets_only_known_settings_with_valid_values() -> None:
    environments = _compose_environments()
    assert environments, "docker-compose.yml configures no proxy service"
    for service, environment in environments:
        settings = load_settings({}, environment, require_source=True)  # raises on a typo or a bad value
        assert settings is not None, service


def _infra_env_keys() -> dict[str, ast.expr]:
    """EGRESS_* keys of dict literals in the CDK app (read-only: the task environment it synthesizes)."""
    keys: dict[str, ast.expr] = {}
    for path in sorted((ROOT / "infra" / "egress_proxy_infra").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and str(key.value).startswith("EGRESS_"):
                        keys[str(key.value)] = value
    return keys


def test_cdk_task_environment_sets_only_known_settings() -> None:
    if not (ROOT / "infra" / "egress_proxy_infra").is_dir():
        pytest.fail("infra/egress_proxy_infra is missing")
    keys = _infra_env_keys()
    assert keys, "no EGRESS_* variable found in the CDK app"
    unknown = sorted(set(keys) - set(OPTIONS_BY_ENV))
    assert not unknown, f"the CDK task environment sets variables no setting reads: {unknown}"
    # The literal values (the others are CloudFormation parameters, checked at deploy) must parse.
    literal = {name: value.value for name, value in keys.items()
               if isinstance(value, ast.Constant) and isinstance(value.value, str)}
    load_settings({}, literal)


def test_every_egress_name_in_the_repository_is_a_setting_or_tooling() -> None:
    """A new tooling variable (an EGRESS_ name read by a script) must be added to TOOLING_ENV, or the proxy started with
    that environment would refuse to run."""
    import re
    import subprocess

    deliberate_typos = {"EGRESS_ALLOWLIST_FLIE", "EGRESS_ZZZ"}  # this file's and the CLI tests' own examples
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names: set[str] = set()
    for name in files:
        try:
            names |= set(re.findall(r"\bEGRESS_[A-Z][A-Z0-9_]*\b", (ROOT / name).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    stray = sorted(names - set(OPTIONS_BY_ENV) - TOOLING_ENV - deliberate_typos)
    assert not stray, f"EGRESS_* names that are neither settings nor in settings.TOOLING_ENV: {stray}"
