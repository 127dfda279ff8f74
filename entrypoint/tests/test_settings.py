"""Settings: declared once, read from flags then EGRESS_* env then defaults; bad values name the setting."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egress_proxy.settings import OPTIONS, AllowedPorts, SettingsError, UpstreamProxy, load_settings


def test_defaults() -> None:
    settings = load_settings({}, {})
    assert settings.port == 3128
    assert settings.allowed_ports == AllowedPorts(http=(80,), connect=(443,))
    assert ipaddress.ip_network("10.0.0.0/8") in settings.client_cidrs
    assert settings.dns_servers == ()
    assert settings.allow_destinations == ()
    assert settings.state_dir == Path("/var/lib/egress-proxy")
    assert settings.metrics is True and settings.metrics_namespace == "Proxy"
    assert settings.source_kind == "inline"
    assert settings.websockets is True
    assert (settings.tunnel_idle_timeout, settings.client_idle_timeout) == (900, 120)  # Squid's own defaults
    assert settings.prometheus_port is None and settings.upstream_proxy is None


def test_env_then_flag_precedence() -> None:
    env = {"EGRESS_PORT": "8080", "EGRESS_DNS_SERVERS": "9.9.9.9, 149.112.112.112"}
    settings = load_settings({"port": "3129"}, env)
    assert settings.port == 3129
    assert [str(ip) for ip in settings.dns_servers] == ["9.9.9.9", "149.112.112.112"]


def test_every_option_has_env_flag_and_help() -> None:
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    for option in OPTIONS:
        assert option.env == "EGRESS_" + option.name.upper()
        assert option.flag.startswith("--") and option.help.endswith(".")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http:80,connect:443", AllowedPorts(http=(80,), connect=(443,))),
        ("80 8443", AllowedPorts(http=(80, 8443), connect=(80, 8443))),
        ("connect:443,connect:8443", AllowedPorts(http=(), connect=(443, 8443))),
    ],
)
def test_allowed_ports_grammar(raw: str, expected: AllowedPorts) -> None:
    assert load_settings({"allowed_ports": raw}, {}).allowed_ports == expected


@pytest.mark.parametrize(
    ("name", "raw", "fragment"),
    [
        ("port", "99999", "1 to 65535"),
        ("allowed_ports", "https:443", "unknown kind"),
        ("client_cidrs", "10.0.0.1/8", "use '10.0.0.0/8'"),
        ("client_cidrs", "::ffff:10.0.0.0/104", "use '10.0.0.0/8'"),
        ("client_cidrs", "10.0.0.0/8,::/0", "contains the IPv4-mapped range"),
        ("client_cidrs", "", "nobody could use the proxy"),
        ("allow_destinations", "not-a-cidr", "is not an IPv4 or IPv6 CIDR"),
        ("dns_servers", "dns.google", "is not an IP address"),
        ("metrics", "maybe", "on or off"),
        ("metrics_namespace", "AWS/EC2", "CloudWatch namespace"),
        ("reload_interval", "0", "greater than zero"),
        ("listen_address", "localhost", "is not an IP address"),
        ("tunnel_idle_timeout", "0", "whole seconds from 1 to 86400"),
        ("prometheus_port", "3128", "the proxy's own port"),
        ("prometheus_port", "metrics", "1 to 65535"),
        ("upstream_proxy", "https://proxy:3128", "only http:// upstream proxies"),
        ("upstream_proxy", "http://proxy", "lacks a host or a port"),
        ("upstream_proxy", "http://proxy:3128/path", "has a path"),
        ("upstream_proxy", "proxy:3128", "only http://"),
        ("upstream_proxy", "http://*admin:pw@proxy:3128", "login mode"),
        ("client_idle_timeout", "1.5", "whole seconds from 1 to 86400"),
        ("intercept_https_port", "0", "1 to 65535"),
    ],
)
def test_bad_values_name_the_setting_and_the_fix(name: str, raw: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({name: raw}, {})
    message = str(caught.value)
    assert f"EGRESS_{name.upper()}" in message and f"--{name.replace('_', '-')}" in message
    assert fragment in message


def test_upstream_proxy() -> None:
    settings = load_settings({}, {"EGRESS_UPSTREAM_PROXY": "http://u%40corp:p%3Aw@10.0.0.9:3128",
                                  "EGRESS_UPSTREAM_NO_PROXY": "b.example.com, .a.example.com"})
    assert settings.upstream_proxy == UpstreamProxy("10.0.0.9", 3128, "u@corp:p:w")
    assert settings.upstream_no_proxy == (".a.example.com", "b.example.com")
    assert load_settings({}, {}).upstream_proxy is None
    assert UpstreamProxy("fd00::1", 3128).address == "[fd00::1]:3128"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"EGRESS_UPSTREAM_NO_PROXY": "a.example.com"}, "no effect without EGRESS_UPSTREAM_PROXY"),
        ({"EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE": "/run/secrets/p"}, "no effect without EGRESS_UPSTREAM_PROXY"),
        ({"EGRESS_UPSTREAM_PROXY": "http://u:p@h:1", "EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE": "/x"},
         "already carries credentials"),
        ({"EGRESS_UPSTREAM_PROXY": "http://h:1", "EGRESS_UPSTREAM_NO_PROXY": "10.0.0.0/8"}, "not a list of domains"),
    ],
)
def test_upstream_settings_that_conflict(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        load_settings({}, env)


def test_upstream_password_never_appears_in_an_error() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({}, {"EGRESS_UPSTREAM_PROXY": "https://user:hunter2@proxy:3128"})
    assert "hunter2" not in str(caught.value) and "user:***@proxy" in str(caught.value)


def test_only_one_allowlist_source() -> None:
    with pytest.raises(SettingsError, match="exactly one of"):
        load_settings({}, {"EGRESS_ALLOWED_DOMAINS": "a.example.com", "EGRESS_ALLOWLIST_FILE": "/x"})


def test_source_kind() -> None:
    assert load_settings({}, {"EGRESS_ALLOWLIST_FILE": "/x"}).source_kind == "file"
    assert load_settings({}, {"EGRESS_ALLOWLIST_SECRET": "s"}).source_kind == "secret"


def test_settings_are_frozen() -> None:
    settings = load_settings({}, {})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("env", "fragment"), [
    ({"EGRESS_INTERCEPT_HTTP_PORT": "3128"}, "same port as EGRESS_PORT"),
    ({"EGRESS_INTERCEPT_HTTPS_PORT": "3129"}, "same port as EGRESS_INTERCEPT_HTTP_PORT"),
    ({"EGRESS_PROMETHEUS_PORT": "3130"}, "same port as EGRESS_PROMETHEUS_PORT"),
])
def test_transparent_listeners_need_ports_of_their_own(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        load_settings({}, {"EGRESS_TRANSPARENT": "on", **env})
    load_settings({}, env)  # off: the intercept ports are not opened, so they clash with nothing


def test_transparent_defaults() -> None:
    settings = load_settings({}, {})
    assert not settings.transparent
    assert (settings.intercept_http_port, settings.intercept_https_port) == (3129, 3130)


def test_transparent_mode_refuses_an_upstream_proxy() -> None:
    with pytest.raises(SettingsError, match="cannot be combined with EGRESS_UPSTREAM_PROXY"):
        load_settings({}, {"EGRESS_TRANSPARENT": "on", "EGRESS_UPSTREAM_PROXY": "http://10.0.0.9:3128"})
