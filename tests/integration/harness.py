"""Real local network fixtures for the egress-proxy integration suite.

Everything here binds on loopback addresses (127.0.0.0/8) only and talks to
nothing else: no name lookups are ever performed (``HTTPServer.server_bind``'s
``getfqdn`` reverse lookup is bypassed on purpose), clients connect to literal
addresses.

Fixtures:

* :class:`TestCA` -- throwaway CA (``cryptography``) issuing server certificates.
* :class:`DnsServer` -- authoritative-style UDP+TCP DNS server built on dnslib.
* :class:`HttpOrigin` / :class:`TlsOrigin` -- HTTP/1.1 origins with keep-alive.
* :class:`RawTcpServer` -- records raw bytes, optionally sends a banner.

Raw proxy clients: :func:`connect_tunnel`, :func:`tls_over_tunnel`,
:func:`http_get_over` (plus :func:`read_body`), :func:`proxy_get`.

Servers run in background threads; ``start()`` returns once listening,
``stop()`` severs open connections and joins the threads.  Every server is a
context manager (``with DnsServer(...) as dns: ...``).  Passing ``port=0``
binds an ephemeral port; the chosen port is then available as ``.port``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import pathlib
import re
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Self

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSError,
    DNSRecord,
)

__all__ = [
    "DnsServer",
    "HttpOrigin",
    "RawTcpServer",
    "TestCA",
    "TlsOrigin",
    "connect_tunnel",
    "free_port",
    "http_get_over",
    "proxy_get",
    "read_body",
    "tls_over_tunnel",
    "wait_for_port",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_JOIN_TIMEOUT = 5.0
_MAX_HEADER_BYTES = 64 * 1024


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hostport(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _ip_or_none(value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _sever(sock: socket.socket) -> None:
    """Shut a connection down at the OS level so a thread blocked on it wakes up.

    ``socket.socket.shutdown`` is called unbound so that, for an ``SSLSocket``,
    the TLS layer is bypassed (no close_notify, no state change)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is currently free on ``host`` (the usual small race applies)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def write_allowlist(path: pathlib.Path, text: str) -> None:
    """Atomic replace, as an editor or a ConfigMap update would do it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``.

    Raises :class:`TimeoutError` naming the address and the last error."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"nothing accepted TCP connections on {_hostport(host, port)} "
                f"within {timeout:.1f}s (last error: {last!r})"
            )
        time.sleep(0.05)


class _Background:
    """Common start/stop/context-manager plumbing for the servers below."""

    host: str
    port: int

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _TrackingTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Threaded TCP server that remembers its live connections and handler
    threads, so that stop() can cut keep-alive connections (a proxy keeps
    idle server connections pooled) instead of hanging on them."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        self.address_family = _family(address[0])
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._closing = False
        self.stop_event = threading.Event()
        super().__init__(address, handler)

    # connection bookkeeping -------------------------------------------------
    def track(self, sock: socket.socket) -> bool:
        """Register a live connection; False if the server is shutting down."""
        with self._conn_lock:
            if self._closing:
                return False
            self._conns.add(sock)
            return True

    def untrack(self, sock: socket.socket) -> None:
        with self._conn_lock:
            self._conns.discard(sock)

    def process_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        if not self.track(sock):
            self.shutdown_request(request)
            return
        t = threading.Thread(
            target=self._run_request,
            args=(request, client_address),
            name=f"{type(self).__name__}-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._handler_threads.add(t)
        t.start()

    def _run_request(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self.untrack(request)
            with self._conn_lock:
                self._handler_threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, broken pipes, TLS errors, timeouts
            return
        super().handle_error(request, client_address)

    def close_everything(self) -> None:
        """Call after shutdown(): cut all connections, close, join handlers."""
        self.stop_event.set()
        with self._conn_lock:
            self._closing = True
            conns = list(self._conns)
        for c in conns:
            _sever(c)
        self.server_close()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        with self._conn_lock:
            threads = list(self._handler_threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _serve_in_thread(server: socketserver.BaseServer, name: str) -> threading.Thread:
    t = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=name,
        daemon=True,
    )
    t.start()
    return t


# ---------------------------------------------------------------------------
# TestCA
# ---------------------------------------------------------------------------


class TestCA:
    """A throwaway certificate authority.

    Writes ``ca.pem`` (certificate) and ``ca.key`` (unencrypted PKCS#8 key,
    e.g. for a Squid ``tls-cert=`` / ``tls-key=``) into ``directory``."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egress-proxy tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, "egress-proxy test CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._ca_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.ca_path: pathlib.Path = self.directory / "ca.pem"
        self.ca_path.write_bytes(self._ca_pem)
        self.ca_key_path: pathlib.Path = self.directory / "ca.key"
        self.ca_key_path.write_bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.ca_key_path.chmod(0o600)

    def issue(
        self, names: Sequence[str], ips: Sequence[str] = ()
    ) -> tuple[pathlib.Path, pathlib.Path]:
        """Issue a server certificate; returns ``(chain_pem, key_pem)`` paths.

        SANs are ``names`` as DNS names plus ``ips`` as IP addresses.  An IP
        literal given in ``names`` is put in an IP SAN too (a DNS SAN holding
        an address would never match)."""
        dns_names: list[str] = []
        ip_sans: list[IPAddress] = [ipaddress.ip_address(i) for i in ips]
        for n in names:
            addr = _ip_or_none(n)
            if addr is None:
                dns_names.append(n)
            elif addr not in ip_sans:
                ip_sans.append(addr)
        if not dns_names and not ip_sans:
            raise ValueError("issue() needs at least one name or IP")
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(a) for a in ip_sans]
        cn = dns_names[0] if dns_names else str(ip_sans[0])

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        ca_ski = self.cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        with self._lock:
            serial = next(self._serial)
        slug = re.sub(r"[^A-Za-z0-9.-]+", "_", cn).strip("._") or "leaf"
        chain_path = self.directory / f"leaf-{serial:03d}-{slug}.pem"
        key_path = self.directory / f"leaf-{serial:03d}-{slug}.key"
        chain_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return chain_path, key_path


