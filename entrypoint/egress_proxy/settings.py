"""Every setting of the proxy, declared once: name, type, default, help, env name, CLI flag.

Pure: no I/O beyond reading the mapping it is given. ``load_settings`` turns raw strings (from CLI flags,
then ``EGRESS_*`` environment variables, then defaults) into one frozen ``Settings`` or raises
``SettingsError`` naming the bad setting and how to fix it.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ExitCode
from .identity_helper import BadSelector, parse_cidr

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ENV_PREFIX = "EGRESS_"

# Who may use the proxy by default: the RFC 1918 ranges, CGNAT, IPv6 ULA and loopback — i.e. anything inside
# a VPC, never the internet (an internet-facing proxy with a permissive default is an open relay).
DEFAULT_CLIENT_CIDRS = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,127.0.0.0/8,fc00::/7,::1/128"


class SettingsError(ValueError):
    """A setting has a bad value. ``str()`` names the setting (flag and env var) and suggests a fix."""

    exit_code = ExitCode.BAD_CONFIG

    def __init__(self, name: str, value: str, why: str, fix: str) -> None:
        self.name = name
        self.value = value
        self.why = why
        self.fix = fix
        super().__init__(
            f"setting {name} (--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}) = {value!r}: {why}; {fix}"
        )


@dataclass(frozen=True)
class AllowedPorts:
    """Destination ports: plain HTTP requests may use ``http``, CONNECT tunnels may use ``connect``."""

    http: tuple[int, ...]
    connect: tuple[int, ...]


@dataclass(frozen=True)
class UpstreamProxy:
    """The proxy that allowed traffic leaves through (EGRESS_UPSTREAM_PROXY). ``login`` is ``user:password``."""

    host: str
    port: int
    login: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- value parsers: each raises ValueError(why, fix) -------------------------------------------------------


class _Bad(ValueError):
    def __init__(self, why: str, fix: str) -> None:
        super().__init__(why)
        self.why = why
        self.fix = fix


def _split(raw: str) -> list[str]:
    return [part for part in re.split(r"[\s,]+", raw.strip()) if part]


def _port(raw: str) -> int:
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 65535:
        raise _Bad("is not a TCP port", "use a number from 1 to 65535, e.g. 3128")
    return int(raw)


def _hold_seconds(raw: str) -> int:
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 86400:
        raise _Bad("must be a whole number of seconds from 1 to 86400", "use e.g. 300 (five minutes)")
    return int(raw)


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Bad("is not a number", "use seconds, e.g. 30 or 0.5") from None
    if value <= 0:
        raise _Bad("must be greater than zero", "use seconds, e.g. 30 or 0.5")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _Bad("is not a number", "use seconds, e.g. 30") from None
    if value < 0:
        raise _Bad("must not be negative", "use seconds, e.g. 30")
    return value


def _idle_seconds(raw: str) -> int:
    # Whole seconds: Squid's time units are whole. At most a day, which is Squid's client_lifetime: no
    # connection outlives that anyway.
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 86400:
        raise _Bad("must be whole seconds from 1 to 86400", "use e.g. 900 (15 minutes)")
    return int(raw)


def check_login(login: str) -> str:
    """``user:password`` for the upstream proxy. squid_conf.py URL-escapes it into cache_peer ``login=``, so any
    printable character is fine; a user name starting with ``*`` or ``NEGOTIATE`` would switch Squid to another
    login mode, so those are refused."""
    user, sep, _ = login.partition(":")
    if not sep or not user:
        raise _Bad("credentials must be user:password", "write them as user:password on one line")
    if any(ord(char) < 32 or ord(char) == 127 for char in login):
        raise _Bad("credentials contain a control character", "remove it (a trailing newline is fine in a file)")
    if user.startswith(("*", "NEGOTIATE")):
        raise _Bad("the user name starts with '*' or 'NEGOTIATE', which Squid reads as a login mode",
                   "use another user name")
    return login


def _upstream_proxy(raw: str) -> UpstreamProxy | None:
    value = raw.strip()
    if not value:
        return None
    example = "use http://HOST:PORT, e.g. http://proxy.corp.internal:3128"
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port
    except ValueError as exc:
        raise _Bad(f"is not a URL ({exc})", example) from None
    if url.scheme != "http":
        raise _Bad(f"has scheme {url.scheme or '(none)'!r}; only http:// upstream proxies are supported", example)
    if not url.hostname or port is None:
        raise _Bad("lacks a host or a port", example)
    if url.path not in {"", "/"} or url.query or url.fragment:
        raise _Bad("has a path, query or fragment", example)
    login = None
    if url.username is not None:
        login = check_login(urllib.parse.unquote(url.username) + ":" + urllib.parse.unquote(url.password or ""))
    return UpstreamProxy(host=url.hostname, port=port, login=login)


def _without_password(raw: str) -> str:
    """The URL as it may appear in an error message: never with its password."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", raw)


