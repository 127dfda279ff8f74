"""A policy's extra ports (``"ports": ["github.com:22"]``): validation, the rules the host gets (ports.json),
the DNS memory, and the nft transaction (tests/integration/test_transparent_ports.py sends traffic through it)."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from pathlib import Path

import pytest

from egress_proxy.allowlist import AllowlistError
from egress_proxy.cli import main
from egress_proxy.nft_rules import (
    PORT_SET_LINE,
    forget_expired,
    remember,
    render_nft_rules,
    render_port_sets,
)
from egress_proxy.policy import PolicyDocument, parse_policy_value
from egress_proxy.settings import load_settings
from egress_proxy.squid_conf import StatePaths, forbidden_destinations

GATE = (ipaddress.ip_network("10.0.0.0/8"),)
SETTINGS = load_settings({}, {"EGRESS_TRANSPARENT": "on", "EGRESS_CLIENT_CIDRS": "10.0.0.0/8"})


def parse(*policies: dict[str, object]) -> PolicyDocument:
    return parse_policy_value(json.dumps({"policies": list(policies)}), source="test", client_cidrs=GATE)


def problems(*policies: dict[str, object]) -> list[str]:
    with pytest.raises(AllowlistError) as caught:
        parse(*policies)
    return [str(problem) for problem in caught.value.problems]


def test_ports_entries_are_normalised_and_round_trip() -> None:
    document = parse({"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"],
                      "ports": ["GitHub.com.:22", "203.0.113.0/24:5432", "[2001:db8::/48]:2222", "10.9.9.9:25",
                                "git.example.com:9000-9100"]})
    assert document.policies[0].to_json()["ports"] == [
        "github.com:22", "203.0.113.0/24:5432", "[2001:db8::/48]:2222", "10.9.9.9/32:25", "git.example.com:9000-9100"]
    assert parse_policy_value(document.to_value(), source="again", client_cidrs=GATE) == document


def test_a_ports_change_alone_is_a_change() -> None:
    before = parse({"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"], "ports": ["github.com:22"]})
    after = parse({"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"], "ports": ["gitlab.com:22"]})
    assert before.diff(after).lines() == ["policy ci:", "  + port gitlab.com:22", "  - port github.com:22"]


def test_every_bad_entry_is_named_by_path_with_a_fix() -> None:
    found = problems({"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"], "ports": [
        "github.com", "github.com:443", "github.com:70-90", ".github.com:22", "*.github.com:22", "2001:db8::/48:22",
        "203.0.113.5/24:22", "github.com:0", "github.com:ssh", 22, "localhost:22", "github.com:22", "github.com:22"]})
    assert found == [
        "policies[0].ports[0]: 'github.com' has no port; write HOST:PORT, e.g. \"github.com:22\" (TCP)",
        "policies[0].ports[1]: 'github.com:443' includes tcp/443, which always goes through the proxy's name checks; "
        "allow the name in 'allow' instead (or pick a range without 80 and 443)",
        "policies[0].ports[2]: 'github.com:70-90' includes tcp/80, which always goes through the proxy's name "
        "checks; allow the name in 'allow' instead (or pick a range without 80 and 443)",
        "policies[0].ports[3]: '.github.com:22' names a whole domain, which the host's firewall cannot resolve (it "
        "opens the addresses of names); list each host name, e.g. \"github.com:22\"",
        "policies[0].ports[4]: '*.github.com:22' names a whole domain, which the host's firewall cannot resolve (it "
        "opens the addresses of names); list each host name, e.g. \"github.com:22\"",
        "policies[0].ports[5]: '2001:db8::/48:22' is an IPv6 range without brackets; write it as "
        "\"[2001:db8::/48]:22\"",
        "policies[0].ports[6]: '203.0.113.5/24:22' has host bits set; use '203.0.113.0/24' (the network containing "
        "it)",
        "policies[0].ports[7]: 'github.com:0' has '0' for a port; use a TCP port from 1 to 65535, or a range such "
        "as 8000-8100",
        "policies[0].ports[8]: 'github.com:ssh' has 'ssh' for a port; use a TCP port from 1 to 65535, or a range "
        "such as 8000-8100",
        "policies[0].ports[9]: '22' is a JSON number, not a string; write each entry as a string, e.g. "
        "\"github.com:22\"",
        "policies[0].ports[10]: 'localhost:22' is a single-label name, not a fully qualified domain; use a fully "
        "qualified name, e.g. 'localhost.example.com'",
        "policies[0].ports[12]: 'github.com:22' repeats policies[0].ports[11]; list each port entry once",
    ]


def test_ports_need_cidr_clients_and_must_not_contradict_deny() -> None:
    assert problems({"name": "by-group", "clients": ["sg-0123456789abcdef0"], "allow": ["pypi.org"],
                     "ports": ["github.com:22"]}) == [
        "policies[0].ports: belong to a policy that names its clients by identity only, and the host's firewall "
        "sees only source addresses; give the ports to a policy whose clients are CIDRs"]
    assert problems({"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"], "deny": [".github.com"],
                     "ports": ["github.com:22"]}) == [
        "policies[0].ports[0]: 'github.com:22' names a host this policy's deny list refuses; remove the port "
        "entry, or narrow the deny entry"]
    mixed = parse({"name": "ci", "clients": ["10.1.0.0/16", "sg-0123456789abcdef0"], "allow": ["pypi.org"],
                   "ports": ["github.com:22"]})
    assert any("its ports apply to its CIDR clients only" in warning for warning in mixed.warnings)


def test_a_policys_ports_reach_only_the_clients_that_land_in_it() -> None:
    """First match wins, as in Squid: a later policy's wider range loses what an earlier policy claims, and
    nothing outside EGRESS_CLIENT_CIDRS is ever opened."""
    document = parse(
        {"name": "build", "clients": ["10.1.2.0/24"], "allow": ["pypi.org"]},
        {"name": "ci", "clients": ["10.1.0.0/16", "192.168.0.0/16"], "mode": "report", "allow": ["pypi.org"],
         "ports": ["github.com:22", "203.0.113.0/24:5432"]},
    )
    rules = document.port_rules()
    clients = [str(net) for net in ipaddress.ip_network("10.1.0.0/16").address_exclude(
        ipaddress.ip_network("10.1.2.0/24"))]
    assert sorted(rules[0]["clients"]) == sorted(clients)
    assert rules[0] == {"policy": "ci", "entry": "github.com:22", "clients": rules[0]["clients"],
                        "host": "github.com", "ports": "22"}
    assert rules[1]["network"] == "203.0.113.0/24" and rules[1]["clients"] == rules[0]["clients"]


def test_an_earlier_identity_policy_is_warned_about_a_later_policys_ports() -> None:
    """Squid puts a client in the first policy that matches it, by identity or CIDR; the host sees addresses only.
    So members of an earlier identity-named policy whose addresses lie in a later policy's CIDRs get that later
    policy's ports: the operator is told, naming both policies and the path."""
    document = parse(
        {"name": "untrusted", "clients": ["sg-0123456789abcdef0"], "allow": ["pypi.org"]},
        {"name": "default", "clients": ["10.0.0.0/8"], "allow": ["pypi.org"], "ports": ["github.com:22"]},
    )
    assert document.port_rules()[0]["clients"] == ["10.0.0.0/8"]  # the host cannot leave out untrusted's members
    assert [warning for warning in document.warnings if "untrusted" in warning] == [
        "policies[1].ports: policies[1] (default) comes after untrusted, which names clients by identity; the "
        "host's firewall sees only source addresses, so members of untrusted inside this policy's CIDRs get these "
        "ports too; if they must not, name untrusted's clients by CIDR (the host then leaves them out)"]
    later = parse(
        {"name": "default", "clients": ["10.0.0.0/8"], "allow": ["pypi.org"], "ports": ["github.com:22"]},
        {"name": "untrusted", "clients": ["sg-0123456789abcdef0"], "allow": ["pypi.org"]},
    )
    assert not [warning for warning in later.warnings if "untrusted" in warning]