# ---------------------------------------------------------------------------
# DnsServer
# ---------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


class _DnsUDPServer(socketserver.UDPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: DnsServer) -> None:
        self.address_family = _family(address[0])
        self.owner = owner
        super().__init__(address, _DnsUDPHandler)


class _DnsUDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _DnsUDPServer = self.server  # type: ignore[assignment]
        data: bytes = self.request[0]
        sock: socket.socket = self.request[1]
        reply = server.owner._answer(data, udp=True)
        if reply is not None:
            try:
                sock.sendto(reply, self.client_address)
            except OSError:
                pass


class _DnsTCPServer(_TrackingTCPServer):
    def __init__(self, address: tuple[str, int], owner: DnsServer) -> None:
        self.owner = owner
        super().__init__(address, _DnsTCPHandler)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class _DnsTCPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _DnsTCPServer = self.server  # type: ignore[assignment]
        sock: socket.socket = self.request
        sock.settimeout(30.0)
        while True:
            head = _recv_exact(sock, 2)
            if head is None:
                return
            (length,) = struct.unpack("!H", head)
            data = _recv_exact(sock, length)
            if data is None:
                return
            reply = server.owner._answer(data, udp=False)
            if reply is None:
                return
            sock.sendall(struct.pack("!H", len(reply)) + reply)


