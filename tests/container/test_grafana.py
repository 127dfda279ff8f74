"""The Grafana dashboard (examples/grafana) and the compose profile "dashboards" that provisions it, checked
without a Docker engine or Grafana: the dashboard JSON renders (Grafana's dashboard model: unique panel ids,
panels on the 24-column grid without overlap, every query on the provisioned Prometheus data source), every
metric and label its queries name is one the proxy's /metrics exposes (entrypoint/egress_proxy/prometheus.py),
and the profile wires Prometheus to the proxy's Prometheus port and Grafana to these files."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_file import REPO, load_compose, service_env

from egress_proxy.settings import load_settings

GRAFANA = REPO / "examples" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "egress-proxy.json"
PROMETHEUS_PY = REPO / "entrypoint" / "egress_proxy" / "prometheus.py"
SERVICES = load_compose()["services"]


def exposed_metrics() -> dict[str, set[str]]:
    """Metric name -> label names, as prometheus.py's collector builds them (a counter family gains _total)."""
    tree = ast.parse(PROMETHEUS_PY.read_text())
    prefix = next(node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "PREFIX" for t in node.targets)
                  and isinstance(node.value, ast.Constant))
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in {"CounterMetricFamily", "GaugeMetricFamily"} and node.args):
            continue
        name = node.args[0]
        if not (isinstance(name, ast.BinOp) and isinstance(name.right, ast.Constant)):
            continue  # PREFIX + metric: the Squid counters, below
        labels = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "labels"), [])
        suffix = "_total" if node.func.id == "CounterMetricFamily" else ""
        found[prefix + name.right.value + suffix] = set(labels)
    squid = next(node.value for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                 and isinstance(node.target, ast.Name) and node.target.id == "SQUID_COUNTERS")
    for entry in ast.literal_eval(squid).values():
        found[f"{prefix}{entry[0]}_total"] = set()
    return found


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def test_the_parser_sees_the_exporter() -> None:
    exposed = exposed_metrics()
    assert exposed["egress_proxy_requests_total"] == {"decision", "reason", "policy"}
    assert exposed["egress_proxy_reloads_total"] == {"result"}
    assert exposed["egress_proxy_log_lines_dropped_total"] == {"type"}
    assert {"egress_proxy_workers_up", "egress_proxy_workers_configured"} <= set(exposed)
    assert {"egress_proxy_squid_up", "egress_proxy_client_http_sent_bytes_total",
            "egress_proxy_server_errors_total"} <= set(exposed)


def test_every_query_names_metrics_and_labels_the_proxy_exposes() -> None:
    exposed = exposed_metrics()
    used: set[str] = set()
    for expr in queries():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr
        names = re.findall(r"\b(egress_proxy_\w+)", expr)
        assert names, f"no proxy metric in {expr!r}"
        unknown = [n for n in names if n not in exposed]
        assert not unknown, f"{expr!r} names {unknown}, which /metrics does not expose"
        used.update(names)
        labels = set(re.findall(r"\bby \(([^)]*)\)", expr))
        label_names = {label.strip() for group in labels for label in group.split(",")}
        label_names |= set(re.findall(r"(\w+)=\"", expr))
        allowed = set().union(*(exposed[n] for n in names))
        assert label_names <= allowed, (expr, label_names - allowed)
    # What the dashboard is for: decisions by policy and reason, report mode, workers, dropped log lines.
    assert {"egress_proxy_requests_total", "egress_proxy_workers_up", "egress_proxy_workers_configured",
            "egress_proxy_log_lines_dropped_total", "egress_proxy_squid_up", "egress_proxy_reloads_total"} <= used
    assert any('decision="would_deny"' in expr for expr in queries())
    assert any('decision="denied"' in expr and "by (policy, reason)" in expr for expr in queries())


def test_dashboard_renders_on_grafanas_grid_from_the_provisioned_data_source() -> None:
    data = dashboard()
    assert data["uid"] == "egress-proxy" and data["title"] and isinstance(data["schemaVersion"], int)
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    panels = data["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": source["type"], "uid": source["uid"]}, panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


# --- the compose profile ----------------------------------------------------------------------------------------


def _bind(service: dict[str, Any], target: str) -> Path:
    (volume,) = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == target]
    assert volume["type"] == "bind" and volume["read_only"] is True
    return (REPO / volume["source"]).resolve()


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_the_dashboards_profile_is_opt_in_and_local_only(name: str) -> None:
    service = SERVICES[name]
    assert service["profiles"] == ["dashboards"], "plain `docker compose up` starts only the proxy"
    assert re.fullmatch(r"[a-z/-]+:v?\d+\.\d+\.\d+", service["image"]), "pin the image"
    assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), "publish on loopback only"


def test_prometheus_scrapes_the_proxys_prometheus_port() -> None:
    config = yaml.safe_load(_bind(SERVICES["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    settings = load_settings({}, service_env(SERVICES["proxy"]))
    assert static["targets"] == [f"proxy:{settings.prometheus_port}"]


def test_grafana_is_provisioned_with_this_dashboard_and_the_profiles_prometheus() -> None:
    grafana = SERVICES["grafana"]
    provisioning = _bind(grafana, "/etc/grafana/provisioning")
    assert provisioning == GRAFANA / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    port = str(SERVICES["prometheus"]["ports"][0]).rsplit(":", 1)[-1]
    assert source["url"] == f"http://prometheus:{port}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "egress-proxy.yml").read_text())["providers"]
    dashboards = _bind(grafana, provider["options"]["path"])
    assert dashboards == DASHBOARD.parent
    home = service_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider["options"]["path"]) and (dashboards / Path(home).name) == DASHBOARD
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_started"
