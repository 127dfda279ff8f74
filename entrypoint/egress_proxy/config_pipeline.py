"""The config pipeline: from an allowlist snapshot and the settings to a validated policy document and a rendered
squid.conf, and what describes the config that is active.

Every caller takes the same steps, here and nowhere else: the size check, the policy document (a flat list or a
document, every problem named by its path), then the rendering. ``validate`` is the first half (``check`` and
``allowlist push|diff`` stop there); ``build_config`` is the whole (``render``, and the supervisor's
``ConfigApplier``, which also parse-checks a candidate with ``squid -k parse`` and activates it).

Also owned here: the upstream login (read once at startup, rendered into the config), ``ReloadStats`` (the
counters the metrics read) and ``Status``, the schema of ``status.json``, which the supervisor writes and
``egress-proxy health`` reads.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .policy import IPNetwork, PolicyDocument, parse_policy_value
from .settings import Settings, SettingsError, check_login
from .sources import Snapshot, check_size
from .squid_conf import RenderedConfig, StatePaths, render
from .squid_process import atomic_write, parse_check, write_rendered

# --- the pipeline ------------------------------------------------------------------------------------------


def validate(snapshot: Snapshot, *, source: str, client_cidrs: Sequence[IPNetwork]) -> PolicyDocument:
    """The size check, then the document. Raises AllowlistError naming every problem.

    Whole-value rejection: one bad entry (or an oversized or malformed value) rejects the value, and the error
    lists every bad entry. Skipping bad entries would silently apply a policy nobody wrote."""
    check_size(snapshot, source)
    return parse_policy_value(snapshot.text, source=source, client_cidrs=client_cidrs)


@dataclass(frozen=True)
class Built:
    """A validated document and the config rendered from it."""

    document: PolicyDocument
    rendered: RenderedConfig
    phases: tuple[tuple[str, float], ...] = ()  # ("validate", seconds), ("render", seconds)


def build_config(snapshot: Snapshot, settings: Settings, *, source: str, paths: StatePaths, run_as: str | None,
                 denial_port: int, access_log_port: int, access_log_token: str, upstream_login: str | None) -> Built:
    """From a snapshot and the settings to a validated document and its rendered config (not yet parse-checked
    by Squid: that is ``ConfigApplier.build``'s, which has a Squid to run). Raises AllowlistError."""
    started = time.monotonic()
    document = validate(snapshot, source=source, client_cidrs=settings.client_cidrs)
    validated = time.monotonic()
    rendered = render(settings, document, paths, run_as=run_as, denial_port=denial_port,
                      access_log_port=access_log_port, access_log_token=access_log_token, upstream_login=upstream_login)
    return Built(document, rendered, (("validate", validated - started), ("render", time.monotonic() - validated)))


def read_upstream_login(settings: Settings) -> str | None:
    """user:password from EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE (one line), or None. Raises SettingsError."""
    path = settings.upstream_proxy_credentials_file
    if path is None:
        return None
    name = "upstream_proxy_credentials_file"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(name, str(path), f"cannot be read ({exc})",
                            "point it at a readable file holding user:password") from None
    try:
        return check_login(text)
    except ValueError as exc:
        fix = getattr(exc, "fix", "write user:password on one line")
        raise SettingsError(name, str(path), f"holds no valid credentials: {exc}", fix) from None


# --- the active config's statistics and status.json ----------------------------------------------------------


@dataclass
class ReloadStats:
    """Counters the metrics loop and the health check read.

    ``version``/``loaded_at``/``entries`` describe the ACTIVE config; a rejected value never touches them.
    """

    success: int = 0
    failure: int = 0
    loaded_at: float | None = None  # wall-clock time the active config was written (its age: age_seconds())
    version: str | None = None
    entries: int = 0
    last_error: str | None = None
    rejected_version: str | None = None  # the last version refused (None once a newer one was applied)
    skipped: int = 0  # changes whose rendered config was identical (no reconfigure)
    identity: Any = None  # membership.IdentityStats, for the metrics

    def age_seconds(self, now: float | None = None) -> float | None:
        if self.loaded_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.loaded_at)


