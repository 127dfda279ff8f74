"""Squid's workers as the supervisor tracks them: deaths, revivals, degraded until they stay up, unhealthy when
they do not come back."""

from __future__ import annotations

from egress_proxy import squid_strings as strings
from egress_proxy.workers import RECOVERED_AFTER_SECONDS, UNHEALTHY_AFTER_SECONDS, WorkerChange, WorkerWatch, judge


def test_names_of_squid_processes() -> None:
    assert strings.worker_name("(squid-2)") == "squid-2"
    assert strings.worker_name("(squid-coord-3)") is None and strings.worker_name("squid") is None
    assert strings.coordinator_name("(squid-coord-3)") == "squid-coord-3"
    assert strings.coordinator_name("(squid-2)") is None and strings.coordinator_name("(squid-coord-x)") is None
    assert strings.kid_of("2026/12/04 20:32:10 kid1| FATAL: Received Segment Violation...dying.") == "kid1"
    assert strings.kid_of("2026/12/04 20:32:11| Removing PID file") is None


def test_a_revived_worker_is_a_death_and_a_start_and_degrades_until_it_stays_up() -> None:
    watch = WorkerWatch(configured=2)
    assert watch.update({"squid-1": 10, "squid-2": 11}, now=100.0) == []  # the first look only records
    assert watch.degraded_since is None
    changes = watch.update({"squid-1": 12, "squid-2": 11}, now=101.0)  # killed and revived between two looks
    assert changes == [WorkerChange("died", "squid-1", 10), WorkerChange("started", "squid-1", 12)]
    assert watch.deaths == 1 and watch.up == 2 and watch.degraded_since == 101.0
    assert judge(watch.status(), 102.0)[0] == "degraded"
    assert not watch.recovered(101.0 + RECOVERED_AFTER_SECONDS - 1)
    watch.update({"squid-1": 12, "squid-2": 11}, now=101.0 + RECOVERED_AFTER_SECONDS)
    assert watch.recovered(101.0 + RECOVERED_AFTER_SECONDS)
    assert judge(watch.status(), 200.0) == ("ok", None)


def test_a_worker_that_stays_down_makes_health_fail_after_a_while() -> None:
    watch = WorkerWatch(configured=2)
    watch.update({"squid-1": 10, "squid-2": 11}, now=0.0)
    assert [c.kind for c in watch.update({"squid-2": 11}, now=1.0)] == ["died"]
    for now in (10.0, 100.0, 200.0):
        watch.update({"squid-2": 11}, now=now)
        assert not watch.recovered(now)
    verdict, why = judge(watch.status(), 1.0 + UNHEALTHY_AFTER_SECONDS - 1)
    assert verdict == "degraded" and why is not None and "1 of 2 Squid workers up" in why
    assert judge(watch.status(), 1.0 + UNHEALTHY_AFTER_SECONDS + 1)[0] == "unhealthy"
    # A crash loop: revived, dead again within seconds. Never "recovered" in between.
    watch.update({"squid-1": 20, "squid-2": 11}, now=302.0)
    watch.update({"squid-2": 11}, now=305.0)
    assert watch.degraded_since == 1.0 and watch.deaths == 2
