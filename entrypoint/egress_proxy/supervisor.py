"""The supervisor loop: source -> allowlist policy -> render -> parse-check -> atomic swap -> reconfigure.

Starts Squid once and never restarts it for an allowlist change: ``squid -k reconfigure`` keeps open tunnels
and keep-alive connections. A rejected update leaves the last good config serving. Signals and the child's
exit are handled in one place: the main loop.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from types import FrameType
from typing import Any, TextIO

from .allowlist import AllowlistError
from .denier import Denier
from .metrics import DecisionCounter, MetricsLoop, manager_host
from .policy import PolicyDocument, parse_policy_value
from .settings import Settings
from .sources import Snapshot, Source, SourceUnavailable, check_size, make_source
from .squid_conf import RenderedConfig, StatePaths, default_error_page, render, service_name
from .squid_process import (
    LogRelay,
    SquidError,
    SquidProcess,
    access_sink,
    atomic_write,
    parse_check,
    prepare_state_dir,
    run_as_user,
    wait_until_listening,
)


class ExitCode(IntEnum):
    OK = 0
    BAD_CONFIG = 2  # bad settings or allowlist
    SQUID_FAILED = 3  # Squid failed to start or to parse the config
    NO_SOURCE = 4  # no allowlist source reachable at startup
    SQUID_DIED = 5  # Squid exited unexpectedly


class Logger:
    """JSON lines on one stream; thread-safe because the log relays write from their own threads."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def event(self, level: str, event: str, message: str, **fields: Any) -> None:
        record = {"type": "supervisor", "time": round(time.time(), 3), "level": level, "event": event,
                  "message": message, **fields}
        self.write_line(json.dumps(record, separators=(",", ":"), default=str))


# How long Squid may take to confirm a reconfigure ("Accepting ... connections at" in cache.log). The loop
# keeps handling signals and Squid's exit meanwhile; it only holds back the next source poll.
CONFIRM_TIMEOUT = 30.0


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

    def age_seconds(self, now: float | None = None) -> float | None:
        if self.loaded_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.loaded_at)


@dataclass
class _PendingReload:
    """A reconfigure sent to Squid and not yet confirmed in its cache.log."""

    snapshot: Snapshot
    added: int
    removed: int
    entries: int
    started: float  # monotonic, when the change was picked up
    deadline: float  # monotonic


class ConfigApplier:
    """Validate, render, parse-check and activate a candidate allowlist. Keeps the last good config."""

    def __init__(self, settings: Settings, paths: StatePaths, logger: Logger, user: str | None,
                 denial_port: int) -> None:
        self.settings = settings
        self.paths = paths
        self.logger = logger
        self.user = user
        self.denial_port = denial_port
        self.active: RenderedConfig | None = None
        self.active_document: PolicyDocument | None = None
        self.stats = ReloadStats()
        self.status_written = 0.0  # monotonic time of the last status.json write

    def build(self, snapshot: Snapshot, source: str) -> tuple[PolicyDocument, RenderedConfig]:
        """Policy + render + ``squid -k parse`` on a candidate copy. Raises AllowlistError or SquidError.

        Whole-update rejection: one bad entry (or an oversized or malformed value) rejects the update, and
        the error lists every bad entry. Skipping bad entries would silently apply a policy nobody wrote."""
        check_size(snapshot, source)
        document = parse_policy_value(snapshot.text, source=source, client_cidrs=self.settings.client_cidrs)
        rendered = render(self.settings, document, self.paths, run_as=self.user, denial_port=self.denial_port)
        if rendered == self.active:
            return document, rendered
        candidate_paths = self.paths.in_dir(self.paths.candidate_dir)
        candidate = render(self.settings, document, candidate_paths, run_as=self.user,
                           denial_port=self.denial_port)
        for path, text in candidate.files(candidate_paths).items():
            atomic_write(path, text)
        for warning in parse_check(self.settings.squid_binary, candidate_paths.squid_conf):
            self.logger.event("warning", "squid_parse_warning", warning)
        return document, rendered

    def activate(self, document: PolicyDocument, rendered: RenderedConfig, snapshot: Snapshot) -> None:
        # The list files first, then squid.conf: Squid reads them only when told to reconfigure.
        for path, text in rendered.files(self.paths).items():
            atomic_write(path, text)
        self.active = rendered
        self.active_document = document
        self.stats.loaded_at = time.time()
        self.stats.version = snapshot.version
        self.stats.entries = document.entry_count
        self.write_status()

    def write_status(self) -> None:
        now = time.time()
        age = self.stats.age_seconds(now)
        status = {
            "config_loaded": self.active is not None,
            "version": self.stats.version,
            "loaded_at": self.stats.loaded_at,
            "written_at": round(now, 3),
            # The age at written_at; a reader adds (now - written_at), or uses now - loaded_at.
            "config_age_seconds": None if age is None else round(age, 1),
            "entries": self.stats.entries,
            "reload_success": self.stats.success,
            "reload_failure": self.stats.failure,
            "reload_skipped": self.stats.skipped,
            "rejected_version": self.stats.rejected_version,
            "last_error": self.stats.last_error,
            "port": self.settings.port,
            "listen_address": str(self.settings.listen_address),
        }
        atomic_write(self.paths.status, json.dumps(status, indent=1))
        self.status_written = time.monotonic()


