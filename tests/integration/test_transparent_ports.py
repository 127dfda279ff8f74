"""A policy's extra ports in transparent mode (``"ports": ["git.test:2222"]``), against the real supervisor, real
nftables and the harness's DNS server, in network namespaces this module creates (netns.RoutedTopology, as in
test_transparent.py).

    client ns                       router ns (the "EC2 instance")                 internet ns
    10.200.1.2 (ssh: git.test:2222, 10.200.1.1 | egress-proxy run (writes         203.0.113.20  git.test, first
      internal.test:2222)           ports.json) | 'nft-rules' at start,           203.0.113.21  git.test, after the move
    fd00:c1::2 (ssh, too)       --  'nft-sets' as the host's timer runs it    --  fd00:203::20  git.test's AAAA
    10.200.1.3 (web: no ports)      198.51.100.1, fd00:e0::1, forwarding on       fd00:204::20  internal.test (private)
    10.200.1.4 (watch: report)                                                    203.0.113.22  other.test
    default routes -> router                                                      203.0.113.53  the DNS server
                                                                                  no route back to the clients

Each origin is a TCP server standing in for SSH (a banner, and a record of what it received and from whom) on
port 2222, and one on 2223 at the first address. The refresh is what the host runs: 'egress-proxy nft-sets'
(here in the router namespace, as the container shares the instance's network), its output checked line by line
against the grammar the host accepts (nft_rules.PORT_SET_LINE, with grep -E as the CDK's script does), then
'nft -f'. It resolves with the proxy's DNS servers, the harness's, in the internet namespace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import DnsServer, RawTcpServer, wait_for_port, write_allowlist
from netns import RoutedTopology, nft_counter, serving
from proxy_runner import NamespacedProxy, egress_proxy_command, running_transparent_proxy

from egress_proxy.nft_rules import PORT_SET_LINE
from egress_proxy.squid_conf import StatePaths

SSH_CLIENT = "10.200.1.2"
WEB_CLIENT = "10.200.1.3"
REPORT_CLIENT = "10.200.1.4"
SSH_CLIENT_V6 = "fd00:c1::2"
ROUTER_UPLINK = "198.51.100.1"
GIT_FIRST = "203.0.113.20"
GIT_MOVED = "203.0.113.21"
OTHER = "203.0.113.22"
# fd00:203::/64 stands for public IPv6 space (exempt from the SSRF guard, as in test_transparent_ipv6.py);
# fd00:204::/64 stays private: a name resolving there is never opened.
GIT_V6 = "fd00:203::20"
INTERNAL_V6 = "fd00:204::20"
DNS_IP = "203.0.113.53"
# The instance metadata service's address, served in the internet namespace: on EC2 a packet the instance forwards
# there reaches the INSTANCE's metadata service (its role's credentials), whatever the client.
METADATA = "169.254.169.254"
SSH_PORT = 2222
OTHER_PORT = 2223
GIT_PORT = 9418  # git's own protocol, served by a real 'git daemon' at git.test's first address
# How long an address stays open after DNS last returned it (the product's default is 300 s): short, so that
# the test sees an old address age out; long enough that a refresh's answer is still open when the client dials.
HOLD_SECONDS = 10

DOCUMENT = {
    "policies": [
        {"name": "ssh", "clients": [f"{SSH_CLIENT}/32", f"{SSH_CLIENT_V6}/128"], "allow": ["allowed.test"],
         "ports": [f"git.test:{SSH_PORT}", f"internal.test:{SSH_PORT}", f"git.test:{GIT_PORT}"]},
        {"name": "web", "clients": [f"{WEB_CLIENT}/32"], "allow": ["git.test"]},
        {"name": "watch", "clients": [f"{REPORT_CLIENT}/32"], "mode": "report", "allow": ["git.test"]},
    ]
}


class Topology(RoutedTopology):
    def __init__(self) -> None:
        super().__init__("ports", [SSH_CLIENT, WEB_CLIENT, REPORT_CLIENT, SSH_CLIENT_V6],
                         [GIT_FIRST, GIT_MOVED, OTHER, DNS_IP, GIT_V6, INTERNAL_V6, METADATA])
        # No route back to the clients' ranges: a forwarded connection that is not masqueraded gets no answer.
        self.internet.run("ip", "route", "add", "unreachable", "10.200.1.0/24")
        self.internet.run("ip", "-6", "route", "add", "unreachable", "fd00:c1::/64")

    def counter(self, name: str) -> int:
        return nft_counter(self.router, "egress_proxy", name)

    def port_set(self, version: int = 4) -> str:
        return self.router.run("nft", "list", "set", "inet", "egress_proxy", f"ports_v{version}").stdout


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    topo = Topology()
    yield topo
    topo.close()


@pytest.fixture(scope="module")
def origins(topology: Topology) -> Iterator[dict[str, Any]]:
    with serving(topology.internet, {
        "dns": DnsServer({"git.test": [GIT_FIRST, GIT_V6], "other.test": [OTHER], "internal.test": [INTERNAL_V6]},
                         host=DNS_IP, port=53, ttl=1),
        "v6": RawTcpServer(GIT_V6, SSH_PORT, banner=b"SSH-2.0-v6\r\n"),
        "internal": RawTcpServer(INTERNAL_V6, SSH_PORT, banner=b"SSH-2.0-internal\r\n"),
        "first": RawTcpServer(GIT_FIRST, SSH_PORT, banner=b"SSH-2.0-first\r\n"),
        "moved": RawTcpServer(GIT_MOVED, SSH_PORT, banner=b"SSH-2.0-moved\r\n"),
        "other": RawTcpServer(OTHER, SSH_PORT, banner=b"SSH-2.0-other\r\n"),
        "other_port": RawTcpServer(GIT_FIRST, OTHER_PORT, banner=b"SSH-2.0-other-port\r\n"),
        "metadata": RawTcpServer(METADATA, SSH_PORT, banner=b"SSH-2.0-metadata\r\n"),
    }) as servers:
        yield servers


@pytest.fixture(scope="module")
def proxy(topology: Topology, origins: dict[str, Any], public_tmp: Path) -> Iterator[NamespacedProxy]:
    with running_transparent_proxy(topology.router, public_tmp / "ports-state", public_tmp / "ports-policies.json",
                                   DOCUMENT, {"EGRESS_DNS_SERVERS": DNS_IP,
                                              "EGRESS_CLIENT_CIDRS": "10.200.1.0/24,fd00:c1::/64",
                                              "EGRESS_ALLOW_DESTINATIONS": "fd00:203::/64",
                                              "EGRESS_PORT_ADDRESS_HOLD": str(HOLD_SECONDS)}) as runner:
        yield runner

def refresh(topology: Topology, proxy: NamespacedProxy) -> str:
    """What the host's timer does: 'egress-proxy nft-sets', refused whole if any line is outside the grammar,
    then 'nft -f'. Returns the transaction."""
    result = subprocess.run(topology.router.command([*egress_proxy_command(), "nft-sets"]), env=proxy.env,
                            capture_output=True, text=True, timeout=60, check=True)
    outside = subprocess.run(["grep", "-Ev", PORT_SET_LINE], input=result.stdout, capture_output=True, text=True)
    assert outside.stdout == "", outside.stdout
    topology.router.run("nft", "-f", "-", input=result.stdout)
    return result.stdout


def dial(topology: Topology, source: str, address: str, port: int, timeout: float = 3.0) -> bytes | None:
    """Connect from ``source`` in the client namespace, send a line, and return the origin's banner; None when
    the connection timed out (a drop sends nothing back)."""
    with topology.client.entered():
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except TimeoutError:
            return None
        sock.sendall(f"hello from {source}\n".encode())
        return sock.recv(100)


def test_the_policys_client_reaches_its_port_from_the_hosts_address(
        topology: Topology, origins: dict[str, Any], proxy: NamespacedProxy) -> None:
    transaction = refresh(topology, proxy)
    assert f"{{ {SSH_CLIENT}/32 . {GIT_FIRST} . {SSH_PORT} timeout " in transaction
    flows = topology.counter("port_flows")
    assert dial(topology, SSH_CLIENT, GIT_FIRST, SSH_PORT) == b"SSH-2.0-first\r\n"
    origins["first"].wait_for(f"hello from {SSH_CLIENT}\n".encode())
    assert origins["first"].peers == [ROUTER_UPLINK]  # masqueraded: it leaves from the host's own address
    assert topology.counter("port_flows") == flows + 1


@pytest.mark.parametrize(("source", "address", "port", "origin"), [
    (WEB_CLIENT, GIT_FIRST, SSH_PORT, "first"),  # another policy's client, same name and port
    (REPORT_CLIENT, GIT_FIRST, SSH_PORT, "first"),  # report mode opens no port
    (SSH_CLIENT, OTHER, SSH_PORT, "other"),  # another name, same port
    (SSH_CLIENT, GIT_FIRST, OTHER_PORT, "other_port"),  # the name, another port
], ids=["other-policy", "report-mode", "other-name", "other-port"])
def test_everything_else_stays_dropped_and_counted(topology: Topology, origins: dict[str, Any],
                                                   proxy: NamespacedProxy, source: str, address: str, port: int,
                                                   origin: str) -> None:
    refresh(topology, proxy)
    connections = origins[origin].connections
    dropped, flows = topology.counter("dropped"), topology.counter("port_flows")
    assert dial(topology, source, address, port, timeout=2) is None
    assert topology.counter("dropped") > dropped and topology.counter("port_flows") == flows
    assert origins[origin].connections == connections  # nothing reached it


def test_an_ipv6_client_reaches_the_names_ipv6_address(topology: Topology, origins: dict[str, Any],
                                                        proxy: NamespacedProxy) -> None:
    transaction = refresh(topology, proxy)
    assert f"add element inet egress_proxy ports_v6 {{ {SSH_CLIENT_V6}/128 . {GIT_V6} . {SSH_PORT} timeout " \
        in transaction
    flows = topology.counter("port_flows")
    assert dial(topology, SSH_CLIENT_V6, GIT_V6, SSH_PORT) == b"SSH-2.0-v6\r\n"
    origins["v6"].wait_for(f"hello from {SSH_CLIENT_V6}\n".encode())
    assert origins["v6"].peers == ["fd00:e0::1"]  # the router's own address: masqueraded
    assert topology.counter("port_flows") == flows + 1


def test_a_name_that_resolves_to_a_private_address_is_never_opened(
        topology: Topology, origins: dict[str, Any], proxy: NamespacedProxy) -> None:
    """internal.test is in the policy's ports, but its address is in the SSRF guard's ranges, as Squid's
    destination_not_public: the host opens nothing for it."""
    assert INTERNAL_V6 not in refresh(topology, proxy)
    dropped = topology.counter("dropped")
    assert dial(topology, SSH_CLIENT_V6, INTERNAL_V6, SSH_PORT, timeout=2) is None
    assert topology.counter("dropped") > dropped and origins["internal"].connections == 0


def test_the_hosts_ruleset_never_forwards_to_link_local_or_metadata_whatever_the_sets_hold(
        topology: Topology, origins: dict[str, Any], proxy: NamespacedProxy) -> None:
    """The host applies any transaction inside the ports grammar, and the container prints it: code that has taken
    over the container can add an element the refresh would never print (a client network, the metadata service's
    address, a port). The host's own ruleset, rendered outside the container, still never forwards a client to a
    link-local address: the instance's metadata service would answer with the instance's credentials."""
    element = f"add element inet egress_proxy ports_v4 {{ {SSH_CLIENT}/32 . {METADATA} . {SSH_PORT} timeout 60s }}"
    assert subprocess.run(["grep", "-Eq", PORT_SET_LINE], input=element, text=True).returncode == 0  # accepted
    topology.router.run("nft", "-f", "-", input=element + "\n")
    try:
        dropped, flows = topology.counter("dropped"), topology.counter("port_flows")
        assert dial(topology, SSH_CLIENT, METADATA, SSH_PORT, timeout=2) is None
        assert topology.counter("dropped") > dropped and topology.counter("port_flows") == flows
        assert origins["metadata"].connections == 0
    finally:
        refresh(topology, proxy)  # flushes the hostile element


@pytest.fixture(scope="module")
def git_daemon(topology: Topology, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real git server ('git daemon', git://) at git.test's first address, serving one repository; yields the
    repository's HEAD commit and the daemon's log (a 'Connection from ADDRESS:PORT' line per connection)."""
    base = tmp_path_factory.mktemp("git-daemon")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(base), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    repo = base / "repo.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "first"], check=True, env=env)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, env=env, capture_output=True,
                          text=True).stdout.strip()
    log = base / "daemon.log"
    with open(log, "w") as log_file:
        daemon = subprocess.Popen(topology.internet.command(
            ["git", "daemon", "--verbose", "--reuseaddr", "--export-all", f"--base-path={base}",
             f"--listen={GIT_FIRST}", f"--port={GIT_PORT}"]), env=env, stdout=subprocess.DEVNULL, stderr=log_file,
            start_new_session=True)
    try:
        with topology.internet.entered():
            wait_for_port(GIT_FIRST, GIT_PORT)  # that probe comes from the internet namespace itself
        yield head, log
    finally:
        # The whole group: 'git daemon' runs git-daemon as its child (and that forks one per connection), so
        # killing 'git' alone left git-daemon running, holding the namespace, after the tests.
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()


