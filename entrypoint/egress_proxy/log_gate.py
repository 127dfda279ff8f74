"""Squid external ACL helper for EGRESS_LOG_FULL=refuse ("no log, no traffic"): are log lines being written now?

Squid runs this file (copied into the state dir) as ``python3 -I log_gate.py FLAG`` and asks it before every new
request. It answers ``<channel-id> OK`` ("refuse it") while the file FLAG exists, else ``<channel-id> ERR``. The
supervisor creates FLAG while stdout does not take log lines (its bounded buffer is full, or one write has been
stuck for a second) and removes it once lines flow again. Squid caches the answer for a second (``ttl`` in
squid.conf), so this costs one ``stat`` per second per worker, not one per request.

Standard library only, and self-contained: it runs under any python3 as Squid's unprivileged user.
"""

from __future__ import annotations

import os
import sys


def answer(line: str, flag: str) -> str:
    channel = line.strip().partition(" ")[0]
    return f"{channel} {'OK' if os.path.exists(flag) else 'ERR'}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: log_gate.py FLAG", file=sys.stderr)
        return 2
    for line in sys.stdin:
        sys.stdout.write(answer(line, argv[1]) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
