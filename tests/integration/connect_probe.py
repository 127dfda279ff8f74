"""A connect probe: new connections through the proxy, back to back, each with one plain-HTTP request, counting
the answered, the refused and the failed. The README promises no new connection is refused during a reload;
tests run this across reloads and assert it (shared by the integration suite and tests/container)."""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from harness import _read_head


class ConnectProbe:
    def __init__(self, proxy: tuple[str, int], url: str, host: str, threads: int = 2) -> None:
        self.proxy = proxy
        self.request = (f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").encode()
        self.answered = 0
        self.refused: list[str] = []
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._result = threading.Condition(self._lock)  # notified on every answer, refusal or failure
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"probe-{i}") for i in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.proxy, timeout=15) as sock:
                    sock.sendall(self.request)
                    head = _read_head(sock)
                    status_line = head.split(b"\r\n", 1)[0]
            except ConnectionRefusedError as exc:
                with self._lock:
                    self.refused.append(repr(exc))
                    self._result.notify_all()
                continue
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                    self._result.notify_all()
                continue
            with self._lock:
                self._result.notify_all()
                if status_line.split(b" ")[1:2] == [b"200"]:
                    self.answered += 1
                else:
                    # the proxy's own reason headers say which check refused it (the status alone does not)
                    reasons = [line for line in head.split(b"\r\n") if line.lower().startswith(b"x-egress-")]
                    self.failed.append(b" ".join([status_line, *reasons]).decode(errors="replace"))

    def __enter__(self) -> ConnectProbe:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def results(self) -> int:
        """Every probe connection that ended so far: answered, refused or failed."""
        with self._lock:
            return self.answered + len(self.refused) + len(self.failed)

    def wait_for_result_after(self, count: int, timeout: float) -> bool:
        """Wait until a probe connection ends after the first ``count`` (see results()). A reconfigure pauses every
        worker at once, so the connections opened meanwhile are answered only as the workers accept again: often
        just after the confirmed reload, not before it. False if none ends within ``timeout`` (the probe stalled)."""
        with self._lock:
            return self._result.wait_for(
                lambda: self.answered + len(self.refused) + len(self.failed) > count, timeout)

    def summary(self) -> str:
        return f"{self.answered} answered, {len(self.refused)} refused, {len(self.failed)} failed"

    def assert_clean(self) -> None:
        assert self.refused == [], f"refused during reloads: {self.summary()}: {self.refused[:5]}"
        assert self.failed == [], f"failed during reloads: {self.summary()}: {self.failed[:5]}"
        assert self.answered > 0, "the probe never got an answer"
