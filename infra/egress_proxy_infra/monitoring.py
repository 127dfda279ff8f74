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
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra.ec2_lifecycle import (
    POOL_EXHAUSTED_MARKER,
    REFRESH_NOT_STARTED_MARKER,
    EipClaimHook,
    GroupMaintenance,
)
from egress_proxy_infra.transparent_mode import IPV6_BYPASS_MARKER

#: Dimension the proxy puts on every metric: the task ID (fargate) or instance ID (ec2).
INSTANCE_DIMENSION = "ProxyInstance"
#: The seed's nine Squid counters, published as per-second rates.
SEED_METRICS = (
    "client_http.errors", "client_http.hits", "client_http.kbytes_in", "client_http.kbytes_out",
    "client_http.requests", "server.all.errors", "server.all.kbytes_in", "server.all.kbytes_out",
    "server.all.requests",
)
DECISION_METRICS = ("requests.allowed", "requests.denied", "requests.would_deny")
RELOAD_METRICS = ("reload.success", "reload.failure")
CONFIG_METRICS = ("allowlist.entries", "config.age_seconds")
#: Access-log lines the proxy dropped (its bounded log buffer was full because the log sink stalled).
LOG_DROP_METRIC = "log.lines_dropped"
#: Squid workers running, and how many the proxy runs: fewer up than configured is a degraded proxy.
WORKER_METRICS = ("workers.up", "workers.configured")
#: Logs Insights over the access log (fields from entrypoint/egress_proxy/access_log.py): what was refused, by
#: which policy and why; who was refused; and what report mode would refuse.
REFUSALS_QUERY = ('filter type = "access" and decision = "denied"',
                  "stats count(*) as requests by host, policy, reason",
                  "sort requests desc", "limit 20")
REFUSED_CLIENTS_QUERY = ('filter type = "access" and decision = "denied"',
                         "stats count(*) as requests, count_distinct(host) as hosts by client_ip, policy, reason",
                         "sort requests desc", "limit 20")
