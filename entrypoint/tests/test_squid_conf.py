"""Rendering is pure and deterministic; the rendered config carries every policy decision."""

from __future__ import annotations

import ipaddress
import json
import shutil
from pathlib import Path

import pytest

from egress_proxy import config_pipeline, squid_conf, squid_process
from egress_proxy import squid_strings as strings
from egress_proxy.access_log import REASONS, SQUID_LOGFORMAT
from egress_proxy.allowlist import parse_allowlist
from egress_proxy.networks import covered
from egress_proxy.policy import PolicyDocument, parse_policy_value
from egress_proxy.settings import Settings, load_settings
from egress_proxy.sources import Snapshot
from egress_proxy.squid_conf import (
    PLACEHOLDER_ACCESS_LOG_TOKEN,
    PRIVATE_DESTINATIONS,
    PYTHON,
    RenderedConfig,
    StatePaths,
    default_error_page,
    forbidden_destinations,
    render,
)
from egress_proxy.squid_process import SquidError, atomic_write, parse_check, prepare_state_dir, write_rendered


def _flat(entries: str, settings: Settings) -> PolicyDocument:
    return PolicyDocument.from_flat(parse_allowlist(entries), settings.client_cidrs)


def _render(env: dict[str, str] | None = None, entries: str = ".example.com\nexact.example.org") -> str:
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state", **(env or {})})
    paths = StatePaths(settings.state_dir)
    return render(settings, _flat(entries, settings), paths, run_as="proxy",
                  denial_port=39999, access_log_port=39998).squid_conf


def test_render_is_deterministic() -> None:
    assert _render() == _render()


def test_allowlist_text_is_minimal_and_sorted() -> None:
    settings = load_settings({}, {})
    rendered = render(settings, _flat("b.example.com .example.com a.example.org", settings),
                      StatePaths(Path("/s")), run_as=None, denial_port=39999, access_log_port=39998)
    assert rendered.lists[("default", "allow")] == "a.example.org\n.example.com\n"
    assert rendered.lists[("default", "deny")] == ""


def _match_domain_name(h: str, d: str) -> int:
    """Squid 5.7's matchDomainName (src/anyp/Uri.cc) without its flags, line by line: the comparison its dstdomain
    splay tree is ordered by (aclDomainCompare). <0, 0 (h is d, or lies under a '.d'), >0."""
    h = h.lstrip(".")
    hl, dl = len(h), len(d)
    if hl == 0:
        return -1
    while True:
        hl, dl = hl - 1, dl - 1
        if h[hl].lower() != d[dl].lower():
            break
        if hl == 0 and dl == 0:
            return 0
        if hl == 0:
            return 0 if dl == 1 and d[0] == "." else -1
        if dl == 0:
            return 0 if d[0] == "." else 1
    if d[dl] == ".":
        return 1
    if h[hl] == ".":
        return -1
    return ord(h[hl].lower()) - ord(d[dl].lower())


def test_allowlist_text_is_in_squids_own_order() -> None:
    # Characters compared from the right, a '.' first: 'api2' and 'api19' differ at their last character, so the
    # label-by-label order ('api19' < 'api2') is not Squid's.
    settings = load_settings({}, {})
    rendered = render(settings, _flat("api19.svc.example.org api2.svc.example.org a-b.example.org .b.example.org "
                                      "z.aaa.net b.example.com", settings),
                      StatePaths(Path("/s")), run_as=None, denial_port=39999, access_log_port=39998)
    assert rendered.lists[("default", "allow")] == (
        ".b.example.org\na-b.example.org\napi2.svc.example.org\napi19.svc.example.org\nb.example.com\nz.aaa.net\n")


def test_squid_domain_order_is_squids_comparison() -> None:
    """Every pair of a minimal list compares the same way in Squid's matchDomainName (both argument orders) as in
    squid_domain_order: names sharing long suffixes, digits, hyphens, '.domain' entries, names ending others."""
    random = __import__("random").Random(25)
    alphabet = "ab9-"
    names = {"example.com", "com.example", "a-b.example.com", "ab.example.com", "b.example.com", "xa.com",
             "a.com"}
    for _ in range(400):
        labels = ["".join(random.choice(alphabet) for _ in range(random.randint(1, 4))).strip("-") or "a"
                  for _ in range(random.randint(1, 3))]
        names.add(("." if random.random() < 0.3 else "") + ".".join([*labels, random.choice(["com", "co", "ba"])]))
    entries = parse_allowlist(" ".join(names)).entries  # minimal: what the lists hold
    ordered = sorted(entries, key=squid_conf.squid_domain_order)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            assert _match_domain_name(a, b) < 0 and _match_domain_name(b, a) > 0, (a, b)