RULES = [{"policy": "ci", "entry": "github.com:22", "clients": ["10.1.0.0/16"], "host": "github.com", "ports": "22"},
         {"policy": "ci", "entry": "203.0.113.0/24:5432", "clients": ["10.1.0.0/16"], "network": "203.0.113.0/24",
          "ports": "5432"}]


def test_an_address_stays_for_its_ttl_or_the_hold_and_then_ages_out() -> None:
    memory: dict[str, dict[str, float]] = {}
    remember(memory, "github.com", [("140.82.112.3", 60)], now=1000, hold=300)
    remember(memory, "github.com", [("140.82.112.4", 600)], now=1100, hold=300)  # DNS moved on
    assert memory == {"github.com": {"140.82.112.3": 1300, "140.82.112.4": 1700}}
    assert forget_expired(memory, now=1400, names=["github.com"]) == {"github.com": {"140.82.112.4": 1700}}
    assert forget_expired(memory, now=1400, names=[]) == {}  # no rule names it any more
    # DNS allows a TTL of 2^31-1 s; nftables refuses such a timeout, and no client keeps an answer that long.
    remember(memory, "huge.example", [("203.0.113.9", 2**31 - 1)], now=1000, hold=300)
    assert memory["huge.example"] == {"203.0.113.9": 1000 + 86400}


