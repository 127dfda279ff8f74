"""The access log's path from Squid to stdout (real Squid, real supervisor, real clients): each worker writes its
lines over loopback TCP to the supervisor's listener. Only Squid's workers may write there, and a reconfigure,
which closes and reopens every worker's log connection, loses and repeats nothing."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ORIGIN_IP
from harness import DnsServer, HttpOrigin, write_allowlist
from log_reader import Record
from proxy_runner import ProxyRunner

from egress_proxy.access_log import FIELDS
from egress_proxy.squid_conf import StatePaths

PORT = 3178
SUFFIX = ".wild.test"  # the session DNS answers every name under it with the origin
BASE_ALLOWLIST = f"# access-log path tests\n{SUFFIX}\n"
RELOAD_WAIT = 30.0


@pytest.fixture(scope="module")
def allowlist_file(public_tmp: Path) -> Path:
    path = public_tmp / "logpath-allowlist.txt"
    path.write_text(BASE_ALLOWLIST)
    return path


@pytest.fixture(scope="module")
def proxy(public_tmp: Path, allowlist_file: Path, dns: DnsServer, http_origin: HttpOrigin) -> Iterator[ProxyRunner]:
    state = public_tmp / "state-logpath"
    state.mkdir(mode=0o755, exist_ok=True)
    runner = ProxyRunner(state, {"EGRESS_ALLOWLIST_FILE": str(allowlist_file), "EGRESS_DNS_SERVERS": "127.0.0.1",
                                 "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32",
                                 "EGRESS_CLIENT_CIDRS": "127.0.0.1/32"}, port=PORT)
    runner.start()
    yield runner
    runner.stop_and_check_no_restart()


def _get(proxy: ProxyRunner, host: str) -> int:
    """One request on a new connection; its status."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(f"http://{host}/", proxies=proxy.proxies, timeout=10,
                           headers={"Connection": "close"}).status_code


def _access_hosts(proxy: ProxyRunner, start: int, prefix: str) -> list[str]:
    return [str(record["host"]) for record in list(proxy.records)[start:]
            if record.get("type") == "access" and str(record.get("host", "")).startswith(prefix)]


def _listener_port(proxy: ProxyRunner) -> int:
    conf = StatePaths(proxy.state_dir).squid_conf.read_text()
    match = re.search(r"^access_log tcp://127\.0\.0\.1:(\d+) ", conf, re.MULTILINE)
    assert match, "squid.conf has no tcp: access log"
    return int(match.group(1))


def test_no_access_line_is_lost_or_repeated_across_reloads(proxy: ProxyRunner, allowlist_file: Path) -> None:
    """Requests on new connections, each to a name of its own, while five reloads close and reopen every worker's
    log connection: each request that got an answer has exactly one access line."""
    mark = proxy.mark()
    answered: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def client(name: str) -> None:
        n = 0
        while not stop.is_set():
            host = f"reload-{name}-{n}{SUFFIX}"
            n += 1
            try:
                _get(proxy, host)
            except requests.RequestException as exc:
                failed.append(f"{host}: {type(exc).__name__}")
                continue
            answered.append(host)

    threads = [threading.Thread(target=client, args=(name,), daemon=True) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    try:
        for i in range(5):
            before = len(answered)
            reload_mark = proxy.mark()
            write_allowlist(allowlist_file, BASE_ALLOWLIST + ("extra.test\n" if i % 2 == 0 else ""))
            record = proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=RELOAD_WAIT, start=reload_mark)
            assert record["confirmed"] is True, record
            # Requests went on across this reload (an observable count, not a sleep).
            proxy.wait_for(lambda _, before=before: len(answered) > before + 5, timeout=RELOAD_WAIT,
                           start=reload_mark)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
        write_allowlist(allowlist_file, BASE_ALLOWLIST)
    assert not failed, failed[:5]
    assert len(answered) > 30
    proxy.wait_for(lambda _: len(_access_hosts(proxy, mark, "reload-")) >= len(answered), timeout=RELOAD_WAIT,
                   start=mark)
    logged = Counter(_access_hosts(proxy, mark, "reload-"))
    assert sorted(logged) == sorted(answered)  # none lost
    assert set(logged.values()) == {1}, [host for host, count in logged.items() if count > 1][:5]  # none repeated


def test_a_forged_connection_to_the_access_log_listener_never_reaches_stdout(proxy: ProxyRunner) -> None:
    """A local process other than Squid connects to the listener and writes a well-formed access line (as Squid's
    logformat would): the connection is closed unread and reported, and the line never appears."""
    mark = proxy.mark()
    values = {"time": "1.000", "client_ip": "127.0.0.1", "client_port": "1", "method": "GET",
              "host": f"forged{SUFFIX}", "port": "80", "status": "200", "reason": "allowed", "squid_status": "TCP_MISS"}
    forged = "\t".join(values.get(field.name, "-") for field in FIELDS) + "\n"
    with socket.create_connection(("127.0.0.1", _listener_port(proxy)), timeout=10) as sock:
        try:
            sock.sendall(forged.encode() * 100)
            assert sock.recv(10) == b""  # the listener closed it
        except ConnectionResetError:  # ... with our bytes unread
            pass
    refused = proxy.wait_for(lambda r: r.get("event") == "access_log_connection_refused", start=mark)
    assert refused["level"] == "warning" and str(refused["peer"]).startswith("127.0.0.1:")
    # A real request after the forged one: once its line is out, the relay is past the forged bytes.
    assert _get(proxy, f"after-forged{SUFFIX}") == 200
    proxy.access(start=mark, host=f"after-forged{SUFFIX}")
    assert _access_hosts(proxy, mark, "forged") == []
    assert _access_hosts(proxy, mark, "after-forged") == [f"after-forged{SUFFIX}"]


