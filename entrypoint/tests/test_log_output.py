"""The bounded stdout buffer: lines in order, drops counted and reported once the sink takes lines again, a stop
that returns while stdout is stalled, and producers that never wait on it."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import IO

from egress_proxy.log_output import LogOutput


def _read_lines(reader: IO[bytes], count: int) -> list[str]:
    lines: list[str] = []
    while len(lines) < count:
        line = reader.readline()
        assert line, f"EOF after {len(lines)} lines"
        lines.append(line.decode().rstrip("\n"))
    return lines


def _stalled_pipe() -> tuple[IO[bytes], IO[str]]:
    read_end, write_end = os.pipe()
    return os.fdopen(read_end, "rb"), os.fdopen(write_end, "w")


def test_lines_arrive_in_order() -> None:
    reader, stream = _stalled_pipe()
    output = LogOutput(stream, capacity=1000)
    output.start()
    for i in range(300):
        output.put_many("access", [f"a{i}", f"b{i}"])
    assert _read_lines(reader, 600) == [f"{p}{i}" for i in range(300) for p in "ab"]
    output.stop(timeout=5)


def test_a_stalled_sink_drops_and_counts_and_reports_once_it_recovers() -> None:
    reader, stream = _stalled_pipe()
    output = LogOutput(stream, capacity=100)
    output.start()
    # Nobody reads: fill the pipe, then the buffer. Producers never wait.
    line = "x" * 1000
    started = time.monotonic()
    accepted = sum(output.put("access", f"{i:06d}{line}") for i in range(5000))
    assert time.monotonic() - started < 5, "a producer waited on stdout"
    dropped = output.dropped()["access"]
    assert accepted + dropped == 5000 and dropped > 0
    assert output.blocked()
    # The sink recovers: every accepted line arrives, in order, then one report with the drop count.
    lines = _read_lines(reader, accepted + 1)
    kept = [int(text[:6]) for text in lines[:accepted]]
    assert kept == sorted(kept)
    report = json.loads(lines[accepted])
    assert report["event"] == "log_lines_dropped" and report["dropped"] == dropped
    assert report["dropped_by_type"] == {"access": dropped}
    output.stop(timeout=5)
    assert not output.blocked()


def test_stop_returns_while_stdout_is_stalled() -> None:
    _reader, stream = _stalled_pipe()
    output = LogOutput(stream, capacity=100_000)
    output.start()
    for i in range(2000):
        output.put("supervisor", f"{i:06d}" + "y" * 200)
    done = threading.Event()
    threading.Thread(target=lambda: (output.stop(timeout=0.5), done.set()), daemon=True).start()
    assert done.wait(10), "stop() waited on a stalled stdout"