def test_the_transaction_flushes_and_refills_the_sets_with_timeouts() -> None:
    memory = {"github.com": {"140.82.112.3": 1300.0, "140.82.112.4": 1100.5, "10.0.0.9": 1300.0}}
    text = render_port_sets(SETTINGS, RULES, memory, now=1000.2, forbidden=forbidden_destinations(()))
    assert text.splitlines()[1:] == [
        "flush set inet egress_proxy ports_v4",
        "add element inet egress_proxy ports_v4 { 10.1.0.0/16 . 140.82.112.3 . 22 timeout 300s }",
        "add element inet egress_proxy ports_v4 { 10.1.0.0/16 . 140.82.112.4 . 22 timeout 101s }",
        "add element inet egress_proxy ports_v4 { 10.1.0.0/16 . 203.0.113.0/24 . 5432 }",
    ]  # 10.0.0.9 is a private address: the SSRF guard's ranges are never opened, as in Squid
    assert all(re.fullmatch(PORT_SET_LINE, line) for line in text.splitlines())


def test_the_hosts_filter_takes_the_transaction_and_nothing_else() -> None:
    """The host runs 'grep -Ev PORT_SET_LINE' over what the container printed and applies nothing if a line is
    left: the container cannot hand the host's nft another command."""
    good = render_port_sets(SETTINGS, RULES, {"github.com": {"140.82.112.3": 2000.0}}, now=1000,
                            forbidden=forbidden_destinations(()))
    for hostile in ("flush ruleset", "delete table inet egress_proxy",
                    "add element inet egress_proxy ports_v4 { 0.0.0.0/0 . 0.0.0.0/0 . 1-65535 }; flush ruleset",
                    "add element inet egress_proxy clients_v4 { 0.0.0.0/0 }",
                    "add rule inet egress_proxy forward accept", "# {} ; flush ruleset"):
        leftover = subprocess.run(["grep", "-Ev", PORT_SET_LINE], input=good + hostile + "\n", capture_output=True,
                                  text=True)
        assert leftover.stdout.strip() == hostile
    assert subprocess.run(["grep", "-Ev", PORT_SET_LINE], input=good, capture_output=True, text=True).stdout == ""


