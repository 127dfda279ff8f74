"""docker-compose.yml and container/Dockerfile cannot rot: checked against the compose specification and against
the settings and subcommands the supervisor really accepts. No Docker engine needed.

* The compose file validates against the Compose Specification JSON schema (vendored by the check-jsonschema
  package from PyPI), and a misspelt key would not.
* Every service that runs the egress-proxy image runs a real `egress-proxy` subcommand: its entrypoint (or the
  Dockerfile's ENTRYPOINT) plus command parse with the CLI's own parser.
* Every EGRESS_* variable there (and in the Dockerfile) is a declared setting, and the whole environment loads
  with the supervisor's own `load_settings`: values parse, exactly one allowlist source is chosen.
* Files and secrets named there exist: the allowlist file is inside a read-only bind mount of a repo directory
  and parses without warnings; the seeded secret is the one the secret-backed proxy reads; the emulator it
  talks to is a service of the same profile; published ports match the settings and do not collide.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from egress_proxy.allowlist import parse_allowlist
from egress_proxy.cli import build_parser
from egress_proxy.settings import OPTIONS, Settings, SettingsError, load_settings

try:
    import jsonschema
    from compose_file import COMPOSE_FILE, REPO, load_compose, service_argv, service_env
except ImportError as exc:  # pragma: no cover - a missing test dependency must fail, not skip
    raise ImportError(f"{exc}: install requirements.txt (check-jsonschema brings jsonschema and ruamel.yaml)") from exc

DOCKERFILE = REPO / "container" / "Dockerfile"
SETTING_ENVS = {option.env for option in OPTIONS}


# --- loading --------------------------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema as vendored (with its license and checksum) by check-jsonschema."""
    try:
        source = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    except ModuleNotFoundError as exc:
        raise AssertionError("the test venv lacks check-jsonschema (requirements.txt must pin it)") from exc
    schema: dict[str, Any] = json.loads(source.read_text(encoding="utf-8"))
    return schema


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            instructions = []  # a new stage: only the last one is the image
        instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_json(instruction: str) -> list[str]:
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert values, f"container/Dockerfile has no {instruction}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), f"{instruction} must be exec form"
    return parsed


def egress_argv(argv: list[str]) -> list[str]:
    """The egress-proxy command line inside an entrypoint, past a tiny init such as `tini --`."""
    if argv and Path(argv[0]).name in {"tini", "tini-static", "dumb-init"}:
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    assert argv and Path(argv[0]).name == "egress-proxy", f"not an egress-proxy command: {argv}"
    return argv[1:]


def parse_cli(args: list[str]) -> Any:
    try:
        return build_parser().parse_args(args)
    except SystemExit as exit_:
        line = " ".join(args)
        raise AssertionError(f"`egress-proxy {line}` is not a valid command line (exit {exit_.code})") from None


