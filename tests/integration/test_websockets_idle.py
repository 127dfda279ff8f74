"""WebSockets through the proxy and the idle limits, with real clients and servers on loopback.

A real WebSocket server (the ``websockets`` library) on 127.0.0.21:80 (and :443 with TLS) and a real client
(aiohttp) that sends the handshake to the proxy as ``GET http://host/path`` with ``Upgrade: websocket``; wss://
goes through CONNECT with the ``websockets`` client. Two other client behaviours are pinned down too, because the
docs/operations.md tells users about them: aiohttp given a ``ws://`` URL sends ``GET ws://host/path``, a scheme Squid 5
rejects (400); the ``websockets`` client tunnels ``ws://`` with ``CONNECT host:80``, which the proxy refuses
(``port_not_allowed``).
This module's proxy sets both idle limits to 2 seconds, so the tests can watch it close idle connections; they wait
for the close itself (an observable event), never for a time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import DnsServer, TestCA, free_port
from proxy_runner import ProxyRunner
from websockets.exceptions import InvalidProxyStatus
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import Server, ServerConnection, serve

WS_IP = "127.0.0.21"  # no other module uses it (test_access_truth has .5, policies .10-.12)
IDLE_SECONDS = 2
ALLOWLIST = "ws.test\n"


class WebSocketOrigin:
    """An echo WebSocket server that records every handshake it accepted and every connection's end."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.handshakes: list[dict[str, str]] = []
        self.closed = threading.Event()
        self._server: Server = serve(self._handle, host, port, ssl=tls)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ws-origin", daemon=True)

    def _handle(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        self.handshakes.append({"path": connection.request.path, **dict(connection.request.headers.raw_items())})
        try:
            for message in connection:
                connection.send(message)
        finally:
            self.closed.set()

    def start(self) -> WebSocketOrigin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def ws_origin(dns: DnsServer) -> Iterator[WebSocketOrigin]:
    dns.set("ws.test", [WS_IP])
    dns.set("notws.test", [WS_IP])  # the same server, but not on the allowlist
    origin = WebSocketOrigin(WS_IP, 80).start()
    yield origin
    origin.stop()
    dns.remove("ws.test")
    dns.remove("notws.test")


@pytest.fixture(scope="module")
def wss_origin(ws_origin: WebSocketOrigin, ca: TestCA) -> Iterator[WebSocketOrigin]:
    """The same echo server with TLS on 443 (a certificate for ws.test from the test CA)."""
    chain, key = ca.issue(["ws.test"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    origin = WebSocketOrigin(WS_IP, 443, tls=context).start()
    yield origin
    origin.stop()


@pytest.fixture(scope="module")
def ws_proxy(public_tmp: Path, ws_origin: WebSocketOrigin) -> Iterator[ProxyRunner]:
    allowlist = public_tmp / "ws-allowlist.txt"
    allowlist.write_text(ALLOWLIST)
    runner = ProxyRunner(
        public_tmp / "ws-state",
        {
            "EGRESS_ALLOWLIST_FILE": str(allowlist),
            "EGRESS_DNS_SERVERS": "127.0.0.1",
            "EGRESS_ALLOW_DESTINATIONS": f"{WS_IP}/32",
            "EGRESS_CLIENT_CIDRS": "127.0.0.1/32",
            "EGRESS_TUNNEL_IDLE_TIMEOUT": str(IDLE_SECONDS),
            "EGRESS_CLIENT_IDLE_TIMEOUT": str(IDLE_SECONDS),
        },
        port=free_port(),
    )
    runner.start()
    yield runner
    runner.stop()


async def _echo(proxy_url: str, url: str, messages: list[str]) -> list[str]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.ws_connect(url, proxy=proxy_url, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
            replies = []
            for message in messages:
                await ws.send_str(message)
                reply = await asyncio.wait_for(ws.receive(), timeout=10)
                assert reply.type == aiohttp.WSMsgType.TEXT, reply
                replies.append(reply.data)
            return replies


async def _handshake_status(proxy_url: str, url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        try:
            async with session.ws_connect(url, proxy=proxy_url):
                pass
        except aiohttp.WSServerHandshakeError as error:
            return error.status, dict(error.headers or {})
    raise AssertionError("the handshake succeeded")


async def _silent_until_closed(proxy_url: str, url: str) -> aiohttp.WSMessage:
    """Connect, say one thing, then stay silent: the next message is the close the proxy causes."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.ws_connect(url, proxy=proxy_url, autoping=False, heartbeat=None) as ws:
            await ws.send_str("hello")
            assert (await asyncio.wait_for(ws.receive(), timeout=10)).data == "hello"
            return await asyncio.wait_for(ws.receive(), timeout=30)


def test_websocket_upgrade_to_an_allowlisted_host(ws_proxy: ProxyRunner, ws_origin: WebSocketOrigin) -> None:
    before = len(ws_origin.handshakes)
    mark = ws_proxy.mark()
    replies = asyncio.run(_echo(ws_proxy.proxy_url, "http://ws.test/echo", ["one", "two", "three"]))
    assert replies == ["one", "two", "three"]
    assert len(ws_origin.handshakes) == before + 1
    handshake = ws_origin.handshakes[-1]
    assert handshake["path"] == "/echo" and handshake["Upgrade"].lower() == "websocket"
    line = ws_proxy.wait_for(lambda r: r.get("type") == "access" and r.get("host") == "ws.test", timeout=10,
                             start=mark)
    assert line["decision"] == "allowed" and line["reason"] == "allowed" and line["status"] == 101
    assert line["method"] == "GET" and line["server_ip"] == WS_IP


def test_websocket_to_a_host_off_the_allowlist_is_refused(ws_proxy: ProxyRunner,
                                                          ws_origin: WebSocketOrigin) -> None:
    before = len(ws_origin.handshakes)
    mark = ws_proxy.mark()
    status, headers = asyncio.run(_handshake_status(ws_proxy.proxy_url, "http://notws.test/echo"))
    assert status == 403 and headers.get("X-Egress-Reason") == "domain_not_allowlisted"
    line = ws_proxy.wait_for(lambda r: r.get("type") == "access" and r.get("host") == "notws.test", timeout=10,
                             start=mark)
    assert line["decision"] == "denied" and line["reason"] == "domain_not_allowlisted"
    assert len(ws_origin.handshakes) == before  # nothing reached the server


def test_wss_goes_through_connect_like_any_https(ws_proxy: ProxyRunner, wss_origin: WebSocketOrigin,
                                                  ca: TestCA) -> None:
    client_tls = ssl.create_default_context(cafile=str(ca.ca_path))
    mark = ws_proxy.mark()
    with ws_connect("wss://ws.test/secure", proxy=ws_proxy.proxy_url, ssl=client_tls, open_timeout=10) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=10) == "over tls"
    assert wss_origin.handshakes[-1]["path"] == "/secure"
    line = ws_proxy.wait_for(lambda r: r.get("type") == "access" and r.get("method") == "CONNECT"
                             and r.get("port") == 443, timeout=10, start=mark)
    assert line["host"] == "ws.test" and line["sni"] == "ws.test" and line["reason"] == "allowed"


def test_ws_scheme_in_the_request_line_is_rejected_by_squid(ws_proxy: ProxyRunner,
                                                              ws_origin: WebSocketOrigin) -> None:
    before = len(ws_origin.handshakes)
    status, _ = asyncio.run(_handshake_status(ws_proxy.proxy_url, "ws://ws.test/echo"))
    assert status == 400  # Squid 5 knows no ws:// scheme; docs/operations.md says to give such clients http:// URLs
    assert len(ws_origin.handshakes) == before


def test_ws_tunnelled_with_connect_to_port_80_is_refused(ws_proxy: ProxyRunner,
                                                         ws_origin: WebSocketOrigin) -> None:
    before = len(ws_origin.handshakes)
    mark = ws_proxy.mark()
    with pytest.raises(InvalidProxyStatus) as refused:
        ws_connect("ws://ws.test/echo", proxy=ws_proxy.proxy_url, open_timeout=10)
    assert refused.value.response.status_code == 403
    assert refused.value.response.headers["X-Egress-Reason"] == "port_not_allowed"
    line = ws_proxy.wait_for(lambda r: r.get("type") == "access" and r.get("method") == "CONNECT", timeout=10,
                             start=mark)
    assert line["host"] == "ws.test" and line["port"] == 80 and line["reason"] == "port_not_allowed"
    assert len(ws_origin.handshakes) == before


def test_idle_websocket_is_closed_at_the_tunnel_idle_timeout(ws_proxy: ProxyRunner,
                                                             ws_origin: WebSocketOrigin) -> None:
    ws_origin.closed.clear()
    message = asyncio.run(_silent_until_closed(ws_proxy.proxy_url, "http://ws.test/idle"))
    # The proxy closed the TCP connection without a WebSocket close frame: aiohttp reports CLOSED/CLOSING/ERROR.
    assert message.type in {aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR}, message
    assert ws_origin.closed.wait(timeout=10), "the server side of the idle tunnel was not closed"
    squid_conf = (ws_proxy.state_dir / "conf" / "squid.conf").read_text()
    assert f"read_timeout {IDLE_SECONDS} seconds" in squid_conf


def test_idle_keepalive_connection_is_closed_at_the_client_idle_timeout(ws_proxy: ProxyRunner) -> None:
    with socket.create_connection((ws_proxy.host, ws_proxy.port), timeout=30) as sock:
        sock.sendall(b"GET http://notws.test/ HTTP/1.1\r\nHost: notws.test\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 403")
        assert b"connection: close" not in received.lower()  # kept alive
        # Then nothing: the proxy ends the idle keep-alive connection (EOF), well before our 30 s socket timeout.
        while chunk := sock.recv(65536):
            received += chunk
    squid_conf = (ws_proxy.state_dir / "conf" / "squid.conf").read_text()
    assert f"client_idle_pconn_timeout {IDLE_SECONDS} seconds" in squid_conf