def _no_proxy_domains(raw: str) -> tuple[str, ...]:
    if not raw.strip():
        return ()  # before the import: the CDK app renders the nftables ruleset without the allowlist's packages
    from .allowlist import AllowlistError, parse_allowlist

    try:
        return tuple(sorted(parse_allowlist(raw, source="EGRESS_UPSTREAM_NO_PROXY").entries))
    except AllowlistError as exc:
        raise _Bad(f"is not a list of domains: {exc}",
                   "use allowlist entries: example.com for that host, .example.com for the domain") from None


def _log_buffer_lines(raw: str) -> int:
    if not raw.strip().isdigit() or not 100 <= int(raw) <= 10_000_000:
        raise _Bad("must be a whole number of lines from 100 to 10000000",
                   "use e.g. 50000 (about 20 MB of memory at most)")
    return int(raw)


LOG_FULL_CHOICES = ("drop", "refuse")


def _log_full(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_FULL_CHOICES:
        raise _Bad("is neither drop nor refuse", "use drop (keep proxying, count lost lines) or refuse (no log, "
                   "no traffic)")
    return value


def _optional_port(raw: str) -> int | None:
    return _port(raw) if raw.strip() else None


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"on", "true", "yes", "1"}:
        return True
    if lowered in {"off", "false", "no", "0"}:
        return False
    raise _Bad("is not on/off", "use on or off")


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _text(raw: str) -> str:
    if not raw.strip():
        raise _Bad("must not be empty", "give a value or leave the setting unset for its default")
    return raw.strip()


def _optional_path(raw: str) -> Path | None:
    return Path(raw.strip()) if raw.strip() else None


def _path(raw: str) -> Path:
    if not raw.strip():
        raise _Bad("must not be empty", "give a directory path")
    return Path(raw.strip())


def _ip(raw: str) -> IPAddress:
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        raise _Bad(f"{raw!r} is not an IP address", "use IPs such as 9.9.9.9,149.112.112.112") from None


def _ips(raw: str) -> tuple[IPAddress, ...]:
    return tuple(_ip(part) for part in _split(raw))


def _listen_address(raw: str) -> IPAddress:
    return _ip(raw.strip())


def _cidrs(raw: str) -> tuple[IPNetwork, ...]:
    """The CIDRs as written, each through the one CIDR parser (identity_helper.parse_cidr); squid_conf.py
    collapses overlapping ones when it renders them (networks.normalise)."""
    networks: list[IPNetwork] = []
    for part in _split(raw):
        try:
            networks.append(parse_cidr(part))
        except BadSelector as bad:
            raise _Bad(f"{part!r} {bad.why}", bad.fix) from None
    return tuple(networks)


def _workers(raw: str) -> int:
    if not raw.strip().isdigit() or not 2 <= int(raw) <= 32:
        raise _Bad(
            "must be a whole number from 2 to 32",
            "use 2 (Squid's SMP mode with at least 2 workers keeps the listening socket open across reloads)",
        )
    return int(raw)


def _client_cidrs(raw: str) -> tuple[IPNetwork, ...]:
    networks = _cidrs(raw)
    if not networks:
        raise _Bad("lists no network, so nobody could use the proxy", f"use e.g. {DEFAULT_CLIENT_CIDRS}")
    return networks


def _allowed_ports(raw: str) -> AllowedPorts:
    http: list[int] = []
    connect: list[int] = []
    for part in _split(raw):
        kind, _, number = part.rpartition(":")
        kind = kind.lower()
        if kind not in {"", "http", "connect"}:
            raise _Bad(f"{part!r} has an unknown kind {kind!r}", "write http:PORT, connect:PORT or PORT (both)")
        try:
            port = _port(number)
        except _Bad:
            raise _Bad(f"{part!r} is not a port", "write http:80, connect:443 or 8443 (both)") from None
        if kind in {"", "http"}:
            http.append(port)
        if kind in {"", "connect"}:
            connect.append(port)
    if not http and not connect:
        raise _Bad("allows no port at all", "use the default http:80,connect:443")
    return AllowedPorts(http=tuple(sorted(set(http))), connect=tuple(sorted(set(connect))))


