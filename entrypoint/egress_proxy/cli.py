"""Command line: run, check, render, health, nft-rules, nft-sets, allowlist push/diff. Each setting is a flag and
an EGRESS_* env var."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import TextIO

from . import __version__, allowlist_cli
from .allowlist import AllowlistError
from .config_pipeline import Status, StatusUnreadable, build_config, read_upstream_login, validate
from .dns_lookup import LookupFailed, resolve, system_servers
from .errors import ExitCode, UsageError, describe_os_error, exit_code_of, print_error
from .metrics import manager_host, read_counters
from .nft_rules import Memory, forget_expired, remember, render_nft_rules, render_port_sets
from .settings import OPTIONS, Settings, SettingsError, load_settings
from .sources import SourceUnavailable, make_source
from .squid_conf import PLACEHOLDER_ACCESS_LOG_TOKEN, StatePaths, forbidden_destinations
from .squid_process import atomic_write, run_as_user
from .supervisor import Supervisor
from .workers import judge


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also read from its EGRESS_* environment variable)")
    for option in OPTIONS:
        default = f" Default: {option.default!r}." if option.default else ""
        # argparse %-formats help text: a literal '%' (Squid's error-page codes such as %H) must be doubled.
        text = f"{option.help}{default} Env: {option.env}.".replace("%", "%%")
        group.add_argument(option.flag, dest=option.name, default=None, metavar=option.metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egress-proxy", description="Allowlisting egress proxy (Squid + supervisor).")
    parser.add_argument("--version", action="version", version=f"egress-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "Run Squid under the supervisor in the foreground (hot-reloads the allowlist)."),
        ("check", "Validate the settings and the allowlist; print the normalised allowlist and warnings."),
        ("render", "Print the squid.conf that 'run' would use."),
        ("health", "Exit 0 when the proxy accepts connections and a config is loaded."),
        ("nft-rules", "Print the host's nftables ruleset for transparent mode (apply it with 'nft -f -' on the "
                      "host, as root; the proxy itself needs no NET_ADMIN)."),
        ("nft-sets", "Print the nft transaction that fills the ruleset's ports sets from the running proxy's "
                     "policies and fresh DNS answers (the host applies it with 'nft -f -' on a timer)."),
    ):
        _add_setting_flags(commands.add_parser(name, help=help_text, description=help_text))
    allowlist = commands.add_parser("allowlist", help="Manage the allowlist secret; learn a list from traffic.")
    allowlist_cli.add_parsers(allowlist.add_subparsers(dest="action", required=True))
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    cli = {option.name: getattr(args, option.name, None) for option in OPTIONS}
    # health reads a running proxy's state and nft-rules only the network settings; the others need an allowlist.
    # nft-sets reads the document the running proxy loaded (its state dir), not the source.
    return load_settings(cli, os.environ, require_source=args.command not in {"health", "nft-rules", "nft-sets"})


def _json_error(message: str, code: ExitCode) -> None:
    """``run`` writes JSON lines only, errors included (so ``docker compose logs proxy | jq`` always works)."""
    print(json.dumps({"type": "supervisor", "time": round(time.time(), 3), "level": "error",
                      "event": "startup_failed", "message": message, "exit_code": int(code)},
                     separators=(",", ":")), flush=True)


def _json_excepthooks() -> None:
    """A bug in ``run`` still logs one JSON line (with the traceback as a field), and a Python warning one JSON
    line too: never raw text on stdout or stderr."""

    def report(kind: str, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        print(json.dumps({"type": "supervisor", "time": round(time.time(), 3), "level": "error", "event": kind,
                          "message": f"{exc_type.__name__}: {exc}", "traceback": text},
                         separators=(",", ":")), file=sys.stderr, flush=True)

    def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None) -> None:
        print(json.dumps({"type": "supervisor", "time": round(time.time(), 3), "level": "warning",
                          "event": "python_warning", "message": f"{category.__name__}: {message}",
                          "where": f"{filename}:{lineno}"}, separators=(",", ":")), file=sys.stderr, flush=True)

    warnings.showwarning = show_warning
    sys.excepthook = lambda t, e, tb: report("crashed", t, e, tb)
    threading.excepthook = lambda args: report("thread_crashed", args.exc_type, args.exc_value or args.exc_type(),
                                               args.exc_traceback)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        _json_excepthooks()
        # `kill -USR2 <pid>` prints every thread's stack on stderr: what a stuck supervisor is waiting on.
        with contextlib.suppress(ValueError, OSError):  # a stderr without a file descriptor (tests): no dump
            faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    try:
        if args.command == "allowlist":
            return allowlist_cli.run(args)
        settings = _settings(args)
        if args.command == "run":
            return Supervisor(settings).run()
        if args.command == "check":
            return _check(settings)
        if args.command == "render":
            return _render(settings)
        if args.command == "health":
            return _health(settings)
        if args.command == "nft-rules":
            return _nft_rules(settings)
        if args.command == "nft-sets":
            return _nft_sets(settings)
    except (SettingsError, AllowlistError, SourceUnavailable, UsageError, OSError) as exc:
        # The one place an error becomes an exit code (errors.exit_code_of).
        code = exit_code_of(exc) or ExitCode.BAD_CONFIG
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        if args.command == "run":
            _json_error(message, code)
        else:
            print_error(message)
        return code
    raise AssertionError(args.command)


def _check(settings: Settings) -> int:
    source = make_source(settings)
    description = source.description
    document = validate(source.read(), source=description, client_cidrs=settings.client_cidrs)
    for warning in document.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if document.flat:
        for entry in document.allowlist.entries:
            print(entry)
        print(f"ok: {len(document.allowlist)} entries from {description}", file=sys.stderr)
        return ExitCode.OK
    # A document: print it normalised (every key explicit, lists minimal and sorted), ready to push.
    print(json.dumps(document.to_json(), indent=2))
    summary = ", ".join(f"{p.name} ({p.mode}, {len(p.selectors)} client selectors, {len(p.allow)} allow, "
                        f"{len(p.deny)} deny{f', {len(p.ports)} ports' if p.ports else ''})"
                        for p in document.policies)
    print(f"ok: {len(document.policies)} policies from {description}: {summary}", file=sys.stderr)
    return ExitCode.OK


RENDER_DENIAL_PORT = 39128
RENDER_ACCESS_LOG_PORT = 39129


def _render(settings: Settings) -> int:
    source = make_source(settings)
    # 'run' picks free loopback ports for its refusal responder and access-log listener, and the access log's
    # secret token, at startup; show placeholders here.
    # The upstream's login as 'run' renders it (from the credentials file, like credentials in the URL).
    rendered = build_config(source.read(), settings, source=source.description,
                            paths=StatePaths(settings.state_dir), run_as=run_as_user(),
                            denial_port=RENDER_DENIAL_PORT, access_log_port=RENDER_ACCESS_LOG_PORT,
                            access_log_token=PLACEHOLDER_ACCESS_LOG_TOKEN,
                            upstream_login=read_upstream_login(settings)).rendered
    sys.stdout.write(rendered.squid_conf)
    # The list files the config reads, each under a comment naming where 'run' writes it.
    for path, text in rendered.files(StatePaths(settings.state_dir)).items():
        if path.suffix in {".allow", ".deny"}:
            sys.stdout.write(f"\n# --- {path} ({text.count(chr(10))} entries)\n")
            sys.stdout.write("".join(f"#   {line}\n" for line in text.splitlines()))
    return ExitCode.OK


def _nft_rules(settings: Settings) -> int:
    if not settings.transparent:
        raise UsageError("EGRESS_TRANSPARENT is off, so Squid opens no intercept port to redirect to; set "
                         "EGRESS_TRANSPARENT=on (--transparent on) with the same settings the proxy runs with")
    sys.stdout.write(render_nft_rules(settings))
    return ExitCode.OK


def _nft_sets(settings: Settings) -> int:
    """Resolve the loaded policies' port names now and print the transaction for the host. Degrades, never
    fails on DNS: a name no server answers for keeps the addresses it had until they age out (a warning on
    stderr), so a resolver outage closes nothing early and opens nothing new."""
    if not settings.transparent:
        raise UsageError("EGRESS_TRANSPARENT is off, so the host has no ports sets to fill; set EGRESS_TRANSPARENT=on "
                         "with the same settings the proxy runs with")
    paths = StatePaths(settings.state_dir)
    try:
        rules = json.loads(paths.port_rules.read_text(encoding="utf-8"))["rules"]
    except FileNotFoundError:
        print(f"warning: {paths.port_rules} does not exist yet (no config loaded): the ports sets stay empty",
              file=sys.stderr)
        rules = []
    try:
        memory: Memory = json.loads(paths.port_addresses.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memory = {}  # first run, or unreadable: only fresh answers open anything
    now = time.time()
    names = sorted({rule["host"] for rule in rules if "host" in rule})
    servers = list(settings.dns_servers) or system_servers()
    for name in names:
        try:
            answers = resolve(name, servers)
        except LookupFailed as exc:
            print(f"warning: {name}: {exc}; its known addresses stay until they age out", file=sys.stderr)
            continue
        remember(memory, name, [(str(answer.address), answer.ttl) for answer in answers], now,
                 settings.port_address_hold)
    memory = forget_expired(memory, now, names)
    try:
        atomic_write(paths.port_addresses, json.dumps(memory, sort_keys=True))
    except OSError as exc:
        print(f"warning: cannot keep {paths.port_addresses} ({describe_os_error(exc)}): addresses DNS stops "
              "returning close at the next run instead of when they age out", file=sys.stderr)
    forbidden = forbidden_destinations(settings.allow_destinations)
    sys.stdout.write(render_port_sets(settings, rules, memory, now, forbidden))
    return ExitCode.OK


def _health(settings: Settings) -> int:
    paths = StatePaths(settings.state_dir)
    try:
        status = Status.read(paths.status)
    except StatusUnreadable as exc:
        print(f"unhealthy: {exc} (is 'egress-proxy run' running with this state dir?)")
        return ExitCode.UNHEALTHY
    if not status.config_loaded:
        print("unhealthy: no config loaded")
        return ExitCode.UNHEALTHY
    host = manager_host(settings)
    workers = status.workers or {}
    try:
        if workers.get("up", 0) < workers.get("configured", 0):
            # Squid's cache manager answers for all workers at once and waits for a missing one until it times
            # out (measured), so with a worker down only the port is probed (a bare connect is not logged).
            socket.create_connection((host, settings.port), timeout=3).close()
        else:
            # A real HTTP answer from Squid's cache manager, not just a TCP accept: a wedged Squid whose kernel
            # still accepts connections fails here. Loopback manager reads are not access-logged.
            read_counters(host, settings.port, timeout=3,
                          proxy_header=settings.proxy_protocol == "required")
    except (OSError, http.client.HTTPException) as exc:
        print(f"unhealthy: Squid on {host}:{settings.port} did not answer: {exc}")
        return ExitCode.UNHEALTHY
    serving = f"{host}:{settings.port}, allowlist version {status.version}, {status.entries} entries"
    verdict, problems = degradations(status, paths, time.time())
    if verdict == "unhealthy":
        print(f"unhealthy: {'; '.join(problems)} (serving {serving})")
        return ExitCode.UNHEALTHY
    if problems:
        # Still serving: ECS must not replace a task that carries traffic (its open tunnels would drop) for a fault
        # that degrades it; the log lines and metrics say what to fix.
        print(f"degraded: {'; '.join(problems)}; serving {serving}")
        return ExitCode.OK
    print(f"healthy: {serving}")
    return ExitCode.OK


STALE_STATUS_SECONDS = 30.0  # status.json is rewritten every 10 s while the proxy runs
LOW_SPACE_BYTES = 1024 * 1024


def degradations(status: Status, paths: StatePaths, now: float) -> tuple[str, list[str]]:
    """What a running proxy's status (and its state dir) says is wrong: ("ok" | "degraded" | "unhealthy",
    problems)."""
    verdict, problems = "ok", []
    if status.workers is not None:
        worker_verdict, why = judge(status.workers, now)
        if why is not None:
            verdict = worker_verdict
            problems.append(why)
    failure = status.write_failure
    if failure is not None:
        problems.append(f"cannot write {failure.get('path')} ({failure.get('errno')}: {failure.get('message')}); "
                        "allowlist changes wait until it can, the last good config keeps serving")
    if now - status.written_at > STALE_STATUS_SECONDS:
        problems.append(f"{paths.status} not updated for {now - status.written_at:.0f} s")
    try:
        space = os.statvfs(paths.state)
        free = space.f_bavail * space.f_frsize
        if free < LOW_SPACE_BYTES or (space.f_files and not space.f_favail):
            problems.append(f"the state dir {paths.state} is full ({free} bytes, {space.f_favail} inodes free)")
    except OSError:
        pass
    sink = status.log_sink
    if sink is not None and sink.get("blocked"):
        problems.append(f"stdout is not taking log lines ({sink.get('dropped_total')} dropped so far)")
    return ("degraded" if problems and verdict == "ok" else verdict), problems


if __name__ == "__main__":
    sys.exit(main())