def test_policy_directives() -> None:
    conf = _render({"EGRESS_ALLOW_DESTINATIONS": "10.1.2.0/24", "EGRESS_DNS_SERVERS": "9.9.9.9"})
    assert 'acl policy_default_allow dstdomain -n "/srv/state/conf/policies/default.allow"' in conf
    assert 'acl policy_default_deny dstdomain -n "/srv/state/conf/policies/default.deny"' in conf
    assert "dns_nameservers 9.9.9.9" in conf
    assert "exempt_destination" not in conf  # one ACL: "dst" matches when ANY address of an answer matches
    assert "http_access deny forbidden_destination reason_destination_not_public" in conf
    assert "ssl_bump splice step1 forbidden_destination reason_destination_not_public" in conf
    assert "cache_peer 127.0.0.1 parent 39999 0 no-query" in conf
    assert "connect-fail-limit=2147483647 name=denier" in conf
    assert "never_direct allow refused_connect" in conf
    assert "ssl_bump peek step1 reason_allowed" in conf
    assert "ssl_bump splice step2 sni_ok" in conf
    assert "acl sni_ok external sni_check" in conf  # not an ssl::server_name copy of the list
    assert not [line for line in conf.splitlines() if line.startswith("acl") and "ssl::server_name" in line]
    assert " %>handshake %{policy}note " in conf
    assert "via off" in conf and "forwarded_for delete" in conf and "cache deny all" in conf
    assert "cache_effective_user proxy" in conf
    forbidden = [ipaddress.ip_network(text) for text in
                 next(line for line in conf.splitlines() if line.startswith("acl forbidden_destination dst"))
                 .split()[3:]]
    for network in PRIVATE_DESTINATIONS:  # every range is refused (collapsed: 224/4 and 240/4 are one /3)
        if not network.overlaps(ipaddress.ip_network("10.1.2.0/24")):  # type: ignore[arg-type]
            assert covered(network, forbidden), network
    for reason in REASONS:
        assert f"acl reason_{reason} annotate_transaction reason={reason}" in conf
        page = {"upstream_unavailable": "503:ERR_EGRESS_UPSTREAM", "log_unavailable": "503:ERR_EGRESS_DENIED"}.get(
            reason, "ERR_EGRESS_DENIED")
        assert f"deny_info {page} reason_{reason}" in conf
    # Every line starts with the access log's token and the worker's kid number (see AccessLogListener).
    assert f"\nlogformat egress {PLACEHOLDER_ACCESS_LOG_TOKEN}-${{process_number}}\t{SQUID_LOGFORMAT}\n" in conf


def _forbidden(exempt: str, address: str) -> bool:
    networks = tuple(ipaddress.ip_network(cidr) for cidr in exempt.split()) if exempt else ()
    return any(ipaddress.ip_address(address) in net for net in forbidden_destinations(networks))


@pytest.mark.parametrize(
    ("exempt", "address", "forbidden"),
    [
        ("", "10.1.2.5", True),
        ("10.1.2.0/24", "10.1.2.5", False),
        ("10.1.2.0/24", "10.1.3.5", True),  # the rest of 10/8 stays forbidden
        ("10.1.2.0/24", "169.254.169.254", True),
        ("10.1.2.0/24", "64:ff9b::a01:205", False),  # the exempt range's NAT64 image is exempt too
        ("10.1.2.0/24", "64:ff9b::a9fe:a9fe", True),  # 169.254.169.254 through NAT64
        ("127.0.0.2/32", "127.0.0.3", True),
        ("127.0.0.2/32", "127.0.0.2", False),
        ("", "fd00:ec2::254", True),
        ("fd00:ec2::/32", "fd00:ec2::253", False),
        # the metadata and credential endpoints are never exempt: the proxy's own credentials live there
        ("fd00:ec2::/32", "fd00:ec2::254", True),
        ("169.254.0.0/16", "169.254.169.254", True),
        ("169.254.0.0/16", "169.254.170.2", True),
        ("169.254.0.0/16", "169.254.169.123", False),
        ("0.0.0.0/0 ::/0", "169.254.169.254", True),
        ("0.0.0.0/0", "64:ff9b::a9fe:a9fe", True),
        ("fd00:ec2::/32", "fd00:ec3::1", True),
        ("", "8.8.8.8", False),
        ("", "2600::1", False),
        ("0.0.0.0/0 ::/0", "10.0.0.1", False),
    ],
)
def test_forbidden_destinations_are_private_minus_exempt(exempt: str, address: str, forbidden: bool) -> None:
    assert _forbidden(exempt, address) is forbidden


