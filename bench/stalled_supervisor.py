#!/usr/bin/env python3
"""Proxying while the supervisor reads nothing at all, and the access-log accounting afterwards. A script, not a
test.

The supervisor is stopped (SIGSTOP) while wrk sends plain-HTTP requests through the proxy on keep-alive
connections, then continued (SIGCONT). Each Squid worker writes its access lines to the supervisor over loopback
TCP from a bounded buffer of its own; with nobody reading, the kernel's socket buffers and then that buffer fill,
and the worker drops lines (never blocks) and says so in cache.log once it can write again. Printed: requests/s
before and during the stop, and whether every request served is either an access line on stdout or a counted
drop (the `log_lines_dropped` lines' access counts).

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/stalled_supervisor.py'
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients  # noqa: E402
from benchenv import ORIGIN_NAME, PROXY_PORT, Proxy, World, isolated  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class CountingProxy(Proxy):
    """The bench's proxy, keeping also the workers' own drop reports from the relayed cache.log lines."""

    squid_drops: list[str]

    def _read(self) -> None:
        assert self.process and self.process.stdout
        self.squid_drops = []
        for raw in self.process.stdout:
            if raw.startswith(b'{"type":"access"'):
                self.access_lines += 1
                continue
            record = json.loads(raw)
            if record.get("type") == "cache_log" and "dropping records" in record.get("message", ""):
                self.squid_drops.append(record["message"])
            if record.get("type") == "supervisor":
                with self._cond:
                    self.events.append(record)
                    self._cond.notify_all()


def squid_dropped(proxy: CountingProxy) -> int:
    return sum(int(message.split(" logger stops dropping records after ")[1].split(" ")[0])
               for message in proxy.squid_drops if " logger stops dropping records after " in message)


def dropped_access(proxy: Proxy) -> int:
    return sum(event.get("dropped_by_type", {}).get("access", 0) for event in proxy.events
               if event.get("event") == "log_lines_dropped")


def one_request() -> bool:
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x",
                             clients.proxy_url(PROXY_PORT), f"http://{ORIGIN_NAME}/small"],
                            capture_output=True, text=True, timeout=30, env=clients.CLEAN_ENV)
    return result.stdout == "200"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop-seconds", type=float, default=10.0)
    parser.add_argument("--name", default=f"{datetime.date.today()}-stalled-supervisor")
    args = parser.parse_args()
    if not isolated():
        print("run me in a private network namespace (see the docstring)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="egress-stalled-", dir="/tmp"))
    world = World(workdir).start()
    allowlist = workdir / "allowlist.txt"
    allowlist.write_text(f"{ORIGIN_NAME}\n")
    proxy = CountingProxy(workdir, allowlist, port=PROXY_PORT).start()
    try:
        before = clients.wrk(True, True, 5, 16)
        served = int(before["requests"])
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            during = clients.wrk(True, True, args.stop_seconds, 16)
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        served += int(during["requests"])
        # A worker reports its drops ("stops dropping records after N drops") when a later line fits again, and
        # the supervisor's drop report comes at most every 10 s: keep a request going until the books balance.
        deadline = time.monotonic() + 90
        settled = False
        while time.monotonic() < deadline:
            served += one_request()
            lines, dropped = proxy.access_lines, dropped_access(proxy)
            # wrk stops with up to 16 requests in flight: served by Squid (and logged), not counted by wrk.
            if served <= lines + dropped <= served + 32:
                settled = True
                break
            time.sleep(1)
        result = {"date": str(datetime.date.today()), "stop_seconds": args.stop_seconds,
                  "rps_before": before["rps"], "rps_while_supervisor_stopped": during["rps"],
                  "errors_while_stopped": during.get("errors", {}), "requests_served": served,
                  "access_lines_on_stdout": proxy.access_lines, "access_lines_counted_dropped": dropped_access(proxy),
                  "balanced": settled, "dropped_by_squid_workers": squid_dropped(proxy),
                  "squid_drop_lines": proxy.squid_drops,
                  "drop_reports": [event for event in proxy.events if event.get("event") == "log_lines_dropped"]}
    finally:
        proxy.stop()
        world.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in {"drop_reports", "squid_drop_lines"}}, indent=1))
    return 0 if settled else 1


if __name__ == "__main__":
    sys.exit(main())
