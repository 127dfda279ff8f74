"""`egress-proxy allowlist push|diff|suggest`: the allowlist value (flat list or policy document) from the
command line. cli.py owns the top-level parser and calls in here."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from .allowlist import AllowlistError
from .config_pipeline import validate
from .errors import ExitCode, UsageError
from .policy import IPNetwork, PolicyDocument
from .settings import OPTIONS_BY_NAME
from .sources import MAX_SECRET_BYTES, SecretSource, Snapshot, SourceUnavailable, check_size
from .suggest import TrafficSummary, format_document, format_text, merge_into, parse_time, read_cloudwatch


def add_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = actions.add_parser("push", help="Validate FILE, then write it to the secret (only if valid).")
    diff = actions.add_parser("diff", help="Show what FILE would change (per policy, modes included) in the secret, "
                                           "or in the allowlist file the proxy reads (--against).")
    for sub in (push, diff):
        sub.add_argument("file", type=Path,
                         help="Allowlist file: a flat list (one entry per line, # comments) or a JSON policy "
                              "document {\"policies\": [...]}.")
    push.add_argument("--secret", required=True, help="Secret name or ARN.")
    push.add_argument("--create", action="store_true", help="Create the secret if it does not exist.")
    against = diff.add_mutually_exclusive_group(required=True)
    against.add_argument("--secret", help="Secret name or ARN (EGRESS_ALLOWLIST_SECRET).")
    against.add_argument("--against", type=Path, metavar="ACTIVE_FILE",
                         help="The allowlist file the proxy reads (EGRESS_ALLOWLIST_FILE): what copying FILE over "
                              "it would change.")

    suggest = actions.add_parser(
        "suggest", help="List the names refused (or that report mode would refuse) per policy, from access logs.",
        description="Read the proxy's JSON access lines and print, per policy, the hosts that were denied or "
                    "would_deny because they are not allowlisted, with request counts, grouped under their "
                    "registrable domain, in the allowlist grammar.")
    suggest.add_argument("files", nargs="*", type=Path, metavar="FILE",
                         help="Files of JSON access lines ('-' or none: stdin).")
    suggest.add_argument("--log-group", help="Read from this CloudWatch Logs group instead (boto3).")
    suggest.add_argument("--since", default="24h",
                         help="With --log-group: start of the time range, a duration before now (30m, 24h, 7d) "
                              "or an ISO 8601 time. Default: 24h.")
    suggest.add_argument("--until", default="now", help="With --log-group: end of the time range. Default: now.")
    suggest.add_argument("--min-requests", type=int, default=1, metavar="N",
                         help="Leave out hosts refused fewer than N times. Default: 1.")
    suggest.add_argument("--policy", metavar="NAME", help="Only this policy.")
    suggest.add_argument("--json", action="store_true", help="Print JSON instead of the allowlist grammar.")
    suggest.add_argument("--merge", type=Path, metavar="DOCUMENT",
                         help="Print DOCUMENT (a flat list or policy document) with the suggestions added to each "
                              "policy's allow list, validated and collapsed, instead of the list.")


def run(args: argparse.Namespace) -> int:
    """Errors are raised with their exit code (UsageError, AllowlistError: 2; SourceUnavailable: 4) for cli.main
    to print."""
    if args.action == "suggest":
        return _suggest(args)
    return _push_or_diff(args)


def _warn(warnings: tuple[str, ...] | list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def client_cidrs_from_env() -> tuple[IPNetwork, ...]:
    """EGRESS_CLIENT_CIDRS (or its default): the clients of a flat list's 'default' policy, and the gate that
    document warnings are checked against."""
    option = OPTIONS_BY_NAME["client_cidrs"]
    raw = os.environ.get(option.env, option.default)
    networks: tuple[IPNetwork, ...] = option.parse(raw)
    return networks


def _push_or_diff(args: argparse.Namespace) -> int:
    try:
        gate = client_cidrs_from_env()
    except ValueError as exc:  # the settings parser's error: why, and its fix
        raise UsageError(f"EGRESS_CLIENT_CIDRS: {exc}; {getattr(exc, 'fix', '')}") from None
    text = _read(args.file)
    try:
        new = validate(_snapshot(text), source=str(args.file), client_cidrs=gate)
    except AllowlistError as exc:
        raise UsageError(f"{exc}\nnothing was written to the secret") from None
    _warn(new.warnings)
    # What push writes: the normalised value (a flat list keeps its JSON form). Secrets Manager refuses more
    # than 64 KiB; say so up front (moto and LocalStack would even accept it, and the proxy would then reject it).
    if args.action == "diff" and args.against is not None:
        return _diff_files(args.against, new, gate)
    value = new.to_value()
    try:
        check_size(_snapshot(value, max_bytes=MAX_SECRET_BYTES), f"secret {args.secret}")
    except AllowlistError as exc:
        raise UsageError(f"{exc}\nnothing was written to the secret") from None
    source = SecretSource(args.secret, poll_interval=0)
    current: PolicyDocument | None
    try:
        current = validate(source.read(), source=f"secret {args.secret}", client_cidrs=gate)
    except SourceUnavailable as exc:
        if not (args.action == "push" and args.create and "ResourceNotFoundException" in str(exc)):
            raise
        current = None
    except AllowlistError as exc:
        # The secret holds an invalid value today (the proxy keeps its last good list): pushing repairs it.
        print(f"note: the secret's current value is invalid, so everything counts as added: {exc}",
              file=sys.stderr)
        current = None
    changed = _print_diff(current, new)
    if args.action == "diff":
        return ExitCode.OK
    if current is not None and not changed:
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
        raise SourceUnavailable(f"writing {args.secret} failed: {exc}") from None
    if new.flat:
        print(f"wrote {len(new.allowlist)} entries to {args.secret}", file=sys.stderr)
    else:
        print(f"wrote {len(new.policies)} policies ({new.entry_count} entries) to {args.secret}", file=sys.stderr)
    return ExitCode.OK


def _diff_files(active: Path, new: PolicyDocument, gate: tuple[IPNetwork, ...]) -> int:
    """``allowlist diff FILE --against ACTIVE_FILE``: the file source's twin of diffing against the secret."""
    try:
        text = active.read_text(encoding="utf-8")
    except OSError as exc:  # the source the proxy reads is unreachable: 4, as for the secret
        raise SourceUnavailable(f"cannot read {active}: {exc.strerror}") from None
    try:
        current: PolicyDocument | None = validate(_snapshot(text), source=str(active), client_cidrs=gate)
    except AllowlistError as exc:
        print(f"note: {active} is invalid today (the proxy keeps its last good list), so everything counts as "
              f"added: {exc}", file=sys.stderr)
        current = None
    _print_diff(current, new)
    return ExitCode.OK


