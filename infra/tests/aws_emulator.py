"""AWS APIs on loopback for the Lambda handler tests: moto_server, and a recorder for one API moto lacks.

* `serve_moto()`: moto's server application on 127.0.0.1, handling ONE REQUEST AT A TIME. That models the
  property the Elastic IP claim relies on: EC2 applies AssociateAddress atomically, so of two concurrent
  calls for the same free address exactly one succeeds. (moto's default threaded server would let two
  requests interleave inside its check-and-set, which real EC2 does not.)
* `autoscaling_recorder()`: moto 5.2.5 implements neither autoscaling:CompleteLifecycleAction nor
  autoscaling:StartInstanceRefresh, so the claim and refresh tests send their Auto Scaling client here. It
  answers those two actions with the query-protocol responses boto3 expects (or, when told to, the error
  AWS gives while another refresh runs) and records the parameters; anything else is a 400.
* `ResponseRecorder`: the pre-signed S3 URL a custom resource PUTs its result to.

Clients are real boto3 clients configured by endpoint URL; nothing in boto3 is patched.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import boto3
from botocore.config import Config
from werkzeug.serving import make_server

REGION = "eu-west-1"


@contextmanager
def serve_moto() -> Iterator[str]:
    """A fresh moto_server (its own state) on a free loopback port; yields its URL."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False,
                         request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield url
    finally:
        # moto's backends are process-global: reset them so that every test starts empty.
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).close()
        server.shutdown()
        thread.join()
        server.server_close()


def client(service: str, endpoint: str) -> Any:
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(retries={"max_attempts": 1, "mode": "standard"}))


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


@contextmanager
def _serving(server: _Recorder) -> Iterator[_Recorder]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


#: The stand-in's answers, per action: the query-protocol result element boto3 parses.
_AUTOSCALING_RESULTS = {
    "CompleteLifecycleAction": "<CompleteLifecycleActionResult/>",
    "StartInstanceRefresh": "<StartInstanceRefreshResult><InstanceRefreshId>refresh-1</InstanceRefreshId>"
                            "</StartInstanceRefreshResult>",
}
_REFRESH_IN_PROGRESS = (b'<ErrorResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><Error>'
                        b"<Type>Sender</Type><Code>InstanceRefreshInProgress</Code><Message>An Instance Refresh is "
                        b"already in progress and blocks the execution of this Instance Refresh.</Message></Error>"
                        b"<RequestId>r</RequestId></ErrorResponse>")


class _AutoScalingHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        params = {key: values[0] for key, values in parse_qs(body).items()}
        action = params.get("Action", "")
        if action not in _AUTOSCALING_RESULTS:
            self._send(400, b"")
            return
        with self.server.lock:
            self.server.calls.append(params)
        if action == "StartInstanceRefresh" and getattr(self.server, "refresh_in_progress", False):
            self._send(400, _REFRESH_IN_PROGRESS)
            return
        self._send(200, (f'<{action}Response xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
                         f"{_AUTOSCALING_RESULTS[action]}<ResponseMetadata><RequestId>r</RequestId>"
                         f"</ResponseMetadata></{action}Response>").encode())


class _ResponseHandler(BaseHTTPRequestHandler):
    server: _Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.calls.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                      "body": json.loads(body)})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def autoscaling_recorder(*, refresh_in_progress: bool = False) -> Iterator[_Recorder]:
    """The Auto Scaling stand-in; `refresh_in_progress` makes StartInstanceRefresh fail as AWS does then."""
    server = _Recorder(_AutoScalingHandler)
    server.refresh_in_progress = refresh_in_progress  # type: ignore[attr-defined]
    with _serving(server) as serving:
        yield serving


@contextmanager
def response_recorder() -> Iterator[_Recorder]:
    with _serving(_Recorder(_ResponseHandler)) as server:
        yield server
