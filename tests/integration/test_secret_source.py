"""Live allowlist from AWS Secrets Manager (a real moto_server on loopback), plus the CLI against it.

The proxy polls every second (EGRESS_RELOAD_INTERVAL=1): DescribeSecret for the AWSCURRENT VersionId, and
GetSecretValue only when it moved. Waits are "within the interval plus a generous margin", never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ORIGIN_IP, MotoServer
from harness import DnsServer, HttpOrigin, TlsOrigin, free_port
from harness import client_session as session
from log_reader import Record
from proxy_runner import ProxyRunner, egress_proxy_command

PORT = 3130
INTERVAL = 1.0
MARGIN = 15.0
SECRET = "egress-proxy/test-live-allowlist"
BASE_VALUE = json.dumps({"allowed_domains": ["allowed.test", "keep.wild.test"]})




def http_status(proxy: ProxyRunner, host: str) -> int:
    with session() as client:
        return client.get(f"http://{host}/", proxies=proxy.proxies, timeout=10,
                          headers={"Connection": "close"}).status_code


def proxy_env(moto: MotoServer, secret: str = SECRET) -> dict[str, str]:
    return {
        **moto.env,
        "EGRESS_ALLOWLIST_SECRET": secret,
        "EGRESS_RELOAD_INTERVAL": str(INTERVAL),
        "EGRESS_DNS_SERVERS": "127.0.0.1",
        "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
        "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
    }


def put_or_create(moto: MotoServer, value: str, secret: str = SECRET) -> str:
    client = moto.client("secretsmanager")
    try:
        return str(client.put_secret_value(SecretId=secret, SecretString=value)["VersionId"])
    except client.exceptions.ResourceNotFoundException:
        return str(client.create_secret(Name=secret, SecretString=value)["VersionId"])


def current_version(moto: MotoServer, secret: str = SECRET) -> str:
    stages = moto.client("secretsmanager").describe_secret(SecretId=secret)["VersionIdsToStages"]
    return next(version for version, names in stages.items() if "AWSCURRENT" in names)


def wait_event(proxy: ProxyRunner, name: str, mark: int, timeout: float = INTERVAL * 1.1 + MARGIN) -> Record:
    return proxy.wait_for(lambda r: r.get("type") == "supervisor" and r.get("event") == name, timeout=timeout,
                          start=mark)


def change(proxy: ProxyRunner, moto: MotoServer, value: str, timeout: float = INTERVAL * 1.1 + MARGIN) -> Record:
    mark = proxy.mark()
    version = put_or_create(moto, value)
    record = wait_event(proxy, "reloaded", mark, timeout)
    assert record["version"] == version and record["confirmed"] is True, record
    return record


def status(proxy: ProxyRunner) -> dict[str, Any]:
    data = json.loads((proxy.state_dir / "status.json").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def proxy(public_tmp: Path, moto: MotoServer, dns: DnsServer, http_origin: HttpOrigin,
          tls_origin: TlsOrigin) -> Iterator[ProxyRunner]:
    put_or_create(moto, BASE_VALUE)
    runner = ProxyRunner(public_tmp / "state-secret", proxy_env(moto), port=PORT)
    runner.start()
    yield runner
    runner.stop_and_check_no_restart()


@pytest.fixture()
def restore(proxy: ProxyRunner, moto: MotoServer) -> Iterator[None]:
    yield
    if moto.process is None or moto.process.poll() is not None:
        moto.start()
    mark = proxy.mark()
    put_or_create(moto, BASE_VALUE)
    proxy.wait_for(lambda r: r.get("event") in {"reloaded", "reload_skipped"}, timeout=INTERVAL + 8 + MARGIN,
                   start=mark)


def cli(moto: MotoServer, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EGRESS_", "AWS_")) and "proxy" not in k.lower()}
    return subprocess.run([*egress_proxy_command(), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **moto.env, **(env or {})})


# --- the secret as a source ------------------------------------------------------------------------------------


def test_started_from_json_secret(proxy: ProxyRunner, moto: MotoServer) -> None:
    started = proxy.events("started")[0]
    assert started["source"] == f"secret {SECRET}" and started["entries"] == 2
    assert http_status(proxy, "allowed.test") == 200
    assert http_status(proxy, "keep.wild.test") == 200
    assert http_status(proxy, "denied.test") == 403


def test_comma_form_update_adds_and_removes(proxy: ProxyRunner, moto: MotoServer, restore: None) -> None:
    assert http_status(proxy, "comma.wild.test") == 403
    record = change(proxy, moto, "keep.wild.test, comma.wild.test")
    assert record["added"] == 1 and record["removed"] == 1
    assert http_status(proxy, "comma.wild.test") == 200
    assert http_status(proxy, "allowed.test") == 403
    assert status(proxy)["version"] == record["version"]


def test_json_form_update_adds_and_removes(proxy: ProxyRunner, moto: MotoServer, restore: None) -> None:
    record = change(proxy, moto, json.dumps({"allowed_domains": ["keep.wild.test", ".json.wild.test"]}))
    assert record["added"] == 1 and record["removed"] == 1
    assert http_status(proxy, "a.json.wild.test") == 200
    assert http_status(proxy, "json.wild.test") == 200
    assert http_status(proxy, "allowed.test") == 403


def test_same_list_in_new_version_does_not_reconfigure(proxy: ProxyRunner, moto: MotoServer) -> None:
    # A new VersionId whose list is the same policy (other form, order, case): nothing to reconfigure.
    mark = proxy.mark()
    version = put_or_create(moto, "KEEP.wild.test,allowed.test")
    skipped = wait_event(proxy, "reload_skipped", mark)
    assert skipped["version"] == version
    assert not [r for r in proxy.records[mark:] if r.get("event") == "reloaded"]
    assert not [r for r in proxy.records[mark:] if r.get("type") == "cache_log" and "Reconfiguring" in r["message"]]


BAD_VALUES = {
    "invalid_json": ('{"allowed_domains": ["keep.wild.test", "bad.wild.test"', "not valid JSON"),
    "invalid_entry": ("keep.wild.test, bad.wild.test, example.com:8443", "example.com:8443"),
    "wrong_json_shape": ('{"domains": ["keep.wild.test", "bad.wild.test"]}', "allowed_domains"),
    "over_64k": (",".join(["bad.wild.test", *(f"h{i}.bulk.wild.test" for i in range(4000))]), "64 KiB limit"),
}


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_bad_secret_value_keeps_last_good_list(proxy: ProxyRunner, moto: MotoServer, kind: str,
                                               restore: None) -> None:
    value, named = BAD_VALUES[kind]
    before = status(proxy)
    mark = proxy.mark()
    version = put_or_create(moto, value)
    record = wait_event(proxy, "reload_rejected", mark)
    assert record["version"] == version and record["active_version"] == before["version"]
    assert named in record["message"], record["message"]
    assert http_status(proxy, "keep.wild.test") == 200
    assert http_status(proxy, "bad.wild.test") == 403
    after = status(proxy)
    assert after["version"] == before["version"] and after["rejected_version"] == version
    assert after["reload_failure"] == before["reload_failure"] + 1


def test_cli_push_reaches_running_proxy(proxy: ProxyRunner, moto: MotoServer, tmp_path: Path,
                                        restore: None) -> None:
    path = tmp_path / "allowlist.txt"
    path.write_text("# pushed\nkeep.wild.test\npushed.wild.test\n")
    mark = proxy.mark()
    result = cli(moto, "allowlist", "push", str(path), "--secret", SECRET)
    assert result.returncode == 0, result.stderr
    assert "+ pushed.wild.test" in result.stdout and "- allowed.test" in result.stdout
    record = wait_event(proxy, "reloaded", mark)
    assert record["version"] == current_version(moto)
    assert http_status(proxy, "pushed.wild.test") == 200


# --- outage: keep serving, recover by itself ---------------------------------------------------------------------


def test_secrets_manager_outage_keeps_serving_and_recovers(proxy: ProxyRunner, moto: MotoServer,
                                                           restore: None) -> None:
    active = status(proxy)["version"]
    mark = proxy.mark()
    moto.stop()
    try:
        record = wait_event(proxy, "source_unavailable", mark)
        assert record["level"] == "warning" and SECRET in record["message"]
        assert record["version"] == active
        # Still serving the last good list, for as long as the outage lasts.
        wait_event(proxy, "source_unavailable", proxy.mark())
        assert http_status(proxy, "keep.wild.test") == 200
        assert http_status(proxy, "recovered.wild.test") == 403
        assert status(proxy)["version"] == active
    finally:
        moto.start()  # a fresh, empty moto on the same port: the secret has to be created again
    # Backoff doubles from 1 s while the source fails; allow for a few doublings.
    change(proxy, moto, "keep.wild.test, allowed.test, recovered.wild.test", timeout=INTERVAL + 16 + MARGIN)
    assert [r for r in proxy.records[mark:] if r.get("event") == "source_available"]
    assert http_status(proxy, "recovered.wild.test") == 200


# --- startup -------------------------------------------------------------------------------------------------------


def test_startup_with_unreachable_secrets_manager_exits_4(public_tmp: Path, moto: MotoServer) -> None:
    env = {**proxy_env(moto), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    runner = ProxyRunner(public_tmp / "state-secret-down", env, port=3131).start(wait=False)
    assert runner.process is not None
    assert runner.process.wait(timeout=120) == 4
    failed = runner.wait_for(lambda r: r.get("event") == "startup_failed", timeout=5)
    assert "no allowlist source reachable at startup" in failed["message"] and SECRET in failed["message"]
    assert not runner.events("started")


def test_startup_with_missing_secret_exits_4(public_tmp: Path, moto: MotoServer) -> None:
    runner = ProxyRunner(public_tmp / "state-secret-missing", proxy_env(moto, "no/such/secret"),
                         port=3131).start(wait=False)
    assert runner.process is not None
    assert runner.process.wait(timeout=120) == 4
    failed = runner.wait_for(lambda r: r.get("event") == "startup_failed", timeout=5)
    assert "ResourceNotFoundException" in failed["message"] and "EGRESS_ALLOWLIST_SECRET" in failed["message"]


def test_startup_with_invalid_secret_value_exits_2(public_tmp: Path, moto: MotoServer) -> None:
    put_or_create(moto, "allowed.test, 10.0.0.0/8", secret="egress-proxy/test-invalid-at-start")
    runner = ProxyRunner(public_tmp / "state-secret-invalid", proxy_env(moto, "egress-proxy/test-invalid-at-start"),
                         port=3131).start(wait=False)
    assert runner.process is not None
    assert runner.process.wait(timeout=120) == 2
    failed = runner.wait_for(lambda r: r.get("event") == "startup_failed", timeout=5)
    assert "10.0.0.0/8" in failed["message"]


# --- CLI -------------------------------------------------------------------------------------------------------------


def test_cli_check_allowlist_secret(moto: MotoServer) -> None:
    put_or_create(moto, json.dumps({"allowed_domains": ["b.example.com", ".Example.org", "a.example.com."]}),
                  secret="egress-proxy/test-check")
    result = cli(moto, "check", "--allowlist-secret", "egress-proxy/test-check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [".example.org", "a.example.com", "b.example.com"]
    assert "ok: 3 entries from secret egress-proxy/test-check" in result.stderr

    put_or_create(moto, "example.com, https://example.net/", secret="egress-proxy/test-check")
    result = cli(moto, "check", "--allowlist-secret", "egress-proxy/test-check")
    assert result.returncode == 2 and "https://example.net/" in result.stderr

    result = cli(moto, "check", "--allowlist-secret", "egress-proxy/no-such-secret")
    assert result.returncode == 4 and "ResourceNotFoundException" in result.stderr


def test_cli_push_and_diff(moto: MotoServer, tmp_path: Path) -> None:
    secret = "egress-proxy/test-push"
    client = moto.client("secretsmanager")
    good = tmp_path / "good.txt"
    good.write_text("# team list\nexample.com\n.example.org\n")

    result = cli(moto, "allowlist", "push", str(good), "--secret", secret)
    assert result.returncode == 4 and "ResourceNotFoundException" in result.stderr  # no --create: nothing made
    result = cli(moto, "allowlist", "push", str(good), "--secret", secret, "--create")
    assert result.returncode == 0, result.stderr
    stored = json.loads(client.get_secret_value(SecretId=secret)["SecretString"])
    assert stored == {"allowed_domains": [".example.org", "example.com"]}
    version = current_version(moto, secret)

    changed = tmp_path / "changed.txt"
    changed.write_text(".example.org\napi.example.net\n")
    result = cli(moto, "allowlist", "diff", str(changed), "--secret", secret)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["+ api.example.net", "- example.com"]
    assert current_version(moto, secret) == version, "diff must not write"

    result = cli(moto, "allowlist", "push", str(good), "--secret", secret)
    assert result.returncode == 0 and "unchanged; nothing written" in result.stderr
    assert current_version(moto, secret) == version

    bad = tmp_path / "bad.txt"
    bad.write_text("example.com\n192.168.1.1\n*.\n")
    result = cli(moto, "allowlist", "push", str(bad), "--secret", secret)
    assert result.returncode == 2
    assert "192.168.1.1" in result.stderr and "nothing was written" in result.stderr
    assert current_version(moto, secret) == version

    huge = tmp_path / "huge.txt"
    huge.write_text("\n".join(f"h{i}.example.com" for i in range(5000)))
    result = cli(moto, "allowlist", "push", str(huge), "--secret", secret)
    assert result.returncode == 2 and "64 KiB limit" in result.stderr
    assert current_version(moto, secret) == version

    result = cli(moto, "allowlist", "push", str(changed), "--secret", secret)
    assert result.returncode == 0, result.stderr
    assert current_version(moto, secret) != version
    stored = json.loads(client.get_secret_value(SecretId=secret)["SecretString"])
    assert stored == {"allowed_domains": [".example.org", "api.example.net"]}