_UNITS = {"h": "hours", "m": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds"}


def duration(value: str) -> timedelta:
    """A Compose duration such as 1m30s or 15s."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a Compose duration: {value}"
    total = timedelta()
    for number, unit in parts:
        total += timedelta(**{_UNITS[unit]: float(number)})
    return total


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def uses_our_image(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and Path(build.get("dockerfile", "")).as_posix() == "container/Dockerfile"


OUR_SERVICES = sorted(name for name, service in SERVICES.items() if uses_our_image(service))


def command_of(service: Mapping[str, Any]) -> list[str]:
    return egress_argv(service_argv(service, dockerfile_json("ENTRYPOINT")))


def run_settings(name: str) -> Settings:
    """The settings `egress-proxy run` would load in this service: image ENV, then the service's environment."""
    args = parse_cli(command_of(SERVICES[name]))
    assert args.command == "run"
    cli = {option.name: getattr(args, option.name, None) for option in OPTIONS}
    try:
        return load_settings(cli, {**dockerfile_env(), **service_env(SERVICES[name])})
    except SettingsError as exc:
        raise AssertionError(f"service {name}: {exc}") from exc


def mount_sources(service: Mapping[str, Any], target_file: str) -> Path:
    """The repo file a path inside the container comes from, through the service's read-only bind mounts."""
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target, read_only = parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            assert volume.get("type") == "bind", volume
            source, target, read_only = volume["source"], volume["target"], bool(volume.get("read_only"))
        target_path = Path(target)
        if Path(target_file) == target_path or target_path in Path(target_file).parents:
            assert read_only, f"{target} must be mounted read-only"
            host = (COMPOSE_FILE.parent / source / Path(target_file).relative_to(target_path)).resolve()
            assert REPO in host.parents, f"{host} is outside the repository"
            assert host.is_file(), f"{target_file} comes from {host}, which does not exist"
            return host
    raise AssertionError(f"{target_file} is not inside any bind mount of the service")


# --- the compose specification --------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = sorted(validator.iter_errors(COMPOSE), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_check_is_not_vacuous() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["proxy"]["enviroment"] = {"EGRESS_PORT": "3128"}  # misspelt key
    assert not validator.is_valid(broken)
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["proxy"]["ports"] = "3128:3128"  # a string where a list is required
    assert not validator.is_valid(broken)


# --- the services that run the image ---------------------------------------------------------------------------


def test_the_expected_services_exist() -> None:
    assert {"proxy", "proxy-secrets", "seed-allowlist"} <= set(OUR_SERVICES), OUR_SERVICES
    assert "profiles" not in SERVICES["proxy"], "plain `docker compose up` must start the file-backed proxy"
    for name in ("moto", "seed-allowlist", "proxy-secrets"):
        assert SERVICES[name].get("profiles") == ["secrets"], name
    for name in OUR_SERVICES:
        assert SERVICES[name]["build"]["context"] == ".", "the Dockerfile's COPY paths are relative to the repo root"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_every_egress_variable_is_a_real_setting(name: str) -> None:
    unknown = sorted(k for k in service_env(SERVICES[name]) if k.startswith("EGRESS_") and k not in SETTING_ENVS)
    assert not unknown, f"service {name} sets variables the supervisor does not read: {unknown}"
    not_strings = sorted(k for k, v in service_env(SERVICES[name]).items() if not isinstance(v, str))
    assert not not_strings, f"service {name}: quote these values (YAML would type them): {not_strings}"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_every_command_is_a_real_subcommand(name: str) -> None:
    args = parse_cli(command_of(SERVICES[name]))
    assert args.command in {"run", "allowlist"}, f"service {name} runs `egress-proxy {args.command}`"


def test_file_backed_proxy_loads_and_serves_the_example_allowlist() -> None:
    settings = run_settings("proxy")
    assert settings.source_kind == "file" and settings.allowlist_file is not None
    host_file = mount_sources(SERVICES["proxy"], str(settings.allowlist_file))
    assert host_file == REPO / "examples" / "allowlist.txt"
    # A directory mount: editors replace the file by rename, which a single-file bind mount never shows.
    assert any(isinstance(v, dict) and Path(v["target"]) == settings.allowlist_file.parent
               for v in SERVICES["proxy"]["volumes"]), "mount the allowlist's directory, not the single file"


def test_secret_backed_proxy_reads_the_seeded_secret_from_the_emulator() -> None:
    settings = run_settings("proxy-secrets")
    assert settings.source_kind == "secret"
    seed = parse_cli(command_of(SERVICES["seed-allowlist"]))
    assert (seed.command, seed.action) == ("allowlist", "push") and seed.create
    assert seed.secret == settings.allowlist_secret
    seeded = mount_sources(SERVICES["seed-allowlist"], str(seed.file))
    assert seeded == REPO / "examples" / "allowlist.txt"
    for name in ("seed-allowlist", "proxy-secrets"):
        env = service_env(SERVICES[name])
        endpoint = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["AWS_ENDPOINT_URL"])
        assert endpoint, env["AWS_ENDPOINT_URL"]
        emulator = SERVICES[endpoint.group(1)]
        assert emulator.get("profiles") == SERVICES[name]["profiles"]
        assert emulator["image"].startswith("motoserver/moto:")
        assert endpoint.group(2) in {str(p).split(":")[-1] for p in emulator.get("ports", [])}
        # boto3 takes the region from AWS_DEFAULT_REGION (AWS_REGION alone: "You must specify a region").
        assert env["AWS_DEFAULT_REGION"] and env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert SERVICES["seed-allowlist"]["depends_on"]["moto"]["condition"] == "service_healthy"
    assert SERVICES["proxy-secrets"]["depends_on"]["seed-allowlist"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", ["proxy", "proxy-secrets"])
def test_local_proxies_publish_their_port_publish_no_metrics_and_stop_after_draining(name: str) -> None:
    settings = run_settings(name)
    assert not settings.metrics, "no CloudWatch from a laptop"
    targets = {int(str(p).split(":")[-1]) for p in SERVICES[name]["ports"]}
    # the proxy port, plus the Prometheus port where it is on (served on the listen address, so publishable)
    assert targets == {settings.port} | ({settings.prometheus_port} if settings.prometheus_port else set())
    grace = duration(SERVICES[name].get("stop_grace_period", "10s"))
    assert grace.total_seconds() > settings.drain_seconds, "compose would SIGKILL the proxy mid-drain"
    assert SERVICES[name].get("stop_signal", "SIGTERM") == "SIGTERM"


def test_published_host_ports_do_not_collide() -> None:
    published = [str(p).rsplit(":", 1)[0] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_example_allowlist_parses_cleanly_and_matches_the_walkthrough() -> None:
    allowlist = parse_allowlist((REPO / "examples" / "allowlist.txt").read_text(encoding="utf-8"),
                                source="examples/allowlist.txt")
    assert not allowlist.warnings, allowlist.warnings
    for host in ("example.com", "pypi.org", "files.pythonhosted.org", "api.github.com", "deb.debian.org",
                 "secretsmanager.us-east-1.amazonaws.com"):
        assert allowlist.allows(host), host
    for host in ("www.example.com", "example.org"):
        assert not allowlist.allows(host), host


# --- the Dockerfile ------------------------------------------------------------------------------------------


def test_dockerfile_entrypoint_healthcheck_and_env_are_real() -> None:
    assert parse_cli(egress_argv(dockerfile_json("ENTRYPOINT"))).command == "run"
    health = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert health, "no HEALTHCHECK"
    health_cmd = json.loads(health[-1].split(" CMD ", 1)[1])
    assert parse_cli(egress_argv(health_cmd)).command == "health"
    env = dockerfile_env()
    unknown = sorted(k for k in env if k.startswith("EGRESS_") and k not in SETTING_ENVS)
    assert not unknown, unknown
    settings = load_settings({}, env)
    exposed = [rest for word, rest in dockerfile_instructions() if word == "EXPOSE"]
    assert exposed == [str(settings.port)]
    assert str(settings.state_dir) == "/var/lib/egress-proxy"
    stop = [rest for word, rest in dockerfile_instructions() if word == "STOPSIGNAL"]
    assert stop == ["SIGTERM"], "the supervisor drains on SIGTERM"
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] in {"13", "proxy"}, "the image must not run as root"