def test_no_dns_servers_means_system_resolver() -> None:
    assert "dns_nameservers" not in _render()


def test_no_exemption_renders_plain_deny() -> None:
    conf = _render()
    assert "acl forbidden_destination dst " + " ".join(str(net) for net in forbidden_destinations(())) in conf
    assert "http_access deny forbidden_destination reason_destination_not_public" in conf


def test_ports_and_listen_address() -> None:
    conf = _render({"EGRESS_ALLOWED_PORTS": "http:80,http:8080,connect:443", "EGRESS_LISTEN_ADDRESS": "::1",
                    "EGRESS_PORT": "3129"})
    assert "acl http_ports port 80 8080" in conf and "acl connect_ports port 443" in conf
    assert "http_port [::1]:3129 ssl-bump" in conf
    assert "acl localhost_client src 127.0.0.1/32 ::1\n" in conf


def test_specific_listen_address_may_read_the_cache_manager() -> None:
    # health and metrics connect to the listen address, so their source address is that address too
    conf = _render({"EGRESS_LISTEN_ADDRESS": "10.0.1.5"})
    assert "acl localhost_client src 127.0.0.1/32 ::1 10.0.1.5\n" in conf


def test_websocket_upgrades_follow_the_setting() -> None:
    rules = ["http_upgrade_request_protocols websocket allow all", "http_upgrade_request_protocols WebSocket allow all"]
    on = _render()
    assert all(rule in on for rule in rules)
    # after http_access has decided: the rule only lets an allowed request keep its Upgrade header
    assert on.index("http_access deny all reason_denied") < on.index(rules[0])
    assert "http_upgrade_request_protocols" not in _render({"EGRESS_WEBSOCKETS": "off"})


def test_idle_timeouts_are_rendered() -> None:
    conf = _render({"EGRESS_TUNNEL_IDLE_TIMEOUT": "350", "EGRESS_CLIENT_IDLE_TIMEOUT": "60"})
    assert "read_timeout 350 seconds\n" in conf and "client_idle_pconn_timeout 60 seconds\n" in conf


def test_candidate_paths_point_at_candidate_dir() -> None:
    paths = StatePaths(Path("/srv/state"))
    candidate = paths.in_dir(paths.candidate_dir)
    assert candidate.policy_list("default", "allow") == Path("/srv/state/candidate/policies/default.allow")
    assert candidate.cert == paths.cert  # only the config files move


@pytest.mark.parametrize("value", [".example.com\nexact.example.org", "POLICY_DOCUMENT", "IDENTITY_DOCUMENT"])
def test_a_relocated_config_is_the_config_rendered_for_the_candidate_dir(value: str) -> None:
    # The supervisor renders a candidate once and parse-checks it relocated to the candidate directory.
    value = globals().get(value, value)
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state", **PROXY_PROTOCOL})
    paths = StatePaths(settings.state_dir)
    candidate = paths.in_dir(paths.candidate_dir)
    document = parse_policy_value(value, source="test", client_cidrs=settings.client_cidrs)
    active = render(settings, document, paths, run_as="proxy", denial_port=39999, access_log_port=39998)
    direct = render(settings, document, candidate, run_as="proxy", denial_port=39999, access_log_port=39998)
    assert active.squid_conf != direct.squid_conf  # the test means something: the paths differ
    assert active.relocated(paths, candidate) == direct


UPSTREAM = {"EGRESS_UPSTREAM_PROXY": "http://10.0.0.9:3128", "EGRESS_UPSTREAM_NO_PROXY": ".direct.example"}


def test_no_upstream_by_default() -> None:
    conf = _render()
    assert "upstream_probe" not in conf and "name=upstream" not in conf and "always_direct" not in conf
    assert "never_direct allow all" not in conf and "reason_upstream_unavailable\n" not in conf.replace(
        "deny_info 503:ERR_EGRESS_UPSTREAM reason_upstream_unavailable\n", "")


