"""EC2 mode's transparent mode (`-c transparent=on`): the proxy instances become the default route of the private
subnets, a NAT replacement that filters by name, with the same fixed Elastic IPs.

* The task runs with EGRESS_TRANSPARENT=on: Squid opens its intercept ports beside the explicit one.
* The instances apply the product's own nftables ruleset (`egress-proxy nft-rules`, rendered here at synth
  time with ClientCidr substituted at deploy time) from a boot unit, before Docker and ECS start, and power off
  if they cannot: the container never holds NET_ADMIN, so code it confines cannot flush its rules.
* The security group admits ClientCidr on every port and protocol; the host rules decide (redirect tcp/80 and
  tcp/443 to Squid, count and drop everything else).
* `route_failover` (lambda_src/) points each route table in TransparentRouteTableIds at a healthy instance of its
  own AZ, else of another AZ (and back), and turns off source/dest checking; on every EC2 state change and every
  minute. Never at a NAT gateway: a failover that bypasses the filter is no failover for an egress filter.

* A policy's extra ports (``"ports": ["github.com:22"]``): a systemd timer on the instance runs
  ``egress-proxy nft-sets`` in the proxy container every 15 s (it resolves the loaded policies' names with the VPC
  resolver the clients use) and applies the transaction only if every line is in the grammar the host accepts
  (``nft_rules.PORT_SET_LINE``): the container can fill the ports sets, and do nothing else to the host's rules.
  The security group lets out only the ports in ``-c transparentExtraPorts`` besides 80 and 443 (to any address:
  the sets pick the addresses). Only the group knows that list: in the user data, changing it would replace every
  instance (a new launch template version), where a security group rule changes in place.

* IPv6 (`-c transparentIpv6=on`): the ClientIpv6Cidr parameter's range is admitted, intercepted and routed too
  (``::/0`` moves with ``0.0.0.0/0``, replacing an egress-only gateway's route); each instance gets an IPv6 address
  of its public subnet and may connect out over IPv6 on the proxy ports. Off, the function only logs a ``::/0``
  that bypasses the proxy.

Intercepted traffic leaves from the instance's Elastic IP: Squid opens the outbound connection itself. A policy's
extra-port flows are forwarded and masqueraded to the instance's address, so they leave from the same Elastic IP.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from aws_cdk import CfnParameter, Duration, Fn, Stack
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from egress_proxy_infra.config import REPO_ROOT
from egress_proxy_infra.ec2_lifecycle import _function
from egress_proxy_infra.eip_pool import POOL_TAG_KEY
from egress_proxy_infra.l1 import l1
from egress_proxy_infra.proxy_service import Ec2ProxyService, allow_proxied_egress
from egress_proxy_infra.proxy_task import CONTAINER_NAME, ProxyTask

NFT_UNIT = "egress-proxy-nft.service"
NFT_RULES_PATH = "/etc/egress-proxy/transparent.nft"
PORTS_UNIT = "egress-proxy-ports"
PORTS_SCRIPT_PATH = "/usr/local/sbin/egress-proxy-ports-refresh"
#: How often the host refreshes the ports sets. A name's address stays open at least EGRESS_PORT_ADDRESS_HOLD
#: (300 s) after DNS last returned it, so a missed run or two close nothing; a new address opens within this.
PORTS_REFRESH_SECONDS = 15
#: What route_failover logs, with IPv6 off, for a listed table whose ::/0 bypasses the proxy (the
#: Ipv6RoutesBypassProxy alarm counts these lines).
IPV6_BYPASS_MARKER = "routes ::/0 past the proxy"
#: Stand in for ClientCidr and ClientIpv6Cidr while the ruleset is rendered; replaced by the parameters' values
#: at deploy time (documentation and benchmarking ranges: never a real client's).
_CIDR_SENTINELS = {"ClientCidr": "198.18.255.0/24", "ClientIpv6Cidr": "2001:db8:ffff:ff00::/56"}


def nft_ruleset(*, ipv6: bool = False) -> str:
    """The ruleset `egress-proxy nft-rules` prints for the task's settings, with ``${ClientCidr}`` (and, with
    ``ipv6``, ``${ClientIpv6Cidr}``) for the client ranges (an Fn::Sub template). One renderer for the product
    and the stack: the entrypoint package's."""
    _product()
    from egress_proxy.nft_rules import render_nft_rules  # type: ignore[import-not-found]
    from egress_proxy.settings import load_settings  # type: ignore[import-not-found]

    sentinels = {name: cidr for name, cidr in _CIDR_SENTINELS.items() if ipv6 or ":" not in cidr}
    settings = load_settings({}, {"EGRESS_TRANSPARENT": "on", "EGRESS_CLIENT_CIDRS": ",".join(sentinels.values())})
    rules: str = render_nft_rules(settings)
    assert "${" not in rules
    for name, cidr in sentinels.items():
        assert cidr in rules, cidr
        rules = rules.replace(cidr, f"${{{name}}}")
    return rules


