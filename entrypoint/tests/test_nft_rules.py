"""The transparent-mode nftables ruleset is pure text from the settings (tests/integration/test_transparent.py
applies it with nft in a namespace and sends traffic through it)."""

from __future__ import annotations

import pytest

from egress_proxy.cli import main
from egress_proxy.nft_rules import render_nft_rules
from egress_proxy.settings import load_settings


def _rules(env: dict[str, str]) -> str:
    return render_nft_rules(load_settings({}, {"EGRESS_TRANSPARENT": "on", **env}))


def test_client_ranges_are_redirected_to_the_intercept_ports() -> None:
    rules = _rules({"EGRESS_CLIENT_CIDRS": "10.0.0.0/16,fd00:1::/64", "EGRESS_INTERCEPT_HTTPS_PORT": "8443"})
    assert "elements = { 10.0.0.0/16 }" in rules and "elements = { fd00:1::/64 }" in rules
    assert "ip saddr @clients_v4 tcp dport 80 redirect to :3129" in rules
    assert "ip saddr @clients_v4 tcp dport 443 redirect to :8443" in rules
    assert "ip6 saddr @clients_v6 tcp dport 443 redirect to :8443" in rules


def test_everything_else_forwarded_from_clients_is_logged_and_dropped() -> None:
    rules = _rules({"EGRESS_CLIENT_CIDRS": "10.0.0.0/16"})
    forward = rules[rules.index("chain forward"):rules.index("chain input")]
    assert "policy accept" in forward  # the host's own forwarding of other sources is not this ruleset's business
    assert 'ip saddr @clients_v4 limit rate 10/second burst 20 packets log prefix "egress-proxy drop: "' in forward
    assert "ip saddr @clients_v4 counter name dropped drop" in forward
    # No exception but the ports sets (empty until 'egress-proxy nft-sets' fills them): QUIC and DNS included.
    assert "udp" not in forward
    assert [line.strip() for line in forward.splitlines() if "dport" in line] == [
        'ip saddr . ip daddr . tcp dport @ports_v4 ct state new limit rate 10/second burst 20 packets log prefix '
        '"egress-proxy port: " level info',
        "ip saddr . ip daddr . tcp dport @ports_v4 ct state new ct mark set 0x00006570 counter name port_flows accept"]


def test_intercept_ports_take_only_redirected_connections() -> None:
    rules = _rules({})
    assert "tcp dport { 3129, 3130 } ct status dnat accept\n\t\ttcp dport { 3129, 3130 } counter name dropped drop" \
        in rules


def test_reapplying_replaces_the_table_in_one_transaction() -> None:
    rules = _rules({})
    assert rules.index("table inet egress_proxy\n") < rules.index("delete table inet egress_proxy\n") \
        < rules.index("table inet egress_proxy {")


def test_overlapping_client_ranges_are_collapsed() -> None:
    # nft refuses overlapping elements in an interval set
    rules = _rules({"EGRESS_CLIENT_CIDRS": "10.1.0.0/16,10.0.0.0/8,10.2.3.4/32"})
    assert "elements = { 10.0.0.0/8 }" in rules


def test_loopback_client_ranges_are_left_out() -> None:
    rules = _rules({})  # the default client CIDRs include 127.0.0.0/8 and ::1/128
    assert "127.0.0.0/8" not in rules and "::1/128" not in rules and "10.0.0.0/8" in rules


def test_a_specific_listen_address_gets_a_dnat_to_it() -> None:
    rules = _rules({"EGRESS_LISTEN_ADDRESS": "10.0.1.5", "EGRESS_CLIENT_CIDRS": "10.0.0.0/16,fd00::/8"})
    assert "ip saddr @clients_v4 tcp dport 80 dnat ip to 10.0.1.5:3129" in rules
    assert "ip6 saddr @clients_v6 tcp dport 80 drop" in rules  # Squid listens on no IPv6 address


def test_cli_prints_the_rules_and_refuses_without_transparent_mode(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("EGRESS_"):
            monkeypatch.delenv(name)
    assert main(["nft-rules", "--transparent", "on", "--client-cidrs", "10.9.0.0/16"]) == 0
    assert "elements = { 10.9.0.0/16 }" in capsys.readouterr().out
    assert main(["nft-rules"]) == 2
    assert "EGRESS_TRANSPARENT=on" in capsys.readouterr().err