def test_upstream_carries_allowed_requests_only() -> None:
    conf = _render(UPSTREAM, entries=".example.com\n.direct.example")
    peer = [line for line in conf.splitlines() if line.startswith("cache_peer 10.0.0.9")]
    assert peer == ["cache_peer 10.0.0.9 parent 3128 0 no-query no-digest no-netdb-exchange "
                    "connect-fail-limit=2147483647 name=upstream"]
    lines = conf.splitlines()
    # refused CONNECTs only to the denier, allowed ones only to the upstream, bypassed names only direct
    assert lines.index("cache_peer_access upstream deny refused_connect") < lines.index(
        "cache_peer_access upstream allow all")
    assert "cache_peer_access upstream deny upstream_bypass" in lines
    assert "always_direct allow upstream_bypass !refused_connect" in lines
    assert lines.index("never_direct allow refused_connect") < lines.index("never_direct allow all")
    assert "acl upstream_bypass dstdomain -n .direct.example" in lines
    # the probe comes after every policy check, for both kinds of request, and is refused with its own reason
    check = "!upstream_bypass !upstream_reachable reason_upstream_unavailable"
    assert lines.index(f"http_access deny {check}") == lines.index(
        "http_access deny forbidden_destination reason_destination_not_public") + 1
    assert lines.index(f"ssl_bump splice step1 {check}") == lines.index(
        "ssl_bump splice step1 forbidden_destination reason_destination_not_public") + 1
    assert "deny_info 503:ERR_EGRESS_UPSTREAM reason_upstream_unavailable" in lines
    refused = next(line for line in lines if line.startswith("acl refused_connect note reason"))
    assert "upstream_unavailable" in refused.split()
    assert " 10.0.0.9 3128" in next(line for line in lines if line.startswith("external_acl_type upstream_probe"))


def test_upstream_without_no_proxy_has_no_bypass() -> None:
    conf = _render({"EGRESS_UPSTREAM_PROXY": "http://proxy.corp.example:8080"})
    assert "upstream_bypass" not in conf and "always_direct" not in conf
    assert "http_access deny !upstream_reachable reason_upstream_unavailable" in conf
    assert "cache_peer proxy.corp.example parent 8080 0" in conf


def test_upstream_login_is_escaped_into_one_token() -> None:
    settings = load_settings({}, {"EGRESS_UPSTREAM_PROXY": "http://10.0.0.9:3128"})
    conf = render(settings, _flat(".example.com", settings), StatePaths(Path("/s")),
                  run_as=None, denial_port=39999, access_log_port=39998, upstream_login='us er:p"w#d:x').squid_conf
    assert " login=us%20er:p%22w%23d%3Ax name=upstream" in conf
    in_url = _render({"EGRESS_UPSTREAM_PROXY": "http://a%40b:c%3Ad@10.0.0.9:3128"})
    assert " login=a%40b:c%3Ad name=upstream" in in_url


POLICY_DOCUMENT = json.dumps({"policies": [
    {"name": "ci-runners", "clients": ["10.0.8.0/22", "fd00:8::/64"], "mode": "report",
     "allow": [".github.com", "pypi.org"], "deny": ["gist.github.com"]},
    {"name": "default", "clients": ["10.0.0.0/8"], "allow": [".amazonaws.com"]},
    {"name": "empty", "clients": ["192.168.0.0/16"]},
]})


IDENTITY_DOCUMENT = json.dumps({"policies": [
    {"name": "payments", "clients": ["sg-0123456789abcdef0", "ecs:prod/payments"], "allow": ["pay.example.com"]},
    {"name": "consumer-a", "clients": ["vpce-0aaaaaaaaaaaaaaaa:10.1.0.0/16"], "mode": "report", "allow": ["a.com"]},
    {"name": "default", "clients": ["10.0.0.0/8", "tag:team=data"], "allow": [".amazonaws.com"]},
]})
PROXY_PROTOCOL = {"EGRESS_PROXY_PROTOCOL": "required", "EGRESS_PROXY_PROTOCOL_FROM": "10.0.0.0/24"}


@pytest.mark.skipif(shutil.which("squid") is None, reason="needs squid-openssl")
@pytest.mark.parametrize(("value", "env"), [(".example.com", {}), (POLICY_DOCUMENT, {}), (".example.com", UPSTREAM),
                                            (IDENTITY_DOCUMENT, PROXY_PROTOCOL), (IDENTITY_DOCUMENT, {}),
                                            (POLICY_DOCUMENT, {"EGRESS_TRANSPARENT": "on"}),
                                            (IDENTITY_DOCUMENT, {"EGRESS_TRANSPARENT": "on"})],
                         ids=["flat", "document", "upstream", "identity-proxy-protocol", "identity", "transparent",
                              "transparent-identity"])
def test_rendered_config_passes_squid_parse(tmp_path: Path, value: str, env: dict[str, str]) -> None:
    settings = load_settings({}, {"EGRESS_STATE_DIR": str(tmp_path), **env})
    paths = StatePaths(tmp_path)
    prepare_state_dir(paths, error_page=default_error_page(), user=None)
    document = parse_policy_value(value, source="test", client_cidrs=settings.client_cidrs)
    rendered = render(settings, document, paths, run_as=None, denial_port=39999,
                      access_log_port=39998, upstream_login="user:secret")
    for path, text in rendered.files(paths).items():
        atomic_write(path, text)
    assert parse_check("squid", paths.squid_conf) == []  # no errors, no unexpected warnings


