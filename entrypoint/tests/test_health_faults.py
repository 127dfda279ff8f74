"""`health` on a running proxy's faults (a worker down, a failed write, a stale status, a stalled stdout), and the
log gate helper that EGRESS_LOG_FULL=refuse renders."""

from __future__ import annotations

from pathlib import Path

from egress_proxy.cli import degradations
from egress_proxy.config_pipeline import ReloadStats, Status
from egress_proxy.log_gate import answer
from egress_proxy.settings import load_settings
from egress_proxy.squid_conf import StatePaths
from egress_proxy.workers import UNHEALTHY_AFTER_SECONDS


def _status(now: float, **faults: object) -> Status:
    settings = load_settings({}, {})
    return Status.of(ReloadStats(version="v1", entries=3), config_loaded=True, settings=settings, now=now,
                     **faults)  # type: ignore[arg-type]


def test_a_healthy_proxy_has_nothing_to_report(tmp_path: Path) -> None:
    assert degradations(_status(100.0, workers={"configured": 2, "up": 2, "degraded_since": None}),
                        StatePaths(tmp_path), 101.0) == ("ok", [])


def test_each_fault_degrades_and_a_worker_short_for_long_fails(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    failure = {"path": "/state/status.json", "errno": "ENOSPC", "message": "No space left on device", "since": 90.0}
    verdict, problems = degradations(_status(100.0, write_failure=failure,
                                             log_sink={"blocked": True, "dropped_total": 7}), paths, 140.0)
    assert verdict == "degraded"
    assert any("ENOSPC" in p and "/state/status.json" in p for p in problems)
    assert any("not updated for 40 s" in p for p in problems)  # a status that cannot be refreshed shows its age
    assert any("stdout is not taking log lines (7 dropped" in p for p in problems)
    down = {"configured": 2, "up": 1, "deaths": 5, "degraded_since": 100.0,
            "last_death": {"worker": "squid-1", "pid": 9, "at": 100.0}}
    assert degradations(_status(110.0, workers=down), paths, 110.0)[0] == "degraded"
    late = 100.0 + UNHEALTHY_AFTER_SECONDS + 1
    verdict, problems = degradations(_status(late, workers=down), paths, late)
    assert verdict == "unhealthy" and "1 of 2 Squid workers up" in problems[0]


def test_the_log_gate_answers_refuse_while_the_flag_exists(tmp_path: Path) -> None:
    flag = tmp_path / "log_blocked"
    assert answer("0 now\n", str(flag)) == "0 ERR"
    flag.touch()
    assert answer("3 now\n", str(flag)) == "3 OK"
