"""The supervisor: one loop over one event queue, performing what ``loop.step`` decides.

Flow: source -> allowlist policy -> render -> parse-check -> atomic swap -> reconfigure. Squid is started once
and never restarted for an allowlist change: ``squid -k reconfigure`` keeps open tunnels and keep-alive
connections. A rejected update leaves the last good config serving.

The loop thread only waits for events, calls the pure ``loop.step`` and performs the actions it returns. Slow
I/O (the source, e.g. Secrets Manager; the candidate's ``squid -k parse``) runs in a worker thread that posts
its result as an event; signals arrive through ``signal.set_wakeup_fd`` on the same queue, so a handler never
takes a lock. The components (worker, refusal responder, log relays, Squid, metrics) have start() and stop();
the supervisor stops them in reverse order of start once Squid has exited, so the relays drain every line
Squid wrote and the metrics flush their partial interval.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import resource
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from . import loop
from . import squid_strings as strings
from .allowlist import AllowlistError
from .config_pipeline import Candidate, ConfigApplier, WriteFailures, read_upstream_login
from .denier import Denier
from .errors import ExitCode, describe_os_error, exit_code_of
from .log_output import LogOutput
from .membership import IdentityRefresher
from .metrics import DecisionCounter, MetricsLoop, RuntimeFigures, manager_host
from .policy import PolicyDocument
from .settings import Settings, SettingsError
from .sources import Snapshot, Source, SourceUnavailable, make_source
from .squid_conf import StatePaths, default_error_page, listeners, service_name, settings_warnings
from .squid_process import (
    AccessLogListener,
    LogRelay,
    SquidError,
    SquidProcess,
    access_sink,
    connecting_worker,
    prepare_state_dir,
    run_as_user,
)
from .threads import named_thread
from .workers import WorkerWatch, read_workers

# The loop's events and actions, with this supervisor's source values and candidates.
Event = loop.Event[Snapshot, Candidate]
Action = loop.Action[Snapshot, Candidate]


class Logger:
    """The supervisor's JSON event lines. They go through the bounded stdout buffer like every other line, so
    logging never waits on stdout (log_output.py)."""

    def __init__(self, output: LogOutput) -> None:
        self.output = output

    def write_line(self, line: str) -> None:
        self.output.put("supervisor", line)

    def event(self, level: str, event: str, message: str, **fields: Any) -> None:
        record = {"type": "supervisor", "time": round(time.time(), 3), "level": level, "event": event,
                  "message": message, **fields}
        self.write_line(json.dumps(record, separators=(",", ":"), default=str))


def _log_warnings(logger: Logger, document: PolicyDocument, settings: Settings) -> None:
    for warning in settings_warnings(settings, document):
        logger.event("warning", "allowlist_warning", warning)
    for warning in document.warnings[:50]:
        logger.event("warning", "allowlist_warning", warning)
    if len(document.warnings) > 50:
        logger.event("warning", "allowlist_warning", f"... and {len(document.warnings) - 50} more warnings")


# The cache.log relay reads again at most this long after a small read (LogRelay's default is 200 ms). The workers'
# "Accepting" lines in cache.log confirm a reload, and each read of the default relay held them back by up to
# 200 ms: a 100,000-entry reload's confirmation came 0.2-0.8 s after the reconfigure, in steps of 0.2 s, while each
# worker's own reconfigure took under 0.1 s of CPU. cache.log is quiet (a few lines per reload, one per CONNECT the
# denier refuses), so 20 ms costs at most 50 wake-ups a second under a flood of refusals.
CACHE_LOG_COALESCE_SECONDS = 0.02

# How often the loop looks for a worker Squid revived (a /proc read of the master's children and their command lines).
# The loop wakes several times a second (the file source's polls and their answers), and this read was most of each
# wake-up's cost.
WORKER_WATCH_SECONDS = 1.0

# At exit, how long the lines still buffered may take to reach stdout before the proxy exits without them.
LOG_FLUSH_SECONDS = 5.0


# --- the event queue ---------------------------------------------------------------------------------------


def _ignore_signal(_signum: int, _frame: object) -> None:
    """A Python-level handler must exist (else the default action kills us); the wakeup fd does the work."""


class EventQueue:
    """One queue for every event: threads post with ``post``; signals arrive as their number written by the
    C-level handler to the wakeup pipe (``signal.set_wakeup_fd``), so no handler ever takes a lock."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._posted: deque[Event] = deque()  # append/popleft are atomic: no lock needed

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            signal.signal(signum, _ignore_signal)

    def close(self) -> None:
        """Stop waking up, and ignore further stop signals: the exit code is decided. (Python restores the
        default action of every signal it handled when the interpreter finalizes, so a SIGTERM arriving while
        the process exits would otherwise turn a clean exit, or exit 5, into death by signal.)"""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)

    def post(self, event: Event) -> None:
        self._posted.append(event)
        with contextlib.suppress(BlockingIOError):  # a full pipe already means "wake up"
            os.write(self._write, b"\0")

    def post_quietly(self, event: Event) -> None:
        """Queue ``event`` without waking the loop: it is taken at the loop's next wake-up (see
        loop.next_wakeup, which wakes for a poll's answer when the next poll can be due)."""
        self._posted.append(event)

    def wait(self, timeout: float) -> tuple[list[int], list[Event]]:
        """Signals received and events posted, waiting up to ``timeout`` seconds for the first."""
        if not self._posted:
            with contextlib.suppress(InterruptedError):
                select.select([self._read], [], [], timeout)
        signums: list[int] = []
        while True:
            try:
                data = os.read(self._read, 4096)
            except BlockingIOError:
                break
            signums.extend(byte for byte in data if byte)
            if len(data) < 4096:
                break
        events: list[Event] = []
        while self._posted:
            events.append(self._posted.popleft())
        return signums, events