def test_only_the_sets_the_ruleset_has_are_flushed() -> None:
    dual = load_settings({}, {"EGRESS_TRANSPARENT": "on", "EGRESS_CLIENT_CIDRS": "10.0.0.0/8,fd00:1::/64"})
    rules = [{"clients": ["fd00:1::/64"], "host": "github.com", "ports": "22"}]
    text = render_port_sets(dual, rules, {"github.com": {"2606:50c0::1": 1060.0, "140.82.112.3": 1060.0}}, now=1000,
                            forbidden=[])
    assert "flush set inet egress_proxy ports_v6" in text
    assert "add element inet egress_proxy ports_v6 { fd00:1::/64 . 2606:50c0::1 . 22 timeout 60s }" in text
    assert "140.82.112.3" not in text  # an IPv6 client cannot reach an IPv4 address through the set
    assert "ports_v6" not in render_port_sets(SETTINGS, [], {}, now=0, forbidden=[])


def test_the_ruleset_forwards_marked_flows_and_masquerades_only_them() -> None:
    rules = render_nft_rules(SETTINGS)
    assert "set ports_v4 {\n\t\ttype ipv4_addr . ipv4_addr . inet_service; flags interval, timeout;" in rules
    forward = rules[rules.index("chain forward"):rules.index("chain input")]
    assert forward.index("ct mark 0x00006570 accept") < forward.index("@ports_v4") \
        < forward.index("ip saddr @clients_v4 counter name dropped drop")
    # Link-local (the instance's metadata service) is dropped before any ports set can admit a flow to it.
    assert forward.index("ip daddr @never_forwarded_v4 counter name dropped drop") < forward.index("@ports_v4")
    assert "set never_forwarded_v4 {\n\t\ttype ipv4_addr; flags interval;\n\t\telements = { 169.254.0.0/16 }" \
        in rules
    assert "chain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n" \
           "\t\tct mark 0x00006570 masquerade\n\t}" in rules


@pytest.fixture()
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("EGRESS_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("_clean_env")
def test_check_counts_each_policys_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = tmp_path / "policies.json"
    document.write_text(json.dumps({"policies": [
        {"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"], "ports": ["github.com:22"]},
        {"name": "web", "clients": ["10.2.0.0/16"], "allow": ["pypi.org"]}]}))
    assert main(["check", "--allowlist-file", str(document), "--client-cidrs", "10.0.0.0/8"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["policies"][0]["ports"] == ["github.com:22"]
    assert "ci (enforce, 1 client selectors, 1 allow, 0 deny, 1 ports), web (enforce, 1 client selectors, 1 allow, " \
           "0 deny)" in out.err


@pytest.mark.usefixtures("_clean_env")
def test_nft_sets_reads_the_loaded_rules_and_remembers_what_it_opened(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No proxy has loaded a config yet: the sets are flushed and stay empty. Then a loaded document's CIDR target
    (no DNS needed) is opened with no timeout."""
    flags = ["nft-sets", "--transparent", "on", "--client-cidrs", "10.0.0.0/8", "--state-dir", str(tmp_path),
             "--dns-servers", "127.0.0.1"]
    assert main(flags) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[1:] == ["flush set inet egress_proxy ports_v4"]
    assert "does not exist yet (no config loaded)" in out.err
    paths = StatePaths(tmp_path)
    paths.conf_dir.mkdir(parents=True)
    document = parse({"name": "ci", "clients": ["10.1.0.0/16"], "allow": ["pypi.org"],
                      "ports": ["203.0.113.0/24:5432"]})
    paths.port_rules.write_text(json.dumps({"rules": document.port_rules()}))
    assert main(flags) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "flush set inet egress_proxy ports_v4",
        "add element inet egress_proxy ports_v4 { 10.1.0.0/16 . 203.0.113.0/24 . 5432 }"]
    assert json.loads(paths.port_addresses.read_text()) == {}
    assert main(["nft-sets", "--state-dir", str(tmp_path)]) == 2
    assert "EGRESS_TRANSPARENT=on" in capsys.readouterr().err
