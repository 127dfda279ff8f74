"""stdout, bounded: every line the supervisor prints goes through one bounded buffer drained by one writer thread.

Squid's access lines and cache.log lines (relayed as JSON) and the supervisor's own events all end up on stdout,
which in production is a log driver (awslogs) that can stall for as long as CloudWatch Logs is slow or
throttled. Nothing but the writer thread ever waits on stdout: the relays and the loop only append to the
buffer, which never blocks. When the buffer (EGRESS_LOG_BUFFER_LINES) is full, new lines are dropped and counted
by kind; the writer reports the drops in one ``log_lines_dropped`` line per interval once stdout takes lines
again, and the metrics publish the totals. Lines that were buffered arrive in order when the sink recovers.

The relays hand over whole reads (a list of lines) and the writer writes many lines per system call, so the cost
per line stays one list append and a share of one ``write``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

from .threads import named_thread

# The kinds of line, as the JSON ``type`` field names them; drops are counted by kind.
KINDS = ("access", "cache_log", "supervisor")
DROP_REPORT_SECONDS = 10.0  # at most one log_lines_dropped line per this many seconds
MAX_BATCH_BYTES = 256 * 1024  # one write() carries at most about this much
# Once stdout has been stuck in one write() this long, the sink counts as blocked (EGRESS_LOG_FULL=refuse).
BLOCKED_AFTER_SECONDS = 1.0


class LogOutput:
    """The bounded buffer in front of stdout and its writer thread."""

    def __init__(self, stream: TextIO, capacity: int, *, clock: Callable[[], float] = time.monotonic,
                 report_every: float = DROP_REPORT_SECONDS) -> None:
        self.capacity = capacity
        self.clock = clock
        self.report_every = report_every
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a StringIO (tests): write through the stream
            self._fd = None
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._chunks: deque[tuple[str, list[str]]] = deque()
        self._buffered = 0  # lines in _chunks plus those the writer is writing now
        self._dropped = dict.fromkeys(KINDS, 0)  # totals since start
        self._unreported = dict.fromkeys(KINDS, 0)  # since the last log_lines_dropped line
        self._unreported_since: float | None = None
        self._next_report = 0.0
        self._writing_since: float | None = None  # monotonic start of the write() in progress
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- producers (any thread; never blocks) ----------------------------------------------------------------
    def put(self, kind: str, line: str) -> bool:
        return self.put_many(kind, [line]) == 1

    def put_many(self, kind: str, lines: list[str]) -> int:
        """Buffer ``lines`` (JSON, without newlines) or drop and count what does not fit. Returns how many were
        buffered."""
        if not lines:
            return 0
        with self._lock:
            room = self.capacity - self._buffered
            taken = lines if len(lines) <= room else lines[:max(0, room)]
            if taken:
                self._chunks.append((kind, taken))
                self._buffered += len(taken)
                self._ready.notify()
            lost = len(lines) - len(taken)
            if lost:
                self._count_drop(kind, lost)
        return len(taken)

    def count_dropped(self, kind: str, lost: int) -> None:
        """Lines lost before they reached this buffer (a Squid worker's own access-log buffer overflowed): counted
        and reported with the buffer's own drops."""
        with self._lock:
            self._count_drop(kind, lost)
            self._ready.notify()

    def _count_drop(self, kind: str, lost: int) -> None:
        self._dropped[kind] = self._dropped.get(kind, 0) + lost
        self._unreported[kind] = self._unreported.get(kind, 0) + lost
        if self._unreported_since is None:
            self._unreported_since = time.time()

    # --- readers (metrics, health, the refuse gate) ----------------------------------------------------------
    def dropped(self) -> dict[str, int]:
        """Lines dropped since start, by kind."""
        with self._lock:
            return dict(self._dropped)

    def buffered(self) -> int:
        with self._lock:
            return self._buffered

    def blocked(self, now: float | None = None) -> bool:
        """True while lines cannot be written: the buffer is full, or stdout has not finished one write() for
        BLOCKED_AFTER_SECONDS."""
        now = self.clock() if now is None else now
        with self._lock:
            stuck = self._writing_since is not None and now - self._writing_since >= BLOCKED_AFTER_SECONDS
            return stuck or self._buffered >= self.capacity

    # --- the writer ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = named_thread(self._run, "stdout-writer")
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Write what is buffered for up to ``timeout`` seconds, then return even if stdout is stalled (the
        writer is a daemon thread, so a write that never returns cannot hold up the exit)."""
        with self._lock:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        wrote = False  # the last write went through: a report now covers drops up to the sink's recovery
        while True:
            with self._lock:
                while not self._chunks and not self._stopping and not self._report_due():
                    self._ready.wait(self._wait_time())
                report = self._take_report() if (wrote or not self._chunks) and self._report_due() else None
                if report is None and self._stopping and not self._chunks:
                    report = self._take_report()
                batch = [("supervisor", [report])] if report is not None else self._take_batch()
                if not batch:
                    return  # stopping, and everything is written
                self._buffered += 1 if report is not None else 0
                self._writing_since = self.clock()
            try:
                self._write([line for _, chunk in batch for line in chunk])
                wrote = True
            except OSError:  # stdout is gone (EPIPE, EIO): count the lines as dropped, keep draining
                wrote = False
                with self._lock:
                    for kind, chunk in batch:
                        self._count_drop(kind, len(chunk))
            finally:
                with self._lock:
                    self._writing_since = None
                    self._buffered -= sum(len(chunk) for _, chunk in batch)

    def _wait_time(self) -> float | None:
        if self._unreported_since is None:
            return None
        return max(0.01, self._next_report - self.clock())

    def _take_batch(self) -> list[tuple[str, list[str]]]:
        batch: list[tuple[str, list[str]]] = []
        size = 0
        while self._chunks and size < MAX_BATCH_BYTES:
            kind, chunk = self._chunks.popleft()
            batch.append((kind, chunk))
            size += sum(len(line) for line in chunk)
        return batch

    def _report_due(self) -> bool:
        return self._unreported_since is not None and self.clock() >= self._next_report

    def _take_report(self) -> str | None:
        """The log_lines_dropped line for the drops since the last one (None if there were none)."""
        if self._unreported_since is None:
            return None
        counts = {kind: count for kind, count in self._unreported.items() if count}
        total = sum(counts.values())
        since = self._unreported_since
        self._unreported = dict.fromkeys(KINDS, 0)
        self._unreported_since = None
        self._next_report = self.clock() + self.report_every
        return json.dumps({
            "type": "supervisor", "time": round(time.time(), 3), "level": "warning", "event": "log_lines_dropped",
            "message": f"{total} log lines dropped since {time.strftime('%H:%M:%S', time.gmtime(since))} UTC: "
                       f"stdout did not take them and the buffer of {self.capacity} lines "
                       "(EGRESS_LOG_BUFFER_LINES) was full, or (access lines only) a Squid worker's own log buffer was",
            "dropped": total, "dropped_by_type": counts, "dropped_total": sum(self._dropped.values()),
            "buffer_lines": self.capacity,
        }, separators=(",", ":"))

    def _write(self, lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        if self._fd is None:
            self._stream.write(text)
            self._stream.flush()
            return
        data = memoryview(text.encode("utf-8", errors="replace"))
        while data:
            with contextlib.suppress(InterruptedError):
                written = os.write(self._fd, data)
                data = data[written:]
