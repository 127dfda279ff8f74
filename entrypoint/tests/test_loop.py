"""The supervisor's decisions (loop.step), driven with a fake clock: startup, backoff, dedupe, SIGHUP, the
reload confirmation and its timeout, the drain and its deadline, and the exit codes."""

from __future__ import annotations

import signal

import pytest

from egress_proxy import loop
from egress_proxy.errors import ExitCode

CONFIG = loop.LoopConfig(poll_interval=30.0, workers=2, drain_seconds=5.0)


class Driver:
    """Feeds events at fake times and keeps the actions."""

    def __init__(self, config: loop.LoopConfig = CONFIG) -> None:
        self.config = config
        self.now = 1000.0
        self.state, self.actions = loop.initial(config, self.now)

    def feed(self, event: loop.Event, at: float | None = None) -> list[loop.Action]:
        if at is not None:
            self.now = at
        self.state, actions = loop.step(self.state, event, self.now, self.config)
        self.actions = actions
        return actions

    def advance(self, seconds: float) -> list[loop.Action]:
        return self.feed(loop.Tick(), at=self.now + seconds)

    def running(self, version: str = "v1") -> Driver:
        self.feed(loop.SourcePolled(version=version, snapshot="snap"))
        self.feed(loop.CandidateBuilt(version, candidate="cand"))
        for _ in range(self.config.workers):
            self.feed(loop.WorkerAccepting())
        self.feed(loop.PortProbed(True), at=self.now + 0.5)
        assert self.state.phase is loop.Phase.RUNNING
        return self


def kinds(actions: list[loop.Action]) -> list[str]:
    return [type(action).__name__ for action in actions]


def logged(actions: list[loop.Action]) -> list[str]:
    return [action.event for action in actions if isinstance(action, loop.Log)]


# --- startup -------------------------------------------------------------------------------------------------


def test_with_several_listening_ports_every_port_of_every_worker_must_accept() -> None:
    # Transparent mode: each worker logs one "Accepting" line per port (proxy, intercept HTTP, intercept TLS).
    driver = Driver(loop.LoopConfig(poll_interval=30.0, workers=2, listeners=3, drain_seconds=5.0))
    driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))
    driver.feed(loop.CandidateBuilt("v1", candidate="cand"))
    for _ in range(5):
        assert kinds(driver.feed(loop.WorkerAccepting())) == []
    assert kinds(driver.feed(loop.WorkerAccepting())) == ["ProbePort"]
    assert kinds(driver.feed(loop.PortProbed(True))) == ["Serving"]
    # A reload is confirmed by the same count.
    driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"), at=driver.now + 31)
    assert kinds(driver.feed(loop.CandidateBuilt("v2", candidate="cand2"))) == ["Activate"]
    for _ in range(5):
        assert kinds(driver.feed(loop.WorkerAccepting())) == []
    assert kinds(driver.feed(loop.WorkerAccepting())) == ["ProbePort"]


def test_startup_reads_builds_starts_and_waits_for_the_port() -> None:
    driver = Driver()
    assert kinds(driver.actions) == ["PollSource"]
    assert kinds(driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))) == ["BuildCandidate"]
    assert kinds(driver.feed(loop.CandidateBuilt("v1", candidate="cand"))) == ["StartSquid"]
    assert driver.state.phase is loop.Phase.LAUNCHING
    # Not serving until every worker has logged "Accepting": a reconfigure before that restarts a worker.
    assert kinds(driver.advance(0.1)) == []
    assert kinds(driver.feed(loop.WorkerAccepting())) == []
    assert kinds(driver.feed(loop.WorkerAccepting())) == ["ProbePort"]
    assert kinds(driver.feed(loop.PortProbed(False))) == []
    assert kinds(driver.advance(0.1)) == ["ProbePort"]
    assert kinds(driver.feed(loop.PortProbed(True))) == ["Serving"]
    assert driver.state.phase is loop.Phase.RUNNING


@pytest.mark.parametrize(
    ("event", "code"),
    [
        (loop.SourcePolled(error="secret not found"), ExitCode.NO_SOURCE),
        (loop.SourcePolled(version=None), ExitCode.NO_SOURCE),
    ],
)
def test_no_source_at_startup_exits_4(event: loop.Event, code: ExitCode) -> None:
    driver = Driver()
    actions = driver.feed(event)
    assert driver.state.exit_code is code and kinds(actions)[-1] == "Finish"
    assert logged(actions) == ["startup_failed"]


@pytest.mark.parametrize("code", [ExitCode.BAD_CONFIG, ExitCode.SQUID_FAILED])
def test_rejected_candidate_at_startup_exits_with_its_code(code: ExitCode) -> None:
    driver = Driver()
    driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))
    driver.feed(loop.CandidateBuilt("v1", error="bad entry", error_code=code))
    assert driver.state.exit_code is code


