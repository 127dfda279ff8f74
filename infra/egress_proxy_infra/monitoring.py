"""Dashboard and alarms over the proxy's own metrics, the NLB and the ECS service."""

from __future__ import annotations

from aws_cdk import Aws, Duration, Fn
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from constructs import Construct

#: Dimension the proxy puts on every metric: the task ID (fargate) or instance ID (ec2).
INSTANCE_DIMENSION = "ProxyInstance"
#: The seed's nine Squid counters, published as per-second rates.
SEED_METRICS = (
    "client_http.errors", "client_http.hits", "client_http.kbytes_in", "client_http.kbytes_out",
    "client_http.requests", "server.all.errors", "server.all.kbytes_in", "server.all.kbytes_out",
    "server.all.requests",
)
DECISION_METRICS = ("requests.allowed", "requests.denied")
RELOAD_METRICS = ("reload.success", "reload.failure")
CONFIG_METRICS = ("allowlist.entries", "config.age_seconds")
CPU_ALARM_PERCENT = 85
PERIOD = Duration.minutes(1)


class ProxyMonitoring(Construct):
    """One dashboard and three alarms: no healthy targets, allowlist reload failures, high CPU.

    The proxy publishes per instance (dimension ProxyInstance) and instances come and go, so graphs use
    SEARCH over the dimension and the reload alarm a Metrics Insights query that sums over all instances.
    """

    def __init__(
        self, scope: Construct, id: str, *,
        namespace: str,
        service: ecs.BaseService,
        load_balancer: elbv2.INetworkLoadBalancer,
        target_group: elbv2.INetworkTargetGroup,
    ) -> None:
        super().__init__(scope, id)
        self._namespace = namespace

        healthy_hosts = cloudwatch.Metric(
            namespace="AWS/NetworkELB", metric_name="HealthyHostCount", statistic="Minimum", period=PERIOD,
            dimensions_map={"LoadBalancer": load_balancer.load_balancer_full_name,
                            "TargetGroup": target_group.target_group_full_name},
        )
        self.no_healthy_targets_alarm = healthy_hosts.create_alarm(
            self, "NoHealthyTargets",
            alarm_description="egress-proxy: no healthy proxy behind the load balancer; clients cannot connect.",
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD, threshold=1,
            evaluation_periods=2, treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
        )

        # Alarms cannot use SEARCH, but they can use a Metrics Insights query, which sums over every
        # ProxyInstance present in the period.
        self.reload_failure_alarm = cloudwatch.CfnAlarm(
            self, "ReloadFailures",
            alarm_description="egress-proxy: a proxy failed to apply the allowlist secret; it keeps serving the "
                              "last good allowlist. See the access log group for the reason.",
            comparison_operator="GreaterThanThreshold", threshold=0, evaluation_periods=1,
            treat_missing_data="notBreaching",
            metrics=[cloudwatch.CfnAlarm.MetricDataQueryProperty(
                id="reloadFailures", return_data=True, period=300,
                expression=self._insights_sum("reload.failure"),
            )],
        )

        cpu = service.metric_cpu_utilization(period=Duration.minutes(5))
        self.high_cpu_alarm = cpu.create_alarm(
            self, "HighCpu",
            alarm_description=f"egress-proxy: service CPU above {CPU_ALARM_PERCENT}% for 15 minutes; target "
                              "tracking may be at MaxCapacity.",
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            threshold=CPU_ALARM_PERCENT, evaluation_periods=3,
            treat_missing_data=cloudwatch.TreatMissingData.MISSING,
        )

        self.dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=Fn.join("-", [Aws.STACK_NAME, Aws.REGION]),
            default_interval=Duration.hours(3),
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(
                title="Alarms", width=24, height=3,
                alarms=[self.no_healthy_targets_alarm, self.high_cpu_alarm,
                        cloudwatch.Alarm.from_alarm_arn(self, "ReloadFailuresRef", self.reload_failure_alarm.attr_arn)],
            ),
        )
        self.dashboard.add_widgets(*[self._search_graph(name) for name in SEED_METRICS[:4]])
        self.dashboard.add_widgets(*[self._search_graph(name) for name in SEED_METRICS[4:8]])
        self.dashboard.add_widgets(
            self._search_graph(SEED_METRICS[8]),
            self._search_graph(*DECISION_METRICS, title="Requests allowed / denied", stat="Sum"),
            self._search_graph(*RELOAD_METRICS, title="Allowlist reloads", stat="Sum"),
            self._search_graph(*CONFIG_METRICS, title="Allowlist entries / config age (s)"),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Healthy proxies (NLB)", left=[healthy_hosts], width=12),
            cloudwatch.GraphWidget(title="Service CPU / memory (%)",
                                   left=[service.metric_cpu_utilization(), service.metric_memory_utilization()],
                                   width=12),
        )

    def _search(self, metric_name: str, stat: str) -> str:
        return (f"SEARCH('{{\"{self._namespace}\",{INSTANCE_DIMENSION}}} MetricName=\"{metric_name}\"', "
                f"'{stat}', {int(PERIOD.to_seconds())})")

    def _insights_sum(self, metric_name: str) -> str:
        return f"SELECT SUM(\"{metric_name}\") FROM SCHEMA(\"{self._namespace}\", {INSTANCE_DIMENSION})"

    def _search_graph(self, *metric_names: str, title: str | None = None, stat: str = "Average"
                      ) -> cloudwatch.GraphWidget:
        expressions = [
            cloudwatch.MathExpression(expression=self._search(name, stat), label=name, period=PERIOD,
                                      using_metrics={})
            for name in metric_names
        ]
        return cloudwatch.GraphWidget(title=title or f"{metric_names[0]} /s", left=expressions, width=6)
