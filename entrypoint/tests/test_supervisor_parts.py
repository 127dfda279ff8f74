"""The supervisor's I/O parts without Squid: the event queue (signals through the wakeup fd), the worker, and a
log relay that drains everything written before it is stopped."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from egress_proxy import loop
from egress_proxy.squid_process import LogRelay
from egress_proxy.supervisor import EventQueue, Worker, raise_fd_limit


def test_signals_and_posted_events_arrive_on_one_queue() -> None:
    queue = EventQueue()
    queue.install_signals()
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # would end the process without our handler
        threading.Thread(target=queue.post, args=(loop.WorkerAccepting(),)).start()
        signums: list[int] = []
        events: list[loop.Event] = []
        while not (signums and events):
            more_signums, more_events = queue.wait(5.0)
            signums += more_signums
            events += more_events
        assert signal.SIGHUP in signums and events == [loop.WorkerAccepting()]
    finally:
        queue.close()
        for signum in EventQueue.SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


def test_wait_times_out_empty() -> None:
    queue = EventQueue()
    assert queue.wait(0.01) == ([], [])


def test_worker_posts_each_result_in_order() -> None:
    posted: list[loop.Event] = []
    done = threading.Event()

    def post(event: loop.Event) -> None:
        posted.append(event)
        if len(posted) == 2:
            done.set()

    worker = Worker(post)
    worker.start()
    worker.submit(lambda: loop.SourcePolled(version="a"))
    worker.submit(lambda: loop.SourcePolled(version="b"))
    assert done.wait(5)
    worker.stop()
    assert posted == [loop.SourcePolled(version="a"), loop.SourcePolled(version="b")]


def test_fifo_relay_drains_every_line_written_before_stop(tmp_path: Path) -> None:
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    lines: list[str] = []
    relay = LogRelay("access", lines.extend, fifo=fifo)
    relay.start()
    writer = os.open(fifo, os.O_WRONLY)
    os.write(writer, b"".join(b"line %d\n" % i for i in range(2000)) + b"last without newline")
    os.close(writer)  # the writer (Squid) is gone; the relay still holds the FIFO open read-write
    relay.stop()
    assert len(lines) == 2001 and lines[0] == "line 0" and lines[-1] == "last without newline"


def test_pipe_relay_ends_at_eof(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    lines: list[str] = []
    relay = LogRelay("squid-output", lines.extend, fd=read_end)
    relay.start()
    os.write(write_end, b"WARNING: BCP 177 violation\n")
    os.close(write_end)
    relay.stop()
    assert lines == ["WARNING: BCP 177 violation"]


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = raise_fd_limit()
    assert soft == hard
