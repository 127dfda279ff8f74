"""Collect the supervisor's JSON log lines and let tests wait for one: shared by the integration suite's
ProxyRunner (a local process) and tests/container's runtimes (the image's process)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

Record = dict[str, Any]


class LogReader:
    default_timeout = 10.0  # seconds a wait_for/access waits unless told otherwise

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.raw_lines: list[str] = []
        self._changed = threading.Condition()

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            record = {"type": "raw", "message": line}
        with self._changed:
            self.raw_lines.append(line)
            self.records.append(record)
            self._changed.notify_all()

    def mark(self) -> int:
        """Index to pass as ``start`` so a wait only considers records logged after this point."""
        with self._changed:
            return len(self.records)

    def wait_for(self, predicate: Callable[[Record], bool], timeout: float | None = None, start: int = 0) -> Record:
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for record in self.records[start:]:
                    if predicate(record):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching log record within {timeout} s; last lines:\n{self._tail(25)}")
                self._changed.wait(remaining)

    def wait_count(self, predicate: Callable[[Record], bool], count: int, start: int = 0,
                   timeout: float | None = None) -> list[Record]:
        """Wait until ``count`` records (from ``start``) match; returns them."""
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = [record for record in self.records[start:] if predicate(record)]
                if len(matching) >= count:
                    return matching
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(matching)} of {count} matching log records within {timeout} s; "
                                       f"last lines:\n{self._tail(25)}")
                self._changed.wait(remaining)

    def access(self, start: int = 0, timeout: float | None = None, **match: Any) -> Record:
        """Wait for the access log record whose fields equal ``match``."""
        return self.wait_for(
            lambda r: r.get("type") == "access" and all(r.get(k) == v for k, v in match.items()),
            timeout=timeout, start=start,
        )

    def events(self, name: str, start: int = 0) -> list[Record]:
        """The supervisor events called ``name`` logged so far (from ``start``, see mark())."""
        with self._changed:
            return [r for r in self.records[start:] if r.get("event") == name]

    def tail(self, n: int = 40) -> str:
        with self._changed:
            return self._tail(n)

    def _tail(self, n: int) -> str:
        return "\n".join(self.raw_lines[-n:])