WOULD_DENY_QUERY = ('filter type = "access" and decision = "would_deny"',
                    "stats count(*) as requests by host, policy, reason",
                    "sort requests desc", "limit 20")
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
    failures, high CPU, a surge of denied requests, dropped access-log lines, and in EC2 mode an exhausted
    Elastic IP pool, failing Elastic IP claims, failed instance launches and an instance refresh not started; in
    transparent mode, the route failover function failing, and without IPv6 a route table whose ::/0 bypasses the
    proxy.

    The dashboard shows what was refused and who was refused (Logs Insights over the access log), next to the
    proxy's own figures.

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
        access_logs: logs.ILogGroup,
        eip_claim: EipClaimHook | None = None,
        auto_scaling_group: autoscaling.IAutoScalingGroup | None = None,
        maintenance: GroupMaintenance | None = None,
        ipv6_bypass_log_group: logs.ILogGroup | None = None,
        route_failover: lambda_.IFunction | None = None,
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

        self.reload_failure_alarm = self._fleet_sum_alarm(
            "ReloadFailures", "reload.failure", threshold=0,
            description="egress-proxy: a proxy failed to apply the allowlist secret; it keeps serving the last good "
                        "allowlist. See the access log group for the reason.")

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
        self.denied_surge_alarm = self._fleet_sum_alarm(
            "DeniedRequestsSurge", "requests.denied", threshold=denied_requests_threshold,
            description="egress-proxy: many denied requests across all proxies (DeniedRequestsAlarmThreshold per 5 "
                        "minutes). The access log group says which clients and destinations.")
        # Lost access-log lines are lost audit trail: the proxy kept proxying while its log sink stalled.
        self.log_lines_dropped_alarm = self._fleet_sum_alarm(
            "LogLinesDropped", LOG_DROP_METRIC, threshold=0,
            description="egress-proxy: a proxy dropped access-log lines (its log buffer was full while CloudWatch "
                        "Logs stalled); those requests are missing from the access log.")
        alarms: list[cloudwatch.IAlarm] = [
            self.no_healthy_targets_alarm, self.high_cpu_alarm,
            cloudwatch.Alarm.from_alarm_arn(self, "ReloadFailuresRef", self.reload_failure_alarm.attr_arn),
            cloudwatch.Alarm.from_alarm_arn(self, "DeniedRequestsSurgeRef", self.denied_surge_alarm.attr_arn),
            cloudwatch.Alarm.from_alarm_arn(self, "LogLinesDroppedRef", self.log_lines_dropped_alarm.attr_arn),
        ]
        for raw in (self.reload_failure_alarm, self.denied_surge_alarm, self.log_lines_dropped_alarm):
            raw.alarm_actions = [alarm_topic.topic_arn]
        for alarm in (self.no_healthy_targets_alarm, self.high_cpu_alarm):
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(alarm_topic))
        if eip_claim is not None:
            alarms += self._eip_alarms(eip_claim)
        if maintenance is not None:
            alarms.append(self._log_marker_alarm(
                "InstanceRefreshNotStarted", log_group=maintenance.log_group, marker=REFRESH_NOT_STARTED_MARKER,
                metric_name="instances.refresh_not_started",
                description="egress-proxy: the launch template changed (AMI or instance type) but no instance "
                            "refresh could be started; the running instances keep the old one. See the "
                            "maintenance function's log, then start the refresh by hand."))
        if ipv6_bypass_log_group is not None:
            alarms.append(self._log_marker_alarm(
                "Ipv6RoutesBypassProxy", log_group=ipv6_bypass_log_group, marker=IPV6_BYPASS_MARKER,
                metric_name="routes.ipv6_bypass",
                description="egress-proxy: a transparent route table sends IPv6 (::/0) past the proxy, to a "
                            "gateway: its IPv6 clients are not filtered. Deploy with -c transparentIpv6=on (the "
                            "proxy then takes that route over), or remove the route. The route failover "
                            "function's log names the table."))
        if route_failover is not None:
            alarms.append(self._function_errors_alarm(
                "RouteFailoverErrors", route_failover,
                description="egress-proxy: the route failover function failed; the private subnets' routes are "
                            "left as they were, possibly on a failed instance (no failover, no failback). It runs "
                            "every minute: see its log group for the error."))
        if auto_scaling_group is not None:
            # Launch failures (capacity, limits, a bad AMI or instance type) are events, not metrics.
            launch_failures = events.Rule(
                self, "LaunchUnsuccessful",
                description="egress-proxy: an instance launch of the proxy group failed",
                event_pattern=events.EventPattern(
                    source=["aws.autoscaling"], detail_type=["EC2 Instance Launch Unsuccessful"],
                    detail={"AutoScalingGroupName": [auto_scaling_group.auto_scaling_group_name]}),
                # Through an imported handle: the target would otherwise let events.amazonaws.com publish with no
                # condition; the statement below names this rule instead.
                targets=[events_targets.SnsTopic(
                    sns.Topic.from_topic_arn(self, "AlarmTopicForRules", alarm_topic.topic_arn))],
            )
            alarm_topic.add_to_resource_policy(iam.PolicyStatement(
                sid="ThisStacksLaunchFailureRuleOnly", actions=["sns:Publish"],
                principals=[iam.ServicePrincipal("events.amazonaws.com")], resources=[alarm_topic.topic_arn],
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
                            "ArnEquals": {"aws:SourceArn": launch_failures.rule_arn}}))

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
            cloudwatch.GraphWidget(title="Healthy proxies (NLB)", left=[healthy_hosts], width=6),
            cloudwatch.GraphWidget(title="Service CPU / memory (%)",
                                   left=[service.metric_cpu_utilization(), service.metric_memory_utilization()],
                                   width=6),
            self._search_graph(*WORKER_METRICS, title="Squid workers up / configured", stat="Minimum"),
            self._search_graph(LOG_DROP_METRIC, title="Access-log lines dropped", stat="Sum"),
        )
        log_groups = [access_logs.log_group_name]
        self.dashboard.add_widgets(
            cloudwatch.LogQueryWidget(title="Refused: top hosts by policy and reason", width=8, height=8,
                                      log_group_names=log_groups, query_lines=list(REFUSALS_QUERY)),
            cloudwatch.LogQueryWidget(title="Refused: top clients by policy and reason", width=8, height=8,
                                      log_group_names=log_groups, query_lines=list(REFUSED_CLIENTS_QUERY)),
            cloudwatch.LogQueryWidget(title="Report mode: top would_deny hosts", width=8, height=8,
                                      log_group_names=log_groups, query_lines=list(WOULD_DENY_QUERY)),
        )

    def _fleet_sum_alarm(self, id: str, metric_name: str, *, threshold: float, description: str) -> cloudwatch.CfnAlarm:
        """An alarm when the sum of `metric_name` over every proxy in 5 minutes is above `threshold`.

        Alarms cannot use SEARCH, but they can use a Metrics Insights query, which sums over every ProxyInstance
        present in the period (proxies come and go).
        """
        return cloudwatch.CfnAlarm(
            self, id, alarm_description=description,
            comparison_operator="GreaterThanThreshold", threshold=threshold, evaluation_periods=1,
            treat_missing_data="notBreaching",
            metrics=[cloudwatch.CfnAlarm.MetricDataQueryProperty(
                id=id[0].lower() + id[1:], return_data=True, period=300,
                expression=self._insights_sum(metric_name),
            )],
        )

    def _log_marker_alarm(self, id: str, *, log_group: logs.ILogGroup, marker: str, metric_name: str,
                          description: str) -> cloudwatch.Alarm:
        """An alarm on a Lambda function's log line (a metric filter counting `marker`), notifying the topic."""
        metric = logs.MetricFilter(
            self, f"{id}Filter", log_group=log_group, filter_pattern=logs.FilterPattern.literal(f'"{marker}"'),
            metric_namespace=self._namespace, metric_name=metric_name, metric_value="1",
        ).metric(statistic="Sum", period=Duration.minutes(5))
        alarm = metric.create_alarm(
            self, id, alarm_description=description,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD, threshold=1,
            evaluation_periods=1, treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(cloudwatch_actions.SnsAction(self._alarm_topic))
        return alarm

    def _eip_alarms(self, eip_claim: EipClaimHook) -> list[cloudwatch.IAlarm]:
        """Pool exhausted (the claim function's log line) and claim errors (the function failing)."""
        exhausted = self._log_marker_alarm(
            "EipPoolExhausted", log_group=eip_claim.log_group, marker=POOL_EXHAUSTED_MARKER,
            metric_name="eip.pool_exhausted",
            description="egress-proxy: a launching instance found no free Elastic IP and was abandoned. "
                        "Raise eipPoolSize (and redeploy) or lower MaxCapacity.")
        errors = self._function_errors_alarm(
            "EipClaimErrors", eip_claim.function,
            description="egress-proxy: the Elastic IP claim function failed; launching instances wait for the "
                        "lifecycle hook's timeout and are abandoned. See the function's log group.")
        return [exhausted, errors]

    def _function_errors_alarm(self, id: str, function: lambda_.IFunction, *, description: str) -> cloudwatch.Alarm:
        """An alarm when one of our Lambda functions fails (AWS/Lambda Errors, any in 5 minutes), notifying the
        topic."""
        alarm = function.metric_errors(period=Duration.minutes(5)).create_alarm(
            self, id, alarm_description=description,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD, threshold=1,
            evaluation_periods=1, treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(cloudwatch_actions.SnsAction(self._alarm_topic))
        return alarm

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