def test_policies_render_in_document_order_with_disjoint_clients() -> None:
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state"})
    document = parse_policy_value(POLICY_DOCUMENT, source="test", client_cidrs=settings.client_cidrs)
    conf = render(settings, document, StatePaths(settings.state_dir), run_as=None, denial_port=1,
                                                 access_log_port=2).squid_conf
    # A client belongs to the first policy containing it: 'default' judges 10/8 minus ci-runners' 10.0.8.0/22.
    assert "acl policy_ci-runners src 10.0.8.0/22 fd00:8::/64\n" in conf
    default_src = next(line for line in conf.splitlines() if line.startswith("acl policy_default src "))
    networks = [ipaddress.ip_network(cidr) for cidr in default_src.split()[3:]]
    assert not any(net.overlaps(ipaddress.ip_network("10.0.8.0/22")) for net in networks)
    assert sum(net.num_addresses for net in networks) == 2**24 - 2**10
    # Enforce refuses; report notes the reason and goes on (the tree never matches: !all). Deny before allow; the
    # policy's clients first, then its name note, then the verdict.
    assert "acl policy_default_http_denied all-of policy_default_deny reason_domain_denied\n" in conf
    assert "acl policy_default_http_unlisted all-of !policy_default_allow refused_by_host\n" in conf
    assert ("acl policy_default_http_verdict any-of policy_default_http_denied policy_default_http_unlisted\n"
            in conf)
    assert ("acl policy_default_http_refused all-of policy_default policy_default_named "
            "policy_default_http_verdict\n" in conf)
    assert "acl policy_ci-runners_http_denied all-of policy_ci-runners_deny would_domain_denied !all\n" in conf
    assert ("acl policy_ci-runners_tunnel_unlisted all-of !policy_ci-runners_deny !policy_ci-runners_allow "
            "tunnel_would_refuse_by_host !all\n" in conf)
    assert ("acl policy_ci-runners_tunnel_refused all-of policy_ci-runners policy_ci-runners_tunnel_named "
            "policy_ci-runners_tunnel_verdict\n" in conf)
    # Three policies: groups of two, in document order; one rule per group and phase.
    assert "acl policies_1_http_refused any-of policy_ci-runners_http_refused policy_default_http_refused\n" in conf
    assert "acl policies_2 src 192.168.0.0/16\n" in conf
    assert "http_access deny policies_1 policies_1_http_refused\n" in conf
    assert "ssl_bump splice step1 policies_1 policies_1_tunnel_refused\n" in conf
    # The SSRF guard comes after the name checks and is never relaxed by report mode.
    assert conf.index("http_access deny policies_1 ") < conf.index(
        "http_access deny forbidden_destination reason_destination_not_public")
    assert "ssl_bump splice step2 report_clients sni_verdict_not_allowlisted tunnel_would_sni_not_allowlisted" in conf
    assert "acl report_clients src 10.0.8.0/22 fd00:8::/64\n" in conf  # enforce clients: no splice without an OK
    # One rule per group of policies and phase: the cost a client in the last of many policies pays.
    assert [line for line in conf.splitlines() if line.startswith("http_access deny polic")] == [
        "http_access deny policies_1 policies_1_http_refused", "http_access deny policies_2 policies_2_http_refused"]


@pytest.mark.skipif(shutil.which("squid") is None, reason="needs squid-openssl")
def test_a_parse_check_that_does_not_finish_is_a_squid_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not a crash of the worker thread (which would leave every later reload waiting for it).
    def never_finishes(*args: object, **kwargs: object) -> None:
        raise squid_process.subprocess.TimeoutExpired("squid", 120)

    monkeypatch.setattr(squid_process.subprocess, "run", never_finishes)
    with pytest.raises(SquidError, match="did not finish within 120 s"):
        parse_check("squid", tmp_path / "squid.conf")


def test_parse_check_names_the_problem(tmp_path: Path) -> None:
    conf = tmp_path / "squid.conf"
    conf.write_text("http_port 3128\nacl broken dstdomain\nno_such_directive on\n")
    with pytest.raises(SquidError, match="squid -k parse rejected"):
        parse_check("squid", conf)