def _proxy_protocol(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"off", "required"}:
        raise _Bad("is not off or required",
                   "use required behind a load balancer that sends PROXY protocol v2 (an NLB with proxy protocol "
                   "on its target group), else off")
    return value


def _whole_seconds(raw: str) -> int:
    if not raw.strip().isdigit() or not 1 <= int(raw) <= 3600:
        raise _Bad("must be whole seconds from 1 to 3600", "use e.g. 5")
    return int(raw)


def _namespace(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > 255 or value.startswith("AWS/") or not re.fullmatch(r"[\w.\-/#:]+", value):
        raise _Bad("is not a valid CloudWatch namespace", "use letters, digits and . - _ / # :, e.g. Proxy")
    return value


# --- the declaration: one dataclass field per setting, with its parser, default and help -------------------


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: str
    help: str
    metavar: str = "VALUE"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _option(parse: Callable[[str], Any], default: str, help: str, metavar: str = "VALUE") -> Any:
    """A ``Settings`` field that carries its own parser, raw default, help and metavar (the name is the field's)."""
    return field(metadata={"parse": parse, "default": default, "help": help, "metavar": metavar})


@dataclass(frozen=True)
class Settings:
    """Every setting, declared once: ``OPTIONS`` (flags, env names, README table) is derived from these fields."""

    port: int = _option(_port, "3128", "TCP port the proxy listens on.", "PORT")
    listen_address: IPAddress = _option(
        _listen_address, "0.0.0.0",
        "Address the proxy listens on (0.0.0.0 = all IPv4 interfaces; tests use 127.0.0.1).", "IP")
    allowed_domains: str | None = _option(
        _optional_text, "",
        "Inline allowlist, comma-separated (the seed's form): 'example.com' is that host, "
        "'.example.com' the domain and every subdomain.", "LIST")
    allowlist_file: Path | None = _option(
        _optional_path, "", "Allowlist file: one entry per line, '#' comments.", "PATH")
    allowlist_secret: str | None = _option(
        _optional_text, "",
        "AWS Secrets Manager secret (name or ARN) holding the allowlist: comma-separated or "
        'JSON {"allowed_domains": [...]}.', "ID")
    dns_servers: tuple[IPAddress, ...] = _option(
        _ips, "",
        "DNS servers for every lookup, comma-separated IPs (e.g. a filtering resolver such as Quad9); "
        "empty uses the system resolver (/etc/resolv.conf).", "IPS")
    client_cidrs: tuple[IPNetwork, ...] = _option(
        _client_cidrs, DEFAULT_CLIENT_CIDRS, "Client networks allowed to use the proxy, comma-separated CIDRs.",
        "CIDRS")
    allowed_ports: AllowedPorts = _option(
        _allowed_ports, "http:80,connect:443",
        "Destination ports: http:PORT for plain HTTP, connect:PORT for HTTPS tunnels, PORT for both.", "PORTS")
    allow_destinations: tuple[IPNetwork, ...] = _option(
        _cidrs, "",
        "CIDRs exempt from the private/loopback/link-local/metadata destination deny (SSRF guard), "
        "e.g. 10.1.2.0/24 for an internal service. Empty: no exemption.", "CIDRS")
    error_page: Path | None = _option(
        _optional_path, "",
        "HTML template for the Access Denied page (Squid error-page codes such as %H and "
        "@Squid{%{reason}note} are expanded). Empty: the built-in page.", "PATH")
    state_dir: Path = _option(
        _path, "/var/lib/egress-proxy",
        "Directory for the rendered config, the throwaway ssl-bump key and log FIFOs.", "DIR")
    reload_interval: float = _option(
        _positive_float, "30",
        "Seconds between Secrets Manager polls (with +-10% jitter). A file source is checked four times a second.",
        "SECONDS")
    drain_seconds: float = _option(
        _non_negative_float, "30", "On SIGTERM, how long open connections may finish before Squid closes them.",
        "SECONDS")
    metrics: bool = _option(
        _bool, "on", "Publish Squid counters and proxy metrics to CloudWatch (on/off).", "on|off")
    metrics_namespace: str = _option(_namespace, "Proxy", "CloudWatch namespace for the metrics.", "NAMESPACE")
    metrics_interval: float = _option(
        _positive_float, "60", "Seconds between metrics publications.", "SECONDS")
    instance_id: str | None = _option(
        _optional_text, "",
        "Value of the ProxyInstance metric dimension. Empty: the ECS task id from the task metadata "
        "endpoint, else the host name.", "NAME")
    workers: int = _option(
        _workers, "2",
        "Squid worker processes (2-32). At least 2: in Squid's SMP mode a coordinator holds the listening "
        "socket, so new connections queue instead of being refused while the workers reconfigure.", "N")
    squid_binary: str = _option(_text, "squid", "The Squid executable (Debian's squid-openssl).", "PATH")
    websockets: bool = _option(
        _bool, "on",
        "Forward WebSocket upgrades (Upgrade: websocket) of allowed plain-HTTP requests, i.e. ws:// URLs sent "
        "to the proxy as 'GET http://host/path'. The host and port checks apply as to any request; wss:// "
        "goes through CONNECT and needs nothing extra.", "on|off")
    tunnel_idle_timeout: int = _option(
        _idle_seconds, "900",
        "Seconds an open tunnel (HTTPS CONNECT, WebSocket) or a response may stay silent before the proxy "
        "closes it (Squid's read_timeout). Behind a load balancer, keep its TCP idle timeout at least this "
        "long (the CDK app sets the NLB's to match).", "SECONDS")
    client_idle_timeout: int = _option(
        _idle_seconds, "120",
        "Seconds an idle keep-alive connection from a client stays open between requests (Squid's "
        "client_idle_pconn_timeout). Clients should drop pooled connections sooner, or retry idempotent "
        "requests, to avoid reusing one the proxy is closing.", "SECONDS")
    upstream_proxy: UpstreamProxy | None = _option(
        _upstream_proxy, "",
        "An HTTP proxy that every allowed request leaves through (HTTP as a proxied request, HTTPS as a CONNECT), "
        "http://HOST:PORT, optionally http://USER:PASSWORD@HOST:PORT. Empty: connect directly.", "URL")
    upstream_proxy_credentials_file: Path | None = _option(
        _optional_path, "",
        "File holding user:password for the upstream proxy (read once at startup), instead of credentials in "
        "EGRESS_UPSTREAM_PROXY.", "PATH")
    upstream_no_proxy: tuple[str, ...] = _option(
        _no_proxy_domains, "",
        "Allowlist-style entries that go direct instead of through the upstream proxy: example.com for that "
        "host, .example.com for the domain and its subdomains. They must still be allowlisted.", "LIST")
    proxy_protocol: str = _option(
        _proxy_protocol, "off",
        "PROXY protocol (v1 or v2) on the proxy port: off, or required (every connection must start with a "
        "PROXY header, sent from EGRESS_PROXY_PROTOCOL_FROM; the header's source address is the client's, and "
        "its VPC endpoint ID selects vpce- policies).", "off|required")
    proxy_protocol_from: tuple[IPNetwork, ...] = _option(
        _cidrs, "",
        "Addresses allowed to send a PROXY header (the load balancer's subnets), comma-separated CIDRs. "
        "Required with EGRESS_PROXY_PROTOCOL=required; a header from anywhere else is refused.", "CIDRS")
    identity_refresh: float = _option(
        _positive_float, "10",
        "Seconds between AWS polls of the members of sg-, ecs: and tag: client selectors (EC2 "
        "DescribeNetworkInterfaces, ECS ListTasks/DescribeTasks). A client that left its group loses its policy "
        "within EGRESS_IDENTITY_REFRESH + EGRESS_IDENTITY_TTL seconds.", "SECONDS")
    identity_ttl: int = _option(
        _whole_seconds, "5",
        "Seconds each Squid worker caches a client's identity answer, and the on-demand lookup caches an "
        "address that AWS says belongs to no selector.", "SECONDS")
    prometheus_port: int | None = _option(
        _optional_port, "",
        "Serve Prometheus metrics at http://LISTEN_ADDRESS:PORT/metrics (from the supervisor, not Squid's "
        "port). Empty: off.", "PORT")
    log_buffer_lines: int = _option(
        _log_buffer_lines, "50000",
        "Log lines (access, cache.log, supervisor) held in memory while stdout does not take them, e.g. while "
        "the log driver waits on CloudWatch Logs. Beyond that, new lines are dropped and counted "
        "(log.lines_dropped), and proxying goes on.", "LINES")
    log_full: str = _option(
        _log_full, "drop",
        "What to do while log lines cannot be written (stdout stalled and the buffer full): drop (keep proxying; "
        "count and report the lost lines) or refuse (no log, no traffic: new requests are refused with reason "
        "log_unavailable until lines flow again).", "drop|refuse")
    # --- transparent mode (EC2 as the route target of private subnets) ---
    transparent: bool = _option(
        _bool, "off",
        "Transparent mode: also accept HTTP and HTTPS that the host's nftables rules redirect to Squid's intercept "
        "ports (print them with 'egress-proxy nft-rules'), so clients need no proxy setting. The explicit port "
        "keeps working beside them.", "on|off")
    intercept_http_port: int = _option(
        _port, "3129", "Port of the intercept listener for redirected plain HTTP (tcp/80), with EGRESS_TRANSPARENT.",
        "PORT")
    intercept_https_port: int = _option(
        _port, "3130", "Port of the intercept listener for redirected TLS (tcp/443), with EGRESS_TRANSPARENT.",
        "PORT")
    port_address_hold: int = _option(
        _hold_seconds, "300",
        "Transparent mode: how long an address that a policy's 'ports' name resolved to stays open after DNS last "
        "returned it ('egress-proxy nft-sets'), when its TTL is shorter: clients may hold an answer past its "
        "TTL.", "SECONDS")

    @property
    def source_kind(self) -> str:
        """Which allowlist source is active: 'inline', 'file' or 'secret'."""
        if self.allowlist_secret:
            return "secret"
        if self.allowlist_file:
            return "file"
        return "inline"


OPTIONS: tuple[Option, ...] = tuple(
    Option(name=f.name, parse=f.metadata["parse"], default=f.metadata["default"], help=f.metadata["help"],
           metavar=f.metadata["metavar"])
    for f in fields(Settings)
)
OPTIONS_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
OPTIONS_BY_ENV: dict[str, Option] = {option.env: option for option in OPTIONS}

SOURCE_OPTIONS = ("allowed_domains", "allowlist_file", "allowlist_secret")

# EGRESS_* variables that configure the repository's own tooling (scripts/test, scripts/build-image, the
# container, compose and infra tests, bench/), not the proxy. They may be exported where the proxy runs (the
# infra tests start it with their whole environment); they are not typos. A unit test keeps this list complete.
TOOLING_ENV = frozenset({
    "EGRESS_VENV", "EGRESS_IMAGE", "EGRESS_BASE_IMAGE", "EGRESS_BUILD_CACHE", "EGRESS_BUILD_CA_BUNDLE",
    "EGRESS_CONTAINER_RUNTIME", "EGRESS_TEST_IMAGE", "EGRESS_BENCH_NETNS", "EGRESS_BENCH_OLD_TREE",
    "EGRESS_PROXY", "EGRESS_PROXY_BIN", "EGRESS_TEST_ORIGIN_DIR", "EGRESS_TEST_SUBNET",
})


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Every ``EGRESS_*`` variable that is no setting, with the closest setting's name (or None)."""
    unknown: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in OPTIONS_BY_ENV or name in TOOLING_ENV:
            continue
        # Compare without the shared prefix, which would make every name look close to every other.
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], [o.name.upper() for o in OPTIONS], n=1,
                                          cutoff=0.6)
        unknown.append((name, ENV_PREFIX + close[0] if close else None))
    return unknown


