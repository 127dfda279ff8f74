#!/usr/bin/env python3
"""Requests served while the log sink is stalled. A script, not a test.

The proxy's stdout is a pipe (as under a container log driver); after a warm-up the reader stops reading for
``--stall`` seconds (awslogs in blocking mode waiting on a slow or throttled CloudWatch Logs), then reads again.
Client threads send plain-HTTP GETs on keep-alive sessions through the proxy the whole time. Printed: requests
served per 5 s window before, during and after the stall, the same load straight to the origin (no proxy) for the
ratio, and how many log lines arrived or were reported dropped.

``--tree DIR`` runs the supervisor from another checkout's ``entrypoint`` (e.g. the code before the bounded log
buffer: ``git archive <commit> entrypoint | tar -x -C DIR``). Loopback only, as root, in a fresh network namespace:

    unshare --net -- sh -c 'ip link set lo up && exec .venv/bin/python bench/stalled_sink.py --name after'

Writes bench/results/<date>-stalled-sink-<name>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from harness import DnsServer, HttpOrigin, RequestLoad, wait_for_port  # noqa: E402

ORIGIN_IP = "127.0.0.2"
PORT = 3128
WINDOW = 5.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="run the supervisor from DIR/entrypoint")
    parser.add_argument("--name", default="run")
    parser.add_argument("--stall", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--buffer-lines", type=int, help="EGRESS_LOG_BUFFER_LINES (default: the proxy's)")
    args = parser.parse_args()

    dns = DnsServer({"allowed.test": [ORIGIN_IP]}, host="127.0.0.1", port=53)
    dns.start()
    origin = HttpOrigin(ORIGIN_IP, 80, name="origin")
    origin.__enter__()
    state = Path(tempfile.mkdtemp(prefix="stalled-sink-"))
    state.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_") and "proxy" not in k.lower()}
    env.update({"EGRESS_STATE_DIR": str(state), "EGRESS_LISTEN_ADDRESS": "127.0.0.1", "EGRESS_PORT": str(PORT),
                "EGRESS_METRICS": "off", "EGRESS_ALLOWED_DOMAINS": "allowed.test", "EGRESS_DNS_SERVERS": "127.0.0.1",
                "EGRESS_ALLOW_DESTINATIONS": f"{ORIGIN_IP}/32", "EGRESS_DRAIN_SECONDS": "1"})
    if args.tree:
        env["PYTHONPATH"] = str(args.tree / "entrypoint")
    if args.buffer_lines:
        env["EGRESS_LOG_BUFFER_LINES"] = str(args.buffer_lines)
    proxy = subprocess.Popen([sys.executable, "-m", "egress_proxy.cli", "run"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    assert proxy.stdout is not None
    reading = threading.Event()
    reading.set()
    lines: list[dict[str, object]] = []
    started = threading.Event()

    def read() -> None:
        assert proxy.stdout is not None
        while True:
            reading.wait()
            line = proxy.stdout.readline()
            if not line:
                return
            try:
                record = json.loads(line)
            except ValueError:
                continue
            lines.append(record)
            if record.get("event") == "started":
                started.set()

    threading.Thread(target=read, daemon=True).start()
    result: dict[str, object] = {"name": args.name, "tree": str(args.tree or ROOT), "stall_seconds": args.stall,
                                 "buffer_lines": args.buffer_lines,
                                 "threads": args.threads, "window_seconds": WINDOW}
    try:
        if not started.wait(90):
            raise SystemExit("the proxy did not start")
        wait_for_port("127.0.0.1", PORT)
        # Direct: the origin by address (the bench's names resolve only through its own DNS server, for Squid).
        with RequestLoad(f"http://{ORIGIN_IP}/", threads=args.threads, timeout=60) as direct:
            result["direct"] = direct.windows(10, WINDOW)
        proxies = {"http": f"http://127.0.0.1:{PORT}"}
        with RequestLoad("http://allowed.test/", proxies, threads=args.threads, timeout=60) as load:
            result["unstalled"] = load.windows(10, WINDOW)
            reading.clear()
            result["stalled"] = load.windows(args.stall, WINDOW)
            reading.set()
            result["recovered"] = load.windows(10, WINDOW)
        result["proxied_ok"], result["proxied_failed"] = load.ok, len(load.failed)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            access = sum(1 for r in lines if r.get("type") == "access")
            dropped = sum(int(r.get("dropped_by_type", {}).get("access", 0))  # type: ignore[union-attr]
                          for r in lines if r.get("event") == "log_lines_dropped")
            if access + dropped >= load.ok + len(load.failed):
                break
            time.sleep(0.5)
        result["access_lines"], result["access_lines_dropped"] = access, dropped
    finally:
        reading.set()
        proxy.terminate()
        proxy.wait(60)
        origin.__exit__(None, None, None)
        dns.stop()
    per_second = {key: [round(count / WINDOW, 1) for count in result[key]]  # type: ignore[attr-defined]
                  for key in ("direct", "unstalled", "stalled", "recovered")}
    result["per_second"] = per_second
    direct_rate = sum(result["direct"]) / 10  # type: ignore[arg-type]
    stalled_rate = sum(result["stalled"]) / args.stall  # type: ignore[arg-type]
    unstalled_rate = sum(result["unstalled"]) / 10  # type: ignore[arg-type]
    result["ratios"] = {"unstalled_vs_direct": round(unstalled_rate / direct_rate, 3),
                        "stalled_vs_direct": round(stalled_rate / direct_rate, 3),
                        "stalled_vs_unstalled": round(stalled_rate / unstalled_rate, 3) if unstalled_rate else None}
    out = ROOT / "bench" / "results" / f"{datetime.date.today()}-stalled-sink-{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
