"""Command line: run, check, render, health, allowlist push/diff. Each setting is a flag and an EGRESS_* env var."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .allowlist import Allowlist, AllowlistError, parse_allowlist, parse_allowlist_value
from .metrics import manager_host, read_counters
from .settings import OPTIONS, Settings, SettingsError, load_settings
from .sources import MAX_SECRET_BYTES, SecretSource, Snapshot, SourceUnavailable, check_size, make_source
from .squid_conf import StatePaths, render
from .squid_process import run_as_user
from .supervisor import ExitCode, Supervisor


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also read from its EGRESS_* environment variable)")
    for option in OPTIONS:
        default = f" Default: {option.default!r}." if option.default else ""
        group.add_argument(option.flag, dest=option.name, default=None, metavar=option.metavar,
                           help=f"{option.help}{default} Env: {option.env}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egress-proxy", description="Allowlisting egress proxy (Squid + supervisor).")
    parser.add_argument("--version", action="version", version=f"egress-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "Run Squid under the supervisor in the foreground (hot-reloads the allowlist)."),
        ("check", "Validate the settings and the allowlist; print the normalised allowlist and warnings."),
        ("render", "Print the squid.conf that 'run' would use."),
        ("health", "Exit 0 when the proxy accepts connections and a config is loaded."),
    ):
        _add_setting_flags(commands.add_parser(name, help=help_text, description=help_text))
    allowlist = commands.add_parser("allowlist", help="Manage the allowlist secret.")
    actions = allowlist.add_subparsers(dest="action", required=True)
    push = actions.add_parser("push", help="Validate FILE, then write it to the secret (only if valid).")
    diff = actions.add_parser("diff", help="Show what pushing FILE would change in the secret.")
    for sub in (push, diff):
        sub.add_argument("file", type=Path, help="Allowlist file (one entry per line, # comments).")
        sub.add_argument("--secret", required=True, help="Secret name or ARN.")
    push.add_argument("--create", action="store_true", help="Create the secret if it does not exist.")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    cli = {option.name: getattr(args, option.name, None) for option in OPTIONS}
    return load_settings(cli, os.environ)


def _print_error(message: str) -> None:
    print(f"egress-proxy: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "allowlist":
            return _allowlist_command(args)
        settings = _settings(args)
        if args.command == "run":
            return Supervisor(settings).run()
        if args.command == "check":
            return _check(settings)
        if args.command == "render":
            return _render(settings)
        if args.command == "health":
            return _health(settings)
    except SettingsError as exc:
        _print_error(str(exc))
        return ExitCode.BAD_CONFIG
    except AllowlistError as exc:
        _print_error(str(exc))
        return ExitCode.BAD_CONFIG
    except SourceUnavailable as exc:
        _print_error(str(exc))
        return ExitCode.NO_SOURCE
    raise AssertionError(args.command)


def _load_allowlist(settings: Settings) -> tuple[Allowlist, str]:
    source = make_source(settings)
    snapshot = source.read()
    check_size(snapshot, source.description)  # the same limits the supervisor applies
    return parse_allowlist_value(snapshot.text, source=source.description), source.description


def _check(settings: Settings) -> int:
    allowlist, description = _load_allowlist(settings)
    for warning in allowlist.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for entry in allowlist.entries:
        print(entry)
    print(f"ok: {len(allowlist)} entries from {description}", file=sys.stderr)
    return ExitCode.OK


RENDER_DENIAL_PORT = 39128


def _render(settings: Settings) -> int:
    allowlist, _ = _load_allowlist(settings)
    # 'run' picks a free loopback port for its refusal responder at startup; show a placeholder here.
    rendered = render(settings, allowlist, StatePaths(settings.state_dir), run_as=run_as_user(),
                      denial_port=RENDER_DENIAL_PORT)
    sys.stdout.write(rendered.squid_conf)
    return ExitCode.OK


def _health(settings: Settings) -> int:
    paths = StatePaths(settings.state_dir)
    try:
        status = json.loads(paths.status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print(f"unhealthy: no status at {paths.status} (is 'egress-proxy run' running with this state dir?)")
        return 1
    if not status.get("config_loaded"):
        print("unhealthy: no config loaded")
        return 1
    host = manager_host(settings)
    try:
        # A real HTTP answer from Squid's cache manager, not just a TCP accept: a wedged Squid whose kernel
        # still accepts connections fails here. Loopback manager reads are not access-logged.
        read_counters(host, settings.port, timeout=3)
    except (OSError, http.client.HTTPException) as exc:
        print(f"unhealthy: Squid on {host}:{settings.port} did not answer: {exc}")
        return 1
    print(f"healthy: {host}:{settings.port}, allowlist version {status.get('version')}, "
          f"{status.get('entries')} entries")
    return 0


def _allowlist_command(args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text(encoding="utf-8")
    except OSError as exc:
        _print_error(f"cannot read {args.file}: {exc.strerror}")
        return ExitCode.BAD_CONFIG
    try:
        new = parse_allowlist(text, source=str(args.file))
    except AllowlistError as exc:
        _print_error(f"{exc}\nnothing was written to the secret")
        return ExitCode.BAD_CONFIG
    for warning in new.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # What push writes: the JSON form, normalised. Secrets Manager refuses more than 64 KiB; say so up front
    # (moto and LocalStack would even accept it, and the proxy would then reject it).
    value = json.dumps({"allowed_domains": list(new.entries)})
    try:
        check_size(Snapshot(text=value, version="", size=len(value.encode()), max_bytes=MAX_SECRET_BYTES),
                   f"secret {args.secret}")
    except AllowlistError as exc:
        _print_error(f"{exc}\nnothing was written to the secret")
        return ExitCode.BAD_CONFIG
    source = SecretSource(args.secret, poll_interval=0)
    try:
        current: Allowlist | None = parse_allowlist_value(source.read().text, source=f"secret {args.secret}")
    except SourceUnavailable as exc:
        if not (args.action == "push" and args.create and "ResourceNotFoundException" in str(exc)):
            _print_error(str(exc))
            return ExitCode.NO_SOURCE
        current = None
    except AllowlistError as exc:
        # The secret holds an invalid value today (the proxy keeps its last good list): pushing repairs it.
        print(f"note: the secret's current value is invalid, so everything counts as added: {exc}",
              file=sys.stderr)
        current = None
    added, removed = current.diff(new) if current else (new.entries, ())
    for entry in added:
        print(f"+ {entry}")
    for entry in removed:
        print(f"- {entry}")
    if args.action == "diff":
        print(f"{len(added)} to add, {len(removed)} to remove", file=sys.stderr)
        return ExitCode.OK
    if current is not None and not added and not removed:
        print("unchanged; nothing written", file=sys.stderr)
        return ExitCode.OK
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if current is None and args.create:
            try:
                source.client.create_secret(Name=args.secret, SecretString=value)
            except source.client.exceptions.ResourceExistsException:
                source.client.put_secret_value(SecretId=args.secret, SecretString=value)
        else:
            source.client.put_secret_value(SecretId=args.secret, SecretString=value)
    except (ClientError, BotoCoreError) as exc:
        _print_error(f"writing {args.secret} failed: {exc}")
        return ExitCode.NO_SOURCE
    print(f"wrote {len(new)} entries to {args.secret}", file=sys.stderr)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
