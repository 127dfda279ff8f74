"""The supervisor's I/O parts without Squid: the event queue (signals through the wakeup fd), the worker, and a
log relay that drains everything written before it is stopped."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from egress_proxy import loop
from egress_proxy.squid_process import AccessLogListener, LogRelay, connecting_worker
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


def test_a_quiet_post_waits_for_the_next_wake_up_without_causing_one() -> None:
    queue = EventQueue()
    queue.post_quietly(loop.SourcePolled())
    assert select.select([queue._read], [], [], 0)[0] == []  # nothing to wake a loop sleeping in select()
    queue.post(loop.WorkerAccepting())
    assert queue.wait(5.0) == ([], [loop.SourcePolled(), loop.WorkerAccepting()])  # in order, both taken


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
    fifo = tmp_path / "cache.fifo"
    os.mkfifo(fifo)
    lines: list[str] = []
    relay = LogRelay("cache", lines.extend, fifo=fifo)
    relay.start()
    writer = os.open(fifo, os.O_WRONLY)
    os.write(writer, b"".join(b"line %d\n" % i for i in range(2000)) + b"last without newline")
    os.close(writer)  # the writer (Squid) is gone; the relay still holds the FIFO open read-write
    relay.stop()
    assert len(lines) == 2001 and lines[0] == "line 0" and lines[-1] == "last without newline"


def _wait_for(lines: list[str], count: int) -> None:
    deadline = time.monotonic() + 30
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.parametrize("coalesce", [0.0, 3600.0])
def test_a_relay_reads_again_after_its_coalescing_wait(coalesce: float) -> None:
    # After a small read the relay waits `coalesce` seconds before reading again (stop() cuts the wait short):
    # with an hour's wait the second line comes only at stop(); with none it comes while the relay runs.
    read_end, write_end = os.pipe()
    lines: list[str] = []
    relay = LogRelay("cache", lines.extend, fd=read_end, coalesce=coalesce)
    relay.start()
    os.write(write_end, b"kid1| Accepting\n")
    _wait_for(lines, 1)
    os.write(write_end, b"kid2| Accepting\n")
    if coalesce == 0:
        _wait_for(lines, 2)
        assert lines == ["kid1| Accepting", "kid2| Accepting"]
    else:  # the relay is in its wait: it handed over the first line, then began waiting
        assert lines == ["kid1| Accepting"]
    os.close(write_end)
    relay.stop()
    assert lines == ["kid1| Accepting", "kid2| Accepting"]


def test_pipe_relay_ends_at_eof(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    lines: list[str] = []
    relay = LogRelay("squid-output", lines.extend, fd=read_end)
    relay.start()
    os.write(write_end, b"WARNING: BCP 177 violation\n")
    os.close(write_end)
    relay.stop()
    assert lines == ["WARNING: BCP 177 violation"]


class _Writers(dict[int, str]):
    """Stands in for the /proc lookup (tested below): which test socket (by its port) is which worker."""

    def __call__(self, peer: tuple[str, int], local: tuple[str, int]) -> str | None:
        return self.get(peer[1])


def _connect(listener: AccessLogListener, writers: _Writers, writer: str | None) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if writer is not None:
        writers[sock.getsockname()[1]] = writer
    sock.connect(("127.0.0.1", listener.port))
    return sock


def _tagged(listener: AccessLogListener, kid: int, *lines: str) -> bytes:
    """Lines as Squid writes them with the tagged logformat: the token, the kid number, a tab."""
    return "".join(f"{listener.token}-{kid}\t{line}\n" for line in lines).encode()


def test_access_log_listener_keeps_one_workers_order_across_its_reconnect() -> None:
    """A reconfigure: the worker's new logger connects (and writes) before its old one has written its last lines.
    The new connection is read only after the old one ends, so the lines arrive in the order they were written."""
    lines: list[str] = []
    writers = _Writers()
    listener = AccessLogListener(lines.extend, writers, lambda peer, forged: None)
    listener.start()
    old = _connect(listener, writers, "squid-1")
    old.sendall(_tagged(listener, 1, "1", "2"))
    new = _connect(listener, writers, "squid-1")
    new.sendall(_tagged(listener, 1, "5", "6"))
    other = _connect(listener, writers, "squid-2")
    other.sendall(_tagged(listener, 2, "w2"))
    old.sendall(_tagged(listener, 1, "3") + f"{listener.token}-1\t4 without newline".encode())
    old.close()
    new.close()
    other.close()
    listener.stop()
    assert [line for line in lines if line != "w2"] == ["1", "2", "3", "4 without newline", "5", "6"]
    assert lines.count("w2") == 1


def test_access_log_listener_keeps_a_line_that_arrives_in_two_segments_whole() -> None:
    """A worker's line cut between two reads (two TCP segments, the first read before the second is sent) is handed
    over once, whole, when its newline arrives."""
    lines: list[str] = []
    arrived = threading.Event()
    writers = _Writers()

    def sink(batch: list[str]) -> None:
        lines.extend(batch)
        if "other" in batch:
            arrived.set()

    listener = AccessLogListener(sink, writers, lambda peer, forged: None)
    listener.start()
    split = _connect(listener, writers, "squid-1")
    other = _connect(listener, writers, "squid-2")
    split.sendall(f"{listener.token}-1\t1.000\t10.0.0.1\tfirst half, ".encode())
    # Once this is out, the listener has read the first half too (sent before it).
    other.sendall(_tagged(listener, 2, "other"))
    assert arrived.wait(30)
    assert lines == ["other"]
    split.sendall(b"second half\n")
    split.close()
    other.close()
    listener.stop()
    assert lines == ["other", "1.000\t10.0.0.1\tfirst half, second half"]


def test_access_log_listener_closes_a_connection_from_anything_but_a_worker_unread() -> None:
    lines: list[str] = []
    refused: list[tuple[str, int]] = []
    writers = _Writers()
    listener = AccessLogListener(lines.extend, writers, lambda peer, forged: refused.append((peer, forged)))
    listener.start()
    forged = _connect(listener, writers, None)
    forged.sendall(b"forged line\n")
    forged.settimeout(30)
    try:  # closed by the listener unread: a reset (it had unread bytes) or an end of stream
        assert forged.recv(10) == b""
    except ConnectionResetError:
        pass
    worker = _connect(listener, writers, "squid-1")
    worker.sendall(_tagged(listener, 1, "real line"))
    worker.close()
    forged.close()
    listener.stop()
    assert lines == ["real line"]
    assert len(refused) == 1 and refused[0][0].startswith("127.0.0.1:") and refused[0][1] == 0


def test_access_log_listener_drops_and_counts_lines_without_the_token() -> None:
    """A connection the /proc check let through (here: said to be a worker's) still writes lines only with the
    token: the first line without it ends the connection; it and the lines after it are counted, never relayed."""
    lines: list[str] = []
    refused: list[tuple[str, int]] = []
    writers = _Writers()
    listener = AccessLogListener(lines.extend, writers, lambda peer, forged: refused.append((peer, forged)))
    listener.start()
    sneaky = _connect(listener, writers, "squid-1")
    sneaky.sendall(_tagged(listener, 1, "real") + b"0123-1\tforged one\nforged two\n")
    sneaky.settimeout(30)
    try:
        assert sneaky.recv(10) == b""
    except ConnectionResetError:
        pass
    sneaky.close()
    listener.stop()
    assert lines == ["real"]
    assert len(refused) == 1 and refused[0][1] == 2 and listener.forged_lines == 2


def test_access_log_listener_keeps_the_lines_of_a_worker_whose_socket_closed_before_the_check() -> None:
    """The race a reconfigure opens: a worker's logger connects, writes and closes before the listener looks the
    socket up in /proc, which then finds no holder. The lines say which worker wrote them (the token's tag), so
    they are relayed, after that worker's older connection and before its newer one; a closed connection that
    wrote nothing (the coordinator's) is closed quietly; a closed one with lines lacking the token is refused."""
    lines: list[str] = []
    refused: list[tuple[str, int]] = []
    writers = _Writers()
    listener = AccessLogListener(lines.extend, writers, lambda peer, forged: refused.append((peer, forged)))
    # Not started yet: every connection below is complete and closed before the listener checks it.
    oldest = _connect(listener, writers, "squid-1")
    oldest.sendall(_tagged(listener, 1, "1"))
    gone = _connect(listener, writers, None)  # /proc finds no holder: closed before the check
    gone.sendall(_tagged(listener, 1, "2", "3"))
    gone.close()
    silent = _connect(listener, writers, None)
    silent.close()
    forger = _connect(listener, writers, None)
    forger.sendall(b"forged\n")
    forger.close()
    newest = _connect(listener, writers, "squid-1")
    newest.sendall(_tagged(listener, 1, "4"))
    listener.start()
    oldest.sendall(_tagged(listener, 1, "1b"))
    oldest.close()
    newest.close()
    listener.stop()
    assert lines == ["1", "1b", "2", "3", "4"]
    assert len(refused) == 1 and refused[0][1] == 0


def test_connecting_worker_finds_the_process_holding_the_socket() -> None:
    """The /proc lookup the supervisor trusts: this process holds the connecting socket, a made-up pid does not."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, peer = server.accept()
    local = accepted.getsockname()
    assert connecting_worker({"squid-1": os.getpid()}, peer, local) == "squid-1"
    assert connecting_worker({"squid-1": 1}, peer, local) is None
    assert connecting_worker({"squid-1": os.getpid()}, ("127.0.0.1", 1), local) is None
    for sock in (client, accepted, server):
        sock.close()


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = raise_fd_limit()
    assert soft == hard
