"""The supervisor's decisions as one pure function: ``step(state, event, now) -> (state, actions)``.

The supervisor (supervisor.py) owns the I/O: it turns signals, worker results, Squid's log and Squid's exit
into events, calls ``step`` and performs the actions it returns. Everything that decides (startup order,
backoff, dedupe of source versions, the reload confirmation and its timeout, SIGHUP, the drain and its
deadline, exit codes) is here, so unit tests drive it with a fake clock and no Squid.

Phases: STARTING (first source read and build, in a worker) -> LAUNCHING (Squid started, waiting until it
accepts) -> RUNNING -> DRAINING (SIGTERM/SIGINT: Squid drains) -> DONE (``exit_code`` set).

The source's values and the built candidates pass through untouched, so their types are parameters: ``S`` (the
supervisor's ``sources.Snapshot``) and ``C`` (its ``config_pipeline.Candidate``). The pending reload is stored
here only, candidate included, and handed back in ``ReloadDone``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace
from enum import Enum
from typing import Generic, TypeVar

from .errors import ExitCode

S = TypeVar("S")  # a value read from the allowlist source
C = TypeVar("C")  # a candidate config built from one

LogValue = str | int | float | bool | None  # a field of a JSON log line


class Phase(Enum):
    STARTING = "starting"
    LAUNCHING = "launching"
    RUNNING = "running"
    DRAINING = "draining"
    DONE = "done"


@dataclass(frozen=True)
class LoopConfig:
    poll_interval: float  # the source's: 1 s for a file, EGRESS_RELOAD_INTERVAL for a secret
    workers: int  # Squid workers; each confirms a reconfigure in cache.log
    drain_seconds: float
    listeners: int = 1  # listening ports per worker: each logs one "Accepting" line per port (squid_conf.listeners)
    confirm_timeout: float = 30.0  # how long Squid may take to confirm a reconfigure
    launch_timeout: float = 60.0  # how long Squid may take to accept its first connection
    kill_margin: float = 10.0  # SIGKILL this long after the drain should have ended
    max_backoff: float = 300.0
    probe_every: float = 0.1  # port probe cadence while launching or confirming
    status_every: float = 10.0  # status.json refresh (config_age_seconds)
    local_retry_every: float = 10.0  # a version whose files could not be written (disk full) is tried again


# --- events (what happened) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Time passed (the loop wakes at least once a second and at every deadline)."""


@dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True)
class SourcePolled(Generic[S]):
    """A worker's answer to PollSource: ``version`` of a new value (``snapshot`` carries it), or unchanged
    (``version`` None, no error), or ``error``. ``jitter`` (around 1.0) spreads a fleet's polls."""

    version: str | None = None
    snapshot: S | None = None
    error: str | None = None
    jitter: float = 1.0


@dataclass(frozen=True)
class CandidateBuilt(Generic[C]):
    """A worker's answer to BuildCandidate: ``candidate`` (validated, rendered and parse-checked), or ``error``
    (with the exit code it would mean at startup, and the bad entries' paths when the value was invalid)."""

    version: str
    candidate: C | None = None
    unchanged: bool = False  # renders to exactly the active config
    error: str | None = None
    error_code: ExitCode = ExitCode.BAD_CONFIG
    bad_entries: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerAccepting:
    """A Squid worker logged "Accepting ... connections at" (it has (re)loaded its config)."""


@dataclass(frozen=True)
class PortProbed:
    accepts: bool


@dataclass(frozen=True)
class SquidExited:
    code: int | None


@dataclass(frozen=True)
class LocalFailure:
    """Writing the active config failed (an OSError: disk full, state dir gone): at startup that is exit 6;
    while running, the reload is refused, the previous config keeps serving, and the same version is tried
    again every ``local_retry_every`` seconds until the files can be written."""

    error: str


Event = (Tick | SignalReceived | SourcePolled[S] | CandidateBuilt[C] | WorkerAccepting | PortProbed | SquidExited
         | LocalFailure)

# --- actions (what to do) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Log:
    level: str
    event: str
    message: str
    fields: tuple[tuple[str, LogValue], ...] = ()


