"""A stand-in for two ECS API calls, ListTasks and DescribeTasks, on loopback.

Why a stand-in: moto 5.2.5's ``run_task`` with awsvpc networking crashes ('NetworkInterface' object has no attribute
'private_dns_name'), so moto cannot hold the awsvpc tasks whose ENI addresses the proxy reads. This server speaks
the same wire protocol boto3 uses for ECS (JSON 1.1, ``X-Amz-Target: AmazonEC2ContainerServiceV20141113.<Call>``)
and answers with the shapes ECS documents: ``taskArns`` for ListTasks; for DescribeTasks each task's
``lastStatus`` and its ``ElasticNetworkInterface`` attachment with ``privateIPv4Address`` (a bridge-mode task has no
attachment). The proxy reaches it through ``AWS_ENDPOINT_URL_ECS`` (boto3's per-service endpoint variable), and
moto keeps serving EC2 through ``AWS_ENDPOINT_URL``. ``failing`` answers every call with a ThrottlingException.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

from harness import free_port

PREFIX = "AmazonEC2ContainerServiceV20141113."
ACCOUNT_ARN = "arn:aws:ecs:us-east-1:123456789012"


class EcsStandIn:
    def __init__(self) -> None:
        self.port = free_port()
        self.services: dict[tuple[str, str], dict[str, str | None]] = {}  # (cluster, service) -> task id -> ip
        self.failing = False
        self.calls: list[str] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                call = self.headers.get("X-Amz-Target", "").removeprefix(PREFIX)
                status, answer = owner.answer(call, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_tasks(self, cluster: str, service: str, tasks: dict[str, str | None]) -> None:
        with self._lock:
            self.services[(cluster, service)] = dict(tasks)

    def answer(self, call: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls.append(call)
            if self.failing:
                return 400, {"__type": "ThrottlingException", "message": "Rate exceeded"}
            cluster = body.get("cluster", "default")
            if call == "ListTasks":
                tasks = self.services.get((cluster, body.get("serviceName", "")), {})
                return 200, {"taskArns": [f"{ACCOUNT_ARN}:task/{cluster}/{task}" for task in sorted(tasks)]}
            if call == "DescribeTasks":
                found = []
                for arn in body.get("tasks", []):
                    task_id = arn.rsplit("/", 1)[-1]
                    for (owner_cluster, _), tasks in self.services.items():
                        if owner_cluster == cluster and task_id in tasks:
                            found.append(_task(arn, tasks[task_id]))
                return 200, {"tasks": found, "failures": []}
            return 400, {"__type": "InvalidParameterException", "message": f"the stand-in lacks {call}"}

    def start(self) -> EcsStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _task(arn: str, address: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {"taskArn": arn, "lastStatus": "RUNNING", "desiredStatus": "RUNNING", "attachments": []}
    if address is not None:  # awsvpc: the task's own ENI
        task["attachments"].append({
            "id": "attachment-" + arn.rsplit("/", 1)[-1], "type": "ElasticNetworkInterface", "status": "ATTACHED",
            "details": [{"name": "networkInterfaceId", "value": "eni-0standin"},
                        {"name": "privateIPv4Address", "value": address}],
        })
    return task
