"""The CloudWatch dashboard renders: its body is valid JSON once CloudFormation has filled in the references,
every metric it graphs is one the proxy publishes (entrypoint/egress_proxy/metrics.py), and its Logs Insights
widgets query fields the access log has (entrypoint/egress_proxy/access_log.py)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from infra_synth import Synth

REPO = Path(__file__).resolve().parents[2]
METRICS_PY = REPO / "entrypoint" / "egress_proxy" / "metrics.py"
ACCESS_LOG_PY = REPO / "entrypoint" / "egress_proxy" / "access_log.py"
#: Access-log record keys the proxy adds besides its Squid fields (access_log.parse_line).
RECORD_KEYS = {"type", "decision"}


def published_metric_names() -> set[str]:
    """Every CloudWatch metric name in metrics.py: its dotted string constants (client_http.requests, ...)."""
    tree = ast.parse(METRICS_PY.read_text())
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", node.value)}


def access_log_fields() -> set[str]:
    return set(re.findall(r'Field\("(\w+)"', ACCESS_LOG_PY.read_text())) | RECORD_KEYS


def render(body: Any) -> dict[str, Any]:
    """The dashboard body as CloudFormation would deliver it: Fn::Join parts, with a Ref/GetAtt as a string."""
    parts = body["Fn::Join"][1] if isinstance(body, dict) else [body]
    text = "".join(part if isinstance(part, str) else
                   "Proxy" if part == {"Ref": "MetricsNamespace"} else "resolved-reference" for part in parts)
    rendered = json.loads(text)
    assert isinstance(rendered, dict)
    return rendered


def _dashboard(synth: Synth) -> dict[str, Any]:
    _, dashboard = synth.only("AWS::CloudWatch::Dashboard")
    return render(dashboard["Properties"]["DashboardBody"])


def _expressions(widgets: list[dict[str, Any]]) -> list[str]:
    """The math expressions (SEARCH over the ProxyInstance dimension) of the graph widgets."""
    return [part["expression"] for widget in widgets if widget["type"] == "metric"
            for metric in widget["properties"].get("metrics", []) for part in metric
            if isinstance(part, dict) and "expression" in part]


def test_dashboard_body_is_json_and_graphs_only_metrics_the_proxy_publishes(synth: Synth) -> None:
    widgets = _dashboard(synth)["widgets"]
    searches = [e for e in _expressions(widgets) if e.startswith("SEARCH(")]
    assert searches, "no SEARCH expression found"
    graphed = {name for expression in searches for name in re.findall(r'MetricName="([^"]+)"', expression)}
    published = published_metric_names()
    assert {"client_http.requests", "requests.denied", "reload.failure"} <= published  # the parser finds them
    assert graphed <= published, graphed - published
    # The figures the operators asked for are on it.
    assert {"log.lines_dropped", "workers.up", "workers.configured", "requests.would_deny"} <= graphed
    for expression in searches:
        assert expression.startswith("SEARCH('{\"Proxy\",ProxyInstance} MetricName="), expression


def test_dashboard_shows_what_and_who_was_refused_and_what_report_mode_would_refuse(synth: Synth) -> None:
    widgets = [w for w in _dashboard(synth)["widgets"] if w["type"] == "log"]
    queries = {w["properties"]["title"]: w["properties"]["query"] for w in widgets}
    assert set(queries) == {"Refused: top hosts by policy and reason", "Refused: top clients by policy and reason",
                            "Report mode: top would_deny hosts"}
    fields = access_log_fields()
    for title, query in queries.items():
        source, *commands = [part.strip() for part in query.split("|")]
        assert source == "SOURCE 'resolved-reference'", title  # the access log group
        by = re.search(r"stats .* by (.*)", query)
        assert by, title
        assert {name.strip() for name in by.group(1).split(",")} <= fields, title
    assert 'decision = "denied"' in queries["Refused: top hosts by policy and reason"]
    assert "by host, policy, reason" in queries["Refused: top hosts by policy and reason"]
    assert "by client_ip, policy, reason" in queries["Refused: top clients by policy and reason"]
    assert 'decision = "would_deny"' in queries["Report mode: top would_deny hosts"]
