"""The Squid child process: prepare the state dir, parse-check configs, start, reconfigure, stop, relay logs."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import operator
import os
import pwd
import secrets
import select
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import access_log
from . import squid_strings as strings
from .errors import ExitCode
from .squid_conf import (
    RenderedConfig,
    StatePaths,
    compiled_sni_helper,
    identity_helper_script,
    log_gate_script,
    sni_helper_script,
    upstream_error_page,
    upstream_probe_script,
)
from .squid_strings import CERTGEN
from .threads import named_thread

STOCK_ERRORS = Path("/usr/share/squid/errors/templates")
SQUID_USER = "proxy"  # Debian's squid user; Squid drops to it when started as root


class SquidError(RuntimeError):
    """Squid refused a config or failed to start. The message is one line, fit for a log."""

    exit_code = ExitCode.SQUID_FAILED


def run_as_user() -> str | None:
    """The user Squid should drop to: Debian's 'proxy' when we are root, none (stay as we are) otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SQUID_USER)
    except KeyError:
        return None
    return SQUID_USER


def _chown_to(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def atomic_write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write via a temp file + rename, so a reader (Squid on reconfigure) never sees half a file."""
    _replace_all([(path, _write_temp(path, text, mode))])


def _write_temp(path: Path, text: str | bytes, mode: int) -> Path:
    """``text`` in a temp file beside ``path``; on failure (a full disk) nothing is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write or fsync names no file: name the one we were writing
            exc.filename = str(path)
        raise
    return tmp


def _replace_all(temps: list[tuple[Path, Path]]) -> None:
    for path, tmp in temps:
        os.replace(tmp, path)


def write_rendered(rendered: RenderedConfig, paths: StatePaths) -> None:
    """Write a rendered config (list files and squid.conf) all or nothing: every file goes to a temp file first,
    and only when all of them are written are they renamed into place (a rename needs no free space). So a full
    disk leaves the previous config whole, which matters because Squid re-reads these files whenever it revives
    a worker, not only on reconfigure. Then remove the list files of policies it no longer has: the SNI helper
    loads every list in the directory at each (re)start, and a stale 50,000-entry list would slow it for nothing."""
    files = rendered.files(paths)
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in files.items():
            # squid.conf holds the access log's token (see AccessLogListener) and may hold the upstream's login:
            # readable by its owner only (Squid reads it with root's rights, or as the supervisor's own user).
            temps.append((path, _write_temp(path, text, 0o600 if path == paths.squid_conf else 0o644)))
    except OSError:
        for _, tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    _replace_all(temps)
    for stale in set(paths.policy_dir.glob("*")) - set(files):
        stale.unlink(missing_ok=True)


def prepare_state_dir(paths: StatePaths, *, error_page: str, user: str | None) -> None:
    """Create everything Squid needs that does not depend on the allowlist. Idempotent."""
    for directory in (paths.state, paths.conf_dir, paths.candidate_dir, paths.cert.parent, paths.cache_fifo.parent,
                      paths.sni_helper.parent, paths.identity_dir):
        directory.mkdir(parents=True, exist_ok=True)
    _check_reachable(paths.state, user)
    _prepare_smp_dirs(user)
    for directory in (paths.state, paths.cache_fifo.parent, paths.cert.parent):
        _chown_to(directory, user)
    _write_throwaway_cert(paths, user)
    _init_ssl_db(paths, user)
    _install_error_pages(paths, error_page)
    atomic_write(paths.sni_helper, sni_helper_script(), mode=0o644)
    # The compiled twin, when this install has one (render() then names it in squid.conf). A copy in the state dir,
    # as for the script: Squid's user may not reach the package's own directory.
    compiled = compiled_sni_helper()
    if compiled is not None:
        atomic_write(paths.sni_helper_binary, compiled.read_bytes(), mode=0o755)
    else:
        paths.sni_helper_binary.unlink(missing_ok=True)
    atomic_write(paths.upstream_probe, upstream_probe_script(), mode=0o644)
    atomic_write(paths.log_gate, log_gate_script(), mode=0o644)
    paths.log_blocked_flag.unlink(missing_ok=True)  # a previous run's: lines flow until shown otherwise
    atomic_write(paths.identity_helper, identity_helper_script(), mode=0o644)
    fifo = paths.cache_fifo
    if fifo.exists() and not stat.S_ISFIFO(fifo.stat().st_mode):
        fifo.unlink()
    if not fifo.exists():
        os.mkfifo(fifo, 0o600)
    _chown_to(fifo, user)
    (fifo.parent / "access.fifo").unlink(missing_ok=True)  # an older version's access-log FIFO


IPC_DIR = Path(strings.IPC_DIR)
SHM_DIR = Path("/dev/shm")


def _prepare_smp_dirs(user: str | None) -> None:
    if os.geteuid() == 0:
        IPC_DIR.mkdir(parents=True, exist_ok=True)
        _chown_to(IPC_DIR, user)
    for directory, fix in ((IPC_DIR, "create it owned by the proxy's user (install -d -o proxy -g proxy /run/squid)"),
                           (SHM_DIR, "mount a tmpfs there (Docker and ECS provide one by default)")):
        if not os.access(directory, os.W_OK | os.X_OK) and os.geteuid() != 0:
            raise SquidError(f"Squid's SMP mode needs a writable {directory}; {fix}")


def _check_reachable(state: Path, user: str | None) -> None:
    """Squid drops to ``user`` and must reach the state dir; a private parent (e.g. a 0700 home or pytest's
    tmp dir) would make it fail later with a confusing 'Permission denied' on some error page."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for parent in state.resolve().parents:
        info = parent.stat()
        if info.st_uid == entry.pw_uid:
            continue
        if not info.st_mode & stat.S_IXOTH and not (info.st_gid == entry.pw_gid and info.st_mode & stat.S_IXGRP):
            raise SquidError(
                f"state dir {state} is not reachable by user {user!r} (Squid's worker): {parent} has mode "
                f"{stat.S_IMODE(info.st_mode):o}; choose a state dir whose parents are traversable "
                "(e.g. /var/lib/egress-proxy) or run as that user"
            )


def _write_throwaway_cert(paths: StatePaths, user: str | None) -> None:
    """Squid insists on a certificate for an ssl-bump port even though we only peek and splice. It is made
    here, fresh per state dir, never shipped, and never shown to a client."""
    if paths.cert.exists() and paths.key.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress-proxy throwaway (never used to bump)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    atomic_write(paths.key, key_pem, mode=0o600)
    atomic_write(paths.cert, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)
    _chown_to(paths.key, user)


def _init_ssl_db(paths: StatePaths, user: str | None) -> None:
    if paths.ssl_db.exists():
        return
    result = subprocess.run([CERTGEN, "-c", "-s", str(paths.ssl_db), "-M", "1MB"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SquidError(f"{CERTGEN} could not create {paths.ssl_db}: {result.stderr.strip()}")
    if user is not None:
        for root, dirs, files in os.walk(paths.ssl_db):
            for name in [*dirs, *files]:
                _chown_to(Path(root) / name, user)
        _chown_to(paths.ssl_db, user)


def _install_error_pages(paths: StatePaths, error_page: str) -> None:
    # error_directory replaces every template, so Squid's stock pages go beside ours.
    paths.errors.mkdir(parents=True, exist_ok=True)
    if STOCK_ERRORS.is_dir():
        for template in STOCK_ERRORS.iterdir():
            if template.is_file() and not (paths.errors / template.name).exists():
                shutil.copyfile(template, paths.errors / template.name)
    atomic_write(paths.errors / "ERR_EGRESS_DENIED", error_page)
    atomic_write(paths.errors / "ERR_EGRESS_UPSTREAM", upstream_error_page())


def parse_check(squid_binary: str, conf: Path) -> list[str]:
    """``squid -k parse`` on a config. Returns its warnings; raises SquidError with the first error line."""
    try:
        result = subprocess.run([squid_binary, *strings.PARSE_ARGS, strings.FLAG_CONFIG, str(conf)],
                                capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SquidError(f"Squid not found ({squid_binary!r}); install Debian's squid-openssl "
                         "or set EGRESS_SQUID_BINARY") from None
    except subprocess.TimeoutExpired:
        raise SquidError(f"squid -k parse of {conf} did not finish within 120 s (the host is overloaded, or the "
                         "lists are far too long); the current config keeps serving") from None
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    problems = [line for line in lines if strings.is_parse_problem(line)]
    if result.returncode != 0 or problems:
        detail = problems[0] if problems else (lines[-1] if lines else f"exit code {result.returncode}")
        raise SquidError(f"squid -k parse rejected {conf}: {strings.strip_timestamp(detail)}")
    return [strings.strip_timestamp(line) for line in lines
            if strings.PARSE_WARNING_MARKER in line
            and not any(expected in line for expected in strings.EXPECTED_PARSE_WARNINGS)]


LogSink = Callable[[list[str]], None]


# The longest a relayed line waits for others to share its wake-up (see LogRelay). Measured against 50 ms: the same
# latency per new connection, 31-38 us less supervisor CPU per connection.
COALESCE_SECONDS = 0.2
PIPE_BYTES = 1024 * 1024  # the relays' pipe size: Linux's default pipe-max-size, an unprivileged process may set it
BUSY_READ_BYTES = 32 * 1024  # a read at least this big means a busy log: read on at once


def _hand_over(sink: LogSink, raw: list[bytes]) -> None:
    """A relay's complete lines, decoded and without blank ones, to its sink in one call."""
    lines = [text for text in (line.decode("utf-8", errors="replace") for line in raw) if text.strip()]
    if lines:
        try:
            sink(lines)
        except Exception:  # a bug in a sink must not end the relay: every later line would be lost
            pass


class _Relay:
    """A relay's thread: ``stop()`` is called once nothing writes any more (Squid has exited), and the thread
    drains what is left and returns."""

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # stop() also writes here, so a thread waiting in select() wakes for a stop at once and needs no timeout to
        # notice one (a timeout woke each relay of an idle proxy five times a second). The thread closes the read
        # end when it returns.
        self._stop_read, self._stop_write = os.pipe()
        for fd in (self._stop_read, self._stop_write):
            os.set_blocking(fd, False)
        self._stop_sent = False

    def _start_thread(self, name: str) -> None:
        self._thread = named_thread(self._run, name)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Drain and join."""
        self._stopping.set()
        if not self._stop_sent:
            self._stop_sent = True
            with contextlib.suppress(OSError):
                os.write(self._stop_write, b"s")
            os.close(self._stop_write)
        self._join(timeout)

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


class LogRelay(_Relay):
    """Reads a file descriptor (the cache.log FIFO Squid writes to, or a pipe from Squid's stderr) in its own thread and
    hands each read's complete lines to ``sink`` as one list (so a busy log costs one call per read, not per line).
    The sink must never block: it only appends to the bounded stdout buffer (log_output.py), so the relay always
    keeps reading and Squid never waits on a full FIFO.

    A FIFO is opened read-write, so the relay never sees EOF when Squid closes and reopens its logs on
    reconfigure. So ``stop()`` cannot wait for EOF: it is called after Squid has exited (no writer is left),
    and the thread then reads what is still buffered in the pipe and returns. No line written before Squid
    exited is lost.

    After a small read the relay waits ``COALESCE_SECONDS`` before reading again, so that at a trickle it wakes once
    per interval for all the lines Squid wrote meanwhile, not once per line:
    each wake-up of the relay and of the stdout writer costs a few hundred microseconds of a core that the proxy's
    connections share. A read that returns much (a busy log) is followed by the next read at once, as before. The
    pipe is enlarged (``PIPE_BYTES``) so that a whole interval's lines fit. ``stop()`` cuts the wait short.
    ``coalesce`` sets the wait for one relay (the cache.log relay's is shorter: see the supervisor).
    (The access log does not come this way: see AccessLogListener.)"""

    def __init__(self, name: str, sink: LogSink, *, fifo: Path | None = None, fd: int | None = None,
                 coalesce: float = COALESCE_SECONDS) -> None:
        super().__init__()
        self.name = name
        self._coalesce = coalesce
        self._fifo = fifo
        self._fd = fd
        self._sink = sink

    def start(self) -> None:
        if self._fd is None:
            assert self._fifo is not None
            self._fd = os.open(self._fifo, os.O_RDWR | os.O_NONBLOCK)
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):  # not a pipe (tests), or a lower pipe-max-size: 64 KiB still works
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._start_thread(f"relay-{self.name}")

    def _run(self) -> None:
        assert self._fd is not None
        pending = b""
        try:
            while True:
                stopping = self._stopping.is_set()  # read before draining: a set flag means no writer is left
                readable, _, _ = select.select([self._fd, self._stop_read], [], [])
                readable = [fd for fd in readable if fd == self._fd]
                chunk = b""
                if readable:
                    try:
                        chunk = os.read(self._fd, 262144)
                    except BlockingIOError:
                        chunk = b""
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    self._emit(lines)
                    if self._coalesce > 0 and len(chunk) < BUSY_READ_BYTES:
                        self._stopping.wait(self._coalesce)  # returns at once when stop() is called
                    continue
                if readable and not chunk and self._fifo is None:
                    break  # a pipe's EOF: the writer (Squid's stderr) is gone
                if stopping:
                    break
        finally:
            if pending:
                self._emit([pending])
            os.close(self._fd)
            os.close(self._stop_read)

    def _emit(self, raw: list[bytes]) -> None:
        _hand_over(self._sink, raw)


WriterOf = Callable[[tuple[str, int], tuple[str, int]], str | None]
# A connection that did not come from Squid was closed: its peer, and how many lines it wrote without the token
# (0 when it was closed unread).
Refused = Callable[[str, int], None]
TOKEN_BYTES = 16  # the access-log token: 128 random bits, as hex


class _LogConnection:
    """One Squid worker's access-log connection: the bytes read so far that do not yet end a line."""

    def __init__(self, sock: socket.socket, writer: str, peer: str) -> None:
        self.sock = sock
        self.writer = writer
        self.peer = peer
        self.pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        return lines

    def finish(self) -> list[bytes]:
        rest, self.pending = self.pending, b""
        return [rest] if rest else []


class AccessLogListener(_Relay):
    """Squid's access log, received over loopback TCP: each worker's ``access_log tcp://127.0.0.1:PORT`` logger
    (Squid's TcpLogger) connects here and writes its lines, and one thread reads every connection and hands each
    round's complete lines to ``sink`` as one list. Squid writes from inside the worker, non-blocking, from a
    bounded buffer of its own (``buffer-size``); when that buffer is full it drops lines and says so in cache.log
    (the supervisor counts them, see squid_strings.tcp_logger_drops). So, as with the FIFO relay before it, a slow
    reader costs lines, counted, never proxying; and there is no log_file_daemon process and no FIFO in between.

    Only Squid may write here, and two checks hold that:
    - every line must start with ``token`` (random, made here at each start, rendered into the logformat of
      squid.conf, which only Squid's user root and the supervisor can read; see access_log.tagged_logformat). A
      connection whose line lacks it is closed at that line, its tokenless lines are dropped, and it is reported
      to ``on_refused`` with their count. The tag is removed before the line goes to ``sink``.
    - at accept, ``writer_of(peer, local)`` names the Squid process that holds the connecting socket (read from
      /proc). That names the writer for the ordering below, and refuses at once (unread, reported) a connection
      that an open socket of another process made. When it finds no holder because the socket is already closed
      (a worker opened its logger at one reconfigure, wrote and closed it at the next, before this check ran;
      or it died), the writer is read from the token's tag at the start of the bytes it sent (peeked, not
      consumed): the lines of a real worker are never lost to that race. A closed socket that sent nothing (the
      coordinator's, which never writes) is closed quietly: it carried nothing, forged nothing.

    Accepting never waits on reading: a thread of its own waits in accept() and checks each connection at once
    (while its peer still holds it, the usual case), then hands it to the reading thread and wakes it.

    Order: one worker's lines arrive in the order it wrote them. A reconfigure closes each worker's logger after it
    has written its last lines and opens a new connection, which may arrive first: a worker's new connection is
    read only once its previous one has reached its end, so nothing is reordered, lost or read twice across a
    reload. The same holds when a revived worker replaces a dead one (the kernel closes the dead one's socket).

    Wake-ups: after a small round the reading thread waits ``COALESCE_SECONDS`` before reading again (as LogRelay
    does), so a trickle of lines costs one wake-up per interval; the kernel's socket buffers and Squid's own buffer
    hold the lines meanwhile. A busy round is followed by the next at once.

    ``stop()`` is called after Squid has exited: the connections still waiting to be accepted are accepted and
    checked, every connection is read to its end, and both threads return."""

    def __init__(self, sink: LogSink, writer_of: WriterOf, on_refused: Refused, host: str = "127.0.0.1") -> None:
        super().__init__()
        self._sink = sink
        self._writer_of = writer_of
        self._on_refused = on_refused
        self.token = secrets.token_hex(TOKEN_BYTES)
        self._tag = f"{self.token}-".encode()  # then the kid number and a tab (access_log.tagged_logformat)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((host, 0))  # bound now, so the rendered config can name the port
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()
        self.port = self.address[1]
        self._active: dict[str, _LogConnection] = {}  # the connection being read, per worker
        self._waiting: dict[str, list[_LogConnection]] = {}  # newer connections of a worker, in accept order
        self._arrived: list[_LogConnection] = []  # accepted and checked, not yet taken by the reader (the lock's)
        self._arrived_lock = threading.Lock()
        self._accepted_all = threading.Event()  # the accept thread has taken its last connection
        self._wake_read, self._wake_write = os.pipe()  # wakes the reader for a new connection
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        self._acceptor: threading.Thread | None = None
        self.refused = 0
        self.forged_lines = 0

    def start(self) -> None:
        self._acceptor = named_thread(self._accept_until_stopped, "relay-access-accept")
        self._acceptor.start()
        self._start_thread("relay-access")

    def _join(self, timeout: float) -> None:
        """stop(): the accept thread takes what is left, then the reader drains."""
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        super()._join(timeout)

    # --- the accept thread -----------------------------------------------------------------------------------
    def _accept_until_stopped(self) -> None:
        try:
            while True:
                readable, _, _ = select.select([self._listener.fileno(), self._stop_read], [], [])
                final = self._stop_read in readable  # Squid has exited: take what is queued, then end
                self._accept()
                if final:
                    return
        finally:
            self._listener.close()
            os.close(self._stop_read)
            self._accepted_all.set()
            self._wake()
            os.close(self._wake_write)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is awake enough
            os.write(self._wake_write, b"w")

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:  # the peer reset before we got to it
                    continue
                return  # e.g. out of descriptors: the connection stays queued for the next wake-up
            peer_text = f"{peer[0]}:{peer[1]}"
            writer = self._identify(sock, peer)
            if writer is None:
                sock.close()
                continue
            sock.setblocking(False)
            with self._arrived_lock:
                self._arrived.append(_LogConnection(sock, writer, peer_text))
            self._wake()

    def _identify(self, sock: socket.socket, peer: tuple[str, int]) -> str | None:
        """The writer of a new connection, or None (then it is to be closed; refusals are reported here)."""
        try:
            writer = self._writer_of(peer, self.address)
        except Exception:  # an unreadable /proc: no holder found, the token decides
            writer = None
        if writer is not None:
            return writer
        try:
            head = sock.recv(len(self._tag) + 12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            head = None  # an open socket of another process that has written nothing yet
        except OSError:
            head = b""  # reset: nothing to read
        if head == b"":
            return None  # closed without writing a byte: nothing to relay and nothing forged
        tagged = self._untagged(head) if head is not None else None
        if tagged is None:
            self._refuse(peer, 0)
            return None
        return strings.kid_worker_name(tagged[0])

    def _refuse(self, peer: tuple[str, int] | str, forged_lines: int) -> None:
        self.refused += 1
        self.forged_lines += forged_lines
        self._on_refused(peer if isinstance(peer, str) else f"{peer[0]}:{peer[1]}", forged_lines)

    def _untagged(self, line: bytes) -> tuple[int, bytes] | None:
        """A line's kid number and its text after the tag; None when the line does not start with the token's
        tag."""
        if not line.startswith(self._tag):
            return None
        kid, tab, text = line[len(self._tag):].partition(b"\t")
        return (int(kid), text) if tab and kid.isdigit() else None

    # --- the reading thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ, None)
        try:
            while True:
                accepted_all = self._accepted_all.is_set()  # read before draining: then nothing more arrives
                lines: list[bytes] = []
                read = 0
                progress = self._take_arrived(selector)
                for key, _ in selector.select(0 if accepted_all else None):
                    if key.data is None:
                        try:
                            woke = os.read(self._wake_read, 4096)
                        except BlockingIOError:
                            woke = b""
                        else:
                            if not woke:  # the accept thread has ended (and closed its end)
                                selector.unregister(self._wake_read)
                        progress = self._take_arrived(selector) or progress
                        continue
                    progress = True
                    connection: _LogConnection = key.data
                    try:
                        chunk = connection.sock.recv(262144)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if chunk:
                        read += len(chunk)
                        if not self._untag(connection, connection.feed(chunk), lines):
                            self._close(selector, connection)
                    else:
                        self._untag(connection, connection.finish(), lines, end=True)
                        self._close(selector, connection)
                self._emit(lines)
                if read:
                    if read < BUSY_READ_BYTES:
                        self._stopping.wait(COALESCE_SECONDS)  # returns at once when stop() is called
                    continue
                if accepted_all and not progress:
                    break
        finally:
            leftovers: list[bytes] = []
            for connection in [*self._active.values(), *(c for queue in self._waiting.values() for c in queue)]:
                self._untag(connection, connection.finish(), leftovers, end=True)
                connection.sock.close()
            self._emit(leftovers)
            selector.close()
            os.close(self._wake_read)

    def _take_arrived(self, selector: selectors.BaseSelector) -> bool:
        with self._arrived_lock:
            arrived, self._arrived = self._arrived, []
        for connection in arrived:  # in accept order
            if connection.writer in self._active:
                self._waiting.setdefault(connection.writer, []).append(connection)
            else:
                self._read(selector, connection)
        return bool(arrived)

    def _untag(self, connection: _LogConnection, raw: list[bytes], out: list[bytes], *, end: bool = False) -> bool:
        """Append ``raw``'s lines without their tag to ``out``, up to the first line without the token: that
        line and the rest are forged, counted and reported, and False says to close the connection. ``end``: the
        last piece is what the writer left without a newline; cut inside the tag (a worker killed mid-line), it is
        dropped quietly."""
        prefix = len(self._tag)
        for index, line in enumerate(raw):
            tagged = self._untagged(line)
            if tagged is not None:
                out.append(tagged[1])
                continue
            if not line.strip() or (end and index == len(raw) - 1 and self._tag.startswith(line[:prefix])
                                    and (len(line) <= prefix or line[prefix:].isdigit())):
                continue
            self._refuse(connection.peer, sum(1 for forged in raw[index:] if forged.strip()))
            return False
        return True

    def _read(self, selector: selectors.BaseSelector, connection: _LogConnection) -> None:
        self._active[connection.writer] = connection
        selector.register(connection.sock, selectors.EVENT_READ, connection)

    def _close(self, selector: selectors.BaseSelector, connection: _LogConnection) -> None:
        selector.unregister(connection.sock)
        connection.sock.close()
        del self._active[connection.writer]
        queue = self._waiting.get(connection.writer)
        if queue:
            self._read(selector, queue.pop(0))
            if not queue:
                del self._waiting[connection.writer]

    def _emit(self, raw: list[bytes]) -> None:
        _hand_over(self._sink, raw)


def _proc_net_address(address: tuple[str, int]) -> str:
    """``("127.0.0.1", 3128)`` as /proc/net/tcp prints it: ``0100007F:0C38`` (the address in host byte order)."""
    return f"{int.from_bytes(socket.inet_aton(address[0]), 'little'):08X}:{address[1]:04X}"


def tcp_socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the IPv4 TCP socket with this local and remote address in our network namespace (0 or None:
    no open socket, e.g. its owner already closed it)."""
    want = (_proc_net_address(local), _proc_net_address(remote))
    with open("/proc/net/tcp") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) > 9 and (fields[1], fields[2]) == want:
                return int(fields[9]) or None
    return None


def pid_holding_socket(inode: int, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the socket ``inode`` open (a readlink of each of their descriptors)."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def connecting_worker(workers: dict[str, int], peer: tuple[str, int], local: tuple[str, int]) -> str | None:
    """The name of the Squid process (name -> pid: workers.read_workers, with the coordinator) whose socket
    connected from ``peer`` to ``local``; None when the connecting socket belongs to none of them."""
    inode = tcp_socket_inode(peer, local)
    if inode is None:
        return None
    pid = pid_holding_socket(inode, workers.values())
    return next((name for name, worker_pid in workers.items() if worker_pid == pid), None) if pid else None


class SquidProcess:
    """Squid 5 in SMP mode in the foreground, as our child: a master (our child) with a coordinator and the
    workers as its kids, all in a process group of their own (so a terminal's Ctrl-C reaches only us, and we
    forward it).

    Squid never outlives us. PR_SET_PDEATHSIG cannot do it: the kernel clears it when Squid's master changes
    its effective user (measured: a SIGKILLed parent left master and kids serving), and it would miss the
    kids anyway. Instead a watchdog (``sh``, started right after
    Squid) blocks reading a pipe whose only writer is this process; when we die, by any means, the kernel
    closes it, the read returns and the watchdog SIGKILLs Squid's process group. (dash's kill takes
    `-9 -PGID`, not `-KILL -- -PGID`.)"""

    def __init__(self, squid_binary: str, conf: Path, service: str) -> None:
        self.squid_binary = squid_binary
        self.conf = conf
        self.service = service
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # our end of the watchdog's pipe

    def start(self, output: int | None = None) -> None:
        """``output``: a pipe's write end for Squid's stdout and stderr (None: ours)."""
        try:
            self.process = subprocess.Popen(
                [self.squid_binary, strings.FLAG_FOREGROUND, strings.FLAG_SERVICE_NAME, self.service,
                 strings.FLAG_CONFIG, str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT if output is not None else None,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise SquidError(f"Squid not found ({self.squid_binary!r}); install Debian's squid-openssl "
                             "or set EGRESS_SQUID_BINARY") from None
        read_end, self._lifeline = os.pipe()  # both close-on-exec: only the watchdog gets the read end, as stdin
        try:
            self._watchdog = subprocess.Popen(
                ["sh", "-c", 'read _ignored; kill -9 -"$1" 2>/dev/null', "egress-proxy-watchdog",
                 str(self.process.pid)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def poll(self) -> int | None:
        return self.process.poll() if self.process else None

    def reconfigure(self) -> None:
        """What ``squid -k reconfigure`` does (SIGHUP), sent to our own child so no pid file can mislead it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def terminate(self) -> None:
        """SIGTERM: Squid stops accepting and drains for shutdown_lifetime."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left; release the watchdog."""
        if self.process is None:
            return None
        self.terminate()
        try:
            code: int | None = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        self.kill_leftovers()
        if code is None:
            code = self.process.wait()
        self._release_watchdog()
        return code

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of Squid's process group (kids and helpers of a master that died), so a
        dead master's workers cannot keep the port and serve a config nobody supervises."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def _release_watchdog(self) -> None:
        # Closing our end lets the watchdog kill an (already empty) group and exit.
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)


def access_sink(write: Callable[[list[str]], object],
                observe: Callable[[dict[str, Any]], None] | None = None) -> LogSink:
    """Parse, drop noise, hand the JSON lines of one read to ``write`` at once; ``observe`` (the metrics' decision
    counter) sees every logged record."""

    follow_ups = access_log.ConnectionFollowUps()

    def sink(lines: list[str]) -> None:
        out: list[str] = []
        records = [access_log.parse_line(line) for line in lines]
        # One read takes whatever every worker sent in the last 200 ms, worker by worker: put it in the order Squid
        # logged it. Stable, so a worker's own lines (a tunnel and its follow-up, same millisecond) keep their
        # order, and a batch of per-worker runs costs one merge pass.
        if len(records) > 1 and all(isinstance(record.get("time"), float) for record in records):
            records.sort(key=operator.itemgetter("time"))
        for record in records:
            if not access_log.is_noise(record) and not follow_ups.is_follow_up(record):
                out.append(access_log.to_json(record))
                if observe is not None:
                    observe(record)
        write(out)

    return sink
