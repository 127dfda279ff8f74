"""Squid external ACL helper: does the upstream proxy (EGRESS_UPSTREAM_PROXY) accept TCP connections now?

Squid runs this file (copied into the state dir) as ``python3 -I upstream_probe.py HOST PORT`` and asks it, for
every allowed request that would leave through the upstream, before anything is sent anywhere. It answers
``<channel-id> OK`` when a TCP connection to HOST:PORT opens within a second, else ``<channel-id> ERR``. Squid
caches the answer (``ttl=1``/``negative_ttl=1`` in squid.conf, counted in whole seconds: one to two seconds), so a
busy proxy probes about once a second per worker, not once per request, and a request sent two seconds into an
outage is refused with ``upstream_unavailable``. One that slips through earlier fails as Squid's own error, which
the access log names ``forward_failed``.

Why the proxy asks before forwarding: an allowed CONNECT is answered ``200`` at ssl_bump step 1, before Squid
looks for a way to the destination (it must read the ClientHello first). If the upstream were found dead only
then, the client would see its tunnel close with no explanation. Asked at step 1, a dead upstream turns the
CONNECT into a refusal that the loopback responder (denier.py) answers ``503`` with ``X-Egress-Reason:
upstream_unavailable``, and a plain-HTTP request into the same ``503`` page.

Standard library only, and self-contained: it runs under any python3 as Squid's unprivileged user.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

CONNECT_TIMEOUT = 1.0


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Prober:
    """Answers Squid's lookups and reports each change of the upstream's state on stderr, which Squid writes to
    its cache.log (the supervisor relays that as ``cache_log`` lines). It starts out assuming the upstream is up,
    so a healthy upstream logs nothing."""

    def __init__(self, host: str, port: int, probe: Callable[[str, int], bool] = reachable) -> None:
        self.host = host
        self.port = port
        self.probe = probe
        self.up = True

    def answer(self, line: str) -> str:
        channel = line.strip().partition(" ")[0]
        up = self.probe(self.host, self.port)
        if up != self.up:
            self.up = up
            state = "accepts connections again" if up else "is not accepting connections"
            print(f"upstream_probe: the upstream proxy {self.host}:{self.port} {state}", file=sys.stderr,
                  flush=True)
        return f"{channel} {'OK' if up else 'ERR'}"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: upstream_probe.py HOST PORT", file=sys.stderr)
        return 2
    prober = Prober(argv[1], int(argv[2]))
    for line in sys.stdin:
        sys.stdout.write(prober.answer(line) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
