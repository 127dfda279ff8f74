"""A small recording HTTP proxy for the upstream-proxy tests: CONNECT tunnels and absolute-form requests.

It resolves names with the test DNS server's table (never the system resolver), records every request it receives
(method, target, Proxy-Authorization, header lines) before forwarding, and can demand Basic credentials (407 otherwise).
``stop()`` closes the listening socket (an outage: connections are refused); ``start()`` listens again on the
same port.
"""

from __future__ import annotations

import base64
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Forwarded:
    method: str
    target: str  # host:port for CONNECT, the absolute URL otherwise
    proxy_authorization: str | None
    header_lines: tuple[str, ...] = ()  # every header line as received, in order (duplicates kept)


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the request head")
        head += chunk
        if len(head) > _MAX_HEAD:
            raise ConnectionError("request head too large")
    return head


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (sink, source):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(client: socket.socket, server: socket.socket, pending: bytes) -> None:
    if pending:
        server.sendall(pending)
    other = threading.Thread(target=_pipe, args=(server, client), daemon=True)
    other.start()
    _pipe(client, server)
    other.join(timeout=30)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(30)
        try:
            head = _read_head(client)
        except (ConnectionError, OSError):
            return
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        owner = self.server.owner
        auth = headers.get("proxy-authorization")
        owner.record(Forwarded(method, target, auth, tuple(lines[1:])))
        if owner.expected_auth is not None and auth != owner.expected_auth:
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=t\r\n"
                           b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            address = owner.resolve(host)
            if address is None:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            with socket.create_connection((address, int(port)), timeout=10) as server:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _relay(client, server, rest)
            return
        url = urllib.parse.urlsplit(target)
        address = owner.resolve(url.hostname or "")
        if address is None:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        kept = [line for line in lines[1:] if line.partition(":")[0].strip().lower()
                not in {"proxy-authorization", "proxy-connection", "connection"}]
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"]) + "\r\n\r\n"
        with socket.create_connection((address, url.port or 80), timeout=10) as server:
            _relay(client, server, request.encode("latin-1") + rest)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: RecordingProxy) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class RecordingProxy:
    def __init__(self, host: str, port: int, resolve: Callable[[str], str | None],
                 credentials: str | None = None) -> None:
        self.host = host
        self.port = port
        self.resolve = resolve
        self.expected_auth = ("Basic " + base64.b64encode(credentials.encode()).decode()) if credentials else None
        self._lock = threading.Lock()
        self._forwarded: list[Forwarded] = []
        self._server: _Server | None = None

    @property
    def forwarded(self) -> list[Forwarded]:
        with self._lock:
            return list(self._forwarded)

    def record(self, entry: Forwarded) -> None:
        with self._lock:
            self._forwarded.append(entry)

    def start(self) -> RecordingProxy:
        self._server = _Server((self.host, self.port), self)
        threading.Thread(target=self._server.serve_forever, name="upstream-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
