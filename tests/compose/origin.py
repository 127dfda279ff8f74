"""The compose test's origin: example.com and www.example.com inside the test's Docker network.

Runs in a container of the egress-proxy image (its Debian python3, standard library only), as root so that it
can bind :80 and :443, with this directory bind-mounted at /origin. HTTP on :80, HTTPS on :443 with
/origin/certs/origin.pem + origin.key (issued by the test CA for both names).

Every request it receives is printed as one JSON line, so the test counts what reached the origin through
`docker compose logs origin`. Paths:
  /        "hello from <Host>" (the proof that a request got through, end to end)
  /hold    answers only after someone requested /release: a request kept in flight while the proxy drains
  /release lets every /hold answer
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RELEASED = threading.Event()
HOLD_LIMIT = 120.0  # seconds a /hold waits for /release before answering 504 (a failed test must not hang)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0]
        tls = isinstance(self.connection, ssl.SSLSocket)
        print(json.dumps({"origin": "request", "host": host, "path": self.path, "tls": tls}), flush=True)
        status = 200
        if self.path == "/release":
            RELEASED.set()
            body = "released\n"
        elif self.path == "/hold":
            status, body = (200, f"held, then released by {host}\n") if RELEASED.wait(HOLD_LIMIT) else (504, "")
        else:
            body = f"hello from {host}\n"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the JSON line above is the log


def main() -> None:
    plain = ThreadingHTTPServer(("0.0.0.0", 80), Handler)
    secure = ThreadingHTTPServer(("0.0.0.0", 443), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain("/origin/certs/origin.pem", "/origin/certs/origin.key")
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for server in (plain, secure):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"origin": "ready"}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    sys.exit(main())
