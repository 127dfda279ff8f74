"""The config pipeline's contract: one way from a snapshot to a document and a config, and status.json's schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egress_proxy.allowlist import AllowlistError
from egress_proxy.config_pipeline import ReloadStats, Status, StatusUnreadable, build_config, validate
from egress_proxy.policy import parse_policy_value
from egress_proxy.settings import load_settings
from egress_proxy.sources import Snapshot
from egress_proxy.squid_conf import StatePaths, render


def test_build_config_is_validate_then_render() -> None:
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state"})
    paths = StatePaths(settings.state_dir)
    snapshot = Snapshot(".example.com\nB.example.org\n", "v1")
    built = build_config(snapshot, settings, source="test", paths=paths, run_as="proxy", denial_port=39999,
                         access_log_port=39998, access_log_token="0f" * 16,
                         upstream_login=None)
    document = parse_policy_value(snapshot.text, source="test", client_cidrs=settings.client_cidrs)
    assert built.document == document and built.document.allowlist.entries == (".example.com", "b.example.org")
    assert built.rendered == render(settings, document, paths, run_as="proxy", denial_port=39999, access_log_port=39998,
                                    access_log_token="0f" * 16)
    assert [name for name, seconds in built.phases if seconds >= 0] == ["validate", "render"]


def test_validate_applies_the_sources_size_limit_before_parsing() -> None:
    settings = load_settings({}, {})
    too_big = Snapshot("a.example.com\n", "v1", size=70_000, max_bytes=65_536)
    with pytest.raises(AllowlistError, match="over the 64 KiB limit of secret s"):
        validate(too_big, source="secret s", client_cidrs=settings.client_cidrs)
    with pytest.raises(AllowlistError, match="example.com:443"):
        validate(Snapshot("example.com:443", "v2"), source="test", client_cidrs=settings.client_cidrs)


def test_status_round_trips_through_its_file(tmp_path: Path) -> None:
    settings = load_settings({}, {"EGRESS_PORT": "3130"})
    stats = ReloadStats(success=3, failure=1, loaded_at=1000.0, version="v7", entries=12, skipped=2,
                        last_error="bad entry", rejected_version="v8")
    status = Status.of(stats, config_loaded=True, settings=settings, now=1010.0,
                       workers={"configured": 2, "up": 2})
    status.write(tmp_path / "status.json")
    assert Status.read(tmp_path / "status.json") == status
    written = json.loads((tmp_path / "status.json").read_text())
    assert written["config_age_seconds"] == 10.0 and written["reload_success"] == 3 and written["port"] == 3130
    assert written["workers"] == {"configured": 2, "up": 2} and written["write_failure"] is None


def test_status_read_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(StatusUnreadable, match=f"no status at {tmp_path / 'none.json'}"):
        Status.read(tmp_path / "none.json")
    (tmp_path / "old.json").write_text(json.dumps({"config_loaded": True, "version": "v1"}))
    with pytest.raises(StatusUnreadable, match="missing config_age_seconds, entries"):
        Status.read(tmp_path / "old.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(StatusUnreadable, match="not a JSON object"):
        Status.read(tmp_path / "list.json")


def test_status_read_ignores_fields_it_does_not_know(tmp_path: Path) -> None:
    settings = load_settings({}, {})
    status = Status.of(ReloadStats(), config_loaded=False, settings=settings, now=5.0)
    data = {**json.loads(json.dumps(status.__dict__)), "from_a_newer_version": 1}
    (tmp_path / "status.json").write_text(json.dumps(data))
    assert Status.read(tmp_path / "status.json") == status