def test_writing_a_config_removes_the_lists_of_policies_it_no_longer_has(tmp_path: Path) -> None:
    settings = load_settings({}, {"EGRESS_STATE_DIR": str(tmp_path)})
    paths = StatePaths(tmp_path)
    flat = parse_policy_value(".example.com", source="test", client_cidrs=settings.client_cidrs)
    write_rendered(render(settings, flat, paths, run_as=None, denial_port=1, access_log_port=2), paths)
    assert sorted(p.name for p in paths.policy_dir.iterdir()) == ["default.allow", "default.deny"]
    document = parse_policy_value(POLICY_DOCUMENT, source="test", client_cidrs=settings.client_cidrs)
    write_rendered(render(settings, document, paths, run_as=None, denial_port=1, access_log_port=2), paths)
    assert sorted(p.name for p in paths.policy_dir.iterdir()) == [
        "ci-runners.allow", "ci-runners.deny", "default.allow", "default.deny", "empty.allow", "empty.deny"]
    write_rendered(render(settings, flat, paths, run_as=None, denial_port=1, access_log_port=2), paths)
    assert sorted(p.name for p in paths.policy_dir.iterdir()) == ["default.allow", "default.deny"]
    assert (paths.policy_dir / "default.allow").read_text() == ".example.com\n"


@pytest.mark.parametrize("compiled", [True, False])
def test_sni_helper_is_the_compiled_one_when_the_package_has_it(monkeypatch: pytest.MonkeyPatch,
                                                                 compiled: bool) -> None:
    monkeypatch.setattr(squid_conf, "compiled_sni_helper", lambda: Path("/pkg/compiled/sni_helper") if compiled
                        else None)
    [line] = [line for line in _render().splitlines() if line.startswith("external_acl_type sni_check ")]
    command = line.split(" %{policy}note ", 1)[1]
    if compiled:
        assert command == "/srv/state/bin/sni_helper /srv/state/conf/policies"
    else:
        assert command == f"{PYTHON} -I /srv/state/bin/sni_helper.py /srv/state/conf/policies"


def test_prepare_state_dir_copies_the_compiled_sni_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = tmp_path / "built" / "sni_helper"
    built.parent.mkdir()
    built.write_bytes(b"\x7fELF compiled")
    paths = StatePaths(tmp_path / "state")
    monkeypatch.setattr(squid_process, "compiled_sni_helper", lambda: built)
    prepare_state_dir(paths, error_page="<p>denied</p>", user=None)
    assert paths.sni_helper_binary.read_bytes() == b"\x7fELF compiled"
    assert paths.sni_helper_binary.stat().st_mode & 0o777 == 0o755
    monkeypatch.setattr(squid_process, "compiled_sni_helper", lambda: None)
    prepare_state_dir(paths, error_page="<p>denied</p>", user=None)
    assert not paths.sni_helper_binary.exists()  # a stale copy would be run by nothing, but must not linger


def _src_lists(conf: str) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    return {line.split()[1]: [ipaddress.ip_network(text) for text in line.split()[3:]]
            for line in conf.splitlines() if line.startswith("acl ") and line.split()[2] == "src"}


def test_every_address_list_is_rendered_without_overlaps() -> None:
    # Squid keeps one of two overlapping entries of a src/dst ACL and ignores the other (networks.py).
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state",
                                  "EGRESS_CLIENT_CIDRS": "10.0.0.28/32,10.0.0.0/8,10.0.0.0/9,fd00::/8,fc00::/7",
                                  "EGRESS_ALLOW_DESTINATIONS": "10.1.0.0/16,10.1.2.0/24"})
    document = parse_policy_value(json.dumps({"policies": [
        {"name": "first", "clients": ["10.0.0.24/32"], "allow": ["a.example.com"]},
        {"name": "second", "clients": ["10.0.0.0/27", "10.0.0.16/28", "10.0.0.24/32"], "mode": "report",
         "allow": ["b.example.com"]},
        {"name": "third", "clients": ["10.0.0.0/24", "10.0.0.128/25"], "allow": ["c.example.com"]},
    ]}), source="t", client_cidrs=settings.client_cidrs)
    conf = render(settings, document, StatePaths(settings.state_dir), run_as=None, denial_port=1,
                                                 access_log_port=2).squid_conf
    lists = _src_lists(conf)
    lists["forbidden_destination"] = [ipaddress.ip_network(text) for text in next(
        line for line in conf.splitlines() if line.startswith("acl forbidden_destination dst")).split()[3:]]
    for name, networks in lists.items():
        for index, network in enumerate(networks):
            assert not [other for other in networks[index + 1:] if network.overlaps(other)], (name, network)
    assert [str(n) for n in lists["clients"]] == ["10.0.0.0/8", "fc00::/7"]
    # Each policy judges exactly its own clients: the first match in document order.
    assert [str(n) for n in lists["policy_first"]] == ["10.0.0.24/32"]
    assert covered(ipaddress.ip_network("10.0.0.0/28"), lists["policy_second"])
    assert not covered(ipaddress.ip_network("10.0.0.24/32"), lists["policy_second"])
    assert [str(n) for n in lists["in_a_policy"]] == ["10.0.0.0/24"]


