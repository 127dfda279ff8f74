"""Live allowlist from a file: hot reload through ``squid -k reconfigure``, never a restart.

One proxy (its own port and state dir) whose allowlist file the tests rewrite. Each test leaves the file with
BASE_ALLOWLIST again. Waits are "within the poll interval plus a generous margin", never timings.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import INTERNAL_IP, ORIGIN_IP, RAW_IP
from connect_probe import ConnectProbe
from harness import (
    DnsServer,
    HttpOrigin,
    TestCA,
    TlsOrigin,
    _read_head,
    connect_tunnel,
    http_get_over,
    read_body,
    tls_over_tunnel,
    write_allowlist,
)
from harness import (
    client_session as session,
)
from log_reader import Record
from proxy_runner import ProxyRunner

PORT = 3129
PROXY = ("127.0.0.1", PORT)
FILE_INTERVAL = 1.0  # FileSource checks every second
MARGIN = 15.0  # generous: a loaded CI machine, Squid's reconfigure and helper restarts
BASE_ALLOWLIST = "# reload tests\nallowed.test\nkeep.wild.test\n"




def http_status(proxy: ProxyRunner, host: str, path: str = "/") -> int:
    with session() as client:
        return client.get(f"http://{host}{path}", proxies=proxy.proxies, timeout=10,
                          headers={"Connection": "close"}).status_code


@pytest.fixture(scope="module")
def allowlist_file(public_tmp: Path) -> Path:
    path = public_tmp / "reload-allowlist.txt"
    path.write_text(BASE_ALLOWLIST)
    return path


@pytest.fixture(scope="module")
def proxy(public_tmp: Path, allowlist_file: Path, dns: DnsServer, http_origin: HttpOrigin,
          tls_origin: TlsOrigin) -> Iterator[ProxyRunner]:
    runner = ProxyRunner(
        public_tmp / "state-reload",
        {
            "EGRESS_ALLOWLIST_FILE": str(allowlist_file),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32,{RAW_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
        },
        port=PORT,
    )
    runner.start()
    yield runner
    runner.stop_and_check_no_restart()  # one Squid for the whole module, however many reloads


def wait_event(proxy: ProxyRunner, name: str, mark: int, timeout: float = FILE_INTERVAL + MARGIN) -> Record:
    return proxy.wait_for(lambda r: r.get("type") == "supervisor" and r.get("event") == name, timeout=timeout,
                          start=mark)


def events_since(proxy: ProxyRunner, mark: int, name: str) -> list[Record]:
    return proxy.events(name, start=mark)


def poll_now_and_settle(proxy: ProxyRunner) -> None:
    """SIGHUP (poll the source now) and wait for its answer that nothing new is there: every edit made before
    this call has been seen and handled. An observable event instead of sleeping through a few polls."""
    mark = proxy.mark()
    proxy.signal(signal.SIGHUP)
    wait_event(proxy, "source_unchanged", mark)


def change(proxy: ProxyRunner, path: Path, text: str, timeout: float = FILE_INTERVAL + MARGIN) -> Record:
    """Write the allowlist and wait for the confirmed ``reloaded`` line."""
    mark = proxy.mark()
    write_allowlist(path, text)
    record = wait_event(proxy, "reloaded", mark, timeout)
    assert record["confirmed"] is True, record
    return record


@pytest.fixture()
def restore(proxy: ProxyRunner, allowlist_file: Path) -> Iterator[None]:
    yield
    if allowlist_file.read_text() != BASE_ALLOWLIST:
        mark = proxy.mark()
        write_allowlist(allowlist_file, BASE_ALLOWLIST)
        proxy.wait_for(lambda r: r.get("event") in {"reloaded", "reload_skipped"}, timeout=FILE_INTERVAL + MARGIN,
                       start=mark)


def status(proxy: ProxyRunner) -> dict[str, object]:
    data = json.loads((proxy.state_dir / "status.json").read_text())
    assert isinstance(data, dict)
    return data


# --- a change takes effect ------------------------------------------------------------------------------


def test_added_domain_passes_and_removed_domain_is_refused(proxy: ProxyRunner, allowlist_file: Path,
                                                           restore: None) -> None:
    assert http_status(proxy, "allowed.test") == 200
    assert http_status(proxy, "added.wild.test") == 403
    before = status(proxy)

    record = change(proxy, allowlist_file, "keep.wild.test\nadded.wild.test\n")

    assert record["added"] == 1 and record["removed"] == 1 and record["entries"] == 2
    assert record["version"].startswith("sha256:") and record["duration_ms"] > 0
    # Where the reload's time went: the build's parts, the write of the files, the workers' reconfigure.
    phases = record["phases_ms"]
    assert list(phases) == ["validate", "render", "parse_check", "write", "workers"]
    assert all(isinstance(ms, float) and ms >= 0 for ms in phases.values()) and phases["workers"] > 0
    assert http_status(proxy, "added.wild.test") == 200
    assert http_status(proxy, "allowed.test") == 403
    assert http_status(proxy, "keep.wild.test") == 200
    after = status(proxy)
    assert after["version"] == record["version"] and after["entries"] == 2
    assert after["reload_success"] == before["reload_success"] + 1  # type: ignore[operator]
    assert isinstance(after["config_age_seconds"], float) and after["config_age_seconds"] < 60


def test_https_follows_the_new_list(proxy: ProxyRunner, allowlist_file: Path, ca: TestCA,
                                    restore: None) -> None:
    def tunnel_status(host: str) -> int:
        try:
            sock, code, _ = connect_tunnel(PROXY, host, 443)
        except (ConnectionError, OSError, ValueError):
            return 0
        sock.close()
        return code

    assert tunnel_status("tls.wild.test") != 200
    change(proxy, allowlist_file, BASE_ALLOWLIST + "tls.wild.test\n")
    sock, code, _ = connect_tunnel(PROXY, "tls.wild.test", 443)
    assert code == 200
    with tls_over_tunnel(sock, "tls.wild.test", ca.ca_path) as tls:
        assert http_get_over(tls, "tls.wild.test", "/after-add")[0] == 200
    change(proxy, allowlist_file, BASE_ALLOWLIST)
    assert tunnel_status("tls.wild.test") != 200


# --- open connections survive reloads -----------------------------------------------------------------------


def get_with_head(sock: socket.socket, url: str, host: str) -> tuple[bytes, bytes]:
    """One keep-alive GET on an existing socket; returns (header block, body)."""
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode())
    head = _read_head(sock)
    return head, read_body(sock, head)


def test_no_new_connection_is_refused_across_reloads(proxy: ProxyRunner, allowlist_file: Path,
                                                    restore: None) -> None:
    """The README's headline: no new connection is refused during a reload. Probes connect and get an answer,
    back to back, while the allowlist changes several times (each reload confirmed before the next)."""
    with ConnectProbe(PROXY, "http://allowed.test/probe", "allowed.test") as probe:
        for index in range(5):
            before = probe.results()
            change(proxy, allowlist_file, BASE_ALLOWLIST + f"probe{index}.wild.test\n")
            assert probe.wait_for_result_after(before, timeout=MARGIN), f"the probe stalled: {probe.summary()}"
    print(f"connect probe across 5 reloads: {probe.summary()}")
    probe.assert_clean()


def test_a_connect_whose_checks_a_reload_cuts_short_is_refused_never_tunnelled(
        proxy: ProxyRunner, allowlist_file: Path, dns: DnsServer, restore: None) -> None:
    """Squid 5 drops an access check that is waiting (here for DNS, for the destination check) when a reconfigure
    replaces the rules, and applies the directive's default: for ssl_bump, splice. Without the guard this CONNECT
    to an allowed name on a forbidden address was tunnelled to it ("200 Connection established"). Now it fails
    closed: the denier's 403, reason sni_unchecked, and nothing reaches the address."""
    dns.set("held.wild.test", [INTERNAL_IP])  # allowlisted, but not an exempt destination
    change(proxy, allowlist_file, BASE_ALLOWLIST + "held.wild.test\n")
    with socket.create_server((INTERNAL_IP, 443)) as forbidden:
        with socket.create_connection(PROXY, timeout=30) as client:
            with dns.holding("held.wild.test") as asked:
                client.sendall(b"CONNECT held.wild.test:443 HTTP/1.1\r\nHost: held.wild.test:443\r\n\r\n")
                assert asked.wait(FILE_INTERVAL + MARGIN), "Squid never asked for the name"
                # The worker's destination check is waiting for this answer while it reconfigures.
                change(proxy, allowlist_file, BASE_ALLOWLIST + "held.wild.test\nother.wild.test\n")
            head = _read_head(client)
        dns.remove("held.wild.test")
        forbidden.setblocking(False)
        with pytest.raises(BlockingIOError):  # Squid connects before it answers 200, so a tunnel would be here
            forbidden.accept()
    assert head.startswith(b"HTTP/1.1 403") and b"X-Egress-Reason: sni_unchecked" in head, head