@dataclass(frozen=True)
class PollSource:
    known_version: str | None


@dataclass(frozen=True)
class BuildCandidate(Generic[S]):
    snapshot: S


@dataclass(frozen=True)
class StartSquid(Generic[C]):
    candidate: C  # activate it first


@dataclass(frozen=True)
class Activate(Generic[C]):
    candidate: C  # write the files, then reconfigure


@dataclass(frozen=True)
class SkipUnchanged(Generic[C]):
    candidate: C


@dataclass(frozen=True)
class Reject:
    version: str
    error: str
    bad_entries: tuple[str, ...] = ()  # the paths (or entries) of an invalid value's problems
    retry: bool = False  # a local write failed (not the value): the same version will be tried again


@dataclass(frozen=True)
class ReloadDone(Generic[C]):
    candidate: C
    confirmed: bool


@dataclass(frozen=True)
class SourceUnavailableNow:
    error: str
    retry_in: float


@dataclass(frozen=True)
class SourceBack:
    pass


@dataclass(frozen=True)
class ProbePort:
    pass


@dataclass(frozen=True)
class Serving:
    """Squid accepts connections: log ``started``, start the metrics."""


@dataclass(frozen=True)
class StopSquid:
    pass


@dataclass(frozen=True)
class KillSquid:
    pass


@dataclass(frozen=True)
class WriteStatus:
    pass


@dataclass(frozen=True)
class Finish:
    code: ExitCode


Action = (Log | PollSource | BuildCandidate[S] | StartSquid[C] | Activate[C] | SkipUnchanged[C] | Reject
          | ReloadDone[C] | SourceUnavailableNow | SourceBack | ProbePort | Serving | StopSquid | KillSquid
          | WriteStatus | Finish)

# --- state ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending(Generic[C]):
    """A reconfigure sent to Squid and not yet confirmed."""

    version: str
    candidate: C
    deadline: float
    accepting: int = 0  # workers that logged "Accepting" since the reconfigure


@dataclass(frozen=True)
class LoopState(Generic[C]):
    phase: Phase = Phase.STARTING
    busy: bool = False  # a PollSource or BuildCandidate is out in the worker
    next_poll: float = 0.0
    poll_now: bool = False  # SIGHUP arrived while busy or confirming: poll as soon as free
    hup_poll: bool = False  # the poll out in the worker answers a SIGHUP: say so if it finds nothing new
    backoff: float = 0.0
    seen_version: str | None = None  # last version applied OR rejected: neither is processed twice
    pending: Pending[C] | None = None
    launch_accepting: int = 0  # launching: workers that logged "Accepting" so far
    probe_at: float | None = None  # next port probe (launching, or confirming a reload)
    deadline: float | None = None  # launching: give up; draining: SIGKILL Squid
    status_at: float = 0.0
    retry_version: str | None = None  # its files could not be written (disk full): build it again
    exit_code: ExitCode | None = None
    poll_issued: float | None = None  # running: when the PollSource now out in the worker was issued


Step = tuple[LoopState[C], list[Action[S, C]]]


def initial(config: LoopConfig, now: float) -> Step[C, S]:
    """The first step: read the source (in the worker)."""
    return LoopState(phase=Phase.STARTING, busy=True, next_poll=now), [PollSource(known_version=None)]


def next_wakeup(state: LoopState[C], config: LoopConfig, now: float) -> float:
    """Seconds until the loop must tick again (at most 1 s, so the clock never drifts far). A poll's "unchanged"
    answer does not wake the loop (the supervisor queues it quietly): the loop takes it when it wakes to poll
    again, at the latest time the next poll can be due, so each poll of a quiet source costs one wake-up, not two.
    Once that time has passed without an answer, the tick and the other events are left."""
    times = [now + 1.0]
    if state.phase is Phase.RUNNING:
        times.append(state.status_at)
        if not state.busy and state.pending is None:
            times.append(state.next_poll)
        elif state.poll_issued is not None and (answer_due := _latest_next_poll(state.poll_issued, config)) > now:
            times.append(answer_due)
    if state.probe_at is not None:
        times.append(state.probe_at)
    if state.deadline is not None:
        times.append(state.deadline)
    if state.pending is not None:
        times.append(state.pending.deadline)
    return max(0.0, min(times) - now)