class UnknownSettingError(SettingsError):
    """An ``EGRESS_*`` variable that is no setting: most likely a typo that would otherwise be ignored."""

    def __init__(self, unknown: list[tuple[str, str | None]]) -> None:
        parts = [f"{name} (did you mean {close}?)" if close else name for name, close in unknown]
        ValueError.__init__(
            self,
            f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(parts)}: no setting has "
            "that name; fix the name or unset it (every setting is listed by 'egress-proxy run --help')",
        )
        self.name, self.value, self.why, self.fix = unknown[0][0], "", "unknown", "fix the name"


class NoSourceError(SettingsError):
    """``run`` (and ``check``/``render``) was given no allowlist source at all."""

    def __init__(self) -> None:
        ValueError.__init__(
            self,
            "no allowlist source is set; give exactly one of EGRESS_ALLOWLIST_FILE (--allowlist-file PATH), "
            "EGRESS_ALLOWLIST_SECRET (--allowlist-secret ID) or EGRESS_ALLOWED_DOMAINS (--allowed-domains LIST; "
            "set it to an empty value to deny everything on purpose)",
        )
        self.name, self.value, self.why, self.fix = "allowed_domains", "", "no source", "set one source"


def load_settings(cli: Mapping[str, str | None], environ: Mapping[str, str], *,
                  require_source: bool = False) -> Settings:
    """CLI value if given, else ``EGRESS_<NAME>``, else the default. Raises SettingsError: for a bad value, an
    unknown ``EGRESS_*`` variable, more than one allowlist source, or (``require_source``) none at all."""
    unknown = unknown_env(environ)
    if unknown:
        raise UnknownSettingError(unknown)
    values: dict[str, Any] = {}
    raw_by_name: dict[str, str] = {}
    given: set[str] = set()  # set by a flag or a variable, even to an empty value
    for option in OPTIONS:
        raw = cli.get(option.name)
        if raw is None:
            raw = environ.get(option.env)
        if raw is None:
            raw = option.default
        else:
            given.add(option.name)
        raw_by_name[option.name] = raw
        try:
            values[option.name] = option.parse(raw)
        except _Bad as bad:
            shown = _without_password(raw) if option.name == "upstream_proxy" else raw
            raise SettingsError(option.name, shown, bad.why, bad.fix) from None
    sources = [name for name in SOURCE_OPTIONS if values[name]]
    if len(sources) > 1:
        names = ", ".join(OPTIONS_BY_NAME[name].env for name in sources)
        raise SettingsError(
            sources[1],
            raw_by_name[sources[1]],
            f"more than one allowlist source is set ({names})",
            "set exactly one of EGRESS_ALLOWED_DOMAINS, EGRESS_ALLOWLIST_FILE, EGRESS_ALLOWLIST_SECRET",
        )
    # An explicitly empty EGRESS_ALLOWED_DOMAINS is a deliberate deny-everything list; nothing set at all is not.
    if require_source and not sources and "allowed_domains" not in given:
        raise NoSourceError()
    if values["prometheus_port"] is not None and values["prometheus_port"] == values["port"]:
        raise SettingsError("prometheus_port", raw_by_name["prometheus_port"], "is the proxy's own port",
                            "use another port, e.g. 9128")
    if values["transparent"] and values["upstream_proxy"] is not None:
        # Not tested together: an intercepted connection is pinned to the IP the client chose, which a parent proxy
        # cannot be told. Refused rather than shipped untested.
        raise SettingsError("transparent", raw_by_name["transparent"],
                            "transparent mode cannot be combined with EGRESS_UPSTREAM_PROXY yet",
                            "unset EGRESS_UPSTREAM_PROXY, or run transparent mode without an upstream proxy")
    if values["transparent"]:
        taken = {"port": values["port"], "prometheus_port": values["prometheus_port"]}
        for name in ("intercept_http_port", "intercept_https_port"):
            clash = next((other for other, port in taken.items() if port == values[name]), None)
            if clash is not None:
                raise SettingsError(name, raw_by_name[name], f"is the same port as {OPTIONS_BY_NAME[clash].env}",
                                    "give every listener its own port, e.g. 3129 and 3130")
            taken[name] = values[name]
    upstream_needed = [name for name in ("upstream_proxy_credentials_file", "upstream_no_proxy") if values[name]]
    if upstream_needed and values["upstream_proxy"] is None:
        name = upstream_needed[0]
        raise SettingsError(name, raw_by_name[name], "has no effect without EGRESS_UPSTREAM_PROXY",
                            "set EGRESS_UPSTREAM_PROXY=http://HOST:PORT or unset this setting")
    if values["proxy_protocol"] == "required" and not values["proxy_protocol_from"]:
        raise SettingsError("proxy_protocol_from", raw_by_name["proxy_protocol_from"],
                            "is empty, so no load balancer may send the PROXY header that "
                            "EGRESS_PROXY_PROTOCOL=required demands",
                            "list the load balancer's subnets, e.g. 10.0.0.0/24,10.0.1.0/24")
    if values["proxy_protocol"] == "off" and values["proxy_protocol_from"]:
        raise SettingsError("proxy_protocol_from", raw_by_name["proxy_protocol_from"],
                            "has no effect with EGRESS_PROXY_PROTOCOL=off",
                            "set EGRESS_PROXY_PROTOCOL=required or unset this setting")
    if values["upstream_proxy_credentials_file"] and values["upstream_proxy"].login:
        raise SettingsError("upstream_proxy_credentials_file", raw_by_name["upstream_proxy_credentials_file"],
                            "EGRESS_UPSTREAM_PROXY already carries credentials",
                            "keep the credentials in one place: the file, or the URL")
    return Settings(**values)
