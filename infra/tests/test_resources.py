"""Every property the issue lists for the load balancer, services, security, IAM, logs and monitoring."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk.assertions import Match
from infra_synth import Synth

SEED_METRICS = ("client_http.errors", "client_http.hits", "client_http.kbytes_in", "client_http.kbytes_out",
                "client_http.requests", "server.all.errors", "server.all.kbytes_in", "server.all.kbytes_out",
                "server.all.requests")


def _attributes(resource: dict[str, Any], key: str) -> dict[str, str]:
    return {a["Key"]: a["Value"] for a in resource["Properties"][key]}


# --- load balancer -------------------------------------------------------------------------------------

def test_nlb_is_internal_in_the_private_subnets_with_zonal_dns_affinity(synth: Synth) -> None:
    _, nlb = synth.only("AWS::ElasticLoadBalancingV2::LoadBalancer")
    props = nlb["Properties"]
    assert props["Type"] == "network" and props["Scheme"] == "internal"
    assert props["Subnets"] == {"Ref": "PrivateSubnetIds"}
    assert "SubnetMappings" not in props
    attributes = _attributes(nlb, "LoadBalancerAttributes")
    assert attributes["load_balancing.cross_zone.enabled"] == "true"  # the target group's setting decides
    assert attributes["dns_record.client_routing_policy"] == {"Ref": "ClientRoutingPolicy"}
    assert len(props["SecurityGroups"]) == 1
    parameters = synth.data["Parameters"]
    assert parameters["ClientRoutingPolicy"]["Default"] == "availability_zone_affinity"
    assert sorted(parameters["ClientRoutingPolicy"]["AllowedValues"]) == [
        "any_availability_zone", "availability_zone_affinity", "partial_availability_zone_affinity"]
    assert parameters["CrossZoneLoadBalancing"]["Default"] == "true"


def test_cross_zone_is_the_target_groups_with_dns_failover_for_empty_zones(synth: Synth) -> None:
    """The target group's setting wins over the NLB's (Elastic Load Balancing User Guide for NLBs, "Cross-zone
    load balancing for target groups"); with it off, an AZ without a healthy proxy leaves the NLB's DNS."""
    _, tg = synth.only("AWS::ElasticLoadBalancingV2::TargetGroup")
    attributes = _attributes(tg, "TargetGroupAttributes")
    assert attributes["load_balancing.cross_zone.enabled"] == {"Ref": "CrossZoneLoadBalancing"}
    assert attributes["target_group_health.dns_failover.minimum_healthy_targets.count"] == "1"


def test_listener_is_tcp_on_the_proxy_port(synth: Synth) -> None:
    synth.template.has_resource_properties("AWS::ElasticLoadBalancingV2::Listener", {
        "Port": {"Ref": "ProxyPort"}, "Protocol": "TCP",
        "DefaultActions": [{"Type": "forward", "TargetGroupArn": Match.any_value()}],
    })


def test_target_group_health_check_and_drain(synth: Synth) -> None:
    _, tg = synth.only("AWS::ElasticLoadBalancingV2::TargetGroup")
    props = tg["Properties"]
    assert props["Port"] == {"Ref": "ProxyPort"} and props["Protocol"] == "TCP"
    assert props["HealthCheckProtocol"] == "TCP" and props["HealthCheckPort"] == "traffic-port"
    assert props["TargetType"] == ("instance" if synth.mode == "ec2" else "ip")
    attributes = _attributes(tg, "TargetGroupAttributes")
    # A stopping proxy keeps its connections this long (no new ones) before ECS sends SIGTERM; AWS's default.
    assert attributes["deregistration_delay.timeout_seconds"] == {"Ref": "DeregistrationDelaySeconds"}
    delay = synth.data["Parameters"]["DeregistrationDelaySeconds"]
    assert (delay["Default"], delay["MinValue"], delay["MaxValue"]) == (300, 0, 3600)
    # The proxy's own ACL (EGRESS_CLIENT_CIDRS) must see the real client address.
    assert attributes["preserve_client_ip.enabled"] == "true"


# --- ECS service ----------------------------------------------------------------------------------------

def test_rolling_deployment_with_circuit_breaker_rollback(synth: Synth) -> None:
    _, service = synth.only("AWS::ECS::Service")
    config = service["Properties"]["DeploymentConfiguration"]
    assert config["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert config["MinimumHealthyPercent"] == 100
    assert config["MaximumPercent"] == 200
    # The pinned flag @aws-cdk/aws-ecs:disableExplicitDeploymentControllerForCircuitBreaker leaves the
    # controller implicit; ECS's default is the rolling (ECS) controller the circuit breaker works with.
    assert service["Properties"].get("DeploymentController", {"Type": "ECS"}) == {"Type": "ECS"}
    assert service["Properties"]["HealthCheckGracePeriodSeconds"] == 60
    assert "DesiredCount" not in service["Properties"]  # owned by autoscaling, not reset by stack updates
    (lb,) = service["Properties"]["LoadBalancers"]
    assert lb["ContainerName"] == "proxy" and lb["ContainerPort"] == {"Ref": "ProxyPort"}


def test_fargate_tasks_run_in_public_subnets_with_public_ips(fargate: Synth) -> None:
    _, service = fargate.only("AWS::ECS::Service")
    network = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["AssignPublicIp"] == "ENABLED"
    assert network["Subnets"] == {"Ref": "PublicSubnetIds"}
    assert service["Properties"]["LaunchType"] == "FARGATE"


def test_ec2_service_one_task_per_instance_spread_across_azs(ec2: Synth) -> None:
    _, service = ec2.only("AWS::ECS::Service")
    props = service["Properties"]
    assert props["PlacementConstraints"] == [{"Type": "distinctInstance"}]
    assert props["PlacementStrategies"] == [{"Type": "spread", "Field": "attribute:ecs.availability-zone"}]
    capacity_provider = ec2.only("AWS::ECS::CapacityProvider")[0]
    assert props["CapacityProviderStrategy"] == [{"CapacityProvider": {"Ref": capacity_provider}, "Weight": 1}]
    _, provider = ec2.only("AWS::ECS::CapacityProvider")
    asg_provider = provider["Properties"]["AutoScalingGroupProvider"]
    assert asg_provider["ManagedScaling"]["Status"] == "ENABLED"
    assert asg_provider["ManagedTerminationProtection"] == "ENABLED"


def test_cpu_target_tracking_between_min_and_max_parameters(synth: Synth) -> None:
    _, target = synth.only("AWS::ApplicationAutoScaling::ScalableTarget")
    assert target["Properties"]["MinCapacity"] == {"Ref": "MinCapacity"}
    assert target["Properties"]["MaxCapacity"] == {"Ref": "MaxCapacity"}
    assert target["Properties"]["ScalableDimension"] == "ecs:service:DesiredCount"
    _, policy = synth.only("AWS::ApplicationAutoScaling::ScalingPolicy")
    config = policy["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert policy["Properties"]["PolicyType"] == "TargetTrackingScaling"
    assert config["PredefinedMetricSpecification"]["PredefinedMetricType"] == "ECSServiceAverageCPUUtilization"
    assert config["TargetValue"] == 60


def test_cluster_has_container_insights_unless_switched_off(synth: Synth) -> None:
    synth.template.has_resource_properties("AWS::ECS::Cluster", {
        "ClusterSettings": [{"Name": "containerInsights", "Value": {"Ref": "ContainerInsights"}}]})
    parameter = synth.data["Parameters"]["ContainerInsights"]
    assert parameter["Default"] == "enabled" and sorted(parameter["AllowedValues"]) == ["disabled", "enabled",
                                                                                          "enhanced"]


# --- task definition: the container contract ------------------------------------------------------------

def _container(synth: Synth) -> dict[str, Any]:
    _, task = synth.only("AWS::ECS::TaskDefinition")
    (container,) = task["Properties"]["ContainerDefinitions"]
    return container


def test_container_environment_is_the_contract(synth: Synth) -> None:
    env = {e["Name"]: e["Value"] for e in _container(synth)["Environment"]}
    secret = synth.only("AWS::SecretsManager::Secret")[0]
    assert env == {
        "EGRESS_PORT": {"Ref": "ProxyPort"},
        "EGRESS_ALLOWLIST_SECRET": {"Ref": secret},
        "EGRESS_DNS_SERVERS": {"Ref": "DnsServers"},
        "EGRESS_CLIENT_CIDRS": {"Ref": "ClientCidr"},
        "EGRESS_RELOAD_INTERVAL": {"Ref": "ReloadIntervalSeconds"},
        "EGRESS_DRAIN_SECONDS": {"Ref": "DrainSeconds"},
        "EGRESS_TUNNEL_IDLE_TIMEOUT": "350",  # the NLB's TCP idle timeout (test_quality.py)
        "EGRESS_METRICS": "on",
        "EGRESS_METRICS_NAMESPACE": {"Ref": "MetricsNamespace"},
        "EGRESS_METRICS_INTERVAL": "60",
        "EGRESS_STATE_DIR": "/var/lib/egress-proxy",
        "EGRESS_ALLOWED_PORTS": "http:80,connect:443",
        "AWS_REGION": {"Ref": "AWS::Region"},
        "AWS_DEFAULT_REGION": {"Ref": "AWS::Region"},
    }


def test_container_health_check_stop_timeout_and_logs(synth: Synth) -> None:
    container = _container(synth)
    assert container["Name"] == "proxy" and container["Essential"] is True
    assert container["HealthCheck"]["Command"] == ["CMD-SHELL", "egress-proxy health"]
    # SIGKILL as late as Fargate allows; the drain (at most 105 s) ends with a margin before it.
    assert container["StopTimeout"] == 120
    drain = synth.data["Parameters"]["DrainSeconds"]
    assert (drain["Default"], drain["MinValue"], drain["MaxValue"]) == (30, 0, 105)
    (log_group,) = [k for k in synth.resources("AWS::Logs::LogGroup") if "AccessLogs" in k]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    options = container["LogConfiguration"]["Options"]
    assert options["awslogs-group"] == {"Ref": log_group}
    # Pinned, never the account default (non-blocking since mid-2025); a buffer size only in non-blocking mode.
    assert options["mode"] == {"Ref": "LogDriverMode"}
    assert synth.data["Parameters"]["LogDriverMode"]["Default"] == "blocking"
    assert options["max-buffer-size"] == {"Fn::If": ["NonBlockingLogs", "25m", {"Ref": "AWS::NoValue"}]}
    assert synth.data["Conditions"]["NonBlockingLogs"] == {"Fn::Equals": [{"Ref": "LogDriverMode"}, "non-blocking"]}
    (mapping,) = container["PortMappings"]
    assert mapping["ContainerPort"] == {"Ref": "ProxyPort"} and mapping["Protocol"] == "tcp"


def test_fargate_task_shape(fargate: Synth) -> None:
    _, task = fargate.only("AWS::ECS::TaskDefinition")
    props = task["Properties"]
    assert props["NetworkMode"] == "awsvpc" and props["RequiresCompatibilities"] == ["FARGATE"]


def test_ec2_task_uses_host_networking(ec2: Synth) -> None:
    _, task = ec2.only("AWS::ECS::TaskDefinition")
    assert task["Properties"]["NetworkMode"] == "host"
    (mapping,) = _container(ec2)["PortMappings"]
    assert mapping["HostPort"] == {"Ref": "ProxyPort"}


def test_log_group_retention_is_the_parameter(synth: Synth) -> None:
    (log_group,) = [g for k, g in synth.resources("AWS::Logs::LogGroup").items() if "AccessLogs" in k]
    assert log_group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert log_group["DeletionPolicy"] == "Retain"


def test_allowlist_secret_is_created_from_allowed_domains(synth: Synth) -> None:
    _, secret = synth.only("AWS::SecretsManager::Secret")
    assert secret["Properties"]["SecretString"]["Fn::If"][2] == {"Ref": "AllowedDomains"}


# --- security groups -----------------------------------------------------------------------------------

def _all_ingress(synth: Synth) -> list[tuple[str, dict[str, Any]]]:
    """Ingress of the proxy path (the optional VPC endpoints' group is checked in test_hardening.py)."""
    rules = []
    for logical_id, group in synth.resources("AWS::EC2::SecurityGroup").items():
        if logical_id.startswith("VpcEndpoints"):
            continue
        rules += [(logical_id, rule) for rule in group["Properties"].get("SecurityGroupIngress", [])]
    for rule in synth.resources("AWS::EC2::SecurityGroupIngress").values():
        rules.append((rule["Properties"]["GroupId"]["Fn::GetAtt"][0], rule["Properties"]))
    return rules


def test_only_client_cidr_reaches_the_proxy_port(synth: Synth) -> None:
    groups = synth.resources("AWS::EC2::SecurityGroup")
    (lb_sg,) = [k for k in groups if k.startswith("LoadBalancer")]
    (proxy_sg,) = [k for k in groups if k.startswith("Proxies")]
    ingress = _all_ingress(synth)
    assert len(ingress) == 2
    by_group = dict(ingress)
    port = {"Ref": "ProxyPort"}
    # The client gate: ClientCidr on ProxyPort, nothing else.
    assert {k: by_group[lb_sg][k] for k in ("IpProtocol", "CidrIp", "FromPort", "ToPort")} == {
        "IpProtocol": "tcp", "CidrIp": {"Ref": "ClientCidr"}, "FromPort": port, "ToPort": port}
    # The proxies accept only what the NLB forwards (client traffic and its health checks).
    assert by_group[proxy_sg]["SourceSecurityGroupId"] == {"Fn::GetAtt": [lb_sg, "GroupId"]}
    assert by_group[proxy_sg]["FromPort"] == port and by_group[proxy_sg]["ToPort"] == port
    # The NLB may only talk to the proxies.
    egress = [r["Properties"] for r in synth.resources("AWS::EC2::SecurityGroupEgress").values()
              if r["Properties"]["GroupId"] == {"Fn::GetAtt": [lb_sg, "GroupId"]}]
    assert egress and all(e["DestinationSecurityGroupId"] == {"Fn::GetAtt": [proxy_sg, "GroupId"]} for e in egress)


# --- IAM -----------------------------------------------------------------------------------------------

def _policy_statements(synth: Synth, name_part: str) -> list[dict[str, Any]]:
    (policy,) = [p for k, p in synth.resources("AWS::IAM::Policy").items() if name_part in k]
    return policy["Properties"]["PolicyDocument"]["Statement"]


def test_task_role_reads_only_the_secret_and_puts_only_its_namespace(synth: Synth) -> None:
    secret = synth.only("AWS::SecretsManager::Secret")[0]
    statements = _policy_statements(synth, "TaskRole")
    assert statements == [
        {"Action": ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"], "Effect": "Allow",
         "Resource": {"Ref": secret}},
        {"Action": "cloudwatch:PutMetricData", "Effect": "Allow", "Resource": "*",
         "Condition": {"StringEquals": {"cloudwatch:namespace": {"Ref": "MetricsNamespace"}}}},
    ]
    task_role = [k for k in synth.resources("AWS::IAM::Role") if "TaskRole" in k]
    assert len(task_role) == 1
    assert "ManagedPolicyArns" not in synth.data["Resources"][task_role[0]]["Properties"]


def test_execution_role_pulls_the_image_and_writes_logs(synth: Synth) -> None:
    actions = {a for s in _policy_statements(synth, "ExecutionRole")
               for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    logs = {"logs:CreateLogStream", "logs:PutLogEvents"}
    pull = {"ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage",
            "ecr:GetAuthorizationToken"}
    # The fargate fixture uses a public image (nothing to pull with credentials), the ec2 fixture an ECR one.
    assert actions == (logs | pull if ".dkr.ecr." in synth.context["imageUri"] else logs)


# --- monitoring ----------------------------------------------------------------------------------------

def _dashboard_body(synth: Synth) -> str:
    _, dashboard = synth.only("AWS::CloudWatch::Dashboard")
    return json.dumps(dashboard["Properties"]["DashboardBody"])


def test_dashboard_shows_the_seed_metrics_denied_requests_and_reloads(synth: Synth) -> None:
    body = _dashboard_body(synth)
    for metric in (*SEED_METRICS, "requests.denied", "requests.allowed", "reload.success", "reload.failure",
                   "allowlist.entries", "config.age_seconds"):
        assert f'MetricName=\\\\\\"{metric}\\\\\\"' in body, metric
    assert "ProxyInstance" in body and '{"Ref": "MetricsNamespace"}' in body
    assert "HealthyHostCount" in body and "CPUUtilization" in body


def _alarms(synth: Synth) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in synth.resources("AWS::CloudWatch::Alarm").items()}


def test_alarm_on_no_healthy_targets(synth: Synth) -> None:
    (alarm,) = [a for a in _alarms(synth).values() if a.get("MetricName") == "HealthyHostCount"]
    assert alarm["Namespace"] == "AWS/NetworkELB"
    assert alarm["ComparisonOperator"] == "LessThanThreshold" and alarm["Threshold"] == 1
    assert alarm["TreatMissingData"] == "breaching"
    assert {d["Name"] for d in alarm["Dimensions"]} == {"LoadBalancer", "TargetGroup"}


def test_alarm_on_reload_failures_across_all_proxies(synth: Synth) -> None:
    (alarm,) = [a for a in _alarms(synth).values() if "reload.failure" in json.dumps(a.get("Metrics", ""))]
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold" and alarm["Threshold"] == 0
    (query,) = alarm["Metrics"]
    expression = json.dumps(query["Expression"])
    assert 'SELECT SUM(\\"reload.failure\\") FROM SCHEMA(\\"' in expression
    assert '{"Ref": "MetricsNamespace"}' in expression and "ProxyInstance" in expression


def test_alarm_on_high_cpu(synth: Synth) -> None:
    (alarm,) = [a for a in _alarms(synth).values() if a.get("MetricName") == "CPUUtilization"]
    assert alarm["Namespace"] == "AWS/ECS"
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold" and alarm["Threshold"] == 85


def test_alarm_on_a_surge_of_denied_requests(synth: Synth) -> None:
    (alarm,) = [a for a in _alarms(synth).values() if "requests.denied" in json.dumps(a.get("Metrics", ""))]
    assert alarm["Threshold"] == {"Ref": "DeniedRequestsAlarmThreshold"}
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    (query,) = alarm["Metrics"]
    assert query["Period"] == 300 and 'SELECT SUM(\\"requests.denied\\")' in json.dumps(query["Expression"])


def test_every_alarm_notifies_the_topic(synth: Synth) -> None:
    topic = synth.only("AWS::SNS::Topic")[0]
    alarms = _alarms(synth)
    assert len(alarms) == (8 if synth.mode == "ec2" else 5)
    for name, alarm in alarms.items():
        assert alarm["AlarmActions"] == [{"Ref": topic}], name
    (subscription,) = synth.resources("AWS::SNS::Subscription").values()
    assert subscription["Condition"] == "HasAlarmEmail"
    assert subscription["Properties"] == {"TopicArn": {"Ref": topic}, "Protocol": "email",
                                          "Endpoint": {"Ref": "AlarmEmail"}}
    # The topic refuses unencrypted publishing (aws:SecureTransport).
    (policy,) = synth.resources("AWS::SNS::TopicPolicy").values()
    assert "aws:SecureTransport" in json.dumps(policy)


def test_ec2_alarms_on_pool_exhaustion_claim_errors_and_failed_launches(ec2: Synth) -> None:
    alarms = _alarms(ec2)
    (exhausted,) = [a for a in alarms.values() if a.get("MetricName") == "eip.pool_exhausted"]
    assert exhausted["Namespace"] == {"Ref": "MetricsNamespace"} and exhausted["Threshold"] == 1
    (metric_filter,) = [f for k, f in ec2.resources("AWS::Logs::MetricFilter").items() if "EipPool" in k]
    claim_logs = [k for k in ec2.resources("AWS::Logs::LogGroup") if "EipClaim" in k][0]
    assert metric_filter["Properties"]["LogGroupName"] == {"Ref": claim_logs}
    assert metric_filter["Properties"]["FilterPattern"] == '"egress-proxy: no free Elastic IP in pool"'
    (errors,) = [a for a in alarms.values() if a.get("MetricName") == "Errors"]
    claim_function = [k for k in ec2.resources("AWS::Lambda::Function") if "EipClaim" in k][0]
    assert errors["Namespace"] == "AWS/Lambda" and errors["Dimensions"] == [
        {"Name": "FunctionName", "Value": {"Ref": claim_function}}]
    (launch_rule,) = [r for k, r in ec2.resources("AWS::Events::Rule").items() if "LaunchUnsuccessful" in k]
    asg = ec2.only("AWS::AutoScaling::AutoScalingGroup")[0]
    assert launch_rule["Properties"]["EventPattern"] == {
        "source": ["aws.autoscaling"], "detail-type": ["EC2 Instance Launch Unsuccessful"],
        "detail": {"AutoScalingGroupName": [{"Ref": asg}]}}
    topic = ec2.only("AWS::SNS::Topic")[0]
    assert launch_rule["Properties"]["Targets"][0]["Arn"] == {"Ref": topic}
    # EventBridge may publish to the topic for this rule of this account only (no confused deputy).
    (policy,) = ec2.resources("AWS::SNS::TopicPolicy").values()
    (events_statement,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"]
                           if s.get("Principal") == {"Service": "events.amazonaws.com"}]
    launch_rule_id = [k for k in ec2.resources("AWS::Events::Rule") if "LaunchUnsuccessful" in k][0]
    assert events_statement["Condition"] == {
        "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}},
        "ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": [launch_rule_id, "Arn"]}}}
    # A refresh that could not start (lambda_src/group_maintenance.py logs the marker) alarms too.
    (refresh,) = [a for a in alarms.values() if a.get("MetricName") == "instances.refresh_not_started"]
    (refresh_filter,) = [f for k, f in ec2.resources("AWS::Logs::MetricFilter").items() if "Refresh" in k]
    maintenance_logs = [k for k in ec2.resources("AWS::Logs::LogGroup") if "GroupMaintenance" in k][0]
    assert refresh_filter["Properties"]["LogGroupName"] == {"Ref": maintenance_logs}
    assert refresh_filter["Properties"]["FilterPattern"] == '"egress-proxy: instance refresh not started"'
    assert refresh["Threshold"] == 1


def test_fargate_topic_lets_nothing_but_tls_publishers_in(fargate: Synth) -> None:
    (policy,) = fargate.resources("AWS::SNS::TopicPolicy").values()
    assert "events.amazonaws.com" not in json.dumps(policy)


def test_alarm_on_dropped_access_log_lines(synth: Synth) -> None:
    (alarm,) = [a for a in _alarms(synth).values() if "log.lines_dropped" in json.dumps(a.get("Metrics", ""))]
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold" and alarm["Threshold"] == 0
    (query,) = alarm["Metrics"]
    assert 'SELECT SUM(\\"log.lines_dropped\\") FROM SCHEMA(\\"' in json.dumps(query["Expression"])