def _log_warnings(logger: Logger, document: PolicyDocument) -> None:
    for warning in document.warnings[:50]:
        logger.event("warning", "allowlist_warning", warning)
    if len(document.warnings) > 50:
        logger.event("warning", "allowlist_warning", f"... and {len(document.warnings) - 50} more warnings")


class Supervisor:
    def __init__(self, settings: Settings, stream: TextIO | None = None,
                 source: Source | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.logger = Logger(stream or sys.stdout)
        self.paths = StatePaths(settings.state_dir)
        self.user = run_as_user()
        self.source = source or make_source(settings)
        # Bound now (so the rendered config knows its port), served from run() before Squid starts.
        self.denier = Denier()
        self.applier = ConfigApplier(settings, self.paths, self.logger, self.user, denial_port=self.denier.port)
        self.squid = SquidProcess(settings.squid_binary, self.paths.squid_conf, service_name(self.paths))
        self.clock = clock
        self._wake = threading.Event()
        self._stop_signal: int | None = None
        # Each worker logs "Accepting ... connections at" when it has (re)loaded; a reload is taken when all have.
        self._accepting_workers = 0
        self._accepting_lock = threading.Lock()
        self._backoff = 0.0
        self.decisions = DecisionCounter()  # access-log decisions, for the metrics
        # The last source version processed, applied or rejected: a rejected value is not retried (nor its
        # error re-logged) until the source moves again. stats.version stays the ACTIVE version.
        self._seen_version: str | None = None
        self._pending: _PendingReload | None = None

    # --- signals -----------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop_signal = signum
        self._wake.set()

    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)

    # --- logs --------------------------------------------------------------------------------------
    def _cache_log_line(self, line: str) -> None:
        text = line.rstrip("\n")
        if text.endswith(f"TCP connection to 127.0.0.1/{self.denier.port} failed"):
            # Squid's note for every CONNECT refusal relayed by the denier (it counts a peer's 403 as a failed
            # connection; see the cache_peer line in squid.conf.j2). The access line says what happened.
            return
        if "Accepting" in text and "connections at" in text:
            with self._accepting_lock:
                self._accepting_workers += 1
            self._wake.set()
        self.logger.write_line(json.dumps({"type": "cache_log", "message": text}, separators=(",", ":")))

    # --- main --------------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signal_handlers()
        try:
            snapshot = self.source.read()
        except SourceUnavailable as exc:
            self.logger.event("error", "startup_failed", f"no allowlist source reachable at startup: {exc}")
            return ExitCode.NO_SOURCE
        try:
            error_page = (self.settings.error_page.read_text(encoding="utf-8") if self.settings.error_page
                          else default_error_page())
        except OSError as exc:
            self.logger.event("error", "startup_failed",
                              f"cannot read EGRESS_ERROR_PAGE {self.settings.error_page}: {exc.strerror}; "
                              "point it at a readable HTML file or unset it for the built-in page")
            return ExitCode.BAD_CONFIG
        try:
            prepare_state_dir(self.paths, error_page=error_page, user=self.user)
            document, rendered = self.applier.build(snapshot, self.source.description)
        except AllowlistError as exc:
            self.logger.event("error", "startup_failed", str(exc), source=self.source.description)
            return ExitCode.BAD_CONFIG
        except SquidError as exc:
            self.logger.event("error", "startup_failed", str(exc))
            return ExitCode.SQUID_FAILED
        _log_warnings(self.logger, document)
        self.applier.activate(document, rendered, snapshot)
        self._seen_version = snapshot.version
        self.denier.start()
        LogRelay(self.paths.access_fifo, access_sink(self.logger.write_line, self.decisions.observe))
        LogRelay(self.paths.cache_fifo, self._cache_log_line)
        try:
            self.squid.start()
            wait_until_listening(manager_host(self.settings), self.settings.port, self.squid, timeout=60)
        except SquidError as exc:
            self.logger.event("error", "startup_failed", str(exc))
            self.squid.stop(grace=5)
            return ExitCode.SQUID_FAILED
        self.logger.event("info", "started", f"proxy listening on {self.settings.listen_address}:"
                          f"{self.settings.port} with {document.entry_count} allowlist entries",
                          version=snapshot.version, entries=document.entry_count, policies=len(document.policies),
                          source=self.source.description, pid=self.squid.pid)
        if self.settings.metrics:  # its own daemon thread; CloudWatch trouble never reaches this loop
            MetricsLoop(self.settings, self.logger, lambda: self.applier.stats, self.decisions).start()
        return self._loop()

    def _next_poll_delay(self) -> float:
        base = self.source.poll_interval
        # +-10% jitter so a fleet of proxies does not poll Secrets Manager in step.
        return max(0.2, base * random.uniform(0.9, 1.1)) + self._backoff

    def _loop(self) -> int:
        next_poll = self.clock() + self._next_poll_delay()
        while True:
            # While a reconfigure is pending, the cache.log relay wakes us when Squid confirms it.
            if self._pending is not None:
                timeout = 0.05 if self._all_workers_accepting() else 0.5
            else:
                timeout = max(0.0, min(1.0, next_poll - self.clock()))
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            if self._stop_signal is not None:
                return self._shutdown()
            code = self.squid.poll()
            if code is not None:
                self.logger.event("error", "squid_died", f"Squid exited unexpectedly with code {code}",
                                  exit_code=code)
                self.squid.kill_leftovers()
                return ExitCode.SQUID_DIED
            if self._pending is not None:
                self._check_pending()  # the source is not polled until Squid has taken the last change
                continue
            if self.clock() >= next_poll:
                self.poll_source()
                next_poll = self.clock() + self._next_poll_delay()
            if time.monotonic() - self.applier.status_written >= 10:
                self.applier.write_status()  # keeps config_age_seconds fresh for readers of status.json

    def _shutdown(self) -> int:
        name = signal.Signals(self._stop_signal or signal.SIGTERM).name
        self.logger.event("info", "stopping", f"{name} received: draining for up to "
                          f"{self.settings.drain_seconds:g} s", drain_seconds=self.settings.drain_seconds)
        code = self.squid.stop(grace=self.settings.drain_seconds + 10)
        self.logger.event("info", "stopped", f"Squid stopped with code {code}", exit_code=code)
        return ExitCode.OK

    def poll_source(self) -> None:
        """One watch step: cheap change check, then fetch + apply. Never raises."""
        try:
            if not self.source.changed(self._seen_version):
                self._source_back()
                return
            snapshot = self.source.read()
        except SourceUnavailable as exc:
            # Keep serving the last good config; back off (added to the poll interval) up to 5 minutes.
            self._backoff = min(300.0, max(1.0, self._backoff * 2))
            self.logger.event("warning", "source_unavailable", f"{exc}; still serving version "
                              f"{self.applier.stats.version}", retry_in=round(self.source.poll_interval
                                                                              + self._backoff, 1),
                              version=self.applier.stats.version)
            return
        self._source_back()
        if snapshot.version == self._seen_version:
            return
        self.apply(snapshot)

    def _source_back(self) -> None:
        if self._backoff:
            self.logger.event("info", "source_available", f"{self.source.description} is reachable again",
                              version=self.applier.stats.version)
        self._backoff = 0.0

    def apply(self, snapshot: Snapshot) -> bool:
        """Validate, render, parse-check, swap and reconfigure. The ``reloaded`` line is logged when Squid
        confirms (see _check_pending); the loop stays responsive meanwhile."""
        started = time.monotonic()
        previous = self.applier.active_document
        self._seen_version = snapshot.version
        try:
            document, rendered = self.applier.build(snapshot, self.source.description)
        except (AllowlistError, SquidError) as exc:
            self.applier.stats.failure += 1
            self.applier.stats.last_error = str(exc)
            self.applier.stats.rejected_version = snapshot.version
            self.applier.write_status()
            bad = ([problem.path or problem.entry for problem in exc.problems[:20]]
                   if isinstance(exc, AllowlistError) else [])
            self.logger.event("error", "reload_rejected", f"rejected allowlist version {snapshot.version}; "
                              f"version {self.applier.stats.version} keeps serving: {exc}",
                              version=snapshot.version, active_version=self.applier.stats.version,
                              bad_entries=bad, source=self.source.description)
            return False
        _log_warnings(self.logger, document)
        self.applier.stats.rejected_version = None
        if rendered == self.applier.active:
            self.applier.stats.version = snapshot.version
            self.applier.stats.skipped += 1
            self.applier.write_status()
            self.logger.event("info", "reload_skipped", "allowlist source changed but the rendered config did "
                              "not; Squid was not reconfigured", version=snapshot.version,
                              entries=document.entry_count)
            return True
        change = previous.diff(document) if previous else None
        added, removed = (change.added, change.removed) if change else (document.entry_count, 0)
        self.applier.activate(document, rendered, snapshot)
        with self._accepting_lock:
            self._accepting_workers = 0
        self.squid.reconfigure()
        self._pending = _PendingReload(snapshot=snapshot, added=added, removed=removed,
                                       entries=document.entry_count, started=started,
                                       deadline=time.monotonic() + CONFIRM_TIMEOUT)
        return True

    def _port_accepts(self) -> bool:
        try:
            with socket.create_connection((manager_host(self.settings), self.settings.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _all_workers_accepting(self) -> bool:
        with self._accepting_lock:
            return self._accepting_workers >= self.settings.workers

    def _check_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        # Every worker must have logged "Accepting ... connections at", and the port must accept a TCP connection
        # (one that sends nothing, which is not logged): a worker logs that line just before it listens again.
        confirmed = self._all_workers_accepting() and self._port_accepts()
        if not confirmed and time.monotonic() < pending.deadline:
            return
        self._pending = None
        self.applier.stats.success += 1
        self.applier.write_status()
        elapsed_ms = round((time.monotonic() - pending.started) * 1000, 1)
        version = pending.snapshot.version
        self.logger.event(
            "info" if confirmed else "warning",
            "reloaded",
            f"allowlist version {version} active: +{pending.added} -{pending.removed} entries "
            f"({pending.entries} total) in {elapsed_ms} ms"
            + ("" if confirmed else f"; Squid did not confirm within {CONFIRM_TIMEOUT:g} s"),
            version=version, added=pending.added, removed=pending.removed, entries=pending.entries,
            duration_ms=elapsed_ms, confirmed=confirmed,
        )