def test_transparent_mode_opens_intercept_ports_beside_the_explicit_one() -> None:
    conf = _render({"EGRESS_TRANSPARENT": "on", "EGRESS_INTERCEPT_HTTP_PORT": "4129"})
    assert "http_port 0.0.0.0:3128 ssl-bump" in conf
    # On an unspecified listen address, the intercept ports take IPv4 and IPv6 clients (a bare port).
    assert "\nhttp_port 4129 intercept name=intercept_http" in conf
    assert "\nhttps_port 3130 intercept ssl-bump name=intercept_https" in conf
    assert "\nhost_verify_strict on\n" in conf
    # Intercepted TLS peeks at step 1 (its CONNECT names only an IP), so the step-2 SNI check and Squid's host
    # forgery check both run; the explicit step-1 name rules come after and never see it.
    peek = conf.index("ssl_bump peek step1 intercepted_tls\n")
    assert peek < conf.index("ssl_bump splice step1 !clients")
    # Its client and destination are judged at step 2 (a step-1 refusal's log line has none of its notes), before
    # the SNI check lets it through.
    destination = conf.index("ssl_bump terminate step2 intercepted_tls forbidden_destination "
                             "reason_destination_not_public")
    assert conf.index("ssl_bump terminate step2 intercepted_tls !clients") < destination
    assert destination < conf.index("ssl_bump splice step2 sni_ok sni_judged")
    assert ("access_log tcp://127.0.0.1:39998 logformat=egress buffer-size=4MB on-error=drop !local_manager "
            "mode_noted") in conf


@pytest.mark.parametrize(("listen", "expected"), [("::", "http_port 3129 intercept"),
                                                    ("10.0.0.5", "http_port 10.0.0.5:3129 intercept"),
                                                    ("fd00::5", "http_port [fd00::5]:3129 intercept")])
def test_intercept_ports_listen_where_the_explicit_port_does(listen: str, expected: str) -> None:
    conf = _render({"EGRESS_TRANSPARENT": "on", "EGRESS_LISTEN_ADDRESS": listen})
    assert f"\n{expected} name=intercept_http" in conf


def test_no_intercept_ports_or_strict_host_check_by_default() -> None:
    conf = _render()
    assert "intercept" not in conf and "host_verify_strict" not in conf


def _rendered(entries: str, env: dict[str, str] | None = None) -> RenderedConfig:
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state", **(env or {})})
    return render(settings, _flat(entries, settings), StatePaths(settings.state_dir), run_as="proxy",
                  denial_port=39999, access_log_port=39998)


def test_a_change_of_plain_list_entries_only_is_recognised() -> None:
    active = _rendered(".example.com\nexact.example.org")
    assert _rendered(".example.com\nother.example.net\nxn--bcher-kva.example").differs_in_plain_lists_only(active)
    assert not _rendered(".example.com").differs_in_plain_lists_only(None)  # nothing parsed yet
    assert not _rendered(".example.com", {"EGRESS_PORT": "3129"}).differs_in_plain_lists_only(active)  # a directive
    odd = RenderedConfig(active.squid_conf, {key: text + "-n\n" for key, text in active.lists.items()})
    assert not odd.differs_in_plain_lists_only(active)  # a line that is not a plain name: parse it


