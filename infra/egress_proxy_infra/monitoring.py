"""Dashboard and alarms over the proxy's own metrics, the NLB and the ECS service."""

from __future__ import annotations

from aws_cdk import Aws, CfnCondition, Duration, Fn
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as events_targets
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra.ec2_lifecycle import POOL_EXHAUSTED_MARKER, EipClaimHook

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


class AlarmTopic(Construct):
    """The SNS topic every alarm notifies, with an optional email subscription (AlarmEmail)."""

    def __init__(self, scope: Construct, id: str, *, email: str, has_email: CfnCondition) -> None:
        super().__init__(scope, id)
        self.topic = sns.Topic(self, "Topic", display_name="egress-proxy alarms", enforce_ssl=True)
        subscription = sns.CfnSubscription(self, "Email", topic_arn=self.topic.topic_arn, protocol="email",
                                           endpoint=email)
        subscription.cfn_options.condition = has_email
        NagSuppressions.add_resource_suppressions(self.topic, [NagPackSuppression(
            id="AwsSolutions-SNS2",
            reason="Alarm notifications carry alarm names and states, nothing secret. CloudWatch alarms cannot "
                   "publish to a topic encrypted with the AWS managed key (aws/sns), and a customer managed key "
                   "would cost more than everything else in this topic.",
        )])


class ProxyMonitoring(Construct):
    """One dashboard and the alarms, all notifying the alarm topic: no healthy targets, allowlist reload
    failures, high CPU, a surge of denied requests, and in EC2 mode an exhausted Elastic IP pool, failing
    Elastic IP claims and failed instance launches.

    The proxy publishes per instance (dimension ProxyInstance) and instances come and go, so graphs use
    SEARCH over the dimension and the reload alarm a Metrics Insights query that sums over all instances.
    """

    def __init__(
        self, scope: Construct, id: str, *,
        namespace: str,
        service: ecs.BaseService,
        load_balancer: elbv2.NetworkLoadBalancer,
        target_group: elbv2.NetworkTargetGroup,
        alarm_topic: sns.ITopic,
        denied_requests_threshold: float,
        eip_claim: EipClaimHook | None = None,
        auto_scaling_group: autoscaling.IAutoScalingGroup | None = None,
    ) -> None:
        super().__init__(scope, id)
        self._namespace = namespace
        self._alarm_topic = alarm_topic

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

        # A surge of denials: a client misconfigured after an allowlist change, or something probing for a way out.
        self.denied_surge_alarm = cloudwatch.CfnAlarm(
            self, "DeniedRequestsSurge",
            alarm_description="egress-proxy: many denied requests across all proxies (DeniedRequestsAlarmThreshold "
                              "per 5 minutes). The access log group says which clients and destinations.",
            comparison_operator="GreaterThanThreshold", threshold=denied_requests_threshold,
            evaluation_periods=1, treat_missing_data="notBreaching",
            metrics=[cloudwatch.CfnAlarm.MetricDataQueryProperty(
                id="deniedRequests", return_data=True, period=300,
                expression=self._insights_sum("requests.denied"),
            )],
        )
        alarms: list[cloudwatch.IAlarm] = [
            self.no_healthy_targets_alarm, self.high_cpu_alarm,
            cloudwatch.Alarm.from_alarm_arn(self, "ReloadFailuresRef", self.reload_failure_alarm.attr_arn),
            cloudwatch.Alarm.from_alarm_arn(self, "DeniedRequestsSurgeRef", self.denied_surge_alarm.attr_arn),
        ]
        for raw in (self.reload_failure_alarm, self.denied_surge_alarm):
            raw.alarm_actions = [alarm_topic.topic_arn]
        for alarm in (self.no_healthy_targets_alarm, self.high_cpu_alarm):
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(alarm_topic))
        if eip_claim is not None:
            alarms += self._eip_alarms(eip_claim)
        if auto_scaling_group is not None:
            # Launch failures (capacity, limits, a bad AMI or instance type) are events, not metrics.
            events.Rule(
                self, "LaunchUnsuccessful",
                description="egress-proxy: an instance launch of the proxy group failed",
                event_pattern=events.EventPattern(
                    source=["aws.autoscaling"], detail_type=["EC2 Instance Launch Unsuccessful"],
                    detail={"AutoScalingGroupName": [auto_scaling_group.auto_scaling_group_name]}),
                targets=[events_targets.SnsTopic(alarm_topic)],
            )

        self.dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=Fn.join("-", [Aws.STACK_NAME, Aws.REGION]),
            default_interval=Duration.hours(3),
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", width=24, height=3, alarms=alarms),
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

    def _eip_alarms(self, eip_claim: EipClaimHook) -> list[cloudwatch.IAlarm]:
        """Pool exhausted (the claim function's log line) and claim errors (the function failing)."""
        exhausted_metric = logs.MetricFilter(
            self, "EipPoolExhaustedFilter", log_group=eip_claim.log_group,
            filter_pattern=logs.FilterPattern.literal(f'"{POOL_EXHAUSTED_MARKER}"'),
            metric_namespace=self._namespace, metric_name="eip.pool_exhausted", metric_value="1",
        ).metric(statistic="Sum", period=Duration.minutes(5))
        exhausted = exhausted_metric.create_alarm(
            self, "EipPoolExhausted",
            alarm_description="egress-proxy: a launching instance found no free Elastic IP and was abandoned. "
                              "Raise eipPoolSize (and redeploy) or lower MaxCapacity.",
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD, threshold=1,
            evaluation_periods=1, treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        errors = eip_claim.function.metric_errors(period=Duration.minutes(5)).create_alarm(
            self, "EipClaimErrors",
            alarm_description="egress-proxy: the Elastic IP claim function failed; launching instances wait for "
                              "the lifecycle hook's timeout and are abandoned. See the function's log group.",
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD, threshold=1,
            evaluation_periods=1, treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        for alarm in (exhausted, errors):
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(self._alarm_topic))
        return [exhausted, errors]

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