def _product() -> None:
    entrypoint = str(REPO_ROOT / "entrypoint")
    if entrypoint not in sys.path:
        sys.path.append(entrypoint)


def ports_refresh_script() -> str:
    """The host's refresh of the ports sets: ask the running proxy container for the transaction, refuse it whole
    if any line is outside the grammar (so the container cannot flush or rewrite the host's rules), apply it.
    With no proxy container running it changes nothing: the names' addresses age out by their timeouts."""
    _product()
    from egress_proxy.nft_rules import PORT_SET_LINE

    assert "'" not in PORT_SET_LINE and "${" not in PORT_SET_LINE
    return "\n".join([
        "#!/bin/sh",
        "# egress-proxy transparent mode: fill the policies' ports sets from fresh DNS answers (egress-proxy nft-sets)",
        "set -eu",
        f"grammar='{PORT_SET_LINE}'",
        f"container=$(docker ps --quiet --filter label=com.amazonaws.ecs.container-name={CONTAINER_NAME} "
        "--filter status=running | head -n 1)",
        'if [ -z "$container" ]; then',
        '  echo "egress-proxy-ports: no proxy container is running; the sets keep their elements until they '
        'age out" >&2',
        "  exit 0",
        "fi",
        "transaction=$(mktemp)",
        "trap 'rm -f \"$transaction\"' EXIT",
        'docker exec "$container" egress-proxy nft-sets > "$transaction"',
        'if grep -Evq "$grammar" "$transaction"; then',
        '  echo "egress-proxy-ports: refused the transaction, these lines are outside the ports grammar:" >&2',
        '  grep -Ev "$grammar" "$transaction" | head -n 5 >&2',
        "  exit 1",
        "fi",
        'nft -f "$transaction"',
    ]) + "\n"


def ports_refresh_units() -> list[str]:
    """User-data lines: the refresh script, its oneshot service and the timer that runs it."""
    return [
        "# --- transparent mode: keep the policies' ports sets current (egress-proxy nft-sets) ---",
        f"cat > {PORTS_SCRIPT_PATH} <<'SCRIPT'",
        ports_refresh_script().rstrip("\n"),
        "SCRIPT",
        f"chmod 0755 {PORTS_SCRIPT_PATH}",
        f"cat > /etc/systemd/system/{PORTS_UNIT}.service <<'UNIT'",
        "[Unit]",
        "Description=egress-proxy transparent mode: refresh the ports sets (egress-proxy nft-sets)",
        f"After={NFT_UNIT} docker.service",
        f"Requires={NFT_UNIT}",
        "[Service]",
        "Type=oneshot",
        f"ExecStart={PORTS_SCRIPT_PATH}",
        "TimeoutStartSec=60",
        "UNIT",
        f"cat > /etc/systemd/system/{PORTS_UNIT}.timer <<'UNIT'",
        "[Unit]",
        "Description=egress-proxy transparent mode: refresh the ports sets every "
        f"{PORTS_REFRESH_SECONDS} s",
        "[Timer]",
        f"OnBootSec={PORTS_REFRESH_SECONDS}s",
        f"OnUnitActiveSec={PORTS_REFRESH_SECONDS}s",
        "AccuracySec=1s",
        "[Install]",
        "WantedBy=timers.target",
        "UNIT",
        f"systemctl daemon-reload && systemctl enable --now {PORTS_UNIT}.timer",
    ]