def _print_diff(current: PolicyDocument | None, new: PolicyDocument) -> bool:
    """Print what changes; True if anything does."""
    if current is None or (current.flat and new.flat):
        # Flat to flat: the '+ entry' / '- entry' lines this command printed before documents existed.
        if current is None and not new.flat:
            lines = PolicyDocument((), new.client_cidrs).diff(new).lines()
            for line in lines:
                print(line)
            print(f"{new.entry_count} to add, 0 to remove", file=sys.stderr)
            return True
        added, removed = current.allowlist.diff(new.allowlist) if current else (new.allowlist.entries, ())
        for entry in added:
            print(f"+ {entry}")
        for entry in removed:
            print(f"- {entry}")
        print(f"{len(added)} to add, {len(removed)} to remove", file=sys.stderr)
        return bool(added or removed)
    diff = current.diff(new)
    for line in diff.lines():
        print(line)
    modes = len(diff.mode_changes)
    print(f"{diff.added} to add, {diff.removed} to remove"
          + (f", {modes} mode change{'s' if modes > 1 else ''}" if modes else ""), file=sys.stderr)
    return bool(diff)


def _suggest(args: argparse.Namespace) -> int:
    if args.min_requests < 1:
        raise UsageError(f"--min-requests {args.min_requests}: use a whole number of at least 1")
    merge_base = None if args.merge is None else _read_merge_base(args.merge)
    summary = TrafficSummary()
    if args.log_group:
        if args.files:
            raise UsageError("give FILEs or --log-group, not both")
        now = dt.datetime.now(dt.UTC)
        try:
            start, end = parse_time(args.since, now), parse_time(args.until, now)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if start >= end:
            raise UsageError(f"--since {args.since} is not before --until {args.until}")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for line in read_cloudwatch(args.log_group, start, end):
                summary.add_line(line)
        except (ClientError, BotoCoreError) as exc:
            raise SourceUnavailable(f"reading CloudWatch Logs group {args.log_group} failed: {exc}") from None
    else:
        for path in args.files or [Path("-")]:
            try:
                if str(path) == "-":
                    if sys.stdin.isatty():
                        print("reading access lines from stdin (end with Ctrl-D)", file=sys.stderr)
                    for line in sys.stdin:
                        summary.add_line(line)
                else:
                    with path.open(encoding="utf-8", errors="replace") as stream:
                        for line in stream:
                            summary.add_line(line)
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    print(summary.describe(), file=sys.stderr)
    suggestions = summary.suggestions(min_requests=args.min_requests, policy=args.policy)
    if merge_base is not None:
        merged, missing = merge_into(merge_base, suggestions)  # AllowlistError if the merge is invalid (a limit)
        for name in missing:
            print(f"warning: suggestions for policy {name!r} were not merged: {args.merge} has no such policy",
                  file=sys.stderr)
        _warn(merged.warnings)
        sys.stdout.write(format_document(merged))
        return ExitCode.OK
    if args.json:
        import json

        print(json.dumps(summary.to_json(suggestions), indent=2))
    else:
        sys.stdout.write(format_text(suggestions))
    if not suggestions:
        print("nothing to suggest: no name was refused" + (
            f" {args.min_requests} or more times" if args.min_requests > 1 else "")
            + (f" under policy {args.policy!r}" if args.policy else ""), file=sys.stderr)
    return ExitCode.OK


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _snapshot(text: str, max_bytes: int | None = None) -> Snapshot:
    """A value from the command line, as a source would hand it over (the file itself has no size limit here:
    what counts is the pushed value's, checked against the secret's)."""
    return Snapshot(text=text, version="", size=len(text.encode()), max_bytes=max_bytes)


def _read_merge_base(path: Path) -> PolicyDocument:
    """The --merge document. Raises UsageError (unreadable) or AllowlistError (invalid)."""
    return validate(_snapshot(_read(path)), source=str(path), client_cidrs=client_cidrs_from_env())