def test_the_access_log_token_is_readable_only_by_squid(proxy: ProxyRunner) -> None:
    """The token every access line must carry is in squid.conf only: the file is its owner's alone, and the cache
    manager, which any local process may query, does not show the config (a protected action without a password)."""
    conf = StatePaths(proxy.state_dir).squid_conf
    assert conf.stat().st_mode & 0o077 == 0, oct(conf.stat().st_mode)
    match = re.search(r"^logformat egress ([0-9a-f]{32})-\$\{process_number\}\t", conf.read_text(), re.MULTILINE)
    assert match, "squid.conf has no tagged logformat"
    token = match.group(1)
    with requests.Session() as session:
        session.trust_env = False
        reply = session.get(f"http://127.0.0.1:{PORT}/squid-internal-mgr/config", timeout=10)
    assert reply.status_code != 200 and token not in reply.text, reply.status_code
    assert all(token not in str(record.get("message", "")) for record in list(proxy.records))


def test_each_worker_writes_over_its_own_connection(proxy: ProxyRunner) -> None:
    """No log_file_daemon process and no FIFO: the access log is a TCP connection from each worker (what the
    listener trusts), and traffic is logged."""
    mark = proxy.mark()
    assert _get(proxy, f"plain{SUFFIX}") == 200
    record: Record = proxy.access(start=mark, host=f"plain{SUFFIX}")
    assert record["status"] == 200
    assert not (proxy.state_dir / "logs" / "access.fifo").exists()
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in _squid_pids(proxy)}
    assert "log_file_daemon" not in names and "squid" in names


def _squid_pids(proxy: ProxyRunner) -> list[int]:
    started = proxy.wait_for(lambda r: r.get("event") == "started")
    master = int(started["pid"])
    pids = [master]
    for pid in pids:
        try:
            pids.extend(int(child) for child in
                        Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
        except OSError:
            continue
    return pids


def _coordinator_log_ports(proxy: ProxyRunner) -> set[int]:
    """The local ports of the sockets Squid's coordinator holds connected to the access-log listener."""
    master = int(proxy.wait_for(lambda r: r.get("event") == "started")["pid"])
    coordinators = [pid for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"(squid-coord-")]
    assert len(coordinators) == 1, coordinators
    held = set()
    for fd in Path(f"/proc/{coordinators[0]}/fd").iterdir():
        with contextlib.suppress(OSError):
            held.add(os.readlink(fd))
    listener = f"{_listener_port(proxy):04X}"
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2].endswith(f":{listener}") and f"socket:[{fields[9]}]" in held:
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


def _refused_ports(proxy: ProxyRunner) -> set[int]:
    return {int(str(record["peer"]).rsplit(":", 1)[1]) for record in list(proxy.records)
            if record.get("event") == "access_log_connection_refused"}


def _refuse_one(proxy: ProxyRunner) -> None:
    """A connection of our own, refused: once its warning is out, the listener has judged every connection that
    reached it before (it accepts in arrival order)."""
    mark = proxy.mark()
    with socket.create_connection(("127.0.0.1", _listener_port(proxy)), timeout=10) as sock:
        ours = f"127.0.0.1:{sock.getsockname()[1]}"
        proxy.wait_for(lambda r: r.get("event") == "access_log_connection_refused" and r.get("peer") == ours,
                       start=mark)


def test_squids_coordinator_is_not_reported_as_a_forger(proxy: ProxyRunner, allowlist_file: Path) -> None:
    """Squid's coordinator opens the access log too (it never writes a line): its connection, at start and after
    each reconfigure, is Squid's own and raises no access_log_connection_refused warning, which would cry wolf at
    every reload and bury a real forgery."""
    seen: set[int] = set()
    for i in range(2):
        if i:
            mark = proxy.mark()
            write_allowlist(allowlist_file, BASE_ALLOWLIST + "coordinator.test\n")
            proxy.wait_for(lambda r: r.get("event") == "reloaded", timeout=RELOAD_WAIT, start=mark)
            write_allowlist(allowlist_file, BASE_ALLOWLIST)
        # The coordinator has connected (after a reload: a connection of its new logger).
        deadline = time.monotonic() + RELOAD_WAIT
        while not (_coordinator_log_ports(proxy) - seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        ports = _coordinator_log_ports(proxy) - seen
        assert ports, "the coordinator holds no connection to the listener"
        _refuse_one(proxy)
        assert not ports & _refused_ports(proxy), "the coordinator's connection was refused"
        seen |= ports
