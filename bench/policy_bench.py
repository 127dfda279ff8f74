"""Inputs and probes for bench.py's ``policies`` (issue 14) and ``sni`` (issue 12) sections: policy documents of a
given shape, the background load of the shared machine, and the SNI helper's own cost measured over a pipe."""

from __future__ import annotations

import base64
import json
import os
import ssl
import statistics
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import benchenv
from benchenv import ORIGIN_NAME
from clients import percentile

POLICY_COUNT = 50
ENTRIES_PER_POLICY = 1_000
# Policy i holds 127.0.(100+i).0/24 and nothing else, so this address is held by the last policy only: every
# policy's rules before it are evaluated and skipped, the worst case for a request.
LAST_POLICY_CLIENT = f"127.0.{100 + POLICY_COUNT - 1}.1"
# An older checkout to run beside this one in the sni section, only when named (e.g. commit dc871fe, the awk SNI
# helper cached per SNI, from before the strict ClientHello check).
OLD_TREE = Path(os.environ["EGRESS_BENCH_OLD_TREE"]) if os.environ.get("EGRESS_BENCH_OLD_TREE") else None


def policy_name(index: int) -> str:
    return f"team-{index:02d}"


def policy_entries(index: int, count: int, generation: int) -> list[str]:
    """``count`` entries: the bench origin, then half wildcard domains and half exact hosts, all distinct (nothing
    collapses), named after the policy and ``generation`` so that each write is a real change."""
    entries = [ORIGIN_NAME]
    for i in range(count - 1):
        if i % 2:
            entries.append(f".tenant{i}-p{index}-g{generation}.wild-bench.net")
        else:
            entries.append(f"api{i}.svc-p{index}-g{generation}.exact-bench.org")
    return entries


def document_text(indices: range, entries: int, generation: int) -> str:
    """A policy document with the policies ``indices`` (policy i: clients 127.0.(100+i).0/24, ``entries`` allow
    entries, mode enforce). ``range(49, 50)`` is the last policy of the 50 alone: the same client, the same list."""
    policies = [{"name": policy_name(i), "clients": [f"127.0.{100 + i}.0/24"],
                 "allow": policy_entries(i, entries, generation)} for i in indices]
    return json.dumps({"policies": policies}, indent=1) + "\n"


def background_busy(seconds: float = 3.0) -> float:
    """Percent of all cores busy while this bench does nothing (its proxies idle): other people's work."""
    before = benchenv.machine_busy()
    time.sleep(seconds)
    after = benchenv.machine_busy()
    return round(100 * (after[0] - before[0]) / max(1.0, after[1] - before[1]), 1)


def loadavg() -> list[float]:
    with open("/proc/loadavg") as handle:
        return [float(v) for v in handle.read().split()[:3]]


def client_hello(cacert: str, server_name: str = ORIGIN_NAME) -> bytes:
    """The TLS records of a real ClientHello: the one this Python client (OpenSSL) sends to the origin."""
    context = ssl.create_default_context(cafile=cacert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def helper_cost(state_dir: Path, policy: str, hello: bytes, lookups: int, batch: int = 64) -> dict[str, Any]:
    """The SNI helper's own cost, without Squid: the helper a running proxy's squid.conf names (compiled or
    Python), on its real lists, started with that command line, asked over a pipe with Squid's line format.

    - ``startup_ms``: start to first answer (Python start plus loading every policy's lists; Squid restarts the
      helper on every reconfigure);
    - ``sequential_us``: one lookup at a time, request to answer (what one new connection waits for);
    - ``pipelined_us_per_lookup``: ``batch`` lookups in flight (squid.conf's concurrency), wall time per lookup
      (what the helper costs in CPU at full load)."""
    handshake = urllib.parse.quote(base64.b64encode(hello).decode(), safe="")
    policy_dir = state_dir / "conf" / "policies"
    command = sni_helper_command(state_dir)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    assert process.stdin and process.stdout
    try:
        process.stdin.write(f"0 {handshake} {policy}\n")
        process.stdin.flush()
        first = process.stdout.readline().strip()
        startup_ms = (time.perf_counter() - started) * 1000
        if first != "0 OK":
            raise RuntimeError(f"the SNI helper answered {first!r} for an allowlisted ClientHello")
        sequential: list[float] = []
        for i in range(lookups):
            line = f"{i % batch} {handshake} {policy}\n"
            t0 = time.perf_counter()
            process.stdin.write(line)
            process.stdin.flush()
            process.stdout.readline()
            sequential.append((time.perf_counter() - t0) * 1e6)
        block = "".join(f"{i} {handshake} {policy}\n" for i in range(batch))
        rounds = max(1, lookups // batch)
        t0 = time.perf_counter()
        for _ in range(rounds):
            process.stdin.write(block)
            process.stdin.flush()
            for _ in range(batch):
                process.stdout.readline()
        pipelined = (time.perf_counter() - t0) * 1e6 / (rounds * batch)
    finally:
        process.stdin.close()
        process.wait(timeout=10)
    # The helper loads every list file in the directory, also those of policies the active config no longer has
    # (the supervisor writes lists but does not delete old ones): say how many entries that is.
    conf = (state_dir / "conf" / "squid.conf").read_text()
    active = {line.split()[1].removeprefix("policy_") for line in conf.splitlines()
              if line.startswith("acl policy_") and line.split()[2] == "src"}
    entries = {path.name: len(path.read_text().splitlines()) for path in policy_dir.iterdir()}
    return {"policy": policy, "helper": " ".join(command[:-1]), "lists_entries": sum(entries.values()),
            "stale_lists_entries": sum(n for name, n in entries.items() if name.rpartition(".")[0] not in active),
            "hello_bytes": len(hello), "startup_ms": round(startup_ms, 1),
            "sequential_us": {"n": lookups, "p50": round(percentile(sequential, 50), 1),
                              "p90": round(percentile(sequential, 90), 1),
                              "mean": round(statistics.fmean(sequential), 1)},
            "pipelined_us_per_lookup": round(pipelined, 1), "batch": batch}


def sni_helper_command(state_dir: Path) -> list[str]:
    """The SNI helper's command line in a running proxy's squid.conf (the compiled helper or sni_helper.py)."""
    conf = (state_dir / "conf" / "squid.conf").read_text()
    [line] = [line for line in conf.splitlines() if line.startswith("external_acl_type sni_check ")]
    return line.split(" %{policy}note ", 1)[1].split()