class DnsServer(_Background):
    """Authoritative-style DNS server on UDP and TCP ``(host, port)``.

    * ``set(name, addresses)``: A/AAAA answers chosen by address family.
    * ``set_wildcard(suffix, addresses)``: any name strictly *under* suffix.
      Exact names win over wildcards; the longest matching suffix wins.
    * Unknown name -> NXDOMAIN (with an SOA, so negative TTL = ``ttl``).
    * Known name without a record of the asked type (e.g. AAAA for an
      IPv4-only name, MX, HTTPS) -> NOERROR, empty answer (+ SOA).
    * ``queries`` logs ``(qname, qtype)`` in arrival order, qname lowercased
      without the trailing dot, qtype as a name ("A", "AAAA", "HTTPS", ...).
    """

    def __init__(
        self,
        records: dict[str, list[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 53,
        *,
        ttl: int = 1,
    ) -> None:
        self.host = host
        self.port = port
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._records: dict[str, list[IPAddress]] = {}
        self._wildcards: dict[str, list[IPAddress]] = {}
        self._udp: _DnsUDPServer | None = None
        self._tcp: _DnsTCPServer | None = None
        self._threads: list[threading.Thread] = []
        self._held: dict[str, tuple[threading.Event, threading.Event]] = {}  # name -> (asked, released)
        for name, addrs in (records or {}).items():
            self.set(name, addrs)

    # records ------------------------------------------------------------------
    @staticmethod
    def _parse(addresses: Sequence[str]) -> list[IPAddress]:
        if isinstance(addresses, str):
            raise TypeError("addresses must be a list of strings, not a string")
        return [ipaddress.ip_address(a) for a in addresses]

    def set(self, name: str, addresses: list[str]) -> None:
        """Create/replace ``name``.  An empty list makes the name exist with no
        records (NOERROR/NODATA for every type)."""
        parsed = self._parse(addresses)
        with self._lock:
            self._records[_norm_name(name)] = parsed

    def set_wildcard(self, suffix: str, addresses: list[str]) -> None:
        parsed = self._parse(addresses)
        with self._lock:
            self._wildcards[_norm_name(suffix).lstrip("*.")] = parsed

    def remove(self, name: str) -> None:
        """Forget an exact name (it becomes NXDOMAIN unless a wildcard covers it)."""
        with self._lock:
            self._records.pop(_norm_name(name), None)

    def remove_wildcard(self, suffix: str) -> None:
        with self._lock:
            self._wildcards.pop(_norm_name(suffix).lstrip("*."), None)

    def lookup(self, name: str) -> list[str] | None:
        """What the server would answer for ``name`` (None = NXDOMAIN)."""
        found = self._lookup(_norm_name(name))
        return None if found is None else [str(a) for a in found]

    def _lookup(self, qname: str) -> list[IPAddress] | None:
        with self._lock:
            if qname in self._records:
                return list(self._records[qname])
            labels = qname.split(".")
            for i in range(1, len(labels)):
                suffix = ".".join(labels[i:])
                if suffix in self._wildcards:
                    return list(self._wildcards[suffix])
        return None

    @contextlib.contextmanager
    def holding(self, name: str) -> Iterator[threading.Event]:
        """Hold the answers for ``name`` until the block ends; yields an Event set when the first query for it
        arrives (a resolver is waiting). One thread answers UDP, so every other UDP answer waits too: hold only
        while nothing else needs DNS."""
        asked, released = threading.Event(), threading.Event()
        with self._lock:
            self._held[_norm_name(name)] = (asked, released)
        try:
            yield asked
        finally:
            with self._lock:
                del self._held[_norm_name(name)]
            released.set()

    # query log -------------------------------------------------------------
    def clear_queries(self) -> None:
        with self._lock:
            self.queries.clear()

    def queries_for(self, name: str) -> list[str]:
        """qtypes asked so far for ``name``."""
        n = _norm_name(name)
        with self._lock:
            return [t for q, t in self.queries if q == n]

    # protocol --------------------------------------------------------------
    def _answer(self, data: bytes, *, udp: bool) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, struct.error):
            return None
        if request.header.qr:  # a response, not a query: ignore
            return None
        reply = request.reply(ra=1, aa=1)
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            formerr: bytes = reply.pack()
            return formerr
        q = request.questions[0]
        qname = _norm_name(str(q.qname))
        qtype_num: int = q.qtype
        qtype_name: str = QTYPE.get(qtype_num, f"TYPE{qtype_num}")
        with self._lock:
            self.queries.append((qname, qtype_name))
            held = self._held.get(qname)
        if held is not None:
            held[0].set()
            held[1].wait(60)

        edns_len: int | None = None
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                edns_len = max(512, int(rr.rclass))
        if edns_len is not None:
            reply.add_ar(EDNS0(udp_len=4096))

        addrs = self._lookup(qname)
        if addrs is None:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            want4 = qtype_num in (QTYPE.A, QTYPE.ANY)
            want6 = qtype_num in (QTYPE.AAAA, QTYPE.ANY)
            for addr in addrs:
                if addr.version == 4 and want4:
                    reply.add_answer(
                        RR(q.qname, QTYPE.A, rdata=A(str(addr)), ttl=self.ttl)
                    )
                elif addr.version == 6 and want6:
                    reply.add_answer(
                        RR(q.qname, QTYPE.AAAA, rdata=AAAA(str(addr)), ttl=self.ttl)
                    )
        if not reply.rr:
            # negative answer: SOA in authority so resolvers use a tiny negative TTL
            reply.add_auth(
                RR(
                    ".",
                    QTYPE.SOA,
                    rdata=SOA(
                        "ns.harness.test.",
                        "hostmaster.harness.test.",
                        (1, self.ttl, self.ttl, self.ttl, self.ttl),
                    ),
                    ttl=self.ttl,
                )
            )
        packed: bytes = reply.pack()
        limit = edns_len if edns_len is not None else 512
        if udp and len(packed) > limit:
            trunc = request.reply(ra=1, aa=1)
            trunc.header.tc = 1
            packed = trunc.pack()
        return packed

    # lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        if self._udp is not None:
            raise RuntimeError("DnsServer already started")
        for attempt in range(20):
            udp = _DnsUDPServer((self.host, self.port), self)
            port: int = udp.server_address[1]
            try:
                tcp = _DnsTCPServer((self.host, port), self)
            except OSError:
                udp.server_close()
                if self.port != 0 or attempt == 19:
                    raise
                continue
            break
        self.port = port
        self._udp, self._tcp = udp, tcp
        self._threads = [
            _serve_in_thread(udp, f"dns-udp-{self.host}:{port}"),
            _serve_in_thread(tcp, f"dns-tcp-{self.host}:{port}"),
        ]

    def stop(self) -> None:
        udp, tcp = self._udp, self._tcp
        self._udp = self._tcp = None
        if udp is not None:
            udp.shutdown()
            udp.server_close()
        if tcp is not None:
            tcp.shutdown()
            tcp.close_everything()
        for t in self._threads:
            t.join(_JOIN_TIMEOUT)
        self._threads = []


# ---------------------------------------------------------------------------
# HTTP / TLS origins
# ---------------------------------------------------------------------------


class _OriginServer(_TrackingTCPServer):
    # Deliberately not http.server.HTTPServer: its server_bind() calls
    # socket.getfqdn(), i.e. a reverse DNS lookup through the system resolver.

    def __init__(self, address: tuple[str, int], origin: HttpOrigin) -> None:
        self.origin = origin
        super().__init__(address, _OriginHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        ctx = self.origin._tls_context
        if ctx is None:
            _OriginHandler(request, client_address, self)
            return
        raw: socket.socket = request
        raw.settimeout(10.0)
        tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        # `raw` is detached now; track the TLS socket instead so stop() can cut it
        self.untrack(raw)
        try:
            if not self.track(tls):
                return
            try:
                tls.do_handshake()
            except (OSError, ValueError) as exc:
                self.origin._record_tls_error(exc)
                return
            tls.settimeout(None)
            _OriginHandler(tls, client_address, self)
        finally:
            self.untrack(tls)
            self.origin._conn_closed(tls)
            try:
                tls.close()
            except OSError:
                pass


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "harness-origin/1"
    sys_version = ""
    _CHUNK = b"x" * 65536
    STREAM_INTERVAL = 0.2

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def _srv(self) -> _OriginServer:
        srv: _OriginServer = self.server  # type: ignore[assignment]
        return srv

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ValueError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_OPTIONS(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _send_simple(self, status: int, body: bytes, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool = False) -> None:
        origin = self._srv.origin
        stop = self._srv.stop_event
        length = int(self.headers.get("Content-Length") or 0)
        req_body = self.rfile.read(length) if length > 0 else b""
        host_header = self.headers.get("Host") or ""
        path = urllib.parse.urlsplit(self.path).path or "/"
        origin._record(
            {
                "method": self.command,
                "path": self.path,
                "host": host_header,
                "client": (str(self.client_address[0]), int(self.client_address[1])),
                "headers": {k: v for k, v in self.headers.items()},
                "body": req_body,
                "sni": origin._sni_of(self.connection),
                "time": time.time(),
            }
        )
        hello = (
            f"hello from {origin.name} {origin.host}:{origin.port} "
            f"path={self.path} host={host_header}\n"
        ).encode()

        m = re.fullmatch(r"/bytes/(\d+)", path)
        if m:
            n = int(m.group(1))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if head:
                return
            view = memoryview(self._CHUNK)
            while n > 0:
                k = min(n, len(view))
                self.wfile.write(view[:k])
                n -= k
            return

        m = re.fullmatch(r"/slow/(\d+(?:\.\d+)?)", path)
        if m:
            if stop.wait(float(m.group(1))):
                self.close_connection = True
                return
            self._send_simple(200, hello, head)
            return

        m = re.fullmatch(r"/stream/(\d+(?:\.\d+)?)", path)
        if m:
            lines = max(1, round(float(m.group(1)) / self.STREAM_INTERVAL))
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(12 * lines))
            self.end_headers()
            if head:
                return
            for i in range(lines):
                self.wfile.write(b"tick %06d\n" % i)  # 12 bytes
                self.wfile.flush()
                if stop.wait(self.STREAM_INTERVAL):
                    self.close_connection = True
                    return
            return

        m = re.fullmatch(r"/status/(\d{3})", path)
        if m:
            self._send_simple(int(m.group(1)), hello, head)
            return

        if path == "/headers":
            text = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
            self._send_simple(200, text.encode(), head)
            return

        self._send_simple(200, hello, head)


class HttpOrigin(_Background):
    """Plain HTTP/1.1 origin with keep-alive.

    Routes (any method; request bodies are read and recorded):

    * ``/bytes/N`` -> N bytes of ``b"x"`` (Content-Length, written in 64 KiB chunks)
    * ``/slow/S`` -> waits S seconds, then the hello body
    * ``/stream/S`` -> one 12-byte line ``b"tick 000000\\n"`` every 0.2 s for
      about S seconds (Content-Length known up front)
    * ``/status/NNN`` -> the hello body with status NNN
    * ``/headers`` -> the request headers, one ``Name: value`` per line
    * anything else -> 200 ``hello from {name} {host}:{port} path={path} host={Host}\\n``

    ``requests`` records one dict per request, appended before the response
    is sent: ``method``, ``path`` (request-target as received), ``host`` (Host
    header or ""), ``client`` ((ip, port) of the peer), ``headers``, ``body``,
    ``sni`` (TLS only, else None), ``time``.
    """

    scheme = "http"

    def __init__(self, host: str, port: int, name: str = "origin") -> None:
        self.host = host
        self.port = port
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: _OriginServer | None = None
        self._thread: threading.Thread | None = None
        self._tls_context: ssl.SSLContext | None = None

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def _sni_of(self, sock: socket.socket) -> str | None:
        return None

    def _record_tls_error(self, exc: BaseException) -> None:
        pass

    def _conn_closed(self, sock: socket.socket) -> None:
        pass

    def paths(self) -> list[str]:
        """Request paths received so far, in order."""
        with self._lock:
            return [str(r["path"]) for r in self.requests]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"{self.scheme}://{_hostport(self.host, self.port)}{path}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        server = _OriginServer((self.host, self.port), self)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = _serve_in_thread(server, f"{self.name}-{self.host}:{self.port}")

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_everything()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
            self._thread = None


class TlsOrigin(HttpOrigin):
    """:class:`HttpOrigin` over TLS with a certificate from ``ca`` for ``names``.

    The bind address is added as an IP SAN as well (``include_host_ip``), so
    ``https://127.0.0.2:port`` verifies against ``ca.ca_path``.  ``snis``
    records the SNI of every ClientHello (None when the client sent none),
    including handshakes that later fail; ``tls_errors`` records failed
    handshakes (e.g. plaintext sent to the TLS port)."""

    scheme = "https"

    def __init__(
        self,
        host: str,
        port: int,
        ca: TestCA,
        names: list[str],
        name: str = "tls-origin",
        *,
        include_host_ip: bool = True,
    ) -> None:
        super().__init__(host, port, name)
        self.ca = ca
        self.names = list(names)
        self.snis: list[str | None] = []
        self.tls_errors: list[str] = []
        self._sni_by_conn: dict[int, str | None] = {}
        ips = [host] if include_host_ip and _ip_or_none(host) is not None else []
        self.cert_path, self.key_path = ca.issue(self.names, ips)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._on_sni
        self._tls_context = ctx

    def _on_sni(
        self,
        sock: ssl.SSLSocket | ssl.SSLObject,
        server_name: str | None,
        ctx: ssl.SSLContext,
    ) -> None:
        with self._lock:
            self.snis.append(server_name)
            self._sni_by_conn[id(sock)] = server_name

    def _sni_of(self, sock: socket.socket) -> str | None:
        with self._lock:
            return self._sni_by_conn.get(id(sock))

    def _record_tls_error(self, exc: BaseException) -> None:
        with self._lock:
            self.tls_errors.append(repr(exc))

    def _conn_closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._sni_by_conn.pop(id(sock), None)

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self.snis.clear()
            self.tls_errors.clear()

    def stop(self) -> None:
        super().stop()
        with self._lock:
            self._sni_by_conn.clear()


# ---------------------------------------------------------------------------
# RawTcpServer
# ---------------------------------------------------------------------------


class _RawHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _RawServer = self.server  # type: ignore[assignment]
        owner = server.owner
        sock: socket.socket = self.request
        owner._connected(self.client_address[0])
        if owner.banner:
            sock.sendall(owner.banner)
        while True:
            data = sock.recv(65536)
            if not data:
                return
            owner._received(data)


class _RawServer(_TrackingTCPServer):
    def __init__(self, address: tuple[str, int], owner: RawTcpServer) -> None:
        self.owner = owner
        super().__init__(address, _RawHandler)


class RawTcpServer(_Background):
    """Accepts TCP, sends ``banner`` (if any) on connect, records everything
    received (all connections concatenated in arrival order) until EOF. ``peers`` lists each connection's source
    address."""

    def __init__(self, host: str, port: int, banner: bytes = b"") -> None:
        self.host = host
        self.port = port
        self.banner = banner
        self.connections = 0
        self.peers: list[str] = []
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._server: _RawServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def received(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def _connected(self, peer: str) -> None:
        with self._cond:
            self.connections += 1
            self.peers.append(peer)
            self._cond.notify_all()

    def _received(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            self._cond.notify_all()

    def wait_for(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Wait until ``data`` occurs in :attr:`received`; returns all received bytes."""
        return self._wait(lambda: data in self._buf, timeout, f"{data!r} to arrive")

    def wait_for_connection(self, count: int = 1, timeout: float = 5.0) -> None:
        self._wait(lambda: self.connections >= count, timeout, f"{count} connection(s)")

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str) -> bytes:
        with self._cond:
            if not self._cond.wait_for(pred, timeout):
                raise TimeoutError(
                    f"RawTcpServer {_hostport(self.host, self.port)}: waited {timeout:.1f}s "
                    f"for {what}; got {self.connections} connection(s), received "
                    f"{bytes(self._buf)[:200]!r}"
                )
            return bytes(self._buf)

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("RawTcpServer already started")
        server = _RawServer((self.host, self.port), self)
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = _serve_in_thread(server, f"raw-{self.host}:{self.port}")

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_everything()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
            self._thread = None


# ---------------------------------------------------------------------------
# raw proxy clients
# ---------------------------------------------------------------------------


def _read_head(sock: socket.socket) -> bytes:
    """Read exactly one HTTP header block (through CRLFCRLF), byte by byte so
    that nothing after it (tunnel data, next response) is consumed."""
    buf = bytearray()
    while not buf.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            if not buf:
                raise ConnectionError("connection closed before any response bytes")
            raise ConnectionError(f"connection closed mid-headers: {bytes(buf)!r}")
        buf += b
        if len(buf) > _MAX_HEADER_BYTES:
            raise ValueError("response headers exceed 64 KiB")
    return bytes(buf)


def _status_of(head: bytes) -> int:
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"malformed status line: {line!r}")
    return int(parts[1])


def _header_values(head: bytes, name: str) -> list[str]:
    want = name.lower().encode()
    out: list[str] = []
    for line in head.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == want:
            out.append(v.strip().decode("latin-1"))
    return out


def read_body(
    sock: socket.socket, header_bytes: bytes, *, request_method: str = "GET"
) -> bytes:
    """Read the body belonging to ``header_bytes`` (as returned by
    :func:`connect_tunnel`, e.g. a Squid error page after a refused CONNECT):
    Content-Length, chunked, or until EOF."""
    status = _status_of(header_bytes)
    if request_method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    te = ",".join(_header_values(header_bytes, "Transfer-Encoding")).lower()
    if "chunked" in te:
        body = bytearray()
        while True:
            size_line = bytearray()
            while not size_line.endswith(b"\r\n"):
                b = sock.recv(1)
                if not b:
                    raise ConnectionError("connection closed inside chunked body")
                size_line += b
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # trailers until an empty line
                line = bytearray()
                while True:
                    b = sock.recv(1)
                    if not b:
                        return bytes(body)
                    line += b
                    if line.endswith(b"\r\n"):
                        if line == b"\r\n":
                            return bytes(body)
                        line = bytearray()
            chunk = _recv_exact(sock, size + 2)
            if chunk is None:
                raise ConnectionError("connection closed inside chunked body")
            body += chunk[:-2]
    lengths = _header_values(header_bytes, "Content-Length")
    if lengths:
        n = int(lengths[0])
        data = bytearray()
        while len(data) < n:
            chunk = sock.recv(min(n - len(data), 1 << 20))
            if not chunk:
                raise ConnectionError(
                    f"connection closed after {len(data)} of {n} body bytes"
                )
            data += chunk
        return bytes(data)
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def connect_tunnel(
    proxy: tuple[str, int], target: str, port: int, timeout: float = 5.0, *, source: str | None = None
) -> tuple[socket.socket, int, bytes]:
    """Open a CONNECT tunnel through ``proxy`` to ``target:port``, from the loopback address ``source`` if given.

    Returns ``(sock, status_code, header_bytes)``; ``header_bytes`` is the
    status line plus headers through the blank line, and nothing beyond it
    has been read.  The socket keeps ``timeout``.  Caller closes."""
    authority = _hostport(target, port)
    sock = socket.create_connection(proxy, timeout=timeout, source_address=(source, 0) if source else None)
    try:
        sock.sendall(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        )
        head = _read_head(sock)
        return sock, _status_of(head), head
    except BaseException:
        sock.close()
        raise


def tls_over_tunnel(
    sock: socket.socket,
    server_hostname: str | None,
    ca_path: pathlib.Path,
    timeout: float = 5.0,
    *,
    verify: bool = True,
    alpn: list[str] | None = None,
) -> ssl.SSLSocket:
    """TLS handshake over an established (tunnel) socket.

    ``server_hostname`` is sent as SNI and checked against the certificate;
    it may differ from the CONNECT target.  ``None`` sends a ClientHello
    without any SNI extension (the chain is still verified against
    ``ca_path``, the hostname is not).  ``verify=False`` skips verification
    entirely (e.g. fronting towards a certificate that does not match)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(cafile=str(ca_path))
        ctx.check_hostname = server_hostname is not None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    sock.settimeout(timeout)
    return ctx.wrap_socket(sock, server_hostname=server_hostname)


def http_get_over(
    sock: socket.socket,
    host: str,
    path: str = "/",
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET (keep-alive) over an existing socket (plain or TLS).

    Reads exactly one response (Content-Length, chunked, or to EOF when
    neither is given), so it can be called repeatedly on the same socket.
    ``path`` is sent verbatim, so an absolute URL works for plain proxying."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = _read_head(sock)
    while 100 <= _status_of(head) < 200:  # skip interim responses
        head = _read_head(sock)
    return _status_of(head), read_body(sock, head)


def proxy_get(
    proxy: tuple[str, int], source: str, url: str, timeout: float = 15.0
) -> tuple[int, bytes, bytes]:
    """One plain-HTTP proxy request (absolute URL, ``Connection: close``) from the local address ``source``:
    ``(status, head, body)``. Raw bytes, so a test sees Squid's own answer (its X-Egress-* headers, its error
    page) exactly as sent, with no client library adding or retrying anything."""
    host = url.split("/")[2]
    with socket.create_connection(proxy, timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return _status_of(head), head, body


def client_session() -> requests.Session:
    """A ``requests`` session for tests: it never picks up proxy settings (``*_proxy``) from the environment,
    so a test talks to exactly the proxy, or the origin, that it names."""
    session = requests.Session()
    session.trust_env = False
    return session


class RequestLoad:
    """Client threads sending GETs to ``url`` (through ``proxies`` if given), each on a keep-alive session, until
    the ``with`` block ends. Outcomes are counted as they come: ``ok`` (200), ``refused_no_log`` (503 with
    X-Egress-Reason: log_unavailable) and ``failed`` (anything else, named). Used by the fault tests and the
    stalled-sink bench."""

    def __init__(self, url: str, proxies: dict[str, str] | None = None, threads: int = 4,
                 timeout: float = 10.0) -> None:
        self.url = url
        self.proxies = proxies or {}
        self.timeout = timeout
        self.ok = 0
        self.refused_no_log = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        while not self._stop.is_set():
            try:
                response = session.get(self.url, proxies=self.proxies, timeout=self.timeout)
                outcome = f"{response.status_code} {response.headers.get('X-Egress-Reason', '')}".strip()
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            with self._lock:
                if outcome == "200":
                    self.ok += 1
                elif outcome == "503 log_unavailable":
                    self.refused_no_log += 1
                else:
                    self.failed.append(outcome)

    def count(self) -> int:
        with self._lock:
            return self.ok

    def refused(self) -> int:
        with self._lock:
            return self.refused_no_log

    def served_during(self, seconds: float) -> int:
        """Requests that succeeded during the next ``seconds`` (a count over a window, not a timing)."""
        before = self.count()
        time.sleep(seconds)  # the window itself
        return self.count() - before

    def windows(self, seconds: float, window: float) -> list[int]:
        """Successes per ``window`` seconds, for ``seconds``."""
        return [self.served_during(window) for _ in range(round(seconds / window))]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