def test_launching_sleeps_until_the_workers_log_accepting() -> None:
    # Until every worker has logged "Accepting" there is nothing to probe: the loop must not wake at once (it spun
    # a core during each start), only for the launch deadline, its 1 s tick, or the events the relays post.
    driver = Driver()
    driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))
    driver.feed(loop.CandidateBuilt("v1", candidate="cand"))
    for _ in range(3):
        assert kinds(driver.advance(0.5)) == []
        assert loop.next_wakeup(driver.state, CONFIG, driver.now) == pytest.approx(1.0)
    driver.feed(loop.WorkerAccepting())
    assert loop.next_wakeup(driver.state, CONFIG, driver.now) == pytest.approx(1.0)
    assert kinds(driver.feed(loop.WorkerAccepting())) == ["ProbePort"]
    # A refused probe is retried at the probe cadence.
    assert kinds(driver.feed(loop.PortProbed(False))) == []
    assert loop.next_wakeup(driver.state, CONFIG, driver.now) == pytest.approx(CONFIG.probe_every)
    assert kinds(driver.advance(CONFIG.probe_every)) == ["ProbePort"]


def test_squid_exiting_while_launching_exits_3() -> None:
    driver = Driver()
    driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))
    driver.feed(loop.CandidateBuilt("v1", candidate="cand"))
    driver.feed(loop.SquidExited(1))
    assert driver.state.exit_code is ExitCode.SQUID_FAILED


def test_squid_never_listening_is_killed_and_exits_3() -> None:
    driver = Driver()
    driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))
    driver.feed(loop.CandidateBuilt("v1", candidate="cand"))
    actions = driver.advance(CONFIG.launch_timeout + 1)
    assert "KillSquid" in kinds(actions) and driver.state.exit_code is ExitCode.SQUID_FAILED


def test_sigterm_while_the_first_read_hangs_exits_0_at_once() -> None:
    driver = Driver()  # PollSource is out in the worker and never answers
    actions = driver.feed(loop.SignalReceived(signal.SIGTERM))
    assert driver.state.exit_code is ExitCode.OK and kinds(actions)[-1] == "Finish"
    # A late answer changes nothing.
    assert driver.feed(loop.SourcePolled(version="v1", snapshot="snap")) == []


# --- polling, dedupe, backoff --------------------------------------------------------------------------------


def test_polls_after_the_interval_with_jitter_and_dedupes_versions() -> None:
    driver = Driver().running()
    assert "PollSource" not in kinds(driver.advance(29))
    assert kinds(driver.advance(1.5))[-1:] == ["PollSource"]
    poll = driver.actions[-1]
    assert isinstance(poll, loop.PollSource) and poll.known_version == "v1"
    # The same version again (e.g. a file rewritten with identical content): nothing to build.
    assert kinds(driver.feed(loop.SourcePolled(version="v1", snapshot="snap", jitter=1.1))) == []
    assert driver.state.next_poll == pytest.approx(driver.now + 33.0)
    assert "PollSource" not in kinds(driver.advance(32.9))


FILE_CONFIG = loop.LoopConfig(poll_interval=0.25, workers=2, drain_seconds=5.0)


def test_an_unchanged_answer_taken_late_keeps_one_poll_per_interval_and_one_wake_up_per_poll() -> None:
    # The supervisor queues an unchanged answer without waking the loop; the loop wakes when the next poll can be
    # due at the latest, takes the answer and polls again in that same wake-up.
    driver = Driver(FILE_CONFIG).running()
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    assert kinds(driver.actions) == ["PollSource"]
    issued = driver.now
    latest = 0.25 * loop.MAX_POLL_JITTER
    assert loop.next_wakeup(driver.state, FILE_CONFIG, driver.now + 0.01) == pytest.approx(latest - 0.01)
    assert driver.feed(loop.SourcePolled(jitter=1.0), at=issued + latest) == []
    assert driver.state.next_poll == pytest.approx(issued + 0.25)  # from the poll's issue, not from its answer
    assert kinds(driver.advance(0)) == ["PollSource"]


def test_an_answer_overdue_neither_spins_the_loop_nor_shortens_a_slow_sources_rest() -> None:
    driver = Driver().running()  # a 30 s interval, e.g. Secrets Manager
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    issued = driver.now
    later = issued + 30 * loop.MAX_POLL_JITTER + 5  # the call took longer than the interval
    assert "PollSource" not in kinds(driver.feed(loop.Tick(), at=later))  # the poll is still out
    assert loop.next_wakeup(driver.state, CONFIG, later) == pytest.approx(1.0)  # no wake-up in the past
    driver.feed(loop.SourcePolled(jitter=1.0), at=later)
    assert driver.state.next_poll == pytest.approx(later + 30.0)