# --- components ----------------------------------------------------------------------------------------------


class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Worker:
    """One thread for slow I/O: runs each job and posts the event it returns. A daemon thread, and never joined
    for long: a job hung in a Secrets Manager call must not hold up a shutdown."""

    name = "worker"

    def __init__(self, post: Callable[[Event], None]) -> None:
        self._post = post
        self._jobs: queue.Queue[Callable[[], Event] | None] = queue.Queue()
        self._thread = named_thread(self._run, "worker")

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], Event]) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=0.1)  # a job hung in a network call is left behind (a daemon thread)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._post(job())


class _Named:
    """Adapts an object with start()/stop() under a name (the denier, a relay, the metrics, Squid)."""

    def __init__(self, name: str, start: Callable[[], object], stop: Callable[[], object]) -> None:
        self.name = name
        self._start = start
        self._stop = stop

    def start(self) -> None:
        self._start()

    def stop(self) -> None:
        self._stop()


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (Squid inherits it: each tunnel holds two fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


# --- the supervisor ----------------------------------------------------------------------------------------


class Supervisor:
    def __init__(self, settings: Settings, stream: TextIO | None = None, source: Source | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.output = LogOutput(stream or sys.stdout, settings.log_buffer_lines)
        self.logger = Logger(self.output)
        self.paths = StatePaths(settings.state_dir)
        self.user = run_as_user()
        self.source = source or make_source(settings)
        self.clock = clock
        self.events = EventQueue()
        self.decisions = DecisionCounter()  # access-log decisions, for the metrics
        self.squid = SquidProcess(settings.squid_binary, self.paths.squid_conf, service_name(self.paths))
        self.config = loop.LoopConfig(poll_interval=self.source.poll_interval, workers=settings.workers,
                                      listeners=listeners(settings), drain_seconds=settings.drain_seconds)
        self.denier: Denier | None = None
        self.access_log: AccessLogListener | None = None
        self.identity: IdentityRefresher | None = None
        self.applier: ConfigApplier | None = None
        self.metrics: MetricsLoop | None = None
        self.worker = Worker(self._post_result)
        self.workers = WorkerWatch(settings.workers)  # Squid's worker processes (not the I/O worker thread)
        self.writes = WriteFailures(self._report_write)
        self._fatal_lines: dict[str, tuple[float, str]] = {}  # Squid kid (kid1) -> its last FATAL line
        self._tcp_logger_drops = strings.TcpLoggerDrops()  # read by the cache.log relay's thread only
        self._refusing = False  # EGRESS_LOG_FULL=refuse and the log gate's flag file is up
        self._components: list[Component] = []  # started ones, in start order

    # --- main ------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, loop until the state machine finishes, stop every component. Returns the exit code."""
        self.events.install_signals()
        self.output.start()
        try:
            code = self._prepare()
            if code is None:
                code = self._loop()
        finally:
            self._stop_components()
            self.events.close()
            # The last lines get a bounded time: a stalled stdout must not keep a stopping proxy alive.
            self.output.stop(timeout=LOG_FLUSH_SECONDS)
        return int(code)

    def _prepare(self) -> ExitCode | None:
        """The quick local steps before the loop: fd budget, state dir, refusal responder, worker."""
        soft, hard = raise_fd_limit()
        # Each spliced tunnel holds two fds in a Squid worker (client + server); every worker gets the limit.
        self.logger.event("info", "fd_budget", f"open-files limit {soft} (hard {hard}): about {soft // 2} "
                          f"concurrent tunnels per Squid worker", nofile_soft=soft, nofile_hard=hard,
                          tunnels_per_worker=soft // 2, workers=self.settings.workers)
        try:
            error_page = (self.settings.error_page.read_text(encoding="utf-8") if self.settings.error_page
                          else default_error_page())
        except OSError as exc:
            self.logger.event("error", "startup_failed",
                              f"cannot read EGRESS_ERROR_PAGE {self.settings.error_page}: {exc.strerror}; "
                              "point it at a readable HTML file or unset it for the built-in page")
            return ExitCode.BAD_CONFIG
        try:
            upstream_login = read_upstream_login(self.settings)
        except SettingsError as exc:
            self.logger.event("error", "startup_failed", str(exc))
            return ExitCode.BAD_CONFIG
        try:
            prepare_state_dir(self.paths, error_page=error_page, user=self.user)
            self.denier = Denier()  # bound now, so the rendered config knows its port
            self.access_log = AccessLogListener(  # bound now too, for the same reason
                access_sink(functools.partial(self.output.put_many, "access"), self.decisions.observe),
                self._access_log_writer, self._access_log_refused)
        except SquidError as exc:
            self.logger.event("error", "startup_failed", str(exc))
            return ExitCode.SQUID_FAILED
        except OSError as exc:
            self.logger.event("error", "startup_failed",
                              f"cannot prepare the state dir {self.paths.state}: {describe_os_error(exc)}; "
                              "make EGRESS_STATE_DIR a writable directory", exit_code=int(ExitCode.STARTUP_IO))
            return ExitCode.STARTUP_IO
        self.applier = ConfigApplier(self.settings, self.paths, user=self.user, denial_port=self.denier.port,
                                     access_log_port=self.access_log.port, access_log_token=self.access_log.token,
                                     upstream_login=upstream_login, on_parse_warning=self._parse_warning,
                                     writes=self.writes, status_extra=self._status_extra)
        self._start(self.worker)
        # The membership table and its on-demand lookup socket: idle (no AWS call) until a document names clients
        # by security group, ECS service or tag. Never part of the reload path: membership changes reach the
        # identity helpers through the table file, without a reconfigure.
        self.identity = IdentityRefresher(self.settings, self.paths, self.logger, self.user)
        self.applier.stats.identity = self.identity.stats
        self._start(self.identity)
        self._start(_Named("denier", self.denier.start, self.denier.stop))
        if self.settings.prometheus_port is not None and not self._start_prometheus(self.applier):
            return ExitCode.BAD_CONFIG
        # Started (as a thread) only once Squid serves; registered here so that it stops after the relays have
        # drained Squid's last lines, and its final flush counts them.
        self._start(_Named("metrics", lambda: None, self._stop_metrics))
        return None

    def _start_prometheus(self, applier: ConfigApplier) -> bool:
        """/metrics on the listen address, from the supervisor (never Squid's port). A port in use is a setting
        to fix, so it stops the start."""
        from .prometheus import PrometheusExporter  # only when enabled: with it off, the library is never loaded

        exporter = PrometheusExporter(self.settings, lambda: applier.stats, self.decisions, clock=time.time,
                                      runtime=self.runtime_figures)
        try:
            self._start(_Named("prometheus", exporter.start, exporter.stop))
        except OSError as exc:
            self.logger.event("error", "startup_failed", f"cannot serve Prometheus metrics on {exporter.address}:"
                              f"{exporter.port}: {exc.strerror}; choose a free EGRESS_PROMETHEUS_PORT")
            return False
        self.logger.event("info", "prometheus_started", f"Prometheus metrics at http://{exporter.address}:"
                          f"{exporter.port}/metrics", address=exporter.address, port=exporter.port)
        return True

    def _stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()

    def _start(self, component: Component) -> None:
        component.start()
        self._components.append(component)

    def _stop_components(self) -> None:
        """Reverse order of start. Squid is stopped first (it is the last started), then the relays drain
        what it wrote, then the metrics flush, the refusal responder closes and the worker is let go."""
        while self._components:
            component = self._components.pop()
            try:
                component.stop()
            except Exception as exc:  # one failing stop must not keep the others from stopping
                self.logger.event("error", "stop_failed", f"stopping {component.name} failed: "
                                  f"{type(exc).__name__}: {exc}")

    def _loop(self) -> ExitCode:
        state: loop.LoopState[Candidate]
        actions: list[Action]
        state, actions = loop.initial(self.config, self.clock())
        while True:
            for action in actions:
                follow_up = self._perform(action)
                if follow_up is not None:
                    self.events.post(follow_up)
            if state.exit_code is not None:
                return state.exit_code
            signums, events = self.events.wait(loop.next_wakeup(state, self.config, self.clock()))
            batch: list[Event] = [loop.SignalReceived(s) for s in signums if s != signal.SIGCHLD]
            batch += events
            code = self.squid.poll()
            if code is not None and not any(isinstance(e, loop.SquidExited) for e in batch):
                if not self._squid_exit_reported:
                    self._squid_exit_reported = True
                    batch.append(loop.SquidExited(code))
            batch.append(loop.Tick())
            if state.phase is loop.Phase.RUNNING:
                if (now := self.clock()) >= self._workers_watched_at + WORKER_WATCH_SECONDS:
                    self._workers_watched_at = now
                    self._watch_workers()
                self._gate_traffic_on_log()
            actions = []
            for event in batch:
                state, more = loop.step(state, event, self.clock(), self.config)
                actions += more

    _squid_exit_reported = False
    _workers_watched_at = float("-inf")
    # The last reload's write of the config files and the moment Squid was told (SIGHUP), for its reloaded line.
    _write_seconds = 0.0
    _reconfigured_at = 0.0

    # --- performing actions --------------------------------------------------------------------------------
    def _perform(self, action: Action) -> Event | None:
        assert self.applier is not None
        match action:
            case loop.Log(level, event, message, fields):
                self.logger.event(level, event, message, **dict(fields))
            case loop.PollSource(known_version):
                self.worker.submit(functools.partial(self._poll_source, known_version))
            case loop.BuildCandidate(snapshot):
                self.worker.submit(functools.partial(self._build, snapshot))
            case loop.StartSquid(candidate):
                return self._start_squid(candidate)
            case loop.Activate(candidate):
                return self._activate(candidate)
            case loop.SkipUnchanged(candidate):
                self._skip(candidate)
            case loop.Reject(version, error, bad_entries, retry):
                self._reject(version, error, bad_entries, retry=retry)
            case loop.ReloadDone(candidate, confirmed):
                self._reload_done(candidate, confirmed)
            case loop.SourceUnavailableNow(error, retry_in):
                self.logger.event("warning", "source_unavailable", f"{error}; still serving version "
                                  f"{self.applier.stats.version}", retry_in=retry_in,
                                  version=self.applier.stats.version)
            case loop.SourceBack():
                self.logger.event("info", "source_available", f"{self.source.description} is reachable again",
                                  version=self.applier.stats.version)
            case loop.ProbePort():
                return loop.PortProbed(self._port_accepts())
            case loop.Serving():
                self._serving()
            case loop.StopSquid():
                self.squid.terminate()
            case loop.KillSquid():
                self.squid.kill_leftovers()
            case loop.WriteStatus():
                self.applier.write_status()
            case loop.Finish():
                pass  # the loop returns; run() stops the components
        return None

    # --- in the worker thread ------------------------------------------------------------------------------
    def _post_result(self, event: Event) -> None:
        """A poll that found nothing new changes nothing now: it waits for the loop's next wake-up rather than
        causing one (with a file source, four a second). Every other result wakes the loop at once."""
        if isinstance(event, loop.SourcePolled) and event.version is None and event.error is None:
            self.events.post_quietly(event)
        else:
            self.events.post(event)

    def _poll_source(self, known_version: str | None) -> Event:
        """Cheap change check, then the value. Never raises."""
        jitter = random.uniform(loop.MIN_POLL_JITTER, loop.MAX_POLL_JITTER)  # so a fleet does not poll in step
        try:
            if known_version is not None and not self.source.changed(known_version):
                return loop.SourcePolled(jitter=jitter)
            snapshot = self.source.read()
        except SourceUnavailable as exc:
            return loop.SourcePolled(error=str(exc), jitter=jitter)
        except Exception as exc:  # a bug in a source must not end the worker
            return loop.SourcePolled(error=f"{type(exc).__name__}: {exc}", jitter=jitter)
        return loop.SourcePolled(version=snapshot.version, snapshot=snapshot, jitter=jitter)

    def _build(self, snapshot: Snapshot) -> Event:
        assert self.applier is not None
        try:
            candidate = self.applier.build(snapshot, self.source.description, started=time.monotonic())
        except (AllowlistError, SquidError) as exc:
            code = exit_code_of(exc) or ExitCode.BAD_CONFIG
            bad = (tuple(problem.path or problem.entry for problem in exc.problems[:20])
                   if isinstance(exc, AllowlistError) else ())
            return loop.CandidateBuilt(snapshot.version, error=str(exc), error_code=code, bad_entries=bad)
        except OSError as exc:
            self.writes.failed(exc)
            return loop.CandidateBuilt(snapshot.version, error=f"cannot write the candidate config: "
                                       f"{describe_os_error(exc)}", error_code=ExitCode.STARTUP_IO)
        except Exception as exc:  # a bug must not end the worker: every later reload would wait for it in silence
            return loop.CandidateBuilt(snapshot.version, error=f"building the config failed: {type(exc).__name__}: "
                                       f"{exc}", error_code=ExitCode.SQUID_FAILED)
        return loop.CandidateBuilt(snapshot.version, candidate=candidate, unchanged=candidate.unchanged)

    def _parse_warning(self, warning: str) -> None:
        self.logger.event("warning", "squid_parse_warning", warning)

    # --- on the loop thread --------------------------------------------------------------------------------
    def _start_squid(self, candidate: Candidate) -> Event | None:
        assert self.applier is not None
        _log_warnings(self.logger, candidate.document, self.settings)
        try:
            self.applier.activate(candidate)
        except OSError as exc:
            return loop.LocalFailure(f"cannot write the config to {self.paths.conf_dir}: {describe_os_error(exc)}; "
                                     "make EGRESS_STATE_DIR a writable directory with free space")
        if self.identity is not None:
            self.identity.set_document(candidate.document)
        if self.writes.current is not None:  # at startup, a status that health cannot read is fatal (exit 6)
            failure = self.writes.current
            return loop.LocalFailure(f"cannot write {failure['path']}: {failure['message']}; make EGRESS_STATE_DIR "
                                     "a writable directory with free space")
        assert self.access_log is not None
        self._start(_Named("relay-access", self.access_log.start, self.access_log.stop))
        self._start(LogRelay("cache", self._cache_log_lines, fifo=self.paths.cache_fifo,
                             coalesce=CACHE_LOG_COALESCE_SECONDS))
        output_read, output_write = os.pipe()
        self._start(LogRelay("squid-output", self._squid_output_lines, fd=output_read))
        try:
            self._start(_Named("squid", functools.partial(self.squid.start, output=output_write),
                               functools.partial(self.squid.stop, grace=5)))
        except SquidError as exc:
            self.logger.event("error", "startup_failed", str(exc))
            return loop.SquidExited(None)
        finally:
            os.close(output_write)  # Squid holds it now: the relay sees EOF when the last Squid process is gone
        return None

    def _serving(self) -> None:
        assert self.applier is not None
        stats = self.applier.stats
        document = self.applier.active_document
        by_policy = f" ({document.entries_text()})" if document else ""
        self.logger.event("info", "started", f"proxy listening on {self.settings.listen_address}:"
                          f"{self.settings.port} with {stats.entries} allowlist entries{by_policy}",
                          version=stats.version, entries=stats.entries, policies=self._policies(),
                          policy_entries=document.entries_by_policy() if document else {},
                          source=self.source.description, pid=self.squid.pid)
        if self.settings.metrics:  # its own thread; CloudWatch trouble never reaches this loop
            applier = self.applier
            self.metrics = MetricsLoop(self.settings, self.logger, lambda: applier.stats, self.decisions,
                                       runtime=self.runtime_figures)
            self.metrics.start()  # now: Squid's counters are zero, the first baseline

    def _policies(self) -> int:
        document = self.applier.active_document if self.applier else None
        return len(document.policies) if document else 0

    def _activate(self, candidate: Candidate) -> Event | None:
        assert self.applier is not None
        _log_warnings(self.logger, candidate.document, self.settings)
        writing = time.monotonic()
        try:
            self.applier.activate(candidate)
        except OSError as exc:  # Squid was not told: the config it runs (and its files) are still the previous
            self.writes.failed(exc)
            return loop.LocalFailure(f"cannot write the config to {self.paths.conf_dir}: {describe_os_error(exc)}")
        self.applier.stats.rejected_version = None
        if self.identity is not None:
            self.identity.set_document(candidate.document)
        self._reconfigured_at = time.monotonic()
        self._write_seconds = self._reconfigured_at - writing
        self.squid.reconfigure()
        return None

    def _skip(self, candidate: Candidate) -> None:
        assert self.applier is not None
        _log_warnings(self.logger, candidate.document, self.settings)
        stats = self.applier.stats
        stats.rejected_version = None
        stats.version = candidate.snapshot.version
        stats.skipped += 1
        self.applier.write_status()
        self.logger.event("info", "reload_skipped", "allowlist source changed but the rendered config did "
                          "not; Squid was not reconfigured", version=candidate.snapshot.version,
                          entries=candidate.document.entry_count)

    def _reject(self, version: str, error: str, bad_entries: tuple[str, ...], *, retry: bool = False) -> None:
        """``retry``: the value is fine but its files could not be written (a full disk): reason write_failed,
        and the loop tries the same version again."""
        assert self.applier is not None
        stats = self.applier.stats
        stats.failure += 1
        stats.last_error = error
        stats.rejected_version = version
        self.applier.write_status()
        if retry:
            failure = self.writes.current or {}
            self.logger.event("error", "reload_rejected", f"cannot apply allowlist version {version}: {error}; "
                              f"version {stats.version} keeps serving; retrying every "
                              f"{max(self.config.poll_interval, self.config.local_retry_every):g} s",
                              version=version, active_version=stats.version, reason="write_failed",
                              path=failure.get("path"), errno=failure.get("errno"), source=self.source.description)
            return
        self.logger.event("error", "reload_rejected", f"rejected allowlist version {version}; "
                          f"version {stats.version} keeps serving: {error}", version=version,
                          active_version=stats.version, reason="invalid", bad_entries=list(bad_entries),
                          source=self.source.description)

    def _reload_done(self, candidate: Candidate, confirmed: bool) -> None:
        assert self.applier is not None
        self.applier.stats.success += 1
        self.applier.write_status()
        now = time.monotonic()
        elapsed_ms = round((now - candidate.started) * 1000, 1)
        phases = {name: round(seconds * 1000, 1) for name, seconds in candidate.phases}
        phases["write"] = round(self._write_seconds * 1000, 1)
        phases["workers"] = round((now - self._reconfigured_at) * 1000, 1)
        version = candidate.snapshot.version
        for name, old, new in candidate.mode_changes:  # a rollout's step: one line per policy that switched
            self.logger.event("info", "policy_mode_changed", f"policy {name}: mode {old} -> {new} "
                              f"(allowlist version {version})", policy=name, old_mode=old, new_mode=new,
                              version=version)
        self.logger.event(
            "info" if confirmed else "warning",
            "reloaded",
            f"allowlist version {version} active: +{candidate.added} -{candidate.removed} entries "
            f"({candidate.document.entry_count} total) in {elapsed_ms} ms"
            + "".join(f"; policy {name}: mode {old} -> {new}" for name, old, new in candidate.mode_changes)
            + ("" if confirmed else f"; Squid did not confirm within {self.config.confirm_timeout:g} s"),
            version=version, added=candidate.added, removed=candidate.removed, entries=candidate.document.entry_count,
            policy_entries=candidate.document.entries_by_policy(),
            duration_ms=elapsed_ms, phases_ms=phases, confirmed=confirmed,
        )

    def _port_accepts(self) -> bool:
        # A TCP connection that sends nothing is not logged by Squid (see access_log.is_noise).
        try:
            with socket.create_connection((manager_host(self.settings), self.settings.port), timeout=0.2):
                return True
        except OSError:
            return False

    def runtime_figures(self) -> RuntimeFigures:
        """For the metrics threads: plain reads of counters the relays and the loop keep."""
        return RuntimeFigures(self.workers.up, self.workers.configured, self.workers.deaths, self.output.dropped())

    def _report_write(self, event: str, failure: dict[str, Any]) -> None:
        if event == "write_failed":
            self.logger.event("error", "write_failed", f"cannot write {failure['path']}: {failure['message']} "
                              f"({failure['errno']}); the proxy keeps serving its current config",
                              path=failure["path"], errno=failure["errno"], error=failure["message"])
        else:
            self.logger.event("info", "write_recovered", f"{failure['path']} can be written again",
                              path=failure["path"], failed_since=failure["since"])

    def _status_extra(self) -> dict[str, Any]:
        return {"workers": self.workers.status(), "log_sink": self._log_sink_status()}

    def _log_sink_status(self) -> dict[str, Any]:
        dropped = self.output.dropped()
        return {"blocked": self.output.blocked(), "buffered": self.output.buffered(),
                "dropped_total": sum(dropped.values()), "dropped_by_type": dropped}

    def _gate_traffic_on_log(self) -> None:
        """EGRESS_LOG_FULL=refuse ("no log, no traffic"): while stdout takes no lines, a flag file tells Squid's
        log_gate helper to refuse new requests (reason log_unavailable). Lifted once lines flow again and the
        buffer is back under half full, so that the lines of the requests let through then still fit."""
        if self.settings.log_full != "refuse" or self.applier is None:
            return
        blocked = self.output.blocked() or (self._refusing and self.output.buffered() >= self.output.capacity // 2)
        if blocked == self._refusing:
            return
        flag = self.paths.log_blocked_flag
        try:
            if blocked:
                os.close(os.open(flag, os.O_WRONLY | os.O_CREAT, 0o644))
            else:
                flag.unlink(missing_ok=True)
        except OSError as exc:  # the next tick tries again
            exc.filename = exc.filename or str(flag)
            self.writes.failed(exc)
            return
        self._refusing = blocked
        if blocked:
            self.logger.event("warning", "log_refusing", "stdout is not taking log lines: refusing new requests "
                              "(reason log_unavailable) until it does (EGRESS_LOG_FULL=refuse)",
                              buffered=self.output.buffered())
        else:
            self.logger.event("info", "log_flowing", "stdout takes log lines again: requests are served again")

    def _watch_workers(self) -> None:
        """Squid's master revives dead workers and reports it only to syslog: notice it here (a /proc read of a
        few entries per tick) and log, count and show it to health."""
        assert self.applier is not None
        if self.squid.pid is None or (current := read_workers(self.squid.pid)) is None:
            return  # the master is gone: the loop hears of that as SquidExited
        now = time.time()
        changes = self.workers.update(current, now)
        for change in changes:
            if change.kind == "died":
                fatal = self._fatal_lines.pop(f"kid{change.worker.rsplit('-', 1)[-1]}", None)
                cause = fatal[1] if fatal is not None and now - fatal[0] < 30 else None
                self.logger.event(
                    "error", "worker_died",
                    f"Squid worker {change.worker} (pid {change.pid}) died: "
                    + (cause or "it logged no reason, so it was killed by a signal (SIGKILL, e.g. the OOM killer); "
                       "Squid reports the exit status only to syslog")
                    + f"; {self.workers.up} of {self.workers.configured} workers up",
                    worker=change.worker, pid=change.pid, cause=cause, workers_up=self.workers.up,
                    workers_configured=self.workers.configured, deaths=self.workers.deaths)
            else:
                self.logger.event("info", "worker_started", f"Squid revived worker {change.worker} (pid {change.pid})"
                                  f"; {self.workers.up} of {self.workers.configured} workers up",
                                  worker=change.worker, pid=change.pid, workers_up=self.workers.up,
                                  workers_configured=self.workers.configured)
        recovered = self.workers.recovered(now)
        if recovered:
            self.logger.event("info", "workers_recovered", f"all {self.workers.configured} Squid workers have been up "
                              "for a minute: no longer degraded", workers_up=self.workers.up)
        if changes or recovered:
            self.applier.write_status()

    # --- log relays (their own threads) ---------------------------------------------------------------------
    def _access_log_writer(self, peer: tuple[str, int], local: tuple[str, int]) -> str | None:
        """Which Squid worker opened this access-log connection (None: not one of ours, refuse it). The coordinator
        counts as one: it opens the access log too (at start and at each reconfigure) though it never writes a line,
        and refusing it would raise a false forgery warning at every reload."""
        master = self.squid.pid
        workers = read_workers(master, coordinator=True) if master is not None else None
        return connecting_worker(workers, peer, local) if workers else None

    def _access_log_refused(self, peer: str, forged_lines: int) -> None:
        if forged_lines:
            self.logger.event("warning", "access_log_connection_refused",
                              f"a connection to the access-log listener from {peer} wrote {forged_lines} line(s) "
                              "without the access log's token: dropped, connection closed (only Squid writes access "
                              "lines)", peer=peer, forged_lines=forged_lines)
            return
        self.logger.event("warning", "access_log_connection_refused",
                          f"a connection to the access-log listener from {peer} did not come from a Squid worker: "
                          "closed unread (only Squid writes access lines)", peer=peer, forged_lines=0)

    def _cache_log_lines(self, lines: list[str]) -> None:
        out: list[str] = []
        for line in lines:
            text = line.rstrip("\n")
            if self.denier is not None and strings.is_peer_connect_failure(text, "127.0.0.1", self.denier.port):
                # Squid's note for every CONNECT refusal relayed by the denier (it counts a peer's 403 as a failed
                # connection; see the cache_peer line in squid.conf.j2). The access line says what happened.
                continue
            if (drops := self._tcp_logger_drops.feed(text)) is not None:
                kind, value = drops
                if kind == "counted":
                    self.output.count_dropped("access", int(value))  # a worker's own log buffer was full
                else:
                    self.logger.event(
                        "warning", "access_log_drops_uncounted",
                        f"Squid {value}'s access-log buffer was dropping lines when a reload or stop closed its "
                        "logger (or the worker died): Squid does not say how many it lost, so log.lines_dropped "
                        "misses them; its buffer filled because the supervisor read too slowly (CPU starved or "
                        "stopped)", kid=value)
            elif strings.is_accepting(text):
                self.events.post(loop.WorkerAccepting())
            elif strings.is_fatal(text) and (kid := strings.kid_of(text)) is not None:
                self._fatal_lines[kid] = (time.time(), strings.strip_timestamp(text))
            out.append(json.dumps({"type": "cache_log", "message": text}, separators=(",", ":")))
        self.output.put_many("cache_log", out)

    def _squid_output_lines(self, lines: list[str]) -> None:
        # Squid's own stdout/stderr (e.g. its startup "WARNING: BCP 177 violation"): JSON like everything else.
        self.output.put_many("cache_log", [json.dumps({"type": "cache_log", "stream": "stderr",
                                                       "message": line.rstrip("\n")}, separators=(",", ":"))
                                           for line in lines])