def _fields(**values: LogValue) -> tuple[tuple[str, LogValue], ...]:
    return tuple(values.items())


def _finish(state: LoopState[C], code: ExitCode) -> tuple[LoopState[C], list[Finish]]:
    return replace(state, phase=Phase.DONE, exit_code=code, probe_at=None, deadline=None), [Finish(code)]


def step(state: LoopState[C], event: Event[S, C], now: float, config: LoopConfig) -> Step[C, S]:
    """One decision. Pure: the same state, event and time always give the same result."""
    if state.phase is Phase.DONE:
        return state, []
    if isinstance(event, SignalReceived):
        return _on_signal(state, event.signum, now, config)
    if isinstance(event, SquidExited):
        return _on_squid_exit(state, event.code)
    if isinstance(event, LocalFailure):
        return _on_local_failure(state, event.error, now, config)
    if state.phase is Phase.STARTING:
        return _starting(state, event, now, config)
    if state.phase is Phase.LAUNCHING:
        return _launching(state, event, now, config)
    if state.phase is Phase.DRAINING:
        if isinstance(event, Tick) and state.deadline is not None and now >= state.deadline:
            return replace(state, deadline=None), [
                Log("warning", "drain_timeout", "Squid did not stop within the drain time; killing it"),
                KillSquid(),
            ]
        return state, []  # worker results and reload confirmations no longer matter
    return _running(state, event, now, config)


def _on_signal(state: LoopState[C], signum: int, now: float, config: LoopConfig) -> Step[C, S]:
    if signum in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(signum).name
        if state.phase is Phase.DRAINING:
            return state, [Log("info", "stopping", f"{name} received again: already draining")]
        if state.phase is Phase.STARTING:  # Squid never started: nothing to drain
            state, actions = _finish(state, ExitCode.OK)
            return state, [Log("info", "stopped", f"{name} received before Squid started; exiting"), *actions]
        state = replace(state, phase=Phase.DRAINING, pending=None, probe_at=None,
                        deadline=now + config.drain_seconds + config.kill_margin)
        return state, [
            Log("info", "stopping", f"{name} received: draining for up to {config.drain_seconds:g} s",
                _fields(signal=name, drain_seconds=config.drain_seconds)),
            StopSquid(),
        ]
    if signum == signal.SIGHUP:
        if state.phase is not Phase.RUNNING:
            return state, [Log("info", "hup_ignored", f"SIGHUP received while {state.phase.value}; ignored")]
        log = Log("info", "hup", "SIGHUP received: polling the allowlist source now")
        if state.busy or state.pending is not None:
            return replace(state, poll_now=True), [log]
        return (replace(state, busy=True, poll_now=False, hup_poll=True, poll_issued=now),
                [log, PollSource(state.seen_version)])
    return state, []


def _on_squid_exit(state: LoopState[C], code: int | None) -> Step[C, S]:
    if state.phase is Phase.DRAINING:
        state, actions = _finish(state, ExitCode.OK)
        return state, [Log("info", "stopped", f"Squid stopped with code {code}", _fields(exit_code=code)), *actions]
    if state.phase is Phase.LAUNCHING:
        state, actions = _finish(state, ExitCode.SQUID_FAILED)
        return state, [Log("error", "startup_failed", f"Squid exited with code {code} during startup "
                           "(see the cache_log lines above)", _fields(exit_code=code)), *actions]
    state, actions = _finish(state, ExitCode.SQUID_DIED)
    return state, [Log("error", "squid_died", f"Squid exited unexpectedly with code {code}",
                       _fields(exit_code=code)), *actions]