def test_a_real_git_client_uses_the_policys_port_and_another_policys_client_cannot(
        topology: Topology, origins: dict[str, Any], proxy: NamespacedProxy, git_daemon: tuple[str, Path]) -> None:
    """git ls-remote over git:// (tcp/9418), with no proxy setting: the policy's client lists the repository's
    HEAD; the other policy's client gets nothing (its connection is dropped, so git waits until 'timeout' ends
    it)."""
    head, log = git_daemon
    refresh(topology, proxy)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"}
    # A client address of the namespace is picked by the source it binds; git binds none, so the namespace's
    # first address (the ssh policy's client) is used; the other policy's client is asked through a source route.
    listed = topology.client.run("git", "ls-remote", f"git://{GIT_FIRST}:{GIT_PORT}/repo.git", env=env,
                                 timeout=30)
    assert f"{head}\tHEAD" in listed.stdout
    connections = [line for line in log.read_text().splitlines() if "Connection from" in line]
    assert [line for line in connections if f"Connection from {ROUTER_UPLINK}:" in line]  # masqueraded
    dropped = topology.counter("dropped")
    topology.client.run("ip", "route", "add", f"{GIT_FIRST}/32", "via", Topology.ROUTER_V4, "src", WEB_CLIENT)
    try:
        refused = topology.client.run("timeout", "5", "git", "ls-remote", f"git://{GIT_FIRST}:{GIT_PORT}/repo.git",
                                      env=env, check=False, timeout=30)
    finally:
        topology.client.run("ip", "route", "del", f"{GIT_FIRST}/32")
    assert refused.returncode == 124 and head not in refused.stdout
    assert topology.counter("dropped") > dropped
    assert [line for line in log.read_text().splitlines() if "Connection from" in line] == connections


