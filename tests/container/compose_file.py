"""docker-compose.yml as plain data (merge keys resolved), for the compose checks and the image test."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"


def load_compose() -> dict[str, Any]:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    try:
        from ruamel.yaml import YAML  # comes with check-jsonschema

        # YAML 1.2, like Compose's go-yaml (unquoted `off` stays a string); resolves the <<: merge keys.
        data = YAML(typ="safe", pure=True).load(text)
    except ImportError:  # the image test needs only the services; test_compose.py needs check-jsonschema anyway
        import yaml

        data = yaml.safe_load(text)
    assert isinstance(data, dict)
    plain: dict[str, Any] = json.loads(json.dumps(data))  # plain dicts/lists/str, as the schema validator expects
    return plain


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return dict(env)


def service_argv(service: Mapping[str, Any], image_entrypoint: list[str]) -> list[str]:
    """What the service's container runs: its entrypoint (or the image's) followed by its command."""
    entrypoint = service.get("entrypoint") or image_entrypoint
    command = service.get("command") or []
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    if isinstance(command, str):
        command = shlex.split(command)
    return [*entrypoint, *command]
