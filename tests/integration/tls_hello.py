"""Hand-built TLS ClientHellos for the SNI tests: a real one from Python's ssl module, with its server_name
extension rewritten the way an attacker would (two extensions, two names in one list, a NUL, an IP address)."""

from __future__ import annotations

import socket
import ssl

from harness import connect_tunnel

SERVER_NAME = 0


def real_client_hello(server_hostname: str | None) -> bytes:
    """The first TLS record(s) OpenSSL sends for ``server_hostname`` (None: no SNI extension at all)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _vector(data: bytes, width: int) -> bytes:
    return len(data).to_bytes(width, "big") + data


def server_name_extension(names: list[bytes]) -> bytes:
    """One server_name extension whose list holds ``names`` (each as a host_name entry)."""
    entries = b"".join(b"\x00" + _vector(name, 2) for name in names)
    return _u16(SERVER_NAME) + _vector(_vector(entries, 2), 2)


def with_server_names(*extensions: list[bytes], split_at: int | None = None) -> bytes:
    """A real ClientHello whose server_name extension is replaced by ``extensions`` (each a list of names; no
    argument removes it). ``split_at`` splits the handshake message over two TLS records at that offset."""
    record = real_client_hello("placeholder.test")
    body = record[5 : 5 + int.from_bytes(record[3:5], "big")]
    assert body[0] == 1, "not a ClientHello"
    hello = body[4 : 4 + int.from_bytes(body[1:4], "big")]
    offset = 2 + 32
    offset += 1 + hello[offset]  # session id
    offset += 2 + int.from_bytes(hello[offset : offset + 2], "big")  # cipher suites
    offset += 1 + hello[offset]  # compression methods
    prefix, block = hello[:offset], hello[offset + 2 :]
    kept = bytearray()
    position = 0
    while position < len(block):
        kind = int.from_bytes(block[position : position + 2], "big")
        length = int.from_bytes(block[position + 2 : position + 4], "big")
        if kind != SERVER_NAME:
            kept += block[position : position + 4 + length]
        position += 4 + length
    new_block = b"".join(server_name_extension(names) for names in extensions) + bytes(kept)
    new_hello = prefix + _vector(new_block, 2)
    message = b"\x01" + len(new_hello).to_bytes(3, "big") + new_hello
    pieces = [message] if split_at is None else [message[:split_at], message[split_at:]]
    return b"".join(b"\x16\x03\x01" + _vector(piece, 2) for piece in pieces)


def send_hello(proxy: tuple[str, int], target: str, hello: bytes, *, source: str | None = None) -> socket.socket:
    """CONNECT ``target``:443 through ``proxy`` (from ``source``), then send ``hello`` inside the tunnel. The target
    must be allowlisted for that client: the ClientHello is what the caller wants judged."""
    sock, status, head = connect_tunnel(proxy, target, 443, source=source)
    assert status == 200, head
    sock.sendall(hello)
    return sock


def closed_without_data(sock: socket.socket) -> bool:
    """True when the proxy closes the tunnel without sending a byte back (how a refused ClientHello ends)."""
    try:
        return sock.recv(4096) == b""
    except (ConnectionError, TimeoutError):
        return True
    finally:
        sock.close()
