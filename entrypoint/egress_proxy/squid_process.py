"""The Squid child process: prepare the state dir, parse-check configs, start, reconfigure, stop, relay logs."""

from __future__ import annotations

import contextlib
import datetime
import os
import pwd
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import access_log
from .squid_conf import StatePaths, sni_helper_script
from .squid_strings import CERTGEN

STOCK_ERRORS = Path("/usr/share/squid/errors/templates")
SQUID_USER = "proxy"  # Debian's squid user; Squid drops to it when started as root


class SquidError(RuntimeError):
    """Squid refused a config or failed to start. The message is one line, fit for a log."""


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


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write via a temp file + rename, so a reader (Squid on reconfigure) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def prepare_state_dir(paths: StatePaths, *, error_page: str, user: str | None) -> None:
    """Create everything Squid needs that does not depend on the allowlist. Idempotent."""
    for directory in (paths.state, paths.conf_dir, paths.candidate_dir, paths.cert.parent, paths.access_fifo.parent,
                      paths.sni_helper.parent):
        directory.mkdir(parents=True, exist_ok=True)
    _check_reachable(paths.state, user)
    _prepare_smp_dirs(user)
    for directory in (paths.state, paths.access_fifo.parent, paths.cert.parent):
        _chown_to(directory, user)
    _write_throwaway_cert(paths, user)
    _init_ssl_db(paths, user)
    _install_error_pages(paths, error_page)
    atomic_write(paths.sni_helper, sni_helper_script(), mode=0o644)
    for fifo in (paths.access_fifo, paths.cache_fifo):
        if fifo.exists() and not stat.S_ISFIFO(fifo.stat().st_mode):
            fifo.unlink()
        if not fifo.exists():
            os.mkfifo(fifo, 0o600)
        _chown_to(fifo, user)


IPC_DIR = Path("/var/run/squid")  # compiled into Debian's Squid: SMP mode's IPC sockets live here
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


def parse_check(squid_binary: str, conf: Path) -> list[str]:
    """``squid -k parse`` on a config. Returns its warnings; raises SquidError with the first error line."""
    try:
        result = subprocess.run([squid_binary, "-k", "parse", "-f", str(conf)], capture_output=True, text=True,
                                timeout=120)
    except FileNotFoundError:
        raise SquidError(f"Squid not found ({squid_binary!r}); install Debian's squid-openssl "
                         "or set EGRESS_SQUID_BINARY") from None
    lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    problems = [line for line in lines if "FATAL" in line or "ERROR" in line or "Bungled" in line]
    if result.returncode != 0 or problems:
        detail = problems[0] if problems else (lines[-1] if lines else f"exit code {result.returncode}")
        raise SquidError(f"squid -k parse rejected {conf}: {_strip_timestamp(detail)}")
    return [_strip_timestamp(line) for line in lines if "WARNING" in line and not _expected_warning(line)]


def _expected_warning(line: str) -> bool:
    # "via off" is deliberate: an egress proxy should not announce itself to the destinations.
    return "HTTP requires the use of Via" in line


def _strip_timestamp(line: str) -> str:
    # "2026/11/27 10:00:00| WARNING: ..." -> "WARNING: ..."
    head, sep, tail = line.partition("| ")
    return tail if sep and head[:4].isdigit() else line


LogSink = Callable[[str], None]


class LogRelay:
    """Reads a FIFO Squid writes to and hands each line to ``sink``. Opened read-write so it never sees EOF
    when Squid closes and reopens its logs on reconfigure."""

    def __init__(self, fifo: Path, sink: LogSink) -> None:
        self._fd = os.open(fifo, os.O_RDWR)
        self._sink = sink
        self._thread = threading.Thread(target=self._run, name=f"relay-{fifo.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with os.fdopen(self._fd, "r", encoding="utf-8", errors="replace", buffering=1) as stream:
            for line in stream:
                if line.strip():
                    self._sink(line)


class SquidProcess:
    """Squid 5 in SMP mode in the foreground, as our child: a master (our child) with a coordinator and the
    workers as its kids. ``--foreground`` rather than ``-N``, because -N means one process and no coordinator,
    and then every reconfigure closes the listening port for a moment."""

    def __init__(self, squid_binary: str, conf: Path, service: str) -> None:
        self.squid_binary = squid_binary
        self.conf = conf
        self.service = service
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            self.process = subprocess.Popen(
                [self.squid_binary, "--foreground", "-n", self.service, "-f", str(self.conf)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # our signals are forwarded explicitly, never doubled by the terminal
            )
        except FileNotFoundError:
            raise SquidError(f"Squid not found ({self.squid_binary!r}); install Debian's squid-openssl "
                             "or set EGRESS_SQUID_BINARY") from None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def poll(self) -> int | None:
        return self.process.poll() if self.process else None

    def reconfigure(self) -> None:
        """What ``squid -k reconfigure`` does (SIGHUP), sent to our own child so no pid file can mislead it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self, grace: float) -> int | None:
        """SIGTERM lets Squid drain for shutdown_lifetime; SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            code = None
        self.kill_leftovers()
        return code if code is not None else self.process.wait()

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of Squid's process group (kids and helpers of a master that died), so a
        dead master's workers cannot keep the port and serve a config nobody supervises."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)


def wait_until_listening(host: str, port: int, process: SquidProcess, timeout: float) -> None:
    """Block until Squid accepts TCP on the port, or raise SquidError if it died or took too long."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise SquidError(f"Squid exited with code {code} during startup (see the cache_log lines above)")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise SquidError(f"Squid did not accept connections on {host}:{port} within {timeout:.0f} s")


def access_sink(write: Callable[[str], None],
                observe: Callable[[dict[str, Any]], None] | None = None) -> LogSink:
    """Parse, drop noise, write as JSON; ``observe`` (the metrics' decision counter) sees every logged record."""

    def sink(line: str) -> None:
        record = access_log.parse_line(line)
        if not access_log.is_noise(record):
            write(access_log.to_json(record))
            if observe is not None:
                observe(record)

    return sink