def test_the_candidate_parse_is_skipped_when_only_plain_lists_change(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[Path] = []
    monkeypatch.setattr(config_pipeline, "parse_check", lambda binary, conf: parsed.append(conf) or [])
    settings = load_settings({}, {"EGRESS_STATE_DIR": str(tmp_path)})
    applier = config_pipeline.ConfigApplier(settings, StatePaths(tmp_path), user=None, denial_port=39999,
                                                                 access_log_port=39998, access_log_token="0f" * 16,
                                            upstream_login=None, on_parse_warning=lambda warning: None)
    first = Snapshot(".example.com\n", "v1")
    applier.activate(applier.build(first, "test", started=0.0))
    applier.build(Snapshot(".example.com\nexact.example.org\n", "v2"), "test", started=0.0)
    assert len(parsed) == 1  # the first build only
    applier.build(Snapshot('{"policies": [{"name": "a", "clients": ["10.0.0.0/8"], "allow": [".x.org"]}]}', "v3"),
                  "test", started=0.0)
    assert len(parsed) == 2  # another policy: new directives, parsed


def test_every_ipv4_address_is_rendered_as_two_halves() -> None:
    # Squid 5.7 refuses 0.0.0.0/0 in an ACL; a catch-all policy or gate must still load.
    settings = load_settings({}, {"EGRESS_STATE_DIR": "/srv/state", "EGRESS_CLIENT_CIDRS": "0.0.0.0/1,128.0.0.0/1"})
    document = parse_policy_value(json.dumps({"policies": [
        {"name": "rest", "clients": ["0.0.0.0/0"], "allow": ["a.example.com"]}]}), source="t",
        client_cidrs=settings.client_cidrs)
    conf = render(settings, document, StatePaths(settings.state_dir), run_as=None, denial_port=1,
                                                 access_log_port=2).squid_conf
    for name in ("clients", "policy_rest", "in_a_policy"):
        assert f"acl {name} src 0.0.0.0/1 128.0.0.0/1\n" in conf
    assert "0.0.0.0/0" not in conf


def test_logging_directives() -> None:
    """Squid never blocks on its access log (tcp: to the supervisor's listener, dropping lines rather than dying when
    its buffer is full; not stdio:), gives up on a crash-looping worker for 30 s only, and refuses traffic on a
    stalled log only when EGRESS_LOG_FULL=refuse says so."""
    conf = _render()
    assert ("\naccess_log tcp://127.0.0.1:39998 logformat=egress buffer-size=4MB on-error=drop !local_manager\n"
            in conf)
    assert "access_log stdio:" not in conf and "access_log daemon:" not in conf and "\nlogfile_daemon" not in conf
    assert "\nbuffered_logs off\n" in conf
    assert "hopeless_kid_revival_delay 30 seconds" in conf
    assert "log_unavailable external" not in conf and "log_unavailable reason_log_unavailable" not in conf
    refusing = _render({"EGRESS_LOG_FULL": "refuse"})
    lines = refusing.splitlines()
    assert "acl log_unavailable external log_gate now" in lines
    # First after the manager rules (health and metrics keep working), and before any policy rule.
    assert lines.index("http_access deny !CONNECT log_unavailable reason_log_unavailable") == lines.index(
        "http_access deny !CONNECT manager reason_manager_denied") + 1
    assert lines.index("ssl_bump splice step1 log_unavailable reason_log_unavailable") < lines.index(
        "ssl_bump splice step1 !clients reason_client_not_allowed")
    assert "log_unavailable" in next(line for line in lines if line.startswith("acl refused_connect note reason"))


def test_tcp_logger_drop_counts_are_read_from_cache_log() -> None:
    """Squid 5.7's Log::TcpLogger lines, as a worker writes them to cache.log."""
    stops = ("2026/12/05 00:10:00 kid1| tcp:127.0.0.1:40123 logger stops dropping records after 17 drops; current "
             "buffer use: 312 out of 4194304 bytes")
    assert strings.tcp_logger_drops(stops) == 17
    assert strings.tcp_logger_drops("2026/12/05 00:09:59 kid1| tcp:127.0.0.1:40123 logger starts dropping "
                                    "records.") is None
    assert strings.tcp_logger_drops("2026/12/05 00:10:00 kid1| Accepting HTTP Socket connections at ...") is None


def test_a_drop_episode_cut_short_by_a_reload_is_reported_as_uncounted() -> None:
    """Squid 5.7's Log::TcpLogger reports an episode's count only when a later record fits; a logger closed while it
    drops (reconfigure, stop) never does. Worker kid1 recovers and reports its count; kid2 is closed mid-episode."""
    watch = strings.TcpLoggerDrops()
    starts = "tcp:127.0.0.1:40123 logger starts dropping records."
    assert watch.feed(f"2026/12/05 00:10:00 kid1| {starts}") is None
    assert watch.feed(f"2026/12/05 00:10:00 kid2| {starts}") is None
    assert watch.feed("2026/12/05 00:10:01 kid1| tcp:127.0.0.1:40123 logger stops dropping records after 17 drops; "
                      "current buffer use: 312 out of 4194304 bytes") == ("counted", 17)
    assert watch.feed("2026/12/05 00:10:02 kid1| Logfile: closing log tcp://127.0.0.1:40123") is None
    assert watch.feed("2026/12/05 00:10:02 kid2| Logfile: closing log tcp://127.0.0.1:40123") == ("uncounted", "kid2")
    assert watch.feed("2026/12/05 00:10:03 kid2| Logfile: closing log tcp://127.0.0.1:40123") is None  # once
    # A worker killed mid-episode writes no closing line: its revived successor's opening line reports it.
    assert watch.feed(f"2026/12/05 00:10:04 kid1| {starts}") is None
    assert watch.feed("2026/12/05 00:10:09 kid1| Logfile: opening log tcp://127.0.0.1:40123") == ("uncounted", "kid1")
    assert watch.feed("2026/12/05 00:10:09 kid2| Logfile: opening log tcp://127.0.0.1:40123") is None