def test_backoff_doubles_to_the_cap_and_resets_when_the_source_is_back() -> None:
    driver = Driver().running()
    backoffs = []
    for _ in range(12):
        driver.feed(loop.Tick(), at=driver.state.next_poll)
        actions = driver.feed(loop.SourcePolled(error="timeout"))
        assert kinds(actions) == ["SourceUnavailableNow"]
        backoffs.append(driver.state.backoff)
    assert backoffs[:4] == [1.0, 2.0, 4.0, 8.0] and backoffs[-1] == CONFIG.max_backoff
    retry = driver.actions[0]
    assert isinstance(retry, loop.SourceUnavailableNow) and retry.retry_in == CONFIG.poll_interval + 300
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    assert kinds(driver.feed(loop.SourcePolled())) == ["SourceBack"]
    assert driver.state.backoff == 0.0


def test_a_rejected_version_is_not_rebuilt() -> None:
    driver = Driver().running()
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    assert kinds(driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))) == ["BuildCandidate"]
    rejected = driver.feed(loop.CandidateBuilt("v2", error="bad", bad_entries=("policies[0].mode",)))
    assert rejected == [loop.Reject("v2", "bad", ("policies[0].mode",))]
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    assert kinds(driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))) == []


def test_an_identical_render_is_skipped_without_reconfigure() -> None:
    driver = Driver().running()
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))
    assert kinds(driver.feed(loop.CandidateBuilt("v2", candidate="cand", unchanged=True))) == ["SkipUnchanged"]
    assert driver.state.pending is None


# --- reload confirmation -------------------------------------------------------------------------------------


def reloading(driver: Driver) -> Driver:
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))
    assert kinds(driver.feed(loop.CandidateBuilt("v2", candidate="cand2"))) == ["Activate"]
    return driver


def test_reload_is_confirmed_when_every_worker_accepts_and_the_port_answers() -> None:
    driver = reloading(Driver().running())
    assert kinds(driver.feed(loop.WorkerAccepting())) == []  # one of two workers
    assert kinds(driver.feed(loop.WorkerAccepting())) == ["ProbePort"]
    assert kinds(driver.feed(loop.PortProbed(False))) == []
    assert kinds(driver.advance(CONFIG.probe_every)) == ["ProbePort"]
    actions = driver.feed(loop.PortProbed(True))
    assert actions == [loop.ReloadDone("cand2", confirmed=True)] and driver.state.pending is None


def test_reload_confirm_times_out_and_polling_resumes() -> None:
    config = loop.LoopConfig(poll_interval=30.0, workers=2, drain_seconds=5.0, confirm_timeout=100.0)
    driver = reloading(Driver(config).running())
    # No poll while Squid has not taken the last change, however long that takes.
    assert "PollSource" not in kinds(driver.advance(config.poll_interval + 1))
    assert driver.advance(config.confirm_timeout) == [loop.ReloadDone("cand2", confirmed=False)]
    assert "PollSource" in kinds(driver.advance(0.1))


# --- SIGHUP --------------------------------------------------------------------------------------------------


def test_sighup_polls_now() -> None:
    driver = Driver().running()
    actions = driver.feed(loop.SignalReceived(signal.SIGHUP), at=driver.now + 1)
    assert logged(actions) == ["hup"] and kinds(actions)[-1] == "PollSource"


def test_sighup_while_busy_polls_again_right_after() -> None:
    driver = Driver().running()
    driver.feed(loop.Tick(), at=driver.state.next_poll)  # a poll is out
    assert "PollSource" not in kinds(driver.feed(loop.SignalReceived(signal.SIGHUP)))
    # That poll may have read before the edit the operator announced: it does not answer the SIGHUP.
    assert logged(driver.feed(loop.SourcePolled(), at=driver.now + 0.5)) == []
    assert driver.state.next_poll == driver.now
    assert "PollSource" in kinds(driver.advance(0.01))
    assert logged(driver.feed(loop.SourcePolled())) == ["source_unchanged"]


def test_sighup_with_nothing_new_says_so_once() -> None:
    driver = Driver().running()
    driver.feed(loop.SignalReceived(signal.SIGHUP))
    assert logged(driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))) == ["source_unchanged"]
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    assert logged(driver.feed(loop.SourcePolled())) == []  # an ordinary poll stays quiet


def test_sighup_during_a_reload_polls_once_it_is_confirmed() -> None:
    driver = reloading(Driver().running())
    driver.feed(loop.SignalReceived(signal.SIGHUP))
    assert "PollSource" not in kinds(driver.advance(0.1))
    driver.feed(loop.WorkerAccepting())
    driver.feed(loop.WorkerAccepting())
    driver.feed(loop.PortProbed(True))
    assert "PollSource" in kinds(driver.advance(0.01))