def forwarding_commands(*, ipv6: bool) -> list[str]:
    """The boot unit's ExecStartPre lines: the host forwards the policies' extra-port flows (explicitly, rather than
    as a side effect of Docker starting). IPv6 forwarding makes the kernel ignore router advertisements on
    interfaces where it handles them (accept_ra=1), and EC2 gives the instance its IPv6 default route by RA: those
    interfaces get accept_ra=2 first (accept even when forwarding). systemd-networkd handles RAs itself (kernel
    accept_ra=0), so its interfaces are left as they are."""
    lines = ["ExecStartPre=/usr/sbin/sysctl -w net.ipv4.ip_forward=1"]
    if ipv6:
        # $$: systemd would otherwise expand $ra itself.
        lines += ["ExecStartPre=/bin/sh -c 'for ra in /proc/sys/net/ipv6/conf/*/accept_ra; do "
                  "if [ $$(cat $$ra) = 1 ]; then echo 2 > $$ra; fi; done'",
                  "ExecStartPre=/usr/sbin/sysctl -w net.ipv6.conf.all.forwarding=1"]
    return lines


def nft_boot_script(client_cidr: str, client_ipv6_cidr: str | None = None) -> list[str]:
    """User-data lines: install the ruleset as a boot unit (a reboot does not re-run user data), fail closed.
    With ``client_ipv6_cidr``, the ruleset intercepts that range too and the host forwards IPv6."""
    ranges = {"ClientCidr": client_cidr}
    if client_ipv6_cidr is not None:
        ranges["ClientIpv6Cidr"] = client_ipv6_cidr
    ipv6 = client_ipv6_cidr is not None
    return [
        "# --- transparent mode: redirect the clients' tcp/80 and tcp/443 to Squid, drop the rest ---",
        "command -v nft >/dev/null || dnf install -y nftables",
        f"mkdir -p {NFT_RULES_PATH.rsplit('/', 1)[0]}",
        f"cat > {NFT_RULES_PATH} <<'NFT'",
        Fn.sub(nft_ruleset(ipv6=ipv6).rstrip("\n"), ranges),
        "NFT",
        f"cat > /etc/systemd/system/{NFT_UNIT} <<'UNIT'",
        "[Unit]",
        "Description=egress-proxy transparent mode: nftables ruleset (egress-proxy nft-rules)",
        "Before=docker.service ecs.service",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        *forwarding_commands(ipv6=ipv6),
        f"ExecStart=/usr/sbin/nft -f {NFT_RULES_PATH}",
        "[Install]",
        "WantedBy=multi-user.target",
        "UNIT",
        f"if ! {{ systemctl daemon-reload && systemctl enable --now {NFT_UNIT}; }}; then",
        f'  echo "egress-proxy: could not apply {NFT_RULES_PATH} (systemctl status {NFT_UNIT}); powering off" >&2',
        "  shutdown -h now",
        "  exit 1",
        "fi",
    ]


#: The ClientIpv6Cidr parameter: an IPv6 CIDR block, /32 to /128 (a VPC's block is a /56, a subnet's a /64).
CLIENT_IPV6_CIDR_PATTERN = r"^[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){2,7}/(3[2-9]|[4-9][0-9]|1[01][0-9]|12[0-8])$"


