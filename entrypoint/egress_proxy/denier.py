"""The CONNECT refusal responder: a tiny loopback HTTP endpoint that answers every request with 403.

Why it exists: on an ssl-bump port, a CONNECT refused by ``http_access`` makes Squid 5 answer ``200`` and then
intercept the TLS with a forged certificate just to show its error page. We never intercept, so Squid judges
CONNECTs in ``ssl_bump`` step 1 instead. Refused ones are spliced to this responder as a cache_peer; Squid relays
the peer's ``403`` to the client. Clients then see ``CONNECT tunnel failed, response 403``, with the reason in an
``X-Egress-Reason`` header, instead of a dropped connection. Squid does not relay the body of a peer's refusal,
so the response has none.

The policy is decided in Squid (the reason note); this only answers. It runs in the supervisor, not in Squid,
because it must be listening before Squid probes its peers at startup and on every reconfigure.
"""

from __future__ import annotations

import contextlib
import re
import socket
import socketserver

from .access_log import REASONS
from .threads import named_thread

_REASON_HEADER = re.compile(rb"^x-egress-reason:[ \t]*([a-z_]+)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_POLICY_HEADER = re.compile(rb"^x-egress-policy:[ \t]*([a-z0-9][a-z0-9-]{0,31})[ \t]*$", re.IGNORECASE | re.MULTILINE)
# Squid appends its headers after the client's, and accepts up to request_header_max_size (64 KiB) of them: read
# the whole head, or a client could pad its headers until the proxy's reason falls past what is read.
_MAX_HEAD = 256 * 1024


# Not every refusal is a policy decision: an unreachable upstream proxy is an outage.
_STATUS = {"upstream_unavailable": "503 Service Unavailable", "log_unavailable": "503 Service Unavailable"}


def refusal(reason: str, policy: str | None = None) -> bytes:
    explanation = REASONS.get(reason, REASONS["denied"])
    policy_header = f"X-Egress-Policy: {policy}\r\n" if policy else ""
    return (
        f"HTTP/1.1 {_STATUS.get(reason, '403 Forbidden')}\r\n"
        f"X-Egress-Reason: {reason if reason in REASONS else 'denied'}\r\n"
        f"{policy_header}"
        f"X-Egress-Explanation: {explanation}\r\n"
        "Content-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def reason_from_head(head: bytes) -> str:
    match = _REASON_HEADER.search(head.replace(b"\r\n", b"\n"))
    return match.group(1).decode() if match else "denied"


def policy_from_head(head: bytes) -> str | None:
    """The judging policy's name (Squid adds the header; a client outside every policy has none)."""
    match = _POLICY_HEADER.search(head.replace(b"\r\n", b"\n"))
    return match.group(1).decode() if match else None


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                chunk = sock.recv(4096)
                if not chunk:
                    return  # Squid's peer probe: connect and close
                head += chunk
            sock.sendall(refusal(reason_from_head(head), policy_from_head(head)))
        except OSError:
            return


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class Denier:
    """Listens on 127.0.0.1 (an ephemeral port unless given) in a daemon thread. The thread sleeps until a connection
    arrives (socketserver's serve_forever would wake it twice a second to look for a shutdown); stop() wakes it with
    a connection of its own, which the handler takes for a probe."""

    def __init__(self, port: int = 0) -> None:
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.timeout = None  # handle_request() waits for a connection, however long
        self.port: int = self._server.server_address[1]
        self._stopping = False
        self._thread = named_thread(self._serve, "denier")

    def start(self) -> Denier:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping:
            self._server.handle_request()

    def stop(self) -> None:
        self._stopping = True
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            self._thread.join(5)
        self._server.server_close()