# --- local failures -----------------------------------------------------------------------------------------


def test_unwritable_config_at_startup_exits_6() -> None:
    driver = Driver()
    driver.feed(loop.SourcePolled(version="v1", snapshot="snap"))
    driver.feed(loop.CandidateBuilt("v1", candidate="cand"))
    actions = driver.feed(loop.LocalFailure("No space left on device"))
    assert driver.state.exit_code is ExitCode.STARTUP_IO and "KillSquid" in kinds(actions)


def test_unwritable_config_while_running_rejects_the_reload_and_keeps_serving() -> None:
    driver = reloading(Driver().running())
    actions = driver.feed(loop.LocalFailure("No space left on device"))
    assert kinds(actions) == ["Reject"] and driver.state.pending is None
    assert driver.state.phase is loop.Phase.RUNNING and driver.state.exit_code is None
    assert actions[0].retry  # type: ignore[union-attr]


def _retried(driver: Driver) -> Driver:
    """After a local failure of v2: the next poll reads the value whole and builds v2 again."""
    assert driver.state.retry_version == "v2"
    assert driver.state.next_poll >= driver.now + CONFIG.local_retry_every
    polls = [a for a in driver.feed(loop.Tick(), at=driver.state.next_poll) if isinstance(a, loop.PollSource)]
    assert polls == [loop.PollSource(known_version=None)]
    assert kinds(driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))) == ["BuildCandidate"]
    return driver


def test_a_version_that_could_not_be_written_is_tried_again_until_it_can() -> None:
    activating = reloading(Driver().running())
    activating.feed(loop.LocalFailure("No space left on device"))  # writing the active files failed
    _retried(activating)
    driver = Driver().running()  # writing the candidate failed
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))
    actions = driver.feed(loop.CandidateBuilt("v2", error="cannot write the candidate config: No space left on "
                                              "device: /state/candidate/squid.conf", error_code=ExitCode.STARTUP_IO))
    assert kinds(actions) == ["Reject"] and actions[0].retry  # type: ignore[union-attr]
    _retried(driver)
    # Space is back: the build succeeds and the retry is over.
    assert kinds(driver.feed(loop.CandidateBuilt("v2", candidate="cand2"))) == ["Activate"]
    assert driver.state.retry_version is None


def test_an_invalid_value_is_not_retried() -> None:
    driver = Driver().running()
    driver.feed(loop.Tick(), at=driver.state.next_poll)
    driver.feed(loop.SourcePolled(version="v2", snapshot="snap2"))
    actions = driver.feed(loop.CandidateBuilt("v2", error="bad entry"))
    assert kinds(actions) == ["Reject"] and not actions[0].retry  # type: ignore[union-attr]
    assert driver.state.retry_version is None


# --- stopping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_drains_then_exits_0_when_squid_exits(signum: int) -> None:
    driver = Driver().running()
    actions = driver.feed(loop.SignalReceived(signum))
    assert kinds(actions) == ["Log", "StopSquid"] and driver.state.phase is loop.Phase.DRAINING
    # A second signal does not cut the drain short; source results are ignored now.
    assert kinds(driver.feed(loop.SignalReceived(signum))) == ["Log"]
    assert driver.feed(loop.SourcePolled(version="v9", snapshot="x")) == []
    actions = driver.feed(loop.SquidExited(0), at=driver.now + 3)
    assert logged(actions) == ["stopped"] and driver.state.exit_code is ExitCode.OK


def test_drain_deadline_kills_squid() -> None:
    driver = Driver().running()
    driver.feed(loop.SignalReceived(signal.SIGTERM))
    assert "KillSquid" not in kinds(driver.advance(CONFIG.drain_seconds + 1))
    assert "KillSquid" in kinds(driver.advance(CONFIG.kill_margin))
    driver.feed(loop.SquidExited(-9))
    assert driver.state.exit_code is ExitCode.OK


def test_squid_dying_while_running_exits_5() -> None:
    driver = Driver().running()
    actions = driver.feed(loop.SquidExited(-9))
    assert logged(actions) == ["squid_died"] and driver.state.exit_code is ExitCode.SQUID_DIED
    assert driver.feed(loop.Tick()) == []  # done is done


def test_next_wakeup_is_at_most_a_second_and_honours_deadlines() -> None:
    driver = Driver().running()
    assert loop.next_wakeup(driver.state, CONFIG, driver.now) == pytest.approx(1.0)
    driver.feed(loop.SignalReceived(signal.SIGTERM))
    later = driver.state.deadline
    assert later is not None
    assert loop.next_wakeup(driver.state, CONFIG, later - 0.25) == pytest.approx(0.25)
