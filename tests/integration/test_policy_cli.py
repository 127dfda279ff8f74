"""The policy commands as a user runs them: the real `egress-proxy` CLI as a subprocess.

- `allowlist suggest` on access lines the real proxy (Squid under the supervisor) just wrote, from a file, from
  stdin and from a CloudWatch Logs group (a real moto_server on loopback, reached through AWS_ENDPOINT_URL);
- `check`, `allowlist diff` and `allowlist push` on policy documents against Secrets Manager (moto).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PROXY_PORT, MotoServer, curl
from harness import TestCA, TlsOrigin, connect_tunnel, http_get_over, tls_over_tunnel
from harness import client_session as session
from proxy_runner import ProxyRunner, egress_proxy_command

DOCUMENT: dict[str, Any] = {
    "policies": [
        {"name": "ci-runners", "clients": ["10.0.8.0/22"], "mode": "report",
         "allow": [".github.com", "pypi.org", ".pythonhosted.org"], "deny": ["gist.github.com"]},
        {"name": "default", "clients": ["10.0.0.0/8"], "allow": [".amazonaws.com"]},
    ]
}


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EGRESS_", "AWS_")) and "proxy" not in k.lower()}
    return subprocess.run([*egress_proxy_command(), *args], capture_output=True, text=True, timeout=60,
                          input=stdin, env={**base, **(env or {})})


# --- suggest, on what the real proxy logged --------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused_traffic(proxy: ProxyRunner, tls_origin: TlsOrigin, ca: TestCA) -> list[str]:
    """Requests the proxy refuses for different reasons; returns the JSON lines it logged meanwhile."""
    mark = proxy.mark()
    for host, times in (("api.denied.test", 3), ("cdn.denied.test", 1), ("denied.test", 2), ("other.example", 1)):
        for _ in range(times):
            response = session().get(f"http://{host}/", proxies=proxy.proxies, timeout=10)
            assert response.status_code == 403
    # A refused CONNECT (403 before any tunnel): the CONNECT target is the name to allow.
    result = curl("-x", proxy.proxy_url, "https://tunnel.denied.test/")
    assert "CONNECT tunnel failed, response 403" in result.stderr
    # Domain fronting: an allowlisted CONNECT target with another name in the TLS SNI. That name is the one the
    # client wanted, so it is the one suggest lists.
    sock, status, _ = connect_tunnel(("127.0.0.1", PROXY_PORT), "allowed.test", 443)
    assert status == 200
    with pytest.raises((ssl.SSLError, OSError)):
        tls = tls_over_tunnel(sock, "fronted.denied.test", ca.ca_path, verify=False)
        http_get_over(tls, "fronted.denied.test")
    sock.close()
    # Refusals an allow entry would not fix: counted, never suggested.
    assert session().get("http://127.0.0.2/", proxies=proxy.proxies, timeout=10).status_code == 403
    assert session().get("http://allowed.test/", proxies=proxy.proxies, timeout=10).status_code == 200

    proxy.access(mark, sni="fronted.denied.test", reason="sni_not_allowlisted")
    proxy.access(mark, host="tunnel.denied.test", reason="domain_not_allowlisted")
    proxy.access(mark, host="127.0.0.2", reason="ip_literal")
    proxy.access(mark, host="allowed.test", reason="allowed")
    for host in ("api.denied.test", "cdn.denied.test", "denied.test", "other.example"):
        proxy.access(mark, host=host, reason="domain_not_allowlisted")
    # All three api.denied.test lines are in once their third one is: wait for the count, not for time.
    proxy.wait_for(lambda r: sum(1 for x in proxy.records[mark:] if x.get("host") == "api.denied.test") >= 3)
    return proxy.raw_lines[mark:]


EXPECTED_TEXT = """\
# policy default: 6 hosts, 9 refused requests
# denied.test: 5 hosts, 8 requests (or '.denied.test' for the domain and all its subdomains)
api.denied.test      # 3 requests
denied.test          # 2 requests
cdn.denied.test      # 1 request
fronted.denied.test  # 1 request (as TLS SNI)
tunnel.denied.test   # 1 request
# other.example: 1 host, 1 request
other.example        # 1 request
"""


def test_suggest_from_a_file_of_real_access_lines(refused_traffic: list[str], tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    log.write_text("\n".join(refused_traffic) + "\n")
    result = cli("allowlist", "suggest", str(log))
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED_TEXT
    assert "9 refused by name" in result.stderr
    assert "not suggested (an allow entry would not change them): 1 ip_literal" in result.stderr


def test_suggest_from_stdin_with_options(refused_traffic: list[str]) -> None:
    lines = "\n".join(refused_traffic) + "\n"
    assert cli("allowlist", "suggest", stdin=lines).stdout == EXPECTED_TEXT
    assert cli("allowlist", "suggest", "-", stdin=lines).stdout == EXPECTED_TEXT

    result = cli("allowlist", "suggest", "--min-requests", "2", stdin=lines)
    assert result.stdout.splitlines()[2:] == ["api.denied.test  # 3 requests", "denied.test      # 2 requests"]

    result = cli("allowlist", "suggest", "--json", "--policy", "default", stdin=lines)
    data = json.loads(result.stdout)
    assert [p["policy"] for p in data["policies"]] == ["default"]
    assert data["policies"][0]["allow"] == ["api.denied.test", "denied.test", "cdn.denied.test",
                                            "fronted.denied.test", "tunnel.denied.test", "other.example"]
    assert data["read"]["not_suggested"] == {"ip_literal": 1}

    result = cli("allowlist", "suggest", "--policy", "ci-runners", stdin=lines)
    assert (result.returncode, result.stdout) == (0, "")
    assert "nothing to suggest: no name was refused under policy 'ci-runners'" in result.stderr


def test_suggest_merges_into_a_document(refused_traffic: list[str], tmp_path: Path) -> None:
    document = tmp_path / "policies.json"
    document.write_text(json.dumps({"policies": [
        {"name": "default", "clients": ["127.0.0.0/8"], "allow": ["allowed.test"], "deny": ["cdn.denied.test"]}]}))
    result = cli("allowlist", "suggest", "--min-requests", "2", "--merge", str(document),
                 stdin="\n".join(refused_traffic) + "\n")
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)
    assert merged == {"policies": [{"name": "default", "clients": ["127.0.0.0/8"], "mode": "enforce",
                                    "allow": ["allowed.test", "api.denied.test", "denied.test"],
                                    "deny": ["cdn.denied.test"]}]}
    # What it prints is a valid document again: check accepts it as is.
    document.write_text(result.stdout)
    assert cli("check", "--allowlist-file", str(document)).returncode == 0


def test_suggest_bad_arguments(tmp_path: Path) -> None:
    result = cli("allowlist", "suggest", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and "cannot read" in result.stderr
    result = cli("allowlist", "suggest", "--min-requests", "0", stdin="")
    assert result.returncode == 2 and "--min-requests 0" in result.stderr
    result = cli("allowlist", "suggest", "--log-group", "g", "--since", "yesterday")
    assert result.returncode == 2 and "use a duration before now such as 30m" in result.stderr


def test_suggest_from_cloudwatch_logs(refused_traffic: list[str], moto: MotoServer) -> None:
    logs = moto.client("logs")
    group = "/egress-proxy/test-suggest"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="proxy/task-1")
    now_ms = int(time.time() * 1000)
    events = [{"timestamp": now_ms - 1000 + index, "message": text} for index, text in enumerate(refused_traffic)]
    # Older than the time range asked for below: must not be counted.
    old = json.loads(next(t for t in refused_traffic if '"host":"api.denied.test"' in t))
    events.insert(0, {"timestamp": now_ms - 3 * 3600 * 1000, "message": json.dumps({**old, "host": "old.test"})})
    logs.put_log_events(logGroupName=group, logStreamName="proxy/task-1", logEvents=events)

    result = cli("allowlist", "suggest", "--log-group", group, "--since", "1h", env=moto.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED_TEXT
    assert "old.test" not in result.stdout

    result = cli("allowlist", "suggest", "--log-group", group, "--since", "4h", "--json", env=moto.env)
    hosts = json.loads(result.stdout)["policies"][0]["allow"]
    assert "old.test" in hosts

    result = cli("allowlist", "suggest", "--log-group", "/no/such/group", env=moto.env)
    assert result.returncode == 4
    assert "reading CloudWatch Logs group /no/such/group failed" in result.stderr
    assert "ResourceNotFoundException" in result.stderr


# --- documents: check, diff, push ------------------------------------------------------------------------------


def test_check_validates_a_document_and_names_every_problem(tmp_path: Path) -> None:
    good = tmp_path / "policies.json"
    good.write_text(json.dumps(DOCUMENT))
    result = cli("check", "--allowlist-file", str(good), env={"EGRESS_CLIENT_CIDRS": "10.0.0.0/8"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["policies"][0] == {
        "name": "ci-runners", "clients": ["10.0.8.0/22"], "mode": "report",
        "allow": [".github.com", ".pythonhosted.org", "pypi.org"], "deny": ["gist.github.com"]}
    assert "ok: 2 policies from file" in result.stderr
    assert "warning" not in result.stderr

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"policies": [
        {**DOCUMENT["policies"][0], "allow": [".github.com", "10.1.2.3"], "mode": "alert"},
        {**DOCUMENT["policies"][1], "name": "ci-runners", "clients": ["10.0.0.1/8"]},
    ]}))
    result = cli("check", "--allowlist-file", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [
        "  policies[0].mode: 'alert' is not a mode; use 'enforce' (refuse) or 'report' (log would_deny)",
        "  policies[0].allow[1]: '10.1.2.3' is an IP address (IPv4); list the host name instead; IP destinations "
        "are refused by design",
        "  policies[1].name: 'ci-runners' is already the name of policies[0]; give each policy its own name",
        "  policies[1].clients[0]: '10.0.0.1/8' has host bits set; use '10.0.0.0/8' (the network containing it)",
    ]


def test_check_warns_about_shadowed_policies(tmp_path: Path) -> None:
    path = tmp_path / "shadowed.json"
    path.write_text(json.dumps({"policies": list(reversed(DOCUMENT["policies"]))}))
    result = cli("check", "--allowlist-file", str(path), env={"EGRESS_CLIENT_CIDRS": "10.0.0.0/8"})
    assert result.returncode == 0
    assert ("warning: policies[1] (ci-runners) never applies: policies[1].clients[0] '10.0.8.0/22' already "
            "belongs to earlier policies (default)") in result.stderr


def test_push_diff_and_check_a_document_in_secrets_manager(moto: MotoServer, tmp_path: Path) -> None:
    secret = "egress-proxy/test-policy-document"
    env = {**moto.env, "EGRESS_CLIENT_CIDRS": "10.0.0.0/8"}
    document = tmp_path / "policies.json"
    document.write_text(json.dumps(DOCUMENT))

    result = cli("allowlist", "push", str(document), "--secret", secret, "--create", env=env)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 policies (5 entries)" in result.stderr
    stored = json.loads(moto.client("secretsmanager").get_secret_value(SecretId=secret)["SecretString"])
    assert [p["name"] for p in stored["policies"]] == ["ci-runners", "default"]

    result = cli("check", "--allowlist-secret", secret, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == stored

    changed: dict[str, Any] = json.loads(json.dumps(DOCUMENT))
    changed["policies"][0]["mode"] = "enforce"
    changed["policies"][0]["allow"].append("files.example.com")
    changed["policies"][1]["deny"] = ["bad.amazonaws.com"]
    document.write_text(json.dumps(changed))
    result = cli("allowlist", "diff", str(document), "--secret", secret, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "policy ci-runners: mode report -> enforce",
        "  + allow files.example.com",
        "policy default:",
        "  + deny bad.amazonaws.com",
    ]
    assert "2 to add, 0 to remove" in result.stderr

    assert cli("allowlist", "push", str(document), "--secret", secret, env=env).returncode == 0
    result = cli("allowlist", "push", str(document), "--secret", secret, env=env)
    assert (result.returncode, result.stdout) == (0, "")
    assert "unchanged; nothing written" in result.stderr

    # A bad document writes nothing.
    version = moto.client("secretsmanager").describe_secret(SecretId=secret)["VersionIdsToStages"]
    document.write_text(json.dumps({"policies": [{**DOCUMENT["policies"][1], "colour": "blue"}]}))
    result = cli("allowlist", "push", str(document), "--secret", secret, env=env)
    assert result.returncode == 2
    assert "policies[0]: has an unknown key 'colour'" in result.stderr
    assert "nothing was written to the secret" in result.stderr
    assert moto.client("secretsmanager").describe_secret(SecretId=secret)["VersionIdsToStages"] == version


def test_diff_from_a_flat_secret_to_a_document(moto: MotoServer, tmp_path: Path) -> None:
    secret = "egress-proxy/test-flat-to-document"
    moto.client("secretsmanager").create_secret(Name=secret, SecretString=".amazonaws.com, pypi.org")
    env = {**moto.env, "EGRESS_CLIENT_CIDRS": "10.0.0.0/8"}
    document = tmp_path / "policies.json"
    document.write_text(json.dumps(DOCUMENT))
    result = cli("allowlist", "diff", str(document), "--secret", secret, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "form: flat list -> document",
        "policy ci-runners: added (mode report)",
        "  + client 10.0.8.0/22",
        "  + allow .github.com",
        "  + allow .pythonhosted.org",
        "  + allow pypi.org",
        "  + deny gist.github.com",
        "policy default:",
        "  - allow pypi.org",
    ]
    # Flat to flat keeps the output it always had.
    flat = tmp_path / "flat.txt"
    flat.write_text(".amazonaws.com\nexample.com\n")
    result = cli("allowlist", "diff", str(flat), "--secret", secret, env=env)
    assert result.stdout.splitlines() == ["+ example.com", "- pypi.org"]
