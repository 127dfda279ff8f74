"""What real clients print when the proxy refuses them (docs/troubleshooting.md quotes these): pip with a refused
index and with a refused --extra-index-url, and git over smart HTTP. Each against the session proxy, whose
allowlist refuses denied.test; "refused" also means the TLS origin saw no handshake for denied.test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import TestCA, TlsOrigin
from proxy_runner import ProxyRunner


def _env(proxy: ProxyRunner, ca: TestCA) -> dict[str, str]:
    # Only the test CA is trusted: the host's CA bundle variables (REQUESTS_CA_BUNDLE would override pip's --cert)
    # and any proxy or pip/git settings are left out.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("PIP_", "GIT_"))
           and not any(part in k for part in ("CA_BUNDLE", "SSL_CERT", "CA_CERTS"))}
    return {**env, "https_proxy": proxy.proxy_url, "http_proxy": proxy.proxy_url, "PIP_CERT": str(ca.ca_path),
            "GIT_SSL_CAINFO": str(ca.ca_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            "PIP_CONFIG_FILE": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(Path(os.devnull).parent)}


def _pip(proxy: ProxyRunner, ca: TestCA, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "10",
                           "--cert", str(ca.ca_path), "-d", str(tmp_path), *args, "egress-probe-package"],
                          capture_output=True, text=True, env=_env(proxy, ca), timeout=120)


def _snis(origin: TlsOrigin) -> list[str | None]:
    return list(origin.snis)


def test_pip_with_a_refused_index(proxy: ProxyRunner, ca: TestCA, tls_origin: TlsOrigin, tmp_path: Path) -> None:
    result = _pip(proxy, ca, tmp_path, "--index-url", "https://denied.test/simple/")
    print(result.stderr)
    assert result.returncode != 0
    # A retry warning naming the path and "OSError('Tunnel connection failed: 403 Forbidden')" (pip 26.3; pip
    # 23.2 wraps it in "ProxyError('Cannot connect to proxy.', ...)"), then "No matching distribution found".
    assert "Tunnel connection failed: 403 Forbidden" in result.stderr, result.stderr
    assert "No matching distribution found for egress-probe-package" in result.stderr
    assert "denied.test" not in _snis(tls_origin)


def test_pip_goes_on_without_a_refused_extra_index(proxy: ProxyRunner, ca: TestCA, tls_origin: TlsOrigin,
                                                  tmp_path: Path) -> None:
    before = len(tls_origin.requests)
    result = _pip(proxy, ca, tmp_path, "--index-url", "https://allowed.test/simple/",
                  "--extra-index-url", "https://denied.test/simple/")
    print(result.stderr)
    # A refused extra index is only a warning (which names the path, not the index): pip still reads the main
    # index, and fails only because the test origin has no such package.
    assert "Tunnel connection failed: 403" in result.stderr, result.stderr
    assert "No matching distribution found for egress-probe-package" in result.stderr
    read = [r["path"] for r in tls_origin.requests[before:] if r["host"] == "allowed.test"]
    assert "/simple/egress-probe-package/" in read
    assert "denied.test" not in _snis(tls_origin)


def test_git_over_https_refused(proxy: ProxyRunner, ca: TestCA, tls_origin: TlsOrigin) -> None:
    result = subprocess.run(["git", "ls-remote", "https://denied.test/team/repo.git"], capture_output=True,
                            text=True, env=_env(proxy, ca), timeout=60)
    print(result.stderr)
    assert result.returncode == 128
    # libcurl's wording, as git passes it on.
    assert "fatal: unable to access 'https://denied.test/team/repo.git/'" in result.stderr, result.stderr
    assert "CONNECT tunnel failed, response 403" in result.stderr, result.stderr
    assert "denied.test" not in _snis(tls_origin)