def _on_local_failure(state: LoopState[C], error: str, now: float, config: LoopConfig) -> Step[C, S]:
    """Exit 6 at startup only. While running, nothing local is worth an outage: Squid keeps its config."""
    if state.phase in (Phase.STARTING, Phase.LAUNCHING):
        state, actions = _finish(state, ExitCode.STARTUP_IO)
        return state, [Log("error", "startup_failed", error, _fields(exit_code=int(ExitCode.STARTUP_IO))),
                       KillSquid(), *actions]
    if state.phase is Phase.RUNNING and state.pending is not None:
        version = state.pending.version
        state = _retry_later(replace(state, pending=None, probe_at=None), version, now, config)
        return state, [Reject(version, error, retry=True)]
    return state, []


def _retry_later(state: LoopState[C], version: str, now: float, config: LoopConfig) -> LoopState[C]:
    """The files of ``version`` could not be written: poll again (reading the whole value) and rebuild it, at
    the local retry cadence, until they can."""
    return replace(state, retry_version=version,
                   next_poll=now + max(config.poll_interval, config.local_retry_every))


def _starting(state: LoopState[C], event: Event[S, C], now: float, config: LoopConfig) -> Step[C, S]:
    if isinstance(event, SourcePolled):
        if event.error is not None or event.version is None or event.snapshot is None:
            state, actions = _finish(state, ExitCode.NO_SOURCE)
            return state, [Log("error", "startup_failed", f"no allowlist source reachable at startup: "
                               f"{event.error or 'no value'}"), *actions]
        return replace(state, seen_version=event.version), [BuildCandidate(event.snapshot)]
    if isinstance(event, CandidateBuilt):
        if event.error is not None or event.candidate is None:
            state, actions = _finish(state, event.error_code)
            return state, [Log("error", "startup_failed", event.error or "no candidate"), *actions]
        # No probe before the last worker's "Accepting" line asks for one: a probe time due while they were still
        # starting made the loop wake at once, again and again, spinning a core until then.
        state = replace(state, phase=Phase.LAUNCHING, busy=False, probe_at=None,
                        deadline=now + config.launch_timeout)
        return state, [StartSquid(event.candidate)]
    return state, []


def _launching(state: LoopState[C], event: Event[S, C], now: float, config: LoopConfig) -> Step[C, S]:
    # Serving means every worker listens: a reconfigure before that (a SIGHUP, a quick edit) would catch a worker
    # still opening its socket, and Squid would kill and restart it ("FATAL: Unable to open HTTP Socket").
    if isinstance(event, WorkerAccepting):
        state = replace(state, launch_accepting=state.launch_accepting + 1)
        if state.launch_accepting == config.workers * config.listeners:
            return replace(state, probe_at=None), [ProbePort()]
        return state, []
    if isinstance(event, PortProbed):
        if event.accepts:
            state = replace(state, phase=Phase.RUNNING, probe_at=None, deadline=None,
                            next_poll=now + config.poll_interval, status_at=now + config.status_every)
            return state, [Serving()]
        return replace(state, probe_at=now + config.probe_every), []
    if isinstance(event, Tick):
        if state.deadline is not None and now >= state.deadline:
            state, actions = _finish(state, ExitCode.SQUID_FAILED)
            return state, [Log("error", "startup_failed", f"Squid did not accept connections within "
                               f"{config.launch_timeout:g} s"), KillSquid(), *actions]
        if (state.probe_at is not None and now >= state.probe_at
                and state.launch_accepting >= config.workers * config.listeners):
            return replace(state, probe_at=None), [ProbePort()]
    return state, []


# The supervisor's jitter of the poll interval is drawn from [MIN_POLL_JITTER, MAX_POLL_JITTER].
MIN_POLL_JITTER, MAX_POLL_JITTER = 0.9, 1.1


def _latest_next_poll(issued: float, config: LoopConfig) -> float:
    return issued + max(0.2, config.poll_interval * MAX_POLL_JITTER)


def _schedule_poll(state: LoopState[C], now: float, config: LoopConfig, jitter: float,
                   start: float | None = None) -> LoopState[C]:
    """The next poll: at once after a SIGHUP that came while busy; else an interval (jittered, plus any backoff)
    after ``start`` (default: now)."""
    start = now if start is None else start
    next_poll = now if state.poll_now else start + max(0.2, config.poll_interval * jitter) + state.backoff
    return replace(state, busy=False, next_poll=next_poll)