class StatusUnreadable(ValueError):
    """status.json is missing, unreadable or not this schema."""


@dataclass(frozen=True)
class Status:
    """status.json in the state directory: the supervisor writes it, ``egress-proxy health`` reads it."""

    config_loaded: bool
    version: str | None
    loaded_at: float | None
    written_at: float
    config_age_seconds: float | None  # the age at written_at; a reader adds (now - written_at)
    entries: int
    reload_success: int
    reload_failure: int
    reload_skipped: int
    rejected_version: str | None
    last_error: str | None
    port: int
    listen_address: str
    # What the run-time fault handling reports (the last failed write, the Squid workers, the stdout buffer), for
    # `health` to judge; None when the supervisor has nothing to say, and in status files that predate them.
    write_failure: dict[str, Any] | None = None
    workers: dict[str, Any] | None = None
    log_sink: dict[str, Any] | None = None

    @classmethod
    def of(cls, stats: ReloadStats, *, config_loaded: bool, settings: Settings, now: float,
           write_failure: dict[str, Any] | None = None, workers: dict[str, Any] | None = None,
           log_sink: dict[str, Any] | None = None) -> Status:
        age = stats.age_seconds(now)
        return cls(config_loaded=config_loaded, version=stats.version, loaded_at=stats.loaded_at,
                   written_at=round(now, 3), config_age_seconds=None if age is None else round(age, 1),
                   entries=stats.entries, reload_success=stats.success, reload_failure=stats.failure,
                   reload_skipped=stats.skipped, rejected_version=stats.rejected_version,
                   last_error=stats.last_error, port=settings.port, listen_address=str(settings.listen_address),
                   write_failure=write_failure, workers=workers, log_sink=log_sink)

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> Status:
        """Raises StatusUnreadable (naming the path) when the file is missing, not JSON or not this schema."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StatusUnreadable(f"no status at {path} ({exc})") from None
        required = {field.name for field in fields(cls) if field.default is MISSING}
        if not isinstance(data, dict) or not required <= data.keys():
            missing = sorted(required - data.keys()) if isinstance(data, dict) else ["(not a JSON object)"]
            raise StatusUnreadable(f"{path} is not a status file of this version (missing {', '.join(missing)})")
        return cls(**{field.name: data[field.name] for field in fields(cls) if field.name in data})


# --- the supervisor's side: candidates, the last good config ---------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A source value that passed the policy, the rendering and ``squid -k parse``."""

    snapshot: Snapshot
    document: PolicyDocument
    rendered: RenderedConfig
    added: int
    removed: int
    started: float  # monotonic, when the worker started building it
    unchanged: bool  # renders to exactly the active config: nothing to reconfigure
    mode_changes: tuple[tuple[str, str, str], ...] = ()  # (policy, old mode, new mode)
    # Seconds the build spent in each part: validate, render, parse_check (0 when skipped). The reload event adds
    # the write of the files and the workers' reconfigure, so an operator sees where a slow reload went.
    phases: tuple[tuple[str, float], ...] = ()