def test_a_dns_move_is_followed_and_the_old_address_ages_out(
        topology: Topology, origins: dict[str, Any], proxy: NamespacedProxy) -> None:
    """The name moves to another address. Until the host refreshes, the new address is dropped; after a refresh it
    is open, and the old one stays open while a client may still hold the old answer (its TTL, at least the
    hold), then the kernel drops it from the set and the old address is dropped like any other."""
    refresh(topology, proxy)
    origins["dns"].set("git.test", [GIT_MOVED])
    try:
        # The client already has the new answer, the host has not refreshed yet: they disagree, and the
        # connection is dropped (counted), not let through to an address the host never resolved.
        dropped = topology.counter("dropped")
        assert dial(topology, SSH_CLIENT, GIT_MOVED, SSH_PORT, timeout=2) is None
        assert topology.counter("dropped") > dropped and origins["moved"].connections == 0
        transaction = refresh(topology, proxy)
        assert f". {GIT_MOVED} . {SSH_PORT} timeout " in transaction
        assert dial(topology, SSH_CLIENT, GIT_MOVED, SSH_PORT) == b"SSH-2.0-moved\r\n"
        assert origins["moved"].peers == [ROUTER_UPLINK]
        # A client that resolved before the move still holds the first address: it is still open.
        assert f". {GIT_FIRST} . {SSH_PORT} timeout " in transaction

        # Wait for the kernel to drop the old element (its timeout is the hold), then refresh: it stays out.
        for _ in range(HOLD_SECONDS * 20 + 300):
            if GIT_FIRST not in topology.port_set():
                break
            time.sleep(0.1)
        assert GIT_FIRST not in topology.port_set()
        assert GIT_FIRST not in refresh(topology, proxy)
        connections, dropped = origins["first"].connections, topology.counter("dropped")
        assert dial(topology, SSH_CLIENT, GIT_FIRST, SSH_PORT, timeout=2) is None
        assert topology.counter("dropped") > dropped and origins["first"].connections == connections
    finally:
        origins["dns"].set("git.test", [GIT_FIRST, GIT_V6])


