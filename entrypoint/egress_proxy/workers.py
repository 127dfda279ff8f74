"""Squid's workers as the supervisor sees them: which are up, which died, and whether the proxy is degraded.

Squid's master revives a dead worker at once, and after about five quick deaths stops reviving it for
``hopeless_kid_revival_delay``; it reports both only to syslog, which a container does not have. So the supervisor
looks for itself: every loop tick it lists the master's children in /proc (``read_workers``, I/O) and feeds the
names and pids to ``WorkerWatch.update`` (pure), which says who died and who came back.

Health: any death makes the proxy *degraded* until every worker has stayed up for RECOVERED_AFTER_SECONDS (longer
than Squid's ten-second "quick death" window, so a crash loop never looks recovered). Degraded for more than
UNHEALTHY_AFTER_SECONDS (several revival attempts failed) makes ``health`` fail, so that ECS replaces the task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import squid_strings as strings

RECOVERED_AFTER_SECONDS = 60.0
UNHEALTHY_AFTER_SECONDS = 300.0


@dataclass(frozen=True)
class WorkerChange:
    kind: str  # "died" or "started"
    worker: str  # Squid's kid name, e.g. squid-1
    pid: int


@dataclass
class WorkerWatch:
    configured: int
    pids: dict[str, int] = field(default_factory=dict)
    deaths: int = 0
    degraded_since: float | None = None  # wall-clock time of the first death or shortfall, until recovered
    all_up_since: float | None = None
    last_death: dict[str, Any] | None = None
    _seen: bool = False

    @property
    def up(self) -> int:
        return len(self.pids)

    def update(self, current: dict[str, int], now: float) -> list[WorkerChange]:
        """The workers now (name -> pid). Returns what changed since the last update (nothing the first time)."""
        changes: list[WorkerChange] = []
        if self._seen:
            for name, pid in sorted(self.pids.items()):
                if current.get(name) != pid:
                    changes.append(WorkerChange("died", name, pid))
            for name, pid in sorted(current.items()):
                if self.pids.get(name) != pid:
                    changes.append(WorkerChange("started", name, pid))
        self._seen = True
        self.pids = dict(current)
        died = [change for change in changes if change.kind == "died"]
        if died:
            self.deaths += len(died)
            self.last_death = {"worker": died[-1].worker, "pid": died[-1].pid, "at": round(now, 3)}
        if died or self.up < self.configured:
            self.degraded_since = self.degraded_since or now
            self.all_up_since = None if self.up < self.configured else now
        elif self.all_up_since is None:
            self.all_up_since = now
        return changes

    def recovered(self, now: float) -> bool:
        """True once, when a degraded proxy has had every worker up for RECOVERED_AFTER_SECONDS."""
        if (self.degraded_since is not None and self.all_up_since is not None
                and now - self.all_up_since >= RECOVERED_AFTER_SECONDS):
            self.degraded_since = None
            return True
        return False

    def status(self) -> dict[str, Any]:
        return {"configured": self.configured, "up": self.up, "up_names": sorted(self.pids), "deaths": self.deaths,
                "degraded_since": self.degraded_since, "last_death": self.last_death}


def judge(workers: dict[str, Any], now: float) -> tuple[str, str | None]:
    """status.json's ``workers`` -> ("ok" | "degraded" | "unhealthy", why). Pure, for ``health``."""
    since = workers.get("degraded_since")
    if since is None:
        return "ok", None
    up, configured = workers.get("up"), workers.get("configured")
    death = workers.get("last_death") or {}
    why = (f"{up} of {configured} Squid workers up; {workers.get('deaths')} worker deaths "
           f"(last: {death.get('worker')}, {now - death['at']:.0f} s ago)" if death.get("at") is not None
           else f"{up} of {configured} Squid workers up")
    if now - since > UNHEALTHY_AFTER_SECONDS:
        return "unhealthy", f"{why}; degraded for {now - since:.0f} s, longer than {UNHEALTHY_AFTER_SECONDS:g} s"
    return "degraded", why


def read_workers(master_pid: int, *, coordinator: bool = False) -> dict[str, int] | None:
    """Squid's workers now, name -> pid: the master's children whose argv[0] names a worker (the coordinator and
    the helpers are not workers; ``coordinator`` adds the coordinator, as ``squid-coord-N``). None when the master
    is gone."""
    try:
        children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    except OSError:
        return None
    workers: dict[str, int] = {}
    for text in children:
        try:
            argv0 = Path(f"/proc/{text}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue  # it exited between the two reads
        name = strings.worker_name(argv0) or (strings.coordinator_name(argv0) if coordinator else None)
        if name is not None:
            workers[name] = int(text)
    return workers
