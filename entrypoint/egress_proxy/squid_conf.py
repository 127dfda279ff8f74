"""Render squid.conf and its companion files from settings + allowlist. Pure: returns text, writes nothing.

The Squid knowledge lives in ``templates/squid.conf.j2``; this module only prepares its inputs.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from . import __version__
from .access_log import REASONS, SQUID_LOGFORMAT
from .allowlist import Allowlist
from .settings import IPNetwork, Settings

# Destinations refused after DNS resolution unless exempted by EGRESS_ALLOW_DESTINATIONS: "this" network,
# RFC 1918, CGNAT, loopback, link-local (169.254.169.254 IMDS, 169.254.170.2 ECS task metadata), IETF
# protocol assignments, benchmarking, multicast and reserved; IPv6 unspecified, loopback, ULA (includes AWS's
# fd00:ec2::254 IMDS), link-local and multicast. IPv4-mapped IPv6 is not listed because Squid stores IPv4
# addresses in that form internally and the entry would match every IPv4 destination.
PRIVATE_DESTINATIONS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)

CERTGEN = "/usr/lib/squid/security_file_certgen"
# mawk (Debian's default awk) buffers its input unless told it is interactive; a helper must answer each line.
AWK = "/usr/bin/mawk -W interactive" if Path("/usr/bin/mawk").exists() else "awk"
TEMPLATES = resources.files("egress_proxy") / "templates"


@dataclass(frozen=True)
class StatePaths:
    """Where everything lives under the state directory. The config refers to these absolute paths."""

    state: Path

    @property
    def conf_dir(self) -> Path:
        return self.state / "conf"

    @property
    def squid_conf(self) -> Path:
        return self.conf_dir / "squid.conf"

    @property
    def allowlist(self) -> Path:
        return self.conf_dir / "allowlist.txt"

    @property
    def candidate_dir(self) -> Path:
        return self.state / "candidate"

    @property
    def cert(self) -> Path:
        return self.state / "tls" / "bump.pem"

    @property
    def key(self) -> Path:
        return self.state / "tls" / "bump.key"

    @property
    def ssl_db(self) -> Path:
        return self.state / "tls" / "ssl_db"

    @property
    def errors(self) -> Path:
        return self.state / "errors"

    @property
    def pid(self) -> Path:
        return self.state / "squid.pid"

    @property
    def access_fifo(self) -> Path:
        return self.state / "logs" / "access.fifo"

    @property
    def cache_fifo(self) -> Path:
        return self.state / "logs" / "cache.fifo"

    @property
    def sni_helper(self) -> Path:
        return self.state / "bin" / "sni_present"

    @property
    def sni_policy(self) -> Path:
        return self.state / "bin" / "sni_allowlisted.awk"

    @property
    def status(self) -> Path:
        return self.state / "status.json"

    def in_dir(self, conf_dir: Path) -> StatePaths:
        """The same paths, but with the config files in another directory (for parse-checking candidates)."""
        return _CandidatePaths(self.state, conf_dir)


@dataclass(frozen=True)
class _CandidatePaths(StatePaths):
    candidate_conf_dir: Path

    @property
    def conf_dir(self) -> Path:
        return self.candidate_conf_dir


@dataclass(frozen=True)
class RenderedConfig:
    squid_conf: str
    allowlist_text: str

    def files(self, paths: StatePaths) -> dict[Path, str]:
        return {paths.allowlist: self.allowlist_text, paths.squid_conf: self.squid_conf}


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: (TEMPLATES / name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # squid.conf, not HTML
    )


def render(
    settings: Settings, allowlist: Allowlist, paths: StatePaths, *, run_as: str | None, denial_port: int
) -> RenderedConfig:
    """Render the config for ``allowlist``. ``run_as`` is the user Squid drops to when started as root;
    ``denial_port`` is the supervisor's loopback CONNECT refusal responder (see denier.py)."""
    listen = settings.listen_address
    listen_text = f"[{listen}]" if listen.version == 6 else str(listen)
    context = {
        "version": __version__,
        "entry_count": len(allowlist.entries),
        "listen": f"{listen_text}:{settings.port}",
        "paths": paths,
        "certgen": CERTGEN,
        "run_as": run_as,
        "drain_seconds": _squid_seconds(settings.drain_seconds),
        "dns_servers": [str(ip) for ip in settings.dns_servers],
        "client_cidrs": [str(net) for net in settings.client_cidrs] or ["none"],
        "allowed_ports": settings.allowed_ports,
        "private_destinations": [str(net) for net in PRIVATE_DESTINATIONS],
        "allow_destinations": [str(net) for net in settings.allow_destinations],
        "reasons": list(REASONS),
        "logformat": SQUID_LOGFORMAT,
        "denial_port": denial_port,
        "workers": settings.workers,
        "own_address": "" if listen.is_unspecified or listen.is_loopback else str(listen),
        "awk": AWK,
    }
    squid_conf = _environment().get_template("squid.conf.j2").render(context)
    # Squid reads an empty ACL file as "matches nothing", which is what an empty allowlist means.
    allowlist_text = "".join(entry + "\n" for entry in sorted(allowlist.entries, key=squid_domain_order))
    return RenderedConfig(squid_conf=squid_conf, allowlist_text=allowlist_text)


def squid_domain_order(entry: str) -> list[str]:
    """Squid keeps dstdomain entries in a splay tree ordered by labels from the right. Writing them in that
    order makes every insert land at the tree's edge, which measurably shortens each parse of a long list."""
    return entry.lstrip(".").split(".")[::-1]


def service_name(paths: StatePaths) -> str:
    """Squid's -n service name, unique per state dir: SMP mode names its IPC sockets (in /run/squid) and shared
    memory segments after it, so two proxies on one host (tests, or a sidecar) must not share one."""
    digest = hashlib.sha256(str(paths.state.resolve()).encode()).hexdigest()[:10]
    return f"egress{digest}"


def _squid_seconds(seconds: float) -> int:
    # Squid's time units are whole; round up so a short drain is never zero by accident.
    return max(0, int(-(-seconds // 1)))


def default_error_page() -> str:
    return (TEMPLATES / "ERR_EGRESS_DENIED.html").read_text(encoding="utf-8")


def sni_helper_script() -> str:
    return (TEMPLATES / "sni_present.sh").read_text(encoding="utf-8")


def sni_policy_script() -> str:
    return (TEMPLATES / "sni_allowlisted.awk").read_text(encoding="utf-8")