def test_open_tunnel_and_keepalive_connection_survive_five_reloads(
    proxy: ProxyRunner, allowlist_file: Path, ca: TestCA, tls_origin: TlsOrigin, http_origin: HttpOrigin,
    restore: None,
) -> None:
    # A spliced TLS tunnel, end to end with the origin (its certificate is verified against the test CA).
    raw, code, _ = connect_tunnel(PROXY, "allowed.test", 443, timeout=10)
    assert code == 200
    tls = tls_over_tunnel(raw, "allowed.test", ca.ca_path, timeout=10)
    assert http_get_over(tls, "allowed.test", "/tunnel-0")[0] == 200

    # A plain-HTTP keep-alive connection (absolute URLs on one client socket), idle across the reloads.
    keepalive = socket.create_connection(PROXY, timeout=10)
    head, body = get_with_head(keepalive, "http://allowed.test/keepalive-0", "allowed.test")
    assert head.startswith(b"HTTP/1.1 200") and b"keep-alive" in head.lower()

    versions = set()
    for i in range(1, 6):
        record = change(proxy, allowlist_file, BASE_ALLOWLIST + f"marker{i}.wild.test\n")
        versions.add(record["version"])
        # The tunnel carries data after every reload; no reconnect is possible on this socket.
        status_code, body = http_get_over(tls, "allowed.test", f"/tunnel-{i}")
        assert status_code == 200 and b"hello from tls-origin" in body
    assert len(versions) == 5

    # After five reloads in a row the idle keep-alive connection still carries a request and its response.
    head, body = get_with_head(keepalive, "http://allowed.test/keepalive-5", "allowed.test")
    assert head.startswith(b"HTTP/1.1 200") and b"hello from http-origin" in body
    # Squid 5 then retires a client connection accepted on a listening socket that a reconfigure replaced: the
    # response says "Connection: close" (a clean close that HTTP clients expect; nothing is reset or lost).
    assert b"connection: close" in head.lower()

    # Same TCP connections on the origin side throughout (same client port seen by the origins): the tunnel
    # is one connection, and Squid's pooled connection to the HTTP origin was reused after the reloads.
    tunnel_ports = {r["client"][1] for r in tls_origin.requests if str(r["path"]).startswith("/tunnel-")}
    assert len(tunnel_ports) == 1
    keepalive_ports = {r["client"][1] for r in http_origin.requests if str(r["path"]).startswith("/keepalive-")}
    assert len(keepalive_ports) == 1, keepalive_ports
    tls.close()
    keepalive.close()