def _interval_start(issued: float | None, now: float, config: LoopConfig) -> float:
    """Where the interval to the next poll starts after an unchanged answer: at the poll's issue, when the answer
    was taken by the wake-up meant for it (see next_wakeup) or sooner, so the cadence stays one poll per interval;
    at the answer, when it came later than that (a slow Secrets Manager call keeps a full interval's rest)."""
    if issued is not None and now <= _latest_next_poll(issued, config) + 1.0:
        return issued
    return now


def _running(state: LoopState[C], event: Event[S, C], now: float, config: LoopConfig) -> Step[C, S]:
    actions: list[Action[S, C]] = []
    if isinstance(event, SourcePolled):
        answers_hup, issued, state = state.hup_poll, state.poll_issued, replace(state, hup_poll=False, poll_issued=None)
        if event.error is not None:
            backoff = min(config.max_backoff, max(1.0, state.backoff * 2))
            state = _schedule_poll(replace(state, backoff=backoff), now, config, event.jitter)
            return state, [SourceUnavailableNow(event.error, retry_in=round(state.next_poll - now, 1))]
        if state.backoff:
            actions.append(SourceBack())
            state = replace(state, backoff=0.0)
        retry = state.retry_version is not None and event.version == state.retry_version
        state = replace(state, retry_version=None)
        if event.version is None or event.snapshot is None or (event.version == state.seen_version and not retry):
            if answers_hup:  # the operator asked; every other poll that finds nothing stays quiet
                actions.append(Log("info", "source_unchanged", f"SIGHUP: the source has not moved from version "
                                   f"{state.seen_version}; nothing to apply", _fields(version=state.seen_version)))
            return _schedule_poll(state, now, config, event.jitter, _interval_start(issued, now, config)), actions
        return replace(state, seen_version=event.version), [*actions, BuildCandidate(event.snapshot)]
    if isinstance(event, CandidateBuilt):
        state = _schedule_poll(state, now, config, 1.0)
        if event.error is not None and event.error_code is ExitCode.STARTUP_IO:
            state = _retry_later(state, event.version, now, config)
            return state, [Reject(event.version, event.error, retry=True)]
        if event.error is not None or event.candidate is None:
            return state, [Reject(event.version, event.error or "no candidate", event.bad_entries)]
        if event.unchanged:
            return state, [SkipUnchanged(event.candidate)]
        pending = Pending(version=event.version, candidate=event.candidate, deadline=now + config.confirm_timeout)
        return replace(state, pending=pending), [Activate(event.candidate)]
    if isinstance(event, WorkerAccepting):
        if state.pending is None:
            return state, []
        pending = replace(state.pending, accepting=state.pending.accepting + 1)
        if pending.accepting >= config.workers * config.listeners:
            # A worker logs "Accepting" just before it listens again: the port must accept too.
            return replace(state, pending=pending, probe_at=None), [ProbePort()]
        return replace(state, pending=pending), []
    if isinstance(event, PortProbed):
        if state.pending is None:
            return state, []
        if event.accepts:
            return replace(state, pending=None, probe_at=None), [ReloadDone(state.pending.candidate, confirmed=True)]
        return replace(state, probe_at=now + config.probe_every), []
    # Tick
    if state.pending is not None:
        if now >= state.pending.deadline:
            return replace(state, pending=None, probe_at=None), [ReloadDone(state.pending.candidate, confirmed=False)]
        if state.probe_at is not None and now >= state.probe_at:
            return replace(state, probe_at=None), [ProbePort()]
        return state, []
    if now >= state.status_at:
        state = replace(state, status_at=now + config.status_every)
        actions.append(WriteStatus())
    if not state.busy and (state.poll_now or now >= state.next_poll):
        state = replace(state, busy=True, poll_now=False, hup_poll=state.poll_now, poll_issued=now)
        # A version to retry is read whole: the cheap change check would say "unchanged".
        actions.append(PollSource(None if state.retry_version else state.seen_version))
    return state, actions