class WriteFailures:
    """The last write in the state dir that failed (a full disk), until a write to the same path succeeds. At run
    time a failed write is never fatal: it is reported once per path and errno (``report("write_failed", ...)``),
    shown in status.json and by ``health``, and its end is reported too (``"write_recovered"``)."""

    def __init__(self, report: Callable[[str, dict[str, Any]], None]) -> None:
        self.report = report
        self.current: dict[str, Any] | None = None  # path, errno (ENOSPC), message, since

    def failed(self, exc: OSError) -> None:
        failure = {"path": str(exc.filename) if exc.filename else None,
                   "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                   "message": exc.strerror or str(exc), "since": round(time.time(), 3)}
        if self.current is None or (self.current["path"], self.current["errno"]) != (failure["path"],
                                                                                     failure["errno"]):
            self.current = failure
            self.report("write_failed", failure)

    def succeeded(self, path: Path) -> None:
        if self.current is not None and self.current["path"] == str(path):
            failure, self.current = self.current, None
            self.report("write_recovered", failure)


class ConfigApplier:
    """Build (validate, render, parse-check) and activate candidates. Keeps the last good config."""

    def __init__(self, settings: Settings, paths: StatePaths, *, user: str | None, denial_port: int,
                 access_log_port: int, access_log_token: str, upstream_login: str | None,
                 on_parse_warning: Callable[[str], None],
                 writes: WriteFailures | None = None,
                 status_extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.settings = settings
        self.paths = paths
        self.user = user
        self.denial_port = denial_port
        self.access_log_port = access_log_port
        self.access_log_token = access_log_token
        self.upstream_login = upstream_login  # from EGRESS_UPSTREAM_PROXY_CREDENTIALS_FILE, read at startup
        self.on_parse_warning = on_parse_warning
        self.active: RenderedConfig | None = None
        self.active_document: PolicyDocument | None = None
        self.stats = ReloadStats()
        self.writes = writes or WriteFailures(lambda event, failure: None)
        self.status_extra = status_extra  # more of status.json (the workers, the log sink), from the supervisor

    def build(self, snapshot: Snapshot, source: str, started: float) -> Candidate:
        """The pipeline, then ``squid -k parse`` on a copy in the candidate directory, unless it renders to the
        active config or differs from it only in plain list entries. Raises AllowlistError, SquidError, or OSError
        when the copy cannot be written."""
        built = build_config(snapshot, self.settings, source=source, paths=self.paths, run_as=self.user,
                             denial_port=self.denial_port, access_log_port=self.access_log_port,
                             access_log_token=self.access_log_token,
                             upstream_login=self.upstream_login)
        unchanged = built.rendered == self.active
        checking = time.monotonic()
        # Only list contents changed: Squid already parsed these directives, and the lists hold nothing it can
        # refuse (see differs_in_plain_lists_only). The 100,000-entry reload saves a full parse of every list.
        if not unchanged and not built.rendered.differs_in_plain_lists_only(self.active):
            candidate_paths = self.paths.in_dir(self.paths.candidate_dir)
            write_rendered(built.rendered.relocated(self.paths, candidate_paths), candidate_paths)
            for warning in parse_check(self.settings.squid_binary, candidate_paths.squid_conf):
                self.on_parse_warning(warning)
        phases = (*built.phases, ("parse_check", time.monotonic() - checking))
        previous = self.active_document
        change = previous.diff(built.document) if previous else None
        added, removed = (change.added, change.removed) if change else (built.document.entry_count, 0)
        return Candidate(snapshot, built.document, built.rendered, added, removed, started, unchanged,
                         change.mode_changes if change else (), phases)

    def activate(self, candidate: Candidate) -> None:
        """Write the config files (all or nothing; raises OSError, and then nothing changed), then the status."""
        write_rendered(candidate.rendered, self.paths)
        self.active = candidate.rendered
        self.active_document = candidate.document
        self.stats.loaded_at = time.time()
        self.stats.version = candidate.snapshot.version
        self.stats.entries = candidate.document.entry_count
        self.write_status()

    def write_status(self) -> None:
        """Never raises: a status that cannot be written (a full disk) is a WriteFailures entry, not an outage."""
        extra = self.status_extra() if self.status_extra is not None else {}
        status = Status.of(self.stats, config_loaded=self.active is not None, settings=self.settings,
                           now=time.time(), write_failure=self.writes.current, **extra)
        try:
            status.write(self.paths.status)
        except OSError as exc:
            self.writes.failed(exc)
            return
        self.writes.succeeded(self.paths.status)


__all__ = ["Built", "Candidate", "ConfigApplier", "ReloadStats", "Status", "StatusUnreadable", "WriteFailures",
           "build_config", "read_upstream_login", "validate"]