def test_open_stream_keeps_flowing_during_reloads(proxy: ProxyRunner, allowlist_file: Path,
                                                  restore: None) -> None:
    # A response that is still streaming (one line every 0.2 s for 6 s) while the allowlist changes twice.
    sock = socket.create_connection(PROXY, timeout=10)
    sock.sendall(b"GET http://allowed.test/stream/6 HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    change(proxy, allowlist_file, BASE_ALLOWLIST + "stream1.wild.test\n")
    change(proxy, allowlist_file, BASE_ALLOWLIST + "stream2.wild.test\n")
    data = first
    while not data.endswith(b"tick %06d\n" % 29):
        chunk = sock.recv(65536)
        assert chunk, f"stream cut after {len(data)} bytes"
        data += chunk
    sock.close()


# --- nothing happens when nothing changed ------------------------------------------------------------------


def test_comment_only_edit_does_not_reconfigure(proxy: ProxyRunner, allowlist_file: Path,
                                                restore: None) -> None:
    active = status(proxy)["version"]
    mark = proxy.mark()
    # Comments, blank lines, case, order, a duplicate and an overlap: the same policy, the same squid.conf.
    write_allowlist(allowlist_file, "# edited\n\nKEEP.wild.test\n  allowed.test  # the origin\nallowed.test.\n")
    skipped = wait_event(proxy, "reload_skipped", mark)
    assert skipped["version"] != active
    poll_now_and_settle(proxy)  # one more poll: nothing else may happen
    assert events_since(proxy, mark, "reloaded") == []
    assert not [r for r in proxy.records[mark:] if r.get("type") == "cache_log" and "Reconfiguring" in r["message"]]
    assert http_status(proxy, "allowed.test") == 200


def test_touch_without_change_does_nothing(proxy: ProxyRunner, allowlist_file: Path) -> None:
    mark = proxy.mark()
    allowlist_file.touch()
    poll_now_and_settle(proxy)
    quiet = {"hup", "source_unchanged"}  # the settle's own two lines
    assert [r for r in proxy.records[mark:] if r.get("type") == "supervisor" and r.get("event") not in quiet] == []


# --- bad values keep the last good config -----------------------------------------------------------------------

BAD_VALUES = {
    "invalid_entry": ("allowed.test\nbad.wild.test\nhttps://evil.test/path\n", "https://evil.test/path"),
    "ip_literal": ("allowed.test\nbad.wild.test\n10.0.0.1\n", "10.0.0.1"),
    "public_suffix": ("allowed.test\nbad.wild.test\n.com\n", ".com"),
    "invalid_json": ('{"allowed_domains": ["allowed.test", "bad.wild.test"', "not valid JSON"),
    "json_non_string": ('{"allowed_domains": ["allowed.test", "bad.wild.test", 42]}', "42"),
}


@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_bad_value_is_rejected_and_old_list_stays_enforced(proxy: ProxyRunner, allowlist_file: Path, kind: str,
                                                           restore: None) -> None:
    text, named = BAD_VALUES[kind]
    before = status(proxy)
    mark = proxy.mark()
    write_allowlist(allowlist_file, text)
    record = wait_event(proxy, "reload_rejected", mark)
    assert record["level"] == "error"
    assert named in record["message"], record["message"]
    assert record["active_version"] == before["version"]
    assert "keeps serving" in record["message"]
    # The old list is still enforced: its entries pass, the bad update's good entries do not.
    assert http_status(proxy, "keep.wild.test") == 200
    assert http_status(proxy, "bad.wild.test") == 403
    after = status(proxy)
    assert after["version"] == before["version"]
    assert after["reload_failure"] == before["reload_failure"] + 1  # type: ignore[operator]
    assert after["rejected_version"] == record["version"]
    poll_now_and_settle(proxy)
    assert len(events_since(proxy, mark, "reload_rejected")) == 1, "the same bad value is reported once"
    assert events_since(proxy, mark, "reloaded") == []


def test_oversized_file_is_rejected(proxy: ProxyRunner, allowlist_file: Path, restore: None) -> None:
    mark = proxy.mark()
    line = "x" * 60 + ".wild.test\n"
    write_allowlist(allowlist_file, "allowed.test\n" + line * (9 * 1024 * 1024 // len(line)))
    record = wait_event(proxy, "reload_rejected", mark)
    assert "MiB limit" in record["message"], record["message"]
    assert http_status(proxy, "keep.wild.test") == 200


def test_bad_value_then_fixed_value_is_applied(proxy: ProxyRunner, allowlist_file: Path, restore: None) -> None:
    mark = proxy.mark()
    write_allowlist(allowlist_file, BASE_ALLOWLIST + "fixed.wild.test\nhttp://\n")
    wait_event(proxy, "reload_rejected", mark)
    record = change(proxy, allowlist_file, BASE_ALLOWLIST + "fixed.wild.test\n")
    assert record["added"] == 1 and record["removed"] == 0
    assert http_status(proxy, "fixed.wild.test") == 200
    assert status(proxy)["rejected_version"] is None


def test_missing_file_keeps_serving_and_recovers(proxy: ProxyRunner, allowlist_file: Path,
                                                 restore: None) -> None:
    mark = proxy.mark()
    allowlist_file.unlink()
    record = wait_event(proxy, "source_unavailable", mark)
    assert str(allowlist_file) in record["message"]
    assert http_status(proxy, "allowed.test") == 200
    change(proxy, allowlist_file, BASE_ALLOWLIST + "back.wild.test\n", timeout=FILE_INTERVAL + 8 + MARGIN)
    wait_event(proxy, "source_available", mark)
    assert http_status(proxy, "back.wild.test") == 200


# --- size ---------------------------------------------------------------------------------------------------------


def test_file_of_100k_entries_is_applied(proxy: ProxyRunner, allowlist_file: Path, restore: None) -> None:
    entries = [f"h{i}.bulk.wild.test" for i in range(100_000)]
    record = change(proxy, allowlist_file, BASE_ALLOWLIST + "\n".join(entries) + "\n", timeout=120)
    assert record["entries"] == 100_002 and record["added"] == 100_000
    assert http_status(proxy, "h99999.bulk.wild.test") == 200
    assert http_status(proxy, "h100000.bulk.wild.test") == 403
    # And back: removing them is a reload like any other.
    record = change(proxy, allowlist_file, BASE_ALLOWLIST, timeout=120)
    assert record["removed"] == 100_000
    assert http_status(proxy, "h5.bulk.wild.test") == 403
