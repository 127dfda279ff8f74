"""The upstream probe helper: OK while the upstream accepts TCP connections, ERR otherwise, and one stderr line per
change of state (Squid writes helpers' stderr to cache.log). And the credentials file the supervisor reads."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from egress_proxy.config_pipeline import read_upstream_login
from egress_proxy.settings import SettingsError, load_settings
from egress_proxy.upstream_probe import Prober, reachable


def test_reachable_against_a_real_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert reachable("127.0.0.1", port)
    assert not reachable("127.0.0.1", port)  # closed now: connection refused


def test_answers_and_logs_each_change_once(capsys: pytest.CaptureFixture[str]) -> None:
    states = iter([True, False, False, True])
    prober = Prober("10.0.0.9", 3128, probe=lambda host, port: next(states))
    assert [prober.answer(f"{n} up") for n in range(4)] == ["0 OK", "1 ERR", "2 ERR", "3 OK"]
    assert capsys.readouterr().err.splitlines() == [
        "upstream_probe: the upstream proxy 10.0.0.9:3128 is not accepting connections",
        "upstream_probe: the upstream proxy 10.0.0.9:3128 accepts connections again",
    ]


def test_credentials_file(tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    env = {"EGRESS_UPSTREAM_PROXY": "http://10.0.0.9:3128", "EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE": str(secret)}
    secret.write_text("egress:p@ss word\n")
    assert read_upstream_login(load_settings({}, env)) == "egress:p@ss word"
    secret.write_text("no-colon-here\n")
    with pytest.raises(SettingsError, match="user:password") as caught:
        read_upstream_login(load_settings({}, env))
    assert "no-colon-here" not in str(caught.value)  # the file's content is never echoed
    secret.unlink()
    with pytest.raises(SettingsError, match="cannot be read"):
        read_upstream_login(load_settings({}, env))
    assert read_upstream_login(load_settings({}, {})) is None