def test_a_rejected_document_keeps_the_last_good_ports(topology: Topology, origins: dict[str, Any],
                                                       proxy: NamespacedProxy, public_tmp: Path) -> None:
    policy_file = public_tmp / "ports-policies.json"
    bad = json.loads(json.dumps(DOCUMENT))
    bad["policies"][0]["ports"] = ["git.test:443"]
    mark = proxy.mark()
    write_allowlist(policy_file, json.dumps(bad))
    record = proxy.wait_for(lambda r: r.get("event") == "reload_rejected", timeout=30, start=mark)
    assert "policies[0].ports[0]" in record["message"]
    try:
        assert f"{GIT_FIRST} . {SSH_PORT}" in refresh(topology, proxy)
        assert dial(topology, SSH_CLIENT, GIT_FIRST, SSH_PORT) == b"SSH-2.0-first\r\n"
    finally:
        mark = proxy.mark()
        write_allowlist(policy_file, json.dumps(DOCUMENT))
        proxy.wait_for(lambda r: r.get("event") in {"reloaded", "reload_skipped"}, timeout=30, start=mark)


def test_an_answer_with_the_longest_ttl_dns_allows_keeps_the_refresh_working(
        topology: Topology, origins: dict[str, Any], proxy: NamespacedProxy) -> None:
    """A listed name answered with TTL 2147483647 (RFC 2181's largest): nftables refuses an element timeout that
    long ('value too large'), and one such element would make the host refuse the whole refresh, at every run, so
    every policy's ports would age out. The address is kept at most a day, and the refresh still applies."""
    origins["dns"].ttl = 2**31 - 1
    try:
        transaction = refresh(topology, proxy)
        timeouts = [int(t) for t in re.findall(rf"\. {re.escape(GIT_FIRST)} \. {SSH_PORT} timeout (\d+)s", transaction)]
        assert timeouts and max(timeouts) <= 86400, transaction
        assert dial(topology, SSH_CLIENT, GIT_FIRST, SSH_PORT) == b"SSH-2.0-first\r\n"
    finally:
        origins["dns"].ttl = 1
        StatePaths(proxy.state_dir).port_addresses.unlink(missing_ok=True)  # forget the day-long address
        refresh(topology, proxy)