def allow_extra_port_egress(security_group: ec2.SecurityGroup, extra_ports: Sequence[tuple[int, int]], *,
                            ipv6: bool) -> None:
    """Out to anywhere on each of ``extra_ports`` (-c transparentExtraPorts), over IPv6 too with ``ipv6``. The group
    bounds which ports can ever leave; the host's ports sets (filled from the policies) decide to which addresses
    and for which clients, so a port here opens nothing that no policy names."""
    peers = [ec2.Peer.any_ipv4(), *([ec2.Peer.any_ipv6()] if ipv6 else [])]
    for first, last in extra_ports:
        shown = f"tcp/{first}" if first == last else f"tcp/{first}-{last}"
        for peer in peers:
            security_group.add_egress_rule(
                peer, ec2.Port.tcp_range(first, last),
                f"Transparent mode: extra ports of policies ({shown}); the host nftables sets pick the addresses")


class TransparentMode(Construct):
    """The instances as the private subnets' default route. With ``ipv6``: ::/0 too, for the ClientIpv6Cidr
    parameter's clients (the instances then need an IPv6 address in dual-stack public subnets)."""

    def __init__(self, scope: Construct, id: str, *, proxies: Ec2ProxyService, task: ProxyTask,
                 client_cidr: CfnParameter, pool_tag_value: str, ipv6: bool = False,
                 extra_ports: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(scope, id)
        stack = Stack.of(self)
        # On the stack, so that its logical ID (the console's parameter name) is exactly this.
        self.route_table_ids = CfnParameter(
            stack, "TransparentRouteTableIds", type="CommaDelimitedList",
            description="Transparent mode: the private subnets' route tables whose default route (0.0.0.0/0"
                        + (" and ::/0" if ipv6 else "") + ") the proxy instances take over (rtb-..., "
                        "comma-separated), at least one per AZ of PublicSubnetIds.")
        self.client_ipv6_cidr: CfnParameter | None = None
        if ipv6:
            self.client_ipv6_cidr = CfnParameter(
                stack, "ClientIpv6Cidr", type="String", allowed_pattern=CLIENT_IPV6_CIDR_PATTERN,
                constraint_description="an IPv6 CIDR block with a /32 to /128 prefix, e.g. the VPC's "
                                       "2600:1f18:aaaa:bb00::/56",
                description="Transparent mode over IPv6: the clients' IPv6 range (/32 to /128, usually the VPC's "
                            "/56). Routed (::/0), admitted by the instances' security group and intercepted "
                            "like ClientCidr. Changing it replaces every task and instance.")

        task.container.add_environment("EGRESS_TRANSPARENT", "on")
        user_data = proxies.launch_template.user_data
        assert user_data is not None
        ipv6_cidr = self.client_ipv6_cidr.value_as_string if self.client_ipv6_cidr else None
        user_data.add_commands(*nft_boot_script(client_cidr.value_as_string, ipv6_cidr))
        user_data.add_commands(*ports_refresh_units())
        proxies.security_group.add_ingress_rule(
            ec2.Peer.ipv4(client_cidr.value_as_string), ec2.Port.all_traffic(),
            "Transparent mode: clients route through the instances; the nftables rules decide")
        if ipv6_cidr is not None:
            self._add_ipv6(proxies, task, client_cidr=client_cidr.value_as_string, client_ipv6_cidr=ipv6_cidr)
        allow_extra_port_egress(proxies.security_group, extra_ports, ipv6=ipv6)
        NagSuppressions.add_resource_suppressions(proxies.security_group, [NagPackSuppression(
            id="CdkNagValidationFailure", applies_to=["AwsSolutions-EC23"],
            reason="AwsSolutions-EC23 cannot evaluate the ClientCidr (or ClientIpv6Cidr) parameter at synth "
                   "time; their AllowedPatterns only accept /8 to /32 (IPv6: /32 to /128), and the instances' "
                   "nftables rules decide what clients may send.",
        )])

        self.function, self.log_group = _function(
            self, "RouteFailover", module="route_failover", timeout=Duration.minutes(1),
            description="egress-proxy: point the private route tables at a healthy proxy instance (failover "
                        "across AZs and back)",
            environment={"ROUTE_TABLE_IDS": Fn.join(",", self.route_table_ids.value_as_list),
                         "POOL_TAG_KEY": POOL_TAG_KEY, "POOL_TAG_VALUE": pool_tag_value,
                         # off: ::/0 is not moved, and a table whose ::/0 bypasses the proxy is logged.
                         "ROUTE_IPV6": "on" if ipv6 else "off"},
        )
        #: The log group whose bypass lines the Ipv6RoutesBypassProxy alarm counts; None when ::/0 is routed here.
        self.ipv6_bypass_log_group = None if ipv6 else self.log_group
        role = self.function.role
        assert role is not None
        self._grant(role, pool_tag_value)
        self.state_rule = events.Rule(
            self, "InstanceStateRule",
            description="egress-proxy: an instance changed state; re-point the private routes if needed",
            event_pattern=events.EventPattern(source=["aws.ec2"],
                                              detail_type=["EC2 Instance State-change Notification"]),
            targets=[targets.LambdaFunction(self.function, retry_attempts=2)],
        )
        self.schedule_rule = events.Rule(
            self, "HealthSchedule",
            description="egress-proxy: every minute, re-point routes away from instances whose status checks fail",
            schedule=events.Schedule.rate(Duration.minutes(1)),
            targets=[targets.LambdaFunction(self.function, retry_attempts=0)],
        )

    @staticmethod
    def _add_ipv6(proxies: Ec2ProxyService, task: ProxyTask, *, client_cidr: str, client_ipv6_cidr: str) -> None:
        """IPv6 clients in, and the instances' own IPv6 out: Squid connects to an intercepted IPv6 client's
        destination (the address the client chose) from the instance's own IPv6 address."""
        # The proxy admits what the host redirects only from its client ranges.
        task.container.add_environment("EGRESS_CLIENT_CIDRS", Fn.join(",", [client_cidr, client_ipv6_cidr]))
        proxies.security_group.add_ingress_rule(
            ec2.Peer.ipv6(client_ipv6_cidr), ec2.Port.all_traffic(),
            "Transparent mode over IPv6: clients route through the instances; the nftables rules decide")
        allow_proxied_egress(proxies.security_group, ec2.Peer.any_ipv6(), "Intercepted IPv6 traffic")
        # One address from the public subnet's IPv6 block (the launch fails if the subnet has none). There is no
        # Elastic IP for IPv6: the address is the instance's own, and changes with it.
        l1(proxies.launch_template).add_property_override(
            "LaunchTemplateData.NetworkInterfaces.0.Ipv6AddressCount", 1)

    def _grant(self, role: iam.IRole, pool_tag_value: str) -> None:
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="Describe", resources=["*"],
            actions=["ec2:DescribeInstances", "ec2:DescribeInstanceStatus", "ec2:DescribeRouteTables",
                     "ec2:DescribeSubnets"]))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="RouteTablesOfThisAccountAndRegion", actions=["ec2:CreateRoute", "ec2:ReplaceRoute"],
            resources=[Stack.of(self).format_arn(service="ec2", resource="route-table", resource_name="*")]))
        role.add_to_principal_policy(iam.PolicyStatement(
            sid="SourceDestCheckOfPoolInstancesOnly", actions=["ec2:ModifyInstanceAttribute"],
            resources=[Stack.of(self).format_arn(service="ec2", resource="instance", resource_name="*")],
            conditions={"StringEquals": {f"aws:ResourceTag/{POOL_TAG_KEY}": pool_tag_value}}))
        NagSuppressions.add_resource_suppressions(role, [NagPackSuppression(
            id="AwsSolutions-IAM5",
            applies_to=["Resource::*",
                        "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*",
                        "Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:route-table/*"],
            reason="The Describe calls have no resource-level permissions; ModifyInstanceAttribute is limited to "
                   "instances carrying this stack's pool tag (their IDs are not known before launch). The route "
                   "tables arrive as a list parameter, which CloudFormation cannot turn into one ARN each (a "
                   "Fn::Join may not nest in another); the function only ever routes the listed tables.",
        )], apply_to_children=True)
